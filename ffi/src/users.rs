//! Users and profiles.

use crate::convert::to_ms;
use tally_core as core;

/// A user of the app on this device.
#[derive(Debug, Clone, PartialEq, Eq, uniffi::Record)]
pub struct User {
    /// Local id (UUID v7). Differs from the server's id; accounts match by `external_id`.
    pub id: String,
    /// The identity provider's subject; absent for a local user.
    pub external_id: Option<String>,
    /// Email address.
    pub email: Option<String>,
    /// Display name.
    pub display_name: Option<String>,
    /// Avatar URL.
    pub avatar_url: Option<String>,
    /// IANA timezone of calendar periods.
    pub timezone: String,
    /// Whether the user is an admin.
    pub is_admin: bool,
    /// Whether a session is active (false after `sign_out`).
    pub signed_in: bool,
    /// Creation time (Unix ms).
    pub created_at_ms: i64,
    /// Last change (Unix ms).
    pub updated_at_ms: i64,
}

impl From<core::User> for User {
    fn from(u: core::User) -> Self {
        User {
            id: u.id,
            external_id: u.external_id,
            email: u.email,
            display_name: u.display_name,
            avatar_url: u.avatar_url,
            timezone: u.timezone,
            is_admin: u.is_admin,
            signed_in: u.signed_in,
            created_at_ms: to_ms(u.created_at),
            updated_at_ms: to_ms(u.updated_at),
        }
    }
}

/// The identity of a signed-in user, from the app's identity provider.
#[derive(Debug, Clone, PartialEq, Eq, uniffi::Record)]
pub struct Profile {
    /// The identity provider's subject (`sub`).
    pub external_id: String,
    /// Email address.
    #[uniffi(default = None)]
    pub email: Option<String>,
    /// Display name.
    #[uniffi(default = None)]
    pub display_name: Option<String>,
    /// Avatar URL.
    #[uniffi(default = None)]
    pub avatar_url: Option<String>,
}

impl From<Profile> for core::Profile {
    fn from(p: Profile) -> Self {
        core::Profile { external_id: p.external_id, email: p.email, display_name: p.display_name, avatar_url: p.avatar_url }
    }
}

/// Changes to a user's profile; absent leaves a field as it is, `""` clears it.
#[derive(Debug, Clone, Default, PartialEq, Eq, uniffi::Record)]
pub struct UserUpdate {
    /// New display name.
    #[uniffi(default = None)]
    pub display_name: Option<String>,
    /// New avatar URL.
    #[uniffi(default = None)]
    pub avatar_url: Option<String>,
    /// New IANA timezone (validated).
    #[uniffi(default = None)]
    pub timezone: Option<String>,
    /// New email.
    #[uniffi(default = None)]
    pub email: Option<String>,
}

impl From<UserUpdate> for core::UserUpdate {
    fn from(u: UserUpdate) -> Self {
        core::UserUpdate { display_name: u.display_name, avatar_url: u.avatar_url, timezone: u.timezone, email: u.email }
    }
}
