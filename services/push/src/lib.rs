//! Offline push (docs/design.md §3, last step): when the applier appends an inbox entry for
//! a user who has no live connection in the region, and the conversation is not muted for
//! them, each device they registered with `PUT /v1/devices/{device_id}` is notified through
//! its provider. The notification carries the inbox seq and the device token, never the
//! message text: the app wakes up and pulls `GET /v1/sync` before it shows anything.
//!
//! The input is the applier's live-delivery fan-out: after each commit it publishes every
//! new inbox entry (a `LiveEntry`, proto/meridian/v1/live.proto) on the user's core-NATS delivery subject, and
//! this role subscribes to the region's delivery wildcard alongside the gateways. Core NATS
//! is at-most-once, so a push missed while this role is down is not replayed; devices still
//! get everything on their next sync, which is the guarantee that matters (docs/design.md §5).
//!
//! # Layout
//! - `config`: [`PushConfig`] (+ [`ApnsConfig`], [`FcmConfig`]), validation, the
//!   `MERIDIAN_PUSH_WEBHOOK_URL` override.
//! - `metrics`: [`PushMetrics`], atomics rendered as Prometheus text (`meridian_push_*`).
//! - `payload`: [`Notification`] and the provider request bodies built from it (pure).
//! - `apns`: the ES256 provider-token signer and its ~50 minute cache.
//! - `fcm_auth`: FCM access tokens minted from a service-account key and refreshed before
//!   they expire.
//! - `providers`: the HTTP clients and one attempt per provider, classified as sent,
//!   retryable or permanent.
//! - `dedup`: a bounded set of recently notified (user, device, seq, order key) keys.
//! - `dispatch`: one entry's filters (presence, own message, mute, devices), one device's
//!   retry loop, and the removal of a registration whose token the provider reported dead
//!   (a `DeviceUnregistered` event on the region's stream: push publishes, never writes the
//!   store).
//! - this file: [`Presence`], [`PushError`] and [`run`], the subscription loop with its
//!   bounded set of in-flight entry tasks and graceful shutdown.

mod apns;
mod config;
mod dedup;
mod dispatch;
mod fcm_auth;
mod metrics;
mod payload;
mod providers;

use std::sync::Arc;
use std::time::Duration;

use futures::StreamExt as _;
use meridian_bus::{Bus, BusError};
use meridian_model::events::LiveEntry;
use meridian_model::UserId;
use meridian_store::records::InboxEntry;
use meridian_store::Store;
use prost::Message as _;
use thiserror::Error;
use tokio::task::JoinSet;
use tokio_util::sync::CancellationToken;

pub use config::{
    ApnsConfig, FcmConfig, PushConfig, APNS_DEFAULT_ENDPOINT, FCM_DEFAULT_ENDPOINT, WEBHOOK_URL_ENV,
};
pub use fcm_auth::ServiceAccountKey;
pub use metrics::{ProviderMetrics, PushMetrics};
pub use payload::{apns_body, fcm_body, webhook_body, Notification};
pub use providers::Provider;

/// Who is online in this region. The gateway's hub implements it in the region process;
/// an online user gets the entry over its WebSocket and needs no push.
pub trait Presence: Send + Sync + 'static {
    fn is_online(&self, user: &UserId) -> bool;
}

/// Any `Fn(&UserId) -> bool` is a presence source (tests, simple wiring).
impl<F> Presence for F
where
    F: Fn(&UserId) -> bool + Send + Sync + 'static,
{
    fn is_online(&self, user: &UserId) -> bool {
        self(user)
    }
}

/// Nobody is online: for a push role running without a gateway in its process. Every
/// device is then notified, online or not.
#[derive(Clone, Copy, Debug, Default)]
pub struct NobodyOnline;

impl Presence for NobodyOnline {
    fn is_online(&self, _user: &UserId) -> bool {
        false
    }
}

