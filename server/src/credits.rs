//! Credits on the server, computed the way the device spends them: every unrevoked grant and
//! every use in event-time order; a use draws from the unexpired grants with credits left, the
//! one expiring first first; what they cannot cover becomes a debt, paid from the next grant. The
//! token carries the unexpired grants with what remains of them (and the debt as a negative
//! grant `debt`), so the device goes on spending offline from where the server stands.
//!
//! A use's price and the grants it drew are fixed when it happens, because everything the
//! replay reads is:
//! - each use's price is stored with its event when the server records it (`events.credits`:
//!   `cost × amount` by the rule in force then; a later plan or catalog never re-prices it). A
//!   use recorded before prices were stored is priced once, on the first read of its user's
//!   credits, with the rules of that moment (as every read did before), and stored;
//! - the credits a plan includes for a billing window are stored as a grant
//!   (`included:<plan>:<window start ms>`) the first time the server computes the user's credits
//!   in that window, and kept when the plan changes. A grant stored into a window where priced
//!   uses were already recorded counts from that moment, not from the window's start, so those
//!   uses never move onto it (a plan change mid-window never re-draws past uses).
//!
//! A voided use leaves the replay, which gives back exactly what it drew.

use crate::AppState;
use crate::error::{ApiError, ApiResult};
use chrono::{DateTime, Utc};
use deadpool_postgres::GenericClient;
use std::collections::BTreeMap;
use tally_core::{Catalog, CreditGrant, Rule};
use uuid::Uuid;

pub use tally_core::credits::DEBT_GRANT_ID as DEBT_ID;

/// A stored grant.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Grant {
    /// Grant id.
    pub id: String,
    /// Credits granted.
    pub amount: i64,
    /// Uses from this instant draw from it.
    pub valid_from: DateTime<Utc>,
    /// Expiry (`None`: never).
    pub expires_at: Option<DateTime<Utc>>,
    /// `plan` or `admin`.
    pub source: String,
}

/// One use of credits.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Use {
    /// Effective time of the event.
    pub at: DateTime<Utc>,
    /// Credits drawn (`cost × amount`).
    pub credits: i64,
}

