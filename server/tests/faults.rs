//! Faults and load against the real `tally-server` binary on loopback: a stalled Postgres
//! (SIGSTOP) answers 503 within the timeout and recovers on SIGCONT; a Postgres restarted
//! during ingest costs no 500 and loses nothing acknowledged; one user's row lock or burst does
//! not slow another user; 1,000 idle or slow sockets do not lock a new client out.
//!
//! Each test prints its figures on lines starting with `FIGURE` (`cargo test -p tally-server
//! --test faults -- --nocapture | grep FIGURE`).

mod common;

use common::*;
use serde_json::{Value, json};
use std::collections::BTreeSet;
use std::io::{Read, Write};
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::time::{Duration, Instant};
use tally_server::pg_cluster::{Cluster, ClusterOptions};
use uuid::Uuid;

/// One fault test at a time: each measures latencies, which a neighbour's load would blur.
static SERIAL: std::sync::Mutex<()> = std::sync::Mutex::new(());

fn serial() -> std::sync::MutexGuard<'static, ()> {
    SERIAL.lock().unwrap_or_else(|e| e.into_inner())
}

/// Short bounds, so every fault shows within seconds.
const BOUNDS: &[(&str, &str)] = &[
    ("TALLY_DB_POOL_TIMEOUT_SECS", "2"),
    ("TALLY_DB_CONNECT_TIMEOUT_SECS", "2"),
    ("TALLY_DB_STATEMENT_TIMEOUT_SECS", "2"),
    ("TALLY_REQUEST_TIMEOUT_SECS", "6"),
];

/// A cluster of this test's own (so stopping it disturbs no other test), with fsync on.
fn own_cluster(dir: &std::path::Path) -> Option<Cluster> {
    cluster()?;
    Some(Cluster::start(&dir.join("pg"), ClusterOptions { fast_unsafe: false, ephemeral: true, port: None }).expect("own cluster"))
}

fn signal_all(c: &Cluster, sig: nix::sys::signal::Signal) {
    for pid in c.processes() {
        let _ = nix::sys::signal::kill(nix::unistd::Pid::from_raw(pid), sig);
    }
}

/// SIGCONTs the cluster when dropped, so a failing assertion never leaves Postgres stopped.
struct Resume<'a>(&'a Cluster);

impl Drop for Resume<'_> {
    fn drop(&mut self) {
        signal_all(self.0, nix::sys::signal::Signal::SIGCONT);
    }
}

fn client() -> reqwest::Client {
    reqwest::Client::builder().timeout(Duration::from_secs(30)).build().unwrap()
}

fn events(n: usize) -> Vec<Value> {
    let now = chrono::Utc::now();
    (0..n).map(|i| json!({"id": Uuid::now_v7(), "feature": "notes", "amount": 1 + i % 3, "occurred_at": now})).collect()
}

/// Status, `Retry-After` and JSON body of one request.
async fn send(req: reqwest::RequestBuilder) -> Result<(u16, Option<String>, Value), String> {
    let resp = req.send().await.map_err(|e| e.to_string())?;
    let status = resp.status().as_u16();
    let retry = resp.headers().get("retry-after").and_then(|v| v.to_str().ok()).map(str::to_string);
    let body = resp.json::<Value>().await.unwrap_or(Value::Null);
    Ok((status, retry, body))
}

fn assert_unavailable(what: &str, r: &(u16, Option<String>, Value)) {
    assert_eq!(r.0, 503, "{what}: {r:?}");
    assert_eq!(r.2["error"]["code"], "unavailable", "{what}: {r:?}");
    assert!(r.2["error"]["message"].as_str().is_some_and(|m| !m.is_empty()), "{what}: {r:?}");
    assert!(r.1.as_deref().and_then(|s| s.parse::<u64>().ok()).is_some_and(|s| s >= 1), "{what}: Retry-After: {r:?}");
}

