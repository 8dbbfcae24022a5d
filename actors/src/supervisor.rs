//! The platform supervisor, root of the actor tree, and `TwinRuntime`, the handle
//! through which embedders and the protocol edges reach every twin.
//!
//! The supervisor creates TDTAs and DTAs; TDTAs supervise their DTIs. Device types and
//! DTAs are persisted before they are announced; creating an existing one is refused.

use crate::access::AccessControl;
use crate::context::{DeviceLink, Settings};
use crate::credentials::{AuthError, Holder};
use crate::dta::DtaHandle;
use crate::dti::{FleetReport, TypeContext};
use crate::env::TwinEnv;
use crate::error::TwinError;
use crate::group::DtaInfo;
use crate::handle::TwinHandle;
use crate::jobs::Jobs;
use crate::queued::Queued;
use crate::records::{DeviceTypeSpec, DtaSpec, TwinSpec};
use crate::restore::{RestoreReport, restore};
use crate::spaces;
use crate::tdta::Tdta;
use crate::tdta::{ClaimCredential, TypeHandle, TypeInfo};
use actix::prelude::*;
use std::sync::Arc;
use twinfleet_models::DeviceTypeId;
use twinfleet_models::Timestamp;
use twinfleet_runtime::{
    ActorStats, ActorStatus, AlertSink, Rejections, RequestMetrics, SharedClock, Storage, StorageError, StorageStats,
    WriteBatch, encode_record,
};

#[derive(Debug)]
struct CreateDeviceType(DeviceTypeSpec, Queued);

impl Message for CreateDeviceType {
    type Result = Result<(), TwinError>;
}

#[derive(Debug)]
struct CreateDta(DtaSpec, Queued);

impl Message for CreateDta {
    type Result = Result<(), TwinError>;
}

#[derive(Debug)]
struct PlatformSupervisor {
    env: Arc<TwinEnv>,
    stats: Arc<ActorStats>,
}

impl Actor for PlatformSupervisor {
    type Context = Context<Self>;
}

impl Handler<CreateDeviceType> for PlatformSupervisor {
    type Result = ResponseFuture<Result<(), TwinError>>;

    fn handle(&mut self, CreateDeviceType(spec, queued): CreateDeviceType, _: &mut Context<Self>) -> Self::Result {
        queued.taken();
        self.stats.dequeued();
        let env = self.env.clone();
        let Some(ctx) = env.directory.add_type(spec.id.clone(), || TypeContext::new(&spec, env.infra().clone())) else {
            return Box::pin(std::future::ready(Err(TwinError::AlreadyExists {
                kind: "device type",
                id: spec.id.to_string(),
            })));
        };
        let mut b = WriteBatch::new();
        b.put(spaces::DEVICE_TYPE, spec.id.as_str(), encode_record(&spec));
        let ticket = env.storage.submit(b);
        Tdta::launch(ctx, env.clone());
        Box::pin(async move {
            if let Err(e) = ticket.await {
                env.directory.remove_type(&spec.id);
                return Err(e.into());
            }
            Ok(())
        })
    }
}

impl Handler<CreateDta> for PlatformSupervisor {
    type Result = ResponseFuture<Result<(), TwinError>>;

    fn handle(&mut self, CreateDta(spec, queued): CreateDta, _: &mut Context<Self>) -> Self::Result {
        queued.taken();
        self.stats.dequeued();
        let env = self.env.clone();
        let check = || {
            if env.directory.dtas.contains_key(&spec.id) {
                return Err(TwinError::AlreadyExists { kind: "DTA", id: spec.id.to_string() });
            }
            if let Some(p) = spec.parents.iter().find(|p| !env.directory.dtas.contains_key(*p)) {
                return Err(TwinError::UnknownDta(p.to_string()));
            }
            Ok(())
        };
        if let Err(e) = check() {
            return Box::pin(std::future::ready(Err(e)));
        }
        let mut b = WriteBatch::new();
        b.put(spaces::DTA, spec.id.as_str(), encode_record(&spec));
        let ticket = env.storage.submit(b);
        crate::dta::start(spec, &env);
        Box::pin(async move { ticket.await.map_err(TwinError::from) })
    }
}

