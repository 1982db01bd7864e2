//! Entitlements: the user's resolved access (subscription, grants, admin, catalog), the signed
//! entitlements token (cached per user and version), `GET /v1/entitlements` and `GET /v1/keys`.

use crate::AppState;
use crate::auth::AuthUserCached;
use crate::error::{ApiError, ApiResult};
use crate::users::User;
use axum::Json;
use axum::extract::State;
use chrono::{DateTime, Duration, Utc};
use deadpool_postgres::GenericClient;
use serde_json::Value;
use std::collections::HashMap;
use std::sync::{Arc, Mutex};
use tally_core::entitlements::AccessGrant;
use tally_core::{Catalog, EntitlementClaims, Entitlements, SubscriptionStatus};
use uuid::Uuid;

/// A user's entitlements with what their windows are computed from.
pub struct Loaded {
    /// Resolved entitlements (`ver` and `tz` set).
    pub ents: Entitlements,
    /// Billing anchor: the subscription's period start, else the user's creation time.
    pub anchor: DateTime<Utc>,
    /// The catalog in effect.
    pub catalog: Arc<Catalog>,
    /// Its version.
    pub catalog_version: i64,
    /// The user's timezone history: every calendar window follows it.
    pub zones: tally_core::TimezoneHistory,
}

/// Loads and resolves `user`'s entitlements at `now`.
pub async fn load(state: &AppState, client: &impl GenericClient, user: &User, now: DateTime<Utc>) -> ApiResult<Loaded> {
    // Independent reads, pipelined on the one connection (one round trip of waiting, not three).
    let grants_st = client
        .prepare_cached("SELECT plan, until, granted_by, reason FROM access_grants WHERE user_id = $1 AND revoked_at IS NULL AND (until IS NULL OR until > $2)")
        .await?;
    let zones_st = client.prepare_cached(crate::timezones::HISTORY_QUERY).await?;
    let (catalog_now, subs, grants, zone_rows) = futures::try_join!(
        state.catalog.current(client),
        crate::billing::subscriptions::load(client, user.user_id),
        async { client.query(&grants_st, &[&user.user_id, &now]).await.map_err(ApiError::from) },
        async { client.query(&zones_st, &[&user.user_id]).await.map_err(ApiError::from) },
    )?;
    let zones = crate::timezones::from_rows(user, &zone_rows)?;
    let (catalog_version, catalog) = catalog_now;
    let grace = crate::billing::subscriptions::grace(state);
    let subs: Vec<tally_core::Subscription> = subs.into_iter().map(|s| s.sub).collect();
    let mut raw = Entitlements::free().with_subscriptions(&subs, &catalog, now, grace);
    let mut anchor = user.created_at;
    if raw.status != SubscriptionStatus::None {
        anchor = raw.period_start.unwrap_or(anchor);
    }
    raw.grants = grants.iter().map(|r| AccessGrant { plan: r.get(0), until: r.get(1), granted_by: r.get(2), reason: r.get(3) }).collect();
    raw.is_admin = user.is_admin;
    raw.tz = Some(zones.zone_at(now).name().to_string());
    raw.tz_history = zones.to_wire(now - tally_core::timezone_history::TOKEN_HISTORY_SPAN, user.created_at);
    // A negative stored version would sign a token older than any the device holds, and the
    // device would keep the entitlements it had: corruption, never a silent 0.
    raw.ver = crate::pools::stored_count(user.ver.saturating_add(catalog_version), || {
        format!("users.ver + catalog version of {} ({} + {catalog_version})", user.user_id, user.ver)
    })?;
    let mut ents = raw.resolve(&catalog, now, grace);
    let included = crate::credits::plan_grants(&ents, &catalog, user.created_at, anchor, now);
    ents.credit_grants = crate::credits::current(client, user.user_id, &ents.features, &catalog, now, included).await?;
    ents.credit_balance = ents.credit_grants.iter().map(|g| g.remaining).sum();
    Ok(Loaded { ents, anchor, catalog, catalog_version, zones })
}

