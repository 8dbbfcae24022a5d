//! Twins: list, create, read, change, archive, delete; telemetry; model-generated
//! component endpoints; device tokens.

use super::{Caller, Errors, HttpError, Result};
use actix_web::{HttpRequest, HttpResponse, delete, get, http::StatusCode, patch, post, put, web};
use serde::{Deserialize, Serialize};
use serde_json::{Map, Value};
use std::sync::Arc;
use twinfleet_actors::{TelemetryQuery, TwinError, TwinFilter, TwinHandle, TwinPage, TwinRuntime, TwinSpec, TwinView};
use twinfleet_models::{
    Action, DeviceTypeId, DomainModel, DtaId, Edit, Metadata, ModelError, PathError, Timestamp, TwinCommand, TwinEvent,
    TwinId,
};

/// Most events a twin view returns.
const MAX_EVENTS: usize = 1_000;

pub(super) fn routes(cfg: &mut utoipa_actix_web::service_config::ServiceConfig) {
    cfg.service(list_twins)
        .service(twin_views)
        .service(create_twin)
        .service(show_twin)
        .service(delete_twin)
        .service(set_desired)
        .service(twin_delta)
        .service(set_overrides)
        .service(set_metadata)
        .service(archive_twin)
        .service(twin_events)
        .service(issue_token)
        .service(revoke_token)
        .service(twin_telemetry)
        .service(twin_logs)
        .service(get_components)
        .service(get_component)
        .service(put_components)
        .service(put_component)
        .service(post_component)
        .service(delete_component);
}

/// The twin `id`, if the caller may take `action` on it.
pub(super) fn twin_for(rt: &TwinRuntime, caller: &Caller, id: &str, action: Action) -> Result<TwinHandle> {
    let h = rt.twin(id)?;
    rt.authorize_twin(&caller.0, action, &h)?;
    Ok(h)
}

/// `GET /twins?device_type=&group=&state=&status=&tag=&after=&limit=`
#[utoipa::path(tag = "twins", params(TwinFilter), responses((status = 200, body = TwinPage), Errors), security(("bearer" = [])))]
#[get("/twins")]
async fn list_twins(rt: web::Data<TwinRuntime>, caller: Caller, q: web::Query<TwinFilter>) -> Result<HttpResponse> {
    Ok(HttpResponse::Ok().json(rt.list_twins(&caller.0, &q)?))
}

/// Most twins one `GET /twin-views` asks for (the ids travel in the URL).
const MAX_VIEWS: usize = 1_000;

#[derive(Debug, Deserialize, utoipa::IntoParams)]
#[into_params(parameter_in = Query)]
#[serde(deny_unknown_fields)]
struct ViewsQuery {
    /// Twin ids, comma-separated: at most 1,000, and the whole URL under 64 KiB (HTTP
    /// URIs longer than that are refused before any handler: 1,000 ids of up to ~60
    /// characters; longer ids, fewer per call).
    ids: String,
}

/// One twin of a `GET /twin-views` answer: its view, or why not.
#[derive(Debug, Serialize, utoipa::ToSchema)]
struct ViewItem {
    id: String,
    /// As `GET /twins/{id}` shows it (without the actor and the journal events).
    #[serde(skip_serializing_if = "Option::is_none")]
    #[schema(value_type = Option<Object>)]
    view: Option<TwinView>,
    /// The error code `GET /twins/{id}` would answer with (`not_found`, `forbidden`, ...).
    #[serde(skip_serializing_if = "Option::is_none")]
    error: Option<&'static str>,
    #[serde(skip_serializing_if = "Option::is_none")]
    message: Option<String>,
}

#[derive(Debug, Serialize, utoipa::ToSchema)]
struct ViewsPage {
    /// One item per id asked, in the order asked.
    twins: Vec<ViewItem>,
}