/// The handle to a running set of twins. Cheap to clone.
#[derive(Debug, Clone)]
pub struct TwinRuntime {
    pub(crate) env: Arc<TwinEnv>,
    supervisor: Addr<PlatformSupervisor>,
    /// The platform supervisor's own statistics (the root of the actor tree).
    pub(crate) stats: Arc<ActorStats>,
}

impl TwinRuntime {
    /// Starts the supervisor on the current arbiter and restores everything stored.
    pub async fn start(env: Arc<TwinEnv>) -> Result<(TwinRuntime, RestoreReport), TwinError> {
        let stats = Arc::new(ActorStats::new("platform", Arc::from("supervisor"), None));
        stats.set_status(ActorStatus::Running);
        let supervisor = PlatformSupervisor { env: env.clone(), stats: stats.clone() }.start();
        // The platform's own alerts go the way of the rules' (stream, sinks, `/alerts`),
        // from before the restore (which may quarantine).
        let mut platform_alerts = env.alerts.subscribe();
        let book = env.alert_book.clone();
        actix_rt::spawn(async move {
            loop {
                match platform_alerts.recv().await {
                    Ok(a) => {
                        if let Err(e) = book.platform_alert(&a) {
                            tracing::warn!("a platform alert did not reach the alert book: {e}");
                        }
                    }
                    Err(tokio::sync::broadcast::error::RecvError::Lagged(n)) => {
                        tracing::warn!("{n} platform alerts came too fast for the alert book (they are in the log)");
                    }
                    Err(tokio::sync::broadcast::error::RecvError::Closed) => return,
                }
            }
        });
        let report = restore(&env).await?;
        crate::compaction::start_compactor(&env);
        let rt = TwinRuntime { env, supervisor, stats };
        rt.resume_jobs();
        match rt.resume_claims().await {
            Ok(0) => {}
            Ok(n) => tracing::info!(processes = n, "provisioning processes resumed"),
            Err(e) => tracing::error!("provisioning processes could not be resumed: {e}"),
        }
        Ok((rt, report))
    }

    /// Runs one journal compaction pass now (on the blocking pool) and reports what it
    /// did; the periodic pass (`compaction`) runs the same.
    pub async fn compact_journals(&self) -> Result<crate::CompactionReport, TwinError> {
        let env = self.env.clone();
        tokio::task::spawn_blocking(move || crate::compaction::compact(&env))
            .await
            .map_err(|e| TwinError::Invalid(format!("compaction failed: {e}")))?
    }

    pub(crate) fn env(&self) -> &Arc<TwinEnv> {
        &self.env
    }

    // The narrow handles the edges (and embedders) use: one service or one piece of
    // infrastructure each, never the platform's whole environment.

    pub fn alerts(&self) -> &AlertSink {
        &self.env.alerts
    }

    /// The monitoring rules' alerts.
    pub fn alert_book(&self) -> &crate::alerting::AlertBook {
        &self.env.alert_book
    }

    /// The history exports' cursors and counters.
    pub fn exports(&self) -> &crate::exports::ExportBook {
        &self.env.exports
    }

    /// Operators: users, groups, API tokens, audit log.
    pub fn access(&self) -> &AccessControl {
        &self.env.access
    }

    /// Long-running operator jobs (submit them with [`TwinRuntime::submit_job`]).
    pub fn jobs(&self) -> &Jobs {
        &self.env.jobs
    }

    /// Counted rejections of bad input, shared by every edge.
    pub fn rejections(&self) -> &Rejections {
        &self.env.rejections
    }

    /// Requests served by the HTTP and gRPC edges.
    /// Open device sessions of every gateway; a gateway registers each authenticated
    /// connection or stream here and ends it when the platform closes it.
    pub fn sessions(&self) -> &Arc<crate::sessions::DeviceSessions> {
        &self.env.sessions
    }

    /// The metric history store.
    pub fn series(&self) -> &Arc<twinfleet_runtime::series::SeriesStore> {
        &self.env.series
    }

    pub fn requests(&self) -> &RequestMetrics {
        &self.env.requests
    }

    /// The platform clock (virtual in tests).
    pub fn clock(&self) -> &SharedClock {
        &self.env.clock
    }

