//! Google Play purchases: `POST /v1/purchases/google` (purchase tokens from the app) and
//! `POST /v1/webhooks/google` (Real-time Developer Notifications by Pub/Sub push). Nothing is
//! taken from the client or the notification but the purchase token: its state is read from
//! the Play Developer API (a notification is a hint, the API is the truth).
//!
//! A subscription's purchase tokens form a lineage (`linkedPurchaseToken`: upgrade, downgrade,
//! resubscription); the lineage — its first token — is the subscription's id, bound to one
//! user, and its state comes from its latest token (`startTime`, then `expiryTime`). A voided
//! order takes back what it gave: the current period's order ends the subscription, an older
//! period's leaves it alone; a voided credit pack takes back the unspent credits.

use super::google_api::{Play, ProductPurchase, SubscriptionV2};
use super::google_push::{PushBody, PushVerifier, Rtdn};
use super::purchases;
use super::subscriptions::{self, Stored};
use crate::auth::AuthUser;
use crate::error::{ApiError, ApiResult};
use crate::extract::JsonBody;
use crate::users;
use crate::webhooks::outbox::{self, Payment};
use crate::{AppState, Config};
use axum::Json;
use axum::extract::State;
use axum::http::HeaderMap;
use chrono::{DateTime, Utc};
use deadpool_postgres::GenericClient;
use serde::Deserialize;
use serde_json::{Value, json};
use std::collections::{BTreeSet, HashMap};
use tally_core::catalog::ProductKind;
use tally_core::{Catalog, Store, Subscription, SubscriptionStatus};
use uuid::Uuid;

/// Longest purchase token accepted.
pub const MAX_TOKEN_LEN: usize = 4096;

/// Google Play on this server: the API client, and the push verifier when pushes are set up.
pub struct Google {
    /// The Play Developer API.
    pub play: Play,
    /// Pub/Sub push authentication (`None`: `TALLY_GOOGLE_PUSH_AUDIENCE` / `_EMAIL` unset).
    pub push: Option<PushVerifier>,
}

impl Google {
    /// Google Play of `TALLY_GOOGLE_*`; `None` when not configured.
    pub fn from_config(config: &Config) -> Result<Option<Google>, String> {
        let Some(play) = Play::from_config(config)? else { return Ok(None) };
        Ok(Some(Google { play, push: PushVerifier::from_config(config)? }))
    }
}

fn unconfigured() -> ApiError {
    purchases::unconfigured("Google Play", "TALLY_GOOGLE_SERVICE_ACCOUNT_FILE, TALLY_GOOGLE_PACKAGE_NAME")
}

/// A subscription or a one-time product.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Kind {
    /// `purchases.subscriptionsv2`.
    Subscription,
    /// `purchases.products`.
    Product,
}

impl Kind {
    fn as_str(self) -> &'static str {
        match self {
            Kind::Subscription => "subscription",
            Kind::Product => "product",
        }
    }
}

/// One purchase token as the Play Developer API described it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Token {
    /// The purchase token.
    pub purchase_token: String,
    /// Subscription or one-time product.
    pub kind: Kind,
    /// The product id.
    pub product_id: String,
    /// The latest order.
    pub order_id: Option<String>,
    /// `SUBSCRIPTION_STATE_*`, or `PURCHASED` / `CANCELED` / `PENDING` for a product.
    pub state: String,
    /// When it started (subscriptions) or was bought.
    pub start_time: DateTime<Utc>,
    /// When access ends (subscriptions).
    pub expiry_time: Option<DateTime<Utc>>,
    /// Renews at the period end.
    pub auto_renew: bool,
    /// In a free-trial phase.
    pub trial: bool,
    /// A license tester's purchase.
    pub test: bool,
    /// Acknowledged at Google.
    pub acknowledged: bool,
    /// Consumed at Google (credit packs).
    pub consumed: bool,
    /// The token it replaced.
    pub linked_token: Option<String>,
    /// `obfuscatedExternalAccountId`: the account token the app set.
    pub account_id: Option<String>,
}