/// `GET /twin-views?ids=a,b,c`: the current views of up to 1,000 twins in one call, each
/// answered by its twin (batched per arbiter, not one round trip per twin). A twin that
/// is unknown, or that the caller may not read, gets its error in its place; the call
/// itself fails only on a malformed request.
#[utoipa::path(tag = "twins", params(ViewsQuery), responses((status = 200, body = ViewsPage), Errors), security(("bearer" = [])))]
#[get("/twin-views")]
async fn twin_views(rt: web::Data<TwinRuntime>, caller: Caller, q: web::Query<ViewsQuery>) -> Result<HttpResponse> {
    let ids: Vec<&str> = q.ids.split(',').map(str::trim).filter(|id| !id.is_empty()).collect();
    if ids.is_empty() || ids.len() > MAX_VIEWS {
        return Err(TwinError::Invalid(format!(
            "ids: give 1 to {MAX_VIEWS} twin ids, comma-separated (got {})",
            ids.len()
        ))
        .into());
    }
    let allowed: Vec<std::result::Result<&str, TwinError>> =
        ids.iter().map(|id| twin_for(&rt, &caller, id, Action::Read).map(|_| *id).map_err(|e| e.0)).collect();
    let asked: Vec<&str> = allowed.iter().filter_map(|a| a.as_ref().ok().copied()).collect();
    let mut views = rt.get_many(&asked).await.into_iter();
    let item = |id: &str, r: std::result::Result<TwinView, TwinError>| match r {
        Ok(view) => ViewItem { id: id.to_string(), view: Some(view), error: None, message: None },
        Err(e) => ViewItem {
            id: id.to_string(),
            view: None,
            error: Some(crate::error::classify(&e).code),
            message: Some(e.to_string()),
        },
    };
    let twins = ids
        .iter()
        .zip(allowed)
        .map(|(id, allowed)| match allowed {
            Ok(_) => item(id, views.next().unwrap_or_else(|| Err(TwinError::NotFound(id.to_string())))),
            Err(e) => item(id, Err(e)),
        })
        .collect();
    Ok(HttpResponse::Ok().json(ViewsPage { twins }))
}

/// A twin to create.
#[derive(Debug, Deserialize, utoipa::ToSchema)]
#[serde(deny_unknown_fields)]
struct CreateTwin {
    id: TwinId,
    device_type: DeviceTypeId,
    #[serde(default)]
    serial: String,
    #[serde(default)]
    mac: String,
    #[serde(default)]
    metadata: Metadata,
    #[serde(default)]
    dtas: Vec<DtaId>,
}

/// `POST /twins`: creates one twin (201 with its view). Thousands: `POST /jobs`.
#[utoipa::path(tag = "twins", responses((status = 201, body = serde_json::Value), Errors), security(("bearer" = [])))]
#[post("/twins")]
async fn create_twin(rt: web::Data<TwinRuntime>, caller: Caller, body: web::Json<CreateTwin>) -> Result<HttpResponse> {
    let b = body.into_inner();
    let ty = rt.device_type(b.device_type.as_str())?;
    rt.authorize_type(&caller.0, Action::Provision, ty.id())?;
    for d in &b.dtas {
        rt.dta(d.as_str())?;
        rt.authorize_dta(&caller.0, Action::Configure, d)?;
    }
    let spec = TwinSpec { id: b.id, serial: b.serial, mac: b.mac, metadata: b.metadata, dtas: b.dtas };
    let h = rt.create_twin(ty.id(), spec).await?;
    Ok(HttpResponse::Created().json(h.get().await?))
}

#[derive(Debug, Deserialize, utoipa::IntoParams)]
#[into_params(parameter_in = Query)]
#[serde(deny_unknown_fields)]
struct ShowQuery {
    /// Journal events to include, newest last (default 20, at most 1,000).
    events: Option<usize>,
}

#[derive(Debug, Serialize)]
struct TwinDetail {
    #[serde(flatten)]
    view: TwinView,
    actor: twinfleet_runtime::ActorView,
    last_events: Vec<TwinEvent>,
}

/// `GET /twins/{id}`: identity, metadata, reported/desired state, effective
/// configuration, actor, last events.
#[utoipa::path(tag = "twins", params(ShowQuery), responses((status = 200, body = serde_json::Value), Errors), security(("bearer" = [])))]
#[get("/twins/{id}")]
async fn show_twin(
    rt: web::Data<TwinRuntime>,
    caller: Caller,
    id: web::Path<String>,
    q: web::Query<ShowQuery>,
) -> Result<HttpResponse> {
    let h = twin_for(&rt, &caller, &id, Action::Read)?;
    let view = h.get().await?;
    let last_events = h.events(q.events.unwrap_or(20).min(MAX_EVENTS)).await?;
    let etag = etag(view.state.last_seq);
    Ok(HttpResponse::Ok().insert_header(etag).json(TwinDetail { view, actor: h.actor(), last_events }))
}

