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

/// Parses `bytes` as JSON into `T`: syntax errors are 400 `malformed_json`, shape errors 422.
pub fn parse_json<T: DeserializeOwned>(bytes: &[u8]) -> Result<T, ApiError> {
    serde_json::from_slice(bytes).map_err(|e| match e.classify() {
        serde_json::error::Category::Data => ApiError::Invalid("invalid_body", e.to_string()),
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
        parse_json(&bytes).map(JsonBody)
    }
}
