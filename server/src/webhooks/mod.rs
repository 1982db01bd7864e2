//! Outbound webhooks: an app's backend hears when a user buys, renews, fails to pay, cancels or
//! nears a limit. Admins register endpoints (`/v1/admin/webhooks`); every change that causes an
//! event writes it to the outbox ([`outbox`]) in its own transaction; a worker in every replica
//! delivers it ([`delivery`]), signed as the Standard Webhooks specification says.

pub mod delivery;
pub mod outbox;

use crate::AppState;
use crate::auth::Admin;
use crate::error::{ApiError, ApiResult};
use crate::extract::{JsonBody, QueryParams};
use axum::Json;
use axum::extract::{Path, State};
use axum::http::StatusCode;
use axum::routing::{get, post};
use base64::Engine;
use chrono::{DateTime, Utc};
use deadpool_postgres::GenericClient;
use serde::{Deserialize, Serialize};
use serde_json::{Value, json};
use uuid::Uuid;

/// Every event type an endpoint can subscribe to.
pub const EVENT_TYPES: [&str; 12] = [
    "subscription.started",
    "subscription.renewed",
    "subscription.canceled",
    "subscription.expired",
    "subscription.past_due",
    "payment.succeeded",
    "payment.failed",
    "payment.refunded",
    "credits.granted",
    "usage.threshold",
    "account.deleted",
    "entitlements.changed",
];

/// Most endpoints one server keeps.
pub const MAX_ENDPOINTS: i64 = 100;
/// Longest endpoint URL, in bytes.
pub const MAX_URL_BYTES: usize = 2048;
/// Prefix of a signing secret (Standard Webhooks).
pub const SECRET_PREFIX: &str = "whsec_";
/// Bytes of a generated signing secret.
const SECRET_BYTES: usize = 32;
/// Longest deliveries page.
const MAX_PAGE: i64 = 1000;

/// The admin routes of webhooks.
pub fn router() -> axum::Router<AppState> {
    axum::Router::new()
        .route("/v1/admin/webhooks", post(create).get(list))
        .route("/v1/admin/webhooks/{id}", axum::routing::delete(remove))
        .route("/v1/admin/webhooks/{id}/replay", post(replay))
        .route("/v1/admin/webhooks/{id}/deliveries", get(deliveries))
}

/// Body of `POST /v1/admin/webhooks`.
#[derive(Debug, Deserialize, utoipa::ToSchema)]
#[serde(deny_unknown_fields)]
pub struct NewEndpoint {
    /// Where deliveries go (`http://` or `https://`).
    pub url: String,
    /// Event types delivered there (at least one of [`EVENT_TYPES`]).
    pub events: Vec<String>,
    /// Signing secret `whsec_<base64 of 24 to 64 bytes>`; absent: one is generated.
    #[serde(default)]
    pub secret: Option<String>,
}

/// An endpoint as listed (never with its secret).
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct Endpoint {
    /// Endpoint id.
    pub id: Uuid,
    /// Receiver URL.
    pub url: String,
    /// Subscribed event types.
    pub events: Vec<String>,
    /// When it was registered.
    pub created_at: DateTime<Utc>,
}

/// The HMAC key of a `whsec_…` secret, or why it is not one.
pub fn secret_key(secret: &str) -> Result<Vec<u8>, String> {
    let b64 = secret.strip_prefix(SECRET_PREFIX).ok_or_else(|| format!("secret must start with {SECRET_PREFIX:?}"))?;
    let key = base64::engine::general_purpose::STANDARD.decode(b64).map_err(|_| "secret must be whsec_ followed by base64".to_string())?;
    if !(24..=64).contains(&key.len()) {
        return Err("secret must hold 24 to 64 bytes".into());
    }
    Ok(key)
}

fn new_secret() -> String {
    format!("{SECRET_PREFIX}{}", base64::engine::general_purpose::STANDARD.encode(rand::random::<[u8; SECRET_BYTES]>()))
}

