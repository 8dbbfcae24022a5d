//! The embedded MQTT gateway: rumqttd routes messages, and in front of it, on the
//! operational and provisioning listeners, a thin MQTT 3.1.1 front of ours that
//!
//! - authenticates every CONNECT against the credential store (operational: client id =
//!   username = twin id, password = device token; provisioning: client id = the new
//!   device's id, username = its device type, password = the type's claim token);
//! - confines every connection to its own topics: a PUBLISH or SUBSCRIBE outside them is
//!   counted (`wrong_device`), logged, and the connection is closed before the packet
//!   reaches the broker;
//! - paces device sockets while the transformer is behind ([`Pacer`]): it stops reading
//!   from devices, so TCP pushes back to them instead of a queue growing in the broker.
//!
//! The front rewrites the password of the CONNECT it forwards to a secret made per
//! process, which is all the broker's own listener accepts (loopback, random port): a
//! client that skips the front cannot connect at all.
//! rumqttd 0.20 cannot be stopped; [`EmbeddedBroker`] lives until the process ends.
//! It is ready when the transformer has subscribed (`MqttGateway::start` waits for that).

use super::topics::Identity;
use bytes::{Buf, BytesMut};
use rumqttc::mqttbytes::v4::{ConnAck, Connect, ConnectReturnCode, Login, Packet};
use rumqttc::mqttbytes::{self, PacketType};
use std::net::SocketAddr;
use std::sync::Arc;
use std::sync::atomic::{AtomicI64, Ordering::Relaxed};
use std::time::{Duration, Instant};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::{Notify, watch};
use twinfleet_actors::TwinRuntime;

/// How long a new connection may take to send its CONNECT.
const CONNECT_TIMEOUT: Duration = Duration::from_secs(10);

/// Messages forwarded to the transformer but not yet acknowledged by it, across all
/// devices. Above `high`, fronts stop reading from device sockets until the transformer
/// has caught up to half of it.
#[derive(Debug)]
pub struct Pacer {
    in_flight: AtomicI64,
    high: i64,
    notify: Notify,
    started: Instant,
    last_release_ms: AtomicI64,
}

/// A lag that has not moved for this long is a count that lost messages (e.g. a
/// broker that dropped them), not a slow transformer: start counting afresh.
const STALE_LAG: Duration = Duration::from_secs(10);

impl Pacer {
    pub fn new(high: usize) -> Arc<Self> {
        Arc::new(Pacer {
            in_flight: AtomicI64::new(0),
            high: high.max(1) as i64,
            notify: Notify::new(),
            started: Instant::now(),
            last_release_ms: AtomicI64::new(0),
        })
    }

    /// Messages the transformer has not yet acknowledged.
    pub fn lag(&self) -> i64 {
        self.in_flight.load(Relaxed)
    }

    pub(crate) fn release(&self, n: i64) {
        self.last_release_ms.store(self.started.elapsed().as_millis() as i64, Relaxed);
        let left = self.in_flight.fetch_sub(n, Relaxed) - n;
        if left <= self.high / 2 {
            self.notify.notify_waiters();
        }
    }

    /// Counts `n` messages forwarded; waits while the transformer is too far behind.
    async fn admit(&self, n: i64) {
        self.in_flight.fetch_add(n, Relaxed);
        loop {
            let notified = self.notify.notified();
            tokio::pin!(notified);
            notified.as_mut().enable();
            if self.in_flight.load(Relaxed) <= self.high {
                return;
            }
            if tokio::time::timeout(Duration::from_secs(1), notified).await.is_err() {
                let idle = self.started.elapsed().as_millis() as i64 - self.last_release_ms.load(Relaxed);
                if idle > STALE_LAG.as_millis() as i64 {
                    tracing::warn!(
                        lag = self.lag(),
                        "MQTT transformer acknowledged nothing for 10 s; resetting the lag"
                    );
                    self.in_flight.store(0, Relaxed);
                    self.notify.notify_waiters();
                }
            }
        }
    }
}

/// Which listener a front serves.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum FrontKind {
    Operational,
    Provisioning,
}

/// rumqttd, embedded, with one loopback listener only the fronts and the transformer
/// can use (they know the secret).
#[derive(Debug, Clone)]
pub struct EmbeddedBroker {
    pub addr: SocketAddr,
    pub secret: Arc<str>,
}

