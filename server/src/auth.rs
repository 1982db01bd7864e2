//! Authentication: identity-provider JWTs (HS256 shared secret, or RS256/ES256/EdDSA keys from a
//! JWKS URL), the server's own access tokens of password accounts, and `tk_…` API keys, as axum
//! extractors. A disabled account is 403 `account_disabled` here, for every route.

use crate::AppState;
use crate::access_tokens;
use crate::api_keys::{self, ApiKey};
use crate::error::ApiError;
use crate::jwks::KeySet;
use crate::users::{self, User};
use axum::extract::FromRequestParts;
use axum::http::StatusCode;
use axum::http::request::Parts;
use base64::Engine;
use jsonwebtoken::{Algorithm, DecodingKey, Validation};
use std::time::Duration;

pub use crate::users::IdClaims;

fn unauthorized(code: &'static str, msg: impl Into<String>) -> ApiError {
    ApiError::Unauthorized(code, msg.into())
}

/// Verifies identity tokens against the configured secret or JWKS.
pub struct Verifier {
    secret: Option<DecodingKey>,
    jwks: Option<KeySet>,
    issuer: Option<String>,
    audience: Option<String>,
    leeway: u64,
}

impl Verifier {
    /// A verifier for `config`'s `jwt_secret` / `jwks_url`, issuer, audience and leeway.
    pub fn new(config: &crate::Config) -> Result<Verifier, String> {
        let http = reqwest::Client::builder().timeout(Duration::from_secs(10)).build().map_err(|e| e.to_string())?;
        Ok(Verifier {
            secret: config.jwt_secret.as_ref().filter(|s| !s.is_empty()).map(|s| DecodingKey::from_secret(s.as_bytes())),
            jwks: config.jwks_url.clone().filter(|s| !s.is_empty()).map(|u| KeySet::new(u, http.clone())),
            issuer: config.jwt_issuer.clone().filter(|s| !s.is_empty()),
            audience: config.jwt_audience.clone().filter(|s| !s.is_empty()),
            leeway: config.jwt_leeway_secs,
        })
    }

    /// Verifies `token` and returns its claims; every failure is a 401 with a specific code.
    pub async fn verify(&self, token: &str) -> Result<IdClaims, ApiError> {
        let header_alg = raw_alg(token).ok_or_else(|| unauthorized("invalid_token", "the token is not a well-formed JWT"))?;
        if header_alg.eq_ignore_ascii_case("none") {
            return Err(unauthorized("unsupported_algorithm", "unsigned tokens (alg none) are refused"));
        }
        let header = jsonwebtoken::decode_header(token)
            .map_err(|_| unauthorized("unsupported_algorithm", format!("algorithm {header_alg} is not accepted")))?;
        let key = match header.alg {
            Algorithm::HS256 => match &self.secret {
                Some(k) => k.clone(),
                None => return Err(unauthorized("unsupported_algorithm", "HS256 tokens are not accepted by this server")),
            },
            Algorithm::RS256 | Algorithm::ES256 | Algorithm::EdDSA => match &self.jwks {
                Some(set) => set.key(header.kid.as_deref()).await.map_err(|e| e.into_api("identity-provider"))?,
                None => return Err(unauthorized("unsupported_algorithm", format!("{header_alg} tokens need TALLY_JWKS_URL"))),
            },
            _ => return Err(unauthorized("unsupported_algorithm", format!("algorithm {header_alg} is not accepted"))),
        };
        let mut v = Validation::new(header.alg);
        v.leeway = self.leeway;
        v.validate_nbf = true;
        v.set_required_spec_claims(&["exp", "sub"]);
        match &self.issuer {
            Some(iss) => {
                v.set_issuer(&[iss]);
                v.required_spec_claims.insert("iss".into());
            }
            None => v.iss = None,
        }
        match &self.audience {
            Some(aud) => {
                v.set_audience(&[aud]);
                v.required_spec_claims.insert("aud".into());
            }
            None => v.validate_aud = false,
        }
        use jsonwebtoken::errors::ErrorKind as K;
        let data = jsonwebtoken::decode::<IdClaims>(token, &key, &v).map_err(|e| match e.kind() {
            K::ExpiredSignature => unauthorized("token_expired", "the token has expired"),
            K::ImmatureSignature => unauthorized("token_not_yet_valid", "the token is not valid yet (nbf)"),
            K::InvalidIssuer => unauthorized("invalid_issuer", "the token's issuer is not accepted"),
            K::InvalidAudience => unauthorized("invalid_audience", "the token's audience is not accepted"),
            K::InvalidSignature => unauthorized("invalid_signature", "the token's signature does not verify"),
            K::InvalidAlgorithm | K::InvalidKeyFormat => {
                unauthorized("unsupported_algorithm", "the token's algorithm does not match its key")
            }
            K::MissingRequiredClaim(c) => unauthorized("invalid_token", format!("the token lacks the `{c}` claim")),
            _ => unauthorized("invalid_token", "the token could not be verified"),
        })?;
        if let Err(v) = tally_core::contract::subject(&data.claims.sub) {
            return Err(unauthorized("invalid_token", format!("the token's subject: {v}")));
        }
        if data.claims.sub.starts_with(tally_core::contract::PASSWORD_SUBJECT_PREFIX) {
            return Err(unauthorized(
                "reserved_subject",
                format!("identity-provider subjects must not start with {:?}", tally_core::contract::PASSWORD_SUBJECT_PREFIX),
            ));
        }
        Ok(data.claims)
    }
}

