//! `plan_event`: from (state, event) to writes, one planning function per event kind.

use std::collections::{BTreeMap, BTreeSet};
use std::sync::Arc;

use meridian_model::events::entry_detail::Change;
use meridian_model::events::{event_envelope::Body, ConversationKind, EventEnvelope, MemberRole};
use meridian_model::events::{
    ConversationCreated, ConversationDissolved, ConversationHidden, ConversationUpdated, DeviceRegistered,
    DeviceUnregistered, MemberRemoved, MemberRoleChanged, MembersAdded, MessageDeletedForMe, MessageRecalled,
    MessageSent, ReadIndexSet, RegionFailback, RegionFailover, UserSettingsChanged, UserUpserted,
};
use meridian_model::events::{
    ConversationCreatedDetail, ConversationUpdatedDetail, EntryDetail, MemberRemovedDetail,
    MemberRoleChangedDetail, MembersAddedDetail, MessageRefDetail, ReadDetail, SettingsDetail,
};
use meridian_model::{ConversationId, EventId, Hlc, OrderKey, RegionId, UserId};

use crate::keys::Keys;
use crate::kv::{prefix_end, KvTxn, ScanOrder};
use crate::records::*;
use crate::{Result, StoreError};

use super::{decode_member_list, encode_member_list, ApplyConfig, Plan, Write};

/// Plans one event: reads through `view`, writes nothing, returns the writes.
pub async fn plan_event(
    view: &mut dyn KvTxn,
    keys: &Keys,
    cfg: &ApplyConfig,
    now_ms: u64,
    ev: &EventEnvelope,
) -> Result<Plan> {
    let (event_id, origin) = match (
        EventId::from_bytes(&ev.event_id),
        RegionId::parse(ev.origin_region.as_str()),
    ) {
        (Ok(id), Ok(origin)) => (id, origin),
        (Err(e), _) | (_, Err(e)) => {
            // Without a valid id the event cannot even be recorded as applied; the stream
            // checkpoint still moves past it.
            return Ok(Plan {
                rejected: Some(format!("bad envelope: {e}")),
                ..Default::default()
            });
        }
    };
    // A message's locator doubles as its applied marker: one point read (nearly always a
    // miss, the costly kind in an LSM) and one write fewer for the bulk of the traffic.
    let is_message = matches!(ev.body, Some(Body::MessageSent(_)));
    let applied_key = if is_message {
        keys.message(&event_id)
    } else {
        keys.applied_event(&event_id)
    };
    let order_key = OrderKey::new(Hlc(ev.hlc), origin, event_id);
    let version = order_key.to_bytes();
    let duplicate = || -> Result<Plan> {
        Ok(Plan {
            duplicate: true,
            ..Default::default()
        })
    };
    // An event id seen before is a redelivery when it comes with the same order key. With
    // another one it is a copy stamped again (a sender whose ack was lost retried in the
    // region that serves them now), and which copy counts must not depend on which one a
    // region applies first (docs/design.md §4).
    let mut replacing = None;
    let mut applied_copies = Vec::new();
    match view.get(&applied_key).await? {
        None => {}
        // A message: the copy with the smallest order key wins everywhere. A larger copy
        // changes nothing; a smaller one replaces the copy applied (`plan_message_sent`).
        Some(found) if is_message => {
            let applied: MessageLocator = decode(&applied_key, &found)?;
            if applied.order_key.as_slice() <= version.as_slice() {
                return duplicate();
            }
            replacing = Some(applied);
        }
        // Any other event: its effects are registers merged by version and a timeline entry
        // (an undo of the first copy's register writes is impossible), so every copy is
        // applied once, each at its own order key: the union is the same in every region.
        // Its inbox entries go out for the first copy applied only. A marker from before
        // copies were recorded (empty) counts as this copy.
        Some(found) => {
            if found.is_empty() || copies(&found).any(|k| k == version.as_slice()) {
                return duplicate();
            }
            applied_copies = found;
        }
    }
    let repeat_copy = !applied_copies.is_empty();
    let mut p = Planner {
        view,
        keys,
        cfg,
        now_ms,
        ev,
        version,
        order_key,
        plan: Plan::default(),
        staged: BTreeMap::new(),
        timeline_entry: None,
        replacing,
        repeat_copy,
        lagging_adds: Vec::new(),
    };
    if !is_message {
        let mut marker = applied_copies;
        add_copy(&mut marker, &p.version);
        p.put(applied_key, marker);
    }
    let planned = match p.plan().await {
        Ok(()) => p.deliver_after_lagging_adds().await,
        Err(e) => Err(e),
    };
    if let Err(e) = planned {
        match e {
            StoreError::Model(m) => {
                // A body that does not validate: record the event as applied, change nothing.
                let applied = keys.applied_event(&event_id);
                return Ok(Plan {
                    writes: vec![Write::Put(applied, Vec::new())],
                    rejected: Some(m.to_string()),
                    ..Default::default()
                });
            }
            other => return Err(other),
        }
    }
    let mut plan = p.plan;
    plan.writes.extend(p.staged.into_iter().map(|(k, v)| match v {
        Some(v) => Write::Put(k, v),
        None => Write::Delete(k),
    }));
    Ok(plan)
}

