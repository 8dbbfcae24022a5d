//! Configuration layering: the effective configuration of a DTI is its TDTA's defaults,
//! overridden by the layers of every DTA it belongs to (directly or through nesting), in
//! order of priority, overridden by the DTI's own overrides.
//!
//! Layers merge as JSON merge patches (RFC 7386): objects merge key by key, any other
//! value replaces, and `null` removes a key. Ties in priority are broken by DTA id and
//! layer name, so the result never depends on the order in which memberships were made.

use crate::ids::DtaId;
use serde::{Deserialize, Serialize};
use serde_json::{Map, Value};
use std::collections::BTreeMap;
use std::sync::Arc;

/// One named layer of configuration held by a DTA.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[cfg_attr(feature = "openapi", derive(utoipa::ToSchema))]
pub struct ConfigLayer {
    /// Higher priorities win over lower ones.
    pub priority: i32,
    #[cfg_attr(feature = "openapi", schema(value_type = Object))]
    pub values: Map<String, Value>,
}

/// A layer as a DTI sees it: which DTA it comes from, under which name, shared by
/// reference among all the members of that DTA.
#[derive(Debug, Clone, PartialEq)]
pub struct LayerRef {
    pub dta: DtaId,
    pub name: Arc<str>,
    pub priority: i32,
    pub values: Arc<Map<String, Value>>,
}

/// Where an effective value came from.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(tag = "kind", rename_all = "snake_case")]
pub enum LayerSource {
    TypeDefaults,
    Dta { dta: DtaId, layer: String, priority: i32 },
    TwinOverride,
}

/// The merged configuration and, for each top-level key, the layer that set it last.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct EffectiveConfig {
    pub values: Map<String, Value>,
    pub sources: BTreeMap<String, LayerSource>,
}

/// Applies `patch` to `target` as an RFC 7386 JSON merge patch.
pub fn merge_patch(target: &mut Map<String, Value>, patch: &Map<String, Value>) {
    for (k, v) in patch {
        match v {
            Value::Null => {
                target.remove(k);
            }
            Value::Object(p) => {
                let slot = target.entry(k.clone()).or_insert_with(|| Value::Object(Map::new()));
                if !slot.is_object() {
                    *slot = Value::Object(Map::new());
                }
                if let Value::Object(t) = slot {
                    merge_patch(t, p);
                }
            }
            other => {
                target.insert(k.clone(), other.clone());
            }
        }
    }
}

/// Computes the effective configuration. `layers` may contain the same layer more than
/// once (a DTI reaching one DTA through two paths); duplicates count once.
pub fn effective_config<'a>(
    defaults: &Map<String, Value>,
    layers: impl IntoIterator<Item = &'a LayerRef>,
    overrides: &Map<String, Value>,
) -> EffectiveConfig {
    let mut ordered: Vec<&LayerRef> = layers.into_iter().collect();
    ordered.sort_by(|a, b| (a.priority, &a.dta, &a.name).cmp(&(b.priority, &b.dta, &b.name)));
    ordered.dedup_by(|a, b| a.dta == b.dta && a.name == b.name);

    let mut values = Map::new();
    let mut sources = BTreeMap::new();
    let mut apply = |patch: &Map<String, Value>, source: LayerSource| {
        merge_patch(&mut values, patch);
        for k in patch.keys() {
            sources.insert(k.clone(), source.clone());
        }
    };
    apply(defaults, LayerSource::TypeDefaults);
    for l in ordered {
        apply(&l.values, LayerSource::Dta { dta: l.dta.clone(), layer: l.name.to_string(), priority: l.priority });
    }
    apply(overrides, LayerSource::TwinOverride);
    sources.retain(|k, _| values.contains_key(k));
    EffectiveConfig { values, sources }
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    fn obj(v: Value) -> Map<String, Value> {
        v.as_object().cloned().unwrap()
    }

    fn layer(dta: &str, name: &str, priority: i32, v: Value) -> LayerRef {
        LayerRef { dta: DtaId::new(dta).unwrap(), name: Arc::from(name), priority, values: Arc::new(obj(v)) }
    }

    #[test]
    fn merge_patch_follows_rfc7386() {
        let mut t = obj(json!({"a": 1, "b": {"c": 2, "d": 3}, "e": [1]}));
        merge_patch(&mut t, &obj(json!({"a": null, "b": {"c": 9}, "e": [2], "f": {"g": 1}})));
        assert_eq!(Value::Object(t), json!({"b": {"c": 9, "d": 3}, "e": [2], "f": {"g": 1}}));
    }

    #[test]
    fn defaults_then_layers_by_priority_then_overrides() {
        let defaults = obj(json!({"interval": 60, "window": "none", "units": "metric"}));
        let building = layer("building-7", "maintenance", 10, json!({"window": "02:00-04:00", "interval": 30}));
        let floor = layer("floor-2", "tuning", 20, json!({"interval": 15}));
        let overrides = obj(json!({"units": "imperial"}));
        // Order of the input does not matter; duplicates count once.
        let eff = effective_config(&defaults, [&floor, &building, &floor], &overrides);
        assert_eq!(
            Value::Object(eff.values.clone()),
            json!({"interval": 15, "window": "02:00-04:00", "units": "imperial"})
        );
        assert_eq!(
            eff.sources["interval"],
            LayerSource::Dta { dta: DtaId::new("floor-2").unwrap(), layer: "tuning".into(), priority: 20 }
        );
        assert_eq!(eff.sources["units"], LayerSource::TwinOverride);
    }
}
