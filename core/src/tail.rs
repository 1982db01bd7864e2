//! Counters not yet written. A use records its event and nothing else: the counter row it adds
//! to (`count_period`, `count_start`, `count_amount`, `count_cost` of the event) and its lease
//! pool's `pending_leased` (`lease_pool`, `lease_period`, `lease_start`, `lease_units`) are
//! written later, for every event after `device.counted_through` at once — before any other
//! write ([`crate::write_tx`]), and by a use once [`WRITE_AT`] events wait. So a counter holds
//! its row plus the events after `counted_through` (the tail), which a use reads from memory
//! ([`Tail`]) and any other path from the file ([`pending_delta`]).

use crate::error::Result;
use rusqlite::{Connection, OptionalExtension, params};

/// How many events may wait for their counters before a use writes them.
pub(crate) const WRITE_AT: i64 = 64;

/// What the tail adds to one counter row: units (`pending`), micros (`pending_cost`) and
/// leased units (`pending_leased`).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub(crate) struct Delta {
    pub(crate) units: i64,
    pub(crate) micros: i64,
    pub(crate) leased: i64,
}

impl Delta {
    fn add(&mut self, o: Delta) {
        self.units = self.units.saturating_add(o.units);
        self.micros = self.micros.saturating_add(o.micros);
        self.leased = self.leased.saturating_add(o.leased);
    }
}

/// A counter row's key: (user, feature, period column, window start ms).
type Key = (String, String, String, i64);

/// The tail as one connection last saw it: the last sequence number handed out,
/// `counted_through`, and the tail's sums per counter row. Valid while the file's change
/// counter (`PRAGMA data_version`: other connections' commits) and this connection's
/// `total_changes` are what they were after its last use: then nothing else wrote.
#[derive(Debug)]
pub(crate) struct Tail {
    /// The last sequence number handed out.
    pub(crate) seq: i64,
    /// `device.counted_through`.
    pub(crate) through: i64,
    sums: Vec<(Key, Delta)>,
    version: i64,
    changes: u64,
}

impl Tail {
    /// Reads the tail from the file (inside the caller's transaction; `version` is its
    /// `PRAGMA data_version`).
    pub(crate) fn load(conn: &Connection, version: i64) -> Result<Tail> {
        let through = counted_through(conn)?;
        let mut tail = Tail { seq: crate::ledger::last_seq(conn)?, through, sums: Vec::new(), version, changes: conn.total_changes() };
        for (key, d) in tail_sums(conn, through)? {
            tail.add(&key.0, &key.1, &key.2, key.3, d);
        }
        Ok(tail)
    }

    /// Whether nothing was written since this tail was read or last [`Tail::seal`]ed.
    pub(crate) fn valid(&self, conn: &Connection, version: i64) -> bool {
        self.version == version && self.changes == conn.total_changes()
    }

    /// What the tail adds to one counter row.
    pub(crate) fn get(&self, user: &str, feature: &str, period: &str, start: i64) -> Delta {
        self.sums
            .iter()
            .find(|((u, f, p, s), _)| *s == start && f == feature && p == period && u == user)
            .map_or_else(Delta::default, |e| e.1)
    }

    /// Adds a recorded use's delta.
    pub(crate) fn add(&mut self, user: &str, feature: &str, period: &str, start: i64, d: Delta) {
        match self.sums.iter_mut().find(|((u, f, p, s), _)| *s == start && f == feature && p == period && u == user) {
            Some((_, sum)) => sum.add(d),
            None => self.sums.push(((user.to_string(), feature.to_string(), period.to_string(), start), d)),
        }
    }

    /// After [`write_counters`] (which returned `through`) in the same transaction: nothing
    /// waits.
    pub(crate) fn written(&mut self, through: i64) {
        self.through = through;
        self.sums.clear();
    }

    /// After the commit: the state this tail is valid in.
    pub(crate) fn seal(&mut self, conn: &Connection, version: i64) {
        self.version = version;
        self.changes = conn.total_changes();
    }
}

fn counted_through(conn: &Connection) -> Result<i64> {
    Ok(conn.prepare_cached("SELECT counted_through FROM device WHERE singleton = 1")?.query_row([], |r| r.get(0)).optional()?.unwrap_or(0))
}

