//! Settings: one row per (user, key), last-writer-wins by hybrid logical clock (compared as
//! strings), tombstones for deletes, HLCs more than 5 minutes ahead of the server re-stamped,
//! and a per-user change sequence as the sync cursor. `GET|PUT|PATCH /v1/settings` for web
//! clients write with node `server`.

use crate::AppState;
use crate::auth::AuthUser;
use crate::error::{ApiError, ApiResult};
use crate::extract::JsonBody;
use crate::users::{self, User};
use axum::Json;
use axum::extract::State;
use chrono::{DateTime, Utc};
use deadpool_postgres::GenericClient;
use serde_json::{Map, Value, json};
use tally_core::contract;
use tally_core::hlc::Hlc;
use tally_core::wire::{SettingChange, SettingRejected};
use uuid::Uuid;

/// Checks one change against the contract (key, value size and text, HLC form).
pub fn check(c: &SettingChange) -> Result<(), contract::Violation> {
    contract::setting_key(&c.key)?;
    if Hlc::parse(&c.hlc).is_none() {
        return Err(contract::Violation::new(
            format!("settings.{}", c.key),
            "invalid_setting",
            format!("setting {:?}: malformed hlc", c.key),
        ));
    }
    if !c.deleted {
        contract::setting_value(&c.key, &c.value)?;
    }
    Ok(())
}

fn now_ms(now: DateTime<Utc>) -> u64 {
    u64::try_from(now.timestamp_millis()).unwrap_or(0)
}

/// A stored row as merging sees it.
struct StoredSetting {
    hlc: String,
    /// Contract size when not deleted.
    bytes: Option<usize>,
}

/// Merges changes into the (locked) user's settings, last writer wins by HLC (HLCs more than
/// [`contract::MAX_HLC_AHEAD_MS`] ahead of the server are re-stamped to its time first).
/// Returns the changes refused: those that break the contract, and winners that would take the
/// user past the per-user caps of keys and bytes (`quota_exceeded`); the rest are stored.
pub async fn merge(
    tx: &impl GenericClient,
    user_id: Uuid,
    changes: &[SettingChange],
    now: DateTime<Utc>,
) -> ApiResult<Vec<SettingRejected>> {
    if changes.is_empty() {
        return Ok(Vec::new());
    }
    let now_ms = now_ms(now);
    let mut rejected = Vec::new();
    // Later changes of one key in the same request win over earlier ones only by HLC too.
    let mut best: std::collections::BTreeMap<&str, (String, &SettingChange)> = Default::default();
    for c in changes {
        if let Err(v) = check(c) {
            rejected.push(SettingRejected { key: c.key.clone(), reason: v.code.to_string() });
            continue;
        }
        let Some(mut h) = Hlc::parse(&c.hlc) else { continue };
        if h.wall_ms > now_ms.saturating_add(contract::MAX_HLC_AHEAD_MS) {
            h.wall_ms = now_ms;
        }
        let s = h.to_string();
        match best.get(c.key.as_str()) {
            Some((b, _)) if *b >= s => {}
            _ => {
                best.insert(c.key.as_str(), (s, c));
            }
        }
    }
    let rows = tx.query(&tx.prepare_cached("SELECT key, value, deleted, hlc FROM settings WHERE user_id = $1").await?, &[&user_id]).await?;
    let mut stored: std::collections::HashMap<String, StoredSetting> = rows
        .iter()
        .map(|r| {
            let key: String = r.get(0);
            let bytes = (!r.get::<_, bool>(2)).then(|| {
                let v = r.get::<_, Option<Value>>(1).unwrap_or(Value::Null);
                contract::setting_bytes(&key, &serde_json::to_string(&v).unwrap_or_default())
            });
            (key, StoredSetting { hlc: r.get(3), bytes })
        })
        .collect();
    let mut keys = stored.values().filter(|s| s.bytes.is_some()).count();
    let mut bytes: usize = stored.values().filter_map(|s| s.bytes).sum();
    let mut winners = Vec::new();
    for (key, (hlc, c)) in best {
        let old = stored.get(key);
        if old.is_some_and(|o| o.hlc >= hlc) {
            continue; // loses: the stored row comes back to the device with the answer
        }
        let new_bytes = if c.deleted { None } else { Some(contract::setting_bytes(key, &serde_json::to_string(&c.value)?)) };
        let old_bytes = old.and_then(|o| o.bytes);
        let (k, b) = (
            keys + usize::from(new_bytes.is_some()) - usize::from(old_bytes.is_some()),
            bytes + new_bytes.unwrap_or(0) - old_bytes.unwrap_or(0),
        );
        let grows = new_bytes.unwrap_or(0) > old_bytes.unwrap_or(0) || (new_bytes.is_some() && old_bytes.is_none());
        if grows && contract::settings_quota(k, b).is_err() {
            rejected.push(SettingRejected { key: key.to_string(), reason: "quota_exceeded".into() });
            continue;
        }
        (keys, bytes) = (k, b);
        stored.insert(key.to_string(), StoredSetting { hlc: hlc.clone(), bytes: new_bytes });
        winners.push((key, hlc, c));
    }
    if winners.is_empty() {
        return Ok(rejected);
    }
    let n = i64::try_from(winners.len()).unwrap_or(i64::MAX);
    let top: i64 = tx
        .query_one(
            &tx.prepare_cached("UPDATE users SET settings_seq = settings_seq + $2 WHERE user_id = $1 RETURNING settings_seq").await?,
            &[&user_id, &n],
        )
        .await?
        .get(0);
    let (mut ks, mut values, mut deleted, mut hlcs, mut seqs) = (Vec::new(), Vec::new(), Vec::new(), Vec::new(), Vec::new());
    for (i, (key, hlc, c)) in winners.into_iter().enumerate() {
        ks.push(key.to_string());
        values.push(if c.deleted { None } else { Some(c.value.clone()) });
        deleted.push(c.deleted);
        hlcs.push(hlc);
        seqs.push(top - n + 1 + i64::try_from(i).unwrap_or(0));
    }
    tx.execute(&tx.prepare_cached("INSERT INTO settings (user_id, key, value, deleted, hlc, seq) \
         SELECT $1, * FROM unnest($2::text[], $3::jsonb[], $4::bool[], $5::text[], $6::int8[]) \
         ON CONFLICT (user_id, key) DO UPDATE SET value = excluded.value, deleted = excluded.deleted, hlc = excluded.hlc, seq = excluded.seq \
         WHERE settings.hlc < excluded.hlc").await?,
        &[&user_id, &ks, &values, &deleted, &hlcs, &seqs],
    )
    .await?;
    Ok(rejected)
}

