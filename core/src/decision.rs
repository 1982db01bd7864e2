//! Quota decisions: the answer of `check` and `consume`, and the pure rules that produce it from
//! a counter. Used by the device and by the server's `POST /v1/check`.

use crate::catalog::Enforcement;
use chrono::{DateTime, Utc};
use serde::{Deserialize, Serialize};

/// Why a decision came out the way it did.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[cfg_attr(feature = "openapi", derive(utoipa::ToSchema))]
#[cfg_attr(feature = "uniffi", derive(uniffi::Enum))]
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
    /// Protocol 2: this device's lease of a hard pool is spent while the account still has
    /// room; nothing recorded. Sync (online) to get more.
    LeaseExhausted,
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
            Reason::LeaseExhausted => "lease_exhausted",
        }
    }
}

/// The answer to `check` / `consume`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[cfg_attr(feature = "openapi", derive(utoipa::ToSchema))]
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
    /// Protocol 2, on a device: what this device's lease has left for the pool (beside the
    /// account's `remaining`); `None` without a lease.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub device_remaining: Option<u64>,
    /// On the server: units of the pool held by devices' leases when that room is what a use
    /// lacked (the server recalls them; retry after `Retry-After`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub held_offline: Option<u64>,
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
            device_remaining: None,
            held_offline: None,
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
        device_remaining: None,
        held_offline: None,
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

/// What a rule is decided against, read by the caller from its own storage: the counter of the
/// rule's current window (metered, budget, rate) and the user's credit balance (credits).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct RuleState {
    /// Used in the window (micros for budgets).
    pub used: u64,
    /// Credit balance (negative when in debt).
    pub balance: i64,
    /// When the window resets.
    pub resets_at: Option<DateTime<Utc>>,
}

/// What recording an allowed use changes.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum RuleEffect {
    /// Add `amount` units and `cost` micros to the rule's window counter.
    Count {
        /// Units.
        amount: u64,
        /// Micros.
        cost: u64,
    },
    /// Draw this many credits.
    Credits(u64),
    /// Nothing but the event (flags).
    None,
}

/// The priced cost of a use: no model, a model the catalog prices, or a model it does not.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Priced {
    /// No model given.
    NoModel,
    /// The model's cost in micros.
    Cost(u64),
    /// The catalog has no price for the model.
    UnknownModel,
}

/// Decides a use of `amount` of a feature under `rule` — the one evaluation of every rule kind,
/// used by the device's `check`/`consume` and the server's decisions. For a budget, the
/// measured amount is the priced cost when a model is given and `record` is set, else `amount`
/// (micros). Returns the decision and, when the use may be recorded, what recording changes.
/// A use whose credits or counter would overflow is a violation (`invalid_amount`).
pub fn decide_rule(
    rule: &crate::Rule,
    amount: u64,
    priced: Priced,
    state: RuleState,
    access_reason: &str,
    record: bool,
) -> Result<(Decision, Option<RuleEffect>), crate::contract::Violation> {
    use crate::Rule;
    use crate::contract::checked_product;
    let cost = match priced {
        Priced::Cost(c) => Some(c),
        _ => None,
    };
    match rule {
        Rule::Flag { enabled } => {
            let r = if *enabled { Reason::Ok } else { Reason::NotInPlan };
            Ok((Decision::simple(*enabled, r, access_reason), enabled.then_some(RuleEffect::None)))
        }
        Rule::Credits { cost: per_unit } => {
            let need = checked_product("credits", *per_unit, amount)?;
            let balance = state.balance;
            let ok = u64::try_from(balance).is_ok_and(|b| b >= need);
            let shown = if ok && record { balance - i64::try_from(need).unwrap_or(i64::MAX) } else { balance };
            let d = Decision {
                allowed: ok,
                reason: if ok { Reason::Ok } else { Reason::InsufficientCredits },
                used: need,
                limit: None,
                remaining: Some(u64::try_from(shown.max(0)).unwrap_or(0)),
                resets_at: None,
                access_reason: access_reason.into(),
                over_limit_by: if shown < 0 { shown.unsigned_abs() } else { 0 },
                device_remaining: None,
                held_offline: None,
            };
            Ok((d, ok.then_some(RuleEffect::Credits(need))))
        }
        Rule::Metered { limit, enforcement, .. } => {
            let c = Counted { limit: *limit, enforcement: *enforcement, deny_reason: Reason::LimitReached, always_record: false };
            counted(c, state, amount, amount, cost.unwrap_or(0), access_reason, record)
        }
        Rule::Budget { limit_micros, enforcement, .. } => {
            if priced == Priced::UnknownModel {
                return Ok((Decision::simple(false, Reason::UnknownModel, access_reason), None));
            }
            // With a model, the cost comes from its price; without, `amount` is micros.
            let c = if record { cost.unwrap_or(amount) } else { amount };
            let counted_rule =
                Counted { limit: Some(*limit_micros), enforcement: *enforcement, deny_reason: Reason::BudgetExceeded, always_record: true };
            counted(counted_rule, state, amount, c, c, access_reason, record)
        }
        Rule::Rate { limit, .. } => {
            let c = Counted { limit: Some(*limit), enforcement: Enforcement::Hard, deny_reason: Reason::RateLimited, always_record: false };
            counted(c, state, amount, amount, cost.unwrap_or(0), access_reason, record)
        }
    }
}