/// The `alg` of a token's header, read without trusting anything.
fn raw_alg(token: &str) -> Option<String> {
    let head = token.split('.').next()?;
    let bytes = base64::engine::general_purpose::URL_SAFE_NO_PAD.decode(head.trim_end_matches('=')).ok()?;
    let v: serde_json::Value = serde_json::from_slice(&bytes).ok()?;
    if token.split('.').count() != 3 {
        return None;
    }
    v.get("alg")?.as_str().map(str::to_string)
}

/// Who is calling: a signed-in user, or a backend with an API key.
#[derive(Debug, Clone)]
pub enum Principal {
    /// A user authenticated by an identity token.
    User(User),
    /// A backend authenticated by an API key.
    Key(ApiKey),
}

fn bearer(parts: &Parts) -> Result<&str, ApiError> {
    let h = parts
        .headers
        .get(axum::http::header::AUTHORIZATION)
        .ok_or_else(|| unauthorized("missing_token", "send Authorization: Bearer <token>"))?;
    let s = h.to_str().map_err(|_| unauthorized("invalid_token", "the Authorization header is not ASCII"))?;
    s.strip_prefix("Bearer ")
        .or_else(|| s.strip_prefix("bearer "))
        .map(str::trim)
        .filter(|t| !t.is_empty())
        .ok_or_else(|| unauthorized("missing_token", "send Authorization: Bearer <token>"))
}

impl FromRequestParts<AppState> for Principal {
    type Rejection = ApiError;
    async fn from_request_parts(parts: &mut Parts, state: &AppState) -> Result<Self, ApiError> {
        if let Some(p) = parts.extensions.get::<Principal>() {
            return Ok(p.clone());
        }
        Ok(authenticate(parts, state).await?.0)
    }
}

/// Verifies the caller's bearer (after taking its turn), caches the [`Principal`] in the
/// request, and hands back the connection a user was resolved on (`None` for an API key).
async fn authenticate(parts: &mut Parts, state: &AppState) -> Result<(Principal, Option<deadpool_postgres::Object>), ApiError> {
    let token = bearer(parts)?;
    let slot = parts.extensions.get::<crate::concurrency::TurnSlot>().cloned();
    let (principal, client) = verify_bearer(state, token, slot).await?;
    parts.extensions.insert(principal.clone());
    Ok((principal, client))
}

/// Verifies a bearer credential — an API key, a server-signed access token or an identity
/// token — and returns who it names with the connection a user was resolved on (`None` for an
/// API key): the one check of every route (and of the console's sign-in). With `slot`, the
/// caller's turn is taken before any database work.
pub async fn verify_bearer(
    state: &AppState,
    token: &str,
    slot: Option<crate::concurrency::TurnSlot>,
) -> Result<(Principal, Option<deadpool_postgres::Object>), ApiError> {
    verify_bearer_with(state, token, slot, false).await
}

