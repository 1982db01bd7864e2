//! Tests with the real `tally-server` binary: two replicas on one database (exactly-once under
//! shuffled, duplicated, re-batched concurrent syncs, driven by proptest), `kill -9` mid-sync,
//! concurrent migrations, a newer database refused, and the embedded-Postgres default.

mod common;

use common::*;
use proptest::prelude::*;
use serde_json::{Value, json};
use std::collections::{BTreeMap, BTreeSet};
use std::process::{Command, Stdio};
use std::time::Duration;
use uuid::Uuid;

const BIN: &str = env!("CARGO_BIN_EXE_tally-server");

async fn post_sync(http: &reqwest::Client, base: &str, token: &str, device: &str, events: &[Value]) -> Result<Value, String> {
    let resp = http
        .post(format!("{base}/v1/sync"))
        .bearer_auth(token)
        .json(&json!({"protocol": 1, "device_id": device, "events": events}))
        .send()
        .await
        .map_err(|e| e.to_string())?;
    if !resp.status().is_success() {
        return Err(format!("status {}", resp.status()));
    }
    resp.json::<Value>().await.map_err(|e| e.to_string())
}

fn total(resp: &Value, feature: &str, period: &str) -> u64 {
    resp["totals"]
        .as_array()
        .unwrap()
        .iter()
        .filter(|t| t["feature"] == feature && t["period"] == period)
        .filter_map(|t| t["used"].as_u64())
        .max()
        .unwrap_or(0)
}

/// One proptest case: events spread over devices, each device sending its events shuffled,
/// with duplicates, in random batches, through alternating replicas, all devices concurrently.
#[derive(Debug, Clone)]
struct Plan {
    events: Vec<(u8, u64)>,
    devices: Vec<Vec<(usize, bool)>>,
    batch: usize,
}

fn plan() -> impl Strategy<Value = Plan> {
    (prop::collection::vec((0u8..2, 1u64..5), 5..40), 1usize..8).prop_flat_map(|(events, batch)| {
        let n = events.len();
        // Each event is sent by 1..3 devices (its owner plus re-sends), in shuffled orders.
        let per_device = prop::collection::vec((0..n, any::<bool>()), n..n * 2).prop_shuffle();
        (Just(events), prop::collection::vec(per_device, 3), Just(batch)).prop_map(|(events, devices, batch)| Plan {
            events,
            devices,
            batch,
        })
    })
}

fn cluster_or_skip() -> bool {
    cluster().is_some()
}

#[test]
fn two_replicas_exactly_once_proptest() {
    if !cluster_or_skip() {
        return;
    }
    let rt = tokio::runtime::Runtime::new().unwrap();
    let url = rt.block_on(fresh_db()).unwrap();
    let dir = tempfile::tempdir().unwrap();
    let a = Server::start(Some(&url), dir.path());
    let b = Server::start(Some(&url), dir.path());
    let bases = [a.base.clone(), b.base.clone()];
    let http = reqwest::Client::new();
    let now = chrono::Utc::now();
    let mut runner = proptest::test_runner::TestRunner::new(ProptestConfig { cases: 6, ..ProptestConfig::default() });
    runner
        .run(&plan(), |p| {
            let sub = format!("prop-{}", Uuid::new_v4().simple());
            let token = token(&sub);
            let ids: Vec<Uuid> = p.events.iter().map(|_| Uuid::now_v7()).collect();
            let wire: Vec<Value> = p
                .events
                .iter()
                .zip(&ids)
                .map(|((f, amt), id)| json!({"id": id, "feature": if *f == 0 { "ai_chat" } else { "notes" }, "amount": amt, "occurred_at": now}))
                .collect();
            // Every event is sent at least once (by device 0, at the end, if nobody else did).
            let mut expected: BTreeMap<&str, u64> = BTreeMap::new();
            for (f, amt) in &p.events {
                *expected.entry(if *f == 0 { "ai_chat" } else { "notes" }).or_default() += amt;
            }
            rt.block_on(async {
                let mut tasks = Vec::new();
                for (d, sends) in p.devices.iter().enumerate() {
                    let mut list: Vec<Value> = Vec::new();
                    for (i, dup) in sends {
                        list.push(wire[*i].clone());
                        if *dup {
                            list.push(wire[*i].clone());
                        }
                    }
                    if d == 0 {
                        list.extend(wire.iter().cloned());
                    }
                    let (http, token, bases, batch) = (http.clone(), token.clone(), bases.clone(), p.batch);
                    tasks.push(tokio::spawn(async move {
                        for (k, chunk) in list.chunks(batch).enumerate() {
                            let r = post_sync(&http, &bases[(k + d) % 2], &token, &format!("dev{d}"), chunk).await.expect("sync");
                            let acked: BTreeSet<String> =
                                r["accepted"].as_array().unwrap().iter().chain(r["duplicates"].as_array().unwrap()).map(|v| v.as_str().unwrap().to_string()).collect();
                            for e in chunk {
                                assert!(acked.contains(e["id"].as_str().unwrap()), "every valid event is acked");
                            }
                            assert!(r["rejected"].as_array().unwrap().is_empty(), "{r}");
                        }
                    }));
                }
                for t in tasks {
                    t.await.expect("device task");
                }
                let r = post_sync(&http, &bases[0], &token, "check", &[]).await.unwrap();
                assert_eq!(total(&r, "ai_chat", "month"), expected.get("ai_chat").copied().unwrap_or(0), "{r}");
                assert_eq!(total(&r, "notes", "lifetime"), expected.get("notes").copied().unwrap_or(0));
                let r2 = post_sync(&http, &bases[1], &token, "check", &[]).await.unwrap();
                assert_eq!(r["totals"], r2["totals"], "both replicas agree");
            });
            Ok(())
        })
        .unwrap();
    // Counters equal the ledger for every user.
    let (client, conn) = rt.block_on(tokio_postgres::connect(&url, tokio_postgres::NoTls)).unwrap();
    rt.spawn(conn);
    let bad: i64 = rt
        .block_on(client.query_one(
            "SELECT count(*) FROM (SELECT user_id, feature, sum(amount) s FROM events GROUP BY 1, 2) e \
             LEFT JOIN counters c ON c.user_id = e.user_id AND c.feature = e.feature AND c.period = 'lifetime' \
             WHERE e.feature = 'notes' AND c.used IS DISTINCT FROM e.s",
            &[],
        ))
        .unwrap()
        .get(0);
    assert_eq!(bad, 0);
}

