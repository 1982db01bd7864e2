//! The current user, for apps with one user at a time (RevenueCat's `Purchases` model): a
//! convenience over the multi-user API, kept in the users table itself (no state of its own).
//!
//! The current user is the signed-in account (the one signed in or changed last, should an app
//! mix this with the multi-user API), else the device's anonymous local user (the oldest one),
//! created on first use. [`Tally::log_in`] attaches the anonymous user's data to the account and
//! makes it current; [`Tally::log_out`] signs it out and makes an anonymous user current again.

use crate::error::Result;
use crate::users::{USER_COLS, get_user, user_row};
use crate::{Change, Profile, Tally, User, ms, write_tx};
use rusqlite::{Connection, OptionalExtension, params};

/// The current user as stored, if there is one yet.
fn find_current(conn: &Connection) -> Result<Option<User>> {
    let signed_in = conn
        .prepare_cached(&format!(
            "SELECT {USER_COLS} FROM users WHERE signed_in = 1 AND external_id IS NOT NULL ORDER BY updated_at DESC, id DESC LIMIT 1"
        ))?
        .query_row([], user_row)
        .optional()?;
    if signed_in.is_some() {
        return Ok(signed_in);
    }
    Ok(conn
        .prepare_cached(&format!("SELECT {USER_COLS} FROM users WHERE external_id IS NULL ORDER BY created_at, id LIMIT 1"))?
        .query_row([], user_row)
        .optional()?)
}

impl Tally {
    /// The current user if there is one yet (never creates one).
    pub fn find_current_user(&self) -> Result<Option<User>> {
        find_current(&self.lock().conn)
    }

    /// The current user: the signed-in account, else the anonymous local user (created on the
    /// first call, then the same one until it logs in).
    pub fn current_user(&self) -> Result<User> {
        let mut g = self.lock();
        if let Some(user) = find_current(&g.conn)? {
            return Ok(user);
        }
        let now = ms(self.observe_now(&mut g));
        let id = uuid::Uuid::now_v7().to_string();
        write_tx(&mut g.conn, |tx| {
            // Another process sharing the file may have created one since.
            if let Some(user) = find_current(tx)? {
                return Ok(user);
            }
            tx.execute("INSERT INTO users (id, created_at, updated_at) VALUES (?1, ?2, ?2)", params![id, now])?;
            get_user(tx, &id)
        })
    }

    /// Logs `profile` in and makes the account current. An anonymous current user's events,
    /// settings and credits move to the account (none lost, none counted twice, as
    /// [`Tally::sign_in`] with `attach_local`); another signed-in current account is signed out
    /// afterwards (its unsynced events are kept). A failure changes nothing.
    pub fn log_in(&self, profile: Profile) -> Result<User> {
        let current = self.current_user()?;
        match current.external_id.as_deref() {
            None => self.sign_in(profile, Some(&current.id)),
            Some(ext) if ext == profile.external_id => self.sign_in(profile, None),
            Some(_) => {
                let user = self.sign_in(profile, None)?;
                self.sign_out(&current.id)?;
                Ok(user)
            }
        }
    }

    /// Signs the current account out (its unsynced events are kept) and returns the anonymous
    /// user that is current now. When the current user is already anonymous, nothing changes.
    pub fn log_out(&self) -> Result<User> {
        let current = self.current_user()?;
        if current.external_id.is_none() {
            return Ok(current);
        }
        self.sign_out(&current.id)?;
        let anonymous = self.current_user()?;
        // Observers of the current user learn about the one who took over.
        self.notify(&anonymous.id, Change { usage: true, entitlements: true, settings: true });
        Ok(anonymous)
    }
}

#[cfg(test)]
mod tests {
    use crate::{Catalog, Config, Error, Profile, Tally, UsageMeta};

    fn tally() -> Tally {
        let catalog = Catalog::from_json(
            r#"{"plans":[{"id":"free","features":{"notes":{"type":"metered","limit":10,"period":"month","enforcement":"hard"}}}]}"#,
        )
        .unwrap();
        Tally::open_in_memory(Config { catalog, ..Config::default() }).unwrap()
    }

    fn profile(sub: &str) -> Profile {
        Profile { external_id: sub.into(), ..Profile::default() }
    }

    #[test]
    fn the_anonymous_user_is_created_once_and_stays_current() {
        let t = tally();
        let a = t.current_user().unwrap();
        assert_eq!(a.external_id, None);
        assert_eq!(t.current_user().unwrap(), a);
        assert_eq!(t.users().unwrap().len(), 1);
    }

    #[test]
    fn log_in_attaches_the_anonymous_user_and_log_out_starts_a_new_one() {
        let t = tally();
        let anon = t.current_user().unwrap();
        t.consume(&anon.id, "notes", 2, UsageMeta::default()).unwrap();
        let ada = t.log_in(profile("ada")).unwrap();
        assert_eq!(ada.external_id.as_deref(), Some("ada"));
        assert_eq!(t.current_user().unwrap().id, ada.id);
        assert_eq!(t.usage(&ada.id, "notes").unwrap().used, 2, "the anonymous uses moved to the account");
        assert!(matches!(t.user(&anon.id), Err(Error::NotFound(_))), "the anonymous user was attached");
        // Logging in again as the same account keeps it; another account replaces it.
        assert_eq!(t.log_in(profile("ada")).unwrap().id, ada.id);
        let bob = t.log_in(profile("bob")).unwrap();
        assert_eq!(t.current_user().unwrap().id, bob.id);
        assert!(!t.user(&ada.id).unwrap().signed_in, "the previous account was signed out");
        assert_eq!(t.usage(&bob.id, "notes").unwrap().used, 0);

        let fresh = t.log_out().unwrap();
        assert_eq!(fresh.external_id, None);
        assert_ne!(fresh.id, anon.id);
        assert_eq!(t.current_user().unwrap().id, fresh.id);
        assert_eq!(t.log_out().unwrap().id, fresh.id, "logging out an anonymous user changes nothing");
    }

    #[test]
    fn a_bad_profile_changes_nothing() {
        let t = tally();
        let ada = t.log_in(profile("ada")).unwrap();
        let before = t.users().unwrap();
        assert!(matches!(t.log_in(profile("")), Err(Error::InvalidInput(_))));
        assert_eq!(t.users().unwrap(), before);
        assert_eq!(t.current_user().unwrap().id, ada.id);
    }
}
