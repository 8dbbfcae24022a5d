//! Fleet rollouts' drivers (`twinfleet_models::rollout`): one task per running rollout,
//! on the platform's first arbiter, on the platform clock. Each step of the pure model
//! is persisted in `ROLLOUT` before its actions are carried out: installs and rollbacks
//! go through the twins (`TwinRuntime::install`, which checks compatibility and lets
//! each twin wait for its approval and window), their results come back from the twins
//! (`Infra::installs`, or by asking the twins after a restart or when the driver fell
//! behind), and the health gate reads the monitoring alerts' change log from the
//! revision at which it started, so a restart loses none. A restarted platform resumes
//! every rollout that was running or paused (`TwinRuntime::resume_rollouts`).

use crate::TwinError;
use crate::context::RolloutControl;
use crate::spaces;
use crate::supervisor::TwinRuntime;
use std::collections::BTreeSet;
use tokio::sync::{broadcast, mpsc};
use twinfleet_models::AlertState;
use twinfleet_models::Timestamp;
use twinfleet_models::install::{InstallJob, InstallPhase};
use twinfleet_models::rollout::{Action, Control, Rollout, RolloutSpec, TargetStatus};
use twinfleet_runtime::{WriteBatch, decode_record, encode_record};

/// The marker of a rollout's rollback installs.
fn rollback_of(id: &str) -> String {
    format!("{id}#rollback")
}

/// An ended install as the rollout reads it.
fn outcome(job: &InstallJob) -> Option<Result<(), String>> {
    match &job.phase {
        InstallPhase::Installed { .. } => Some(Ok(())),
        InstallPhase::Failed { reason, .. } => Some(Err(reason.clone())),
        _ => None,
    }
}

impl TwinRuntime {
    /// Starts a rollout: checks the spec, the type, the app version and that no running
    /// rollout of the same app covers any of the same twins (409 naming it), then stores
    /// it and starts its driver. The targets are the type's active twins (only the direct
    /// members of `groups`, if given), in id order.
    pub async fn start_rollout(&self, spec: RolloutSpec) -> Result<Rollout, TwinError> {
        spec.validate().map_err(TwinError::Invalid)?;
        let ty = self.device_type(&spec.device_type)?;
        self.apps().get(&spec.app, &spec.version)?;
        if self.env.storage.get(spaces::ROLLOUT, spec.id.as_bytes())?.is_some() {
            return Err(TwinError::AlreadyExists { kind: "rollout", id: spec.id.clone() });
        }
        let mut groups = Vec::new();
        for g in &spec.groups {
            groups.push(self.dta(g)?);
        }
        let mut twins: Vec<String> = self
            .env
            .directory
            .twins
            .iter()
            .filter(|s| s.ty.device_type == *ty.id() && !s.archived())
            .map(|s| s.id.to_string())
            .filter(|id| groups.is_empty() || groups.iter().any(|g| g.contains(id)))
            .collect();
        twins.sort();
        if twins.is_empty() {
            return Err(TwinError::Invalid(format!(
                "rollout {}: no active twin of {} to roll out to",
                spec.id, spec.device_type
            )));
        }
        let mine: BTreeSet<&String> = twins.iter().collect();
        for other in self.rollouts()? {
            if other.spec.app == spec.app
                && !other.is_final()
                && let Some(t) = other.targets.iter().find(|t| mine.contains(&t.twin))
            {
                return Err(TwinError::Conflict(format!(
                    "rollout {} of {} is still running on twin {} (and maybe others): one rollout of an app per twin at a time",
                    other.spec.id, other.spec.app, t.twin
                )));
            }
        }
        let r = Rollout::new(spec, twins, self.clock().now());
        store(self, &r).await?;
        self.drive_rollout(r.clone());
        Ok(r)
    }

    /// Every rollout, newest id last.
    pub fn rollouts(&self) -> Result<Vec<Rollout>, TwinError> {
        let mut v = Vec::new();
        for r in self.env.storage.scan(spaces::ROLLOUT, b"") {
            let (_, raw) = r?;
            v.push(
                decode_record(&raw)
                    .map_err(|e| TwinError::Invalid(format!("a stored rollout does not decode: {e}")))?,
            );
        }
        Ok(v)
    }

