//! Health, readiness, metrics and the OpenAPI document.

use std::sync::Arc;
use std::time::Duration;

use axum::extract::State;
use axum::http::{header, StatusCode};
use axum::response::{IntoResponse, Response};
use axum::Json;
use serde::Deserialize;
use serde_json::{json, Value};

use crate::error::ApiError;
use crate::extract::ApiQuery;
use crate::health;
use crate::state::AppState;

/// Readiness fails when the applier is further behind the stream than this.
const READY_MAX_APPLY_LAG: u64 = 10_000;

pub async fn healthz() -> Json<Value> {
    Json(json!({"status": "ok"}))
}

/// What `/readyz` judges: the whole region (default), or with `?scope=local` only what this
/// region needs to serve its own users.
#[derive(Deserialize, Default, Clone, Copy, PartialEq, Eq)]
#[serde(rename_all = "lowercase")]
pub enum ReadyScope {
    #[default]
    Region,
    Local,
}

#[derive(Deserialize)]
pub struct ReadyQuery {
    #[serde(default)]
    scope: ReadyScope,
}

/// Ready when the store and NATS answer, no applied stream (own or mirror) lags its
/// applier by more than [`READY_MAX_APPLY_LAG`], and every mirror is healthy (see
/// [`health::mirror_problems`]); otherwise 503 with each reason.
///
/// `?scope=local` leaves the mirrors out (their apply lag and their health): a cut link
/// between regions must not take a region's gateways out of its load balancer, since each
/// region keeps serving its own users through a partition (docs/design.md §5). Load
/// balancers and Kubernetes readiness probes use it; operators and launchers that want to
/// know the region is replicating use the default.
pub async fn readyz(
    State(s): State<Arc<AppState>>,
    ApiQuery(q): ApiQuery<ReadyQuery>,
) -> (StatusCode, Json<Value>) {
    let local = q.scope == ReadyScope::Local;
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
                } else if local {
                    continue;
                }
                if let Some(lag) = h.apply_lag.filter(|&l| l > READY_MAX_APPLY_LAG) {
                    problems.push(format!(
                        "stream {}: apply lag {lag} above {READY_MAX_APPLY_LAG}",
                        h.stream
                    ));
                }
            }
            if !local {
                problems.extend(health::mirror_problems(
                    streams,
                    Duration::from_secs(s.cfg.mirror_unhealthy_after_s),
                ));
            }
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
