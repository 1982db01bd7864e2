//! Admin endpoints (admin users or `admin`-scoped API keys; anyone else gets 403): pending
//! users, access grants and their revocation, plans, a user's usage, API keys.

use crate::api_keys::{self, ApiKey};
use crate::auth::{Admin, Principal};
use crate::error::{ApiError, ApiResult};
use crate::extract::{JsonBody, QueryParams};
use crate::users::{self, USER_COLUMNS, User};
use crate::{AppState, plans, usage};
use axum::Json;
use axum::extract::{Path, State};
use axum::http::StatusCode;
use chrono::{DateTime, Duration, Utc};
use serde::Deserialize;
use serde_json::{Value, json};
use tally_core::Plan;
use uuid::Uuid;

/// Body of `POST /v1/admin/users`.
#[derive(Debug, Deserialize, utoipa::ToSchema)]
#[serde(deny_unknown_fields)]
pub struct NewUser {
    /// Email the user will sign in with (verified): a pending user, claimed by the first
    /// verified sign-in with this email.
    #[serde(default)]
    pub email: Option<String>,
    /// The identity provider's subject: the user exists at once under it (backends can then
    /// record usage for it before its first sign-in).
    #[serde(default)]
    pub subject: Option<String>,
    /// Display name.
    #[serde(default)]
    pub display_name: Option<String>,
    /// IANA timezone.
    #[serde(default)]
    pub timezone: Option<String>,
}

/// `POST /v1/admin/users`: a user ahead of its first sign-in, by `email` (pending), by
/// `subject`, or both.
#[utoipa::path(
    operation_id = "admin_create_user",
    post,
    path = "/v1/admin/users",
    tag = "admin",
    security(("bearer" = []), ("api_key" = [])),
    request_body = NewUser,
    responses((status = 201, description = "The user", body = crate::users::User)),
)]
pub async fn create_user(State(state): State<AppState>, _a: Admin, JsonBody(b): JsonBody<NewUser>) -> ApiResult<(StatusCode, Json<User>)> {
    let email = b.email.as_deref().map(str::trim);
    let canonical = email.map(tally_core::contract::canonical_email).transpose()?;
    if let Some(s) = &b.subject {
        tally_core::contract::subject(s)?;
        if s.starts_with(tally_core::contract::PASSWORD_SUBJECT_PREFIX) {
            return Err(ApiError::invalid(format!(
                "subjects starting with {:?} are reserved",
                tally_core::contract::PASSWORD_SUBJECT_PREFIX
            )));
        }
    }
    if email.is_none() && b.subject.is_none() {
        return Err(ApiError::invalid("name the user with \"email\", \"subject\" or both"));
    }
    users::validate_profile(&tally_core::wire::ProfilePatch {
        timezone: b.timezone.clone(),
        display_name: b.display_name.clone(),
        avatar_url: None,
    })?;
    let exists = || ApiError::Conflict("user_exists", "a user with this email or subject already exists".into());
    let mut client = state.pool.get().await?;
    let tx = client.transaction().await?;
    // Only pending users are unique by email in the schema: two creations with one email wait
    // for each other here, so the second sees the first and answers 409.
    if let Some(canonical) = &canonical {
        tx.execute("SELECT pg_advisory_xact_lock(hashtextextended('user-email:' || $1, 7461))", &[canonical]).await?;
    }
    let taken =
        tx.query_opt("SELECT 1 FROM users WHERE email_canonical = $1 OR external_id = $2 LIMIT 1", &[&canonical, &b.subject]).await?;
    if taken.is_some() {
        return Err(exists());
    }
    let q = format!(
        "INSERT INTO users (user_id, email, email_canonical, external_id, display_name, timezone) \
         VALUES ($1, $2, $3, $4, $5, coalesce($6, 'UTC')) ON CONFLICT DO NOTHING RETURNING {USER_COLUMNS}"
    );
    let r = tx.query_opt(&q, &[&Uuid::now_v7(), &email, &canonical, &b.subject, &b.display_name, &b.timezone]).await?.ok_or_else(exists)?;
    tx.commit().await?;
    Ok((StatusCode::CREATED, Json(User::from_row(&r, &state.config.admin_subjects))))
}

