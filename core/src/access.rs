//! Resolving what a user may do right now: their entitlements (from a verified server token,
//! or the state the app set locally), timezone and billing anchor. Cached per user.

use crate::catalog::Catalog;
use crate::credits::{credit_balance_at, store_credit_grants};
use crate::entitlements::{EntitlementClaims, Entitlements, SubscriptionStatus};
use crate::error::{Error, Result};
use crate::timezone_history::TimezoneHistory;
use crate::{Change, Inner, Tally, from_ms, ms, write_tx};
use chrono::{DateTime, Duration, Utc};
use rusqlite::OptionalExtension;
use rusqlite::params;
use std::sync::Arc;

/// Everything a decision needs to know about a user.
#[derive(Debug)]
pub(crate) struct Access {
    /// Resolved entitlements.
    pub ent: Entitlements,
    /// The zones of calendar windows: the verified token's history, else the local zone.
    pub zones: TimezoneHistory,
    /// Anchor of billing windows.
    pub anchor: DateTime<Utc>,
    /// Recompute at or after this instant (a grant or grace period ends).
    pub valid_until: DateTime<Utc>,
    /// Whether the entitlements come from a verified server token (else: the local state).
    pub from_token: bool,
    /// When the user was created (rolled-over plan credits count from here).
    pub created_at: DateTime<Utc>,
    /// Protocol 2: the stored device token's lease state, once this user held one.
    pub lease: Option<crate::leases::LeaseState>,
}

impl Tally {
    /// The cached access of `user_id` at `now`, resolving it when stale.
    pub(crate) fn access(&self, inner: &mut Inner, user_id: &str, now: DateTime<Utc>) -> Result<Arc<Access>> {
        if let Some(a) = inner.access.get(user_id)
            && now < a.valid_until
        {
            return Ok(a.clone());
        }
        let a = Arc::new(self.resolve_access(inner, user_id, now)?);
        inner.access.insert(user_id.to_string(), a.clone());
        Ok(a)
    }

    fn resolve_access(&self, inner: &Inner, user_id: &str, now: DateTime<Utc>) -> Result<Access> {
        type LeaseFigures = (Option<i64>, Option<i64>, Option<i64>);
        type Row = (Option<String>, String, i64, bool, Option<String>, Option<String>, Option<LeaseFigures>);
        let row: Option<Row> = inner
            .conn
            .prepare_cached(
                "SELECT external_id, timezone, created_at, is_admin, entitlements, entitlements_token,
                        leases_held, lease_ver, lease_until, lease_exp FROM users WHERE id = ?1",
            )?
            .query_row([user_id], |r| {
                let lease = r.get::<_, bool>(6)?.then(|| -> rusqlite::Result<_> { Ok((r.get(7)?, r.get(8)?, r.get(9)?)) });
                Ok((r.get(0)?, r.get(1)?, r.get(2)?, r.get(3)?, r.get(4)?, r.get(5)?, lease.transpose()?))
            })
            .optional()?;
        let (external_id, tz_name, created_at, is_admin, raw, token, lease) =
            row.ok_or_else(|| Error::NotFound(format!("user {user_id}")))?;
        let lease = lease.map(|(ver, until, exp)| crate::leases::load_state(&inner.conn, user_id, ver, until, exp)).transpose()?;
        let catalog = self.catalog();
        let mut valid_until = now + Duration::seconds(60);
        let mut ent = None;
        if let (Some(token), Some(sub)) = (token.as_deref(), external_id.as_deref()) {
            ent = self.token_entitlements(token, sub, now, &mut valid_until);
        }
        let from_token = ent.is_some();
        let ent = match ent {
            Some(e) => e,
            None => {
                let mut state: Entitlements = match raw {
                    Some(j) => serde_json::from_str(&j)?,
                    None => Entitlements::free(),
                };
                state.is_admin |= is_admin;
                let grants = self.credit_grants(&inner.conn, user_id)?;
                if !grants.is_empty() {
                    state.credit_grants = grants;
                }
                if let Some(t) = state.next_boundary(now, self.config.past_due_grace) {
                    valid_until = valid_until.min(t);
                }
                state.resolve(&catalog, now, self.config.past_due_grace)
            }
        };
        let zones = zones(&ent, from_token, &tz_name)?;
        let anchor = match (ent.status, ent.period_start) {
            (s, Some(p)) if s != SubscriptionStatus::None => p,
            _ => from_ms(created_at),
        };
        // A new billing window brings the plan's included credits.
        if let Some(end) = crate::period::billing_window(now, anchor).end {
            valid_until = valid_until.min(end);
        }
        Ok(Access { ent, zones, anchor, valid_until, from_token, created_at: from_ms(created_at), lease })
    }

