//! `Idempotency-Key` on the POSTs that create something (a conversation, memberships): a
//! client retrying after a timeout gets the first answer and changes nothing.
//!
//! The key is scoped to the caller and the route (method and concrete path). Its record lives
//! in the store (`Store::claim_request`), so it outlives a gateway restart, and it names the
//! event the request publishes: an attempt that takes over a crashed one publishes the same
//! event, which the stream and the applier deduplicate. Concurrent attempts with one key:
//! one runs, the others are answered `409 idempotency_in_progress` (retry shortly). The same
//! key with a different request is `409 idempotency_conflict`. Refused requests (4xx) leave
//! no record, so a corrected request may reuse the key.

use std::sync::Arc;

use axum::extract::FromRequestParts;
use axum::http::request::Parts;
use axum::http::{HeaderValue, StatusCode};
use axum::response::{IntoResponse, Response};
use meridian_model::EventId;
use meridian_store::requests::{RequestClaim, RequestKey};
use serde::Serialize;
use serde_json::Value;
use sha2::{Digest, Sha256};

use crate::error::{ApiError, ApiResult};
use crate::extract::Caller;
use crate::state::AppState;

/// The request header.
pub const HEADER: &str = "idempotency-key";
/// Set on an answer replayed from the record.
pub const REPLAYED_HEADER: &str = "idempotent-replayed";
/// Longest key: 255 visible ASCII characters (a UUID is 36).
pub const MAX_KEY_LEN: usize = 255;
/// How long one attempt holds its key before a retry may take over (with the same event,
/// so a takeover is safe whatever the first attempt did).
const LEASE_MS: u64 = 30_000;

/// The optional `Idempotency-Key` header; a malformed one is a 400, not ignored.
pub struct IdempotencyKey(pub Option<String>);

impl<S: Send + Sync> FromRequestParts<S> for IdempotencyKey {
    type Rejection = ApiError;

    async fn from_request_parts(parts: &mut Parts, _: &S) -> Result<Self, ApiError> {
        let Some(v) = parts.headers.get(HEADER) else {
            return Ok(IdempotencyKey(None));
        };
        let valid =
            v.len() <= MAX_KEY_LEN && !v.is_empty() && v.as_bytes().iter().all(|b| (0x21..=0x7e).contains(b));
        if !valid {
            return Err(ApiError::bad_request(
                "invalid_argument",
                format!("Idempotency-Key must be 1-{MAX_KEY_LEN} visible ASCII characters"),
            )
            .with("field", "Idempotency-Key"));
        }
        Ok(IdempotencyKey(v.to_str().ok().map(str::to_string)))
    }
}

/// A digest of the request, to tell a retry from another request reusing the key.
pub fn fingerprint(request: &impl Serialize) -> Vec<u8> {
    let bytes = serde_json::to_vec(request).unwrap_or_default();
    Sha256::digest(bytes).to_vec()
}

/// Runs `handler` (given the event id to publish) at most once per key: without a key it
/// just runs with a fresh id.
pub async fn once<F, Fut>(
    s: &Arc<AppState>,
    caller: &Caller,
    route: &str,
    key: IdempotencyKey,
    fingerprint: &[u8],
    handler: F,
) -> ApiResult<Response>
where
    F: FnOnce(EventId) -> Fut,
    Fut: std::future::Future<Output = ApiResult<(StatusCode, Value)>>,
{
    let Some(key) = key.0 else {
        let (status, body) = handler(EventId::new_v7()).await?;
        return Ok((status, axum::Json(body)).into_response());
    };
    let req = RequestKey {
        user: &caller.user,
        route,
        key: &key,
    };
    let now = crate::live::now_ms();
    match s.store.claim_request(&req, fingerprint, now, LEASE_MS).await? {
        RequestClaim::Run { event_id } => match handler(event_id).await {
            Ok((status, body)) => {
                let bytes = serde_json::to_vec(&body).unwrap_or_default();
                if let Err(e) = s.store.finish_request(&req, status.as_u16(), bytes).await {
                    // The change is made; a retry takes the claim over and answers from the
                    // store again, publishing the same event (a no-op).
                    tracing::warn!(error = %e, "recording an idempotent answer failed");
                }
                Ok((status, axum::Json(body)).into_response())
            }
            Err(e) => {
                let forget = e.status.is_client_error();
                if let Err(store) = s.store.abandon_request(&req, forget).await {
                    tracing::warn!(error = %store, "releasing an idempotency key failed");
                }
                Err(e)
            }
        },
        RequestClaim::Answered { status, answer } => {
            let status = StatusCode::from_u16(status).unwrap_or(StatusCode::OK);
            let body: Value = serde_json::from_slice(&answer).unwrap_or(Value::Null);
            let mut resp = (status, axum::Json(body)).into_response();
            resp.headers_mut()
                .insert(REPLAYED_HEADER, HeaderValue::from_static("true"));
            Ok(resp)
        }
        RequestClaim::InProgress => Err(ApiError::new(
            StatusCode::CONFLICT,
            "idempotency_in_progress",
            "a request with this Idempotency-Key is still running; retry shortly",
        )
        .retry_after(1)),
        RequestClaim::Mismatch => Err(ApiError::new(
            StatusCode::CONFLICT,
            "idempotency_conflict",
            "this Idempotency-Key was used with a different request",
        )),
    }
}
