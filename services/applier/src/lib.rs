//! The applier: consumes the region's own stream and its mirrors of the other regions'
//! streams (each from its own checkpoint, one task per stream), applies each batch to the
//! store exactly once, and hands the inbox entries it appended to live delivery.
//!
//! Exactly once rests on the store, not on NATS acks (docs/design.md §4): every
//! batch commits its effects together with the stream checkpoint in one transaction, and
//! the store skips anything at or below the checkpoint. The consumer is positioned from that
//! checkpoint at start, acks only after the commit, and whatever NATS redelivers after a
//! restart is skipped. A checkpoint counts in one instance of the stream (its creation
//! time): a stream found to be another instance, at start or when the consumer rebuilds
//! its subscription, is applied from its start (see `StreamWorker::resume_after`).
//! The store bounds each transaction (bytes, inbox appends), so one
//! pulled batch may take several transactions: each is acked and delivered once it has
//! committed, never before.
//!
//! # Layout
//! - `config`: [`ApplierConfig`] and its validation.
//! - `metrics`: [`ApplierMetrics`], prometheus-client metrics registered into the process
//!   registry by whoever serves `/metrics`.
//! - `retention`: trims from each stream the events this region applied, every mirror of
//!   its own stream holds, and that are older than `retain_applied_s`.
//! - `testing` (feature `testing`): a region of real parts (nats-server, bus, temporary
//!   store) and the applier running on it, for this crate's and push's tests.
//! - this file: [`run`] / [`run_with_metrics`], one owned, cancellable task per stream, and
//!   the per-stream loop (pull, apply, ack, deliver), with one "apply" span per event whose
//!   deliveries carry its `traceparent` on to the gateways (meridian-telemetry).

mod coalesce;
mod config;
mod metrics;
mod retention;
#[cfg(feature = "testing")]
pub mod testing;

use std::collections::HashMap;
use std::sync::Arc;
use std::time::Duration;

use meridian_bus::{Bus, BusError, EventConsumer, ReceivedEvent, StreamState};
use meridian_store::{ApplyConfig, ApplyReport, Delivery, SequencedEvent, Store, StoreError, StreamRef};
use meridian_telemetry::{Role, RoleSpan, SpanKind};
use prost::Message as _;
use thiserror::Error;
use tokio::task::JoinSet;
use tokio_util::sync::CancellationToken;

pub use config::ApplierConfig;
pub use metrics::ApplierMetrics;
pub use retention::trim_applied;

