//! Protocol 2 on the device: device tokens (signed with a real Ed25519 key), deciding hard
//! pools against this device's lease, want/release/recall, voids, and the V6 migration.

mod common;

use chrono::{DateTime, Duration, Utc};
use common::*;
use serde_json::{Value, json};
use std::sync::{Arc, Mutex};
use tally_core::lease::{Lease, Share};
use tally_core::{Entitlements, Error, EventStatus, Period, Reason, Tally, UsageMeta};

const NOW: &str = "2026-01-15T12:00:00Z";

/// A device token for `sub-1` on `did`, issued at the test clock's start.
fn token(did: &str, ver: u64, leases: Vec<Lease>) -> String {
    let now = t(NOW);
    let ent = Entitlements::free().resolve(&catalog(), now, Duration::days(3));
    device_token(ent, did, ver, (now, now + Duration::hours(1)), leases)
}

fn lease(feature: &str, period: Period, start: Option<&str>, allowance: u64, consumed: u64) -> Lease {
    Lease {
        feature: feature.into(),
        period,
        period_start: start.map(t),
        allowance,
        released: 0,
        consumed,
        share: Share::from_f64(0.5).unwrap(),
        expires_at: None,
    }
}

fn chat(allowance: u64, consumed: u64) -> Lease {
    lease("ai_chat", Period::Month, Some("2026-01-01T00:00:00Z"), allowance, consumed)
}

/// A fake server answering every request with `answer(request)` plus `token` when set.
struct Server {
    fake: FakeServer,
    next: Arc<Mutex<Value>>,
}

fn server() -> Server {
    let next: Arc<Mutex<Value>> = Arc::new(Mutex::new(json!({})));
    let n = next.clone();
    let fake = FakeServer::start(move |_, req| {
        let mut a = accept_all(req);
        for (k, v) in n.lock().unwrap().as_object().unwrap() {
            // A recall is asked once: the request carrying the release answers it.
            if k == "recall" && req.get("release").is_some() {
                continue;
            }
            a[k] = v.clone();
        }
        (200, a)
    });
    Server { fake, next }
}

impl Server {
    fn answer(&self, v: Value) {
        *self.next.lock().unwrap() = v;
    }
}

fn env() -> (Env, String) {
    signed_in_env()
}

fn total(feature: &str, used: u64) -> Value {
    json!({"feature": feature, "period": "month", "period_start": "2026-01-01T00:00:00Z", "period_end": "2026-02-01T00:00:00Z",
           "used": used, "limit": 5, "remaining": 5u64.saturating_sub(used), "over_limit_by": 0})
}

async fn sync_with(e: &Env, u: &str, s: &Server, token: String, extra: Value) -> tally_core::SyncReport {
    let mut a = json!({"entitlements_token": token});
    for (k, v) in extra.as_object().unwrap() {
        a[k] = v.clone();
    }
    s.answer(a);
    e.tally.sync(u, s.fake.options()).await.expect("sync")
}

fn one(e: &Env, u: &str, f: &str) -> tally_core::Decision {
    e.tally.consume(u, f, 1, UsageMeta::default()).unwrap()
}

#[tokio::test]
async fn hard_pools_decide_against_the_lease_then_the_account() {
    let (e, u) = env();
    let s = server();
    let r = sync_with(&e, &u, &s, token("dev-test", 1, vec![chat(3, 1)]), json!({"totals": [total("ai_chat", 1)]})).await;
    assert!(r.entitlements_updated);
    assert_eq!(s.fake.requests()[0]["protocol"], 2);
    let c = e.tally.check(&u, "ai_chat", 1).unwrap();
    assert_eq!((c.allowed, c.device_remaining, c.remaining), (true, Some(2), Some(4)), "consumed 1 of 3 on this device");
    let d = one(&e, &u, "ai_chat");
    assert_eq!((d.allowed, d.device_remaining, d.used), (true, Some(1), 2));
    let d = one(&e, &u, "ai_chat");
    assert_eq!((d.allowed, d.device_remaining), (true, Some(0)), "consumed 1 + 2 pending leased = 3");
    let d = one(&e, &u, "ai_chat");
    assert_eq!((d.allowed, d.reason, d.device_remaining, d.used, d.remaining), (false, Reason::LeaseExhausted, Some(0), 3, Some(2)));
    assert_eq!(e.tally.pending_events(&u).unwrap(), 2, "nothing recorded by the refused use");
    let usage = e.tally.usage(&u, "ai_chat").unwrap();
    assert_eq!((usage.device_allowance, usage.device_remaining, usage.remaining), (Some(3), Some(0), Some(2)));
    let st = e.tally.leases(&u).unwrap();
    assert_eq!(st.len(), 1);
    assert_eq!((st[0].allowance, st[0].used, st[0].remaining, st[0].share), (3, 3, 0, 0.5));

    // Acknowledged: the pending leased units become the server's `consumed`; the account is
    // full now, so the refusal is the account's.
    let r = sync_with(&e, &u, &s, token("dev-test", 2, vec![chat(9, 3)]), json!({"totals": [total("ai_chat", 5)]})).await;
    assert_eq!(r.events_acked, 2);
    let ev = &s.fake.requests()[1]["events"];
    assert_eq!(ev[0]["lease_ver"], 1, "a leased use carries the lease_ver it was decided under");
    assert_eq!(s.fake.requests()[1]["lease_ver"], 1, "the request acknowledges the stored token");
    let d = one(&e, &u, "ai_chat");
    assert_eq!((d.allowed, d.reason, d.device_remaining), (false, Reason::LimitReached, Some(6)));
}

