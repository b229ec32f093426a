//! One inbox entry: decide whether anyone is to be notified, then notify each device with
//! retries.

use std::hash::{BuildHasher as _, Hasher as _};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use meridian_bus::Bus;
use meridian_model::events::{self, event_envelope::Body, EventEnvelope};
use meridian_model::{ConversationId, EventId, HybridClock, UserId};
use meridian_store::directory::DeviceView;
use meridian_store::records::InboxEntry;
use meridian_store::{Store, StoreError};
use tokio::sync::Semaphore;

use crate::dedup::{self, RecentKeys};
use crate::metrics::PushMetrics;
use crate::payload::Notification;
use crate::providers::{Attempt, Provider, Providers};
use crate::{Presence, PushConfig, PushError};

/// Store reads are retried this many times (a transaction conflict, a TiKV region moving)
/// before the entry is given up; the device still syncs it, so this need not be patient.
const STORE_ATTEMPTS: u32 = 3;
const STORE_BACKOFF: Duration = Duration::from_millis(50);
/// Dead tokens remembered as already removed; they arrive in bursts (one per entry under
/// way to the device), so a few thousand cover it.
const UNREGISTERED_CAPACITY: usize = 4_096;
/// The actor of events push publishes, as "admin" is the actor of admin calls.
pub(crate) const PUSH_ACTOR: &str = "push";

pub(crate) struct Dispatcher {
    cfg: PushConfig,
    store: Store,
    presence: Arc<dyn Presence>,
    metrics: Arc<PushMetrics>,
    providers: Providers,
    recent: Mutex<RecentKeys>,
    /// Where a dead device token's removal is published, stamped with this clock.
    bus: Bus,
    clock: HybridClock,
    /// (user, device, token) removals already published: every notification under way to
    /// a dead token hears the same answer, and one event is enough.
    unregistered: Mutex<RecentKeys>,
    /// Provider requests in flight. Held for one request, not across a backoff sleep, so
    /// a provider that is failing does not hold slots while it waits.
    sends: Semaphore,
}

impl Dispatcher {
    pub(crate) fn new(
        cfg: PushConfig,
        bus: Bus,
        store: Store,
        presence: Arc<dyn Presence>,
        metrics: Arc<PushMetrics>,
    ) -> Result<Self, PushError> {
        let providers = Providers::new(&cfg)?;
        let sends = Semaphore::new(cfg.concurrency);
        Ok(Self {
            cfg,
            store,
            presence,
            metrics,
            providers,
            recent: Mutex::new(RecentKeys::new(dedup::CAPACITY)),
            bus,
            clock: HybridClock::new(),
            unregistered: Mutex::new(RecentKeys::new(UNREGISTERED_CAPACITY)),
            sends,
        })
    }

    /// Handles one delivery end to end; every outcome lands in a counter.
    pub(crate) async fn handle(self: Arc<Self>, user: UserId, entry: InboxEntry) {
        let m = &self.metrics;
        let timeline = entry.entry.clone().unwrap_or_default();
        // The sender's own message (or read, or setting) is already on the device that did
        // it, and the user's other devices sync it: no alert for what you did yourself.
        if timeline.actor == user.as_str() {
            bump(&m.skipped_own);
            return;
        }
        if self.presence.is_online(&user) {
            bump(&m.skipped_online);
            return;
        }
        let Ok(cid) = ConversationId::parse(entry.conversation_id.as_str()) else {
            bump(&m.undecodable);
            tracing::warn!(%user, conversation_id = %entry.conversation_id, "push: entry names no valid conversation");
            return;
        };
        let settings = match self
            .read_store("settings", || self.store.settings(&cid, &user))
            .await
        {
            Some(s) => s,
            None => return,
        };
        if settings.muted {
            bump(&m.skipped_muted);
            return;
        }
        let devices = match self.read_store("devices", || self.store.devices(&user)).await {
            Some(d) => d,
            None => return,
        };
        if devices.is_empty() {
            bump(&m.skipped_no_device);
            return;
        }
        let title = self.title(&timeline.actor).await;
        let sends = devices.into_iter().map(|device| {
            let n = Notification {
                user_id: user.to_string(),
                device_id: device.device_id.clone(),
                token: device.token.clone(),
                platform: device.platform.clone(),
                seq: entry.seq,
                conversation_id: entry.conversation_id.clone(),
                kind: timeline.kind.clone(),
                sender: timeline.actor.clone(),
                sent_at: timeline.at_ms,
                title: title.clone(),
            };
            self.notify_device(device, &entry.order_key, n)
        });
        // A user has a handful of devices; they are notified side by side, each request
        // holding a slot of `sends`.
        futures::future::join_all(sends).await;
    }