pub(super) struct Planner<'a> {
    pub(super) view: &'a mut dyn KvTxn,
    pub(super) keys: &'a Keys,
    pub(super) cfg: &'a ApplyConfig,
    pub(super) now_ms: u64,
    pub(super) ev: &'a EventEnvelope,
    pub(super) order_key: OrderKey,
    /// The event's order key bytes: the version every register write carries.
    pub(super) version: Vec<u8>,
    pub(super) plan: Plan,
    /// Writes keyed by key, so reading a key this plan already wrote sees the new value.
    pub(super) staged: BTreeMap<Vec<u8>, Option<Vec<u8>>>,
    /// The entry this event appended to a storage timeline: inbox entries equal to it
    /// reference it instead of copying it.
    pub(super) timeline_entry: Option<(ConversationId, Arc<TimelineEntry>)>,
    /// A message applied before under a larger order key, which this copy replaces.
    pub(super) replacing: Option<MessageLocator>,
    /// Another copy of this (non-message) event was applied before: its inbox entries went
    /// out then, so this one appends none.
    pub(super) repeat_copy: bool,
    /// Members this event added whose membership now starts before timeline entries that
    /// were fanned out without them: (conversation, member, version of their next
    /// membership change). See `Planner::deliver_after_lagging_adds`.
    pub(super) lagging_adds: Vec<(ConversationId, UserId, Option<Vec<u8>>)>,
}

/// The order keys of the copies an applied marker (`E/event_id`) records: each a u16
/// big-endian length, then the key.
fn copies(marker: &[u8]) -> impl Iterator<Item = &[u8]> {
    let mut rest = marker;
    std::iter::from_fn(move || {
        let len = u16::from_be_bytes(rest.get(..2)?.try_into().ok()?) as usize;
        let key = rest.get(2..2 + len)?;
        rest = &rest[2 + len..];
        Some(key)
    })
}

fn add_copy(marker: &mut Vec<u8>, key: &[u8]) {
    marker.extend_from_slice(&(key.len() as u16).to_be_bytes());
    marker.extend_from_slice(key);
}

/// The HLC physical time of order-key bytes (0 when too short to hold one).
pub(super) fn hlc_ms_of(order_key: &[u8]) -> u64 {
    order_key
        .get(..8)
        .and_then(|b| b.try_into().ok())
        .map_or(0, |b| Hlc(u64::from_be_bytes(b)).physical_ms())
}

fn cid(s: &str) -> Result<ConversationId> {
    Ok(ConversationId::parse(s)?)
}
fn uid(s: &str) -> Result<UserId> {
    Ok(UserId::parse(s)?)
}

