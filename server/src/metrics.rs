//! Observability: Prometheus metrics (`GET /metrics`: request counts and latencies by route,
//! events ingested / duplicate / rejected, DB pool usage, subscriptions in effect by plan, store
//! and status, failed payments by store, denied decisions by reason) and `GET /readyz`.

use crate::AppState;
use crate::error::ApiError;
use axum::extract::{MatchedPath, Request, State};
use axum::middleware::Next;
use axum::response::Response;
use metrics_exporter_prometheus::{PrometheusBuilder, PrometheusHandle};
use std::sync::OnceLock;
use std::time::Instant;

static HANDLE: OnceLock<Option<PrometheusHandle>> = OnceLock::new();

/// Installs the process-wide Prometheus recorder (once).
pub fn handle() -> Option<&'static PrometheusHandle> {
    HANDLE.get_or_init(|| PrometheusBuilder::new().install_recorder().ok()).as_ref()
}

/// Middleware: counts requests and records latencies by matched route.
pub async fn track(req: Request, next: Next) -> Response {
    handle();
    let route = req.extensions().get::<MatchedPath>().map_or_else(|| "unmatched".to_string(), |m| m.as_str().to_string());
    let method = req.method().to_string();
    let start = Instant::now();
    let resp = next.run(req).await;
    let status = resp.status().as_u16().to_string();
    ::metrics::counter!("tally_http_requests_total", "route" => route.clone(), "method" => method, "status" => status).increment(1);
    ::metrics::histogram!("tally_http_request_duration_seconds", "route" => route).record(start.elapsed().as_secs_f64());
    resp
}

/// Counts a payment that failed in `store` (`stripe`, `app_store`, `play`), once per store fact.
pub fn payment_failed(store: &'static str) {
    handle();
    ::metrics::counter!("tally_payments_failed_total", "store" => store).increment(1);
}

/// Counts a recorded webhook delivery attempt by the state it left (`delivered`, `pending`, `dead`).
pub fn webhook_attempt(state: &'static str) {
    handle();
    ::metrics::counter!("tally_webhook_attempts_total", "state" => state).increment(1);
}

/// Counts a denied decision of a server-side check or consume, by its reason.
pub fn decision_denied(route: &'static str, reason: tally_core::Reason) {
    handle();
    ::metrics::counter!("tally_decisions_denied_total", "route" => route, "reason" => reason.as_str()).increment(1);
}

/// The (plan, store, status) label sets reported so far: one that disappears reads 0, not its
/// last value.
static SUBSCRIPTION_LABELS: std::sync::Mutex<std::collections::BTreeSet<(String, String, String)>> =
    std::sync::Mutex::new(std::collections::BTreeSet::new());

/// Sets `tally_subscriptions{plan, store, status}`: subscriptions (and lifetime plans) that give
/// access now — active, trialing or past due.
async fn subscription_gauges(state: &AppState) -> Result<(), ApiError> {
    let client = state.pool.get().await?;
    let rows = client
        .query(
            &client
                .prepare_cached(
                    "SELECT coalesce(plan, ''), store, CASE WHEN lifetime THEN 'lifetime' ELSE status END, count(*)::int8 \
                     FROM store_subscriptions WHERE status IN ('active', 'trialing', 'past_due') GROUP BY 1, 2, 3",
                )
                .await?,
            &[],
        )
        .await?;
    let mut seen = SUBSCRIPTION_LABELS.lock().unwrap_or_else(|e| e.into_inner());
    let now: std::collections::BTreeMap<(String, String, String), i64> =
        rows.iter().map(|r| ((r.get(0), r.get(1), r.get(2)), r.get(3))).collect();
    for key in now.keys() {
        seen.insert(key.clone());
    }
    for key in seen.iter() {
        let n = now.get(key).copied().unwrap_or(0);
        ::metrics::gauge!("tally_subscriptions", "plan" => key.0.clone(), "store" => key.1.clone(), "status" => key.2.clone())
            .set(n as f64);
    }
    Ok(())
}

/// `GET /metrics`: Prometheus text format.
#[utoipa::path(
    operation_id = "metrics_render",
    get,
    path = "/metrics",
    tag = "health",
    responses(
        (status = 200, description = "Prometheus metrics", body = String, content_type = "text/plain"),
    ),
)]
pub async fn render(State(state): State<AppState>) -> String {
    let status = state.pool.status();
    ::metrics::gauge!("tally_db_pool_size").set(status.size as f64);
    ::metrics::gauge!("tally_db_pool_available").set(status.available as f64);
    ::metrics::gauge!("tally_db_pool_max_size").set(status.max_size as f64);
    // A database that does not answer leaves the gauges at their last values (and says so).
    let limit = std::time::Duration::from_secs(state.config.db_pool_timeout_secs.max(1));
    let fresh = matches!(tokio::time::timeout(limit, subscription_gauges(&state)).await, Ok(Ok(())));
    ::metrics::gauge!("tally_subscriptions_fresh").set(if fresh { 1.0 } else { 0.0 });
    handle().map(PrometheusHandle::render).unwrap_or_default()
}

/// `GET /readyz`: 200 when the database answers.
/// 503 `unavailable` (with `Retry-After`) within the pool wait timeout when it does not.
#[utoipa::path(
    operation_id = "metrics_readyz",
    get,
    path = "/readyz",
    tag = "health",
    responses(
        (status = 200, description = "The database answers", body = String, content_type = "text/plain"),
    ),
)]
pub async fn readyz(State(state): State<AppState>) -> Result<&'static str, ApiError> {
    let check = async {
        let client = state.pool.get().await?;
        client.query_one("SELECT 1", &[]).await?;
        Ok::<_, ApiError>(())
    };
    let limit = std::time::Duration::from_secs(state.config.db_pool_timeout_secs.max(1));
    match tokio::time::timeout(limit, check).await {
        Ok(Ok(())) => Ok("ready"),
        Ok(Err(ApiError::Unavailable(m))) => Err(ApiError::Unavailable(m)),
        Ok(Err(e)) => Err(ApiError::Unavailable(format!("the database is unavailable ({e})"))),
        Err(_) => Err(ApiError::Unavailable("the database did not answer within the timeout".into())),
    }
}
