//! Domain models of device types (Sartaj et al. 2023): classes with typed properties,
//! parts (associations, single or many), enumerations and constraints, loaded from a
//! model file as data. A twin's *components* are a JSON document rooted at the model's
//! root class; every write is checked here against the whole model, and a violation
//! names the property, the rule and the value.
//!
//! Paths address a component: `settings/alarm`, `medication_plans/0/intake_times/1`
//! (a list element by index), `device/status` (a property).

use serde::{Deserialize, Serialize};
use serde_json::{Map, Value};
use std::collections::BTreeMap;

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct DomainModel {
    /// The class of the whole document.
    pub root: String,
    pub classes: BTreeMap<String, Class>,
    #[serde(default)]
    pub enums: BTreeMap<String, Vec<String>>,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Class {
    #[serde(default)]
    pub properties: BTreeMap<String, Property>,
    #[serde(default)]
    pub parts: BTreeMap<String, Part>,
    /// Rules across properties of one instance.
    #[serde(default)]
    pub rules: Vec<Rule>,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Property {
    #[serde(rename = "type")]
    pub ty: PropType,
    #[serde(default)]
    pub required: bool,
    /// Inclusive bounds, for numbers.
    pub min: Option<f64>,
    pub max: Option<f64>,
    /// For `enum` properties: the enumeration's name in `enums`.
    #[serde(rename = "enum")]
    pub enumeration: Option<String>,
    /// For strings: the longest allowed.
    pub max_length: Option<usize>,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum PropType {
    Integer,
    Number,
    Boolean,
    String,
    /// `YYYY-MM-DD`, a real calendar date.
    Date,
    /// `HH:MM` or `HH:MM:SS` (24 h).
    Time,
    Enum,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Part {
    pub class: String,
    /// A list of instances (POST appends, DELETE removes one) instead of one.
    #[serde(default)]
    pub many: bool,
    #[serde(default)]
    pub required: bool,
    /// For lists: the fewest elements allowed (checked whenever the list is present;
    /// `required` says whether it must be).
    pub min_items: Option<usize>,
    /// For lists: the most elements allowed.
    pub max_items: Option<usize>,
}

/// A constraint across properties of one instance (the paper's OCL invariants beyond
/// ranges).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(tag = "rule", rename_all = "snake_case", deny_unknown_fields)]
pub enum Rule {
    /// At least one of these boolean properties is true.
    AtLeastOneTrue { properties: Vec<String> },
    /// `lesser <= greater` when both are set (numbers, dates or times).
    NotAfter { lesser: String, greater: String },
}

/// One broken constraint.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct Violation {
    /// Where, as a component path (`medication_plans/0/period_days`).
    pub property: String,
    /// Which rule: `type`, `min`, `max`, `enum`, `required`, `unknown`, `max_length`,
    /// `min_items`, `max_items`, `at_least_one_true`, `not_after`, `format`.
    pub rule: String,
    pub value: Value,
    pub message: String,
}

/// Why a component path cannot be used.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum PathError {
    #[error("no component {0:?}")]
    NotFound(String),
    #[error("{0}")]
    Invalid(String),
}

impl DomainModel {
    /// Checks the model itself: classes and enumerations it names exist.
    pub fn check(&self) -> Result<(), String> {
        let class = |c: &str| {
            if self.classes.contains_key(c) { Ok(()) } else { Err(format!("unknown class {c:?}")) }
        };
        class(&self.root)?;
        for (name, c) in &self.classes {
            for (p, part) in &c.parts {
                class(&part.class).map_err(|e| format!("{name}.{p}: {e}"))?;
            }
            for (p, prop) in &c.properties {
                match (&prop.ty, &prop.enumeration) {
                    (PropType::Enum, Some(e)) if self.enums.contains_key(e) => {}
                    (PropType::Enum, e) => return Err(format!("{name}.{p}: enum {e:?} is not defined")),
                    (_, Some(_)) => return Err(format!("{name}.{p}: only enum properties name an enumeration")),
                    _ => {}
                }
            }
        }
        Ok(())
    }

    /// Every violation in `doc` (the whole component document).
    pub fn validate(&self, doc: &Value) -> Vec<Violation> {
        let mut out = Vec::new();
        self.validate_instance(&self.root, doc, "", &mut out);
        out
    }

    fn validate_instance(&self, class_name: &str, v: &Value, at: &str, out: &mut Vec<Violation>) {
        let Some(class) = self.classes.get(class_name) else { return };
        let Value::Object(obj) = v else {
            out.push(violation(at, "type", v, format!("{} must be an object ({class_name})", name(at))));
            return;
        };
        for (k, val) in obj {
            let here = join(at, k);
            if let Some(p) = class.properties.get(k) {
                self.validate_property(p, val, &here, out);
            } else if let Some(part) = class.parts.get(k) {
                match (part.many, val) {
                    (true, Value::Array(items)) => {
                        if let Some(min) = part.min_items
                            && items.len() < min
                        {
                            let m = format!("{here} holds at least {min} item(s)");
                            out.push(violation(&here, "min_items", &Value::from(items.len()), m));
                        }
                        if let Some(max) = part.max_items
                            && items.len() > max
                        {
                            let m = format!("{here} holds at most {max} items");
                            out.push(violation(&here, "max_items", &Value::from(items.len()), m));
                        }
                        for (i, item) in items.iter().enumerate() {
                            self.validate_instance(&part.class, item, &join(&here, &i.to_string()), out);
                        }
                    }
                    (true, other) => out.push(violation(&here, "type", other, format!("{here} must be a list"))),
                    (false, other) => self.validate_instance(&part.class, other, &here, out),
                }
            } else {
                out.push(violation(&here, "unknown", val, format!("{class_name} has no property or part {k:?}")));
            }
        }
        for (k, p) in &class.properties {
            if p.required && !obj.contains_key(k) {
                out.push(violation(&join(at, k), "required", &Value::Null, format!("{class_name}.{k} is required")));
            }
        }
        for (k, p) in &class.parts {
            if p.required && !obj.contains_key(k) {
                out.push(violation(&join(at, k), "required", &Value::Null, format!("{class_name}.{k} is required")));
            }
        }
        for rule in &class.rules {
            match rule {
                Rule::AtLeastOneTrue { properties } => {
                    if !properties.iter().any(|p| obj.get(p) == Some(&Value::Bool(true))) {
                        let shown: Map<String, Value> =
                            properties.iter().filter_map(|p| obj.get(p).map(|v| (p.clone(), v.clone()))).collect();
                        out.push(violation(
                            &join(at, &properties.join("|")),
                            "at_least_one_true",
                            &Value::Object(shown),
                            format!("at least one of {} must be true", properties.join(", ")),
                        ));
                    }
                }
                Rule::NotAfter { lesser, greater } => {
                    if let (Some(a), Some(b)) = (obj.get(lesser), obj.get(greater))
                        && order(a, b) == Some(std::cmp::Ordering::Greater)
                    {
                        out.push(violation(
                            &join(at, lesser),
                            "not_after",
                            a,
                            format!("{lesser} must not be after {greater} ({b})"),
                        ));
                    }
                }
            }
        }
    }

    fn validate_property(&self, p: &Property, v: &Value, at: &str, out: &mut Vec<Violation>) {
        let type_ok = match p.ty {
            PropType::Integer => v.is_i64() || v.is_u64(),
            PropType::Number => v.is_number(),
            PropType::Boolean => v.is_boolean(),
            PropType::String | PropType::Date | PropType::Time | PropType::Enum => v.is_string(),
        };
        if !type_ok {
            let ty = format!("{:?}", p.ty).to_lowercase();
            out.push(violation(at, "type", v, format!("{} must be of type {ty}", name(at))));
            return;
        }
        if let Some(n) = v.as_f64() {
            if let Some(min) = p.min
                && n < min
            {
                out.push(violation(at, "min", v, format!("{} must be at least {min}", name(at))));
            }
            if let Some(max) = p.max
                && n > max
            {
                out.push(violation(at, "max", v, format!("{} must be at most {max}", name(at))));
            }
        }
        let s = v.as_str().unwrap_or_default();
        match p.ty {
            PropType::Enum => {
                let allowed = p.enumeration.as_ref().and_then(|e| self.enums.get(e));
                if !allowed.is_some_and(|a| a.iter().any(|x| x == s)) {
                    let list = allowed.map(|a| a.join(", ")).unwrap_or_default();
                    out.push(violation(at, "enum", v, format!("{} must be one of: {list}", name(at))));
                }
            }
            PropType::Date if !is_date(s) => {
                out.push(violation(at, "format", v, format!("{} must be a date YYYY-MM-DD", name(at))))
            }
            PropType::Time if !is_time(s) => {
                out.push(violation(at, "format", v, format!("{} must be a time HH:MM", name(at))))
            }
            _ => {}
        }
        if let Some(max) = p.max_length
            && s.chars().count() > max
        {
            out.push(violation(at, "max_length", v, format!("{} is longer than {max} characters", name(at))));
        }
    }

    /// Whether `path` may hold a list that POST appends to.
    pub fn is_list(&self, path: &str) -> Result<bool, PathError> {
        Ok(matches!(self.resolve(path)?, Target::List(_)))
    }

    /// What `path` names in the model (independent of the document's contents).
    fn resolve(&self, path: &str) -> Result<Target, PathError> {
        let mut class = self.root.clone();
        let mut target = Target::Instance(class.clone());
        for seg in segments(path)? {
            target = match target {
                Target::List(c) => {
                    seg.parse::<usize>().map_err(|_| PathError::NotFound(path.into()))?;
                    Target::Instance(c)
                }
                Target::Instance(c) => {
                    let cls = &self.classes[&c];
                    if let Some(part) = cls.parts.get(seg) {
                        class = part.class.clone();
                        if part.many { Target::List(class.clone()) } else { Target::Instance(class.clone()) }
                    } else if cls.properties.contains_key(seg) {
                        Target::Property
                    } else {
                        return Err(PathError::NotFound(path.into()));
                    }
                }
                Target::Property => return Err(PathError::NotFound(path.into())),
            };
        }
        Ok(target)
    }
}

enum Target {
    Instance(String),
    List(String),
    Property,
}

fn segments(path: &str) -> Result<Vec<&str>, PathError> {
    let segs: Vec<&str> = path.split('/').filter(|s| !s.is_empty()).collect();
    if segs.iter().any(|s| s.len() > 128) {
        return Err(PathError::Invalid("a path segment is longer than 128 bytes".into()));
    }
    Ok(segs)
}

fn join(at: &str, k: &str) -> String {
    if at.is_empty() { k.to_string() } else { format!("{at}/{k}") }
}

fn name(at: &str) -> &str {
    if at.is_empty() { "the document" } else { at }
}

fn violation(at: &str, rule: &str, v: &Value, message: String) -> Violation {
    Violation { property: at.to_string(), rule: rule.into(), value: v.clone(), message }
}

fn order(a: &Value, b: &Value) -> Option<std::cmp::Ordering> {
    match (a, b) {
        (Value::Number(x), Value::Number(y)) => x.as_f64()?.partial_cmp(&y.as_f64()?),
        // Dates and times in their fixed formats order as strings.
        (Value::String(x), Value::String(y)) => Some(x.cmp(y)),
        _ => None,
    }
}

fn digits(s: &str) -> bool {
    !s.is_empty() && s.bytes().all(|b| b.is_ascii_digit())
}

/// A real calendar date `YYYY-MM-DD` (proleptic Gregorian: 2024-02-29 is one,
/// 2023-02-29 and 2023-02-30 are not).
fn is_date(s: &str) -> bool {
    let p: Vec<&str> = s.split('-').collect();
    let [y, m, d] = p[..] else { return false };
    if y.len() != 4 || m.len() != 2 || d.len() != 2 || !digits(y) || !digits(m) || !digits(d) {
        return false;
    }
    let (y, m, d) = (y.parse::<u32>().unwrap_or(0), m.parse::<u32>().unwrap_or(0), d.parse::<u32>().unwrap_or(0));
    let leap = (y % 4 == 0 && y % 100 != 0) || y % 400 == 0;
    let days = match m {
        1 | 3 | 5 | 7 | 8 | 10 | 12 => 31,
        4 | 6 | 9 | 11 => 30,
        2 if leap => 29,
        2 => 28,
        _ => return false,
    };
    (1..=days).contains(&d)
}

/// `HH:MM` or `HH:MM:SS` (24 h; the XML Schema time of the reference model, without
/// fractions or zone).
fn is_time(s: &str) -> bool {
    let p: Vec<&str> = s.split(':').collect();
    let two = |x: &str, below: u8| x.len() == 2 && digits(x) && x.parse::<u8>().unwrap_or(99) < below;
    match p[..] {
        [h, m] => two(h, 24) && two(m, 60),
        [h, m, sec] => two(h, 24) && two(m, 60) && two(sec, 60),
        _ => false,
    }
}

/// The value at `path` in `doc`.
pub fn get_path<'a>(doc: &'a Value, path: &str) -> Result<&'a Value, PathError> {
    let mut v = doc;
    for seg in segments(path)? {
        v = match v {
            Value::Object(m) => m.get(seg),
            Value::Array(a) => seg.parse::<usize>().ok().and_then(|i| a.get(i)),
            _ => None,
        }
        .ok_or_else(|| PathError::NotFound(path.into()))?;
    }
    Ok(v)
}

