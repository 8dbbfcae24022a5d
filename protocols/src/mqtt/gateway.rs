//! The embedded MQTT gateway: twinfleet itself is the MQTT endpoint of its devices. One
//! socket per device, no broker in between: each connection is a task that
//!
//! - reads the CONNECT (MQTT 3.1.1 or 5) and authenticates it against the credential
//!   store (operational listener: client id = username = twin id, password = device
//!   token; provisioning listener: client id = the new device's id, username = its
//!   device type, password = the type's claim token), then registers the session with
//!   the platform ([`twinfleet_actors::DeviceSessions`]) so that a credential change
//!   ends it;
//! - confines the connection to its own topics (a PUBLISH or SUBSCRIBE outside them is
//!   counted as `wrong_device` and closes the connection);
//! - hands each PUBLISH straight to the device's twin ([`super::ingest`]) and answers a
//!   QoS 1 PUBLISH with PUBACK only once the twin has it durably (WAL and sled synced),
//!   in the order the messages came; at most [`RECEIVE_MAX`] at once per connection,
//!   beyond which it stops reading the socket (TCP pushes back);
//! - sends the twin's commands at QoS 1 on `devices/{id}/commands`. An offline device's
//!   twin keeps its unanswered commands; on every (re)subscription the twin sends again
//!   exactly those still pending (`TwinCommand::Resend`), not a broker's backlog.
//!
//! A refused message (bad payload, a constraint of the twin) is still acknowledged on
//! MQTT 3.1.1 (it will never be taken, so it must not come back) and counted; on MQTT 5
//! its PUBACK carries the reason code. A message the twin cannot take *now* (storage
//! full, mailbox full beyond the retry budget) gets no PUBACK: the connection closes
//! (MQTT 5: DISCONNECT 0x89 "server busy") and the device sends it again later.

use super::ingest::{Ingest, Refused};
use super::topics::{self, Channel, Identity, Parsed};
use super::wire::{self, BadHello, Hello, Incoming, Refusal, Version};
use bytes::BytesMut;
use dashmap::DashMap;
use futures::stream::FuturesOrdered;
use futures::{FutureExt, StreamExt};
use rumqttc::mqttbytes;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering::Relaxed};
use std::time::Duration;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::{mpsc, watch};
use twinfleet_actors::{DeviceCommand, DeviceLink, TwinHandle, TwinRuntime};
use twinfleet_models::{CommandId, Metadata, TwinCommand, TwinId};

/// How long a new connection may take to send its whole CONNECT.
const CONNECT_TIMEOUT: Duration = Duration::from_secs(10);
/// QoS 1 messages of one connection handled at once (MQTT 5's "receive maximum").
pub const RECEIVE_MAX: u16 = 32;
/// Commands queued for one connection before `deliver` says the device is busy.
const COMMAND_QUEUE: usize = 64;

/// Which listener a connection came in on.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ListenerKind {
    Operational,
    Provisioning,
}

/// A command on its way to a connected device.
#[derive(Debug)]
struct Outgoing {
    payload: Vec<u8>,
}

/// A connected operational device, as the twins' link sees it.
#[derive(Debug)]
struct Conn {
    id: u64,
    out: mpsc::Sender<Outgoing>,
    subscribed: AtomicBool,
    /// Set to end this connection (another one took the client id over).
    kick: watch::Sender<bool>,
}

/// The embedded gateway's shared state.
#[derive(Debug)]
pub(crate) struct Gateway {
    ingest: Ingest,
    max_payload: usize,
    max_connections: usize,
    /// Connected operational devices by id.
    conns: DashMap<String, Arc<Conn>>,
    /// Persistent sessions (3.1.1 `clean_session = false`, 5: an expiry interval): the
    /// subscription outlives the connection, so a reconnect answers `session_present`.
    /// Kept in memory: after a restart the device subscribes again.
    kept: DashMap<String, bool>,
    next: AtomicU64,
}

pub(crate) fn command_payload(id: CommandId, cmd: DeviceCommand) -> Vec<u8> {
    let id = id.to_string();
    let body = match cmd {
        DeviceCommand::ApplyDesired { desired, .. } => {
            serde_json::json!({ "command_id": id, "apply_desired": desired })
        }
        DeviceCommand::SetConfiguration { configuration } => {
            serde_json::json!({ "command_id": id, "set_configuration": configuration })
        }
        DeviceCommand::InstallApp { app, version, artifact_url } => serde_json::json!({
            "command_id": id,
            "install_app": { "app": app, "version": version, "artifact_url": artifact_url },
        }),
        DeviceCommand::UninstallApp { app } => serde_json::json!({
            "command_id": id,
            "uninstall_app": { "app": app },
        }),
    };
    body.to_string().into_bytes()
}

