//! Protocol-2 leases on the device: the stored entries of the device token, deciding a hard
//! pool against this device's slice of it, what the next sync asks for (`want`) and gives back
//! (`release`), and recalls. The arithmetic is [`crate::lease`]'s; this module only stores and
//! reads.
//!
//! Storage: `leases` (the entries of the last accepted device token, replaced as a whole),
//! `users.{lease_ver, lease_until, lease_exp, leases_held}`, `lease_releases` (this device's
//! cumulative release per window, written before it is sent, never lowered), `lease_wants`
//! (what the app asked with [`Tally::prepare_offline`]) and `counters.pending_leased` (this
//! device's unacknowledged leased units per window). A decision reads one counter row, one
//! entry, one release row and at most one more entry (the share of a window entered offline):
//! never the ledger.

use crate::access::Access;
use crate::catalog::{Enforcement, Rule};
use crate::entitlements::EntitlementClaims;
use crate::error::{Error, Result};
use crate::lease::{CREDITS, CREDITS_PERIOD, Share, effective_allowance, offline_allowance};
use crate::period::window;
use crate::quota::{Batch, own_pending, read_counter};
use crate::wire::LeaseAmount;
use crate::{Tally, from_ms, ms, write_tx};
use chrono::{DateTime, Duration, Utc};
use rusqlite::{Connection, OptionalExtension, params};
use serde::{Deserialize, Serialize};
use std::collections::{BTreeMap, HashMap};

/// The lease state of a user's stored device token (once they held one), with its entries
/// and this device's own releases read once with the user's access (every write to them drops
/// the cached access), so that a decision reads no lease row.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub(crate) struct LeaseState {
    /// `lease_ver` of the stored token.
    pub(crate) ver: Option<i64>,
    /// `lease_until` (ms).
    pub(crate) until_ms: Option<i64>,
    /// The token's `exp` (ms).
    pub(crate) exp_ms: Option<i64>,
    /// Entries by feature, then window start ms (`None` for credits): found by `&str`, so a
    /// decision allocates no key.
    entries: HashMap<String, HashMap<Option<i64>, Entry>>,
    /// This device's cumulative releases by feature, then window start.
    released: HashMap<String, HashMap<Option<i64>, u64>>,
    /// The share of the latest entry of each feature.
    shares: HashMap<String, Share>,
}

/// Reads the lease state of `user` (its entries and releases) given the token's figures.
pub(crate) fn load_state(
    conn: &Connection,
    user: &str,
    ver: Option<i64>,
    until_ms: Option<i64>,
    exp_ms: Option<i64>,
) -> Result<LeaseState> {
    let mut st = LeaseState { ver, until_ms, exp_ms, ..LeaseState::default() };
    let mut q = conn.prepare_cached(
        "SELECT feature, period_start, allowance, released, consumed, expires_at, share FROM leases WHERE user_id = ?1 ORDER BY period_start",
    )?;
    let rows = q.query_map([user], |r| {
        Ok((
            r.get::<_, String>(0)?,
            r.get::<_, Option<i64>>(1)?,
            Entry {
                allowance: count(r, 2, "allowance")?,
                released: count(r, 3, "released")?,
                consumed: count(r, 4, "consumed")?,
                expires_at: r.get(5)?,
            },
            stored_share(r.get(6)?)?,
        ))
    })?;
    for row in rows {
        let (feature, start, e, share) = row?;
        // Ordered by window start: the last one of a feature is its latest.
        st.shares.insert(feature.clone(), share);
        st.entries.entry(feature).or_default().entry(start).or_insert(e);
    }
    let mut q = conn.prepare_cached("SELECT feature, period_start, units FROM lease_releases WHERE user_id = ?1")?;
    let rows = q.query_map([user], |r| {
        Ok((r.get::<_, String>(0)?, r.get::<_, Option<i64>>(1)?, crate::db::stored_count(r.get(2)?, "lease_releases.units")?))
    })?;
    for row in rows {
        let (feature, start, units) = row?;
        st.released.entry(feature).or_default().insert(start, units);
    }
    Ok(st)
}

