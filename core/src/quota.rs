//! The quota engine: `check`, `consume` (one immutable event, decided and recorded in one
//! transaction) and usage per window.
//!
//! Counters hold, per (user, feature, period, window start), the amount of this device's
//! unacknowledged events (`pending`, `pending_cost`) and the server's last total
//! (`server_used`): `used = server_used + pending`, plus the uses whose counters are not yet
//! written ([`crate::tail`]). Decisions read one counter row and the tail's sums; the ledger is
//! only scanned when a feature's rule, the user's timezone or billing anchor changes.

use crate::access::Access;
use crate::catalog::Rule;
use crate::credits::{credit_balance_at, draw_credits};
use crate::db::Tx;
use crate::decision::{Decision, Priced, Reason, RuleEffect, RuleState, decide_item_rule, decide_rule};
use crate::entitlements::Entitlements;
use crate::error::{Error, Result};
use crate::leases::LeaseUse;
use crate::ledger::{ConsumeItem, Counted, EventState, INSERT_EVENT, UsageMeta, Use, insert_event, replay, validate};
use crate::period::{Period, Window, window};
use crate::tail::{Delta, Tail};
use crate::timezone_history::TimezoneHistory;
use crate::{Change, Inner, Tally, from_ms, ms, write_tx};
use chrono::{DateTime, Utc};
use rusqlite::{Connection, OptionalExtension, params};
use serde::{Deserialize, Serialize};
use std::sync::{Arc, MutexGuard};

/// A user's usage of one feature in its current window.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Usage {
    /// Feature key.
    pub feature: String,
    /// Period of the rule (`None` for flags and credits).
    pub period: Option<Period>,
    /// Used in the window (micros for budgets, credits spent for credit rules).
    pub used: u64,
    /// Limit (`None` = unlimited).
    pub limit: Option<u64>,
    /// What is left (`None` = unlimited).
    pub remaining: Option<u64>,
    /// `max(0, used - limit)`.
    pub over_limit_by: u64,
    /// The sorted causes of the overage the server reported for this window (its total's
    /// `over_limit_causes`, as of the last sync); empty when none.
    #[serde(default)]
    pub over_limit_causes: Vec<String>,
    /// Window start.
    pub period_start: Option<DateTime<Utc>>,
    /// Window end (`None` = never resets).
    pub resets_at: Option<DateTime<Utc>>,
    /// Protocol 2: what this device's lease allows in the window (after its own releases);
    /// `None` without a lease (not a hard pool, or the user never held a device token).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub device_allowance: Option<u64>,
    /// Protocol 2: what this device's lease has left ("3 left on this phone" beside the
    /// account's `remaining`); `None` without a lease.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub device_remaining: Option<u64>,
}

/// What a decision is for.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Deciding {
    /// `check`: nothing is recorded.
    Check,
    /// A single use, recorded when allowed (a budget use always, the work was done).
    Consume,
    /// An item of a use with several meters, recorded when every item is allowed (a budget
    /// item only when its cost fits: the work is still to be done).
    Item,
}

/// How a decided use changes storage.
pub(crate) enum Effect {
    /// Add to a counter row.
    Count { period: String, start: i64, amount: u64, cost: u64 },
    /// Draw credits.
    Credits(u64),
    /// Nothing but the event.
    None,
}

/// The counter key of a counted rule: (period column, window) at `now`.
fn counter_window(rule: &Rule, a: &Access, now: DateTime<Utc>) -> Option<(String, Window)> {
    match rule {
        Rule::Metered { period, .. } | Rule::Budget { period, .. } => {
            Some((period.as_str().to_string(), window(*period, now, &a.zones, a.anchor)))
        }
        Rule::Rate { window_secs, .. } => Some(rate_window(*window_secs, now)),
        _ => None,
    }
}

/// The counter key and window of a rate rule at `now`: fixed windows of `window_secs` aligned
/// to the Unix epoch (per device, never synced).
fn rate_window(window_secs: u64, now: DateTime<Utc>) -> (String, Window) {
    let secs = i64::try_from(window_secs).unwrap_or(i64::MAX).max(1);
    let start = now.timestamp().div_euclid(secs) * secs;
    let s = DateTime::from_timestamp(start, 0).unwrap_or(now);
    (format!("rate:{secs}"), Window { start: s, end: DateTime::from_timestamp(start.saturating_add(secs), 0) })
}

/// What a counter row holds, as used by a decision: units and micros used in the window
/// (server total + this device's unacknowledged events, never below 0: a pending void of an
/// acknowledged use takes units back) and this device's unacknowledged leased units.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub(crate) struct Seen {
    /// `server_used + pending`.
    pub(crate) units: u64,
    /// `server_used + pending_cost`.
    pub(crate) micros: u64,
    /// `pending_leased` (negative while a void of an acknowledged leased use is pending).
    pub(crate) leased: i64,
}

