//! The device side of `POST /v1/sync`: drains the unacknowledged ledger in bounded batches,
//! sends dirty settings and profile edits, and applies the answer (acks by id, server totals,
//! settings by HLC, cursor, signed entitlements) in one SQLite transaction per round.
//!
//! Every round is safe to interrupt: events stay pending until an answer naming their id is
//! committed, and the server deduplicates re-sent ids, so the next sync converges without loss
//! or double counting.

use crate::error::{Error, Result};
use crate::period::{Period, window};
use crate::wire::{ErrorBody, PROTOCOL, ProfilePatch, Rejected, SettingChange, SyncRequest, SyncResponse, Total, WireEvent};
use crate::{Change, Tally, from_ms, ms, write_tx};
use chrono::{DateTime, Utc};
use rusqlite::{Connection, OptionalExtension, Transaction, params};
use serde::{Deserialize, Serialize};
use std::collections::HashSet;
use std::sync::Arc;
use std::time::Duration;
use uuid::Uuid;

/// Supplies a fresh sign-in token (the identity provider's JWT) before each request.
pub trait TokenProvider: Send + Sync {
    /// The current token, or `None` when the user must sign in again.
    fn token(&self) -> Option<String>;
}

/// Retries of one request on network errors, 5xx and 429.
#[derive(Debug, Clone, Copy)]
pub struct RetryPolicy {
    /// Attempts per request (including the first).
    pub max_attempts: u32,
    /// First backoff; doubled each attempt, with jitter.
    pub initial_backoff: Duration,
    /// Longest single wait (also caps `Retry-After`).
    pub max_backoff: Duration,
}

impl Default for RetryPolicy {
    fn default() -> Self {
        RetryPolicy { max_attempts: 6, initial_backoff: Duration::from_millis(200), max_backoff: Duration::from_secs(10) }
    }
}

/// How to reach the server.
#[derive(Clone)]
pub struct SyncOptions {
    /// Base URL of the Tally server (`http://127.0.0.1:8080`).
    pub server_url: String,
    /// The sign-in token (used when `token_provider` is absent or returns `None`).
    pub token: String,
    /// Asked for a fresh token before every request.
    pub token_provider: Option<Arc<dyn TokenProvider>>,
    /// Most events per request (the server's `limits` may lower it).
    pub max_batch_events: usize,
    /// Largest request body in bytes (the server's `limits` may lower it).
    pub max_batch_bytes: usize,
    /// Retry behaviour.
    pub retry: RetryPolicy,
    /// Per-request timeout.
    pub timeout: Duration,
    /// Ask for a freshly signed entitlements token ("restore purchases").
    pub force_entitlements: bool,
}

impl std::fmt::Debug for SyncOptions {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("SyncOptions")
            .field("server_url", &self.server_url)
            .field("max_batch_events", &self.max_batch_events)
            .finish_non_exhaustive()
    }
}

impl SyncOptions {
    /// Options with the defaults (500 events, 512 KiB per request, 6 attempts).
    pub fn new(server_url: impl Into<String>, token: impl Into<String>) -> Self {
        SyncOptions {
            server_url: server_url.into(),
            token: token.into(),
            token_provider: None,
            max_batch_events: 500,
            max_batch_bytes: 512 * 1024,
            retry: RetryPolicy::default(),
            timeout: Duration::from_secs(30),
            force_entitlements: false,
        }
    }
}

/// What a sync did.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct SyncReport {
    /// Events sent (counting re-sends after a retry once).
    pub events_sent: u64,
    /// Events the server took (new or already known).
    pub events_acked: u64,
    /// Of those, the ones the server already had.
    pub duplicates: u64,
    /// Events refused (quarantined locally: kept, never resent).
    pub rejected: Vec<Rejected>,
    /// Settings changes sent.
    pub settings_sent: u64,
    /// Settings changes received and applied.
    pub settings_received: u64,
    /// Requests made.
    pub rounds: u64,
    /// Whether a new entitlements token was accepted.
    pub entitlements_updated: bool,
}

/// Pending state read for one round.
struct Outbox {
    external_id: String,
    events: Vec<WireEvent>,
    settings: Vec<SettingChange>,
    profile: Option<ProfilePatch>,
    cursor: Option<String>,
    more_events: bool,
}

/// Events quarantined before sending because they are too large on their own.
const TOO_LARGE: &str = "too_large";

