//! A fake Google on 127.0.0.1: the OAuth2 token endpoint (checking the service account's
//! RS256-signed JWT bearer assertion against its public key), the Play Developer API's
//! `purchases.subscriptionsv2.get`, `purchases.products.get`, `:acknowledge` and `:consume`
//! over a mutable in-memory state (only with an access token it issued), a JWKS, and Pub/Sub
//! push tokens signed with the JWKS key (or a foreign one). Test keys: `tests/fixtures/google`.
#![allow(dead_code)]

use axum::Router;
use axum::extract::{Path, State};
use axum::http::{HeaderMap, StatusCode};
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post};
use chrono::{DateTime, Utc};
use jsonwebtoken::{Algorithm, DecodingKey, EncodingKey, Header, Validation};
use serde_json::{Value, json};
use std::collections::HashMap;
use std::sync::{Arc, Mutex};

/// The package of the app under test.
pub const PACKAGE: &str = "com.example.tally";
/// The service account of the fake.
pub const SA_EMAIL: &str = "tally-verifier@example-project.iam.gserviceaccount.com";
/// The push subscription's service account.
pub const PUSH_EMAIL: &str = "rtdn-push@example-project.iam.gserviceaccount.com";
/// The push subscription's audience.
pub const PUSH_AUDIENCE: &str = "https://tally.example.com/v1/webhooks/google";
/// The kid of the push signing key.
pub const PUSH_KID: &str = "test-push-key-1";

fn fixture(name: &str) -> String {
    // From the server's tests and from the end-to-end crate beside it.
    let dir = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("../server/tests/fixtures/google");
    std::fs::read_to_string(dir.join(name)).expect(name)
}

/// What the fake holds and recorded.
#[derive(Default)]
pub struct Play {
    /// `subscriptionsv2` resources by purchase token.
    pub subs: HashMap<String, Value>,
    /// `products` resources by (product id, purchase token).
    pub products: HashMap<(String, String), Value>,
    /// `product:token` of every subscription acknowledged.
    pub acknowledged: Vec<String>,
    /// `product:token` of every product acknowledged.
    pub products_acknowledged: Vec<String>,
    /// `product:token` of every product consumed.
    pub consumed: Vec<String>,
    /// Token endpoint calls.
    pub token_requests: usize,
    /// Purchase reads.
    pub reads: usize,
    /// The status the API answers instead (Google down).
    pub fail_with: Option<u16>,
    issued: Vec<String>,
}

/// A running fake Google.
pub struct FakeGoogle {
    /// Its state.
    pub play: Arc<Mutex<Play>>,
    /// `http://127.0.0.1:port`.
    pub base: String,
    /// The service-account key file pointing at this fake.
    pub key_file: std::path::PathBuf,
    _dir: tempfile::TempDir,
}

type Shared = (Arc<Mutex<Play>>, String);

async fn token(State((play, base)): State<Shared>, body: String) -> Response {
    let form: HashMap<String, String> = serde_urlencoded::from_str(&body).unwrap_or_default();
    let key = DecodingKey::from_rsa_pem(fixture("test-service-account-pub.pem").as_bytes()).unwrap();
    let mut v = Validation::new(Algorithm::RS256);
    v.set_audience(&[format!("{base}/token")]);
    v.set_issuer(&[SA_EMAIL]);
    // The assertion's times are the server's clock's, which a test replaying fixtures sets to
    // their moment: the fake checks the signature, issuer, audience and scope, not the time.
    v.validate_exp = false;
    let ok = form.get("grant_type").map(String::as_str) == Some("urn:ietf:params:oauth:grant-type:jwt-bearer")
        && form
            .get("assertion")
            .and_then(|a| jsonwebtoken::decode::<Value>(a, &key, &v).ok())
            .is_some_and(|d| d.claims["scope"] == "https://www.googleapis.com/auth/androidpublisher");
    let mut p = play.lock().unwrap();
    p.token_requests += 1;
    if !ok {
        return (StatusCode::BAD_REQUEST, axum::Json(json!({"error": "invalid_grant", "error_description": "bad assertion"})))
            .into_response();
    }
    let t = format!("ya29.fake-{}", p.token_requests);
    p.issued.push(t.clone());
    axum::Json(json!({"access_token": t, "expires_in": 3599, "token_type": "Bearer"})).into_response()
}

fn google_error(code: u16, msg: &str) -> Response {
    (StatusCode::from_u16(code).unwrap(), axum::Json(json!({"error": {"code": code, "message": msg}}))).into_response()
}

