//! Every public function's errors: each bad input is a clear `Error` and changes nothing in the
//! database (compared row by row through a second connection).

mod common;
use common::*;
use serde_json::{Map, Value, json};
use tally_core::{Catalog, ConsumeItem, Entitlements, Error, GroupBy, Profile, Reason, SubscriptionStatus, UsageMeta, UserUpdate};

const GHOST: &str = "01900000-0000-7000-8000-000000000000";

macro_rules! assert_err {
    ($e:expr, $pat:pat) => {
        match $e {
            Err($pat) => {}
            other => panic!("{}: expected {}, got {:?}", stringify!($e), stringify!($pat), other),
        }
    };
}

fn seeded() -> (Env, String, String) {
    let e = Env::new();
    let local = e.tally.create_local_user(Some("Ada")).unwrap();
    let signed =
        e.tally.sign_in(Profile { external_id: "sub-1".into(), email: Some("b@example.com".into()), ..Profile::default() }, None).unwrap();
    e.tally.consume(&local.id, "ai_chat", 2, key("seed-1")).unwrap();
    e.tally.consume(&signed.id, "daily", 1, UsageMeta::default()).unwrap();
    e.tally.set_setting(&local.id, "color", json!("red")).unwrap();
    (e, local.id, signed.id)
}

#[test]
fn unknown_user_is_not_found_everywhere_and_changes_nothing() {
    let (e, _local, _signed) = seeded();
    let before = e.snapshot();
    let tl = &e.tally;
    let (from, to) = (t("2026-01-01T00:00:00Z"), t("2026-02-01T00:00:00Z"));
    assert_err!(tl.user(GHOST), Error::NotFound(_));
    assert_err!(tl.check(GHOST, "ai_chat", 1), Error::NotFound(_));
    assert_err!(tl.consume(GHOST, "ai_chat", 1, UsageMeta::default()), Error::NotFound(_));
    assert_err!(
        tl.consume_many(GHOST, &[ConsumeItem { feature: "ai_chat".into(), amount: 1, meta: UsageMeta::default() }]),
        Error::NotFound(_)
    );
    assert_err!(tl.usage(GHOST, "ai_chat"), Error::NotFound(_));
    assert_err!(tl.credit_balance(GHOST), Error::NotFound(_));
    assert_err!(tl.pending_events(GHOST), Error::NotFound(_));
    assert_err!(tl.event_status(GHOST, "seed-1"), Error::NotFound(_));
    assert_err!(tl.entitlements(GHOST), Error::NotFound(_));
    assert_err!(tl.set_entitlements(GHOST, Entitlements::free()), Error::NotFound(_));
    assert_err!(tl.report(GHOST, from, to, GroupBy::Feature), Error::NotFound(_));
    assert_err!(tl.settings(GHOST), Error::NotFound(_));
    assert_err!(tl.setting(GHOST, "color"), Error::NotFound(_));
    assert_err!(tl.set_setting(GHOST, "color", json!(1)), Error::NotFound(_));
    assert_err!(tl.patch_settings(GHOST, Map::new()), Error::NotFound(_));
    assert_err!(tl.replace_settings(GHOST, Map::new()), Error::NotFound(_));
    assert_err!(tl.update_user(GHOST, UserUpdate { display_name: Some("x".into()), ..UserUpdate::default() }), Error::NotFound(_));
    assert_err!(tl.delete_user(GHOST, true), Error::NotFound(_));
    assert_err!(tl.sign_out(GHOST), Error::NotFound(_));
    assert_err!(tl.sign_in(Profile { external_id: "sub-new".into(), ..Profile::default() }, Some(GHOST)), Error::NotFound(_));
    assert_eq!(e.snapshot(), before);
    assert_eq!(tl.users().unwrap().len(), 2, "the failed sign-in created no user");
}

#[test]
fn unknown_feature_and_not_in_plan_are_decisions_that_record_nothing() {
    let (e, local, _) = seeded();
    let before = e.snapshot();
    for d in [e.tally.check(&local, "teleport", 1).unwrap(), e.tally.consume(&local, "teleport", 1, key("tp")).unwrap()] {
        assert!(!d.allowed);
        assert_eq!(d.reason, Reason::UnknownFeature);
        assert_eq!(d.access_reason, "free");
    }
    for feature in ["pro_only", "team_only", "export"] {
        let d = e.tally.consume(&local, feature, 1, UsageMeta::default()).unwrap();
        assert!(!d.allowed, "{feature}");
        assert_eq!(d.reason, Reason::NotInPlan, "{feature}");
        assert_eq!(e.tally.check(&local, feature, 1).unwrap().reason, Reason::NotInPlan);
    }
    assert_eq!(e.snapshot(), before);
    // usage of a feature the plan lacks is a clear error, not a zero.
    assert_err!(e.tally.usage(&local, "teleport"), Error::NotFound(_));
}

