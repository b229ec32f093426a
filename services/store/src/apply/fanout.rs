//! Fan-out: appending an event's entry to the inboxes of the members this region serves,
//! directly or (read diffusion) as coalesced "conversation advanced" entries.
//!
//! Who gets an entry is decided by the membership in force at the event's order key
//! (docs/design.md §4), whatever order events arrive in:
//! - a message ordered before a removal but applied after it goes to the removed member
//!   (`Planner::members_at_event` reads the membership history);
//! - an add applied after messages ordered after it delivers them when it arrives
//!   (`Planner::deliver_after_lagging_adds`);
//! - a removal applied after messages ordered after it cannot take back what went out: the
//!   inbox keeps those entries' seqs (seqs stay gap-free) and reads withhold them, by the
//!   same history (`inbox.rs`).

use std::collections::{BTreeSet, HashSet};
use std::sync::Arc;

use meridian_model::{ConversationId, OrderKey, UserId};

use crate::kv::{prefix_end, ScanOrder};
use crate::records::*;
use crate::Result;

use super::plan::Planner;
use super::Delivery;

/// How far back before the earliest order key concerned an inbox is searched for an entry
/// appended already (ms): inbox appends are stamped with the applying region's wall clock,
/// so this covers clock skew between regions with room to spare.
const INBOX_LOOKBACK_MS: u64 = 10 * 60 * 1000;
/// Most inbox entries one such search reads.
const INBOX_LOOKBACK_ENTRIES: usize = 10_000;