    /// One device: dedup, then attempts with exponential backoff until sent, refused, or
    /// `max_attempts` used up.
    async fn notify_device(&self, device: DeviceView, order_key: &[u8], n: Notification) {
        let m = &self.metrics;
        let Some(provider) = Provider::from_platform(&device.platform) else {
            bump(&m.skipped_unsupported);
            tracing::debug!(user = %n.user_id, device = %device.device_id, platform = %device.platform, "push: unknown platform");
            return;
        };
        if !self.providers.configured(provider) {
            bump(&m.skipped_unsupported);
            tracing::debug!(user = %n.user_id, device = %device.device_id, provider = provider.as_str(), "push: provider not configured");
            return;
        }
        let key = dedup::key(&n.user_id, &device.device_id, n.seq, order_key);
        let first = match self.recent.lock() {
            Ok(mut r) => r.insert(key),
            // Poisoned only by a panic inside `insert`; better a possible duplicate than
            // no push at all.
            Err(poisoned) => poisoned.into_inner().insert(key),
        };
        if !first {
            bump(&m.duplicates);
            return;
        }

        for attempt in 1..=self.cfg.max_attempts {
            let outcome = {
                // Closed never happens (we own the semaphore); if it did, stop quietly.
                let Ok(_permit) = self.sends.acquire().await else {
                    return;
                };
                m.record_attempt(provider);
                self.providers.send(provider, &n).await
            };
            match outcome {
                Attempt::Sent => {
                    m.record_sent(provider);
                    tracing::debug!(user = %n.user_id, device = %n.device_id, seq = n.seq, provider = provider.as_str(), attempt, "push: sent");
                    return;
                }
                Attempt::Unregistered { reason } => {
                    m.record_unregistered(provider);
                    tracing::info!(user = %n.user_id, device = %n.device_id, seq = n.seq, provider = provider.as_str(), %reason, "push: the device token is dead; unregistering the device");
                    self.unregister(&n).await;
                    return;
                }
                Attempt::Permanent { reason } => {
                    m.record_failed(provider);
                    tracing::warn!(user = %n.user_id, device = %n.device_id, seq = n.seq, provider = provider.as_str(), %reason, "push: refused; not retrying");
                    return;
                }
                Attempt::Retry { reason, after } => {
                    if attempt >= self.cfg.max_attempts {
                        m.record_failed(provider);
                        tracing::warn!(user = %n.user_id, device = %n.device_id, seq = n.seq, provider = provider.as_str(), attempts = attempt, %reason, "push: giving up");
                        return;
                    }
                    m.record_retry(provider);
                    let wait = self.backoff(attempt, after);
                    tracing::debug!(user = %n.user_id, device = %n.device_id, provider = provider.as_str(), attempt, ?wait, %reason, "push: retrying");
                    tokio::time::sleep(wait).await;
                }
            }
        }
    }

    /// Removes a registration whose token the provider reported dead, the way the device
    /// itself would: a `DeviceUnregistered` event on the region's stream, applied by the
    /// applier like any other and replicated with it. Push never writes the store. The
    /// event names the dead token, so a registration renewed with a new token since (the
    /// app reinstalled) is not the one removed.
    async fn unregister(&self, n: &Notification) {
        let claim = dedup::key(&n.user_id, &n.device_id, 0, n.token.as_bytes());
        let first = match self.unregistered.lock() {
            Ok(mut r) => r.insert(claim),
            Err(poisoned) => poisoned.into_inner().insert(claim),
        };
        if !first {
            return;
        }
        let mut span = meridian_telemetry::start_in_current(
            meridian_telemetry::Role::Push,
            "unregister device",
            meridian_telemetry::SpanKind::Producer,
        );
        let event_id = EventId::new_v7();
        let envelope = EventEnvelope {
            event_id: event_id.as_bytes().to_vec(),
            origin_region: self.bus.region().to_string(),
            hlc: self.clock.now().0,
            actor: PUSH_ACTOR.into(),
            actor_device: String::new(),
            traceparent: span.traceparent(),
            tracestate: String::new(),
            body: Some(Body::DeviceUnregistered(events::DeviceUnregistered {
                user_id: n.user_id.clone(),
                device_id: n.device_id.clone(),
                token: n.token.clone(),
            })),
        };
        match self.bus.publish_event(&envelope).await {
            Ok(ack) => {
                bump(&self.metrics.devices_unregistered);
                span.set_attribute("meridian.stream_seq", ack.stream_seq as i64);
                tracing::info!(user = %n.user_id, device = %n.device_id, %event_id, stream_seq = ack.stream_seq, "push: device unregistered");
            }
            Err(e) => {
                bump(&self.metrics.unregister_failures);
                span.set_error(e.to_string());
                tracing::warn!(user = %n.user_id, device = %n.device_id, error = %e, "push: publishing the device removal failed; the next dead-token answer tries again");
                match self.unregistered.lock() {
                    Ok(mut r) => r.forget(&claim),
                    Err(poisoned) => poisoned.into_inner().forget(&claim),
                }
            }
        }
        span.end();
    }