impl EmbeddedBroker {
    /// Starts rumqttd in threads of its own. `max_payload` bounds a message;
    /// `max_connections` the devices (plus a few for the transformer).
    pub fn start(max_payload: usize, max_connections: usize) -> std::io::Result<Self> {
        let mut raw = [0u8; 24];
        getrandom::fill(&mut raw).map_err(|e| std::io::Error::other(e.to_string()))?;
        let secret: Arc<str> = raw.iter().map(|b| format!("{b:02x}")).collect::<String>().into();
        // rumqttd takes an address, not a socket: find a free port and hand it over.
        let addr = std::net::TcpListener::bind("127.0.0.1:0")?.local_addr()?;
        let mut connections = rumqttd::ConnectionSettings {
            connection_timeout_ms: 10_000,
            max_payload_size: max_payload + 1024,
            max_inflight_count: 1_000,
            auth: None,
            external_auth: None,
            dynamic_filters: true,
        };
        let expected = secret.clone();
        connections.set_auth_handler(move |_client, _user, pass: String| {
            let ok = pass.as_bytes() == expected.as_bytes();
            async move { ok }
        });
        let server = rumqttd::ServerSettings {
            name: "twinfleet-internal".into(),
            listen: addr,
            tls: None,
            next_connection_delay_ms: 0,
            connections,
        };
        let config = rumqttd::Config {
            id: 0,
            router: rumqttd::RouterConfig {
                max_connections: max_connections + 16,
                max_outgoing_packet_count: 1_000,
                max_segment_size: 64 << 20,
                max_segment_count: 4,
                ..Default::default()
            },
            v4: Some([("internal".to_string(), server)].into_iter().collect()),
            ..Default::default()
        };
        std::thread::Builder::new().name("tf-mqtt-broker".into()).spawn(move || {
            let mut broker = rumqttd::Broker::new(config);
            if let Err(e) = broker.start() {
                tracing::error!("embedded MQTT broker stopped: {e}");
            }
        })?;
        Ok(EmbeddedBroker { addr, secret })
    }
}

#[derive(Debug)]
pub(crate) struct Front {
    pub rt: TwinRuntime,
    pub broker: EmbeddedBroker,
    pub pacer: Arc<Pacer>,
    pub kind: FrontKind,
    pub max_payload: usize,
}

impl Front {
    /// Accepts devices until `closing` turns true; then closes every connection.
    pub async fn run(self: Arc<Self>, listener: TcpListener, closing: watch::Receiver<bool>) {
        loop {
            let mut c = closing.clone();
            let accepted = tokio::select! {
                a = listener.accept() => a,
                _ = c.wait_for(|v| *v) => return,
            };
            match accepted {
                Ok((stream, _)) => {
                    let front = self.clone();
                    let mut c = closing.clone();
                    tokio::spawn(async move {
                        tokio::select! {
                            () = front.serve(stream) => {}
                            _ = c.wait_for(|v| *v) => {}
                        }
                    });
                }
                Err(e) => {
                    tracing::warn!("MQTT accept failed: {e}");
                    tokio::time::sleep(Duration::from_millis(50)).await;
                }
            }
        }
    }

    fn reject(&self, reason: &'static str, detail: impl FnOnce() -> String) {
        self.rt.rejections().reject(reason, detail);
    }

