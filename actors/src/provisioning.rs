//! Provisioning: the TDTA's onboarding service. Each claim runs its device type's process
//! (`twinfleet_models::provisioning`, declared in the type's model file, the paper's
//! default otherwise) as one instance per device serial, persisted in
//! `spaces::PROVISIONING` after every transition, its step log inside.
//!
//! The runner carries out the machine's effects: it runs each step (check the identity,
//! create the twin, issue its token, apply configuration, record the baseline apps,
//! wait for the device's confirmation, remove the transient credentials), arms each
//! step's deadline on the platform clock (virtual in tests; a timer whose state or
//! attempt is over decides nothing), and raises the machine's alerts. A process waiting
//! for a human is listed as pending until an operator approves or rejects it; one
//! waiting for confirmation ends when the device first authenticates on an operational
//! gateway. After a restart every unfinished process resumes where it stood (its step
//! runs again; steps are idempotent).
//!
//! Identity: one process per (type, serial). A second claim for a known serial with a
//! different MAC is refused and alerts; the same device repeating its claim gets the
//! same answer. A claim without a MAC cannot prove it is the same device, so it is
//! answered only while its process waits for approval (a claim token cannot take over a
//! device).
//!
//! Pre-registration: a serial on the type's allow-list or in an imported batch
//! (`crate::batches`) is pre-registered; a batch may override the type's mode, and its
//! own claim token claims only its serials. The gateway manager allocates each new
//! device an operational gateway among `Settings::gateways` by its type's policy
//! (`twinfleet_models::enrollment::allocate`) before its process starts; a claim from an
//! unknown region is refused there.

use crate::claims::claim_key;
use crate::error::TwinError;
use crate::records::TwinSpec;
use crate::spaces;
use crate::supervisor::TwinRuntime;
use crate::tdta::ClaimCredential;
use serde::{Deserialize, Serialize};
use twinfleet_models::enrollment::GatewaySpec;
use twinfleet_models::provisioning::{
    Actor, Facts, Identity, Input, LogEntry, Mode, ProcessSpec, ProvisionEffect, Provisioning, Reprovision, Step,
};
use twinfleet_models::{Alert, AlertKind, DeviceTypeId, Effect, Metadata, Severity, Timestamp, TwinId};
use twinfleet_runtime::{WriteBatch, decode_record, encode_record};

/// One device's claim as stored.
#[derive(Debug, Clone, Serialize, Deserialize)]
struct ClaimRecord {
    device_type: DeviceTypeId,
    device_id: TwinId,
    identity: Identity,
    #[serde(default)]
    metadata: Metadata,
    process: Provisioning,
    /// The device's operational token, held for it until it confirms (then removed:
    /// the transient credential of the claim phase).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    token: Option<String>,
    /// The pre-registered batch it belongs to.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    batch: Option<String>,
    /// The operational gateway allocated to it (by name; none configured: the one it
    /// claimed through).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    gateway: Option<String>,
    /// The keyed hash of the proof of the claim that started the process.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    proof: Option<String>,
}

/// What a claim is answered.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum ClaimAnswer {
    /// The device's credentials: connect to the operational gateway and confirm
    /// (`gateway`: the one allocated; `None`: the gateway it claimed through).
    Credentials { device_id: TwinId, token: String, state: String, gateway: Option<GatewaySpec> },
    /// Waiting (for a human); ask again later.
    Pending { state: String },
    /// Over without credentials for this claim.
    Refused { state: String, reason: String },
}

/// A process as the operator API shows it.
#[derive(Debug, Clone, PartialEq, Serialize)]
#[cfg_attr(feature = "openapi", derive(utoipa::ToSchema))]
pub struct ClaimView {
    pub device_type: DeviceTypeId,
    pub device_id: TwinId,
    pub identity: Identity,
    pub state: String,
    /// The attempt of the state's step (0: the first; each retry after a deadline adds 1).
    pub attempt: u32,
    /// Set once the process is in a final state.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub outcome: Option<String>,
    /// The pre-registered batch of the device.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub batch: Option<String>,
    /// The operational gateway allocated to it.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub gateway: Option<String>,
    pub log: Vec<LogEntry>,
}

