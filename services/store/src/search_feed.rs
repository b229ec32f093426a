//! The search feed: which messages the applier committed, in the order it committed them, for
//! the region's search indexer (`services/search`), which reads it after its own checkpoint.
//!
//! `Store::apply_batch` writes one entry per newly applied message (`F/stream/instance/seq`,
//! value the message id) in the batch's transaction, so the feed holds exactly what is
//! committed, and positions are the stream's own (instance, seq) pairs: per stream they only
//! grow while the instance lasts, with no shared counter for concurrent appliers of different
//! streams to conflict on. The applier never reads the feed and the indexer only deletes
//! entries it has indexed (blind deletes), so the feed never conflicts with applying.
//!
//! The rest of the indexer's reads are here too: every applied checkpoint (where each feed
//! ends), and every message of every timeline in key order (a rebuild from the store).

use meridian_model::{ConversationId, EventId, OrderKey};

use crate::checkpoint::Checkpoint;
use crate::kv::{prefix_end, ScanOrder};
use crate::records::{decode, MessageLocator, TimelineEntry};
use crate::{Result, Store, StoreError};

/// A message as the index needs it (the body as stored; recalls and deletes-for-me are the
/// query side's business, read from the store when a result is shown).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct IndexableMessage {
    pub message_id: EventId,
    pub conversation_id: ConversationId,
    pub order_key: OrderKey,
    pub sender: String,
    pub sent_at_ms: u64,
    pub msg_type: String,
    pub body_json: String,
}

/// A page of one stream's feed.
#[derive(Debug, Clone, Default)]
pub struct FeedPage {
    /// The messages of the page's entries that still exist (a message replaced by a later
    /// copy is read as that copy).
    pub messages: Vec<IndexableMessage>,
    /// The seq of the last entry read (`None`: nothing after the given seq).
    pub last_seq: Option<u64>,
    /// How many entries were read (the page is full when this is the limit asked for).
    pub entries: usize,
}

/// Where a rebuild continues: after this timeline key.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct TimelineScanPos(Vec<u8>);

impl TimelineScanPos {
    /// A position kept elsewhere (the search index keeps it in its commit payload).
    pub fn from_key(key: Vec<u8>) -> Self {
        Self(key)
    }

    pub fn key(&self) -> &[u8] {
        &self.0
    }
}

impl Store {
    /// Every stream's applied checkpoint, by stream name.
    pub async fn applied_checkpoints(&self) -> Result<Vec<(String, Checkpoint)>> {
        let prefix = self.keys().family(b'P');
        let end = prefix_end(&prefix);
        let mut txn = self.kv().begin_read().await?;
        let rows = Store::scan_all(txn.as_mut(), &prefix, &end).await;
        txn.rollback().await?;
        rows?
            .into_iter()
            .map(|(k, v)| {
                let name = String::from_utf8_lossy(&k[prefix.len()..]).into_owned();
                Ok((name, Checkpoint::decode(&k, &v)?))
            })
            .collect()
    }

    /// Up to `limit` feed entries of `stream`'s `instance` after `after_seq`, resolved to
    /// the messages they name.
    pub async fn search_feed(
        &self,
        stream: &str,
        instance: u64,
        after_seq: u64,
        limit: usize,
    ) -> Result<FeedPage> {
        let prefix = self.keys().search_feed_prefix(stream, instance);
        let start = self
            .keys()
            .search_feed(stream, instance, after_seq.saturating_add(1));
        let end = prefix_end(&prefix);
        let mut txn = self.kv().begin_read().await?;
        let rows = txn.scan(&start, &end, limit.max(1), ScanOrder::Forward).await?;
        let mut page = FeedPage {
            entries: rows.len(),
            ..FeedPage::default()
        };
        let mut ids = Vec::with_capacity(rows.len());
        for (k, v) in &rows {
            let seq: [u8; 8] = k[prefix.len()..]
                .try_into()
                .map_err(|_| StoreError::corrupt(k, "feed key without an 8-byte seq"))?;
            page.last_seq = Some(u64::from_be_bytes(seq));
            ids.push(EventId::from_bytes(v)?);
        }
        let locator_keys: Vec<Vec<u8>> = ids.iter().map(|id| self.keys().message(id)).collect();
        let locators = txn.batch_get(&locator_keys).await?;
        let mut timeline_keys = Vec::with_capacity(ids.len());
        let mut located = Vec::with_capacity(ids.len());
        for (key, found) in locator_keys.iter().zip(locators) {
            let Some(bytes) = found else { continue };
            let loc: MessageLocator = decode(key, &bytes)?;
            let cid = ConversationId::parse(loc.conversation_id.clone())?;
            let okey = OrderKey::from_bytes(&loc.order_key)?;
            timeline_keys.push(self.keys().timeline(&cid, &okey));
            located.push((cid, okey));
        }
        let entries = txn.batch_get(&timeline_keys).await?;
        txn.rollback().await?;
        for ((key, found), (cid, okey)) in timeline_keys.iter().zip(entries).zip(located) {
            let Some(bytes) = found else { continue };
            let entry: TimelineEntry = decode(key, &bytes)?;
            page.messages.push(indexable(cid, okey, entry));
        }
        Ok(page)
    }

