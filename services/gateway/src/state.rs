//! What every handler shares: config, store, bus, the clock that stamps events, the live
//! delivery hub, the rate limiter, and the metrics with the registry `/metrics` encodes.

use std::collections::HashMap;
use std::sync::Mutex;
use std::time::{Duration, Instant};

use meridian_bus::{Bus, PublishAck};
use meridian_model::events::{event_envelope::Body, EventEnvelope};
use meridian_model::{EventId, HybridClock, OrderKey};
use meridian_store::Store;
use meridian_telemetry::{Role, SpanKind};

use crate::error::ApiResult;
use crate::extract::Caller;
use crate::live::Hub;
use crate::GatewayConfig;

pub struct AppState {
    pub cfg: GatewayConfig,
    pub store: Store,
    pub bus: Bus,
    /// A second NATS connection whose subscriptions buffer only a few messages: the
    /// WebSockets' live deliveries (see `GatewayConfig::ws_subscription_capacity`).
    pub live_bus: Bus,
    pub clock: HybridClock,
    pub hub: std::sync::Arc<Hub>,
    pub limiter: RateLimiter,
    pub metrics: GatewayMetrics,
    /// Publishes in atomic batches when the region's JetStream fsyncs before acking
    /// (`disk`, `geo`): one fsync per batch, not per event.
    pub group_commit: Option<crate::durability::GroupCommit>,
    /// Geo acks: how far the other regions' mirrors hold this region's stream.
    pub geo: crate::durability::GeoAcks,
    pub started: Instant,
    /// Cancelled when the gateway stops; WebSockets close on it.
    pub shutdown: tokio_util::sync::CancellationToken,
    /// Every metric of the process: the gateway's, and those of the roles running beside
    /// it (applier, push), which register through [`crate::Gateway::metrics_registry`].
    pub registry: Registry,
    /// Refuses writes while this region cannot tell whether its users were failed over.
    pub fence: crate::fence::Fence,
    /// The operator console's samples, feed and action log.
    pub console: crate::console::Console,
    /// The region's search index, where this process runs it (beside the applier); `None`
    /// answers `GET /v1/search` with 503.
    pub search: Option<meridian_search::Search>,
}

/// An event the stream has acknowledged.
pub struct Published {
    pub envelope: EventEnvelope,
    pub ack: PublishAck,
}

impl Published {
    pub fn order_key(&self) -> ApiResult<OrderKey> {
        Ok(OrderKey::new(
            meridian_model::Hlc(self.envelope.hlc),
            meridian_model::RegionId::parse(self.envelope.origin_region.clone())?,
            EventId::from_bytes(&self.envelope.event_id)?,
        ))
    }
}

impl AppState {
    /// Stamps and publishes one event for `actor` (None: the admin); returns after the PubAck.
    /// The event travels in a "publish" span, a child of the request's (or WebSocket frame's)
    /// span current here, whose `traceparent` the envelope carries to the applier.
    pub async fn publish(
        &self,
        actor: Option<&Caller>,
        event_id: EventId,
        body: Body,
    ) -> ApiResult<Published> {
        let started = Instant::now();
        let mut span = meridian_telemetry::start_in_current(Role::Gateway, "publish", SpanKind::Producer);
        span.set_attribute("messaging.destination.name", self.bus.stream());
        span.set_attribute("messaging.message.id", event_id.to_string());
        let result = self.publish_in(actor, event_id, body, span.traceparent()).await;
        self.metrics
            .publish_seconds
            .observe(started.elapsed().as_secs_f64());
        match &result {
            Ok(p) => {
                span.set_attribute("meridian.stream_seq", p.ack.stream_seq as i64);
                span.set_attribute("meridian.duplicate", p.ack.duplicate);
            }
            Err(e) => span.set_error(e.message.clone()),
        }
        result
    }

