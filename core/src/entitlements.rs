//! Entitlements: the resolved access state of one user, shared by the device and the server
//! (the server signs it as JWT claims; the device verifies and enforces it offline).

use crate::catalog::{Catalog, FREE_PLAN, ModelPrice, Rule};
use chrono::{DateTime, Duration, Utc};
use serde::{Deserialize, Serialize};
use std::collections::BTreeMap;

/// Subscription status, as the payment provider reports it (mapped).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Default, Serialize, Deserialize)]
#[cfg_attr(feature = "uniffi", derive(uniffi::Enum))]
#[serde(rename_all = "snake_case")]
pub enum SubscriptionStatus {
    /// Paid and current.
    Active,
    /// In a trial.
    Trialing,
    /// Payment failed; access kept during the grace period.
    PastDue,
    /// Ended.
    Canceled,
    /// No subscription.
    #[default]
    None,
}

impl SubscriptionStatus {
    /// Wire name.
    pub fn as_str(self) -> &'static str {
        match self {
            SubscriptionStatus::Active => "active",
            SubscriptionStatus::Trialing => "trialing",
            SubscriptionStatus::PastDue => "past_due",
            SubscriptionStatus::Canceled => "canceled",
            SubscriptionStatus::None => "none",
        }
    }
    /// Parses a wire name.
    pub fn parse(s: &str) -> Option<Self> {
        [Self::Active, Self::Trialing, Self::PastDue, Self::Canceled, Self::None].into_iter().find(|v| v.as_str() == s)
    }
}

/// Access to a plan granted by an admin or a promotion, until a date (or forever).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct AccessGrant {
    /// Plan granted.
    pub plan: String,
    /// End of the grant (`None` = no end).
    pub until: Option<DateTime<Utc>>,
    /// Who granted it.
    pub granted_by: String,
    /// Why (shows up as `access_reason = granted:<reason>`).
    pub reason: String,
}

/// A grant of credits with its remaining balance.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct CreditGrant {
    /// Grant id (stable across devices).
    pub id: String,
    /// Credits left in this grant.
    pub remaining: i64,
    /// When the grant expires (`None` = never).
    pub expires_at: Option<DateTime<Utc>>,
    /// Where it came from (`plan`, `admin`, `purchase`, …).
    #[serde(default)]
    pub source: String,
}

/// Why the user has the access they have.
pub mod access_reason {
    /// The user is an admin.
    pub const ADMIN: &str = "admin";
    /// An active (or past-due in grace) subscription.
    pub const SUBSCRIPTION: &str = "subscription";
    /// A trialing subscription.
    pub const TRIAL: &str = "trial";
    /// A plan bought for ever (a one-time purchase).
    pub const LIFETIME: &str = "lifetime";
    /// The free plan.
    pub const FREE: &str = "free";
    /// Prefix of an access grant's reason: `granted:<reason>`.
    pub const GRANTED_PREFIX: &str = "granted:";
}

/// The entitlements of one user: the raw state (subscription, grants, admin flag, credit grants)
/// and, once [`Entitlements::resolve`]d, the plan in effect, `access_reason` and its rules.
///
/// This is the body of `GET /v1/entitlements` (without `token`) and the claims of the signed
/// entitlements token (with the JWT fields of [`EntitlementClaims`]).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Entitlements {
    /// The plan in effect once resolved; before resolution, the subscribed plan.
    pub plan: String,
    /// Subscription status.
    #[serde(default)]
    pub status: SubscriptionStatus,
    /// Why the user has this access (`admin`, `subscription`, `trial`, `granted:<reason>`, `free`).
    #[serde(default)]
    pub access_reason: String,
    /// Current billing period start (anchors `billing` windows).
    #[serde(default)]
    pub period_start: Option<DateTime<Utc>>,
    /// Current billing period end.
    #[serde(default)]
    pub period_end: Option<DateTime<Utc>>,
    /// End of the access grant in effect, when access comes from a grant.
    #[serde(default)]
    pub granted_until: Option<DateTime<Utc>>,
    /// Whether the user is an admin (full access).
    #[serde(default)]
    pub is_admin: bool,
    /// Sum of the unexpired credit grants' remaining credits.
    #[serde(default)]
    pub credit_balance: i64,
    /// Effective feature rules.
    #[serde(default)]
    pub features: BTreeMap<String, Rule>,
    /// Entitlement version (bumped on every change on the server).
    #[serde(default)]
    pub ver: u64,
    /// When the subscription became past due (grace is counted from here, or from
    /// `period_end` when absent).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub past_due_since: Option<DateTime<Utc>>,
    /// When the subscription's access ends by itself, as its store dated it (an App Store
    /// expiry, or the end of a store's billing grace period for a past-due one).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub access_until: Option<DateTime<Utc>>,
    /// Whether the plan was bought for ever (`access_reason` `lifetime`).
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    pub lifetime: bool,
    /// Access grants (admin or promotional).
    #[serde(default)]
    pub grants: Vec<AccessGrant>,
    /// Credit grants with their remaining balances.
    #[serde(default)]
    pub credit_grants: Vec<CreditGrant>,
    /// The user's timezone (IANA), as the server knows it.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub tz: Option<String>,
    /// The user's timezone history (`tz_history` of entitlement tokens): the zone in force
    /// 400 days before issuance, then every change since, pending ones included. Calendar
    /// windows follow it ([`crate::TimezoneHistory`]).
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub tz_history: Vec<crate::timezone_history::ZoneChange>,
    /// Model pricing in effect.
    #[serde(default)]
    pub models: BTreeMap<String, ModelPrice>,
    /// The free plan's rules, applied when the token is no longer trusted.
    #[serde(default)]
    pub free_features: BTreeMap<String, Rule>,
}

