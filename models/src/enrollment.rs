//! Enrollment: the devices an operator announces before they claim (pre-registered
//! batches, imported as JSON or CSV), and the gateway manager's choice of each device's
//! operational gateway (`allocate`). Pure: parsing, validation and the choice.

use crate::provisioning::{Allocation, AllocationPolicy, Identity, Mode};
use serde::{Deserialize, Serialize};
use std::collections::HashMap;

/// Devices one import may carry.
pub const MAX_BATCH_DEVICES: usize = 100_000;

/// A batch to import: its devices' expected identities (a serial each; a MAC, where
/// given, must match the claim's), and optionally a mode that overrides the type's.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
#[cfg_attr(feature = "openapi", derive(utoipa::ToSchema))]
pub struct BatchSpec {
    /// 1 to 128 letters, digits, `.`, `_`, `:` or `-`.
    pub name: String,
    /// Overrides the device type's mode for this batch's devices.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub mode: Option<Mode>,
    pub devices: Vec<Identity>,
}

impl BatchSpec {
    /// Checks the name, each device's identity (naming its row, 1-based) and that no
    /// serial appears twice.
    pub fn validate(&self) -> Result<(), String> {
        crate::ids::DtaId::new(&self.name).map_err(|e| format!("batch name: {e}"))?;
        if self.mode == Some(Mode::Manual) {
            return Err("a batch cannot be manual: its devices claim; register manual devices one by one".into());
        }
        if self.devices.is_empty() {
            return Err("a batch needs at least one device".into());
        }
        if self.devices.len() > MAX_BATCH_DEVICES {
            return Err(format!("{} devices; one import takes at most {MAX_BATCH_DEVICES}", self.devices.len()));
        }
        let mut seen: HashMap<&str, usize> = HashMap::with_capacity(self.devices.len());
        for (i, d) in self.devices.iter().enumerate() {
            d.validate().map_err(|e| format!("device {} ({:?}): {e}", i + 1, d.serial))?;
            if let Some(first) = seen.insert(&d.serial, i + 1) {
                return Err(format!("device {}: serial {:?} is also device {first}", i + 1, d.serial));
            }
        }
        Ok(())
    }
}

/// The columns a CSV import may have (a header row names them, in any order; `serial`
/// is required). `peripherals` holds several values separated by `;`.
pub const CSV_COLUMNS: [&str; 8] = ["serial", "mac", "model", "firmware", "os", "arch", "peripherals", "region"];

/// Reads a CSV import (RFC 4180: comma-separated, fields optionally in double quotes
/// with `""` for a quote, CRLF or LF line ends; blank lines skipped) into identities.
/// Errors name the line.
pub fn parse_csv(text: &str) -> Result<Vec<Identity>, String> {
    let rows = csv_rows(text)?;
    let mut rows = rows.into_iter().filter(|(_, r)| !(r.len() == 1 && r[0].trim().is_empty()));
    let Some((_, header)) = rows.next() else { return Err("the CSV is empty; its first row names the columns".into()) };
    let mut cols = Vec::with_capacity(header.len());
    for h in &header {
        let h = h.trim().to_ascii_lowercase();
        if !CSV_COLUMNS.contains(&h.as_str()) {
            return Err(format!("unknown column {h:?}; the columns are {}", CSV_COLUMNS.join(", ")));
        }
        if cols.contains(&h) {
            return Err(format!("column {h:?} appears twice"));
        }
        cols.push(h);
    }
    if !cols.iter().any(|c| c == "serial") {
        return Err("the header has no `serial` column".into());
    }
    let mut out = Vec::new();
    for (line, row) in rows {
        if row.len() != cols.len() {
            return Err(format!("line {line}: {} fields, the header has {}", row.len(), cols.len()));
        }
        let mut id = Identity::default();
        for (c, v) in cols.iter().zip(row) {
            let v = v.trim().to_string();
            match c.as_str() {
                "serial" => id.serial = v,
                "mac" => id.mac = v,
                "model" => id.model = v,
                "firmware" => id.firmware = v,
                "os" => id.os = v,
                "arch" => id.arch = v,
                "region" => id.region = v,
                _ => id.peripherals = v.split(';').map(str::trim).filter(|p| !p.is_empty()).map(String::from).collect(),
            }
        }
        out.push(id);
    }
    Ok(out)
}

