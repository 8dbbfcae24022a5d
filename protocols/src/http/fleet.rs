//! Device types (TDTAs), DTAs and their membership, jobs, and the inspection of the
//! actor tree and alerts.

use super::twins::twin_for;
use super::{Caller, Errors, Result};
use actix_web::{HttpResponse, delete, get, post, put, web};
use serde::Deserialize;
use serde_json::{Map, Value};
use twinfleet_actors::{ActorQuery, DeviceTypeSpec, DtaSpec, Job, JobSpec, TwinError, TwinRuntime};
use twinfleet_models::{Action, ConfigLayer};

pub(super) fn routes(cfg: &mut utoipa_actix_web::service_config::ServiceConfig) {
    cfg.service(list_device_types)
        .service(create_device_type)
        .service(show_device_type)
        .service(set_defaults)
        .service(issue_claim_token)
        .service(list_templates)
        .service(add_template)
        .service(apply_template)
        .service(list_dtas)
        .service(create_dta)
        .service(show_dta)
        .service(set_layer)
        .service(remove_layer)
        .service(join_dta)
        .service(leave_dta)
        .service(list_jobs)
        .service(submit_job)
        .service(show_job)
        .service(list_actors)
        .service(show_actor)
        .service(list_alerts);
}

/// `GET /device-types`: every TDTA (any authenticated caller).
#[utoipa::path(tag = "fleet", responses((status = 200, body = Vec<serde_json::Value>), Errors), security(("bearer" = [])))]
#[get("/device-types")]
async fn list_device_types(rt: web::Data<TwinRuntime>, _: Caller) -> HttpResponse {
    HttpResponse::Ok().json(rt.device_types())
}

#[utoipa::path(tag = "fleet", responses((status = 200, body = serde_json::Value), Errors), security(("bearer" = [])))]
#[get("/device-types/{id}")]
async fn show_device_type(rt: web::Data<TwinRuntime>, _: Caller, id: web::Path<String>) -> Result<HttpResponse> {
    Ok(HttpResponse::Ok().json(rt.device_type(&id)?.info()))
}

/// `POST /device-types`: a new device type from its model file's content (a
/// `DeviceTypeSpec`, domain model included). Needs `configure` on the fleet.
#[utoipa::path(tag = "fleet", responses((status = 201, body = serde_json::Value), Errors), security(("bearer" = [])))]
#[post("/device-types")]
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
#[utoipa::path(tag = "fleet", responses((status = 200, body = serde_json::Value), Errors), security(("bearer" = [])))]
#[put("/device-types/{id}/defaults")]
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
#[utoipa::path(tag = "fleet", responses((status = 201, body = serde_json::Value), Errors), security(("bearer" = [])))]
#[post("/device-types/{id}/claim-token")]
async fn issue_claim_token(rt: web::Data<TwinRuntime>, caller: Caller, id: web::Path<String>) -> Result<HttpResponse> {
    let ty = rt.device_type(&id)?;
    rt.authorize_type(&caller.0, Action::Configure, ty.id())?;
    let token = rt.issue_claim_token(ty.id().as_str()).await?;
    Ok(HttpResponse::Created().json(serde_json::json!({"device_type": ty.id(), "token": token})))
}

/// A new version of a device type's configuration template.
#[derive(Debug, Deserialize, utoipa::ToSchema)]
#[serde(deny_unknown_fields)]
struct NewTemplate {
    /// The desired-state key it fills (default `config`).
    #[serde(default)]
    target: Option<String>,
    /// A JSON document whose strings may hold `{{ path }}` or `{{ path | default }}`
    /// placeholders (`twin.id`, `identity.*`, `metadata.*`, `config.*`).
    #[schema(value_type = Object)]
    body: Value,
    #[serde(default)]
    comment: String,
}

/// `GET /device-types/{id}/templates`: every version of the type's configuration
/// template, and the one applied.
#[utoipa::path(tag = "fleet", responses((status = 200, body = serde_json::Value), Errors), security(("bearer" = [])))]
#[get("/device-types/{id}/templates")]
async fn list_templates(rt: web::Data<TwinRuntime>, caller: Caller, id: web::Path<String>) -> Result<HttpResponse> {
    let ty = rt.device_type(&id)?;
    rt.authorize_type(&caller.0, Action::Read, ty.id())?;
    let (versions, applied) = rt.templates(ty.id().as_str())?;
    Ok(HttpResponse::Ok().json(serde_json::json!({"device_type": ty.id(), "applied": applied, "versions": versions})))
}