impl LeaseState {
    /// Whether the leases may still be used at `now`: before the earlier of `lease_until` and
    /// the token's own grace end (`exp + token_grace`).
    pub(crate) fn active(&self, now: DateTime<Utc>, grace: Duration) -> bool {
        let grace_end = self.exp_ms.map(|e| e.saturating_add(grace.num_milliseconds()));
        let end = [self.until_ms, grace_end].into_iter().flatten().min();
        end.is_some_and(|end| ms(now) < end)
    }
}

/// One pool: (feature key or `$credits`, period, window start ms or `None` for credits).
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub(crate) struct Pool {
    pub(crate) feature: String,
    pub(crate) period: String,
    pub(crate) start: Option<i64>,
}

impl Pool {
    /// The counter row keeping the pool's `pending_leased` (credits: `($credits, lifetime, 0)`).
    pub(crate) fn counter_start(&self) -> i64 {
        self.start.unwrap_or(0)
    }
}

/// A recorded use's lease: the token version it was decided under, its pool and units.
#[derive(Debug, Clone)]
pub(crate) struct LeaseUse {
    pub(crate) ver: Option<i64>,
    pub(crate) pool: Pool,
    pub(crate) units: u64,
}

/// What a decision sees of a pool's lease.
#[derive(Debug, Clone)]
pub(crate) struct LeaseView {
    pub(crate) ver: Option<i64>,
    pub(crate) pool: Pool,
    /// Effective allowance (0 when the lease ended or there is no entry).
    pub(crate) allowance: u64,
    /// `consumed` + this device's unacknowledged leased units.
    pub(crate) units: u64,
}

/// The hard pool a rule decides in at `now`, with its limit: hard metered with a limit and hard
/// budgets (this window), credits rules (`$credits`). `None` for every other rule.
pub(crate) fn hard_pool(rule: &Rule, feature: &str, a: &Access, now: DateTime<Utc>) -> Option<(Pool, u64)> {
    let windowed = |period: crate::Period, limit: u64| {
        let w = window(period, now, &a.zones, a.anchor);
        Some((Pool { feature: feature.to_string(), period: period.as_str().to_string(), start: Some(ms(w.start)) }, limit))
    };
    match rule {
        Rule::Metered { limit: Some(l), period, enforcement: Enforcement::Hard, .. } => windowed(*period, *l),
        Rule::Budget { limit_micros, period, enforcement: Enforcement::Hard, .. } => windowed(*period, *limit_micros),
        Rule::Credits { .. } => Some((Pool { feature: CREDITS.into(), period: CREDITS_PERIOD.into(), start: None }, 0)),
        _ => None,
    }
}

/// One stored entry.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
struct Entry {
    allowance: u64,
    released: u64,
    consumed: u64,
    expires_at: Option<i64>,
}

/// A `leases.share` as stored, in millionths: outside 0..=1 000 000 is corruption (clamped, a
/// share above 1 would hand this device the whole limit of a window it enters offline): an
/// error, never room.
fn stored_share(v: i64) -> rusqlite::Result<Share> {
    match u32::try_from(v) {
        Ok(m) if m <= Share::SCALE => Ok(Share::from_millionths(m)),
        _ => Err(rusqlite::Error::FromSqlConversionFailure(
            6,
            rusqlite::types::Type::Integer,
            format!("corrupt stored value: leases.share is {v} millionths").into(),
        )),
    }
}

/// Column `idx` (`column`) of a `leases` row, a count: a negative one is an error, never room.
fn count(r: &rusqlite::Row<'_>, idx: usize, column: &str) -> rusqlite::Result<u64> {
    crate::db::stored_count(r.get(idx)?, &format!("leases.{column}"))
}

fn to_i64(v: u64) -> i64 {
    i64::try_from(v).unwrap_or(i64::MAX)
}

fn entry(conn: &Connection, user: &str, feature: &str, start: Option<i64>) -> Result<Option<Entry>> {
    Ok(conn
        .prepare_cached(
            "SELECT allowance, released, consumed, expires_at FROM leases
             WHERE user_id = ?1 AND feature = ?2 AND period_start IS ?3 LIMIT 1",
        )?
        .query_row(params![user, feature, start], |r| {
            Ok(Entry {
                allowance: count(r, 0, "allowance")?,
                released: count(r, 1, "released")?,
                consumed: count(r, 2, "consumed")?,
                expires_at: r.get(3)?,
            })
        })
        .optional()?)
}

