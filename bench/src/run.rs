//! The server benchmarks: ingest through `POST /v1/sync` against straight `UNNEST` inserts,
//! duplicates, a 10,000,000-row table, entitlements against `/healthz`, online checks, and
//! device drains.

use crate::arg;
use hdrhistogram::Histogram;
use serde_json::{Value, json};
use std::io::Write;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::Arc;
use std::time::{Duration, Instant};
use tally_core::{Catalog, Config, ConsumeItem, Profile, SyncOptions, Tally, UsageMeta};
use tally_server::pg_cluster::{Cluster, ClusterOptions};
use uuid::Uuid;

const JWT_SECRET: &str = "bench-secret-of-the-identity-provider";
const PLANS: &str = r#"{"plans": [
  {"id": "free", "features": {
    "ai_chat": {"type": "metered", "limit": 5, "period": "month", "enforcement": "hard"},
    "notes":   {"type": "metered", "limit": null, "period": "day", "enforcement": "hard"},
    "calls":   {"type": "metered", "limit": 1000000000000, "period": "month", "enforcement": "hard"}}}]}"#;
const BATCH: usize = 500;
const DEVICES: usize = 16;

type Res<T> = Result<T, String>;

/// One load loop: how many operations it did, and their latencies.
type LoopResult<N> = Res<(N, Histogram<u64>)>;

/// Waits for load loops that each return (count, latency histogram): the summed count and the
/// merged histogram.
async fn join_counts<N: std::ops::AddAssign + Default>(tasks: Vec<tokio::task::JoinHandle<LoopResult<N>>>) -> LoopResult<N> {
    let mut h = hist();
    let mut total = N::default();
    for t in tasks {
        let (k, th) = t.await.map_err(|e| e.to_string())??;
        total += k;
        h.add(th).map_err(|e| e.to_string())?;
    }
    Ok((total, h))
}

fn hist() -> Histogram<u64> {
    Histogram::new_with_bounds(1, 600_000_000_000, 3).expect("histogram bounds")
}

fn pct(h: &Histogram<u64>) -> Value {
    let us = |q: f64| h.value_at_quantile(q) as f64 / 1000.0;
    json!({"p50_us": us(0.5), "p90_us": us(0.9), "p99_us": us(0.99), "p999_us": us(0.999), "max_us": h.max() as f64 / 1000.0, "count": h.len()})
}

struct Sink {
    path: PathBuf,
    lines: Vec<Value>,
    /// The server process, whose own CPU time is reported beside each `server.*` figure.
    server_pid: Option<u32>,
    /// The server's CPU seconds at the last [`Sink::mark`].
    cpu_mark: Option<f64>,
}

/// CPU seconds (user + system) process `pid` has used so far, from `/proc/<pid>/stat`
/// (`utime` and `stime`, fields 14 and 15, in USER_HZ = 100 ticks per second on Linux).
fn cpu_seconds(pid: u32) -> Option<f64> {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
    // The command name (field 2) is in parentheses and may hold spaces: count from its end.
    let fields: Vec<&str> = stat.get(stat.rfind(')')? + 2..)?.split_whitespace().collect();
    let ticks = fields.get(11)?.parse::<f64>().ok()? + fields.get(12)?.parse::<f64>().ok()?;
    Some(ticks / 100.0)
}

impl Sink {
    /// Starts a measured phase: the server's CPU time from here is charged to the next
    /// `server.*` figure.
    fn mark(&mut self) {
        self.cpu_mark = self.server_pid.and_then(cpu_seconds);
    }

    /// The server's CPU seconds per 1,000 requests since [`Sink::mark`], for a figure of `name`
    /// measured over the requests of `h`.
    fn server_cpu(&self, name: &str, h: Option<&Histogram<u64>>) -> Option<f64> {
        let h = h.filter(|h| name.starts_with("server.") && !h.is_empty())?;
        let used = self.server_pid.and_then(cpu_seconds)? - self.cpu_mark?;
        Some(used / h.len() as f64 * 1000.0)
    }

    fn push(&mut self, v: Value) {
        self.lines.push(v);
        // Rewritten after every figure, so a failure later keeps what was measured.
        if let Ok(mut f) = std::fs::File::create(&self.path) {
            for l in &self.lines {
                let _ = writeln!(f, "{l}");
            }
        }
    }

    fn measurement(&mut self, name: &str, value: f64, unit: &str, h: Option<&Histogram<u64>>) {
        let cpu = self.server_cpu(name, h);
        eprintln!("  {name:<34} {value:>14.1} {unit}{}", detail(h, cpu));
        let mut v = json!({"kind": "measurement", "name": name, "value": value, "unit": unit});
        if let Some(h) = h {
            v["percentiles"] = pct(h);
            v["requests"] = json!(h.len());
        }
        if let Some(c) = cpu {
            v["server_cpu_s_per_1000"] = json!(c);
        }
        self.push(v);
    }