/// `POST /device-types/{id}/templates`: stores the next version of the type's
/// configuration template (not applied yet). A malformed placeholder, an unknown path or
/// a bad target answers 422 `invalid_template` naming it.
#[utoipa::path(tag = "fleet", request_body = NewTemplate, responses((status = 201, body = twinfleet_models::template::ConfigTemplate), Errors), security(("bearer" = [])))]
#[post("/device-types/{id}/templates")]
async fn add_template(
    rt: web::Data<TwinRuntime>,
    caller: Caller,
    id: web::Path<String>,
    body: web::Json<NewTemplate>,
) -> Result<HttpResponse> {
    let ty = rt.device_type(&id)?;
    rt.authorize_type(&caller.0, Action::Configure, ty.id())?;
    let NewTemplate { target, body, comment } = body.into_inner();
    let t = rt.add_template(ty.id().as_str(), target, body, comment).await?;
    Ok(HttpResponse::Created().json(t))
}

/// `POST /device-types/{id}/templates/{version}/apply`: applies that version to every
/// twin of the type. Each twin fills it in from its identity, metadata and effective
/// configuration (DTA layers included) and sends its device only what changed; a twin
/// for which a placeholder has no value keeps its configuration (logged).
#[utoipa::path(tag = "fleet", responses((status = 200, body = serde_json::Value), Errors), security(("bearer" = [])))]
#[post("/device-types/{id}/templates/{version}/apply")]
async fn apply_template(
    rt: web::Data<TwinRuntime>,
    caller: Caller,
    path: web::Path<(String, u32)>,
) -> Result<HttpResponse> {
    let (id, version) = path.into_inner();
    let ty = rt.device_type(&id)?;
    rt.authorize_type(&caller.0, Action::Configure, ty.id())?;
    let told = rt.apply_template(ty.id().as_str(), version).await?;
    Ok(HttpResponse::Ok().json(serde_json::json!({"device_type": ty.id(), "version": version, "twins": told})))
}

/// `GET /dtas`: every DTA (any authenticated caller; members are counted, not listed).
#[utoipa::path(tag = "fleet", responses((status = 200, body = Vec<serde_json::Value>), Errors), security(("bearer" = [])))]
#[get("/dtas")]
async fn list_dtas(rt: web::Data<TwinRuntime>, _: Caller) -> HttpResponse {
    HttpResponse::Ok().json(rt.dtas())
}

/// `POST /dtas`: needs `configure` on the fleet.
#[utoipa::path(tag = "fleet", responses((status = 201, body = serde_json::Value), Errors), security(("bearer" = [])))]
#[post("/dtas")]
async fn create_dta(rt: web::Data<TwinRuntime>, caller: Caller, body: web::Json<DtaSpec>) -> Result<HttpResponse> {
    rt.authorize(&caller.0, Action::Configure)?;
    let d = rt.create_dta(body.into_inner()).await?;
    Ok(HttpResponse::Created().json(d.info()))
}

#[derive(Debug, Deserialize, utoipa::IntoParams)]
#[into_params(parameter_in = Query)]
#[serde(deny_unknown_fields)]
struct Page {
    #[serde(default)]
    offset: usize,
    limit: Option<usize>,
}