/// What a write does at a path.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Edit {
    /// PUT: replace (or create) the value at the path.
    Put(Value),
    /// POST: append to the list at the path.
    Append(Value),
    /// DELETE: remove the value at the path.
    Delete,
}

/// Applies `edit` at `path` to a copy of `doc` (the model says which paths exist) and
/// returns the new document; the caller validates it before storing.
pub fn apply_edit(model: &DomainModel, doc: &Value, path: &str, edit: Edit) -> Result<Value, PathError> {
    let target = model.resolve(path)?;
    let segs = segments(path)?;
    let mut new = if doc.is_object() { doc.clone() } else { Value::Object(Map::new()) };
    match (&edit, &target) {
        (Edit::Append(_), Target::List(_)) => {}
        (Edit::Append(_), _) => {
            return Err(PathError::Invalid(format!("{path:?} is not a list; POST appends to lists")));
        }
        (Edit::Delete, _) if segs.is_empty() => {}
        _ => {}
    }
    let Some((last, parents)) = segs.split_last() else {
        return match edit {
            Edit::Put(v) => Ok(v),
            Edit::Delete => Ok(Value::Object(Map::new())),
            Edit::Append(_) => Err(PathError::Invalid("the document is not a list".into())),
        };
    };
    // Walk to the parent, creating objects for missing single parts on PUT/POST.
    let mut cur = &mut new;
    for seg in parents {
        let create = !matches!(edit, Edit::Delete);
        cur = match cur {
            Value::Object(m) => {
                if create && !m.contains_key(*seg) {
                    m.insert(seg.to_string(), Value::Object(Map::new()));
                }
                m.get_mut(*seg)
            }
            Value::Array(a) => seg.parse::<usize>().ok().and_then(|i| a.get_mut(i)),
            _ => None,
        }
        .ok_or_else(|| PathError::NotFound(path.into()))?;
    }
    match (cur, edit) {
        (Value::Object(m), Edit::Put(v)) => {
            m.insert(last.to_string(), v);
        }
        (Value::Object(m), Edit::Append(v)) => {
            match m.entry(last.to_string()).or_insert_with(|| Value::Array(vec![])) {
                Value::Array(a) => a.push(v),
                _ => return Err(PathError::Invalid(format!("{path:?} does not hold a list"))),
            }
        }
        (Value::Object(m), Edit::Delete) => {
            m.remove(*last).ok_or_else(|| PathError::NotFound(path.into()))?;
        }
        (Value::Array(a), edit) => {
            let i =
                last.parse::<usize>().ok().filter(|i| *i < a.len()).ok_or_else(|| PathError::NotFound(path.into()))?;
            match edit {
                Edit::Put(v) => a[i] = v,
                Edit::Delete => {
                    a.remove(i);
                }
                Edit::Append(_) => return Err(PathError::Invalid("POST appends to a list, not to an element".into())),
            }
        }
        _ => return Err(PathError::NotFound(path.into())),
    }
    Ok(new)
}