/// The unexpired grants at `now` with what remains of each (plus the debt, if any, as a
/// negative grant), replaying `grants` and `uses` in time order (grants first on ties). Each use
/// draws with the device's own rule ([`tally_core::credits::draw`]).
pub fn replay(grants: &[Grant], uses: &[Use], now: DateTime<Utc>) -> Vec<CreditGrant> {
    enum Step<'a> {
        Grant(&'a Grant),
        Use(&'a Use),
    }
    let mut steps: Vec<(DateTime<Utc>, u8, Step<'_>)> = grants.iter().map(|g| (g.valid_from, 0, Step::Grant(g))).collect();
    // A use stamped after `now` (a device clock a little ahead, a leased use counted at its own
    // time) has been spent all the same: it draws now.
    steps.extend(uses.iter().map(|u| (u.at.min(now), 1, Step::Use(u))));
    steps.sort_by_key(|s| (s.0, s.1));
    let expire = |live: &mut Vec<CreditGrant>, at: DateTime<Utc>| live.retain(|g| g.expires_at.is_none_or(|e| e > at));
    let mut live: Vec<CreditGrant> = Vec::new();
    let mut debt: i64 = 0;
    for (at, _, step) in steps {
        expire(&mut live, at);
        match step {
            Step::Grant(g) => {
                if g.expires_at.is_some_and(|e| e <= at) {
                    continue;
                }
                let pay = debt.min(g.amount);
                debt -= pay;
                live.push(CreditGrant { id: g.id.clone(), remaining: g.amount - pay, expires_at: g.expires_at, source: g.source.clone() });
            }
            Step::Use(u) => debt = debt.saturating_add(tally_core::credits::draw(&mut live, u.credits)),
        }
    }
    expire(&mut live, now);
    live.sort_by(|a, b| tally_core::credits::fifo_key(a).cmp(&tally_core::credits::fifo_key(b)));
    if debt > 0 {
        live.push(CreditGrant { id: DEBT_ID.into(), remaining: -debt, expires_at: None, source: tally_core::credits::DEBT_SOURCE.into() });
    }
    live
}

/// Credits per unit of each feature drawing credits: the rule in effect for the user, else the
/// first plan of the catalog that makes it a credits feature. What a use is priced at when it is
/// recorded.
pub fn costs(features: &BTreeMap<String, Rule>, catalog: &Catalog) -> BTreeMap<String, i64> {
    let mut m = BTreeMap::new();
    for p in &catalog.plans {
        for (f, r) in &p.features {
            if let Rule::Credits { cost } = r {
                m.entry(f.clone()).or_insert(i64::try_from(*cost).unwrap_or(i64::MAX));
            }
        }
    }
    for (f, r) in features {
        if let Rule::Credits { cost } = r {
            m.insert(f.clone(), i64::try_from(*cost).unwrap_or(i64::MAX));
        }
    }
    m
}

/// The credits a use of `amount` of `feature` draws at `prices` ([`costs`]): 0 for a feature
/// that draws none.
pub fn price(prices: &BTreeMap<String, i64>, feature: &str, amount: i64) -> i64 {
    prices.get(feature).map_or(0, |c| c.saturating_mul(amount))
}

/// The user's credit grants at `now`, after every use the server knows of. `included` are the
/// plan's grants of the billing windows up to `now` ([`plan_grants`]): those not stored yet are
/// stored (kept from then on, whatever the plan becomes); uses recorded before prices were
/// stored are priced with `features` and stored.
pub async fn current(
    client: &impl GenericClient,
    user_id: Uuid,
    features: &BTreeMap<String, Rule>,
    catalog: &Catalog,
    now: DateTime<Utc>,
    included: Vec<Grant>,
) -> ApiResult<Vec<CreditGrant>> {
    let grants_st = client
        .prepare_cached("SELECT grant_id, amount, valid_from, expires_at, source, revoked_at IS NULL FROM credit_grants WHERE user_id = $1")
        .await?;
    let uses_st = client
        .prepare_cached(
            "SELECT id, feature, amount, credits, effective_at FROM events \
             WHERE user_id = $1 AND (credits IS NULL OR credits > 0) AND voided_at IS NULL",
        )
        .await?;
    // Both reads pipelined on the connection.
    let (grant_rows, use_rows) =
        futures::try_join!(async { client.query(&grants_st, &[&user_id]).await }, async { client.query(&uses_st, &[&user_id]).await },)?;
    let stored_ids: std::collections::HashSet<String> = grant_rows.iter().map(|r| r.get(0)).collect();
    let mut grants: Vec<Grant> = grant_rows
        .iter()
        .filter(|r| r.get::<_, bool>(5))
        .map(|r| Grant { id: r.get(0), amount: r.get(1), valid_from: r.get(2), expires_at: r.get(3), source: r.get(4) })
        .collect();
    let mut uses = Vec::with_capacity(use_rows.len());
    let mut unpriced: Vec<(Uuid, i64)> = Vec::new();
    let prices = costs(features, catalog);
    for r in &use_rows {
        let credits = match r.get::<_, Option<i64>>(3) {
            Some(c) => c,
            None => {
                let c = price(&prices, r.get(1), r.get(2));
                unpriced.push((r.get(0), c));
                c
            }
        };
        if credits > 0 {
            uses.push(Use { at: r.get(4), credits });
        }
    }
    let priced_since = |from: DateTime<Utc>| {
        use_rows.iter().any(|r| r.get::<_, Option<i64>>(3).is_some_and(|c| c > 0) && r.get::<_, DateTime<Utc>>(4) >= from)
    };
    let new: Vec<Grant> = included
        .into_iter()
        .filter(|g| !stored_ids.contains(&g.id))
        .map(|g| Grant { valid_from: if priced_since(g.valid_from) { now.max(g.valid_from) } else { g.valid_from }, ..g })
        .collect();
    grants.extend(keep_included(client, user_id, &new).await?);
    store_prices(client, user_id, &unpriced).await?;
    if grants.is_empty() && uses.is_empty() {
        return Ok(Vec::new());
    }
    Ok(replay(&grants, &uses, now))
}

/// Stores plan-included grants (once per id); returns them as stored (another request may have
/// stored one first).
async fn keep_included(client: &impl GenericClient, user_id: Uuid, new: &[Grant]) -> ApiResult<Vec<Grant>> {
    if new.is_empty() {
        return Ok(Vec::new());
    }
    let ids: Vec<&str> = new.iter().map(|g| g.id.as_str()).collect();
    let amounts: Vec<i64> = new.iter().map(|g| g.amount).collect();
    let sources: Vec<&str> = new.iter().map(|g| g.source.as_str()).collect();
    let froms: Vec<DateTime<Utc>> = new.iter().map(|g| g.valid_from).collect();
    let expiries: Vec<Option<DateTime<Utc>>> = new.iter().map(|g| g.expires_at).collect();
    let rows = client
        .query(
            &client
                .prepare_cached(
                    "INSERT INTO credit_grants (user_id, grant_id, amount, source, valid_from, expires_at) \
                     SELECT $1, * FROM unnest($2::text[], $3::int8[], $4::text[], $5::timestamptz[], $6::timestamptz[]) \
                     ON CONFLICT (user_id, grant_id) DO UPDATE SET grant_id = credit_grants.grant_id \
                     RETURNING grant_id, amount, valid_from, expires_at, source, revoked_at IS NULL",
                )
                .await?,
            &[&user_id, &ids, &amounts, &sources, &froms, &expiries],
        )
        .await?;
    Ok(rows
        .iter()
        .filter(|r| r.get::<_, bool>(5))
        .map(|r| Grant { id: r.get(0), amount: r.get(1), valid_from: r.get(2), expires_at: r.get(3), source: r.get(4) })
        .collect())
}

/// Stores the prices of uses recorded before prices were stored (each once).
async fn store_prices(client: &impl GenericClient, user_id: Uuid, priced: &[(Uuid, i64)]) -> ApiResult<()> {
    if priced.is_empty() {
        return Ok(());
    }
    let ids: Vec<Uuid> = priced.iter().map(|p| p.0).collect();
    let credits: Vec<i64> = priced.iter().map(|p| p.1).collect();
    client
        .execute(
            &client
                .prepare_cached(
                    "UPDATE events e SET credits = t.credits FROM unnest($2::uuid[], $3::int8[]) AS t(id, credits) \
                     WHERE e.user_id = $1 AND e.id = t.id AND e.credits IS NULL",
                )
                .await?,
            &[&user_id, &ids, &credits],
        )
        .await?;
    Ok(())
}

/// The credit pool as a total of a protocol-2 sync answer (`feature: "$credits"`, period
/// `lifetime`): `limit` is what the unexpired grants gave, `used` what was drawn from them
/// (debt included), so `over_limit_by` is the debt, with the causes of the pool's overage
/// (`refund`: credits taken back while devices held them). `None` when no rule draws credits.
pub async fn pool_total(
    tx: &impl GenericClient,
    user_id: Uuid,
    ents: &tally_core::Entitlements,
    now: DateTime<Utc>,
) -> ApiResult<Option<tally_core::wire::Total>> {
    use crate::pools::{CREDITS, CREDITS_PERIOD, credits_start};
    if !ents.features.values().any(|r| matches!(r, Rule::Credits { .. })) {
        return Ok(None);
    }
    let row = tx
        .query_one(
            &tx.prepare_cached(
                "SELECT coalesce((SELECT sum(amount) FROM credit_grants WHERE user_id = $1 AND revoked_at IS NULL \
                   AND (expires_at IS NULL OR expires_at > $2)), 0)::int8, \
                 coalesce((SELECT causes FROM counters WHERE user_id = $1 AND feature = $3 AND period = $4 AND period_start = $5), '{}')",
            )
            .await?,
            &[&user_id, &now, &CREDITS, &CREDITS_PERIOD, &credits_start()],
        )
        .await?;
    let stored: i64 = row.get(0);
    let causes: Vec<String> = row.get(1);
    // The plan's included credits are stored grants too ([`current`] stored them).
    let granted = u64::try_from(stored).unwrap_or(0);
    let balance = ents.credit_balance;
    let remaining = u64::try_from(balance.max(0)).unwrap_or(0);
    let debt = balance.min(0).unsigned_abs();
    let used = granted.saturating_sub(remaining).saturating_add(debt);
    Ok(Some(tally_core::wire::Total {
        feature: CREDITS.into(),
        period: tally_core::Period::Lifetime,
        period_start: credits_start(),
        period_end: None,
        used,
        limit: Some(granted),
        remaining: Some(remaining),
        over_limit_by: debt,
        over_limit_causes: if debt > 0 { causes } else { Vec::new() },
    }))
}

/// The credits the user's plan includes each billing window (`included_credits`), as grants —
/// except for subscribers, whose paid invoices grant them. Rolled-over credits count from
/// `since` (the user's creation).
pub fn plan_grants(
    ents: &tally_core::Entitlements,
    catalog: &Catalog,
    since: DateTime<Utc>,
    anchor: DateTime<Utc>,
    now: DateTime<Utc>,
) -> Vec<Grant> {
    if tally_core::entitlements::credits_from_invoices(&ents.access_reason) {
        return Vec::new();
    }
    let Some(plan) = catalog.plan(&ents.plan) else { return Vec::new() };
    tally_core::entitlements::included_credit_grants(plan, since, anchor, now)
        .into_iter()
        .map(|(from, g)| Grant { id: g.id, amount: g.remaining, valid_from: from, expires_at: g.expires_at, source: g.source })
        .collect()
}

/// After a batch was ingested: when it touched a credits feature, the grants again (so the
/// token the sync answers with already counts the batch).
pub async fn after_ingest(
    tx: &impl GenericClient,
    user_id: Uuid,
    ents: &mut tally_core::Entitlements,
    catalog: &Catalog,
    touched: &[(String, DateTime<Utc>)],
    (since, anchor): (DateTime<Utc>, DateTime<Utc>),
    now: DateTime<Utc>,
) -> ApiResult<()> {
    let costs = costs(&ents.features, catalog);
    if touched.iter().any(|(f, _)| costs.contains_key(f)) {
        let included = plan_grants(ents, catalog, since, anchor, now);
        ents.credit_grants = current(tx, user_id, &ents.features, catalog, now, included).await?;
        ents.credit_balance = ents.credit_grants.iter().map(|g| g.remaining).sum();
    }
    Ok(())
}

/// The leased uses `(id, credits drawn)` of `device`, in its order, that went past its slice of
/// the credit balance: what the slice had left (allowance − consumed, read before they are
/// counted) runs out before them. A use whose price in credits is not stored, or a negative
/// stored figure, is an error.
pub async fn past_allowance(tx: &impl GenericClient, user_id: Uuid, device: &str, uses: &[(Uuid, Option<i64>)]) -> ApiResult<Vec<Uuid>> {
    use crate::pools::{CREDITS, CREDITS_PERIOD, credits_start, stored_count};
    if uses.iter().all(|(_, c)| *c == Some(0)) {
        return Ok(Vec::new());
    }
    let mut left = crate::pools::slice_left(tx, user_id, (CREDITS, CREDITS_PERIOD, credits_start()), device).await?;
    let mut past = Vec::new();
    for (id, credits) in uses {
        let credits = credits.ok_or_else(|| ApiError::internal(format!("use {id} was stored without its price in credits")))?;
        let credits = stored_count(credits, || format!("events.credits of {id}"))?;
        if credits == 0 {
            continue;
        }
        if credits > left {
            past.push(*id);
        }
        left = left.saturating_sub(credits);
    }
    Ok(past)
}

/// The credit balance is in debt and `ids` are uses past their device's slice of it: each is
/// stored with `cause` (`device_overrun`, or `cloned_device`), and the cause joins the credit
/// pool's causes.
pub async fn mark_overrun(tx: &impl GenericClient, user_id: Uuid, ids: &[Uuid], cause: &str) -> ApiResult<()> {
    use crate::pools::{CREDITS, CREDITS_PERIOD, credits_start};
    tx.execute(
        &tx.prepare_cached("UPDATE events SET cause = $3 WHERE user_id = $1 AND id = ANY($2) AND cause IS NULL").await?,
        &[&user_id, &ids, &cause],
    )
    .await?;
    tx.execute(
        &tx.prepare_cached(
            "INSERT INTO counters (user_id, feature, period, period_start, causes) VALUES ($1, $2, $3, $4, ARRAY[$5::text]) \
             ON CONFLICT (user_id, feature, period, period_start) DO UPDATE \
             SET causes = ARRAY(SELECT DISTINCT x FROM unnest(counters.causes || ARRAY[$5::text]) AS x ORDER BY x)",
        )
        .await?,
        &[&user_id, &CREDITS, &CREDITS_PERIOD, &credits_start(), &cause],
    )
    .await?;
    Ok(())
}

/// Adds a grant (and its `credits.granted` event); `false` when a grant with this id already
/// exists (e.g. the invoice's).
#[allow(clippy::too_many_arguments)]
pub async fn insert(
    tx: &impl GenericClient,
    user_id: Uuid,
    grant_id: &str,
    amount: i64,
    source: &str,
    reason: Option<&str>,
    granted_by: Option<&str>,
    invoice_id: Option<&str>,
    valid_from: DateTime<Utc>,
    expires_at: Option<DateTime<Utc>>,
    now: DateTime<Utc>,
) -> ApiResult<bool> {
    if amount <= 0 {
        return Err(ApiError::invalid("credits must be positive"));
    }
    let n = tx
        .execute(
            "INSERT INTO credit_grants (user_id, grant_id, amount, source, reason, granted_by, invoice_id, valid_from, expires_at) \
             VALUES ($1, $2, $3, $4, $5, $6, $7, $8, $9) ON CONFLICT (user_id, grant_id) DO NOTHING",
            &[&user_id, &grant_id, &amount, &source, &reason, &granted_by, &invoice_id, &valid_from, &expires_at],
        )
        .await?;
    if n == 1 {
        crate::webhooks::outbox::credits_granted(tx, user_id, grant_id, amount, source, reason, expires_at, now).await?;
    }
    Ok(n == 1)
}

/// Body fields of a credit grant (`POST /v1/admin/grants` with `credits`).
pub struct CreditGrantRequest<'a> {
    /// The user.
    pub user_id: Uuid,
    /// Credits.
    pub credits: i64,
    /// Expiry (`None`: never).
    pub expires_at: Option<DateTime<Utc>>,
    /// Why.
    pub reason: &'a str,
    /// Who.
    pub granted_by: &'a str,
}

/// Adds an admin credit grant (bumps the entitlement version); returns its id.
pub async fn grant_credits(state: &AppState, r: CreditGrantRequest<'_>) -> ApiResult<String> {
    if r.credits <= 0 || r.credits > 1_000_000_000_000 {
        return Err(ApiError::Invalid("invalid_credits", "credits must be 1 to 10^12".into()));
    }
    let mut client = state.pool.get().await?;
    let tx = client.transaction().await?;
    crate::users::lock(&tx, r.user_id, &state.config.admin_subjects).await?;
    let id = format!("adm:{}", Uuid::now_v7());
    let now = state.now();
    insert(&tx, r.user_id, &id, r.credits, "admin", Some(r.reason), Some(r.granted_by), None, now, r.expires_at, now).await?;
    crate::users::bump_version(&tx, &state.user_cache, r.user_id, state.now()).await?;
    tx.commit().await?;
    Ok(id)
}

/// Takes back a purchased credit grant (a store refund or revoke) inside the caller's
/// transaction: its unspent rest goes, what was already spent becomes debt, and devices that
/// held those credits see the cause `refund`. Returns whether it was still in force.
pub async fn revoke_purchased(tx: &impl GenericClient, user_id: Uuid, grant_id: &str, now: DateTime<Utc>) -> ApiResult<bool> {
    let n = tx
        .execute(
            "UPDATE credit_grants SET revoked_at = $3 WHERE user_id = $1 AND grant_id = $2 AND revoked_at IS NULL",
            &[&user_id, &grant_id, &now],
        )
        .await?;
    if n > 0 {
        crate::leases::mark_refund(tx, user_id, now).await?;
    }
    Ok(n > 0)
}

/// Revokes credit grants of a user (one by id, or every one but the plan's included credits);
/// bumps the version. Returns how many.
pub async fn revoke_credits(state: &AppState, user_id: Uuid, grant_id: Option<&str>) -> ApiResult<u64> {
    let mut client = state.pool.get().await?;
    let tx = client.transaction().await?;
    crate::users::lock(&tx, user_id, &state.config.admin_subjects).await?;
    let now = state.now();
    let n = tx
        .execute(
            "UPDATE credit_grants SET revoked_at = $3 WHERE user_id = $1 AND revoked_at IS NULL \
             AND ($2::text IS NULL AND grant_id NOT LIKE 'included:%' OR grant_id = $2)",
            &[&user_id, &grant_id, &now],
        )
        .await?;
    if n > 0 {
        crate::users::bump_version(&tx, &state.user_cache, user_id, now).await?;
        crate::leases::mark_refund(&tx, user_id, now).await?;
    }
    tx.commit().await?;
    Ok(n)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn at(s: i64) -> DateTime<Utc> {
        DateTime::from_timestamp(1_750_000_000 + s, 0).unwrap()
    }
    fn g(id: &str, amount: i64, from: i64, exp: Option<i64>) -> Grant {
        Grant { id: id.into(), amount, valid_from: at(from), expires_at: exp.map(at), source: "plan".into() }
    }
    fn u(t: i64, c: i64) -> Use {
        Use { at: at(t), credits: c }
    }
    fn rem(v: &[CreditGrant]) -> Vec<(String, i64)> {
        v.iter().map(|g| (g.id.clone(), g.remaining)).collect()
    }

    #[test]
    fn fifo_by_expiry_then_expired_credits_are_lost() {
        let grants = [g("late", 100, 0, Some(1000)), g("early", 50, 0, Some(500)), g("never", 10, 0, None)];
        let r = replay(&grants, &[u(10, 60)], at(20));
        assert_eq!(rem(&r), vec![("early".into(), 0), ("late".into(), 90), ("never".into(), 10)]);
        let r = replay(&grants, &[u(10, 20)], at(600));
        assert_eq!(rem(&r), vec![("late".into(), 100), ("never".into(), 10)], "30 left in `early` expired with it");
    }

    #[test]
    fn debt_is_paid_from_the_next_grant() {
        let r = replay(&[g("a", 10, 0, None)], &[u(5, 25)], at(6));
        assert_eq!(rem(&r), vec![("a".into(), 0), (DEBT_ID.into(), -15)]);
        assert_eq!(r.iter().map(|g| g.remaining).sum::<i64>(), -15, "over_limit_by 15");
        let r = replay(&[g("a", 10, 0, None), g("b", 100, 7, Some(99))], &[u(5, 25)], at(8));
        assert_eq!(rem(&r), vec![("b".into(), 85), ("a".into(), 0)]);
    }

    #[test]
    fn uses_before_a_grant_do_not_draw_from_it_but_become_debt_it_pays() {
        let r = replay(&[g("a", 100, 10, None)], &[u(5, 30), u(20, 5)], at(30));
        assert_eq!(rem(&r), vec![("a".into(), 65)]);
    }

    #[test]
    fn a_use_stamped_after_now_draws_now() {
        // A device clock a little ahead: its use has been spent all the same.
        let r = replay(&[g("a", 100, 0, None)], &[u(50, 7)], at(20));
        assert_eq!(rem(&r), vec![("a".into(), 93)]);
    }
}
