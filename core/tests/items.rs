//! Uses with several meters through the public API: items decided in order against running
//! totals and recorded all or none, budget items decided before the work, replays and
//! conflicts, invalid items, and a void of the use id cancelling every item.

mod common;
use common::*;
use tally_core::contract::item_event_id;
use tally_core::ledger::event_id_for_key;
use tally_core::{Catalog, Error, Reason, UsageMeta, UseItem};

fn item(feature: &str, amount: u64) -> UseItem {
    UseItem { feature: feature.into(), amount, ..UseItem::default() }
}

fn priced(feature: &str, input: u64, output: u64) -> UseItem {
    UseItem { feature: feature.into(), amount: 1, model: Some("gpt-4o".into()), input_tokens: Some(input), output_tokens: Some(output) }
}

/// (id, feature, amount, use_id) of a user's events in device order.
fn rows(e: &Env, user: &str) -> Vec<(String, String, i64, Option<String>)> {
    let c = e.raw();
    let mut st = c.prepare("SELECT id, feature, amount, use_id FROM events WHERE user_id = ?1 ORDER BY device_seq").unwrap();
    st.query_map([user], |r| Ok((r.get(0)?, r.get(1)?, r.get(2)?, r.get(3)?))).unwrap().collect::<rusqlite::Result<_>>().unwrap()
}

#[test]
fn a_call_limit_and_a_budget_are_decided_and_recorded_as_one_use() {
    let e = Env::new();
    let u = e.tally.create_local_user(None).unwrap().id;
    // 100 input tokens at 2.5 micros + 50 output at 10 micros = 750 micros of a 1000 budget.
    let out = e.tally.consume_items(&u, Some("call-1"), &[item("ai_chat", 1), priced("ai_spend", 100, 50)], None).unwrap();
    let use_id = event_id_for_key("call-1");
    assert_eq!((out.use_id, out.allowed, out.duplicate, out.decisions.len()), (use_id, true, false, 2));
    assert_eq!((out.decisions[0].reason, out.decisions[0].used, out.decisions[0].remaining), (Reason::Ok, 1, Some(4)));
    assert_eq!((out.decisions[1].reason, out.decisions[1].used, out.decisions[1].remaining), (Reason::Ok, 750, Some(250)));
    let want = |f: &str, amount: i64| (item_event_id(use_id, f).to_string(), f.to_string(), amount, Some(use_id.to_string()));
    assert_eq!(rows(&e, &u), [want("ai_chat", 1), want("ai_spend", 1)], "one event per item, ids UUIDv5(use id, feature)");
    assert_eq!(e.tally.usage(&u, "ai_chat").unwrap().used, 1);
    assert_eq!(e.tally.usage(&u, "ai_spend").unwrap().used, 750);
    // Without an id the use gets one of its own.
    let out = e.tally.consume_items(&u, None, &[item("ai_chat", 1), item("stars", 2)], None).unwrap();
    assert!(out.allowed && out.use_id != use_id);
    assert_eq!(rows(&e, &u)[2].0, item_event_id(out.use_id, "ai_chat").to_string());
}

#[test]
fn a_metered_item_is_decided_after_the_items_before_it() {
    let e = Env::new();
    let u = e.tally.create_local_user(None).unwrap().id;
    e.tally.consume(&u, "daily", 2, UsageMeta::default()).unwrap();
    // `daily` (3 a day) and the unlimited `stars`: 2 + 1 fits, the second use does not.
    assert!(e.tally.consume_items(&u, None, &[item("stars", 1), item("daily", 1)], None).unwrap().allowed);
    let snap = e.snapshot();
    let out = e.tally.consume_items(&u, None, &[item("stars", 1), item("daily", 1)], None).unwrap();
    assert!(!out.allowed);
    assert_eq!((out.decisions[1].allowed, out.decisions[1].reason, out.decisions[1].used), (false, Reason::LimitReached, 3));
    assert_eq!(e.snapshot(), snap, "a denied use records none of its items");
}

