//! Leases (protocol 2), the server side: every device of a user (`devices`), its slice of each
//! hard pool (`pool_devices`: allowance, released, consumed, recall), the shares its device
//! tokens promised for windows it enters offline (`device_shares`), grants and top-ups on sync,
//! releases, recalls, reclaim at `lease_until`, and `GET/DELETE /v1/me/devices`. The arithmetic
//! is [`tally_core::lease`]'s; this module only stores and applies it. Everything here runs with
//! the user row locked, in the transaction of the request.

use crate::auth::AuthUser;
use crate::error::{ApiError, ApiResult};
use crate::ledger::{Ctx, tracked_periods};
use crate::pools::{self, CREDITS, CREDITS_PERIOD, PoolKey, credits_start};
use crate::{AppState, users};
use axum::Json;
use axum::extract::{Path, State};
use axum::http::StatusCode;
use chrono::{DateTime, Utc};
use deadpool_postgres::GenericClient;
use serde::Serialize;
use serde_json::Value;
use std::collections::{BTreeMap, BTreeSet};
use tally_core::lease::{self, Lease, Share};
use tally_core::period::{Period, window};
use tally_core::wire::LeaseAmount;
use tally_core::{Entitlements, Rule};
use uuid::Uuid;

/// `Retry-After` (seconds) of a denial for room that devices hold: the server recalls it.
pub const RECALL_RETRY_SECS: u64 = 30;

/// A device row as stored.
#[derive(Debug, Clone, PartialEq)]
pub struct Device {
    /// Device id.
    pub device_id: String,
    /// Grows with every lease change of the device.
    pub lease_ver: i64,
    /// When its leases end (`None`: never had one).
    pub lease_until: Option<DateTime<Utc>>,
    /// Last sync.
    pub last_sync_at: DateTime<Utc>,
    /// First sync.
    pub first_seen_at: DateTime<Utc>,
    /// Two installs sent this device id.
    pub cloned: bool,
    /// Signed out or removed.
    pub removed_at: Option<DateTime<Utc>>,
    /// Protocol of its latest sync.
    pub protocol: i32,
    /// The lease entries of its latest device token.
    pub leases: Vec<Lease>,
    /// The highest `device_seq` it has sent.
    pub high_seq: i64,
}

impl Device {
    /// Whether its leases count at `now`: not removed and `lease_until` after `now`.
    pub fn active(&self, now: DateTime<Utc>) -> bool {
        self.removed_at.is_none() && self.lease_until.is_some_and(|u| u > now)
    }
    /// The row as stored; a negative `lease_ver` or `high_seq`, or `leases` that do not read as
    /// lease entries, is corruption: an error, never a device that holds nothing.
    fn from_row(r: &tokio_postgres::Row) -> ApiResult<Device> {
        let device_id: String = r.get(0);
        let place = |column: &str| format!("devices.{column} of {device_id:?}");
        for (column, v) in [("lease_ver", r.get::<_, i64>(1)), ("high_seq", r.get(9))] {
            pools::stored_count(v, || place(column))?;
        }
        let leases = serde_json::from_value(r.get::<_, Value>(8))
            .map_err(|e| ApiError::Internal(format!("corrupt stored value: {} do not read as lease entries: {e}", place("leases"))))?;
        Ok(Device {
            device_id,
            lease_ver: r.get(1),
            lease_until: r.get(2),
            last_sync_at: r.get(3),
            first_seen_at: r.get(4),
            cloned: r.get(5),
            removed_at: r.get(6),
            protocol: r.get(7),
            leases,
            high_seq: r.get(9),
        })
    }
}

const DEVICE_COLUMNS: &str =
    "device_id, lease_ver, lease_until, last_sync_at, first_seen_at, cloned, removed_at, protocol, leases, high_seq";

/// Records a sync of `device_id` (created on its first sync) and returns the row as it was
/// before this sync's lease changes.
pub async fn register(tx: &impl GenericClient, user_id: Uuid, device_id: &str, protocol: u32, now: DateTime<Utc>) -> ApiResult<Device> {
    let q = format!(
        "INSERT INTO devices (user_id, device_id, last_sync_at, first_seen_at, protocol) VALUES ($1, $2, $3, $3, $4) \
         ON CONFLICT (user_id, device_id) DO UPDATE SET last_sync_at = excluded.last_sync_at, protocol = excluded.protocol \
         RETURNING {DEVICE_COLUMNS}"
    );
    let p = i32::try_from(protocol).unwrap_or(i32::MAX);
    Device::from_row(&tx.query_one(&tx.prepare_cached(&q).await?, &[&user_id, &device_id, &now, &p]).await?)
}

/// The device's acknowledgement of its token `ver`: the shares of older tokens stop counting.
pub async fn acknowledge(tx: &impl GenericClient, user_id: Uuid, dev: &Device, ver: u64) -> ApiResult<()> {
    let ver = i64::try_from(ver).unwrap_or(i64::MAX).min(dev.lease_ver);
    tx.execute(
        &tx.prepare_cached("DELETE FROM device_shares WHERE user_id = $1 AND device_id = $2 AND lease_ver < $3").await?,
        &[&user_id, &dev.device_id, &ver],
    )
    .await?;
    Ok(())
}

