//! Harness of the end-to-end tests: a throwaway Postgres cluster, real `tally-server`
//! processes on loopback, device databases, identity tokens, and a response-cutting proxy.

use chrono::{DateTime, Utc};
use std::net::TcpListener;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::Arc;
use std::time::{Duration, Instant};
use tally_core::{Catalog, Config, ManualClock, Tally};
use tally_server::pg_cluster::{Cluster, ClusterOptions};

pub mod proxy;

/// Shared secret of the test identity provider (HS256).
pub const JWT_SECRET: &str = "e2e-test-secret-of-the-identity-provider";

/// The plan catalog every test server and device uses.
pub const PLANS: &str = r#"{"models": {"gpt-4o": {"input_micros_per_mtok": 2500000, "output_micros_per_mtok": 10000000}},
 "plans": [
  {"id": "free", "features": {
    "ai_chat":  {"type": "metered", "limit": 5, "period": "month", "enforcement": "hard"},
    "notes":    {"type": "metered", "limit": null, "period": "day", "enforcement": "hard"},
    "lifetime_notes": {"type": "metered", "limit": null, "period": "lifetime", "enforcement": "hard"},
    "export":   {"type": "flag", "enabled": false}}},
  {"id": "pro", "features": {
    "ai_chat":  {"type": "metered", "limit": 1000, "period": "month", "enforcement": "hard"},
    "notes":    {"type": "metered", "limit": null, "period": "day", "enforcement": "hard"},
    "lifetime_notes": {"type": "metered", "limit": null, "period": "lifetime", "enforcement": "hard"},
    "export":   {"type": "flag", "enabled": true}}}]}"#;

/// Whether the end-to-end tests must run: under `CI=true` or `TALLY_REQUIRE_PG=1` a Postgres
/// that cannot start fails the test instead of skipping it.
pub fn pg_required() -> bool {
    let set = |k: &str| std::env::var(k).is_ok_and(|v| matches!(v.to_ascii_lowercase().as_str(), "1" | "true" | "yes"));
    set("CI") || set("TALLY_REQUIRE_PG")
}

/// One throwaway cluster for the whole test binary (each test makes its own database in it);
/// `None` as for [`postgres`].
pub fn shared_cluster() -> Option<&'static Cluster> {
    static PG: std::sync::OnceLock<Option<(Cluster, tempfile::TempDir)>> = std::sync::OnceLock::new();
    PG.get_or_init(|| {
        let dir = tempfile::Builder::new().prefix("tally-e2e-").tempdir_in("/tmp").expect("tempdir");
        postgres(dir.path()).map(|c| (c, dir))
    })
    .as_ref()
    .map(|(c, _)| c)
}

/// A throwaway Postgres cluster and database, or `None` (with a loud message) when the
/// PostgreSQL binaries are not installed and Postgres is not required ([`pg_required`]).
pub fn postgres(dir: &Path) -> Option<Cluster> {
    match Cluster::start(&dir.join("pg"), ClusterOptions { fast_unsafe: true, ephemeral: true, port: None }) {
        Ok(c) => Some(c),
        Err(e @ tally_server::pg_cluster::ClusterError::BinariesNotFound) if pg_required() => {
            panic!("PostgreSQL is required here (CI=true / TALLY_REQUIRE_PG=1) but cannot start: {e}")
        }
        Err(tally_server::pg_cluster::ClusterError::BinariesNotFound) => {
            eprintln!("\n!!!!! SKIPPING end-to-end test: PostgreSQL binaries not installed (apt-get install -y postgresql) !!!!!\n");
            None
        }
        Err(e) => panic!("cannot start Postgres: {e}"),
    }
}

/// The `tally-server` binary under test: `TALLY_SERVER_BIN` when set (a target directory shared
/// by several checkouts holds only the last build at `debug/tally-server`), else the one cargo
/// builds (rebuilt first when its source changed).
pub fn server_binary() -> PathBuf {
    if let Some(bin) = std::env::var_os("TALLY_SERVER_BIN") {
        return PathBuf::from(bin);
    }
    let target =
        std::env::var_os("CARGO_TARGET_DIR").map(PathBuf::from).unwrap_or_else(|| Path::new(env!("CARGO_MANIFEST_DIR")).join("../target"));
    // Built once per test process, every time: cargo makes it a no-op when the binary is
    // fresh, and a binary older than the server's source would test yesterday's server.
    static BUILT: std::sync::OnceLock<bool> = std::sync::OnceLock::new();
    let ok = *BUILT
        .get_or_init(|| Command::new(env!("CARGO")).args(["build", "-p", "tally-server"]).status().map(|s| s.success()).unwrap_or(false));
    assert!(ok, "could not build tally-server");
    target.join("debug/tally-server")
}

