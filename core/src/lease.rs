//! Leases (protocol 2): the slice of a hard pool a device may use offline. The arithmetic both
//! sides apply lives here — the device to decide, the server to grant and to count — so that the
//! two can never disagree on what a lease allows.
//!
//! A **pool** is one (user, feature, window) of a `hard` metered or budget rule, or the user's
//! credit balance ([`CREDITS`]). The server gives each device an `allowance` (cumulative units
//! it may record in the window, net of what it released), counts what it recorded under the
//! lease (`consumed`), and keeps the free room
//! `max(0, limit − used − held − Σ_devices max(0, allowance − consumed))` for everyone else.

use crate::period::Period;
use chrono::{DateTime, Utc};
use serde::{Deserialize, Deserializer, Serialize, Serializer};

/// One entry of a device token's `leases`: this device's slice of one pool.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Lease {
    /// Feature key, or [`CREDITS`].
    pub feature: String,
    /// The rule's period (`lifetime` for credits).
    pub period: Period,
    /// Window start (`None` for the credit balance).
    #[serde(default)]
    pub period_start: Option<DateTime<Utc>>,
    /// Cumulative units this device may record in the window, net of its releases.
    pub allowance: u64,
    /// Units this device gave back in the window, as the server counted them.
    #[serde(default)]
    pub released: u64,
    /// Units this device recorded under its lease in the window, as the server counted them.
    #[serde(default)]
    pub consumed: u64,
    /// This device's share of the limit, for windows it enters offline
    /// ([`offline_allowance`]).
    #[serde(default)]
    pub share: Share,
    /// For credits: the earliest expiry of the grants the allowance was carved from (after it
    /// the allowance is 0 until the next sync).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub expires_at: Option<DateTime<Utc>>,
}

/// The feature key of the credit-balance pool (feature keys never start with `$`).
pub const CREDITS: &str = "$credits";
/// The period of the credit-balance pool.
pub const CREDITS_PERIOD: &str = "lifetime";

/// A fraction between 0 and 1 (`offline_share`, `credits_offline_share`, a device's share),
/// kept in millionths so that both sides compute the same floors. On the wire a JSON number.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct Share(u32);

impl Share {
    /// One millionth steps.
    pub const SCALE: u32 = 1_000_000;
    /// The whole pool.
    pub const ONE: Share = Share(Share::SCALE);
    /// Nothing.
    pub const ZERO: Share = Share(0);

    /// The share of `x` (0..=1); `None` outside that range or not a number.
    pub fn from_f64(x: f64) -> Option<Share> {
        (x.is_finite() && (0.0..=1.0).contains(&x)).then(|| Share((x * f64::from(Share::SCALE)).round() as u32))
    }
    /// The share in millionths (clamped to 1).
    pub fn from_millionths(m: u32) -> Share {
        Share(m.min(Share::SCALE))
    }
    /// Millionths.
    pub fn millionths(self) -> u32 {
        self.0
    }
    /// As a number between 0 and 1.
    pub fn as_f64(self) -> f64 {
        f64::from(self.0) / f64::from(Share::SCALE)
    }
    /// Whether this is the whole pool (the default, left out of serialized catalogs).
    pub fn is_one(&self) -> bool {
        *self == Share::ONE
    }
    /// `floor(limit × self)`.
    pub fn of(self, limit: u64) -> u64 {
        u64::try_from(u128::from(limit) * u128::from(self.0) / u128::from(Share::SCALE)).unwrap_or(u64::MAX)
    }
    /// The fair part of this share for one of `devices` devices (`self / devices`, floored).
    pub fn split(self, devices: u32) -> Share {
        Share(self.0 / devices.max(1))
    }
}

impl Default for Share {
    fn default() -> Self {
        Share::ONE
    }
}

impl Serialize for Share {
    fn serialize<S: Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        s.serialize_f64(self.as_f64())
    }
}

impl<'de> Deserialize<'de> for Share {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Share, D::Error> {
        let x = f64::deserialize(d)?;
        Share::from_f64(x).ok_or_else(|| serde::de::Error::custom(format!("a share must be between 0 and 1, got {x}")))
    }
}

/// The allowance a device may use in a window it entered offline (no lease entry for it):
/// `max(explicit, floor(limit × share))`, with `limit` what the token's entitlements resolve to
/// at that window's start. The server reserves the same for every device whose `lease_until`
/// is after the window's start.
pub fn offline_allowance(explicit: u64, limit: u64, share: Share) -> u64 {
    explicit.max(share.of(limit))
}

/// The allowance left to a device after it gave back units the server has not seen yet:
/// `allowance − max(0, local_released − released)`.
pub fn effective_allowance(allowance: u64, released_on_server: u64, released_locally: u64) -> u64 {
    allowance.saturating_sub(released_locally.saturating_sub(released_on_server))
}

/// Whether a device may record `amount` more under its lease: its units in the window
/// (`consumed` the server counted + its own unacknowledged leased units there) plus `amount`
/// fit in `allowance`.
pub fn fits(allowance: u64, units_in_window: u64, amount: u64) -> bool {
    units_in_window.checked_add(amount).is_some_and(|n| n <= allowance)
}