/// This device's cumulative release of one window.
fn local_released(conn: &Connection, user: &str, feature: &str, start: Option<i64>) -> Result<u64> {
    Ok(conn
        .prepare_cached("SELECT units FROM lease_releases WHERE user_id = ?1 AND feature = ?2 AND period_start IS ?3")?
        .query_row(params![user, feature, start], |r| crate::db::stored_count(r.get(0)?, "lease_releases.units"))
        .optional()?
        .unwrap_or(0))
}

/// Raises this device's cumulative release of one window to `units` (never lowers it).
fn raise_released(conn: &Connection, user: &str, feature: &str, start: Option<i64>, units: u64) -> Result<()> {
    let n = conn
        .prepare_cached("UPDATE lease_releases SET units = MAX(units, ?4) WHERE user_id = ?1 AND feature = ?2 AND period_start IS ?3")?
        .execute(params![user, feature, start, to_i64(units)])?;
    if n == 0 {
        conn.prepare_cached("INSERT INTO lease_releases (user_id, feature, period_start, units) VALUES (?1, ?2, ?3, ?4)")?
            .execute(params![user, feature, start, to_i64(units)])?;
    }
    Ok(())
}

/// Effective allowance and units in the window of `pool`, from the user's lease state
/// (`pending` leased units given by the caller).
fn pool_state(ls: &LeaseState, pool: &Pool, limit: u64, pending: i64, active: bool, now: DateTime<Utc>) -> (u64, u64) {
    let with = |consumed: u64| u64::try_from((i128::from(consumed) + i128::from(pending)).max(0)).unwrap_or(u64::MAX);
    let pending = with(0);
    if !active {
        return (0, pending);
    }
    let local = ls.released.get(pool.feature.as_str()).and_then(|m| m.get(&pool.start)).copied().unwrap_or(0);
    match ls.entries.get(pool.feature.as_str()).and_then(|m| m.get(&pool.start)) {
        Some(e) if e.expires_at.is_some_and(|x| x <= ms(now)) => (0, with(e.consumed)),
        Some(e) => (effective_allowance(e.allowance, e.released, local), with(e.consumed)),
        // A window entered offline: this device's share of the limit it resolves to now.
        None if pool.start.is_some() => match ls.shares.get(&pool.feature) {
            Some(share) => (effective_allowance(offline_allowance(0, limit, *share), 0, local), pending),
            None => (0, pending),
        },
        None => (0, pending),
    }
}

impl Tally {
    /// The lease a decision of `feature` under `rule` must fit, when the user held a device
    /// token and the rule is a hard pool; `None` otherwise (round-1 decisions). `counter`: the
    /// window start and leased units of the rule's counter row when the caller has read it
    /// already (a windowed rule's pool is that row), so the window is not computed twice.
    #[allow(clippy::too_many_arguments)]
    pub(crate) fn lease_view(
        &self,
        conn: &Connection,
        batch: &mut Batch,
        a: &Access,
        user: &str,
        feature: &str,
        rule: &Rule,
        now: DateTime<Utc>,
        counter: Option<(i64, i64)>,
    ) -> Result<Option<LeaseView>> {
        let Some(ls) = &a.lease else { return Ok(None) };
        let known = match (rule, counter) {
            (
                Rule::Metered { limit: Some(limit), period, enforcement: Enforcement::Hard, .. }
                | Rule::Budget { limit_micros: limit, period, enforcement: Enforcement::Hard, .. },
                Some((start, leased)),
            ) => Some((Pool { feature: feature.to_string(), period: period.as_str().to_string(), start: Some(start) }, *limit, leased)),
            _ => None,
        };
        let (pool, limit, pending) = match known {
            Some(k) => k,
            None => {
                let Some((pool, limit)) = hard_pool(rule, feature, a, now) else { return Ok(None) };
                let pending = batch.read(conn, user, &pool.feature, &pool.period, pool.counter_start())?.leased;
                (pool, limit, pending)
            }
        };
        let (allowance, units) = pool_state(ls, &pool, limit, pending, ls.active(now, self.config.token_grace), now);
        Ok(Some(LeaseView { ver: ls.ver, pool, allowance, units }))
    }

