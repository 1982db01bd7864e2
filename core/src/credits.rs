//! Credits: grants (FIFO by expiry, then id), draws, the debt a draw cannot cover and its
//! payment from the next grant, and plan-included credits.

use crate::access::Access;
use crate::entitlements::CreditGrant;
use crate::error::{Error, Result};
use crate::{Inner, Tally, from_ms, ms, write_tx};
use chrono::{DateTime, Utc};
use rusqlite::{Connection, OptionalExtension, params};

/// Sum of unexpired credit grants at `at` (may be negative when overspent).
pub(crate) fn credit_balance_at(conn: &Connection, user: &str, at: DateTime<Utc>) -> Result<i64> {
    Ok(conn
        .prepare_cached(
            "SELECT COALESCE(SUM(remaining), 0) FROM credit_grants WHERE user_id = ?1 AND (expires_at IS NULL OR expires_at > ?2)",
        )?
        .query_row(params![user, ms(at)], |r| r.get(0))?)
}

/// Id of the negative grant that carries a debt (what draws could not cover), on both sides.
pub const DEBT_GRANT_ID: &str = "debt";
/// Source of the debt grant.
pub const DEBT_SOURCE: &str = "debt";

/// `source` of a credit grant bought in a store (a credit pack).
pub const PURCHASE_SOURCE: &str = "purchase";

/// The FIFO order of grants: the one expiring first first, those that never expire last, then
/// by id.
pub fn fifo_key(g: &CreditGrant) -> (bool, Option<DateTime<Utc>>, &str) {
    (g.expires_at.is_none(), g.expires_at, g.id.as_str())
}

/// Draws `need` credits from `grants` (the unexpired ones, in any order), FIFO by
/// [`fifo_key`], from those with credits left. Returns what they could not cover (the new
/// debt). The one credit-drawing rule of the device and the server.
pub fn draw(grants: &mut [CreditGrant], need: i64) -> i64 {
    grants.sort_by(|a, b| fifo_key(a).cmp(&fifo_key(b)));
    let mut left = need;
    for g in grants.iter_mut().filter(|g| g.remaining > 0 && g.id != DEBT_GRANT_ID) {
        if left <= 0 {
            break;
        }
        let take = g.remaining.min(left);
        g.remaining -= take;
        left -= take;
    }
    left.max(0)
}

/// Draws `need` credits from the unexpired grants stored for `user` ([`draw`]); what cannot be
/// covered is added to the debt grant, which the next grant pays.
pub(crate) fn draw_credits(conn: &Connection, user: &str, need: u64, at: DateTime<Utc>) -> Result<()> {
    let mut grants: Vec<CreditGrant> = conn
        .prepare_cached(
            "SELECT id, remaining, expires_at, source FROM credit_grants WHERE user_id = ?1 AND remaining > 0 AND (expires_at IS NULL OR expires_at > ?2)",
        )?
        .query_map(params![user, ms(at)], |r| {
            Ok(CreditGrant { id: r.get(0)?, remaining: r.get(1)?, expires_at: r.get::<_, Option<i64>>(2)?.map(from_ms), source: r.get(3)? })
        })?
        .collect::<rusqlite::Result<_>>()?;
    let before: Vec<i64> = grants.iter().map(|g| g.remaining).collect();
    let sorted_before: std::collections::HashMap<String, i64> = grants.iter().map(|g| g.id.clone()).zip(before).collect();
    let need = i64::try_from(need).map_err(|_| Error::invalid("credits out of range"))?;
    let left = draw(&mut grants, need);
    for g in grants.iter().filter(|g| sorted_before.get(&g.id) != Some(&g.remaining)) {
        conn.prepare_cached("UPDATE credit_grants SET remaining = ?3 WHERE user_id = ?1 AND id = ?2")?.execute(params![
            user,
            g.id,
            g.remaining
        ])?;
    }
    if left > 0 {
        conn.prepare_cached(
            "INSERT INTO credit_grants (user_id, id, remaining, expires_at, source) VALUES (?1, ?2, ?3, NULL, ?4)
             ON CONFLICT (user_id, id) DO UPDATE SET remaining = remaining + excluded.remaining",
        )?
        .execute(params![user, DEBT_GRANT_ID, -left, DEBT_SOURCE])?;
    }
    Ok(())
}

/// Pays a debt from the grants just stored (the next grant pays a negative balance).
pub(crate) fn settle_debt(conn: &Connection, user: &str, at: DateTime<Utc>) -> Result<()> {
    let debt: Option<i64> = conn
        .query_row("SELECT remaining FROM credit_grants WHERE user_id = ?1 AND id = ?2", params![user, DEBT_GRANT_ID], |r| r.get(0))
        .optional()?;
    if let Some(d) = debt.filter(|d| *d < 0) {
        conn.execute("DELETE FROM credit_grants WHERE user_id = ?1 AND id = ?2", params![user, DEBT_GRANT_ID])?;
        draw_credits(conn, user, d.unsigned_abs(), at)?;
    }
    Ok(())
}

