//! The server's bearer tokens: its own access tokens (`access_tokens::verify_with`: EdDSA,
//! `typ: at+jwt`) and identity-provider tokens (`auth::Verifier::verify`, here with an HS256
//! shared secret). Raw inputs are tokens as they are; signed inputs are claims the target signs
//! as an access token with the server's fixed key and as an identity token with the shared
//! secret. Properties: nothing panics; an accepted access token names a password account; an
//! accepted identity token's subject is valid and never a password account's.
#![no_main]

use jsonwebtoken::{EncodingKey, Header};
use libfuzzer_sys::fuzz_target;
use std::sync::OnceLock;
use tally_core::contract::{self, PASSWORD_SUBJECT_PREFIX};
use tally_fuzz::{ID_SECRET, Input, config, now, signer, split};
use tally_server::access_tokens;
use tally_server::auth::Verifier;

fn verifier() -> &'static Verifier {
    static VERIFIER: OnceLock<Verifier> = OnceLock::new();
    VERIFIER.get_or_init(|| Verifier::new(config()).unwrap_or_else(|e| panic!("verifier: {e}")))
}

fn check(token: &str) {
    if let Ok(c) = access_tokens::verify_with(signer(), config(), now(), token) {
        assert!(c.sub.starts_with(PASSWORD_SUBJECT_PREFIX), "an access token for {:?}", c.sub);
    }
    // No key set is configured: verification never waits on the network.
    if let Ok(c) = futures::executor::block_on(verifier().verify(token)) {
        assert!(contract::subject(&c.sub).is_ok(), "an invalid subject {:?} was accepted", c.sub);
        assert!(!c.sub.starts_with(PASSWORD_SUBJECT_PREFIX), "an identity token for a password account {:?}", c.sub);
    }
}

fuzz_target!(|data: &[u8]| {
    match split(data) {
        None => {}
        Some(Input::Raw(bytes)) => {
            if let Ok(t) = std::str::from_utf8(bytes) {
                check(t);
            }
        }
        Some(Input::Signed(bytes)) => {
            let Ok(claims) = serde_json::from_slice::<serde_json::Value>(bytes) else { return };
            if let Ok(t) = signer().sign_typed(&claims, access_tokens::TYP) {
                check(&t);
            }
            if let Ok(t) = jsonwebtoken::encode(&Header::default(), &claims, &EncodingKey::from_secret(ID_SECRET.as_bytes())) {
                check(&t);
            }
        }
    }
});