struct Cached {
    ver: u64,
    credits: Vec<tally_core::CreditGrant>,
    token: String,
    reuse_until: DateTime<Utc>,
}

/// Signed tokens per user, reused while the entitlement version is unchanged and the token is
/// fresh (younger than half its lifetime, and no grant in it has ended).
/// Device tokens (protocol 2) are cached per (user, device) and reused only for the same
/// entitlement version and `lease_ver`: a device token is never served to another device, and a
/// lease change signs a new one.
#[derive(Default)]
pub struct TokenCache {
    m: Mutex<HashMap<Uuid, Cached>>,
    d: Mutex<HashMap<(Uuid, String), DeviceCached>>,
}

/// A cached device token: its `lease_ver`, `lease_until` (Unix seconds) and the token.
type DeviceCached = (u64, i64, Cached);

impl TokenCache {
    /// Drops the user's tokens (account deleted).
    pub fn forget(&self, user_id: Uuid) {
        if let Ok(mut m) = self.m.lock() {
            m.remove(&user_id);
        }
        if let Ok(mut d) = self.d.lock() {
            d.retain(|(u, _), _| *u != user_id);
        }
    }
}

/// The lease part of a device token.
pub struct DeviceLeases {
    /// The device (`did`).
    pub device_id: String,
    /// Its `lease_ver`.
    pub lease_ver: u64,
    /// Its lease entries.
    pub leases: Vec<tally_core::lease::Lease>,
}

/// The device token of `dev` (protocol 2): the entitlements token with `did`, `lease_ver`,
/// `lease_until` (= `exp` + `TALLY_LEASE_ACTIVE_SECS`) and `leases`, from the cache when the
/// same device holds one of the same version and `lease_ver` that is still fresh. Returns the
/// token and its `lease_until`.
pub fn device_token(
    state: &AppState,
    user: &User,
    ents: &Entitlements,
    now: DateTime<Utc>,
    force: bool,
    dev: DeviceLeases,
) -> ApiResult<(String, DateTime<Utc>)> {
    let key = (user.user_id, dev.device_id.clone());
    if let Ok(d) = state.tokens.d.lock()
        && !force
        && let Some((lease_ver, lease_until, c)) = d.get(&key)
        && *lease_ver == dev.lease_ver
        && c.ver == ents.ver
        && c.credits == ents.credit_grants
        && now < c.reuse_until
        && let Some(until) = DateTime::from_timestamp(*lease_until, 0)
    {
        return Ok((c.token.clone(), until));
    }
    let lease_ver = dev.lease_ver;
    let (token, reuse_until, lease_until) = sign(state, user, ents, now, Some(dev))?;
    let lease_until = lease_until.unwrap_or_default();
    if let Ok(mut d) = state.tokens.d.lock() {
        let cached = Cached { ver: ents.ver, credits: ents.credit_grants.clone(), token: token.clone(), reuse_until };
        remember(&mut d, key, (lease_ver, lease_until, cached), now, |(_, _, c)| c.reuse_until);
    }
    let until = DateTime::from_timestamp(lease_until, 0).ok_or_else(|| ApiError::internal("lease_until out of range"))?;
    Ok((token, until))
}

/// The signed entitlements token of `user` (from the cache when still valid).
pub fn token(state: &AppState, user: &User, ents: &Entitlements, now: DateTime<Utc>) -> ApiResult<String> {
    token_fresh(state, user, ents, now, false)
}

/// Like [`token`]; `force` signs a new token even when the cached one is still valid
/// (`force_entitlements` of a sync: "restore purchases").
pub fn token_fresh(state: &AppState, user: &User, ents: &Entitlements, now: DateTime<Utc>, force: bool) -> ApiResult<String> {
    if let Ok(m) = state.tokens.m.lock()
        && !force
        && let Some(c) = m.get(&user.user_id)
        && c.ver == ents.ver
        && c.credits == ents.credit_grants
        && now < c.reuse_until
    {
        return Ok(c.token.clone());
    }
    let (token, reuse_until, _) = sign(state, user, ents, now, None)?;
    if let Ok(mut m) = state.tokens.m.lock() {
        let cached = Cached { ver: ents.ver, credits: ents.credit_grants.clone(), token: token.clone(), reuse_until };
        remember(&mut m, user.user_id, cached, now, |c| c.reuse_until);
    }
    Ok(token)
}

