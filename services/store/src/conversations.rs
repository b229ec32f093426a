//! Conversations: info, members and roles, read indexes, per-user settings, and the
//! per-user conversation list ordered by recent activity.
//!
//! The list is computed when asked: the user's conversation ids (`L/uid/`), then one batch
//! read of their activity marks, sorted. That keeps a group message at one activity write
//! instead of one list write per member; a user with thousands of conversations pays a
//! few thousand point reads per list call instead.

use std::collections::HashSet;
use std::sync::Mutex;

use meridian_model::events::{ConversationKind, MemberRole};
use meridian_model::{ConversationId, EventId, OrderKey, UserId};

use crate::kv::{prefix_end, ScanOrder};
use crate::records::{
    decode, ConversationRecord, MemberRecord, MessageLocator, SettingsRecord, TimelineEntry,
};
use crate::timeline::{HistoryPage, MessageView};
use crate::{Result, Store};

/// What a send needs to know before it publishes, read from one snapshot.
#[derive(Debug, Clone, PartialEq)]
pub struct SendCheck {
    /// The sender's role, `None` when not a member (or no such conversation).
    pub role: Option<MemberRole>,
    /// Whether the group was dissolved (direct conversations never are).
    pub dissolved: bool,
    /// Set when the message was already applied: a late retry answers from it.
    pub applied: Option<MessageLocator>,
}

/// Member keys of direct conversations seen to exist. A direct conversation's two members
/// never change (only groups add, remove or dissolve), so a positive answer stays true and
/// the send path can skip two point reads per message. Bounded: cleared when full.
#[derive(Default)]
pub(crate) struct DirectMemberCache(Mutex<HashSet<Vec<u8>>>);

impl DirectMemberCache {
    const CAPACITY: usize = 200_000;

    fn contains(&self, key: &[u8]) -> bool {
        self.0.lock().expect("direct member cache").contains(key)
    }

    fn insert(&self, key: Vec<u8>) {
        let mut set = self.0.lock().expect("direct member cache");
        if set.len() >= Self::CAPACITY {
            set.clear();
        }
        set.insert(key);
    }
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct MemberView {
    pub user_id: UserId,
    /// `owner`, `admin` or `member`.
    pub role: &'static str,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ConversationView {
    pub conversation_id: ConversationId,
    /// `direct` or `group`.
    pub kind: &'static str,
    pub name: String,
    pub announcement: String,
    pub members_can_add: bool,
    pub dissolved: bool,
    pub created_by: String,
    pub members: Vec<MemberView>,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ConversationSummary {
    pub conversation_id: ConversationId,
    pub kind: &'static str,
    pub name: String,
    pub last_message: Option<MessageView>,
    pub unread: u32,
    pub muted: bool,
    pub pinned: bool,
    pub member_count: usize,
    /// Order key bytes of the latest activity (sort key of the list).
    pub activity: Vec<u8>,
}

#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct UserSettings {
    pub muted: bool,
    pub pinned: bool,
}

/// Unread counts stop at this many (clients show "999+").
pub const UNREAD_CAP: usize = 999;

/// The name of a member role as views carry it (and the gateway renders it).
pub fn role_name(role: i32) -> &'static str {
    match MemberRole::try_from(role) {
        Ok(MemberRole::Owner) => "owner",
        Ok(MemberRole::Admin) => "admin",
        _ => "member",
    }
}

fn kind_name(kind: i32) -> &'static str {
    if kind == ConversationKind::Direct as i32 {
        "direct"
    } else {
        "group"
    }
}

impl Store {
    /// The role of `user` in `cid` if they are a member now.
    pub async fn member_role(&self, cid: &ConversationId, user: &UserId) -> Result<Option<MemberRole>> {
        let key = self.keys().member(cid, user);
        let mut txn = self.kv().begin_read().await?;
        let Some(b) = txn.get(&key).await? else {
            return Ok(None);
        };
        let rec: MemberRecord = decode(&key, &b)?;
        Ok(rec
            .is_member()
            .then(|| MemberRole::try_from(rec.role()).unwrap_or(MemberRole::Member)))
    }

