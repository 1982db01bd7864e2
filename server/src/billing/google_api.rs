//! A client of the Google Play Developer API: a service-account OAuth2 token (a JWT bearer
//! assertion signed RS256 with the account's key, posted to its `token_uri`, cached until it
//! expires), `purchases.subscriptionsv2.get`, `purchases.products.get`, acknowledging and
//! consuming. Google's answers map to [`PlayError`]: an unknown purchase token is the caller's
//! mistake, Google being down or slow is retryable.

use crate::error::ApiError;
use chrono::{DateTime, Duration, Utc};
use jsonwebtoken::{Algorithm, EncodingKey, Header};
use serde::Deserialize;
use serde_json::Value;
use std::path::Path;

/// Google's Play Developer API host.
pub const DEFAULT_API_BASE: &str = "https://androidpublisher.googleapis.com";
/// Google's keys signing OIDC tokens (Pub/Sub push authentication).
pub const DEFAULT_PUSH_JWKS_URL: &str = "https://www.googleapis.com/oauth2/v3/certs";
/// The OAuth2 scope of the Play Developer API.
pub const SCOPE: &str = "https://www.googleapis.com/auth/androidpublisher";
/// Longest wait for one call to Google.
pub const TIMEOUT: std::time::Duration = std::time::Duration::from_secs(10);

/// Why a call to Google failed.
#[derive(Debug, thiserror::Error)]
pub enum PlayError {
    /// Google does not know the purchase token (404, 410).
    #[error("Google Play does not know this purchase token")]
    UnknownToken,
    /// Google refused the purchase token or product as malformed (400).
    #[error("Google Play refused the purchase token: {0}")]
    BadToken(String),
    /// Google refused our service account (401, 403): a configuration problem of this server.
    #[error("Google Play refused this server's service account: {0}")]
    Credentials(String),
    /// Google failed, timed out or answered something unreadable: retry later.
    #[error("Google Play is unavailable: {0}")]
    Unavailable(String),
}

impl From<PlayError> for ApiError {
    fn from(e: PlayError) -> Self {
        match e {
            PlayError::UnknownToken => ApiError::Invalid("unknown_purchase_token", e.to_string()),
            PlayError::BadToken(_) => ApiError::Invalid("invalid_purchase_token", e.to_string()),
            PlayError::Credentials(_) => {
                tracing::error!(error = %e, "Google Play credentials");
                ApiError::Unavailable(e.to_string())
            }
            PlayError::Unavailable(_) => ApiError::Unavailable(e.to_string()),
        }
    }
}

/// The fields of a service-account key file this client uses.
#[derive(Deserialize)]
struct KeyFile {
    client_email: String,
    private_key: String,
    token_uri: String,
    #[serde(default)]
    private_key_id: Option<String>,
}

/// An access token and when it stops being used.
type Cached = Option<(String, DateTime<Utc>)>;

/// The Play Developer API of one app, as one service account.
pub struct Play {
    package: String,
    api_base: reqwest::Url,
    client_email: String,
    token_uri: String,
    key_id: Option<String>,
    key: EncodingKey,
    http: reqwest::Client,
    token: tokio::sync::Mutex<Cached>,
}

/// `purchases.subscriptionsv2` (the fields read).
#[derive(Debug, Clone, Default, Deserialize, PartialEq, Eq)]
#[serde(rename_all = "camelCase")]
pub struct SubscriptionV2 {
    /// `SUBSCRIPTION_STATE_*`.
    #[serde(default)]
    pub subscription_state: Option<String>,
    /// The products subscribed (one for a plain subscription).
    #[serde(default)]
    pub line_items: Vec<LineItem>,
    /// When the subscription was granted.
    #[serde(default)]
    pub start_time: Option<DateTime<Utc>>,
    /// The order of the latest charge (`GPA.…..N` for the N-th renewal); deprecated by Google
    /// for the line item's `latestSuccessfulOrderId`, read when this is absent.
    #[serde(default)]
    pub latest_order_id: Option<String>,
    /// The purchase token this one replaced (upgrade, downgrade, resubscribe).
    #[serde(default)]
    pub linked_purchase_token: Option<String>,
    /// Present on a license tester's purchase.
    #[serde(default)]
    pub test_purchase: Option<Value>,
    /// `ACKNOWLEDGEMENT_STATE_PENDING` or `…_ACKNOWLEDGED`.
    #[serde(default)]
    pub acknowledgement_state: Option<String>,
    /// The ids the app set at purchase.
    #[serde(default)]
    pub external_account_identifiers: Option<ExternalIds>,
}

