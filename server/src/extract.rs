//! Request body extraction with the API's error format: malformed JSON is a 400, a body of the
//! wrong shape a 422, an oversized body a 413.

use crate::error::ApiError;
use axum::body::Bytes;
use axum::extract::{FromRequest, Request};
use axum::http::StatusCode;
use serde::de::DeserializeOwned;

/// A JSON body deserialized into `T`.
pub struct JsonBody<T>(pub T);

/// Reads the raw body, mapping a too-large body to 413.
pub async fn body_bytes<S: Send + Sync>(req: Request, state: &S) -> Result<Bytes, ApiError> {
    Bytes::from_request(req, state).await.map_err(|e| {
        if e.status() == StatusCode::PAYLOAD_TOO_LARGE {
            ApiError::TooLarge("request body exceeds the configured maximum (TALLY_MAX_BODY_BYTES)".into())
        } else {
            ApiError::BadRequest("bad_request", e.body_text())
        }
    })
}

/// Parses `bytes` as JSON into `T`: syntax errors are 400 `malformed_json`, shape errors 422
/// `invalid_body` with a message naming the field (`occurred_at is missing`).
pub fn parse_json<T: DeserializeOwned>(bytes: &[u8]) -> Result<T, ApiError> {
    let mut de = serde_json::Deserializer::from_slice(bytes);
    let value = serde_path_to_error::deserialize::<_, T>(&mut de).map_err(|e| {
        let path = e.path().to_string();
        let inner = e.into_inner();
        match inner.classify() {
            serde_json::error::Category::Data => ApiError::Invalid("invalid_body", describe(&path, &inner.to_string())),
            _ => malformed(&inner),
        }
    })?;
    de.end().map_err(|e| malformed(&e))?;
    Ok(value)
}

/// A shape error's message naming the field (without its path), without serde's own wording.
pub fn field_message(e: &serde_json::Error) -> String {
    describe("", &e.to_string())
}

/// Converts a parsed JSON value into `T`; a shape error is a 422 `invalid_body` naming the field.
pub fn from_value<T: DeserializeOwned>(v: serde_json::Value) -> Result<T, ApiError> {
    serde_path_to_error::deserialize::<_, T>(v).map_err(|e| {
        let path = e.path().to_string();
        ApiError::Invalid("invalid_body", describe(&path, &e.into_inner().to_string()))
    })
}

fn malformed(e: &serde_json::Error) -> ApiError {
    let what = match e.classify() {
        serde_json::error::Category::Eof => "the JSON ends too early",
        _ => "the body is not valid JSON",
    };
    ApiError::BadRequest("malformed_json", format!("malformed JSON: {what} (line {}, column {})", e.line(), e.column()))
}

/// A plain-words name of what serde expected (`u64` → `a non-negative integer`).
fn expected_words(exp: &str) -> String {
    let exp = exp.trim().trim_end_matches('.');
    match exp {
        "u8" | "u16" | "u32" | "u64" | "u128" | "usize" => "a non-negative integer".into(),
        "i8" | "i16" | "i32" | "i64" | "i128" | "isize" => "an integer".into(),
        "f32" | "f64" => "a number".into(),
        "a boolean" | "a string" | "a sequence" | "a map" => exp.replace("a sequence", "an array").replace("a map", "an object"),
        e if e.starts_with("struct ") || e.starts_with("a map") => "an object".into(),
        e if e.starts_with("a sequence") || e.starts_with("a tuple") => "an array".into(),
        e => e.into(),
    }
}

fn between<'a>(s: &'a str, start: &str) -> Option<&'a str> {
    let rest = &s[s.find(start)? + start.len()..];
    Some(&rest[..rest.find('`')?])
}

/// Turns a serde message about the value at `path` into one that names the field and says what
/// is wrong, without echoing serde's wording or the offending value.
pub fn describe(path: &str, serde_msg: &str) -> String {
    // Drop serde_json's position suffix.
    let msg = serde_msg.split(" at line ").next().unwrap_or(serde_msg);
    let field = |name: &str| if path.is_empty() || path == "." { name.to_string() } else { format!("{path}.{name}") };
    let here = if path.is_empty() || path == "." { "the body".to_string() } else { path.to_string() };
    if let Some(name) = msg.strip_prefix("missing field `").and_then(|r| r.strip_suffix('`')) {
        return format!("{} is missing", field(name));
    }
    if msg.starts_with("unknown field `") {
        let name = between(msg, "unknown field `").unwrap_or("?");
        let known = msg.split_once("expected ").map(|(_, e)| e.replace('`', "")).unwrap_or_default();
        let at = if path.ends_with(name) { path.to_string() } else { field(name) };
        return if known.is_empty() {
            format!("{at} is not a known field")
        } else {
            format!("{at} is not a known field (expected {known})")
        };
    }
    if msg.starts_with("duplicate field `") {
        return format!("{} is given twice", field(between(msg, "duplicate field `").unwrap_or("?")));
    }
    if msg.starts_with("unknown variant `") {
        let known = msg.split_once("expected ").map(|(_, e)| e.replace('`', "")).unwrap_or_default();
        return format!("{here} must be {known}");
    }
    if msg.starts_with("invalid type:") || msg.starts_with("invalid value:") {
        let exp = msg.split_once(", expected ").map(|(_, e)| expected_words(e)).unwrap_or_else(|| "of another type".into());
        return format!("{here} must be {exp}");
    }
    if msg.starts_with("invalid length") {
        let exp = msg.split_once(", expected ").map(|(_, e)| e.to_string()).unwrap_or_default();
        return format!("{here} has the wrong number of elements (expected {exp})");
    }
    // A type's own message (a time, a UUID): keep it, after the field.
    format!("{here} is invalid: {msg}")
}

/// Query parameters deserialized into `T`; a bad parameter is a 422 naming it.
pub struct QueryParams<T>(pub T);

impl<S: Send + Sync, T: DeserializeOwned> axum::extract::FromRequestParts<S> for QueryParams<T> {
    type Rejection = ApiError;
    async fn from_request_parts(parts: &mut axum::http::request::Parts, _: &S) -> Result<Self, ApiError> {
        let q = parts.uri.query().unwrap_or("");
        let de = serde_urlencoded::Deserializer::new(form_urlencoded::parse(q.as_bytes()));
        serde_path_to_error::deserialize::<_, T>(de).map(QueryParams).map_err(|e| {
            let path = e.path().to_string();
            ApiError::Invalid("invalid_query", describe(&path, &e.into_inner().to_string()).replace("the body", "the query"))
        })
    }
}

impl<S: Send + Sync, T: DeserializeOwned> FromRequest<S> for JsonBody<T> {
    type Rejection = ApiError;
    async fn from_request(req: Request, state: &S) -> Result<Self, ApiError> {
        let bytes = body_bytes(req, state).await?;
        json_body(&bytes).map(JsonBody)
    }
}

/// Reads a [`JsonBody`]: an empty body or malformed JSON is 400 `malformed_json`, text with
/// U+0000 422 `invalid_text`, a wrong shape 422 `invalid_body`.
pub fn json_body<T: DeserializeOwned>(bytes: &[u8]) -> Result<T, ApiError> {
    if bytes.is_empty() {
        return Err(ApiError::BadRequest("malformed_json", "expected a JSON body".into()));
    }
    // Text that Postgres cannot store (U+0000) is refused here, naming nothing else.
    let v: serde_json::Value = parse_json(bytes)?;
    if tally_core::contract::json_has_nul(&v) {
        return Err(ApiError::Invalid("invalid_text", "text must not contain U+0000".into()));
    }
    from_value(v)
}
