//! App Store purchases end to end: real devices (SQLite files) post StoreKit 2 transactions
//! signed by a test PKI to a real `tally-server` process on a real Postgres, which trusts only
//! that PKI's root. A purchase applies offline at once on the buying device, reaches the
//! user's other devices at their next sync, an App Store refund takes it back from both, a
//! credit pack is spent once across two offline devices, and a refused purchase changes nothing
//! on the device.

#[path = "../../server/tests/common/apple_pki.rs"]
mod apple_pki;

use apple_pki::{Pki, Tx, notification};
use chrono::{DateTime, Duration, Utc};
use serde_json::{Value, json};
use std::path::Path;
use std::sync::Arc;
use tally_core::{Catalog, Config, Error, ManualClock, Profile, Purchase, Reason, SyncOptions, Tally, UsageMeta};
use tally_e2e::*;

const BUNDLE: &str = "com.example.tally.e2e";

/// Plans with a hard monthly chat limit and a credits feature, and what the App Store sells.
const STORE_PLANS: &str = r#"{"plans": [
  {"id": "free", "features": {
    "ai_chat": {"type": "metered", "limit": 5, "period": "month", "enforcement": "hard"},
    "images":  {"type": "credits", "cost": 1}}},
  {"id": "pro", "features": {
    "ai_chat": {"type": "metered", "limit": 1000, "period": "month", "enforcement": "hard"},
    "images":  {"type": "credits", "cost": 1}}}],
  "products": [
    {"id": "pro_monthly", "store": "app_store", "grants": {"plan": "pro"}},
    {"id": "credits_10", "store": "app_store", "grants": {"credits": 10}}]}"#;

/// One test's world: a Postgres, a Sandbox App Store server trusting only its PKI's root, and a
/// runtime for the devices' calls.
struct Shop {
    pki: Pki,
    server: Server,
    keys: String,
    rt: tokio::runtime::Runtime,
    _pg: tally_server::pg_cluster::Cluster,
    dir: tempfile::TempDir,
}

impl Shop {
    /// `None` (with a loud message) when Postgres is not installed and not required.
    fn open() -> Option<Shop> {
        let dir = tempfile::Builder::new().prefix("tally-e2e-purchases-").tempdir_in("/tmp").expect("tempdir");
        let pg = postgres(dir.path())?;
        let pki = Pki::new();
        let server = store_server(&pg, dir.path(), &pki);
        let keys = server.keys();
        let rt = tokio::runtime::Builder::new_multi_thread().worker_threads(2).enable_all().build().expect("runtime");
        Some(Shop { pki, server, keys, rt, _pg: pg, dir })
    }
}

/// A Sandbox App Store server trusting only `pki`'s root, with [`STORE_PLANS`].
fn store_server(pg: &tally_server::pg_cluster::Cluster, dir: &Path, pki: &Pki) -> Server {
    std::fs::create_dir_all(dir).expect("data dir");
    let root = pki.write_root(dir);
    let plans = dir.join("store-plans.json");
    std::fs::write(&plans, STORE_PLANS).expect("plans");
    Server::start(
        &pg.url(),
        &dir.join("server"),
        &[
            ("TALLY_PLANS_FILE", plans.to_str().expect("path")),
            ("TALLY_APPLE_BUNDLE_ID", BUNDLE),
            ("TALLY_APPLE_ROOT_CERTS", root.to_str().expect("path")),
            ("TALLY_APPLE_ENVIRONMENT", "Sandbox"),
        ],
    )
}

fn open(dir: &Path, name: &str, keys: &str) -> Tally {
    let config = Config {
        device_id: Some(name.into()),
        clock: Arc::new(ManualClock::new(Utc::now())),
        catalog: Catalog::from_json(STORE_PLANS).expect("catalog"),
        server_keys: Some(keys.into()),
        ..Config::default()
    };
    Tally::open(dir.join(format!("{name}.db")), config).expect("open device")
}

fn options(server: &Server, sub: &str) -> SyncOptions {
    SyncOptions::new(&server.url, id_token(sub))
}