/// Signs the entitlements token of `user` — a device token when `dev` is given (`did`,
/// `lease_ver`, `lease_until` = `exp` + `TALLY_LEASE_ACTIVE_SECS`, `leases`). Returns the token,
/// until when a cache may hand it out again (half its life, never past a grant's end), and its
/// `lease_until` (Unix s) for a device token.
fn sign(
    state: &AppState,
    user: &User,
    ents: &Entitlements,
    now: DateTime<Utc>,
    dev: Option<DeviceLeases>,
) -> ApiResult<(String, DateTime<Utc>, Option<i64>)> {
    let ttl = i64::try_from(state.config.token_ttl_secs).unwrap_or(86_400).max(1);
    let active = i64::try_from(state.config.lease_active_secs).unwrap_or(259_200);
    let iat = now.timestamp();
    let exp = iat + ttl;
    let lease_until = dev.as_ref().map(|_| exp.saturating_add(active));
    let (did, lease_ver, leases) = match dev {
        Some(d) => (Some(d.device_id), Some(d.lease_ver), d.leases),
        None => (None, None, Vec::new()),
    };
    let claims = EntitlementClaims {
        entitlements: ents.clone(),
        sub: user.external_id.clone().unwrap_or_else(|| user.user_id.to_string()),
        uid: user.user_id.to_string(),
        iss: tally_core::token::TOKEN_ISSUER.into(),
        aud: tally_core::token::TOKEN_AUDIENCE.into(),
        iat,
        exp,
        did,
        lease_ver,
        lease_until,
        leases,
    };
    let token = state.signer.sign(&claims).map_err(ApiError::internal)?;
    let mut reuse_until = now + Duration::seconds(ttl / 2);
    if let Some(u) = ents.granted_until {
        reuse_until = reuse_until.min(u);
    }
    if let Some(t) = next_zone_change(ents, now) {
        reuse_until = reuse_until.min(t);
    }
    Ok((token, reuse_until, lease_until))
}

/// When the zone in force of `ents` (its `tz`) changes next after `now`: a pending change of
/// its `tz_history` taking effect.
fn next_zone_change(ents: &Entitlements, now: DateTime<Utc>) -> Option<DateTime<Utc>> {
    ents.tz_history.iter().map(|c| c.from).find(|t| *t > now)
}

/// Inserts `value` into a bounded in-memory cache: at [`MAX_CACHED_USERS`] entries the stale
/// ones go first, then everything.
fn remember<K: std::hash::Hash + Eq, V>(
    map: &mut std::collections::HashMap<K, V>,
    key: K,
    value: V,
    now: DateTime<Utc>,
    fresh_until: impl Fn(&V) -> DateTime<Utc>,
) {
    if map.len() >= MAX_CACHED_USERS {
        map.retain(|_, v| fresh_until(v) > now);
        if map.len() >= MAX_CACHED_USERS {
            map.clear();
        }
    }
    map.insert(key, value);
}

/// Most users whose snapshot or token a server process keeps in memory.
const MAX_CACHED_USERS: usize = 100_000;

/// Resolved entitlements of `GET /v1/entitlements` per user, reused while the user's version,
/// timezone and admin flag and the catalog version are unchanged, until the next instant at which
/// the resolution changes by itself (a grant or a grace period ending) and for at most a minute;
/// with them their JSON, serialized once. Users with credits are always read afresh: their
/// balance moves with every sync.
#[derive(Default)]
pub struct Snapshots {
    m: Mutex<HashMap<Uuid, Snapshot>>,
}

/// Resolved entitlements and their JSON object (without the token).
#[derive(Clone)]
pub struct Resolved {
    /// The entitlements.
    pub ents: Arc<Entitlements>,
    /// `ents` as a JSON object.
    pub json: axum::body::Bytes,
}

