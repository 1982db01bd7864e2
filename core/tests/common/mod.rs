//! Shared helpers of the tally-core integration tests: real SQLite files in temp dirs, a
//! manual clock, a two-connection snapshot of the database, and a catalog exercising every rule.
#![allow(dead_code)]

use chrono::{DateTime, Utc};
use rusqlite::Connection;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};
use tally_core::{Catalog, Change, ChangeListener, Config, ManualClock, Tally, UsageMeta};

pub const CATALOG: &str = r#"{
 "models": {"gpt-4o": {"input_micros_per_mtok": 2500000, "output_micros_per_mtok": 10000000}},
 "plans": [
  {"id": "free", "included_credits": {"amount": 100, "rollover": false}, "features": {
    "ai_chat":  {"type": "metered", "limit": 5, "period": "month", "enforcement": "hard"},
    "daily":    {"type": "metered", "limit": 3, "period": "day", "enforcement": "hard"},
    "notes":    {"type": "metered", "limit": 3, "period": "day", "enforcement": "soft"},
    "hourly":   {"type": "metered", "limit": 4, "period": "hour", "enforcement": "hard"},
    "weekly":   {"type": "metered", "limit": 50, "period": "week", "enforcement": "hard"},
    "uploads":  {"type": "metered", "limit": 10, "period": "billing", "enforcement": "hard"},
    "stars":    {"type": "metered", "limit": null, "period": "lifetime", "enforcement": "hard"},
    "export":   {"type": "flag", "enabled": false},
    "images":   {"type": "credits", "cost": 10},
    "api":      {"type": "rate", "limit": 3, "window_secs": 60},
    "ai_spend": {"type": "budget", "limit_micros": 1000, "period": "day", "enforcement": "hard"}}},
  {"id": "pro", "features": {
    "ai_chat":  {"type": "metered", "limit": 100, "period": "month", "enforcement": "hard"},
    "daily":    {"type": "metered", "limit": 30, "period": "day", "enforcement": "hard"},
    "notes":    {"type": "metered", "limit": 30, "period": "day", "enforcement": "soft"},
    "hourly":   {"type": "metered", "limit": 40, "period": "hour", "enforcement": "hard"},
    "weekly":   {"type": "metered", "limit": 500, "period": "week", "enforcement": "hard"},
    "uploads":  {"type": "metered", "limit": 100, "period": "billing", "enforcement": "hard"},
    "stars":    {"type": "metered", "limit": null, "period": "lifetime", "enforcement": "hard"},
    "export":   {"type": "flag", "enabled": true},
    "pro_only": {"type": "flag", "enabled": true},
    "images":   {"type": "credits", "cost": 5},
    "api":      {"type": "rate", "limit": 100, "window_secs": 60},
    "ai_spend": {"type": "budget", "limit_micros": 100000, "period": "day", "enforcement": "hard"}}},
  {"id": "team", "features": {"team_only": {"type": "flag", "enabled": true},
    "ai_chat":  {"type": "metered", "limit": 1000, "period": "month", "enforcement": "hard"}}}
 ]}"#;

pub fn catalog() -> Catalog {
    Catalog::from_json(CATALOG).expect("test catalog is valid")
}

pub fn t(s: &str) -> DateTime<Utc> {
    DateTime::parse_from_rfc3339(s).expect("valid RFC 3339").with_timezone(&Utc)
}

/// One Tally on a real file in a temp dir, with a manual clock.
pub struct Env {
    pub dir: tempfile::TempDir,
    pub path: PathBuf,
    pub clock: Arc<ManualClock>,
    pub tally: Tally,
}

impl Env {
    pub fn new() -> Env {
        Env::with(|_| {})
    }

    pub fn at(start: &str) -> Env {
        let e = Env::new();
        e.clock.set(t(start));
        e
    }

    pub fn with(f: impl FnOnce(&mut Config)) -> Env {
        let dir = tempfile::tempdir().expect("temp dir");
        let path = dir.path().join("tally.db");
        let clock = Arc::new(ManualClock::new(t("2026-01-15T12:00:00Z")));
        let mut config = Config { device_id: Some("dev-test".into()), clock: clock.clone(), catalog: catalog(), ..Config::default() };
        f(&mut config);
        let tally = Tally::open(&path, config).expect("open");
        Env { dir, path, clock, tally }
    }

