//! Monitoring: the alerts of the twins' rules (`/alerts`), filtered and paged, one by
//! id, and an operator's acknowledgement.

use super::{Caller, Errors, Result};
use actix_web::{HttpRequest, HttpResponse, delete, get, post, web};
use std::collections::VecDeque;
use std::time::Duration;
use twinfleet_actors::{AlertBook, AlertQuery, TwinRuntime};
use twinfleet_models::{Action, DeviceTypeId, RuleAlert, Severity};

pub(super) fn routes(cfg: &mut utoipa_actix_web::service_config::ServiceConfig) {
    // (`/alerts/stream` before `/alerts/{id}`.)
    cfg.service(stream)
        .service(list)
        .service(show)
        .service(acknowledge)
        .service(add_silence)
        .service(list_silences)
        .service(delete_silence)
        .service(twin_rules)
        .service(exports);
}

/// `GET /exports`: the history exports of the configuration (`[[exports]]`, secrets
/// hidden), each with its cursor and counters. Needs `read` on the fleet.
#[utoipa::path(tag = "monitoring", responses((status = 200, body = Vec<twinfleet_actors::exports::ExportView>), Errors), security(("bearer" = [])))]
#[get("/exports")]
async fn exports(rt: web::Data<TwinRuntime>, caller: Caller) -> Result<HttpResponse> {
    rt.authorize(&caller.0, Action::Read)?;
    Ok(HttpResponse::Ok().json(rt.exports().views()))
}

/// `GET /twins/{id}/rules`: the twin's effective monitoring rules (its type's defaults,
/// its DTAs' layers, its own overrides, merged), each with the layer that set it last
/// and its phase, and the rules that do not resolve. Needs `read` on the twin.
#[utoipa::path(tag = "monitoring", responses((status = 200, body = twinfleet_actors::dti::monitor::RulesView), Errors), security(("bearer" = [])))]
#[get("/twins/{id}/rules")]
async fn twin_rules(rt: web::Data<TwinRuntime>, caller: Caller, id: web::Path<String>) -> Result<HttpResponse> {
    let h = super::twins::twin_for(&rt, &caller, &id, Action::Read)?;
    Ok(HttpResponse::Ok().json(h.rules().await?))
}

/// `POST /silences`: while it lasts, the alerts it matches (`twin`, `device_type`,
/// `rule`, `group`: every given one) reach no notification sink; they are still raised,
/// stored and streamed. A DTA's maintenance window is a silence on `group`. `ends_at`
/// (ms since the epoch) is required; `starts_at` defaults to now. Needs `write` on the
/// fleet, or on the device type it names.
#[utoipa::path(tag = "monitoring", request_body = twinfleet_models::notify::Silence, responses((status = 201, body = twinfleet_models::notify::Silence), Errors), security(("bearer" = [])))]
#[post("/silences")]
async fn add_silence(
    rt: web::Data<TwinRuntime>,
    caller: Caller,
    body: web::Json<twinfleet_models::notify::Silence>,
) -> Result<HttpResponse> {
    let mut s = body.into_inner();
    match &s.device_type {
        Some(ty) => rt.authorize_type(
            &caller.0,
            Action::Write,
            &DeviceTypeId::new(ty).map_err(twinfleet_actors::TwinError::from)?,
        )?,
        None => rt.authorize(&caller.0, Action::Write)?,
    }
    if s.starts_at.0 == 0 {
        s.starts_at = rt.clock().now();
    }
    s.created_by = caller.0.user.to_string();
    Ok(HttpResponse::Created().json(rt.alert_book().add_silence(s).await?))
}

/// `GET /silences`: every silence not deleted (expired ones too).
#[utoipa::path(tag = "monitoring", responses((status = 200, body = Vec<twinfleet_models::notify::Silence>), Errors), security(("bearer" = [])))]
#[get("/silences")]
async fn list_silences(rt: web::Data<TwinRuntime>, caller: Caller) -> Result<HttpResponse> {
    may_read(&rt, &caller, None)?;
    Ok(HttpResponse::Ok().json(rt.alert_book().silences()))
}

#[utoipa::path(tag = "monitoring", responses((status = 200, body = twinfleet_models::notify::Silence), Errors), security(("bearer" = [])))]
#[delete("/silences/{id}")]
async fn delete_silence(rt: web::Data<TwinRuntime>, caller: Caller, id: web::Path<u64>) -> Result<HttpResponse> {
    rt.authorize(&caller.0, Action::Write)?;
    Ok(HttpResponse::Ok().json(rt.alert_book().delete_silence(*id).await?))
}