impl Resolved {
    /// Serializes `ents` once.
    pub fn new(ents: Entitlements) -> ApiResult<Resolved> {
        let json = serde_json::to_vec(&ents).map_err(ApiError::internal)?;
        Ok(Resolved { ents: Arc::new(ents), json: json.into() })
    }

    /// The body of `GET /v1/entitlements`: the entitlements' object with `token` added.
    pub fn body_with(&self, token: &str) -> ApiResult<Vec<u8>> {
        let Some(open) = self.json.strip_suffix(b"}") else { return Err(ApiError::internal("entitlements are not a JSON object")) };
        let mut out = Vec::with_capacity(self.json.len() + token.len() + 12);
        out.extend_from_slice(open);
        out.extend_from_slice(if open.ends_with(b"{") { b"\"token\":" } else { b",\"token\":" });
        serde_json::to_writer(&mut out, token).map_err(ApiError::internal)?;
        out.push(b'}');
        Ok(out)
    }
}

struct Snapshot {
    key: (i64, i64, String, bool),
    resolved: Resolved,
    until: DateTime<Utc>,
}

impl Snapshots {
    fn key(user: &User, catalog_version: i64) -> (i64, i64, String, bool) {
        (user.ver, catalog_version, user.timezone.clone(), user.is_admin)
    }

    fn get(&self, user: &User, catalog_version: i64, now: DateTime<Utc>) -> Option<Resolved> {
        let m = self.m.lock().ok()?;
        let s = m.get(&user.user_id)?;
        let fresh =
            s.key.0 == user.ver && s.key.1 == catalog_version && s.key.2 == user.timezone && s.key.3 == user.is_admin && now < s.until;
        fresh.then(|| s.resolved.clone())
    }

    fn put(&self, user: &User, catalog_version: i64, resolved: &Resolved, now: DateTime<Utc>, grace: Duration) {
        let ents = &resolved.ents;
        let credits = !ents.credit_grants.is_empty() || ents.features.values().any(|r| matches!(r, tally_core::Rule::Credits { .. }));
        if credits {
            return;
        }
        let until =
            ents.next_boundary(now, grace).into_iter().chain(next_zone_change(ents, now)).fold(now + Duration::seconds(60), DateTime::min);
        if let Ok(mut m) = self.m.lock() {
            if m.len() >= MAX_CACHED_USERS {
                m.retain(|_, s| s.until > now);
                if m.len() >= MAX_CACHED_USERS {
                    m.clear();
                }
            }
            m.insert(user.user_id, Snapshot { key: Snapshots::key(user, catalog_version), resolved: resolved.clone(), until });
        }
    }
}

/// `GET /v1/entitlements`: the resolved entitlements and the signed token. A user held in this
/// process's caches (its row, its snapshot, its token) is answered without a database round
/// trip and without signing.
#[utoipa::path(
    operation_id = "entitlements_get_entitlements",
    get,
    path = "/v1/entitlements",
    tag = "sync",
    security(("bearer" = [])),
    responses(
        (status = 200, description = "The resolved entitlements and their signed token", body = Object),
    ),
)]
pub async fn get_entitlements(State(state): State<AppState>, AuthUserCached(user): AuthUserCached) -> ApiResult<axum::response::Response> {
    use axum::response::IntoResponse;
    let now = state.now();
    let max_age = std::time::Duration::from_secs(1);
    let held = state.catalog.fresh_version(max_age).and_then(|v| state.snapshots.get(&user, v, now));
    let resolved = match held {
        Some(r) => r,
        None => {
            let client = state.pool.get().await?;
            let catalog_version = state.catalog.recent_version(&client, max_age).await?;
            match state.snapshots.get(&user, catalog_version, now) {
                Some(r) => r,
                None => {
                    let loaded = load(&state, &client, &user, now).await?;
                    let grace = crate::billing::subscriptions::grace(&state);
                    let r = Resolved::new(loaded.ents)?;
                    state.snapshots.put(&user, loaded.catalog_version, &r, now, grace);
                    r
                }
            }
        }
    };
    let token = token(&state, &user, &resolved.ents, now)?;
    let body = resolved.body_with(&token)?;
    Ok(([(axum::http::header::CONTENT_TYPE, axum::http::HeaderValue::from_static("application/json"))], body).into_response())
}