/// Checks an endpoint URL: http(s), at most [`MAX_URL_BYTES`], with a host, and not an address
/// literal in a private, loopback or link-local range unless `allow_private`.
pub fn check_url(url: &str, allow_private: bool) -> ApiResult<reqwest::Url> {
    let bad = |m: &str| ApiError::Invalid("invalid_url", format!("url {m}"));
    if url.len() > MAX_URL_BYTES {
        return Err(bad(&format!("is longer than {MAX_URL_BYTES} bytes")));
    }
    let parsed = reqwest::Url::parse(url).map_err(|e| bad(&format!("is not a URL ({e})")))?;
    if !matches!(parsed.scheme(), "http" | "https") {
        return Err(bad("must start with http:// or https://"));
    }
    if !parsed.username().is_empty() || parsed.password().is_some() {
        return Err(bad("must not carry credentials"));
    }
    let host = parsed.host_str().filter(|h| !h.is_empty()).ok_or_else(|| bad("has no host"))?;
    if let Some(ip) = delivery::ip_literal(host)
        && !allow_private
        && delivery::forbidden(ip)
    {
        return Err(ApiError::Invalid(
            "private_address",
            format!("url names {ip}, a private, loopback or link-local address (allowed only with TALLY_WEBHOOK_ALLOW_PRIVATE=1)"),
        ));
    }
    Ok(parsed)
}

fn check_events(events: &[String]) -> ApiResult<Vec<String>> {
    if events.is_empty() {
        return Err(ApiError::Invalid("invalid_events", "events must name at least one event type".into()));
    }
    let mut out: Vec<String> = Vec::new();
    for e in events {
        if !EVENT_TYPES.contains(&e.as_str()) {
            return Err(ApiError::Invalid("unknown_event_type", format!("{e:?} is not an event type (one of {})", EVENT_TYPES.join(", "))));
        }
        if !out.contains(e) {
            out.push(e.clone());
        }
    }
    Ok(out)
}

/// `POST /v1/admin/webhooks {url, events, secret?}`: 201 with the endpoint and its `secret`
/// (shown only here).
#[utoipa::path(
    operation_id = "webhooks_create",
    post,
    path = "/v1/admin/webhooks",
    tag = "admin",
    security(("bearer" = []), ("api_key" = [])),
    request_body = NewEndpoint,
    responses((status = 201, description = "The endpoint with its secret (shown only here)", body = Object)),
)]
pub async fn create(State(state): State<AppState>, _a: Admin, JsonBody(b): JsonBody<NewEndpoint>) -> ApiResult<(StatusCode, Json<Value>)> {
    let url = check_url(&b.url, state.config.webhook_allow_private)?;
    let events = check_events(&b.events)?;
    let secret = match b.secret {
        Some(s) => {
            secret_key(&s).map_err(|m| ApiError::Invalid("invalid_secret", m))?;
            s
        }
        None => new_secret(),
    };
    let mut client = state.pool.get().await?;
    let tx = client.transaction().await?;
    // One registration at a time, so the cap holds between replicas.
    tx.execute("LOCK TABLE webhook_endpoints IN SHARE ROW EXCLUSIVE MODE", &[]).await?;
    let n: i64 = tx.query_one("SELECT count(*) FROM webhook_endpoints", &[]).await?.get(0);
    if n >= MAX_ENDPOINTS {
        return Err(ApiError::Conflict("too_many_webhooks", format!("at most {MAX_ENDPOINTS} endpoints; delete one first")));
    }
    let ep = Endpoint { id: Uuid::now_v7(), url: url.to_string(), events, created_at: state.now() };
    tx.execute(
        "INSERT INTO webhook_endpoints (endpoint_id, url, events, secret, created_at) VALUES ($1, $2, $3, $4, $5)",
        &[&ep.id, &ep.url, &ep.events, &secret, &ep.created_at],
    )
    .await?;
    tx.commit().await?;
    let mut body = serde_json::to_value(&ep).map_err(ApiError::internal)?;
    body["secret"] = Value::String(secret);
    Ok((StatusCode::CREATED, Json(body)))
}

/// `GET /v1/admin/webhooks`: `{webhooks: [{id, url, events, created_at}]}`, oldest first.
#[utoipa::path(
    operation_id = "webhooks_list",
    get,
    path = "/v1/admin/webhooks",
    tag = "admin",
    security(("bearer" = []), ("api_key" = [])),
    responses((status = 200, description = "The endpoints (never their secrets)", body = Object)),
)]
pub async fn list(State(state): State<AppState>, _a: Admin) -> ApiResult<Json<Value>> {
    let client = state.pool.get().await?;
    Ok(Json(json!({"webhooks": endpoints(&client).await?})))
}

