//! The app store and artifact repository (`twinfleet_models::apps`): app versions with
//! their compatibility metadata in `APP`, and their artifacts as files in the data
//! directory's `artifacts/`, named by their SHA-256 (content-addressed: the same bytes
//! uploaded twice are stored once).
//!
//! An upload streams into a temporary file while it is hashed and counted; past the
//! size limit it stops at once, and a checksum (or size) that does not match what the
//! uploader declared discards it. Only a whole, verified file is renamed into place and
//! only then is the version's record changed, so a failed or refused upload keeps
//! nothing.

use crate::TwinError;
use crate::spaces;
use sha2::Digest;
use std::io::Write;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use twinfleet_models::apps::{AppVersion, Artifact};
use twinfleet_runtime::{Storage, WriteBatch, decode_record, encode_record};

/// The largest artifact accepted when the settings give none: 256 MiB.
pub const DEFAULT_MAX_ARTIFACT_BYTES: u64 = 256 << 20;

/// App versions and their artifacts.
#[derive(Debug)]
pub struct AppStore {
    storage: Arc<dyn Storage>,
    dir: PathBuf,
    max_bytes: u64,
    /// One registration or artifact change at a time (read-modify-write of a record).
    edit: parking_lot::Mutex<()>,
}

fn key(app: &str, version: &str) -> Vec<u8> {
    let mut k = app.as_bytes().to_vec();
    k.push(0);
    k.extend_from_slice(version.as_bytes());
    k
}

/// What an upload is for, and what its uploader declares of it.
#[derive(Debug, Clone)]
pub struct Declared {
    pub app: String,
    pub version: String,
    pub os: String,
    pub arch: String,
    /// Hex SHA-256 the bytes must hash to.
    pub sha256: String,
    /// The size the bytes must have, if declared (`Content-Length`).
    pub size: Option<u64>,
}

/// An upload in progress: bytes go to a temporary file and into the hash.
#[derive(Debug)]
pub struct Upload {
    file: std::fs::File,
    tmp: PathBuf,
    hasher: sha2::Sha256,
    size: u64,
    max: u64,
    done: bool,
}

impl Drop for Upload {
    fn drop(&mut self) {
        if !self.done {
            let _ = std::fs::remove_file(&self.tmp);
        }
    }
}

impl Upload {
    /// Appends a chunk; refused (and the upload dropped) past the size limit.
    pub fn write(&mut self, chunk: &[u8]) -> Result<(), TwinError> {
        self.size += chunk.len() as u64;
        if self.size > self.max {
            return Err(TwinError::TooLarge(format!("the artifact is larger than the limit of {} bytes", self.max)));
        }
        self.hasher.update(chunk);
        self.file.write_all(chunk).map_err(|e| TwinError::Invalid(format!("the artifact cannot be written: {e}")))
    }
}

impl AppStore {
    /// The store over `storage`, its artifact files in `dir` (created when needed).
    pub fn open(storage: Arc<dyn Storage>, dir: PathBuf, max_bytes: u64) -> AppStore {
        AppStore { storage, dir, max_bytes, edit: parking_lot::Mutex::new(()) }
    }

    /// The largest artifact accepted, in bytes.
    pub fn max_artifact_bytes(&self) -> u64 {
        self.max_bytes
    }

    /// Registers a new app version (checked; its artifacts come by upload).
    pub fn register(&self, mut v: AppVersion) -> Result<AppVersion, TwinError> {
        v.validate().map_err(TwinError::Invalid)?;
        v.artifacts.clear();
        let _one = self.edit.lock();
        let k = key(&v.app, &v.version);
        if self.storage.get(spaces::APP, &k)?.is_some() {
            return Err(TwinError::AlreadyExists { kind: "app version", id: format!("{} {}", v.app, v.version) });
        }
        let mut b = WriteBatch::new();
        b.put(spaces::APP, k, encode_record(&v));
        futures::executor::block_on(self.storage.submit(b))?;
        Ok(v)
    }

    /// One app version.
    pub fn get(&self, app: &str, version: &str) -> Result<AppVersion, TwinError> {
        let raw = self
            .storage
            .get(spaces::APP, &key(app, version))?
            .ok_or_else(|| TwinError::Unknown { kind: "app version", id: format!("{app} {version}") })?;
        decode_record(&raw).map_err(|e| TwinError::Invalid(format!("app {app} {version} does not decode: {e}")))
    }

