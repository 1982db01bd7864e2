//! Voids (protocol 2): cancelling a recorded use. A void is an event of its own (`voids` = the
//! target's id) recorded in one transaction with taking the target's units out of the local
//! counters — in the target's own window, its leased units back to this device's allowance,
//! the credits it drew returned.
//!
//! A void of a use with several meters is one event on the wire (`voids` = the use id), kept
//! here as one row per item it cancels (`voids` = the item's id, `use_id` = the void's wire id):
//! each row takes its own item out of its own counters and pool, and is settled, refused and
//! restored like a void of a single use.

use crate::error::{Error, Result};
use crate::ledger::{EventState, event_id_for_key};
use crate::quota::{add_counter, add_leased, event_window};
use crate::{Change, Tally, ms, write_tx};
use chrono::{DateTime, Utc};
use rusqlite::{Connection, OptionalExtension, params};

/// Source of the credit grant that returns a voided use's credits.
pub const VOID_SOURCE: &str = "void";

/// Returns `credits` drawn by the use a void event `void_id` cancels: a grant of its own
/// (`void:<id>`, never expiring, replaced with the server's grants at the next token), which
/// first pays any debt.
pub(crate) fn refund_credits(conn: &Connection, user: &str, void_id: &str, credits: u64, now: DateTime<Utc>) -> Result<()> {
    let n = i64::try_from(credits).map_err(|_| Error::invalid("credits out of range"))?;
    conn.execute(
        "INSERT OR REPLACE INTO credit_grants (user_id, id, remaining, expires_at, source) VALUES (?1, ?2, ?3, NULL, ?4)",
        params![user, format!("void:{void_id}"), n, VOID_SOURCE],
    )?;
    crate::credits::settle_debt(conn, user, now)
}

/// (device_seq, feature, amount, occurred_at, cost, status, lease pool, period, start, units)
/// of a voided target, and the leased units its void carried.
type RestoredRow = (i64, String, i64, i64, i64, EventState, Option<String>, Option<String>, Option<i64>, i64, i64);

/// After the server refused the void event `void_id` (`void_not_allowed`, `unknown_event`, …):
/// its target counts again here, as it does on the server. A target settled before the void got
/// its units back when the void was quarantined (the void carried them); one settled in the same
/// round puts its leased units in the lease entry's `consumed`; a target still pending is put
/// back in its window's counters and its lease pool. Inside a [`write_tx`].
pub(crate) fn restore_target(tx: &Connection, user_id: &str, void_id: &str) -> Result<()> {
    // The void's own row, or the rows of a void of a use (one per item).
    let rows: Vec<RestoredRow> = tx
        .prepare_cached(
            "SELECT t.device_seq, t.feature, t.amount, t.occurred_at, COALESCE(t.cost_micros, 0), t.status, t.lease_pool, t.lease_period,
                    t.lease_start, t.lease_units, v.lease_units
             FROM events v JOIN events t ON t.user_id = v.user_id AND t.id = v.voids
             WHERE v.user_id = ?1 AND (v.id = ?2 OR (v.use_id = ?2 AND v.voids IS NOT NULL)) AND t.voided = 1",
        )?
        .query_map(params![user_id, void_id], |r| {
            Ok((r.get(0)?, r.get(1)?, r.get(2)?, r.get(3)?, r.get(4)?, r.get(5)?, r.get(6)?, r.get(7)?, r.get(8)?, r.get(9)?, r.get(10)?))
        })?
        .collect::<rusqlite::Result<_>>()?;
    for row in rows {
        restore_one(tx, user_id, row)?;
    }
    Ok(())
}

/// A voided target of a refused void counts again (see [`restore_target`]).
fn restore_one(tx: &Connection, user_id: &str, row: RestoredRow) -> Result<()> {
    let (seq, feature, amount, at, cost, status, pool, pool_period, pool_start, lease_units, carried_units) = row;
    match status {
        EventState::Pending => {
            if let Some((period, start)) = event_window(tx, user_id, &feature, at)? {
                add_counter(tx, user_id, &feature, &period, start, amount, cost)?;
            }
            if let (Some(pool), Some(period)) = (&pool, &pool_period)
                && lease_units > 0
            {
                add_leased(tx, user_id, pool, period, pool_start.unwrap_or(0), lease_units)?;
            }
        }
        // Acknowledged in the round that refused the void, its leased units skipped the lease
        // entry's `consumed` (it was voided then): they count there now. (A void of a target
        // acknowledged before carried its units, and gave them back when quarantined.)
        EventState::Settled => {
            if let Some(pool) = &pool
                && lease_units > 0
                && carried_units == 0
            {
                crate::leases::settled_leased(tx, user_id, pool, pool_start, lease_units)?;
            }
        }
        EventState::Rejected => {}
    }
    tx.prepare_cached("UPDATE events SET voided = 0 WHERE device_seq = ?1")?.execute([seq])?;
    Ok(())
}