/// Checks the bearer and the package; the error answer otherwise.
fn gate(p: &mut Play, headers: &HeaderMap, package: &str) -> Option<Response> {
    let bearer = headers.get("authorization").and_then(|v| v.to_str().ok()).and_then(|v| v.strip_prefix("Bearer ")).unwrap_or("");
    if !p.issued.iter().any(|t| t == bearer) {
        return Some(google_error(401, "Request had invalid authentication credentials."));
    }
    if let Some(code) = p.fail_with {
        return Some(google_error(code, "Backend Error"));
    }
    if package != PACKAGE {
        return Some(google_error(404, "No application was found for the given package name."));
    }
    None
}

async fn get_sub(State((play, _)): State<Shared>, headers: HeaderMap, Path((package, token)): Path<(String, String)>) -> Response {
    let mut p = play.lock().unwrap();
    if let Some(r) = gate(&mut p, &headers, &package) {
        return r;
    }
    p.reads += 1;
    match p.subs.get(&token) {
        Some(s) => axum::Json(s.clone()).into_response(),
        None => google_error(404, "The purchase token was not found."),
    }
}

async fn get_product(
    State((play, _)): State<Shared>,
    headers: HeaderMap,
    Path((package, product, token)): Path<(String, String, String)>,
) -> Response {
    let mut p = play.lock().unwrap();
    if let Some(r) = gate(&mut p, &headers, &package) {
        return r;
    }
    p.reads += 1;
    match p.products.get(&(product, token)) {
        Some(s) => axum::Json(s.clone()).into_response(),
        None => google_error(404, "The purchase token was not found."),
    }
}

async fn post_sub(
    State((play, _)): State<Shared>,
    headers: HeaderMap,
    Path((package, product, action)): Path<(String, String, String)>,
) -> Response {
    let mut p = play.lock().unwrap();
    if let Some(r) = gate(&mut p, &headers, &package) {
        return r;
    }
    let Some(token) = action.strip_suffix(":acknowledge") else { return google_error(404, "no such method") };
    let Some(s) = p.subs.get_mut(token) else { return google_error(404, "The purchase token was not found.") };
    if s["acknowledgementState"] == "ACKNOWLEDGEMENT_STATE_ACKNOWLEDGED" {
        return google_error(400, "The subscription purchase is already acknowledged.");
    }
    s["acknowledgementState"] = json!("ACKNOWLEDGEMENT_STATE_ACKNOWLEDGED");
    p.acknowledged.push(format!("{product}:{token}"));
    StatusCode::NO_CONTENT.into_response()
}

async fn post_product(
    State((play, _)): State<Shared>,
    headers: HeaderMap,
    Path((package, product, action)): Path<(String, String, String)>,
) -> Response {
    let mut p = play.lock().unwrap();
    if let Some(r) = gate(&mut p, &headers, &package) {
        return r;
    }
    let (token, field, value) = match (action.strip_suffix(":acknowledge"), action.strip_suffix(":consume")) {
        (Some(t), _) => (t.to_string(), "acknowledgementState", 1),
        (_, Some(t)) => (t.to_string(), "consumptionState", 1),
        _ => return google_error(404, "no such method"),
    };
    let key = (product.clone(), token.clone());
    let Some(s) = p.products.get_mut(&key) else { return google_error(404, "The purchase token was not found.") };
    s[field] = json!(value);
    let entry = format!("{product}:{token}");
    if field == "consumptionState" {
        p.consumed.push(entry)
    } else {
        p.products_acknowledged.push(entry)
    }
    StatusCode::NO_CONTENT.into_response()
}

impl FakeGoogle {
    /// Starts the fake on a free loopback port.
    pub async fn start() -> FakeGoogle {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let base = format!("http://{}", listener.local_addr().unwrap());
        let play = Arc::new(Mutex::new(Play::default()));
        let jwks: Value = serde_json::from_str(&fixture("test-push-signer-jwks.json")).unwrap();
        let api = "/androidpublisher/v3/applications/{package}/purchases";
        let router = Router::new()
            .route("/token", post(token))
            .route("/jwks", get(move || async move { axum::Json(jwks) }))
            .route(&format!("{api}/subscriptionsv2/tokens/{{token}}"), get(get_sub))
            .route(&format!("{api}/products/{{product}}/tokens/{{token}}"), get(get_product).post(post_product))
            .route(&format!("{api}/subscriptions/{{product}}/tokens/{{action}}"), post(post_sub))
            .with_state((play.clone(), base.clone()));
        tokio::spawn(async move { axum::serve(listener, router).await.unwrap() });
        let dir = tempfile::tempdir().unwrap();
        let key_file = dir.path().join("service-account.json");
        let file = json!({"type": "service_account", "project_id": "example-project", "private_key_id": "test-sa-key-1",
            "private_key": fixture("test-service-account-key.pem"), "client_email": SA_EMAIL, "token_uri": format!("{base}/token")});
        std::fs::write(&key_file, file.to_string()).unwrap();
        FakeGoogle { play, base, key_file, _dir: dir }
    }