    async fn publish_in(
        &self,
        actor: Option<&Caller>,
        event_id: EventId,
        body: Body,
        traceparent: String,
    ) -> ApiResult<Published> {
        // Stamp above every version this event overwrites or must sort after (docs/design.md
        // §4): a clock behind the store (restarted on a wall clock that stepped back,
        // or behind a region whose events were applied here) would otherwise lose the write
        // to last-writer-wins while answering 200, or sort a new message before stored ones.
        //
        // And above every event applied here, whichever region stamped it: a region whose
        // clock runs ahead has its events applied here, and what a user does after seeing one
        // must sort after it even in another conversation (the conversation list orders by
        // activity). The applier records the highest HLC it applied per stream with each
        // checkpoint, and a process that applies keeps their maximum in memory, raised before
        // each commit (`Store::max_applied_hlc`), so every event observes it with no window
        // in which a stale clock could stamp.
        let overwritten = self.store.overwritten_version(&body).await?;
        let applied = self.store.max_applied_hlc().await?;
        let hlc = self
            .clock
            .observe(overwritten.map_or(applied, |v| v.max(applied)));
        let envelope = EventEnvelope {
            event_id: event_id.as_bytes().to_vec(),
            origin_region: self.cfg.region.to_string(),
            hlc: hlc.0,
            actor: actor.map_or_else(|| "admin".to_string(), |c| c.user.to_string()),
            actor_device: actor.map(|c| c.device.to_string()).unwrap_or_default(),
            body: Some(body),
            traceparent,
            ..Default::default()
        };
        let ack = match &self.group_commit {
            Some(batches) => batches.publish(envelope.clone()).await?,
            None => self.bus.publish_event(&envelope).await?,
        };
        self.metrics.published.inc();
        tracing::debug!(
            event_id = %event_id, stream_seq = ack.stream_seq, duplicate = ack.duplicate,
            "published"
        );
        if ack.duplicate {
            // The stream already holds this event id (a retried send): answer with what it
            // holds, so the retry gets the original message id *and* cursor.
            self.metrics.duplicate_publishes.inc();
            let original = self.bus.get_event(ack.stream_seq).await?;
            return Ok(Published {
                envelope: original,
                ack,
            });
        }
        Ok(Published { envelope, ack })
    }

    /// Publishes a state change and waits (bounded) until the local applier has applied it,
    /// so the caller's next read sees it. The event is durable either way.
    pub async fn publish_and_apply(&self, actor: Option<&Caller>, body: Body) -> ApiResult<Published> {
        self.publish_and_apply_as(actor, EventId::new_v7(), body).await
    }

    /// [`AppState::publish_and_apply`] with a given event id (an idempotent request's).
    pub async fn publish_and_apply_as(
        &self,
        actor: Option<&Caller>,
        event_id: EventId,
        body: Body,
    ) -> ApiResult<Published> {
        let p = self.publish(actor, event_id, body).await?;
        self.wait_applied(p.ack.stream_seq).await;
        Ok(p)
    }

    /// Waits until the region's own stream is applied through `seq`, at most
    /// `read_your_writes_ms`.
    async fn wait_applied(&self, seq: u64) {
        let deadline = Instant::now() + Duration::from_millis(self.cfg.read_your_writes_ms);
        let stream = self.bus.stream();
        let mut pause = Duration::from_millis(1);
        while Instant::now() < deadline {
            match self.store.checkpoint(&stream).await {
                Ok(cp) if cp >= seq => return,
                Ok(_) => {}
                Err(e) => tracing::warn!(error = %e, "reading the apply checkpoint failed"),
            }
            tokio::time::sleep(pause).await;
            pause = (pause * 2).min(Duration::from_millis(20));
        }
        tracing::warn!(seq, "applier did not catch up in time; answering anyway");
    }
}

/// Per-user token buckets.
pub struct RateLimiter {
    per_s: f64,
    burst: f64,
    buckets: Mutex<HashMap<String, (f64, Instant)>>,
}

impl RateLimiter {
    pub fn new(per_s: f64, burst: f64) -> Self {
        Self {
            per_s,
            burst,
            buckets: Mutex::new(HashMap::new()),
        }
    }

    /// Takes one token for `key`, or says how long until one is available.
    pub fn check(&self, key: &str) -> Result<(), Duration> {
        let now = Instant::now();
        let mut buckets = self.buckets.lock().unwrap_or_else(|p| p.into_inner());
        if buckets.len() > 100_000 {
            // Forget users whose buckets have refilled: they are indistinguishable from new.
            let (per_s, burst) = (self.per_s, self.burst);
            buckets.retain(|_, (tokens, at)| *tokens + now.duration_since(*at).as_secs_f64() * per_s < burst);
        }
        let (tokens, at) = buckets.entry(key.to_string()).or_insert((self.burst, now));
        *tokens = (*tokens + now.duration_since(*at).as_secs_f64() * self.per_s).min(self.burst);
        *at = now;
        if *tokens >= 1.0 {
            *tokens -= 1.0;
            Ok(())
        } else {
            Err(Duration::from_secs_f64((1.0 - *tokens) / self.per_s))
        }
    }
}

pub use prometheus_client::metrics::counter::Counter;
pub use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::metrics::histogram::{exponential_buckets, Histogram};
use prometheus_client::registry::Registry;

/// Publishes take about a millisecond (a JetStream round trip and, under `Durability::Disk`,
/// an fsync); delivery adds the apply and a NATS hop. 0.5 ms .. ~16 s.
fn latency_histogram() -> Histogram {
    Histogram::new(exponential_buckets(0.0005, 2.0, 16))
}

