//! The operator HTTP API (actix-web, JSON) under `/api/v1`. Every route is listed in
//! [`configure`]; the OpenAPI document at `/api/v1/openapi.json` describes them.
//!
//! - **Authentication**: every `/api/v1` request but the OpenAPI document carries
//!   `Authorization: Bearer <API token>`; without a valid one the answer is 401.
//! - **Authorization**: each handler asks `TwinRuntime::authorize_*` for the caller's role
//!   and grants; a refusal is 403 and says which role or grant was missing. Lists return
//!   only what the caller may read.
//! - **Audit**: every request that is not a read (any method but GET/HEAD) of an
//!   authenticated caller is recorded (who, method, path, status, when) before the
//!   answer leaves.
//! - **Errors** are JSON `{"error": <code>, "message": <what was wrong>}` with a 4xx
//!   status chosen from the typed `TwinError` (5xx only for storage failures).
//!
//! `/healthz` and `/metrics` need no token (bind the API to a private address).

mod admin;
mod fleet;
mod twins;

use actix_web::body::MessageBody;
use actix_web::dev::{Payload, ServiceRequest, ServiceResponse};
use actix_web::middleware::{Next, from_fn};
use actix_web::{
    App, FromRequest, HttpMessage, HttpRequest, HttpResponse, HttpServer, ResponseError, http::StatusCode, web,
};
use std::net::SocketAddr;
use twinfleet_actors::{AuditEntry, Principal, TwinError, TwinHandle, TwinRuntime};
use twinfleet_models::{ModelError, TwinCommand};
use twinfleet_runtime::{Edge, Exposition};
use utoipa_actix_web::AppExt;

/// A `TwinError` as an HTTP answer.
#[derive(Debug)]
pub struct HttpError(pub TwinError);

impl From<TwinError> for HttpError {
    fn from(e: TwinError) -> Self {
        HttpError(e)
    }
}

impl std::fmt::Display for HttpError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        self.0.fmt(f)
    }
}

impl HttpError {
    fn code(&self) -> &'static str {
        crate::error::classify(&self.0).code
    }
}

impl ResponseError for HttpError {
    fn status_code(&self) -> StatusCode {
        crate::error::classify(&self.0).class.http()
    }

    fn error_response(&self) -> HttpResponse {
        let mut body = serde_json::json!({"error": self.code(), "message": self.0.to_string()});
        if let TwinError::Rejected(ModelError::Violations(v)) = &self.0 {
            body["violations"] = serde_json::to_value(v).unwrap_or_default();
        }
        let mut res = HttpResponse::build(self.status_code());
        if matches!(self.0, TwinError::Unauthenticated(_)) {
            res.insert_header(("WWW-Authenticate", "Bearer"));
        }
        if matches!(crate::error::classify(&self.0).class, crate::error::Class::InsufficientStorage) {
            // Writes resume by themselves once space is freed; the storage checks every second.
            res.insert_header(("Retry-After", "5"));
        }
        res.json(body)
    }
}

/// The body of every error answer.
#[derive(Debug, serde::Serialize, utoipa::ToSchema)]
pub(crate) struct ErrorBody {
    /// A stable code: `invalid`, `unauthenticated`, `forbidden`, `not_found`,
    /// `already_exists`, `conflict`, `archived`, `constraint_violation`, ...
    error: String,
    /// What was wrong, for a human.
    message: String,
    /// Constraint violations (422 `constraint_violation` only): property, rule, value.
    #[serde(skip_serializing_if = "Option::is_none")]
    violations: Option<Vec<serde_json::Value>>,
}