/// The tail's sums per counter row, from the file.
fn tail_sums(conn: &Connection, through: i64) -> Result<Vec<(Key, Delta)>> {
    let mut out = Vec::new();
    let mut counted = conn.prepare_cached(
        "SELECT user_id, feature, count_period, count_start, sum(count_amount), sum(count_cost) FROM events
         WHERE device_seq > ?1 AND count_period IS NOT NULL GROUP BY 1, 2, 3, 4",
    )?;
    for row in counted.query_map([through], |r| Ok(((r.get(0)?, r.get(1)?, r.get(2)?, r.get(3)?), r.get(4)?, r.get(5)?)))? {
        let (key, units, micros) = row?;
        out.push((key, Delta { units, micros, leased: 0 }));
    }
    let mut leased = conn.prepare_cached(
        "SELECT user_id, lease_pool, lease_period, lease_start, sum(lease_units) FROM events
         WHERE device_seq > ?1 AND lease_pool IS NOT NULL AND lease_period IS NOT NULL AND lease_units <> 0 GROUP BY 1, 2, 3, 4",
    )?;
    for row in
        leased.query_map([through], |r| Ok(((r.get(0)?, r.get(1)?, r.get(2)?, r.get::<_, Option<i64>>(3)?.unwrap_or(0)), r.get(4)?)))?
    {
        let (key, units) = row?;
        out.push((key, Delta { units: 0, micros: 0, leased: units }));
    }
    Ok(out)
}

/// What the tail adds to one counter row, read from the file (the paths that hold no [`Tail`]).
pub(crate) fn pending_delta(conn: &Connection, user: &str, feature: &str, period: &str, start: i64) -> Result<Delta> {
    // One scan of the tail: a use counts in its counter row and, leased, in its pool's.
    Ok(conn
        .prepare_cached(
            "SELECT coalesce(sum(CASE WHEN feature = ?2 AND count_period = ?3 AND count_start = ?4 THEN count_amount END), 0),
                    coalesce(sum(CASE WHEN feature = ?2 AND count_period = ?3 AND count_start = ?4 THEN count_cost END), 0),
                    coalesce(sum(CASE WHEN lease_pool = ?2 AND lease_period = ?3 AND coalesce(lease_start, 0) = ?4 THEN lease_units END), 0)
             FROM events WHERE device_seq > (SELECT counted_through FROM device WHERE singleton = 1) AND user_id = ?1",
        )?
        .query_row(params![user, feature, period, start], |r| Ok(Delta { units: r.get(0)?, micros: r.get(1)?, leased: r.get(2)? }))?)
}

/// Writes the counters of every event after `counted_through` and moves it to the last event,
/// inside the caller's write transaction. Returns `counted_through` after.
pub(crate) fn write_counters(conn: &Connection) -> Result<i64> {
    let through = counted_through(conn)?;
    let last: i64 = conn.prepare_cached("SELECT coalesce(max(device_seq), 0) FROM events")?.query_row([], |r| r.get(0))?;
    if last <= through {
        return Ok(through);
    }
    for ((user, feature, period, start), d) in tail_sums(conn, through)? {
        conn.prepare_cached(
            "INSERT INTO counters (user_id, feature, period, period_start, pending, pending_cost, pending_leased) VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7)
             ON CONFLICT (user_id, feature, period, period_start) DO UPDATE SET pending = pending + excluded.pending,
               pending_cost = pending_cost + excluded.pending_cost, pending_leased = pending_leased + excluded.pending_leased",
        )?
        .execute(params![user, feature, period, start, d.units, d.micros, d.leased])?;
    }
    mark_counted(conn, last)?;
    Ok(last)
}

/// Records that the counters of every event up to `seq` are written (a void, which writes its
/// own at once, right after [`write_counters`]).
pub(crate) fn mark_counted(conn: &Connection, seq: i64) -> Result<()> {
    conn.prepare_cached("UPDATE device SET counted_through = max(counted_through, ?1) WHERE singleton = 1")?.execute([seq])?;
    Ok(())
}
