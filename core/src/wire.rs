//! The sync protocol's JSON bodies (docs/sync.md), shared by
//! the device's sync client and the server. Readers ignore unknown fields.

use crate::period::Period;
use chrono::{DateTime, Utc};
use serde::{Deserialize, Serialize};
use serde_json::Value;
use uuid::Uuid;

/// The protocol version this build speaks.
pub const PROTOCOL: u32 = 2;
/// The first protocol with leases (`want`, `release`, `lease_ver`, `recall`, device tokens).
pub const PROTOCOL_LEASES: u32 = 2;

/// Units of one pool asked for (`want`), given back (`release`, cumulative per window) or asked
/// back (`recall`). `feature` is a feature key or `$credits` (then `period_start` is `null`).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[cfg_attr(feature = "openapi", derive(utoipa::ToSchema))]
pub struct LeaseAmount {
    /// Feature key, or [`crate::lease::CREDITS`].
    pub feature: String,
    /// Window start (`None` for the credit balance).
    #[serde(default)]
    pub period_start: Option<DateTime<Utc>>,
    /// Units (micros for a budget, credits for `$credits`).
    pub units: u64,
}

/// One ledger event as sent to the server (`/v1/sync` `events[]`, `POST /v1/usage`).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[cfg_attr(feature = "openapi", derive(utoipa::ToSchema))]
pub struct WireEvent {
    /// Event id (the idempotency key). Nil when absent (`POST /v1/usage` may name it with an
    /// `Idempotency-Key` header instead); the contract refuses a nil id.
    #[serde(default)]
    pub id: Uuid,
    /// Feature key (empty on a void event).
    #[serde(default, skip_serializing_if = "String::is_empty")]
    pub feature: String,
    /// Units used (> 0; 0 on a void event).
    #[serde(default, skip_serializing_if = "is_zero")]
    pub amount: u64,
    /// When it happened (device time, never before the device's highest seen time).
    pub occurred_at: DateTime<Utc>,
    /// Per-device sequence number (diagnostics and ordering only).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub device_seq: Option<u64>,
    /// AI model used.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub model: Option<String>,
    /// AI input tokens.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub input_tokens: Option<u64>,
    /// AI output tokens.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub output_tokens: Option<u64>,
    /// Small JSON metadata (≤ 4 KiB).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub metadata: Option<Value>,
    /// The `lease_ver` of the device token this use was decided under (protocol 2): it counts
    /// in the window of its `occurred_at` and in the device's `consumed`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub lease_ver: Option<u64>,
    /// A void event: the id of the use it cancels (`feature` and `amount` are then absent).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub voids: Option<Uuid>,
    /// One item of a use with several meters: the use's id. The event's own id is then
    /// [`crate::contract::item_event_id`]`(use_id, feature)`, and a void of the use id voids
    /// every item.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub use_id: Option<Uuid>,
}

fn is_zero(n: &u64) -> bool {
    *n == 0
}

/// One setting change, last-writer-wins by hybrid logical clock.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[cfg_attr(feature = "openapi", derive(utoipa::ToSchema))]
pub struct SettingChange {
    /// Setting key.
    pub key: String,
    /// New value (`null` for a delete).
    #[serde(default)]
    pub value: Value,
    /// Whether this is a tombstone.
    #[serde(default)]
    pub deleted: bool,
    /// `<wall_ms, 15 digits>-<counter, 5 digits>-<node>`.
    pub hlc: String,
}

/// Profile edits made on the device, sent with the next sync (the server owns them).
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
#[cfg_attr(feature = "openapi", derive(utoipa::ToSchema))]
pub struct ProfilePatch {
    /// New IANA timezone.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub timezone: Option<String>,
    /// New display name.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub display_name: Option<String>,
    /// New avatar URL.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub avatar_url: Option<String>,
}

/// `POST /v1/sync` request body.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[cfg_attr(feature = "openapi", derive(utoipa::ToSchema))]
pub struct SyncRequest {
    /// Protocol version ([`PROTOCOL`]).
    pub protocol: u32,
    /// The sending device.
    pub device_id: String,
    /// The subject (`external_id`) the device believes it syncs for; the server answers 409
    /// `subject_mismatch` and records nothing when the credentials name another subject.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub external_id: Option<String>,
    /// Opaque settings change cursor from the previous response.
    #[serde(default)]
    pub cursor: Option<String>,
    /// Unacknowledged ledger events.
    #[serde(default)]
    pub events: Vec<WireEvent>,
    /// Dirty settings.
    #[serde(default)]
    pub settings_changes: Vec<SettingChange>,
    /// Pending profile edits.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub profile: Option<ProfilePatch>,
    /// Always return a fresh entitlements token ("restore purchases").
    #[serde(default)]
    pub force_entitlements: bool,
    /// Protocol 2: pools the device asks units of (0 units: its fair share).
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub want: Vec<LeaseAmount>,
    /// Protocol 2: units given back, cumulative per window (written before sending).
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub release: Vec<LeaseAmount>,
    /// Protocol 2: the `lease_ver` of the device token the device holds (its acknowledgement).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub lease_ver: Option<u64>,
    /// Protocol 2: the device leaves (sign-out, uninstall): it releases every allowance and the
    /// server ends its leases.
    #[serde(default, skip_serializing_if = "std::ops::Not::not", rename = "final")]
    pub final_sync: bool,
}

