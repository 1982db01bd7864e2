//! A user's whole state in one record, RevenueCat `CustomerInfo` style: plan, status, access
//! reason and expiry, credit balance, every feature's usage, limit and lease, the catalog's
//! plans as entitlements (`entitlements["pro"].is_active`) and the active purchases. Delivered
//! by the change stream (`UserChange.info`) and by `customer_info` / `current_customer_info`.

use crate::Tally;
use crate::convert::{opt_ms, signed, to_ms};
use crate::entitlements::Rule;
use crate::error::{TallyError, core as call};
use crate::leases::LeaseStatus;
use crate::quota::Usage;
use crate::users::User;
use std::collections::HashMap;
use tally_core as core;
use tally_core::entitlements::access_reason;

/// One feature of the user's plan.
#[derive(Debug, Clone, PartialEq, uniffi::Record)]
pub struct FeatureInfo {
    /// Feature key.
    pub feature: String,
    /// Whether the plan lets the user use it at all (every rule but a disabled flag; the
    /// limit, balance and lease still apply: see `usage`).
    pub entitled: bool,
    /// The rule in effect.
    pub rule: Rule,
    /// Usage, limit and what is left in the current window.
    pub usage: Usage,
    /// This device's lease of the feature (protocol 2; absent without one).
    pub lease: Option<LeaseStatus>,
}

/// One plan of the catalog, as an entitlement.
#[derive(Debug, Clone, PartialEq, Eq, uniffi::Record)]
pub struct EntitlementInfo {
    /// The plan id (`pro`).
    pub identifier: String,
    /// Whether it is the plan in effect (for an admin: every plan).
    pub is_active: bool,
    /// Why it is active (`subscription`, `trial`, `lifetime`, `granted:<reason>`, `admin`,
    /// `free`); absent when inactive.
    pub access_reason: Option<String>,
    /// When the access ends by itself (Unix ms); absent when inactive or without an end.
    pub expires_at_ms: Option<i64>,
}

/// What kind of purchase an [`ActivePurchase`] is.
#[derive(Debug, Clone, Copy, PartialEq, Eq, uniffi::Enum)]
pub enum PurchaseKind {
    /// A subscription (or its trial) that gives the plan in effect.
    Subscription,
    /// A plan bought for ever.
    Lifetime,
    /// A credit pack with credits left.
    Credits,
}

/// A purchase that still gives something.
#[derive(Debug, Clone, PartialEq, Eq, uniffi::Record)]
pub struct ActivePurchase {
    /// Subscription, lifetime plan or credit pack.
    pub kind: PurchaseKind,
    /// The plan it gives (absent for credits).
    pub plan: Option<String>,
    /// The subscription's status (`Active` for a lifetime plan or a credit pack).
    pub status: core::SubscriptionStatus,
    /// When it ends by itself (Unix ms; absent = no end).
    pub expires_at_ms: Option<i64>,
    /// For credits: the grant's id and what is left of it.
    pub credit_grant_id: Option<String>,
    /// For credits: credits left in the grant.
    pub credits_remaining: Option<i64>,
}

/// The state of one user on this device.
#[derive(Debug, Clone, PartialEq, uniffi::Record)]
pub struct CustomerInfo {
    /// The user.
    pub user: User,
    /// The plan in effect.
    pub plan: String,
    /// Subscription status.
    pub status: core::SubscriptionStatus,
    /// Why the user has this access (`admin`, `subscription`, `trial`, `lifetime`,
    /// `granted:<reason>`, `free`).
    pub access_reason: String,
    /// When the access in effect ends by itself (Unix ms; absent = no end).
    pub expires_at_ms: Option<i64>,
    /// Whether the user is an admin (full access).
    pub is_admin: bool,
    /// Credit balance (negative when overspent).
    pub credit_balance: i64,
    /// Every feature of the plan in effect, by key.
    pub features: HashMap<String, FeatureInfo>,
    /// Every plan of the catalog, by id.
    pub entitlements: HashMap<String, EntitlementInfo>,
    /// Subscriptions, lifetime plans and credit packs that still give something.
    pub active_purchases: Vec<ActivePurchase>,
    /// Uses not yet acknowledged by a server.
    pub pending_events: i64,
    /// When the user last completed a sync (Unix ms; absent = never).
    pub last_synced_at_ms: Option<i64>,
    /// The time this snapshot was taken at (Unix ms, never before the highest time seen).
    pub as_of_ms: i64,
}

