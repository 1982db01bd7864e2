//! # tally-core
//!
//! Offline-first entitlements, quota checks and usage metering on SQLite.
//!
//! A [`Tally`] owns one SQLite file holding several users: their settings, entitlements, an
//! immutable usage **ledger** and the counters that make quota decisions O(1). Everything works
//! offline; the `sync` module reconciles the ledger with a Tally server.
//!
//! ```no_run
//! use tally_core::{Catalog, Config, Tally, UsageMeta};
//! let catalog = Catalog::from_json(r#"{"plans":[{"id":"free","features":{
//!     "ai_chat":{"type":"metered","limit":5,"period":"month","enforcement":"hard"}}}]}"#)?;
//! let tally = Tally::open("app.db", Config { catalog, ..Config::default() })?;
//! let user = tally.create_local_user(Some("Ada"))?;
//! let d = tally.consume(&user.id, "ai_chat", 1, UsageMeta::default())?;
//! assert!(d.allowed);
//! # Ok::<(), tally_core::Error>(())
//! ```

pub mod catalog;
pub mod clock;
pub mod contract;
pub mod credits;
pub mod current;
pub mod db;
pub mod decision;
pub mod entitlements;
pub mod error;
pub mod hlc;
pub mod items;
pub mod lease;
pub mod leases;
pub mod ledger;
pub mod period;
pub mod purchases;
pub mod quota;
pub mod report;
pub mod session;
pub mod settings;
pub mod subscription;
pub mod sync;
pub mod timezone_history;
pub mod token;
pub mod users;
pub mod void;
pub mod wire;

mod access;
mod tail;

// The enums deriving `uniffi::Enum` (feature `uniffi`) belong to this crate's UniFFI component.
#[cfg(feature = "uniffi")]
uniffi::setup_scaffolding!();

pub use catalog::{Catalog, Enforcement, ModelPrice, Plan, Product, ProductKind, Rule, Store};
pub use clock::{Clock, ManualClock, SystemClock};
pub use db::{Durability, encrypt_database};
pub use decision::{Decision, Reason};
pub use entitlements::{AccessGrant, CreditGrant, EntitlementClaims, Entitlements, SubscriptionStatus};
pub use error::{Error, Result};
pub use items::{UseItem, UseOutcome};
pub use leases::{LeaseRequest, LeaseStatus};
pub use ledger::{ConsumeItem, EventStatus, UsageMeta};
pub use period::{Period, Window};
pub use purchases::{GooglePurchase, Purchase, PurchaseOutcome, PurchaseReport};
pub use quota::Usage;
pub use report::{GroupBy, ReportRow};
pub use session::{PasswordSession, SessionTokens};
pub use settings::SettingStatus;
pub use subscription::Subscription;
pub use sync::{RetryPolicy, SyncOptions, SyncReport, TokenProvider};
pub use timezone_history::{TimezoneHistory, ZoneChange};
pub use users::{Profile, User, UserUpdate};

use chrono::{DateTime, Duration, Utc};
use rusqlite::Connection;
use serde_json::{Map, Value};
use std::collections::HashMap;
use std::path::Path;
use std::sync::{Arc, Mutex, MutexGuard, RwLock};

/// A user id (UUID v7, as a string).
pub type UserId = String;

/// Configuration of a [`Tally`].
#[derive(Clone)]
pub struct Config {
    /// This device's id; generated once and persisted when absent.
    pub device_id: Option<String>,
    /// Time source (system clock by default).
    pub clock: Arc<dyn Clock>,
    /// Commit durability.
    pub durability: Durability,
    /// Settings every user starts with (stored values win).
    pub default_settings: Map<String, Value>,
    /// Setting keys that never leave the device.
    pub local_only_settings: Vec<String>,
    /// Plans and model pricing.
    pub catalog: Catalog,
    /// How long a past-due subscription keeps access.
    pub past_due_grace: Duration,
    /// How long an expired entitlements token is still honoured offline.
    pub token_grace: Duration,
    /// How long to wait for another process holding the database lock.
    pub busy_timeout: std::time::Duration,
    /// The sync server's token-signing keys (its `GET /v1/keys` JWKS JSON, shipped with the
    /// app). Without them no entitlements token is trusted and `sync` is
    /// [`Error::Configuration`].
    pub server_keys: Option<String>,
    /// Protocol 2: features whose leases every sync asks for, used or not, so that they work
    /// offline (while this device has not used one in this or the previous window, the server
    /// grants at most half its fair share).
    pub offline_features: Vec<String>,
    /// SQLCipher key of the database (builds with the `sqlcipher` feature; from the app's
    /// Keychain or Keystore). An existing unencrypted file is never re-created encrypted:
    /// convert it once with [`db::encrypt_database`].
    pub encryption_key: Option<String>,
}

