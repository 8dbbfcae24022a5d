//! The binary encoding of journal events: what every change of a twin writes, so it is
//! small and cheap (no JSON text). An event is `[0x02][CRC32 of the body, LE][body]`;
//! the body is the sequence number and time as varints, a kind tag, and the kind's
//! fields, JSON documents (patches, attributes) in a compact binary form of their own.
//! Journal entries written before (JSON, `encode_record`'s format 1) still decode.
//!
//! The encoding belongs to storage, not to the domain: `twinfleet-models` defines the
//! events, this module how they lie on disk.

use serde_json::{Map, Number, Value};
use twinfleet_models::{
    AlertKind, CommandId, CommandKind, DtaId, EventKind, Metadata, Timestamp, TwinEvent, Wait, WaitName,
};
use twinfleet_runtime::{CodecError, decode_record};

const FORMAT_BINARY_EVENT: u8 = 2;
/// A journal record holding the events of one snapshot interval, each encoded as above.
const FORMAT_CHUNK: u8 = 3;

/// The most bytes of events one history record holds (sled keeps values inline in
/// leaves of 16 entries and writes a leaf past 128 KiB as a blob file of its own).
const CHUNK_PART_BYTES: usize = 2048;

/// The events of a twin since its last snapshot, encoded, in order: what the twin writes
/// as history records (one per part of at most `CHUNK_PART_BYTES`) with its next
/// snapshot.
#[derive(Debug, Clone)]
pub(crate) struct Chunk {
    /// `[FORMAT_CHUNK]` then, per event, `[u32 LE length][encoded event]`.
    bytes: Vec<u8>,
    /// Where each part starts: its first event's seq and its offset in `bytes`.
    parts: Vec<(u64, usize)>,
    pub events: u32,
}

impl Chunk {
    pub(crate) fn new(first_seq: u64) -> Self {
        Chunk { bytes: vec![FORMAT_CHUNK], parts: vec![(first_seq, 1)], events: 0 }
    }

    pub(crate) fn push(&mut self, seq: u64, encoded: &[u8]) {
        let start = self.parts.last().map_or(1, |p| p.1);
        let used = self.bytes.len() - start;
        if used > 0 && used + 4 + encoded.len() > CHUNK_PART_BYTES {
            self.parts.push((seq, self.bytes.len()));
        }
        self.bytes.extend_from_slice(&(encoded.len() as u32).to_le_bytes());
        self.bytes.extend_from_slice(encoded);
        self.events += 1;
    }

    /// All the events as one record (what a read decodes).
    pub(crate) fn record(&self) -> Vec<u8> {
        self.bytes.clone()
    }

    /// The history records to store: per part, its first seq and its record.
    pub(crate) fn records(&self) -> Vec<(u64, Vec<u8>)> {
        (0..self.parts.len())
            .map(|i| {
                let (seq, start) = self.parts[i];
                let end = self.parts.get(i + 1).map_or(self.bytes.len(), |p| p.1);
                let mut rec = Vec::with_capacity(1 + end - start);
                rec.push(FORMAT_CHUNK);
                rec.extend_from_slice(&self.bytes[start..end]);
                (seq, rec)
            })
            .collect()
    }

    /// This interval's events followed by `later`'s.
    pub(crate) fn joined(mut self, later: Chunk) -> Chunk {
        let shift = self.bytes.len() - 1;
        self.bytes.extend_from_slice(&later.bytes[1..]);
        self.parts.extend(later.parts.into_iter().map(|(seq, at)| (seq, at + shift)));
        self.events += later.events;
        self
    }
}

/// Decodes a journal record: one event (formats 1 and 2) or a chunk of them (format 3).
pub(crate) fn decode_journal(bytes: &[u8]) -> Result<Vec<TwinEvent>, CodecError> {
    if bytes.first() != Some(&FORMAT_CHUNK) {
        return decode_event(bytes).map(|e| vec![e]);
    }
    let mut rest = &bytes[1..];
    let mut out = Vec::new();
    while !rest.is_empty() {
        let Some(len) = rest.get(..4).map(|l| u32::from_le_bytes([l[0], l[1], l[2], l[3]]) as usize) else {
            return Err(CodecError::Truncated { len: bytes.len() });
        };
        let Some(event) = rest.get(4..4 + len) else {
            return Err(CodecError::Truncated { len: bytes.len() });
        };
        out.push(decode_event(event)?);
        rest = &rest[4 + len..];
    }
    Ok(out)
}

