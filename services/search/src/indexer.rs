//! The indexer task: follows the store's search feed (or, rebuilding, the storage
//! timelines), adds messages to the index and commits on its own cadence with the feed
//! positions covered in the commit payload.
//!
//! Exactness: a feed position moves only past entries whose messages were handed to the
//! writer, and positions reach disk only inside the commit that holds those documents, so
//! after a crash the indexer re-reads from the last committed positions; re-adding a message
//! deletes its earlier document first (keyed by message id), so nothing doubles. Feed entries
//! are deleted from the store only after the commit that covers them.

use std::collections::BTreeMap;
use std::sync::atomic::Ordering;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use meridian_store::search_feed::IndexableMessage;
use meridian_store::Store;
use tantivy::{IndexWriter, TantivyDocument};
use tokio::sync::mpsc;
use tokio_util::sync::CancellationToken;

use crate::index::{FeedPos, IndexCheckpoint, SearchIndex};
use crate::{now_ms, SearchConfig, SearchError, SearchMetrics, SharedStatus};

/// Commit early once this many documents wait, whatever the interval.
const MAX_PENDING_DOCS: usize = 100_000;

pub struct Indexer {
    cfg: SearchConfig,
    index: Arc<SearchIndex>,
    store: Store,
    status: Arc<SharedStatus>,
    metrics: Arc<SearchMetrics>,
    reindex_rx: mpsc::Receiver<()>,
    writer: Arc<Mutex<IndexWriter>>,
    /// What the writer holds (committed or not).
    state: IndexCheckpoint,
    /// What the last commit holds.
    committed: IndexCheckpoint,
    /// Feed instances drained and left behind (a stream recreated), to delete after the
    /// next commit.
    drained: Vec<(String, u64)>,
    /// Per stream, the (instance, seq) the feed was last trimmed through: the next trim
    /// starts after it instead of walking the tombstones of every entry trimmed before.
    trimmed: std::collections::HashMap<String, (u64, u64)>,
    pending: usize,
    last_commit: Instant,
}

impl Indexer {
    pub(crate) fn new(
        cfg: SearchConfig,
        index: Arc<SearchIndex>,
        store: Store,
        status: Arc<SharedStatus>,
        metrics: Arc<SearchMetrics>,
        reindex_rx: mpsc::Receiver<()>,
    ) -> Result<Self, SearchError> {
        // One indexing thread: the budget of a task that must not compete with delivery.
        let writer = index
            .index
            .writer_with_num_threads(1, cfg.writer_memory_mb * 1024 * 1024)?;
        Ok(Self {
            cfg,
            index,
            store,
            status,
            metrics,
            reindex_rx,
            writer: Arc::new(Mutex::new(writer)),
            state: IndexCheckpoint::default(),
            committed: IndexCheckpoint::default(),
            drained: Vec::new(),
            trimmed: Default::default(),
            pending: 0,
            last_commit: Instant::now(),
        })
    }

    /// Runs until `shutdown`, then commits what was added.
    pub async fn run(mut self, shutdown: CancellationToken) -> Result<(), SearchError> {
        match IndexCheckpoint::load(&self.index.index)? {
            Some(cp) => {
                self.committed = cp.clone();
                self.state = cp;
            }
            None => {
                tracing::info!("search index empty: building it from the store");
                self.begin_rebuild().await?;
            }
        }
        let poll = Duration::from_millis(self.cfg.poll_interval_ms);
        let interval = Duration::from_millis(self.cfg.commit_interval_ms);
        loop {
            if shutdown.is_cancelled() {
                break;
            }
            if self.reindex_rx.try_recv().is_ok() {
                self.reindex().await?;
            }
            let progressed = match self.step().await {
                Ok(p) => p,
                Err(SearchError::Store(e)) => {
                    // The store comes back (a restart, a TiKV leader change): retry later.
                    tracing::warn!(error = %e, "search indexer: store read failed; retrying");
                    false
                }
                Err(e) => return Err(e),
            };
            if self.pending > 0
                && (self.last_commit.elapsed() >= interval || self.pending >= MAX_PENDING_DOCS)
            {
                self.commit().await?;
            } else if self.pending == 0
                && self.state != self.committed
                && self.last_commit.elapsed() >= interval
            {
                // Positions moved over events that are not messages: commit them too, so
                // the lag reads zero and a restart does not re-read them.
                self.commit().await?;
            }
            if !progressed {
                tokio::select! {
                    _ = shutdown.cancelled() => break,
                    _ = tokio::time::sleep(poll) => {}
                }
            }
        }
        if self.pending > 0 || self.state != self.committed {
            self.commit().await?;
        }
        Ok(())
    }

