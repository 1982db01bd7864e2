//! App Store purchases: `POST /v1/purchases/apple` (StoreKit 2 signed transactions from the
//! app) and `POST /v1/webhooks/apple` (App Store Server Notifications V2). Every JWS is
//! verified with `app-store-server-library` (its `x5c` chain up to a configured root with
//! Apple's marker extensions, ES256, bundle id, environment) before anything is read from it.
//!
//! The state of an `originalTransactionId` comes from its transaction with the latest
//! `purchaseDate` (then `expiresDate`); `signedDate` only orders facts about one
//! `transactionId`, so a restore re-signing an old period never rolls a renewal back, and a
//! refund of a past period leaves the current one alone.

use super::purchases;
use super::subscriptions::{self, Stored};
use crate::auth::AuthUser;
use crate::error::{ApiError, ApiResult};
use crate::extract::JsonBody;
use crate::users;
use crate::webhooks::outbox::{self, Payment};
use crate::{AppState, Config};
use app_store_server_library::models::app_store_environment::Environment;
use app_store_server_library::models::auto_renew_status::AutoRenewStatus;
use app_store_server_library::models::jws_transaction_decoded_payload::JWSTransactionDecodedPayload;
use app_store_server_library::models::notification_type_v2::NotificationTypeV2;
use app_store_server_library::models::offer_type::OfferType;
use app_store_server_library::signed_data_verifier::{SignedDataVerifier, SignedDataVerifierError};
use axum::Json;
use axum::extract::State;
use base64::Engine;
use chrono::{DateTime, Utc};
use deadpool_postgres::GenericClient;
use serde::Deserialize;
use serde_json::{Value, json};
use std::collections::BTreeSet;
use tally_core::catalog::ProductKind;
use tally_core::{Catalog, Store, Subscription, SubscriptionStatus};
use uuid::Uuid;

/// Notification types applied (every other type is recorded and acknowledged).
pub const HANDLED: &[&str] =
    &["SUBSCRIBED", "DID_RENEW", "DID_CHANGE_RENEWAL_STATUS", "DID_FAIL_TO_RENEW", "GRACE_PERIOD_EXPIRED", "EXPIRED", "REFUND", "REVOKE"];

/// The App Store verifiers of this server.
pub struct Apple {
    verifier: SignedDataVerifier,
    /// A Production server's Sandbox verifier (App Review buys in the Sandbox).
    sandbox: Option<SignedDataVerifier>,
}

/// Reads one certificate file, PEM or DER.
fn read_cert(path: &std::path::Path) -> Result<Vec<u8>, String> {
    let bytes = std::fs::read(path).map_err(|e| format!("{}: {e}", path.display()))?;
    let Ok(text) = std::str::from_utf8(&bytes) else { return Ok(bytes) };
    if !text.contains("-----BEGIN") {
        return Ok(bytes);
    }
    let b64: String =
        text.lines().skip_while(|l| !l.starts_with("-----BEGIN")).skip(1).take_while(|l| !l.starts_with("-----END")).collect();
    base64::engine::general_purpose::STANDARD.decode(b64.trim()).map_err(|e| format!("{}: not a PEM certificate: {e}", path.display()))
}

impl Apple {
    /// The verifiers of `TALLY_APPLE_*`; `None` when the App Store is not configured (no bundle
    /// id or no root).
    pub fn from_config(config: &Config) -> Result<Option<Apple>, String> {
        let Some(bundle) = config.apple_bundle_id.clone().filter(|b| !b.is_empty()) else { return Ok(None) };
        if config.apple_root_certs.is_empty() {
            return Ok(None);
        }
        let roots = config.apple_root_certs.iter().map(|p| read_cert(p)).collect::<Result<Vec<_>, _>>()?;
        let (env, sandbox) = match config.apple_environment.as_str() {
            "Production" => (Environment::Production, config.apple_allow_sandbox),
            "Sandbox" => (Environment::Sandbox, false),
            other => return Err(format!("TALLY_APPLE_ENVIRONMENT must be Production or Sandbox, not {other:?}")),
        };
        let verifier = SignedDataVerifier::new(roots.clone(), env, bundle.clone(), config.apple_app_id, false)
            .map_err(|_| "TALLY_APPLE_APP_ID (the app's numeric Apple ID) is required in Production".to_string())?;
        let sandbox = if sandbox {
            Some(SignedDataVerifier::new(roots, Environment::Sandbox, bundle, None, false).map_err(|e| e.to_string())?)
        } else {
            None
        };
        Ok(Some(Apple { verifier, sandbox }))
    }

