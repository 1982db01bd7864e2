//! The device records only what the server accepts (`tally_core::contract`): U+0000 refused in
//! every text, setting values to 16 KiB, per-user settings caps on the device's own view,
//! amounts and sums that can never overflow a counter, and attach merging a same-body duplicate.

mod common;

use common::*;
use serde_json::{Map, Value, json};
use tally_core::contract::{MAX_AMOUNT, MAX_COUNTER, MAX_SETTING_VALUE_BYTES, MAX_SETTINGS_BYTES, MAX_SETTINGS_KEYS, MAX_TOKENS};
use tally_core::{Catalog, Config, Error, Profile, Reason, Tally, UsageMeta, UserUpdate};

macro_rules! assert_err {
    ($e:expr, $pat:pat) => {
        match $e {
            Err($pat) => {}
            other => panic!("{}: expected {}, got {:?}", stringify!($e), stringify!($pat), other),
        }
    };
}

fn meta(v: Value) -> UsageMeta {
    UsageMeta { metadata: Some(v), ..UsageMeta::default() }
}

#[test]
fn nul_is_refused_in_every_text_at_record_time() {
    let e = Env::new();
    let tl = &e.tally;
    let user = tl.create_local_user(Some("Ada")).unwrap().id;
    let before = e.snapshot();
    assert_err!(tl.consume(&user, "no\0tes", 1, UsageMeta::default()), Error::InvalidInput(_));
    assert_err!(tl.consume(&user, "notes", 1, meta(json!({"k": "a\0b"}))), Error::InvalidInput(_));
    assert_err!(tl.consume(&user, "notes", 1, meta(json!({"a\0": 1}))), Error::InvalidInput(_));
    assert_err!(tl.consume(&user, "notes", 1, key("key\0")), Error::InvalidInput(_));
    assert_err!(tl.consume(&user, "notes", 1, UsageMeta { model: Some("gpt\0".into()), ..UsageMeta::default() }), Error::InvalidInput(_));
    assert_err!(tl.set_setting(&user, "k\0", json!(1)), Error::InvalidInput(_));
    assert_err!(tl.set_setting(&user, "k", json!(["ok", {"x": "\0"}])), Error::InvalidInput(_));
    assert_err!(tl.create_local_user(Some("A\0da")), Error::InvalidInput(_));
    assert_err!(tl.update_user(&user, UserUpdate { display_name: Some("A\0".into()), ..UserUpdate::default() }), Error::InvalidInput(_));
    assert_err!(
        tl.update_user(&user, UserUpdate { avatar_url: Some("http://\0".into()), ..UserUpdate::default() }),
        Error::InvalidInput(_)
    );
    assert_err!(tl.sign_in(Profile { external_id: "sub\0".into(), ..Profile::default() }, None), Error::InvalidInput(_));
    assert_err!(
        tl.sign_in(Profile { external_id: "sub".into(), display_name: Some("\0".into()), ..Profile::default() }, None),
        Error::InvalidInput(_)
    );
    assert_err!(
        tl.sign_in(Profile { external_id: "sub".into(), email: Some("a\0@b".into()), ..Profile::default() }, None),
        Error::InvalidInput(_)
    );
    assert_eq!(e.snapshot(), before, "nothing was written");
    let dir = tempfile::tempdir().unwrap();
    assert_err!(
        Tally::open(dir.path().join("d.db"), Config { device_id: Some("dev\0".into()), catalog: catalog(), ..Config::default() }),
        Error::InvalidInput(_)
    );
}

#[test]
fn setting_values_are_limited_to_the_contracts_16_kib() {
    let e = Env::new();
    let user = e.tally.create_local_user(None).unwrap().id;
    let at_limit = Value::String("v".repeat(MAX_SETTING_VALUE_BYTES - 2));
    assert_eq!(serde_json::to_string(&at_limit).unwrap().len(), 16 * 1024);
    e.tally.set_setting(&user, "big", at_limit).unwrap();
    let before = e.snapshot();
    assert_err!(e.tally.set_setting(&user, "big", Value::String("v".repeat(MAX_SETTING_VALUE_BYTES - 1))), Error::InvalidInput(_));
    assert_err!(e.tally.set_setting(&user, "bigger", Value::String("v".repeat(20 * 1024))), Error::InvalidInput(_));
    assert_eq!(e.snapshot(), before);
}

