//! Uses with several meters for the foreign side: `consume_items` and its records.

use crate::Tally;
use crate::convert::{opt_unsigned, parse_json, unsigned};
use crate::error::{TallyError, guard};
use crate::quota::Decision;
use tally_core as core;

/// One meter of a use with several meters (`consume_items`).
#[derive(Debug, Clone, PartialEq, Eq, uniffi::Record)]
pub struct UseItem {
    /// Feature key (at most once per use).
    pub feature: String,
    /// Units used (for a budget without a model: the estimated cost in micros).
    pub amount: i64,
    /// AI model (priced from the catalog's `models`).
    #[uniffi(default = None)]
    pub model: Option<String>,
    /// AI input tokens.
    #[uniffi(default = None)]
    pub input_tokens: Option<i64>,
    /// AI output tokens.
    #[uniffi(default = None)]
    pub output_tokens: Option<i64>,
}

impl TryFrom<UseItem> for core::UseItem {
    type Error = TallyError;
    fn try_from(i: UseItem) -> Result<Self, TallyError> {
        Ok(core::UseItem {
            feature: i.feature,
            amount: unsigned(i.amount, "amount")?,
            model: i.model,
            input_tokens: opt_unsigned(i.input_tokens, "input_tokens")?,
            output_tokens: opt_unsigned(i.output_tokens, "output_tokens")?,
        })
    }
}

/// The answer of `consume_items`.
#[derive(Debug, Clone, PartialEq, Eq, uniffi::Record)]
pub struct UseOutcome {
    /// The use's id (void it to cancel every item).
    pub use_id: String,
    /// Whether every item was allowed and recorded (else none was).
    pub allowed: bool,
    /// Whether the id was recorded before with the same items (the decisions are the first).
    pub duplicate: bool,
    /// One decision per item, in order.
    pub decisions: Vec<Decision>,
}

impl From<core::UseOutcome> for UseOutcome {
    fn from(o: core::UseOutcome) -> Self {
        UseOutcome {
            use_id: o.use_id.to_string(),
            allowed: o.allowed,
            duplicate: o.duplicate,
            decisions: o.decisions.into_iter().map(Into::into).collect(),
        }
    }
}

#[uniffi::export]
impl Tally {
    /// One use counting on several meters (a call limit and a budget, say): the items are
    /// decided in order and recorded in one transaction, all or none. `id` names the use (an
    /// idempotency key); `metadata_json` goes with every item.
    #[uniffi::method(default(id = None, metadata_json = None))]
    pub fn consume_items(
        &self,
        user_id: String,
        items: Vec<UseItem>,
        id: Option<String>,
        metadata_json: Option<String>,
    ) -> Result<UseOutcome, TallyError> {
        guard(|| {
            let items = items.into_iter().map(core::UseItem::try_from).collect::<Result<Vec<_>, _>>()?;
            let metadata = metadata_json.as_deref().map(|s| parse_json(s, "metadata_json")).transpose()?;
            Ok(self.inner.consume_items(&user_id, id.as_deref(), &items, metadata)?.into())
        })
    }
}