#[tokio::test]
async fn a_negative_stored_lease_figure_is_an_error_never_room() {
    for (column, table) in [("consumed", "leases"), ("released", "leases"), ("units", "lease_releases")] {
        let (e, u) = env();
        let s = server();
        sync_with(&e, &u, &s, token("dev-test", 1, vec![chat(3, 3)]), json!({"totals": [total("ai_chat", 3)]})).await;
        assert_eq!(one(&e, &u, "ai_chat").reason, Reason::LeaseExhausted, "the lease is spent");
        if table == "lease_releases" {
            e.raw()
                .execute("INSERT INTO lease_releases (user_id, feature, period_start, units) SELECT user_id, feature, period_start, 0 FROM leases", [])
                .unwrap();
        }
        // The file is corrupted behind the library's back: a figure below zero.
        e.raw().execute(&format!("UPDATE {table} SET {column} = -100"), []).unwrap();
        let before = e.snapshot();
        let place = format!("{table}.{column}");
        for r in [e.tally.consume(&u, "ai_chat", 1, UsageMeta::default()), e.reopen().consume(&u, "ai_chat", 1, UsageMeta::default())] {
            match r {
                Err(Error::Storage(err)) => assert!(err.to_string().contains(&place), "{err} names {place}"),
                other => panic!("{place}: expected a storage error, got {other:?}"),
            }
        }
        assert_eq!(e.snapshot(), before, "{place}: nothing recorded");
    }
}

#[tokio::test]
async fn a_stored_share_outside_zero_to_one_is_an_error_never_room() {
    // Above 1 it was clamped to the whole limit of a window entered offline; below 0, read as 0.
    for share in [5_000_000i64, -1] {
        let (e, u) = env();
        let s = server();
        sync_with(&e, &u, &s, token("dev-test", 1, vec![chat(3, 0)]), json!({"totals": [total("ai_chat", 0)]})).await;
        e.raw().execute("UPDATE leases SET share = ?1", [share]).unwrap();
        let before = e.snapshot();
        let results = [e.tally.consume(&u, "ai_chat", 1, UsageMeta::default()), e.reopen().consume(&u, "ai_chat", 1, UsageMeta::default())];
        for r in results {
            match r {
                Err(Error::Storage(err)) => assert!(err.to_string().contains("leases.share"), "{err} names leases.share"),
                other => panic!("share {share}: expected a storage error, got {other:?}"),
            }
        }
        assert!(matches!(e.tally.leases(&u), Err(Error::Storage(_))), "share {share}: the lease status is an error too");
        assert_eq!(e.snapshot(), before, "share {share}: nothing recorded");
    }
}

#[tokio::test]
async fn tokens_of_another_device_or_older_lease_ver_are_ignored() {
    let (e, u) = env();
    let s = server();
    sync_with(&e, &u, &s, token("dev-test", 5, vec![chat(3, 0)]), json!({})).await;
    let r = sync_with(&e, &u, &s, token("other-device", 9, vec![chat(5, 0)]), json!({})).await;
    assert!(!r.entitlements_updated);
    let r = sync_with(&e, &u, &s, token("dev-test", 4, vec![chat(5, 0)]), json!({})).await;
    assert!(!r.entitlements_updated);
    assert_eq!(e.tally.usage(&u, "ai_chat").unwrap().device_allowance, Some(3), "still the lease of version 5");
    let r = sync_with(&e, &u, &s, token("dev-test", 5, vec![chat(4, 0)]), json!({})).await;
    assert!(r.entitlements_updated, "the same version is stored again");
    assert_eq!(e.tally.usage(&u, "ai_chat").unwrap().device_allowance, Some(4));
    assert_eq!(e.tally.lease_request(&u).unwrap().lease_ver, Some(5));
}

