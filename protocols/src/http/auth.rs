//! Authentication, authorization context and audit of every `/api/v1` request, and the
//! request metrics: the middleware and the `Caller` extractor.

use super::*;

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
pub(super) async fn observe(
    req: ServiceRequest,
    next: Next<impl MessageBody + 'static>,
) -> std::result::Result<ServiceResponse<impl MessageBody>, actix_web::Error> {
    let started = std::time::Instant::now();
    let method = method_name(req.method());
    let requests = req.app_data::<web::Data<TwinRuntime>>().map(|rt| rt.requests().clone());
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
pub(super) async fn authenticate(
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
    // A device downloads its artifacts with its own credentials.
    let device = req.headers().get("x-device-id").and_then(|v| v.to_str().ok()).map(str::to_string);
    if let Some(device) = device
        && req.method() == actix_web::http::Method::GET
        && percent_decode(req.match_info().as_str()).starts_with("/api/v1/artifacts/")
    {
        return match rt.authenticate_device(&device, token.unwrap_or_default()) {
            Ok(_) => {
                req.extensions_mut().insert(super::apps::DeviceCaller(device));
                next.call(req).await.map(ServiceResponse::map_into_boxed_body)
            }
            Err(e) => {
                let e = TwinError::Unauthenticated(format!("device {device:?}: {e}"));
                Ok(req.into_response(HttpError(e).error_response()))
            }
        };
    }
    let principal = match token {
        None => Err(TwinError::Unauthenticated("send Authorization: Bearer <API token>".into())),
        Some(t) => rt.access().authenticate(t),
    };
    let principal = match principal {
        Ok(p) => p,
        Err(e) => {
            rt.rejections().reject(if token.is_some() { "bad_api_token" } else { "no_api_token" }, || {
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
    let id = match rt.access().next_audit_id() {
        Ok(id) => id,
        Err(e) => return Ok(req.into_response(HttpError(e).error_response())),
    };
    let entry = AuditEntry {
        id,
        at: rt.now(),
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
    if let Err(e) = rt.access().audit(AuditEntry { status, ..entry }).await {
        // The change itself is durable; say that its audit record is missing.
        tracing::error!("could not write an audit record: {e}");
        return Ok(res.into_response(HttpError(e).error_response()));
    }
    Ok(res)
}
