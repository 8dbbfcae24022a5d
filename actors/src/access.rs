//! Operators: the user identity manager and the audit log (Maree et al., sections 4.2.1
//! and 4.3.2). Users, groups and API tokens live apart from the twins, in their own
//! storage space, and are all held in memory (they number in the hundreds, not
//! millions).
//!
//! - A **user** has one role and belongs to groups.
//! - A **group** holds grants (read or write on a twin, a device type, a DTA, or the
//!   whole fleet); a user's grants are the union of their groups'.
//! - An **API token** (`tfa_` + 64 hex digits) is shown once when issued; only its keyed
//!   BLAKE3 hash is stored, like device tokens (random tokens need no argon2). There are
//!   no passwords: operators authenticate with bearer tokens only.
//! - The **audit log** records every write through the API: who, what, when, outcome.

use crate::error::TwinError;
use crate::spaces;
use parking_lot::Mutex;
use serde::{Deserialize, Serialize};
use std::collections::{BTreeMap, HashMap};
use std::sync::Arc;
use twinfleet_models::access::check_name;
use twinfleet_models::{Grant, Role, Timestamp};
use twinfleet_runtime::{Storage, StorageError, WriteBatch, decode_record, encode_record};

/// Prefix of every API token.
pub const API_TOKEN_PREFIX: &str = "tfa_";
/// Shortest token accepted from the environment for the bootstrap admin.
pub const MIN_TOKEN_LEN: usize = 24;
/// The user created on a fresh data directory.
pub const BOOTSTRAP_ADMIN: &str = "admin";

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[cfg_attr(feature = "openapi", derive(utoipa::ToSchema))]
pub struct User {
    pub name: String,
    pub role: Role,
    #[serde(default)]
    pub groups: Vec<String>,
    pub created_at: Timestamp,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[cfg_attr(feature = "openapi", derive(utoipa::ToSchema))]
pub struct Group {
    pub name: String,
    #[serde(default)]
    pub grants: Vec<Grant>,
    pub created_at: Timestamp,
}

/// What is kept of an API token (never the token itself).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[cfg_attr(feature = "openapi", derive(utoipa::ToSchema))]
pub struct TokenInfo {
    /// The first 12 hex digits of the token's hash: names it for listing and revoking.
    pub id: String,
    pub user: String,
    #[serde(default)]
    pub description: String,
    pub created_at: Timestamp,
}

/// Who is calling, resolved from a bearer token.
#[derive(Debug, Clone)]
pub struct Principal {
    pub user: Arc<str>,
    pub role: Role,
    /// The union of the user's groups' grants at authentication time.
    pub grants: Arc<[Grant]>,
    /// Id of the token used.
    pub token: Arc<str>,
}

/// One audited write.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[cfg_attr(feature = "openapi", derive(utoipa::ToSchema))]
pub struct AuditEntry {
    /// Increasing; a cursor for paging (`before`).
    #[serde(default)]
    pub id: u64,
    pub at: Timestamp,
    pub user: String,
    /// HTTP method.
    pub action: String,
    /// The path written to.
    pub target: String,
    /// HTTP status of the answer.
    pub status: u16,
}

/// Which audit entries to return, newest first.
#[derive(Debug, Clone, Default, Deserialize)]
#[serde(deny_unknown_fields)]
#[cfg_attr(feature = "openapi", derive(utoipa::IntoParams), into_params(parameter_in = Query))]
pub struct AuditQuery {
    pub user: Option<String>,
    /// Only entries whose target starts with this.
    pub target: Option<String>,
    /// Only entries with an id below this (the `id` of the last entry of a page).
    pub before: Option<u64>,
    pub limit: Option<usize>,
}

#[derive(Debug, Default, Clone)]
struct State {
    users: BTreeMap<String, User>,
    groups: BTreeMap<String, Group>,
    /// Keyed hash → token.
    tokens: HashMap<blake3::Hash, TokenInfo>,
    /// The bootstrap admin was set up once on this data directory (`meta/bootstrapped`).
    bootstrapped: bool,
}

#[derive(Debug, Serialize, Deserialize)]
struct TokenRecord {
    hash: String,
    #[serde(flatten)]
    info: TokenInfo,
}

/// Users, groups, tokens and the audit log.
#[derive(Debug)]
pub struct AccessControl {
    storage: Arc<dyn Storage>,
    key: [u8; 32],
    state: Mutex<State>,
    writer: tokio::sync::Mutex<()>,
}

fn user_key(name: &str) -> String {
    format!("user/{name}")
}

fn group_key(name: &str) -> String {
    format!("group/{name}")
}

fn token_key(hash: &blake3::Hash) -> String {
    format!("token/{}", hash.to_hex())
}

fn unknown(kind: &'static str, id: &str) -> TwinError {
    TwinError::Unknown { kind, id: id.chars().take(128).collect() }
}

fn hex(bytes: &[u8]) -> String {
    bytes.iter().map(|b| format!("{b:02x}")).collect()
}

impl AccessControl {
    /// Loads every user, group and token.
    pub(crate) fn open(storage: Arc<dyn Storage>, key: [u8; 32]) -> Result<Self, StorageError> {
        let state = load(&*storage)?;
        Ok(AccessControl { storage, key, state: Mutex::new(state), writer: tokio::sync::Mutex::new(()) })
    }

