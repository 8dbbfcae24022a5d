//! Keeps an external Mosquitto's accounts in step with twinfleet's credentials, through
//! the broker's dynamic-security plugin (Mosquitto 2.0+), so that on that path too a
//! credential change takes effect at once and a device can only ever be itself.
//!
//! - A device token issued (or re-issued) becomes a broker client: username = client id
//!   = the twin id, password = the token, one role `twinfleet-device:{id}` that may only
//!   publish on `devices/{id}/…` and read `devices/{id}/commands`. The plugin refuses a
//!   CONNECT whose client id is not the account's, so no device can take over another's
//!   (or the transformer's) session.
//! - A claim token becomes a client `{type}` (no fixed client id: claimants choose the
//!   new device's) with the role `twinfleet-claim:{type}`: only its provisioning topics.
//!   A pre-registered batch's token becomes a client `{type}/{batch}` with the same
//!   topics (its devices name the batch in their request too: the transformer sees no
//!   username).
//! - Revoking or re-issuing a token, archiving or deleting a twin deletes the client;
//!   the plugin disconnects its open sessions as it does.
//! - On every (re)connect the task makes sure the transformer's own account holds the
//!   role `twinfleet-transformer` (the device topics, commands, provisioning), lists the
//!   roles it created and deletes the accounts of holders that may no longer connect
//!   ([`TwinRuntime::may_connect`]), so a revocation made while the broker was away
//!   lands when it comes back. Changes the broker has not answered yet are sent again.
//!
//! What it cannot do: twinfleet keeps only hashes of tokens, so a token issued while
//! this process was not running (or before `--mqtt-accounts` was set) has no broker
//! account until it is re-issued. Ids and types are broker usernames: a twin id equal
//! to a device type's id would share its account name (refused, logged).
//!
//! The transformer's account must be the plugin's administrator (`mosquitto_ctrl dynsec
//! init FILE USER PASSWORD` makes it so): see `deploy/mosquitto/`.

use super::transformer::TransformerSpec;
use rumqttc::{AsyncClient, Event, MqttOptions, Packet, QoS};
use serde_json::{Value, json};
use std::collections::BTreeMap;
use std::time::Duration;
use tokio::sync::mpsc;
use twinfleet_actors::{CredentialChange, TwinRuntime};

const CONTROL: &str = "$CONTROL/dynamic-security/v1";
const RESPONSE: &str = "$CONTROL/dynamic-security/v1/response";
/// The role twinfleet gives the transformer's own account.
pub const TRANSFORMER_ROLE: &str = "twinfleet-transformer";
const DEVICE_ROLE: &str = "twinfleet-device:";
const CLAIM_ROLE: &str = "twinfleet-claim:";
/// Errors the plugin answers for steps that are only there to be idempotent.
const EXPECTED: [&str; 3] = ["Role already exists", "Client not found", "Role not found"];

/// Which holders' accounts one broker keeps.
#[derive(Debug, Clone, Copy)]
pub(crate) struct Scope {
    pub devices: bool,
    pub claims: bool,
}

/// A holder as the broker sees it: its username, its role, and (devices) its client id.
struct Account {
    username: String,
    role: String,
    clientid: Option<String>,
    acls: Vec<Value>,
}

fn acl(kind: &str, topic: String) -> Value {
    json!({"acltype": kind, "topic": topic, "allow": true, "priority": 0})
}

/// Publish (`send`), or subscribe to and receive (`read`), each topic.
fn acls(send: &[String], read: &[String]) -> Vec<Value> {
    let mut v: Vec<Value> = send.iter().map(|t| acl("publishClientSend", t.clone())).collect();
    for t in read {
        v.push(acl("subscribePattern", t.clone()));
        v.push(acl("publishClientReceive", t.clone()));
    }
    v
}

fn account(holder: &str) -> Account {
    use super::topics::*;
    match holder.strip_prefix("claim/") {
        // (`<type>`, or `<type>/<batch>` for a pre-registered batch's token: the
        // username is the credential, the topics are the type's.)
        Some(cred) => {
            let ty = cred.split('/').next().unwrap_or_default();
            Account {
                username: cred.to_string(),
                role: format!("{CLAIM_ROLE}{cred}"),
                clientid: None,
                acls: acls(&[provisioning_request(ty, "+")], &[provisioning_response(ty, "+")]),
            }
        }
        None => Account {
            username: holder.to_string(),
            role: format!("{DEVICE_ROLE}{holder}"),
            clientid: Some(holder.to_string()),
            acls: acls(&Channel::ALL.map(|c| device_topic(holder, c.name())), &[device_topic(holder, COMMANDS)]),
        },
    }
}