    pub fn now(&self) -> Timestamp {
        self.env.clock.now()
    }

    pub fn settings(&self) -> &Settings {
        &self.env.settings
    }

    /// Whether storage takes writes now (`Full` while the disk is full).
    pub fn storage_writable(&self) -> Result<(), StorageError> {
        self.env.storage.writable()
    }

    pub fn storage_stats(&self) -> StorageStats {
        self.env.storage.stats()
    }

    /// The raw store, for tools and tests that inspect records; twins and edges never
    /// write through it.
    pub fn storage(&self) -> &Arc<dyn Storage> {
        &self.env.storage
    }

    /// Attaches a device transport under `name` (see [`DeviceLink`]).
    pub fn attach_device_link(&self, name: &'static str, link: Arc<dyn DeviceLink>) {
        self.env.attach_device_link(name, link);
    }

    pub fn detach_device_link(&self, name: &str) {
        self.env.detach_device_link(name);
    }

    pub async fn create_device_type(&self, spec: DeviceTypeSpec) -> Result<TypeHandle, TwinError> {
        twinfleet_models::limits::check_object(&spec.defaults).map_err(twinfleet_models::ModelError::from)?;
        twinfleet_models::rules::check_config(&spec.defaults, spec.metrics.as_deref())
            .map_err(twinfleet_models::ModelError::from)?;
        twinfleet_models::install::check_config(&spec.defaults).map_err(TwinError::Invalid)?;
        if let Some(domain) = &spec.domain {
            domain.check().map_err(|e| TwinError::Invalid(format!("domain model of {}: {e}", spec.id)))?;
        }
        if let Some(p) = &spec.provisioning {
            p.validate().map_err(|e| TwinError::Invalid(format!("provisioning process of {}: {e}", spec.id)))?;
            self.check_allocation(spec.id.as_str(), p.allocation.as_ref())?;
        }
        let id = spec.id.clone();
        self.supervisor
            .send(CreateDeviceType(spec, Queued::new(&self.stats)))
            .await
            .map_err(|_| TwinError::ShuttingDown)??;
        self.device_type(id.as_str())
    }

    /// A type's allocation policy can work with the configured gateways.
    fn check_allocation(
        &self,
        ty: &str,
        a: Option<&twinfleet_models::provisioning::Allocation>,
    ) -> Result<(), TwinError> {
        use twinfleet_models::provisioning::AllocationPolicy as P;
        let gateways = &self.env.settings.gateways;
        let why = match a {
            Some(a) if a.policy == P::Region && !gateways.iter().any(|g| !g.regions.is_empty()) => {
                "allocates by region, but no configured gateway has regions".to_string()
            }
            Some(a) if a.policy == P::Static => match &a.gateway {
                Some(g) if !gateways.iter().any(|s| &s.name == g) => {
                    format!("allocates to gateway {g:?}, which is not configured")
                }
                _ => return Ok(()),
            },
            _ => return Ok(()),
        };
        Err(TwinError::Invalid(format!("provisioning of {ty} {why}")))
    }

    pub async fn create_dta(&self, spec: DtaSpec) -> Result<DtaHandle, TwinError> {
        for layer in spec.layers.values() {
            twinfleet_models::limits::check_object(&layer.values).map_err(twinfleet_models::ModelError::from)?;
            // (A DTA's members may be of any type: metric names are checked per twin.)
            twinfleet_models::rules::check_config(&layer.values, None).map_err(twinfleet_models::ModelError::from)?;
            twinfleet_models::install::check_config(&layer.values).map_err(TwinError::Invalid)?;
        }
        let id = spec.id.clone();
        self.supervisor
            .send(CreateDta(spec, Queued::new(&self.stats)))
            .await
            .map_err(|_| TwinError::ShuttingDown)??;
        self.dta(id.as_str())
    }

    /// Creates many twins of one type in one call (all or nothing).
    pub async fn spawn_fleet(
        &self,
        device_type: &DeviceTypeId,
        specs: Vec<TwinSpec>,
    ) -> Result<FleetReport, TwinError> {
        self.device_type(device_type.as_str())?.spawn_fleet(specs).await
    }

