//! Voids (protocol 2): cancelling a recorded use. A void is an event of its own (`voids` = the
//! target's id) recorded in one transaction with taking the target's units out of the local
//! counters — in the target's own window, its leased units back to this device's allowance,
//! the credits it drew returned.

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

/// After the server refused the void event `void_id` (`void_not_allowed`, `unknown_event`, …):
/// its target counts again here, as it does on the server. A settled target got its units back
/// when the void was quarantined (the void carried them); a target still pending is put back in
/// its window's counters and its lease pool. Inside a [`write_tx`].
pub(crate) fn restore_target(tx: &Connection, user_id: &str, void_id: &str) -> Result<()> {
    type Row = (i64, String, i64, i64, i64, EventState, Option<String>, Option<String>, Option<i64>, i64);
    let row: Option<Row> = tx
        .prepare_cached(
            "SELECT t.device_seq, t.feature, t.amount, t.occurred_at, COALESCE(t.cost_micros, 0), t.status, t.lease_pool, t.lease_period,
                    t.lease_start, t.lease_units
             FROM events v JOIN events t ON t.user_id = v.user_id AND t.id = v.voids
             WHERE v.user_id = ?1 AND v.id = ?2 AND t.voided = 1",
        )?
        .query_row(params![user_id, void_id], |r| {
            Ok((r.get(0)?, r.get(1)?, r.get(2)?, r.get(3)?, r.get(4)?, r.get(5)?, r.get(6)?, r.get(7)?, r.get(8)?, r.get(9)?))
        })
        .optional()?;
    let Some((seq, feature, amount, at, cost, status, pool, pool_period, pool_start, lease_units)) = row else { return Ok(()) };
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
        EventState::Settled | EventState::Rejected => {}
    }
    tx.prepare_cached("UPDATE events SET voided = 0 WHERE device_seq = ?1")?.execute([seq])?;
    Ok(())
}

impl Tally {
    /// Cancels the recorded use `event_id` (an id or idempotency key) of `user_id`: records a
    /// void event (synced as `{"id", "voids", "occurred_at", "device_seq", "metadata"?}`, with
    /// `{"reason": …}` as metadata when given) and, in the same transaction, takes the use out
    /// of the local counters of its own window (leased units come back to this device's
    /// allowance; credits it drew are returned). Voiding twice records nothing more (`Ok`).
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
        let done = write_tx(&mut g.conn, |tx| {
            type Row = (String, i64, i64, i64, EventState, Option<String>, Option<i64>, Option<String>, Option<String>, Option<i64>, i64);
            let target = crate::ledger::find_event(tx, user_id, &target_id)?.ok_or_else(|| Error::NotFound(format!("event {event_id}")))?;
            let row: Option<Row> = tx
                .query_row(
                    "SELECT feature, amount, occurred_at, COALESCE(cost_micros, 0), status, voids, lease_ver, lease_pool,
                            lease_period, lease_start, lease_units FROM events WHERE device_seq = ?1",
                    [target],
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
                .optional()?;
            let (feature, amount, at, cost, status, voids, lease_ver, pool, pool_period, pool_start, lease_units) =
                row.ok_or_else(|| Error::NotFound(format!("event {event_id}")))?;
            if voids.is_some() {
                return Err(Error::invalid(format!("event {event_id} is a void event: it cannot be voided")));
            }
            if status == EventState::Rejected {
                return Err(Error::invalid(format!(
                    "event {event_id} was refused (quarantined): it counts nowhere, there is nothing to void"
                )));
            }
            let already: bool =
                tx.query_row("SELECT EXISTS (SELECT 1 FROM events WHERE user_id = ?1 AND voids = ?2)", params![user_id, target_id], |r| {
                    r.get(0)
                })?;
            if already {
                return Ok(false);
            }
            // Out of the counters now. A pending target stops counting itself (and is still
            // sent); an acknowledged one is in the server's totals: the void carries the units
            // it takes back until the server acknowledges it.
            if let Some((period, start)) = event_window(tx, user_id, &feature, at)? {
                add_counter(tx, user_id, &feature, &period, start, -amount, -cost)?;
            }
            if let (Some(pool), Some(period)) = (&pool, &pool_period)
                && lease_units > 0
            {
                add_leased(tx, user_id, pool, period, pool_start.unwrap_or(0), -lease_units)?;
            }
            let carried = status == EventState::Settled;
            let seq = crate::ledger::last_seq(tx)? + 1;
            let (void_id, indexed) = match crate::ledger::sequenced_id(now, seq) {
                Some(id) => (id.to_string(), false),
                None => (uuid::Uuid::now_v7().to_string(), true),
            };
            if let Some(crate::Rule::Credits { cost: per_unit }) = a.ent.features.get(&feature) {
                refund_credits(tx, user_id, &void_id, per_unit.saturating_mul(u64::try_from(amount).unwrap_or(0)), now)?;
            }
            tx.execute("UPDATE events SET voided = 1 WHERE device_seq = ?1", [target])?;
            let keep = |v: i64| if carried { v } else { 0 };
            // Its counters are written here, at once: it is counted as soon as it is recorded.
            tx.execute(
                "INSERT INTO events (user_id, id, feature, amount, occurred_at, device_id, device_seq, cost_micros, metadata, decision,
                                     status, lease_ver, lease_pool, lease_period, lease_start, lease_units, voids, target_at, indexed)
                 VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7, ?8, ?9, '', ?10, ?11, ?12, ?13, ?14, ?15, ?16, ?17, ?18)",
                params![
                    user_id,
                    void_id,
                    feature,
                    keep(amount),
                    ms(now),
                    device_id,
                    seq,
                    keep(cost),
                    metadata,
                    EventState::Pending,
                    lease_ver,
                    pool,
                    pool_period,
                    pool_start,
                    keep(lease_units),
                    target_id,
                    at,
                    indexed
                ],
            )?;
            crate::tail::mark_counted(tx, seq)?;
            Ok(true)
        })?;
        drop(g);
        if done {
            self.notify(user_id, Change { usage: true, ..Change::default() });
        }
        Ok(())
    }
}