/// A signed StoreKit 2 transaction bought a minute ago (a month-long subscription when
/// `expires`), bound to `account`.
fn signed(pki: &Pki, id: &str, original: &str, product: &str, account: &str, expires: bool, revoked: Option<DateTime<Utc>>) -> String {
    let now = Utc::now();
    let tx = Tx {
        id,
        original,
        product,
        purchased: now - Duration::minutes(1),
        expires: expires.then(|| now + Duration::days(30)),
        signed: now,
        account: Some(account),
    };
    let mut payload = tx.payload(BUNDLE, "Sandbox");
    if let Some(at) = revoked {
        payload["revocationDate"] = json!(at.timestamp_millis());
        payload["revocationReason"] = json!(1);
        payload["signedDate"] = json!(Utc::now().timestamp_millis());
    }
    pki.sign(&payload)
}

async fn post_notification(server: &Server, pki: &Pki, kind: &str, signed_tx: &str) -> Value {
    let n = notification(&uuid::Uuid::new_v4().to_string(), kind, None, BUNDLE, "Sandbox", signed_tx, None);
    let r = reqwest::Client::new()
        .post(format!("{}/v1/webhooks/apple", server.url))
        .json(&json!({"signedPayload": pki.sign(&n)}))
        .send()
        .await
        .expect("notification");
    assert_eq!(r.status(), 200);
    r.json().await.expect("json")
}

async fn server_user_id(server: &Server, sub: &str) -> String {
    get_json(&format!("{}/v1/me", server.url), sub).await["id"].as_str().expect("id").to_string()
}

fn plan(t: &Tally, user: &str) -> String {
    t.entitlements(user).expect("entitlements").plan
}

#[test]
fn a_purchase_applies_offline_at_once_reaches_other_devices_and_a_refund_takes_it_back() {
    let Some(shop) = Shop::open() else { return };
    let (dir, pki, server, keys) = (shop.dir.path(), &shop.pki, &shop.server, shop.keys.as_str());
    shop.rt.block_on(async {
        let sub = "buyer";
        let phone = open(dir, "phone", keys);
        let laptop = open(dir, "laptop", keys);
        let up = phone.sign_in(Profile { external_id: sub.into(), ..Profile::default() }, None).expect("sign in").id;
        let ul = laptop.sign_in(Profile { external_id: sub.into(), ..Profile::default() }, None).expect("sign in").id;

        // The account token exists after the first sync, and it is the server's user id.
        let before = phone.account_token(&up).expect_err("no account token before the first sync");
        assert!(matches!(&before, Error::InvalidInput(m) if m.contains("sync once")), "{before}");
        phone.sync(&up, options(server, sub)).await.expect("sync");
        laptop.sync(&ul, options(server, sub)).await.expect("sync");
        let account = phone.account_token(&up).expect("account token");
        assert_eq!(account, server_user_id(server, sub).await);
        assert_eq!(laptop.account_token(&ul).expect("account token"), account);
        assert_eq!(phone.check(&up, "ai_chat", 50).expect("check").reason, Reason::LimitReached);
        // The app asks to hold ai_chat offline (the phone claims the pool for the window).
        phone.prepare_offline(&up, "ai_chat", 50).expect("prepare");
        phone.sync(&up, options(server, sub)).await.expect("sync");

        // The phone buys; the answered device token applies at once, before any sync.
        let jws = signed(pki, "t-1", "o-1", "pro_monthly", &account, true, None);
        let purchase = Purchase::Apple { signed_transactions: vec![jws.clone()] };
        let report = phone.submit_purchase(&up, purchase.clone(), options(server, sub)).await.expect("purchase");
        assert!(report.entitlements_updated, "{report:?}");
        assert_eq!(report.purchases.len(), 1, "{report:?}");
        assert_eq!((report.purchases[0].product_id.as_deref(), report.purchases[0].status.as_str()), (Some("pro_monthly"), "active"));
        assert_eq!(plan(&phone, &up), "pro");
        let d = phone.consume(&up, "ai_chat", 50, UsageMeta::default()).expect("consume");
        assert!(d.allowed, "the pro limit holds offline at once: {d:?}");
        // StoreKit delivering the same transaction again changes nothing.
        let again = phone.submit_purchase(&up, purchase, options(server, sub)).await.expect("the same purchase again");
        assert_eq!(again.purchases[0].status, "active");

        // The laptop has pro after its next sync.
        assert_eq!(plan(&laptop, &ul), "free");
        laptop.prepare_offline(&ul, "ai_chat", 50).expect("prepare");
        laptop.sync(&ul, options(server, sub)).await.expect("sync");
        assert_eq!(plan(&laptop, &ul), "pro");
        // The phone, alone to claim ai_chat when it bought, holds the pool: it gives the
        // laptop's share back on its next sync, and the laptop gets it on its own.
        phone.sync(&up, options(server, sub)).await.expect("sync");
        laptop.sync(&ul, options(server, sub)).await.expect("sync");
        assert!(laptop.check(&ul, "ai_chat", 50).expect("check").allowed);

        // Apple refunds it: both devices are back on free after their next sync.
        let refunded = signed(pki, "t-1", "o-1", "pro_monthly", &account, true, Some(Utc::now()));
        let n = post_notification(server, pki, "REFUND", &refunded).await;
        assert_eq!(n["outcome"], "applied", "{n}");
        phone.sync(&up, options(server, sub)).await.expect("sync");
        laptop.sync(&ul, options(server, sub)).await.expect("sync");
        assert_eq!(plan(&phone, &up), "free");
        assert_eq!(plan(&laptop, &ul), "free");
        assert_eq!(laptop.check(&ul, "ai_chat", 50).expect("check").reason, Reason::LimitReached);
    });
}