#[tokio::test]
async fn no_entry_means_zero_and_a_new_window_gets_share_times_limit() {
    let (e, u) = env();
    let s = server();
    let hourly = lease("hourly", Period::Hour, Some("2026-01-15T12:00:00Z"), 4, 4);
    sync_with(&e, &u, &s, token("dev-test", 1, vec![chat(3, 0), hourly]), json!({})).await;
    let d = one(&e, &u, "daily");
    assert_eq!((d.allowed, d.reason, d.device_remaining), (false, Reason::LeaseExhausted, Some(0)), "a hard pool without an entry");
    let d = one(&e, &u, "notes");
    assert!(d.allowed && d.device_remaining.is_none(), "soft rules need no lease");
    assert_eq!(one(&e, &u, "hourly").reason, Reason::LeaseExhausted, "the hour's lease is used up");
    // The next hour, offline: no entry for the window; share 0.5 of the limit 4 = 2.
    e.clock.set(t("2026-01-15T13:30:00Z"));
    assert!(one(&e, &u, "hourly").allowed);
    let d = one(&e, &u, "hourly");
    assert_eq!((d.allowed, d.device_remaining), (true, Some(0)));
    assert_eq!(one(&e, &u, "hourly").reason, Reason::LeaseExhausted);
    assert_eq!(e.tally.usage(&u, "hourly").unwrap().device_allowance, Some(2));
}

#[tokio::test]
async fn leases_end_at_lease_until_or_the_token_grace() {
    let (e, u) = env();
    let s = server();
    sync_with(
        &e,
        &u,
        &s,
        token("dev-test", 1, vec![chat(3, 0), lease("weekly", Period::Week, Some("2026-01-12T00:00:00Z"), 10, 0)]),
        json!({}),
    )
    .await;
    assert!(one(&e, &u, "weekly").allowed);
    // exp = +1 h, grace 3 days, lease_until = +2 days: the lease ends first.
    e.clock.set(t(NOW) + Duration::days(2));
    let d = one(&e, &u, "weekly");
    assert_eq!((d.reason, d.device_remaining), (Reason::LeaseExhausted, Some(0)));
    assert_eq!(e.tally.leases(&u).unwrap()[1].allowance, 0);
}

#[tokio::test]
async fn the_token_grace_ends_leases_before_lease_until() {
    let (e, u) = {
        let e = Env::with(|c| {
            c.server_keys = Some(SERVER_KEYS.into());
            c.token_grace = Duration::hours(1);
        });
        let u = e.tally.sign_in(tally_core::Profile { external_id: "sub-1".into(), ..Default::default() }, None).unwrap();
        (e, u.id)
    };
    let s = server();
    sync_with(&e, &u, &s, token("dev-test", 1, vec![chat(3, 0)]), json!({})).await;
    e.clock.set(t(NOW) + Duration::minutes(119));
    assert!(one(&e, &u, "ai_chat").allowed);
    e.clock.set(t(NOW) + Duration::minutes(121));
    // After exp + grace the token's free rules apply; the lease is over too.
    assert_eq!(e.tally.usage(&u, "ai_chat").unwrap().device_allowance, Some(0));
}

#[tokio::test]
async fn credits_leases_end_at_expires_at() {
    let (e, u) = env();
    let s = server();
    let mut credits = lease("$credits", Period::Lifetime, None, 30, 0);
    credits.expires_at = Some(t(NOW) + Duration::hours(1));
    let grants = json!([{"id": "g1", "remaining": 100, "expires_at": null, "source": "admin"}]);
    let _ = grants;
    sync_with(&e, &u, &s, token("dev-test", 1, vec![credits]), json!({})).await;
    // The token carries no credit grants: the account check fails first (insufficient).
    let d = e.tally.check(&u, "images", 1).unwrap();
    assert_eq!((d.reason, d.device_remaining), (Reason::InsufficientCredits, Some(30)));
    let st = e.tally.leases(&u).unwrap();
    assert_eq!((st[0].feature.as_str(), st[0].allowance, st[0].expires_at), ("$credits", 30, Some(t(NOW) + Duration::hours(1))));
    e.clock.set(t(NOW) + Duration::hours(2));
    assert_eq!(e.tally.leases(&u).unwrap()[0].allowance, 0, "after expires_at: 0 until the next sync");
    assert_eq!(e.tally.check(&u, "images", 1).unwrap().device_remaining, Some(0));
}

