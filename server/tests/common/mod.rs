//! Shared test support: one throwaway PostgreSQL cluster per test binary (fsync off, removed
//! when the binary exits), a fresh database per test, and helpers to call the real router.
#![allow(dead_code)]

use axum::Router;
use axum::body::Body;
use axum::http::{Request, StatusCode};
use chrono::Utc;
use serde_json::{Value, json};
use std::sync::OnceLock;
use tally_server::pg_cluster::{Cluster, ClusterOptions};
use tally_server::{AppState, Config};
use tower::ServiceExt;

/// The identity-token secret of every test server.
pub const SECRET: &str = "test-secret-0123456789";

/// The catalog of every test server.
pub const CATALOG: &str = r#"{"models": {"gpt-4o": {"input_micros_per_mtok": 2500000, "output_micros_per_mtok": 10000000}},
 "plans": [{"id": "free", "features": {
  "ai_chat":  {"type": "metered", "limit": 5, "period": "month", "enforcement": "hard"},
  "export":   {"type": "flag", "enabled": false},
  "images":   {"type": "credits", "cost": 10},
  "api":      {"type": "rate", "limit": 100, "window_secs": 60},
  "ai_spend": {"type": "budget", "limit_micros": 2000000, "period": "day", "enforcement": "hard"},
  "notes":    {"type": "metered", "limit": null, "period": "lifetime"}}},
  {"id": "pro", "features": {"ai_chat": {"type": "metered", "limit": 500, "period": "month"}, "export": {"type": "flag", "enabled": true}}}]}"#;

static CLUSTER: OnceLock<Option<Cluster>> = OnceLock::new();

/// Whether the Postgres tests must run: under `CI=true` or `TALLY_REQUIRE_PG=1` a cluster that
/// cannot start fails the test instead of skipping it.
pub fn pg_required() -> bool {
    let set = |k: &str| std::env::var(k).is_ok_and(|v| matches!(v.to_ascii_lowercase().as_str(), "1" | "true" | "yes"));
    set("CI") || set("TALLY_REQUIRE_PG")
}

/// The cluster of this test binary. `None` (with a loud message) only when the PostgreSQL
/// binaries are not installed and Postgres is not required; any other failure panics.
pub fn cluster() -> Option<&'static Cluster> {
    CLUSTER
        .get_or_init(|| {
            let dir = std::env::temp_dir().join(format!("tally-server-test-pg-{}", std::process::id()));
            match Cluster::start(&dir, ClusterOptions { fast_unsafe: true, ephemeral: true, port: None }) {
                Ok(c) => Some(c),
                Err(e @ tally_server::pg_cluster::ClusterError::BinariesNotFound) if !pg_required() => {
                    eprintln!("\n\n!!!!!!!! SKIPPING POSTGRES TESTS: {e} !!!!!!!!\n\n");
                    None
                }
                Err(e) => panic!("cannot start the test PostgreSQL (required under CI=true / TALLY_REQUIRE_PG=1): {e}"),
            }
        })
        .as_ref()
}

/// A clock that follows the system clock plus an offset the test moves, so a test can jump
/// past a boundary (a second, a grace period) without sleeping.
#[derive(Debug, Default)]
pub struct TestClock(std::sync::Mutex<chrono::Duration>);

impl TestClock {
    /// Moves the clock forwards (or backwards) by `by`.
    pub fn advance(&self, by: chrono::Duration) {
        *self.0.lock().unwrap() += by;
    }
}

impl tally_core::Clock for TestClock {
    fn now(&self) -> chrono::DateTime<Utc> {
        Utc::now() + *self.0.lock().unwrap()
    }
}

/// A fresh database in the test cluster.
pub async fn fresh_db() -> Option<String> {
    // A panic starting the cluster (Postgres required) must fail the test, not skip it.
    let c = tokio::task::spawn_blocking(cluster).await.unwrap_or_else(|e| std::panic::resume_unwind(e.into_panic()))?;
    let name = format!("t_{}", uuid::Uuid::new_v4().simple());
    Some(c.create_database(&name).await.expect("create database"))
}

/// A test server over its own database.
pub struct TestApp {
    /// The state.
    pub state: AppState,
    /// The router.
    pub router: Router,
    /// Database URL.
    pub url: String,
    /// Data dir (keys, plans file).
    pub dir: tempfile::TempDir,
    /// The server's clock.
    pub clock: std::sync::Arc<TestClock>,
}

