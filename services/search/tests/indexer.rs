//! The indexer against a real embedded store: following the feed, paging, a crash between
//! commits, a rebuild, a recreated stream.

use std::sync::Arc;
use std::time::Duration;

use meridian_model::{ConversationId, EventId, OrderKey};
use meridian_search::{Search, SearchConfig, SearchMetrics, SearchQuery};
use meridian_store::testing::{apply_config, eventually, sequenced, user, EventFactory, TempStore};
use meridian_store::{Store, StreamRef};
use tokio_util::sync::CancellationToken;

const WAIT: Duration = Duration::from_secs(20);

fn config(dir: &std::path::Path) -> SearchConfig {
    let mut cfg = SearchConfig::new(dir);
    cfg.commit_interval_ms = 20;
    cfg.poll_interval_ms = 5;
    cfg.batch = 7; // small pages, so paging through the feed is exercised
    cfg.writer_memory_mb = 16;
    cfg
}

struct Running {
    search: Search,
    token: CancellationToken,
    task: tokio::task::JoinHandle<Result<(), meridian_search::SearchError>>,
}

fn start(cfg: SearchConfig, store: &Store) -> anyhow::Result<Running> {
    let search = Search::open(cfg, store.clone(), Arc::new(SearchMetrics::default()))?;
    let token = CancellationToken::new();
    let task = tokio::spawn({
        let search = search.clone();
        let token = token.clone();
        async move { search.run(token).await }
    });
    Ok(Running { search, token, task })
}

impl Running {
    async fn stop(self) -> anyhow::Result<()> {
        self.token.cancel();
        self.task.await??;
        Ok(())
    }
}

fn query(text: &str, cids: &[&ConversationId]) -> SearchQuery {
    SearchQuery {
        text: text.into(),
        conversations: cids.iter().map(|c| (*c).clone()).collect(),
        ..Default::default()
    }
}

/// Every hit of `q`, page by page (`page` hits a call), newest first.
async fn all_hits(search: &Search, q: &SearchQuery, page: usize) -> anyhow::Result<Vec<EventId>> {
    let mut out = Vec::new();
    let mut below: Option<OrderKey> = None;
    for _ in 0..10_000 {
        let p = search.query(q.clone(), below.clone(), page).await?;
        out.extend(p.hits.iter().map(|h| h.message_id));
        below = p.hits.last().map(|h| h.order_key.clone());
        if p.exhausted || below.is_none() {
            return Ok(out);
        }
    }
    anyhow::bail!("paging did not end")
}

async fn wait_for_documents(search: &Search, n: u64) -> anyhow::Result<()> {
    eventually(WAIT, &format!("{n} documents, no lag"), || async {
        let s = search.status();
        Ok(s.documents == n && s.lag_events == 0 && !s.rebuilding)
    })
    .await
}

#[tokio::test]
async fn follows_the_feed_and_pages_newest_first() -> anyhow::Result<()> {
    let t = TempStore::open()?;
    let dir = tempfile::tempdir()?;
    let f = EventFactory::new("us");
    let (cid, created) = f.direct("alice", "bob");
    let mut events = vec![f.user("alice", "us"), f.user("bob", "us"), created];
    for i in 0..40 {
        let text = if i % 2 == 0 {
            format!("Café number {i}")
        } else {
            format!("tea {i}")
        };
        events.push(f.message("alice", &cid, &format!("m{i}"), &text));
    }
    let cfg = apply_config("us");
    t.store
        .apply_batch(&cfg, "SYNC_us", &sequenced(&events[..20], 1))
        .await?;
    let running = start(config(dir.path()), &t.store)?;
    t.store
        .apply_batch(&cfg, "SYNC_us", &sequenced(&events[20..], 21))
        .await?;
    wait_for_documents(&running.search, 40).await?;

    let hits = all_hits(&running.search, &query("CAFE", &[&cid]), 3).await?;
    let expected: Vec<EventId> = (0..40)
        .rev()
        .filter(|i| i % 2 == 0)
        .map(|i| EventId::for_message(&user("alice"), &cid, &format!("m{i}")))
        .collect();
    assert_eq!(hits, expected, "every café, newest first, across pages of 3");
    // Another conversation's filter finds nothing; a word that is nowhere finds nothing.
    let other = ConversationId::direct(&user("carol"), &user("dave"));
    assert!(all_hits(&running.search, &query("cafe", &[&other]), 5)
        .await?
        .is_empty());
    assert!(all_hits(&running.search, &query("coffee", &[&cid]), 5)
        .await?
        .is_empty());
    running.stop().await
}

