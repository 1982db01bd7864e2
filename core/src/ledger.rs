//! The usage ledger: validated uses, immutable events (one row per use, in device order, keyed
//! by `device_seq`; identity `(user_id, id)`), replays of keyed uses, and the events' sync
//! status.

use crate::decision::Decision;
use crate::error::{Error, Result};
use crate::{Tally, contract, ms};
use chrono::{DateTime, Utc};
use rusqlite::types::{FromSql, FromSqlError, FromSqlResult, ToSql, ToSqlOutput, ValueRef};
use rusqlite::{Connection, OptionalExtension, params};
use serde::{Deserialize, Serialize};
use serde_json::Value;
use uuid::Uuid;

/// Namespace of UUIDv5 ids made from non-UUID idempotency keys.
pub const KEY_NAMESPACE: Uuid = Uuid::from_u128(0x7a11_7a11_0000_4000_8000_0000_7a11_7a11);

/// Optional details of a use.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct UsageMeta {
    /// Caller-chosen idempotency key: a UUID is used as the event id, anything else becomes
    /// UUIDv5(Tally namespace, key). Retrying with the same key never counts twice.
    pub idempotency_key: Option<String>,
    /// AI model (priced from the catalog's `models`).
    pub model: Option<String>,
    /// AI input tokens.
    pub input_tokens: Option<u64>,
    /// AI output tokens.
    pub output_tokens: Option<u64>,
    /// Small JSON metadata (≤ 4 KiB serialized).
    pub metadata: Option<Value>,
}

/// One item of [`Tally::consume_many`].
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ConsumeItem {
    /// Feature key.
    pub feature: String,
    /// Units used.
    pub amount: u64,
    /// Details.
    #[serde(default)]
    pub meta: UsageMeta,
}

/// Whether the server has taken an event.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case", tag = "status", content = "reason")]
pub enum EventStatus {
    /// Recorded on the device, not yet acknowledged by a server.
    Pending,
    /// Acknowledged by the server (counted there).
    Settled,
    /// Refused by the server (kept, never resent, not counted).
    Rejected(String),
}

/// The stored sync state of an event (column `events.status`), bound as a parameter in every
/// query: 0 pending, 1 settled, 2 rejected.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum EventState {
    /// Recorded here, not yet acknowledged.
    Pending,
    /// Acknowledged by the server.
    Settled,
    /// Quarantined: kept, never resent, not counted.
    Rejected,
}

impl EventState {
    fn code(self) -> i64 {
        match self {
            EventState::Pending => 0,
            EventState::Settled => 1,
            EventState::Rejected => 2,
        }
    }
}

impl ToSql for EventState {
    fn to_sql(&self) -> rusqlite::Result<ToSqlOutput<'_>> {
        Ok(ToSqlOutput::from(self.code()))
    }
}

impl FromSql for EventState {
    fn column_result(value: ValueRef<'_>) -> FromSqlResult<Self> {
        match value.as_i64()? {
            0 => Ok(EventState::Pending),
            1 => Ok(EventState::Settled),
            2 => Ok(EventState::Rejected),
            n => Err(FromSqlError::OutOfRange(n)),
        }
    }
}

/// Why an event was quarantined (column `events.reject_reason`, stored as its wire string).
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) enum RejectReason {
    /// Too large to send on its own (`too_large`).
    TooLarge,
    /// Broke the contract when checked before sending (the violation's code).
    Contract(&'static str),
    /// Refused by the server, with its reason (`conflict`, …).
    Server(String),
}

impl RejectReason {
    /// The wire string of [`RejectReason::TooLarge`].
    pub(crate) const TOO_LARGE: &'static str = "too_large";

    /// The wire string.
    pub(crate) fn as_str(&self) -> &str {
        match self {
            RejectReason::TooLarge => Self::TOO_LARGE,
            RejectReason::Contract(code) => code,
            RejectReason::Server(r) => r,
        }
    }
}

impl ToSql for RejectReason {
    fn to_sql(&self) -> rusqlite::Result<ToSqlOutput<'_>> {
        Ok(ToSqlOutput::from(self.as_str()))
    }
}

impl FromSql for RejectReason {
    fn column_result(value: ValueRef<'_>) -> FromSqlResult<Self> {
        let s = value.as_str()?;
        Ok(match s {
            RejectReason::TOO_LARGE => RejectReason::TooLarge,
            _ => {
                contract::CODES.iter().find(|c| **c == s).map_or_else(|| RejectReason::Server(s.to_string()), |c| RejectReason::Contract(c))
            }
        })
    }
}

