//! What every MQTT path does with a device's message once it knows who sent it: parse
//! the payload of its channel straight into the twin's own message and hand it to the
//! twin, or answer a provisioning request. The embedded gateway ([`super::gateway`]) and
//! the transformer of an external broker ([`super::transformer`]) share it.

use super::topics::Channel;
use serde::Deserialize;
use serde_json::{Map, Value};
use std::time::Duration;
use twinfleet_actors::{ClaimAnswer, TwinError, TwinHandle, TwinRuntime};
use twinfleet_models::{LogLevel, LogLine, Metadata, MetricPoint, Timestamp};

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
    /// `{"metric": value, ...}`: read as pairs (no map, no key copied twice); a metric
    /// named twice keeps its last value, as a JSON object would.
    #[serde(default, deserialize_with = "pairs")]
    values: Vec<(String, Value)>,
    #[serde(default)]
    points: Vec<PointMsg>,
}

/// A JSON object as its (key, value) pairs in their order, a repeated key keeping its
/// first place and its last value: what a `Map` would hold, without building one.
fn pairs<'de, D: serde::Deserializer<'de>>(d: D) -> Result<Vec<(String, Value)>, D::Error> {
    struct Pairs;
    impl<'de> serde::de::Visitor<'de> for Pairs {
        type Value = Vec<(String, Value)>;
        fn expecting(&self, f: &mut std::fmt::Formatter) -> std::fmt::Result {
            f.write_str("an object of metric values")
        }
        fn visit_map<A: serde::de::MapAccess<'de>>(self, mut m: A) -> Result<Self::Value, A::Error> {
            let mut v: Vec<(String, Value)> = Vec::with_capacity(m.size_hint().unwrap_or(8).min(64));
            // Past a few keys, an index finds repeats.
            let mut index: Option<std::collections::HashMap<String, usize>> = None;
            while let Some((k, value)) = m.next_entry::<String, Value>()? {
                if v.len() == 16 {
                    index = Some(v.iter().enumerate().map(|(i, (k, _))| (k.clone(), i)).collect());
                }
                let seen = match &mut index {
                    Some(ix) => match ix.get(&k) {
                        Some(&i) => Some(i),
                        None => {
                            ix.insert(k.clone(), v.len());
                            None
                        }
                    },
                    None => v.iter().position(|(have, _)| *have == k),
                };
                match seen {
                    Some(i) => v[i].1 = value,
                    None => v.push((k, value)),
                }
            }
            Ok(v)
        }
    }
    d.deserialize_map(Pairs)
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
struct LogsMsg {
    /// The default time of the lines (default: arrival).
    ts: Option<i64>,
    /// The default app of the lines (default: `device`).
    app: Option<String>,
    lines: Vec<LogLineMsg>,
}

/// A line: a bare string (level info) or an object.
#[derive(Debug, Deserialize)]
#[serde(untagged)]
enum LogLineMsg {
    Text(String),
    Full(FullLogLine),
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct FullLogLine {
    ts: Option<i64>,
    level: Option<String>,
    app: Option<String>,
    text: String,
}

/// The app of lines that name none.
pub(crate) const DEFAULT_APP: &str = "device";

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct ProvisionMsg {
    claim_token: String,
    /// The pre-registered batch whose claim token this is (default: the batch the
    /// connection's username names, else the type's own token).
    #[serde(default)]
    batch: Option<String>,
    /// A secret of at least 16 bytes that only this device knows: binds its process to
    /// it, and the answer carries the token sealed with it (`sealed_token`). Required
    /// through an external broker.
    #[serde(default)]
    proof: Option<String>,
    #[serde(default)]
    metadata: Metadata,
    /// Serial, MAC, model, firmware, OS, architecture, peripherals, region (default:
    /// serial = the device id).
    #[serde(default)]
    identity: Option<twinfleet_models::provisioning::Identity>,
}

/// How long a pending device is told to wait before it asks again.
const PENDING_RETRY_MS: u64 = 5_000;

/// Why a message was not taken: the reason counted, the detail logged, and whether the
/// device should send it again later (busy, storage full) rather than never.
#[derive(Debug, Clone)]
pub(crate) struct Refused {
    pub reason: &'static str,
    pub detail: String,
    pub retry: bool,
}

impl Refused {
    pub fn new(reason: &'static str, detail: impl Into<String>) -> Self {
        Refused { reason, detail: detail.into(), retry: false }
    }
}

/// A payload as `T`, or `malformed` saying what was expected.
fn parse<T: serde::de::DeserializeOwned>(payload: &[u8], what: &str) -> Result<T, Refused> {
    serde_json::from_slice(payload).map_err(|e| Refused::new("malformed", format!("{what}: {e}")))
}

/// A twin error on delivery as a counted reason.
fn refused(twin: &TwinHandle, e: TwinError) -> Refused {
    use crate::error::Class;
    let k = crate::error::classify(&e);
    let retry = matches!(k.class, Class::Busy | Class::Unavailable | Class::Timeout | Class::InsufficientStorage);
    Refused { reason: k.reason, detail: format!("twin {}: {e}", twin.id()), retry }
}

/// The shared handling of device messages.
#[derive(Debug, Clone)]
pub(crate) struct Ingest {
    pub rt: TwinRuntime,
    /// Where provisioned devices are told to connect.
    pub operational: String,
    /// Claims must carry a proof (their answers may be read by other claimants).
    pub require_proof: bool,
}

impl Ingest {
    fn limit(&self) -> Duration {
        Duration::from_millis(self.rt.settings().request_timeout_ms)
    }

