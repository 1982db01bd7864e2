//! Stripe subscription state, as pure functions (so the ordering rules can be property-tested
//! without a database): reading a subscription object at the pinned API version, mapping
//! Stripe's statuses, ordering two states of one subscription id, the past-due overlay from
//! failed invoices. Which subscription gives the plan is `tally_core::subscription::in_effect`.

use chrono::{DateTime, Utc};
use serde_json::Value;
use std::collections::HashMap;
use tally_core::SubscriptionStatus;

/// One state of one Stripe subscription, from one `customer.subscription.*` event.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SubState {
    /// `sub_…`.
    pub subscription_id: String,
    /// `cus_…`.
    pub customer_id: String,
    /// Price of the first item.
    pub price_id: Option<String>,
    /// Plan of that price through `TALLY_STRIPE_PRICES` (`None`: unknown price).
    pub plan: Option<String>,
    /// Status as Stripe sent it.
    pub stripe_status: String,
    /// Mapped status.
    pub status: SubscriptionStatus,
    /// Current period start (`items.data[0]`, else the subscription).
    pub period_start: Option<DateTime<Utc>>,
    /// Current period end (`items.data[0]`, else the subscription).
    pub period_end: Option<DateTime<Utc>>,
    /// Whether it ends at the period end.
    pub cancel_at_period_end: bool,
    /// When it was canceled.
    pub canceled_at: Option<DateTime<Utc>>,
    /// `created` of the event this state comes from.
    pub created: DateTime<Utc>,
    /// That event's id.
    pub event_id: String,
}

/// Maps a Stripe subscription status: `incomplete*` → none, `unpaid` → past_due,
/// `paused` → canceled; unknown values → none.
pub fn map_status(s: &str) -> SubscriptionStatus {
    match s {
        "active" => SubscriptionStatus::Active,
        "trialing" => SubscriptionStatus::Trialing,
        "past_due" | "unpaid" => SubscriptionStatus::PastDue,
        "canceled" | "paused" => SubscriptionStatus::Canceled,
        _ => SubscriptionStatus::None, // incomplete, incomplete_expired, anything new
    }
}

/// Rank of a status in a subscription's life, breaking ties between two states of one id with
/// the same `created` and period end: none < trialing < active < past_due < canceled.
pub fn life_rank(s: SubscriptionStatus) -> u8 {
    match s {
        SubscriptionStatus::None => 0,
        SubscriptionStatus::Trialing => 1,
        SubscriptionStatus::Active => 2,
        SubscriptionStatus::PastDue => 3,
        SubscriptionStatus::Canceled => 4,
    }
}

/// The total order of the states of one subscription id: canceled is terminal (beats every
/// non-canceled state whatever its date), then the later event `created`, then the later
/// `current_period_end`, then the status rank, then the event id (so the result never depends
/// on arrival order).
fn order_key(s: &SubState) -> (bool, DateTime<Utc>, Option<DateTime<Utc>>, u8, &str) {
    (s.status == SubscriptionStatus::Canceled, s.created, s.period_end, life_rank(s.status), s.event_id.as_str())
}

/// Whether `new` replaces `old` for the same subscription id.
pub fn supersedes(new: &SubState, old: &SubState) -> bool {
    order_key(new) > order_key(old)
}

fn ts(v: &Value) -> Option<DateTime<Utc>> {
    v.as_i64().and_then(|t| DateTime::from_timestamp(t, 0))
}

/// The id of an expandable field (a string, or an object with `id`).
pub fn id_of(v: &Value) -> Option<String> {
    match v {
        Value::String(s) if !s.is_empty() => Some(s.clone()),
        Value::Object(o) => o.get("id").and_then(Value::as_str).map(str::to_string),
        _ => None,
    }
}

/// Reads a subscription object (`data.object` of `customer.subscription.*`).
pub fn parse_subscription(
    obj: &Value,
    created: DateTime<Utc>,
    event_id: &str,
    prices: &HashMap<String, String>,
) -> Result<SubState, String> {
    let subscription_id = obj.get("id").and_then(Value::as_str).filter(|s| !s.is_empty()).ok_or("subscription without id")?.to_string();
    let customer_id = obj.get("customer").and_then(id_of).ok_or("subscription without customer")?;
    let stripe_status = obj.get("status").and_then(Value::as_str).ok_or("subscription without status")?.to_string();
    let item = &obj["items"]["data"][0];
    let price_id = id_of(&item["price"]).or_else(|| id_of(&obj["plan"]));
    let period_start = ts(&item["current_period_start"]).or_else(|| ts(&obj["current_period_start"]));
    let period_end = ts(&item["current_period_end"]).or_else(|| ts(&obj["current_period_end"]));
    Ok(SubState {
        plan: price_id.as_ref().and_then(|p| prices.get(p)).cloned(),
        price_id,
        status: map_status(&stripe_status),
        stripe_status,
        period_start,
        period_end,
        cancel_at_period_end: obj.get("cancel_at_period_end").and_then(Value::as_bool).unwrap_or(false),
        canceled_at: ts(&obj["canceled_at"]),
        created,
        event_id: event_id.to_string(),
        subscription_id,
        customer_id,
    })
}

