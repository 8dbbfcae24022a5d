//! The monitoring alerts: one open alert per twin and rule (deduplicated), raised and
//! cleared by the twins' rules (`twinfleet_models::rules`) in the same write as the
//! rule's new phase, acknowledged by operators, kept in storage and queryable. New
//! alerts and changes are broadcast (the live stream and the notifier subscribe). A
//! leaf: storage and models only.

use crate::error::TwinError;
use crate::spaces;
use dashmap::DashMap;
use std::sync::Arc;
use tokio::sync::broadcast;
use twinfleet_models::{AlertState, RuleAlert, Severity, Timestamp};
use twinfleet_runtime::{Storage, StorageError, WriteBatch, decode_record, encode_record};

/// What a twin knows when its rule raises an alert.
#[derive(Debug, Clone)]
pub(crate) struct Draft {
    pub twin: String,
    pub device_type: String,
    pub rule: String,
    /// The rule's kind (`threshold`, `offline`, ...).
    pub kind: &'static str,
    pub severity: Severity,
    pub message: String,
    pub values: std::collections::BTreeMap<String, f64>,
    pub memberships: Vec<String>,
    pub location: Option<String>,
    pub recent_events: Vec<String>,
}

/// A query of `AlertBook::list`.
#[derive(Debug, Clone, Default, serde::Deserialize)]
#[cfg_attr(feature = "openapi", derive(utoipa::IntoParams))]
#[cfg_attr(feature = "openapi", into_params(parameter_in = Query))]
#[serde(deny_unknown_fields)]
pub struct AlertQuery {
    /// `raised`, `acknowledged`, `cleared`, or `open` (raised or acknowledged).
    pub state: Option<String>,
    /// At least this severity.
    #[cfg_attr(feature = "openapi", param(value_type = Option<String>))]
    pub severity: Option<Severity>,
    pub twin: Option<String>,
    pub device_type: Option<String>,
    pub rule: Option<String>,
    /// Only alerts with a smaller id (the `next` of the previous page).
    pub before: Option<u64>,
    /// At most this many, newest first (default 100, at most 1,000).
    pub limit: Option<usize>,
}

/// Changes kept in the change log (`spaces::ALERT_CHANGE`); a stream or sink further
/// behind than this has lost the older ones (counted where it notices).
pub const MAX_CHANGES: u64 = 100_000;

/// One change of an alert: its revision in the change log and the alert after it.
pub type Change = (u64, RuleAlert);

#[derive(Debug)]
pub struct AlertBook {
    storage: Arc<dyn Storage>,
    /// `twin\0rule` → its open alert (as last changed, maybe not durable yet).
    open: DashMap<String, RuleAlert>,
    /// The last revision given out; held while a change is logged and broadcast, so
    /// that broadcasts go out in revision order.
    rev: parking_lot::Mutex<u64>,
    /// Held while an alert's state changes (raise, clear, acknowledge): an
    /// acknowledgement never overwrites a clear.
    edit: parking_lot::Mutex<()>,
    tx: broadcast::Sender<Change>,
    /// Per notification sink: what it delivered, failed and lost.
    sinks: DashMap<String, Arc<SinkStats>>,
    /// Per twin: the health its open alerts give it (absent: ok).
    health: DashMap<String, twinfleet_models::Health>,
    /// The silences not yet deleted (expired ones too, until deleted).
    silences: parking_lot::RwLock<Vec<twinfleet_models::notify::Silence>>,
}

/// A notification sink's counters (`/metrics`).
#[derive(Debug, Default)]
pub struct SinkStats {
    pub delivered: std::sync::atomic::AtomicU64,
    /// Attempts that failed (each retry counts).
    pub failed: std::sync::atomic::AtomicU64,
    /// Changes it never got: older than the change log keeps when it came to them.
    pub dropped: std::sync::atomic::AtomicU64,
    /// Changes a silence held back.
    pub silenced: std::sync::atomic::AtomicU64,
    /// It has failed its retries and keeps trying the same change (with the longest
    /// backoff) until it takes it.
    pub failing: std::sync::atomic::AtomicBool,
}