/// An event the server refused, with the reason (`conflict`, `too_large`, `invalid_amount`, …).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[cfg_attr(feature = "openapi", derive(utoipa::ToSchema))]
pub struct Rejected {
    /// The event id as sent.
    pub id: String,
    /// Why.
    pub reason: String,
}

/// A setting the server refused, with the reason (`invalid_setting`, `value_too_large`,
/// `invalid_text`, `quota_exceeded`). The device quarantines that setting alone.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[cfg_attr(feature = "openapi", derive(utoipa::ToSchema))]
pub struct SettingRejected {
    /// The setting key as sent.
    pub key: String,
    /// Why.
    pub reason: String,
}

/// A profile field the server refused (`display_name`, `avatar_url`, `timezone`), with the
/// reason. The rest of the profile edit is applied.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[cfg_attr(feature = "openapi", derive(utoipa::ToSchema))]
pub struct ProfileRejected {
    /// The field.
    pub field: String,
    /// Why.
    pub reason: String,
}

/// The server's total for one (feature, period window).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[cfg_attr(feature = "openapi", derive(utoipa::ToSchema))]
pub struct Total {
    /// Feature key.
    pub feature: String,
    /// Period kind.
    pub period: Period,
    /// Window start (UTC instant).
    pub period_start: DateTime<Utc>,
    /// Window end (`None` for lifetime).
    pub period_end: Option<DateTime<Utc>>,
    /// Summed amount (micros for budgets).
    pub used: u64,
    /// Limit (`None` = unlimited).
    pub limit: Option<u64>,
    /// `limit - used`, floored at 0 (`None` = unlimited).
    pub remaining: Option<u64>,
    /// `max(0, used - limit)`.
    pub over_limit_by: u64,
    /// The sorted causes of the overage recorded in this window (`cost_over_estimate`,
    /// `hold_expired`, `usage_report`, …); empty when none.
    #[serde(default)]
    pub over_limit_causes: Vec<String>,
}

/// Request bounds the server accepts.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[cfg_attr(feature = "openapi", derive(utoipa::ToSchema))]
pub struct Limits {
    /// Most events per request.
    pub max_batch_events: u32,
    /// Largest request body.
    pub max_body_bytes: u64,
}

/// `POST /v1/sync` response body.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[cfg_attr(feature = "openapi", derive(utoipa::ToSchema))]
pub struct SyncResponse {
    /// Ids inserted by this request.
    #[serde(default)]
    pub accepted: Vec<Uuid>,
    /// Ids the server already had with the same body.
    #[serde(default)]
    pub duplicates: Vec<Uuid>,
    /// Ids refused, with reasons.
    #[serde(default)]
    pub rejected: Vec<Rejected>,
    /// Totals of every window the batch touched plus the current ones.
    #[serde(default)]
    pub totals: Vec<Total>,
    /// Signed entitlements (JWT, EdDSA).
    #[serde(default)]
    pub entitlements_token: Option<String>,
    /// Settings changed since the request's cursor (the stored rows of this request's settings
    /// among them, with the HLC the server stored).
    #[serde(default)]
    pub settings_changes: Vec<SettingChange>,
    /// Settings of this request the server refused; the others were merged.
    #[serde(default)]
    pub settings_rejected: Vec<SettingRejected>,
    /// Profile fields of this request the server refused; the others were applied.
    #[serde(default)]
    pub profile_rejected: Vec<ProfileRejected>,
    /// Features of this request's events that no plan of the server's catalog knows: the events
    /// are stored and acknowledged, and count in no total until the catalog knows the feature.
    #[serde(default)]
    pub unknown_features: Vec<String>,
    /// New cursor.
    #[serde(default)]
    pub cursor: Option<String>,
    /// Request bounds.
    pub limits: Limits,
    /// Protocol 2: units the server asks back (the device releases up to that many of what it
    /// has not used, on its next sync).
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub recall: Vec<LeaseAmount>,
}

/// Error body of every non-2xx answer: `{"error": {"code", "message"}}`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[cfg_attr(feature = "openapi", derive(utoipa::ToSchema))]
pub struct ErrorBody {
    /// The error.
    pub error: ErrorDetail,
}

/// Code and message of an error answer.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[cfg_attr(feature = "openapi", derive(utoipa::ToSchema))]
pub struct ErrorDetail {
    /// Machine-readable code (`unauthorized`, `account_deleted`, `upgrade_required`, …).
    pub code: String,
    /// Human-readable message.
    pub message: String,
}
