//! Quota behaviour through the public API: hard and soft limits, budgets with model pricing,
//! credits, rate limits, flags, idempotent replays, batches, and a clock moved backwards.

mod common;
use chrono::Duration;
use common::*;
use rusqlite::Connection;
use tally_core::{ConsumeItem, CreditGrant, Entitlements, Error, Reason, SubscriptionStatus, UsageMeta};

fn pro() -> Entitlements {
    Entitlements { plan: "pro".into(), status: SubscriptionStatus::Active, ..Entitlements::free() }
}

fn events(e: &Env, user: &str) -> i64 {
    count(&e.raw(), "SELECT COUNT(*) FROM events WHERE user_id = ?1", user)
}

#[test]
fn hard_limit_denies_and_records_nothing() {
    let e = Env::new();
    let u = e.tally.create_local_user(None).unwrap().id;
    for i in 1..=5u64 {
        let d = e.tally.consume(&u, "ai_chat", 1, UsageMeta::default()).unwrap();
        assert!(d.allowed);
        assert_eq!((d.reason, d.used, d.limit, d.remaining), (Reason::Ok, i, Some(5), Some(5 - i)));
        assert_eq!(d.resets_at, Some(t("2026-02-01T00:00:00Z")));
        assert_eq!(d.access_reason, "free");
    }
    let d = e.tally.consume(&u, "ai_chat", 1, UsageMeta::default()).unwrap();
    assert!(!d.allowed);
    assert_eq!((d.reason, d.used, d.remaining, d.over_limit_by), (Reason::LimitReached, 5, Some(0), 0));
    let c = e.tally.check(&u, "ai_chat", 1).unwrap();
    assert_eq!((c.allowed, c.reason), (false, Reason::LimitReached));
    assert_eq!(events(&e, &u), 5);
    let usage = e.tally.usage(&u, "ai_chat").unwrap();
    assert_eq!((usage.used, usage.limit, usage.remaining, usage.over_limit_by), (5, Some(5), Some(0), 0));
    assert_eq!(usage.period_start, Some(t("2026-01-01T00:00:00Z")));
    // An amount that would cross the limit is denied as a whole.
    let v = e.tally.create_local_user(None).unwrap().id;
    e.tally.consume(&v, "ai_chat", 3, UsageMeta::default()).unwrap();
    let d = e.tally.consume(&v, "ai_chat", 3, UsageMeta::default()).unwrap();
    assert_eq!((d.allowed, d.reason, d.used), (false, Reason::LimitReached, 3));
    assert!(e.tally.check(&v, "ai_chat", 2).unwrap().allowed);
    // check changes nothing.
    assert_eq!(e.tally.usage(&v, "ai_chat").unwrap().used, 3);
}

#[test]
fn soft_limit_records_and_flags() {
    let e = Env::new();
    let u = e.tally.create_local_user(None).unwrap().id;
    for _ in 0..3 {
        assert_eq!(e.tally.consume(&u, "notes", 1, UsageMeta::default()).unwrap().reason, Reason::Ok);
    }
    let d = e.tally.consume(&u, "notes", 2, UsageMeta::default()).unwrap();
    assert!(d.allowed);
    assert_eq!((d.reason, d.used, d.remaining, d.over_limit_by), (Reason::OverLimitSoft, 5, Some(0), 2));
    let usage = e.tally.usage(&u, "notes").unwrap();
    assert_eq!((usage.used, usage.over_limit_by, usage.remaining), (5, 2, Some(0)));
    assert_eq!(events(&e, &u), 4);
    let c = e.tally.check(&u, "notes", 1).unwrap();
    assert_eq!((c.allowed, c.reason), (true, Reason::OverLimitSoft));
}