#[test]
fn a_refused_purchase_names_the_cause_and_changes_nothing_on_the_device() {
    let Some(shop) = Shop::open() else { return };
    let (dir, pki, server, keys) = (shop.dir.path(), &shop.pki, &shop.server, shop.keys.as_str());
    shop.rt.block_on(async {
        let owner = open(dir, "owner-phone", keys);
        let uo = owner.sign_in(Profile { external_id: "owner".into(), ..Profile::default() }, None).expect("sign in").id;
        owner.sync(&uo, options(server, "owner")).await.expect("sync");
        let jws = signed(pki, "t-9", "o-9", "pro_monthly", &owner.account_token(&uo).expect("account"), true, None);

        let other = open(dir, "other-phone", keys);
        let ux = other.sign_in(Profile { external_id: "other".into(), ..Profile::default() }, None).expect("sign in").id;
        other.sync(&ux, options(server, "other")).await.expect("sync");
        let token_before = other.account_token(&ux).expect("account");
        let ents_before = other.entitlements(&ux).expect("entitlements");
        let leases_before = other.leases(&ux).expect("leases");

        // Another account's purchase: 409 bound_to_other_user, nothing stored on this device.
        let e = other
            .submit_purchase(&ux, Purchase::Apple { signed_transactions: vec![jws] }, options(server, "other"))
            .await
            .expect_err("another account's purchase");
        assert!(matches!(&e, Error::PurchaseRefused { status: 409, code, .. } if code == "bound_to_other_user"), "{e}");
        // A transaction signed by a foreign root: untrusted_chain.
        let foreign = signed(&Pki::new(), "t-10", "o-10", "pro_monthly", &token_before, true, None);
        let e = other
            .submit_purchase(&ux, Purchase::Apple { signed_transactions: vec![foreign] }, options(server, "other"))
            .await
            .expect_err("a foreign root");
        assert!(matches!(&e, Error::PurchaseRefused { code, .. } if code == "untrusted_chain"), "{e}");
        // No proof at all: refused by the contract before any request.
        let e = other
            .submit_purchase(&ux, Purchase::Apple { signed_transactions: vec![] }, options(server, "other"))
            .await
            .expect_err("no proof");
        assert!(matches!(&e, Error::InvalidInput(m) if m.contains("signed_transactions")), "{e}");
        assert_eq!(other.account_token(&ux).expect("account"), token_before);
        assert_eq!(other.entitlements(&ux).expect("entitlements"), ents_before);
        assert_eq!(other.leases(&ux).expect("leases"), leases_before);
        assert_eq!(plan(&other, &ux), "free");

        // Restoring with no transaction at all asks for a fresh token instead.
        let r =
            other.restore_purchases(&ux, Purchase::Apple { signed_transactions: vec![] }, options(server, "other")).await.expect("restore");
        assert!(r.purchases.is_empty() && r.entitlements_updated, "{r:?}");
    });
}

