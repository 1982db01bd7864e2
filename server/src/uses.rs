//! A use: what one request records — one feature (`feature`), or several meters at once
//! (`items: [{feature, amount?, model?, input_tokens?, output_tokens?}]`, each feature at most
//! once, one `id` and `metadata` for the whole use). Its items are decided in order against
//! running totals (two credits items draw cumulatively) and recorded in one transaction, or
//! nothing is. Each item is an event with id `item_event_id(use id, feature)` carrying the use
//! id. `POST /v1/consume`, `POST /v1/holds` and a hold's commit all go through here.

use crate::authority::Actor;
use crate::entitlements::Loaded;
use crate::error::{ApiError, ApiResult};
use crate::ledger::{self, Ctx, NewEvent};
use crate::pools::{self, Decided, PoolKey};
use chrono::{DateTime, Utc};
use deadpool_postgres::GenericClient;
use serde::Serialize;
use serde_json::{Map, Value};
use std::collections::{BTreeMap, HashMap};
use tally_core::Rule;
use tally_core::contract;
use tally_core::decision::{Decision, Priced};
use uuid::Uuid;

/// Answer of an allowed `POST /v1/consume` (and of a hold's commit).
#[derive(Debug, Clone, Serialize, utoipa::ToSchema)]
pub struct ConsumeResponse {
    /// The event id (the use's id, for a use of several items).
    pub id: Uuid,
    /// Whether this answers an earlier request with the same id (nothing recorded now).
    pub duplicate: bool,
    /// The decision (the first item's, for a use of several items).
    pub decision: Decision,
    /// A use of several items: every item's decision, in order.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub decisions: Option<Vec<Decision>>,
}

/// Builds the event of a use from a request body (`feature`, `amount` default 1, `model`,
/// `input_tokens`, `output_tokens`, `metadata`) at `now`, validated with the contract (a 422
/// naming the field).
pub fn use_event(body: &Value, id: Uuid, amount_default: Option<u64>, now: DateTime<Utc>) -> ApiResult<NewEvent> {
    let Some(o) = body.as_object() else { return Err(ApiError::Invalid("invalid_body", "the body must be a JSON object".into())) };
    let mut e = Map::new();
    e.insert("id".into(), Value::String(id.to_string()));
    e.insert("occurred_at".into(), Value::String(now.to_rfc3339()));
    for f in ["feature", "amount", "model", "input_tokens", "output_tokens", "metadata"] {
        if let Some(v) = o.get(f) {
            e.insert(f.into(), v.clone());
        }
    }
    if let (None | Some(Value::Null), Some(a)) = (o.get("amount"), amount_default) {
        e.insert("amount".into(), Value::from(a));
    }
    ledger::validate(&Value::Object(e), None).map_err(|invalid| {
        let v = invalid.violation;
        let message = if v.message.contains(v.field.as_str()) { v.message } else { format!("{}: {}", v.field, v.message) };
        ApiError::Invalid(v.code, message)
    })
}

/// How a request named what it uses.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Form {
    /// `feature` (with `amount`, `model`, …): one event whose id is the use's.
    Single,
    /// `items`: one event per item, its id derived from the use's.
    Items,
}

/// When a use is decided.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Stage {
    /// A consume: decided now and recorded at once.
    Consume,
    /// A hold: room kept now for work whose real amount its commit records.
    Hold,
}

/// One item of a use.
#[derive(Debug, Clone)]
pub struct Item {
    /// Its event (id, use id, amount).
    pub event: NewEvent,
    /// Whether the request named `amount` (else a budget item with a model records its cost).
    pub amount_sent: bool,
    /// Its price, set by [`Use::prepare`].
    pub priced: Priced,
}

/// A use as requested.
#[derive(Debug, Clone)]
pub struct Use {
    /// The use's id.
    pub id: Uuid,
    /// How it was named.
    pub form: Form,
    /// Its items, in order (one for [`Form::Single`]).
    pub items: Vec<Item>,
}

/// Fields of the use that an item may not carry.
const USE_FIELDS: [&str; 3] = ["id", "use_id", "metadata"];
/// Fields of an item that the use may not carry beside `items`.
const ITEM_FIELDS: [&str; 4] = ["amount", "model", "input_tokens", "output_tokens"];

fn invalid_items(message: String) -> ApiError {
    ApiError::Invalid("invalid_items", message)
}

fn present(o: &serde_json::Map<String, Value>, field: &str) -> bool {
    o.get(field).is_some_and(|v| !v.is_null())
}

