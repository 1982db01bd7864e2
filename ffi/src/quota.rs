//! Quota decisions, usage, the details of a use, event status and usage reports.

use crate::convert::{opt_ms, opt_signed, opt_unsigned, parse_json, signed, unsigned};
use crate::error::TallyError;
use tally_core as core;

/// The answer to `check` / `consume`.
#[derive(Debug, Clone, PartialEq, Eq, uniffi::Record)]
pub struct Decision {
    /// Whether the use may go ahead (for `consume`: whether it was recorded).
    pub allowed: bool,
    /// Why.
    pub reason: core::Reason,
    /// Used in the current window (after this use when it was recorded).
    pub used: i64,
    /// The limit (absent = unlimited or not applicable).
    pub limit: Option<i64>,
    /// What is left (absent = unlimited); 0 when over.
    pub remaining: Option<i64>,
    /// When the window resets (Unix ms; absent = never).
    pub resets_at_ms: Option<i64>,
    /// Where the user's access comes from (`subscription`, `free`, …).
    pub access_reason: String,
    /// `max(0, used - limit)`; for credits, the negative balance.
    pub over_limit_by: i64,
    /// What this device's lease has left for the pool (absent without a lease).
    pub device_remaining: Option<i64>,
    /// Units held by devices' leases when that room is what a use lacked (server answers).
    pub held_offline: Option<i64>,
}

impl From<core::Decision> for Decision {
    fn from(d: core::Decision) -> Self {
        Decision {
            allowed: d.allowed,
            reason: d.reason,
            used: signed(d.used),
            limit: opt_signed(d.limit),
            remaining: opt_signed(d.remaining),
            resets_at_ms: opt_ms(d.resets_at),
            access_reason: d.access_reason,
            over_limit_by: signed(d.over_limit_by),
            device_remaining: opt_signed(d.device_remaining),
            held_offline: opt_signed(d.held_offline),
        }
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
    pub input_tokens: Option<i64>,
    /// AI output tokens.
    #[uniffi(default = None)]
    pub output_tokens: Option<i64>,
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
            input_tokens: opt_unsigned(m.input_tokens, "input_tokens")?,
            output_tokens: opt_unsigned(m.output_tokens, "output_tokens")?,
            metadata: m.metadata_json.as_deref().map(|s| parse_json(s, "metadata_json")).transpose()?,
        })
    }
}

/// One item of `consume_many`.
#[derive(Debug, Clone, PartialEq, Eq, uniffi::Record)]
pub struct ConsumeItem {
    /// Feature key.
    pub feature: String,
    /// Units used.
    pub amount: i64,
    /// Details.
    #[uniffi(default = None)]
    pub meta: Option<UsageMeta>,
}

impl TryFrom<ConsumeItem> for core::ConsumeItem {
    type Error = TallyError;
    fn try_from(i: ConsumeItem) -> Result<Self, TallyError> {
        Ok(core::ConsumeItem {
            feature: i.feature,
            amount: unsigned(i.amount, "amount")?,
            meta: i.meta.map(TryInto::try_into).transpose()?.unwrap_or_default(),
        })
    }
}

/// A user's usage of one feature in its current window.
#[derive(Debug, Clone, PartialEq, Eq, uniffi::Record)]
pub struct Usage {
    /// Feature key.
    pub feature: String,
    /// Period of the rule (absent for flags and credits).
    pub period: Option<core::Period>,
    /// Used in the window (micros for budgets, credits spent for credit rules).
    pub used: i64,
    /// Limit (absent = unlimited).
    pub limit: Option<i64>,
    /// What is left (absent = unlimited).
    pub remaining: Option<i64>,
    /// `max(0, used - limit)`.
    pub over_limit_by: i64,
    /// The sorted causes of the overage the server reported for this window (`usage_report`,
    /// `cost_over_estimate`, `hold_expired`, …); empty when none.
    pub over_limit_causes: Vec<String>,
    /// Window start (Unix ms).
    pub period_start_ms: Option<i64>,
    /// Window end (Unix ms; absent = never resets).
    pub resets_at_ms: Option<i64>,
    /// Protocol 2: what this device's lease allows in the window (absent without a lease).
    #[uniffi(default = None)]
    pub device_allowance: Option<i64>,
    /// Protocol 2: what this device's lease has left ("3 left on this phone"; absent without
    /// a lease).
    #[uniffi(default = None)]
    pub device_remaining: Option<i64>,
}

impl From<core::Usage> for Usage {
    fn from(u: core::Usage) -> Self {
        Usage {
            feature: u.feature,
            period: u.period,
            used: signed(u.used),
            limit: opt_signed(u.limit),
            remaining: opt_signed(u.remaining),
            over_limit_by: signed(u.over_limit_by),
            over_limit_causes: u.over_limit_causes,
            period_start_ms: opt_ms(u.period_start),
            resets_at_ms: opt_ms(u.resets_at),
            device_allowance: opt_signed(u.device_allowance),
            device_remaining: opt_signed(u.device_remaining),
        }
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

/// Where one setting stands with the server. (Mirrored rather than exported from the core:
/// Kotlin reaches a sealed class's variants only by its own name, not through a typealias.)
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

/// One row of a usage report.
#[derive(Debug, Clone, PartialEq, Eq, uniffi::Record)]
pub struct ReportRow {
    /// The group: a day, a feature key or a model.
    pub key: String,
    /// Number of events.
    pub events: i64,
    /// Summed amounts.
    pub amount: i64,
    /// Summed AI input tokens.
    pub input_tokens: i64,
    /// Summed AI output tokens.
    pub output_tokens: i64,
    /// Summed AI cost in micros.
    pub cost_micros: i64,
}

impl From<core::ReportRow> for ReportRow {
    fn from(r: core::ReportRow) -> Self {
        ReportRow {
            key: r.key,
            events: signed(r.events),
            amount: signed(r.amount),
            input_tokens: signed(r.input_tokens),
            output_tokens: signed(r.output_tokens),
            cost_micros: signed(r.cost_micros),
        }
    }
}
