//! Sync timelines (inboxes): gap-free seqs from 1 per user in the serving region, an epoch
//! that changes when the serving region does, and TTL expiry by a background sweeper.
//!
//! Entries that are also storage timeline entries are stored as references and resolved
//! here on read (see `records::InboxEntry`). An epoch change leaves the old epoch's entries
//! above the new head for the sweeper, which deletes them in bounded chunks.
//!
//! Two merge rules of docs/design.md §4 show here, because inbox entries, once appended,
//! stay (seqs are gap-free and devices count on them):
//! - a reference to a message copy that a copy with a smaller order key replaced resolves,
//!   through the message's locator, to the winner (at the winner's order key);
//! - an entry whose reader was not a member at its order key, as far as the membership
//!   history now knows (a removal ordered before it arrived after it was fanned out), is
//!   withheld: it keeps its seq but carries no entry, and its seq is in
//!   `InboxPage::withheld`. Withholding on read rather than rewriting entries when the
//!   removal arrives: the applying transaction need not search the member's inbox, and
//!   should an add that arrives later make them a member at that key again, the entry
//!   shows again instead of being appended twice.

use std::collections::BTreeSet;
use std::time::Duration;

use meridian_model::events::entry_detail::Change;
use meridian_model::{ConversationId, EventId, OrderKey, UserId};
use tokio_util::sync::CancellationToken;

use crate::kv::{prefix_end, KvTxn, ScanOrder};
use crate::records::{decode, InboxEntry, InboxHead, MemberRecord, MessageLocator, TimelineEntry};
use crate::{Result, Store};

/// Most stale entries of an earlier epoch one sweep transaction deletes.
const STALE_CHUNK: usize = 1024;

/// The head of an inbox starting `epoch` (seq 1 next) after `old`: the old epoch's entries
/// are not deleted here, in the appending transaction, but marked for the sweeper.
pub(crate) fn new_epoch_head(epoch: &str, old: Option<&InboxHead>) -> InboxHead {
    InboxHead {
        epoch: epoch.to_string(),
        head: 0,
        oldest: 1,
        stale_through: old.map_or(0, |o| o.head.max(o.stale_through)),
    }
}

/// A page of one inbox.
#[derive(Debug, Clone, PartialEq)]
pub struct InboxPage {
    pub epoch: String,
    /// Entries with consecutive seqs starting at `after + 1`.
    pub entries: Vec<InboxEntry>,
    /// The last seq in the inbox.
    pub head: u64,
    pub has_more: bool,
    /// Seqs of the message entries whose message has been recalled since: their bodies are
    /// cleared in `entries`, and they are served as tombstones, as history serves them.
    pub recalled: BTreeSet<u64>,
    /// Seqs of entries withheld from this reader: they were fanned out before a membership
    /// change ordered before them was applied, and the reader was not a member at their
    /// order key. Their `entry` is `None` (the seq stays, so sync stays gap-free).
    pub withheld: BTreeSet<u64>,
}

/// Why a device must resync instead of reading on.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum SyncOutcome {
    Page(InboxPage),
    /// The epoch differs, or `after` is older than the oldest retained seq (or newer than
    /// the head): the device resyncs from storage timelines under `epoch`.
    ResyncRequired {
        epoch: String,
    },
}

impl Eq for InboxPage {}

impl Store {
    /// The inbox head of a user (None before the first entry in this epoch).
    pub async fn inbox_head(&self, user: &UserId) -> Result<Option<InboxHead>> {
        let key = self.keys().inbox_head(user);
        let mut txn = self.kv().begin_read().await?;
        match txn.get(&key).await? {
            Some(b) => Ok(Some(decode(&key, &b)?)),
            None => Ok(None),
        }
    }

