//! Access tokens of password accounts: EdDSA JWTs signed with the server's keys, header
//! `typ: at+jwt`, audience `tally-api`, issuer `TALLY_PUBLIC_URL` (or `tally`), living
//! `TALLY_ACCESS_TOKEN_TTL_SECS`. They are the only server-signed token accepted as a
//! credential: an entitlements token (the same keys, `typ: JWT`, audience `tally`) is refused.

use crate::error::{ApiError, ApiResult};
use crate::signing::Signer;
use crate::users::IdClaims;
use crate::{AppState, Config};
use chrono::{DateTime, Utc};
use jsonwebtoken::{Algorithm, Validation};
use serde::{Deserialize, Serialize};
use uuid::Uuid;

/// Header `typ` of access tokens.
pub const TYP: &str = "at+jwt";
/// Audience of access tokens.
pub const AUDIENCE: &str = "tally-api";

/// Claims of an access token.
#[derive(Debug, Serialize, Deserialize)]
struct AccessClaims {
    iss: String,
    aud: String,
    sub: String,
    iat: i64,
    exp: i64,
    jti: Uuid,
}

/// The subject of the password account `user_id`: `tally|<user id>`.
pub fn subject(user_id: Uuid) -> String {
    format!("{}{user_id}", tally_core::contract::PASSWORD_SUBJECT_PREFIX)
}

/// Signs an access token for `user_id`; returns it with its lifetime in seconds.
pub fn issue(state: &AppState, user_id: Uuid) -> ApiResult<(String, u64)> {
    let ttl = state.config.access_token_ttl_secs.max(1);
    let now = state.now().timestamp();
    let claims = AccessClaims {
        iss: state.config.access_token_issuer(),
        aud: AUDIENCE.into(),
        sub: subject(user_id),
        iat: now,
        exp: now.saturating_add(i64::try_from(ttl).unwrap_or(i64::MAX)),
        jti: Uuid::new_v4(),
    };
    let token = state.signer.sign_typed(&claims, TYP).map_err(ApiError::internal)?;
    Ok((token, ttl))
}

/// Whether `token` names one of the server's own signing keys (so it must be an access token,
/// and is never checked as an identity-provider token).
pub fn is_server_signed(state: &AppState, token: &str) -> bool {
    jsonwebtoken::decode_header(token).ok().and_then(|h| h.kid).is_some_and(|kid| state.signer.decoding_key(&kid).is_some())
}

fn unauthorized(code: &'static str, msg: &str) -> ApiError {
    ApiError::Unauthorized(code, msg.into())
}

/// Verifies a server-signed token as an access token: `typ: at+jwt`, EdDSA, audience
/// `tally-api`, our issuer, not expired by the server's clock. An entitlements token is 401
/// `not_an_access_token`.
pub fn verify(state: &AppState, token: &str) -> ApiResult<IdClaims> {
    verify_with(&state.signer, &state.config, state.now(), token)
}

/// [`verify`] with the server's signing keys, configuration and time given.
pub fn verify_with(signer: &Signer, config: &Config, now: DateTime<Utc>, token: &str) -> ApiResult<IdClaims> {
    let header = jsonwebtoken::decode_header(token).map_err(|_| unauthorized("invalid_token", "the token is not a well-formed JWT"))?;
    if !header.typ.as_deref().is_some_and(|t| t.eq_ignore_ascii_case(TYP)) {
        return Err(unauthorized("not_an_access_token", "an entitlements token is not a credential; send an access token"));
    }
    if !config.password_auth {
        return Err(unauthorized("password_auth_disabled", "password accounts are not enabled on this server"));
    }
    let key = header
        .kid
        .as_deref()
        .and_then(|kid| signer.decoding_key(kid))
        .ok_or_else(|| unauthorized("unknown_key", "no signing key matches the token's kid"))?;
    let mut v = Validation::new(Algorithm::EdDSA);
    v.set_audience(&[AUDIENCE]);
    v.set_issuer(&[config.access_token_issuer()]);
    v.set_required_spec_claims(&["exp", "sub", "iss", "aud"]);
    // Expiry is judged by the server's clock below.
    v.validate_exp = false;
    use jsonwebtoken::errors::ErrorKind as K;
    let data = jsonwebtoken::decode::<AccessClaims>(token, &key, &v).map_err(|e| match e.kind() {
        K::InvalidIssuer => unauthorized("invalid_issuer", "the token's issuer is not accepted"),
        K::InvalidAudience => unauthorized("invalid_audience", "the token's audience is not accepted"),
        K::InvalidSignature => unauthorized("invalid_signature", "the token's signature does not verify"),
        _ => unauthorized("invalid_token", "the token could not be verified"),
    })?;
    let now = now.timestamp();
    let leeway = i64::try_from(config.jwt_leeway_secs).unwrap_or(0);
    if data.claims.exp.saturating_add(leeway) < now {
        return Err(unauthorized("token_expired", "the access token has expired; refresh it"));
    }
    if !data.claims.sub.starts_with(tally_core::contract::PASSWORD_SUBJECT_PREFIX) {
        return Err(unauthorized("invalid_token", "the token's subject is not a password account"));
    }
    Ok(IdClaims { sub: data.claims.sub, email: None, email_verified: None, iat: Some(data.claims.iat), name: None })
}
