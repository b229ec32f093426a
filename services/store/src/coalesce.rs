//! Read diffusion's trailing edge (docs/design.md §2). A member of a group above
//! `read_diffusion_threshold` gets at most one `conversation_advanced` entry per coalescing
//! window, at the window's start; messages that arrive while the window is open are
//! "coalesced away". Without more, the end of a burst is never announced and a client that
//! pulls history when notified misses it until someone sends again.
//!
//! So a message coalesced away for anyone leaves one per-conversation marker, `Q/cid`
//! ([`PendingAdvance`]): one write per message, not per member, which is the point of read
//! diffusion. Once a whole window has passed since the marker's stamp, a flush (run by the
//! applier, see `meridian_applier`) appends one `conversation_advanced` entry to each served
//! member not notified since, through the inbox head in one transaction (seqs stay
//! gap-free, epochs are respected, and a concurrent applier append conflicts and retries),
//! and starts that member's window again, as a leading-edge notification would.

use std::sync::Arc;

use meridian_model::{ConversationId, OrderKey, UserId};

use crate::apply::{decode_member_list, decode_u64, ApplyConfig, Delivery};
use crate::kv::{prefix_end, KvTxn, ScanOrder};
use crate::records::{decode, InboxEntry, InboxHead, MemberRecord, TimelineEntry};
use crate::{Result, Store};

/// A conversation with messages some members were not notified of.
#[derive(Clone, PartialEq, prost::Message)]
pub struct PendingAdvance {
    /// The newest message coalesced away: the order key the trailing entries carry.
    #[prost(bytes = "vec", tag = "1")]
    pub order_key: Vec<u8>,
    /// That message's sender (the entries' actor).
    #[prost(string, tag = "2")]
    pub sender: String,
    /// Later than the apply of every message coalesced away and than the last notification
    /// of every member it was coalesced away for (ms): a member whose window stamp is newer
    /// has been notified since; the flush is due one window after it.
    #[prost(uint64, tag = "3")]
    pub stamp_ms: u64,
    /// Whether the messages coalesced away came from more than one sender. When they all
    /// came from `sender`, none was coalesced away for `sender` (a sender gets their own
    /// messages), so the flush leaves them out; otherwise they missed someone else's.
    #[prost(bool, tag = "4")]
    pub several_senders: bool,
}

/// The marker after one more message (`order_key`, from `sender`) was coalesced away at
/// `now_ms` for members last notified at `latest_notified_ms` at the latest.
pub(crate) fn mark_pending(
    key: &[u8],
    current: Option<&[u8]>,
    order_key: &[u8],
    sender: &UserId,
    now_ms: u64,
    latest_notified_ms: u64,
) -> Result<Vec<u8>> {
    let mut pending: PendingAdvance = match current {
        Some(b) => decode(key, b)?,
        None => PendingAdvance::default(),
    };
    if current.is_some() && pending.sender != sender.as_str() {
        pending.several_senders = true;
    }
    if order_key > pending.order_key.as_slice() {
        pending.order_key = order_key.to_vec();
        pending.sender = sender.to_string();
    }
    // `+ 1`: a notification in the same millisecond (an earlier event of this batch, or a
    // flush that committed between this apply's clock reading and its commit) came before.
    pending.stamp_ms = pending
        .stamp_ms
        .max(now_ms)
        .max(latest_notified_ms.saturating_add(1));
    Ok(prost::Message::encode_to_vec(&pending))
}

/// What one call of [`Store::flush_coalesced`] did.
#[derive(Debug, Default)]
pub struct FlushReport {
    /// Conversations whose trailing entries were all appended (their marker is gone).
    pub flushed: usize,
    /// The entries appended, for live delivery (the transactions have committed).
    pub deliveries: Vec<Delivery>,
    /// Where the next call should go on scanning markers; `None` once it reached the end.
    pub resume_after: Option<Vec<u8>>,
    /// Flush transactions that lost to a concurrent writer every time; retried next call.
    pub conflicts: usize,
}