    /// Verifies with this server's environment, then (Production accepting Sandbox) the
    /// Sandbox; answers the payload and whether it came from the Sandbox fallback.
    fn verify<T>(&self, f: impl Fn(&SignedDataVerifier) -> Result<T, SignedDataVerifierError>) -> ApiResult<(T, bool)> {
        let guarded = |v: &SignedDataVerifier| {
            std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| f(v))).unwrap_or(Err(SignedDataVerifierError::VerificationFailure))
        };
        match (guarded(&self.verifier), &self.sandbox) {
            (Ok(t), _) => Ok((t, false)),
            (Err(SignedDataVerifierError::InvalidEnvironment), Some(sb)) => guarded(sb).map(|t| (t, true)).map_err(refusal),
            (Err(e), _) => Err(refusal(e)),
        }
    }

    /// Verifies one StoreKit 2 signed transaction (a `jwsRepresentation`) and reads it.
    pub fn read_transaction(&self, jws: &str) -> ApiResult<Txn> {
        let (p, sandbox) = self.verify(|v| v.verify_and_decode_signed_transaction(jws))?;
        Txn::from_payload(p, sandbox)
    }

    /// Verifies a notification's `signedPayload`, then (for a handled type) the transaction
    /// and renewal info inside it with the same environment's verifier, and reads them.
    pub fn read_notification(&self, signed_payload: &str) -> ApiResult<Notified> {
        let (n, sandbox) = self.verify(|v| v.verify_and_decode_notification(signed_payload))?;
        let uuid = n
            .notification_uuid
            .clone()
            .filter(|u| !u.is_empty() && u.len() <= 64)
            .ok_or_else(|| ApiError::BadRequest("invalid_jws", "the notification has no notificationUUID".into()))?;
        let kind = n.notification_type.as_ref().map(NotificationTypeV2::raw_value).unwrap_or("").to_string();
        let subtype = n.subtype.as_ref().and_then(|s| serde_json::to_value(s).ok()).and_then(|v| v.as_str().map(str::to_string));
        // The transaction and renewal info inside are verified the same way.
        let verifier = if sandbox { self.sandbox.as_ref().unwrap_or(&self.verifier) } else { &self.verifier };
        let data = n.data.as_ref();
        let txn = match data.and_then(|d| d.signed_transaction_info.as_deref()) {
            Some(j) if HANDLED.contains(&kind.as_str()) => {
                let p = verifier.verify_and_decode_signed_transaction(j).map_err(refusal)?;
                Some(Txn::from_payload(p, sandbox)?)
            }
            _ => None,
        };
        let renewal = match data.and_then(|d| d.signed_renewal_info.as_deref()) {
            Some(j) if HANDLED.contains(&kind.as_str()) => {
                let r = verifier.verify_and_decode_renewal_info(j).map_err(refusal)?;
                r.signed_date.map(|signed_date| Renewal {
                    auto_renew: r.auto_renew_status == Some(AutoRenewStatus::On),
                    billing_retry: r.is_in_billing_retry_period == Some(true),
                    grace_until: r.grace_period_expires_date,
                    signed_date,
                })
            }
            _ => None,
        };
        Ok(Notified { uuid, kind, subtype, txn, renewal })
    }
}

/// A verified App Store Server Notification V2, as much of it as is applied.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Notified {
    /// `notificationUUID` (each is applied once).
    pub uuid: String,
    /// `notificationType` (empty when absent).
    pub kind: String,
    /// `subtype`.
    pub subtype: Option<String>,
    /// The transaction inside (handled types only).
    pub txn: Option<Txn>,
    /// The renewal info inside (handled types only).
    pub renewal: Option<Renewal>,
}

