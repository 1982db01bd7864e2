//! A fault-injecting HTTP/1.1 proxy on loopback, standing where a load balancer or a flaky
//! network stands in front of `tally-server`.
//!
//! Each request is read in full (headers and `Content-Length` body) and then, decided by a
//! seeded RNG in request order (so a run is reproducible from its seed while requests arrive one
//! at a time):
//! - refused with `413` when the body is above the proxy's own cap (like nginx's
//!   `client_max_body_size`; always applied, in clean mode too);
//! - answered `500`/`502`/`503` without being forwarded;
//! - forwarded, and the answer thrown away or cut in the middle (a lost answer: the server has
//!   committed, the client never learns it);
//! - delayed, then forwarded;
//! - or simply forwarded.
//!
//! One request per connection (`Connection: close` both ways). The proxy stops when dropped.

use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};
use std::io::{Read, Write};
use std::net::{Shutdown, SocketAddr, TcpListener, TcpStream};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::thread::JoinHandle;
use std::time::Duration;

/// Probabilities (in percent, per request) of the faults a [`FaultProxy`] injects.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Faults {
    /// Answer 500, 502 or 503 without forwarding.
    pub fail_pct: u8,
    /// Forward, then lose the answer (closed before or in the middle of it).
    pub cut_pct: u8,
    /// Wait up to `max_delay_ms` before forwarding.
    pub delay_pct: u8,
    /// Longest delay.
    pub max_delay_ms: u64,
}

impl Faults {
    /// No faults: every request within the body cap is forwarded and answered.
    pub const CLEAN: Faults = Faults { fail_pct: 0, cut_pct: 0, delay_pct: 0, max_delay_ms: 0 };
}

/// What a [`FaultProxy`] did so far.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct ProxyStats {
    /// Requests read.
    pub requests: u64,
    /// Forwarded and answered.
    pub forwarded: u64,
    /// Answered 5xx without forwarding.
    pub failed: u64,
    /// Forwarded, answer lost.
    pub cut: u64,
    /// Delayed before forwarding.
    pub delayed: u64,
    /// Refused 413 (body above the cap).
    pub too_large: u64,
    /// Largest request body seen.
    pub largest_body: u64,
}

#[derive(Default)]
struct Counters {
    requests: AtomicU64,
    forwarded: AtomicU64,
    failed: AtomicU64,
    cut: AtomicU64,
    delayed: AtomicU64,
    too_large: AtomicU64,
    largest_body: AtomicU64,
}

struct Shared {
    upstream: SocketAddr,
    body_cap: usize,
    stop: AtomicBool,
    plan: Mutex<(Faults, StdRng)>,
    counters: Counters,
}

/// What to do with one request.
enum Action {
    TooLarge,
    Fail(u16),
    Cut { partial: bool },
    Forward { delay: Option<Duration> },
}

/// A running proxy (see the module docs). Stops accepting when dropped.
pub struct FaultProxy {
    /// Base URL (`http://127.0.0.1:port`).
    pub url: String,
    addr: SocketAddr,
    shared: Arc<Shared>,
    accept: Option<JoinHandle<()>>,
}

/// Largest request head or body the proxy reads at all.
const READ_LIMIT: usize = 64 * 1024 * 1024;

impl FaultProxy {
    /// Starts a proxy in front of `upstream` (`http://127.0.0.1:port`) refusing bodies above
    /// `body_cap` bytes, with faults decided by an RNG seeded with `seed`. Starts clean.
    pub fn start(upstream: &str, body_cap: usize, seed: u64) -> FaultProxy {
        let upstream: SocketAddr =
            upstream.trim_start_matches("http://").trim_end_matches('/').parse().expect("upstream must be http://127.0.0.1:port");
        let listener = TcpListener::bind("127.0.0.1:0").expect("bind proxy");
        let addr = listener.local_addr().expect("proxy address");
        let shared = Arc::new(Shared {
            upstream,
            body_cap,
            stop: AtomicBool::new(false),
            plan: Mutex::new((Faults::CLEAN, StdRng::seed_from_u64(seed))),
            counters: Counters::default(),
        });
        let s = shared.clone();
        let accept = std::thread::spawn(move || {
            for conn in listener.incoming() {
                if s.stop.load(Ordering::SeqCst) {
                    break;
                }
                let Ok(conn) = conn else { continue };
                let s = s.clone();
                std::thread::spawn(move || handle(&s, conn));
            }
        });
        FaultProxy { url: format!("http://{addr}"), addr, shared, accept: Some(accept) }
    }

    /// Sets the faults of the following requests.
    pub fn set_faults(&self, faults: Faults) {
        self.shared.plan.lock().unwrap_or_else(|e| e.into_inner()).0 = faults;
    }

    /// The body cap (bytes).
    pub fn body_cap(&self) -> usize {
        self.shared.body_cap
    }

