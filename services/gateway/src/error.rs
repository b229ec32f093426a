//! Errors: `GatewayError` for starting and running the role, `ApiError` for answering a
//! request. This is the one place library errors become HTTP statuses.

use axum::http::{HeaderValue, StatusCode};
use axum::response::{IntoResponse, Response};
use meridian_bus::BusError;
use meridian_model::ModelError;
use meridian_store::StoreError;
use serde_json::{json, Map, Value};

#[derive(Debug, thiserror::Error)]
pub enum GatewayError {
    #[error("invalid config field {field}: {reason}")]
    Config { field: &'static str, reason: String },
    #[error("cannot listen on {addr}: {source}")]
    Bind {
        addr: std::net::SocketAddr,
        source: std::io::Error,
    },
    #[error("server failed: {0}")]
    Serve(std::io::Error),
    #[error(transparent)]
    Bus(#[from] BusError),
    #[error(transparent)]
    Store(#[from] StoreError),
}

/// An error answer: `{"error": code, "message": text, ...extra}` with a status.
#[derive(Debug)]
pub struct ApiError {
    pub status: StatusCode,
    pub code: &'static str,
    pub message: String,
    pub extra: Map<String, Value>,
    pub retry_after_s: Option<u64>,
}

pub type ApiResult<T> = Result<T, ApiError>;

impl ApiError {
    pub fn new(status: StatusCode, code: &'static str, message: impl Into<String>) -> Self {
        Self {
            status,
            code,
            message: message.into(),
            extra: Map::new(),
            retry_after_s: None,
        }
    }
    pub fn with(mut self, key: &str, value: impl Into<Value>) -> Self {
        self.extra.insert(key.to_string(), value.into());
        self
    }
    pub fn bad_request(code: &'static str, message: impl Into<String>) -> Self {
        Self::new(StatusCode::BAD_REQUEST, code, message)
    }
    pub fn unauthorized(message: impl Into<String>) -> Self {
        Self::new(StatusCode::UNAUTHORIZED, "unauthorized", message)
    }
    pub fn forbidden(message: impl Into<String>) -> Self {
        Self::new(StatusCode::FORBIDDEN, "forbidden", message)
    }
    /// Also what a non-member gets, so it learns nothing about the conversation.
    pub fn conversation_not_found() -> Self {
        Self::new(
            StatusCode::NOT_FOUND,
            "conversation_not_found",
            "no such conversation",
        )
    }
    pub fn not_found(code: &'static str, message: impl Into<String>) -> Self {
        Self::new(StatusCode::NOT_FOUND, code, message)
    }
    pub fn unavailable(message: impl Into<String>) -> Self {
        Self::new(StatusCode::SERVICE_UNAVAILABLE, "unavailable", message).retry_after(1)
    }
    /// The caller's rate limit is spent; `wait` is when the next call would pass. Both
    /// transports carry `retry_after_ms` in the body (a WebSocket has no headers), HTTP also
    /// the `Retry-After` header.
    pub fn rate_limited(wait: std::time::Duration) -> Self {
        let ms = u64::try_from(wait.as_millis()).unwrap_or(u64::MAX).max(1);
        Self::new(
            StatusCode::TOO_MANY_REQUESTS,
            "rate_limited",
            "too many requests; slow down",
        )
        .with("retry_after_ms", ms)
        .retry_after(ms.div_ceil(1000))
    }
    /// A request body or message over the size limit (`limit` bytes).
    pub fn too_large(what: &str, limit: usize) -> Self {
        Self::new(
            StatusCode::PAYLOAD_TOO_LARGE,
            "too_large",
            format!("{what} exceeds {limit} bytes"),
        )
        .with("limit_bytes", limit)
    }
    pub fn retry_after(mut self, seconds: u64) -> Self {
        self.retry_after_s = Some(seconds);
        self
    }
}

impl IntoResponse for ApiError {
    fn into_response(self) -> Response {
        let mut body = self.extra;
        body.insert("error".into(), json!(self.code));
        body.insert("message".into(), json!(self.message));
        let mut resp = (self.status, axum::Json(Value::Object(body))).into_response();
        if let Some(s) = self.retry_after_s {
            resp.headers_mut()
                .insert(axum::http::header::RETRY_AFTER, HeaderValue::from(s));
        }
        resp
    }
}

impl From<ModelError> for ApiError {
    fn from(e: ModelError) -> Self {
        let ModelError::Invalid { field, reason } = &e;
        ApiError::bad_request("invalid_argument", e.to_string())
            .with("field", field.to_string())
            .with("reason", reason.to_string())
    }
}

impl From<StoreError> for ApiError {
    fn from(e: StoreError) -> Self {
        match e {
            // A cursor or id that decodes badly is the client's mistake.
            StoreError::Model(m) => m.into(),
            other => {
                tracing::error!(error = %other, "store call failed");
                ApiError::unavailable("the store is unavailable, retry later")
            }
        }
    }
}

impl From<meridian_search::SearchError> for ApiError {
    fn from(e: meridian_search::SearchError) -> Self {
        match e {
            meridian_search::SearchError::Store(s) => s.into(),
            other => {
                tracing::error!(error = %other, "search failed");
                ApiError::unavailable("search is unavailable, retry later")
            }
        }
    }
}

impl From<BusError> for ApiError {
    fn from(e: BusError) -> Self {
        tracing::error!(error = %e, "publish failed");
        // Not acknowledged, so the client retries with the same client_msg_id.
        ApiError::unavailable("the event stream is unavailable; retry with the same ids")
    }
}
