//! Health, readiness, metrics and the OpenAPI document.

use std::sync::Arc;

use axum::extract::State;
use axum::http::{header, StatusCode};
use axum::response::{IntoResponse, Response};
use axum::Json;
use serde_json::{json, Value};

use crate::error::ApiError;
use crate::state::AppState;

/// Readiness fails when the applier is further behind the stream than this.
const READY_MAX_APPLY_LAG: u64 = 10_000;

pub async fn healthz() -> Json<Value> {
    Json(json!({"status": "ok"}))
}

pub async fn readyz(State(s): State<Arc<AppState>>) -> (StatusCode, Json<Value>) {
    let stream = s.bus.stream();
    let store = s.store.stream_checkpoint(&stream).await;
    let nats = s.bus.ping().await;
    let state = s.bus.stream_state(&stream).await;
    let mut problems = Vec::new();
    if let Err(e) = &store {
        problems.push(format!("store: {e}"));
    }
    if let Err(e) = &nats {
        problems.push(format!("nats: {e}"));
    }
    let lag = match (&store, &state) {
        (Ok(cp), Ok(st)) => Some(st.last_seq.saturating_sub(crate::state::applied_in(cp, st))),
        _ => None,
    };
    if lag.is_some_and(|l| l > READY_MAX_APPLY_LAG) {
        problems.push(format!(
            "apply lag {} above {READY_MAX_APPLY_LAG}",
            lag.unwrap_or(0)
        ));
    }
    let status = if problems.is_empty() {
        StatusCode::OK
    } else {
        StatusCode::SERVICE_UNAVAILABLE
    };
    (
        status,
        Json(json!({
            "status": if problems.is_empty() { "ready" } else { "not_ready" },
            "region": s.cfg.region.as_str(),
            "apply_lag": lag,
            "problems": problems,
        })),
    )
}

/// The process registry in the OpenMetrics text format (Prometheus scrapes it as is).
pub async fn metrics(State(s): State<Arc<AppState>>) -> Response {
    s.metrics
        .online_users
        .set(i64::try_from(s.hub.online_users()).unwrap_or(i64::MAX));
    let mut out = String::new();
    if prometheus_client::encoding::text::encode(&mut out, &s.registry).is_err() {
        return ApiError::new(
            StatusCode::INTERNAL_SERVER_ERROR,
            "internal",
            "encoding the metrics failed",
        )
        .into_response();
    }
    (
        [(
            header::CONTENT_TYPE,
            "application/openmetrics-text; version=1.0.0; charset=utf-8",
        )],
        out,
    )
        .into_response()
}

pub async fn openapi(State(s): State<Arc<AppState>>) -> Json<Value> {
    Json(super::openapi_document(&s.cfg))
}
