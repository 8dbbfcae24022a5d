//! History exports: the metric points of a device type's twins, or of a group's (DTA's
//! direct members), pushed to a webhook in batches, republished on an MQTT topic, or
//! appended to an NDJSON or CSV file. Pure: the specs, their checks, the rows and their
//! encodings; the exporter (`twinfleet_protocols::export`) reads the history's WAL in
//! the order points were acknowledged and delivers from a cursor it records.

use serde::{Deserialize, Serialize};

/// Points one batch holds at most.
pub const MAX_BATCH_POINTS: usize = 100_000;
/// The topic of an MQTT export when none is given.
pub const DEFAULT_TOPIC: &str = "twinfleet/history/{device_type}/{twin}";

/// One export of the configuration (`[[exports]]` in the config file).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[cfg_attr(feature = "openapi", derive(utoipa::ToSchema))]
#[serde(deny_unknown_fields)]
pub struct ExportSpec {
    /// Its name (letters, digits, `.`, `_`, `:`, `-`): the key of its cursor.
    pub name: String,
    /// The points of this device type's twins, or
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub device_type: Option<String>,
    /// of this DTA's direct members (exactly one of the two).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub group: Option<String>,
    /// Only these metrics (empty: all).
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub metrics: Vec<String>,
    pub kind: ExportKind,
    /// `webhook`: its `http://` URL. `mqtt`: the broker, `mqtt://host:port`.
    #[serde(default, skip_serializing_if = "String::is_empty")]
    pub url: String,
    /// `webhook`: each POST carries `X-Twinfleet-Signature: sha256=` HMAC-SHA256(secret,
    /// body) in hex.
    #[serde(default, skip_serializing_if = "String::is_empty")]
    pub secret: String,
    /// `mqtt`: the topic, with `{device_type}` and `{twin}` filled in (default
    /// [`DEFAULT_TOPIC`]).
    #[serde(default, skip_serializing_if = "String::is_empty")]
    pub topic: String,
    /// `mqtt`: the broker account.
    #[serde(default, skip_serializing_if = "String::is_empty")]
    pub username: String,
    #[serde(default, skip_serializing_if = "String::is_empty")]
    pub password: String,
    /// `file`: the file to append to (relative: to the data directory).
    #[serde(default, skip_serializing_if = "String::is_empty")]
    pub path: String,
    /// `file`: `ndjson` (default) or `csv`.
    #[serde(default)]
    pub format: FileFormat,
    /// Points a batch holds at most (default 1,000).
    #[serde(default = "default_batch")]
    pub batch_points: usize,
}

fn default_batch() -> usize {
    1_000
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[cfg_attr(feature = "openapi", derive(utoipa::ToSchema))]
#[serde(rename_all = "snake_case")]
pub enum ExportKind {
    Webhook,
    Mqtt,
    File,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Serialize, Deserialize)]
#[cfg_attr(feature = "openapi", derive(utoipa::ToSchema))]
#[serde(rename_all = "snake_case")]
pub enum FileFormat {
    #[default]
    Ndjson,
    Csv,
}

impl ExportSpec {
    pub fn validate(&self) -> Result<(), String> {
        crate::ids::DtaId::new(&self.name).map_err(|e| format!("export name: {e}"))?;
        let n = &self.name;
        match (&self.device_type, &self.group) {
            (Some(t), None) => {
                crate::ids::DeviceTypeId::new(t).map(|_| ()).map_err(|e| format!("export {n}: device_type: {e}"))?
            }
            (None, Some(g)) => crate::ids::DtaId::new(g).map(|_| ()).map_err(|e| format!("export {n}: group: {e}"))?,
            _ => return Err(format!("export {n}: give exactly one of device_type and group")),
        }
        if self.batch_points == 0 || self.batch_points > MAX_BATCH_POINTS {
            return Err(format!("export {n}: batch_points must be 1 to {MAX_BATCH_POINTS}"));
        }
        let unused = |fields: &[(&str, &String)]| -> Result<(), String> {
            match fields.iter().find(|(_, v)| !v.is_empty()) {
                Some((f, _)) => Err(format!("export {n}: a {:?} export takes no {f}", self.kind)),
                None => Ok(()),
            }
        };
        match self.kind {
            ExportKind::Webhook => {
                if !self.url.starts_with("http://") {
                    return Err(format!(
                        "export {n}: the webhook url {:?} must be http:// (this build has no TLS client; put a TLS proxy in front)",
                        self.url
                    ));
                }
                unused(&[("topic", &self.topic), ("username", &self.username), ("path", &self.path)])
            }
            ExportKind::Mqtt => {
                if mqtt_broker(&self.url).is_none() {
                    return Err(format!("export {n}: the broker url {:?} must be mqtt://host:port", self.url));
                }
                let topic = self.topic();
                if topic.contains(['+', '#']) || topic.is_empty() {
                    return Err(format!("export {n}: the topic {topic:?} must not be empty or hold wildcards"));
                }
                unused(&[("secret", &self.secret), ("path", &self.path)])
            }
            ExportKind::File => {
                if self.path.is_empty() {
                    return Err(format!("export {n}: a file export needs a path"));
                }
                unused(&[
                    ("url", &self.url),
                    ("secret", &self.secret),
                    ("topic", &self.topic),
                    ("username", &self.username),
                ])
            }
        }
    }

