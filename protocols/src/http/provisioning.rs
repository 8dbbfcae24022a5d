//! Provisioning: the processes that wait for a human, one process with its step log,
//! and an operator's approval or rejection.

use super::{Caller, Errors, Result};
use actix_web::{HttpResponse, get, post, web};
use serde::Deserialize;
use twinfleet_actors::{ClaimView, TwinRuntime};
use twinfleet_models::Action;

pub(super) fn routes(cfg: &mut utoipa_actix_web::service_config::ServiceConfig) {
    cfg.service(pending).service(show).service(approve).service(reject).service(decommission);
}

/// `GET /provisioning/pending`: the devices that wait for an operator, oldest serial
/// first per type. Needs `configure` on the fleet.
#[utoipa::path(tag = "provisioning", responses((status = 200, body = Vec<ClaimView>), Errors), security(("bearer" = [])))]
#[get("/provisioning/pending")]
async fn pending(rt: web::Data<TwinRuntime>, caller: Caller) -> Result<HttpResponse> {
    rt.authorize(&caller.0, Action::Configure)?;
    Ok(HttpResponse::Ok().json(rt.pending_claims()))
}

/// `GET /provisioning/{type}/{serial}`: one device's process and its step-by-step log.
#[utoipa::path(tag = "provisioning", responses((status = 200, body = ClaimView), Errors), security(("bearer" = [])))]
#[get("/provisioning/{device_type}/{serial}")]
async fn show(rt: web::Data<TwinRuntime>, caller: Caller, path: web::Path<(String, String)>) -> Result<HttpResponse> {
    let (ty, serial) = path.into_inner();
    let h = rt.device_type(&ty)?;
    rt.authorize_type(&caller.0, Action::Read, h.id())?;
    Ok(HttpResponse::Ok().json(rt.claim_view(&ty, &serial)?))
}

#[derive(Debug, Default, Deserialize, utoipa::ToSchema)]
#[serde(deny_unknown_fields)]
struct Decision {
    /// Why (kept in the step log).
    #[serde(default)]
    reason: String,
}

/// `POST /provisioning/{type}/{serial}/approve`: the device goes on with its process.
#[utoipa::path(tag = "provisioning", responses((status = 200, body = ClaimView), Errors), security(("bearer" = [])))]
#[post("/provisioning/{device_type}/{serial}/approve")]
async fn approve(
    rt: web::Data<TwinRuntime>,
    caller: Caller,
    path: web::Path<(String, String)>,
) -> Result<HttpResponse> {
    let (ty, serial) = path.into_inner();
    let h = rt.device_type(&ty)?;
    rt.authorize_type(&caller.0, Action::Configure, h.id())?;
    Ok(HttpResponse::Ok().json(rt.approve_claim(&ty, &serial, &caller.0.user).await?))
}

/// `POST /provisioning/{type}/{serial}/reject` (body: `{"reason": "..."}`, optional).
#[utoipa::path(tag = "provisioning", request_body = Decision, responses((status = 200, body = ClaimView), Errors), security(("bearer" = [])))]
#[post("/provisioning/{device_type}/{serial}/reject")]
async fn reject(
    rt: web::Data<TwinRuntime>,
    caller: Caller,
    path: web::Path<(String, String)>,
    body: Option<web::Json<Decision>>,
) -> Result<HttpResponse> {
    let (ty, serial) = path.into_inner();
    let h = rt.device_type(&ty)?;
    rt.authorize_type(&caller.0, Action::Configure, h.id())?;
    let reason = body.map(|b| b.into_inner().reason).filter(|r| !r.is_empty()).unwrap_or_else(|| "rejected".into());
    Ok(HttpResponse::Ok().json(rt.reject_claim(&ty, &serial, &caller.0.user, &reason).await?))
}

/// `POST /twins/{id}/decommission`: the device's token is revoked and its twin archived:
/// it is refused on every gateway and its open sessions end at once; the twin and its
/// history stay readable. Needs `provision` on the twin.
#[utoipa::path(tag = "provisioning", responses((status = 200, body = serde_json::Value), Errors), security(("bearer" = [])))]
#[post("/twins/{id}/decommission")]
async fn decommission(rt: web::Data<TwinRuntime>, caller: Caller, id: web::Path<String>) -> Result<HttpResponse> {
    let h = super::twins::twin_for(&rt, &caller, &id, Action::Provision)?;
    let seq = rt.decommission(h.id().as_str()).await?;
    Ok(HttpResponse::Ok().json(serde_json::json!({"id": h.id(), "seq": seq, "lifecycle": "archived"})))
}