/// Marks the device as cloned when `events` (id, device_seq) reuse a sequence number another
/// event id of the same device already has (stored, or earlier in the batch). Returns whether
/// the device is cloned now.
pub async fn detect_clone(tx: &impl GenericClient, user_id: Uuid, dev: &Device, events: &[(Uuid, i64)]) -> ApiResult<bool> {
    if events.is_empty() {
        return Ok(dev.cloned);
    }
    let high = events.iter().map(|(_, s)| *s).max().unwrap_or(0);
    if high > dev.high_seq {
        tx.execute(
            &tx.prepare_cached("UPDATE devices SET high_seq = greatest(high_seq, $3) WHERE user_id = $1 AND device_id = $2").await?,
            &[&user_id, &dev.device_id, &high],
        )
        .await?;
    }
    if dev.cloned {
        return Ok(true);
    }
    let mut seen: BTreeMap<i64, Uuid> = BTreeMap::new();
    let mut clash = events.iter().any(|(id, seq)| *seen.entry(*seq).or_insert(*id) != *id);
    // Only numbers this device has sent before can clash with stored events.
    let old: Vec<&(Uuid, i64)> = events.iter().filter(|(_, s)| *s <= dev.high_seq).collect();
    if !clash && !old.is_empty() {
        let (seqs, ids): (Vec<i64>, Vec<Uuid>) = old.iter().map(|(i, s)| (*s, *i)).unzip();
        clash = tx
            .query_one(
                &tx.prepare_cached(
                    // A re-sent id is found by its key and needs no look-up of its number. `OFFSET
                    // 0` keeps each test a probe of its index per sent event: as joins, Postgres
                    // read every stored event of the user for each batch of re-sent ones.
                    "SELECT EXISTS (SELECT 1 FROM unnest($3::int8[], $4::uuid[]) AS t(seq, id) \
                     WHERE NOT EXISTS (SELECT 1 FROM events k WHERE k.user_id = $1 AND k.id = t.id OFFSET 0) \
                       AND EXISTS (SELECT 1 FROM events e WHERE e.user_id = $1 AND e.device_id = $2 AND e.device_seq = t.seq OFFSET 0))",
                )
                .await?,
                &[&user_id, &dev.device_id, &seqs, &ids],
            )
            .await?
            .get(0);
    }
    if clash {
        tx.execute(
            &tx.prepare_cached("UPDATE devices SET cloned = true WHERE user_id = $1 AND device_id = $2").await?,
            &[&user_id, &dev.device_id],
        )
        .await?;
    }
    Ok(clash)
}

/// Reserves, for every device of the user whose `lease_until` is after the window's start, not
/// removed, with no slice of `key`'s pool yet, what it may use there offline:
/// [`lease::offline_allowance`]`(0, limit, share)` with the highest share and limit of the
/// tokens it has not acknowledged past. Call before reading the pool's free room.
pub async fn materialize(tx: &impl GenericClient, user_id: Uuid, key: &PoolKey) -> ApiResult<()> {
    if key.feature == CREDITS {
        return Ok(());
    }
    let rows = tx
        .query(
            &tx.prepare_cached(
                "SELECT d.device_id, s.share, s.lim FROM devices d \
                 JOIN device_shares s ON s.user_id = d.user_id AND s.device_id = d.device_id AND s.feature = $2 \
                 WHERE d.user_id = $1 AND d.removed_at IS NULL AND d.lease_until > $4 \
                 AND NOT EXISTS (SELECT 1 FROM pool_devices p WHERE p.user_id = d.user_id AND p.device_id = d.device_id \
                   AND p.feature = $2 AND p.period = $3 AND p.period_start = $4)",
            )
            .await?,
            &[&user_id, &key.feature, &key.period, &key.period_start],
        )
        .await?;
    let mut best: BTreeMap<String, u64> = BTreeMap::new();
    let mut promised_limit = None;
    for r in rows {
        let device: String = r.get(0);
        let place = |column: &str| format!("device_shares.{column} of ({user_id}, {device:?}, {:?})", key.feature);
        let share = pools::stored_count(r.get::<_, i32>(1).into(), || place("share"))?;
        let limit = pools::stored_count(r.get(2), || place("lim"))?;
        let units = lease::offline_allowance(0, limit, Share::from_millionths(u32::try_from(share).unwrap_or(u32::MAX)));
        if units > 0 {
            promised_limit = promised_limit.max(Some(limit));
        }
        let e = best.entry(device).or_insert(0);
        *e = (*e).max(units);
    }
    if let Some(limit) = promised_limit {
        // The slices are room given under the limit the tokens promised.
        pools::note_limit(tx, user_id, key, limit).await?;
    }
    for (device, units) in best {
        tx.execute(
            &tx.prepare_cached(
                "INSERT INTO pool_devices (user_id, feature, period, period_start, device_id, allowance) VALUES ($1, $2, $3, $4, $5, $6) \
                 ON CONFLICT DO NOTHING",
            )
            .await?,
            &[&user_id, &key.feature, &key.period, &key.period_start, &device, &to_i64(units)],
        )
        .await?;
    }
    Ok(())
}

