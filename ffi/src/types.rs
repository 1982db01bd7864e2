//! Records and enums mirroring the public types of `tally-core`, and their conversions.
//!
//! Timestamps cross as `i64` Unix **milliseconds** (UTC) everywhere. JSON values cross as
//! strings and are parsed (and rejected with `InvalidInput`) here, before the core sees them.

use crate::error::TallyError;
use chrono::{DateTime, Utc};
use serde_json::{Map, Value};
use std::collections::HashMap;
use tally_core as core;

// ---------------------------------------------------------------------------------------------
// Time and JSON helpers

pub(crate) fn to_ms(t: DateTime<Utc>) -> i64 {
    t.timestamp_millis()
}

pub(crate) fn opt_ms(t: Option<DateTime<Utc>>) -> Option<i64> {
    t.map(to_ms)
}

/// Unix milliseconds → UTC instant (`InvalidInput` when out of range).
pub fn from_ms(ms: i64, name: &str) -> Result<DateTime<Utc>, TallyError> {
    DateTime::from_timestamp_millis(ms).ok_or_else(|| TallyError::invalid(format!("{name}: {ms} is not a valid Unix time in milliseconds")))
}

pub(crate) fn from_opt_ms(ms: Option<i64>, name: &str) -> Result<Option<DateTime<Utc>>, TallyError> {
    ms.map(|v| from_ms(v, name)).transpose()
}

/// Parses a JSON value given as a string (`InvalidInput` naming `what` when malformed).
pub fn parse_json(text: &str, what: &str) -> Result<Value, TallyError> {
    serde_json::from_str(text).map_err(|e| TallyError::invalid(format!("{what} is not valid JSON: {e}")))
}

/// Parses a JSON object given as a string.
pub fn parse_json_object(text: &str, what: &str) -> Result<Map<String, Value>, TallyError> {
    match parse_json(text, what)? {
        Value::Object(m) => Ok(m),
        other => Err(TallyError::invalid(format!("{what} must be a JSON object, got {}", json_kind(&other)))),
    }
}

fn json_kind(v: &Value) -> &'static str {
    match v {
        Value::Null => "null",
        Value::Bool(_) => "a boolean",
        Value::Number(_) => "a number",
        Value::String(_) => "a string",
        Value::Array(_) => "an array",
        Value::Object(_) => "an object",
    }
}

/// JSON values that serialize infallibly.
pub(crate) trait ToJson {
    fn json(&self) -> String;
}

impl ToJson for Value {
    fn json(&self) -> String {
        self.to_string()
    }
}

impl ToJson for Map<String, Value> {
    fn json(&self) -> String {
        Value::Object(self.clone()).to_string()
    }
}

pub(crate) fn to_json(v: &impl ToJson) -> String {
    v.json()
}

// ---------------------------------------------------------------------------------------------
// Configuration and callbacks

/// Commit durability of the SQLite database.
#[derive(Debug, Clone, Copy, PartialEq, Eq, uniffi::Enum)]
pub enum Durability {
    /// WAL + `synchronous=NORMAL`: survives app crashes (the default).
    Normal,
    /// WAL + `synchronous=FULL`: also survives power loss.
    Full,
}

impl From<Durability> for core::Durability {
    fn from(d: Durability) -> Self {
        match d {
            Durability::Normal => core::Durability::Normal,
            Durability::Full => core::Durability::Full,
        }
    }
}

impl From<core::Durability> for Durability {
    fn from(d: core::Durability) -> Self {
        match d {
            core::Durability::Normal => Durability::Normal,
            core::Durability::Full => Durability::Full,
        }
    }
}

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
    pub durability: Option<Durability>,
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
    pub past_due_grace_secs: Option<u64>,
    /// How long an expired entitlements token is honoured offline, in seconds (default 3 days).
    #[uniffi(default = None)]
    pub token_grace_secs: Option<u64>,
    /// How long to wait for another process holding the database lock, in ms (default 10 s).
    #[uniffi(default = None)]
    pub busy_timeout_ms: Option<u64>,
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
    pub clock: Option<std::sync::Arc<dyn TallyClock>>,
    /// SQLCipher key of the database (libraries built with the `sqlcipher` feature), from the
    /// Keychain or Keystore. An unencrypted file is never re-created encrypted: convert it once
    /// with `encryptDatabase`.
    #[uniffi(default = None)]
    pub encryption_key: Option<String>,
}

