//! [`PushMetrics`]: counters since start, shared (via `Arc`) with whoever serves `/metrics`,
//! which encodes them from the process's one prometheus-client registry
//! ([`PushMetrics::register`]).

use prometheus_client::encoding::EncodeLabelSet;
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::registry::Registry;

use crate::providers::Provider;

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct ReasonLabel {
    reason: &'static str,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct ProviderLabel {
    provider: &'static str,
}

/// One provider's counters: series of the `meridian_push_provider_*` families.
/// `attempts` counts HTTP requests made (first tries and retries).
#[derive(Debug)]
pub struct ProviderMetrics {
    pub attempts: Counter,
    pub sent: Counter,
    pub failed: Counter,
    pub retries: Counter,
    /// Notifications the provider answered with "this device token is dead".
    pub unregistered: Counter,
}

/// The labelled families; the named fields of [`PushMetrics`] and [`ProviderMetrics`] are
/// their series (a `Counter` clone shares its value), created up front so every series is
/// exported from the start, at zero.
#[derive(Debug, Default)]
struct Families {
    skipped: Family<ReasonLabel, Counter>,
    attempts: Family<ProviderLabel, Counter>,
    sent: Family<ProviderLabel, Counter>,
    failed: Family<ProviderLabel, Counter>,
    retries: Family<ProviderLabel, Counter>,
    unregistered: Family<ProviderLabel, Counter>,
}

/// Every counter is monotonic except the `in_flight` gauge.
///
/// One delivery ends in exactly one of: a `skipped_*`, `undecodable`, `store_errors`, or
/// per device one of `notifications_sent`, `failed`, `duplicates`, `skipped_unsupported`.
#[derive(Debug)]
pub struct PushMetrics {
    /// Deliveries read from the bus.
    pub entries: Counter,
    /// Device notifications a provider accepted.
    pub notifications_sent: Counter,
    /// Device notifications given up on: a permanent refusal (4xx other than 429), a dead
    /// token, or `max_attempts` used up.
    pub failed: Counter,
    /// Attempts that were followed by another (5xx, 429, transport errors).
    pub retries: Counter,
    /// The user had a live connection in the region.
    pub skipped_online: Counter,
    /// The user muted the conversation.
    pub skipped_muted: Counter,
    /// The user has no registered device.
    pub skipped_no_device: Counter,
    /// The user's own action (their message, their read): their other devices sync it.
    pub skipped_own: Counter,
    /// Device notifications whose platform has no configured provider (or is unknown).
    pub skipped_unsupported: Counter,
    /// Device notifications already made for the same entry (a republished delivery).
    pub duplicates: Counter,
    /// Deliveries that were not an inbox entry for a user.
    pub undecodable: Counter,
    /// Deliveries dropped because the store could not be read (after retries).
    pub store_errors: Counter,
    /// Device registrations removed (a `DeviceUnregistered` event published) because the
    /// provider reported the token dead.
    pub devices_unregistered: Counter,
    /// Such removals whose publish failed (the next dead-token answer tries again).
    pub unregister_failures: Counter,
    /// Entry tasks running now.
    pub in_flight: Gauge,
    pub webhook: ProviderMetrics,
    pub apns: ProviderMetrics,
    pub fcm: ProviderMetrics,
    families: Families,
}

impl Default for PushMetrics {
    fn default() -> Self {
        let families = Families::default();
        let skipped = |reason| families.skipped.get_or_create(&ReasonLabel { reason }).clone();
        let provider = |p: Provider| {
            let label = ProviderLabel { provider: p.as_str() };
            ProviderMetrics {
                attempts: families.attempts.get_or_create(&label).clone(),
                sent: families.sent.get_or_create(&label).clone(),
                failed: families.failed.get_or_create(&label).clone(),
                retries: families.retries.get_or_create(&label).clone(),
                unregistered: families.unregistered.get_or_create(&label).clone(),
            }
        };
        Self {
            entries: Counter::default(),
            notifications_sent: Counter::default(),
            failed: Counter::default(),
            retries: Counter::default(),
            skipped_online: skipped("online"),
            skipped_muted: skipped("muted"),
            skipped_no_device: skipped("no_device"),
            skipped_own: skipped("own"),
            skipped_unsupported: skipped("unsupported"),
            duplicates: Counter::default(),
            undecodable: Counter::default(),
            store_errors: Counter::default(),
            devices_unregistered: Counter::default(),
            unregister_failures: Counter::default(),
            in_flight: Gauge::default(),
            webhook: provider(Provider::Webhook),
            apns: provider(Provider::Apns),
            fcm: provider(Provider::Fcm),
            families,
        }
    }
}

