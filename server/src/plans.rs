//! The plan catalog, stored in Postgres (one versioned row) and cached per version, so every
//! replica sees an admin's change on its next request.

use crate::error::{ApiError, ApiResult};
use deadpool_postgres::GenericClient;
use std::sync::{Arc, RwLock};
use tally_core::Catalog;

/// The catalog in effect and its version (0 = the built-in catalog, nothing stored).
#[derive(Default)]
pub struct CatalogCache {
    cached: RwLock<Option<(i64, Arc<Catalog>)>>,
    /// When the version was last read from the database, and what it was.
    checked: std::sync::Mutex<Option<(std::time::Instant, i64)>>,
}

impl CatalogCache {
    /// The current catalog: one cheap version read, the body only when it changed.
    pub async fn current(&self, client: &impl GenericClient) -> ApiResult<(i64, Arc<Catalog>)> {
        let version = self.read_version(client).await?;
        if let Ok(guard) = self.cached.read()
            && let Some((v, c)) = guard.as_ref()
            && *v == version
        {
            return Ok((version, c.clone()));
        }
        let catalog = load(client).await?;
        let loaded = (catalog.0, Arc::new(catalog.1));
        if let Ok(mut guard) = self.cached.write() {
            *guard = Some(loaded.clone());
        }
        Ok(loaded)
    }

    /// The catalog version, read from the database at most once per `max_age`: a change made
    /// through another replica is seen within that time.
    pub async fn recent_version(&self, client: &impl GenericClient, max_age: std::time::Duration) -> ApiResult<i64> {
        match self.fresh_version(max_age) {
            Some(v) => Ok(v),
            None => self.read_version(client).await,
        }
    }

    /// The version last read, when that was less than `max_age` ago (no database read).
    pub fn fresh_version(&self, max_age: std::time::Duration) -> Option<i64> {
        let g = self.checked.lock().ok()?;
        let (at, v) = (*g)?;
        (at.elapsed() < max_age).then_some(v)
    }

    async fn read_version(&self, client: &impl GenericClient) -> ApiResult<i64> {
        let version: i64 = client
            .query_opt(&client.prepare_cached("SELECT version FROM catalog WHERE singleton = 1").await?, &[])
            .await?
            .map_or(0, |r| r.get(0));
        if let Ok(mut g) = self.checked.lock() {
            *g = Some((std::time::Instant::now(), version));
        }
        Ok(version)
    }
}

/// Reads the stored catalog (the built-in one when none is stored).
pub async fn load(client: &impl GenericClient) -> ApiResult<(i64, Catalog)> {
    match client.query_opt("SELECT version, body FROM catalog WHERE singleton = 1", &[]).await? {
        None => Ok((0, Catalog::builtin())),
        Some(r) => {
            let body: serde_json::Value = r.get(1);
            let c = Catalog::from_value(&body).map_err(|e| ApiError::internal(format!("stored catalog is invalid: {e}")))?;
            Ok((r.get(0), c))
        }
    }
}

/// Stores `catalog` as the new version; returns that version.
pub async fn store(client: &impl GenericClient, catalog: &Catalog) -> ApiResult<i64> {
    let body = serde_json::to_value(catalog).map_err(ApiError::internal)?;
    let r = client
        .query_one(
            "INSERT INTO catalog (singleton, version, body) VALUES (1, 1, $1) \
             ON CONFLICT (singleton) DO UPDATE SET version = catalog.version + 1, body = excluded.body, updated_at = now() RETURNING version",
            &[&body],
        )
        .await?;
    Ok(r.get(0))
}

/// Stores `catalog` unless the stored one is identical (a restart does not bump the version).
pub async fn import_if_changed(client: &impl GenericClient, catalog: &Catalog) -> ApiResult<i64> {
    let (v, current) = load(client).await?;
    if v > 0 && current == *catalog {
        return Ok(v);
    }
    store(client, catalog).await
}

/// `GET /v1/plans` (public, no credentials): what a paywall shows — every plan with its name,
/// description, rank, features and included credits, the products that sell it in each store
/// (with `display_price` and `trial_days`), and the credit packs on sale.
#[utoipa::path(
    operation_id = "plans_public_plans",
    get,
    path = "/v1/plans",
    tag = "plans",
    responses(
        (status = 200, description = "Every plan with its products, and the credit packs", body = Object),
    ),
)]
pub async fn public_plans(axum::extract::State(state): axum::extract::State<crate::AppState>) -> ApiResult<axum::response::Response> {
    use axum::response::IntoResponse;
    use serde_json::json;
    let client = state.pool.get().await?;
    let (version, catalog) = state.catalog.current(&client).await?;
    let product = |p: &tally_core::Product| {
        json!({"id": p.id, "store": p.store, "display_price": p.display_price, "trial_days": p.trial_days,
               "lifetime": p.grants.lifetime, "credits": p.grants.credits})
    };
    let plans: Vec<serde_json::Value> = catalog
        .plans
        .iter()
        .map(|p| {
            let sold: Vec<serde_json::Value> =
                catalog.products.iter().filter(|x| x.grants.plan.as_deref() == Some(p.id.as_str())).map(product).collect();
            json!({"id": p.id, "display_name": p.display_name, "description": p.description, "rank": catalog.rank(&p.id),
                   "features": p.features, "included_credits": p.included_credits, "products": sold})
        })
        .collect();
    let packs: Vec<serde_json::Value> = catalog.products.iter().filter(|x| x.grants.credits.is_some()).map(product).collect();
    let body = json!({"version": version, "plans": plans, "credit_packs": packs});
    Ok(([(axum::http::header::CACHE_CONTROL, "public, max-age=60")], axum::Json(body)).into_response())
}