#[test]
fn budget_prices_models_records_over_and_denies_next_check() {
    let e = Env::new();
    let u = e.tally.create_local_user(None).unwrap().id;
    // 100 input tokens at 2.5 micros + 50 output at 10 micros = 750 micros of a 1000 budget.
    assert_eq!(e.tally.check(&u, "ai_spend", 800).unwrap().reason, Reason::Ok);
    let d = e.tally.consume(&u, "ai_spend", 1, ai("gpt-4o", 100, 50)).unwrap();
    assert_eq!((d.allowed, d.reason, d.used, d.remaining), (true, Reason::Ok, 750, Some(250)));
    let cost: i64 = e.raw().query_row("SELECT cost_micros FROM events WHERE user_id = ?1", [&u], |r| r.get(0)).unwrap();
    assert_eq!(cost, 750);
    // check takes the estimated micros.
    assert!(e.tally.check(&u, "ai_spend", 250).unwrap().allowed);
    let c = e.tally.check(&u, "ai_spend", 251).unwrap();
    assert_eq!((c.allowed, c.reason, c.used), (false, Reason::BudgetExceeded, 750));
    // consume always records (the tokens were spent) and answers budget_exceeded once over.
    let d = e.tally.consume(&u, "ai_spend", 1, ai("gpt-4o", 100, 50)).unwrap();
    assert_eq!((d.reason, d.used, d.over_limit_by, d.remaining), (Reason::BudgetExceeded, 1500, 500, Some(0)));
    assert_eq!(events(&e, &u), 2);
    let c = e.tally.check(&u, "ai_spend", 1).unwrap();
    assert_eq!((c.allowed, c.reason), (false, Reason::BudgetExceeded));
    let usage = e.tally.usage(&u, "ai_spend").unwrap();
    assert_eq!((usage.used, usage.over_limit_by, usage.limit), (1500, 500, Some(1000)));
    // Still over: recorded again.
    let d = e.tally.consume(&u, "ai_spend", 1, ai("gpt-4o", 10, 0)).unwrap();
    assert_eq!((d.reason, d.used), (Reason::BudgetExceeded, 1525));
    // An unpriced model is refused and recorded nothing.
    let d = e.tally.consume(&u, "ai_spend", 1, ai("gpt-9", 10, 10)).unwrap();
    assert_eq!((d.allowed, d.reason), (false, Reason::UnknownModel));
    assert_eq!(events(&e, &u), 3);
    // The daily budget resets at midnight.
    e.clock.set(t("2026-01-16T00:00:00Z"));
    let c = e.tally.check(&u, "ai_spend", 1000).unwrap();
    assert_eq!((c.allowed, c.used), (true, 0));
    // Without a model, the amount is micros.
    let d = e.tally.consume(&u, "ai_spend", 400, UsageMeta::default()).unwrap();
    assert_eq!(d.used, 400);
    // Report sums tokens and cost by model.
    let rows = e.tally.report(&u, t("2026-01-01T00:00:00Z"), t("2026-02-01T00:00:00Z"), tally_core::GroupBy::Model).unwrap();
    let gpt = rows.iter().find(|r| r.key == "gpt-4o").unwrap();
    assert_eq!((gpt.events, gpt.input_tokens, gpt.output_tokens, gpt.cost_micros), (3, 210, 100, 1525));
}

