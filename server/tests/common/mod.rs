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
/// past a boundary (a second, a grace period) without sleeping; frozen, it stands still.
#[derive(Debug, Default)]
pub struct TestClock(std::sync::Mutex<(chrono::Duration, Option<chrono::DateTime<Utc>>)>);

impl TestClock {
    /// Moves the clock forwards (or backwards) by `by`.
    pub fn advance(&self, by: chrono::Duration) {
        self.0.lock().unwrap().0 += by;
    }

    /// Sets the clock to `at` and stops it there (a test replaying fixtures of a fixed moment).
    pub fn set(&self, at: chrono::DateTime<Utc>) {
        *self.0.lock().unwrap() = (chrono::Duration::zero(), Some(at));
    }

    /// Stops the clock where it is and returns that instant: a test that compares whole
    /// seconds against the server's clock then does not depend on how fast it runs.
    pub fn freeze(&self) -> chrono::DateTime<Utc> {
        let now = tally_core::Clock::now(self);
        let mut g = self.0.lock().unwrap();
        *g = (chrono::Duration::zero(), Some(now));
        now
    }
}

impl tally_core::Clock for TestClock {
    fn now(&self) -> chrono::DateTime<Utc> {
        let (offset, frozen) = *self.0.lock().unwrap();
        frozen.unwrap_or_else(Utc::now) + offset
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

impl TestApp {
    /// Another replica of this server (or this server restarted): a new state and router on
    /// the same database and clock, with the test configuration changed by `f`.
    pub async fn replica_with(&self, f: impl FnOnce(&mut Config)) -> TestApp {
        let dir = tempfile::tempdir().expect("tempdir");
        let mut config = test_config(&self.url, dir.path());
        f(&mut config);
        let state = AppState::with_clock(config, self.clock.clone()).await.expect("state");
        TestApp { state: state.clone(), router: tally_server::app(state), url: self.url.clone(), dir, clock: self.clock.clone() }
    }
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

impl TestApp {
    /// Every row `queries` select (text columns), each as its columns joined by `|`: a
    /// before/after snapshot.
    pub async fn rows_text(&self, queries: &[&str]) -> Vec<String> {
        let (client, conn) = tokio_postgres::connect(&self.url, tokio_postgres::NoTls).await.expect("connect");
        tokio::spawn(conn);
        let mut out = Vec::new();
        for q in queries {
            for r in client.query(*q, &[]).await.expect("snapshot") {
                out.push((0..r.len()).map(|i| r.get::<_, String>(i)).collect::<Vec<_>>().join("|"));
            }
        }
        out
    }

    /// The current-window total of `feature` as a sync answers it.
    pub async fn total(&self, t: &str, feature: &str) -> Value {
        let (s, v) = self.sync(t, "reader", vec![]).await;
        assert_eq!(s, StatusCode::OK, "{v}");
        v["totals"]
            .as_array()
            .and_then(|ts| {
                ts.iter().filter(|t| t["feature"] == feature).max_by_key(|t| t["period_start"].as_str().map(str::to_string)).cloned()
            })
            .unwrap_or(Value::Null)
    }

    /// The user's credit balance as `GET /v1/entitlements` answers it.
    pub async fn balance(&self, t: &str) -> i64 {
        let (s, v) = self.call("GET", "/v1/entitlements", Some(t), None).await;
        assert_eq!(s, StatusCode::OK, "{v}");
        v["credit_balance"].as_i64().expect("credit_balance")
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

/// A local SMTP sink on 127.0.0.1: accepts every mail and keeps its raw text (the fake of the
/// outside mail server; the client talking to it is the real lettre transport).
pub struct SmtpSink {
    /// Port it listens on.
    pub port: u16,
    mails: std::sync::Arc<std::sync::Mutex<Vec<String>>>,
}

impl SmtpSink {
    /// Starts the sink on the current runtime.
    pub async fn start() -> SmtpSink {
        use tokio::io::{AsyncBufReadExt, AsyncWriteExt, BufReader};
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.expect("bind smtp sink");
        let port = listener.local_addr().unwrap().port();
        let mails = std::sync::Arc::new(std::sync::Mutex::new(Vec::new()));
        let store = mails.clone();
        tokio::spawn(async move {
            while let Ok((stream, _)) = listener.accept().await {
                let store = store.clone();
                tokio::spawn(async move {
                    let (r, mut w) = stream.into_split();
                    let mut lines = BufReader::new(r).lines();
                    let _ = w.write_all(b"220 sink ESMTP\r\n").await;
                    let mut data: Option<String> = None;
                    while let Ok(Some(line)) = lines.next_line().await {
                        if let Some(body) = data.as_mut() {
                            if line == "." {
                                store.lock().unwrap().push(std::mem::take(body));
                                data = None;
                                let _ = w.write_all(b"250 queued\r\n").await;
                            } else {
                                body.push_str(line.strip_prefix('.').unwrap_or(&line));
                                body.push('\n');
                            }
                            continue;
                        }
                        let verb = line.split_whitespace().next().unwrap_or("").to_ascii_uppercase();
                        let reply: &[u8] = match verb.as_str() {
                            "EHLO" | "HELO" => b"250-sink\r\n250 8BITMIME\r\n",
                            "DATA" => {
                                data = Some(String::new());
                                b"354 go on\r\n"
                            }
                            "QUIT" => {
                                let _ = w.write_all(b"221 bye\r\n").await;
                                break;
                            }
                            _ => b"250 ok\r\n",
                        };
                        let _ = w.write_all(reply).await;
                    }
                });
            }
        });
        SmtpSink { port, mails }
    }

    /// The `TALLY_SMTP_URL` of the sink.
    pub fn url(&self) -> String {
        format!("smtp://127.0.0.1:{}", self.port)
    }

    /// Every mail received so far (headers and body).
    pub fn mails(&self) -> Vec<String> {
        self.mails.lock().unwrap().clone()
    }

    /// Waits (at most 10 s) for the `n`-th mail (1-based) and returns it.
    pub async fn wait_for(&self, n: usize) -> String {
        for _ in 0..200 {
            if let Some(m) = self.mails().get(n - 1) {
                return m.clone();
            }
            tokio::time::sleep(std::time::Duration::from_millis(50)).await;
        }
        panic!("no mail #{n} arrived; got {:?}", self.mails());
    }
}

/// The single-use token of a mail from the server (its one 48-hex-digit word).
pub fn mailed_token(mail: &str) -> String {
    mail.split_whitespace()
        .find(|w| w.len() == 48 && w.bytes().all(|b| b.is_ascii_hexdigit()))
        .unwrap_or_else(|| panic!("no token in mail {mail}"))
        .to_string()
}

/// Turns password accounts on, mailing through `sink`.
pub fn password_auth(c: &mut Config, sink: &SmtpSink) {
    c.password_auth = true;
    c.smtp_url = Some(sink.url());
    c.mail_from = Some("Tally <no-reply@tally.test>".into());
}

impl TestApp {
    /// [`TestApp::call`] from the client address `addr` (`ip:port`).
    pub async fn call_from(&self, addr: &str, method: &str, path: &str, body: Value) -> (StatusCode, Value, axum::http::HeaderMap) {
        let peer: std::net::SocketAddr = addr.parse().expect("socket address");
        let mut req = Request::builder()
            .method(method)
            .uri(path)
            .header("content-type", "application/json")
            .body(Body::from(serde_json::to_vec(&body).unwrap()))
            .unwrap();
        req.extensions_mut().insert(axum::extract::ConnectInfo(peer));
        let resp = self.router.clone().oneshot(req).await.expect("response");
        let status = resp.status();
        let headers = resp.headers().clone();
        let bytes = axum::body::to_bytes(resp.into_body(), usize::MAX).await.expect("body");
        (status, serde_json::from_slice(&bytes).unwrap_or(Value::Null), headers)
    }
}

/// `v` with a field no provider documents added to every object in it (a future API version's
/// addition): parsers of provider payloads must take it.
pub fn with_unknown_fields(v: &Value) -> Value {
    match v {
        Value::Object(o) => {
            let mut o: serde_json::Map<String, Value> = o.iter().map(|(k, v)| (k.clone(), with_unknown_fields(v))).collect();
            o.insert("fieldAddedLater".into(), Value::String("a field no documentation named yet".into()));
            Value::Object(o)
        }
        Value::Array(a) => Value::Array(a.iter().map(with_unknown_fields).collect()),
        other => other.clone(),
    }
}