/// Rows of fields, each with the line it starts on.
fn csv_rows(text: &str) -> Result<Vec<(usize, Vec<String>)>, String> {
    let (mut rows, mut row, mut field) = (Vec::new(), Vec::new(), String::new());
    let (mut line, mut start, mut quoted, mut was_quoted) = (1usize, 1usize, false, false);
    let mut chars = text.chars().peekable();
    while let Some(c) = chars.next() {
        if quoted {
            match c {
                '"' if chars.peek() == Some(&'"') => {
                    chars.next();
                    field.push('"');
                }
                '"' => quoted = false,
                '\n' => {
                    line += 1;
                    field.push(c);
                }
                _ => field.push(c),
            }
            continue;
        }
        match c {
            '"' if field.trim().is_empty() && !was_quoted => {
                field.clear();
                quoted = true;
                was_quoted = true;
            }
            '"' => return Err(format!("line {line}: a quote inside an unquoted field")),
            ',' => {
                row.push(std::mem::take(&mut field));
                was_quoted = false;
            }
            '\r' if chars.peek() == Some(&'\n') => {}
            '\n' => {
                row.push(std::mem::take(&mut field));
                rows.push((start, std::mem::take(&mut row)));
                was_quoted = false;
                line += 1;
                start = line;
            }
            _ if was_quoted && !c.is_whitespace() => {
                return Err(format!("line {line}: text after a closing quote"));
            }
            _ => field.push(c),
        }
    }
    if quoted {
        return Err(format!("line {start}: a quoted field is not closed"));
    }
    if !field.is_empty() || !row.is_empty() {
        row.push(field);
        rows.push((start, row));
    }
    Ok(rows)
}

/// An operational gateway devices can be sent to: the addresses a device is given, the
/// regions it serves and its weight for the hash policy.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
#[cfg_attr(feature = "openapi", derive(utoipa::ToSchema))]
pub struct GatewaySpec {
    pub name: String,
    /// The MQTT address given to devices that claimed over MQTT (`host:port`).
    #[serde(default, skip_serializing_if = "String::is_empty")]
    pub mqtt: String,
    /// The gRPC address given to devices that claimed over gRPC.
    #[serde(default, skip_serializing_if = "String::is_empty")]
    pub grpc: String,
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub regions: Vec<String>,
    /// Share of the hash policy (default 1; 0 takes no new devices).
    #[serde(default = "one")]
    pub weight: u32,
}

fn one() -> u32 {
    1
}

/// Checks a configured list: names unique and valid, weights not all zero, some address.
pub fn validate_gateways(gateways: &[GatewaySpec]) -> Result<(), String> {
    let mut names = std::collections::HashSet::new();
    for g in gateways {
        crate::ids::DtaId::new(&g.name).map_err(|e| format!("gateway name: {e}"))?;
        if !names.insert(g.name.as_str()) {
            return Err(format!("gateway {:?} is listed twice", g.name));
        }
        if g.mqtt.is_empty() && g.grpc.is_empty() {
            return Err(format!("gateway {:?} has neither an `mqtt` nor a `grpc` address", g.name));
        }
    }
    if !gateways.is_empty() && gateways.iter().all(|g| g.weight == 0) {
        return Err("every gateway has weight 0: none would take devices".into());
    }
    Ok(())
}

/// Why no gateway was chosen.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum AllocationError {
    #[error("the claim names no region; devices of this type are allocated by region ({known})")]
    NoRegion { known: String },
    #[error("unknown region {region:?}; the gateways serve {known}")]
    UnknownRegion { region: String, known: String },
    #[error("gateway {0:?} of the static policy is not configured")]
    UnknownGateway(String),
    #[error("no gateway is configured for this policy")]
    NoGateway,
}

