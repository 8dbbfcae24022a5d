//! MQTT: the gateways (an embedded broker behind twinfleet's own front, or an external
//! broker) and the transformer that connects them to the twins. PROTOCOL.md describes the
//! topics and payloads for device makers.
//!
//! - **Embedded** (the default of `twinfleet run`): rumqttd in-process; devices connect
//!   to the operational listener (127.0.0.1:1883) or, to be provisioned, to the
//!   provisioning listener (127.0.0.1:1884). Both are fronts ([`front`]) that
//!   authenticate, confine each connection to its own topics and pace devices.
//! - **External**: a broker URL per gateway (`mqtt://user:pass@host:port`); the
//!   transformer connects there and the broker's own authentication and ACL must confine
//!   devices (`deploy/mosquitto/acl` for Mosquitto).

mod device;
pub mod front;
pub mod topics;
mod transformer;

pub use device::{MqttDevice, MqttDeviceCommand, ProvisionResponse};
pub use front::{EmbeddedBroker, FrontKind, Pacer};
pub use rumqttc::QoS;
pub use transformer::{BrokerUrl, MqttLinks};

use front::Front;
use std::net::SocketAddr;
use std::sync::Arc;
use tokio::sync::{oneshot, watch};
use transformer::{Transformer, TransformerSpec};
use twinfleet_actors::TwinRuntime;

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
    /// Devices the embedded broker accepts at once.
    pub max_connections: usize,
    /// Device messages the embedded gateway lets ahead of the transformer before it
    /// stops reading from device sockets.
    pub max_lag: usize,
    /// The transformer's MQTT client id (its persistent session on the broker).
    pub client_id: String,
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
            max_lag: 50_000,
            client_id: "twinfleet-transformer".into(),
        }
    }
}

/// The running MQTT side: fronts (embedded), transformers, the twins' MQTT link.
#[derive(Debug)]
pub struct MqttGateway {
    operational: Endpoint,
    provisioning: Endpoint,
    closing: watch::Sender<bool>,
    rt: TwinRuntime,
    arbiter: actix::ArbiterHandle,
    stopped: Option<oneshot::Receiver<()>>,
    stop: Option<oneshot::Sender<()>>,
    broker: Option<EmbeddedBroker>,
}