    /// This device's leases of `user_id`: one row per entry of the stored device token, with
    /// what is used and left on this device (empty for a user that never held one).
    pub fn leases(&self, user_id: &str) -> Result<Vec<LeaseStatus>> {
        let mut g = self.lock();
        let now = self.observe_now(&mut g);
        let a = self.access(&mut g, user_id, now)?;
        let Some(ls) = a.lease.clone() else { return Ok(Vec::new()) };
        let active = ls.active(now, self.config.token_grace);
        type Row = (String, String, Option<i64>, Share, i64);
        let rows: Vec<Row> = g
            .conn
            .prepare(
                "SELECT feature, period, period_start, share, expires_at FROM leases WHERE user_id = ?1 ORDER BY feature, period_start",
            )?
            .query_map([user_id], |r| {
                Ok((r.get(0)?, r.get(1)?, r.get(2)?, stored_share(r.get(3)?)?, r.get::<_, Option<i64>>(4)?.unwrap_or(i64::MIN)))
            })?
            .collect::<rusqlite::Result<_>>()?;
        let mut out = Vec::with_capacity(rows.len());
        for (feature, period, start, share, expires) in rows {
            let pool = Pool { feature: feature.clone(), period: period.clone(), start };
            let pending = read_counter(&g.conn, user_id, &feature, &period, pool.counter_start())?.leased;
            let (allowance, used) = pool_state(&ls, &pool, 0, pending, active, now);
            out.push(LeaseStatus {
                feature,
                period,
                period_start: start.map(from_ms),
                allowance,
                used,
                remaining: allowance.saturating_sub(used),
                share: share.as_f64(),
                expires_at: (expires != i64::MIN).then(|| from_ms(expires)),
                lease_until: ls.until_ms.map(from_ms),
            });
        }
        Ok(out)
    }

    /// Asks for `units` of `feature` to use offline: stored, and sent with the next sync as
    /// `want` for the feature's current window (for a credits rule: of the credit balance),
    /// until a device token grants that much. `feature` must be a hard pool of the user's plan
    /// (hard metered with a limit, hard budget, or credits); `units` must be 1 or more.
    /// A bad argument is [`Error::InvalidInput`] (unknown user: [`Error::NotFound`]) and stores
    /// nothing.
    pub fn prepare_offline(&self, user_id: &str, feature: &str, units: u64) -> Result<()> {
        crate::contract::feature(feature)?;
        if units == 0 || units > crate::contract::MAX_AMOUNT {
            return Err(Error::invalid(format!("units must be between 1 and {}, got {units}", crate::contract::MAX_AMOUNT)));
        }
        let mut g = self.lock();
        let now = self.observe_now(&mut g);
        let a = self.access(&mut g, user_id, now)?;
        let rule = a
            .ent
            .features
            .get(feature)
            .ok_or_else(|| Error::invalid(format!("feature {feature:?} is not in the plan of user {user_id}")))?;
        if hard_pool(rule, feature, &a, now).is_none() {
            return Err(Error::invalid(format!(
                "feature {feature:?} is not a hard pool (hard metered with a limit, hard budget or credits): it needs no lease"
            )));
        }
        write_tx(&mut g.conn, |tx| {
            tx.execute(
                "INSERT INTO lease_wants (user_id, feature, units) VALUES (?1, ?2, ?3)
                 ON CONFLICT (user_id, feature) DO UPDATE SET units = excluded.units",
                params![user_id, feature, to_i64(units)],
            )?;
            Ok(())
        })
    }

