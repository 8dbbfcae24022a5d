//! A platform's environment: its infrastructure (`context::Infra`, which `TwinEnv`
//! dereferences to), its services (operators' access, device credentials, jobs) and its
//! directory of twins, device types and DTAs. One `TwinEnv` per platform; nothing here
//! is a process-wide singleton, so two platforms can run in one process (tests do).

use crate::access::AccessControl;
use crate::context::{Infra, Settings};
use crate::credentials::Credentials;
use crate::directory::TwinDirectory;
use crate::jobs::Jobs;
use std::sync::Arc;
use twinfleet_runtime::series::SeriesStore;
use twinfleet_runtime::{ArbiterPool, SharedClock, Storage, StorageError};

#[derive(Debug)]
pub struct TwinEnv {
    /// Storage, clock, alerts, arbiters, counters, device transports, settings.
    infra: Arc<Infra>,
    pub(crate) credentials: Credentials,
    /// Operators: users, groups, API tokens, audit log.
    pub access: AccessControl,
    /// Long-running operator jobs.
    pub jobs: Jobs,
    /// Twins, device types, DTAs and quarantine; written only by `directory`.
    pub(crate) directory: TwinDirectory,
    /// Provisioning processes in flight (`crate::provisioning`).
    pub(crate) claims: crate::claims::Claims,
    /// App versions and their artifacts.
    pub apps: crate::apps::AppStore,
}

impl std::ops::Deref for TwinEnv {
    type Target = Infra;
    fn deref(&self) -> &Infra {
        &self.infra
    }
}

impl TwinEnv {
    /// The infrastructure alone, as the twins hold it.
    pub(crate) fn infra(&self) -> &Arc<Infra> {
        &self.infra
    }

    pub fn new(
        storage: Arc<dyn Storage>,
        series: Arc<SeriesStore>,
        clock: SharedClock,
        arbiters: Arc<ArbiterPool>,
        settings: Settings,
        artifacts: std::path::PathBuf,
    ) -> Result<Arc<Self>, StorageError> {
        let storage_for_hints = storage.clone();
        let credentials = Credentials::open(storage.clone())?;
        let access = AccessControl::open(storage.clone(), credentials.key())?;
        let jobs = Jobs::open(storage.clone())?;
        let book = crate::alerting::AlertBook::open(storage.clone())?;
        let apps = crate::apps::AppStore::open(storage.clone(), artifacts, settings.max_artifact_bytes);
        // Checkpoints of the history write the twins' latest values here.
        series.set_last_sink(crate::latest::last_sink(storage.clone()));
        Ok(Arc::new(TwinEnv {
            infra: Arc::new(Infra::new(storage, series, clock, arbiters, settings, book)),
            credentials,
            access,
            jobs,
            directory: TwinDirectory::sized(crate::directory::SizeHints::load(&*storage_for_hints)),
            claims: Default::default(),
            apps,
        }))
    }
}