impl Tally {
    /// Synchronises `user_id` with the server until nothing is pending. See the module docs.
    pub async fn sync(&self, user_id: &str, options: SyncOptions) -> Result<SyncReport> {
        let client = reqwest::Client::builder()
            .timeout(options.timeout)
            .build()
            .map_err(|e| Error::Network(format!("cannot build HTTP client: {e}")))?;
        let url = format!("{}/v1/sync", options.server_url.trim_end_matches('/'));
        let mut report = SyncReport::default();
        let mut max_events = options.max_batch_events.max(1);
        let mut max_bytes = options.max_batch_bytes.max(1024);
        let mut first = true;
        loop {
            let outbox = self.outbox(user_id, max_events, max_bytes, &mut report)?;
            let nothing = outbox.events.is_empty() && outbox.settings.is_empty() && outbox.profile.is_none();
            if nothing && !first {
                break;
            }
            let sent_ids: Vec<Uuid> = outbox.events.iter().map(|e| e.id).collect();
            let request = SyncRequest {
                protocol: PROTOCOL,
                device_id: self.device_id(),
                external_id: Some(outbox.external_id.clone()),
                cursor: outbox.cursor.clone(),
                events: outbox.events,
                settings_changes: outbox.settings,
                profile: outbox.profile,
                force_entitlements: options.force_entitlements && first,
            };
            first = false;
            report.rounds += 1;
            let token = options.token_provider.as_ref().and_then(|p| p.token()).unwrap_or_else(|| options.token.clone());
            let response = match self.post(&client, &url, &token, &request, &options.retry).await {
                Ok(r) => r,
                Err(PostError::TooLarge) if sent_ids.len() > 1 => {
                    max_events = (sent_ids.len() / 2).max(1);
                    continue;
                }
                Err(PostError::TooLarge) if sent_ids.len() == 1 => {
                    let mut g = self.lock();
                    write_tx(&mut g.conn, |tx| quarantine(tx, user_id, &sent_ids[0], TOO_LARGE))?;
                    report.rejected.push(Rejected { id: sent_ids[0].to_string(), reason: TOO_LARGE.into() });
                    continue;
                }
                Err(PostError::TooLarge) => {
                    return Err(Error::Server {
                        status: 413,
                        code: "payload_too_large".into(),
                        message: "settings or profile too large".into(),
                    });
                }
                Err(PostError::AccountDeleted) => {
                    self.delete_user(user_id, true)?;
                    return Err(Error::AccountDeleted);
                }
                Err(PostError::Other(e)) => return Err(e),
            };
            report.events_sent += sent_ids.len() as u64;
            report.settings_sent += request.settings_changes.len() as u64;
            max_events = max_events.min(response.limits.max_batch_events.max(1) as usize);
            max_bytes = max_bytes.min(usize::try_from(response.limits.max_body_bytes).unwrap_or(usize::MAX).max(1024));
            self.apply(user_id, &outbox.external_id, &sent_ids, &request, response, &mut report)?;
            if !outbox.more_events && request.events.len() == sent_ids.len() && self.nothing_pending(user_id)? {
                break;
            }
        }
        self.notify(user_id, Change { usage: true, entitlements: report.entitlements_updated, settings: report.settings_received > 0 });
        Ok(report)
    }

    fn nothing_pending(&self, user_id: &str) -> Result<bool> {
        let g = self.lock();
        let n: i64 = g.conn.query_row(
            "SELECT (SELECT COUNT(*) FROM events WHERE user_id = ?1 AND status = 0)
                  + (SELECT COUNT(*) FROM settings WHERE user_id = ?1 AND dirty = 1)
                  + (SELECT COUNT(*) FROM users WHERE id = ?1 AND profile_patch IS NOT NULL)",
            [user_id],
            |r| r.get(0),
        )?;
        Ok(n == 0)
    }

    /// Reads what to send in one round, quarantining events too large to send alone.
    fn outbox(&self, user_id: &str, max_events: usize, max_bytes: usize, report: &mut SyncReport) -> Result<Outbox> {
        let mut g = self.lock();
        let user = crate::users::get_user(&g.conn, user_id)?;
        let external_id =
            user.external_id.ok_or_else(|| Error::invalid(format!("user {user_id} is not signed in; sign_in before syncing")))?;
        let (cursor, patch): (Option<String>, Option<String>) =
            g.conn.query_row("SELECT sync_cursor, profile_patch FROM users WHERE id = ?1", [user_id], |r| Ok((r.get(0)?, r.get(1)?)))?;
        let profile: Option<ProfilePatch> = patch.as_deref().map(serde_json::from_str).transpose()?;
        let settings = Tally::dirty_settings(&g.conn, user_id)?;
        let overhead = serde_json::to_vec(&settings)?.len() + serde_json::to_vec(&profile)?.len() + 512;
        let candidates = pending_events(&g.conn, user_id, max_events + 1)?;
        let more_events = candidates.len() > max_events;
        let mut events = Vec::new();
        let mut bytes = overhead;
        let mut too_large = Vec::new();
        for e in candidates.into_iter().take(max_events) {
            let size = serde_json::to_vec(&e)?.len() + 1;
            if size + 512 > max_bytes {
                too_large.push(e.id);
                continue;
            }
            if bytes + size > max_bytes {
                break;
            }
            bytes += size;
            events.push(e);
        }
        if !too_large.is_empty() {
            write_tx(&mut g.conn, |tx| {
                for id in &too_large {
                    quarantine(tx, user_id, id, TOO_LARGE)?;
                }
                Ok(())
            })?;
            report.rejected.extend(too_large.iter().map(|id| Rejected { id: id.to_string(), reason: TOO_LARGE.into() }));
        }
        Ok(Outbox { external_id, events, settings, profile, cursor, more_events })
    }