    /// Counts so far.
    pub fn stats(&self) -> ProxyStats {
        let c = &self.shared.counters;
        let l = |a: &AtomicU64| a.load(Ordering::SeqCst);
        ProxyStats {
            requests: l(&c.requests),
            forwarded: l(&c.forwarded),
            failed: l(&c.failed),
            cut: l(&c.cut),
            delayed: l(&c.delayed),
            too_large: l(&c.too_large),
            largest_body: l(&c.largest_body),
        }
    }
}

impl Drop for FaultProxy {
    fn drop(&mut self) {
        self.shared.stop.store(true, Ordering::SeqCst);
        // Wake the accept loop so it sees the flag.
        let _ = TcpStream::connect_timeout(&self.addr, Duration::from_secs(1));
        if let Some(h) = self.accept.take() {
            let _ = h.join();
        }
    }
}

fn decide(s: &Shared, body_len: usize) -> Action {
    let mut plan = s.plan.lock().unwrap_or_else(|e| e.into_inner());
    let (faults, rng) = &mut *plan;
    // Draw the same numbers whatever the outcome, so one request's fate does not shift the
    // next one's.
    let roll: u8 = rng.random_range(0..100);
    let status = [500u16, 502, 503][rng.random_range(0..3usize)];
    let partial = rng.random_bool(0.5);
    let delay = Duration::from_millis(rng.random_range(0..=faults.max_delay_ms));
    if body_len > s.body_cap {
        return Action::TooLarge;
    }
    let (f, c, d) = (u16::from(faults.fail_pct), u16::from(faults.cut_pct), u16::from(faults.delay_pct));
    let roll = u16::from(roll);
    if roll < f {
        Action::Fail(status)
    } else if roll < f + c {
        Action::Cut { partial }
    } else if roll < f + c + d {
        Action::Forward { delay: Some(delay) }
    } else {
        Action::Forward { delay: None }
    }
}

fn handle(s: &Shared, mut client: TcpStream) {
    if s.stop.load(Ordering::SeqCst) {
        return;
    }
    let _ = client.set_read_timeout(Some(Duration::from_secs(30)));
    let _ = client.set_write_timeout(Some(Duration::from_secs(30)));
    let Some((head, body)) = read_request(&mut client) else {
        let _ = client.shutdown(Shutdown::Both);
        return;
    };
    let c = &s.counters;
    c.requests.fetch_add(1, Ordering::SeqCst);
    c.largest_body.fetch_max(body.len() as u64, Ordering::SeqCst);
    match decide(s, body.len()) {
        Action::TooLarge => {
            c.too_large.fetch_add(1, Ordering::SeqCst);
            // nginx answers an HTML page, not the API's JSON error body.
            respond(&mut client, 413, "Request Entity Too Large", "<html><head><title>413 Request Entity Too Large</title></head></html>");
        }
        Action::Fail(status) => {
            c.failed.fetch_add(1, Ordering::SeqCst);
            let reason = match status {
                500 => "Internal Server Error",
                502 => "Bad Gateway",
                _ => "Service Unavailable",
            };
            respond(&mut client, status, reason, &format!("<html><head><title>{status} {reason}</title></head></html>"));
        }
        Action::Cut { partial } => {
            // The server answers in full (it has committed); the client gets nothing, or half.
            let answer = forward(s.upstream, &head, &body).unwrap_or_default();
            c.cut.fetch_add(1, Ordering::SeqCst);
            if partial {
                let _ = client.write_all(&answer[..answer.len() / 2]);
                let _ = client.flush();
            }
        }
        Action::Forward { delay } => {
            if let Some(d) = delay {
                c.delayed.fetch_add(1, Ordering::SeqCst);
                std::thread::sleep(d);
            }
            match forward(s.upstream, &head, &body) {
                Some(answer) => {
                    c.forwarded.fetch_add(1, Ordering::SeqCst);
                    let _ = client.write_all(&answer);
                    let _ = client.flush();
                }
                None => respond(&mut client, 502, "Bad Gateway", "<html><head><title>502 Bad Gateway</title></head></html>"),
            }
        }
    }
    let _ = client.shutdown(Shutdown::Both);
}

/// Reads one request: its head (without the final blank line) and its body.
fn read_request(client: &mut TcpStream) -> Option<(String, Vec<u8>)> {
    let mut buf = Vec::new();
    let mut chunk = [0u8; 16384];
    let head_end = loop {
        if let Some(i) = buf.windows(4).position(|w| w == b"\r\n\r\n") {
            break i;
        }
        if buf.len() > READ_LIMIT {
            return None;
        }
        let n = client.read(&mut chunk).ok()?;
        if n == 0 {
            return None;
        }
        buf.extend_from_slice(&chunk[..n]);
    };
    let head = String::from_utf8_lossy(&buf[..head_end]).into_owned();
    let mut body = buf.split_off(head_end + 4);
    let mut length = 0usize;
    for line in head.lines().skip(1) {
        let Some((name, value)) = line.split_once(':') else { continue };
        if name.trim().eq_ignore_ascii_case("content-length") {
            length = value.trim().parse().ok()?;
        }
        if name.trim().eq_ignore_ascii_case("transfer-encoding") {
            // The clients under test send sized bodies; refuse anything else loudly.
            let _ = respond_raw(client, 411, "Length Required");
            return None;
        }
    }
    if length > READ_LIMIT {
        return None;
    }
    while body.len() < length {
        let n = client.read(&mut chunk).ok()?;
        if n == 0 {
            return None;
        }
        body.extend_from_slice(&chunk[..n]);
    }
    body.truncate(length);
    Some((head, body))
}

