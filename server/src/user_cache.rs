//! The users this server process resolved recently, by subject, so that a bearer's read
//! (`GET /v1/entitlements`) needs no database round trip at all.
//!
//! Postgres announces every change of a user row on the [`CHANNEL`] channel (a trigger, in the
//! migration `V13__user_changes`), after the change commits, whichever replica made it. Each
//! process listens on a connection of its own and drops the entry of the subject named. Entries
//! are served only while that connection is known to be live (a heartbeat every
//! [`HEARTBEAT`]); a process that loses it serves none until it listens again, so a missed
//! announcement can never leave a stale entry in use. A process's own writes drop the entry
//! themselves before they commit ([`UserCache::evict_user`]), so a client reads its own change
//! on the next request without waiting for the announcement.
//!
//! An entry read while a change was being announced is never stored: every eviction moves a
//! generation counter, and [`UserCache::put`] stores only what was read under the generation
//! it started with.

use crate::users::{IdClaims, User};
use chrono::{DateTime, Utc};
use std::collections::HashMap;
use std::sync::Mutex;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::time::{Duration, Instant};
use uuid::Uuid;

/// The notification channel of user-row changes (payload: the subject).
pub const CHANNEL: &str = "tally_users";
/// How often the listening connection proves it is live.
pub const HEARTBEAT: Duration = Duration::from_secs(1);
/// The `application_name` of the listening connection (in `pg_stat_activity`).
pub const APPLICATION_NAME: &str = "tally-user-changes";
/// The longest an entry is served, announcements or not.
pub const MAX_AGE: Duration = Duration::from_secs(60);
/// Most subjects one process keeps.
const MAX_ENTRIES: usize = 100_000;

struct Entry {
    user: User,
    /// When an earlier account of this subject was deleted (tokens issued before it are refused).
    deleted_at: Option<DateTime<Utc>>,
    at: Instant,
}

#[derive(Default)]
struct Entries {
    by_subject: HashMap<String, Entry>,
    subject_of: HashMap<Uuid, String>,
}

/// Resolved users by subject, valid while this process hears every change (see the module).
#[derive(Default)]
pub struct UserCache {
    entries: Mutex<Entries>,
    generation: AtomicU64,
    live: AtomicBool,
}

impl UserCache {
    /// The cached user of `claims.sub`, when one is held, fresh and served now; `None` sends
    /// the caller to the database. A token issued before an earlier deletion of the subject is
    /// never answered from here.
    pub fn get(&self, claims: &IdClaims) -> Option<User> {
        if !self.live.load(Ordering::Acquire) {
            return None;
        }
        let entries = self.entries.lock().ok()?;
        let e = entries.by_subject.get(&claims.sub)?;
        if e.at.elapsed() >= MAX_AGE {
            return None;
        }
        if let Some(deleted) = e.deleted_at
            && claims.iat.is_none_or(|iat| iat <= deleted.timestamp())
        {
            return None;
        }
        Some(e.user.clone())
    }

    /// The generation to pass to [`UserCache::put`], taken before the database read.
    pub fn generation(&self) -> u64 {
        self.generation.load(Ordering::Acquire)
    }

    /// Stores `user` as read from the database under `generation`: only when nothing was
    /// evicted since, and only while listening.
    pub fn put(&self, user: &User, deleted_at: Option<DateTime<Utc>>, generation: u64) {
        let Some(subject) = user.external_id.clone() else { return };
        if !self.live.load(Ordering::Acquire) {
            return;
        }
        let Ok(mut entries) = self.entries.lock() else { return };
        // Checked under the lock every eviction takes: no eviction can slip in between.
        if self.generation.load(Ordering::Acquire) != generation {
            return;
        }
        if entries.by_subject.len() >= MAX_ENTRIES {
            entries.by_subject.retain(|_, e| e.at.elapsed() < MAX_AGE);
            if entries.by_subject.len() >= MAX_ENTRIES {
                *entries = Entries::default();
            }
            let live: std::collections::HashSet<Uuid> = entries.by_subject.values().map(|e| e.user.user_id).collect();
            entries.subject_of.retain(|id, _| live.contains(id));
        }
        entries.subject_of.insert(user.user_id, subject.clone());
        entries.by_subject.insert(subject, Entry { user: user.clone(), deleted_at, at: Instant::now() });
    }

