//! Storage: migrations from a version-1 file, refusal of newer and corrupt files (untouched),
//! what one use writes, two processes consuming on one file, and SIGKILL at random moments
//! losing nothing acknowledged. Child processes are this test binary re-invoked with `TALLY_CHILD` set.

mod common;
use common::*;
use rusqlite::{Connection, params};
use std::io::{BufRead, BufReader, Write};
use std::path::Path;
use std::process::{Command, Stdio};
use std::sync::Arc;
use tally_core::{Catalog, Config, ConsumeItem, Decision, Error, EventStatus, ManualClock, Reason, Tally, UsageMeta};

const PROC_CATALOG: &str = r#"{"plans": [{"id": "free", "features": {
  "stars":  {"type": "metered", "limit": null, "period": "lifetime", "enforcement": "hard"},
  "chat":   {"type": "metered", "limit": null, "period": "month", "enforcement": "hard"},
  "capped": {"type": "metered", "limit": 150, "period": "lifetime", "enforcement": "hard"}}}]}"#;

fn proc_config() -> Config {
    Config { catalog: Catalog::from_json(PROC_CATALOG).unwrap(), ..Config::default() }
}

/// (name, length, FNV-1a hash) of every file in `dir`.
fn files(dir: &Path) -> Vec<(String, usize, u64)> {
    let mut v: Vec<_> = std::fs::read_dir(dir)
        .unwrap()
        .map(|e| {
            let e = e.unwrap();
            let b = std::fs::read(e.path()).unwrap();
            let h = b.iter().fold(0xcbf2_9ce4_8422_2325u64, |h, x| (h ^ u64::from(*x)).wrapping_mul(0x100_0000_01b3));
            (e.file_name().to_string_lossy().into_owned(), b.len(), h)
        })
        .collect();
    v.sort();
    v
}

// ---------------------------------------------------------------- what a use writes

#[test]
fn a_use_commits_about_one_page_and_its_counters_follow_every_64() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("pages.db");
    let tally = Tally::open(&path, proc_config()).unwrap();
    let user = tally.create_local_user(None).unwrap().id;
    for _ in 0..200 {
        tally.consume(&user, "chat", 1, UsageMeta::default()).unwrap();
    }
    // WAL frames (pages written) over 128 uses: the WAL is emptied first, then counted.
    let side = Connection::open(&path).unwrap();
    let frames = |mode: &str| -> i64 { side.query_row(&format!("PRAGMA wal_checkpoint({mode})"), [], |r| r.get(1)).unwrap() };
    frames("TRUNCATE");
    for _ in 0..128 {
        tally.consume(&user, "chat", 1, UsageMeta::default()).unwrap();
    }
    let pages = frames("PASSIVE") as f64 / 128.0;
    // One page per use (the ledger's last), a new page now and then, and the counter rows with
    // their mark twice in 128 uses.
    assert!(pages < 1.5, "{pages} pages per use");
    assert_eq!(tally.usage(&user, "chat").unwrap().used, 328);
}

// ---------------------------------------------------------------- migrations