    /// Membership, dissolution and an earlier application of message `id`, in one read
    /// snapshot (one point read for a direct conversation already seen).
    pub async fn send_check(&self, cid: &ConversationId, sender: &UserId, id: &EventId) -> Result<SendCheck> {
        let member_key = self.keys().member(cid, sender);
        let locator_key = self.keys().message(id);
        let mut txn = self.kv().begin_read().await?;
        let known_direct = cid.is_direct() && self.direct_members.contains(&member_key);
        if known_direct {
            let applied = match txn.get(&locator_key).await? {
                Some(b) => Some(decode(&locator_key, &b)?),
                None => None,
            };
            return Ok(SendCheck {
                role: Some(MemberRole::Member),
                dissolved: false,
                applied,
            });
        }
        let conv_key = self.keys().conversation(cid);
        let found = txn
            .batch_get(&[member_key.clone(), conv_key.clone(), locator_key.clone()])
            .await?;
        let [member, conv, locator]: [Option<Vec<u8>>; 3] = found
            .try_into()
            .map_err(|_| crate::StoreError::Backend("batch_get returned the wrong count".into()))?;
        let role = match (member, &conv) {
            // A member record without the conversation record cannot happen through the
            // applier; treat it as no conversation.
            (Some(b), Some(_)) => {
                let rec: MemberRecord = decode(&member_key, &b)?;
                rec.is_member()
                    .then(|| MemberRole::try_from(rec.role()).unwrap_or(MemberRole::Member))
            }
            _ => None,
        };
        let dissolved = match &conv {
            Some(b) => {
                let rec: ConversationRecord = decode(&conv_key, b)?;
                rec.dissolved.is_some_and(|r| r.value)
            }
            None => false,
        };
        if role.is_some() && cid.is_direct() {
            self.direct_members.insert(member_key);
        }
        let applied = match locator {
            Some(b) => Some(decode(&locator_key, &b)?),
            None => None,
        };
        Ok(SendCheck {
            role,
            dissolved,
            applied,
        })
    }

    /// The derived member list fan-out reads (`None` for conversations from before it
    /// existed, which fan out by scanning member records). Equal to the members of
    /// [`Store::conversation`]; the property tests hold it to that.
    pub async fn fan_out_members(&self, cid: &ConversationId) -> Result<Option<Vec<UserId>>> {
        let key = self.keys().member_list(cid);
        let mut txn = self.kv().begin_read().await?;
        match txn.get(&key).await? {
            Some(b) => Ok(Some(crate::apply::decode_member_list(&b)?)),
            None => Ok(None),
        }
    }

    pub async fn conversation(&self, cid: &ConversationId) -> Result<Option<ConversationView>> {
        let key = self.keys().conversation(cid);
        let mut txn = self.kv().begin_read().await?;
        let Some(b) = txn.get(&key).await? else {
            return Ok(None);
        };
        let rec: ConversationRecord = decode(&key, &b)?;
        let prefix = self.keys().members_prefix(cid);
        let rows = Store::scan_all(txn.as_mut(), &prefix, &prefix_end(&prefix)).await?;
        let mut members = Vec::new();
        for (k, v) in rows {
            let m: MemberRecord = decode(&k, &v)?;
            if m.is_member() {
                members.push(MemberView {
                    user_id: UserId::parse(String::from_utf8_lossy(&k[prefix.len()..]).into_owned())?,
                    role: role_name(m.role()),
                });
            }
        }
        Ok(Some(ConversationView {
            conversation_id: cid.clone(),
            kind: kind_name(rec.kind),
            name: rec.name.map(|r| r.value).unwrap_or_default(),
            announcement: rec.announcement.map(|r| r.value).unwrap_or_default(),
            members_can_add: rec.members_can_add.is_some_and(|r| r.value),
            dissolved: rec.dissolved.is_some_and(|r| r.value),
            created_by: rec.created_by,
            members,
        }))
    }

    /// The read index of every current member ("seen by"). Read indexes outlive
    /// membership (a member who leaves and is added back keeps theirs), so the ones of
    /// former members are left out here, from the same snapshot.
    pub async fn read_indexes(&self, cid: &ConversationId) -> Result<Vec<(UserId, OrderKey)>> {
        let prefix = self.keys().read_index_prefix(cid);
        let mut txn = self.kv().begin_read().await?;
        let rows = Store::scan_all(txn.as_mut(), &prefix, &prefix_end(&prefix)).await?;
        let indexes = rows
            .into_iter()
            .map(|(k, v)| {
                Ok((
                    UserId::parse(String::from_utf8_lossy(&k[prefix.len()..]).into_owned())?,
                    OrderKey::from_bytes(&v)?,
                ))
            })
            .collect::<Result<Vec<_>>>()?;
        let member_keys: Vec<Vec<u8>> = indexes.iter().map(|(u, _)| self.keys().member(cid, u)).collect();
        let found = txn.batch_get(&member_keys).await?;
        let mut out = Vec::with_capacity(indexes.len());
        for ((index, key), member) in indexes.into_iter().zip(&member_keys).zip(found) {
            if let Some(b) = member {
                if decode::<MemberRecord>(key, &b)?.is_member() {
                    out.push(index);
                }
            }
        }
        Ok(out)
    }

