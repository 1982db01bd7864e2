//! Uses with several meters: one call (an AI request, say) that counts on a call limit, a money
//! budget and a credit balance at once. Its items are decided in order against running totals
//! and recorded in one transaction, all of them or none. Each item is an event of its own, with
//! id [`crate::contract::item_event_id`]`(use id, feature)` and the use id beside it, so a retry
//! never counts twice and a void of the use id cancels every item.

use crate::db::Tx;
use crate::decision::Decision;
use crate::error::{Error, Result};
use crate::ledger::{INSERT_EVENT, UsageMeta, Use, event_id_for_key, find_event, stored_decision, validate};
use crate::quota::{Batch, Deciding, commit_recorded, fresh_tail, record};
use crate::{Change, Tally, contract, ms};
use rusqlite::{Connection, params};
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
    /// Atomically checks and records one use with several meters (one AI call that counts on
    /// a call limit, a budget and credits): `items` (1 to 16, each feature at most once) are
    /// decided in order against running totals — an item sees the items before it, two credits
    /// items draw from one balance, each hard pool needs room in this device's lease as a single
    /// use does — and all are recorded in one transaction, or none when any is denied. A budget
    /// item is decided before the work, like `check`: its cost must fit.
    ///
    /// `id` names the use (an idempotency key: a UUID is the id, anything else maps to
    /// UUIDv5 as for [`UsageMeta::idempotency_key`]); without one the use gets a fresh id. Each
    /// item is an event with id [`contract::item_event_id`]`(use id, feature)`, carrying
    /// `metadata`. Replaying the id with the same items answers the first decisions
    /// (`duplicate`); with other items (or the id of a single use) it is
    /// [`Error::IdempotencyConflict`]. Invalid items are [`Error::InvalidInput`]; nothing is
    /// recorded then. [`Tally::void`] of the use id cancels every item.
    pub fn consume_items(&self, user_id: &str, id: Option<&str>, items: &[UseItem], metadata: Option<Value>) -> Result<UseOutcome> {
        contract::use_items(items.iter().map(|i| i.feature.as_str()))?;
        let use_id = match id {
            Some(key) => {
                contract::idempotency_key(key)?;
                event_id_for_key(key)
            }
            None => Uuid::now_v7(),
        };
        let metas: Vec<UsageMeta> = items
            .iter()
            .map(|i| UsageMeta {
                idempotency_key: None,
                model: i.model.clone(),
                input_tokens: i.input_tokens,
                output_tokens: i.output_tokens,
                metadata: metadata.clone(),
            })
            .collect();
        let uses = items
            .iter()
            .zip(&metas)
            .map(|(i, m)| {
                let u = validate(&i.feature, i.amount, m)?;
                // Keyed: its decision is stored, so a replay of the use answers it again.
                Ok(Use { id: contract::item_event_id(use_id, &i.feature), keyed: true, use_id: Some(use_id), ..u })
            })
            .collect::<Result<Vec<_>>>()?;

        let (mut g, a, now) = self.prepare_uses(user_id, &uses)?;
        let inner = &mut *g;
        let tx = Tx::immediate(&inner.conn)?;
        if let Some(decisions) = replay_use(&tx, user_id, use_id, &uses)? {
            tx.commit()?;
            return Ok(UseOutcome { use_id, allowed: true, duplicate: true, decisions });
        }
        let version = tx.prepare_cached("PRAGMA data_version")?.query_row([], |r| r.get(0))?;
        // Taken out while in use: unless the use commits, it is read again next time.
        let t = fresh_tail(&tx, &mut inner.tail, version)?;
        let mut batch = Batch::with_tail(&t);
        let mut insert = tx.prepare_cached(INSERT_EVENT)?;
        let mut seq = t.seq;
        let mut decisions = Vec::with_capacity(uses.len());
        let mut allowed = true;
        for u in &uses {
            let (d, effect, lease_use) = self.decide(&tx, &mut batch, &a, user_id, u, now, Deciding::Item)?;
            match effect {
                // Recorded in the transaction, so the items after it see it; undone with it.
                Some(effect) if d.allowed => {
                    seq += 1;
                    record(&tx, &mut insert, &mut batch, user_id, &inner.device_id, u, &d, &effect, lease_use.as_ref(), now, &a.ent, seq)?;
                }
                Some(_) | None => allowed = false,
            }
            decisions.push(d);
        }
        drop(insert);
        if !allowed {
            // Nothing of a denied use is kept: the transaction rolls back as it drops.
            return Ok(UseOutcome { use_id, allowed, duplicate: false, decisions });
        }
        let added: Vec<_> = batch.added().collect();
        commit_recorded(tx, &mut inner.tail, t, &added, user_id, seq, version)?;
        inner.highest_seen_ms = inner.highest_seen_ms.max(ms(now));
        drop(g);
        self.notify(user_id, Change { usage: true, ..Change::default() });
        Ok(UseOutcome { use_id, allowed, duplicate: false, decisions })
    }
}

/// The first decisions of use `use_id` when it was recorded with the same `uses` (same
/// features in the same order, same bodies); `None` when it was never recorded;
/// [`Error::IdempotencyConflict`] when it was recorded with other items, or when the id is a
/// single use's.
fn replay_use(conn: &Connection, user: &str, use_id: Uuid, uses: &[Use<'_>]) -> Result<Option<Vec<Decision>>> {
    let conflict = || Error::IdempotencyConflict(use_id.to_string());
    if find_event(conn, user, &use_id.to_string())?.is_some() {
        return Err(conflict());
    }
    let recorded: Vec<(i64, String)> = conn
        .prepare_cached("SELECT device_seq, id FROM events WHERE user_id = ?1 AND use_id = ?2 AND voids IS NULL ORDER BY device_seq")?
        .query_map(params![user, use_id.to_string()], |r| Ok((r.get(0)?, r.get(1)?)))?
        .collect::<rusqlite::Result<_>>()?;
    if recorded.is_empty() {
        return Ok(None);
    }
    if recorded.len() != uses.len() {
        return Err(conflict());
    }
    let mut decisions = Vec::with_capacity(uses.len());
    for ((seq, id), u) in recorded.iter().zip(uses) {
        if *id != u.id.to_string() {
            return Err(conflict());
        }
        decisions.push(match stored_decision(conn, *seq, u) {
            Err(Error::IdempotencyConflict(_)) => return Err(conflict()),
            other => other?,
        });
    }
    Ok(Some(decisions))
}
