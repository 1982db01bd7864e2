//! Users on this device: local (not signed in) and signed-in accounts.

use crate::error::{Error, Result};
use crate::{Change, Tally, UserId, contract, from_ms, ms, write_tx};
use chrono::{DateTime, Utc};
use rusqlite::{Connection, OptionalExtension, Row, params};
use serde::{Deserialize, Serialize};

/// A user of the app on this device.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct User {
    /// Local id (UUID v7). Differs from the server's id; accounts match by `external_id`.
    pub id: UserId,
    /// The identity provider's subject; `None` for a local user.
    pub external_id: Option<String>,
    /// Email address.
    pub email: Option<String>,
    /// Display name.
    pub display_name: Option<String>,
    /// Avatar URL.
    pub avatar_url: Option<String>,
    /// IANA timezone of calendar periods.
    pub timezone: String,
    /// Whether the user is an admin.
    pub is_admin: bool,
    /// Whether a session is active (false after `sign_out`).
    pub signed_in: bool,
    /// Creation time.
    pub created_at: DateTime<Utc>,
    /// Last change.
    pub updated_at: DateTime<Utc>,
}

/// The identity of a signed-in user, from the app's identity provider.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct Profile {
    /// The identity provider's subject.
    pub external_id: String,
    /// Email address.
    pub email: Option<String>,
    /// Display name.
    pub display_name: Option<String>,
    /// Avatar URL.
    pub avatar_url: Option<String>,
}

/// Changes to a user's profile; `None` leaves a field as it is, `Some("")` clears it.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct UserUpdate {
    /// New display name.
    pub display_name: Option<String>,
    /// New avatar URL.
    pub avatar_url: Option<String>,
    /// New IANA timezone (validated).
    pub timezone: Option<String>,
    /// New email.
    pub email: Option<String>,
}

pub(crate) const USER_COLS: &str =
    "id, external_id, email, display_name, avatar_url, timezone, is_admin, signed_in, created_at, updated_at";

pub(crate) fn user_row(r: &Row<'_>) -> rusqlite::Result<User> {
    Ok(User {
        id: r.get(0)?,
        external_id: r.get(1)?,
        email: r.get(2)?,
        display_name: r.get(3)?,
        avatar_url: r.get(4)?,
        timezone: r.get(5)?,
        is_admin: r.get(6)?,
        signed_in: r.get(7)?,
        created_at: from_ms(r.get(8)?),
        updated_at: from_ms(r.get(9)?),
    })
}

fn blank_to_none(v: Option<String>) -> Option<String> {
    v.filter(|s| !s.is_empty())
}

pub(crate) fn get_user(conn: &Connection, id: &str) -> Result<User> {
    conn.prepare_cached(&format!("SELECT {USER_COLS} FROM users WHERE id = ?1"))?
        .query_row([id], user_row)
        .optional()?
        .ok_or_else(|| Error::NotFound(format!("user {id}")))
}

impl Tally {
    /// Creates a user who has not signed in (no external id).
    pub fn create_local_user(&self, display_name: Option<&str>) -> Result<User> {
        contract::display_name(display_name)?;
        let name = display_name.map(str::to_string);
        let mut g = self.lock();
        let now = ms(self.observe_now(&mut g));
        let id = uuid::Uuid::now_v7().to_string();
        g.conn.execute(
            "INSERT INTO users (id, display_name, created_at, updated_at) VALUES (?1, ?2, ?3, ?3)",
            params![id, blank_to_none(name), now],
        )?;
        get_user(&g.conn, &id)
    }

    /// Signs a user in: upserts the account of `profile.external_id`. With `attach_local`, the
    /// named local user's events, settings and credit grants move to that account in one
    /// transaction (none lost, none counted twice) and the local user disappears.
    pub fn sign_in(&self, profile: Profile, attach_local: Option<&str>) -> Result<User> {
        contract::subject(&profile.external_id)?;
        contract::email(profile.email.as_deref())?;
        contract::display_name(profile.display_name.as_deref())?;
        contract::avatar_url(profile.avatar_url.as_deref())?;
        let mut g = self.lock();
        let now = ms(self.observe_now(&mut g));
        let id = write_tx(&mut g.conn, |tx| {
            let existing: Option<String> =
                tx.query_row("SELECT id FROM users WHERE external_id = ?1", [&profile.external_id], |r| r.get(0)).optional()?;
            let id = match existing {
                Some(id) => {
                    tx.execute(
                        "UPDATE users SET email = COALESCE(?2, email), display_name = COALESCE(?3, display_name),
                         avatar_url = COALESCE(?4, avatar_url), signed_in = 1, updated_at = ?5 WHERE id = ?1",
                        params![id, profile.email, profile.display_name, profile.avatar_url, now],
                    )?;
                    id
                }
                None => {
                    let id = uuid::Uuid::now_v7().to_string();
                    tx.execute(
                        "INSERT INTO users (id, external_id, email, display_name, avatar_url, signed_in, created_at, updated_at)
                         VALUES (?1, ?2, ?3, ?4, ?5, 1, ?6, ?6)",
                        params![id, profile.external_id, profile.email, profile.display_name, profile.avatar_url, now],
                    )?;
                    id
                }
            };
            if let Some(local) = attach_local {
                attach(tx, local, &id)?;
            }
            Ok(id)
        })?;
        // Drop the cached access *and* the verified-counters marks of both users, so the
        // target's counters are rebuilt from its ledger, moved events included.
        Tally::forget_access(&mut g, &id);
        if let Some(local) = attach_local {
            Tally::forget_access(&mut g, local);
        }
        let user = get_user(&g.conn, &id)?;
        drop(g);
        let all = Change { usage: true, entitlements: true, settings: true };
        self.notify(&id, all);
        if let Some(local) = attach_local {
            self.notify(local, all);
        }
        Ok(user)
    }

