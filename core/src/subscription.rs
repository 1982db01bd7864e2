//! One subscription model for every store: the state of each (store, store subscription id) of
//! a user, and which of them gives the plan in effect.
//!
//! Resolution order: admin → lifetime / active / trialing subscriptions by plan rank → past due
//! within grace → access grant → free. The subscription giving the plan in effect (highest
//! rank, then latest `period_end`) supplies the status, the period and the billing anchor.

use crate::catalog::{Catalog, Store};
use crate::entitlements::{Entitlements, SubscriptionStatus};
use chrono::{DateTime, Duration, Utc};
use serde::{Deserialize, Serialize};

/// The state of one subscription (or one-time plan purchase) in one store.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Subscription {
    /// The store.
    pub store: Store,
    /// The store's id of it (Stripe `sub_…`, App Store `originalTransactionId`).
    pub subscription_id: String,
    /// The store's product id (Stripe: the price id).
    pub product_id: Option<String>,
    /// The plan it gives (`None`: a product the catalog does not map).
    pub plan: Option<String>,
    /// Its status.
    pub status: SubscriptionStatus,
    /// Current period start.
    pub period_start: Option<DateTime<Utc>>,
    /// Current period end (`None` for a lifetime purchase).
    pub period_end: Option<DateTime<Utc>>,
    /// When it became past due.
    pub past_due_since: Option<DateTime<Utc>>,
    /// When its access ends by itself, as the store dated it (App Store: the expiry, or the
    /// end of the billing grace period when past due); `None`: until the store says otherwise.
    pub access_until: Option<DateTime<Utc>>,
    /// A plan bought for ever.
    pub lifetime: bool,
}

impl Subscription {
    /// 2: gives its plan at `now` (lifetime, active, trialing); 1: past due within grace;
    /// 0: gives nothing.
    fn class(&self, now: DateTime<Utc>, grace: Duration) -> u8 {
        let current = self.access_until.is_none_or(|u| now < u);
        match self.status {
            SubscriptionStatus::Active | SubscriptionStatus::Trialing if current => 2,
            SubscriptionStatus::PastDue => {
                let in_grace = match self.access_until {
                    Some(u) => now < u,
                    None => self.past_due_since.or(self.period_end).is_some_and(|s| now < s + grace),
                };
                u8::from(in_grace)
            }
            _ => 0,
        }
    }

    /// Whether a store still renews it by itself (the server cannot stop it).
    pub fn renews(&self) -> bool {
        !self.lifetime && matches!(self.status, SubscriptionStatus::Active | SubscriptionStatus::Trialing | SubscriptionStatus::PastDue)
    }
}

fn status_rank(s: SubscriptionStatus) -> u8 {
    match s {
        SubscriptionStatus::Active => 4,
        SubscriptionStatus::Trialing => 3,
        SubscriptionStatus::PastDue => 2,
        SubscriptionStatus::Canceled => 1,
        SubscriptionStatus::None => 0,
    }
}

/// The subscription giving the plan in effect at `now`: those giving access first (lifetime,
/// active or trialing; then past due within `grace`), by the rank of their plan, then the
/// better status, then the latest period end (a lifetime purchase last longest).
pub fn in_effect<'a>(subs: &'a [Subscription], catalog: &Catalog, now: DateTime<Utc>, grace: Duration) -> Option<&'a Subscription> {
    subs.iter().max_by_key(|s| {
        let known = s.plan.as_deref().filter(|p| catalog.plan(p).is_some());
        let rank = known.map_or(i64::MIN, |p| catalog.rank(p));
        let end = if s.lifetime { Some(DateTime::<Utc>::MAX_UTC) } else { s.period_end };
        (s.class(now, grace), rank, status_rank(s.status), end, s.store, s.subscription_id.as_str())
    })
}

