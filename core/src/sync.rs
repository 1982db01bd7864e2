//! The device side of `POST /v1/sync`: drains the unacknowledged ledger in bounded rounds and
//! applies each answer (acks by id, server totals, settings by HLC, cursor, signed
//! entitlements) in one SQLite transaction.
//!
//! A round is either a batch of events (no settings, no profile) or a chunk of dirty settings
//! with the pending profile edit (no events), each bounded by count and by bytes (the smaller of
//! the client's option and the server's announced `limits`). On 413 a batch or chunk halves; an
//! event or a setting too large alone is quarantined `too_large`, alone. A setting the server
//! refuses (`settings_rejected`) is quarantined alone and shown by [`Tally::setting_status`];
//! stored values that break the contract are quarantined before sending. So a setting never
//! takes an event down with it, and no stored value can make a sync fail.
//!
//! Every round is safe to interrupt: events stay pending until an answer naming their id is
//! committed, and the server deduplicates re-sent ids, so the next sync converges without loss
//! or double counting.

use crate::error::{Error, Result};
use crate::hlc::Hlc;
use crate::ledger::{EventState, RejectReason, advance_pending_from, find_rows, from_pending};
use crate::wire::{
    ErrorBody, PROTOCOL, ProfilePatch, ProfileRejected, Rejected, SettingChange, SettingRejected, SyncRequest, SyncResponse, Total,
    WireEvent,
};
use crate::{Change, EntitlementClaims, Tally, contract, from_ms, ms, write_tx};
use chrono::{DateTime, Utc};
use rusqlite::{Connection, OptionalExtension, params};
use serde::{Deserialize, Serialize};
use std::collections::{BTreeMap, HashSet};
use std::sync::Arc;
use std::time::Duration;
use uuid::Uuid;

/// Supplies a fresh sign-in token (the identity provider's JWT, or a password account's access
/// token) before each request.
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

impl RetryPolicy {
    /// The wait for a retry whose backoff is `backoff` (×0.5 to ×1.5 at random, at most
    /// `max_backoff`) and the backoff of the retry after it (doubled, at most `max_backoff`).
    pub fn jittered(&self, backoff: Duration) -> (Duration, Duration) {
        (backoff.mul_f64(0.5 + rand::random::<f64>()).min(self.max_backoff), backoff.saturating_mul(2).min(self.max_backoff))
    }
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
    /// A password account's session: supplies (and refreshes) the access token, before
    /// `token_provider` and `token`.
    pub session: Option<Arc<crate::session::PasswordSession>>,
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
    /// Options whose access token comes from (and is refreshed by) a password `session`.
    pub fn with_session(server_url: impl Into<String>, session: Arc<crate::session::PasswordSession>) -> Self {
        let mut o = SyncOptions::new(server_url, String::new());
        o.session = Some(session);
        o
    }

    /// The bearer token of the next request: a password session's (refreshed when due), else
    /// the provider's, else the fixed one.
    pub(crate) async fn bearer(&self) -> Result<String> {
        if let Some(s) = &self.session {
            return s.fresh_access_token().await;
        }
        Ok(self.token_provider.as_ref().and_then(|p| p.token()).unwrap_or_else(|| self.token.clone()))
    }

