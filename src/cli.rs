//! The client subcommands of `twinfleet`: they talk to a running instance over the
//! operator API (`--api`, default `http://127.0.0.1:8080`) with an API token
//! (`--token` or `TWINFLEET_TOKEN`). Output is a table, or the API's JSON with `--json`.

use anyhow::{Context as _, bail};
use clap::{Args, Subcommand};
use serde_json::Value;

/// Where the API is and who is asking.
#[derive(Debug, Args)]
pub struct ClientArgs {
    /// Base URL of a running instance's HTTP API.
    #[arg(long, env = "TWINFLEET_API", default_value = "http://127.0.0.1:8080", global = true)]
    api: String,
    /// API token (printed by `twinfleet run` on a fresh data dir, or issued with
    /// `POST /api/v1/users/{name}/tokens`).
    #[arg(long, env = "TWINFLEET_TOKEN", hide_env_values = true, global = true)]
    token: Option<String>,
    /// Print the API's JSON instead of a table.
    #[arg(long, global = true)]
    json: bool,
}

#[derive(Debug, Subcommand)]
pub enum TwinsCommand {
    /// List twins (those the token may read), in id order.
    List(ListArgs),
}

#[derive(Debug, Args)]
pub struct ListArgs {
    #[arg(long = "type")]
    device_type: Option<String>,
    /// A DTA: its members and those of nested DTAs.
    #[arg(long)]
    group: Option<String>,
    /// `active` or `archived`.
    #[arg(long)]
    state: Option<String>,
    #[arg(long)]
    tag: Option<String>,
    /// From the open alerts: ok, degraded, critical, offline.
    #[arg(long)]
    health: Option<String>,
    /// Start after this id (the `next` of a previous page).
    #[arg(long)]
    after: Option<String>,
    #[arg(long, default_value_t = 100)]
    limit: usize,
}

#[derive(Debug, Args)]
pub struct AlertsArgs {
    /// raised, acknowledged, cleared, or open (raised or acknowledged).
    #[arg(long)]
    state: Option<String>,
    /// At least: info, warning, minor, major, critical.
    #[arg(long)]
    severity: Option<String>,
    #[arg(long)]
    twin: Option<String>,
    #[arg(long = "type")]
    device_type: Option<String>,
    #[arg(long)]
    rule: Option<String>,
    #[arg(long, default_value_t = 100)]
    limit: usize,
    /// Acknowledge this alert instead of listing.
    #[arg(long)]
    ack: Option<u64>,
}

#[derive(Debug, Subcommand)]
pub enum TwinCommand {
    /// Show one twin: identity, state, configuration, last events.
    Show { id: String },
}

#[derive(Debug, Args)]
pub struct ActorsArgs {
    #[arg(long)]
    kind: Option<String>,
    #[arg(long)]
    parent: Option<String>,
    /// Only actors with more than N messages waiting (or restarted, with --restarted).
    #[arg(long)]
    mailbox_over: Option<u32>,
    #[arg(long)]
    restarted: bool,
    #[arg(long, default_value_t = 100)]
    limit: usize,
}

#[derive(Debug, Subcommand)]
pub enum RolloutsCommand {
    /// Every rollout with its progress per wave.
    List,
    /// One rollout: its progress per wave and every target.
    Show {
        id: String,
    },
    /// Start a rollout from a JSON file (`{"id", "app", "version", "device_type",
    /// "waves"?, "rate"?, "abort"?, "on_abort"?, "health_gate"?, "groups"?}`).
    Start {
        file: std::path::PathBuf,
    },
    Pause {
        id: String,
    },
    Resume {
        id: String,
    },
    /// Stop starting installs (those sent run to their end).
    Cancel {
        id: String,
    },
}

#[derive(Debug, Subcommand)]
pub enum JobsCommand {
    /// Show one job's state and progress.
    Show { id: u64 },
    /// List jobs, newest first.
    List,
}