#[test]
fn a_credit_pack_bought_once_is_spent_once_across_two_offline_devices() {
    let Some(shop) = Shop::open() else { return };
    let (dir, pki, server, keys) = (shop.dir.path(), &shop.pki, &shop.server, shop.keys.as_str());
    shop.rt.block_on(async {
        let sub = "pack-buyer";
        let devices: Vec<(Tally, String)> = ["pack-phone", "pack-tablet"]
            .iter()
            .map(|name| {
                let t = open(dir, name, keys);
                let u = t.sign_in(Profile { external_id: sub.into(), ..Profile::default() }, None).expect("sign in").id;
                (t, u)
            })
            .collect();
        for (t, u) in &devices {
            t.sync(u, options(server, sub)).await.expect("sync");
        }
        let (phone, up) = &devices[0];
        let account = phone.account_token(up).expect("account");
        let jws = signed(pki, "pack-1", "pack-1", "credits_10", &account, false, None);
        let purchase = Purchase::Apple { signed_transactions: vec![jws] };
        let report = phone.submit_purchase(up, purchase.clone(), options(server, sub)).await.expect("purchase");
        assert_eq!(report.purchases[0].status, "credited", "{report:?}");
        assert_eq!(phone.credit_balance(up).expect("balance"), 10, "the pack applies at once");
        // Sent again (StoreKit redelivers, or a restore): granted once per transaction.
        phone.restore_purchases(up, purchase, options(server, sub)).await.expect("restore");
        // Both devices ask to hold credits offline, and sync twice, so the phone gives back
        // what the tablet's share needs.
        for (t, u) in &devices {
            t.prepare_offline(u, "images", 1).expect("prepare");
        }
        for _ in 0..2 {
            for (t, u) in &devices {
                t.sync(u, options(server, sub)).await.expect("sync");
            }
        }
        let held: Vec<u64> =
            devices.iter().map(|(t, u)| t.usage(u, "images").expect("usage").device_remaining.expect("a $credits lease")).collect();
        assert!(held.iter().sum::<u64>() <= 10, "the devices hold {held:?} of a pack of 10");
        assert!(held.iter().all(|h| *h > 0), "both devices hold credits: {held:?}");

        // Offline: each device spends until its lease says no.
        let mut spent = 0;
        for (t, u) in &devices {
            loop {
                let d = t.consume(u, "images", 1, UsageMeta::default()).expect("consume");
                if !d.allowed {
                    assert!(matches!(d.reason, Reason::LeaseExhausted | Reason::InsufficientCredits), "{d:?}");
                    break;
                }
                spent += 1;
            }
        }
        assert!(spent <= 10, "spent {spent} of a pack of 10 offline");
        // Online again: what is left is spendable to the last credit, never more.
        for _ in 0..3 {
            for (t, u) in &devices {
                t.sync(u, options(server, sub)).await.expect("sync");
                while t.consume(u, "images", 1, UsageMeta::default()).expect("consume").allowed {
                    spent += 1;
                }
            }
        }
        for (t, u) in &devices {
            t.sync(u, options(server, sub)).await.expect("sync");
        }
        assert_eq!(spent, 10, "the pack is spent once, whole");
        let ents = get_json(&format!("{}/v1/entitlements", server.url), sub).await;
        assert_eq!(ents["credit_balance"], 0, "{ents}");
        for (t, u) in &devices {
            assert_eq!(t.usage(u, "images").expect("usage").over_limit_by, 0, "no debt");
        }
    });
}