#[derive(Debug, Deserialize, utoipa::IntoParams)]
#[into_params(parameter_in = Query)]
#[serde(deny_unknown_fields)]
struct EventsQuery {
    limit: Option<usize>,
}

/// `GET /twins/{id}/events?limit=`: the newest journal events, oldest first.
#[utoipa::path(tag = "twins", params(EventsQuery), responses((status = 200, body = Vec<serde_json::Value>), Errors), security(("bearer" = [])))]
#[get("/twins/{id}/events")]
async fn twin_events(
    rt: web::Data<TwinRuntime>,
    caller: Caller,
    id: web::Path<String>,
    q: web::Query<EventsQuery>,
) -> Result<HttpResponse> {
    let h = twin_for(&rt, &caller, &id, Action::Read)?;
    Ok(HttpResponse::Ok().json(h.events(q.limit.unwrap_or(100).min(MAX_EVENTS)).await?))
}

/// The answer to a change: the journal position it was stored at.
#[derive(Debug, Serialize, utoipa::ToSchema)]
pub(super) struct Changed {
    twin: TwinId,
    seq: u64,
}

fn changed(h: &TwinHandle, seq: u64) -> HttpResponse {
    HttpResponse::Ok().json(Changed { twin: h.id().clone(), seq })
}

/// The answer to a component write.
#[derive(Debug, Serialize, utoipa::ToSchema)]
pub(super) struct ComponentChanged {
    twin: TwinId,
    path: String,
    seq: u64,
}

/// A device token, shown once.
#[derive(Debug, Serialize, utoipa::ToSchema)]
pub(super) struct IssuedToken {
    twin: TwinId,
    token: String,
}

/// A twin's version as an `ETag` (its journal's last sequence number).
fn etag(version: u64) -> (&'static str, String) {
    ("etag", format!("\"{version}\""))
}

/// The version an `If-Match` header asks for: `"12"` (or `W/"12"`, or bare `12`) is
/// version 12; `*` or no header, any.
fn if_match(req: &HttpRequest) -> Result<Option<u64>> {
    let Some(v) = req.headers().get("if-match") else { return Ok(None) };
    let text = v.to_str().unwrap_or_default().trim();
    if text == "*" {
        return Ok(None);
    }
    let bare = text.strip_prefix("W/").unwrap_or(text).trim_matches('"');
    bare.parse().map(Some).map_err(|_| {
        HttpError(TwinError::Invalid(format!(
            "If-Match {text:?}: expected a twin version as its ETag gives it, e.g. \"12\""
        )))
    })
}

#[derive(Debug, Deserialize, utoipa::IntoParams)]
#[into_params(parameter_in = Query)]
#[serde(deny_unknown_fields)]
struct DesiredQuery {
    /// Remove the written keys from the desired state once the device reports them
    /// (a one-shot request such as a reboot).
    clear_on_sync: Option<bool>,
}

/// `PATCH /twins/{id}/desired`: a JSON merge patch (RFC 7396) of the desired state. The
/// device gets only the delta (what it does not report yet). With `If-Match: "<version>"`
/// (the twin's `ETag`) the write applies only at that version, else 412
/// `version_mismatch`.
#[utoipa::path(tag = "twins", params(DesiredQuery), responses((status = 200, body = Changed), (status = 412, description = "the twin is at another version than If-Match names"), Errors), security(("bearer" = [])))]
#[patch("/twins/{id}/desired")]
async fn set_desired(
    rt: web::Data<TwinRuntime>,
    caller: Caller,
    req: HttpRequest,
    id: web::Path<String>,
    q: web::Query<DesiredQuery>,
    body: web::Json<Map<String, Value>>,
) -> Result<HttpResponse> {
    let h = twin_for(&rt, &caller, &id, Action::Write)?;
    let cmd = TwinCommand::WriteDesired {
        patch: body.into_inner(),
        if_version: if_match(&req)?,
        clear_on_sync: q.clear_on_sync.unwrap_or(false),
    };
    let seq = caller.command(&h, cmd, StatusCode::OK).await?;
    Ok(HttpResponse::Ok().insert_header(etag(seq)).json(Changed { twin: h.id().clone(), seq }))
}