impl ClaimRecord {
    fn view(&self, spec: &ProcessSpec) -> ClaimView {
        ClaimView {
            device_type: self.device_type.clone(),
            device_id: self.device_id.clone(),
            identity: self.identity.clone(),
            state: self.process.state.clone(),
            attempt: self.process.attempt,
            outcome: self.process.outcome(spec),
            batch: self.batch.clone(),
            gateway: self.gateway.clone(),
            log: self.process.log.clone(),
        }
    }
}

/// A type's provisioning rules (see `crate::claims::Rules`).
fn rules(rt: &TwinRuntime, ty: &str) -> Result<std::sync::Arc<crate::claims::Rules>, TwinError> {
    Ok(rt.device_type(ty)?.claim_rules())
}

impl TwinRuntime {
    fn load_claim(&self, key: &str) -> Result<Option<ClaimRecord>, TwinError> {
        match self.env.storage.get(spaces::PROVISIONING, key.as_bytes())? {
            None => Ok(None),
            Some(raw) => decode_record(&raw)
                .map(Some)
                .map_err(|e| TwinError::Invalid(format!("provisioning record {key:?} does not decode: {e}"))),
        }
    }

    async fn store_claim(&self, key: &str, rec: &ClaimRecord, process: &ProcessSpec) -> Result<(), TwinError> {
        let mut b = WriteBatch::new();
        b.put(spaces::PROVISIONING, key, encode_record(rec));
        // (The index of unfinished processes, which a start reads, moves with it.)
        if rec.process.outcome(process).is_some() {
            b.delete(spaces::PROVISIONING_OPEN, key);
        } else {
            b.put(spaces::PROVISIONING_OPEN, key, Vec::new());
        }
        self.env.storage.submit(b).await?;
        Ok(())
    }

    /// A device of type `ty` claims (the caller checked the claim token): starts its
    /// process or answers from where it stands.
    pub async fn claim(
        &self,
        ty: &str,
        device_id: &str,
        identity: Option<Identity>,
        metadata: Metadata,
    ) -> Result<ClaimAnswer, TwinError> {
        let cred = ClaimCredential { ty: self.device_type(ty)?, batch: None };
        let claim = Claim { device_id: device_id.to_string(), identity, metadata, ..Claim::default() };
        self.claim_from(&cred, claim).await
    }

