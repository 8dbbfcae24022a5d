//! The infrastructure every actor of a platform shares: storage, clock, alerts, the
//! arbiter pool, the request and rejection counters, the device transports and the
//! settings. No services (access, credentials, jobs) and no directory: those are in
//! `env`, which composes them with this.

use parking_lot::RwLock;
use std::fmt::Debug;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use twinfleet_models::{CommandId, DeviceCommand, Metadata, RestartPolicy, RetryPolicy, TelemetryLimits, TwinId};
use twinfleet_runtime::series::SeriesStore;
use twinfleet_runtime::{AlertSink, ArbiterPool, Rejections, RequestMetrics, SharedClock, Storage};

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
    /// A twin writes its snapshot after this many journal events (a change writes only
    /// its events; a restart replays the events after the snapshot).
    pub snapshot_every: u32,
    /// ... or this long (real time, ms) after its first event since the last snapshot,
    /// whichever comes first, so that an idle twin's replay stays empty.
    pub snapshot_idle_ms: u64,
    /// How often (real time, ms) the journals of device types with a retention are
    /// compacted; 0 turns the periodic pass off (`TwinRuntime::compact_journals` runs one).
    pub compaction_interval_ms: u64,
    /// Provisioning claims allowed per claim credential (device type) ...
    pub claims_per_credential: twinfleet_models::RateLimit,
    /// ... and per source address (where the gateway knows it).
    pub claims_per_source: twinfleet_models::RateLimit,
    /// The operational gateways provisioning allocates devices to (each type's
    /// `provisioning.allocation`); empty: a device stays on the gateway it claimed
    /// through. They share this platform's credentials: its own listeners under the
    /// addresses devices are given, or an external broker whose accounts it keeps.
    pub gateways: Vec<twinfleet_models::enrollment::GatewaySpec>,
    /// The largest app artifact an upload may bring, in bytes.
    pub max_artifact_bytes: u64,
    /// How long a device gets to answer an install (platform clock, ms).
    pub install_deadline_ms: i64,
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
            snapshot_every: 64,
            snapshot_idle_ms: 2_000,
            compaction_interval_ms: 60_000,
            claims_per_credential: twinfleet_models::RateLimit { per_sec: 2_000.0, burst: 20_000.0 },
            claims_per_source: twinfleet_models::RateLimit { per_sec: 1_000.0, burst: 10_000.0 },
            gateways: Vec::new(),
            max_artifact_bytes: crate::apps::DEFAULT_MAX_ARTIFACT_BYTES,
            install_deadline_ms: 30 * 60_000,
        }
    }
}

/// The twin-to-device direction, implemented by the protocol adapters. Called on the
/// twin's arbiter; an implementation may spawn work there but must not block.
pub trait DeviceLink: Send + Sync + Debug + 'static {
    /// How well this transport can reach the device now: 0 = not at all; higher wins.
    /// gRPC answers 2 for a device with an open command stream or a `grpc_address`;
    /// MQTT answers 1 for every device (the broker holds commands for offline devices).
    fn preference(&self, _twin: &TwinId, _metadata: &Metadata) -> u8 {
        1
    }

    /// Hands command `id` to the device's transport; the device answers with the same id
    /// (its decimal form) on any transport. `metadata` is the twin's (a request-response
    /// device's address lives there). An error means it could not even be queued (e.g.
    /// the device is offline); the twin's desired-state wait retries either way.
    fn deliver(&self, twin: &TwinId, metadata: &Metadata, id: CommandId, cmd: DeviceCommand) -> Result<(), String>;
}

