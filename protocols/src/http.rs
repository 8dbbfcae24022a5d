//! The operator HTTP API (actix-web, JSON), under `/api/v1`:
//!
//! | method | path | answer |
//! |---|---|---|
//! | GET | `/healthz` | `{"status":"ok", ...}` while the platform runs |
//! | GET | `/api/v1/actors` | the supervision tree, flattened; `?kind=&parent=&offset=&limit=` |
//! | GET | `/api/v1/twins/{id}` | identity, metadata, reported/desired state, effective configuration, last events (`?events=N`, default 20) |
//! | GET | `/api/v1/twins/{id}/telemetry` | stored points, newest first; `?metric=&from=&to=&limit=` (millis) |
//! | GET | `/api/v1/device-types` | the TDTAs |
//! | GET | `/api/v1/dtas` | the DTAs |
//! | GET | `/api/v1/alerts` | the most recent internal alerts |
//!
//! Every error is JSON `{"error": <code>, "message": <what was wrong>}` with a 4xx or 5xx
//! status chosen from the typed `TwinError`.

use actix_web::{App, HttpResponse, HttpServer, ResponseError, http::StatusCode, web};
use serde::{Deserialize, Serialize};
use serde_json::Value;
use std::net::SocketAddr;
use std::sync::Arc;
use twinfleet_actors::{ActorQuery, TelemetryQuery, TwinError, TwinHandle, TwinRuntime, TwinView};
use twinfleet_models::{DomainModel, Edit, ModelError, PathError, Timestamp, TwinCommand, TwinEvent};

/// Most events a twin view returns.
const MAX_EVENTS: usize = 1_000;

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
        match &self.0 {
            TwinError::NotFound(_) | TwinError::UnknownDeviceType(_) | TwinError::UnknownDta(_) => "not_found",
            TwinError::AlreadyExists { .. } => "already_exists",
            TwinError::Unavailable { .. } | TwinError::Crashed { .. } => "unavailable",
            TwinError::MailboxFull(_) => "mailbox_full",
            TwinError::Timeout { .. } => "timeout",
            TwinError::Quarantined { .. } => "quarantined",
            TwinError::Rejected(ModelError::Violations(_)) => "constraint_violation",
            TwinError::Rejected(ModelError::Component(PathError::NotFound(_))) => "not_found",
            TwinError::Rejected(ModelError::Component(_)) => "invalid",
            TwinError::Rejected(_) | TwinError::Telemetry(_) => "rejected",
            TwinError::InvalidId(_) | TwinError::Invalid(_) => "invalid",
            TwinError::Storage(_) => "storage",
            TwinError::FaultInjectionDisabled => "forbidden",
            TwinError::ShuttingDown => "shutting_down",
            TwinError::DeviceUnreachable { .. } => "device_unreachable",
        }
    }
}

impl ResponseError for HttpError {
    fn status_code(&self) -> StatusCode {
        match &self.0 {
            TwinError::NotFound(_) | TwinError::UnknownDeviceType(_) | TwinError::UnknownDta(_) => {
                StatusCode::NOT_FOUND
            }
            TwinError::AlreadyExists { .. } | TwinError::Quarantined { .. } => StatusCode::CONFLICT,
            TwinError::Unavailable { .. }
            | TwinError::Crashed { .. }
            | TwinError::ShuttingDown
            | TwinError::DeviceUnreachable { .. } => StatusCode::SERVICE_UNAVAILABLE,
            TwinError::MailboxFull(_) => StatusCode::TOO_MANY_REQUESTS,
            TwinError::Timeout { .. } => StatusCode::GATEWAY_TIMEOUT,
            TwinError::Rejected(ModelError::Component(PathError::NotFound(_))) => StatusCode::NOT_FOUND,
            TwinError::Rejected(ModelError::Component(_)) => StatusCode::BAD_REQUEST,
            TwinError::Rejected(_) | TwinError::Telemetry(_) => StatusCode::UNPROCESSABLE_ENTITY,
            TwinError::InvalidId(_) | TwinError::Invalid(_) => StatusCode::BAD_REQUEST,
            TwinError::FaultInjectionDisabled => StatusCode::FORBIDDEN,
            TwinError::Storage(_) => StatusCode::INTERNAL_SERVER_ERROR,
        }
    }

    fn error_response(&self) -> HttpResponse {
        let mut body = serde_json::json!({"error": self.code(), "message": self.0.to_string()});
        if let TwinError::Rejected(ModelError::Violations(v)) = &self.0 {
            body["violations"] = serde_json::to_value(v).unwrap_or_default();
        }
        HttpResponse::build(self.status_code()).json(body)
    }
}

type Result<T> = std::result::Result<T, HttpError>;