impl std::fmt::Debug for Config {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Config")
            .field("device_id", &self.device_id)
            .field("clock", &self.clock)
            .field("durability", &self.durability)
            .field("default_settings", &self.default_settings)
            .field("local_only_settings", &self.local_only_settings)
            .field("catalog", &self.catalog)
            .field("past_due_grace", &self.past_due_grace)
            .field("token_grace", &self.token_grace)
            .field("busy_timeout", &self.busy_timeout)
            .field("server_keys", &self.server_keys)
            .field("offline_features", &self.offline_features)
            // The key itself is never printed.
            .field("encryption_key", &self.encryption_key.as_ref().map(|_| "<set>"))
            .finish()
    }
}

impl Default for Config {
    fn default() -> Self {
        Config {
            device_id: None,
            clock: Arc::new(SystemClock),
            durability: Durability::Normal,
            default_settings: Map::new(),
            local_only_settings: Vec::new(),
            catalog: Catalog::builtin(),
            past_due_grace: Duration::days(3),
            token_grace: Duration::days(3),
            busy_timeout: std::time::Duration::from_secs(10),
            server_keys: None,
            offline_features: Vec::new(),
            encryption_key: None,
        }
    }
}

/// What changed for a user (told to the [`ChangeListener`] after commit).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct Change {
    /// Usage counters changed (consume, sync).
    pub usage: bool,
    /// Entitlements changed (plan, token, sign-in).
    pub entitlements: bool,
    /// Settings changed.
    pub settings: bool,
}

/// Observer of changes, called after the change is committed (never under a lock).
pub trait ChangeListener: Send + Sync {
    /// `user_id`'s data changed as described by `change`.
    fn on_change(&self, user_id: &str, change: Change);
}

/// The device library: one SQLite database, several users.
pub struct Tally {
    inner: Mutex<Inner>,
    /// Pools whose lease refused a use since the last sync (`lease_exhausted`): asked for on
    /// the next sync ([`crate::leases::LeaseAsks`]).
    lease_asks: crate::leases::LeaseAsks,
    config: Config,
    catalog: RwLock<Arc<Catalog>>,
    listener: RwLock<Option<Arc<dyn ChangeListener>>>,
}

impl std::fmt::Debug for Tally {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Tally").field("device_id", &self.device_id()).finish_non_exhaustive()
    }
}

pub(crate) struct Inner {
    pub(crate) conn: Connection,
    pub(crate) device_id: String,
    /// Highest wall time seen (ms).
    pub(crate) highest_seen_ms: i64,
    /// The highest wall time last stored in the `device` row (stored again a second later).
    pub(crate) highest_stored_ms: i64,
    /// Resolved access per user, dropped on any change.
    pub(crate) access: HashMap<String, Arc<access::Access>>,
    /// (user, feature) pairs whose counters were checked against their rule.
    pub(crate) verified: HashMap<String, std::collections::HashSet<String>>,
    /// (user, grant id) of plan credits known to be stored.
    pub(crate) plan_credits: std::collections::HashSet<(String, String)>,
    /// `PRAGMA data_version` when the caches were filled (another process may write).
    pub(crate) data_version: i64,
    /// The events whose counters are not yet written, as this connection last saw them.
    pub(crate) tail: Option<tail::Tail>,
}

impl Tally {
    /// Opens (or creates) the database file at `path`.
    pub fn open(path: impl AsRef<Path>, config: Config) -> Result<Tally> {
        let conn = db::open(Some(path.as_ref()), config.durability, config.busy_timeout, config.encryption_key.as_deref())?;
        Tally::with_connection(conn, config)
    }

    /// Opens a private in-memory database (tests, previews).
    pub fn open_in_memory(config: Config) -> Result<Tally> {
        let conn = db::open(None, config.durability, config.busy_timeout, config.encryption_key.as_deref())?;
        Tally::with_connection(conn, config)
    }