/// Parses a cursor (an opaque decimal sequence; anything else means "from the start").
pub fn parse_cursor(c: Option<&str>) -> i64 {
    c.and_then(|s| s.parse::<i64>().ok()).filter(|n| *n >= 0).unwrap_or(0)
}

/// Changes after `cursor`, and the new cursor.
pub async fn changes_since(tx: &impl GenericClient, user_id: Uuid, cursor: i64) -> ApiResult<(Vec<SettingChange>, String)> {
    let rows = tx
        .query(
            &tx.prepare_cached("SELECT key, value, deleted, hlc, seq FROM settings WHERE user_id = $1 AND seq > $2 ORDER BY seq").await?,
            &[&user_id, &cursor],
        )
        .await?;
    let top: i64 = tx.query_one(&tx.prepare_cached("SELECT settings_seq FROM users WHERE user_id = $1").await?, &[&user_id]).await?.get(0);
    let changes = rows
        .iter()
        .map(|r| SettingChange {
            key: r.get(0),
            value: r.get::<_, Option<Value>>(1).unwrap_or(Value::Null),
            deleted: r.get(2),
            hlc: r.get(3),
        })
        .collect();
    Ok((changes, top.max(cursor).to_string()))
}

async fn current(client: &impl GenericClient, user_id: Uuid) -> ApiResult<Value> {
    let rows = client
        .query(
            &client.prepare_cached("SELECT key, value FROM settings WHERE user_id = $1 AND NOT deleted ORDER BY key").await?,
            &[&user_id],
        )
        .await?;
    let mut m = Map::new();
    for r in rows {
        m.insert(r.get(0), r.get::<_, Option<Value>>(1).unwrap_or(Value::Null));
    }
    let seq: i64 =
        client.query_one(&client.prepare_cached("SELECT settings_seq FROM users WHERE user_id = $1").await?, &[&user_id]).await?.get(0);
    Ok(json!({"settings": m, "cursor": seq.to_string()}))
}

