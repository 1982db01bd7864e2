//! Pools: the room a hard limit leaves. A pool is one (user, feature, window) of a counted rule —
//! its `counters` row, with `used` (settled events), `held` (open holds) and the devices'
//! outstanding allowances (`pool_devices`) — or the user's credit balance (the `counters` row
//! of [`CREDITS`]). Pools change only with the user row locked (`users::lock`), in the
//! transaction that records; a decision also locks the pool row itself (`FOR UPDATE`).
//!
//! Free room = `max(0, limit − used − held − Σ_devices max(0, allowance − consumed))`: every
//! server-side consume and every hold is decided against it with the one rule evaluator
//! ([`tally_core::decision::decide_rule`]), fed the pool's *taken* units as `used`.

use crate::entitlements::Loaded;
use crate::error::{ApiError, ApiResult};
use crate::ledger::Ctx;
use chrono::{DateTime, Utc};
use deadpool_postgres::GenericClient;
use tally_core::decision::{Decision, Priced, Reason, RuleState, decide_rule};
use tally_core::period::window;
use tally_core::{Catalog, Enforcement, Rule};
use uuid::Uuid;

pub use tally_core::lease::{CREDITS, CREDITS_PERIOD};

/// The window start of the credit-balance pool (it has no window).
pub fn credits_start() -> DateTime<Utc> {
    DateTime::UNIX_EPOCH
}

/// The server's time, to the microsecond Postgres stores. Read it *after* taking the user row
/// lock: uses recorded by requests that held the lock before are then never in its future.
pub fn now_locked(state: &crate::AppState) -> DateTime<Utc> {
    let now = state.now();
    DateTime::from_timestamp_micros(now.timestamp_micros()).unwrap_or(now)
}

/// Whether `rule` is a hard limit the server guards (a `hard` metered rule with a limit, or a
/// `hard` budget).
pub fn is_hard(rule: &Rule) -> bool {
    matches!(
        rule,
        Rule::Metered { limit: Some(_), enforcement: Enforcement::Hard, .. } | Rule::Budget { enforcement: Enforcement::Hard, .. }
    )
}

/// The pool a use of a feature under `rule` takes from at the context's time.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PoolKey {
    /// Feature key, or [`CREDITS`].
    pub feature: String,
    /// Period (`lifetime` for credits).
    pub period: String,
    /// Window start.
    pub period_start: DateTime<Utc>,
    /// Window end (`None`: never).
    pub period_end: Option<DateTime<Utc>>,
}

impl PoolKey {
    /// The pool of `feature` under `rule` at the context's time: its window for a counted rule,
    /// the credit balance for a credits rule, none otherwise.
    pub fn of(ctx: &Ctx<'_>, feature: &str, rule: &Rule) -> Option<PoolKey> {
        match rule {
            Rule::Credits { .. } => {
                Some(PoolKey { feature: CREDITS.into(), period: CREDITS_PERIOD.into(), period_start: credits_start(), period_end: None })
            }
            _ => rule.period().map(|p| {
                let w = window(p, ctx.now, &ctx.zones, ctx.anchor);
                PoolKey { feature: feature.into(), period: p.as_str().into(), period_start: w.start, period_end: w.end }
            }),
        }
    }
}

/// A pool as read (and locked) for a decision.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct PoolState {
    /// Settled use in the rule's measure (units, or micros for a budget).
    pub used: u64,
    /// Kept by open holds.
    pub held: u64,
    /// Outstanding device allowances: Σ max(0, allowance − consumed).
    pub leased: u64,
}

impl PoolState {
    /// What is not free: used + held + leased.
    pub fn taken(&self) -> u64 {
        self.used.saturating_add(self.held).saturating_add(self.leased)
    }
}

