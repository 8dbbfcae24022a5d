//! The MQTT path against a real Mosquitto started by the test, with `mosquitto_pub` and
//! `mosquitto_sub` as the devices and the configuration twinfleet ships
//! (deploy/mosquitto/: settings and the dynamic-security plugin, whose accounts
//! twinfleet keeps).
//! Needs the Debian packages `mosquitto` and `mosquitto-clients` (`.ci/run` installs
//! them); without them the test says so loudly and skips, except under CI, where it
//! fails.

use crate::mqtt::addr;
use crate::support::*;
use serde_json::{Value, json};
use std::io::Write;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::Duration;
use twinfleet::TelemetryQuery;
use twinfleet::models::{EventKind, Timestamp};
use twinfleet_protocols::mqtt::{MqttConfig, MqttGateway};

const TRANSFORMER_PW: &str = "transformer-secret";

fn mosquitto() -> Option<PathBuf> {
    ["/usr/sbin/mosquitto", "/usr/local/sbin/mosquitto", "/usr/bin/mosquitto"]
        .into_iter()
        .map(PathBuf::from)
        .find(|p| p.exists())
        .filter(|_| Command::new("mosquitto_pub").arg("--help").output().is_ok())
}

struct Broker {
    child: Child,
    port: u16,
    bin: PathBuf,
    conf: PathBuf,
}

impl Drop for Broker {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

impl Broker {
    fn spawn(bin: &Path, conf: &Path, port: u16) -> Child {
        let child = Command::new(bin).arg("-c").arg(conf).stdout(Stdio::null()).stderr(Stdio::null()).spawn().unwrap();
        let deadline = std::time::Instant::now() + Duration::from_secs(10);
        while std::net::TcpStream::connect(("127.0.0.1", port)).is_err() {
            assert!(std::time::Instant::now() < deadline, "mosquitto did not start listening");
            std::thread::sleep(Duration::from_millis(20));
        }
        child
    }