/// A JSON merge patch (RFC 7386) that turns `old` into `new` (objects only; `null`
/// values in `new` cannot be expressed and are not produced by validated documents).
pub fn merge_diff(old: &Map<String, Value>, new: &Map<String, Value>) -> Map<String, Value> {
    let mut patch = Map::new();
    for k in old.keys() {
        if !new.contains_key(k) {
            patch.insert(k.clone(), Value::Null);
        }
    }
    for (k, v) in new {
        match (old.get(k), v) {
            (Some(o), n) if o == n => {}
            (Some(Value::Object(o)), Value::Object(n)) => {
                patch.insert(k.clone(), Value::Object(merge_diff(o, n)));
            }
            _ => {
                patch.insert(k.clone(), v.clone());
            }
        }
    }
    patch
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    fn model() -> DomainModel {
        serde_json::from_value(json!({
            "root": "Device",
            "enums": {"Status": ["good", "defect"]},
            "classes": {
                "Device": {
                    "properties": {"status": {"type": "enum", "enum": "Status"}},
                    "parts": {"plans": {"class": "Plan", "many": true}, "setting": {"class": "Setting"}}
                },
                "Plan": {
                    "properties": {"period_days": {"type": "integer", "min": 1, "max": 28, "required": true},
                                   "first": {"type": "date"}},
                    "parts": {"lines": {"class": "Line", "many": true}}
                },
                "Line": {
                    "properties": {"doses": {"type": "integer", "min": 0, "max": 9},
                                   "current_roll": {"type": "boolean"}, "next_roll": {"type": "boolean"}},
                    "rules": [{"rule": "at_least_one_true", "properties": ["current_roll", "next_roll"]}]
                },
                "Setting": {"properties": {"early": {"type": "integer", "min": 1, "max": 300}, "at": {"type": "time"}}}
            }
        }))
        .unwrap()
    }

    fn rules(v: &[Violation]) -> Vec<(String, String)> {
        v.iter().map(|v| (v.property.clone(), v.rule.clone())).collect()
    }

    #[test]
    fn ranges_types_enums_rules_and_unknowns_are_violations() {
        let m = model();
        m.check().unwrap();
        let ok = json!({"status": "good", "plans": [{"period_days": 7, "first": "2024-03-01",
            "lines": [{"doses": 2, "current_roll": true}]}], "setting": {"early": 30, "at": "09:00"}});
        assert!(m.validate(&ok).is_empty(), "{:?}", m.validate(&ok));
        let bad = json!({"status": "lost", "plans": [{"period_days": 29, "first": "2024-13-01",
            "lines": [{"doses": 10, "current_roll": false}]}, {}], "setting": {"early": 0, "at": "25:00", "x": 1}});
        assert_eq!(
            rules(&m.validate(&bad)),
            [
                ("plans/0/first", "format"),
                ("plans/0/lines/0/doses", "max"),
                ("plans/0/lines/0/current_roll|next_roll", "at_least_one_true"),
                ("plans/0/period_days", "max"),
                ("plans/1/period_days", "required"),
                ("setting/at", "format"),
                ("setting/early", "min"),
                ("setting/x", "unknown"),
                ("status", "enum"),
            ]
            .map(|(a, b)| (a.to_string(), b.to_string()))
        );
        assert_eq!(
            rules(&m.validate(&json!({"plans": [{"period_days": 1.5}]}))),
            [("plans/0/period_days".into(), "type".into())]
        );
    }

    #[test]
    fn dates_are_real_calendar_dates_and_times_may_have_seconds() {
        for ok in ["2024-02-29", "2000-02-29", "2023-12-31", "1999-01-01"] {
            assert!(is_date(ok), "{ok}");
        }
        for bad in [
            "2023-02-29",
            "2023-02-30",
            "1900-02-29",
            "2023-04-31",
            "2023-00-10",
            "2023-13-01",
            "2023-1-01",
            "23-01-01",
            "2023-01-01x",
        ] {
            assert!(!is_date(bad), "{bad}");
        }
        for ok in ["00:00", "23:59", "09:30:15"] {
            assert!(is_time(ok), "{ok}");
        }
        for bad in ["24:00", "12:60", "12:00:60", "9:00", "12:00:00:00", ""] {
            assert!(!is_time(bad), "{bad}");
        }
    }

    #[test]
    fn required_parts_and_minimum_list_sizes_are_enforced() {
        let m: DomainModel = serde_json::from_value(json!({
            "root": "Plan",
            "classes": {
                "Plan": {"parts": {"times": {"class": "T", "many": true, "required": true, "min_items": 1}}},
                "T": {"properties": {"at": {"type": "time", "required": true}}}
            }
        }))
        .unwrap();
        assert!(m.validate(&json!({"times": [{"at": "09:00"}]})).is_empty());
        assert_eq!(rules(&m.validate(&json!({"times": []}))), [("times".into(), "min_items".into())]);
        assert_eq!(rules(&m.validate(&json!({}))), [("times".into(), "required".into())]);
        assert_eq!(rules(&m.validate(&json!({"times": [{}]}))), [("times/0/at".into(), "required".into())]);
    }

    #[test]
    fn edits_follow_the_model_and_the_diff_is_a_merge_patch() {
        let m = model();
        let doc = json!({"plans": [{"period_days": 7}]});
        let d = apply_edit(&m, &doc, "setting/early", Edit::Put(json!(5))).unwrap();
        assert_eq!(d["setting"]["early"], 5);
        let d = apply_edit(&m, &d, "plans", Edit::Append(json!({"period_days": 3}))).unwrap();
        assert_eq!(d["plans"].as_array().unwrap().len(), 2);
        let d = apply_edit(&m, &d, "plans/0", Edit::Delete).unwrap();
        assert_eq!(d["plans"], json!([{"period_days": 3}]));
        assert_eq!(apply_edit(&m, &d, "nope", Edit::Put(json!(1))), Err(PathError::NotFound("nope".into())));
        assert!(apply_edit(&m, &d, "setting", Edit::Append(json!({}))).is_err());
        assert_eq!(apply_edit(&m, &d, "plans/5", Edit::Delete), Err(PathError::NotFound("plans/5".into())));
        assert_eq!(get_path(&d, "plans/0/period_days").unwrap(), &json!(3));

        let old = json!({"a": 1, "b": {"c": 2, "d": 3}, "e": [1]});
        let new = json!({"b": {"c": 2, "d": 4}, "e": [1, 2]});
        let patch = merge_diff(old.as_object().unwrap(), new.as_object().unwrap());
        assert_eq!(Value::Object(patch.clone()), json!({"a": null, "b": {"d": 4}, "e": [1, 2]}));
        let mut applied = old.as_object().unwrap().clone();
        crate::merge_patch(&mut applied, &patch);
        assert_eq!(Value::Object(applied), new);
    }
}
