//! Long-running operator requests (Maree et al., section 4.3.3: the CRUD service runs
//! long jobs asynchronously): creating thousands of twins, archiving or deleting a group.
//!
//! A job is checked whole before it starts (authorization, unknown or existing ids), so
//! that it is refused with a clear error rather than failing half-way for a reason known
//! up front. It then runs in steps; each step is durable before the next begins, and
//! `done` counts the twins handled. The job record is stored when the job starts and
//! when it ends; a job that was running when the platform stopped is shown as failed
//! ("interrupted") after a restart, with the progress it had stored, and what it did
//! until then stays done.

use crate::access::Principal;
use crate::error::TwinError;
use crate::records::TwinSpec;
use crate::supervisor::TwinRuntime;
use futures::StreamExt;
use parking_lot::Mutex;
use serde::{Deserialize, Serialize};
use std::collections::{BTreeMap, HashSet};
use std::sync::Arc;
use twinfleet_models::{Action, DeviceTypeId, DtaId, Metadata, Timestamp, TwinCommand, TwinId};
use twinfleet_runtime::{Space, Storage, StorageError, WriteBatch, decode_record, encode_record};

/// Twins created per step of a creation job.
const CREATE_STEP: usize = 1_000;
/// Twins archived or deleted concurrently.
const CONCURRENCY: usize = 64;
/// Most twins one job may name.
pub const MAX_JOB_TWINS: usize = 1_000_000;
/// Failures kept in a job's record.
const MAX_ERRORS: usize = 20;

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
}

impl Jobs {
    /// Loads stored jobs; one still running was interrupted by the last stop.
    pub(crate) fn open(storage: Arc<dyn Storage>, now: Timestamp) -> Result<Self, StorageError> {
        let mut jobs = BTreeMap::new();
        let mut b = WriteBatch::new();
        for row in storage.scan(Space::Job, b"") {
            let (k, v) = row?;
            let Ok(mut job) = decode_record::<Job>(&v) else {
                tracing::warn!("skipping a job record that does not decode: {}", String::from_utf8_lossy(&k));
                continue;
            };
            if job.state == JobState::Running {
                job.state = JobState::Failed;
                job.finished_at = Some(now);
                job.errors.push("interrupted: the platform stopped while the job ran".into());
                b.put(Space::Job, k, encode_record(&job));
            }
            jobs.insert(job.id, job);
        }
        if !b.is_empty() {
            drop(storage.submit(b));
        }
        Ok(Jobs { storage, jobs: Mutex::new(jobs) })
    }

    pub fn get(&self, id: u64) -> Option<Job> {
        self.jobs.lock().get(&id).cloned()
    }

    /// Jobs, newest first, that `who` may see (all when `None`).
    pub fn list(&self, who: Option<&str>, limit: usize) -> Vec<Job> {
        self.jobs.lock().values().rev().filter(|j| who.is_none_or(|w| j.created_by == w)).take(limit).cloned().collect()
    }

    fn update(&self, id: u64, f: impl FnOnce(&mut Job)) -> Option<Job> {
        let mut jobs = self.jobs.lock();
        let j = jobs.get_mut(&id)?;
        f(j);
        Some(j.clone())
    }

    async fn store(&self, job: &Job) -> Result<(), TwinError> {
        let mut b = WriteBatch::new();
        b.put(Space::Job, job.id.to_be_bytes().to_vec(), encode_record(job));
        Ok(self.storage.submit(b).await?)
    }
}

/// A checked job, ready to run.
enum Plan {
    Create(DeviceTypeId, Vec<TwinSpec>),
    Archive(Vec<TwinId>),
    Delete(Vec<TwinId>),
}

impl Plan {
    fn total(&self) -> usize {
        match self {
            Plan::Create(_, v) => v.len(),
            Plan::Archive(v) | Plan::Delete(v) => v.len(),
        }
    }
}

impl TwinRuntime {
    /// Checks `spec` on behalf of `p`, records the job and starts it. Must be called
    /// inside an actix system.
    pub async fn submit_job(&self, p: &Principal, spec: JobSpec) -> Result<Job, TwinError> {
        let kind = match &spec {
            JobSpec::CreateTwins { .. } => "create_twins",
            JobSpec::ArchiveTwins { .. } => "archive_twins",
            JobSpec::DeleteTwins { .. } => "delete_twins",
        };
        let plan = self.plan(p, spec)?;
        let env = self.env();
        let id = env.storage.generate_id()?;
        let job = Job {
            id,
            kind: kind.into(),
            state: JobState::Running,
            total: plan.total(),
            done: 0,
            failed: 0,
            created_by: p.user.to_string(),
            created_at: env.clock.now(),
            finished_at: None,
            errors: vec![],
        };
        env.jobs.store(&job).await?;
        env.jobs.jobs.lock().insert(id, job.clone());
        let rt = self.clone();
        actix::spawn(async move { rt.run_job(id, plan).await });
        Ok(job)
    }