    /// Options with the defaults (500 events, 512 KiB per request, 6 attempts).
    pub fn new(server_url: impl Into<String>, token: impl Into<String>) -> Self {
        SyncOptions {
            server_url: server_url.into(),
            token: token.into(),
            token_provider: None,
            session: None,
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
    /// Settings refused (by the server, or by the contract before sending), each quarantined
    /// alone: kept and visible ([`Tally::setting_status`]), never resent until written again.
    #[serde(default)]
    pub settings_rejected: Vec<SettingRejected>,
    /// Profile fields refused; the pending profile edit was dropped.
    #[serde(default)]
    pub profile_rejected: Vec<ProfileRejected>,
    /// Features of sent events that the server's catalog does not know (stored there, counted
    /// in no total until the catalog knows them).
    #[serde(default)]
    pub unknown_features: Vec<String>,
}

/// Most settings in one settings round (the byte bound applies as well).
pub const MAX_SETTINGS_PER_ROUND: usize = 200;

/// What one round sends: events alone, or settings and the profile edit alone, or nothing (a
/// first round that only pulls the server's state).
enum Round {
    Events(Vec<WireEvent>),
    Settings(Vec<SettingChange>, Option<ProfilePatch>),
    Pull,
}

/// Pending state read for one round.
struct Outbox {
    external_id: String,
    cursor: Option<String>,
    round: Round,
}

/// Bounds of the next round.
struct Bounds {
    events: usize,
    settings: usize,
    bytes: usize,
}

impl Tally {
    /// Synchronises `user_id` with the server until nothing is pending. See the module docs.
    ///
    /// Needs `Config.server_keys` (the server's token-signing keys, shipped with the app):
    /// without them it is [`Error::Configuration`] before any request is made. A server that
    /// finds the credentials name another subject than the user's `external_id` answers 409
    /// `subject_mismatch`: [`Error::SubjectMismatch`], nothing changed.
    pub async fn sync(&self, user_id: &str, options: SyncOptions) -> Result<SyncReport> {
        self.sync_rounds(user_id, options, false).await
    }

    /// Gives back every lease of `user_id` on this device and syncs with `"final": true`, so
    /// the account gets the room at once. Apps call it before [`Tally::sign_out`] /
    /// [`Tally::delete_user`] when online (those drop the lease rows locally either way).
    /// Afterwards this device's hard pools allow only what it already used, until a sync
    /// brings new leases.
    pub async fn release_leases(&self, user_id: &str, options: SyncOptions) -> Result<SyncReport> {
        {
            let mut g = self.lock();
            crate::users::get_user(&g.conn, user_id)?;
            write_tx(&mut g.conn, |tx| crate::leases::release_all(tx, user_id))?;
            // Decisions read the releases with the cached access: drop it.
            Tally::forget_access(&mut g, user_id);
        }
        self.sync_rounds(user_id, options, true).await
    }

    async fn sync_rounds(&self, user_id: &str, options: SyncOptions, final_sync: bool) -> Result<SyncReport> {
        check_server_keys(self.config.server_keys.as_deref())?;
        let client = http_client(&options)?;
        let url = format!("{}/v1/sync", options.server_url.trim_end_matches('/'));
        let mut report = SyncReport::default();
        let mut bounds =
            Bounds { events: options.max_batch_events.max(1), settings: MAX_SETTINGS_PER_ROUND, bytes: options.max_batch_bytes.max(1024) };
        let mut first = true;
        let mut release_rounds = 0;
        loop {
            let outbox = self.outbox(user_id, &bounds, &mut report)?;
            let (events, settings, profile) = match outbox.round {
                Round::Events(e) => (e, Vec::new(), None),
                Round::Settings(s, p) => (Vec::new(), s, p),
                Round::Pull if first => (Vec::new(), Vec::new(), None),
                // Releases written during this sync (a recall) go out at once, so the room they
                // free is on the server now (bounded: a release round frees what is unused).
                Round::Pull if release_rounds < 3 && crate::leases::unsent_releases(&self.lock().conn, user_id)? => {
                    release_rounds += 1;
                    (Vec::new(), Vec::new(), None)
                }
                Round::Pull => break,
            };
            let lease = self.lease_request(user_id)?;
            let request = SyncRequest {
                protocol: PROTOCOL,
                device_id: self.device_id(),
                external_id: Some(outbox.external_id.clone()),
                cursor: outbox.cursor,
                events,
                settings_changes: settings,
                profile,
                force_entitlements: options.force_entitlements && first,
                want: if final_sync { Vec::new() } else { lease.want },
                release: lease.release,
                lease_ver: lease.lease_ver,
                final_sync,
            };
            first = false;
            report.rounds += 1;
            let token = options.bearer().await?;
            let mut answer = self.post(&client, &url, &token, &request, &options.retry).await;
            if let (Err(PostError::Expired(_)), Some(session)) = (&answer, &options.session) {
                // The server says the access token expired (clocks differ): refresh once.
                session.refresh().await?;
                answer = self.post(&client, &url, &options.bearer().await?, &request, &options.retry).await;
            }
            let response: SyncResponse = match answer {
                Ok(r) => r,
                Err(PostError::Expired(message)) => return Err(Error::Unauthorized(message)),
                Err(PostError::TooLarge) => {
                    self.too_large(user_id, &request, &mut bounds, &mut report)?;
                    continue;
                }
                Err(e) => return Err(self.post_failed(user_id, e, |status, code, message| Error::Server { status, code, message })),
            };
            report.events_sent += request.events.len() as u64;
            report.settings_sent += request.settings_changes.len() as u64;
            bounds.events = bounds.events.min(response.limits.max_batch_events.max(1) as usize);
            bounds.bytes = bounds.bytes.min(usize::try_from(response.limits.max_body_bytes).unwrap_or(usize::MAX).max(1024));
            let answered = self.apply(user_id, &outbox.external_id, &request, response, &mut report)?;
            self.lease_asks.sent(user_id, &request.want);
            if !request.events.is_empty() && answered == 0 {
                // Re-sending would get the same answer: stop instead of looping.
                return Err(Error::Server {
                    status: 200,
                    code: "bad_response".into(),
                    message: "the server answered none of the events sent (neither accepted nor rejected)".into(),
                });
            }
        }
        self.notify(user_id, Change { usage: true, entitlements: report.entitlements_updated, settings: report.settings_received > 0 });
        Ok(report)
    }

    /// A 413: halves the events (or settings) of the next round, and quarantines the one event
    /// (or setting, or the profile edit) that was too large alone.
    fn too_large(&self, user_id: &str, request: &SyncRequest, bounds: &mut Bounds, report: &mut SyncReport) -> Result<()> {
        let too_large = RejectReason::TooLarge;
        if request.events.len() > 1 {
            bounds.events = (request.events.len() / 2).max(1);
            return Ok(());
        }
        if request.settings_changes.len() > 1 {
            bounds.settings = (request.settings_changes.len() / 2).max(1);
            return Ok(());
        }
        let mut g = self.lock();
        if let Some(e) = request.events.first() {
            let id = e.id.to_string();
            write_tx(&mut g.conn, |tx| {
                quarantine(tx, user_id, &id, &too_large)?;
                advance_pending_from(tx, user_id)
            })?;
            report.rejected.push(Rejected { id, reason: too_large.as_str().into() });
        } else if let Some(c) = request.settings_changes.first() {
            write_tx(&mut g.conn, |tx| Tally::reject_setting(tx, user_id, &c.key, Some(&c.hlc), too_large.as_str()))?;
            report.settings_rejected.push(SettingRejected { key: c.key.clone(), reason: too_large.as_str().into() });
        } else if let Some(p) = &request.profile {
            write_tx(&mut g.conn, |tx| drop_profile_patch(tx, user_id, p))?;
            report.profile_rejected.push(ProfileRejected { field: "profile".into(), reason: too_large.as_str().into() });
        } else {
            return Err(Error::Server {
                status: 413,
                code: "payload_too_large".into(),
                message: "an empty sync request was refused as too large".into(),
            });
        }
        Ok(())
    }

    /// Reads what to send in one round: pending events first (a batch without settings), then
    /// dirty settings and the profile edit (a chunk without events). What cannot be sent — an
    /// event or a setting too large alone for the byte bound, or a stored value that breaks the
    /// contract (written by an older version) — is quarantined here, never sent, so that no
    /// stored value can make a sync fail.
    fn outbox(&self, user_id: &str, bounds: &Bounds, report: &mut SyncReport) -> Result<Outbox> {
        // The lease part of the request (`want`, `release`, `lease_ver`) rides in every round:
        // its size counts in the envelope, so a round never exceeds the byte bound.
        let lease = self.lease_request(user_id)?;
        let mut g = self.lock();
        let user = crate::users::get_user(&g.conn, user_id)?;
        let external_id =
            user.external_id.ok_or_else(|| Error::invalid(format!("user {user_id} is not signed in; sign_in before syncing")))?;
        let (cursor, patch): (Option<String>, Option<String>) =
            g.conn.query_row("SELECT sync_cursor, profile_patch FROM users WHERE id = ?1", [user_id], |r| Ok((r.get(0)?, r.get(1)?)))?;
        let envelope = SyncRequest {
            protocol: PROTOCOL,
            device_id: g.device_id.clone(),
            external_id: Some(external_id.clone()),
            cursor: cursor.clone(),
            events: Vec::new(),
            settings_changes: Vec::new(),
            profile: None,
            force_entitlements: true,
            want: lease.want,
            release: lease.release,
            lease_ver: lease.lease_ver,
            final_sync: false,
        };
        let envelope = serde_json::to_vec(&envelope)?.len() + 16;

        // Events.
        loop {
            let mut events = Vec::new();
            let mut bytes = envelope;
            let mut quarantined: Vec<(String, RejectReason)> = Vec::new();
            let candidates = pending_events(&g.conn, user_id, bounds.events)?;
            if candidates.is_empty() {
                break;
            }
            for c in candidates {
                let checked =
                    c.and_then(|e| match if e.voids.is_some() { contract::occurred_at(e.occurred_at) } else { contract::event(&e) } {
                        Ok(()) => Ok(e),
                        Err(v) => Err((e.id.to_string(), v.code)),
                    });
                let e = match checked {
                    Ok(e) => e,
                    Err((id, code)) => {
                        quarantined.push((id, RejectReason::Contract(code)));
                        continue;
                    }
                };
                let size = serde_json::to_vec(&e)?.len() + 1;
                if envelope + size > bounds.bytes {
                    quarantined.push((e.id.to_string(), RejectReason::TooLarge));
                    continue;
                }
                if bytes + size > bounds.bytes {
                    break;
                }
                bytes += size;
                events.push(e);
            }
            if !quarantined.is_empty() {
                write_tx(&mut g.conn, |tx| {
                    for (id, reason) in &quarantined {
                        quarantine(tx, user_id, id, reason)?;
                    }
                    advance_pending_from(tx, user_id)
                })?;
                report.rejected.extend(quarantined.iter().map(|(id, r)| Rejected { id: id.clone(), reason: r.as_str().into() }));
            }
            if !events.is_empty() {
                return Ok(Outbox { external_id, cursor, round: Round::Events(events) });
            }
            if quarantined.is_empty() {
                break;
            }
        }

        // The profile edit: a field that breaks the contract is dropped from it and reported.
        let mut profile: Option<ProfilePatch> = match patch.as_deref().map(serde_json::from_str::<ProfilePatch>).transpose() {
            Ok(p) => p,
            Err(_) => {
                report.profile_rejected.push(ProfileRejected { field: "profile".into(), reason: "invalid_profile".into() });
                None
            }
        };
        if let Some(p) = profile.as_mut() {
            while let Err(v) = contract::profile(p) {
                report.profile_rejected.push(ProfileRejected { field: v.field.clone(), reason: v.code.into() });
                match v.field.as_str() {
                    "display_name" => p.display_name = None,
                    "avatar_url" => p.avatar_url = None,
                    "timezone" => p.timezone = None,
                    _ => *p = ProfilePatch::default(),
                }
            }
        }
        let profile = profile.filter(|p| p != &ProfilePatch::default());
        let cleaned = profile.as_ref().map(serde_json::to_string).transpose()?;
        if cleaned != patch {
            g.conn.execute("UPDATE users SET profile_patch = ?2 WHERE id = ?1", params![user_id, cleaned])?;
        }

        // Settings.
        let profile_bytes = serde_json::to_vec(&profile)?.len() + 16;
        let mut chunk = Vec::new();
        let mut bytes = envelope + profile_bytes;
        let mut refused: Vec<(String, Option<String>, &'static str)> = Vec::new();
        for row in Tally::dirty_settings(&g.conn, user_id)? {
            let c = match row {
                Ok(c) => c,
                Err((key, code)) => {
                    refused.push((key, None, code));
                    continue;
                }
            };
            if self.config.local_only_settings.contains(&c.key) {
                continue;
            }
            let valid = contract::setting_key(&c.key)
                .and_then(|()| if c.deleted { Ok(String::new()) } else { contract::setting_value(&c.key, &c.value) })
                .and_then(|_| {
                    Hlc::parse(&c.hlc).map(|_| ()).ok_or_else(|| contract::Violation::new("hlc", "invalid_setting", "malformed HLC"))
                });
            if let Err(v) = valid {
                refused.push((c.key, Some(c.hlc), v.code));
                continue;
            }
            let size = serde_json::to_vec(&c)?.len() + 1;
            if envelope + profile_bytes + size > bounds.bytes {
                refused.push((c.key, Some(c.hlc), RejectReason::TOO_LARGE));
                continue;
            }
            if chunk.len() >= bounds.settings || bytes + size > bounds.bytes {
                break;
            }
            bytes += size;
            chunk.push(c);
        }
        if !refused.is_empty() {
            write_tx(&mut g.conn, |tx| {
                for (key, hlc, code) in &refused {
                    Tally::reject_setting(tx, user_id, key, hlc.as_deref(), code)?;
                }
                Ok(())
            })?;
            report.settings_rejected.extend(refused.into_iter().map(|(key, _, code)| SettingRejected { key, reason: code.into() }));
        }
        if !chunk.is_empty() || profile.is_some() {
            return Ok(Outbox { external_id, cursor, round: Round::Settings(chunk, profile) });
        }
        Ok(Outbox { external_id, cursor, round: Round::Pull })
    }

    /// Sends one JSON request to the server, retrying network errors, 5xx and 429 with
    /// exponential backoff and jitter (a 503 `store_unconfigured` is an answer, not retried).
    pub(crate) async fn post<B: Serialize, R: serde::de::DeserializeOwned>(
        &self,
        client: &reqwest::Client,
        url: &str,
        token: &str,
        body: &B,
        retry: &RetryPolicy,
    ) -> std::result::Result<R, PostError> {
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
                                    message: format!("unreadable answer: {e}"),
                                })
                            });
                        }
                        401 if code == "token_expired" => return Err(PostError::Expired(format!("{code}: {message}"))),
                        403 if code == "account_disabled" => return Err(PostError::Other(Error::AccountDisabled)),
                        401 | 403 => return Err(PostError::Other(Error::Unauthorized(format!("{code}: {message}")))),
                        410 => return Err(PostError::AccountDeleted),
                        413 => return Err(PostError::TooLarge),
                        409 if code == "subject_mismatch" => return Err(PostError::SubjectMismatch),
                        429 => {
                            last = format!("429 {code}: {message}");
                            Some(retry_after.unwrap_or(backoff))
                        }
                        503 if code == "store_unconfigured" => return Err(PostError::Refused { status, code, message }),
                        500..=599 => {
                            last = format!("{status} {code}: {message}");
                            retry_after
                        }
                        _ => return Err(PostError::Refused { status, code, message }),
                    }
                }
            };
            if attempt < retry.max_attempts {
                self.backoff_sleep(&mut backoff, retry, wait).await;
            }
        }
        Err(PostError::Other(Error::Network(format!("gave up after {} attempts: {last}", retry.max_attempts.max(1)))))
    }

    /// The error of a failed [`Tally::post`] for `user_id`: a 410 removes the user locally, as
    /// the account is gone; an answer retrying will not change becomes `refused(status, code,
    /// message)`. (A 413 is the caller's to handle.)
    pub(crate) fn post_failed(&self, user_id: &str, e: PostError, refused: impl FnOnce(u16, String, String) -> Error) -> Error {
        match e {
            PostError::Expired(message) => Error::Unauthorized(message),
            PostError::TooLarge => refused(413, "payload_too_large".into(), "the request is too large".into()),
            PostError::AccountDeleted => match self.delete_user(user_id, true) {
                Ok(()) => Error::AccountDeleted,
                Err(e) => e,
            },
            PostError::SubjectMismatch => Error::SubjectMismatch(user_id.to_string()),
            PostError::Refused { status, code, message } => refused(status, code, message),
            PostError::Other(e) => e,
        }
    }

    async fn backoff_sleep(&self, backoff: &mut Duration, retry: &RetryPolicy, wait: Option<Duration>) {
        let (jittered, next) = retry.jittered(*backoff);
        let d = wait.unwrap_or(jittered).min(retry.max_backoff);
        tokio::time::sleep(d).await;
        *backoff = next;
    }

    /// Applies one answer in one transaction. Returns how many of the sent events it settled
    /// or quarantined.
    fn apply(&self, user_id: &str, subject: &str, request: &SyncRequest, resp: SyncResponse, report: &mut SyncReport) -> Result<u64> {
        let sent: HashSet<Uuid> = request.events.iter().map(|e| e.id).collect();
        // Key → HLC of the settings this request sent; the rejected ones are not adopted.
        let mut sent_settings: BTreeMap<String, String> = request.settings_changes.iter().map(|c| (c.key.clone(), c.hlc.clone())).collect();
        let claims = match (&resp.entitlements_token, self.config.server_keys.as_deref()) {
            (Some(t), Some(keys)) => crate::token::verify(t, keys, subject).ok().map(|c| (t.clone(), c)),
            _ => None,
        };
        let mut g = self.lock();
        let now = self.now(&g);
        let local_only = self.config.local_only_settings.clone();
        let device_id = g.device_id.clone();
        let mut answered = 0;
        let mut accepted_token = false;
        let received = write_tx(&mut g.conn, |tx| {
            for id in resp.accepted.iter().chain(&resp.duplicates).filter(|id| sent.contains(id)) {
                settle(tx, user_id, &id.to_string(), EventState::Settled, None)?;
                report.events_acked += 1;
                answered += 1;
            }
            report.duplicates += resp.duplicates.iter().filter(|id| sent.contains(id)).count() as u64;
            for r in &resp.rejected {
                if let Ok(id) = Uuid::parse_str(&r.id)
                    && sent.contains(&id)
                {
                    quarantine(tx, user_id, &id.to_string(), &RejectReason::Server(r.reason.clone()))?;
                    report.rejected.push(r.clone());
                    answered += 1;
                }
            }
            advance_pending_from(tx, user_id)?;
            for t in &resp.totals {
                store_total(tx, user_id, t)?;
            }
            for r in &resp.settings_rejected {
                if let Some(hlc) = sent_settings.remove(&r.key) {
                    Tally::reject_setting(tx, user_id, &r.key, Some(&hlc), &r.reason)?;
                    report.settings_rejected.push(r.clone());
                }
            }
            Tally::settings_sent(tx, user_id, &request.settings_changes)?;
            let received = Tally::merge_settings(tx, user_id, &local_only, &resp.settings_changes, &sent_settings)?;
            if let Some(p) = &request.profile {
                drop_profile_patch(tx, user_id, p)?;
                report.profile_rejected.extend(resp.profile_rejected.iter().cloned());
            }
            for f in &resp.unknown_features {
                if !report.unknown_features.contains(f) {
                    report.unknown_features.push(f.clone());
                }
            }
            tx.execute(
                "UPDATE users SET sync_cursor = COALESCE(?2, sync_cursor), last_synced_at = ?3 WHERE id = ?1",
                params![user_id, resp.cursor, ms(now)],
            )?;
            crate::leases::releases_acked(tx, user_id, &request.release)?;
            if let Some((token, c)) = &claims {
                accepted_token = store_token(tx, user_id, &device_id, token, c, now)?;
            }
            crate::leases::apply_recall(tx, user_id, &resp.recall)?;
            Ok(received)
        })?;
        report.settings_received += received as u64;
        if let Some((_, c)) = claims.as_ref().filter(|_| accepted_token) {
            report.entitlements_updated = true;
            token_seen(&mut g, c);
        }
        // Totals, tz and plan may all have changed.
        Tally::forget_access(&mut g, user_id);
        Ok(answered)
    }

    /// When this user last completed a sync round.
    pub fn last_synced_at(&self, user_id: &str) -> Result<Option<DateTime<Utc>>> {
        let g = self.lock();
        let v: Option<Option<i64>> =
            g.conn.query_row("SELECT last_synced_at FROM users WHERE id = ?1", [user_id], |r| r.get(0)).optional()?;
        Ok(v.ok_or_else(|| Error::NotFound(format!("user {user_id}")))?.map(from_ms))
    }
}