impl Default for Entitlements {
    fn default() -> Self {
        Entitlements::free()
    }
}

impl Entitlements {
    /// No subscription, no grants: the free plan.
    pub fn free() -> Self {
        Entitlements {
            plan: FREE_PLAN.into(),
            status: SubscriptionStatus::None,
            access_reason: access_reason::FREE.into(),
            period_start: None,
            period_end: None,
            granted_until: None,
            is_admin: false,
            credit_balance: 0,
            features: BTreeMap::new(),
            ver: 0,
            past_due_since: None,
            access_until: None,
            lifetime: false,
            grants: Vec::new(),
            credit_grants: Vec::new(),
            tz: None,
            tz_history: Vec::new(),
            models: BTreeMap::new(),
            free_features: BTreeMap::new(),
        }
    }

    /// The first instant after `now` at which [`Entitlements::resolve`] of this raw state may
    /// answer differently (a grant ends, a past-due grace ends, a credit grant expires); `None`
    /// when nothing in it ends. Caches of resolved entitlements (device and server) live at
    /// most until then.
    pub fn next_boundary(&self, now: DateTime<Utc>, past_due_grace: Duration) -> Option<DateTime<Utc>> {
        let grace_end =
            if self.status == SubscriptionStatus::PastDue { self.past_due_access_end(past_due_grace) } else { self.access_until };
        self.grants
            .iter()
            .filter_map(|g| g.until)
            .chain(self.credit_grants.iter().filter_map(|g| g.expires_at))
            .chain(grace_end)
            .filter(|t| *t > now)
            .min()
    }

    /// When a past-due subscription's access ends: the store's own date, else `past_due_grace`
    /// after the payment failed (or after the unpaid period's end); `None` with neither date.
    fn past_due_access_end(&self, past_due_grace: Duration) -> Option<DateTime<Utc>> {
        self.access_until.or_else(|| self.past_due_since.or(self.period_end).map(|t| t + past_due_grace))
    }

    /// Once resolved: when the access in effect ends by itself. A subscription's store-dated
    /// end, else its billing period's end; a past-due one's end of grace; a grant's end. `None`
    /// for admins, lifetime purchases, the free plan and grants without an end.
    pub fn access_expires_at(&self, past_due_grace: Duration) -> Option<DateTime<Utc>> {
        use access_reason as r;
        match self.access_reason.as_str() {
            r::SUBSCRIPTION if self.status == SubscriptionStatus::PastDue => self.past_due_access_end(past_due_grace),
            r::SUBSCRIPTION | r::TRIAL => self.access_until.or(self.period_end),
            reason if reason.starts_with(r::GRANTED_PREFIX) => self.granted_until,
            _ => None,
        }
    }