    /// [`TwinRuntime::claim`] with checked claim credential `cred` (a type's or a batch's,
    /// `TwinRuntime::authenticate_claim`), from `source` (the device's address, where the
    /// gateway knows it). Claims are rate-limited per claim credential and per source
    /// (`Settings::claims_per_credential`, `claims_per_source`) before anything else is
    /// done: a flood is refused cheaply (`TwinError::RateLimited`, counted
    /// `rate_limited`).
    pub async fn claim_from(&self, cred: &ClaimCredential, claim: Claim) -> Result<ClaimAnswer, TwinError> {
        let Claim { device_id, identity, metadata, proof, source } = claim;
        let device_id = device_id.as_str();
        let now = self.env.clock.now();
        let settings = &self.env.settings;
        let limited = |what: String, retry_after_ms: u64| TwinError::RateLimited { what, retry_after_ms };
        if let Some(ip) = source {
            self.env
                .claims
                .admit(format!("src/{ip}"), &settings.claims_per_source, now)
                .map_err(|ms| limited(format!("claims from {ip}"), ms))?;
        }
        let name = cred.name();
        self.env
            .claims
            .admit(format!("cred/{name}"), &settings.claims_per_credential, now)
            .map_err(|ms| limited(format!("claims with the claim token of {name}"), ms))?;
        let ty = cred.ty.id().as_str();
        if let Some(p) = &proof
            && !(crate::credentials::MIN_PROOF_LEN..=256).contains(&p.len())
        {
            return Err(TwinError::Invalid(format!(
                "a claim's proof has {} to 256 bytes, not {}",
                crate::credentials::MIN_PROOF_LEN,
                p.len()
            )));
        }
        let proof_hash = proof.as_deref().map(|p| self.env.credentials.proof_hash(p));
        let device_id = TwinId::new(device_id)?;
        let identity = identity.unwrap_or_else(|| Identity { serial: device_id.to_string(), ..Identity::default() });
        identity.validate().map_err(|e| TwinError::Invalid(format!("identity: {e}")))?;
        let r = rules(self, ty)?;
        let registered = self.registration(ty, &identity.serial)?;
        if let Some(batch) = &cred.batch
            && registered.as_ref().is_none_or(|reg| &reg.batch != batch)
        {
            return Err(TwinError::Unauthenticated(format!(
                "serial {:?} is not in batch {batch:?} of {ty}; that batch's claim token claims only its devices",
                identity.serial
            )));
        }
        if let Some(reg) = &registered
            && !reg.identity.mac.is_empty()
            && !reg.identity.mac.eq_ignore_ascii_case(&identity.mac)
        {
            let msg = format!(
                "a claim for serial {:?} of {ty} came with MAC {:?}; batch {:?} registered it with {:?}",
                identity.serial, identity.mac, reg.batch, reg.identity.mac
            );
            self.identity_alert(ty, &msg);
            return Err(TwinError::Conflict(msg));
        }
        let facts = claim_facts(&r, &identity.serial, registered.as_ref());
        let process = &r.process;
        let key = claim_key(ty, &identity.serial);
        let _turn = self.env.claims.turn(&key).await;
        if let Some(rec) = self.load_claim(&key)? {
            let same = !identity.mac.is_empty() && rec.identity.mac == identity.mac && rec.device_id == device_id;
            if !identity.mac.is_empty() && !rec.identity.mac.is_empty() && rec.identity.mac != identity.mac {
                let msg = format!(
                    "a claim for serial {:?} of {ty} came with MAC {:?}; the device provisioned with it has {:?}",
                    identity.serial, identity.mac, rec.identity.mac
                );
                self.identity_alert(ty, &msg);
                return Err(TwinError::Conflict(msg));
            }
            let waiting = self.env.claims.pending.contains(&key);
            let finished = rec.process.outcome(process).is_some() && rec.token.is_none();
            if same && finished && r.spec.reprovision != Reprovision::Refuse {
                let mut rec = rec;
                rec.proof = proof_hash;
                return self.reprovision(&key, rec, &r, facts).await;
            }
            if rec.proof.is_some() && rec.proof != proof_hash {
                return Err(TwinError::Conflict(format!(
                    "serial {:?} of {ty} is being provisioned by the claimant that started it; this claim's proof is not its",
                    identity.serial
                )));
            }
            return if same || (waiting && rec.device_id == device_id) {
                Ok(self.answer(&rec, process))
            } else {
                Err(TwinError::AlreadyExists { kind: "provisioned device", id: device_id.to_string() })
            };
        }
        if facts.mode == Mode::Manual {
            return Err(TwinError::Conflict(format!(
                "devices of type {ty} are registered by an operator, who hands their credentials over"
            )));
        }
        let gateway = self.allocate_gateway(&r, &identity)?;
        let batch = registered.map(|reg| reg.batch);
        let new = NewClaim { device_id, identity, metadata, batch, gateway, proof: proof_hash };
        self.start_claim(&key, &r, ty, new, facts, Actor::Device, "claim received").await
    }

    /// The gateway manager: the operational gateway for the device of `identity`.
    fn allocate_gateway(&self, r: &crate::claims::Rules, identity: &Identity) -> Result<Option<String>, TwinError> {
        twinfleet_models::enrollment::allocate(r.spec.allocation.as_ref(), &self.env.settings.gateways, identity)
            .map(|g| g.map(|g| g.name.clone()))
            .map_err(|e| TwinError::Invalid(format!("allocation: {e}")))
    }

    fn identity_alert(&self, ty: &str, msg: &str) {
        self.env.alerts.raise(Alert {
            at: self.env.clock.now(),
            severity: Severity::Warning,
            kind: AlertKind::DeadlineExceeded,
            source: format!("tdta/{ty}"),
            message: msg.to_string(),
        });
    }