/// The error answers any API route may give.
#[derive(Debug, utoipa::IntoResponses)]
#[allow(dead_code)]
pub(crate) enum Errors {
    /// Malformed input: bad JSON, an unknown field, a wrong type, a bad id, query or path.
    #[response(status = 400)]
    BadRequest(ErrorBody),
    /// No API token, or an unknown or revoked one.
    #[response(status = 401)]
    Unauthorized(ErrorBody),
    /// The caller's role or grants do not allow this.
    #[response(status = 403)]
    Forbidden(ErrorBody),
    /// No such twin, device type, DTA, user, group, job, component path or route.
    #[response(status = 404)]
    NotFound(ErrorBody),
    /// Already exists, archived, quarantined, or still in use.
    #[response(status = 409)]
    Conflict(ErrorBody),
    /// Well-formed but refused by the twin's rules (constraint violations are listed).
    #[response(status = 422)]
    Unprocessable(ErrorBody),
    /// The twin's mailbox is full; retry later.
    #[response(status = 429)]
    TooManyRequests(ErrorBody),
    /// Storage failed.
    #[response(status = 500)]
    Internal(ErrorBody),
    /// The twin is restarting, the device unreachable, or the platform stopping.
    #[response(status = 503)]
    Unavailable(ErrorBody),
    /// The twin did not answer in time.
    #[response(status = 504)]
    Timeout(ErrorBody),
}

/// The authenticated caller of a handler (401 if the middleware found none), and the
/// audit entry of its request when it writes.
#[derive(Debug, Clone)]
pub(crate) struct Caller(pub Principal, Option<PendingAudit>);

impl FromRequest for Caller {
    type Error = HttpError;
    type Future = std::future::Ready<std::result::Result<Caller, HttpError>>;

    fn from_request(req: &HttpRequest, _: &mut Payload) -> Self::Future {
        let ext = req.extensions();
        std::future::ready(
            ext.get::<Principal>()
                .cloned()
                .map(|p| Caller(p, ext.get::<PendingAudit>().cloned()))
                .ok_or_else(|| HttpError(TwinError::Unauthenticated("no API token".into()))),
        )
    }
}

impl Caller {
    /// Sends `cmd` to the twin; if it is accepted, the request's audit entry (with
    /// `status`, the answer the handler gives on success) is stored in the same batch as
    /// the change, so the answer waits for one flush, not two.
    pub(crate) async fn command(&self, h: &TwinHandle, cmd: TwinCommand, status: StatusCode) -> Result<u64> {
        let Some(audit) = &self.1 else { return Ok(h.command(cmd).await?) };
        let entry = AuditEntry { status: status.as_u16(), ..audit.entry.clone() };
        let seq = h.command_audited(cmd, &entry).await?;
        audit.stored.set(Some(entry.status));
        Ok(seq)
    }
}

/// The audit entry of a write in progress, and the status it was already stored with
/// (by [`Caller::command`]), if any.
#[derive(Debug, Clone)]
pub(crate) struct PendingAudit {
    entry: AuditEntry,
    stored: std::rc::Rc<std::cell::Cell<Option<u16>>>,
}

/// Paths readable without a token. Decided on the path the router matches (actix
/// decodes percent-encoded unreserved characters before routing, so `/%61pi/v1/users`
/// routes to `/api/v1/users`), fully percent-decoded, so that no spelling of an API path
/// gets around authentication.
fn public(routed: &str) -> bool {
    let path = percent_decode(routed);
    let api = path.len() >= 4 && path.as_bytes()[..4].eq_ignore_ascii_case(b"/api");
    !api || path == "/api/v1/openapi.json"
}

/// `%XX` escapes decoded (invalid ones kept as they are).
fn percent_decode(s: &str) -> String {
    let b = s.as_bytes();
    let mut out = Vec::with_capacity(b.len());
    let mut i = 0;
    while i < b.len() {
        let hex = |c: u8| (c as char).to_digit(16);
        if b[i] == b'%'
            && i + 2 < b.len()
            && let (Some(h), Some(l)) = (hex(b[i + 1]), hex(b[i + 2]))
        {
            out.push((h * 16 + l) as u8);
            i += 3;
        } else {
            out.push(b[i]);
            i += 1;
        }
    }
    String::from_utf8_lossy(&out).into_owned()
}

