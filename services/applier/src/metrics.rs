//! [`ApplierMetrics`]: the applier's counters, gauges and histograms, shared (via `Arc`)
//! with whoever serves `/metrics`, which encodes them from the process's one
//! prometheus-client registry ([`ApplierMetrics::register`]).

use std::collections::BTreeMap;
use std::sync::Mutex;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use meridian_store::ApplyReport;
use prometheus_client::encoding::EncodeLabelSet;
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::metrics::histogram::{exponential_buckets, Histogram};
use prometheus_client::registry::Registry;

/// The stream a series is about (`SYNC_<region>`, or a mirror).
#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct StreamLabel {
    pub stream: String,
}

type HistogramFamily = Family<StreamLabel, Histogram, fn() -> Histogram>;

/// A batch commits in milliseconds; the top buckets catch a store that is struggling.
fn apply_seconds_histogram() -> Histogram {
    // 0.5 ms .. ~16 s
    Histogram::new(exponential_buckets(0.0005, 2.0, 16))
}

/// Lag spans a healthy millisecond to minutes behind after an outage.
fn apply_lag_histogram() -> Histogram {
    // 1 ms .. ~524 s
    Histogram::new(exponential_buckets(0.001, 2.0, 20))
}

/// Counters since start. The per-stream checkpoint is a gauge.
#[derive(Debug)]
pub struct ApplierMetrics {
    /// Events whose effects were applied.
    pub applied: Counter,
    /// Events already applied under another stream sequence (a late retried send).
    pub duplicates: Counter,
    /// Events recorded as applied without effect (malformed bodies, undecodable payloads).
    pub rejected: Counter,
    /// Of `rejected`: payloads that were not an `EventEnvelope` at all.
    pub undecodable: Counter,
    /// Redeliveries at or below the store checkpoint, skipped.
    pub below_checkpoint: Counter,
    /// Committed batches.
    pub batches: Counter,
    /// Live deliveries published.
    pub deliveries: Counter,
    /// Live deliveries NATS did not take (devices gap-fill from the store).
    pub delivery_failures: Counter,
    /// Batch attempts the store failed (each retried).
    pub store_retries: Counter,
    /// Seconds from taking a batch to its commit, store retries included.
    pub apply_seconds: Histogram,
    /// Per applied event, per stream: seconds from its acceptance (the HLC the gateway
    /// stamped) to the commit that applied it.
    pub apply_lag_seconds: HistogramFamily,
    checkpoint_gauge: Family<StreamLabel, Gauge>,
    checkpoints: Mutex<BTreeMap<String, u64>>,
}

impl Default for ApplierMetrics {
    fn default() -> Self {
        Self {
            applied: Counter::default(),
            duplicates: Counter::default(),
            rejected: Counter::default(),
            undecodable: Counter::default(),
            below_checkpoint: Counter::default(),
            batches: Counter::default(),
            deliveries: Counter::default(),
            delivery_failures: Counter::default(),
            store_retries: Counter::default(),
            apply_seconds: apply_seconds_histogram(),
            apply_lag_seconds: Family::new_with_constructor(apply_lag_histogram),
            checkpoint_gauge: Family::default(),
            checkpoints: Mutex::new(BTreeMap::new()),
        }
    }
}

impl ApplierMetrics {
    /// Registers every metric under `meridian_applier_` (counters get `_total`).
    pub fn register(&self, registry: &mut Registry) {
        let r = registry.sub_registry_with_prefix("meridian_applier");
        let counters = [
            ("applied", "Events whose effects were applied", &self.applied),
            (
                "duplicates",
                "Events already applied under another sequence",
                &self.duplicates,
            ),
            (
                "rejected",
                "Events recorded as applied without effect",
                &self.rejected,
            ),
            (
                "undecodable",
                "Payloads that were not an event envelope",
                &self.undecodable,
            ),
            (
                "below_checkpoint",
                "Redeliveries skipped by the checkpoint",
                &self.below_checkpoint,
            ),
            ("batches", "Committed batches", &self.batches),
            ("deliveries", "Live deliveries published", &self.deliveries),
            (
                "delivery_failures",
                "Live deliveries NATS did not take",
                &self.delivery_failures,
            ),
            (
                "store_retries",
                "Batch attempts the store failed",
                &self.store_retries,
            ),
        ];
        for (name, help, counter) in counters {
            r.register(name, help, counter.clone());
        }
        r.register(
            "checkpoint",
            "Last committed stream sequence",
            self.checkpoint_gauge.clone(),
        );
        r.register(
            "apply_seconds",
            "Seconds from taking a batch to its commit, store retries included",
            self.apply_seconds.clone(),
        );
        r.register(
            "apply_lag_seconds",
            "Per applied event: seconds from its acceptance (event HLC) to its commit, by stream",
            self.apply_lag_seconds.clone(),
        );
    }

    /// A committed batch: `took` from taking it to the commit, `accepted_ms` the HLC wall
    /// times of its events.
    pub(crate) fn record_batch(&self, stream: &str, r: &ApplyReport, took: Duration, accepted_ms: &[u64]) {
        self.applied.inc_by(r.applied as u64);
        self.duplicates.inc_by(r.duplicates as u64);
        self.rejected.inc_by(r.rejected as u64);
        self.below_checkpoint.inc_by(r.below_checkpoint as u64);
        self.batches.inc();
        self.apply_seconds.observe(took.as_secs_f64());
        let label = StreamLabel {
            stream: stream.to_string(),
        };
        self.checkpoint_gauge
            .get_or_create(&label)
            .set(i64::try_from(r.checkpoint).unwrap_or(i64::MAX));
        let now_ms = SystemTime::now()
            .duration_since(UNIX_EPOCH)
            .map_or(0, |d| d.as_millis() as u64);
        let lag = self.apply_lag_seconds.get_or_create(&label);
        for &at in accepted_ms.iter().filter(|&&at| at > 0) {
            // Another region's clock may run ahead of ours: no negative lag.
            lag.observe(now_ms.saturating_sub(at) as f64 / 1000.0);
        }
        if let Ok(mut m) = self.checkpoints.lock() {
            m.insert(stream.to_string(), r.checkpoint);
        }
    }

    pub(crate) fn record_undecodable(&self) {
        self.undecodable.inc();
    }

    pub(crate) fn record_store_retry(&self) {
        self.store_retries.inc();
    }

    pub(crate) fn record_delivery(&self, ok: bool) {
        if ok {
            self.deliveries.inc();
        } else {
            self.delivery_failures.inc();
        }
    }

    /// The checkpoint this applier last committed on `stream`.
    pub fn checkpoint(&self, stream: &str) -> Option<u64> {
        self.checkpoints.lock().ok()?.get(stream).copied()
    }

    /// Every stream's last committed checkpoint.
    pub fn checkpoints(&self) -> BTreeMap<String, u64> {
        self.checkpoints.lock().map(|m| m.clone()).unwrap_or_default()
    }

    /// These metrics alone in the exposition format (tests, debugging); `/metrics`
    /// encodes the process registry instead.
    pub fn render_prometheus(&self) -> String {
        let mut registry = Registry::default();
        self.register(&mut registry);
        let mut out = String::new();
        // Writing into a String cannot fail.
        let _ = prometheus_client::encoding::text::encode(&mut out, &registry);
        out
    }
}
