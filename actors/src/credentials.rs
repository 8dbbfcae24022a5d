//! Device credentials and the credential mapper of Maree et al.: which device may speak
//! for which twin.
//!
//! A device token is 32 random bytes, shown once when issued. Only a keyed BLAKE3 hash
//! of it is stored (key: 32 random bytes generated on first start and kept in the data
//! directory). A keyed hash, not argon2: tokens are random, so there is nothing to
//! brute-force, and a gateway checks thousands of connections per second (argon2 costs
//! ~23 ms per check here). Verified hashes are cached in memory, so authentication does
//! not read storage on the hot path. Comparison is constant-time.

use crate::error::TwinError;
use crate::maps::Directory;
use crate::spaces;
use serde::{Deserialize, Serialize};
use std::sync::Arc;
use twinfleet_models::Timestamp;
use twinfleet_runtime::{Storage, StorageError, WriteBatch, decode_record, encode_record};

const KEY_RECORD: &[u8] = b"device-credential-key";
/// Prefix of every device token, so that a leaked one is recognisable in logs and scans.
pub const TOKEN_PREFIX: &str = "tfd_";
/// Claim tokens (one per device type, for provisioning) start with this.
pub const CLAIM_PREFIX: &str = "tfc_";

/// Whose credential: a device's token (key = twin id) or a device type's claim token
/// (key `#claim/<type>`; `#` cannot start a twin id, so the two never collide).
#[derive(Debug, Clone, Copy)]
pub(crate) enum Holder<'a> {
    Device(&'a str),
    Claim(&'a str),
}

impl Holder<'_> {
    fn key(&self) -> String {
        match self {
            Holder::Device(id) => (*id).to_string(),
            Holder::Claim(ty) => format!("#claim/{ty}"),
        }
    }

    fn prefix(&self) -> &'static str {
        match self {
            Holder::Device(_) => TOKEN_PREFIX,
            Holder::Claim(_) => CLAIM_PREFIX,
        }
    }
}

/// Why a device was not let in. Deliberately coarse towards the device; detailed in logs.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum AuthError {
    #[error("unknown device {0:?}")]
    UnknownDevice(String),
    #[error("device {0:?} has no credentials; issue a token first")]
    NoCredential(String),
    #[error("wrong token for device {0:?}")]
    BadToken(String),
    #[error("device {0:?} is archived")]
    Archived(String),
    #[error("credential store unavailable: {0}")]
    Storage(String),
}

impl AuthError {
    /// The rejection reason counted in /metrics.
    pub fn reason(&self) -> &'static str {
        match self {
            AuthError::UnknownDevice(_) => "unknown_device",
            AuthError::NoCredential(_) => "no_credential",
            AuthError::BadToken(_) => "bad_credentials",
            AuthError::Archived(_) => "archived_device",
            AuthError::Storage(_) => "credential_store",
        }
    }
}

#[derive(Debug, Serialize, Deserialize)]
struct CredentialRecord {
    hash: String,
    issued_at: Timestamp,
}

/// A token whose hash is not written yet (`Credentials::prepare`).
#[derive(Debug)]
pub(crate) struct PreparedToken {
    key: String,
    hash: blake3::Hash,
    pub batch: WriteBatch,
}

#[derive(Debug)]
pub struct Credentials {
    storage: Arc<dyn Storage>,
    key: [u8; 32],
    cache: Directory<String, blake3::Hash>,
}

fn hex(bytes: &[u8]) -> String {
    bytes.iter().map(|b| format!("{b:02x}")).collect()
}

impl Credentials {
    /// Loads the installation key, creating it on first start.
    pub(crate) fn open(storage: Arc<dyn Storage>) -> Result<Self, StorageError> {
        let key = match storage.get(spaces::META, KEY_RECORD)? {
            Some(k) if k.len() == 32 => k.try_into().expect("length checked"),
            Some(k) => {
                return Err(StorageError::Engine(format!("device credential key has {} bytes, not 32", k.len())));
            }
            None => {
                let mut key = [0u8; 32];
                getrandom::fill(&mut key).map_err(|e| StorageError::Engine(format!("no randomness: {e}")))?;
                let mut b = WriteBatch::new();
                b.put(spaces::META, KEY_RECORD, key.to_vec());
                // Durable before any token: tokens are written after it, in order.
                drop(storage.submit(b));
                key
            }
        };
        Ok(Credentials { storage, key, cache: Directory::default() })
    }

    /// The installation key (operator API tokens are hashed with it too).
    pub(crate) fn key(&self) -> [u8; 32] {
        self.key
    }

    fn hash(&self, token: &str) -> blake3::Hash {
        blake3::keyed_hash(&self.key, token.as_bytes())
    }

    /// The keyed hash (hex) of a claim's proof, as a process record keeps it.
    pub(crate) fn proof_hash(&self, proof: &str) -> String {
        blake3::keyed_hash(&self.key, format!("proof\0{proof}").as_bytes()).to_hex().to_string()
    }

    /// Issues a new token for `holder`, replacing any earlier one. Resolves once it is
    /// durable; the token is not stored and cannot be shown again.
    pub(crate) async fn issue(&self, holder: Holder<'_>, now: Timestamp) -> Result<String, TwinError> {
        let (token, mut prepared) = self.prepare(holder, now)?;
        self.storage.submit(std::mem::take(&mut prepared.batch)).await?;
        self.installed(prepared);
        Ok(token)
    }

