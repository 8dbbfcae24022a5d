//! The configuration directory: per device type, versioned configuration templates that
//! each twin fills in for its device (Maree et al. 2024, 4.4.2: "the device
//! configuration directory holds templates"). Pure: parsing and checking a template,
//! rendering it from a twin's identity, metadata and effective configuration (TDTA
//! defaults < DTA layers < the twin's overrides), and recording which values produced
//! the result.
//!
//! **Placeholders** are `{{ path }}` or `{{ path | default }}` inside JSON strings, where
//! `default` is a JSON value (`{{ config.port | 8883 }}`, `{{ metadata.location | "?" }}`).
//! A string that is exactly one placeholder takes the value's own JSON type (a number
//! stays a number, an object an object); a placeholder inside longer text is written as
//! text. Paths: `twin.id`, `identity.serial`, `identity.mac`, `identity.model`,
//! `identity.device_type`, `metadata.location`, `metadata.tags`,
//! `metadata.attributes.<key>...`, `config.<key>...`. A placeholder that resolves to
//! nothing and has no default is an error naming it; so is an unknown root, found when
//! the template is stored.

use crate::time::Timestamp;
use serde::{Deserialize, Serialize};
use serde_json::{Map, Value};
use std::collections::BTreeMap;

/// The desired-state key a template fills when none is given.
pub const DEFAULT_TARGET: &str = "config";
/// The most bytes of a template's body.
pub const MAX_TEMPLATE_BYTES: usize = 64 * 1024;

/// One version of a device type's configuration template.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[cfg_attr(feature = "openapi", derive(utoipa::ToSchema))]
pub struct ConfigTemplate {
    pub device_type: String,
    /// 1, 2, ... per device type.
    pub version: u32,
    /// The top-level key of the desired state it fills.
    pub target: String,
    /// The JSON document with placeholders.
    #[cfg_attr(feature = "openapi", schema(value_type = Object))]
    pub body: Value,
    #[serde(default, skip_serializing_if = "String::is_empty")]
    pub comment: String,
    #[cfg_attr(feature = "openapi", schema(value_type = i64))]
    pub created_at: Timestamp,
}

/// What a template is filled from: a twin's identity, metadata and effective
/// configuration.
#[derive(Debug, Clone, Copy)]
pub struct RenderContext<'a> {
    pub twin: &'a str,
    pub serial: &'a str,
    pub mac: &'a str,
    pub model: &'a str,
    pub device_type: &'a str,
    pub location: Option<&'a str>,
    pub tags: &'a [String],
    pub attributes: &'a Map<String, Value>,
    /// The twin's effective configuration.
    pub config: &'a Map<String, Value>,
}

/// Which template version and which values produced a twin's configuration.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[cfg_attr(feature = "openapi", derive(utoipa::ToSchema))]
pub struct AppliedTemplate {
    pub version: u32,
    /// Each placeholder's path and the value it was filled with.
    #[cfg_attr(feature = "openapi", schema(value_type = Object))]
    pub values: BTreeMap<String, Value>,
}

/// A template that cannot be stored or rendered, and why.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum TemplateError {
    #[error("placeholder {0:?} is malformed: {1}")]
    Malformed(String, String),
    #[error(
        "placeholder {0:?}: unknown path (use twin.id, identity.serial|mac|model|device_type, metadata.location|tags|attributes.<key>, config.<key>)"
    )]
    UnknownPath(String),
    #[error("placeholder {0:?} has no value for this twin and no default (write {{{{ {0} | <default> }}}})")]
    Missing(String),
    #[error("the template target {0:?} must be a non-empty key without '.' or '/'")]
    BadTarget(String),
    #[error("the template body is {0} bytes; at most {MAX_TEMPLATE_BYTES}")]
    TooLarge(usize),
    #[error("the template body must be a JSON object, not {0}")]
    NotAnObject(&'static str),
}

/// One `{{ path | default }}`.
#[derive(Debug, Clone, PartialEq)]
struct Placeholder {
    path: String,
    default: Option<Value>,
}