fn to_i64(n: u64) -> i64 {
    i64::try_from(n).unwrap_or(i64::MAX)
}
fn to_u64(n: i64) -> u64 {
    u64::try_from(n).unwrap_or(0)
}

/// Asks `deficit` units of `key`'s pool back from the active devices holding them, largest
/// outstanding first (a device's recall only grows here).
pub async fn recall(tx: &impl GenericClient, user_id: Uuid, key: &PoolKey, deficit: u64, now: DateTime<Utc>) -> ApiResult<()> {
    let rows = tx
        .query(
            &tx.prepare_cached(
                "SELECT p.device_id, greatest(0, p.allowance - p.consumed) AS o, p.recall FROM pool_devices p \
                 JOIN devices d ON d.user_id = p.user_id AND d.device_id = p.device_id AND d.removed_at IS NULL AND d.lease_until > $5 \
                 WHERE p.user_id = $1 AND p.feature = $2 AND p.period = $3 AND p.period_start = $4 AND p.allowance > p.consumed \
                 ORDER BY o DESC, p.device_id",
            )
            .await?,
            &[&user_id, &key.feature, &key.period, &key.period_start, &now],
        )
        .await?;
    let mut left = deficit;
    for r in rows {
        if left == 0 {
            break;
        }
        let take = to_u64(r.get(1)).min(left);
        left -= take;
        set_recall(tx, user_id, key, &r.get::<_, String>(0), to_u64(r.get(2)).max(take)).await?;
    }
    ::metrics::counter!("tally_lease_recalls_total").increment(1);
    Ok(())
}

async fn set_recall(tx: &impl GenericClient, user_id: Uuid, key: &PoolKey, device: &str, units: u64) -> ApiResult<()> {
    tx.execute(
        &tx.prepare_cached(
            "UPDATE pool_devices SET recall = $6 WHERE user_id = $1 AND feature = $2 AND period = $3 AND period_start = $4 AND device_id = $5",
        )
        .await?,
        &[&user_id, &key.feature, &key.period, &key.period_start, &device, &to_i64(units)],
    )
    .await?;
    Ok(())
}

/// A `pool_devices` pool: (feature, period, window start).
type PoolRow = (String, String, DateTime<Utc>);

/// The pools a leased use of `feature` at `at` counts in, with its units there: the windows of
/// `at` of the feature's counted periods (`cost` micros for a budget, else `amount`), and the
/// credit balance (credits drawn) for a credits feature.
fn consumed_in(ctx: &Ctx<'_>, feature: &str, at: DateTime<Utc>, amount: i64, cost: i64) -> Vec<(PoolRow, i64)> {
    let budget = ctx.catalog.plans.iter().any(|p| matches!(p.features.get(feature), Some(Rule::Budget { .. })));
    let mut pools = Vec::new();
    for p in tracked_periods(ctx.catalog).get(feature).into_iter().flatten() {
        let w = window(*p, at, &ctx.zones, ctx.anchor);
        pools.push(((feature.to_string(), p.as_str().to_string(), w.start), if budget { cost } else { amount }));
    }
    if let Some(c) = crate::credits::costs(&BTreeMap::new(), ctx.catalog).get(feature) {
        pools.push(((CREDITS.into(), CREDITS_PERIOD.into(), credits_start()), c.saturating_mul(amount)));
    }
    pools
}

/// Adds leased uses `(feature, at, amount, cost)` of `device` to its `consumed`, one upsert per
/// pool the batch touches (not one per use).
pub async fn count_consumed_many(
    tx: &impl GenericClient,
    ctx: &Ctx<'_>,
    device: &str,
    uses: &[(String, DateTime<Utc>, i64, i64)],
) -> ApiResult<()> {
    let mut sums: BTreeMap<PoolRow, i64> = BTreeMap::new();
    for (feature, at, amount, cost) in uses {
        for (key, units) in consumed_in(ctx, feature, *at, *amount, *cost) {
            let e = sums.entry(key).or_default();
            *e = e.saturating_add(units);
        }
    }
    for ((f, p, start), units) in sums {
        tx.execute(
            &tx.prepare_cached(
                "INSERT INTO pool_devices (user_id, feature, period, period_start, device_id, consumed) VALUES ($1, $2, $3, $4, $5, $6) \
                 ON CONFLICT (user_id, feature, period, period_start, device_id) DO UPDATE SET consumed = pool_devices.consumed + excluded.consumed",
            )
            .await?,
            &[&ctx.user_id, &f, &p, &start, &device, &units],
        )
        .await?;
    }
    Ok(())
}

/// Takes a voided leased use of `device` back out of its `consumed` (its allowance gets the
/// units back) in every pool the use counted in.
pub async fn uncount_consumed(
    tx: &impl GenericClient,
    ctx: &Ctx<'_>,
    device: &str,
    feature: &str,
    at: DateTime<Utc>,
    amount: i64,
    cost: i64,
) -> ApiResult<()> {
    for ((f, p, start), units) in consumed_in(ctx, feature, at, amount, cost) {
        tx.execute(
            &tx.prepare_cached(
                "UPDATE pool_devices SET consumed = greatest(0, consumed - $6) \
                 WHERE user_id = $1 AND feature = $2 AND period = $3 AND period_start = $4 AND device_id = $5",
            )
            .await?,
            &[&ctx.user_id, &f, &p, &start, &device, &units],
        )
        .await?;
    }
    Ok(())
}

