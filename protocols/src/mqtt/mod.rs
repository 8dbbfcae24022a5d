//! MQTT: the embedded gateway (twinfleet serves device sessions itself) or an external
//! broker reached through the transformer. PROTOCOL.md describes the topics and
//! payloads for device makers.
//!
//! - **Embedded** (the default of `twinfleet run`): [`gateway`] serves MQTT 3.1.1 and 5
//!   on the operational listener (127.0.0.1:1883) and the provisioning listener
//!   (127.0.0.1:1884); one socket per device, messages go straight to the twins.
//! - **External**: a broker URL per gateway (`mqtt://user:pass@host:port`); the
//!   transformer connects there and the broker's own authentication and ACL must confine
//!   devices (`deploy/mosquitto/`).

pub mod accounts;
mod device;
pub mod gateway;
mod ingest;
pub mod publisher;
pub mod topics;
mod transformer;
mod wire;

pub use device::{MqttDevice, MqttDeviceCommand, ProvisionResponse};
pub use gateway::{EmbeddedLinks, ListenerKind, RECEIVE_MAX};
pub use rumqttc::QoS;
pub use transformer::{BrokerUrl, MqttLinks};

use gateway::Gateway;
use std::net::SocketAddr;
use std::sync::Arc;
use tokio::sync::{oneshot, watch};
use transformer::{Transformer, TransformerSpec};
use twinfleet_actors::{DeviceLink, TwinRuntime};

/// One MQTT gateway: an embedded listener, or an external broker.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Endpoint {
    /// A listener of the embedded gateway.
    Listen(SocketAddr),
    /// An external broker the transformer connects to.
    Broker(BrokerUrl),
}

impl std::str::FromStr for Endpoint {
    type Err = String;
    /// `host:port` listens (embedded); `mqtt://...` is an external broker.
    fn from_str(s: &str) -> Result<Self, String> {
        if s.starts_with("mqtt://") {
            s.parse().map(Endpoint::Broker)
        } else {
            s.parse().map(Endpoint::Listen).map_err(|_| format!("{s:?} is neither host:port nor an mqtt:// URL"))
        }
    }
}

impl std::fmt::Display for Endpoint {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Endpoint::Listen(a) => write!(f, "{a}"),
            Endpoint::Broker(b) => write!(f, "{b}"),
        }
    }
}

#[derive(Debug, Clone)]
pub struct MqttConfig {
    pub operational: Endpoint,
    pub provisioning: Endpoint,
    /// Largest message payload, in bytes (larger ones are rejected as `oversized`).
    pub max_payload: usize,
    /// Devices each embedded listener accepts at once.
    pub max_connections: usize,
    /// The transformer's MQTT client id (its persistent session on an external broker).
    pub client_id: String,
    /// External brokers only: keep the broker's device and claim accounts in step with
    /// twinfleet's credentials through Mosquitto's dynamic-security plugin
    /// ([`accounts`]). Off: the operator keeps the broker's accounts.
    pub broker_accounts: bool,
}

pub const DEFAULT_MQTT: &str = "127.0.0.1:1883";
pub const DEFAULT_MQTT_PROVISIONING: &str = "127.0.0.1:1884";

impl Default for MqttConfig {
    fn default() -> Self {
        MqttConfig {
            operational: DEFAULT_MQTT.parse().expect("default parses"),
            provisioning: DEFAULT_MQTT_PROVISIONING.parse().expect("default parses"),
            max_payload: 256 * 1024,
            max_connections: 100_000,
            client_id: "twinfleet-transformer".into(),
            broker_accounts: false,
        }
    }
}

/// The running MQTT side: embedded listeners, transformers, the twins' MQTT link.
#[derive(Debug)]
pub struct MqttGateway {
    operational: Endpoint,
    provisioning: Endpoint,
    closing: watch::Sender<bool>,
    rt: TwinRuntime,
    arbiter: actix::ArbiterHandle,
    /// The provisioning listener's thread, at a lower priority (see `start`).
    claims_arbiter: Option<actix::ArbiterHandle>,
    stopped: Option<oneshot::Receiver<()>>,
    stop: Option<oneshot::Sender<()>>,
}

