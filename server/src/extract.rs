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

/// A shape error's message naming the field, without serde's own wording.
pub fn field_message(e: &serde_json::Error) -> String {
    let text = e.to_string();
    let field = text.split('`').nth(1).filter(|f| !f.is_empty() && f.len() <= 64);
    match field {
        Some(f) if text.starts_with("missing field") => format!("{f} is missing"),
        Some(f) if text.starts_with("unknown field") => format!("{f} is not a field of this request"),
        _ => "the body does not have the expected fields and types".into(),
    }
}

/// Parses `bytes` as JSON into `T`: syntax errors are 400 `malformed_json`, shape errors 422.
pub fn parse_json<T: DeserializeOwned>(bytes: &[u8]) -> Result<T, ApiError> {
    serde_json::from_slice(bytes).map_err(|e| match e.classify() {
        serde_json::error::Category::Data => ApiError::Invalid("invalid_body", field_message(&e)),
        _ => ApiError::BadRequest("malformed_json", format!("malformed JSON: {e}")),
    })
}

impl<S: Send + Sync, T: DeserializeOwned> FromRequest<S> for JsonBody<T> {
    type Rejection = ApiError;
    async fn from_request(req: Request, state: &S) -> Result<Self, ApiError> {
        let bytes = body_bytes(req, state).await?;
        if bytes.is_empty() {
            return Err(ApiError::BadRequest("malformed_json", "expected a JSON body".into()));
        }
        // Text that Postgres cannot store (U+0000) is refused here, naming nothing else.
        let v: serde_json::Value = parse_json(&bytes)?;
        if tally_core::contract::json_has_nul(&v) {
            return Err(ApiError::Invalid("invalid_text", "text must not contain U+0000".into()));
        }
        serde_json::from_value(v).map(JsonBody).map_err(|e| ApiError::Invalid("invalid_body", field_message(&e)))
    }
}