/// A twin's desired state against its reported state.
#[derive(Debug, Serialize, utoipa::ToSchema)]
pub(super) struct DeltaView {
    twin: TwinId,
    /// The twin's version (its `ETag`), for a conditional write.
    version: u64,
    in_sync: bool,
    /// What the device does not report yet (what a sync sends).
    #[schema(value_type = Object)]
    delta: Map<String, Value>,
    /// Each top-level desired key: `in_sync`, `pending` (attempt, deadline) or `failed`
    /// (the device's reason).
    keys: std::collections::BTreeMap<String, twinfleet_models::desired::KeyStatus>,
}

/// `GET /twins/{id}/delta`: the delta of the desired state against the reported state,
/// and where each desired key stands.
#[utoipa::path(tag = "twins", responses((status = 200, body = DeltaView), Errors), security(("bearer" = [])))]
#[get("/twins/{id}/delta")]
async fn twin_delta(rt: web::Data<TwinRuntime>, caller: Caller, id: web::Path<String>) -> Result<HttpResponse> {
    let h = twin_for(&rt, &caller, &id, Action::Read)?;
    let view = h.get().await?;
    let s = &view.state;
    let body = DeltaView {
        twin: h.id().clone(),
        version: s.last_seq,
        in_sync: s.in_sync(),
        delta: s.delta(),
        keys: s.desired_status(),
    };
    Ok(HttpResponse::Ok().insert_header(etag(s.last_seq)).json(body))
}

/// `PATCH /twins/{id}/overrides`: a JSON merge patch of the twin's own configuration
/// overrides, the top layer of its effective configuration, and of its monitoring
/// rules (`rules`, checked: a malformed rule answers 400 naming it). Needs `manage`.
#[utoipa::path(tag = "twins", responses((status = 200, body = Changed), Errors), security(("bearer" = [])))]
#[patch("/twins/{id}/overrides")]
async fn set_overrides(
    rt: web::Data<TwinRuntime>,
    caller: Caller,
    id: web::Path<String>,
    body: web::Json<Map<String, Value>>,
) -> Result<HttpResponse> {
    let h = twin_for(&rt, &caller, &id, Action::Manage)?;
    let seq = caller.command(&h, TwinCommand::SetOverrides(body.into_inner()), StatusCode::OK).await?;
    Ok(changed(&h, seq))
}

/// `PUT /twins/{id}/metadata`: replaces location, tags and attributes.
#[utoipa::path(tag = "twins", responses((status = 200, body = Changed), Errors), security(("bearer" = [])))]
#[put("/twins/{id}/metadata")]
async fn set_metadata(
    rt: web::Data<TwinRuntime>,
    caller: Caller,
    id: web::Path<String>,
    body: web::Json<Metadata>,
) -> Result<HttpResponse> {
    let h = twin_for(&rt, &caller, &id, Action::Manage)?;
    let seq = caller.command(&h, TwinCommand::UpdateMetadata(body.into_inner()), StatusCode::OK).await?;
    Ok(changed(&h, seq))
}

/// `POST /twins/{id}/archive`: the twin keeps its history and answers reads; writes and
/// device input are refused (409).
#[utoipa::path(tag = "twins", responses((status = 200, body = Changed), Errors), security(("bearer" = [])))]
#[post("/twins/{id}/archive")]
async fn archive_twin(rt: web::Data<TwinRuntime>, caller: Caller, id: web::Path<String>) -> Result<HttpResponse> {
    let h = twin_for(&rt, &caller, &id, Action::Manage)?;
    let seq = caller.command(&h, TwinCommand::Archive, StatusCode::OK).await?;
    Ok(changed(&h, seq))
}

/// `DELETE /twins/{id}`: the twin and everything stored about it (204).
#[utoipa::path(tag = "twins", responses((status = 204), Errors), security(("bearer" = [])))]
#[delete("/twins/{id}")]
async fn delete_twin(rt: web::Data<TwinRuntime>, caller: Caller, id: web::Path<String>) -> Result<HttpResponse> {
    let h = twin_for(&rt, &caller, &id, Action::Provision)?;
    rt.delete_twin(h.id().as_str()).await?;
    Ok(HttpResponse::NoContent().finish())
}