    /// Resolves the raw state at `now`: admin → active/trialing subscription (and past-due within
    /// `past_due_grace`) → the unexpired access grant lasting longest → free. Fills `plan`,
    /// `access_reason`, `granted_until`, `features`, `free_features`, `models` and
    /// `credit_balance` from `catalog`. `self.plan` is read as the subscribed plan.
    pub fn resolve(&self, catalog: &Catalog, now: DateTime<Utc>, past_due_grace: Duration) -> Entitlements {
        let mut r = self.clone();
        let subscribed = catalog.plan(&self.plan).map(|p| p.id.clone());
        // A store's own date ends the access; else grace runs from when the payment failed;
        // without that date, from the end of the period that was not paid; with neither, there
        // is no grace.
        let current = self.access_until.is_none_or(|u| now < u);
        let in_grace = self.status == SubscriptionStatus::PastDue && self.past_due_access_end(past_due_grace).is_some_and(|u| now < u);
        let grant = self
            .grants
            .iter()
            .filter(|g| g.until.is_none_or(|u| u > now) && catalog.plan(&g.plan).is_some())
            .max_by_key(|g| g.until.map_or(i64::MAX, |u| u.timestamp()));
        let (plan, reason, until) = if self.is_admin {
            (best_plan(catalog, subscribed.as_deref()), access_reason::ADMIN.to_string(), None)
        } else if let (Some(p), SubscriptionStatus::Active, true) = (&subscribed, self.status, current) {
            let reason = if self.lifetime { access_reason::LIFETIME } else { access_reason::SUBSCRIPTION };
            (p.clone(), reason.into(), None)
        } else if let (Some(p), SubscriptionStatus::Trialing, true) = (&subscribed, self.status, current) {
            (p.clone(), access_reason::TRIAL.into(), None)
        } else if let (Some(p), true) = (&subscribed, in_grace) {
            (p.clone(), access_reason::SUBSCRIPTION.into(), None)
        } else if let Some(g) = grant {
            (g.plan.clone(), format!("{}{}", access_reason::GRANTED_PREFIX, g.reason), g.until)
        } else {
            (FREE_PLAN.to_string(), access_reason::FREE.into(), None)
        };
        let plan_def = catalog.plan(&plan).unwrap_or_else(|| catalog.free());
        r.plan = plan_def.id.clone();
        r.access_reason = reason;
        r.granted_until = until;
        r.features = plan_def.features.clone();
        if self.is_admin {
            // Admins get every feature of every plan, the most generous rule winning.
            for p in &catalog.plans {
                for (k, rule) in &p.features {
                    r.features.entry(k.clone()).or_insert_with(|| rule.clone());
                }
            }
        }
        r.free_features = catalog.free().features.clone();
        r.models = catalog.models.clone();
        r.credit_balance = self.credit_grants.iter().filter(|g| g.expires_at.is_none_or(|e| e > now)).map(|g| g.remaining).sum();
        r
    }
}

/// For admins: the subscribed plan if any, else the plan with the most features.
fn best_plan(catalog: &Catalog, subscribed: Option<&str>) -> String {
    subscribed
        .map(str::to_string)
        .or_else(|| catalog.plans.iter().max_by_key(|p| p.features.len()).map(|p| p.id.clone()))
        .unwrap_or_else(|| FREE_PLAN.into())
}

/// Whether a user's plan credits come from paid invoices (the billing provider grants them once
/// per invoice) rather than from the plan itself each billing window.
pub fn credits_from_invoices(access_reason: &str) -> bool {
    // A lifetime plan has no invoices: its included credits come each billing window.
    access_reason == access_reason::SUBSCRIPTION || access_reason == access_reason::TRIAL
}

/// The credits `plan` includes, as grants for the billing windows up to `now`: the current
/// window's (`included:<plan>:<window start ms>`, expiring at the window's end), and, when the
/// credits roll over, those of the earlier windows since `since` (at most 36), never expiring.
pub fn included_credit_grants(
    plan: &crate::Plan,
    since: DateTime<Utc>,
    anchor: DateTime<Utc>,
    now: DateTime<Utc>,
) -> Vec<(DateTime<Utc>, CreditGrant)> {
    let Some(ic) = plan.included_credits.filter(|c| c.amount > 0) else { return Vec::new() };
    let mut out = Vec::new();
    let mut w = crate::period::billing_window(now, anchor);
    for _ in 0..36 {
        out.push((
            w.start,
            CreditGrant {
                id: format!("included:{}:{}", plan.id, w.start.timestamp_millis()),
                remaining: i64::try_from(ic.amount).unwrap_or(i64::MAX),
                expires_at: if ic.rollover { None } else { w.end },
                source: "plan".into(),
            },
        ));
        if !ic.rollover || w.start <= since {
            break;
        }
        w = crate::period::billing_window(w.start - Duration::milliseconds(1), anchor);
    }
    out
}

/// Claims of the entitlements token: the entitlements plus the JWT registered claims.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct EntitlementClaims {
    /// The entitlements (flattened into the claims object).
    #[serde(flatten)]
    pub entitlements: Entitlements,
    /// The identity provider's subject (the user's `external_id`).
    pub sub: String,
    /// The server's user id.
    pub uid: String,
    /// Issuer.
    pub iss: String,
    /// Audience.
    pub aud: String,
    /// Issued at (Unix seconds).
    pub iat: i64,
    /// Expires at (Unix seconds).
    pub exp: i64,
    /// Protocol 2 device tokens: the device the token was issued to.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub did: Option<String>,
    /// Protocol 2: grows with every lease change of that device.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub lease_ver: Option<u64>,
    /// Protocol 2: when the leases end (Unix seconds, `exp` + the server's grace); after it the
    /// server reclaims what the device had not reported.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub lease_until: Option<i64>,
    /// Protocol 2: this device's slices of its hard pools.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub leases: Vec<crate::lease::Lease>,
}