impl Tally {
    /// Cancels the recorded use `event_id` (an id or idempotency key) of `user_id`: records a
    /// void event (synced as `{"id", "voids", "occurred_at", "device_seq", "metadata"?}`, with
    /// `{"reason": …}` as metadata when given) and, in the same transaction, takes the use out
    /// of the local counters of its own window (leased units come back to this device's
    /// allowance; credits it drew are returned). The id of a use with several meters
    /// ([`Tally::consume_items`]) cancels every item of it, with one void event whose `voids`
    /// is the use id. Voiding twice records nothing more (`Ok`).
    /// An unknown id is [`Error::NotFound`]; a void event, or a use the server refused
    /// (quarantined), is [`Error::InvalidInput`]; nothing changes then. A void the server
    /// refuses (`void_not_allowed`: the use was recorded by another device or by a backend) is
    /// quarantined with that reason (listed in the sync's `rejected`), and the use counts again.
    pub fn void(&self, user_id: &str, event_id: &str, reason: Option<&str>) -> Result<()> {
        let metadata = match reason {
            Some(r) => crate::contract::metadata(Some(&serde_json::json!({ "reason": r })))?,
            None => None,
        };
        let target_id = event_id_for_key(event_id).to_string();
        let mut g = self.lock();
        let now = self.observe_now(&mut g);
        let a = self.access(&mut g, user_id, now)?;
        let device_id = g.device_id.clone();
        let voiding = Voiding { user_id, device_id: &device_id, now, metadata, ent: &a.ent };
        let done = write_tx(&mut g.conn, |tx| match crate::ledger::find_event(tx, user_id, &target_id)? {
            Some(seq) => voiding.void_event(tx, seq, event_id, &target_id),
            None => voiding.void_use(tx, event_id, &target_id),
        })?;
        drop(g);
        if done {
            self.notify(user_id, Change { usage: true, ..Change::default() });
        }
        Ok(())
    }
}

/// One void being recorded: who, on which device, when, with what metadata, under which rules.
struct Voiding<'a> {
    user_id: &'a str,
    device_id: &'a str,
    now: DateTime<Utc>,
    metadata: Option<String>,
    ent: &'a crate::Entitlements,
}

/// What a void needs of its target: (feature, amount, occurred_at, cost, status, voids,
/// lease_ver, lease pool, period, start, units).
type Target = (String, i64, i64, i64, EventState, Option<String>, Option<i64>, Option<String>, Option<String>, Option<i64>, i64);

fn target_row(tx: &Connection, seq: i64) -> Result<Option<Target>> {
    Ok(tx
        .query_row(
            "SELECT feature, amount, occurred_at, COALESCE(cost_micros, 0), status, voids, lease_ver, lease_pool,
                    lease_period, lease_start, lease_units FROM events WHERE device_seq = ?1",
            [seq],
            |r| {
                Ok((
                    r.get(0)?,
                    r.get(1)?,
                    r.get(2)?,
                    r.get(3)?,
                    r.get(4)?,
                    r.get(5)?,
                    r.get(6)?,
                    r.get(7)?,
                    r.get(8)?,
                    r.get(9)?,
                    r.get(10)?,
                ))
            },
        )
        .optional()?)
}

fn already_voided(tx: &Connection, user_id: &str, target_id: &str) -> Result<bool> {
    Ok(tx.query_row("SELECT EXISTS (SELECT 1 FROM events WHERE user_id = ?1 AND voids = ?2)", params![user_id, target_id], |r| r.get(0))?)
}

