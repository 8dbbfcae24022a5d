//! twinfleet: a runtime that keeps a live digital twin, an actor, for every IoT device of
//! a fleet: a DTI per device, a TDTA per device type, a DTA per group.
//!
//! This crate is the façade for embedders: a [`PlatformBuilder`] that opens the data
//! directory, restores every twin and returns a [`Platform`]; the platform dereferences
//! to [`TwinRuntime`], which creates device types, DTAs and whole fleets and hands out
//! typed handles to talk to twins.
//!
//! ```no_run
//! # async fn demo() -> Result<(), Box<dyn std::error::Error>> {
//! use twinfleet::{DeviceTypeSpec, Platform, TwinSpec};
//! let platform = Platform::builder("./twinfleet-data").start().await?;
//! let sensor = platform
//!     .create_device_type(DeviceTypeSpec { model: "TH-1".into(), ..DeviceTypeSpec::new("sensor".parse()?) })
//!     .await?;
//! let specs = (0..1000).map(|i| TwinSpec::new(format!("sensor-{i}").parse().unwrap())).collect();
//! sensor.spawn_fleet(specs).await?;
//! let twin = platform.twin("sensor-7")?;
//! let view = twin.get().await?;
//! # drop(view); platform.shutdown().await; Ok(()) }
//! ```
//! Everything must run inside an actix system (`actix_rt::System`, or `#[actix_rt::main]`).

pub mod config;
pub mod memory;

use std::ops::Deref;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use twinfleet_runtime::series::{SeriesOptions, SeriesStore};
use twinfleet_runtime::{
    ArbiterPool, DataDirLock, LockError, SharedClock, SledOptions, SledStorage, StorageError, SystemClock,
};

pub use twinfleet_actors::{
    ActorPage, ActorQuery, AuthError, CLAIM_PREFIX, ClaimAnswer, ClaimView, DeviceCommand, DeviceLink, DeviceTypeSpec,
    DtaHandle, DtaInfo, DtaSpec, FleetReport, Generate, Job, JobSpec, JobState, LatestPoint, LogPage, LogQuery,
    RestoreReport, Settings, TOKEN_PREFIX, TelemetryQuery, TwinError, TwinHandle, TwinRuntime, TwinSpec, TwinView,
    TypeHandle, TypeInfo,
};
pub use twinfleet_models as models;
pub use twinfleet_runtime::{ActorStatus, ActorView, Clock, StorageStats, VirtualClock};

/// Why a platform could not start.
#[derive(Debug, thiserror::Error)]
pub enum PlatformError {
    #[error(transparent)]
    Lock(#[from] LockError),
    #[error("cannot open storage: {0}")]
    Storage(#[from] StorageError),
    #[error("cannot restore the twins: {0}")]
    Restore(#[from] TwinError),
}

/// Configures and starts a [`Platform`].
#[derive(Debug)]
pub struct PlatformBuilder {
    data_dir: PathBuf,
    arbiters: usize,
    clock: Option<SharedClock>,
    settings: Settings,
    sled: SledOptions,
}

impl PlatformBuilder {
    /// Worker arbiters the DTIs are spread over (default: one per core).
    pub fn arbiters(mut self, n: usize) -> Self {
        self.arbiters = n.max(1);
        self
    }

    /// The clock all twin logic reads (default: the system clock). Tests pass a
    /// `VirtualClock`.
    pub fn clock(mut self, clock: SharedClock) -> Self {
        self.clock = Some(clock);
        self
    }

    pub fn settings(mut self, settings: Settings) -> Self {
        self.settings = settings;
        self
    }

    /// sled's page cache, in bytes (default 64 MiB).
    pub fn storage_cache_bytes(mut self, bytes: u64) -> Self {
        self.sled.cache_bytes = bytes;
        self
    }

    /// Locks the data directory, opens storage, starts the arbiters and the supervisor,
    /// and restores every stored twin. Must be awaited inside an actix system.
    pub async fn start(self) -> Result<Platform, PlatformError> {
        let lock = DataDirLock::acquire(&self.data_dir)?;
        let storage = SledStorage::open(&self.data_dir, self.sled)?;
        let series =
            SeriesStore::open(&self.data_dir.join("series"), SeriesOptions::default()).map_err(StorageError::from)?;
        let arbiters = Arc::new(ArbiterPool::new(self.arbiters));
        let clock = self.clock.unwrap_or_else(|| Arc::new(SystemClock));
        let artifacts = self.data_dir.join("artifacts");
        let env = twinfleet_actors::TwinEnv::new(storage, series, clock, arbiters.clone(), self.settings, artifacts)?;
        let (runtime, report) = TwinRuntime::start(env).await?;
        // Rollouts that were running or paused go on.
        if let Err(e) = runtime.resume_rollouts() {
            tracing::error!("the stored rollouts cannot be read; none resumed: {e}");
        }
        tracing::info!(
            twins = report.twins,
            device_types = report.device_types,
            dtas = report.dtas,
            quarantined = report.quarantined.len(),
            millis = report.millis,
            "restored from {}",
            self.data_dir.display()
        );
        Ok(Platform { runtime, arbiters, report, data_dir: self.data_dir, _lock: lock })
    }
}

/// A running platform. Dereferences to [`TwinRuntime`].
#[derive(Debug)]
pub struct Platform {
    runtime: TwinRuntime,
    arbiters: Arc<ArbiterPool>,
    report: RestoreReport,
    data_dir: PathBuf,
    _lock: DataDirLock,
}

impl Platform {
    pub fn builder(data_dir: impl AsRef<Path>) -> PlatformBuilder {
        PlatformBuilder {
            data_dir: data_dir.as_ref().to_path_buf(),
            arbiters: std::thread::available_parallelism().map(|n| n.get()).unwrap_or(1),
            clock: None,
            settings: Settings::default(),
            sled: SledOptions::default(),
        }
    }

    pub fn runtime(&self) -> &TwinRuntime {
        &self.runtime
    }

    /// What was restored at start, including quarantined records.
    pub fn restore_report(&self) -> &RestoreReport {
        &self.report
    }

    pub fn data_dir(&self) -> &Path {
        &self.data_dir
    }

    pub fn storage_stats(&self) -> StorageStats {
        self.runtime.storage().stats()
    }

    /// Stops the twins, flushes everything acknowledged or submitted, releases the data
    /// directory.
    pub async fn shutdown(self) {
        self.arbiters.stop();
        self.runtime.shutdown().await;
    }
}

impl Deref for Platform {
    type Target = TwinRuntime;
    fn deref(&self) -> &TwinRuntime {
        &self.runtime
    }
}