#[test]
fn credits_draw_fifo_by_expiry_and_refuse_when_short() {
    let e = Env::new();
    let u = e.tally.create_local_user(None).unwrap().id;
    let now = tally_core::Clock::now(&*e.clock);
    let ent = Entitlements {
        credit_grants: vec![
            CreditGrant { id: "a".into(), remaining: 30, expires_at: Some(now + Duration::days(10)), source: "promo".into() },
            CreditGrant { id: "b".into(), remaining: 50, expires_at: Some(now + Duration::days(5)), source: "plan".into() },
            CreditGrant { id: "c".into(), remaining: 100, expires_at: None, source: "purchase".into() },
        ],
        ..Entitlements::free()
    };
    e.tally.set_entitlements(&u, ent).unwrap();
    // The free plan also includes 100 credits this billing window (expiring at its end, after
    // grants a and b, before the never-expiring c).
    assert_eq!(e.tally.credit_balance(&u).unwrap(), 280);
    let d = e.tally.consume(&u, "images", 2, UsageMeta::default()).unwrap(); // 20 credits
    assert_eq!((d.allowed, d.reason, d.used, d.remaining), (true, Reason::Ok, 20, Some(260)));
    e.tally.consume(&u, "images", 4, UsageMeta::default()).unwrap(); // 40: b 30 -> 0, a 30 -> 20
    let grants = e.tally.entitlements(&u).unwrap().credit_grants;
    let rem = |id: &str| grants.iter().find(|g| g.id == id).unwrap().remaining;
    assert_eq!((rem("a"), rem("b"), rem("c")), (20, 0, 100));
    assert_eq!(grants.iter().filter(|g| g.id.starts_with("included:free:")).map(|g| g.remaining).sum::<i64>(), 100);
    assert_eq!(e.tally.credit_balance(&u).unwrap(), 220);
    assert_eq!(e.tally.entitlements(&u).unwrap().credit_balance, 220);
    let d = e.tally.consume(&u, "images", 23, UsageMeta::default()).unwrap();
    assert_eq!((d.allowed, d.reason), (false, Reason::InsufficientCredits));
    assert_eq!(e.tally.check(&u, "images", 22).unwrap().reason, Reason::Ok);
    assert_eq!(events(&e, &u), 2);
    let usage = e.tally.usage(&u, "images").unwrap();
    assert_eq!(usage.remaining, Some(220));
    // Grant a expires: its 20 are gone; the plan's 100 and c's 100 remain.
    e.clock.advance(Duration::days(11));
    assert_eq!(e.tally.credit_balance(&u).unwrap(), 200);
    assert_eq!(e.tally.check(&u, "images", 21).unwrap().reason, Reason::InsufficientCredits);
    assert!(e.tally.consume(&u, "images", 20, UsageMeta::default()).unwrap().allowed);
    assert_eq!(e.tally.credit_balance(&u).unwrap(), 0);
}

#[test]
fn rate_limit_and_a_clock_moved_backwards() {
    let e = Env::at("2026-01-15T12:00:10Z");
    let u = e.tally.create_local_user(None).unwrap().id;
    for _ in 0..3 {
        assert!(e.tally.consume(&u, "api", 1, UsageMeta::default()).unwrap().allowed);
    }
    let d = e.tally.consume(&u, "api", 1, UsageMeta::default()).unwrap();
    assert_eq!((d.allowed, d.reason, d.resets_at), (false, Reason::RateLimited, Some(t("2026-01-15T12:01:00Z"))));
    // Moving the clock back does not open a fresh window.
    e.clock.set(t("2026-01-15T11:00:00Z"));
    assert_eq!(e.tally.consume(&u, "api", 1, UsageMeta::default()).unwrap().reason, Reason::RateLimited);
    assert_eq!(e.tally.check(&u, "api", 1).unwrap().reason, Reason::RateLimited);
    // Real time passing does.
    e.clock.set(t("2026-01-15T12:01:00Z"));
    assert!(e.tally.consume(&u, "api", 3, UsageMeta::default()).unwrap().allowed);
    assert_eq!(e.tally.consume(&u, "api", 1, UsageMeta::default()).unwrap().reason, Reason::RateLimited);
}

#[test]
fn a_clock_moved_backwards_never_reopens_a_past_period() {
    let e = Env::at("2026-01-31T23:00:00Z");
    let u = e.tally.create_local_user(None).unwrap().id;
    e.tally.consume(&u, "ai_chat", 5, UsageMeta::default()).unwrap();
    assert_eq!(e.tally.check(&u, "ai_chat", 1).unwrap().reason, Reason::LimitReached);
    e.clock.set(t("2026-02-01T00:30:00Z"));
    let d = e.tally.consume(&u, "ai_chat", 2, UsageMeta::default()).unwrap();
    assert_eq!((d.allowed, d.used), (true, 2));
    // Back to January: the device stays in February.
    e.clock.set(t("2026-01-20T00:00:00Z"));
    let usage = e.tally.usage(&u, "ai_chat").unwrap();
    assert_eq!((usage.used, usage.period_start), (2, Some(t("2026-02-01T00:00:00Z"))));
    let d = e.tally.consume(&u, "ai_chat", 1, UsageMeta::default()).unwrap();
    assert_eq!(d.used, 3);
    let at: i64 = e.raw().query_row("SELECT MAX(occurred_at) FROM events WHERE user_id = ?1", [&u], |r| r.get(0)).unwrap();
    assert!(at >= t("2026-02-01T00:30:00Z").timestamp_millis(), "occurred_at is never before the highest time seen");
    assert_eq!(e.tally.highest_seen_time(), t("2026-02-01T00:30:00Z"));
    // The highest time seen survives a reopen.
    let again = e.reopen();
    assert_eq!(again.usage(&u, "ai_chat").unwrap().period_start, Some(t("2026-02-01T00:00:00Z")));
}