    pub async fn create_twin(&self, device_type: &DeviceTypeId, spec: TwinSpec) -> Result<TwinHandle, TwinError> {
        let id = spec.id.clone();
        self.spawn_fleet(device_type, vec![spec]).await?;
        self.twin(id.as_str())
    }

    /// Issues a device token for twin `id` (replacing any earlier one) and returns it.
    /// Only its keyed hash is stored: show it to the operator once.
    pub async fn issue_device_token(&self, id: &str) -> Result<String, TwinError> {
        let twin = self.twin(id)?;
        let token = self.env.credentials.issue(Holder::Device(twin.id().as_str()), self.env.clock.now()).await?;
        self.env.sessions.close(twin.id().as_str(), "token re-issued");
        self.env.sessions.issued(twin.id().as_str(), &token);
        Ok(token)
    }

    pub async fn revoke_device_token(&self, id: &str) -> Result<(), TwinError> {
        let twin = self.twin(id)?;
        self.env.credentials.revoke(Holder::Device(twin.id().as_str())).await?;
        self.env.sessions.close(twin.id().as_str(), "token revoked");
        Ok(())
    }

    /// Issues the claim token of device type `ty`, replacing any earlier one: whoever
    /// holds it may provision new devices of that type (MQTT provisioning gateway).
    pub async fn issue_claim_token(&self, ty: &str) -> Result<String, TwinError> {
        let ty = self.device_type(ty)?;
        let token = self.env.credentials.issue(Holder::Claim(ty.id().as_str()), self.env.clock.now()).await?;
        let holder = crate::sessions::claim_holder(ty.id().as_str());
        self.env.sessions.close(&holder, "claim token re-issued");
        self.env.sessions.issued(&holder, &token);
        Ok(token)
    }

    pub async fn revoke_claim_token(&self, ty: &str) -> Result<(), TwinError> {
        let ty = self.device_type(ty)?;
        self.env.credentials.revoke(Holder::Claim(ty.id().as_str())).await?;
        self.env.sessions.close(&crate::sessions::claim_holder(ty.id().as_str()), "claim token revoked");
        Ok(())
    }

    /// Checks a claim token presented for `credential`: a device type's id (its claim
    /// token) or `<type>/<batch>` (a pre-registered batch's token, which claims only that
    /// batch's serials). Failures are counted like device ones.
    pub fn authenticate_claim(&self, credential: &str, token: &str) -> Result<ClaimCredential, AuthError> {
        let (ty, batch) = match credential.split_once('/') {
            Some((ty, b)) => (ty, Some(b)),
            None => (credential, None),
        };
        let result = match self.device_type(ty) {
            Err(_) => Err(AuthError::UnknownDevice(format!("device type {}", ty.chars().take(64).collect::<String>()))),
            Ok(h) => self
                .env
                .credentials
                .verify(Holder::Claim(credential), token)
                .map(|()| ClaimCredential { ty: h, batch: batch.map(str::to_string) }),
        };
        if let Err(e) = &result {
            self.env.rejections.reject(e.reason(), || e.to_string());
        }
        result
    }

    /// Whether `holder` (a device id, or `claim/<type>`) may connect at all: it has
    /// credentials, and a device's twin exists and is not archived. Gateways with
    /// accounts of their own reconcile them with this.
    pub fn may_connect(&self, holder: &str) -> bool {
        match holder.strip_prefix("claim/") {
            Some(cred) => {
                let ty = cred.split('/').next().unwrap_or_default();
                self.device_type(ty).is_ok() && self.env.credentials.has(Holder::Claim(cred))
            }
            None => match self.env.directory.twins.get(holder) {
                Some(slot) => !slot.archived() && self.env.credentials.has(Holder::Device(holder)),
                None => false,
            },
        }
    }