/// One product of a subscription.
#[derive(Debug, Clone, Default, Deserialize, PartialEq, Eq)]
#[serde(rename_all = "camelCase")]
pub struct LineItem {
    /// The subscription's product id.
    pub product_id: String,
    /// When access ends (the end of the grace period while in grace).
    #[serde(default)]
    pub expiry_time: Option<DateTime<Utc>>,
    /// Set for an auto-renewing plan.
    #[serde(default)]
    pub auto_renewing_plan: Option<AutoRenewingPlan>,
    /// The current offer phase (`freeTrial`, `introductoryPrice`, `basePrice`, …).
    #[serde(default)]
    pub offer_phase: Option<Value>,
    /// The order of the item's latest successful charge.
    #[serde(default)]
    pub latest_successful_order_id: Option<String>,
}

/// An auto-renewing plan.
#[derive(Debug, Clone, Default, Deserialize, PartialEq, Eq)]
#[serde(rename_all = "camelCase")]
pub struct AutoRenewingPlan {
    /// Whether it renews at the period end.
    #[serde(default)]
    pub auto_renew_enabled: Option<bool>,
}

/// The ids an app attached to a purchase.
#[derive(Debug, Clone, Default, Deserialize, PartialEq, Eq)]
#[serde(rename_all = "camelCase")]
pub struct ExternalIds {
    /// `setObfuscatedAccountId` of Play Billing: the account token.
    #[serde(default)]
    pub obfuscated_external_account_id: Option<String>,
}

/// `purchases.products` (the fields read).
#[derive(Debug, Clone, Default, Deserialize, PartialEq, Eq)]
#[serde(rename_all = "camelCase")]
pub struct ProductPurchase {
    /// Milliseconds since the epoch, as a string.
    #[serde(default)]
    pub purchase_time_millis: Option<String>,
    /// 0 purchased, 1 canceled (refunded), 2 pending.
    #[serde(default)]
    pub purchase_state: Option<i64>,
    /// 0 not consumed yet, 1 consumed.
    #[serde(default)]
    pub consumption_state: Option<i64>,
    /// 0 not acknowledged yet, 1 acknowledged.
    #[serde(default)]
    pub acknowledgement_state: Option<i64>,
    /// The order.
    #[serde(default)]
    pub order_id: Option<String>,
    /// 0 for a license tester's purchase.
    #[serde(default)]
    pub purchase_type: Option<i64>,
    /// `setObfuscatedAccountId` of Play Billing: the account token.
    #[serde(default)]
    pub obfuscated_external_account_id: Option<String>,
}

impl ProductPurchase {
    /// Reads the answer of `purchases.products.get`.
    pub fn from_answer(v: Value) -> Result<ProductPurchase, PlayError> {
        serde_json::from_value(v).map_err(|e| unavailable(format!("unreadable product purchase: {e}")))
    }

    /// When it was bought.
    pub fn purchased_at(&self) -> Option<DateTime<Utc>> {
        self.purchase_time_millis.as_deref()?.parse::<i64>().ok().and_then(DateTime::from_timestamp_millis)
    }
}