    fn plan(&self, p: &Principal, spec: JobSpec) -> Result<Plan, TwinError> {
        match spec {
            JobSpec::CreateTwins { device_type, mut twins, generate } => {
                let ty = self.device_type(device_type.as_str())?;
                self.authorize_type(p, Action::Provision, ty.id())?;
                if let Some(g) = generate {
                    if g.count > MAX_JOB_TWINS {
                        return Err(TwinError::Invalid(format!("generate.count is above {MAX_JOB_TWINS}")));
                    }
                    for n in g.start..g.start.saturating_add(g.count) {
                        let mut spec = TwinSpec::new(TwinId::new(format!("{}{n}", g.prefix))?);
                        spec.dtas = g.dtas.clone();
                        spec.metadata = Metadata { tags: g.tags.clone(), ..Metadata::default() };
                        twins.push(spec);
                    }
                }
                if twins.is_empty() || twins.len() > MAX_JOB_TWINS {
                    return Err(TwinError::Invalid(format!("a job creates 1 to {MAX_JOB_TWINS} twins")));
                }
                let mut seen = HashSet::with_capacity(twins.len());
                for t in &twins {
                    if !seen.insert(&t.id) {
                        return Err(TwinError::Invalid(format!("twin {} is listed twice", t.id)));
                    }
                    if self.twin(t.id.as_str()).is_ok() {
                        return Err(TwinError::AlreadyExists { kind: "twin", id: t.id.to_string() });
                    }
                }
                for d in twins.iter().flat_map(|t| t.dtas.iter()).collect::<HashSet<_>>() {
                    self.dta(d.as_str())?;
                    self.authorize_dta(p, Action::Configure, d)?;
                }
                Ok(Plan::Create(ty.id().clone(), twins))
            }
            JobSpec::ArchiveTwins { group, twins } => {
                Ok(Plan::Archive(self.targets(p, Action::Manage, group, twins)?))
            }
            JobSpec::DeleteTwins { group, twins } => {
                Ok(Plan::Delete(self.targets(p, Action::Provision, group, twins)?))
            }
        }
    }

    /// The twins named and the members of `group`, each checked for `action`.
    fn targets(
        &self,
        p: &Principal,
        action: Action,
        group: Option<DtaId>,
        mut twins: Vec<TwinId>,
    ) -> Result<Vec<TwinId>, TwinError> {
        if let Some(g) = group {
            twins.extend(self.group_members(g.as_str())?);
        }
        twins.sort();
        twins.dedup();
        if twins.is_empty() || twins.len() > MAX_JOB_TWINS {
            return Err(TwinError::Invalid(format!("a job covers 1 to {MAX_JOB_TWINS} twins")));
        }
        for t in &twins {
            let h = self.twin(t.as_str())?;
            self.authorize_twin(p, action, &h)?;
        }
        Ok(twins)
    }

    async fn run_job(&self, id: u64, plan: Plan) {
        let jobs = &self.env().jobs;
        match plan {
            Plan::Create(ty, specs) => {
                let mut specs = specs.into_iter().peekable();
                while specs.peek().is_some() {
                    let step: Vec<TwinSpec> = specs.by_ref().take(CREATE_STEP).collect();
                    let n = step.len();
                    match self.spawn_fleet(&ty, step).await {
                        Ok(_) => {
                            jobs.update(id, |j| j.done += n);
                        }
                        Err(e) => {
                            // A step is all-or-nothing; the rest is not attempted.
                            jobs.update(id, |j| {
                                j.failed = j.total - j.done;
                                j.errors.push(e.to_string());
                            });
                            break;
                        }
                    }
                }
            }
            Plan::Archive(ids) => self.each_twin(id, ids, false).await,
            Plan::Delete(ids) => self.each_twin(id, ids, true).await,
        }
        let now = self.env().clock.now();
        if let Some(job) = jobs.update(id, |j| {
            j.state = if j.failed == 0 { JobState::Succeeded } else { JobState::Failed };
            j.finished_at = Some(now);
        }) && let Err(e) = jobs.store(&job).await
        {
            tracing::error!(job = id, "could not store the outcome of a job: {e}");
        }
    }

    /// Archives or deletes twins, a few at a time, counting each.
    async fn each_twin(&self, id: u64, ids: Vec<TwinId>, delete: bool) {
        let jobs = &self.env().jobs;
        let mut work = futures::stream::iter(ids)
            .map(|t| async move {
                let r = if delete {
                    self.delete_twin(t.as_str()).await
                } else {
                    match self.twin(t.as_str()) {
                        Ok(h) => match h.command(TwinCommand::Archive).await {
                            // Archiving an archived twin is done already.
                            Err(TwinError::Rejected(twinfleet_models::ModelError::Archived(_))) => Ok(()),
                            r => r.map(|_| ()),
                        },
                        Err(e) => Err(e),
                    }
                };
                (t, r)
            })
            .buffer_unordered(CONCURRENCY);
        while let Some((t, r)) = work.next().await {
            jobs.update(id, |j| match r {
                Ok(()) => j.done += 1,
                Err(e) => {
                    j.failed += 1;
                    if j.errors.len() < MAX_ERRORS {
                        j.errors.push(format!("{t}: {e}"));
                    }
                }
            });
        }
    }
}