    /// `first_backoff_ms` doubled per retry, capped at `max_backoff_ms`, with jitter into
    /// its upper half so devices that failed together do not retry together. A provider's
    /// `Retry-After` is honoured up to the cap.
    fn backoff(&self, attempt: u32, retry_after: Option<Duration>) -> Duration {
        backoff(
            self.cfg.first_backoff_ms,
            self.cfg.max_backoff_ms,
            attempt,
            retry_after,
        )
    }

    /// The sender's display name, or their id when they have none or the read fails (a
    /// title is not worth delaying the push for).
    async fn title(&self, actor: &str) -> String {
        let Ok(id) = UserId::parse(actor) else {
            return actor.to_string();
        };
        match self.store.user(&id).await {
            Ok(Some(u)) if !u.display_name.is_empty() => u.display_name,
            _ => actor.to_string(),
        }
    }

    /// A store read with a few quick retries. `None` (counted) when it keeps failing.
    async fn read_store<T, F, Fut>(&self, what: &str, mut read: F) -> Option<T>
    where
        F: FnMut() -> Fut,
        Fut: std::future::Future<Output = Result<T, StoreError>>,
    {
        let mut wait = STORE_BACKOFF;
        for attempt in 1..=STORE_ATTEMPTS {
            match read().await {
                Ok(v) => return Some(v),
                Err(e) if attempt < STORE_ATTEMPTS => {
                    tracing::debug!(what, error = %e, "push: store read failed; retrying");
                    tokio::time::sleep(wait).await;
                    wait *= 2;
                }
                Err(e) => {
                    bump(&self.metrics.store_errors);
                    tracing::warn!(what, error = %e, "push: store read failed; dropping the entry");
                }
            }
        }
        None
    }
}

/// The wait after failed attempt number `attempt` (from 1).
fn backoff(first_ms: u64, cap_ms: u64, attempt: u32, retry_after: Option<Duration>) -> Duration {
    let exp = first_ms
        .saturating_mul(1u64 << attempt.saturating_sub(1).min(20))
        .min(cap_ms);
    let jittered = exp / 2 + jitter(exp - exp / 2);
    let floor = retry_after.map_or(0, |d| (d.as_millis() as u64).min(cap_ms));
    Duration::from_millis(jittered.max(floor))
}

fn bump(c: &prometheus_client::metrics::counter::Counter) {
    c.inc();
}

/// A value in `0..=span`, random enough for jitter: std's `RandomState` is seeded per
/// instance, which spares a dependency on `rand` for this one use.
fn jitter(span: u64) -> u64 {
    if span == 0 {
        return 0;
    }
    let mut h = std::collections::hash_map::RandomState::new().build_hasher();
    h.write_u64(span);
    h.finish() % (span + 1)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn backoff_doubles_to_the_cap_and_honours_retry_after() {
        let ms = |d: Duration| d.as_millis() as u64;
        for _ in 0..100 {
            assert!((100..=200).contains(&ms(backoff(200, 10_000, 1, None))));
            assert!((200..=400).contains(&ms(backoff(200, 10_000, 2, None))));
            assert!((400..=800).contains(&ms(backoff(200, 10_000, 3, None))));
            assert!((5_000..=10_000).contains(&ms(backoff(200, 10_000, 30, None))));
            assert_eq!(ms(backoff(200, 10_000, 1, Some(Duration::from_secs(3)))), 3_000);
            // Retry-After is honoured only up to the cap.
            assert!(ms(backoff(200, 10_000, 1, Some(Duration::from_secs(3600)))) <= 10_000);
        }
    }

    #[test]
    fn jitter_stays_in_range() {
        assert_eq!(jitter(0), 0);
        for _ in 0..1000 {
            assert!(jitter(7) <= 7);
        }
    }
}