    /// A clean restart (SIGTERM, as `systemctl restart` does), on the same port.
    fn restart(&mut self) {
        let pid = self.child.id().to_string();
        assert!(Command::new("kill").args(["-TERM", &pid]).status().unwrap().success());
        let _ = self.child.wait();
        self.child = Self::spawn(&self.bin, &self.conf, self.port);
    }
}

/// Where Debian puts the dynamic-security plugin.
const DYNSEC_PLUGIN: &str = "/usr/lib/x86_64-linux-gnu/mosquitto_dynamic_security.so";

/// Mosquitto on a free loopback port with the shipped settings and the shipped
/// dynamic-security configuration (deploy/mosquitto/), the transformer as the plugin's
/// administrator and no other account (twinfleet creates the devices'), its
/// persistence in `dir`.
fn start_mosquitto(bin: &Path, dir: &Path) -> Broker {
    let port = std::net::TcpListener::bind("127.0.0.1:0").unwrap().local_addr().unwrap().port();
    let accounts = dir.join("dynamic-security.json");
    let out = Command::new("mosquitto_ctrl")
        .args(["dynsec", "init"])
        .arg(&accounts)
        .args(["twinfleet-transformer", TRANSFORMER_PW])
        .output()
        .unwrap();
    assert!(out.status.success(), "mosquitto_ctrl dynsec init: {}", String::from_utf8_lossy(&out.stderr));
    let shipped = Path::new(env!("CARGO_MANIFEST_DIR")).join("deploy/mosquitto");
    let included = dir.join("conf.d");
    std::fs::create_dir_all(&included).unwrap();
    std::fs::copy(shipped.join("twinfleet.conf"), included.join("twinfleet.conf")).unwrap();
    let dynsec = std::fs::read_to_string(shipped.join("dynamic-security.conf")).unwrap();
    assert!(dynsec.contains(DYNSEC_PLUGIN) && dynsec.contains("/var/lib/mosquitto/dynamic-security.json"));
    let dynsec = dynsec.replace("/var/lib/mosquitto/dynamic-security.json", &accounts.display().to_string());
    std::fs::write(included.join("dynamic-security.conf"), dynsec).unwrap();
    let store = dir.join("mosquitto-db");
    std::fs::create_dir_all(&store).unwrap();
    let conf = dir.join("mosquitto.conf");
    std::fs::write(
        &conf,
        format!(
            // (`user`: Mosquitto started as root would drop to `mosquitto`, who cannot
            // write the test's private directory.)
            "listener {port} 127.0.0.1\nuser {}\npersistence_location {}/\n\
             max_inflight_messages 1000\ninclude_dir {}\n",
            std::env::var("USER").ok().filter(|u| !u.is_empty()).unwrap_or_else(|| "root".into()),
            store.display(),
            included.display()
        ),
    )
    .unwrap();
    let child = Broker::spawn(bin, &conf, port);
    Broker { child, port, bin: bin.to_path_buf(), conf }
}

/// Runs `mosquitto_pub` with `args` (host and port given), returning whether it
/// connected and published.
fn mosquitto_pub(port: u16, args: &[&str]) -> bool {
    let out = Command::new("mosquitto_pub").args(["-h", "127.0.0.1", "-p", &port.to_string()]).args(args).output();
    out.unwrap().status.success()
}

/// Sends dynamic-security commands as the plugin's administrator (the transformer).
fn dynsec(port: u16, commands: Value) {
    let body = json!({ "commands": commands }).to_string();
    let admin = ["-u", "twinfleet-transformer", "-P", TRANSFORMER_PW, "-q", "1"];
    assert!(mosquitto_pub(port, &[&admin[..], &["-t", "$CONTROL/dynamic-security/v1", "-m", &body]].concat()));
}

/// Waits until device `id` can log in to the broker with `token` (twinfleet has
/// created its account), or, with `works = false`, until it can no longer.
async fn login(port: u16, id: &str, token: &str, works: bool) {
    let (id, token) = (id.to_string(), token.to_string());
    let what = format!("{id}'s broker login {}", if works { "works" } else { "is refused" });
    eventually(&what, || {
        let (id, token) = (id.clone(), token.clone());
        async move {
            let ok = actix_rt::task::spawn_blocking(move || {
                let topic = format!("devices/{id}/status");
                mosquitto_pub(port, &["-i", &id, "-u", &id, "-P", &token, "-t", &topic, "-m", r#"{"status":"online"}"#])
            })
            .await
            .unwrap();
            (ok == works).then_some(())
        }
    })
    .await;
}

/// `mosquitto_pub` as device `id`, one message per line of `lines`, QoS 1.
async fn publish(port: u16, id: &str, token: &str, topic: &str, lines: Vec<String>) {
    publish_with(port, id, token, topic, lines, &[]).await
}

/// `publish` with more `mosquitto_pub` arguments (e.g. `-r`: retained).
async fn publish_with(port: u16, id: &str, token: &str, topic: &str, lines: Vec<String>, extra: &[&str]) {
    let (id, token, topic) = (id.to_string(), token.to_string(), topic.to_string());
    let extra: Vec<String> = extra.iter().map(|s| s.to_string()).collect();
    let out = actix_rt::task::spawn_blocking(move || {
        let mut child = Command::new("mosquitto_pub")
            .args(["-h", "127.0.0.1", "-p", &port.to_string(), "-i", &id, "-u", &id, "-P", &token])
            .args(["-q", "1", "-t", &topic, "-l"])
            .args(&extra)
            .stdin(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .unwrap();
        let mut stdin = child.stdin.take().unwrap();
        for l in lines {
            writeln!(stdin, "{l}").unwrap();
        }
        drop(stdin);
        child.wait_with_output().unwrap()
    })
    .await
    .unwrap();
    assert!(out.status.success(), "mosquitto_pub: {}", String::from_utf8_lossy(&out.stderr));
}

/// How many distinct timestamps of `metric` the twin holds in `[from, from + n]`.
async fn distinct_points(twin: &twinfleet::TwinHandle, metric: &str, from: i64, n: i64) -> usize {
    let q =
        TelemetryQuery { metric: Some(metric.into()), from: Timestamp(from), to: Timestamp(from + n), limit: 10_000 };
    let mut ts: Vec<i64> = twin.telemetry_query(q).await.unwrap().iter().map(|p| p.at.0).collect();
    ts.sort();
    ts.dedup();
    ts.len()
}

fn gateway_config(port: u16) -> MqttConfig {
    let url = format!("mqtt://twinfleet-transformer:{TRANSFORMER_PW}@127.0.0.1:{port}");
    MqttConfig {
        operational: url.parse().unwrap(),
        provisioning: url.parse().unwrap(),
        broker_accounts: true,
        ..MqttConfig::default()
    }
}

#[actix_rt::test]
async fn mosquitto_devices_reach_their_twins_and_nothing_is_lost_across_a_transformer_restart() {
    let Some(bin) = mosquitto() else {
        assert!(std::env::var_os("CI").is_none(), "CI must install mosquitto and mosquitto-clients (see .ci/run)");
        eprintln!(
            "\n*** SKIPPED mosquitto: mosquitto / mosquitto-clients not found (apt-get install mosquitto mosquitto-clients) ***\n"
        );
        return;
    };
    let dir = tempfile::tempdir().unwrap();
    let p = start(&dir.path().join("data"), None, test_settings()).await;
    fleet(&p, "valve", json!({}), "x", 2, |_| vec![]).await;
    let broker = start_mosquitto(&bin, dir.path());
    let port = broker.port;
    let gw = MqttGateway::start(p.runtime().clone(), gateway_config(port)).await.unwrap();
    assert_eq!(addr(gw.operational()), format!("127.0.0.1:{port}"));
    // Tokens issued now become broker accounts (the dynamic-security plugin).
    let t0 = p.issue_device_token("x-0").await.unwrap();
    let t1 = p.issue_device_token("x-1").await.unwrap();
    login(port, "x-0", &t0, true).await;
    login(port, "x-1", &t1, true).await;
    // "ghost" is a broker user without a twin (made by hand, so twinfleet leaves it be).
    dynsec(
        port,
        json!([
            {"command": "createRole", "rolename": "ghost",
             "acls": [{"acltype": "publishClientSend", "topic": "devices/ghost/state", "allow": true}]},
            {"command": "createClient", "username": "ghost", "password": "ghost-pw", "roles": [{"rolename": "ghost"}]},
        ]),
    );
    let (x0, x1) = (p.twin("x-0").unwrap(), p.twin("x-1").unwrap());

    // State and telemetry from mosquitto_pub.
    publish(port, "x-0", &t0, "devices/x-0/state", vec![json!({"fw": "m1"}).to_string()]).await;
    publish(port, "x-0", &t0, "devices/x-0/telemetry", vec![json!({"values": {"flow": 3.5}}).to_string()]).await;
    eventually("state and telemetry from mosquitto_pub", || async {
        let v = x0.get().await.unwrap();
        (v.state.reported.get("fw") == Some(&json!("m1")) && v.telemetry_latest.contains_key("flow")).then_some(())
    })
    .await;

    // A command from the twin reaches mosquitto_sub; the ack comes back. The device
    // holds a persistent session (-c): subscribed once (-E: exit after the SUBACK), it
    // gets the command the broker kept while it was away.
    let token = t0.clone();
    let sub = move |extra: &[&str]| {
        let mut c = Command::new("mosquitto_sub");
        c.args(["-h", "127.0.0.1", "-p", &port.to_string(), "-i", "x-0", "-u", "x-0", "-P", &token])
            .args(["-c", "-q", "1", "-t", "devices/x-0/commands"])
            .args(extra);
        c.output().unwrap()
    };
    let out = sub(&["-E"]);
    assert!(out.status.success(), "mosquitto_sub -E: {}", String::from_utf8_lossy(&out.stderr));
    // No client-id takeover: x-1, with its own good token, cannot connect with x-0's
    // client id (which would end x-0's persistent session, and with it the command
    // below) nor with the transformer's (whose queued telemetry it would take).
    for victim in ["x-0", "twinfleet-transformer"] {
        let args = ["-i", victim, "-u", "x-1", "-P", &t1, "-t", "devices/x-1/status", "-m", "{}"];
        assert!(!mosquitto_pub(port, &args), "x-1 connected with the client id {victim:?}");
    }
    x0.set_desired(obj(json!({"open": true}))).await.unwrap();
    let out = actix_rt::task::spawn_blocking(move || sub(&["-C", "1", "-W", "30"])).await.unwrap();
    assert!(out.status.success(), "mosquitto_sub: {}", String::from_utf8_lossy(&out.stderr));
    let cmd: Value = serde_json::from_slice(&out.stdout).expect("a JSON command");
    assert_eq!(cmd["apply_desired"]["open"], json!(true), "{cmd}");
    let command_id = cmd["command_id"].as_str().unwrap().to_string();
    let ack = json!({"command_id": command_id, "success": true}).to_string();
    publish(port, "x-0", &t0, "devices/x-0/acks", vec![ack]).await;
    eventually("the ack from mosquitto_pub", || async {
        let events = x0.events(50).await.unwrap();
        events
            .iter()
            .any(|e| matches!(&e.kind, EventKind::CommandAcked { command_id: c, .. } if *c == command_id))
            .then_some(())
    })
    .await;

    // x-0 cannot publish as x-1 (the ACL drops it) and its bad JSON is counted.
    publish(port, "x-0", &t0, "devices/x-1/state", vec![json!({"hijacked": true}).to_string()]).await;
    publish(port, "x-0", &t0, "devices/x-0/state", vec!["{oops".into(), json!({"after": 1}).to_string()]).await;
    eventually("x-0's later message", || async {
        x0.get().await.unwrap().state.reported.contains_key("after").then_some(())
    })
    .await;
    assert!(!x1.get().await.unwrap().state.reported.contains_key("hijacked"), "x-1 was not written by x-0");
    assert_eq!(p.rejections().count("malformed"), 1);
    // A broker user without a twin is counted as an unknown device by the transformer.
    publish(port, "ghost", "ghost-pw", "devices/ghost/state", vec![json!({"boo": 1}).to_string()]).await;
    eventually("the unknown device is counted", || async {
        (p.rejections().count("unknown_device") == 1).then_some(())
    })
    .await;

    // QoS 1 across a transformer restart: 2,000 points with distinct timestamps, the
    // transformer stopped while they flow and started again; every point arrives.
    let base = p.now().0 - 10_000_000;
    let lines: Vec<String> =
        (0..2_000).map(|i| json!({"ts": base + i, "values": {"seq": i as f64}}).to_string()).collect();
    let token = t1.clone();
    let pubs = actix_rt::spawn(async move { publish(port, "x-1", &token, "devices/x-1/telemetry", lines).await });
    eventually("the first points land", || async {
        x1.get().await.unwrap().telemetry_latest.contains_key("seq").then_some(())
    })
    .await;
    gw.stop().await;
    pubs.await.unwrap();
    let gw = MqttGateway::start(p.runtime().clone(), gateway_config(port)).await.unwrap();
    let count = || distinct_points(&x1, "seq", base, 2_000);
    // (A transformer that acknowledged on receipt instead lost the ~50 points it held
    // when stopped; the broker does not redeliver what was acknowledged.)
    eventually("all 2,000 points after the restart", || async { (count().await == 2_000).then_some(()) }).await;

    // A retained state is taken live, but when the broker replays it to the restarted
    // transformer's subscription it is old news: ignored (counted), never overwriting the
    // newer state that came since.
    publish_with(port, "x-0", &t0, "devices/x-0/state", vec![json!({"stale": true}).to_string()], &["-r"]).await;
    publish(port, "x-0", &t0, "devices/x-0/state", vec![json!({"stale": false}).to_string()]).await;
    eventually("the live state after the retained one", || async {
        (x0.get().await.unwrap().state.reported.get("stale") == Some(&json!(false))).then_some(())
    })
    .await;
    gw.stop().await;
    let gw = MqttGateway::start(p.runtime().clone(), gateway_config(port)).await.unwrap();
    eventually("the replayed retained message is counted", || async {
        (p.rejections().count("retained") >= 1).then_some(())
    })
    .await;
    assert_eq!(x0.get().await.unwrap().state.reported.get("stale"), Some(&json!(false)), "no old state came back");

    // QoS 1 across a broker restart: the transformer is away, 3,000 points (more than
    // Mosquitto's default queue of 1,000) wait in its persistent session, the broker
    // restarts, the transformer comes back: every point the broker acknowledged lands.
    gw.stop().await;
    let base2 = base + 1_000_000;
    let lines: Vec<String> =
        (0..3_000).map(|i| json!({"ts": base2 + i, "values": {"late": i as f64}}).to_string()).collect();
    publish(port, "x-1", &t1, "devices/x-1/telemetry", lines).await;
    let mut broker = broker;
    broker.restart();
    let gw = MqttGateway::start(p.runtime().clone(), gateway_config(port)).await.unwrap();
    let landed = || distinct_points(&x1, "late", base2, 3_000);
    eventually("all 3,000 points queued in the broker across its restart", || async {
        (landed().await == 3_000).then_some(())
    })
    .await;

    // A credential change reaches the broker: revoking x-0's token deletes its account,
    // which ends its open session at once; the old token opens nothing; a new token works.
    // (x-0's persistent session holds the command until mosquitto_sub reads it: then it
    // is surely connected.)
    x0.set_desired(obj(json!({"open": false}))).await.unwrap();
    let mut listener = Command::new("mosquitto_sub")
        .args(["-h", "127.0.0.1", "-p", &port.to_string(), "-i", "x-0", "-u", "x-0", "-P", &t0])
        .args(["-c", "-q", "1", "-t", "devices/x-0/commands", "-C", "2", "-W", "60"])
        .stdout(Stdio::piped())
        .spawn()
        .unwrap();
    let stdout = listener.stdout.take().unwrap();
    let first = actix_rt::task::spawn_blocking(move || {
        let mut line = String::new();
        std::io::BufRead::read_line(&mut std::io::BufReader::new(stdout), &mut line).unwrap();
        line
    });
    assert!(first.await.unwrap().contains("command_id"), "x-0 got its command");
    let revoked = std::time::Instant::now();
    p.revoke_device_token("x-0").await.unwrap();
    let status = actix_rt::task::spawn_blocking(move || listener.wait().unwrap()).await.unwrap();
    let lasted = revoked.elapsed();
    assert!(!status.success() && lasted < Duration::from_secs(30), "the session outlived the revocation: {status:?}");
    login(port, "x-0", &t0, false).await;
    let t0b = p.issue_device_token("x-0").await.unwrap();
    login(port, "x-0", &t0b, true).await;

    // A revocation while the transformer is away lands when it comes back (reconciled).
    gw.stop().await;
    p.revoke_device_token("x-1").await.unwrap();
    assert!(mosquitto_pub(port, &["-i", "x-1", "-u", "x-1", "-P", &t1, "-t", "devices/x-1/status", "-m", "{}"]));
    let gw = MqttGateway::start(p.runtime().clone(), gateway_config(port)).await.unwrap();
    login(port, "x-1", &t1, false).await;
    login(port, "x-0", &t0b, true).await;
    assert!(mosquitto_pub(
        port,
        &["-i", "ghost", "-u", "ghost", "-P", "ghost-pw", "-t", "devices/ghost/state", "-m", "{}"]
    ));

    // Provisioning through the broker: the claim token becomes the type's claim account;
    // the device claims, gets its token, and that token is a working broker login.
    // Every claimant of the type shares that account, so another one may read all of the
    // type's responses: a spy subscribed to them sees the answer, but only sealed with
    // the claimant's proof.
    let claim = p.issue_claim_token("valve").await.unwrap();
    let addr = format!("127.0.0.1:{port}");
    let resp = eventually("the claim account exists", || async {
        let r = twinfleet_protocols::mqtt::MqttDevice::provision(&addr, "valve", "x-none", &claim, json!({})).await;
        r.ok().filter(|r| r.error.as_deref().is_some_and(|e| e.contains("proof")))
    })
    .await;
    assert!(!resp.ok && resp.token.is_none(), "a claim without a proof is refused through the broker: {resp:?}");
    let spy = Command::new("mosquitto_sub")
        .args(["-h", "127.0.0.1", "-p", &port.to_string(), "-i", "spy", "-u", "valve", "-P", &claim])
        .args(["-q", "1", "-t", "provisioning/valve/+/response", "-C", "1", "-W", "60", "-v"])
        .stdout(Stdio::piped())
        .spawn()
        .unwrap();
    // (The spy is subscribed once a message it may read reaches it: keep claiming.)
    tokio::time::sleep(Duration::from_millis(500)).await;
    let proof = "x-new's own secret, 32 bytes long";
    let identity = json!({"serial": "x-new", "mac": "0e"});
    let resp =
        twinfleet_protocols::mqtt::MqttDevice::provision_with_proof(&addr, "valve", "x-new", &claim, identity, proof)
            .await
            .unwrap();
    assert!(resp.ok, "{resp:?}");
    let new_token = resp.token.clone().unwrap();
    let seen = actix_rt::task::spawn_blocking(move || spy.wait_with_output().unwrap()).await.unwrap();
    let seen = String::from_utf8_lossy(&seen.stdout).to_string();
    assert!(seen.contains("provisioning/valve/x-new/response") && seen.contains("sealed_token"), "{seen}");
    assert!(!seen.contains(&new_token), "the spy saw the plain token: {seen}");
    // Claiming the same serial again with another proof is refused: the spy cannot
    // take over the process either.
    let stolen = twinfleet_protocols::mqtt::MqttDevice::provision_with_proof(
        &addr,
        "valve",
        "x-new",
        &claim,
        json!({"serial": "x-new", "mac": "0e"}),
        "the spy's guess, also 32 bytes!!",
    )
    .await
    .unwrap();
    assert!(!stolen.ok && stolen.token.is_none() && stolen.sealed_token.is_none(), "{stolen:?}");
    login(port, "x-new", &new_token, true).await;
    eventually("the provisioned device is operational", || async {
        (p.runtime().claim_view("valve", "x-new").unwrap().outcome.as_deref() == Some("operational")).then_some(())
    })
    .await;

    gw.stop().await;
    p.shutdown().await;
    drop(broker);
}

/// Mosquitto on a free loopback port, anonymous, with persistence in `dir` (a
/// subscriber's persistent session survives a clean restart): the destination of the
/// MQTT exports and notification sinks, which publish to a broker as any client does.
fn start_plain_mosquitto(bin: &Path, dir: &Path) -> Broker {
    let port = std::net::TcpListener::bind("127.0.0.1:0").unwrap().local_addr().unwrap().port();
    let store = dir.join("plain-db");
    std::fs::create_dir_all(&store).unwrap();
    let conf = dir.join("plain.conf");
    std::fs::write(
        &conf,
        format!(
            "listener {port} 127.0.0.1\nallow_anonymous true\nuser {}\npersistence true\npersistence_location {}/\n",
            std::env::var("USER").ok().filter(|u| !u.is_empty()).unwrap_or_else(|| "root".into()),
            store.display(),
        ),
    )
    .unwrap();
    let child = Broker::spawn(bin, &conf, port);
    Broker { child, port, bin: bin.to_path_buf(), conf }
}

/// `mosquitto_sub -v` on `twinfleet/#` with a persistent QoS 1 session: every line it
/// printed (`topic payload`).
struct Watcher {
    child: Child,
    lines: std::sync::Arc<std::sync::Mutex<Vec<String>>>,
}

impl Drop for Watcher {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

impl Watcher {
    /// Subscribes, and returns once a probe published on the broker came through.
    async fn start(port: u16) -> Watcher {
        use std::io::BufRead;
        let mut child = Command::new("mosquitto_sub")
            .args(["-h", "127.0.0.1", "-p", &port.to_string(), "-i", "watcher", "-c", "-q", "1", "-v"])
            .args(["-t", "twinfleet/#"])
            .stdout(Stdio::piped())
            .stderr(Stdio::null())
            .spawn()
            .unwrap();
        let out = child.stdout.take().unwrap();
        let lines = std::sync::Arc::new(std::sync::Mutex::new(Vec::new()));
        let l = lines.clone();
        std::thread::spawn(move || {
            for line in std::io::BufReader::new(out).lines() {
                let Ok(line) = line else { return };
                l.lock().unwrap().push(line);
            }
        });
        let w = Watcher { child, lines };
        eventually("the watcher is subscribed", || async {
            let _ = actix_rt::task::spawn_blocking(move || mosquitto_pub(port, &["-t", "twinfleet/probe", "-m", "p"]))
                .await;
            w.on("twinfleet/probe").first().map(drop)
        })
        .await;
        w
    }

    /// The payloads of the lines on topics starting with `prefix`, as JSON where they
    /// are.
    fn on(&self, prefix: &str) -> Vec<Value> {
        let lines = self.lines.lock().unwrap();
        lines
            .iter()
            .filter_map(|l| l.split_once(' '))
            .filter(|(t, _)| t.starts_with(prefix))
            .map(|(t, p)| {
                let mut v = serde_json::from_str(p).unwrap_or(Value::String(p.to_string()));
                if let Value::Object(m) = &mut v {
                    m.insert("topic".into(), t.into());
                }
                v
            })
            .collect()
    }
}

/// The (twin, metric, at) of every point the history messages seen so far carry.
fn exported(w: &Watcher) -> Vec<(String, String, i64)> {
    let mut v = Vec::new();
    for m in w.on("twinfleet/history/") {
        assert_eq!(m["topic"], format!("twinfleet/history/meter/{}", m["twin"].as_str().unwrap()));
        for p in m["points"].as_array().unwrap() {
            v.push((
                m["twin"].as_str().unwrap().into(),
                p["metric"].as_str().unwrap().into(),
                p["at"].as_i64().unwrap(),
            ));
        }
    }
    v
}

#[actix_rt::test]
async fn history_exports_and_alert_notifications_reach_a_real_mosquitto_across_its_restart() {
    use std::sync::atomic::Ordering::Relaxed;
    use twinfleet::models::MetricPoint;
    use twinfleet::models::export::{ExportKind, ExportSpec, FileFormat};
    use twinfleet::models::notify::{SinkKind, SinkSpec};
    let Some(bin) = mosquitto() else {
        assert!(std::env::var_os("CI").is_none(), "CI must install mosquitto and mosquitto-clients (see .ci/run)");
        eprintln!(
            "SKIPPED: mosquitto and mosquitto-clients are not installed (apt-get install mosquitto mosquitto-clients)"
        );
        return;
    };
    let dir = tempfile::tempdir().unwrap();
    let mut broker = start_plain_mosquitto(&bin, dir.path());
    let port = broker.port;
    let watcher = Watcher::start(port).await;

    let clock = virtual_clock();
    let p = start(dir.path(), Some(clock.clone()), test_settings()).await;
    let rules = json!({"rules": {"hot": {"kind": "threshold", "metric": "temp", "above": 80, "clear_below": 75, "severity": "major"}}});
    fleet(&p, "meter", rules, "m", 2, |_| vec![]).await;
    let url = format!("mqtt://127.0.0.1:{port}");
    let export = ExportSpec {
        name: "bus".into(),
        device_type: Some("meter".into()),
        group: None,
        metrics: vec![],
        kind: ExportKind::Mqtt,
        url: url.clone(),
        secret: String::new(),
        topic: String::new(),
        username: String::new(),
        password: String::new(),
        path: String::new(),
        format: FileFormat::Ndjson,
        batch_points: 100,
    };
    let exporter = twinfleet_protocols::Exporter::start(p.runtime().clone(), dir.path(), vec![export]).unwrap();
    let sink = SinkSpec {
        name: "bus".into(),
        kind: SinkKind::Mqtt,
        url,
        secret: String::new(),
        topic: "twinfleet/alerts/{device_type}/{severity}/{twin}".into(),
        username: String::new(),
        password: String::new(),
        min_severity: Some(twinfleet::models::Severity::Major),
        device_types: vec![],
        groups: vec![],
        acknowledgements: false,
    };
    let notifier = twinfleet_protocols::Notifier::start(p.runtime().clone(), vec![sink]).unwrap();
    eventually("the sink has its cursor", || async { p.runtime().alert_book().sink_cursor("bus").unwrap().map(drop) })
        .await;

    let ingest = async |twin: &str, temps: &[f64]| -> Vec<(String, String, i64)> {
        let now = p.runtime().clock().now();
        let points: Vec<MetricPoint> = temps
            .iter()
            .enumerate()
            .map(|(i, &v)| MetricPoint { metric: "temp".into(), at: Timestamp(now.0 + i as i64), value: v })
            .collect();
        let keys = points.iter().map(|pt| (twin.to_string(), "temp".to_string(), pt.at.0)).collect();
        p.twin(twin).unwrap().ingest(points).await.unwrap();
        clock.advance(1_000);
        keys
    };
    let mut sent = ingest("m-0", &[20.0, 21.0, 22.0]).await;
    sent.extend(ingest("m-1", &[95.0, 96.0]).await); // raised
    let want = sent.len();
    eventually("the first points and the raise reach the broker", || async {
        (exported(&watcher).len() >= want && !watcher.on("twinfleet/alerts/").is_empty()).then_some(())
    })
    .await;

    // The broker goes away (a clean stop: it keeps the watcher's session), and comes back
    // after both have failed at least once.
    let pid = broker.child.id().to_string();
    assert!(Command::new("kill").args(["-TERM", &pid]).status().unwrap().success());
    let _ = broker.child.wait();
    sent.extend(ingest("m-0", &[23.0]).await);
    sent.extend(ingest("m-1", &[70.0]).await); // cleared
    let export_stats = p.runtime().exports().stats("bus");
    let sink_stats = p.runtime().alert_book().sink_stats("bus");
    eventually("both have failed while the broker was down", || async {
        (export_stats.failed.load(Relaxed) > 0 && sink_stats.failed.load(Relaxed) > 0).then_some(())
    })
    .await;
    broker.child = Broker::spawn(&broker.bin, &broker.conf, port);

    sent.sort();
    let got = eventually("every point reaches the broker", || async {
        let mut got = exported(&watcher);
        got.sort();
        got.dedup();
        (got.len() >= sent.len()).then_some(got)
    })
    .await;
    assert_eq!(got, sent, "every point, nothing else");
    let alerts = eventually("the clear reaches the broker", || async {
        let a = watcher.on("twinfleet/alerts/");
        (a.len() >= 2).then_some(a)
    })
    .await;
    let states: Vec<(&str, &str)> =
        alerts.iter().map(|a| (a["topic"].as_str().unwrap(), a["alert"]["state"].as_str().unwrap())).collect();
    assert_eq!(
        states[..2],
        [("twinfleet/alerts/meter/major/m-1", "raised"), ("twinfleet/alerts/meter/major/m-1", "cleared")],
        "in order, on the topic the sink names"
    );
    assert!(alerts.windows(2).all(|w| w[0]["revision"].as_u64() <= w[1]["revision"].as_u64()));
    assert!(exported(&watcher).len() <= sent.len() + 100, "at most one batch repeated");
    exporter.stop();
    notifier.stop();
    p.shutdown().await;
}