/// One event in a page of the journal's write-ahead pages: `[u16 LE id length][twin
/// id][encoded event]`.
pub(crate) fn page_item(twin: &str, encoded: &[u8]) -> Vec<u8> {
    let mut item = Vec::with_capacity(2 + twin.len() + encoded.len());
    item.extend_from_slice(&(twin.len() as u16).to_le_bytes());
    item.extend_from_slice(twin.as_bytes());
    item.extend_from_slice(encoded);
    item
}

/// The twin id and the encoded event of a page item.
pub(crate) fn split_page_item(item: &[u8]) -> Option<(&str, &[u8])> {
    let n = u16::from_le_bytes([*item.first()?, *item.get(1)?]) as usize;
    let id = std::str::from_utf8(item.get(2..2 + n)?).ok()?;
    Some((id, &item[2 + n..]))
}

/// The (twin id, encoded event) items of one stored page part, in order. A part that
/// does not parse yields one error and stops: whose events follow is unknown.
pub(crate) fn page_events(part: &[u8]) -> impl Iterator<Item = Result<(&str, &[u8]), String>> {
    let mut broken = false;
    twinfleet_runtime::page_items(part).map_while(move |item| {
        if broken {
            return None;
        }
        let parsed = item.ok().and_then(split_page_item);
        broken = parsed.is_none();
        Some(parsed.ok_or_else(|| "a journal page does not parse".to_string()))
    })
}

/// Encodes one journal event.
pub(crate) fn encode_event(e: &TwinEvent) -> Vec<u8> {
    let mut w = Vec::with_capacity(32);
    varint(&mut w, e.seq);
    varint(&mut w, zigzag(e.at.0));
    match &e.kind {
        EventKind::Created => w.push(0),
        EventKind::Reported { patch } => {
            w.push(1);
            object(&mut w, patch);
        }
        EventKind::DesiredSet { patch, wait } => {
            w.push(2);
            object(&mut w, patch);
            match wait {
                None => w.push(0),
                Some(x) => {
                    w.push(1);
                    wait_full(&mut w, x);
                }
            }
        }
        EventKind::MetadataUpdated { metadata } => {
            w.push(3);
            match &metadata.location {
                None => w.push(0),
                Some(l) => {
                    w.push(1);
                    string(&mut w, l);
                }
            }
            varint(&mut w, metadata.tags.len() as u64);
            for t in &metadata.tags {
                string(&mut w, t);
            }
            object(&mut w, &metadata.attributes);
        }
        EventKind::OverridesSet { patch } => {
            w.push(4);
            object(&mut w, patch);
        }
        EventKind::JoinedDta { dta } => {
            w.push(5);
            string(&mut w, dta.as_str());
        }
        EventKind::LeftDta { dta } => {
            w.push(6);
            string(&mut w, dta.as_str());
        }
        EventKind::Archived => w.push(7),
        EventKind::Restarted { reason, attempt } => {
            w.push(8);
            string(&mut w, reason);
            varint(&mut w, u64::from(*attempt));
        }
        EventKind::WaitRetried { wait, attempt, deadline } => {
            w.push(9);
            w.push(wait_tag(*wait));
            varint(&mut w, u64::from(*attempt));
            varint(&mut w, zigzag(deadline.0));
        }
        EventKind::InSync => w.push(10),
        EventKind::CommandSent { command_id, command, body } => {
            // 11: without arguments (journals from before they were kept).
            w.push(14);
            varint(&mut w, command_id.0);
            w.push(command_tag(*command));
            object(&mut w, body);
        }
        EventKind::CommandAcked { command_id, success, message } => {
            w.push(12);
            string(&mut w, command_id);
            w.push(u8::from(*success));
            string(&mut w, message);
        }
        EventKind::AlertRaised { alert, message, wait } => {
            w.push(13);
            w.push(alert_tag(alert));
            string(&mut w, message);
            match wait {
                None => w.push(0),
                Some(x) => {
                    w.push(1);
                    w.push(wait_tag(*x));
                }
            }
        }
        EventKind::RulePhase { rule, phase } => {
            w.push(15);
            string(&mut w, rule);
            use twinfleet_models::rules::Phase;
            match phase {
                Phase::Ok => w.push(0),
                Phase::Pending { since } => {
                    w.push(1);
                    varint(&mut w, zigzag(since.0));
                }
                Phase::Firing { since } => {
                    w.push(2);
                    varint(&mut w, zigzag(since.0));
                }
                Phase::Clearing { since, clearing } => {
                    w.push(3);
                    varint(&mut w, zigzag(since.0));
                    varint(&mut w, zigzag(clearing.0));
                }
            }
        }
        EventKind::DesiredFailed { reasons } => {
            w.push(16);
            varint(&mut w, reasons.len() as u64);
            for (k, why) in reasons {
                string(&mut w, k);
                string(&mut w, why);
            }
        }
        EventKind::DesiredCleared { keys } => {
            w.push(17);
            strings(&mut w, keys);
        }
        EventKind::DesiredTransient { keys } => {
            w.push(18);
            strings(&mut w, keys);
        }
        EventKind::InstallChanged { job } => {
            w.push(20);
            let v = serde_json::to_value(job).unwrap_or_default();
            object(&mut w, v.as_object().unwrap_or(&Map::new()));
        }
        EventKind::TemplateApplied { target, version, values } => {
            w.push(19);
            string(&mut w, target);
            varint(&mut w, u64::from(*version));
            let values: Map<String, Value> = values.iter().map(|(k, v)| (k.clone(), v.clone())).collect();
            object(&mut w, &values);
        }
    }
    let mut out = Vec::with_capacity(w.len() + 5);
    out.push(FORMAT_BINARY_EVENT);
    out.extend_from_slice(&crc32fast::hash(&w).to_le_bytes());
    out.extend_from_slice(&w);
    out
}

