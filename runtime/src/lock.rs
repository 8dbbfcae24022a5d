//! One running instance per data directory, enforced with an OS file lock on
//! `<data>/twinfleet.lock`. The lock goes away with the process, even after SIGKILL.

use std::fs::{File, OpenOptions, Permissions, TryLockError};
use std::io::{Read, Seek, SeekFrom, Write};
use std::os::unix::fs::{OpenOptionsExt, PermissionsExt};
use std::path::{Path, PathBuf};

#[derive(Debug, thiserror::Error)]
pub enum LockError {
    #[error(
        "data directory {dir} is already used by another running twinfleet instance{holder}; stop it or choose another --data-dir"
    )]
    InUse { dir: PathBuf, holder: String },
    #[error("cannot open lock file {path}: {source}")]
    Io { path: PathBuf, source: std::io::Error },
}

/// How long a lock that this very process holds is waited for (see `acquire`).
const SAME_PROCESS_WAIT: std::time::Duration = std::time::Duration::from_secs(2);

/// Held for as long as the platform runs.
#[derive(Debug)]
pub struct DataDirLock {
    _file: File,
}

impl DataDirLock {
    pub fn acquire(dir: &Path) -> Result<Self, LockError> {
        let path = dir.join("twinfleet.lock");
        let io = |source| LockError::Io { path: path.clone(), source };
        std::fs::create_dir_all(dir).map_err(io)?;
        restrict_dir(dir).map_err(io)?;
        let mut file = OpenOptions::new()
            .read(true)
            .write(true)
            .create(true)
            .truncate(false)
            .mode(0o600)
            .open(&path)
            .map_err(io)?;
        let started = std::time::Instant::now();
        loop {
            match file.try_lock() {
                Ok(()) => break,
                Err(TryLockError::WouldBlock) => {
                    let mut pid = String::new();
                    let _ = file.seek(SeekFrom::Start(0));
                    let _ = file.read_to_string(&mut pid);
                    let pid = pid.trim();
                    // Held by this process: a platform of this process that stopped a
                    // moment ago, whose lock a child being spawned by another thread
                    // still shares (a fork copies the open file, and with it the lock,
                    // until the child's exec closes it). Wait for that, briefly; a
                    // platform that really still runs here holds it past the wait.
                    if pid == std::process::id().to_string() && started.elapsed() < SAME_PROCESS_WAIT {
                        std::thread::sleep(std::time::Duration::from_millis(10));
                        continue;
                    }
                    let holder = if pid.is_empty() { String::new() } else { format!(" (pid {pid})") };
                    return Err(LockError::InUse { dir: dir.to_path_buf(), holder });
                }
                Err(TryLockError::Error(e)) => return Err(io(e)),
            }
        }
        file.set_len(0).map_err(io)?;
        file.seek(SeekFrom::Start(0)).map_err(io)?;
        write!(file, "{}", std::process::id()).map_err(io)?;
        Ok(DataDirLock { _file: file })
    }
}

/// Makes `dir` readable by its owner only (0700): the data directory holds device and
/// operator credentials (hashed) and every twin's state.
pub fn restrict_dir(dir: &Path) -> std::io::Result<()> {
    std::fs::set_permissions(dir, Permissions::from_mode(0o700))
}

/// Gives every directory under `dir` mode 0700 and every file 0600 (what the storage
/// engine created with the process's umask). A file that vanishes meanwhile is skipped:
/// sled renames and removes its snapshot files in the background.
pub fn restrict_tree(dir: &Path) -> std::io::Result<()> {
    let gone = |e: &std::io::Error| e.kind() == std::io::ErrorKind::NotFound;
    restrict_dir(dir)?;
    for entry in std::fs::read_dir(dir)? {
        let entry = match entry {
            Ok(e) => e,
            Err(e) if gone(&e) => continue,
            Err(e) => return Err(e),
        };
        let r = match entry.file_type() {
            Ok(ty) if ty.is_dir() => restrict_tree(&entry.path()),
            Ok(ty) if ty.is_file() => std::fs::set_permissions(entry.path(), Permissions::from_mode(0o600)),
            Ok(_) => Ok(()),
            Err(e) => Err(e),
        };
        match r {
            Err(e) if !gone(&e) => return Err(e),
            _ => {}
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn second_lock_on_same_dir_is_refused() {
        let dir = tempfile::tempdir().unwrap();
        let first = DataDirLock::acquire(dir.path()).unwrap();
        let err = DataDirLock::acquire(dir.path()).unwrap_err();
        assert!(err.to_string().contains("already used by another running twinfleet instance"), "{err}");
        drop(first);
        DataDirLock::acquire(dir.path()).unwrap();
    }

    /// A child forked by another thread holds a copy of every open file until its exec:
    /// a platform restarted in the same process in that moment must not be refused (the
    /// `monitoring::alerts_…_restart…` test once failed so, while other tests started
    /// child processes). Here a child shares the lock's open file as its stdin for 300 ms.
    #[test]
    fn a_lock_still_shared_with_a_child_process_is_waited_for() {
        let dir = tempfile::tempdir().unwrap();
        let first = DataDirLock::acquire(dir.path()).unwrap();
        let mut child =
            std::process::Command::new("sleep").arg("0.3").stdin(first._file.try_clone().unwrap()).spawn().unwrap();
        drop(first);
        DataDirLock::acquire(dir.path()).expect("the lock, once the child let go of its copy");
        assert!(child.wait().unwrap().success());
    }
}