    /// The credential mapper: the twin a device may speak for, given the id and token it
    /// presents. Every failure is counted in `rejections` and logged at a limited rate.
    pub fn authenticate_device(&self, device_id: &str, token: &str) -> Result<TwinHandle, AuthError> {
        let result = match self.env.directory.twins.get(device_id).map(|s| TwinHandle::new(s.clone())) {
            None => Err(AuthError::UnknownDevice(device_id.chars().take(64).collect())),
            Some(h) if h.slot().archived() => Err(AuthError::Archived(h.id().to_string())),
            Some(h) => self.env.credentials.verify(Holder::Device(h.id().as_str()), token).map(|()| h),
        };
        match &result {
            Err(e) => {
                self.env.rejections.reject(e.reason(), || e.to_string());
            }
            Ok(h) => self.device_confirmed(h.id().as_str()),
        }
        result
    }

    pub fn twin(&self, id: &str) -> Result<TwinHandle, TwinError> {
        if let Some(slot) = self.env.directory.twins.get(id) {
            return Ok(TwinHandle::new(slot.clone()));
        }
        match self.env.directory.quarantine.get(id) {
            Some(reason) => Err(TwinError::Quarantined { id: id.to_string(), reason: reason.clone() }),
            None => Err(TwinError::NotFound(id.to_string())),
        }
    }

    /// The views of many twins, in the order of `ids`, each in place as `twin(id)` and
    /// `TwinHandle::get` would give it (the view, or why not: not found, quarantined,
    /// unavailable, timeout). Every twin answers from its own mailbox; the asking is
    /// batched per arbiter, so a page of thousands of twins costs a few cross-thread
    /// messages instead of a round trip per twin. Ask in pages (the answers are held
    /// until the whole call is done).
    pub async fn get_many<S: AsRef<str>>(&self, ids: &[S]) -> Vec<Result<crate::dti::TwinView, TwinError>> {
        let slots = ids
            .iter()
            .map(|id| match self.env.directory.twins.get(id.as_ref()) {
                Some(slot) => Ok(slot.clone()),
                None => self.twin(id.as_ref()).map(|h| h.slot().clone()),
            })
            .collect();
        crate::handle::views(self.env.infra(), slots).await
    }

    pub fn dta(&self, id: &str) -> Result<DtaHandle, TwinError> {
        self.env
            .directory
            .dtas
            .get(id)
            .map(|e| DtaHandle::new(e.clone()))
            .ok_or_else(|| TwinError::UnknownDta(id.to_string()))
    }

    pub fn device_type(&self, id: &str) -> Result<TypeHandle, TwinError> {
        self.env
            .directory
            .types
            .get(id)
            .map(|c| TypeHandle::new(c.clone()))
            .ok_or_else(|| TwinError::UnknownDeviceType(id.to_string()))
    }

    /// The app store and artifact repository.
    pub fn apps(&self) -> &crate::apps::AppStore {
        &self.env.apps
    }

    /// Installs version `version` of `app` on twin `twin`'s device: checks the app's
    /// requirements against what the twin knows of its device (its provisioning
    /// identity and its reported `platform` and `apps`); an incompatible app is refused
    /// with every reason (`TwinError::Incompatible`), and nothing is sent. Otherwise the
    /// twin runs the install (`TwinCommand::Install`): it waits for an operator's
    /// approval if the app version or the twin's configuration (`install_approval`)
    /// asks for it, then for the maintenance window of its configuration
    /// (`maintenance_window`), then sends `install_app` with the artifact for the
    /// device's OS and architecture and awaits the answer. Returns the install as it
    /// stands.
    pub async fn install(
        &self,
        twin: &str,
        app: &str,
        version: &str,
        rollout: Option<String>,
    ) -> Result<twinfleet_models::install::InstallJob, TwinError> {
        let v = self.env.apps.get(app, version)?;
        self.install_version(twin, &v, rollout).await
    }

    /// [`Self::install`] of an app version already read from the store.
    pub async fn install_version(
        &self,
        twin: &str,
        v: &twinfleet_models::apps::AppVersion,
        rollout: Option<String>,
    ) -> Result<twinfleet_models::install::InstallJob, TwinError> {
        use twinfleet_models::apps::{DeviceProfile, check};
        let (app, version) = (v.app.as_str(), v.version.as_str());
        let h = self.twin(twin)?;
        let view = h.get().await?;
        let profile = DeviceProfile::of(&view.state.metadata.attributes, &view.state.reported);
        let artifact = check(v, &profile)
            .map_err(|reasons| TwinError::Incompatible {
                twin: twin.to_string(),
                app: format!("{app} {version}"),
                reasons,
            })?
            .clone();
        let (window, approval) =
            twinfleet_models::install::settings_of(&view.effective_config.values).map_err(TwinError::Invalid)?;
        let approval = approval || v.approval;
        let command = twinfleet_models::TwinCommand::Install {
            app: app.to_string(),
            version: version.to_string(),
            artifact_url: format!("/api/v1/artifacts/{}", artifact.sha256),
            approval,
            window,
            rollout,
            uninstall: false,
        };
        h.command(command).await?;
        self.install_of(twin).await
    }

