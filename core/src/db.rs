//! Opening the SQLite database: pragmas, durability and migrations.

use crate::error::{Error, Result};
use rusqlite::{Connection, OpenFlags};
use std::path::Path;
use std::time::Duration;

mod embedded {
    refinery::embed_migrations!("../migrations/sqlite");
}

/// How hard a commit tries to survive failures.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum Durability {
    /// WAL + `synchronous=NORMAL`: survives app crashes (the default).
    #[default]
    Normal,
    /// WAL + `synchronous=FULL`: also survives power loss.
    Full,
}

/// The schema version this build writes.
pub fn latest_version() -> i64 {
    embedded::migrations::runner().get_migrations().iter().map(|m| i64::from(m.version())).max().unwrap_or(0)
}

/// Opens (creating when absent) the database at `path`, or an in-memory one when `None`.
/// Never deletes or recreates an existing file: a corrupt file is an error.
pub fn open(path: Option<&Path>, durability: Durability, busy_timeout: Duration) -> Result<Connection> {
    let mut conn = match path {
        Some(p) => Connection::open_with_flags(
            p,
            OpenFlags::SQLITE_OPEN_READ_WRITE | OpenFlags::SQLITE_OPEN_CREATE | OpenFlags::SQLITE_OPEN_NO_MUTEX,
        )?,
        None => Connection::open_in_memory()?,
    };
    conn.busy_timeout(busy_timeout)?;
    // Touch the file: a corrupt or foreign file fails here with a clear error.
    let _: i64 = conn.query_row("PRAGMA schema_version", [], |r| r.get(0))?;
    // Refuse a newer database before changing anything in the file (its journal mode included).
    let (found, supported) = (current_version(&conn)?, latest_version());
    if found > supported {
        return Err(Error::SchemaTooNew { found, supported });
    }
    if path.is_some() {
        let mode: String = conn.query_row("PRAGMA journal_mode = WAL", [], |r| r.get(0))?;
        if !mode.eq_ignore_ascii_case("wal") {
            return Err(Error::invalid(format!("could not enable WAL (journal_mode = {mode})")));
        }
    }
    let sync = match durability {
        Durability::Normal => "NORMAL",
        Durability::Full => "FULL",
    };
    conn.execute_batch(&format!("PRAGMA synchronous = {sync}; PRAGMA foreign_keys = ON;"))?;
    conn.set_prepared_statement_cache_capacity(64);
    migrate(&mut conn)?;
    Ok(conn)
}

/// Applies pending migrations all-or-nothing; refuses a database newer than this build.
pub fn migrate(conn: &mut Connection) -> Result<()> {
    let found = current_version(conn)?;
    let supported = latest_version();
    if found > supported {
        return Err(Error::SchemaTooNew { found, supported });
    }
    if found == supported {
        return Ok(());
    }
    let run = embedded::migrations::runner().set_grouped(true).set_abort_divergent(true).set_abort_missing(true).run(conn);
    match run {
        Ok(_) => Ok(()),
        // Several processes may open a fresh file at once: if another one migrated it meanwhile,
        // the file is at our version and all is well.
        Err(_) if current_version(conn)? == supported => Ok(()),
        Err(e) => Err(Error::Migration(e.to_string())),
    }
}

/// The schema version recorded in the file (0 for a new database).
pub fn current_version(conn: &Connection) -> Result<i64> {
    let has: bool =
        conn.query_row("SELECT EXISTS (SELECT 1 FROM sqlite_master WHERE type = 'table' AND name = 'refinery_schema_history')", [], |r| {
            r.get(0)
        })?;
    if !has {
        return Ok(0);
    }
    Ok(conn.query_row("SELECT COALESCE(MAX(version), 0) FROM refinery_schema_history", [], |r| r.get(0))?)
}

/// Runs exactly the migrations up to `version` (for upgrade tests).
#[doc(hidden)]
pub fn migrate_to(conn: &mut Connection, version: i32) -> Result<()> {
    embedded::migrations::runner()
        .set_grouped(true)
        .set_target(refinery::Target::Version(version))
        .run(conn)
        .map_err(|e| Error::Migration(e.to_string()))?;
    Ok(())
}