/// Counts every request by method, route pattern and status, with its latency (until
/// the handler's answer is ready; streaming a large body is not included).
async fn observe(
    req: ServiceRequest,
    next: Next<impl MessageBody + 'static>,
) -> std::result::Result<ServiceResponse<impl MessageBody>, actix_web::Error> {
    let started = std::time::Instant::now();
    let method = method_name(req.method());
    let requests = req.app_data::<web::Data<TwinRuntime>>().map(|rt| rt.env().requests.clone());
    let res = next.call(req).await?;
    if let Some(requests) = requests {
        let route = res.request().match_pattern();
        let status = res.status();
        requests.record(
            Edge::Http,
            method,
            route.as_deref().unwrap_or("unmatched"),
            status.as_str(),
            started.elapsed(),
        );
    }
    Ok(res)
}

fn method_name(m: &actix_web::http::Method) -> &'static str {
    use actix_web::http::Method;
    match *m {
        Method::GET => "GET",
        Method::POST => "POST",
        Method::PUT => "PUT",
        Method::PATCH => "PATCH",
        Method::DELETE => "DELETE",
        Method::HEAD => "HEAD",
        Method::OPTIONS => "OPTIONS",
        _ => "OTHER",
    }
}

/// Authenticates every `/api/v1` request and audits every write.
async fn authenticate(
    req: ServiceRequest,
    next: Next<impl MessageBody + 'static>,
) -> std::result::Result<ServiceResponse<actix_web::body::BoxBody>, actix_web::Error> {
    if public(req.match_info().as_str()) {
        return next.call(req).await.map(ServiceResponse::map_into_boxed_body);
    }
    let Some(rt) = req.app_data::<web::Data<TwinRuntime>>().cloned() else {
        return next.call(req).await.map(ServiceResponse::map_into_boxed_body);
    };
    let token = req
        .headers()
        .get(actix_web::http::header::AUTHORIZATION)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.strip_prefix("Bearer ").or_else(|| v.strip_prefix("bearer ")))
        .map(str::trim);
    let principal = match token {
        None => Err(TwinError::Unauthenticated("send Authorization: Bearer <API token>".into())),
        Some(t) => rt.env().access.authenticate(t),
    };
    let principal = match principal {
        Ok(p) => p,
        Err(e) => {
            rt.env().rejections.reject(if token.is_some() { "bad_api_token" } else { "no_api_token" }, || {
                format!("{} {}: {e}", req.method(), req.path())
            });
            return Ok(req.into_response(HttpError(e).error_response()));
        }
    };
    let write = !matches!(*req.method(), actix_web::http::Method::GET | actix_web::http::Method::HEAD);
    req.extensions_mut().insert(principal.clone());
    if !write {
        return next.call(req).await.map(ServiceResponse::map_into_boxed_body);
    }
    // A client that hangs up must not cut a change in half (a twin retired but still
    // listed, a record written but not its audit entry): the change and its audit
    // record run to the end in a task of their own.
    actix_web::rt::spawn(audited(rt, principal, req, next))
        .await
        .unwrap_or_else(|e| Err(actix_web::error::ErrorInternalServerError(format!("the request's task failed: {e}"))))
}

/// Runs a write and records it in the audit log with its status.
async fn audited(
    rt: web::Data<TwinRuntime>,
    principal: Principal,
    req: ServiceRequest,
    next: Next<impl MessageBody + 'static>,
) -> std::result::Result<ServiceResponse<actix_web::body::BoxBody>, actix_web::Error> {
    let id = match rt.env().access.next_audit_id() {
        Ok(id) => id,
        Err(e) => return Ok(req.into_response(HttpError(e).error_response())),
    };
    let entry = AuditEntry {
        id,
        at: rt.env().clock.now(),
        user: principal.user.to_string(),
        action: req.method().to_string(),
        target: req.match_info().as_str().to_string(),
        status: 0,
    };
    let stored = std::rc::Rc::new(std::cell::Cell::new(None));
    req.extensions_mut().insert(PendingAudit { entry: entry.clone(), stored: stored.clone() });
    let res = next.call(req).await?.map_into_boxed_body();
    let status = res.status().as_u16();
    if stored.get() == Some(status) {
        return Ok(res); // stored with the change, with this status
    }
    // Not stored yet, or stored with another status (the change was accepted but the
    // answer is an error): store it (again, under the same id) with the real status.
    if let Err(e) = rt.env().access.audit(AuditEntry { status, ..entry }).await {
        // The change itself is durable; say that its audit record is missing.
        tracing::error!("could not write an audit record: {e}");
        return Ok(res.into_response(HttpError(e).error_response()));
    }
    Ok(res)
}