/// The refusal naming why a JWS failed verification.
fn refusal(e: SignedDataVerifierError) -> ApiError {
    let (code, msg) = match e {
        SignedDataVerifierError::InternalChainVerifierError(_) | SignedDataVerifierError::InternalDecodeError(_) => {
            ("untrusted_chain", "the certificate chain does not lead to a trusted Apple root")
        }
        SignedDataVerifierError::VerificationFailure => ("bad_signature", "the signature does not verify"),
        SignedDataVerifierError::InvalidAppIdentifier | SignedDataVerifierError::InvalidAppAppleId => {
            ("wrong_bundle", "signed for another app (bundle id or Apple ID)")
        }
        SignedDataVerifierError::InvalidEnvironment => ("wrong_environment", "signed for another App Store environment"),
        SignedDataVerifierError::InternalJWSError(_) | SignedDataVerifierError::InternalDeserializationError(_) => {
            return ApiError::BadRequest("invalid_jws", "not an App Store signed payload (JWS)".into());
        }
    };
    ApiError::Invalid(code, msg.into())
}

fn unconfigured() -> ApiError {
    purchases::unconfigured("App Store", "TALLY_APPLE_BUNDLE_ID, TALLY_APPLE_ROOT_CERTS")
}

/// One verified App Store transaction.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Txn {
    /// `transactionId`.
    pub transaction_id: String,
    /// `originalTransactionId` (the subscription's id).
    pub original_id: String,
    /// `productId`.
    pub product_id: String,
    /// `type` as Apple names it.
    pub product_type: String,
    /// `purchaseDate`.
    pub purchase_date: DateTime<Utc>,
    /// `expiresDate` (subscriptions).
    pub expires_date: Option<DateTime<Utc>>,
    /// `signedDate`.
    pub signed_date: DateTime<Utc>,
    /// Bought with an introductory offer (a trial).
    pub trial: bool,
    /// `revocationDate` (refunded or revoked).
    pub revoked_at: Option<DateTime<Utc>>,
    /// Accepted from the Sandbox by a production server.
    pub sandbox: bool,
    /// `price` in milliunits.
    pub price: Option<i64>,
    /// `currency`.
    pub currency: Option<String>,
    /// `appAccountToken`.
    pub account_token: Option<Uuid>,
}

impl Txn {
    fn from_payload(p: JWSTransactionDecodedPayload, sandbox: bool) -> ApiResult<Txn> {
        let missing = |what: &str| ApiError::BadRequest("invalid_jws", format!("the transaction has no {what}"));
        let transaction_id = p.transaction_id.filter(|s| !s.is_empty() && s.len() <= 64).ok_or_else(|| missing("transactionId"))?;
        Ok(Txn {
            original_id: p.original_transaction_id.filter(|s| !s.is_empty() && s.len() <= 64).unwrap_or_else(|| transaction_id.clone()),
            transaction_id,
            product_id: p.product_id.filter(|s| !s.is_empty() && s.len() <= 255).ok_or_else(|| missing("productId"))?,
            product_type: p
                .r#type
                .map(|t| serde_json::to_value(t).ok().and_then(|v| v.as_str().map(str::to_string)).unwrap_or_default())
                .unwrap_or_default(),
            purchase_date: p.purchase_date.ok_or_else(|| missing("purchaseDate"))?,
            expires_date: p.expires_date,
            signed_date: p.signed_date.ok_or_else(|| missing("signedDate"))?,
            trial: p.offer_type == Some(OfferType::IntroductoryOffer),
            revoked_at: p.revocation_date,
            sandbox,
            price: p.price,
            currency: p.currency,
            account_token: p.app_account_token,
        })
    }

    /// The order of the transactions of one `originalTransactionId`: the latest purchase, then
    /// the latest expiry, then the id.
    fn period_key(&self) -> (DateTime<Utc>, Option<DateTime<Utc>>, &str) {
        (self.purchase_date, self.expires_date, self.transaction_id.as_str())
    }
}