#[tokio::test]
async fn want_and_release_lists_and_recall() {
    let e = Env::with(|c| {
        c.server_keys = Some(SERVER_KEYS.into());
        c.offline_features = vec!["weekly".into(), "notes".into()];
    });
    let u = e.tally.sign_in(tally_core::Profile { external_id: "sub-1".into(), ..Default::default() }, None).unwrap().id;
    // prepare_offline: validated, nothing stored on error.
    assert!(matches!(e.tally.prepare_offline(&u, "ai_chat", 0), Err(Error::InvalidInput(_))));
    assert!(matches!(e.tally.prepare_offline(&u, "nope", 1), Err(Error::InvalidInput(_))));
    assert!(matches!(e.tally.prepare_offline(&u, "notes", 1), Err(Error::InvalidInput(_))), "soft: not a hard pool");
    assert!(matches!(e.tally.prepare_offline(&u, "export", 1), Err(Error::InvalidInput(_))), "a flag");
    assert!(matches!(e.tally.prepare_offline("no-user", "ai_chat", 1), Err(Error::NotFound(_))));
    assert_eq!(count(&e.raw(), "SELECT COUNT(*) FROM lease_wants WHERE user_id = ?1", &u), 0);
    let r = e.tally.lease_request(&u).unwrap();
    let week = Some(t("2026-01-12T00:00:00Z"));
    assert_eq!(r.want.iter().map(|w| (w.feature.as_str(), w.period_start, w.units)).collect::<Vec<_>>(), [("weekly", week, 0)]);
    e.tally.prepare_offline(&u, "ai_chat", 4).unwrap();
    e.tally.consume(&u, "daily", 1, UsageMeta::default()).unwrap();
    let r = e.tally.lease_request(&u).unwrap();
    let jan = Some(t("2026-01-01T00:00:00Z"));
    let day = Some(t("2026-01-15T00:00:00Z"));
    assert_eq!(
        r.want.iter().map(|w| (w.feature.as_str(), w.period_start, w.units)).collect::<Vec<_>>(),
        [("ai_chat", jan, 4), ("daily", day, 0), ("weekly", week, 0)]
    );
    assert!(r.release.is_empty() && r.lease_ver.is_none());

    // A token granting 4 unused clears the want; a recall of 5 releases only the 2 unused.
    let s = server();
    sync_with(&e, &u, &s, token("dev-test", 1, vec![chat(6, 2)]), json!({})).await;
    assert_eq!(count(&e.raw(), "SELECT COUNT(*) FROM lease_wants WHERE user_id = ?1", &u), 0);
    let recall = json!({"recall": [{"feature": "ai_chat", "period_start": "2026-01-01T00:00:00Z", "units": 3}]});
    s.answer(json!({"entitlements_token": token("dev-test", 1, vec![chat(6, 2)])}));
    let mut a = json!({"entitlements_token": token("dev-test", 1, vec![chat(6, 2)])});
    a["recall"] = recall["recall"].clone();
    s.answer(a);
    let before = s.fake.requests().len();
    e.tally.sync(&u, s.fake.options()).await.unwrap();
    let reqs = s.fake.requests();
    // Round 1 (pull) gets the recall; the extra round sends the release at once.
    assert!(reqs.len() >= before + 2, "a release round follows the recall");
    assert_eq!(reqs[before + 1]["release"], json!([{"feature": "ai_chat", "period_start": "2026-01-01T00:00:00Z", "units": 3}]));
    assert_eq!(e.tally.usage(&u, "ai_chat").unwrap().device_allowance, Some(3), "6 − 3 released here");
    assert!(e.tally.lease_request(&u).unwrap().release.is_empty(), "acknowledged releases are not resent");
}

#[tokio::test]
async fn release_leases_gives_back_everything_unused_with_a_final_sync() {
    let (e, u) = env();
    let s = server();
    sync_with(&e, &u, &s, token("dev-test", 1, vec![chat(4, 1)]), json!({})).await;
    one(&e, &u, "ai_chat");
    s.answer(json!({}));
    e.tally.release_leases(&u, s.fake.options()).await.unwrap();
    let first = &s.fake.requests()[1];
    assert_eq!(first["final"], true);
    assert!(first.get("want").is_none());
    assert_eq!(first["release"][0]["units"], 2, "4 − 1 consumed − 1 pending");
    assert_eq!(e.tally.usage(&u, "ai_chat").unwrap().device_remaining, Some(0));
    // sign_out drops the rows: allowance 0 afterwards.
    e.tally.sign_out(&u).unwrap();
    assert!(e.tally.leases(&u).unwrap().is_empty());
    assert!(matches!(e.tally.sign_out("no-user"), Err(Error::NotFound(_))));
}

#[tokio::test]
async fn units_released_before_an_unreachable_final_sync_are_never_spent() {
    let (e, u) = env();
    let s = server();
    sync_with(&e, &u, &s, token("dev-test", 1, vec![chat(4, 0)]), json!({})).await;
    assert!(one(&e, &u, "ai_chat").allowed, "the lease holds 4");
    // The release is written before it is sent: even when the server cannot be reached, the
    // device no longer decides against what it gave back (decisions read a cached view).
    let mut unreachable = s.fake.options();
    unreachable.server_url = "http://127.0.0.1:9".into();
    unreachable.retry.max_attempts = 1;
    assert!(e.tally.release_leases(&u, unreachable).await.is_err());
    let d = one(&e, &u, "ai_chat");
    assert_eq!((d.allowed, d.reason, d.device_remaining), (false, tally_core::Reason::LeaseExhausted, Some(0)));
}