/// Adapts a foreign [`TallyClock`] to the core's `Clock`. A clock that throws or answers an
/// impossible time falls back to the system clock (time must never fail a decision).
struct ForeignClock(std::sync::Arc<dyn TallyClock>);

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

fn secs(v: u64, name: &str) -> Result<chrono::Duration, TallyError> {
    i64::try_from(v).ok().and_then(chrono::Duration::try_seconds).ok_or_else(|| TallyError::invalid(format!("{name} is too large: {v}")))
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
            out.durability = d.into();
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
            out.busy_timeout = std::time::Duration::from_millis(v);
        }
        if let Some(clock) = c.clock {
            out.clock = std::sync::Arc::new(ForeignClock(clock));
        }
        Ok(out)
    }
}

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

impl From<Change> for core::Change {
    fn from(c: Change) -> Self {
        core::Change { usage: c.usage, entitlements: c.entitlements, settings: c.settings }
    }
}

/// Observer of changes, implemented by the app. Called after the change is committed, on the
/// thread that made it (return quickly; hop to your own queue or coroutine).
#[uniffi::export(with_foreign)]
pub trait ChangeListener: Send + Sync {
    /// `user_id`'s data changed as described by `change`.
    fn on_change(&self, user_id: String, change: Change);
}

/// Adapts a foreign [`ChangeListener`]; an exception thrown by the listener is swallowed (the
/// change is already committed and the caller must still get its answer).
pub(crate) struct ForeignListener(pub(crate) std::sync::Arc<dyn ChangeListener>);

impl core::ChangeListener for ForeignListener {
    fn on_change(&self, user_id: &str, change: core::Change) {
        let _ = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| self.0.on_change(user_id.to_string(), change.into())));
    }
}

// ---------------------------------------------------------------------------------------------
// Users

/// A user of the app on this device.
#[derive(Debug, Clone, PartialEq, Eq, uniffi::Record)]
pub struct User {
    /// Local id (UUID v7). Differs from the server's id; accounts match by `external_id`.
    pub id: String,
    /// The identity provider's subject; absent for a local user.
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
    /// Creation time (Unix ms).
    pub created_at_ms: i64,
    /// Last change (Unix ms).
    pub updated_at_ms: i64,
}

impl From<core::User> for User {
    fn from(u: core::User) -> Self {
        User {
            id: u.id,
            external_id: u.external_id,
            email: u.email,
            display_name: u.display_name,
            avatar_url: u.avatar_url,
            timezone: u.timezone,
            is_admin: u.is_admin,
            signed_in: u.signed_in,
            created_at_ms: to_ms(u.created_at),
            updated_at_ms: to_ms(u.updated_at),
        }
    }
}

impl TryFrom<User> for core::User {
    type Error = TallyError;
    fn try_from(u: User) -> Result<Self, TallyError> {
        Ok(core::User {
            id: u.id,
            external_id: u.external_id,
            email: u.email,
            display_name: u.display_name,
            avatar_url: u.avatar_url,
            timezone: u.timezone,
            is_admin: u.is_admin,
            signed_in: u.signed_in,
            created_at: from_ms(u.created_at_ms, "created_at_ms")?,
            updated_at: from_ms(u.updated_at_ms, "updated_at_ms")?,
        })
    }
}

/// The identity of a signed-in user, from the app's identity provider.
#[derive(Debug, Clone, PartialEq, Eq, uniffi::Record)]
pub struct Profile {
    /// The identity provider's subject (`sub`).
    pub external_id: String,
    /// Email address.
    #[uniffi(default = None)]
    pub email: Option<String>,
    /// Display name.
    #[uniffi(default = None)]
    pub display_name: Option<String>,
    /// Avatar URL.
    #[uniffi(default = None)]
    pub avatar_url: Option<String>,
}

impl From<Profile> for core::Profile {
    fn from(p: Profile) -> Self {
        core::Profile { external_id: p.external_id, email: p.email, display_name: p.display_name, avatar_url: p.avatar_url }
    }
}

impl From<core::Profile> for Profile {
    fn from(p: core::Profile) -> Self {
        Profile { external_id: p.external_id, email: p.email, display_name: p.display_name, avatar_url: p.avatar_url }
    }
}