/// The holder a role of ours belongs to.
fn holder_of_role(role: &str) -> Option<String> {
    role.strip_prefix(DEVICE_ROLE)
        .map(str::to_string)
        .or_else(|| role.strip_prefix(CLAIM_ROLE).map(twinfleet_actors::sessions::claim_holder))
}

/// The plugin commands that carry `change` out; the last one carries `correlation`.
fn commands(change: &CredentialChange, correlation: String) -> Vec<Value> {
    let mut cmds = match change {
        CredentialChange::Issued { holder, token } => {
            let a = account(holder);
            let mut client = json!({
                "command": "createClient", "username": a.username, "password": token,
                "roles": [{"rolename": a.role}],
            });
            if let Some(id) = a.clientid {
                client["clientid"] = json!(id);
            }
            vec![
                json!({"command": "createRole", "rolename": a.role, "acls": a.acls}),
                // A stale account (a change missed while away) goes first.
                json!({"command": "deleteClient", "username": a.username}),
                client,
            ]
        }
        CredentialChange::Ended { holder, .. } => {
            let a = account(holder);
            vec![
                json!({"command": "deleteClient", "username": a.username}),
                json!({"command": "deleteRole", "rolename": a.role}),
            ]
        }
    };
    if let Some(last) = cmds.last_mut() {
        last["correlationData"] = json!(correlation);
    }
    cmds
}

fn holder_of(change: &CredentialChange) -> &str {
    match change {
        CredentialChange::Issued { holder, .. } | CredentialChange::Ended { holder, .. } => holder,
    }
}

enum Ev {
    Connected,
    Lost,
    Response(bytes::Bytes),
}

/// Runs until `changes` closes (the platform shuts down) or the task is dropped.
pub(crate) async fn run(
    rt: TwinRuntime,
    spec: TransformerSpec,
    scope: Scope,
    mut changes: mpsc::UnboundedReceiver<CredentialChange>,
) {
    let mut o = MqttOptions::new(format!("{}-accounts", spec.client_id), spec.broker.host.clone(), spec.broker.port);
    o.set_keep_alive(Duration::from_secs(30));
    o.set_clean_session(true);
    let Some(admin) = spec.broker.username.clone() else {
        tracing::error!("--mqtt-accounts needs the transformer's broker username (mqtt://USER:PASSWORD@…)");
        return;
    };
    o.set_credentials(admin.clone(), spec.broker.password.clone().unwrap_or_default());
    let (client, mut events) = AsyncClient::new(o, 1_024);
    let (ev_tx, mut ev) = mpsc::channel(64);
    let broker = spec.broker.to_string();
    let poller = tokio::spawn(async move {
        let mut delay = Duration::from_millis(100);
        loop {
            let e = match events.poll().await {
                Ok(Event::Incoming(Packet::ConnAck(_))) => {
                    delay = Duration::from_millis(100);
                    Some(Ev::Connected)
                }
                Ok(Event::Incoming(Packet::Publish(p))) if p.topic == RESPONSE => Some(Ev::Response(p.payload)),
                Ok(_) => None,
                Err(e) => {
                    tracing::debug!("broker accounts: cannot reach {broker}: {e}");
                    let _ = ev_tx.send(Ev::Lost).await;
                    tokio::time::sleep(delay).await;
                    delay = (delay * 2).min(Duration::from_secs(5));
                    None
                }
            };
            if let Some(e) = e
                && ev_tx.send(e).await.is_err()
            {
                return;
            }
        }
    });
    let in_scope = |holder: &str| if holder.starts_with("claim/") { scope.claims } else { scope.devices };
    let send = |cmds: Vec<Value>| {
        let client = client.clone();
        async move {
            let body = json!({ "commands": cmds }).to_string();
            if let Err(e) = client.publish(CONTROL, QoS::AtLeastOnce, false, body).await {
                tracing::warn!("broker accounts: cannot queue a change: {e}");
            }
        }
    };
    // Changes not answered by the broker yet, in order.
    let mut unconfirmed: BTreeMap<u64, Vec<Value>> = BTreeMap::new();
    let mut next = 0u64;
    let mut connected = false;
    loop {
        tokio::select! {
            e = ev.recv() => match e {
                None => break,
                Some(Ev::Lost) => connected = false,
                Some(Ev::Connected) => {
                    connected = true;
                    tracing::info!("broker accounts: connected to {}", spec.broker);
                    if let Err(e) = client.subscribe(RESPONSE, QoS::AtLeastOnce).await {
                        tracing::warn!("broker accounts: cannot subscribe to the plugin's answers: {e}");
                    }
                    let read: Vec<String> =
                        super::topics::device_filters().chain([super::topics::PROVISIONING_FILTER.to_string()]).collect();
                    let mine = acls(&["devices/+/commands".into(), super::topics::provisioning_response("+", "+")], &read);
                    send(vec![
                        json!({"command": "createRole", "rolename": TRANSFORMER_ROLE, "acls": mine}),
                        json!({"command": "addClientRole", "username": admin, "rolename": TRANSFORMER_ROLE}),
                        json!({"command": "listRoles", "correlationData": "list"}),
                    ])
                    .await;
                    for cmds in unconfirmed.values() {
                        send(cmds.clone()).await;
                    }
                }
                Some(Ev::Response(body)) => {
                    for stale in answered(&rt, &body, &mut unconfirmed) {
                        next += 1;
                        let cmds = commands(&CredentialChange::Ended { holder: stale, reason: "reconciled" }, next.to_string());
                        unconfirmed.insert(next, cmds.clone());
                        send(cmds).await;
                    }
                }
            },
            c = changes.recv() => match c {
                None => break,
                Some(change) if in_scope(holder_of(&change)) => {
                    if !holder_of(&change).starts_with("claim/") && rt.device_type(holder_of(&change)).is_ok() {
                        rt.rejections().reject("broker_account", || {
                            format!("twin id {:?} is also a device type's: its broker account would be the claim account", holder_of(&change))
                        });
                        continue;
                    }
                    next += 1;
                    let cmds = commands(&change, next.to_string());
                    unconfirmed.insert(next, cmds.clone());
                    if connected {
                        send(cmds).await;
                    }
                }
                Some(_) => {}
            },
        }
    }
    poller.abort();
    let _ = client.disconnect().await;
}