impl MqttGateway {
    /// Binds the embedded listeners (if any), starts the embedded broker (if needed) and
    /// the transformers on an arbiter of their own, and attaches the twins' MQTT link.
    pub async fn start(rt: TwinRuntime, cfg: MqttConfig) -> std::io::Result<MqttGateway> {
        let embedded =
            matches!(cfg.operational, Endpoint::Listen(_)) || matches!(cfg.provisioning, Endpoint::Listen(_));
        let broker = if embedded { Some(EmbeddedBroker::start(cfg.max_payload, cfg.max_connections)?) } else { None };
        let pacer = Pacer::new(cfg.max_lag);
        let mut listeners = Vec::new();
        let mut bind = |ep: &mut Endpoint, kind: FrontKind| -> std::io::Result<()> {
            if let Endpoint::Listen(addr) = ep {
                let l = std::net::TcpListener::bind(*addr)?;
                l.set_nonblocking(true)?;
                *addr = l.local_addr()?;
                listeners.push((l, kind));
            }
            Ok(())
        };
        let (mut operational, mut provisioning) = (cfg.operational.clone(), cfg.provisioning.clone());
        bind(&mut operational, FrontKind::Operational)?;
        bind(&mut provisioning, FrontKind::Provisioning)?;

        let internal = |b: &EmbeddedBroker| BrokerUrl {
            host: b.addr.ip().to_string(),
            port: b.addr.port(),
            username: Some("twinfleet".into()),
            password: Some(b.secret.to_string()),
        };
        let advertised = match &operational {
            Endpoint::Listen(a) => format!("mqtt://{a}"),
            Endpoint::Broker(b) => b.to_string(),
        };
        let spec = |broker: BrokerUrl, suffix: &str, devices: bool, provisioning: bool| TransformerSpec {
            broker,
            client_id: format!("{}{suffix}", cfg.client_id),
            devices,
            provisioning,
            pacer: None,
            operational: advertised.clone(),
            max_payload: cfg.max_payload,
        };
        let mut specs = Vec::new();
        match (&operational, &provisioning, &broker) {
            (Endpoint::Listen(_), Endpoint::Listen(_), Some(b)) => {
                specs.push(TransformerSpec { pacer: Some(pacer.clone()), ..spec(internal(b), "", true, true) })
            }
            _ => {
                let url = |ep: &Endpoint| match ep {
                    Endpoint::Listen(_) => internal(broker.as_ref().expect("embedded broker started")),
                    Endpoint::Broker(u) => u.clone(),
                };
                let pace = matches!(operational, Endpoint::Listen(_)).then(|| pacer.clone());
                specs.push(TransformerSpec { pacer: pace, ..spec(url(&operational), "", true, false) });
                specs.push(spec(url(&provisioning), "-provisioning", false, true));
            }
        }

        let (closing, closing_rx) = watch::channel(false);
        let (links_tx, links_rx) = oneshot::channel();
        let (stop, stop_rx) = oneshot::channel::<()>();
        let (stopped_tx, stopped) = oneshot::channel();
        let arbiter = actix::Arbiter::new();
        let (rt2, broker2) = (rt.clone(), broker.clone());
        arbiter.spawn(async move {
            for (l, kind) in listeners {
                let Ok(l) = tokio::net::TcpListener::from_std(l) else { continue };
                let front = Arc::new(Front {
                    rt: rt2.clone(),
                    broker: broker2.clone().expect("a listener implies the embedded broker"),
                    pacer: pacer.clone(),
                    kind,
                    max_payload: cfg.max_payload,
                });
                tokio::spawn(front.run(l, closing_rx.clone()));
            }
            let transformers: Vec<Transformer> =
                specs.into_iter().map(|s| Transformer::start(rt2.clone(), s)).collect();
            let _ = links_tx.send((transformers[0].links.clone(), transformers[0].subscribed.clone()));
            let _ = stop_rx.await;
            for t in transformers {
                t.stop().await;
            }
            let _ = stopped_tx.send(());
            actix::Arbiter::current().stop();
        });
        let (links, mut subscribed) =
            links_rx.await.map_err(|_| std::io::Error::other("the MQTT arbiter did not start"))?;
        // The embedded gateway is ready once its transformer is subscribed; an external
        // broker may come later (the transformer keeps trying and logs it).
        if broker.is_some()
            && tokio::time::timeout(std::time::Duration::from_secs(10), subscribed.wait_for(|s| *s)).await.is_err()
        {
            return Err(std::io::Error::other("the embedded MQTT broker did not accept the transformer within 10 s"));
        }
        rt.attach_device_link("mqtt", links);
        Ok(MqttGateway {
            operational,
            provisioning,
            closing,
            rt,
            arbiter: arbiter.handle(),
            stopped: Some(stopped),
            stop: Some(stop),
            broker,
        })
    }

    /// The operational gateway (the bound address when it listens).
    pub fn operational(&self) -> &Endpoint {
        &self.operational
    }

    pub fn provisioning(&self) -> &Endpoint {
        &self.provisioning
    }

    /// The embedded broker's own loopback listener (tests use it to show that it refuses
    /// clients that skip the front).
    pub fn embedded_broker(&self) -> Option<&EmbeddedBroker> {
        self.broker.as_ref()
    }

    /// Closes the listeners and every device connection, detaches the twins' MQTT link
    /// and disconnects the transformers (what they did not acknowledge, the broker
    /// keeps for the next start). The embedded rumqttd itself cannot be stopped and
    /// lives until the process ends.
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
    }
}