    /// Reads up to `limit` entries after `after`. `current_epoch` is the epoch the directory
    /// gives for the user now (see `Store::user`); a device holding another epoch resyncs.
    pub async fn read_inbox(
        &self,
        user: &UserId,
        current_epoch: &str,
        device_epoch: Option<&str>,
        after: u64,
        limit: usize,
    ) -> Result<SyncOutcome> {
        let resync = || SyncOutcome::ResyncRequired {
            epoch: current_epoch.to_string(),
        };
        if device_epoch.is_some_and(|e| e != current_epoch) {
            return Ok(resync());
        }
        let key = self.keys().inbox_head(user);
        let mut txn = self.kv().begin_read().await?;
        let head: InboxHead = match txn.get(&key).await? {
            Some(b) => decode(&key, &b)?,
            None => new_epoch_head(current_epoch, None),
        };
        if head.epoch != current_epoch {
            // Nothing appended yet in the new epoch: an empty inbox under it.
            return Ok(if after == 0 {
                SyncOutcome::Page(InboxPage {
                    epoch: current_epoch.to_string(),
                    entries: Vec::new(),
                    head: 0,
                    has_more: false,
                    recalled: BTreeSet::new(),
                    withheld: BTreeSet::new(),
                })
            } else {
                resync()
            });
        }
        if after > head.head || after + 1 < head.oldest {
            return Ok(resync());
        }
        let start = self.keys().inbox_entry(user, after + 1);
        let prefix = self.keys().prefix(b'Y', &[user.as_str().as_bytes()]);
        let rows = txn
            .scan(&start, &prefix_end(&prefix), limit, ScanOrder::Forward)
            .await?;
        let mut entries = Vec::with_capacity(rows.len());
        for (k, v) in rows {
            let e: InboxEntry = decode(&k, &v)?;
            // Above the head: nothing yet, or what an earlier epoch left for the sweeper.
            if e.seq > head.head {
                break;
            }
            entries.push(e);
        }
        let references: Vec<usize> = (0..entries.len())
            .filter(|&i| entries[i].entry.is_none())
            .collect();
        self.resolve_timeline_references(txn.as_mut(), &mut entries)
            .await?;
        let withheld = self
            .withhold_from_non_members(txn.as_mut(), user, &mut entries, &references)
            .await?;
        // After the references are resolved: a recalled message's body may come from there.
        let recalled = self.clear_recalled(txn.as_mut(), &mut entries).await?;
        let last = entries.last().map_or(after, |e| e.seq);
        Ok(SyncOutcome::Page(InboxPage {
            epoch: head.epoch,
            has_more: last < head.head,
            head: head.head,
            entries,
            recalled,
            withheld,
        }))
    }

    /// Inbox entries show the message as it was sent; a recall comes later as a tombstone
    /// record (what history reads). Clears the body of every recalled message in `entries`
    /// and returns their seqs, in the page's snapshot.
    async fn clear_recalled(
        &self,
        txn: &mut dyn crate::KvTxn,
        entries: &mut [InboxEntry],
    ) -> Result<BTreeSet<u64>> {
        let mut at = Vec::new();
        let mut lookups = Vec::new();
        for (i, e) in entries.iter().enumerate() {
            let Some(t) = e.entry.as_ref().filter(|t| t.kind == "message") else {
                continue;
            };
            let (Ok(cid), Ok(id)) = (
                ConversationId::parse(e.conversation_id.clone()),
                EventId::from_bytes(&t.event_id),
            ) else {
                continue;
            };
            at.push(i);
            lookups.push(self.keys().recall(&cid, &id));
        }
        let mut recalled = BTreeSet::new();
        if lookups.is_empty() {
            return Ok(recalled);
        }
        let found = txn.batch_get(&lookups).await?;
        for (i, tombstone) in at.into_iter().zip(found) {
            if tombstone.is_some() {
                if let Some(t) = entries[i].entry.as_mut() {
                    t.body_json.clear();
                }
                recalled.insert(entries[i].seq);
            }
        }
        Ok(recalled)
    }