impl Token {
    /// A subscription token from `purchases.subscriptionsv2`; 422 `product_mismatch` when it is
    /// not a subscription to `product_id`.
    pub fn from_subscription(token: &str, product_id: Option<&str>, s: SubscriptionV2, now: DateTime<Utc>) -> ApiResult<Token> {
        let item = match product_id {
            Some(p) => s.line_items.iter().find(|i| i.product_id == p),
            None => s.line_items.first(),
        }
        .ok_or_else(|| ApiError::Invalid("product_mismatch", "the purchase token is not a subscription to this product".into()))?;
        Ok(Token {
            purchase_token: token.to_string(),
            kind: Kind::Subscription,
            product_id: item.product_id.clone(),
            order_id: s.latest_order_id.clone().or_else(|| item.latest_successful_order_id.clone()),
            state: s.subscription_state.clone().unwrap_or_else(|| "SUBSCRIPTION_STATE_UNSPECIFIED".into()),
            start_time: s.start_time.unwrap_or(now),
            expiry_time: item.expiry_time,
            auto_renew: item.auto_renewing_plan.as_ref().is_some_and(|p| p.auto_renew_enabled.unwrap_or(true)),
            trial: item.offer_phase.as_ref().is_some_and(|p| p.get("freeTrial").is_some()),
            test: s.test_purchase.is_some(),
            acknowledged: s.acknowledgement_state.as_deref() == Some("ACKNOWLEDGEMENT_STATE_ACKNOWLEDGED"),
            consumed: false,
            linked_token: s.linked_purchase_token.clone().filter(|t| !t.is_empty() && t.len() <= MAX_TOKEN_LEN),
            account_id: s.account_id().map(str::to_string),
        })
    }

    /// A one-time product token from `purchases.products`.
    pub fn from_product(token: &str, product_id: &str, p: ProductPurchase, now: DateTime<Utc>) -> Token {
        Token {
            purchase_token: token.to_string(),
            kind: Kind::Product,
            product_id: product_id.to_string(),
            order_id: p.order_id.clone(),
            state: match p.purchase_state {
                Some(0) => "PURCHASED",
                Some(1) => "CANCELED",
                _ => "PENDING",
            }
            .into(),
            start_time: p.purchased_at().unwrap_or(now),
            expiry_time: None,
            auto_renew: false,
            trial: false,
            test: p.purchase_type == Some(0),
            acknowledged: p.acknowledgement_state == Some(1),
            consumed: p.consumption_state == Some(1),
            linked_token: None,
            account_id: p.obfuscated_external_account_id.clone(),
        }
    }

    /// The order of the tokens of one lineage: the latest start, then the latest expiry.
    fn period_key(&self) -> (DateTime<Utc>, Option<DateTime<Utc>>, &str) {
        (self.start_time, self.expiry_time, self.purchase_token.as_str())
    }

    /// The account token the app set, when it is one (a user id; any other value the app may
    /// set binds nothing).
    fn account_token(&self) -> Option<Uuid> {
        self.account_id.as_deref().and_then(|a| Uuid::parse_str(a).ok())
    }
}