/// Credits were revoked or refunded: when active devices hold part of the balance as leases, the
/// credit pool's overage (they may spend credits that are gone) has the cause `refund`.
pub async fn mark_refund(tx: &impl GenericClient, user_id: Uuid, now: DateTime<Utc>) -> ApiResult<bool> {
    let n = tx
        .execute(
            &tx.prepare_cached(
                "UPDATE counters c SET causes = ARRAY(SELECT DISTINCT x FROM unnest(c.causes || ARRAY['refund']) AS x ORDER BY x) \
                 WHERE c.user_id = $1 AND c.feature = $2 AND c.period = $3 AND c.period_start = $4 AND EXISTS ( \
                   SELECT 1 FROM pool_devices p JOIN devices d ON d.user_id = p.user_id AND d.device_id = p.device_id \
                   WHERE p.user_id = c.user_id AND p.feature = c.feature AND p.period = c.period AND p.period_start = c.period_start \
                   AND p.allowance > p.consumed AND d.removed_at IS NULL AND d.lease_until > $5)",
            )
            .await?,
            &[&user_id, &CREDITS, &CREDITS_PERIOD, &credits_start(), &now],
        )
        .await?;
    Ok(n > 0)
}

/// A hard pool of the user's current entitlements, in its current window, or the credit balance.
pub struct CurrentPool {
    /// The pool.
    pub key: PoolKey,
    /// Its rule's period (`lifetime` for credits).
    pub period: Period,
    /// The limit (credits: the balance, floored at 0).
    pub limit: u64,
    /// The fraction devices may hold between them.
    pub offline_share: Share,
    /// Whether the measure is micros (a budget).
    pub budget: bool,
}

/// The hard pools of `ents` at the context's time, plus the credit balance when a rule draws
/// credits.
pub fn current_pools(ctx: &Ctx<'_>, ents: &Entitlements) -> Vec<CurrentPool> {
    let mut out = Vec::new();
    for (f, rule) in &ents.features {
        if !pools::is_hard(rule) {
            continue;
        }
        let (Some(key), Some(period), Some(limit)) = (PoolKey::of(ctx, f, rule), rule.period(), rule.limit()) else { continue };
        out.push(CurrentPool { key, period, limit, offline_share: rule.offline_share(), budget: matches!(rule, Rule::Budget { .. }) });
    }
    if let Some((f, rule)) = ents.features.iter().find(|(_, r)| matches!(r, Rule::Credits { .. }))
        && let Some(key) = PoolKey::of(ctx, f, rule)
    {
        out.push(CurrentPool {
            key,
            period: Period::Lifetime,
            limit: to_u64(ents.credit_balance),
            offline_share: ctx.catalog.credits_offline_share,
            budget: false,
        });
    }
    out
}

/// A `want` or `release` entry checked against the catalog: `units` within the counter range,
/// `$credits` with a `null` `period_start`, a feature's release with one. A 422 naming the entry
/// otherwise. A feature no plan knows (a device catalog ahead of the server's) is left alone: it
/// has no pool to lease, and the sync must not fail for it.
pub fn check_amounts(ctx: &Ctx<'_>, field: &str, list: &[LeaseAmount]) -> ApiResult<()> {
    for (i, a) in list.iter().enumerate() {
        if a.units > tally_core::contract::MAX_COUNTER {
            return Err(ApiError::Invalid(
                "invalid_amount",
                format!("{field}[{i}].units must be at most {}", tally_core::contract::MAX_COUNTER),
            ));
        }
        if a.feature == CREDITS {
            if a.period_start.is_some() {
                return Err(ApiError::Invalid("invalid_request", format!("{field}[{i}].period_start must be null for {CREDITS}")));
            }
        } else if !ctx.catalog.knows_feature(&a.feature) {
            // A device catalog ahead of the server's: nothing to lease yet, and no reason to
            // fail the sync (its events are kept and acknowledged the same way).
            continue;
        } else if a.period_start.is_none() && field == "release" {
            return Err(ApiError::Invalid("invalid_request", format!("{field}[{i}].period_start is required for a feature's window")));
        }
    }
    Ok(())
}

/// Applies a device's `release` (cumulative per window): for each entry, `delta = units −
/// released` (ignored when ≤ 0) comes off the allowance (never below consumed) and off its
/// recall, and is added to `released`. Returns the pools released in, (feature, window start).
pub async fn release(
    tx: &impl GenericClient,
    user_id: Uuid,
    device: &str,
    list: &[LeaseAmount],
) -> ApiResult<BTreeSet<(String, DateTime<Utc>)>> {
    let mut out = BTreeSet::new();
    for a in list {
        let start = a.period_start.unwrap_or_else(credits_start);
        let rows = tx
            .query(
                &tx.prepare_cached(
                    "SELECT period, released FROM pool_devices WHERE user_id = $1 AND device_id = $2 AND feature = $3 AND period_start = $4 FOR UPDATE",
                )
                .await?,
                &[&user_id, &device, &a.feature, &start],
            )
            .await?;
        for r in rows {
            let delta = to_i64(a.units).saturating_sub(r.get::<_, i64>(1));
            if delta <= 0 {
                continue;
            }
            let period: String = r.get(0);
            tx.execute(
                &tx.prepare_cached(
                    "UPDATE pool_devices SET allowance = greatest(consumed, allowance - $6), released = released + $6, \
                     recall = greatest(0, recall - $6) \
                     WHERE user_id = $1 AND device_id = $2 AND feature = $3 AND period = $4 AND period_start = $5",
                )
                .await?,
                &[&user_id, &device, &a.feature, &period, &start, &delta],
            )
            .await?;
            out.insert((a.feature.clone(), start));
        }
    }
    Ok(out)
}

