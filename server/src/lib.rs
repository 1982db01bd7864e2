//! # tally-server
//!
//! The Tally sync server: reconciles device ledgers on Postgres, merges settings, and signs
//! entitlements. [`app`] builds the router over an [`AppState`]; the binary (`tally-server`)
//! adds configuration, the embedded Postgres default and graceful shutdown.

pub mod access_tokens;
pub mod account_tokens;
pub mod accounts;
pub mod admin;
pub mod api_keys;
pub mod auth;
pub mod authority;
pub mod billing;
pub mod cli;
pub mod concurrency;
pub mod config;
pub mod console;
pub mod consume;
pub mod cors;
pub mod credits;
pub mod db;
pub mod email_canonical;
pub mod entitlements;
pub mod error;
pub mod extract;
pub mod grants;
pub mod holds;
pub mod http;
pub mod jwks;
pub mod leases;
pub mod ledger;
pub mod login_limits;
pub mod mail;
pub mod metrics;
pub mod openapi;
pub mod password_auth;
pub mod passwords;
pub mod pg_cluster;
pub mod plans;
pub mod pools;
pub mod ratelimit;
pub mod secrets;
pub mod sessions;
pub mod settings;
pub mod signing;
pub mod sync;
pub mod timezones;
pub mod usage;
pub mod usage_events;
pub mod user_cache;
pub mod users;
pub mod uses;
pub mod vault;
pub mod voids;
pub mod webhooks;

use axum::Router;
use axum::extract::DefaultBodyLimit;
use axum::routing::{get, post, put};
use std::sync::Arc;
use std::time::Duration;
use tower_http::request_id::{MakeRequestUuid, PropagateRequestIdLayer, SetRequestIdLayer};
use tower_http::trace::TraceLayer;

pub use config::Config;
pub use error::{ApiError, ApiResult};

/// How often (by the server's clock) the sweeper deletes the password accounts never verified.
pub const UNVERIFIED_SWEEP_EVERY: chrono::Duration = chrono::Duration::hours(1);

/// The periodic work of every replica, for as long as the state lives: every `every`, the holds
/// past their expiry ([`holds::sweep`]); and, with password accounts on, whenever
/// [`UNVERIFIED_SWEEP_EVERY`] has passed on the server's clock, the accounts never verified
/// ([`password_auth::delete_unverified`]).
pub fn spawn_sweeper(state: std::sync::Weak<Shared>, every: Duration) {
    tokio::spawn(async move {
        let mut tick = tokio::time::interval(every);
        tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        let mut unverified_due = None;
        loop {
            tick.tick().await;
            let Some(shared) = state.upgrade() else { return };
            let st = AppState(shared);
            if let Err(e) = holds::sweep(&st).await {
                tracing::warn!(error = %e, "hold sweep failed; retrying next round");
            }
            let now = st.now();
            if st.config.password_auth && unverified_due.is_none_or(|due| now >= due) {
                match password_auth::delete_unverified(&st).await {
                    Ok(_) => unverified_due = Some(now + UNVERIFIED_SWEEP_EVERY),
                    Err(e) => tracing::warn!(error = %e, "deleting unverified accounts failed; retrying next round"),
                }
            }
        }
    });
}

/// Everything a request handler needs; cheap to clone.
#[derive(Clone)]
pub struct AppState(Arc<Shared>);

/// The shared parts of [`AppState`].
pub struct Shared {
    /// The configuration in effect.
    pub config: Config,
    /// Postgres connection pool (time-bounded: see [`db::Db::get`]).
    pub pool: db::Db,
    /// The time source of every decision (a manual clock in tests).
    pub clock: Arc<dyn tally_core::Clock>,
    /// Per-user limit on concurrent database work.
    pub user_limits: concurrency::UserLimits,
    /// Identity token verification.
    pub verifier: auth::Verifier,
    /// Entitlements token signing keys.
    pub signer: signing::Signer,
    /// The plan catalog, cached per version.
    pub catalog: plans::CatalogCache,
    /// Per-user and per-key request limits.
    pub limiter: ratelimit::Limiter,
    /// Signed entitlements tokens per (user, version).
    pub tokens: entitlements::TokenCache,
    /// Resolved entitlements of `GET /v1/entitlements` per user.
    pub snapshots: entitlements::Snapshots,
    /// Users resolved recently by subject, dropped when Postgres announces a change.
    pub user_cache: Arc<user_cache::UserCache>,
    /// App Store verification (`None`: not configured, purchases answer `store_unconfigured`).
    pub apple: Option<billing::apple::Apple>,
    /// Google Play (`None`: not configured, purchases answer `store_unconfigured`).
    pub google: Option<billing::google::Google>,
    /// Failed sign-in limits of password accounts and the console.
    pub login_limits: login_limits::LoginLimits,
    /// Sender of verification and reset mail (with `TALLY_PASSWORD_AUTH=1`).
    pub mailer: Option<mail::Mailer>,
    /// Master keys of the secrets vault (`TALLY_SECRET_KEYS`).
    pub vault: Option<vault::MasterKeys>,
}

