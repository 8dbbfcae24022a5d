//! Users, groups, API tokens and the audit log. Everything here needs `administer`
//! (admins), except that every user may see themselves (`GET /me`) and manage their own
//! API tokens.

use super::{Caller, Errors, Result};
use actix_web::{HttpResponse, delete, get, patch, post, put, web};
use serde::Deserialize;
use twinfleet_actors::{AuditEntry, AuditQuery, Group, TokenInfo, TwinError, TwinRuntime, User};
use twinfleet_models::{Action, Grant, Role};

pub(super) fn routes(cfg: &mut utoipa_actix_web::service_config::ServiceConfig) {
    cfg.service(whoami)
        .service(list_users)
        .service(create_user)
        .service(show_user)
        .service(update_user)
        .service(delete_user)
        .service(list_tokens)
        .service(issue_api_token)
        .service(revoke_api_token)
        .service(list_groups)
        .service(create_group)
        .service(show_group)
        .service(delete_group)
        .service(set_grants)
        .service(audit_log);
}

fn admin(rt: &TwinRuntime, caller: &Caller) -> Result<()> {
    Ok(rt.authorize(&caller.0, Action::Administer)?)
}

/// Admins, or the user `name` themselves.
fn admin_or_self(rt: &TwinRuntime, caller: &Caller, name: &str) -> Result<()> {
    if &*caller.0.user == name { Ok(()) } else { admin(rt, caller) }
}

/// `GET /me`: the caller, their grants and the token used.
#[utoipa::path(tag = "admin", responses((status = 200, body = serde_json::Value), Errors), security(("bearer" = [])))]
#[get("/me")]
async fn whoami(rt: web::Data<TwinRuntime>, caller: Caller) -> Result<HttpResponse> {
    let user = rt.access().user(&caller.0.user)?;
    Ok(HttpResponse::Ok().json(serde_json::json!({
        "user": user,
        "grants": &*caller.0.grants,
        "token": &*caller.0.token,
    })))
}

#[utoipa::path(tag = "admin", responses((status = 200, body = Vec<User>), Errors), security(("bearer" = [])))]
#[get("/users")]
async fn list_users(rt: web::Data<TwinRuntime>, caller: Caller) -> Result<HttpResponse> {
    admin(&rt, &caller)?;
    Ok(HttpResponse::Ok().json(rt.access().users()))
}

#[derive(Debug, Deserialize, utoipa::ToSchema)]
#[serde(deny_unknown_fields)]
struct NewUser {
    #[schema(min_length = 1, max_length = 128, pattern = "^[A-Za-z0-9._:-]+$")]
    name: String,
    role: Role,
    #[serde(default)]
    groups: Vec<String>,
}

/// `POST /users`: 201 with the user. Issue them a token with `POST /users/{name}/tokens`.
#[utoipa::path(tag = "admin", responses((status = 201, body = User), Errors), security(("bearer" = [])))]
#[post("/users")]
async fn create_user(rt: web::Data<TwinRuntime>, caller: Caller, body: web::Json<NewUser>) -> Result<HttpResponse> {
    admin(&rt, &caller)?;
    let b = body.into_inner();
    let user = User { name: b.name, role: b.role, groups: b.groups, created_at: rt.now() };
    Ok(HttpResponse::Created().json(rt.access().create_user(user).await?))
}

#[utoipa::path(tag = "admin", responses((status = 200, body = User), Errors), security(("bearer" = [])))]
#[get("/users/{name}")]
async fn show_user(rt: web::Data<TwinRuntime>, caller: Caller, name: web::Path<String>) -> Result<HttpResponse> {
    admin_or_self(&rt, &caller, &name)?;
    Ok(HttpResponse::Ok().json(rt.access().user(&name)?))
}

#[derive(Debug, Deserialize, utoipa::ToSchema)]
#[serde(deny_unknown_fields)]
struct UserChange {
    role: Option<Role>,
    groups: Option<Vec<String>>,
}

/// `PATCH /users/{name}`: role and/or groups.
#[utoipa::path(tag = "admin", request_body = UserChange, responses((status = 200, body = User), Errors), security(("bearer" = [])))]
#[patch("/users/{name}")]
async fn update_user(
    rt: web::Data<TwinRuntime>,
    caller: Caller,
    name: web::Path<String>,
    body: web::Json<serde_json::Value>,
) -> Result<HttpResponse> {
    admin(&rt, &caller)?;
    let body = body.into_inner();
    if !body.is_object() {
        return Err(TwinError::Invalid("the body must be a JSON object".into()).into());
    }
    let b: UserChange = serde_json::from_value(body).map_err(|e| TwinError::Invalid(format!("bad JSON body: {e}")))?;
    if b.role.is_some() && name.as_str() == &*caller.0.user {
        return Err(TwinError::Conflict("you cannot change your own role".into()).into());
    }
    Ok(HttpResponse::Ok().json(rt.access().update_user(&name, b.role, b.groups).await?))
}

/// `DELETE /users/{name}`: the user and all their tokens (204).
#[utoipa::path(tag = "admin", responses((status = 204), Errors), security(("bearer" = [])))]
#[delete("/users/{name}")]
async fn delete_user(rt: web::Data<TwinRuntime>, caller: Caller, name: web::Path<String>) -> Result<HttpResponse> {
    admin(&rt, &caller)?;
    if *name == *caller.0.user {
        return Err(TwinError::Conflict("you cannot delete yourself".into()).into());
    }
    rt.access().delete_user(&name).await?;
    Ok(HttpResponse::NoContent().finish())
}