/// The twins' link to devices on the embedded gateway.
#[derive(Debug)]
pub struct EmbeddedLinks(Arc<Gateway>);

impl DeviceLink for EmbeddedLinks {
    fn deliver(&self, twin: &TwinId, _: &Metadata, id: CommandId, cmd: DeviceCommand) -> Result<(), String> {
        // An offline (or not yet subscribed) device's command is held by its twin, as
        // pending, and sent when the device subscribes: accepted, like a broker would.
        let Some(conn) = self.0.conns.get(twin.as_str()).map(|c| c.clone()) else { return Ok(()) };
        if !conn.subscribed.load(Relaxed) {
            return Ok(());
        }
        conn.out
            .try_send(Outgoing { payload: command_payload(id, cmd) })
            .map_err(|_| format!("device {twin} has {COMMAND_QUEUE} commands queued already"))
    }
}

/// How a session ended, for the log and the will.
#[derive(Debug, PartialEq, Eq)]
enum End {
    /// A clean DISCONNECT (no will).
    Clean,
    /// Anything else: the will, if any, goes to the twin.
    Lost(&'static str),
}

impl Gateway {
    pub fn new(rt: TwinRuntime, operational: String, max_payload: usize, max_connections: usize) -> Arc<Self> {
        Arc::new(Gateway {
            ingest: Ingest { rt, operational, require_proof: false },
            max_payload,
            max_connections,
            conns: DashMap::new(),
            kept: DashMap::new(),
            next: AtomicU64::new(1),
        })
    }

    pub fn links(self: &Arc<Self>) -> EmbeddedLinks {
        EmbeddedLinks(self.clone())
    }

    fn rt(&self) -> &TwinRuntime {
        &self.ingest.rt
    }

    fn reject(&self, reason: &'static str, detail: impl FnOnce() -> String) {
        self.rt().rejections().reject(reason, detail);
    }

    /// The largest packet taken (a message plus its topic and headers).
    fn max_packet(&self) -> usize {
        self.max_payload + 1024
    }

    /// Accepts devices until `closing` turns true; then closes every connection.
    pub async fn run(self: Arc<Self>, listener: TcpListener, kind: ListenerKind, closing: watch::Receiver<bool>) {
        let open = Arc::new(AtomicU64::new(0));
        loop {
            let mut c = closing.clone();
            let accepted = tokio::select! {
                a = listener.accept() => a,
                _ = c.wait_for(|v| *v) => return,
            };
            match accepted {
                Ok((stream, _)) => {
                    if open.load(Relaxed) as usize >= self.max_connections {
                        self.reject("too_many_connections", || {
                            format!("MQTT listener at its limit of {} connections", self.max_connections)
                        });
                        drop(stream);
                        continue;
                    }
                    let gw = self.clone();
                    let (mut c, open) = (closing.clone(), open.clone());
                    open.fetch_add(1, Relaxed);
                    tokio::spawn(async move {
                        gw.serve(stream, kind, &mut c).await;
                        open.fetch_sub(1, Relaxed);
                    });
                }
                Err(e) => {
                    tracing::warn!("MQTT accept failed: {e}");
                    tokio::time::sleep(Duration::from_millis(50)).await;
                }
            }
        }
    }