    /// One read and add: a page of the rebuild scan, or of every stream's feed. Whether
    /// anything moved (if not, the caller sleeps).
    async fn step(&mut self) -> Result<bool, SearchError> {
        if self.state.rebuild_after.is_some() {
            return self.rebuild_step().await;
        }
        let applied = self.store.applied_checkpoints().await?;
        let mut progressed = false;
        let mut lag = 0u64;
        for (stream, cp) in &applied {
            let pos = self.state.streams.get(stream).copied().unwrap_or_default();
            if pos.instance != cp.instance {
                // The stream was recreated (or its instance first recorded): finish the
                // feed of the instance followed so far, then follow the new one.
                let page = self
                    .store
                    .search_feed(stream, pos.instance, pos.seq, self.cfg.batch)
                    .await?;
                match page.last_seq {
                    Some(last) => {
                        self.add(page.messages).await?;
                        self.state
                            .streams
                            .insert(stream.clone(), FeedPos { seq: last, ..pos });
                    }
                    None => {
                        self.drained.push((stream.clone(), pos.instance));
                        self.state.streams.insert(
                            stream.clone(),
                            FeedPos {
                                instance: cp.instance,
                                seq: 0,
                            },
                        );
                    }
                }
                progressed = true;
            } else if pos.seq < cp.seq {
                // The checkpoint was read first: every feed entry up to it is committed.
                let page = self
                    .store
                    .search_feed(stream, pos.instance, pos.seq, self.cfg.batch)
                    .await?;
                // A full page may stop short of the checkpoint; otherwise every entry up to
                // it was read (and entries past it, applied since, count too).
                let seq = match page.last_seq {
                    Some(last) if page.entries >= self.cfg.batch => last,
                    last => last.unwrap_or(0).max(cp.seq),
                };
                self.add(page.messages).await?;
                self.state.streams.insert(stream.clone(), FeedPos { seq, ..pos });
                progressed = true;
            }
            let committed = self.committed.streams.get(stream).copied().unwrap_or_default();
            lag += if committed.instance == cp.instance {
                cp.seq.saturating_sub(committed.seq)
            } else {
                cp.seq
            };
        }
        self.set_lag(lag);
        Ok(progressed)
    }

    async fn rebuild_step(&mut self) -> Result<bool, SearchError> {
        let after = self.state.rebuild_pos().flatten();
        let (messages, next) = self.store.scan_messages(after.as_ref(), self.cfg.batch).await?;
        self.add(messages).await?;
        self.state.rebuild_after = match next {
            Some(pos) => Some(hex::encode(pos.key())),
            None => {
                tracing::info!("search index rebuilt from the store; following the feed");
                None
            }
        };
        // While rebuilding, everything applied since the rebuild began is behind.
        let applied = self.store.applied_checkpoints().await?;
        let lag = applied
            .iter()
            .map(|(s, cp)| {
                let from = self.state.streams.get(s).copied().unwrap_or_default();
                if from.instance == cp.instance {
                    cp.seq.saturating_sub(from.seq)
                } else {
                    cp.seq
                }
            })
            .sum();
        self.set_lag(lag);
        Ok(true)
    }

    fn set_lag(&self, lag: u64) {
        self.status.lag_events.store(lag, Ordering::Relaxed);
        self.metrics.lag_events.set(lag as i64);
        let rebuilding = self.state.rebuild_after.is_some();
        self.status.rebuilding.store(rebuilding, Ordering::Relaxed);
        self.metrics.rebuilding.set(i64::from(rebuilding));
    }

