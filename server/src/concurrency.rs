//! Per-caller limit on concurrent work, so one user (or API key) cannot take more than a few of
//! the pool's connections: each caller gets `TALLY_USER_CONCURRENCY` turns at once, further
//! requests wait in a bounded queue (`TALLY_USER_QUEUE`) for at most the pool wait timeout, and
//! overflow answers 503 `unavailable` with `Retry-After` (never 429, which means a rate rule).
//!
//! The turn is taken by the authentication extractor right after the credentials are checked
//! (before any database work of the request) and held until the handler has answered: the
//! [`hold_turns`] middleware gives every request a [`TurnSlot`] that keeps it.

use crate::error::ApiError;
use axum::extract::Request;
use axum::middleware::Next;
use axum::response::Response;
use std::collections::HashMap;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;
use tokio::sync::{OwnedSemaphorePermit, Semaphore};

struct Lane {
    sem: Arc<Semaphore>,
    waiting: AtomicUsize,
}

/// The turns of every caller, keyed by caller (`s:<subject>`, `k:<key hash>`).
pub struct UserLimits {
    per_caller: usize,
    queue: usize,
    wait: Option<Duration>,
    lanes: Mutex<HashMap<String, Arc<Lane>>>,
    prune_at: AtomicUsize,
}

/// One caller's turn: while it lives, one of the caller's concurrent slots is taken.
pub struct Turn {
    _permit: OwnedSemaphorePermit,
}

impl UserLimits {
    /// `per_caller` turns at once per caller, `queue` waiting, each waiting at most `wait`.
    pub fn new(per_caller: usize, queue: usize, wait: Option<Duration>) -> UserLimits {
        UserLimits { per_caller: per_caller.max(1), queue, wait, lanes: Mutex::new(HashMap::new()), prune_at: AtomicUsize::new(1024) }
    }

    fn lane(&self, key: &str) -> Arc<Lane> {
        let mut lanes = self.lanes.lock().unwrap_or_else(|e| e.into_inner());
        if lanes.len() >= self.prune_at.load(Ordering::Relaxed) {
            // Forget callers with nothing running or waiting (amortized: the threshold doubles).
            let full = self.per_caller;
            lanes.retain(|_, l| Arc::strong_count(l) > 1 || l.sem.available_permits() < full);
            self.prune_at.store((lanes.len() * 2).max(1024), Ordering::Relaxed);
        }
        lanes
            .entry(key.to_string())
            .or_insert_with(|| Arc::new(Lane { sem: Arc::new(Semaphore::new(self.per_caller)), waiting: AtomicUsize::new(0) }))
            .clone()
    }

    /// Takes a turn of `key`: at once when one is free, else after waiting in the caller's
    /// queue; 503 `unavailable` when the queue is full or the wait times out.
    pub async fn acquire(&self, key: &str) -> Result<Turn, ApiError> {
        let lane = self.lane(key);
        if let Ok(p) = lane.sem.clone().try_acquire_owned() {
            return Ok(Turn { _permit: p });
        }
        if lane.waiting.fetch_add(1, Ordering::SeqCst) >= self.queue {
            lane.waiting.fetch_sub(1, Ordering::SeqCst);
            return Err(busy());
        }
        let fut = lane.sem.clone().acquire_owned();
        let r = match self.wait {
            Some(d) => tokio::time::timeout(d, fut).await.ok(),
            None => Some(fut.await),
        };
        lane.waiting.fetch_sub(1, Ordering::SeqCst);
        match r {
            Some(Ok(p)) => Ok(Turn { _permit: p }),
            _ => Err(busy()),
        }
    }

    /// How many callers are tracked (for tests and metrics).
    pub fn tracked(&self) -> usize {
        self.lanes.lock().unwrap_or_else(|e| e.into_inner()).len()
    }
}

fn busy() -> ApiError {
    ::metrics::counter!("tally_caller_busy_total").increment(1);
    ApiError::Unavailable("too many requests of this account are running at once; retry shortly".into())
}

/// Where a request keeps its caller's [`Turn`] until it has been answered.
#[derive(Clone, Default)]
pub struct TurnSlot(Arc<Mutex<Option<Turn>>>);

impl TurnSlot {
    /// Keeps `turn` for the rest of the request.
    pub fn hold(&self, turn: Turn) {
        *self.0.lock().unwrap_or_else(|e| e.into_inner()) = Some(turn);
    }

    /// Whether a turn is held already.
    pub fn is_held(&self) -> bool {
        self.0.lock().unwrap_or_else(|e| e.into_inner()).is_some()
    }
}

/// Middleware: gives the request a [`TurnSlot`] and releases its turn once the handler answered.
pub async fn hold_turns(mut req: Request, next: Next) -> Response {
    let slot = TurnSlot::default();
    req.extensions_mut().insert(slot.clone());
    let resp = next.run(req).await;
    drop(slot);
    resp
}
