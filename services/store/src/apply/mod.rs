//! Applying events. `plan_event` is the pure part: it reads state through a transaction and
//! returns the writes an event causes (plus the inbox entries to deliver live) without
//! performing them. `Store::apply_batch` feeds it a batch from one stream inside one
//! transaction together with the stream's applied checkpoint, so effects are exactly-once:
//! anything at or below the checkpoint is skipped, and every event id is recorded, so a
//! retried send that arrives again under a new stream sequence is skipped too.
//!
//! Replicated state merges by the rules of docs/design.md §4, so every region reaches
//! the same state (and digest) whatever order it applies events in. Inboxes are the one
//! region-local effect: a region appends to the inboxes of the users it serves.
//!
//! Layout: `batch` (the transaction, the checkpoint, the budget), `plan` (`plan_event` and
//! one planning function per event kind) and `fanout` (inbox appends).

mod batch;
mod fanout;
mod plan;

use std::sync::Arc;

use meridian_model::events::{EventEnvelope, LiveEntry};
use meridian_model::{RegionId, UserId};

use crate::records::*;
use crate::{Result, StoreError};

pub use plan::plan_event;

/// How this region applies events.
#[derive(Debug, Clone)]
pub struct ApplyConfig {
    /// The region doing the applying: it fans out to the inboxes of the users it serves.
    pub region: RegionId,
    /// Groups with more members than this use read diffusion (docs/design.md §2).
    pub read_diffusion_threshold: usize,
    /// Read diffusion gives a member at most one "conversation advanced" entry per window.
    pub coalesce_window_ms: u64,
    /// A batch stops planning once its staged writes hold this many bytes: it commits the
    /// events planned so far and reports how far it got (`ApplyReport::consumed`).
    pub batch_max_bytes: usize,
    /// A batch stops planning once it has appended this many inbox entries (fan-out).
    pub batch_max_inbox_appends: usize,
}

impl ApplyConfig {
    pub fn new(region: RegionId) -> Self {
        Self {
            region,
            read_diffusion_threshold: 500,
            coalesce_window_ms: 1_000,
            batch_max_bytes: 8 * 1024 * 1024,
            batch_max_inbox_appends: 20_000,
        }
    }
}

/// A write the plan asks for.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Write {
    Put(Vec<u8>, Vec<u8>),
    Delete(Vec<u8>),
}

/// An inbox entry to hand to live delivery once the transaction has committed. The timeline
/// entry is shared by every delivery of one event: a message to a large group is held once,
/// not once per member.
#[derive(Debug, Clone, PartialEq)]
pub struct Delivery {
    pub user: UserId,
    /// The inbox epoch `seq` belongs to.
    pub epoch: String,
    pub seq: u64,
    pub conversation_id: String,
    pub order_key: Vec<u8>,
    pub appended_at_ms: u64,
    pub entry: Arc<TimelineEntry>,
}

impl Delivery {
    /// The wire message live delivery publishes for this entry.
    pub fn live_entry(&self) -> LiveEntry {
        let t = &*self.entry;
        LiveEntry {
            seq: self.seq,
            conversation_id: self.conversation_id.clone(),
            order_key: self.order_key.clone(),
            appended_at_ms: self.appended_at_ms,
            kind: t.kind.clone(),
            event_id: t.event_id.clone(),
            actor: t.actor.clone(),
            at_ms: t.at_ms,
            msg_type: t.msg_type.clone(),
            body_json: t.body_json.clone(),
            client_msg_id: t.client_msg_id.clone(),
            detail_json: t.detail_json.clone(),
            detail: t.detail.clone(),
            epoch: self.epoch.clone(),
        }
    }
}

/// A live entry as the inbox entry `Store::read_inbox` would return for it, so receivers
/// render live and replayed entries alike.
impl From<LiveEntry> for InboxEntry {
    fn from(l: LiveEntry) -> Self {
        InboxEntry {
            seq: l.seq,
            conversation_id: l.conversation_id,
            order_key: l.order_key,
            appended_at_ms: l.appended_at_ms,
            entry: Some(TimelineEntry {
                kind: l.kind,
                event_id: l.event_id,
                actor: l.actor,
                at_ms: l.at_ms,
                msg_type: l.msg_type,
                body_json: l.body_json,
                client_msg_id: l.client_msg_id,
                detail_json: l.detail_json,
                detail: l.detail,
            }),
        }
    }
}

/// What one event does.
#[derive(Debug, Default)]
pub struct Plan {
    pub writes: Vec<Write>,
    pub deliveries: Vec<Delivery>,
    /// The event id was applied before (a redelivery or a late retry).
    pub duplicate: bool,
    /// The event could not be applied (malformed body); it is recorded as applied so it
    /// never wedges the stream, and the reason is logged.
    pub rejected: Option<String>,
}

/// The result of one batch.
#[derive(Debug, Default)]
pub struct ApplyReport {
    pub applied: usize,
    pub duplicates: usize,
    pub rejected: usize,
    /// Events at or below the checkpoint (redelivered by the stream).
    pub below_checkpoint: usize,
    pub checkpoint: u64,
    /// How many of the given events this batch got through (applied, or skipped as at or
    /// below the checkpoint). Fewer than given when the batch reached a bound of
    /// `ApplyConfig` (never zero for a non-empty batch): apply the rest in another call.
    pub consumed: usize,
    pub deliveries: Vec<Delivery>,
    /// Conflicts retried before the batch committed.
    pub retries: usize,
}

/// One event with its position in its stream.
#[derive(Debug, Clone)]
pub struct SequencedEvent {
    pub stream_seq: u64,
    pub envelope: EventEnvelope,
}

/// User ids never contain `\n`, so a newline-joined list is unambiguous.
fn encode_member_list(members: &[UserId]) -> Vec<u8> {
    let mut out = Vec::with_capacity(members.len() * 12);
    for m in members {
        out.extend_from_slice(m.as_str().as_bytes());
        out.push(b'\n');
    }
    out
}

pub(crate) fn decode_member_list(b: &[u8]) -> Result<Vec<UserId>> {
    b.split(|c| *c == b'\n')
        .filter(|s| !s.is_empty())
        .map(|s| Ok(UserId::parse(String::from_utf8_lossy(s).into_owned())?))
        .collect()
}

pub(crate) fn decode_u64(key: &[u8], v: &[u8]) -> Result<u64> {
    let arr: [u8; 8] = v
        .try_into()
        .map_err(|_| StoreError::corrupt(key, "expected 8 bytes"))?;
    Ok(u64::from_be_bytes(arr))
}

pub(crate) fn now_ms() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_millis() as u64)
        .unwrap_or(0)
}

/// The epoch of an inbox served by `serving`, given the version of the region's serving
/// register: it changes whenever the serving region changes (failover, failback).
pub fn inbox_epoch(serving: &RegionId, serving_version: &[u8]) -> String {
    let generation = if serving_version.len() >= 8 {
        u64::from_be_bytes(serving_version[..8].try_into().unwrap_or([0; 8]))
    } else {
        0
    };
    format!("{serving}.{generation:x}")
}
