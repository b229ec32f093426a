//! The embedded backend: optimistic transactions over a durable embedded engine.
//!
//! The engines give us snapshots and atomic, fsynced write batches; this module adds what
//! TiKV gives for free, so both backends behave the same to the layers above:
//! - each transaction reads from an engine snapshot taken at `begin`, overlaid with its own
//!   buffered writes;
//! - it records the keys it read and the ranges it scanned;
//! - `commit` takes the commit lock, fails with `Conflict` if any transaction that committed
//!   after our `begin` wrote into our read set, then writes the batch durably (one fsync);
//! - read-write transactions read through a cache of the latest committed values of the
//!   keys read recently ([`ReadCache`]): the applier reads the same inbox heads, user and
//!   region records and member lists for every message, and each LSM point read searches the
//!   memtable and every table's filter.
//!
//! Two engines sit behind `Engine`: fjall (LSM, the default, chosen by measurement; see the
//! crate README) and redb (copy-on-write B-tree). Both are pure Rust.

use std::collections::{BTreeMap, HashSet, VecDeque};
use std::ops::Bound;
use std::path::Path;
use std::sync::{Arc, Mutex};

use async_trait::async_trait;

use super::{KvPair, KvStore, KvTxn, ScanOrder};
use crate::{Result, StoreError};

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum EngineKind {
    Fjall,
    Redb,
}

type WriteSet = Vec<(Vec<u8>, Option<Vec<u8>>)>;

/// What the transaction layer needs from an engine.
trait Engine: Send + Sync + 'static {
    fn snapshot(&self) -> Result<Box<dyn EngineSnapshot>>;
    /// Applies all writes atomically; durable (fsynced) when it returns.
    fn write_durable(&self, writes: &WriteSet) -> Result<()>;
}

trait EngineSnapshot: Send + Sync {
    fn get(&self, key: &[u8]) -> Result<Option<Vec<u8>>>;
    fn scan(&self, start: &[u8], end: &[u8], limit: usize, order: ScanOrder) -> Result<Vec<KvPair>>;
}

fn backend_err(e: impl std::fmt::Display) -> StoreError {
    StoreError::Backend(e.to_string())
}

// ---------------------------------------------------------------------------------------
// fjall

struct FjallEngine {
    db: fjall::Database,
    kv: fjall::Keyspace,
}

impl FjallEngine {
    fn open(dir: &Path) -> Result<Self> {
        let db = fjall::Database::builder(dir).open().map_err(backend_err)?;
        // LZ4 on every level (fjall leaves the first two uncompressed): the records repeat
        // conversation and user ids, and message bodies are JSON, so blocks shrink by about
        // half for a little CPU at flush and compaction; W1's bytes on disk per message were
        // over the 600 the performance issue allows before this.
        let kv = db
            .keyspace("kv", || {
                fjall::KeyspaceCreateOptions::default().data_block_compression_policy(
                    fjall::config::CompressionPolicy::all(fjall::CompressionType::Lz4),
                )
            })
            .map_err(backend_err)?;
        Ok(Self { db, kv })
    }
}

impl Engine for FjallEngine {
    fn snapshot(&self) -> Result<Box<dyn EngineSnapshot>> {
        Ok(Box::new(FjallSnapshot {
            snap: self.db.snapshot(),
            kv: self.kv.clone(),
        }))
    }

    fn write_durable(&self, writes: &WriteSet) -> Result<()> {
        let mut batch = self.db.batch().durability(Some(fjall::PersistMode::SyncAll));
        for (k, v) in writes {
            match v {
                Some(v) => batch.insert(&self.kv, k.as_slice(), v.as_slice()),
                None => batch.remove(&self.kv, k.as_slice()),
            }
        }
        batch.commit().map_err(backend_err)
    }
}

struct FjallSnapshot {
    snap: fjall::Snapshot,
    kv: fjall::Keyspace,
}

impl EngineSnapshot for FjallSnapshot {
    fn get(&self, key: &[u8]) -> Result<Option<Vec<u8>>> {
        use fjall::Readable;
        Ok(self
            .snap
            .get(&self.kv, key)
            .map_err(backend_err)?
            .map(|v| v.to_vec()))
    }