/// A free loopback port.
pub fn free_port() -> u16 {
    TcpListener::bind("127.0.0.1:0").and_then(|l| l.local_addr()).map(|a| a.port()).unwrap_or(0)
}

/// A running `tally-server` process. Killed on drop.
pub struct Server {
    /// Base URL.
    pub url: String,
    port: u16,
    database_url: String,
    data_dir: PathBuf,
    extra_env: Vec<(String, String)>,
    child: Option<Child>,
}

impl Server {
    /// Starts a server on `database_url`, keeping signing keys in `data_dir` (share it between
    /// replicas so they sign with the same keys).
    pub fn start(database_url: &str, data_dir: &Path, extra_env: &[(&str, &str)]) -> Server {
        let plans = data_dir.join("plans.json");
        std::fs::create_dir_all(data_dir).expect("data dir");
        std::fs::write(&plans, PLANS).expect("plans file");
        let mut s = Server {
            url: String::new(),
            port: free_port(),
            database_url: database_url.into(),
            data_dir: data_dir.into(),
            extra_env: extra_env.iter().map(|(k, v)| (k.to_string(), v.to_string())).collect(),
            child: None,
        };
        s.url = format!("http://127.0.0.1:{}", s.port);
        s.spawn();
        s
    }

    fn spawn(&mut self) {
        let mut cmd = Command::new(server_binary());
        cmd.arg("serve")
            .env("TALLY_DATABASE_URL", &self.database_url)
            .env("TALLY_LISTEN", format!("127.0.0.1:{}", self.port))
            .env("TALLY_DATA_DIR", &self.data_dir)
            .env("TALLY_JWT_SECRET", JWT_SECRET)
            .env("TALLY_PLANS_FILE", self.data_dir.join("plans.json"))
            .env("TALLY_RATE_LIMIT_PER_SEC", "100000")
            .env("TALLY_RATE_LIMIT_BURST", "100000")
            .env("RUST_LOG", "warn")
            .stdout(Stdio::null())
            .stderr(Stdio::inherit());
        for (k, v) in &self.extra_env {
            cmd.env(k, v);
        }
        self.child = Some(cmd.spawn().expect("spawn tally-server"));
        let deadline = Instant::now() + Duration::from_secs(60);
        loop {
            if let Ok(true) = http::blocking_get(&format!("{}/healthz", self.url)) {
                return;
            }
            if let Some(Ok(Some(status))) = self.child.as_mut().map(|c| c.try_wait()) {
                panic!("tally-server exited at start: {status}");
            }
            assert!(Instant::now() < deadline, "tally-server did not become healthy");
            std::thread::sleep(Duration::from_millis(50));
        }
    }

    /// Kills the process with SIGKILL (no chance to clean up).
    pub fn kill9(&mut self) {
        if let Some(mut c) = self.child.take() {
            let _ = nix::sys::signal::kill(nix::unistd::Pid::from_raw(c.id() as i32), nix::sys::signal::Signal::SIGKILL);
            let _ = c.wait();
        }
    }

    /// Starts the process again on the same port and database.
    pub fn restart(&mut self) {
        self.kill9();
        self.spawn();
    }

    /// The server's token-signing keys (JWKS JSON) for device configs.
    pub fn keys(&self) -> String {
        http_get_text(&format!("{}/v1/keys", self.url), None)
    }
}

impl Drop for Server {
    fn drop(&mut self) {
        self.kill9();
    }
}

mod http {
    //! Blocking HTTP for the harness (reqwest's blocking client; call it outside async code).
    use std::sync::OnceLock;
    use std::time::Duration;

    fn client() -> &'static reqwest::blocking::Client {
        static C: OnceLock<reqwest::blocking::Client> = OnceLock::new();
        C.get_or_init(|| reqwest::blocking::Client::builder().timeout(Duration::from_secs(30)).build().expect("HTTP client"))
    }

    /// Whether GET `url` answered 200.
    pub fn blocking_get(url: &str) -> reqwest::Result<bool> {
        Ok(client().get(url).send()?.status() == reqwest::StatusCode::OK)
    }

    /// Sends a JSON request with optional bearer token and extra headers; (status, body).
    pub(crate) fn send_with(
        method: &str,
        url: &str,
        bearer: Option<&str>,
        body: Option<&str>,
        headers: &[(&str, &str)],
    ) -> reqwest::Result<(u16, String)> {
        let method = reqwest::Method::from_bytes(method.as_bytes()).unwrap_or(reqwest::Method::GET);
        let mut req = client().request(method, url).header(reqwest::header::CONTENT_TYPE, "application/json");
        if let Some(t) = bearer {
            req = req.bearer_auth(t);
        }
        for (k, v) in headers {
            req = req.header(*k, *v);
        }
        if let Some(b) = body {
            req = req.body(b.to_string());
        }
        let resp = req.send()?;
        let status = resp.status().as_u16();
        Ok((status, resp.text()?))
    }
}