impl SubscriptionV2 {
    /// Reads the answer of `purchases.subscriptionsv2.get`.
    pub fn from_answer(v: Value) -> Result<SubscriptionV2, PlayError> {
        serde_json::from_value(v).map_err(|e| unavailable(format!("unreadable subscription: {e}")))
    }

    /// The app's account token.
    pub fn account_id(&self) -> Option<&str> {
        self.external_account_identifiers.as_ref()?.obfuscated_external_account_id.as_deref()
    }
}

/// Reads an answer of the Play Developer API with HTTP status `status` and body `text`: its
/// JSON (`null` when empty) on success, else the error the status means (with Google's
/// `error.message`).
pub fn read_answer(status: u16, text: &str) -> Result<Value, PlayError> {
    let message =
        || serde_json::from_str::<Value>(text).ok().and_then(|v| v["error"]["message"].as_str().map(str::to_string)).unwrap_or_default();
    match status {
        200..=299 if text.trim().is_empty() => Ok(Value::Null),
        200..=299 => serde_json::from_str(text).map_err(|e| unavailable(format!("unreadable answer: {e}"))),
        404 | 410 => Err(PlayError::UnknownToken),
        400 => Err(PlayError::BadToken(message())),
        401 | 403 => Err(PlayError::Credentials(message())),
        s => Err(unavailable(format!("{s} {}", message()))),
    }
}

fn unavailable(e: impl std::fmt::Display) -> PlayError {
    PlayError::Unavailable(e.to_string())
}

impl Play {
    /// The client of `TALLY_GOOGLE_*`; `None` when Google Play is not configured (no service
    /// account file or no package name).
    pub fn from_config(config: &crate::Config) -> Result<Option<Play>, String> {
        let (Some(file), Some(package)) =
            (&config.google_service_account_file, config.google_package_name.clone().filter(|p| !p.is_empty()))
        else {
            return Ok(None);
        };
        Play::new(file, package, &config.google_api_base).map(Some)
    }

    /// A client of `package` as the service account in `key_file`, calling `api_base`.
    pub fn new(key_file: &Path, package: String, api_base: &str) -> Result<Play, String> {
        let text = std::fs::read_to_string(key_file).map_err(|e| format!("{}: {e}", key_file.display()))?;
        let k: KeyFile =
            serde_json::from_str(&text).map_err(|e| format!("{}: not a Google service-account key file: {e}", key_file.display()))?;
        let key = EncodingKey::from_rsa_pem(k.private_key.as_bytes())
            .map_err(|e| format!("{}: private_key is not an RSA key in PEM: {e}", key_file.display()))?;
        let base = format!("{}/", api_base.trim_end_matches('/'));
        let api_base = reqwest::Url::parse(&base).map_err(|e| format!("TALLY_GOOGLE_API_BASE {api_base:?}: {e}"))?;
        let http = reqwest::Client::builder()
            .timeout(TIMEOUT)
            .connect_timeout(std::time::Duration::from_secs(5))
            .build()
            .map_err(|e| e.to_string())?;
        Ok(Play {
            package,
            api_base,
            client_email: k.client_email,
            token_uri: k.token_uri,
            key_id: k.private_key_id,
            key,
            http,
            token: tokio::sync::Mutex::new(None),
        })
    }

    /// The app's package name.
    pub fn package(&self) -> &str {
        &self.package
    }

