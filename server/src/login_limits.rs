//! Limits on failed sign-ins, counted in Postgres (`login_failures`) in a sliding window of 15
//! minutes read from the server's clock, so every replica sees the same counts and a restart
//! clears nothing: failed logins per (email, client address), per client address and per email
//! from any address (the per-account limit), and failed console sign-ins per client address.
//!
//! An attempt is counted before its credential is checked, under advisory locks on its
//! counters, so parallel guesses cannot all pass one check; an attempt whose credential is
//! right is forgiven (its rows deleted), so only failures stay counted. Past a limit the answer
//! is 429 `rate_limited` with `Retry-After`: the seconds until the oldest failure that holds
//! the counter at its limit leaves the window; a refused attempt counts nothing.
//!
//! The per-account limit throttles a distributed guess of one password without locking its
//! owner out: an address that signed in to the account within 30 days (`login_successes`) is
//! not held to it. A password reset clears the account's counts.

use crate::db::Db;
use crate::error::{ApiError, ApiResult};
use axum::extract::{ConnectInfo, FromRequestParts};
use axum::http::Extensions;
use axum::http::request::Parts;
use chrono::{DateTime, Duration, Utc};
use deadpool_postgres::GenericClient;
use std::net::SocketAddr;
use uuid::Uuid;

/// The window failures are counted in.
pub const WINDOW: Duration = Duration::minutes(15);
/// How long a successful sign-in from an address exempts it from the per-account limit.
pub const KNOWN_ADDRESS: Duration = Duration::days(30);

/// The form of an email in the per-email and per-account counters: every such key is made
/// here, so two spellings of one address count as one.
pub fn email_key(email: &str) -> String {
    // The canonical form accounts are looked up by; an address without one matches no account
    // but its failures still count, under its trimmed lower case.
    tally_core::contract::canonical_email(email).unwrap_or_else(|_| email.trim().to_lowercase())
}

/// The client's address (the connection's peer; `unknown` when the server was not told).
pub struct ClientAddr(pub String);

impl ClientAddr {
    /// The client address of a request, from its extensions.
    pub fn of(extensions: &Extensions) -> ClientAddr {
        let ip = extensions.get::<ConnectInfo<SocketAddr>>().map(|c| c.0.ip().to_string());
        ClientAddr(ip.unwrap_or_else(|| "unknown".into()))
    }
}

impl<S: Send + Sync> FromRequestParts<S> for ClientAddr {
    type Rejection = ApiError;
    async fn from_request_parts(parts: &mut Parts, _: &S) -> Result<Self, ApiError> {
        Ok(ClientAddr::of(&parts.extensions))
    }
}

/// What a row of `login_failures` counts against.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Counter {
    /// Logins of one email from one client address.
    EmailAtAddress,
    /// Logins, console sign-ins, sign-ups and reset requests from one client address.
    Address,
    /// Logins of one email from any address.
    Account,
    /// Console sign-ins from one client address.
    ConsoleAtAddress,
}

impl Counter {
    fn as_str(self) -> &'static str {
        match self {
            Counter::EmailAtAddress => "email_address",
            Counter::Address => "address",
            Counter::Account => "account",
            Counter::ConsoleAtAddress => "console_address",
        }
    }
}

/// One counter an attempt is counted against, and its limit (`None`: counted, not checked).
struct Count<'a> {
    counter: Counter,
    email: &'a str,
    address: &'a str,
    limit: Option<u32>,
}

/// A counted attempt: [`LoginLimits::forgive`] it when its credential was right.
#[must_use = "an attempt whose credential was right must be forgiven"]
pub struct Attempt(Uuid);

/// The limits in effect (`TALLY_LOGIN_FAILURES_*`).
pub struct LoginLimits {
    per_email: u32,
    per_address: u32,
    per_account: u32,
}

