//! Catalog rules and the entitlements of a user.

use crate::convert::{from_opt_ms, opt_ms, opt_signed, opt_unsigned, signed, unsigned};
use crate::error::TallyError;
use std::collections::HashMap;
use tally_core as core;
use tally_core::lease::Share;

/// What a plan grants for one feature key.
#[derive(Debug, Clone, PartialEq, uniffi::Enum)]
pub enum Rule {
    /// On or off.
    Flag { enabled: bool },
    /// Counted uses per period; `limit` absent = unlimited.
    /// `offline_share`: the fraction of each window's limit devices may hold as leases (0..1).
    Metered { limit: Option<i64>, period: core::Period, enforcement: core::Enforcement, offline_share: f64 },
    /// Each unit draws `cost` credits from the user's balance.
    Credits { cost: i64 },
    /// A request rate limit, per device, never synced.
    Rate { limit: i64, window_secs: i64 },
    /// Caps summed AI cost (micros) per period.
    Budget { limit_micros: i64, period: core::Period, enforcement: core::Enforcement, offline_share: f64 },
}

impl From<core::Rule> for Rule {
    fn from(r: core::Rule) -> Self {
        match r {
            core::Rule::Flag { enabled } => Rule::Flag { enabled },
            core::Rule::Metered { limit, period, enforcement, offline_share } => {
                Rule::Metered { limit: opt_signed(limit), period, enforcement, offline_share: offline_share.as_f64() }
            }
            core::Rule::Credits { cost } => Rule::Credits { cost: signed(cost) },
            core::Rule::Rate { limit, window_secs } => Rule::Rate { limit: signed(limit), window_secs: signed(window_secs) },
            core::Rule::Budget { limit_micros, period, enforcement, offline_share } => {
                Rule::Budget { limit_micros: signed(limit_micros), period, enforcement, offline_share: offline_share.as_f64() }
            }
        }
    }
}

fn share(v: f64) -> Share {
    Share::from_f64(v.clamp(0.0, 1.0)).unwrap_or_default()
}

impl TryFrom<Rule> for core::Rule {
    type Error = TallyError;
    fn try_from(r: Rule) -> Result<Self, TallyError> {
        Ok(match r {
            Rule::Flag { enabled } => core::Rule::Flag { enabled },
            Rule::Metered { limit, period, enforcement, offline_share } => {
                core::Rule::Metered { limit: opt_unsigned(limit, "limit")?, period, enforcement, offline_share: share(offline_share) }
            }
            Rule::Credits { cost } => core::Rule::Credits { cost: unsigned(cost, "cost")? },
            Rule::Rate { limit, window_secs } => {
                core::Rule::Rate { limit: unsigned(limit, "limit")?, window_secs: unsigned(window_secs, "window_secs")? }
            }
            Rule::Budget { limit_micros, period, enforcement, offline_share } => core::Rule::Budget {
                limit_micros: unsigned(limit_micros, "limit_micros")?,
                period,
                enforcement,
                offline_share: share(offline_share),
            },
        })
    }
}

fn rules_from(m: HashMap<String, Rule>) -> Result<std::collections::BTreeMap<String, core::Rule>, TallyError> {
    m.into_iter().map(|(k, v)| Ok((k, v.try_into()?))).collect()
}

/// Price of one AI model, in micro-units of currency per million tokens.
#[derive(Debug, Clone, Copy, PartialEq, Eq, uniffi::Record)]
pub struct ModelPrice {
    /// Price per million input tokens.
    pub input_micros_per_mtok: i64,
    /// Price per million output tokens.
    pub output_micros_per_mtok: i64,
}

impl From<core::ModelPrice> for ModelPrice {
    fn from(p: core::ModelPrice) -> Self {
        ModelPrice { input_micros_per_mtok: signed(p.input_micros_per_mtok), output_micros_per_mtok: signed(p.output_micros_per_mtok) }
    }
}