    /// Ends the user's session: the stored token is forgotten, unsynced events are kept, and
    /// this device's leases are dropped (hard pools allow 0 until a sync brings new ones). When
    /// online, call [`Tally::release_leases`] first so the account gets their room back at once.
    pub fn sign_out(&self, user_id: &str) -> Result<()> {
        let mut g = self.lock();
        write_tx(&mut g.conn, |tx| {
            let n = tx.execute("UPDATE users SET signed_in = 0, entitlements_token = NULL WHERE id = ?1", [user_id])?;
            if n == 0 {
                return Err(Error::NotFound(format!("user {user_id}")));
            }
            // Leases end here (allowance 0 afterwards); call `release_leases` first when online.
            tx.execute("DELETE FROM leases WHERE user_id = ?1", [user_id])?;
            Ok(())
        })?;
        Tally::forget_access(&mut g, user_id);
        drop(g);
        self.notify(user_id, Change { entitlements: true, ..Change::default() });
        Ok(())
    }

    /// One user.
    pub fn user(&self, user_id: &str) -> Result<User> {
        get_user(&self.lock().conn, user_id)
    }

    /// All users on this device, oldest first.
    pub fn users(&self) -> Result<Vec<User>> {
        let g = self.lock();
        let mut st = g.conn.prepare(&format!("SELECT {USER_COLS} FROM users ORDER BY created_at, id"))?;
        let rows = st.query_map([], user_row)?.collect::<rusqlite::Result<Vec<_>>>()?;
        Ok(rows)
    }

    /// Changes a user's profile. A timezone change is sent to the server with the next sync;
    /// a signed-in user's windows follow it once the server's verified token carries it (the
    /// window in force keeps its bounds), a local user's at once.
    pub fn update_user(&self, user_id: &str, update: UserUpdate) -> Result<User> {
        contract::display_name(update.display_name.as_deref())?;
        contract::avatar_url(update.avatar_url.as_deref())?;
        contract::email(update.email.as_deref())?;
        if let Some(tz) = &update.timezone {
            contract::timezone(tz)?;
        }
        let mut g = self.lock();
        let now = ms(self.observe_now(&mut g));
        write_tx(&mut g.conn, |tx| {
            let patch: Option<Option<String>> =
                tx.query_row("SELECT profile_patch FROM users WHERE id = ?1", [user_id], |r| r.get(0)).optional()?;
            let patch = patch.ok_or_else(|| Error::NotFound(format!("user {user_id}")))?;
            let mut p: crate::wire::ProfilePatch = patch.as_deref().map(serde_json::from_str).transpose()?.unwrap_or_default();
            if update.timezone.is_some() {
                p.timezone.clone_from(&update.timezone);
            }
            if update.display_name.is_some() {
                p.display_name.clone_from(&update.display_name);
            }
            if update.avatar_url.is_some() {
                p.avatar_url.clone_from(&update.avatar_url);
            }
            tx.execute(
                "UPDATE users SET display_name = CASE WHEN ?2 IS NULL THEN display_name ELSE NULLIF(?2, '') END,
                 avatar_url = CASE WHEN ?3 IS NULL THEN avatar_url ELSE NULLIF(?3, '') END,
                 timezone = COALESCE(?4, timezone),
                 email = CASE WHEN ?5 IS NULL THEN email ELSE NULLIF(?5, '') END,
                 profile_patch = ?6, updated_at = ?7 WHERE id = ?1",
                params![user_id, update.display_name, update.avatar_url, update.timezone, update.email, serde_json::to_string(&p)?, now],
            )?;
            Ok(())
        })?;
        Tally::forget_access(&mut g, user_id);
        let user = get_user(&g.conn, user_id)?;
        drop(g);
        self.notify(user_id, Change { usage: update.timezone.is_some(), entitlements: true, ..Change::default() });
        Ok(user)
    }