/// Whether any counter is at its limit (the latest failure holding one there), and, when none
/// is, the attempt's rows: one statement, under the counters' advisory locks.
const COUNT_SQL: &str = "\
WITH counts AS (SELECT * FROM unnest($1::text[], $2::text[], $3::text[], $4::int8[]) AS c(kind, email, address, lim)), \
holding AS ( \
    SELECT f.failed_at FROM counts c CROSS JOIN LATERAL ( \
        SELECT failed_at FROM login_failures \
        WHERE kind = c.kind AND email = c.email AND address = c.address AND failed_at > $5 \
        ORDER BY failed_at DESC OFFSET c.lim - 1 LIMIT 1) f \
    WHERE c.lim IS NOT NULL), \
added AS ( \
    INSERT INTO login_failures (attempt, kind, email, address, failed_at) \
    SELECT $6, kind, email, address, $7 FROM counts WHERE NOT EXISTS (SELECT 1 FROM holding)) \
SELECT max(failed_at) FROM holding";

/// Whole seconds until `until`, rounded up, at least 1.
fn seconds_until(until: DateTime<Utc>, now: DateTime<Utc>) -> u64 {
    let micros = u64::try_from((until - now).num_microseconds().unwrap_or(i64::MAX)).unwrap_or(0);
    micros.div_ceil(1_000_000).max(1)
}

impl LoginLimits {
    /// At most `per_email` failures per (email, address), `per_address` per address and
    /// `per_account` per email from any address (each at least 1).
    pub fn new(per_email: u32, per_address: u32, per_account: u32) -> LoginLimits {
        LoginLimits { per_email: per_email.max(1), per_address: per_address.max(1), per_account: per_account.max(1) }
    }

    /// Counts a login of `email` from `address`; 429 when (email, address), the address, or
    /// the email from any address is at its limit. `known_address`: the address signed in to
    /// the email's account within 30 days ([`signed_in_recently`]), so the per-account limit
    /// does not hold it (its failures still count).
    pub async fn login(&self, db: &Db, now: DateTime<Utc>, email: &str, address: &str, known_address: bool) -> ApiResult<Attempt> {
        let email = email_key(email);
        let per_account = (!known_address).then_some(self.per_account);
        self.count(
            db,
            now,
            &[
                Count { counter: Counter::EmailAtAddress, email: &email, address, limit: Some(self.per_email) },
                Count { counter: Counter::Address, email: "", address, limit: Some(self.per_address) },
                Count { counter: Counter::Account, email: &email, address: "", limit: per_account },
            ],
        )
        .await
    }

    /// Counts a console sign-in from `address`; 429 when the address is at the console's
    /// limit (`per_email`: one guesser, one credential form) or at the per-address limit.
    pub async fn console(&self, db: &Db, now: DateTime<Utc>, address: &str) -> ApiResult<Attempt> {
        self.count(
            db,
            now,
            &[
                Count { counter: Counter::ConsoleAtAddress, email: "", address, limit: Some(self.per_email) },
                Count { counter: Counter::Address, email: "", address, limit: Some(self.per_address) },
            ],
        )
        .await
    }

    /// Counts a sign-up or reset request from `address` (every one counts, never forgiven);
    /// 429 when the address is at its limit.
    pub async fn attempt(&self, db: &Db, now: DateTime<Utc>, address: &str) -> ApiResult<()> {
        let address_count = Count { counter: Counter::Address, email: "", address, limit: Some(self.per_address) };
        let Attempt(_) = self.count(db, now, &[address_count]).await?;
        Ok(())
    }