type Result<T> = std::result::Result<T, HttpError>;

/// Largest JSON body accepted (400 beyond, saying so).
const MAX_BODY_BYTES: usize = 256 * 1024;

async fn healthz(rt: web::Data<TwinRuntime>) -> HttpResponse {
    // Degraded storage (a full disk) answers 503: reads still work, writes are refused
    // until space is freed.
    let (status, storage, mut res) = match rt.env().storage.writable() {
        Ok(()) => ("ok", serde_json::json!({"writable": true}), HttpResponse::Ok()),
        Err(e) => (
            "degraded",
            serde_json::json!({"writable": false, "error": e.to_string()}),
            HttpResponse::ServiceUnavailable(),
        ),
    };
    res.json(serde_json::json!({
        "status": status,
        "storage": storage,
        "twins": rt.twin_count(),
        "device_types": rt.device_types().len(),
        "dtas": rt.dtas().len(),
    }))
}

/// Prometheus text exposition: rejected inputs by reason, twins, storage. (The operator
/// issue adds actors, mailboxes and request latencies.)
/// The Prometheus exposition: edges (rejections, requests), actors, twins, storage.
async fn metrics(rt: web::Data<TwinRuntime>) -> HttpResponse {
    let env = rt.env();
    let mut e = Exposition::new();

    e.family("twinfleet_rejected_total", "counter", "Inputs rejected at the edges (MQTT, gRPC, HTTP), by reason.");
    for (reason, n) in env.rejections.snapshot() {
        e.sample("twinfleet_rejected_total", &[("reason", reason)], n);
    }

    let routes = env.requests.snapshot();
    for (edge, name, what) in [
        (Edge::Http, "twinfleet_http_requests", "HTTP requests"),
        (Edge::Grpc, "twinfleet_grpc_requests", "gRPC calls"),
    ] {
        let (total, seconds) = (format!("{name}_total"), format!("{name}_seconds"));
        let code = if edge == Edge::Http { "status" } else { "code" };
        e.family(&total, "counter", &format!("{what} by method, route and {code}."));
        for r in routes.iter().filter(|r| r.edge == edge) {
            for (status, n) in &r.statuses {
                e.sample(&total, &[("method", r.method), ("route", &r.route), (code, status)], *n);
            }
        }
        e.family(&seconds, "histogram", &format!("Latency of {what} until the answer is ready, by method and route."));
        for r in routes.iter().filter(|r| r.edge == edge) {
            e.histogram(&seconds, &[("method", r.method), ("route", &r.route)], &r.latency, 1e6);
        }
    }

    // A pass over every actor (~0.1 s per million twins): off the HTTP worker.
    let summary = {
        let rt = rt.clone();
        match web::block(move || rt.summary()).await {
            Ok(s) => s,
            Err(e) => return HttpResponse::InternalServerError().body(format!("metrics: {e}")),
        }
    };
    e.family("twinfleet_actors", "gauge", "Actors by kind (platform, tdta, dta, dti) and status.");
    for k in &summary.kinds {
        for (status, n) in &k.by_status {
            e.sample("twinfleet_actors", &[("kind", k.kind), ("status", status.as_str())], *n);
        }
    }
    type Field = fn(&twinfleet_actors::KindSummary) -> u64;
    let per_kind: [(&str, &str, &str, Field); 4] = [
        ("twinfleet_actor_messages_handled_total", "counter", "Messages handled, by actor kind.", |k| {
            k.messages_handled
        }),
        ("twinfleet_actor_mailbox_depth", "gauge", "Messages waiting in mailboxes, summed by actor kind.", |k| {
            k.mailbox_depth
        }),
        ("twinfleet_actor_mailbox_depth_max", "gauge", "The deepest mailbox of each actor kind.", |k| {
            k.mailbox_depth_max
        }),
        ("twinfleet_actor_restarts_total", "counter", "Restarts after a panic, by actor kind.", |k| k.restarts),
    ];
    for (name, kind, help, field) in per_kind {
        e.family(name, kind, help);
        for k in &summary.kinds {
            e.sample(name, &[("kind", k.kind)], field(k));
        }
    }
    e.family("twinfleet_twins", "gauge", "Twins (DTIs) by device type and lifecycle state (active, archived).");
    for (ty, active, archived) in &summary.twins {
        e.sample("twinfleet_twins", &[("device_type", ty.as_str()), ("state", "active")], *active);
        e.sample("twinfleet_twins", &[("device_type", ty.as_str()), ("state", "archived")], *archived);
    }

    let s = env.storage.stats();
    let writable = u64::from(env.storage.writable().is_ok());
    e.single(
        "twinfleet_storage_writable",
        "gauge",
        "1 while storage takes writes, 0 while the disk is full.",
        writable,
    );
    e.single("twinfleet_storage_batches_total", "counter", "Write batches submitted.", s.batches_submitted);
    e.single("twinfleet_storage_commits_total", "counter", "Group commits (apply + flush).", s.groups_committed);
    e.single("twinfleet_storage_ops_total", "counter", "Records written or deleted.", s.ops_committed);
    e.family("twinfleet_storage_commit_records", "histogram", "Records per group commit.");
    e.histogram("twinfleet_storage_commit_records", &[], &s.group_ops, 1.0);
    e.family("twinfleet_storage_flush_seconds", "histogram", "Time to apply and flush one group commit.");
    e.histogram("twinfleet_storage_flush_seconds", &[], &s.flush_micros, 1e6);
    HttpResponse::Ok().content_type("text/plain; version=0.0.4").body(e.finish())
}