/// (pending, pending_cost, server_used, pending_leased) of a counter row. The pending figures
/// may be negative (pending voids); a negative `server_used` is corruption: an error.
fn read_counter_raw(conn: &Connection, user: &str, feature: &str, period: &str, start: i64) -> Result<(i64, i64, i64, i64)> {
    Ok(conn
        .prepare_cached(
            "SELECT pending, pending_cost, server_used, pending_leased FROM counters WHERE user_id = ?1 AND feature = ?2 AND period = ?3 AND period_start = ?4",
        )?
        .query_row(params![user, feature, period, start], |r| {
            let server: i64 = r.get(2)?;
            crate::db::stored_count(server, &format!("counters.server_used of {feature:?} ({period} from {start})"))?;
            Ok((r.get(0)?, r.get(1)?, server, r.get(3)?))
        })
        .optional()?
        .unwrap_or((0, 0, 0, 0)))
}

fn signed_sum(a: i64, b: i64) -> u64 {
    u64::try_from((i128::from(a) + i128::from(b)).max(0)).unwrap_or(u64::MAX)
}

/// The [`Seen`] of a counter row and the tail's events after it (`tail`: from memory; `None`:
/// from the file). Zeros when absent.
fn seen(conn: &Connection, tail: Option<&Tail>, user: &str, feature: &str, period: &str, start: i64) -> Result<Seen> {
    let (pending, pending_cost, server, leased) = read_counter_raw(conn, user, feature, period, start)?;
    let d = match tail {
        Some(t) => t.get(user, feature, period, start),
        None => crate::tail::pending_delta(conn, user, feature, period, start)?,
    };
    Ok(Seen {
        units: signed_sum(server, pending.saturating_add(d.units)),
        micros: signed_sum(server, pending_cost.saturating_add(d.micros)),
        leased: leased.saturating_add(d.leased),
    })
}

/// The [`Seen`] of a counter row, with the events whose counters are not yet written.
pub(crate) fn read_counter(conn: &Connection, user: &str, feature: &str, period: &str, start: i64) -> Result<Seen> {
    seen(conn, None, user, feature, period, start)
}

/// Whether this device has uses of its own in one window that no server acknowledged yet
/// (units, micros or leased units pending, counted or still in the tail).
pub(crate) fn own_pending(conn: &Connection, user: &str, feature: &str, period: &str, start: i64) -> Result<bool> {
    let (pending, pending_cost, _, leased) = read_counter_raw(conn, user, feature, period, start)?;
    let d = crate::tail::pending_delta(conn, user, feature, period, start)?;
    Ok(pending.saturating_add(d.units) > 0 || pending_cost.saturating_add(d.micros) > 0 || leased.saturating_add(d.leased) != 0)
}

/// The server's causes of overage stored for one window (sorted, as the server sent them).
fn read_causes(conn: &Connection, user: &str, feature: &str, period: &str, start: i64) -> Result<Vec<String>> {
    let text: Option<String> = conn
        .prepare_cached("SELECT server_causes FROM counters WHERE user_id = ?1 AND feature = ?2 AND period = ?3 AND period_start = ?4")?
        .query_row(params![user, feature, period, start], |r| r.get(0))
        .optional()?;
    Ok(text.unwrap_or_default().split(',').filter(|c| !c.is_empty()).map(str::to_string).collect())
}

/// The counter rows a batch reads and what its uses add to them (their events carry it: see
/// [`crate::tail`]), so that each use is decided after the previous ones and a row is read
/// once per batch. A batch touches a handful of rows (one per feature and window), so they are
/// kept in a list found by comparing borrowed keys: a hit allocates nothing.
#[derive(Default)]
pub(crate) struct Batch<'t> {
    rows: Vec<((String, String, i64), CounterRow)>,
    /// The connection's tail, when the caller holds a valid one (else read from the file).
    tail: Option<&'t Tail>,
}

#[derive(Clone, Copy, Default)]
struct CounterRow {
    seen: Seen,
    add_amount: u64,
    add_cost: u64,
    add_leased: u64,
}

