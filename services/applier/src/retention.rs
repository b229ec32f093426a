//! Stream retention: trims events from the streams this region holds once nobody can need
//! them from the stream any more.
//!
//! The store, not the stream, is the record of what was applied (docs/design.md §4): an
//! event the store has committed with its checkpoint is never read from the stream again by
//! this region. So an event of stream `S` is trimmed from this region's copy of `S` when
//! 1. this region has applied it (the store's checkpoint of `S`, same stream instance: each
//!    apply transaction commits durably, checkpoint included);
//! 2. for the region's own stream, every other region's mirror holds it (asked in that
//!    region's JetStream domain): the mirrors copy from this stream, and a region that does
//!    not answer holds trimming back (its mirror may be behind) rather than be cut off;
//! 3. it is older than `retain_applied_s`, and never younger than the bus's duplicate
//!    window: a publish retried through a NATS restart must still meet its original, and a
//!    restarted server rebuilds its duplicate table from the events the stream still holds.
//!
//! The age is tracked here, not read from the events: every pass records the stream's last
//! sequence, and the newest sequence recorded at least the retention ago is the age bound.
//! A restarted applier therefore trims nothing for one retention period. Without trimming
//! the streams grew by every event forever (bounded only by `max_age_s`, 30 days), and the
//! stream was the larger part of the bytes on disk per message.

use std::collections::{HashMap, VecDeque};
use std::time::{Duration, Instant};

use meridian_bus::{Bus, StreamState};
use meridian_store::Store;
use tokio_util::sync::CancellationToken;

use crate::ApplierError;

/// How often each stream is looked at.
const PASS_INTERVAL: Duration = Duration::from_secs(10);

/// One pass per `PASS_INTERVAL` over every stream in `streams`, until `stop`. Failures are
/// logged and retried next pass: trimming late costs disk, never data.
pub(crate) async fn run(
    bus: Bus,
    store: Store,
    streams: Vec<String>,
    retain: Duration,
    stop: CancellationToken,
) -> Result<(), ApplierError> {
    let mut ages = StreamAges::new(retain);
    loop {
        tokio::select! {
            _ = stop.cancelled() => return Ok(()),
            _ = tokio::time::sleep(PASS_INTERVAL) => {}
        }
        for stream in &streams {
            match trim_once(&bus, &store, stream, &mut ages).await {
                Ok(Some((through, purged))) if purged > 0 => {
                    tracing::debug!(stream, through, purged, "stream trimmed");
                }
                Ok(_) => {}
                Err(e) => {
                    tracing::debug!(stream, error = %e, "stream retention pass failed; next pass retries")
                }
            }
        }
    }
}

/// Trims `stream` as far as the three rules allow; answers (through seq, events purged)
/// when it purged, `None` when nothing may go yet.
async fn trim_once(
    bus: &Bus,
    store: &Store,
    stream: &str,
    ages: &mut StreamAges,
) -> Result<Option<(u64, u64)>, ApplierError> {
    let state = bus.stream_state(stream).await?;
    let Some(aged) = ages.record(stream, state.instance, state.last_seq, Instant::now()) else {
        return Ok(None);
    };
    trim_within(bus, store, stream, &state, aged).await
}

/// Trims from `stream` the events up to `aged_through` (rule 3, the caller's) that this
/// region has applied (rule 1) and, for the region's own stream, every other region's mirror
/// holds (rule 2). Answers (through seq, events purged) when it purged, `None` when nothing
/// may go yet. Public for the tests that check the rules against real streams; the
/// applier's retention task is what calls it in production.
pub async fn trim_applied(
    bus: &Bus,
    store: &Store,
    stream: &str,
    aged_through: u64,
) -> Result<Option<(u64, u64)>, ApplierError> {
    let state = bus.stream_state(stream).await?;
    trim_within(bus, store, stream, &state, aged_through).await
}

/// [`trim_applied`] with the stream's extent already read (the task reads it once a pass).
async fn trim_within(
    bus: &Bus,
    store: &Store,
    stream: &str,
    state: &StreamState,
    aged_through: u64,
) -> Result<Option<(u64, u64)>, ApplierError> {
    let cp = store.stream_checkpoint(stream).await?;
    if cp.instance != state.instance {
        // Another instance than the one checkpointed: the stream worker decides what to do.
        return Ok(None);
    }
    let mut through = cp.seq.min(aged_through).min(state.last_seq);
    if stream == bus.stream() {
        for region in &bus.config().mirrors {
            match bus.mirrored_seq(region).await {
                Ok(Some(held)) => through = through.min(held),
                // No mirror there yet, or no answer: it may still need all of it.
                Ok(None) | Err(_) => return Ok(None),
            }
        }
    }
    if through < state.first_seq || through == 0 {
        return Ok(None);
    }
    let purged = bus.trim_stream(stream, through).await?;
    Ok(Some((through, purged)))
}

/// Per stream, (when, last sequence) samples, newest last: the age bound of rule 3.
struct StreamAges {
    retain: Duration,
    samples: HashMap<String, (u64, VecDeque<(Instant, u64)>)>,
}

impl StreamAges {
    fn new(retain: Duration) -> Self {
        Self {
            retain,
            samples: HashMap::new(),
        }
    }

    /// Records `last_seq` of `instance` at `now`; answers the newest sequence recorded at
    /// least `retain` ago (every event up to it is at least that old), if any.
    fn record(&mut self, stream: &str, instance: u64, last_seq: u64, now: Instant) -> Option<u64> {
        let (inst, samples) = self
            .samples
            .entry(stream.to_string())
            .or_insert_with(|| (instance, VecDeque::new()));
        if *inst != instance {
            // A new instance numbers from 1 again: what was recorded says nothing of it.
            *inst = instance;
            samples.clear();
        }
        samples.push_back((now, last_seq));
        let mut aged = None;
        // Keep only the newest sample that is old enough, and everything after it.
        while let Some(&(at, seq)) = samples.front() {
            if now.duration_since(at) < self.retain {
                break;
            }
            aged = Some(seq);
            if samples.len() > 1 && now.duration_since(samples[1].0) >= self.retain {
                samples.pop_front();
            } else {
                break;
            }
        }
        aged
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_age_bound_is_the_newest_sequence_recorded_at_least_the_retention_ago() {
        let t0 = Instant::now();
        let s = Duration::from_secs;
        let mut ages = StreamAges::new(s(30));
        assert_eq!(ages.record("S", 1, 100, t0), None);
        assert_eq!(ages.record("S", 1, 200, t0 + s(10)), None);
        assert_eq!(ages.record("S", 1, 300, t0 + s(29)), None);
        assert_eq!(ages.record("S", 1, 400, t0 + s(30)), Some(100));
        assert_eq!(ages.record("S", 1, 500, t0 + s(45)), Some(200));
        assert_eq!(ages.record("S", 1, 600, t0 + s(100)), Some(500));
        // The samples older than the one answered are dropped: bounded memory.
        assert!(ages.samples["S"].1.len() <= 2);
        // A new instance starts over.
        assert_eq!(ages.record("S", 2, 5, t0 + s(101)), None);
        assert_eq!(ages.record("S", 2, 9, t0 + s(131)), Some(5));
        // Streams are independent.
        assert_eq!(ages.record("T", 1, 7, t0 + s(131)), None);
    }
}