#[test]
fn a_version_1_database_with_data_opens_without_loss() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("v1.db");
    let (user, other) = ("0193aaaa-0000-7000-8000-000000000001", "0193aaaa-0000-7000-8000-000000000002");
    let jan = t("2026-01-10T10:00:00Z").timestamp_millis();
    {
        let mut c = Connection::open(&path).unwrap();
        tally_core::db::migrate_to(&mut c, 1).unwrap();
        assert_eq!(tally_core::db::current_version(&c).unwrap(), 1);
        let decision = serde_json::to_string(&Decision::simple(true, Reason::Ok, "free")).unwrap();
        c.execute("INSERT INTO device (singleton, device_id, seq, highest_seen_ms) VALUES (1, 'old-device', 3, ?1)", [jan]).unwrap();
        for (id, ext, tz) in [(user, None, "Europe/Paris"), (other, Some("sub-9"), "UTC")] {
            c.execute(
                "INSERT INTO users (id, external_id, email, display_name, timezone, created_at, updated_at) VALUES (?1, ?2, 'a@b.c', 'Old', ?3, ?4, ?4)",
                params![id, ext, tz, jan - 86_400_000],
            )
            .unwrap();
        }
        for (i, (u, feature, amount)) in [(user, "ai_chat", 2), (user, "ai_chat", 1), (other, "ai_chat", 4)].into_iter().enumerate() {
            c.execute(
                "INSERT INTO events (user_id, id, feature, amount, occurred_at, device_id, device_seq, metadata, decision) VALUES (?1, ?2, ?3, ?4, ?5, 'old-device', ?6, '{\"v\":1}', ?7)",
                params![u, format!("0193aaaa-0000-7000-8000-0000000001{i:02}"), feature, amount, jan + i as i64, i as i64 + 1, decision],
            )
            .unwrap();
        }
        c.execute("INSERT INTO settings (user_id, key, value, deleted, hlc, dirty) VALUES (?1, 'lang', '\"fr\"', 0, '000001768039200000-00000-old-device', 1)", [user]).unwrap();
        c.execute("INSERT INTO credit_grants (user_id, id, remaining, expires_at, source) VALUES (?1, 'g1', 70, NULL, 'purchase')", [user])
            .unwrap();
    }
    let clock = Arc::new(ManualClock::new(t("2026-01-20T00:00:00Z")));
    let tally = Tally::open(&path, Config { clock: clock.clone(), catalog: catalog(), ..Config::default() }).unwrap();
    assert_eq!(tally.device_id(), "old-device");
    assert_eq!(tally.users().unwrap().len(), 2);
    assert_eq!(tally.user(user).unwrap().timezone, "Europe/Paris");
    assert_eq!(tally.usage(user, "ai_chat").unwrap().used, 3);
    assert_eq!(tally.usage(other, "ai_chat").unwrap().used, 4);
    assert_eq!(tally.pending_events(user).unwrap(), 2);
    assert_eq!(tally.setting(user, "lang").unwrap(), Some(serde_json::json!("fr")));
    // Version 3 added the settings' rejection column: the old dirty row is pending, not rejected.
    assert_eq!(tally.setting_status(user, "lang").unwrap(), tally_core::SettingStatus::Pending);
    // The stored grant kept its 70; the free plan adds its 100 for the current billing window.
    assert_eq!(tally.credit_balance(user).unwrap(), 170);
    assert_eq!(tally.entitlements(user).unwrap().credit_grants.iter().find(|g| g.id == "g1").map(|g| g.remaining), Some(70));
    assert_eq!(tally.event_status(user, "0193aaaa-0000-7000-8000-000000000100").unwrap(), EventStatus::Pending);
    // Consuming continues the device's sequence.
    tally.consume(user, "ai_chat", 1, UsageMeta::default()).unwrap();
    let seq: i64 = Connection::open(&path).unwrap().query_row("SELECT MAX(device_seq) FROM events", [], |r| r.get(0)).unwrap();
    assert_eq!(seq, 4);
    assert_eq!(tally_core::db::current_version(&Connection::open(&path).unwrap()).unwrap(), tally_core::db::latest_version());
}

#[test]
fn a_database_from_a_newer_version_is_refused_and_left_untouched() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("newer.db");
    {
        let mut c = Connection::open(&path).unwrap();
        tally_core::db::migrate_to(&mut c, 1).unwrap();
        c.execute(
            "INSERT INTO refinery_schema_history (version, name, applied_on, checksum) VALUES (?1, 'future', '2030-01-01T00:00:00Z', '1')",
            [tally_core::db::latest_version() + 1],
        )
        .unwrap();
    }
    let before = files(dir.path());
    match Tally::open(&path, Config::default()) {
        Err(Error::SchemaTooNew { found, supported }) => {
            assert_eq!((found, supported), (tally_core::db::latest_version() + 1, tally_core::db::latest_version()));
        }
        other => panic!("expected SchemaTooNew, got {other:?}"),
    }
    assert_eq!(files(dir.path()), before, "the file (and its journal mode) is unchanged, no side files left");
    // The same for a file already in WAL mode.
    let path2 = dir.path().join("newer-wal.db");
    drop(Tally::open(&path2, Config::default()).unwrap());
    Connection::open(&path2)
        .unwrap()
        .execute("INSERT INTO refinery_schema_history (version, name, applied_on, checksum) VALUES (99, 'future', 'x', '1')", [])
        .unwrap();
    let before = std::fs::read(&path2).unwrap();
    assert!(matches!(Tally::open(&path2, Config::default()), Err(Error::SchemaTooNew { found: 99, .. })));
    assert!(std::fs::read(&path2).unwrap() == before, "the WAL file was modified");
}

