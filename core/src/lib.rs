//! # tally-core
//!
//! Offline-first entitlements, quota checks and usage metering on SQLite.

pub mod catalog;
pub mod clock;
pub mod decision;
pub mod entitlements;
pub mod error;
pub mod hlc;
pub mod period;
pub mod wire;

pub use catalog::{Catalog, Enforcement, ModelPrice, Plan, Rule};
pub use decision::{Decision, Reason};
pub use clock::{Clock, ManualClock, SystemClock};
pub use entitlements::{AccessGrant, CreditGrant, EntitlementClaims, Entitlements, SubscriptionStatus};
pub use error::{Error, Result};
pub use period::{Period, Window};