/// Body of `POST /v1/admin/grants`.
#[derive(Debug, Deserialize, utoipa::ToSchema)]
#[serde(deny_unknown_fields)]
pub struct NewGrant {
    /// The user's identity subject.
    pub subject: String,
    /// Plan granted (an access grant; give either `plan` or `credits`).
    #[serde(default)]
    pub plan: Option<String>,
    /// Credits granted (a credit grant).
    #[serde(default)]
    pub credits: Option<i64>,
    /// End of the grant (absent: no end); for credits, their expiry.
    #[serde(default, alias = "expires_at")]
    pub until: Option<DateTime<Utc>>,
    /// Who granted it (default: the caller).
    #[serde(default)]
    pub granted_by: Option<String>,
    /// Why (`access_reason` becomes `granted:<reason>`).
    pub reason: String,
}

/// `POST /v1/admin/grants`: grants a plan until a date, or `credits` expiring at `until`
/// (alias `expires_at`); bumps the user's entitlement version.
#[utoipa::path(
    operation_id = "admin_create_grant",
    post,
    path = "/v1/admin/grants",
    tag = "admin",
    security(("bearer" = []), ("api_key" = [])),
    request_body = NewGrant,
    responses((status = 201, description = "The grant", body = Object)),
)]
pub async fn create_grant(
    State(state): State<AppState>,
    admin: Admin,
    JsonBody(g): JsonBody<NewGrant>,
) -> ApiResult<(StatusCode, Json<Value>)> {
    let plan = match (g.plan.clone(), g.credits) {
        (Some(p), None) => p,
        (None, Some(credits)) => {
            tally_core::contract::text("reason", &g.reason, 1, crate::grants::MAX_REASON_BYTES)?;
            if g.until.is_some_and(|u| u <= state.now()) {
                return Err(ApiError::invalid("until must be in the future"));
            }
            let user = users::find_or_create_by_subject(&state, &g.subject).await?;
            let by = g.granted_by.clone().unwrap_or_else(|| admin.actor());
            let req = crate::credits::CreditGrantRequest {
                user_id: user.user_id,
                credits,
                expires_at: g.until,
                reason: &g.reason,
                granted_by: &by,
            };
            let id = crate::credits::grant_credits(&state, req).await?;
            return Ok((
                StatusCode::CREATED,
                Json(
                    json!({"id": id, "subject": g.subject, "credits": credits, "expires_at": g.until, "granted_by": by, "reason": g.reason}),
                ),
            ));
        }
        _ => return Err(ApiError::invalid("give either plan (an access grant) or credits (a credit grant)")),
    };
    let by = g.granted_by.clone().unwrap_or_else(|| admin.actor());
    let req = crate::grants::AccessGrantRequest { subject: &g.subject, plan: &plan, until: g.until, granted_by: &by, reason: &g.reason };
    let (_, id) = crate::grants::create(&state, &req).await?;
    Ok((
        StatusCode::CREATED,
        Json(json!({"id": id, "subject": g.subject, "plan": plan, "until": g.until, "granted_by": by, "reason": g.reason})),
    ))
}

/// Body of `POST /v1/admin/grants/revoke`.
#[derive(Debug, Deserialize, utoipa::ToSchema)]
#[serde(deny_unknown_fields)]
pub struct RevokeGrant {
    /// The user's identity subject.
    pub subject: String,
    /// One grant to revoke (absent: every active access grant of the user). A credit grant's
    /// id (`adm:…`, `inv:…`) revokes that credit grant.
    #[serde(default)]
    pub grant_id: Option<String>,
    /// Revoke every credit grant of the user (with no `grant_id`), except the credits the plan
    /// includes.
    #[serde(default)]
    pub credits: bool,
}

/// `POST /v1/admin/grants/revoke`: revokes grants; bumps the entitlement version.
#[utoipa::path(
    operation_id = "admin_revoke_grant",
    post,
    path = "/v1/admin/grants/revoke",
    tag = "admin",
    security(("bearer" = []), ("api_key" = [])),
    request_body = RevokeGrant,
    responses((status = 200, description = "How many grants were revoked", body = Object)),
)]
pub async fn revoke_grant(State(state): State<AppState>, _a: Admin, JsonBody(r): JsonBody<RevokeGrant>) -> ApiResult<Json<Value>> {
    let client = state.pool.get().await?;
    let row = client
        .query_opt("SELECT user_id FROM users WHERE external_id = $1", &[&r.subject])
        .await?
        .ok_or_else(|| ApiError::not_found("user"))?;
    let uid: Uuid = row.get(0);
    let access_id = match r.grant_id.as_deref().map(Uuid::parse_str) {
        Some(Ok(id)) => Some(id),
        Some(Err(_)) | None if r.credits || r.grant_id.is_some() => {
            drop(client);
            let n = crate::credits::revoke_credits(&state, uid, r.grant_id.as_deref()).await?;
            if n == 0 {
                return Err(ApiError::not_found("grant"));
            }
            return Ok(Json(json!({"revoked": n})));
        }
        _ => None,
    };
    drop(client);
    let n = crate::grants::revoke(&state, uid, access_id).await?;
    Ok(Json(json!({"revoked": n})))
}

