//! Resolved entitlements are cached only until the next instant they can change: the end of a
//! past-due grace (counted from the failure date, or from the period end without one), a grant's
//! end, a credit grant's expiry.

mod common;

use chrono::Duration;
use common::*;
use tally_core::{Clock, Entitlements, SubscriptionStatus};

#[test]
fn grace_counted_from_the_period_end_ends_on_time() {
    let e = Env::new();
    let u = e.tally.create_local_user(None).unwrap().id;
    let now = e.clock.now();
    let grace = e.tally.config().past_due_grace;
    // Past due without a failure date: grace runs from the unpaid period's end, 10 s left.
    let state = Entitlements {
        plan: "pro".into(),
        status: SubscriptionStatus::PastDue,
        period_start: Some(now - Duration::days(30) - grace),
        period_end: Some(now - grace + Duration::seconds(10)),
        ..Entitlements::free()
    };
    e.tally.set_entitlements(&u, state).unwrap();
    assert_eq!(e.tally.check(&u, "ai_chat", 1).unwrap().limit, Some(100), "pro within grace");
    e.clock.advance(Duration::seconds(11));
    assert_eq!(e.tally.check(&u, "ai_chat", 1).unwrap().limit, Some(5), "free at once when the grace ends, not a minute later");
    assert_eq!(e.tally.entitlements(&u).unwrap().access_reason, "free");
}

#[test]
fn next_boundary_is_the_earliest_change() {
    let now = t("2026-01-15T12:00:00Z");
    let grace = Duration::days(3);
    let mut s = Entitlements { status: SubscriptionStatus::PastDue, period_end: Some(now - Duration::days(1)), ..Entitlements::free() };
    assert_eq!(s.next_boundary(now, grace), Some(now + Duration::days(2)));
    s.past_due_since = Some(now - Duration::days(2) - Duration::hours(23));
    assert_eq!(s.next_boundary(now, grace), Some(now + Duration::hours(1)), "the failure date wins over the period end");
    s.status = SubscriptionStatus::Active;
    assert_eq!(s.next_boundary(now, grace), None, "an active subscription has no grace to end");
}