#[test]
fn stalled_postgres_answers_503_within_the_timeout_and_recovers() {
    let _serial = serial();
    let dir = tempfile::tempdir().unwrap();
    let Some(pg) = own_cluster(dir.path()) else { return };
    let rt = tokio::runtime::Runtime::new().unwrap();
    let url = rt.block_on(pg.create_database("tally")).unwrap();
    let server = Server::start_with(Some(&url), &dir.path().join("server"), BOUNDS);
    let http = client();
    let t = token("stalled");
    let me = || http.get(format!("{}/v1/me", server.base)).bearer_auth(&t);
    assert_eq!(rt.block_on(send(me())).unwrap().0, 200);

    signal_all(&pg, nix::sys::signal::Signal::SIGSTOP);
    let resume = Resume(&pg);
    let started = Instant::now();
    let r = rt.block_on(send(me())).unwrap();
    let to_503 = started.elapsed();
    assert_unavailable("GET /v1/me with Postgres stopped", &r);
    let started = Instant::now();
    let ready = rt.block_on(send(http.get(format!("{}/readyz", server.base)))).unwrap();
    let ready_503 = started.elapsed();
    assert_unavailable("GET /readyz with Postgres stopped", &ready);
    let sync = rt
        .block_on(send(
            http.post(format!("{}/v1/sync", server.base))
                .bearer_auth(&t)
                .json(&json!({"protocol": 1, "device_id": "d", "events": events(3)})),
        ))
        .unwrap();
    assert_unavailable("POST /v1/sync with Postgres stopped", &sync);
    let health = rt.block_on(send(http.get(format!("{}/healthz", server.base)))).unwrap();
    assert_eq!(health.0, 200, "liveness does not need the database");
    // Bounded by the pool wait timeout (2 s), with room for a loaded machine.
    assert!(to_503 < Duration::from_secs(5) && ready_503 < Duration::from_secs(5), "{to_503:?} {ready_503:?}");

    drop(resume);
    let started = Instant::now();
    loop {
        let r = rt.block_on(send(me())).unwrap();
        if r.0 == 200 {
            break;
        }
        assert_unavailable("while Postgres resumes", &r);
        assert!(started.elapsed() < Duration::from_secs(15), "no recovery after SIGCONT");
        std::thread::sleep(Duration::from_millis(100));
    }
    let recovered = started.elapsed();
    assert_eq!(rt.block_on(send(http.get(format!("{}/readyz", server.base)))).unwrap().0, 200);
    eprintln!(
        "FIGURE stalled Postgres (SIGSTOP): GET /v1/me answered 503 in {} ms, /readyz 503 in {} ms (pool timeout 2 s); \
         200 again {} ms after SIGCONT",
        to_503.as_millis(),
        ready_503.as_millis(),
        recovered.as_millis()
    );
}