/// Every registered endpoint, oldest first (never their secrets).
pub async fn endpoints(client: &impl GenericClient) -> ApiResult<Vec<Endpoint>> {
    let rows =
        client.query("SELECT endpoint_id, url, events, created_at FROM webhook_endpoints ORDER BY created_at, endpoint_id", &[]).await?;
    Ok(rows.iter().map(|r| Endpoint { id: r.get(0), url: r.get(1), events: r.get(2), created_at: r.get(3) }).collect())
}

/// The endpoint `id` (not found: 404 `not_found`).
pub async fn endpoint(client: &impl GenericClient, id: Uuid) -> ApiResult<Endpoint> {
    let row = client
        .query_opt("SELECT endpoint_id, url, events, created_at FROM webhook_endpoints WHERE endpoint_id = $1", &[&id])
        .await?
        .ok_or_else(|| ApiError::not_found("webhook"))?;
    Ok(Endpoint { id: row.get(0), url: row.get(1), events: row.get(2), created_at: row.get(3) })
}

/// An endpoint id from a path (not a UUID: 404, as an unknown one).
pub fn endpoint_id(id: &str) -> ApiResult<Uuid> {
    Uuid::parse_str(id).map_err(|_| ApiError::not_found("webhook"))
}

/// `DELETE /v1/admin/webhooks/{id}`: 204; its deliveries go with it (404 when unknown).
#[utoipa::path(
    operation_id = "webhooks_remove",
    delete,
    path = "/v1/admin/webhooks/{id}",
    tag = "admin",
    security(("bearer" = []), ("api_key" = [])),
    params(("id" = String, Path, description = "Endpoint id")),
    responses((status = 204, description = "Deleted")),
)]
pub async fn remove(State(state): State<AppState>, _a: Admin, Path(id): Path<String>) -> ApiResult<StatusCode> {
    let id = endpoint_id(&id)?;
    let client = state.pool.get().await?;
    if client.execute("DELETE FROM webhook_endpoints WHERE endpoint_id = $1", &[&id]).await? == 0 {
        return Err(ApiError::not_found("webhook"));
    }
    Ok(StatusCode::NO_CONTENT)
}

/// Body of `POST /v1/admin/webhooks/{id}/replay`.
#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Replay {
    /// One event to send again, whatever its state; absent: every dead-lettered delivery.
    #[serde(default)]
    pub event_id: Option<Uuid>,
}

/// `POST /v1/admin/webhooks/{id}/replay {event_id?}`: queues dead-lettered deliveries (or one
/// event, even a delivered one) again with a fresh retry window; `{replayed: n}`.
#[utoipa::path(
    operation_id = "webhooks_replay",
    post,
    path = "/v1/admin/webhooks/{id}/replay",
    tag = "admin",
    security(("bearer" = []), ("api_key" = [])),
    params(("id" = String, Path, description = "Endpoint id")),
    request_body(content = Object, description = "`{event_id?}`"),
    responses((status = 200, description = "How many deliveries were queued again", body = Object)),
)]
pub async fn replay(State(state): State<AppState>, _a: Admin, Path(id): Path<String>, body: axum::body::Bytes) -> ApiResult<Json<Value>> {
    let id = endpoint_id(&id)?;
    let r: Replay = if body.iter().all(u8::is_ascii_whitespace) { Replay::default() } else { crate::extract::parse_json(&body)? };
    let client = state.pool.get().await?;
    let n = requeue(&client, id, r.event_id, state.now()).await?;
    Ok(Json(json!({"replayed": n})))
}

