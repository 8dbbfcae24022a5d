//! Configuration of `twinfleet run`: each setting comes from the command-line flag, else
//! the environment variable, else the TOML config file, else the embedded default.
//!
//! | setting | flag | environment | file key | default |
//! |---|---|---|---|---|
//! | data directory | `--data-dir` | `TWINFLEET_DATA_DIR` | `data_dir` | `./twinfleet-data` |
//! | HTTP address | `--http` | `TWINFLEET_HTTP` | `http` | `127.0.0.1:8080` |
//! | gRPC address | `--grpc` | `TWINFLEET_GRPC` | `grpc` | `127.0.0.1:50051` |
//! | MQTT operational gateway | `--mqtt` | `TWINFLEET_MQTT` | `mqtt` | `127.0.0.1:1883` (embedded) |
//! | MQTT provisioning gateway | `--mqtt-provisioning` | `TWINFLEET_MQTT_PROVISIONING` | `mqtt_provisioning` | `127.0.0.1:1884` (embedded) |
//! | external broker's accounts | `--mqtt-accounts` | `TWINFLEET_MQTT_ACCOUNTS` | `mqtt_accounts` | `none`; `dynsec`: twinfleet keeps a Mosquitto's device and claim accounts through its dynamic-security plugin |
//! | worker arbiters | `--arbiters` | `TWINFLEET_ARBITERS` | `arbiters` | one per core |
//! | log filter | `--log` | `TWINFLEET_LOG` | `log` | `info` |
//! | config file | `--config` | `TWINFLEET_CONFIG` | | none |
//! | notification sinks of the monitoring alerts | | | `[[notify]]` (`name`, `kind` = `log`, `webhook` or `mqtt`, `url`, `secret`, `topic`, `username`, `password`, `min_severity`, `device_types`, `groups`, `acknowledgements`) | none |
//! | history exports | | | `[[exports]]` (`name`, `device_type` or `group`, `metrics`, `kind` = `webhook`, `mqtt` or `file`, `url`, `secret`, `topic`, `username`, `password`, `path`, `format` = `ndjson` or `csv`, `batch_points`) | none |
//! | operational gateways provisioning allocates to | | | `[[gateways]]` (`name`, `mqtt`, `grpc`, `regions`, `weight`) | none: a device stays on the gateway it claimed through |
//!
//! An MQTT gateway is either `host:port`, a listener of the embedded broker, or
//! `mqtt://[user[:password]@]host[:port]`, an external broker the transformer connects to.

use serde::Deserialize;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use twinfleet_models::enrollment::GatewaySpec;
use twinfleet_protocols::mqtt::{DEFAULT_MQTT, DEFAULT_MQTT_PROVISIONING, Endpoint};

pub const DEFAULT_DATA_DIR: &str = "./twinfleet-data";
pub const DEFAULT_HTTP: &str = "127.0.0.1:8080";
pub const DEFAULT_GRPC: &str = "127.0.0.1:50051";
/// The default log filter.
pub const DEFAULT_LOG: &str = "info";

/// Settings given in one place (the TOML file, or flags and environment), each optional.
/// In the file, unknown keys are an error, so that a typo does not go unnoticed.
#[derive(Debug, Default, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct PartialConfig {
    pub data_dir: Option<PathBuf>,
    pub http: Option<SocketAddr>,
    pub grpc: Option<SocketAddr>,
    pub mqtt: Option<String>,
    pub mqtt_provisioning: Option<String>,
    pub mqtt_accounts: Option<String>,
    pub arbiters: Option<usize>,
    pub log: Option<String>,
    /// File only: the operational gateways of provisioning's allocation policies.
    #[serde(default)]
    pub gateways: Option<Vec<GatewaySpec>>,
    /// File only: where the monitoring alerts are sent.
    #[serde(default)]
    pub notify: Option<Vec<twinfleet_models::notify::SinkSpec>>,
    /// File only: where metric history is exported.
    #[serde(default)]
    pub exports: Option<Vec<twinfleet_models::export::ExportSpec>>,
}

impl PartialConfig {
    pub fn load(path: &Path) -> Result<Self, String> {
        let text =
            std::fs::read_to_string(path).map_err(|e| format!("cannot read config file {}: {e}", path.display()))?;
        toml::from_str(&text).map_err(|e| format!("config file {}: {e}", path.display()))
    }
}

/// The settings `twinfleet run` starts with.
#[derive(Debug, Clone, PartialEq)]
pub struct RunConfig {
    pub data_dir: PathBuf,
    pub http: SocketAddr,
    pub grpc: SocketAddr,
    pub mqtt: Endpoint,
    pub mqtt_provisioning: Endpoint,
    /// Keep an external broker's accounts (`--mqtt-accounts dynsec`).
    pub mqtt_accounts: bool,
    pub arbiters: usize,
    pub log: String,
    pub gateways: Vec<GatewaySpec>,
    pub notify: Vec<twinfleet_models::notify::SinkSpec>,
    pub exports: Vec<twinfleet_models::export::ExportSpec>,
}