/// `GET /v1/settings`: `{"settings": {key: value}, "cursor"}`.
#[utoipa::path(
    operation_id = "settings_get_settings",
    get,
    path = "/v1/settings",
    tag = "sync",
    security(("bearer" = [])),
    responses((status = 200, description = "Every setting as one JSON object", body = Object)),
)]
pub async fn get_settings(State(state): State<AppState>, AuthUser(user): AuthUser) -> ApiResult<Json<Value>> {
    let client = state.pool.get().await?;
    Ok(Json(current(&client, user.user_id).await?))
}

/// Web writes: each key stamped with a `server` HLC after the stored one; `null` deletes.
async fn web_write(state: &AppState, user: &User, body: Value, replace: bool) -> ApiResult<Json<Value>> {
    let obj = match body {
        Value::Object(o) => o,
        _ => return Err(ApiError::Invalid("invalid_body", "expected an object of settings {key: value}".into())),
    };
    let mut client = state.pool.get().await?;
    let tx = client.transaction().await?;
    users::lock(&tx, user.user_id, &state.config.admin_subjects).await?;
    let now = state.now();
    let stored = tx.query(&tx.prepare_cached("SELECT key, hlc, deleted FROM settings WHERE user_id = $1").await?, &[&user.user_id]).await?;
    let stored: std::collections::HashMap<String, (String, bool)> = stored.iter().map(|r| (r.get(0), (r.get(1), r.get(2)))).collect();
    let stamp = |key: &str| Hlc::tick(stored.get(key).and_then(|(h, _)| Hlc::parse(h)).as_ref(), now_ms(now), "server").to_string();
    let mut changes: Vec<SettingChange> =
        obj.iter().map(|(k, v)| SettingChange { key: k.clone(), value: v.clone(), deleted: v.is_null(), hlc: stamp(k) }).collect();
    if replace {
        for (k, (_, deleted)) in &stored {
            if !deleted && !obj.contains_key(k) {
                changes.push(SettingChange { key: k.clone(), value: Value::Null, deleted: true, hlc: stamp(k) });
            }
        }
    }
    if let Some(r) = merge(&tx, user.user_id, &changes, now).await?.into_iter().next() {
        // Nothing is written: the transaction is dropped.
        let message = match changes.iter().find(|c| c.key == r.key).map(check) {
            Some(Err(v)) => v.message,
            _ => format!("setting {:?}: {}", r.key, r.reason),
        };
        return Err(ApiError::Invalid(static_code(&r.reason), message));
    }
    let out = current(&tx, user.user_id).await?;
    tx.commit().await?;
    Ok(Json(out))
}

fn static_code(reason: &str) -> &'static str {
    match reason {
        "quota_exceeded" => "quota_exceeded",
        "value_too_large" => "value_too_large",
        "invalid_text" => "invalid_text",
        _ => "invalid_setting",
    }
}

/// `PUT /v1/settings`: replaces all settings with the given object.
#[utoipa::path(
    operation_id = "settings_put_settings",
    put,
    path = "/v1/settings",
    tag = "sync",
    security(("bearer" = [])),
    request_body = Object,
    responses((status = 200, description = "The settings after replacing them all", body = Object)),
)]
pub async fn put_settings(
    State(state): State<AppState>,
    AuthUser(user): AuthUser,
    JsonBody(body): JsonBody<Value>,
) -> ApiResult<Json<Value>> {
    web_write(&state, &user, body, true).await
}

/// `PATCH /v1/settings`: merges the given keys; `null` deletes a key.
#[utoipa::path(
    operation_id = "settings_patch_settings",
    patch,
    path = "/v1/settings",
    tag = "sync",
    security(("bearer" = [])),
    request_body = Object,
    responses(
        (status = 200, description = "The settings after the merge (`null` deletes)", body = Object),
    ),
)]
pub async fn patch_settings(
    State(state): State<AppState>,
    AuthUser(user): AuthUser,
    JsonBody(body): JsonBody<Value>,
) -> ApiResult<Json<Value>> {
    web_write(&state, &user, body, false).await
}
