//! Meridian's gateway: the HTTP + WebSocket API of one region (docs/api.md). It validates and
//! authorizes, stamps events (id, HLC, origin) and publishes them to the region's stream,
//! answers reads from the region's store, and delivers inbox entries live over WebSockets.
//! It knows nothing of key layouts: reads go through `meridian_store::Store`'s views.
//!
//! # Layout
//! - [`config`]: `GatewayConfig`, validated at start.
//! - [`auth`]: HS256 tokens and the admin key.
//! - [`extract`]: extractors answering bad input with JSON errors (body limit, auth, 421).
//! - [`error`]: `ApiError` (the one place errors become statuses) and `GatewayError`.
//! - [`health`]: the own stream and each mirror: positions, apply lag, mirror lag and
//!   active age (admin regions, readiness).
//! - [`idempotency`]: `Idempotency-Key` on the POSTs that create something.
//! - [`state`]: shared state, publishing, read-your-writes waits, rate limits, metrics.
//! - [`service`]: what a call does whatever its transport (limits, membership, send, inbox
//!   pages, typing, socket cap); HTTP handlers and WebSocket frames both go through it.
//! - [`routes`]: the route table (router and OpenAPI from one list) and the handlers.
//! - [`ws`]: the WebSocket: replay, live entries in seq order with gap fill, token expiry,
//!   frames handed to the service layer.
//! - [`live`]: presence of this gateway's connections, and the fence that closes the sockets
//!   of users now served by another region.
//! - [`regions`]: typing and presence across regions (core NATS, never stored).
//! - [`render`]: store views as API JSON.
//! - [`console`]: the operator console at `/console`, its live feed, actions and drill reports.

pub mod auth;
pub mod config;
pub mod console;
pub mod durability;
pub mod error;
pub mod extract;
pub mod fence;
pub mod health;
pub mod idempotency;
pub mod live;
pub mod regions;
pub mod render;
pub mod routes;
pub mod service;
pub mod state;
pub mod ws;

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Instant;

use axum::extract::{DefaultBodyLimit, MatchedPath, Request, State};
use axum::http::StatusCode;
use axum::middleware::Next;
use axum::response::Response;
use axum::Router;
use meridian_bus::Bus;
use meridian_model::HybridClock;
use meridian_store::Store;
use meridian_telemetry::{Role, SpanKind};
use tokio::net::TcpListener;
use tokio_util::sync::CancellationToken;
use tracing::Instrument as _;

pub use config::GatewayConfig;
pub use error::{ApiError, GatewayError};
use state::{AppState, GatewayMetrics, RateLimiter};

/// A gateway bound to its port, not yet serving.
pub struct Gateway {
    listener: TcpListener,
    state: AppState,
    /// This region's presence requests, subscribed at bind so other regions are answered
    /// as soon as the gateway serves.
    presence_requests: async_nats::Subscriber,
}

impl Gateway {
    pub async fn bind(
        cfg: GatewayConfig,
        store: Store,
        bus: Bus,
        shutdown: CancellationToken,
    ) -> Result<Gateway, GatewayError> {
        cfg.validate()?;
        let listener = TcpListener::bind(cfg.listen)
            .await
            .map_err(|source| GatewayError::Bind {
                addr: cfg.listen,
                source,
            })?;
        let live_bus = bus.connect_bounded(cfg.ws_subscription_capacity).await?;
        let presence_requests = bus.subscribe(bus.presence_subject(&cfg.region)).await?;
        let clock = HybridClock::with_offset_ms(cfg.clock_offset_ms);
        // Start above everything applied, so a restart on a wall clock that stepped back
        // never stamps below what is stored (docs/design.md §4).
        let applied = store.max_applied_hlc().await?;
        clock.observe(applied);
        let metrics = GatewayMetrics::default();
        let mut registry = prometheus_client::registry::Registry::default();
        metrics.register(&mut registry);
        let group_commit = cfg.durability.fsyncs().then(|| {
            durability::GroupCommit::start(
                bus.clone(),
                std::time::Duration::from_micros(cfg.group_commit_window_us),
                metrics.publish_batches.clone(),
            )
        });
        let geo = durability::GeoAcks::start(bus.clone());
        let state = AppState {
            group_commit,
            geo,
            limiter: RateLimiter::new(cfg.rate_limit_per_s, cfg.rate_limit_burst),
            cfg,
            store,
            bus,
            live_bus,
            clock,
            hub: Arc::new(live::Hub::default()),
            metrics,
            started: Instant::now(),
            shutdown,
            registry,
            fence: Default::default(),
            console: Default::default(),
            search: None,
        };
        Ok(Gateway {
            listener,
            state,
            presence_requests,
        })
    }

    pub fn local_addr(&self) -> SocketAddr {
        self.listener
            .local_addr()
            .expect("a bound listener has an address")
    }

    /// Who is connected here: the region process hands it to push as its presence source.
    pub fn hub(&self) -> Arc<live::Hub> {
        self.state.hub.clone()
    }

    /// Serves `GET /v1/search` from this index (the region process runs its indexer).
    pub fn set_search(&mut self, search: meridian_search::Search) {
        self.state.search = Some(search);
    }

    /// The process's metrics registry, which `/metrics` encodes: roles running beside the
    /// gateway register theirs here before [`Gateway::run`].
    pub fn metrics_registry(&mut self) -> &mut prometheus_client::registry::Registry {
        &mut self.state.registry
    }