/// The state of the Play subscription (or plan bought for ever) `lineage`, from its tokens and
/// the voided orders (order id → when); `None` when it is not a plan product of `catalog`.
pub fn state_of(
    lineage: &str,
    tokens: &[Token],
    voids: &HashMap<String, DateTime<Utc>>,
    catalog: &Catalog,
    now: DateTime<Utc>,
) -> Option<Stored> {
    let latest = tokens.iter().max_by(|a, b| a.period_key().cmp(&b.period_key()))?;
    let (plan, lifetime) = match catalog.product(Store::Play, &latest.product_id)?.kind() {
        ProductKind::Subscription(p) => (p, false),
        ProductKind::Lifetime(p) => (p, true),
        ProductKind::Credits(_) => return None,
    };
    let mut sub = Subscription {
        store: Store::Play,
        subscription_id: lineage.to_string(),
        product_id: Some(latest.product_id.clone()),
        plan: Some(plan.to_string()),
        status: SubscriptionStatus::Active,
        period_start: Some(latest.start_time),
        period_end: if lifetime { None } else { latest.expiry_time },
        past_due_since: None,
        access_until: if lifetime { None } else { latest.expiry_time },
        lifetime,
    };
    let mut auto_renew = !lifetime && latest.auto_renew;
    let ended = |sub: &mut Subscription, at: DateTime<Utc>| {
        sub.status = SubscriptionStatus::Canceled;
        sub.access_until = Some(sub.access_until.map_or(at, |u| u.min(at)));
    };
    let expired = latest.expiry_time.is_some_and(|e| e <= now);
    if let Some(at) = latest.order_id.as_ref().and_then(|o| voids.get(o)) {
        ended(&mut sub, *at);
        auto_renew = false;
    } else if lifetime {
        match latest.state.as_str() {
            "PURCHASED" => {}
            "CANCELED" => ended(&mut sub, now),
            _ => sub.status = SubscriptionStatus::None,
        }
    } else {
        match latest.state.as_str() {
            "SUBSCRIPTION_STATE_ACTIVE" | "SUBSCRIPTION_STATE_CANCELED" if expired => ended(&mut sub, now),
            "SUBSCRIPTION_STATE_ACTIVE" if latest.trial => sub.status = SubscriptionStatus::Trialing,
            "SUBSCRIPTION_STATE_ACTIVE" => {}
            "SUBSCRIPTION_STATE_CANCELED" => auto_renew = false,
            "SUBSCRIPTION_STATE_IN_GRACE_PERIOD" => sub.status = SubscriptionStatus::PastDue,
            "SUBSCRIPTION_STATE_ON_HOLD" => {
                sub.status = SubscriptionStatus::PastDue;
                sub.access_until = Some(sub.access_until.map_or(now, |u| u.min(now)));
            }
            "SUBSCRIPTION_STATE_PAUSED" => ended(&mut sub, now),
            "SUBSCRIPTION_STATE_EXPIRED" => {
                ended(&mut sub, now);
                auto_renew = false;
            }
            _ => {
                sub.status = SubscriptionStatus::None;
                sub.access_until = Some(now.min(sub.access_until.unwrap_or(now)));
                auto_renew = false;
            }
        }
    }
    Some(Stored { sub, auto_renew, sandbox: latest.test })
}

/// The lineage `t` belongs to: its own when stored, else that of the token it replaced (or
/// that token itself), else its own token.
async fn lineage_of(tx: &impl GenericClient, t: &Token) -> ApiResult<String> {
    for token in [Some(&t.purchase_token), t.linked_token.as_ref()].into_iter().flatten() {
        if let Some(r) = tx.query_opt("SELECT lineage FROM google_purchases WHERE purchase_token = $1", &[token]).await? {
            return Ok(r.get(0));
        }
    }
    Ok(t.linked_token.clone().unwrap_or_else(|| t.purchase_token.clone()))
}

/// Stores what the API said of `t` at `read_at`, unless a later read is stored.
async fn store_token(tx: &impl GenericClient, user: Uuid, lineage: &str, t: &Token, read_at: DateTime<Utc>) -> ApiResult<()> {
    tx.execute(
        "INSERT INTO google_purchases (purchase_token, lineage, user_id, kind, product_id, order_id, state, start_time, expiry_time, auto_renew, \
           trial, test, acknowledged, consumed, read_at) VALUES ($1, $2, $3, $4, $5, $6, $7, $8, $9, $10, $11, $12, $13, $14, $15) \
         ON CONFLICT (purchase_token) DO UPDATE SET product_id = excluded.product_id, order_id = excluded.order_id, state = excluded.state, \
           start_time = excluded.start_time, expiry_time = excluded.expiry_time, auto_renew = excluded.auto_renew, trial = excluded.trial, \
           test = excluded.test, acknowledged = google_purchases.acknowledged OR excluded.acknowledged, \
           consumed = google_purchases.consumed OR excluded.consumed, read_at = excluded.read_at \
         WHERE excluded.read_at >= google_purchases.read_at",
        &[
            &t.purchase_token,
            &lineage,
            &user,
            &t.kind.as_str(),
            &t.product_id,
            &t.order_id,
            &t.state,
            &t.start_time,
            &t.expiry_time,
            &t.auto_renew,
            &t.trial,
            &t.test,
            &t.acknowledged,
            &t.consumed,
            &read_at,
        ],
    )
    .await?;
    Ok(())
}

