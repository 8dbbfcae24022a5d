//! Provisioning: the processes that wait for a human, one process with its step log,
//! an operator's approval or rejection, manual registration, and pre-registered batches
//! (imported as JSON or CSV).

use super::{Caller, Errors, Result};
use actix_web::{HttpRequest, HttpResponse, delete, get, post, web};
use futures::StreamExt;
use serde::Deserialize;
use twinfleet_actors::{BatchView, ClaimView, TwinError, TwinRuntime};
use twinfleet_models::Action;
use twinfleet_models::enrollment::BatchSpec;
use twinfleet_models::provisioning::Mode;

pub(super) fn routes(cfg: &mut utoipa_actix_web::service_config::ServiceConfig) {
    cfg.service(pending)
        .service(show)
        .service(approve)
        .service(reject)
        .service(approve_many)
        .service(register)
        .service(decommission)
        .service(import_batch)
        .service(list_batches)
        .service(show_batch)
        .service(delete_batch);
}

/// The largest import body (about 100,000 devices of CSV with MACs).
const MAX_IMPORT_BYTES: usize = 16 * 1024 * 1024;

#[derive(Debug, Default, Deserialize, utoipa::IntoParams)]
#[into_params(parameter_in = Query)]
#[serde(deny_unknown_fields)]
struct ImportQuery {
    /// The batch's name (CSV imports only; a JSON import names it in its body).
    name: Option<String>,
    /// Overrides the type's mode for the batch (CSV imports only): `automatic` or
    /// `semi_automatic`.
    #[param(value_type = Option<String>)]
    mode: Option<Mode>,
}

/// Created: the batch and its claim token (credential `<type>/<batch>`; shown only now).
#[derive(Debug, serde::Serialize, utoipa::ToSchema)]
struct Imported {
    batch: BatchView,
    claim_token: String,
}

/// `POST /device-types/{id}/batches`: imports a batch of pre-registered devices, all or
/// nothing. JSON (`{"name", "mode"?, "devices": [{"serial", "mac"?, ...}]}`) or CSV
/// (`Content-Type: text/csv`, a header row naming the columns `serial`, `mac`, `model`,
/// `firmware`, `os`, `arch`, `peripherals` (`;`-separated), `region`; `?name=` and
/// `?mode=`). At most 100,000 devices and 16 MiB. Needs `provision` on the type.
#[utoipa::path(tag = "provisioning", params(ImportQuery),
    request_body(content((BatchSpec = "application/json"), (String = "text/csv"))),
    responses((status = 201, body = Imported), Errors), security(("bearer" = [])))]
#[post("/device-types/{id}/batches")]
async fn import_batch(
    rt: web::Data<TwinRuntime>,
    caller: Caller,
    id: web::Path<String>,
    req: HttpRequest,
    query: web::Query<ImportQuery>,
    mut payload: web::Payload,
) -> Result<HttpResponse> {
    let h = rt.device_type(&id)?;
    rt.authorize_type(&caller.0, Action::Provision, h.id())?;
    let mut body = web::BytesMut::new();
    while let Some(chunk) = payload.next().await {
        let chunk = chunk.map_err(|e| TwinError::Invalid(format!("import body: {e}")))?;
        if body.len() + chunk.len() > MAX_IMPORT_BYTES {
            return Err(TwinError::Invalid(format!(
                "the import is over {} MiB; split it into several batches",
                MAX_IMPORT_BYTES >> 20
            ))
            .into());
        }
        body.extend_from_slice(&chunk);
    }
    let content_type = req.headers().get("content-type").and_then(|v| v.to_str().ok()).unwrap_or("");
    let q = query.into_inner();
    let spec = if content_type.trim_start().to_ascii_lowercase().starts_with("text/csv") {
        let text = std::str::from_utf8(&body).map_err(|e| TwinError::Invalid(format!("the CSV is not UTF-8: {e}")))?;
        let devices =
            twinfleet_models::enrollment::parse_csv(text).map_err(|e| TwinError::Invalid(format!("CSV: {e}")))?;
        let name = q.name.ok_or_else(|| TwinError::Invalid("a CSV import names its batch: `?name=`".into()))?;
        BatchSpec { name, mode: q.mode, devices }
    } else {
        if q.name.is_some() || q.mode.is_some() {
            return Err(
                TwinError::Invalid("a JSON import names its batch and mode in its body, not the query".into()).into()
            );
        }
        serde_json::from_slice(&body).map_err(|e| TwinError::Invalid(format!("bad JSON body: {e}")))?
    };
    let (batch, claim_token) = rt.import_batch(h.id().as_str(), spec, &caller.0.user).await?;
    Ok(HttpResponse::Created()
        .insert_header(("Location", format!("/api/v1/device-types/{}/batches/{}", batch.device_type, batch.name)))
        .json(Imported { batch, claim_token }))
}