#[test]
fn a_patch_of_20000_keys_is_refused_and_writes_nothing() {
    let e = Env::new();
    let user = e.tally.create_local_user(None).unwrap().id;
    let before = e.snapshot();
    let patch: Map<String, Value> = (0..20_000).map(|i| (format!("k{i}"), json!(i))).collect();
    match e.tally.patch_settings(&user, patch) {
        Err(Error::InvalidInput(m)) => assert!(m.contains("1000"), "{m}"),
        other => panic!("expected InvalidInput, got {other:?}"),
    }
    assert_eq!(e.snapshot(), before);
}

#[test]
fn the_settings_caps_hold_on_the_devices_own_view() {
    let e = Env::new();
    let user = e.tally.create_local_user(None).unwrap().id;
    // Keys: exactly the cap is fine, one more is refused; a delete makes room.
    let patch: Map<String, Value> = (0..MAX_SETTINGS_KEYS).map(|i| (format!("k{i:04}"), json!(1))).collect();
    e.tally.patch_settings(&user, patch).unwrap();
    let before = e.snapshot();
    assert_err!(e.tally.set_setting(&user, "one_more", json!(1)), Error::InvalidInput(_));
    assert_eq!(e.snapshot(), before);
    e.tally.set_setting(&user, "k0000", Value::Null).unwrap();
    e.tally.set_setting(&user, "one_more", json!(1)).unwrap();
    // Replacing counts only what remains.
    let mut small = Map::new();
    small.insert("only".into(), json!(true));
    e.tally.replace_settings(&user, small).unwrap();
    // Bytes: 63 values of 16 KiB fit in 1 MiB, the 64th does not.
    let value = Value::String("v".repeat(MAX_SETTING_VALUE_BYTES - 2));
    for i in 0..63 {
        e.tally.set_setting(&user, &format!("b{i:02}"), value.clone()).unwrap();
    }
    let stored: usize = 63 * (3 + MAX_SETTING_VALUE_BYTES) + "only".len() + "true".len();
    assert!(stored + 3 + MAX_SETTING_VALUE_BYTES > MAX_SETTINGS_BYTES && stored <= MAX_SETTINGS_BYTES);
    let before = e.snapshot();
    assert_err!(e.tally.set_setting(&user, "b63", value.clone()), Error::InvalidInput(_));
    assert_eq!(e.snapshot(), before);
    // Overwriting a key counts its new size, not both.
    e.tally.set_setting(&user, "b00", value).unwrap();
    // An older version's 64 KiB value puts the user over the cap: deletes still go through,
    // growth does not.
    let legacy = json!("v".repeat(64 * 1024)).to_string();
    e.raw()
        .execute(
            "INSERT INTO settings (user_id, key, value, deleted, hlc, dirty) VALUES (?1, 'legacy', ?2, 0, '000000000000001-00000-old', 0)",
            [&user, &legacy],
        )
        .unwrap();
    assert_err!(e.tally.set_setting(&user, "x", json!(1)), Error::InvalidInput(_));
    e.tally.set_setting(&user, "b01", Value::Null).unwrap();
    e.tally.set_setting(&user, "legacy", Value::Null).unwrap();
    e.tally.set_setting(&user, "x", json!(1)).unwrap();
}

/// A catalog whose prices and costs can overflow 64 bits.
fn overflow_catalog() -> Catalog {
    Catalog::from_json(
        r#"{"models": {"gpt-4o": {"input_micros_per_mtok": 2500000, "output_micros_per_mtok": 10000000},
             "pricey": {"input_micros_per_mtok": 1000000000000000, "output_micros_per_mtok": 0}},
            "plans": [{"id": "free", "features": {
              "stars": {"type": "metered", "limit": null, "period": "lifetime", "enforcement": "hard"},
              "spend": {"type": "budget", "limit_micros": 1000, "period": "day", "enforcement": "hard"},
              "gems":  {"type": "credits", "cost": 100000000}}}]}"#,
    )
    .unwrap()
}

