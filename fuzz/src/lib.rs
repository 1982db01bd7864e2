//! What the fuzz targets share: fixed keys, a configuration and a catalog, built once per
//! process, and the split of an input into "as it is" or "to be signed by the target".
//!
//! A target whose parser sits behind a signature (a JWT, a JWS, a Stripe webhook) takes two
//! kinds of input: raw bytes handed to the verifier as they are (header, encoding and
//! signature parsing), and bytes the target signs with the fixed keys first, so the fuzzer
//! reaches the parsing of what an authentic signer could send.

#[path = "../../server/tests/common/apple_pki.rs"]
pub mod apple_pki;

use chrono::{DateTime, Utc};
use std::path::{Path, PathBuf};
use std::sync::OnceLock;
use tally_core::Catalog;
use tally_server::Config;
use tally_server::signing::Signer;

/// The shared secret of identity tokens (HS256) in [`config`].
pub const ID_SECRET: &str = "fuzz-identity-secret";
/// The Stripe webhook endpoint secret of the Stripe target.
pub const STRIPE_SECRET: &str = "whsec_fuzz";
/// The App Store bundle id the App Store verifier expects.
pub const APPLE_BUNDLE: &str = "com.example.tally";
/// The app's Apple ID the Production verifier expects.
pub const APPLE_APP_ID: i64 = 1_234_567_890;
/// The Play package of the Google targets.
pub const PLAY_PACKAGE: &str = "com.example.tally";

/// The fixed instant the targets judge time by (2025-06-15T15:06:40Z).
pub fn now() -> DateTime<Utc> {
    DateTime::<Utc>::UNIX_EPOCH + chrono::Duration::seconds(1_750_000_000)
}

/// What a target makes of its input.
pub enum Input<'a> {
    /// Handed to the parser as it is.
    Raw(&'a [u8]),
    /// Signed by the target with its fixed keys first.
    Signed(&'a [u8]),
}

/// Splits `data`: a first byte `s` means "sign the rest", any other first byte "the rest as
/// it is" (the seed files start with `s` or `r`); `None` for an empty input.
pub fn split(data: &[u8]) -> Option<Input<'_>> {
    match data.split_first()? {
        (b's', rest) => Some(Input::Signed(rest)),
        (_, rest) => Some(Input::Raw(rest)),
    }
}

/// The fuzz crate's directory of fixed Ed25519 keys (a test key, used nowhere else).
pub fn keys_dir() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("keys")
}

/// The server's signer over the fixed key of [`keys_dir`].
pub fn signer() -> &'static Signer {
    static SIGNER: OnceLock<Signer> = OnceLock::new();
    SIGNER.get_or_init(|| {
        let s = Signer::load(&keys_dir()).unwrap_or_else(|e| panic!("fuzz keys: {e}"));
        assert!(s.kid().is_some(), "no key under {}", keys_dir().display());
        s
    })
}

/// The server configuration of the targets: every default, password accounts on, an HS256
/// identity secret, a public URL (the access tokens' issuer) and a Stripe secret.
pub fn config() -> &'static Config {
    static CONFIG: OnceLock<Config> = OnceLock::new();
    CONFIG.get_or_init(|| {
        let mut c = Config::for_database("postgres://fuzz.invalid/tally");
        c.password_auth = true;
        c.jwt_secret = Some(ID_SECRET.into());
        c.public_url = Some("https://tally.example".into());
        c.stripe_webhook_secret = Some(STRIPE_SECRET.into());
        c
    })
}

/// The demo catalog (examples/plans.json) with a product of each kind in each store.
pub fn catalog() -> &'static Catalog {
    static CATALOG: OnceLock<Catalog> = OnceLock::new();
    CATALOG.get_or_init(|| {
        let text = include_str!("../../examples/plans.json");
        let mut v: serde_json::Value = serde_json::from_str(text).unwrap_or_else(|e| panic!("examples/plans.json: {e}"));
        let mut products = Vec::new();
        for store in ["app_store", "play", "stripe"] {
            products.push(serde_json::json!({"id": "pro_monthly", "store": store, "grants": {"plan": "pro"}}));
            products.push(serde_json::json!({"id": "pro_forever", "store": store, "grants": {"plan": "pro", "lifetime": true}}));
            products.push(serde_json::json!({"id": "credits_100", "store": store, "grants": {"credits": 100}}));
        }
        v["products"] = serde_json::Value::Array(products);
        Catalog::from_value(&v).unwrap_or_else(|e| panic!("the fuzz catalog: {e}"))
    })
}
