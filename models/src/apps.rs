//! The app store's catalog and the compatibility check (Maree et al. 2024, 4.4.3: "the
//! app store indexes app versions with compatibility metadata, which the twin checks
//! against its device"). Pure: an app version with its artifacts per OS and
//! architecture (SHA-256 and size) and its requirements, a device's profile, and
//! [`check`], which either picks the artifact to install or explains every refusal in
//! words an operator can act on ("requires peripheral camera; the device has none").

use serde::{Deserialize, Serialize};
use serde_json::{Map, Value};
use std::collections::BTreeMap;

/// One version of an app, as registered in the store.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[cfg_attr(feature = "openapi", derive(utoipa::ToSchema))]
#[serde(deny_unknown_fields)]
pub struct AppVersion {
    /// Letters, digits, `.`, `_`, `-` (1–64).
    pub app: String,
    /// Semantic version (`1.4.2`, `2.0.0-rc.1`).
    pub version: String,
    #[serde(default, skip_serializing_if = "String::is_empty")]
    pub description: String,
    #[serde(default)]
    pub requires: Requirements,
    /// Installs of this version wait for an operator's approval (as do all installs
    /// on twins whose configuration says `install_approval: true`).
    #[serde(default)]
    pub approval: bool,
    /// Uploaded artifacts, one per OS and architecture (filled by the store).
    #[serde(default)]
    pub artifacts: Vec<Artifact>,
}

/// What a device needs to run an app version (each absent field: no requirement).
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
#[cfg_attr(feature = "openapi", derive(utoipa::ToSchema))]
#[serde(deny_unknown_fields)]
pub struct Requirements {
    /// The operating system (`linux`, `zephyr`, ...).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub os: Option<String>,
    /// A semver range of the OS version (`>=5.10, <7`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub os_version: Option<String>,
    /// Any of these architectures (empty: any).
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub arch: Vec<String>,
    /// Capabilities the device must report (`tpm`, `ota-ab`, ...).
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub capabilities: Vec<String>,
    /// Peripherals the device must have (`camera`, `gps`, ...).
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub peripherals: Vec<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub min_memory_mb: Option<u64>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub min_storage_mb: Option<u64>,
    /// Other apps installed, each with a semver range (`{"runtime": ">=2"}`).
    #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
    pub depends: BTreeMap<String, String>,
}

/// A file of an app version for one OS and architecture, stored content-addressed.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[cfg_attr(feature = "openapi", derive(utoipa::ToSchema))]
pub struct Artifact {
    pub os: String,
    pub arch: String,
    /// Lowercase hex SHA-256 of the content.
    pub sha256: String,
    pub size: u64,
}

/// What the platform knows of a device for the check: its identity's OS, architecture
/// and peripherals (from provisioning), overlaid with what it reports under `platform`
/// (`os`, `os_version`, `arch`, `capabilities`, `peripherals`, `memory_mb`,
/// `storage_mb`) and its installed apps under `apps` (`{name: version}`).
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
#[cfg_attr(feature = "openapi", derive(utoipa::ToSchema))]
pub struct DeviceProfile {
    pub os: Option<String>,
    pub os_version: Option<String>,
    pub arch: Option<String>,
    pub capabilities: Vec<String>,
    pub peripherals: Vec<String>,
    pub memory_mb: Option<u64>,
    pub storage_mb: Option<u64>,
    pub apps: BTreeMap<String, String>,
}