fn overflow_env() -> (Env, String) {
    let e = Env::with(|c| c.catalog = overflow_catalog());
    let user = e.tally.create_local_user(None).unwrap().id;
    (e, user)
}

#[test]
fn a_huge_amount_is_a_clear_error_and_the_feature_keeps_working() {
    let (e, user) = overflow_env();
    let before = e.snapshot();
    assert_err!(e.tally.consume(&user, "stars", i64::MAX as u64, UsageMeta::default()), Error::InvalidInput(_));
    assert_err!(e.tally.consume(&user, "stars", u64::MAX, UsageMeta::default()), Error::InvalidInput(_));
    assert_err!(e.tally.consume(&user, "stars", MAX_AMOUNT + 1, UsageMeta::default()), Error::InvalidInput(_));
    assert_err!(e.tally.check(&user, "stars", MAX_AMOUNT + 1), Error::InvalidInput(_));
    assert_eq!(e.snapshot(), before, "nothing recorded");
    assert!(e.tally.consume(&user, "stars", MAX_AMOUNT, UsageMeta::default()).unwrap().allowed);
    assert!(e.tally.consume(&user, "stars", 1, UsageMeta::default()).unwrap().allowed);
    assert_eq!(e.tally.usage(&user, "stars").unwrap().used, MAX_AMOUNT + 1);
    assert!(e.tally.check(&user, "stars", 1).unwrap().allowed);
    let again = e.reopen_with(overflow_catalog());
    assert_eq!(again.usage(&user, "stars").unwrap().used, MAX_AMOUNT + 1, "after reopen too");
}

#[test]
fn uses_summing_past_the_largest_counter_are_refused_and_nothing_is_recorded() {
    let (e, user) = overflow_env();
    e.tally.consume(&user, "stars", 1, UsageMeta::default()).unwrap();
    // The server's total (other devices) is 6 short of the largest counter: stored in the
    // window's counter row (the one the use counts in).
    let n = e
        .raw()
        .execute(
            "INSERT INTO counters (user_id, feature, period, period_start, server_used)
             SELECT user_id, feature, count_period, count_start, ?2 FROM events WHERE user_id = ?1 AND feature = 'stars'
             ON CONFLICT (user_id, feature, period, period_start) DO UPDATE SET server_used = excluded.server_used",
            (&user, i64::MAX - 7),
        )
        .unwrap();
    assert_eq!(n, 1);
    assert_eq!(e.tally.usage(&user, "stars").unwrap().used, MAX_COUNTER - 6);
    let before = e.snapshot();
    let items: Vec<_> =
        [3u64, 4].iter().map(|a| tally_core::ConsumeItem { feature: "stars".into(), amount: *a, meta: UsageMeta::default() }).collect();
    assert_err!(e.tally.consume_many(&user, &items), Error::InvalidInput(_));
    assert_err!(e.tally.consume(&user, "stars", 7, UsageMeta::default()), Error::InvalidInput(_));
    assert_eq!(e.snapshot(), before, "neither use of the batch was recorded");
    assert!(e.tally.consume(&user, "stars", 6, UsageMeta::default()).unwrap().allowed);
    assert_eq!(e.tally.usage(&user, "stars").unwrap().used, MAX_COUNTER);
    assert_err!(e.tally.consume(&user, "stars", 1, UsageMeta::default()), Error::InvalidInput(_));
    let checked = e.tally.check(&user, "stars", 1);
    assert!(checked.is_ok(), "a check still answers: {checked:?}");
    // Written counters and the events still waiting for theirs alike.
    e.tally.set_setting(&user, "write", serde_json::json!(1)).unwrap();
    let kind: String =
        e.raw().query_row("SELECT typeof(pending) FROM counters WHERE user_id = ?1 AND feature = 'stars'", [&user], |r| r.get(0)).unwrap();
    assert_eq!(kind, "integer", "the counter never turned into a REAL");
    assert_eq!(e.tally.usage(&user, "stars").unwrap().used, MAX_COUNTER);
}

