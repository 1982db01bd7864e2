//! Periods with the injectable clock, entitlement resolution, users (sign-in attach, sign-out,
//! delete), settings and the change listener — all through the public API on a real file.

mod common;
use chrono::Duration;
use common::*;
use serde_json::{Map, json};
use std::sync::Arc;
use tally_core::{AccessGrant, Change, Entitlements, Error, GroupBy, Profile, Reason, SubscriptionStatus, UsageMeta, UserUpdate};

fn one() -> UsageMeta {
    UsageMeta::default()
}

fn tz(e: &Env, u: &str, zone: &str) {
    e.tally.update_user(u, UserUpdate { timezone: Some(zone.into()), ..UserUpdate::default() }).unwrap();
}

// ---------------------------------------------------------------- periods

#[test]
fn month_end_rollover() {
    let e = Env::at("2026-01-31T23:59:59Z");
    let u = e.tally.create_local_user(None).unwrap().id;
    e.tally.consume(&u, "ai_chat", 5, one()).unwrap();
    assert_eq!(e.tally.consume(&u, "ai_chat", 1, one()).unwrap().reason, Reason::LimitReached);
    e.clock.advance(Duration::seconds(1));
    let usage = e.tally.usage(&u, "ai_chat").unwrap();
    assert_eq!((usage.used, usage.period_start, usage.resets_at), (0, Some(t("2026-02-01T00:00:00Z")), Some(t("2026-03-01T00:00:00Z"))));
    assert!(e.tally.consume(&u, "ai_chat", 5, one()).unwrap().allowed);
    // Both months are in the report.
    let rows = e.tally.report(&u, t("2026-01-01T00:00:00Z"), t("2026-03-01T00:00:00Z"), GroupBy::Day).unwrap();
    let keys: Vec<_> = rows.iter().map(|r| (r.key.as_str(), r.amount)).collect();
    assert_eq!(keys, vec![("2026-01-31", 5), ("2026-02-01", 5)]);
}

#[test]
fn leap_day() {
    let e = Env::at("2028-02-28T23:30:00Z");
    let u = e.tally.create_local_user(None).unwrap().id;
    e.tally.consume(&u, "daily", 3, one()).unwrap();
    e.clock.set(t("2028-02-29T00:00:00Z"));
    let usage = e.tally.usage(&u, "daily").unwrap();
    assert_eq!((usage.used, usage.period_start, usage.resets_at), (0, Some(t("2028-02-29T00:00:00Z")), Some(t("2028-03-01T00:00:00Z"))));
    e.tally.consume(&u, "daily", 2, one()).unwrap();
    e.tally.consume(&u, "ai_chat", 1, one()).unwrap();
    let m = e.tally.usage(&u, "ai_chat").unwrap();
    assert_eq!((m.period_start, m.resets_at), (Some(t("2028-02-01T00:00:00Z")), Some(t("2028-03-01T00:00:00Z"))));
    e.clock.set(t("2028-02-29T23:59:59Z"));
    assert_eq!(e.tally.usage(&u, "daily").unwrap().used, 2);
    e.clock.set(t("2028-03-01T00:00:00Z"));
    assert_eq!(e.tally.usage(&u, "daily").unwrap().used, 0);
    assert_eq!(e.tally.usage(&u, "ai_chat").unwrap().used, 0);
}