/// `PUT /v1/admin/plans/{id}`: inserts or replaces one plan, validated like the catalog.
#[utoipa::path(
    operation_id = "admin_put_plan",
    put,
    path = "/v1/admin/plans/{id}",
    tag = "admin",
    security(("bearer" = []), ("api_key" = [])),
    params(("id" = String, Path, description = "Plan id")),
    request_body = Object,
    responses((status = 200, description = "The new catalog version", body = Object)),
)]
pub async fn put_plan(
    State(state): State<AppState>,
    _a: Admin,
    Path(id): Path<String>,
    JsonBody(mut body): JsonBody<Value>,
) -> ApiResult<Json<Value>> {
    if let Some(o) = body.as_object_mut() {
        match o.get("id") {
            None => {
                o.insert("id".into(), Value::String(id.clone()));
            }
            Some(Value::String(s)) if *s == id => {}
            Some(_) => return Err(ApiError::Invalid("invalid_plan", "$.id: must equal the id in the path".into())),
        }
    }
    let plan = Plan::validate("$", &body).map_err(|e| ApiError::Invalid("invalid_plan", e.to_string()))?;
    let mut client = state.pool.get().await?;
    let tx = client.transaction().await?;
    tx.execute("SELECT pg_advisory_xact_lock(7461)", &[]).await?;
    let (_, mut catalog) = plans::load(&tx).await?;
    catalog.upsert(plan.clone());
    let version = plans::store(&tx, &catalog).await?;
    tx.commit().await?;
    Ok(Json(json!({"plan": plan, "catalog_version": version})))
}

/// `PATCH /v1/admin/plans/{id}`: a partial update of one plan as a JSON merge patch (RFC 7396):
/// the fields sent replace the plan's, a `null` removes one (`{"features": {"export": null}}`
/// drops a feature), everything else stays. The result is validated like a whole plan; an
/// unknown plan is 404 `unknown_plan`.
#[utoipa::path(
    operation_id = "admin_patch_plan",
    patch,
    path = "/v1/admin/plans/{id}",
    tag = "admin",
    security(("bearer" = []), ("api_key" = [])),
    params(("id" = String, Path, description = "Plan id")),
    request_body = Object,
    responses((status = 200, description = "The new catalog version", body = Object)),
)]
pub async fn patch_plan(
    State(state): State<AppState>,
    _a: Admin,
    Path(id): Path<String>,
    JsonBody(patch): JsonBody<Value>,
) -> ApiResult<Json<Value>> {
    if !patch.is_object() {
        return Err(ApiError::Invalid("invalid_plan", "$: a merge patch is a JSON object".into()));
    }
    if patch.get("id").is_some_and(|v| v.as_str() != Some(id.as_str())) {
        return Err(ApiError::Invalid("invalid_plan", "$.id: must equal the id in the path".into()));
    }
    let mut client = state.pool.get().await?;
    let tx = client.transaction().await?;
    tx.execute("SELECT pg_advisory_xact_lock(7461)", &[]).await?;
    let (_, mut catalog) = plans::load(&tx).await?;
    let current = catalog
        .plans
        .iter()
        .find(|p| p.id == id)
        .ok_or_else(|| ApiError::Unknown("unknown_plan", format!("no plan {id:?} in the catalog")))?;
    let mut merged = serde_json::to_value(current).map_err(ApiError::internal)?;
    merge_patch(&mut merged, &patch);
    let plan = Plan::validate("$", &merged).map_err(|e| ApiError::Invalid("invalid_plan", e.to_string()))?;
    catalog.upsert(plan.clone());
    let version = plans::store(&tx, &catalog).await?;
    tx.commit().await?;
    Ok(Json(json!({"plan": plan, "catalog_version": version})))
}