    /// Entitlements from a stored server token, when it verifies for subject `sub`: the token's
    /// own while within `exp + grace`, the free rules it carries after that. `None` when the
    /// token does not verify (tampered, foreign key, wrong subject): the local state applies.
    fn token_entitlements(&self, token: &str, sub: &str, now: DateTime<Utc>, valid_until: &mut DateTime<Utc>) -> Option<Entitlements> {
        let claims: EntitlementClaims = crate::token::verify(token, self.config.server_keys.as_deref()?, sub).ok()?;
        let expires = DateTime::from_timestamp(claims.exp, 0)? + self.config.token_grace;
        if now < expires {
            *valid_until = (*valid_until).min(expires);
            let mut e = claims.entitlements;
            e.credit_balance = 0;
            Some(e)
        } else {
            let mut free = Entitlements::free();
            free.features = claims.entitlements.free_features.clone();
            free.free_features = claims.entitlements.free_features;
            free.models = claims.entitlements.models;
            free.tz = claims.entitlements.tz;
            free.tz_history = claims.entitlements.tz_history;
            Some(free)
        }
    }

    /// Drops cached access of `user_id` (after a change to the user or their entitlements).
    pub(crate) fn forget_access(inner: &mut Inner, user_id: &str) {
        inner.access.remove(user_id);
        inner.verified.remove(user_id);
        inner.plan_credits.retain(|(u, _)| u != user_id);
    }

    /// The catalog used for a user's "unknown feature" test: the local catalog plus the token's.
    pub(crate) fn feature_known(catalog: &Catalog, ent: &Entitlements, feature: &str) -> bool {
        ent.features.contains_key(feature) || ent.free_features.contains_key(feature) || catalog.knows_feature(feature)
    }
}

/// The zones of a user's calendar windows. From a verified token: its `tz_history`, else its
/// `tz` (a server that sends no history); the zone set on this device never moves them, its
/// change waits for the server's token. Without a token (a local user, or one never synced):
/// the local zone.
fn zones(ent: &Entitlements, from_token: bool, local: &str) -> Result<TimezoneHistory> {
    if from_token {
        if !ent.tz_history.is_empty() {
            return TimezoneHistory::from_wire(&ent.tz_history).map_err(Error::invalid);
        }
        if let Some(tz) = ent.tz.as_deref().and_then(|tz| crate::contract::timezone(tz).ok()) {
            return Ok(TimezoneHistory::fixed(tz));
        }
    }
    Ok(TimezoneHistory::fixed(crate::contract::timezone(ent.tz.as_deref().unwrap_or(local)).or_else(|_| crate::contract::timezone(local))?))
}

impl Tally {
    /// Sets a user's entitlement state locally (apps without a server): plan, status, period,
    /// access grants, admin flag and credit grants (which replace the stored ones).
    pub fn set_entitlements(&self, user_id: &str, state: Entitlements) -> Result<()> {
        for (i, g) in state.grants.iter().enumerate() {
            if self.catalog().plan(&g.plan).is_none() {
                return Err(Error::invalid(format!("grants[{i}].plan: unknown plan {:?}", g.plan)));
            }
        }
        if state.status != crate::SubscriptionStatus::None && self.catalog().plan(&state.plan).is_none() {
            return Err(Error::invalid(format!("plan: unknown plan {:?}", state.plan)));
        }
        if let (Some(s), Some(e)) = (state.period_start, state.period_end)
            && e <= s
        {
            return Err(Error::invalid("period_end must be after period_start"));
        }
        let mut g = self.lock();
        let now = self.observe_now(&mut g);
        write_tx(&mut g.conn, |tx| {
            let n = tx.execute(
                "UPDATE users SET entitlements = ?2, is_admin = ?3, updated_at = ?4 WHERE id = ?1",
                params![user_id, serde_json::to_string(&state)?, state.is_admin, ms(now)],
            )?;
            if n == 0 {
                return Err(Error::NotFound(format!("user {user_id}")));
            }
            store_credit_grants(tx, user_id, &state.credit_grants, now)?;
            Ok(())
        })?;
        Tally::forget_access(&mut g, user_id);
        drop(g);
        self.notify(user_id, Change { entitlements: true, usage: true, ..Change::default() });
        Ok(())
    }

    /// The user's resolved entitlements: plan in effect, `access_reason`, rules, credit grants
    /// and balance.
    pub fn entitlements(&self, user_id: &str) -> Result<Entitlements> {
        let mut g = self.lock();
        let now = self.observe_now(&mut g);
        let a = self.access(&mut g, user_id, now)?;
        self.ensure_plan_credits(&mut g, user_id, &a, now)?;
        let mut e = a.ent.clone();
        e.credit_grants = self.credit_grants(&g.conn, user_id)?;
        e.credit_balance = credit_balance_at(&g.conn, user_id, now)?;
        Ok(e)
    }
}