    /// One rollout, as its last step left it.
    pub fn rollout(&self, id: &str) -> Result<Rollout, TwinError> {
        let raw = self
            .env
            .storage
            .get(spaces::ROLLOUT, id.as_bytes())?
            .ok_or_else(|| TwinError::Unknown { kind: "rollout", id: id.to_string() })?;
        decode_record(&raw).map_err(|e| TwinError::Invalid(format!("rollout {id} does not decode: {e}")))
    }

    /// Pauses, resumes or cancels a rollout; the rollout as it then stands.
    pub async fn control_rollout(&self, id: &str, c: Control) -> Result<Rollout, TwinError> {
        let r = self.rollout(id)?;
        let Some(tx) = self.env.rollouts.get(id).map(|e| e.value().clone()) else {
            return Err(TwinError::Conflict(format!("rollout {id} is {:?}: it no longer runs", r.state)));
        };
        let (reply, answer) = tokio::sync::oneshot::channel();
        tx.send((c, reply)).map_err(|_| TwinError::Conflict(format!("rollout {id} has just ended")))?;
        answer
            .await
            .map_err(|_| TwinError::Conflict(format!("rollout {id} has just ended")))?
            .map_err(TwinError::Conflict)
    }

    /// Starts the driver of every stored rollout that was running or paused (at start).
    pub fn resume_rollouts(&self) -> Result<usize, TwinError> {
        let open: Vec<Rollout> = self.rollouts()?.into_iter().filter(|r| !r.is_final()).collect();
        let n = open.len();
        for r in open {
            tracing::info!(rollout = r.spec.id, "resuming the rollout");
            self.drive_rollout(r);
        }
        Ok(n)
    }

    fn drive_rollout(&self, r: Rollout) {
        let (tx, rx) = mpsc::unbounded_channel();
        self.env.rollouts.insert(r.spec.id.clone(), tx);
        let rt = self.clone();
        self.env.arbiters.run_on(0, move || {
            actix_rt::spawn(async move {
                let id = r.spec.id.clone();
                run(rt.clone(), r, rx).await;
                rt.env.rollouts.remove(&id);
            });
        });
    }
}

async fn store(rt: &TwinRuntime, r: &Rollout) -> Result<(), TwinError> {
    let mut b = WriteBatch::new();
    b.put(spaces::ROLLOUT, r.spec.id.as_bytes().to_vec(), encode_record(r));
    rt.env.storage.submit(b).await?;
    Ok(())
}

/// Asks every twin the rollout waits for where its install stands (after a restart, or
/// when the driver fell behind the twins' news); starts rollbacks not started yet.
async fn poll(rt: &TwinRuntime, r: &mut Rollout) -> Vec<Action> {
    let id = r.spec.id.clone();
    let mut actions = Vec::new();
    let waiting: Vec<(String, TargetStatus)> = r
        .targets
        .iter()
        .filter(|t| matches!(t.status, TargetStatus::Installing | TargetStatus::RollingBack { .. }))
        .map(|t| (t.twin.clone(), t.status.clone()))
        .collect();
    for (twin, status) in waiting {
        let job = match rt.twin(&twin) {
            Ok(h) => h.install().await.ok().flatten(),
            Err(_) => None,
        };
        let now = rt.clock().now();
        match status {
            TargetStatus::Installing => match job {
                Some(j) if j.rollout.as_deref() == Some(id.as_str()) => {
                    if let Some(ok) = outcome(&j) {
                        actions.extend(r.result(&twin, ok, j.previous.clone(), now));
                    }
                }
                // The twin never got it (a crash between the step and the install).
                _ => actions.push(Action::Install { twin }),
            },
            TargetStatus::RollingBack { to } => match job {
                Some(j) if j.rollout.as_deref() == Some(rollback_of(&id).as_str()) => {
                    if let Some(ok) = outcome(&j) {
                        r.rolled_back(&twin, ok, now);
                    }
                }
                _ => {
                    if let Some(to) = to {
                        actions.push(Action::RollBack { twin, to });
                    }
                }
            },
            _ => {}
        }
    }
    actions
}

/// Applies the alerts of the change log the health gate has not seen (after a restart).
fn catch_up_alerts(rt: &TwinRuntime, r: &mut Rollout) {
    let Some(gate) = r.gate else { return };
    let mut after = gate.after_revision;
    loop {
        let Ok((changes, _)) = rt.alert_book().changes_after(after, 1_000) else { return };
        let Some(last) = changes.last().map(|c| c.0) else { return };
        for (_, a) in changes {
            if a.state == AlertState::Raised && a.raised_at <= gate.until {
                r.alert(&a.twin, a.severity, &a.rule, a.raised_at);
            }
        }
        after = last;
    }
}

