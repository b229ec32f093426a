//! The region's full-text search over message history: one tantivy index per region, fed
//! from the store by its own indexer task, and the queries the gateway's `GET /v1/search`
//! makes.
//!
//! Data flow: the applier commits each new message together with a search feed entry
//! (`meridian_store::search_feed`); the indexer ([`Search::run`]) reads the feed after its
//! checkpoint, adds the messages (keyed by message id: a re-add replaces), and commits to
//! tantivy on its own cadence with the checkpoint in the commit's payload, so a crash resumes
//! exactly where the last commit left off. It never writes anything the applier reads:
//! indexing cannot block or slow delivery, only lag (reported by [`Search::status`]).
//! An empty index, or [`Search::request_reindex`], rebuilds from the storage timelines.
//!
//! What a caller may see (membership, recalls, deletes-for-me) is not in the index: the
//! gateway filters hits against the store when it shows them, so the index never has to
//! follow those changes.
//!
//! Layout: [`tokenizer`] (the analyzer for every script), `index` (schema, documents,
//! checkpoint payload), `indexer` (the task), `query` (searches and highlights),
//! `metrics`.

mod index;
mod indexer;
mod metrics;
mod query;
pub mod tokenizer;

use std::path::PathBuf;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Arc;

use meridian_store::Store;
use serde::Deserialize;
use tokio::sync::mpsc;

pub use index::message_text;
pub use indexer::Indexer;
pub use metrics::SearchMetrics;
pub use query::{Highlight, Hit, HitPage, SearchQuery};

/// How the region's index is kept (the region file's `[search]` table; every field has a
/// default).
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct SearchConfig {
    /// Off: no index, and `GET /v1/search` answers 503.
    #[serde(default = "default_enabled")]
    pub enabled: bool,
    /// The index directory (created if missing). Unset, the region process puts it beside
    /// an embedded store (`<store dir>.search`). Deleting it rebuilds the index from the
    /// store at the next start.
    #[serde(default)]
    pub index_dir: Option<PathBuf>,
    /// How often the indexer commits what it added (and so how stale results may be).
    #[serde(default = "default_commit_interval_ms")]
    pub commit_interval_ms: u64,
    /// Feed entries (or timeline entries, rebuilding) read per store read.
    #[serde(default = "default_batch")]
    pub batch: usize,
    /// How long the indexer sleeps when it has caught up.
    #[serde(default = "default_poll_interval_ms")]
    pub poll_interval_ms: u64,
    /// The tantivy writer's memory budget (one indexing thread).
    #[serde(default = "default_writer_memory_mb")]
    pub writer_memory_mb: usize,
}

fn default_enabled() -> bool {
    true
}
fn default_commit_interval_ms() -> u64 {
    1_000
}
fn default_batch() -> usize {
    2_000
}
fn default_poll_interval_ms() -> u64 {
    100
}
fn default_writer_memory_mb() -> usize {
    64
}

impl Default for SearchConfig {
    fn default() -> Self {
        Self {
            enabled: default_enabled(),
            index_dir: None,
            commit_interval_ms: default_commit_interval_ms(),
            batch: default_batch(),
            poll_interval_ms: default_poll_interval_ms(),
            writer_memory_mb: default_writer_memory_mb(),
        }
    }
}

impl SearchConfig {
    /// The defaults with the index in `index_dir`.
    pub fn new(index_dir: impl Into<PathBuf>) -> Self {
        Self {
            index_dir: Some(index_dir.into()),
            ..Self::default()
        }
    }

    /// Checks every field, naming the bad one (an unset `index_dir` is for the caller to
    /// fill in; [`Search::open`] refuses it).
    pub fn validate(&self) -> Result<(), SearchError> {
        let bad = |field: &'static str, reason: String| Err(SearchError::Config { field, reason });
        if self.index_dir.as_ref().is_some_and(|d| d.as_os_str().is_empty()) {
            return bad("index_dir", "must name a directory".into());
        }
        if !(10..=600_000).contains(&self.commit_interval_ms) {
            return bad(
                "commit_interval_ms",
                format!("{} is outside 10..=600000", self.commit_interval_ms),
            );
        }
        if !(1..=100_000).contains(&self.batch) {
            return bad("batch", format!("{} is outside 1..=100000", self.batch));
        }
        if !(1..=60_000).contains(&self.poll_interval_ms) {
            return bad(
                "poll_interval_ms",
                format!("{} is outside 1..=60000", self.poll_interval_ms),
            );
        }
        // tantivy refuses less than 15 MB per indexing thread.
        if !(16..=4_096).contains(&self.writer_memory_mb) {
            return bad(
                "writer_memory_mb",
                format!("{} is outside 16..=4096", self.writer_memory_mb),
            );
        }
        Ok(())
    }
}

