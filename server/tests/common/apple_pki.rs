//! A test App Store PKI: a root CA, an intermediate with Apple's WWDR marker extension and a
//! leaf with Apple's receipt-signing marker, made with rcgen; JWS (ES256, `x5c` chain) signed
//! with the leaf's key like the App Store signs transactions and notifications. Servers under
//! test trust only [`Pki::write_root`]; the options build the broken chains attacks use.
#![allow(dead_code)]

use base64::Engine;
use base64::engine::general_purpose::{STANDARD, URL_SAFE_NO_PAD};
use rcgen::{BasicConstraints, CertificateParams, CustomExtension, DnType, IsCa, Issuer, KeyPair, KeyUsagePurpose, PKCS_ECDSA_P256_SHA256};
use serde_json::{Value, json};

/// Apple's WWDR intermediate marker extension.
pub const WWDR_OID: &[u64] = &[1, 2, 840, 113635, 100, 6, 2, 1];
/// Apple's receipt-signing leaf marker extension.
pub const RECEIPT_SIGNER_OID: &[u64] = &[1, 2, 840, 113635, 100, 6, 11, 1];

/// How to build a chain.
#[derive(Clone, Copy)]
pub struct Options {
    /// The intermediate carries the WWDR marker.
    pub intermediate_marker: bool,
    /// The leaf carries the receipt-signing marker.
    pub leaf_marker: bool,
    /// The leaf's last valid year.
    pub leaf_until_year: i32,
}

impl Default for Options {
    fn default() -> Self {
        Options { intermediate_marker: true, leaf_marker: true, leaf_until_year: 2090 }
    }
}

/// One root, intermediate and leaf.
pub struct Pki {
    /// The root certificate (DER).
    pub root_der: Vec<u8>,
    chain: Vec<String>,
    leaf: ring::signature::EcdsaKeyPair,
}

fn params(cn: &str, ca: IsCa, marker: Option<&[u64]>) -> CertificateParams {
    let mut p = CertificateParams::new(Vec::<String>::new()).unwrap();
    p.distinguished_name.push(DnType::CommonName, cn);
    p.distinguished_name.push(DnType::OrganizationName, "Apple Inc.");
    p.key_usages = match ca {
        IsCa::Ca(_) => vec![KeyUsagePurpose::KeyCertSign, KeyUsagePurpose::CrlSign],
        _ => vec![KeyUsagePurpose::DigitalSignature],
    };
    p.is_ca = ca;
    if let Some(oid) = marker {
        p.custom_extensions.push(CustomExtension::from_oid_content(oid, vec![0x05, 0x00]));
    }
    p
}

impl Pki {
    /// A well-formed chain.
    pub fn new() -> Pki {
        Pki::with(Options::default())
    }

    /// A chain built with `o`.
    pub fn with(o: Options) -> Pki {
        let root_key = KeyPair::generate_for(&PKCS_ECDSA_P256_SHA256).unwrap();
        let root_params = params("Apple Root CA - G3", IsCa::Ca(BasicConstraints::Unconstrained), None);
        let root = root_params.self_signed(&root_key).unwrap();
        let root_issuer = Issuer::new(root_params, &root_key);
        let int_key = KeyPair::generate_for(&PKCS_ECDSA_P256_SHA256).unwrap();
        let int_params = params(
            "Apple Worldwide Developer Relations Certification Authority",
            IsCa::Ca(BasicConstraints::Constrained(0)),
            o.intermediate_marker.then_some(WWDR_OID),
        );
        let int = int_params.signed_by(&int_key, &root_issuer).unwrap();
        let int_issuer = Issuer::new(int_params, &int_key);
        let leaf_key = KeyPair::generate_for(&PKCS_ECDSA_P256_SHA256).unwrap();
        let mut leaf_params =
            params("Prod ECC Mac App Store and iTunes Store Receipt Signing", IsCa::NoCa, o.leaf_marker.then_some(RECEIPT_SIGNER_OID));
        leaf_params.not_before = rcgen::date_time_ymd(2000, 1, 1);
        leaf_params.not_after = rcgen::date_time_ymd(o.leaf_until_year, 1, 1);
        let leaf = leaf_params.signed_by(&leaf_key, &int_issuer).unwrap();
        let rng = ring::rand::SystemRandom::new();
        let signer =
            ring::signature::EcdsaKeyPair::from_pkcs8(&ring::signature::ECDSA_P256_SHA256_FIXED_SIGNING, &leaf_key.serialize_der(), &rng)
                .unwrap();
        let chain = [leaf.der().to_vec(), int.der().to_vec(), root.der().to_vec()].iter().map(|d| STANDARD.encode(d)).collect();
        Pki { root_der: root.der().to_vec(), chain, leaf: signer }
    }