    /// The lease part of the next sync request of `user_id` (protocol 2): the stored token's
    /// `lease_ver`, `want` (every hard pool this device used in this or the previous window,
    /// every `Config.offline_features` feature, each at 0 = fair share, what
    /// [`Tally::prepare_offline`] asked, and the units a lease refused since the last sync),
    /// and `release` (the cumulative releases no server has acknowledged yet).
    pub fn lease_request(&self, user_id: &str) -> Result<LeaseRequest> {
        let mut g = self.lock();
        let now = self.observe_now(&mut g);
        let a = self.access(&mut g, user_id, now)?;
        let conn = &g.conn;
        let ver: Option<i64> = conn.query_row("SELECT lease_ver FROM users WHERE id = ?1", [user_id], |r| r.get(0))?;
        let mut want: BTreeMap<(String, Option<i64>), u64> = BTreeMap::new();
        let mut add = |pool: &Pool, units: u64| {
            let w = want.entry((pool.feature.clone(), pool.start)).or_insert(0);
            *w = (*w).max(units);
        };
        for (feature, rule) in &a.ent.features {
            let Some((pool, _)) = hard_pool(rule, feature, &a, now) else { continue };
            // This device's own uses only: uses of the account's other devices claim nothing
            // here (the server also counts this device's acknowledged leased uses of the
            // previous window as a claim).
            let consumed_here = entry(conn, user_id, &pool.feature, pool.start)?.is_some_and(|e| e.consumed > 0);
            let used = consumed_here
                || match (rule.period(), pool.start) {
                    (Some(p), Some(start)) => {
                        let prev = window(p, from_ms(start) - Duration::milliseconds(1), &a.zones, a.anchor);
                        [start, ms(prev.start)].into_iter().try_fold(false, |acc, s| -> Result<bool> {
                            Ok(acc || own_pending(conn, user_id, feature, &pool.period, s)?)
                        })?
                    }
                    _ => own_pending(conn, user_id, CREDITS, CREDITS_PERIOD, 0)?,
                };
            if used || self.config.offline_features.iter().any(|f| f == feature) {
                add(&pool, 0);
            }
        }
        let asked: Vec<(String, i64)> = conn
            .prepare("SELECT feature, units FROM lease_wants WHERE user_id = ?1 ORDER BY feature")?
            .query_map([user_id], |r| Ok((r.get(0)?, r.get(1)?)))?
            .collect::<rusqlite::Result<_>>()?;
        for (feature, units) in asked {
            if let Some((pool, _)) = a.ent.features.get(&feature).and_then(|r| hard_pool(r, &feature, &a, now)) {
                add(&pool, crate::db::stored_count(units, "lease_wants.units")?);
            }
        }
        for (pool, units) in self.lease_asks.of(user_id) {
            // An ask of a window that ended is dropped (it is asked again if refused again).
            if a.ent.features.iter().any(|(f, r)| hard_pool(r, f, &a, now).is_some_and(|(p, _)| p == pool)) {
                add(&pool, units);
            }
        }
        let release = conn
            .prepare("SELECT feature, period_start, units FROM lease_releases WHERE user_id = ?1 AND units > acked ORDER BY feature, period_start")?
            .query_map([user_id], |r| {
                Ok(LeaseAmount { feature: r.get(0)?, period_start: r.get::<_, Option<i64>>(1)?.map(from_ms), units: crate::db::stored_count(r.get(2)?, "lease_releases.units")? })
            })?
            .collect::<rusqlite::Result<_>>()?;
        let want =
            want.into_iter().map(|((feature, start), units)| LeaseAmount { feature, period_start: start.map(from_ms), units }).collect();
        let lease_ver = ver.map(|v| crate::db::stored_count(v, "users.lease_ver")).transpose()?;
        Ok(LeaseRequest { lease_ver, want, release })
    }
}

/// The pools whose lease refused a use (`lease_exhausted`) since they were last asked for, with
/// the most units refused at once: the app wants them, so the next sync asks for them (a
/// `want` of those units) even when this device never used the pool. Kept in memory: after a
/// restart the app's next refused use asks again.
#[derive(Debug, Default)]
pub(crate) struct LeaseAsks(std::sync::Mutex<HashMap<(String, Pool), u64>>);

