//! How operator jobs run (the records and their store are in `jobs`): a job is checked
//! whole on submission, then runs in steps, each durable before the next; a job the last
//! stop interrupted resumes at the next start, each step idempotent on resume.

use crate::access::Principal;
use crate::error::TwinError;
use crate::jobs::{Generate, Job, JobSpec, JobState, MAX_JOB_TWINS, job_key, work_key};
use crate::records::TwinSpec;
use crate::spaces;
use crate::supervisor::TwinRuntime;
use futures::StreamExt;
use std::collections::HashSet;
use twinfleet_models::DtaId;
use twinfleet_models::{Action, DeviceTypeId, Metadata, TwinCommand, TwinId};
use twinfleet_runtime::{StorageError, WriteBatch, encode_record};

/// Twins created per step of a creation job.
const CREATE_STEP: usize = 1_000;
/// Twins archived or deleted concurrently.
const CONCURRENCY: usize = 64;
/// Failures kept in a job's record.
const MAX_ERRORS: usize = 20;

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
        // The work as it was checked, stored to resume from: a group's members are
        // resolved now; a creation keeps its compact form (`generate`).
        let submitted = spec.clone();
        let plan = self.plan(p, spec)?;
        let work = match &plan {
            Plan::Archive(ids) => JobSpec::ArchiveTwins { group: None, twins: ids.clone() },
            Plan::Delete(ids) => JobSpec::DeleteTwins { group: None, twins: ids.clone() },
            Plan::Create(..) => submitted,
        };
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
        let mut b = WriteBatch::new();
        b.put(spaces::JOB, work_key(id), encode_record(&work));
        b.put(spaces::JOB, job_key(id), encode_record(&job));
        env.storage.submit(b).await?;
        env.jobs.insert(job.clone());
        let rt = self.clone();
        actix::spawn(async move { rt.run_job(id, plan, false).await });
        Ok(job)
    }

    /// Resumes every job that was running when the platform last stopped. Called once
    /// the twins are restored. Returns how many were resumed.
    pub fn resume_jobs(&self) -> usize {
        let jobs = &self.env().jobs;
        let running = jobs.running();
        let mut resumed = 0;
        for id in running {
            let Some(work) = jobs.take_work(id) else {
                // A record from before work was stored: report what it did, as failed.
                let now = self.env().clock.now();
                if let Some(job) = jobs.update(id, |j| {
                    j.state = JobState::Failed;
                    j.finished_at = Some(now);
                    j.errors.push("interrupted: the platform stopped while the job ran".into());
                }) {
                    jobs.store_later(&job);
                }
                continue;
            };
            let plan = match resolve(work) {
                Ok(plan) => plan,
                Err(e) => {
                    tracing::error!(job = id, "cannot resume: {e}");
                    continue;
                }
            };
            tracing::info!(job = id, "resuming a job the last stop interrupted");
            // Progress is counted anew, with what is done already counted as done.
            jobs.update(id, |j| {
                j.done = 0;
                j.failed = 0;
            });
            let rt = self.clone();
            actix::spawn(async move { rt.run_job(id, plan, true).await });
            resumed += 1;
        }
        resumed
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
                    twins.extend(generated(&g)?);
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

    async fn run_job(&self, id: u64, plan: Plan, resume: bool) {
        let jobs = &self.env().jobs;
        let stopped = match plan {
            Plan::Create(ty, specs) => {
                let mut specs = specs.into_iter().peekable();
                let mut stopped = false;
                while specs.peek().is_some() {
                    let mut step: Vec<TwinSpec> = specs.by_ref().take(CREATE_STEP).collect();
                    let n = step.len();
                    if resume {
                        // Twins an interrupted run created are done already.
                        step.retain(|s| self.twin(s.id.as_str()).is_err());
                    }
                    let r = if step.is_empty() { Ok(()) } else { self.spawn_fleet(&ty, step).await.map(drop) };
                    match r {
                        Ok(()) => {
                            jobs.update(id, |j| j.done += n);
                            jobs.checkpoint(id).await;
                        }
                        Err(e) if stopping(&e) => {
                            stopped = true;
                            break;
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
                stopped
            }
            Plan::Archive(ids) => self.each_twin(id, ids, false, resume).await,
            Plan::Delete(ids) => self.each_twin(id, ids, true, resume).await,
        };
        if stopped {
            // The platform is stopping: the job stays running and resumes at the next start.
            tracing::info!(job = id, "the platform stops; the job resumes at the next start");
            return;
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

    /// Archives or deletes twins, a few at a time, counting each; stores the progress
    /// every `CONCURRENCY` twins. Returns true when it stopped because the platform stops.
    async fn each_twin(&self, id: u64, ids: Vec<TwinId>, delete: bool, resume: bool) -> bool {
        let jobs = &self.env().jobs;
        let mut work = futures::stream::iter(ids)
            .map(|t| async move {
                let r = if delete {
                    match self.delete_twin(t.as_str()).await {
                        // Deleted by the interrupted run.
                        Err(TwinError::NotFound(_)) if resume => Ok(()),
                        r => r,
                    }
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
        let mut handled = 0usize;
        while let Some((t, r)) = work.next().await {
            if let Err(e) = &r
                && stopping(e)
            {
                return true;
            }
            jobs.update(id, |j| match r {
                Ok(()) => j.done += 1,
                Err(e) => {
                    j.failed += 1;
                    if j.errors.len() < MAX_ERRORS {
                        j.errors.push(format!("{t}: {e}"));
                    }
                }
            });
            handled += 1;
            if handled.is_multiple_of(CONCURRENCY) {
                jobs.checkpoint(id).await;
            }
        }
        false
    }
}

/// Whether an error means the platform is stopping (the job then resumes later).
fn stopping(e: &TwinError) -> bool {
    matches!(e, TwinError::ShuttingDown | TwinError::Storage(StorageError::Closed))
}

/// The plan of stored work, without the checks of a submission (they were made then).
fn resolve(work: JobSpec) -> Result<Plan, TwinError> {
    match work {
        JobSpec::CreateTwins { device_type, mut twins, generate } => {
            if let Some(g) = generate {
                twins.extend(generated(&g)?);
            }
            Ok(Plan::Create(device_type, twins))
        }
        JobSpec::ArchiveTwins { twins, .. } => Ok(Plan::Archive(twins)),
        JobSpec::DeleteTwins { twins, .. } => Ok(Plan::Delete(twins)),
    }
}

/// The twins `generate` names.
fn generated(g: &Generate) -> Result<Vec<TwinSpec>, TwinError> {
    (g.start..g.start.saturating_add(g.count))
        .map(|n| {
            let mut spec = TwinSpec::new(TwinId::new(format!("{}{n}", g.prefix))?);
            spec.dtas = g.dtas.clone();
            spec.metadata = Metadata { tags: g.tags.clone(), ..Metadata::default() };
            Ok(spec)
        })
        .collect()
}