#[cfg(test)]
mod tests {
    use super::*;

    fn catalog() -> Catalog {
        Catalog::from_json(
            r#"{"plans":[{"id":"free","features":{"chat":{"type":"metered","limit":5,"period":"month"}}},
            {"id":"pro","features":{"chat":{"type":"metered","limit":500,"period":"month"},"export":{"type":"flag","enabled":true}}}]}"#,
        )
        .unwrap()
    }

    fn at(s: &str) -> DateTime<Utc> {
        DateTime::parse_from_rfc3339(s).unwrap().with_timezone(&Utc)
    }

    #[test]
    fn resolution_order() {
        let c = catalog();
        let now = at("2026-11-25T12:00:00Z");
        let grace = Duration::days(3);
        let mut e = Entitlements { plan: "pro".into(), status: SubscriptionStatus::Active, ..Entitlements::free() };
        let r = e.resolve(&c, now, grace);
        assert_eq!((r.plan.as_str(), r.access_reason.as_str()), ("pro", "subscription"));
        assert_eq!(r.features["chat"].limit(), Some(500));
        e.status = SubscriptionStatus::Trialing;
        assert_eq!(e.resolve(&c, now, grace).access_reason, "trial");
        e.status = SubscriptionStatus::PastDue;
        e.past_due_since = Some(now - Duration::days(1));
        assert_eq!(e.resolve(&c, now, grace).access_reason, "subscription");
        e.past_due_since = Some(now - Duration::days(4));
        assert_eq!(e.resolve(&c, now, grace).plan, "free");
        e.grants.push(AccessGrant {
            plan: "pro".into(),
            until: Some(now + Duration::days(1)),
            granted_by: "ops".into(),
            reason: "beta".into(),
        });
        let r = e.resolve(&c, now, grace);
        assert_eq!((r.plan.as_str(), r.access_reason.as_str(), r.granted_until), ("pro", "granted:beta", Some(now + Duration::days(1))));
        assert_eq!(e.resolve(&c, now + Duration::days(2), grace).access_reason, "free");
        e.is_admin = true;
        assert_eq!(e.resolve(&c, now, grace).access_reason, "admin");
        assert_eq!(r.free_features["chat"].limit(), Some(5));
    }

    #[test]
    fn past_due_grace_without_a_failure_date_counts_from_period_end() {
        let c = catalog();
        let now = at("2026-11-25T12:00:00Z");
        let grace = Duration::days(3);
        let mut e = Entitlements { plan: "pro".into(), status: SubscriptionStatus::PastDue, ..Entitlements::free() };
        assert_eq!(e.resolve(&c, now, grace).plan, "free", "no date at all: no grace");
        e.period_end = Some(now - Duration::days(1));
        assert_eq!(e.resolve(&c, now, grace).plan, "pro");
        e.period_end = Some(now - Duration::days(5));
        assert_eq!(e.resolve(&c, now, grace).plan, "free");
    }

    #[test]
    fn included_credits_per_billing_window() {
        let c = Catalog::from_json(
            r#"{"plans":[{"id":"free","included_credits":{"amount":100,"rollover":false}},
                         {"id":"pro","included_credits":{"amount":50,"rollover":true}}]}"#,
        )
        .unwrap();
        let anchor = at("2026-01-31T10:00:00Z");
        let now = at("2026-03-05T00:00:00Z");
        let free = included_credit_grants(c.plan("free").unwrap(), anchor, anchor, now);
        assert_eq!(free.len(), 1);
        assert_eq!(free[0].1.id, format!("included:free:{}", at("2026-02-28T10:00:00Z").timestamp_millis()));
        assert_eq!((free[0].1.remaining, free[0].1.expires_at), (100, Some(at("2026-03-31T10:00:00Z"))));
        let pro = included_credit_grants(c.plan("pro").unwrap(), anchor, anchor, now);
        assert_eq!(pro.len(), 2, "rolled-over credits of every window since the start");
        assert!(pro.iter().all(|(_, g)| g.expires_at.is_none()));
        assert!(credits_from_invoices("subscription") && !credits_from_invoices("free") && !credits_from_invoices("granted:beta"));
    }

    #[test]
    fn credit_balance_ignores_expired_grants() {
        let c = catalog();
        let now = at("2026-11-25T12:00:00Z");
        let mut e = Entitlements::free();
        e.credit_grants = vec![
            CreditGrant { id: "a".into(), remaining: 10, expires_at: Some(now - Duration::seconds(1)), source: "plan".into() },
            CreditGrant { id: "b".into(), remaining: 7, expires_at: None, source: "admin".into() },
        ];
        assert_eq!(e.resolve(&c, now, Duration::zero()).credit_balance, 7);
    }
}