/// A validated use, ready to decide and record.
pub(crate) struct Use<'a> {
    pub(crate) id: Uuid,
    pub(crate) feature: &'a str,
    pub(crate) amount: u64,
    pub(crate) model: Option<&'a str>,
    pub(crate) input_tokens: Option<u64>,
    pub(crate) output_tokens: Option<u64>,
    pub(crate) metadata: Option<String>,
    /// Whether the caller chose the id: only then can the use be replayed, so only then is its
    /// decision stored.
    pub(crate) keyed: bool,
    /// An item of a use with several meters: the use's id (the event's id is then
    /// [`contract::item_event_id`]`(use_id, feature)`).
    pub(crate) use_id: Option<Uuid>,
}

/// Validates a use against the contract. The id is the key's ([`event_id_for_key`]); an
/// unkeyed use gets its id when recorded ([`insert_event`]), nil until then.
pub(crate) fn validate<'a>(feature: &'a str, amount: u64, meta: &'a UsageMeta) -> Result<Use<'a>> {
    let metadata = contract::usage(feature, amount, meta.model.as_deref(), meta.input_tokens, meta.output_tokens, meta.metadata.as_ref())?;
    let id = match meta.idempotency_key.as_deref() {
        None => Uuid::nil(),
        Some(k) => {
            contract::idempotency_key(k)?;
            event_id_for_key(k)
        }
    };
    Ok(Use {
        id,
        feature,
        amount,
        model: meta.model.as_deref(),
        input_tokens: meta.input_tokens,
        output_tokens: meta.output_tokens,
        metadata,
        keyed: meta.idempotency_key.is_some(),
        use_id: None,
    })
}

/// The event id a given idempotency key maps to.
pub fn event_id_for_key(key: &str) -> Uuid {
    // The nil UUID is no event id (the wire refuses it): it is a key like any other text.
    Uuid::parse_str(key).ok().filter(|u| !u.is_nil()).unwrap_or_else(|| Uuid::new_v5(&KEY_NAMESPACE, key.as_bytes()))
}

/// The stored decision when `u.id` was already recorded with the same body.
pub(crate) fn replay(conn: &Connection, user: &str, u: &Use<'_>) -> Result<Option<Decision>> {
    let Some(seq) = find_event(conn, user, &u.id.to_string())? else {
        // Ids of single uses and of uses with several meters are one namespace.
        if use_recorded(conn, user, &u.id)? {
            return Err(Error::IdempotencyConflict(u.id.to_string()));
        }
        return Ok(None);
    };
    stored_decision(conn, seq, u).map(Some)
}

/// The decision stored with event `seq`, recorded for `u`'s id: [`Error::IdempotencyConflict`]
/// unless it was recorded with the same body (feature, amount, model, tokens, metadata, use)
/// and under a key (an unkeyed use's decision is not kept).
pub(crate) fn stored_decision(conn: &Connection, seq: i64, u: &Use<'_>) -> Result<Decision> {
    type Row = (String, i64, Option<String>, Option<i64>, Option<i64>, Option<String>, String, Option<String>);
    let row: Option<Row> = conn
        .prepare_cached(
            "SELECT feature, amount, model, input_tokens, output_tokens, metadata, decision, use_id FROM events WHERE device_seq = ?1",
        )?
        .query_row([seq], |r| Ok((r.get(0)?, r.get(1)?, r.get(2)?, r.get(3)?, r.get(4)?, r.get(5)?, r.get(6)?, r.get(7)?)))
        .optional()?;
    let conflict = || Error::IdempotencyConflict(u.id.to_string());
    let (feature, amount, model, inp, out, metadata, decision, use_id) = row.ok_or_else(conflict)?;
    let same = feature == u.feature
        && amount as u64 == u.amount
        && model.as_deref() == u.model
        && inp.map(|v| v as u64) == u.input_tokens
        && out.map(|v| v as u64) == u.output_tokens
        && metadata == u.metadata
        && use_id == u.use_id.map(|id| id.to_string());
    // Recorded without a key, its decision was not kept: a key naming it cannot replay it.
    if !same || decision.is_empty() {
        return Err(conflict());
    }
    Ok(serde_json::from_str(&decision)?)
}

/// Whether `use_id` names a recorded use with several meters of `user` (its items carry it).
pub(crate) fn use_recorded(conn: &Connection, user: &str, use_id: &Uuid) -> Result<bool> {
    Ok(conn
        .prepare_cached("SELECT EXISTS (SELECT 1 FROM events WHERE user_id = ?1 AND use_id = ?2 AND voids IS NULL)")?
        .query_row(params![user, use_id.to_string()], |r| r.get(0))?)
}

