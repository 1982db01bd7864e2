//! Quota decisions: the answer of `check` and `consume`, and the pure rules that produce it from
//! a counter. Used by the device and by the server's `POST /v1/check`.

use crate::catalog::Enforcement;
use chrono::{DateTime, Utc};
use serde::{Deserialize, Serialize};

/// Why a decision came out the way it did.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Reason {
    /// Allowed.
    Ok,
    /// A hard limit would be exceeded; nothing recorded.
    LimitReached,
    /// An AI budget is used up.
    BudgetExceeded,
    /// The feature exists but the user's plan does not include it.
    NotInPlan,
    /// Too many requests in the rate window.
    RateLimited,
    /// Not enough credits.
    InsufficientCredits,
    /// No plan in the catalog knows this feature.
    UnknownFeature,
    /// The model has no price in the catalog.
    UnknownModel,
    /// Over a soft limit: recorded and flagged.
    OverLimitSoft,
}

impl Reason {
    /// Wire name.
    pub fn as_str(self) -> &'static str {
        match self {
            Reason::Ok => "ok",
            Reason::LimitReached => "limit_reached",
            Reason::BudgetExceeded => "budget_exceeded",
            Reason::NotInPlan => "not_in_plan",
            Reason::RateLimited => "rate_limited",
            Reason::InsufficientCredits => "insufficient_credits",
            Reason::UnknownFeature => "unknown_feature",
            Reason::UnknownModel => "unknown_model",
            Reason::OverLimitSoft => "over_limit_soft",
        }
    }
}

/// The answer to `check` / `consume`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Decision {
    /// Whether the use may go ahead (for `consume`: whether it was recorded).
    pub allowed: bool,
    /// Why.
    pub reason: Reason,
    /// Used in the current window (after this use when it was recorded); credits spent for
    /// credit rules.
    pub used: u64,
    /// The limit (`None` = unlimited or not applicable).
    pub limit: Option<u64>,
    /// What is left (`None` = unlimited); 0 when over.
    pub remaining: Option<u64>,
    /// When the window resets (`None` = never).
    pub resets_at: Option<DateTime<Utc>>,
    /// Where the user's access comes from (`subscription`, `free`, …).
    pub access_reason: String,
    /// `max(0, used - limit)`; for credits, the negative balance.
    #[serde(default)]
    pub over_limit_by: u64,
}

impl Decision {
    /// A decision without counters (flags, unknown features, …).
    pub fn simple(allowed: bool, reason: Reason, access_reason: &str) -> Decision {
        Decision {
            allowed,
            reason,
            used: 0,
            limit: None,
            remaining: None,
            resets_at: None,
            access_reason: access_reason.into(),
            over_limit_by: 0,
        }
    }
}

/// What a counted rule (metered, budget, rate) decides.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Counted {
    /// Limit, `None` = unlimited.
    pub limit: Option<u64>,
    /// Hard or soft.
    pub enforcement: Enforcement,
    /// Reason when a hard limit denies.
    pub deny_reason: Reason,
    /// Whether the use is recorded even over the limit (budgets: the tokens were spent).
    pub always_record: bool,
}

/// Decides a use of `amount` against a counter at `used`. Returns the decision and whether the
/// use should be recorded (for `consume`). `used`/`remaining` in the decision are after the use
/// when it is recorded, else the current ones.
pub fn decide_counted(
    c: Counted,
    used: u64,
    amount: u64,
    resets_at: Option<DateTime<Utc>>,
    access_reason: &str,
    record: bool,
) -> (Decision, bool) {
    let after = used.saturating_add(amount);
    let mk = |allowed, reason, shown: u64| Decision {
        allowed,
        reason,
        used: shown,
        limit: c.limit,
        remaining: c.limit.map(|l| l.saturating_sub(shown)),
        resets_at,
        access_reason: access_reason.into(),
        over_limit_by: c.limit.map_or(0, |l| shown.saturating_sub(l)),
    };
    let shown_if_recorded = if record { after } else { used };
    match c.limit {
        None => (mk(true, Reason::Ok, shown_if_recorded), true),
        Some(l) if after <= l && used < l || (amount == 0 && used <= l) => (mk(true, Reason::Ok, shown_if_recorded), true),
        Some(_) if c.always_record && record => (mk(true, c.deny_reason, after), true),
        Some(_) if c.enforcement == Enforcement::Soft => (mk(true, Reason::OverLimitSoft, shown_if_recorded), true),
        Some(_) => (mk(false, c.deny_reason, used), false),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const HARD: Counted =
        Counted { limit: Some(5), enforcement: Enforcement::Hard, deny_reason: Reason::LimitReached, always_record: false };

    #[test]
    fn hard_soft_budget() {
        let (d, rec) = decide_counted(HARD, 4, 1, None, "free", true);
        assert!(d.allowed && rec && d.remaining == Some(0) && d.used == 5);
        let (d, rec) = decide_counted(HARD, 5, 1, None, "free", true);
        assert!(!d.allowed && !rec && d.reason == Reason::LimitReached && d.used == 5);
        let (d, _) = decide_counted(HARD, 4, 1, None, "free", false);
        assert_eq!((d.used, d.remaining), (4, Some(1)));
        let soft = Counted { enforcement: Enforcement::Soft, ..HARD };
        let (d, rec) = decide_counted(soft, 5, 2, None, "free", true);
        assert!(d.allowed && rec && d.reason == Reason::OverLimitSoft && d.over_limit_by == 2 && d.remaining == Some(0));
        let budget = Counted { limit: Some(100), enforcement: Enforcement::Hard, deny_reason: Reason::BudgetExceeded, always_record: true };
        let (d, rec) = decide_counted(budget, 90, 30, None, "free", true);
        assert!(rec && d.reason == Reason::BudgetExceeded && d.over_limit_by == 20);
        let (d, rec) = decide_counted(budget, 120, 1, None, "free", false);
        assert!(!d.allowed && !rec && d.reason == Reason::BudgetExceeded);
        let unlimited = Counted { limit: None, ..HARD };
        assert!(decide_counted(unlimited, u64::MAX, 1, None, "free", true).0.allowed);
    }
}
