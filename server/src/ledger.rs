//! The server's usage ledger: per-event validation, batch insert with `UNNEST … ON CONFLICT
//! (user_id, id) DO NOTHING`, duplicate/conflict detection on the sent body, per-window counters
//! updated in the same transaction, and totals computed with the server's own rules.

use crate::authority::{Actor, RecordedBy};
use crate::error::{ApiError, ApiResult};
use chrono::{DateTime, Utc};
use deadpool_postgres::GenericClient;
use serde::Deserialize;
use serde_json::Value;
use std::collections::{BTreeMap, BTreeSet, HashMap};
use tally_core::TimezoneHistory;
use tally_core::contract;
use tally_core::period::{Period, window};
use tally_core::wire::{Rejected, Total, WireEvent};
use tally_core::{Catalog, Rule};
use uuid::Uuid;

/// A validated event, ready to insert.
#[derive(Debug, Clone, PartialEq)]
pub struct NewEvent {
    /// Event id.
    pub id: Uuid,
    /// Feature key.
    pub feature: String,
    /// Amount (> 0).
    pub amount: i64,
    /// Time as sent, truncated to microseconds.
    pub occurred_at: DateTime<Utc>,
    /// Device sequence number.
    pub device_seq: Option<i64>,
    /// AI model.
    pub model: Option<String>,
    /// AI input tokens.
    pub input_tokens: Option<i64>,
    /// AI output tokens.
    pub output_tokens: Option<i64>,
    /// Small JSON metadata.
    pub metadata: Option<Value>,
    /// Protocol 2: the `lease_ver` of the device token the use was decided under.
    pub lease_ver: Option<i64>,
    /// Counts at its `occurred_at` (a leased use), without the clamp to the server's time.
    pub unclamped: bool,
    /// Why it may leave its hard window over the limit (beats the batch's cause).
    pub cause: Option<Cause>,
    /// The use it is an item of (its id is then `item_event_id(use_id, feature)`).
    pub use_id: Option<Uuid>,
}

/// Why a use may leave the window of its hard rule over the limit: found from how it was
/// recorded, never guessed from the window.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Cause {
    /// A use recorded without room the server promised it (`protocol1`, `before_lease`,
    /// `reclaimed`): its cause whenever it lands in room that is not free.
    Recorded(&'static str),
    /// A use decided under a live slice of the recording device. Within the device's allowance
    /// it is over only when the limit fell below what was used ([`CAUSE_DOWNGRADE`]); past it,
    /// the device overran ([`CAUSE_DEVICE_OVERRUN`], or [`CAUSE_CLONED_DEVICE`] for a device id
    /// two installs share) and the use counts like one the server never promised room for.
    Slice {
        /// Two installs sent this device id.
        cloned: bool,
    },
}

/// The part of an event compared when its id is sent again.
#[derive(Debug, Clone, PartialEq, Eq)]
struct Body {
    feature: String,
    amount: i64,
    occurred_at: DateTime<Utc>,
    model: Option<String>,
    input_tokens: Option<i64>,
    output_tokens: Option<i64>,
    metadata: Option<Value>,
    use_id: Option<Uuid>,
}

impl NewEvent {
    fn body(&self) -> Body {
        Body {
            feature: self.feature.clone(),
            amount: self.amount,
            occurred_at: self.occurred_at,
            model: self.model.clone(),
            input_tokens: self.input_tokens,
            output_tokens: self.output_tokens,
            metadata: self.metadata.clone(),
            use_id: self.use_id,
        }
    }
}

fn reject(id: &str, reason: &str) -> Rejected {
    Rejected { id: id.to_string(), reason: reason.to_string() }
}

/// An event of a request that breaks the contract: the id as sent and the violation.
#[derive(Debug)]
pub struct Invalid {
    /// The id as sent (empty when absent).
    pub id: String,
    /// What is wrong.
    pub violation: contract::Violation,
}

impl Invalid {
    /// The rejection listed in a sync answer.
    pub fn rejected(&self) -> Rejected {
        reject(&self.id, self.violation.code)
    }
}

/// Validates one event of a request with the contract the device checks too. `id_override`
/// stands in for a missing `id` (the `Idempotency-Key` of `POST /v1/usage`). A violation's code
/// is `invalid_event`, `invalid_id`, `invalid_amount`, `invalid_text` or `metadata_too_large`.
pub fn validate(v: &Value, id_override: Option<Uuid>) -> Result<NewEvent, Invalid> {
    let bad = |id: &str, field: &str, code: &'static str, message: String| Invalid {
        id: id.to_string(),
        violation: contract::Violation::new(field, code, message),
    };
    let Some(o) = v.as_object() else { return Err(bad("", "event", "invalid_event", "an event must be a JSON object".into())) };
    let id_sent = match o.get("id") {
        Some(Value::String(s)) => s.clone(),
        Some(Value::Null) | None => id_override.map(|u| u.to_string()).unwrap_or_default(),
        Some(other) => other.to_string(),
    };
    let id = match (o.get("id"), id_override) {
        (Some(Value::String(s)), _) => {
            Uuid::parse_str(s).map_err(|_| bad(&id_sent, "id", "invalid_id", format!("id must be a UUID, got {s:?}")))?
        }
        (None | Some(Value::Null), Some(u)) => u,
        (None | Some(Value::Null), None) => return Err(bad(&id_sent, "id", "invalid_id", "id is missing".into())),
        _ => return Err(bad(&id_sent, "id", "invalid_id", "id must be a UUID string".into())),
    };
    for field in ["feature", "amount", "occurred_at"] {
        if o.get(field).is_none_or(Value::is_null) {
            let code = if field == "amount" { "invalid_amount" } else { "invalid_event" };
            return Err(bad(&id_sent, field, code, format!("{field} is missing")));
        }
    }
    if o.get("amount").and_then(Value::as_u64).is_none() {
        return Err(bad(&id_sent, "amount", "invalid_amount", "amount must be a whole number > 0".into()));
    }
    let mut e = WireEvent::deserialize(v).map_err(|err| {
        // Name the field serde could not read, never echo serde's own wording.
        let field = ["occurred_at", "feature", "device_seq", "model", "input_tokens", "output_tokens"]
            .into_iter()
            .find(|f| err.to_string().contains(f) || o.get(*f).is_some_and(|v| !field_shape_ok(f, v)))
            .unwrap_or("event");
        bad(&id_sent, field, "invalid_event", format!("{field} has the wrong type or format"))
    })?;
    e.id = id;
    contract::event(&e).map_err(|violation| Invalid { id: id_sent.clone(), violation })?;
    let occurred_at = DateTime::from_timestamp_micros(e.occurred_at.timestamp_micros()).unwrap_or(e.occurred_at);
    let int = |n: u64| i64::try_from(n).map_err(|_| bad(&id_sent, "amount", "invalid_amount", "value out of range".into()));
    Ok(NewEvent {
        id,
        amount: int(e.amount)?,
        occurred_at,
        device_seq: e.device_seq.map(int).transpose()?,
        input_tokens: e.input_tokens.map(int).transpose()?,
        output_tokens: e.output_tokens.map(int).transpose()?,
        feature: e.feature,
        lease_ver: e.lease_ver.map(int).transpose()?,
        model: e.model,
        metadata: e.metadata.filter(|m| !m.is_null()),
        unclamped: false,
        cause: None,
        use_id: e.use_id,
    })
}