impl Planner<'_> {
    /// For each user, the inbox epoch if this region serves them, else `None`. User and
    /// region records are read through the batch's transaction: no event that fans out
    /// stages either, so the plan's own staged writes need not be consulted.
    async fn served_epochs(&mut self, users: &[UserId]) -> Result<Vec<Option<String>>> {
        crate::directory::served_epochs_in(&mut *self.view, self.keys, &self.cfg.region, users).await
    }

    /// Appends `entry` to the inbox of every user in `users` this region serves.
    pub(super) async fn fan_out(
        &mut self,
        cid: &ConversationId,
        users: Vec<UserId>,
        entry: TimelineEntry,
    ) -> Result<()> {
        if self.repeat_copy {
            return Ok(());
        }
        let users: Vec<UserId> = users.into_iter().collect::<BTreeSet<_>>().into_iter().collect();
        let epochs = self.served_epochs(&users).await?;
        let (entry, in_timeline) = self.shared_entry(cid, entry);
        for (user, epoch) in users.into_iter().zip(epochs) {
            if let Some(epoch) = epoch {
                self.append_inbox(cid, user, &epoch, &entry, in_timeline).await?;
            }
        }
        Ok(())
    }

    /// Read diffusion: the sender gets the message (for its other devices); every other
    /// member gets at most one "conversation_advanced" entry per coalescing window.
    pub(super) async fn fan_out_coalesced(
        &mut self,
        cid: &ConversationId,
        users: Vec<UserId>,
        sender: &UserId,
        entry: TimelineEntry,
    ) -> Result<()> {
        if self.repeat_copy {
            return Ok(());
        }
        let epochs = self.served_epochs(&users).await?;
        let (entry, in_timeline) = self.shared_entry(cid, entry);
        // Not in the timeline (the message is, under the same order key): stored inline.
        let advanced = Arc::new(self.entry("conversation_advanced", None));
        // Coalesced away for someone: the latest notification among those (see coalesce.rs).
        let mut coalesced_after: Option<u64> = None;
        for (user, epoch) in users.into_iter().zip(epochs) {
            let Some(epoch) = epoch else { continue };
            if &user == sender {
                self.append_inbox(cid, user, &epoch, &entry, in_timeline).await?;
                continue;
            }
            let wkey = self.keys.coalesce_window(&user, cid);
            let last = match self.get(&wkey).await? {
                Some(v) => crate::apply::decode_u64(&wkey, &v)?,
                None => 0,
            };
            if self.now_ms.saturating_sub(last) >= self.cfg.coalesce_window_ms {
                self.put(wkey, self.now_ms.to_be_bytes().to_vec());
                self.append_inbox(cid, user, &epoch, &advanced, false).await?;
            } else {
                coalesced_after = Some(coalesced_after.unwrap_or(0).max(last));
            }
        }
        if let Some(latest_notified) = coalesced_after {
            let key = self.keys.coalesce_pending(cid);
            let current = self.get(&key).await?;
            let pending = crate::coalesce::mark_pending(
                &key,
                current.as_deref(),
                &self.version,
                sender,
                self.now_ms,
                latest_notified,
            )?;
            self.put(key, pending);
        }
        Ok(())
    }

    /// `entry` shared between the inbox appends of this event, and whether it is the entry
    /// the event appended to `cid`'s storage timeline (then the inboxes reference it).
    fn shared_entry(&self, cid: &ConversationId, entry: TimelineEntry) -> (Arc<TimelineEntry>, bool) {
        match &self.timeline_entry {
            Some((c, appended)) if c == cid && **appended == entry => (appended.clone(), true),
            _ => (Arc::new(entry), false),
        }
    }

    /// Appends to `user`'s inbox: a reference to the timeline entry when `in_timeline`, else
    /// the entry itself (see `records::InboxEntry`).
    async fn append_inbox(
        &mut self,
        cid: &ConversationId,
        user: UserId,
        epoch: &str,
        entry: &Arc<TimelineEntry>,
        in_timeline: bool,
    ) -> Result<()> {
        let order_key = self.version.clone();
        self.append_inbox_at(cid, user, epoch, entry, in_timeline, order_key)
            .await
    }

    /// `append_inbox` of an entry at `order_key` (another event's, for deliveries an add
    /// that arrived late makes).
    async fn append_inbox_at(
        &mut self,
        cid: &ConversationId,
        user: UserId,
        epoch: &str,
        entry: &Arc<TimelineEntry>,
        in_timeline: bool,
        order_key: Vec<u8>,
    ) -> Result<()> {
        let hkey = self.keys.inbox_head(&user);
        let mut head: InboxHead = match self.record::<InboxHead>(&hkey).await? {
            Some(h) if h.epoch == epoch => h,
            // A new epoch (first use, or the serving region changed): start again at 1.
            stale => crate::inbox::new_epoch_head(epoch, stale.as_ref()),
        };
        head.head += 1;
        let stored = InboxEntry {
            seq: head.head,
            conversation_id: cid.to_string(),
            order_key,
            appended_at_ms: self.now_ms,
            entry: (!in_timeline).then(|| (**entry).clone()),
        };
        self.put_record(self.keys.inbox_entry(&user, head.head), &stored);
        self.put_record(hkey, &head);
        self.plan.deliveries.push(Delivery {
            user,
            epoch: epoch.to_string(),
            seq: stored.seq,
            conversation_id: stored.conversation_id,
            order_key: stored.order_key,
            appended_at_ms: stored.appended_at_ms,
            entry: entry.clone(),
        });
        Ok(())
    }
}