/// Decodes a journal entry in either format.
pub(crate) fn decode_event(bytes: &[u8]) -> Result<TwinEvent, CodecError> {
    match bytes.first() {
        Some(&FORMAT_BINARY_EVENT) => {
            if bytes.len() < 5 {
                return Err(CodecError::Truncated { len: bytes.len() });
            }
            let body = &bytes[5..];
            let stored = u32::from_le_bytes([bytes[1], bytes[2], bytes[3], bytes[4]]);
            let computed = crc32fast::hash(body);
            if computed != stored {
                return Err(CodecError::Checksum { stored, computed });
            }
            let mut r = Reader(body);
            let e = r.event().ok_or_else(|| CodecError::Body("a binary journal event does not decode".into()))?;
            if !r.0.is_empty() {
                return Err(CodecError::Body("trailing bytes after a journal event".into()));
            }
            Ok(e)
        }
        _ => decode_record(bytes),
    }
}

fn zigzag(v: i64) -> u64 {
    ((v << 1) ^ (v >> 63)) as u64
}

fn unzigzag(v: u64) -> i64 {
    ((v >> 1) as i64) ^ -((v & 1) as i64)
}

fn varint(w: &mut Vec<u8>, mut v: u64) {
    while v >= 0x80 {
        w.push((v as u8) | 0x80);
        v >>= 7;
    }
    w.push(v as u8);
}

fn string(w: &mut Vec<u8>, s: &str) {
    varint(w, s.len() as u64);
    w.extend_from_slice(s.as_bytes());
}

fn strings(w: &mut Vec<u8>, v: &[String]) {
    varint(w, v.len() as u64);
    for s in v {
        string(w, s);
    }
}

fn object(w: &mut Vec<u8>, m: &Map<String, Value>) {
    varint(w, m.len() as u64);
    for (k, v) in m {
        string(w, k);
        value(w, v);
    }
}

/// JSON values: 0 null, 1 false, 2 true, 3 unsigned, 4 negative (zigzag), 5 float
/// (8 bytes LE), 6 string, 7 array, 8 object.
fn value(w: &mut Vec<u8>, v: &Value) {
    match v {
        Value::Null => w.push(0),
        Value::Bool(b) => w.push(1 + u8::from(*b)),
        Value::Number(n) => {
            if let Some(u) = n.as_u64() {
                w.push(3);
                varint(w, u);
            } else if let Some(i) = n.as_i64() {
                w.push(4);
                varint(w, zigzag(i));
            } else {
                w.push(5);
                w.extend_from_slice(&n.as_f64().unwrap_or(0.0).to_le_bytes());
            }
        }
        Value::String(s) => {
            w.push(6);
            string(w, s);
        }
        Value::Array(a) => {
            w.push(7);
            varint(w, a.len() as u64);
            for x in a {
                value(w, x);
            }
        }
        Value::Object(m) => {
            w.push(8);
            object(w, m);
        }
    }
}