/// Applies a JSON merge patch (RFC 7396) to `target`.
fn merge_patch(target: &mut Value, patch: &Value) {
    let Value::Object(p) = patch else {
        *target = patch.clone();
        return;
    };
    if !target.is_object() {
        *target = Value::Object(serde_json::Map::new());
    }
    if let Value::Object(t) = target {
        for (k, v) in p {
            if v.is_null() {
                t.remove(k);
            } else {
                merge_patch(t.entry(k.clone()).or_insert(Value::Null), v);
            }
        }
    }
}

/// `GET /v1/admin/plans`: the catalog in effect.
#[utoipa::path(
    operation_id = "admin_get_plans",
    get,
    path = "/v1/admin/plans",
    tag = "admin",
    security(("bearer" = []), ("api_key" = [])),
    responses((status = 200, description = "The catalog and its version", body = Object)),
)]
pub async fn get_plans(State(state): State<AppState>, _a: Admin) -> ApiResult<Json<Value>> {
    let client = state.pool.get().await?;
    let (version, catalog) = plans::load(&client).await?;
    Ok(Json(json!({"version": version, "catalog": catalog})))
}

/// Query of `GET /v1/admin/users/{id}/usage`.
#[derive(Debug, Deserialize, utoipa::IntoParams)]
#[into_params(parameter_in = Query)]
pub struct UsageQuery {
    /// Start (RFC 3339).
    pub from: Option<DateTime<Utc>>,
    /// End (RFC 3339).
    pub to: Option<DateTime<Utc>>,
    /// `day`, `feature` (default) or `model`.
    pub group_by: Option<String>,
}

/// `GET /v1/admin/users/{id}/usage`: a user's usage report (id = server user id).
#[utoipa::path(
    operation_id = "admin_user_usage",
    get,
    path = "/v1/admin/users/{id}/usage",
    tag = "admin",
    security(("bearer" = []), ("api_key" = [])),
    params(("id" = String, Path, description = "Server user id"), UsageQuery),
    responses((status = 200, description = "The user's usage report", body = Object)),
)]
pub async fn user_usage(
    State(state): State<AppState>,
    _a: Admin,
    Path(id): Path<String>,
    QueryParams(q): QueryParams<UsageQuery>,
) -> ApiResult<Json<Value>> {
    let uid = Uuid::parse_str(&id).map_err(|_| ApiError::not_found("user"))?;
    let client = state.pool.get().await?;
    let user = users::by_id(&client, uid, &state.config.admin_subjects).await?.ok_or_else(|| ApiError::not_found("user"))?;
    let now = state.now();
    let from = q.from.unwrap_or(now - Duration::days(30));
    let to = q.to.unwrap_or(now + Duration::minutes(10));
    let group_by = q.group_by.as_deref().unwrap_or("feature");
    let rows = usage::report_rows(&client, uid, from, to, group_by).await?;
    Ok(Json(json!({"user": user, "from": from, "to": to, "group_by": group_by, "rows": rows})))
}

/// Body of `POST /v1/admin/api-keys`.
#[derive(Debug, Deserialize, utoipa::ToSchema)]
#[serde(deny_unknown_fields)]
pub struct NewKey {
    /// A name to recognize the key by.
    pub name: String,
    /// Scopes: `usage:write`, `usage:read`, `admin` (`secrets:read` only from the operator's
    /// CLI: 403 `scope_requires_operator`).
    pub scopes: Vec<String>,
}

/// `POST /v1/admin/api-keys`: creates a key; the secret is in this answer only.
#[utoipa::path(
    operation_id = "admin_create_api_key",
    post,
    path = "/v1/admin/api-keys",
    tag = "admin",
    security(("bearer" = []), ("api_key" = [])),
    request_body = NewKey,
    responses((status = 201, description = "The key and its secret (shown once)", body = Object)),
)]
pub async fn create_api_key(
    State(state): State<AppState>,
    admin: Admin,
    JsonBody(k): JsonBody<NewKey>,
) -> ApiResult<(StatusCode, Json<Value>)> {
    // A key belongs to the account of the user who made it (through a key: that key's account).
    let owner = match &admin.0 {
        Principal::User(u) => {
            users::ensure_email_verified(u)?;
            Some(u.user_id)
        }
        Principal::Key(k) => k.owner_id,
    };
    let client = state.pool.get().await?;
    let (key, secret) = api_keys::create(&client, api_keys::Issuer::AdminApi, &k.name, &k.scopes, owner).await?;
    Ok((StatusCode::CREATED, Json(json!({"key": key, "secret": secret}))))
}