#[test]
fn a_check_at_a_later_time_is_also_remembered() {
    // Only a check (no consume) saw February: going back must not reopen January.
    let e = Env::at("2026-01-31T23:00:00Z");
    let u = e.tally.create_local_user(None).unwrap().id;
    e.tally.consume(&u, "ai_chat", 5, UsageMeta::default()).unwrap();
    e.clock.set(t("2026-02-01T00:30:00Z"));
    assert!(e.tally.check(&u, "ai_chat", 1).unwrap().allowed);
    e.clock.set(t("2026-01-31T23:30:00Z"));
    let c = e.tally.check(&u, "ai_chat", 1).unwrap();
    assert_eq!((c.allowed, c.used, c.resets_at), (true, 0, Some(t("2026-03-01T00:00:00Z"))));
    e.clock.set(t("2026-01-31T23:40:00Z"));
    let again = e.reopen();
    let c = again.check(&u, "ai_chat", 1).unwrap();
    assert_eq!((c.allowed, c.used), (true, 0), "the highest time seen is persisted");
}

#[test]
fn flags() {
    let e = Env::new();
    let u = e.tally.create_local_user(None).unwrap().id;
    let d = e.tally.check(&u, "export", 1).unwrap();
    assert_eq!((d.allowed, d.reason), (false, Reason::NotInPlan));
    e.tally.set_entitlements(&u, pro()).unwrap();
    let d = e.tally.check(&u, "export", 1).unwrap();
    assert_eq!((d.allowed, d.reason, d.access_reason.as_str()), (true, Reason::Ok, "subscription"));
    assert!(e.tally.consume(&u, "pro_only", 1, UsageMeta::default()).unwrap().allowed);
}

#[test]
fn idempotent_replay_returns_the_same_decision_and_records_nothing() {
    let e = Env::new();
    let u = e.tally.create_local_user(None).unwrap().id;
    let first = e.tally.consume(&u, "ai_chat", 2, key("req-1")).unwrap();
    e.tally.consume(&u, "ai_chat", 1, UsageMeta::default()).unwrap();
    let replay = e.tally.consume(&u, "ai_chat", 2, key("req-1")).unwrap();
    assert_eq!(replay, first, "the original decision, used = 2 at the time");
    assert_eq!(events(&e, &u), 2);
    assert_eq!(e.tally.usage(&u, "ai_chat").unwrap().used, 3);
    // The id of a non-UUID key is UUIDv5; a UUID key is the id itself.
    let id = tally_core::ledger::event_id_for_key("req-1").to_string();
    assert_eq!(count(&e.raw(), &format!("SELECT COUNT(*) FROM events WHERE user_id = ?1 AND id = '{id}'"), &u), 1);
    let uuid = "01936f1e-7c2b-7000-8000-000000000001";
    e.tally.consume(&u, "daily", 1, key(uuid)).unwrap();
    assert_eq!(count(&e.raw(), &format!("SELECT COUNT(*) FROM events WHERE user_id = ?1 AND id = '{uuid}'"), &u), 1);
    assert_eq!(e.tally.event_status(&u, uuid).unwrap(), tally_core::EventStatus::Pending);
    assert_eq!(e.tally.event_status(&u, "req-1").unwrap(), tally_core::EventStatus::Pending);
    // Same key, other body: conflict.
    match e.tally.consume(&u, "ai_chat", 1, key("req-1")) {
        Err(Error::IdempotencyConflict(i)) => assert_eq!(i, id),
        other => panic!("{other:?}"),
    }
    // Another user may use the same key: identity is (user, id).
    let v = e.tally.create_local_user(None).unwrap().id;
    let d = e.tally.consume(&v, "ai_chat", 1, key("req-1")).unwrap();
    assert_eq!(d.used, 1);
    assert_eq!(e.tally.usage(&u, "ai_chat").unwrap().used, 3);
    assert!(matches!(e.tally.event_status(&v, uuid), Err(Error::NotFound(_))));
}