/// Installs a driver starts at once (each a few round trips to its twin and one
/// durable write, so many at once share the storage's group commits).
const CONCURRENT_INSTALLS: usize = 512;
/// How often (real time) a driver stores results that changed nothing else.
const STORE_EVERY: std::time::Duration = std::time::Duration::from_millis(500);

/// Carries out `actions`; installs that fail at once are results of their own.
async fn carry_out(rt: &TwinRuntime, r: &mut Rollout, actions: Vec<Action>) -> Option<Timestamp> {
    use futures::StreamExt;
    let id = r.spec.id.clone();
    let (app, version) = (r.spec.app.clone(), r.spec.version.clone());
    let mut wake: Option<Timestamp> = None;
    let mut queue = actions;
    while !queue.is_empty() {
        let mut more = Vec::new();
        let mut installs = Vec::new();
        let mut rollbacks = Vec::new();
        for a in queue {
            match a {
                Action::Install { twin } => installs.push((twin, version.clone(), id.clone())),
                Action::RollBack { twin, to } => rollbacks.push((twin, to, rollback_of(&id))),
                Action::WakeAt(t) => wake = Some(wake.map_or(t, |w| w.min(t))),
                Action::GateStarted => tracing::info!(rollout = id, wave = r.wave + 1, "health gate started"),
            }
        }
        // The versions, read once for the whole step.
        let mut versions = std::collections::HashMap::new();
        for v in installs.iter().chain(&rollbacks).map(|(_, v, _)| v.clone()) {
            if let std::collections::hash_map::Entry::Vacant(e) = versions.entry(v.clone()) {
                e.insert(rt.apps().get(&app, &v));
            }
        }
        let versions = &versions;
        // Several at a time.
        let started: Vec<_> = futures::stream::iter(installs.into_iter().chain(rollbacks))
            .map(|(twin, version, marker)| async move {
                let res = match &versions[&version] {
                    Ok(v) => rt.install_version(&twin, v, Some(marker.clone())).await,
                    Err(e) => Err(e.clone()),
                };
                (twin, marker, res)
            })
            .buffer_unordered(CONCURRENT_INSTALLS)
            .collect()
            .await;
        let now = rt.clock().now();
        for (twin, marker, res) in started {
            let rollback = marker != id;
            match (res, rollback) {
                (Ok(job), false) => {
                    if let Some(ok) = outcome(&job).filter(|_| job.rollout.as_deref() == Some(id.as_str())) {
                        more.extend(r.result(&twin, ok, job.previous.clone(), now));
                    }
                }
                (Err(e), false) => more.extend(r.result(&twin, Err(e.to_string()), None, now)),
                (Ok(_), true) => {}
                (Err(e), true) => r.rolled_back(&twin, Err(e.to_string()), now),
            }
        }
        queue = more;
    }
    wake
}

/// Applies what the twins reported about installs of rollout `id`.
fn news(r: &mut Rollout, id: &str, twin: &str, job: &InstallJob, now: Timestamp, pending: &mut Vec<Action>) {
    if job.rollout.as_deref() == Some(id) {
        if let Some(ok) = outcome(job) {
            pending.extend(r.result(twin, ok, job.previous.clone(), now));
        }
    } else if job.rollout.as_deref() == Some(rollback_of(id).as_str())
        && let Some(ok) = outcome(job)
    {
        r.rolled_back(twin, ok, now);
    }
}

