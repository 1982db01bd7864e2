//! `sync` for the foreign side: async (Swift `async throws`, Kotlin `suspend`), run on a tokio
//! runtime so the calling thread is never blocked.

use crate::Tally;
use crate::convert::{signed, unsigned};
use crate::error::{TallyError, panic_text};
use std::sync::Arc;
use std::time::Duration;
use tally_core as core;

/// Supplies a fresh sign-in token (the identity provider's JWT) before each request.
#[uniffi::export(with_foreign)]
pub trait TokenProvider: Send + Sync {
    /// The current token, or absent when the user must sign in again.
    fn token(&self) -> Option<String>;
}

struct ForeignTokenProvider(Arc<dyn TokenProvider>);

impl core::TokenProvider for ForeignTokenProvider {
    fn token(&self) -> Option<String> {
        // A provider that throws is treated as "no fresh token": the fixed token is used.
        std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| self.0.token())).ok().flatten()
    }
}

/// How to reach the server. Absent fields take the core's defaults (500 events and 512 KiB
/// per request, 6 attempts with backoff from 200 ms to 10 s, 30 s per request).
#[derive(Clone, uniffi::Record)]
pub struct SyncOptions {
    /// Base URL of the Tally server (`https://tally.example.com`).
    pub server_url: String,
    /// The sign-in token (used when `token_provider` is absent or returns nothing).
    pub token: String,
    /// Asked for a fresh token before every request.
    #[uniffi(default = None)]
    pub token_provider: Option<Arc<dyn TokenProvider>>,
    /// Most events per request.
    #[uniffi(default = None)]
    pub max_batch_events: Option<i64>,
    /// Largest request body in bytes.
    #[uniffi(default = None)]
    pub max_batch_bytes: Option<i64>,
    /// Attempts per request (including the first).
    #[uniffi(default = None)]
    pub max_attempts: Option<i64>,
    /// First retry backoff in ms (doubled each attempt, with jitter).
    #[uniffi(default = None)]
    pub initial_backoff_ms: Option<i64>,
    /// Longest single retry wait in ms.
    #[uniffi(default = None)]
    pub max_backoff_ms: Option<i64>,
    /// Per-request timeout in ms.
    #[uniffi(default = None)]
    pub timeout_ms: Option<i64>,
    /// Ask for a freshly signed entitlements token ("restore purchases").
    #[uniffi(default = false)]
    pub force_entitlements: bool,
}

impl TryFrom<SyncOptions> for core::SyncOptions {
    type Error = TallyError;
    fn try_from(o: SyncOptions) -> Result<Self, TallyError> {
        let mut out = core::SyncOptions::new(o.server_url, o.token);
        out.token_provider = o.token_provider.map(|p| Arc::new(ForeignTokenProvider(p)) as Arc<dyn core::TokenProvider>);
        let size = |v: i64, name: &str| unsigned(v, name).map(|v| usize::try_from(v).unwrap_or(usize::MAX));
        let ms = |v: i64, name: &str| unsigned(v, name).map(Duration::from_millis);
        if let Some(v) = o.max_batch_events {
            out.max_batch_events = size(v, "max_batch_events")?;
        }
        if let Some(v) = o.max_batch_bytes {
            out.max_batch_bytes = size(v, "max_batch_bytes")?;
        }
        if let Some(v) = o.max_attempts {
            out.retry.max_attempts = u32::try_from(unsigned(v, "max_attempts")?).unwrap_or(u32::MAX);
        }
        if let Some(v) = o.initial_backoff_ms {
            out.retry.initial_backoff = ms(v, "initial_backoff_ms")?;
        }
        if let Some(v) = o.max_backoff_ms {
            out.retry.max_backoff = ms(v, "max_backoff_ms")?;
        }
        if let Some(v) = o.timeout_ms {
            out.timeout = ms(v, "timeout_ms")?;
        }
        out.force_entitlements = o.force_entitlements;
        Ok(out)
    }
}

/// An event the server refused (quarantined locally: kept, never resent, not counted).
#[derive(Debug, Clone, PartialEq, Eq, uniffi::Record)]
pub struct RejectedEvent {
    /// Event id.
    pub id: String,
    /// Why (`conflict`, `too_large`, …).
    pub reason: String,
}

impl From<core::wire::Rejected> for RejectedEvent {
    fn from(r: core::wire::Rejected) -> Self {
        RejectedEvent { id: r.id, reason: r.reason }
    }
}

/// A setting the server (or the contract, before sending) refused: quarantined alone, kept on
/// the device, never resent until written again.
#[derive(Debug, Clone, PartialEq, Eq, uniffi::Record)]
pub struct RejectedSetting {
    /// Setting key.
    pub key: String,
    /// Why (`value_too_large`, `quota_exceeded`, `too_large`, …).
    pub reason: String,
}