#[tokio::test]
async fn void_takes_a_use_out_of_its_window_and_gives_the_lease_back() {
    let (e, u) = env();
    let s = server();
    sync_with(&e, &u, &s, token("dev-test", 1, vec![chat(2, 0)]), json!({})).await;
    e.tally.consume(&u, "ai_chat", 1, key("a")).unwrap();
    e.tally.consume(&u, "ai_chat", 1, key("b")).unwrap();
    assert_eq!(one(&e, &u, "ai_chat").reason, Reason::LeaseExhausted);
    let snap = e.snapshot();
    assert!(matches!(e.tally.void(&u, "nope", None), Err(Error::NotFound(_))));
    assert!(matches!(e.tally.void("other-user", "a", None), Err(Error::NotFound(_))));
    assert_eq!(e.snapshot(), snap, "a failed void changes nothing");
    e.tally.void(&u, "a", Some("refunded")).unwrap();
    e.tally.void(&u, "a", Some("again")).unwrap();
    assert_eq!(e.tally.pending_events(&u).unwrap(), 3, "one void event only");
    let usage = e.tally.usage(&u, "ai_chat").unwrap();
    assert_eq!((usage.used, usage.device_remaining), (1, Some(1)), "counters and allowance restored");
    // The void is sent as {id, voids, occurred_at, device_seq, metadata}.
    s.answer(json!({"entitlements_token": token("dev-test", 2, vec![chat(2, 1)])}));
    e.tally.sync(&u, s.fake.options()).await.unwrap();
    let sent = s.fake.requests()[1]["events"].as_array().unwrap().clone();
    let v = sent.iter().find(|e| e.get("voids").is_some()).expect("void sent");
    let mut keys: Vec<&String> = v.as_object().unwrap().keys().collect();
    keys.sort();
    assert_eq!(keys, ["device_seq", "id", "metadata", "occurred_at", "voids"]);
    assert_eq!(v["metadata"], json!({"reason": "refunded"}));
    assert_eq!(v["voids"], json!(tally_core::ledger::event_id_for_key("a").to_string()));
    // Void of an acknowledged use: the units come back until the server counts the void.
    e.tally.void(&u, "b", None).unwrap();
    let usage = e.tally.usage(&u, "ai_chat").unwrap();
    assert_eq!((usage.device_remaining, usage.used), (Some(2), 0));
    let void_id: String =
        e.raw().query_row("SELECT id FROM events WHERE user_id = ?1 AND voids IS NOT NULL AND status = 0", [&u], |r| r.get(0)).unwrap();
    s.answer(json!({"rejected": [{"id": void_id, "reason": "unknown_event"}], "accepted": []}));
    e.tally.sync(&u, s.fake.options()).await.unwrap();
    assert_eq!(e.tally.event_status(&u, &void_id).unwrap(), EventStatus::Rejected("unknown_event".into()));
    assert!(matches!(e.tally.void(&u, &void_id, None), Err(Error::InvalidInput(_))), "a void is not voided");
}

#[test]
fn void_of_a_quarantined_use_is_refused() {
    let e = Env::new();
    let u = e.tally.create_local_user(None).unwrap().id;
    e.tally.consume(&u, "ai_chat", 2, key("x")).unwrap();
    let id = tally_core::ledger::event_id_for_key("x").to_string();
    e.raw().execute("UPDATE events SET status = 2, reject_reason = 'conflict' WHERE id = ?1", [&id]).unwrap();
    assert!(matches!(e.tally.void(&u, "x", None), Err(Error::InvalidInput(_))));
    // Local users (round 1): a void restores the counter too, and credits come back.
    e.tally.consume(&u, "ai_chat", 3, key("y")).unwrap();
    let before = e.tally.credit_balance(&u).unwrap();
    e.tally.consume(&u, "images", 2, key("img")).unwrap();
    assert_eq!(e.tally.credit_balance(&u).unwrap(), before - 20);
    e.tally.void(&u, "img", None).unwrap();
    assert_eq!(e.tally.credit_balance(&u).unwrap(), before, "the credits it drew return");
    let used = e.tally.usage(&u, "ai_chat").unwrap().used;
    e.tally.void(&u, "y", None).unwrap();
    assert_eq!(e.tally.usage(&u, "ai_chat").unwrap().used, used - 3);
    assert!(e.tally.usage(&u, "ai_chat").unwrap().device_allowance.is_none(), "round 1: no lease");
}

#[test]
fn decisions_read_counters_not_the_ledger() {
    // 10k pending events, then a decision: the lease path reads the counter row, one entry and
    // one release row (see `leases.rs`); here we check the answer is right and fast enough to
    // exclude a ledger scan in a debug build.
    let e = Env::new();
    let u = e.tally.create_local_user(None).unwrap().id;
    let items: Vec<tally_core::ConsumeItem> =
        (0..10_000).map(|_| tally_core::ConsumeItem { feature: "stars".into(), amount: 1, meta: UsageMeta::default() }).collect();
    e.tally.consume_many(&u, &items).unwrap();
    let c = e.raw();
    c.execute(
        "UPDATE users SET leases_held = 1, lease_ver = 1, lease_exp = ?2, lease_until = ?2 WHERE id = ?1",
        rusqlite::params![u, (t(NOW) + Duration::days(1)).timestamp_millis()],
    )
    .unwrap();
    c.execute(
        "INSERT INTO leases (user_id, feature, period, period_start, allowance, share) VALUES (?1, 'ai_chat', 'month', ?2, 2, 500000)",
        rusqlite::params![u, t("2026-01-01T00:00:00Z").timestamp_millis()],
    )
    .unwrap();
    let reopened = e.reopen();
    let start = std::time::Instant::now();
    for _ in 0..200 {
        assert!(reopened.check(&u, "ai_chat", 1).unwrap().allowed);
    }
    assert_eq!(reopened.check(&u, "ai_chat", 3).unwrap().reason, Reason::LeaseExhausted);
    assert!(start.elapsed() < std::time::Duration::from_secs(2), "{:?}", start.elapsed());
}