/// The snapshot of `user_id`, from the core's own answers.
pub(crate) fn customer_info(t: &core::Tally, user_id: &str) -> core::Result<CustomerInfo> {
    let user = t.user(user_id)?;
    let ent = t.entitlements(user_id)?;
    let now = t.highest_seen_time();
    let expires = ent.access_expires_at(t.config().past_due_grace);
    let leases = t.leases(user_id)?;
    let features = ent
        .features
        .iter()
        .map(|(key, rule)| {
            let info = FeatureInfo {
                feature: key.clone(),
                entitled: rule.grants_access(),
                rule: rule.clone().into(),
                usage: t.usage(user_id, key)?.into(),
                lease: leases.iter().find(|l| &l.feature == key).cloned().map(Into::into),
            };
            Ok((key.clone(), info))
        })
        .collect::<core::Result<HashMap<_, _>>>()?;
    let entitlements = t
        .catalog()
        .plans
        .iter()
        .map(|p| {
            let active = ent.is_admin || p.id == ent.plan;
            let info = EntitlementInfo {
                identifier: p.id.clone(),
                is_active: active,
                access_reason: active.then(|| ent.access_reason.clone()),
                expires_at_ms: if active { opt_ms(expires) } else { None },
            };
            (p.id.clone(), info)
        })
        .collect();
    let mut active_purchases = Vec::new();
    if [access_reason::SUBSCRIPTION, access_reason::TRIAL, access_reason::LIFETIME].contains(&ent.access_reason.as_str()) {
        active_purchases.push(ActivePurchase {
            kind: if ent.lifetime { PurchaseKind::Lifetime } else { PurchaseKind::Subscription },
            plan: Some(ent.plan.clone()),
            status: ent.status,
            expires_at_ms: opt_ms(expires),
            credit_grant_id: None,
            credits_remaining: None,
        });
    }
    active_purchases.extend(
        ent.credit_grants
            .iter()
            .filter(|g| g.source == core::credits::PURCHASE_SOURCE && g.remaining > 0 && g.expires_at.is_none_or(|e| e > now))
            .map(|g| ActivePurchase {
                kind: PurchaseKind::Credits,
                plan: None,
                status: core::SubscriptionStatus::Active,
                expires_at_ms: opt_ms(g.expires_at),
                credit_grant_id: Some(g.id.clone()),
                credits_remaining: Some(g.remaining),
            }),
    );
    Ok(CustomerInfo {
        user: user.into(),
        plan: ent.plan,
        status: ent.status,
        access_reason: ent.access_reason,
        expires_at_ms: opt_ms(expires),
        is_admin: ent.is_admin,
        credit_balance: t.credit_balance(user_id)?,
        features,
        entitlements,
        active_purchases,
        pending_events: signed(t.pending_events(user_id)?),
        last_synced_at_ms: opt_ms(t.last_synced_at(user_id)?),
        as_of_ms: to_ms(now),
    })
}

#[uniffi::export]
impl Tally {
    /// The state of `user_id` in one record (see [`CustomerInfo`]).
    pub fn customer_info(&self, user_id: String) -> Result<CustomerInfo, TallyError> {
        call(|| customer_info(&self.inner, &user_id))
    }

    /// The state of the current user (see `current_user`).
    pub fn current_customer_info(&self) -> Result<CustomerInfo, TallyError> {
        call(|| customer_info(&self.inner, &self.inner.current_user()?.id))
    }
}
