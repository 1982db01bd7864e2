//! Serving HTTP/1.1 so that idle or slow sockets cannot lock other clients out: a header-read
//! timeout that also closes connections idle between requests, a cap on open connections
//! (kept below the open-file limit, so `accept` never fails for lack of descriptors), and a
//! request timeout that answers 503 `unavailable` with the JSON error body.

use crate::error::ApiError;
use axum::Router;
use axum::extract::{Request, State};
use axum::http::Request as HttpRequest;
use axum::middleware::Next;
use axum::response::{IntoResponse, Response};
use hyper_util::rt::{TokioIo, TokioTimer};
use hyper_util::service::TowerToHyperService;
use std::future::Future;
use std::sync::Arc;
use std::time::Duration;
use tokio::net::TcpListener;
use tokio::sync::Semaphore;

/// Bounds of [`serve`].
#[derive(Debug, Clone, Copy)]
pub struct HttpLimits {
    /// Longest time to receive a request's headers, and to stay idle between requests.
    pub header_timeout: Duration,
    /// Most open connections.
    pub max_connections: usize,
}

impl HttpLimits {
    /// The bounds of `config`.
    pub fn from_config(config: &crate::Config) -> HttpLimits {
        HttpLimits {
            header_timeout: Duration::from_secs(config.http_header_timeout_secs.max(1)),
            max_connections: config.http_max_connections.max(1),
        }
    }
}

/// Descriptors kept free for the database pool, log files and the embedded cluster's tools.
const RESERVED_FDS: u64 = 128;

/// Raises the soft open-file limit to the hard limit and returns how many connections fit
/// under it (at most `wanted`).
pub fn connection_cap(wanted: usize) -> usize {
    use nix::sys::resource::{Resource, getrlimit, setrlimit};
    let Ok((soft, hard)) = getrlimit(Resource::RLIMIT_NOFILE) else { return wanted };
    let limit = if hard > soft && setrlimit(Resource::RLIMIT_NOFILE, hard, hard).is_ok() { hard } else { soft };
    let room = usize::try_from(limit.saturating_sub(RESERVED_FDS).max(16)).unwrap_or(usize::MAX);
    wanted.min(room)
}

/// Serves `app` on `listener` until `shutdown` resolves, then lets in-flight requests finish
/// (for at most `drain`).
pub async fn serve(listener: TcpListener, app: Router, limits: HttpLimits, shutdown: impl Future<Output = ()>, drain: Duration) {
    let cap = connection_cap(limits.max_connections);
    tracing::debug!(max_connections = cap, "accepting connections");
    let slots = Arc::new(Semaphore::new(cap));
    let graceful = hyper_util::server::graceful::GracefulShutdown::new();
    let mut builder = hyper::server::conn::http1::Builder::new();
    builder.timer(TokioTimer::new()).header_read_timeout(limits.header_timeout).keep_alive(true);
    tokio::pin!(shutdown);
    loop {
        // A free slot first: at the cap, new clients wait in the listen backlog.
        let permit = tokio::select! {
            p = slots.clone().acquire_owned() => match p { Ok(p) => p, Err(_) => break },
            () = &mut shutdown => break,
        };
        let stream = tokio::select! {
            r = listener.accept() => match r {
                Ok(pair) => pair,
                Err(e) => {
                    // EMFILE and friends: back off instead of spinning.
                    tracing::warn!(error = %e, "accept failed");
                    tokio::time::sleep(Duration::from_millis(50)).await;
                    continue;
                }
            },
            () = &mut shutdown => break,
        };
        let (stream, peer) = stream;
        let _ = stream.set_nodelay(true);
        // Handlers that limit per client address (logins) read the peer as `ConnectInfo`.
        let svc =
            TowerToHyperService::new(tower::ServiceExt::map_request(app.clone(), move |mut req: HttpRequest<hyper::body::Incoming>| {
                req.extensions_mut().insert(axum::extract::ConnectInfo(peer));
                req
            }));
        let conn = graceful.watch(builder.serve_connection(TokioIo::new(stream), svc));
        tokio::spawn(async move {
            if let Err(e) = conn.await {
                tracing::debug!(error = %e, "connection ended with an error");
            }
            drop(permit);
        });
    }
    drop(listener);
    tracing::info!("shutting down: finishing in-flight requests");
    if tokio::time::timeout(drain, graceful.shutdown()).await.is_err() {
        tracing::warn!("some connections were still open after the drain period");
    }
}

/// Middleware: a request that runs longer than the timeout in its state answers 503
/// `unavailable` (JSON, `Retry-After`) and its work is dropped.
pub async fn request_timeout(State(limit): State<Duration>, req: Request, next: Next) -> Response {
    match tokio::time::timeout(limit, next.run(req)).await {
        Ok(resp) => resp,
        Err(_) => {
            ::metrics::counter!("tally_request_timeouts_total").increment(1);
            ApiError::Unavailable(format!("the request did not finish within {} s; retry shortly", limit.as_secs())).into_response()
        }
    }
}