/// Locks `key`'s pool row of the (locked) user, creating it when absent, reserves the slices of
/// devices that entered its window offline ([`crate::leases::materialize`]), and reads it; the
/// leased units are those of the devices whose leases count at `now`.
pub async fn lock(tx: &impl GenericClient, user_id: Uuid, key: &PoolKey, budget: bool, now: DateTime<Utc>) -> ApiResult<PoolState> {
    crate::leases::materialize(tx, user_id, key).await?;
    tx.execute(
        &tx.prepare_cached(
            "INSERT INTO counters (user_id, feature, period, period_start, period_end) VALUES ($1, $2, $3, $4, $5) \
             ON CONFLICT (user_id, feature, period, period_start) DO NOTHING",
        )
        .await?,
        &[&user_id, &key.feature, &key.period, &key.period_start, &key.period_end],
    )
    .await?;
    let r = tx
        .query_one(
            &tx.prepare_cached(
                "SELECT c.used, c.cost_micros, c.held, \
                   (SELECT coalesce(sum(greatest(0, d.allowance - d.consumed)), 0)::int8 FROM pool_devices d \
                     WHERE d.user_id = c.user_id AND d.feature = c.feature AND d.period = c.period AND d.period_start = c.period_start \
                     AND EXISTS (SELECT 1 FROM devices v WHERE v.user_id = d.user_id AND v.device_id = d.device_id \
                       AND v.removed_at IS NULL AND v.lease_until > $5)) \
                 FROM counters c WHERE c.user_id = $1 AND c.feature = $2 AND c.period = $3 AND c.period_start = $4 FOR UPDATE OF c",
            )
            .await?,
            &[&user_id, &key.feature, &key.period, &key.period_start, &now],
        )
        .await?;
    let column = |c: &str| format!("counters.{c} of ({user_id}, {:?}, {}, {})", key.feature, key.period, key.period_start);
    let (used, column_used) = if budget { (r.get(1), "cost_micros") } else { (r.get(0), "used") };
    Ok(PoolState {
        used: stored_count(used, || column(column_used))?,
        held: stored_count(r.get(2), || column("held"))?,
        leased: stored_count(r.get(3), || column("leased (pool_devices)"))?,
    })
}

/// Raises the highest limit `key`'s window ran under (`counters.lim`) to `limit`, when room was
/// given under it (a grant, or a slice kept for a window a device entered offline): a leased use
/// within its allowance leaves the window over with cause `downgrade` only when the limit fell
/// below this one.
pub async fn note_limit(tx: &impl GenericClient, user_id: Uuid, key: &PoolKey, limit: u64) -> ApiResult<()> {
    let limit = i64::try_from(limit).unwrap_or(i64::MAX);
    tx.execute(
        &tx.prepare_cached(
            "INSERT INTO counters (user_id, feature, period, period_start, period_end, lim) VALUES ($1, $2, $3, $4, $5, $6) \
             ON CONFLICT (user_id, feature, period, period_start) DO UPDATE SET lim = excluded.lim \
             WHERE counters.lim IS NULL OR counters.lim < excluded.lim",
        )
        .await?,
        &[&user_id, &key.feature, &key.period, &key.period_start, &key.period_end, &limit],
    )
    .await?;
    Ok(())
}

/// What `device` may still record in the pool `(feature, period, window start)` as stored: its
/// allowance less what it has recorded under it (`consumed`; a batch being stored is counted
/// after it). No slice is 0; a negative stored figure is an error.
pub async fn slice_left(
    tx: &impl GenericClient,
    user_id: Uuid,
    (feature, period, start): (&str, &str, DateTime<Utc>),
    device: &str,
) -> ApiResult<u64> {
    let row = tx
        .query_opt(
            &tx.prepare_cached(
                "SELECT allowance, consumed FROM pool_devices \
                 WHERE user_id = $1 AND feature = $2 AND period = $3 AND period_start = $4 AND device_id = $5",
            )
            .await?,
            &[&user_id, &feature, &period, &start, &device],
        )
        .await?;
    let Some(row) = row else { return Ok(0) };
    let place = |column: &str| format!("pool_devices.{column} of ({user_id}, {feature:?}, {period}, {start}, {device:?})");
    let allowance = stored_count(row.get(0), || place("allowance"))?;
    Ok(allowance.saturating_sub(stored_count(row.get(1), || place("consumed"))?))
}

/// A count as stored (`used`, `held`, a cost, an allowance): never negative. A negative one is
/// corruption, never room: a 500 `internal` whose logged detail names `place` and the value.
pub fn stored_count(v: i64, place: impl FnOnce() -> String) -> ApiResult<u64> {
    u64::try_from(v).map_err(|_| ApiError::Internal(format!("corrupt stored count: {} is {v}", place())))
}

/// Adds `delta` (negative: gives back) to the `held` of `key`'s pool; never below 0.
pub async fn add_held(tx: &impl GenericClient, user_id: Uuid, key: &PoolKey, delta: i64) -> ApiResult<()> {
    tx.execute(
        &tx.prepare_cached(
            "INSERT INTO counters (user_id, feature, period, period_start, period_end, held) VALUES ($1, $2, $3, $4, $5, greatest(0, $6::int8)) \
             ON CONFLICT (user_id, feature, period, period_start) DO UPDATE SET held = greatest(0, counters.held + $6::int8)",
        )
        .await?,
        &[&user_id, &key.feature, &key.period, &key.period_start, &key.period_end, &delta],
    )
    .await?;
    Ok(())
}