/// Why [`Tally::post`] got no answer to use.
pub(crate) enum PostError {
    /// 401 `token_expired`.
    Expired(String),
    /// 413: the body was too large.
    TooLarge,
    /// 410 `account_deleted`.
    AccountDeleted,
    /// 409 `subject_mismatch`.
    SubjectMismatch,
    /// Any other answer that retrying will not change (mostly 4xx), with the server's code.
    Refused { status: u16, code: String, message: String },
    /// Everything else (network after retries, 401, unreadable answers).
    Other(Error),
}

/// After a [`store_token`] commit: the highest time seen moves to the token's `iat`.
pub(crate) fn token_seen(g: &mut crate::Inner, c: &EntitlementClaims) {
    g.highest_seen_ms = g.highest_seen_ms.max(c.iat.saturating_mul(1000));
}

/// An HTTP client with the options' per-request timeout.
pub(crate) fn http_client(options: &SyncOptions) -> Result<reqwest::Client> {
    reqwest::Client::builder().timeout(options.timeout).build().map_err(|e| Error::Network(format!("cannot build HTTP client: {e}")))
}

/// Stores an entitlements token the server answered, verified for the user already (`claims`),
/// inside the caller's transaction: the token, admin flag and timezone, the credit grants (this
/// device's still-pending credit uses drawn again) and the device token's leases. A device token
/// of another device, or older than the stored one, is not stored. Returns whether it was. Both
/// `sync` and the purchase calls store tokens only through here.
pub(crate) fn store_token(
    tx: &Connection,
    user_id: &str,
    device_id: &str,
    token: &str,
    c: &EntitlementClaims,
    now: DateTime<Utc>,
) -> Result<bool> {
    if !crate::leases::token_acceptable(tx, user_id, c, device_id)? {
        return Ok(false);
    }
    tx.execute("UPDATE users SET entitlements_token = ?2, is_admin = ?3 WHERE id = ?1", params![user_id, token, c.entitlements.is_admin])?;
    if let Some(tz) = c.entitlements.tz.as_deref().filter(|tz| contract::timezone(tz).is_ok()) {
        tx.execute("UPDATE users SET timezone = ?2 WHERE id = ?1", params![user_id, tz])?;
    }
    tx.execute("UPDATE device SET highest_seen_ms = MAX(highest_seen_ms, ?1) WHERE singleton = 1", [c.iat.saturating_mul(1000)])?;
    // The server's grants already count every acknowledged use; local draws (and any local
    // debt) are replaced, then the still-pending uses are drawn again.
    tx.execute("DELETE FROM credit_grants WHERE user_id = ?1", [user_id])?;
    crate::credits::store_credit_grants(tx, user_id, &c.entitlements.credit_grants, now)?;
    redraw_pending_credits(tx, user_id, &c.entitlements.features, now)?;
    crate::leases::store_leases(tx, user_id, c)?;
    Ok(true)
}

