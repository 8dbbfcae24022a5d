//! Users, groups, API tokens and the audit log. Everything here needs `administer`
//! (admins), except that every user may see themselves (`GET /me`) and manage their own
//! API tokens.

use super::{Caller, Result};
use actix_web::{HttpResponse, web};
use serde::Deserialize;
use twinfleet_actors::{AuditQuery, Group, TwinError, TwinRuntime, User};
use twinfleet_models::{Action, Grant, Role};

pub(super) fn routes(cfg: &mut web::ServiceConfig) {
    cfg.route("/me", web::get().to(me))
        .route("/users", web::get().to(users))
        .route("/users", web::post().to(create_user))
        .route("/users/{name}", web::get().to(user))
        .route("/users/{name}", web::patch().to(update_user))
        .route("/users/{name}", web::delete().to(delete_user))
        .route("/users/{name}/tokens", web::get().to(tokens))
        .route("/users/{name}/tokens", web::post().to(issue_token))
        .route("/users/{name}/tokens/{id}", web::delete().to(revoke_token))
        .route("/groups", web::get().to(groups))
        .route("/groups", web::post().to(create_group))
        .route("/groups/{name}", web::get().to(group))
        .route("/groups/{name}", web::delete().to(delete_group))
        .route("/groups/{name}/grants", web::put().to(set_grants))
        .route("/audit", web::get().to(audit));
}

fn admin(rt: &TwinRuntime, caller: &Caller) -> Result<()> {
    Ok(rt.authorize(&caller.0, Action::Administer)?)
}

/// Admins, or the user `name` themselves.
fn admin_or_self(rt: &TwinRuntime, caller: &Caller, name: &str) -> Result<()> {
    if &*caller.0.user == name { Ok(()) } else { admin(rt, caller) }
}

/// `GET /me`: the caller, their grants and the token used.
async fn me(rt: web::Data<TwinRuntime>, caller: Caller) -> Result<HttpResponse> {
    let user = rt.env().access.user(&caller.0.user)?;
    Ok(HttpResponse::Ok().json(serde_json::json!({
        "user": user,
        "grants": &*caller.0.grants,
        "token": &*caller.0.token,
    })))
}