/// Largest JSON body accepted (400 beyond, saying so).
const MAX_BODY_BYTES: usize = 256 * 1024;

async fn healthz(rt: web::Data<TwinRuntime>) -> HttpResponse {
    HttpResponse::Ok().json(serde_json::json!({
        "status": "ok",
        "twins": rt.twin_count(),
        "device_types": rt.device_types().len(),
        "dtas": rt.dtas().len(),
    }))
}

async fn actors(rt: web::Data<TwinRuntime>, q: web::Query<ActorQuery>) -> HttpResponse {
    HttpResponse::Ok().json(rt.actors(&q))
}

#[derive(Debug, Deserialize)]
struct TwinQuery {
    events: Option<usize>,
}

#[derive(Debug, Serialize)]
struct TwinDetail {
    #[serde(flatten)]
    view: TwinView,
    actor: twinfleet_runtime::ActorView,
    last_events: Vec<TwinEvent>,
}

async fn twin(rt: web::Data<TwinRuntime>, id: web::Path<String>, q: web::Query<TwinQuery>) -> Result<HttpResponse> {
    let h = rt.twin(&id)?;
    let view = h.get().await?;
    let last_events = h.events(q.events.unwrap_or(20).min(MAX_EVENTS)).await?;
    Ok(HttpResponse::Ok().json(TwinDetail { view, actor: h.actor(), last_events }))
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct TelemetryParams {
    metric: Option<String>,
    /// Milliseconds since the epoch; default: 0.
    from: Option<i64>,
    /// Milliseconds since the epoch; default: now and later.
    to: Option<i64>,
    /// Default 1,000, at most 100,000.
    limit: Option<usize>,
}

async fn telemetry(
    rt: web::Data<TwinRuntime>,
    id: web::Path<String>,
    q: web::Query<TelemetryParams>,
) -> Result<HttpResponse> {
    let h = rt.twin(&id)?;
    let q = q.into_inner();
    let query = TelemetryQuery {
        metric: q.metric,
        from: Timestamp(q.from.unwrap_or(0)),
        to: Timestamp(q.to.unwrap_or(i64::MAX)),
        limit: q.limit.unwrap_or(1_000).min(100_000),
    };
    let points = h.telemetry_query(query).await?;
    Ok(HttpResponse::Ok().json(serde_json::json!({ "twin": h.id(), "points": points })))
}

/// The twin's handle and its type's domain model (404 when the type has none).
fn with_domain(rt: &TwinRuntime, id: &str) -> Result<(TwinHandle, Arc<DomainModel>)> {
    let h = rt.twin(id)?;
    let domain = rt.device_type(h.device_type().as_str())?.domain().ok_or_else(|| {
        TwinError::Rejected(ModelError::Component(PathError::NotFound(format!(
            "components: device type {} has no domain model",
            h.device_type()
        ))))
    })?;
    Ok((h, domain))
}

/// `GET /api/v1/twins/{id}/components[/{path}]`: the twin's components (its desired
/// `components` document) at `path`.
async fn get_component(rt: web::Data<TwinRuntime>, p: web::Path<(String, String)>) -> Result<HttpResponse> {
    let (id, path) = p.into_inner();
    let (h, _) = with_domain(&rt, &id)?;
    let view = h.get().await?;
    let doc = view.state.desired.get("components").cloned().unwrap_or_else(|| Value::Object(Default::default()));
    let v = twinfleet_models::domain::get_path(&doc, &path).map_err(|e| TwinError::Rejected(e.into()))?;
    Ok(HttpResponse::Ok().json(v))
}

async fn edit_component(
    rt: web::Data<TwinRuntime>,
    id: String,
    path: String,
    edit: Edit,
    created: bool,
) -> Result<HttpResponse> {
    let (h, model) = with_domain(&rt, &id)?;
    let seq = h.command(TwinCommand::EditComponents { model, path: path.clone(), edit }).await?;
    let status = if created { StatusCode::CREATED } else { StatusCode::OK };
    Ok(HttpResponse::build(status).json(serde_json::json!({"twin": h.id(), "path": path, "seq": seq})))
}

/// `PUT`: replace (or create) the component or property at `path`.
async fn put_component(
    rt: web::Data<TwinRuntime>,
    p: web::Path<(String, String)>,
    body: web::Json<Value>,
) -> Result<HttpResponse> {
    let (id, path) = p.into_inner();
    edit_component(rt, id, path, Edit::Put(body.into_inner()), false).await
}

/// `POST`: append an element to the list at `path` (e.g. a medication plan).
async fn post_component(
    rt: web::Data<TwinRuntime>,
    p: web::Path<(String, String)>,
    body: web::Json<Value>,
) -> Result<HttpResponse> {
    let (id, path) = p.into_inner();
    edit_component(rt, id, path, Edit::Append(body.into_inner()), true).await
}

/// `DELETE`: remove the component or list element at `path`.
async fn delete_component(rt: web::Data<TwinRuntime>, p: web::Path<(String, String)>) -> Result<HttpResponse> {
    let (id, path) = p.into_inner();
    edit_component(rt, id, path, Edit::Delete, false).await
}

async fn get_components(rt: web::Data<TwinRuntime>, id: web::Path<String>) -> Result<HttpResponse> {
    get_component(rt, web::Path::from((id.into_inner(), String::new()))).await
}

async fn device_types(rt: web::Data<TwinRuntime>) -> HttpResponse {
    HttpResponse::Ok().json(rt.device_types())
}

async fn dtas(rt: web::Data<TwinRuntime>) -> HttpResponse {
    HttpResponse::Ok().json(rt.dtas())
}

async fn alerts(rt: web::Data<TwinRuntime>) -> HttpResponse {
    HttpResponse::Ok().json(rt.alerts().recent())
}

/// Prometheus text exposition: rejected inputs by reason, twins, storage. (The operator
/// issue adds actors, mailboxes and request latencies.)
async fn metrics(rt: web::Data<TwinRuntime>) -> HttpResponse {
    use std::fmt::Write;
    let mut out = String::new();
    let mut family = |name: &str, kind: &str, help: &str, samples: &[(String, u64)]| {
        let _ = writeln!(out, "# HELP {name} {help}\n# TYPE {name} {kind}");
        for (labels, v) in samples {
            let _ = writeln!(out, "{name}{labels} {v}");
        }
    };
    let mut rejected = rt.env().rejections.snapshot();
    rejected.sort();
    let rejected: Vec<(String, u64)> = rejected.into_iter().map(|(r, n)| (format!("{{reason=\"{r}\"}}"), n)).collect();
    family("twinfleet_rejected_total", "counter", "Inputs rejected at the edges (MQTT, gRPC), by reason.", &rejected);
    family("twinfleet_twins", "gauge", "Twins (DTIs) on this node.", &[(String::new(), rt.twin_count() as u64)]);
    let s = rt.env().storage.stats();
    family(
        "twinfleet_storage_batches_total",
        "counter",
        "Write batches submitted.",
        &[(String::new(), s.batches_submitted)],
    );
    family(
        "twinfleet_storage_commits_total",
        "counter",
        "Group commits (flushes).",
        &[(String::new(), s.groups_committed)],
    );
    family(
        "twinfleet_storage_ops_total",
        "counter",
        "Records written or deleted.",
        &[(String::new(), s.ops_committed)],
    );
    family(
        "twinfleet_storage_flush_microseconds_total",
        "counter",
        "Time spent flushing.",
        &[(String::new(), s.flush_micros_total)],
    );
    HttpResponse::Ok().content_type("text/plain; version=0.0.4").body(out)
}

async fn not_found() -> HttpResponse {
    HttpResponse::NotFound().json(serde_json::json!({"error": "not_found", "message": "no such endpoint"}))
}

/// Routes of the API, for the server and for in-process tests.
pub fn configure(cfg: &mut web::ServiceConfig) {
    cfg.route("/healthz", web::get().to(healthz)).route("/metrics", web::get().to(metrics)).service(
        web::scope("/api/v1")
            .route("/actors", web::get().to(actors))
            .route("/twins/{id}", web::get().to(twin))
            .route("/twins/{id}/telemetry", web::get().to(telemetry))
            .route("/twins/{id}/components", web::get().to(get_components))
            .route("/twins/{id}/components/{path:.*}", web::get().to(get_component))
            .route("/twins/{id}/components/{path:.*}", web::put().to(put_component))
            .route("/twins/{id}/components/{path:.*}", web::post().to(post_component))
            .route("/twins/{id}/components/{path:.*}", web::delete().to(delete_component))
            .route("/device-types", web::get().to(device_types))
            .route("/dtas", web::get().to(dtas))
            .route("/alerts", web::get().to(alerts)),
    );
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
        let server = HttpServer::new(move || {
            App::new()
                .app_data(data.clone())
                .app_data(
                    web::JsonConfig::default()
                        .limit(MAX_BODY_BYTES)
                        .error_handler(|e, _| HttpError(TwinError::Invalid(format!("bad JSON body: {e}"))).into()),
                )
                .app_data(
                    web::QueryConfig::default()
                        .error_handler(|e, _| HttpError(TwinError::Invalid(format!("bad query string: {e}"))).into()),
                )
                .configure(configure)
                .default_service(web::to(not_found))
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
