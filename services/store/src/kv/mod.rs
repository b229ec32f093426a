//! The small KV transaction trait every backend implements, and `open`, which picks a
//! backend from a store URL. Everything above this module (timelines, inboxes, apply) is
//! written once against the trait.
//!
//! Semantics every backend must give (the conformance suite in `tests/conformance.rs`
//! checks them): snapshot reads that also see the transaction's own writes; forward and
//! reverse range scans with a limit over `[start, end)`; optimistic commit that fails with
//! `StoreError::Conflict` when a key this transaction read (or a range it scanned) was
//! written by a transaction that committed after this one began; a commit that has returned
//! is durable.

pub mod embedded;
pub mod tikv;

use std::sync::Arc;

use async_trait::async_trait;

use crate::{Result, StoreError};

pub type KvPair = (Vec<u8>, Vec<u8>);

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ScanOrder {
    Forward,
    Reverse,
}

/// A transactional key-value store.
#[async_trait]
pub trait KvStore: Send + Sync + 'static {
    /// A read-write transaction.
    async fn begin(&self) -> Result<Box<dyn KvTxn>>;
    /// A transaction that will only read; backends may make it cheaper.
    async fn begin_read(&self) -> Result<Box<dyn KvTxn>> {
        self.begin().await
    }
    /// The latest committed value of each key. No snapshot spans the keys: each value is at
    /// least as new as a snapshot taken when the call began. For single-record lookups on
    /// hot paths (the caller's user record, the activity version the clock observes);
    /// backends may serve it from a cache.
    async fn get_latest(&self, keys: &[Vec<u8>]) -> Result<Vec<Option<Vec<u8>>>> {
        let mut txn = self.begin_read().await?;
        let out = txn.batch_get(keys).await;
        txn.rollback().await?;
        out
    }
    /// Backend name, for logs and the conformance suite.
    fn backend(&self) -> &'static str;
}

#[async_trait]
pub trait KvTxn: Send {
    async fn get(&mut self, key: &[u8]) -> Result<Option<Vec<u8>>>;
    async fn batch_get(&mut self, keys: &[Vec<u8>]) -> Result<Vec<Option<Vec<u8>>>>;
    /// Up to `limit` pairs with `start <= key < end`, ascending for `Forward`, descending
    /// for `Reverse`.
    async fn scan(&mut self, start: &[u8], end: &[u8], limit: usize, order: ScanOrder)
        -> Result<Vec<KvPair>>;
    async fn put(&mut self, key: Vec<u8>, value: Vec<u8>) -> Result<()>;
    async fn delete(&mut self, key: Vec<u8>) -> Result<()>;
    async fn commit(self: Box<Self>) -> Result<()>;
    async fn rollback(self: Box<Self>) -> Result<()>;
}

/// Opens the store a URL names:
/// - `tikv://pd1:2379,pd2:2379` — a TiKV cluster through its PD endpoints;
/// - `embedded:///var/lib/meridian/us` or a plain path — the embedded engine (fjall) in
///   that directory; `?engine=redb` picks the other measured candidate.
pub async fn open(url: &str) -> Result<Arc<dyn KvStore>> {
    if let Some(rest) = url.strip_prefix("tikv://") {
        let pd: Vec<String> = rest
            .split(',')
            .map(str::trim)
            .filter(|s| !s.is_empty())
            .map(String::from)
            .collect();
        if pd.is_empty() {
            return Err(StoreError::InvalidUrl {
                url: url.into(),
                reason: "tikv:// needs at least one PD endpoint".into(),
            });
        }
        return Ok(Arc::new(tikv::TikvStore::connect(pd).await?));
    }
    let rest = url.strip_prefix("embedded://").unwrap_or(url);
    let (path, query) = rest.split_once('?').unwrap_or((rest, ""));
    if path.is_empty() {
        return Err(StoreError::InvalidUrl {
            url: url.into(),
            reason: "the embedded store needs a directory".into(),
        });
    }
    let engine = match query.strip_prefix("engine=") {
        None if query.is_empty() => embedded::EngineKind::Fjall,
        Some("fjall") => embedded::EngineKind::Fjall,
        Some("redb") => embedded::EngineKind::Redb,
        _ => {
            return Err(StoreError::InvalidUrl {
                url: url.into(),
                reason: "the only option is engine=fjall|redb".into(),
            });
        }
    };
    Ok(Arc::new(embedded::EmbeddedStore::open(path, engine)?))
}

/// The smallest key strictly greater than every key starting with `prefix`, for
/// turning a prefix into a `[start, end)` range.
pub fn prefix_end(prefix: &[u8]) -> Vec<u8> {
    let mut end = prefix.to_vec();
    while let Some(last) = end.pop() {
        if last < 0xff {
            end.push(last + 1);
            return end;
        }
    }
    // All 0xff: no finite bound; the largest key we ever build is far below this.
    vec![0xff; prefix.len() + 1]
}