fn open_key(twin: &str, rule: &str) -> String {
    format!("{twin}\0{rule}")
}

impl AlertBook {
    /// Loads the index of open alerts.
    pub(crate) fn open(storage: Arc<dyn Storage>) -> Result<AlertBook, StorageError> {
        let open = DashMap::new();
        for row in storage.scan(spaces::OPEN_ALERT, b"") {
            let (k, v) = row?;
            let Ok(id) = <[u8; 8]>::try_from(v.as_slice()) else { continue };
            if let Some(raw) = storage.get(spaces::RULE_ALERT, &id)?
                && let Ok(alert) = decode_record::<RuleAlert>(&raw)
            {
                open.insert(String::from_utf8_lossy(&k).to_string(), alert);
            }
        }
        let rev = match storage.scan_rev(spaces::ALERT_CHANGE, b"", 1)?.first() {
            Some((k, _)) => <[u8; 8]>::try_from(k.as_slice()).map(u64::from_be_bytes).unwrap_or(0),
            None => 0,
        };
        let (tx, _) = broadcast::channel(4096);
        let book = AlertBook {
            storage,
            open,
            rev: parking_lot::Mutex::new(rev),
            edit: parking_lot::Mutex::new(()),
            tx,
            sinks: DashMap::new(),
            health: DashMap::new(),
            silences: parking_lot::RwLock::new(Vec::new()),
        };
        for row in book.storage.scan(spaces::SILENCE, b"") {
            let (_, v) = row?;
            if let Ok(silence) = decode_record(&v) {
                book.silences.write().push(silence);
            }
        }
        let twins: std::collections::BTreeSet<String> = book.open.iter().map(|a| a.twin.clone()).collect();
        for t in twins {
            book.rehealth(&t);
        }
        Ok(book)
    }

    /// Every change of an alert (raised, acknowledged, cleared) as it is made, with its
    /// revision.
    pub fn subscribe(&self) -> broadcast::Receiver<Change> {
        self.tx.subscribe()
    }

    /// Adds `silence` (checked; its id is given here); resolves once durable.
    pub async fn add_silence(
        &self,
        mut silence: twinfleet_models::notify::Silence,
    ) -> Result<twinfleet_models::notify::Silence, TwinError> {
        silence.validate().map_err(TwinError::Invalid)?;
        silence.id = self.storage.generate_id()?;
        let mut b = WriteBatch::new();
        b.put(spaces::SILENCE, silence.id.to_be_bytes().to_vec(), encode_record(&silence));
        self.storage.submit(b).await?;
        self.silences.write().push(silence.clone());
        Ok(silence)
    }

    pub fn silences(&self) -> Vec<twinfleet_models::notify::Silence> {
        self.silences.read().clone()
    }

    pub async fn delete_silence(&self, id: u64) -> Result<twinfleet_models::notify::Silence, TwinError> {
        let found = self.silences.read().iter().find(|s| s.id == id).cloned();
        let silence = found.ok_or_else(|| TwinError::Unknown { kind: "silence", id: id.to_string() })?;
        let mut b = WriteBatch::new();
        b.delete(spaces::SILENCE, id.to_be_bytes().to_vec());
        self.storage.submit(b).await?;
        self.silences.write().retain(|s| s.id != id);
        Ok(silence)
    }

    /// Whether a silence holds back `a`'s change at `now`.
    pub fn silenced(&self, a: &RuleAlert, now: Timestamp) -> bool {
        self.silences.read().iter().any(|s| s.mutes(a, now))
    }

    /// Twin `twin`'s health from its open alerts.
    pub fn health(&self, twin: &str) -> twinfleet_models::Health {
        self.health.get(twin).map(|h| *h).unwrap_or_default()
    }

