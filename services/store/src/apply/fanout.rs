//! Fan-out: appending an event's entry to the inboxes of the members this region serves,
//! directly or (read diffusion) as coalesced "conversation advanced" entries.

use std::collections::BTreeSet;
use std::sync::Arc;

use meridian_model::{ConversationId, UserId};

use crate::records::*;
use crate::Result;

use super::plan::Planner;
use super::Delivery;

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
            order_key: self.version.clone(),
            appended_at_ms: self.now_ms,
            entry: (!in_timeline).then(|| (**entry).clone()),
        };
        self.put_record(self.keys.inbox_entry(&user, head.head), &stored);
        self.put_record(hkey, &head);
        self.plan.deliveries.push(Delivery {
            user,
            seq: stored.seq,
            conversation_id: stored.conversation_id,
            order_key: stored.order_key,
            appended_at_ms: stored.appended_at_ms,
            entry: entry.clone(),
        });
        Ok(())
    }
}
