//! Password hashing: Argon2id with OWASP's parameters (19 MiB, 2 passes, 1 lane), PHC strings.
//! A login for an unknown email verifies against a dummy hash of the same parameters, so both
//! failures cost the same.

use argon2::password_hash::{PasswordHash, PasswordHasher, PasswordVerifier, SaltString};
use argon2::{Algorithm, Argon2, Params, Version};
use std::sync::OnceLock;

/// Memory cost in KiB (OWASP: 19 MiB).
const MEMORY_KIB: u32 = 19 * 1024;
/// Passes (OWASP: 2).
const PASSES: u32 = 2;
/// Lanes (OWASP: 1).
const LANES: u32 = 1;

fn argon2() -> Argon2<'static> {
    let params = Params::new(MEMORY_KIB, PASSES, LANES, None).unwrap_or_default();
    Argon2::new(Algorithm::Argon2id, Version::V0x13, params)
}

/// The PHC string of `password` under a fresh random salt. CPU-heavy: call off the async
/// threads ([`tokio::task::spawn_blocking`]).
pub fn hash(password: &str) -> Result<String, String> {
    let salt = SaltString::encode_b64(&rand::random::<[u8; 16]>()).map_err(|e| e.to_string())?;
    argon2().hash_password(password.as_bytes(), &salt).map(|h| h.to_string()).map_err(|e| e.to_string())
}

/// The hash unknown emails are checked against.
fn dummy_hash() -> &'static str {
    static DUMMY: OnceLock<String> = OnceLock::new();
    DUMMY.get_or_init(|| hash("no account has this password").unwrap_or_default())
}

/// Whether `password` matches `stored` (a PHC string); with no stored hash, the same work is
/// done against a dummy hash and the answer is `false`. CPU-heavy, like [`hash`].
pub fn verify(password: &str, stored: Option<&str>) -> bool {
    let (phc, real) = match stored {
        Some(s) => (s, true),
        None => (dummy_hash(), false),
    };
    let Ok(parsed) = PasswordHash::new(phc) else { return false };
    argon2().verify_password(password.as_bytes(), &parsed).is_ok() && real
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_hash_verifies_its_password_only() {
        let h = hash("correct horse battery").unwrap();
        assert!(h.starts_with("$argon2id$v=19$m=19456,t=2,p=1$"), "{h}");
        assert!(verify("correct horse battery", Some(&h)));
        assert!(!verify("correct horse batterz", Some(&h)));
        assert_ne!(hash("correct horse battery").unwrap(), h, "salts differ");
    }

    #[test]
    fn unknown_accounts_are_checked_against_a_dummy_of_the_same_cost() {
        let real = hash("x-password").unwrap();
        let params = |h: &str| h.split('$').nth(3).map(str::to_string);
        assert_eq!(params(dummy_hash()), params(&real));
        assert!(!verify("no account has this password", None), "the dummy never matches");
    }
}