impl<'t> Batch<'t> {
    /// A batch that reads the tail from `tail`.
    pub(crate) fn with_tail(tail: &'t Tail) -> Batch<'t> {
        Batch { rows: Vec::new(), tail: Some(tail) }
    }

    fn find(&self, feature: &str, period: &str, start: i64) -> Option<usize> {
        self.rows.iter().position(|((f, p, s), _)| *s == start && f == feature && p == period)
    }

    fn row(&mut self, conn: &Connection, user: &str, feature: &str, period: &str, start: i64) -> Result<CounterRow> {
        Ok(match self.find(feature, period, start) {
            Some(i) => self.rows[i].1,
            None => {
                let r = CounterRow { seen: seen(conn, self.tail, user, feature, period, start)?, ..CounterRow::default() };
                self.rows.push(((feature.to_string(), period.to_string(), start), r));
                r
            }
        })
    }

    /// The [`Seen`] of a row, including what this batch added.
    pub(crate) fn read(&mut self, conn: &Connection, user: &str, feature: &str, period: &str, start: i64) -> Result<Seen> {
        let r = self.row(conn, user, feature, period, start)?;
        Ok(Seen {
            units: r.seen.units.saturating_add(r.add_amount),
            micros: r.seen.micros.saturating_add(r.add_cost),
            leased: r.seen.leased.saturating_add(i64::try_from(r.add_leased).unwrap_or(i64::MAX)),
        })
    }

    /// Counts a recorded use in row `key` (feature, period, window start): its units and
    /// micros, and its leased units.
    pub(crate) fn add(&mut self, conn: &Connection, user: &str, key: (&str, &str, i64), amount: u64, cost: u64, leased: u64) -> Result<()> {
        let (feature, period, start) = key;
        self.row(conn, user, feature, period, start)?;
        if let Some(i) = self.find(feature, period, start) {
            let r = &mut self.rows[i].1;
            r.add_amount += amount;
            r.add_cost += cost;
            r.add_leased += leased;
        }
        Ok(())
    }

    /// What the batch added, per row (for the connection's [`Tail`]).
    pub(crate) fn added(self) -> impl Iterator<Item = ((String, String, i64), Delta)> {
        self.rows.into_iter().filter_map(|(key, r)| {
            let d = Delta {
                units: i64::try_from(r.add_amount).unwrap_or(i64::MAX),
                micros: i64::try_from(r.add_cost).unwrap_or(i64::MAX),
                leased: i64::try_from(r.add_leased).unwrap_or(i64::MAX),
            };
            (d != Delta::default()).then_some((key, d))
        })
    }
}

/// Adds `units` (negative: takes back) to a row's `pending_leased`.
pub(crate) fn add_leased(conn: &Connection, user: &str, feature: &str, period: &str, start: i64, units: i64) -> Result<()> {
    conn.prepare_cached(
        "INSERT INTO counters (user_id, feature, period, period_start, pending_leased) VALUES (?1, ?2, ?3, ?4, ?5)
         ON CONFLICT (user_id, feature, period, period_start) DO UPDATE SET pending_leased = pending_leased + excluded.pending_leased",
    )?
    .execute(params![user, feature, period, start, units])?;
    Ok(())
}

pub(crate) fn add_counter(conn: &Connection, user: &str, feature: &str, period: &str, start: i64, amount: i64, cost: i64) -> Result<()> {
    conn.prepare_cached(
        "INSERT INTO counters (user_id, feature, period, period_start, pending, pending_cost) VALUES (?1, ?2, ?3, ?4, ?5, ?6)
         ON CONFLICT (user_id, feature, period, period_start) DO UPDATE SET pending = pending + excluded.pending,
           pending_cost = pending_cost + excluded.pending_cost",
    )?
    .execute(params![user, feature, period, start, amount, cost])?;
    Ok(())
}

/// The counter key (period, window start ms) an event of `feature` at `at` (ms) counts under,
/// from the rule the counters are kept for; `None` when the feature has no counters.
pub(crate) fn event_window(conn: &Connection, user: &str, feature: &str, at: i64) -> Result<Option<(String, i64)>> {
    let rule: Option<(String, String, i64)> = conn
        .prepare_cached("SELECT period, tz, anchor FROM counter_rules WHERE user_id = ?1 AND feature = ?2")?
        .query_row([user, feature], |r| Ok((r.get(0)?, r.get(1)?, r.get(2)?)))
        .optional()?;
    let Some((period, tz, anchor)) = rule else { return Ok(None) };
    let Ok(p) = period.parse::<Period>() else { return Ok(None) };
    let zones =
        if tz.is_empty() { TimezoneHistory::fixed(chrono_tz::UTC) } else { TimezoneHistory::from_key(&tz).map_err(Error::invalid)? };
    Ok(Some((period, ms(window(p, from_ms(at), &zones, from_ms(anchor)).start))))
}

/// The (timezone history key, anchor) a period's windows depend on, normalised so that
/// irrelevant changes do not trigger rebuilds.
fn rule_key(period: Period, a: &Access) -> (String, i64) {
    match period {
        Period::Day | Period::Week | Period::Month | Period::Year => (a.zones.key(), 0),
        Period::Billing => (String::new(), ms(a.anchor)),
        _ => (String::new(), 0),
    }
}

impl Tally {
    /// The current decision time (never before the highest time seen), remembered as the new
    /// highest time seen: in memory at once, in the file when it moved on by a second or more.
    /// A check or a usage read at a later time must keep a clock moved backwards afterwards from
    /// reopening a past window, like a consume does.
    pub(crate) fn observe_now(&self, inner: &mut Inner) -> DateTime<Utc> {
        let now = self.now(inner);
        let t = ms(now);
        if t >= inner.highest_stored_ms.saturating_add(1000) {
            // Best effort, at most once a second: the guard's floor may lag by that much.
            if inner
                .conn
                .prepare_cached("UPDATE device SET highest_seen_ms = MAX(highest_seen_ms, ?1) WHERE singleton = 1")
                .and_then(|mut st| st.execute([t]))
                .is_ok()
            {
                inner.highest_stored_ms = t;
            }
        }
        inner.highest_seen_ms = inner.highest_seen_ms.max(t);
        now
    }

