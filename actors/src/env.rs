//! What every actor of a platform shares: storage, clock, alerts, the arbiter pool, the
//! directories of twins, device types and DTAs, and the settings. One `TwinEnv` per
//! platform; nothing here is a process-wide singleton, so two platforms can run in one
//! process (tests do).

use crate::credentials::Credentials;
use crate::dta::DtaEntry;
use crate::dti::TwinSlot;
use crate::tdta::TypeContext;
use dashmap::DashMap;
use parking_lot::RwLock;
use serde_json::{Map, Value};
use std::fmt::Debug;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use twinfleet_models::{DeviceTypeId, DtaId, Metadata, RestartPolicy, RetryPolicy, TelemetryLimits, TwinId};
use twinfleet_runtime::{AlertSink, ArbiterPool, Rejections, SharedClock, Storage, StorageError};

/// The hasher of every twin-keyed map: much faster than SipHash on short ids (SipHash
/// was 13% of creating a million twins) and still seeded per process, so that crafted
/// ids cannot flood one bucket.
pub(crate) type FastHash = foldhash::fast::RandomState;
/// A concurrent directory keyed by ids.
pub(crate) type Directory<K, V> = DashMap<K, V, FastHash>;
pub(crate) type FastMap<K, V> = std::collections::HashMap<K, V, FastHash>;
pub(crate) type FastSet<K> = std::collections::HashSet<K, FastHash>;

/// Tunables of the twin actors.
#[derive(Debug, Clone)]
pub struct Settings {
    /// Bounded mailbox of each DTI. A sender awaiting `send` parks while it is full
    /// (back-pressure); `try_*` calls get `TwinError::MailboxFull`.
    pub dti_mailbox: usize,
    /// Bounded mailbox of each TDTA and DTA.
    pub aggregate_mailbox: usize,
    /// How supervisors restart failed children.
    pub restart: RestartPolicy,
    /// How long a twin waits for its device to report the desired state, and retries.
    pub desired_sync: RetryPolicy,
    /// Deadline of a request made through a handle, on the platform clock.
    pub request_timeout_ms: u64,
    /// Accept `inject_panic` requests (tests and chaos drills only).
    pub allow_fault_injection: bool,
    /// What a telemetry batch may contain.
    pub telemetry: TelemetryLimits,
}

impl Default for Settings {
    fn default() -> Self {
        Settings {
            dti_mailbox: 32,
            aggregate_mailbox: 256,
            restart: RestartPolicy::default(),
            desired_sync: RetryPolicy::default(),
            request_timeout_ms: 30_000,
            allow_fault_injection: false,
            telemetry: TelemetryLimits::default(),
        }
    }
}

/// What a twin asks of its device. The protocol adapters turn this into an MQTT publish
/// or a gRPC call; until one is attached, commands go nowhere and the twin's watchdog
/// retries and finally alerts.
#[derive(Debug, Clone, PartialEq)]
pub enum DeviceCommand {
    ApplyDesired { desired: Map<String, Value>, attempt: u32 },
}

/// The twin-to-device direction, implemented by the protocol adapters. Called on the
/// twin's arbiter; an implementation may spawn work there but must not block.
pub trait DeviceLink: Send + Sync + Debug + 'static {
    /// Hands a command to the device's transport. `metadata` is the twin's (a
    /// request-response device's address lives there). An error means it could not even
    /// be queued (e.g. the device is offline); the twin's watchdog retries either way.
    fn deliver(&self, twin: &TwinId, metadata: &Metadata, cmd: DeviceCommand) -> Result<(), String>;
}

#[derive(Debug)]
struct NoDeviceLink;

impl DeviceLink for NoDeviceLink {
    fn deliver(&self, _: &TwinId, _: &Metadata, _: DeviceCommand) -> Result<(), String> {
        Err("no device transport attached".into())
    }
}

#[derive(Debug)]
pub struct TwinEnv {
    pub storage: Arc<dyn Storage>,
    pub clock: SharedClock,
    pub alerts: AlertSink,
    pub arbiters: Arc<ArbiterPool>,
    pub settings: Settings,
    /// Counted rejections of bad input, shared by every edge.
    pub rejections: Rejections,
    pub(crate) credentials: Credentials,
    pub(crate) twins: Directory<TwinId, Arc<TwinSlot>>,
    pub(crate) types: Directory<DeviceTypeId, Arc<TypeContext>>,
    pub(crate) dtas: Directory<DtaId, Arc<DtaEntry>>,
    /// Records that failed to decode at start: twin id → reason.
    pub(crate) quarantine: Directory<String, String>,
    device_link: RwLock<Arc<dyn DeviceLink>>,
    versions: AtomicU64,
}

impl TwinEnv {
    pub fn new(
        storage: Arc<dyn Storage>,
        clock: SharedClock,
        arbiters: Arc<ArbiterPool>,
        settings: Settings,
    ) -> Result<Arc<Self>, StorageError> {
        let alerts = AlertSink::new(storage.clone());
        let credentials = Credentials::open(storage.clone())?;
        Ok(Arc::new(TwinEnv {
            storage,
            clock,
            alerts,
            arbiters,
            settings,
            rejections: Rejections::default(),
            credentials,
            twins: Directory::default(),
            types: Directory::default(),
            dtas: Directory::default(),
            quarantine: Directory::default(),
            device_link: RwLock::new(Arc::new(NoDeviceLink)),
            versions: AtomicU64::new(1),
        }))
    }

    pub fn set_device_link(&self, link: Arc<dyn DeviceLink>) {
        *self.device_link.write() = link;
    }

    /// Back to no device transport (commands fail, watchdogs retry).
    pub fn detach_device_link(&self) {
        *self.device_link.write() = Arc::new(NoDeviceLink);
    }

    pub(crate) fn device_link(&self) -> Arc<dyn DeviceLink> {
        self.device_link.read().clone()
    }

    /// A platform-wide increasing number, to order configuration pushes.
    pub(crate) fn next_version(&self) -> u64 {
        self.versions.fetch_add(1, Ordering::Relaxed)
    }
}