    /// Reads one whole packet from `sock` into a frame (`buf` may already hold some).
    async fn read_frame(&self, sock: &mut TcpStream, buf: &mut BytesMut) -> Result<BytesMut, &'static str> {
        loop {
            match mqttbytes::check(buf.iter(), self.max_packet()) {
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

    /// Who is this? (`Err`: the CONNACK's refusal.)
    fn identify(&self, kind: ListenerKind, hello: &Hello) -> Result<(Identity, Option<TwinHandle>), Refusal> {
        let Some((username, password)) = &hello.login else {
            self.reject("bad_credentials", || format!("MQTT client {:?} sent no username/password", hello.client_id));
            return Err(Refusal::BadCredentials);
        };
        let auth = |e: twinfleet_actors::AuthError| match e {
            twinfleet_actors::AuthError::Storage(_) => Refusal::Unavailable,
            _ => Refusal::NotAuthorized,
        };
        match kind {
            ListenerKind::Operational => {
                if hello.client_id != *username {
                    self.reject("bad_credentials", || {
                        format!("MQTT client id {:?} is not its username {username:?}", hello.client_id)
                    });
                    return Err(Refusal::BadClientId);
                }
                let twin = self.rt().authenticate_device(username, password).map_err(auth)?;
                Ok((Identity::Device(username.clone()), Some(twin)))
            }
            ListenerKind::Provisioning => {
                // (The username is the claim credential: `<type>`, or `<type>/<batch>`.)
                let cred = self.rt().authenticate_claim(username, password).map_err(auth)?;
                if twinfleet_models::TwinId::new(&hello.client_id).is_err() {
                    self.reject("malformed", || format!("{:?} is not a valid device id", hello.client_id));
                    return Err(Refusal::BadClientId);
                }
                let ty = cred.ty.id().to_string();
                Ok((Identity::Claimant { ty, id: hello.client_id.clone(), batch: cred.batch }, None))
            }
        }
    }

    async fn serve(self: &Arc<Self>, mut sock: TcpStream, kind: ListenerKind, closing: &mut watch::Receiver<bool>) {
        let _ = sock.set_nodelay(true);
        let source = sock.peer_addr().ok().map(|a| a.ip());
        let mut buf = BytesMut::with_capacity(512);
        let frame = match tokio::time::timeout(CONNECT_TIMEOUT, self.read_frame(&mut sock, &mut buf)).await {
            Ok(Ok(f)) => f,
            Ok(Err("closed")) => return,
            Err(_) => return self.reject("connect_timeout", || "MQTT connection sent no whole CONNECT in 10 s".into()),
            Ok(Err(reason)) => {
                return self.reject(reason, || "MQTT connection opened with a bad or oversized packet".into());
            }
        };
        let hello = match wire::read_connect(&frame, self.max_packet()) {
            Ok(h) => h,
            Err(BadHello::Unsupported(level)) => {
                self.reject("unsupported_protocol", || format!("MQTT CONNECT of protocol level {level}"));
                let mut out = BytesMut::new();
                // Return code 0x01: unacceptable protocol version (3.1.1 §3.2.2.3).
                out.extend_from_slice(&[0x20, 0x02, 0x00, 0x01]);
                let _ = sock.write_all(&out).await;
                return;
            }
            Err(BadHello::ReservedFlag) => {
                return self.reject("malformed", || "MQTT CONNECT with the reserved flag set".into());
            }
            Err(BadHello::Malformed(why)) => return self.reject("malformed", || format!("bad MQTT CONNECT: {why}")),
        };
        let version = hello.version;
        // Registered with the platform *before* the credentials are checked, under the
        // identity the CONNECT claims (a claimant's under its type's claim token, not the
        // device it is about to become): a revocation that lands after the check ends
        // this session; one that lands before fails the check.
        let claimed = match kind {
            ListenerKind::Operational => hello.client_id.clone(),
            ListenerKind::Provisioning => {
                twinfleet_actors::sessions::claim_holder(hello.login.as_ref().map_or("", |(u, _)| u.as_str()))
            }
        };
        let session = self.rt().sessions().open(&claimed);
        let (who, twin) = match self.identify(kind, &hello) {
            Ok(x) => x,
            Err(code) => return refuse(&mut sock, version, code).await,
        };
        let device = claimed;
        if let Some((topic, _)) = &hello.will
            && !who.may_publish(topic)
        {
            self.reject("wrong_device", || format!("{who:?} set a last will on {topic:?}"));
            return refuse(&mut sock, version, Refusal::NotAuthorized).await;
        }
        let (out_tx, out_rx) = mpsc::channel(COMMAND_QUEUE);
        let (kick, kicked) = watch::channel(false);
        let conn = Arc::new(Conn { id: self.next.fetch_add(1, Relaxed), out: out_tx, subscribed: false.into(), kick });
        let persistent = hello.session_expiry > 0;
        let mut session_present = false;
        if let Identity::Device(id) = &who {
            // One connection per client id: a new one takes over (MQTT 3.1.1 §3.1.4).
            if let Some(old) = self.conns.insert(id.clone(), conn.clone()) {
                old.kick.send_replace(true);
            }
            // A clean start discards what was kept; a persistent session keeps (or
            // starts keeping) the subscription.
            if hello.clean || !persistent {
                self.kept.remove(id);
            }
            if persistent {
                session_present = self.kept.get(id).is_some_and(|s| *s);
                conn.subscribed.store(session_present, Relaxed);
                self.kept.entry(id.clone()).or_insert(false);
            }
        }
        let mut hello_out = BytesMut::new();
        wire::connack(version, Ok(session_present), RECEIVE_MAX, &mut hello_out);
        let (rd, mut wr) = sock.into_split();
        if wr.write_all(&hello_out).await.is_err() {
            self.forget(&who, &conn);
            return;
        }
        if session_present && let Some(t) = &twin {
            resend(t.clone());
        }
        let mut s = Served {
            gw: self.clone(),
            who: &who,
            twin: twin.as_ref(),
            conn: &conn,
            version,
            persistent,
            source,
            out: BytesMut::with_capacity(64),
            next_pkid: 0,
            inflight: 0,
        };
        let keep_alive = Duration::from_millis(u64::from(hello.keep_alive) * 1_500);
        let end = s.run(rd, &mut wr, buf, keep_alive, out_rx, kicked, &session, closing).await;
        let _ = wr.shutdown().await;
        self.forget(&who, &conn);
        tracing::debug!(device, ?end, "MQTT session ended");
        if let (End::Lost(_), Some((topic, payload)), Some(twin)) = (&end, hello.will, twin.as_ref())
            && !session.is_closed()
            && let Some(Parsed::Device { channel, .. }) = topics::parse(&topic)
            && let Err(r) = self.ingest.device(twin, channel, &payload).await
        {
            self.reject(r.reason, || format!("MQTT will of {device} on {topic}: {}", r.detail));
        }
    }

    /// Unregisters a connection that ended (unless another one took its place).
    fn forget(&self, who: &Identity, conn: &Arc<Conn>) {
        if let Identity::Device(id) = who {
            self.conns.remove_if(id, |_, c| c.id == conn.id);
        }
    }
}

/// Resolves once the flag is (or was) raised.
async fn raised(flag: &mut watch::Receiver<bool>) {
    let _ = flag.wait_for(|v| *v).await;
}

async fn refuse(sock: &mut TcpStream, version: Version, code: Refusal) {
    let mut out = BytesMut::new();
    wire::connack(version, Err(code), RECEIVE_MAX, &mut out);
    let _ = sock.write_all(&out).await;
}

/// Asks a twin to send again what its device has not answered (after a subscription).
fn resend(twin: TwinHandle) {
    tokio::spawn(async move {
        if let Err(e) = twin.command(TwinCommand::Resend).await {
            tracing::debug!(twin = %twin.id(), "pending commands not sent again: {e}");
        }
    });
}

/// The least and most a connection reads at once.
const MIN_READ: usize = 512;
const MAX_READ: usize = 16 << 10;

/// How much to read next time, after a read of `n` bytes into `room`. A read that fills
/// its room means more is waiting in the socket: twice as much next time (a device that
/// pipelines its messages was read in slivers of what a 512-byte buffer had left, about
/// two `recv` calls per message, the second often finding nothing). A read that uses
/// little of it halves it again, so a quiet device keeps a small buffer.
fn next_read_size(size: usize, n: usize, room: usize) -> usize {
    if n >= room {
        (size * 2).min(MAX_READ)
    } else if n * 4 < size {
        (size / 2).max(MIN_READ)
    } else {
        size
    }
}

/// One connection after its CONNACK.
struct Served<'a> {
    gw: Arc<Gateway>,
    who: &'a Identity,
    twin: Option<&'a TwinHandle>,
    conn: &'a Arc<Conn>,
    version: Version,
    persistent: bool,
    /// The device's address (claims are rate-limited per source).
    source: Option<std::net::IpAddr>,
    out: BytesMut,
    next_pkid: u16,
    /// Commands sent and not yet PUBACKed by the device.
    inflight: usize,
}

/// What a handled message leaves to do, in arrival order.
type Handled = std::pin::Pin<Box<dyn Future<Output = (u8, u16, Result<(), Refused>, Option<Vec<u8>>)> + Send>>;

impl Served<'_> {
    #[allow(clippy::too_many_arguments)]
    async fn run(
        &mut self,
        mut rd: tokio::net::tcp::OwnedReadHalf,
        wr: &mut tokio::net::tcp::OwnedWriteHalf,
        mut buf: BytesMut,
        keep_alive: Duration,
        mut commands: mpsc::Receiver<Outgoing>,
        mut kicked: watch::Receiver<bool>,
        session: &twinfleet_actors::Session,
        closing: &mut watch::Receiver<bool>,
    ) -> End {
        let mut pipeline: FuturesOrdered<Handled> = FuturesOrdered::new();
        let mut last_read = tokio::time::Instant::now();
        // One timer for the connection's life, moved on when it fires early (not a timer
        // made and dropped at every turn of the loop: that was a timer-wheel insert, a
        // removal and a clock read per message).
        let idle = tokio::time::sleep_until(last_read + keep_alive);
        tokio::pin!(idle);
        let mut read_size = MIN_READ;
        loop {
            // Whole frames already read are handled first.
            while pipeline.len() < RECEIVE_MAX as usize {
                let h = match mqttbytes::check(buf.iter(), self.gw.max_packet()) {
                    Ok(h) => h,
                    Err(mqttbytes::Error::InsufficientBytes(_)) => break,
                    Err(mqttbytes::Error::PayloadSizeLimitExceeded(n)) => {
                        self.gw.reject("oversized", || {
                            format!("{:?} sent an MQTT packet of {n} bytes (limit {})", self.who, self.gw.max_payload)
                        });
                        return self.close(wr, wire::DISCONNECT_TOO_LARGE, "oversized").await;
                    }
                    Err(e) => {
                        self.gw.reject("malformed", || format!("{:?} sent a bad MQTT packet: {e:?}", self.who));
                        return self.close(wr, wire::DISCONNECT_MALFORMED, "malformed").await;
                    }
                };
                let frame = buf.split_to(h.frame_length());
                let packet = match wire::read(self.version, frame, self.gw.max_packet()) {
                    Ok(p) => p,
                    Err(e) => {
                        self.gw.reject("malformed", || format!("{:?} sent a bad MQTT packet: {e}", self.who));
                        return self.close(wr, wire::DISCONNECT_MALFORMED, "malformed").await;
                    }
                };
                if let Some(end) = self.packet(packet, &mut pipeline, wr).await {
                    return end;
                }
            }
            if !self.out.is_empty() {
                if wr.write_all(&self.out).await.is_err() {
                    return End::Lost("write failed");
                }
                self.out.clear();
            }
            let reading = pipeline.len() < RECEIVE_MAX as usize;
            // Room to read into, as much as the last reads suggest (`next_read_size`).
            if reading && buf.capacity() - buf.len() < read_size / 2 {
                buf.reserve(read_size);
            }
            let room = buf.capacity() - buf.len();
            tokio::select! {
                biased;
                reason = session.closed() => {
                    tracing::info!(who = ?self.who, reason, "closing the MQTT session");
                    return self.close(wr, wire::DISCONNECT_NOT_AUTHORIZED, reason).await;
                }
                () = raised(&mut kicked) => {
                    return self.close(wr, wire::DISCONNECT_TAKEN_OVER, "taken over by a new connection").await;
                }
                () = raised(closing) => {
                    return self.close(wr, wire::DISCONNECT_SHUTTING_DOWN, "gateway stopping").await;
                }
                Some((qos, pkid, result, reply)) = pipeline.next(), if !pipeline.is_empty() => {
                    // Keep-alive counts only the time this side was willing to read: a
                    // device waiting on its twin is not silent.
                    last_read = tokio::time::Instant::now();
                    if let Err(end) = self.handled(qos, pkid, result, reply) {
                        return self.close(wr, wire::DISCONNECT_SERVER_BUSY, end).await;
                    }
                    // A group commit answers many messages at once: acknowledge all that
                    // are done in one write.
                    while let Some(Some((qos, pkid, result, reply))) = pipeline.next().now_or_never() {
                        if let Err(end) = self.handled(qos, pkid, result, reply) {
                            return self.close(wr, wire::DISCONNECT_SERVER_BUSY, end).await;
                        }
                    }
                }
                Some(cmd) = commands.recv(), if self.inflight < RECEIVE_MAX as usize => {
                    self.send_command(cmd);
                }
                read = rd.read_buf(&mut buf), if reading => match read {
                    Ok(0) | Err(_) => return End::Lost("connection lost"),
                    Ok(n) => {
                        last_read = tokio::time::Instant::now();
                        read_size = next_read_size(read_size, n, room);
                    }
                },
                () = &mut idle, if !keep_alive.is_zero() && reading => {
                    let deadline = last_read + keep_alive;
                    if tokio::time::Instant::now() < deadline {
                        idle.as_mut().reset(deadline);
                        continue;
                    }
                    tracing::debug!(who = ?self.who, "silent for 1.5 x its keep-alive; closing");
                    return self.close(wr, wire::DISCONNECT_KEEP_ALIVE, "keep-alive expired").await;
                }
            }
        }
    }

