//! The device side of MQTT (rumqttc): what tests, benchmarks and the simulator use to
//! play a device.

use super::topics;
use rumqttc::{AsyncClient, Event, MqttOptions, Packet, QoS};
use serde_json::{Map, Value, json};
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering::Relaxed};
use std::time::Duration;
use tokio::sync::{mpsc, oneshot};

/// A command received on `devices/{id}/commands`.
#[derive(Debug, Clone, PartialEq)]
pub struct MqttDeviceCommand {
    pub command_id: String,
    /// `apply_desired`, `set_configuration` or `install_app` with its body.
    pub body: Map<String, Value>,
}

/// A connected device.
#[derive(Debug)]
pub struct MqttDevice {
    id: String,
    client: AsyncClient,
    commands: mpsc::Receiver<MqttDeviceCommand>,
    task: tokio::task::JoinHandle<()>,
    acked: Arc<AtomicU64>,
    written: Arc<AtomicU64>,
}

/// Why a device could not connect or publish.
#[derive(Debug, thiserror::Error)]
pub enum MqttDeviceError {
    #[error("connection refused: {0}")]
    Refused(String),
    #[error("MQTT: {0}")]
    Client(String),
    #[error("timed out")]
    Timeout,
}

fn options(client_id: &str, addr: &str, user: &str, pass: &str, clean: bool) -> Result<MqttOptions, MqttDeviceError> {
    let (host, port) = addr
        .trim_start_matches("mqtt://")
        .rsplit_once(':')
        .ok_or_else(|| MqttDeviceError::Client(format!("{addr:?} is not host:port")))?;
    let port = port.parse().map_err(|_| MqttDeviceError::Client(format!("bad port in {addr:?}")))?;
    let mut o = MqttOptions::new(client_id, host, port);
    o.set_credentials(user, pass);
    o.set_keep_alive(Duration::from_secs(30));
    o.set_clean_session(clean);
    o.set_max_packet_size(1 << 20, 1 << 20);
    Ok(o)
}

impl MqttDevice {
    /// Connects as device `id` with its token and subscribes to its commands. Waits for
    /// the CONNACK and the SUBACK, so a refused login is an error here.
    pub async fn connect(addr: &str, id: &str, token: &str) -> Result<MqttDevice, MqttDeviceError> {
        Self::connect_with(addr, id, id, token, 64).await
    }

    /// Like `connect`, with a client id and username of one's choosing (to test that the
    /// gateway refuses mismatches) and a request queue of `capacity`.
    pub async fn connect_with(
        addr: &str,
        client_id: &str,
        username: &str,
        token: &str,
        capacity: usize,
    ) -> Result<MqttDevice, MqttDeviceError> {
        let (client, mut events) = AsyncClient::new(options(client_id, addr, username, token, true)?, capacity);
        let (cmd_tx, commands) = mpsc::channel(64);
        let (ready_tx, ready) = oneshot::channel::<Result<(), MqttDeviceError>>();
        let sub = client.clone();
        let filter = topics::device_topic(client_id, topics::COMMANDS);
        let acked = Arc::new(AtomicU64::new(0));
        let acks = acked.clone();
        let written = Arc::new(AtomicU64::new(0));
        let writes = written.clone();
        let task = tokio::spawn(async move {
            let mut ready_tx = Some(ready_tx);
            loop {
                match events.poll().await {
                    Ok(Event::Incoming(Packet::ConnAck(_))) => {
                        let _ = sub.try_subscribe(filter.clone(), QoS::AtLeastOnce);
                    }
                    Ok(Event::Incoming(Packet::PubAck(_))) => {
                        acks.fetch_add(1, Relaxed);
                    }
                    Ok(Event::Outgoing(rumqttc::Outgoing::Publish(_))) => {
                        writes.fetch_add(1, Relaxed);
                    }
                    Ok(Event::Incoming(Packet::SubAck(_))) => {
                        if let Some(r) = ready_tx.take() {
                            let _ = r.send(Ok(()));
                        }
                    }
                    Ok(Event::Incoming(Packet::Publish(p))) => {
                        let Ok(Value::Object(mut m)) = serde_json::from_slice::<Value>(&p.payload) else { continue };
                        let command_id = m.remove("command_id").and_then(|v| v.as_str().map(String::from));
                        if let Some(command_id) = command_id
                            && cmd_tx.send(MqttDeviceCommand { command_id, body: m }).await.is_err()
                        {
                            return;
                        }
                    }
                    Ok(_) => {}
                    // No reconnecting: a device that lost its connection connects anew.
                    Err(e) => {
                        if let Some(r) = ready_tx.take() {
                            let _ = r.send(Err(MqttDeviceError::Refused(e.to_string())));
                        }
                        return;
                    }
                }
            }
        });
        match tokio::time::timeout(Duration::from_secs(10), ready).await {
            Ok(Ok(Ok(()))) => Ok(MqttDevice { id: client_id.to_string(), client, commands, task, acked, written }),
            Ok(Ok(Err(e))) => Err(e),
            Ok(Err(_)) => Err(MqttDeviceError::Client("connection task ended".into())),
            Err(_) => {
                task.abort();
                Err(MqttDeviceError::Timeout)
            }
        }
    }