/// The renewal info of a subscription (from a notification).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Renewal {
    /// Whether it renews at the period end.
    pub auto_renew: bool,
    /// Apple is retrying a failed renewal.
    pub billing_retry: bool,
    /// End of Apple's billing grace period.
    pub grace_until: Option<DateTime<Utc>>,
    /// `signedDate`.
    pub signed_date: DateTime<Utc>,
}

/// The state of the subscription (or plan bought for ever) `original`, from its transactions
/// and latest renewal info; `None` when it is not a plan product of `catalog`.
pub fn state_of(original: &str, txns: &[Txn], renewal: Option<&Renewal>, catalog: &Catalog, now: DateTime<Utc>) -> Option<Stored> {
    let latest = txns.iter().filter(|t| t.original_id == original).max_by(|a, b| a.period_key().cmp(&b.period_key()))?;
    let product = catalog.product(Store::AppStore, &latest.product_id)?;
    let (plan, lifetime) = match product.kind() {
        ProductKind::Subscription(p) => (p, false),
        ProductKind::Lifetime(p) => (p, true),
        ProductKind::Credits(_) => return None,
    };
    let renewal = renewal.filter(|r| r.signed_date >= latest.purchase_date);
    let mut sub = Subscription {
        store: Store::AppStore,
        subscription_id: original.to_string(),
        product_id: Some(latest.product_id.clone()),
        plan: Some(plan.to_string()),
        status: SubscriptionStatus::Active,
        period_start: Some(latest.purchase_date),
        period_end: if lifetime { None } else { latest.expires_date },
        past_due_since: None,
        access_until: if lifetime { None } else { latest.expires_date },
        lifetime,
    };
    let mut auto_renew = !lifetime && renewal.is_none_or(|r| r.auto_renew);
    if let Some(at) = latest.revoked_at {
        sub.status = SubscriptionStatus::Canceled;
        sub.access_until = Some(at);
        auto_renew = false;
    } else if lifetime {
    } else if let Some(r) = renewal.filter(|r| r.billing_retry) {
        sub.status = SubscriptionStatus::PastDue;
        sub.past_due_since = latest.expires_date;
        sub.access_until = r.grace_until.filter(|g| latest.expires_date.is_none_or(|e| *g > e));
    } else if latest.expires_date.is_some_and(|e| e <= now) {
        sub.status = SubscriptionStatus::Canceled;
    } else if latest.trial {
        sub.status = SubscriptionStatus::Trialing;
    }
    Some(Stored { sub, auto_renew, sandbox: latest.sandbox })
}

/// Keeps `t` unless a fact about the same transaction id signed later is stored.
async fn store_txn(tx: &impl GenericClient, user: Uuid, t: &Txn) -> ApiResult<()> {
    tx.execute(
        "INSERT INTO apple_transactions (transaction_id, original_transaction_id, user_id, product_id, product_type, purchase_date, expires_date, \
           signed_date, trial, revoked_at, sandbox, price, currency) VALUES ($1, $2, $3, $4, $5, $6, $7, $8, $9, $10, $11, $12, $13) \
         ON CONFLICT (transaction_id) DO UPDATE SET product_id = excluded.product_id, product_type = excluded.product_type, \
           purchase_date = excluded.purchase_date, expires_date = excluded.expires_date, signed_date = excluded.signed_date, trial = excluded.trial, \
           revoked_at = excluded.revoked_at, sandbox = excluded.sandbox, price = excluded.price, currency = excluded.currency \
         WHERE (excluded.signed_date, excluded.revoked_at IS NOT NULL) > (apple_transactions.signed_date, apple_transactions.revoked_at IS NOT NULL)",
        &[
            &t.transaction_id,
            &t.original_id,
            &user,
            &t.product_id,
            &t.product_type,
            &t.purchase_date,
            &t.expires_date,
            &t.signed_date,
            &t.trial,
            &t.revoked_at,
            &t.sandbox,
            &t.price,
            &t.currency,
        ],
    )
    .await?;
    Ok(())
}

