//! Who may undo a use: every event keeps who recorded it (`recorded_by`), every hold who made
//! it, and a void, a hold's commit or its release needs at least that authority. A backend (an
//! API key made by an admin or the CLI) may undo anything of the user; a user (their token or
//! their own API key) what a user or a device recorded; a device (its sync) only its own
//! device's events. So an end user cannot refund what a backend charged.

use crate::error::ApiError;
use serde::Serialize;
use tokio_postgres::types::{FromSql, Type};

/// The code of a refused void, commit or release (403; a sync's rejection reason).
pub const VOID_NOT_ALLOWED: &str = "void_not_allowed";

type SqlError = Box<dyn std::error::Error + Sync + Send>;

/// Who recorded an event or made a hold (column `recorded_by`, written as [`RecordedBy::as_str`]).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, utoipa::ToSchema)]
#[serde(rename_all = "snake_case")]
pub enum RecordedBy {
    /// A device's sync (the event's `device_id` names the device).
    Device,
    /// A user token or the user's own API key.
    User,
    /// An API key made by an admin or the CLI.
    Backend,
}

impl RecordedBy {
    /// Every value.
    pub const ALL: [RecordedBy; 3] = [RecordedBy::Device, RecordedBy::User, RecordedBy::Backend];

    /// Its name in the API and the database.
    pub fn as_str(self) -> &'static str {
        match self {
            RecordedBy::Device => "device",
            RecordedBy::User => "user",
            RecordedBy::Backend => "backend",
        }
    }
}

/// Who made an API key (column `api_keys.made_by`): it decides the authority the key acts with.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, utoipa::ToSchema)]
#[serde(rename_all = "snake_case")]
pub enum KeyMaker {
    /// An admin or the CLI: the key is a backend's.
    Backend,
    /// A user, for themself: the key acts as that user.
    User,
}

impl KeyMaker {
    /// Every value.
    pub const ALL: [KeyMaker; 2] = [KeyMaker::Backend, KeyMaker::User];

    /// Its name in the database.
    pub fn as_str(self) -> &'static str {
        match self {
            KeyMaker::Backend => "backend",
            KeyMaker::User => "user",
        }
    }
}

/// Reads one of `all` by its stored name; an unknown name is an error, never a guess.
fn from_text<T: Copy>(ty: &Type, raw: &[u8], all: &[T], name: fn(T) -> &'static str, what: &str) -> Result<T, SqlError> {
    let s = <&str as FromSql>::from_sql(ty, raw)?;
    all.iter().copied().find(|v| name(*v) == s).ok_or_else(|| format!("unknown {what} {s:?}").into())
}

macro_rules! text_column {
    ($t:ty, $what:literal) => {
        impl FromSql<'_> for $t {
            fn from_sql(ty: &Type, raw: &[u8]) -> Result<Self, SqlError> {
                from_text(ty, raw, &<$t>::ALL, <$t>::as_str, $what)
            }
            fn accepts(ty: &Type) -> bool {
                <&str as FromSql>::accepts(ty)
            }
        }
    };
}

// Written as `as_str()`, read back typed (the columns' CHECK admits only these names).
text_column!(RecordedBy, "recorded_by");
text_column!(KeyMaker, "api key maker");

/// Who acts on a user's usage in one request.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Actor<'a> {
    /// A device, by its sync.
    Device(&'a str),
    /// The user: their token, or their own API key.
    User,
    /// A backend: an API key made by an admin or the CLI.
    Backend,
}

impl Actor<'_> {
    /// What is stored as `recorded_by` of what this actor records.
    pub fn recorded_by(&self) -> RecordedBy {
        match self {
            Actor::Device(_) => RecordedBy::Device,
            Actor::User => RecordedBy::User,
            Actor::Backend => RecordedBy::Backend,
        }
    }

    /// The device of a device's sync.
    pub fn device_id(&self) -> Option<&str> {
        match self {
            Actor::Device(d) => Some(d),
            Actor::User | Actor::Backend => None,
        }
    }

    /// Whether this actor may void (or commit, or release) what `by` recorded (`device`: the
    /// recording device, for `RecordedBy::Device`).
    pub fn may_undo(&self, by: RecordedBy, device: Option<&str>) -> bool {
        match (self, by) {
            (Actor::Backend, RecordedBy::Device | RecordedBy::User | RecordedBy::Backend) => true,
            (Actor::User, RecordedBy::Device | RecordedBy::User) => true,
            (Actor::User, RecordedBy::Backend) => false,
            (Actor::Device(me), RecordedBy::Device) => device == Some(*me),
            (Actor::Device(_), RecordedBy::User | RecordedBy::Backend) => false,
        }
    }
}

/// The 403 `void_not_allowed` of an undo refused by [`Actor::may_undo`]; `what` names it
/// (`event …`, `hold …`) and `by` who recorded it.
pub fn not_allowed(what: &str, by: RecordedBy) -> ApiError {
    ApiError::Status(
        axum::http::StatusCode::FORBIDDEN,
        VOID_NOT_ALLOWED,
        format!("{what} was recorded by a {}: this caller has less authority and cannot undo it", by.as_str()),
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn who_may_undo_what() {
        use RecordedBy::*;
        let cases = [
            (Actor::Backend, Backend, None, true),
            (Actor::Backend, User, None, true),
            (Actor::Backend, Device, Some("a"), true),
            (Actor::User, Backend, None, false),
            (Actor::User, User, None, true),
            (Actor::User, Device, Some("a"), true),
            (Actor::Device("a"), Device, Some("a"), true),
            (Actor::Device("a"), Device, Some("b"), false),
            (Actor::Device("a"), User, None, false),
            (Actor::Device("a"), Backend, None, false),
        ];
        for (actor, by, device, allowed) in cases {
            assert_eq!(actor.may_undo(by, device), allowed, "{actor:?} undoing {by:?} of {device:?}");
        }
    }
}