/// `Config.server_keys` must hold a JSON Web Key Set with at least one key: the keys ship with
/// the app, never fetched at run time (whoever answered that fetch could sign any plan).
pub(crate) fn check_server_keys(keys: Option<&str>) -> Result<()> {
    let keys = keys.ok_or_else(|| {
        Error::Configuration(
            "sync needs Config.server_keys: the server's token-signing keys (`tally-server keys export`), shipped with the app".into(),
        )
    })?;
    let set: jsonwebtoken::jwk::JwkSet =
        serde_json::from_str(keys).map_err(|e| Error::Configuration(format!("Config.server_keys is not a JSON Web Key Set: {e}")))?;
    if set.keys.is_empty() {
        return Err(Error::Configuration("Config.server_keys holds no key".into()));
    }
    Ok(())
}

/// Drops the pending profile edit when it is still the one sent (`sent`).
fn drop_profile_patch(tx: &Connection, user_id: &str, sent: &ProfilePatch) -> Result<()> {
    tx.execute(
        "UPDATE users SET profile_patch = NULL WHERE id = ?1 AND profile_patch = ?2",
        params![user_id, serde_json::to_string(sent)?],
    )?;
    Ok(())
}

/// A stored event that cannot be sent as it is: its id and the contract code.
type Unsendable = (String, &'static str);

/// Unacknowledged events in device order, as sent: an item of a use with several meters carries
/// its `use_id`; the rows of a void of a use (one per item, `use_id` = the void's id) make one
/// void event `{id: the void's id, voids: the use id}`. A row that no longer reads as a valid
/// event (written by an older version) comes back as `Err` for the caller to quarantine.
fn pending_events(conn: &Connection, user_id: &str, limit: usize) -> Result<Vec<std::result::Result<WireEvent, Unsendable>>> {
    let mut st = conn.prepare_cached(concat!(
        "SELECT id, feature, amount, occurred_at, device_seq, model, input_tokens, output_tokens, metadata, lease_ver, voids, use_id,
                CASE WHEN voids IS NOT NULL AND use_id IS NOT NULL THEN
                  (SELECT t.use_id FROM events t WHERE t.user_id = events.user_id AND t.id = events.voids AND t.indexed = 1) END
         FROM events WHERE ",
        from_pending!(),
        " AND user_id = ?1 AND status = ?2 ORDER BY device_seq LIMIT ?3"
    ))?;
    let rows = st.query_map(params![user_id, EventState::Pending, i64::try_from(limit).unwrap_or(i64::MAX)], |r| {
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
            r.get::<_, Option<i64>>(9)?,
            r.get::<_, Option<String>>(10)?,
            r.get::<_, Option<String>>(11)?,
            r.get::<_, Option<String>>(12)?,
        ))
    })?;
    let unsigned = |v: i64| u64::try_from(v).map_err(|_| "invalid_amount");
    let mut out: Vec<std::result::Result<WireEvent, Unsendable>> = Vec::new();
    for row in rows {
        let (row_id, feature, amount, at, seq, model, inp, outp, meta, lease_ver, voids, use_id, voided_use) = row?;
        // A void of a use travels under its own id, once, naming the use.
        let (id, voids) = match (&voids, use_id.clone()) {
            (Some(_), Some(void_id)) => (void_id, voided_use.or(Some(String::new()))),
            _ => (row_id, voids),
        };
        if voids.is_some() && out.last().is_some_and(|e| sent_id(e) == id) {
            continue;
        }
        let event = (|| -> std::result::Result<WireEvent, &'static str> {
            if let Some(target) = voids {
                // `{"id", "voids", "occurred_at", "device_seq", "metadata"?}`.
                return Ok(WireEvent {
                    id: Uuid::parse_str(&id).map_err(|_| "invalid_id")?,
                    feature: String::new(),
                    amount: 0,
                    occurred_at: DateTime::from_timestamp_millis(at).ok_or("invalid_event")?,
                    device_seq: Some(u64::try_from(seq).map_err(|_| "invalid_event")?),
                    model: None,
                    input_tokens: None,
                    output_tokens: None,
                    metadata: meta.as_deref().map(serde_json::from_str).transpose().map_err(|_| "invalid_event")?,
                    lease_ver: None,
                    voids: Some(Uuid::parse_str(&target).map_err(|_| "invalid_event")?),
                    use_id: None,
                });
            }
            Ok(WireEvent {
                id: Uuid::parse_str(&id).map_err(|_| "invalid_id")?,
                feature,
                amount: unsigned(amount)?,
                occurred_at: DateTime::from_timestamp_millis(at).ok_or("invalid_event")?,
                device_seq: Some(u64::try_from(seq).map_err(|_| "invalid_event")?),
                model,
                input_tokens: inp.map(unsigned).transpose()?,
                output_tokens: outp.map(unsigned).transpose()?,
                metadata: meta.as_deref().map(serde_json::from_str).transpose().map_err(|_| "invalid_event")?,
                lease_ver: lease_ver.map(unsigned).transpose()?,
                voids: None,
                use_id: use_id.as_deref().map(Uuid::parse_str).transpose().map_err(|_| "invalid_event")?,
            })
        })();
        out.push(event.map_err(|code| (id, code)));
    }
    Ok(out)
}

