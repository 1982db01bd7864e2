//! Observability: Prometheus metrics (`GET /metrics`: request counts and latencies by route,
//! events ingested / duplicate / rejected, DB pool usage) and `GET /readyz`.

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

/// `GET /metrics`: Prometheus text format.
pub async fn render(State(state): State<AppState>) -> String {
    let status = state.pool.status();
    ::metrics::gauge!("tally_db_pool_size").set(status.size as f64);
    ::metrics::gauge!("tally_db_pool_available").set(status.available as f64);
    ::metrics::gauge!("tally_db_pool_max_size").set(status.max_size as f64);
    handle().map(PrometheusHandle::render).unwrap_or_default()
}

/// `GET /readyz`: 200 when the database answers.
/// 503 `unavailable` (with `Retry-After`) within the pool wait timeout when it does not.
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
