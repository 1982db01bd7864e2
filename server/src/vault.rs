//! The cryptography of the secrets vault: AES-256-GCM, a random data key per value, wrapped by
//! a master key of `TALLY_SECRET_KEYS` (`kid:base64,…`; the first seals, every one opens).
//! Both the value and its wrapped data key carry user id ‖ name ‖ key id as associated data,
//! so a sealed value opens only in the row it was sealed for.

use aes_gcm::aead::{Aead, KeyInit, Payload};
use aes_gcm::{Aes256Gcm, Key, Nonce};
use base64::Engine;
use uuid::Uuid;

/// Bytes of an AES-GCM nonce, stored in front of each ciphertext.
const NONCE_BYTES: usize = 12;

/// A value as stored: the master key id, the wrapped data key and the sealed value.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Sealed {
    /// Id of the master key that wraps the data key.
    pub key_id: String,
    /// nonce ‖ AES-GCM(master key, data key).
    pub wrapped_key: Vec<u8>,
    /// nonce ‖ AES-GCM(data key, value).
    pub sealed: Vec<u8>,
}

/// Why a value could not be opened.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum VaultError {
    /// The row was sealed under a master key that is not configured.
    #[error("the master key {0:?} is not configured")]
    KeyMissing(String),
    /// The ciphertext does not open in this row (moved, altered or corrupt).
    #[error("a sealed value does not open in its row")]
    Tampered,
}

/// The configured master keys, current first.
pub struct MasterKeys {
    keys: Vec<(String, Aes256Gcm)>,
}

impl std::fmt::Debug for MasterKeys {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("MasterKeys").field("key_ids", &self.key_ids()).finish_non_exhaustive()
    }
}

fn aad(user_id: Uuid, name: &str, key_id: &str) -> Vec<u8> {
    let mut a = Vec::with_capacity(16 + 2 + name.len() + key_id.len());
    a.extend_from_slice(user_id.as_bytes());
    // The name's length keeps name ‖ key id unambiguous.
    a.extend_from_slice(&u16::try_from(name.len()).unwrap_or(u16::MAX).to_be_bytes());
    a.extend_from_slice(name.as_bytes());
    a.extend_from_slice(key_id.as_bytes());
    a
}

fn encrypt(cipher: &Aes256Gcm, plain: &[u8], aad: &[u8]) -> Vec<u8> {
    let nonce = rand::random::<[u8; NONCE_BYTES]>();
    let mut out = nonce.to_vec();
    // Encryption with a valid key and a 12-byte nonce does not fail for inputs this small.
    out.extend(cipher.encrypt(&Nonce::from(nonce), Payload { msg: plain, aad }).unwrap_or_default());
    out
}

fn decrypt(cipher: &Aes256Gcm, data: &[u8], aad: &[u8]) -> Result<Vec<u8>, VaultError> {
    if data.len() < NONCE_BYTES {
        return Err(VaultError::Tampered);
    }
    let (nonce, ct) = data.split_at(NONCE_BYTES);
    let nonce: [u8; NONCE_BYTES] = nonce.try_into().map_err(|_| VaultError::Tampered)?;
    cipher.decrypt(&Nonce::from(nonce), Payload { msg: ct, aad }).map_err(|_| VaultError::Tampered)
}

impl MasterKeys {
    /// Parses `kid:base64,…` (standard or URL-safe base64 of 32 bytes; ids of `A-Za-z0-9_.-`).
    /// The message of an error names the entry, never key material.
    pub fn parse(spec: &str) -> Result<MasterKeys, String> {
        let mut keys: Vec<(String, Aes256Gcm)> = Vec::new();
        for (i, entry) in spec.split(',').map(str::trim).filter(|e| !e.is_empty()).enumerate() {
            let (kid, b64) = entry.split_once(':').ok_or_else(|| format!("TALLY_SECRET_KEYS entry {}: expected kid:base64", i + 1))?;
            if kid.is_empty() || kid.len() > 64 || !kid.bytes().all(|b| b.is_ascii_alphanumeric() || b"_.-".contains(&b)) {
                return Err(format!("TALLY_SECRET_KEYS entry {}: the key id must be 1 to 64 of A-Z a-z 0-9 _ . -", i + 1));
            }
            let engines = [&base64::engine::general_purpose::STANDARD, &base64::engine::general_purpose::URL_SAFE];
            let bytes = engines
                .iter()
                .find_map(|e| e.decode(b64).ok())
                .or_else(|| base64::engine::general_purpose::URL_SAFE_NO_PAD.decode(b64.trim_end_matches('=')).ok())
                .ok_or_else(|| format!("TALLY_SECRET_KEYS key {kid:?}: not base64"))?;
            if bytes.len() != 32 {
                return Err(format!("TALLY_SECRET_KEYS key {kid:?}: must be 32 bytes, got {}", bytes.len()));
            }
            if keys.iter().any(|(k, _)| k == kid) {
                return Err(format!("TALLY_SECRET_KEYS: key id {kid:?} is given twice"));
            }
            keys.push((
                kid.to_string(),
                Aes256Gcm::new(&Key::<Aes256Gcm>::from(
                    <[u8; 32]>::try_from(bytes.as_slice()).map_err(|_| format!("TALLY_SECRET_KEYS key {kid:?}: must be 32 bytes"))?,
                )),
            ));
        }
        if keys.is_empty() {
            return Err("TALLY_SECRET_KEYS holds no key".into());
        }
        Ok(MasterKeys { keys })
    }