#[test]
fn postgres_restarted_during_ingest_answers_503_never_500_and_loses_nothing_acknowledged() {
    let _serial = serial();
    let dir = tempfile::tempdir().unwrap();
    let Some(pg) = own_cluster(dir.path()) else { return };
    let rt = tokio::runtime::Runtime::new().unwrap();
    let url = rt.block_on(pg.create_database("tally")).unwrap();
    let server = Server::start_with(Some(&url), &dir.path().join("server"), BOUNDS);
    let http = client();
    let acked = Arc::new(std::sync::Mutex::new(BTreeSet::<String>::new()));
    let (sent_ok, unavailable, progress) = (Arc::new(AtomicUsize::new(0)), Arc::new(AtomicUsize::new(0)), Arc::new(AtomicUsize::new(0)));
    let bad = Arc::new(std::sync::Mutex::new(Vec::<String>::new()));
    let stop = Arc::new(AtomicBool::new(false));
    // Four clients, each its own user, 20 batches of 100 events, every batch retried until acked.
    let mut expected = Vec::new();
    let mut tasks = Vec::new();
    for c in 0..4 {
        let batches: Vec<Vec<Value>> = (0..20).map(|_| events(100)).collect();
        expected.push(batches.iter().flatten().map(|e| e["amount"].as_u64().unwrap()).sum::<u64>());
        let (http, base, acked, bad, ok, unavail, progress, stop) = (
            http.clone(),
            server.base.clone(),
            acked.clone(),
            bad.clone(),
            sent_ok.clone(),
            unavailable.clone(),
            progress.clone(),
            stop.clone(),
        );
        tasks.push(rt.spawn(async move {
            let t = token(&format!("ingest-{c}"));
            for batch in batches {
                loop {
                    if stop.load(Ordering::SeqCst) {
                        return;
                    }
                    let body = json!({"protocol": 1, "device_id": format!("dev{c}"), "events": batch});
                    match send(http.post(format!("{base}/v1/sync")).bearer_auth(&t).json(&body)).await {
                        Ok((200, _, v)) => {
                            let mut a = acked.lock().unwrap();
                            for id in v["accepted"].as_array().unwrap().iter().chain(v["duplicates"].as_array().unwrap()) {
                                a.insert(id.as_str().unwrap().to_string());
                            }
                            ok.fetch_add(1, Ordering::SeqCst);
                            progress.fetch_add(1, Ordering::SeqCst);
                            break;
                        }
                        Ok(r @ (503, _, _)) => {
                            assert_unavailable("sync during the restart", &r);
                            unavail.fetch_add(1, Ordering::SeqCst);
                            tokio::time::sleep(Duration::from_millis(100)).await;
                        }
                        Ok((s, _, v)) => {
                            bad.lock().unwrap().push(format!("{s} {v}"));
                            tokio::time::sleep(Duration::from_millis(100)).await;
                        }
                        Err(e) => {
                            bad.lock().unwrap().push(format!("transport: {e}"));
                            tokio::time::sleep(Duration::from_millis(100)).await;
                        }
                    }
                }
            }
        }));
    }
    // Restart Postgres twice while the clients ingest: once like a crash, once fast.
    let mut restarts = 0;
    for (at, immediate) in [(10, true), (35, false)] {
        let deadline = Instant::now() + Duration::from_secs(60);
        while progress.load(Ordering::SeqCst) < at {
            assert!(Instant::now() < deadline, "ingest made no progress");
            std::thread::sleep(Duration::from_millis(10));
        }
        pg.restart(immediate).expect("restart Postgres");
        restarts += 1;
    }
    let deadline = Instant::now() + Duration::from_secs(90);
    while !tasks.iter().all(|t| t.is_finished()) {
        if Instant::now() > deadline {
            stop.store(true, Ordering::SeqCst);
        }
        std::thread::sleep(Duration::from_millis(20));
    }
    for t in tasks {
        rt.block_on(t).expect("client task");
    }
    assert!(!stop.load(Ordering::SeqCst), "the clients did not finish after the restarts");
    let bad = bad.lock().unwrap().clone();
    assert!(bad.is_empty(), "only 200 or 503 during restarts: {bad:?}");
    let unavailable = unavailable.load(Ordering::SeqCst);
    assert!(unavailable > 0, "the restarts landed while syncs were in flight");
    // Every acknowledged event is stored, and the totals are exact.
    let (client, conn) = rt.block_on(tokio_postgres::connect(&url, tokio_postgres::NoTls)).unwrap();
    rt.spawn(conn);
    let ids: Vec<Uuid> = acked.lock().unwrap().iter().map(|s| Uuid::parse_str(s).unwrap()).collect();
    let present: i64 = rt.block_on(client.query_one("SELECT count(*) FROM events WHERE id = ANY($1)", &[&ids])).unwrap().get(0);
    assert_eq!(present as usize, ids.len(), "every acknowledged event is stored");
    assert_eq!(ids.len(), 4 * 20 * 100);
    for (c, want) in expected.iter().enumerate() {
        let got: i64 = rt
            .block_on(client.query_one(
                "SELECT coalesce(sum(e.amount), 0)::bigint FROM events e JOIN users u USING (user_id) WHERE u.external_id = $1",
                &[&format!("ingest-{c}")],
            ))
            .unwrap()
            .get(0);
        assert_eq!(got as u64, *want);
    }
    eprintln!(
        "FIGURE Postgres restarted {restarts}x during a 4-client ingest of 8,000 events: {} syncs acknowledged, {unavailable} answered 503 \
         (retried), 0 answered 500, 0 acknowledged events lost",
        sent_ok.load(Ordering::SeqCst)
    );
}