/// Recomputes every pool's `held` of the (locked) user from their open holds (after the
/// counters were rebuilt).
pub async fn rebuild_held(tx: &impl GenericClient, user_id: Uuid) -> ApiResult<()> {
    tx.execute(&tx.prepare_cached("UPDATE counters SET held = 0 WHERE user_id = $1 AND held <> 0").await?, &[&user_id]).await?;
    tx.execute(
        &tx.prepare_cached(
            "INSERT INTO counters (user_id, feature, period, period_start, period_end, held) \
             SELECT user_id, pool_feature, period, period_start, max(period_end), sum(held)::int8 FROM holds \
             WHERE user_id = $1 AND state = 'open' GROUP BY user_id, pool_feature, period, period_start \
             ON CONFLICT (user_id, feature, period, period_start) DO UPDATE SET held = excluded.held",
        )
        .await?,
        &[&user_id],
    )
    .await?;
    Ok(())
}

/// How a use of a feature is priced: a budget with a model uses its catalog price (an unknown
/// model is `UnknownModel`); everything else `NoModel`.
pub fn priced(catalog: &Catalog, rule: &Rule, model: Option<&str>, input: Option<u64>, output: Option<u64>) -> ApiResult<Priced> {
    if !matches!(rule, Rule::Budget { .. }) {
        return Ok(Priced::NoModel);
    }
    let Some(m) = model else { return Ok(Priced::NoModel) };
    match catalog.models.get(m) {
        None => Ok(Priced::UnknownModel),
        Some(price) => Ok(Priced::Cost(price.cost_micros(input.unwrap_or(0), output.unwrap_or(0))?)),
    }
}

/// What a decision against the free room read.
#[derive(Debug, Clone, PartialEq)]
pub struct Decided {
    /// The decision (its `used` is the settled use, holds and leases left out).
    pub decision: Decision,
    /// The pool decided on (locked), if the rule has one; its `held` includes what earlier
    /// items of the same use take from it.
    pub pool: Option<(PoolKey, PoolState)>,
    /// Credits (for a credits rule) or units/micros the use takes from the pool.
    pub need: u64,
}

/// Decides a use of `amount` of `feature` for the (locked) user against the free room, with the
/// one rule evaluator; locks the pool row. `record`: a consume (a budget measures the priced
/// cost), not a check or a hold. `earlier`: what earlier items of the same use take from their
/// pools (running totals: two credits items draw cumulatively).
#[allow(clippy::too_many_arguments)]
pub async fn decide(
    tx: &impl GenericClient,
    ctx: &Ctx<'_>,
    loaded: &Loaded,
    feature: &str,
    amount: u64,
    priced: Priced,
    record: bool,
    earlier: &[(PoolKey, u64)],
) -> ApiResult<Decided> {
    let ar = loaded.ents.access_reason.as_str();
    let Some(rule) = loaded.ents.features.get(feature) else {
        let reason = if loaded.catalog.knows_feature(feature) { Reason::NotInPlan } else { Reason::UnknownFeature };
        return Ok(Decided { decision: Decision::simple(false, reason, ar), pool: None, need: 0 });
    };
    let mut state = RuleState { balance: loaded.ents.credit_balance, ..RuleState::default() };
    let key = PoolKey::of(ctx, feature, rule);
    let mut pool = None;
    if let Some(key) = key {
        let mut p = lock(tx, ctx.user_id, &key, matches!(rule, Rule::Budget { .. }), ctx.now).await?;
        // Earlier items of this use count as held: not free, not settled.
        let taken_before = earlier.iter().filter(|(k, _)| *k == key).fold(0u64, |sum, (_, n)| sum.saturating_add(*n));
        p.held = p.held.saturating_add(taken_before);
        match rule {
            Rule::Credits { .. } => {
                state.balance = state.balance.saturating_sub(i64::try_from(p.held.saturating_add(p.leased)).unwrap_or(i64::MAX))
            }
            _ => (state.used, state.resets_at) = (p.taken(), key.period_end),
        }
        pool = Some((key, p));
    } else if let Rule::Rate { window_secs, .. } = rule {
        state.used = rate_used(tx, ctx, feature, *window_secs).await?;
    }
    let (mut decision, _) = decide_rule(rule, amount, priced, state, ar, record)?;
    let need = match (rule, priced) {
        (Rule::Credits { cost }, _) => tally_core::contract::checked_product("credits", *cost, amount)?,
        (Rule::Budget { .. }, Priced::Cost(c)) if record => c,
        _ => amount,
    };
    if let Some((key, p)) = &pool
        && !decision.allowed
        && p.leased > 0
        && matches!(decision.reason, Reason::LimitReached | Reason::BudgetExceeded | Reason::InsufficientCredits)
    {
        // Would the use fit if the devices gave back what they hold? Then ask them to.
        let room = match rule {
            Rule::Credits { .. } => u64::try_from(loaded.ents.credit_balance.max(0)).unwrap_or(0).saturating_sub(p.held),
            _ => rule.limit().unwrap_or(0).saturating_sub(p.used.saturating_add(p.held)),
        };
        if need <= room {
            let free = room.saturating_sub(p.leased);
            crate::leases::recall(tx, ctx.user_id, key, need.saturating_sub(free), ctx.now).await?;
            decision.held_offline = Some(p.leased);
        }
    }
    if let (Some((_, p)), false) = (&pool, matches!(rule, Rule::Credits { .. })) {
        // Show the settled use: what holds and leases keep is not used.
        decision.used = decision.used.saturating_sub(p.held.saturating_add(p.leased));
    }
    Ok(Decided { decision, pool, need })
}