impl DeviceProfile {
    /// The profile from a twin's metadata attributes (its provisioning `identity`) and
    /// reported state.
    pub fn of(attributes: &Map<String, Value>, reported: &Map<String, Value>) -> DeviceProfile {
        let mut p = DeviceProfile::default();
        let text = |v: Option<&Value>| v.and_then(Value::as_str).filter(|s| !s.is_empty()).map(String::from);
        let list = |v: Option<&Value>| -> Option<Vec<String>> {
            v.and_then(Value::as_array).map(|a| a.iter().filter_map(|x| x.as_str().map(String::from)).collect())
        };
        for src in [attributes.get("identity"), reported.get("platform")].into_iter().flatten() {
            p.os = text(src.get("os")).or(p.os);
            p.os_version = text(src.get("os_version")).or(p.os_version);
            p.arch = text(src.get("arch")).or(p.arch);
            p.capabilities = list(src.get("capabilities")).unwrap_or(std::mem::take(&mut p.capabilities));
            p.peripherals = list(src.get("peripherals")).unwrap_or(std::mem::take(&mut p.peripherals));
            p.memory_mb = src.get("memory_mb").and_then(Value::as_u64).or(p.memory_mb);
            p.storage_mb = src.get("storage_mb").and_then(Value::as_u64).or(p.storage_mb);
        }
        if let Some(Value::Object(apps)) = reported.get("apps") {
            for (name, v) in apps {
                // `{"app": "1.2.0"}` or `{"app": {"version": "1.2.0", ...}}`.
                let version = v.as_str().or_else(|| v.get("version").and_then(Value::as_str));
                if let Some(version) = version {
                    p.apps.insert(name.clone(), version.to_string());
                }
            }
        }
        p
    }
}

/// A name of an app: 1–64 letters, digits, `.`, `_`, `-`.
pub fn valid_app_name(name: &str) -> bool {
    !name.is_empty() && name.len() <= 64 && name.bytes().all(|b| b.is_ascii_alphanumeric() || b"._-".contains(&b))
}

impl AppVersion {
    /// Checks a version before it is registered: its name, version, ranges.
    pub fn validate(&self) -> Result<(), String> {
        if !valid_app_name(&self.app) {
            return Err(format!("app name {:?}: 1 to 64 letters, digits, '.', '_' or '-'", self.app));
        }
        semver::Version::parse(&self.version)
            .map_err(|e| format!("version {:?} is not a semantic version (e.g. 1.4.2): {e}", self.version))?;
        if let Some(r) = &self.requires.os_version {
            semver::VersionReq::parse(r)
                .map_err(|e| format!("requires.os_version {r:?} is not a semver range: {e}"))?;
        }
        for (app, r) in &self.requires.depends {
            if !valid_app_name(app) {
                return Err(format!("requires.depends: {app:?} is not an app name"));
            }
            semver::VersionReq::parse(r)
                .map_err(|e| format!("requires.depends.{app} {r:?} is not a semver range: {e}"))?;
        }
        Ok(())
    }
}

/// A semantic version loosely: `5.10` reads as `5.10.0`, `v6` as `6.0.0`.
fn loose_version(s: &str) -> Option<semver::Version> {
    let s = s.trim().trim_start_matches('v');
    semver::Version::parse(s).ok().or_else(|| {
        let mut parts: Vec<&str> = s.split('.').collect();
        if parts.is_empty() || parts.len() > 3 || !parts.iter().all(|p| p.parse::<u64>().is_ok()) {
            return None;
        }
        parts.resize(3, "0");
        semver::Version::parse(&parts.join(".")).ok()
    })
}

