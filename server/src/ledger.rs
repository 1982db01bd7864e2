//! The server's usage ledger: per-event validation, batch insert with `UNNEST … ON CONFLICT
//! (user_id, id) DO NOTHING`, duplicate/conflict detection on the sent body, per-window counters
//! updated in the same transaction, and totals computed with the server's own rules.

use crate::error::ApiResult;
use chrono::{DateTime, Duration, Utc};
use chrono_tz::Tz;
use deadpool_postgres::GenericClient;
use serde_json::Value;
use std::collections::{BTreeMap, BTreeSet, HashMap};
use tally_core::period::{Period, window};
use tally_core::wire::{Rejected, Total};
use tally_core::{Catalog, Rule};
use uuid::Uuid;

/// Largest amount of one event.
pub const MAX_AMOUNT: u64 = 1_000_000_000_000;
/// Largest token count of one event.
pub const MAX_TOKENS: u64 = 1_000_000_000_000;
/// Largest serialized `metadata`.
pub const MAX_METADATA_BYTES: usize = 4096;
/// How far ahead of the server's clock an event's time may count.
pub const MAX_FUTURE: Duration = Duration::minutes(5);

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
        }
    }
}

fn reject(id: &str, reason: &str) -> Rejected {
    Rejected { id: id.to_string(), reason: reason.to_string() }
}

fn opt_uint(o: &serde_json::Map<String, Value>, key: &str, max: u64) -> Result<Option<i64>, ()> {
    match o.get(key) {
        None | Some(Value::Null) => Ok(None),
        Some(v) => v.as_u64().filter(|n| *n <= max).and_then(|n| i64::try_from(n).ok()).map(Some).ok_or(()),
    }
}

/// Validates one event of a request. `id_override` stands in for a missing `id`
/// (the `Idempotency-Key` of `POST /v1/usage`). Errors carry the id as sent and a reason:
/// `invalid_event`, `invalid_id`, `invalid_amount`, `metadata_too_large`.
pub fn validate(v: &Value, id_override: Option<Uuid>) -> Result<NewEvent, Rejected> {
    let Some(o) = v.as_object() else { return Err(reject("", "invalid_event")) };
    let id_sent = match o.get("id") {
        Some(Value::String(s)) => s.clone(),
        Some(Value::Null) | None => id_override.map(|u| u.to_string()).unwrap_or_default(),
        Some(other) => other.to_string(),
    };
    let id = match (o.get("id"), id_override) {
        (Some(Value::String(s)), _) => Uuid::parse_str(s).map_err(|_| reject(&id_sent, "invalid_id"))?,
        (None | Some(Value::Null), Some(u)) => u,
        _ => return Err(reject(&id_sent, "invalid_id")),
    };
    if id.is_nil() {
        return Err(reject(&id_sent, "invalid_id"));
    }
    let feature = o
        .get("feature")
        .and_then(Value::as_str)
        .filter(|f| !f.is_empty() && f.len() <= 128)
        .ok_or_else(|| reject(&id_sent, "invalid_event"))?
        .to_string();
    let amount = o
        .get("amount")
        .and_then(Value::as_u64)
        .filter(|a| *a > 0 && *a <= MAX_AMOUNT)
        .and_then(|a| i64::try_from(a).ok())
        .ok_or_else(|| reject(&id_sent, "invalid_amount"))?;
    let occurred_at = o
        .get("occurred_at")
        .and_then(Value::as_str)
        .and_then(|s| DateTime::parse_from_rfc3339(s).ok())
        .and_then(|t| DateTime::from_timestamp_micros(t.timestamp_micros()))
        .filter(|t| t.timestamp() >= 0 && t.timestamp() < 253_402_300_800)
        .ok_or_else(|| reject(&id_sent, "invalid_event"))?;
    let bad = |_| reject(&id_sent, "invalid_event");
    let device_seq = opt_uint(o, "device_seq", i64::MAX as u64).map_err(bad)?;
    let input_tokens = opt_uint(o, "input_tokens", MAX_TOKENS).map_err(bad)?;
    let output_tokens = opt_uint(o, "output_tokens", MAX_TOKENS).map_err(bad)?;
    let model = match o.get("model") {
        None | Some(Value::Null) => None,
        Some(Value::String(m)) if !m.is_empty() && m.len() <= 128 => Some(m.clone()),
        Some(_) => return Err(reject(&id_sent, "invalid_event")),
    };
    let metadata = match o.get("metadata") {
        None | Some(Value::Null) => None,
        Some(m) => {
            if m.to_string().len() > MAX_METADATA_BYTES {
                return Err(reject(&id_sent, "metadata_too_large"));
            }
            Some(m.clone())
        }
    };
    Ok(NewEvent { id, feature, amount, occurred_at, device_seq, model, input_tokens, output_tokens, metadata })
}