    /// Makes sure the counters of `feature` are kept for `period` in the user's current zone and
    /// anchor; rebuilds them from the unacknowledged events when not (a rule, timezone or
    /// billing change). The only ledger scan, off the hot path.
    pub(crate) fn ensure_counters(inner: &mut Inner, user: &str, feature: &str, period: Period, a: &Access) -> Result<()> {
        if inner.verified.get(user).is_some_and(|f| f.contains(feature)) {
            return Ok(());
        }
        let (tz, anchor) = rule_key(period, a);
        let current: Option<(String, String, i64)> = inner
            .conn
            .prepare_cached("SELECT period, tz, anchor FROM counter_rules WHERE user_id = ?1 AND feature = ?2")?
            .query_row([user, feature], |r| Ok((r.get(0)?, r.get(1)?, r.get(2)?)))
            .optional()?;
        if current.as_ref() != Some(&(period.as_str().to_string(), tz.clone(), anchor)) {
            write_tx(&mut inner.conn, |tx| {
                tx.execute(
                    "UPDATE counters SET pending = 0, pending_cost = 0 WHERE user_id = ?1 AND feature = ?2 AND period NOT LIKE 'rate:%'",
                    [user, feature],
                )?;
                let events: Vec<(i64, i64, i64)> = tx
                    .prepare(concat!(
                        "SELECT COALESCE(target_at, occurred_at), CASE WHEN voids IS NULL THEN amount ELSE -amount END,
                                CASE WHEN voids IS NULL THEN COALESCE(cost_micros, 0) ELSE -COALESCE(cost_micros, 0) END
                         FROM events WHERE ",
                        crate::ledger::from_pending!(),
                        " AND user_id = ?1 AND feature = ?2 AND status = ?3 AND voided = 0"
                    ))?
                    .query_map(params![user, feature, EventState::Pending], |r| Ok((r.get(0)?, r.get(1)?, r.get(2)?)))?
                    .collect::<rusqlite::Result<_>>()?;
                for (at, amount, cost) in events {
                    let w = window(period, from_ms(at), &a.zones, a.anchor);
                    add_counter(tx, user, feature, period.as_str(), ms(w.start), amount, cost)?;
                }
                tx.execute(
                    "INSERT INTO counter_rules (user_id, feature, period, tz, anchor) VALUES (?1, ?2, ?3, ?4, ?5)
                     ON CONFLICT (user_id, feature) DO UPDATE SET period = excluded.period, tz = excluded.tz, anchor = excluded.anchor",
                    params![user, feature, period.as_str(), tz, anchor],
                )?;
                Ok(())
            })?;
        }
        inner.verified.entry(user.to_string()).or_default().insert(feature.to_string());
        Ok(())
    }
    /// Decides a use without changing anything. Returns the decision and, when it is allowed,
    /// what recording it changes.
    /// Counters of the feature must have been ensured ([`Tally::ensure_counters`]).
    #[allow(clippy::too_many_arguments)]
    pub(crate) fn decide(
        &self,
        conn: &Connection,
        batch: &mut Batch,
        a: &Access,
        user: &str,
        u: &Use<'_>,
        now: DateTime<Utc>,
        mode: Deciding,
    ) -> Result<(Decision, Option<Effect>, Option<LeaseUse>)> {
        let record = mode != Deciding::Check;
        let reason = a.ent.access_reason.as_str();
        let Some(rule) = a.ent.features.get(u.feature) else {
            let r = if Tally::feature_known(&self.catalog(), &a.ent, u.feature) { Reason::NotInPlan } else { Reason::UnknownFeature };
            return Ok((Decision::simple(false, r, reason), None, None));
        };
        let priced = match u.model.map(|m| a.ent.models.get(m)) {
            None => Priced::NoModel,
            Some(None) => Priced::UnknownModel,
            Some(Some(p)) => Priced::Cost(p.cost_micros(u.input_tokens.unwrap_or(0), u.output_tokens.unwrap_or(0))?),
        };
        let mut state = RuleState::default();
        let mut counter = None;
        match rule {
            Rule::Credits { .. } => state.balance = credit_balance_at(conn, user, now)?,
            Rule::Metered { .. } | Rule::Budget { .. } | Rule::Rate { .. } => {
                let (pkey, w) = counter_window(rule, a, now).unwrap_or_else(|| (String::new(), Window { start: now, end: None }));
                let start = ms(w.start);
                let seen = batch.read(conn, user, u.feature, &pkey, start)?;
                state.used = if matches!(rule, Rule::Budget { .. }) { seen.micros } else { seen.units };
                state.resets_at = w.end;
                counter = Some((pkey, start, seen.units, seen.micros, seen.leased));
            }
            Rule::Flag { .. } => {}
        }
        let (mut d, effect) = match mode {
            Deciding::Item => decide_item_rule(rule, u.amount, priced, state, reason)?,
            Deciding::Check | Deciding::Consume => decide_rule(rule, u.amount, priced, state, reason, record)?,
        };
        let pool_counter = counter.as_ref().map(|(_, start, _, _, leased)| (*start, *leased));
        let mut effect = match (effect, counter) {
            (Some(RuleEffect::Count { amount, cost }), Some((period, start, units, micros, _))) => {
                if record {
                    // The row keeps both columns: each must stay in range.
                    crate::contract::checked_sum(u.feature, units, amount)?;
                    crate::contract::checked_sum(u.feature, micros, cost)?;
                }
                Some(Effect::Count { period, start, amount, cost })
            }
            (Some(RuleEffect::Credits(need)), _) => Some(Effect::Credits(need)),
            (Some(RuleEffect::None), _) => Some(Effect::None),
            _ => None,
        };
        // Protocol 2: a hard pool also needs room in this device's lease.
        let mut lease_use = None;
        if let Some(view) = self.lease_view(conn, batch, a, user, u.feature, rule, now, pool_counter)? {
            let measured = match (&effect, rule) {
                (Some(Effect::Count { cost, .. }), Rule::Budget { .. }) => Some(*cost),
                (Some(Effect::Count { amount, .. }), _) => Some(*amount),
                (Some(Effect::Credits(need)), _) => Some(*need),
                _ => None,
            };
            match measured {
                Some(units) if d.reason == Reason::Ok && !crate::lease::fits(view.allowance, view.units, units) => {
                    // The account has room, the lease has not: nothing recorded.
                    let (shown, _) = decide_rule(rule, u.amount, priced, state, reason, false)?;
                    d = Decision { allowed: false, reason: Reason::LeaseExhausted, ..shown };
                    d.device_remaining = Some(view.allowance.saturating_sub(view.units));
                    // The app wants this pool: the next sync asks for the units refused.
                    self.lease_asks.note(user, &view.pool, units);
                    effect = None;
                }
                Some(units) if d.reason == Reason::Ok => {
                    let after = if record { view.units.saturating_add(units) } else { view.units };
                    d.device_remaining = Some(view.allowance.saturating_sub(after));
                    lease_use = Some(LeaseUse { ver: view.ver, pool: view.pool, units });
                }
                _ => d.device_remaining = Some(view.allowance.saturating_sub(view.units)),
            }
        }
        Ok((d, effect, lease_use))
    }