/// Latencies of `GET /v1/me` of `token`, one after another, until `stop` is set.
async fn probe(http: reqwest::Client, base: String, token: String, stop: Arc<AtomicBool>) -> Vec<Duration> {
    let mut out = Vec::new();
    while !stop.load(Ordering::SeqCst) {
        let started = Instant::now();
        let r = send(http.get(format!("{base}/v1/me")).bearer_auth(&token)).await.expect("probe");
        assert_eq!(r.0, 200, "the other user's request must succeed: {r:?}");
        out.push(started.elapsed());
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    out
}

fn summary(mut v: Vec<Duration>) -> (usize, Duration, Duration) {
    v.sort();
    let p50 = v.get(v.len() / 2).copied().unwrap_or_default();
    (v.len(), p50, v.last().copied().unwrap_or_default())
}

#[test]
fn one_users_row_lock_and_burst_do_not_slow_another_users_requests() {
    let _serial = serial();
    let rt = tokio::runtime::Runtime::new().unwrap();
    let Some(url) = rt.block_on(fresh_db()) else { return };
    let dir = tempfile::tempdir().unwrap();
    let server = Server::start_with(Some(&url), dir.path(), BOUNDS);
    let http = client();
    let (hog, other) = (token("hog"), token("bystander"));
    for t in [&hog, &other] {
        assert_eq!(rt.block_on(send(http.get(format!("{}/v1/me", server.base)).bearer_auth(t))).unwrap().0, 200);
    }

    // 1. The hog's row is locked by someone else for 5 s; the hog sends 40 syncs at once.
    let (mut locker, conn) = rt.block_on(tokio_postgres::connect(&url, tokio_postgres::NoTls)).unwrap();
    rt.spawn(conn);
    let stop = Arc::new(AtomicBool::new(false));
    let lock_phase = rt.block_on(async {
        let tx = locker.transaction().await.unwrap();
        tx.execute("SELECT 1 FROM users WHERE external_id = 'hog' FOR UPDATE", &[]).await.unwrap();
        let probe = tokio::spawn(probe(http.clone(), server.base.clone(), other.clone(), stop.clone()));
        let syncs: Vec<_> = (0..40)
            .map(|_| {
                let body = json!({"protocol": 1, "device_id": "hog", "events": events(10)});
                tokio::spawn(send(http.post(format!("{}/v1/sync", server.base)).bearer_auth(&hog).json(&body)))
            })
            .collect();
        tokio::time::sleep(Duration::from_secs(5)).await;
        tx.rollback().await.unwrap();
        let mut statuses = Vec::new();
        for s in syncs {
            // An overflowed request may be answered 503 before its body was read: the server
            // then closes the connection, and a client still uploading may see the reset instead
            // of the answer (0 here). Either way the hog is refused and retries.
            match s.await.unwrap() {
                Ok(r) => {
                    if r.0 == 503 {
                        assert_unavailable("the hog's overflow", &r);
                    }
                    statuses.push(r.0);
                }
                Err(_) => statuses.push(0),
            }
        }
        stop.store(true, Ordering::SeqCst);
        (statuses, probe.await.unwrap())
    });
    let (statuses, lat) = lock_phase;
    assert!(statuses.iter().all(|s| [0, 200, 503].contains(s)), "the hog gets 200 or 503, never 429 or 500: {statuses:?}");
    assert!(statuses.contains(&503), "the hog's blocked syncs answered 503: {statuses:?}");
    let (n, p50, max) = summary(lat);
    assert!(n >= 10, "the other user kept being served ({n} requests)");
    assert!(max < Duration::from_secs(2), "another user's GET /v1/me took {max:?} during the lock (statement timeout 2 s)");
    eprintln!(
        "FIGURE row lock held 5 s by the hog, 40 concurrent hog syncs ({} x 503, {} x 200): another user's GET /v1/me p50 {} ms, max {} ms over {n} requests",
        statuses.iter().filter(|s| **s == 503).count(),
        statuses.iter().filter(|s| **s == 200).count(),
        p50.as_millis(),
        max.as_millis()
    );

    // 2. A burst: 60 concurrent syncs of 500 events from the hog.
    let stop = Arc::new(AtomicBool::new(false));
    let (statuses, lat, took) = rt.block_on(async {
        let probe = tokio::spawn(probe(http.clone(), server.base.clone(), other.clone(), stop.clone()));
        tokio::time::sleep(Duration::from_millis(100)).await;
        let started = Instant::now();
        let syncs: Vec<_> = (0..60)
            .map(|_| {
                let body = json!({"protocol": 1, "device_id": "hog", "events": events(500)});
                tokio::spawn(send(http.post(format!("{}/v1/sync", server.base)).bearer_auth(&hog).json(&body)))
            })
            .collect();
        let mut statuses = Vec::new();
        for s in syncs {
            // An overflowed request may be answered 503 before its body was read: the server
            // then closes the connection, and a client still uploading may see the reset instead
            // of the answer (0 here). Either way the hog is refused and retries.
            match s.await.unwrap() {
                Ok(r) => {
                    if r.0 == 503 {
                        assert_unavailable("the hog's overflow", &r);
                    }
                    statuses.push(r.0);
                }
                Err(_) => statuses.push(0),
            }
        }
        let took = started.elapsed();
        stop.store(true, Ordering::SeqCst);
        (statuses, probe.await.unwrap(), took)
    });
    assert!(statuses.iter().all(|s| [0, 200, 503].contains(s)), "the hog gets 200 or 503, never 429 or 500: {statuses:?}");
    assert!(statuses.contains(&200), "the hog is still served within its turns: {statuses:?}");
    let (n, p50, max) = summary(lat);
    assert!(max < Duration::from_secs(2), "another user's GET /v1/me took {max:?} during the burst (statement timeout 2 s)");
    eprintln!(
        "FIGURE burst of 60 concurrent 500-event hog syncs in {} ms ({} x 200, {} x 503): another user's GET /v1/me p50 {} ms, max {} ms over {n} requests",
        took.as_millis(),
        statuses.iter().filter(|s| **s == 200).count(),
        statuses.iter().filter(|s| **s == 503).count(),
        p50.as_millis(),
        max.as_millis()
    );
}

#[test]
fn a_thousand_idle_and_slow_sockets_do_not_lock_out_a_new_client() {
    let _serial = serial();
    let rt = tokio::runtime::Runtime::new().unwrap();
    let Some(url) = rt.block_on(fresh_db()) else { return };
    // Room for 1,000 sockets in this process too.
    use nix::sys::resource::{Resource, getrlimit, setrlimit};
    let (_, hard) = getrlimit(Resource::RLIMIT_NOFILE).unwrap();
    setrlimit(Resource::RLIMIT_NOFILE, hard, hard).unwrap();
    assert!(hard >= 1200, "the open-file limit ({hard}) is too low for this test");
    let dir = tempfile::tempdir().unwrap();
    let server = Server::start_with(Some(&url), dir.path(), &[("TALLY_HTTP_HEADER_TIMEOUT_SECS", "2")]);
    let addr = server.base.trim_start_matches("http://").to_string();
    let mut socks = Vec::new();
    for i in 0..1000 {
        let mut s = std::net::TcpStream::connect(&addr).expect("connect");
        match i % 3 {
            // Slowloris: a request line and half the headers, never finished.
            0 => s.write_all(b"GET /healthz HTTP/1.1\r\nHost: x\r\nX-Slow: ").unwrap(),
            // A finished request, then idle on the kept-alive connection.
            1 => {
                s.write_all(b"GET /healthz HTTP/1.1\r\nHost: x\r\n\r\n").unwrap();
                let mut buf = [0u8; 256];
                let n = s.read(&mut buf).unwrap();
                assert!(buf[..n].starts_with(b"HTTP/1.1 200"), "{}", String::from_utf8_lossy(&buf[..n]));
            }
            // Connected, silent.
            _ => {}
        }
        socks.push(s);
    }
    let opened = Instant::now();
    let started = Instant::now();
    let r = rt.block_on(send(client().get(format!("{}/healthz", server.base)))).expect("a new client is served");
    let latency = started.elapsed();
    assert_eq!(r.0, 200);
    assert!(latency < Duration::from_secs(1), "a new client waited {latency:?} behind 1,000 idle sockets");
    // Every idle or slow socket is closed by the server after the header timeout (2 s).
    for s in &socks {
        s.set_nonblocking(true).unwrap();
    }
    let mut open: Vec<&std::net::TcpStream> = socks.iter().collect();
    let deadline = Instant::now() + Duration::from_secs(8);
    while !open.is_empty() && Instant::now() < deadline {
        std::thread::sleep(Duration::from_millis(200));
        open.retain(|s| {
            let mut buf = [0u8; 512];
            let mut s: &std::net::TcpStream = s;
            loop {
                match s.read(&mut buf) {
                    Ok(0) => return false,
                    Ok(_) => continue,
                    Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => return true,
                    Err(_) => return false,
                }
            }
        });
    }
    let reaped = opened.elapsed();
    assert!(open.is_empty(), "{} of 1,000 idle sockets still open after {reaped:?}", open.len());
    eprintln!(
        "FIGURE 1,000 idle/slowloris sockets open: GET /healthz from a new client in {} ms; all 1,000 closed by the server within {} ms (header timeout 2 s)",
        latency.as_millis(),
        reaped.as_millis()
    );
}

#[test]
fn at_the_connection_cap_new_clients_wait_at_most_the_header_timeout() {
    let _serial = serial();
    let rt = tokio::runtime::Runtime::new().unwrap();
    let Some(url) = rt.block_on(fresh_db()) else { return };
    let dir = tempfile::tempdir().unwrap();
    let env = [("TALLY_HTTP_HEADER_TIMEOUT_SECS", "1"), ("TALLY_HTTP_MAX_CONNECTIONS", "20")];
    let server = Server::start_with(Some(&url), dir.path(), &env);
    let addr = server.base.trim_start_matches("http://").to_string();
    // 30 silent sockets: 20 take every slot, 10 wait in the listen backlog.
    let socks: Vec<_> = (0..30).map(|_| std::net::TcpStream::connect(&addr).expect("connect")).collect();
    let started = Instant::now();
    let r = rt.block_on(send(client().get(format!("{}/healthz", server.base)))).expect("served once slots free up");
    let waited = started.elapsed();
    assert_eq!(r.0, 200);
    assert!(waited < Duration::from_secs(4), "a new client waited {waited:?} (header timeout 1 s)");
    drop(socks);
    eprintln!(
        "FIGURE 30 silent sockets against a cap of 20 connections: a new client served after {} ms (header timeout 1 s)",
        waited.as_millis()
    );
}