#[test]
fn a_corrupt_file_is_an_error_and_is_not_touched() {
    let dir = tempfile::tempdir().unwrap();
    let mut seed: u64 = 0x9E37_79B9_7F4A_7C15;
    let mut noise = |n: usize| -> Vec<u8> {
        (0..n)
            .map(|_| {
                seed ^= seed << 13;
                seed ^= seed >> 7;
                seed ^= seed << 17;
                seed as u8
            })
            .collect()
    };
    let random = noise(16 * 1024);
    let mut fake_header = b"SQLite format 3\0".to_vec();
    fake_header.extend(noise(8 * 1024));
    let mut truncated = {
        let p = dir.path().join("real.db");
        let t = Tally::open(&p, proc_config()).unwrap();
        let u = t.create_local_user(None).unwrap();
        for _ in 0..50 {
            t.consume(&u.id, "stars", 1, UsageMeta::default()).unwrap();
        }
        drop(t);
        let b = std::fs::read(&p).unwrap();
        std::fs::remove_file(&p).unwrap();
        b
    };
    // Garble the pages after the header.
    let len = truncated.len();
    for b in &mut truncated[100..len] {
        *b ^= 0x5A;
    }
    for (name, bytes) in [("random.db", random), ("fake-header.db", fake_header), ("garbled.db", truncated)] {
        let path = dir.path().join(name);
        std::fs::write(&path, &bytes).unwrap();
        let before = files(dir.path());
        let r = Tally::open(&path, Config::default());
        assert!(r.is_err(), "{name}: opened a corrupt file");
        let msg = r.unwrap_err().to_string();
        assert!(!msg.is_empty());
        assert_eq!(files(dir.path()), before, "{name}: the file was modified or side files were left ({msg})");
        assert!(std::fs::read(&path).unwrap() == bytes, "{name} was modified");
    }
}

// ---------------------------------------------------------------- processes

/// Entry point of the child processes (does nothing in a normal test run).
#[test]
fn child_entry() {
    let Ok(mode) = std::env::var("TALLY_CHILD") else { return };
    let path = std::env::var("TALLY_DB").unwrap();
    let user = std::env::var("TALLY_USER").unwrap();
    let tag = std::env::var("TALLY_TAG").unwrap_or_default();
    let tally = Tally::open(&path, proc_config()).unwrap();
    let out = std::io::stdout();
    // The test harness printed "test child_entry ... " without a newline: start a fresh line.
    println!();
    match mode.as_str() {
        "concurrent" => {
            let n: u64 = std::env::var("TALLY_N").unwrap().parse().unwrap();
            let mut capped = 0;
            for i in 0..n {
                let d = tally.consume(&user, "stars", 1, UsageMeta::default()).unwrap();
                assert!(d.allowed);
                let k = format!("{tag}-{i}");
                if tally.consume(&user, "capped", 1, key(&k)).unwrap().allowed {
                    capped += 1;
                }
            }
            let mut o = out.lock();
            writeln!(o, "CAPPED {capped}").unwrap();
            o.flush().unwrap();
        }
        "crash" => {
            for i in 0..1_000_000u64 {
                let k = format!("{tag}-{i}");
                if i % 3 == 2 {
                    let items: Vec<_> = (0..3)
                        .map(|j| ConsumeItem {
                            feature: if j == 1 { "chat".into() } else { "stars".into() },
                            amount: j + 1,
                            meta: key(&format!("{k}-{j}")),
                        })
                        .collect();
                    tally.consume_many(&user, &items).unwrap();
                    let mut o = out.lock();
                    for j in 0..3 {
                        writeln!(o, "ACK {k}-{j}").unwrap();
                    }
                    o.flush().unwrap();
                } else {
                    let f = if i % 2 == 0 { "stars" } else { "chat" };
                    tally.consume(&user, f, 1 + i % 4, key(&k)).unwrap();
                    let mut o = out.lock();
                    writeln!(o, "ACK {k}").unwrap();
                    o.flush().unwrap();
                }
            }
        }
        other => panic!("unknown child mode {other}"),
    }
}

fn child(mode: &str, path: &Path, user: &str, tag: &str, n: u64) -> std::process::Child {
    Command::new(std::env::current_exe().unwrap())
        .args(["--exact", "child_entry", "--nocapture", "--test-threads=1"])
        .env("TALLY_CHILD", mode)
        .env("TALLY_DB", path)
        .env("TALLY_USER", user)
        .env("TALLY_TAG", tag)
        .env("TALLY_N", n.to_string())
        .stdout(Stdio::piped())
        .stderr(Stdio::inherit())
        .spawn()
        .unwrap()
}

