//! The TiKV backend: tikv-client's optimistic `TransactionClient`.
//!
//! Three traps this adapter handles (see the foundation issue):
//! - tikv-client errors carry tonic 0.10 / prost 0.12 types; they are mapped to
//!   `StoreError` here and never leave this file;
//! - a `Transaction` dropped before commit or rollback panics by default; transactions are
//!   begun with `CheckLevel::Warn` and always ended explicitly;
//! - a write conflict is reported as `StoreError::Conflict` and never retried here: the
//!   caller re-reads and re-decides, because the merge rules depend on deciding from
//!   fresh state.
//!
//! This backend cannot run on the development machines (no TiKV server is packaged in any
//! registry they reach); the conformance suite runs against it when `MERIDIAN_TIKV_PD` is set.

use async_trait::async_trait;
use tikv_client::{CheckLevel, Error as TikvError, Transaction, TransactionClient, TransactionOptions};

use super::{KvPair, KvStore, KvTxn, ScanOrder};
use crate::{Result, StoreError};

/// TiKV caps one scan request; larger limits are served by continuing the scan.
const MAX_SCAN: usize = 10_240;

pub struct TikvStore {
    client: TransactionClient,
}

impl TikvStore {
    pub async fn connect(pd_endpoints: Vec<String>) -> Result<Self> {
        let client = TransactionClient::new(pd_endpoints).await.map_err(map_err)?;
        Ok(Self { client })
    }

    fn options() -> TransactionOptions {
        TransactionOptions::new_optimistic().drop_check(CheckLevel::Warn)
    }
}

fn is_conflict(e: &TikvError) -> bool {
    match e {
        TikvError::KeyError(k) => k.conflict.is_some() || !k.retryable.is_empty(),
        TikvError::MultipleKeyErrors(v) | TikvError::ExtractedErrors(v) => v.iter().any(is_conflict),
        TikvError::UndeterminedError(inner) => is_conflict(inner),
        _ => false,
    }
}

fn map_err(e: TikvError) -> StoreError {
    if is_conflict(&e) {
        StoreError::Conflict(format!("tikv: {e}"))
    } else {
        StoreError::Backend(format!("tikv: {e}"))
    }
}

#[async_trait]
impl KvStore for TikvStore {
    async fn begin(&self) -> Result<Box<dyn KvTxn>> {
        let txn = self
            .client
            .begin_with_options(Self::options())
            .await
            .map_err(map_err)?;
        Ok(Box::new(TikvTxn { txn: Some(txn) }))
    }

    async fn begin_read(&self) -> Result<Box<dyn KvTxn>> {
        let txn = self
            .client
            .begin_with_options(Self::options().read_only())
            .await
            .map_err(map_err)?;
        Ok(Box::new(TikvTxn { txn: Some(txn) }))
    }

    fn backend(&self) -> &'static str {
        "tikv"
    }
}

pub struct TikvTxn {
    /// `None` once committed or rolled back.
    txn: Option<Transaction>,
}

impl TikvTxn {
    fn txn(&mut self) -> Result<&mut Transaction> {
        self.txn
            .as_mut()
            .ok_or_else(|| StoreError::Backend("transaction already finished".into()))
    }
}

impl Drop for TikvTxn {
    fn drop(&mut self) {
        if let Some(mut txn) = self.txn.take() {
            // An abandoned optimistic transaction has written nothing to TiKV yet; roll it
            // back in the background so its drop check stays quiet.
            if let Ok(handle) = tokio::runtime::Handle::try_current() {
                handle.spawn(async move {
                    let _ = txn.rollback().await;
                });
            }
        }
    }
}

#[async_trait]
impl KvTxn for TikvTxn {
    async fn get(&mut self, key: &[u8]) -> Result<Option<Vec<u8>>> {
        self.txn()?.get(key.to_vec()).await.map_err(map_err)
    }

    async fn batch_get(&mut self, keys: &[Vec<u8>]) -> Result<Vec<Option<Vec<u8>>>> {
        let found: std::collections::HashMap<Vec<u8>, Vec<u8>> = self
            .txn()?
            .batch_get(keys.to_vec())
            .await
            .map_err(map_err)?
            .map(|p| {
                let (k, v): (tikv_client::Key, Vec<u8>) = p.into();
                (Vec::<u8>::from(k), v)
            })
            .collect();
        Ok(keys.iter().map(|k| found.get(k).cloned()).collect())
    }

    async fn scan(
        &mut self,
        start: &[u8],
        end: &[u8],
        limit: usize,
        order: ScanOrder,
    ) -> Result<Vec<KvPair>> {
        let mut out: Vec<KvPair> = Vec::new();
        let (mut lo, mut hi) = (start.to_vec(), end.to_vec());
        while out.len() < limit && lo < hi {
            let want = (limit - out.len()).min(MAX_SCAN);
            let txn = self.txn()?;
            let pairs: Vec<tikv_client::KvPair> = match order {
                ScanOrder::Forward => txn
                    .scan(lo.clone()..hi.clone(), want as u32)
                    .await
                    .map_err(map_err)?
                    .collect(),
                ScanOrder::Reverse => txn
                    .scan_reverse(lo.clone()..hi.clone(), want as u32)
                    .await
                    .map_err(map_err)?
                    .collect(),
            };
            let page: Vec<KvPair> = pairs
                .into_iter()
                .map(|p| {
                    let (k, v): (tikv_client::Key, Vec<u8>) = p.into();
                    (Vec::<u8>::from(k), v)
                })
                .collect();
            let n = page.len();
            if let Some((last, _)) = page.last() {
                match order {
                    ScanOrder::Forward => {
                        lo = last.clone();
                        lo.push(0);
                    }
                    ScanOrder::Reverse => hi = last.clone(),
                }
            }
            out.extend(page);
            if n < want {
                break;
            }
        }
        Ok(out)
    }

    async fn put(&mut self, key: Vec<u8>, value: Vec<u8>) -> Result<()> {
        self.txn()?.put(key, value).await.map_err(map_err)
    }

    async fn delete(&mut self, key: Vec<u8>) -> Result<()> {
        self.txn()?.delete(key).await.map_err(map_err)
    }

    async fn commit(mut self: Box<Self>) -> Result<()> {
        let mut txn = self
            .txn
            .take()
            .ok_or_else(|| StoreError::Backend("transaction already finished".into()))?;
        match txn.commit().await {
            Ok(_) => Ok(()),
            Err(e) => {
                let _ = txn.rollback().await;
                Err(map_err(e))
            }
        }
    }

    async fn rollback(mut self: Box<Self>) -> Result<()> {
        match self.txn.take() {
            Some(mut txn) => txn.rollback().await.map_err(map_err),
            None => Ok(()),
        }
    }
}
