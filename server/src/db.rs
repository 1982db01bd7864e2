//! Database access: the connection pool and the embedded refinery migrations, applied under
//! `pg_advisory_lock` so replicas starting together apply them once.
//!
//! Request connections are bounded in time: a pool wait timeout, a connect timeout and a
//! Postgres `statement_timeout`, and every connection is verified before it is handed out, so
//! a stalled or restarted database answers 503 within seconds. Migrations and the maintenance
//! commands use connections without those timeouts.

use crate::error::ApiError;
use deadpool_postgres::{Manager, ManagerConfig, Object, Pool, RecyclingMethod, Runtime, Status};
use std::time::Duration;
use tokio_postgres::NoTls;

refinery::embed_migrations!("../migrations/postgres");

/// Advisory lock key held while migrating ("tally" in ASCII).
const MIGRATION_LOCK: i64 = 0x0074_616c_6c79;

/// Errors while connecting or migrating.
#[derive(Debug, thiserror::Error)]
pub enum DbError {
    /// Postgres refused or failed.
    #[error("database error: {0}")]
    Postgres(#[from] tokio_postgres::Error),
    /// A migration failed.
    #[error("migration failed: {0}")]
    Migration(String),
    /// The database was migrated by a newer tally-server.
    #[error("database schema version {found} is newer than this tally-server supports ({supported}); upgrade the server")]
    TooNew {
        /// Version found in the database.
        found: i64,
        /// Highest version embedded in this binary.
        supported: i64,
    },
    /// The pool could not be built.
    #[error("connection pool: {0}")]
    Pool(String),
}

/// The highest migration version embedded in this binary.
pub fn latest_version() -> i64 {
    migrations::runner().get_migrations().iter().map(|m| i64::from(m.version())).max().unwrap_or(0)
}

/// Applies the pending migrations to the database at `url`, holding an advisory lock, then
/// completes what SQL cannot compute (under the same lock: [`crate::email_canonical::complete`]);
/// refuses a database newer than this binary. Returns the versions applied by this call.
pub async fn migrate(url: &str) -> Result<Vec<i64>, DbError> {
    migrate_to(url, None).await
}

/// [`migrate`] up to version `target` only (`None`: every version, then the completion steps).
/// A test uses a target to build the database an older server left.
pub async fn migrate_to(url: &str, target: Option<i32>) -> Result<Vec<i64>, DbError> {
    let (mut client, conn) = tokio_postgres::connect(url, NoTls).await?;
    let task = tokio::spawn(conn);
    // A migration may build an index on a large table: never under a request timeout.
    client.batch_execute("SET statement_timeout = 0; SET lock_timeout = 0").await?;
    client.execute("SELECT pg_advisory_lock($1)", &[&MIGRATION_LOCK]).await?;
    let result = migrate_locked(&mut client, target).await;
    let _ = client.execute("SELECT pg_advisory_unlock($1)", &[&MIGRATION_LOCK]).await;
    drop(client);
    let _ = task.await;
    result
}

async fn migrate_locked(client: &mut tokio_postgres::Client, target: Option<i32>) -> Result<Vec<i64>, DbError> {
    let supported = latest_version();
    let has_history = client
        .query_opt(
            "SELECT 1 FROM information_schema.tables WHERE table_schema = current_schema() AND table_name = 'refinery_schema_history'",
            &[],
        )
        .await?
        .is_some();
    if has_history {
        let row = client.query_one("SELECT coalesce(max(version), 0)::bigint FROM refinery_schema_history", &[]).await?;
        let found: i64 = row.get(0);
        if found > supported {
            return Err(DbError::TooNew { found, supported });
        }
    }
    let mut runner = migrations::runner();
    if let Some(v) = target {
        runner = runner.set_target(refinery::Target::Version(v));
    }
    let report = runner.run_async(client).await.map_err(|e| DbError::Migration(e.to_string()))?;
    if target.is_none() {
        crate::email_canonical::complete(client).await?;
    }
    Ok(report.applied_migrations().iter().map(|m| i64::from(m.version())).collect())
}

/// Time bounds of a pool's connections; [`Limits::none`] for maintenance.
#[derive(Debug, Clone, Copy)]
pub struct Limits {
    /// Longest wait for a connection (verification and connecting included).
    pub wait: Option<Duration>,
    /// Longest time to open a connection.
    pub connect: Option<Duration>,
    /// Postgres `statement_timeout`.
    pub statement: Option<Duration>,
}

impl Limits {
    /// No time bounds (migrations, CLI maintenance).
    pub fn none() -> Limits {
        Limits { wait: None, connect: None, statement: None }
    }

    /// The bounds of request connections in `config`.
    pub fn from_config(config: &crate::Config) -> Limits {
        let secs = |s: u64| (s > 0).then(|| Duration::from_secs(s));
        Limits {
            wait: secs(config.db_pool_timeout_secs),
            connect: secs(config.db_connect_timeout_secs),
            statement: secs(config.db_statement_timeout_secs),
        }
    }
}

/// A connection pool whose [`Db::get`] answers 503 `unavailable` instead of waiting forever.
#[derive(Clone)]
pub struct Db {
    pool: Pool,
    wait: Option<Duration>,
}

impl Db {
    /// A pooled connection, verified alive; 503 `unavailable` (with `Retry-After`) when none
    /// can be had within the wait timeout.
    pub async fn get(&self) -> Result<Object, ApiError> {
        let fut = self.pool.get();
        let r = match self.wait {
            Some(d) => tokio::time::timeout(d, fut).await.map_err(|_| unavailable("no database connection within the timeout"))?,
            None => fut.await,
        };
        r.map_err(ApiError::from)
    }

    /// Size and availability of the pool.
    pub fn status(&self) -> Status {
        self.pool.status()
    }

    /// The underlying pool.
    pub fn pool(&self) -> &Pool {
        &self.pool
    }
}

fn unavailable(msg: &str) -> ApiError {
    ::metrics::counter!("tally_db_unavailable_total").increment(1);
    ApiError::Unavailable(format!("the database is unavailable ({msg}); retry shortly"))
}

/// Builds a pool of `size` connections to `url` bounded by `limits`.
pub fn pool_with(url: &str, size: usize, limits: Limits) -> Result<Db, DbError> {
    let mut pg: tokio_postgres::Config = url.parse()?;
    if let Some(c) = limits.connect {
        pg.connect_timeout(c);
    }
    if let Some(st) = limits.statement {
        let mut opts = pg.get_options().map(str::to_string).unwrap_or_default();
        if !opts.is_empty() {
            opts.push(' ');
        }
        opts.push_str(&format!("-c statement_timeout={}", st.as_millis()));
        pg.options(opts);
    }
    pg.keepalives(true).keepalives_idle(Duration::from_secs(30));
    // Verified: a connection broken by a database restart is replaced, never handed out.
    let mgr = Manager::from_config(pg, NoTls, ManagerConfig { recycling_method: RecyclingMethod::Verified });
    let recycle = limits.wait.map(|w| w.min(Duration::from_secs(2)));
    let pool = Pool::builder(mgr)
        .max_size(size.max(1))
        .runtime(Runtime::Tokio1)
        .wait_timeout(limits.wait)
        .create_timeout(limits.connect)
        .recycle_timeout(recycle)
        .build()
        .map_err(|e| DbError::Pool(e.to_string()))?;
    Ok(Db { pool, wait: limits.wait })
}

/// Builds a pool of `size` connections to `url` without time bounds (maintenance).
pub fn pool(url: &str, size: usize) -> Result<Db, DbError> {
    pool_with(url, size, Limits::none())
}