/// Counters equal the ledger sums of the current windows.
fn assert_counters_match_ledger(tally: &Tally, path: &Path, user: &str) {
    let c = Connection::open(path).unwrap();
    let sum = |f: &str| -> i64 {
        c.query_row("SELECT COALESCE(SUM(amount), 0) FROM events WHERE user_id = ?1 AND feature = ?2", params![user, f], |r| r.get(0))
            .unwrap()
    };
    assert_eq!(tally.usage(user, "stars").unwrap().used as i64, sum("stars"));
    let chat = tally.usage(user, "chat").unwrap();
    let start = chat.period_start.unwrap().timestamp_millis();
    let in_month: i64 = c
        .query_row(
            "SELECT COALESCE(SUM(amount), 0) FROM events WHERE user_id = ?1 AND feature = 'chat' AND occurred_at >= ?2",
            params![user, start],
            |r| r.get(0),
        )
        .unwrap();
    assert_eq!(chat.used as i64, in_month);
    let ok: String = c.query_row("PRAGMA integrity_check", [], |r| r.get(0)).unwrap();
    assert_eq!(ok, "ok");
}

#[test]
fn two_processes_consume_on_one_file() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("shared.db");
    let tally = Tally::open(&path, proc_config()).unwrap();
    let user = tally.create_local_user(None).unwrap().id;
    // The parent keeps its connection open and consumes too.
    let n = 120;
    let kids: Vec<_> = ["a", "b"].iter().map(|tag| child("concurrent", &path, &user, tag, n)).collect();
    for i in 0..20 {
        tally.consume(&user, "stars", 1, UsageMeta::default()).unwrap();
        tally.check(&user, "capped", 1).unwrap();
        let _ = i;
    }
    let mut capped = 0;
    for k in kids {
        let out = k.wait_with_output().unwrap();
        assert!(out.status.success(), "child failed: {out:?}");
        let text = String::from_utf8_lossy(&out.stdout);
        let line = text.lines().find(|l| l.starts_with("CAPPED ")).unwrap_or_else(|| panic!("child summary missing: {text}"));
        capped += line[7..].trim().parse::<u64>().unwrap();
    }
    assert_eq!(capped, 150, "the hard limit held across processes");
    assert_eq!(tally.usage(&user, "stars").unwrap().used, 2 * n + 20);
    assert_eq!(tally.usage(&user, "capped").unwrap().used, 150);
    assert_eq!(tally.pending_events(&user).unwrap(), 2 * n + 20 + 150);
    assert_counters_match_ledger(&tally, &path, &user);
}

#[test]
fn sigkill_at_random_moments_loses_nothing_acknowledged() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("crash.db");
    let user = {
        let t = Tally::open(&path, proc_config()).unwrap();
        t.create_local_user(None).unwrap().id
    };
    let mut rng: u64 = std::process::id() as u64 | 1;
    let mut total_acked = 0;
    for round in 0..20 {
        let mut kid = child("crash", &path, &user, &format!("r{round}"), 0);
        let stdout = kid.stdout.take().unwrap();
        let (tx, rx) = std::sync::mpsc::channel::<String>();
        let reader = std::thread::spawn(move || {
            for line in BufReader::new(stdout).lines() {
                let Ok(line) = line else { break };
                if let Some(k) = line.strip_prefix("ACK ")
                    && tx.send(k.to_string()).is_err()
                {
                    break;
                }
            }
        });
        // Wait for the child to be consuming, then kill it at a random moment.
        let first = rx.recv_timeout(std::time::Duration::from_secs(30)).expect("child started consuming");
        rng ^= rng << 13;
        rng ^= rng >> 7;
        rng ^= rng << 17;
        std::thread::sleep(std::time::Duration::from_micros(rng % 60_000));
        kid.kill().unwrap(); // SIGKILL
        kid.wait().unwrap();
        reader.join().unwrap();
        let mut acked = vec![first];
        acked.extend(rx.try_iter());
        total_acked += acked.len();
        let tally = Tally::open(&path, proc_config()).unwrap();
        for k in &acked {
            assert_eq!(tally.event_status(&user, k).unwrap(), EventStatus::Pending, "round {round}: acknowledged event {k} lost");
        }
        assert_counters_match_ledger(&tally, &path, &user);
    }
    assert!(total_acked >= 20);
}
