//! Device credentials: tokens are shown once, stored as keyed hashes, survive restarts,
//! and every failed authentication is a typed, counted rejection.

use crate::support::*;
use serde_json::json;
use twinfleet::{AuthError, TwinError};

#[actix_rt::test]
async fn device_tokens_authenticate_only_their_own_twin() {
    let dir = tempfile::tempdir().unwrap();
    let (token, old) = {
        let p = start(dir.path(), None, test_settings()).await;
        fleet(&p, "sensor", json!({}), "c", 3, |_| vec![]).await;
        let old = p.issue_device_token("c-0").await.unwrap();
        let token = p.issue_device_token("c-0").await.unwrap();
        assert!(token.starts_with(twinfleet::TOKEN_PREFIX) && token.len() == 68, "{token}");
        assert_ne!(token, old);
        assert_eq!(p.authenticate_device("c-0", &token).unwrap().id().as_str(), "c-0");
        assert_eq!(
            p.authenticate_device("c-0", &old).unwrap_err(),
            AuthError::BadToken("c-0".into()),
            "reissue invalidates"
        );
        assert_eq!(p.authenticate_device("c-1", &token).unwrap_err(), AuthError::NoCredential("c-1".into()));
        assert!(matches!(p.authenticate_device("nobody", &token), Err(AuthError::UnknownDevice(_))));
        let other = p.issue_device_token("c-1").await.unwrap();
        assert!(p.authenticate_device("c-0", &other).is_err(), "a token speaks for its own twin only");
        assert!(matches!(p.issue_device_token("nobody").await, Err(TwinError::NotFound(_))));
        let r = &p.rejections();
        assert_eq!((r.count("bad_credentials"), r.count("no_credential"), r.count("unknown_device")), (2, 1, 1));
        p.shutdown().await;
        (token, old)
    };
    // The hash, not the token, is on disk, and it survives a restart.
    let raw = std::fs::read_dir(dir.path().join("db"))
        .unwrap()
        .flatten()
        .filter(|e| e.path().is_file())
        .any(|e| std::fs::read(e.path()).unwrap().windows(token.len()).any(|w| w == token.as_bytes()));
    assert!(!raw, "the token itself must never be stored");
    let p = start(dir.path(), None, test_settings()).await;
    assert!(p.authenticate_device("c-0", &token).is_ok());
    assert!(p.authenticate_device("c-0", &old).is_err());
    p.revoke_device_token("c-0").await.unwrap();
    assert_eq!(p.authenticate_device("c-0", &token).unwrap_err(), AuthError::NoCredential("c-0".into()));
    p.shutdown().await;
}
