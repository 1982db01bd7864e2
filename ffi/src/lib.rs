//! # tally-ffi
//!
//! The UniFFI surface of [`tally_core`] for Swift and Kotlin: one [`Tally`] object, the core's
//! enums as they are (its `uniffi` feature), records converting its structs, one error enum
//! ([`TallyError`]), a foreign clock ([`TallyClock`]), change observers handed a
//! [`CustomerInfo`] snapshot ([`ChangeObserver`], and the single [`ChangeListener`] slot), a
//! current-user convenience (`current_user`, `log_in`, `log_out`) and auto-sync ([`AutoSync`]).
//!
//! This crate converts, it never decides: every method is a thin call into the core.
//! Conventions of the foreign API:
//! - integers are signed 64-bit (Kotlin `Long`, Swift `Int64`); a negative count or amount is
//!   `TallyError::InvalidInput` and changes nothing;
//! - timestamps are `i64` Unix **milliseconds** (UTC), fields suffixed `_ms`;
//! - JSON values (settings, metadata, catalogs) cross as strings, parsed here; a malformed
//!   one is `TallyError::InvalidInput` and changes nothing;
//! - no panic crosses the boundary: a panic becomes `TallyError::Internal`.

mod autosync;
mod changes;
mod config;
mod convert;
mod customer;
mod entitlements;
mod error;
mod items;
mod leases;
mod purchases;
mod quota;
mod sync;
mod users;

pub use autosync::{AutoSync, AutoSyncOptions, SyncStatus, SyncStatusListener};
pub use changes::{Change, ChangeListener, ChangeObserver, UserChange};
pub use config::{TallyClock, TallyConfig};
pub use convert::{from_ms, parse_json, parse_json_object, unsigned};
pub use customer::{ActivePurchase, CustomerInfo, EntitlementInfo, FeatureInfo, PurchaseKind};
pub use entitlements::{AccessGrant, CreditGrant, Entitlements, ModelPrice, Rule};
pub use error::{TallyError, guard};
pub use items::{UseItem, UseOutcome};
pub use leases::LeaseStatus;
pub use purchases::{GooglePurchase, Purchase, PurchaseOutcome, PurchaseReport};
pub use quota::{ConsumeItem, Decision, EventStatus, ReportRow, SettingStatus, Usage, UsageMeta};
pub use sync::{RejectedEvent, RejectedProfileField, RejectedSetting, SyncOptions, SyncReport, TokenProvider};
pub use tally_core::{Durability, Enforcement, GroupBy, Period, Reason, SubscriptionStatus};
pub use users::{Profile, User, UserUpdate};

use changes::Hub;
use convert::{object_json, signed};
use error::core as call;
use std::sync::Arc;

uniffi::setup_scaffolding!();

/// The device library: one SQLite database holding several users. Thread-safe: share one
/// instance across the app.
#[derive(uniffi::Object)]
pub struct Tally {
    inner: Arc<tally_core::Tally>,
    hub: Arc<Hub>,
}

impl std::fmt::Debug for Tally {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        self.inner.fmt(f)
    }
}

impl Tally {
    /// The wrapped core instance (for Rust code embedding both). Its listener is this object's
    /// observer hub: observe with `add_observer` / `set_listener` rather than replacing it.
    pub fn core(&self) -> &Arc<tally_core::Tally> {
        &self.inner
    }

    fn wrap(inner: tally_core::Tally) -> Arc<Self> {
        let inner = Arc::new(inner);
        let hub = Hub::install(&inner);
        Arc::new(Tally { inner, hub })
    }
}

#[uniffi::export]
impl Tally {
    /// Opens (or creates) the database file at `path`.
    #[uniffi::constructor]
    pub fn open(path: String, config: TallyConfig) -> Result<Arc<Self>, TallyError> {
        guard(|| {
            let config = tally_core::Config::try_from(config)?;
            Ok(Tally::wrap(tally_core::Tally::open(&path, config)?))
        })
    }