/// Whether `app` can run on `device`: the artifact to install, or every reason it
/// cannot, each a sentence naming what is required and what the device has.
pub fn check<'a>(app: &'a AppVersion, device: &DeviceProfile) -> Result<&'a Artifact, Vec<String>> {
    let mut why = Vec::new();
    let r = &app.requires;
    let shown = |v: &Option<String>| v.clone().unwrap_or_else(|| "none known".into());
    if let Some(os) = &r.os
        && device.os.as_deref() != Some(os.as_str())
    {
        why.push(format!("requires OS {os}; the device runs {}", shown(&device.os)));
    }
    if let Some(range) = &r.os_version {
        let req = semver::VersionReq::parse(range).ok();
        match device.os_version.as_deref().map(|v| (v, loose_version(v))) {
            Some((_, Some(v))) if req.as_ref().is_some_and(|req| req.matches(&v)) => {}
            Some((v, _)) => why.push(format!("requires OS version {range}; the device has {v}")),
            None => why.push(format!("requires OS version {range}; the device reports none")),
        }
    }
    if !r.arch.is_empty() && !device.arch.as_ref().is_some_and(|a| r.arch.contains(a)) {
        why.push(format!("requires architecture {}; the device is {}", r.arch.join(" or "), shown(&device.arch)));
    }
    for c in &r.capabilities {
        if !device.capabilities.contains(c) {
            why.push(format!("requires capability {c}; the device does not report it"));
        }
    }
    for p in &r.peripherals {
        if !device.peripherals.contains(p) {
            let has = if device.peripherals.is_empty() { "none".to_string() } else { device.peripherals.join(", ") };
            why.push(format!("requires peripheral {p}; the device has {has}"));
        }
    }
    let resource = |why: &mut Vec<String>, what: &str, need: Option<u64>, have: Option<u64>| {
        if let Some(need) = need {
            match have {
                Some(h) if h >= need => {}
                Some(h) => why.push(format!("requires {need} MB of {what}; the device has {h} MB")),
                None => why.push(format!("requires {need} MB of {what}; the device reports none")),
            }
        }
    };
    resource(&mut why, "memory", r.min_memory_mb, device.memory_mb);
    resource(&mut why, "storage", r.min_storage_mb, device.storage_mb);
    for (dep, range) in &r.depends {
        let req = semver::VersionReq::parse(range).ok();
        match device.apps.get(dep) {
            Some(v) if loose_version(v).zip(req.as_ref()).is_some_and(|(v, req)| req.matches(&v)) => {}
            Some(v) => why.push(format!("requires app {dep} {range}; the device has {dep} {v}")),
            None => why.push(format!("requires app {dep} {range}; the device does not have it")),
        }
    }
    let artifact = app.artifacts.iter().find(|a| {
        device.os.as_deref().is_none_or(|os| a.os == os) && device.arch.as_deref().is_none_or(|arch| a.arch == arch)
    });
    if artifact.is_none() {
        let have: Vec<String> = app.artifacts.iter().map(|a| format!("{}/{}", a.os, a.arch)).collect();
        why.push(format!(
            "no artifact for {}/{}; {} {} has {}",
            shown(&device.os),
            shown(&device.arch),
            app.app,
            app.version,
            if have.is_empty() { "none uploaded".to_string() } else { have.join(", ") }
        ));
    }
    match artifact {
        Some(a) if why.is_empty() => Ok(a),
        _ => Err(why),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    fn app() -> AppVersion {
        serde_json::from_value(json!({
            "app": "vision", "version": "2.1.0",
            "requires": {"os": "linux", "os_version": ">=5.10", "arch": ["arm64"], "peripherals": ["camera"],
                         "capabilities": ["gpu"], "min_memory_mb": 512, "depends": {"runtime": ">=2, <3"}},
            "artifacts": [{"os": "linux", "arch": "arm64", "sha256": "ab", "size": 10}]
        }))
        .unwrap()
    }

    #[test]
    fn a_compatible_device_gets_its_artifact() {
        let attrs = json!({"identity": {"serial": "S", "os": "linux", "arch": "arm64", "peripherals": ["camera"]}});
        let reported = json!({"platform": {"os_version": "6.1", "capabilities": ["gpu"], "memory_mb": 1024},
                              "apps": {"runtime": "2.3.1"}});
        let d = DeviceProfile::of(attrs.as_object().unwrap(), reported.as_object().unwrap());
        assert_eq!(check(&app(), &d).unwrap().arch, "arm64");
        app().validate().unwrap();
    }

    #[test]
    fn every_refusal_is_explained() {
        let attrs = json!({"identity": {"serial": "S", "os": "linux", "arch": "armv7"}});
        let reported =
            json!({"platform": {"os_version": "4.19", "memory_mb": 256}, "apps": {"runtime": {"version": "1.9.0"}}});
        let d = DeviceProfile::of(attrs.as_object().unwrap(), reported.as_object().unwrap());
        let why = check(&app(), &d).unwrap_err();
        assert_eq!(
            why,
            [
                "requires OS version >=5.10; the device has 4.19",
                "requires architecture arm64; the device is armv7",
                "requires capability gpu; the device does not report it",
                "requires peripheral camera; the device has none",
                "requires 512 MB of memory; the device has 256 MB",
                "requires app runtime >=2, <3; the device has runtime 1.9.0",
                "no artifact for linux/armv7; vision 2.1.0 has linux/arm64",
            ]
        );
    }

    #[test]
    fn a_malformed_version_or_range_is_refused() {
        let mut a = app();
        a.version = "two".into();
        assert!(a.validate().unwrap_err().contains("semantic version"));
        let mut a = app();
        a.requires.os_version = Some(">>5".into());
        assert!(a.validate().unwrap_err().contains("os_version"));
    }
}
