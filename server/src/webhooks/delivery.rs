//! Delivery of the outbox by a worker in every replica. A worker claims due deliveries by
//! setting their `lease_until` (`FOR UPDATE SKIP LOCKED`, committed at once), sends each one
//! outside any transaction, then records the attempt: delivered, retried after an exponential
//! backoff with jitter, or dead once its retry window (`TALLY_WEBHOOK_RETRY_SECS`) is over. A
//! worker that dies mid-delivery leaves a lease that runs out, and another sends the same
//! `webhook-id` again: at-least-once, duplicates only after a crash. Per (endpoint, user) only
//! the oldest pending delivery is sent, so a user's events arrive in order; a dead one stops
//! blocking the next.
//!
//! Requests go only to the registered URL, with a timeout, no redirects followed, and never to
//! a private, loopback or link-local address (checked after DNS resolution) unless
//! `TALLY_WEBHOOK_ALLOW_PRIVATE=1`.

use crate::AppState;
use crate::error::ApiResult;
use base64::Engine;
use chrono::{DateTime, Duration, Utc};
use hmac::{Hmac, Mac};
use sha2::Sha256;
use std::net::{IpAddr, SocketAddr};
use std::sync::Arc;
use uuid::Uuid;

/// Deliveries one worker claims at once.
const BATCH: i64 = 64;
/// Longest backoff between two attempts.
const MAX_BACKOFF: Duration = Duration::hours(12);
/// Longest error text kept per attempt.
const MAX_ERROR_CHARS: usize = 500;

/// The `webhook-signature` value of one delivery: `v1,<base64 HMAC-SHA256(key, "{id}.{timestamp}.{body}")>`.
pub fn sign(key: &[u8], id: &str, timestamp: i64, body: &[u8]) -> String {
    // HMAC accepts keys of any length; this cannot fail.
    let mut m = <Hmac<Sha256> as Mac>::new_from_slice(key).unwrap_or_else(|_| unreachable!("HMAC takes any key length"));
    m.update(id.as_bytes());
    m.update(b".");
    m.update(timestamp.to_string().as_bytes());
    m.update(b".");
    m.update(body);
    format!("v1,{}", base64::engine::general_purpose::STANDARD.encode(m.finalize().into_bytes()))
}

/// The address of a URL host that is an IP literal (`[::1]` included).
pub fn ip_literal(host: &str) -> Option<IpAddr> {
    host.trim_start_matches('[').trim_end_matches(']').parse().ok()
}

/// Whether deliveries must never reach `ip`: loopback, private, link-local, unspecified,
/// shared (100.64/10), broadcast, multicast and documentation ranges, unique-local IPv6, and
/// IPv4 addresses mapped into IPv6.
pub fn forbidden(ip: IpAddr) -> bool {
    match ip {
        IpAddr::V4(v4) => {
            let o = v4.octets();
            v4.is_loopback()
                || v4.is_private()
                || v4.is_link_local()
                || v4.is_unspecified()
                || v4.is_broadcast()
                || v4.is_multicast()
                || v4.is_documentation()
                || o[0] == 0
                || (o[0] == 100 && (o[1] & 0xc0) == 64)
                || (o[0] == 192 && o[1] == 0 && o[2] == 0)
                || o[0] >= 240
        }
        IpAddr::V6(v6) => {
            if let Some(v4) = v6.to_ipv4_mapped() {
                return forbidden(IpAddr::V4(v4));
            }
            let s = v6.segments();
            v6.is_loopback()
                || v6.is_unspecified()
                || v6.is_multicast()
                || (s[0] & 0xfe00) == 0xfc00 // unique local fc00::/7
                || (s[0] & 0xffc0) == 0xfe80 // link-local fe80::/10
                || (s[0] == 0x2001 && s[1] == 0x0db8) // documentation
                || (s[0] == 0 && s[1] == 0 && s[2] == 0 && s[3] == 0 && s[4] == 0 && s[5] == 0) // IPv4-compatible
        }
    }
}

/// A DNS resolver that drops the addresses deliveries may not reach (all of them allowed with
/// `allow_private`), and fails when none is left.
#[derive(Debug, Clone, Copy)]
struct GuardedResolver {
    allow_private: bool,
}

