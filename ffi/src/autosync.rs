//! Auto-sync: a background task that syncs a user at an interval and shortly after each local
//! change, backs off after a failure that retrying may fix, and stops on one it cannot (an
//! `Unauthorized` token, a deleted or disabled account, …). Its [`SyncStatus`] is observable
//! (Kotlin `Flow`, Swift `AsyncStream`, through [`SyncStatusListener`]).

use crate::Tally;
use crate::changes::{Change, Hub};
use crate::convert::{opt_ms, signed, unsigned};
use crate::error::TallyError;
use crate::sync::{SyncOptions, spawned};
use std::panic::{AssertUnwindSafe, catch_unwind};
use std::sync::atomic::{AtomicBool, AtomicI64, Ordering};
use std::sync::{Arc, Mutex, OnceLock, RwLock, Weak};
use std::time::Duration;
use tally_core as core;
use tokio::sync::Notify;
use tokio::time::Instant;

/// How [`Tally::start_auto_sync`] syncs.
#[derive(uniffi::Record)]
pub struct AutoSyncOptions {
    /// The server and credentials (give a `token_provider`: the helper runs for hours).
    pub sync: SyncOptions,
    /// The user to sync; absent: the current user, whoever that is at each round (an
    /// anonymous current user is not synced until they log in).
    #[uniffi(default = None)]
    pub user_id: Option<String>,
    /// Time between two syncs when nothing changes, in ms (default 15 minutes).
    #[uniffi(default = 900000)]
    pub interval_ms: i64,
    /// Wait after a local change before syncing, in ms, so that a burst syncs once (default 2 s).
    #[uniffi(default = 2000)]
    pub debounce_ms: i64,
    /// First wait after a failed round, in ms; doubled each failure, with jitter (default 5 s).
    #[uniffi(default = 5000)]
    pub initial_backoff_ms: i64,
    /// Longest wait after failures, in ms (default 15 minutes).
    #[uniffi(default = 900000)]
    pub max_backoff_ms: i64,
}

/// Where auto-sync stands.
#[derive(Debug, Clone, Default, PartialEq, Eq, uniffi::Record)]
pub struct SyncStatus {
    /// Whether the helper still runs (false after `stop`, or after an error it cannot retry).
    pub running: bool,
    /// Whether a sync round is in flight.
    pub uploading: bool,
    /// The user synced last (or about to be).
    pub user_id: Option<String>,
    /// That user's uses not yet acknowledged by the server.
    pub pending: i64,
    /// When that user last completed a sync (Unix ms; absent = never).
    pub last_synced_at_ms: Option<i64>,
    /// The message of the last round's error (absent after a successful round).
    pub last_error: Option<String>,
    /// The `TallyError` variant of `last_error` (`Unauthorized`, `Network`, …).
    pub last_error_kind: Option<String>,
    /// Failed rounds in a row.
    pub consecutive_failures: i64,
}

/// Told every change of a [`SyncStatus`], on the library's sync thread (return quickly).
#[uniffi::export(with_foreign)]
pub trait SyncStatusListener: Send + Sync {
    /// The new status.
    fn on_status(&self, status: SyncStatus);
}

/// A running auto-sync helper; stops on [`AutoSync::stop`] or when dropped.
#[derive(uniffi::Object)]
pub struct AutoSync {
    shared: Arc<Shared>,
}

struct Shared {
    status: Mutex<SyncStatus>,
    listeners: RwLock<Vec<(i64, Arc<dyn SyncStatusListener>)>>,
    next_id: AtomicI64,
    /// A local change of the synced user (cut the interval short).
    changed: Notify,
    /// `sync_now` (cut any wait short).
    kick: Notify,
    stopped: AtomicBool,
    stop: Notify,
    hub: Weak<Hub>,
    watcher: Mutex<Option<i64>>,
}

impl Shared {
    fn status(&self) -> SyncStatus {
        self.status.lock().unwrap_or_else(|e| e.into_inner()).clone()
    }

    /// Applies `f` to the status and tells the listeners when it changed.
    fn update(&self, f: impl FnOnce(&mut SyncStatus)) {
        let new = {
            let mut s = self.status.lock().unwrap_or_else(|e| e.into_inner());
            let before = s.clone();
            f(&mut s);
            if *s == before {
                return;
            }
            s.clone()
        };
        let listeners = self.listeners.read().unwrap_or_else(|e| e.into_inner()).clone();
        for (_, l) in listeners {
            let _ = catch_unwind(AssertUnwindSafe(|| l.on_status(new.clone())));
        }
    }

