//! The MQTT transformer: subscribes to the device topics on a broker (the embedded one
//! or an external one), turns each message into the twin's own message, and turns
//! twins' commands into publishes.
//!
//! Two connections per broker:
//! - **ingest**: persistent session (`clean_session = false`), QoS 1 subscriptions, manual
//!   acks. A message is acknowledged only after its twin has it (durably, for telemetry
//!   and state) or it was rejected; acks go out in the order messages came (rumqttd
//!   refuses out-of-order acks). Unacknowledged messages are redelivered by the broker
//!   after a reconnect or a restart of the transformer.
//! - **out**: commands and provisioning responses, so that a flood of commands can never
//!   hold up the acks of the ingest connection.
//!
//! The device id is the topic's; the twin is found through the runtime's directory (a
//! dashmap). On the embedded gateway the front has already checked that the sender is
//! that device; on an external broker, its ACL must (PROTOCOL.md).

use super::front::Pacer;
use super::topics::{self, Channel, Parsed};
use futures::StreamExt;
use futures::stream::FuturesOrdered;
use rumqttc::{AsyncClient, Event, EventLoop, MqttOptions, Packet, Publish, QoS};
use serde::Deserialize;
use serde_json::{Map, Value};
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering::Relaxed};
use std::time::Duration;
use tokio::sync::{mpsc, watch};
use twinfleet_actors::{DeviceCommand, DeviceLink, TwinError, TwinHandle, TwinRuntime, TwinSpec};
use twinfleet_models::{CommandId, DeviceTypeId, Metadata, MetricPoint, Timestamp, TwinId};

/// Messages handled at once by the transformer (and so unacknowledged at most).
const WINDOW: usize = 1_000;

/// An MQTT broker to connect to: `mqtt://[user[:password]@]host[:port]` (port 1883 by
/// default).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct BrokerUrl {
    pub host: String,
    pub port: u16,
    pub username: Option<String>,
    pub password: Option<String>,
}

impl std::str::FromStr for BrokerUrl {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, String> {
        let rest = s.strip_prefix("mqtt://").ok_or_else(|| format!("{s:?}: a broker URL starts with mqtt://"))?;
        let (auth, hostport) = match rest.rsplit_once('@') {
            Some((a, h)) => (Some(a), h),
            None => (None, rest),
        };
        let (username, password) = match auth.map(|a| a.split_once(':').unwrap_or((a, ""))) {
            Some((u, p)) => (Some(u.to_string()), (!p.is_empty()).then(|| p.to_string())),
            None => (None, None),
        };
        let hostport = hostport.trim_end_matches('/');
        let (host, port) = match hostport.rsplit_once(':') {
            Some((h, p)) => (h, p.parse().map_err(|_| format!("{s:?}: bad port {p:?}"))?),
            None => (hostport, 1883),
        };
        if host.is_empty() {
            return Err(format!("{s:?}: no host"));
        }
        Ok(BrokerUrl { host: host.to_string(), port, username, password })
    }
}

impl std::fmt::Display for BrokerUrl {
    /// Without the password.
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "mqtt://{}:{}", self.host, self.port)
    }
}

/// What a transformer connects to and listens for.
#[derive(Debug, Clone)]
pub(crate) struct TransformerSpec {
    pub broker: BrokerUrl,
    pub client_id: String,
    pub devices: bool,
    pub provisioning: bool,
    /// Embedded gateway only: tell the fronts what has been handled.
    pub pacer: Option<Arc<Pacer>>,
    /// Where provisioned devices are told to connect.
    pub operational: String,
    pub max_payload: usize,
}