/// The device's last handed-out sequence number: the ledger's last key, or the floor kept in
/// `device.seq` when that is higher.
pub(crate) fn last_seq(conn: &Connection) -> Result<i64> {
    Ok(conn
        .prepare_cached("SELECT max(seq, coalesce((SELECT max(device_seq) FROM events), 0)) FROM device WHERE singleton = 1")?
        .query_row([], |r| r.get(0))?)
}

/// The id of an unkeyed use recorded as `seq` at `now`: a UUID v7 (RFC 9562) of `now` whose
/// last 32 bits hold `seq` (the rest random), so the use is found by id without an index.
/// `None` when `seq` does not fit in 32 bits: such a use is indexed instead.
pub(crate) fn sequenced_id(now: DateTime<Utc>, seq: i64) -> Option<Uuid> {
    let low = u32::try_from(seq).ok()?;
    let random: [u8; 10] = rand::random();
    let at = u64::try_from(ms(now)).unwrap_or(0);
    let mut bytes = *uuid::Builder::from_unix_timestamp_millis(at, &random).into_uuid().as_bytes();
    bytes[12..].copy_from_slice(&low.to_be_bytes());
    Some(Uuid::from_bytes(bytes))
}

/// The sequence number a [`sequenced_id`] carries (read from any v7 id: the row it names must
/// also hold that id).
fn seq_in_id(id: &Uuid) -> Option<i64> {
    let b = id.as_bytes();
    (id.get_version_num() == 7).then(|| i64::from(u32::from_be_bytes([b[12], b[13], b[14], b[15]])))
}

/// The sequence number of event `id` of `user`: an unkeyed use through the number its id
/// carries, any other event through `events_by_id`.
pub(crate) fn find_event(conn: &Connection, user: &str, id: &str) -> Result<Option<i64>> {
    if let Some(seq) = Uuid::parse_str(id).ok().as_ref().and_then(seq_in_id) {
        let hit = conn
            .prepare_cached("SELECT device_seq FROM events WHERE device_seq = ?1 AND user_id = ?2 AND id = ?3 AND indexed = 0")?
            .query_row(params![seq, user, id], |r| r.get(0))
            .optional()?;
        if hit.is_some() {
            return Ok(hit);
        }
    }
    Ok(conn
        .prepare_cached("SELECT device_seq FROM events WHERE user_id = ?1 AND id = ?2 AND indexed = 1")?
        .query_row(params![user, id], |r| r.get(0))
        .optional()?)
}

/// The rows of the event sent as `id`: its own row, or for a void of a use (one event on the
/// wire) the rows of the items it cancels, in device order. Empty when unknown.
pub(crate) fn find_rows(conn: &Connection, user: &str, id: &str) -> Result<Vec<i64>> {
    if let Some(seq) = find_event(conn, user, id)? {
        return Ok(vec![seq]);
    }
    Ok(conn
        .prepare_cached("SELECT device_seq FROM events WHERE user_id = ?1 AND use_id = ?2 AND voids IS NOT NULL ORDER BY device_seq")?
        .query_map(params![user, id], |r| r.get(0))?
        .collect::<rusqlite::Result<_>>()?)
}

/// How many of `user`'s events wait to be sent, counted as they are sent: a void of a use is one
/// event however many items it cancels.
pub(crate) fn pending_count(conn: &Connection, user: &str) -> Result<u64> {
    let n: i64 = conn
        .prepare_cached(concat!(
        "SELECT COUNT(CASE WHEN voids IS NULL OR use_id IS NULL THEN 1 END) + COUNT(DISTINCT CASE WHEN voids IS NOT NULL THEN use_id END)
         FROM events WHERE ",
        from_pending!(),
        " AND user_id = ?1 AND status = ?2"
    ))?
        .query_row(params![user, EventState::Pending], |r| r.get(0))?;
    Ok(u64::try_from(n).unwrap_or(0))
}

/// The SQL condition that bounds a scan of user `?1`'s unacknowledged events: every one of them
/// is at or after the user's `pending_from`.
macro_rules! from_pending {
    () => {
        "device_seq >= (SELECT pending_from FROM users WHERE id = ?1)"
    };
}
pub(crate) use from_pending;