    /// Ends the connection (MQTT 5: with a DISCONNECT saying why).
    async fn close(&mut self, wr: &mut tokio::net::tcp::OwnedWriteHalf, reason: u8, why: &'static str) -> End {
        wire::disconnect(self.version, reason, &mut self.out);
        let _ = wr.write_all(&self.out).await;
        End::Lost(why)
    }

    fn send_command(&mut self, cmd: Outgoing) {
        self.next_pkid = self.next_pkid.checked_add(1).unwrap_or(1).max(1);
        let topic = match self.who {
            Identity::Device(id) => topics::device_topic(id, topics::COMMANDS),
            Identity::Claimant { .. } => return,
        };
        wire::publish(self.version, &topic, self.next_pkid, &cmd.payload, &mut self.out);
        self.inflight += 1;
    }

    /// A message the twin has handled: acknowledge it (in order). `Err`: it could not
    /// be taken now; the connection closes without acknowledging it.
    fn handled(
        &mut self,
        qos: u8,
        pkid: u16,
        result: Result<(), Refused>,
        reply: Option<Vec<u8>>,
    ) -> Result<(), &'static str> {
        let reason = match result {
            Ok(()) => 0,
            Err(r) if r.retry => {
                self.gw.reject(r.reason, || format!("MQTT message of {:?} not taken now: {}", self.who, r.detail));
                return Err("the twin cannot take messages now");
            }
            Err(r) => {
                let code = match r.reason {
                    "malformed" | "wrong_type" | "future_timestamp" | "too_old" => wire::PUBACK_PAYLOAD_INVALID,
                    "archived" | "unknown_device" | "wrong_device" => wire::PUBACK_NOT_AUTHORIZED,
                    _ => wire::PUBACK_UNSPECIFIED,
                };
                self.gw.reject(r.reason, || format!("MQTT message of {:?}: {}", self.who, r.detail));
                code
            }
        };
        if let (Some(body), Identity::Claimant { ty, id, .. }) = (reply, self.who)
            && self.conn.subscribed.load(Relaxed)
        {
            self.next_pkid = self.next_pkid.checked_add(1).unwrap_or(1).max(1);
            wire::publish(self.version, &topics::provisioning_response(ty, id), self.next_pkid, &body, &mut self.out);
        }
        if qos == 1 {
            wire::puback(self.version, pkid, reason, &mut self.out);
        }
        Ok(())
    }