    /// Every app version, by app then version (in semver order).
    pub fn list(&self) -> Result<Vec<AppVersion>, TwinError> {
        let mut v: Vec<AppVersion> = Vec::new();
        for r in self.storage.scan(spaces::APP, b"") {
            let (_, raw) = r?;
            v.push(decode_record(&raw).map_err(|e| TwinError::Invalid(format!("a stored app does not decode: {e}")))?);
        }
        v.sort_by(|a, b| {
            let ver = |s: &str| semver::Version::parse(s).ok();
            (&a.app, ver(&a.version)).cmp(&(&b.app, ver(&b.version)))
        });
        Ok(v)
    }

    /// Starts an upload of an artifact (to [`Self::finish`]).
    pub fn begin(&self) -> Result<Upload, TwinError> {
        let tmp_dir = self.dir.join("tmp");
        std::fs::create_dir_all(&tmp_dir)
            .map_err(|e| TwinError::Invalid(format!("the artifact directory cannot be made: {e}")))?;
        let tmp = tmp_dir.join(format!("upload-{}", self.storage.generate_id()?));
        let file = std::fs::File::create(&tmp)
            .map_err(|e| TwinError::Invalid(format!("the artifact cannot be written: {e}")))?;
        Ok(Upload { file, tmp, hasher: sha2::Sha256::new(), size: 0, max: self.max_bytes, done: false })
    }

    /// Ends an upload of `app` `version`'s artifact for `os`/`arch`: checks the declared
    /// SHA-256 (and size, if given), stores the file under its hash, and records the
    /// artifact (replacing one of the same OS and architecture).
    pub fn finish(&self, mut up: Upload, declared: &Declared) -> Result<Artifact, TwinError> {
        let Declared { app, version, os, arch, sha256: declared_sha256, size: declared_size } = declared;
        let (app, version, os, arch) = (app.as_str(), version.as_str(), os.as_str(), arch.as_str());
        self.get(app, version)?;
        let sha256 = hex(&std::mem::take(&mut up.hasher).finalize());
        if !declared_sha256.eq_ignore_ascii_case(&sha256) {
            return Err(TwinError::Invalid(format!(
                "the artifact's SHA-256 is {sha256}, not the declared {declared_sha256}: nothing was kept"
            )));
        }
        if let Some(n) = *declared_size
            && n != up.size
        {
            return Err(TwinError::Invalid(format!(
                "the artifact has {} bytes, not the declared {n}: nothing was kept",
                up.size
            )));
        }
        let ok = |what: &str, s: &str| {
            if s.is_empty() || s.len() > 64 || !s.bytes().all(|b| b.is_ascii_alphanumeric() || b"._-".contains(&b)) {
                Err(TwinError::Invalid(format!("{what} {s:?}: 1 to 64 letters, digits, '.', '_' or '-'")))
            } else {
                Ok(())
            }
        };
        ok("os", os)?;
        ok("arch", arch)?;
        up.file.sync_all().map_err(|e| TwinError::Invalid(format!("the artifact cannot be written: {e}")))?;
        let path = self.path(&sha256);
        std::fs::rename(&up.tmp, &path)
            .map_err(|e| TwinError::Invalid(format!("the artifact cannot be stored: {e}")))?;
        up.done = true;
        let artifact = Artifact { os: os.into(), arch: arch.into(), sha256, size: up.size };
        let _one = self.edit.lock();
        // Read again under the lock: another artifact of the version may have landed.
        let mut v = self.get(app, version)?;
        v.artifacts.retain(|a| !(a.os == os && a.arch == arch));
        v.artifacts.push(artifact.clone());
        v.artifacts.sort_by(|a, b| (&a.os, &a.arch).cmp(&(&b.os, &b.arch)));
        let mut b = WriteBatch::new();
        b.put(spaces::APP, key(app, version), encode_record(&v));
        futures::executor::block_on(self.storage.submit(b))?;
        Ok(artifact)
    }

    /// Where the artifact with `sha256` is stored, if it is.
    pub fn artifact(&self, sha256: &str) -> Option<PathBuf> {
        if sha256.len() != 64 || !sha256.bytes().all(|b| b.is_ascii_hexdigit()) {
            return None;
        }
        let p = self.path(&sha256.to_ascii_lowercase());
        p.is_file().then_some(p)
    }

    fn path(&self, sha256: &str) -> PathBuf {
        self.dir.join(sha256)
    }

    /// The directory of the artifact files.
    pub fn dir(&self) -> &Path {
        &self.dir
    }
}

fn hex(bytes: &[u8]) -> String {
    bytes.iter().map(|b| format!("{b:02x}")).collect()
}