    /// Starts a new process for `new` (no record exists for its key).
    #[allow(clippy::too_many_arguments)]
    async fn start_claim(
        &self,
        key: &str,
        r: &crate::claims::Rules,
        ty: &str,
        new: NewClaim,
        mut facts: Facts,
        actor: Actor,
        note: &str,
    ) -> Result<ClaimAnswer, TwinError> {
        let NewClaim { device_id, identity, metadata, batch, gateway, proof } = new;
        let process = &r.process;
        if let Ok(t) = self.twin(device_id.as_str()) {
            // Only the twin a crashed run of this very device made (same serial and MAC)
            // is taken up again; any other twin of that id is not the claimant's.
            let ours = !identity.mac.is_empty()
                && self.twin_identity(&t).await.is_some_and(|i| i.serial == identity.serial && i.mac == identity.mac);
            if !ours {
                return Err(TwinError::AlreadyExists { kind: "twin", id: device_id.to_string() });
            }
        }
        if matches!(actor, Actor::Operator(_)) {
            // An operator's registration is its approval.
            facts = Facts { mode: Mode::Automatic, pre_registered: true };
        }
        let now = self.env.clock.now();
        let (p, decision) = Provisioning::start_by(process, facts, actor, note, now);
        let mut rec = ClaimRecord {
            device_type: DeviceTypeId::new(ty)?,
            device_id,
            identity,
            metadata,
            process: p,
            token: None,
            batch,
            gateway,
            proof,
        };
        self.drive(key, &mut rec, process, decision.effects).await?;
        Ok(self.answer(&rec, process))
    }

    /// The manual mode: operator `operator` registers device `device_id` of type `ty`
    /// (any mode); the process runs as for a pre-approved claim and the answer holds the
    /// device's credentials for the operator to hand over. The device confirms by
    /// connecting with them.
    pub async fn register_device(
        &self,
        ty: &str,
        device_id: &str,
        identity: Option<Identity>,
        metadata: Metadata,
        operator: &str,
    ) -> Result<ClaimAnswer, TwinError> {
        let device_id = TwinId::new(device_id)?;
        let identity = identity.unwrap_or_else(|| Identity { serial: device_id.to_string(), ..Identity::default() });
        identity.validate().map_err(|e| TwinError::Invalid(format!("identity: {e}")))?;
        let r = rules(self, ty)?;
        let key = claim_key(ty, &identity.serial);
        let _turn = self.env.claims.turn(&key).await;
        if self.load_claim(&key)?.is_some() {
            return Err(TwinError::AlreadyExists { kind: "provisioned device", id: identity.serial });
        }
        let who = Actor::Operator(operator.to_string());
        let registered = self.registration(ty, &identity.serial)?;
        let facts = claim_facts(&r, &identity.serial, registered.as_ref());
        let gateway = self.allocate_gateway(&r, &identity)?;
        let batch = registered.map(|reg| reg.batch);
        let new = NewClaim { device_id, identity, metadata, batch, gateway, proof: None };
        self.start_claim(&key, &r, ty, new, facts, who, "registered by an operator").await
    }

    /// Approves every pending claim of `serials` of type `ty`; each one's result.
    pub async fn approve_claims(
        &self,
        ty: &str,
        serials: &[String],
        operator: &str,
    ) -> Vec<(String, Result<ClaimView, TwinError>)> {
        let all = serials.iter().map(|s| async move { (s.clone(), self.approve_claim(ty, s, operator).await) });
        futures::future::join_all(all).await
    }

    /// A provisioned device claims again and its type reprovisions: the process runs
    /// again (its earlier log kept in front), on the same twin (`keep`) or on a new one
    /// (`reset`: the old twin is deleted first).
    async fn reprovision(
        &self,
        key: &str,
        mut rec: ClaimRecord,
        r: &crate::claims::Rules,
        facts: Facts,
    ) -> Result<ClaimAnswer, TwinError> {
        let id = rec.device_id.to_string();
        let process = &r.process;
        match (r.spec.reprovision, self.twin(&id)) {
            (Reprovision::Keep, Ok(t)) if t.slot().archived() => {
                return Err(TwinError::Conflict(format!(
                    "twin {id} is archived (decommissioned); its type reprovisions with `keep`, which needs a live twin"
                )));
            }
            (Reprovision::Reset, Ok(_)) => self.delete_twin(&id).await?,
            _ => {}
        }
        let now = self.env.clock.now();
        let (mut p, decision) = Provisioning::start(process, facts, now);
        let mut log = std::mem::take(&mut rec.process.log);
        log.append(&mut p.log);
        p.log = log;
        if let Some(first) = p.log.last_mut() {
            first.note = format!("claimed again: reprovision ({:?})", r.spec.reprovision).to_lowercase();
        }
        rec.process = p;
        self.drive(key, &mut rec, process, decision.effects).await?;
        Ok(self.answer(&rec, process))
    }