    /// Sends one request, retrying network errors, 5xx and 429 with exponential backoff.
    async fn post(
        &self,
        client: &reqwest::Client,
        url: &str,
        token: &str,
        body: &SyncRequest,
        retry: &RetryPolicy,
    ) -> std::result::Result<SyncResponse, PostError> {
        let json = serde_json::to_vec(body).map_err(|e| PostError::Other(e.into()))?;
        let mut last = String::new();
        let mut backoff = retry.initial_backoff;
        for attempt in 1..=retry.max_attempts.max(1) {
            let sent = client
                .post(url)
                .bearer_auth(token)
                .header(reqwest::header::CONTENT_TYPE, "application/json")
                .body(json.clone())
                .send()
                .await;
            let wait = match sent {
                Err(e) => {
                    last = format!("request failed: {e}");
                    None
                }
                Ok(resp) => {
                    let status = resp.status().as_u16();
                    let retry_after = resp
                        .headers()
                        .get(reqwest::header::RETRY_AFTER)
                        .and_then(|v| v.to_str().ok())
                        .and_then(|v| v.trim().parse::<u64>().ok())
                        .map(Duration::from_secs);
                    let text = resp.bytes().await;
                    let text = match text {
                        Ok(t) => t,
                        Err(e) => {
                            // The server may have committed; re-sending is safe (dedup by id).
                            last = format!("reading the answer failed: {e}");
                            self.backoff_sleep(&mut backoff, retry, None).await;
                            continue;
                        }
                    };
                    let (code, message) = match serde_json::from_slice::<ErrorBody>(&text) {
                        Ok(b) => (b.error.code, b.error.message),
                        Err(_) => (String::new(), String::from_utf8_lossy(&text).chars().take(200).collect()),
                    };
                    match status {
                        200..=299 => {
                            return serde_json::from_slice(&text).map_err(|e| {
                                PostError::Other(Error::Server {
                                    status,
                                    code: "bad_response".into(),
                                    message: format!("unreadable sync answer: {e}"),
                                })
                            });
                        }
                        401 | 403 => return Err(PostError::Other(Error::Unauthorized(format!("{code}: {message}")))),
                        410 => return Err(PostError::AccountDeleted),
                        413 => return Err(PostError::TooLarge),
                        429 => {
                            last = format!("429 {code}: {message}");
                            Some(retry_after.unwrap_or(backoff))
                        }
                        500..=599 => {
                            last = format!("{status} {code}: {message}");
                            retry_after
                        }
                        _ => return Err(PostError::Other(Error::Server { status, code, message })),
                    }
                }
            };
            if attempt < retry.max_attempts {
                self.backoff_sleep(&mut backoff, retry, wait).await;
            }
        }
        Err(PostError::Other(Error::Network(format!("gave up after {} attempts: {last}", retry.max_attempts.max(1)))))
    }

    async fn backoff_sleep(&self, backoff: &mut Duration, retry: &RetryPolicy, wait: Option<Duration>) {
        let jittered = backoff.mul_f64(0.5 + rand::random::<f64>());
        let d = wait.unwrap_or(jittered).min(retry.max_backoff);
        tokio::time::sleep(d).await;
        *backoff = (*backoff * 2).min(retry.max_backoff);
    }

