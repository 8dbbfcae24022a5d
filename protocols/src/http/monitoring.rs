//! Monitoring: the alerts of the twins' rules (`/alerts`), filtered and paged, one by
//! id, and an operator's acknowledgement.

use super::{Caller, Errors, Result};
use actix_web::{HttpResponse, get, post, web};
use twinfleet_actors::{AlertQuery, TwinRuntime};
use twinfleet_models::{Action, DeviceTypeId, RuleAlert};

pub(super) fn routes(cfg: &mut utoipa_actix_web::service_config::ServiceConfig) {
    cfg.service(list).service(show).service(acknowledge);
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
    match &q.device_type {
        Some(ty) => rt.authorize_type(
            &caller.0,
            Action::Read,
            &DeviceTypeId::new(ty).map_err(twinfleet_actors::TwinError::from)?,
        )?,
        None => rt.authorize(&caller.0, Action::Read)?,
    }
    let rt2 = rt.clone();
    let (alerts, next) = web::block(move || rt2.alert_book().list(&q))
        .await
        .map_err(|e| twinfleet_actors::TwinError::Invalid(format!("the alert query did not run: {e}")))??;
    Ok(HttpResponse::Ok().json(AlertPage { alerts, next }))
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