impl std::ops::Deref for AppState {
    type Target = Shared;
    fn deref(&self) -> &Shared {
        &self.0
    }
}

/// Why the server could not start.
#[derive(Debug, thiserror::Error)]
pub enum StartError {
    /// Database connection or migrations.
    #[error(transparent)]
    Db(#[from] db::DbError),
    /// Signing keys.
    #[error("signing keys: {0}")]
    Keys(String),
    /// Plan catalog import.
    #[error("plans: {0}")]
    Plans(String),
    /// Anything else in the configuration.
    #[error("configuration: {0}")]
    Config(String),
}

impl AppState {
    /// Connects to `config.database_url`, applies migrations, loads (or creates) the signing
    /// keys under `config.data_dir`, and imports `config.plans_file` when given.
    pub async fn new(config: Config) -> Result<AppState, StartError> {
        AppState::with_clock(config, Arc::new(tally_core::SystemClock)).await
    }

    /// [`AppState::new`] with the time read from `clock`.
    pub async fn with_clock(config: Config, clock: Arc<dyn tally_core::Clock>) -> Result<AppState, StartError> {
        let url = config.database_url.clone().ok_or_else(|| StartError::Config("no database URL".into()))?;
        db::migrate(&url).await?;
        let limits = db::Limits::from_config(&config);
        let pool = db::pool_with(&url, config.db_pool_size, limits)?;
        let user_limits = concurrency::UserLimits::new(config.user_concurrency, config.user_queue, limits.wait);
        let signer = signing::Signer::load_or_create(&config.data_dir.join("keys")).map_err(StartError::Keys)?;
        let catalog = plans::CatalogCache::default();
        if let Some(file) = &config.plans_file {
            let text = std::fs::read_to_string(file).map_err(|e| StartError::Plans(format!("{}: {e}", file.display())))?;
            let parsed = tally_core::Catalog::from_json(&text).map_err(|e| StartError::Plans(e.to_string()))?;
            let client = pool.get().await.map_err(|e| StartError::Plans(e.to_string()))?;
            plans::import_if_changed(&client, &parsed).await.map_err(|e| StartError::Plans(e.to_string()))?;
        }
        cors::check(&config.cors_origins).map_err(StartError::Config)?;
        let verifier = auth::Verifier::new(&config).map_err(StartError::Config)?;
        let mailer = if config.password_auth { Some(mail::Mailer::from_config(&config).map_err(StartError::Config)?) } else { None };
        let vault = match config.secret_keys.as_deref().filter(|k| !k.trim().is_empty()) {
            Some(spec) => Some(vault::MasterKeys::parse(spec).map_err(StartError::Config)?),
            None => None,
        };
        {
            let client = pool.get().await.map_err(|e| StartError::Config(e.to_string()))?;
            secrets::warn_unopenable(&client, vault.as_ref()).await.map_err(|e| StartError::Config(e.to_string()))?;
        }
        if vault.is_none() {
            tracing::info!("TALLY_SECRET_KEYS is not set: the secrets routes answer 503 secrets_unconfigured");
        }
        let login_limits = login_limits::LoginLimits::new(
            config.login_failures_per_email,
            config.login_failures_per_address,
            config.login_failures_per_account,
        );
        let limiter = ratelimit::Limiter::new(config.rate_limit_per_sec, config.rate_limit_burst);
        let apple = billing::apple::Apple::from_config(&config).map_err(StartError::Config)?;
        let google = billing::google::Google::from_config(&config).map_err(StartError::Config)?;
        let shared = Arc::new(Shared {
            config,
            pool,
            clock,
            user_limits,
            verifier,
            signer,
            catalog,
            limiter,
            tokens: entitlements::TokenCache::default(),
            snapshots: Default::default(),
            user_cache: Arc::default(),
            apple,
            google,
            login_limits,
            mailer,
            vault,
        });
        spawn_sweeper(Arc::downgrade(&shared), holds::SWEEP_EVERY);
        user_cache::spawn_listener(Arc::downgrade(&shared.user_cache), url.clone(), limits.connect.unwrap_or(Duration::from_secs(5)));
        webhooks::delivery::spawn_worker(Arc::downgrade(&shared), webhooks::delivery::Settings::from_config(&shared.config))?;
        Ok(AppState(shared))
    }

