//! Verifying the server's signed entitlements token (EdDSA JWT with a `kid` header).

use crate::entitlements::EntitlementClaims;
use crate::error::{Error, Result};
use jsonwebtoken::jwk::JwkSet;
use jsonwebtoken::{Algorithm, DecodingKey, Validation, decode, decode_header};

/// Issuer and audience of entitlements tokens.
pub const TOKEN_ISSUER: &str = "tally";
/// Audience of entitlements tokens.
pub const TOKEN_AUDIENCE: &str = "tally";

/// Verifies `token` against the key set `jwks` (JSON Web Key Set) and checks that it was issued
/// to `subject`. Expiry is *not* checked here: the caller applies its grace period to `exp`.
pub fn verify(token: &str, jwks: &str, subject: &str) -> Result<EntitlementClaims> {
    let set: JwkSet = serde_json::from_str(jwks).map_err(|e| Error::InvalidToken(format!("malformed key set: {e}")))?;
    let header = decode_header(token).map_err(|e| Error::InvalidToken(format!("malformed token: {e}")))?;
    if header.alg != Algorithm::EdDSA {
        return Err(Error::InvalidToken(format!("unexpected algorithm {:?}", header.alg)));
    }
    let kid = header.kid.ok_or_else(|| Error::InvalidToken("token has no kid".into()))?;
    let jwk = set.find(&kid).ok_or_else(|| Error::InvalidToken(format!("unknown signing key {kid:?}")))?;
    let key = DecodingKey::from_jwk(jwk).map_err(|e| Error::InvalidToken(format!("unusable key {kid:?}: {e}")))?;
    let mut v = Validation::new(Algorithm::EdDSA);
    v.validate_exp = false;
    v.set_required_spec_claims(&["exp", "sub", "iat"]);
    v.set_audience(&[TOKEN_AUDIENCE]);
    v.set_issuer(&[TOKEN_ISSUER]);
    let data = decode::<EntitlementClaims>(token, &key, &v).map_err(|e| Error::InvalidToken(e.to_string()))?;
    if data.claims.sub != subject {
        return Err(Error::InvalidToken("token was issued to another subject".into()));
    }
    Ok(data.claims)
}