/// The id an entry of [`pending_events`] is sent (or quarantined) under.
fn sent_id(e: &std::result::Result<WireEvent, Unsendable>) -> String {
    match e {
        Ok(w) => w.id.to_string(),
        Err((id, _)) => id.clone(),
    }
}

/// Marks a pending event settled or rejected and takes it out of the pending counters (a
/// voided use was taken out when voided; a void event gives back what it took out), inside a
/// [`write_tx`] (so its counters are written). The caller moves the user's `pending_from` on
/// once it settled the batch ([`advance_pending_from`]).
/// A void of a use settles every row it is kept as.
fn settle(tx: &Connection, user_id: &str, id: &str, state: EventState, reason: Option<&RejectReason>) -> Result<()> {
    for seq in find_rows(tx, user_id, id)? {
        settle_row(tx, user_id, seq, state, reason)?;
    }
    Ok(())
}

/// [`settle`] of one row.
fn settle_row(tx: &Connection, user_id: &str, seq: i64, state: EventState, reason: Option<&RejectReason>) -> Result<()> {
    type Row = (String, i64, i64, i64, bool, bool, Option<String>, Option<String>, Option<i64>, i64);
    let row: Option<Row> = tx
        .prepare_cached(
            "SELECT feature, amount, COALESCE(target_at, occurred_at), COALESCE(cost_micros, 0), voids IS NOT NULL, voided,
                    lease_pool, lease_period, lease_start, lease_units
             FROM events WHERE device_seq = ?1 AND status = ?2",
        )?
        .query_row(params![seq, EventState::Pending], |r| {
            Ok((r.get(0)?, r.get(1)?, r.get(2)?, r.get(3)?, r.get(4)?, r.get(5)?, r.get(6)?, r.get(7)?, r.get(8)?, r.get(9)?))
        })
        .optional()?;
    let Some((feature, amount, at, cost, is_void, voided, pool, pool_period, pool_start, lease_units)) = row else { return Ok(()) };
    if !voided {
        let sign = if is_void { -1 } else { 1 };
        if let Some((period, start)) = crate::quota::event_window(tx, user_id, &feature, at)? {
            tx.prepare_cached(
                "UPDATE counters SET pending = pending - ?5, pending_cost = pending_cost - ?6
                 WHERE user_id = ?1 AND feature = ?2 AND period = ?3 AND period_start = ?4",
            )?
            .execute(params![user_id, feature, period, start, sign * amount, sign * cost])?;
        }
        if let (Some(pool), Some(period)) = (pool, pool_period)
            && lease_units != 0
        {
            crate::quota::add_leased(tx, user_id, &pool, &period, pool_start.unwrap_or(0), -sign * lease_units)?;
            if state == EventState::Settled {
                // The server counts it now: in the entry's `consumed` until the next token.
                crate::leases::settled_leased(tx, user_id, &pool, pool_start, sign * lease_units)?;
            }
        }
    }
    tx.prepare_cached("UPDATE events SET status = ?2, reject_reason = ?3 WHERE device_seq = ?1")?.execute(params![seq, state, reason])?;
    Ok(())
}

