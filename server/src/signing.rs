//! Ed25519 keys that sign entitlements tokens and access tokens (EdDSA JWTs with a `kid` header).
//!
//! Keys live as PKCS#8 PEM files `<kid>.pem` in `<data dir>/keys/`; the newest signs, all are
//! published in `GET /v1/keys`, so a key can be rotated without invalidating devices' tokens.

use base64::Engine;
use ed25519_dalek::SigningKey;
use ed25519_dalek::pkcs8::{DecodePrivateKey, EncodePrivateKey};
use jsonwebtoken::DecodingKey;
use serde::Serialize;
use serde_json::{Value, json};
use std::path::Path;

struct Key {
    kid: String,
    /// The parsed key (with its public half): signing derives nothing per token.
    signing: SigningKey,
    public: [u8; 32],
}

/// The signing keys: the newest signs, every one verifies.
pub struct Signer {
    keys: Vec<Key>,
}

/// Writes a new key pair into `dir`; returns its kid. It becomes the signing key.
pub fn keygen(dir: &Path) -> Result<String, String> {
    std::fs::create_dir_all(dir).map_err(|e| format!("creating {}: {e}", dir.display()))?;
    let key = SigningKey::from_bytes(&rand::random::<[u8; 32]>());
    let pem = key.to_pkcs8_pem(Default::default()).map_err(|e| e.to_string())?;
    let kid = format!("{}-{}", chrono::Utc::now().format("%Y%m%d%H%M%S"), hex::encode(&key.verifying_key().as_bytes()[..4]));
    let path = dir.join(format!("{kid}.pem"));
    write_private(&path, pem.as_bytes()).map_err(|e| format!("writing {}: {e}", path.display()))?;
    Ok(kid)
}

fn write_private(path: &Path, bytes: &[u8]) -> std::io::Result<()> {
    use std::io::Write;
    use std::os::unix::fs::OpenOptionsExt;
    let mut f = std::fs::OpenOptions::new().write(true).create_new(true).mode(0o600).open(path)?;
    f.write_all(bytes)?;
    f.sync_all()
}

impl Signer {
    /// Loads every key of `dir`, generating one when there is none.
    pub fn load_or_create(dir: &Path) -> Result<Signer, String> {
        let mut s = Signer::load(dir)?;
        if s.keys.is_empty() {
            keygen(dir)?;
            s = Signer::load(dir)?;
        }
        Ok(s)
    }

    /// Loads the keys of `dir` (none when it does not exist).
    pub fn load(dir: &Path) -> Result<Signer, String> {
        let mut names: Vec<_> = match std::fs::read_dir(dir) {
            Ok(rd) => rd.filter_map(|e| e.ok()).map(|e| e.path()).filter(|p| p.extension().is_some_and(|x| x == "pem")).collect(),
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => Vec::new(),
            Err(e) => return Err(format!("reading {}: {e}", dir.display())),
        };
        names.sort();
        let mut keys = Vec::new();
        for p in names {
            let pem = std::fs::read_to_string(&p).map_err(|e| format!("reading {}: {e}", p.display()))?;
            let sk = SigningKey::from_pkcs8_pem(&pem).map_err(|e| format!("{}: not an Ed25519 PKCS#8 key: {e}", p.display()))?;
            let kid = p.file_stem().and_then(|s| s.to_str()).unwrap_or_default().to_string();
            keys.push(Key { kid, public: sk.verifying_key().to_bytes(), signing: sk });
        }
        Ok(Signer { keys })
    }

    /// The kid of the signing key.
    pub fn kid(&self) -> Option<&str> {
        self.keys.last().map(|k| k.kid.as_str())
    }

    /// Signs `claims` with the newest key (header `typ: JWT`: an entitlements token).
    pub fn sign<T: Serialize>(&self, claims: &T) -> Result<String, String> {
        self.sign_typed(claims, "JWT")
    }

