//! Device types (TDTAs), DTAs and their membership, jobs, and the inspection of the
//! actor tree and alerts.

use super::twins::twin_for;
use super::{Caller, Result};
use actix_web::{HttpResponse, web};
use serde::Deserialize;
use serde_json::{Map, Value};
use twinfleet_actors::{ActorQuery, DeviceTypeSpec, DtaSpec, JobSpec, TwinError, TwinRuntime};
use twinfleet_models::{Action, ConfigLayer};

pub(super) fn routes(cfg: &mut web::ServiceConfig) {
    cfg.route("/device-types", web::get().to(device_types))
        .route("/device-types", web::post().to(create_device_type))
        .route("/device-types/{id}", web::get().to(device_type))
        .route("/device-types/{id}/defaults", web::put().to(set_defaults))
        .route("/device-types/{id}/claim-token", web::post().to(issue_claim_token))
        .route("/dtas", web::get().to(dtas))
        .route("/dtas", web::post().to(create_dta))
        .route("/dtas/{id}", web::get().to(dta))
        .route("/dtas/{id}/layers/{name}", web::put().to(set_layer))
        .route("/dtas/{id}/layers/{name}", web::delete().to(remove_layer))
        .route("/dtas/{id}/members/{twin}", web::put().to(join))
        .route("/dtas/{id}/members/{twin}", web::delete().to(leave))
        .route("/jobs", web::get().to(jobs))
        .route("/jobs", web::post().to(submit_job))
        .route("/jobs/{id}", web::get().to(job))
        .route("/actors", web::get().to(actors))
        .route("/actors/{kind}/{id}", web::get().to(actor))
        .route("/alerts", web::get().to(alerts));
}

/// `GET /device-types`: every TDTA (any authenticated caller).
async fn device_types(rt: web::Data<TwinRuntime>, _: Caller) -> HttpResponse {
    HttpResponse::Ok().json(rt.device_types())
}

async fn device_type(rt: web::Data<TwinRuntime>, _: Caller, id: web::Path<String>) -> Result<HttpResponse> {
    Ok(HttpResponse::Ok().json(rt.device_type(&id)?.info()))
}

/// `POST /device-types`: a new device type from its model file's content (a
/// `DeviceTypeSpec`, domain model included). Needs `configure` on the fleet.
async fn create_device_type(
    rt: web::Data<TwinRuntime>,
    caller: Caller,
    body: web::Json<DeviceTypeSpec>,
) -> Result<HttpResponse> {
    rt.authorize(&caller.0, Action::Configure)?;
    let ty = rt.create_device_type(body.into_inner()).await?;
    Ok(HttpResponse::Created().json(ty.info()))
}

/// `PUT /device-types/{id}/defaults`: the bottom configuration layer of its twins.
async fn set_defaults(
    rt: web::Data<TwinRuntime>,
    caller: Caller,
    id: web::Path<String>,
    body: web::Json<Map<String, Value>>,
) -> Result<HttpResponse> {
    let ty = rt.device_type(&id)?;
    rt.authorize_type(&caller.0, Action::Configure, ty.id())?;
    ty.set_defaults(body.into_inner()).await?;
    Ok(HttpResponse::Ok().json(ty.info()))
}

/// `POST /device-types/{id}/claim-token`: the type's claim token for provisioning
/// (replacing any earlier one), shown once.
async fn issue_claim_token(rt: web::Data<TwinRuntime>, caller: Caller, id: web::Path<String>) -> Result<HttpResponse> {
    let ty = rt.device_type(&id)?;
    rt.authorize_type(&caller.0, Action::Configure, ty.id())?;
    let token = rt.issue_claim_token(ty.id().as_str()).await?;
    Ok(HttpResponse::Created().json(serde_json::json!({"device_type": ty.id(), "token": token})))
}

/// `GET /dtas`: every DTA (any authenticated caller; members are counted, not listed).
async fn dtas(rt: web::Data<TwinRuntime>, _: Caller) -> HttpResponse {
    HttpResponse::Ok().json(rt.dtas())
}

