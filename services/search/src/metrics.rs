//! The indexer's metrics, registered into the process registry under `meridian_search_`.

use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::metrics::histogram::{exponential_buckets, Histogram};
use prometheus_client::registry::Registry;

pub struct SearchMetrics {
    /// Documents in the committed index.
    pub documents: Gauge,
    /// Events applied to the store and not yet in the committed index (see
    /// [`crate::SearchStatus::lag_events`]).
    pub lag_events: Gauge,
    /// 1 while the index is rebuilt from the storage timelines.
    pub rebuilding: Gauge,
    /// Messages handed to the index writer (re-adds included).
    pub indexed: Counter,
    pub commits: Counter,
    pub commit_seconds: Histogram,
}

impl Default for SearchMetrics {
    fn default() -> Self {
        Self {
            documents: Gauge::default(),
            lag_events: Gauge::default(),
            rebuilding: Gauge::default(),
            indexed: Counter::default(),
            commits: Counter::default(),
            commit_seconds: Histogram::new(exponential_buckets(0.001, 2.0, 16)),
        }
    }
}

impl SearchMetrics {
    pub fn register(&self, registry: &mut Registry) {
        let r = registry.sub_registry_with_prefix("meridian_search");
        r.register(
            "documents",
            "Messages in the committed search index",
            self.documents.clone(),
        );
        r.register(
            "lag_events",
            "Events applied to the store and not yet in the committed search index",
            self.lag_events.clone(),
        );
        r.register(
            "rebuilding",
            "1 while the search index is rebuilt from the store",
            self.rebuilding.clone(),
        );
        r.register(
            "indexed",
            "Messages handed to the index writer",
            self.indexed.clone(),
        );
        r.register("commits", "Search index commits", self.commits.clone());
        r.register(
            "commit_seconds",
            "Seconds per search index commit",
            self.commit_seconds.clone(),
        );
    }
}