#[derive(Debug, Error)]
pub enum ApplierError {
    #[error("invalid applier config field `{field}`: {reason}")]
    Config { field: &'static str, reason: String },
    #[error(transparent)]
    Bus(#[from] BusError),
    #[error(transparent)]
    Store(#[from] StoreError),
    /// A stream task panicked or was aborted.
    #[error("applier task failed: {0}")]
    Task(String),
}

impl ApplierError {
    pub(crate) fn config(field: &'static str, reason: impl Into<String>) -> Self {
        ApplierError::Config {
            field,
            reason: reason.into(),
        }
    }
}

/// Runs the applier until `shutdown` with fresh metrics. See [`run_with_metrics`].
pub async fn run(
    cfg: ApplierConfig,
    bus: Bus,
    store: Store,
    shutdown: CancellationToken,
) -> Result<(), ApplierError> {
    run_with_metrics(cfg, bus, store, Arc::new(ApplierMetrics::default()), shutdown).await
}

/// Runs one task per stream (`cfg.streams`, or when empty the bus's applied streams: its
/// own and its mirror of every region in `bus.mirrors`) until
/// `shutdown` is cancelled. Each task finishes the batch it is applying before it exits.
/// NATS and store outages are waited out with backoff, never returned; an error means a
/// bad config or a task that died, and stops the other streams too.
pub async fn run_with_metrics(
    cfg: ApplierConfig,
    bus: Bus,
    store: Store,
    metrics: Arc<ApplierMetrics>,
    shutdown: CancellationToken,
) -> Result<(), ApplierError> {
    cfg.validate()?;
    if &cfg.region != bus.region() {
        return Err(ApplierError::config(
            "region",
            format!(
                "applier region {} differs from the bus region {}",
                cfg.region,
                bus.region()
            ),
        ));
    }
    let streams = if cfg.streams.is_empty() {
        bus.applied_streams()
    } else {
        cfg.streams.clone()
    };
    let apply_cfg = ApplyConfig {
        region: cfg.region.clone(),
        read_diffusion_threshold: cfg.read_diffusion_threshold,
        coalesce_window_ms: cfg.coalesce_window_ms,
        batch_max_bytes: cfg.batch_max_bytes,
        batch_max_inbox_appends: cfg.batch_max_inbox_appends,
    };
    // A child token: a failing stream stops its siblings without cancelling the caller's.
    let stop = shutdown.child_token();
    let mut tasks = JoinSet::new();
    for stream in streams.clone() {
        let worker = StreamWorker {
            cfg: cfg.clone(),
            apply_cfg: apply_cfg.clone(),
            bus: bus.clone(),
            store: store.clone(),
            metrics: metrics.clone(),
            stream,
            stop: stop.clone(),
        };
        tasks.spawn(worker.run());
    }
    if cfg.retain_applied_s > 0 {
        // Never below the duplicate window: see `retention`.
        let retain = cfg.retain_applied_s.max(bus.config().duplicate_window_s);
        tasks.spawn(retention::run(
            bus.clone(),
            store.clone(),
            streams.clone(),
            Duration::from_secs(retain),
            stop.clone(),
        ));
    }
    // Read diffusion's trailing edge (meridian_store::coalesce): region-local, like fan-out.
    tasks.spawn(coalesce::run_flusher(
        store.clone(),
        bus.clone(),
        apply_cfg,
        metrics.clone(),
        stop.clone(),
    ));
    let mut result = Ok(());
    while let Some(joined) = tasks.join_next().await {
        let outcome = joined
            .map_err(|e| ApplierError::Task(e.to_string()))
            .and_then(|r| r);
        if let Err(e) = outcome {
            tracing::error!(error = %e, "applier stream task failed; stopping the applier");
            stop.cancel();
            if result.is_ok() {
                result = Err(e);
            }
        }
    }
    result
}

/// One stream's loop.
struct StreamWorker {
    cfg: ApplierConfig,
    apply_cfg: ApplyConfig,
    bus: Bus,
    store: Store,
    metrics: Arc<ApplierMetrics>,
    stream: String,
    stop: CancellationToken,
}

/// Waits out failures: 100 ms doubling to 5 s, reset after a success.
struct Backoff(Duration);

impl Backoff {
    fn new() -> Self {
        Backoff(Duration::from_millis(100))
    }
    fn reset(&mut self) {
        self.0 = Duration::from_millis(100);
    }
    /// Sleeps, or returns false at once if `stop` fires first.
    async fn sleep(&mut self, stop: &CancellationToken) -> bool {
        let d = self.0;
        self.0 = (self.0 * 2).min(Duration::from_secs(5));
        tokio::select! {
            _ = stop.cancelled() => false,
            _ = tokio::time::sleep(d) => true,
        }
    }
}

impl StreamWorker {
    /// One pass per instance of the stream: when the stream turns out to have been replaced
    /// (deleted and recreated, or lost with the server's storage), the worker opens it again
    /// and decides from the store's checkpoint where to start.
    async fn run(self) -> Result<(), ApplierError> {
        loop {
            let Some(consumer) = self.open().await? else {
                return Ok(());
            };
            if !self.consume(consumer).await? {
                return Ok(());
            }
        }
    }

    /// Pulls, applies, acks and delivers until stopped (false) or until the stream is
    /// replaced under the consumer (true: open it again).
    async fn consume(&self, mut consumer: EventConsumer) -> Result<bool, ApplierError> {
        tracing::info!(stream = %self.stream, next = ?consumer.expected_seq(), "applier consuming");
        let wait = Duration::from_millis(self.cfg.batch_wait_ms);
        let mut backoff = Backoff::new();
        loop {
            // `biased`: once stop is asked for, no new batch is started.
            let next = tokio::select! {
                biased;
                _ = self.stop.cancelled() => return Ok(false),
                next = consumer.next_batch(self.cfg.batch_max, wait) => next,
            };
            let mut batch = match next {
                Ok(batch) => batch,
                Err(BusError::StreamReplaced { reason, .. }) => {
                    tracing::warn!(stream = %self.stream, %reason, "the stream was replaced; opening it again");
                    return Ok(true);
                }
                Err(e) => {
                    tracing::warn!(stream = %self.stream, error = %e, "pulling events failed; retrying");
                    if !backoff.sleep(&self.stop).await {
                        return Ok(false);
                    }
                    continue;
                }
            };
            backoff.reset();
            if batch.is_empty() {
                continue;
            }
            // Started before the transaction so each span covers the apply and the live
            // deliveries of its event; they end when `spans` drops.
            let spans = EventSpans::start(&self.stream, &batch);
            let accepted = accepted_ms(&batch);
            let events = self.sequenced(&mut batch);
            let mut committed = 0;
            while committed < events.len() {
                let taken = std::time::Instant::now();
                let Some(report) = self.apply(consumer.instance(), &events[committed..]).await else {
                    // Stopped while the store was failing: what is not committed is not
                    // acked; the next run starts again from the checkpoint.
                    return Ok(false);
                };
                if report.consumed == 0 {
                    // The store takes at least one event of a non-empty batch; anything else
                    // would spin here.
                    return Err(ApplierError::Task(format!(
                        "the store applied nothing of a batch on {}",
                        self.stream
                    )));
                }
                let done = committed;
                committed += report.consumed.min(events.len() - committed);
                // Acks only tidy the server's view; a lost one means a redelivery the store
                // skips.
                if let Err(e) = consumer.ack(&batch[..committed]).await {
                    tracing::debug!(stream = %self.stream, error = %e, "ack failed");
                }
                self.metrics
                    .record_batch(&self.stream, &report, taken.elapsed(), &accepted[done..committed]);
                self.deliver(report, &spans).await;
            }
        }
    }

    /// The events of a pulled batch as the store takes them.
    fn sequenced(&self, batch: &mut [ReceivedEvent]) -> Vec<SequencedEvent> {
        batch
            .iter_mut()
            .map(|r| SequencedEvent {
                stream_seq: r.stream_seq,
                // An undecodable payload still takes its place: the default envelope has no
                // event id, which the store rejects (logged, counted) while moving the
                // checkpoint past it, so a bad message can never wedge the stream.
                envelope: r.envelope.take().unwrap_or_else(|| {
                    self.metrics.record_undecodable();
                    tracing::warn!(stream = %self.stream, seq = r.stream_seq, "undecodable event skipped");
                    Default::default()
                }),
            })
            .collect()
    }

    /// Positions a consumer right after the store's checkpoint, or at the start of the
    /// stream if the stream is not the instance checkpointed. `None` if stopped first.
    async fn open(&self) -> Result<Option<EventConsumer>, ApplierError> {
        let mut backoff = Backoff::new();
        let own = self.stream == self.bus.stream();
        let origin = self
            .bus
            .config()
            .mirrors
            .iter()
            .find(|m| self.bus.config().stream_name(m) == self.stream)
            .cloned();
        // Streams named in `cfg.streams` that are neither are someone else's to provision.
        let mut ensured = !own && origin.is_none();
        loop {
            let attempt = async {
                if !ensured {
                    // The applier may start before any gateway: make sure its own stream, or
                    // the mirror this task applies, exists (and is the right mirror).
                    match &origin {
                        Some(origin) => self.bus.ensure_mirror(origin).await?,
                        None => self.bus.ensure_stream().await?,
                    }
                    ensured = true;
                }
                let state = self.bus.stream_state(&self.stream).await?;
                let after = self.resume_after(&state).await?;
                let consumer = self
                    .bus
                    .event_consumer_after(&self.stream, &self.cfg.durable_name, after)
                    .await?;
                if consumer.instance() != state.instance {
                    // Replaced between the two looks: decide again.
                    return Err(ApplierError::Bus(BusError::StreamReplaced {
                        stream: self.stream.clone(),
                        reason: "replaced while the consumer was opened".into(),
                    }));
                }
                Ok::<_, ApplierError>(consumer)
            };
            match attempt.await {
                Ok(consumer) => return Ok(Some(consumer)),
                Err(ApplierError::Bus(BusError::Config { field, reason })) => {
                    return Err(ApplierError::config(field, reason));
                }
                Err(e) => {
                    tracing::warn!(stream = %self.stream, error = %e, "applier cannot start consuming yet; retrying");
                    if !backoff.sleep(&self.stop).await {
                        return Ok(None);
                    }
                }
            }
        }
    }

    /// The sequence after which to consume the stream instance `state` describes. The
    /// store's checkpoint counts in the instance it names; a stream that is another instance
    /// (deleted and recreated, or lost with the server's storage), or that ends before the
    /// checkpoint, numbers its events anew, so it is applied from its start (the applied
    /// markers make whatever was applied before a no-op) rather than skipped up to the old
    /// sequence.
    async fn resume_after(&self, state: &StreamState) -> Result<u64, ApplierError> {
        let cp = self.store.stream_checkpoint(&self.stream).await?;
        // A checkpoint without an instance (written before instances were recorded) is
        // taken as this instance while the stream reaches it; the next commit records it.
        let same_instance = cp.instance == state.instance || cp.instance == 0;
        if same_instance && cp.seq <= state.last_seq {
            return Ok(cp.seq);
        }
        tracing::error!(
            stream = %self.stream, checkpoint_instance = cp.instance, checkpoint_seq = cp.seq,
            stream_instance = state.instance, first_seq = state.first_seq, last_seq = state.last_seq,
            "the stream is not the one checkpointed (recreated, or its storage lost); applying it from its start"
        );
        self.store.reset_checkpoint(&self.stream, state.instance).await?;
        Ok(0)
    }

    /// Applies `events` (from the stream instance `instance`), or the prefix the store's
    /// bounds allow, in one store transaction, retrying until it commits. `None` if stopped
    /// while the store was failing.
    async fn apply(&self, instance: u64, events: &[SequencedEvent]) -> Option<ApplyReport> {
        let (first, last) = (events[0].stream_seq, events[events.len() - 1].stream_seq);
        let mut backoff = Backoff::new();
        loop {
            match self
                .store
                .apply_batch(&self.apply_cfg, StreamRef::new(&self.stream, instance), events)
                .await
            {
                Ok(report) => {
                    tracing::debug!(
                        stream = %self.stream, first, last, consumed = report.consumed,
                        applied = report.applied,
                        duplicates = report.duplicates, skipped = report.below_checkpoint,
                        "batch applied"
                    );
                    return Some(report);
                }
                Err(e) => {
                    self.metrics.record_store_retry();
                    tracing::warn!(stream = %self.stream, first, last, error = %e, "applying batch failed; retrying it");
                    if !backoff.sleep(&self.stop).await {
                        return None;
                    }
                }
            }
        }
    }

    /// Hands each appended inbox entry to live delivery, in the trace of the event that
    /// produced it. Best effort: a device that misses one sees the seq gap and reads it from
    /// the store.
    async fn deliver(&self, report: ApplyReport, spans: &EventSpans) {
        for d in &report.deliveries {
            publish_delivery(&self.bus, &self.metrics, d, spans.get(&d.entry.event_id)).await;
        }
    }
}

/// Publishes one committed inbox entry to live delivery, in the trace of `span` if any.
pub(crate) async fn publish_delivery(
    bus: &Bus,
    metrics: &ApplierMetrics,
    d: &Delivery,
    span: Option<&RoleSpan>,
) {
    let traceparent = span.map(RoleSpan::traceparent);
    // Encoded one at a time: the deliveries share one copy of each timeline entry.
    let payload = bytes::Bytes::from(d.live_entry().encode_to_vec());
    match bus
        .publish_delivery_traced(&d.user, payload, traceparent.as_deref())
        .await
    {
        Ok(()) => metrics.record_delivery(true),
        Err(e) => {
            metrics.record_delivery(false);
            tracing::debug!(
                user = %d.user, error = %e,
                trace_id = span.map(RoleSpan::trace_id).unwrap_or_default(),
                "live delivery dropped"
            );
        }
    }
}

/// The wall-clock part of each event's HLC: when its gateway accepted it (apply lag).
fn accepted_ms(batch: &[ReceivedEvent]) -> Vec<u64> {
    // One per event, aligned with the batch (0 for an undecodable one, which has no time).
    batch
        .iter()
        .map(|r| {
            r.envelope
                .as_ref()
                .map_or(0, |e| meridian_model::Hlc(e.hlc).physical_ms())
        })
        .collect()
}

/// One "apply" span per event of a batch, each continuing the trace the event was published
/// in (its `traceparent` header, else the envelope's copy), keyed by event id so the
/// deliveries an event produced can be published in its trace.
struct EventSpans(HashMap<Vec<u8>, RoleSpan>);

impl EventSpans {
    fn start(stream: &str, batch: &[ReceivedEvent]) -> EventSpans {
        let mut spans = HashMap::with_capacity(batch.len());
        for r in batch {
            // An undecodable event has no id to match deliveries with, and produces none.
            let Some(env) = r.envelope.as_ref() else { continue };
            let parent = r
                .traceparent
                .as_deref()
                .or((!env.traceparent.is_empty()).then_some(env.traceparent.as_str()));
            let mut span =
                meridian_telemetry::start_with_kind(Role::Applier, "apply", SpanKind::Consumer, parent);
            span.set_attribute("messaging.destination.name", stream.to_string());
            span.set_attribute("messaging.message.id", r.msg_id.clone().unwrap_or_default());
            span.set_attribute("meridian.stream_seq", r.stream_seq as i64);
            span.set_attribute("meridian.origin_region", env.origin_region.clone());
            tracing::trace!(stream, seq = r.stream_seq, trace_id = %span.trace_id(), "applying event");
            spans.insert(env.event_id.clone(), span);
        }
        EventSpans(spans)
    }

    fn get(&self, event_id: &[u8]) -> Option<&RoleSpan> {
        self.0.get(event_id)
    }
}