#[derive(Debug, clap::Subcommand)]
pub enum ProvisioningCommand {
    /// The devices that wait for an operator's approval.
    Pending,
    /// One device's process and its step-by-step log.
    Show { device_type: String, serial: String },
    /// Let a waiting device go on.
    Approve { device_type: String, serial: String },
    /// Refuse a waiting device.
    Reject {
        device_type: String,
        serial: String,
        /// Why (kept in the step log).
        #[arg(long, default_value = "")]
        reason: String,
    },
    /// Import a batch of pre-registered devices from a CSV file (header row: serial,
    /// mac, model, ...) or a JSON file (`{"name", "mode"?, "devices": [...]}`); prints
    /// the batch's claim token (shown only now).
    Import {
        device_type: String,
        file: std::path::PathBuf,
        /// The batch's name (CSV files; a JSON file names it itself).
        #[arg(long)]
        name: Option<String>,
        /// Override the type's mode for this batch (CSV files): automatic, semi_automatic.
        #[arg(long)]
        mode: Option<String>,
    },
    /// The pre-registered batches of a device type.
    Batches { device_type: String },
}

/// The JSON body of a 2xx answer, else the API's error message.
fn answer(mut res: ureq::http::Response<ureq::Body>) -> anyhow::Result<Value> {
    let status = res.status();
    let body = res.body_mut().read_to_string().context("cannot read the answer")?;
    let value: Value = serde_json::from_str(&body).unwrap_or(Value::String(body));
    if !status.is_success() {
        let msg = value.get("message").and_then(Value::as_str).map(str::to_string).unwrap_or(value.to_string());
        bail!("{} {}: {msg}", status.as_u16(), status.canonical_reason().unwrap_or(""));
    }
    Ok(value)
}

struct Client {
    agent: ureq::Agent,
    base: String,
    token: String,
    json: bool,
}

impl Client {
    fn new(a: ClientArgs) -> anyhow::Result<Client> {
        let Some(token) = a.token else {
            bail!("no API token: pass --token or set TWINFLEET_TOKEN (twinfleet run prints one on a fresh data dir)")
        };
        let agent: ureq::Agent = ureq::Agent::config_builder().http_status_as_error(false).build().into();
        Ok(Client { agent, base: a.api.trim_end_matches('/').to_string(), token, json: a.json })
    }

    /// GETs `path` (with `query` pairs); the JSON body of a 2xx, else the API's error.
    fn get(&self, path: &str, query: &[(&str, Option<String>)]) -> anyhow::Result<Value> {
        let url = format!("{}/api/v1{path}", self.base);
        let mut req = self.agent.get(&url).header("Authorization", &format!("Bearer {}", self.token));
        for (k, v) in query {
            if let Some(v) = v {
                req = req.query(*k, v);
            }
        }
        answer(req.call().with_context(|| format!("cannot reach {url}"))?)
    }

    /// POSTs `body` to `path`; the JSON body of a 2xx, else the API's error.
    fn post(&self, path: &str, body: &Value) -> anyhow::Result<Value> {
        self.post_raw(path, "application/json", body.to_string())
    }

    /// POSTs `body` of `content_type` to `path`.
    fn post_raw(&self, path: &str, content_type: &str, body: String) -> anyhow::Result<Value> {
        let url = format!("{}/api/v1{path}", self.base);
        let res = self
            .agent
            .post(&url)
            .header("Authorization", &format!("Bearer {}", self.token))
            .header("Content-Type", content_type)
            .send(body)
            .with_context(|| format!("cannot reach {url}"))?;
        answer(res)
    }

    fn print(&self, v: &Value, table: impl FnOnce(&Value) -> String) {
        if self.json {
            println!("{}", serde_json::to_string_pretty(v).unwrap_or_default());
        } else {
            print!("{}", table(v));
        }
    }
}

/// Left-aligned columns, two spaces apart.
fn render(headers: &[&str], rows: &[Vec<String>]) -> String {
    let mut widths: Vec<usize> = headers.iter().map(|h| h.len()).collect();
    for r in rows {
        for (w, c) in widths.iter_mut().zip(r) {
            *w = (*w).max(c.chars().count());
        }
    }
    let line = |cells: Vec<String>| {
        let mut s = cells.iter().zip(&widths).map(|(c, w)| format!("{c:<w$}")).collect::<Vec<_>>().join("  ");
        s.truncate(s.trim_end().len());
        s + "\n"
    };
    let mut out = line(headers.iter().map(|h| h.to_uppercase()).collect());
    for r in rows {
        out += &line(r.clone());
    }
    out
}

fn s(v: &Value, key: &str) -> String {
    match v.get(key) {
        Some(Value::String(s)) => s.clone(),
        Some(Value::Null) | None => String::new(),
        Some(Value::Array(a)) => {
            a.iter().map(|x| x.as_str().map_or(x.to_string(), str::to_string)).collect::<Vec<_>>().join(",")
        }
        Some(other) => other.to_string(),
    }
}