    /// Takes twin `twin`'s `app` back to the version its last install replaced (an
    /// install of that version, with the same checks, approval and window).
    pub async fn rollback_install(
        &self,
        twin: &str,
        app: &str,
    ) -> Result<twinfleet_models::install::InstallJob, TwinError> {
        let view = self.twin(twin)?.get().await?;
        let previous = view
            .state
            .install
            .as_ref()
            .filter(|j| j.app == app && matches!(j.phase, twinfleet_models::install::InstallPhase::Installed { .. }))
            .and_then(|j| j.previous.clone())
            .ok_or_else(|| {
                TwinError::Conflict(format!(
                    "twin {twin}'s last install is not an installed {app} that replaced an earlier version: nothing to go back to"
                ))
            })?;
        self.install(twin, app, &previous, None).await
    }

    /// Removes `app` from twin `twin`'s device: `uninstall_app`, through the same steps
    /// as an install (approval if the twin's configuration asks for it, the maintenance
    /// window, the watchdog); the app leaves the inventory once the device confirms.
    pub async fn uninstall(&self, twin: &str, app: &str) -> Result<twinfleet_models::install::InstallJob, TwinError> {
        let h = self.twin(twin)?;
        let view = h.get().await?;
        let Some(version) = view.state.apps.get(app).cloned() else {
            return Err(TwinError::Conflict(format!(
                "twin {twin} has no {app} installed (its inventory: {:?})",
                view.state.apps
            )));
        };
        let (window, approval) =
            twinfleet_models::install::settings_of(&view.effective_config.values).map_err(TwinError::Invalid)?;
        let command = twinfleet_models::TwinCommand::Install {
            app: app.to_string(),
            version,
            artifact_url: String::new(),
            approval,
            window,
            rollout: None,
            uninstall: true,
        };
        h.command(command).await?;
        self.install_of(twin).await
    }

    /// An operator approves twin `twin`'s install of `app` that awaits approval.
    pub async fn approve_install(
        &self,
        twin: &str,
        app: &str,
    ) -> Result<twinfleet_models::install::InstallJob, TwinError> {
        self.twin(twin)?.command(twinfleet_models::TwinCommand::ApproveInstall { app: app.to_string() }).await?;
        self.install_of(twin).await
    }

    async fn install_of(&self, twin: &str) -> Result<twinfleet_models::install::InstallJob, TwinError> {
        self.twin(twin)?
            .install()
            .await?
            .ok_or_else(|| TwinError::Unknown { kind: "install of twin", id: twin.to_string() })
    }

    /// Every stored version of a device type's configuration templates, oldest first,
    /// and the version applied to the type.
    pub fn templates(
        &self,
        device_type: &str,
    ) -> Result<(Vec<twinfleet_models::template::ConfigTemplate>, Option<u32>), TwinError> {
        let ctx = self.type_context(device_type)?;
        let all = crate::records::template_list(&*self.env.storage, device_type)?;
        Ok((all, ctx.template().map(|t| t.version)))
    }

    /// Stores a new version of a device type's configuration template (checked: a bad
    /// placeholder, path or target is refused naming it), filling desired key `target`
    /// (default `config`).
    pub async fn add_template(
        &self,
        device_type: &str,
        target: Option<String>,
        body: serde_json::Value,
        comment: String,
    ) -> Result<twinfleet_models::template::ConfigTemplate, TwinError> {
        let ctx = self.type_context(device_type)?;
        crate::templates::add(&ctx, target, body, comment).await
    }

