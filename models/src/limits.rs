//! The bounds of every JSON document twinfleet accepts, over HTTP, MQTT and gRPC alike:
//! at most [`MAX_DEPTH`] levels of nesting and [`MAX_DOCUMENT_BYTES`] of encoded JSON.
//!
//! Why depth matters: a stored record wraps the document in a few more levels (the
//! twin's state, the journal event), and the JSON reader refuses to go deeper than 128
//! levels. A document accepted near that limit could be written but never read back, and
//! the twin would be quarantined at the next start. Checking on input, with a bound far
//! below the reader's, keeps every accepted document readable.

use serde_json::{Map, Value};

/// The deepest nesting of objects and arrays a document may have (the document itself
/// is level 1: `{"a": 1}` has depth 1, `{"a": {"b": [1]}}` depth 3).
pub const MAX_DEPTH: usize = 32;

/// The largest encoded size of one document (a patch, a layer, a batch of defaults).
pub const MAX_DOCUMENT_BYTES: usize = 256 * 1024;

/// Why a document is refused.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum DocumentError {
    #[error("the JSON document is nested deeper than {MAX_DEPTH} levels")]
    TooDeep,
    #[error("the JSON document is larger than {MAX_DOCUMENT_BYTES} bytes encoded")]
    TooLarge,
}

impl DocumentError {
    /// The reason under which edges count it.
    pub fn reason(&self) -> &'static str {
        match self {
            DocumentError::TooDeep => "too_deep",
            DocumentError::TooLarge => "oversized",
        }
    }
}

/// Checks a JSON object against both bounds in one walk that stops at the first excess.
pub fn check_object(doc: &Map<String, Value>) -> Result<(), DocumentError> {
    let mut budget = MAX_DOCUMENT_BYTES as isize;
    walk_object(doc, 1, &mut budget)
}

/// Like [`check_object`], for any JSON value (a scalar has depth 0).
pub fn check_value(v: &Value) -> Result<(), DocumentError> {
    let mut budget = MAX_DOCUMENT_BYTES as isize;
    walk(v, 0, &mut budget)
}

fn walk_object(m: &Map<String, Value>, depth: usize, budget: &mut isize) -> Result<(), DocumentError> {
    if depth > MAX_DEPTH {
        return Err(DocumentError::TooDeep);
    }
    *budget -= 2;
    for (k, v) in m {
        // "key": plus a comma.
        *budget -= k.len() as isize + 4;
        walk(v, depth, budget)?;
    }
    if *budget < 0 { Err(DocumentError::TooLarge) } else { Ok(()) }
}

fn walk(v: &Value, depth: usize, budget: &mut isize) -> Result<(), DocumentError> {
    match v {
        Value::Object(m) => walk_object(m, depth + 1, budget),
        Value::Array(a) => {
            if depth + 1 > MAX_DEPTH {
                return Err(DocumentError::TooDeep);
            }
            *budget -= 2;
            for x in a {
                *budget -= 1;
                walk(x, depth + 1, budget)?;
            }
            if *budget < 0 { Err(DocumentError::TooLarge) } else { Ok(()) }
        }
        // Escapes can make a string longer; its length is the floor of its encoding.
        Value::String(s) => {
            *budget -= s.len() as isize + 2;
            if *budget < 0 { Err(DocumentError::TooLarge) } else { Ok(()) }
        }
        Value::Number(_) => {
            *budget -= 8;
            Ok(())
        }
        Value::Bool(_) | Value::Null => {
            *budget -= 5;
            Ok(())
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    fn nested(levels: usize) -> Value {
        let mut v = json!(1);
        for i in 0..levels {
            v = if i % 2 == 0 { json!({ "a": v }) } else { json!([v]) };
        }
        v
    }

    #[test]
    fn depth_is_counted_in_objects_and_arrays() {
        assert_eq!(check_value(&json!(1)), Ok(()));
        assert_eq!(check_value(&nested(MAX_DEPTH)), Ok(()));
        assert_eq!(check_value(&nested(MAX_DEPTH + 1)), Err(DocumentError::TooDeep));
        let obj = nested(MAX_DEPTH + 1);
        assert_eq!(check_object(obj.as_object().unwrap()), Err(DocumentError::TooDeep));
        assert_eq!(check_object(json!({"a": {"b": [1]}}).as_object().unwrap()), Ok(()));
    }

    #[test]
    fn size_counts_the_encoding_roughly_from_below() {
        let big = json!({"blob": "x".repeat(MAX_DOCUMENT_BYTES)});
        assert_eq!(check_object(big.as_object().unwrap()), Err(DocumentError::TooLarge));
        let many: Map<String, Value> = (0..10_000).map(|i| (format!("k{i:05}"), json!(i))).collect();
        assert!(serde_json::to_vec(&many).unwrap().len() < MAX_DOCUMENT_BYTES);
        assert_eq!(check_object(&many), Ok(()));
        let too_many: Map<String, Value> = (0..40_000).map(|i| (format!("k{i:05}"), json!(true))).collect();
        assert_eq!(check_object(&too_many), Err(DocumentError::TooLarge));
    }

    #[test]
    fn an_accepted_document_reads_back_inside_two_more_levels_of_wrapping() {
        let deepest = nested(MAX_DEPTH);
        let record = json!({"state": {"reported": {"x": deepest}}});
        let text = serde_json::to_string(&record).unwrap();
        assert!(serde_json::from_str::<Value>(&text).is_ok());
    }
}