    fn with_connection(conn: Connection, config: Config) -> Result<Tally> {
        let generated = config.device_id.clone().unwrap_or_else(|| uuid::Uuid::now_v7().to_string());
        contract::device_id(&generated)?;
        conn.execute("INSERT INTO device (singleton, device_id) VALUES (1, ?1) ON CONFLICT DO NOTHING", [&generated])?;
        let (device_id, highest_seen_ms): (String, i64) =
            conn.query_row("SELECT device_id, highest_seen_ms FROM device WHERE singleton = 1", [], |r| Ok((r.get(0)?, r.get(1)?)))?;
        if let Some(wanted) = &config.device_id
            && wanted != &device_id
        {
            // The leases were the old id's: the server reclaims them at their `lease_until`. This
            // device starts over (allowance 0 until its next sync brings a token of its new id).
            conn.execute_batch(
                "BEGIN IMMEDIATE; DELETE FROM leases; DELETE FROM lease_releases;
                 UPDATE users SET lease_ver = NULL, lease_until = NULL, lease_exp = NULL;",
            )?;
            conn.execute("UPDATE device SET device_id = ?1 WHERE singleton = 1", [wanted])?;
            conn.execute_batch("COMMIT")?;
        }
        let device_id = config.device_id.clone().unwrap_or(device_id);
        let data_version = conn.query_row("PRAGMA data_version", [], |r| r.get(0))?;
        let tally = Tally {
            inner: Mutex::new(Inner {
                conn,
                device_id,
                highest_seen_ms,
                highest_stored_ms: highest_seen_ms,
                access: HashMap::new(),
                verified: Default::default(),
                plan_credits: Default::default(),
                data_version,
                tail: None,
            }),
            lease_asks: crate::leases::LeaseAsks::default(),
            catalog: RwLock::new(Arc::new(config.catalog.clone())),
            config,
            listener: RwLock::new(None),
        };
        Ok(tally)
    }

    /// This device's id.
    pub fn device_id(&self) -> String {
        self.lock().device_id.clone()
    }

    /// The configuration this instance was opened with.
    pub fn config(&self) -> &Config {
        &self.config
    }

    /// The plan catalog in use.
    pub fn catalog(&self) -> Arc<Catalog> {
        self.catalog.read().unwrap_or_else(|e| e.into_inner()).clone()
    }

    /// Replaces the plan catalog (e.g. after an app update); decisions use it at once.
    pub fn set_catalog(&self, catalog: Catalog) {
        *self.catalog.write().unwrap_or_else(|e| e.into_inner()) = Arc::new(catalog);
        let mut g = self.lock();
        g.access.clear();
        g.verified.clear();
        g.plan_credits.clear();
    }

    /// Registers the observer told about changes (replacing any previous one).
    pub fn set_listener(&self, listener: Arc<dyn ChangeListener>) {
        *self.listener.write().unwrap_or_else(|e| e.into_inner()) = Some(listener);
    }

    /// Removes the observer.
    pub fn clear_listener(&self) {
        *self.listener.write().unwrap_or_else(|e| e.into_inner()) = None;
    }

    pub(crate) fn notify(&self, user_id: &str, change: Change) {
        let l = self.listener.read().unwrap_or_else(|e| e.into_inner()).clone();
        if let Some(l) = l {
            l.on_change(user_id, change);
        }
    }

    /// Locks the connection; refreshes caches when another process wrote to the file.
    pub(crate) fn lock(&self) -> MutexGuard<'_, Inner> {
        let mut g = self.inner.lock().unwrap_or_else(|e| e.into_inner());
        if let Ok(v) = g.conn.prepare_cached("PRAGMA data_version").and_then(|mut st| st.query_row([], |r| r.get::<_, i64>(0)))
            && v != g.data_version
        {
            g.data_version = v;
            g.access.clear();
            g.verified.clear();
            g.plan_credits.clear();
            if let Ok(h) = g.conn.query_row("SELECT highest_seen_ms FROM device WHERE singleton = 1", [], |r| r.get::<_, i64>(0)) {
                g.highest_seen_ms = g.highest_seen_ms.max(h);
            }
        }
        g
    }

    /// Current time for decisions: never before the highest time this device has seen.
    pub(crate) fn now(&self, inner: &Inner) -> DateTime<Utc> {
        let now = self.config.clock.now();
        let floor = DateTime::from_timestamp_millis(inner.highest_seen_ms).unwrap_or(now);
        now.max(floor)
    }

    /// The highest wall time this device has seen (never goes backwards).
    pub fn highest_seen_time(&self) -> DateTime<Utc> {
        let g = self.lock();
        self.now(&g)
    }
}

pub(crate) fn ms(t: DateTime<Utc>) -> i64 {
    t.timestamp_millis()
}

pub(crate) fn from_ms(v: i64) -> DateTime<Utc> {
    DateTime::from_timestamp_millis(v).unwrap_or(DateTime::<Utc>::UNIX_EPOCH)
}

/// Runs `f` in an IMMEDIATE transaction (so concurrent writers queue on the busy timeout).
/// The counters uses left waiting are written first ([`tail::write_counters`]): every other
/// write sees complete counter rows.
pub(crate) fn write_tx<T>(conn: &mut Connection, f: impl FnOnce(&db::Tx<'_>) -> Result<T>) -> Result<T> {
    let tx = db::Tx::immediate(conn)?;
    tail::write_counters(&tx)?;
    let out = f(&tx)?;
    tx.commit()?;
    Ok(out)
}