    /// Fills in the `entry` of entries stored as references to a storage timeline entry, with
    /// one batch read.
    async fn resolve_timeline_references(
        &self,
        txn: &mut dyn KvTxn,
        entries: &mut [InboxEntry],
    ) -> Result<()> {
        let mut keys = Vec::new();
        let mut at = Vec::new();
        for (i, e) in entries.iter().enumerate() {
            if e.entry.is_none() {
                let cid = ConversationId::parse(e.conversation_id.clone())?;
                keys.push(self.keys().timeline(&cid, &OrderKey::from_bytes(&e.order_key)?));
                at.push(i);
            }
        }
        if keys.is_empty() {
            return Ok(());
        }
        let found = txn.batch_get(&keys).await?;
        let mut missing = Vec::new();
        for ((i, key), value) in at.into_iter().zip(&keys).zip(found) {
            match value {
                Some(v) => entries[i].entry = Some(decode::<TimelineEntry>(key, &v)?),
                None => missing.push((i, key.clone())),
            }
        }
        if missing.is_empty() {
            return Ok(());
        }
        // A message copy replaced by one with a smaller order key: its locator names the
        // winner. One batch read of locators, one of the winners' entries.
        let ids: Vec<Vec<u8>> = missing
            .iter()
            .map(|(i, _)| {
                Ok(self
                    .keys()
                    .message(&OrderKey::from_bytes(&entries[*i].order_key)?.event_id))
            })
            .collect::<Result<_>>()?;
        let locators = txn.batch_get(&ids).await?;
        let mut winners = Vec::new();
        for ((i, key), (lkey, locator)) in missing.into_iter().zip(ids.iter().zip(locators)) {
            match locator {
                Some(b) => {
                    let loc: MessageLocator = decode(lkey, &b)?;
                    let cid = ConversationId::parse(loc.conversation_id.clone())?;
                    winners.push((
                        i,
                        self.keys().timeline(&cid, &OrderKey::from_bytes(&loc.order_key)?),
                        loc,
                    ));
                }
                // Timelines are never truncated; should one entry be missing, the device
                // still gets the seq (as kind "unknown") and its sync stays gap-free.
                None => tracing::warn!(
                    key = %String::from_utf8_lossy(&key),
                    "inbox entry references a missing timeline entry"
                ),
            }
        }
        let keys: Vec<Vec<u8>> = winners.iter().map(|(_, k, _)| k.clone()).collect();
        let found = txn.batch_get(&keys).await?;
        for ((i, key, loc), value) in winners.into_iter().zip(found) {
            match value {
                Some(v) => {
                    let e = &mut entries[i];
                    e.entry = Some(decode::<TimelineEntry>(&key, &v)?);
                    e.order_key = loc.order_key;
                    e.conversation_id = loc.conversation_id;
                }
                None => tracing::warn!(
                    key = %String::from_utf8_lossy(&key),
                    "a message locator names a missing timeline entry"
                ),
            }
        }
        Ok(())
    }

    /// Withholds the entries at `references` (resolved timeline references) whose reader
    /// `user` was not a member of the conversation at the entry's order key by the
    /// membership history (see the module doc). The removed member's own `member_removed`
    /// entry is never withheld. Records without a history (from before it was kept) withhold
    /// nothing. Returns the withheld seqs.
    async fn withhold_from_non_members(
        &self,
        txn: &mut dyn KvTxn,
        user: &UserId,
        entries: &mut [InboxEntry],
        references: &[usize],
    ) -> Result<BTreeSet<u64>> {
        let mut withheld = BTreeSet::new();
        let cids: BTreeSet<&str> = references
            .iter()
            .filter(|&&i| entries[i].entry.is_some())
            .map(|&i| entries[i].conversation_id.as_str())
            .collect();
        if cids.is_empty() {
            return Ok(withheld);
        }
        let keys: Vec<Vec<u8>> = cids
            .iter()
            .map(|c| Ok(self.keys().member(&ConversationId::parse(c.to_string())?, user)))
            .collect::<Result<_>>()?;
        let found = txn.batch_get(&keys).await?;
        let mut records = std::collections::HashMap::new();
        for ((cid, key), value) in cids.into_iter().zip(&keys).zip(found) {
            if let Some(b) = value {
                records.insert(cid.to_string(), decode::<MemberRecord>(key, &b)?);
            }
        }
        for &i in references {
            let e = &mut entries[i];
            let Some(t) = &e.entry else { continue };
            let told_of_own_removal = matches!(
                t.detail.as_ref().and_then(|d| d.change.as_ref()),
                Some(Change::MemberRemoved(r)) if r.user_id == user.as_str()
            );
            let member = records
                .get(&e.conversation_id)
                .and_then(|r| r.member_at(&e.order_key));
            if member == Some(false) && !told_of_own_removal {
                e.entry = None;
                withheld.insert(e.seq);
            }
        }
        Ok(withheld)
    }

    /// Deletes inbox entries appended before `cutoff_ms` and moves each inbox's oldest
    /// retained seq, and deletes what earlier epochs left (in chunks of `STALE_CHUNK`).
    /// Returns how many entries it deleted. An inbox whose head changes while it is swept
    /// (a concurrent append) is left for the next sweep.
    pub async fn sweep_expired(&self, cutoff_ms: u64) -> Result<usize> {
        const PAGE: usize = 256;
        let family = self.keys().family(b'X');
        let end = prefix_end(&family);
        let mut from = family.clone();
        let mut deleted = 0;
        loop {
            let mut txn = self.kv().begin_read().await?;
            let heads = txn.scan(&from, &end, PAGE, ScanOrder::Forward).await?;
            txn.rollback().await?;
            let full = heads.len() == PAGE;
            for (k, v) in &heads {
                let user = UserId::parse(String::from_utf8_lossy(&k[family.len()..]).into_owned())?;
                match self.sweep_one(&user, cutoff_ms).await {
                    Ok(n) => deleted += n,
                    Err(e) if e.is_conflict() => {}
                    Err(e) => return Err(e),
                }
                // Only inboxes whose epoch changed have leftovers: no transaction for the rest.
                if decode::<InboxHead>(k, v)?.stale_through == 0 {
                    continue;
                }
                match self.sweep_stale_epoch(&user).await {
                    Ok(n) => deleted += n,
                    Err(e) if e.is_conflict() => {}
                    Err(e) => return Err(e),
                }
            }
            match heads.last() {
                Some((k, _)) if full => {
                    from = k.clone();
                    from.push(0);
                }
                _ => return Ok(deleted),
            }
        }
    }