/// `GET /users/{name}/tokens`: ids and descriptions, never the tokens.
#[utoipa::path(tag = "admin", responses((status = 200, body = Vec<TokenInfo>), Errors), security(("bearer" = [])))]
#[get("/users/{name}/tokens")]
async fn list_tokens(rt: web::Data<TwinRuntime>, caller: Caller, name: web::Path<String>) -> Result<HttpResponse> {
    admin_or_self(&rt, &caller, &name)?;
    rt.access().user(&name)?;
    Ok(HttpResponse::Ok().json(rt.access().tokens(&name)))
}

#[derive(Debug, Default, Deserialize, utoipa::ToSchema)]
#[serde(deny_unknown_fields)]
struct NewToken {
    #[serde(default)]
    description: String,
}

/// An API token, shown once, and what is kept of it.
#[derive(Debug, serde::Serialize, utoipa::ToSchema)]
pub(super) struct IssuedApiToken {
    token: String,
    info: TokenInfo,
}

/// `POST /users/{name}/tokens`: 201 with the token, shown this once.
#[utoipa::path(tag = "admin", responses((status = 201, body = IssuedApiToken), Errors), security(("bearer" = [])))]
#[post("/users/{name}/tokens")]
async fn issue_api_token(
    rt: web::Data<TwinRuntime>,
    caller: Caller,
    name: web::Path<String>,
    body: web::Json<NewToken>,
) -> Result<HttpResponse> {
    admin_or_self(&rt, &caller, &name)?;
    let description = body.into_inner().description;
    let (token, info) = rt.access().issue_token(&name, description, rt.now()).await?;
    Ok(HttpResponse::Created().json(IssuedApiToken { token, info }))
}

#[utoipa::path(tag = "admin", responses((status = 204), Errors), security(("bearer" = [])))]
#[delete("/users/{name}/tokens/{id}")]
async fn revoke_api_token(
    rt: web::Data<TwinRuntime>,
    caller: Caller,
    p: web::Path<(String, String)>,
) -> Result<HttpResponse> {
    let (name, id) = p.into_inner();
    admin_or_self(&rt, &caller, &name)?;
    rt.access().revoke_token(&name, &id).await?;
    Ok(HttpResponse::NoContent().finish())
}

#[utoipa::path(tag = "admin", responses((status = 200, body = Vec<Group>), Errors), security(("bearer" = [])))]
#[get("/groups")]
async fn list_groups(rt: web::Data<TwinRuntime>, caller: Caller) -> Result<HttpResponse> {
    admin(&rt, &caller)?;
    Ok(HttpResponse::Ok().json(rt.access().groups()))
}

#[derive(Debug, Deserialize, utoipa::ToSchema)]
#[serde(deny_unknown_fields)]
struct NewGroup {
    #[schema(min_length = 1, max_length = 128, pattern = "^[A-Za-z0-9._:-]+$")]
    name: String,
    #[serde(default)]
    grants: Vec<Grant>,
}

#[utoipa::path(tag = "admin", responses((status = 201, body = Group), Errors), security(("bearer" = [])))]
#[post("/groups")]
async fn create_group(rt: web::Data<TwinRuntime>, caller: Caller, body: web::Json<NewGroup>) -> Result<HttpResponse> {
    admin(&rt, &caller)?;
    let b = body.into_inner();
    let group = Group { name: b.name, grants: b.grants, created_at: rt.now() };
    Ok(HttpResponse::Created().json(rt.access().create_group(group).await?))
}

#[utoipa::path(tag = "admin", responses((status = 200, body = Group), Errors), security(("bearer" = [])))]
#[get("/groups/{name}")]
async fn show_group(rt: web::Data<TwinRuntime>, caller: Caller, name: web::Path<String>) -> Result<HttpResponse> {
    admin(&rt, &caller)?;
    Ok(HttpResponse::Ok().json(rt.access().group(&name)?))
}

/// `PUT /groups/{name}/grants`: replaces the group's grants; takes effect on the next
/// request of each member.
#[utoipa::path(tag = "admin", responses((status = 200, body = Group), Errors), security(("bearer" = [])))]
#[put("/groups/{name}/grants")]
async fn set_grants(
    rt: web::Data<TwinRuntime>,
    caller: Caller,
    name: web::Path<String>,
    body: web::Json<Vec<Grant>>,
) -> Result<HttpResponse> {
    admin(&rt, &caller)?;
    Ok(HttpResponse::Ok().json(rt.access().set_grants(&name, body.into_inner()).await?))
}

/// `DELETE /groups/{name}`: 409 while users still belong to it.
#[utoipa::path(tag = "admin", responses((status = 204), Errors), security(("bearer" = [])))]
#[delete("/groups/{name}")]
async fn delete_group(rt: web::Data<TwinRuntime>, caller: Caller, name: web::Path<String>) -> Result<HttpResponse> {
    admin(&rt, &caller)?;
    rt.access().delete_group(&name).await?;
    Ok(HttpResponse::NoContent().finish())
}

/// `GET /audit?user=&target=&before=&limit=`: audited writes, newest first.
#[utoipa::path(tag = "admin", params(AuditQuery), responses((status = 200, body = Vec<AuditEntry>), Errors), security(("bearer" = [])))]
#[get("/audit")]
async fn audit_log(rt: web::Data<TwinRuntime>, caller: Caller, q: web::Query<AuditQuery>) -> Result<HttpResponse> {
    admin(&rt, &caller)?;
    Ok(HttpResponse::Ok().json(rt.access().audit_log(&q)?))
}