    /// Recomputes `twin`'s health (its open alerts' keys start with `twin\0`).
    fn rehealth(&self, twin: &str) {
        let prefix = open_key(twin, "");
        let open: Vec<(String, Severity)> =
            self.open.iter().filter(|e| e.key().starts_with(&prefix)).map(|e| (e.kind.clone(), e.severity)).collect();
        match twinfleet_models::Health::of(open.iter().map(|(k, s)| (k.as_str(), *s))) {
            twinfleet_models::Health::Ok => drop(self.health.remove(twin)),
            h => drop(self.health.insert(twin.to_string(), h)),
        }
    }

    /// The counters of sink `name`.
    pub fn sink_stats(&self, name: &str) -> Arc<SinkStats> {
        self.sinks.entry(name.to_string()).or_default().clone()
    }

    /// Every sink's counters, by name.
    pub fn all_sink_stats(&self) -> Vec<(String, Arc<SinkStats>)> {
        let mut v: Vec<_> = self.sinks.iter().map(|e| (e.key().clone(), e.value().clone())).collect();
        v.sort_by(|a, b| a.0.cmp(&b.0));
        v
    }

    /// Where sink `name` stands in the change log (`None`: never ran).
    pub fn sink_cursor(&self, name: &str) -> Result<Option<u64>, TwinError> {
        Ok(self
            .storage
            .get(spaces::NOTIFY_CURSOR, name.as_bytes())?
            .and_then(|v| <[u8; 8]>::try_from(v.as_slice()).ok())
            .map(u64::from_be_bytes))
    }

    /// Moves sink `name`'s cursor to `rev`; resolves once durable.
    pub fn set_sink_cursor(&self, name: &str, rev: u64) -> twinfleet_runtime::Ticket {
        let mut b = WriteBatch::new();
        b.put(spaces::NOTIFY_CURSOR, name.as_bytes().to_vec(), rev.to_be_bytes().to_vec());
        self.storage.submit(b)
    }

    /// The last revision of the change log.
    pub fn revision(&self) -> u64 {
        *self.rev.lock()
    }

    /// Logs `alert`'s change into `batch` and broadcasts it.
    fn log_change(&self, batch: &mut WriteBatch, alert: &RuleAlert) {
        let mut rev = self.rev.lock();
        *rev += 1;
        batch.put(spaces::ALERT_CHANGE, rev.to_be_bytes().to_vec(), encode_record(alert));
        // Every 1,000 changes, the 1,000 that fell out of the kept window go.
        if rev.is_multiple_of(1_000) && *rev > MAX_CHANGES {
            for old in (*rev - MAX_CHANGES - 999)..=(*rev - MAX_CHANGES) {
                batch.delete(spaces::ALERT_CHANGE, old.to_be_bytes().to_vec());
            }
        }
        let _ = self.tx.send((*rev, alert.clone()));
    }

    /// Up to `limit` changes after revision `after`, oldest first, and whether older
    /// ones than the first returned were dropped from the log (`after` is too old).
    pub fn changes_after(&self, after: u64, limit: usize) -> Result<(Vec<Change>, bool), TwinError> {
        let start = after.saturating_add(1).to_be_bytes();
        let mut out = Vec::new();
        for row in
            self.storage.scan_range(spaces::ALERT_CHANGE, &start, &u64::MAX.to_be_bytes())?.into_iter().take(limit)
        {
            let (k, v) = row;
            let Ok(rev) = <[u8; 8]>::try_from(k.as_slice()).map(u64::from_be_bytes) else { continue };
            if let Ok(a) = decode_record::<RuleAlert>(&v) {
                out.push((rev, a));
            }
        }
        let lost = out.first().is_some_and(|(r, _)| *r > after + 1);
        Ok((out, lost))
    }

    /// Open alerts now.
    pub fn open_count(&self) -> usize {
        self.open.len()
    }