#[test]
fn a_v5_database_migrates_without_losing_rows() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("v5.db");
    {
        let mut c = rusqlite::Connection::open(&path).unwrap();
        tally_core::db::migrate_to(&mut c, 5).unwrap();
        c.execute("INSERT INTO device (singleton, device_id, seq) VALUES (1, 'dev-test', 2)", []).unwrap();
        c.execute("INSERT INTO users (id, created_at, updated_at) VALUES ('u1', 0, 0)", []).unwrap();
        for (i, id) in ["0193aaaa-0000-7000-8000-000000000001", "0193aaaa-0000-7000-8000-000000000002"].iter().enumerate() {
            c.execute(
                "INSERT INTO events (user_id, id, feature, amount, occurred_at, device_id, device_seq, decision, status) VALUES ('u1', ?1, 'ai_chat', 2, ?2, 'dev-test', ?3, '', ?4)",
                rusqlite::params![id, t(NOW).timestamp_millis(), i as i64 + 1, i as i64],
            )
            .unwrap();
        }
    }
    let clock = Arc::new(tally_core::ManualClock::new(t(NOW)));
    let tl = Tally::open(&path, tally_core::Config { device_id: Some("dev-test".into()), clock, catalog: catalog(), ..Default::default() })
        .unwrap();
    assert_eq!(tl.pending_events("u1").unwrap(), 1);
    assert_eq!(tl.event_status("u1", "0193aaaa-0000-7000-8000-000000000002").unwrap(), EventStatus::Settled);
    assert_eq!(tl.usage("u1", "ai_chat").unwrap().used, 2, "counters rebuilt from the moved rows");
    let c = rusqlite::Connection::open(&path).unwrap();
    assert_eq!(tally_core::db::current_version(&c).unwrap(), tally_core::db::latest_version());
    assert!(c.execute("INSERT INTO events (user_id, id, feature, amount, occurred_at, device_id, device_seq, decision) VALUES ('u1', 'z', 'f', 0, 0, 'd', 9, '')", []).is_err(), "amount 0 only for a void");
}

#[tokio::test]
async fn a_changed_device_id_drops_the_old_ids_leases() {
    let (e, u) = env();
    let s = server();
    sync_with(&e, &u, &s, token("dev-test", 7, vec![chat(3, 0)]), json!({})).await;
    drop(e.tally);
    let config = tally_core::Config {
        device_id: Some("dev-new".into()),
        clock: e.clock.clone(),
        catalog: catalog(),
        server_keys: Some(SERVER_KEYS.into()),
        ..Default::default()
    };
    let tl = Tally::open(&e.path, config).unwrap();
    assert!(tl.leases(&u).unwrap().is_empty(), "the old id's leases are gone (the server reclaims them at lease_until)");
    assert_eq!(tl.check(&u, "ai_chat", 1).unwrap().reason, Reason::LeaseExhausted, "allowance 0 until a token of the new id");
    assert_eq!(tl.lease_request(&u).unwrap().lease_ver, None, "a new id starts at any lease_ver");
    let _: DateTime<Utc> = t(NOW);
}

#[tokio::test]
async fn a_batch_counts_its_own_leased_units_and_bad_voids_change_nothing() {
    let (e, u) = env();
    let s = server();
    sync_with(&e, &u, &s, token("dev-test", 1, vec![chat(2, 0)]), json!({})).await;
    let items: Vec<tally_core::ConsumeItem> =
        (0..3).map(|_| tally_core::ConsumeItem { feature: "ai_chat".into(), amount: 1, meta: UsageMeta::default() }).collect();
    let reasons: Vec<Reason> = e.tally.consume_many(&u, &items).unwrap().into_iter().map(|d| d.reason).collect();
    assert_eq!(reasons, [Reason::Ok, Reason::Ok, Reason::LeaseExhausted]);
    let snap = e.snapshot();
    let id: String = e.raw().query_row("SELECT id FROM events WHERE user_id = ?1 LIMIT 1", [&u], |r| r.get(0)).unwrap();
    let huge = "x".repeat(5000);
    assert!(matches!(e.tally.void(&u, &id, Some(&huge)), Err(Error::InvalidInput(_))), "metadata over 4 KiB");
    assert!(matches!(e.tally.void(&u, &id, Some("a\0b")), Err(Error::InvalidInput(_))));
    assert_eq!(e.snapshot(), snap);
}

fn spend(allowance: u64, consumed: u64) -> Lease {
    lease("ai_spend", Period::Day, Some("2026-01-15T00:00:00Z"), allowance, consumed)
}