/// Units of a rate rule's feature the user recorded in the last `window_secs` (the server's own
/// view of the rate: uses recorded on the server).
async fn rate_used(tx: &impl GenericClient, ctx: &Ctx<'_>, feature: &str, window_secs: u64) -> ApiResult<u64> {
    let since = ctx.now - chrono::Duration::seconds(i64::try_from(window_secs).unwrap_or(i64::MAX / 1_000_000));
    let n: i64 = tx
        .query_one(
            &tx.prepare_cached(
                "SELECT coalesce(sum(amount), 0)::int8 FROM events WHERE user_id = $1 AND feature = $2 AND effective_at > $3 AND voided_at IS NULL",
            )
            .await?,
            &[&ctx.user_id, &feature, &since],
        )
        .await?
        .get(0);
    Ok(u64::try_from(n).unwrap_or(0))
}

/// The error answering a denied decision: 402 `limit_reached` / `insufficient_credits` (and a
/// denied budget), 403 `not_in_plan`, 429 `rate_limited` with `Retry-After`, 422
/// `unknown_feature` / `unknown_model`; the body carries the decision.
pub fn denial(feature: &str, rule: Option<&Rule>, decision: Decision) -> ApiError {
    use axum::http::StatusCode;
    let recall = decision.held_offline.map(|_| crate::leases::RECALL_RETRY_SECS);
    let (status, code, message, mut retry) = match decision.reason {
        Reason::NotInPlan => (StatusCode::FORBIDDEN, "not_in_plan", format!("the plan does not include {feature:?}"), None),
        Reason::UnknownFeature => {
            (StatusCode::UNPROCESSABLE_ENTITY, "unknown_feature", format!("no plan of the catalog knows the feature {feature:?}"), None)
        }
        Reason::UnknownModel => (StatusCode::UNPROCESSABLE_ENTITY, "unknown_model", "the catalog has no price for this model".into(), None),
        Reason::RateLimited => {
            let secs = match rule {
                Some(Rule::Rate { window_secs, .. }) => (*window_secs).max(1),
                _ => 1,
            };
            (StatusCode::TOO_MANY_REQUESTS, "rate_limited", format!("{feature:?} is rate limited; retry in {secs} s"), Some(secs))
        }
        Reason::InsufficientCredits => {
            (StatusCode::PAYMENT_REQUIRED, "insufficient_credits", "the credit balance does not cover this use".into(), None)
        }
        Reason::BudgetExceeded => {
            (StatusCode::PAYMENT_REQUIRED, "budget_exceeded", format!("the budget of {feature:?} has no room for this cost"), None)
        }
        _ => (StatusCode::PAYMENT_REQUIRED, "limit_reached", format!("the limit of {feature:?} has no room for this use"), None),
    };
    retry = retry.or(recall);
    ApiError::Denied(Box::new(crate::error::Denied { status, code, message, decision, retry_after: retry, decisions: None }))
}