/// Changes to a user's profile; absent leaves a field as it is, `""` clears it.
#[derive(Debug, Clone, Default, PartialEq, Eq, uniffi::Record)]
pub struct UserUpdate {
    /// New display name.
    #[uniffi(default = None)]
    pub display_name: Option<String>,
    /// New avatar URL.
    #[uniffi(default = None)]
    pub avatar_url: Option<String>,
    /// New IANA timezone (validated).
    #[uniffi(default = None)]
    pub timezone: Option<String>,
    /// New email.
    #[uniffi(default = None)]
    pub email: Option<String>,
}

impl From<UserUpdate> for core::UserUpdate {
    fn from(u: UserUpdate) -> Self {
        core::UserUpdate { display_name: u.display_name, avatar_url: u.avatar_url, timezone: u.timezone, email: u.email }
    }
}

impl From<core::UserUpdate> for UserUpdate {
    fn from(u: core::UserUpdate) -> Self {
        UserUpdate { display_name: u.display_name, avatar_url: u.avatar_url, timezone: u.timezone, email: u.email }
    }
}

// ---------------------------------------------------------------------------------------------
// Decisions and usage

/// Why a decision came out the way it did.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, uniffi::Enum)]
pub enum Reason {
    /// Allowed.
    Ok,
    /// A hard limit would be exceeded; nothing recorded.
    LimitReached,
    /// An AI budget is used up.
    BudgetExceeded,
    /// The feature exists but the user's plan does not include it.
    NotInPlan,
    /// Too many requests in the rate window.
    RateLimited,
    /// Not enough credits.
    InsufficientCredits,
    /// No plan in the catalog knows this feature.
    UnknownFeature,
    /// The model has no price in the catalog.
    UnknownModel,
    /// Over a soft limit: recorded and flagged.
    OverLimitSoft,
    /// This device's lease of a hard pool is spent while the account still has room; nothing
    /// recorded. Sync (online) to get more.
    LeaseExhausted,
}

macro_rules! mirror_enum {
    ($ffi:ident, $core:path, [$($v:ident),* $(,)?]) => {
        impl From<$core> for $ffi {
            fn from(v: $core) -> Self {
                use $core as C;
                match v { $(C::$v => $ffi::$v),* }
            }
        }
        impl From<$ffi> for $core {
            fn from(v: $ffi) -> Self {
                use $core as C;
                match v { $($ffi::$v => C::$v),* }
            }
        }
    };
}

mirror_enum!(
    Reason,
    core::Reason,
    [
        Ok,
        LimitReached,
        BudgetExceeded,
        NotInPlan,
        RateLimited,
        InsufficientCredits,
        UnknownFeature,
        UnknownModel,
        OverLimitSoft,
        LeaseExhausted
    ]
);

/// The answer to `check` / `consume`.
#[derive(Debug, Clone, PartialEq, Eq, uniffi::Record)]
pub struct Decision {
    /// Whether the use may go ahead (for `consume`: whether it was recorded).
    pub allowed: bool,
    /// Why.
    pub reason: Reason,
    /// Used in the current window (after this use when it was recorded).
    pub used: u64,
    /// The limit (absent = unlimited or not applicable).
    pub limit: Option<u64>,
    /// What is left (absent = unlimited); 0 when over.
    pub remaining: Option<u64>,
    /// When the window resets (Unix ms; absent = never).
    pub resets_at_ms: Option<i64>,
    /// Where the user's access comes from (`subscription`, `free`, …).
    pub access_reason: String,
    /// `max(0, used - limit)`; for credits, the negative balance.
    pub over_limit_by: u64,
    /// What this device's lease has left for the pool (absent without a lease).
    pub device_remaining: Option<u64>,
    /// Units held by devices' leases when that room is what a use lacked (server answers).
    pub held_offline: Option<u64>,
}

impl From<core::Decision> for Decision {
    fn from(d: core::Decision) -> Self {
        Decision {
            allowed: d.allowed,
            reason: d.reason.into(),
            used: d.used,
            limit: d.limit,
            remaining: d.remaining,
            resets_at_ms: opt_ms(d.resets_at),
            access_reason: d.access_reason,
            over_limit_by: d.over_limit_by,
            device_remaining: d.device_remaining,
            held_offline: d.held_offline,
        }
    }
}

