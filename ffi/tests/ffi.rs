//! Tests of the FFI surface itself, called as the foreign side would call it: conversions,
//! signed integers, error mapping, JSON validation, the panic guard, foreign callbacks, and concurrent
//! calls on one `Tally`.

use std::collections::HashMap;
use std::sync::atomic::{AtomicI64, Ordering};
use std::sync::{Arc, Mutex};
use tally_ffi::*;

const CATALOG: &str = r#"{"models": {"gpt-4o": {"input_micros_per_mtok": 2500000, "output_micros_per_mtok": 10000000}},
 "plans": [{"id": "free", "features": {
   "ai_chat": {"type": "metered", "limit": 3, "period": "month", "enforcement": "hard"},
   "export":  {"type": "flag", "enabled": false},
   "images":  {"type": "credits", "cost": 10},
   "api":     {"type": "rate", "limit": 100, "window_secs": 60},
   "spend":   {"type": "budget", "limit_micros": 2000000, "period": "day", "enforcement": "soft"}}},
  {"id": "pro", "features": {
   "ai_chat": {"type": "metered", "limit": null, "period": "month", "enforcement": "hard"}}}]}"#;

/// 2025-03-10T12:00:00Z
const T0: i64 = 1_741_608_000_000;

#[derive(Debug)]
struct FixedClock(AtomicI64);

impl TallyClock for FixedClock {
    fn now_ms(&self) -> i64 {
        self.0.load(Ordering::SeqCst)
    }
}