#[derive(Debug, thiserror::Error)]
pub enum SearchError {
    #[error("search.{field}: {reason}")]
    Config { field: &'static str, reason: String },
    #[error("search index: {0}")]
    Index(#[from] tantivy::TantivyError),
    #[error("search index directory: {0}")]
    Directory(String),
    #[error("search index checkpoint unreadable: {0}")]
    Checkpoint(String),
    #[error("store: {0}")]
    Store(#[from] meridian_store::StoreError),
    #[error("search task panicked")]
    Panicked,
}

/// Where the index stands, for /v1/admin/regions and /metrics.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct SearchStatus {
    /// Messages searchable (documents in the committed index).
    pub documents: u64,
    /// Stream events applied to the store but not yet in the committed index (summed over
    /// the streams; an event that is not a message counts too), or, while rebuilding, every
    /// event applied since the rebuild started.
    pub lag_events: u64,
    /// Whether a rebuild from the storage timelines is under way.
    pub rebuilding: bool,
    /// Wall time of the last commit (ms since the epoch; 0: none yet by this process).
    pub last_commit_ms: u64,
}

#[derive(Default)]
struct SharedStatus {
    documents: AtomicU64,
    lag_events: AtomicU64,
    rebuilding: AtomicBool,
    last_commit_ms: AtomicU64,
}

/// The region's index: queries from any task, fed by the one indexer ([`Search::run`]).
#[derive(Clone)]
pub struct Search {
    index: Arc<index::SearchIndex>,
    status: Arc<SharedStatus>,
    reindex_tx: mpsc::Sender<()>,
    indexer: Arc<std::sync::Mutex<Option<Indexer>>>,
}

impl Search {
    /// Opens (or creates) the index in `cfg.index_dir`; [`Search::run`] then keeps it fed
    /// from `store`.
    pub fn open(cfg: SearchConfig, store: Store, metrics: Arc<SearchMetrics>) -> Result<Search, SearchError> {
        cfg.validate()?;
        let dir = cfg.index_dir.clone().ok_or_else(|| SearchError::Config {
            field: "index_dir",
            reason: "not set (and the store is not embedded, so there is no default)".into(),
        })?;
        let index = Arc::new(index::SearchIndex::open(&dir)?);
        let status = Arc::new(SharedStatus::default());
        status
            .documents
            .store(index.reader.searcher().num_docs(), Ordering::Relaxed);
        // One pending request is enough: a reindex asked for twice before it starts is one.
        let (reindex_tx, reindex_rx) = mpsc::channel(1);
        let indexer = Indexer::new(cfg, index.clone(), store, status.clone(), metrics, reindex_rx)?;
        Ok(Search {
            index,
            status,
            reindex_tx,
            indexer: Arc::new(std::sync::Mutex::new(Some(indexer))),
        })
    }

    /// Runs the indexer until `shutdown` (then commits what it added). Once per `Search`.
    pub async fn run(&self, shutdown: tokio_util::sync::CancellationToken) -> Result<(), SearchError> {
        let indexer = self
            .indexer
            .lock()
            .map_err(|_| SearchError::Panicked)?
            .take()
            .ok_or_else(|| SearchError::Directory("the indexer of this index already ran".into()))?;
        indexer.run(shutdown).await
    }

    /// Asks the indexer to rebuild the index from the store. Returns false when a rebuild
    /// was already asked for and has not started.
    pub fn request_reindex(&self) -> bool {
        self.reindex_tx.try_send(()).is_ok()
    }

    pub fn status(&self) -> SearchStatus {
        SearchStatus {
            documents: self.status.documents.load(Ordering::Relaxed),
            lag_events: self.status.lag_events.load(Ordering::Relaxed),
            rebuilding: self.status.rebuilding.load(Ordering::Relaxed),
            last_commit_ms: self.status.last_commit_ms.load(Ordering::Relaxed),
        }
    }

    /// Hits of `q` strictly below `below` in timeline order (newest first), at least `want`
    /// of them when there are that many (a few more when order keys tie on their clock).
    pub async fn query(
        &self,
        q: SearchQuery,
        below: Option<meridian_model::OrderKey>,
        want: usize,
    ) -> Result<HitPage, SearchError> {
        let index = self.index.clone();
        tokio::task::spawn_blocking(move || query::run(&index, &q, below.as_ref(), want))
            .await
            .map_err(|_| SearchError::Panicked)?
    }

    /// Where `q` matches in each of `texts` (message texts, see [`message_text`]).
    pub async fn highlights(
        &self,
        q: SearchQuery,
        texts: Vec<String>,
    ) -> Result<Vec<Vec<Highlight>>, SearchError> {
        let index = self.index.clone();
        tokio::task::spawn_blocking(move || query::highlights(&index, &q, &texts))
            .await
            .map_err(|_| SearchError::Panicked)?
    }
}

/// Builds an index in bulk without a store (benchmarks and tools): documents go straight
/// to a writer with as many threads as given. The index it leaves is one [`Search::open`]
/// opens; its checkpoint names no stream, so an indexer run on it would follow every
/// stream's feed from the start.
pub struct IndexBuilder {
    index: index::SearchIndex,
    writer: tantivy::IndexWriter,
}

impl IndexBuilder {
    pub fn create(
        dir: &std::path::Path,
        threads: usize,
        writer_memory_mb: usize,
    ) -> Result<Self, SearchError> {
        let index = index::SearchIndex::open(dir)?;
        let writer = index
            .index
            .writer_with_num_threads(threads.max(1), writer_memory_mb * 1024 * 1024 * threads.max(1))?;
        Ok(Self { index, writer })
    }

    /// Adds (or replaces) one message.
    pub fn add(&mut self, m: &meridian_store::search_feed::IndexableMessage) -> Result<(), SearchError> {
        self.writer.delete_term(self.index.id_term(m));
        self.writer.add_document(self.index.document(m))?;
        Ok(())
    }

    pub fn commit(&mut self) -> Result<(), SearchError> {
        let mut prepared = self.writer.prepare_commit()?;
        prepared.set_payload(&index::IndexCheckpoint::default().encode());
        prepared.commit()?;
        Ok(())
    }

    /// Commits, then waits for the background merges to finish.
    pub fn finish(mut self) -> Result<(), SearchError> {
        self.commit()?;
        self.writer.wait_merging_threads()?;
        Ok(())
    }
}

pub(crate) fn now_ms() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_millis() as u64)
        .unwrap_or(0)
}