    /// Serves until `shutdown`; then stops accepting, lets requests in flight finish (their
    /// publishes complete) and closes WebSockets. The fence and the presence responder run
    /// beside it and stop with it.
    pub async fn run(self) -> Result<(), GatewayError> {
        let shutdown = self.state.shutdown.clone();
        let fence = tokio::spawn(live::run_fence(
            self.state.cfg.clone(),
            self.state.store.clone(),
            self.state.hub.clone(),
            shutdown.clone(),
        ));
        let presence = tokio::spawn(regions::run_presence_responder(
            self.state.bus.clone(),
            self.presence_requests,
            self.state.hub.clone(),
            shutdown.clone(),
        ));
        let state = Arc::new(self.state);
        let fence_after_hang = tokio::spawn(fence::watch(state.clone(), shutdown.clone()));
        let console_sampler = tokio::spawn(console::run_sampler(state.clone(), shutdown.clone()));
        let app = router(state);
        tracing::info!(addr = %self.listener.local_addr().map_err(GatewayError::Serve)?, "gateway listening");
        // Small frames in both directions: without TCP_NODELAY, Nagle's algorithm meeting
        // the peer's delayed ACK holds a live entry back for up to 40 ms.
        let listener = axum::serve::ListenerExt::tap_io(self.listener, |tcp| {
            if let Err(e) = tcp.set_nodelay(true) {
                tracing::debug!(error = %e, "cannot set TCP_NODELAY");
            }
        });
        let served = axum::serve(listener, app)
            .with_graceful_shutdown(shutdown.clone().cancelled_owned())
            .await
            .map_err(GatewayError::Serve);
        // Serving ends on `shutdown`, or on an error: the side tasks stop either way.
        shutdown.cancel();
        let _ = fence.await;
        let _ = presence.await;
        let _ = fence_after_hang.await;
        let _ = console_sampler.await;
        served
    }
}

/// Binds and serves until `shutdown`.
pub async fn run(
    cfg: GatewayConfig,
    store: Store,
    bus: Bus,
    shutdown: CancellationToken,
) -> Result<(), GatewayError> {
    Gateway::bind(cfg, store, bus, shutdown).await?.run().await
}

pub fn router(state: Arc<AppState>) -> Router {
    routes::routes()
        // The console page is HTML for a browser, not an API call: outside the route table
        // and the OpenAPI document (what it reads and does are documented admin calls).
        .route("/console", axum::routing::get(console::index))
        .route("/console/{asset}", axum::routing::get(console::asset))
        .fallback(|| async { ApiError::not_found("not_found", "no such route") })
        .method_not_allowed_fallback(|| async {
            ApiError::new(
                StatusCode::METHOD_NOT_ALLOWED,
                "method_not_allowed",
                "method not allowed on this route",
            )
        })
        .layer(DefaultBodyLimit::max(state.cfg.max_body_bytes))
        .layer(axum::middleware::from_fn(trace_requests))
        .layer(axum::middleware::from_fn_with_state(
            state.clone(),
            count_responses,
        ))
        .with_state(state)
}

/// One span per request ("HTTP <method> <route>"), joining the caller's trace when the request
/// carries a valid `traceparent`. Handlers run with it current, so [`AppState::publish`]
/// parents its "publish" span on it; log lines inside carry its `trace_id`. Then one access
/// line per request (target `meridian::access`): method, matched route, status, duration
/// and trace id.
async fn trace_requests(req: Request, next: Next) -> Response {
    let started = Instant::now();
    let route = req
        .extensions()
        .get::<MatchedPath>()
        .map(|p| p.as_str().to_string());
    let method = req.method().clone();
    // Probes and scrapes come every few seconds from every replica: as traces they would
    // only crowd out the ones worth looking at, and their access lines are debug level.
    if matches!(route.as_deref(), Some("/healthz" | "/readyz" | "/metrics")) {
        let resp = next.run(req).await;
        tracing::debug!(
            target: ACCESS_LOG,
            method = %method,
            route = route.as_deref().unwrap_or("-"),
            status = resp.status().as_u16(),
            duration_ms = duration_ms(started),
            trace_id = "",
            "request"
        );
        return resp;
    }
    let name = match &route {
        Some(r) => format!("HTTP {method} {r}"),
        None => format!("HTTP {method}"),
    };
    let parent = req
        .headers()
        .get(meridian_telemetry::TRACEPARENT)
        .and_then(|v| v.to_str().ok());
    let mut span = meridian_telemetry::start_with_kind(Role::Gateway, name, SpanKind::Server, parent);
    span.set_attribute("http.request.method", method.to_string());
    if let Some(r) = route.clone() {
        span.set_attribute("http.route", r);
    }
    let trace_id = span.trace_id();
    let log = tracing::info_span!(
        "http",
        %method,
        route = route.as_deref().unwrap_or(""),
        trace_id = %trace_id
    );
    let resp = span.scope(next.run(req)).instrument(log).await;
    let status = resp.status();
    span.set_attribute("http.response.status_code", i64::from(status.as_u16()));
    if status.is_server_error() {
        span.set_error(status.to_string());
    }
    // Unmatched paths log as "-": raw paths carry ids, and a scanner's would flood the log.
    tracing::info!(
        target: ACCESS_LOG,
        method = %method,
        route = route.as_deref().unwrap_or("-"),
        status = status.as_u16(),
        duration_ms = duration_ms(started),
        trace_id = %trace_id,
        "request"
    );
    resp
}

/// The tracing target of the per-request access lines.
pub const ACCESS_LOG: &str = "meridian::access";

fn duration_ms(since: Instant) -> f64 {
    // Microsecond resolution is plenty for a log line.
    (since.elapsed().as_micros() as f64) / 1000.0
}

async fn count_responses(State(s): State<Arc<AppState>>, req: Request, next: Next) -> Response {
    s.metrics.requests.inc();
    let resp = next.run(req).await;
    if resp.status().is_client_error() {
        s.metrics.responses_4xx.inc();
    } else if resp.status().is_server_error() {
        s.metrics.responses_5xx.inc();
    }
    resp
}