async fn store_renewal(tx: &impl GenericClient, user: Uuid, original: &str, r: &Renewal) -> ApiResult<()> {
    tx.execute(
        "INSERT INTO apple_renewals (original_transaction_id, user_id, auto_renew, billing_retry, grace_until, signed_date) VALUES ($1, $2, $3, $4, $5, $6) \
         ON CONFLICT (original_transaction_id) DO UPDATE SET auto_renew = excluded.auto_renew, billing_retry = excluded.billing_retry, \
           grace_until = excluded.grace_until, signed_date = excluded.signed_date WHERE excluded.signed_date > apple_renewals.signed_date",
        &[&original, &user, &r.auto_renew, &r.billing_retry, &r.grace_until, &r.signed_date],
    )
    .await?;
    Ok(())
}

async fn load_txns(tx: &impl GenericClient, original: &str) -> ApiResult<Vec<Txn>> {
    Ok(tx
        .query(
            "SELECT transaction_id, original_transaction_id, product_id, product_type, purchase_date, expires_date, signed_date, trial, revoked_at, \
               sandbox, price, currency FROM apple_transactions WHERE original_transaction_id = $1",
            &[&original],
        )
        .await?
        .iter()
        .map(|r| Txn {
            transaction_id: r.get(0),
            original_id: r.get(1),
            product_id: r.get(2),
            product_type: r.get(3),
            purchase_date: r.get(4),
            expires_date: r.get(5),
            signed_date: r.get(6),
            trial: r.get(7),
            revoked_at: r.get(8),
            sandbox: r.get(9),
            price: r.get(10),
            currency: r.get(11),
            account_token: None,
        })
        .collect())
}

/// Recomputes what `original` gives `user`: its subscription state, or for credit packs one
/// grant per transaction (taken back when refunded: the unspent rest goes, what was spent
/// becomes debt). Returns the purchases answered for it.
async fn settle(tx: &impl GenericClient, user: Uuid, original: &str, catalog: &Catalog, now: DateTime<Utc>) -> ApiResult<Vec<Value>> {
    let txns = load_txns(tx, original).await?;
    let renewal = tx
        .query_opt(
            "SELECT auto_renew, billing_retry, grace_until, signed_date FROM apple_renewals WHERE original_transaction_id = $1",
            &[&original],
        )
        .await?
        .map(|r| Renewal { auto_renew: r.get(0), billing_retry: r.get(1), grace_until: r.get(2), signed_date: r.get(3) });
    for t in txns.iter().filter(|t| !t.trial) {
        let paid = Payment {
            kind: "payment.succeeded",
            store: Store::AppStore.as_str(),
            payment_id: &t.transaction_id,
            occurrence: "",
            subscription_id: Some(&t.original_id),
            product_id: Some(&t.product_id),
            amount: t.price,
            currency: t.currency.as_deref(),
        };
        outbox::payment(tx, user, &paid, now).await?;
        if t.revoked_at.is_some() {
            outbox::payment(tx, user, &Payment { kind: "payment.refunded", ..paid }, now).await?;
        }
    }
    if let Some(s) = state_of(original, &txns, renewal.as_ref(), catalog, now) {
        subscriptions::store(tx, user, &s, now).await?;
        let latest = txns.iter().max_by(|a, b| a.period_key().cmp(&b.period_key()));
        let txn = latest.map(|t| t.transaction_id.as_str());
        return Ok(vec![purchases::purchase(Store::AppStore, s.sub.product_id.as_deref(), txn, s.sub.status.as_str())]);
    }
    let mut out = Vec::new();
    for t in &txns {
        let Some(ProductKind::Credits(n)) = catalog.product(Store::AppStore, &t.product_id).map(|p| p.kind()) else { continue };
        let pack = purchases::Pack {
            store: Store::AppStore,
            transaction_id: &t.transaction_id,
            product_id: &t.product_id,
            credits: n,
            purchased_at: t.purchase_date,
            revoked: t.revoked_at.is_some(),
        };
        let status = purchases::credit_pack(tx, user, &pack, now).await?;
        out.push(purchases::purchase(Store::AppStore, Some(&t.product_id), Some(&t.transaction_id), status));
    }
    Ok(out)
}

