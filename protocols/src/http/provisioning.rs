//! Provisioning: the processes that wait for a human, one process with its step log,
//! and an operator's approval or rejection.

use super::{Caller, Errors, Result};
use actix_web::{HttpResponse, get, post, web};
use serde::Deserialize;
use twinfleet_actors::{ClaimView, TwinRuntime};
use twinfleet_models::Action;

pub(super) fn routes(cfg: &mut utoipa_actix_web::service_config::ServiceConfig) {
    cfg.service(pending)
        .service(show)
        .service(approve)
        .service(reject)
        .service(approve_many)
        .service(register)
        .service(decommission);
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

#[derive(Debug, Deserialize, utoipa::ToSchema)]
#[serde(deny_unknown_fields)]
struct Approvals {
    serials: Vec<String>,
}

/// One serial's result in a bulk approval.
#[derive(Debug, serde::Serialize, utoipa::ToSchema)]
struct Approved {
    serial: String,
    #[serde(skip_serializing_if = "Option::is_none")]
    state: Option<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    error: Option<String>,
}

/// `POST /device-types/{id}/approvals` (`{"serials": [...]}`, at most 10,000): approves
/// every listed pending device of the type in one call; each serial's state or error.
#[utoipa::path(tag = "provisioning", request_body = Approvals, responses((status = 200, body = Vec<Approved>), Errors), security(("bearer" = [])))]
#[post("/device-types/{id}/approvals")]
async fn approve_many(
    rt: web::Data<TwinRuntime>,
    caller: Caller,
    id: web::Path<String>,
    body: web::Json<Approvals>,
) -> Result<HttpResponse> {
    let h = rt.device_type(&id)?;
    rt.authorize_type(&caller.0, Action::Configure, h.id())?;
    let serials = body.into_inner().serials;
    if serials.len() > 10_000 {
        return Err(twinfleet_actors::TwinError::Invalid(format!("{} serials; at most 10,000", serials.len())).into());
    }
    let results = rt.approve_claims(h.id().as_str(), &serials, &caller.0.user).await;
    let out: Vec<Approved> = results
        .into_iter()
        .map(|(serial, r)| match r {
            Ok(v) => Approved { serial, state: Some(v.state), error: None },
            Err(e) => Approved { serial, state: None, error: Some(e.to_string()) },
        })
        .collect();
    Ok(HttpResponse::Ok().json(out))
}

#[derive(Debug, Deserialize, utoipa::ToSchema)]
#[serde(deny_unknown_fields)]
struct Registration {
    device_id: String,
    #[serde(default)]
    #[schema(value_type = Option<Object>)]
    identity: Option<twinfleet_models::provisioning::Identity>,
    #[serde(default)]
    #[schema(value_type = Option<Object>)]
    metadata: Option<twinfleet_models::Metadata>,
}

/// `POST /device-types/{id}/devices`: the manual mode. An operator registers a device
/// (`{"device_id", "identity"?, "metadata"?}`); its process runs as approved, and the
/// answer holds its token (shown once) to hand over out of band. The device confirms by
/// connecting with it.
#[utoipa::path(tag = "provisioning", request_body = Registration, responses((status = 201, body = serde_json::Value), (status = 202, body = serde_json::Value), Errors), security(("bearer" = [])))]
#[post("/device-types/{id}/devices")]
async fn register(
    rt: web::Data<TwinRuntime>,
    caller: Caller,
    id: web::Path<String>,
    body: web::Json<Registration>,
) -> Result<HttpResponse> {
    let h = rt.device_type(&id)?;
    rt.authorize_type(&caller.0, Action::Provision, h.id())?;
    let b = body.into_inner();
    let answer = rt
        .register_device(h.id().as_str(), &b.device_id, b.identity, b.metadata.unwrap_or_default(), &caller.0.user)
        .await?;
    Ok(match answer {
        twinfleet_actors::ClaimAnswer::Credentials { device_id, token, state } => {
            HttpResponse::Created().json(serde_json::json!({"device_id": device_id, "token": token, "state": state}))
        }
        twinfleet_actors::ClaimAnswer::Pending { state } => {
            HttpResponse::Accepted().json(serde_json::json!({"device_id": b.device_id, "state": state}))
        }
        twinfleet_actors::ClaimAnswer::Refused { state, reason } => HttpResponse::UnprocessableEntity()
            .json(serde_json::json!({"error": "refused", "message": reason, "state": state})),
    })
}
