//! Pub/Sub push of Google Play's Real-time Developer Notifications: the push's OIDC token
//! (RS256 against Google's JWKS, the configured audience and service-account email, verified
//! email) and the notification inside the message (`message.data`, base64 JSON).

use crate::error::{ApiError, ApiResult};
use crate::jwks::KeySet;
use axum::http::HeaderMap;
use base64::Engine;
use jsonwebtoken::{Algorithm, Validation};
use serde::Deserialize;

/// Issuers of Google's OIDC tokens.
pub const ISSUERS: &[&str] = &["https://accounts.google.com", "accounts.google.com"];

/// Verifies the OIDC tokens Pub/Sub attaches to its pushes.
pub struct PushVerifier {
    keys: KeySet,
    audience: String,
    email: String,
    leeway: u64,
}

#[derive(Deserialize)]
struct PushClaims {
    #[serde(default)]
    email: Option<String>,
    #[serde(default)]
    email_verified: Option<bool>,
}

fn refused(code: &'static str, msg: &str) -> ApiError {
    ApiError::Unauthorized(code, format!("push refused: {msg}"))
}

impl PushVerifier {
    /// The verifier of `TALLY_GOOGLE_PUSH_*`; `None` when the audience or the email is not set.
    pub fn from_config(config: &crate::Config) -> Result<Option<PushVerifier>, String> {
        let audience = config.google_push_audience.clone().filter(|a| !a.is_empty());
        let email = config.google_push_email.clone().filter(|e| !e.is_empty());
        let (Some(audience), Some(email)) = (audience, email) else { return Ok(None) };
        let http = reqwest::Client::builder().timeout(super::google_api::TIMEOUT).build().map_err(|e| e.to_string())?;
        Ok(Some(PushVerifier {
            keys: KeySet::new(config.google_push_jwks_url.clone(), http),
            audience,
            email,
            leeway: config.jwt_leeway_secs,
        }))
    }

    /// Verifies the `Authorization: Bearer` token of a push; every failure is a 401 naming it.
    pub async fn verify(&self, headers: &HeaderMap) -> ApiResult<()> {
        let token = headers
            .get(axum::http::header::AUTHORIZATION)
            .and_then(|v| v.to_str().ok())
            .and_then(|v| v.strip_prefix("Bearer ").or_else(|| v.strip_prefix("bearer ")))
            .map(str::trim)
            .filter(|t| !t.is_empty())
            .ok_or_else(|| refused("missing_token", "no Authorization: Bearer token (enable authentication on the push subscription)"))?;
        let header = jsonwebtoken::decode_header(token).map_err(|_| refused("invalid_token", "the token is not a well-formed JWT"))?;
        if header.alg != Algorithm::RS256 {
            return Err(refused("unsupported_algorithm", "push tokens are RS256"));
        }
        let key = self.keys.key(header.kid.as_deref()).await.map_err(|e| e.into_api("Google push"))?;
        let mut v = Validation::new(Algorithm::RS256);
        v.leeway = self.leeway;
        v.set_audience(&[&self.audience]);
        v.set_issuer(ISSUERS);
        v.set_required_spec_claims(&["exp", "aud", "iss"]);
        use jsonwebtoken::errors::ErrorKind as K;
        let data = jsonwebtoken::decode::<PushClaims>(token, &key, &v).map_err(|e| match e.kind() {
            K::ExpiredSignature => refused("token_expired", "the token has expired"),
            K::InvalidAudience => refused("invalid_audience", "the token's audience is not TALLY_GOOGLE_PUSH_AUDIENCE"),
            K::InvalidIssuer => refused("invalid_issuer", "the token was not issued by Google"),
            K::InvalidSignature => refused("invalid_signature", "the token's signature does not verify"),
            K::MissingRequiredClaim(_) => refused("invalid_token", "the token lacks exp, aud or iss"),
            _ => refused("invalid_token", "the token could not be verified"),
        })?;
        if data.claims.email.as_deref() != Some(self.email.as_str()) || data.claims.email_verified != Some(true) {
            return Err(refused("wrong_email", "the token's verified email is not TALLY_GOOGLE_PUSH_EMAIL"));
        }
        Ok(())
    }
}

/// Body of a Pub/Sub push. Fields Pub/Sub adds later are ignored.
#[derive(Debug, Deserialize, utoipa::ToSchema)]
pub struct PushBody {
    /// The message.
    pub message: PushMessage,
    /// The push subscription's name.
    #[serde(default)]
    pub subscription: Option<String>,
    /// How many times Pub/Sub tried to deliver the message (subscriptions with a dead-letter
    /// policy).
    #[serde(default, rename = "deliveryAttempt")]
    pub delivery_attempt: Option<i64>,
}

/// One Pub/Sub message. A push carries its id and publish time under both spellings
/// (`messageId` and `message_id`, `publishTime` and `publish_time`); either alone is taken too.
#[derive(Debug, Deserialize, utoipa::ToSchema)]
pub struct PushMessage {
    /// Base64 of the notification.
    #[serde(default)]
    pub data: Option<String>,
    /// The publisher's attributes.
    #[serde(default)]
    pub attributes: Option<std::collections::HashMap<String, String>>,
    /// Pub/Sub's id of the message (a redelivery keeps it).
    #[serde(default, rename = "messageId")]
    pub message_id: Option<String>,
    /// The same id, in the snake-case spelling Pub/Sub also sends.
    #[serde(default, rename = "message_id")]
    pub message_id_snake_case: Option<String>,
    /// When Pub/Sub received the message (RFC 3339).
    #[serde(default, rename = "publishTime")]
    pub publish_time: Option<String>,
    /// The same time, in the snake-case spelling Pub/Sub also sends.
    #[serde(default, rename = "publish_time")]
    pub publish_time_snake_case: Option<String>,
    /// The ordering key (empty unless the publisher orders messages).
    #[serde(default, rename = "orderingKey")]
    pub ordering_key: Option<String>,
}