impl TryFrom<Decision> for core::Decision {
    type Error = TallyError;
    fn try_from(d: Decision) -> Result<Self, TallyError> {
        Ok(core::Decision {
            allowed: d.allowed,
            reason: d.reason.into(),
            used: d.used,
            limit: d.limit,
            remaining: d.remaining,
            resets_at: from_opt_ms(d.resets_at_ms, "resets_at_ms")?,
            access_reason: d.access_reason,
            over_limit_by: d.over_limit_by,
            device_remaining: d.device_remaining,
            held_offline: d.held_offline,
        })
    }
}

/// Optional details of a use.
#[derive(Debug, Clone, Default, PartialEq, Eq, uniffi::Record)]
pub struct UsageMeta {
    /// Caller-chosen idempotency key: retrying with the same key never counts twice.
    #[uniffi(default = None)]
    pub idempotency_key: Option<String>,
    /// AI model (priced from the catalog's `models`).
    #[uniffi(default = None)]
    pub model: Option<String>,
    /// AI input tokens.
    #[uniffi(default = None)]
    pub input_tokens: Option<u64>,
    /// AI output tokens.
    #[uniffi(default = None)]
    pub output_tokens: Option<u64>,
    /// Small JSON metadata (≤ 4 KiB serialized), as a JSON string.
    #[uniffi(default = None)]
    pub metadata_json: Option<String>,
}

impl TryFrom<UsageMeta> for core::UsageMeta {
    type Error = TallyError;
    fn try_from(m: UsageMeta) -> Result<Self, TallyError> {
        Ok(core::UsageMeta {
            idempotency_key: m.idempotency_key,
            model: m.model,
            input_tokens: m.input_tokens,
            output_tokens: m.output_tokens,
            metadata: m.metadata_json.as_deref().map(|s| parse_json(s, "metadata_json")).transpose()?,
        })
    }
}

impl From<core::UsageMeta> for UsageMeta {
    fn from(m: core::UsageMeta) -> Self {
        UsageMeta {
            idempotency_key: m.idempotency_key,
            model: m.model,
            input_tokens: m.input_tokens,
            output_tokens: m.output_tokens,
            metadata_json: m.metadata.as_ref().map(to_json),
        }
    }
}

/// One item of `consume_many`.
#[derive(Debug, Clone, PartialEq, Eq, uniffi::Record)]
pub struct ConsumeItem {
    /// Feature key.
    pub feature: String,
    /// Units used.
    pub amount: u64,
    /// Details.
    #[uniffi(default = None)]
    pub meta: Option<UsageMeta>,
}

impl TryFrom<ConsumeItem> for core::ConsumeItem {
    type Error = TallyError;
    fn try_from(i: ConsumeItem) -> Result<Self, TallyError> {
        Ok(core::ConsumeItem { feature: i.feature, amount: i.amount, meta: i.meta.map(TryInto::try_into).transpose()?.unwrap_or_default() })
    }
}

impl From<core::ConsumeItem> for ConsumeItem {
    fn from(i: core::ConsumeItem) -> Self {
        ConsumeItem { feature: i.feature, amount: i.amount, meta: Some(i.meta.into()) }
    }
}

/// How often a limit resets.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, uniffi::Enum)]
pub enum Period {
    /// 60 s windows aligned to the Unix epoch.
    Minute,
    /// 3600 s windows aligned to the Unix epoch.
    Hour,
    /// From local midnight to the next.
    Day,
    /// ISO week, from Monday local midnight.
    Week,
    /// From the first of the month, local midnight.
    Month,
    /// From January 1st, local midnight.
    Year,
    /// Monthly from the billing anchor.
    Billing,
    /// One window, never resets.
    Lifetime,
}

mirror_enum!(Period, core::Period, [Minute, Hour, Day, Week, Month, Year, Billing, Lifetime]);

