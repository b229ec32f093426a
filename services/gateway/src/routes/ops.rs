//! Health, readiness, metrics and the OpenAPI document.

use std::sync::Arc;
use std::time::Duration;

use axum::extract::State;
use axum::http::{header, StatusCode};
use axum::response::{IntoResponse, Response};
use axum::Json;
use serde_json::{json, Value};

use crate::error::ApiError;
use crate::health;
use crate::state::AppState;

/// Readiness fails when the applier is further behind the stream than this.
const READY_MAX_APPLY_LAG: u64 = 10_000;

pub async fn healthz() -> Json<Value> {
    Json(json!({"status": "ok"}))
}

/// Ready when the store and NATS answer, no applied stream (own or mirror) lags its
/// applier by more than [`READY_MAX_APPLY_LAG`], and every mirror is healthy (see
/// [`health::mirror_problems`]); otherwise 503 with each reason.
pub async fn readyz(State(s): State<Arc<AppState>>) -> (StatusCode, Json<Value>) {
    let nats = s.bus.ping().await;
    let streams = health::streams(&s).await;
    let mut problems = Vec::new();
    if let Err(e) = &nats {
        problems.push(format!("nats: {e}"));
    }
    let mut own_lag = None;
    match &streams {
        Err(e) => problems.push(format!("store: {}", e.message)),
        Ok(streams) => {
            for h in streams {
                if !h.mirror {
                    own_lag = h.apply_lag;
                }
                if let Some(lag) = h.apply_lag.filter(|&l| l > READY_MAX_APPLY_LAG) {
                    problems.push(format!(
                        "stream {}: apply lag {lag} above {READY_MAX_APPLY_LAG}",
                        h.stream
                    ));
                }
            }
            problems.extend(health::mirror_problems(
                streams,
                Duration::from_secs(s.cfg.mirror_unhealthy_after_s),
            ));
        }
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
            "apply_lag": own_lag,
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