    /// Hands a device's message on `channel` to its twin; resolves once the twin has it
    /// (durably, for telemetry and state).
    pub async fn device(&self, twin: &TwinHandle, channel: Channel, payload: &[u8]) -> Result<(), Refused> {
        // Each channel parses straight into its own shape: no intermediate JSON tree.
        let done = match channel {
            Channel::Telemetry => return self.telemetry(twin, payload).await,
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
                    return Err(Refused::new("malformed", "command_id must be 1 to 256 bytes"));
                }
                patiently(self.limit(), || twin.ack(ack.command_id.clone(), ack.success, ack.message.clone()))
                    .await
                    .map(drop)
            }
            Channel::Logs => {
                let lines = self.log_lines(parse(payload, "logs ({\"lines\": [...]})")?)?;
                patiently(self.limit(), || twin.append_logs(lines.clone())).await.map(drop)
            }
        };
        done.map_err(|e| refused(twin, e))
    }

    /// A device's telemetry message (the `device` path of [`Channel::Telemetry`], on its
    /// own so that the most common message's future stays small).
    pub async fn telemetry(&self, twin: &TwinHandle, payload: &[u8]) -> Result<(), Refused> {
        let now = self.rt.now();
        let mut first = Some(Self::points(parse(payload, "telemetry")?, now)?);
        // The points go to the twin without a copy; a retry (the twin was busy) reads
        // the payload again, with the same arrival time.
        let again = || Self::points(parse(payload, "telemetry").ok()?, now).ok();
        patiently(self.limit(), || match first.take().or_else(again) {
            Some(points) => futures::future::Either::Left(twin.ingest(points)),
            // (The same bytes parse the same way: not expected, but never an empty batch.)
            None => futures::future::Either::Right(std::future::ready(Err(TwinError::Invalid(
                "the telemetry message could not be read again for a retry".into(),
            )))),
        })
        .await
        .map(drop)
        .map_err(|e| refused(twin, e))
    }

    /// The points of a telemetry message; those without a time of their own or of the
    /// message get `now` (arrival).
    fn points(msg: TelemetryMsg, now: Timestamp) -> Result<Vec<MetricPoint>, Refused> {
        let batch_at = msg.ts.map(Timestamp).unwrap_or(now);
        let number = |metric: &str, v: &Value| {
            v.as_f64().ok_or_else(|| Refused::new("wrong_type", format!("metric {metric:?} is {v}, not a number")))
        };
        let mut points = Vec::with_capacity(msg.values.len() + msg.points.len());
        for (metric, v) in msg.values {
            points.push(MetricPoint { value: number(&metric, &v)?, metric, at: batch_at });
        }
        for p in msg.points {
            let value = number(&p.metric, &p.value)?;
            points.push(MetricPoint { metric: p.metric, value, at: p.ts.map(Timestamp).unwrap_or(batch_at) });
        }
        Ok(points)
    }

    fn log_lines(&self, msg: LogsMsg) -> Result<Vec<LogLine>, Refused> {
        let at = msg.ts.map(Timestamp).unwrap_or_else(|| self.rt.now());
        let app = msg.app.unwrap_or_else(|| DEFAULT_APP.into());
        msg.lines
            .into_iter()
            .map(|l| match l {
                LogLineMsg::Text(text) => Ok(LogLine { at, level: LogLevel::Info, app: app.clone(), text }),
                LogLineMsg::Full(l) => Ok(LogLine {
                    at: l.ts.map(Timestamp).unwrap_or(at),
                    level: match l.level {
                        None => LogLevel::Info,
                        Some(v) => {
                            v.parse().map_err(|e: twinfleet_models::LogError| Refused::new("bad_log", e.to_string()))?
                        }
                    },
                    app: l.app.unwrap_or_else(|| app.clone()),
                    text: l.text,
                }),
            })
            .collect()
    }

    /// A device claims, presenting its type's claim token (and, optionally, its
    /// identity): runs or continues its provisioning process. Returns the answer for its
    /// response topic: its credentials (shown while it has not confirmed yet), "pending"
    /// (ask again later), or why not.
    pub async fn provision(
        &self,
        ty: &str,
        id: &str,
        batch: Option<&str>,
        payload: &[u8],
        source: Option<std::net::IpAddr>,
    ) -> (Value, Result<(), Refused>) {
        let mut proof = None;
        let result = match parse::<ProvisionMsg>(payload, "provisioning request") {
            Ok(msg) => {
                proof = msg.proof.clone();
                self.try_provision(ty, id, batch, msg, source).await
            }
            Err(r) => Err(r),
        };
        let body = match &result {
            Ok(ClaimAnswer::Credentials { device_id, token, state, gateway }) => {
                let (operational, name) = match gateway.as_ref().filter(|g| !g.mqtt.is_empty()) {
                    Some(g) => (g.mqtt.as_str(), Some(g.name.as_str())),
                    None => (self.operational.as_str(), None),
                };
                let mut body = serde_json::json!({
                    "ok": true, "device_id": device_id, "operational": operational, "state": state,
                });
                match &proof {
                    Some(p) => body["sealed_token"] = twinfleet_actors::seal_token(token, p).into(),
                    None => body["token"] = token.as_str().into(),
                }
                if let Some(name) = name {
                    body["gateway"] = name.into();
                }
                body
            }
            Ok(ClaimAnswer::Pending { state }) => serde_json::json!({
                "ok": false, "pending": true, "state": state, "retry_after_ms": PENDING_RETRY_MS,
            }),
            Ok(ClaimAnswer::Refused { state, reason }) => {
                serde_json::json!({ "ok": false, "error": reason, "state": state })
            }
            Err(r) if r.reason == "rate_limited" => {
                serde_json::json!({ "ok": false, "error": r.detail, "retry_after_ms": PENDING_RETRY_MS })
            }
            Err(r) => serde_json::json!({ "ok": false, "error": r.detail }),
        };
        let result = match result {
            Ok(ClaimAnswer::Refused { reason, .. }) => Err(Refused::new("provisioning_refused", reason)),
            other => other.map(drop),
        };
        (body, result)
    }

    async fn try_provision(
        &self,
        ty: &str,
        id: &str,
        batch: Option<&str>,
        msg: ProvisionMsg,
        source: Option<std::net::IpAddr>,
    ) -> Result<ClaimAnswer, Refused> {
        let credential = match msg.batch.as_deref().or(batch) {
            Some(b) => format!("{ty}/{b}"),
            None => ty.to_string(),
        };
        let cred = self
            .rt
            .authenticate_claim(&credential, &msg.claim_token)
            .map_err(|e| Refused::new(e.reason(), format!("provisioning {id} as {credential}: {e}")))?;
        if self.require_proof && msg.proof.is_none() {
            return Err(Refused::new(
                "malformed",
                format!(
                    "provisioning {id}: a claim through the broker carries a `proof` (a secret of at least \
                     {} bytes), since other claimants of {ty} may read its answer",
                    twinfleet_actors::MIN_PROOF_LEN
                ),
            ));
        }
        let claim = twinfleet_actors::Claim {
            device_id: id.to_string(),
            identity: msg.identity,
            metadata: msg.metadata,
            proof: msg.proof,
            source,
        };
        match self.rt.claim_from(&cred, claim).await {
            Ok(a) => Ok(a),
            Err(TwinError::AlreadyExists { .. }) => Err(Refused::new(
                "already_provisioned",
                format!("device {id} already exists; an operator can issue it a new token"),
            )),
            Err(TwinError::Conflict(why)) => Err(Refused::new("identity_mismatch", why)),
            Err(TwinError::Unauthenticated(why)) => Err(Refused::new("bad_credentials", why)),
            Err(e @ TwinError::RateLimited { .. }) => Err(Refused::new("rate_limited", e.to_string())),
            Err(e @ (TwinError::Invalid(_) | TwinError::InvalidId(_))) => Err(Refused::new("malformed", e.to_string())),
            Err(e) => Err(Refused::new("provisioning_failed", e.to_string())),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn points(json: &str) -> Result<Vec<(String, f64, i64)>, String> {
        let msg: TelemetryMsg = serde_json::from_str(json).map_err(|e| e.to_string())?;
        let p = Ingest::points(msg, Timestamp(7)).map_err(|r| format!("{}: {}", r.reason, r.detail))?;
        Ok(p.into_iter().map(|p| (p.metric, p.value, p.at.0)).collect())
    }

    #[test]
    fn values_keep_their_order_and_a_repeated_metric_its_first_place_and_last_value() {
        let got = points(r#"{"values":{"b":1,"a":2,"b":3}}"#).unwrap();
        assert_eq!(got, [("b".into(), 3.0, 7), ("a".into(), 2.0, 7)]);
        // Past the linear scan's reach, the index finds repeats too.
        let mut json = String::from(r#"{"ts":5,"values":{"#);
        for i in 0..40 {
            json.push_str(&format!(r#""m{i}":{i},"#));
        }
        json.push_str(r#""m3":99,"m39":100}}"#);
        let got = points(&json).unwrap();
        assert_eq!(got.len(), 40);
        assert_eq!(got[3], ("m3".into(), 99.0, 5));
        assert_eq!(got[39], ("m39".into(), 100.0, 5));
    }

    #[test]
    fn a_value_that_is_not_a_number_or_values_that_are_not_an_object_are_refused() {
        assert_eq!(points(r#"{"values":{"t":"x"}}"#).unwrap_err(), r#"wrong_type: metric "t" is "x", not a number"#);
        assert!(points(r#"{"values":[1,2]}"#).unwrap_err().contains("an object of metric values"));
        assert!(points(r#"{"values":{"t":1},"bogus":1}"#).unwrap_err().contains("unknown field"));
    }
}