    /// A second Tally on the same file (like another process), sharing the clock.
    pub fn reopen(&self) -> Tally {
        let config = Config { device_id: Some("dev-test".into()), clock: self.clock.clone(), catalog: catalog(), ..Config::default() };
        Tally::open(&self.path, config).expect("reopen")
    }

    /// A second Tally on the same file with another catalog.
    pub fn reopen_with(&self, catalog: Catalog) -> Tally {
        let config = Config { device_id: Some("dev-test".into()), clock: self.clock.clone(), catalog, ..Config::default() };
        Tally::open(&self.path, config).expect("reopen")
    }

    pub fn raw(&self) -> Connection {
        Connection::open(&self.path).expect("raw connection")
    }

    pub fn snapshot(&self) -> Snapshot {
        snapshot(&self.path)
    }
}

/// Every row of the user-data tables, read through a second connection.
#[derive(Debug, PartialEq, Eq)]
pub struct Snapshot(pub Vec<(String, Vec<String>)>);

pub fn snapshot(path: &Path) -> Snapshot {
    let c = Connection::open(path).expect("raw connection");
    let mut out = Vec::new();
    for table in ["users", "events", "counters", "settings", "credit_grants"] {
        let mut st = c.prepare(&format!("SELECT * FROM {table} ORDER BY 1, 2")).expect("select");
        let n = st.column_count();
        let rows = st
            .query_map([], |r| {
                let mut s = String::new();
                for i in 0..n {
                    let v: rusqlite::types::Value = r.get(i)?;
                    s.push_str(&format!("{v:?}|"));
                }
                Ok(s)
            })
            .expect("query")
            .collect::<rusqlite::Result<Vec<_>>>()
            .expect("rows");
        out.push((table.to_string(), rows));
    }
    Snapshot(out)
}

pub fn count(c: &Connection, sql: &str, user: &str) -> i64 {
    c.query_row(sql, [user], |r| r.get(0)).expect("count")
}

pub fn key(k: &str) -> UsageMeta {
    UsageMeta { idempotency_key: Some(k.to_string()), ..UsageMeta::default() }
}

pub fn ai(model: &str, input: u64, output: u64) -> UsageMeta {
    UsageMeta { model: Some(model.into()), input_tokens: Some(input), output_tokens: Some(output), ..UsageMeta::default() }
}

/// A listener recording every change it is told about.
#[derive(Default)]
pub struct Recorder(pub Mutex<Vec<(String, Change)>>);

impl ChangeListener for Recorder {
    fn on_change(&self, user_id: &str, change: Change) {
        self.0.lock().unwrap().push((user_id.to_string(), change));
    }
}

impl Recorder {
    pub fn take(&self) -> Vec<(String, Change)> {
        std::mem::take(&mut *self.0.lock().unwrap())
    }
}

/// A JSON Web Key Set with one Ed25519 key (RFC 8037's example): enough for `sync` to run
/// against a fake server that never returns an entitlements token.
pub const SERVER_KEYS: &str =
    r#"{"keys":[{"kty":"OKP","crv":"Ed25519","x":"11qYAYKxCrfVS_7TyWQHOg7hcvPapiMlrwIaaPcHURo","kid":"test","alg":"EdDSA","use":"sig"}]}"#;

/// What the fake server answers to one request: HTTP status and JSON body.
pub type Answer = (u16, serde_json::Value);

/// A loopback HTTP/1.1 responder standing in for the sync server at the network boundary: every
/// request body is recorded and answered by `handler` (request number from 0, body).
pub struct FakeServer {
    pub url: String,
    pub requests: Arc<Mutex<Vec<serde_json::Value>>>,
}