/// Every documented path and its methods, to tell "no such endpoint" (404) from "not
/// with this method" (405).
struct Routes(Vec<(actix_web::dev::ResourceDef, Vec<String>)>);

impl Routes {
    fn from_document(json: &str) -> Routes {
        let doc: serde_json::Value = serde_json::from_str(json).unwrap_or_default();
        let paths = doc["paths"].as_object().cloned().unwrap_or_default();
        Routes(
            paths
                .into_iter()
                .map(|(path, ops)| {
                    // The document names the tail parameter `{path}`; it spans segments.
                    let def = actix_web::dev::ResourceDef::new(path.replace("{path}", "{path:.*}"));
                    let methods =
                        ops.as_object().map(|o| o.keys().map(|m| m.to_uppercase()).collect()).unwrap_or_default();
                    (def, methods)
                })
                .collect(),
        )
    }
}

async fn not_found(req: HttpRequest, routes: web::Data<Routes>) -> HttpResponse {
    if let Some((_, methods)) = routes.0.iter().find(|(def, _)| def.is_match(req.path())) {
        return HttpResponse::MethodNotAllowed().insert_header(("Allow", methods.join(", "))).json(serde_json::json!({
            "error": "method_not_allowed",
            "message": format!("{} is not allowed on {}; allowed: {}", req.method(), req.path(), methods.join(", ")),
        }));
    }
    HttpResponse::NotFound().json(serde_json::json!({"error": "not_found", "message": "no such endpoint"}))
}

/// Adds the bearer-token scheme and the document's title.
struct Document;