    /// The current time of the server's clock.
    pub fn now(&self) -> chrono::DateTime<chrono::Utc> {
        self.clock.now()
    }

    /// The request bounds advertised in every sync response.
    pub fn limits(&self) -> tally_core::wire::Limits {
        tally_core::wire::Limits { max_batch_events: self.config.max_batch_events, max_body_bytes: self.config.max_body_bytes }
    }
}

/// The HTTP API over `state`: every route of the README's API table, and the operator console
/// under `/console`.
pub fn app(state: AppState) -> Router {
    let body_limit = usize::try_from(state.config.max_body_bytes).unwrap_or(usize::MAX);
    let request_timeout = Duration::from_secs(state.config.request_timeout_secs.max(1));
    let api = Router::new()
        .route("/v1/me", get(accounts::get_me).patch(accounts::patch_me).delete(accounts::delete_me))
        .route("/v1/me/export", get(accounts::export_me))
        .route("/v1/me/devices", get(leases::list_devices))
        .route("/v1/me/devices/{device_id}", axum::routing::delete(leases::delete_device))
        .route("/v1/sync", post(sync::sync))
        .route("/v1/settings", get(settings::get_settings).put(settings::put_settings).patch(settings::patch_settings))
        .route("/v1/entitlements", get(entitlements::get_entitlements))
        .route("/v1/keys", get(entitlements::get_keys))
        .route("/v1/check", post(usage::check))
        .route("/v1/usage", post(usage::record).get(usage::report))
        .route("/v1/usage/events", get(usage_events::list))
        .route("/v1/usage/{id}/void", post(voids::void))
        .route("/v1/consume", post(consume::consume))
        .route("/v1/holds", post(holds::create))
        .route("/v1/holds/{id}/commit", post(holds::commit))
        .route("/v1/holds/{id}", axum::routing::delete(holds::release))
        .route("/v1/webhooks/stripe", post(billing::webhook))
        .route("/v1/webhooks/apple", post(billing::apple::notification))
        .route("/v1/purchases/apple", post(billing::apple::purchase))
        .route("/v1/webhooks/google", post(billing::google::notification))
        .route("/v1/purchases/google", post(billing::google::purchase))
        .route("/v1/billing", get(billing::get_billing))
        .route("/v1/billing/checkout", post(billing::checkout))
        .route("/v1/billing/portal", post(billing::portal))
        .route("/v1/admin/users", post(admin::create_user))
        .route("/v1/admin/users/{id}/usage", get(admin::user_usage))
        .route("/v1/admin/users/{id}/disable", post(admin::disable_user))
        .route("/v1/admin/users/{id}/enable", post(admin::enable_user))
        .route("/v1/admin/grants", post(admin::create_grant))
        .route("/v1/admin/grants/revoke", post(admin::revoke_grant))
        .route("/v1/admin/plans/{id}", put(admin::put_plan).patch(admin::patch_plan))
        .route("/v1/admin/plans", get(admin::get_plans))
        .route("/v1/admin/api-keys", post(admin::create_api_key).get(admin::list_api_keys))
        .route("/v1/admin/api-keys/{id}", axum::routing::delete(admin::revoke_api_key))
        .merge(password_auth::router())
        .merge(secrets::router())
        .merge(webhooks::router())
        .layer(DefaultBodyLimit::max(body_limit));
    Router::new()
        .route("/healthz", get(openapi::healthz))
        .route("/openapi.json", get(openapi::openapi_json))
        .route("/readyz", get(metrics::readyz))
        .route("/metrics", get(metrics::render))
        .route("/v1/plans", get(plans::public_plans))
        .merge(api)
        .merge(console::router())
        .fallback(|| async { ApiError::NotFound("no such route".into()) })
        .method_not_allowed_fallback(|method: axum::http::Method, uri: axum::http::Uri| async move {
            ApiError::MethodNotAllowed(format!("{method} is not allowed on {}", uri.path()))
        })
        .layer(axum::middleware::from_fn(concurrency::hold_turns))
        .layer(axum::middleware::from_fn_with_state(request_timeout, http::request_timeout))
        .layer(axum::middleware::from_fn(error::json_errors))
        .layer(axum::middleware::from_fn(metrics::track))
        .layer(TraceLayer::new_for_http().make_span_with(|req: &axum::http::Request<_>| {
            let rid = req.headers().get("x-request-id").and_then(|v| v.to_str().ok()).unwrap_or("-");
            tracing::info_span!("request", method = %req.method(), path = %req.uri().path(), request_id = %rid)
        }))
        .layer(PropagateRequestIdLayer::x_request_id())
        .layer(SetRequestIdLayer::x_request_id(MakeRequestUuid))
        .layer(cors::layer(&state.config.cors_origins))
        .with_state(state)
}