impl Use {
    /// Reads the use of a request body: `feature` (with `amount`, `model`, `input_tokens`,
    /// `output_tokens`) or `items`, plus `metadata`, validated with the contract (a 422 naming
    /// the field; `invalid_items` for a bad list). Both forms at once is 422 `invalid_body`.
    /// `amount_default` stands in for a missing `amount` (none: `amount` is required).
    pub fn parse(body: &Value, id: Uuid, amount_default: Option<u64>, now: DateTime<Utc>) -> ApiResult<Use> {
        let Some(o) = body.as_object() else { return Err(ApiError::Invalid("invalid_body", "the body must be a JSON object".into())) };
        let Some(items) = o.get("items").filter(|v| !v.is_null()) else {
            let event = use_event(body, id, amount_default, now)?;
            let amount_sent = present(o, "amount");
            return Ok(Use { id, form: Form::Single, items: vec![Item { event, amount_sent, priced: Priced::NoModel }] });
        };
        if let Some(f) = std::iter::once("feature").chain(ITEM_FIELDS).find(|f| present(o, f)) {
            return Err(ApiError::Invalid("invalid_body", format!("{f} belongs to an item: send either feature or items, not both")));
        }
        let list = match items.as_array() {
            Some(list) if list.len() <= contract::MAX_USE_ITEMS => list,
            Some(list) => {
                return Err(invalid_items(format!("items must hold 1 to {} entries, got {}", contract::MAX_USE_ITEMS, list.len())));
            }
            None => return Err(invalid_items("items must be an array of {feature, amount, model?, input_tokens?, output_tokens?}".into())),
        };
        let mut out = Vec::with_capacity(list.len());
        for (i, it) in list.iter().enumerate() {
            let Some(io) = it.as_object() else {
                return Err(invalid_items(format!("items[{i}] must be an object {{feature, amount, …}}")));
            };
            if let Some(f) = USE_FIELDS.iter().find(|f| io.contains_key(**f)) {
                return Err(invalid_items(format!("items[{i}].{f}: {f} belongs to the use, not to one item")));
            }
            let mut e = io.clone();
            if let Some(m) = o.get("metadata") {
                e.insert("metadata".into(), m.clone());
            }
            let mut event = use_event(&Value::Object(e), id, amount_default, now).map_err(|err| match err {
                ApiError::Invalid(code, message) => ApiError::Invalid(code, format!("items[{i}].{message}")),
                other => other,
            })?;
            event.id = contract::item_event_id(id, &event.feature);
            event.use_id = Some(id);
            out.push(Item { event, amount_sent: present(io, "amount"), priced: Priced::NoModel });
        }
        contract::use_items(out.iter().map(|it| it.event.feature.as_str()))?;
        Ok(Use { id, form: Form::Items, items: out })
    }

    /// Sets every item's time to `now` and its price from the loaded catalog; a budget item that
    /// named a model and no amount records its cost in micros (a budget's measure), never less
    /// than 1.
    pub fn prepare(&mut self, loaded: &Loaded, now: DateTime<Utc>) -> ApiResult<()> {
        for it in &mut self.items {
            let e = &mut it.event;
            e.occurred_at = now;
            let tokens = |n: Option<i64>| n.and_then(|n| u64::try_from(n).ok());
            it.priced = match loaded.ents.features.get(&e.feature) {
                Some(r) => pools::priced(&loaded.catalog, r, e.model.as_deref(), tokens(e.input_tokens), tokens(e.output_tokens))?,
                None => Priced::NoModel,
            };
            if let (Priced::Cost(cost), false) = (it.priced, it.amount_sent) {
                e.amount =
                    i64::try_from(cost.max(1)).map_err(|_| ApiError::Invalid("invalid_amount", "the cost is out of range".into()))?;
            }
        }
        Ok(())
    }