pub fn twins(a: ClientArgs, cmd: TwinsCommand) -> anyhow::Result<()> {
    let c = Client::new(a)?;
    let TwinsCommand::List(l) = cmd;
    let v = c.get(
        "/twins",
        &[
            ("device_type", l.device_type),
            ("group", l.group),
            ("state", l.state),
            ("tag", l.tag),
            ("health", l.health),
            ("after", l.after),
            ("limit", Some(l.limit.to_string())),
        ],
    )?;
    c.print(&v, |v| {
        let rows: Vec<Vec<String>> = v["twins"]
            .as_array()
            .map(|a| {
                a.iter()
                    .map(|t| {
                        vec![
                            s(t, "id"),
                            s(t, "device_type"),
                            s(t, "state"),
                            s(t, "status"),
                            s(t, "health"),
                            s(t, "tags"),
                        ]
                    })
                    .collect()
            })
            .unwrap_or_default();
        let mut out = render(&["id", "type", "state", "status", "health", "tags"], &rows);
        out += &format!("{} of {} twins", rows.len(), s(v, "total"));
        if let Some(next) = v.get("next").and_then(Value::as_str) {
            out += &format!("; next page: --after {next}");
        }
        out + "\n"
    });
    Ok(())
}

pub fn twin(a: ClientArgs, cmd: TwinCommand) -> anyhow::Result<()> {
    let c = Client::new(a)?;
    let TwinCommand::Show { id } = cmd;
    let v = c.get(&format!("/twins/{id}"), &[("events", Some("10".into()))])?;
    c.print(&v, |v| {
        let ident = &v["identity"];
        let mut out = render(
            &["field", "value"],
            &[
                vec!["id".into(), s(ident, "twin_id")],
                vec!["type".into(), s(ident, "device_type")],
                vec!["model".into(), s(ident, "model")],
                vec!["serial".into(), s(ident, "serial")],
                vec!["state".into(), s(v, "lifecycle")],
                vec!["status".into(), s(&v["actor"], "status")],
                vec!["in sync".into(), s(v, "in_sync")],
                vec!["tags".into(), s(&v["metadata"], "tags")],
                vec!["memberships".into(), s(v, "memberships")],
                vec!["reported".into(), v["reported"].to_string()],
                vec!["desired".into(), v["desired"].to_string()],
                vec!["config".into(), v["effective_config"]["values"].to_string()],
            ],
        );
        let events: Vec<Vec<String>> = v["last_events"]
            .as_array()
            .map(|a| a.iter().map(|e| vec![s(e, "seq"), s(e, "at"), s(e, "event")]).collect())
            .unwrap_or_default();
        if !events.is_empty() {
            out += "\n";
            out += &render(&["seq", "at", "event"], &events);
        }
        out
    });
    Ok(())
}

pub fn actors(a: ClientArgs, q: ActorsArgs) -> anyhow::Result<()> {
    let c = Client::new(a)?;
    let v = c.get(
        "/actors",
        &[
            ("kind", q.kind),
            ("parent", q.parent),
            ("mailbox_over", q.mailbox_over.map(|n| n.to_string())),
            ("restarted", q.restarted.then(|| "true".into())),
            ("limit", Some(q.limit.to_string())),
        ],
    )?;
    c.print(&v, |v| {
        let rows: Vec<Vec<String>> = v["actors"]
            .as_array()
            .map(|a| {
                a.iter()
                    .map(|x| {
                        [
                            "kind",
                            "id",
                            "parent",
                            "status",
                            "mailbox_depth",
                            "messages_handled",
                            "restarts",
                            "last_error",
                        ]
                        .iter()
                        .map(|k| s(x, k))
                        .collect()
                    })
                    .collect()
            })
            .unwrap_or_default();
        let mut out =
            render(&["kind", "id", "parent", "status", "mailbox", "handled", "restarts", "last error"], &rows);
        out += &format!("{} of {} actors\n", rows.len(), s(v, "total"));
        out
    });
    Ok(())
}