#[test]
fn a_denied_consume_is_decided_afresh_on_replay() {
    let e = Env::new();
    let u = e.tally.create_local_user(None).unwrap().id;
    e.tally.consume(&u, "ai_chat", 5, UsageMeta::default()).unwrap();
    let denied = e.tally.consume(&u, "ai_chat", 1, key("late")).unwrap();
    assert_eq!(denied.reason, Reason::LimitReached);
    assert!(matches!(e.tally.event_status(&u, "late"), Err(Error::NotFound(_))));
    e.tally.set_entitlements(&u, pro()).unwrap();
    let d = e.tally.consume(&u, "ai_chat", 1, key("late")).unwrap();
    assert_eq!((d.allowed, d.reason, d.used, d.limit, d.access_reason.as_str()), (true, Reason::Ok, 6, Some(100), "subscription"));
    assert_eq!(e.tally.consume(&u, "ai_chat", 1, key("late")).unwrap(), d);
    assert_eq!(events(&e, &u), 2);
}

#[test]
fn consume_many_decides_in_order_in_one_transaction() {
    let e = Env::new();
    let u = e.tally.create_local_user(None).unwrap().id;
    let item = |f: &str, n: u64, k: Option<&str>| ConsumeItem { feature: f.into(), amount: n, meta: k.map(key).unwrap_or_default() };
    let ds = e
        .tally
        .consume_many(
            &u,
            &[
                item("ai_chat", 2, Some("a")),
                item("ai_chat", 2, None),
                item("ai_chat", 2, None),
                item("ai_chat", 1, None),
                item("ai_chat", 2, Some("a")),
                item("teleport", 1, None),
                item("notes", 4, None),
            ],
        )
        .unwrap();
    let got: Vec<_> = ds.iter().map(|d| (d.allowed, d.reason, d.used)).collect();
    assert_eq!(
        got,
        vec![
            (true, Reason::Ok, 2),
            (true, Reason::Ok, 4),
            (false, Reason::LimitReached, 4),
            (true, Reason::Ok, 5),
            (true, Reason::Ok, 2), // replay of "a" inside the batch
            (false, Reason::UnknownFeature, 0),
            (true, Reason::OverLimitSoft, 4),
        ]
    );
    assert_eq!(events(&e, &u), 4);
    assert_eq!(e.tally.usage(&u, "ai_chat").unwrap().used, 5);
    let seqs: Vec<i64> = e
        .raw()
        .prepare("SELECT device_seq FROM events ORDER BY device_seq")
        .unwrap()
        .query_map([], |r| r.get(0))
        .unwrap()
        .map(Result::unwrap)
        .collect();
    assert_eq!(seqs, vec![1, 2, 3, 4]);
    assert!(e.tally.consume_many(&u, &[]).unwrap().is_empty());
}