fn items(chat: u64, micros: u64) -> Vec<tally_core::UseItem> {
    vec![
        tally_core::UseItem { feature: "ai_chat".into(), amount: chat, ..Default::default() },
        tally_core::UseItem { feature: "ai_spend".into(), amount: micros, ..Default::default() },
    ]
}

#[tokio::test]
async fn each_hard_item_of_a_use_needs_room_in_its_own_lease() {
    let (e, u) = env();
    let s = server();
    sync_with(&e, &u, &s, token("dev-test", 1, vec![chat(2, 0), spend(800, 0)]), json!({})).await;
    let out = e.tally.consume_items(&u, Some("call-1"), &items(1, 600), None).unwrap();
    assert!(out.allowed);
    assert_eq!((out.decisions[0].device_remaining, out.decisions[1].device_remaining), (Some(1), Some(200)));
    // The account's budget (1000 micros) has room for 300 more; this device's lease (800) not.
    let snap = e.snapshot();
    let out = e.tally.consume_items(&u, Some("call-2"), &items(1, 300), None).unwrap();
    assert!(!out.allowed);
    assert_eq!((out.decisions[1].reason, out.decisions[1].device_remaining), (Reason::LeaseExhausted, Some(200)));
    assert_eq!(e.snapshot(), snap, "the call item is not recorded either");
    assert_eq!(e.tally.usage(&u, "ai_chat").unwrap().device_remaining, Some(1));
    // Two items of one use count in their pools cumulatively: the chat lease holds 1 more.
    let out = e.tally.consume_items(&u, Some("call-3"), &items(2, 100), None).unwrap();
    assert_eq!((out.allowed, out.decisions[0].reason), (false, Reason::LeaseExhausted));
    assert!(e.tally.consume_items(&u, Some("call-4"), &items(1, 200), None).unwrap().allowed);
}

#[tokio::test]
async fn items_travel_as_separate_events_and_a_void_of_the_use_as_one() {
    let (e, u) = env();
    let s = server();
    sync_with(&e, &u, &s, token("dev-test", 1, vec![chat(2, 0), spend(800, 0)]), json!({})).await;
    let out = e.tally.consume_items(&u, Some("call-1"), &items(1, 600), Some(json!({"request": "r1"}))).unwrap();
    let use_id = out.use_id;
    s.answer(json!({}));
    e.tally.sync(&u, s.fake.options()).await.unwrap();
    let sent = s.fake.requests()[1]["events"].as_array().unwrap().clone();
    assert_eq!(sent.len(), 2, "{sent:?}");
    for (ev, (feature, amount)) in sent.iter().zip([("ai_chat", 1), ("ai_spend", 600)]) {
        assert_eq!(ev["id"], json!(tally_core::contract::item_event_id(use_id, feature).to_string()));
        assert_eq!((ev["feature"].as_str(), ev["amount"].as_u64()), (Some(feature), Some(amount)));
        assert_eq!(ev["use_id"], json!(use_id.to_string()));
        assert_eq!(ev["metadata"], json!({"request": "r1"}));
        assert!(ev["lease_ver"].is_u64(), "decided under the lease");
    }
    assert_eq!(e.tally.pending_events(&u).unwrap(), 0);
    // A void of the (acknowledged) use: both pools get their units back at once.
    e.tally.void(&u, "call-1", Some("refunded")).unwrap();
    assert_eq!(e.tally.usage(&u, "ai_chat").unwrap().device_remaining, Some(2));
    assert_eq!(e.tally.usage(&u, "ai_spend").unwrap().device_remaining, Some(800));
    assert_eq!(e.tally.pending_events(&u).unwrap(), 1, "one void event");
    // Even when a round holds one event, the void goes once, and its answer settles it whole.
    let mut one_at_a_time = s.fake.options();
    one_at_a_time.max_batch_events = 1;
    let report = e.tally.sync(&u, one_at_a_time).await.unwrap();
    assert_eq!((report.events_sent, report.events_acked), (1, 1));
    let sent = s.fake.requests()[2]["events"].as_array().unwrap().clone();
    assert_eq!(sent.len(), 1, "one void event on the wire: {sent:?}");
    let mut keys: Vec<&String> = sent[0].as_object().unwrap().keys().collect();
    keys.sort();
    assert_eq!(keys, ["device_seq", "id", "metadata", "occurred_at", "voids"]);
    assert_eq!(sent[0]["voids"], json!(use_id.to_string()));
    assert_eq!(sent[0]["metadata"], json!({"reason": "refunded"}));
    assert_eq!(e.tally.pending_events(&u).unwrap(), 0, "acknowledged by its one id");
    let void_id = sent[0]["id"].as_str().unwrap().to_string();
    assert_eq!(e.tally.event_status(&u, &void_id).unwrap(), EventStatus::Settled);
}