    fn hash(&self, token: &str) -> blake3::Hash {
        blake3::keyed_hash(&self.key, token.as_bytes())
    }

    /// Applies `f` to a copy of the state; if it succeeds, writes its batch and, once
    /// that is durable, makes the copy current. Changes run one at a time, so nothing is
    /// visible before it is stored and no change is lost to a concurrent one.
    async fn change<T>(
        &self,
        f: impl FnOnce(&mut State, &mut WriteBatch) -> Result<T, TwinError>,
    ) -> Result<T, TwinError> {
        let _writer = self.writer.lock().await;
        let mut next = self.state.lock().clone();
        let mut batch = WriteBatch::new();
        let out = f(&mut next, &mut batch)?;
        self.storage.submit(batch).await?;
        *self.state.lock() = next;
        Ok(out)
    }

    pub fn is_empty(&self) -> bool {
        self.state.lock().users.is_empty()
    }

    /// Whether this data directory's bootstrap admin was ever set up. Persisted, so that
    /// deleting every user does not make the directory fresh again.
    pub fn bootstrapped(&self) -> bool {
        self.state.lock().bootstrapped
    }

    /// Sets up the bootstrap admin of a fresh data directory, or rotates its token
    /// (`rotate`): the user `user` (created, or re-created when rotating), one new token
    /// (`token`, or a random one that is returned), every earlier bootstrap token of
    /// that user revoked, and the directory marked as bootstrapped, in one batch.
    pub(crate) async fn bootstrap(
        &self,
        user: User,
        token: Option<&str>,
        rotate: bool,
        now: Timestamp,
    ) -> Result<Option<String>, TwinError> {
        let (token, generated) = match token {
            Some(t) if t.len() < MIN_TOKEN_LEN => {
                return Err(TwinError::Invalid(format!("an API token needs at least {MIN_TOKEN_LEN} characters")));
            }
            Some(t) => (t.to_string(), false),
            None => {
                let mut raw = [0u8; 32];
                getrandom::fill(&mut raw).map_err(|e| TwinError::Invalid(format!("no randomness: {e}")))?;
                (format!("{API_TOKEN_PREFIX}{}", hex(&raw)), true)
            }
        };
        let hash = self.hash(&token);
        self.change(|s, b| {
            if s.bootstrapped && !rotate {
                return Err(TwinError::Conflict("this data directory's admin was set up already".into()));
            }
            if !s.users.contains_key(&user.name) {
                b.put(spaces::ACCESS, user_key(&user.name), encode_record(&user));
                s.users.insert(user.name.clone(), user.clone());
            }
            let old: Vec<blake3::Hash> = s
                .tokens
                .iter()
                .filter(|(h, t)| t.user == user.name && t.description.starts_with(BOOTSTRAP_TOKEN) && **h != hash)
                .map(|(h, _)| *h)
                .collect();
            for h in old {
                s.tokens.remove(&h);
                b.delete(spaces::ACCESS, token_key(&h));
            }
            if let Some(t) = s.tokens.get(&hash)
                && t.user != user.name
            {
                return Err(TwinError::AlreadyExists { kind: "token", id: t.id.clone() });
            }
            let description = if rotate { format!("{BOOTSTRAP_TOKEN} (rotated)") } else { BOOTSTRAP_TOKEN.to_string() };
            let info = TokenInfo {
                id: hash.to_hex()[..12].to_string(),
                user: user.name.clone(),
                description,
                created_at: now,
            };
            b.put(
                spaces::ACCESS,
                token_key(&hash),
                encode_record(&TokenRecord { hash: hash.to_hex().to_string(), info: info.clone() }),
            );
            s.tokens.insert(hash, info);
            b.put(spaces::ACCESS, BOOTSTRAPPED_KEY.to_vec(), encode_record(&true));
            s.bootstrapped = true;
            Ok(())
        })
        .await?;
        Ok(generated.then_some(token))
    }