    /// A new random master key in the form `TALLY_SECRET_KEYS` takes (`kid:base64`).
    pub fn generate(kid: &str) -> String {
        format!("{kid}:{}", base64::engine::general_purpose::STANDARD.encode(rand::random::<[u8; 32]>()))
    }

    /// The id of the sealing key.
    pub fn current(&self) -> &str {
        &self.keys[0].0
    }

    /// Every configured key id, current first.
    pub fn key_ids(&self) -> Vec<&str> {
        self.keys.iter().map(|(k, _)| k.as_str()).collect()
    }

    fn cipher(&self, kid: &str) -> Result<&Aes256Gcm, VaultError> {
        self.keys.iter().find(|(k, _)| k == kid).map(|(_, c)| c).ok_or_else(|| VaultError::KeyMissing(kid.to_string()))
    }

    /// Seals `value` for row (`user_id`, `name`) under the current key and a fresh data key.
    pub fn seal(&self, user_id: Uuid, name: &str, value: &[u8]) -> Sealed {
        self.seal_with(rand::random::<[u8; 32]>(), user_id, name, value)
    }

    fn seal_with(&self, data_key: [u8; 32], user_id: Uuid, name: &str, value: &[u8]) -> Sealed {
        let (kid, master) = &self.keys[0];
        let ad = aad(user_id, name, kid);
        let data = Aes256Gcm::new(&Key::<Aes256Gcm>::from(data_key));
        Sealed { key_id: kid.clone(), wrapped_key: encrypt(master, &data_key, &ad), sealed: encrypt(&data, value, &ad) }
    }

    fn data_key(&self, user_id: Uuid, name: &str, s: &Sealed) -> Result<[u8; 32], VaultError> {
        let ad = aad(user_id, name, &s.key_id);
        let raw = decrypt(self.cipher(&s.key_id)?, &s.wrapped_key, &ad)?;
        raw.try_into().map_err(|_| VaultError::Tampered)
    }

    /// Opens the value of row (`user_id`, `name`).
    pub fn open(&self, user_id: Uuid, name: &str, s: &Sealed) -> Result<Vec<u8>, VaultError> {
        let key = self.data_key(user_id, name, s)?;
        decrypt(&Aes256Gcm::new(&Key::<Aes256Gcm>::from(key)), &s.sealed, &aad(user_id, name, &s.key_id))
    }

    /// The same value and data key sealed again under the current master key.
    pub fn reseal(&self, user_id: Uuid, name: &str, s: &Sealed) -> Result<Sealed, VaultError> {
        let key = self.data_key(user_id, name, s)?;
        let value = self.open(user_id, name, s)?;
        Ok(self.seal_with(key, user_id, name, &value))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn keys(spec: &str) -> MasterKeys {
        MasterKeys::parse(spec).unwrap()
    }

    #[test]
    fn a_sealed_value_opens_in_its_row_only() {
        let k = keys(&MasterKeys::generate("k1"));
        let (u, v) = (Uuid::now_v7(), Uuid::now_v7());
        let s = k.seal(u, "github_token", b"ghp_secret");
        assert_eq!(k.open(u, "github_token", &s).unwrap(), b"ghp_secret");
        assert!(!s.sealed.windows(10).any(|w| w == b"ghp_secret"));
        assert_eq!(k.open(v, "github_token", &s), Err(VaultError::Tampered), "another user");
        assert_eq!(k.open(u, "other", &s), Err(VaultError::Tampered), "another name");
        let relabelled = Sealed { key_id: "k2".into(), ..s.clone() };
        let both = keys(&format!("{},{}", MasterKeys::generate("k2"), MasterKeys::generate("k1")));
        assert_eq!(both.open(u, "github_token", &relabelled), Err(VaultError::Tampered), "another key id");
        let mut flipped = s.clone();
        *flipped.sealed.last_mut().unwrap() ^= 1;
        assert_eq!(k.open(u, "github_token", &flipped), Err(VaultError::Tampered));
    }

    #[test]
    fn resealing_moves_a_value_to_the_current_key() {
        let old = MasterKeys::generate("old");
        let new = MasterKeys::generate("new");
        let u = Uuid::now_v7();
        let s = keys(&old).seal(u, "n", b"v");
        let both = keys(&format!("{new},{old}"));
        let r = both.reseal(u, "n", &s).unwrap();
        assert_eq!(r.key_id, "new");
        assert_eq!(keys(&new).open(u, "n", &r).unwrap(), b"v");
        assert_eq!(keys(&new).open(u, "n", &s), Err(VaultError::KeyMissing("old".into())));
    }

    #[test]
    fn bad_key_lists_are_refused_without_echoing_keys() {
        for (spec, want) in [
            ("", "holds no key"),
            ("k1", "expected kid:base64"),
            ("k1:!!!", "not base64"),
            ("k1:AAAA", "must be 32 bytes"),
            ("bad id:AAAA", "key id"),
        ] {
            let e = MasterKeys::parse(spec).unwrap_err();
            assert!(e.contains(want), "{spec}: {e}");
        }
        let k = MasterKeys::generate("a");
        assert!(MasterKeys::parse(&format!("{k},{k}")).unwrap_err().contains("twice"));
        let dbg = format!("{:?}", keys(&k));
        assert!(!dbg.contains(k.split_once(':').unwrap().1), "{dbg}");
    }
}