/// [`verify_bearer`]; with `cached`, a user held in [`crate::user_cache`] is answered from
/// there (no connection: `None`).
async fn verify_bearer_with(
    state: &AppState,
    token: &str,
    slot: Option<crate::concurrency::TurnSlot>,
    cached: bool,
) -> Result<(Principal, Option<deadpool_postgres::Object>), ApiError> {
    // Keyed by the verified subject, or by the hash of the API key (only its holder can name
    // that lane).
    let take_turn = |key: String| async move {
        match slot {
            Some(slot) if !slot.is_held() => {
                slot.hold(state.user_limits.acquire(&key).await?);
                Ok::<(), ApiError>(())
            }
            _ => Ok(()),
        }
    };
    if token.starts_with(api_keys::PREFIX) {
        take_turn(format!("k:{}", api_keys::hash(token))).await?;
        let key = api_keys::authenticate(state, token).await?;
        state.limiter.check(&format!("k:{}", key.key_id))?;
        return Ok((Principal::Key(key), None));
    }
    let claims = if access_tokens::is_server_signed(state, token) {
        access_tokens::verify(state, token)?
    } else {
        state.verifier.verify(token).await?
    };
    take_turn(format!("s:{}", claims.sub)).await?;
    let (user, client) = match if cached { state.user_cache.get(&claims) } else { None } {
        Some(user) => (user, None),
        None => {
            let client = state.pool.get().await?;
            (users::resolve_on(state, &client, &claims).await?, Some(client))
        }
    };
    users::ensure_enabled(&user)?;
    state.limiter.check(&format!("u:{}", user.user_id))?;
    Ok((Principal::User(user), client))
}

/// A signed-in user for a read this process may answer from its caches: the user comes from
/// [`crate::user_cache`] when held there (no database round trip), else as [`AuthUser`]
/// resolves it. The same checks as every route (token, turn, disabled account, rate limit).
pub struct AuthUserCached(pub User);

impl FromRequestParts<AppState> for AuthUserCached {
    type Rejection = ApiError;
    async fn from_request_parts(parts: &mut Parts, state: &AppState) -> Result<Self, ApiError> {
        let principal = match parts.extensions.get::<Principal>() {
            Some(p) => p.clone(),
            None => {
                let token = bearer(parts)?;
                let slot = parts.extensions.get::<crate::concurrency::TurnSlot>().cloned();
                let (principal, _client) = verify_bearer_with(state, token, slot, true).await?;
                parts.extensions.insert(principal.clone());
                principal
            }
        };
        principal.into_user().map(AuthUserCached)
    }
}

impl Principal {
    /// Who this caller acts as on a user's usage ([`crate::authority`]).
    pub fn actor(&self) -> crate::authority::Actor<'static> {
        match self {
            Principal::User(_) => crate::authority::Actor::User,
            Principal::Key(k) => k.actor(),
        }
    }

    /// The user, or 401 `user_token_required` for an API key (a route that acts as a user).
    pub fn into_user(self) -> Result<User, ApiError> {
        match self {
            Principal::User(u) => Ok(u),
            Principal::Key(_) => Err(unauthorized("user_token_required", "this route needs a user's identity token, not an API key")),
        }
    }

    /// Whether this caller may use the admin routes: a user with `is_admin`, or an API key
    /// with the `admin` scope.
    pub fn is_admin(&self) -> bool {
        match self {
            Principal::User(u) => u.is_admin,
            Principal::Key(k) => k.has_scope(api_keys::SCOPE_ADMIN),
        }
    }
}

/// A signed-in user (identity token required; API keys are refused).
pub struct AuthUser(pub User);

impl FromRequestParts<AppState> for AuthUser {
    type Rejection = ApiError;
    async fn from_request_parts(parts: &mut Parts, state: &AppState) -> Result<Self, ApiError> {
        Principal::from_request_parts(parts, state).await?.into_user().map(AuthUser)
    }
}

/// An admin: a user with `is_admin`, or an API key with the `admin` scope. Another user gets
/// 403 `forbidden`, another key 403 `insufficient_scope`.
pub struct Admin(pub Principal);

impl Admin {
    /// Who acted, for audit fields (`granted_by`).
    pub fn actor(&self) -> String {
        match &self.0 {
            Principal::User(u) => u.external_id.clone().unwrap_or_else(|| u.user_id.to_string()),
            Principal::Key(k) => format!("key:{}", k.name),
        }
    }
}

impl FromRequestParts<AppState> for Admin {
    type Rejection = ApiError;
    async fn from_request_parts(parts: &mut Parts, state: &AppState) -> Result<Self, ApiError> {
        let p = Principal::from_request_parts(parts, state).await?;
        if p.is_admin() {
            return Ok(Admin(p));
        }
        Err(match p {
            Principal::User(_) => ApiError::Status(StatusCode::FORBIDDEN, "forbidden", "this route is for admins".into()),
            Principal::Key(_) => ApiError::Status(
                StatusCode::FORBIDDEN,
                "insufficient_scope",
                format!("this API key lacks the {} scope", api_keys::SCOPE_ADMIN),
            ),
        })
    }
}
