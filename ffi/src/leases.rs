//! Protocol-2 leases and voids for the foreign side: `prepare_offline`, `leases`, `void`
//! (`release_leases` is async and lives with `sync`).

use crate::Tally;
use crate::convert::{opt_ms, signed, unsigned};
use crate::error::{TallyError, core as call};
use tally_core as core;

/// This device's lease of one pool ("3 left on this phone").
#[derive(Debug, Clone, PartialEq, uniffi::Record)]
pub struct LeaseStatus {
    /// Feature key, or `$credits`.
    pub feature: String,
    /// The rule's period (`lifetime` for credits).
    pub period: String,
    /// Window start (Unix ms; absent for credits).
    pub period_start_ms: Option<i64>,
    /// What this device may record in the window, after its own releases.
    pub allowance: i64,
    /// Units recorded under the lease in the window (server count + unacknowledged here).
    pub used: i64,
    /// `allowance - used`, floored at 0.
    pub remaining: i64,
    /// This device's share of the limit (0..=1), for windows it enters offline.
    pub share: f64,
    /// For credits: when the allowance ends (Unix ms).
    pub expires_at_ms: Option<i64>,
    /// When all leases of the token end (Unix ms).
    pub lease_until_ms: Option<i64>,
}

impl From<core::LeaseStatus> for LeaseStatus {
    fn from(l: core::LeaseStatus) -> Self {
        LeaseStatus {
            feature: l.feature,
            period: l.period,
            period_start_ms: opt_ms(l.period_start),
            allowance: signed(l.allowance),
            used: signed(l.used),
            remaining: signed(l.remaining),
            share: l.share,
            expires_at_ms: opt_ms(l.expires_at),
            lease_until_ms: opt_ms(l.lease_until),
        }
    }
}

#[uniffi::export]
impl Tally {
    /// Asks for `units` of a hard pool `feature` to use offline; sent with the next sync.
    pub fn prepare_offline(&self, user_id: String, feature: String, units: i64) -> Result<(), TallyError> {
        let units = unsigned(units, "units")?;
        call(|| self.inner.prepare_offline(&user_id, &feature, units))
    }

    /// This device's leases of the user (empty before a protocol-2 token).
    pub fn leases(&self, user_id: String) -> Result<Vec<LeaseStatus>, TallyError> {
        call(|| self.inner.leases(&user_id)).map(|v| v.into_iter().map(Into::into).collect())
    }

    /// Cancels a recorded use (id or idempotency key); voiding twice is a no-op.
    #[uniffi::method(default(reason = None))]
    pub fn void(&self, user_id: String, event_id: String, reason: Option<String>) -> Result<(), TallyError> {
        call(|| self.inner.void(&user_id, &event_id, reason.as_deref()))
    }
}