/// What a top-up grants: `min(free room, max(want, fair share − unused))`.
pub fn top_up(free: u64, want: u64, fair: u64, unused: u64) -> u64 {
    free.min(want.max(fair.saturating_sub(unused)))
}

/// The most a device that claims a pool only because the app lists the feature for offline use
/// (no use in this or the previous window, no units asked) may hold unused after a top-up:
/// `ceil(limit × share / (2n))`, `n` the devices claiming the pool.
pub fn offline_claim_cap(limit: u64, share: Share, claiming: u32) -> u64 {
    let den = u128::from(Share::SCALE) * 2 * u128::from(claiming.max(1));
    u64::try_from((u128::from(limit) * u128::from(share.0)).div_ceil(den)).unwrap_or(u64::MAX)
}

/// What a top-up leaves free for the `empty` other claiming devices that hold nothing in the
/// pool: `floor(limit × share / (n + 1))` for each (`n` the devices claiming the pool), but
/// never more than their equal part of the `free` room, `free × empty / (empty + 1)` (floored),
/// so that devices holding nothing never wait on each other: each top-up takes at least its
/// part of what is free.
pub fn kept_for_empty_claimers(limit: u64, share: Share, claiming: u32, empty: u32, free: u64) -> u64 {
    let den = u128::from(Share::SCALE) * (u128::from(claiming) + 1);
    let each = u128::from(limit) * u128::from(share.0) / den;
    let their_part = u128::from(free) * u128::from(empty) / (u128::from(empty) + 1);
    u64::try_from((each * u128::from(empty)).min(their_part)).unwrap_or(u64::MAX)
}

/// The free room of a pool: `max(0, limit − used − held − leased)`.
pub fn free_room(limit: u64, used: u64, held: u64, leased: u64) -> u64 {
    limit.saturating_sub(used.saturating_add(held).saturating_add(leased))
}

/// What a device's lease keeps out of the free room: `max(0, allowance − consumed)`.
pub fn outstanding(allowance: u64, consumed: u64) -> u64 {
    allowance.saturating_sub(consumed)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn shares_floor_the_same_on_both_sides() {
        let s = Share::from_f64(0.5).unwrap();
        assert_eq!(s.of(7), 3);
        assert_eq!(s.split(3).of(100), 16, "0.5 / 3 devices of 100 = 16.66 → 16");
        assert_eq!(Share::ONE.of(u64::MAX), u64::MAX);
        assert_eq!(Share::ZERO.of(100), 0);
        assert!(Share::from_f64(1.5).is_none() && Share::from_f64(-0.1).is_none() && Share::from_f64(f64::NAN).is_none());
        assert_eq!(serde_json::to_string(&Share::from_f64(0.25).unwrap()).unwrap(), "0.25");
        assert!(serde_json::from_str::<Share>("2").is_err());
    }

    #[test]
    fn lease_arithmetic() {
        assert_eq!(offline_allowance(2, 10, Share::from_f64(0.5).unwrap()), 5);
        assert_eq!(offline_allowance(8, 10, Share::from_f64(0.5).unwrap()), 8);
        assert_eq!(effective_allowance(10, 2, 5), 7, "3 released here, not yet seen by the server");
        assert_eq!(effective_allowance(10, 5, 2), 10, "the server's count already includes them");
        assert!(fits(10, 9, 1) && !fits(10, 9, 2) && !fits(u64::MAX, u64::MAX, 1));
        assert_eq!(top_up(100, 0, 50, 20), 30);
        assert_eq!(top_up(100, 70, 50, 20), 70);
        assert_eq!(top_up(10, 70, 50, 20), 10);
        assert_eq!(free_room(10, 4, 3, 5), 0);
        assert_eq!(free_room(10, 4, 3, 1), 2);
        assert_eq!(outstanding(3, 5), 0);
    }

    #[test]
    fn claim_arithmetic() {
        let half = Share::from_f64(0.5).unwrap();
        assert_eq!(offline_claim_cap(20, Share::ONE, 3), 4, "ceil(20 / 6)");
        assert_eq!(offline_claim_cap(20, Share::ONE, 2), 5);
        assert_eq!(offline_claim_cap(7, half, 1), 2, "ceil(3.5 / 2)");
        assert_eq!(offline_claim_cap(20, Share::ONE, 0), 10, "no other claimer: n counts at least this one");
        assert_eq!(kept_for_empty_claimers(20, Share::ONE, 2, 1, 20), 6, "floor(20 / 3)");
        assert_eq!(kept_for_empty_claimers(20, half, 3, 2, 20), 4, "floor(10 / 4) each");
        assert_eq!(kept_for_empty_claimers(30, Share::ONE, 3, 2, 7), 4, "at most their part of 7: 7 × 2 / 3");
        assert_eq!(kept_for_empty_claimers(30, Share::ONE, 3, 2, 1), 0, "the last unit goes to whoever asks first");
        assert_eq!(kept_for_empty_claimers(30, Share::ONE, 3, 0, 30), 0);
        assert_eq!(offline_claim_cap(u64::MAX, Share::ONE, 1), u64::MAX / 2 + 1);
    }
}