/// A subscription's status once failed invoices are taken into account: an active or trialing
/// state with an unpaid invoice that failed at or after it is past due (from the earliest such
/// failure); a past-due state counts from its earliest unpaid failure, else from its own date.
/// `earliest_unpaid_failure`: the earliest `invoice.payment_failed` of this subscription's
/// invoices not paid since.
pub fn effective(s: &SubState, earliest_unpaid_failure: Option<DateTime<Utc>>) -> (SubscriptionStatus, Option<DateTime<Utc>>) {
    match s.status {
        SubscriptionStatus::Active | SubscriptionStatus::Trialing => match earliest_unpaid_failure {
            Some(f) if f >= s.created => (SubscriptionStatus::PastDue, Some(f)),
            _ => (s.status, None),
        },
        SubscriptionStatus::PastDue => (SubscriptionStatus::PastDue, Some(earliest_unpaid_failure.unwrap_or(s.created))),
        other => (other, None),
    }
}

/// A subscription state with its effective status and past-due start.
pub type Effective = (SubState, SubscriptionStatus, Option<DateTime<Utc>>);

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    fn at(secs: i64) -> DateTime<Utc> {
        DateTime::from_timestamp(1_750_000_000 + secs, 0).unwrap()
    }

    fn st(id: &str, status: &str, created: i64, end: i64, ev: &str) -> SubState {
        SubState {
            subscription_id: id.into(),
            customer_id: "cus_1".into(),
            price_id: Some("price_pro".into()),
            plan: Some("pro".into()),
            stripe_status: status.into(),
            status: map_status(status),
            period_start: Some(at(end - 100)),
            period_end: Some(at(end)),
            cancel_at_period_end: false,
            canceled_at: None,
            created: at(created),
            event_id: ev.into(),
        }
    }

    #[test]
    fn status_mapping() {
        assert_eq!(map_status("incomplete"), SubscriptionStatus::None);
        assert_eq!(map_status("incomplete_expired"), SubscriptionStatus::None);
        assert_eq!(map_status("unpaid"), SubscriptionStatus::PastDue);
        assert_eq!(map_status("paused"), SubscriptionStatus::Canceled);
        assert_eq!(map_status("trialing"), SubscriptionStatus::Trialing);
    }

    #[test]
    fn ordering_rules() {
        let created = st("sub_1", "incomplete", 0, 100, "evt_a");
        let active = st("sub_1", "active", 0, 100, "evt_b");
        assert!(supersedes(&active, &created), "same created and period end: status rank");
        let renewed = st("sub_1", "active", 0, 200, "evt_c");
        assert!(supersedes(&renewed, &active), "same created: later period end");
        let later = st("sub_1", "active", 5, 100, "evt_d");
        assert!(supersedes(&later, &renewed), "later created wins over the period end");
        let deleted = st("sub_1", "canceled", 3, 100, "evt_e");
        let late_update = st("sub_1", "active", 9, 300, "evt_f");
        assert!(supersedes(&deleted, &late_update) && !supersedes(&late_update, &deleted), "canceled is terminal");
    }

    #[test]
    fn past_due_overlay() {
        let active = st("sub_1", "active", 10, 100, "e");
        assert_eq!(effective(&active, None), (SubscriptionStatus::Active, None));
        assert_eq!(effective(&active, Some(at(5))), (SubscriptionStatus::Active, None), "a failure before this state is old news");
        assert_eq!(effective(&active, Some(at(12))), (SubscriptionStatus::PastDue, Some(at(12))));
        let pd = st("sub_1", "past_due", 10, 100, "e");
        assert_eq!(effective(&pd, None), (SubscriptionStatus::PastDue, Some(at(10))));
        assert_eq!(effective(&pd, Some(at(8))), (SubscriptionStatus::PastDue, Some(at(8))));
    }

    proptest! {
        /// Whatever the arrival order (and with duplicates), the kept state of one id is the same.
        #[test]
        fn merge_is_order_independent(perm in Just((0..7usize).collect::<Vec<_>>()).prop_shuffle(), dups in proptest::collection::vec(0..7usize, 0..4)) {
            let seq = [
                st("sub_1", "incomplete", 0, 100, "evt_1"),
                st("sub_1", "active", 0, 100, "evt_2"),
                st("sub_1", "active", 50, 100, "evt_3"),
                st("sub_1", "active", 100, 200, "evt_4"),
                st("sub_1", "past_due", 200, 300, "evt_5"),
                st("sub_1", "active", 210, 300, "evt_6"),
                st("sub_1", "canceled", 250, 300, "evt_7"),
            ];
            let mut order: Vec<usize> = perm;
            order.extend(dups);
            let mut kept: Option<SubState> = None;
            for i in order {
                let s = &seq[i];
                if kept.as_ref().is_none_or(|k| supersedes(s, k)) {
                    kept = Some(s.clone());
                }
            }
            prop_assert_eq!(kept.map(|k| k.event_id), Some("evt_7".to_string()));
        }
    }
}