#[test]
fn sequence_numbers_follow_the_ledger_and_are_never_handed_out_twice() {
    let e = Env::new();
    let seqs = |c: &Connection| -> Vec<i64> {
        c.prepare("SELECT device_seq FROM events ORDER BY device_seq")
            .unwrap()
            .query_map([], |r| r.get(0))
            .unwrap()
            .map(Result::unwrap)
            .collect()
    };
    let stored_seq = |c: &Connection| -> i64 { c.query_row("SELECT seq FROM device", [], |r| r.get(0)).unwrap() };
    let u = e.tally.create_local_user(Some("keeps")).unwrap().id;
    let v = e.tally.create_local_user(Some("goes")).unwrap().id;
    for _ in 0..3 {
        assert!(e.tally.consume(&u, "notes", 1, UsageMeta::default()).unwrap().allowed);
    }
    for _ in 0..2 {
        assert!(e.tally.consume(&v, "notes", 1, UsageMeta::default()).unwrap().allowed);
    }
    assert_eq!(seqs(&e.raw()), vec![1, 2, 3, 4, 5]);
    assert_eq!(stored_seq(&e.raw()), 0, "a use writes its event, not the device row");
    // The user holding the highest numbers goes: the floor is kept, 4 and 5 are not reused.
    e.tally.delete_user(&v, true).unwrap();
    assert_eq!(stored_seq(&e.raw()), 5);
    e.tally.consume(&u, "notes", 1, UsageMeta::default()).unwrap();
    // Another connection (another process) continues after the last one recorded.
    let other = e.reopen();
    other.consume(&u, "notes", 1, UsageMeta::default()).unwrap();
    e.tally.consume(&u, "notes", 1, UsageMeta::default()).unwrap();
    e.tally.void(&u, &key_of_last(&e), Some("test")).unwrap();
    assert_eq!(seqs(&e.raw()), vec![1, 2, 3, 6, 7, 8, 9]);
    // Two connections taking turns: each notices the other's commit (a consume remembers its
    // last number only while nothing else writes).
    for i in 0..6 {
        let t = if i % 3 == 0 { &other } else { &e.tally };
        assert!(t.consume(&u, "notes", 1, UsageMeta::default()).unwrap().allowed);
    }
    assert_eq!(seqs(&e.raw()), vec![1, 2, 3, 6, 7, 8, 9, 10, 11, 12, 13, 14, 15]);
}

/// The id of the latest recorded event.
fn key_of_last(e: &Env) -> String {
    e.raw().query_row("SELECT id FROM events ORDER BY device_seq DESC LIMIT 1", [], |r| r.get(0)).unwrap()
}

#[test]
fn a_use_writes_only_its_event_and_the_counters_follow_every_64_uses_or_before_any_other_write() {
    let e = Env::new();
    let u = e.tally.create_local_user(Some("tail")).unwrap().id;
    let written = |feature: &str| -> i64 {
        e.raw()
            .query_row("SELECT coalesce(sum(pending), 0) FROM counters WHERE user_id = ?1 AND feature = ?2", [&u, feature], |r| r.get(0))
            .unwrap()
    };
    let through = || -> i64 { e.raw().query_row("SELECT counted_through FROM device", [], |r| r.get(0)).unwrap() };
    let one = |t: &tally_core::Tally, f: &str| t.consume(&u, f, 1, UsageMeta::default()).unwrap();
    for _ in 0..10 {
        assert!(one(&e.tally, "stars").allowed);
    }
    assert_eq!(e.tally.usage(&u, "stars").unwrap().used, 10);
    assert_eq!((written("stars"), through()), (0, 0), "the uses wait in the ledger");
    // Another connection (another process) counts them from the file, and so does a reopened
    // one after this instance is gone without writing them (a crash).
    let other = e.reopen();
    assert_eq!(other.usage(&u, "stars").unwrap().used, 10);
    drop(other);
    // Any other write writes them first.
    e.tally.set_setting(&u, "theme", serde_json::json!("dark")).unwrap();
    assert_eq!((written("stars"), through()), (10, 10));
    assert_eq!(e.tally.usage(&u, "stars").unwrap().used, 10, "counted once");
    // A use writes them once 64 wait.
    for _ in 0..63 {
        one(&e.tally, "stars");
    }
    assert_eq!(written("stars"), 10);
    one(&e.tally, "stars");
    assert_eq!((written("stars"), through()), (74, 74));
    // Two connections taking turns on one hard limit (3 a day): each sees the other's waiting uses.
    let other = e.reopen();
    assert!(one(&e.tally, "daily").allowed);
    assert!(one(&other, "daily").allowed);
    assert!(one(&e.tally, "daily").allowed);
    assert!(!one(&other, "daily").allowed);
    assert!(!one(&e.tally, "daily").allowed);
    assert_eq!(e.tally.check(&u, "daily", 1).unwrap().remaining, Some(0));
    assert_eq!(other.usage(&u, "daily").unwrap().used, 3);
    // A rate window (3 a minute) and a budget count the same way.
    for i in 0..4 {
        let t = if i % 2 == 0 { &e.tally } else { &other };
        assert_eq!(t.consume(&u, "api", 1, UsageMeta::default()).unwrap().allowed, i < 3, "use {i} of the rate window");
    }
    let priced = UsageMeta { model: Some("gpt-4o".into()), input_tokens: Some(100), output_tokens: Some(20), ..UsageMeta::default() };
    assert!(e.tally.consume(&u, "ai_spend", 450, priced.clone()).unwrap().allowed);
    assert_eq!(other.usage(&u, "ai_spend").unwrap().used, 450);
    e.tally.set_setting(&u, "theme", serde_json::json!("light")).unwrap();
    assert_eq!((written("daily"), written("api"), written("stars")), (3, 3, 74));
    assert_eq!(e.tally.usage(&u, "ai_spend").unwrap().used, 450, "written once, counted once");
    assert_eq!(e.reopen().usage(&u, "daily").unwrap().used, 3);
}

