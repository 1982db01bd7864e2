//! Usage reports over the ledger: events, amounts, AI tokens and cost, grouped by day, feature
//! or model.

use crate::error::{Error, Result};
use crate::{Tally, ms};
use chrono::{DateTime, Utc};
use rusqlite::params;
use serde::{Deserialize, Serialize};

/// How report rows are grouped.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[cfg_attr(feature = "uniffi", derive(uniffi::Enum))]
#[serde(rename_all = "lowercase")]
pub enum GroupBy {
    /// By calendar day in the user's timezone (`YYYY-MM-DD`).
    Day,
    /// By feature key.
    Feature,
    /// By AI model (`""` for events without one).
    Model,
}

/// One row of a usage report.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ReportRow {
    /// The group: a day, a feature key or a model.
    pub key: String,
    /// Number of events.
    pub events: u64,
    /// Summed amounts.
    pub amount: u64,
    /// Summed AI input tokens.
    pub input_tokens: u64,
    /// Summed AI output tokens.
    pub output_tokens: u64,
    /// Summed AI cost in micros.
    pub cost_micros: u64,
}

impl Tally {
    /// Usage of `user_id` with events in `[from, to)`, grouped by `group_by`, sorted by key.
    /// Rejected events are left out.
    pub fn report(&self, user_id: &str, from: DateTime<Utc>, to: DateTime<Utc>, group_by: GroupBy) -> Result<Vec<ReportRow>> {
        if to <= from {
            return Err(Error::invalid("report range is empty: `to` must be after `from`"));
        }
        let g = self.lock();
        let user = crate::users::get_user(&g.conn, user_id)?;
        let tz = crate::contract::timezone(&user.timezone)?;
        let mut st = g.conn.prepare_cached(
            "SELECT occurred_at, feature, COALESCE(model, ''), amount, COALESCE(input_tokens, 0), COALESCE(output_tokens, 0), COALESCE(cost_micros, 0)
             FROM events WHERE user_id = ?1 AND occurred_at >= ?2 AND occurred_at < ?3 AND status != ?4 AND voids IS NULL AND voided = 0",
        )?;
        let rows = st.query_map(params![user_id, ms(from), ms(to), crate::ledger::EventState::Rejected], |r| {
            Ok((
                r.get::<_, i64>(0)?,
                r.get::<_, String>(1)?,
                r.get::<_, String>(2)?,
                r.get::<_, i64>(3)?,
                r.get::<_, i64>(4)?,
                r.get::<_, i64>(5)?,
                r.get::<_, i64>(6)?,
            ))
        })?;
        let mut groups: std::collections::BTreeMap<String, ReportRow> = Default::default();
        for row in rows {
            let (at, feature, model, amount, inp, out, cost) = row?;
            let key = match group_by {
                GroupBy::Day => crate::from_ms(at).with_timezone(&tz).format("%Y-%m-%d").to_string(),
                GroupBy::Feature => feature,
                GroupBy::Model => model,
            };
            let e = groups.entry(key.clone()).or_insert(ReportRow {
                key,
                events: 0,
                amount: 0,
                input_tokens: 0,
                output_tokens: 0,
                cost_micros: 0,
            });
            // A negative stored count is corruption: an error, never a wrapped or dropped figure.
            let count = |v: i64, column: &str| crate::db::stored_count(v, &format!("events.{column}"));
            e.events += 1;
            e.amount = e.amount.saturating_add(count(amount, "amount")?);
            e.input_tokens = e.input_tokens.saturating_add(count(inp, "input_tokens")?);
            e.output_tokens = e.output_tokens.saturating_add(count(out, "output_tokens")?);
            e.cost_micros = e.cost_micros.saturating_add(count(cost, "cost_micros")?);
        }
        Ok(groups.into_values().collect())
    }
}