/// Where a user's windows are computed: timezone, billing anchor, catalog.
pub struct Ctx<'a> {
    /// The user.
    pub user_id: Uuid,
    /// The user's timezone.
    pub tz: Tz,
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
    pub fn new(user: &crate::accounts::User, loaded: &'a crate::entitlements::Loaded, now: DateTime<Utc>) -> Ctx<'a> {
        Ctx {
            user_id: user.user_id,
            tz: user.tz(),
            anchor: loaded.anchor,
            catalog: &loaded.catalog,
            catalog_version: loaded.catalog_version,
            now,
        }
    }

    fn counters_key(&self) -> String {
        format!("{}|{}|{}", self.tz.name(), self.anchor.timestamp_micros(), self.catalog_version)
    }
    fn cost(&self, model: Option<&str>, input: Option<i64>, output: Option<i64>) -> i64 {
        let Some(price) = model.and_then(|m| self.catalog.models.get(m)) else { return 0 };
        let c = price.cost_micros(input.unwrap_or(0).max(0) as u64, output.unwrap_or(0).max(0) as u64).unwrap_or(i64::MAX as u64);
        i64::try_from(c).unwrap_or(i64::MAX)
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
            let w = window(*p, at, ctx.tz, ctx.anchor);
            let e = acc.entry((feature.to_string(), *p, w.start)).or_default();
            e.end = w.end;
            e.used = e.used.saturating_add(amount);
            e.cost = e.cost.saturating_add(cost);
        }
    }
}

async fn upsert_counters(tx: &impl GenericClient, user_id: Uuid, acc: BTreeMap<CounterKey, Inc>) -> ApiResult<()> {
    if acc.is_empty() {
        return Ok(());
    }
    let n = acc.len();
    let (mut f, mut p, mut s, mut e, mut u, mut c) = (
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
    }
    tx.execute(
        &tx.prepare_cached(
            "INSERT INTO counters (user_id, feature, period, period_start, period_end, used, cost_micros) \
         SELECT $1, * FROM unnest($2::text[], $3::text[], $4::timestamptz[], $5::timestamptz[], $6::int8[], $7::int8[]) \
         ON CONFLICT (user_id, feature, period, period_start) DO UPDATE \
         SET used = counters.used + excluded.used, cost_micros = counters.cost_micros + excluded.cost_micros",
        )
        .await?,
        &[&user_id, &f, &p, &s, &e, &u, &c],
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
            &tx.prepare_cached("SELECT feature, amount, effective_at, model, input_tokens, output_tokens FROM events WHERE user_id = $1")
                .await?,
            &[&ctx.user_id],
        )
        .await?;
    for r in rows {
        let feature: String = r.get(0);
        let cost = ctx.cost(r.get::<_, Option<&str>>(3), r.get(4), r.get(5));
        add_increments(ctx, &tracked, &mut acc, &feature, r.get(2), r.get(1), cost);
    }
    upsert_counters(tx, ctx.user_id, acc).await?;
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
    /// Refused (`conflict` for a known id with another body).
    pub rejected: Vec<Rejected>,
    /// (feature, effective time) of every accepted or duplicate event.
    pub touched: Vec<(String, DateTime<Utc>)>,
}