/// Decides one item of a use with several meters, to be recorded: as [`decide_rule`] with
/// `record`, except that a budget item is decided before the work, like a hold: its cost (the
/// priced cost with a model, else `amount` micros) must fit, since the whole use may still be
/// refused. A single-feature budget use, decided after the work, always records instead.
pub fn decide_item_rule(
    rule: &crate::Rule,
    amount: u64,
    priced: Priced,
    state: RuleState,
    access_reason: &str,
) -> Result<(Decision, Option<RuleEffect>), crate::contract::Violation> {
    match rule {
        crate::Rule::Budget { limit_micros, enforcement, .. } => {
            let cost = match priced {
                Priced::UnknownModel => return Ok((Decision::simple(false, Reason::UnknownModel, access_reason), None)),
                Priced::Cost(c) => c,
                Priced::NoModel => amount,
            };
            let c = Counted {
                limit: Some(*limit_micros),
                enforcement: *enforcement,
                deny_reason: Reason::BudgetExceeded,
                always_record: false,
            };
            counted(c, state, amount, cost, cost, access_reason, true)
        }
        crate::Rule::Flag { .. } | crate::Rule::Credits { .. } | crate::Rule::Metered { .. } | crate::Rule::Rate { .. } => {
            decide_rule(rule, amount, priced, state, access_reason, true)
        }
    }
}

fn counted(
    c: Counted,
    state: RuleState,
    amount: u64,
    measured: u64,
    effect_cost: u64,
    access_reason: &str,
    record: bool,
) -> Result<(Decision, Option<RuleEffect>), crate::contract::Violation> {
    if record {
        // A recorded use must fit the counter's range.
        crate::contract::checked_sum("used", state.used, measured)?;
    }
    let (d, rec) = decide_counted(c, state.used, measured, state.resets_at, access_reason, record);
    Ok((d, rec.then_some(RuleEffect::Count { amount, cost: effect_cost })))
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

    #[test]
    fn a_budget_item_must_fit_before_the_work_while_a_budget_use_always_records() {
        use crate::period::Period;
        let budget = crate::Rule::Budget {
            limit_micros: 1000,
            period: Period::Day,
            enforcement: Enforcement::Hard,
            offline_share: crate::lease::Share::ONE,
        };
        let state = RuleState { used: 600, ..RuleState::default() };
        let (d, effect) = decide_item_rule(&budget, 1, Priced::Cost(500), state, "free").unwrap();
        assert_eq!((d.allowed, d.reason, d.used, effect), (false, Reason::BudgetExceeded, 600, None), "the priced cost must fit");
        let (d, effect) = decide_item_rule(&budget, 400, Priced::NoModel, state, "free").unwrap();
        assert_eq!(
            (d.allowed, d.used, effect),
            (true, 1000, Some(RuleEffect::Count { amount: 400, cost: 400 })),
            "no model: amount is micros"
        );
        let (d, _) = decide_item_rule(&budget, 1, Priced::UnknownModel, state, "free").unwrap();
        assert_eq!((d.allowed, d.reason), (false, Reason::UnknownModel));
        let (d, effect) = decide_rule(&budget, 1, Priced::Cost(500), state, "free", true).unwrap();
        assert!(d.allowed && d.reason == Reason::BudgetExceeded && effect.is_some(), "a single use records, the work was done");
        let soft = crate::Rule::Budget {
            limit_micros: 1000,
            period: Period::Day,
            enforcement: Enforcement::Soft,
            offline_share: crate::lease::Share::ONE,
        };
        let (d, effect) = decide_item_rule(&soft, 1, Priced::Cost(500), state, "free").unwrap();
        assert!(d.allowed && d.reason == Reason::OverLimitSoft && effect.is_some(), "a soft budget flags instead");
        let metered = crate::Rule::Metered {
            limit: Some(5),
            period: Period::Day,
            enforcement: Enforcement::Hard,
            offline_share: crate::lease::Share::ONE,
        };
        assert_eq!(
            decide_item_rule(&metered, 2, Priced::NoModel, RuleState { used: 3, ..state }, "free").unwrap(),
            decide_rule(&metered, 2, Priced::NoModel, RuleState { used: 3, ..state }, "free", true).unwrap(),
            "other rules decide as a recorded use"
        );
    }
}