/// The gateway's metrics, registered into the process registry that `/metrics` encodes.
pub struct GatewayMetrics {
    pub requests: Counter,
    pub responses_4xx: Counter,
    pub responses_5xx: Counter,
    pub auth_failures: Counter,
    pub rate_limited: Counter,
    pub published: Counter,
    pub duplicate_publishes: Counter,
    /// Atomic batches group commit published (`disk`, `geo`): against `published`, how many
    /// events shared each fsync.
    pub publish_batches: Counter,
    pub ws_connections: Gauge,
    pub ws_entries_sent: Counter,
    pub ws_gap_fills: Counter,
    /// Set from the hub when `/metrics` is scraped.
    pub online_users: Gauge,
    /// Seconds from stamping an event to the stream's acknowledgement.
    pub publish_seconds: Histogram,
    /// Seconds from an event's acceptance (its HLC) to its live entry going out on a
    /// WebSocket; replays and gap fills are not live and not counted.
    pub delivery_seconds: Histogram,
}

impl Default for GatewayMetrics {
    fn default() -> Self {
        Self {
            requests: Counter::default(),
            responses_4xx: Counter::default(),
            responses_5xx: Counter::default(),
            auth_failures: Counter::default(),
            rate_limited: Counter::default(),
            published: Counter::default(),
            duplicate_publishes: Counter::default(),
            publish_batches: Counter::default(),
            ws_connections: Gauge::default(),
            ws_entries_sent: Counter::default(),
            ws_gap_fills: Counter::default(),
            online_users: Gauge::default(),
            publish_seconds: latency_histogram(),
            delivery_seconds: latency_histogram(),
        }
    }
}

impl GatewayMetrics {
    /// Registers every metric under `meridian_gateway_` (counters get `_total`).
    pub fn register(&self, registry: &mut Registry) {
        let r = registry.sub_registry_with_prefix("meridian_gateway");
        let counters = [
            ("requests", "HTTP requests received", &self.requests),
            ("responses_4xx", "4xx answers", &self.responses_4xx),
            ("responses_5xx", "5xx answers", &self.responses_5xx),
            (
                "auth_failures",
                "Rejected tokens and admin keys",
                &self.auth_failures,
            ),
            ("rate_limited", "429 answers", &self.rate_limited),
            ("published", "Events acknowledged by the stream", &self.published),
            (
                "duplicate_publishes",
                "Publishes the stream deduplicated",
                &self.duplicate_publishes,
            ),
            (
                "publish_batches",
                "Batches of events published together with one fsync (group commit)",
                &self.publish_batches,
            ),
            (
                "ws_entries_sent",
                "Inbox entries sent over WebSockets",
                &self.ws_entries_sent,
            ),
            ("ws_gap_fills", "Gaps filled from the store", &self.ws_gap_fills),
        ];
        for (name, help, counter) in counters {
            r.register(name, help, counter.clone());
        }
        r.register("ws_connections", "Open WebSockets", self.ws_connections.clone());
        r.register(
            "online_users",
            "Users with an open WebSocket here",
            self.online_users.clone(),
        );
        r.register(
            "publish_seconds",
            "Seconds from stamping an event to the stream's acknowledgement",
            self.publish_seconds.clone(),
        );
        r.register(
            "delivery_seconds",
            "Seconds from an event's acceptance (its HLC) to its live entry on a WebSocket",
            self.delivery_seconds.clone(),
        );
    }

    /// A live entry went out on a WebSocket: how long since its event was accepted.
    pub fn observe_delivery(&self, entry: &meridian_store::records::InboxEntry) {
        let Some(at_ms) = entry.entry.as_ref().map(|e| e.at_ms).filter(|&ms| ms > 0) else {
            return;
        };
        let now_ms = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map_or(0, |d| d.as_millis() as u64);
        // Another region's clock may run ahead of ours: no negative latency.
        self.delivery_seconds
            .observe(now_ms.saturating_sub(at_ms) as f64 / 1000.0);
    }
}

/// How far `stream` is applied, counted in the stream instance the bus sees now: a checkpoint
/// of an earlier instance (the stream was recreated or lost its storage, and the applier has
/// not reset it yet) counts as nothing applied, so lag and readiness do not read 0 while a
/// new instance waits.
pub fn applied_in(cp: &meridian_store::checkpoint::Checkpoint, state: &meridian_bus::StreamState) -> u64 {
    if cp.instance == 0 || cp.instance == state.instance {
        cp.seq
    } else {
        0
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn rate_limiter_allows_burst_then_refuses() {
        let l = RateLimiter::new(1.0, 3.0);
        assert!(l.check("a").is_ok());
        assert!(l.check("a").is_ok());
        assert!(l.check("a").is_ok());
        let wait = l.check("a").unwrap_err();
        assert!(wait > Duration::ZERO && wait <= Duration::from_secs(1));
        // Buckets are per user.
        assert!(l.check("b").is_ok());
    }
}