/// Ends what a device's slices keep out of the free room: allowance = min(allowance, consumed),
/// no recall (its lease was reclaimed, or it is removed).
pub async fn reclaim(tx: &impl GenericClient, user_id: Uuid, device: &str) -> ApiResult<()> {
    tx.execute(
        &tx.prepare_cached(
            "UPDATE pool_devices SET allowance = least(allowance, consumed), recall = 0 \
             WHERE user_id = $1 AND device_id = $2 AND (allowance > consumed OR recall > 0)",
        )
        .await?,
        &[&user_id, &device],
    )
    .await?;
    Ok(())
}

/// How a device claims a pool in a window (stored in `pool_devices.claim`; a claim lasts until
/// the window ends, and only ever grows within it). Ordered: an `Asked` claim outranks an
/// `Offline` one.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
pub enum Claim {
    /// Only because the app lists the feature for offline use: no use in this or the previous
    /// window and no units asked. Its top-ups are capped ([`lease::offline_claim_cap`]).
    Offline,
    /// It asked for units, or used the pool in this or the previous window.
    Asked,
}

impl Claim {
    /// The stored spelling.
    pub fn as_str(self) -> &'static str {
        match self {
            Claim::Offline => "offline",
            Claim::Asked => "asked",
        }
    }
    /// Reads a stored claim; an unknown spelling is an error, never a claim.
    pub fn parse(stored: Option<&str>) -> ApiResult<Option<Claim>> {
        match stored {
            None => Ok(None),
            Some("offline") => Ok(Some(Claim::Offline)),
            Some("asked") => Ok(Some(Claim::Asked)),
            Some(other) => Err(ApiError::Internal(format!("stored claim {other:?} in pool_devices is not one this server knows"))),
        }
    }
    /// The claim a sync makes: `Asked` when the device used the pool in this or the previous
    /// window or asked for units, `Offline` when it sent a want of 0 units only, none without a
    /// want.
    pub fn of_sync(used: bool, want: Option<u64>) -> Option<Claim> {
        match want {
            _ if used => Some(Claim::Asked),
            Some(units) if units > 0 => Some(Claim::Asked),
            Some(_) => Some(Claim::Offline),
            None => None,
        }
    }
}

/// Another active device's slice of a pool, as a grant weighs it.
struct OtherSlice {
    device_id: String,
    outstanding: u64,
    recall: u64,
    claim: Option<Claim>,
}

/// The start of the window before `key`'s (credits, with no window: its own start).
fn previous_start(ctx: &Ctx<'_>, key: &PoolKey, period: Period) -> DateTime<Utc> {
    if key.feature == CREDITS {
        return key.period_start;
    }
    window(period, key.period_start - chrono::Duration::milliseconds(1), &ctx.zones, ctx.anchor).start
}

/// What a device asks of its leases in one request, as [`grant`] weighs it.
pub struct GrantAsks<'a> {
    /// Units it wants per pool (a want of 0: its fair share).
    pub want: &'a [LeaseAmount],
    /// Pools it released in with this request (nothing is handed back there).
    pub released: &'a BTreeSet<(String, DateTime<Utc>)>,
    /// (feature, effective time) of the uses this request recorded.
    pub used: &'a [(String, DateTime<Utc>)],
}