/// A user's usage of one feature in its current window.
#[derive(Debug, Clone, PartialEq, Eq, uniffi::Record)]
pub struct Usage {
    /// Feature key.
    pub feature: String,
    /// Period of the rule (absent for flags and credits).
    pub period: Option<Period>,
    /// Used in the window (micros for budgets, credits spent for credit rules).
    pub used: u64,
    /// Limit (absent = unlimited).
    pub limit: Option<u64>,
    /// What is left (absent = unlimited).
    pub remaining: Option<u64>,
    /// `max(0, used - limit)`.
    pub over_limit_by: u64,
    /// The sorted causes of the overage the server reported for this window (`usage_report`,
    /// `cost_over_estimate`, `hold_expired`, …); empty when none.
    pub over_limit_causes: Vec<String>,
    /// Window start (Unix ms).
    pub period_start_ms: Option<i64>,
    /// Window end (Unix ms; absent = never resets).
    pub resets_at_ms: Option<i64>,
    /// Protocol 2: what this device's lease allows in the window (absent without a lease).
    #[uniffi(default = None)]
    pub device_allowance: Option<u64>,
    /// Protocol 2: what this device's lease has left ("3 left on this phone"; absent without
    /// a lease).
    #[uniffi(default = None)]
    pub device_remaining: Option<u64>,
}

impl From<core::Usage> for Usage {
    fn from(u: core::Usage) -> Self {
        Usage {
            feature: u.feature,
            period: u.period.map(Into::into),
            used: u.used,
            limit: u.limit,
            remaining: u.remaining,
            over_limit_by: u.over_limit_by,
            over_limit_causes: u.over_limit_causes,
            period_start_ms: opt_ms(u.period_start),
            resets_at_ms: opt_ms(u.resets_at),
            device_allowance: u.device_allowance,
            device_remaining: u.device_remaining,
        }
    }
}

impl TryFrom<Usage> for core::Usage {
    type Error = TallyError;
    fn try_from(u: Usage) -> Result<Self, TallyError> {
        Ok(core::Usage {
            feature: u.feature,
            period: u.period.map(Into::into),
            used: u.used,
            limit: u.limit,
            remaining: u.remaining,
            over_limit_by: u.over_limit_by,
            over_limit_causes: u.over_limit_causes,
            period_start: from_opt_ms(u.period_start_ms, "period_start_ms")?,
            resets_at: from_opt_ms(u.resets_at_ms, "resets_at_ms")?,
            device_allowance: u.device_allowance,
            device_remaining: u.device_remaining,
        })
    }
}

/// Whether the server has taken an event.
#[derive(Debug, Clone, PartialEq, Eq, uniffi::Enum)]
pub enum EventStatus {
    /// Recorded on the device, not yet acknowledged by a server.
    Pending,
    /// Acknowledged by the server (counted there).
    Settled,
    /// Refused by the server (kept, never resent, not counted).
    Rejected { reason: String },
}

impl From<core::EventStatus> for EventStatus {
    fn from(s: core::EventStatus) -> Self {
        match s {
            core::EventStatus::Pending => EventStatus::Pending,
            core::EventStatus::Settled => EventStatus::Settled,
            core::EventStatus::Rejected(reason) => EventStatus::Rejected { reason },
        }
    }
}

impl From<EventStatus> for core::EventStatus {
    fn from(s: EventStatus) -> Self {
        match s {
            EventStatus::Pending => core::EventStatus::Pending,
            EventStatus::Settled => core::EventStatus::Settled,
            EventStatus::Rejected { reason } => core::EventStatus::Rejected(reason),
        }
    }
}

/// Where one setting stands with the server.
#[derive(Debug, Clone, PartialEq, Eq, uniffi::Enum)]
pub enum SettingStatus {
    /// No value is stored for the key (a configured default may still show through).
    NotSet,
    /// The key is local-only: it never leaves the device.
    LocalOnly,
    /// The last write has not reached the server yet.
    Pending,
    /// The stored value is the one the server has.
    Synced,
    /// The last write was refused and is kept here, never resent until written again.
    Rejected { reason: String },
}

impl From<core::SettingStatus> for SettingStatus {
    fn from(s: core::SettingStatus) -> Self {
        match s {
            core::SettingStatus::NotSet => SettingStatus::NotSet,
            core::SettingStatus::LocalOnly => SettingStatus::LocalOnly,
            core::SettingStatus::Pending => SettingStatus::Pending,
            core::SettingStatus::Synced => SettingStatus::Synced,
            core::SettingStatus::Rejected { reason } => SettingStatus::Rejected { reason },
        }
    }
}

/// How report rows are grouped.
#[derive(Debug, Clone, Copy, PartialEq, Eq, uniffi::Enum)]
pub enum GroupBy {
    /// By calendar day in the user's timezone (`YYYY-MM-DD`).
    Day,
    /// By feature key.
    Feature,
    /// By AI model (`""` for events without one).
    Model,
}

