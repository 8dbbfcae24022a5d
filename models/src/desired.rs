//! Desired state reconciled per key: what the device still lacks (the *delta* of the
//! desired state against the reported one), and where each top-level key of the desired
//! state stands (in sync, pending with its attempt and deadline, failed with the
//! device's reason). Pure; the twin's step function (`TwinState::decide`) sends only the
//! delta, and the view is what `GET /api/v1/twins/{id}/delta` shows.

use crate::time::Timestamp;
use serde::{Deserialize, Serialize};
use serde_json::{Map, Value};

/// What of `desired` the device does not report yet: every key whose reported value
/// differs, recursing into objects so that only the differing leaves are sent. Numbers
/// compare by value (`5` and `5.0` match).
pub fn delta(desired: &Map<String, Value>, reported: &Map<String, Value>) -> Map<String, Value> {
    let mut out = Map::new();
    for (k, want) in desired {
        match (reported.get(k), want) {
            (Some(Value::Object(have)), Value::Object(want)) => {
                let d = delta(want, have);
                if !d.is_empty() {
                    out.insert(k.clone(), Value::Object(d));
                }
            }
            (Some(have), want) if same(have, want) => {}
            _ => {
                out.insert(k.clone(), want.clone());
            }
        }
    }
    out
}

/// True when every key of `wanted` has the same value in `have` (recursively for
/// objects).
pub fn covers(have: &Map<String, Value>, wanted: &Map<String, Value>) -> bool {
    wanted.iter().all(|(k, w)| have.get(k).is_some_and(|h| same(h, w)))
}

/// Whether a reported value `h` is the desired `w` (objects: `h` has at least `w`'s keys
/// with the same values).
pub fn same(h: &Value, w: &Value) -> bool {
    match (h, w) {
        (Value::Object(h), Value::Object(w)) => covers(h, w),
        (Value::Number(h), Value::Number(w)) => h.as_f64() == w.as_f64(),
        (Value::Array(h), Value::Array(w)) => h.len() == w.len() && h.iter().zip(w).all(|(h, w)| same(h, w)),
        (h, w) => h == w,
    }
}

/// Where one top-level key of the desired state stands.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[cfg_attr(feature = "openapi", derive(utoipa::ToSchema))]
#[serde(tag = "state", rename_all = "snake_case")]
pub enum KeyState {
    /// The device reports the desired value.
    InSync,
    /// Sent (or to be sent) and awaited: `attempt` 0 is the first delivery; `deadline`
    /// is when the twin sends it again (or gives up).
    Pending {
        #[serde(default, skip_serializing_if = "Option::is_none")]
        attempt: Option<u32>,
        #[serde(default, skip_serializing_if = "Option::is_none")]
        #[cfg_attr(feature = "openapi", schema(value_type = Option<i64>))]
        deadline: Option<Timestamp>,
    },
    /// The device refused it (its reason) or did not report it after every retry.
    Failed { reason: String },
}

/// One key of the desired state with its status.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[cfg_attr(feature = "openapi", derive(utoipa::ToSchema))]
pub struct KeyStatus {
    #[serde(flatten)]
    pub state: KeyState,
    /// Any JSON value (a desired key need not hold an object).
    pub desired: Value,
    /// What the device reports for it (absent: nothing).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub reported: Option<Value>,
    /// The key is removed from the desired state once the device reports it.
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    pub clear_on_sync: bool,
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    fn obj(v: Value) -> Map<String, Value> {
        v.as_object().cloned().unwrap()
    }

    #[test]
    fn the_delta_holds_only_what_differs_down_to_the_leaves() {
        let desired = obj(json!({"rate": 5, "net": {"ssid": "lab", "channel": 6}, "mode": "eco", "list": [1, 2]}));
        let reported = obj(json!({"rate": 5.0, "net": {"ssid": "lab", "channel": 1}, "list": [1], "extra": true}));
        assert_eq!(delta(&desired, &reported), obj(json!({"net": {"channel": 6}, "mode": "eco", "list": [1, 2]})));
        assert!(delta(&desired, &desired).is_empty());
        assert_eq!(delta(&obj(json!({"a": {"b": 1}})), &obj(json!({"a": 3}))), obj(json!({"a": {"b": 1}})));
    }
}