impl reqwest::dns::Resolve for GuardedResolver {
    fn resolve(&self, name: reqwest::dns::Name) -> reqwest::dns::Resolving {
        let allow = self.allow_private;
        let host = name.as_str().to_string();
        Box::pin(async move {
            let all: Vec<SocketAddr> = tokio::net::lookup_host((host.as_str(), 0)).await?.collect();
            let ok: Vec<SocketAddr> = all.iter().copied().filter(|a| allow || !forbidden(a.ip())).collect();
            if ok.is_empty() {
                let e: Box<dyn std::error::Error + Send + Sync> = if all.is_empty() {
                    format!("{host} has no address").into()
                } else {
                    format!("{host} resolves only to private, loopback or link-local addresses (refused)").into()
                };
                return Err(e);
            }
            Ok(Box::new(ok.into_iter()) as reqwest::dns::Addrs)
        })
    }
}

/// The HTTP client of deliveries: timeouts, no redirects, no proxy, the guarded resolver.
pub fn client(timeout: std::time::Duration, allow_private: bool) -> Result<reqwest::Client, String> {
    reqwest::Client::builder()
        .timeout(timeout)
        .connect_timeout(timeout)
        .redirect(reqwest::redirect::Policy::none())
        .no_proxy()
        .user_agent(concat!("tally-webhooks/", env!("CARGO_PKG_VERSION")))
        .dns_resolver(Arc::new(GuardedResolver { allow_private }))
        .build()
        .map_err(|e| format!("webhook HTTP client: {e}"))
}

/// The delivery settings of the configuration.
#[derive(Debug, Clone, Copy)]
pub struct Settings {
    /// Pause between two polls when nothing was due.
    pub poll: std::time::Duration,
    /// Timeout of one HTTP request.
    pub timeout: std::time::Duration,
    /// How long a claim lasts: longer than a request and its recording can take.
    pub lease: Duration,
    /// First backoff (doubled each attempt, with jitter, up to 12 h).
    pub backoff_base: Duration,
    /// How long a delivery is retried before it is dead.
    pub retry_window: Duration,
    /// Private, loopback and link-local receivers allowed.
    pub allow_private: bool,
}

impl Settings {
    /// From `TALLY_WEBHOOK_*`.
    pub fn from_config(c: &crate::Config) -> Settings {
        let timeout = std::time::Duration::from_millis(c.webhook_timeout_ms.max(1));
        let ms = |n: u64| Duration::milliseconds(i64::try_from(n).unwrap_or(i64::MAX / 2_000_000));
        Settings {
            poll: std::time::Duration::from_millis(c.webhook_poll_ms.max(1)),
            timeout,
            lease: ms(c.webhook_timeout_ms.saturating_mul(2).saturating_add(1000)),
            backoff_base: ms(c.webhook_backoff_ms.max(1)),
            retry_window: ms(c.webhook_retry_secs.saturating_mul(1000)),
            allow_private: c.webhook_allow_private,
        }
    }
}

/// The pause before attempt `attempt + 1` after `attempt` failures: `base × 2^(attempt−1)`,
/// at most 12 h, with full jitter in its upper half.
pub fn backoff(base: Duration, attempt: i32) -> Duration {
    let exp = u32::try_from(attempt.saturating_sub(1).clamp(0, 30)).unwrap_or(30);
    let ms = base.num_milliseconds().max(1).saturating_mul(1i64 << exp).min(MAX_BACKOFF.num_milliseconds());
    let jitter = rand::random_range(0..=ms / 2);
    Duration::milliseconds(ms - jitter)
}

/// One claimed delivery with what sending it needs.
struct Claimed {
    user_id: Uuid,
    event_id: Uuid,
    endpoint_id: Uuid,
    attempt: i32,
    queued_at: DateTime<Utc>,
    kind: String,
    created_at: DateTime<Utc>,
    data: serde_json::Value,
    url: String,
    secret: String,
}

/// Claims up to [`BATCH`] due deliveries (the oldest pending one per endpoint and user) for
/// this worker until `now + lease`.
async fn claim(state: &AppState, settings: &Settings, now: DateTime<Utc>) -> ApiResult<Vec<Claimed>> {
    let client = state.pool.get().await?;
    let until = now + settings.lease;
    let rows = client
        .query(
            "WITH due AS ( \
               SELECT d.user_id, d.event_id, d.endpoint_id FROM webhook_deliveries d \
               WHERE d.state = 'pending' AND d.next_attempt_at <= $1 AND (d.lease_until IS NULL OR d.lease_until <= $1) \
                 AND NOT EXISTS (SELECT 1 FROM webhook_deliveries p WHERE p.endpoint_id = d.endpoint_id AND p.user_id = d.user_id \
                                 AND p.state = 'pending' AND p.seq < d.seq) \
               ORDER BY d.next_attempt_at, d.seq LIMIT $3 FOR UPDATE OF d SKIP LOCKED) \
             UPDATE webhook_deliveries d SET lease_until = $2, attempts = d.attempts + 1 \
             FROM due, webhook_events e, webhook_endpoints p \
             WHERE (d.user_id, d.event_id, d.endpoint_id) = (due.user_id, due.event_id, due.endpoint_id) \
               AND (e.user_id, e.event_id) = (d.user_id, d.event_id) AND p.endpoint_id = d.endpoint_id \
             RETURNING d.user_id, d.event_id, d.endpoint_id, d.attempts, d.queued_at, e.type, e.created_at, e.data, p.url, p.secret",
            &[&now, &until, &BATCH],
        )
        .await?;
    Ok(rows
        .iter()
        .map(|r| Claimed {
            user_id: r.get(0),
            event_id: r.get(1),
            endpoint_id: r.get(2),
            attempt: r.get(3),
            queued_at: r.get(4),
            kind: r.get(5),
            created_at: r.get(6),
            data: r.get(7),
            url: r.get(8),
            secret: r.get(9),
        })
        .collect())
}