#[test]
fn dst_days_in_new_york_are_23_and_25_hours() {
    let e = Env::at("2026-03-08T04:59:00Z"); // Mar 7, 23:59 EST
    let u = e.tally.create_local_user(None).unwrap().id;
    tz(&e, &u, "America/New_York");
    e.tally.consume(&u, "daily", 3, one()).unwrap();
    let w = e.tally.usage(&u, "daily").unwrap();
    assert_eq!((w.period_start, w.resets_at), (Some(t("2026-03-07T05:00:00Z")), Some(t("2026-03-08T05:00:00Z"))));
    e.clock.set(t("2026-03-08T05:00:00Z")); // Mar 8 00:00 EST: a new day
    let w = e.tally.usage(&u, "daily").unwrap();
    assert_eq!(w.used, 0);
    assert_eq!(w.resets_at.unwrap() - w.period_start.unwrap(), Duration::hours(23));
    assert_eq!(w.resets_at, Some(t("2026-03-09T04:00:00Z")));
    e.tally.consume(&u, "daily", 3, one()).unwrap();
    e.clock.set(t("2026-03-09T03:59:59Z"));
    assert_eq!(e.tally.check(&u, "daily", 1).unwrap().reason, Reason::LimitReached);
    e.clock.set(t("2026-03-09T04:00:00Z"));
    assert!(e.tally.check(&u, "daily", 1).unwrap().allowed);
    // Fall back: Nov 1 2026 lasts 25 hours.
    e.clock.set(t("2026-11-01T12:00:00Z"));
    e.tally.consume(&u, "daily", 3, one()).unwrap();
    let w = e.tally.usage(&u, "daily").unwrap();
    assert_eq!((w.period_start, w.resets_at), (Some(t("2026-11-01T04:00:00Z")), Some(t("2026-11-02T05:00:00Z"))));
    e.clock.set(t("2026-11-02T04:30:00Z")); // 23:30 EST, still Nov 1
    assert_eq!(e.tally.check(&u, "daily", 1).unwrap().reason, Reason::LimitReached);
    // ISO week from Monday in the user's zone.
    let wk = e.tally.usage(&u, "weekly").unwrap();
    assert_eq!(wk.period_start, Some(t("2026-10-26T04:00:00Z")));
    assert_eq!(wk.resets_at, Some(t("2026-11-02T05:00:00Z")));
}

#[test]
fn timezone_change_mid_period_recomputes_current_windows_from_the_ledger() {
    let e = Env::at("2026-01-15T01:00:00Z");
    let u = e.tally.create_local_user(None).unwrap().id;
    e.tally.consume(&u, "daily", 1, one()).unwrap(); // Jan 15 10:00 in Tokyo
    e.clock.set(t("2026-01-15T20:00:00Z"));
    e.tally.consume(&u, "daily", 2, one()).unwrap(); // Jan 16 05:00 in Tokyo
    e.clock.set(t("2026-01-15T21:00:00Z"));
    assert_eq!(e.tally.usage(&u, "daily").unwrap().used, 3);
    assert_eq!(e.tally.check(&u, "daily", 1).unwrap().reason, Reason::LimitReached);
    tz(&e, &u, "Asia/Tokyo");
    let w = e.tally.usage(&u, "daily").unwrap();
    assert_eq!((w.used, w.period_start, w.resets_at), (2, Some(t("2026-01-15T15:00:00Z")), Some(t("2026-01-16T15:00:00Z"))));
    assert!(e.tally.check(&u, "daily", 1).unwrap().allowed);
    // And back: the UTC window again holds all three.
    tz(&e, &u, "UTC");
    assert_eq!(e.tally.usage(&u, "daily").unwrap().used, 3);
    // A half-hour zone.
    tz(&e, &u, "Asia/Kolkata"); // 21:00Z = Jan 16 02:30 IST; 20:00Z = 01:30 IST; 01:00Z = Jan 15
    let w = e.tally.usage(&u, "daily").unwrap();
    assert_eq!((w.used, w.period_start), (2, Some(t("2026-01-15T18:30:00Z"))));
    // A consume after the change counts in the new zone's window.
    e.tally.consume(&u, "daily", 1, one()).unwrap();
    assert_eq!(e.tally.usage(&u, "daily").unwrap().used, 3);
    assert_eq!(e.tally.report(&u, t("2026-01-01T00:00:00Z"), t("2026-02-01T00:00:00Z"), GroupBy::Day).unwrap().len(), 2);
}