#[test]
fn bad_amounts_metadata_and_keys_are_rejected_without_change() {
    let (e, local, _) = seeded();
    let before = e.snapshot();
    let tl = &e.tally;
    for amount in [0, i64::MAX as u64 + 1, u64::MAX] {
        assert_err!(tl.check(&local, "ai_chat", amount), Error::InvalidInput(_));
        assert_err!(tl.consume(&local, "ai_chat", amount, UsageMeta::default()), Error::InvalidInput(_));
        assert_err!(tl.consume(&local, "images", amount, UsageMeta::default()), Error::InvalidInput(_));
    }
    let big = json!({"blob": "x".repeat(4097)});
    assert_err!(
        tl.consume(&local, "ai_chat", 1, UsageMeta { metadata: Some(big.clone()), ..UsageMeta::default() }),
        Error::InvalidInput(_)
    );
    // Exactly at the limit is fine (checked on another instance below, after the snapshot).
    assert_err!(
        tl.consume(&local, "ai_chat", 1, UsageMeta { idempotency_key: Some(String::new()), ..UsageMeta::default() }),
        Error::InvalidInput(_)
    );
    assert_err!(
        tl.consume(&local, "ai_chat", 1, UsageMeta { input_tokens: Some(u64::MAX), model: Some("gpt-4o".into()), ..UsageMeta::default() }),
        Error::InvalidInput(_)
    );
    assert_err!(tl.consume(&local, "", 1, UsageMeta::default()), Error::InvalidInput(_));
    assert_err!(tl.check(&local, &"f".repeat(129), 1), Error::InvalidInput(_));
    // One bad item fails the whole batch, the good items before it included.
    let items = vec![
        ConsumeItem { feature: "ai_chat".into(), amount: 1, meta: UsageMeta::default() },
        ConsumeItem { feature: "ai_chat".into(), amount: 0, meta: UsageMeta::default() },
    ];
    assert_err!(tl.consume_many(&local, &items), Error::InvalidInput(_));
    let items = vec![
        ConsumeItem { feature: "ai_chat".into(), amount: 1, meta: UsageMeta::default() },
        ConsumeItem { feature: "daily".into(), amount: 1, meta: UsageMeta { metadata: Some(big), ..UsageMeta::default() } },
    ];
    assert_err!(tl.consume_many(&local, &items), Error::InvalidInput(_));
    // The same key with another body is a conflict, in a batch too.
    assert_err!(tl.consume(&local, "ai_chat", 3, key("seed-1")), Error::IdempotencyConflict(_));
    assert_err!(tl.consume(&local, "daily", 2, key("seed-1")), Error::IdempotencyConflict(_));
    assert_err!(
        tl.consume(&local, "ai_chat", 2, UsageMeta { metadata: Some(json!({"a": 1})), ..key("seed-1") }),
        Error::IdempotencyConflict(_)
    );
    let items = vec![
        ConsumeItem { feature: "ai_chat".into(), amount: 1, meta: key("fresh") },
        ConsumeItem { feature: "ai_chat".into(), amount: 1, meta: key("seed-1") },
    ];
    assert_err!(tl.consume_many(&local, &items), Error::IdempotencyConflict(_));
    // Report range.
    assert_err!(tl.report(&local, t("2026-02-01T00:00:00Z"), t("2026-01-01T00:00:00Z"), GroupBy::Day), Error::InvalidInput(_));
    assert_eq!(e.snapshot(), before);

    let ok = json!({"s": "x".repeat(4096 - 8)});
    assert_eq!(serde_json::to_string(&ok).unwrap().len(), 4096);
    assert!(tl.consume(&local, "ai_chat", 1, UsageMeta { metadata: Some(ok), ..UsageMeta::default() }).unwrap().allowed);
}

