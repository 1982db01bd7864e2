//! A small client for the three Stripe API calls the server makes: create a Checkout Session,
//! create a Billing Portal session, cancel a subscription. Requests are form-encoded with
//! Stripe's bracket notation, carry `Authorization: Bearer <secret key>`, the pinned
//! `Stripe-Version` and an `Idempotency-Key`, and go to a configurable base URL.

use crate::Config;
use crate::error::ApiError;
use serde_json::Value;
use std::time::Duration;

/// A failed Stripe call.
#[derive(Debug, thiserror::Error)]
pub enum StripeError {
    /// No secret key configured.
    #[error("billing is not configured on this server (TALLY_STRIPE_SECRET_KEY)")]
    NotConfigured,
    /// Stripe refused the request (4xx) with this message.
    #[error("Stripe refused the request ({0}): {1}")]
    Refused(u16, String),
    /// Network failure or a 5xx.
    #[error("Stripe is unreachable: {0}")]
    Unavailable(String),
}

impl From<StripeError> for ApiError {
    fn from(e: StripeError) -> Self {
        match e {
            StripeError::NotConfigured => crate::billing::purchases::unconfigured("Stripe", "TALLY_STRIPE_SECRET_KEY"),
            StripeError::Refused(..) => ApiError::Invalid("stripe_error", e.to_string()),
            StripeError::Unavailable(_) => ApiError::Unavailable(e.to_string()),
        }
    }
}

/// The client.
pub struct Stripe {
    http: reqwest::Client,
    base: String,
    key: Option<String>,
    version: Option<String>,
}

impl Stripe {
    /// A client for `config`.
    pub fn new(config: &Config) -> Result<Stripe, String> {
        let http = reqwest::Client::builder().timeout(Duration::from_secs(30)).build().map_err(|e| e.to_string())?;
        Ok(Stripe {
            http,
            base: config.stripe_api_base.trim_end_matches('/').to_string(),
            key: config.stripe_secret_key.clone().filter(|k| !k.is_empty()),
            version: config.stripe_api_version.clone().filter(|v| !v.is_empty()),
        })
    }

    /// Whether a secret key is configured.
    pub fn configured(&self) -> bool {
        self.key.is_some()
    }

    /// Sends `method path` with `form` and `idempotency_key`; returns Stripe's JSON object.
    pub async fn call(
        &self,
        method: reqwest::Method,
        path: &str,
        form: &[(String, String)],
        idempotency_key: &str,
    ) -> Result<Value, StripeError> {
        let key = self.key.as_ref().ok_or(StripeError::NotConfigured)?;
        let mut req = self.http.request(method, format!("{}{path}", self.base)).bearer_auth(key).header("Idempotency-Key", idempotency_key);
        if let Some(v) = &self.version {
            req = req.header("Stripe-Version", v);
        }
        if !form.is_empty() {
            req = req.form(form);
        }
        let resp = req.send().await.map_err(|e| StripeError::Unavailable(e.to_string()))?;
        let status = resp.status();
        let body: Value = resp.json().await.unwrap_or(Value::Null);
        if status.is_success() {
            return Ok(body);
        }
        let msg = body["error"]["message"].as_str().unwrap_or("no message").to_string();
        if status.is_client_error() {
            Err(StripeError::Refused(status.as_u16(), msg))
        } else {
            Err(StripeError::Unavailable(format!("HTTP {status}: {msg}")))
        }
    }
}

/// `(key, value)` pairs of a form.
pub fn pair(k: &str, v: impl Into<String>) -> (String, String) {
    (k.to_string(), v.into())
}