/// Markers one call reads at most.
const SCAN_PAGE: usize = 256;
/// Tries of one conversation's flush transaction before it is left for the next call.
const MAX_CONFLICT_RETRIES: usize = 8;

impl Store {
    /// Appends the trailing `conversation_advanced` entries that are due at `now_ms`: for up
    /// to `SCAN_PAGE` markers after `after`, flushing at most `max_flushes` conversations,
    /// each in its own transaction of at most `cfg.batch_max_inbox_appends` appends (a larger
    /// group keeps its marker and goes on next call: the members done are then covered).
    pub async fn flush_coalesced(
        &self,
        cfg: &ApplyConfig,
        now_ms: u64,
        after: Option<&[u8]>,
        max_flushes: usize,
    ) -> Result<FlushReport> {
        let family = self.keys().family(b'Q');
        let start = match after {
            Some(k) => [k, &[0]].concat(),
            None => family.clone(),
        };
        let mut txn = self.kv().begin_read().await?;
        let markers = txn
            .scan(&start, &prefix_end(&family), SCAN_PAGE, ScanOrder::Forward)
            .await?;
        txn.rollback().await?;
        let mut report = FlushReport {
            resume_after: (markers.len() == SCAN_PAGE).then(|| markers[SCAN_PAGE - 1].0.clone()),
            ..Default::default()
        };
        let mut attempted = 0;
        for (i, (key, value)) in markers.iter().enumerate() {
            // One bad marker must not stop every other conversation's flush.
            let parsed = decode::<PendingAdvance>(key, value).and_then(|p| {
                let cid = String::from_utf8_lossy(&key[family.len()..]).into_owned();
                Ok((p, ConversationId::parse(cid)?))
            });
            let (pending, cid) = match parsed {
                Ok(parsed) => parsed,
                Err(e) => {
                    tracing::warn!(error = %e, "skipping an unreadable coalesce marker");
                    continue;
                }
            };
            if now_ms < pending.stamp_ms.saturating_add(cfg.coalesce_window_ms) {
                continue;
            }
            if attempted == max_flushes {
                // Next call goes on with this marker.
                report.resume_after = match i {
                    0 => after.map(<[u8]>::to_vec),
                    _ => Some(markers[i - 1].0.clone()),
                };
                break;
            }
            attempted += 1;
            let mut retries = 0;
            loop {
                match self.try_flush(cfg, &cid, now_ms).await {
                    Ok((done, deliveries)) => {
                        report.flushed += usize::from(done);
                        report.deliveries.extend(deliveries);
                        break;
                    }
                    Err(e) if e.is_conflict() && retries < MAX_CONFLICT_RETRIES => {
                        retries += 1;
                        tokio::time::sleep(std::time::Duration::from_micros(500 << retries)).await;
                    }
                    Err(e) if e.is_conflict() => {
                        report.conflicts += 1;
                        break;
                    }
                    Err(e) => return Err(e),
                }
            }
        }
        Ok(report)
    }

