//! A JWKS fetched from a URL and cached: the keys of an identity provider, or Google's keys
//! signing Pub/Sub push tokens.

use crate::error::ApiError;
use jsonwebtoken::DecodingKey;
use jsonwebtoken::jwk::JwkSet;
use std::time::{Duration, Instant};
use tokio::sync::RwLock;

/// How often an unknown `kid` may refetch the set.
pub const REFETCH_EVERY: Duration = Duration::from_secs(10);

/// The keys at one JWKS URL, refetched when a token names a key the cached set lacks.
pub struct KeySet {
    url: String,
    cached: RwLock<Option<(JwkSet, Instant)>>,
    http: reqwest::Client,
}

/// Why no key was found.
#[derive(Debug)]
pub enum KeyError {
    /// The set could not be fetched or read (retry later).
    Unavailable(String),
    /// No key of the set matches the token's `kid`.
    Unknown,
}

impl KeySet {
    /// The set at `url`, fetched with `http` on first use.
    pub fn new(url: String, http: reqwest::Client) -> KeySet {
        KeySet { url, cached: RwLock::new(None), http }
    }

    async fn fetch(&self) -> Result<JwkSet, KeyError> {
        let resp = self.http.get(&self.url).send().await.map_err(|e| KeyError::Unavailable(format!("fetching the JWKS: {e}")))?;
        resp.json::<JwkSet>().await.map_err(|e| KeyError::Unavailable(format!("reading the JWKS: {e}")))
    }

    /// The key with `kid` (or the only key when the token names none), refetching the set (at
    /// most every [`REFETCH_EVERY`]) when it is unknown.
    pub async fn key(&self, kid: Option<&str>) -> Result<DecodingKey, KeyError> {
        let find = |set: &JwkSet| -> Option<DecodingKey> {
            let jwk = match kid {
                Some(k) => set.find(k)?,
                None if set.keys.len() == 1 => set.keys.first()?,
                None => return None,
            };
            DecodingKey::from_jwk(jwk).ok()
        };
        {
            let cached = self.cached.read().await;
            if let Some((set, at)) = cached.as_ref() {
                if let Some(k) = find(set) {
                    return Ok(k);
                }
                if at.elapsed() < REFETCH_EVERY {
                    return Err(KeyError::Unknown);
                }
            }
        }
        let set = self.fetch().await?;
        let key = find(&set);
        *self.cached.write().await = Some((set, Instant::now()));
        key.ok_or(KeyError::Unknown)
    }
}

impl KeyError {
    /// The API error: 503 when the set is unavailable, else a 401 `unknown_key` naming `whose`
    /// keys were searched.
    pub fn into_api(self, whose: &str) -> ApiError {
        match self {
            KeyError::Unavailable(m) => ApiError::Unavailable(m),
            KeyError::Unknown => ApiError::Unauthorized("unknown_key", format!("no {whose} key matches the token's kid")),
        }
    }
}