#[test]
fn kill9_mid_sync_loses_nothing_acknowledged() {
    if !cluster_or_skip() {
        return;
    }
    let rt = tokio::runtime::Runtime::new().unwrap();
    let url = rt.block_on(fresh_db()).unwrap();
    let dir = tempfile::tempdir().unwrap();
    let mut server = Server::start(Some(&url), dir.path());
    let http = reqwest::Client::new();
    let token = token("killer");
    let now = chrono::Utc::now();
    let batches: Vec<Vec<Value>> = (0..12)
        .map(|_| (0..100).map(|i| json!({"id": Uuid::now_v7(), "feature": "notes", "amount": 1 + i % 3, "occurred_at": now})).collect())
        .collect();
    let expected: u64 = batches.iter().flatten().map(|e| e["amount"].as_u64().unwrap()).sum();
    let mut acked: BTreeSet<String> = BTreeSet::new();
    // A kill counts only when it lands while a sync is in flight (its request fails); the
    // delay adapts until five kills have landed so.
    let (mut landed, mut attempts, mut delay_ms) = (0, 0, 20u64);
    for (i, batch) in batches.iter().enumerate() {
        let r = if i % 2 == 1 {
            loop {
                attempts += 1;
                assert!(attempts <= 40, "no kill landed mid-sync in {attempts} attempts");
                let handle = rt.spawn({
                    let (http, token, base, batch) = (http.clone(), token.clone(), server.base.clone(), batch.clone());
                    async move {
                        let body = json!({"protocol": 1, "device_id": "dev", "events": batch});
                        match http.post(format!("{base}/v1/sync")).bearer_auth(&token).json(&body).send().await {
                            Ok(resp) if resp.status().is_success() => resp.json::<Value>().await.map_err(|e| (false, e.to_string())),
                            Ok(resp) => Err((false, format!("status {}", resp.status()))),
                            // Connected, then cut: the server had the request when it died.
                            Err(e) => Err((!e.is_connect(), e.to_string())),
                        }
                    }
                });
                std::thread::sleep(Duration::from_millis(delay_ms));
                server.kill9();
                let r = rt.block_on(handle).unwrap();
                server = Server::start(Some(&url), dir.path());
                match &r {
                    Err((true, _)) => {
                        landed += 1;
                        break r.map_err(|(_, e)| e);
                    }
                    Err((false, e)) if e.contains("status") => panic!("a sync failed without a kill: {e}"),
                    // Not connected yet: kill later next time.
                    Err((false, _)) => {
                        delay_ms += 5;
                        continue;
                    }
                    Ok(_) => {}
                }
                // The sync finished before the kill: kill sooner next time, and re-send.
                delay_ms = (delay_ms / 2).max(1);
                if let Ok(r) = &r {
                    for id in r["accepted"].as_array().unwrap().iter().chain(r["duplicates"].as_array().unwrap()) {
                        acked.insert(id.as_str().unwrap().to_string());
                    }
                }
            }
        } else {
            rt.block_on(post_sync(&http, &server.base, &token, "dev", batch))
        };
        if let Ok(r) = r {
            for id in r["accepted"].as_array().unwrap().iter().chain(r["duplicates"].as_array().unwrap()) {
                acked.insert(id.as_str().unwrap().to_string());
            }
        }
    }
    assert!(landed >= 5, "kills that landed mid-sync: {landed}");
    let (client, conn) = rt.block_on(tokio_postgres::connect(&url, tokio_postgres::NoTls)).unwrap();
    rt.spawn(conn);
    let acked_ids: Vec<Uuid> = acked.iter().map(|s| Uuid::parse_str(s).unwrap()).collect();
    let present: i64 = rt.block_on(client.query_one("SELECT count(*) FROM events WHERE id = ANY($1)", &[&acked_ids])).unwrap().get(0);
    assert_eq!(present as usize, acked_ids.len(), "every acknowledged event is stored");
    // Re-sending everything converges to the clean total.
    let mut last = Value::Null;
    for batch in &batches {
        last = rt.block_on(post_sync(&http, &server.base, &token, "dev", batch)).unwrap();
        assert!(last["rejected"].as_array().unwrap().is_empty());
    }
    assert_eq!(total(&last, "notes", "lifetime"), expected);
}