fn token_from_row(r: &tokio_postgres::Row) -> Token {
    Token {
        purchase_token: r.get(0),
        kind: if r.get::<_, &str>(1) == "product" { Kind::Product } else { Kind::Subscription },
        product_id: r.get(2),
        order_id: r.get(3),
        state: r.get(4),
        start_time: r.get(5),
        expiry_time: r.get(6),
        auto_renew: r.get(7),
        trial: r.get(8),
        test: r.get(9),
        acknowledged: r.get(10),
        consumed: r.get(11),
        linked_token: None,
        account_id: None,
    }
}

const TOKEN_COLUMNS: &str =
    "purchase_token, kind, product_id, order_id, state, start_time, expiry_time, auto_renew, trial, test, acknowledged, consumed";

/// A stored purchase token and its lineage.
async fn stored_token(client: &impl GenericClient, token: &str) -> ApiResult<Option<(Token, String)>> {
    Ok(client
        .query_opt(&format!("SELECT {TOKEN_COLUMNS}, lineage FROM google_purchases WHERE purchase_token = $1"), &[&token])
        .await?
        .map(|r| (token_from_row(&r), r.get(12))))
}

/// What to tell Google once the state is committed.
#[derive(Debug, Clone, PartialEq, Eq)]
enum FollowUp {
    AcknowledgeSubscription(String, String),
    AcknowledgeProduct(String, String),
    Consume(String, String),
}