    pub fn id(&self) -> &str {
        &self.id
    }

    /// Publishes written to the connection so far (QoS 0: all the device can know).
    pub fn written(&self) -> u64 {
        self.written.load(Relaxed)
    }

    /// QoS 1 publishes the gateway has acknowledged so far.
    pub fn acked(&self) -> u64 {
        self.acked.load(Relaxed)
    }

    /// Publishes raw bytes on any topic (tests use it for bad input).
    pub async fn publish_raw(&self, topic: &str, qos: QoS, payload: Vec<u8>) -> Result<(), MqttDeviceError> {
        self.client.publish(topic, qos, false, payload).await.map_err(|e| MqttDeviceError::Client(e.to_string()))
    }

    /// Subscribes to any filter (tests use it to try other devices' topics).
    pub async fn subscribe_raw(&self, filter: &str) -> Result<(), MqttDeviceError> {
        self.client.subscribe(filter, QoS::AtLeastOnce).await.map_err(|e| MqttDeviceError::Client(e.to_string()))
    }

    async fn publish(&self, channel: topics::Channel, qos: QoS, body: Value) -> Result<(), MqttDeviceError> {
        let topic = topics::device_topic(&self.id, channel.name());
        self.publish_raw(&topic, qos, body.to_string().into_bytes()).await
    }

    /// `values` at time `ts_ms` (or the time of arrival).
    pub async fn telemetry(&self, qos: QoS, ts_ms: Option<i64>, values: &[(&str, f64)]) -> Result<(), MqttDeviceError> {
        let values: Map<String, Value> = values.iter().map(|(k, v)| (k.to_string(), json!(v))).collect();
        let mut body = json!({ "values": values });
        if let Some(ts) = ts_ms {
            body["ts"] = json!(ts);
        }
        self.publish(topics::Channel::Telemetry, qos, body).await
    }

    pub async fn report(&self, patch: Value) -> Result<(), MqttDeviceError> {
        self.publish(topics::Channel::State, QoS::AtLeastOnce, patch).await
    }

    pub async fn ack(&self, command_id: &str, success: bool, message: &str) -> Result<(), MqttDeviceError> {
        let body = json!({ "command_id": command_id, "success": success, "message": message });
        self.publish(topics::Channel::Acks, QoS::AtLeastOnce, body).await
    }

    /// The next command from the twin.
    pub async fn next_command(&mut self, wait: Duration) -> Option<MqttDeviceCommand> {
        tokio::time::timeout(wait, self.commands.recv()).await.ok().flatten()
    }

    /// Whether the connection is still up (the gateway closes it on a violation).
    pub fn is_connected(&self) -> bool {
        !self.task.is_finished()
    }

    pub async fn disconnect(self) {
        let _ = self.client.disconnect().await;
        // The event loop ends once the DISCONNECT is out (the broker then closes).
        let mut task = self.task;
        if tokio::time::timeout(Duration::from_secs(2), &mut task).await.is_err() {
            task.abort();
        }
    }

    /// Provisions device `id` of type `ty` through the provisioning gateway at `addr`,
    /// presenting the type's claim token; returns the answer (with the device token).
    pub async fn provision(
        addr: &str,
        ty: &str,
        id: &str,
        claim_token: &str,
        metadata: Value,
    ) -> Result<ProvisionResponse, MqttDeviceError> {
        Self::claim(addr, ty, id, claim_token, json!({ "claim_token": claim_token, "metadata": metadata })).await
    }

    /// Like [`MqttDevice::provision`], with the device's identity (serial, MAC, model,
    /// firmware, os, arch, peripherals, region).
    pub async fn provision_as(
        addr: &str,
        ty: &str,
        id: &str,
        claim_token: &str,
        identity: Value,
    ) -> Result<ProvisionResponse, MqttDeviceError> {
        Self::claim(addr, ty, id, claim_token, json!({ "claim_token": claim_token, "identity": identity })).await
    }