#[derive(Debug, Error)]
pub enum PushError {
    #[error("invalid push config field `{field}`: {reason}")]
    Config { field: &'static str, reason: String },
    #[error(transparent)]
    Bus(#[from] BusError),
    #[error("building the push HTTP client: {0}")]
    Client(String),
    /// The NATS client closed the delivery subscription (it was drained or closed).
    #[error("the delivery subscription ended")]
    SubscriptionClosed,
}

impl PushError {
    pub(crate) fn config(field: &'static str, reason: impl Into<String>) -> Self {
        PushError::Config {
            field,
            reason: reason.into(),
        }
    }
}

/// Runs offline push until `shutdown` is cancelled: [`Push::start`] then [`Push::run`].
pub async fn run(
    cfg: PushConfig,
    bus: Bus,
    store: Store,
    presence: Arc<dyn Presence>,
    metrics: Arc<PushMetrics>,
    shutdown: CancellationToken,
) -> Result<(), PushError> {
    Push::start(cfg, bus, store, presence, metrics)
        .await?
        .run(shutdown)
        .await
}

/// Offline push, subscribed and ready to run.
pub struct Push {
    bus: Bus,
    sub: async_nats::Subscriber,
    dispatcher: Arc<dispatch::Dispatcher>,
    metrics: Arc<PushMetrics>,
    concurrency: usize,
    grace: Duration,
}

impl Push {
    /// Validates, builds the provider clients and subscribes to the region's deliveries.
    /// Returns once the server has the subscription: deliveries are core NATS, so anything
    /// published before that would never reach push (callers start push before traffic).
    pub async fn start(
        cfg: PushConfig,
        bus: Bus,
        store: Store,
        presence: Arc<dyn Presence>,
        metrics: Arc<PushMetrics>,
    ) -> Result<Push, PushError> {
        cfg.validate()?;
        if &cfg.region != bus.region() {
            return Err(PushError::config(
                "region",
                format!(
                    "push region {} differs from the bus region {}",
                    cfg.region,
                    bus.region()
                ),
            ));
        }
        let concurrency = cfg.concurrency;
        let grace = Duration::from_millis(cfg.shutdown_grace_ms);
        let dispatcher = Arc::new(dispatch::Dispatcher::new(
            cfg,
            bus.clone(),
            store,
            presence,
            metrics.clone(),
        )?);
        let sub = bus.subscribe(bus.delivery_wildcard()).await?;
        bus.ping().await?;
        tracing::info!(subject = %bus.delivery_wildcard(), "push: watching deliveries");
        Ok(Push {
            bus,
            sub,
            dispatcher,
            metrics,
            concurrency,
            grace,
        })
    }

    /// Each delivery becomes one owned task; at most `cfg.concurrency` run at once, and while
    /// that many are busy the loop stops reading (NATS buffers, then drops as a slow
    /// consumer, which costs pushes, never messages). Provider requests in flight are bounded
    /// by the same number. On shutdown it unsubscribes, lets tasks under way finish for up to
    /// `cfg.shutdown_grace_ms`, then aborts the rest and returns `Ok`.
    pub async fn run(self, shutdown: CancellationToken) -> Result<(), PushError> {
        let Push {
            bus,
            mut sub,
            dispatcher,
            metrics,
            concurrency,
            grace,
        } = self;
        let mut tasks: JoinSet<()> = JoinSet::new();
        let mut result = Ok(());
        loop {
            // Backpressure: a full set is drained by one before another message is read.
            if tasks.len() >= concurrency {
                tokio::select! {
                    _ = shutdown.cancelled() => break,
                    Some(joined) = tasks.join_next() => reap(joined),
                }
                continue;
            }
            tokio::select! {
                _ = shutdown.cancelled() => break,
                Some(joined) = tasks.join_next(), if !tasks.is_empty() => reap(joined),
                msg = sub.next() => {
                    let Some(msg) = msg else {
                        result = Err(PushError::SubscriptionClosed);
                        break;
                    };
                    metrics.record_entry();
                    let Some(user) = bus.delivery_user(msg.subject.as_str()) else {
                        metrics.record_undecodable();
                        tracing::warn!(subject = %msg.subject, "push: delivery subject names no user");
                        continue;
                    };
                    let entry = match LiveEntry::decode(msg.payload) {
                        Ok(live) => InboxEntry::from(live),
                        Err(e) => {
                            metrics.record_undecodable();
                            tracing::warn!(%user, error = %e, "push: delivery is not an inbox entry");
                            continue;
                        }
                    };
                    // One span per entry, joined to the message's trace (the applier put the
                    // apply span's traceparent on the delivery).
                    let parent = msg
                        .headers
                        .as_ref()
                        .and_then(|h| h.get(meridian_telemetry::TRACEPARENT))
                        .map(|v| v.as_str().to_string());
                    let mut span = meridian_telemetry::start_with_kind(
                        meridian_telemetry::Role::Push,
                        "push notify",
                        meridian_telemetry::SpanKind::Consumer,
                        parent.as_deref(),
                    );
                    span.set_attribute("meridian.inbox_seq", entry.seq as i64);
                    let work = dispatcher.clone().handle(user, entry);
                    tasks.spawn(async move {
                        let log = span.log_span();
                        tracing::Instrument::instrument(span.scope(work), log).await;
                        span.end();
                    });
                }
            }
            metrics.set_in_flight(tasks.len());
        }

        // Stop the server sending us more; what is already buffered is dropped with `sub`.
        if let Err(e) = sub.unsubscribe().await {
            tracing::debug!(error = %e, "push: unsubscribe failed (the connection is going anyway)");
        }
        drop(sub);
        let drained = tokio::time::timeout(grace, async {
            while let Some(joined) = tasks.join_next().await {
                reap(joined);
            }
        })
        .await;
        if drained.is_err() {
            tracing::warn!(
                abandoned = tasks.len(),
                "push: notifications still under way at the end of the shutdown grace; abandoning them"
            );
            tasks.abort_all();
            while tasks.join_next().await.is_some() {}
        }
        metrics.set_in_flight(0);
        result
    }
}

/// A task that panicked is a bug, but one entry's bug must not stop everyone's pushes.
fn reap(joined: Result<(), tokio::task::JoinError>) {
    if let Err(e) = joined {
        if e.is_panic() {
            tracing::error!(error = %e, "push: an entry task panicked");
        }
    }
}
