//! End-to-end: several device databases, real `tally-server` processes, a real Postgres.
//! Each scenario checks that the server counts every distinct event once and that every
//! device's `usage()` equals the server's total after it syncs.

use chrono::{Duration, Utc};
use rand::seq::SliceRandom;
use tally_core::{ConsumeItem, Error, EventStatus, Profile, Reason, SyncOptions, UsageMeta, User};
use tally_e2e::*;

struct Env {
    dir: tempfile::TempDir,
    db_url: String,
    server: Server,
    rt: tokio::runtime::Runtime,
}

fn env(name: &str, extra: &[(&str, &str)]) -> Option<Env> {
    let pg = shared_cluster()?;
    let rt = tokio::runtime::Builder::new_multi_thread().worker_threads(2).enable_all().build().expect("runtime");
    let db_url = rt.block_on(pg.create_database(name)).expect("create database");
    let dir = tempfile::Builder::new().prefix("tally-e2e-").tempdir_in("/tmp").expect("tempdir");
    let server = Server::start(&db_url, &dir.path().join("server"), extra);
    Some(Env { dir, db_url, server, rt })
}

impl Env {
    fn device(&self, name: &str) -> Device {
        self.device_at(name, Utc::now())
    }
    fn device_at(&self, name: &str, at: chrono::DateTime<Utc>) -> Device {
        device(&self.dir.path().join(format!("{name}.db")), name, &self.server.keys(), at)
    }
    fn sync(&self, d: &Device, user: &User) -> Result<tally_core::SyncReport, Error> {
        let sub = user.external_id.clone().expect("signed in");
        self.rt.block_on(d.tally.sync(&user.id, opts(&self.server.url, &sub)))
    }
    /// The server's total of `feature` in the current window, from `POST /v1/check`.
    fn server_used(&self, sub: &str, feature: &str) -> u64 {
        let (status, body) = raw_request(
            "POST",
            &format!("{}/v1/check", self.server.url),
            Some(&id_token(sub)),
            Some(&format!(r#"{{"feature":"{feature}","amount":1}}"#)),
        )
        .expect("check");
        assert_eq!(status, 200, "{body}");
        let v: serde_json::Value = serde_json::from_str(&body).expect("decision");
        v["used"].as_u64().expect("used")
    }
}

fn opts(url: &str, sub: &str) -> SyncOptions {
    let mut o = SyncOptions::new(url, id_token(sub));
    o.retry.initial_backoff = std::time::Duration::from_millis(50);
    o.retry.max_backoff = std::time::Duration::from_millis(500);
    o.retry.max_attempts = 20;
    o
}

fn sign_in(d: &Device, sub: &str) -> User {
    d.tally
        .sign_in(Profile { external_id: sub.into(), email: Some(format!("{sub}@example.com")), ..Profile::default() }, None)
        .expect("sign in")
}

fn consume_n(d: &Device, user: &User, feature: &str, n: usize) {
    for chunk in (0..n).collect::<Vec<_>>().chunks(1000) {
        let items: Vec<ConsumeItem> =
            chunk.iter().map(|_| ConsumeItem { feature: feature.into(), amount: 1, meta: UsageMeta::default() }).collect();
        let ds = d.tally.consume_many(&user.id, &items).expect("consume");
        assert!(ds.iter().all(|d| d.allowed), "{:?}", ds.iter().find(|d| !d.allowed));
    }
}

#[test]
fn three_offline_devices_sync_in_any_order_and_count_once() {
    let Some(e) = env("three_devices", &[]) else { return };
    // Offline: 1,000 uses yesterday and 1,500 today on each device (across a day boundary).
    let devices: Vec<Device> = ["phone", "tablet", "laptop"].iter().map(|n| e.device_at(n, Utc::now() - Duration::days(1))).collect();
    let users: Vec<User> = devices.iter().map(|d| sign_in(d, "alice")).collect();
    for (d, u) in devices.iter().zip(&users) {
        consume_n(d, u, "notes", 1000);
        d.clock.advance(Duration::days(1));
        consume_n(d, u, "notes", 1500);
        assert_eq!(d.tally.usage(&u.id, "notes").unwrap().used, 1500);
    }
    let mut order: Vec<usize> = vec![0, 1, 2, 0, 2];
    order.shuffle(&mut rand::rng());
    for i in order {
        e.sync(&devices[i], &users[i]).expect("sync");
    }
    for (d, u) in devices.iter().zip(&users) {
        e.sync(d, u).expect("final sync");
        assert_eq!(d.tally.pending_events(&u.id).unwrap(), 0);
        assert_eq!(d.tally.usage(&u.id, "notes").unwrap().used, 4500, "device usage equals the server's total");
    }
    assert_eq!(e.server_used("alice", "notes"), 4500);
}

#[test]
fn server_killed_mid_sync_loses_and_doubles_nothing() {
    let Some(mut e) = env("server_kill", &[]) else { return };
    let d = e.device("phone");
    let u = sign_in(&d, "bob");
    consume_n(&d, &u, "notes", 20_000);
    // A kill counts when it lands mid-sync: the sync fails, some batches were acknowledged
    // before it and events are still pending. The delay adapts until three kills landed so.
    let (mut landed, mut attempts, mut delay_ms, mut total) = (0, 0, 150u64, 20_000u64);
    while landed < 3 {
        attempts += 1;
        assert!(attempts <= 15, "no kill landed mid-sync in {attempts} attempts (landed {landed})");
        let before = d.tally.pending_events(&u.id).unwrap();
        assert!(before > 0, "events left to sync");
        let mut o = opts(&e.server.url, "bob");
        o.max_batch_events = 200;
        o.retry.max_attempts = 2;
        let sync = std::thread::scope(|s| {
            let h = s.spawn(|| e.rt.block_on(d.tally.sync(&u.id, o)));
            std::thread::sleep(std::time::Duration::from_millis(delay_ms));
            e.server.kill9();
            h.join().expect("sync thread")
        });
        e.server.restart();
        let pending = d.tally.pending_events(&u.id).unwrap();
        eprintln!("attempt {attempts}: sync {:?}, pending {before} -> {pending}", sync.as_ref().map(|r| r.events_acked));
        if sync.is_ok() || pending == 0 {
            // Finished before the kill: more work, and kill sooner.
            delay_ms = (delay_ms / 2).max(10);
            if pending == 0 {
                consume_n(&d, &u, "notes", 20_000);
                total += 20_000;
            }
        } else if pending == before {
            delay_ms = delay_ms * 3 / 2;
        } else {
            landed += 1;
            // Leave work for the next kill.
            delay_ms = (delay_ms * 2 / 3).max(20);
        }
    }
    e.sync(&d, &u).expect("final sync");
    assert_eq!(d.tally.pending_events(&u.id).unwrap(), 0);
    assert_eq!(e.server_used("bob", "notes"), total);
    assert_eq!(d.tally.usage(&u.id, "notes").unwrap().used, total);
}

#[test]
fn dropped_answers_are_retried_without_double_counting() {
    let Some(e) = env("cut_proxy", &[]) else { return };
    let proxy = CuttingProxy::start(&e.server.url, 3);
    let d = e.device("phone");
    let u = sign_in(&d, "carol");
    consume_n(&d, &u, "notes", 1000);
    let mut o = opts(&proxy.url, "carol");
    o.max_batch_events = 100;
    let report = e.rt.block_on(d.tally.sync(&u.id, o)).expect("sync through the cutting proxy");
    assert_eq!(proxy.cut.load(std::sync::atomic::Ordering::SeqCst), 3);
    assert!(report.duplicates > 0, "the re-sent batch was recognised as duplicates: {report:?}");
    assert_eq!(e.server_used("carol", "notes"), 1000);
    assert_eq!(d.tally.usage(&u.id, "notes").unwrap().used, 1000);
}

/// Child mode of `device_killed_mid_sync`: sync the database named in the environment.
#[test]
fn child_sync_process() {
    let (Ok(path), Ok(url), Ok(keys)) = (std::env::var("E2E_CHILD_DB"), std::env::var("E2E_CHILD_URL"), std::env::var("E2E_CHILD_KEYS"))
    else {
        return;
    };
    let d = device(std::path::Path::new(&path), "phone", &keys, Utc::now());
    let u = d.tally.users().unwrap().into_iter().next().expect("user");
    let rt = tokio::runtime::Runtime::new().unwrap();
    let mut o = opts(&url, "dave");
    o.max_batch_events = 100;
    let _ = rt.block_on(d.tally.sync(&u.id, o));
}

#[test]
fn device_killed_mid_sync_converges_after_reopening() {
    let Some(e) = env("device_kill", &[]) else { return };
    let path = e.dir.path().join("phone.db");
    let keys = e.server.keys();
    {
        let d = device(&path, "phone", &keys, Utc::now());
        let u = sign_in(&d, "dave");
        consume_n(&d, &u, "notes", 10_000);
    }
    // A kill counts when it lands mid-sync: after it, some events were acknowledged and some
    // are still pending. The delay adapts until three kills landed so.
    let pending_now = || {
        let d = device(&path, "phone", &keys, Utc::now());
        let u = d.tally.users().unwrap().remove(0);
        d.tally.pending_events(&u.id).unwrap()
    };
    let (mut landed, mut attempts, mut delay_ms, mut total) = (0, 0, 300u64, 10_000u64);
    while landed < 3 {
        attempts += 1;
        assert!(attempts <= 15, "no kill landed mid-sync in {attempts} attempts (landed {landed})");
        let before = pending_now();
        let mut child = std::process::Command::new(std::env::current_exe().unwrap())
            .args(["--exact", "child_sync_process", "--nocapture", "--test-threads=1"])
            .env("E2E_CHILD_DB", &path)
            .env("E2E_CHILD_URL", &e.server.url)
            .env("E2E_CHILD_KEYS", &keys)
            .spawn()
            .unwrap();
        std::thread::sleep(std::time::Duration::from_millis(delay_ms));
        let _ = nix::sys::signal::kill(nix::unistd::Pid::from_raw(child.id() as i32), nix::sys::signal::Signal::SIGKILL);
        let status = child.wait().unwrap();
        let after = pending_now();
        eprintln!("attempt {attempts}: {status}, pending {before} -> {after}");
        if status.success() || after == 0 {
            delay_ms = (delay_ms / 2).max(20);
            if after == 0 {
                let d = device(&path, "phone", &keys, Utc::now());
                let u = d.tally.users().unwrap().remove(0);
                consume_n(&d, &u, "notes", 10_000);
                total += 10_000;
            }
        } else if after == before {
            delay_ms = delay_ms * 3 / 2;
        } else {
            landed += 1;
        }
    }
    let d = device(&path, "phone", &keys, Utc::now());
    let u = d.tally.users().unwrap().remove(0);
    e.sync(&d, &u).expect("sync after reopening");
    assert_eq!(d.tally.pending_events(&u.id).unwrap(), 0);
    assert_eq!(e.server_used("dave", "notes"), total);
    assert_eq!(d.tally.usage(&u.id, "notes").unwrap().used, total);
}

#[test]
fn two_devices_overshoot_a_hard_limit_offline_then_both_deny() {
    let Some(e) = env("overshoot", &[]) else { return };
    let (a, b) = (e.device("a"), e.device("b"));
    let (ua, ub) = (sign_in(&a, "erin"), sign_in(&b, "erin"));
    for (d, u) in [(&a, &ua), (&b, &ub)] {
        for _ in 0..4 {
            assert!(d.tally.consume(&u.id, "ai_chat", 1, UsageMeta::default()).unwrap().allowed);
        }
    }
    e.sync(&a, &ua).unwrap();
    e.sync(&b, &ub).unwrap();
    e.sync(&a, &ua).unwrap();
    assert_eq!(e.server_used("erin", "ai_chat"), 8);
    for (d, u) in [(&a, &ua), (&b, &ub)] {
        let usage = d.tally.usage(&u.id, "ai_chat").unwrap();
        assert_eq!((usage.used, usage.remaining, usage.over_limit_by), (8, Some(0), 3));
        let c = d.tally.check(&u.id, "ai_chat", 1).unwrap();
        assert!(!c.allowed && c.reason == Reason::LimitReached && c.remaining == Some(0));
    }
}

#[test]
fn settings_edited_offline_on_two_devices_converge() {
    let Some(e) = env("settings", &[]) else { return };
    let (a, b) = (e.device("a"), e.device("b"));
    let (ua, ub) = (sign_in(&a, "frank"), sign_in(&b, "frank"));
    a.tally.set_setting(&ua.id, "lang", "fr".into()).unwrap();
    a.tally.set_setting(&ua.id, "theme", "dark".into()).unwrap();
    a.tally.set_setting(&ua.id, "font", 12.into()).unwrap();
    b.clock.advance(Duration::seconds(5));
    b.tally.set_setting(&ub.id, "lang", "de".into()).unwrap();
    b.tally.set_setting(&ub.id, "theme", "light".into()).unwrap();
    b.tally.set_setting(&ub.id, "font", serde_json::Value::Null).unwrap();
    for (d, u) in [(&a, &ua), (&b, &ub), (&a, &ua)] {
        e.sync(d, u).unwrap();
    }
    let (sa, sb) = (a.tally.settings(&ua.id).unwrap(), b.tally.settings(&ub.id).unwrap());
    assert_eq!(sa["lang"], "de");
    assert_eq!(sb["lang"], "de");
    assert!(!sa.contains_key("font") && !sb.contains_key("font"), "the later delete wins everywhere");
    assert_eq!((sa["theme"].as_str(), sb["theme"].as_str()), (Some("dark"), Some("light")), "local-only keys stay local");
}

#[test]
fn users_are_isolated_on_the_device_and_the_server() {
    let Some(e) = env("isolation", &[]) else { return };
    let d = e.device("shared");
    let (g, h) = (sign_in(&d, "gina"), sign_in(&d, "hank"));
    consume_n(&d, &g, "notes", 30);
    consume_n(&d, &h, "notes", 7);
    d.tally.set_setting(&g.id, "lang", "it".into()).unwrap();
    e.sync(&d, &g).unwrap();
    e.sync(&d, &h).unwrap();
    assert_eq!((e.server_used("gina", "notes"), e.server_used("hank", "notes")), (30, 7));
    assert_eq!((d.tally.usage(&g.id, "notes").unwrap().used, d.tally.usage(&h.id, "notes").unwrap().used), (30, 7));
    assert!(d.tally.setting(&h.id, "lang").unwrap().is_none());
    // A profile edit made on the device reaches the server with the next sync.
    d.tally.update_user(&g.id, tally_core::UserUpdate { timezone: Some("Asia/Tokyo".into()), ..Default::default() }).unwrap();
    e.sync(&d, &g).unwrap();
    let me: serde_json::Value = serde_json::from_str(&http_get_text(&format!("{}/v1/me", e.server.url), Some(&id_token("gina")))).unwrap();
    // The device holds a lease computed in UTC: the change waits for its end.
    assert_eq!((me["timezone"].as_str(), me["timezone_pending"]["timezone"].as_str()), (Some("UTC"), Some("Asia/Tokyo")), "{me}");
    assert_eq!(d.tally.user(&h.id).unwrap().timezone, "UTC", "the other user is untouched");
}

#[test]
fn local_user_attached_at_sign_in_syncs_once() {
    let Some(e) = env("attach", &[]) else { return };
    let d = e.device("phone");
    let local = d.tally.create_local_user(Some("guest")).unwrap();
    consume_n(&d, &local, "notes", 12);
    let u = d.tally.sign_in(Profile { external_id: "ivy".into(), ..Profile::default() }, Some(&local.id)).unwrap();
    e.sync(&d, &u).unwrap();
    e.sync(&d, &u).unwrap();
    assert_eq!(e.server_used("ivy", "notes"), 12);
    assert_eq!(d.tally.usage(&u.id, "notes").unwrap().used, 12);
}

#[test]
fn expired_sign_in_and_deleted_account() {
    let Some(e) = env("auth", &[]) else { return };
    let d = e.device("phone");
    let u = sign_in(&d, "jack");
    consume_n(&d, &u, "notes", 3);
    // A bad sign-in token: Unauthorized once, nothing lost, no retry loop.
    let bad = SyncOptions::new(&e.server.url, "not-a-jwt");
    assert!(matches!(e.rt.block_on(d.tally.sync(&u.id, bad)), Err(Error::Unauthorized(_))));
    assert_eq!(d.tally.pending_events(&u.id).unwrap(), 3);
    assert!(d.tally.consume(&u.id, "notes", 1, UsageMeta::default()).unwrap().allowed, "local decisions go on");
    e.sync(&d, &u).unwrap();
    assert_eq!(e.server_used("jack", "notes"), 4);
    // Deleted elsewhere: the next sync answers 410 and the user's local data goes.
    let old_token = id_token("jack");
    let (status, body) = raw_request("DELETE", &format!("{}/v1/me", e.server.url), Some(&old_token), None).unwrap();
    assert!(status == 200 || status == 204, "{status} {body}");
    let o = SyncOptions::new(&e.server.url, old_token);
    assert!(matches!(e.rt.block_on(d.tally.sync(&u.id, o)), Err(Error::AccountDeleted)));
    assert!(matches!(d.tally.user(&u.id), Err(Error::NotFound(_))));
}

#[test]
fn entitlements_from_the_server_expire_offline_and_return_on_sync() {
    let Some(mut e) = env("grace", &[("TALLY_ADMIN_SUBJECTS", "admin")]) else { return };
    let d = e.device("phone");
    let u = sign_in(&d, "kate");
    e.sync(&d, &u).unwrap(); // creates kate on the server
    let until = (Utc::now() + Duration::days(60)).to_rfc3339();
    let grant = format!(r#"{{"subject":"kate","plan":"pro","until":"{until}","granted_by":"admin","reason":"beta"}}"#);
    let (status, body) = raw_request("POST", &format!("{}/v1/admin/grants", e.server.url), Some(&id_token("admin")), Some(&grant)).unwrap();
    assert!(status < 300, "{status} {body}");
    let r = e.sync(&d, &u).unwrap();
    assert!(r.entitlements_updated);
    let ent = d.tally.entitlements(&u.id).unwrap();
    assert_eq!((ent.plan.as_str(), ent.access_reason.as_str()), ("pro", "granted:beta"));
    assert_eq!(d.tally.usage(&u.id, "ai_chat").unwrap().limit, Some(1000));
    // Offline past exp (24 h) + grace (3 days): the free plan the token carries.
    d.clock.advance(Duration::days(4) + Duration::hours(1));
    assert_eq!(d.tally.entitlements(&u.id).unwrap().plan, "free");
    assert_eq!(d.tally.check(&u.id, "ai_chat", 6).unwrap().reason, Reason::LimitReached);
    // Moving the clock back does not bring the plan back.
    d.clock.advance(-Duration::days(4));
    assert_eq!(d.tally.entitlements(&u.id).unwrap().plan, "free");
    // The next sync (against a server whose tokens last long enough for the device's clock)
    // brings it back.
    e.server.kill9();
    let mut long = Server::start(&e.db_url, &e.dir.path().join("server"), &[("TALLY_TOKEN_TTL_SECS", "2592000")]);
    std::mem::swap(&mut e.server, &mut long);
    drop(long);
    e.sync(&d, &u).unwrap();
    assert_eq!(d.tally.entitlements(&u.id).unwrap().plan, "pro");
    // A token edited in the database file is rejected on open: the local (free) state applies.
    let path = d.path.clone();
    drop(d);
    rusqlite_edit(&path);
    let d = device(&path, "phone", &e.server.keys(), Utc::now());
    assert_eq!(d.tally.entitlements(&u.id).unwrap().plan, "free", "a tampered token grants nothing");
    // A token signed by another server's key (a device trusting other keys) grants nothing.
    let foreign = Server::start(&e.db_url, &e.dir.path().join("other-server"), &[]);
    let stranger = device(&e.dir.path().join("stranger.db"), "stranger", &foreign.keys(), Utc::now());
    let su = sign_in(&stranger, "kate");
    let r = e.rt.block_on(stranger.tally.sync(&su.id, opts(&e.server.url, "kate"))).unwrap();
    assert!(!r.entitlements_updated, "a token that does not verify is not taken");
    assert_eq!(stranger.tally.entitlements(&su.id).unwrap().plan, "free");
}

/// Flips one character of the stored entitlements token's payload.
fn rusqlite_edit(path: &std::path::Path) {
    let out = std::process::Command::new("python3")
        .args([
            "-c",
            "import sqlite3,sys\nc=sqlite3.connect(sys.argv[1])\nt=c.execute('select entitlements_token from users').fetchone()[0]\nh,p,s=t.split('.')\np=p[:10]+('A' if p[10]!='A' else 'B')+p[11:]\nc.execute('update users set entitlements_token=?',(h+'.'+p+'.'+s,))\nc.commit()",
            path.to_str().unwrap(),
        ])
        .output()
        .expect("python3");
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
}

#[test]
fn backlog_of_100k_offline_events_drains_in_bounded_batches() {
    let Some(e) = env("backlog", &[]) else { return };
    let d = e.device("phone");
    let u = sign_in(&d, "liam");
    consume_n(&d, &u, "notes", 100_000);
    let t = std::time::Instant::now();
    let r = e.sync(&d, &u).expect("drain");
    let took = t.elapsed();
    eprintln!("BACKLOG 100000 events drained in {:?} over {} rounds ({} acked)", took, r.rounds, r.events_acked);
    assert_eq!(r.events_acked, 100_000);
    assert!(r.rounds >= 200, "batches of at most 500 events: {} rounds", r.rounds);
    assert_eq!(e.server_used("liam", "notes"), 100_000);
    assert_eq!(d.tally.usage(&u.id, "notes").unwrap().used, 100_000);
}

#[test]
fn two_server_replicas_and_skewed_clocks_count_once() {
    let Some(e) = env("replicas", &[]) else { return };
    let second = Server::start(&e.db_url, &e.dir.path().join("server"), &[]);
    let devices: Vec<Device> = ["ahead", "behind", "exact"].iter().map(|n| e.device(n)).collect();
    let users: Vec<User> = devices.iter().map(|d| sign_in(d, "mia")).collect();
    devices[0].clock.advance(Duration::hours(3));
    for (d, u) in devices.iter().zip(&users) {
        consume_n(d, u, "lifetime_notes", 700);
    }
    // One device's clock is moved back after use: its next events are not stamped earlier.
    devices[1].clock.advance(-Duration::hours(2));
    consume_n(&devices[1], &users[1], "lifetime_notes", 300);
    let mut order: Vec<(usize, bool)> = (0..3).flat_map(|i| [(i, false), (i, true)]).collect();
    order.shuffle(&mut rand::rng());
    for (i, on_second) in order {
        let url = if on_second { &second.url } else { &e.server.url };
        e.rt.block_on(devices[i].tally.sync(&users[i].id, opts(url, "mia"))).expect("sync");
    }
    for (d, u) in devices.iter().zip(&users) {
        e.sync(d, u).unwrap();
        assert_eq!(d.tally.usage(&u.id, "lifetime_notes").unwrap().used, 2400);
        assert!(d.tally.last_synced_at(&u.id).unwrap().is_some());
    }
    assert_eq!(e.server_used("mia", "lifetime_notes"), 2400);
}

#[test]
fn oversized_batches_are_halved_and_oversized_events_quarantined() {
    let Some(e) = env("bounds", &[("TALLY_MAX_BATCH_EVENTS", "60")]) else { return };
    let d = e.device("phone");
    let u = sign_in(&d, "noah");
    consume_n(&d, &u, "notes", 400);
    let big = UsageMeta {
        metadata: Some(serde_json::json!({"blob": "x".repeat(3000)})),
        idempotency_key: Some("big-one".into()),
        ..UsageMeta::default()
    };
    assert!(d.tally.consume(&u.id, "notes", 1, big).unwrap().allowed);
    let mut o = opts(&e.server.url, "noah");
    o.max_batch_bytes = 2048;
    let r = e.rt.block_on(d.tally.sync(&u.id, o)).expect("sync");
    assert_eq!(r.events_acked, 400, "{r:?}");
    assert_eq!(r.rejected.len(), 1);
    assert_eq!(r.rejected[0].reason, "too_large");
    assert_eq!(d.tally.event_status(&u.id, "big-one").unwrap(), tally_core::EventStatus::Rejected("too_large".into()));
    assert_eq!(d.tally.pending_events(&u.id).unwrap(), 0, "a quarantined event is never resent");
    assert_eq!(d.tally.usage(&u.id, "notes").unwrap().used, 400);
    assert_eq!(e.server_used("noah", "notes"), 400);
    // The server's 413 (batch above its 60-event maximum) halves the batch until it fits.
    consume_n(&d, &u, "notes", 500);
    let r = e.sync(&d, &u).expect("sync with halving");
    assert_eq!((r.events_acked, r.events_sent), (500, 500), "{r:?}");
    assert!(r.rounds >= 9, "batches of at most 60 events after halving: {r:?}");
    let metrics = http_get_text(&format!("{}/metrics", e.server.url), None);
    assert!(
        metrics.lines().any(|l| l.starts_with("tally_http_requests_total") && l.contains("status=\"413\"")),
        "the server answered 413 first"
    );
    assert_eq!(e.server_used("noah", "notes"), 900);
}

#[test]
fn a_conflicting_resend_is_quarantined_not_counted() {
    let Some(e) = env("conflict", &[]) else { return };
    let (a, b) = (e.device("a"), e.device("b"));
    let (ua, ub) = (sign_in(&a, "olga"), sign_in(&b, "olga"));
    let key = |k: &str| UsageMeta { idempotency_key: Some(k.into()), ..UsageMeta::default() };
    a.tally.consume(&ua.id, "notes", 2, key("order-17")).unwrap();
    b.tally.consume(&ub.id, "notes", 5, key("order-17")).unwrap();
    b.tally.consume(&ub.id, "notes", 1, key("order-18")).unwrap();
    e.sync(&a, &ua).unwrap();
    let r = e.sync(&b, &ub).unwrap();
    assert_eq!(r.rejected.iter().map(|x| x.reason.as_str()).collect::<Vec<_>>(), vec!["conflict"]);
    assert_eq!(b.tally.event_status(&ub.id, "order-17").unwrap(), tally_core::EventStatus::Rejected("conflict".into()));
    assert_eq!(b.tally.event_status(&ub.id, "order-18").unwrap(), tally_core::EventStatus::Settled);
    assert_eq!(e.server_used("olga", "notes"), 3);
    assert_eq!(b.tally.usage(&ub.id, "notes").unwrap().used, 3);
}

#[test]
fn rate_limited_sync_honours_retry_after_and_gives_up_clearly() {
    let Some(e) = env("ratelimit", &[]) else { return };
    // A separate server process with a tight per-user limit.
    let tight =
        Server::start(&e.db_url, &e.dir.path().join("server"), &[("TALLY_RATE_LIMIT_PER_SEC", "1"), ("TALLY_RATE_LIMIT_BURST", "2")]);
    let d = e.device("phone");
    let u = sign_in(&d, "paul");
    consume_n(&d, &u, "notes", 50);
    let mut o = opts(&tight.url, "paul");
    o.max_batch_events = 10;
    o.retry.max_backoff = std::time::Duration::from_secs(3);
    let r = e.rt.block_on(d.tally.sync(&u.id, o)).expect("sync through 429s");
    assert_eq!(r.events_acked, 50);
    let metrics = http_get_text(&format!("{}/metrics", tight.url), None);
    let limited: f64 = metrics
        .lines()
        .find(|l| l.starts_with("tally_rate_limited_total"))
        .and_then(|l| l.split_whitespace().last()?.parse().ok())
        .unwrap_or(0.0);
    assert!(limited >= 1.0, "the server answered 429 at least once and the device waited it out");
    assert_eq!(e.server_used("paul", "notes"), 50);
    // Nobody listening: a clear network error after the configured attempts.
    let mut o = opts(&format!("http://127.0.0.1:{}", free_port()), "paul");
    o.retry.max_attempts = 2;
    consume_n(&d, &u, "notes", 1);
    match e.rt.block_on(d.tally.sync(&u.id, o)) {
        Err(Error::Network(m)) => assert!(m.contains("gave up after 2 attempts"), "{m}"),
        other => panic!("expected a network error, got {other:?}"),
    }
    assert_eq!(d.tally.pending_events(&u.id).unwrap(), 1);
}

// ---- One contract: whatever the device records, the server takes; no stored value blocks a
// ---- sync; every use lands in the right account.

fn settings_of(e: &Env, sub: &str) -> serde_json::Value {
    let body = http_get_text(&format!("{}/v1/settings", e.server.url), Some(&id_token(sub)));
    serde_json::from_str::<serde_json::Value>(&body).expect("settings json")["settings"].clone()
}

#[test]
fn big_settings_never_take_events_down() {
    // 20 settings of 15 KB with a 256 KiB request cap: round 1 quarantined every pending event.
    let Some(e) = env("big_settings", &[("TALLY_MAX_BODY_BYTES", "262144")]) else { return };
    let d = e.device("phone");
    let u = sign_in(&d, "settler");
    for i in 0..20 {
        d.tally.set_setting(&u.id, &format!("doc{i}"), serde_json::json!("x".repeat(15_000))).expect("legal setting");
    }
    consume_n(&d, &u, "notes", 50);
    let r = e.sync(&d, &u).expect("sync completes");
    assert!(r.rejected.is_empty() && r.settings_rejected.is_empty(), "{r:?}");
    assert_eq!(d.tally.pending_events(&u.id).unwrap(), 0);
    assert_eq!(e.server_used("settler", "notes"), 50);
    assert_eq!(settings_of(&e, "settler").as_object().map(|o| o.len()), Some(20));
    assert_eq!(d.tally.setting_status(&u.id, "doc7").unwrap(), tally_core::settings::SettingStatus::Synced);
}

#[test]
fn values_at_the_contract_limits_sync_and_a_stored_bad_value_blocks_nothing() {
    let Some(e) = env("limits", &[]) else { return };
    let d = e.device("phone");
    let u = sign_in(&d, "limit-user");
    let c = tally_core::contract::MAX_SETTING_VALUE_BYTES;
    d.tally.set_setting(&u.id, "big", serde_json::json!("v".repeat(c - 2))).expect("at the limit");
    assert!(d.tally.set_setting(&u.id, "bigger", serde_json::json!("v".repeat(c - 1))).is_err(), "past it: refused on the device");
    let name = "n".repeat(tally_core::contract::MAX_DISPLAY_NAME_BYTES);
    d.tally.update_user(&u.id, tally_core::UserUpdate { display_name: Some(name.clone()), ..Default::default() }).expect("name");
    let meta = UsageMeta {
        metadata: Some(serde_json::json!({"k": "x".repeat(tally_core::contract::MAX_METADATA_BYTES - 8)})),
        ..UsageMeta::default()
    };
    assert!(d.tally.consume(&u.id, "notes", tally_core::contract::MAX_AMOUNT, meta).unwrap().allowed);
    // A value an older version stored with U+0000 (refused by Postgres) and an over-limit one.
    let raw = rusqlite::Connection::open(&d.path).expect("raw");
    raw.execute(
        "INSERT INTO settings (user_id, key, value, deleted, hlc, dirty) VALUES (?1, 'legacy', '\"a\\u0000b\"', 0, '001700000000000-00000-phone', 1)",
        [&u.id],
    )
    .expect("legacy row");
    drop(raw);
    let r = e.sync(&d, &u).expect("sync completes");
    assert!(r.rejected.is_empty(), "{r:?}");
    assert_eq!(d.tally.pending_events(&u.id).unwrap(), 0);
    assert_eq!(e.server_used("limit-user", "notes"), tally_core::contract::MAX_AMOUNT);
    assert!(matches!(d.tally.setting_status(&u.id, "legacy").unwrap(), tally_core::settings::SettingStatus::Rejected { .. }));
    assert_eq!(settings_of(&e, "limit-user")["big"].as_str().map(str::len), Some(c - 2));
    let me: serde_json::Value =
        serde_json::from_str(&http_get_text(&format!("{}/v1/me", e.server.url), Some(&id_token("limit-user")))).unwrap();
    assert_eq!(me["display_name"].as_str(), Some(name.as_str()));
    // Nothing is left that would make the next sync fail.
    assert!(e.sync(&d, &u).is_ok());
}

#[test]
fn credentials_of_another_subject_are_refused_and_record_nothing() {
    let Some(e) = env("subject", &[]) else { return };
    let d = e.device("phone");
    let u = sign_in(&d, "rust-user");
    consume_n(&d, &u, "notes", 1);
    let err = e.rt.block_on(d.tally.sync(&u.id, opts(&e.server.url, "someone-else"))).expect_err("another account's token");
    assert!(matches!(err, Error::SubjectMismatch(_)), "{err:?}");
    assert_eq!(d.tally.pending_events(&u.id).unwrap(), 1, "still pending on the device");
    assert_eq!(e.server_used("someone-else", "notes"), 0, "nothing counted under the other subject");
    e.sync(&d, &u).expect("the right credentials");
    assert_eq!(e.server_used("rust-user", "notes"), 1);
}

#[test]
fn a_fast_device_clock_never_wins_a_setting_forever() {
    let Some(e) = env("fast_clock", &[]) else { return };
    let d = e.device_at("phone", Utc::now() + Duration::hours(1));
    let u = sign_in(&d, "fast");
    d.tally.set_setting(&u.id, "lang", serde_json::json!("fr")).unwrap();
    e.sync(&d, &u).expect("sync");
    let (s, body) = raw_request("PATCH", &format!("{}/v1/settings", e.server.url), Some(&id_token("fast")), Some(r#"{"lang": "de"}"#))
        .expect("web write");
    assert_eq!(s, 200, "{body}");
    e.sync(&d, &u).expect("sync");
    assert_eq!(d.tally.setting(&u.id, "lang").unwrap(), Some(serde_json::json!("de")), "the later web write wins on the device");
}

#[test]
fn an_older_setting_in_the_answer_never_replaces_the_newer_write_it_answers() {
    let Some(e) = env("stale_answer", &[]) else { return };
    // The tablet runs 4 min fast (within what the server keeps), the phone an hour fast (its
    // HLCs get re-stamped to the server's time, below the tablet's).
    let tablet = e.device_at("tablet", Utc::now() + Duration::minutes(4));
    let phone = e.device_at("phone", Utc::now() + Duration::hours(1));
    let (ut, up) = (sign_in(&tablet, "stale"), sign_in(&phone, "stale"));
    tablet.tally.set_setting(&ut.id, "lang", serde_json::json!("de")).unwrap();
    e.sync(&tablet, &ut).expect("tablet sync");
    phone.tally.set_setting(&up.id, "lang", serde_json::json!("fr")).unwrap();
    // The server keeps `de` (its HLC beats `fr` re-stamped) and answers it to the phone's sync.
    e.sync(&phone, &up).expect("phone sync");
    assert_eq!(settings_of(&e, "stale")["lang"], "de", "the server's merge is unchanged");
    assert_eq!(phone.tally.setting(&up.id, "lang").unwrap(), Some(serde_json::json!("fr")), "the phone's newer write stays");
}

#[test]
fn the_servers_restamp_of_the_write_just_sent_is_adopted() {
    let Some(e) = env("restamp", &[]) else { return };
    let d = e.device_at("phone", Utc::now() + Duration::hours(1));
    let u = sign_in(&d, "restamp");
    d.tally.set_setting(&u.id, "lang", serde_json::json!({"b": 1, "a": [1, 2]})).unwrap();
    let hlc = |d: &Device| -> String {
        rusqlite::Connection::open(&d.path)
            .expect("device file")
            .query_row("SELECT hlc FROM settings WHERE key = 'lang'", [], |r| r.get(0))
            .expect("lang row")
    };
    let sent = hlc(&d);
    e.sync(&d, &u).expect("sync");
    let adopted = hlc(&d);
    assert!(adopted < sent, "the re-stamp ({adopted}) replaces the fast HLC ({sent})");
    assert!(adopted.ends_with("-phone"), "same node: {adopted}");
    assert_eq!(d.tally.setting_status(&u.id, "lang").unwrap(), tally_core::settings::SettingStatus::Synced);
    assert_eq!(d.tally.setting(&u.id, "lang").unwrap(), Some(serde_json::json!({"a": [1, 2], "b": 1})));
}

#[test]
fn a_device_catalog_ahead_of_the_server_keeps_its_events() {
    let Some(e) = env("ahead", &[]) else { return };
    let path = e.dir.path().join("ahead.db");
    let d = device(&path, "phone", &e.server.keys(), Utc::now());
    let mut catalog: serde_json::Value = serde_json::from_str(PLANS).unwrap();
    catalog["plans"][0]["features"]["video"] = serde_json::json!({"type": "metered", "limit": 10, "period": "day", "enforcement": "hard"});
    d.tally.set_catalog(tally_core::Catalog::from_value(&catalog).unwrap());
    let u = sign_in(&d, "early");
    assert!(d.tally.consume(&u.id, "video", 2, UsageMeta::default()).unwrap().allowed);
    let r = e.sync(&d, &u).expect("sync");
    assert_eq!((r.events_acked, r.unknown_features.clone()), (1, vec!["video".to_string()]), "{r:?}");
    assert_eq!(d.tally.pending_events(&u.id).unwrap(), 0, "stored and acknowledged, not stuck");
    assert_eq!(server_usage(&e.server, "early", "video"), 2, "kept on the server for history");
}

#[test]
fn attaching_a_local_user_who_repeated_a_keyed_use_counts_it_once() {
    let Some(e) = env("attach_dup", &[]) else { return };
    let d = e.device("phone");
    let u = sign_in(&d, "attacher");
    let keyed = UsageMeta { idempotency_key: Some("req-1".into()), ..UsageMeta::default() };
    assert!(d.tally.consume(&u.id, "notes", 1, keyed.clone()).unwrap().allowed);
    e.sync(&d, &u).expect("sync");
    // Signed out, the same request was replayed under a local user, then the user signs in again.
    let local = d.tally.create_local_user(None).unwrap();
    assert!(d.tally.consume(&local.id, "notes", 1, keyed).unwrap().allowed);
    let u = d
        .tally
        .sign_in(Profile { external_id: "attacher".into(), ..Profile::default() }, Some(&local.id))
        .expect("attach merges the same-body duplicate");
    e.sync(&d, &u).expect("sync");
    assert_eq!(e.server_used("attacher", "notes"), 1, "counted once");
    assert_eq!(d.tally.usage(&u.id, "notes").unwrap().used, 1);
}

/// Every limit of the contract, one by one: a value at the limit recorded by the device is taken
/// by the server; one past it is refused by the device before anything is stored.
#[test]
fn every_contract_limit_holds_on_both_sides() {
    use tally_core::contract as c;
    let Some(e) = env("every_limit", &[]) else { return };
    let long_feature = "f".repeat(c::MAX_FEATURE_BYTES);
    let path = e.dir.path().join("limits.db");
    let device_id = "d".repeat(c::MAX_DEVICE_ID_BYTES);
    let d = device(&path, &device_id, &e.server.keys(), Utc::now());
    assert!(
        tally_core::Tally::open(
            e.dir.path().join("x.db"),
            tally_core::Config { device_id: Some("d".repeat(c::MAX_DEVICE_ID_BYTES + 1)), ..Default::default() }
        )
        .is_err()
    );
    let mut catalog: serde_json::Value = serde_json::from_str(PLANS).unwrap();
    catalog["plans"][0]["features"][&long_feature] = serde_json::json!({"type": "metered", "limit": null, "period": "lifetime"});
    d.tally.set_catalog(tally_core::Catalog::from_value(&catalog).unwrap());
    let sub = "s".repeat(c::MAX_SUBJECT_BYTES);
    let u = sign_in(&d, &sub);
    assert!(d.tally.sign_in(Profile { external_id: "s".repeat(c::MAX_SUBJECT_BYTES + 1), ..Profile::default() }, None).is_err());
    let meta = |f: fn(&mut UsageMeta)| {
        let mut m = UsageMeta::default();
        f(&mut m);
        m
    };
    type Case<'a> = (&'static str, Box<dyn Fn(usize) -> Result<(), Error> + 'a>);
    let t = &d.tally;
    let uid = u.id.clone();
    let cases: Vec<Case<'_>> = vec![
        ("feature", Box::new(|n| t.consume(&uid, &"f".repeat(n), 1, UsageMeta::default()).map(|_| ()))),
        ("amount", Box::new(|n| t.consume(&uid, "lifetime_notes", c::MAX_AMOUNT + n as u64 - 1, UsageMeta::default()).map(|_| ()))),
        (
            "tokens",
            Box::new(|n| {
                let mut m = meta(|m| m.model = Some("gpt-4o".into()));
                (m.input_tokens, m.output_tokens) = (Some(c::MAX_TOKENS + n as u64 - 1), Some(c::MAX_TOKENS));
                t.consume(&uid, "notes", 1, m).map(|_| ())
            }),
        ),
        (
            "metadata",
            Box::new(|n| {
                let m = UsageMeta {
                    metadata: Some(serde_json::json!({"k": "x".repeat(c::MAX_METADATA_BYTES - 9 + n)})),
                    ..UsageMeta::default()
                };
                t.consume(&uid, "notes", 1, m).map(|_| ())
            }),
        ),
        ("model", Box::new(|n| t.consume(&uid, "notes", 1, UsageMeta { model: Some("m".repeat(n)), ..UsageMeta::default() }).map(|_| ()))),
        (
            "idempotency_key",
            Box::new(|n| {
                t.consume(&uid, "notes", 1, UsageMeta { idempotency_key: Some("k".repeat(n)), ..UsageMeta::default() }).map(|_| ())
            }),
        ),
        ("setting key", Box::new(|n| t.set_setting(&uid, &"k".repeat(n), serde_json::json!(1)))),
        ("setting value", Box::new(|n| t.set_setting(&uid, "value", serde_json::json!("v".repeat(n - 2))))),
        (
            "display_name",
            Box::new(|n| {
                t.update_user(&uid, tally_core::UserUpdate { display_name: Some("n".repeat(n)), ..Default::default() }).map(|_| ())
            }),
        ),
        (
            "avatar_url",
            Box::new(|n| t.update_user(&uid, tally_core::UserUpdate { avatar_url: Some("a".repeat(n)), ..Default::default() }).map(|_| ())),
        ),
    ];
    let limits = [
        c::MAX_FEATURE_BYTES,
        1,
        1,
        1,
        c::MAX_MODEL_BYTES,
        c::MAX_IDEMPOTENCY_KEY_BYTES,
        c::MAX_SETTING_KEY_BYTES,
        c::MAX_SETTING_VALUE_BYTES,
        c::MAX_DISPLAY_NAME_BYTES,
        c::MAX_AVATAR_URL_BYTES,
    ];
    for ((name, act), limit) in cases.iter().zip(limits) {
        let before = (t.pending_events(&uid).unwrap(), t.settings(&uid).unwrap(), t.user(&uid).unwrap());
        let err = act(limit + 1).expect_err(name);
        assert!(matches!(err, Error::InvalidInput(_)), "{name}: {err:?}");
        assert_eq!((t.pending_events(&uid).unwrap(), t.settings(&uid).unwrap(), t.user(&uid).unwrap()), before, "{name}: nothing changed");
        act(limit).unwrap_or_else(|err| panic!("{name} at its limit: {err:?}"));
    }
    let r = e.sync(&d, &u).expect("sync");
    assert!(r.rejected.is_empty() && r.settings_rejected.is_empty() && r.profile_rejected.is_empty(), "{r:?}");
    assert_eq!(d.tally.pending_events(&u.id).unwrap(), 0, "the server took every value at its limit");
    assert_eq!(server_usage(&e.server, &sub, "lifetime_notes"), c::MAX_AMOUNT);
    assert_eq!(settings_of(&e, &sub)["value"].as_str().map(str::len), Some(c::MAX_SETTING_VALUE_BYTES - 2));
    let me: serde_json::Value = serde_json::from_str(&http_get_text(&format!("{}/v1/me", e.server.url), Some(&id_token(&sub)))).unwrap();
    assert_eq!(me["avatar_url"].as_str().map(str::len), Some(c::MAX_AVATAR_URL_BYTES));
}

#[test]
fn a_backend_report_over_a_hard_limit_reaches_the_device_with_its_cause() {
    let Some(e) = env("over_limit_causes", &[]) else { return };
    let d = e.device("phone");
    let u = sign_in(&d, "erin");
    consume_n(&d, &u, "ai_chat", 3);
    e.sync(&d, &u).expect("sync");
    assert!(d.tally.usage(&u.id, "ai_chat").unwrap().over_limit_causes.is_empty());
    // A backend reports three uses that already happened: the limit of 5 is overrun by 1.
    for i in 0..3 {
        let body =
            format!(r#"{{"id":"{}","feature":"ai_chat","amount":1,"occurred_at":"{}"}}"#, uuid::Uuid::now_v7(), Utc::now().to_rfc3339());
        let (status, text) =
            raw_request("POST", &format!("{}/v1/usage", e.server.url), Some(&id_token("erin")), Some(&body)).expect("usage");
        assert_eq!(status, 201, "{i}: {text}");
    }
    // And a backend consume is denied: the window is full.
    let (status, text) =
        raw_request("POST", &format!("{}/v1/consume", e.server.url), Some(&id_token("erin")), Some(r#"{"feature":"ai_chat"}"#))
            .expect("consume");
    assert_eq!(status, 402, "{text}");
    e.sync(&d, &u).expect("sync");
    let usage = d.tally.usage(&u.id, "ai_chat").unwrap();
    assert_eq!((usage.used, usage.over_limit_by), (6, 1));
    assert_eq!(usage.over_limit_causes, vec!["usage_report".to_string()]);
    assert_eq!(e.server_used("erin", "ai_chat"), 6);
}

#[test]
fn a_device_cannot_void_what_a_backend_or_another_device_recorded_and_the_use_still_counts() {
    let Some(e) = env("void_refusals", &[("TALLY_ADMIN_SUBJECTS", "e2e-admin")]) else { return };
    let (status, body) = raw_request(
        "POST",
        &format!("{}/v1/admin/api-keys", e.server.url),
        Some(&id_token("e2e-admin")),
        Some(r#"{"name": "backend", "scopes": ["usage:write"]}"#),
    )
    .expect("create key");
    assert_eq!(status, 201, "{body}");
    let key: serde_json::Value = serde_json::from_str(&body).expect("key");
    let key = key["secret"].as_str().expect("secret").to_string();
    let phone = e.device("phone");
    let tablet = e.device("tablet");
    let (pu, tu) = (sign_in(&phone, "vera"), sign_in(&tablet, "vera"));
    e.sync(&phone, &pu).expect("first sync");
    e.sync(&tablet, &tu).expect("first sync");
    // Past the time both devices saw at their sync (their floor), in whole milliseconds.
    let at = chrono::DateTime::from_timestamp_millis((Utc::now() + Duration::seconds(30)).timestamp_millis()).expect("now");
    phone.clock.set(at);
    tablet.clock.set(at);
    // A backend charged a use; the phone recorded the same use under the same key.
    let charged = uuid::Uuid::now_v7().to_string();
    let report =
        format!(r#"{{"subject": "vera", "id": "{charged}", "feature": "notes", "amount": 2, "occurred_at": "{}"}}"#, at.to_rfc3339());
    let (status, body) = raw_request("POST", &format!("{}/v1/usage", e.server.url), Some(&key), Some(&report)).expect("report");
    assert_eq!(status, 201, "{body}");
    let keyed = |k: &str| UsageMeta { idempotency_key: Some(k.into()), ..UsageMeta::default() };
    assert!(phone.tally.consume(&pu.id, "notes", 2, keyed(&charged)).expect("consume").allowed);
    // The phone's own use, which the tablet also recorded under the same key.
    assert!(phone.tally.consume(&pu.id, "notes", 3, keyed("phone-use")).expect("consume").allowed);
    let r = e.sync(&phone, &pu).expect("sync");
    assert_eq!((r.events_acked, r.duplicates, r.rejected.len()), (2, 1, 0), "{r:?}");
    assert!(tablet.tally.consume(&tu.id, "notes", 3, keyed("phone-use")).expect("consume").allowed);
    assert_eq!(e.sync(&tablet, &tu).expect("sync").duplicates, 1);
    assert_eq!(e.server_used("vera", "notes"), 5);
    // The phone voids the backend's charge, the tablet the phone's use: both refused.
    phone.tally.void(&pu.id, &charged, Some("refund me")).expect("void");
    tablet.tally.void(&tu.id, "phone-use", None).expect("void");
    assert_eq!(phone.tally.usage(&pu.id, "notes").unwrap().used, 3, "voided here until the server answers");
    for (d, u) in [(&phone, &pu), (&tablet, &tu)] {
        let r = e.sync(d, u).expect("sync");
        assert_eq!(r.rejected.iter().map(|x| x.reason.as_str()).collect::<Vec<_>>(), vec!["void_not_allowed"], "{r:?}");
        assert_eq!(d.tally.event_status(&u.id, &r.rejected[0].id).unwrap(), EventStatus::Rejected("void_not_allowed".into()));
        assert_eq!(d.tally.pending_events(&u.id).unwrap(), 0);
        assert_eq!(d.tally.usage(&u.id, "notes").unwrap().used, 5, "the originals still count on the device");
        let day = d.tally.report(&u.id, at - Duration::hours(1), at + Duration::hours(1), tally_core::GroupBy::Feature).unwrap();
        assert_eq!(day.iter().map(|r| (r.key.as_str(), r.amount)).collect::<Vec<_>>(), vec![("notes", if u.id == pu.id { 5 } else { 3 })]);
    }
    assert_eq!(e.server_used("vera", "notes"), 5, "and on the server");
    // The phone voids its own use: accepted.
    phone.tally.void(&pu.id, "phone-use", None).expect("void");
    let r = e.sync(&phone, &pu).expect("sync");
    assert!(r.rejected.is_empty(), "{r:?}");
    assert_eq!((phone.tally.usage(&pu.id, "notes").unwrap().used, e.server_used("vera", "notes")), (2, 2));
}

/// One use with several meters crosses the wire as one event per item (each with its derived
/// id and `use_id`), is counted on the server exactly as on the device, and one void of the use
/// id, sent in a later sync, cancels every item on both sides.
#[test]
fn a_use_of_several_meters_syncs_item_by_item_and_one_void_of_the_use_cancels_all() {
    let Some(e) = env("use_items", &[]) else { return };
    let phone = e.device("phone");
    let pu = sign_in(&phone, "ines");
    phone.tally.prepare_offline(&pu.id, "ai_chat", 5).expect("prepare");
    e.sync(&phone, &pu).expect("first sync");
    let items = |chat: u64, notes: u64| {
        vec![
            tally_core::UseItem { feature: "ai_chat".into(), amount: chat, model: None, input_tokens: None, output_tokens: None },
            tally_core::UseItem { feature: "notes".into(), amount: notes, model: None, input_tokens: None, output_tokens: None },
        ]
    };
    let first = phone.tally.consume_items(&pu.id, Some("answer-1"), &items(2, 3), None).expect("use");
    assert!(first.allowed && !first.duplicate, "{first:?}");
    let r = e.sync(&phone, &pu).expect("sync");
    assert_eq!((r.events_acked, r.rejected.len()), (2, 0), "both items travel, as separate events: {r:?}");
    assert_eq!((e.server_used("ines", "ai_chat"), e.server_used("ines", "notes")), (2, 3));
    let (status, body) = raw_request("GET", &format!("{}/v1/usage/events", e.server.url), Some(&id_token("ines")), None).expect("events");
    assert_eq!(status, 200, "{body}");
    let listed: serde_json::Value = serde_json::from_str(&body).expect("events");
    let use_id = first.use_id.to_string();
    let mut ids: Vec<(String, String)> = listed["events"]
        .as_array()
        .expect("events")
        .iter()
        .filter(|ev| ev["use_id"].as_str() == Some(use_id.as_str()))
        .map(|ev| (ev["feature"].as_str().unwrap_or_default().to_string(), ev["id"].as_str().unwrap_or_default().to_string()))
        .collect();
    ids.sort();
    let derived = |f: &str| tally_core::contract::item_event_id(first.use_id, f).to_string();
    assert_eq!(ids, vec![("ai_chat".to_string(), derived("ai_chat")), ("notes".to_string(), derived("notes"))], "{body}");
    // A second use that does not fit the call limit records nothing of either meter.
    let denied = phone.tally.consume_items(&pu.id, Some("answer-2"), &items(4, 1), None).expect("use");
    assert!(!denied.allowed, "{denied:?}");
    assert_eq!(phone.tally.usage(&pu.id, "notes").unwrap().used, 3, "the notes item of a refused use is not kept");
    // One void of the use id, one event on the wire, and every item is cancelled on both sides.
    phone.tally.void(&pu.id, "answer-1", Some("the answer failed")).expect("void");
    let r = e.sync(&phone, &pu).expect("sync");
    assert_eq!((r.events_acked, r.rejected.len()), (1, 0), "{r:?}");
    assert_eq!((e.server_used("ines", "ai_chat"), e.server_used("ines", "notes")), (0, 0));
    assert_eq!((phone.tally.usage(&pu.id, "ai_chat").unwrap().used, phone.tally.usage(&pu.id, "notes").unwrap().used), (0, 0));
    assert_eq!(phone.tally.pending_events(&pu.id).unwrap(), 0);
}