mirror_enum!(GroupBy, core::GroupBy, [Day, Feature, Model]);

/// One row of a usage report.
#[derive(Debug, Clone, PartialEq, Eq, uniffi::Record)]
pub struct ReportRow {
    /// The group: a day, a feature key or a model.
    pub key: String,
    /// Number of events.
    pub events: u64,
    /// Summed amounts.
    pub amount: u64,
    /// Summed AI input tokens.
    pub input_tokens: u64,
    /// Summed AI output tokens.
    pub output_tokens: u64,
    /// Summed AI cost in micros.
    pub cost_micros: u64,
}

impl From<core::ReportRow> for ReportRow {
    fn from(r: core::ReportRow) -> Self {
        ReportRow {
            key: r.key,
            events: r.events,
            amount: r.amount,
            input_tokens: r.input_tokens,
            output_tokens: r.output_tokens,
            cost_micros: r.cost_micros,
        }
    }
}

impl From<ReportRow> for core::ReportRow {
    fn from(r: ReportRow) -> Self {
        core::ReportRow {
            key: r.key,
            events: r.events,
            amount: r.amount,
            input_tokens: r.input_tokens,
            output_tokens: r.output_tokens,
            cost_micros: r.cost_micros,
        }
    }
}

// ---------------------------------------------------------------------------------------------
// Catalog rules and entitlements

/// Whether going over a limit denies (`Hard`) or records and flags (`Soft`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, uniffi::Enum)]
pub enum Enforcement {
    /// Deny and record nothing.
    Hard,
    /// Record and answer `OverLimitSoft`.
    Soft,
}

mirror_enum!(Enforcement, core::Enforcement, [Hard, Soft]);

/// What a plan grants for one feature key.
#[derive(Debug, Clone, PartialEq, uniffi::Enum)]
pub enum Rule {
    /// On or off.
    Flag { enabled: bool },
    /// Counted uses per period; `limit` absent = unlimited.
    /// `offline_share`: the fraction of each window's limit devices may hold as leases (0..1).
    Metered { limit: Option<u64>, period: Period, enforcement: Enforcement, offline_share: f64 },
    /// Each unit draws `cost` credits from the user's balance.
    Credits { cost: u64 },
    /// A request rate limit, per device, never synced.
    Rate { limit: u64, window_secs: u64 },
    /// Caps summed AI cost (micros) per period.
    Budget { limit_micros: u64, period: Period, enforcement: Enforcement, offline_share: f64 },
}

impl From<core::Rule> for Rule {
    fn from(r: core::Rule) -> Self {
        match r {
            core::Rule::Flag { enabled } => Rule::Flag { enabled },
            core::Rule::Metered { limit, period, enforcement, offline_share } => {
                Rule::Metered { limit, period: period.into(), enforcement: enforcement.into(), offline_share: offline_share.as_f64() }
            }
            core::Rule::Credits { cost } => Rule::Credits { cost },
            core::Rule::Rate { limit, window_secs } => Rule::Rate { limit, window_secs },
            core::Rule::Budget { limit_micros, period, enforcement, offline_share } => {
                Rule::Budget { limit_micros, period: period.into(), enforcement: enforcement.into(), offline_share: offline_share.as_f64() }
            }
        }
    }
}

impl From<Rule> for core::Rule {
    fn from(r: Rule) -> Self {
        match r {
            Rule::Flag { enabled } => core::Rule::Flag { enabled },
            Rule::Metered { limit, period, enforcement, offline_share } => core::Rule::Metered {
                limit,
                period: period.into(),
                enforcement: enforcement.into(),
                offline_share: tally_core::lease::Share::from_f64(offline_share.clamp(0.0, 1.0)).unwrap_or_default(),
            },
            Rule::Credits { cost } => core::Rule::Credits { cost },
            Rule::Rate { limit, window_secs } => core::Rule::Rate { limit, window_secs },
            Rule::Budget { limit_micros, period, enforcement, offline_share } => core::Rule::Budget {
                limit_micros,
                period: period.into(),
                enforcement: enforcement.into(),
                offline_share: tally_core::lease::Share::from_f64(offline_share.clamp(0.0, 1.0)).unwrap_or_default(),
            },
        }
    }
}