#[test]
fn billing_anchored_on_the_31st() {
    let e = Env::at("2027-02-10T00:00:00Z");
    let u = e.tally.create_local_user(None).unwrap().id;
    let ent = Entitlements {
        plan: "pro".into(),
        status: SubscriptionStatus::Active,
        period_start: Some(t("2027-01-31T10:00:00Z")),
        period_end: Some(t("2027-02-28T10:00:00Z")),
        ..Entitlements::free()
    };
    e.tally.set_entitlements(&u, ent).unwrap();
    e.tally.consume(&u, "uploads", 40, one()).unwrap();
    let w = e.tally.usage(&u, "uploads").unwrap();
    assert_eq!(
        (w.used, w.limit, w.period_start, w.resets_at),
        (40, Some(100), Some(t("2027-01-31T10:00:00Z")), Some(t("2027-02-28T10:00:00Z")))
    );
    e.clock.set(t("2027-02-28T10:00:00Z"));
    let w = e.tally.usage(&u, "uploads").unwrap();
    assert_eq!((w.used, w.period_start, w.resets_at), (0, Some(t("2027-02-28T10:00:00Z")), Some(t("2027-03-31T10:00:00Z"))));
    e.clock.set(t("2027-03-31T09:59:59Z"));
    e.tally.consume(&u, "uploads", 1, one()).unwrap();
    e.clock.set(t("2027-03-31T10:00:00Z"));
    let w = e.tally.usage(&u, "uploads").unwrap();
    assert_eq!((w.used, w.resets_at), (0, Some(t("2027-04-30T10:00:00Z"))));
}

#[test]
fn billing_without_subscription_is_monthly_from_created_at() {
    let e = Env::at("2026-01-31T08:00:00Z");
    let u = e.tally.create_local_user(None).unwrap();
    assert_eq!(u.created_at, t("2026-01-31T08:00:00Z"));
    e.tally.consume(&u.id, "uploads", 10, one()).unwrap();
    assert_eq!(e.tally.check(&u.id, "uploads", 1).unwrap().reason, Reason::LimitReached);
    e.clock.set(t("2026-02-15T00:00:00Z"));
    let w = e.tally.usage(&u.id, "uploads").unwrap();
    assert_eq!((w.used, w.period_start, w.resets_at), (10, Some(t("2026-01-31T08:00:00Z")), Some(t("2026-02-28T08:00:00Z"))));
    e.clock.set(t("2026-03-01T00:00:00Z"));
    let w = e.tally.usage(&u.id, "uploads").unwrap();
    assert_eq!((w.used, w.period_start, w.resets_at), (0, Some(t("2026-02-28T08:00:00Z")), Some(t("2026-03-31T08:00:00Z"))));
}

// ---------------------------------------------------------------- entitlements

#[test]
fn entitlements_resolution_order() {
    let e = Env::new();
    let u = e.tally.create_local_user(None).unwrap().id;
    let now = t("2026-01-15T12:00:00Z");
    let r = e.tally.entitlements(&u).unwrap();
    assert_eq!((r.plan.as_str(), r.access_reason.as_str()), ("free", "free"));
    assert_eq!(r.features["ai_chat"].limit(), Some(5));
    let grant = AccessGrant { plan: "team".into(), until: Some(now + Duration::hours(1)), granted_by: "ops".into(), reason: "beta".into() };
    let mut state = Entitlements {
        plan: "pro".into(),
        status: SubscriptionStatus::Active,
        is_admin: true,
        grants: vec![grant],
        ..Entitlements::free()
    };
    type Step = Box<dyn Fn(&mut Entitlements)>;
    let cases: Vec<(Step, &str, &str)> = vec![
        (Box::new(|_| {}), "admin", "pro"),
        (Box::new(|s| s.is_admin = false), "subscription", "pro"),
        (Box::new(|s| s.status = SubscriptionStatus::Trialing), "trial", "pro"),
        (
            Box::new(move |s| {
                s.status = SubscriptionStatus::PastDue;
                s.past_due_since = Some(now - Duration::days(2));
            }),
            "subscription",
            "pro",
        ),
        (Box::new(move |s| s.past_due_since = Some(now - Duration::days(8))), "granted:beta", "team"),
        (Box::new(|s| s.status = SubscriptionStatus::Canceled), "granted:beta", "team"),
        (Box::new(|s| s.grants.clear()), "free", "free"),
    ];
    for (change, reason, plan) in cases {
        change(&mut state);
        e.tally.set_entitlements(&u, state.clone()).unwrap();
        let r = e.tally.entitlements(&u).unwrap();
        assert_eq!((r.access_reason.as_str(), r.plan.as_str()), (reason, plan), "{state:?}");
        assert_eq!(e.tally.check(&u, "ai_chat", 1).unwrap().access_reason, reason);
    }
    // Admins get every feature of every plan.
    e.tally.set_entitlements(&u, Entitlements { is_admin: true, ..Entitlements::free() }).unwrap();
    let r = e.tally.entitlements(&u).unwrap();
    assert!(r.is_admin && r.features.contains_key("team_only") && r.features.contains_key("pro_only"));
    assert!(e.tally.user(&u).unwrap().is_admin);
}

