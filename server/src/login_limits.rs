//! Limits on failed logins: per (email, client address) and per client address, in a sliding
//! window of 15 minutes read from the server's clock. Only failures count, so the right
//! password keeps working, and a stranger's failures from another address never lock a user
//! out. (governor's limiters count every attempt and keep their own clock, so they do not fit.)

use crate::error::ApiError;
use chrono::{DateTime, Duration, Utc};
use std::collections::{HashMap, VecDeque};
use std::sync::Mutex;

/// The window failures are counted in.
pub const WINDOW: Duration = Duration::minutes(15);
/// Keys kept before a full sweep of expired ones.
const SWEEP_AT: usize = 100_000;

/// Failure counts per key (`e:<address>|<email>`, `a:<address>`).
pub struct LoginLimits {
    per_email: usize,
    per_address: usize,
    failures: Mutex<HashMap<String, VecDeque<DateTime<Utc>>>>,
}

fn email_key(address: &str, email: &str) -> String {
    format!("e:{address}|{}", email.to_lowercase())
}

fn address_key(address: &str) -> String {
    format!("a:{address}")
}

impl LoginLimits {
    /// At most `per_email` failures per (email, address) and `per_address` per address.
    pub fn new(per_email: u32, per_address: u32) -> LoginLimits {
        LoginLimits { per_email: per_email.max(1) as usize, per_address: per_address.max(1) as usize, failures: Mutex::new(HashMap::new()) }
    }

    /// 429 with `Retry-After` when (email, address) or the address alone is at its limit.
    pub fn check(&self, now: DateTime<Utc>, email: Option<&str>, address: &str) -> Result<(), ApiError> {
        let mut map = self.failures.lock().unwrap_or_else(|e| e.into_inner());
        let mut wait = None;
        let mut probe = |key: String, limit: usize| {
            if let Some(q) = map.get_mut(&key) {
                while q.front().is_some_and(|t| *t + WINDOW <= now) {
                    q.pop_front();
                }
                if q.len() >= limit
                    && let Some(first) = q.get(q.len() - limit)
                {
                    let secs = (*first + WINDOW - now).num_seconds().max(1) as u64;
                    wait = Some(wait.map_or(secs, |w: u64| w.max(secs)));
                }
            }
        };
        if let Some(email) = email {
            probe(email_key(address, email), self.per_email);
        }
        probe(address_key(address), self.per_address);
        match wait {
            Some(secs) => {
                ::metrics::counter!("tally_login_rate_limited_total").increment(1);
                Err(ApiError::RateLimited(secs))
            }
            None => Ok(()),
        }
    }

    /// Counts one failure of (email, address) and of the address.
    pub fn record(&self, now: DateTime<Utc>, email: Option<&str>, address: &str) {
        let mut map = self.failures.lock().unwrap_or_else(|e| e.into_inner());
        if map.len() >= SWEEP_AT {
            map.retain(|_, q| q.back().is_some_and(|t| *t + WINDOW > now));
        }
        let cap = self.per_email.max(self.per_address);
        for key in email.map(|e| email_key(address, e)).into_iter().chain([address_key(address)]) {
            let q = map.entry(key).or_default();
            q.push_back(now);
            while q.len() > cap {
                q.pop_front();
            }
        }
    }

    /// [`LoginLimits::check`], then counts the attempt (sign-ups and reset requests, where every
    /// attempt counts against the address).
    pub fn attempt(&self, now: DateTime<Utc>, address: &str) -> Result<(), ApiError> {
        self.check(now, None, address)?;
        self.record(now, None, address);
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn failures_lock_one_email_and_address_for_the_window_only() {
        let l = LoginLimits::new(3, 5);
        let t0 = Utc::now();
        for _ in 0..3 {
            l.check(t0, Some("A@x.io"), "1.1.1.1").unwrap();
            l.record(t0, Some("a@x.io"), "1.1.1.1");
        }
        assert!(matches!(l.check(t0, Some("a@X.io"), "1.1.1.1"), Err(ApiError::RateLimited(s)) if s == 900));
        // Another address, or another email from the same address, is not locked.
        l.check(t0, Some("a@x.io"), "2.2.2.2").unwrap();
        l.check(t0, Some("b@x.io"), "1.1.1.1").unwrap();
        // The window slides.
        l.check(t0 + WINDOW, Some("a@x.io"), "1.1.1.1").unwrap();
    }

    #[test]
    fn an_address_is_limited_across_emails() {
        let l = LoginLimits::new(10, 4);
        let t0 = Utc::now();
        for i in 0..4 {
            l.record(t0, Some(&format!("u{i}@x.io")), "9.9.9.9");
        }
        assert!(l.check(t0, Some("new@x.io"), "9.9.9.9").is_err());
        assert!(l.attempt(t0, "9.9.9.9").is_err());
        l.check(t0, Some("new@x.io"), "8.8.8.8").unwrap();
    }
}
