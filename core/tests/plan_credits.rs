//! Credits a plan includes each billing window (`included_credits`), for entitlements set on the
//! device: granted at the window's start, spent first-to-expire first, renewed at the next window,
//! and kept (with what was spent) when the app changes the entitlements.

use chrono::{DateTime, Duration, Utc};
use std::sync::Arc;
use tally_core::{Catalog, Config, Entitlements, ManualClock, Reason, SubscriptionStatus, Tally, UsageMeta};

const CATALOG: &str = r#"{"plans":[
  {"id":"free","included_credits":{"amount":100,"rollover":false},"features":{"images":{"type":"credits","cost":10}}},
  {"id":"pro","included_credits":{"amount":1000,"rollover":true},"features":{"images":{"type":"credits","cost":5}}}]}"#;

fn at(s: &str) -> DateTime<Utc> {
    DateTime::parse_from_rfc3339(s).unwrap().with_timezone(&Utc)
}

fn open(dir: &tempfile::TempDir, clock: Arc<ManualClock>) -> Tally {
    let config = Config { clock, catalog: Catalog::from_json(CATALOG).unwrap(), ..Config::default() };
    Tally::open(dir.path().join("t.db"), config).unwrap()
}

#[test]
fn free_plan_credits_renew_each_billing_window() {
    let dir = tempfile::tempdir().unwrap();
    let clock = Arc::new(ManualClock::new(at("2026-01-31T10:00:00Z")));
    let tally = open(&dir, clock.clone());
    let user = tally.create_local_user(None).unwrap();
    assert_eq!(tally.credit_balance(&user.id).unwrap(), 100);
    for _ in 0..3 {
        assert!(tally.consume(&user.id, "images", 1, UsageMeta::default()).unwrap().allowed);
    }
    assert_eq!(tally.credit_balance(&user.id).unwrap(), 70);
    let d = tally.check(&user.id, "images", 8).unwrap();
    assert_eq!(d.reason, Reason::InsufficientCredits, "80 credits needed, 70 left");
    // The app changes the entitlements: the plan's credits keep what was spent of them.
    tally.set_entitlements(&user.id, Entitlements { is_admin: false, ..Entitlements::free() }).unwrap();
    assert_eq!(tally.credit_balance(&user.id).unwrap(), 70);
    // Next billing window (anchored on the 31st: Feb 28): a fresh 100, the old ones expired.
    clock.set(at("2026-02-28T10:00:00Z"));
    assert_eq!(tally.credit_balance(&user.id).unwrap(), 100);
    let e = tally.entitlements(&user.id).unwrap();
    assert_eq!(e.credit_grants.iter().filter(|g| g.id.starts_with("included:free:")).count(), 2);
    assert_eq!(e.credit_balance, 100);
}

#[test]
fn subscribers_get_plan_credits_from_invoices_not_locally() {
    let dir = tempfile::tempdir().unwrap();
    let clock = Arc::new(ManualClock::new(at("2026-03-01T00:00:00Z")));
    let tally = open(&dir, clock.clone());
    let user = tally.create_local_user(None).unwrap();
    let now = clock.now_for_test();
    tally
        .set_entitlements(
            &user.id,
            Entitlements {
                plan: "pro".into(),
                status: SubscriptionStatus::Active,
                period_start: Some(now),
                period_end: Some(now + Duration::days(31)),
                ..Entitlements::free()
            },
        )
        .unwrap();
    assert_eq!(tally.credit_balance(&user.id).unwrap(), 0, "a subscriber's credits come with each paid invoice");
}

trait NowForTest {
    fn now_for_test(&self) -> DateTime<Utc>;
}

impl NowForTest for ManualClock {
    fn now_for_test(&self) -> DateTime<Utc> {
        tally_core::Clock::now(self)
    }
}
