//! Observing changes: the one core listener of a [`crate::Tally`] (the [`Hub`]) fans each
//! committed change out to the app's [`ChangeListener`], to any number of [`ChangeObserver`]s
//! (handed the user's [`CustomerInfo`] after the change) and to the library's own watchers
//! (auto-sync). None of them replaces another.

use crate::customer::{CustomerInfo, customer_info};
use std::panic::{AssertUnwindSafe, catch_unwind};
use std::sync::atomic::{AtomicI64, Ordering};
use std::sync::{Arc, OnceLock, RwLock, Weak};
use tally_core as core;

/// What changed for a user.
#[derive(Debug, Clone, Copy, PartialEq, Eq, uniffi::Record)]
pub struct Change {
    /// Usage counters changed (consume, sync).
    pub usage: bool,
    /// Entitlements changed (plan, token, sign-in).
    pub entitlements: bool,
    /// Settings changed.
    pub settings: bool,
}

impl From<core::Change> for Change {
    fn from(c: core::Change) -> Self {
        Change { usage: c.usage, entitlements: c.entitlements, settings: c.settings }
    }
}

/// The single listener slot of `set_listener`, implemented by the app. Called after the change
/// is committed, on the thread that made it (return quickly; hop to your own queue or
/// coroutine). Observers added with `add_observer` are told as well.
#[uniffi::export(with_foreign)]
pub trait ChangeListener: Send + Sync {
    /// `user_id`'s data changed as described by `change`.
    fn on_change(&self, user_id: String, change: Change);
}

/// One committed change and the user's state after it.
#[derive(Debug, Clone, PartialEq, uniffi::Record)]
pub struct UserChange {
    /// The user whose data changed.
    pub user_id: String,
    /// What changed.
    pub change: Change,
    /// The user's state after the change (absent once the user is deleted or attached to an
    /// account).
    pub info: Option<CustomerInfo>,
    /// Whether `user_id` is the current user (see `current_user`) after the change.
    pub is_current_user: bool,
}

/// An observer added with `add_observer` (any number at once). Called after the change is
/// committed, on the thread that made it: return quickly.
#[uniffi::export(with_foreign)]
pub trait ChangeObserver: Send + Sync {
    /// A change of one user's data, with their state after it.
    fn on_user_change(&self, change: UserChange);
}

/// A watcher inside the library (auto-sync), told `(user_id, change)`.
pub(crate) type Watcher = Arc<dyn Fn(&str, Change) + Send + Sync>;

/// The core's one listener; see the module documentation.
#[derive(Default)]
pub(crate) struct Hub {
    core: OnceLock<Weak<core::Tally>>,
    listener: RwLock<Option<Arc<dyn ChangeListener>>>,
    observers: RwLock<Vec<(i64, Arc<dyn ChangeObserver>)>>,
    watchers: RwLock<Vec<(i64, Watcher)>>,
    next_id: AtomicI64,
}

fn read<T: Clone>(lock: &RwLock<T>) -> T {
    lock.read().unwrap_or_else(|e| e.into_inner()).clone()
}

impl Hub {
    /// Registers a new hub as `tally`'s listener.
    pub(crate) fn install(tally: &Arc<core::Tally>) -> Arc<Hub> {
        let hub = Arc::new(Hub::default());
        let _ = hub.core.set(Arc::downgrade(tally));
        tally.set_listener(hub.clone());
        hub
    }

    pub(crate) fn set_listener(&self, listener: Option<Arc<dyn ChangeListener>>) {
        *self.listener.write().unwrap_or_else(|e| e.into_inner()) = listener;
    }

    fn id(&self) -> i64 {
        self.next_id.fetch_add(1, Ordering::Relaxed) + 1
    }

    pub(crate) fn add_observer(&self, observer: Arc<dyn ChangeObserver>) -> i64 {
        let id = self.id();
        self.observers.write().unwrap_or_else(|e| e.into_inner()).push((id, observer));
        id
    }

    /// Removes an observer; whether it was there.
    pub(crate) fn remove_observer(&self, id: i64) -> bool {
        let mut v = self.observers.write().unwrap_or_else(|e| e.into_inner());
        let before = v.len();
        v.retain(|(i, _)| *i != id);
        v.len() != before
    }

    pub(crate) fn observer_count(&self) -> usize {
        self.observers.read().unwrap_or_else(|e| e.into_inner()).len()
    }

    pub(crate) fn add_watcher(&self, watcher: Watcher) -> i64 {
        let id = self.id();
        self.watchers.write().unwrap_or_else(|e| e.into_inner()).push((id, watcher));
        id
    }

    pub(crate) fn remove_watcher(&self, id: i64) {
        self.watchers.write().unwrap_or_else(|e| e.into_inner()).retain(|(i, _)| *i != id);
    }
}

impl core::ChangeListener for Hub {
    // A callback that throws is ignored: the change is committed and the caller must still get
    // its answer (and the other observers their turn).
    fn on_change(&self, user_id: &str, change: core::Change) {
        let change = Change::from(change);
        if let Some(l) = read(&self.listener) {
            let _ = catch_unwind(AssertUnwindSafe(|| l.on_change(user_id.to_string(), change)));
        }
        for (_, w) in read(&self.watchers) {
            let _ = catch_unwind(AssertUnwindSafe(|| w(user_id, change)));
        }
        let observers = read(&self.observers);
        let Some(tally) = self.core.get().and_then(Weak::upgrade) else { return };
        if observers.is_empty() {
            return;
        }
        let event = UserChange {
            user_id: user_id.to_string(),
            change,
            info: customer_info(&tally, user_id).ok(),
            is_current_user: tally.find_current_user().ok().flatten().is_some_and(|u| u.id == user_id),
        };
        for (_, o) in observers {
            let _ = catch_unwind(AssertUnwindSafe(|| o.on_user_change(event.clone())));
        }
    }
}