    async fn count(&self, db: &Db, now: DateTime<Utc>, counts: &[Count<'_>]) -> ApiResult<Attempt> {
        let attempt = Uuid::new_v4();
        let kinds: Vec<&str> = counts.iter().map(|c| c.counter.as_str()).collect();
        let emails: Vec<&str> = counts.iter().map(|c| c.email).collect();
        let addresses: Vec<&str> = counts.iter().map(|c| c.address).collect();
        let limits: Vec<Option<i64>> = counts.iter().map(|c| c.limit.map(i64::from)).collect();
        let locks: Vec<String> = counts.iter().map(|c| format!("login:{}\n{}\n{}", c.counter.as_str(), c.email, c.address)).collect();
        let cutoff = now - WINDOW;
        let mut client = db.get().await?;
        let tx = client.transaction().await?;
        // In one order everywhere, so two attempts sharing counters cannot deadlock.
        tx.execute(
            "SELECT pg_advisory_xact_lock(h) FROM (SELECT DISTINCT hashtextextended(k, 7461) AS h FROM unnest($1::text[]) k ORDER BY h) l",
            &[&locks],
        )
        .await?;
        let row = tx.query_one(COUNT_SQL, &[&kinds, &emails, &addresses, &limits, &cutoff, &attempt, &now]).await?;
        tx.commit().await?;
        if let Some(holding) = row.get::<_, Option<DateTime<Utc>>>(0) {
            ::metrics::counter!("tally_login_rate_limited_total").increment(1);
            return Err(ApiError::RateLimited(seconds_until(holding + WINDOW, now)));
        }
        // What left the window is never read again.
        client.execute("DELETE FROM login_failures WHERE failed_at <= $1", &[&cutoff]).await?;
        Ok(Attempt(attempt))
    }

    /// Uncounts an attempt whose credential was right.
    pub async fn forgive(&self, db: &Db, attempt: Attempt) -> ApiResult<()> {
        let client = db.get().await?;
        client.execute("DELETE FROM login_failures WHERE attempt = $1", &[&attempt.0]).await?;
        Ok(())
    }
}

/// Clears the failed logins of `email` (from any address, and per address): after a password
/// reset, which proves the mailbox's owner is the one signing in.
pub async fn clear_email(client: &impl GenericClient, email: &str) -> ApiResult<()> {
    let kinds = [Counter::EmailAtAddress.as_str(), Counter::Account.as_str()];
    client.execute("DELETE FROM login_failures WHERE kind = ANY($1) AND email = $2", &[&&kinds[..], &email_key(email)]).await?;
    Ok(())
}

/// Records that `user_id` signed in from `address` now (and forgets sign-ins older than 30 days).
pub async fn signed_in(client: &impl GenericClient, now: DateTime<Utc>, user_id: Uuid, address: &str) -> ApiResult<()> {
    client
        .execute(
            "INSERT INTO login_successes (user_id, address, last_at) VALUES ($1, $2, $3) \
             ON CONFLICT (user_id, address) DO UPDATE SET last_at = greatest(login_successes.last_at, EXCLUDED.last_at)",
            &[&user_id, &address, &now],
        )
        .await?;
    client.execute("DELETE FROM login_successes WHERE last_at <= $1", &[&(now - KNOWN_ADDRESS)]).await?;
    Ok(())
}

/// Whether `user_id` signed in from `address` within the last 30 days.
pub async fn signed_in_recently(client: &impl GenericClient, now: DateTime<Utc>, user_id: Uuid, address: &str) -> ApiResult<bool> {
    let row = client
        .query_opt(
            "SELECT 1 FROM login_successes WHERE user_id = $1 AND address = $2 AND last_at > $3",
            &[&user_id, &address, &(now - KNOWN_ADDRESS)],
        )
        .await?;
    Ok(row.is_some())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn retry_after_rounds_up_to_whole_seconds_and_is_never_zero() {
        let now = Utc::now();
        assert_eq!(seconds_until(now + Duration::milliseconds(1), now), 1);
        assert_eq!(seconds_until(now + Duration::milliseconds(1500), now), 2);
        assert_eq!(seconds_until(now + WINDOW, now), 900);
        assert_eq!(seconds_until(now - Duration::seconds(5), now), 1);
    }

    #[test]
    fn one_email_key_for_every_spelling_of_case_and_surrounding_space() {
        assert_eq!(email_key(" Ann@Example.COM "), email_key("ann@example.com"));
    }
}