    /// Points `c` at this fake (API, token endpoint, JWKS, push audience and email).
    pub fn configure(&self, c: &mut tally_server::Config) {
        c.google_service_account_file = Some(self.key_file.clone());
        c.google_package_name = Some(PACKAGE.into());
        c.google_api_base = self.base.clone();
        c.google_push_jwks_url = format!("{}/jwks", self.base);
        c.google_push_audience = Some(PUSH_AUDIENCE.into());
        c.google_push_email = Some(PUSH_EMAIL.into());
    }

    /// The environment of a `tally-server` process pointed at this fake.
    pub fn env(&self) -> Vec<(&'static str, String)> {
        vec![
            ("TALLY_GOOGLE_SERVICE_ACCOUNT_FILE", self.key_file.display().to_string()),
            ("TALLY_GOOGLE_PACKAGE_NAME", PACKAGE.into()),
            ("TALLY_GOOGLE_API_BASE", self.base.clone()),
            ("TALLY_GOOGLE_PUSH_JWKS_URL", format!("{}/jwks", self.base)),
            ("TALLY_GOOGLE_PUSH_AUDIENCE", PUSH_AUDIENCE.into()),
            ("TALLY_GOOGLE_PUSH_EMAIL", PUSH_EMAIL.into()),
        ]
    }

    /// Sets the `subscriptionsv2` resource of `token`.
    pub fn set_sub(&self, token: &str, v: Value) {
        self.play.lock().unwrap().subs.insert(token.into(), v);
    }

    /// Changes the `subscriptionsv2` resource of `token`.
    pub fn edit_sub(&self, token: &str, f: impl FnOnce(&mut Value)) {
        f(self.play.lock().unwrap().subs.get_mut(token).expect("known token"));
    }

    /// Sets the `products` resource of (`product`, `token`) (its `productId` and `purchaseToken`
    /// set to them).
    pub fn set_product(&self, product: &str, token: &str, mut v: Value) {
        v["productId"] = json!(product);
        v["purchaseToken"] = json!(token);
        self.play.lock().unwrap().products.insert((product.into(), token.into()), v);
    }

    /// Changes the `products` resource of (`product`, `token`).
    pub fn edit_product(&self, product: &str, token: &str, f: impl FnOnce(&mut Value)) {
        f(self.play.lock().unwrap().products.get_mut(&(product.to_string(), token.to_string())).expect("known product token"));
    }

    /// The API answers `status` (or works again with `None`).
    pub fn fail_with(&self, status: Option<u16>) {
        self.play.lock().unwrap().fail_with = status;
    }
}

/// RFC 3339 of `t`, as Google writes it.
pub fn rfc3339(t: DateTime<Utc>) -> String {
    t.to_rfc3339_opts(chrono::SecondsFormat::Millis, true)
}

/// A provider payload of `tests/fixtures/google` (a conformance fixture carrying every field
/// Google documents): the fake's answers and pushes are built from these.
pub fn payload(name: &str) -> Value {
    serde_json::from_str(&fixture(name)).expect(name)
}

/// The state context `subscriptionsv2` carries in each state (absent in the others).
const STATE_CONTEXTS: [(&str, &str); 4] = [
    ("SUBSCRIPTION_STATE_CANCELED", "canceledStateContext"),
    ("SUBSCRIPTION_STATE_PAUSED", "pausedStateContext"),
    ("SUBSCRIPTION_STATE_ON_HOLD", "onHoldStateContext"),
    ("SUBSCRIPTION_STATE_IN_GRACE_PERIOD", "inGracePeriodStateContext"),
];