    /// Starts a rebuild: the feed positions now, then every timeline from the start. A
    /// message applied after the positions were taken is in the feed after them (and maybe
    /// in the scan too: re-adds replace), one applied before is in the timelines.
    async fn begin_rebuild(&mut self) -> Result<(), SearchError> {
        let applied = self.store.applied_checkpoints().await?;
        self.state = IndexCheckpoint {
            streams: applied
                .into_iter()
                .map(|(s, cp)| {
                    (
                        s,
                        FeedPos {
                            instance: cp.instance,
                            seq: cp.seq,
                        },
                    )
                })
                .collect::<BTreeMap<_, _>>(),
            rebuild_after: Some(String::new()),
        };
        self.set_lag(0);
        Ok(())
    }

    async fn reindex(&mut self) -> Result<(), SearchError> {
        tracing::info!("search reindex asked for: rebuilding the index from the store");
        let writer = self.writer.clone();
        tokio::task::spawn_blocking(move || -> Result<(), SearchError> {
            let w = writer.lock().map_err(|_| SearchError::Panicked)?;
            w.delete_all_documents()?;
            Ok(())
        })
        .await
        .map_err(|_| SearchError::Panicked)??;
        self.pending += 1;
        self.begin_rebuild().await
    }

    /// Hands messages to the writer (replacing any earlier document of the same id).
    async fn add(&mut self, messages: Vec<IndexableMessage>) -> Result<(), SearchError> {
        if messages.is_empty() {
            return Ok(());
        }
        let docs: Vec<(tantivy::Term, TantivyDocument)> = messages
            .iter()
            .map(|m| (self.index.id_term(m), self.index.document(m)))
            .collect();
        let n = docs.len();
        let writer = self.writer.clone();
        tokio::task::spawn_blocking(move || -> Result<(), SearchError> {
            let w = writer.lock().map_err(|_| SearchError::Panicked)?;
            for (term, doc) in docs {
                w.delete_term(term);
                w.add_document(doc)?;
            }
            Ok(())
        })
        .await
        .map_err(|_| SearchError::Panicked)??;
        self.pending += n;
        self.metrics.indexed.inc_by(n as u64);
        Ok(())
    }

    async fn commit(&mut self) -> Result<(), SearchError> {
        let started = Instant::now();
        let payload = self.state.encode();
        let writer = self.writer.clone();
        tokio::task::spawn_blocking(move || -> Result<(), SearchError> {
            let mut w = writer.lock().map_err(|_| SearchError::Panicked)?;
            let mut prepared = w.prepare_commit()?;
            prepared.set_payload(&payload);
            prepared.commit()?;
            Ok(())
        })
        .await
        .map_err(|_| SearchError::Panicked)??;
        self.index.reader.reload()?;
        self.committed = self.state.clone();
        self.pending = 0;
        self.last_commit = Instant::now();
        let docs = self.index.reader.searcher().num_docs();
        self.status.documents.store(docs, Ordering::Relaxed);
        self.status.last_commit_ms.store(now_ms(), Ordering::Relaxed);
        self.metrics.documents.set(docs as i64);
        self.metrics.commits.inc();
        self.metrics
            .commit_seconds
            .observe(started.elapsed().as_secs_f64());
        self.trim_feed().await;
        Ok(())
    }

    /// Deletes the feed entries the committed index covers. Best effort: what is left is
    /// read again after a restart and re-added harmlessly.
    async fn trim_feed(&mut self) {
        for (stream, instance) in std::mem::take(&mut self.drained) {
            if let Err(e) = self.store.trim_search_feed(&stream, instance, 0, u64::MAX).await {
                tracing::warn!(stream, error = %e, "search feed: dropping a drained instance failed");
            }
        }
        for (stream, pos) in &self.committed.streams {
            let after = match self.trimmed.get(stream) {
                Some(&(instance, seq)) if instance == pos.instance => seq,
                _ => 0,
            };
            if after >= pos.seq {
                continue;
            }
            match self
                .store
                .trim_search_feed(stream, pos.instance, after, pos.seq)
                .await
            {
                Ok(_) => {
                    self.trimmed.insert(stream.clone(), (pos.instance, pos.seq));
                }
                Err(e) => tracing::warn!(stream, error = %e, "search feed: trimming failed"),
            }
        }
    }
}