    #[allow(clippy::too_many_arguments)]
    fn result(
        &mut self,
        name: &str,
        value: f64,
        unit: &str,
        baseline: Option<(&str, f64)>,
        target: &str,
        met: Option<bool>,
        h: Option<&Histogram<u64>>,
        extra: Value,
    ) {
        let ratio = baseline.map(|(_, b)| if b > 0.0 { value / b } else { f64::NAN });
        let cpu = self.server_cpu(name, h);
        eprintln!(
            "  {name:<34} {value:>14.1} {unit:<10} baseline {:<34} {:>12.1}  ratio {:>7.3}  target: {target}  {}{}",
            baseline.map_or("—", |b| b.0),
            baseline.map_or(f64::NAN, |b| b.1),
            ratio.unwrap_or(f64::NAN),
            match met {
                Some(true) => "MET",
                Some(false) => "MISSED",
                None => "",
            },
            detail(h, cpu)
        );
        let mut v = json!({
            "kind": "result", "name": name, "value": value, "unit": unit,
            "baseline_name": baseline.map(|b| b.0), "baseline_value": baseline.map(|b| b.1),
            "ratio": ratio, "target": target, "met": met,
        });
        if let Some(h) = h {
            v["percentiles"] = pct(h);
            v["requests"] = json!(h.len());
        }
        if let Some(c) = cpu {
            v["server_cpu_s_per_1000"] = json!(c);
        }
        if let Value::Object(m) = extra {
            for (k, x) in m {
                v[k] = x;
            }
        }
        self.push(v);
    }
}

/// `   p50 … p99 … n …` (and the server's CPU per 1,000 requests) for a figure's console line.
fn detail(h: Option<&Histogram<u64>>, cpu: Option<f64>) -> String {
    let Some(h) = h else { return String::new() };
    let q = |x: f64| h.value_at_quantile(x) as f64 / 1e3;
    let cpu = cpu.map(|c| format!("  server {c:.3} CPU-s/1000")).unwrap_or_default();
    format!("   p50 {:.0} µs  p99 {:.0} µs  n {}{cpu}", q(0.5), q(0.99), h.len())
}

fn id_token(sub: &str) -> String {
    let now = chrono::Utc::now().timestamp();
    let claims = json!({"sub": sub, "iat": now, "exp": now + 6 * 3600, "email": format!("{sub}@example.com"), "email_verified": true});
    jsonwebtoken::encode(
        &jsonwebtoken::Header::new(jsonwebtoken::Algorithm::HS256),
        &claims,
        &jsonwebtoken::EncodingKey::from_secret(JWT_SECRET.as_bytes()),
    )
    .expect("sign identity token")
}

/// A `POST /v1/sync` body of `n` new events (UUID v7 ids) from `device`.
fn sync_body(device: &str, seq: &mut u64, n: usize) -> String {
    let now = chrono::Utc::now().to_rfc3339_opts(chrono::SecondsFormat::Millis, true);
    let mut s = String::with_capacity(64 + n * 140);
    s.push_str(&format!("{{\"protocol\":1,\"device_id\":\"{device}\",\"events\":["));
    for i in 0..n {
        *seq += 1;
        if i > 0 {
            s.push(',');
        }
        s.push_str(&format!(
            "{{\"id\":\"{}\",\"feature\":\"notes\",\"amount\":1,\"occurred_at\":\"{now}\",\"device_seq\":{seq}}}",
            Uuid::now_v7()
        ));
    }
    s.push_str("]}");
    s
}

struct ServerProc {
    child: Child,
    url: String,
}

impl Drop for ServerProc {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0").and_then(|l| l.local_addr()).map(|a| a.port()).unwrap_or(0)
}

fn start_server(bin: &Path, database_url: &str, dir: &Path) -> Res<ServerProc> {
    let plans = dir.join("plans.json");
    std::fs::write(&plans, PLANS).map_err(|e| e.to_string())?;
    let port = free_port();
    let log = std::fs::File::create(dir.join("server.log")).map_err(|e| e.to_string())?;
    let child = Command::new(bin)
        .arg("serve")
        .env("TALLY_DATABASE_URL", database_url)
        .env("TALLY_LISTEN", format!("127.0.0.1:{port}"))
        .env("TALLY_DATA_DIR", dir.join("data"))
        .env("TALLY_JWT_SECRET", JWT_SECRET)
        .env("TALLY_PLANS_FILE", &plans)
        .env("TALLY_RATE_LIMIT_PER_SEC", "10000000")
        .env("TALLY_RATE_LIMIT_BURST", "10000000")
        .env("RUST_LOG", "warn")
        .stdout(Stdio::null())
        .stderr(log)
        .spawn()
        .map_err(|e| format!("spawning {}: {e}", bin.display()))?;
    let s = ServerProc { child, url: format!("http://127.0.0.1:{port}") };
    let deadline = Instant::now() + Duration::from_secs(60);
    loop {
        if std::net::TcpStream::connect(("127.0.0.1", port)).is_ok() {
            return Ok(s);
        }
        if Instant::now() > deadline {
            return Err("tally-server did not start (see server.log)".into());
        }
        std::thread::sleep(Duration::from_millis(50));
    }
}

pub fn main(args: &[String]) -> i32 {
    let quick = args.iter().any(|a| a == "--quick");
    let Some(bin) = arg(args, "--server-bin") else {
        eprintln!("--server-bin is required");
        return 2;
    };
    let out = PathBuf::from(arg(args, "--out").unwrap_or_else(|| "target/bench-server.jsonl".into()));
    let rt = tokio::runtime::Builder::new_multi_thread().worker_threads(2).enable_all().build().expect("runtime");
    match rt.block_on(run(PathBuf::from(bin), out, quick)) {
        Ok(()) => 0,
        Err(e) => {
            eprintln!("tally-loadgen: {e}");
            1
        }
    }
}

struct Env {
    client: reqwest::Client,
    url: String,
    pg: tokio_postgres::Client,
    cluster_url: String,
}

async fn pg_connect(url: &str) -> Res<tokio_postgres::Client> {
    let (client, conn) = tokio_postgres::connect(url, tokio_postgres::NoTls).await.map_err(|e| e.to_string())?;
    tokio::spawn(async move {
        let _ = conn.await;
    });
    Ok(client)
}