    /// Decides every item in order for the (locked) user against the free room, the earlier
    /// allowed items counted as taken (running totals). A budget item of a hold, or of a use of
    /// several items, is decided before the work, like a hold: its cost (priced, else `amount`
    /// micros) must fit, since the whole use may still be refused. A consume of one budget
    /// feature always records (the tokens were spent). Call [`Use::prepare`] first.
    pub async fn decide(&self, tx: &impl GenericClient, ctx: &Ctx<'_>, loaded: &Loaded, stage: Stage) -> ApiResult<Vec<Decided>> {
        let mut earlier: Vec<(PoolKey, u64)> = Vec::new();
        let mut out = Vec::with_capacity(self.items.len());
        for it in &self.items {
            let e = &it.event;
            let amount = u64::try_from(e.amount).unwrap_or(0);
            let budget = matches!(loaded.ents.features.get(&e.feature), Some(Rule::Budget { .. }));
            let d = if budget && (stage == Stage::Hold || self.form == Form::Items) {
                let (cost, priced) = match it.priced {
                    Priced::Cost(c) => (c, Priced::NoModel),
                    Priced::NoModel => (amount, Priced::NoModel),
                    Priced::UnknownModel => (amount, Priced::UnknownModel),
                };
                let mut d = pools::decide(tx, ctx, loaded, &e.feature, cost, priced, false, &earlier).await?;
                if d.decision.allowed && stage == Stage::Consume {
                    shown_after(&mut d.decision, cost);
                }
                d
            } else {
                pools::decide(tx, ctx, loaded, &e.feature, amount, it.priced, stage == Stage::Consume, &earlier).await?
            };
            if let (true, Some((key, _))) = (d.decision.allowed, &d.pool) {
                earlier.push((key.clone(), d.need));
            }
            out.push(d);
        }
        Ok(out)
    }

    /// The answer when an item is denied: the first denial's status, code and decision (for a
    /// use of several items, with every item's decision); `None` when all are allowed.
    pub fn denial(&self, loaded: &Loaded, decided: &[Decided], route: &'static str) -> Option<ApiError> {
        let (it, d) = self.items.iter().zip(decided).find(|(_, d)| !d.decision.allowed)?;
        crate::metrics::decision_denied(route, d.decision.reason);
        let mut err = pools::denial(&it.event.feature, loaded.ents.features.get(&it.event.feature), d.decision.clone());
        if let (ApiError::Denied(denied), Form::Items) = (&mut err, self.form) {
            denied.decisions = Some(decided.iter().map(|d| d.decision.clone()).collect());
        }
        Some(err)
    }

    /// The answer of this use: `decisions` for a use of several items (`decision` is the first
    /// item's).
    pub fn answer(&self, duplicate: bool, decisions: Vec<Decision>) -> ApiResult<ConsumeResponse> {
        let decision = decisions.first().cloned().ok_or_else(|| ApiError::internal("a use without items"))?;
        let decisions = (self.form == Form::Items).then_some(decisions);
        Ok(ConsumeResponse { id: self.id, duplicate, decision, decisions })
    }

    /// The stored answer when this use was recorded before with the same items: `Ok(None)` when
    /// it was not; 409 `conflict` when its id was taken by another body, by another use, or by
    /// a hold.
    pub async fn replayed(&self, tx: &impl GenericClient, user_id: Uuid) -> ApiResult<Option<ConsumeResponse>> {
        let taken = || ledger::id_taken(self.id);
        // Ids of holds and uses are one namespace: a hold's id is its commit's alone.
        let hold = tx
            .query_opt(
                &tx.prepare_cached(
                    "SELECT 1 FROM holds WHERE user_id = $1 AND ((id = $2 AND state <> 'committing') OR use_id = $2) LIMIT 1",
                )
                .await?,
                &[&user_id, &self.id],
            )
            .await?;
        if hold.is_some() {
            return Err(taken());
        }
        let ids: Vec<Uuid> = self.items.iter().map(|it| it.event.id).collect();
        let rows = tx
            .query(
                &tx.prepare_cached(
                    "SELECT id, feature, amount, model, input_tokens, output_tokens, metadata, answer, use_id FROM events \
                     WHERE user_id = $1 AND (id = $2 OR use_id = $2 OR id = ANY($3))",
                )
                .await?,
                &[&user_id, &self.id, &ids],
            )
            .await?;
        if rows.is_empty() {
            return Ok(None);
        }
        let stored: HashMap<Uuid, &tokio_postgres::Row> = rows.iter().map(|r| (r.get(0), r)).collect();
        let mut decisions = Vec::with_capacity(self.items.len());
        for it in &self.items {
            let e = &it.event;
            let Some(r) = stored.get(&e.id) else { return Err(taken()) };
            let same = r.get::<_, String>(1) == e.feature
                && r.get::<_, i64>(2) == e.amount
                && r.get::<_, Option<String>>(3) == e.model
                && r.get::<_, Option<i64>>(4) == e.input_tokens
                && r.get::<_, Option<i64>>(5) == e.output_tokens
                && r.get::<_, Option<Value>>(6) == e.metadata
                && r.get::<_, Option<Uuid>>(8) == e.use_id;
            match (same, r.get::<_, Option<Value>>(7).and_then(|a| serde_json::from_value::<Decision>(a).ok())) {
                (true, Some(d)) => decisions.push(d),
                _ => return Err(ApiError::Conflict("conflict", format!("use {} was already recorded with a different body", self.id))),
            }
        }
        if rows.len() != self.items.len() {
            return Err(ApiError::Conflict("conflict", format!("use {} was already recorded with other items", self.id)));
        }
        self.answer(true, decisions).map(Some)
    }

