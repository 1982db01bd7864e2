//! Database access: the connection pool and the embedded refinery migrations, applied under
//! `pg_advisory_lock` so replicas starting together apply them once.

use deadpool_postgres::{Manager, ManagerConfig, Pool, RecyclingMethod};
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

/// Applies the pending migrations to the database at `url`, holding an advisory lock; refuses a
/// database newer than this binary. Returns the versions applied by this call.
pub async fn migrate(url: &str) -> Result<Vec<i64>, DbError> {
    let (mut client, conn) = tokio_postgres::connect(url, NoTls).await?;
    let task = tokio::spawn(conn);
    client.execute("SELECT pg_advisory_lock($1)", &[&MIGRATION_LOCK]).await?;
    let result = migrate_locked(&mut client).await;
    let _ = client.execute("SELECT pg_advisory_unlock($1)", &[&MIGRATION_LOCK]).await;
    drop(client);
    let _ = task.await;
    result
}

async fn migrate_locked(client: &mut tokio_postgres::Client) -> Result<Vec<i64>, DbError> {
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
    let report = migrations::runner().run_async(client).await.map_err(|e| DbError::Migration(e.to_string()))?;
    Ok(report.applied_migrations().iter().map(|m| i64::from(m.version())).collect())
}

/// Builds a connection pool of `size` connections to `url`.
pub fn pool(url: &str, size: usize) -> Result<Pool, DbError> {
    let pg: tokio_postgres::Config = url.parse()?;
    let mgr = Manager::from_config(pg, NoTls, ManagerConfig { recycling_method: RecyclingMethod::Fast });
    Pool::builder(mgr).max_size(size.max(1)).build().map_err(|e| DbError::Pool(e.to_string()))
}
