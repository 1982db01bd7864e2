//! How a [`crate::Tally`] is opened: [`TallyConfig`] and the foreign clock.

use crate::convert::{parse_json_object, unsigned};
use crate::error::TallyError;
use chrono::{DateTime, Utc};
use std::sync::Arc;
use tally_core as core;

/// A time source supplied by the app (or a test), in Unix milliseconds.
#[uniffi::export(with_foreign)]
pub trait TallyClock: Send + Sync {
    /// The current time, in Unix milliseconds (UTC).
    fn now_ms(&self) -> i64;
}

/// How a [`crate::Tally`] is opened. Every field has a default.
#[derive(uniffi::Record)]
pub struct TallyConfig {
    /// This device's id; generated once and persisted when absent.
    #[uniffi(default = None)]
    pub device_id: Option<String>,
    /// Commit durability (default `Normal`).
    #[uniffi(default = None)]
    pub durability: Option<core::Durability>,
    /// Settings every user starts with, as a JSON object.
    #[uniffi(default = None)]
    pub default_settings_json: Option<String>,
    /// Setting keys that never leave the device (e.g. `theme`).
    #[uniffi(default = [])]
    pub local_only_settings: Vec<String>,
    /// The plan catalog JSON (the format of docs/catalog.md); absent: the built-in free plan.
    #[uniffi(default = None)]
    pub catalog_json: Option<String>,
    /// How long a past-due subscription keeps access, in seconds (default 3 days).
    #[uniffi(default = None)]
    pub past_due_grace_secs: Option<i64>,
    /// How long an expired entitlements token is honoured offline, in seconds (default 3 days).
    #[uniffi(default = None)]
    pub token_grace_secs: Option<i64>,
    /// How long to wait for another process holding the database lock, in ms (default 10 s).
    #[uniffi(default = None)]
    pub busy_timeout_ms: Option<i64>,
    /// The sync server's token-signing keys (its `GET /v1/keys` JWKS JSON, shipped with the
    /// app). Without them `sync` fails with `Configuration` before any request.
    #[uniffi(default = None)]
    pub server_keys: Option<String>,
    /// Protocol 2: features whose leases every sync asks for (at this device's fair share), so
    /// that they work offline.
    #[uniffi(default = [])]
    pub offline_features: Vec<String>,
    /// Time source; absent: the system clock.
    #[uniffi(default = None)]
    pub clock: Option<Arc<dyn TallyClock>>,
    /// SQLCipher key of the database (libraries built with the `sqlcipher` feature), from the
    /// Keychain or Keystore. An unencrypted file is never re-created encrypted: convert it once
    /// with `encryptDatabase`.
    #[uniffi(default = None)]
    pub encryption_key: Option<String>,
}

/// Adapts a foreign [`TallyClock`] to the core's `Clock`. A clock that throws or answers an
/// impossible time falls back to the system clock (time must never fail a decision).
struct ForeignClock(Arc<dyn TallyClock>);

impl std::fmt::Debug for ForeignClock {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("ForeignClock")
    }
}

impl core::Clock for ForeignClock {
    fn now(&self) -> DateTime<Utc> {
        std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| self.0.now_ms()))
            .ok()
            .and_then(DateTime::from_timestamp_millis)
            .unwrap_or_else(Utc::now)
    }
}

fn secs(v: i64, name: &str) -> Result<chrono::Duration, TallyError> {
    unsigned(v, name)?;
    chrono::Duration::try_seconds(v).ok_or_else(|| TallyError::invalid(format!("{name} is too large: {v}")))
}

impl TryFrom<TallyConfig> for core::Config {
    type Error = TallyError;
    fn try_from(c: TallyConfig) -> Result<Self, TallyError> {
        let mut out = core::Config {
            device_id: c.device_id,
            local_only_settings: c.local_only_settings,
            server_keys: c.server_keys,
            offline_features: c.offline_features,
            encryption_key: c.encryption_key,
            ..core::Config::default()
        };
        if let Some(d) = c.durability {
            out.durability = d;
        }
        if let Some(s) = &c.default_settings_json {
            out.default_settings = parse_json_object(s, "default_settings_json")?;
        }
        if let Some(s) = &c.catalog_json {
            out.catalog = core::Catalog::from_json(s)?;
        }
        if let Some(v) = c.past_due_grace_secs {
            out.past_due_grace = secs(v, "past_due_grace_secs")?;
        }
        if let Some(v) = c.token_grace_secs {
            out.token_grace = secs(v, "token_grace_secs")?;
        }
        if let Some(v) = c.busy_timeout_ms {
            out.busy_timeout = std::time::Duration::from_millis(unsigned(v, "busy_timeout_ms")?);
        }
        if let Some(clock) = c.clock {
            out.clock = Arc::new(ForeignClock(clock));
        }
        Ok(out)
    }
}