/// `POST /twins/{id}/token`: a new device token (replacing any earlier one), shown once.
#[utoipa::path(tag = "twins", responses((status = 201, body = IssuedToken), Errors), security(("bearer" = [])))]
#[post("/twins/{id}/token")]
async fn issue_token(rt: web::Data<TwinRuntime>, caller: Caller, id: web::Path<String>) -> Result<HttpResponse> {
    let h = twin_for(&rt, &caller, &id, Action::Manage)?;
    let token = rt.issue_device_token(h.id().as_str()).await?;
    Ok(HttpResponse::Created().json(IssuedToken { twin: h.id().clone(), token }))
}

/// `DELETE /twins/{id}/token`: the device can no longer connect (204).
#[utoipa::path(tag = "twins", responses((status = 204), Errors), security(("bearer" = [])))]
#[delete("/twins/{id}/token")]
async fn revoke_token(rt: web::Data<TwinRuntime>, caller: Caller, id: web::Path<String>) -> Result<HttpResponse> {
    let h = twin_for(&rt, &caller, &id, Action::Manage)?;
    rt.revoke_device_token(h.id().as_str()).await?;
    Ok(HttpResponse::NoContent().finish())
}

#[derive(Debug, Deserialize, utoipa::IntoParams)]
#[into_params(parameter_in = Query)]
#[serde(deny_unknown_fields)]
struct TelemetryParams {
    /// A metric name, or several separated by commas; default: every metric of the twin.
    metric: Option<String>,
    /// Milliseconds since the epoch; default: 24 hours before `to`.
    from: Option<i64>,
    /// Milliseconds since the epoch; default: now. A page's `next` is the `to` of the
    /// page after it.
    to: Option<i64>,
    /// Default 1,000, at most 10,000 (a page ends on a whole millisecond, so it may
    /// hold a few more points).
    limit: Option<usize>,
    /// A bucket width in milliseconds: answer each metric downsampled into buckets
    /// aligned on multiples of it (min, max, avg, last, count), oldest first, instead of
    /// raw points; at most 10,000 buckets per metric.
    bucket: Option<i64>,
}

/// The range a telemetry query without `from` covers.
const DEFAULT_TELEMETRY_RANGE_MS: i64 = 24 * 3_600_000;
/// The largest page.
const MAX_TELEMETRY_PAGE: usize = 10_000;

/// A history query's range: `to` defaults to now, `from` to 24 hours before `to`.
fn history_range(rt: &TwinRuntime, from: Option<i64>, to: Option<i64>) -> Result<(i64, i64)> {
    let to = to.unwrap_or_else(|| rt.now().0);
    let from = from.unwrap_or_else(|| to.saturating_sub(DEFAULT_TELEMETRY_RANGE_MS));
    if from > to {
        return Err(TwinError::Invalid(format!("from ({from}) is after to ({to})")).into());
    }
    Ok((from, to))
}

/// A page of stored points, newest first.
#[derive(Debug, Serialize, utoipa::ToSchema)]
struct TelemetryAnswer {
    twin: TwinId,
    points: Vec<twinfleet_models::MetricPoint>,
    /// The `to` of the next page, when there may be more.
    #[serde(skip_serializing_if = "Option::is_none")]
    next: Option<Timestamp>,
}

/// Downsampled metrics.
#[derive(Debug, Serialize, utoipa::ToSchema)]
struct TelemetryBuckets {
    twin: TwinId,
    bucket_ms: i64,
    from: Timestamp,
    to: Timestamp,
    series: Vec<twinfleet_actors::MetricBuckets>,
}

/// Raw points or buckets.
#[derive(Debug, Serialize, utoipa::ToSchema)]
#[serde(untagged)]
enum TelemetryResponse {
    Points(TelemetryAnswer),
    Buckets(TelemetryBuckets),
}