#[derive(Debug, Default, serde::Deserialize, utoipa::IntoParams)]
#[into_params(parameter_in = Query)]
#[serde(deny_unknown_fields)]
struct StreamQuery {
    /// At least this severity.
    #[param(value_type = Option<String>)]
    severity: Option<Severity>,
    device_type: Option<String>,
    twin: Option<String>,
    /// Resume after this revision (as the `Last-Event-ID` header does, which wins).
    /// Default: only what happens from now on.
    after: Option<u64>,
}

/// How often an idle stream sends a comment, so that proxies keep it open.
const KEEP_ALIVE: Duration = Duration::from_secs(15);

/// One SSE frame of a change.
fn frame(rev: u64, a: &RuleAlert) -> web::Bytes {
    let data = serde_json::to_string(a).unwrap_or_default();
    web::Bytes::from(format!("id: {rev}\nevent: alert\ndata: {data}\n\n"))
}

struct Follow {
    rt: TwinRuntime,
    rx: tokio::sync::broadcast::Receiver<twinfleet_actors::alerting::Change>,
    /// The last revision sent.
    cursor: u64,
    queued: VecDeque<twinfleet_actors::alerting::Change>,
    q: StreamQuery,
}

impl Follow {
    fn wanted(&self, a: &RuleAlert) -> bool {
        self.q.severity.is_none_or(|s| a.severity >= s)
            && self.q.device_type.as_ref().is_none_or(|t| &a.device_type == t)
            && self.q.twin.as_ref().is_none_or(|t| &a.twin == t)
    }

    /// Reads what the log holds after the cursor (a resume, or the broadcast lagged).
    fn catch_up(&mut self, book: &AlertBook) -> Option<web::Bytes> {
        match book.changes_after(self.cursor, 1_000) {
            Ok((changes, lost)) => {
                self.queued.extend(changes);
                lost.then(|| web::Bytes::from_static(b": some changes were older than the log keeps\n\n"))
            }
            Err(e) => Some(web::Bytes::from(format!(": the change log could not be read: {e}\n\n"))),
        }
    }

    async fn next(&mut self) -> Option<web::Bytes> {
        loop {
            if let Some((rev, a)) = self.queued.pop_front() {
                if rev <= self.cursor {
                    continue;
                }
                self.cursor = rev;
                if self.wanted(&a) {
                    return Some(frame(rev, &a));
                }
                continue;
            }
            match tokio::time::timeout(KEEP_ALIVE, self.rx.recv()).await {
                Err(_) => return Some(web::Bytes::from_static(b": keep-alive\n\n")),
                Ok(Ok(change)) => self.queued.push_back(change),
                Ok(Err(tokio::sync::broadcast::error::RecvError::Lagged(_))) => {
                    let rt = self.rt.clone();
                    if let Some(note) = self.catch_up(rt.alert_book()) {
                        return Some(note);
                    }
                }
                Ok(Err(tokio::sync::broadcast::error::RecvError::Closed)) => return None,
            }
        }
    }
}

/// `GET /alerts/stream`: Server-Sent Events, one `alert` event per change of an alert
/// (raised, acknowledged, cleared; `data` = the alert after it, `id` = the change's
/// revision). Reconnect with `Last-Event-ID` (or `?after=`) to get what was missed, as
/// far back as the change log keeps (`alerting::MAX_CHANGES`). Filters: `severity` (at
/// least), `device_type`, `twin`. Needs `read` on the fleet or the named device type.
#[utoipa::path(tag = "monitoring", params(StreamQuery), responses((status = 200, description = "text/event-stream", content_type = "text/event-stream", body = String), Errors), security(("bearer" = [])))]
#[get("/alerts/stream")]
async fn stream(
    rt: web::Data<TwinRuntime>,
    caller: Caller,
    req: HttpRequest,
    q: web::Query<StreamQuery>,
) -> Result<HttpResponse> {
    may_read(&rt, &caller, q.device_type.as_deref())?;
    let q = q.into_inner();
    let last = req
        .headers()
        .get("last-event-id")
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.trim().parse::<u64>().ok())
        .or(q.after);
    let rt: TwinRuntime = rt.get_ref().clone();
    let book = rt.alert_book();
    // Subscribed before the log is read: nothing falls between the two.
    let rx = book.subscribe();
    let now = book.revision();
    let mut follow = Follow { rt: rt.clone(), rx, cursor: last.unwrap_or(now).min(now), queued: VecDeque::new(), q };
    let note = if last.is_some() { follow.catch_up(rt.alert_book()) } else { None };
    let head = web::Bytes::from(format!("retry: 2000\n: revision {now}\n\n"));
    let first = futures::stream::iter([Some(head), note].into_iter().flatten().map(Ok::<_, std::convert::Infallible>));
    let rest = futures::stream::unfold(follow, |mut f| async move { f.next().await.map(|b| (Ok(b), f)) });
    use futures::StreamExt;
    Ok(HttpResponse::Ok()
        .insert_header(("content-type", "text/event-stream"))
        .insert_header(("cache-control", "no-cache"))
        .streaming(first.chain(rest)))
}