    fn scan(&self, start: &[u8], end: &[u8], limit: usize, order: ScanOrder) -> Result<Vec<KvPair>> {
        use fjall::Readable;
        let iter = self.snap.range(&self.kv, start..end);
        let mut out = Vec::with_capacity(limit.min(1024));
        let mut push = |g: fjall::Guard| -> Result<bool> {
            let (k, v) = g.into_inner().map_err(backend_err)?;
            out.push((k.to_vec(), v.to_vec()));
            Ok(out.len() < limit)
        };
        if limit == 0 {
            return Ok(Vec::new());
        }
        match order {
            ScanOrder::Forward => {
                for g in iter {
                    if !push(g)? {
                        break;
                    }
                }
            }
            ScanOrder::Reverse => {
                for g in iter.rev() {
                    if !push(g)? {
                        break;
                    }
                }
            }
        }
        Ok(out)
    }
}

// ---------------------------------------------------------------------------------------
// redb

const REDB_TABLE: redb::TableDefinition<&[u8], &[u8]> = redb::TableDefinition::new("kv");

struct RedbEngine {
    db: redb::Database,
}

impl RedbEngine {
    fn open(dir: &Path) -> Result<Self> {
        std::fs::create_dir_all(dir).map_err(backend_err)?;
        let db = redb::Database::create(dir.join("meridian.redb")).map_err(backend_err)?;
        // Create the table once so read transactions never meet a missing table.
        let tx = db.begin_write().map_err(backend_err)?;
        tx.open_table(REDB_TABLE).map_err(backend_err)?;
        tx.commit().map_err(backend_err)?;
        Ok(Self { db })
    }
}

impl Engine for RedbEngine {
    fn snapshot(&self) -> Result<Box<dyn EngineSnapshot>> {
        use redb::ReadableDatabase;
        let tx = self.db.begin_read().map_err(backend_err)?;
        let table = tx.open_table(REDB_TABLE).map_err(backend_err)?;
        Ok(Box::new(RedbSnapshot { table }))
    }

    fn write_durable(&self, writes: &WriteSet) -> Result<()> {
        // Durability::Immediate is redb's default: commit returns after fsync.
        let tx = self.db.begin_write().map_err(backend_err)?;
        {
            let mut t = tx.open_table(REDB_TABLE).map_err(backend_err)?;
            for (k, v) in writes {
                match v {
                    Some(v) => {
                        t.insert(k.as_slice(), v.as_slice()).map_err(backend_err)?;
                    }
                    None => {
                        t.remove(k.as_slice()).map_err(backend_err)?;
                    }
                }
            }
        }
        tx.commit().map_err(backend_err)
    }
}

struct RedbSnapshot {
    table: redb::ReadOnlyTable<&'static [u8], &'static [u8]>,
}

impl EngineSnapshot for RedbSnapshot {
    fn get(&self, key: &[u8]) -> Result<Option<Vec<u8>>> {
        Ok(self
            .table
            .get(key)
            .map_err(backend_err)?
            .map(|g| g.value().to_vec()))
    }

    fn scan(&self, start: &[u8], end: &[u8], limit: usize, order: ScanOrder) -> Result<Vec<KvPair>> {
        if limit == 0 || start >= end {
            return Ok(Vec::new());
        }
        let range = self.table.range::<&[u8]>(start..end).map_err(backend_err)?;
        let mut out = Vec::with_capacity(limit.min(1024));
        let mut push = |r: std::result::Result<_, redb::StorageError>| -> Result<bool> {
            let (k, v): (redb::AccessGuard<&[u8]>, redb::AccessGuard<&[u8]>) = r.map_err(backend_err)?;
            out.push((k.value().to_vec(), v.value().to_vec()));
            Ok(out.len() < limit)
        };
        match order {
            ScanOrder::Forward => {
                for r in range {
                    if !push(r)? {
                        break;
                    }
                }
            }
            ScanOrder::Reverse => {
                for r in range.rev() {
                    if !push(r)? {
                        break;
                    }
                }
            }
        }
        Ok(out)
    }
}