/// A server that takes every use and refuses every void (`void_not_allowed`).
fn refusing_voids() -> FakeServer {
    FakeServer::start(|_, req| {
        let events = req["events"].as_array().cloned().unwrap_or_default();
        let (voids, uses): (Vec<Value>, Vec<Value>) = events.into_iter().partition(|e| e.get("voids").is_some());
        let mut a = accept_all(req);
        a["accepted"] = json!(uses.iter().map(|e| e["id"].clone()).collect::<Vec<_>>());
        a["rejected"] = json!(voids.iter().map(|e| json!({"id": e["id"], "reason": "void_not_allowed"})).collect::<Vec<_>>());
        (200, a)
    })
}

#[tokio::test]
async fn a_refused_void_of_a_use_makes_every_item_count_again() {
    let (e, u) = env();
    let s = server();
    sync_with(&e, &u, &s, token("dev-test", 1, vec![chat(2, 0), spend(800, 0)]), json!({})).await;
    e.tally.consume_items(&u, Some("call-1"), &items(1, 600), None).unwrap();
    s.answer(json!({}));
    e.tally.sync(&u, s.fake.options()).await.unwrap();
    e.tally.void(&u, "call-1", None).unwrap();
    assert_eq!(e.tally.usage(&u, "ai_chat").unwrap().device_remaining, Some(2));
    assert_eq!(e.tally.pending_events(&u).unwrap(), 1, "one void event");
    // The server refuses the void of the acknowledged use: both items count again here.
    let fake = refusing_voids();
    let report = e.tally.sync(&u, fake.options()).await.unwrap();
    assert_eq!(report.rejected.len(), 1);
    assert_eq!(report.rejected[0].reason, "void_not_allowed");
    assert_eq!(e.tally.pending_events(&u).unwrap(), 0);
    assert_eq!(e.tally.usage(&u, "ai_chat").unwrap().device_remaining, Some(1));
    assert_eq!(e.tally.usage(&u, "ai_spend").unwrap().device_remaining, Some(200));
}

#[tokio::test]
async fn a_void_refused_in_the_round_that_acknowledges_its_use_gives_the_units_back_to_the_use() {
    let (e, u) = env();
    let s = server();
    sync_with(&e, &u, &s, token("dev-test", 1, vec![chat(3, 0), spend(800, 0)]), json!({})).await;
    e.tally.consume(&u, "ai_chat", 1, key("single")).unwrap();
    e.tally.void(&u, "single", None).unwrap();
    e.tally.consume_items(&u, Some("call-1"), &items(1, 600), None).unwrap();
    e.tally.void(&u, "call-1", None).unwrap();
    assert_eq!(e.tally.usage(&u, "ai_chat").unwrap().device_remaining, Some(3));
    // One round: the server takes both uses and refuses both voids.
    let fake = refusing_voids();
    let report = e.tally.sync(&u, fake.options()).await.unwrap();
    assert_eq!((report.events_acked, report.rejected.len()), (3, 2));
    assert_eq!(e.tally.usage(&u, "ai_chat").unwrap().device_remaining, Some(1), "both uses count in the lease again");
    assert_eq!(e.tally.usage(&u, "ai_spend").unwrap().device_remaining, Some(200));
}

/// The pools a device asks for are its own: uses the account's other devices made (the
/// server's totals) claim nothing here; a use its lease refused asks for the units refused on
/// the next sync, once.
#[tokio::test]
async fn a_device_wants_the_pools_it_used_or_was_refused_in_only() {
    let (e, u) = env();
    let s = server();
    // Other devices used 4 of ai_chat this month; this one holds nothing and used nothing.
    sync_with(&e, &u, &s, token("dev-test", 1, vec![chat(0, 0)]), json!({"totals": [total("ai_chat", 4)]})).await;
    assert_eq!(e.tally.usage(&u, "ai_chat").unwrap().used, 4);
    assert!(e.tally.lease_request(&u).unwrap().want.is_empty(), "others' uses are no claim of this device");
    // The app tries: refused by the lease, so the next sync asks for that many units.
    let d = e.tally.consume(&u, "ai_chat", 1, UsageMeta::default()).unwrap();
    assert_eq!((d.allowed, d.reason), (false, Reason::LeaseExhausted));
    let jan = Some(t("2026-01-01T00:00:00Z"));
    let want =
        |e: &Env| e.tally.lease_request(&u).unwrap().want.iter().map(|w| (w.feature.clone(), w.period_start, w.units)).collect::<Vec<_>>();
    assert_eq!(want(&e), [("ai_chat".to_string(), jan, 1)]);
    sync_with(&e, &u, &s, token("dev-test", 2, vec![chat(0, 0)]), json!({"totals": [total("ai_chat", 4)]})).await;
    let sent = s.fake.requests().last().unwrap()["want"].clone();
    assert_eq!(sent, json!([{"feature": "ai_chat", "period_start": "2026-01-01T00:00:00Z", "units": 1}]));
    assert!(want(&e).is_empty(), "asked once: a refused use asks again");
    // Its own leased use (acknowledged: the entry's consumed) claims the pool.
    sync_with(&e, &u, &s, token("dev-test", 3, vec![chat(2, 1)]), json!({"totals": [total("ai_chat", 5)]})).await;
    assert_eq!(want(&e), [("ai_chat".to_string(), jan, 0)]);
}