impl MqttGateway {
    /// Binds the embedded listeners (if any) and starts the transformers of external
    /// brokers (if any) on an arbiter of their own, and attaches the twins' MQTT link.
    pub async fn start(rt: TwinRuntime, cfg: MqttConfig) -> std::io::Result<MqttGateway> {
        let mut listeners = Vec::new();
        let mut bind = |ep: &mut Endpoint, kind: ListenerKind| -> std::io::Result<()> {
            if let Endpoint::Listen(addr) = ep {
                let l = crate::listen::tcp_listener(*addr)?;
                *addr = l.local_addr()?;
                listeners.push((l, kind));
            }
            Ok(())
        };
        let (mut operational, mut provisioning) = (cfg.operational.clone(), cfg.provisioning.clone());
        bind(&mut operational, ListenerKind::Operational)?;
        bind(&mut provisioning, ListenerKind::Provisioning)?;
        let advertised = match &operational {
            Endpoint::Listen(a) => format!("mqtt://{a}"),
            Endpoint::Broker(b) => b.to_string(),
        };
        let gateway = Gateway::new(rt.clone(), advertised.clone(), cfg.max_payload, cfg.max_connections);
        let spec = |broker: BrokerUrl, suffix: &str, devices: bool, provisioning: bool| TransformerSpec {
            broker,
            client_id: format!("{}{suffix}", cfg.client_id),
            devices,
            provisioning,
            operational: advertised.clone(),
            max_payload: cfg.max_payload,
            accounts: cfg.broker_accounts,
        };
        let mut specs = Vec::new();
        match (&operational, &provisioning) {
            (Endpoint::Broker(o), Endpoint::Broker(p)) if o == p => specs.push(spec(o.clone(), "", true, true)),
            _ => {
                if let Endpoint::Broker(o) = &operational {
                    specs.push(spec(o.clone(), "", true, false));
                }
                if let Endpoint::Broker(p) = &provisioning {
                    specs.push(spec(p.clone(), "-provisioning", false, true));
                }
            }
        }
        let devices_external = matches!(operational, Endpoint::Broker(_));

        let (closing, closing_rx) = watch::channel(false);
        let (links_tx, links_rx) = oneshot::channel::<Option<Arc<MqttLinks>>>();
        let (stop, stop_rx) = oneshot::channel::<()>();
        let (stopped_tx, stopped) = oneshot::channel();
        // The provisioning listener runs on a thread of its own at nice +10: a claim flood
        // (accepts, CONNECT checks, claims) then gets only the CPU the operational
        // sessions and the twins leave (the paper's reason for a separate provisioning
        // gateway, section 7.2).
        let claims_arbiter = match listeners.iter().position(|(_, k)| *k == ListenerKind::Provisioning) {
            Some(i) => {
                let (l, kind) = listeners.remove(i);
                let a = actix::Arbiter::new();
                let (gw, closing) = (gateway.clone(), closing_rx.clone());
                a.spawn(async move {
                    if let Err(e) = twinfleet_runtime::arbiters::lower_thread_priority(10) {
                        tracing::info!("the provisioning listener keeps the normal priority: {e}");
                    }
                    if let Ok(l) = tokio::net::TcpListener::from_std(l) {
                        gw.run(l, kind, closing).await;
                    }
                });
                Some(a.handle())
            }
            None => None,
        };
        let arbiter = actix::Arbiter::new();
        let (rt2, gw2) = (rt.clone(), gateway.clone());
        arbiter.spawn(async move {
            for (l, kind) in listeners {
                let Ok(l) = tokio::net::TcpListener::from_std(l) else { continue };
                tokio::spawn(gw2.clone().run(l, kind, closing_rx.clone()));
            }
            let transformers: Vec<Transformer> =
                specs.into_iter().map(|s| Transformer::start(rt2.clone(), s)).collect();
            let links = transformers.iter().find(|t| t.devices).map(|t| t.links.clone());
            let _ = links_tx.send(links);
            let _ = stop_rx.await;
            for t in transformers {
                t.stop().await;
            }
            let _ = stopped_tx.send(());
            actix::Arbiter::current().stop();
        });
        let external = links_rx.await.map_err(|_| std::io::Error::other("the MQTT arbiter did not start"))?;
        let link: Arc<dyn DeviceLink> = match external {
            Some(l) if devices_external => l,
            _ => Arc::new(gateway.links()),
        };
        rt.attach_device_link("mqtt", link);
        Ok(MqttGateway {
            operational,
            provisioning,
            closing,
            rt,
            arbiter: arbiter.handle(),
            claims_arbiter,
            stopped: Some(stopped),
            stop: Some(stop),
        })
    }

    /// The operational gateway (the bound address when it listens).
    pub fn operational(&self) -> &Endpoint {
        &self.operational
    }

    pub fn provisioning(&self) -> &Endpoint {
        &self.provisioning
    }

    /// Closes the listeners and every device connection, detaches the twins' MQTT link
    /// and disconnects the transformers (what they did not acknowledge, an external
    /// broker keeps for the next start).
    pub async fn stop(mut self) {
        self.rt.detach_device_link("mqtt");
        let _ = self.closing.send(true);
        if let Some(s) = self.stop.take() {
            let _ = s.send(());
        }
        if let Some(d) = self.stopped.take()
            && tokio::time::timeout(std::time::Duration::from_secs(5), d).await.is_err()
        {
            self.arbiter.stop();
        }
        if let Some(a) = self.claims_arbiter.take() {
            // (Its listener and connections end with `closing`; give them a moment.)
            tokio::time::sleep(std::time::Duration::from_millis(50)).await;
            a.stop();
        }
    }
}
