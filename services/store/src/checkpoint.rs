//! Stream checkpoints: how far the applier has applied each stream (`P/stream`).
//!
//! A sequence alone names no position: a stream that is deleted and recreated, or comes back
//! empty after its server lost its storage, numbers its events from 1 again, and a bare
//! "last applied seq" would then skip every new event up to the old number (each answered
//! 202 and never applied). So a checkpoint is the pair (stream instance, seq): the bus names
//! an instance by the stream's creation time, and events of an instance other than the
//! checkpointed one are applied from the start of that instance. Re-applying is safe: every
//! event leaves an applied marker (`M/` for messages, `E/` for the rest) that makes a second
//! application a no-op.
//!
//! The checkpoint also carries the highest HLC applied from the stream, written in the same
//! transaction as the effects: the gateway seeds its clock from the largest one at start, so
//! a process restarted on a wall clock that stepped back never stamps below what is stored.
//!
//! Value layout: 24 bytes, `seq ‖ instance ‖ max_hlc`, each u64 big-endian. Checkpoints from
//! before instances were recorded are 8 bytes (`seq`) and read as instance 0 ("not
//! recorded"), max HLC 0.

use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};

use meridian_model::Hlc;

use crate::kv::{prefix_end, KvTxn};
use crate::{Result, Store, StoreError};

/// Where the applier is in one stream.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Checkpoint {
    /// The stream instance `seq` counts in; 0 when not recorded (written before instances
    /// were), which the next batch of any instance adopts.
    pub instance: u64,
    /// The last applied stream sequence (0: nothing applied from this instance yet).
    pub seq: u64,
    /// The highest HLC applied from this stream, across instances.
    pub max_hlc: u64,
}

/// A stream as [`Store::apply_batch`] sees it: its name and the instance the events come
/// from. Instance 0 means "not known": the batch then counts in whatever instance the
/// checkpoint names (store tests and tools that feed one stream use plain names).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct StreamRef<'a> {
    pub name: &'a str,
    pub instance: u64,
}

impl<'a> StreamRef<'a> {
    pub fn new(name: &'a str, instance: u64) -> Self {
        Self { name, instance }
    }
}

impl<'a> From<&'a str> for StreamRef<'a> {
    fn from(name: &'a str) -> Self {
        Self { name, instance: 0 }
    }
}

impl<'a> From<&'a String> for StreamRef<'a> {
    fn from(name: &'a String) -> Self {
        Self {
            name: name.as_str(),
            instance: 0,
        }
    }
}

const LEGACY_LEN: usize = 8;
const LEN: usize = 24;

impl Checkpoint {
    pub(crate) fn encode(&self) -> Vec<u8> {
        let mut out = Vec::with_capacity(LEN);
        out.extend_from_slice(&self.seq.to_be_bytes());
        out.extend_from_slice(&self.instance.to_be_bytes());
        out.extend_from_slice(&self.max_hlc.to_be_bytes());
        out
    }

    pub(crate) fn decode(key: &[u8], v: &[u8]) -> Result<Self> {
        let word = |i: usize| {
            let bytes: [u8; 8] = v[i * 8..(i + 1) * 8].try_into().unwrap_or([0; 8]);
            u64::from_be_bytes(bytes)
        };
        match v.len() {
            LEGACY_LEN => Ok(Checkpoint {
                instance: 0,
                seq: word(0),
                max_hlc: 0,
            }),
            LEN => Ok(Checkpoint {
                seq: word(0),
                instance: word(1),
                max_hlc: word(2),
            }),
            n => Err(StoreError::corrupt(
                key,
                format!("checkpoint of {n} bytes (expected {LEGACY_LEN} or {LEN})"),
            )),
        }
    }

    /// Whether a batch from `instance` continues this checkpoint (either side unknown
    /// counts as the same instance).
    pub fn continues(&self, instance: u64) -> bool {
        self.instance == 0 || instance == 0 || self.instance == instance
    }

    /// Where a batch from `instance` starts counting: here, or at the start of a new
    /// instance (the max HLC is the store's, and carries over).
    pub(crate) fn for_instance(&self, instance: u64) -> Checkpoint {
        if self.continues(instance) {
            Checkpoint {
                instance: if instance == 0 { self.instance } else { instance },
                ..*self
            }
        } else {
            Checkpoint {
                instance,
                seq: 0,
                max_hlc: self.max_hlc,
            }
        }
    }
}

pub(crate) async fn read(txn: &mut dyn KvTxn, key: &[u8]) -> Result<Checkpoint> {
    match txn.get(key).await? {
        Some(v) => Checkpoint::decode(key, &v),
        None => Ok(Checkpoint::default()),
    }
}

