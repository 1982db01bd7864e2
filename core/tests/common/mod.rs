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