    /// Like [`MqttDevice::provision_as`], with the claim token of pre-registered batch
    /// `batch` of type `ty` (username `<type>/<batch>`).
    pub async fn provision_in_batch(
        addr: &str,
        ty: &str,
        batch: &str,
        id: &str,
        claim_token: &str,
        identity: Value,
    ) -> Result<ProvisionResponse, MqttDeviceError> {
        let request = json!({ "claim_token": claim_token, "batch": batch, "identity": identity });
        Self::claim_as(addr, ty, &format!("{ty}/{batch}"), id, claim_token, request).await
    }

    /// Like [`MqttDevice::provision_as`], with `proof`: a secret of at least 16 bytes the
    /// device keeps (across its own restarts) until it is operational. Its process is
    /// bound to it, and the answer's token comes sealed with it (unsealed here), so no
    /// other claimant can use it. Required through an external broker.
    pub async fn provision_with_proof(
        addr: &str,
        ty: &str,
        id: &str,
        claim_token: &str,
        identity: Value,
        proof: &str,
    ) -> Result<ProvisionResponse, MqttDeviceError> {
        let request = json!({ "claim_token": claim_token, "identity": identity, "proof": proof });
        Self::claim(addr, ty, id, claim_token, request).await
    }

    async fn claim(
        addr: &str,
        ty: &str,
        id: &str,
        claim_token: &str,
        request: Value,
    ) -> Result<ProvisionResponse, MqttDeviceError> {
        Self::claim_as(addr, ty, ty, id, claim_token, request).await
    }

    async fn claim_as(
        addr: &str,
        ty: &str,
        username: &str,
        id: &str,
        claim_token: &str,
        request: Value,
    ) -> Result<ProvisionResponse, MqttDeviceError> {
        let (client, mut events) = AsyncClient::new(options(id, addr, username, claim_token, true)?, 16);
        let proof = request.get("proof").and_then(Value::as_str).map(str::to_string);
        let request = request.to_string();
        let (req_topic, resp_topic) = (topics::provisioning_request(ty, id), topics::provisioning_response(ty, id));
        let run = async {
            loop {
                match events.poll().await {
                    Ok(Event::Incoming(Packet::ConnAck(_))) => {
                        client
                            .subscribe(resp_topic.clone(), QoS::AtLeastOnce)
                            .await
                            .map_err(|e| MqttDeviceError::Client(e.to_string()))?;
                    }
                    Ok(Event::Incoming(Packet::SubAck(_))) => {
                        client
                            .publish(req_topic.clone(), QoS::AtLeastOnce, false, request.clone())
                            .await
                            .map_err(|e| MqttDeviceError::Client(e.to_string()))?;
                    }
                    Ok(Event::Incoming(Packet::Publish(p))) if p.topic == resp_topic => {
                        let mut r = serde_json::from_slice::<ProvisionResponse>(&p.payload)
                            .map_err(|e| MqttDeviceError::Client(format!("bad provisioning response: {e}")))?;
                        if let (Some(sealed), Some(proof)) = (&r.sealed_token, proof.as_deref()) {
                            r.token = Some(twinfleet_actors::unseal_token(sealed, proof).ok_or_else(|| {
                                MqttDeviceError::Client("the sealed token does not open with our proof".into())
                            })?);
                        }
                        return Ok(r);
                    }
                    Ok(_) => {}
                    Err(e) => return Err(MqttDeviceError::Refused(e.to_string())),
                }
            }
        };
        let r = tokio::time::timeout(Duration::from_secs(15), run).await.map_err(|_| MqttDeviceError::Timeout)?;
        let _ = client.try_disconnect();
        r
    }
}

/// The provisioning gateway's answer.
#[derive(Debug, Clone, PartialEq, serde::Deserialize)]
pub struct ProvisionResponse {
    pub ok: bool,
    #[serde(default)]
    pub device_id: Option<String>,
    /// The device token, shown this once (unsealed from `sealed_token` by
    /// [`MqttDevice::provision_with_proof`]).
    #[serde(default)]
    pub token: Option<String>,
    /// The token sealed with the claim's proof (`twinfleet_actors::seal_token`).
    #[serde(default)]
    pub sealed_token: Option<String>,
    /// Where to connect as an operational device.
    #[serde(default)]
    pub operational: Option<String>,
    /// The operational gateway allocated (by name), where gateways are configured.
    #[serde(default)]
    pub gateway: Option<String>,
    #[serde(default)]
    pub error: Option<String>,
    /// Waiting (for an operator's approval): ask again after `retry_after_ms`.
    #[serde(default)]
    pub pending: bool,
    /// The state of the device's provisioning process.
    #[serde(default)]
    pub state: Option<String>,
    #[serde(default)]
    pub retry_after_ms: Option<u64>,
}