impl Store {
    /// The last applied sequence of `stream` (0 if none), in whatever instance the
    /// checkpoint names. See [`Store::stream_checkpoint`] for the instance.
    pub async fn checkpoint(&self, stream: &str) -> Result<u64> {
        Ok(self.stream_checkpoint(stream).await?.seq)
    }

    /// The whole checkpoint of `stream` (all zero if none).
    pub async fn stream_checkpoint(&self, stream: &str) -> Result<Checkpoint> {
        let key = self.keys().checkpoint(stream);
        let mut txn = self.kv().begin_read().await?;
        let cp = read(txn.as_mut(), &key).await;
        txn.rollback().await?;
        cp
    }

    /// Records that `stream` is now `instance`, with nothing of it applied yet: the applier
    /// calls this when the stream it finds is not the one checkpointed, so that waits for
    /// "applied through seq n" (the gateway's read-your-writes) count in the new instance
    /// from the start. Keeps the max HLC.
    pub async fn reset_checkpoint(&self, stream: &str, instance: u64) -> Result<Checkpoint> {
        let key = self.keys().checkpoint(stream);
        let mut txn = self.kv().begin().await?;
        let old = read(txn.as_mut(), &key).await?;
        let new = Checkpoint {
            instance,
            seq: 0,
            max_hlc: old.max_hlc,
        };
        txn.put(key, new.encode()).await?;
        txn.commit().await?;
        Ok(new)
    }

    /// The highest HLC applied from any stream: the gateway's clock observes it before
    /// stamping every event.
    ///
    /// Read from the checkpoints once; after that, in a process that applies
    /// (`apply_batch` raises the watermark before each commit), from memory. Scanning the
    /// checkpoints on every send cost more than the rest of the send together: each
    /// checkpoint key is rewritten by every applied batch, and an LSM memtable keeps every
    /// version until it is flushed, so the scan walked thousands of versions (at 2,000
    /// msg/s the region process spent over half its CPU there). A process that does not
    /// apply (a split-role gateway) cannot see another process's commits in memory, so it
    /// still reads the checkpoints each time.
    pub async fn max_applied_hlc(&self) -> Result<Hlc> {
        let watermark = &self.applied_hlc;
        if let Some(hlc) = watermark.served() {
            return Ok(Hlc(hlc));
        }
        let prefix = self.keys().family(b'P');
        let end = prefix_end(&prefix);
        let mut txn = self.kv().begin_read().await?;
        let all = Store::scan_all(txn.as_mut(), &prefix, &end).await;
        txn.rollback().await?;
        let mut max = 0;
        for (k, v) in all? {
            max = max.max(Checkpoint::decode(&k, &v)?.max_hlc);
        }
        Ok(Hlc(watermark.seed(max)))
    }

    /// Called by `apply_batch` before it commits a checkpoint whose max HLC is `hlc`.
    pub(crate) fn raise_applied_hlc(&self, hlc: u64) {
        self.applied_hlc.raise(hlc);
    }
}

/// The highest HLC this process has applied, or is about to commit, joined with what the
/// checkpoints held when it was first read. Raised *before* a batch commits, so a reader can
/// never see an applied event whose HLC the watermark lacks; a raise whose commit then fails
/// leaves it a little high, which only moves the clock on (always allowed).
#[derive(Debug, Default)]
pub(crate) struct AppliedWatermark {
    max: AtomicU64,
    /// The checkpoints have been read into `max`.
    seeded: AtomicBool,
    /// This process applies: every commit raises `max` first.
    applying: AtomicBool,
}

impl AppliedWatermark {
    /// The watermark, if memory alone can answer: seeded, and this process applies.
    fn served(&self) -> Option<u64> {
        (self.applying.load(Ordering::Acquire) && self.seeded.load(Ordering::Acquire))
            .then(|| self.max.load(Ordering::Acquire))
    }

    /// Joins a value read from the checkpoints; returns the watermark.
    fn seed(&self, scanned: u64) -> u64 {
        let before = self.max.fetch_max(scanned, Ordering::AcqRel);
        self.seeded.store(true, Ordering::Release);
        before.max(scanned)
    }

    fn raise(&self, hlc: u64) {
        // `applying` first: from here on every commit of this process raises `max` before
        // it commits, so a scan that seeds afterwards plus these raises cover every commit.
        self.applying.store(true, Ordering::Release);
        self.max.fetch_max(hlc, Ordering::AcqRel);
    }
}