impl Planner<'_> {
    /// `fan_out`, skipping the users whose inbox has an entry of this event's id already
    /// (appended since `earliest_ms`, the HLC time of the earliest copy concerned): for a
    /// message copy that replaces one applied before.
    pub(super) async fn fan_out_missing(
        &mut self,
        cid: &ConversationId,
        users: Vec<UserId>,
        entry: TimelineEntry,
        earliest_ms: u64,
    ) -> Result<()> {
        let users: Vec<UserId> = users.into_iter().collect::<BTreeSet<_>>().into_iter().collect();
        let epochs = self.served_epochs(&users).await?;
        let (entry, in_timeline) = self.shared_entry(cid, entry);
        for (user, epoch) in users.into_iter().zip(epochs) {
            let Some(epoch) = epoch else { continue };
            let have = self.inbox_event_ids(&user, cid, earliest_ms).await?;
            if !have.contains(&entry.event_id) {
                self.append_inbox(cid, user, &epoch, &entry, in_timeline).await?;
            }
        }
        Ok(())
    }

    /// For each member this event added whose membership now starts before entries already
    /// in the timeline (the add arrived after them: it lagged in a mirror, or the
    /// conversation's creation did), appends those entries, up to the member's next
    /// membership change, to their inbox if this region serves them and they do not have
    /// them. Bounded by `batch_max_inbox_appends` entries per member; a device missing more
    /// reads history. In a read-diffusion group only state changes are delivered: members
    /// pull its messages from the timeline.
    pub(super) async fn deliver_after_lagging_adds(&mut self) -> Result<()> {
        for (cid, user, next) in std::mem::take(&mut self.lagging_adds) {
            // The activity is the newest timeline key: nothing after the add, nothing missed.
            let activity = self.get(&self.keys.activity(&cid)).await?.unwrap_or_default();
            if activity <= self.version {
                continue;
            }
            let Some(Some(epoch)) = self.served_epochs(std::slice::from_ref(&user)).await?.pop() else {
                continue;
            };
            let prefix = self.keys.timeline_prefix(&cid);
            let start = [prefix.as_slice(), &self.version, &[0]].concat();
            let end = match &next {
                Some(v) => [prefix.as_slice(), v].concat(),
                None => prefix_end(&prefix),
            };
            let limit = self.cfg.batch_max_inbox_appends.max(1);
            let rows = self.view.scan(&start, &end, limit, ScanOrder::Forward).await?;
            if rows.is_empty() {
                continue;
            }
            let read_diffusion = self.members(&cid).await?.len() > self.cfg.read_diffusion_threshold;
            let have = self
                .inbox_event_ids(&user, &cid, self.order_key.hlc.physical_ms())
                .await?;
            for (k, v) in rows {
                let entry: TimelineEntry = decode(&k, &v)?;
                if (read_diffusion && entry.kind == "message") || have.contains(&entry.event_id) {
                    continue;
                }
                let order_key = k[prefix.len()..].to_vec();
                self.append_inbox_at(&cid, user.clone(), &epoch, &Arc::new(entry), true, order_key)
                    .await?;
            }
        }
        Ok(())
    }

    /// The event ids of `user`'s inbox entries about `cid`, newest first back to entries
    /// appended `INBOX_LOOKBACK_MS` before `since_ms` (at most `INBOX_LOOKBACK_ENTRIES`).
    async fn inbox_event_ids(
        &mut self,
        user: &UserId,
        cid: &ConversationId,
        since_ms: u64,
    ) -> Result<HashSet<Vec<u8>>> {
        let mut out = HashSet::new();
        let Some(head) = self.record::<InboxHead>(&self.keys.inbox_head(user)).await? else {
            return Ok(out);
        };
        let cutoff = since_ms.saturating_sub(INBOX_LOOKBACK_MS);
        let start = self.keys.inbox_entry(user, head.oldest);
        let mut end = self.keys.inbox_entry(user, head.head.saturating_add(1));
        let mut read = 0;
        // Entries appended by this plan are not in the view; they are this event's own.
        while read < INBOX_LOOKBACK_ENTRIES {
            let page = self.view.scan(&start, &end, 256, ScanOrder::Reverse).await?;
            let full = page.len() == 256;
            for (k, v) in &page {
                read += 1;
                let e: InboxEntry = decode(k, v)?;
                if e.appended_at_ms < cutoff {
                    return Ok(out);
                }
                if e.conversation_id != cid.as_str() {
                    continue;
                }
                match &e.entry {
                    Some(t) => out.insert(t.event_id.clone()),
                    None => out.insert(OrderKey::from_bytes(&e.order_key)?.event_id.as_bytes().to_vec()),
                };
            }
            match page.last() {
                Some((k, _)) if full => end = k.clone(),
                _ => break,
            }
        }
        Ok(out)
    }
}