impl LeaseAsks {
    fn map(&self) -> std::sync::MutexGuard<'_, HashMap<(String, Pool), u64>> {
        self.0.lock().unwrap_or_else(|e| e.into_inner())
    }
    /// A use of `units` in `pool` was refused for the lease.
    pub(crate) fn note(&self, user: &str, pool: &Pool, units: u64) {
        let mut m = self.map();
        let e = m.entry((user.to_string(), pool.clone())).or_insert(0);
        *e = (*e).max(units);
    }
    /// The asks of `user`.
    fn of(&self, user: &str) -> Vec<(Pool, u64)> {
        self.map().iter().filter(|((u, _), _)| u == user).map(|((_, p), n)| (p.clone(), *n)).collect()
    }
    /// A server answered a request carrying `want`: the asks it covered are done.
    pub(crate) fn sent(&self, user: &str, want: &[LeaseAmount]) {
        self.map().retain(|(u, p), units| {
            u != user || !want.iter().any(|w| w.feature == p.feature && w.period_start.map(ms) == p.start && w.units >= *units)
        });
    }
}

/// This device's lease of one pool, as [`Tally::leases`] shows it.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct LeaseStatus {
    /// Feature key, or `$credits`.
    pub feature: String,
    /// The rule's period (`lifetime` for credits).
    pub period: String,
    /// Window start (`None` for credits).
    pub period_start: Option<DateTime<Utc>>,
    /// What this device may record in the window, after its own releases (0 once the lease
    /// ended or, for credits, after `expires_at`).
    pub allowance: u64,
    /// Units recorded under the lease in the window: the server's count plus this device's
    /// unacknowledged ones.
    pub used: u64,
    /// `allowance - used`, floored at 0.
    pub remaining: u64,
    /// This device's share of the limit (0..=1), for windows it enters offline.
    pub share: f64,
    /// For credits: when the allowance ends.
    pub expires_at: Option<DateTime<Utc>>,
    /// When all leases of the token end.
    pub lease_until: Option<DateTime<Utc>>,
}

/// The lease fields of the next sync request ([`Tally::lease_request`]).
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct LeaseRequest {
    /// `lease_ver` of the stored device token.
    pub lease_ver: Option<u64>,
    /// Pools asked for.
    pub want: Vec<LeaseAmount>,
    /// Cumulative releases not yet acknowledged.
    pub release: Vec<LeaseAmount>,
}

/// Whether a verified token may be stored for `user`: a device token must name this device
/// and carry a `lease_ver` at least the stored one (a token without `did` is a protocol-1
/// token: always).
pub(crate) fn token_acceptable(conn: &Connection, user: &str, claims: &EntitlementClaims, device_id: &str) -> Result<bool> {
    let Some(did) = &claims.did else { return Ok(true) };
    if did != device_id {
        return Ok(false);
    }
    let stored: Option<i64> = conn.query_row("SELECT lease_ver FROM users WHERE id = ?1", [user], |r| r.get(0))?;
    Ok(stored.is_none_or(|s| claims.lease_ver.map_or(0, to_i64) >= s))
}

/// Stores the leases of an accepted device token (replacing the previous ones), and clears the
/// `prepare_offline` wants it grants.
pub(crate) fn store_leases(conn: &Connection, user: &str, claims: &EntitlementClaims) -> Result<()> {
    if claims.did.is_none() {
        return Ok(());
    }
    conn.execute("DELETE FROM leases WHERE user_id = ?1", [user])?;
    for l in &claims.leases {
        conn.prepare_cached(
            "INSERT INTO leases (user_id, feature, period, period_start, allowance, released, consumed, share, expires_at)
             VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7, ?8, ?9)",
        )?
        .execute(params![
            user,
            l.feature,
            l.period.as_str(),
            l.period_start.map(ms),
            to_i64(l.allowance),
            to_i64(l.released),
            to_i64(l.consumed),
            i64::from(l.share.millionths()),
            l.expires_at.map(ms),
        ])?;
    }
    conn.execute(
        "UPDATE users SET lease_ver = ?2, lease_until = ?3, lease_exp = ?4, leases_held = 1 WHERE id = ?1",
        params![user, claims.lease_ver.map(to_i64), claims.lease_until.map(|s| s.saturating_mul(1000)), claims.exp.saturating_mul(1000)],
    )?;
    // A want is granted once the latest entry of its pool has that much unused room.
    let wants: Vec<(String, i64)> = conn
        .prepare("SELECT feature, units FROM lease_wants WHERE user_id = ?1")?
        .query_map([user], |r| Ok((r.get(0)?, r.get(1)?)))?
        .collect::<rusqlite::Result<_>>()?;
    for (feature, units) in wants {
        let pool = match claims.entitlements.features.get(&feature) {
            Some(Rule::Credits { .. }) => CREDITS,
            _ => feature.as_str(),
        };
        let units = crate::db::stored_count(units, "lease_wants.units")?;
        let granted = claims
            .leases
            .iter()
            .filter(|l| l.feature == pool)
            .max_by_key(|l| l.period_start)
            .is_some_and(|l| l.allowance.saturating_sub(l.consumed) >= units);
        if granted {
            conn.execute("DELETE FROM lease_wants WHERE user_id = ?1 AND feature = ?2", params![user, feature])?;
        }
    }
    Ok(())
}