    /// Drops the entry of `subject` (an announced change).
    pub fn evict_subject(&self, subject: &str) {
        if let Ok(mut entries) = self.entries.lock() {
            self.generation.fetch_add(1, Ordering::AcqRel);
            if let Some(e) = entries.by_subject.remove(subject) {
                entries.subject_of.remove(&e.user.user_id);
            }
        }
    }

    /// Drops the entry of the user `user_id` (this process is changing the row).
    pub fn evict_user(&self, user_id: Uuid) {
        if let Ok(mut entries) = self.entries.lock() {
            self.generation.fetch_add(1, Ordering::AcqRel);
            if let Some(subject) = entries.subject_of.remove(&user_id) {
                entries.by_subject.remove(&subject);
            }
        }
    }

    /// Starts (`true`, once listening) or stops (`false`, the connection is lost) serving
    /// entries; either way, everything held is dropped.
    fn set_live(&self, live: bool) {
        if let Ok(mut entries) = self.entries.lock() {
            self.generation.fetch_add(1, Ordering::AcqRel);
            *entries = Entries::default();
            self.live.store(live, Ordering::Release);
        }
    }

    /// Whether entries are served now (the listening connection is live).
    pub fn is_live(&self) -> bool {
        self.live.load(Ordering::Acquire)
    }
}

/// Listens for user changes on a connection of its own to `url` for as long as `cache` is
/// alive elsewhere (the server state holds it), reconnecting after a loss.
pub fn spawn_listener(cache: std::sync::Weak<UserCache>, url: String, connect_timeout: Duration) {
    tokio::spawn(async move {
        let mut backoff = Duration::from_millis(200);
        loop {
            let Some(c) = cache.upgrade() else { return };
            match listen(&c, &url, connect_timeout, &cache).await {
                Ok(()) => return, // the state is gone
                Err(e) => {
                    c.set_live(false);
                    tracing::warn!(error = %e, "user change announcements lost: the user cache is off until they resume");
                }
            }
            drop(c);
            tokio::time::sleep(backoff).await;
            backoff = (backoff * 2).min(Duration::from_secs(5));
        }
    });
}

/// One listening session: connects, `LISTEN`s, serves, and proves the connection live every
/// [`HEARTBEAT`]. Returns `Ok` when the state is dropped, `Err` when the connection fails.
async fn listen(c: &UserCache, url: &str, connect_timeout: Duration, weak: &std::sync::Weak<UserCache>) -> Result<(), String> {
    use futures::StreamExt;
    let mut config: tokio_postgres::Config = url.parse().map_err(|e: tokio_postgres::Error| e.to_string())?;
    config.connect_timeout(connect_timeout);
    config.application_name(APPLICATION_NAME);
    let (client, mut connection) = tokio::time::timeout(connect_timeout, config.connect(tokio_postgres::NoTls))
        .await
        .map_err(|_| "connect timed out")?
        .map_err(|e| e.to_string())?;
    let (tx, mut rx) = tokio::sync::mpsc::unbounded_channel::<String>();
    let driver = tokio::spawn(async move {
        let mut messages = futures::stream::poll_fn(move |cx| connection.poll_message(cx));
        while let Some(m) = messages.next().await {
            match m {
                Ok(tokio_postgres::AsyncMessage::Notification(n)) => {
                    if tx.send(n.payload().to_string()).is_err() {
                        return;
                    }
                }
                Ok(_) => {}
                Err(_) => return,
            }
        }
    });
    let _stop_driver = AbortOnDrop(driver);
    bounded(async { client.batch_execute(&format!("LISTEN {CHANNEL}")).await.map_err(|e| e.to_string()) }).await?;
    c.set_live(true);
    let mut beat = tokio::time::interval(HEARTBEAT);
    loop {
        tokio::select! {
            subject = rx.recv() => match subject {
                Some(s) => c.evict_subject(&s),
                None => return Err("the listening connection closed".into()),
            },
            _ = beat.tick() => {
                if weak.strong_count() <= 1 {
                    return Ok(()); // only this task holds it: the server state is gone
                }
                bounded(async { client.simple_query("").await.map(|_| ()).map_err(|e| e.to_string()) }).await?;
            }
        }
    }
}