fn wait_full(w: &mut Vec<u8>, x: &Wait) {
    w.push(wait_tag(x.wait));
    varint(w, u64::from(x.attempt));
    varint(w, zigzag(x.deadline.0));
    match x.command {
        None => w.push(0),
        Some(c) => {
            w.push(1);
            varint(w, c.0);
        }
    }
}

fn wait_tag(w: WaitName) -> u8 {
    match w {
        WaitName::DesiredSync => 0,
        WaitName::Restart => 1,
        WaitName::Provisioning => 2,
        WaitName::Install => 3,
    }
}

fn command_tag(c: CommandKind) -> u8 {
    match c {
        CommandKind::ApplyDesired => 0,
        CommandKind::SetConfiguration => 1,
        CommandKind::InstallApp => 2,
        CommandKind::UninstallApp => 3,
    }
}

fn alert_tag(a: &AlertKind) -> u8 {
    match a {
        AlertKind::ActorFailed => 0,
        AlertKind::DeadlineExceeded => 1,
        AlertKind::Quarantined => 2,
    }
}

/// Reads the body; `None` when it ends early or holds something impossible.
struct Reader<'a>(&'a [u8]);

impl Reader<'_> {
    fn byte(&mut self) -> Option<u8> {
        let (b, rest) = self.0.split_first()?;
        self.0 = rest;
        Some(*b)
    }

    fn varint(&mut self) -> Option<u64> {
        let mut v = 0u64;
        for shift in (0..64).step_by(7) {
            let b = self.byte()?;
            v |= u64::from(b & 0x7f) << shift;
            if b & 0x80 == 0 {
                return Some(v);
            }
        }
        None
    }

    fn len(&mut self) -> Option<usize> {
        let n = usize::try_from(self.varint()?).ok()?;
        // A length can never exceed what is left: refuse it before allocating.
        (n <= self.0.len()).then_some(n)
    }

    fn strings(&mut self) -> Option<Vec<String>> {
        let n = self.len()?;
        (0..n).map(|_| self.string()).collect()
    }

    fn string(&mut self) -> Option<String> {
        let n = self.len()?;
        let (s, rest) = self.0.split_at(n);
        self.0 = rest;
        String::from_utf8(s.to_vec()).ok()
    }

    fn object(&mut self, depth: usize) -> Option<Map<String, Value>> {
        let n = self.len()?;
        let mut m = Map::new();
        for _ in 0..n {
            let k = self.string()?;
            let v = self.value(depth + 1)?;
            m.insert(k, v);
        }
        Some(m)
    }

    fn value(&mut self, depth: usize) -> Option<Value> {
        // Documents are bounded on input (`limits::MAX_DEPTH`); a deeper one is corrupt.
        if depth > 2 * twinfleet_models::MAX_DEPTH {
            return None;
        }
        Some(match self.byte()? {
            0 => Value::Null,
            1 => Value::Bool(false),
            2 => Value::Bool(true),
            3 => Value::Number(self.varint()?.into()),
            4 => Value::Number(unzigzag(self.varint()?).into()),
            5 => {
                let (b, rest) = self.0.split_at_checked(8)?;
                self.0 = rest;
                Value::Number(Number::from_f64(f64::from_le_bytes(b.try_into().ok()?))?)
            }
            6 => Value::String(self.string()?),
            7 => {
                let n = self.len()?;
                let mut a = Vec::with_capacity(n);
                for _ in 0..n {
                    a.push(self.value(depth + 1)?);
                }
                Value::Array(a)
            }
            8 => Value::Object(self.object(depth + 1)?),
            _ => return None,
        })
    }

    fn wait_name(&mut self) -> Option<WaitName> {
        match self.byte()? {
            0 => Some(WaitName::DesiredSync),
            1 => Some(WaitName::Restart),
            2 => Some(WaitName::Provisioning),
            3 => Some(WaitName::Install),
            _ => None,
        }
    }

    fn u32(&mut self) -> Option<u32> {
        u32::try_from(self.varint()?).ok()
    }

    fn time(&mut self) -> Option<Timestamp> {
        Some(Timestamp(unzigzag(self.varint()?)))
    }

    fn dta(&mut self) -> Option<DtaId> {
        DtaId::new(self.string()?).ok()
    }

    fn event(&mut self) -> Option<TwinEvent> {
        let seq = self.varint()?;
        let at = self.time()?;
        let kind = match self.byte()? {
            0 => EventKind::Created,
            1 => EventKind::Reported { patch: self.object(0)? },
            2 => {
                let patch = self.object(0)?;
                let wait = match self.byte()? {
                    0 => None,
                    1 => {
                        let wait = self.wait_name()?;
                        let attempt = self.u32()?;
                        let deadline = self.time()?;
                        let command = match self.byte()? {
                            0 => None,
                            1 => Some(CommandId(self.varint()?)),
                            _ => return None,
                        };
                        Some(Wait { wait, attempt, deadline, command })
                    }
                    _ => return None,
                };
                EventKind::DesiredSet { patch, wait }
            }
            3 => {
                let location = match self.byte()? {
                    0 => None,
                    1 => Some(self.string()?),
                    _ => return None,
                };
                let n = self.len()?;
                let mut tags = Vec::with_capacity(n);
                for _ in 0..n {
                    tags.push(self.string()?);
                }
                let attributes = self.object(0)?;
                EventKind::MetadataUpdated { metadata: Metadata { location, tags, attributes } }
            }
            4 => EventKind::OverridesSet { patch: self.object(0)? },
            5 => EventKind::JoinedDta { dta: self.dta()? },
            6 => EventKind::LeftDta { dta: self.dta()? },
            7 => EventKind::Archived,
            8 => EventKind::Restarted { reason: self.string()?, attempt: self.u32()? },
            9 => EventKind::WaitRetried { wait: self.wait_name()?, attempt: self.u32()?, deadline: self.time()? },
            10 => EventKind::InSync,
            tag @ (11 | 14) => {
                let command_id = CommandId(self.varint()?);
                let command = match self.byte()? {
                    0 => CommandKind::ApplyDesired,
                    1 => CommandKind::SetConfiguration,
                    2 => CommandKind::InstallApp,
                    3 => CommandKind::UninstallApp,
                    _ => return None,
                };
                let body = if tag == 14 { self.object(0)? } else { Map::new() };
                EventKind::CommandSent { command_id, command, body }
            }
            12 => EventKind::CommandAcked {
                command_id: self.string()?,
                success: self.byte()? != 0,
                message: self.string()?,
            },
            13 => {
                let alert = match self.byte()? {
                    0 => AlertKind::ActorFailed,
                    1 => AlertKind::DeadlineExceeded,
                    2 => AlertKind::Quarantined,
                    _ => return None,
                };
                let message = self.string()?;
                let wait = match self.byte()? {
                    0 => None,
                    1 => Some(self.wait_name()?),
                    _ => return None,
                };
                EventKind::AlertRaised { alert, message, wait }
            }
            15 => {
                use twinfleet_models::rules::Phase;
                let rule = self.string()?;
                let phase = match self.byte()? {
                    0 => Phase::Ok,
                    1 => Phase::Pending { since: self.time()? },
                    2 => Phase::Firing { since: self.time()? },
                    3 => Phase::Clearing { since: self.time()?, clearing: self.time()? },
                    _ => return None,
                };
                EventKind::RulePhase { rule, phase }
            }
            16 => {
                let n = self.len()?;
                let mut reasons = std::collections::BTreeMap::new();
                for _ in 0..n {
                    reasons.insert(self.string()?, self.string()?);
                }
                EventKind::DesiredFailed { reasons }
            }
            17 => EventKind::DesiredCleared { keys: self.strings()? },
            18 => EventKind::DesiredTransient { keys: self.strings()? },
            20 => EventKind::InstallChanged { job: serde_json::from_value(Value::Object(self.object(0)?)).ok()? },
            19 => EventKind::TemplateApplied {
                target: self.string()?,
                version: self.u32()?,
                values: self.object(0)?.into_iter().collect(),
            },
            _ => return None,
        };
        Some(TwinEvent { seq, at, kind })
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;
    use twinfleet_runtime::encode_record;

    fn obj(v: Value) -> Map<String, Value> {
        v.as_object().cloned().unwrap()
    }

    fn every_kind() -> Vec<EventKind> {
        let wait =
            Wait { wait: WaitName::DesiredSync, attempt: 2, deadline: Timestamp(-5), command: Some(CommandId(9)) };
        vec![
            EventKind::Created,
            EventKind::Reported {
                patch: obj(json!({"a": null, "b": true, "c": false, "n": 5, "neg": -7, "f": 2.5, "s": "é",
                                  "arr": [1, [2, {"x": "y"}]], "o": {"deep": {"er": [null]}}, "big": u64::MAX, "min": i64::MIN})),
            },
            EventKind::DesiredSet { patch: obj(json!({"rate": 5})), wait: Some(wait) },
            EventKind::DesiredSet { patch: obj(json!({"rate": null})), wait: None },
            EventKind::MetadataUpdated {
                metadata: Metadata {
                    location: Some("hall 3".into()),
                    tags: vec!["a".into(), "b".into()],
                    attributes: obj(json!({"grpc_address": "127.0.0.1:1"})),
                },
            },
            EventKind::MetadataUpdated { metadata: Metadata::default() },
            EventKind::OverridesSet { patch: obj(json!({"k": [1.5]})) },
            EventKind::JoinedDta { dta: DtaId::new("ward-1").unwrap() },
            EventKind::LeftDta { dta: DtaId::new("ward-1").unwrap() },
            EventKind::Archived,
            EventKind::Restarted { reason: "boom".into(), attempt: 3 },
            EventKind::WaitRetried { wait: WaitName::DesiredSync, attempt: 1, deadline: Timestamp(1_700_000_000_000) },
            EventKind::InSync,
            EventKind::DesiredFailed { reasons: [("fw".to_string(), "no space".to_string())].into_iter().collect() },
            EventKind::DesiredCleared { keys: vec!["reboot".into(), "é".into()] },
            EventKind::DesiredTransient { keys: vec![] },
            EventKind::InstallChanged {
                job: twinfleet_models::install::InstallJob {
                    app: "blink".into(),
                    version: "1.1.0".into(),
                    artifact_url: "/api/v1/artifacts/ab".into(),
                    phase: twinfleet_models::install::InstallPhase::Installing {
                        command: CommandId(4),
                        deadline: Timestamp(99),
                    },
                    requested_at: Timestamp(7),
                    window: Some("22:00-05:00 UTC daily".into()),
                    rollout: Some("r1".into()),
                    previous: Some("1.0.0".into()),
                    progress: Some(40),
                    uninstall: false,
                },
            },
            EventKind::TemplateApplied {
                target: "config".into(),
                version: 3,
                values: [("config.site".to_string(), json!("berlin")), ("config.max".to_string(), json!(80))]
                    .into_iter()
                    .collect(),
            },
            EventKind::CommandSent {
                command_id: CommandId(u64::MAX),
                command: CommandKind::InstallApp,
                body: Map::new(),
            },
            EventKind::CommandSent {
                command_id: CommandId(3),
                command: CommandKind::SetConfiguration,
                body: serde_json::from_value(serde_json::json!({"rate": 5, "mode": "eco"})).unwrap(),
            },
            EventKind::CommandAcked { command_id: "17".into(), success: true, message: "ok".into() },
            EventKind::AlertRaised {
                alert: AlertKind::DeadlineExceeded,
                message: "late".into(),
                wait: Some(WaitName::DesiredSync),
            },
            EventKind::AlertRaised { alert: AlertKind::Quarantined, message: String::new(), wait: None },
            EventKind::RulePhase { rule: "hot".into(), phase: twinfleet_models::rules::Phase::Ok },
            EventKind::RulePhase {
                rule: "hot".into(),
                phase: twinfleet_models::rules::Phase::Pending { since: Timestamp(-5) },
            },
            EventKind::RulePhase {
                rule: "offline".into(),
                phase: twinfleet_models::rules::Phase::Firing { since: Timestamp(1_700_000_000_000) },
            },
            EventKind::RulePhase {
                rule: "x".into(),
                phase: twinfleet_models::rules::Phase::Clearing { since: Timestamp(1), clearing: Timestamp(2) },
            },
        ]
    }

    #[test]
    fn every_event_kind_round_trips() {
        for (i, kind) in every_kind().into_iter().enumerate() {
            let e = TwinEvent { seq: i as u64 + 1, at: Timestamp(1_700_000_000_000 + i as i64), kind };
            let bytes = encode_event(&e);
            assert_eq!(decode_event(&bytes).unwrap(), e);
        }
    }

    #[test]
    fn the_binary_form_is_small_and_the_json_form_still_reads() {
        let e = TwinEvent {
            seq: 42,
            at: Timestamp(1_700_000_000_000),
            kind: EventKind::DesiredSet { patch: obj(json!({"rate": 5})), wait: None },
        };
        let bin = encode_event(&e);
        let json = encode_record(&e);
        assert!(bin.len() * 3 < json.len(), "{} vs {} bytes", bin.len(), json.len());
        assert_eq!(decode_event(&json).unwrap(), e);
    }

    #[test]
    fn damage_is_detected_not_misread() {
        let e = TwinEvent { seq: 1, at: Timestamp(1), kind: EventKind::Reported { patch: obj(json!({"a": "b"})) } };
        let mut bytes = encode_event(&e);
        let last = bytes.len() - 1;
        bytes[last] ^= 0xff;
        assert!(matches!(decode_event(&bytes), Err(CodecError::Checksum { .. })));
        assert!(decode_event(&bytes[..3]).is_err());
        // A body with a huge length prefix is refused before allocating.
        let mut body = vec![1u8, 1, 1, 0xff, 0xff, 0xff, 0xff, 0x0f];
        let mut forged = vec![FORMAT_BINARY_EVENT];
        forged.extend_from_slice(&crc32fast::hash(&body).to_le_bytes());
        forged.append(&mut body);
        assert!(decode_event(&forged).is_err());
    }

    #[test]
    fn a_chunk_holds_the_events_of_an_interval_and_a_page_item_names_its_twin() {
        let events: Vec<TwinEvent> =
            (1..=3).map(|seq| TwinEvent { seq, at: Timestamp(seq as i64 * 10), kind: EventKind::Archived }).collect();
        let mut chunk = Chunk::new(1);
        for e in &events {
            chunk.push(e.seq, &encode_event(e));
        }
        assert_eq!(chunk.events, 3);
        assert_eq!(decode_journal(&chunk.record()).unwrap(), events);
        assert_eq!(decode_journal(&encode_event(&events[0])).unwrap(), vec![events[0].clone()], "one event");
        let item = page_item("twin-1", &encode_event(&events[1]));
        let (id, e) = split_page_item(&item).unwrap();
        assert_eq!((id, decode_event(e).unwrap()), ("twin-1", events[1].clone()));
        // A stored part: the good item, then one too short to name its twin, then a
        // good one that is no longer read.
        let mut part = Vec::new();
        for it in [&item[..], &[7u8][..], &item[..]] {
            part.extend_from_slice(&(it.len() as u32).to_le_bytes());
            part.extend_from_slice(it);
        }
        let read: Vec<_> = page_events(&part).collect();
        assert_eq!(read.len(), 2, "stops at the item that does not parse");
        assert_eq!(read[0].as_ref().unwrap().0, "twin-1");
        assert!(read[1].is_err());
        let mut cut = Chunk::new(1);
        cut.push(1, &encode_event(&events[0]));
        let mut bytes = cut.record();
        bytes.truncate(bytes.len() - 1);
        assert!(decode_journal(&bytes).is_err(), "a cut chunk is an error, not fewer events");

        // Many events are stored in parts of bounded size, each starting at its first seq.
        let many: Vec<TwinEvent> =
            (1..=1000).map(|seq| TwinEvent { seq, at: Timestamp(seq as i64), kind: EventKind::Archived }).collect();
        let (mut a, mut b) = (Chunk::new(1), Chunk::new(501));
        for e in &many {
            if e.seq <= 500 { a.push(e.seq, &encode_event(e)) } else { b.push(e.seq, &encode_event(e)) }
        }
        let records = a.joined(b).records();
        assert!(records.len() > 2 && records.iter().all(|(_, r)| r.len() <= CHUNK_PART_BYTES + 1));
        let mut seen = Vec::new();
        for (first, r) in &records {
            let events = decode_journal(r).unwrap();
            assert_eq!(events[0].seq, *first);
            seen.extend(events);
        }
        assert_eq!(seen, many);
    }
}
