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
#[cfg_attr(feature = "uniffi", derive(uniffi::Enum))]
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

/// Opens (creating when absent) the database at `path`, or an in-memory one when `None`,
/// encrypted with `key` (SQLCipher builds only). Never deletes or recreates an existing file: a
/// corrupt file is an error, and so is a wrong key, a key for an unencrypted file (see
/// [`encrypt_database`]) or no key for an encrypted one — each changes nothing in the file.
pub fn open(path: Option<&Path>, durability: Durability, busy_timeout: Duration, key: Option<&str>) -> Result<Connection> {
    let mut conn = match path {
        Some(p) => Connection::open_with_flags(
            p,
            OpenFlags::SQLITE_OPEN_READ_WRITE | OpenFlags::SQLITE_OPEN_CREATE | OpenFlags::SQLITE_OPEN_NO_MUTEX,
        )?,
        None => Connection::open_in_memory()?,
    };
    conn.busy_timeout(busy_timeout)?;
    apply_key(&conn, key)?;
    // Touch the file: a corrupt or foreign file — or one this key does not open — fails here.
    if let Err(e) = conn.query_row("PRAGMA schema_version", [], |r| r.get::<_, i64>(0)) {
        return Err(match e.sqlite_error_code() {
            Some(rusqlite::ErrorCode::NotADatabase) if key.is_some() => Error::EncryptionKey(
                "the database does not open with this key: the key is wrong, or the file is not encrypted (encrypt it once with encrypt_database)".into(),
            ),
            Some(rusqlite::ErrorCode::NotADatabase) if cfg!(feature = "sqlcipher") => {
                Error::EncryptionKey("the file is not a database, or it is encrypted and no encryption_key was given".into())
            }
            _ => e.into(),
        });
    }
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

/// Gives SQLCipher the key of the connection (before anything is read).
fn apply_key(conn: &Connection, key: Option<&str>) -> Result<()> {
    let Some(key) = key else { return Ok(()) };
    if key.is_empty() {
        return Err(Error::Configuration("encryption_key must not be empty".into()));
    }
    if !cfg!(feature = "sqlcipher") {
        return Err(Error::Configuration("encryption_key needs a build with the sqlcipher feature".into()));
    }
    conn.pragma_update(None, "key", key)?;
    Ok(())
}

/// Encrypts the unencrypted database at `path` with `key`, in place: its content is exported
/// into a new SQLCipher file next to it, which is checked and then renamed over the original
/// (so a crash leaves either the old file or the encrypted one, never a mix). Call it once,
/// before opening the database with `Config.encryption_key`, while no process has it open.
/// An already encrypted (or foreign) file is an error and is left as it is.
pub fn encrypt_database(path: &Path, key: &str) -> Result<()> {
    if !cfg!(feature = "sqlcipher") {
        return Err(Error::Configuration("encrypt_database needs a build with the sqlcipher feature".into()));
    }
    if key.is_empty() {
        return Err(Error::Configuration("the key must not be empty".into()));
    }
    if !path.is_file() {
        return Err(Error::NotFound(format!("database file {}", path.display())));
    }
    // CREATE lets the attached copy be made; the file itself exists (checked above).
    let flags = OpenFlags::SQLITE_OPEN_READ_WRITE | OpenFlags::SQLITE_OPEN_CREATE | OpenFlags::SQLITE_OPEN_NO_MUTEX;
    let conn = Connection::open_with_flags(path, flags)?;
    if let Err(e) = conn.query_row("PRAGMA schema_version", [], |r| r.get::<_, i64>(0)) {
        return Err(match e.sqlite_error_code() {
            Some(rusqlite::ErrorCode::NotADatabase) => {
                Error::EncryptionKey("the file is not an unencrypted database (already encrypted?)".into())
            }
            _ => e.into(),
        });
    }
    let mut tmp = path.as_os_str().to_owned();
    tmp.push(".encrypting");
    let tmp = std::path::PathBuf::from(tmp);
    let _ = std::fs::remove_file(&tmp);
    // Everything in the WAL goes into the main file first, so nothing is left behind.
    conn.query_row("PRAGMA wal_checkpoint(TRUNCATE)", [], |_| Ok(()))?;
    conn.execute("ATTACH DATABASE ?1 AS encrypted KEY ?2", rusqlite::params![tmp.to_string_lossy(), key])?;
    conn.query_row("SELECT sqlcipher_export('encrypted')", [], |_| Ok(()))?;
    let version: i64 = conn.query_row("PRAGMA main.user_version", [], |r| r.get(0))?;
    conn.execute_batch(&format!("PRAGMA encrypted.user_version = {version}; DETACH DATABASE encrypted;"))?;
    conn.close().map_err(|(_, e)| Error::from(e))?;
    // The new file must open with the key before it replaces the old one.
    {
        let check = Connection::open(&tmp)?;
        check.pragma_update(None, "key", key)?;
        let _: i64 = check.query_row("SELECT count(*) FROM sqlite_master", [], |r| r.get(0))?;
    }
    std::fs::File::open(&tmp).and_then(|f| f.sync_all()).map_err(|e| Error::invalid(format!("syncing {}: {e}", tmp.display())))?;
    for side in ["-wal", "-shm"] {
        let mut p = path.as_os_str().to_owned();
        p.push(side);
        let _ = std::fs::remove_file(std::path::PathBuf::from(p));
    }
    std::fs::rename(&tmp, path).map_err(|e| Error::invalid(format!("replacing {}: {e}", path.display())))?;
    Ok(())
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

/// A transaction begun and ended by cached statements: rusqlite's `Transaction` parses its
/// `BEGIN` and `COMMIT` text on every use, a measurable share of one consume. Rolled back when
/// dropped unfinished (an error, or a fast path that gives up).
pub(crate) struct Tx<'c> {
    conn: &'c Connection,
    open: bool,
}

impl<'c> Tx<'c> {
    /// `BEGIN IMMEDIATE`: takes the write lock at once, so concurrent writers queue on the busy
    /// timeout instead of failing at their first write.
    pub(crate) fn immediate(conn: &'c Connection) -> Result<Tx<'c>> {
        Tx::begin(conn, "BEGIN IMMEDIATE")
    }

    /// `BEGIN DEFERRED`: one read snapshot for several reads.
    pub(crate) fn deferred(conn: &'c Connection) -> Result<Tx<'c>> {
        Tx::begin(conn, "BEGIN DEFERRED")
    }

    fn begin(conn: &'c Connection, sql: &str) -> Result<Tx<'c>> {
        conn.prepare_cached(sql)?.execute([])?;
        Ok(Tx { conn, open: true })
    }

    /// The connection, for use after [`Tx::commit`].
    pub(crate) fn connection(&self) -> &'c Connection {
        self.conn
    }

    /// Commits; on failure the transaction is rolled back when this guard drops.
    pub(crate) fn commit(mut self) -> Result<()> {
        self.conn.prepare_cached("COMMIT")?.execute([])?;
        self.open = false;
        Ok(())
    }
}

impl Drop for Tx<'_> {
    fn drop(&mut self) {
        if self.open && !self.conn.is_autocommit() {
            let _ = self.conn.prepare_cached("ROLLBACK").and_then(|mut st| st.execute([]));
        }
    }
}

impl std::ops::Deref for Tx<'_> {
    type Target = Connection;

    fn deref(&self) -> &Connection {
        self.conn
    }
}

/// A count as stored in `place` (a counter's `server_used`, a lease's allowance): never
/// negative. A negative one is corruption, never room: a storage error naming the place and the
/// value.
pub(crate) fn stored_count(v: i64, place: &str) -> rusqlite::Result<u64> {
    u64::try_from(v).map_err(|_| {
        rusqlite::Error::FromSqlConversionFailure(0, rusqlite::types::Type::Integer, format!("corrupt stored count: {place} is {v}").into())
    })
}