/// Grants and tops up `device`'s slice of every current pool it claims, and returns its lease
/// entries. The device's claim in the window grows with this sync ([`Claim::of_sync`]); `n` is
/// the number of active devices claiming the pool. A device that does not claim is granted
/// nothing and recalled down to what it consumed. A claiming one gets [`lease::top_up`]`(room,
/// want, fair, unused)` with fair = `offline_share.split(n).of(limit)` and room = min(free
/// room, `offline_share.of(limit)` − Σ outstanding) less [`lease::kept_for_empty_claimers`]
/// for the other claiming devices holding nothing; an `Offline` claim holds at most
/// [`lease::offline_claim_cap`] unused. A device left below its fair share sets recalls on the
/// devices holding more than theirs (a device that does not claim has none).
pub async fn grant(
    tx: &impl GenericClient,
    ctx: &Ctx<'_>,
    ents: &Entitlements,
    device: &str,
    asks: &GrantAsks<'_>,
) -> ApiResult<Vec<Lease>> {
    let mut leases = Vec::new();
    for pool in current_pools(ctx, ents) {
        let key = &pool.key;
        let credits = key.feature == CREDITS;
        let p = pools::lock(tx, ctx.user_id, key, pool.budget, ctx.now).await?;
        if !credits {
            pools::note_limit(tx, ctx.user_id, key, pool.limit).await?;
        }
        tx.execute(
            &tx.prepare_cached(
                "INSERT INTO pool_devices (user_id, feature, period, period_start, device_id) VALUES ($1, $2, $3, $4, $5) ON CONFLICT DO NOTHING",
            )
            .await?,
            &[&ctx.user_id, &key.feature, &key.period, &key.period_start, &device],
        )
        .await?;
        let r = tx
            .query_one(
                &tx.prepare_cached(
                    "SELECT allowance, released, consumed, recall, claim FROM pool_devices \
                     WHERE user_id = $1 AND feature = $2 AND period = $3 AND period_start = $4 AND device_id = $5",
                )
                .await?,
                &[&ctx.user_id, &key.feature, &key.period, &key.period_start, &device],
            )
            .await?;
        let place = |c: &str| format!("pool_devices.{c} of {} from {}", key.feature, key.period_start);
        let allowance = pools::stored_count(r.get(0), || place("allowance"))?;
        let rel = pools::stored_count(r.get(1), || place("released"))?;
        let consumed = pools::stored_count(r.get(2), || place("consumed"))?;
        let own_recall = pools::stored_count(r.get(3), || place("recall"))?;
        let stored_claim = Claim::parse(r.get::<_, Option<&str>>(4))?;
        let want_units = asks
            .want
            .iter()
            .filter(|w| w.feature == key.feature && (credits || w.period_start.is_none_or(|s| s == key.period_start)))
            .map(|w| w.units)
            .max();
        let prev_start = previous_start(ctx, key, pool.period);
        let used = consumed > 0
            || asks.used.iter().any(|(f, at)| *f == key.feature && *at >= prev_start)
            || (stored_claim != Some(Claim::Asked)
                && tx
                    .query_opt(
                        &tx.prepare_cached(
                            "SELECT 1 FROM pool_devices WHERE user_id = $1 AND feature = $2 AND period = $3 AND period_start = $4 \
                             AND device_id = $5 AND consumed > 0",
                        )
                        .await?,
                        &[&ctx.user_id, &key.feature, &key.period, &prev_start, &device],
                    )
                    .await?
                    .is_some());
        let claim = stored_claim.max(Claim::of_sync(used, want_units));
        if claim != stored_claim {
            tx.execute(
                &tx.prepare_cached(
                    "UPDATE pool_devices SET claim = $6 WHERE user_id = $1 AND feature = $2 AND period = $3 AND period_start = $4 AND device_id = $5",
                )
                .await?,
                &[&ctx.user_id, &key.feature, &key.period, &key.period_start, &device, &claim.map(Claim::as_str)],
            )
            .await?;
        }
        let others: Vec<OtherSlice> = tx
            .query(
                &tx.prepare_cached(
                    // A device that used the pool in this or the previous window claims it,
                    // whether or not it synced in this window yet.
                    "SELECT p.device_id, greatest(0, p.allowance - p.consumed), p.recall, p.claim, p.consumed > 0 OR EXISTS ( \
                       SELECT 1 FROM pool_devices q WHERE q.user_id = p.user_id AND q.feature = p.feature AND q.period = p.period \
                       AND q.period_start = $7 AND q.device_id = p.device_id AND q.consumed > 0) \
                     FROM pool_devices p \
                     JOIN devices d ON d.user_id = p.user_id AND d.device_id = p.device_id AND d.removed_at IS NULL AND d.lease_until > $6 \
                     WHERE p.user_id = $1 AND p.feature = $2 AND p.period = $3 AND p.period_start = $4 AND p.device_id <> $5 \
                     ORDER BY p.device_id",
                )
                .await?,
                &[&ctx.user_id, &key.feature, &key.period, &key.period_start, &device, &ctx.now, &prev_start],
            )
            .await?
            .iter()
            .map(|r| {
                Ok(OtherSlice {
                    device_id: r.get(0),
                    outstanding: pools::stored_count(r.get(1), || place("allowance − consumed"))?,
                    recall: pools::stored_count(r.get(2), || place("recall"))?,
                    claim: Claim::parse(r.get::<_, Option<&str>>(3))?.max(r.get::<_, bool>(4).then_some(Claim::Asked)),
                })
            })
            .collect::<ApiResult<_>>()?;
        let unused = lease::outstanding(allowance, consumed);
        let skip = asks.released.contains(&(key.feature.clone(), key.period_start));
        let (granted, share) = match claim {
            None => {
                // Syncing without claiming: give back everything not used.
                if unused > own_recall {
                    set_recall(tx, ctx.user_id, key, device, unused).await?;
                }
                (0, Share::ZERO)
            }
            Some(mine) => {
                let n = u32::try_from(others.iter().filter(|o| o.claim.is_some()).count()).unwrap_or(u32::MAX - 1).saturating_add(1);
                let fair = pool.offline_share.split(n).of(pool.limit);
                let used_units = if credits { 0 } else { p.used };
                let free = lease::free_room(pool.limit, used_units, p.held, p.leased);
                let empty = u32::try_from(others.iter().filter(|o| o.claim.is_some() && o.outstanding == 0).count()).unwrap_or(u32::MAX);
                let room = free.min(pool.offline_share.of(pool.limit).saturating_sub(p.leased));
                let room = room.saturating_sub(lease::kept_for_empty_claimers(pool.limit, pool.offline_share, n, empty, room));
                let mut granted = if skip { 0 } else { lease::top_up(room, want_units.unwrap_or(0), fair, unused) };
                let share = match mine {
                    Claim::Asked => pool.offline_share.split(n),
                    Claim::Offline => {
                        let cap = lease::offline_claim_cap(pool.limit, pool.offline_share, n);
                        granted = granted.min(cap.saturating_sub(unused));
                        pool.offline_share.split(n.saturating_mul(2))
                    }
                };
                if !skip && unused.saturating_add(granted) < fair {
                    // Others hold more than theirs (a device that does not claim: anything).
                    for o in &others {
                        let theirs = match o.claim {
                            None => 0,
                            Some(Claim::Asked) => fair,
                            Some(Claim::Offline) => lease::offline_claim_cap(pool.limit, pool.offline_share, n),
                        };
                        let excess = o.outstanding.saturating_sub(theirs);
                        if excess > o.recall {
                            set_recall(tx, ctx.user_id, key, &o.device_id, excess).await?;
                        }
                    }
                }
                (granted, share)
            }
        };
        let allowance = allowance.saturating_add(granted);
        if granted > 0 {
            tx.execute(
                &tx.prepare_cached(
                    "UPDATE pool_devices SET allowance = $6 WHERE user_id = $1 AND feature = $2 AND period = $3 AND period_start = $4 AND device_id = $5",
                )
                .await?,
                &[&ctx.user_id, &key.feature, &key.period, &key.period_start, &device, &to_i64(allowance)],
            )
            .await?;
            ::metrics::counter!("tally_lease_grants_total").increment(1);
        }
        let expires_at = if credits { credits_expiry(ents) } else { None };
        leases.push(Lease {
            feature: key.feature.clone(),
            period: pool.period,
            period_start: (!credits).then_some(key.period_start),
            allowance,
            released: rel,
            consumed,
            share,
            expires_at,
        });
    }
    Ok(leases)
}

