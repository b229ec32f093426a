//! The read-diffusion flusher: one task per applier that, every tick, appends the trailing
//! `conversation_advanced` entries that came due (`Store::flush_coalesced`, which explains
//! why) and hands them to live delivery after they commit, as the stream workers do.

use std::sync::Arc;
use std::time::Duration;

use meridian_bus::Bus;
use meridian_store::{ApplyConfig, Store};
use tokio_util::sync::CancellationToken;

use crate::{publish_delivery, ApplierError, ApplierMetrics};

/// Conversations one tick flushes at most (each is one transaction).
const MAX_FLUSHES_PER_TICK: usize = 64;

/// Flushes until `stop`. Store failures are logged and retried next tick, never returned.
pub(crate) async fn run_flusher(
    store: Store,
    bus: Bus,
    cfg: ApplyConfig,
    metrics: Arc<ApplierMetrics>,
    stop: CancellationToken,
) -> Result<(), ApplierError> {
    // A quarter window: the end of a burst is announced at most 1.25 windows after it.
    let tick = Duration::from_millis((cfg.coalesce_window_ms / 4).clamp(20, 1_000));
    let mut cursor: Option<Vec<u8>> = None;
    loop {
        tokio::select! {
            biased;
            _ = stop.cancelled() => return Ok(()),
            _ = tokio::time::sleep(tick) => {}
        }
        let now_ms = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map_or(0, |d| d.as_millis() as u64);
        match store
            .flush_coalesced(&cfg, now_ms, cursor.as_deref(), MAX_FLUSHES_PER_TICK)
            .await
        {
            Ok(report) => {
                cursor = report.resume_after;
                if report.conflicts > 0 {
                    tracing::debug!(
                        conflicts = report.conflicts,
                        "coalesce flush lost to concurrent appends; retrying next tick"
                    );
                }
                for d in &report.deliveries {
                    publish_delivery(&bus, &metrics, d, None).await;
                }
            }
            Err(e) => tracing::warn!(error = %e, "coalesce flush failed; retrying next tick"),
        }
    }
}