/// Whether a present field has the JSON type the wire event expects.
fn field_shape_ok(field: &str, v: &Value) -> bool {
    match field {
        "occurred_at" => v.as_str().is_some_and(|s| DateTime::parse_from_rfc3339(s).is_ok()),
        "feature" => v.is_string(),
        "model" => v.is_string() || v.is_null(),
        _ => v.is_u64() || v.is_null(),
    }
}

/// Where a user's windows are computed: timezone history, billing anchor, catalog.
pub struct Ctx<'a> {
    /// The user.
    pub user_id: Uuid,
    /// The user's timezone history.
    pub zones: TimezoneHistory,
    /// Billing anchor (subscription period start, else the user's creation).
    pub anchor: DateTime<Utc>,
    /// The catalog in effect.
    pub catalog: &'a Catalog,
    /// Its version.
    pub catalog_version: i64,
    /// The server's time for this request.
    pub now: DateTime<Utc>,
}

impl<'a> Ctx<'a> {
    /// The context of `user`'s windows at `now`, from their loaded entitlements.
    pub fn new(user: &crate::users::User, loaded: &'a crate::entitlements::Loaded, now: DateTime<Utc>) -> Ctx<'a> {
        Ctx {
            user_id: user.user_id,
            zones: loaded.zones.clone(),
            anchor: loaded.anchor,
            catalog: &loaded.catalog,
            catalog_version: loaded.catalog_version,
            now,
        }
    }

    fn counters_key(&self) -> String {
        format!("{}|{}|{}", self.zones.key(), self.anchor.timestamp_micros(), self.catalog_version)
    }
    /// The priced cost of a use in micros (0 without a priced model); `None` when it is past
    /// the contract's counter range.
    fn cost(&self, model: Option<&str>, input: Option<i64>, output: Option<i64>) -> Option<i64> {
        let Some(price) = model.and_then(|m| self.catalog.models.get(m)) else { return Some(0) };
        let tokens = |n: Option<i64>| u64::try_from(n.unwrap_or(0)).unwrap_or(0);
        price.cost_micros(tokens(input), tokens(output)).ok().and_then(|c| i64::try_from(c).ok())
    }
}

/// For each feature, the periods some plan of the catalog counts it in.
pub fn tracked_periods(catalog: &Catalog) -> BTreeMap<String, BTreeSet<Period>> {
    let mut m: BTreeMap<String, BTreeSet<Period>> = BTreeMap::new();
    for p in &catalog.plans {
        for (f, rule) in &p.features {
            if let Some(period) = rule.period() {
                m.entry(f.clone()).or_default().insert(period);
            }
        }
    }
    m
}

type CounterKey = (String, Period, DateTime<Utc>);

#[derive(Default)]
struct Inc {
    end: Option<DateTime<Utc>>,
    used: i64,
    cost: i64,
    /// The hard limit of the window's rule in effect now (`None`: not a hard rule's window).
    lim: Option<i64>,
}

/// The limit of `rule` when it is a hard rule counted in `period` windows (units, or micros
/// for a budget).
fn hard_limit(rule: &Rule, period: Period) -> Option<i64> {
    if !crate::pools::is_hard(rule) || rule.period() != Some(period) {
        return None;
    }
    rule.limit().map(|l| i64::try_from(l).unwrap_or(i64::MAX))
}

/// Sets each increment's `lim` from the rules in effect now.
fn with_limits(features: &BTreeMap<String, Rule>, acc: &mut BTreeMap<CounterKey, Inc>) {
    for ((f, p, _), inc) in acc.iter_mut() {
        inc.lim = features.get(f).and_then(|r| hard_limit(r, *p));
    }
}

fn add_increments(
    ctx: &Ctx<'_>,
    tracked: &BTreeMap<String, BTreeSet<Period>>,
    acc: &mut BTreeMap<CounterKey, Inc>,
    feature: &str,
    at: DateTime<Utc>,
    amount: i64,
    cost: i64,
) {
    if let Some(periods) = tracked.get(feature) {
        for p in periods {
            let w = window(*p, at, &ctx.zones, ctx.anchor);
            let e = acc.entry((feature.to_string(), *p, w.start)).or_default();
            e.end = w.end;
            e.used = e.used.saturating_add(amount);
            e.cost = e.cost.saturating_add(cost);
        }
    }
}

/// Adds `acc` to the user's counter rows. A hard window's `lim` is set when its row is created
/// and raised while the window is open at `now` (never after it ended).
async fn upsert_counters(tx: &impl GenericClient, user_id: Uuid, now: DateTime<Utc>, acc: BTreeMap<CounterKey, Inc>) -> ApiResult<()> {
    if acc.is_empty() {
        return Ok(());
    }
    let n = acc.len();
    let (mut f, mut p, mut s, mut e, mut u, mut c, mut l) = (
        Vec::with_capacity(n),
        Vec::with_capacity(n),
        Vec::with_capacity(n),
        Vec::with_capacity(n),
        Vec::with_capacity(n),
        Vec::with_capacity(n),
        Vec::with_capacity(n),
    );
    for ((feature, period, start), inc) in acc {
        f.push(feature);
        p.push(period.as_str().to_string());
        s.push(start);
        e.push(inc.end);
        u.push(inc.used);
        c.push(inc.cost);
        l.push(inc.lim);
    }
    tx.execute(
        &tx.prepare_cached(
            "INSERT INTO counters (user_id, feature, period, period_start, period_end, used, cost_micros, lim) \
         SELECT $1, * FROM unnest($2::text[], $3::text[], $4::timestamptz[], $5::timestamptz[], $6::int8[], $7::int8[], $8::int8[]) \
         ON CONFLICT (user_id, feature, period, period_start) DO UPDATE \
         SET used = counters.used + excluded.used, cost_micros = counters.cost_micros + excluded.cost_micros, \
             lim = CASE WHEN excluded.period_end IS NULL OR excluded.period_end > $9 THEN GREATEST(counters.lim, excluded.lim) \
                        ELSE COALESCE(counters.lim, excluded.lim) END",
        )
        .await?,
        &[&user_id, &f, &p, &s, &e, &u, &c, &l, &now],
    )
    .await?;
    Ok(())
}

/// Rebuilds the user's counters from the ledger when the timezone, billing anchor or catalog
/// changed since they were built. Call with the user row locked.
pub async fn ensure_counters(tx: &impl GenericClient, ctx: &Ctx<'_>) -> ApiResult<()> {
    let key = ctx.counters_key();
    let current: String =
        tx.query_one(&tx.prepare_cached("SELECT counters_key FROM users WHERE user_id = $1").await?, &[&ctx.user_id]).await?.get(0);
    if current == key {
        return Ok(());
    }
    tx.execute(&tx.prepare_cached("DELETE FROM counters WHERE user_id = $1").await?, &[&ctx.user_id]).await?;
    let tracked = tracked_periods(ctx.catalog);
    let mut acc = BTreeMap::new();
    let rows = tx
        .query(
            &tx.prepare_cached(
                "SELECT feature, amount, effective_at, COALESCE(cost_micros, 0), cause FROM events \
                 WHERE user_id = $1 AND voided_at IS NULL",
            )
            .await?,
            &[&ctx.user_id],
        )
        .await?;
    let mut causes: BTreeMap<CounterKey, BTreeSet<String>> = BTreeMap::new();
    for r in rows {
        let feature: String = r.get(0);
        // The cost stored when the use was recorded (priced then, or a budget's micros).
        let cost: i64 = r.get(3);
        add_increments(ctx, &tracked, &mut acc, &feature, r.get(2), r.get(1), cost);
        if let Some(cause) = r.get::<_, Option<String>>(4) {
            for p in tracked.get(&feature).into_iter().flatten() {
                let w = window(*p, r.get(2), &ctx.zones, ctx.anchor);
                causes.entry((feature.clone(), *p, w.start)).or_default().insert(cause.clone());
            }
        }
    }
    upsert_counters(tx, ctx.user_id, ctx.now, acc).await?;
    for ((f, p, start), set) in causes {
        let list: Vec<String> = set.into_iter().collect();
        tx.execute(
            &tx.prepare_cached("UPDATE counters SET causes = $5 WHERE user_id = $1 AND feature = $2 AND period = $3 AND period_start = $4")
                .await?,
            &[&ctx.user_id, &f, &p.as_str(), &start, &list],
        )
        .await?;
    }
    crate::pools::rebuild_held(tx, ctx.user_id).await?;
    tx.execute(&tx.prepare_cached("UPDATE users SET counters_key = $2 WHERE user_id = $1").await?, &[&ctx.user_id, &key]).await?;
    Ok(())
}

/// What happened to a batch.
#[derive(Debug, Default)]
pub struct Outcome {
    /// Inserted by this request.
    pub accepted: Vec<Uuid>,
    /// Already stored with the same body.
    pub duplicates: Vec<Uuid>,
    /// Refused (`conflict` for a known id with another body, `invalid_amount` for a use that
    /// would overflow a counter or whose cost cannot be recorded).
    pub rejected: Vec<Rejected>,
    /// Features of accepted or duplicate events that no plan of the catalog knows (stored,
    /// counted in no total until the catalog knows them).
    pub unknown_features: Vec<String>,
    /// Totals of every window the batch touched plus the current ones.
    pub totals: Vec<Total>,
    /// (feature, effective time) of every accepted or duplicate event.
    pub touched: Vec<(String, DateTime<Utc>)>,
}

impl Outcome {
    /// The error of a one-event [`ingest`] that refused its event `id`: 409 `conflict` (the id
    /// is another use's or a hold's), else 422 `invalid_amount` (a counter would overflow).
    pub fn refused_alone(&self, id: Uuid) -> ApiResult<()> {
        match self.rejected.first().map(|r| r.reason.as_str()) {
            None => Ok(()),
            Some("conflict") => Err(id_taken(id)),
            Some(_) => {
                Err(ApiError::Invalid("invalid_amount", "this use would take a counter past its range; nothing was recorded".into()))
            }
        }
    }
}

/// 409 `conflict`: the id `id` is taken by another use or by a hold.
pub fn id_taken(id: Uuid) -> ApiError {
    ApiError::Conflict("conflict", format!("{id} is already the id of another use or of a hold; nothing was recorded"))
}

/// What a counter row holds: units, micros and the causes of overage in its window.
#[derive(Debug, Clone, Default)]
struct Stored {
    used: i64,
    cost: i64,
    causes: Vec<String>,
    /// The limit the window is judged by once ended (see [`upsert_counters`]).
    lim: Option<i64>,
}

/// The stored counter rows, read with the user row locked.
type Counters = HashMap<CounterKey, Stored>;

async fn read_counters(tx: &impl GenericClient, user_id: Uuid, keys: &BTreeSet<CounterKey>, into: &mut Counters) -> ApiResult<()> {
    let keys: Vec<&CounterKey> = keys.iter().filter(|k| !into.contains_key(*k)).collect();
    if keys.is_empty() {
        return Ok(());
    }
    let fs: Vec<&str> = keys.iter().map(|k| k.0.as_str()).collect();
    let ps: Vec<&str> = keys.iter().map(|k| k.1.as_str()).collect();
    let ss: Vec<DateTime<Utc>> = keys.iter().map(|k| k.2).collect();
    let rows = tx
        .query(
            &tx.prepare_cached(
                "SELECT c.feature, c.period, c.period_start, c.used, c.cost_micros, c.causes, c.lim FROM counters c \
             JOIN unnest($2::text[], $3::text[], $4::timestamptz[]) AS w(feature, period, period_start) \
               ON c.feature = w.feature AND c.period = w.period AND c.period_start = w.period_start \
             WHERE c.user_id = $1",
            )
            .await?,
            &[&user_id, &fs, &ps, &ss],
        )
        .await?;
    for k in keys {
        into.insert(k.clone(), Stored::default());
    }
    for r in rows {
        let period: String = r.get(1);
        if let Ok(p) = period.parse::<Period>() {
            let s = Stored { used: r.get(3), cost: r.get(4), causes: r.get(5), lim: r.get(6) };
            let (feature, start): (String, DateTime<Utc>) = (r.get(0), r.get(2));
            // A negative count or limit is corruption: it must never read as room.
            for (column, v) in [("used", s.used), ("cost_micros", s.cost), ("lim", s.lim.unwrap_or(0))] {
                crate::pools::stored_count(v, || format!("counters.{column} of ({user_id}, {feature:?}, {period}, {start})"))?;
            }
            into.insert((feature, p, start), s);
        }
    }
    Ok(())
}

/// The windows of the current time of every counted rule in `features`.
fn current_windows(ctx: &Ctx<'_>, features: &BTreeMap<String, Rule>) -> BTreeMap<CounterKey, Option<DateTime<Utc>>> {
    let mut wanted = BTreeMap::new();
    for (f, rule) in features {
        if let Some(p) = rule.period() {
            let w = window(p, ctx.now, &ctx.zones, ctx.anchor);
            wanted.insert((f.clone(), p, w.start), w.end);
        }
    }
    wanted
}

/// Inserts `events` for the (locked) user in one statement, detects duplicates and conflicts
/// against the stored bodies, adds the inserted ones to the counters (refusing, and removing
/// again, any use that would overflow one) and computes the totals of `features` for every
/// window the batch touched plus the current ones. With `over_cause`, an accepted event that
/// leaves the window of its hard rule over the limit is stored with that cause, and the cause
/// joins the window's `over_limit_causes`. A window whose total this batch took past 80 % or
/// 100 % of its limit gets its `usage.threshold` webhook event in the same transaction.
#[allow(clippy::too_many_arguments)]
pub async fn ingest(
    tx: &impl GenericClient,
    ctx: &Ctx<'_>,
    features: &BTreeMap<String, Rule>,
    events: Vec<NewEvent>,
    by: Actor<'_>,
    source: &str,
    over_cause: Option<&str>,
) -> ApiResult<Outcome> {
    let mut out = Outcome::default();
    // Repeats inside the batch: same body → duplicate of the first, other body → conflict.
    let mut first: HashMap<Uuid, Body> = HashMap::new();
    let mut unique = Vec::with_capacity(events.len());
    let mut repeats = Vec::new();
    let limit = ctx.now + contract::MAX_CLOCK_AHEAD;
    for e in events {
        match first.get(&e.id) {
            Some(b) if *b == e.body() => repeats.push(e.id),
            Some(_) => out.rejected.push(reject(&e.id.to_string(), "conflict")),
            None => {
                first.insert(e.id, e.body());
                // As on the device: a budget use without a model is `amount` micros.
                let cost = match (&e.model, features.get(&e.feature)) {
                    (None, Some(Rule::Budget { .. })) => Some(e.amount),
                    _ => ctx.cost(e.model.as_deref(), e.input_tokens, e.output_tokens),
                };
                match cost {
                    Some(cost) => unique.push((if e.unclamped { e.occurred_at } else { e.occurred_at.min(limit) }, cost, e)),
                    None => out.rejected.push(reject(&e.id.to_string(), "invalid_amount")),
                }
            }
        }
    }
    // Ids of holds, uses and events are one namespace: a hold's id is its commit's alone.
    let ids: Vec<Uuid> = unique.iter().map(|(_, _, e)| e.id).collect();
    let holds = taken_ids(tx, ctx.user_id, &ids).await?;
    if !holds.is_empty() {
        unique.retain(|(_, _, e)| !holds.contains(&e.id));
        out.rejected.extend(holds.iter().map(|id| reject(&id.to_string(), "conflict")));
    }
    let tracked = tracked_periods(ctx.catalog);
    let mut wanted = current_windows(ctx, features);
    let mut keys: BTreeSet<CounterKey> = wanted.keys().cloned().collect();
    for (eff, _, e) in &unique {
        for p in tracked.get(&e.feature).into_iter().flatten() {
            let w = window(*p, *eff, &ctx.zones, ctx.anchor);
            keys.insert((e.feature.clone(), *p, w.start));
        }
    }
    let mut stored = Counters::new();
    read_counters(tx, ctx.user_id, &keys, &mut stored).await?;
    let inserted = insert_events(tx, ctx, &crate::credits::costs(features, ctx.catalog), &unique, by, source).await?;

    // Counter increments of the inserted events, in order; a use that would push a counter past
    // the contract's range is refused and its row removed again.
    let mut acc: BTreeMap<CounterKey, Inc> = BTreeMap::new();
    let mut overflowed = Vec::new();
    let mut touched: Vec<(String, DateTime<Utc>)> = Vec::new();
    let mut again = Vec::new();
    for (eff, cost, e) in &unique {
        if !inserted.contains(&e.id) {
            again.push(e.id);
            continue;
        }
        let mut incs = Vec::new();
        let mut fits = true;
        for p in tracked.get(&e.feature).into_iter().flatten() {
            let w = window(*p, *eff, &ctx.zones, ctx.anchor);
            let key = (e.feature.clone(), *p, w.start);
            let (used, spent) = stored.get(&key).map_or((0, 0), |s| (s.used, s.cost));
            let inc = acc.get(&key);
            let (iu, ic) = inc.map_or((0, 0), |i| (i.used, i.cost));
            let sum = |a: i64, b: i64, c: i64| {
                let base = u64::try_from(a.saturating_add(b)).unwrap_or(0);
                contract::checked_sum(&e.feature, base, u64::try_from(c).unwrap_or(0)).is_ok()
            };
            if !sum(used, iu, e.amount) || !sum(spent, ic, *cost) {
                fits = false;
                break;
            }
            incs.push((key, w.end));
        }
        if !fits {
            overflowed.push(e.id);
            continue;
        }
        for (key, end) in incs {
            let i = acc.entry(key).or_default();
            i.end = end;
            i.used += e.amount;
            i.cost += cost;
        }
        out.accepted.push(e.id);
        touched.push((e.feature.clone(), *eff));
    }
    if !overflowed.is_empty() {
        tx.execute(&tx.prepare_cached("DELETE FROM events WHERE user_id = $1 AND id = ANY($2)").await?, &[&ctx.user_id, &overflowed])
            .await?;
        out.rejected.extend(overflowed.iter().map(|id| reject(&id.to_string(), "invalid_amount")));
    }
    if !again.is_empty() {
        let rows = tx
            .query(
                &tx.prepare_cached(
                    "SELECT id, feature, amount, occurred_at, model, input_tokens, output_tokens, metadata, effective_at, use_id \
                     FROM events WHERE user_id = $1 AND id = ANY($2)",
                )
                .await?,
                &[&ctx.user_id, &again],
            )
            .await?;
        let known: HashMap<Uuid, (Body, DateTime<Utc>)> = rows
            .iter()
            .map(|r| {
                let b = Body {
                    feature: r.get(1),
                    amount: r.get(2),
                    occurred_at: r.get(3),
                    model: r.get(4),
                    input_tokens: r.get(5),
                    output_tokens: r.get(6),
                    metadata: r.get(7),
                    use_id: r.get(9),
                };
                (r.get(0), (b, r.get(8)))
            })
            .collect();
        for id in again {
            match (known.get(&id), first.get(&id)) {
                (Some((b, eff)), Some(sent)) if b == sent => {
                    out.duplicates.push(id);
                    touched.push((b.feature.clone(), *eff));
                }
                _ => out.rejected.push(reject(&id.to_string(), "conflict")),
            }
        }
    }
    let ok: BTreeSet<Uuid> = out.accepted.iter().chain(out.duplicates.iter()).copied().collect();
    for id in repeats {
        if ok.contains(&id) {
            out.duplicates.push(id);
        } else {
            out.rejected.push(reject(&id.to_string(), "conflict"));
        }
    }
    let mut unknown = BTreeSet::new();
    for (f, at) in &touched {
        if !ctx.catalog.knows_feature(f) {
            unknown.insert(f.clone());
        }
        if let Some(p) = features.get(f).and_then(Rule::period) {
            let w = window(p, *at, &ctx.zones, ctx.anchor);
            wanted.insert((f.clone(), p, w.start), w.end);
        }
    }
    out.unknown_features = unknown.into_iter().collect();
    out.touched = touched;
    // Duplicates may name windows not read yet (their stored effective time).
    read_counters(tx, ctx.user_id, &wanted.keys().cloned().collect(), &mut stored).await?;
    let mut after = stored;
    for (key, inc) in &acc {
        let v = after.entry(key.clone()).or_default();
        v.used += inc.used;
        v.cost += inc.cost;
    }
    with_limits(features, &mut acc);
    // What this batch added to each window, to tell which thresholds it crossed.
    let added: HashMap<CounterKey, (i64, i64)> = acc.iter().map(|(k, inc)| (k.clone(), (inc.used, inc.cost))).collect();
    upsert_counters(tx, ctx.user_id, ctx.now, acc).await?;
    mark_overage(tx, ctx, features, &unique, (&out.accepted, by.device_id()), &mut after, over_cause).await?;
    out.totals = wanted
        .into_iter()
        .filter_map(|((f, p, start), end)| {
            let s = after.get(&(f.clone(), p, start)).cloned().unwrap_or_default();
            features.get(&f).map(|rule| total_for(rule, &f, p, start, end, &s))
        })
        .collect();
    let crossed: Vec<(&Total, u64)> = out
        .totals
        .iter()
        .filter_map(|t| {
            let (used, cost) = added.get(&(t.feature.clone(), t.period, t.period_start))?;
            let by = if matches!(features.get(&t.feature), Some(Rule::Budget { .. })) { cost } else { used };
            Some((t, u64::try_from(*by).unwrap_or(0)))
        })
        .collect();
    crate::webhooks::outbox::usage_thresholds(tx, ctx.user_id, &crossed, ctx.now).await?;
    Ok(out)
}

/// Which of `ids` the user's holds or uses of several items already take: ids of holds (any but
/// the one being committed, whose events take their ids), of holds of several items and of
/// recorded uses of several items. No event may take one.
pub async fn taken_ids(tx: &impl GenericClient, user_id: Uuid, ids: &[Uuid]) -> ApiResult<BTreeSet<Uuid>> {
    if ids.is_empty() {
        return Ok(BTreeSet::new());
    }
    let rows = tx
        .query(
            &tx.prepare_cached(
                "SELECT id FROM holds WHERE user_id = $1 AND id = ANY($2) AND state <> 'committing' \
                 UNION SELECT use_id FROM holds WHERE user_id = $1 AND use_id = ANY($2) \
                 UNION SELECT use_id FROM events WHERE user_id = $1 AND use_id = ANY($2)",
            )
            .await?,
            &[&user_id, &ids],
        )
        .await?;
    Ok(rows.iter().map(|r| r.get(0)).collect())
}

/// Inserts the events that are new (`ON CONFLICT DO NOTHING`), each with its price in credits
/// at `prices` ([`crate::credits::costs`]); returns the ids inserted.
async fn insert_events(
    tx: &impl GenericClient,
    ctx: &Ctx<'_>,
    prices: &BTreeMap<String, i64>,
    events: &[(DateTime<Utc>, i64, NewEvent)],
    by: Actor<'_>,
    source: &str,
) -> ApiResult<BTreeSet<Uuid>> {
    if events.is_empty() {
        return Ok(BTreeSet::new());
    }
    let n = events.len();
    let mut cols = (
        Vec::with_capacity(n),
        Vec::with_capacity(n),
        Vec::with_capacity(n),
        Vec::with_capacity(n),
        Vec::with_capacity(n),
        Vec::with_capacity(n),
        Vec::with_capacity(n),
        Vec::with_capacity(n),
        Vec::with_capacity(n),
        Vec::with_capacity(n),
        Vec::with_capacity(n),
        Vec::with_capacity(n),
        Vec::with_capacity(n),
        Vec::with_capacity(n),
        Vec::with_capacity(n),
        Vec::with_capacity(n),
    );
    for (effective, cost, e) in events {
        cols.15.push(e.use_id);
        cols.14.push(crate::credits::price(prices, &e.feature, e.amount));
        cols.13.push(e.unclamped && e.lease_ver.is_some());
        cols.0.push(e.id);
        cols.1.push(e.feature.as_str());
        cols.2.push(e.amount);
        cols.3.push(e.occurred_at);
        cols.4.push(*effective);
        cols.5.push(*effective != e.occurred_at);
        cols.6.push(e.device_seq);
        cols.7.push(e.model.as_deref());
        cols.8.push(e.input_tokens);
        cols.9.push(e.output_tokens);
        cols.10.push(*cost);
        cols.11.push(e.metadata.as_ref());
        cols.12.push(e.lease_ver);
    }
    let rows = tx
        .query(
            &tx.prepare_cached("INSERT INTO events (user_id, id, feature, amount, occurred_at, effective_at, clamped, received_at, device_id, device_seq, \
               model, input_tokens, output_tokens, cost_micros, metadata, source, lease_ver, lease_counted, credits, recorded_by, use_id) \
             SELECT $1, t.id, t.feature, t.amount, t.occurred_at, t.effective_at, t.clamped, $2, $3, t.device_seq, \
               t.model, t.input_tokens, t.output_tokens, t.cost_micros, t.metadata, $4, t.lease_ver, t.lease_counted, t.credits, $20, t.use_id \
             FROM unnest($5::uuid[], $6::text[], $7::int8[], $8::timestamptz[], $9::timestamptz[], $10::bool[], $11::int8[], \
               $12::text[], $13::int8[], $14::int8[], $15::int8[], $16::jsonb[], $17::int8[], $18::bool[], $19::int8[], $21::uuid[]) \
               AS t(id, feature, amount, occurred_at, effective_at, clamped, device_seq, model, input_tokens, output_tokens, cost_micros, metadata, lease_ver, lease_counted, credits, use_id) \
             ON CONFLICT (user_id, id) DO NOTHING RETURNING id").await?,
            &[
                &ctx.user_id, &ctx.now, &by.device_id(), &source, &cols.0, &cols.1, &cols.2, &cols.3, &cols.4, &cols.5, &cols.6, &cols.7, &cols.8, &cols.9, &cols.10,
                &cols.11, &cols.12, &cols.13, &cols.14, &by.recorded_by().as_str(), &cols.15,
            ],
        )
        .await?;
    Ok(rows.iter().map(|r| r.get(0)).collect())
}

/// A leased use within its device's allowance, in a window whose limit fell below what was used
/// after the room was granted (a plan change lowered it).
pub const CAUSE_DOWNGRADE: &str = "downgrade";
/// A leased use past its device's allowance (no honest core records one).
pub const CAUSE_DEVICE_OVERRUN: &str = "device_overrun";
/// A leased use past the allowance of a device id two installs send.
pub const CAUSE_CLONED_DEVICE: &str = "cloned_device";
/// A use of a client of protocol 1.
pub const CAUSE_PROTOCOL1: &str = "protocol1";
/// A use of a protocol-2 device before its first lease (or sent without `lease_ver`).
pub const CAUSE_BEFORE_LEASE: &str = "before_lease";
/// A leased use reported after its slice was taken back (lease ended, device removed).
pub const CAUSE_RECLAIMED: &str = "reclaimed";

/// Stores its cause on every accepted event that leaves the window of its hard rule over the
/// limit, and adds the cause (sorted, once) to that window's causes. The cause is the event's own
/// ([`Cause`]), else `batch_cause`:
///
/// - a use not decided within a device's allowance is over when the window is over its limit,
///   or when it lands in room promised to devices' slices or open holds (`used + held +
///   outstanding > limit`): the leased uses that later fill those slices are within what the
///   server granted, and the overage they reveal is this use's;
/// - a use within its device's allowance ([`Cause::Slice`]) is over only when the window is over
///   a limit that fell below the highest one room was given under (`counters.lim`): a downgrade.
async fn mark_overage(
    tx: &impl GenericClient,
    ctx: &Ctx<'_>,
    features: &BTreeMap<String, Rule>,
    events: &[(DateTime<Utc>, i64, NewEvent)],
    (accepted, device): (&[Uuid], Option<&str>),
    after: &mut Counters,
    batch_cause: Option<&str>,
) -> ApiResult<()> {
    let accepted: BTreeSet<Uuid> = accepted.iter().copied().collect();
    let mut over_ids: BTreeMap<&str, Vec<Uuid>> = BTreeMap::new();
    // Promised room per window, with and without (for its overruns) the recording device's slice.
    let mut promised: HashMap<(CounterKey, bool), u64> = HashMap::new();
    // The recording device's slice per window: (what it had left before the batch, what the
    // batch's uses took of it so far).
    let mut slices: HashMap<CounterKey, (u64, u64)> = HashMap::new();
    for (eff, cost, e) in events.iter().filter(|(_, _, e)| accepted.contains(&e.id)) {
        let Some(rule) = features.get(&e.feature) else { continue };
        let (Some(period), Some(limit)) = (rule.period(), rule.limit()) else { continue };
        if !crate::pools::is_hard(rule) {
            continue;
        }
        let budget = matches!(rule, Rule::Budget { .. });
        let w = window(period, *eff, &ctx.zones, ctx.anchor);
        let key = (e.feature.clone(), period, w.start);
        let Some(s) = after.get(&key) else { continue };
        let place = |column: &str| format!("counters.{column} of ({}, {:?}, {}, {})", ctx.user_id, key.0, key.1.as_str(), key.2);
        let used = crate::pools::stored_count(if budget { s.cost } else { s.used }, || place("used"))?;
        let highest = s.lim.map(|l| crate::pools::stored_count(l, || place("lim"))).transpose()?;
        // An ended window is judged by the limit it ran under, not by today's plan.
        let ended = w.end.is_some_and(|end| end <= ctx.now);
        let limit = match highest {
            Some(l) if ended => l,
            _ => limit,
        };
        let (cause, in_slice) = match (e.cause, batch_cause, device) {
            (Some(Cause::Slice { cloned }), _, Some(device)) => {
                if !slices.contains_key(&key) {
                    let left = crate::pools::slice_left(tx, ctx.user_id, (&key.0, key.1.as_str(), key.2), device).await?;
                    slices.insert(key.clone(), (left, 0));
                }
                let units = u64::try_from(if budget { *cost } else { e.amount }).unwrap_or(u64::MAX);
                let (left, so_far) = slices.entry(key.clone()).or_default();
                *so_far = so_far.saturating_add(units);
                match (*so_far <= *left, cloned) {
                    (true, _) => (CAUSE_DOWNGRADE, true),
                    (false, true) => (CAUSE_CLONED_DEVICE, false),
                    (false, false) => (CAUSE_DEVICE_OVERRUN, false),
                }
            }
            // A slice needs a device; without one the use was promised nothing.
            (Some(Cause::Slice { .. }), _, None) => (CAUSE_DEVICE_OVERRUN, false),
            (Some(Cause::Recorded(c)), _, _) | (None, Some(c), _) => (c, false),
            (None, None, _) => continue,
        };
        let over = if in_slice {
            used > limit && highest.is_some_and(|h| limit < h)
        } else if used > limit {
            true
        } else {
            // An overrun's own slice is spent: only the others' promised room counts.
            let overrun = matches!(e.cause, Some(Cause::Slice { .. }));
            let p = match promised.get(&(key.clone(), overrun)) {
                Some(p) => *p,
                None => {
                    let p = promised_room(tx, ctx, &key, device.filter(|_| overrun)).await?;
                    promised.insert((key.clone(), overrun), p);
                    p
                }
            };
            used.saturating_add(p) > limit
        };
        if !over {
            continue;
        }
        let Some(s) = after.get_mut(&key) else { continue };
        over_ids.entry(cause).or_default().push(e.id);
        if !s.causes.iter().any(|c| c == cause) {
            s.causes.push(cause.to_string());
            s.causes.sort();
            tx.execute(
                &tx.prepare_cached(
                    "UPDATE counters SET causes = $5 WHERE user_id = $1 AND feature = $2 AND period = $3 AND period_start = $4",
                )
                .await?,
                &[&ctx.user_id, &key.0, &key.1.as_str(), &key.2, &s.causes],
            )
            .await?;
        }
    }
    for (cause, ids) in over_ids {
        tx.execute(
            &tx.prepare_cached("UPDATE events SET cause = $3 WHERE user_id = $1 AND id = ANY($2)").await?,
            &[&ctx.user_id, &ids, &cause],
        )
        .await?;
    }
    Ok(())
}

/// Room of a window promised but not yet used: open holds plus what devices with a live lease
/// (but `except`) may still record in their slices (units, or micros for a budget).
async fn promised_room(tx: &impl GenericClient, ctx: &Ctx<'_>, key: &CounterKey, except: Option<&str>) -> ApiResult<u64> {
    let row = tx
        .query_one(
            &tx.prepare_cached(
                "SELECT coalesce((SELECT c.held FROM counters c WHERE c.user_id = $1 AND c.feature = $2 AND c.period = $3 \
                   AND c.period_start = $4), 0)::int8, \
                 (SELECT coalesce(sum(greatest(0, d.allowance - d.consumed)), 0)::int8 FROM pool_devices d \
                   WHERE d.user_id = $1 AND d.feature = $2 AND d.period = $3 AND d.period_start = $4 \
                   AND d.device_id IS DISTINCT FROM $6 \
                   AND EXISTS (SELECT 1 FROM devices v WHERE v.user_id = d.user_id AND v.device_id = d.device_id \
                     AND v.removed_at IS NULL AND v.lease_until > $5))",
            )
            .await?,
            &[&ctx.user_id, &key.0, &key.1.as_str(), &key.2, &ctx.now, &except],
        )
        .await?;
    let place = |column: &str| format!("{column} of ({}, {:?}, {}, {})", ctx.user_id, key.0, key.1.as_str(), key.2);
    let held = crate::pools::stored_count(row.get(0), || place("counters.held"))?;
    Ok(held.saturating_add(crate::pools::stored_count(row.get(1), || place("pool_devices outstanding"))?))
}

/// The counted rule of `feature`'s window containing `at`.
fn total_for(rule: &Rule, feature: &str, period: Period, start: DateTime<Utc>, end: Option<DateTime<Utc>>, s: &Stored) -> Total {
    let used = if matches!(rule, Rule::Budget { .. }) { s.cost } else { s.used };
    let used = u64::try_from(used).unwrap_or(0);
    let limit = rule.limit();
    Total {
        feature: feature.to_string(),
        period,
        period_start: start,
        period_end: end,
        used,
        limit,
        remaining: limit.map(|l| l.saturating_sub(used)),
        over_limit_by: limit.map_or(0, |l| used.saturating_sub(l)),
        over_limit_causes: s.causes.clone(),
    }
}

/// Totals of the current window of every counted rule in `features` (reads only).
pub async fn totals(tx: &impl GenericClient, ctx: &Ctx<'_>, features: &BTreeMap<String, Rule>) -> ApiResult<Vec<Total>> {
    let wanted = current_windows(ctx, features);
    let mut stored = Counters::new();
    read_counters(tx, ctx.user_id, &wanted.keys().cloned().collect(), &mut stored).await?;
    Ok(wanted
        .into_iter()
        .filter_map(|((f, p, start), end)| {
            let s = stored.get(&(f.clone(), p, start)).cloned().unwrap_or_default();
            features.get(&f).map(|rule| total_for(rule, &f, p, start, end, &s))
        })
        .collect())
}

/// Re-reads `totals` (and the current windows of `features`) after later changes in the same
/// transaction (a sync's voids), keeping every window they named.
pub async fn refresh_totals(
    tx: &impl GenericClient,
    ctx: &Ctx<'_>,
    features: &BTreeMap<String, Rule>,
    totals: &mut Vec<Total>,
) -> ApiResult<()> {
    let mut wanted = current_windows(ctx, features);
    for t in totals.iter() {
        wanted.insert((t.feature.clone(), t.period, t.period_start), t.period_end);
    }
    let mut stored = Counters::new();
    read_counters(tx, ctx.user_id, &wanted.keys().cloned().collect(), &mut stored).await?;
    *totals = wanted
        .into_iter()
        .filter_map(|((f, p, start), end)| {
            let s = stored.get(&(f.clone(), p, start)).cloned().unwrap_or_default();
            features.get(&f).map(|rule| total_for(rule, &f, p, start, end, &s))
        })
        .collect();
    Ok(())
}

/// What [`void`] did.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Voided {
    /// No such event (nor use of several items) of this user.
    Unknown,
    /// The voider has less authority than the recorder (`recorded_by`); nothing changed.
    NotAllowed(RecordedBy),
    /// It was voided before; nothing changed.
    Before,
    /// Voided now.
    Now,
}