    /// One packet from the client; `Some` ends the connection.
    async fn packet(
        &mut self,
        p: Incoming,
        pipeline: &mut FuturesOrdered<Handled>,
        wr: &mut tokio::net::tcp::OwnedWriteHalf,
    ) -> Option<End> {
        match p {
            Incoming::Publish { topic, qos, pkid, retain, payload, alias } => {
                if alias {
                    self.gw.reject("malformed", || format!("{:?} used a topic alias (none allowed)", self.who));
                    return Some(self.close(wr, wire::DISCONNECT_PROTOCOL_ERROR, "topic alias").await);
                }
                if qos > 1 {
                    self.gw.reject("unsupported_qos", || format!("{:?} published at QoS 2", self.who));
                    return Some(self.close(wr, wire::DISCONNECT_QOS_NOT_SUPPORTED, "QoS 2").await);
                }
                if retain && self.version == Version::V5 {
                    // MQTT 5 clients were told (CONNACK) that nothing is retained here.
                    self.gw.reject("retained", || format!("{:?} published a retained message", self.who));
                    return Some(self.close(wr, wire::DISCONNECT_RETAIN_NOT_SUPPORTED, "retain").await);
                }
                // (3.1.1: the retain flag is ignored; nothing is ever stored as retained.)
                if !self.who.may_publish(&topic) {
                    self.gw.reject("wrong_device", || format!("{:?} may not publish on {topic:?}", self.who));
                    return Some(self.close(wr, wire::DISCONNECT_NOT_AUTHORIZED, "wrong topic").await);
                }
                let (gw, twin, source) = (self.gw.clone(), self.twin.cloned(), self.source);
                let batch = match self.who {
                    Identity::Claimant { batch, .. } => batch.clone(),
                    Identity::Device(_) => None,
                };
                // Each kind of message gets a future of its own size: the telemetry path
                // (most messages) does not carry the provisioning path's state.
                let fut: Handled = match (topics::parse(&topic), twin) {
                    (Some(Parsed::Device { channel: Channel::Telemetry, .. }), Some(twin)) => {
                        Box::pin(async move { (qos, pkid, gw.ingest.telemetry(&twin, &payload).await, None) })
                    }
                    (Some(Parsed::Device { channel, .. }), Some(twin)) => {
                        Box::pin(async move { (qos, pkid, gw.ingest.device(&twin, channel, &payload).await, None) })
                    }
                    (Some(Parsed::Provisioning { .. }), _) => Box::pin(async move {
                        let Some(Parsed::Provisioning { ty, id }) = topics::parse(&topic) else { unreachable!() };
                        let (body, result) = gw.ingest.provision(ty, id, batch.as_deref(), &payload, source).await;
                        (qos, pkid, result, Some(body.to_string().into_bytes()))
                    }),
                    _ => {
                        let refused = Refused::new("unknown_topic", format!("nothing on {topic:?}"));
                        Box::pin(std::future::ready((qos, pkid, Err(refused), None)))
                    }
                };
                pipeline.push_back(fut);
            }
            Incoming::PubAck => self.inflight = self.inflight.saturating_sub(1),
            Incoming::Subscribe { pkid, filters } => {
                if !filters.iter().all(|(f, _)| self.who.may_subscribe(f)) {
                    self.gw.reject("wrong_device", || format!("{:?} subscribed outside its own topics", self.who));
                    return Some(self.close(wr, wire::DISCONNECT_NOT_AUTHORIZED, "wrong subscription").await);
                }
                let granted: Vec<Option<u8>> = filters.iter().map(|(_, q)| Some((*q).min(1))).collect();
                wire::suback(self.version, pkid, &granted, &mut self.out);
                self.conn.subscribed.store(true, Relaxed);
                if let Identity::Device(id) = self.who {
                    if self.persistent {
                        self.gw.kept.insert(id.clone(), true);
                    }
                    // The SUBACK goes out first; then what the twin still waits for.
                    if let Some(t) = self.twin {
                        resend(t.clone());
                    }
                }
            }
            Incoming::Unsubscribe { pkid, filters } => {
                self.conn.subscribed.store(false, Relaxed);
                if let Identity::Device(id) = self.who
                    && self.persistent
                {
                    self.gw.kept.insert(id.clone(), false);
                }
                wire::unsuback(self.version, pkid, filters, &mut self.out);
            }
            Incoming::PingReq => wire::pingresp(&mut self.out),
            Incoming::Disconnect { will } => {
                // What was read before the DISCONNECT is still handled and acknowledged.
                while let Some((qos, pkid, result, reply)) = pipeline.next().await {
                    if self.handled(qos, pkid, result, reply).is_err() {
                        break;
                    }
                }
                let _ = wr.write_all(&self.out).await;
                self.out.clear();
                return Some(if will { End::Lost("disconnect with will") } else { End::Clean });
            }
            Incoming::Unexpected(what) => {
                self.gw.reject("malformed", || format!("{:?} sent {what}", self.who));
                return Some(self.close(wr, wire::DISCONNECT_PROTOCOL_ERROR, "unexpected packet").await);
            }
        }
        None
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_read_size_grows_while_reads_fill_it_and_shrinks_while_they_do_not() {
        // A full read doubles, up to the most.
        assert_eq!(next_read_size(MIN_READ, 300, 300), 2 * MIN_READ);
        assert_eq!(next_read_size(MAX_READ, 9_000, 9_000), MAX_READ);
        // A read using under a quarter halves, down to the least.
        assert_eq!(next_read_size(8_192, 1_000, 8_192), 4_096);
        assert_eq!(next_read_size(MIN_READ, 10, 512), MIN_READ);
        // In between it stays.
        assert_eq!(next_read_size(4_096, 3_000, 4_096), 4_096);
    }
}