// ---------------------------------------------------------------------------------------
// The transaction layer

/// Commit bookkeeping: a version per commit, the write sets of recent commits, and the
/// begin versions of transactions still open (so old write sets can be dropped).
#[derive(Default)]
struct CommitLog {
    version: u64,
    recent: VecDeque<(u64, Arc<HashSet<Vec<u8>>>)>,
    open: BTreeMap<u64, usize>,
}

impl CommitLog {
    fn prune(&mut self) {
        let oldest_open = self.open.keys().next().copied().unwrap_or(u64::MAX);
        while self.recent.front().is_some_and(|(v, _)| *v <= oldest_open) {
            self.recent.pop_front();
        }
    }

    fn close(&mut self, begin: u64) {
        if let Some(n) = self.open.get_mut(&begin) {
            *n -= 1;
            if *n == 0 {
                self.open.remove(&begin);
            }
        }
        self.prune();
    }
}

struct Shared {
    engine: Box<dyn Engine>,
    log: Mutex<CommitLog>,
    cache: Mutex<ReadCache>,
}

/// Most keys [`ReadCache`] holds; when full it starts again empty (the keys in use are read
/// back in at once).
const READ_CACHE_KEYS: usize = 200_000;

/// The latest committed value (or absence) of keys read-write transactions read.
///
/// Why reading the *latest* value instead of the snapshot's is safe for a read-write
/// transaction: if the key was written after the transaction began, that write conflicts
/// with the transaction's read at commit (the key is in its read set either way), so the
/// transaction is planned again; if not, the latest value is the snapshot's. Read-only
/// transactions (no conflict check) never use it.
///
/// Keeping it exact:
/// - every commit, still holding the commit lock (so before any transaction can begin on
///   top of it), overwrites the entries of the keys it wrote and moves `version` to its own;
/// - a read that missed fills the entry from its snapshot only if no commit has happened
///   since that snapshot (`version == begin`), checked under the cache lock. A fill racing a
///   commit that wrote the same key (between its engine write and its cache update) is
///   overwritten by that update before anyone can begin after the commit.
#[derive(Default)]
struct ReadCache {
    version: u64,
    values: std::collections::HashMap<Vec<u8>, Option<Vec<u8>>>,
}

impl ReadCache {
    fn get(&self, key: &[u8]) -> Option<Option<Vec<u8>>> {
        self.values.get(key).cloned()
    }

    fn fill(&mut self, begin: u64, key: &[u8], value: &Option<Vec<u8>>) {
        if self.version != begin {
            return;
        }
        if self.values.len() >= READ_CACHE_KEYS {
            self.values.clear();
        }
        self.values.insert(key.to_vec(), value.clone());
    }

    /// Called by a commit at `version`, under the commit lock: only keys already cached
    /// are updated (a key written but never read, like a timeline entry, stays out).
    fn committed(&mut self, version: u64, writes: &WriteSet) {
        for (k, v) in writes {
            if let Some(slot) = self.values.get_mut(k) {
                slot.clone_from(v);
            }
        }
        self.version = version;
    }
}

/// The embedded store: one engine directory, opened by one process.
pub struct EmbeddedStore {
    shared: Arc<Shared>,
    kind: EngineKind,
}

impl EmbeddedStore {
    pub fn open(dir: impl AsRef<Path>, kind: EngineKind) -> Result<Self> {
        let dir = dir.as_ref();
        std::fs::create_dir_all(dir).map_err(backend_err)?;
        let engine: Box<dyn Engine> = match kind {
            EngineKind::Fjall => Box::new(FjallEngine::open(dir)?),
            EngineKind::Redb => Box::new(RedbEngine::open(dir)?),
        };
        Ok(Self {
            shared: Arc::new(Shared {
                engine,
                log: Mutex::new(CommitLog::default()),
                cache: Mutex::new(ReadCache::default()),
            }),
            kind,
        })
    }