    pub fn users(&self) -> Vec<User> {
        self.state.lock().users.values().cloned().collect()
    }

    pub fn user(&self, name: &str) -> Result<User, TwinError> {
        self.state.lock().users.get(name).cloned().ok_or_else(|| unknown("user", name))
    }

    pub fn groups(&self) -> Vec<Group> {
        self.state.lock().groups.values().cloned().collect()
    }

    pub fn group(&self, name: &str) -> Result<Group, TwinError> {
        self.state.lock().groups.get(name).cloned().ok_or_else(|| unknown("group", name))
    }

    pub async fn create_user(&self, user: User) -> Result<User, TwinError> {
        check_name("user", &user.name)?;
        self.change(|s, b| {
            if s.users.contains_key(&user.name) {
                return Err(TwinError::AlreadyExists { kind: "user", id: user.name.clone() });
            }
            check_groups(s, &user.groups)?;
            b.put(spaces::ACCESS, user_key(&user.name), encode_record(&user));
            s.users.insert(user.name.clone(), user.clone());
            Ok(user)
        })
        .await
    }

    /// Changes a user's role and/or groups.
    pub async fn update_user(
        &self,
        name: &str,
        role: Option<Role>,
        groups: Option<Vec<String>>,
    ) -> Result<User, TwinError> {
        self.change(|s, b| {
            if let Some(g) = &groups {
                check_groups(s, g)?;
            }
            let u = s.users.get_mut(name).ok_or_else(|| unknown("user", name))?;
            if let Some(r) = role {
                u.role = r;
            }
            if let Some(g) = groups {
                u.groups = g;
            }
            b.put(spaces::ACCESS, user_key(name), encode_record(&*u));
            Ok(u.clone())
        })
        .await
    }

    /// Deletes a user and every token of theirs.
    pub async fn delete_user(&self, name: &str) -> Result<(), TwinError> {
        self.change(|s, b| {
            s.users.remove(name).ok_or_else(|| unknown("user", name))?;
            b.delete(spaces::ACCESS, user_key(name));
            s.tokens.retain(|h, t| {
                let keep = t.user != name;
                if !keep {
                    b.delete(spaces::ACCESS, token_key(h));
                }
                keep
            });
            Ok(())
        })
        .await
    }

    pub async fn create_group(&self, group: Group) -> Result<Group, TwinError> {
        check_name("group", &group.name)?;
        self.change(|s, b| {
            if s.groups.contains_key(&group.name) {
                return Err(TwinError::AlreadyExists { kind: "group", id: group.name.clone() });
            }
            b.put(spaces::ACCESS, group_key(&group.name), encode_record(&group));
            s.groups.insert(group.name.clone(), group.clone());
            Ok(group)
        })
        .await
    }

    pub async fn set_grants(&self, name: &str, grants: Vec<Grant>) -> Result<Group, TwinError> {
        self.change(|s, b| {
            let g = s.groups.get_mut(name).ok_or_else(|| unknown("group", name))?;
            g.grants = grants;
            b.put(spaces::ACCESS, group_key(name), encode_record(&*g));
            Ok(g.clone())
        })
        .await
    }