    /// Decommissions device `id`: its token is revoked and its twin archived, so it is
    /// refused on every gateway and its open sessions end at once; the twin and its
    /// history stay (archived, not lost).
    pub async fn decommission(&self, id: &str) -> Result<u64, TwinError> {
        let twin = self.twin(id)?;
        self.revoke_device_token(id).await?;
        twin.command(twinfleet_models::TwinCommand::Archive).await
    }

    /// Carries out `effects` and whatever the steps they run decide until the process
    /// waits or ends, then stores it.
    async fn drive(
        &self,
        key: &str,
        rec: &mut ClaimRecord,
        process: &ProcessSpec,
        mut effects: Vec<ProvisionEffect>,
    ) -> Result<(), TwinError> {
        while !effects.is_empty() {
            let mut next = Vec::new();
            for e in std::mem::take(&mut effects) {
                match e {
                    ProvisionEffect::Run { step, .. } => {
                        let (input, note) = self.run_step(key, rec, step).await;
                        let Some(input) = input else { continue };
                        let now = self.env.clock.now();
                        match rec.process.decide(process, input, Actor::Tdta, &note, now) {
                            Ok(d) => {
                                d.events.iter().for_each(|ev| rec.process.evolve(ev));
                                next.extend(d.effects);
                            }
                            Err(why) => tracing::warn!(claim = key, "provisioning step result not taken: {why}"),
                        }
                    }
                    ProvisionEffect::Core(Effect::ArmWait { attempt, deadline, .. }) => {
                        self.arm_claim(key, rec.process.log.len(), attempt, deadline);
                    }
                    ProvisionEffect::Core(Effect::RaiseAlert { kind, severity, message }) => {
                        self.env.alerts.raise(Alert {
                            at: self.env.clock.now(),
                            severity,
                            kind,
                            source: format!("tdta/{}", rec.device_type),
                            message: format!("{}: {message}", rec.device_id),
                        });
                    }
                    ProvisionEffect::Core(_) => {}
                }
            }
            effects = next;
        }
        // One write for the whole run, once the process waits or ends, before anyone is
        // answered. (A crash before it resumes from the state stored last; its steps run
        // again: the twin made for this serial is recognised, a token issued again.)
        self.store_claim(key, rec, process).await?;
        // Leaving a waiting state: no longer listed.
        let waits_for_human =
            rec.process.state_spec(process).is_some_and(|s| s.step == Some(Step::AwaitApproval) || s.human);
        if !waits_for_human {
            self.env.claims.pending.remove(key);
        }
        if rec.process.outcome(process).is_some() {
            self.env.claims.awaiting_confirmation.remove(rec.device_id.as_str());
        }
        Ok(())
    }