    /// Asks whether `amount` units of `feature` may be used now, changing nothing. For budget
    /// rules, `amount` is the estimated cost in micros.
    pub fn check(&self, user_id: &str, feature: &str, amount: u64) -> Result<Decision> {
        let meta = UsageMeta::default();
        let u = validate(feature, amount, &meta)?;
        if let Some(d) = self.check_fast(user_id, &u)? {
            return Ok(d);
        }
        let (g, a, now) = self.prepare_uses(user_id, std::slice::from_ref(&u))?;
        Ok(self.decide(&g.conn, &mut Batch::default(), &a, user_id, &u, now, Deciding::Check)?.0)
    }

    /// The common `check`: access cached, counters verified, no clock write due. Reads the
    /// change counter (`PRAGMA data_version`) and the counter row in **one** read transaction
    /// (one WAL read lock instead of two), the tail from memory. `None`: take the full path.
    fn check_fast(&self, user_id: &str, u: &Use<'_>) -> Result<Option<Decision>> {
        let mut g = self.inner.lock().unwrap_or_else(|e| e.into_inner());
        let inner = &mut *g;
        let tx = Tx::deferred(&inner.conn)?;
        let Some((a, now, version)) = self.fast_gate(&tx, inner, user_id, std::slice::from_ref(u))? else {
            return Ok(None);
        };
        let fresh = fresh_tail(&tx, &mut inner.tail, version)?;
        let tail = &*inner.tail.insert(fresh);
        let d = self.decide(&tx, &mut Batch::with_tail(tail), &a, user_id, u, now, Deciding::Check)?.0;
        tx.commit()?;
        inner.highest_seen_ms = inner.highest_seen_ms.max(ms(now));
        Ok(Some(d))
    }

