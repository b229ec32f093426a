//! [`PushMetrics`]: counters since start, shared (via `Arc`) with whoever serves `/metrics`.

use std::fmt::Write as _;
use std::sync::atomic::{AtomicU64, Ordering};

use crate::providers::Provider;

/// One provider's counters. `attempts` counts HTTP requests made (first tries and retries).
#[derive(Debug, Default)]
pub struct ProviderMetrics {
    pub attempts: AtomicU64,
    pub sent: AtomicU64,
    pub failed: AtomicU64,
    pub retries: AtomicU64,
}

/// Every counter is monotonic except the `in_flight` gauge.
///
/// One delivery ends in exactly one of: a `skipped_*`, `undecodable`, `store_errors`, or
/// per device one of `notifications_sent`, `failed`, `duplicates`, `skipped_unsupported`.
#[derive(Debug, Default)]
pub struct PushMetrics {
    /// Deliveries read from the bus.
    pub entries: AtomicU64,
    /// Device notifications a provider accepted.
    pub notifications_sent: AtomicU64,
    /// Device notifications given up on: a permanent refusal (4xx other than 429) or
    /// `max_attempts` used up.
    pub failed: AtomicU64,
    /// Attempts that were followed by another (5xx, 429, transport errors).
    pub retries: AtomicU64,
    /// The user had a live connection in the region.
    pub skipped_online: AtomicU64,
    /// The user muted the conversation.
    pub skipped_muted: AtomicU64,
    /// The user has no registered device.
    pub skipped_no_device: AtomicU64,
    /// The user's own action (their message, their read): their other devices sync it.
    pub skipped_own: AtomicU64,
    /// Device notifications whose platform has no configured provider (or is unknown).
    pub skipped_unsupported: AtomicU64,
    /// Device notifications already made for the same entry (a republished delivery).
    pub duplicates: AtomicU64,
    /// Deliveries that were not an inbox entry for a user.
    pub undecodable: AtomicU64,
    /// Deliveries dropped because the store could not be read (after retries).
    pub store_errors: AtomicU64,
    /// Entry tasks running now.
    pub in_flight: AtomicU64,
    pub webhook: ProviderMetrics,
    pub apns: ProviderMetrics,
    pub fcm: ProviderMetrics,
}

/// Picks one counter out of a provider's set, for rendering.
type ProviderField = fn(&ProviderMetrics) -> &AtomicU64;

fn inc(c: &AtomicU64) {
    c.fetch_add(1, Ordering::Relaxed);
}

impl PushMetrics {
    pub fn provider(&self, p: Provider) -> &ProviderMetrics {
        match p {
            Provider::Webhook => &self.webhook,
            Provider::Apns => &self.apns,
            Provider::Fcm => &self.fcm,
        }
    }

    pub(crate) fn record_entry(&self) {
        inc(&self.entries);
    }
    pub(crate) fn record_undecodable(&self) {
        inc(&self.undecodable);
    }
    pub(crate) fn set_in_flight(&self, n: usize) {
        self.in_flight.store(n as u64, Ordering::Relaxed);
    }
    pub(crate) fn record_attempt(&self, p: Provider) {
        inc(&self.provider(p).attempts);
    }
    pub(crate) fn record_sent(&self, p: Provider) {
        inc(&self.notifications_sent);
        inc(&self.provider(p).sent);
    }
    pub(crate) fn record_failed(&self, p: Provider) {
        inc(&self.failed);
        inc(&self.provider(p).failed);
    }
    pub(crate) fn record_retry(&self, p: Provider) {
        inc(&self.retries);
        inc(&self.provider(p).retries);
    }

    /// The counters in Prometheus text exposition format.
    pub fn render_prometheus(&self) -> String {
        let mut out = String::new();
        let load = |c: &AtomicU64| c.load(Ordering::Relaxed);
        let plain = [
            ("entries", &self.entries, "Deliveries read from the bus."),
            (
                "notifications_sent",
                &self.notifications_sent,
                "Device notifications a provider accepted.",
            ),
            (
                "notifications_failed",
                &self.failed,
                "Device notifications given up on (refused, or attempts used up).",
            ),
            ("retries", &self.retries, "Provider attempts followed by a retry."),
            (
                "duplicates",
                &self.duplicates,
                "Device notifications skipped as already made for the same entry.",
            ),
            (
                "undecodable",
                &self.undecodable,
                "Deliveries that were not an inbox entry.",
            ),
            (
                "store_errors",
                &self.store_errors,
                "Deliveries dropped because the store could not be read.",
            ),
        ];
        for (name, v, help) in plain {
            let _ = writeln!(out, "# HELP meridian_push_{name}_total {help}");
            let _ = writeln!(out, "# TYPE meridian_push_{name}_total counter");
            let _ = writeln!(out, "meridian_push_{name}_total {}", load(v));
        }

        let _ = writeln!(
            out,
            "# HELP meridian_push_skipped_total Deliveries or device notifications not pushed, by reason."
        );
        let _ = writeln!(out, "# TYPE meridian_push_skipped_total counter");
        for (reason, v) in [
            ("online", &self.skipped_online),
            ("muted", &self.skipped_muted),
            ("no_device", &self.skipped_no_device),
            ("own", &self.skipped_own),
            ("unsupported", &self.skipped_unsupported),
        ] {
            let _ = writeln!(
                out,
                "meridian_push_skipped_total{{reason=\"{reason}\"}} {}",
                load(v)
            );
        }

        let families: [(&str, &str, ProviderField); 4] = [
            ("attempts", "Provider requests made.", |p| &p.attempts),
            ("sent", "Notifications the provider accepted.", |p| &p.sent),
            ("failed", "Notifications given up on.", |p| &p.failed),
            ("retries", "Requests followed by a retry.", |p| &p.retries),
        ];
        for (name, help, get) in families {
            let _ = writeln!(out, "# HELP meridian_push_provider_{name}_total {help}");
            let _ = writeln!(out, "# TYPE meridian_push_provider_{name}_total counter");
            for p in Provider::ALL {
                let _ = writeln!(
                    out,
                    "meridian_push_provider_{name}_total{{provider=\"{}\"}} {}",
                    p.as_str(),
                    load(get(self.provider(p)))
                );
            }
        }

        let _ = writeln!(out, "# HELP meridian_push_in_flight Entries being handled now.");
        let _ = writeln!(out, "# TYPE meridian_push_in_flight gauge");
        let _ = writeln!(out, "meridian_push_in_flight {}", load(&self.in_flight));
        out
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
        inc(&m.skipped_muted);
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
            assert!(
                text.contains(&format!("# TYPE {name} ")),
                "{name} has no TYPE line"
            );
        }
    }
}