/// Queues again, with a fresh retry window, every dead-lettered delivery to endpoint `id`, or
/// only the delivery of `event` whatever its state; how many were queued. An unknown endpoint
/// is 404; an event never delivered there is 404 `unknown_event`.
pub async fn requeue(client: &impl GenericClient, id: Uuid, event: Option<Uuid>, now: DateTime<Utc>) -> ApiResult<u64> {
    endpoint(client, id).await?;
    let n = client
        .execute(
            "UPDATE webhook_deliveries SET state = 'pending', next_attempt_at = $3, queued_at = $3, lease_until = NULL \
             WHERE endpoint_id = $1 AND (($2::uuid IS NULL AND state = 'dead') OR event_id = $2)",
            &[&id, &event, &now],
        )
        .await?;
    if n == 0 && event.is_some() {
        return Err(ApiError::Unknown("unknown_event", "no delivery of this event to this endpoint".into()));
    }
    Ok(n)
}

/// Query of `GET /v1/admin/webhooks/{id}/deliveries`.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct DeliveriesQuery {
    /// Only deliveries in this state (`pending`, `delivered`, `dead`).
    #[serde(default)]
    pub state: Option<String>,
    /// Most deliveries answered (default 100, at most 1000), newest first.
    #[serde(default)]
    pub limit: Option<i64>,
}

/// `GET /v1/admin/webhooks/{id}/deliveries?state&limit`: `{deliveries: [{event_id, type,
/// created_at, state, attempts, next_attempt_at, delivered_at, last_status, last_error,
/// attempt_log: [{attempt, started_at, duration_ms, status, error}]}]}`, newest first.
#[utoipa::path(
    operation_id = "webhooks_deliveries",
    get,
    path = "/v1/admin/webhooks/{id}/deliveries",
    tag = "admin",
    security(("bearer" = []), ("api_key" = [])),
    params(("id" = String, Path, description = "Endpoint id"), ("state" = Option<String>, Query, description = "pending, delivered or dead"), ("limit" = Option<i64>, Query, description = "1 to 1000")),
    responses((status = 200, description = "The deliveries and their attempts, newest first", body = Object)),
)]
pub async fn deliveries(
    State(state): State<AppState>,
    _a: Admin,
    Path(id): Path<String>,
    QueryParams(q): QueryParams<DeliveriesQuery>,
) -> ApiResult<Json<Value>> {
    let id = endpoint_id(&id)?;
    let wanted = q.state.as_deref().map(DeliveryState::parse).transpose()?;
    let limit = q.limit.unwrap_or(100);
    if !(1..=MAX_PAGE).contains(&limit) {
        return Err(ApiError::Invalid("invalid_query", format!("limit must be 1 to {MAX_PAGE}")));
    }
    let client = state.pool.get().await?;
    Ok(Json(json!({"deliveries": recent_deliveries(&client, id, wanted, limit).await?})))
}

/// Where one delivery stands.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum DeliveryState {
    /// Not delivered yet: due at `next_attempt_at`, or being attempted.
    Pending,
    /// The receiver answered 2xx.
    Delivered,
    /// Retried for the whole retry window without success; sent again only by a replay.
    Dead,
}

impl DeliveryState {
    /// Every state, in the order pages list them.
    pub const ALL: [DeliveryState; 3] = [DeliveryState::Pending, DeliveryState::Delivered, DeliveryState::Dead];

    /// Its name in the API and the database.
    pub fn as_str(self) -> &'static str {
        match self {
            DeliveryState::Pending => "pending",
            DeliveryState::Delivered => "delivered",
            DeliveryState::Dead => "dead",
        }
    }

    /// The state named `s` (else 400 `invalid_query`).
    pub fn parse(s: &str) -> ApiResult<DeliveryState> {
        DeliveryState::ALL
            .into_iter()
            .find(|d| d.as_str() == s)
            .ok_or_else(|| ApiError::Invalid("invalid_query", "state must be pending, delivered or dead".into()))
    }
}

impl tokio_postgres::types::FromSql<'_> for DeliveryState {
    fn from_sql(ty: &tokio_postgres::types::Type, raw: &[u8]) -> Result<Self, Box<dyn std::error::Error + Sync + Send>> {
        let s = <&str as tokio_postgres::types::FromSql>::from_sql(ty, raw)?;
        DeliveryState::ALL.into_iter().find(|d| d.as_str() == s).ok_or_else(|| format!("unknown delivery state {s:?}").into())
    }

    fn accepts(ty: &tokio_postgres::types::Type) -> bool {
        <&str as tokio_postgres::types::FromSql>::accepts(ty)
    }
}