#[test]
fn an_access_grant_expires_as_the_clock_advances() {
    let e = Env::new();
    let u = e.tally.create_local_user(None).unwrap().id;
    let until = t("2026-01-15T13:00:00Z");
    let grant = AccessGrant { plan: "pro".into(), until: Some(until), granted_by: "support".into(), reason: "apology".into() };
    e.tally.set_entitlements(&u, Entitlements { grants: vec![grant], ..Entitlements::free() }).unwrap();
    let r = e.tally.entitlements(&u).unwrap();
    assert_eq!((r.plan.as_str(), r.access_reason.as_str(), r.granted_until), ("pro", "granted:apology", Some(until)));
    let d = e.tally.consume(&u, "pro_only", 1, one()).unwrap();
    assert_eq!((d.allowed, d.access_reason.as_str()), (true, "granted:apology"));
    e.tally.consume(&u, "ai_chat", 7, one()).unwrap();
    e.clock.set(until - Duration::seconds(1));
    assert!(e.tally.check(&u, "pro_only", 1).unwrap().allowed);
    e.clock.set(until);
    let d = e.tally.check(&u, "pro_only", 1).unwrap();
    assert_eq!((d.allowed, d.reason, d.access_reason.as_str()), (false, Reason::NotInPlan, "free"));
    // Back on free: 7 of 5 used this month.
    let w = e.tally.usage(&u, "ai_chat").unwrap();
    assert_eq!((w.used, w.limit, w.remaining, w.over_limit_by), (7, Some(5), Some(0), 2));
    // Moving the clock back does not extend the grant.
    e.clock.set(until - Duration::minutes(30));
    assert_eq!(e.tally.entitlements(&u).unwrap().access_reason, "free");
}

// ---------------------------------------------------------------- users

#[test]
fn create_sign_in_upsert_update_and_list() {
    let e = Env::new();
    let a = e.tally.create_local_user(Some("Ada")).unwrap();
    assert_eq!((a.external_id.as_deref(), a.display_name.as_deref(), a.timezone.as_str(), a.signed_in), (None, Some("Ada"), "UTC", false));
    assert_eq!(uuid::Uuid::parse_str(&a.id).unwrap().get_version_num(), 7);
    let p = Profile { external_id: "auth0|1".into(), email: Some("b@x.io".into()), display_name: Some("Bob".into()), avatar_url: None };
    let b = e.tally.sign_in(p.clone(), None).unwrap();
    assert!(b.signed_in);
    e.clock.advance(Duration::minutes(1));
    let b2 = e.tally.sign_in(Profile { email: Some("bob@x.io".into()), display_name: None, ..p.clone() }, None).unwrap();
    assert_eq!(b2.id, b.id, "sign_in upserts by external_id");
    assert_eq!((b2.email.as_deref(), b2.display_name.as_deref()), (Some("bob@x.io"), Some("Bob")));
    assert!(b2.updated_at > b.updated_at);
    let users = e.tally.users().unwrap();
    assert_eq!(users.iter().map(|u| u.id.as_str()).collect::<Vec<_>>(), vec![a.id.as_str(), b.id.as_str()]);
    let upd = e
        .tally
        .update_user(
            &b.id,
            UserUpdate {
                display_name: Some("Robert".into()),
                avatar_url: Some("https://x.io/a.png".into()),
                timezone: Some("Europe/Paris".into()),
                email: Some(String::new()),
            },
        )
        .unwrap();
    assert_eq!(
        (upd.display_name.as_deref(), upd.avatar_url.as_deref(), upd.timezone.as_str(), upd.email.clone()),
        (Some("Robert"), Some("https://x.io/a.png"), "Europe/Paris", None)
    );
    assert_eq!(e.tally.user(&b.id).unwrap(), upd);
    // sign_out keeps the user and their unsynced events.
    e.tally.consume(&b.id, "ai_chat", 2, one()).unwrap();
    e.tally.sign_out(&b.id).unwrap();
    let out = e.tally.user(&b.id).unwrap();
    assert!(!out.signed_in);
    assert_eq!(out.external_id.as_deref(), Some("auth0|1"));
    assert_eq!(e.tally.pending_events(&b.id).unwrap(), 1);
    assert_eq!(e.tally.usage(&b.id, "ai_chat").unwrap().used, 2);
    // Signing in again finds the same account.
    assert_eq!(e.tally.sign_in(p, None).unwrap().id, b.id);
}