    /// Which of `others` share a conversation with `user` now: both members of one, and it
    /// not dissolved. `user` always sees themselves. Costs one scan of `user`'s conversation
    /// list, then one scan of each other's list and point reads for the conversations in
    /// common.
    pub async fn sharing_a_conversation(&self, user: &UserId, others: &[UserId]) -> Result<HashSet<UserId>> {
        let mut txn = self.kv().begin_read().await?;
        let mine = self.listed_conversations(txn.as_mut(), user).await?;
        let mut out = HashSet::new();
        for other in others {
            if other == user {
                out.insert(other.clone());
                continue;
            }
            if out.contains(other) {
                continue;
            }
            let common: Vec<ConversationId> = self
                .listed_conversations(txn.as_mut(), other)
                .await?
                .into_iter()
                .filter(|c| mine.contains(c))
                .collect();
            for cid in common {
                let keys = [
                    self.keys().member(&cid, user),
                    self.keys().member(&cid, other),
                    self.keys().conversation(&cid),
                ];
                let found = txn.batch_get(&keys).await?;
                let member = |i: usize| -> Result<bool> {
                    Ok(match &found[i] {
                        Some(b) => decode::<MemberRecord>(&keys[i], b)?.is_member(),
                        None => false,
                    })
                };
                let dissolved = match &found[2] {
                    Some(b) => decode::<ConversationRecord>(&keys[2], b)?
                        .dissolved
                        .is_some_and(|d| d.value),
                    None => true,
                };
                if member(0)? && member(1)? && !dissolved {
                    out.insert(other.clone());
                    break;
                }
            }
        }
        Ok(out)
    }

    /// The conversation ids in `user`'s list (`L/uid/`): every conversation they were ever
    /// added to; membership is checked by the caller.
    async fn listed_conversations(
        &self,
        txn: &mut dyn crate::KvTxn,
        user: &UserId,
    ) -> Result<HashSet<ConversationId>> {
        let prefix = self.keys().user_conversations_prefix(user);
        let rows = Store::scan_all(txn, &prefix, &prefix_end(&prefix)).await?;
        rows.iter()
            .map(|(k, _)| {
                Ok(ConversationId::parse(
                    String::from_utf8_lossy(&k[prefix.len()..]).into_owned(),
                )?)
            })
            .collect()
    }

    pub async fn read_index(&self, cid: &ConversationId, user: &UserId) -> Result<Option<OrderKey>> {
        let key = self.keys().read_index(cid, user);
        let mut txn = self.kv().begin_read().await?;
        match txn.get(&key).await? {
            Some(v) => Ok(Some(OrderKey::from_bytes(&v)?)),
            None => Ok(None),
        }
    }

    pub async fn settings(&self, cid: &ConversationId, user: &UserId) -> Result<UserSettings> {
        let key = self.keys().settings(cid, user);
        let mut txn = self.kv().begin_read().await?;
        let rec: SettingsRecord = match txn.get(&key).await? {
            Some(b) => decode(&key, &b)?,
            None => SettingsRecord::default(),
        };
        Ok(UserSettings {
            muted: rec.muted.is_some_and(|r| r.value),
            pinned: rec.pinned.is_some_and(|r| r.value),
        })
    }

    /// Every conversation `user` is a member of now (hidden ones included: hiding a direct
    /// conversation does not end membership), in id order.
    pub async fn member_conversation_ids(&self, user: &UserId) -> Result<Vec<ConversationId>> {
        let prefix = self.keys().user_conversations_prefix(user);
        let mut txn = self.kv().begin_read().await?;
        let rows = Store::scan_all(txn.as_mut(), &prefix, &prefix_end(&prefix)).await?;
        let cids: Vec<ConversationId> = rows
            .iter()
            .map(|(k, _)| ConversationId::parse(String::from_utf8_lossy(&k[prefix.len()..]).into_owned()))
            .collect::<std::result::Result<_, _>>()?;
        let lookups: Vec<Vec<u8>> = cids.iter().map(|c| self.keys().member(c, user)).collect();
        let found = txn.batch_get(&lookups).await?;
        txn.rollback().await?;
        let mut out = Vec::with_capacity(cids.len());
        for ((c, key), f) in cids.into_iter().zip(&lookups).zip(found) {
            if let Some(b) = f {
                if decode::<MemberRecord>(key, &b)?.is_member() {
                    out.push(c);
                }
            }
        }
        Ok(out)
    }