    async fn sweep_one(&self, user: &UserId, cutoff_ms: u64) -> Result<usize> {
        const BATCH: usize = 1024;
        let hkey = self.keys().inbox_head(user);
        let mut txn = self.kv().begin().await?;
        let Some(bytes) = txn.get(&hkey).await? else {
            return Ok(0);
        };
        let mut head: InboxHead = decode(&hkey, &bytes)?;
        let start = self.keys().inbox_entry(user, head.oldest);
        let end = self.keys().inbox_entry(user, head.head.saturating_add(1));
        let rows = txn.scan(&start, &end, BATCH, ScanOrder::Forward).await?;
        let mut deleted = 0;
        for (k, v) in rows {
            let e: InboxEntry = decode(&k, &v)?;
            if e.appended_at_ms >= cutoff_ms {
                break;
            }
            txn.delete(k).await?;
            head.oldest = e.seq + 1;
            deleted += 1;
        }
        if deleted == 0 {
            txn.rollback().await?;
            return Ok(0);
        }
        txn.put(hkey, prost::Message::encode_to_vec(&head)).await?;
        txn.commit().await?;
        Ok(deleted)
    }
}

impl Store {
    /// Deletes the entries an earlier epoch left above `user`'s head, one transaction per
    /// chunk of `STALE_CHUNK`. Each transaction reads and writes the head, so it conflicts
    /// with a concurrent append instead of deleting the entry that append writes.
    async fn sweep_stale_epoch(&self, user: &UserId) -> Result<usize> {
        let hkey = self.keys().inbox_head(user);
        let mut deleted = 0;
        loop {
            let mut txn = self.kv().begin().await?;
            let Some(bytes) = txn.get(&hkey).await? else {
                txn.rollback().await?;
                return Ok(deleted);
            };
            let mut head: InboxHead = decode(&hkey, &bytes)?;
            if head.stale_through == 0 {
                txn.rollback().await?;
                return Ok(deleted);
            }
            let rows = if head.stale_through > head.head {
                let start = self.keys().inbox_entry(user, head.head + 1);
                let end = self.keys().inbox_entry(user, head.stale_through + 1);
                txn.scan(&start, &end, STALE_CHUNK, ScanOrder::Forward).await?
            } else {
                Vec::new()
            };
            let last_chunk = rows.len() < STALE_CHUNK;
            deleted += rows.len();
            for (k, _) in rows {
                txn.delete(k).await?;
            }
            if last_chunk {
                head.stale_through = 0;
            }
            txn.put(hkey.clone(), prost::Message::encode_to_vec(&head))
                .await?;
            txn.commit().await?;
            if last_chunk {
                return Ok(deleted);
            }
        }
    }
}

/// Runs `sweep_expired` every `interval` until `shutdown`, expiring entries older than `ttl`
/// (and idempotency keys older than `REQUEST_RECORD_TTL_MS`).
pub async fn run_sweeper(store: Store, ttl: Duration, interval: Duration, shutdown: CancellationToken) {
    loop {
        tokio::select! {
            _ = shutdown.cancelled() => return,
            _ = tokio::time::sleep(interval) => {}
        }
        let cutoff = crate::apply::now_ms().saturating_sub(ttl.as_millis() as u64);
        match store.sweep_expired(cutoff).await {
            Ok(0) => {}
            Ok(n) => tracing::info!(deleted = n, "inbox sweep"),
            Err(e) => tracing::warn!(error = %e, "inbox sweep failed; retrying next interval"),
        }
        let cutoff = crate::apply::now_ms().saturating_sub(crate::requests::REQUEST_RECORD_TTL_MS);
        match store.sweep_requests(cutoff).await {
            Ok(0) => {}
            Ok(n) => tracing::info!(deleted = n, "idempotency key sweep"),
            Err(e) => tracing::warn!(error = %e, "idempotency key sweep failed; retrying next interval"),
        }
    }
}
