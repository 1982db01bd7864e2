//! Outbound webhooks across real `tally-server` processes on one Postgres: two replicas deliver
//! each event once, and a server killed (SIGKILL) in the middle of a delivery has it sent again,
//! with the same `webhook-id`, once its lease runs out.

use serde_json::{Value, json};
use std::collections::HashMap;
use std::io::{BufRead, BufReader, Read, Write};
use std::net::{TcpListener, TcpStream};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};
use tally_e2e::{Server, id_token, raw_request, shared_cluster};

const ADMIN: &str = "webhook-admin";

/// A webhook receiver on loopback: records every request's `webhook-id`; answers 200, or (in
/// hang mode) never answers.
struct Receiver {
    url: String,
    ids: Arc<Mutex<Vec<String>>>,
    hang: Arc<AtomicBool>,
}

impl Receiver {
    fn start() -> Receiver {
        let listener = TcpListener::bind("127.0.0.1:0").expect("bind");
        let url = format!("http://{}/hook", listener.local_addr().expect("addr"));
        let ids: Arc<Mutex<Vec<String>>> = Arc::default();
        let hang = Arc::new(AtomicBool::new(false));
        let (i, h) = (ids.clone(), hang.clone());
        std::thread::spawn(move || {
            for stream in listener.incoming().flatten() {
                let (i, h) = (i.clone(), h.clone());
                std::thread::spawn(move || serve(stream, &i, &h));
            }
        });
        Receiver { url, ids, hang }
    }

    fn ids(&self) -> Vec<String> {
        self.ids.lock().expect("ids").clone()
    }

    fn counts(&self) -> HashMap<String, usize> {
        let mut m = HashMap::new();
        for id in self.ids() {
            *m.entry(id).or_default() += 1;
        }
        m
    }
}

fn serve(stream: TcpStream, ids: &Mutex<Vec<String>>, hang: &AtomicBool) {
    let mut reader = BufReader::new(match stream.try_clone() {
        Ok(s) => s,
        Err(_) => return,
    });
    let (mut id, mut len) = (String::new(), 0usize);
    loop {
        let mut line = String::new();
        if reader.read_line(&mut line).unwrap_or(0) == 0 {
            return;
        }
        let line = line.trim_end();
        if line.is_empty() {
            break;
        }
        if let Some((k, v)) = line.split_once(':') {
            match k.trim().to_ascii_lowercase().as_str() {
                "webhook-id" => id = v.trim().to_string(),
                "content-length" => len = v.trim().parse().unwrap_or(0),
                _ => {}
            }
        }
    }
    let mut body = vec![0; len];
    if reader.read_exact(&mut body).is_err() {
        return;
    }
    ids.lock().expect("ids").push(id);
    if hang.load(Ordering::SeqCst) {
        // Keep the connection open and silent until the sender goes away.
        std::thread::sleep(Duration::from_secs(30));
        return;
    }
    let mut stream = stream;
    let _ = stream.write_all(b"HTTP/1.1 200 OK\r\ncontent-length: 0\r\nconnection: close\r\n\r\n");
}

fn env() -> Vec<(&'static str, &'static str)> {
    vec![
        ("TALLY_ADMIN_SUBJECTS", ADMIN),
        ("TALLY_WEBHOOK_ALLOW_PRIVATE", "1"),
        ("TALLY_WEBHOOK_POLL_MS", "20"),
        ("TALLY_WEBHOOK_BACKOFF_MS", "100"),
        ("TALLY_WEBHOOK_TIMEOUT_MS", "1000"),
    ]
}

fn call(server: &Server, method: &str, path: &str, body: Option<Value>) -> (u16, Value) {
    let body = body.map(|b| b.to_string());
    let (s, text) = raw_request(method, &format!("{}{path}", server.url), Some(&id_token(ADMIN)), body.as_deref()).expect("request");
    (s, serde_json::from_str(&text).unwrap_or(Value::Null))
}

fn register(server: &Server, url: &str) -> String {
    let (s, v) =
        call(server, "POST", "/v1/admin/webhooks", Some(json!({"url": url, "events": ["credits.granted", "entitlements.changed"]})));
    assert_eq!(s, 201, "{v}");
    v["id"].as_str().expect("id").to_string()
}