    /// The conversations `user` is a member of and has not hidden, most recent activity
    /// first, `limit` of them after `after` (the `activity` and id of the previous page's
    /// last item).
    pub async fn conversations_for(
        &self,
        user: &UserId,
        limit: usize,
        after: Option<(&[u8], &ConversationId)>,
    ) -> Result<(Vec<ConversationSummary>, bool)> {
        let prefix = self.keys().user_conversations_prefix(user);
        let mut txn = self.kv().begin_read().await?;
        let rows = Store::scan_all(txn.as_mut(), &prefix, &prefix_end(&prefix)).await?;
        let cids: Vec<ConversationId> = rows
            .iter()
            .map(|(k, _)| ConversationId::parse(String::from_utf8_lossy(&k[prefix.len()..]).into_owned()))
            .collect::<std::result::Result<_, _>>()?;
        let mut lookups = Vec::with_capacity(cids.len() * 4);
        for c in &cids {
            lookups.push(self.keys().activity(c));
            lookups.push(self.keys().member(c, user));
            lookups.push(self.keys().settings(c, user));
            lookups.push(self.keys().conversation(c));
        }
        let found = txn.batch_get(&lookups).await?;
        let mut candidates = Vec::new();
        for (i, c) in cids.into_iter().enumerate() {
            let activity = found[i * 4].clone().unwrap_or_default();
            let member = match &found[i * 4 + 1] {
                Some(b) => decode::<MemberRecord>(&lookups[i * 4 + 1], b)?.is_member(),
                None => false,
            };
            let settings: SettingsRecord = match &found[i * 4 + 2] {
                Some(b) => decode(&lookups[i * 4 + 2], b)?,
                None => SettingsRecord::default(),
            };
            let conv: ConversationRecord = match &found[i * 4 + 3] {
                Some(b) => decode(&lookups[i * 4 + 3], b)?,
                None => continue,
            };
            let dissolved = conv.dissolved.as_ref().is_some_and(|d| d.value);
            let hidden = !settings.hidden_at.is_empty() && settings.hidden_at >= activity;
            if !member || dissolved || hidden {
                continue;
            }
            candidates.push((activity, c, settings, conv));
        }
        // Most recent first; ties by id so pages are stable.
        candidates.sort_by(|a, b| b.0.cmp(&a.0).then_with(|| a.1.cmp(&b.1)));
        if let Some((act, c)) = after {
            // Strictly after the previous page's last item in (activity desc, id asc) order.
            candidates.retain(|(a, id, _, _)| a.as_slice() < act || (a.as_slice() == act && id > c));
        }
        let more = candidates.len() > limit;
        candidates.truncate(limit);
        drop(txn);
        let mut out = Vec::with_capacity(candidates.len());
        for (activity, c, settings, conv) in candidates {
            let last = self
                .history(&c, user, HistoryPage::Latest, 1)
                .await?
                .messages
                .pop();
            let unread = self.unread(&c, user).await?;
            let view = self.conversation(&c).await?;
            out.push(ConversationSummary {
                kind: kind_name(conv.kind),
                name: conv.name.map(|r| r.value).unwrap_or_default(),
                last_message: last,
                unread,
                muted: settings.muted.is_some_and(|r| r.value),
                pinned: settings.pinned.is_some_and(|r| r.value),
                member_count: view.map_or(0, |v| v.members.len()),
                activity,
                conversation_id: c,
            });
        }
        Ok((out, more))
    }

    /// Messages after the user's read index not sent by the user, up to `UNREAD_CAP`.
    pub async fn unread(&self, cid: &ConversationId, user: &UserId) -> Result<u32> {
        let prefix = self.keys().timeline_prefix(cid);
        let start = match self.read_index(cid, user).await? {
            Some(k) => {
                let mut s = self.keys().timeline(cid, &k);
                s.push(0);
                s
            }
            None => prefix.clone(),
        };
        let mut txn = self.kv().begin_read().await?;
        let rows = txn
            .scan(&start, &prefix_end(&prefix), UNREAD_CAP * 2, ScanOrder::Forward)
            .await?;
        let mut n = 0u32;
        for (k, v) in rows {
            let e: TimelineEntry = decode(&k, &v)?;
            if e.kind == "message" && e.actor != user.as_str() {
                n += 1;
                if n as usize >= UNREAD_CAP {
                    break;
                }
            }
        }
        Ok(n)
    }
}
