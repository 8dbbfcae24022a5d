//! A blocking MQTT publisher to an external broker, for the threads of the history
//! exports and the notification sinks: it publishes a batch of QoS 1 messages and returns
//! once the broker acknowledged every one (or says why not). It runs its connection on a
//! current-thread tokio runtime of its own, so the calling thread simply blocks.
//!
//! A failed publish leaves the publisher unusable: the caller drops it and connects a
//! fresh session for its retry (clean session: nothing of the old one is resumed, the
//! caller sends the whole batch again).

use std::time::Duration;

const ACK_TIMEOUT: Duration = Duration::from_secs(10);
/// Messages in flight at most (the client's request channel).
const IN_FLIGHT: usize = 1_024;

/// One broker connection (see the module docs).
pub struct Publisher {
    runtime: tokio::runtime::Runtime,
    client: rumqttc::AsyncClient,
    acks: tokio::sync::mpsc::UnboundedReceiver<Result<(), String>>,
    poller: tokio::task::JoinHandle<()>,
}

impl std::fmt::Debug for Publisher {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Publisher").finish_non_exhaustive()
    }
}

impl Drop for Publisher {
    fn drop(&mut self) {
        self.poller.abort();
    }
}

impl Publisher {
    /// Connects as `client_id` to `url` (`mqtt://host:port`), with an account when
    /// `username` is not empty. The connection is made on the first publish.
    pub fn connect(client_id: &str, url: &str, username: &str, password: &str) -> Result<Publisher, String> {
        let (host, port) = twinfleet_models::export::mqtt_broker(url)
            .ok_or_else(|| format!("the broker url {url:?} must be mqtt://host:port"))?;
        let mut o = rumqttc::MqttOptions::new(client_id, host, port);
        o.set_keep_alive(Duration::from_secs(30));
        o.set_clean_session(true);
        o.set_max_packet_size(1 << 20, 1 << 20);
        if !username.is_empty() {
            o.set_credentials(username, password);
        }
        let runtime = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .map_err(|e| format!("cannot start an MQTT publisher's runtime: {e}"))?;
        let (client, mut events) = rumqttc::AsyncClient::new(o, IN_FLIGHT);
        let (tx, acks) = tokio::sync::mpsc::unbounded_channel();
        let poller = runtime.spawn(async move {
            loop {
                match events.poll().await {
                    Ok(rumqttc::Event::Incoming(rumqttc::Packet::PubAck(_))) => {
                        if tx.send(Ok(())).is_err() {
                            return;
                        }
                    }
                    Ok(rumqttc::Event::Incoming(rumqttc::Packet::ConnAck(c)))
                        if c.code != rumqttc::ConnectReturnCode::Success =>
                    {
                        let _ = tx.send(Err(format!("the broker refused the connection: {:?}", c.code)));
                        return;
                    }
                    Ok(_) => {}
                    Err(e) => {
                        let _ = tx.send(Err(format!("MQTT connection: {e}")));
                        return;
                    }
                }
            }
        });
        Ok(Publisher { runtime, client, acks, poller })
    }

    /// Publishes every `(topic, payload)` at QoS 1, not retained, in order; returns once
    /// the broker acknowledged each.
    pub fn publish_all(&mut self, messages: Vec<(String, Vec<u8>)>) -> Result<(), String> {
        let client = self.client.clone();
        let acks = &mut self.acks;
        self.runtime.block_on(async {
            let n = messages.len();
            for (topic, body) in messages {
                client.publish(topic, rumqttc::QoS::AtLeastOnce, false, body).await.map_err(|e| e.to_string())?;
            }
            for _ in 0..n {
                match tokio::time::timeout(ACK_TIMEOUT, acks.recv()).await {
                    Ok(Some(Ok(()))) => {}
                    Ok(Some(Err(e))) => return Err(e),
                    Ok(None) => return Err("the MQTT connection ended".into()),
                    Err(_) => return Err(format!("the broker did not acknowledge within {ACK_TIMEOUT:?}")),
                }
            }
            Ok(())
        })
    }
}

/// A publisher kept across attempts: connected on first use, dropped after a failure so
/// the next attempt starts a fresh session.
#[derive(Debug, Default)]
pub struct Reconnecting(Option<Publisher>);

impl Reconnecting {
    pub fn publish_all(
        &mut self,
        client_id: &str,
        url: &str,
        username: &str,
        password: &str,
        messages: Vec<(String, Vec<u8>)>,
    ) -> Result<(), String> {
        if self.0.is_none() {
            self.0 = Some(Publisher::connect(client_id, url, username, password)?);
        }
        let r = self.0.as_mut().expect("connected above").publish_all(messages);
        if r.is_err() {
            self.0 = None;
        }
        r
    }
}
