//! Errors of the core library.

use thiserror::Error;

/// Everything that can go wrong in `tally-core`.
#[derive(Debug, Error)]
pub enum Error {
    /// The user, event or key does not exist (or belongs to someone else).
    #[error("not found: {0}")]
    NotFound(String),
    /// An argument was rejected; nothing was changed.
    #[error("invalid input: {0}")]
    InvalidInput(String),
    /// The plan catalog (or one plan) is malformed; the message names the offending path.
    #[error("invalid plan catalog at {path}: {message}")]
    InvalidCatalog {
        /// JSON path of the offending value, e.g. `plans[1].features.api.limit`.
        path: String,
        /// What is wrong with it.
        message: String,
    },
    /// The same idempotency key was used with a different body.
    #[error("idempotency conflict: event {0} was already recorded with a different body")]
    IdempotencyConflict(String),
    /// The user still has unsynced events (use `force` to delete anyway).
    #[error("user has {0} unsynced events; pass force to delete them")]
    UnsyncedEvents(u64),
    /// The database was written by a newer version of Tally.
    #[error("database schema version {found} is newer than this library supports ({supported})")]
    SchemaTooNew {
        /// Version found in the file.
        found: i64,
        /// Highest version this build knows.
        supported: i64,
    },
    /// SQLite failed (I/O, corruption, locking).
    #[error("storage error: {0}")]
    Storage(#[from] rusqlite::Error),
    /// A migration failed; the database was left at its previous version.
    #[error("migration failed: {0}")]
    Migration(String),
    /// JSON (de)serialization failed.
    #[error("json error: {0}")]
    Json(#[from] serde_json::Error),
    /// The database does not open with the given encryption key (wrong key, an unencrypted
    /// file given a key, or an encrypted file given none); the file was not changed.
    #[error("encryption key: {0}")]
    EncryptionKey(String),
    /// The server rejected our credentials; refresh the sign-in and retry.
    #[error("unauthorized: {0}")]
    Unauthorized(String),
    /// An admin disabled the account on the server; nothing local was deleted, and syncing
    /// works again once the account is enabled.
    #[error("the account is disabled on the server")]
    AccountDisabled,
    /// The account was deleted on the server; local data of that user was removed.
    #[error("account deleted on the server")]
    AccountDeleted,
    /// Network failure talking to the sync server (after retries).
    #[error("network error: {0}")]
    Network(String),
    /// The server answered with an error we cannot recover from.
    #[error("server error {status}: {code}: {message}")]
    Server {
        /// HTTP status.
        status: u16,
        /// Error code from the body.
        code: String,
        /// Human readable message.
        message: String,
    },
    /// The server refused a store purchase (`submit_purchase`, `restore_purchases`); nothing
    /// changed on the device. `code` names the cause (`bound_to_other_user`, `bad_signature`,
    /// `unknown_product`, `store_unconfigured`, …). Do not finish the store transaction.
    #[error("purchase refused ({status} {code}): {message}")]
    PurchaseRefused {
        /// HTTP status.
        status: u16,
        /// Error code from the body.
        code: String,
        /// Human readable message.
        message: String,
    },
    /// The server's credentials name another subject than the signed-in user's `external_id`:
    /// nothing was recorded. Sign the user in again with matching credentials.
    #[error("subject mismatch: the credentials are for another account than user {0}")]
    SubjectMismatch(String),
    /// The library is not configured for this call (e.g. `sync` without `Config.server_keys`).
    #[error("configuration error: {0}")]
    Configuration(String),
    /// The entitlements token could not be verified.
    #[error("invalid entitlements token: {0}")]
    InvalidToken(String),
}

impl From<crate::contract::Violation> for Error {
    fn from(v: crate::contract::Violation) -> Self {
        Error::InvalidInput(v.message)
    }
}

/// Result alias of the core.
pub type Result<T, E = Error> = std::result::Result<T, E>;

impl Error {
    /// Shorthand for [`Error::InvalidInput`].
    pub fn invalid(msg: impl Into<String>) -> Self {
        Error::InvalidInput(msg.into())
    }
    /// Shorthand for a catalog validation error at `path`.
    pub fn catalog(path: impl Into<String>, message: impl Into<String>) -> Self {
        Error::InvalidCatalog { path: path.into(), message: message.into() }
    }
}