/// Flags and environment (`over`, merged by clap) win over the file, the file over the
/// defaults.
pub fn resolve(over: PartialConfig, file: PartialConfig) -> Result<RunConfig, String> {
    let cores = std::thread::available_parallelism().map(|n| n.get()).unwrap_or(1);
    let endpoint = |v: Option<String>, default: &str, what: &str| {
        v.as_deref().unwrap_or(default).parse::<Endpoint>().map_err(|e| format!("{what}: {e}"))
    };
    Ok(RunConfig {
        data_dir: over.data_dir.or(file.data_dir).unwrap_or_else(|| PathBuf::from(DEFAULT_DATA_DIR)),
        http: over.http.or(file.http).unwrap_or_else(|| DEFAULT_HTTP.parse().expect("default address parses")),
        grpc: over.grpc.or(file.grpc).unwrap_or_else(|| DEFAULT_GRPC.parse().expect("default address parses")),
        mqtt: endpoint(over.mqtt.or(file.mqtt), DEFAULT_MQTT, "mqtt")?,
        mqtt_provisioning: endpoint(
            over.mqtt_provisioning.or(file.mqtt_provisioning),
            DEFAULT_MQTT_PROVISIONING,
            "mqtt_provisioning",
        )?,
        mqtt_accounts: match over.mqtt_accounts.or(file.mqtt_accounts).as_deref() {
            None | Some("none") => false,
            Some("dynsec") => true,
            Some(other) => return Err(format!("mqtt_accounts: {other:?} is neither \"none\" nor \"dynsec\"")),
        },
        arbiters: over.arbiters.or(file.arbiters).unwrap_or(cores).max(1),
        log: over.log.or(file.log).unwrap_or_else(|| DEFAULT_LOG.into()),
        gateways: {
            let g = over.gateways.or(file.gateways).unwrap_or_default();
            twinfleet_models::enrollment::validate_gateways(&g).map_err(|e| format!("gateways: {e}"))?;
            g
        },
        notify: {
            let n = over.notify.or(file.notify).unwrap_or_default();
            twinfleet_models::notify::validate_sinks(&n).map_err(|e| format!("notify: {e}"))?;
            n
        },
        exports: {
            let x = over.exports.or(file.exports).unwrap_or_default();
            twinfleet_models::export::validate_exports(&x).map_err(|e| format!("exports: {e}"))?;
            x
        },
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn flags_win_over_file_and_file_over_defaults() {
        let file: PartialConfig = toml::from_str("data_dir = \"/srv/tf\"\nhttp = \"0.0.0.0:9000\"").unwrap();
        let cfg =
            resolve(PartialConfig { http: Some("127.0.0.1:1".parse().unwrap()), ..Default::default() }, file).unwrap();
        assert_eq!(cfg.data_dir, PathBuf::from("/srv/tf"));
        assert_eq!(cfg.http, "127.0.0.1:1".parse().unwrap());
        let defaults = resolve(PartialConfig::default(), PartialConfig::default()).unwrap();
        assert_eq!(defaults.http, DEFAULT_HTTP.parse().unwrap());
        assert_eq!(defaults.mqtt, Endpoint::Listen("127.0.0.1:1883".parse().unwrap()));
        let external = PartialConfig { mqtt: Some("mqtt://tf:pw@broker.local".into()), ..Default::default() };
        let Endpoint::Broker(b) = resolve(external, PartialConfig::default()).unwrap().mqtt else { panic!() };
        assert_eq!((b.host.as_str(), b.port, b.password.as_deref()), ("broker.local", 1883, Some("pw")));
        let bad = PartialConfig { mqtt: Some("nowhere".into()), ..Default::default() };
        assert!(resolve(bad, PartialConfig::default()).is_err());
        let accounts = PartialConfig { mqtt_accounts: Some("dynsec".into()), ..Default::default() };
        assert!(resolve(accounts, PartialConfig::default()).unwrap().mqtt_accounts);
        let typo = PartialConfig { mqtt_accounts: Some("dynsex".into()), ..Default::default() };
        assert!(resolve(typo, PartialConfig::default()).unwrap_err().contains("dynsex"));
        assert!(toml::from_str::<PartialConfig>("htp = \"x\"").is_err());
        let gateways = "[[gateways]]\nname = \"eu-1\"\nmqtt = \"eu.example:1883\"\nregions = [\"eu\"]\n";
        let file: PartialConfig = toml::from_str(gateways).unwrap();
        let cfg = resolve(PartialConfig::default(), file).unwrap();
        assert_eq!((cfg.gateways[0].name.as_str(), cfg.gateways[0].weight), ("eu-1", 1));
        let twice: PartialConfig = toml::from_str(&format!("{gateways}{gateways}")).unwrap();
        assert!(resolve(PartialConfig::default(), twice).unwrap_err().contains("listed twice"));
        let hook = "[[notify]]\nname = \"ops\"\nkind = \"webhook\"\nurl = \"https://x\"\n";
        let file: PartialConfig = toml::from_str(hook).unwrap();
        assert!(resolve(PartialConfig::default(), file).unwrap_err().contains("http://"));
    }
}