/// Checks a template before it is stored: its target, size and every placeholder.
pub fn validate(target: &str, body: &Value) -> Result<(), TemplateError> {
    if target.is_empty() || target.contains(['.', '/']) || target.len() > 128 {
        return Err(TemplateError::BadTarget(target.into()));
    }
    // An object, like the configuration it fills (a `null` body would even delete the
    // target key: in a merge patch, null means remove).
    let kind = match body {
        Value::Object(_) => None,
        Value::Null => Some("null"),
        Value::Bool(_) => Some("a boolean"),
        Value::Number(_) => Some("a number"),
        Value::String(_) => Some("a string"),
        Value::Array(_) => Some("an array"),
    };
    if let Some(kind) = kind {
        return Err(TemplateError::NotAnObject(kind));
    }
    let size = serde_json::to_vec(body).map(|b| b.len()).unwrap_or(usize::MAX);
    if size > MAX_TEMPLATE_BYTES {
        return Err(TemplateError::TooLarge(size));
    }
    crate::limits::check_value(body).map_err(|e| TemplateError::Malformed(String::new(), e.to_string()))?;
    strings(body, &mut |s| scan(s)?.iter().try_for_each(|(_, _, p)| known_root(&p.path)))
}

/// Fills `body` for one twin: the rendered document and each placeholder's value.
pub fn render(body: &Value, ctx: &RenderContext<'_>) -> Result<(Value, BTreeMap<String, Value>), TemplateError> {
    let mut used = BTreeMap::new();
    let v = fill(body, ctx, &mut used)?;
    Ok((v, used))
}

fn fill(v: &Value, ctx: &RenderContext<'_>, used: &mut BTreeMap<String, Value>) -> Result<Value, TemplateError> {
    Ok(match v {
        Value::String(s) => {
            let found = scan(s)?;
            if found.is_empty() {
                return Ok(v.clone());
            }
            // Exactly one placeholder and nothing else: the value keeps its type.
            if found.len() == 1 && found[0].0 == 0 && found[0].1 == s.len() {
                let value = resolve(&found[0].2, ctx)?;
                used.insert(found[0].2.path.clone(), value.clone());
                return Ok(value);
            }
            let mut out = String::with_capacity(s.len());
            let mut at = 0;
            for (start, end, p) in found {
                out.push_str(&s[at..start]);
                let value = resolve(&p, ctx)?;
                match &value {
                    Value::String(t) => out.push_str(t),
                    other => out.push_str(&other.to_string()),
                }
                used.insert(p.path, value);
                at = end;
            }
            out.push_str(&s[at..]);
            Value::String(out)
        }
        Value::Array(a) => Value::Array(a.iter().map(|x| fill(x, ctx, used)).collect::<Result<_, _>>()?),
        Value::Object(m) => Value::Object(
            m.iter()
                .map(|(k, x)| Ok((k.clone(), fill(x, ctx, used)?)))
                .collect::<Result<Map<_, _>, TemplateError>>()?,
        ),
        other => other.clone(),
    })
}

/// Calls `f` on every string of `v`.
fn strings(v: &Value, f: &mut impl FnMut(&str) -> Result<(), TemplateError>) -> Result<(), TemplateError> {
    match v {
        Value::String(s) => f(s),
        Value::Array(a) => a.iter().try_for_each(|x| strings(x, f)),
        Value::Object(m) => m.values().try_for_each(|x| strings(x, f)),
        _ => Ok(()),
    }
}

/// The placeholders of `s`: (start, end, placeholder), in order.
fn scan(s: &str) -> Result<Vec<(usize, usize, Placeholder)>, TemplateError> {
    let mut out = Vec::new();
    let mut from = 0;
    while let Some(i) = s[from..].find("{{") {
        let start = from + i;
        let Some(j) = s[start + 2..].find("}}") else {
            return Err(TemplateError::Malformed(s[start..].chars().take(60).collect(), "no closing }}".into()));
        };
        let end = start + 2 + j + 2;
        let inner = s[start + 2..end - 2].trim();
        let (path, default) = match inner.split_once('|') {
            None => (inner.trim(), None),
            Some((p, d)) => {
                let d: Value = serde_json::from_str(d.trim()).map_err(|e| {
                    TemplateError::Malformed(inner.into(), format!("the default must be a JSON value ({e})"))
                })?;
                (p.trim(), Some(d))
            }
        };
        if path.is_empty() || !path.split('.').all(|seg| !seg.is_empty()) {
            return Err(TemplateError::Malformed(inner.into(), "empty path or path segment".into()));
        }
        out.push((start, end, Placeholder { path: path.to_string(), default }));
        from = end;
    }
    Ok(out)
}

fn known_root(path: &str) -> Result<(), TemplateError> {
    let ok = matches!(
        path,
        "twin.id"
            | "identity.serial"
            | "identity.mac"
            | "identity.model"
            | "identity.device_type"
            | "metadata.location"
            | "metadata.tags"
    ) || path.starts_with("metadata.attributes.")
        || path.starts_with("config.");
    if ok { Ok(()) } else { Err(TemplateError::UnknownPath(path.into())) }
}