/// `GET /twins/{id}/telemetry?metric=&from=&to=&limit=&bucket=`: a page of stored points,
/// newest first (by default the last 24 hours), `next` continuing it; or, with `bucket`,
/// each metric downsampled. Read from storage, not through the twin.
#[utoipa::path(tag = "twins", params(TelemetryParams), responses((status = 200, body = TelemetryResponse), Errors), security(("bearer" = [])))]
#[get("/twins/{id}/telemetry")]
async fn twin_telemetry(
    rt: web::Data<TwinRuntime>,
    caller: Caller,
    id: web::Path<String>,
    q: web::Query<TelemetryParams>,
) -> Result<HttpResponse> {
    let h = twin_for(&rt, &caller, &id, Action::Read)?;
    let q = q.into_inner();
    let (from, to) = history_range(&rt, q.from, q.to)?;
    let query = TelemetryQuery {
        metric: q.metric,
        from: Timestamp(from),
        to: Timestamp(to),
        limit: q.limit.unwrap_or(1_000).clamp(1, MAX_TELEMETRY_PAGE),
    };
    if let Some(width) = q.bucket {
        let series = h.telemetry_buckets(query, width).await?;
        let answer = TelemetryBuckets {
            twin: h.id().clone(),
            bucket_ms: width,
            from: Timestamp(from),
            to: Timestamp(to),
            series,
        };
        return Ok(HttpResponse::Ok().json(TelemetryResponse::Buckets(answer)));
    }
    let page = h.telemetry_page(query).await?;
    let answer = TelemetryAnswer { twin: h.id().clone(), points: page.points, next: page.next };
    Ok(HttpResponse::Ok().json(TelemetryResponse::Points(answer)))
}

#[derive(Debug, Deserialize, utoipa::IntoParams)]
#[into_params(parameter_in = Query)]
#[serde(deny_unknown_fields)]
struct LogParams {
    /// Only this app's lines; default: every app.
    app: Option<String>,
    /// Only lines at least this severe (`debug`, `info`, `warning`, `error`).
    level: Option<String>,
    /// Milliseconds since the epoch; default: 24 hours before `to`.
    from: Option<i64>,
    /// Milliseconds since the epoch; default: now.
    to: Option<i64>,
    /// Default 1,000, at most 10,000.
    limit: Option<usize>,
    /// A page's `next`: the page after it (older lines).
    cursor: Option<String>,
}

/// A page of app log lines, newest first.
#[derive(Debug, Serialize, utoipa::ToSchema)]
struct LogAnswer {
    twin: TwinId,
    lines: Vec<twinfleet_models::LogLine>,
    /// Pass as `cursor` for the next page, when there may be more.
    #[serde(skip_serializing_if = "Option::is_none")]
    next: Option<String>,
}

/// `GET /twins/{id}/logs?app=&level=&from=&to=&limit=&cursor=`: a page of the twin's app
/// log lines, newest first (by default the last 24 hours). Read from storage, not
/// through the twin.
#[utoipa::path(tag = "twins", params(LogParams), responses((status = 200, body = LogAnswer), Errors), security(("bearer" = [])))]
#[get("/twins/{id}/logs")]
async fn twin_logs(
    rt: web::Data<TwinRuntime>,
    caller: Caller,
    id: web::Path<String>,
    q: web::Query<LogParams>,
) -> Result<HttpResponse> {
    let h = twin_for(&rt, &caller, &id, Action::Read)?;
    let q = q.into_inner();
    let (from, to) = history_range(&rt, q.from, q.to)?;
    let level = match q.level.as_deref() {
        None => None,
        Some(l) => Some(l.parse::<twinfleet_models::LogLevel>().map_err(|e| TwinError::Invalid(e.to_string()))?),
    };
    let query = twinfleet_actors::LogQuery {
        app: q.app,
        level,
        from: Timestamp(from),
        to: Timestamp(to),
        limit: q.limit.unwrap_or(1_000).clamp(1, MAX_TELEMETRY_PAGE),
        cursor: q.cursor,
    };
    let page = h.logs_page(query).await?;
    Ok(HttpResponse::Ok().json(LogAnswer { twin: h.id().clone(), lines: page.lines, next: page.next }))
}

/// The twin's handle and its type's domain model (404 when the type has none).
fn with_domain(rt: &TwinRuntime, caller: &Caller, id: &str, action: Action) -> Result<(TwinHandle, Arc<DomainModel>)> {
    let h = twin_for(rt, caller, id, action)?;
    let domain = rt.device_type(h.device_type().as_str())?.domain().ok_or_else(|| {
        TwinError::Rejected(ModelError::Component(PathError::NotFound(format!(
            "components: device type {} has no domain model",
            h.device_type()
        ))))
    })?;
    Ok((h, domain))
}

