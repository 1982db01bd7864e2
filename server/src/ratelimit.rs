//! Per-user and per-API-key request rate limits (governor, GCRA); over the limit is a 429 with
//! `Retry-After`.

use crate::error::ApiError;
use governor::clock::{Clock, DefaultClock};
use governor::{DefaultKeyedRateLimiter, Quota, RateLimiter};
use std::num::NonZeroU32;

/// A keyed limiter (`u:<user id>`, `k:<key id>`).
pub struct Limiter {
    inner: DefaultKeyedRateLimiter<String>,
    clock: DefaultClock,
}

impl Limiter {
    /// `per_sec` sustained requests per second with bursts of `burst`.
    pub fn new(per_sec: u32, burst: u32) -> Limiter {
        let rate = NonZeroU32::new(per_sec.max(1)).unwrap_or(NonZeroU32::MIN);
        let burst = NonZeroU32::new(burst.max(1)).unwrap_or(NonZeroU32::MIN);
        Limiter { inner: RateLimiter::keyed(Quota::per_second(rate).allow_burst(burst)), clock: DefaultClock::default() }
    }

    /// Counts one request of `key`; 429 when over the limit.
    pub fn check(&self, key: &str) -> Result<(), ApiError> {
        match self.inner.check_key(&key.to_string()) {
            Ok(()) => Ok(()),
            Err(not_until) => {
                let wait = not_until.wait_time_from(self.clock.now());
                ::metrics::counter!("tally_rate_limited_total").increment(1);
                Err(ApiError::RateLimited(wait.as_secs() + u64::from(wait.subsec_nanos() > 0)))
            }
        }
    }
}