#[test]
fn concurrent_migrations_apply_once_and_newer_db_is_refused() {
    if !cluster_or_skip() {
        return;
    }
    let rt = tokio::runtime::Runtime::new().unwrap();
    let url = rt.block_on(fresh_db()).unwrap();
    let dir = tempfile::tempdir().unwrap();
    let spawn = || {
        Command::new(BIN)
            .arg("migrate")
            .env("TALLY_DATABASE_URL", &url)
            .env("TALLY_DATA_DIR", dir.path())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .unwrap()
    };
    let (p1, p2, p3) = (spawn(), spawn(), spawn());
    for p in [p1, p2, p3] {
        let out = p.wait_with_output().unwrap();
        assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    }
    let (client, conn) = rt.block_on(tokio_postgres::connect(&url, tokio_postgres::NoTls)).unwrap();
    rt.spawn(conn);
    // Each migration once (versions may have gaps: compare the count with the distinct ones).
    let (n, distinct, top): (i64, i64, Option<i32>) = rt
        .block_on(client.query_one("SELECT count(*), count(DISTINCT version), max(version) FROM refinery_schema_history", &[]))
        .map(|r| (r.get(0), r.get(1), r.get(2)))
        .unwrap();
    assert_eq!(n, distinct, "a migration was applied twice");
    assert_eq!(top.map(i64::from), Some(tally_server::db::latest_version()));
    rt.block_on(
        client
            .execute("INSERT INTO refinery_schema_history (version, name, applied_on, checksum) VALUES (9999, 'future', 'now', '0')", &[]),
    )
    .unwrap();
    let out = spawn().wait_with_output().unwrap();
    assert!(!out.status.success());
    assert!(
        String::from_utf8_lossy(&out.stderr).contains("newer than this tally-server supports"),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let err = rt.block_on(tally_server::AppState::new(test_config(&url, dir.path()))).err().expect("refused");
    assert!(err.to_string().contains("newer"));
}

#[test]
fn embedded_default_starts_its_own_postgres_and_stops_it() {
    if !cluster_or_skip() {
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    // Reachable by the postgres user (as root the cluster runs as postgres).
    std::fs::set_permissions(dir.path(), std::os::unix::fs::PermissionsExt::from_mode(0o755)).unwrap();
    let data = dir.path().join("tally-data");
    let mut server = Server::start(None, &data);
    let rt = tokio::runtime::Runtime::new().unwrap();
    let http = reqwest::Client::new();
    let ready = rt.block_on(http.get(format!("{}/readyz", server.base)).send()).unwrap();
    assert!(ready.status().is_success());
    let r = rt
        .block_on(post_sync(
            &http,
            &server.base,
            &token("emb"),
            "d",
            &[json!({"id": Uuid::now_v7(), "feature": "notes", "amount": 2, "occurred_at": chrono::Utc::now()})],
        ))
        .unwrap();
    assert_eq!(total(&r, "notes", "lifetime"), 2);
    assert!(std::fs::read_dir(data.join("keys")).unwrap().count() >= 1, "signing key generated on first start");
    let pidfile = data.join("postgres").join("postmaster.pid");
    assert!(pidfile.exists(), "cluster under DATA_DIR/postgres");
    let db_url = std::fs::read_to_string(data.join("embedded-database-url")).unwrap();
    nix::sys::signal::kill(nix::unistd::Pid::from_raw(server.child.id() as i32), nix::sys::signal::Signal::SIGTERM).unwrap();
    let status = server.child.wait().unwrap();
    assert!(status.success(), "graceful shutdown");
    assert!(!pidfile.exists(), "embedded cluster stopped");
    assert!(rt.block_on(tokio_postgres::connect(db_url.trim(), tokio_postgres::NoTls)).is_err());
}

#[test]
fn crashed_embedded_serve_restarts_with_one_command_and_a_second_serve_says_already_running() {
    if !cluster_or_skip() {
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    std::fs::set_permissions(dir.path(), std::os::unix::fs::PermissionsExt::from_mode(0o755)).unwrap();
    let data = dir.path().join("tally-data");
    let rt = tokio::runtime::Runtime::new().unwrap();
    let http = reqwest::Client::new();
    let note = || json!({"id": Uuid::now_v7(), "feature": "notes", "amount": 1, "occurred_at": chrono::Utc::now()});
    let mut server = Server::start(None, &data);
    rt.block_on(post_sync(&http, &server.base, &token("crash"), "d", &[note()])).unwrap();

    // A second serve on the same data directory exits at once and says why.
    let started = std::time::Instant::now();
    let out = Server::command(None, &data, &[]).stdout(Stdio::null()).stderr(Stdio::piped()).output().unwrap();
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success());
    assert!(err.contains(&format!("already running on the data directory {} (pid {})", data.display(), server.child.id())), "{err}");
    assert!(started.elapsed() < Duration::from_secs(5), "refused at once");

    // kill -9 of serve leaves its PostgreSQL running; the next serve recovers it.
    let pidfile = data.join("postgres").join("postmaster.pid");
    let pg_pid: i32 = std::fs::read_to_string(&pidfile).unwrap().lines().next().unwrap().trim().parse().unwrap();
    server.kill9();
    assert!(nix::sys::signal::kill(nix::unistd::Pid::from_raw(pg_pid), None).is_ok(), "the crashed serve's Postgres is still up");
    let log = dir.path().join("serve.log");
    let mut cmd = Server::command(None, &data, &[]);
    cmd.stderr(std::fs::File::create(&log).unwrap());
    let mut server = Server::spawn(cmd);
    let text = std::fs::read_to_string(&log).unwrap();
    assert!(text.contains("left running by a previous tally-server"), "{text}");
    assert!(text.contains("WARN") && !text.contains('\u{1b}'), "plain logs when stderr is not a terminal: {text:?}");
    let r = rt.block_on(post_sync(&http, &server.base, &token("crash"), "d", &[note()])).unwrap();
    assert_eq!(total(&r, "notes", "lifetime"), 2, "the data survived");

    // A postmaster.pid whose process is gone (serve and Postgres both killed) is recovered too.
    let pg_pid: i32 = std::fs::read_to_string(&pidfile).unwrap().lines().next().unwrap().trim().parse().unwrap();
    server.kill9();
    let _ = nix::sys::signal::kill(nix::unistd::Pid::from_raw(pg_pid), nix::sys::signal::Signal::SIGKILL);
    let deadline = std::time::Instant::now() + Duration::from_secs(10);
    while nix::sys::signal::kill(nix::unistd::Pid::from_raw(pg_pid), None).is_ok() && std::time::Instant::now() < deadline {
        std::thread::sleep(Duration::from_millis(20));
    }
    assert!(pidfile.exists(), "a stale postmaster.pid is left behind");
    let mut server = Server::start(None, &data);
    let r = rt.block_on(post_sync(&http, &server.base, &token("crash"), "d", &[note()])).unwrap();
    assert_eq!(total(&r, "notes", "lifetime"), 3);
    assert!(server.terminate().success(), "graceful shutdown");
    assert!(!pidfile.exists(), "embedded cluster stopped");
}

#[test]
fn one_shot_commands_print_their_answer_without_progress_logs_unless_verbose() {
    if !cluster_or_skip() {
        return;
    }
    let rt = tokio::runtime::Runtime::new().unwrap();
    let url = rt.block_on(fresh_db()).unwrap();
    let dir = tempfile::tempdir().unwrap();
    let run = |verbose: bool| {
        let mut c = Command::new(BIN);
        c.args(["api-key", "create", "--name", "ops", "--scopes", "admin"]);
        if verbose {
            c.arg("-v");
        }
        let out = c.env("TALLY_DATABASE_URL", &url).env("TALLY_DATA_DIR", dir.path()).env_remove("TALLY_LOG").output().unwrap();
        assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
        (String::from_utf8_lossy(&out.stdout).into_owned(), String::from_utf8_lossy(&out.stderr).into_owned())
    };
    let (key, logs) = run(false);
    assert!(key.trim().len() > 20 && !key.contains("INFO"), "stdout is the key alone: {key:?}");
    assert!(!logs.contains("INFO"), "no progress logs by default: {logs:?}");
    let (_, logs) = run(true);
    assert!(logs.contains("INFO"), "-v logs progress: {logs:?}");
}