/// Reads one answer of the plugin: confirms the changes it answers, counts real errors,
/// and returns the holders whose accounts exist but may no longer connect (from the
/// role list).
fn answered(rt: &TwinRuntime, body: &[u8], unconfirmed: &mut BTreeMap<u64, Vec<Value>>) -> Vec<String> {
    let Ok(v) = serde_json::from_slice::<Value>(body) else {
        tracing::warn!("broker accounts: an answer that is not JSON");
        return vec![];
    };
    let mut stale = Vec::new();
    for r in v["responses"].as_array().into_iter().flatten() {
        let command = r["command"].as_str().unwrap_or("?");
        // (Mosquitto 2.0.11 answers "Internal error" when the transformer's account has
        // its role already, on every reconnect after the first.)
        if let Some(err) = r["error"].as_str()
            && !EXPECTED.contains(&err)
            && command != "addClientRole"
        {
            rt.rejections()
                .reject("broker_account", || format!("the broker's dynamic-security plugin: {command}: {err}"));
        }
        match r["correlationData"].as_str() {
            Some("list") => {
                let roles = r["data"]["roles"].as_array().cloned().unwrap_or_default();
                for role in roles.iter().filter_map(Value::as_str) {
                    if let Some(holder) = holder_of_role(role)
                        && !rt.may_connect(&holder)
                    {
                        stale.push(holder);
                    }
                }
            }
            Some(seq) => {
                if let Ok(seq) = seq.parse::<u64>() {
                    unconfirmed.remove(&seq);
                }
            }
            None => {}
        }
    }
    stale
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_device_account_is_bound_to_its_id_and_its_own_topics() {
        let a = account("x-0");
        assert_eq!((a.username.as_str(), a.clientid.as_deref()), ("x-0", Some("x-0")));
        let topics: Vec<&str> = a.acls.iter().map(|a| a["topic"].as_str().unwrap()).collect();
        assert!(topics.iter().all(|t| t.starts_with("devices/x-0/")), "{topics:?}");
        let b = account("claim/valve/lot-1");
        assert_eq!((b.username.as_str(), b.role.as_str()), ("valve/lot-1", "twinfleet-claim:valve/lot-1"));
        assert_eq!(b.acls[0]["topic"], "provisioning/valve/+/request");
        assert_eq!(holder_of_role(&b.role).as_deref(), Some("claim/valve/lot-1"));
        let c = account("claim/valve");
        assert_eq!((c.username.as_str(), c.clientid), ("valve", None));
        assert_eq!(holder_of_role(&a.role).as_deref(), Some("x-0"));
        assert_eq!(holder_of_role(&c.role).as_deref(), Some("claim/valve"));
        assert_eq!(holder_of_role("admin"), None);
        let issue = commands(&CredentialChange::Issued { holder: "x-0".into(), token: "t".into() }, "3".into());
        assert_eq!(issue.last().unwrap()["correlationData"], json!("3"));
        assert_eq!(issue.last().unwrap()["clientid"], json!("x-0"));
    }
}