#[test]
fn a_budget_item_over_its_room_denies_the_whole_use_and_records_nothing() {
    let e = Env::new();
    let u = e.tally.create_local_user(None).unwrap().id;
    e.tally.consume(&u, "ai_spend", 1, ai("gpt-4o", 100, 50)).unwrap();
    assert!(e.tally.check(&u, "ai_chat", 1).unwrap().allowed);
    let snap = e.snapshot();
    // The call limit has room; the budget's 250 micros left cannot hold 750 more.
    let out = e.tally.consume_items(&u, Some("call-2"), &[item("ai_chat", 1), priced("ai_spend", 100, 50)], None).unwrap();
    assert!(!out.allowed && !out.duplicate);
    assert_eq!((out.decisions[1].allowed, out.decisions[1].reason, out.decisions[1].used), (false, Reason::BudgetExceeded, 750));
    assert_eq!(e.snapshot(), snap, "nothing recorded: neither the call nor the spend");
    assert_eq!(e.tally.usage(&u, "ai_chat").unwrap().used, 0);
    // Without a model, a budget item's amount is its cost in micros, and it must fit too.
    assert!(!e.tally.consume_items(&u, None, &[item("ai_chat", 1), item("ai_spend", 251)], None).unwrap().allowed);
    assert!(e.tally.consume_items(&u, None, &[item("ai_chat", 1), item("ai_spend", 250)], None).unwrap().allowed);
    // The single-feature budget consume still always records (the work was done).
    let d = e.tally.consume(&u, "ai_spend", 1, ai("gpt-4o", 100, 50)).unwrap();
    assert_eq!((d.allowed, d.reason), (true, Reason::BudgetExceeded));
}

#[test]
fn two_credits_items_draw_from_one_balance() {
    let mut json: serde_json::Value = serde_json::from_str(CATALOG).unwrap();
    json["plans"][0]["features"]["voice"] = serde_json::json!({"type": "credits", "cost": 30});
    let e = Env::with(|c| c.catalog = Catalog::from_json(&json.to_string()).unwrap());
    let u = e.tally.create_local_user(None).unwrap().id;
    assert_eq!(e.tally.credit_balance(&u).unwrap(), 100, "free's included credits");
    // 50 + 60 credits: each fits the 100 alone, not both together.
    assert!(e.tally.check(&u, "images", 5).unwrap().allowed && e.tally.check(&u, "voice", 2).unwrap().allowed);
    let snap = e.snapshot();
    let out = e.tally.consume_items(&u, None, &[item("images", 5), item("voice", 2)], None).unwrap();
    assert!(!out.allowed);
    assert_eq!((out.decisions[0].reason, out.decisions[1].reason), (Reason::Ok, Reason::InsufficientCredits));
    assert_eq!(out.decisions[1].remaining, Some(50), "the second item sees the first one's draw");
    assert_eq!(e.snapshot(), snap);
    assert_eq!(e.tally.credit_balance(&u).unwrap(), 100);
    let out = e.tally.consume_items(&u, None, &[item("images", 5), item("voice", 1)], None).unwrap();
    assert!(out.allowed);
    assert_eq!(e.tally.credit_balance(&u).unwrap(), 20);
}

#[test]
fn invalid_items_are_refused_and_change_nothing() {
    let e = Env::new();
    let u = e.tally.create_local_user(None).unwrap().id;
    let snap = e.snapshot();
    let bad: Vec<Vec<UseItem>> = vec![
        vec![item("ai_chat", 1), item("stars", 1), item("ai_chat", 2)],
        vec![],
        (0..17).map(|i| item(&format!("f{i}"), 1)).collect(),
        vec![item("ai_chat", 1), item("stars", 0)],
        vec![item("ai_chat", 1), item("$credits", 1)],
        vec![item("ai_chat", 1), UseItem { input_tokens: Some(u64::MAX), ..item("ai_spend", 1) }],
        vec![item("ai_chat", 1), UseItem { model: Some("gpt\0".into()), ..item("ai_spend", 1) }],
    ];
    for items in bad {
        let r = e.tally.consume_items(&u, Some("call-x"), &items, None);
        assert!(matches!(r, Err(Error::InvalidInput(_))), "{items:?}: {r:?}");
    }
    assert!(matches!(e.tally.consume_items(&u, Some("a\0b"), &[item("ai_chat", 1)], None), Err(Error::InvalidInput(_))));
    let huge = serde_json::json!({ "x": "y".repeat(5000) });
    assert!(matches!(e.tally.consume_items(&u, None, &[item("ai_chat", 1)], Some(huge)), Err(Error::InvalidInput(_))));
    assert!(matches!(e.tally.consume_items("nobody", None, &[item("ai_chat", 1)], None), Err(Error::NotFound(_))));
    assert_eq!(e.snapshot(), snap);
}