/// The gateway manager's choice for the device of `identity`: `None` when no gateways
/// are configured (the device stays on the gateway it claimed through).
pub fn allocate<'a>(
    allocation: Option<&Allocation>,
    gateways: &'a [GatewaySpec],
    identity: &Identity,
) -> Result<Option<&'a GatewaySpec>, AllocationError> {
    let policy = allocation.map_or(AllocationPolicy::Hash, |a| a.policy);
    if gateways.is_empty() && policy == AllocationPolicy::Hash {
        return Ok(None);
    }
    let known = || {
        let mut r: Vec<&str> = gateways.iter().flat_map(|g| g.regions.iter().map(String::as_str)).collect();
        r.sort_unstable();
        r.dedup();
        if r.is_empty() { "no regions".to_string() } else { r.join(", ") }
    };
    match policy {
        AllocationPolicy::Region => {
            if identity.region.is_empty() {
                return Err(AllocationError::NoRegion { known: known() });
            }
            gateways
                .iter()
                .find(|g| g.regions.iter().any(|r| r.eq_ignore_ascii_case(&identity.region)))
                .map(Some)
                .ok_or_else(|| AllocationError::UnknownRegion { region: identity.region.clone(), known: known() })
        }
        AllocationPolicy::Static => {
            let name = allocation.and_then(|a| a.gateway.as_deref()).unwrap_or_default();
            gateways
                .iter()
                .find(|g| g.name == name)
                .map(Some)
                .ok_or_else(|| AllocationError::UnknownGateway(name.to_string()))
        }
        AllocationPolicy::Hash => {
            // Weighted rendezvous hashing: score = -w / ln(u), u uniform in (0, 1) from
            // the hash of (gateway, serial); the highest score wins.
            let score = |g: &GatewaySpec| {
                let h = fnv1a(g.name.as_bytes(), fnv1a(identity.serial.as_bytes(), FNV_OFFSET));
                let u = ((h >> 11) as f64 + 0.5) / (1u64 << 53) as f64;
                f64::from(g.weight) / -u.ln()
            };
            gateways
                .iter()
                .filter(|g| g.weight > 0)
                .map(|g| (score(g), g))
                .max_by(|a, b| a.0.total_cmp(&b.0))
                .map(|(_, g)| Some(g))
                .ok_or(AllocationError::NoGateway)
        }
    }
}

const FNV_OFFSET: u64 = 0xcbf2_9ce4_8422_2325;

/// FNV-1a 64, then a finalizer (FNV alone mixes its last bytes poorly): stable across
/// builds and machines, which a placement must be.
fn fnv1a(bytes: &[u8], seed: u64) -> u64 {
    let mut h = seed;
    for b in bytes {
        h ^= u64::from(*b);
        h = h.wrapping_mul(0x0000_0100_0000_01b3);
    }
    h ^= h >> 33;
    h = h.wrapping_mul(0xff51_afd7_ed55_8ccd);
    h ^= h >> 33;
    h
}

#[cfg(test)]
mod tests {
    use super::*;

    fn gw(name: &str, regions: &[&str], weight: u32) -> GatewaySpec {
        GatewaySpec {
            name: name.into(),
            mqtt: format!("{name}:1883"),
            grpc: String::new(),
            regions: regions.iter().map(|r| r.to_string()).collect(),
            weight,
        }
    }

    fn device(serial: &str, region: &str) -> Identity {
        Identity { serial: serial.into(), region: region.into(), ..Identity::default() }
    }

    #[test]
    fn csv_imports_quoted_fields_any_column_order_and_names_bad_lines() {
        let text = "mac,serial,peripherals\r\naa:01,S-1,\"cam;gps\"\n\n\"aa:02\",\"S,2\",\n";
        let ids = parse_csv(text).unwrap();
        assert_eq!(ids.len(), 2);
        assert_eq!((ids[0].serial.as_str(), ids[0].mac.as_str()), ("S-1", "aa:01"));
        assert_eq!(ids[0].peripherals, vec!["cam", "gps"]);
        assert_eq!(ids[1].serial, "S,2");
        assert_eq!(parse_csv("serial\n\"say \"\"hi\"\"\"\n").unwrap()[0].serial, "say \"hi\"");
        assert!(parse_csv("serial,colour\nS-1,red\n").unwrap_err().contains("unknown column \"colour\""));
        assert!(parse_csv("mac\naa\n").unwrap_err().contains("no `serial`"));
        assert!(parse_csv("serial,mac\nS-1\n").unwrap_err().starts_with("line 2:"));
        assert!(parse_csv("serial\n\"S-1\n").unwrap_err().contains("not closed"));
        assert!(parse_csv("serial\nS\"1\n").unwrap_err().contains("quote inside"));
        assert!(parse_csv("").unwrap_err().contains("empty"));
    }