/// The test configuration for `url` with data under `dir`.
pub fn test_config(url: &str, dir: &std::path::Path) -> Config {
    let plans = dir.join("plans.json");
    std::fs::write(&plans, CATALOG).expect("write plans");
    let mut c = Config::for_database(url);
    c.jwt_secret = Some(SECRET.into());
    c.data_dir = dir.to_path_buf();
    c.plans_file = Some(plans);
    c.admin_subjects = vec!["root-admin".into()];
    c.rate_limit_per_sec = 10_000;
    c.rate_limit_burst = 10_000;
    c.db_pool_size = 8;
    c
}

/// A test app, configured further by `f`; `None` when PostgreSQL is not installed.
pub async fn app_with(f: impl FnOnce(&mut Config)) -> Option<TestApp> {
    let url = fresh_db().await?;
    let dir = tempfile::tempdir().expect("tempdir");
    let mut config = test_config(&url, dir.path());
    f(&mut config);
    let clock = std::sync::Arc::new(TestClock::default());
    let state = AppState::with_clock(config, clock.clone()).await.expect("state");
    let router = tally_server::app(state.clone());
    Some(TestApp { state, router, url, dir, clock })
}

/// A test app with the default test configuration.
pub async fn app() -> Option<TestApp> {
    app_with(|_| {}).await
}

/// Skips the test (returning) when PostgreSQL is not installed and not required; under
/// `CI=true` / `TALLY_REQUIRE_PG=1` the missing cluster has already failed the test.
#[macro_export]
macro_rules! app_or_skip {
    ($e:expr) => {
        match $e {
            Some(a) => a,
            None => return,
        }
    };
}

/// An HS256 identity token for `sub` with extra claims.
pub fn token_with(sub: &str, extra: Value) -> String {
    let now = Utc::now().timestamp();
    let mut claims = json!({"sub": sub, "iat": now, "exp": now + 3600});
    if let (Some(o), Some(e)) = (claims.as_object_mut(), extra.as_object()) {
        for (k, v) in e {
            o.insert(k.clone(), v.clone());
        }
    }
    jsonwebtoken::encode(&jsonwebtoken::Header::default(), &claims, &jsonwebtoken::EncodingKey::from_secret(SECRET.as_bytes()))
        .expect("sign")
}

/// An HS256 identity token for `sub`.
pub fn token(sub: &str) -> String {
    token_with(sub, json!({}))
}

impl TestApp {
    /// Sends a request with a raw body; returns status and JSON body (`Null` when empty or not JSON).
    pub async fn raw(
        &self,
        method: &str,
        path: &str,
        bearer: Option<&str>,
        body: Vec<u8>,
        headers: &[(&str, &str)],
    ) -> (StatusCode, Value, axum::http::HeaderMap) {
        let mut b = Request::builder().method(method).uri(path).header("content-type", "application/json");
        if let Some(t) = bearer {
            b = b.header("authorization", format!("Bearer {t}"));
        }
        for (k, v) in headers {
            b = b.header(*k, *v);
        }
        let resp = self.router.clone().oneshot(b.body(Body::from(body)).expect("request")).await.expect("response");
        let status = resp.status();
        let headers = resp.headers().clone();
        let bytes = axum::body::to_bytes(resp.into_body(), usize::MAX).await.expect("body");
        (status, serde_json::from_slice(&bytes).unwrap_or(Value::Null), headers)
    }

    /// Sends JSON (or nothing) and returns status and JSON body.
    pub async fn call(&self, method: &str, path: &str, bearer: Option<&str>, body: Option<Value>) -> (StatusCode, Value) {
        let bytes = body.map(|b| serde_json::to_vec(&b).expect("json")).unwrap_or_default();
        let (s, v, _) = self.raw(method, path, bearer, bytes, &[]).await;
        (s, v)
    }

    /// `POST /v1/sync` with the given events and settings changes.
    pub async fn sync(&self, bearer: &str, device: &str, events: Vec<Value>) -> (StatusCode, Value) {
        self.call("POST", "/v1/sync", Some(bearer), Some(json!({"protocol": 1, "device_id": device, "events": events}))).await
    }

    /// Counts rows of `table` (all users).
    pub async fn count(&self, table: &str) -> i64 {
        let (client, conn) = tokio_postgres::connect(&self.url, tokio_postgres::NoTls).await.expect("connect");
        tokio::spawn(conn);
        client.query_one(&format!("SELECT count(*) FROM {table}"), &[]).await.expect("count").get(0)
    }