    /// Raises `d`'s alert, written with `batch`; an alert of that twin and rule still
    /// open is kept (deduplicated) and its id returned.
    pub(crate) fn raise_into(&self, batch: &mut WriteBatch, d: Draft, now: Timestamp) -> Result<u64, TwinError> {
        let key = open_key(&d.twin, &d.rule);
        let _edit = self.edit.lock();
        if let Some(a) = self.open.get(&key) {
            return Ok(a.id);
        }
        let id = self.storage.generate_id()?;
        let alert = RuleAlert {
            id,
            twin: d.twin,
            device_type: d.device_type,
            rule: d.rule,
            kind: d.kind.to_string(),
            severity: d.severity,
            state: AlertState::Raised,
            message: d.message,
            values: d.values,
            raised_at: now,
            acknowledged_at: None,
            acknowledged_by: None,
            cleared_at: None,
            memberships: d.memberships,
            location: d.location,
            recent_events: d.recent_events,
        };
        batch.put(spaces::RULE_ALERT, id.to_be_bytes().to_vec(), encode_record(&alert));
        batch.put(spaces::OPEN_ALERT, key.as_bytes().to_vec(), id.to_be_bytes().to_vec());
        self.log_change(batch, &alert);
        let twin = alert.twin.clone();
        self.open.insert(key, alert);
        self.rehealth(&twin);
        Ok(id)
    }

    /// A platform alert (a twin restarted or failed, a watchdog ran out, a provisioning
    /// step timed out, a record was quarantined) as an alert of the book: rule
    /// `platform.<kind>`, for the actor that raised it (`kind/id`). It is an event: it
    /// is logged as raised (the stream and the sinks get it) and opens nothing.
    pub fn platform_alert(&self, a: &twinfleet_models::Alert) -> Result<RuleAlert, TwinError> {
        let kind = serde_json::to_value(&a.kind).ok().and_then(|v| v.as_str().map(str::to_string)).unwrap_or_default();
        let (twin, device_type) = match a.source.split_once('/') {
            Some(("dti", id)) => (id.to_string(), String::new()),
            Some(("tdta", ty)) => (String::new(), ty.to_string()),
            _ => (a.source.clone(), String::new()),
        };
        let alert = RuleAlert {
            id: self.storage.generate_id()?,
            twin,
            device_type,
            rule: format!("platform.{kind}"),
            kind: "platform".into(),
            severity: a.severity,
            state: AlertState::Raised,
            message: a.message.clone(),
            values: Default::default(),
            raised_at: a.at,
            acknowledged_at: None,
            acknowledged_by: None,
            cleared_at: None,
            memberships: Vec::new(),
            location: None,
            recent_events: Vec::new(),
        };
        let mut b = WriteBatch::new();
        b.put(spaces::RULE_ALERT, alert.id.to_be_bytes().to_vec(), encode_record(&alert));
        {
            let _edit = self.edit.lock();
            self.log_change(&mut b, &alert);
            drop(self.storage.submit(b));
        }
        Ok(alert)
    }

    /// Clears the open alert of `twin` and `rule`, if any, written with `batch`.
    pub(crate) fn clear_into(
        &self,
        batch: &mut WriteBatch,
        twin: &str,
        rule: &str,
        now: Timestamp,
    ) -> Result<(), TwinError> {
        let key = open_key(twin, rule);
        let _edit = self.edit.lock();
        let Some((_, mut alert)) = self.open.remove(&key) else { return Ok(()) };
        let id = alert.id;
        alert.state = AlertState::Cleared;
        alert.cleared_at = Some(now);
        batch.put(spaces::RULE_ALERT, id.to_be_bytes().to_vec(), encode_record(&alert));
        batch.delete(spaces::OPEN_ALERT, key.as_bytes().to_vec());
        self.log_change(batch, &alert);
        self.rehealth(twin);
        Ok(())
    }

    /// Clears every open alert of `twin` (it is deleted), written with `batch`.
    pub(crate) fn clear_twin_into(&self, batch: &mut WriteBatch, twin: &str, now: Timestamp) {
        let prefix = open_key(twin, "");
        let rules: Vec<String> =
            self.open.iter().filter(|e| e.key().starts_with(&prefix)).map(|e| e.rule.clone()).collect();
        for rule in rules {
            if let Err(e) = self.clear_into(batch, twin, &rule, now) {
                tracing::warn!(twin, rule, "an alert of a deleted twin could not be cleared: {e}");
            }
        }
    }