    /// Applies one answer in one transaction.
    fn apply(
        &self,
        user_id: &str,
        subject: &str,
        sent: &[Uuid],
        request: &SyncRequest,
        resp: SyncResponse,
        report: &mut SyncReport,
    ) -> Result<()> {
        let sent: HashSet<Uuid> = sent.iter().copied().collect();
        let claims = match (&resp.entitlements_token, self.config.server_keys.as_deref()) {
            (Some(t), Some(keys)) => crate::token::verify(t, keys, subject).ok().map(|c| (t.clone(), c)),
            _ => None,
        };
        let mut g = self.lock();
        let now = self.now(&g);
        let local_only = self.config.local_only_settings.clone();
        let received = write_tx(&mut g.conn, |tx| {
            for id in resp.accepted.iter().chain(&resp.duplicates).filter(|id| sent.contains(id)) {
                settle(tx, user_id, id, 1, None)?;
                report.events_acked += 1;
            }
            report.duplicates += resp.duplicates.iter().filter(|id| sent.contains(id)).count() as u64;
            for r in &resp.rejected {
                if let Ok(id) = Uuid::parse_str(&r.id)
                    && sent.contains(&id)
                {
                    quarantine(tx, user_id, &id, &r.reason)?;
                    report.rejected.push(r.clone());
                }
            }
            for t in &resp.totals {
                store_total(tx, user_id, t)?;
            }
            Tally::settings_sent(tx, user_id, &request.settings_changes)?;
            let received = Tally::merge_settings(tx, user_id, &local_only, &resp.settings_changes)?;
            if let Some(p) = &request.profile {
                tx.execute(
                    "UPDATE users SET profile_patch = NULL WHERE id = ?1 AND profile_patch = ?2",
                    params![user_id, serde_json::to_string(p)?],
                )?;
            }
            tx.execute(
                "UPDATE users SET sync_cursor = COALESCE(?2, sync_cursor), last_synced_at = ?3 WHERE id = ?1",
                params![user_id, resp.cursor, ms(now)],
            )?;
            if let Some((token, c)) = &claims {
                tx.execute(
                    "UPDATE users SET entitlements_token = ?2, is_admin = ?3 WHERE id = ?1",
                    params![user_id, token, c.entitlements.is_admin],
                )?;
                if let Some(tz) = c.entitlements.tz.as_deref().filter(|tz| crate::access::parse_tz(tz).is_ok()) {
                    tx.execute("UPDATE users SET timezone = ?2 WHERE id = ?1", params![user_id, tz])?;
                }
                tx.execute(
                    "UPDATE device SET highest_seen_ms = MAX(highest_seen_ms, ?1) WHERE singleton = 1",
                    [c.iat.saturating_mul(1000)],
                )?;
                // The server's grants already count every acknowledged use; local draws (and any
                // local debt) are replaced, then the still-pending uses are drawn again.
                tx.execute("DELETE FROM credit_grants WHERE user_id = ?1", [user_id])?;
                crate::credits::store_credit_grants(tx, user_id, &c.entitlements.credit_grants, now)?;
                redraw_pending_credits(tx, user_id, &c.entitlements.features, now)?;
            }
            Ok(received)
        })?;
        report.settings_received += received as u64;
        if let Some((_, c)) = &claims {
            report.entitlements_updated = true;
            g.highest_seen_ms = g.highest_seen_ms.max(c.iat.saturating_mul(1000));
        }
        // Totals, tz and plan may all have changed.
        Tally::forget_access(&mut g, user_id);
        Ok(())
    }

    /// When this user last completed a sync round.
    pub fn last_synced_at(&self, user_id: &str) -> Result<Option<DateTime<Utc>>> {
        let g = self.lock();
        let v: Option<Option<i64>> =
            g.conn.query_row("SELECT last_synced_at FROM users WHERE id = ?1", [user_id], |r| r.get(0)).optional()?;
        Ok(v.ok_or_else(|| Error::NotFound(format!("user {user_id}")))?.map(from_ms))
    }
}

enum PostError {
    TooLarge,
    AccountDeleted,
    Other(Error),
}

/// Unacknowledged events in device order.
fn pending_events(conn: &Connection, user_id: &str, limit: usize) -> Result<Vec<WireEvent>> {
    let mut st = conn.prepare_cached(
        "SELECT id, feature, amount, occurred_at, device_seq, model, input_tokens, output_tokens, metadata
         FROM events WHERE user_id = ?1 AND status = 0 ORDER BY device_seq LIMIT ?2",
    )?;
    let rows = st.query_map(params![user_id, limit as i64], |r| {
        Ok((
            r.get::<_, String>(0)?,
            r.get::<_, String>(1)?,
            r.get::<_, i64>(2)?,
            r.get::<_, i64>(3)?,
            r.get::<_, i64>(4)?,
            r.get::<_, Option<String>>(5)?,
            r.get::<_, Option<i64>>(6)?,
            r.get::<_, Option<i64>>(7)?,
            r.get::<_, Option<String>>(8)?,
        ))
    })?;
    let mut out = Vec::new();
    for row in rows {
        let (id, feature, amount, at, seq, model, inp, outp, meta) = row?;
        out.push(WireEvent {
            id: Uuid::parse_str(&id).map_err(|e| Error::invalid(format!("stored event id {id:?}: {e}")))?,
            feature,
            amount: amount as u64,
            occurred_at: from_ms(at),
            device_seq: Some(seq as u64),
            model,
            input_tokens: inp.map(|v| v as u64),
            output_tokens: outp.map(|v| v as u64),
            metadata: meta.as_deref().map(serde_json::from_str).transpose()?,
        });
    }
    Ok(out)
}