impl utoipa::Modify for Document {
    fn modify(&self, doc: &mut utoipa::openapi::OpenApi) {
        use utoipa::openapi::security::{HttpAuthScheme, HttpBuilder, SecurityScheme};
        doc.info.title = "twinfleet operator API".into();
        doc.info.version = env!("CARGO_PKG_VERSION").into();
        doc.info.description = Some(
            "Twins, device types (TDTAs), DTAs, jobs, users, groups and the actor tree. Every route needs \
             `Authorization: Bearer <API token>`."
                .into(),
        );
        let components = doc.components.get_or_insert_with(Default::default);
        components.add_security_scheme(
            "bearer",
            SecurityScheme::Http(HttpBuilder::new().scheme(HttpAuthScheme::Bearer).build()),
        );
    }
}

#[derive(utoipa::OpenApi)]
#[openapi(modifiers(&Document), components(schemas(ErrorBody)))]
struct ApiDoc;

/// The API's routes, described as they are registered (so the document cannot drift).
fn api_scope() -> utoipa_actix_web::scope::Scope<
    impl actix_web::dev::ServiceFactory<
        ServiceRequest,
        Config = (),
        Response = ServiceResponse,
        Error = actix_web::Error,
        InitError = (),
    >,
> {
    utoipa_actix_web::scope("/api/v1").configure(twins::routes).configure(fleet::routes).configure(admin::routes)
}

/// The OpenAPI 3 document of the API, as JSON.
pub fn openapi_json() -> String {
    use utoipa::OpenApi as _;
    let (_, doc) = App::new().into_utoipa_app().openapi(ApiDoc::openapi()).service(api_scope()).split_for_parts();
    doc.to_pretty_json().unwrap_or_else(|e| format!("{{\"error\":\"{e}\"}}"))
}

struct OpenApiJson(String);

async fn openapi(doc: web::Data<OpenApiJson>) -> HttpResponse {
    HttpResponse::Ok().content_type("application/json").body(doc.0.clone())
}

/// A running HTTP API.
#[derive(Debug)]
pub struct HttpApi {
    handle: actix_web::dev::ServerHandle,
    addr: SocketAddr,
}

impl HttpApi {
    /// Binds `addr` and serves the API on `workers` threads. Must be called inside an
    /// actix system; the server runs until [`HttpApi::stop`].
    pub fn start(rt: TwinRuntime, addr: SocketAddr, workers: usize) -> std::io::Result<HttpApi> {
        let data = web::Data::new(rt);
        let json = openapi_json();
        let routes = web::Data::new(Routes::from_document(&json));
        let doc = web::Data::new(OpenApiJson(json));
        let server = HttpServer::new(move || {
            App::new()
                .into_utoipa_app()
                .app_data(data.clone())
                .app_data(doc.clone())
                .app_data(routes.clone())
                .app_data(
                    web::JsonConfig::default()
                        .limit(MAX_BODY_BYTES)
                        .error_handler(|e, _| HttpError(TwinError::Invalid(format!("bad JSON body: {e}"))).into()),
                )
                .app_data(
                    web::QueryConfig::default()
                        .error_handler(|e, _| HttpError(TwinError::Invalid(format!("bad query string: {e}"))).into()),
                )
                .app_data(
                    web::PathConfig::default()
                        .error_handler(|e, _| HttpError(TwinError::Invalid(format!("bad path: {e}"))).into()),
                )
                .route("/healthz", web::get().to(healthz))
                .route("/metrics", web::get().to(metrics))
                .route("/api/v1/openapi.json", web::get().to(openapi))
                .service(api_scope())
                .default_service(web::to(not_found))
                .into_app()
                .wrap(from_fn(authenticate))
                .wrap(from_fn(observe))
        })
        .workers(workers.max(1))
        .disable_signals()
        .shutdown_timeout(5)
        .bind(addr)?;
        let addr = *server.addrs().first().ok_or_else(|| std::io::Error::other("server bound no address"))?;
        let server = server.run();
        let handle = server.handle();
        actix_rt::spawn(server);
        Ok(HttpApi { handle, addr })
    }

    pub fn local_addr(&self) -> SocketAddr {
        self.addr
    }

    /// Stops accepting, lets requests in flight finish, then returns.
    pub async fn stop(&self) {
        self.handle.stop(true).await;
    }
}