    /// A new token for `holder` and the write that stores its hash, for a caller that
    /// writes it with other records; [`Credentials::installed`] once that is durable.
    pub(crate) fn prepare(&self, holder: Holder<'_>, now: Timestamp) -> Result<(String, PreparedToken), TwinError> {
        let mut raw = [0u8; 32];
        getrandom::fill(&mut raw).map_err(|e| TwinError::Invalid(format!("no randomness: {e}")))?;
        let token = format!("{}{}", holder.prefix(), hex(&raw));
        let hash = self.hash(&token);
        let key = holder.key();
        let mut batch = WriteBatch::new();
        batch.put(
            spaces::CREDENTIAL,
            key.as_str(),
            encode_record(&CredentialRecord { hash: hash.to_hex().to_string(), issued_at: now }),
        );
        Ok((token, PreparedToken { key, hash, batch }))
    }

    /// A prepared token's write is durable: it takes effect.
    pub(crate) fn installed(&self, p: PreparedToken) {
        self.cache.insert(p.key, p.hash);
    }

    /// Removes `holder`'s credentials; its devices can no longer connect.
    pub(crate) async fn revoke(&self, holder: Holder<'_>) -> Result<(), TwinError> {
        let key = holder.key();
        let mut b = WriteBatch::new();
        b.delete(spaces::CREDENTIAL, key.as_str());
        self.storage.submit(b).await?;
        self.cache.remove(&key);
        Ok(())
    }

    /// Drops a deleted twin's cached hash (its record is deleted with the twin).
    pub(crate) fn forget(&self, id: &str) {
        self.cache.remove(id);
    }

    /// Whether `holder` has a token (a storage failure counts as no).
    pub(crate) fn has(&self, holder: Holder<'_>) -> bool {
        let key = holder.key();
        self.cache.get(&key).is_some() || matches!(self.storage.get(spaces::CREDENTIAL, key.as_bytes()), Ok(Some(_)))
    }

    /// Checks `token` against the stored hash of `holder`'s token.
    pub(crate) fn verify(&self, holder: Holder<'_>, token: &str) -> Result<(), AuthError> {
        let cached = match holder {
            Holder::Device(id) => self.cache.get(id).map(|h| *h),
            Holder::Claim(_) => self.cache.get(&holder.key()).map(|h| *h),
        };
        let stored = match cached {
            Some(h) => h,
            None => {
                let key = holder.key();
                let raw = self
                    .storage
                    .get(spaces::CREDENTIAL, key.as_bytes())
                    .map_err(|e| AuthError::Storage(e.to_string()))?
                    .ok_or_else(|| AuthError::NoCredential(key.clone()))?;
                let rec: CredentialRecord = decode_record(&raw).map_err(|e| AuthError::Storage(e.to_string()))?;
                let h = blake3::Hash::from_hex(&rec.hash).map_err(|e| AuthError::Storage(e.to_string()))?;
                self.cache.insert(key, h);
                h
            }
        };
        // blake3::Hash compares in constant time.
        if self.hash(token) == stored { Ok(()) } else { Err(AuthError::BadToken(holder.key())) }
    }
}

/// A claim's proof: a secret the claiming device chooses (at least this many bytes) and
/// sends only in its request. Provisioning binds the process to it and seals the
/// device's token with it, so that a response another claimant can read (a shared
/// claim account on an external broker) shows no usable token.
pub const MIN_PROOF_LEN: usize = 16;

fn proof_stream(proof: &str, len: usize) -> Vec<u8> {
    let key = blake3::derive_key("twinfleet 2026 claim proof seal v1", proof.as_bytes());
    let mut out = vec![0u8; len];
    blake3::Hasher::new_keyed(&key).finalize_xof().fill(&mut out);
    out
}

/// `token` sealed with `proof` (hex): XOR with a keystream derived from the proof.
pub fn seal_token(token: &str, proof: &str) -> String {
    let stream = proof_stream(proof, token.len());
    hex(&token.bytes().zip(stream).map(|(t, k)| t ^ k).collect::<Vec<u8>>())
}

/// The token in `sealed` (from [`seal_token`]), given the same proof.
pub fn unseal_token(sealed: &str, proof: &str) -> Option<String> {
    if !sealed.len().is_multiple_of(2) || !sealed.is_ascii() {
        return None;
    }
    let bytes: Option<Vec<u8>> =
        (0..sealed.len()).step_by(2).map(|i| u8::from_str_radix(&sealed[i..i + 2], 16).ok()).collect();
    let bytes = bytes?;
    let stream = proof_stream(proof, bytes.len());
    String::from_utf8(bytes.iter().zip(stream).map(|(b, k)| b ^ k).collect()).ok()
}

#[cfg(test)]
mod seal_tests {
    #[test]
    fn a_sealed_token_opens_only_with_its_proof() {
        let (t, p) = ("tfd_0123456789abcdef", "a proof of sixteen+ bytes");
        let sealed = super::seal_token(t, p);
        assert_ne!(sealed, super::hex(t.as_bytes()));
        assert_eq!(super::unseal_token(&sealed, p).as_deref(), Some(t));
        assert_ne!(super::unseal_token(&sealed, "another proof, also long").as_deref(), Some(t));
        assert_eq!(super::unseal_token("zz", p), None);
    }
}