    /// Runs a query returning one i64.
    pub async fn scalar(&self, sql: &str) -> i64 {
        let (client, conn) = tokio_postgres::connect(&self.url, tokio_postgres::NoTls).await.expect("connect");
        tokio::spawn(conn);
        client.query_one(sql, &[]).await.expect("scalar").get(0)
    }
}

/// A wire event.
pub fn event(id: uuid::Uuid, feature: &str, amount: u64) -> Value {
    json!({"id": id, "feature": feature, "amount": amount, "occurred_at": Utc::now().to_rfc3339()})
}

/// The `used` of the total of (feature, period) in a sync response's current window.
pub fn used(resp: &Value, feature: &str) -> Option<u64> {
    resp["totals"].as_array()?.iter().filter(|t| t["feature"] == feature).filter_map(|t| t["used"].as_u64()).max()
}

/// A running `tally-server serve` process (the binary cargo built for this test), killed
/// with SIGKILL on drop.
pub struct Server {
    /// The process.
    pub child: std::process::Child,
    /// Base URL (`http://127.0.0.1:port`).
    pub base: String,
}

impl Server {
    /// Starts `serve` on `url` (None: the embedded default) with data under `dir`.
    pub fn start(url: Option<&str>, dir: &std::path::Path) -> Server {
        Server::start_with(url, dir, &[])
    }

    /// [`Server::start`] with extra environment variables.
    pub fn start_with(url: Option<&str>, dir: &std::path::Path, env: &[(&str, &str)]) -> Server {
        Server::spawn(Server::command(url, dir, env))
    }

    /// Spawns `cmd` (from [`Server::command`]) and waits for its listening line.
    pub fn spawn(mut cmd: std::process::Command) -> Server {
        use std::io::BufRead;
        let mut child = cmd.stdout(std::process::Stdio::piped()).spawn().expect("spawn tally-server");
        let stdout = child.stdout.take().expect("stdout");
        let mut line = String::new();
        std::io::BufReader::new(stdout).read_line(&mut line).expect("read listening line");
        let base =
            line.trim().strip_prefix("tally-server listening on ").unwrap_or_else(|| panic!("unexpected output {line:?}")).to_string();
        Server { child, base }
    }

    /// The `serve` command of [`Server::start_with`], not spawned yet.
    pub fn command(url: Option<&str>, dir: &std::path::Path, env: &[(&str, &str)]) -> std::process::Command {
        std::fs::create_dir_all(dir).unwrap();
        let plans = dir.join("plans.json");
        std::fs::write(&plans, CATALOG).unwrap();
        let mut cmd = std::process::Command::new(env!("CARGO_BIN_EXE_tally-server"));
        cmd.arg("serve")
            .env_remove("TALLY_DATABASE_URL")
            .env("TALLY_LISTEN", "127.0.0.1:0")
            .env("TALLY_JWT_SECRET", SECRET)
            .env("TALLY_DATA_DIR", dir)
            .env("TALLY_PLANS_FILE", &plans)
            .env("TALLY_RATE_LIMIT_PER_SEC", "100000")
            .env("TALLY_RATE_LIMIT_BURST", "100000")
            .env("TALLY_DB_POOL_SIZE", "8")
            .env("TALLY_LOG", "warn")
            .stdin(std::process::Stdio::null())
            .stderr(std::process::Stdio::inherit());
        if let Some(u) = url {
            cmd.env("TALLY_DATABASE_URL", u);
        }
        for (k, v) in env {
            cmd.env(k, v);
        }
        cmd
    }

    /// SIGKILL, then reap.
    pub fn kill9(&mut self) {
        let _ = nix::sys::signal::kill(nix::unistd::Pid::from_raw(self.child.id() as i32), nix::sys::signal::Signal::SIGKILL);
        let _ = self.child.wait();
    }

    /// SIGTERM (graceful shutdown, which stops an embedded cluster), then reap.
    pub fn terminate(&mut self) -> std::process::ExitStatus {
        let _ = nix::sys::signal::kill(nix::unistd::Pid::from_raw(self.child.id() as i32), nix::sys::signal::Signal::SIGTERM);
        self.child.wait().expect("wait")
    }
}

impl Drop for Server {
    fn drop(&mut self) {
        self.kill9();
    }
}