    pub fn get(&self, id: u64) -> Result<Option<RuleAlert>, TwinError> {
        if let Some(a) = self.open.iter().find(|a| a.id == id) {
            return Ok(Some(a.clone()));
        }
        match self.storage.get(spaces::RULE_ALERT, &id.to_be_bytes())? {
            None => Ok(None),
            Some(raw) => decode_record(&raw)
                .map(Some)
                .map_err(|e| TwinError::Invalid(format!("alert {id} does not decode: {e}"))),
        }
    }

    /// An operator acknowledges alert `id` (an open one; acknowledging again keeps the
    /// first acknowledgement).
    pub async fn acknowledge(&self, id: u64, by: &str, now: Timestamp) -> Result<RuleAlert, TwinError> {
        let mut alert = self.get(id)?.ok_or_else(|| TwinError::Unknown { kind: "alert", id: id.to_string() })?;
        match alert.state {
            AlertState::Cleared => {
                return Err(TwinError::Conflict(format!("alert {id} is cleared; there is nothing to acknowledge")));
            }
            AlertState::Acknowledged => return Ok(alert),
            AlertState::Raised => {}
        }
        alert.state = AlertState::Acknowledged;
        alert.acknowledged_at = Some(now);
        alert.acknowledged_by = Some(by.to_string());
        let ticket = {
            let _edit = self.edit.lock();
            // (Cleared meanwhile, its write maybe not landed yet: the clear stands.)
            let key = open_key(&alert.twin, &alert.rule);
            if self.open.get(&key).map(|a| a.id) != Some(id) {
                return Err(TwinError::Conflict(format!("alert {id} is cleared; there is nothing to acknowledge")));
            }
            let mut b = WriteBatch::new();
            b.put(spaces::RULE_ALERT, id.to_be_bytes().to_vec(), encode_record(&alert));
            self.log_change(&mut b, &alert);
            self.open.insert(key, alert.clone());
            // Submitted under the lock: a clear after it is written after it.
            self.storage.submit(b)
        };
        ticket.await?;
        Ok(alert)
    }

    /// Alerts matching `q`, newest first, and the `before` of the next page.
    pub fn list(&self, q: &AlertQuery) -> Result<(Vec<RuleAlert>, Option<u64>), TwinError> {
        let limit = q.limit.unwrap_or(100).clamp(1, 1_000);
        let open_only = match q.state.as_deref() {
            None => None,
            Some("open") => Some(None),
            Some(s) => {
                Some(Some(serde_json::from_value::<AlertState>(serde_json::Value::String(s.to_string())).map_err(
                    |_| TwinError::Invalid(format!("state {s:?} is none of raised, acknowledged, cleared, open")),
                )?))
            }
        };
        let end = q.before.map_or(u64::MAX, |b| b.saturating_sub(1)).to_be_bytes();
        let mut out = Vec::new();
        let mut next = None;
        for row in self.storage.scan_range_rev(spaces::RULE_ALERT, &[0u8; 8], &end) {
            let (_, v) = row?;
            let Ok(a) = decode_record::<RuleAlert>(&v) else { continue };
            let state_ok = match open_only {
                None => true,
                Some(None) => a.state != AlertState::Cleared,
                Some(Some(s)) => a.state == s,
            };
            if state_ok
                && q.severity.is_none_or(|s| a.severity >= s)
                && q.twin.as_ref().is_none_or(|t| &a.twin == t)
                && q.device_type.as_ref().is_none_or(|t| &a.device_type == t)
                && q.rule.as_ref().is_none_or(|r| &a.rule == r)
            {
                if out.len() == limit {
                    next = out.last().map(|a: &RuleAlert| a.id);
                    break;
                }
                out.push(a);
            }
        }
        Ok((out, next))
    }
}
