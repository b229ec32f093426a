//! Durability levels of sends (docs/design.md §6): which level a send gets, group commit
//! for regions whose JetStream fsyncs before acking (`disk`), and geo acks (`geo`).
//!
//! - Group commit: under `sync_interval: always` every stored message costs an fsync, so
//!   publishing sends one by one caps a region at the disk's fsync rate (about 850 acked
//!   msg/s here). [`GroupCommit`] queues the gateway's events and publishes whatever
//!   arrived together as one atomic batch ([`meridian_bus::Bus::publish_batch`]), stored
//!   with one fsync: the fsync rate is the batch rate, not the message rate.
//! - Geo acks: one task per gateway ([`GeoAcks`]) learns, from each other region's
//!   JetStream, the highest sequence of this region's stream its mirror holds, and wakes
//!   the sends waiting for it. It asks only while someone waits.

use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::Duration;

use axum::http::{HeaderMap, StatusCode};
use meridian_bus::{Bus, BusError, Durability, PublishAck, MAX_ATOMIC_BATCH};
use meridian_model::events::EventEnvelope;
use meridian_model::RegionId;
use tokio::sync::{mpsc, oneshot, watch, Semaphore};
use tokio::time::Instant;

use crate::error::{ApiError, ApiResult};
use crate::state::Counter;

/// The request header naming the level a send asks for.
pub const DURABILITY_HEADER: &str = "meridian-durability";

/// Events waiting for a batch; a full queue holds senders back (bounded memory).
const QUEUE: usize = 4 * MAX_ATOMIC_BATCH;
/// Batches being committed at once: while they are, the next one fills.
const BATCHES_IN_FLIGHT: usize = 2;
/// Pause between two rounds of asking the other regions while a geo ack is awaited; about
/// a loopback mirror's lag (p50 0.2 ms, p99 2-3 ms measured), so a round is rarely wasted.
const GEO_POLL: Duration = Duration::from_millis(2);
/// After a failed round (another region unreachable), wait longer before asking again.
const GEO_POLL_AFTER_ERROR: Duration = Duration::from_millis(100);

/// The level a send gets: the deployment's, or the stronger one it asks for (a weaker one
/// changes nothing: the region's JetStream fsyncs everything or nothing). Refused with 409
/// (a well-formed request this deployment cannot meet, not a malformed one) when the level
/// cannot be met here: `disk` in a region whose JetStream does not fsync
/// before acking (nats-server has no per-message or client-triggered fsync: it is the
/// server's `sync_interval`, so the only honest answer is no), `geo` in a region no other
/// region mirrors.
pub fn level_for(
    default: Durability,
    requested: Option<Durability>,
    has_other_regions: bool,
) -> ApiResult<Durability> {
    let level = requested.map_or(default, |r| r.max(default));
    if level == Durability::Disk && !default.fsyncs() {
        return Err(ApiError::new(
            StatusCode::CONFLICT,
            "durability_unavailable",
            format!(
                "this region's JetStream acknowledges before fsync (deployment durability {default}); \
                 disk needs a deployment run with --durability disk (or geo)"
            ),
        )
        .with("durability", default.as_str()));
    }
    if level == Durability::Geo && !has_other_regions {
        return Err(ApiError::new(
            StatusCode::CONFLICT,
            "durability_unavailable",
            "geo needs another region mirroring this one, and this region has none",
        )
        .with("durability", default.as_str()));
    }
    Ok(level)
}

/// The `Meridian-Durability` header, if given: `process`, `disk` or `geo` (any case).
pub fn requested(headers: &HeaderMap) -> ApiResult<Option<Durability>> {
    let Some(value) = headers.get(DURABILITY_HEADER) else {
        return Ok(None);
    };
    value
        .to_str()
        .ok()
        .and_then(|v| v.parse().ok())
        .map(Some)
        .ok_or_else(|| invalid_level(&String::from_utf8_lossy(value.as_bytes())))
}