fn grant(server: &Server, subject: &str) {
    let (s, v) = call(server, "POST", "/v1/admin/grants", Some(json!({"subject": subject, "credits": 3, "reason": "gift"})));
    assert_eq!(s, 201, "{v}");
}

fn deliveries(server: &Server, endpoint: &str) -> Vec<Value> {
    let (s, v) = call(server, "GET", &format!("/v1/admin/webhooks/{endpoint}/deliveries?limit=1000"), None);
    assert_eq!(s, 200, "{v}");
    v["deliveries"].as_array().cloned().unwrap_or_default()
}

fn wait_for(what: &str, secs: u64, mut f: impl FnMut() -> bool) {
    let deadline = Instant::now() + Duration::from_secs(secs);
    while !f() {
        assert!(Instant::now() < deadline, "timed out waiting for {what}");
        std::thread::sleep(Duration::from_millis(10));
    }
}

/// A data directory and a fresh database of the binary's shared cluster; `None` when PostgreSQL
/// is not installed and not required.
fn database(name: &str) -> Option<(tempfile::TempDir, String)> {
    let pg = shared_cluster()?;
    let dir = tempfile::Builder::new().prefix("tally-e2e-webhooks-").tempdir_in("/tmp").expect("tempdir");
    let rt = tokio::runtime::Builder::new_current_thread().enable_all().build().expect("runtime");
    let db = rt.block_on(pg.create_database(name)).expect("database");
    Some((dir, db))
}

#[test]
fn two_replicas_deliver_each_event_id_once() {
    let Some((dir, db)) = database("webhooks_replicas") else { return };
    let e = env();
    let a = Server::start(&db, &dir.path().join("server"), &e);
    let b = Server::start(&db, &dir.path().join("server"), &e);
    let r = Receiver::start();
    let endpoint = register(&a, &r.url);
    let users = 40;
    for u in 0..users {
        grant(if u % 2 == 0 { &a } else { &b }, &format!("replica-user-{u}"));
    }
    let want = users * 2; // credits.granted and entitlements.changed per grant
    wait_for("every delivery recorded", 30, || {
        let d = deliveries(&a, &endpoint);
        d.len() == want && d.iter().all(|d| d["state"] == "delivered")
    });
    let counts = r.counts();
    assert_eq!(counts.len(), want, "every event arrived");
    let twice: Vec<_> = counts.iter().filter(|(_, n)| **n > 1).collect();
    assert!(twice.is_empty(), "no event id was delivered twice by the two replicas: {twice:?}");
    assert!(deliveries(&b, &endpoint).iter().all(|d| d["attempts"] == 1), "one attempt each");
}

#[test]
fn a_server_killed_mid_delivery_has_it_redelivered_with_the_same_id() {
    let Some((dir, db)) = database("webhooks_kill") else { return };
    let mut server = Server::start(&db, &dir.path().join("server"), &env());
    let r = Receiver::start();
    r.hang.store(true, Ordering::SeqCst);
    let (s, v) = call(&server, "POST", "/v1/admin/webhooks", Some(json!({"url": r.url, "events": ["credits.granted"]})));
    assert_eq!(s, 201, "{v}");
    let endpoint = v["id"].as_str().expect("id").to_string();
    grant(&server, "killed-mid-delivery");
    // The request is in flight (the receiver holds it): kill the server now.
    wait_for("the first request", 10, || !r.ids().is_empty());
    server.kill9();
    let first = r.ids()[0].clone();
    r.hang.store(false, Ordering::SeqCst);
    server.restart();
    // Its lease (2 × timeout + 1 s) runs out and the restarted server sends it again.
    wait_for("the redelivery", 30, || deliveries(&server, &endpoint).first().is_some_and(|d| d["state"] == "delivered"));
    let ids = r.ids();
    assert_eq!(ids, vec![first.clone(), first], "the same webhook-id, once more, after the crash");
    let d = &deliveries(&server, &endpoint)[0];
    assert_eq!(d["attempts"], 2, "{d}");
    assert_eq!(d["attempt_log"].as_array().map(Vec::len), Some(1), "the killed attempt left no record, the second did: {d}");
}