impl TryFrom<ModelPrice> for core::ModelPrice {
    type Error = TallyError;
    fn try_from(p: ModelPrice) -> Result<Self, TallyError> {
        Ok(core::ModelPrice {
            input_micros_per_mtok: unsigned(p.input_micros_per_mtok, "input_micros_per_mtok")?,
            output_micros_per_mtok: unsigned(p.output_micros_per_mtok, "output_micros_per_mtok")?,
        })
    }
}

/// Access to a plan granted by an admin or a promotion.
#[derive(Debug, Clone, PartialEq, Eq, uniffi::Record)]
pub struct AccessGrant {
    /// Plan granted.
    pub plan: String,
    /// End of the grant (Unix ms; absent = no end).
    pub until_ms: Option<i64>,
    /// Who granted it.
    pub granted_by: String,
    /// Why (shows up as `access_reason = granted:<reason>`).
    pub reason: String,
}

impl From<core::AccessGrant> for AccessGrant {
    fn from(g: core::AccessGrant) -> Self {
        AccessGrant { plan: g.plan, until_ms: opt_ms(g.until), granted_by: g.granted_by, reason: g.reason }
    }
}

impl TryFrom<AccessGrant> for core::AccessGrant {
    type Error = TallyError;
    fn try_from(g: AccessGrant) -> Result<Self, TallyError> {
        Ok(core::AccessGrant {
            plan: g.plan,
            until: from_opt_ms(g.until_ms, "grants.until_ms")?,
            granted_by: g.granted_by,
            reason: g.reason,
        })
    }
}

/// A grant of credits with its remaining balance.
#[derive(Debug, Clone, PartialEq, Eq, uniffi::Record)]
pub struct CreditGrant {
    /// Grant id (stable across devices).
    pub id: String,
    /// Credits left in this grant.
    pub remaining: i64,
    /// When the grant expires (Unix ms; absent = never).
    pub expires_at_ms: Option<i64>,
    /// Where it came from (`plan`, `admin`, `purchase`, …).
    pub source: String,
}

impl From<core::CreditGrant> for CreditGrant {
    fn from(g: core::CreditGrant) -> Self {
        CreditGrant { id: g.id, remaining: g.remaining, expires_at_ms: opt_ms(g.expires_at), source: g.source }
    }
}

impl TryFrom<CreditGrant> for core::CreditGrant {
    type Error = TallyError;
    fn try_from(g: CreditGrant) -> Result<Self, TallyError> {
        Ok(core::CreditGrant {
            id: g.id,
            remaining: g.remaining,
            expires_at: from_opt_ms(g.expires_at_ms, "credit_grants.expires_at_ms")?,
            source: g.source,
        })
    }
}