/// A send frame's `durability` field, if given.
pub fn requested_in_frame(value: Option<&str>) -> ApiResult<Option<Durability>> {
    value.map(|v| v.parse().map_err(|_| invalid_level(v))).transpose()
}

fn invalid_level(value: &str) -> ApiError {
    ApiError::bad_request(
        "invalid_argument",
        format!("durability {value:?} is not one of process, disk, geo"),
    )
    .with("field", "durability")
}

/// The answer to a `geo` send whose copy in another region was not confirmed in time: the
/// event is stored here (at `met`) and will be applied and mirrored; a retry with the same
/// `client_msg_id` stores nothing twice and answers once the copy is confirmed.
pub fn not_geo_durable(region: &RegionId, met: Durability, waited: Duration, message_id: &str) -> ApiError {
    ApiError::new(
        StatusCode::SERVICE_UNAVAILABLE,
        "not_geo_durable",
        format!(
            "stored in region {region} (durability {met}) but no other region confirmed a copy within {} ms; \
             retrying with the same client_msg_id is safe",
            waited.as_millis()
        ),
    )
    .with("stored", true)
    .with("durability", met.as_str())
    .with("message_id", message_id)
    .retry_after(1)
}

type Reply = oneshot::Sender<Result<PublishAck, BusError>>;

/// Publishes events in atomic batches: see the module docs. Cheap to clone; the task ends
/// when the last clone is dropped, after committing what it had.
#[derive(Clone)]
pub struct GroupCommit {
    queue: mpsc::Sender<(EventEnvelope, Reply)>,
}

impl GroupCommit {
    /// Starts the batching task. `window`: how long a batch waits for more events after its
    /// first (0: only what arrives while earlier batches are being committed).
    pub fn start(bus: Bus, window: Duration, batches: Counter) -> GroupCommit {
        let (queue, rx) = mpsc::channel(QUEUE);
        tokio::spawn(run_group_commit(bus, window, rx, batches));
        GroupCommit { queue }
    }

    /// Publishes `env` with the next batch; returns its ack (after the batch's fsync).
    pub async fn publish(&self, env: EventEnvelope) -> Result<PublishAck, BusError> {
        let (reply, ack) = oneshot::channel();
        self.queue
            .send((env, reply))
            .await
            .map_err(|_| BusError::Unavailable("the gateway is shutting down".into()))?;
        ack.await
            .map_err(|_| BusError::Unavailable("the batch publisher stopped".into()))?
    }
}

async fn run_group_commit(
    bus: Bus,
    window: Duration,
    mut rx: mpsc::Receiver<(EventEnvelope, Reply)>,
    batches: Counter,
) {
    let slots = Arc::new(Semaphore::new(BATCHES_IN_FLIGHT));
    while let Some(first) = rx.recv().await {
        let mut batch = vec![first];
        let window_end = Instant::now() + window;
        let mut closed = false;
        // Take whatever arrives until the window is over and a commit slot is free.
        let permit = loop {
            if batch.len() >= MAX_ATOMIC_BATCH || closed {
                break slots.clone().acquire_owned().await;
            }
            let window_open = Instant::now() < window_end;
            tokio::select! {
                biased;
                more = rx.recv() => match more {
                    Some(p) => batch.push(p),
                    None => closed = true,
                },
                _ = tokio::time::sleep_until(window_end), if window_open => {}
                permit = slots.clone().acquire_owned(), if !window_open => break permit,
            }
        };
        let Ok(permit) = permit else { break };
        let bus = bus.clone();
        batches.inc();
        tokio::spawn(async move {
            let (envs, replies): (Vec<_>, Vec<_>) = batch.into_iter().unzip();
            match bus.publish_batch(&envs).await {
                Ok(acks) => {
                    for (reply, ack) in replies.into_iter().zip(acks) {
                        let _ = reply.send(Ok(ack));
                    }
                }
                Err(e) => {
                    let message = e.to_string();
                    for reply in replies {
                        let _ = reply.send(Err(BusError::Unavailable(message.clone())));
                    }
                }
            }
            drop(permit);
        });
        if closed {
            break;
        }
    }
    // Let the batches in flight finish before the task ends.
    let _ = slots.acquire_many(BATCHES_IN_FLIGHT as u32).await;
}

