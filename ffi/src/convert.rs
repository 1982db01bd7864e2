//! Conversions at the boundary: Unix milliseconds, JSON strings, and the signed integers of the
//! foreign API (Kotlin `Long`, Swift `Int64`) for the core's unsigned counts.

use crate::error::TallyError;
use chrono::{DateTime, Utc};
use serde_json::{Map, Value};

pub(crate) fn to_ms(t: DateTime<Utc>) -> i64 {
    t.timestamp_millis()
}

pub(crate) fn opt_ms(t: Option<DateTime<Utc>>) -> Option<i64> {
    t.map(to_ms)
}

/// Unix milliseconds → UTC instant (`InvalidInput` when out of range).
pub fn from_ms(ms: i64, name: &str) -> Result<DateTime<Utc>, TallyError> {
    DateTime::from_timestamp_millis(ms).ok_or_else(|| TallyError::invalid(format!("{name}: {ms} is not a valid Unix time in milliseconds")))
}

pub(crate) fn from_opt_ms(ms: Option<i64>, name: &str) -> Result<Option<DateTime<Utc>>, TallyError> {
    ms.map(|v| from_ms(v, name)).transpose()
}

/// A count the core keeps unsigned, as the foreign side's signed 64-bit integer (a value past
/// `i64::MAX`, which no count reaches, saturates).
pub(crate) fn signed(v: u64) -> i64 {
    i64::try_from(v).unwrap_or(i64::MAX)
}

pub(crate) fn opt_signed(v: Option<u64>) -> Option<i64> {
    v.map(signed)
}

/// A foreign signed integer for the core: a negative one is `InvalidInput` naming `name`.
pub fn unsigned(v: i64, name: &str) -> Result<u64, TallyError> {
    u64::try_from(v).map_err(|_| TallyError::invalid(format!("{name} must not be negative, got {v}")))
}

pub(crate) fn opt_unsigned(v: Option<i64>, name: &str) -> Result<Option<u64>, TallyError> {
    v.map(|v| unsigned(v, name)).transpose()
}

/// Parses a JSON value given as a string (`InvalidInput` naming `what` when malformed).
pub fn parse_json(text: &str, what: &str) -> Result<Value, TallyError> {
    serde_json::from_str(text).map_err(|e| TallyError::invalid(format!("{what} is not valid JSON: {e}")))
}

/// Parses a JSON object given as a string.
pub fn parse_json_object(text: &str, what: &str) -> Result<Map<String, Value>, TallyError> {
    match parse_json(text, what)? {
        Value::Object(m) => Ok(m),
        other => Err(TallyError::invalid(format!("{what} must be a JSON object, got {}", json_kind(&other)))),
    }
}

fn json_kind(v: &Value) -> &'static str {
    match v {
        Value::Null => "null",
        Value::Bool(_) => "a boolean",
        Value::Number(_) => "a number",
        Value::String(_) => "a string",
        Value::Array(_) => "an array",
        Value::Object(_) => "an object",
    }
}

/// A JSON object as a string.
pub(crate) fn object_json(m: Map<String, Value>) -> String {
    Value::Object(m).to_string()
}