/// `GET /dtas/{id}?offset=&limit=`: the DTA and a page of its direct members (listing
/// members needs read access to the DTA).
#[utoipa::path(tag = "fleet", params(Page), responses((status = 200, body = serde_json::Value), Errors), security(("bearer" = [])))]
#[get("/dtas/{id}")]
async fn show_dta(
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
#[utoipa::path(tag = "fleet", responses((status = 200, body = serde_json::Value), Errors), security(("bearer" = [])))]
#[put("/dtas/{id}/layers/{name}")]
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

#[utoipa::path(tag = "fleet", responses((status = 200, body = serde_json::Value), Errors), security(("bearer" = [])))]
#[delete("/dtas/{id}/layers/{name}")]
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
#[utoipa::path(tag = "fleet", responses((status = 204), Errors), security(("bearer" = [])))]
#[put("/dtas/{id}/members/{twin}")]
async fn join_dta(rt: web::Data<TwinRuntime>, caller: Caller, p: web::Path<(String, String)>) -> Result<HttpResponse> {
    let (id, twin) = p.into_inner();
    let d = rt.dta(&id)?;
    rt.authorize_dta(&caller.0, Action::Configure, d.id())?;
    let h = twin_for(&rt, &caller, &twin, Action::Manage)?;
    d.join(h.id()).await?;
    Ok(HttpResponse::NoContent().finish())
}

#[utoipa::path(tag = "fleet", responses((status = 204), Errors), security(("bearer" = [])))]
#[delete("/dtas/{id}/members/{twin}")]
async fn leave_dta(rt: web::Data<TwinRuntime>, caller: Caller, p: web::Path<(String, String)>) -> Result<HttpResponse> {
    let (id, twin) = p.into_inner();
    let d = rt.dta(&id)?;
    rt.authorize_dta(&caller.0, Action::Configure, d.id())?;
    let h = twin_for(&rt, &caller, &twin, Action::Manage)?;
    d.leave(h.id()).await?;
    Ok(HttpResponse::NoContent().finish())
}

/// `POST /jobs`: checks the job whole, then answers 202 with it while it runs.
#[utoipa::path(tag = "fleet", responses((status = 202, body = Job), Errors), security(("bearer" = [])))]
#[post("/jobs")]
async fn submit_job(rt: web::Data<TwinRuntime>, caller: Caller, body: web::Json<JobSpec>) -> Result<HttpResponse> {
    let job = rt.submit_job(&caller.0, body.into_inner()).await?;
    Ok(HttpResponse::Accepted().insert_header(("Location", format!("/api/v1/jobs/{}", job.id))).json(job))
}

/// Whose jobs the caller sees: everyone's with `inspect`, else their own.
fn job_owner(caller: &Caller) -> Option<&str> {
    (!caller.0.role.allows(Action::Inspect)).then_some(&*caller.0.user)
}

#[derive(Debug, Deserialize, utoipa::IntoParams)]
#[into_params(parameter_in = Query)]
#[serde(deny_unknown_fields)]
struct JobsQuery {
    limit: Option<usize>,
}

/// `GET /jobs`: newest first.
#[utoipa::path(tag = "fleet", params(JobsQuery), responses((status = 200, body = Vec<Job>), Errors), security(("bearer" = [])))]
#[get("/jobs")]
async fn list_jobs(rt: web::Data<TwinRuntime>, caller: Caller, q: web::Query<JobsQuery>) -> HttpResponse {
    HttpResponse::Ok().json(rt.jobs().list(job_owner(&caller), q.limit.unwrap_or(100).min(10_000)))
}

/// `GET /jobs/{id}`: state, progress (`done` of `total`), failures.
#[utoipa::path(tag = "fleet", responses((status = 200, body = Job), Errors), security(("bearer" = [])))]
#[get("/jobs/{id}")]
async fn show_job(rt: web::Data<TwinRuntime>, caller: Caller, id: web::Path<u64>) -> Result<HttpResponse> {
    let unknown = || TwinError::Unknown { kind: "job", id: id.to_string() };
    let job = rt.jobs().get(*id).ok_or_else(unknown)?;
    if job_owner(&caller).is_some_and(|u| u != job.created_by) {
        // Not the caller's: as if it did not exist.
        return Err(unknown().into());
    }
    Ok(HttpResponse::Ok().json(job))
}

/// `GET /actors?kind=&parent=&mailbox_over=&restarted=&offset=&limit=`: the
/// supervision tree, flattened (needs `inspect`).
#[utoipa::path(tag = "fleet", params(ActorQuery), responses((status = 200, body = serde_json::Value), Errors), security(("bearer" = [])))]
#[get("/actors")]
async fn list_actors(rt: web::Data<TwinRuntime>, caller: Caller, q: web::Query<ActorQuery>) -> Result<HttpResponse> {
    rt.authorize(&caller.0, Action::Inspect)?;
    Ok(HttpResponse::Ok().json(rt.actors(&q)))
}

/// `GET /actors/{kind}/{id}`: one actor (`platform/supervisor`, `tdta/<type>`,
/// `dta/<id>`, `dti/<twin>`).
#[utoipa::path(tag = "fleet", responses((status = 200, body = serde_json::Value), Errors), security(("bearer" = [])))]
#[get("/actors/{kind}/{id}")]
async fn show_actor(
    rt: web::Data<TwinRuntime>,
    caller: Caller,
    p: web::Path<(String, String)>,
) -> Result<HttpResponse> {
    rt.authorize(&caller.0, Action::Inspect)?;
    let (kind, id) = p.into_inner();
    Ok(HttpResponse::Ok().json(rt.actor(&kind, &id)?))
}

/// `GET /alerts/platform`: the most recent internal alerts of the platform itself
/// (needs `inspect`).
#[utoipa::path(tag = "fleet", responses((status = 200, body = Vec<serde_json::Value>), Errors), security(("bearer" = [])))]
#[get("/alerts/platform")]
async fn list_alerts(rt: web::Data<TwinRuntime>, caller: Caller) -> Result<HttpResponse> {
    rt.authorize(&caller.0, Action::Inspect)?;
    Ok(HttpResponse::Ok().json(rt.alerts().recent()))
}