    fn start(&self, tracked: bool) -> Result<EmbeddedTxn> {
        let mut log = self.shared.log.lock().expect("commit log lock");
        // Snapshot and version are taken under the commit lock, so the snapshot holds
        // exactly the commits up to `begin`.
        let snapshot = self.shared.engine.snapshot()?;
        let begin = log.version;
        if tracked {
            *log.open.entry(begin).or_default() += 1;
        }
        Ok(EmbeddedTxn {
            shared: self.shared.clone(),
            snapshot,
            begin,
            tracked,
            writes: BTreeMap::new(),
            read_keys: HashSet::new(),
            read_ranges: Vec::new(),
            finished: false,
        })
    }
}

#[async_trait]
impl KvStore for EmbeddedStore {
    async fn begin(&self) -> Result<Box<dyn KvTxn>> {
        Ok(Box::new(self.start(true)?))
    }
    async fn begin_read(&self) -> Result<Box<dyn KvTxn>> {
        Ok(Box::new(self.start(false)?))
    }
    /// Served from the read cache where it holds the key (the latest committed value, see
    /// [`ReadCache`]); a miss reads one snapshot and fills the cache under the same rule as
    /// a read-write transaction.
    async fn get_latest(&self, keys: &[Vec<u8>]) -> Result<Vec<Option<Vec<u8>>>> {
        let mut out = Vec::with_capacity(keys.len());
        let mut snapshot: Option<(Box<dyn EngineSnapshot>, u64)> = None;
        for key in keys {
            if let Some(v) = self.shared.cache.lock().expect("read cache lock").get(key) {
                out.push(v);
                continue;
            }
            if snapshot.is_none() {
                // As in `start`: the snapshot and its version under the commit lock.
                let log = self.shared.log.lock().expect("commit log lock");
                snapshot = Some((self.shared.engine.snapshot()?, log.version));
            }
            let Some((snap, version)) = snapshot.as_ref() else {
                unreachable!("taken just above")
            };
            let value = snap.get(key)?;
            self.shared
                .cache
                .lock()
                .expect("read cache lock")
                .fill(*version, key, &value);
            out.push(value);
        }
        Ok(out)
    }
    fn backend(&self) -> &'static str {
        match self.kind {
            EngineKind::Fjall => "embedded-fjall",
            EngineKind::Redb => "embedded-redb",
        }
    }
}

pub struct EmbeddedTxn {
    shared: Arc<Shared>,
    snapshot: Box<dyn EngineSnapshot>,
    begin: u64,
    /// False for read-only transactions: they hold no place in the commit log.
    tracked: bool,
    writes: BTreeMap<Vec<u8>, Option<Vec<u8>>>,
    read_keys: HashSet<Vec<u8>>,
    /// Scanned `[start, end)` ranges, trimmed to what the scan actually covered.
    read_ranges: Vec<(Vec<u8>, Vec<u8>)>,
    finished: bool,
}

impl EmbeddedTxn {
    fn read_one(&mut self, key: &[u8]) -> Result<Option<Vec<u8>>> {
        if let Some(v) = self.writes.get(key) {
            return Ok(v.clone());
        }
        if !self.tracked {
            return self.snapshot.get(key);
        }
        self.read_keys.insert(key.to_vec());
        if let Some(v) = self.shared.cache.lock().expect("read cache lock").get(key) {
            return Ok(v);
        }
        let value = self.snapshot.get(key)?;
        self.shared
            .cache
            .lock()
            .expect("read cache lock")
            .fill(self.begin, key, &value);
        Ok(value)
    }

    fn conflicts_with(&self, written: &HashSet<Vec<u8>>) -> Option<Vec<u8>> {
        written
            .iter()
            .find(|k| {
                self.read_keys.contains(*k)
                    || self
                        .read_ranges
                        .iter()
                        .any(|(s, e)| k.as_slice() >= s.as_slice() && k.as_slice() < e.as_slice())
            })
            .cloned()
    }

    fn finish(&mut self) {
        if !self.finished {
            self.finished = true;
            if self.tracked {
                self.shared.log.lock().expect("commit log lock").close(self.begin);
            }
        }
    }
}

