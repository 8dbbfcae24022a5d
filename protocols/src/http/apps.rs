//! The app store: app versions with their compatibility metadata, artifact upload (a
//! declared SHA-256, a size limit, nothing kept on a mismatch) and download (range
//! requests, so a device resumes a broken download), and installs on a twin's device
//! after the compatibility check.

use super::twins::twin_for;
use super::{Caller, Errors, HttpError, Result};
use actix_web::{HttpMessage, HttpRequest, HttpResponse, get, post, put, web};
use futures::StreamExt;
use serde::Deserialize;
use std::io::{Read, Seek, SeekFrom};
use twinfleet_actors::{TwinError, TwinRuntime};
use twinfleet_models::Action;
use twinfleet_models::apps::{AppVersion, Artifact};

/// Bytes a download response sends per chunk.
const CHUNK: usize = 64 * 1024;

pub(super) fn routes(cfg: &mut utoipa_actix_web::service_config::ServiceConfig) {
    cfg.service(list_apps)
        .service(register_app)
        .service(show_app)
        .service(upload_artifact)
        .service(download_artifact)
        .service(install_app)
        .service(install_action);
}

/// A device presenting its own credentials (`x-device-id` and its token) on an artifact
/// download, put in the request's extensions by the authentication middleware.
#[derive(Debug, Clone)]
pub(crate) struct DeviceCaller(#[allow(dead_code)] pub String);

/// `GET /apps`: every app version, with its artifacts.
#[utoipa::path(tag = "apps", responses((status = 200, body = Vec<AppVersion>), Errors), security(("bearer" = [])))]
#[get("/apps")]
async fn list_apps(rt: web::Data<TwinRuntime>, _: Caller) -> Result<HttpResponse> {
    let rt = rt.get_ref().clone();
    let v = web::block(move || rt.apps().list()).await.map_err(|e| HttpError(TwinError::Invalid(e.to_string())))??;
    Ok(HttpResponse::Ok().json(v))
}

/// `POST /apps`: registers an app version (`app`, semver `version`, `requires`: `os`,
/// `os_version` range, `arch`, `capabilities`, `peripherals`, `min_memory_mb`,
/// `min_storage_mb`, `depends`). Its artifacts come by upload. Needs `configure`.
#[utoipa::path(tag = "apps", request_body = AppVersion, responses((status = 201, body = AppVersion), Errors), security(("bearer" = [])))]
#[post("/apps")]
async fn register_app(rt: web::Data<TwinRuntime>, caller: Caller, body: web::Json<AppVersion>) -> Result<HttpResponse> {
    rt.authorize(&caller.0, Action::Configure)?;
    let rt = rt.get_ref().clone();
    let v = web::block(move || rt.apps().register(body.into_inner()))
        .await
        .map_err(|e| HttpError(TwinError::Invalid(e.to_string())))??;
    Ok(HttpResponse::Created().json(v))
}

/// `GET /apps/{app}/{version}`.
#[utoipa::path(tag = "apps", responses((status = 200, body = AppVersion), Errors), security(("bearer" = [])))]
#[get("/apps/{app}/{version}")]
async fn show_app(rt: web::Data<TwinRuntime>, _: Caller, path: web::Path<(String, String)>) -> Result<HttpResponse> {
    let (app, version) = path.into_inner();
    Ok(HttpResponse::Ok().json(rt.apps().get(&app, &version)?))
}

/// `PUT /apps/{app}/{version}/artifacts/{os}/{arch}`: the artifact's bytes as the body,
/// with its SHA-256 in `X-Checksum-Sha256` (hex). A body over the configured limit is
/// refused with 413 as soon as it passes it; a checksum or `Content-Length` that does not
/// match is refused with 400. Either way nothing is kept. Needs `configure`.
#[utoipa::path(tag = "apps", request_body(content = Vec<u8>, content_type = "application/octet-stream"), responses((status = 201, body = Artifact), (status = 413, description = "over the artifact size limit"), Errors), security(("bearer" = [])))]
#[put("/apps/{app}/{version}/artifacts/{os}/{arch}")]
async fn upload_artifact(
    rt: web::Data<TwinRuntime>,
    caller: Caller,
    req: HttpRequest,
    path: web::Path<(String, String, String, String)>,
    mut body: web::Payload,
) -> Result<HttpResponse> {
    rt.authorize(&caller.0, Action::Configure)?;
    let (app, version, os, arch) = path.into_inner();
    rt.apps().get(&app, &version)?;
    let header = |name: &str| req.headers().get(name).and_then(|v| v.to_str().ok()).map(str::trim);
    let Some(declared) = header("x-checksum-sha256").map(String::from) else {
        return Err(HttpError(TwinError::Invalid("send the artifact's SHA-256 (hex) in X-Checksum-Sha256".into())));
    };
    let declared_size = header("content-length").and_then(|v| v.parse::<u64>().ok());
    if declared_size.is_some_and(|n| n > rt.apps().max_artifact_bytes()) {
        return Err(HttpError(TwinError::TooLarge(format!(
            "the artifact is larger than the limit of {} bytes",
            rt.apps().max_artifact_bytes()
        ))));
    }
    let mut up = rt.apps().begin()?;
    while let Some(chunk) = body.next().await {
        let chunk = chunk.map_err(|e| HttpError(TwinError::Invalid(format!("the upload broke off: {e}"))))?;
        up.write(&chunk)?;
    }
    let rt = rt.get_ref().clone();
    let declared = twinfleet_actors::apps::Declared { app, version, os, arch, sha256: declared, size: declared_size };
    let artifact = web::block(move || rt.apps().finish(up, &declared))
        .await
        .map_err(|e| HttpError(TwinError::Invalid(e.to_string())))??;
    Ok(HttpResponse::Created().json(artifact))
}

/// A `Range: bytes=...` header against a file of `size` bytes: the first and last byte,
/// `None` for the whole file (no header, or several ranges), `Err` when unsatisfiable.
fn range(header: Option<&str>, size: u64) -> std::result::Result<Option<(u64, u64)>, ()> {
    let Some(spec) = header.and_then(|h| h.trim().strip_prefix("bytes=")) else { return Ok(None) };
    if spec.contains(',') {
        return Ok(None);
    }
    let (a, b) = spec.split_once('-').ok_or(())?;
    let (a, b) = (a.trim(), b.trim());
    let (start, end) = match (a.parse::<u64>(), b.parse::<u64>()) {
        (Ok(s), Ok(e)) if s <= e => (s, e.min(size.saturating_sub(1))),
        (Ok(s), Err(_)) if b.is_empty() => (s, size.saturating_sub(1)),
        (Err(_), Ok(n)) if a.is_empty() && n > 0 => (size.saturating_sub(n), size.saturating_sub(1)),
        _ => return Err(()),
    };
    if size == 0 || start >= size { Err(()) } else { Ok(Some((start, end))) }
}

/// `GET /artifacts/{sha256}`: an artifact's bytes, for an operator token or for a device
/// with its own credentials (`x-device-id` and `Authorization: Bearer <device token>`).
/// Range requests (`Range: bytes=start-end`, one range) answer 206, so a device resumes
/// a broken download; the `ETag` is the SHA-256, which the device checks the whole file
/// against.
#[utoipa::path(tag = "apps", responses((status = 200, description = "the artifact", content_type = "application/octet-stream", body = Vec<u8>), (status = 206, description = "the requested range"), (status = 416, description = "a range outside the file"), Errors), security(("bearer" = [])))]
#[get("/artifacts/{sha256}")]
async fn download_artifact(
    rt: web::Data<TwinRuntime>,
    req: HttpRequest,
    sha256: web::Path<String>,
) -> Result<HttpResponse> {
    {
        let ext = req.extensions();
        if ext.get::<twinfleet_actors::Principal>().is_none() && ext.get::<DeviceCaller>().is_none() {
            return Err(HttpError(TwinError::Unauthenticated("no API token or device credentials".into())));
        }
    }
    let Some(path) = rt.apps().artifact(&sha256) else {
        return Err(HttpError(TwinError::Unknown { kind: "artifact", id: sha256.chars().take(64).collect() }));
    };
    let mut file = std::fs::File::open(&path)
        .map_err(|e| HttpError(TwinError::Invalid(format!("the artifact cannot be read: {e}"))))?;
    let size = file.metadata().map(|m| m.len()).unwrap_or(0);
    let etag = ("etag", format!("\"{}\"", sha256.to_ascii_lowercase()));
    let header = req.headers().get("range").and_then(|v| v.to_str().ok());
    let (mut res, start, len) = match range(header, size) {
        Err(()) => {
            return Ok(HttpResponse::RangeNotSatisfiable()
                .insert_header(("content-range", format!("bytes */{size}")))
                .insert_header(("accept-ranges", "bytes"))
                .finish());
        }
        Ok(None) => (HttpResponse::Ok(), 0, size),
        Ok(Some((s, e))) => {
            let mut r = HttpResponse::PartialContent();
            r.insert_header(("content-range", format!("bytes {s}-{e}/{size}")));
            (r, s, e - s + 1)
        }
    };
    file.seek(SeekFrom::Start(start)).map_err(|e| HttpError(TwinError::Invalid(format!("seek: {e}"))))?;
    // One chunk at a time off the blocking pool; after a read error the stream ends
    // (the client sees a short body against its Content-Length).
    let stream = futures::stream::unfold((Some(file), len), |(file, left)| async move {
        let mut file = file?;
        if left == 0 {
            return None;
        }
        let n = left.min(CHUNK as u64) as usize;
        let read = web::block(move || {
            let mut buf = vec![0; n];
            file.read_exact(&mut buf).map(|()| (buf, file))
        })
        .await
        .ok()?;
        Some(match read {
            Ok((buf, file)) => (Ok::<_, std::io::Error>(web::Bytes::from(buf)), (Some(file), left - n as u64)),
            Err(e) => (Err(e), (None, 0)),
        })
    });
    Ok(res
        .insert_header(("accept-ranges", "bytes"))
        .insert_header(etag)
        .content_type("application/octet-stream")
        .body(actix_web::body::SizedStream::new(len, stream)))
}

/// An install request.
#[derive(Debug, Deserialize, utoipa::ToSchema)]
#[serde(deny_unknown_fields)]
struct InstallRequest {
    app: String,
    version: String,
}

/// `POST /twins/{id}/installs`: installs an app version on the twin's device. Its
/// requirements are checked against what the twin knows of the device first: an
/// incompatible app answers 422 `incompatible` with every reason in `reasons`, and no
/// command is sent. Otherwise the twin runs the install and the answer (202) is the
/// install as it stands: `awaiting_approval` (the app version or the twin's
/// configuration `install_approval` asks for it), `awaiting_window` (until `opens`, from
/// the twin's `maintenance_window`), or `installing` (the device got `install_app` with
/// the artifact's URL, `/api/v1/artifacts/{sha256}`). One install per twin at a time
/// (409 `install_conflict`).
#[utoipa::path(tag = "apps", request_body = InstallRequest, responses((status = 202, body = twinfleet_models::install::InstallJob), Errors), security(("bearer" = [])))]
#[post("/twins/{id}/installs")]
async fn install_app(
    rt: web::Data<TwinRuntime>,
    caller: Caller,
    id: web::Path<String>,
    body: web::Json<InstallRequest>,
) -> Result<HttpResponse> {
    let h = twin_for(&rt, &caller, &id, Action::Manage)?;
    let InstallRequest { app, version } = body.into_inner();
    let job = rt.install(h.id().as_str(), &app, &version, None).await?;
    Ok(HttpResponse::Accepted().json(job))
}

/// `POST /twins/{id}/installs/{app}/{action}`:
/// - `approve`: the twin's install of `app` that awaits approval goes on to its
///   maintenance window or the device (200);
/// - `rollback`: installs the version the twin's last (successful) install of `app`
///   replaced, through the same steps as any install (202; 409 when there is none);
/// - `uninstall`: removes an app the twin's inventory holds (`uninstall_app` to the
///   device, through approval, window and watchdog like an install; 202; 409 when it is
///   not installed).
#[utoipa::path(tag = "apps", responses((status = 200, body = twinfleet_models::install::InstallJob), (status = 202, body = twinfleet_models::install::InstallJob), Errors), security(("bearer" = [])))]
#[post("/twins/{id}/installs/{app}/{action}")]
async fn install_action(
    rt: web::Data<TwinRuntime>,
    caller: Caller,
    path: web::Path<(String, String, String)>,
) -> Result<HttpResponse> {
    let (id, app, action) = path.into_inner();
    let h = twin_for(&rt, &caller, &id, Action::Manage)?;
    let twin = h.id().as_str();
    Ok(match action.as_str() {
        "approve" => HttpResponse::Ok().json(rt.approve_install(twin, &app).await?),
        "rollback" => HttpResponse::Accepted().json(rt.rollback_install(twin, &app).await?),
        "uninstall" => HttpResponse::Accepted().json(rt.uninstall(twin, &app).await?),
        other => {
            return Err(HttpError(TwinError::Invalid(format!(
                "{other:?} is not an install action: approve, rollback or uninstall"
            ))));
        }
    })
}

#[cfg(test)]
mod tests {
    #[test]
    fn ranges_are_read_as_rfc_9110_says() {
        use super::range;
        assert_eq!(range(None, 10), Ok(None));
        assert_eq!(range(Some("bytes=2-5"), 10), Ok(Some((2, 5))));
        assert_eq!(range(Some("bytes=4-"), 10), Ok(Some((4, 9))));
        assert_eq!(range(Some("bytes=-3"), 10), Ok(Some((7, 9))));
        assert_eq!(range(Some("bytes=5-100"), 10), Ok(Some((5, 9))));
        assert_eq!(range(Some("bytes=0-1,4-5"), 10), Ok(None), "several ranges: the whole file");
        assert_eq!(range(Some("bytes=10-"), 10), Err(()));
        assert_eq!(range(Some("bytes=x"), 10), Err(()));
    }
}