    /// Writes the root as a PEM file under `dir`; its path.
    pub fn write_root(&self, dir: &std::path::Path) -> std::path::PathBuf {
        let path = dir.join(format!("apple-root-{}.pem", uuid::Uuid::new_v4()));
        let b64 = STANDARD.encode(&self.root_der);
        let lines: Vec<&str> = b64.as_bytes().chunks(64).map(|c| std::str::from_utf8(c).unwrap()).collect();
        std::fs::write(&path, format!("-----BEGIN CERTIFICATE-----\n{}\n-----END CERTIFICATE-----\n", lines.join("\n"))).unwrap();
        path
    }

    /// `payload` signed as a JWS with this chain in `x5c`.
    pub fn sign(&self, payload: &Value) -> String {
        self.sign_with_chain(payload, &self.chain)
    }

    /// `payload` signed with this leaf, `x5c` holding `chain` (base64 DER, leaf first).
    pub fn sign_with_chain(&self, payload: &Value, chain: &[String]) -> String {
        let header = json!({"alg": "ES256", "x5c": chain});
        let input = format!("{}.{}", URL_SAFE_NO_PAD.encode(header.to_string()), URL_SAFE_NO_PAD.encode(payload.to_string()));
        let sig = self.leaf.sign(&ring::rand::SystemRandom::new(), input.as_bytes()).unwrap();
        format!("{input}.{}", URL_SAFE_NO_PAD.encode(sig.as_ref()))
    }

    /// This chain (base64 DER, leaf first).
    pub fn chain(&self) -> Vec<String> {
        self.chain.clone()
    }
}

/// Milliseconds since the epoch, as Apple dates are sent.
pub fn ms(t: chrono::DateTime<chrono::Utc>) -> i64 {
    t.timestamp_millis()
}

/// A StoreKit 2 transaction payload.
pub struct Tx<'a> {
    /// `transactionId`.
    pub id: &'a str,
    /// `originalTransactionId`.
    pub original: &'a str,
    /// `productId`.
    pub product: &'a str,
    /// `purchaseDate`.
    pub purchased: chrono::DateTime<chrono::Utc>,
    /// `expiresDate` (subscriptions).
    pub expires: Option<chrono::DateTime<chrono::Utc>>,
    /// `signedDate`.
    pub signed: chrono::DateTime<chrono::Utc>,
    /// `appAccountToken`.
    pub account: Option<&'a str>,
}

/// A provider payload of `tests/fixtures/apple` (a conformance fixture carrying every field
/// Apple documents): the payloads below are built from these.
pub fn fixture(name: &str) -> Value {
    // From the server's tests and from the end-to-end crate beside it.
    let path = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("../server/tests/fixtures/apple").join(name);
    serde_json::from_str(&std::fs::read_to_string(&path).expect(name)).expect(name)
}

/// `v` without `keys`.
fn without(mut v: Value, keys: &[&str]) -> Value {
    if let Some(o) = v.as_object_mut() {
        for k in keys {
            o.remove(*k);
        }
    }
    v
}