/// Asserts that `r` is the storage error naming the corrupted `place`.
fn assert_corrupt<T: std::fmt::Debug>(r: Result<T, Error>, place: &str) {
    match r {
        Err(Error::Storage(err)) => assert!(err.to_string().contains(place), "{err} names {place}"),
        other => panic!("expected a storage error naming {place}, got {other:?}"),
    }
}

#[test]
fn a_negative_stored_server_total_is_an_error_never_room() {
    let e = Env::new();
    let u = e.tally.create_local_user(None).unwrap().id;
    for _ in 0..5 {
        assert!(e.tally.consume(&u, "ai_chat", 1, UsageMeta::default()).unwrap().allowed);
    }
    // The file is corrupted behind the library's back: a server total below zero.
    let start = t("2026-01-01T00:00:00Z").timestamp_millis();
    let n = e
        .raw()
        .execute(
            "INSERT INTO counters (user_id, feature, period, period_start, server_used) VALUES (?1, 'ai_chat', 'month', ?2, -100)
             ON CONFLICT (user_id, feature, period, period_start) DO UPDATE SET server_used = -100",
            rusqlite::params![u, start],
        )
        .unwrap();
    assert_eq!(n, 1);
    let before = e.snapshot();
    assert_corrupt(e.tally.consume(&u, "ai_chat", 1, UsageMeta::default()), "counters.server_used");
    assert_corrupt(e.tally.check(&u, "ai_chat", 1), "counters.server_used");
    assert_corrupt(e.tally.usage(&u, "ai_chat"), "counters.server_used");
    assert_eq!(e.snapshot(), before, "nothing recorded");
    let reopened = e.reopen();
    assert_corrupt(reopened.consume(&u, "ai_chat", 1, UsageMeta::default()), "counters.server_used");
    assert_eq!(e.snapshot(), before, "nothing recorded after reopening either");
}

#[test]
fn a_negative_stored_figure_of_a_use_fails_the_report_instead_of_wrapping() {
    for column in ["input_tokens", "output_tokens", "cost_micros"] {
        let e = Env::new();
        let u = e.tally.create_local_user(None).unwrap().id;
        assert!(e.tally.consume(&u, "ai_spend", 1, ai("gpt-4o", 10, 10)).unwrap().allowed);
        // The file is corrupted behind the library's back: a figure of the use below zero.
        e.raw().execute(&format!("UPDATE events SET {column} = -5"), []).unwrap();
        let before = e.snapshot();
        for by in [tally_core::GroupBy::Day, tally_core::GroupBy::Feature, tally_core::GroupBy::Model] {
            assert_corrupt(e.tally.report(&u, t("2026-01-01T00:00:00Z"), t("2026-02-01T00:00:00Z"), by), &format!("events.{column}"));
        }
        assert_eq!(e.snapshot(), before, "{column}: nothing changed");
    }
}