/// Marks a pending event settled (1) or rejected (2) and takes it out of the pending counters.
fn settle(tx: &Transaction<'_>, user_id: &str, id: &Uuid, status: i64, reason: Option<&str>) -> Result<()> {
    let row: Option<(String, i64, i64, i64)> = tx
        .prepare_cached(
            "SELECT feature, amount, occurred_at, COALESCE(cost_micros, 0) FROM events WHERE user_id = ?1 AND id = ?2 AND status = 0",
        )?
        .query_row(params![user_id, id.to_string()], |r| Ok((r.get(0)?, r.get(1)?, r.get(2)?, r.get(3)?)))
        .optional()?;
    let Some((feature, amount, at, cost)) = row else { return Ok(()) };
    let rule: Option<(String, String, i64)> = tx
        .prepare_cached("SELECT period, tz, anchor FROM counter_rules WHERE user_id = ?1 AND feature = ?2")?
        .query_row([user_id, &feature], |r| Ok((r.get(0)?, r.get(1)?, r.get(2)?)))
        .optional()?;
    if let Some((period, tz, anchor)) = rule
        && let Ok(p) = period.parse::<Period>()
    {
        let tz = if tz.is_empty() { chrono_tz::UTC } else { crate::access::parse_tz(&tz)? };
        let w = window(p, from_ms(at), tz, from_ms(anchor));
        tx.prepare_cached(
            "UPDATE counters SET pending = pending - ?5, pending_cost = pending_cost - ?6
             WHERE user_id = ?1 AND feature = ?2 AND period = ?3 AND period_start = ?4",
        )?
        .execute(params![user_id, feature, period, ms(w.start), amount, cost])?;
    }
    tx.prepare_cached("UPDATE events SET status = ?3, reject_reason = ?4 WHERE user_id = ?1 AND id = ?2")?.execute(params![
        user_id,
        id.to_string(),
        status,
        reason
    ])?;
    Ok(())
}

/// Quarantines an event: kept and visible, never resent, no longer counted.
fn quarantine(tx: &Transaction<'_>, user_id: &str, id: &Uuid, reason: &str) -> Result<()> {
    settle(tx, user_id, id, 2, Some(reason))
}

/// Stores the server's total of one window.
fn store_total(tx: &Transaction<'_>, user_id: &str, t: &Total) -> Result<()> {
    tx.prepare_cached(
        "INSERT INTO counters (user_id, feature, period, period_start, server_used, server_over) VALUES (?1, ?2, ?3, ?4, ?5, ?6)
         ON CONFLICT (user_id, feature, period, period_start) DO UPDATE SET server_used = excluded.server_used, server_over = excluded.server_over",
    )?
    .execute(params![user_id, t.feature, t.period.as_str(), ms(t.period_start), t.used.min(i64::MAX as u64) as i64, t.over_limit_by.min(i64::MAX as u64) as i64])?;
    Ok(())
}

/// After credit grants were replaced by the server's, spend again what this device consumed
/// and the server has not yet counted.
fn redraw_pending_credits(
    tx: &Transaction<'_>,
    user_id: &str,
    features: &std::collections::BTreeMap<String, crate::Rule>,
    now: DateTime<Utc>,
) -> Result<()> {
    // Without a credits rule nothing is drawn: skip the scan of every pending event, which ran
    // on each sync round and made draining N events O(N²).
    if !features.values().any(|r| matches!(r, crate::Rule::Credits { .. })) {
        return Ok(());
    }
    let pending: Vec<(String, i64)> = tx
        .prepare("SELECT feature, amount FROM events WHERE user_id = ?1 AND status = 0")?
        .query_map([user_id], |r| Ok((r.get(0)?, r.get(1)?)))?
        .collect::<rusqlite::Result<_>>()?;
    for (feature, amount) in pending {
        if let Some(crate::Rule::Credits { cost }) = features.get(&feature) {
            crate::credits::draw_credits(tx, user_id, cost.saturating_mul(amount as u64), now)?;
        }
    }
    Ok(())
}