    /// Runs one step; `None` when the step waits for someone outside, or failed for a
    /// passing reason (a full disk, a busy twin: its deadline runs it again).
    async fn run_step(&self, key: &str, rec: &mut ClaimRecord, step: Step) -> (Option<Input>, String) {
        let ok = |note: &str| (Some(Input::Done), note.to_string());
        let failed = |e: TwinError| {
            let passing = matches!(
                e,
                TwinError::Storage(_)
                    | TwinError::MailboxFull(_)
                    | TwinError::Timeout { .. }
                    | TwinError::Unavailable { .. }
                    | TwinError::ShuttingDown
            );
            if passing {
                tracing::warn!(claim = key, "provisioning step {step:?} failed for now: {e}; retried at its deadline");
                (None, e.to_string())
            } else {
                (Some(Input::Failed), e.to_string())
            }
        };
        match step {
            Step::CheckIdentity => match self.twin(rec.device_id.as_str()) {
                // (Reprovisioned with `keep`: the twin this identity was provisioned as.)
                Ok(t) if self.twin_identity(&t).await.is_some_and(|i| i.serial == rec.identity.serial) => {
                    ok("known device; its twin is kept")
                }
                Ok(_) => (Some(Input::Failed), format!("a twin {} exists already", rec.device_id)),
                Err(_) => ok("identity recorded"),
            },
            Step::AwaitApproval => {
                self.env.claims.pending.insert(key.to_string());
                (None, String::new())
            }
            Step::CreateTwin => {
                let mut spec = TwinSpec::new(rec.device_id.clone());
                spec.metadata = rec.metadata.clone();
                let identity = serde_json::to_value(&rec.identity).unwrap_or_default();
                spec.metadata.attributes.insert("identity".into(), identity);
                // The twin, its token and this process's record (holding the token) are one
                // write: nothing half-created is left behind by a crash.
                let now = self.env.clock.now();
                let holder = crate::credentials::Holder::Device(rec.device_id.as_str());
                let (token, mut prepared) = match self.env.credentials.prepare(holder, now) {
                    Ok(t) => t,
                    Err(e) => return failed(e),
                };
                let before = rec.token.replace(token.clone());
                let mut also = std::mem::take(&mut prepared.batch);
                also.put(spaces::PROVISIONING, key, encode_record(&*rec));
                also.put(spaces::PROVISIONING_OPEN, key, Vec::new());
                let created = match self.device_type(rec.device_type.as_str()) {
                    Ok(h) => h.spawn_fleet_with(vec![spec], also).await.map(drop),
                    Err(e) => Err(e),
                };
                match created {
                    Ok(()) => {
                        self.env.credentials.installed(prepared);
                        self.env.sessions.issued(rec.device_id.as_str(), &token);
                        ok("twin created with its credentials")
                    }
                    // (Resumed after a crash: the twin this process made is there, with
                    // the token its record holds.)
                    // (The prepared token was not written; a reprovisioned twin gets a new
                    // one in the next step.)
                    Err(TwinError::AlreadyExists { .. }) => {
                        rec.token = before;
                        ok("twin created")
                    }
                    Err(e) => {
                        rec.token = before;
                        failed(e)
                    }
                }
            }
            Step::IssueCredentials => {
                let note = match &rec.gateway {
                    Some(g) => format!("unique credentials issued for operational gateway {g}"),
                    None => "unique credentials issued for the operational gateway".to_string(),
                };
                match &rec.token {
                    Some(_) => ok(&note),
                    None => match self.issue_device_token(rec.device_id.as_str()).await {
                        Ok(token) => {
                            rec.token = Some(token);
                            ok(&note)
                        }
                        Err(e) => failed(e),
                    },
                }
            }
            Step::ApplyConfiguration => ok("type defaults and group layers apply"),
            Step::RequestApps => ok("baseline apps requested (recorded)"),
            Step::AwaitConfirmation => {
                self.env.claims.awaiting_confirmation.insert(rec.device_id.to_string(), key.to_string());
                (None, String::new())
            }
            Step::RemoveClaim => {
                rec.token = None;
                ok("transient credentials removed")
            }
        }
    }

    /// The identity a twin was provisioned with (in its metadata).
    async fn twin_identity(&self, t: &crate::TwinHandle) -> Option<Identity> {
        let v = t.get().await.ok()?;
        serde_json::from_value(v.state.metadata.attributes.get("identity")?.clone()).ok()
    }

    /// The deadline of the step entered as log entry `epoch`, attempt `attempt`.
    fn arm_claim(&self, key: &str, epoch: usize, attempt: u32, deadline: Timestamp) {
        let (rt, key) = (self.clone(), key.to_string());
        let sleep = self.env.clock.sleep_until(deadline);
        let Ok(handle) = tokio::runtime::Handle::try_current() else { return };
        handle.spawn(async move {
            sleep.await;
            if let Err(e) = rt.claim_deadline(&key, epoch, attempt).await {
                tracing::warn!(claim = key, "a provisioning deadline could not be handled: {e}");
            }
        });
    }