    /// One conversation's flush, in one transaction. True when its marker is done with.
    async fn try_flush(
        &self,
        cfg: &ApplyConfig,
        cid: &ConversationId,
        now_ms: u64,
    ) -> Result<(bool, Vec<Delivery>)> {
        let keys = self.keys();
        let mkey = keys.coalesce_pending(cid);
        let mut txn = self.kv().begin().await?;
        let Some(bytes) = txn.get(&mkey).await? else {
            txn.rollback().await?;
            return Ok((false, Vec::new()));
        };
        let pending: PendingAdvance = decode(&mkey, &bytes)?;
        if now_ms < pending.stamp_ms.saturating_add(cfg.coalesce_window_ms) {
            // A message was coalesced away since the scan: not due yet.
            txn.rollback().await?;
            return Ok((false, Vec::new()));
        }
        let order_key = OrderKey::from_bytes(&pending.order_key)?;
        let members: Vec<UserId> = self
            .members_in(txn.as_mut(), cid)
            .await?
            .into_iter()
            .filter(|u| pending.several_senders || u.as_str() != pending.sender)
            .collect();
        let epochs = crate::directory::served_epochs_in(txn.as_mut(), keys, &cfg.region, &members).await?;
        let served: Vec<(UserId, String)> = members
            .into_iter()
            .zip(epochs)
            .filter_map(|(u, e)| e.map(|e| (u, e)))
            .collect();
        let window_keys: Vec<Vec<u8>> = served.iter().map(|(u, _)| keys.coalesce_window(u, cid)).collect();
        let windows = txn.batch_get(&window_keys).await?;
        let entry = Arc::new(TimelineEntry {
            kind: "conversation_advanced".into(),
            event_id: order_key.event_id.as_bytes().to_vec(),
            actor: pending.sender.clone(),
            at_ms: order_key.hlc.physical_ms(),
            ..Default::default()
        });
        let mut deliveries = Vec::new();
        let mut done = true;
        for ((user, epoch), (wkey, window)) in served.into_iter().zip(window_keys.into_iter().zip(windows)) {
            let notified_ms = match window {
                Some(v) => decode_u64(&wkey, &v)?,
                None => 0,
            };
            if notified_ms > pending.stamp_ms {
                continue;
            }
            if deliveries.len() == cfg.batch_max_inbox_appends {
                done = false;
                break;
            }
            txn.put(wkey, now_ms.to_be_bytes().to_vec()).await?;
            let stored = append_inbox(
                txn.as_mut(),
                self,
                &user,
                &epoch,
                cid,
                &pending.order_key,
                now_ms,
                &entry,
            )
            .await?;
            deliveries.push(Delivery {
                user,
                epoch: epoch.to_string(),
                seq: stored.seq,
                conversation_id: stored.conversation_id,
                order_key: stored.order_key,
                appended_at_ms: stored.appended_at_ms,
                entry: entry.clone(),
            });
        }
        if done {
            txn.delete(mkey).await?;
        }
        txn.commit().await?;
        Ok((done, deliveries))
    }

    /// The current members of `cid`: its member list, or a scan of its membership records
    /// for a conversation from before member lists.
    async fn members_in(&self, txn: &mut dyn KvTxn, cid: &ConversationId) -> Result<Vec<UserId>> {
        if let Some(list) = txn.get(&self.keys().member_list(cid)).await? {
            return decode_member_list(&list);
        }
        let prefix = self.keys().members_prefix(cid);
        let mut out = Vec::new();
        for (k, v) in Store::scan_all(txn, &prefix, &prefix_end(&prefix)).await? {
            if decode::<MemberRecord>(&k, &v)?.is_member() {
                out.push(UserId::parse(
                    String::from_utf8_lossy(&k[prefix.len()..]).into_owned(),
                )?);
            }
        }
        Ok(out)
    }
}

/// Appends `entry` (stored inline: the timeline holds the message, not this notice) to
/// `user`'s inbox under `epoch`, reading and writing the head in `txn`.
#[allow(clippy::too_many_arguments)]
async fn append_inbox(
    txn: &mut dyn KvTxn,
    store: &Store,
    user: &UserId,
    epoch: &str,
    cid: &ConversationId,
    order_key: &[u8],
    now_ms: u64,
    entry: &TimelineEntry,
) -> Result<InboxEntry> {
    let hkey = store.keys().inbox_head(user);
    let current: Option<InboxHead> = match txn.get(&hkey).await? {
        Some(b) => Some(decode(&hkey, &b)?),
        None => None,
    };
    let mut head = match current {
        Some(h) if h.epoch == epoch => h,
        // A new epoch (first use, or the serving region changed): start again at 1.
        stale => crate::inbox::new_epoch_head(epoch, stale.as_ref()),
    };
    head.head += 1;
    let stored = InboxEntry {
        seq: head.head,
        conversation_id: cid.to_string(),
        order_key: order_key.to_vec(),
        appended_at_ms: now_ms,
        entry: Some(entry.clone()),
    };
    txn.put(
        store.keys().inbox_entry(user, head.head),
        prost::Message::encode_to_vec(&stored),
    )
    .await?;
    txn.put(hkey, prost::Message::encode_to_vec(&head)).await?;
    Ok(stored)
}