    /// Records every item for the (locked) user, recorded by `by` from `source` (a budget item
    /// that leaves its window over the limit with cause `cost_over_estimate`, or `over_cause`
    /// for every item), or nothing: an item the ledger refuses (its id taken, a counter
    /// overflowing) fails the whole use.
    pub async fn record(
        self,
        tx: &impl GenericClient,
        ctx: &Ctx<'_>,
        features: &BTreeMap<String, Rule>,
        by: Actor<'_>,
        source: &str,
        over_cause: Option<&'static str>,
    ) -> ApiResult<ledger::Outcome> {
        let events: Vec<NewEvent> = self
            .items
            .into_iter()
            .map(|it| {
                let budget = matches!(features.get(&it.event.feature), Some(Rule::Budget { .. }));
                let cause = over_cause.or(budget.then_some("cost_over_estimate")).map(ledger::Cause::Recorded);
                NewEvent { cause, ..it.event }
            })
            .collect();
        let out = ledger::ingest(tx, ctx, features, events, by, source, None).await?;
        out.refused_alone(self.id)?;
        Ok(out)
    }
}

/// Stores each recorded event's decision as its answer (replayed for the same use).
pub async fn store_answers(tx: &impl GenericClient, user_id: Uuid, answers: &[(Uuid, &Decision)]) -> ApiResult<()> {
    for (id, decision) in answers {
        let answer = serde_json::to_value(decision)?;
        tx.execute(&tx.prepare_cached("UPDATE events SET answer = $3 WHERE user_id = $1 AND id = $2").await?, &[&user_id, id, &answer])
            .await?;
    }
    Ok(())
}

/// A budget item decided before the work and recorded now: its decision shows the window after
/// its cost, as a consume's does.
fn shown_after(d: &mut Decision, cost: u64) {
    d.used = d.used.saturating_add(cost);
    d.remaining = d.limit.map(|l| l.saturating_sub(d.used));
    d.over_limit_by = d.limit.map_or(0, |l| d.used.saturating_sub(l));
}

/// `POST /v1/consume`'s work for the (locked) user: a replay answers the first answer; else every
/// item is decided and, when all are allowed, recorded. A denial for room devices hold keeps the
/// recalls it set (`commit` is then true: commit the transaction even though it failed).
pub async fn consume(
    tx: &impl GenericClient,
    ctx: &Ctx<'_>,
    loaded: &Loaded,
    mut u: Use,
    by: Actor<'_>,
) -> Result<ConsumeResponse, (ApiError, bool)> {
    let fail = |e: ApiError| (e, false);
    u.prepare(loaded, ctx.now).map_err(fail)?;
    if let Some(answer) = u.replayed(tx, ctx.user_id).await.map_err(fail)? {
        return Ok(answer);
    }
    let decided = u.decide(tx, ctx, loaded, Stage::Consume).await.map_err(fail)?;
    if let Some(denied) = u.denial(loaded, &decided, "consume") {
        // Nothing recorded. A denial for room devices hold keeps the recalls it set (and the
        // slices it reserved); any other is dropped (rolled back) with the pool rows it made.
        return Err((denied, decided.iter().any(|d| d.decision.held_offline.is_some())));
    }
    let decisions: Vec<Decision> = decided.into_iter().map(|d| d.decision).collect();
    let ids: Vec<Uuid> = u.items.iter().map(|it| it.event.id).collect();
    let answer = u.answer(false, decisions.clone()).map_err(fail)?;
    u.record(tx, ctx, &loaded.ents.features, by, "consume", None).await.map_err(fail)?;
    let answers: Vec<(Uuid, &Decision)> = ids.into_iter().zip(&decisions).collect();
    store_answers(tx, ctx.user_id, &answers).await.map_err(fail)?;
    Ok(answer)
}