#[test]
fn sign_in_attaches_a_local_user_without_losing_or_double_counting() {
    let e = Env::at("2026-01-15T03:00:00Z");
    let target = e.tally.sign_in(Profile { external_id: "sub-t".into(), ..Profile::default() }, None).unwrap().id;
    tz(&e, &target, "America/New_York"); // 03:00Z is Jan 14 22:00 in New York
    e.tally
        .set_entitlements(&target, Entitlements { plan: "pro".into(), status: SubscriptionStatus::Active, ..Entitlements::free() })
        .unwrap();
    e.tally.consume(&target, "ai_chat", 4, one()).unwrap();
    e.tally.consume(&target, "daily", 1, one()).unwrap();
    e.tally.set_setting(&target, "shared", json!("target")).unwrap();
    assert_eq!(e.tally.usage(&target, "ai_chat").unwrap().used, 4); // counters verified and cached

    let local = e.tally.create_local_user(Some("offline")).unwrap().id;
    e.tally.consume(&local, "ai_chat", 3, key("l-1")).unwrap();
    e.tally.consume(&local, "daily", 2, one()).unwrap();
    e.clock.set(t("2026-01-15T06:00:00Z")); // Jan 15 01:00 in New York
    e.tally.consume(&local, "daily", 1, one()).unwrap();
    e.tally.consume(&local, "notes", 1, one()).unwrap();
    e.tally.set_setting(&local, "only_local", json!(1)).unwrap();
    e.tally.set_setting(&local, "shared", json!("local, later")).unwrap();
    assert_eq!(e.tally.usage(&local, "ai_chat").unwrap().used, 3);
    assert_eq!(e.tally.usage(&target, "daily").unwrap().used, 0);
    let (te, le) = (e.tally.pending_events(&target).unwrap(), e.tally.pending_events(&local).unwrap());

    let rec = Arc::new(Recorder::default());
    e.tally.set_listener(rec.clone());
    let signed = e.tally.sign_in(Profile { external_id: "sub-t".into(), ..Profile::default() }, Some(&local)).unwrap();
    assert_eq!(signed.id, target);
    assert!(matches!(e.tally.user(&local), Err(Error::NotFound(_))));
    assert_eq!(e.tally.pending_events(&target).unwrap(), te + le);
    let raw = e.raw();
    assert_eq!(count(&raw, "SELECT COUNT(*) FROM events WHERE user_id = ?1", &local), 0);
    assert_eq!(count(&raw, "SELECT COUNT(*) FROM counters WHERE user_id = ?1", &local), 0);
    assert_eq!(count(&raw, "SELECT COUNT(*) FROM settings WHERE user_id = ?1", &local), 0);
    // Counters rebuilt under the target's plan (pro) and zone (New York).
    let w = e.tally.usage(&target, "ai_chat").unwrap();
    assert_eq!((w.used, w.limit), (7, Some(100)));
    let d = e.tally.usage(&target, "daily").unwrap();
    assert_eq!((d.used, d.period_start), (1, Some(t("2026-01-15T05:00:00Z"))), "only the 06:00Z event is on Jan 15 in New York");
    assert_eq!(e.tally.usage(&target, "notes").unwrap().used, 1);
    // The local user's idempotency keys still dedup under the account.
    assert_eq!(e.tally.consume(&target, "ai_chat", 3, key("l-1")).unwrap().used, 3);
    assert_eq!(e.tally.usage(&target, "ai_chat").unwrap().used, 7);
    // Settings merged, the later write winning.
    let s = e.tally.settings(&target).unwrap();
    assert_eq!((s["shared"].clone(), s["only_local"].clone()), (json!("local, later"), json!(1)));
    let changed: Vec<_> = rec.take().into_iter().map(|(u, _)| u).collect();
    assert!(changed.contains(&target));
    // A reopened instance (another process) sees the same totals.
    let other = e.reopen();
    assert_eq!(other.usage(&target, "ai_chat").unwrap().used, 7);
    assert_eq!(other.usage(&target, "daily").unwrap().used, 1);
}