/// POSTs a Stripe event to `server`'s webhook endpoint, signed as Stripe signs it
/// (`Stripe-Signature: t=…,v1=HMAC-SHA256(secret, "{t}.{body}")`).
pub fn post_stripe_event(server: &Server, secret: &str, event: &serde_json::Value) -> (u16, String) {
    let body = event.to_string();
    let t = Utc::now().timestamp();
    let sig = format!("t={t},v1={}", tally_server::billing::signature::sign(secret, t, body.as_bytes()));
    http::send_with("POST", &format!("{}/v1/webhooks/stripe", server.url), None, Some(&body), &[("Stripe-Signature", &sig)])
        .expect("POST webhook")
}

/// Sends a request; returns (status, body).
pub fn raw_request(method: &str, url: &str, bearer: Option<&str>, body: Option<&str>) -> reqwest::Result<(u16, String)> {
    http::send_with(method, url, bearer, body, &[])
}

/// GET `url` and return the body (panics unless 200).
pub fn http_get_text(url: &str, bearer: Option<&str>) -> String {
    let (status, body) = raw_request("GET", url, bearer, None).expect("GET");
    assert_eq!(status, 200, "GET {url}: {body}");
    body
}

/// GET `url` as `sub` from async code; the JSON body (panics unless 200).
pub async fn get_json(url: &str, sub: &str) -> serde_json::Value {
    let r = reqwest::Client::new().get(url).bearer_auth(id_token(sub)).send().await.expect("GET");
    assert_eq!(r.status(), 200, "GET {url}");
    r.json().await.expect("JSON body")
}

/// An identity token for `sub`, valid for an hour from the real clock.
pub fn id_token(sub: &str) -> String {
    let now = Utc::now().timestamp();
    let claims =
        serde_json::json!({"sub": sub, "iat": now, "exp": now + 3600, "email": format!("{sub}@example.com"), "email_verified": true});
    jsonwebtoken::encode(
        &jsonwebtoken::Header::new(jsonwebtoken::Algorithm::HS256),
        &claims,
        &jsonwebtoken::EncodingKey::from_secret(JWT_SECRET.as_bytes()),
    )
    .expect("sign identity token")
}

/// A device: its own SQLite file, device id and clock.
pub struct Device {
    /// The library.
    pub tally: Tally,
    /// Its clock.
    pub clock: Arc<ManualClock>,
    /// Its database file.
    pub path: PathBuf,
}

/// Opens (or reopens) a device database at `path` trusting `keys`.
pub fn device(path: &Path, name: &str, keys: &str, at: DateTime<Utc>) -> Device {
    let clock = Arc::new(ManualClock::new(at));
    let config = Config {
        device_id: Some(name.into()),
        clock: clock.clone(),
        catalog: Catalog::from_json(PLANS).expect("catalog"),
        server_keys: Some(keys.into()),
        local_only_settings: vec!["theme".into()],
        ..Config::default()
    };
    Device { tally: Tally::open(path, config).expect("open device"), clock, path: path.into() }
}

/// Sum of a feature's events of one user on the server, as the server's own report says.
pub fn server_usage(server: &Server, sub: &str, feature: &str) -> u64 {
    let body = http_get_text(
        &format!("{}/v1/usage?group_by=feature&from=2000-01-01T00:00:00Z&to=2100-01-01T00:00:00Z", server.url),
        Some(&id_token(sub)),
    );
    let v: serde_json::Value = serde_json::from_str(&body).expect("usage json");
    let rows = v.get("rows").cloned().unwrap_or(v);
    rows.as_array().map(|a| a.iter().filter(|r| r["feature"] == feature).map(|r| r["amount"].as_u64().unwrap_or(0)).sum()).unwrap_or(0)
}

/// A loopback TCP proxy that forwards requests to `upstream` but, for the first `cut` requests,
/// drops the connection after the server has answered (the device never reads the answer).
pub struct CuttingProxy {
    /// Base URL of the proxy.
    pub url: String,
    /// How many answers were cut.
    pub cut: Arc<std::sync::atomic::AtomicUsize>,
}

