use std::collections::BTreeMap;
use std::fmt::Write as _;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Mutex;

use meridian_store::ApplyReport;

/// Counters since start, shared (via `Arc`) with whoever exports them. Monotonic except
/// `last_applied_seq` and the per-stream checkpoints.
#[derive(Debug, Default)]
pub struct ApplierMetrics {
    /// Events whose effects were applied.
    pub applied: AtomicU64,
    /// Events already applied under another stream sequence (a late retried send).
    pub duplicates: AtomicU64,
    /// Events recorded as applied without effect (malformed bodies, undecodable payloads).
    pub rejected: AtomicU64,
    /// Of `rejected`: payloads that were not an `EventEnvelope` at all.
    pub undecodable: AtomicU64,
    /// Redeliveries at or below the store checkpoint, skipped.
    pub below_checkpoint: AtomicU64,
    /// Committed batches.
    pub batches: AtomicU64,
    /// Live deliveries published.
    pub deliveries: AtomicU64,
    /// Live deliveries NATS did not take (devices gap-fill from the store).
    pub delivery_failures: AtomicU64,
    /// Batch attempts the store failed (each retried).
    pub store_retries: AtomicU64,
    /// The checkpoint after the most recent commit, on whichever stream it was.
    pub last_applied_seq: AtomicU64,
    checkpoints: Mutex<BTreeMap<String, u64>>,
}

impl ApplierMetrics {
    pub(crate) fn record_batch(&self, stream: &str, r: &ApplyReport) {
        self.applied.fetch_add(r.applied as u64, Ordering::Relaxed);
        self.duplicates.fetch_add(r.duplicates as u64, Ordering::Relaxed);
        self.rejected.fetch_add(r.rejected as u64, Ordering::Relaxed);
        self.below_checkpoint
            .fetch_add(r.below_checkpoint as u64, Ordering::Relaxed);
        self.batches.fetch_add(1, Ordering::Relaxed);
        self.last_applied_seq.store(r.checkpoint, Ordering::Relaxed);
        if let Ok(mut m) = self.checkpoints.lock() {
            m.insert(stream.to_string(), r.checkpoint);
        }
    }

    pub(crate) fn record_undecodable(&self) {
        self.undecodable.fetch_add(1, Ordering::Relaxed);
    }

    pub(crate) fn record_store_retry(&self) {
        self.store_retries.fetch_add(1, Ordering::Relaxed);
    }

    pub(crate) fn record_delivery(&self, ok: bool) {
        let c = if ok {
            &self.deliveries
        } else {
            &self.delivery_failures
        };
        c.fetch_add(1, Ordering::Relaxed);
    }

    /// The checkpoint this applier last committed on `stream`.
    pub fn checkpoint(&self, stream: &str) -> Option<u64> {
        self.checkpoints.lock().ok()?.get(stream).copied()
    }

    /// Every stream's last committed checkpoint.
    pub fn checkpoints(&self) -> BTreeMap<String, u64> {
        self.checkpoints.lock().map(|m| m.clone()).unwrap_or_default()
    }

    /// The counters in Prometheus text exposition format.
    pub fn render_prometheus(&self) -> String {
        let mut out = String::new();
        let counters = [
            ("applied", &self.applied, "Events whose effects were applied."),
            (
                "duplicates",
                &self.duplicates,
                "Events already applied under another sequence.",
            ),
            (
                "rejected",
                &self.rejected,
                "Events recorded as applied without effect.",
            ),
            (
                "undecodable",
                &self.undecodable,
                "Payloads that were not an event envelope.",
            ),
            (
                "below_checkpoint",
                &self.below_checkpoint,
                "Redeliveries skipped by the checkpoint.",
            ),
            ("batches", &self.batches, "Committed batches."),
            ("deliveries", &self.deliveries, "Live deliveries published."),
            (
                "delivery_failures",
                &self.delivery_failures,
                "Live deliveries NATS did not take.",
            ),
            (
                "store_retries",
                &self.store_retries,
                "Batch attempts the store failed.",
            ),
        ];
        for (name, v, help) in counters {
            let _ = writeln!(out, "# HELP meridian_applier_{name}_total {help}");
            let _ = writeln!(out, "# TYPE meridian_applier_{name}_total counter");
            let _ = writeln!(out, "meridian_applier_{name}_total {}", v.load(Ordering::Relaxed));
        }
        let _ = writeln!(
            out,
            "# HELP meridian_applier_checkpoint Last committed stream sequence."
        );
        let _ = writeln!(out, "# TYPE meridian_applier_checkpoint gauge");
        for (stream, seq) in self.checkpoints() {
            let _ = writeln!(out, "meridian_applier_checkpoint{{stream=\"{stream}\"}} {seq}");
        }
        out
    }
}