#[test]
fn delete_user_with_force_cascades() {
    let e = Env::new();
    let keep = e.tally.create_local_user(None).unwrap().id;
    let u = e.tally.sign_in(Profile { external_id: "sub-del".into(), ..Profile::default() }, None).unwrap().id;
    for id in [&keep, &u] {
        e.tally.consume(id, "ai_chat", 1, one()).unwrap();
        e.tally.consume(id, "api", 1, one()).unwrap();
        e.tally.set_setting(id, "k", json!(1)).unwrap();
        let g = tally_core::CreditGrant { id: "g".into(), remaining: 50, expires_at: None, source: "x".into() };
        e.tally.set_entitlements(id, Entitlements { credit_grants: vec![g], ..Entitlements::free() }).unwrap();
        e.tally.consume(id, "images", 1, one()).unwrap();
    }
    e.tally.delete_user(&u, true).unwrap();
    let raw = e.raw();
    for table in ["events", "counters", "counter_rules", "settings", "credit_grants"] {
        assert_eq!(count(&raw, &format!("SELECT COUNT(*) FROM {table} WHERE user_id = ?1"), &u), 0, "{table}");
        assert!(count(&raw, &format!("SELECT COUNT(*) FROM {table} WHERE user_id = ?1"), &keep) > 0, "{table}");
    }
    assert!(matches!(e.tally.user(&u), Err(Error::NotFound(_))));
    assert!(matches!(e.tally.consume(&u, "ai_chat", 1, one()), Err(Error::NotFound(_))));
    assert_eq!(e.tally.users().unwrap().len(), 1);
    // The external id is free again: signing in creates a fresh account with nothing in it.
    let again = e.tally.sign_in(Profile { external_id: "sub-del".into(), ..Profile::default() }, None).unwrap();
    assert_ne!(again.id, u);
    assert_eq!(e.tally.usage(&again.id, "ai_chat").unwrap().used, 0);
}

// ---------------------------------------------------------------- settings

#[test]
fn settings_defaults_patch_replace_delete_and_local_only() {
    let e = Env::with(|c| {
        c.default_settings = serde_json::from_value(json!({"theme": "light", "lang": "en", "volume": 5})).unwrap();
        c.local_only_settings = vec!["theme".into()];
    });
    let u = e.tally.create_local_user(None).unwrap().id;
    let v = e.tally.create_local_user(None).unwrap().id;
    assert_eq!(e.tally.settings(&u).unwrap(), e.tally.config().default_settings);
    e.tally.set_setting(&u, "theme", json!("dark")).unwrap();
    e.tally.set_setting(&u, "font", json!({"size": 12, "family": "mono"})).unwrap();
    let s = e.tally.settings(&u).unwrap();
    assert_eq!((s["theme"].clone(), s["lang"].clone(), s["font"]["size"].clone()), (json!("dark"), json!("en"), json!(12)));
    assert_eq!(e.tally.setting(&u, "lang").unwrap(), Some(json!("en")));
    assert_eq!(e.tally.setting(&u, "missing").unwrap(), None);
    // Patch merges; null deletes (a default shows through again).
    let patch: Map<_, _> = serde_json::from_value(json!({"lang": "fr", "font": null, "new": [1, 2]})).unwrap();
    e.tally.patch_settings(&u, patch).unwrap();
    let s = e.tally.settings(&u).unwrap();
    assert_eq!((s["lang"].clone(), s.get("font"), s["new"].clone(), s["volume"].clone()), (json!("fr"), None, json!([1, 2]), json!(5)));
    e.tally.set_setting(&u, "lang", serde_json::Value::Null).unwrap();
    assert_eq!(e.tally.setting(&u, "lang").unwrap(), Some(json!("en")), "deleting a stored value falls back to the default");
    // Replace: keys not named are deleted.
    let all: Map<_, _> = serde_json::from_value(json!({"only": true, "volume": 9})).unwrap();
    e.tally.replace_settings(&u, all).unwrap();
    let s = e.tally.settings(&u).unwrap();
    assert_eq!(s.get("new"), None);
    assert_eq!(
        (s["only"].clone(), s["volume"].clone(), s["theme"].clone(), s["lang"].clone()),
        (json!(true), json!(9), json!("light"), json!("en"))
    );
    // Every stored key has an HLC; local-only keys are never dirty (never synced).
    let raw = e.raw();
    let rows: Vec<(String, String, bool)> = raw
        .prepare("SELECT key, hlc, dirty FROM settings WHERE user_id = ?1")
        .unwrap()
        .query_map([&u], |r| Ok((r.get(0)?, r.get(1)?, r.get(2)?)))
        .unwrap()
        .map(Result::unwrap)
        .collect();
    for (k, hlc, dirty) in &rows {
        assert!(tally_core::hlc::Hlc::parse(hlc).is_some(), "{k}: {hlc}");
        assert_eq!(*dirty, k != "theme", "{k}");
    }
    assert!(rows.iter().any(|(k, _, _)| k == "theme"));
    // Users are isolated.
    assert_eq!(e.tally.settings(&v).unwrap(), e.tally.config().default_settings);
}