    /// Deletes a group no user belongs to any more (409 otherwise).
    pub async fn delete_group(&self, name: &str) -> Result<(), TwinError> {
        self.change(|s, b| {
            if !s.groups.contains_key(name) {
                return Err(unknown("group", name));
            }
            if let Some(u) = s.users.values().find(|u| u.groups.iter().any(|g| g == name)) {
                return Err(TwinError::Conflict(format!("group {name:?} still has members (e.g. user {:?})", u.name)));
            }
            s.groups.remove(name);
            b.delete(spaces::ACCESS, group_key(name));
            Ok(())
        })
        .await
    }

    /// Issues a new API token for `user`; returns it (shown once) and what is kept.
    pub async fn issue_token(
        &self,
        user: &str,
        description: String,
        now: Timestamp,
    ) -> Result<(String, TokenInfo), TwinError> {
        let mut raw = [0u8; 32];
        getrandom::fill(&mut raw).map_err(|e| TwinError::Invalid(format!("no randomness: {e}")))?;
        let token = format!("{API_TOKEN_PREFIX}{}", hex(&raw));
        let info = self.add_token(user, &token, description, now).await?;
        Ok((token, info))
    }

    /// Registers a token chosen elsewhere (the bootstrap admin's, from the environment).
    pub async fn add_token(
        &self,
        user: &str,
        token: &str,
        description: String,
        now: Timestamp,
    ) -> Result<TokenInfo, TwinError> {
        if token.len() < MIN_TOKEN_LEN {
            return Err(TwinError::Invalid(format!("an API token needs at least {MIN_TOKEN_LEN} characters")));
        }
        let hash = self.hash(token);
        self.change(|s, b| {
            if !s.users.contains_key(user) {
                return Err(unknown("user", user));
            }
            if let Some(t) = s.tokens.get(&hash) {
                return Err(TwinError::AlreadyExists { kind: "token", id: t.id.clone() });
            }
            let info =
                TokenInfo { id: hash.to_hex()[..12].to_string(), user: user.to_string(), description, created_at: now };
            let rec = TokenRecord { hash: hash.to_hex().to_string(), info: info.clone() };
            b.put(spaces::ACCESS, token_key(&hash), encode_record(&rec));
            s.tokens.insert(hash, info.clone());
            Ok(info)
        })
        .await
    }

    pub fn tokens(&self, user: &str) -> Vec<TokenInfo> {
        let mut v: Vec<TokenInfo> = self.state.lock().tokens.values().filter(|t| t.user == user).cloned().collect();
        v.sort_by(|a, b| a.created_at.cmp(&b.created_at).then(a.id.cmp(&b.id)));
        v
    }

    pub async fn revoke_token(&self, user: &str, id: &str) -> Result<(), TwinError> {
        self.change(|s, b| {
            let hash = *s
                .tokens
                .iter()
                .find(|(_, t)| t.user == user && t.id == id)
                .map(|(h, _)| h)
                .ok_or_else(|| unknown("token", id))?;
            s.tokens.remove(&hash);
            b.delete(spaces::ACCESS, token_key(&hash));
            Ok(())
        })
        .await
    }

    /// Whether `token` is known (the bootstrap checks this before adding it).
    pub fn knows(&self, token: &str) -> bool {
        self.state.lock().tokens.contains_key(&self.hash(token))
    }

    /// Resolves a bearer token to the caller.
    pub fn authenticate(&self, token: &str) -> Result<Principal, TwinError> {
        let hash = self.hash(token);
        let s = self.state.lock();
        // HashMap lookup by a keyed hash: an attacker cannot steer it without the key.
        let info =
            s.tokens.get(&hash).ok_or_else(|| TwinError::Unauthenticated("unknown or revoked API token".into()))?;
        let user = s
            .users
            .get(&info.user)
            .ok_or_else(|| TwinError::Unauthenticated(format!("the token's user {:?} is gone", info.user)))?;
        let grants: Vec<Grant> =
            user.groups.iter().filter_map(|g| s.groups.get(g)).flat_map(|g| g.grants.iter().cloned()).collect();
        Ok(Principal {
            user: Arc::from(user.name.as_str()),
            role: user.role,
            grants: Arc::from(grants),
            token: Arc::from(info.id.as_str()),
        })
    }