impl Drop for EmbeddedTxn {
    fn drop(&mut self) {
        // An abandoned transaction is a rollback: nothing was written.
        self.finish();
    }
}

#[async_trait]
impl KvTxn for EmbeddedTxn {
    async fn get(&mut self, key: &[u8]) -> Result<Option<Vec<u8>>> {
        self.read_one(key)
    }

    async fn batch_get(&mut self, keys: &[Vec<u8>]) -> Result<Vec<Option<Vec<u8>>>> {
        keys.iter().map(|k| self.read_one(k)).collect()
    }

    async fn scan(
        &mut self,
        start: &[u8],
        end: &[u8],
        limit: usize,
        order: ScanOrder,
    ) -> Result<Vec<KvPair>> {
        if limit == 0 || start >= end {
            return Ok(Vec::new());
        }
        // Our own buffered writes in range can hide (deletes) or replace snapshot entries,
        // so over-fetch by their count, then merge.
        let buffered: Vec<(&Vec<u8>, &Option<Vec<u8>>)> = self
            .writes
            .range::<[u8], _>((Bound::Included(start), Bound::Excluded(end)))
            .collect();
        let fetched = self.snapshot.scan(start, end, limit + buffered.len(), order)?;
        let mut merged: BTreeMap<Vec<u8>, Vec<u8>> = fetched.into_iter().collect();
        for (k, v) in buffered {
            match v {
                Some(v) => {
                    merged.insert(k.clone(), v.clone());
                }
                None => {
                    merged.remove(k);
                }
            }
        }
        let out: Vec<KvPair> = match order {
            ScanOrder::Forward => merged.into_iter().take(limit).collect(),
            ScanOrder::Reverse => merged.into_iter().rev().take(limit).collect(),
        };
        if self.tracked {
            // What the scan depended on: all of [start, end) unless the limit cut it short.
            let covered = match (order, out.len() == limit, out.last()) {
                (ScanOrder::Forward, true, Some((k, _))) => {
                    let mut e = k.clone();
                    e.push(0);
                    (start.to_vec(), e)
                }
                (ScanOrder::Reverse, true, Some((k, _))) => (k.clone(), end.to_vec()),
                _ => (start.to_vec(), end.to_vec()),
            };
            self.read_ranges.push(covered);
        }
        Ok(out)
    }

    async fn put(&mut self, key: Vec<u8>, value: Vec<u8>) -> Result<()> {
        self.writes.insert(key, Some(value));
        Ok(())
    }

    async fn delete(&mut self, key: Vec<u8>) -> Result<()> {
        self.writes.insert(key, None);
        Ok(())
    }

    async fn commit(mut self: Box<Self>) -> Result<()> {
        if self.writes.is_empty() {
            self.finish();
            return Ok(());
        }
        if !self.tracked {
            return Err(StoreError::Backend("write in a read-only transaction".into()));
        }
        // The fsync blocks, so the whole commit runs off the async workers.
        tokio::task::spawn_blocking(move || {
            let mut txn = self;
            let shared = txn.shared.clone();
            let mut log = shared.log.lock().expect("commit log lock");
            for (v, written) in log.recent.iter() {
                if *v > txn.begin {
                    if let Some(k) = txn.conflicts_with(written) {
                        drop(log);
                        txn.finish();
                        return Err(StoreError::Conflict(format!(
                            "key {} was written after this transaction began",
                            String::from_utf8_lossy(&k)
                        )));
                    }
                }
            }
            let writes: WriteSet = std::mem::take(&mut txn.writes).into_iter().collect();
            shared.engine.write_durable(&writes)?;
            log.version += 1;
            let version = log.version;
            // Still under the commit lock: see `ReadCache`.
            shared
                .cache
                .lock()
                .expect("read cache lock")
                .committed(version, &writes);
            let keys: HashSet<Vec<u8>> = writes.into_iter().map(|(k, _)| k).collect();
            log.recent.push_back((version, Arc::new(keys)));
            drop(log);
            txn.finish();
            Ok(())
        })
        .await
        .map_err(|e| StoreError::Backend(format!("commit task failed: {e}")))?
    }

