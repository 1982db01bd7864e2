//! Settings: one row per (user, key), last-writer-wins by hybrid logical clock (compared as
//! strings), tombstones for deletes, HLCs more than 5 minutes ahead of the server re-stamped,
//! and a per-user change sequence as the sync cursor. `GET|PUT|PATCH /v1/settings` for web
//! clients write with node `server`.

use crate::AppState;
use crate::accounts::{self, User};
use crate::auth::AuthUser;
use crate::error::{ApiError, ApiResult};
use crate::extract::JsonBody;
use axum::Json;
use axum::extract::State;
use chrono::{DateTime, Utc};
use deadpool_postgres::GenericClient;
use serde_json::{Map, Value, json};
use tally_core::hlc::Hlc;
use tally_core::wire::SettingChange;
use uuid::Uuid;

/// How far ahead of the server's clock an HLC may be before it is re-stamped.
pub const MAX_HLC_AHEAD_MS: u64 = 5 * 60 * 1000;
/// Largest setting key.
pub const MAX_KEY_BYTES: usize = 256;
/// Largest serialized setting value.
pub const MAX_VALUE_BYTES: usize = 16 * 1024;

/// Validates changes (keys, sizes, HLC form) before anything is written.
pub fn validate(changes: &[SettingChange]) -> ApiResult<()> {
    for c in changes {
        if c.key.is_empty() || c.key.len() > MAX_KEY_BYTES {
            return Err(ApiError::Invalid("invalid_setting", format!("setting keys must be 1 to {MAX_KEY_BYTES} bytes")));
        }
        if Hlc::parse(&c.hlc).is_none() {
            return Err(ApiError::Invalid("invalid_setting", format!("setting {:?}: malformed hlc {:?}", c.key, c.hlc)));
        }
        if c.value.to_string().len() > MAX_VALUE_BYTES {
            return Err(ApiError::Invalid("invalid_setting", format!("setting {:?}: value larger than {MAX_VALUE_BYTES} bytes", c.key)));
        }
    }
    Ok(())
}

fn now_ms(now: DateTime<Utc>) -> u64 {
    u64::try_from(now.timestamp_millis()).unwrap_or(0)
}

/// Merges validated changes into the (locked) user's settings: a change wins when its HLC is
/// greater than the stored one. HLCs too far ahead are re-stamped to the server's time first.
pub async fn merge(tx: &impl GenericClient, user_id: Uuid, changes: &[SettingChange], now: DateTime<Utc>) -> ApiResult<()> {
    if changes.is_empty() {
        return Ok(());
    }
    let now_ms = now_ms(now);
    let n = i64::try_from(changes.len()).unwrap_or(i64::MAX);
    let top: i64 = tx
        .query_one(
            &tx.prepare_cached("UPDATE users SET settings_seq = settings_seq + $2 WHERE user_id = $1 RETURNING settings_seq").await?,
            &[&user_id, &n],
        )
        .await?
        .get(0);
    let (mut keys, mut values, mut deleted, mut hlcs, mut seqs) = (Vec::new(), Vec::new(), Vec::new(), Vec::new(), Vec::new());
    // Later changes of one key in the same request win over earlier ones only by HLC too.
    let mut best: std::collections::BTreeMap<&str, (String, &SettingChange)> = Default::default();
    for c in changes {
        let mut h = Hlc::parse(&c.hlc).ok_or_else(|| ApiError::Invalid("invalid_setting", "malformed hlc".into()))?;
        if h.wall_ms > now_ms.saturating_add(MAX_HLC_AHEAD_MS) {
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
    for (i, (key, (hlc, c))) in best.into_iter().enumerate() {
        keys.push(key.to_string());
        values.push(if c.deleted { None } else { Some(c.value.clone()) });
        deleted.push(c.deleted);
        hlcs.push(hlc);
        seqs.push(top - n + 1 + i64::try_from(i).unwrap_or(0));
    }
    tx.execute(&tx.prepare_cached("INSERT INTO settings (user_id, key, value, deleted, hlc, seq) \
         SELECT $1, * FROM unnest($2::text[], $3::jsonb[], $4::bool[], $5::text[], $6::int8[]) \
         ON CONFLICT (user_id, key) DO UPDATE SET value = excluded.value, deleted = excluded.deleted, hlc = excluded.hlc, seq = excluded.seq \
         WHERE settings.hlc < excluded.hlc").await?,
        &[&user_id, &keys, &values, &deleted, &hlcs, &seqs],
    )
    .await?;
    Ok(())
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
    accounts::lock(&tx, user.user_id, &state.config.admin_subjects).await?;
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
    validate(&changes)?;
    merge(&tx, user.user_id, &changes, now).await?;
    let out = current(&tx, user.user_id).await?;
    tx.commit().await?;
    Ok(Json(out))
}

/// `PUT /v1/settings`: replaces all settings with the given object.
pub async fn put_settings(
    State(state): State<AppState>,
    AuthUser(user): AuthUser,
    JsonBody(body): JsonBody<Value>,
) -> ApiResult<Json<Value>> {
    web_write(&state, &user, body, true).await
}

/// `PATCH /v1/settings`: merges the given keys; `null` deletes a key.
pub async fn patch_settings(
    State(state): State<AppState>,
    AuthUser(user): AuthUser,
    JsonBody(body): JsonBody<Value>,
) -> ApiResult<Json<Value>> {
    web_write(&state, &user, body, false).await
}