/// What one attempt came to.
struct Outcome {
    status: Option<u16>,
    error: Option<String>,
}

impl Outcome {
    fn ok(&self) -> bool {
        self.status.is_some_and(|s| (200..300).contains(&s))
    }
}

/// The body of a delivery: `{type, created_at, data}`.
pub fn body(kind: &str, created_at: DateTime<Utc>, data: &serde_json::Value) -> Vec<u8> {
    serde_json::json!({"type": kind, "created_at": created_at.to_rfc3339_opts(chrono::SecondsFormat::Millis, true), "data": data})
        .to_string()
        .into_bytes()
}

async fn send(http: &reqwest::Client, settings: &Settings, c: &Claimed, now: DateTime<Utc>) -> Outcome {
    let fail = |e: String| Outcome { status: None, error: Some(e) };
    let url = match super::check_url(&c.url, settings.allow_private) {
        Ok(u) => u,
        Err(e) => return fail(format!("refused: {e}")),
    };
    let key = match super::secret_key(&c.secret) {
        Ok(k) => k,
        Err(e) => return fail(format!("endpoint secret: {e}")),
    };
    let body = body(&c.kind, c.created_at, &c.data);
    let id = c.event_id.to_string();
    let ts = now.timestamp();
    let req = http
        .post(url)
        .header("content-type", "application/json")
        .header("webhook-id", &id)
        .header("webhook-timestamp", ts.to_string())
        .header("webhook-signature", sign(&key, &id, ts, &body))
        .body(body);
    match req.send().await {
        Ok(resp) => {
            let status = resp.status();
            let error = if status.is_success() {
                None
            } else if status.is_redirection() {
                Some(format!("HTTP {status}: redirects are not followed"))
            } else {
                Some(format!("HTTP {status}"))
            };
            Outcome { status: Some(status.as_u16()), error }
        }
        Err(e) => {
            let mut msg = e.to_string();
            let mut src = std::error::Error::source(&e);
            while let Some(s) = src {
                msg = format!("{msg}: {s}");
                src = s.source();
            }
            fail(msg)
        }
    }
}

/// Records an attempt: delivered, retried later, or dead. A delivered or dead
/// `account.deleted` leaves no row behind.
async fn record(state: &AppState, settings: &Settings, c: &Claimed, started: DateTime<Utc>, ms: i64, out: &Outcome) -> ApiResult<()> {
    let mut client = state.pool.get().await?;
    let tx = client.transaction().await?;
    let now = state.now();
    let (st, next) = if out.ok() {
        ("delivered", now)
    } else {
        let next = now + backoff(settings.backoff_base, c.attempt);
        if next > c.queued_at + settings.retry_window { ("dead", now) } else { ("pending", next) }
    };
    let error: Option<String> = out.error.as_ref().map(|e| e.chars().take(MAX_ERROR_CHARS).collect());
    let status = out.status.map(i32::from);
    let n = tx
        .execute(
            "UPDATE webhook_deliveries SET state = $4, next_attempt_at = $5, lease_until = NULL, last_status = $6, last_error = $7, \
               delivered_at = CASE WHEN $4 = 'delivered' THEN $8 ELSE delivered_at END \
             WHERE user_id = $1 AND event_id = $2 AND endpoint_id = $3 AND state = 'pending'",
            &[&c.user_id, &c.event_id, &c.endpoint_id, &st, &next, &status, &error, &now],
        )
        .await?;
    if n == 0 {
        // The endpoint was deleted (or the delivery replayed) meanwhile: nothing to record.
        return Ok(());
    }
    let ms = i32::try_from(ms).unwrap_or(i32::MAX);
    tx.execute(
        "INSERT INTO webhook_attempts (user_id, event_id, endpoint_id, attempt, started_at, duration_ms, status, error) \
         VALUES ($1, $2, $3, $4, $5, $6, $7, $8) ON CONFLICT DO NOTHING",
        &[&c.user_id, &c.event_id, &c.endpoint_id, &c.attempt, &started, &ms, &status, &error],
    )
    .await?;
    if c.kind == "account.deleted" {
        super::outbox::purge_if_settled(&tx, c.user_id, c.event_id).await?;
    }
    tx.commit().await?;
    crate::metrics::webhook_attempt(st);
    Ok(())
}