    fn stop(&self) {
        self.stopped.store(true, Ordering::SeqCst);
        self.stop.notify_one();
        if let (Some(hub), Some(id)) = (self.hub.upgrade(), self.watcher.lock().unwrap_or_else(|e| e.into_inner()).take()) {
            hub.remove_watcher(id);
        }
    }

    /// Waits `wait`; a local change shortens the wait to `debounce` (unless `backing_off`),
    /// `sync_now` ends it. False once stopped.
    async fn pause(&self, wait: Duration, debounce: Duration, backing_off: bool) -> bool {
        let mut deadline = Instant::now() + wait;
        loop {
            if self.stopped.load(Ordering::SeqCst) {
                return false;
            }
            tokio::select! {
                _ = tokio::time::sleep_until(deadline) => return !self.stopped.load(Ordering::SeqCst),
                _ = self.changed.notified(), if !backing_off => deadline = deadline.min(Instant::now() + debounce),
                _ = self.kick.notified() => return !self.stopped.load(Ordering::SeqCst),
                _ = self.stop.notified() => return false,
            }
        }
    }
}

/// The runtime the helpers run on (one thread, started with the first helper).
fn runtime() -> Result<&'static tokio::runtime::Runtime, TallyError> {
    static RUNTIME: OnceLock<tokio::runtime::Runtime> = OnceLock::new();
    if let Some(rt) = RUNTIME.get() {
        return Ok(rt);
    }
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(1)
        .thread_name("tally-auto-sync")
        .enable_all()
        .build()
        .map_err(|e| TallyError::Internal { message: format!("cannot start the auto-sync thread: {e}") })?;
    Ok(RUNTIME.get_or_init(|| rt))
}

/// The timing of a helper, validated.
struct Timing {
    interval: Duration,
    debounce: Duration,
    backoff: core::RetryPolicy,
}

impl TryFrom<&AutoSyncOptions> for Timing {
    type Error = TallyError;
    fn try_from(o: &AutoSyncOptions) -> Result<Self, TallyError> {
        let ms = |v: i64, name: &str| unsigned(v, name).map(Duration::from_millis);
        let interval = ms(o.interval_ms, "interval_ms")?;
        if interval.is_zero() {
            return Err(TallyError::invalid("interval_ms must be positive"));
        }
        let backoff = core::RetryPolicy {
            max_attempts: 0,
            initial_backoff: ms(o.initial_backoff_ms, "initial_backoff_ms")?,
            max_backoff: ms(o.max_backoff_ms, "max_backoff_ms")?,
        };
        Ok(Timing { interval, debounce: ms(o.debounce_ms, "debounce_ms")?, backoff })
    }
}

/// The user a round syncs: the fixed one, else the current user when signed in.
fn target(tally: &core::Tally, fixed: Option<&str>) -> Result<Option<String>, TallyError> {
    Ok(match fixed {
        Some(id) => Some(tally.user(id)?.id),
        None => tally.find_current_user()?.filter(|u| u.external_id.is_some() && u.signed_in).map(|u| u.id),
    })
}

async fn run(tally: Weak<core::Tally>, shared: Arc<Shared>, options: core::SyncOptions, timing: Timing, fixed: Option<String>) {
    let mut backoff = timing.backoff.initial_backoff;
    let (mut wait, mut backing_off) = (Duration::ZERO, false);
    while shared.pause(wait, timing.debounce, backing_off).await {
        let Some(t) = tally.upgrade() else { break };
        let user = match target(&t, fixed.as_deref()) {
            Ok(Some(user)) => user,
            Ok(None) => {
                (wait, backing_off) = (timing.interval, false);
                continue;
            }
            Err(e) => {
                shared.update(|s| {
                    s.last_error = Some(e.to_string());
                    s.last_error_kind = Some(e.kind().into());
                });
                break;
            }
        };
        shared.update(|s| {
            s.uploading = true;
            s.user_id = Some(user.clone());
        });
        let inner = t.clone();
        let (u, o) = (user.clone(), options.clone());
        let result = spawned("auto-sync", async move { inner.sync(&u, o).await }).await;
        let pending = t.pending_events(&user).map(signed).unwrap_or_default();
        let synced = t.last_synced_at(&user).ok().flatten();
        drop(t);
        let fatal = result.as_ref().err().is_some_and(|e| !e.is_transient());
        shared.update(|s| {
            s.uploading = false;
            s.pending = pending;
            s.last_synced_at_ms = opt_ms(synced).or(s.last_synced_at_ms);
            match &result {
                Ok(_) => {
                    s.last_error = None;
                    s.last_error_kind = None;
                    s.consecutive_failures = 0;
                }
                Err(e) => {
                    s.last_error = Some(e.to_string());
                    s.last_error_kind = Some(e.kind().into());
                    s.consecutive_failures += 1;
                }
            }
        });
        if fatal {
            break;
        }
        (wait, backing_off) = match result {
            Ok(_) => {
                backoff = timing.backoff.initial_backoff;
                // Uses recorded during the round go out at once.
                (if pending > 0 { timing.debounce } else { timing.interval }, false)
            }
            Err(_) => {
                let (w, next) = timing.backoff.jittered(backoff);
                backoff = next;
                (w, true)
            }
        };
    }
    shared.stop();
    shared.update(|s| {
        s.running = false;
        s.uploading = false;
    });
}