impl Entitlements {
    /// Puts the subscription in effect among `subs` (see [`in_effect`]) into this raw state:
    /// plan, status, period, past-due start, `access_until` and `lifetime`.
    pub fn with_subscriptions(mut self, subs: &[Subscription], catalog: &Catalog, now: DateTime<Utc>, grace: Duration) -> Entitlements {
        if let Some(s) = in_effect(subs, catalog, now, grace) {
            self.plan = s.plan.clone().unwrap_or_else(|| crate::catalog::FREE_PLAN.into());
            self.status = s.status;
            self.period_start = s.period_start;
            self.period_end = s.period_end;
            self.past_due_since = s.past_due_since;
            self.access_until = s.access_until;
            self.lifetime = s.lifetime;
        }
        self
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn at(h: i64) -> DateTime<Utc> {
        DateTime::from_timestamp(1_800_000_000 + h * 3600, 0).unwrap()
    }

    fn sub(store: Store, id: &str, plan: &str, status: SubscriptionStatus) -> Subscription {
        Subscription {
            store,
            subscription_id: id.into(),
            product_id: None,
            plan: Some(plan.into()),
            status,
            period_start: Some(at(-10)),
            period_end: Some(at(10)),
            past_due_since: None,
            access_until: None,
            lifetime: false,
        }
    }

    fn catalog() -> Catalog {
        Catalog::from_json(r#"{"plans":[{"id":"free"},{"id":"pro"},{"id":"team"}]}"#).unwrap()
    }

    #[test]
    fn the_highest_ranked_active_plan_wins_then_grace_then_nothing() {
        let c = catalog();
        let g = Duration::hours(5);
        let pro = sub(Store::Stripe, "sub_1", "pro", SubscriptionStatus::Active);
        let mut team = sub(Store::AppStore, "100", "team", SubscriptionStatus::Trialing);
        let pick = |subs: &[Subscription], now| in_effect(subs, &c, now, g).map(|s| s.subscription_id.clone());
        assert_eq!(pick(&[pro.clone(), team.clone()], at(0)).as_deref(), Some("100"), "team ranks above pro");
        team.access_until = Some(at(1));
        assert_eq!(pick(&[pro.clone(), team.clone()], at(2)).as_deref(), Some("sub_1"), "an expired store subscription gives nothing");
        let mut late = sub(Store::AppStore, "200", "team", SubscriptionStatus::PastDue);
        late.access_until = Some(at(3));
        assert_eq!(pick(&[pro.clone(), late.clone()], at(2)).as_deref(), Some("sub_1"), "active beats past due in grace");
        let canceled = sub(Store::Stripe, "sub_1", "pro", SubscriptionStatus::Canceled);
        assert_eq!(pick(&[canceled.clone(), late.clone()], at(2)).as_deref(), Some("200"));
        let e = Entitlements::free().with_subscriptions(&[canceled.clone(), late.clone()], &c, at(2), g).resolve(&c, at(2), g);
        assert_eq!((e.plan.as_str(), e.access_reason.as_str()), ("team", "subscription"));
        let e = Entitlements::free().with_subscriptions(&[canceled, late], &c, at(4), g).resolve(&c, at(4), g);
        assert_eq!(e.plan, "free", "the store's grace date passed");
    }

    #[test]
    fn a_lifetime_plan_never_ends_and_says_so() {
        let c = catalog();
        let g = Duration::zero();
        let mut life = sub(Store::AppStore, "300", "pro", SubscriptionStatus::Active);
        life.lifetime = true;
        life.period_end = None;
        let monthly = sub(Store::AppStore, "400", "pro", SubscriptionStatus::Active);
        let subs = [monthly, life];
        assert_eq!(in_effect(&subs, &c, at(0), g).map(|s| s.lifetime), Some(true));
        let e = Entitlements::free().with_subscriptions(&subs, &c, at(100), g).resolve(&c, at(100), g);
        assert_eq!((e.plan.as_str(), e.access_reason.as_str(), e.period_end), ("pro", "lifetime", None));
        assert!(!subs[1].renews() && subs[0].renews());
    }
}
