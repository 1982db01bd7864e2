//! What every store's purchase path shares: binding a store purchase to one user, the credit
//! pack grant (and taking it back on a refund), the answer of `POST /v1/purchases/*`, and the
//! refusals both stores name the same way.

use crate::error::{ApiError, ApiResult};
use crate::users::{self, User};
use crate::{AppState, credits, entitlements, leases};
use axum::Json;
use axum::http::StatusCode;
use chrono::{DateTime, Utc};
use deadpool_postgres::GenericClient;
use serde_json::{Value, json};
use std::collections::BTreeSet;
use tally_core::Store;
use uuid::Uuid;

/// Checks the shape every purchase request shares: 1 to
/// [`tally_core::contract::MAX_PURCHASES`] proofs in `field` (the device checks the same rule),
/// and a well-formed `device_id` when one is given.
pub fn check_request(count: usize, field: &str, device_id: Option<&str>) -> ApiResult<()> {
    tally_core::contract::purchase_count(field, count)?;
    if let Some(d) = device_id {
        tally_core::contract::device_id(d)?;
    }
    Ok(())
}

/// 503 `store_unconfigured`: `store` is not set up on this server (`settings` names what to set).
pub fn unconfigured(store: &str, settings: &str) -> ApiError {
    ApiError::Status(
        StatusCode::SERVICE_UNAVAILABLE,
        "store_unconfigured",
        format!("{store} purchases are not configured on this server ({settings})"),
    )
}

/// 409 `bound_to_other_user`.
pub fn bound_to_other() -> ApiError {
    ApiError::Conflict("bound_to_other_user", "this purchase belongs to another account".into())
}

/// 422 `unknown_product`: `product` is not among the catalog's products of `store`.
pub fn unknown_product(store: Store, product: &str) -> ApiError {
    ApiError::Invalid("unknown_product", format!("product {product:?} is not in the catalog's {} products", store.as_str()))
}

/// Binds the store purchase `id` (App Store `originalTransactionId`, Play purchase-token
/// lineage) to `user`, once; 409 `bound_to_other_user` when another user holds it.
pub async fn bind(tx: &impl GenericClient, store: Store, id: &str, user: Uuid, by: &str) -> ApiResult<()> {
    tx.execute(
        "INSERT INTO store_bindings (store, store_id, user_id, bound_by) VALUES ($1, $2, $3, $4) ON CONFLICT DO NOTHING",
        &[&store.as_str(), &id, &user, &by],
    )
    .await?;
    match bound_user(tx, store, id).await? {
        Some(owner) if owner == user => Ok(()),
        _ => Err(bound_to_other()),
    }
}

/// The user the store purchase `id` is bound to, if any.
pub async fn bound_user(tx: &impl GenericClient, store: Store, id: &str) -> ApiResult<Option<Uuid>> {
    Ok(tx
        .query_opt("SELECT user_id FROM store_bindings WHERE store = $1 AND store_id = $2", &[&store.as_str(), &id])
        .await?
        .map(|r| r.get(0)))
}

/// The user a notification is about: the one its purchase is bound to, else the existing user
/// whose account token the store carried; `None` when neither is known.
pub async fn notified_user(tx: &impl GenericClient, store: Store, id: &str, account_token: Option<Uuid>) -> ApiResult<Option<Uuid>> {
    if let Some(u) = bound_user(tx, store, id).await? {
        return Ok(Some(u));
    }
    match account_token {
        Some(a) if tx.query_opt("SELECT 1 FROM users WHERE user_id = $1", &[&a]).await?.is_some() => Ok(Some(a)),
        _ => Ok(None),
    }
}

/// One credit pack bought in a store.
pub struct Pack<'a> {
    /// The store.
    pub store: Store,
    /// The store's id of this purchase (granted once per id).
    pub transaction_id: &'a str,
    /// The store's product id.
    pub product_id: &'a str,
    /// Credits it gives.
    pub credits: u64,
    /// When it was bought.
    pub purchased_at: DateTime<Utc>,
    /// Refunded or revoked.
    pub revoked: bool,
}

/// Grants `pack` to `user` once; when it was refunded, takes back what is unspent (the spent
/// rest becomes debt). Answers the purchase's status: `credited` or `refunded`.
pub async fn credit_pack(tx: &impl GenericClient, user: Uuid, pack: &Pack<'_>, now: DateTime<Utc>) -> ApiResult<&'static str> {
    let store = pack.store.as_str();
    let id = format!("{store}:{}", pack.transaction_id);
    let amount = i64::try_from(pack.credits).unwrap_or(i64::MAX);
    credits::insert(tx, user, &id, amount, "purchase", Some(pack.product_id), Some(store), None, pack.purchased_at.min(now), None, now)
        .await?;
    if !pack.revoked {
        return Ok("credited");
    }
    credits::revoke_purchased(tx, user, &id, now).await?;
    Ok("refunded")
}

/// One entry of an answer's `purchases`.
pub fn purchase(store: Store, product_id: Option<&str>, transaction_id: Option<&str>, status: &str) -> Value {
    json!({"store": store, "product_id": product_id, "transaction_id": transaction_id, "status": status})
}

/// The `GET /v1/entitlements` body with its token — a device token when `device_id` is given.
pub async fn answer(
    state: &AppState,
    tx: &impl GenericClient,
    user: &User,
    device_id: Option<&str>,
    now: DateTime<Utc>,
) -> ApiResult<Value> {
    let user = users::lock(tx, user.user_id, &state.config.admin_subjects).await?;
    let loaded = entitlements::load(state, tx, &user, now).await?;
    let token = match device_id {
        Some(d) => {
            let dev = leases::register(tx, user.user_id, d, tally_core::wire::PROTOCOL_LEASES, now).await?;
            let released = BTreeSet::new();
            let lease = crate::leases::GrantAsks { want: &[], released: &released, used: &[] };
            let asks = crate::sync::DeviceAsks { lease, force: true };
            crate::sync::device_token(state, tx, (&user, &loaded, &loaded.ents), &dev, asks, now).await?
        }
        None => entitlements::token_fresh(state, &user, &loaded.ents, now, true)?,
    };
    let mut body = serde_json::to_value(&loaded.ents)?;
    if let Some(o) = body.as_object_mut() {
        o.insert("token".into(), Value::String(token));
    }
    Ok(body)
}

/// `body` (see [`answer`]) with `purchases`.
pub fn with_purchases(mut body: Value, purchases: Vec<Value>) -> Json<Value> {
    if let Some(o) = body.as_object_mut() {
        o.insert("purchases".into(), Value::Array(purchases));
    }
    Json(body)
}
