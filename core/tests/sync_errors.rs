//! Bad input to `sync` fails before any network traffic, with a clear error, changing nothing.

use tally_core::{Catalog, Config, Error, Profile, SyncOptions, Tally, UsageMeta};

fn tally(dir: &tempfile::TempDir) -> Tally {
    let catalog =
        Catalog::from_json(r#"{"plans":[{"id":"free","features":{"notes":{"type":"metered","limit":null,"period":"day"}}}]}"#).unwrap();
    let server_keys =
        Some(r#"{"keys":[{"kty":"OKP","crv":"Ed25519","x":"11qYAYKxCrfVS_7TyWQHOg7hcvPapiMlrwIaaPcHURo","kid":"k"}]}"#.into());
    Tally::open(dir.path().join("t.db"), Config { catalog, server_keys, ..Config::default() }).unwrap()
}

fn unreachable() -> SyncOptions {
    let port = std::net::TcpListener::bind("127.0.0.1:0").unwrap().local_addr().unwrap().port();
    let mut o = SyncOptions::new(format!("http://127.0.0.1:{port}"), "token");
    o.retry.max_attempts = 2;
    o.retry.initial_backoff = std::time::Duration::from_millis(1);
    o
}

#[tokio::test]
async fn a_local_user_an_unknown_user_and_no_server_are_clear_errors_that_change_nothing() {
    let dir = tempfile::tempdir().unwrap();
    let t = tally(&dir);
    let local = t.create_local_user(None).unwrap();
    t.consume(&local.id, "notes", 2, UsageMeta::default()).unwrap();
    match t.sync(&local.id, unreachable()).await {
        Err(Error::InvalidInput(m)) => assert!(m.contains("not signed in"), "{m}"),
        other => panic!("expected InvalidInput, got {other:?}"),
    }
    assert!(matches!(t.sync("no-such-user", unreachable()).await, Err(Error::NotFound(_))));
    let user = t.sign_in(Profile { external_id: "ann".into(), ..Profile::default() }, None).unwrap();
    t.consume(&user.id, "notes", 3, UsageMeta::default()).unwrap();
    match t.sync(&user.id, unreachable()).await {
        Err(Error::Network(m)) => assert!(m.contains("gave up after 2 attempts"), "{m}"),
        other => panic!("expected Network, got {other:?}"),
    }
    assert_eq!((t.pending_events(&local.id).unwrap(), t.pending_events(&user.id).unwrap()), (1, 1));
    assert_eq!(t.usage(&user.id, "notes").unwrap().used, 3);
    assert_eq!(t.last_synced_at(&user.id).unwrap(), None);
}