/// How far the other regions hold this region's stream: see the module docs. Cheap to
/// clone; the task ends when the last clone is dropped.
#[derive(Clone)]
pub struct GeoAcks {
    wanted: Arc<watch::Sender<u64>>,
    held: watch::Receiver<u64>,
    others: usize,
    /// Sends waiting now: with none, the task stops asking even if the last one wanted more
    /// than it got (it timed out).
    waiters: Arc<AtomicUsize>,
}

/// Counts one waiting send while it lives.
struct Waiting(Arc<AtomicUsize>);

impl Drop for Waiting {
    fn drop(&mut self) {
        self.0.fetch_sub(1, Ordering::SeqCst);
    }
}

impl GeoAcks {
    pub fn start(bus: Bus) -> GeoAcks {
        let others = bus.config().mirrors.clone();
        let (wanted, wanted_rx) = watch::channel(0u64);
        let (held_tx, held) = watch::channel(0u64);
        let count = others.len();
        let waiters = Arc::new(AtomicUsize::new(0));
        if count > 0 {
            tokio::spawn(run_geo_acks(bus, others, wanted_rx, held_tx, waiters.clone()));
        }
        GeoAcks {
            wanted: Arc::new(wanted),
            held,
            others: count,
            waiters,
        }
    }

    /// Whether any other region could hold a copy.
    pub fn available(&self) -> bool {
        self.others > 0
    }

    /// Waits until another region's mirror holds `seq` of this region's stream, at most
    /// `within`; false when it did not in time.
    pub async fn wait(&self, seq: u64, within: Duration) -> bool {
        self.waiters.fetch_add(1, Ordering::SeqCst);
        let _waiting = Waiting(self.waiters.clone());
        // Always notifies: a task idle after a timed-out waiter wakes for this one too.
        self.wanted.send_modify(|w| *w = (*w).max(seq));
        let mut held = self.held.clone();
        let reached = tokio::time::timeout(within, held.wait_for(|h| *h >= seq)).await;
        matches!(reached, Ok(Ok(_)))
    }
}

async fn run_geo_acks(
    bus: Bus,
    others: Vec<RegionId>,
    mut wanted: watch::Receiver<u64>,
    held: watch::Sender<u64>,
    waiters: Arc<AtomicUsize>,
) {
    loop {
        // Idle until a send waits for more than is known to be held.
        let want = match wanted.wait_for(|w| *w > *held.borrow()).await {
            Ok(w) => *w,
            Err(_) => return, // every GeoAcks dropped: the gateway stopped
        };
        let rounds = others.iter().map(|r| bus.mirrored_seq(r));
        let mut best = None::<u64>;
        let mut failed = false;
        for (region, answer) in others.iter().zip(futures::future::join_all(rounds).await) {
            match answer {
                Ok(Some(seq)) => best = Some(best.map_or(seq, |b| b.max(seq))),
                Ok(None) => {}
                Err(e) => {
                    failed = true;
                    tracing::debug!(%region, error = %e, "cannot read the region's mirror of our stream");
                }
            }
        }
        if let Some(best) = best {
            held.send_if_modified(|h| {
                let raise = best > *h;
                if raise {
                    *h = best;
                }
                raise
            });
        }
        if *held.borrow() < want {
            if waiters.load(Ordering::SeqCst) == 0 {
                // Nobody waits any more: idle until a send does.
                wanted.borrow_and_update();
                if wanted.changed().await.is_err() {
                    return;
                }
                continue;
            }
            let pause = if failed && best.is_none() {
                GEO_POLL_AFTER_ERROR
            } else {
                GEO_POLL
            };
            tokio::time::sleep(pause).await;
        }
    }
}