/// `twinfleet alerts`: the monitoring alerts, newest first (or `--ack ID`).
pub fn alerts(a: ClientArgs, q: AlertsArgs) -> anyhow::Result<()> {
    let c = Client::new(a)?;
    let v = match q.ack {
        Some(id) => {
            serde_json::json!({"alerts": [c.post(&format!("/alerts/{id}/acknowledge"), &serde_json::json!({}))?]})
        }
        None => c.get(
            "/alerts",
            &[
                ("state", q.state),
                ("severity", q.severity),
                ("twin", q.twin),
                ("device_type", q.device_type),
                ("rule", q.rule),
                ("limit", Some(q.limit.to_string())),
            ],
        )?,
    };
    c.print(&v, |v| {
        let rows: Vec<Vec<String>> = v["alerts"]
            .as_array()
            .into_iter()
            .flatten()
            .map(|a| {
                ["id", "raised_at", "severity", "state", "twin", "rule", "message"].iter().map(|k| s(a, k)).collect()
            })
            .collect();
        render(&["id", "raised", "severity", "state", "twin", "rule", "message"], &rows)
    });
    Ok(())
}

/// `twinfleet rollouts`: list, show, start, pause, resume, cancel.
pub fn rollouts(a: ClientArgs, cmd: RolloutsCommand) -> anyhow::Result<()> {
    let c = Client::new(a)?;
    let v = match cmd {
        RolloutsCommand::List => c.get("/rollouts", &[])?,
        RolloutsCommand::Show { id } => c.get(&format!("/rollouts/{id}"), &[])?,
        RolloutsCommand::Start { file } => {
            let text = std::fs::read_to_string(&file).with_context(|| format!("cannot read {}", file.display()))?;
            let spec: Value = serde_json::from_str(&text).with_context(|| format!("{} is not JSON", file.display()))?;
            c.post("/rollouts", &spec)?
        }
        RolloutsCommand::Pause { id } => c.post(&format!("/rollouts/{id}/pause"), &serde_json::json!({}))?,
        RolloutsCommand::Resume { id } => c.post(&format!("/rollouts/{id}/resume"), &serde_json::json!({}))?,
        RolloutsCommand::Cancel { id } => c.post(&format!("/rollouts/{id}/cancel"), &serde_json::json!({}))?,
    };
    c.print(&v, |v| {
        let list = if v.is_array() { v.as_array().cloned().unwrap_or_default() } else { vec![v.clone()] };
        let mut rows = Vec::new();
        for r in &list {
            let waves: Vec<String> = r["progress"]
                .as_array()
                .into_iter()
                .flatten()
                .map(|w| {
                    format!(
                        "{}%: {}/{} ok, {} failed{}",
                        s(w, "percent"),
                        s(w, "succeeded"),
                        s(w, "targets"),
                        s(w, "failed"),
                        match (w["postponed"].as_u64(), w["rolled_back"].as_u64()) {
                            (Some(p), _) if p > 0 => format!(", {p} postponed"),
                            (_, Some(b)) if b > 0 => format!(", {b} rolled back"),
                            _ => String::new(),
                        }
                    )
                })
                .collect();
            let spec = &r["spec"];
            let state = match r["reason"].as_str() {
                Some(why) => format!("{} ({why})", s(r, "state")),
                None => s(r, "state"),
            };
            rows.push(vec![
                s(spec, "id"),
                format!("{} {}", s(spec, "app"), s(spec, "version")),
                s(spec, "device_type"),
                state,
                format!("{}", r["wave"].as_u64().unwrap_or(0) + 1),
                waves.join("; "),
            ]);
        }
        render(&["id", "app", "type", "state", "wave", "waves"], &rows)
    });
    Ok(())
}

pub fn jobs(a: ClientArgs, cmd: JobsCommand) -> anyhow::Result<()> {
    let c = Client::new(a)?;
    let v = match cmd {
        JobsCommand::Show { id } => c.get(&format!("/jobs/{id}"), &[])?,
        JobsCommand::List => c.get("/jobs", &[])?,
    };
    c.print(&v, |v| {
        let list = if v.is_array() { v.as_array().cloned().unwrap_or_default() } else { vec![v.clone()] };
        let rows: Vec<Vec<String>> = list
            .iter()
            .map(|j| {
                vec![
                    s(j, "id"),
                    s(j, "kind"),
                    s(j, "state"),
                    format!("{}/{}", s(j, "done"), s(j, "total")),
                    s(j, "failed"),
                    s(j, "created_by"),
                ]
            })
            .collect();
        render(&["id", "kind", "state", "done", "failed", "by"], &rows)
    });
    Ok(())
}