/// Gives back up to `units` of what this device has not used of one stored entry (raising its
/// cumulative release). Returns the units released.
pub(crate) fn release_unused(conn: &Connection, user: &str, feature: &str, start: Option<i64>, units: u64) -> Result<u64> {
    let Some(e) = entry(conn, user, feature, start)? else { return Ok(0) };
    let period: String = conn.query_row(
        "SELECT period FROM leases WHERE user_id = ?1 AND feature = ?2 AND period_start IS ?3 LIMIT 1",
        params![user, feature, start],
        |r| r.get(0),
    )?;
    let local = local_released(conn, user, feature, start)?;
    let pending = read_counter(conn, user, feature, &period, start.unwrap_or(0))?.leased;
    let eff = effective_allowance(e.allowance, e.released, local);
    let in_window = u64::try_from((i128::from(e.consumed) + i128::from(pending)).max(0)).unwrap_or(u64::MAX);
    let unused = eff.saturating_sub(in_window);
    let give = units.min(unused);
    if give > 0 {
        raise_released(conn, user, feature, start, local.max(e.released).saturating_add(give))?;
    }
    Ok(give)
}

/// Applies a server's `recall` (inside the apply transaction).
pub(crate) fn apply_recall(conn: &Connection, user: &str, recall: &[LeaseAmount]) -> Result<()> {
    for r in recall {
        release_unused(conn, user, &r.feature, r.period_start.map(ms), r.units)?;
    }
    Ok(())
}

/// Records that a server answered the request carrying `release`.
pub(crate) fn releases_acked(conn: &Connection, user: &str, release: &[LeaseAmount]) -> Result<()> {
    for r in release {
        conn.prepare_cached("UPDATE lease_releases SET acked = MAX(acked, ?4) WHERE user_id = ?1 AND feature = ?2 AND period_start IS ?3")?
            .execute(params![user, r.feature, r.period_start.map(ms), to_i64(r.units)])?;
    }
    Ok(())
}

/// Whether some cumulative release was written and not yet acknowledged.
pub(crate) fn unsent_releases(conn: &Connection, user: &str) -> Result<bool> {
    Ok(conn.query_row("SELECT EXISTS (SELECT 1 FROM lease_releases WHERE user_id = ?1 AND units > acked)", [user], |r| r.get(0))?)
}

/// Releases everything this device has not used of every stored entry.
pub(crate) fn release_all(conn: &Connection, user: &str) -> Result<()> {
    let pools: Vec<(String, Option<i64>)> = conn
        .prepare("SELECT feature, period_start FROM leases WHERE user_id = ?1")?
        .query_map([user], |r| Ok((r.get(0)?, r.get(1)?)))?
        .collect::<rusqlite::Result<_>>()?;
    for (feature, start) in pools {
        release_unused(conn, user, &feature, start, u64::MAX)?;
    }
    Ok(())
}

/// An acknowledged leased use (`units` < 0: a void) moves from `pending_leased` into the
/// stored entry's `consumed`, where the server counts it, until the next token replaces it.
pub(crate) fn settled_leased(conn: &Connection, user: &str, feature: &str, start: Option<i64>, units: i64) -> Result<()> {
    let start = if feature == CREDITS { None } else { start };
    conn.prepare_cached("UPDATE leases SET consumed = MAX(0, consumed + ?4) WHERE user_id = ?1 AND feature = ?2 AND period_start IS ?3")?
        .execute(params![user, feature, start, units])?;
    Ok(())
}