/// Recomputes what `lineage` gives `user`: its subscription state, or for credit packs one
/// grant per order (taken back when voided). Returns the purchases answered for it and what
/// to acknowledge or consume at Google after the commit.
async fn settle(
    tx: &impl GenericClient,
    user: Uuid,
    lineage: &str,
    catalog: &Catalog,
    now: DateTime<Utc>,
) -> ApiResult<(Vec<Value>, Vec<FollowUp>)> {
    let tokens: Vec<Token> = tx
        .query(&format!("SELECT {TOKEN_COLUMNS} FROM google_purchases WHERE lineage = $1"), &[&lineage])
        .await?
        .iter()
        .map(token_from_row)
        .collect();
    let names: Vec<&str> = tokens.iter().map(|t| t.purchase_token.as_str()).collect();
    let orders: Vec<&str> = tokens.iter().filter_map(|t| t.order_id.as_deref()).collect();
    let voids: HashMap<String, DateTime<Utc>> = tx
        .query("SELECT order_id, voided_at FROM google_voids WHERE purchase_token = ANY($1) OR order_id = ANY($2)", &[&names, &orders])
        .await?
        .iter()
        .map(|r| (r.get(0), r.get(1)))
        .collect();
    let mut out = Vec::new();
    let mut follow = Vec::new();
    let settled = |t: &Token| !matches!(t.state.as_str(), "PENDING" | "SUBSCRIPTION_STATE_PENDING" | "CANCELED");
    for t in tokens.iter().filter(|t| settled(t) && !t.trial) {
        let order = t.order_id.as_deref().unwrap_or(&t.purchase_token);
        let paid = Payment {
            kind: "payment.succeeded",
            store: Store::Play.as_str(),
            payment_id: order,
            occurrence: "",
            subscription_id: (t.kind == Kind::Subscription).then_some(lineage),
            product_id: Some(&t.product_id),
            amount: None,
            currency: None,
        };
        outbox::payment(tx, user, &paid, now).await?;
        if voids.contains_key(order) {
            outbox::payment(tx, user, &Payment { kind: "payment.refunded", ..paid }, now).await?;
        }
    }
    if let Some(s) = state_of(lineage, &tokens, &voids, catalog, now) {
        subscriptions::store(tx, user, &s, now).await?;
        let latest = tokens.iter().max_by(|a, b| a.period_key().cmp(&b.period_key()));
        if let Some(t) = latest.filter(|t| !t.acknowledged && settled(t) && s.sub.status != SubscriptionStatus::None) {
            let (p, k) = (t.product_id.clone(), t.purchase_token.clone());
            follow.push(if t.kind == Kind::Product { FollowUp::AcknowledgeProduct(p, k) } else { FollowUp::AcknowledgeSubscription(p, k) });
        }
        let token = latest.map(|t| t.purchase_token.as_str());
        out.push(purchases::purchase(Store::Play, s.sub.product_id.as_deref(), token, s.sub.status.as_str()));
        return Ok((out, follow));
    }
    for t in &tokens {
        let Some(ProductKind::Credits(n)) = catalog.product(Store::Play, &t.product_id).map(|p| p.kind()) else { continue };
        let voided = t.order_id.as_ref().is_some_and(|o| voids.contains_key(o)) || t.state == "CANCELED";
        let status = if t.state == "PENDING" {
            "pending"
        } else {
            let pack = purchases::Pack {
                store: Store::Play,
                transaction_id: t.order_id.as_deref().unwrap_or(&t.purchase_token),
                product_id: &t.product_id,
                credits: n,
                purchased_at: t.start_time,
                revoked: voided,
            };
            let status = purchases::credit_pack(tx, user, &pack, now).await?;
            if !voided && !t.consumed {
                follow.push(FollowUp::Consume(t.product_id.clone(), t.purchase_token.clone()));
            }
            status
        };
        out.push(purchases::purchase(Store::Play, Some(&t.product_id), Some(&t.purchase_token), status));
    }
    Ok((out, follow))
}

/// Acknowledges and consumes at Google what was just committed, recording what succeeded. A
/// failure is logged and left for the next submission or notification of the token (the API
/// still says it is pending).
async fn follow_up(state: &AppState, play: &Play, steps: Vec<FollowUp>) {
    let now = state.now();
    for step in steps {
        let (result, column, token) = match &step {
            FollowUp::AcknowledgeSubscription(p, t) => (play.acknowledge_subscription(p, t, now).await, "acknowledged", t),
            FollowUp::AcknowledgeProduct(p, t) => (play.acknowledge_product(p, t, now).await, "acknowledged", t),
            FollowUp::Consume(p, t) => (play.consume_product(p, t, now).await, "consumed", t),
        };
        if let Err(e) = result {
            tracing::warn!(error = %e, ?step, "google play follow-up failed; retried on the next read of the token");
            continue;
        }
        let sql = format!("UPDATE google_purchases SET {column} = true WHERE purchase_token = $1");
        match state.pool.get().await {
            Ok(c) => {
                if let Err(e) = c.execute(&sql, &[token]).await {
                    tracing::warn!(error = %e, "recording a google play follow-up");
                }
            }
            Err(e) => tracing::warn!(error = %e, "recording a google play follow-up"),
        }
    }
}

/// Reads `token` of `product_id` (a catalog product of kind `kind`) from the API.
async fn read(play: &Play, kind: Kind, product_id: Option<&str>, token: &str, now: DateTime<Utc>) -> ApiResult<Token> {
    match (kind, product_id) {
        (Kind::Subscription, p) => Token::from_subscription(token, p, play.subscription(token, now).await?, now),
        (Kind::Product, Some(p)) => Ok(Token::from_product(token, p, play.product(p, token, now).await?, now)),
        (Kind::Product, None) => Err(ApiError::invalid("a one-time product purchase needs its product id")),
    }
}