impl CuttingProxy {
    /// Starts the proxy on a free port (runs until the process exits).
    pub fn start(upstream: &str, cut: usize) -> CuttingProxy {
        use std::io::{Read, Write};
        use std::sync::atomic::{AtomicUsize, Ordering};
        let listener = TcpListener::bind("127.0.0.1:0").expect("bind proxy");
        let url = format!("http://{}", listener.local_addr().expect("addr"));
        let upstream = upstream.trim_start_matches("http://").to_string();
        let counter = Arc::new(AtomicUsize::new(0));
        let c2 = counter.clone();
        std::thread::spawn(move || {
            for client in listener.incoming().flatten() {
                let upstream = upstream.clone();
                let counter = c2.clone();
                std::thread::spawn(move || {
                    let Ok(mut server) = std::net::TcpStream::connect(&upstream) else { return };
                    let mut client_r = client.try_clone().expect("clone");
                    let mut server_w = server.try_clone().expect("clone");
                    std::thread::spawn(move || {
                        let _ = std::io::copy(&mut client_r, &mut server_w);
                        let _ = server_w.shutdown(std::net::Shutdown::Write);
                    });
                    let mut client_w = client;
                    let mut buf = [0u8; 16384];
                    loop {
                        let n = match server.read(&mut buf) {
                            Ok(0) | Err(_) => break,
                            Ok(n) => n,
                        };
                        // The server has started answering, so it has committed: cut here.
                        if counter.load(Ordering::SeqCst) < cut {
                            counter.fetch_add(1, Ordering::SeqCst);
                            let _ = client_w.shutdown(std::net::Shutdown::Both);
                            let _ = server.shutdown(std::net::Shutdown::Both);
                            return;
                        }
                        if client_w.write_all(&buf[..n]).is_err() {
                            break;
                        }
                    }
                    let _ = client_w.shutdown(std::net::Shutdown::Both);
                });
            }
        });
        CuttingProxy { url, cut: counter }
    }
}

/// A `tally-server` replica running inside the test process: its own state (pool, caches,
/// per-user turns) over a shared database, on a loopback port, with the time of a clock the
/// test moves, on a runtime of its own. [`Replica::crash`] drops that runtime at once, like
/// `kill -9`: every request in flight stops where it is (its Postgres transaction rolls back
/// with the dropped connection), nothing is drained; [`Replica::start_again`] brings the replica
/// back on the same port with fresh state.
pub struct Replica {
    /// Base URL.
    pub url: String,
    port: u16,
    config: tally_server::Config,
    clock: Arc<dyn tally_core::Clock>,
    rt: Option<tokio::runtime::Runtime>,
}

impl Replica {
    /// Starts a replica with `config` (database, data dir, plans…) and `clock`.
    pub async fn start(config: tally_server::Config, clock: Arc<dyn tally_core::Clock>) -> Replica {
        let port = free_port();
        let mut r = Replica { url: format!("http://127.0.0.1:{port}"), port, config, clock, rt: None };
        r.start_again().await;
        r
    }

    /// Starts the replica (again) on its port; returns once it accepts connections.
    pub async fn start_again(&mut self) {
        let rt = tokio::runtime::Builder::new_multi_thread().worker_threads(1).enable_all().build().expect("replica runtime");
        let (ready_tx, ready_rx) = tokio::sync::oneshot::channel();
        let (config, clock, port) = (self.config.clone(), self.clock.clone(), self.port);
        rt.spawn(async move {
            let state = tally_server::AppState::with_clock(config.clone(), clock).await.expect("replica state");
            let deadline = Instant::now() + Duration::from_secs(10);
            let listener = loop {
                match tokio::net::TcpListener::bind(("127.0.0.1", port)).await {
                    Ok(l) => break l,
                    Err(e) => {
                        assert!(Instant::now() < deadline, "cannot bind the replica's port again: {e}");
                        tokio::time::sleep(Duration::from_millis(20)).await;
                    }
                }
            };
            let _ = ready_tx.send(());
            let limits = tally_server::http::HttpLimits::from_config(&config);
            tally_server::http::serve(listener, tally_server::app(state), limits, std::future::pending(), Duration::ZERO).await;
        });
        ready_rx.await.expect("the replica did not start");
        self.rt = Some(rt);
    }

    /// Drops the replica at once, like `kill -9` (see the type's docs).
    pub async fn crash(&mut self) {
        if let Some(rt) = self.rt.take() {
            rt.shutdown_background();
        }
    }
}

impl Drop for Replica {
    fn drop(&mut self) {
        if let Some(rt) = self.rt.take() {
            rt.shutdown_background();
        }
    }
}