    async fn rollback(mut self: Box<Self>) -> Result<()> {
        self.finish();
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn open() -> (tempfile::TempDir, EmbeddedStore) {
        let dir = tempfile::tempdir().unwrap();
        let store = EmbeddedStore::open(dir.path(), EngineKind::Fjall).unwrap();
        (dir, store)
    }

    async fn put(store: &EmbeddedStore, key: &[u8], value: &[u8]) {
        let mut t = store.begin().await.unwrap();
        t.put(key.to_vec(), value.to_vec()).await.unwrap();
        t.commit().await.unwrap();
    }

    /// The read cache never hands a transaction a value older than its snapshot, and a
    /// transaction that read a value written after it began still conflicts.
    #[tokio::test]
    async fn the_read_cache_serves_the_latest_committed_value_and_keeps_conflicts() {
        let (_dir, store) = open();
        put(&store, b"k", b"1").await;

        // Cached by a read, then overwritten by a commit: a later transaction reads the new
        // value, from the cache.
        let mut t = store.begin().await.unwrap();
        assert_eq!(t.get(b"k").await.unwrap().as_deref(), Some(&b"1"[..]));
        t.rollback().await.unwrap();
        put(&store, b"k", b"2").await;
        let mut t = store.begin().await.unwrap();
        assert_eq!(t.get(b"k").await.unwrap().as_deref(), Some(&b"2"[..]));
        t.rollback().await.unwrap();

        // A transaction that began before a commit and reads after it: its snapshot value
        // must not be cached over the newer one (the fill is refused), and a transaction
        // that begins afterwards reads the newer value.
        let mut old = store.begin().await.unwrap();
        put(&store, b"j", b"a").await;
        assert_eq!(old.get(b"j").await.unwrap(), None);
        let mut t = store.begin().await.unwrap();
        assert_eq!(t.get(b"j").await.unwrap().as_deref(), Some(&b"a"[..]));
        t.rollback().await.unwrap();
        // ... and its write on top of what it read conflicts.
        old.put(b"j".to_vec(), b"b".to_vec()).await.unwrap();
        assert!(old.commit().await.unwrap_err().is_conflict());

        // Two read-modify-writes of one key: the second to commit conflicts even though it
        // read through the cache.
        let mut a = store.begin().await.unwrap();
        let mut b = store.begin().await.unwrap();
        assert_eq!(a.get(b"k").await.unwrap().as_deref(), Some(&b"2"[..]));
        assert_eq!(b.get(b"k").await.unwrap().as_deref(), Some(&b"2"[..]));
        a.put(b"k".to_vec(), b"3".to_vec()).await.unwrap();
        a.commit().await.unwrap();
        b.put(b"k".to_vec(), b"3".to_vec()).await.unwrap();
        assert!(b.commit().await.unwrap_err().is_conflict());

        // Deletes reach the cache too.
        let mut t = store.begin().await.unwrap();
        t.delete(b"k".to_vec()).await.unwrap();
        t.commit().await.unwrap();
        let mut t = store.begin().await.unwrap();
        assert_eq!(t.get(b"k").await.unwrap(), None);
        t.rollback().await.unwrap();

        // `get_latest` reads the latest committed value, cached or not, and a read that
        // missed fills the cache only from a snapshot no commit has passed.
        put(&store, b"g", b"1").await;
        assert_eq!(
            store.get_latest(&[b"g".to_vec()]).await.unwrap(),
            vec![Some(b"1".to_vec())]
        );
        put(&store, b"g", b"2").await;
        assert_eq!(
            store
                .get_latest(&[b"g".to_vec(), b"none".to_vec()])
                .await
                .unwrap(),
            vec![Some(b"2".to_vec()), None]
        );
        let mut t = store.begin().await.unwrap();
        assert_eq!(t.get(b"g").await.unwrap().as_deref(), Some(&b"2"[..]));
        t.rollback().await.unwrap();

        // Read-only transactions keep their snapshot.
        let mut r = store.begin_read().await.unwrap();
        put(&store, b"k", b"4").await;
        assert_eq!(r.get(b"k").await.unwrap(), None);
    }
}