async fn users(rt: web::Data<TwinRuntime>, caller: Caller) -> Result<HttpResponse> {
    admin(&rt, &caller)?;
    Ok(HttpResponse::Ok().json(rt.env().access.users()))
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct NewUser {
    name: String,
    role: Role,
    #[serde(default)]
    groups: Vec<String>,
}

/// `POST /users`: 201 with the user. Issue them a token with `POST /users/{name}/tokens`.
async fn create_user(rt: web::Data<TwinRuntime>, caller: Caller, body: web::Json<NewUser>) -> Result<HttpResponse> {
    admin(&rt, &caller)?;
    let b = body.into_inner();
    let user = User { name: b.name, role: b.role, groups: b.groups, created_at: rt.env().clock.now() };
    Ok(HttpResponse::Created().json(rt.env().access.create_user(user).await?))
}

async fn user(rt: web::Data<TwinRuntime>, caller: Caller, name: web::Path<String>) -> Result<HttpResponse> {
    admin_or_self(&rt, &caller, &name)?;
    Ok(HttpResponse::Ok().json(rt.env().access.user(&name)?))
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct UserChange {
    role: Option<Role>,
    groups: Option<Vec<String>>,
}

/// `PATCH /users/{name}`: role and/or groups.
async fn update_user(
    rt: web::Data<TwinRuntime>,
    caller: Caller,
    name: web::Path<String>,
    body: web::Json<UserChange>,
) -> Result<HttpResponse> {
    admin(&rt, &caller)?;
    let b = body.into_inner();
    Ok(HttpResponse::Ok().json(rt.env().access.update_user(&name, b.role, b.groups).await?))
}

/// `DELETE /users/{name}`: the user and all their tokens (204).
async fn delete_user(rt: web::Data<TwinRuntime>, caller: Caller, name: web::Path<String>) -> Result<HttpResponse> {
    admin(&rt, &caller)?;
    if *name == *caller.0.user {
        return Err(TwinError::Conflict("you cannot delete yourself".into()).into());
    }
    rt.env().access.delete_user(&name).await?;
    Ok(HttpResponse::NoContent().finish())
}

/// `GET /users/{name}/tokens`: ids and descriptions, never the tokens.
async fn tokens(rt: web::Data<TwinRuntime>, caller: Caller, name: web::Path<String>) -> Result<HttpResponse> {
    admin_or_self(&rt, &caller, &name)?;
    rt.env().access.user(&name)?;
    Ok(HttpResponse::Ok().json(rt.env().access.tokens(&name)))
}

#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
struct NewToken {
    #[serde(default)]
    description: String,
}

/// `POST /users/{name}/tokens`: 201 with the token, shown this once.
async fn issue_token(
    rt: web::Data<TwinRuntime>,
    caller: Caller,
    name: web::Path<String>,
    body: Option<web::Json<NewToken>>,
) -> Result<HttpResponse> {
    admin_or_self(&rt, &caller, &name)?;
    let description = body.map(|b| b.into_inner().description).unwrap_or_default();
    let (token, info) = rt.env().access.issue_token(&name, description, rt.env().clock.now()).await?;
    Ok(HttpResponse::Created().json(serde_json::json!({"token": token, "info": info})))
}

async fn revoke_token(
    rt: web::Data<TwinRuntime>,
    caller: Caller,
    p: web::Path<(String, String)>,
) -> Result<HttpResponse> {
    let (name, id) = p.into_inner();
    admin_or_self(&rt, &caller, &name)?;
    rt.env().access.revoke_token(&name, &id).await?;
    Ok(HttpResponse::NoContent().finish())
}

async fn groups(rt: web::Data<TwinRuntime>, caller: Caller) -> Result<HttpResponse> {
    admin(&rt, &caller)?;
    Ok(HttpResponse::Ok().json(rt.env().access.groups()))
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct NewGroup {
    name: String,
    #[serde(default)]
    grants: Vec<Grant>,
}

async fn create_group(rt: web::Data<TwinRuntime>, caller: Caller, body: web::Json<NewGroup>) -> Result<HttpResponse> {
    admin(&rt, &caller)?;
    let b = body.into_inner();
    let group = Group { name: b.name, grants: b.grants, created_at: rt.env().clock.now() };
    Ok(HttpResponse::Created().json(rt.env().access.create_group(group).await?))
}

async fn group(rt: web::Data<TwinRuntime>, caller: Caller, name: web::Path<String>) -> Result<HttpResponse> {
    admin(&rt, &caller)?;
    Ok(HttpResponse::Ok().json(rt.env().access.group(&name)?))
}

/// `PUT /groups/{name}/grants`: replaces the group's grants; takes effect on the next
/// request of each member.
async fn set_grants(
    rt: web::Data<TwinRuntime>,
    caller: Caller,
    name: web::Path<String>,
    body: web::Json<Vec<Grant>>,
) -> Result<HttpResponse> {
    admin(&rt, &caller)?;
    Ok(HttpResponse::Ok().json(rt.env().access.set_grants(&name, body.into_inner()).await?))
}

/// `DELETE /groups/{name}`: 409 while users still belong to it.
async fn delete_group(rt: web::Data<TwinRuntime>, caller: Caller, name: web::Path<String>) -> Result<HttpResponse> {
    admin(&rt, &caller)?;
    rt.env().access.delete_group(&name).await?;
    Ok(HttpResponse::NoContent().finish())
}

/// `GET /audit?user=&target=&before=&limit=`: audited writes, newest first.
async fn audit(rt: web::Data<TwinRuntime>, caller: Caller, q: web::Query<AuditQuery>) -> Result<HttpResponse> {
    admin(&rt, &caller)?;
    Ok(HttpResponse::Ok().json(rt.env().access.audit_log(&q)?))
}