    /// The spec without its secrets (as the API shows it).
    pub fn redacted(&self) -> ExportSpec {
        let hide = |s: &String| if s.is_empty() { String::new() } else { "(set)".to_string() };
        ExportSpec { secret: hide(&self.secret), password: hide(&self.password), ..self.clone() }
    }

    /// The MQTT topic template.
    pub fn topic(&self) -> &str {
        if self.topic.is_empty() { DEFAULT_TOPIC } else { &self.topic }
    }

    /// Whether a point of `metric` of a twin of `device_type` is exported (the group is
    /// checked by the exporter, which knows the members).
    pub fn wants(&self, device_type: &str, metric: &str) -> bool {
        self.device_type.as_deref().is_none_or(|t| t == device_type)
            && (self.metrics.is_empty() || self.metrics.iter().any(|m| m == metric))
    }
}

/// The host and port of an `mqtt://host:port` URL (of an export or a notification sink).
pub fn mqtt_broker(url: &str) -> Option<(&str, u16)> {
    let (host, port) = url.strip_prefix("mqtt://")?.rsplit_once(':')?;
    let port = port.parse().ok()?;
    (!host.is_empty()).then_some((host, port))
}

/// Checks a configured list: each export, and names unique.
pub fn validate_exports(exports: &[ExportSpec]) -> Result<(), String> {
    let mut names = std::collections::HashSet::new();
    for e in exports {
        e.validate()?;
        if !names.insert(e.name.as_str()) {
            return Err(format!("export {:?} is listed twice", e.name));
        }
    }
    Ok(())
}

/// One exported point.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[cfg_attr(feature = "openapi", derive(utoipa::ToSchema))]
pub struct ExportRow {
    pub twin: String,
    pub device_type: String,
    pub metric: String,
    /// Milliseconds since the Unix epoch.
    pub at: i64,
    pub value: f64,
}

/// The CSV header line of a file export.
pub const CSV_HEADER: &str = "twin,device_type,metric,at,value\n";

/// A CSV field, quoted where it must be (RFC 4180).
fn csv_field(out: &mut String, s: &str) {
    if s.contains([',', '"', '\n', '\r']) {
        out.push('"');
        out.push_str(&s.replace('"', "\"\""));
        out.push('"');
    } else {
        out.push_str(s);
    }
}

impl ExportRow {
    /// The row as one line of `format` (ending in `\n`).
    pub fn line(&self, format: FileFormat, out: &mut String) {
        match format {
            FileFormat::Ndjson => {
                out.push_str(&serde_json::to_string(self).expect("a row serializes"));
            }
            FileFormat::Csv => {
                csv_field(out, &self.twin);
                out.push(',');
                csv_field(out, &self.device_type);
                out.push(',');
                csv_field(out, &self.metric);
                out.push_str(&format!(",{},{}", self.at, self.value));
            }
        }
        out.push('\n');
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn spec(kind: ExportKind) -> ExportSpec {
        ExportSpec {
            name: "lake".into(),
            device_type: Some("meter".into()),
            group: None,
            metrics: vec![],
            kind,
            url: String::new(),
            secret: String::new(),
            topic: String::new(),
            username: String::new(),
            password: String::new(),
            path: String::new(),
            format: FileFormat::Ndjson,
            batch_points: 1_000,
        }
    }

    #[test]
    fn specs_are_checked_naming_the_problem() {
        let mut s = spec(ExportKind::File);
        assert!(s.validate().unwrap_err().contains("needs a path"));
        s.path = "out.ndjson".into();
        s.validate().unwrap();
        s.group = Some("floor-1".into());
        assert!(s.validate().unwrap_err().contains("exactly one"));
        let mut w = spec(ExportKind::Webhook);
        w.url = "https://x".into();
        assert!(w.validate().unwrap_err().contains("http://"));
        w.url = "http://127.0.0.1:9/in".into();
        w.validate().unwrap();
        w.topic = "a".into();
        assert!(w.validate().unwrap_err().contains("takes no topic"));
        let mut m = spec(ExportKind::Mqtt);
        m.url = "mqtt://localhost".into();
        assert!(m.validate().unwrap_err().contains("host:port"));
        m.url = "mqtt://localhost:1883".into();
        m.validate().unwrap();
        m.topic = "x/#".into();
        assert!(m.validate().unwrap_err().contains("wildcards"));
        let mut b = spec(ExportKind::File);
        b.path = "x".into();
        b.batch_points = 0;
        assert!(b.validate().unwrap_err().contains("batch_points"));
        let twice = [spec(ExportKind::File), spec(ExportKind::File)]
            .map(|mut s| {
                s.path = "x".into();
                s
            })
            .to_vec();
        assert!(validate_exports(&twice).unwrap_err().contains("twice"));
    }

    #[test]
    fn rows_encode_as_ndjson_and_quoted_csv() {
        let r =
            ExportRow { twin: "t1".into(), device_type: "meter".into(), metric: "a,\"b\"".into(), at: 5, value: 1.5 };
        let mut out = String::new();
        r.line(FileFormat::Csv, &mut out);
        assert_eq!(out, "t1,meter,\"a,\"\"b\"\"\",5,1.5\n");
        out.clear();
        r.line(FileFormat::Ndjson, &mut out);
        let back: ExportRow = serde_json::from_str(out.trim_end()).unwrap();
        assert_eq!(back, r);
        let mut s = spec(ExportKind::File);
        s.metrics = vec!["temp".into()];
        assert!(s.wants("meter", "temp") && !s.wants("meter", "rssi") && !s.wants("valve", "temp"));
    }
}