    async fn claim_deadline(&self, key: &str, epoch: usize, attempt: u32) -> Result<(), TwinError> {
        let _turn = self.env.claims.turn(key).await;
        let Some(mut rec) = self.load_claim(key)? else { return Ok(()) };
        if rec.process.log.len() != epoch {
            return Ok(()); // the state it was armed for is over
        }
        let r = rules(self, rec.device_type.as_str())?;
        let process = &r.process;
        let d = rec.process.on_deadline(process, attempt, self.env.clock.now());
        if d.events.is_empty() && d.effects.is_empty() {
            return Ok(());
        }
        d.events.iter().for_each(|e| rec.process.evolve(e));
        self.drive(key, &mut rec, process, d.effects).await
    }

    /// Feeds an operator's or the device's input to the process of `key`.
    async fn feed_claim(&self, key: &str, input: Input, actor: Actor, note: &str) -> Result<ClaimView, TwinError> {
        let _turn = self.env.claims.turn(key).await;
        let mut rec = self
            .load_claim(key)?
            .ok_or_else(|| TwinError::NotFound(format!("provisioning of {}", key.replace('\0', "/"))))?;
        let r = rules(self, rec.device_type.as_str())?;
        let process = &r.process;
        let d = rec
            .process
            .decide(process, input, actor, note, self.env.clock.now())
            .map_err(|e| TwinError::Conflict(e.to_string()))?;
        d.events.iter().for_each(|e| rec.process.evolve(e));
        self.drive(key, &mut rec, process, d.effects).await?;
        Ok(rec.view(process))
    }

    /// An operator approves the pending claim of serial `serial` of type `ty`.
    pub async fn approve_claim(&self, ty: &str, serial: &str, operator: &str) -> Result<ClaimView, TwinError> {
        self.feed_claim(&claim_key(ty, serial), Input::Approved, Actor::Operator(operator.into()), "approved").await
    }

    pub async fn reject_claim(
        &self,
        ty: &str,
        serial: &str,
        operator: &str,
        reason: &str,
    ) -> Result<ClaimView, TwinError> {
        self.feed_claim(&claim_key(ty, serial), Input::Rejected, Actor::Operator(operator.into()), reason).await
    }

    /// A process by type and serial, with its log.
    pub fn claim_view(&self, ty: &str, serial: &str) -> Result<ClaimView, TwinError> {
        let rec = self
            .load_claim(&claim_key(ty, serial))?
            .ok_or_else(|| TwinError::NotFound(format!("provisioning of {ty}/{serial}")))?;
        Ok(rec.view(&rules(self, ty)?.process))
    }

    /// Processes that wait for a human.
    pub fn pending_claims(&self) -> Vec<ClaimView> {
        let mut keys: Vec<String> = self.env.claims.pending.iter().map(|k| k.clone()).collect();
        keys.sort();
        keys.iter()
            .filter_map(|k| {
                let rec = self.load_claim(k).ok()??;
                Some(rec.view(&rules(self, rec.device_type.as_str()).ok()?.process))
            })
            .collect()
    }

    /// Device `id` reached its twin through a gateway that authenticated it (an external
    /// broker's transformer calls this for each device message; twinfleet's own gateways
    /// through [`TwinRuntime::authenticate_device`]): ends its provisioning process if
    /// that waited for it. Cheap when nothing waits for this device.
    pub fn device_connected(&self, id: &str) {
        self.device_confirmed(id)
    }

    pub(crate) fn device_confirmed(&self, id: &str) {
        // (Every authentication comes here: one shard's read lock, no write, when nothing
        // waits for this device; `is_empty` would lock every shard.)
        if !self.env.claims.awaiting_confirmation.contains_key(id) {
            return;
        }
        let Some((_, key)) = self.env.claims.awaiting_confirmation.remove(id) else { return };
        let rt = self.clone();
        let Ok(handle) = tokio::runtime::Handle::try_current() else { return };
        handle.spawn(async move {
            if let Err(e) = rt.feed_claim(&key, Input::Confirmed, Actor::Device, "connected to its gateway").await {
                tracing::warn!(claim = key, "provisioning confirmation not taken: {e}");
            }
        });
    }