/// Price of one AI model, in micro-units of currency per million tokens.
#[derive(Debug, Clone, Copy, PartialEq, Eq, uniffi::Record)]
pub struct ModelPrice {
    /// Price per million input tokens.
    pub input_micros_per_mtok: u64,
    /// Price per million output tokens.
    pub output_micros_per_mtok: u64,
}

impl From<core::ModelPrice> for ModelPrice {
    fn from(p: core::ModelPrice) -> Self {
        ModelPrice { input_micros_per_mtok: p.input_micros_per_mtok, output_micros_per_mtok: p.output_micros_per_mtok }
    }
}

impl From<ModelPrice> for core::ModelPrice {
    fn from(p: ModelPrice) -> Self {
        core::ModelPrice { input_micros_per_mtok: p.input_micros_per_mtok, output_micros_per_mtok: p.output_micros_per_mtok }
    }
}

/// Subscription status, as the payment provider reports it (mapped).
#[derive(Debug, Clone, Copy, PartialEq, Eq, uniffi::Enum)]
pub enum SubscriptionStatus {
    /// Paid and current.
    Active,
    /// In a trial.
    Trialing,
    /// Payment failed; access kept during the grace period.
    PastDue,
    /// Ended.
    Canceled,
    /// No subscription.
    None,
}

mirror_enum!(SubscriptionStatus, core::SubscriptionStatus, [Active, Trialing, PastDue, Canceled, None]);

/// Access to a plan granted by an admin or a promotion.
#[derive(Debug, Clone, PartialEq, Eq, uniffi::Record)]
pub struct AccessGrant {
    /// Plan granted.
    pub plan: String,
    /// End of the grant (Unix ms; absent = no end).
    pub until_ms: Option<i64>,
    /// Who granted it.
    pub granted_by: String,
    /// Why (shows up as `access_reason = granted:<reason>`).
    pub reason: String,
}

impl From<core::AccessGrant> for AccessGrant {
    fn from(g: core::AccessGrant) -> Self {
        AccessGrant { plan: g.plan, until_ms: opt_ms(g.until), granted_by: g.granted_by, reason: g.reason }
    }
}

impl TryFrom<AccessGrant> for core::AccessGrant {
    type Error = TallyError;
    fn try_from(g: AccessGrant) -> Result<Self, TallyError> {
        Ok(core::AccessGrant {
            plan: g.plan,
            until: from_opt_ms(g.until_ms, "grants.until_ms")?,
            granted_by: g.granted_by,
            reason: g.reason,
        })
    }
}

/// A grant of credits with its remaining balance.
#[derive(Debug, Clone, PartialEq, Eq, uniffi::Record)]
pub struct CreditGrant {
    /// Grant id (stable across devices).
    pub id: String,
    /// Credits left in this grant.
    pub remaining: i64,
    /// When the grant expires (Unix ms; absent = never).
    pub expires_at_ms: Option<i64>,
    /// Where it came from (`plan`, `admin`, `purchase`, …).
    pub source: String,
}

impl From<core::CreditGrant> for CreditGrant {
    fn from(g: core::CreditGrant) -> Self {
        CreditGrant { id: g.id, remaining: g.remaining, expires_at_ms: opt_ms(g.expires_at), source: g.source }
    }
}

impl TryFrom<CreditGrant> for core::CreditGrant {
    type Error = TallyError;
    fn try_from(g: CreditGrant) -> Result<Self, TallyError> {
        Ok(core::CreditGrant {
            id: g.id,
            remaining: g.remaining,
            expires_at: from_opt_ms(g.expires_at_ms, "credit_grants.expires_at_ms")?,
            source: g.source,
        })
    }
}