/// For the credit-balance lease: the expiry of the first grant (FIFO) with credits left — the
/// allowance is carved from it first.
fn credits_expiry(ents: &Entitlements) -> Option<DateTime<Utc>> {
    let mut grants: Vec<&tally_core::CreditGrant> = ents.credit_grants.iter().filter(|g| g.remaining > 0).collect();
    grants.sort_by(|a, b| tally_core::credits::fifo_key(a).cmp(&tally_core::credits::fifo_key(b)));
    grants.first().and_then(|g| g.expires_at)
}

/// Stores the device's latest lease entries and the share and limit its token promises for
/// windows it enters offline (`pools`: what its entitlements resolve to), bumping `lease_ver`
/// when the entries changed; returns the `lease_ver`. A removed device syncing again is back.
pub async fn issue(tx: &impl GenericClient, user_id: Uuid, dev: &Device, leases: &[Lease], pools: &[CurrentPool]) -> ApiResult<u64> {
    let ver = if dev.leases == leases && dev.lease_ver > 0 && dev.removed_at.is_none() { dev.lease_ver } else { dev.lease_ver + 1 };
    tx.execute(
        &tx.prepare_cached("UPDATE devices SET lease_ver = $3, leases = $4, removed_at = NULL WHERE user_id = $1 AND device_id = $2")
            .await?,
        &[&user_id, &dev.device_id, &ver, &serde_json::to_value(leases)?],
    )
    .await?;
    for l in leases.iter().filter(|l| l.feature != CREDITS) {
        let limit = pools.iter().find(|p| p.key.feature == l.feature).map_or(0, |p| p.limit);
        tx.execute(
            &tx.prepare_cached(
                "INSERT INTO device_shares (user_id, device_id, feature, lease_ver, share, lim) VALUES ($1, $2, $3, $4, $5, $6) \
                 ON CONFLICT (user_id, device_id, feature, lease_ver) DO UPDATE SET share = excluded.share, lim = excluded.lim",
            )
            .await?,
            &[&user_id, &dev.device_id, &l.feature, &ver, &i32::try_from(l.share.millionths()).unwrap_or(0), &to_i64(limit)],
        )
        .await?;
    }
    Ok(to_u64(ver))
}

/// Sets the device's `lease_until` (from the token it is answered with).
pub async fn set_lease_until(tx: &impl GenericClient, user_id: Uuid, device: &str, until: DateTime<Utc>) -> ApiResult<()> {
    tx.execute(
        &tx.prepare_cached("UPDATE devices SET lease_until = $3 WHERE user_id = $1 AND device_id = $2").await?,
        &[&user_id, &device, &until],
    )
    .await?;
    Ok(())
}

/// The recalls outstanding on the device's slices (never more than it still holds).
pub async fn recalls(tx: &impl GenericClient, user_id: Uuid, device: &str) -> ApiResult<Vec<LeaseAmount>> {
    let rows = tx
        .query(
            &tx.prepare_cached(
                "SELECT feature, period_start, least(recall, greatest(0, allowance - consumed)) FROM pool_devices \
                 WHERE user_id = $1 AND device_id = $2 AND recall > 0 AND allowance > consumed ORDER BY feature, period_start",
            )
            .await?,
            &[&user_id, &device],
        )
        .await?;
    Ok(rows
        .iter()
        .map(|r| {
            let feature: String = r.get(0);
            let start: DateTime<Utc> = r.get(1);
            LeaseAmount { period_start: (feature != CREDITS).then_some(start), feature, units: to_u64(r.get(2)) }
        })
        .collect())
}