/// The entitlements of one user: the raw state and, as returned by `entitlements()`, the
/// resolved plan, `access_reason` and rules.
#[derive(Debug, Clone, PartialEq, uniffi::Record)]
pub struct Entitlements {
    /// The plan in effect once resolved; when setting, the subscribed plan.
    pub plan: String,
    /// Subscription status.
    pub status: core::SubscriptionStatus,
    /// Why the user has this access (`admin`, `subscription`, `trial`, `lifetime`,
    /// `granted:<reason>`, `free`).
    #[uniffi(default = "")]
    pub access_reason: String,
    /// Current billing period start (Unix ms).
    #[uniffi(default = None)]
    pub period_start_ms: Option<i64>,
    /// Current billing period end (Unix ms).
    #[uniffi(default = None)]
    pub period_end_ms: Option<i64>,
    /// End of the access grant in effect (Unix ms).
    #[uniffi(default = None)]
    pub granted_until_ms: Option<i64>,
    /// Whether the user is an admin (full access).
    #[uniffi(default = false)]
    pub is_admin: bool,
    /// Sum of the unexpired credit grants' remaining credits.
    #[uniffi(default = 0)]
    pub credit_balance: i64,
    /// Effective feature rules.
    #[uniffi(default)]
    pub features: HashMap<String, Rule>,
    /// Entitlement version.
    #[uniffi(default = 0)]
    pub ver: i64,
    /// When the subscription became past due (Unix ms).
    #[uniffi(default = None)]
    pub past_due_since_ms: Option<i64>,
    /// When the subscription's access ends by itself, as its store dated it (Unix ms).
    #[uniffi(default = None)]
    pub access_until_ms: Option<i64>,
    /// Whether the plan was bought for ever (`access_reason` `lifetime`).
    #[uniffi(default = false)]
    pub lifetime: bool,
    /// Access grants (admin or promotional).
    #[uniffi(default = [])]
    pub grants: Vec<AccessGrant>,
    /// Credit grants with their remaining balances (replace the stored ones when set).
    #[uniffi(default = [])]
    pub credit_grants: Vec<CreditGrant>,
    /// The user's timezone (IANA), as the server knows it.
    #[uniffi(default = None)]
    pub tz: Option<String>,
    /// Model pricing in effect.
    #[uniffi(default)]
    pub models: HashMap<String, ModelPrice>,
    /// The free plan's rules, applied when the token is no longer trusted.
    #[uniffi(default)]
    pub free_features: HashMap<String, Rule>,
}

impl From<core::Entitlements> for Entitlements {
    fn from(e: core::Entitlements) -> Self {
        Entitlements {
            plan: e.plan,
            status: e.status,
            access_reason: e.access_reason,
            period_start_ms: opt_ms(e.period_start),
            period_end_ms: opt_ms(e.period_end),
            granted_until_ms: opt_ms(e.granted_until),
            is_admin: e.is_admin,
            credit_balance: e.credit_balance,
            features: e.features.into_iter().map(|(k, v)| (k, v.into())).collect(),
            ver: signed(e.ver),
            past_due_since_ms: opt_ms(e.past_due_since),
            access_until_ms: opt_ms(e.access_until),
            lifetime: e.lifetime,
            grants: e.grants.into_iter().map(Into::into).collect(),
            credit_grants: e.credit_grants.into_iter().map(Into::into).collect(),
            tz: e.tz,
            models: e.models.into_iter().map(|(k, v)| (k, v.into())).collect(),
            free_features: e.free_features.into_iter().map(|(k, v)| (k, v.into())).collect(),
        }
    }
}

impl TryFrom<Entitlements> for core::Entitlements {
    type Error = TallyError;
    fn try_from(e: Entitlements) -> Result<Self, TallyError> {
        Ok(core::Entitlements {
            plan: e.plan,
            status: e.status,
            access_reason: e.access_reason,
            period_start: from_opt_ms(e.period_start_ms, "period_start_ms")?,
            period_end: from_opt_ms(e.period_end_ms, "period_end_ms")?,
            granted_until: from_opt_ms(e.granted_until_ms, "granted_until_ms")?,
            is_admin: e.is_admin,
            credit_balance: e.credit_balance,
            features: rules_from(e.features)?,
            ver: unsigned(e.ver, "ver")?,
            past_due_since: from_opt_ms(e.past_due_since_ms, "past_due_since_ms")?,
            access_until: from_opt_ms(e.access_until_ms, "access_until_ms")?,
            lifetime: e.lifetime,
            grants: e.grants.into_iter().map(TryInto::try_into).collect::<Result<_, _>>()?,
            credit_grants: e.credit_grants.into_iter().map(TryInto::try_into).collect::<Result<_, _>>()?,
            tz: e.tz,
            // Only a verified server token's history moves windows; a local state has none.
            tz_history: Vec::new(),
            models: e.models.into_iter().map(|(k, v)| Ok((k, v.try_into()?))).collect::<Result<_, TallyError>>()?,
            free_features: rules_from(e.free_features)?,
        })
    }
}
