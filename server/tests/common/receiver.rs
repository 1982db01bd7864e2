//! A webhook receiver on loopback for the tests (a real axum server), and the Standard Webhooks
//! signature check a receiver does, written independently of the server's signing code.
#![allow(dead_code)]

use axum::http::{HeaderMap, StatusCode};
use base64::Engine;
use hmac::{Hmac, Mac};
use serde_json::Value;
use sha2::Sha256;
use std::collections::HashMap;
use std::sync::atomic::{AtomicU16, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};

/// One request the receiver got.
#[derive(Debug, Clone)]
pub struct Received {
    pub id: String,
    pub timestamp: String,
    pub signature: String,
    pub body: Vec<u8>,
}

impl Received {
    pub fn json(&self) -> Value {
        serde_json::from_slice(&self.body).expect("JSON body")
    }
}

/// The status that makes the receiver wait 5 s before answering 200.
pub const HANG: u16 = 599;

/// A webhook receiver on 127.0.0.1 answering `status` (changeable) to every POST.
pub struct Receiver {
    pub url: String,
    got: Arc<Mutex<Vec<Received>>>,
    status: Arc<AtomicU16>,
    followed: Arc<AtomicUsize>,
}

impl Receiver {
    pub async fn start() -> Receiver {
        let got: Arc<Mutex<Vec<Received>>> = Arc::default();
        let status = Arc::new(AtomicU16::new(200));
        let followed = Arc::new(AtomicUsize::new(0));
        let (g, s, f) = (got.clone(), status.clone(), followed.clone());
        let app = axum::Router::new().route(
            "/hook",
            axum::routing::post(move |headers: HeaderMap, body: axum::body::Bytes| {
                let (g, s) = (g.clone(), s.clone());
                async move {
                    let h = |k: &str| headers.get(k).and_then(|v| v.to_str().ok()).unwrap_or("").to_string();
                    g.lock().unwrap().push(Received {
                        id: h("webhook-id"),
                        timestamp: h("webhook-timestamp"),
                        signature: h("webhook-signature"),
                        body: body.to_vec(),
                    });
                    let status = s.load(Ordering::SeqCst);
                    if status == HANG {
                        tokio::time::sleep(std::time::Duration::from_secs(5)).await;
                    }
                    // Every answer names a `Location`: a redirect status would send a
                    // follower to /elsewhere.
                    (
                        StatusCode::from_u16(if status == HANG { 200 } else { status }).unwrap(),
                        [(axum::http::header::LOCATION, "/elsewhere")],
                    )
                }
            }),
        );
        let app = app.route(
            "/elsewhere",
            axum::routing::any(move || {
                let f = f.clone();
                async move {
                    f.fetch_add(1, Ordering::SeqCst);
                    StatusCode::OK
                }
            }),
        );
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let url = format!("http://{}/hook", listener.local_addr().unwrap());
        tokio::spawn(async move { axum::serve(listener, app).await.unwrap() });
        Receiver { url, got, status, followed }
    }

    pub fn set_status(&self, s: u16) {
        self.status.store(s, Ordering::SeqCst);
    }

    /// Requests that followed a redirect to /elsewhere.
    pub fn followed(&self) -> usize {
        self.followed.load(Ordering::SeqCst)
    }

    pub fn all(&self) -> Vec<Received> {
        self.got.lock().unwrap().clone()
    }

    /// Every webhook id received, with how often it came.
    pub fn counts(&self) -> HashMap<String, usize> {
        let mut m = HashMap::new();
        for r in self.all() {
            *m.entry(r.id).or_default() += 1;
        }
        m
    }
}

/// Checks a delivery the way a receiver following Standard Webhooks does, written here
/// independently of the server's signing code.
pub fn verify(secret: &str, r: &Received) -> bool {
    let key = base64::engine::general_purpose::STANDARD.decode(secret.strip_prefix("whsec_").unwrap()).unwrap();
    let mut mac = Hmac::<Sha256>::new_from_slice(&key).unwrap();
    mac.update(format!("{}.{}.", r.id, r.timestamp).as_bytes());
    mac.update(&r.body);
    let want = format!("v1,{}", base64::engine::general_purpose::STANDARD.encode(mac.finalize().into_bytes()));
    r.signature.split(' ').any(|s| s == want)
}