/// The device transports attached to a platform, by name ("grpc", "mqtt", ...). A
/// command goes to the one with the highest preference for that twin.
#[derive(Debug, Default)]
struct DeviceLinks(RwLock<Vec<(&'static str, Arc<dyn DeviceLink>)>>);

impl DeviceLinks {
    fn deliver(&self, twin: &TwinId, metadata: &Metadata, id: CommandId, cmd: DeviceCommand) -> Result<(), String> {
        let best = {
            let links = self.0.read();
            links
                .iter()
                .map(|(_, l)| (l.preference(twin, metadata), l))
                .filter(|(p, _)| *p > 0)
                .max_by_key(|(p, _)| *p)
                .map(|(_, l)| l.clone())
        };
        match best {
            Some(link) => link.deliver(twin, metadata, id, cmd),
            None if self.0.read().is_empty() => Err("no device transport attached".into()),
            None => Err(format!("no attached transport can reach device {twin}")),
        }
    }
}

/// An operator's control of a running rollout, and where its driver answers (the
/// rollout as it then stands, or why the control does not apply).
pub type RolloutControl = (
    twinfleet_models::rollout::Control,
    tokio::sync::oneshot::Sender<Result<twinfleet_models::rollout::Rollout, String>>,
);

/// Ended installs of rollouts a driver may fall behind by before it polls the twins.
const INSTALL_OUTCOMES: usize = 65_536;

/// The platform's infrastructure (what `TwinEnv` dereferences to).
#[derive(Debug)]
pub struct Infra {
    pub storage: Arc<dyn Storage>,
    /// Metric history (see `twinfleet_runtime::series`): namespace = device type,
    /// series = [`crate::telemetry::series_key`].
    pub series: Arc<SeriesStore>,
    pub clock: SharedClock,
    pub alerts: AlertSink,
    /// The monitoring rules' alerts (raised and cleared by the twins).
    pub alert_book: Arc<crate::alerting::AlertBook>,
    /// The history exports' cursors and counters.
    pub exports: Arc<crate::exports::ExportBook>,
    pub arbiters: Arc<ArbiterPool>,
    pub settings: Settings,
    /// Counted rejections of bad input, shared by every edge.
    pub rejections: Rejections,
    /// Requests served by the HTTP and gRPC edges, by route and status, with latencies.
    pub requests: RequestMetrics,
    /// Open device sessions of every gateway (closed on credential changes).
    pub sessions: Arc<crate::sessions::DeviceSessions>,
    /// Installs of rollouts that ended (published by the twins; read by the rollouts'
    /// drivers, which poll the twins when they fall behind).
    pub installs: tokio::sync::broadcast::Sender<(String, twinfleet_models::install::InstallJob)>,
    /// The running rollouts' control channels, by rollout id.
    pub rollouts: dashmap::DashMap<String, tokio::sync::mpsc::UnboundedSender<RolloutControl>>,
    device_links: DeviceLinks,
    versions: AtomicU64,
}

impl Infra {
    pub(crate) fn new(
        storage: Arc<dyn Storage>,
        series: Arc<SeriesStore>,
        clock: SharedClock,
        arbiters: Arc<ArbiterPool>,
        settings: Settings,
        alert_book: crate::alerting::AlertBook,
    ) -> Self {
        Infra {
            alerts: AlertSink::new(storage.clone()),
            alert_book: Arc::new(alert_book),
            exports: Arc::new(crate::exports::ExportBook::new(storage.clone())),
            storage,
            series,
            clock,
            arbiters,
            settings,
            rejections: Rejections::default(),
            requests: RequestMetrics::default(),
            sessions: Default::default(),
            installs: tokio::sync::broadcast::channel(INSTALL_OUTCOMES).0,
            rollouts: Default::default(),
            device_links: DeviceLinks::default(),
            versions: AtomicU64::new(1),
        }
    }

    /// Attaches a device transport under `name`, replacing one of the same name.
    pub fn attach_device_link(&self, name: &'static str, link: Arc<dyn DeviceLink>) {
        let mut links = self.device_links.0.write();
        links.retain(|(n, _)| *n != name);
        links.push((name, link));
    }

    /// Detaches the transport `name` (its commands fail, watchdogs retry).
    pub fn detach_device_link(&self, name: &str) {
        self.device_links.0.write().retain(|(n, _)| *n != name);
    }

    /// Hands a twin's command to the best attached transport.
    pub(crate) fn deliver_to_device(
        &self,
        twin: &TwinId,
        metadata: &Metadata,
        id: CommandId,
        cmd: DeviceCommand,
    ) -> Result<(), String> {
        self.device_links.deliver(twin, metadata, id, cmd)
    }

    /// A platform-wide increasing number, to order configuration pushes.
    pub(crate) fn next_version(&self) -> u64 {
        self.versions.fetch_add(1, Ordering::Relaxed)
    }
}
