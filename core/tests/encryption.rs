//! The encrypted device database (`sqlcipher` feature): a wrong key, a key for an unencrypted
//! file and a missing key are each a clear error that leaves the file as it was; an
//! unencrypted file becomes encrypted only through `encrypt_database`. Without the feature a
//! key is a configuration error.

use tally_core::{Config, Error, Tally};

fn config(key: Option<&str>) -> Config {
    Config { encryption_key: key.map(str::to_string), ..Config::default() }
}

#[cfg(not(feature = "sqlcipher"))]
#[test]
fn without_the_feature_a_key_is_a_configuration_error_and_no_file_is_made() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("app.db");
    let e = Tally::open(&path, config(Some("k"))).unwrap_err();
    assert!(matches!(&e, Error::Configuration(m) if m.contains("sqlcipher")), "{e:?}");
    assert!(std::fs::metadata(&path).map(|m| m.len() == 0).unwrap_or(true));
    let plain = dir.path().join("plain.db");
    drop(Tally::open(&plain, config(None)).unwrap());
    assert!(matches!(tally_core::encrypt_database(&plain, "k"), Err(Error::Configuration(_))));
}

#[cfg(feature = "sqlcipher")]
mod sqlcipher {
    use super::*;
    use std::path::Path;
    use tally_core::Profile;

    fn digest(path: &Path) -> Vec<u8> {
        std::fs::read(path).unwrap()
    }

    fn sign_in(t: &Tally, sub: &str) -> String {
        t.sign_in(Profile { external_id: sub.into(), ..Profile::default() }, None).unwrap().id
    }

    #[test]
    fn an_encrypted_database_opens_with_its_key_only_and_a_wrong_key_changes_nothing() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("app.db");
        let id = {
            let t = Tally::open(&path, config(Some("correct key"))).unwrap();
            let id = sign_in(&t, "ann");
            t.set_setting(&id, "theme", serde_json::json!("dark")).unwrap();
            id
        };
        let bytes = digest(&path);
        assert!(!bytes.starts_with(b"SQLite format 3"), "the file is encrypted");
        assert!(!bytes.windows(3).any(|w| w == b"ann"), "no plaintext");
        for key in [Some("wrong key"), None] {
            let e = Tally::open(&path, config(key)).unwrap_err();
            assert!(matches!(e, Error::EncryptionKey(_)), "{key:?}: {e:?}");
            assert_eq!(digest(&path), bytes, "{key:?}: the file is unchanged");
        }
        let t = Tally::open(&path, config(Some("correct key"))).unwrap();
        assert_eq!(t.user(&id).unwrap().external_id.as_deref(), Some("ann"));
        assert!(matches!(Tally::open(&path, config(Some(""))), Err(Error::Configuration(_))));
    }

    #[test]
    fn an_unencrypted_database_is_never_silently_re_created_encrypted() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("plain.db");
        let id = {
            let t = Tally::open(&path, config(None)).unwrap();
            sign_in(&t, "bea")
        };
        let bytes = digest(&path);
        let e = Tally::open(&path, config(Some("new key"))).unwrap_err();
        assert!(matches!(&e, Error::EncryptionKey(m) if m.contains("encrypt_database")), "{e:?}");
        assert_eq!(digest(&path), bytes, "nothing changed");
        // The documented migration encrypts it in place, keeping everything.
        tally_core::encrypt_database(&path, "new key").unwrap();
        assert!(!digest(&path).starts_with(b"SQLite format 3"));
        assert!(matches!(Tally::open(&path, config(None)), Err(Error::EncryptionKey(_))));
        let t = Tally::open(&path, config(Some("new key"))).unwrap();
        assert_eq!(t.user(&id).unwrap().external_id.as_deref(), Some("bea"));
        t.set_setting(&id, "theme", serde_json::json!("dark")).unwrap();
        drop(t);
        // Running it again on the encrypted file is refused and changes nothing.
        let bytes = digest(&path);
        assert!(matches!(tally_core::encrypt_database(&path, "new key"), Err(Error::EncryptionKey(_))));
        assert_eq!(digest(&path), bytes);
        assert!(matches!(tally_core::encrypt_database(&dir.path().join("absent.db"), "k"), Err(Error::NotFound(_))));
    }
}
