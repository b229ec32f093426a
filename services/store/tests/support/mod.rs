//! Shared by the store's integration tests: opening each backend under a unique namespace,
//! and a KV wrapper that tallies commits. Events come from `meridian_store::testing`.
#![allow(dead_code, unused_imports)]

use std::sync::Arc;

use meridian_store::kv::embedded::{EmbeddedStore, EngineKind};
use meridian_store::testing::unique_namespace;
use meridian_store::{KvStore, Store};

// The event factory and helpers every crate's tests share.
pub use meridian_store::testing::{apply_config as cfg, region, sequenced, user, EventFactory};

/// A backend under test, with what it needs kept alive.
pub struct Backend {
    pub name: &'static str,
    pub kv: Arc<dyn KvStore>,
    _dir: Option<tempfile::TempDir>,
}

impl Backend {
    /// A store under a namespace no other test uses.
    pub fn store(&self) -> Store {
        Store::new(self.kv.clone(), unique_namespace().as_bytes())
    }
}

pub fn embedded(kind: EngineKind) -> Backend {
    let dir = tempfile::tempdir().unwrap();
    let kv = Arc::new(EmbeddedStore::open(dir.path(), kind).unwrap());
    Backend {
        name: kv.backend(),
        kv,
        _dir: Some(dir),
    }
}

/// Every backend this machine can run: both embedded engines always, TiKV when
/// `MERIDIAN_TIKV_PD` names its PD endpoints.
pub async fn backends() -> Vec<Backend> {
    let mut out = vec![embedded(EngineKind::Fjall), embedded(EngineKind::Redb)];
    match std::env::var("MERIDIAN_TIKV_PD") {
        Ok(pd) if !pd.is_empty() => {
            let kv = meridian_store::kv::open(&format!("tikv://{pd}"))
                .await
                .expect("connect to TiKV");
            out.push(Backend {
                name: "tikv",
                kv,
                _dir: None,
            });
        }
        _ => eprintln!("conformance: TiKV skipped (set MERIDIAN_TIKV_PD=host:port[,host:port] to run it)"),
    }
    out
}

/// What one committed transaction wrote.
#[derive(Debug, Clone, Copy, Default)]
pub struct CommitTally {
    pub puts: usize,
    pub deletes: usize,
    /// Key and value bytes of the puts, key bytes of the deletes.
    pub bytes: usize,
}

/// A real backend with every commit tallied: how big the transactions the store makes are.
pub struct TalliedKv {
    inner: Arc<dyn KvStore>,
    pub commits: Arc<std::sync::Mutex<Vec<CommitTally>>>,
}

impl TalliedKv {
    pub fn new(inner: Arc<dyn KvStore>) -> Self {
        Self {
            inner,
            commits: Default::default(),
        }
    }

    /// Forgets the commits tallied so far.
    pub fn take(&self) -> Vec<CommitTally> {
        std::mem::take(&mut *self.commits.lock().unwrap())
    }
}

struct TalliedTxn {
    inner: Box<dyn meridian_store::KvTxn>,
    tally: CommitTally,
    commits: Arc<std::sync::Mutex<Vec<CommitTally>>>,
}

#[async_trait::async_trait]
impl KvStore for TalliedKv {
    async fn begin(&self) -> meridian_store::Result<Box<dyn meridian_store::KvTxn>> {
        Ok(Box::new(TalliedTxn {
            inner: self.inner.begin().await?,
            tally: CommitTally::default(),
            commits: self.commits.clone(),
        }))
    }
    async fn begin_read(&self) -> meridian_store::Result<Box<dyn meridian_store::KvTxn>> {
        self.inner.begin_read().await
    }
    async fn get_latest(&self, keys: &[Vec<u8>]) -> meridian_store::Result<Vec<Option<Vec<u8>>>> {
        self.inner.get_latest(keys).await
    }
    fn backend(&self) -> &'static str {
        self.inner.backend()
    }
}

#[async_trait::async_trait]
impl meridian_store::KvTxn for TalliedTxn {
    async fn get(&mut self, key: &[u8]) -> meridian_store::Result<Option<Vec<u8>>> {
        self.inner.get(key).await
    }
    async fn batch_get(&mut self, keys: &[Vec<u8>]) -> meridian_store::Result<Vec<Option<Vec<u8>>>> {
        self.inner.batch_get(keys).await
    }
    async fn scan(
        &mut self,
        start: &[u8],
        end: &[u8],
        limit: usize,
        order: meridian_store::ScanOrder,
    ) -> meridian_store::Result<Vec<meridian_store::kv::KvPair>> {
        self.inner.scan(start, end, limit, order).await
    }
    async fn put(&mut self, key: Vec<u8>, value: Vec<u8>) -> meridian_store::Result<()> {
        self.tally.puts += 1;
        self.tally.bytes += key.len() + value.len();
        self.inner.put(key, value).await
    }
    async fn delete(&mut self, key: Vec<u8>) -> meridian_store::Result<()> {
        self.tally.deletes += 1;
        self.tally.bytes += key.len();
        self.inner.delete(key).await
    }
    async fn commit(self: Box<Self>) -> meridian_store::Result<()> {
        let me = *self;
        me.inner.commit().await?;
        me.commits.lock().unwrap().push(me.tally);
        Ok(())
    }
    async fn rollback(self: Box<Self>) -> meridian_store::Result<()> {
        self.inner.rollback().await
    }
}
