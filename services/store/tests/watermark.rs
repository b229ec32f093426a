//! The applied-HLC watermark the gateway's clock observes before every stamp
//! (`Store::max_applied_hlc`).
//!
//! Regression: it scanned every stream checkpoint on every send. Each checkpoint key is
//! rewritten by every applied batch and an LSM memtable keeps every version until it is
//! flushed, so under load the scan walked thousands of versions per send (W1 at 2,000 msg/s:
//! p99 2.7 s, over half the region process's CPU in that scan). In a process that applies it
//! is now answered from memory; these tests count the transactions it opens on a real
//! embedded store.

use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;

use async_trait::async_trait;
use meridian_store::kv::embedded::{EmbeddedStore, EngineKind};
use meridian_store::testing::{apply_config, sequenced, unique_namespace, EventFactory};
use meridian_store::{KvStore, KvTxn, Store, StreamRef};

/// The embedded store, counting the transactions begun on it.
struct Counted {
    inner: EmbeddedStore,
    begun: AtomicUsize,
}

#[async_trait]
impl KvStore for Counted {
    async fn begin(&self) -> meridian_store::Result<Box<dyn KvTxn>> {
        self.begun.fetch_add(1, Ordering::SeqCst);
        self.inner.begin().await
    }
    async fn begin_read(&self) -> meridian_store::Result<Box<dyn KvTxn>> {
        self.begun.fetch_add(1, Ordering::SeqCst);
        self.inner.begin_read().await
    }
    fn backend(&self) -> &'static str {
        "counted-fjall"
    }
}

/// Applies `events` from stream "S" (instance 1), the first at `first_seq`.
async fn apply(store: &Store, events: &[meridian_model::events::EventEnvelope], first_seq: u64) {
    store
        .apply_batch(
            &apply_config("us"),
            StreamRef::new("S", 1),
            &sequenced(events, first_seq),
        )
        .await
        .unwrap();
}

fn counted_store(dir: &std::path::Path) -> (Arc<Counted>, Store) {
    let kv = Arc::new(Counted {
        inner: EmbeddedStore::open(dir, EngineKind::Fjall).unwrap(),
        begun: AtomicUsize::new(0),
    });
    let store = Store::new(kv.clone(), unique_namespace().as_bytes());
    (kv, store)
}

#[tokio::test]
async fn a_process_that_applies_answers_the_watermark_without_reading_the_store() {
    let dir = tempfile::tempdir().unwrap();
    let (kv, store) = counted_store(dir.path());
    let f = EventFactory::new("us");
    let (cid, direct) = f.direct("ann", "bob");
    let setup = [f.user("ann", "us"), f.user("bob", "us"), direct];
    apply(&store, &setup, 1).await;
    // The first call reads the checkpoints once.
    let first = store.max_applied_hlc().await.unwrap().0;
    assert_eq!(first, setup.iter().map(|e| e.hlc).max().unwrap());

    for i in 0..20u64 {
        let m = f.message("ann", &cid, &format!("m{i}"), "hello");
        apply(&store, std::slice::from_ref(&m), 4 + i).await;
        let before = kv.begun.load(Ordering::SeqCst);
        let hlc = store.max_applied_hlc().await.unwrap().0;
        assert_eq!(
            kv.begun.load(Ordering::SeqCst),
            before,
            "the watermark opened a store transaction after batch {i}"
        );
        // Never below what was applied: the gateway stamps above it.
        assert!(
            hlc >= m.hlc,
            "watermark {hlc} below the applied message's HLC {}",
            m.hlc
        );
    }
}

/// A store object that does not apply (a split-role gateway: the applier is another
/// process) cannot see the applier's commits in memory, so it reads the checkpoints on
/// every call and sees each new one.
#[tokio::test]
async fn a_process_that_does_not_apply_reads_the_checkpoints_every_time() {
    let dir = tempfile::tempdir().unwrap();
    let (kv, applier) = counted_store(dir.path());
    // Another handle on the same backend and namespace with its own watermark, as another
    // process would have.
    let gateway = Store::new(kv.clone(), applier.keys().namespace());
    let f = EventFactory::new("us");
    let (cid, direct) = f.direct("ann", "bob");
    let setup = [f.user("ann", "us"), f.user("bob", "us"), direct];
    apply(&applier, &setup, 1).await;
    for i in 0..3u64 {
        let m = f.message("ann", &cid, &format!("m{i}"), "hello");
        apply(&applier, std::slice::from_ref(&m), 4 + i).await;
        let before = kv.begun.load(Ordering::SeqCst);
        assert_eq!(gateway.max_applied_hlc().await.unwrap().0, m.hlc);
        assert_eq!(kv.begun.load(Ordering::SeqCst), before + 1);
    }
}