/// A page of alerts, newest first.
#[derive(Debug, serde::Serialize, utoipa::ToSchema)]
struct AlertPage {
    alerts: Vec<RuleAlert>,
    /// Pass as `before` for the next page.
    #[serde(skip_serializing_if = "Option::is_none")]
    next: Option<u64>,
}

/// `GET /alerts`: the rules' alerts, newest first, filtered by `state` (`raised`,
/// `acknowledged`, `cleared`, `open`), `severity` (at least), `twin`, `device_type`,
/// `rule`; paged with `before` and `limit`. Needs `read` on the fleet, or on the device
/// type named by `device_type`.
#[utoipa::path(tag = "monitoring", params(AlertQuery), responses((status = 200, body = AlertPage), Errors), security(("bearer" = [])))]
#[get("/alerts")]
async fn list(rt: web::Data<TwinRuntime>, caller: Caller, q: web::Query<AlertQuery>) -> Result<HttpResponse> {
    may_read(&rt, &caller, q.device_type.as_deref())?;
    let rt2 = rt.clone();
    let (alerts, next) = web::block(move || rt2.alert_book().list(&q))
        .await
        .map_err(|e| twinfleet_actors::TwinError::Invalid(format!("the alert query did not run: {e}")))??;
    Ok(HttpResponse::Ok().json(AlertPage { alerts, next }))
}

/// Reading alerts needs `read` on the fleet, or on the device type a query names.
fn may_read(rt: &TwinRuntime, caller: &Caller, device_type: Option<&str>) -> Result<()> {
    match device_type {
        Some(ty) => rt.authorize_type(
            &caller.0,
            Action::Read,
            &DeviceTypeId::new(ty).map_err(twinfleet_actors::TwinError::from)?,
        )?,
        None => rt.authorize(&caller.0, Action::Read)?,
    }
    Ok(())
}

fn one(rt: &TwinRuntime, caller: &Caller, id: u64, action: Action) -> Result<RuleAlert> {
    let alert = rt
        .alert_book()
        .get(id)?
        .ok_or_else(|| twinfleet_actors::TwinError::Unknown { kind: "alert", id: id.to_string() })?;
    rt.authorize_type(
        &caller.0,
        action,
        &DeviceTypeId::new(&alert.device_type).map_err(twinfleet_actors::TwinError::from)?,
    )?;
    Ok(alert)
}

/// `GET /alerts/{id}`: one alert with its context (memberships, location, the values
/// that triggered it, the twin's recent events). Needs `read` on its device type.
#[utoipa::path(tag = "monitoring", responses((status = 200, body = RuleAlert), Errors), security(("bearer" = [])))]
#[get("/alerts/{id}")]
async fn show(rt: web::Data<TwinRuntime>, caller: Caller, id: web::Path<u64>) -> Result<HttpResponse> {
    Ok(HttpResponse::Ok().json(one(&rt, &caller, *id, Action::Read)?))
}

/// `POST /alerts/{id}/acknowledge`: an operator has seen it (kept until it clears).
/// Needs `write` on its device type; a cleared alert answers 409.
#[utoipa::path(tag = "monitoring", responses((status = 200, body = RuleAlert), Errors), security(("bearer" = [])))]
#[post("/alerts/{id}/acknowledge")]
async fn acknowledge(rt: web::Data<TwinRuntime>, caller: Caller, id: web::Path<u64>) -> Result<HttpResponse> {
    one(&rt, &caller, *id, Action::Write)?;
    let now = rt.clock().now();
    Ok(HttpResponse::Ok().json(rt.alert_book().acknowledge(*id, &caller.0.user, now).await?))
}