/// Moves `user`'s `pending_from` on to their first unacknowledged event (past the ledger's end
/// when none is left), after acknowledgements.
pub(crate) fn advance_pending_from(conn: &Connection, user: &str) -> Result<()> {
    conn.prepare_cached(
        "UPDATE users SET pending_from = coalesce(
            (SELECT device_seq FROM events WHERE device_seq >= users.pending_from AND user_id = users.id AND status = ?2
              ORDER BY device_seq LIMIT 1),
            (SELECT coalesce(max(device_seq), 0) + 1 FROM events))
         WHERE id = ?1",
    )?
    .execute(params![user, EventState::Pending])?;
    Ok(())
}

/// Keeps the last sequence number in `device.seq` before events are deleted, so numbers are
/// never handed out twice (the server takes a reused number for a cloned install).
pub(crate) fn keep_seq_floor(conn: &Connection) -> Result<()> {
    let last = last_seq(conn)?;
    conn.prepare_cached("UPDATE device SET seq = ?1 WHERE singleton = 1")?.execute([last])?;
    Ok(())
}

/// The statement [`insert_event`] runs: prepared once per batch by its caller.
pub(crate) const INSERT_EVENT: &str =
    "INSERT INTO events (device_seq, user_id, id, feature, amount, occurred_at, device_id, model, input_tokens, output_tokens, cost_micros,
                         metadata, decision, status, lease_ver, lease_pool, lease_period, lease_start, lease_units, indexed,
                         count_period, count_start, count_amount, count_cost, use_id)
     VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7, ?8, ?9, ?10, ?11, ?12, ?13, ?14, ?15, ?16, ?17, ?18, ?19, ?20, ?21, ?22, ?23, ?24, ?25)";

/// What a recorded use adds to a counter row (written later, see [`crate::tail`]): the row's
/// period column and window start, units and micros.
pub(crate) struct Counted<'a> {
    pub(crate) period: &'a str,
    pub(crate) start: i64,
    pub(crate) amount: u64,
    pub(crate) cost: u64,
}

/// Inserts the event of a decided use as `seq` with `insert` (a statement of
/// [`INSERT_EVENT`]): its cost (micros), what it adds to a counter and to a lease pool, and,
/// for a keyed use, its decision (so a replay answers it again). An unkeyed use gets its
/// [`sequenced_id`] here.
#[allow(clippy::too_many_arguments)]
pub(crate) fn insert_event(
    insert: &mut rusqlite::Statement<'_>,
    user: &str,
    device: &str,
    u: &Use<'_>,
    d: &Decision,
    cost: Option<u64>,
    counted: Option<&Counted<'_>>,
    lease: Option<&crate::leases::LeaseUse>,
    now: DateTime<Utc>,
    seq: i64,
) -> Result<()> {
    let to_sql = |v: u64| i64::try_from(v).map_err(|_| Error::invalid("value out of range"));
    let (id, indexed) = match (u.keyed, sequenced_id(now, seq)) {
        (false, Some(id)) => (id, false),
        (false, None) => (Uuid::now_v7(), true),
        (true, _) => (u.id, true),
    };
    let mut text = Uuid::encode_buffer();
    insert.execute(params![
        seq,
        user,
        &*id.hyphenated().encode_lower(&mut text),
        u.feature,
        to_sql(u.amount)?,
        ms(now),
        device,
        u.model,
        u.input_tokens.map(to_sql).transpose()?,
        u.output_tokens.map(to_sql).transpose()?,
        cost.map(to_sql).transpose()?,
        u.metadata,
        if u.keyed { serde_json::to_string(d)? } else { String::new() },
        EventState::Pending,
        lease.map(|l| l.ver.unwrap_or(0)),
        lease.map(|l| l.pool.feature.as_str()),
        lease.map(|l| l.pool.period.as_str()),
        lease.map(|l| l.pool.counter_start()),
        lease.map_or(Ok(0), |l| to_sql(l.units))?,
        indexed,
        counted.map(|c| c.period),
        counted.map(|c| c.start),
        counted.map_or(Ok(0), |c| to_sql(c.amount))?,
        counted.map_or(Ok(0), |c| to_sql(c.cost))?,
        u.use_id.map(|id| id.to_string()),
    ])?;
    Ok(())
}

impl Tally {
    /// Number of events not yet acknowledged by a server.
    pub fn pending_events(&self, user_id: &str) -> Result<u64> {
        let g = self.lock();
        crate::users::get_user(&g.conn, user_id)?;
        pending_count(&g.conn, user_id)
    }