/// `POST /dtas`: needs `configure` on the fleet.
async fn create_dta(rt: web::Data<TwinRuntime>, caller: Caller, body: web::Json<DtaSpec>) -> Result<HttpResponse> {
    rt.authorize(&caller.0, Action::Configure)?;
    let d = rt.create_dta(body.into_inner()).await?;
    Ok(HttpResponse::Created().json(d.info()))
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct Page {
    #[serde(default)]
    offset: usize,
    limit: Option<usize>,
}

/// `GET /dtas/{id}?offset=&limit=`: the DTA and a page of its direct members (listing
/// members needs read access to the DTA).
async fn dta(
    rt: web::Data<TwinRuntime>,
    caller: Caller,
    id: web::Path<String>,
    q: web::Query<Page>,
) -> Result<HttpResponse> {
    let d = rt.dta(&id)?;
    rt.authorize_dta(&caller.0, Action::Read, d.id())?;
    let members = d.members(q.offset, q.limit.unwrap_or(100).min(10_000));
    Ok(HttpResponse::Ok().json(serde_json::json!({"dta": d.info(), "members": members, "actor": d.actor()})))
}

/// `PUT /dtas/{id}/layers/{name}`: sets a configuration layer; answers once every
/// member has it.
async fn set_layer(
    rt: web::Data<TwinRuntime>,
    caller: Caller,
    p: web::Path<(String, String)>,
    body: web::Json<ConfigLayer>,
) -> Result<HttpResponse> {
    let (id, name) = p.into_inner();
    let d = rt.dta(&id)?;
    rt.authorize_dta(&caller.0, Action::Configure, d.id())?;
    let reached = d.set_layer(name.clone(), body.into_inner()).await?;
    Ok(HttpResponse::Ok().json(serde_json::json!({"dta": d.id(), "layer": name, "members_reached": reached})))
}

async fn remove_layer(
    rt: web::Data<TwinRuntime>,
    caller: Caller,
    p: web::Path<(String, String)>,
) -> Result<HttpResponse> {
    let (id, name) = p.into_inner();
    let d = rt.dta(&id)?;
    rt.authorize_dta(&caller.0, Action::Configure, d.id())?;
    if !d.info().layers.contains_key(&name) {
        return Err(TwinError::Unknown { kind: "layer", id: name }.into());
    }
    let reached = d.remove_layer(name.clone()).await?;
    Ok(HttpResponse::Ok().json(serde_json::json!({"dta": d.id(), "layer": name, "members_reached": reached})))
}

/// `PUT /dtas/{id}/members/{twin}`: needs `configure` on the DTA and `manage` on the twin.
async fn join(rt: web::Data<TwinRuntime>, caller: Caller, p: web::Path<(String, String)>) -> Result<HttpResponse> {
    let (id, twin) = p.into_inner();
    let d = rt.dta(&id)?;
    rt.authorize_dta(&caller.0, Action::Configure, d.id())?;
    let h = twin_for(&rt, &caller, &twin, Action::Manage)?;
    d.join(h.id()).await?;
    Ok(HttpResponse::NoContent().finish())
}

async fn leave(rt: web::Data<TwinRuntime>, caller: Caller, p: web::Path<(String, String)>) -> Result<HttpResponse> {
    let (id, twin) = p.into_inner();
    let d = rt.dta(&id)?;
    rt.authorize_dta(&caller.0, Action::Configure, d.id())?;
    let h = twin_for(&rt, &caller, &twin, Action::Manage)?;
    d.leave(h.id()).await?;
    Ok(HttpResponse::NoContent().finish())
}

/// `POST /jobs`: checks the job whole, then answers 202 with it while it runs.
async fn submit_job(rt: web::Data<TwinRuntime>, caller: Caller, body: web::Json<JobSpec>) -> Result<HttpResponse> {
    let job = rt.submit_job(&caller.0, body.into_inner()).await?;
    Ok(HttpResponse::Accepted().insert_header(("Location", format!("/api/v1/jobs/{}", job.id))).json(job))
}

/// Whose jobs the caller sees: everyone's with `inspect`, else their own.
fn job_owner(caller: &Caller) -> Option<&str> {
    (!caller.0.role.allows(Action::Inspect)).then_some(&*caller.0.user)
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct JobsQuery {
    limit: Option<usize>,
}

/// `GET /jobs`: newest first.
async fn jobs(rt: web::Data<TwinRuntime>, caller: Caller, q: web::Query<JobsQuery>) -> HttpResponse {
    HttpResponse::Ok().json(rt.env().jobs.list(job_owner(&caller), q.limit.unwrap_or(100).min(10_000)))
}

/// `GET /jobs/{id}`: state, progress (`done` of `total`), failures.
async fn job(rt: web::Data<TwinRuntime>, caller: Caller, id: web::Path<u64>) -> Result<HttpResponse> {
    let unknown = || TwinError::Unknown { kind: "job", id: id.to_string() };
    let job = rt.env().jobs.get(*id).ok_or_else(unknown)?;
    if job_owner(&caller).is_some_and(|u| u != job.created_by) {
        // Not the caller's: as if it did not exist.
        return Err(unknown().into());
    }
    Ok(HttpResponse::Ok().json(job))
}

/// `GET /actors?kind=&parent=&mailbox_over=&restarted=&offset=&limit=`: the
/// supervision tree, flattened (needs `inspect`).
async fn actors(rt: web::Data<TwinRuntime>, caller: Caller, q: web::Query<ActorQuery>) -> Result<HttpResponse> {
    rt.authorize(&caller.0, Action::Inspect)?;
    Ok(HttpResponse::Ok().json(rt.actors(&q)))
}

/// `GET /actors/{kind}/{id}`: one actor (`platform/supervisor`, `tdta/<type>`,
/// `dta/<id>`, `dti/<twin>`).
async fn actor(rt: web::Data<TwinRuntime>, caller: Caller, p: web::Path<(String, String)>) -> Result<HttpResponse> {
    rt.authorize(&caller.0, Action::Inspect)?;
    let (kind, id) = p.into_inner();
    Ok(HttpResponse::Ok().json(rt.actor(&kind, &id)?))
}

/// `GET /alerts`: the most recent internal alerts (needs `inspect`).
async fn alerts(rt: web::Data<TwinRuntime>, caller: Caller) -> Result<HttpResponse> {
    rt.authorize(&caller.0, Action::Inspect)?;
    Ok(HttpResponse::Ok().json(rt.alerts().recent()))
}