impl Voiding<'_> {
    /// Voids the single event at `seq` (`target_id`, named `event_id` by the caller). Returns
    /// whether a void was recorded.
    fn void_event(&self, tx: &Connection, seq: i64, event_id: &str, target_id: &str) -> Result<bool> {
        let target = target_row(tx, seq)?.ok_or_else(|| Error::NotFound(format!("event {event_id}")))?;
        if target.5.is_some() {
            return Err(Error::invalid(format!("event {event_id} is a void event: it cannot be voided")));
        }
        if target.4 == EventState::Rejected {
            return Err(Error::invalid(format!("event {event_id} was refused (quarantined): it counts nowhere, there is nothing to void")));
        }
        if already_voided(tx, self.user_id, target_id)? {
            return Ok(false);
        }
        let void_seq = crate::ledger::last_seq(tx)? + 1;
        let (void_id, indexed) = match crate::ledger::sequenced_id(self.now, void_seq) {
            Some(id) => (id.to_string(), false),
            None => (uuid::Uuid::now_v7().to_string(), true),
        };
        self.cancel(tx, seq, &target, target_id, &void_id, None, void_seq, indexed)?;
        Ok(true)
    }

    /// Voids every item of the use `use_id` (named `event_id` by the caller) not voided yet,
    /// under one void id. Returns whether a void was recorded.
    fn void_use(&self, tx: &Connection, event_id: &str, use_id: &str) -> Result<bool> {
        let items: Vec<(i64, String)> = tx
            .prepare_cached("SELECT device_seq, id FROM events WHERE user_id = ?1 AND use_id = ?2 AND voids IS NULL ORDER BY device_seq")?
            .query_map(params![self.user_id, use_id], |r| Ok((r.get(0)?, r.get(1)?)))?
            .collect::<rusqlite::Result<_>>()?;
        if items.is_empty() {
            return Err(Error::NotFound(format!("event {event_id}")));
        }
        let void_id = uuid::Uuid::now_v7();
        let mut refused = 0;
        let mut recorded = false;
        for (seq, item_id) in &items {
            let target = target_row(tx, *seq)?.ok_or_else(|| Error::NotFound(format!("event {event_id}")))?;
            if target.4 == EventState::Rejected {
                refused += 1;
                continue;
            }
            if already_voided(tx, self.user_id, item_id)? {
                continue;
            }
            let row_id = crate::contract::item_event_id(void_id, &target.0).to_string();
            let void_seq = crate::ledger::last_seq(tx)? + 1;
            self.cancel(tx, *seq, &target, item_id, &row_id, Some(&void_id.to_string()), void_seq, true)?;
            recorded = true;
        }
        if refused == items.len() {
            return Err(Error::invalid(format!("use {event_id} was refused (quarantined): it counts nowhere, there is nothing to void")));
        }
        Ok(recorded)
    }

    /// Records the void row `void_id` (sequence number `void_seq`; part of the void of a use
    /// `void_of_use`) of the target at `seq` (`target_id`) and takes the target out of the
    /// counters now. A pending target stops counting itself (and is still sent); an
    /// acknowledged one is in the server's totals: the void carries the units it takes back
    /// until the server acknowledges it.
    #[allow(clippy::too_many_arguments)]
    fn cancel(
        &self,
        tx: &Connection,
        seq: i64,
        target: &Target,
        target_id: &str,
        void_id: &str,
        void_of_use: Option<&str>,
        void_seq: i64,
        indexed: bool,
    ) -> Result<()> {
        let (feature, amount, at, cost, status, _, lease_ver, pool, pool_period, pool_start, lease_units) = target;
        let user_id = self.user_id;
        if let Some((period, start)) = event_window(tx, user_id, feature, *at)? {
            add_counter(tx, user_id, feature, &period, start, -amount, -cost)?;
        }
        if let (Some(pool), Some(period)) = (pool, pool_period)
            && *lease_units > 0
        {
            add_leased(tx, user_id, pool, period, pool_start.unwrap_or(0), -lease_units)?;
        }
        let carried = *status == EventState::Settled;
        if let Some(crate::Rule::Credits { cost: per_unit }) = self.ent.features.get(feature) {
            refund_credits(tx, user_id, void_id, per_unit.saturating_mul(u64::try_from(*amount).unwrap_or(0)), self.now)?;
        }
        tx.execute("UPDATE events SET voided = 1 WHERE device_seq = ?1", [seq])?;
        let keep = |v: i64| if carried { v } else { 0 };
        // Its counters are written here, at once: it is counted as soon as it is recorded.
        tx.execute(
            "INSERT INTO events (user_id, id, feature, amount, occurred_at, device_id, device_seq, cost_micros, metadata, decision,
                                 status, lease_ver, lease_pool, lease_period, lease_start, lease_units, voids, target_at, indexed, use_id)
             VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7, ?8, ?9, '', ?10, ?11, ?12, ?13, ?14, ?15, ?16, ?17, ?18, ?19)",
            params![
                user_id,
                void_id,
                feature,
                keep(*amount),
                ms(self.now),
                self.device_id,
                void_seq,
                keep(*cost),
                self.metadata,
                EventState::Pending,
                lease_ver,
                pool,
                pool_period,
                pool_start,
                keep(*lease_units),
                target_id,
                at,
                indexed,
                void_of_use
            ],
        )?;
        crate::tail::mark_counted(tx, void_seq)?;
        Ok(())
    }
}
