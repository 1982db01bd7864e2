//! The entitlements token a device verifies offline (`tally_core::token::verify`: EdDSA JWT,
//! `kid` looked up in the server's key set). Raw inputs are tokens as they are; signed inputs
//! are claims the target signs with the server's fixed key. Properties: nothing panics; an
//! accepted token is for the subject asked; a signed token verifies against the server's key
//! set and against no other subject.
#![no_main]

use libfuzzer_sys::fuzz_target;
use std::sync::OnceLock;
use tally_core::token;
use tally_fuzz::{Input, signer, split};

fn jwks() -> &'static str {
    static JWKS: OnceLock<String> = OnceLock::new();
    JWKS.get_or_init(|| signer().jwks().to_string())
}

fuzz_target!(|data: &[u8]| {
    match split(data) {
        None => {}
        Some(Input::Raw(bytes)) => {
            let Ok(t) = std::str::from_utf8(bytes) else { return };
            if let Ok(claims) = token::verify(t, jwks(), "alice") {
                assert_eq!(claims.sub, "alice");
            }
            // The key set is untrusted input for the parser too.
            let _ = token::verify(t, t, "alice");
        }
        Some(Input::Signed(bytes)) => {
            let Ok(claims) = serde_json::from_slice::<serde_json::Value>(bytes) else { return };
            let Ok(t) = signer().sign(&claims) else { return };
            let sub = claims.get("sub").and_then(serde_json::Value::as_str).unwrap_or("alice");
            if let Ok(c) = token::verify(&t, jwks(), sub) {
                assert_eq!(c.sub, sub);
                assert!(token::verify(&t, jwks(), &format!("{sub}-other")).is_err(), "a token verified for another subject");
            }
        }
    }
});