    /// A fresh audit entry id (increasing across restarts).
    pub fn next_audit_id(&self) -> Result<u64, TwinError> {
        Ok(self.storage.generate_id()?)
    }

    /// The batch that stores `entry` under its id: written by [`AccessControl::audit`], or
    /// in the batch of the change it describes (`TwinHandle::command_audited`). Storing
    /// an entry again under the same id replaces it.
    pub(crate) fn audit_batch(entry: &AuditEntry) -> WriteBatch {
        let mut b = WriteBatch::new();
        b.put(spaces::AUDIT, entry.id.to_be_bytes().to_vec(), encode_record(entry));
        b
    }

    /// Appends an entry to the audit log (a new id if its id is 0); resolves once it is
    /// durable.
    pub async fn audit(&self, mut entry: AuditEntry) -> Result<(), TwinError> {
        if entry.id == 0 {
            entry.id = self.next_audit_id()?;
        }
        Ok(self.storage.submit(Self::audit_batch(&entry)).await?)
    }

    /// Audit entries, newest first.
    pub fn audit_log(&self, q: &AuditQuery) -> Result<Vec<AuditEntry>, TwinError> {
        let limit = q.limit.unwrap_or(100).clamp(1, 10_000);
        let end = q.before.map_or(u64::MAX, |b| b.saturating_sub(1));
        if q.before == Some(0) {
            return Ok(vec![]);
        }
        let mut out = Vec::new();
        for row in self.storage.scan_range_rev(spaces::AUDIT, &0u64.to_be_bytes(), &end.to_be_bytes()) {
            let (_, v) = row?;
            let Ok(e) = decode_record::<AuditEntry>(&v) else { continue };
            if q.user.as_ref().is_some_and(|u| *u != e.user)
                || q.target.as_ref().is_some_and(|t| !e.target.starts_with(t.as_str()))
            {
                continue;
            }
            out.push(e);
            if out.len() >= limit {
                break;
            }
        }
        Ok(out)
    }
}

fn check_groups(s: &State, groups: &[String]) -> Result<(), TwinError> {
    match groups.iter().find(|g| !s.groups.contains_key(*g)) {
        Some(g) => Err(unknown("group", g)),
        None => Ok(()),
    }
}

fn load(storage: &dyn Storage) -> Result<State, StorageError> {
    let mut s = State::default();
    for row in storage.scan(spaces::ACCESS, b"") {
        let (k, v) = row?;
        let bad = |e: String| StorageError::Engine(format!("access record {}: {e}", String::from_utf8_lossy(&k)));
        if k.starts_with(b"user/") {
            let u: User = decode_record(&v).map_err(|e| bad(e.to_string()))?;
            s.users.insert(u.name.clone(), u);
        } else if k.starts_with(b"group/") {
            let g: Group = decode_record(&v).map_err(|e| bad(e.to_string()))?;
            s.groups.insert(g.name.clone(), g);
        } else if &k[..] == BOOTSTRAPPED_KEY {
            s.bootstrapped = true;
        } else if k.starts_with(b"token/") {
            let t: TokenRecord = decode_record(&v).map_err(|e| bad(e.to_string()))?;
            let h = blake3::Hash::from_hex(&t.hash).map_err(|e| bad(e.to_string()))?;
            s.tokens.insert(h, t.info);
        }
    }
    // A data directory set up before the marker existed has users: it was bootstrapped.
    s.bootstrapped |= !s.users.is_empty();
    Ok(s)
}

/// Marks a data directory whose bootstrap admin was set up; never deleted.
const BOOTSTRAPPED_KEY: &[u8] = b"meta/bootstrapped";

/// The description of the tokens the bootstrap and its rotations issue.
const BOOTSTRAP_TOKEN: &str = "bootstrap";