impl FakeServer {
    pub fn start(handler: impl Fn(usize, &serde_json::Value) -> Answer + Send + Sync + 'static) -> FakeServer {
        use std::io::{BufRead, BufReader, Read, Write};
        let listener = std::net::TcpListener::bind("127.0.0.1:0").expect("bind");
        let url = format!("http://{}", listener.local_addr().expect("addr"));
        let requests: Arc<Mutex<Vec<serde_json::Value>>> = Arc::default();
        let log = requests.clone();
        std::thread::spawn(move || {
            for stream in listener.incoming() {
                let Ok(mut stream) = stream else { continue };
                let mut reader = BufReader::new(stream.try_clone().expect("clone"));
                let mut len = 0usize;
                loop {
                    let mut line = String::new();
                    if reader.read_line(&mut line).unwrap_or(0) == 0 {
                        break;
                    }
                    let l = line.trim_end().to_ascii_lowercase();
                    if l.is_empty() {
                        break;
                    }
                    if let Some(v) = l.strip_prefix("content-length:") {
                        len = v.trim().parse().unwrap_or(0);
                    }
                }
                let mut body = vec![0u8; len];
                if reader.read_exact(&mut body).is_err() {
                    continue;
                }
                let body: serde_json::Value = serde_json::from_slice(&body).unwrap_or(serde_json::Value::Null);
                let n = {
                    let mut log = log.lock().unwrap();
                    log.push(body.clone());
                    log.len() - 1
                };
                let (status, answer) = handler(n, &body);
                let text = answer.to_string();
                let _ = write!(
                    stream,
                    "HTTP/1.1 {status} X\r\nContent-Type: application/json\r\nContent-Length: {}\r\nConnection: close\r\n\r\n{text}",
                    text.len()
                );
            }
        });
        FakeServer { url, requests }
    }

    pub fn options(&self) -> tally_core::SyncOptions {
        let mut o = tally_core::SyncOptions::new(&self.url, "token");
        o.retry.max_attempts = 1;
        o
    }

    pub fn requests(&self) -> Vec<serde_json::Value> {
        self.requests.lock().unwrap().clone()
    }
}

/// The answer of a server that takes everything: every event accepted, every setting stored
/// with the HLC sent (returned in `settings_changes`, as the server returns the rows a request
/// changed), generous limits.
pub fn accept_all(req: &serde_json::Value) -> serde_json::Value {
    let ids: Vec<serde_json::Value> = req["events"].as_array().into_iter().flatten().map(|e| e["id"].clone()).collect();
    serde_json::json!({
        "accepted": ids,
        "settings_changes": req["settings_changes"].clone(),
        "cursor": "c1",
        "limits": {"max_batch_events": 500, "max_body_bytes": 4 * 1024 * 1024},
    })
}

/// An `Env` whose config trusts [`SERVER_KEYS`], with a signed-in user `sub-1`; returns the user id.
pub fn signed_in_env() -> (Env, String) {
    let e = Env::with(|c| c.server_keys = Some(SERVER_KEYS.into()));
    let u = e.tally.sign_in(tally_core::Profile { external_id: "sub-1".into(), ..Default::default() }, None).expect("sign in");
    (e, u.id)
}

/// A device token for `sub-1` on device `did`, signed as the server signs it (with the private
/// half of [`SERVER_KEYS`], RFC 8032's first test key): `ent` with `lease_ver`, issued at `iat`,
/// expiring at `exp`, leases until two days after issue.
pub fn device_token(
    ent: tally_core::Entitlements,
    did: &str,
    lease_ver: u64,
    (iat, exp): (DateTime<Utc>, DateTime<Utc>),
    leases: Vec<tally_core::lease::Lease>,
) -> String {
    let claims = tally_core::EntitlementClaims {
        entitlements: ent,
        sub: "sub-1".into(),
        uid: "server-uid".into(),
        iss: "tally".into(),
        aud: "tally".into(),
        iat: iat.timestamp(),
        exp: exp.timestamp(),
        did: Some(did.into()),
        lease_ver: Some(lease_ver),
        lease_until: Some(iat.timestamp() + 2 * 86_400),
        leases,
    };
    // PKCS#8 (v1) DER of the key.
    let mut der = vec![0x30, 0x2e, 0x02, 0x01, 0x00, 0x30, 0x05, 0x06, 0x03, 0x2b, 0x65, 0x70, 0x04, 0x22, 0x04, 0x20];
    der.extend([
        0x9d, 0x61, 0xb1, 0x9d, 0xef, 0xfd, 0x5a, 0x60, 0xba, 0x84, 0x4a, 0xf4, 0x92, 0xec, 0x2c, 0xc4, 0x44, 0x49, 0xc5, 0x69, 0x7b, 0x32,
        0x69, 0x19, 0x70, 0x3b, 0xac, 0x03, 0x1c, 0xae, 0x7f, 0x60,
    ]);
    let mut h = jsonwebtoken::Header::new(jsonwebtoken::Algorithm::EdDSA);
    h.kid = Some("test".into());
    jsonwebtoken::encode(&h, &claims, &jsonwebtoken::EncodingKey::from_ed_der(&der)).expect("sign")
}