    /// Opens a private in-memory database (tests, previews).
    #[uniffi::constructor]
    pub fn open_in_memory(config: TallyConfig) -> Result<Arc<Self>, TallyError> {
        guard(|| {
            let config = tally_core::Config::try_from(config)?;
            Ok(Tally::wrap(tally_core::Tally::open_in_memory(config)?))
        })
    }

    /// This device's id.
    pub fn device_id(&self) -> Result<String, TallyError> {
        guard(|| Ok(self.inner.device_id()))
    }

    /// The highest wall time this device has seen (Unix ms; never goes backwards).
    pub fn highest_seen_time_ms(&self) -> Result<i64, TallyError> {
        guard(|| Ok(convert::to_ms(self.inner.highest_seen_time())))
    }

    // ---- observing changes ----------------------------------------------------------------

    /// Sets the listener slot (replacing the listener set before, never the observers added
    /// with `add_observer`).
    pub fn set_listener(&self, listener: Arc<dyn ChangeListener>) -> Result<(), TallyError> {
        guard(|| {
            self.hub.set_listener(Some(listener));
            Ok(())
        })
    }

    /// Empties the listener slot.
    pub fn clear_listener(&self) -> Result<(), TallyError> {
        guard(|| {
            self.hub.set_listener(None);
            Ok(())
        })
    }

    /// Adds an observer told every change with the user's [`CustomerInfo`] after it (any
    /// number at once); returns its id for `remove_observer`.
    pub fn add_observer(&self, observer: Arc<dyn ChangeObserver>) -> Result<i64, TallyError> {
        guard(|| Ok(self.hub.add_observer(observer)))
    }

    /// Removes an observer; whether it was registered.
    pub fn remove_observer(&self, id: i64) -> Result<bool, TallyError> {
        guard(|| Ok(self.hub.remove_observer(id)))
    }

    /// Number of observers registered.
    pub fn observer_count(&self) -> Result<i64, TallyError> {
        guard(|| Ok(self.hub.observer_count() as i64))
    }

    // ---- the current user -----------------------------------------------------------------

    /// The current user: the signed-in account, else the device's anonymous user (created on
    /// the first call). For apps with one user at a time; the multi-user calls work alongside.
    pub fn current_user(&self) -> Result<User, TallyError> {
        call(|| self.inner.current_user()).map(Into::into)
    }

    /// Logs the account of `external_id` in and makes it current: an anonymous current user's
    /// data moves to it (none lost, none counted twice); another current account is signed
    /// out (its unsynced events kept). A failure changes nothing.
    #[uniffi::method(default(email = None, display_name = None, avatar_url = None))]
    pub fn log_in(
        &self,
        external_id: String,
        email: Option<String>,
        display_name: Option<String>,
        avatar_url: Option<String>,
    ) -> Result<User, TallyError> {
        let profile = tally_core::Profile { external_id, email, display_name, avatar_url };
        call(|| self.inner.log_in(profile)).map(Into::into)
    }

    /// Signs the current account out (unsynced events kept) and returns the anonymous user that
    /// is current now. Call `release_leases` first when online.
    pub fn log_out(&self) -> Result<User, TallyError> {
        call(|| self.inner.log_out()).map(Into::into)
    }

    // ---- users ----------------------------------------------------------------------------

    /// Creates a user who has not signed in.
    #[uniffi::method(default(display_name = None))]
    pub fn create_local_user(&self, display_name: Option<String>) -> Result<User, TallyError> {
        call(|| self.inner.create_local_user(display_name.as_deref())).map(Into::into)
    }

    /// Signs a user in (upserts the account of `profile.external_id`). With `attach_local`, the
    /// named local user's data moves to that account (none lost, none counted twice).
    #[uniffi::method(default(attach_local = None))]
    pub fn sign_in(&self, profile: Profile, attach_local: Option<String>) -> Result<User, TallyError> {
        call(|| self.inner.sign_in(profile.into(), attach_local.as_deref())).map(Into::into)
    }

    /// Ends the user's session; unsynced events are kept.
    pub fn sign_out(&self, user_id: String) -> Result<(), TallyError> {
        call(|| self.inner.sign_out(&user_id))
    }