/// Replaces a user's credit grants, then pays any debt from them.
pub(crate) fn store_credit_grants(conn: &Connection, user: &str, grants: &[CreditGrant], now: DateTime<Utc>) -> Result<()> {
    let debt: i64 = conn.query_row(
        "SELECT COALESCE(SUM(remaining), 0) FROM credit_grants WHERE user_id = ?1 AND id = ?2",
        params![user, DEBT_GRANT_ID],
        |r| r.get(0),
    )?;
    // Plan credits are the plan's, not the caller's: they keep what was spent of them.
    conn.execute("DELETE FROM credit_grants WHERE user_id = ?1 AND id NOT LIKE 'included:%'", [user])?;
    for g in grants {
        if g.id.is_empty() || (g.id == DEBT_GRANT_ID && g.remaining > 0) {
            return Err(Error::invalid(format!("invalid credit grant id {:?}", g.id)));
        }
        conn.execute(
            "INSERT OR REPLACE INTO credit_grants (user_id, id, remaining, expires_at, source) VALUES (?1, ?2, ?3, ?4, ?5)",
            params![user, g.id, g.remaining, g.expires_at.map(ms), g.source],
        )?;
    }
    if debt < 0 {
        conn.execute(
            "INSERT INTO credit_grants (user_id, id, remaining, source) VALUES (?1, ?2, ?3, ?4)
             ON CONFLICT (user_id, id) DO UPDATE SET remaining = remaining + excluded.remaining",
            params![user, DEBT_GRANT_ID, debt, DEBT_SOURCE],
        )?;
    }
    settle_debt(conn, user, now)?;
    Ok(())
}

impl Tally {
    /// Stores the credits the user's plan includes for the current billing window (and, when
    /// they roll over, the earlier ones) — for entitlements set locally only: subscribers get
    /// theirs from paid invoices, and a server's token carries the server's grants.
    pub(crate) fn ensure_plan_credits(&self, inner: &mut Inner, user: &str, a: &Access, now: DateTime<Utc>) -> Result<()> {
        if a.from_token || crate::entitlements::credits_from_invoices(&a.ent.access_reason) {
            return Ok(());
        }
        let catalog = self.catalog();
        let Some(plan) = catalog.plan(&a.ent.plan) else { return Ok(()) };
        for (_, g) in crate::entitlements::included_credit_grants(plan, a.created_at, a.anchor, now) {
            let key = (user.to_string(), g.id.clone());
            if inner.plan_credits.contains(&key) {
                continue;
            }
            write_tx(&mut inner.conn, |tx| {
                let added = tx.execute(
                    "INSERT OR IGNORE INTO credit_grants (user_id, id, remaining, expires_at, source) VALUES (?1, ?2, ?3, ?4, ?5)",
                    params![user, g.id, g.remaining, g.expires_at.map(ms), g.source],
                )?;
                if added > 0 {
                    settle_debt(tx, user, now)?;
                }
                Ok(())
            })?;
            inner.plan_credits.insert(key);
        }
        Ok(())
    }

    /// The user's credit balance (unexpired grants minus consumption; negative when overspent).
    pub fn credit_balance(&self, user_id: &str) -> Result<i64> {
        let mut g = self.lock();
        let now = self.observe_now(&mut g);
        let a = self.access(&mut g, user_id, now)?;
        self.ensure_plan_credits(&mut g, user_id, &a, now)?;
        credit_balance_at(&g.conn, user_id, now)
    }

    pub(crate) fn credit_grants(&self, conn: &Connection, user_id: &str) -> Result<Vec<CreditGrant>> {
        let mut st = conn.prepare_cached(
            "SELECT id, remaining, expires_at, source FROM credit_grants WHERE user_id = ?1 ORDER BY expires_at IS NULL, expires_at, id",
        )?;
        let rows = st.query_map([user_id], |r| {
            Ok(CreditGrant { id: r.get(0)?, remaining: r.get(1)?, expires_at: r.get::<_, Option<i64>>(2)?.map(from_ms), source: r.get(3)? })
        })?;
        Ok(rows.collect::<rusqlite::Result<_>>()?)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn g(id: &str, remaining: i64, exp: Option<i64>) -> CreditGrant {
        CreditGrant { id: id.into(), remaining, expires_at: exp.map(from_ms), source: "plan".into() }
    }

    #[test]
    fn draws_fifo_by_expiry_and_returns_what_is_left_uncovered() {
        let mut grants = vec![g("never", 10, None), g("late", 5, Some(2_000)), g("soon", 3, Some(1_000)), g(DEBT_GRANT_ID, -4, None)];
        assert_eq!(draw(&mut grants, 6), 0);
        let left: Vec<(&str, i64)> = grants.iter().map(|g| (g.id.as_str(), g.remaining)).collect();
        assert_eq!(left, [("soon", 0), ("late", 2), (DEBT_GRANT_ID, -4), ("never", 10)]);
        assert_eq!(draw(&mut grants, 20), 8, "the debt grant is never drawn from; 8 stay uncovered");
    }
}