#[test]
fn a_budget_with_huge_token_counts_never_stores_a_negative_cost() {
    let (e, user) = overflow_env();
    let ai = |model: &str, n: u64| UsageMeta {
        model: Some(model.into()),
        input_tokens: Some(n),
        output_tokens: Some(n),
        ..UsageMeta::default()
    };
    let before = e.snapshot();
    assert_err!(e.tally.consume(&user, "spend", 1, ai("gpt-4o", MAX_TOKENS + 1)), Error::InvalidInput(_));
    assert_err!(e.tally.consume(&user, "spend", 1, ai("pricey", MAX_TOKENS)), Error::InvalidInput(_));
    assert_eq!(e.snapshot(), before);
    let d = e.tally.consume(&user, "spend", 1, ai("gpt-4o", MAX_TOKENS)).unwrap();
    assert_eq!((d.allowed, d.reason), (true, Reason::BudgetExceeded), "a budget always records the spent tokens");
    let first = e.tally.usage(&user, "spend").unwrap().used;
    assert_eq!(first, 12_500_000_000_000);
    e.tally.consume(&user, "spend", 1, ai("gpt-4o", MAX_TOKENS)).unwrap();
    assert_eq!(e.tally.usage(&user, "spend").unwrap().used, 2 * first, "used only grows");
    let min: i64 = e.raw().query_row("SELECT MIN(cost_micros) FROM events WHERE user_id = ?1", [&user], |r| r.get(0)).unwrap();
    assert!(min > 0);
}

#[test]
fn a_credit_cost_times_amount_that_overflows_is_refused() {
    let (e, user) = overflow_env();
    let before = e.snapshot();
    // 10^8 credits per unit × 10^12 units is 10^20, past the largest balance.
    assert_err!(e.tally.consume(&user, "gems", MAX_AMOUNT, UsageMeta::default()), Error::InvalidInput(_));
    assert_eq!(e.snapshot(), before);
    let d = e.tally.consume(&user, "gems", 1, UsageMeta::default()).unwrap();
    assert_eq!((d.allowed, d.reason), (false, Reason::InsufficientCredits));
    assert_eq!(e.tally.credit_balance(&user).unwrap(), 0);
}

#[test]
fn attach_merges_a_same_body_duplicate_and_refuses_a_different_body() {
    let e = Env::new();
    let target = e.tally.sign_in(Profile { external_id: "sub-t".into(), ..Profile::default() }, None).unwrap().id;
    let with_meta = |k: &str, m: Value| UsageMeta { idempotency_key: Some(k.into()), metadata: Some(m), ..UsageMeta::default() };
    e.tally.consume(&target, "ai_chat", 2, with_meta("order-1", json!({"a": 1, "b": 2}))).unwrap();
    let local = e.tally.create_local_user(None).unwrap().id;
    e.tally.consume(&local, "ai_chat", 2, with_meta("order-1", json!({"b": 2, "a": 1}))).unwrap();
    e.tally.consume(&local, "ai_chat", 1, UsageMeta::default()).unwrap();
    e.tally.sign_in(Profile { external_id: "sub-t".into(), ..Profile::default() }, Some(&local)).unwrap();
    assert_err!(e.tally.user(&local), Error::NotFound(_));
    assert_eq!(e.tally.pending_events(&target).unwrap(), 2, "the duplicate counts once");
    assert_eq!(e.tally.usage(&target, "ai_chat").unwrap().used, 3);

    // The same key with another body under the account: a conflict, and nothing moves.
    let local = e.tally.create_local_user(None).unwrap().id;
    e.tally.consume(&local, "ai_chat", 1, with_meta("order-1", json!({"a": 1, "b": 3}))).unwrap();
    let before = e.snapshot();
    match e.tally.sign_in(Profile { external_id: "sub-t".into(), ..Profile::default() }, Some(&local)) {
        Err(Error::IdempotencyConflict(id)) => assert_eq!(id, tally_core::ledger::event_id_for_key("order-1").to_string()),
        other => panic!("expected IdempotencyConflict, got {other:?}"),
    }
    assert_eq!(e.snapshot(), before);
    assert_eq!(e.tally.pending_events(&local).unwrap(), 1);
}