    /// Whether the server has taken event `id` (an id or idempotency key) of `user_id`.
    pub fn event_status(&self, user_id: &str, id: &str) -> Result<EventStatus> {
        let g = self.lock();
        let rows = find_rows(&g.conn, user_id, &event_id_for_key(id).to_string())?;
        let row: Option<(EventState, Option<RejectReason>)> = match rows.first() {
            Some(seq) => Some(
                g.conn
                    .query_row("SELECT status, reject_reason FROM events WHERE device_seq = ?1", [seq], |r| Ok((r.get(0)?, r.get(1)?)))?,
            ),
            None => None,
        };
        match row {
            None => Err(Error::NotFound(format!("event {id}"))),
            Some((EventState::Pending, _)) => Ok(EventStatus::Pending),
            Some((EventState::Settled, _)) => Ok(EventStatus::Settled),
            Some((EventState::Rejected, r)) => Ok(EventStatus::Rejected(r.map(|r| r.as_str().to_string()).unwrap_or_default())),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn event_states_and_reasons_round_trip_through_sqlite() {
        let c = Connection::open_in_memory().unwrap();
        for s in [EventState::Pending, EventState::Settled, EventState::Rejected] {
            let back: EventState = c.query_row("SELECT ?1", [s], |r| r.get(0)).unwrap();
            assert_eq!(back, s);
        }
        let stored: i64 = c.query_row("SELECT ?1", [EventState::Rejected], |r| r.get(0)).unwrap();
        assert_eq!(stored, 2, "the stored codes do not change");
        assert!(c.query_row("SELECT 7", [], |r| r.get::<_, EventState>(0)).is_err(), "an unknown state is an error, not a guess");
        for r in [RejectReason::TooLarge, RejectReason::Contract("invalid_text"), RejectReason::Server("conflict".into())] {
            let back: RejectReason = c.query_row("SELECT ?1", [&r], |row| row.get(0)).unwrap();
            assert_eq!(back, r);
        }
        let wire: String = c.query_row("SELECT ?1", [RejectReason::TooLarge], |r| r.get(0)).unwrap();
        assert_eq!(wire, "too_large");
    }

    #[test]
    fn keys_map_to_ids_and_the_contract_guards_every_use() {
        let u = Uuid::now_v7();
        assert_eq!(event_id_for_key(&u.to_string()), u, "a UUID key is the id");
        assert_eq!(event_id_for_key("req-1"), Uuid::new_v5(&KEY_NAMESPACE, b"req-1"), "others map to UUIDv5, stably");
        let keyed = UsageMeta { idempotency_key: Some("req-1".into()), ..UsageMeta::default() };
        let used = validate("ai_chat", 3, &keyed).unwrap();
        assert!(used.keyed && used.id == event_id_for_key("req-1"));
        assert!(validate("ai\0chat", 1, &UsageMeta::default()).is_err());
        assert!(validate("ai_chat", crate::contract::MAX_AMOUNT + 1, &UsageMeta::default()).is_err());
        let nul_key = UsageMeta { idempotency_key: Some("a\0".into()), ..UsageMeta::default() };
        assert!(validate("ai_chat", 1, &nul_key).is_err());
        assert_eq!(validate("ai_chat", 1, &UsageMeta::default()).unwrap().id, Uuid::nil(), "an unkeyed use gets its id when recorded");
        let nil = Uuid::nil().to_string();
        assert_eq!(event_id_for_key(&nil), Uuid::new_v5(&KEY_NAMESPACE, nil.as_bytes()), "the nil UUID is a key, not an id");
    }

    #[test]
    fn an_unkeyed_id_is_a_uuid_v7_of_its_time_carrying_its_sequence_number() {
        let at = DateTime::from_timestamp_millis(1_767_225_600_123).unwrap();
        let (a, b) = (sequenced_id(at, 42).unwrap(), sequenced_id(at, 42).unwrap());
        assert_ne!(a, b, "random apart from time and number");
        for id in [a, b] {
            assert_eq!(id.get_version_num(), 7);
            assert_eq!(id.get_variant(), uuid::Variant::RFC4122);
            let (secs, nanos) = id.get_timestamp().unwrap().to_unix();
            assert_eq!(secs * 1000 + u64::from(nanos) / 1_000_000, 1_767_225_600_123);
            assert_eq!(seq_in_id(&id), Some(42));
        }
        assert_eq!(seq_in_id(&sequenced_id(at, i64::from(u32::MAX)).unwrap()), Some(i64::from(u32::MAX)));
        assert!(sequenced_id(at, i64::from(u32::MAX) + 1).is_none(), "a number past 32 bits is indexed instead");
        assert!(sequenced_id(at, -1).is_none());
        assert_eq!(seq_in_id(&Uuid::new_v5(&KEY_NAMESPACE, b"k")), None, "only v7 ids carry one");
    }
}