#[test]
fn bad_settings_and_profiles_are_rejected_without_change() {
    let (e, local, _) = seeded();
    let before = e.snapshot();
    let tl = &e.tally;
    let long_key = "k".repeat(129);
    let huge = Value::String("v".repeat(16 * 1024 - 1)); // 16 KiB + 1 serialized
    assert_err!(tl.set_setting(&local, "", json!(1)), Error::InvalidInput(_));
    assert_err!(tl.set_setting(&local, &long_key, json!(1)), Error::InvalidInput(_));
    assert_err!(tl.set_setting(&local, "big", huge.clone()), Error::InvalidInput(_));
    assert_err!(tl.setting(&local, ""), Error::InvalidInput(_));
    let mut m = Map::new();
    m.insert("fine".into(), json!(1));
    m.insert("big".into(), huge.clone());
    assert_err!(tl.patch_settings(&local, m.clone()), Error::InvalidInput(_));
    assert_err!(tl.replace_settings(&local, m), Error::InvalidInput(_));
    let mut m = Map::new();
    m.insert(long_key.clone(), json!(1));
    assert_err!(tl.replace_settings(&local, m), Error::InvalidInput(_));
    assert_err!(
        tl.update_user(&local, UserUpdate { timezone: Some("Mars/Olympus_Mons".into()), ..UserUpdate::default() }),
        Error::InvalidInput(_)
    );
    assert_err!(
        tl.update_user(&local, UserUpdate { timezone: Some(String::new()), display_name: Some("changed".into()), ..UserUpdate::default() }),
        Error::InvalidInput(_)
    );
    assert_err!(
        tl.update_user(&local, UserUpdate { display_name: Some("a\u{0}b".into()), ..UserUpdate::default() }),
        Error::InvalidInput(_)
    );
    assert_err!(tl.sign_in(Profile::default(), None), Error::InvalidInput(_));
    assert_err!(tl.create_local_user(Some(&"n".repeat(300))), Error::InvalidInput(_));
    assert_eq!(e.snapshot(), before);
    // 128-byte keys and values of exactly 16 KiB serialized are fine.
    let k128 = "k".repeat(128);
    tl.set_setting(&local, &k128, Value::String("v".repeat(16 * 1024 - 2))).unwrap();
    assert!(tl.setting(&local, &k128).unwrap().is_some());
}

#[test]
fn attach_local_must_name_a_local_user() {
    let (e, local, signed) = seeded();
    let before = e.snapshot();
    let profile = Profile { external_id: "sub-2".into(), email: Some("c@example.com".into()), ..Profile::default() };
    assert_err!(e.tally.sign_in(profile.clone(), Some(&signed)), Error::InvalidInput(_));
    // Re-signing-in sub-1 while attaching itself.
    assert_err!(e.tally.sign_in(Profile { external_id: "sub-1".into(), ..Profile::default() }, Some(&signed)), Error::InvalidInput(_));
    assert_eq!(e.snapshot(), before, "neither sub-2 was created nor anything moved");
    assert_eq!(e.tally.user(&local).unwrap().external_id, None);
}

#[test]
fn delete_user_refuses_unsynced_events_without_force() {
    let (e, local, _) = seeded();
    let before = e.snapshot();
    assert_err!(e.tally.delete_user(&local, false), Error::UnsyncedEvents(1));
    assert_eq!(e.snapshot(), before);
    // A user without events is deleted without force.
    let empty = e.tally.create_local_user(None).unwrap();
    e.tally.set_setting(&empty.id, "a", json!(1)).unwrap();
    e.tally.delete_user(&empty.id, false).unwrap();
    assert_err!(e.tally.user(&empty.id), Error::NotFound(_));
}

#[test]
fn malformed_catalogs_and_entitlements_are_clear_errors() {
    let (e, local, _) = seeded();
    let before = e.snapshot();
    for (json, path) in [
        ("{", "$"),
        (r#"{"plans":[{"id":"free","features":{"x":{"type":"metered","limit":-3,"period":"day"}}}]}"#, "plans[0].features.x.limit"),
        (r#"{"plans":[{"id":"free"},{"id":"free"}]}"#, "plans[1].id"),
        (r#"{"plans":[{"id":"p","features":{"x":{"type":"rate","limit":1,"window_secs":0}}}]}"#, "plans[0].features.x.window_secs"),
        (r#"{"plans":[{"id":"p","features":{"x":{"type":"bogus"}}}]}"#, "plans[0].features.x.type"),
    ] {
        match Catalog::from_json(json) {
            Err(Error::InvalidCatalog { path: p, message }) => {
                assert_eq!(p, path, "{json}");
                assert!(!message.is_empty());
            }
            other => panic!("{json}: {other:?}"),
        }
    }
    let tl = &e.tally;
    let unknown_plan = Entitlements { plan: "platinum".into(), status: SubscriptionStatus::Active, ..Entitlements::free() };
    assert_err!(tl.set_entitlements(&local, unknown_plan), Error::InvalidInput(_));
    let backwards = Entitlements {
        plan: "pro".into(),
        status: SubscriptionStatus::Active,
        period_start: Some(t("2026-02-01T00:00:00Z")),
        period_end: Some(t("2026-01-01T00:00:00Z")),
        ..Entitlements::free()
    };
    assert_err!(tl.set_entitlements(&local, backwards), Error::InvalidInput(_));
    let bad_grant = Entitlements {
        credit_grants: vec![tally_core::CreditGrant {
            id: tally_core::credits::DEBT_GRANT_ID.into(),
            remaining: 5,
            expires_at: None,
            source: String::new(),
        }],
        ..Entitlements::free()
    };
    assert_err!(tl.set_entitlements(&local, bad_grant), Error::InvalidInput(_));
    assert_eq!(e.snapshot(), before);
}