/// Body of `POST /v1/purchases/apple`.
#[derive(Debug, Deserialize, utoipa::ToSchema)]
#[serde(deny_unknown_fields)]
pub struct PurchaseBody {
    /// StoreKit 2 `jwsRepresentation`s: one purchase, or every current transaction (restore).
    pub signed_transactions: Vec<String>,
    /// The device asking (answers a device token, as `/v1/sync` does).
    #[serde(default)]
    pub device_id: Option<String>,
}

/// `POST /v1/purchases/apple`: verifies every transaction, binds each to the caller (by
/// `appAccountToken` = the account token, else the caller), and answers the entitlements with
/// their token plus `purchases`. Any refusal changes nothing.
#[utoipa::path(
    operation_id = "billing_apple_purchase",
    post,
    path = "/v1/purchases/apple",
    tag = "stores",
    security(("bearer" = [])),
    request_body = PurchaseBody,
    responses(
        (status = 200, description = "The entitlements with their token and the purchases", body = Object),
    ),
)]
pub async fn purchase(
    State(state): State<AppState>,
    AuthUser(user): AuthUser,
    JsonBody(b): JsonBody<PurchaseBody>,
) -> ApiResult<Json<Value>> {
    let apple = state.apple.as_ref().ok_or_else(unconfigured)?;
    purchases::check_request(b.signed_transactions.len(), "signed_transactions", b.device_id.as_deref())?;
    let now = state.now();
    let mut client = state.pool.get().await?;
    let (_, catalog) = state.catalog.current(&client).await?;
    let mut txns = Vec::new();
    for jws in &b.signed_transactions {
        let t = apple.read_transaction(jws)?;
        if catalog.product(Store::AppStore, &t.product_id).is_none() {
            return Err(purchases::unknown_product(Store::AppStore, &t.product_id));
        }
        if t.account_token.is_some_and(|a| a != user.user_id) {
            return Err(purchases::bound_to_other());
        }
        txns.push(t);
    }
    let tx = client.transaction().await?;
    let locked = users::lock(&tx, user.user_id, &state.config.admin_subjects).await?;
    let originals: BTreeSet<&str> = txns.iter().map(|t| t.original_id.as_str()).collect();
    for t in &txns {
        purchases::bind(
            &tx,
            Store::AppStore,
            &t.original_id,
            user.user_id,
            if t.account_token.is_some() { "account_token" } else { "caller" },
        )
        .await?;
        store_txn(&tx, user.user_id, t).await?;
    }
    let mut bought = Vec::new();
    for o in originals {
        bought.extend(settle(&tx, user.user_id, o, &catalog, now).await?);
    }
    subscriptions::refresh(&tx, &state.user_cache, user.user_id, &catalog, now, subscriptions::grace(&state)).await?;
    let body = purchases::answer(&state, &tx, &locked, b.device_id.as_deref(), now).await?;
    tx.commit().await?;
    state.tokens.forget(user.user_id);
    Ok(purchases::with_purchases(body, bought))
}

/// Body of `POST /v1/webhooks/apple`.
#[derive(Debug, Deserialize, utoipa::ToSchema)]
pub struct NotificationBody {
    /// The signed notification.
    #[serde(rename = "signedPayload")]
    pub signed_payload: String,
}