/// `twinfleet provisioning import`: a CSV or JSON file, by its extension (`.json`), else
/// by its first character.
fn import(
    c: &Client,
    ty: &str,
    file: &std::path::Path,
    name: Option<String>,
    mode: Option<String>,
) -> anyhow::Result<()> {
    let text = std::fs::read_to_string(file).with_context(|| format!("cannot read {}", file.display()))?;
    let json = file.extension().is_some_and(|e| e.eq_ignore_ascii_case("json")) || text.trim_start().starts_with('{');
    let path = format!("/device-types/{}/batches", enc(ty));
    let v = if json {
        let mut doc: Value = serde_json::from_str(&text).with_context(|| format!("{} is not JSON", file.display()))?;
        if let Some(n) = name {
            doc["name"] = n.into();
        }
        if let Some(m) = mode {
            doc["mode"] = m.into();
        }
        c.post(&path, &doc)?
    } else {
        let Some(name) = name else { bail!("a CSV import needs --name for its batch") };
        let mut q = format!("?name={}", enc(&name));
        if let Some(m) = mode {
            q += &format!("&mode={}", enc(&m));
        }
        c.post_raw(&format!("{path}{q}"), "text/csv", text)?
    };
    c.print(&v, |v| {
        format!(
            "batch {}/{}: {} devices\nclaim token (shown only now; username {}/{}): {}\n",
            s(&v["batch"], "device_type"),
            s(&v["batch"], "name"),
            s(&v["batch"], "devices"),
            s(&v["batch"], "device_type"),
            s(&v["batch"], "name"),
            s(v, "claim_token"),
        )
    });
    Ok(())
}

pub fn provisioning(a: ClientArgs, cmd: ProvisioningCommand) -> anyhow::Result<()> {
    let c = Client::new(a)?;
    let path = |ty: &str, serial: &str| format!("/provisioning/{}/{}", enc(ty), enc(serial));
    let (v, with_log) = match cmd {
        ProvisioningCommand::Import { device_type, file, name, mode } => {
            return import(&c, &device_type, &file, name, mode);
        }
        ProvisioningCommand::Batches { device_type } => {
            let v = c.get(&format!("/device-types/{}/batches", enc(&device_type)), &[])?;
            c.print(&v, |v| {
                let rows: Vec<Vec<String>> = v
                    .as_array()
                    .into_iter()
                    .flatten()
                    .map(|b| ["name", "mode", "devices", "created_at", "created_by"].iter().map(|k| s(b, k)).collect())
                    .collect();
                render(&["batch", "mode", "devices", "created", "by"], &rows)
            });
            return Ok(());
        }
        ProvisioningCommand::Pending => (c.get("/provisioning/pending", &[])?, false),
        ProvisioningCommand::Show { device_type, serial } => (c.get(&path(&device_type, &serial), &[])?, true),
        ProvisioningCommand::Approve { device_type, serial } => {
            (c.post(&format!("{}/approve", path(&device_type, &serial)), &serde_json::json!({}))?, true)
        }
        ProvisioningCommand::Reject { device_type, serial, reason } => {
            (c.post(&format!("{}/reject", path(&device_type, &serial)), &serde_json::json!({"reason": reason}))?, true)
        }
    };
    c.print(&v, |v| {
        let list = if v.is_array() { v.as_array().cloned().unwrap_or_default() } else { vec![v.clone()] };
        let rows: Vec<Vec<String>> = list
            .iter()
            .map(|p| {
                vec![
                    s(p, "device_type"),
                    s(&p["identity"], "serial"),
                    s(p, "device_id"),
                    s(p, "state"),
                    s(p, "outcome"),
                ]
            })
            .collect();
        let mut out = render(&["type", "serial", "device", "state", "outcome"], &rows);
        if with_log {
            let log: Vec<Vec<String>> = v["log"]
                .as_array()
                .into_iter()
                .flatten()
                .map(|e| {
                    let actor = match e["actor"]["name"].as_str() {
                        Some(n) => format!("{} {n}", s(&e["actor"], "kind")),
                        None => s(&e["actor"], "kind"),
                    };
                    vec![s(e, "at"), s(e, "input"), s(e, "to"), actor, s(e, "note")]
                })
                .collect();
            out += "\n";
            out += &render(&["at", "input", "state", "by", "note"], &log);
        }
        out
    });
    Ok(())
}

/// A path segment, percent-encoded.
fn enc(s: &str) -> String {
    s.bytes()
        .map(|b| match b {
            b'A'..=b'Z' | b'a'..=b'z' | b'0'..=b'9' | b'-' | b'_' | b'.' | b'~' => (b as char).to_string(),
            _ => format!("%{b:02X}"),
        })
        .collect()
}