    /// Deletes a user and everything of theirs (their leases included). Refuses while unsynced
    /// events exist, unless `force`. When online, call [`Tally::release_leases`] first.
    pub fn delete_user(&self, user_id: &str, force: bool) -> Result<()> {
        let mut g = self.lock();
        write_tx(&mut g.conn, |tx| {
            get_user(tx, user_id)?;
            let pending = crate::ledger::pending_count(tx, user_id)?;
            if pending > 0 && !force {
                return Err(Error::UnsyncedEvents(pending));
            }
            crate::ledger::keep_seq_floor(tx)?;
            tx.execute("DELETE FROM users WHERE id = ?1", [user_id])?;
            Ok(())
        })?;
        Tally::forget_access(&mut g, user_id);
        drop(g);
        self.notify(user_id, Change { usage: true, entitlements: true, settings: true });
        Ok(())
    }
}

/// The stored body of an event: feature, amount, model, input and output tokens, metadata.
type EventBody = (String, i64, Option<String>, Option<i64>, Option<i64>, Option<String>);

/// Whether two stored event bodies (feature, amount, model, tokens, metadata) are the same use.
/// Metadata is compared as JSON, so a different key order is the same body.
fn same_body(a: &EventBody, b: &EventBody) -> bool {
    let meta = |m: &Option<String>| m.as_deref().map(|s| serde_json::from_str::<serde_json::Value>(s).ok());
    a.0 == b.0 && a.1 == b.1 && a.2 == b.2 && a.3 == b.3 && a.4 == b.4 && meta(&a.5) == meta(&b.5)
}

/// Moves a local user's data to `target` inside the caller's transaction.
fn attach(tx: &Connection, local: &str, target: &str) -> Result<()> {
    let ext: Option<Option<String>> = tx.query_row("SELECT external_id FROM users WHERE id = ?1", [local], |r| r.get(0)).optional()?;
    match ext {
        None => return Err(Error::NotFound(format!("user {local}"))),
        Some(Some(_)) => {
            return Err(Error::invalid(format!("attach_local must name a local user (without external_id); {local} is signed in")));
        }
        Some(None) if local == target => return Err(Error::invalid("cannot attach a user to itself")),
        Some(None) => {}
    }
    // Events keep their ids: they will sync once, under the signed-in account. An id the
    // account already holds with the same body is the same use recorded twice (a retry, or a
    // key reused on purpose): the account's copy stays and the local copy goes. The same id with
    // another body is a conflict, and nothing moves. Only an indexed event can hold an id twice
    // (an unkeyed use's id carries its own sequence number).
    let clashes: Vec<(String, EventBody, EventBody)> = tx
        .prepare(
            "SELECT l.id, l.feature, l.amount, l.model, l.input_tokens, l.output_tokens, l.metadata,
                    t.feature, t.amount, t.model, t.input_tokens, t.output_tokens, t.metadata
             FROM events l JOIN events t ON t.user_id = ?2 AND t.id = l.id AND t.indexed = 1 WHERE l.user_id = ?1 ORDER BY l.id",
        )?
        .query_map([local, target], |r| {
            Ok((
                r.get(0)?,
                (r.get(1)?, r.get(2)?, r.get(3)?, r.get(4)?, r.get(5)?, r.get(6)?),
                (r.get(7)?, r.get(8)?, r.get(9)?, r.get(10)?, r.get(11)?, r.get(12)?),
            ))
        })?
        .collect::<rusqlite::Result<_>>()?;
    if let Some((id, _, _)) = clashes.iter().find(|(_, l, t)| !same_body(l, t)) {
        return Err(Error::IdempotencyConflict(id.clone()));
    }
    crate::ledger::keep_seq_floor(tx)?;
    for (id, _, _) in &clashes {
        tx.execute("DELETE FROM events WHERE user_id = ?1 AND id = ?2 AND indexed = 1", [local, id])?;
    }
    tx.execute("UPDATE events SET user_id = ?2 WHERE user_id = ?1", [local, target])?;
    tx.execute(
        "UPDATE users SET pending_from = min(pending_from, (SELECT pending_from FROM users WHERE id = ?1)) WHERE id = ?2",
        [local, target],
    )?;
    // Settings: the later HLC wins per key.
    tx.execute(
        "INSERT INTO settings (user_id, key, value, deleted, hlc, dirty, rejected)
         SELECT ?2, key, value, deleted, hlc, dirty, rejected FROM settings WHERE user_id = ?1
         ON CONFLICT (user_id, key) DO UPDATE SET value = excluded.value, deleted = excluded.deleted,
           hlc = excluded.hlc, dirty = excluded.dirty, rejected = excluded.rejected WHERE excluded.hlc > settings.hlc",
        [local, target],
    )?;
    tx.execute(
        "INSERT OR IGNORE INTO credit_grants (user_id, id, remaining, expires_at, source)
         SELECT ?2, id, remaining, expires_at, source FROM credit_grants WHERE user_id = ?1",
        [local, target],
    )?;
    // Counters are rebuilt from the ledger under the target's timezone and plan.
    tx.execute("DELETE FROM counter_rules WHERE user_id = ?1", [target])?;
    tx.execute("DELETE FROM users WHERE id = ?1", [local])?;
    Ok(())
}