    /// Signs `claims` with the newest key and header `typ`: a compact JWS
    /// `{"typ", "alg": "EdDSA", "kid"}.claims.signature` (RFC 8037), as any JWT library reads it.
    pub fn sign_typed<T: Serialize>(&self, claims: &T, typ: &str) -> Result<String, String> {
        use ed25519_dalek::Signer as _;
        let key = self.keys.last().ok_or("no signing key")?;
        let b64 = base64::engine::general_purpose::URL_SAFE_NO_PAD;
        let header = serde_json::to_vec(&json!({"typ": typ, "alg": "EdDSA", "kid": key.kid})).map_err(|e| e.to_string())?;
        let body = serde_json::to_vec(claims).map_err(|e| e.to_string())?;
        let mut jws = String::with_capacity((header.len() + body.len()) * 4 / 3 + 90);
        b64.encode_string(&header, &mut jws);
        jws.push('.');
        b64.encode_string(&body, &mut jws);
        let signature = key.signing.sign(jws.as_bytes());
        jws.push('.');
        b64.encode_string(signature.to_bytes(), &mut jws);
        Ok(jws)
    }

    /// The verifying key of `kid`, when it is one of ours.
    pub fn decoding_key(&self, kid: &str) -> Option<DecodingKey> {
        let key = self.keys.iter().find(|k| k.kid == kid)?;
        DecodingKey::from_ed_components(&base64::engine::general_purpose::URL_SAFE_NO_PAD.encode(key.public)).ok()
    }

    /// The public keys as a JWKS (`{"keys": [{kty: OKP, crv: Ed25519, x, kid, alg: EdDSA, use: sig}]}`).
    pub fn jwks(&self) -> Value {
        let keys: Vec<Value> = self
            .keys
            .iter()
            .rev()
            .map(|k| {
                json!({"kty": "OKP", "crv": "Ed25519", "x": base64::engine::general_purpose::URL_SAFE_NO_PAD.encode(k.public),
                       "kid": k.kid, "alg": "EdDSA", "use": "sig"})
            })
            .collect();
        json!({ "keys": keys })
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use jsonwebtoken::{Algorithm, Validation};

    #[test]
    fn tokens_verify_with_a_jwt_library_and_the_published_key_and_a_changed_byte_is_refused() {
        let dir = tempfile::tempdir().unwrap();
        let signer = Signer::load_or_create(dir.path()).unwrap();
        let kid = signer.kid().unwrap().to_string();
        let claims = json!({"sub": "ada", "plan": "pro", "exp": 4_000_000_000i64, "note": "héllo"});
        let token = signer.sign_typed(&claims, "at+jwt").unwrap();
        let header = jsonwebtoken::decode_header(&token).unwrap();
        assert_eq!((header.alg, header.kid.as_deref(), header.typ.as_deref()), (Algorithm::EdDSA, Some(kid.as_str()), Some("at+jwt")));
        let mut v = Validation::new(Algorithm::EdDSA);
        v.validate_aud = false;
        let key = signer.decoding_key(&kid).unwrap();
        let got = jsonwebtoken::decode::<Value>(&token, &key, &v).unwrap().claims;
        assert_eq!(got, claims);
        // The published JWKS verifies it too.
        let jwk: jsonwebtoken::jwk::Jwk = serde_json::from_value(signer.jwks()["keys"][0].clone()).unwrap();
        jsonwebtoken::decode::<Value>(&token, &DecodingKey::from_jwk(&jwk).unwrap(), &v).unwrap();
        // Any changed byte of the body or the signature is refused.
        let (head, sig) = token.rsplit_once('.').unwrap();
        let forged_body = token.replacen(".ey", ".eX", 1);
        let mut sig_bytes: Vec<char> = sig.chars().collect();
        sig_bytes[3] = if sig_bytes[3] == 'A' { 'B' } else { 'A' };
        let forged_sig = format!("{head}.{}", sig_bytes.into_iter().collect::<String>());
        for forged in [forged_body, forged_sig] {
            assert!(jsonwebtoken::decode::<Value>(&forged, &key, &v).is_err(), "{forged}");
        }
    }
}