fn config(clock: Option<Arc<FixedClock>>) -> TallyConfig {
    TallyConfig {
        device_id: Some("dev-1".into()),
        durability: Some(Durability::Normal),
        default_settings_json: Some(r#"{"theme": "light"}"#.into()),
        local_only_settings: vec!["theme".into()],
        catalog_json: Some(CATALOG.into()),
        past_due_grace_secs: Some(3600),
        token_grace_secs: Some(3600),
        busy_timeout_ms: Some(5000),
        server_keys: None,
        offline_features: vec!["ai_chat".into()],
        clock: clock.map(|c| c as Arc<dyn TallyClock>),
        encryption_key: None,
    }
}

#[test]
fn a_disabled_account_and_a_wrong_key_have_their_own_errors() {
    assert!(matches!(TallyError::from(tally_core::Error::AccountDisabled), TallyError::AccountDisabled { .. }));
    let e = TallyError::from(tally_core::Error::EncryptionKey("wrong".into()));
    assert!(matches!(e, TallyError::EncryptionKey { ref message } if message.contains("wrong")), "{e:?}");
}

fn open() -> (Arc<Tally>, Arc<FixedClock>) {
    let clock = Arc::new(FixedClock(AtomicI64::new(T0)));
    (Tally::open_in_memory(config(Some(clock.clone()))).expect("open"), clock)
}

fn is_invalid<T: std::fmt::Debug>(r: Result<T, TallyError>) -> bool {
    matches!(r, Err(TallyError::InvalidInput { .. }))
}

#[test]
fn config_converts_and_validates() {
    let core = tally_core::Config::try_from(config(None)).expect("config");
    assert_eq!(core.device_id.as_deref(), Some("dev-1"));
    assert_eq!(core.default_settings.get("theme"), Some(&serde_json::json!("light")));
    assert_eq!(core.past_due_grace, chrono::Duration::hours(1));
    assert_eq!(core.busy_timeout, std::time::Duration::from_secs(5));
    assert_eq!(core.catalog.plans.len(), 2);

    let bad_json = TallyConfig { default_settings_json: Some("{oops".into()), ..config(None) };
    assert!(
        matches!(Tally::open_in_memory(bad_json), Err(TallyError::InvalidInput { message }) if message.contains("default_settings_json"))
    );
    let not_object = TallyConfig { default_settings_json: Some("[1]".into()), ..config(None) };
    assert!(
        matches!(Tally::open_in_memory(not_object), Err(TallyError::InvalidInput { message }) if message.contains("must be a JSON object"))
    );
    let bad_catalog = TallyConfig {
        catalog_json: Some(r#"{"plans":[{"id":"free","features":{"x":{"type":"metered","limit":-1,"period":"day"}}}]}"#.into()),
        ..config(None)
    };
    assert!(
        matches!(Tally::open_in_memory(bad_catalog), Err(TallyError::InvalidCatalog { message }) if message.contains("plans[0].features.x.limit"))
    );
    let huge = TallyConfig { token_grace_secs: Some(i64::MAX), ..config(None) };
    assert!(is_invalid(Tally::open_in_memory(huge)));
    for negative in
        [TallyConfig { past_due_grace_secs: Some(-1), ..config(None) }, TallyConfig { busy_timeout_ms: Some(-5), ..config(None) }]
    {
        assert!(
            matches!(Tally::open_in_memory(negative), Err(TallyError::InvalidInput { message }) if message.contains("must not be negative"))
        );
    }
}

#[test]
fn foreign_clock_drives_time() {
    let (t, clock) = open();
    let u = t.create_local_user(Some("Ada".into())).unwrap();
    assert_eq!(u.created_at_ms, T0);
    let d = t.consume(u.id.clone(), "ai_chat".into(), 1, None).unwrap();
    assert_eq!(d.resets_at_ms, Some(1_743_465_600_000)); // 2025-04-01T00:00:00Z
    clock.0.store(1_743_465_600_000 + 1000, Ordering::SeqCst);
    assert_eq!(t.usage(u.id.clone(), "ai_chat".into()).unwrap().used, 0, "next month");
    // Moving the clock back does not go below the highest time seen.
    clock.0.store(T0 - 86_400_000, Ordering::SeqCst);
    assert!(t.highest_seen_time_ms().unwrap() >= T0);
}

#[test]
fn records_convert_from_the_core_and_back_where_the_app_sends_them() {
    let now = chrono::DateTime::from_timestamp_millis(T0).unwrap();
    let user = tally_core::User {
        id: "u1".into(),
        external_id: Some("sub".into()),
        email: None,
        display_name: Some("Ada".into()),
        avatar_url: None,
        timezone: "Europe/Paris".into(),
        is_admin: true,
        signed_in: true,
        created_at: now,
        updated_at: now,
    };
    let ffi = User::from(user.clone());
    assert_eq!((ffi.created_at_ms, ffi.timezone.as_str(), ffi.is_admin), (T0, "Europe/Paris", true));

    let decision = tally_core::Decision {
        allowed: false,
        reason: tally_core::Reason::LimitReached,
        used: 5,
        limit: Some(5),
        remaining: Some(0),
        resets_at: Some(now),
        access_reason: "free".into(),
        over_limit_by: 0,
        device_remaining: Some(2),
        held_offline: None,
    };
    let ffi = Decision::from(decision);
    // The core's enums cross as they are.
    assert_eq!(ffi.reason, tally_core::Reason::LimitReached);
    assert_eq!((ffi.used, ffi.limit, ffi.remaining, ffi.resets_at_ms, ffi.device_remaining), (5, Some(5), Some(0), Some(T0), Some(2)));
    let huge = tally_core::Decision { used: u64::MAX, ..tally_core::Decision::simple(true, tally_core::Reason::Ok, "free") };
    assert_eq!(Decision::from(huge).used, i64::MAX, "a count past i64 saturates");

    let catalog = tally_core::Catalog::from_json(CATALOG).unwrap();
    let mut ent = tally_core::Entitlements::free();
    ent.plan = "pro".into();
    ent.status = tally_core::SubscriptionStatus::PastDue;
    ent.past_due_since = Some(now);
    ent.period_start = Some(now);
    ent.period_end = Some(now + chrono::Duration::days(30));
    ent.features = catalog.plans[0].features.clone();
    ent.free_features = catalog.plans[0].features.clone();
    ent.models = catalog.models.clone();
    ent.grants = vec![tally_core::AccessGrant { plan: "pro".into(), until: Some(now), granted_by: "admin".into(), reason: "beta".into() }];
    ent.credit_grants = vec![tally_core::CreditGrant { id: "g1".into(), remaining: 50, expires_at: None, source: "plan".into() }];
    ent.tz = Some("Asia/Tokyo".into());
    ent.ver = 7;
    let ffi = Entitlements::from(ent.clone());
    assert_eq!(ffi.features.len(), 5);
    assert_eq!(
        ffi.features["spend"],
        Rule::Budget { limit_micros: 2_000_000, period: Period::Day, enforcement: Enforcement::Soft, offline_share: 1.0 }
    );
    assert_eq!(ffi.models["gpt-4o"].output_micros_per_mtok, 10_000_000);
    assert_eq!(tally_core::Entitlements::try_from(ffi).unwrap(), ent);

    let meta = UsageMeta {
        idempotency_key: Some("k".into()),
        model: Some("gpt-4o".into()),
        input_tokens: Some(1),
        output_tokens: Some(2),
        metadata_json: Some(r#"{"a":1}"#.into()),
    };
    let core_meta = tally_core::UsageMeta::try_from(meta.clone()).unwrap();
    assert_eq!(core_meta.metadata, Some(serde_json::json!({"a": 1})));
    assert_eq!((core_meta.input_tokens, core_meta.output_tokens), (Some(1), Some(2)));
    let negative = UsageMeta { input_tokens: Some(-1), ..meta };
    assert!(
        matches!(tally_core::UsageMeta::try_from(negative), Err(TallyError::InvalidInput { message }) if message.contains("input_tokens"))
    );

    let status = tally_core::EventStatus::Rejected("conflict".into());
    assert_eq!(EventStatus::from(status), EventStatus::Rejected { reason: "conflict".into() });

    let report = tally_core::SyncReport {
        events_sent: 3,
        events_acked: 2,
        duplicates: 1,
        rejected: vec![tally_core::wire::Rejected { id: "e".into(), reason: "conflict".into() }],
        settings_sent: 1,
        settings_received: 2,
        rounds: 1,
        entitlements_updated: true,
        settings_rejected: vec![tally_core::wire::SettingRejected { key: "k".into(), reason: "quota_exceeded".into() }],
        profile_rejected: vec![tally_core::wire::ProfileRejected { field: "display_name".into(), reason: "invalid_text".into() }],
        unknown_features: vec!["new_feature".into()],
    };
    let ffi = SyncReport::from(report);
    assert_eq!((ffi.events_sent, ffi.events_acked, ffi.duplicates, ffi.rounds), (3, 2, 1, 1));
    assert_eq!(ffi.rejected, vec![RejectedEvent { id: "e".into(), reason: "conflict".into() }]);
    assert_eq!(ffi.settings_rejected, vec![RejectedSetting { key: "k".into(), reason: "quota_exceeded".into() }]);
    assert_eq!(ffi.profile_rejected, vec![RejectedProfileField { field: "display_name".into(), reason: "invalid_text".into() }]);

    let change = tally_core::Change { usage: true, entitlements: false, settings: true };
    assert_eq!(Change::from(change), Change { usage: true, entitlements: false, settings: true });

    // Out-of-range timestamps from the foreign side are rejected, not wrapped.
    let bad = Entitlements { period_start_ms: Some(i64::MAX), ..Entitlements::from(tally_core::Entitlements::free()) };
    assert!(
        matches!(tally_core::Entitlements::try_from(bad), Err(TallyError::InvalidInput { message }) if message.contains("period_start_ms"))
    );
}

#[test]
fn core_errors_map_to_variants() {
    use tally_core::Error as E;
    type Check = fn(&TallyError) -> bool;
    let cases: Vec<(E, Check)> = vec![
        (E::NotFound("user x".into()), |e| matches!(e, TallyError::NotFound { .. })),
        (E::invalid("bad"), |e| matches!(e, TallyError::InvalidInput { .. })),
        (E::catalog("plans[0]", "bad"), |e| matches!(e, TallyError::InvalidCatalog { message } if message.contains("plans[0]"))),
        (E::IdempotencyConflict("id".into()), |e| matches!(e, TallyError::IdempotencyConflict { .. })),
        (E::UnsyncedEvents(4), |e| matches!(e, TallyError::UnsyncedEvents { message } if message.contains('4'))),
        (E::SchemaTooNew { found: 9, supported: 1 }, |e| matches!(e, TallyError::SchemaTooNew { .. })),
        (E::Storage(rusqlite_error()), |e| matches!(e, TallyError::Storage { .. })),
        (E::Migration("m".into()), |e| matches!(e, TallyError::Storage { .. })),
        (E::Unauthorized("expired".into()), |e| matches!(e, TallyError::Unauthorized { .. })),
        (E::AccountDeleted, |e| matches!(e, TallyError::AccountDeleted { .. })),
        (E::Network("refused".into()), |e| matches!(e, TallyError::Network { .. })),
        (
            E::Server { status: 500, code: "internal".into(), message: "boom".into() },
            |e| matches!(e, TallyError::Server { message } if message.contains("500")),
        ),
        (E::InvalidToken("sig".into()), |e| matches!(e, TallyError::InvalidToken { .. })),
        (
            E::PurchaseRefused { status: 409, code: "bound_to_other_user".into(), message: "another account's".into() },
            |e| matches!(e, TallyError::PurchaseRefused { message } if message.contains("bound_to_other_user")),
        ),
    ];
    for (core, check) in cases {
        let text = core.to_string();
        let e = TallyError::from(core);
        assert!(check(&e), "{text} mapped to {e:?}");
        assert_eq!(e.to_string(), text, "the message is the core's");
    }
}

fn rusqlite_error() -> rusqlite::Error {
    rusqlite::Error::InvalidQuery
}

#[test]
fn storage_errors_reach_the_foreign_side() {
    let dir = tempfile::tempdir().unwrap();
    // A directory is not a database file.
    let r = Tally::open(dir.path().to_string_lossy().into_owned(), config(None));
    assert!(matches!(r, Err(TallyError::Storage { .. })), "{r:?}");
}

#[test]
fn panics_become_internal_errors() {
    let r: Result<u32, TallyError> = guard(|| panic!("boom at the boundary"));
    assert_eq!(r, Err(TallyError::Internal { message: "internal error: boom at the boundary".into() }));
    let r: Result<u32, TallyError> = guard(|| {
        let v: Vec<u32> = Vec::new();
        #[allow(clippy::useless_vec)]
        Ok(v[3])
    });
    assert!(matches!(r, Err(TallyError::Internal { message }) if message.contains("index out of bounds")));
    assert_eq!(guard(|| Ok(7)), Ok(7));
}

#[derive(Debug)]
struct ThrowingClock;
impl TallyClock for ThrowingClock {
    fn now_ms(&self) -> i64 {
        panic!("the foreign clock threw")
    }
}

struct ThrowingListener;
impl ChangeListener for ThrowingListener {
    fn on_change(&self, _: String, _: Change) {
        panic!("the foreign listener threw")
    }
}

#[test]
fn failing_foreign_callbacks_do_not_break_calls() {
    let t = Tally::open_in_memory(TallyConfig { clock: Some(Arc::new(ThrowingClock)), ..config(None) }).unwrap();
    t.set_listener(Arc::new(ThrowingListener)).unwrap();
    let u = t.create_local_user(None).unwrap().id;
    let d = t.consume(u.clone(), "ai_chat".into(), 1, None).expect("the consume committed and answers");
    assert!(d.allowed);
    assert_eq!(t.usage(u, "ai_chat".into()).unwrap().used, 1);
}

#[derive(Default)]
struct Recorder(Mutex<Vec<(String, Change)>>);
impl ChangeListener for Recorder {
    fn on_change(&self, user_id: String, change: Change) {
        self.0.lock().unwrap().push((user_id, change));
    }
}

#[test]
fn listener_is_told_about_changes() {
    let (t, _) = open();
    let rec = Arc::new(Recorder::default());
    t.set_listener(rec.clone()).unwrap();
    let u = t.create_local_user(None).unwrap().id;
    t.consume(u.clone(), "ai_chat".into(), 1, None).unwrap();
    t.set_setting(u.clone(), "k".into(), "1".into()).unwrap();
    let seen = rec.0.lock().unwrap().clone();
    assert!(seen.iter().any(|(id, c)| id == &u && c.usage), "{seen:?}");
    assert!(seen.iter().any(|(id, c)| id == &u && c.settings), "{seen:?}");
    t.clear_listener().unwrap();
    let before = rec.0.lock().unwrap().len();
    t.consume(u, "ai_chat".into(), 1, None).unwrap();
    assert_eq!(rec.0.lock().unwrap().len(), before);
}

#[test]
fn json_values_cross_as_strings_and_are_validated() {
    let (t, _) = open();
    let u = t.create_local_user(None).unwrap().id;
    assert_eq!(t.setting(u.clone(), "theme".into()).unwrap().as_deref(), Some("\"light\""));
    t.set_setting(u.clone(), "layout".into(), r#"{"cols": 2, "tags": ["a", "b"], "ratio": 0.5}"#.into()).unwrap();
    assert_eq!(t.setting(u.clone(), "layout".into()).unwrap().as_deref(), Some(r#"{"cols":2,"ratio":0.5,"tags":["a","b"]}"#));
    assert_eq!(t.setting_status(u.clone(), "layout".into()).unwrap(), SettingStatus::Pending);
    assert_eq!(t.setting_status(u.clone(), "theme".into()).unwrap(), SettingStatus::NotSet, "a default is not stored");
    t.set_setting(u.clone(), "theme".into(), "\"dark\"".into()).unwrap();
    assert_eq!(t.setting_status(u.clone(), "theme".into()).unwrap(), SettingStatus::LocalOnly);
    assert!(is_invalid(t.setting_status(u.clone(), "".into())));
    let all: serde_json::Value = serde_json::from_str(&t.settings(u.clone()).unwrap()).unwrap();
    assert_eq!(all["layout"]["cols"], 2);
    assert_eq!(all["theme"], "dark");

    for bad in ["", "{", "{'a': 1}", "undefined", "[1,]", "01"] {
        let r = t.set_setting(u.clone(), "layout".into(), bad.into());
        assert!(matches!(&r, Err(TallyError::InvalidInput { message }) if message.contains("not valid JSON")), "{bad:?}: {r:?}");
    }
    for bad in ["[1, 2]", "\"x\"", "3", "null"] {
        assert!(is_invalid(t.patch_settings(u.clone(), bad.into())), "{bad:?}");
        assert!(is_invalid(t.replace_settings(u.clone(), bad.into())), "{bad:?}");
    }
    assert!(is_invalid(t.consume(
        u.clone(),
        "ai_chat".into(),
        1,
        Some(UsageMeta { metadata_json: Some("{x".into()), ..Default::default() })
    )));
    // Nothing changed.
    let after: serde_json::Value = serde_json::from_str(&t.settings(u.clone()).unwrap()).unwrap();
    assert_eq!(after, all);
    assert_eq!(t.pending_events(u).unwrap(), 0);

    t.patch_settings(t.users().unwrap()[0].id.clone(), r#"{"layout": null, "n": 1}"#.into()).unwrap();
}

#[test]
fn bad_input_gets_the_right_variant_and_changes_nothing() {
    let (t, _) = open();
    let u = t.create_local_user(Some("Ada".into())).unwrap();
    t.consume(u.id.clone(), "ai_chat".into(), 1, Some(UsageMeta { idempotency_key: Some("k1".into()), ..Default::default() })).unwrap();
    let snapshot = (
        t.users().unwrap(),
        t.settings(u.id.clone()).unwrap(),
        t.usage(u.id.clone(), "ai_chat".into()).unwrap(),
        t.pending_events(u.id.clone()).unwrap(),
    );

    // Unknown user.
    assert!(matches!(t.consume("nobody".into(), "ai_chat".into(), 1, None), Err(TallyError::NotFound { .. })));
    assert!(matches!(t.set_setting("nobody".into(), "a".into(), "1".into()), Err(TallyError::NotFound { .. })));
    assert!(matches!(t.update_user("nobody".into(), UserUpdate::default()), Err(TallyError::NotFound { .. })));
    assert!(matches!(t.event_status(u.id.clone(), "no-such-event".into()), Err(TallyError::NotFound { .. })));
    // Negative, zero and overflowing amounts.
    assert!(
        matches!(t.consume(u.id.clone(), "ai_chat".into(), -1, None), Err(TallyError::InvalidInput { message }) if message.contains("amount must not be negative"))
    );
    assert!(is_invalid(t.check(u.id.clone(), "ai_chat".into(), -1)));
    assert!(is_invalid(t.consume(u.id.clone(), "ai_chat".into(), 0, None)));
    assert!(is_invalid(t.consume(u.id.clone(), "ai_chat".into(), i64::MAX, None)));
    for bad in [-1, i64::MAX] {
        assert!(is_invalid(t.consume_many(
            u.id.clone(),
            vec![
                ConsumeItem { feature: "ai_chat".into(), amount: 1, meta: None },
                ConsumeItem { feature: "ai_chat".into(), amount: bad, meta: None }
            ]
        )));
    }
    assert!(is_invalid(t.prepare_offline(u.id.clone(), "ai_chat".into(), -1)));
    let negative_rule = Entitlements {
        plan: "pro".into(),
        features: HashMap::from([("ai_chat".to_string(), Rule::Credits { cost: -1 })]),
        ..Entitlements::from(tally_core::Entitlements::free())
    };
    assert!(
        matches!(t.set_entitlements(u.id.clone(), negative_rule), Err(TallyError::InvalidInput { message }) if message.contains("cost"))
    );
    // Invalid timezone.
    assert!(
        matches!(t.update_user(u.id.clone(), UserUpdate { timezone: Some("Not/AZone".into()), display_name: Some("Bob".into()), ..Default::default() }), Err(TallyError::InvalidInput { message }) if message.contains("timezone"))
    );
    // Idempotency conflict.
    assert!(matches!(
        t.consume(u.id.clone(), "ai_chat".into(), 2, Some(UsageMeta { idempotency_key: Some("k1".into()), ..Default::default() })),
        Err(TallyError::IdempotencyConflict { .. })
    ));
    // Bad catalog, bad time range, bad entitlements.
    assert!(matches!(t.set_catalog("{\"plans\": 3}".into()), Err(TallyError::InvalidCatalog { .. })));
    assert!(is_invalid(t.report(u.id.clone(), T0, T0 - 1, GroupBy::Day)));
    assert!(is_invalid(t.report(u.id.clone(), i64::MIN, T0, GroupBy::Day)));
    let unknown_plan = Entitlements {
        plan: "platinum".into(),
        status: SubscriptionStatus::Active,
        ..Entitlements::from(tally_core::Entitlements::free())
    };
    assert!(is_invalid(t.set_entitlements(u.id.clone(), unknown_plan)));

    let now = (
        t.users().unwrap(),
        t.settings(u.id.clone()).unwrap(),
        t.usage(u.id.clone(), "ai_chat".into()).unwrap(),
        t.pending_events(u.id.clone()).unwrap(),
    );
    assert_eq!(now, snapshot, "bad input changed nothing");
    assert_eq!(t.check(u.id, "ai_chat".into(), 1).unwrap().limit, Some(3), "the catalog was kept");
}

#[test]
fn quota_calls_through_the_ffi() {
    let (t, _) = open();
    let u = t.create_local_user(None).unwrap().id;
    for i in 1..=3i64 {
        let d = t.consume(u.clone(), "ai_chat".into(), 1, None).unwrap();
        assert!(d.allowed && d.used == i);
    }
    let d = t.consume(u.clone(), "ai_chat".into(), 1, None).unwrap();
    assert_eq!((d.allowed, d.reason, d.remaining), (false, Reason::LimitReached, Some(0)));
    assert_eq!(t.check(u.clone(), "export".into(), 1).unwrap().reason, Reason::NotInPlan);
    assert_eq!(t.check(u.clone(), "nope".into(), 1).unwrap().reason, Reason::UnknownFeature);
    let d = t
        .consume(
            u.clone(),
            "spend".into(),
            1,
            Some(UsageMeta { model: Some("gpt-4o".into()), input_tokens: Some(1_000_000), output_tokens: Some(0), ..Default::default() }),
        )
        .unwrap();
    assert_eq!(d.reason, Reason::BudgetExceeded, "a budget always records and flags");

    t.set_entitlements(
        u.clone(),
        Entitlements {
            plan: "pro".into(),
            status: SubscriptionStatus::Active,
            credit_grants: vec![CreditGrant { id: "g".into(), remaining: 25, expires_at_ms: None, source: "purchase".into() }],
            ..Entitlements::from(tally_core::Entitlements::free())
        },
    )
    .unwrap();
    let e = t.entitlements(u.clone()).unwrap();
    assert_eq!((e.plan.as_str(), e.access_reason.as_str(), e.credit_balance), ("pro", "subscription", 25));
    assert_eq!(
        e.features.get("ai_chat"),
        Some(&Rule::Metered { limit: None, period: Period::Month, enforcement: Enforcement::Hard, offline_share: 1.0 })
    );
    assert_eq!(t.credit_balance(u.clone()).unwrap(), 25);
    assert_eq!(t.consume(u.clone(), "ai_chat".into(), 1, None).unwrap().limit, None);

    let rows = t.report(u.clone(), T0 - 1, T0 + 1, GroupBy::Feature).unwrap();
    assert_eq!(rows.iter().map(|r| (r.key.as_str(), r.events)).collect::<Vec<_>>(), vec![("ai_chat", 4), ("spend", 1)]);
    assert_eq!(rows[1].cost_micros, 2_500_000);
    let ids: HashMap<String, i64> =
        t.report(u.clone(), T0 - 1, T0 + 1, GroupBy::Model).unwrap().into_iter().map(|r| (r.key, r.amount)).collect();
    assert_eq!(ids.get("gpt-4o"), Some(&1));
    assert_eq!(t.pending_events(u.clone()).unwrap(), 5);
    assert_eq!(t.last_synced_at_ms(u).unwrap(), None);
    assert_eq!(event_id_for_key("abc".into()), event_id_for_key("abc".into()));
    assert!(validate_catalog(CATALOG.into()).is_ok());
}

#[test]
fn concurrent_calls_from_several_threads_on_one_tally() {
    let dir = tempfile::tempdir().unwrap();
    let t = Tally::open(
        dir.path().join("t.db").to_string_lossy().into_owned(),
        TallyConfig { catalog_json: Some(CATALOG.into()), ..config(None) },
    )
    .unwrap();
    let users: Vec<String> = (0..4).map(|_| t.create_local_user(None).unwrap().id).collect();
    for u in &users {
        t.set_entitlements(
            u.clone(),
            Entitlements { plan: "pro".into(), status: SubscriptionStatus::Active, ..Entitlements::from(tally_core::Entitlements::free()) },
        )
        .unwrap();
    }
    std::thread::scope(|s| {
        for th in 0..8 {
            let t = t.clone();
            let users = users.clone();
            s.spawn(move || {
                for i in 0..50 {
                    let u = users[(th + i) % users.len()].clone();
                    // Keys repeat across threads: each key counts once.
                    let key = format!("{u}-{}", i % 25);
                    let d = t
                        .consume(u.clone(), "ai_chat".into(), 1, Some(UsageMeta { idempotency_key: Some(key), ..Default::default() }))
                        .unwrap();
                    assert!(d.allowed);
                    t.set_setting(u.clone(), format!("t{th}"), i.to_string()).unwrap();
                    t.usage(u.clone(), "ai_chat".into()).unwrap();
                    t.entitlements(u).unwrap();
                }
            });
        }
    });
    for u in &users {
        assert_eq!(t.usage(u.clone(), "ai_chat".into()).unwrap().used, t.pending_events(u.clone()).unwrap());
        let settings: serde_json::Value = serde_json::from_str(&t.settings(u.clone()).unwrap()).unwrap();
        assert_eq!(settings.as_object().unwrap().len(), 9, "8 thread keys + the default theme");
    }
    let total: i64 = users.iter().map(|u| t.usage(u.clone(), "ai_chat".into()).unwrap().used).sum();
    assert_eq!(total, 4 * 25, "distinct (user, key) pairs");
}

#[tokio::test]
async fn sync_is_async_and_maps_network_errors() {
    let keys = r#"{"keys":[{"kty":"OKP","crv":"Ed25519","x":"11qYAYKxCrfVS_7TyWQHOg7hcvPapiMlrwIaaPcHURo","kid":"k"}]}"#;
    let t = Tally::open_in_memory(TallyConfig { server_keys: Some(keys.into()), ..config(None) }).expect("open");
    let unconfigured = Tally::open_in_memory(config(None)).expect("open");
    let v =
        unconfigured.sign_in(Profile { external_id: "sub-1".into(), email: None, display_name: None, avatar_url: None }, None).unwrap().id;
    let u = t.sign_in(Profile { external_id: "sub-1".into(), email: None, display_name: None, avatar_url: None }, None).unwrap().id;
    t.consume(u.clone(), "ai_chat".into(), 1, None).unwrap();
    let options = closed_port_options;
    let r = unconfigured.sync(v, options()).await;
    assert!(matches!(r, Err(TallyError::Configuration { .. })), "sync without server_keys: {r:?}");
    let r = t.sync(u.clone(), options()).await;
    assert!(matches!(r, Err(TallyError::Network { .. })), "{r:?}");
    assert_eq!(t.pending_events(u).unwrap(), 1, "nothing lost");
}

#[test]
fn leases_and_voids_cross_the_boundary() {
    let (t, _) = open();
    let u = t.create_local_user(None).unwrap().id;
    assert!(is_invalid(t.prepare_offline(u.clone(), "ai_chat".into(), 0)), "0 units");
    assert!(is_invalid(t.prepare_offline(u.clone(), "export".into(), 1)), "a flag is no pool");
    assert!(is_invalid(t.prepare_offline(u.clone(), "spend".into(), 1)), "a soft budget is no pool");
    t.prepare_offline(u.clone(), "ai_chat".into(), 2).unwrap();
    assert!(t.leases(u.clone()).unwrap().is_empty(), "no device token yet");
    let meta = UsageMeta { idempotency_key: Some("k1".into()), ..UsageMeta::default() };
    assert!(t.consume(u.clone(), "ai_chat".into(), 2, Some(meta)).unwrap().allowed);
    let usage = t.usage(u.clone(), "ai_chat".into()).unwrap();
    assert_eq!((usage.used, usage.device_allowance, usage.device_remaining), (2, None, None));
    t.void(u.clone(), "k1".into(), Some("refund".into())).unwrap();
    t.void(u.clone(), "k1".into(), None).unwrap();
    assert_eq!(t.usage(u.clone(), "ai_chat".into()).unwrap().used, 0);
    assert_eq!(t.pending_events(u.clone()).unwrap(), 2, "the use and one void");
    assert!(matches!(t.void(u, "nope".into(), None), Err(TallyError::NotFound { .. })));
}

#[derive(Default)]
struct Observer(Mutex<Vec<UserChange>>);
impl ChangeObserver for Observer {
    fn on_user_change(&self, change: UserChange) {
        self.0.lock().unwrap().push(change);
    }
}

struct ThrowingObserver;
impl ChangeObserver for ThrowingObserver {
    fn on_user_change(&self, _: UserChange) {
        panic!("the foreign observer threw")
    }
}

#[test]
fn observers_and_the_listener_are_all_told_and_never_replace_each_other() {
    let (t, _) = open();
    let (a, b, rec) = (Arc::new(Observer::default()), Arc::new(Observer::default()), Arc::new(Recorder::default()));
    let ia = t.add_observer(a.clone()).unwrap();
    t.add_observer(Arc::new(ThrowingObserver)).unwrap();
    t.set_listener(rec.clone()).unwrap();
    let ib = t.add_observer(b.clone()).unwrap();
    assert_eq!(t.observer_count().unwrap(), 3);
    let u = t.create_local_user(None).unwrap().id;
    t.consume(u.clone(), "ai_chat".into(), 2, None).unwrap();
    for o in [&a, &b] {
        let seen = o.0.lock().unwrap().clone();
        let last = seen.last().expect("told");
        assert_eq!((last.user_id.as_str(), last.change.usage), (u.as_str(), true));
        let info = last.info.as_ref().expect("the snapshot rides along");
        assert_eq!(info.features["ai_chat"].usage.used, 2);
        assert_eq!(info.pending_events, 1, "one use of 2");
        assert!(last.is_current_user, "the only anonymous user is the current one");
    }
    assert_eq!(rec.0.lock().unwrap().len(), 1, "the listener slot too");
    assert!(t.remove_observer(ia).unwrap());
    assert!(!t.remove_observer(ia).unwrap(), "removed once");
    t.consume(u.clone(), "ai_chat".into(), 1, None).unwrap();
    assert_eq!(a.0.lock().unwrap().len(), 1, "a removed observer is not told");
    assert_eq!(b.0.lock().unwrap().len(), 2);
    // Deleting the user: the change arrives without a snapshot.
    t.delete_user(u.clone(), true).unwrap();
    assert!(b.0.lock().unwrap().last().unwrap().info.is_none());
    assert!(t.remove_observer(ib).unwrap());
}

#[test]
fn the_current_user_logs_in_and_out_and_the_multi_user_calls_still_work() {
    let (t, _) = open();
    let obs = Arc::new(Observer::default());
    t.add_observer(obs.clone()).unwrap();
    let anon = t.current_user().unwrap();
    assert_eq!((anon.external_id.as_deref(), t.current_user().unwrap().id.as_str()), (None, anon.id.as_str()));
    t.consume(anon.id.clone(), "ai_chat".into(), 1, None).unwrap();
    assert!(obs.0.lock().unwrap().last().unwrap().is_current_user);

    let ada = t.log_in("ada".into(), Some("ada@example.com".into()), None, None).unwrap();
    assert_eq!(ada.email.as_deref(), Some("ada@example.com"));
    assert_eq!(t.current_user().unwrap().id, ada.id);
    assert_eq!(t.current_customer_info().unwrap().features["ai_chat"].usage.used, 1, "the anonymous use moved");
    let last = obs.0.lock().unwrap().iter().rev().find(|c| c.user_id == ada.id).cloned().expect("told about the account");
    assert!(last.is_current_user);
    assert!(is_invalid(t.log_in("".into(), None, None, None)));
    assert_eq!(t.current_user().unwrap().id, ada.id, "a bad log-in changed nothing");

    let fresh = t.log_out().unwrap();
    assert_eq!(fresh.external_id, None);
    assert_eq!(t.current_user().unwrap().id, fresh.id);
    let last = obs.0.lock().unwrap().last().cloned().unwrap();
    assert_eq!((last.user_id.as_str(), last.is_current_user), (fresh.id.as_str(), true), "observers learn who took over");
    // The multi-user API sees every user.
    assert_eq!(t.users().unwrap().len(), 2);
    assert!(!t.user(ada.id).unwrap().signed_in);
}

#[test]
fn customer_info_tells_plan_entitlements_features_and_purchases() {
    let (t, _) = open();
    let u = t.create_local_user(None).unwrap().id;
    let free = t.customer_info(u.clone()).unwrap();
    assert_eq!((free.plan.as_str(), free.access_reason.as_str(), free.expires_at_ms), ("free", "free", None));
    assert!(free.entitlements["free"].is_active && !free.entitlements["pro"].is_active);
    assert!(!free.features["export"].entitled, "a disabled flag");
    assert!(free.features["ai_chat"].entitled);
    assert_eq!(free.features["ai_chat"].usage.limit, Some(3));
    assert!(free.active_purchases.is_empty());

    let end = T0 + 30 * 86_400_000;
    t.set_entitlements(
        u.clone(),
        Entitlements {
            plan: "pro".into(),
            status: SubscriptionStatus::Active,
            period_start_ms: Some(T0),
            period_end_ms: Some(end),
            credit_grants: vec![
                CreditGrant { id: "pack".into(), remaining: 40, expires_at_ms: None, source: "purchase".into() },
                CreditGrant { id: "monthly".into(), remaining: 10, expires_at_ms: None, source: "plan".into() },
            ],
            ..Entitlements::from(tally_core::Entitlements::free())
        },
    )
    .unwrap();
    let pro = t.customer_info(u.clone()).unwrap();
    assert_eq!((pro.plan.as_str(), pro.access_reason.as_str(), pro.expires_at_ms), ("pro", "subscription", Some(end)));
    let e = &pro.entitlements["pro"];
    assert_eq!((e.is_active, e.access_reason.as_deref(), e.expires_at_ms), (true, Some("subscription"), Some(end)));
    assert!(!pro.entitlements["free"].is_active);
    assert_eq!(pro.features["ai_chat"].usage.limit, None);
    assert_eq!(pro.credit_balance, 50);
    assert_eq!(
        pro.active_purchases,
        vec![
            ActivePurchase {
                kind: PurchaseKind::Subscription,
                plan: Some("pro".into()),
                status: SubscriptionStatus::Active,
                expires_at_ms: Some(end),
                credit_grant_id: None,
                credits_remaining: None
            },
            ActivePurchase {
                kind: PurchaseKind::Credits,
                plan: None,
                status: SubscriptionStatus::Active,
                expires_at_ms: None,
                credit_grant_id: Some("pack".into()),
                credits_remaining: Some(40)
            },
        ]
    );
    assert!(matches!(t.customer_info("nobody".into()), Err(TallyError::NotFound { .. })));
}

fn closed_port_options() -> SyncOptions {
    let port = std::net::TcpListener::bind("127.0.0.1:0").unwrap().local_addr().unwrap().port();
    SyncOptions {
        server_url: format!("http://127.0.0.1:{port}"),
        token: "t".into(),
        token_provider: None,
        max_batch_events: None,
        max_batch_bytes: None,
        max_attempts: Some(1),
        initial_backoff_ms: Some(1),
        max_backoff_ms: Some(1),
        timeout_ms: Some(2000),
        force_entitlements: false,
    }
}

fn auto(sync: SyncOptions, user_id: Option<String>) -> AutoSyncOptions {
    AutoSyncOptions { sync, user_id, interval_ms: 600_000, debounce_ms: 10, initial_backoff_ms: 20, max_backoff_ms: 40 }
}

fn wait_for(a: &AutoSync, what: &str, ok: impl Fn(&SyncStatus) -> bool) -> SyncStatus {
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(30);
    loop {
        let s = a.status();
        if ok(&s) {
            return s;
        }
        assert!(std::time::Instant::now() < deadline, "timed out waiting for {what}: {s:?}");
        std::thread::sleep(std::time::Duration::from_millis(10));
    }
}

#[derive(Default)]
struct StatusLog(Mutex<Vec<SyncStatus>>);
impl SyncStatusListener for StatusLog {
    fn on_status(&self, status: SyncStatus) {
        self.0.lock().unwrap().push(status);
    }
}

#[test]
fn auto_sync_backs_off_on_network_errors_and_stops_on_errors_retrying_cannot_fix() {
    let keys = r#"{"keys":[{"kty":"OKP","crv":"Ed25519","x":"11qYAYKxCrfVS_7TyWQHOg7hcvPapiMlrwIaaPcHURo","kid":"k"}]}"#;
    let t = Tally::open_in_memory(TallyConfig { server_keys: Some(keys.into()), ..config(None) }).expect("open");
    let u = t.log_in("sub-1".into(), None, None, None).unwrap().id;
    t.consume(u.clone(), "ai_chat".into(), 1, None).unwrap();

    for bad in [
        AutoSyncOptions { interval_ms: 0, ..auto(closed_port_options(), None) },
        AutoSyncOptions { debounce_ms: -1, ..auto(closed_port_options(), None) },
        AutoSyncOptions { sync: SyncOptions { timeout_ms: Some(-1), ..closed_port_options() }, ..auto(closed_port_options(), None) },
    ] {
        assert!(is_invalid(t.start_auto_sync(bad)));
    }
    assert!(matches!(t.start_auto_sync(auto(closed_port_options(), Some("nobody".into()))), Err(TallyError::NotFound { .. })));

    // Unreachable: retried with backoff, still running, nothing lost.
    let a = t.start_auto_sync(auto(closed_port_options(), None)).unwrap();
    let log = Arc::new(StatusLog::default());
    a.add_status_listener(log.clone());
    let s = wait_for(&a, "three failures", |s| s.consecutive_failures >= 3);
    assert!(s.running && !s.uploading);
    assert_eq!((s.user_id.as_deref(), s.pending, s.last_error_kind.as_deref()), (Some(u.as_str()), 1, Some("Network")));
    assert!(log.0.lock().unwrap().iter().any(|s| s.uploading), "the listener saw a round in flight");
    // A local change updates `pending` at once.
    t.consume(u.clone(), "ai_chat".into(), 1, None).unwrap();
    wait_for(&a, "pending 2", |s| s.pending == 2);
    a.stop();
    let s = wait_for(&a, "stopped", |s| !s.running);
    assert_eq!(t.pending_events(u.clone()).unwrap(), 2);
    std::thread::sleep(std::time::Duration::from_millis(100));
    assert_eq!(a.status().consecutive_failures, s.consecutive_failures, "no round after stop");

    // Without the server's keys, sync is a configuration error: the helper stops at once.
    let unconfigured = Tally::open_in_memory(config(None)).expect("open");
    let v = unconfigured.log_in("sub-2".into(), None, None, None).unwrap().id;
    let b = unconfigured.start_auto_sync(auto(closed_port_options(), Some(v))).unwrap();
    let s = wait_for(&b, "stopped on Configuration", |s| !s.running);
    assert_eq!((s.last_error_kind.as_deref(), s.consecutive_failures), (Some("Configuration"), 1));
}

#[test]
fn consume_items_records_all_or_none_across_the_boundary() {
    let (t, _) = open();
    let u = t.create_local_user(None).unwrap().id;
    let item =
        |feature: &str, amount: i64| UseItem { feature: feature.into(), amount, model: None, input_tokens: None, output_tokens: None };
    // No credits on free: the image item is denied, so the chat item is not recorded either.
    let out = t.consume_items(u.clone(), vec![item("ai_chat", 2), item("images", 1)], Some("call-1".into()), None).unwrap();
    assert_eq!((out.allowed, out.duplicate, out.decisions.len()), (false, false, 2));
    assert_eq!(out.decisions[1].reason, Reason::InsufficientCredits);
    assert_eq!((t.usage(u.clone(), "ai_chat".into()).unwrap().used, t.pending_events(u.clone()).unwrap()), (0, 0));
    let spend = UseItem { model: Some("gpt-4o".into()), input_tokens: Some(1000), output_tokens: Some(0), ..item("spend", 1) };
    let items = vec![item("ai_chat", 2), spend];
    let out = t.consume_items(u.clone(), items.clone(), Some("call-2".into()), Some(r#"{"request": 1}"#.into())).unwrap();
    assert!(out.allowed && !out.duplicate);
    assert_eq!(out.use_id, event_id_for_key("call-2".into()));
    assert_eq!((out.decisions[0].used, out.decisions[1].used), (2, 2500));
    let again = t.consume_items(u.clone(), items.clone(), Some("call-2".into()), Some(r#"{"request": 1}"#.into())).unwrap();
    assert!(again.duplicate && again.decisions == out.decisions);
    assert!(matches!(
        t.consume_items(u.clone(), vec![item("ai_chat", 1)], Some("call-2".into()), None),
        Err(TallyError::IdempotencyConflict { .. })
    ));
    let snapshot = (t.usage(u.clone(), "ai_chat".into()).unwrap(), t.pending_events(u.clone()).unwrap());
    assert!(is_invalid(t.consume_items(u.clone(), vec![item("ai_chat", 1), item("ai_chat", 1)], None, None)), "a feature twice");
    assert!(is_invalid(t.consume_items(u.clone(), vec![], None, None)));
    assert!(is_invalid(t.consume_items(u.clone(), vec![item("ai_chat", 1), item("spend", -1)], None, None)));
    assert!(is_invalid(t.consume_items(u.clone(), vec![UseItem { input_tokens: Some(-1), ..item("spend", 1) }], None, None)));
    assert!(is_invalid(t.consume_items(u.clone(), vec![item("ai_chat", 1)], None, Some("{not json".into()))));
    assert_eq!(
        (t.usage(u.clone(), "ai_chat".into()).unwrap(), t.pending_events(u.clone()).unwrap()),
        snapshot,
        "bad input changed nothing"
    );
    // A void of the use id cancels every item.
    t.void(u.clone(), out.use_id.clone(), Some("refund".into())).unwrap();
    assert_eq!(t.usage(u.clone(), "ai_chat".into()).unwrap().used, 0);
    assert_eq!(t.usage(u.clone(), "spend".into()).unwrap().used, 0);
    assert_eq!(t.pending_events(u).unwrap(), 3, "two items and one void");
}