// ---------------------------------------------------------------- listener

#[test]
fn the_listener_is_told_after_each_change() {
    let e = Env::new();
    let u = e.tally.create_local_user(None).unwrap().id;
    let rec = Arc::new(Recorder::default());
    e.tally.set_listener(rec.clone());
    let has = |got: &[(String, Change)], user: &str, f: fn(&Change) -> bool| got.iter().any(|(id, c)| id == user && f(c));

    e.tally.consume(&u, "ai_chat", 1, one()).unwrap();
    let got = rec.take();
    assert!(has(&got, &u, |c| c.usage), "{got:?}");
    e.tally.consume_many(&u, &[tally_core::ConsumeItem { feature: "daily".into(), amount: 1, meta: one() }]).unwrap();
    assert!(has(&rec.take(), &u, |c| c.usage));
    e.tally.set_setting(&u, "a", json!(1)).unwrap();
    assert!(has(&rec.take(), &u, |c| c.settings));
    e.tally.patch_settings(&u, Map::new()).unwrap();
    e.tally.replace_settings(&u, Map::new()).unwrap();
    assert!(has(&rec.take(), &u, |c| c.settings));
    e.tally.set_entitlements(&u, Entitlements { plan: "pro".into(), status: SubscriptionStatus::Active, ..Entitlements::free() }).unwrap();
    assert!(has(&rec.take(), &u, |c| c.entitlements));
    let s = e.tally.sign_in(Profile { external_id: "sub-l".into(), ..Profile::default() }, None).unwrap();
    assert!(has(&rec.take(), &s.id, |c| c.entitlements));
    e.tally.update_user(&u, UserUpdate { timezone: Some("Europe/Berlin".into()), ..UserUpdate::default() }).unwrap();
    assert!(has(&rec.take(), &u, |c| c.usage));
    // The listener may call back into Tally (it runs after commit, outside the lock).
    struct Reentrant(Arc<tally_core::Tally>, std::sync::Mutex<Vec<u64>>);
    impl tally_core::ChangeListener for Reentrant {
        fn on_change(&self, user_id: &str, c: Change) {
            if c.usage {
                let used = self.0.usage(user_id, "ai_chat").map(|u| u.used).unwrap_or(0);
                self.1.lock().unwrap().push(used);
            }
        }
    }
    let shared = Arc::new(e.reopen());
    let re = Arc::new(Reentrant(shared.clone(), Default::default()));
    shared.set_listener(re.clone());
    shared.consume(&u, "ai_chat", 2, one()).unwrap();
    assert_eq!(*re.1.lock().unwrap(), vec![3]);
    // Failed calls tell nothing; cleared listeners hear nothing.
    let _ = e.tally.consume(&u, "ai_chat", 0, one());
    assert!(rec.take().is_empty());
    e.tally.clear_listener();
    e.tally.consume(&u, "ai_chat", 1, one()).unwrap();
    assert!(rec.take().is_empty());
}