impl PushMetrics {
    pub fn provider(&self, p: Provider) -> &ProviderMetrics {
        match p {
            Provider::Webhook => &self.webhook,
            Provider::Apns => &self.apns,
            Provider::Fcm => &self.fcm,
        }
    }

    /// Registers every metric under `meridian_push_` (counters get `_total`).
    pub fn register(&self, registry: &mut Registry) {
        let r = registry.sub_registry_with_prefix("meridian_push");
        let plain = [
            ("entries", "Deliveries read from the bus", &self.entries),
            (
                "notifications_sent",
                "Device notifications a provider accepted",
                &self.notifications_sent,
            ),
            (
                "notifications_failed",
                "Device notifications given up on (refused, dead token, or attempts used up)",
                &self.failed,
            ),
            ("retries", "Provider attempts followed by a retry", &self.retries),
            (
                "duplicates",
                "Device notifications skipped as already made for the same entry",
                &self.duplicates,
            ),
            (
                "undecodable",
                "Deliveries that were not an inbox entry",
                &self.undecodable,
            ),
            (
                "store_errors",
                "Deliveries dropped because the store could not be read",
                &self.store_errors,
            ),
            (
                "devices_unregistered",
                "Device registrations removed because the provider reported the token dead",
                &self.devices_unregistered,
            ),
            (
                "unregister_failures",
                "Device removals whose event could not be published",
                &self.unregister_failures,
            ),
        ];
        for (name, help, counter) in plain {
            r.register(name, help, counter.clone());
        }
        r.register(
            "skipped",
            "Deliveries or device notifications not pushed, by reason",
            self.families.skipped.clone(),
        );
        let f = &self.families;
        for (name, help, family) in [
            ("provider_attempts", "Provider requests made", &f.attempts),
            ("provider_sent", "Notifications the provider accepted", &f.sent),
            ("provider_failed", "Notifications given up on", &f.failed),
            ("provider_retries", "Requests followed by a retry", &f.retries),
            (
                "provider_unregistered",
                "Notifications answered with \"this device token is dead\"",
                &f.unregistered,
            ),
        ] {
            r.register(name, help, family.clone());
        }
        r.register("in_flight", "Entries being handled now", self.in_flight.clone());
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

    pub(crate) fn record_entry(&self) {
        self.entries.inc();
    }
    pub(crate) fn record_undecodable(&self) {
        self.undecodable.inc();
    }
    pub(crate) fn set_in_flight(&self, n: usize) {
        self.in_flight.set(i64::try_from(n).unwrap_or(i64::MAX));
    }
    pub(crate) fn record_attempt(&self, p: Provider) {
        self.provider(p).attempts.inc();
    }
    pub(crate) fn record_sent(&self, p: Provider) {
        self.notifications_sent.inc();
        self.provider(p).sent.inc();
    }
    pub(crate) fn record_failed(&self, p: Provider) {
        self.failed.inc();
        self.provider(p).failed.inc();
    }
    pub(crate) fn record_unregistered(&self, p: Provider) {
        self.record_failed(p);
        self.provider(p).unregistered.inc();
    }
    pub(crate) fn record_retry(&self, p: Provider) {
        self.retries.inc();
        self.provider(p).retries.inc();
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn renders_every_family_with_its_values() {
        let m = PushMetrics::default();
        m.record_sent(Provider::Apns);
        m.record_retry(Provider::Webhook);
        m.record_retry(Provider::Webhook);
        m.record_failed(Provider::Fcm);
        m.skipped_muted.inc();
        let text = m.render_prometheus();
        for line in [
            "meridian_push_notifications_sent_total 1",
            "meridian_push_notifications_failed_total 1",
            "meridian_push_retries_total 2",
            "meridian_push_skipped_total{reason=\"muted\"} 1",
            "meridian_push_skipped_total{reason=\"online\"} 0",
            "meridian_push_provider_sent_total{provider=\"apns\"} 1",
            "meridian_push_provider_retries_total{provider=\"webhook\"} 2",
            "meridian_push_provider_failed_total{provider=\"fcm\"} 1",
            "# TYPE meridian_push_in_flight gauge",
        ] {
            assert!(text.lines().any(|l| l == line), "missing {line:?} in\n{text}");
        }
        // Every sample line belongs to a declared family.
        for l in text.lines().filter(|l| !l.starts_with('#')) {
            let name = l.split(['{', ' ']).next().unwrap();
            let family = name.strip_suffix("_total").unwrap_or(name);
            assert!(
                text.contains(&format!("# TYPE {family} ")),
                "{name} has no TYPE line"
            );
        }
    }
}
