//! The one error type of the foreign API, and the panic guard.

use std::panic::{AssertUnwindSafe, catch_unwind};

/// Every failure of the Tally API, as seen from Swift (`TallyError`) and Kotlin
/// (`TallyException`). Each variant carries a readable `message`.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error, uniffi::Error)]
#[uniffi(flat_error)]
pub enum TallyError {
    /// The user, event, feature or key does not exist (or belongs to someone else).
    #[error("{message}")]
    NotFound { message: String },
    /// An argument was rejected (malformed JSON, bad amount, unknown timezone, …); nothing changed.
    #[error("{message}")]
    InvalidInput { message: String },
    /// The plan catalog is malformed; the message names the offending path.
    #[error("{message}")]
    InvalidCatalog { message: String },
    /// The same idempotency key was used with a different body.
    #[error("{message}")]
    IdempotencyConflict { message: String },
    /// The user still has unsynced events (delete with `force` to drop them).
    #[error("{message}")]
    UnsyncedEvents { message: String },
    /// SQLite failed (I/O, corruption, locking) or a migration failed.
    #[error("{message}")]
    Storage { message: String },
    /// The database was written by a newer version of Tally.
    #[error("{message}")]
    SchemaTooNew { message: String },
    /// The sync server could not be reached (after retries).
    #[error("{message}")]
    Network { message: String },
    /// The server rejected the credentials: refresh the sign-in token and retry.
    #[error("{message}")]
    Unauthorized { message: String },
    /// The account was deleted on the server; the user's local data was removed.
    #[error("{message}")]
    AccountDeleted { message: String },
    /// The database does not open with the encryption key given (or needs one); the file
    /// was not changed.
    #[error("{message}")]
    EncryptionKey { message: String },
    /// An admin disabled the account on the server; nothing local was deleted.
    #[error("{message}")]
    AccountDisabled { message: String },
    /// The server answered with an error that retrying will not fix.
    #[error("{message}")]
    Server { message: String },
    /// The server refused a store purchase; nothing changed on the device. The message names
    /// the server's code (`bound_to_other_user`, `bad_signature`, `store_unconfigured`, …). Do
    /// not finish the store transaction.
    #[error("{message}")]
    PurchaseRefused { message: String },
    /// The entitlements token could not be verified.
    #[error("{message}")]
    InvalidToken { message: String },
    /// The sync credentials are for another account than the signed-in user; nothing was
    /// recorded. Sign the user in again with matching credentials.
    #[error("{message}")]
    SubjectMismatch { message: String },
    /// The library is not configured for this call (e.g. sync without the server's keys).
    #[error("{message}")]
    Configuration { message: String },
    /// A bug inside the library (a caught panic); the call had no effect that was not committed.
    #[error("{message}")]
    Internal { message: String },
}

impl TallyError {
    pub(crate) fn invalid(message: impl Into<String>) -> Self {
        TallyError::InvalidInput { message: message.into() }
    }

    /// The variant's name (`Unauthorized`, `Network`, …), as Swift and Kotlin spell it.
    pub fn kind(&self) -> &'static str {
        use TallyError as E;
        match self {
            E::NotFound { .. } => "NotFound",
            E::InvalidInput { .. } => "InvalidInput",
            E::InvalidCatalog { .. } => "InvalidCatalog",
            E::IdempotencyConflict { .. } => "IdempotencyConflict",
            E::UnsyncedEvents { .. } => "UnsyncedEvents",
            E::Storage { .. } => "Storage",
            E::SchemaTooNew { .. } => "SchemaTooNew",
            E::Network { .. } => "Network",
            E::Unauthorized { .. } => "Unauthorized",
            E::AccountDeleted { .. } => "AccountDeleted",
            E::EncryptionKey { .. } => "EncryptionKey",
            E::AccountDisabled { .. } => "AccountDisabled",
            E::Server { .. } => "Server",
            E::PurchaseRefused { .. } => "PurchaseRefused",
            E::InvalidToken { .. } => "InvalidToken",
            E::SubjectMismatch { .. } => "SubjectMismatch",
            E::Configuration { .. } => "Configuration",
            E::Internal { .. } => "Internal",
        }
    }

    /// Whether trying the same call again later may succeed (the network, the server, the
    /// disk); every other error needs the app (new credentials, a sign-in, a fix).
    pub fn is_transient(&self) -> bool {
        matches!(self, TallyError::Network { .. } | TallyError::Server { .. } | TallyError::Storage { .. } | TallyError::Internal { .. })
    }
}

impl From<tally_core::Error> for TallyError {
    fn from(e: tally_core::Error) -> Self {
        use tally_core::Error as E;
        let message = e.to_string();
        match e {
            E::NotFound(_) => TallyError::NotFound { message },
            E::InvalidInput(_) => TallyError::InvalidInput { message },
            E::InvalidCatalog { .. } => TallyError::InvalidCatalog { message },
            E::IdempotencyConflict(_) => TallyError::IdempotencyConflict { message },
            E::UnsyncedEvents(_) => TallyError::UnsyncedEvents { message },
            E::SchemaTooNew { .. } => TallyError::SchemaTooNew { message },
            // JSON errors inside the core come from stored data (inputs are parsed here first).
            E::Storage(_) | E::Migration(_) | E::Json(_) => TallyError::Storage { message },
            E::Unauthorized(_) => TallyError::Unauthorized { message },
            E::AccountDeleted => TallyError::AccountDeleted { message },
            E::AccountDisabled => TallyError::AccountDisabled { message },
            E::EncryptionKey(_) => TallyError::EncryptionKey { message },
            E::Network(_) => TallyError::Network { message },
            E::Server { .. } => TallyError::Server { message },
            E::PurchaseRefused { .. } => TallyError::PurchaseRefused { message },
            E::InvalidToken(_) => TallyError::InvalidToken { message },
            E::SubjectMismatch(_) => TallyError::SubjectMismatch { message },
            E::Configuration(_) => TallyError::Configuration { message },
        }
    }
}

/// Text of a caught panic payload.
pub(crate) fn panic_text(payload: &(dyn std::any::Any + Send)) -> String {
    if let Some(s) = payload.downcast_ref::<&str>() {
        (*s).to_string()
    } else if let Some(s) = payload.downcast_ref::<String>() {
        s.clone()
    } else {
        "unknown panic".to_string()
    }
}

/// Runs `f`, turning a panic into [`TallyError::Internal`] so that no panic crosses the FFI
/// boundary. Every exported call goes through here.
pub fn guard<T>(f: impl FnOnce() -> Result<T, TallyError>) -> Result<T, TallyError> {
    match catch_unwind(AssertUnwindSafe(f)) {
        Ok(r) => r,
        Err(p) => Err(TallyError::Internal { message: format!("internal error: {}", panic_text(p.as_ref())) }),
    }
}

/// [`guard`] for calls into the core.
pub(crate) fn core<T>(f: impl FnOnce() -> tally_core::Result<T>) -> Result<T, TallyError> {
    guard(|| f().map_err(TallyError::from))
}