/// Sends the request upstream with `Connection: close` and reads the whole answer.
fn forward(upstream: SocketAddr, head: &str, body: &[u8]) -> Option<Vec<u8>> {
    let mut server = TcpStream::connect_timeout(&upstream, Duration::from_secs(10)).ok()?;
    let _ = server.set_read_timeout(Some(Duration::from_secs(60)));
    let mut out = String::with_capacity(head.len() + 32);
    for (i, line) in head.split("\r\n").enumerate() {
        let name = line.split_once(':').map(|(n, _)| n.trim().to_ascii_lowercase());
        if i > 0 && matches!(name.as_deref(), Some("connection" | "keep-alive")) {
            continue;
        }
        out.push_str(line);
        out.push_str("\r\n");
    }
    out.push_str("Connection: close\r\n\r\n");
    server.write_all(out.as_bytes()).ok()?;
    server.write_all(body).ok()?;
    server.flush().ok()?;
    let mut answer = Vec::new();
    server.read_to_end(&mut answer).ok()?;
    (!answer.is_empty()).then_some(answer)
}

fn respond(client: &mut TcpStream, status: u16, reason: &str, body: &str) {
    let _ = client.write_all(
        format!(
            "HTTP/1.1 {status} {reason}\r\nContent-Type: text/html\r\nContent-Length: {}\r\nConnection: close\r\n\r\n{body}",
            body.len()
        )
        .as_bytes(),
    );
    let _ = client.flush();
}

fn respond_raw(client: &mut TcpStream, status: u16, reason: &str) -> std::io::Result<()> {
    client.write_all(format!("HTTP/1.1 {status} {reason}\r\nContent-Length: 0\r\nConnection: close\r\n\r\n").as_bytes())
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A tiny upstream that answers every request `200 ok` and counts them.
    fn upstream() -> (String, Arc<AtomicU64>) {
        let listener = TcpListener::bind("127.0.0.1:0").expect("bind upstream");
        let url = format!("http://{}", listener.local_addr().expect("addr"));
        let hits = Arc::new(AtomicU64::new(0));
        let h = hits.clone();
        std::thread::spawn(move || {
            for mut conn in listener.incoming().flatten() {
                if read_request(&mut conn).is_some() {
                    h.fetch_add(1, Ordering::SeqCst);
                    let _ = conn.write_all(b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\nConnection: close\r\n\r\nok");
                }
            }
        });
        (url, hits)
    }

    fn post(url: &str, body: Vec<u8>) -> Result<(u16, String), reqwest::Error> {
        let resp = reqwest::blocking::Client::new().post(url).body(body).send()?;
        let status = resp.status().as_u16();
        Ok((status, resp.text()?))
    }

    #[test]
    fn forwards_refuses_fails_and_cuts_as_told() {
        let (url, hits) = upstream();
        let proxy = FaultProxy::start(&url, 1000, 1);
        assert_eq!(post(&proxy.url, vec![b'x'; 1000]).expect("clean").0, 200);
        assert_eq!(hits.load(Ordering::SeqCst), 1);
        assert_eq!(post(&proxy.url, vec![b'x'; 1001]).expect("too large").0, 413);
        assert_eq!(hits.load(Ordering::SeqCst), 1, "a body over the cap is not forwarded");
        proxy.set_faults(Faults { fail_pct: 100, ..Faults::CLEAN });
        assert!(post(&proxy.url, vec![b'x'; 10]).expect("5xx").0 >= 500);
        assert_eq!(hits.load(Ordering::SeqCst), 1, "a failed request is not forwarded");
        proxy.set_faults(Faults { cut_pct: 100, ..Faults::CLEAN });
        for _ in 0..4 {
            assert!(post(&proxy.url, vec![b'x'; 10]).is_err(), "the answer is lost");
        }
        assert_eq!(hits.load(Ordering::SeqCst), 5, "a cut request reached the server");
        proxy.set_faults(Faults { delay_pct: 100, max_delay_ms: 20, ..Faults::CLEAN });
        assert_eq!(post(&proxy.url, vec![]).expect("delayed").1, "ok");
        let s = proxy.stats();
        assert_eq!((s.requests, s.forwarded, s.too_large, s.failed, s.cut, s.delayed), (8, 2, 1, 1, 4, 1), "{s:?}");
    }
}