async fn run(rt: TwinRuntime, mut r: Rollout, mut control: mpsc::UnboundedReceiver<RolloutControl>) {
    let id = r.spec.id.clone();
    let mut installs = rt.env.installs.subscribe();
    let mut alerts = rt.alert_book().subscribe();
    // Where the twins stand now (a restart may have missed their news).
    let mut pending = poll(&rt, &mut r).await;
    catch_up_alerts(&rt, &mut r);
    // The state last stored (results alone are stored at most every `STORE_EVERY`:
    // a restart asks the twins for them again).
    let mut stored = None::<(usize, Option<twinfleet_models::rollout::Gate>, String)>;
    let mut last_store = std::time::Instant::now();
    loop {
        let now = rt.clock().now();
        let mut actions = std::mem::take(&mut pending);
        actions.extend(r.step(now, rt.alert_book().revision()));
        let shape = (r.wave, r.gate, format!("{:?}", r.state));
        let must = !actions.is_empty() || stored.as_ref() != Some(&shape) || r.is_final();
        if must || last_store.elapsed() >= STORE_EVERY {
            // Durable before anything is done about it: a restart redoes, never forgets.
            if let Err(e) = store(&rt, &r).await {
                tracing::error!(
                    rollout = id,
                    "the rollout's state cannot be stored; it stops here until a restart: {e}"
                );
                return;
            }
            stored = Some(shape);
            last_store = std::time::Instant::now();
        }
        if !actions.is_empty() {
            let wake = carry_out(&rt, &mut r, actions).await;
            if let Some(w) = wake {
                pending.push(Action::WakeAt(w));
            }
            if let Err(e) = store(&rt, &r).await {
                tracing::error!(rollout = id, "the rollout's state cannot be stored: {e}");
                return;
            }
            last_store = std::time::Instant::now();
            // (A wake-up alone needs no step now.)
            if pending.iter().all(|a| matches!(a, Action::WakeAt(_))) {
                let w = pending.drain(..).filter_map(|a| if let Action::WakeAt(t) = a { Some(t) } else { None }).min();
                if !r.is_final()
                    && wait(&rt, &mut r, &id, w, &mut control, &mut installs, &mut alerts, &mut pending).await
                {
                    return;
                }
            }
            continue;
        }
        if r.is_final() {
            tracing::info!(rollout = id, state = ?r.state, "rollout ended");
            // A control that came too late learns it ended.
            control.close();
            while let Ok((_, reply)) = control.try_recv() {
                let _ = reply.send(Err(format!("rollout {id} has ended")));
            }
            return;
        }
        let w = r.gate.map(|g| g.until);
        if wait(&rt, &mut r, &id, w, &mut control, &mut installs, &mut alerts, &mut pending).await {
            return;
        }
    }
}

/// Waits for the next thing that matters: `until` on the platform clock, an operator's
/// control, the twins' news (all that is queued), an alert, or (with results not stored
/// yet) the next store. `true`: the driver must stop.
#[allow(clippy::too_many_arguments)]
async fn wait(
    rt: &TwinRuntime,
    r: &mut Rollout,
    id: &str,
    until: Option<Timestamp>,
    control: &mut mpsc::UnboundedReceiver<RolloutControl>,
    installs: &mut broadcast::Receiver<(String, InstallJob)>,
    alerts: &mut broadcast::Receiver<crate::alerting::Change>,
    pending: &mut Vec<Action>,
) -> bool {
    let sleep = rt.clock().sleep_until(until.unwrap_or(Timestamp(i64::MAX / 2)));
    tokio::select! {
        _ = sleep => {}
        _ = tokio::time::sleep(STORE_EVERY) => {}
        c = control.recv() => match c {
            Some((c, reply)) => {
                let answer = r.control(c, rt.clock().now()).map(|()| r.clone());
                if answer.is_ok()
                    && let Err(e) = store(rt, r).await
                {
                    let _ = reply.send(Err(format!("not stored: {e}")));
                    return false;
                }
                let _ = reply.send(answer);
            }
            None => return true,
        },
        first = installs.recv() => {
            let mut next = Some(first);
            while let Some(item) = next.take() {
                match item {
                    Ok((twin, job)) => news(r, id, &twin, &job, rt.clock().now(), pending),
                    Err(broadcast::error::RecvError::Lagged(_)) => pending.extend(poll(rt, r).await),
                    Err(broadcast::error::RecvError::Closed) => return true,
                }
                // Everything already queued, in one go.
                next = match installs.try_recv() {
                    Ok(v) => Some(Ok(v)),
                    Err(broadcast::error::TryRecvError::Lagged(n)) => Some(Err(broadcast::error::RecvError::Lagged(n))),
                    Err(_) => None,
                };
            }
        },
        change = alerts.recv() => match change {
            Ok((_, a)) if a.state == AlertState::Raised => r.alert(&a.twin, a.severity, &a.rule, a.raised_at),
            Ok(_) => {}
            Err(broadcast::error::RecvError::Lagged(_)) => catch_up_alerts(rt, r),
            Err(broadcast::error::RecvError::Closed) => {}
        },
    }
    false
}
