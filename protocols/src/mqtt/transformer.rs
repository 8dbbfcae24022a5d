//! The MQTT transformer: subscribes to the device topics on an external broker (e.g.
//! Mosquitto), turns each message into the twin's own message ([`super::ingest`]), and
//! turns twins' commands into publishes. (The embedded gateway serves devices itself:
//! [`super::gateway`].)
//!
//! Two connections per broker:
//! - **ingest**: persistent session (`clean_session = false`), QoS 1 subscriptions, manual
//!   acks. A message is acknowledged only after its twin has it (durably, for telemetry
//!   and state) or it was rejected; acks go out in the order messages came (brokers
//!   may refuse out-of-order acks). Unacknowledged messages are redelivered by the broker
//!   after a reconnect or a restart of the transformer.
//! - **out**: commands and provisioning responses, so that a flood of commands can never
//!   hold up the acks of the ingest connection.
//!
//! The device id is the topic's; the twin is found through the runtime's directory (a
//! dashmap). The broker's ACL must check that the sender is that device (PROTOCOL.md).

use super::ingest::{Ingest, Refused};
use super::topics::{self, Parsed};
use futures::StreamExt;
use futures::stream::FuturesOrdered;
use rumqttc::{AsyncClient, Event, EventLoop, MqttOptions, Packet, Publish, QoS};
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering::Relaxed};
use std::time::Duration;
use tokio::sync::{mpsc, watch};
use twinfleet_actors::{DeviceCommand, DeviceLink, TwinRuntime};
use twinfleet_models::{CommandId, Metadata, TwinId};

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
    /// Where provisioned devices are told to connect.
    pub operational: String,
    pub max_payload: usize,
    /// Keep the broker's accounts in step with twinfleet's credentials
    /// ([`super::accounts`]).
    pub accounts: bool,
}

#[derive(Debug)]
struct Core {
    ingest: Ingest,
    spec: TransformerSpec,
    out: AsyncClient,
}

impl Core {
    /// Handles one message; returns it for the ack.
    async fn handle(self: Arc<Self>, p: Publish) -> Publish {
        let result = if p.retain {
            // A broker sets the flag only on what it replays from its retained store for
            // a (re)subscription (MQTT 3.1.1 §3.3.1.3, 5 §3.3.1.3): an old message, which
            // must not overwrite newer state. Live messages arrive without it.
            Err(Refused::new("retained", format!("a retained message replayed on {}", p.topic)))
        } else if p.payload.len() > self.spec.max_payload {
            Err(Refused::new(
                "oversized",
                format!("{} bytes on {} (limit {})", p.payload.len(), p.topic, self.spec.max_payload),
            ))
        } else {
            match topics::parse(&p.topic) {
                Some(Parsed::Device { id, channel }) if self.spec.devices => match self.ingest.rt.twin(id) {
                    Ok(twin) => {
                        // The broker authenticated the device: a provisioning process
                        // waiting for its first message ends.
                        self.ingest.rt.device_connected(id);
                        self.ingest.device(&twin, channel, &p.payload).await
                    }
                    Err(_) => Err(Refused::new("unknown_device", format!("no twin {id:?}"))),
                },
                Some(Parsed::Provisioning { ty, id }) if self.spec.provisioning => {
                    let (body, result) = self.ingest.provision(ty, id, None, &p.payload, None).await;
                    let topic = topics::provisioning_response(ty, id);
                    if let Err(e) = self.out.publish(topic, QoS::AtLeastOnce, false, body.to_string()).await {
                        tracing::warn!("cannot answer the provisioning request of {id}: {e}");
                    }
                    result
                }
                _ => Err(Refused::new("unknown_topic", format!("nothing listens on {:?}", p.topic))),
            }
        };
        if let Err(r) = result {
            self.ingest.rt.rejections().reject(r.reason, || format!("MQTT {}: {}", p.topic, r.detail));
        }
        p
    }
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
        let body = super::gateway::command_payload(id, cmd);
        self.out
            .try_publish(topics::device_topic(twin.as_str(), topics::COMMANDS), QoS::AtLeastOnce, false, body)
            .map_err(|e| format!("cannot queue the MQTT command for {twin}: {e}"))
    }
}

/// A running transformer (both connections).
#[derive(Debug)]
pub(crate) struct Transformer {
    pub links: Arc<MqttLinks>,
    /// Whether it serves device topics (not only provisioning).
    pub devices: bool,
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
        let shared_rt = rt.clone();
        // (On a broker, every claimant of a type shares the claim account, which may read
        // every response of the type: claims must carry a proof to seal their token.)
        let shared = Ingest { rt, operational: spec.operational.clone(), require_proof: true };
        let core = Arc::new(Core { ingest: shared, spec: spec.clone(), out });
        let (closing, closing_rx) = watch::channel(false);
        let broker = spec.broker.to_string();
        let (work_tx, work_rx) = mpsc::channel(WINDOW);
        let subscribed_tx = watch::channel(false).0;

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
        // Watching starts now, so no credential change after start is missed.
        let accounts = spec.accounts.then(|| {
            let changes = shared_rt.sessions().watch();
            let scope = super::accounts::Scope { devices: spec.devices, claims: spec.provisioning };
            let (run, c) = (super::accounts::run(shared_rt.clone(), spec.clone(), scope, changes), closing_rx.clone());
            tokio::spawn(async move {
                tokio::select! {
                    () = run => {}
                    () = stop(c) => {}
                }
            })
        });
        let mut tasks = vec![
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
                        () = work(core, ingest, work_rx) => {}
                        () = stop(c) => {}
                    }
                }
            }),
        ];
        tasks.extend(accounts);
        Transformer { links, devices: spec.devices, closing, tasks }
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
async fn work(core: Arc<Core>, acks: AsyncClient, mut rx: mpsc::Receiver<Publish>) {
    let mut pipeline = FuturesOrdered::new();
    loop {
        tokio::select! {
            biased;
            Some(p) = pipeline.next(), if !pipeline.is_empty() => {
                let p: Publish = p;
                if p.qos != QoS::AtMostOnce && acks.ack(&p).await.is_err() {
                    return;
                }
            }
            m = rx.recv(), if pipeline.len() < WINDOW => match m {
                Some(p) => pipeline.push_back(core.clone().handle(p)),
                None => return,
            },
        }
    }
}