/// `f`, failed when the connection does not answer within two heartbeats.
async fn bounded(f: impl std::future::Future<Output = Result<(), String>>) -> Result<(), String> {
    tokio::time::timeout(HEARTBEAT * 2, f).await.map_err(|_| "the listening connection stalled".to_string())?
}

/// Aborts a task when dropped.
struct AbortOnDrop(tokio::task::JoinHandle<()>);

impl Drop for AbortOnDrop {
    fn drop(&mut self) {
        self.0.abort();
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn user(sub: &str) -> User {
        let now = Utc::now();
        User {
            user_id: Uuid::now_v7(),
            external_id: Some(sub.into()),
            email: None,
            display_name: None,
            avatar_url: None,
            timezone: "UTC".into(),
            is_admin: false,
            ver: 1,
            created_at: now,
            updated_at: now,
            disabled_at: None,
            email_verified: false,
        }
    }

    fn claims(sub: &str, iat: Option<i64>) -> IdClaims {
        IdClaims { sub: sub.into(), email: None, email_verified: None, iat, name: None }
    }

    #[test]
    fn nothing_is_served_or_stored_unless_listening() {
        let c = UserCache::default();
        let u = user("ada");
        c.put(&u, None, c.generation());
        assert!(c.get(&claims("ada", None)).is_none());
        c.set_live(true);
        c.put(&u, None, c.generation());
        assert_eq!(c.get(&claims("ada", None)).map(|u| u.user_id), Some(u.user_id));
        c.set_live(false);
        assert!(c.get(&claims("ada", None)).is_none(), "a lost connection drops everything");
        c.set_live(true);
        assert!(c.get(&claims("ada", None)).is_none(), "and listening again starts empty");
    }

    #[test]
    fn a_read_that_raced_an_eviction_is_not_stored() {
        let c = UserCache::default();
        c.set_live(true);
        let u = user("ada");
        let g = c.generation();
        c.evict_subject("someone-else");
        c.put(&u, None, g);
        assert!(c.get(&claims("ada", None)).is_none(), "read before an announcement: maybe stale");
        c.put(&u, None, c.generation());
        assert!(c.get(&claims("ada", None)).is_some());
    }

    #[test]
    fn evictions_by_subject_and_by_user_id_drop_the_entry() {
        let c = UserCache::default();
        c.set_live(true);
        let (a, b) = (user("ada"), user("bob"));
        c.put(&a, None, c.generation());
        c.put(&b, None, c.generation());
        c.evict_subject("ada");
        assert!(c.get(&claims("ada", None)).is_none());
        assert!(c.get(&claims("bob", None)).is_some());
        c.evict_user(b.user_id);
        assert!(c.get(&claims("bob", None)).is_none());
    }

    #[test]
    fn a_token_older_than_an_earlier_deletion_is_sent_to_the_database() {
        let c = UserCache::default();
        c.set_live(true);
        let deleted = Utc::now();
        c.put(&user("ada"), Some(deleted), c.generation());
        assert!(c.get(&claims("ada", Some(deleted.timestamp() - 10))).is_none());
        assert!(c.get(&claims("ada", None)).is_none());
        assert!(c.get(&claims("ada", Some(deleted.timestamp() + 10))).is_some());
    }
}