/// Removes a device (signed out, or removed by its user): its slices hold nothing more, it stops
/// counting among the user's devices, and the shares it was promised end now.
pub async fn remove(tx: &impl GenericClient, user_id: Uuid, device: &str, now: DateTime<Utc>) -> ApiResult<()> {
    reclaim(tx, user_id, device).await?;
    tx.execute(&tx.prepare_cached("DELETE FROM device_shares WHERE user_id = $1 AND device_id = $2").await?, &[&user_id, &device]).await?;
    tx.execute(
        &tx.prepare_cached(
            "UPDATE devices SET removed_at = $3, lease_until = $3, lease_ver = lease_ver + 1, \
             leases = (SELECT coalesce(jsonb_agg(jsonb_set(l, '{allowance}', to_jsonb(least((l->>'allowance')::int8, (l->>'consumed')::int8)))), '[]') \
                       FROM jsonb_array_elements(leases) AS l) \
             WHERE user_id = $1 AND device_id = $2",
        )
        .await?,
        &[&user_id, &device, &now],
    )
    .await?;
    Ok(())
}

/// One device as `GET /v1/me/devices` lists it.
#[derive(Debug, Serialize)]
pub struct DeviceView {
    /// Device id.
    pub device_id: String,
    /// First sync.
    pub first_seen_at: DateTime<Utc>,
    /// Last sync.
    pub last_sync_at: DateTime<Utc>,
    /// Protocol of its latest sync.
    pub protocol: i32,
    /// Its lease version.
    pub lease_ver: i64,
    /// When its leases end.
    pub lease_until: Option<DateTime<Utc>>,
    /// Two installs sent this device id.
    pub cloned: bool,
    /// When it was removed or signed out.
    pub removed_at: Option<DateTime<Utc>>,
    /// The lease entries of its latest token (allowances ended when removed).
    pub leases: Vec<Lease>,
}

/// Every device of `user_id` by first sync, as `GET /v1/me/devices` lists them.
pub async fn devices(client: &impl GenericClient, user_id: Uuid) -> ApiResult<Vec<DeviceView>> {
    let q = format!("SELECT {DEVICE_COLUMNS} FROM devices WHERE user_id = $1 ORDER BY first_seen_at, device_id");
    let rows = client.query(&client.prepare_cached(&q).await?, &[&user_id]).await?;
    rows.iter()
        .map(Device::from_row)
        .map(|d| {
            d.map(|d| DeviceView {
                device_id: d.device_id,
                first_seen_at: d.first_seen_at,
                last_sync_at: d.last_sync_at,
                protocol: d.protocol,
                lease_ver: d.lease_ver,
                lease_until: d.lease_until,
                cloned: d.cloned,
                removed_at: d.removed_at,
                leases: d.leases,
            })
        })
        .collect()
}

/// `GET /v1/me/devices`: `{"devices": [...]}`, the caller's devices by first sync.
#[utoipa::path(
    operation_id = "leases_list_devices",
    get,
    path = "/v1/me/devices",
    tag = "account",
    security(("bearer" = [])),
    responses((status = 200, description = "The caller's devices with their leases", body = Object)),
)]
pub async fn list_devices(State(state): State<AppState>, AuthUser(user): AuthUser) -> ApiResult<Json<Value>> {
    let client = state.pool.get().await?;
    let devices = devices(&client, user.user_id).await?;
    Ok(Json(serde_json::json!({ "devices": devices })))
}

/// `DELETE /v1/me/devices/{device_id}`: 204; the device's allowances are released (allowance =
/// consumed), it is removed and its leases end now (its late uses count with cause
/// `reclaimed`). 404 `unknown_device` for an id the caller has no device with.
#[utoipa::path(
    operation_id = "leases_delete_device",
    delete,
    path = "/v1/me/devices/{device_id}",
    tag = "account",
    security(("bearer" = [])),
    params(("device_id" = String, Path, description = "The device id")),
    responses((status = 204, description = "The device's allowances are released")),
)]
pub async fn delete_device(
    State(state): State<AppState>,
    AuthUser(user): AuthUser,
    Path(device_id): Path<String>,
) -> ApiResult<StatusCode> {
    let mut client = state.pool.get().await?;
    let tx = client.transaction().await?;
    users::lock(&tx, user.user_id, &state.config.admin_subjects).await?;
    let now = pools::now_locked(&state);
    let found = tx
        .query_opt(
            &tx.prepare_cached("SELECT 1 FROM devices WHERE user_id = $1 AND device_id = $2 FOR UPDATE").await?,
            &[&user.user_id, &device_id],
        )
        .await?;
    if found.is_none() {
        return Err(ApiError::Unknown("unknown_device", format!("no device {device_id:?} of this account")));
    }
    remove(&tx, user.user_id, &device_id, now).await?;
    tx.commit().await?;
    Ok(StatusCode::NO_CONTENT)
}
