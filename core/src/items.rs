//! Uses with several meters: one call (an AI request, say) that counts on a call limit, a money
//! budget and a credit balance at once. Its items are decided in order against running totals
//! and recorded in one transaction, all of them or none. Each item is an event of its own, with
//! id [`crate::contract::item_event_id`]`(use id, feature)` and the use id beside it, so a retry
//! never counts twice and a void of the use id cancels every item.

use crate::decision::Decision;
use crate::error::Result;
use crate::Tally;
use serde::{Deserialize, Serialize};
use serde_json::Value;
use uuid::Uuid;

/// One meter of a use with several meters ([`Tally::consume_items`]).
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct UseItem {
    /// Feature key (at most once per use).
    pub feature: String,
    /// Units used (for a budget: the estimated cost in micros when no model prices it).
    pub amount: u64,
    /// AI model (priced from the catalog's `models`).
    #[serde(default)]
    pub model: Option<String>,
    /// AI input tokens.
    #[serde(default)]
    pub input_tokens: Option<u64>,
    /// AI output tokens.
    #[serde(default)]
    pub output_tokens: Option<u64>,
}

/// The answer of [`Tally::consume_items`].
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct UseOutcome {
    /// The use's id: its items' events are `item_event_id(use_id, feature)`; void it to cancel
    /// every item.
    pub use_id: Uuid,
    /// Whether every item was allowed and recorded (else nothing was).
    pub allowed: bool,
    /// Whether this id was recorded before with the same items (nothing recorded now; the
    /// decisions are the first ones).
    pub duplicate: bool,
    /// One decision per item, in order.
    pub decisions: Vec<Decision>,
}

impl Tally {
    /// Not yet built.
    pub fn consume_items(&self, _user_id: &str, _id: Option<&str>, _items: &[UseItem], _metadata: Option<Value>) -> Result<UseOutcome> {
        Err(crate::Error::invalid("consume_items is not built yet"))
    }
}
