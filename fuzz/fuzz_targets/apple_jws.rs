//! App Store signed data: StoreKit 2 transactions (`Apple::read_transaction`, the purchase
//! route) and Server Notifications V2 with the transaction and renewal info inside
//! (`Apple::read_notification`, the webhook), verified against a test PKI (root, WWDR
//! intermediate, receipt-signing leaf) the target makes once. Raw inputs are JWS strings as
//! they are (header, `x5c` chain, signature); signed inputs are JSON payloads the target signs
//! with the test chain (in a notification, `data.signedTransactionInfo` and
//! `data.signedRenewalInfo` given as objects are signed too). Properties: no panic escapes the
//! served functions (the verifier guards the library's own); an accepted transaction has the
//! ids the purchase route relies on; its state is computed without panicking.
#![no_main]

use libfuzzer_sys::fuzz_target;
use serde_json::Value;
use tally_fuzz::apple_pki::Pki;
use tally_fuzz::{APPLE_APP_ID, APPLE_BUNDLE, Input, catalog, now, split};
use tally_server::billing::apple::{self, Apple, Txn};

struct AppStore {
    pki: Pki,
    apple: Apple,
}

thread_local! {
    static STORE: AppStore = {
        let pki = Pki::new();
        let dir = std::env::temp_dir().join(format!("tally-fuzz-apple-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap_or_else(|e| panic!("{}: {e}", dir.display()));
        let mut c = tally_server::Config::for_database("postgres://fuzz.invalid/tally");
        c.apple_root_certs = vec![pki.write_root(&dir)];
        c.apple_bundle_id = Some(APPLE_BUNDLE.into());
        c.apple_environment = "Production".into();
        c.apple_app_id = Some(APPLE_APP_ID);
        c.apple_allow_sandbox = true;
        let apple = Apple::from_config(&c).ok().flatten().unwrap_or_else(|| panic!("the App Store verifier"));
        AppStore { pki, apple }
    };
}

fn check_txn(t: &Txn) {
    assert!(!t.transaction_id.is_empty() && t.transaction_id.len() <= 64);
    assert!(!t.original_id.is_empty() && t.original_id.len() <= 64);
    assert!(!t.product_id.is_empty() && t.product_id.len() <= 255);
}

fuzz_target!(
    init: {
        // The verifier catches the library's panics (a refusal, not a crash): report them
        // without libFuzzer's abort; a panic that escapes still aborts the run.
        let _libfuzzer_hook = std::panic::take_hook();
    },
    |data: &[u8]| {
    STORE.with(|s| match split(data) {
        None => {}
        Some(Input::Raw(bytes)) => {
            let Ok(jws) = std::str::from_utf8(bytes) else { return };
            if let Ok(t) = s.apple.read_transaction(jws) {
                check_txn(&t);
            }
            let _ = s.apple.read_notification(jws);
        }
        Some(Input::Signed(bytes)) => {
            let Ok(v) = serde_json::from_slice::<Value>(bytes) else { return };
            if let Ok(t) = s.apple.read_transaction(&s.pki.sign(&v)) {
                check_txn(&t);
                let _ = apple::state_of(&t.original_id, std::slice::from_ref(&t), None, catalog(), now());
            }
            let mut n = v;
            for key in ["signedTransactionInfo", "signedRenewalInfo"] {
                if let Some(inner) = n.pointer_mut(&format!("/data/{key}")).filter(|i| i.is_object()) {
                    *inner = Value::String(s.pki.sign(inner));
                }
            }
            if let Ok(n) = s.apple.read_notification(&s.pki.sign(&n)) {
                assert!(!n.uuid.is_empty() && n.uuid.len() <= 64);
                if let Some(t) = &n.txn {
                    check_txn(t);
                    let _ = apple::state_of(&t.original_id, std::slice::from_ref(t), n.renewal.as_ref(), catalog(), now());
                }
            }
        }
    })
});