    /// Deletes `stream`'s feed entries of `instance` after `after_seq` up to and including
    /// `through_seq` (all of them from `after_seq` on with `u64::MAX`): the indexer has
    /// committed them. The indexer passes what it trimmed last as `after_seq`: deleted
    /// entries stay in the LSM as tombstones until compaction, and a trim scanning from the
    /// start of the feed every time walked all of them (hundreds of thousands under load).
    pub async fn trim_search_feed(
        &self,
        stream: &str,
        instance: u64,
        after_seq: u64,
        through_seq: u64,
    ) -> Result<usize> {
        let prefix = self.keys().search_feed_prefix(stream, instance);
        let end = if through_seq == u64::MAX {
            prefix_end(&prefix)
        } else {
            self.keys().search_feed(stream, instance, through_seq + 1)
        };
        let start = match after_seq.checked_add(1) {
            Some(first) if after_seq > 0 => self.keys().search_feed(stream, instance, first),
            _ => prefix.clone(),
        };
        if start >= end {
            return Ok(0);
        }
        let mut deleted = 0;
        loop {
            // Read in one transaction, delete blindly in another: the applier's commits
            // never see a read of theirs invalidated, nor does this.
            let mut read = self.kv().begin_read().await?;
            let rows = read.scan(&start, &end, 1024, ScanOrder::Forward).await?;
            read.rollback().await?;
            if rows.is_empty() {
                return Ok(deleted);
            }
            let mut txn = self.kv().begin().await?;
            for (k, _) in rows {
                txn.delete(k).await?;
                deleted += 1;
            }
            txn.commit().await?;
        }
    }

    /// Up to `limit` messages of all timelines after `after` (from the start with `None`),
    /// in key order, and where to continue (`None`: the end was reached).
    pub async fn scan_messages(
        &self,
        after: Option<&TimelineScanPos>,
        limit: usize,
    ) -> Result<(Vec<IndexableMessage>, Option<TimelineScanPos>)> {
        let family = self.keys().family(b'T');
        let end = prefix_end(&family);
        let start = match after {
            Some(TimelineScanPos(k)) => {
                let mut s = k.clone();
                s.push(0);
                s
            }
            None => family.clone(),
        };
        let mut txn = self.kv().begin_read().await?;
        let rows = txn.scan(&start, &end, limit.max(1), ScanOrder::Forward).await?;
        txn.rollback().await?;
        let exhausted = rows.len() < limit.max(1);
        let mut out = Vec::new();
        let mut last = None;
        for (k, v) in rows {
            let entry: TimelineEntry = decode(&k, &v)?;
            if entry.kind == "message" {
                // T/cid/order_key: the id never contains `/`, the order key may.
                let rest = &k[family.len()..];
                let slash = rest
                    .iter()
                    .position(|&c| c == b'/')
                    .ok_or_else(|| StoreError::corrupt(&k, "timeline key without a conversation"))?;
                let cid = ConversationId::parse(String::from_utf8_lossy(&rest[..slash]).into_owned())?;
                let okey = OrderKey::from_bytes(&rest[slash + 1..])?;
                out.push(indexable(cid, okey, entry));
            }
            last = Some(k);
        }
        let next = match (exhausted, last) {
            (false, Some(k)) => Some(TimelineScanPos(k)),
            _ => None,
        };
        Ok((out, next))
    }
}

fn indexable(cid: ConversationId, okey: OrderKey, entry: TimelineEntry) -> IndexableMessage {
    IndexableMessage {
        message_id: okey.event_id,
        conversation_id: cid,
        order_key: okey,
        sender: entry.actor,
        sent_at_ms: entry.at_ms,
        msg_type: entry.msg_type,
        body_json: entry.body_json,
    }
}