/// A `subscriptionsv2` resource of one line item, from the fixture: not a tester's purchase,
/// replacing no token, with the state context of `state` only.
pub fn subscription(product: &str, state: &str, start: DateTime<Utc>, expiry: DateTime<Utc>, account: Option<&str>, order: &str) -> Value {
    let mut v = payload("subscriptionsv2.json");
    let o = v.as_object_mut().unwrap();
    for key in ["linkedPurchaseToken", "testPurchase", "outOfAppPurchaseContext"] {
        o.remove(key);
    }
    for (s, key) in STATE_CONTEXTS {
        if s != state {
            o.remove(key);
        }
    }
    v["startTime"] = json!(rfc3339(start));
    v["subscriptionState"] = json!(state);
    v["latestOrderId"] = json!(order);
    v["acknowledgementState"] = json!("ACKNOWLEDGEMENT_STATE_PENDING");
    let item = &mut v["lineItems"][0];
    item["productId"] = json!(product);
    item["expiryTime"] = json!(rfc3339(expiry));
    item["latestSuccessfulOrderId"] = json!(order);
    item["autoRenewingPlan"]["autoRenewEnabled"] = json!(state != "SUBSCRIPTION_STATE_CANCELED");
    match account {
        Some(a) => v["externalAccountIdentifiers"]["obfuscatedExternalAccountId"] = json!(a),
        None => drop(v.as_object_mut().unwrap().remove("externalAccountIdentifiers")),
    }
    v
}

/// A `products` resource, from the fixture (not a tester's purchase); [`FakeGoogle::set_product`]
/// fills in its product id and token.
pub fn product(state: i64, bought: DateTime<Utc>, account: Option<&str>, order: &str) -> Value {
    let mut v = payload("product-purchase.json");
    v.as_object_mut().unwrap().remove("purchaseType");
    v["purchaseTimeMillis"] = json!(bought.timestamp_millis().to_string());
    v["purchaseState"] = json!(state);
    v["consumptionState"] = json!(0);
    v["acknowledgementState"] = json!(0);
    v["orderId"] = json!(order);
    match account {
        Some(a) => v["obfuscatedExternalAccountId"] = json!(a),
        None => drop(v.as_object_mut().unwrap().remove("obfuscatedExternalAccountId")),
    }
    v
}

/// A push token signed with the fake's JWKS key; `claims` override the defaults (`null`
/// removes a claim).
pub fn push_token(claims: Value) -> String {
    sign_push(&fixture("test-push-signer-key.pem"), claims)
}

/// A push token signed with a key nobody trusts (same kid).
pub fn foreign_push_token() -> String {
    sign_push(&fixture("test-foreign-signer-key.pem"), json!({}))
}

fn sign_push(pem: &str, overrides: Value) -> String {
    let now = Utc::now().timestamp();
    let mut c = json!({"iss": "https://accounts.google.com", "aud": PUSH_AUDIENCE, "email": PUSH_EMAIL, "email_verified": true,
        "sub": "112233445566778899", "azp": "112233445566778899", "iat": now, "exp": now + 3600});
    for (k, v) in overrides.as_object().cloned().unwrap_or_default() {
        if v.is_null() {
            c.as_object_mut().unwrap().remove(&k);
        } else {
            c[k] = v;
        }
    }
    let mut h = Header::new(Algorithm::RS256);
    h.kid = Some(PUSH_KID.into());
    jsonwebtoken::encode(&h, &c, &EncodingKey::from_rsa_pem(pem.as_bytes()).unwrap()).unwrap()
}

/// A Pub/Sub push body carrying `rtdn` (the notification object without `packageName`), as
/// Pub/Sub sends it (the fixture: both spellings of the id and the publish time).
pub fn push_body(message_id: &str, mut rtdn: Value) -> Value {
    if rtdn.get("packageName").is_none() {
        rtdn["packageName"] = json!(PACKAGE);
    }
    rtdn["version"] = json!("1.0");
    rtdn["eventTimeMillis"] = json!(Utc::now().timestamp_millis().to_string());
    wrap_push(message_id, &rtdn, Utc::now())
}

/// The Pub/Sub push fixture carrying `rtdn` as its data, with `message_id` and `published`
/// under both spellings.
pub fn wrap_push(message_id: &str, rtdn: &Value, published: DateTime<Utc>) -> Value {
    use base64::Engine;
    let mut v = payload("pubsub-push.json");
    let m = &mut v["message"];
    m["data"] = json!(base64::engine::general_purpose::STANDARD.encode(rtdn.to_string()));
    m["messageId"] = json!(message_id);
    m["message_id"] = json!(message_id);
    m["publishTime"] = json!(rfc3339(published));
    m["publish_time"] = json!(rfc3339(published));
    v
}