    /// Reads one whole packet into `buf` (which may already hold some bytes).
    async fn read_frame(&self, sock: &mut TcpStream, buf: &mut BytesMut) -> Result<BytesMut, &'static str> {
        loop {
            match mqttbytes::check(buf.iter(), self.max_payload + 1024) {
                Ok(h) => return Ok(buf.split_to(h.frame_length())),
                Err(mqttbytes::Error::InsufficientBytes(_)) => {}
                Err(mqttbytes::Error::PayloadSizeLimitExceeded(_)) => return Err("oversized"),
                Err(_) => return Err("malformed"),
            }
            match sock.read_buf(buf).await {
                Ok(0) | Err(_) => return Err("closed"),
                Ok(_) => {}
            }
        }
    }

    async fn refuse(&self, sock: &mut TcpStream, code: ConnectReturnCode) {
        let mut out = BytesMut::new();
        if ConnAck::new(code, false).write(&mut out).is_ok() {
            let _ = sock.write_all(&out).await;
        }
        let _ = sock.shutdown().await;
    }

    /// Checks the CONNECT: who is this?
    fn identify(&self, connect: &Connect) -> Result<Identity, ConnectReturnCode> {
        let Some(Login { username, password }) = &connect.login else {
            self.reject("bad_credentials", || format!("MQTT client {:?} sent no username/password", connect.client_id));
            return Err(ConnectReturnCode::BadUserNamePassword);
        };
        match self.kind {
            FrontKind::Operational => {
                if connect.client_id != *username {
                    self.reject("bad_credentials", || {
                        format!("MQTT client id {:?} is not its username {username:?}", connect.client_id)
                    });
                    return Err(ConnectReturnCode::BadClientId);
                }
                match self.rt.authenticate_device(username, password) {
                    Ok(_) => Ok(Identity::Device(username.clone())),
                    Err(twinfleet_actors::AuthError::Storage(_)) => Err(ConnectReturnCode::ServiceUnavailable),
                    Err(_) => Err(ConnectReturnCode::NotAuthorized),
                }
            }
            FrontKind::Provisioning => match self.rt.authenticate_claim(username, password) {
                Ok(_) if twinfleet_models::TwinId::new(&connect.client_id).is_ok() => {
                    Ok(Identity::Claimant { ty: username.clone(), id: connect.client_id.clone() })
                }
                Ok(_) => {
                    self.reject("malformed", || format!("{:?} is not a valid device id", connect.client_id));
                    Err(ConnectReturnCode::BadClientId)
                }
                Err(twinfleet_actors::AuthError::Storage(_)) => Err(ConnectReturnCode::ServiceUnavailable),
                Err(_) => Err(ConnectReturnCode::NotAuthorized),
            },
        }
    }

    async fn serve(&self, mut device: TcpStream) {
        let _ = device.set_nodelay(true);
        let mut buf = BytesMut::with_capacity(1024);
        let frame = match tokio::time::timeout(CONNECT_TIMEOUT, self.read_frame(&mut device, &mut buf)).await {
            Ok(Ok(f)) => f,
            Ok(Err("closed")) | Err(_) => return,
            Ok(Err(reason)) => {
                self.reject(reason, || "MQTT connection opened with a bad packet".into());
                return;
            }
        };
        let mut connect = match Packet::read(&mut frame.clone(), self.max_payload + 1024) {
            Ok(Packet::Connect(c)) => c,
            Ok(_) => {
                self.reject("malformed", || "MQTT connection did not start with CONNECT".into());
                return;
            }
            Err(mqttbytes::Error::InvalidProtocol | mqttbytes::Error::InvalidProtocolLevel(_)) => {
                self.reject("unsupported_protocol", || "MQTT CONNECT of a version other than 3.1.1".into());
                return self.refuse(&mut device, ConnectReturnCode::RefusedProtocolVersion).await;
            }
            Err(e) => {
                self.reject("malformed", || format!("bad MQTT CONNECT: {e:?}"));
                return;
            }
        };
        let who = match self.identify(&connect) {
            Ok(who) => who,
            Err(code) => return self.refuse(&mut device, code).await,
        };
        if let Some(will) = &connect.last_will
            && !who.may_publish(&will.topic)
        {
            self.reject("wrong_device", || format!("{who:?} set a last will on {:?}", will.topic));
            return self.refuse(&mut device, ConnectReturnCode::NotAuthorized).await;
        }
        // On the broker, sessions are named by identity with an `@`, which no twin id
        // and no transformer id contains, so a device can never take over the
        // transformer's session by choosing its id. (A `/` separator got the connection
        // closed by rumqttd 0.20 in our tests.)
        connect.client_id = match &who {
            Identity::Device(id) => format!("device@{id}"),
            Identity::Claimant { ty, id } => format!("provisioning@{ty}@{id}"),
        };
        connect.login = Some(Login::new(connect.client_id.clone(), self.broker.secret.to_string()));
        // The front enforces the device's keep-alive itself (below), counting only the
        // time it is willing to read: while it paces a device, the broker would
        // otherwise see silence and drop the connection. rumqttd refuses 0.
        let keep_alive = Duration::from_millis(u64::from(connect.keep_alive) * 1_500);
        connect.keep_alive = u16::MAX;
        let mut hello = BytesMut::new();
        if connect.write(&mut hello).is_err() {
            return;
        }
        let mut broker = match TcpStream::connect(self.broker.addr).await {
            Ok(b) => b,
            Err(e) => {
                tracing::error!("embedded MQTT broker unreachable: {e}");
                return self.refuse(&mut device, ConnectReturnCode::ServiceUnavailable).await;
            }
        };
        let _ = broker.set_nodelay(true);
        if broker.write_all(&hello).await.is_err() {
            return;
        }
        let (mut device_r, mut device_w) = device.into_split();
        let (mut broker_r, mut broker_w) = broker.into_split();
        let down = tokio::io::copy(&mut broker_r, &mut device_w);
        let up = async {
            let mut out = BytesMut::with_capacity(4096);
            loop {
                let mut counted = 0i64;
                loop {
                    let h = match mqttbytes::check(buf.iter(), self.max_payload + 1024) {
                        Ok(h) => h,
                        Err(mqttbytes::Error::InsufficientBytes(_)) => break,
                        Err(mqttbytes::Error::PayloadSizeLimitExceeded(n)) => {
                            self.reject("oversized", || {
                                format!("{who:?} sent an MQTT packet of {n} bytes (limit {})", self.max_payload)
                            });
                            return;
                        }
                        Err(e) => {
                            self.reject("malformed", || format!("{who:?} sent a bad MQTT packet: {e:?}"));
                            return;
                        }
                    };
                    let frame = buf.split_to(h.frame_length());
                    match h.packet_type() {
                        Ok(PacketType::Publish) => match publish_topic(&frame) {
                            Some(topic) if who.may_publish(topic) => counted += 1,
                            topic => {
                                self.reject("wrong_device", || format!("{who:?} may not publish on {topic:?}"));
                                return;
                            }
                        },
                        Ok(PacketType::Subscribe) => {
                            let allowed = match Packet::read(&mut frame.clone(), usize::MAX) {
                                Ok(Packet::Subscribe(s)) => s.filters.iter().all(|f| who.may_subscribe(&f.path)),
                                _ => false,
                            };
                            if !allowed {
                                self.reject("wrong_device", || format!("{who:?} subscribed outside its own topics"));
                                return;
                            }
                        }
                        Ok(PacketType::Connect) => {
                            self.reject("malformed", || format!("{who:?} sent a second CONNECT"));
                            return;
                        }
                        Ok(_) => {}
                        Err(_) => {
                            self.reject("malformed", || format!("{who:?} sent an unknown MQTT packet type"));
                            return;
                        }
                    }
                    out.extend_from_slice(&frame);
                }
                if !out.is_empty() {
                    if counted > 0 {
                        self.pacer.admit(counted).await;
                    }
                    if broker_w.write_all(&out).await.is_err() {
                        return;
                    }
                    out.clear();
                }
                let read = device_r.read_buf(&mut buf);
                let read = if keep_alive.is_zero() {
                    read.await
                } else {
                    match tokio::time::timeout(keep_alive, read).await {
                        Ok(r) => r,
                        Err(_) => {
                            tracing::debug!("{who:?} silent for 1.5 x its keep-alive; closing");
                            return;
                        }
                    }
                };
                match read {
                    Ok(0) | Err(_) => return,
                    Ok(_) => {}
                }
            }
        };
        tokio::select! {
            _ = down => {}
            () = up => {}
        }
    }
}

/// The topic of a PUBLISH frame, from its variable header.
fn publish_topic(frame: &[u8]) -> Option<&str> {
    // Fixed header: one byte, then the remaining length in 1 to 4 bytes of 7 bits.
    let len_bytes = frame.iter().skip(1).take(4).position(|b| b & 0x80 == 0)? + 1;
    let mut body = frame.get(1 + len_bytes..)?;
    if body.len() < 2 {
        return None;
    }
    let len = body.get_u16() as usize;
    std::str::from_utf8(body.get(..len)?).ok()
}