/// Retries with backoff while the twin is busy or briefly away, for at most `limit`.
async fn patiently<T, F, Fut>(limit: Duration, mut f: F) -> Result<T, TwinError>
where
    F: FnMut() -> Fut,
    Fut: Future<Output = Result<T, TwinError>>,
{
    let start = tokio::time::Instant::now();
    let mut delay = Duration::from_millis(5);
    loop {
        match f().await {
            Err(
                TwinError::MailboxFull(_)
                | TwinError::Unavailable { .. }
                | TwinError::Timeout { .. }
                | TwinError::Storage(twinfleet_runtime::StorageError::Full(_)),
            ) if start.elapsed() + delay < limit => {
                tokio::time::sleep(delay).await;
                delay = (delay * 2).min(Duration::from_secs(1));
            }
            r => return r,
        }
    }
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct TelemetryMsg {
    ts: Option<i64>,
    #[serde(default)]
    values: Map<String, Value>,
    #[serde(default)]
    points: Vec<PointMsg>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct PointMsg {
    metric: String,
    value: Value,
    ts: Option<i64>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct AckMsg {
    command_id: String,
    success: bool,
    #[serde(default)]
    message: String,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct ProvisionMsg {
    claim_token: String,
    #[serde(default)]
    metadata: Metadata,
}

/// Why a message was not delivered: the reason counted, and the detail logged.
type Rejected = (&'static str, String);

#[derive(Debug)]
struct Core {
    rt: TwinRuntime,
    spec: TransformerSpec,
    out: AsyncClient,
}

impl Core {
    fn limit(&self) -> Duration {
        Duration::from_millis(self.rt.settings().request_timeout_ms)
    }

    /// Handles one message; returns it for the ack.
    async fn handle(self: Arc<Self>, p: Publish) -> Publish {
        let result = if p.payload.len() > self.spec.max_payload {
            Err(("oversized", format!("{} bytes on {} (limit {})", p.payload.len(), p.topic, self.spec.max_payload)))
        } else {
            match topics::parse(&p.topic) {
                Some(Parsed::Device { id, channel }) if self.spec.devices => self.device(id, channel, &p.payload).await,
                Some(Parsed::Provisioning { ty, id }) if self.spec.provisioning => {
                    self.provision(ty, id, &p.payload).await
                }
                _ => Err(("unknown_topic", format!("nothing listens on {:?}", p.topic))),
            }
        };
        if let Err((reason, detail)) = result {
            self.rt.rejections().reject(reason, || format!("MQTT {}: {detail}", p.topic));
        }
        p
    }

    async fn device(&self, id: &str, channel: Channel, payload: &[u8]) -> Result<(), Rejected> {
        let twin = self.rt.twin(id).map_err(|_| ("unknown_device", format!("no twin {id:?}")))?;
        // Each channel parses straight into its own shape: no intermediate JSON tree.
        let done = match channel {
            Channel::Telemetry => {
                let points = self.points(parse(payload, "telemetry")?)?;
                patiently(self.limit(), || twin.telemetry(points.clone())).await.map(drop)
            }
            Channel::State => {
                let patch: Map<String, Value> = parse(payload, "reported state (a JSON object)")?;
                patiently(self.limit(), || twin.report(patch.clone())).await.map(drop)
            }
            Channel::Status => {
                let status: Map<String, Value> = parse(payload, "status (a JSON object)")?;
                let mut patch = Map::new();
                patch.insert("status".into(), Value::Object(status));
                patiently(self.limit(), || twin.report(patch.clone())).await.map(drop)
            }
            Channel::Acks => {
                let ack: AckMsg = parse(payload, "ack")?;
                if ack.command_id.is_empty() || ack.command_id.len() > 256 {
                    return Err(("malformed", "command_id must be 1 to 256 bytes".into()));
                }
                patiently(self.limit(), || twin.ack(ack.command_id.clone(), ack.success, ack.message.clone()))
                    .await
                    .map(drop)
            }
            Channel::Logs => {
                return Err(("logs_not_stored", format!("device {id} sent logs; log ingest is not built yet")));
            }
        };
        done.map_err(|e| rejected(&twin, e))
    }

    fn points(&self, msg: TelemetryMsg) -> Result<Vec<MetricPoint>, Rejected> {
        let now = self.rt.now();
        let batch_at = msg.ts.map(Timestamp).unwrap_or(now);
        let number = |metric: &str, v: &Value| {
            v.as_f64().ok_or_else(|| ("wrong_type", format!("metric {metric:?} is {v}, not a number")))
        };
        let mut points = Vec::with_capacity(msg.values.len() + msg.points.len());
        for (metric, v) in &msg.values {
            points.push(MetricPoint { value: number(metric, v)?, metric: metric.clone(), at: batch_at });
        }
        for p in msg.points {
            let value = number(&p.metric, &p.value)?;
            points.push(MetricPoint { metric: p.metric, value, at: p.ts.map(Timestamp).unwrap_or(batch_at) });
        }
        Ok(points)
    }

    /// A device asks to be created, presenting its type's claim token; it gets its own
    /// device token back (once) on its response topic.
    async fn provision(&self, ty: &str, id: &str, payload: &[u8]) -> Result<(), Rejected> {
        let result = self.try_provision(ty, id, payload).await;
        let body = match &result {
            Ok(token) => serde_json::json!({
                "ok": true, "device_id": id, "token": token, "operational": self.spec.operational,
            }),
            Err((_, why)) => serde_json::json!({ "ok": false, "error": why }),
        };
        let topic = topics::provisioning_response(ty, id);
        if let Err(e) = self.out.publish(topic, QoS::AtLeastOnce, false, body.to_string()).await {
            tracing::warn!("cannot answer the provisioning request of {id}: {e}");
        }
        result.map(drop)
    }

    async fn try_provision(&self, ty: &str, id: &str, payload: &[u8]) -> Result<String, Rejected> {
        let msg: ProvisionMsg =
            serde_json::from_slice(payload).map_err(|e| ("malformed", format!("provisioning request: {e}")))?;
        self.rt
            .authenticate_claim(ty, &msg.claim_token)
            .map_err(|e| (e.reason(), format!("provisioning {id} as {ty}: {e}")))?;
        let twin_id = TwinId::new(id).map_err(|e| ("malformed", e.to_string()))?;
        let ty_id = DeviceTypeId::new(ty).map_err(|e| ("malformed", e.to_string()))?;
        let mut spec = TwinSpec::new(twin_id);
        spec.metadata = msg.metadata;
        match self.rt.create_twin(&ty_id, spec).await {
            Ok(_) => {}
            Err(TwinError::AlreadyExists { .. }) => {
                return Err((
                    "already_provisioned",
                    format!("device {id} already exists; an operator can issue it a new token"),
                ));
            }
            Err(e) => return Err(("provisioning_failed", e.to_string())),
        }
        self.rt.issue_device_token(id).await.map_err(|e| ("provisioning_failed", e.to_string()))
    }
}

/// A payload as `T`, or `malformed` saying what was expected.
fn parse<T: serde::de::DeserializeOwned>(payload: &[u8], what: &str) -> Result<T, Rejected> {
    serde_json::from_slice(payload).map_err(|e| ("malformed", format!("{what}: {e}")))
}

/// A twin error on delivery as a counted reason.
fn rejected(twin: &TwinHandle, e: TwinError) -> Rejected {
    (crate::error::classify(&e).reason, format!("twin {}: {e}", twin.id()))
}

/// The twins' link to their MQTT devices: a QoS 1 publish on `devices/{id}/commands`.
/// The broker keeps it for a device with a persistent session that is offline.
#[derive(Debug)]
pub struct MqttLinks {
    out: AsyncClient,
    connected: Arc<AtomicBool>,
}

impl DeviceLink for MqttLinks {
    fn deliver(&self, twin: &TwinId, _metadata: &Metadata, id: CommandId, cmd: DeviceCommand) -> Result<(), String> {
        if !self.connected.load(Relaxed) {
            return Err("the MQTT transformer is not connected to its broker".into());
        }
        let body = match cmd {
            DeviceCommand::ApplyDesired { desired, .. } => {
                serde_json::json!({ "command_id": id.to_string(), "apply_desired": desired })
            }
            DeviceCommand::SetConfiguration { configuration } => {
                serde_json::json!({ "command_id": id.to_string(), "set_configuration": configuration })
            }
            DeviceCommand::InstallApp { app, version, artifact_url } => serde_json::json!({
                "command_id": id.to_string(),
                "install_app": { "app": app, "version": version, "artifact_url": artifact_url },
            }),
        };
        self.out
            .try_publish(
                topics::device_topic(twin.as_str(), topics::COMMANDS),
                QoS::AtLeastOnce,
                false,
                body.to_string(),
            )
            .map_err(|e| format!("cannot queue the MQTT command for {twin}: {e}"))
    }
}

/// A running transformer (both connections).
#[derive(Debug)]
pub(crate) struct Transformer {
    pub links: Arc<MqttLinks>,
    /// Turns true once the ingest connection is subscribed.
    pub subscribed: watch::Receiver<bool>,
    closing: watch::Sender<bool>,
    tasks: Vec<tokio::task::JoinHandle<()>>,
}

fn options(spec: &TransformerSpec, client_id: String, clean: bool) -> MqttOptions {
    let mut o = MqttOptions::new(client_id, spec.broker.host.clone(), spec.broker.port);
    o.set_keep_alive(Duration::from_secs(30));
    o.set_clean_session(clean);
    // The ingest session acknowledges by hand, after the twin has the message.
    o.set_manual_acks(!clean);
    o.set_max_packet_size(spec.max_payload + 1024, spec.max_payload + 1024);
    o.set_inflight(1_000);
    if let Some(u) = &spec.broker.username {
        o.set_credentials(u.clone(), spec.broker.password.clone().unwrap_or_default());
    }
    o
}

/// Polls a connection forever, reconnecting with backoff; hands publishes to `sink`.
async fn drive(
    mut events: EventLoop,
    name: &'static str,
    broker: String,
    on_connect: impl Fn(),
    connected: Arc<AtomicBool>,
    sink: Option<mpsc::Sender<Publish>>,
    subscribed: watch::Sender<bool>,
) {
    let mut delay = Duration::from_millis(100);
    loop {
        match events.poll().await {
            Ok(Event::Incoming(Packet::ConnAck(_))) => {
                tracing::info!("MQTT transformer ({name}) connected to {broker}");
                delay = Duration::from_millis(100);
                connected.store(true, Relaxed);
                on_connect();
            }
            Ok(Event::Incoming(Packet::SubAck(_))) => {
                subscribed.send_replace(true);
            }
            Ok(Event::Incoming(Packet::Publish(p))) => {
                if let Some(sink) = &sink
                    && sink.send(p).await.is_err()
                {
                    return;
                }
            }
            Ok(_) => {}
            Err(e) => {
                if connected.swap(false, Relaxed) {
                    tracing::warn!("MQTT transformer ({name}) lost {broker}: {e}; reconnecting");
                } else {
                    tracing::debug!("MQTT transformer ({name}) cannot reach {broker}: {e}");
                }
                tokio::time::sleep(delay).await;
                delay = (delay * 2).min(Duration::from_secs(5));
            }
        }
    }
}

impl Transformer {
    /// Connects and starts handling messages on the current tokio runtime.
    pub fn start(rt: TwinRuntime, spec: TransformerSpec) -> Transformer {
        let (out, out_events) = AsyncClient::new(options(&spec, format!("{}-out", spec.client_id), true), 4_096);
        let (ingest, ingest_events) = AsyncClient::new(options(&spec, spec.client_id.clone(), false), WINDOW * 4);
        let out_connected = Arc::new(AtomicBool::new(false));
        let links = Arc::new(MqttLinks { out: out.clone(), connected: out_connected.clone() });
        let core = Arc::new(Core { rt, spec: spec.clone(), out });
        let (closing, closing_rx) = watch::channel(false);
        let broker = spec.broker.to_string();
        let (work_tx, work_rx) = mpsc::channel(WINDOW);
        let (subscribed_tx, subscribed) = watch::channel(false);

        let mut filters: Vec<String> = Vec::new();
        if spec.devices {
            filters.extend(topics::device_filters());
        }
        if spec.provisioning {
            filters.push(topics::PROVISIONING_FILTER.into());
        }
        let sub = ingest.clone();
        // Subscribing again after every connect is harmless and covers a broker that
        // forgot the session.
        let on_connect = move || {
            let f = filters.iter().map(|f| rumqttc::SubscribeFilter::new(f.clone(), QoS::AtLeastOnce));
            if let Err(e) = sub.try_subscribe_many(f) {
                tracing::error!("MQTT transformer cannot subscribe: {e}");
            }
        };
        let stop = |mut c: watch::Receiver<bool>| async move {
            let _ = c.wait_for(|v| *v).await;
        };
        let tasks = vec![
            tokio::spawn({
                let (stop, c) = (stop, closing_rx.clone());
                let broker = broker.clone();
                async move {
                    tokio::select! {
                        () = drive(ingest_events, "ingest", broker, on_connect, Arc::new(AtomicBool::new(false)), Some(work_tx), subscribed_tx) => {}
                        () = stop(c) => {}
                    }
                }
            }),
            tokio::spawn({
                let c = closing_rx.clone();
                async move {
                    tokio::select! {
                        () = drive(out_events, "out", broker, || {}, out_connected, None, watch::channel(false).0) => {}
                        () = stop(c) => {}
                    }
                }
            }),
            tokio::spawn({
                let c = closing_rx;
                async move {
                    tokio::select! {
                        () = work(core, ingest, work_rx, spec.pacer) => {}
                        () = stop(c) => {}
                    }
                }
            }),
        ];
        Transformer { links, subscribed, closing, tasks }
    }

    /// Disconnects; what was not acknowledged is redelivered to the next transformer.
    pub async fn stop(self) {
        let _ = self.closing.send(true);
        for t in self.tasks {
            let _ = t.await;
        }
    }
}

/// Handles up to `WINDOW` messages at once and acknowledges them in arrival order, each
/// only once it is handled.
async fn work(core: Arc<Core>, acks: AsyncClient, mut rx: mpsc::Receiver<Publish>, pacer: Option<Arc<Pacer>>) {
    let mut pipeline = FuturesOrdered::new();
    loop {
        tokio::select! {
            biased;
            Some(p) = pipeline.next(), if !pipeline.is_empty() => {
                let p: Publish = p;
                if p.qos != QoS::AtMostOnce && acks.ack(&p).await.is_err() {
                    return;
                }
                if let Some(pacer) = &pacer
                    && p.topic.starts_with("devices/")
                {
                    pacer.release(1);
                }
            }
            m = rx.recv(), if pipeline.len() < WINDOW => match m {
                Some(p) => pipeline.push_back(core.clone().handle(p)),
                None => return,
            },
        }
    }
}
