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

impl Tx<'_> {
    /// The payload as Apple signs it (`bundleId`, `environment` given).
    pub fn payload(&self, bundle: &str, env: &str) -> Value {
        let mut v = json!({
            "transactionId": self.id, "originalTransactionId": self.original, "bundleId": bundle, "productId": self.product,
            "purchaseDate": ms(self.purchased), "originalPurchaseDate": ms(self.purchased), "quantity": 1,
            "type": if self.expires.is_some() { "Auto-Renewable Subscription" } else { "Consumable" },
            "inAppOwnershipType": "PURCHASED", "signedDate": ms(self.signed), "environment": env,
            "transactionReason": "PURCHASE", "storefront": "USA", "storefrontId": "143441", "price": 4990, "currency": "USD",
        });
        if let Some(e) = self.expires {
            v["expiresDate"] = json!(ms(e));
        }
        if let Some(a) = self.account {
            v["appAccountToken"] = json!(a);
        }
        v
    }
}

/// A notification payload (V2) around a signed transaction and optional renewal info.
pub fn notification(
    uuid: &str,
    kind: &str,
    subtype: Option<&str>,
    bundle: &str,
    env: &str,
    signed_tx: &str,
    renewal: Option<&str>,
) -> Value {
    let mut data = json!({"environment": env, "bundleId": bundle, "bundleVersion": "1", "signedTransactionInfo": signed_tx, "status": 1});
    if let Some(r) = renewal {
        data["signedRenewalInfo"] = json!(r);
    }
    let mut v =
        json!({"notificationType": kind, "notificationUUID": uuid, "version": "2.0", "signedDate": ms(chrono::Utc::now()), "data": data});
    if let Some(s) = subtype {
        v["subtype"] = json!(s);
    }
    v
}

/// A renewal info payload.
pub fn renewal(
    original: &str,
    product: &str,
    env: &str,
    auto_renew: bool,
    retry: bool,
    grace_until: Option<chrono::DateTime<chrono::Utc>>,
    signed: chrono::DateTime<chrono::Utc>,
) -> Value {
    let mut v = json!({"originalTransactionId": original, "autoRenewProductId": product, "productId": product,
        "autoRenewStatus": i32::from(auto_renew), "isInBillingRetryPeriod": retry, "signedDate": ms(signed), "environment": env});
    if let Some(g) = grace_until {
        v["gracePeriodExpiresDate"] = json!(ms(g));
    }
    v
}
