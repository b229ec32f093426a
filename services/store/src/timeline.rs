//! Storage timeline reads: history pages and single messages.

use meridian_model::{ConversationId, EventId, OrderKey, UserId};

use crate::kv::{prefix_end, KvTxn, ScanOrder};
use crate::records::{decode, MessageLocator, TimelineEntry};
use crate::{Result, Store};

/// A message as clients see it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct MessageView {
    pub message_id: EventId,
    pub order_key: OrderKey,
    pub sender: String,
    pub msg_type: String,
    /// `None` once recalled.
    pub body_json: Option<String>,
    pub sent_at_ms: u64,
    pub recalled: bool,
    pub client_msg_id: String,
}

/// Where a cursor points, seen from one conversation.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum CursorPlace {
    /// An entry of this conversation's storage timeline.
    Here,
    /// A message of another conversation (or not at this position).
    Elsewhere,
    /// Nothing applied here: made up, or an event the applier has not reached yet.
    Unknown,
}

/// Which page of history.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum HistoryPage {
    /// Up to `limit` messages strictly after the key (`None`: from the beginning).
    After(Option<OrderKey>),
    /// The `limit` messages just before the key.
    Before(OrderKey),
    /// The latest `limit` messages.
    Latest,
}

/// History, oldest first within the page.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct History {
    pub messages: Vec<MessageView>,
    /// Whether more messages lie beyond the page in the direction read.
    pub more: bool,
}

impl Store {
    /// A page of a conversation's messages as `viewer` sees them (without the ones the
    /// viewer deleted for themselves, recalled ones as tombstones).
    pub async fn history(
        &self,
        cid: &ConversationId,
        viewer: &UserId,
        page: HistoryPage,
        limit: usize,
    ) -> Result<History> {
        self.history_page(cid, Some(viewer), page, limit).await
    }

    /// A page of a conversation's storage timeline as stored, for operators: every message
    /// whoever deleted it for themselves (recalled ones as tombstones, as history shows them).
    pub async fn timeline_as_stored(
        &self,
        cid: &ConversationId,
        page: HistoryPage,
        limit: usize,
    ) -> Result<History> {
        self.history_page(cid, None, page, limit).await
    }

    /// `viewer`: leave out what they deleted for themselves; `None`: leave out nothing.
    async fn history_page(
        &self,
        cid: &ConversationId,
        viewer: Option<&UserId>,
        page: HistoryPage,
        limit: usize,
    ) -> Result<History> {
        let keys = self.keys();
        let prefix = keys.timeline_prefix(cid);
        let end = prefix_end(&prefix);
        let (mut lo, mut hi, order) = match &page {
            HistoryPage::After(None) => (prefix.clone(), end.clone(), ScanOrder::Forward),
            HistoryPage::After(Some(k)) => {
                let mut s = keys.timeline(cid, k);
                s.push(0);
                (s, end.clone(), ScanOrder::Forward)
            }
            HistoryPage::Before(k) => (prefix.clone(), keys.timeline(cid, k), ScanOrder::Reverse),
            HistoryPage::Latest => (prefix.clone(), end.clone(), ScanOrder::Reverse),
        };
        let mut txn = self.kv().begin_read().await?;
        let mut out = Vec::new();
        let mut more = false;
        // Timelines also hold state changes; page until `limit` messages are found.
        'pages: loop {
            let rows = txn.scan(&lo, &hi, limit.max(16), order).await?;
            let exhausted = rows.len() < limit.max(16);
            let mut last_key = None;
            for (k, v) in rows {
                let entry: TimelineEntry = decode(&k, &v)?;
                last_key = Some(k.clone());
                if entry.kind != "message" {
                    continue;
                }
                if out.len() == limit {
                    more = true;
                    break 'pages;
                }
                let okey = OrderKey::from_bytes(&k[prefix.len()..])?;
                if let Some(m) = self
                    .visible_message(txn.as_mut(), cid, viewer, okey, entry)
                    .await?
                {
                    out.push(m);
                }
            }
            match (exhausted, last_key) {
                (false, Some(k)) => match order {
                    ScanOrder::Forward => {
                        lo = k;
                        lo.push(0);
                    }
                    ScanOrder::Reverse => hi = k,
                },
                _ => break,
            }
        }
        if order == ScanOrder::Reverse {
            out.reverse();
        }
        Ok(History { messages: out, more })
    }

    async fn visible_message(
        &self,
        txn: &mut dyn KvTxn,
        cid: &ConversationId,
        viewer: Option<&UserId>,
        okey: OrderKey,
        entry: TimelineEntry,
    ) -> Result<Option<MessageView>> {
        let id = okey.event_id;
        let mut lookups = vec![self.keys().recall(cid, &id)];
        if let Some(viewer) = viewer {
            lookups.push(self.keys().hidden_message(cid, viewer, &id));
        }
        let found = txn.batch_get(&lookups).await?;
        if found.get(1).is_some_and(Option::is_some) {
            return Ok(None);
        }
        let recalled = found[0].is_some();
        Ok(Some(MessageView {
            message_id: id,
            sender: entry.actor,
            msg_type: entry.msg_type,
            body_json: (!recalled).then_some(entry.body_json),
            sent_at_ms: entry.at_ms,
            recalled,
            client_msg_id: entry.client_msg_id,
            order_key: okey,
        }))
    }

    /// Whether `key` names an entry of `cid`'s storage timeline, from one snapshot.
    pub async fn cursor_place(&self, cid: &ConversationId, key: &OrderKey) -> Result<CursorPlace> {
        let lookups = [self.keys().timeline(cid, key), self.keys().message(&key.event_id)];
        let mut txn = self.kv().begin_read().await?;
        let found = txn.batch_get(&lookups).await?;
        Ok(match (&found[0], &found[1]) {
            (Some(_), _) => CursorPlace::Here,
            (None, Some(_)) => CursorPlace::Elsewhere,
            (None, None) => CursorPlace::Unknown,
        })
    }

    /// Where a message lives, if it has been applied in this region.
    async fn message_locator(&self, id: &EventId) -> Result<Option<MessageLocator>> {
        let key = self.keys().message(id);
        let mut txn = self.kv().begin_read().await?;
        match txn.get(&key).await? {
            Some(b) => Ok(Some(decode(&key, &b)?)),
            None => Ok(None),
        }
    }

    /// One message as `viewer` sees it.
    pub async fn message(
        &self,
        cid: &ConversationId,
        viewer: &UserId,
        id: &EventId,
    ) -> Result<Option<MessageView>> {
        let Some(loc) = self.message_locator(id).await? else {
            return Ok(None);
        };
        if loc.conversation_id != cid.as_str() {
            return Ok(None);
        }
        let okey = OrderKey::from_bytes(&loc.order_key)?;
        let key = self.keys().timeline(cid, &okey);
        let mut txn = self.kv().begin_read().await?;
        let Some(bytes) = txn.get(&key).await? else {
            return Ok(None);
        };
        let entry: TimelineEntry = decode(&key, &bytes)?;
        self.visible_message(txn.as_mut(), cid, Some(viewer), okey, entry)
            .await
    }
}