/// `GET /v1/keys`: the JWKS of the entitlements-signing keys.
#[utoipa::path(
    operation_id = "entitlements_get_keys",
    get,
    path = "/v1/keys",
    tag = "sync",
    responses((status = 200, description = "JWKS of the token-signing keys", body = Object)),
)]
pub async fn get_keys(State(state): State<AppState>) -> Json<Value> {
    Json(state.signer.jwks())
}

#[cfg(test)]
mod tests {
    use super::*;
    use tally_core::{AccessGrant, Catalog, Rule};

    fn user(ver: i64) -> User {
        let t = Utc::now();
        User {
            user_id: Uuid::nil(),
            external_id: Some("sub".into()),
            email: None,
            display_name: None,
            avatar_url: None,
            timezone: "UTC".into(),
            is_admin: false,
            ver,
            created_at: t,
            updated_at: t,
            disabled_at: None,
            email_verified: false,
        }
    }

    #[test]
    fn snapshots_follow_the_version_the_catalog_and_time_boundaries() {
        let cache = Snapshots::default();
        let now = Utc::now();
        let grace = Duration::days(3);
        let mut ents = Entitlements::free();
        ents.grants.push(AccessGrant {
            plan: "pro".into(),
            until: Some(now + Duration::seconds(30)),
            granted_by: "ops".into(),
            reason: "beta".into(),
        });
        cache.put(&user(1), 7, &Resolved::new(ents).unwrap(), now, grace);
        assert!(cache.get(&user(1), 7, now + Duration::seconds(29)).is_some());
        assert!(cache.get(&user(1), 7, now + Duration::seconds(30)).is_none(), "the grant's end re-resolves");
        assert!(cache.get(&user(2), 7, now).is_none(), "a new entitlement version re-resolves");
        assert!(cache.get(&user(1), 8, now).is_none(), "a new catalog re-resolves");
        let mut other_tz = user(1);
        other_tz.timezone = "Asia/Tokyo".into();
        assert!(cache.get(&other_tz, 7, now).is_none());
        // Without any boundary, at most a minute.
        cache.put(&user(1), 7, &Resolved::new(Entitlements::free()).unwrap(), now, grace);
        assert!(cache.get(&user(1), 7, now + Duration::seconds(61)).is_none());
    }

    #[test]
    fn the_body_is_the_entitlements_object_with_the_token_added() {
        let r = Resolved::new(Entitlements::free()).unwrap();
        let body: Value = serde_json::from_slice(&r.body_with("a.b-c_d.e").unwrap()).unwrap();
        let mut want = serde_json::to_value(Entitlements::free()).unwrap();
        want["token"] = Value::String("a.b-c_d.e".into());
        assert_eq!(body, want);
        let odd: Value = serde_json::from_slice(&r.body_with("quote\"and\\slash").unwrap()).unwrap();
        assert_eq!(odd["token"], "quote\"and\\slash", "the token is written as a JSON string");
        let empty = Resolved { ents: r.ents.clone(), json: axum::body::Bytes::from_static(b"{}") };
        assert_eq!(empty.body_with("t").unwrap(), br#"{"token":"t"}"#);
        let not_object = Resolved { ents: r.ents.clone(), json: axum::body::Bytes::from_static(b"[]") };
        assert!(not_object.body_with("t").is_err());
    }

    #[test]
    fn users_with_credits_are_never_cached() {
        let cache = Snapshots::default();
        let now = Utc::now();
        let catalog = Catalog::from_json(r#"{"plans":[{"id":"free","features":{"img":{"type":"credits","cost":2}}}]}"#).unwrap();
        let ents = Entitlements::free().resolve(&catalog, now, Duration::zero());
        assert!(matches!(ents.features.get("img"), Some(Rule::Credits { .. })));
        cache.put(&user(1), 1, &Resolved::new(ents).unwrap(), now, Duration::zero());
        assert!(cache.get(&user(1), 1, now).is_none());
    }
}