#[test]
fn a_replay_answers_the_first_decisions_and_other_items_conflict() {
    let e = Env::new();
    let u = e.tally.create_local_user(None).unwrap().id;
    let items = [item("ai_chat", 2), item("stars", 1)];
    let meta = Some(serde_json::json!({"request": 7}));
    let first = e.tally.consume_items(&u, Some("call-3"), &items, meta.clone()).unwrap();
    assert!(first.allowed && !first.duplicate);
    e.tally.consume(&u, "ai_chat", 1, UsageMeta::default()).unwrap();
    let again = e.tally.consume_items(&u, Some("call-3"), &items, meta.clone()).unwrap();
    assert!(again.duplicate && again.allowed);
    assert_eq!(again.decisions, first.decisions, "the first decisions, not new ones");
    assert_eq!(e.tally.usage(&u, "ai_chat").unwrap().used, 3, "counted once");
    let snap = e.snapshot();
    let conflicts: Vec<(Vec<UseItem>, Option<serde_json::Value>)> = vec![
        (vec![item("ai_chat", 3), item("stars", 1)], meta.clone()),
        (vec![item("ai_chat", 2)], meta.clone()),
        (vec![item("ai_chat", 2), item("stars", 1), item("weekly", 1)], meta.clone()),
        (vec![item("stars", 1), item("ai_chat", 2)], meta.clone()),
        (items.to_vec(), None),
    ];
    for (other, m) in conflicts {
        let r = e.tally.consume_items(&u, Some("call-3"), &other, m);
        assert!(matches!(r, Err(Error::IdempotencyConflict(_))), "{other:?}: {r:?}");
    }
    // The use id and a single use's key share one namespace.
    let key_of_single = UsageMeta { idempotency_key: Some("call-3".into()), ..UsageMeta::default() };
    assert!(matches!(e.tally.consume(&u, "ai_chat", 1, key_of_single), Err(Error::IdempotencyConflict(_))));
    e.tally.consume(&u, "ai_chat", 1, key("single-1")).unwrap();
    assert!(matches!(e.tally.consume_items(&u, Some("single-1"), &items, None), Err(Error::IdempotencyConflict(_))));
    // Replaying a single use's key still answers it.
    assert!(e.tally.consume(&u, "ai_chat", 1, key("single-1")).unwrap().allowed);
    let _ = snap;
}

#[test]
fn a_denied_use_is_decided_again_when_retried() {
    let e = Env::new();
    let u = e.tally.create_local_user(None).unwrap().id;
    e.tally.consume(&u, "daily", 3, UsageMeta::default()).unwrap();
    let denied = e.tally.consume_items(&u, Some("call-4"), &[item("stars", 1), item("daily", 1)], None).unwrap();
    assert!(!denied.allowed && !denied.duplicate);
    e.clock.advance(chrono::Duration::days(1));
    let retried = e.tally.consume_items(&u, Some("call-4"), &[item("stars", 1), item("daily", 1)], None).unwrap();
    assert!(retried.allowed && !retried.duplicate, "nothing was recorded the first time");
}

#[test]
fn a_void_of_the_use_id_cancels_every_item_once() {
    let e = Env::new();
    let u = e.tally.create_local_user(None).unwrap().id;
    let before = e.tally.credit_balance(&u).unwrap();
    let out = e.tally.consume_items(&u, Some("call-5"), &[item("ai_chat", 2), item("images", 3), item("ai_spend", 400)], None).unwrap();
    assert!(out.allowed);
    assert_eq!(e.tally.credit_balance(&u).unwrap(), before - 30);
    assert_eq!(e.tally.pending_events(&u).unwrap(), 3);
    e.tally.void(&u, "call-5", Some("refunded")).unwrap();
    assert_eq!(e.tally.usage(&u, "ai_chat").unwrap().used, 0);
    assert_eq!(e.tally.usage(&u, "ai_spend").unwrap().used, 0);
    assert_eq!(e.tally.credit_balance(&u).unwrap(), before, "the credits it drew return");
    assert_eq!(e.tally.pending_events(&u).unwrap(), 4, "the items and one void event");
    let snap = e.snapshot();
    e.tally.void(&u, &out.use_id.to_string(), None).unwrap();
    assert_eq!(e.snapshot(), snap, "voiding the use twice records nothing more");
    // The use's room is free again.
    assert!(e.tally.consume_items(&u, None, &[item("ai_chat", 5), item("ai_spend", 1000)], None).unwrap().allowed);
    let r = e.tally.delete_user(&u, false);
    assert!(matches!(r, Err(Error::UnsyncedEvents(6))), "3 + 2 items and one void event: {r:?}");
}