fn resolve(p: &Placeholder, ctx: &RenderContext<'_>) -> Result<Value, TemplateError> {
    known_root(&p.path)?;
    let text = |s: &str| (!s.is_empty()).then(|| Value::String(s.to_string()));
    let found = match p.path.as_str() {
        "twin.id" => text(ctx.twin),
        "identity.serial" => text(ctx.serial),
        "identity.mac" => text(ctx.mac),
        "identity.model" => text(ctx.model),
        "identity.device_type" => text(ctx.device_type),
        "metadata.location" => ctx.location.and_then(text),
        "metadata.tags" => Some(Value::from(ctx.tags.to_vec())),
        path => {
            let (map, rest) = match path.strip_prefix("config.") {
                Some(rest) => (ctx.config, rest),
                None => (ctx.attributes, path.strip_prefix("metadata.attributes.").unwrap_or(path)),
            };
            let mut segs = rest.split('.');
            let first = segs.next().and_then(|k| map.get(k));
            segs.try_fold(first, |v, k| Some(v.and_then(|v| v.get(k)))).flatten().filter(|v| !v.is_null()).cloned()
        }
    };
    found.or_else(|| p.default.clone()).ok_or_else(|| TemplateError::Missing(p.path.clone()))
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    fn context<'a>(
        tags: &'a [String],
        config: &'a Map<String, Value>,
        attrs: &'a Map<String, Value>,
    ) -> RenderContext<'a> {
        RenderContext {
            twin: "v-1",
            serial: "SN42",
            mac: "02:00:00:00:00:01",
            model: "V-2",
            device_type: "valve",
            location: None,
            tags,
            attributes: attrs,
            config,
        }
    }

    #[test]
    fn a_template_fills_from_identity_metadata_and_layers_keeping_types() {
        let body = json!({
            "name": "{{twin.id}}-{{ identity.serial }}",
            "site": "{{config.site}}",
            "limits": {"max": "{{ config.limits.max }}", "min": "{{ config.limits.min | 0 }}"},
            "broker": "mqtt://{{ config.gateway }}:{{ config.port | 1883 }}",
            "where": "{{ metadata.location | \"unknown\" }}",
            "tags": "{{metadata.tags}}",
            "fixed": [1, "two"],
        });
        validate("config", &body).unwrap();
        let (tags, attrs) = (vec!["a".to_string()], Map::new());
        let config = json!({"site": "berlin", "gateway": "gw-2", "limits": {"max": 80}}).as_object().cloned().unwrap();
        let ctx = context(&tags, &config, &attrs);
        let (out, used) = render(&body, &ctx).unwrap();
        assert_eq!(
            out,
            json!({
                "name": "v-1-SN42", "site": "berlin", "limits": {"max": 80, "min": 0},
                "broker": "mqtt://gw-2:1883", "where": "unknown", "tags": ["a"], "fixed": [1, "two"],
            })
        );
        assert_eq!(used["config.limits.max"], json!(80));
        assert_eq!(used["config.port"], json!(1883), "a default used is recorded too");
        assert_eq!(used.len(), 9);
    }

    #[test]
    fn bad_templates_and_missing_values_are_named() {
        assert!(
            matches!(validate("config", &json!({"a": "{{ secret.key }}"})), Err(TemplateError::UnknownPath(p)) if p == "secret.key")
        );
        assert!(matches!(validate("config", &json!({"a": "{{ config.x"})), Err(TemplateError::Malformed(..))));
        assert!(matches!(
            validate("config", &json!({"a": "{{ config.x | nope }}"})),
            Err(TemplateError::Malformed(..))
        ));
        assert!(matches!(validate("a.b", &json!({})), Err(TemplateError::BadTarget(_))));
        assert_eq!(validate("config", &json!(null)), Err(TemplateError::NotAnObject("null")));
        assert_eq!(validate("config", &json!(["{{ twin.id }}"])), Err(TemplateError::NotAnObject("an array")));
        let (tags, config, attrs) = (Vec::new(), Map::new(), Map::new());
        let ctx = context(&tags, &config, &attrs);
        let e = render(&json!({"a": "{{ config.site }}"}), &ctx).unwrap_err();
        assert_eq!(e, TemplateError::Missing("config.site".into()));
        assert!(e.to_string().contains("config.site"));
    }
}