/// The one value of a field sent under two spellings; 400 `invalid_notification` when the two
/// disagree.
fn one_spelling<'a>(names: [&str; 2], camel: Option<&'a str>, snake: Option<&'a str>) -> ApiResult<Option<&'a str>> {
    match (camel, snake) {
        (Some(a), Some(b)) if a != b => Err(bad(format!("message.{} ({a:?}) and message.{} ({b:?}) disagree", names[0], names[1]))),
        (a, b) => Ok(a.or(b)),
    }
}

impl PushMessage {
    /// The message id, under either spelling; 400 `invalid_notification` when it is missing,
    /// too long, or its two spellings disagree.
    pub fn id(&self) -> ApiResult<&str> {
        let id = one_spelling(["messageId", "message_id"], self.message_id.as_deref(), self.message_id_snake_case.as_deref())?
            .ok_or_else(|| bad("the message has no messageId"))?;
        if id.is_empty() || id.len() > 128 {
            return Err(bad("message.messageId must hold 1 to 128 characters"));
        }
        Ok(id)
    }

    /// The publish time as sent, under either spelling; 400 `invalid_notification` when its two
    /// spellings disagree.
    pub fn published(&self) -> ApiResult<Option<&str>> {
        one_spelling(["publishTime", "publish_time"], self.publish_time.as_deref(), self.publish_time_snake_case.as_deref())
    }
}

/// A Real-time Developer Notification (`DeveloperNotification`).
#[derive(Debug, Clone, Deserialize, PartialEq, Eq)]
#[serde(rename_all = "camelCase")]
pub struct Rtdn {
    /// The app.
    pub package_name: String,
    /// A subscription changed.
    #[serde(default)]
    pub subscription_notification: Option<SubscriptionNotification>,
    /// A one-time product was bought or canceled.
    #[serde(default)]
    pub one_time_product_notification: Option<ProductNotification>,
    /// An order was voided (refund, chargeback).
    #[serde(default)]
    pub voided_purchase_notification: Option<VoidedNotification>,
    /// Sent from the Play Console.
    #[serde(default)]
    pub test_notification: Option<serde_json::Value>,
}

/// `subscriptionNotification`.
#[derive(Debug, Clone, Deserialize, PartialEq, Eq)]
#[serde(rename_all = "camelCase")]
pub struct SubscriptionNotification {
    /// `SUBSCRIPTION_RENEWED` (2), `…_IN_GRACE_PERIOD` (6), … (recorded, not trusted).
    #[serde(default)]
    pub notification_type: Option<i64>,
    /// The purchase token.
    pub purchase_token: String,
    /// The subscription's product id (absent in newer notifications: read from the API).
    #[serde(default)]
    pub subscription_id: Option<String>,
}

/// `oneTimeProductNotification`.
#[derive(Debug, Clone, Deserialize, PartialEq, Eq)]
#[serde(rename_all = "camelCase")]
pub struct ProductNotification {
    /// 1 purchased, 2 canceled.
    #[serde(default)]
    pub notification_type: Option<i64>,
    /// The purchase token.
    pub purchase_token: String,
    /// The product id.
    pub sku: String,
}

/// `voidedPurchaseNotification`.
#[derive(Debug, Clone, Deserialize, PartialEq, Eq)]
#[serde(rename_all = "camelCase")]
pub struct VoidedNotification {
    /// The purchase token.
    pub purchase_token: String,
    /// The voided order.
    pub order_id: String,
    /// 1 subscription, 2 one-time product.
    #[serde(default)]
    pub product_type: Option<i32>,
}

fn bad(msg: impl Into<String>) -> ApiError {
    ApiError::BadRequest("invalid_notification", msg.into())
}

impl PushBody {
    /// The notification in `message.data`; 400 `invalid_notification` when it is not one (or
    /// the message's id or publish time is missing, malformed or given twice, differently).
    pub fn notification(&self) -> ApiResult<Rtdn> {
        self.message.id()?;
        self.message.published()?;
        let data = self.message.data.as_deref().ok_or_else(|| bad("the message has no data"))?;
        let bytes = base64::engine::general_purpose::STANDARD
            .decode(data.trim())
            .or_else(|_| base64::engine::general_purpose::URL_SAFE.decode(data.trim()))
            .map_err(|_| bad("message.data is not base64"))?;
        let n: Rtdn = serde_json::from_slice(&bytes).map_err(|e| bad(format!("message.data is not a Play developer notification: {e}")))?;
        let tokens = [
            n.subscription_notification.as_ref().map(|s| s.purchase_token.as_str()),
            n.one_time_product_notification.as_ref().map(|s| s.purchase_token.as_str()),
            n.voided_purchase_notification.as_ref().map(|s| s.purchase_token.as_str()),
        ];
        if tokens.iter().flatten().any(|t| t.is_empty() || t.len() > super::google::MAX_TOKEN_LEN) {
            return Err(bad("the notification's purchase token is empty or too long"));
        }
        Ok(n)
    }
}
