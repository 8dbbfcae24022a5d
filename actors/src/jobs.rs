//! Long-running operator requests (Maree et al., section 4.3.3: the CRUD service runs
//! long jobs asynchronously): creating thousands of twins, archiving or deleting a group.
//!
//! A job is checked whole before it starts (authorization, unknown or existing ids), so
//! that it is refused with a clear error rather than failing half-way for a reason known
//! up front. It then runs in steps; each step is durable before the next begins, and
//! `done` counts the twins handled.
//!
//! Jobs resume: the job's work, resolved at submission (a group's members become the
//! list of twins), is stored with the job record, and the record is stored again after
//! every step with its progress. A job that was running when the platform stopped (a
//! kill, a crash, a shutdown) goes on after the next start. Every step is idempotent on
//! resume: a twin the job already created, archived or deleted counts as done, so the
//! outcome reports exactly what the job did, once. Authorization was checked at
//! submission and is not checked again on resume.

use crate::error::TwinError;
use crate::records::TwinSpec;
use crate::spaces;
use parking_lot::Mutex;
use serde::{Deserialize, Serialize};
use std::collections::BTreeMap;
use std::sync::Arc;
use twinfleet_models::{DeviceTypeId, DtaId, Timestamp, TwinId};
use twinfleet_runtime::{Storage, StorageError, WriteBatch, decode_record, encode_record};

/// Most twins one job may name.
pub const MAX_JOB_TWINS: usize = 1_000_000;

/// What a job does.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(tag = "kind", rename_all = "snake_case", deny_unknown_fields)]
#[cfg_attr(feature = "openapi", derive(utoipa::ToSchema))]
pub enum JobSpec {
    /// Creates twins of one type: those listed, and/or `generate.count` twins named
    /// `{prefix}{n}`.
    CreateTwins {
        device_type: DeviceTypeId,
        #[serde(default)]
        twins: Vec<TwinSpec>,
        #[serde(default)]
        generate: Option<Generate>,
    },
    /// Archives the listed twins and/or every member of `group` (and nested DTAs).
    ArchiveTwins {
        #[serde(default)]
        group: Option<DtaId>,
        #[serde(default)]
        twins: Vec<TwinId>,
    },
    /// Deletes the listed twins and/or every member of `group` (and nested DTAs).
    DeleteTwins {
        #[serde(default)]
        group: Option<DtaId>,
        #[serde(default)]
        twins: Vec<TwinId>,
    },
}

/// Twins `{prefix}{start}` .. `{prefix}{start + count - 1}`.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
#[cfg_attr(feature = "openapi", derive(utoipa::ToSchema))]
pub struct Generate {
    pub prefix: String,
    pub count: usize,
    #[serde(default)]
    pub start: usize,
    /// DTAs every generated twin joins.
    #[serde(default)]
    pub dtas: Vec<DtaId>,
    #[serde(default)]
    pub tags: Vec<String>,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
#[cfg_attr(feature = "openapi", derive(utoipa::ToSchema))]
pub enum JobState {
    Running,
    Succeeded,
    Failed,
}

/// A job as shown to operators.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[cfg_attr(feature = "openapi", derive(utoipa::ToSchema))]
pub struct Job {
    pub id: u64,
    pub kind: String,
    pub state: JobState,
    /// Twins the job covers.
    pub total: usize,
    /// Twins handled so far.
    pub done: usize,
    /// Twins that could not be handled.
    pub failed: usize,
    pub created_by: String,
    pub created_at: Timestamp,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub finished_at: Option<Timestamp>,
    /// The first failures.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub errors: Vec<String>,
}

/// Every job of this platform, newest last.
#[derive(Debug)]
pub struct Jobs {
    storage: Arc<dyn Storage>,
    jobs: Mutex<BTreeMap<u64, Job>>,
    /// The resolved work of the jobs that were running at the last stop.
    work: Mutex<BTreeMap<u64, JobSpec>>,
}

/// The key of a job's record: its id, big-endian.
pub(crate) fn job_key(id: u64) -> Vec<u8> {
    id.to_be_bytes().to_vec()
}

/// The key of a job's resolved work: the record's key and 0x01.
pub(crate) fn work_key(id: u64) -> Vec<u8> {
    let mut k = job_key(id);
    k.push(1);
    k
}

impl Jobs {
    /// Loads stored jobs; those still running were interrupted by the last stop and are
    /// resumed by `TwinRuntime::resume_jobs` (`workflow`) once the twins are back.
    pub(crate) fn open(storage: Arc<dyn Storage>) -> Result<Self, StorageError> {
        let mut jobs = BTreeMap::new();
        let mut work = BTreeMap::new();
        for row in storage.scan(spaces::JOB, b"") {
            let (k, v) = row?;
            if k.len() == 9 {
                match decode_record::<JobSpec>(&v) {
                    Ok(spec) => {
                        work.insert(u64::from_be_bytes(k[..8].try_into().unwrap_or_default()), spec);
                    }
                    Err(e) => tracing::warn!("a job's stored work does not decode: {e}"),
                }
                continue;
            }
            let Ok(job) = decode_record::<Job>(&v) else {
                tracing::warn!("skipping a job record that does not decode: {}", String::from_utf8_lossy(&k));
                continue;
            };
            jobs.insert(job.id, job);
        }
        Ok(Jobs { storage, jobs: Mutex::new(jobs), work: Mutex::new(work) })
    }

    pub fn get(&self, id: u64) -> Option<Job> {
        self.jobs.lock().get(&id).cloned()
    }

    /// Jobs, newest first, that `who` may see (all when `None`).
    pub fn list(&self, who: Option<&str>, limit: usize) -> Vec<Job> {
        self.jobs.lock().values().rev().filter(|j| who.is_none_or(|w| j.created_by == w)).take(limit).cloned().collect()
    }

    pub(crate) fn update(&self, id: u64, f: impl FnOnce(&mut Job)) -> Option<Job> {
        let mut jobs = self.jobs.lock();
        let j = jobs.get_mut(&id)?;
        f(j);
        Some(j.clone())
    }

    pub(crate) async fn store(&self, job: &Job) -> Result<(), TwinError> {
        let mut b = WriteBatch::new();
        b.put(spaces::JOB, job_key(job.id), encode_record(job));
        if job.state != JobState::Running {
            b.delete(spaces::JOB, work_key(job.id));
        }
        Ok(self.storage.submit(b).await?)
    }

    /// Stores the job's progress as it is now.
    pub(crate) async fn checkpoint(&self, id: u64) {
        if let Some(job) = self.get(id)
            && let Err(e) = self.store(&job).await
        {
            tracing::warn!(job = id, "could not store the job's progress: {e}");
        }
    }

    /// Records a job that was just stored.
    pub(crate) fn insert(&self, job: Job) {
        self.jobs.lock().insert(job.id, job);
    }

    /// The ids of the jobs still marked running.
    pub(crate) fn running(&self) -> Vec<u64> {
        self.jobs.lock().values().filter(|j| j.state == JobState::Running).map(|j| j.id).collect()
    }

    /// Takes the stored work of an interrupted job, to resume it.
    pub(crate) fn take_work(&self, id: u64) -> Option<JobSpec> {
        self.work.lock().remove(&id)
    }

    /// Stores a job's record without waiting for it to be durable.
    pub(crate) fn store_later(&self, job: &Job) {
        let mut b = WriteBatch::new();
        b.put(spaces::JOB, job_key(job.id), encode_record(job));
        drop(self.storage.submit(b));
    }
}
