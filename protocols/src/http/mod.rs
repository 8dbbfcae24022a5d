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
mod apps;
mod auth;
mod error;
mod fleet;
mod monitoring;
mod ops;
mod provisioning;
mod rollouts;
mod twins;

pub(crate) use auth::Caller;
use auth::{authenticate, observe};
pub use error::HttpError;
pub(crate) use error::{ErrorBody, Errors};
use ops::{healthz, metrics};

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

type Result<T> = std::result::Result<T, HttpError>;

/// Largest JSON body accepted (400 beyond, saying so).
const MAX_BODY_BYTES: usize = 256 * 1024;

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
#[openapi(modifiers(&Document), components(schemas(ErrorBody, twinfleet_actors::LifecycleFilter)))]
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
    utoipa_actix_web::scope("/api/v1")
        .configure(twins::routes)
        .configure(fleet::routes)
        .configure(admin::routes)
        .configure(provisioning::routes)
        .configure(monitoring::routes)
        .configure(apps::routes)
        .configure(rollouts::routes)
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
        .backlog(crate::listen::ACCEPT_BACKLOG)
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