    /// Whether `uses` can be decided without the full path, inside the transaction `tx` just
    /// begun: nothing written by another connection since the caches were filled, access
    /// cached, counters verified, no plan credits to store, no clock write due. Returns the
    /// access, the decision time and the change counter.
    fn fast_gate(&self, tx: &Connection, inner: &Inner, user_id: &str, uses: &[Use<'_>]) -> Result<Option<Gated>> {
        let version: i64 = tx.prepare_cached("PRAGMA data_version")?.query_row([], |r| r.get(0))?;
        if version != inner.data_version {
            return Ok(None);
        }
        let now = self.now(inner);
        if ms(now) >= inner.highest_stored_ms.saturating_add(1000) {
            return Ok(None);
        }
        let Some(a) = inner.access.get(user_id).filter(|a| now < a.valid_until).cloned() else { return Ok(None) };
        for u in uses {
            match a.ent.features.get(u.feature) {
                // Plan credits may be due: the full path stores them.
                Some(Rule::Credits { .. }) => return Ok(None),
                Some(r) if r.period().is_some() && !inner.verified.get(user_id).is_some_and(|f| f.contains(u.feature)) => {
                    return Ok(None);
                }
                _ => {}
            }
        }
        Ok(Some((a, now, version)))
    }

    /// Atomically checks and records a use: one ledger event in one transaction (it counts at
    /// once; its counter rows are written with later ones), or nothing when denied. Replaying the same idempotency key returns the
    /// original decision; the same key with another body is [`Error::IdempotencyConflict`].
    pub fn consume(&self, user_id: &str, feature: &str, amount: u64, meta: UsageMeta) -> Result<Decision> {
        let item = ConsumeItem { feature: feature.to_string(), amount, meta };
        let mut out = self.consume_many(user_id, std::slice::from_ref(&item))?;
        Ok(out.pop().unwrap_or_else(|| Decision::simple(false, Reason::UnknownFeature, "free")))
    }

    /// Decides and records several uses in one transaction (group commit), each decided in
    /// order after the previous ones. Any invalid item fails the whole batch, recording nothing.
    pub fn consume_many(&self, user_id: &str, items: &[ConsumeItem]) -> Result<Vec<Decision>> {
        let uses = items.iter().map(|i| validate(&i.feature, i.amount, &i.meta)).collect::<Result<Vec<_>>>()?;
        if let Some(out) = self.consume_fast(user_id, items, &uses)? {
            return Ok(out);
        }
        let (mut g, a, now) = self.prepare_uses(user_id, &uses)?;
        let inner = &mut *g;
        let tx = Tx::immediate(&inner.conn)?;
        let version = tx.prepare_cached("PRAGMA data_version")?.query_row([], |r| r.get(0))?;
        let any = self.record_uses(tx, &inner.device_id, &mut inner.tail, version, &a, user_id, items, &uses, now)?;
        Ok(self.after_record(g, user_id, any, now))
    }

    /// The full path before the transaction of `uses`: the lock, the decision time, the user's
    /// access, each feature's counters kept for its rule (a rebuild when not) and the plan
    /// credits stored when a use draws credits.
    pub(crate) fn prepare_uses(&self, user_id: &str, uses: &[Use<'_>]) -> Result<(MutexGuard<'_, Inner>, Arc<Access>, DateTime<Utc>)> {
        let mut g = self.lock();
        let now = self.observe_now(&mut g);
        let a = self.access(&mut g, user_id, now)?;
        for u in uses {
            if let Some(p) = a.ent.features.get(u.feature).and_then(Rule::period) {
                Tally::ensure_counters(&mut g, user_id, u.feature, p, &a)?;
            }
        }
        if uses.iter().any(|u| matches!(a.ent.features.get(u.feature), Some(Rule::Credits { .. }))) {
            self.ensure_plan_credits(&mut g, user_id, &a, now)?;
        }
        Ok((g, a, now))
    }

    /// The common `consume`: [`Tally::fast_gate`] inside the write transaction, so the change
    /// counter costs no read lock of its own. `None`: take the full path.
    fn consume_fast(&self, user_id: &str, items: &[ConsumeItem], uses: &[Use<'_>]) -> Result<Option<Vec<Decision>>> {
        let mut g = self.inner.lock().unwrap_or_else(|e| e.into_inner());
        let inner = &mut *g;
        let tx = Tx::immediate(&inner.conn)?;
        let Some((a, now, version)) = self.fast_gate(&tx, inner, user_id, uses)? else {
            return Ok(None);
        };
        let any = self.record_uses(tx, &inner.device_id, &mut inner.tail, version, &a, user_id, items, uses, now)?;
        Ok(Some(self.after_record(g, user_id, any, now)))
    }

    /// After a committed batch: the decision time seen, then the observer told, unlocked.
    fn after_record(&self, mut g: MutexGuard<'_, Inner>, user_id: &str, r: Recorded, now: DateTime<Utc>) -> Vec<Decision> {
        g.highest_seen_ms = g.highest_seen_ms.max(ms(now));
        drop(g);
        if r.any {
            self.notify(user_id, Change { usage: true, ..Change::default() });
        }
        r.decisions
    }

    /// Decides and records `uses` in `tx` (its change counter `version`), numbering them after
    /// the connection's tail (`tail`, read again unless still valid), and commits. Their counters
    /// wait in the tail, written here once [`crate::tail::WRITE_AT`] events wait.
    #[allow(clippy::too_many_arguments)]
    fn record_uses(
        &self,
        tx: Tx<'_>,
        device_id: &str,
        tail: &mut Option<Tail>,
        version: i64,
        a: &Access,
        user_id: &str,
        items: &[ConsumeItem],
        uses: &[Use<'_>],
        now: DateTime<Utc>,
    ) -> Result<Recorded> {
        // Taken out while in use: on any error it stays out, and is read again next time.
        let t = fresh_tail(&tx, tail, version)?;
        let mut decisions = Vec::with_capacity(uses.len());
        let mut recorded = false;
        let mut seq = t.seq;
        let mut batch = Batch::with_tail(&t);
        let mut insert = tx.prepare_cached(INSERT_EVENT)?;
        for (u, item) in uses.iter().zip(items) {
            // Only a caller-supplied key can name a recorded event (an unkeyed use's id is made
            // when it is recorded).
            if item.meta.idempotency_key.is_some()
                && let Some(d) = replay(&tx, user_id, u)?
            {
                decisions.push(d);
                continue;
            }
            let (d, effect, lease_use) = self.decide(&tx, &mut batch, a, user_id, u, now, Deciding::Consume)?;
            if let Some(effect) = effect {
                seq += 1;
                record(&tx, &mut insert, &mut batch, user_id, device_id, u, &d, &effect, lease_use.as_ref(), now, &a.ent, seq)?;
                recorded = true;
            }
            decisions.push(d);
        }
        drop(insert);
        let added: Vec<_> = batch.added().collect();
        commit_recorded(tx, tail, t, &added, user_id, seq, version)?;
        Ok(Recorded { decisions, any: recorded })
    }
}

/// Commits uses recorded in `tx` (its change counter `version`) through sequence number `seq`,
/// with what they `added` to counter rows kept in the connection's tail `t` (their counters are
/// written here once [`crate::tail::WRITE_AT`] events wait); `t` goes back to `tail`, valid.
pub(crate) fn commit_recorded(
    tx: Tx<'_>,
    tail: &mut Option<Tail>,
    mut t: Tail,
    added: &[((String, String, i64), Delta)],
    user_id: &str,
    seq: i64,
    version: i64,
) -> Result<()> {
    for ((feature, period, start), d) in added {
        t.add(user_id, feature, period, *start, *d);
    }
    t.seq = seq;
    if seq - t.through >= crate::tail::WRITE_AT {
        t.written(crate::tail::write_counters(&tx)?);
    }
    // `highest_seen_ms` is stored by `observe_now` (at most once a second), not per use.
    let conn = tx.connection();
    tx.commit()?;
    t.seal(conn, version);
    *tail = Some(t);
    Ok(())
}

/// The connection's tail, taken out of `tail`: as it is while still valid, else read again from
/// the file (inside the caller's transaction, whose change counter is `version`).
pub(crate) fn fresh_tail(conn: &Connection, tail: &mut Option<Tail>, version: i64) -> Result<Tail> {
    match tail.take() {
        Some(t) if t.valid(conn, version) => Ok(t),
        _ => Tail::load(conn, version),
    }
}

impl Tally {
    /// A user's usage of `feature` in its current window.
    pub fn usage(&self, user_id: &str, feature: &str) -> Result<Usage> {
        let mut g = self.lock();
        let now = self.observe_now(&mut g);
        let a = self.access(&mut g, user_id, now)?;
        let rule = a
            .ent
            .features
            .get(feature)
            .cloned()
            .ok_or_else(|| Error::NotFound(format!("feature {feature:?} in the plan of user {user_id}")))?;
        let mut usage = Usage {
            feature: feature.into(),
            period: rule.period(),
            used: 0,
            limit: rule.limit(),
            remaining: None,
            over_limit_by: 0,
            over_limit_causes: Vec::new(),
            period_start: None,
            resets_at: None,
            device_allowance: None,
            device_remaining: None,
        };
        if let Some(view) = self.lease_view(&g.conn, &mut Batch::default(), &a, user_id, feature, &rule, now, None)? {
            usage.device_allowance = Some(view.allowance);
            usage.device_remaining = Some(view.allowance.saturating_sub(view.units));
        }
        if let Some(p) = rule.period() {
            Tally::ensure_counters(&mut g, user_id, feature, p, &a)?;
        }
        match counter_window(&rule, &a, now) {
            Some((pkey, w)) => {
                let seen = read_counter(&g.conn, user_id, feature, &pkey, ms(w.start))?;
                usage.used = if matches!(rule, Rule::Budget { .. }) { seen.micros } else { seen.units };
                usage.over_limit_causes = read_causes(&g.conn, user_id, feature, &pkey, ms(w.start))?;
                usage.period_start = Some(w.start);
                usage.resets_at = w.end;
            }
            None if matches!(rule, Rule::Credits { .. }) => {
                self.ensure_plan_credits(&mut g, user_id, &a, now)?;
                let balance = credit_balance_at(&g.conn, user_id, now)?;
                usage.remaining = Some(balance.max(0) as u64);
                usage.over_limit_by = if balance < 0 { balance.unsigned_abs() } else { 0 };
                if usage.over_limit_by > 0 {
                    // The server's causes of the credit pool's overage (its `$credits` total).
                    usage.over_limit_causes = read_causes(&g.conn, user_id, crate::lease::CREDITS, crate::lease::CREDITS_PERIOD, 0)?;
                }
                return Ok(usage);
            }
            None => {}
        }
        usage.remaining = usage.limit.map(|l| l.saturating_sub(usage.used));
        usage.over_limit_by = usage.limit.map_or(0, |l| usage.used.saturating_sub(l));
        Ok(usage)
    }
}

/// What [`Tally::fast_gate`] lets through: the access, the decision time and the change counter.
type Gated = (Arc<Access>, DateTime<Utc>, i64);

/// What a committed batch decided: its decisions, and whether it recorded any use.
struct Recorded {
    decisions: Vec<Decision>,
    any: bool,
}

/// Records a decided use: its event, then what it changes (a counter, a credit draw).
#[allow(clippy::too_many_arguments)]
pub(crate) fn record(
    tx: &Connection,
    insert: &mut rusqlite::Statement<'_>,
    batch: &mut Batch,
    user: &str,
    device: &str,
    u: &Use<'_>,
    d: &Decision,
    effect: &Effect,
    lease: Option<&LeaseUse>,
    now: DateTime<Utc>,
    ent: &Entitlements,
    seq: i64,
) -> Result<()> {
    let cost = match effect {
        Effect::Count { cost, .. } if *cost > 0 => Some(*cost),
        _ => u
            .model
            .and_then(|m| ent.models.get(m))
            .map(|p| p.cost_micros(u.input_tokens.unwrap_or(0), u.output_tokens.unwrap_or(0)))
            .transpose()?,
    };
    let counted = match effect {
        Effect::Count { period, start, amount, cost } => Some(Counted { period, start: *start, amount: *amount, cost: *cost }),
        _ => None,
    };
    insert_event(insert, user, device, u, d, cost, counted.as_ref(), lease, now, seq)?;
    if let Some(l) = lease {
        batch.add(tx, user, (&l.pool.feature, &l.pool.period, l.pool.counter_start()), 0, 0, l.units)?;
    }
    match effect {
        Effect::Count { period, start, amount, cost } => batch.add(tx, user, (u.feature, period, *start), *amount, *cost, 0)?,
        Effect::Credits(need) => draw_credits(tx, user, *need, now)?,
        Effect::None => {}
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn rate_windows_are_epoch_aligned_and_never_empty() {
        let at = DateTime::from_timestamp(1_700_000_059, 0).unwrap();
        let (key, w) = rate_window(60, at);
        assert_eq!(key, "rate:60");
        assert_eq!((w.start.timestamp(), w.end.map(|e| e.timestamp())), (1_700_000_040, Some(1_700_000_100)));
        let (key, w) = rate_window(0, at);
        assert_eq!((key.as_str(), w.start, w.end.map(|e| e.timestamp())), ("rate:1", at, Some(1_700_000_060)), "0 s means 1 s");
    }
}