#[uniffi::export]
impl Tally {
    /// Starts syncing in the background: at once, then every `interval_ms`, `debounce_ms` after
    /// each local change, with backoff after a failure that retrying may fix; stops on one it
    /// cannot (`Unauthorized`, `AccountDeleted`, `AccountDisabled`, `SubjectMismatch`,
    /// `Configuration`, …; see `SyncStatus.last_error_kind`). Several helpers may run at once.
    pub fn start_auto_sync(&self, options: AutoSyncOptions) -> Result<Arc<AutoSync>, TallyError> {
        crate::error::guard(|| {
            let timing = Timing::try_from(&options)?;
            let sync = core::SyncOptions::try_from(options.sync)?;
            if let Some(id) = &options.user_id {
                self.inner.user(id)?;
            }
            let rt = runtime()?;
            let shared = Arc::new(Shared {
                status: Mutex::new(SyncStatus { running: true, user_id: options.user_id.clone(), ..SyncStatus::default() }),
                listeners: RwLock::new(Vec::new()),
                next_id: AtomicI64::new(0),
                changed: Notify::new(),
                kick: Notify::new(),
                stopped: AtomicBool::new(false),
                stop: Notify::new(),
                hub: Arc::downgrade(&self.hub),
                watcher: Mutex::new(None),
            });
            let (weak, tally) = (Arc::downgrade(&shared), Arc::downgrade(&self.inner));
            let fixed = options.user_id.clone();
            let watcher = self.hub.add_watcher(Arc::new(move |user_id: &str, change: Change| {
                let (Some(shared), Some(t)) = (weak.upgrade(), tally.upgrade()) else { return };
                if shared.status().uploading || !(change.usage || change.settings) {
                    return;
                }
                let ours = match &fixed {
                    Some(id) => id == user_id,
                    None => t.find_current_user().ok().flatten().is_some_and(|u| u.id == user_id),
                };
                if ours {
                    let pending = t.pending_events(user_id).map(signed).unwrap_or_default();
                    shared.update(|s| {
                        if s.user_id.as_deref() == Some(user_id) {
                            s.pending = pending;
                        }
                    });
                    shared.changed.notify_one();
                }
            }));
            *shared.watcher.lock().unwrap_or_else(|e| e.into_inner()) = Some(watcher);
            rt.spawn(run(Arc::downgrade(&self.inner), shared.clone(), sync, timing, options.user_id));
            Ok(Arc::new(AutoSync { shared }))
        })
    }
}

#[uniffi::export]
impl AutoSync {
    /// The current status.
    pub fn status(&self) -> SyncStatus {
        self.shared.status()
    }

    /// Syncs now (ends the current wait, backoff included).
    pub fn sync_now(&self) {
        self.shared.kick.notify_one();
    }

    /// Stops the helper (a round in flight completes first); idempotent.
    pub fn stop(&self) {
        self.shared.stop();
    }

    /// Registers a status listener (any number); returns its id for `remove_status_listener`.
    pub fn add_status_listener(&self, listener: Arc<dyn SyncStatusListener>) -> i64 {
        let id = self.shared.next_id.fetch_add(1, Ordering::Relaxed) + 1;
        self.shared.listeners.write().unwrap_or_else(|e| e.into_inner()).push((id, listener));
        id
    }

    /// Removes a status listener.
    pub fn remove_status_listener(&self, id: i64) {
        self.shared.listeners.write().unwrap_or_else(|e| e.into_inner()).retain(|(i, _)| *i != id);
    }
}

impl std::fmt::Debug for AutoSync {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("AutoSync").field("status", &self.status()).finish()
    }
}

impl Drop for AutoSync {
    fn drop(&mut self) {
        self.shared.stop();
    }
}
