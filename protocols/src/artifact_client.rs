//! The device side of an install: downloads the artifact an `install_app` command names
//! (`/api/v1/artifacts/{sha256}`) with the device's own credentials, resuming a broken
//! download with a range request, and checks the whole file against the SHA-256 its URL
//! ends in. A file that does not match is deleted and reported as such: a corrupt
//! artifact is a failed install, not something to download forever.

use sha2::Digest;
use std::io::{Read, Write};
use std::path::Path;
use std::time::Duration;

/// Why a download did not give the artifact.
#[derive(Debug, thiserror::Error)]
pub enum FetchError {
    #[error("the artifact URL {0:?} does not end in a SHA-256")]
    BadUrl(String),
    #[error("the server answered {status}: {body}")]
    Status { status: u16, body: String },
    #[error("the download failed: {0}")]
    Transport(String),
    #[error("{0}")]
    Io(#[from] std::io::Error),
    /// The bytes do not hash to the artifact's SHA-256: deleted, not to be retried.
    #[error("checksum mismatch: expected SHA-256 {expected}, got {got}")]
    ChecksumMismatch { expected: String, got: String },
}

/// Downloads `artifact_url` (relative to `base`, e.g. `http://127.0.0.1:8080`) into
/// `dest` as device `device_id` with `token`. Bytes already in `dest` (an earlier,
/// broken download) are kept and the rest is asked for with `Range`. `progress` is told
/// (bytes so far, total) after each chunk. Returns the file's size once its SHA-256 is
/// the one the URL names.
pub fn fetch_artifact(
    base: &str,
    device_id: &str,
    token: &str,
    artifact_url: &str,
    dest: &Path,
    mut progress: impl FnMut(u64, u64),
) -> Result<u64, FetchError> {
    let expected = artifact_url.rsplit('/').next().unwrap_or_default().to_ascii_lowercase();
    if expected.len() != 64 || !expected.bytes().all(|b| b.is_ascii_hexdigit()) {
        return Err(FetchError::BadUrl(artifact_url.into()));
    }
    let have = std::fs::metadata(dest).map(|m| m.len()).unwrap_or(0);
    let agent: ureq::Agent = ureq::Agent::config_builder()
        .http_status_as_error(false)
        .timeout_global(Some(Duration::from_secs(600)))
        .build()
        .into();
    let mut req = agent
        .get(format!("{}{artifact_url}", base.trim_end_matches('/')))
        .header("x-device-id", device_id)
        .header("authorization", &format!("Bearer {token}"));
    if have > 0 {
        req = req.header("range", &format!("bytes={have}-"));
    }
    let mut res = req.call().map_err(|e| FetchError::Transport(e.to_string()))?;
    let status = res.status().as_u16();
    let (mut file, mut done, total) = match status {
        200 => {
            let total = res.body().content_length().unwrap_or(0);
            (std::fs::File::create(dest)?, 0, total)
        }
        206 => {
            let total = res
                .headers()
                .get("content-range")
                .and_then(|v| v.to_str().ok())
                .and_then(|v| v.rsplit('/').next())
                .and_then(|v| v.parse().ok())
                .unwrap_or(0);
            (std::fs::OpenOptions::new().append(true).open(dest)?, have, total)
        }
        // Asked past the end: what is there may be the whole file; the check decides.
        416 if have > 0 => (std::fs::OpenOptions::new().append(true).open(dest)?, have, have),
        _ => {
            let body = res.body_mut().read_to_string().unwrap_or_default();
            return Err(FetchError::Status { status, body: body.chars().take(300).collect() });
        }
    };
    let mut reader = res.body_mut().as_reader();
    let mut buf = vec![0; 64 * 1024];
    loop {
        let n = reader.read(&mut buf).map_err(|e| FetchError::Transport(e.to_string()))?;
        if n == 0 {
            break;
        }
        file.write_all(&buf[..n])?;
        done += n as u64;
        progress(done, total);
    }
    file.sync_all()?;
    drop(file);
    let mut hasher = sha2::Sha256::new();
    std::io::copy(&mut std::fs::File::open(dest)?, &mut hasher)?;
    let got: String = hasher.finalize().iter().map(|b| format!("{b:02x}")).collect();
    if got != expected {
        std::fs::remove_file(dest)?;
        return Err(FetchError::ChecksumMismatch { expected, got });
    }
    Ok(std::fs::metadata(dest)?.len())
}