fn kind_of(catalog: &Catalog, product_id: &str) -> Option<Kind> {
    Some(match catalog.product(Store::Play, product_id)?.kind() {
        ProductKind::Subscription(_) => Kind::Subscription,
        ProductKind::Lifetime(_) | ProductKind::Credits(_) => Kind::Product,
    })
}

/// One purchase in `POST /v1/purchases/google`.
#[derive(Debug, Deserialize, utoipa::ToSchema)]
#[serde(deny_unknown_fields)]
pub struct PurchaseItem {
    /// The Play product id.
    pub product_id: String,
    /// Play Billing's `Purchase.getPurchaseToken()`.
    pub purchase_token: String,
}

/// Body of `POST /v1/purchases/google`.
#[derive(Debug, Deserialize, utoipa::ToSchema)]
#[serde(deny_unknown_fields)]
pub struct PurchaseBody {
    /// One purchase, or every current one (restore).
    pub purchases: Vec<PurchaseItem>,
    /// The device asking (answers a device token, as `/v1/sync` does).
    #[serde(default)]
    pub device_id: Option<String>,
}

/// `POST /v1/purchases/google`: reads every purchase token from the Play Developer API, binds
/// each to the caller (by `obfuscatedExternalAccountId` = the account token, else the caller),
/// stores its state, then acknowledges (or consumes) it at Google, and answers the
/// entitlements with their token plus `purchases`. Any refusal changes nothing.
#[utoipa::path(
    operation_id = "billing_google_purchase",
    post,
    path = "/v1/purchases/google",
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
    let google = state.google.as_ref().ok_or_else(unconfigured)?;
    purchases::check_request(b.purchases.len(), "purchases", b.device_id.as_deref())?;
    let now = state.now();
    let client = state.pool.get().await?;
    let (_, catalog) = state.catalog.current(&client).await?;
    let mut kinds = Vec::new();
    for p in &b.purchases {
        if p.purchase_token.is_empty() || p.purchase_token.len() > MAX_TOKEN_LEN {
            return Err(ApiError::Invalid("invalid_purchase_token", format!("purchase_token must hold 1 to {MAX_TOKEN_LEN} bytes")));
        }
        kinds.push(kind_of(&catalog, &p.product_id).ok_or_else(|| purchases::unknown_product(Store::Play, &p.product_id))?);
    }
    drop(client);
    let mut tokens = Vec::new();
    for (p, kind) in b.purchases.iter().zip(kinds) {
        let t = read(&google.play, kind, Some(&p.product_id), &p.purchase_token, now).await?;
        if t.account_token().is_some_and(|a| a != user.user_id) {
            return Err(purchases::bound_to_other());
        }
        tokens.push(t);
    }
    let mut client = state.pool.get().await?;
    let tx = client.transaction().await?;
    let locked = users::lock(&tx, user.user_id, &state.config.admin_subjects).await?;
    let mut lineages = BTreeSet::new();
    for t in &tokens {
        let lineage = lineage_of(&tx, t).await?;
        purchases::bind(&tx, Store::Play, &lineage, user.user_id, if t.account_token().is_some() { "account_token" } else { "caller" })
            .await?;
        store_token(&tx, user.user_id, &lineage, t, now).await?;
        lineages.insert(lineage);
    }
    let (mut bought, mut follow) = (Vec::new(), Vec::new());
    for l in &lineages {
        let (p, f) = settle(&tx, user.user_id, l, &catalog, now).await?;
        bought.extend(p);
        follow.extend(f);
    }
    subscriptions::refresh(&tx, &state.user_cache, user.user_id, &catalog, now, subscriptions::grace(&state)).await?;
    let body = purchases::answer(&state, &tx, &locked, b.device_id.as_deref(), now).await?;
    tx.commit().await?;
    state.tokens.forget(user.user_id);
    follow_up(&state, &google.play, follow).await;
    Ok(purchases::with_purchases(body, bought))
}

/// What a notification asks to re-read.
struct Hint {
    kind: &'static str,
    token: Option<String>,
    product: Option<(Kind, Option<String>)>,
    void: Option<(String, Option<i32>)>,
}