impl From<core::wire::SettingRejected> for RejectedSetting {
    fn from(r: core::wire::SettingRejected) -> Self {
        RejectedSetting { key: r.key, reason: r.reason }
    }
}

/// A profile field that was refused; the pending profile edit was dropped.
#[derive(Debug, Clone, PartialEq, Eq, uniffi::Record)]
pub struct RejectedProfileField {
    /// The field (`display_name`, `avatar_url`, `timezone`, or `profile` for the whole edit).
    pub field: String,
    /// Why.
    pub reason: String,
}

impl From<core::wire::ProfileRejected> for RejectedProfileField {
    fn from(r: core::wire::ProfileRejected) -> Self {
        RejectedProfileField { field: r.field, reason: r.reason }
    }
}

/// What a sync did.
#[derive(Debug, Clone, Default, PartialEq, Eq, uniffi::Record)]
pub struct SyncReport {
    /// Events sent (counting re-sends after a retry once).
    pub events_sent: i64,
    /// Events the server took (new or already known).
    pub events_acked: i64,
    /// Of those, the ones the server already had.
    pub duplicates: i64,
    /// Events refused.
    pub rejected: Vec<RejectedEvent>,
    /// Settings changes sent.
    pub settings_sent: i64,
    /// Settings changes received and applied.
    pub settings_received: i64,
    /// Requests made.
    pub rounds: i64,
    /// Whether a new entitlements token was accepted.
    pub entitlements_updated: bool,
    /// Settings refused, each quarantined alone.
    pub settings_rejected: Vec<RejectedSetting>,
    /// Profile fields refused (the pending profile edit was dropped).
    pub profile_rejected: Vec<RejectedProfileField>,
    /// Features of sent events the server's catalog does not know (stored there, counted in
    /// no total until it knows them).
    pub unknown_features: Vec<String>,
}

impl From<core::SyncReport> for SyncReport {
    fn from(r: core::SyncReport) -> Self {
        SyncReport {
            events_sent: signed(r.events_sent),
            events_acked: signed(r.events_acked),
            duplicates: signed(r.duplicates),
            rejected: r.rejected.into_iter().map(Into::into).collect(),
            settings_sent: signed(r.settings_sent),
            settings_received: signed(r.settings_received),
            rounds: signed(r.rounds),
            entitlements_updated: r.entitlements_updated,
            settings_rejected: r.settings_rejected.into_iter().map(Into::into).collect(),
            profile_rejected: r.profile_rejected.into_iter().map(Into::into).collect(),
            unknown_features: r.unknown_features,
        }
    }
}

/// Runs a core call on the library's tokio runtime: a spawned task turns a panic into a
/// `JoinError` (then [`TallyError::Internal`]) instead of unwinding across the FFI.
pub(crate) async fn spawned<T: Send + 'static>(
    what: &str,
    call: impl std::future::Future<Output = core::Result<T>> + Send + 'static,
) -> Result<T, TallyError> {
    match tokio::spawn(call).await {
        Ok(r) => Ok(r?),
        Err(e) if e.is_panic() => Err(TallyError::Internal { message: format!("internal error: {}", panic_text(e.into_panic().as_ref())) }),
        Err(e) => Err(TallyError::Internal { message: format!("{what} task failed: {e}") }),
    }
}

#[uniffi::export(async_runtime = "tokio")]
impl Tally {
    /// Synchronises `user_id` with the server until nothing is pending. Never blocks the
    /// calling thread; safe to cancel or retry (the server deduplicates by event id).
    pub async fn sync(&self, user_id: String, options: SyncOptions) -> Result<SyncReport, TallyError> {
        let inner = self.inner.clone();
        let options = core::SyncOptions::try_from(options)?;
        spawned("sync", async move { inner.sync(&user_id, options).await }).await.map(Into::into)
    }
}

#[uniffi::export(async_runtime = "tokio")]
impl Tally {
    /// Protocol 2: gives back every lease of this device and syncs with `"final": true`. Call it
    /// before `sign_out` / `delete_user` when online.
    pub async fn release_leases(&self, user_id: String, options: SyncOptions) -> Result<SyncReport, TallyError> {
        let inner = self.inner.clone();
        let options = core::SyncOptions::try_from(options)?;
        spawned("release", async move { inner.release_leases(&user_id, options).await }).await.map(Into::into)
    }
}

#[uniffi::export]
impl Tally {
    /// When this user last completed a sync round (Unix ms; absent = never).
    pub fn last_synced_at_ms(&self, user_id: String) -> Result<Option<i64>, TallyError> {
        crate::error::core(|| self.inner.last_synced_at(&user_id)).map(crate::convert::opt_ms)
    }
}