    /// After a restart: every unfinished process resumes (its step runs again, its
    /// deadline is re-armed, waiting lists are rebuilt).
    /// Only the index of unfinished processes is read; a data directory of before the
    /// index is scanned whole once, which writes it.
    pub(crate) async fn resume_claims(&self) -> Result<usize, TwinError> {
        let indexed = self.env.storage.get(spaces::META, OPEN_INDEX)?.is_some();
        let space = if indexed { spaces::PROVISIONING_OPEN } else { spaces::PROVISIONING };
        let mut keys = Vec::new();
        for row in self.env.storage.scan(space, b"") {
            keys.push(String::from_utf8_lossy(&row?.0).to_string());
        }
        let mut resumed = 0;
        for key in keys {
            let _turn = self.env.claims.turn(&key).await;
            let Some(mut rec) = self.load_claim(&key)? else { continue };
            let Ok(r) = rules(self, rec.device_type.as_str()) else { continue };
            let process = &r.process;
            if rec.process.outcome(process).is_some() {
                continue;
            }
            let effects = rec.process.resume(process, self.env.clock.now());
            self.drive(&key, &mut rec, process, effects).await?;
            resumed += 1;
        }
        if !indexed {
            let mut b = WriteBatch::new();
            b.put(spaces::META, OPEN_INDEX, Vec::new());
            self.env.storage.submit(b).await?;
        }
        Ok(resumed)
    }
}

/// `META` key: `spaces::PROVISIONING_OPEN` is complete in this data directory.
const OPEN_INDEX: &[u8] = b"provisioning-open-index";

/// What a new process starts with.
struct NewClaim {
    device_id: TwinId,
    identity: Identity,
    metadata: Metadata,
    batch: Option<String>,
    gateway: Option<String>,
    proof: Option<String>,
}

/// A device's claim, as a gateway received it.
#[derive(Debug, Clone, Default)]
pub struct Claim {
    pub device_id: String,
    /// Default: serial = the device id.
    pub identity: Option<Identity>,
    pub metadata: Metadata,
    /// The claimant's secret (`credentials::MIN_PROOF_LEN` to 256 bytes), sent only in
    /// its request: the process is bound to the first claim's proof (a later claim
    /// must present it to be answered), and an edge whose answers others may read
    /// seals the token with it (`credentials::seal_token`).
    pub proof: Option<String>,
    /// The device's address, where the gateway knows it.
    pub source: Option<std::net::IpAddr>,
}

/// The facts of a claim by `serial`: pre-registered by the type's allow-list or a batch,
/// whose mode overrides the type's.
fn claim_facts(r: &crate::claims::Rules, serial: &str, registered: Option<&crate::batches::Registration>) -> Facts {
    let mut facts = r.facts(serial);
    if let Some(reg) = registered {
        facts.pre_registered = true;
        if let Some(mode) = reg.mode {
            facts.mode = mode;
        }
    }
    facts
}

impl TwinRuntime {
    fn answer(&self, rec: &ClaimRecord, process: &ProcessSpec) -> ClaimAnswer {
        let gateway = rec.gateway.as_ref().and_then(|g| self.env.settings.gateways.iter().find(|s| &s.name == g));
        answer(rec, process, gateway.cloned())
    }
}

fn answer(rec: &ClaimRecord, process: &ProcessSpec, gateway: Option<GatewaySpec>) -> ClaimAnswer {
    let state = rec.process.state.clone();
    if let Some(token) = &rec.token {
        return ClaimAnswer::Credentials { device_id: rec.device_id.clone(), token: token.clone(), state, gateway };
    }
    match rec.process.outcome(process) {
        Some(o) => ClaimAnswer::Refused {
            reason: match o.as_str() {
                "operational" => "provisioned already; connect with the credentials you received".into(),
                _ => rec.process.log.last().map(|l| l.note.clone()).filter(|n| !n.is_empty()).unwrap_or(o.clone()),
            },
            state,
        },
        None => ClaimAnswer::Pending { state },
    }
}