/// The entitlements of one user: the raw state and, as returned by `entitlements()`, the
/// resolved plan, `access_reason` and rules.
#[derive(Debug, Clone, PartialEq, uniffi::Record)]
pub struct Entitlements {
    /// The plan in effect once resolved; when setting, the subscribed plan.
    pub plan: String,
    /// Subscription status.
    pub status: SubscriptionStatus,
    /// Why the user has this access (`admin`, `subscription`, `trial`, `lifetime`,
    /// `granted:<reason>`, `free`).
    #[uniffi(default = "")]
    pub access_reason: String,
    /// Current billing period start (Unix ms).
    #[uniffi(default = None)]
    pub period_start_ms: Option<i64>,
    /// Current billing period end (Unix ms).
    #[uniffi(default = None)]
    pub period_end_ms: Option<i64>,
    /// End of the access grant in effect (Unix ms).
    #[uniffi(default = None)]
    pub granted_until_ms: Option<i64>,
    /// Whether the user is an admin (full access).
    #[uniffi(default = false)]
    pub is_admin: bool,
    /// Sum of the unexpired credit grants' remaining credits.
    #[uniffi(default = 0)]
    pub credit_balance: i64,
    /// Effective feature rules.
    #[uniffi(default)]
    pub features: HashMap<String, Rule>,
    /// Entitlement version.
    #[uniffi(default = 0)]
    pub ver: u64,
    /// When the subscription became past due (Unix ms).
    #[uniffi(default = None)]
    pub past_due_since_ms: Option<i64>,
    /// When the subscription's access ends by itself, as its store dated it (Unix ms).
    #[uniffi(default = None)]
    pub access_until_ms: Option<i64>,
    /// Whether the plan was bought for ever (`access_reason` `lifetime`).
    #[uniffi(default = false)]
    pub lifetime: bool,
    /// Access grants (admin or promotional).
    #[uniffi(default = [])]
    pub grants: Vec<AccessGrant>,
    /// Credit grants with their remaining balances (replace the stored ones when set).
    #[uniffi(default = [])]
    pub credit_grants: Vec<CreditGrant>,
    /// The user's timezone (IANA), as the server knows it.
    #[uniffi(default = None)]
    pub tz: Option<String>,
    /// Model pricing in effect.
    #[uniffi(default)]
    pub models: HashMap<String, ModelPrice>,
    /// The free plan's rules, applied when the token is no longer trusted.
    #[uniffi(default)]
    pub free_features: HashMap<String, Rule>,
}

impl From<core::Entitlements> for Entitlements {
    fn from(e: core::Entitlements) -> Self {
        Entitlements {
            plan: e.plan,
            status: e.status.into(),
            access_reason: e.access_reason,
            period_start_ms: opt_ms(e.period_start),
            period_end_ms: opt_ms(e.period_end),
            granted_until_ms: opt_ms(e.granted_until),
            is_admin: e.is_admin,
            credit_balance: e.credit_balance,
            features: e.features.into_iter().map(|(k, v)| (k, v.into())).collect(),
            ver: e.ver,
            past_due_since_ms: opt_ms(e.past_due_since),
            access_until_ms: opt_ms(e.access_until),
            lifetime: e.lifetime,
            grants: e.grants.into_iter().map(Into::into).collect(),
            credit_grants: e.credit_grants.into_iter().map(Into::into).collect(),
            tz: e.tz,
            models: e.models.into_iter().map(|(k, v)| (k, v.into())).collect(),
            free_features: e.free_features.into_iter().map(|(k, v)| (k, v.into())).collect(),
        }
    }
}

impl TryFrom<Entitlements> for core::Entitlements {
    type Error = TallyError;
    fn try_from(e: Entitlements) -> Result<Self, TallyError> {
        Ok(core::Entitlements {
            plan: e.plan,
            status: e.status.into(),
            access_reason: e.access_reason,
            period_start: from_opt_ms(e.period_start_ms, "period_start_ms")?,
            period_end: from_opt_ms(e.period_end_ms, "period_end_ms")?,
            granted_until: from_opt_ms(e.granted_until_ms, "granted_until_ms")?,
            is_admin: e.is_admin,
            credit_balance: e.credit_balance,
            features: e.features.into_iter().map(|(k, v)| (k, v.into())).collect(),
            ver: e.ver,
            past_due_since: from_opt_ms(e.past_due_since_ms, "past_due_since_ms")?,
            access_until: from_opt_ms(e.access_until_ms, "access_until_ms")?,
            lifetime: e.lifetime,
            grants: e.grants.into_iter().map(TryInto::try_into).collect::<Result<_, _>>()?,
            credit_grants: e.credit_grants.into_iter().map(TryInto::try_into).collect::<Result<_, _>>()?,
            tz: e.tz,
            models: e.models.into_iter().map(|(k, v)| (k, v.into())).collect(),
            free_features: e.free_features.into_iter().map(|(k, v)| (k, v.into())).collect(),
        })
    }
}