/// `POST /v1/webhooks/apple`: an App Store Server Notification V2, verified, applied once by
/// `notificationUUID`.
#[utoipa::path(
    operation_id = "billing_apple_notification",
    post,
    path = "/v1/webhooks/apple",
    tag = "stores",
    request_body = NotificationBody,
    responses((status = 200, description = "Applied (or already applied)", body = Object)),
)]
pub async fn notification(State(state): State<AppState>, JsonBody(b): JsonBody<NotificationBody>) -> ApiResult<Json<Value>> {
    let apple = state.apple.as_ref().ok_or_else(unconfigured)?;
    let Notified { uuid, kind, subtype, txn, renewal } = apple.read_notification(&b.signed_payload)?;
    let now = state.now();
    let mut client = state.pool.get().await?;
    let (_, catalog) = state.catalog.current(&client).await?;
    let tx = client.transaction().await?;
    let fresh = tx
        .execute(
            "INSERT INTO apple_notifications (notification_uuid, type, subtype, outcome) VALUES ($1, $2, $3, 'received') ON CONFLICT DO NOTHING",
            &[&uuid, &kind, &subtype],
        )
        .await?;
    if fresh == 0 {
        drop(tx);
        return Ok(Json(json!({"received": true, "id": uuid, "duplicate": true})));
    }
    let (outcome, user) = match txn {
        _ if kind == "CONSUMPTION_REQUEST" || kind == "TEST" => ("acknowledged".to_string(), None),
        None => (if HANDLED.contains(&kind.as_str()) { "ignored:no_transaction" } else { "unhandled_type" }.to_string(), None),
        Some(t) => apply_notified(&state, &tx, &t, renewal.as_ref(), &catalog, now).await?,
    };
    tx.execute("UPDATE apple_notifications SET outcome = $2, user_id = $3 WHERE notification_uuid = $1", &[&uuid, &outcome, &user]).await?;
    tx.commit().await?;
    if let Some(u) = user {
        state.tokens.forget(u);
    }
    if kind == "DID_FAIL_TO_RENEW" {
        crate::metrics::payment_failed("app_store");
    }
    tracing::info!(notification = %uuid, %kind, %outcome, "app store notification");
    Ok(Json(json!({"received": true, "id": uuid, "duplicate": false, "outcome": outcome})))
}

async fn apply_notified(
    state: &AppState,
    tx: &deadpool_postgres::Transaction<'_>,
    t: &Txn,
    renewal: Option<&Renewal>,
    catalog: &Catalog,
    now: DateTime<Utc>,
) -> ApiResult<(String, Option<Uuid>)> {
    if catalog.product(Store::AppStore, &t.product_id).is_none() {
        return Ok(("ignored:unknown_product".into(), None));
    }
    let Some(user) = purchases::notified_user(tx, Store::AppStore, &t.original_id, t.account_token).await? else {
        return Ok(("ignored:unknown_user".into(), None));
    };
    users::lock(tx, user, &state.config.admin_subjects).await?;
    purchases::bind(tx, Store::AppStore, &t.original_id, user, "account_token").await?;
    store_txn(tx, user, t).await?;
    if let Some(r) = renewal {
        store_renewal(tx, user, &t.original_id, r).await?;
    }
    settle(tx, user, &t.original_id, catalog, now).await?;
    subscriptions::refresh(tx, &state.user_cache, user, catalog, now, subscriptions::grace(state)).await?;
    Ok(("applied".into(), Some(user)))
}

/// The user's App Store payments for `GET /v1/billing`.
pub async fn payments(client: &impl GenericClient, user: Uuid) -> ApiResult<Vec<Value>> {
    Ok(client
        .query(
            "SELECT transaction_id, original_transaction_id, product_id, price, currency, purchase_date, expires_date, revoked_at, sandbox \
             FROM apple_transactions WHERE user_id = $1 ORDER BY purchase_date DESC, transaction_id",
            &[&user],
        )
        .await?
        .iter()
        .map(|r| {
            let revoked: Option<DateTime<Utc>> = r.get(7);
            json!({"store": Store::AppStore, "transaction_id": r.get::<_, String>(0), "original_transaction_id": r.get::<_, String>(1),
                "product_id": r.get::<_, String>(2), "amount": r.get::<_, Option<i64>>(3), "currency": r.get::<_, Option<String>>(4),
                "date": r.get::<_, DateTime<Utc>>(5), "period_end": r.get::<_, Option<DateTime<Utc>>>(6),
                "status": if revoked.is_some() { "refunded" } else { "paid" }, "refunded_at": revoked, "sandbox": r.get::<_, bool>(8)})
        })
        .collect())
}