/// Claims, sends and records one batch; answers how many deliveries it handled.
pub async fn run_once(state: &AppState, http: &reqwest::Client, settings: &Settings) -> ApiResult<usize> {
    let claimed = claim(state, settings, state.now()).await?;
    let n = claimed.len();
    let jobs = claimed.into_iter().map(|c| async move {
        let started = state.now();
        let clock = std::time::Instant::now();
        let out = send(http, settings, &c, started).await;
        let ms = i64::try_from(clock.elapsed().as_millis()).unwrap_or(i64::MAX);
        if let Err(e) = record(state, settings, &c, started, ms, &out).await {
            // The lease runs out and the delivery is sent again.
            tracing::warn!(error = %e, event_id = %c.event_id, "recording a webhook attempt failed");
        }
    });
    futures::future::join_all(jobs).await;
    Ok(n)
}

/// Starts the delivery worker (and the sweeper of time-caused events) of this replica; it
/// stops when the state is dropped.
pub fn spawn_worker(state: std::sync::Weak<crate::Shared>, settings: Settings) -> Result<(), crate::StartError> {
    let http = client(settings.timeout, settings.allow_private).map_err(crate::StartError::Config)?;
    tokio::spawn(async move {
        let mut last_sweep: Option<std::time::Instant> = None;
        loop {
            let Some(shared) = state.upgrade() else { return };
            let st = AppState(shared);
            if last_sweep.is_none_or(|t| t.elapsed() >= super::outbox::SWEEP_EVERY) {
                last_sweep = Some(std::time::Instant::now());
                if let Err(e) = super::outbox::sweep(&st).await {
                    tracing::warn!(error = %e, "webhook sweep failed; retrying next round");
                }
            }
            let busy = match run_once(&st, &http, &settings).await {
                Ok(n) => n > 0,
                Err(e) => {
                    tracing::warn!(error = %e, "webhook delivery round failed; retrying");
                    false
                }
            };
            drop(st);
            if !busy {
                tokio::time::sleep(settings.poll).await;
            }
        }
    });
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn standard_webhooks_reference_signature() {
        // The example of the Standard Webhooks specification's reference libraries.
        let key = crate::webhooks::secret_key("whsec_MfKQ9r8GKYqrTwjUPD8ILPZIo2LaLaSw").unwrap();
        let body = br#"{"test": 2432232314}"#;
        assert_eq!(sign(&key, "msg_p5jXN8AQM9LWM0D4loKWxJek", 1614265330, body), "v1,g0hM9SsE+OTPJTGt/tmIKtSyZlE3uFJELVlNIOLJ1OE=");
    }

    #[test]
    fn private_loopback_and_link_local_addresses_are_forbidden() {
        for a in [
            "127.0.0.1",
            "10.1.2.3",
            "172.16.0.1",
            "192.168.1.1",
            "169.254.169.254",
            "0.0.0.0",
            "100.64.0.1",
            "::1",
            "fe80::1",
            "fd00::1",
            "::ffff:127.0.0.1",
            "::",
        ] {
            assert!(forbidden(a.parse().unwrap()), "{a}");
        }
        for a in ["93.184.216.34", "8.8.8.8", "2606:4700::1111"] {
            assert!(!forbidden(a.parse().unwrap()), "{a}");
        }
        assert_eq!(ip_literal("[::1]"), Some("::1".parse().unwrap()));
        assert_eq!(ip_literal("example.com"), None);
    }

    #[test]
    fn backoff_doubles_with_jitter_and_stops_at_twelve_hours() {
        let base = Duration::seconds(5);
        for attempt in 1..=6 {
            let full = 5_000i64 << (attempt - 1);
            let b = backoff(base, attempt).num_milliseconds();
            assert!((full / 2..=full).contains(&b), "attempt {attempt}: {b}");
        }
        assert!(backoff(base, 40) <= MAX_BACKOFF);
    }
}