/// Quarantines an event: kept and visible, never resent, no longer counted (the caller moves
/// `pending_from` on, as after [`settle`]); a quarantined void event gives its target back.
fn quarantine(tx: &Connection, user_id: &str, id: &str, reason: &RejectReason) -> Result<()> {
    settle(tx, user_id, id, EventState::Rejected, Some(reason))?;
    // A refused void cancelled nothing: its target counts again.
    crate::void::restore_target(tx, user_id, id)
}

/// Stores the server's total of one window.
fn store_total(tx: &Connection, user_id: &str, t: &Total) -> Result<()> {
    tx.prepare_cached(
        "INSERT INTO counters (user_id, feature, period, period_start, server_used, server_over, server_causes) VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7)
         ON CONFLICT (user_id, feature, period, period_start) DO UPDATE SET server_used = excluded.server_used, server_over = excluded.server_over,
           server_causes = excluded.server_causes",
    )?
    .execute(params![
        user_id,
        t.feature,
        t.period.as_str(),
        ms(t.period_start),
        t.used.min(i64::MAX as u64) as i64,
        t.over_limit_by.min(i64::MAX as u64) as i64,
        t.over_limit_causes.join(",")
    ])?;
    Ok(())
}

/// After credit grants were replaced by the server's, spend again what this device consumed
/// and the server has not yet counted.
fn redraw_pending_credits(
    tx: &Connection,
    user_id: &str,
    features: &std::collections::BTreeMap<String, crate::Rule>,
    now: DateTime<Utc>,
) -> Result<()> {
    // Without a credits rule nothing is drawn: skip the scan of every pending event, which ran
    // on each sync round and made draining N events O(N²).
    if !features.values().any(|r| matches!(r, crate::Rule::Credits { .. })) {
        return Ok(());
    }
    let pending: Vec<(String, String, i64, Option<String>)> = tx
        .prepare(concat!(
            "SELECT id, feature, amount, voids FROM events WHERE ",
            from_pending!(),
            " AND user_id = ?1 AND status = ?2 AND voided = 0"
        ))?
        .query_map(params![user_id, EventState::Pending], |r| Ok((r.get(0)?, r.get(1)?, r.get(2)?, r.get(3)?)))?
        .collect::<rusqlite::Result<_>>()?;
    for (id, feature, amount, voids) in pending {
        if let Some(crate::Rule::Credits { cost }) = features.get(&feature) {
            let credits = cost.saturating_mul(amount as u64);
            match voids {
                // A void of an acknowledged use: its credits come back until the server counts it.
                Some(_) => crate::void::refund_credits(tx, user_id, &id, credits, now)?,
                None => crate::credits::draw_credits(tx, user_id, credits, now)?,
            }
        }
    }
    Ok(())
}