impl Tx<'_> {
    /// The payload as Apple signs it (`bundleId`, `environment` given), from the fixture: a
    /// purchase at its list price, without an offer.
    pub fn payload(&self, bundle: &str, env: &str) -> Value {
        let mut v = without(fixture("transaction.json"), &["offerType", "offerIdentifier", "offerDiscountType", "offerPeriod"]);
        v["transactionId"] = json!(self.id);
        v["originalTransactionId"] = json!(self.original);
        v["bundleId"] = json!(bundle);
        v["productId"] = json!(self.product);
        v["purchaseDate"] = json!(ms(self.purchased));
        v["originalPurchaseDate"] = json!(ms(self.purchased));
        v["signedDate"] = json!(ms(self.signed));
        v["environment"] = json!(env);
        v["transactionReason"] = json!("PURCHASE");
        match self.expires {
            Some(e) => v["expiresDate"] = json!(ms(e)),
            None => {
                v = without(v, &["expiresDate", "subscriptionGroupIdentifier", "webOrderLineItemId", "isUpgraded"]);
                v["type"] = json!("Consumable");
            }
        }
        match self.account {
            Some(a) => v["appAccountToken"] = json!(a),
            None => v = without(v, &["appAccountToken"]),
        }
        v
    }
}

/// A notification payload (V2) around a signed transaction and optional renewal info, from the
/// SUBSCRIBED fixture's envelope.
pub fn notification(
    uuid: &str,
    kind: &str,
    subtype: Option<&str>,
    bundle: &str,
    env: &str,
    signed_tx: &str,
    renewal: Option<&str>,
) -> Value {
    let mut v = fixture("notifications/SUBSCRIBED.INITIAL_BUY.json");
    v["notificationType"] = json!(kind);
    v["notificationUUID"] = json!(uuid);
    v["signedDate"] = json!(ms(chrono::Utc::now()));
    match subtype {
        Some(s) => v["subtype"] = json!(s),
        None => v = without(v, &["subtype"]),
    }
    let data = &mut v["data"];
    data["environment"] = json!(env);
    data["bundleId"] = json!(bundle);
    data["signedTransactionInfo"] = json!(signed_tx);
    match renewal {
        Some(r) => data["signedRenewalInfo"] = json!(r),
        None => *data = without(data.take(), &["signedRenewalInfo"]),
    }
    v
}

/// A renewal info payload, from the fixture (no offer at the next renewal).
pub fn renewal(
    original: &str,
    product: &str,
    env: &str,
    auto_renew: bool,
    retry: bool,
    grace_until: Option<chrono::DateTime<chrono::Utc>>,
    signed: chrono::DateTime<chrono::Utc>,
) -> Value {
    let mut v = without(
        fixture("renewal-info.json"),
        &[
            "offerType",
            "offerIdentifier",
            "offerDiscountType",
            "offerPeriod",
            "appAccountToken",
            "renewalDate",
            "recentSubscriptionStartDate",
        ],
    );
    v["originalTransactionId"] = json!(original);
    v["autoRenewProductId"] = json!(product);
    v["productId"] = json!(product);
    v["autoRenewStatus"] = json!(i32::from(auto_renew));
    v["isInBillingRetryPeriod"] = json!(retry);
    v["signedDate"] = json!(ms(signed));
    v["environment"] = json!(env);
    if let Some(g) = grace_until {
        v["gracePeriodExpiresDate"] = json!(ms(g));
    }
    v
}

impl Pki {
    /// A notification fixture (decoded transaction and renewal info in `data`) signed as the
    /// App Store sends it: the nested payloads signed first, then the notification.
    pub fn sign_notification(&self, n: &Value) -> String {
        let mut n = n.clone();
        for key in ["signedTransactionInfo", "signedRenewalInfo"] {
            if let Some(inner) = n["data"].get(key).filter(|v| v.is_object()).cloned() {
                n["data"][key] = json!(self.sign(&inner));
            }
        }
        self.sign(&n)
    }
}