/// `GET /twins/{id}/components[/{path}]`: the twin's components (its desired
/// `components` document) at `path`.
#[utoipa::path(tag = "twins", responses((status = 200, body = serde_json::Value), Errors), security(("bearer" = [])))]
#[get("/twins/{id}/components/{path:.*}")]
async fn get_component(
    rt: web::Data<TwinRuntime>,
    caller: Caller,
    p: web::Path<(String, String)>,
) -> Result<HttpResponse> {
    read_component(&rt, &caller, p.into_inner()).await
}

async fn read_component(rt: &TwinRuntime, caller: &Caller, (id, path): (String, String)) -> Result<HttpResponse> {
    let (h, _) = with_domain(rt, caller, &id, Action::Read)?;
    let view = h.get().await?;
    let doc = view.state.desired.get("components").cloned().unwrap_or_else(|| Value::Object(Default::default()));
    let v = twinfleet_models::domain::get_path(&doc, &path).map_err(|e| TwinError::Rejected(e.into()))?;
    Ok(HttpResponse::Ok().json(v))
}

#[utoipa::path(tag = "twins", responses((status = 200, body = serde_json::Value), Errors), security(("bearer" = [])))]
#[get("/twins/{id}/components")]
async fn get_components(rt: web::Data<TwinRuntime>, caller: Caller, id: web::Path<String>) -> Result<HttpResponse> {
    read_component(&rt, &caller, (id.into_inner(), String::new())).await
}

async fn edit_component(
    rt: &TwinRuntime,
    caller: &Caller,
    (id, path): (String, String),
    edit: Edit,
    created: bool,
) -> Result<HttpResponse> {
    let (h, _) = with_domain(rt, caller, &id, Action::Write)?;
    let status = if created { StatusCode::CREATED } else { StatusCode::OK };
    let seq = caller.command(&h, TwinCommand::EditComponents { path: path.clone(), edit }, status).await?;
    Ok(HttpResponse::build(status).json(ComponentChanged { twin: h.id().clone(), path, seq }))
}

/// `PUT /twins/{id}/components`: replace the whole components document (the first write
/// of a model with required attributes must be whole).
#[utoipa::path(tag = "twins", responses((status = 200, body = ComponentChanged), Errors), security(("bearer" = [])))]
#[put("/twins/{id}/components")]
async fn put_components(
    rt: web::Data<TwinRuntime>,
    caller: Caller,
    id: web::Path<String>,
    body: web::Json<Value>,
) -> Result<HttpResponse> {
    edit_component(&rt, &caller, (id.into_inner(), String::new()), Edit::Put(body.into_inner()), false).await
}

/// `PUT`: replace (or create) the component or property at `path`.
#[utoipa::path(tag = "twins", responses((status = 200, body = ComponentChanged), Errors), security(("bearer" = [])))]
#[put("/twins/{id}/components/{path:.*}")]
async fn put_component(
    rt: web::Data<TwinRuntime>,
    caller: Caller,
    p: web::Path<(String, String)>,
    body: web::Json<Value>,
) -> Result<HttpResponse> {
    edit_component(&rt, &caller, p.into_inner(), Edit::Put(body.into_inner()), false).await
}

/// `POST`: append an element to the list at `path` (e.g. a medication plan).
#[utoipa::path(tag = "twins", responses((status = 201, body = ComponentChanged), Errors), security(("bearer" = [])))]
#[post("/twins/{id}/components/{path:.*}")]
async fn post_component(
    rt: web::Data<TwinRuntime>,
    caller: Caller,
    p: web::Path<(String, String)>,
    body: web::Json<Value>,
) -> Result<HttpResponse> {
    edit_component(&rt, &caller, p.into_inner(), Edit::Append(body.into_inner()), true).await
}

/// `DELETE`: remove the component or list element at `path`.
#[utoipa::path(tag = "twins", responses((status = 200, body = ComponentChanged), Errors), security(("bearer" = [])))]
#[delete("/twins/{id}/components/{path:.*}")]
async fn delete_component(
    rt: web::Data<TwinRuntime>,
    caller: Caller,
    p: web::Path<(String, String)>,
) -> Result<HttpResponse> {
    edit_component(&rt, &caller, p.into_inner(), Edit::Delete, false).await
}

impl From<twinfleet_models::Denied> for HttpError {
    fn from(d: twinfleet_models::Denied) -> Self {
        HttpError(TwinError::Forbidden(d))
    }
}