async fn run(bin: PathBuf, out: PathBuf, quick: bool) -> Res<()> {
    let cores = std::thread::available_parallelism().map(|n| n.get()).unwrap_or(1) as f64;
    let mut sink = Sink { path: out.clone(), lines: Vec::new(), server_pid: None, cpu_mark: None };
    let dir = tempfile::tempdir().map_err(|e| e.to_string())?;
    eprintln!("server benchmarks ({} mode) in {}", if quick { "quick" } else { "full" }, dir.path().display());
    let cluster = Cluster::start(&dir.path().join("pg"), ClusterOptions { fast_unsafe: true, ephemeral: true, port: None })
        .map_err(|e| e.to_string())?;
    let cluster_url = cluster.url();
    let server = start_server(&bin, &cluster_url, dir.path())?;
    sink.server_pid = Some(server.child.id());
    let client = reqwest::Client::builder().pool_max_idle_per_host(512).build().map_err(|e| e.to_string())?;
    let env = Env { client, url: server.url.clone(), pg: pg_connect(&cluster_url).await?, cluster_url };

    // Users: 16 for the spread load, one for the hot-user load.
    let subs: Vec<String> = (0..DEVICES).map(|i| format!("bench-user-{i}")).collect();
    let tokens: Vec<String> = subs.iter().map(|s| id_token(s)).collect();
    let hot_token = id_token("bench-hot-user");
    for t in tokens.iter().chain(std::iter::once(&hot_token)) {
        let r = env.client.get(format!("{}/v1/me", env.url)).bearer_auth(t).send().await.map_err(|e| e.to_string())?;
        if !r.status().is_success() {
            return Err(format!("GET /v1/me: {}", r.status()));
        }
    }
    let user_ids: Vec<Uuid> = {
        let rows = env
            .pg
            .query("SELECT external_id, user_id FROM users WHERE external_id = ANY($1)", &[&subs])
            .await
            .map_err(|e| e.to_string())?;
        let m: std::collections::HashMap<String, Uuid> = rows.iter().map(|r| (r.get(0), r.get(1))).collect();
        subs.iter().map(|s| m.get(s).copied().ok_or("user missing")).collect::<Result<_, _>>()?
    };

    // ------------------------------------------------------------ sync drains (empty server)
    eprintln!("sync drains");
    let keys =
        env.client.get(format!("{}/v1/keys", env.url)).send().await.map_err(|e| e.to_string())?.text().await.map_err(|e| e.to_string())?;
    let mut drains10 = Vec::new();
    for i in 0..3 {
        drains10.push(drain(&env, dir.path(), &keys, &format!("drain10k-{i}"), 10_000).await?);
    }
    drains10.sort_by(f64::total_cmp);
    let d10 = drains10[1];
    sink.result(
        "sync.drain_10k_ms",
        d10,
        "ms",
        None,
        "≤ 1,000 ms",
        Some(d10 <= 1000.0),
        None,
        json!({"runs_ms": drains10, "events_per_s": 10_000.0 / (d10 / 1e3)}),
    );
    // Leases: the same drain of uses decided under a lease (a hard pool: they carry lease_ver
    // and count in the device's `consumed`), and the device's decisions with a lease against
    // the same decisions for a local user of the same database (no lease, round-1 rules).
    let mut leased_runs = Vec::new();
    let mut leased_device = None;
    for i in 0..3 {
        let (ms, tally, user) = drain_device(&env, dir.path(), &keys, &format!("drain10k-leased-{i}"), 10_000, "calls", true).await?;
        leased_runs.push(ms);
        leased_device = Some((tally, user));
    }
    leased_runs.sort_by(f64::total_cmp);
    let dl = leased_runs[1];
    sink.result(
        "sync.drain_10k_leased_ms",
        dl,
        "ms",
        Some(("sync.drain_10k_ms", d10)),
        "ratio ≤ 1.2",
        Some(dl / d10 <= 1.2),
        None,
        json!({"runs_ms": leased_runs, "events_per_s": 10_000.0 / (dl / 1e3)}),
    );
    if let Some((tally, leased_user)) = leased_device {
        // One more sync: the lease is topped up again after the drain.
        let sub = tally.user(&leased_user).map_err(|e| e.to_string())?.external_id.unwrap_or_default();
        tally.sync(&leased_user, SyncOptions::new(env.url.clone(), id_token(&sub))).await.map_err(|e| e.to_string())?;
        let local = tally.create_local_user(Some("no lease")).map_err(|e| e.to_string())?.id;
        let check = |u: &str| -> Res<()> {
            let d = tally.check(u, "calls", 1).map_err(|e| e.to_string())?;
            if d.allowed { Ok(()) } else { Err(format!("check denied: {d:?}")) }
        };
        let (n, rounds) = if quick { (5_000, 4) } else { (20_000, 6) };
        let (h_lc, h_c) = interleaved_p50(rounds, n, || check(&leased_user), || check(&local))?;
        let p50 = |h: &Histogram<u64>| h.value_at_quantile(0.5) as f64 / 1e3;
        sink.measurement("device.check_no_lease_p50", p50(&h_c), "µs", Some(&h_c));
        sink.result(
            "device.check_leased_p50",
            p50(&h_lc),
            "µs",
            Some(("device.check_no_lease_p50", p50(&h_c))),
            "ratio ≤ 1.1",
            Some(p50(&h_lc) / p50(&h_c) <= 1.1),
            Some(&h_lc),
            json!({}),
        );
        let consume = |u: &str| -> Res<()> {
            let d = tally.consume(u, "calls", 1, UsageMeta::default()).map_err(|e| e.to_string())?;
            if d.allowed { Ok(()) } else { Err(format!("consume denied: {d:?}")) }
        };
        let (n, rounds) = if quick { (500, 4) } else { (2_000, 6) };
        let (h_lu, h_u) = interleaved_p50(rounds, n, || consume(&leased_user), || consume(&local))?;
        sink.measurement("device.consume_no_lease_p50", p50(&h_u), "µs", Some(&h_u));
        sink.result(
            "device.consume_leased_p50",
            p50(&h_lu),
            "µs",
            Some(("device.consume_no_lease_p50", p50(&h_u))),
            "ratio ≤ 1.1",
            Some(p50(&h_lu) / p50(&h_u) <= 1.1),
            Some(&h_lu),
            json!({}),
        );
    }
    if !quick {
        let d100 = drain(&env, dir.path(), &keys, "drain100k", 100_000).await?;
        sink.result(
            "sync.drain_100k_ms",
            d100,
            "ms",
            Some(("sync.drain_10k_ms × 10", d10 * 10.0)),
            "ratio ≤ 1.2 (linear)",
            Some(d100 / (d10 * 10.0) <= 1.2),
            None,
            json!({"events_per_s": 100_000.0 / (d100 / 1e3)}),
        );
    }

    // ------------------------------------------------------------ ingest
    let per_device = if quick { 12 } else { 40 };
    eprintln!("ingest: {DEVICES} devices × {per_device} batches × {BATCH} events");
    let base_rows =
        (0..DEVICES * per_device).map(|i| raw_rows(user_ids[i % DEVICES], &format!("raw-{}", i % DEVICES), BATCH)).collect::<Vec<_>>();
    let (base_eps, h_base) = raw_insert(&env.pg, &base_rows).await?;
    drop(base_rows);
    sink.measurement("pg.unnest_insert_eps", base_eps, "events/s", Some(&h_base));

    let spread = make_work(&tokens, per_device, "spread");
    sink.mark();
    let (eps, h) = ingest(&env, &spread, Expect::New).await?;
    sink.result(
        "server.ingest_eps",
        eps,
        "events/s",
        Some(("pg.unnest_insert_eps", base_eps)),
        "≥ 100,000 events/s and ratio ≥ 0.5",
        Some(eps >= 100_000.0 && eps / base_eps >= 0.5),
        Some(&h),
        json!({"per_core": eps / cores, "devices": DEVICES, "users": DEVICES, "batch": BATCH}),
    );
    let hot = make_work(&vec![hot_token.clone(); DEVICES], per_device, "hot");
    sink.mark();
    let (hot_eps, h_hot) = ingest(&env, &hot, Expect::New).await?;
    sink.result(
        "server.ingest_one_user_eps",
        hot_eps,
        "events/s",
        Some(("server.ingest_eps", eps)),
        "report (one user's counter rows serialize)",
        None,
        Some(&h_hot),
        json!({"per_core": hot_eps / cores, "devices": DEVICES, "users": 1, "batch": BATCH}),
    );
    sink.mark();
    let (dup_eps, h_dup) = ingest(&env, &spread, Expect::Duplicates).await?;
    sink.result(
        "server.ingest_dup_eps",
        dup_eps,
        "events/s",
        Some(("server.ingest_eps", eps)),
        "ratio ≥ 1.0",
        Some(dup_eps / eps >= 1.0),
        Some(&h_dup),
        json!({"per_core": dup_eps / cores}),
    );
    drop(spread);
    drop(hot);

    // ------------------------------------------------------------ request rates
    let secs = if quick { 3 } else { 6 };
    eprintln!("request rates: 64 connections, {secs} s each");
    let dur = Duration::from_secs(secs);
    sink.mark();
    let (health_rps, h_health) =
        hammer(&env, 64, dur, Arc::new(|c: &reqwest::Client, url: &str, _i: usize| c.get(format!("{url}/healthz")))).await?;
    sink.measurement("server.healthz_rps", health_rps, "req/s", Some(&h_health));
    let toks = Arc::new(tokens.clone());
    let t2 = toks.clone();
    sink.mark();
    let (ent_rps, h_ent) = hammer(
        &env,
        64,
        dur,
        Arc::new(move |c: &reqwest::Client, url: &str, i: usize| c.get(format!("{url}/v1/entitlements")).bearer_auth(&t2[i % t2.len()])),
    )
    .await?;
    let p99_ms = h_ent.value_at_quantile(0.99) as f64 / 1e6;
    sink.result(
        "server.entitlements_rps",
        ent_rps,
        "req/s",
        Some(("server.healthz_rps", health_rps)),
        "≥ 40,000 req/s, p99 < 3 ms, ratio ≥ 0.4",
        Some(ent_rps >= 40_000.0 && p99_ms < 3.0 && ent_rps / health_rps >= 0.4),
        Some(&h_ent),
        json!({"per_core": ent_rps / cores, "p99_ms": p99_ms, "connections": 64}),
    );
    // What one signature costs, in-process with the server's signer (the entitlements route
    // reuses a token for half its life, so most requests sign nothing).
    let (sign_rps, h_sign) = sign_rate(&dir.path().join("sign-keys"), dur)?;
    sink.result(
        "signing.sign_token_per_s",
        sign_rps,
        "tokens/s",
        Some(("server.healthz_rps", health_rps)),
        "report (one core, in-process)",
        None,
        Some(&h_sign),
        json!({}),
    );
    let t3 = toks.clone();
    sink.mark();
    let (online_rps, h_online) = hammer(
        &env,
        16,
        dur,
        Arc::new(move |c: &reqwest::Client, url: &str, i: usize| {
            let body = format!(
                "{{\"id\":\"{}\",\"feature\":\"notes\",\"amount\":1,\"occurred_at\":\"{}\"}}",
                Uuid::now_v7(),
                chrono::Utc::now().to_rfc3339()
            );
            c.post(format!("{url}/v1/usage")).bearer_auth(&t3[i % t3.len()]).header("content-type", "application/json").body(body)
        }),
    )
    .await?;
    // Its baseline (core.check_p50 as decisions/s) comes from the core's run: `report` fills it in.
    sink.result(
        "server.online_check_rps",
        online_rps,
        "decisions/s",
        None,
        "report the ratio (speed-up of deciding on the device)",
        None,
        Some(&h_online),
        json!({"per_core": online_rps / cores, "connections": 16, "baseline_from_core": "core.check_p50"}),
    );

    // ------------------------------------------------------------ deciding on the server
    eprintln!("consume and holds: 16 connections (one user each), {secs} s each");
    let (raw_rps, h_raw) = raw_consume(&env, &user_ids, dur).await?;
    sink.measurement("pg.lock_check_insert_update_rps", raw_rps, "tx/s", Some(&h_raw));
    let t4 = toks.clone();
    sink.mark();
    let (consume_rps, h_consume) = hammer(
        &env,
        16,
        dur,
        Arc::new(move |c: &reqwest::Client, url: &str, i: usize| {
            c.post(format!("{url}/v1/consume"))
                .bearer_auth(&t4[i % t4.len()])
                .header("content-type", "application/json")
                .body(r#"{"feature":"calls","amount":1}"#)
        }),
    )
    .await?;
    sink.result(
        "server.consume_rps",
        consume_rps,
        "req/s",
        Some(("pg.lock_check_insert_update_rps", raw_rps)),
        "ratio ≥ 0.5",
        Some(consume_rps / raw_rps >= 0.5),
        Some(&h_consume),
        json!({"per_core": consume_rps / cores, "connections": 16}),
    );
    sink.mark();
    let (hold_rps, h_hold) = hold_commit(&env, &tokens, dur).await?;
    sink.result(
        "server.hold_commit_rps",
        hold_rps,
        "holds/s",
        Some(("server.consume_rps", consume_rps)),
        "report the ratio (a hold and its commit are two requests)",
        None,
        Some(&h_hold),
        json!({"per_core": hold_rps / cores, "connections": 16, "requests_per_hold": 2}),
    );

    // ------------------------------------------------------------ 10,000,000 rows
    if !quick {
        let target_rows: i64 = 10_000_000;
        let have: i64 = env.pg.query_one("SELECT count(*) FROM events", &[]).await.map_err(|e| e.to_string())?.get(0);
        let n = (target_rows - have).max(0);
        eprintln!("10M fixture: inserting {n} rows with INSERT … SELECT generate_series (2 connections)");
        let t = Instant::now();
        fixture(&env, &user_ids, n).await?;
        env.pg.batch_execute("ANALYZE events").await.map_err(|e| e.to_string())?;
        let build_s = t.elapsed().as_secs_f64();
        let rows: i64 = env.pg.query_one("SELECT count(*) FROM events", &[]).await.map_err(|e| e.to_string())?.get(0);
        sink.measurement("fixture.pg_10m_build_s", build_s, "s", None);
        sink.measurement("fixture.pg_events_rows", rows as f64, "rows", None);
        let work = make_work(&tokens, per_device, "after10m");
        sink.mark();
        let (eps10, h10) = ingest(&env, &work, Expect::New).await?;
        sink.result(
            "server.ingest_10m_eps",
            eps10,
            "events/s",
            Some(("server.ingest_eps", eps)),
            "ratio ≥ 0.7",
            Some(eps10 / eps >= 0.7),
            Some(&h10),
            json!({"per_core": eps10 / cores, "table_rows": rows}),
        );
    }
    drop(server);
    drop(cluster);
    eprintln!("server results written to {}", out.display());
    Ok(())
}

/// A device with `n` offline events syncs them all; returns the wall time in ms.
async fn drain(env: &Env, dir: &Path, keys: &str, name: &str, n: usize) -> Res<f64> {
    Ok(drain_device(env, dir, keys, name, n, "notes", false).await?.0)
}

/// A device that records `n` uses of `feature` offline, then syncs them all: the wall time of
/// that drain in ms, and the device (with its user). With `leased`, the device syncs once
/// first, so its uses of a hard pool are decided under a lease and carry `lease_ver`.
async fn drain_device(env: &Env, dir: &Path, keys: &str, name: &str, n: usize, feature: &str, leased: bool) -> Res<(f64, Tally, String)> {
    let config = Config {
        device_id: Some(name.into()),
        catalog: Catalog::from_json(PLANS).map_err(|e| e.to_string())?,
        server_keys: Some(keys.into()),
        ..Config::default()
    };
    let tally = Tally::open(dir.join(format!("{name}.db")), config).map_err(|e| e.to_string())?;
    let sub = format!("bench-{name}");
    let user = tally
        .sign_in(Profile { external_id: sub.clone(), email: Some(format!("{sub}@example.com")), ..Profile::default() }, None)
        .map_err(|e| e.to_string())?;
    let options = SyncOptions::new(env.url.clone(), id_token(&sub));
    if leased {
        tally.sync(&user.id, options.clone()).await.map_err(|e| e.to_string())?;
    }
    let items: Vec<ConsumeItem> =
        (0..10_000.min(n)).map(|_| ConsumeItem { feature: feature.into(), amount: 1, meta: UsageMeta::default() }).collect();
    let mut left = n;
    while left > 0 {
        let k = left.min(items.len());
        let ds = tally.consume_many(&user.id, &items[..k]).map_err(|e| e.to_string())?;
        if let Some(d) = ds.iter().find(|d| !d.allowed) {
            return Err(format!("drain {name}: a use of {feature} was denied: {d:?}"));
        }
        left -= k;
    }
    let t = Instant::now();
    let report = tally.sync(&user.id, options).await.map_err(|e| e.to_string())?;
    let ms = t.elapsed().as_secs_f64() * 1e3;
    if report.events_acked != n as u64 {
        return Err(format!("drain {name}: {} of {n} events acked ({report:?})", report.events_acked));
    }
    eprintln!("  {name}: {n} events in {ms:.0} ms ({} rounds)", report.rounds);
    Ok((ms, tally, user.id))
}

/// p50 (µs) of `rounds × n` calls of `ours` and of `base`, interleaved in rounds so that drift
/// hits both alike.
fn interleaved_p50(
    rounds: usize,
    n: usize,
    mut ours: impl FnMut() -> Res<()>,
    mut base: impl FnMut() -> Res<()>,
) -> Res<(Histogram<u64>, Histogram<u64>)> {
    let (mut ho, mut hb) = (hist(), hist());
    for _ in 0..rounds {
        for (f, h) in [(&mut ours as &mut dyn FnMut() -> Res<()>, &mut ho), (&mut base, &mut hb)] {
            for _ in 0..n {
                let t = Instant::now();
                f()?;
                h.record(t.elapsed().as_nanos().max(1) as u64).map_err(|e| e.to_string())?;
            }
        }
    }
    Ok((ho, hb))
}

struct Rows {
    user: Uuid,
    device: String,
    ids: Vec<Uuid>,
    feature: Vec<String>,
    amount: Vec<i64>,
    at: Vec<chrono::DateTime<chrono::Utc>>,
    clamped: Vec<bool>,
    seq: Vec<Option<i64>>,
    model: Vec<Option<String>>,
    tokens: Vec<Option<i64>>,
    cost: Vec<i64>,
    metadata: Vec<Option<Value>>,
}

fn raw_rows(user: Uuid, device: &str, n: usize) -> Rows {
    let now = chrono::Utc::now();
    Rows {
        user,
        device: device.into(),
        ids: (0..n).map(|_| Uuid::now_v7()).collect(),
        feature: vec!["notes".into(); n],
        amount: vec![1; n],
        at: vec![now; n],
        clamped: vec![false; n],
        seq: (0..n as i64).map(Some).collect(),
        model: vec![None; n],
        tokens: vec![None; n],
        cost: vec![0; n],
        metadata: vec![None; n],
    }
}

/// The baseline: the same rows straight into Postgres, one `INSERT … SELECT FROM unnest … ON
/// CONFLICT DO NOTHING` per batch, from one connection.
async fn raw_insert(pg: &tokio_postgres::Client, batches: &[Rows]) -> Res<(f64, Histogram<u64>)> {
    let st = pg
        .prepare(
            "INSERT INTO events (user_id, id, feature, amount, occurred_at, effective_at, clamped, received_at, device_id, device_seq, \
               model, input_tokens, output_tokens, cost_micros, metadata, source, credits) \
             SELECT $1, t.id, t.feature, t.amount, t.occurred_at, t.effective_at, t.clamped, $2, $3, t.device_seq, \
               t.model, t.input_tokens, t.output_tokens, t.cost_micros, t.metadata, 'sync', 0 \
             FROM unnest($4::uuid[], $5::text[], $6::int8[], $7::timestamptz[], $8::timestamptz[], $9::bool[], $10::int8[], \
               $11::text[], $12::int8[], $13::int8[], $14::int8[], $15::jsonb[]) \
               AS t(id, feature, amount, occurred_at, effective_at, clamped, device_seq, model, input_tokens, output_tokens, cost_micros, metadata) \
             ON CONFLICT (user_id, id) DO NOTHING",
        )
        .await
        .map_err(|e| e.to_string())?;
    let mut h = hist();
    let now = chrono::Utc::now();
    let t0 = Instant::now();
    let mut n = 0u64;
    for b in batches {
        let t = Instant::now();
        n += pg
            .execute(
                &st,
                &[
                    &b.user,
                    &now,
                    &b.device,
                    &b.ids,
                    &b.feature,
                    &b.amount,
                    &b.at,
                    &b.at,
                    &b.clamped,
                    &b.seq,
                    &b.model,
                    &b.tokens,
                    &b.tokens,
                    &b.cost,
                    &b.metadata,
                ],
            )
            .await
            .map_err(|e| e.to_string())?;
        let _ = h.record(t.elapsed().as_nanos().max(1) as u64);
    }
    let secs = t0.elapsed().as_secs_f64();
    Ok((n as f64 / secs, h))
}

/// Per device: its token and its pre-serialized request bodies.
type Work = Vec<(String, Vec<String>)>;

fn make_work(tokens: &[String], per_device: usize, tag: &str) -> Work {
    tokens
        .iter()
        .enumerate()
        .map(|(i, t)| {
            let device = format!("{tag}-device-{i}");
            let mut seq = 0;
            (t.clone(), (0..per_device).map(|_| sync_body(&device, &mut seq, BATCH)).collect())
        })
        .collect()
}

#[derive(Clone, Copy, PartialEq)]
enum Expect {
    New,
    Duplicates,
}

/// Every device sends its batches one after another, all devices at once. Returns events/s and
/// the per-request latency.
async fn ingest(env: &Env, work: &Work, expect: Expect) -> Res<(f64, Histogram<u64>)> {
    let t0 = Instant::now();
    let mut tasks = Vec::new();
    for (token, bodies) in work.iter().cloned() {
        let client = env.client.clone();
        let url = format!("{}/v1/sync", env.url);
        tasks.push(tokio::spawn(async move {
            let mut h = hist();
            let mut events = 0u64;
            for body in bodies {
                let t = Instant::now();
                let r = client
                    .post(&url)
                    .bearer_auth(&token)
                    .header("content-type", "application/json")
                    .body(body)
                    .send()
                    .await
                    .map_err(|e| e.to_string())?;
                let status = r.status();
                let bytes = r.bytes().await.map_err(|e| e.to_string())?;
                let _ = h.record(t.elapsed().as_nanos().max(1) as u64);
                if !status.is_success() {
                    return Err(format!("POST /v1/sync: {status}: {}", String::from_utf8_lossy(&bytes[..bytes.len().min(300)])));
                }
                let v: Value = serde_json::from_slice(&bytes).map_err(|e| e.to_string())?;
                let key = if expect == Expect::New { "accepted" } else { "duplicates" };
                let k = v[key].as_array().map_or(0, Vec::len);
                if k != BATCH {
                    return Err(format!("POST /v1/sync: {k} of {BATCH} events {key}"));
                }
                events += k as u64;
            }
            Ok::<_, String>((events, h))
        }));
    }
    let (events, h) = join_counts(tasks).await?;
    Ok((events as f64 / t0.elapsed().as_secs_f64(), h))
}

type MakeReq = Arc<dyn Fn(&reqwest::Client, &str, usize) -> reqwest::RequestBuilder + Send + Sync>;

/// The baseline of `server.consume_rps`: the same decision straight on Postgres, one
/// transaction per use — lock the user row, lock and check the pool row, insert the event,
/// update the pool — on 16 connections (one user each) for `dur`; returns transactions/s.
async fn raw_consume(env: &Env, users: &[Uuid], dur: Duration) -> Res<(f64, Histogram<u64>)> {
    let t0 = Instant::now();
    let deadline = t0 + dur;
    let start = chrono::DateTime::<chrono::Utc>::UNIX_EPOCH;
    let mut tasks = Vec::new();
    for (i, user) in users.iter().copied().enumerate().take(16) {
        let url = env.cluster_url.clone();
        tasks.push(tokio::spawn(async move {
            let mut pg = pg_connect(&url).await?;
            let device = format!("raw-consume-{i}");
            pg.execute(
                "INSERT INTO counters (user_id, feature, period, period_start) VALUES ($1, 'raw_calls', 'month', $2) ON CONFLICT DO NOTHING",
                &[&user, &start],
            )
            .await
            .map_err(|e| e.to_string())?;
            let mut h = hist();
            let mut n = 0u64;
            while Instant::now() < deadline {
                let t = Instant::now();
                let tx = pg.transaction().await.map_err(|e| e.to_string())?;
                tx.query_one("SELECT 1 FROM users WHERE user_id = $1 FOR NO KEY UPDATE", &[&user]).await.map_err(|e| e.to_string())?;
                let used: i64 = tx
                    .query_one(
                        "SELECT used + held FROM counters WHERE user_id = $1 AND feature = 'raw_calls' AND period = 'month' AND period_start = $2 FOR UPDATE",
                        &[&user, &start],
                    )
                    .await
                    .map_err(|e| e.to_string())?
                    .get(0);
                if used + 1 > 1_000_000_000_000 {
                    return Err("raw baseline: limit reached".into());
                }
                let now = chrono::Utc::now();
                tx.execute(
                    "INSERT INTO events (user_id, id, feature, amount, occurred_at, effective_at, clamped, received_at, device_id, cost_micros, source, credits) \
                     VALUES ($1, $2, 'raw_calls', 1, $3, $3, false, $3, $4, 0, 'raw', 0) ON CONFLICT DO NOTHING",
                    &[&user, &Uuid::now_v7(), &now, &device],
                )
                .await
                .map_err(|e| e.to_string())?;
                tx.execute(
                    "UPDATE counters SET used = used + 1 WHERE user_id = $1 AND feature = 'raw_calls' AND period = 'month' AND period_start = $2",
                    &[&user, &start],
                )
                .await
                .map_err(|e| e.to_string())?;
                tx.commit().await.map_err(|e| e.to_string())?;
                let _ = h.record(t.elapsed().as_nanos().max(1) as u64);
                n += 1;
            }
            Ok::<_, String>((n, h))
        }));
    }
    let (n, h) = join_counts(tasks).await?;
    Ok((n as f64 / t0.elapsed().as_secs_f64(), h))
}

/// 16 loops (one user each) creating a hold and committing it, for `dur`; returns committed
/// holds/s and the latency histogram of the pair.
async fn hold_commit(env: &Env, tokens: &[String], dur: Duration) -> Res<(f64, Histogram<u64>)> {
    let t0 = Instant::now();
    let deadline = t0 + dur;
    let mut tasks = Vec::new();
    for token in tokens.iter().take(16) {
        let token = token.to_string();
        let client = env.client.clone();
        let url = env.url.clone();
        tasks.push(tokio::spawn(async move {
            let mut h = hist();
            let mut n = 0u64;
            while Instant::now() < deadline {
                let t = Instant::now();
                let r = client
                    .post(format!("{url}/v1/holds"))
                    .bearer_auth(&token)
                    .header("content-type", "application/json")
                    .body(r#"{"feature":"calls","amount":2}"#)
                    .send()
                    .await
                    .map_err(|e| e.to_string())?;
                let status = r.status();
                let v: Value = r.json().await.map_err(|e| e.to_string())?;
                if status != reqwest::StatusCode::CREATED {
                    return Err(format!("POST /v1/holds: {status} {v}"));
                }
                let id = v["hold"]["id"].as_str().ok_or("hold without id")?.to_string();
                let r = client
                    .post(format!("{url}/v1/holds/{id}/commit"))
                    .bearer_auth(&token)
                    .header("content-type", "application/json")
                    .body(r#"{"amount":1}"#)
                    .send()
                    .await
                    .map_err(|e| e.to_string())?;
                if !r.status().is_success() {
                    return Err(format!("commit: {}", r.status()));
                }
                let _ = r.bytes().await;
                let _ = h.record(t.elapsed().as_nanos().max(1) as u64);
                n += 1;
            }
            Ok::<_, String>((n, h))
        }));
    }
    let (n, h) = join_counts(tasks).await?;
    Ok((n as f64 / t0.elapsed().as_secs_f64(), h))
}

/// Entitlements tokens signed per second on one core by the server's own signer (keys made in
/// `dir`), with claims the size of a plan with a few features.
fn sign_rate(dir: &Path, dur: Duration) -> Res<(f64, Histogram<u64>)> {
    let signer = tally_server::signing::Signer::load_or_create(dir)?;
    let features: serde_json::Map<String, Value> = ["ai_chat", "notes", "calls", "export"]
        .iter()
        .map(|f| (f.to_string(), json!({"type": "metered", "limit": 1000, "period": "month", "enforcement": "hard"})))
        .collect();
    let now = chrono::Utc::now().timestamp();
    let claims = json!({"sub": "bench-user", "uid": Uuid::now_v7(), "plan": "pro", "status": "active", "access_reason": "subscription",
        "features": features, "ver": 7, "iat": now, "exp": now + 3600});
    let mut h = hist();
    let t0 = Instant::now();
    while t0.elapsed() < dur {
        let t = Instant::now();
        std::hint::black_box(signer.sign(&claims)?);
        let _ = h.record(t.elapsed().as_nanos().max(1) as u64);
    }
    Ok((h.len() as f64 / t0.elapsed().as_secs_f64(), h))
}

/// `conns` loops sending requests for `dur`; returns requests/s and the latency histogram.
async fn hammer(env: &Env, conns: usize, dur: Duration, make: MakeReq) -> Res<(f64, Histogram<u64>)> {
    let t0 = Instant::now();
    let deadline = t0 + dur;
    let mut tasks = Vec::new();
    for i in 0..conns {
        let client = env.client.clone();
        let url = env.url.clone();
        let make = make.clone();
        tasks.push(tokio::spawn(async move {
            let mut h = hist();
            let mut n = 0u64;
            while Instant::now() < deadline {
                let t = Instant::now();
                let r = make(&client, &url, i).send().await.map_err(|e| e.to_string())?;
                let status = r.status();
                let body = r.bytes().await.map_err(|e| e.to_string())?;
                let _ = h.record(t.elapsed().as_nanos().max(1) as u64);
                if !status.is_success() {
                    return Err(format!("{status}: {}", String::from_utf8_lossy(&body[..body.len().min(300)])));
                }
                n += 1;
            }
            Ok::<_, String>((n, h))
        }));
    }
    let (n, h) = join_counts(tasks).await?;
    Ok((n as f64 / t0.elapsed().as_secs_f64(), h))
}

/// `n` events spread over `users` with `INSERT … SELECT generate_series` (UUID v7-shaped ids in
/// the past, each user's ids in time order), on two connections at once.
async fn fixture(env: &Env, users: &[Uuid], n: i64) -> Res<()> {
    let base_ms = chrono::Utc::now().timestamp_millis() - 30 * 86_400_000 - n;
    let halves: Vec<Vec<Uuid>> = users.chunks(users.len().div_ceil(2)).map(<[Uuid]>::to_vec).collect();
    let parts = halves.len() as i64;
    let mut tasks = Vec::new();
    for (k, us) in halves.into_iter().enumerate() {
        let url = env.cluster_url.clone();
        let rows = n / parts + if (k as i64) < n % parts { 1 } else { 0 };
        let per_user = (rows / us.len() as i64).max(1) + 1;
        let base = base_ms + k as i64 * (n / parts + 1);
        tasks.push(tokio::spawn(async move {
            let pg = pg_connect(&url).await?;
            pg.batch_execute("SET maintenance_work_mem = '256MB'; SET work_mem = '64MB'").await.map_err(|e| e.to_string())?;
            pg.execute(
                "INSERT INTO events (user_id, id, feature, amount, occurred_at, effective_at, clamped, received_at, device_id, device_seq, cost_micros, source, credits) \
                 SELECT ($1::uuid[])[1 + (g / $2::int8)::int], \
                        (lpad(to_hex($3::int8 + g), 12, '0') || '7' || substr(md5(g::text), 1, 19))::uuid, \
                        'notes', 1, x.t, x.t, false, x.t, 'fixture', g, 0, 'sync', 0 \
                 FROM generate_series(0::int8, $4::int8 - 1) g, LATERAL (SELECT to_timestamp(($3::int8 + g) / 1000.0) AS t) x",
                &[&us, &per_user, &base, &rows],
            )
            .await
            .map_err(|e| e.to_string())?;
            Ok::<_, String>(())
        }));
    }
    for t in tasks {
        t.await.map_err(|e| e.to_string())??;
    }
    Ok(())
}