/// Inserts `events` for the (locked) user in one statement, detects duplicates and conflicts
/// against the stored bodies, and adds the inserted ones to the counters.
pub async fn ingest(
    tx: &impl GenericClient,
    ctx: &Ctx<'_>,
    events: Vec<NewEvent>,
    device_id: Option<&str>,
    source: &str,
) -> ApiResult<Outcome> {
    let mut out = Outcome::default();
    // Repeats inside the batch: same body → duplicate of the first, other body → conflict.
    let mut first: HashMap<Uuid, Body> = HashMap::new();
    let mut unique = Vec::with_capacity(events.len());
    let mut repeats = Vec::new();
    for e in events {
        match first.get(&e.id) {
            Some(b) if *b == e.body() => repeats.push(e.id),
            Some(_) => out.rejected.push(reject(&e.id.to_string(), "conflict")),
            None => {
                first.insert(e.id, e.body());
                unique.push(e);
            }
        }
    }
    if unique.is_empty() {
        return Ok(out);
    }
    let limit = ctx.now + MAX_FUTURE;
    let n = unique.len();
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
    );
    let mut costs = HashMap::with_capacity(n);
    for e in &unique {
        let effective = e.occurred_at.min(limit);
        let cost = ctx.cost(e.model.as_deref(), e.input_tokens, e.output_tokens);
        costs.insert(e.id, (effective, cost));
        cols.0.push(e.id);
        cols.1.push(e.feature.clone());
        cols.2.push(e.amount);
        cols.3.push(e.occurred_at);
        cols.4.push(effective);
        cols.5.push(effective != e.occurred_at);
        cols.6.push(e.device_seq);
        cols.7.push(e.model.clone());
        cols.8.push(e.input_tokens);
        cols.9.push(e.output_tokens);
        cols.10.push(cost);
        cols.11.push(e.metadata.clone());
    }
    let rows = tx
        .query(
            &tx.prepare_cached("INSERT INTO events (user_id, id, feature, amount, occurred_at, effective_at, clamped, received_at, device_id, device_seq, \
               model, input_tokens, output_tokens, cost_micros, metadata, source) \
             SELECT $1, t.id, t.feature, t.amount, t.occurred_at, t.effective_at, t.clamped, $2, $3, t.device_seq, \
               t.model, t.input_tokens, t.output_tokens, t.cost_micros, t.metadata, $4 \
             FROM unnest($5::uuid[], $6::text[], $7::int8[], $8::timestamptz[], $9::timestamptz[], $10::bool[], $11::int8[], \
               $12::text[], $13::int8[], $14::int8[], $15::int8[], $16::jsonb[]) \
               AS t(id, feature, amount, occurred_at, effective_at, clamped, device_seq, model, input_tokens, output_tokens, cost_micros, metadata) \
             ON CONFLICT (user_id, id) DO NOTHING RETURNING id").await?,
            &[
                &ctx.user_id, &ctx.now, &device_id, &source, &cols.0, &cols.1, &cols.2, &cols.3, &cols.4, &cols.5, &cols.6, &cols.7, &cols.8, &cols.9, &cols.10,
                &cols.11,
            ],
        )
        .await?;
    let inserted: BTreeSet<Uuid> = rows.iter().map(|r| r.get(0)).collect();
    let tracked = tracked_periods(ctx.catalog);
    let mut acc = BTreeMap::new();
    let mut again = Vec::new();
    for e in &unique {
        if inserted.contains(&e.id) {
            let (eff, cost) = costs[&e.id];
            add_increments(ctx, &tracked, &mut acc, &e.feature, eff, e.amount, cost);
            out.accepted.push(e.id);
            out.touched.push((e.feature.clone(), eff));
        } else {
            again.push(e.id);
        }
    }
    upsert_counters(tx, ctx.user_id, acc).await?;
    if !again.is_empty() {
        let stored = tx
            .query(
                &tx.prepare_cached("SELECT id, feature, amount, occurred_at, model, input_tokens, output_tokens, effective_at FROM events WHERE user_id = $1 AND id = ANY($2)").await?,
                &[&ctx.user_id, &again],
            )
            .await?;
        let stored: HashMap<Uuid, (Body, DateTime<Utc>)> = stored
            .iter()
            .map(|r| {
                let b = Body {
                    feature: r.get(1),
                    amount: r.get(2),
                    occurred_at: r.get(3),
                    model: r.get(4),
                    input_tokens: r.get(5),
                    output_tokens: r.get(6),
                };
                (r.get(0), (b, r.get(7)))
            })
            .collect();
        for id in again {
            match (stored.get(&id), first.get(&id)) {
                (Some((b, eff)), Some(sent)) if b == sent => {
                    out.duplicates.push(id);
                    out.touched.push((b.feature.clone(), *eff));
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
    Ok(out)
}

/// The counted rule of `feature`'s window containing `at`.
fn total_for(rule: &Rule, feature: &str, period: Period, start: DateTime<Utc>, end: Option<DateTime<Utc>>, used: i64, cost: i64) -> Total {
    let used = if matches!(rule, Rule::Budget { .. }) { cost } else { used };
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
    }
}

/// Totals of the current window of every metered/budget rule in `features`, plus every window
/// of those rules that `touched` events fall in.
pub async fn totals(
    tx: &impl GenericClient,
    ctx: &Ctx<'_>,
    features: &BTreeMap<String, Rule>,
    touched: &[(String, DateTime<Utc>)],
) -> ApiResult<Vec<Total>> {
    let mut wanted: BTreeMap<CounterKey, Option<DateTime<Utc>>> = BTreeMap::new();
    for (f, rule) in features {
        let Some(p) = rule.period() else { continue };
        let w = window(p, ctx.now, ctx.tz, ctx.anchor);
        wanted.insert((f.clone(), p, w.start), w.end);
    }
    for (f, at) in touched {
        if let Some(p) = features.get(f).and_then(Rule::period) {
            let w = window(p, *at, ctx.tz, ctx.anchor);
            wanted.insert((f.clone(), p, w.start), w.end);
        }
    }
    if wanted.is_empty() {
        return Ok(Vec::new());
    }
    let fs: Vec<&str> = wanted.keys().map(|k| k.0.as_str()).collect();
    let ps: Vec<&str> = wanted.keys().map(|k| k.1.as_str()).collect();
    let ss: Vec<DateTime<Utc>> = wanted.keys().map(|k| k.2).collect();
    let rows = tx
        .query(
            &tx.prepare_cached(
                "SELECT c.feature, c.period, c.period_start, c.used, c.cost_micros FROM counters c \
             JOIN unnest($2::text[], $3::text[], $4::timestamptz[]) AS w(feature, period, period_start) \
               ON c.feature = w.feature AND c.period = w.period AND c.period_start = w.period_start \
             WHERE c.user_id = $1",
            )
            .await?,
            &[&ctx.user_id, &fs, &ps, &ss],
        )
        .await?;
    let mut found: HashMap<(String, String, DateTime<Utc>), (i64, i64)> = HashMap::new();
    for r in rows {
        found.insert((r.get(0), r.get(1), r.get(2)), (r.get(3), r.get(4)));
    }
    let mut out = Vec::with_capacity(wanted.len());
    for ((f, p, start), end) in wanted {
        let (used, cost) = found.get(&(f.clone(), p.as_str().to_string(), start)).copied().unwrap_or((0, 0));
        if let Some(rule) = features.get(&f) {
            out.push(total_for(rule, &f, p, start, end, used, cost));
        }
    }
    Ok(out)
}