/// `GET /v1/admin/api-keys`: the keys, without secrets.
#[utoipa::path(
    operation_id = "admin_list_api_keys",
    get,
    path = "/v1/admin/api-keys",
    tag = "admin",
    security(("bearer" = []), ("api_key" = [])),
    responses(
        (status = 200, description = "Every key (never a secret)", body = [crate::api_keys::ApiKey]),
    ),
)]
pub async fn list_api_keys(State(state): State<AppState>, _a: Admin) -> ApiResult<Json<Vec<ApiKey>>> {
    let client = state.pool.get().await?;
    Ok(Json(api_keys::list(&client).await?))
}

/// `DELETE /v1/admin/api-keys/{id}`: revokes a key.
#[utoipa::path(
    operation_id = "admin_revoke_api_key",
    delete,
    path = "/v1/admin/api-keys/{id}",
    tag = "admin",
    security(("bearer" = []), ("api_key" = [])),
    params(("id" = String, Path, description = "Key id")),
    responses((status = 204, description = "Revoked")),
)]
pub async fn revoke_api_key(State(state): State<AppState>, _a: Admin, Path(id): Path<String>) -> ApiResult<StatusCode> {
    let id = Uuid::parse_str(&id).map_err(|_| ApiError::not_found("api key"))?;
    let client = state.pool.get().await?;
    api_keys::revoke(&client, id).await?;
    Ok(StatusCode::NO_CONTENT)
}

/// `POST /v1/admin/users/{id}/disable`: the user gets 403 `account_disabled` on every route
/// and every refresh token of theirs stops working; nothing of the account is deleted.
#[utoipa::path(
    operation_id = "admin_disable_user",
    post,
    path = "/v1/admin/users/{id}/disable",
    tag = "admin",
    security(("bearer" = []), ("api_key" = [])),
    params(("id" = String, Path, description = "Server user id")),
    responses((status = 200, description = "The user, disabled", body = crate::users::User)),
)]
pub async fn disable_user(State(state): State<AppState>, _a: Admin, Path(id): Path<String>) -> ApiResult<Json<User>> {
    set_disabled(&state, &id, true).await
}

/// `POST /v1/admin/users/{id}/enable`: undoes a disable (ended sessions stay ended).
#[utoipa::path(
    operation_id = "admin_enable_user",
    post,
    path = "/v1/admin/users/{id}/enable",
    tag = "admin",
    security(("bearer" = []), ("api_key" = [])),
    params(("id" = String, Path, description = "Server user id")),
    responses((status = 200, description = "The user, enabled", body = crate::users::User)),
)]
pub async fn enable_user(State(state): State<AppState>, _a: Admin, Path(id): Path<String>) -> ApiResult<Json<User>> {
    set_disabled(&state, &id, false).await
}

async fn set_disabled(state: &AppState, id: &str, disabled: bool) -> ApiResult<Json<User>> {
    let uid = Uuid::parse_str(id).map_err(|_| ApiError::not_found("user"))?;
    state.user_cache.evict_user(uid);
    let mut client = state.pool.get().await?;
    let tx = client.transaction().await?;
    let r = tx
        .query_opt(
            &format!(
                "UPDATE users SET disabled_at = CASE WHEN $2 THEN coalesce(disabled_at, $3) END, updated_at = $3 \
                 WHERE user_id = $1 RETURNING {USER_COLUMNS}"
            ),
            &[&uid, &disabled, &state.now()],
        )
        .await?
        .ok_or_else(|| ApiError::not_found("user"))?;
    if disabled {
        crate::sessions::end_all(state, &tx, uid).await?;
    }
    tx.commit().await?;
    tracing::info!(user_id = %uid, disabled, "account disabled state changed");
    Ok(Json(User::from_row(&r, &state.config.admin_subjects)))
}

#[cfg(test)]
mod tests {
    use super::merge_patch;
    use serde_json::json;

    #[test]
    fn merge_patch_follows_rfc_7396() {
        let mut t = json!({"a": "b", "c": {"d": "e", "f": "g"}, "keep": [1, 2]});
        merge_patch(&mut t, &json!({"a": "z", "c": {"f": null, "h": 1}, "keep": [3]}));
        assert_eq!(t, json!({"a": "z", "c": {"d": "e", "h": 1}, "keep": [3]}));
        let mut t = json!({"a": 1});
        merge_patch(&mut t, &json!({"a": {"b": null}}));
        assert_eq!(t, json!({"a": {}}));
    }
}
