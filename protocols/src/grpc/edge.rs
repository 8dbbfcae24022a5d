//! The tower layer in front of every call: status rewrites of tonic's own errors, and
//! the request metrics.

use super::*;
use twinfleet_runtime::Edge;

/// Every call passes this layer, which does two things:
/// - tonic refuses a message over the size limit itself, before any handler, with
///   OUT_OF_RANGE; gRPC's convention (grpc-go, grpc-java) is RESOURCE_EXHAUSTED. The
///   layer rewrites that answer and counts it as `oversized`. (A client-streaming call
///   meets the same error inside the handler; see `oversized`.)
/// - It counts the call in the request metrics by method path and status code, with the
///   time until the response headers. A call that fails before its response (every unary
///   error) carries its code in those headers; a call whose headers went out is counted
///   `Ok` (a stream that fails later is not seen here). Calls the server does not
///   implement are counted under the route `unimplemented`, so unknown paths cannot
///   grow the number of series.
#[derive(Debug, Clone)]
pub(super) struct EdgeLayer(pub(super) TwinRuntime);

impl<S> tower_layer::Layer<S> for EdgeLayer {
    type Service = EdgeService<S>;
    fn layer(&self, inner: S) -> EdgeService<S> {
        EdgeService { inner, rt: self.0.clone() }
    }
}

#[derive(Debug, Clone)]
pub(super) struct EdgeService<S> {
    inner: S,
    rt: TwinRuntime,
}

const TOO_LARGE: &str = "decoded%20message%20length%20too%20large";
/// How tonic words a protobuf decode error (it answers INTERNAL; it is the client's).
const UNDECODABLE: &str = "failed%20to%20decode%20Protobuf%20message";

impl<S, B, RB> tower_service::Service<tonic::codegen::http::Request<B>> for EdgeService<S>
where
    S: tower_service::Service<tonic::codegen::http::Request<B>, Response = tonic::codegen::http::Response<RB>>,
    S::Future: Send + 'static,
{
    type Response = S::Response;
    type Error = S::Error;
    type Future = Pin<Box<dyn Future<Output = Result<S::Response, S::Error>> + Send>>;

    fn poll_ready(&mut self, cx: &mut std::task::Context<'_>) -> std::task::Poll<Result<(), S::Error>> {
        self.inner.poll_ready(cx)
    }

    fn call(&mut self, req: tonic::codegen::http::Request<B>) -> Self::Future {
        let started = std::time::Instant::now();
        let path = req.uri().path().to_string();
        let call = self.inner.call(req);
        let rt = self.rt.clone();
        Box::pin(async move {
            let mut resp = call.await?;
            let h = resp.headers_mut();
            let too_large = h.get("grpc-status").is_some_and(|s| s == "11")
                && h.get("grpc-message").and_then(|m| m.to_str().ok()).is_some_and(|m| m.contains(TOO_LARGE));
            if too_large {
                h.insert("grpc-status", tonic::codegen::http::HeaderValue::from_static("8"));
                rt.rejections().reject("oversized", || format!("gRPC message over {MAX_MESSAGE_BYTES} bytes"));
            }
            let undecodable = h.get("grpc-status").is_some_and(|s| s == "13")
                && h.get("grpc-message").and_then(|m| m.to_str().ok()).is_some_and(|m| m.contains(UNDECODABLE));
            if undecodable {
                h.insert("grpc-status", tonic::codegen::http::HeaderValue::from_static("3"));
                rt.rejections().reject("malformed", || format!("{path}: the message is not valid protobuf"));
            }
            let code = h
                .get("grpc-status")
                .and_then(|s| s.to_str().ok())
                .and_then(|s| s.parse::<i32>().ok())
                .map_or(tonic::Code::Ok, tonic::Code::from_i32);
            let route = if code == tonic::Code::Unimplemented { "unimplemented" } else { &path };
            rt.requests().record(Edge::Grpc, "POST", route, code_name(code), started.elapsed());
            Ok(resp)
        })
    }
}

/// The status code's name as gRPC's own metrics spell it (`OK`, `INVALID_ARGUMENT`).
fn code_name(code: tonic::Code) -> &'static str {
    use tonic::Code::*;
    match code {
        Ok => "OK",
        Cancelled => "CANCELLED",
        Unknown => "UNKNOWN",
        InvalidArgument => "INVALID_ARGUMENT",
        DeadlineExceeded => "DEADLINE_EXCEEDED",
        NotFound => "NOT_FOUND",
        AlreadyExists => "ALREADY_EXISTS",
        PermissionDenied => "PERMISSION_DENIED",
        ResourceExhausted => "RESOURCE_EXHAUSTED",
        FailedPrecondition => "FAILED_PRECONDITION",
        Aborted => "ABORTED",
        OutOfRange => "OUT_OF_RANGE",
        Unimplemented => "UNIMPLEMENTED",
        Internal => "INTERNAL",
        Unavailable => "UNAVAILABLE",
        DataLoss => "DATA_LOSS",
        Unauthenticated => "UNAUTHENTICATED",
    }
}