    #[test]
    fn a_batch_names_the_device_that_is_wrong() {
        let mut b = BatchSpec { name: "lot-7".into(), mode: None, devices: vec![device("S-1", ""), device("S-2", "")] };
        assert_eq!(b.validate(), Ok(()));
        b.devices.push(device("S-1", ""));
        assert_eq!(b.validate().unwrap_err(), "device 3: serial \"S-1\" is also device 1");
        b.devices[2] = device("has space", "");
        assert!(b.validate().unwrap_err().starts_with("device 3 (\"has space\")"));
        b.devices.truncate(2);
        b.name = "lot 7".into();
        assert!(b.validate().unwrap_err().starts_with("batch name"));
        b.name = "lot-7".into();
        b.mode = Some(Mode::Manual);
        assert!(b.validate().is_err());
        b.mode = None;
        b.devices.clear();
        assert!(b.validate().is_err());
    }

    #[test]
    fn region_static_and_weighted_hash_choose_as_documented() {
        let gws = vec![gw("eu-1", &["eu", "uk"], 1), gw("us-1", &["us"], 3), gw("spare", &[], 0)];
        let region = Allocation { policy: AllocationPolicy::Region, gateway: None };
        assert_eq!(allocate(Some(&region), &gws, &device("S", "UK")).unwrap().unwrap().name, "eu-1");
        assert_eq!(allocate(Some(&region), &gws, &device("S", "us")).unwrap().unwrap().name, "us-1");
        assert_eq!(
            allocate(Some(&region), &gws, &device("S", "mars")).unwrap_err().to_string(),
            "unknown region \"mars\"; the gateways serve eu, uk, us"
        );
        assert!(matches!(allocate(Some(&region), &gws, &device("S", "")), Err(AllocationError::NoRegion { .. })));
        let fixed = Allocation { policy: AllocationPolicy::Static, gateway: Some("spare".into()) };
        assert_eq!(allocate(Some(&fixed), &gws, &device("S", "eu")).unwrap().unwrap().name, "spare");
        let gone = Allocation { policy: AllocationPolicy::Static, gateway: Some("gone".into()) };
        assert_eq!(allocate(Some(&gone), &gws, &device("S", "")), Err(AllocationError::UnknownGateway("gone".into())));
        // Hash: stable, by weight, never to a weight-0 gateway; none configured: none.
        let mut us = 0;
        for i in 0..4000 {
            let d = device(&format!("S-{i}"), "");
            let a = allocate(None, &gws, &d).unwrap().unwrap();
            assert_eq!(allocate(None, &gws, &d).unwrap().unwrap(), a);
            assert_ne!(a.name, "spare");
            us += usize::from(a.name == "us-1");
        }
        assert!((2700..3300).contains(&us), "weight 3 of 4 took {us} of 4000");
        assert_eq!(allocate(None, &[], &device("S", "eu")), Ok(None));
        assert!(allocate(Some(&region), &[], &device("S", "eu")).unwrap_err().to_string().contains("unknown"));
        // Adding a gateway moves only devices to it.
        let mut more = gws.clone();
        more.push(gw("eu-2", &[], 1));
        for i in 0..1000 {
            let d = device(&format!("S-{i}"), "");
            let (a, b) = (allocate(None, &gws, &d).unwrap().unwrap(), allocate(None, &more, &d).unwrap().unwrap());
            assert!(a == b || b.name == "eu-2");
        }
    }

    #[test]
    fn a_gateway_list_is_checked() {
        assert_eq!(validate_gateways(&[gw("a", &[], 1)]), Ok(()));
        assert!(validate_gateways(&[gw("a", &[], 1), gw("a", &[], 1)]).unwrap_err().contains("twice"));
        assert!(validate_gateways(&[gw("a", &[], 0)]).unwrap_err().contains("weight 0"));
        let mut bare = gw("b", &[], 1);
        bare.mqtt.clear();
        assert!(validate_gateways(&[bare]).unwrap_err().contains("neither"));
    }
}