    /// One user.
    pub fn user(&self, user_id: String) -> Result<User, TallyError> {
        call(|| self.inner.user(&user_id)).map(Into::into)
    }

    /// All users on this device, oldest first.
    pub fn users(&self) -> Result<Vec<User>, TallyError> {
        call(|| self.inner.users()).map(|v| v.into_iter().map(Into::into).collect())
    }

    /// Changes a user's profile (a timezone change moves windows once the server's token carries it).
    pub fn update_user(&self, user_id: String, update: UserUpdate) -> Result<User, TallyError> {
        call(|| self.inner.update_user(&user_id, update.into())).map(Into::into)
    }

    /// Deletes a user and all their data; refuses while unsynced events exist unless `force`.
    #[uniffi::method(default(force = false))]
    pub fn delete_user(&self, user_id: String, force: bool) -> Result<(), TallyError> {
        call(|| self.inner.delete_user(&user_id, force))
    }

    // ---- settings (JSON strings) ----------------------------------------------------------

    /// All settings of a user (defaults overlaid with stored values), as a JSON object.
    pub fn settings(&self, user_id: String) -> Result<String, TallyError> {
        call(|| self.inner.settings(&user_id)).map(object_json)
    }

    /// One setting as JSON (absent when unset and without default).
    pub fn setting(&self, user_id: String, key: String) -> Result<Option<String>, TallyError> {
        call(|| self.inner.setting(&user_id, &key)).map(|v| v.map(|v| v.to_string()))
    }

    /// Where `key` stands with the server: not set, local-only, pending, synced, or rejected
    /// (with the reason; kept on the device, never resent until written again).
    pub fn setting_status(&self, user_id: String, key: String) -> Result<SettingStatus, TallyError> {
        call(|| self.inner.setting_status(&user_id, &key)).map(Into::into)
    }

    /// Sets one setting to a JSON value (`"null"` deletes it).
    pub fn set_setting(&self, user_id: String, key: String, value_json: String) -> Result<(), TallyError> {
        guard(|| {
            let value = convert::parse_json(&value_json, &format!("value of setting {key:?}"))?;
            Ok(self.inner.set_setting(&user_id, &key, value)?)
        })
    }

    /// Deletes one setting (back to its default, if any; same as `set_setting(key, "null")`).
    pub fn remove_setting(&self, user_id: String, key: String) -> Result<(), TallyError> {
        call(|| self.inner.set_setting(&user_id, &key, serde_json::Value::Null))
    }

    /// Merges a JSON object into the settings (`null` values delete keys).
    pub fn patch_settings(&self, user_id: String, changes_json: String) -> Result<(), TallyError> {
        guard(|| {
            let changes = convert::parse_json_object(&changes_json, "settings patch")?;
            Ok(self.inner.patch_settings(&user_id, changes)?)
        })
    }

    /// Replaces all settings with a JSON object (keys not named are deleted).
    pub fn replace_settings(&self, user_id: String, values_json: String) -> Result<(), TallyError> {
        guard(|| {
            let values = convert::parse_json_object(&values_json, "settings")?;
            Ok(self.inner.replace_settings(&user_id, values)?)
        })
    }

    // ---- catalog and entitlements ---------------------------------------------------------

    /// Replaces the plan catalog (validated; an invalid one changes nothing).
    pub fn set_catalog(&self, catalog_json: String) -> Result<(), TallyError> {
        call(|| {
            let catalog = tally_core::Catalog::from_json(&catalog_json)?;
            self.inner.set_catalog(catalog);
            Ok(())
        })
    }

    /// The plan catalog in use, as JSON.
    pub fn catalog_json(&self) -> Result<String, TallyError> {
        guard(|| Ok(self.inner.catalog().to_json()))
    }

    /// The user's resolved entitlements.
    pub fn entitlements(&self, user_id: String) -> Result<Entitlements, TallyError> {
        call(|| self.inner.entitlements(&user_id)).map(Into::into)
    }

