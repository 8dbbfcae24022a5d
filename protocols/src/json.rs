//! JSON objects ↔ `google.protobuf.Struct`, at the edge. Numbers that JSON cannot hold
//! (NaN, infinities) are an error, not a silent null.

use prost_types::{ListValue, Struct, Value, value::Kind};
use serde_json::{Map, Number, Value as Json};

pub fn struct_to_json(s: &Struct) -> Result<Map<String, Json>, String> {
    s.fields.iter().map(|(k, v)| Ok((k.clone(), value_to_json(v, k)?))).collect()
}

fn value_to_json(v: &Value, path: &str) -> Result<Json, String> {
    Ok(match &v.kind {
        None | Some(Kind::NullValue(_)) => Json::Null,
        Some(Kind::BoolValue(b)) => Json::Bool(*b),
        Some(Kind::StringValue(s)) => Json::String(s.clone()),
        // Struct has only doubles; an integral one is an integer in JSON (as in the
        // protobuf JSON mapping), so that `5` sent over gRPC equals `5` sent over MQTT.
        Some(Kind::NumberValue(n)) if n.fract() == 0.0 && n.abs() < 9_007_199_254_740_992.0 => Json::from(*n as i64),
        Some(Kind::NumberValue(n)) => {
            Json::Number(Number::from_f64(*n).ok_or_else(|| format!("{path}: {n} is not a finite number"))?)
        }
        Some(Kind::StructValue(s)) => Json::Object(
            s.fields
                .iter()
                .map(|(k, v)| Ok((k.clone(), value_to_json(v, &format!("{path}.{k}"))?)))
                .collect::<Result<_, String>>()?,
        ),
        Some(Kind::ListValue(l)) => Json::Array(
            l.values
                .iter()
                .enumerate()
                .map(|(i, v)| value_to_json(v, &format!("{path}[{i}]")))
                .collect::<Result<_, _>>()?,
        ),
    })
}

pub fn json_to_struct(m: &Map<String, Json>) -> Struct {
    Struct { fields: m.iter().map(|(k, v)| (k.clone(), json_to_value(v))).collect() }
}

fn json_to_value(v: &Json) -> Value {
    let kind = match v {
        Json::Null => Kind::NullValue(0),
        Json::Bool(b) => Kind::BoolValue(*b),
        Json::Number(n) => Kind::NumberValue(n.as_f64().unwrap_or(f64::NAN)),
        Json::String(s) => Kind::StringValue(s.clone()),
        Json::Array(a) => Kind::ListValue(ListValue { values: a.iter().map(json_to_value).collect() }),
        Json::Object(o) => Kind::StructValue(json_to_struct(o)),
    };
    Value { kind: Some(kind) }
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    #[test]
    fn roundtrip_and_non_finite_numbers_are_refused() {
        let v = json!({"a": 1.5, "b": [true, null, "x"], "c": {"d": -2}});
        let s = json_to_struct(v.as_object().unwrap());
        assert_eq!(Json::Object(struct_to_json(&s).unwrap()), v);
        let mut bad = s.clone();
        bad.fields.insert("n".into(), Value { kind: Some(Kind::NumberValue(f64::NAN)) });
        assert!(struct_to_json(&bad).unwrap_err().contains("n: NaN"));
    }
}