/// One attempt of a delivery: the receiver's HTTP status, or why there was none.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct Attempt {
    /// 1 for the first attempt.
    pub attempt: i32,
    /// When the request started.
    pub started_at: DateTime<Utc>,
    /// How long it took.
    pub duration_ms: i32,
    /// The receiver's status, if it answered.
    pub status: Option<i32>,
    /// Why it failed (a non-2xx status, a timeout, a refused address…).
    pub error: Option<String>,
}

/// One event's delivery to one endpoint, with its attempts.
#[derive(Debug, Clone, Serialize)]
pub struct Delivery {
    /// The event's id (its `webhook-id`).
    pub event_id: Uuid,
    /// The event type.
    #[serde(rename = "type")]
    pub kind: String,
    /// When the event happened.
    pub created_at: DateTime<Utc>,
    /// Where the delivery stands.
    pub state: DeliveryState,
    /// Attempts made so far.
    pub attempts: i32,
    /// When it is tried next (pending deliveries only).
    pub next_attempt_at: Option<DateTime<Utc>>,
    /// When the receiver took it.
    pub delivered_at: Option<DateTime<Utc>>,
    /// The last attempt's HTTP status.
    pub last_status: Option<i32>,
    /// The last attempt's error.
    pub last_error: Option<String>,
    /// Every attempt, first first.
    pub attempt_log: Vec<Attempt>,
}

/// The newest `limit` deliveries to endpoint `id` (only those in `wanted`, when given), newest
/// first, with their attempts. An unknown endpoint is 404.
pub async fn recent_deliveries(
    client: &impl GenericClient,
    id: Uuid,
    wanted: Option<DeliveryState>,
    limit: i64,
) -> ApiResult<Vec<Delivery>> {
    endpoint(client, id).await?;
    let wanted = wanted.map(DeliveryState::as_str);
    let rows = client
        .query(
            "SELECT d.event_id, e.type, e.created_at, d.state, d.attempts, d.next_attempt_at, d.delivered_at, d.last_status, d.last_error, \
               coalesce((SELECT jsonb_agg(jsonb_build_object('attempt', a.attempt, 'started_at', a.started_at, 'duration_ms', a.duration_ms, \
                   'status', a.status, 'error', a.error) ORDER BY a.attempt) \
                 FROM webhook_attempts a WHERE (a.user_id, a.event_id, a.endpoint_id) = (d.user_id, d.event_id, d.endpoint_id)), '[]'::jsonb) \
             FROM webhook_deliveries d JOIN webhook_events e ON (e.user_id, e.event_id) = (d.user_id, d.event_id) \
             WHERE d.endpoint_id = $1 AND ($2::text IS NULL OR d.state = $2) ORDER BY d.seq DESC LIMIT $3",
            &[&id, &wanted, &limit],
        )
        .await?;
    rows.iter()
        .map(|r| {
            let state: DeliveryState = r.get(3);
            let attempt_log = serde_json::from_value(r.get::<_, Value>(9)).map_err(ApiError::internal)?;
            Ok(Delivery {
                event_id: r.get(0),
                kind: r.get(1),
                created_at: r.get(2),
                state,
                attempts: r.get(4),
                next_attempt_at: (state == DeliveryState::Pending).then(|| r.get(5)),
                delivered_at: r.get(6),
                last_status: r.get(7),
                last_error: r.get(8),
                attempt_log,
            })
        })
        .collect()
}

/// How many deliveries of each state every endpoint has: `(pending, delivered, dead)` by
/// endpoint id (endpoints without deliveries are absent).
pub async fn delivery_counts(client: &impl GenericClient) -> ApiResult<std::collections::HashMap<Uuid, [i64; 3]>> {
    let rows = client
        .query(
            "SELECT endpoint_id, count(*) FILTER (WHERE state = 'pending'), count(*) FILTER (WHERE state = 'delivered'), \
               count(*) FILTER (WHERE state = 'dead') FROM webhook_deliveries GROUP BY endpoint_id",
            &[],
        )
        .await?;
    Ok(rows.iter().map(|r| (r.get(0), [r.get(1), r.get(2), r.get(3)])).collect())
}