/// Issue 12 item 2: a crash between commits loses nothing and doubles nothing.
#[tokio::test]
async fn item2_a_crash_of_the_indexer_resumes_from_its_committed_checkpoint() -> anyhow::Result<()> {
    let t = TempStore::open()?;
    let dir = tempfile::tempdir()?;
    let f = EventFactory::new("us");
    let (cid, created) = f.direct("alice", "bob");
    let mut events = vec![f.user("alice", "us"), f.user("bob", "us"), created];
    for i in 0..60 {
        events.push(f.message("bob", &cid, &format!("m{i}"), &format!("report {i}")));
    }
    let cfg = apply_config("us");
    t.store
        .apply_batch(&cfg, "SYNC_us", &sequenced(&events[..30], 1))
        .await?;
    let mut slow = config(dir.path());
    // Commits far apart: what is added after the first catch-up is uncommitted at the crash.
    slow.commit_interval_ms = 600_000;
    let running = start(config(dir.path()), &t.store)?;
    wait_for_documents(&running.search, 27).await?;
    running.stop().await?;
    let running = start(slow, &t.store)?;
    t.store
        .apply_batch(&cfg, "SYNC_us", &sequenced(&events[30..], 31))
        .await?;
    // Let the indexer read the new entries into its writer, then kill it without a commit.
    tokio::time::sleep(Duration::from_millis(200)).await;
    running.task.abort();
    let _ = running.task.await;
    drop(running.search);
    let running = start(config(dir.path()), &t.store)?;
    wait_for_documents(&running.search, 60).await?;
    let hits = all_hits(&running.search, &query("report", &[&cid]), 25).await?;
    assert_eq!(hits.len(), 60, "every message once after the crash");
    running.stop().await
}

/// Issue 12 item 2: the index is rebuilt from the store (an empty index, or a reindex).
#[tokio::test]
async fn item2_the_index_is_rebuilt_from_the_store() -> anyhow::Result<()> {
    let t = TempStore::open()?;
    let dir = tempfile::tempdir()?;
    let f = EventFactory::new("us");
    let (cid, created) = f.direct("alice", "bob");
    let mut events = vec![f.user("alice", "us"), f.user("bob", "us"), created];
    for i in 0..25 {
        events.push(f.message("alice", &cid, &format!("m{i}"), &format!("lunch {i}")));
    }
    let cfg = apply_config("us");
    t.store
        .apply_batch(&cfg, "SYNC_us", &sequenced(&events, 1))
        .await?;
    // An index that never existed starts from the timelines.
    let running = start(config(dir.path()), &t.store)?;
    wait_for_documents(&running.search, 25).await?;
    // A reindex asked for while messages keep arriving misses none of them.
    assert!(running.search.request_reindex());
    let more: Vec<_> = (25..40)
        .map(|i| f.message("alice", &cid, &format!("m{i}"), &format!("lunch {i}")))
        .collect();
    t.store
        .apply_batch(&cfg, "SYNC_us", &sequenced(&more, 29))
        .await?;
    wait_for_documents(&running.search, 40).await?;
    assert_eq!(
        all_hits(&running.search, &query("lunch", &[&cid]), 50)
            .await?
            .len(),
        40
    );
    running.stop().await
}

/// A recreated stream numbers from 1 again: its messages are indexed all the same.
#[tokio::test]
async fn a_recreated_stream_is_followed_from_its_start() -> anyhow::Result<()> {
    let t = TempStore::open()?;
    let dir = tempfile::tempdir()?;
    let f = EventFactory::new("us");
    let (cid, created) = f.direct("alice", "bob");
    let mut events = vec![f.user("alice", "us"), f.user("bob", "us"), created];
    for i in 0..10 {
        events.push(f.message("alice", &cid, &format!("m{i}"), &format!("plan {i}")));
    }
    let cfg = apply_config("us");
    t.store
        .apply_batch(&cfg, StreamRef::new("SYNC_us", 100), &sequenced(&events, 1))
        .await?;
    let running = start(config(dir.path()), &t.store)?;
    wait_for_documents(&running.search, 10).await?;
    let later: Vec<_> = (10..15)
        .map(|i| f.message("alice", &cid, &format!("m{i}"), &format!("plan {i}")))
        .collect();
    t.store
        .apply_batch(&cfg, StreamRef::new("SYNC_us", 200), &sequenced(&later, 1))
        .await?;
    wait_for_documents(&running.search, 15).await?;
    running.stop().await
}

/// An index written with another schema is derived data: it is started again and rebuilt
/// from the store instead of stopping the region.
#[tokio::test]
async fn an_index_of_another_schema_is_rebuilt_from_the_store() -> anyhow::Result<()> {
    let t = TempStore::open()?;
    let dir = tempfile::tempdir()?;
    {
        use tantivy::schema::{Schema, STRING};
        let mut b = Schema::builder();
        b.add_text_field("something_else", STRING);
        let index = tantivy::Index::create_in_dir(dir.path(), b.build())?;
        let mut w: tantivy::IndexWriter = index.writer_with_num_threads(1, 15_000_000)?;
        w.commit()?;
    }
    let f = EventFactory::new("us");
    let (cid, created) = f.direct("alice", "bob");
    let mut events = vec![f.user("alice", "us"), f.user("bob", "us"), created];
    events.push(f.message("alice", &cid, "m0", "kept in the store"));
    t.store
        .apply_batch(&apply_config("us"), "SYNC_us", &sequenced(&events, 1))
        .await?;
    let running = start(config(dir.path()), &t.store)?;
    wait_for_documents(&running.search, 1).await?;
    assert_eq!(
        all_hits(&running.search, &query("store", &[&cid]), 5)
            .await?
            .len(),
        1
    );
    running.stop().await
}