    /// A valid access token: the cached one, else a new one for a freshly signed assertion.
    async fn access_token(&self, now: DateTime<Utc>) -> Result<String, PlayError> {
        let mut cached = self.token.lock().await;
        if let Some((t, until)) = cached.as_ref().filter(|(_, until)| now < *until) {
            let _ = until;
            return Ok(t.clone());
        }
        let iat = now.timestamp();
        let claims = serde_json::json!({"iss": self.client_email, "scope": SCOPE, "aud": self.token_uri, "iat": iat, "exp": iat + 3600});
        let mut header = Header::new(Algorithm::RS256);
        header.kid = self.key_id.clone();
        let assertion = jsonwebtoken::encode(&header, &claims, &self.key).map_err(|e| PlayError::Credentials(e.to_string()))?;
        let resp = self
            .http
            .post(&self.token_uri)
            .form(&[("grant_type", "urn:ietf:params:oauth:grant-type:jwt-bearer"), ("assertion", assertion.as_str())])
            .send()
            .await
            .map_err(unavailable)?;
        let status = resp.status();
        let body: Value = resp.json().await.unwrap_or(Value::Null);
        if status.is_server_error() {
            return Err(unavailable(format!("the token endpoint answered {status}")));
        }
        let token = body["access_token"].as_str().filter(|_| status.is_success()).ok_or_else(|| {
            PlayError::Credentials(format!("the token endpoint answered {status}: {}", body["error_description"].as_str().unwrap_or("")))
        })?;
        let ttl = body["expires_in"].as_i64().unwrap_or(3600).clamp(60, 86_400);
        *cached = Some((token.to_string(), now + Duration::seconds(ttl - 60)));
        Ok(token.to_string())
    }

    /// `…/applications/{package}/purchases/{path…}`, each segment percent-encoded.
    fn url(&self, path: &[&str]) -> reqwest::Url {
        let mut u = self.api_base.clone();
        if let Ok(mut s) = u.path_segments_mut() {
            s.pop_if_empty().extend(["androidpublisher", "v3", "applications", self.package.as_str(), "purchases"]).extend(path);
        }
        u
    }

    async fn call(&self, method: reqwest::Method, path: &[&str], now: DateTime<Utc>) -> Result<Value, PlayError> {
        let token = self.access_token(now).await?;
        let mut req = self.http.request(method.clone(), self.url(path)).bearer_auth(&token);
        if method == reqwest::Method::POST {
            req = req.json(&serde_json::json!({}));
        }
        let resp = req.send().await.map_err(unavailable)?;
        let status = resp.status().as_u16();
        let text = resp.text().await.map_err(unavailable)?;
        let answer = read_answer(status, &text);
        if matches!(answer, Err(PlayError::Credentials(_))) {
            *self.token.lock().await = None;
        }
        answer
    }

    /// `purchases.subscriptionsv2.get`.
    pub async fn subscription(&self, token: &str, now: DateTime<Utc>) -> Result<SubscriptionV2, PlayError> {
        SubscriptionV2::from_answer(self.call(reqwest::Method::GET, &["subscriptionsv2", "tokens", token], now).await?)
    }

    /// `purchases.products.get`.
    pub async fn product(&self, product_id: &str, token: &str, now: DateTime<Utc>) -> Result<ProductPurchase, PlayError> {
        ProductPurchase::from_answer(self.call(reqwest::Method::GET, &["products", product_id, "tokens", token], now).await?)
    }

    /// `purchases.subscriptions.acknowledge`.
    pub async fn acknowledge_subscription(&self, product_id: &str, token: &str, now: DateTime<Utc>) -> Result<(), PlayError> {
        let last = format!("{token}:acknowledge");
        self.call(reqwest::Method::POST, &["subscriptions", product_id, "tokens", &last], now).await.map(drop)
    }

    /// `purchases.products.acknowledge`.
    pub async fn acknowledge_product(&self, product_id: &str, token: &str, now: DateTime<Utc>) -> Result<(), PlayError> {
        let last = format!("{token}:acknowledge");
        self.call(reqwest::Method::POST, &["products", product_id, "tokens", &last], now).await.map(drop)
    }

    /// `purchases.products.consume` (a credit pack may be bought again).
    pub async fn consume_product(&self, product_id: &str, token: &str, now: DateTime<Utc>) -> Result<(), PlayError> {
        let last = format!("{token}:consume");
        self.call(reqwest::Method::POST, &["products", product_id, "tokens", &last], now).await.map(drop)
    }
}