impl Planner<'_> {
    pub(super) fn put(&mut self, key: Vec<u8>, value: Vec<u8>) {
        self.staged.insert(key, Some(value));
    }

    pub(super) async fn get(&mut self, key: &[u8]) -> Result<Option<Vec<u8>>> {
        if let Some(v) = self.staged.get(key) {
            return Ok(v.clone());
        }
        self.view.get(key).await
    }

    pub(super) async fn record<M: prost::Message + Default>(&mut self, key: &[u8]) -> Result<Option<M>> {
        match self.get(key).await? {
            Some(bytes) => Ok(Some(decode(key, &bytes)?)),
            None => Ok(None),
        }
    }

    pub(super) async fn record_or_default<M: prost::Message + Default>(&mut self, key: &[u8]) -> Result<M> {
        Ok(self.record(key).await?.unwrap_or_default())
    }

    pub(super) fn put_record<M: prost::Message>(&mut self, key: Vec<u8>, m: &M) {
        self.put(key, m.encode_to_vec());
    }

    fn str_reg(&self, value: &str) -> StrReg {
        StrReg {
            value: value.to_string(),
            version: self.version.clone(),
        }
    }
    fn bool_reg(&self, value: bool) -> BoolReg {
        BoolReg {
            value,
            version: self.version.clone(),
        }
    }
    fn int_reg(&self, value: i32) -> IntReg {
        IntReg {
            value,
            version: self.version.clone(),
        }
    }

    /// The timeline entry of this event: `kind` and, for a state change, what it changed.
    pub(super) fn entry(&self, kind: &str, change: Option<Change>) -> TimelineEntry {
        TimelineEntry {
            kind: kind.to_string(),
            event_id: self.order_key.event_id.as_bytes().to_vec(),
            actor: self.ev.actor.clone(),
            at_ms: self.order_key.hlc.physical_ms(),
            detail: change.map(|change| EntryDetail { change: Some(change) }),
            ..Default::default()
        }
    }

    /// Appends `entry` to the storage timeline and moves the conversation's activity.
    async fn append_timeline(&mut self, cid: &ConversationId, entry: &TimelineEntry) -> Result<()> {
        let key = self.keys.timeline(cid, &self.order_key);
        self.put_record(key, entry);
        self.timeline_entry = Some((cid.clone(), Arc::new(entry.clone())));
        let akey = self.keys.activity(cid);
        let mut activity = self.get(&akey).await?.unwrap_or_default();
        if max_into(&mut activity, &self.version) {
            self.put(akey, activity);
        }
        Ok(())
    }

    /// The members in force at this event's order key, sorted: who its inbox entries go to
    /// (docs/design.md §4). When no membership change applied so far is ordered after the
    /// event (nearly always: streams arrive roughly in order), that is the current member
    /// list; otherwise each member record's history answers.
    pub(super) async fn members_at_event(&mut self, cid: &ConversationId) -> Result<Vec<UserId>> {
        let changed = self
            .get(&self.keys.membership_changed(cid))
            .await?
            .unwrap_or_default();
        if changed <= self.version {
            return self.members(cid).await;
        }
        let version = self.version.clone();
        self.scan_members_by(cid, |rec| rec.member_at(&version).unwrap_or(rec.is_member()))
            .await
    }

    /// Current members of a conversation, sorted: from the derived member list when the
    /// conversation has one, else by scanning its member records.
    pub(super) async fn members(&mut self, cid: &ConversationId) -> Result<Vec<UserId>> {
        if let Some(list) = self.get(&self.keys.member_list(cid)).await? {
            return decode_member_list(&list);
        }
        self.scan_members(cid).await
    }

    async fn scan_members(&mut self, cid: &ConversationId) -> Result<Vec<UserId>> {
        self.scan_members_by(cid, MemberRecord::is_member).await
    }

    /// The users whose member record in `cid` satisfies `member`, this plan's staged writes
    /// included.
    async fn scan_members_by(
        &mut self,
        cid: &ConversationId,
        member: impl Fn(&MemberRecord) -> bool,
    ) -> Result<Vec<UserId>> {
        let prefix = self.keys.members_prefix(cid);
        let end = prefix_end(&prefix);
        let mut out = BTreeSet::new();
        let mut start = prefix.clone();
        loop {
            let page = self.view.scan(&start, &end, 1024, ScanOrder::Forward).await?;
            let n = page.len();
            for (k, v) in &page {
                let rec: MemberRecord = decode(k, v)?;
                if member(&rec) {
                    out.insert(uid(&String::from_utf8_lossy(&k[prefix.len()..]))?);
                }
            }
            match page.last() {
                Some((k, _)) if n == 1024 => {
                    start = k.clone();
                    start.push(0);
                }
                _ => break,
            }
        }
        // Staged member writes of this plan (members added by this very event).
        for (k, v) in self.staged.range(prefix.clone()..end) {
            let user = uid(&String::from_utf8_lossy(&k[prefix.len()..]))?;
            match v {
                Some(v) if member(&decode::<MemberRecord>(k, v)?) => {
                    out.insert(user);
                }
                _ => {
                    out.remove(&user);
                }
            }
        }
        Ok(out.into_iter().collect())
    }

    async fn set_member(
        &mut self,
        cid: &ConversationId,
        user: &UserId,
        member: bool,
        role: Option<i32>,
    ) -> Result<()> {
        let key = self.keys.member(cid, user);
        let mut rec: MemberRecord = self.record_or_default(&key).await?;
        let recorded = rec.record_change(&self.version, member);
        let mut changed = lww(&mut rec.member, self.bool_reg(member));
        if let Some(role) = role {
            changed |= lww(&mut rec.role, self.int_reg(role));
        }
        if recorded.inserted {
            let jkey = self.keys.membership_changed(cid);
            let mut latest = self.get(&jkey).await?.unwrap_or_default();
            if max_into(&mut latest, &self.version) {
                self.put(jkey, latest);
            }
            // An add that makes `user` a member at order keys where they were not: the
            // entries already applied there went out without them.
            if member && !recorded.before {
                self.lagging_adds.push((cid.clone(), user.clone(), recorded.next));
            }
        }
        if changed || recorded.inserted {
            self.put_record(key, &rec);
        }
        if changed {
            // Keep the derived list equal to the set of member records that say "member"
            // (the LWW winner, whatever order events arrive in). The list is read through
            // the transaction, so a concurrent change conflicts instead of being lost.
            let mut members = self.members(cid).await?;
            members.retain(|m| m != user);
            if rec.is_member() {
                members.push(user.clone());
                members.sort();
            }
            self.put(self.keys.member_list(cid), encode_member_list(&members));
        }
        if member {
            self.put(self.keys.user_conversation(user, cid), Vec::new());
        }
        Ok(())
    }

    async fn plan(&mut self) -> Result<()> {
        let Some(body) = self.ev.body.clone() else {
            self.plan.rejected = Some("event without a body".into());
            return Ok(());
        };
        match body {
            Body::UserUpserted(b) => self.plan_user_upserted(b).await,
            Body::ConversationCreated(b) => self.plan_conversation_created(b).await,
            Body::ConversationUpdated(b) => self.plan_conversation_updated(b).await,
            Body::ConversationDissolved(b) => self.plan_conversation_dissolved(b).await,
            Body::ConversationHidden(b) => self.plan_conversation_hidden(b).await,
            Body::MembersAdded(b) => self.plan_members_added(b).await,
            Body::MemberRemoved(b) => self.plan_member_removed(b).await,
            Body::MemberRoleChanged(b) => self.plan_member_role_changed(b).await,
            Body::UserSettingsChanged(b) => self.plan_user_settings_changed(b).await,
            Body::MessageSent(b) => self.plan_message_sent(b).await,
            Body::MessageRecalled(b) => self.plan_message_recalled(b).await,
            Body::MessageDeletedForMe(b) => self.plan_message_deleted_for_me(b).await,
            Body::ReadIndexSet(b) => self.plan_read_index_set(b).await,
            Body::DeviceRegistered(b) => self.plan_device_registered(b).await,
            Body::DeviceUnregistered(b) => self.plan_device_unregistered(b).await,
            Body::RegionFailover(b) => self.plan_region_failover(b).await,
            Body::RegionFailback(b) => self.plan_region_failback(b).await,
        }
    }

    async fn plan_user_upserted(&mut self, b: UserUpserted) -> Result<()> {
        let user = uid(&b.user_id)?;
        let home = RegionId::parse(b.home_region.as_str())?;
        let key = self.keys.user(&user);
        let mut rec: UserRecord = self.record_or_default(&key).await?;
        let mut changed = lww(&mut rec.home_region, self.str_reg(home.as_str()));
        if !b.display_name.is_empty() {
            changed |= lww(&mut rec.display_name, self.str_reg(&b.display_name));
        }
        if changed {
            self.put_record(key, &rec);
        }
        Ok(())
    }

    async fn plan_conversation_created(&mut self, b: ConversationCreated) -> Result<()> {
        let c = cid(&b.conversation_id)?;
        let key = self.keys.conversation(&c);
        let mut rec: ConversationRecord = self.record_or_default(&key).await?;
        if rec.created.is_empty() || self.version < rec.created {
            rec.created = self.version.clone();
            rec.created_by = self.ev.actor.clone();
        }
        rec.kind = b.kind;
        if b.kind == ConversationKind::Group as i32 {
            lww(&mut rec.name, self.str_reg(&b.name));
        }
        self.put_record(key, &rec);
        let mut users = Vec::new();
        for g in &b.members {
            let user = uid(&g.user_id)?;
            let role = if g.role == 0 {
                MemberRole::Member as i32
            } else {
                g.role
            };
            self.set_member(&c, &user, true, Some(role)).await?;
            users.push(user.to_string());
        }
        let entry = self.entry(
            "conversation_created",
            Some(Change::ConversationCreated(ConversationCreatedDetail {
                name: b.name,
                user_ids: users,
            })),
        );
        self.append_timeline(&c, &entry).await?;
        let members = self.members_at_event(&c).await?;
        self.fan_out(&c, members, entry).await?;
        Ok(())
    }

    async fn plan_conversation_updated(&mut self, b: ConversationUpdated) -> Result<()> {
        let c = cid(&b.conversation_id)?;
        let key = self.keys.conversation(&c);
        let mut rec: ConversationRecord = self.record_or_default(&key).await?;
        if let Some(name) = &b.name {
            lww(&mut rec.name, self.str_reg(name));
        }
        if let Some(a) = &b.announcement {
            lww(&mut rec.announcement, self.str_reg(a));
        }
        if let Some(m) = b.members_can_add {
            lww(&mut rec.members_can_add, self.bool_reg(m));
        }
        self.put_record(key, &rec);
        let detail = ConversationUpdatedDetail {
            name: b.name,
            announcement: b.announcement,
            members_can_add: b.members_can_add,
        };
        let entry = self.entry("conversation_updated", Some(Change::ConversationUpdated(detail)));
        self.append_timeline(&c, &entry).await?;
        let members = self.members_at_event(&c).await?;
        self.fan_out(&c, members, entry).await?;
        Ok(())
    }

    async fn plan_conversation_dissolved(&mut self, b: ConversationDissolved) -> Result<()> {
        let c = cid(&b.conversation_id)?;
        let key = self.keys.conversation(&c);
        let mut rec: ConversationRecord = self.record_or_default(&key).await?;
        lww(&mut rec.dissolved, self.bool_reg(true));
        self.put_record(key, &rec);
        let entry = self.entry("conversation_dissolved", None);
        self.append_timeline(&c, &entry).await?;
        let members = self.members_at_event(&c).await?;
        self.fan_out(&c, members, entry).await?;
        Ok(())
    }

    async fn plan_conversation_hidden(&mut self, b: ConversationHidden) -> Result<()> {
        let c = cid(&b.conversation_id)?;
        let user = uid(&b.user_id)?;
        let key = self.keys.settings(&c, &user);
        let mut rec: SettingsRecord = self.record_or_default(&key).await?;
        let version = self.version.clone();
        if max_into(&mut rec.hidden_at, &version) {
            self.put_record(key, &rec);
        }
        let entry = self.entry("conversation_hidden", None);
        self.fan_out(&c, vec![user], entry).await?;
        Ok(())
    }

    async fn plan_members_added(&mut self, b: MembersAdded) -> Result<()> {
        let c = cid(&b.conversation_id)?;
        let mut added = Vec::new();
        for u in &b.user_ids {
            let user = uid(u)?;
            // An add never writes the role: whatever order it meets a creation or
            // a role change in, it cannot demote (or promote) anyone. A member
            // without a role register is a plain member.
            self.set_member(&c, &user, true, None).await?;
            added.push(user.to_string());
        }
        let entry = self.entry(
            "member_added",
            Some(Change::MembersAdded(MembersAddedDetail { user_ids: added })),
        );
        self.append_timeline(&c, &entry).await?;
        let members = self.members_at_event(&c).await?;
        self.fan_out(&c, members, entry).await?;
        Ok(())
    }

    async fn plan_member_removed(&mut self, b: MemberRemoved) -> Result<()> {
        let c = cid(&b.conversation_id)?;
        let user = uid(&b.user_id)?;
        // Leaving ends the role too (an explicit write at the removal's version), so
        // someone added back later is a plain member until a role change says
        // otherwise, instead of silently regaining admin or ownership.
        self.set_member(&c, &user, false, Some(MemberRole::Member as i32))
            .await?;
        let entry = self.entry(
            "member_removed",
            Some(Change::MemberRemoved(MemberRemovedDetail {
                user_id: user.to_string(),
            })),
        );
        self.append_timeline(&c, &entry).await?;
        let mut members = self.members_at_event(&c).await?;
        members.push(user);
        self.fan_out(&c, members, entry).await?;
        Ok(())
    }

    async fn plan_member_role_changed(&mut self, b: MemberRoleChanged) -> Result<()> {
        let c = cid(&b.conversation_id)?;
        let user = uid(&b.user_id)?;
        let key = self.keys.member(&c, &user);
        let mut rec: MemberRecord = self.record_or_default(&key).await?;
        if lww(&mut rec.role, self.int_reg(b.role)) {
            self.put_record(key, &rec);
        }
        let entry = self.entry(
            "member_role_changed",
            Some(Change::MemberRoleChanged(MemberRoleChangedDetail {
                user_id: user.to_string(),
                role: b.role,
            })),
        );
        self.append_timeline(&c, &entry).await?;
        let members = self.members_at_event(&c).await?;
        self.fan_out(&c, members, entry).await?;
        Ok(())
    }

    async fn plan_user_settings_changed(&mut self, b: UserSettingsChanged) -> Result<()> {
        let c = cid(&b.conversation_id)?;
        let user = uid(&b.user_id)?;
        let key = self.keys.settings(&c, &user);
        let mut rec: SettingsRecord = self.record_or_default(&key).await?;
        if let Some(m) = b.muted {
            lww(&mut rec.muted, self.bool_reg(m));
        }
        if let Some(p) = b.pinned {
            lww(&mut rec.pinned, self.bool_reg(p));
        }
        self.put_record(key, &rec);
        let entry = self.entry(
            "settings",
            Some(Change::Settings(SettingsDetail {
                muted: b.muted,
                pinned: b.pinned,
            })),
        );
        self.fan_out(&c, vec![user], entry).await?;
        Ok(())
    }

    async fn plan_message_sent(&mut self, b: MessageSent) -> Result<()> {
        let c = cid(&b.conversation_id)?;
        let sender = uid(&self.ev.actor)?;
        let mut entry = self.entry("message", None);
        entry.msg_type = b.msg_type.clone();
        entry.body_json = b.body_json.clone();
        entry.client_msg_id = b.client_msg_id.clone();
        let replaced = self.replacing.take();
        if let Some(old) = &replaced {
            self.remove_replaced_copy(old).await?;
        }
        self.append_timeline(&c, &entry).await?;
        let locator = MessageLocator {
            conversation_id: c.to_string(),
            order_key: self.version.clone(),
            sender: sender.to_string(),
        };
        self.put_record(self.keys.message(&self.order_key.event_id), &locator);
        let members = self.members_at_event(&c).await?;
        let read_diffusion = members.len() > self.cfg.read_diffusion_threshold;
        if let Some(old) = replaced {
            // The copy replaced went out to the members at its own order key; their inbox
            // entries now resolve to this copy (see `inbox.rs`). Those who are members at
            // this copy's order key and did not get it get it now, once. In a read-diffusion
            // group members pull the timeline, and the replaced copy already announced it.
            if !read_diffusion {
                let earliest = self.order_key.hlc.physical_ms().min(hlc_ms_of(&old.order_key));
                self.fan_out_missing(&c, members, entry, earliest).await?;
            }
        } else if read_diffusion {
            self.fan_out_coalesced(&c, members, &sender, entry).await?;
        } else {
            self.fan_out(&c, members, entry).await?;
        }
        Ok(())
    }

    /// Removes the copy of this message applied under a larger order key: its timeline
    /// entry goes, and the conversation's activity falls back to the newest entry left when
    /// it was the newest (the list then sorts as in a region that never saw that copy).
    /// Everything else about a message (recall, deleted-for-me marks) is keyed by its id.
    async fn remove_replaced_copy(&mut self, old: &MessageLocator) -> Result<()> {
        let old_cid = cid(&old.conversation_id)?;
        let prefix = self.keys.timeline_prefix(&old_cid);
        let old_entry = [prefix.as_slice(), &old.order_key].concat();
        self.staged.insert(old_entry.clone(), None);
        let akey = self.keys.activity(&old_cid);
        if self.get(&akey).await?.as_deref() == Some(old.order_key.as_slice()) {
            let newest = self
                .view
                .scan(&prefix, &prefix_end(&prefix), 2, ScanOrder::Reverse)
                .await?
                .into_iter()
                .map(|(k, _)| k)
                .find(|k| *k != old_entry);
            match newest {
                Some(k) => self.put(akey, k[prefix.len()..].to_vec()),
                None => {
                    self.staged.insert(akey, None);
                }
            }
        }
        Ok(())
    }

    async fn plan_message_recalled(&mut self, b: MessageRecalled) -> Result<()> {
        let c = cid(&b.conversation_id)?;
        let msg = EventId::from_bytes(&b.message_id)?;
        let key = self.keys.recall(&c, &msg);
        let mut rec: RecallRecord = self.record_or_default(&key).await?;
        if self.version > rec.version {
            rec.version = self.version.clone();
            rec.actor = self.ev.actor.clone();
            self.put_record(key, &rec);
        }
        let entry = self.entry(
            "recall",
            Some(Change::Recall(MessageRefDetail {
                message_id: msg.as_bytes().to_vec(),
            })),
        );
        self.append_timeline(&c, &entry).await?;
        let members = self.members_at_event(&c).await?;
        self.fan_out(&c, members, entry).await?;
        Ok(())
    }

    async fn plan_message_deleted_for_me(&mut self, b: MessageDeletedForMe) -> Result<()> {
        let c = cid(&b.conversation_id)?;
        let msg = EventId::from_bytes(&b.message_id)?;
        let user = uid(&b.user_id)?;
        self.put(self.keys.hidden_message(&c, &user, &msg), Vec::new());
        let entry = self.entry(
            "message_deleted",
            Some(Change::MessageDeleted(MessageRefDetail {
                message_id: msg.as_bytes().to_vec(),
            })),
        );
        self.fan_out(&c, vec![user], entry).await?;
        Ok(())
    }

    async fn plan_read_index_set(&mut self, b: ReadIndexSet) -> Result<()> {
        let c = cid(&b.conversation_id)?;
        let user = uid(&b.user_id)?;
        // A read index that is not an order key is rejected.
        OrderKey::from_bytes(&b.order_key)?;
        let key = self.keys.read_index(&c, &user);
        let mut cur = self.get(&key).await?.unwrap_or_default();
        if max_into(&mut cur, &b.order_key) {
            self.put(key, cur);
            let entry = self.entry(
                "read",
                Some(Change::Read(ReadDetail {
                    user_id: user.to_string(),
                    read_index: b.order_key.clone(),
                })),
            );
            self.fan_out(&c, vec![user], entry).await?;
        }
        Ok(())
    }

    async fn plan_device_registered(&mut self, b: DeviceRegistered) -> Result<()> {
        let user = uid(&b.user_id)?;
        meridian_model::DeviceId::parse(b.device_id.as_str())?;
        self.set_device(&user, &b.device_id, true, &b.platform, &b.token)
            .await?;
        Ok(())
    }

    async fn plan_device_unregistered(&mut self, b: DeviceUnregistered) -> Result<()> {
        let user = uid(&b.user_id)?;
        if b.token.is_empty() {
            return self.set_device(&user, &b.device_id, false, "", "").await;
        }
        // A token named (push: the provider reported it dead) removes only a
        // registration with that token ordered before the report; one renewed with a new
        // token stays, in whatever order the two arrive (see `DeviceRecord::dead_tokens`).
        let key = self.keys.device(&user, &b.device_id);
        let mut rec: DeviceRecord = self.record_or_default(&key).await?;
        if rec.report_dead(&b.token, &self.version) {
            self.put_record(key, &rec);
        }
        Ok(())
    }

    async fn plan_region_failover(&mut self, b: RegionFailover) -> Result<()> {
        let region = RegionId::parse(b.region.as_str())?;
        let to = RegionId::parse(b.to.as_str())?;
        let serving = if to == region { "" } else { to.as_str() };
        self.set_serving(&region, serving, b.applied).await?;
        Ok(())
    }

    async fn plan_region_failback(&mut self, b: RegionFailback) -> Result<()> {
        let region = RegionId::parse(b.region.as_str())?;
        self.set_serving(&region, "", Vec::new()).await?;
        Ok(())
    }

    async fn set_device(
        &mut self,
        user: &UserId,
        device: &str,
        active: bool,
        platform: &str,
        token: &str,
    ) -> Result<()> {
        let key = self.keys.device(user, device);
        let mut rec: DeviceRecord = self.record_or_default(&key).await?;
        if rec.version < self.version {
            rec.version = self.version.clone();
            rec.registered = active;
            rec.platform = platform.into();
            rec.token = token.into();
            rec.settle();
            self.put_record(key, &rec);
        }
        Ok(())
    }

    async fn set_serving(
        &mut self,
        region: &RegionId,
        serving: &str,
        failover_point: Vec<meridian_model::events::StreamPosition>,
    ) -> Result<()> {
        let key = self.keys.region(region);
        let mut rec: RegionRecord = self.record_or_default(&key).await?;
        if lww(&mut rec.serving, self.str_reg(serving)) {
            rec.failover_point = failover_point;
            self.put_record(key, &rec);
        }
        Ok(())
    }
}