/// Voids the (locked) user's event `id` — or every item of the use `id` — for `by`: each stays
/// in the ledger, marked, and stops counting in the windows of its own effective time (credits it
/// drew return, since the balance replays only unvoided uses). Refused as a whole, nothing
/// changed, when `by` may not undo what recorded one of them ([`Actor::may_undo`]). Returns what
/// happened and the features of the events `id` names.
pub async fn void(
    tx: &impl GenericClient,
    ctx: &Ctx<'_>,
    id: Uuid,
    by: Actor<'_>,
    reason: Option<&str>,
) -> ApiResult<(Voided, Vec<String>)> {
    let rows = tx
        .query(
            &tx.prepare_cached(
                "SELECT id, feature, amount, effective_at, COALESCE(cost_micros, 0), voided_at, lease_counted, device_id, recorded_by \
                 FROM events WHERE user_id = $1 AND (id = $2 OR use_id = $2) ORDER BY id FOR UPDATE",
            )
            .await?,
            &[&ctx.user_id, &id],
        )
        .await?;
    let features: Vec<String> = rows.iter().map(|r| r.get(1)).collect();
    if rows.is_empty() {
        return Ok((Voided::Unknown, features));
    }
    for r in &rows {
        let recorded_by: RecordedBy = r.get(8);
        if !by.may_undo(recorded_by, r.get::<_, Option<&str>>(7)) {
            return Ok((Voided::NotAllowed(recorded_by), features));
        }
    }
    let open: Vec<&tokio_postgres::Row> = rows.iter().filter(|r| r.get::<_, Option<DateTime<Utc>>>(5).is_none()).collect();
    if open.is_empty() {
        return Ok((Voided::Before, features));
    }
    let ids: Vec<Uuid> = open.iter().map(|r| r.get(0)).collect();
    tx.execute(
        &tx.prepare_cached("UPDATE events SET voided_at = $3, void_reason = $4 WHERE user_id = $1 AND id = ANY($2)").await?,
        &[&ctx.user_id, &ids, &ctx.now, &reason],
    )
    .await?;
    let tracked = tracked_periods(ctx.catalog);
    let mut acc = BTreeMap::new();
    for r in &open {
        let (feature, amount, cost): (String, i64, i64) = (r.get(1), r.get(2), r.get(4));
        add_increments(ctx, &tracked, &mut acc, &feature, r.get(3), -amount, -cost);
    }
    upsert_counters(tx, ctx.user_id, ctx.now, acc).await?;
    for r in &open {
        if r.get::<_, bool>(6)
            && let Some(device) = r.get::<_, Option<String>>(7)
        {
            // A use counted in its device's lease gives the device its units back.
            let (feature, amount, cost): (String, i64, i64) = (r.get(1), r.get(2), r.get(4));
            crate::leases::uncount_consumed(tx, ctx, &device, &feature, r.get(3), amount, cost).await?;
        }
    }
    Ok((Voided::Now, features))
}