fn hint(n: &Rtdn) -> Hint {
    if let Some(s) = &n.subscription_notification {
        return Hint {
            kind: "subscription",
            token: Some(s.purchase_token.clone()),
            product: Some((Kind::Subscription, s.subscription_id.clone())),
            void: None,
        };
    }
    if let Some(p) = &n.one_time_product_notification {
        return Hint {
            kind: "one_time_product",
            token: Some(p.purchase_token.clone()),
            product: Some((Kind::Product, Some(p.sku.clone()))),
            void: None,
        };
    }
    if let Some(v) = &n.voided_purchase_notification {
        return Hint {
            kind: "voided_purchase",
            token: Some(v.purchase_token.clone()),
            product: None,
            void: Some((v.order_id.clone(), v.product_type)),
        };
    }
    Hint { kind: if n.test_notification.is_some() { "test" } else { "unknown" }, token: None, product: None, void: None }
}

/// `POST /v1/webhooks/google`: a Pub/Sub push of a Real-time Developer Notification,
/// authenticated by its OIDC token, applied once by `messageId`: the purchase token it names is
/// re-read from the API and its state stored as on a purchase.
#[utoipa::path(
    operation_id = "billing_google_notification",
    post,
    path = "/v1/webhooks/google",
    tag = "stores",
    params(
        ("Authorization" = String, Header, description = "`Bearer` and the push's Google-signed OIDC token"),
    ),
    request_body = crate::billing::google_push::PushBody,
    responses((status = 200, description = "Applied (or already applied)", body = Object)),
)]
pub async fn notification(State(state): State<AppState>, headers: HeaderMap, JsonBody(b): JsonBody<PushBody>) -> ApiResult<Json<Value>> {
    let google = state.google.as_ref().ok_or_else(unconfigured)?;
    let push = google
        .push
        .as_ref()
        .ok_or_else(|| purchases::unconfigured("Google Play notification", "TALLY_GOOGLE_PUSH_AUDIENCE, TALLY_GOOGLE_PUSH_EMAIL"))?;
    push.verify(&headers).await?;
    let n = b.notification()?;
    if n.package_name != google.play.package() {
        return Err(ApiError::Invalid("wrong_package", format!("the notification is for another app ({})", n.package_name)));
    }
    let id = b.message.id()?.to_string();
    let h = hint(&n);
    let now = state.now();
    let client = state.pool.get().await?;
    if client.query_opt("SELECT 1 FROM google_notifications WHERE message_id = $1", &[&id]).await?.is_some() {
        return Ok(Json(json!({"received": true, "id": id, "duplicate": true})));
    }
    let (_, catalog) = state.catalog.current(&client).await?;
    // What to re-read: the product named, or for a void the token as stored.
    let known = match &h.token {
        Some(t) => stored_token(&client, t).await?,
        None => None,
    };
    drop(client);
    let product = match (&h.product, &known) {
        (Some((k, p)), _) => Some((*k, p.clone().or_else(|| known.as_ref().map(|(t, _)| t.product_id.clone())))),
        (None, Some((t, _))) => Some((t.kind, Some(t.product_id.clone()))),
        (None, None) => None,
    };
    let mut outcome = match (&h.token, product) {
        (Some(token), Some((kind, p))) => match read(&google.play, kind, p.as_deref(), token, now).await {
            Ok(t) => Ok(t),
            // Google refuses the token for good: recorded, so Pub/Sub stops redelivering it.
            Err(ApiError::Invalid(code, _)) => Err(format!("ignored:{code}")),
            Err(e) => return Err(e),
        },
        (Some(_), None) => Err("ignored:unknown_purchase".to_string()),
        (None, _) if h.kind == "test" => Err("acknowledged".to_string()),
        (None, _) => Err("unhandled_type".to_string()),
    };
    let mut client = state.pool.get().await?;
    let tx = client.transaction().await?;
    let fresh = tx
        .execute(
            "INSERT INTO google_notifications (message_id, kind, purchase_token, outcome) VALUES ($1, $2, $3, 'received') ON CONFLICT DO NOTHING",
            &[&id, &h.kind, &h.token],
        )
        .await?;
    if fresh == 0 {
        drop(tx);
        return Ok(Json(json!({"received": true, "id": id, "duplicate": true})));
    }
    if let (Some((order, kind)), Some(token)) = (&h.void, &h.token) {
        tx.execute(
            "INSERT INTO google_voids (order_id, purchase_token, product_type, voided_at) VALUES ($1, $2, $3, $4) ON CONFLICT DO NOTHING",
            &[order, token, kind, &now],
        )
        .await?;
    }
    if let Ok(t) = &outcome
        && catalog.product(Store::Play, &t.product_id).is_none()
    {
        outcome = Err("ignored:unknown_product".to_string());
    }
    let mut follow = Vec::new();
    let (outcome, user) = match outcome {
        Err(o) => (o, None),
        Ok(t) => {
            let lineage = match &known {
                Some((_, l)) => l.clone(),
                None => lineage_of(&tx, &t).await?,
            };
            match purchases::notified_user(&tx, Store::Play, &lineage, t.account_token()).await? {
                None => ("ignored:unknown_user".to_string(), None),
                Some(user) => {
                    users::lock(&tx, user, &state.config.admin_subjects).await?;
                    purchases::bind(&tx, Store::Play, &lineage, user, "account_token").await?;
                    store_token(&tx, user, &lineage, &t, now).await?;
                    follow = settle(&tx, user, &lineage, &catalog, now).await?.1;
                    subscriptions::refresh(&tx, &state.user_cache, user, &catalog, now, subscriptions::grace(&state)).await?;
                    ("applied".to_string(), Some(user))
                }
            }
        }
    };
    tx.execute("UPDATE google_notifications SET outcome = $2, user_id = $3 WHERE message_id = $1", &[&id, &outcome, &user]).await?;
    tx.commit().await?;
    if let Some(u) = user {
        state.tokens.forget(u);
    }
    follow_up(&state, &google.play, follow).await;
    // SUBSCRIPTION_ON_HOLD (5) and SUBSCRIPTION_IN_GRACE_PERIOD (6): a renewal payment failed.
    if n.subscription_notification.as_ref().and_then(|s| s.notification_type).is_some_and(|t| t == 5 || t == 6) {
        crate::metrics::payment_failed("play");
    }
    tracing::info!(message = %id, kind = h.kind, %outcome, "google play notification");
    Ok(Json(json!({"received": true, "id": id, "duplicate": false, "outcome": outcome})))
}