    /// Applies version `version` of a device type's template: every twin of the type
    /// fills it in and writes only what changed into its desired state. Returns how
    /// many twins were told.
    pub async fn apply_template(&self, device_type: &str, version: u32) -> Result<usize, TwinError> {
        let ctx = self.type_context(device_type)?;
        let twins: Vec<_> = self.env.directory.twins.iter().map(|s| s.value().clone()).collect();
        crate::templates::apply(&ctx, version, twins).await
    }

    fn type_context(&self, id: &str) -> Result<Arc<crate::dti::TypeContext>, TwinError> {
        self.env.directory.types.get(id).map(|c| c.clone()).ok_or_else(|| TwinError::UnknownDeviceType(id.to_string()))
    }

    pub fn device_types(&self) -> Vec<TypeInfo> {
        let mut v: Vec<TypeInfo> = self.env.directory.types.iter().map(|c| TypeHandle::new(c.clone()).info()).collect();
        v.sort_by(|a, b| a.spec.id.cmp(&b.spec.id));
        v
    }

    pub fn dtas(&self) -> Vec<DtaInfo> {
        let mut v: Vec<DtaInfo> = self.env.directory.dtas.iter().map(|e| e.info()).collect();
        v.sort_by(|a, b| a.id.cmp(&b.id));
        v
    }

    pub fn twin_count(&self) -> usize {
        self.env.directory.twins.len()
    }

    /// Sets up the bootstrap admin, once per data directory: on a fresh one, creates the
    /// user `admin` with `token` (from the environment) or a new random token, which is
    /// returned for the caller to show once. On a directory that was set up before it
    /// does nothing (returns `None`): a token revoked since, or a deleted `admin`, is
    /// never brought back silently; use [`TwinRuntime::rotate_admin_token`] for that.
    pub async fn bootstrap_admin(&self, token: Option<&str>) -> Result<Option<String>, TwinError> {
        let access = &self.env.access;
        if access.bootstrapped() {
            if token.is_some_and(|t| !access.knows(t)) {
                tracing::warn!(
                    "the admin token given is not (or no longer) valid and is ignored: this data directory was set \
                     up already; rotate it explicitly (`twinfleet run --rotate-admin-token`) to replace it"
                );
            }
            return Ok(None);
        }
        access.bootstrap(self.bootstrap_user(), token, false, self.env.clock.now()).await
    }

    /// Explicitly replaces the bootstrap admin's token: re-creates the user `admin` if it
    /// was deleted, revokes its earlier bootstrap tokens and registers `token` (or a new
    /// random one, returned to be shown once).
    pub async fn rotate_admin_token(&self, token: Option<&str>) -> Result<Option<String>, TwinError> {
        tracing::warn!("rotating the bootstrap admin's token: earlier bootstrap tokens are revoked");
        self.env.access.bootstrap(self.bootstrap_user(), token, true, self.env.clock.now()).await
    }

    fn bootstrap_user(&self) -> crate::access::User {
        crate::access::User {
            name: crate::access::BOOTSTRAP_ADMIN.into(),
            role: twinfleet_models::Role::Admin,
            groups: vec![],
            created_at: self.env.clock.now(),
        }
    }

    /// Waits until every write submitted so far is durable, closes storage, and drops
    /// every twin, TDTA and DTA address so that their actors stop. Call it after the
    /// arbiters are stopped.
    pub async fn shutdown(&self) {
        // The last checkpoint of the history (blocking: seals the heads into segments),
        // first: its sink writes the twins' latest values to storage (`crate::latest`).
        let series = self.env.series.clone();
        if tokio::task::spawn_blocking(move || series.shutdown()).await.is_err() {
            tracing::error!("the history store did not shut down cleanly; its WAL replays at the next start");
        }
        // How large the directory is, for the next start to size its maps (see `SizeHints`).
        drop(self.env.storage.submit(self.env.directory.size_hints()));
        if let Err(e) = self.env.storage.barrier().await {
            tracing::error!("final flush failed: {e}");
        }
        self.env.storage.shutdown();
        for t in self.env.directory.types.iter() {
            t.stop();
        }
        for d in self.env.directory.dtas.iter() {
            d.stop();
        }
        self.env.directory.clear();
        self.stats.set_status(ActorStatus::Stopped);
    }
}