/// `GET /device-types/{id}/batches`: the type's batches. Needs `read` on the type.
#[utoipa::path(tag = "provisioning", responses((status = 200, body = Vec<BatchView>), Errors), security(("bearer" = [])))]
#[get("/device-types/{id}/batches")]
async fn list_batches(rt: web::Data<TwinRuntime>, caller: Caller, id: web::Path<String>) -> Result<HttpResponse> {
    let h = rt.device_type(&id)?;
    rt.authorize_type(&caller.0, Action::Read, h.id())?;
    Ok(HttpResponse::Ok().json(rt.batches(h.id().as_str())?))
}

/// A batch's type (checked: `action` on it) and name, from its path.
fn batch_path(
    rt: &TwinRuntime,
    caller: &Caller,
    path: web::Path<(String, String)>,
    action: Action,
) -> Result<(String, String)> {
    let (id, name) = path.into_inner();
    let h = rt.device_type(&id)?;
    rt.authorize_type(&caller.0, action, h.id())?;
    Ok((h.id().to_string(), name))
}

#[utoipa::path(tag = "provisioning", responses((status = 200, body = BatchView), Errors), security(("bearer" = [])))]
#[get("/device-types/{id}/batches/{name}")]
async fn show_batch(
    rt: web::Data<TwinRuntime>,
    caller: Caller,
    path: web::Path<(String, String)>,
) -> Result<HttpResponse> {
    let (ty, name) = batch_path(&rt, &caller, path, Action::Read)?;
    Ok(HttpResponse::Ok().json(rt.batch(&ty, &name)?))
}

/// `DELETE /device-types/{id}/batches/{name}`: its claim token stops working at once
/// and its devices are no longer pre-registered; provisioned devices keep their twins.
#[utoipa::path(tag = "provisioning", responses((status = 200, body = BatchView), Errors), security(("bearer" = [])))]
#[delete("/device-types/{id}/batches/{name}")]
async fn delete_batch(
    rt: web::Data<TwinRuntime>,
    caller: Caller,
    path: web::Path<(String, String)>,
) -> Result<HttpResponse> {
    let (ty, name) = batch_path(&rt, &caller, path, Action::Provision)?;
    Ok(HttpResponse::Ok().json(rt.delete_batch(&ty, &name).await?))
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
        twinfleet_actors::ClaimAnswer::Credentials { device_id, token, state, gateway } => {
            let mut body = serde_json::json!({"device_id": device_id, "token": token, "state": state});
            if let Some(g) = gateway {
                body["gateway"] = serde_json::to_value(g).unwrap_or_default();
            }
            HttpResponse::Created().json(body)
        }
        twinfleet_actors::ClaimAnswer::Pending { state } => {
            HttpResponse::Accepted().json(serde_json::json!({"device_id": b.device_id, "state": state}))
        }
        twinfleet_actors::ClaimAnswer::Refused { state, reason } => HttpResponse::UnprocessableEntity()
            .json(serde_json::json!({"error": "refused", "message": reason, "state": state})),
    })
}