/// The user's Google Play purchases for `GET /v1/billing`.
pub async fn payments(client: &impl GenericClient, user: Uuid) -> ApiResult<Vec<Value>> {
    Ok(client
        .query(
            "SELECT g.purchase_token, g.lineage, g.product_id, g.order_id, g.start_time, g.expiry_time, g.test, g.kind, \
               (SELECT min(v.voided_at) FROM google_voids v WHERE v.order_id = g.order_id) \
             FROM google_purchases g WHERE g.user_id = $1 ORDER BY g.start_time DESC, g.purchase_token",
            &[&user],
        )
        .await?
        .iter()
        .map(|r| {
            let voided: Option<DateTime<Utc>> = r.get(8);
            json!({"store": Store::Play, "transaction_id": r.get::<_, String>(0), "subscription_id": r.get::<_, String>(1),
                "product_id": r.get::<_, String>(2), "order_id": r.get::<_, Option<String>>(3), "date": r.get::<_, DateTime<Utc>>(4),
                "period_end": r.get::<_, Option<DateTime<Utc>>>(5), "kind": r.get::<_, String>(7),
                "status": if voided.is_some() { "refunded" } else { "paid" }, "refunded_at": voided, "sandbox": r.get::<_, bool>(6)})
        })
        .collect())
}
