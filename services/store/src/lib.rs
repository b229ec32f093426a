//! Meridian's store: a small KV transaction trait with two backends, and the timeline model
//! of docs/design.md §2 and §4 written once on top of it. It knows nothing of HTTP or NATS.
//!
//! # Layout
//! - [`kv`]: the `KvStore`/`KvTxn` traits and `kv::open(url)`; backends are sibling files:
//!   [`kv::embedded`] (fjall, or redb, with optimistic transactions added on top) and
//!   [`kv::tikv`] (tikv-client).
//! - [`keys`]: the key layout, one table of record families.
//! - [`records`]: the stored records and their merge rules (LWW and max registers).
//! - [`apply`]: `plan_event`, the pure function from (state, event) to writes, and
//!   `Store::apply_batch`, one transaction per batch with the stream checkpoint, bounded in
//!   bytes and inbox appends (`budget`).
//! - [`coalesce`]: read diffusion's trailing edge: the per-conversation marker of messages
//!   coalesced away, and the flush that notifies the members who missed them.
//! - [`checkpoint`]: stream checkpoints, (stream instance, seq) pairs, and the max HLC
//!   applied.
//! - [`inbox`]: sync timelines: reads with epoch and TTL checks, the expiry sweeper.
//! - [`timeline`]: storage timeline reads (history pages, messages by id).
//! - [`conversations`]: conversation info, members, the per-user conversation list.
//! - [`directory`]: users, serving regions, devices.
//! - [`digest`]: per-conversation and per-region digests of the replicated state.
//! - [`requests`]: client idempotency keys (region-local, written directly).
//! - [`search_feed`]: the messages applied, per stream position, for the search indexer,
//!   and the reads a rebuild of the search index makes.
//! - `testing` (feature `testing`): fixtures for tests that apply events to a real store.
//! - `versions`: the newest version a state change would overwrite, which the gateway's
//!   clock observes before stamping it.

pub mod apply;
mod budget;
pub mod checkpoint;
pub mod coalesce;
pub mod conversations;
pub mod digest;
pub mod directory;
mod error;
pub mod inbox;
pub mod keys;
pub mod kv;
pub mod records;
pub mod requests;
pub mod search_feed;
#[cfg(feature = "testing")]
pub mod testing;
pub mod timeline;
mod versions;

use std::sync::Arc;

pub use apply::{ApplyConfig, ApplyReport, Delivery, SequencedEvent};
pub use checkpoint::{Checkpoint, StreamRef};
pub use error::{Result, StoreError};
pub use kv::{KvStore, KvTxn, ScanOrder};

use keys::Keys;

/// The store as every role sees it: a KV backend plus a key namespace (empty in production,
/// unique per test so tests share one backend without seeing each other).
#[derive(Clone)]
pub struct Store {
    kv: Arc<dyn KvStore>,
    keys: Keys,
    /// Member keys of direct conversations known to exist: see [`Store::send_check`].
    direct_members: Arc<conversations::DirectMemberCache>,
    /// The highest HLC applied, kept in memory once this process applies: see
    /// [`Store::max_applied_hlc`].
    applied_hlc: Arc<checkpoint::AppliedWatermark>,
}

impl Store {
    /// Opens the backend a store URL names (see [`kv::open`]).
    pub async fn open(url: &str, namespace: &[u8]) -> Result<Self> {
        Ok(Self::new(kv::open(url).await?, namespace))
    }

    pub fn new(kv: Arc<dyn KvStore>, namespace: &[u8]) -> Self {
        Self {
            kv,
            keys: Keys::new(namespace),
            direct_members: Default::default(),
            applied_hlc: Default::default(),
        }
    }

    pub fn kv(&self) -> &Arc<dyn KvStore> {
        &self.kv
    }

    pub fn keys(&self) -> &Keys {
        &self.keys
    }

    /// Reads every page of `[start, end)`, in order.
    pub(crate) async fn scan_all(txn: &mut dyn KvTxn, start: &[u8], end: &[u8]) -> Result<Vec<kv::KvPair>> {
        const PAGE: usize = 1024;
        let mut out = Vec::new();
        let mut from = start.to_vec();
        loop {
            let page = txn.scan(&from, end, PAGE, ScanOrder::Forward).await?;
            let full = page.len() == PAGE;
            if let Some((k, _)) = page.last() {
                from = k.clone();
                from.push(0);
            }
            out.extend(page);
            if !full {
                return Ok(out);
            }
        }
    }
}