    /// Sets a user's entitlement state locally (apps without a server).
    pub fn set_entitlements(&self, user_id: String, state: Entitlements) -> Result<(), TallyError> {
        guard(|| {
            let state = tally_core::Entitlements::try_from(state)?;
            Ok(self.inner.set_entitlements(&user_id, state)?)
        })
    }

    /// The user's credit balance (negative when overspent).
    pub fn credit_balance(&self, user_id: String) -> Result<i64, TallyError> {
        call(|| self.inner.credit_balance(&user_id))
    }

    // ---- quota and ledger -----------------------------------------------------------------

    /// Would using `amount` of `feature` be allowed? Records nothing.
    #[uniffi::method(default(amount = 1))]
    pub fn check(&self, user_id: String, feature: String, amount: i64) -> Result<Decision, TallyError> {
        let amount = unsigned(amount, "amount")?;
        call(|| self.inner.check(&user_id, &feature, amount)).map(Into::into)
    }

    /// Atomic check-and-record of a use. A denied use records nothing.
    #[uniffi::method(default(amount = 1, meta = None))]
    pub fn consume(&self, user_id: String, feature: String, amount: i64, meta: Option<UsageMeta>) -> Result<Decision, TallyError> {
        guard(|| {
            let amount = unsigned(amount, "amount")?;
            let meta = meta.map(tally_core::UsageMeta::try_from).transpose()?.unwrap_or_default();
            Ok(self.inner.consume(&user_id, &feature, amount, meta)?.into())
        })
    }

    /// Several uses at once, in one transaction; one decision per item.
    pub fn consume_many(&self, user_id: String, items: Vec<ConsumeItem>) -> Result<Vec<Decision>, TallyError> {
        guard(|| {
            let items = items.into_iter().map(tally_core::ConsumeItem::try_from).collect::<Result<Vec<_>, _>>()?;
            Ok(self.inner.consume_many(&user_id, &items)?.into_iter().map(Into::into).collect())
        })
    }

    /// A user's usage of `feature` in its current window.
    pub fn usage(&self, user_id: String, feature: String) -> Result<Usage, TallyError> {
        call(|| self.inner.usage(&user_id, &feature)).map(Into::into)
    }

    /// Usage with events in `[from_ms, to_ms)`, grouped, sorted by key.
    pub fn report(&self, user_id: String, from_ms: i64, to_ms: i64, group_by: GroupBy) -> Result<Vec<ReportRow>, TallyError> {
        guard(|| {
            let from = convert::from_ms(from_ms, "from_ms")?;
            let to = convert::from_ms(to_ms, "to_ms")?;
            Ok(self.inner.report(&user_id, from, to, group_by)?.into_iter().map(Into::into).collect())
        })
    }

    /// Number of events not yet acknowledged by a server.
    pub fn pending_events(&self, user_id: String) -> Result<i64, TallyError> {
        call(|| self.inner.pending_events(&user_id)).map(signed)
    }

    /// Whether the server has taken event `id` (an event id or idempotency key).
    pub fn event_status(&self, user_id: String, id: String) -> Result<EventStatus, TallyError> {
        call(|| self.inner.event_status(&user_id, &id)).map(Into::into)
    }
}

/// The event id an idempotency key maps to (a UUID is itself; anything else UUIDv5).
#[uniffi::export]
pub fn event_id_for_key(key: String) -> String {
    tally_core::ledger::event_id_for_key(&key).to_string()
}

/// Encrypts the unencrypted database file at `path` with `key`, in place (SQLCipher builds);
/// call it once, before opening the database with `encryption_key`.
#[uniffi::export]
pub fn encrypt_database(path: String, key: String) -> Result<(), TallyError> {
    guard(|| Ok(tally_core::encrypt_database(std::path::Path::new(&path), &key)?))
}

/// Validates a plan catalog JSON without using it (`InvalidCatalog` names the offending path).
#[uniffi::export]
pub fn validate_catalog(catalog_json: String) -> Result<(), TallyError> {
    call(|| tally_core::Catalog::from_json(&catalog_json).map(|_| ()))
}
