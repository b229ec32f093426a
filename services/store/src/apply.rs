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

use std::collections::{BTreeMap, BTreeSet, HashMap};
use std::sync::Arc;

use meridian_model::events::{event_envelope::Body, ConversationKind, EventEnvelope, LiveEntry, MemberRole};
use meridian_model::{ConversationId, EventId, Hlc, OrderKey, RegionId, UserId};
use serde_json::json;

use crate::budget::BatchBudget;
use crate::checkpoint::{self, StreamRef};
use crate::keys::Keys;
use crate::kv::{prefix_end, KvTxn, ScanOrder};
use crate::records::*;
use crate::{Result, Store, StoreError};

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

const MAX_CONFLICT_RETRIES: usize = 64;

impl Store {
    /// Applies `events` (from `stream`, in stream order) in one transaction with the stream
    /// checkpoint: all of them, or a prefix when the staged writes reach a bound of `cfg`
    /// (`ApplyReport::consumed` says how many; the checkpoint is the prefix's last event).
    /// On a conflict the batch is planned again from fresh state.
    /// `stream` is a name (instance unknown) or a [`StreamRef`] naming the instance the
    /// events come from: a checkpoint of another instance counts as nothing applied.
    pub async fn apply_batch<'a>(
        &self,
        cfg: &ApplyConfig,
        stream: impl Into<StreamRef<'a>>,
        events: &[SequencedEvent],
    ) -> Result<ApplyReport> {
        self.apply_batch_at(cfg, stream, events, now_ms()).await
    }

    /// `apply_batch` with the wall time given (inbox TTLs count from it).
    pub async fn apply_batch_at<'a>(
        &self,
        cfg: &ApplyConfig,
        stream: impl Into<StreamRef<'a>>,
        events: &[SequencedEvent],
        now_ms: u64,
    ) -> Result<ApplyReport> {
        let stream = stream.into();
        let mut retries = 0;
        loop {
            match self.try_apply_batch(cfg, stream, events, now_ms).await {
                Err(e) if e.is_conflict() && retries < MAX_CONFLICT_RETRIES => {
                    retries += 1;
                    let backoff = std::time::Duration::from_micros(200 * (1 << retries.min(8)) as u64);
                    tokio::time::sleep(backoff).await;
                }
                Ok(mut report) => {
                    report.retries = retries;
                    return Ok(report);
                }
                Err(e) => return Err(e),
            }
        }
    }

    async fn try_apply_batch(
        &self,
        cfg: &ApplyConfig,
        stream: StreamRef<'_>,
        events: &[SequencedEvent],
        now_ms: u64,
    ) -> Result<ApplyReport> {
        let keys = self.keys();
        let mut txn = self.kv().begin().await?;
        let cp_key = keys.checkpoint(stream.name);
        let stored = checkpoint::read(txn.as_mut(), &cp_key).await?;
        let mut next = stored.for_instance(stream.instance);
        let mut report = ApplyReport {
            checkpoint: next.seq,
            ..Default::default()
        };
        let mut budget = BatchBudget::new(cfg);
        for ev in events {
            if budget.spent() {
                break;
            }
            report.consumed += 1;
            if ev.stream_seq <= report.checkpoint {
                report.below_checkpoint += 1;
                continue;
            }
            let plan = plan_event(txn.as_mut(), keys, cfg, now_ms, &ev.envelope).await?;
            budget.charge(&plan);
            if plan.duplicate {
                report.duplicates += 1;
            } else if let Some(reason) = &plan.rejected {
                tracing::warn!(stream = stream.name, seq = ev.stream_seq, %reason, "event rejected by apply");
                report.rejected += 1;
            } else {
                report.applied += 1;
            }
            if plan.rejected.is_none() {
                next.max_hlc = next.max_hlc.max(ev.envelope.hlc);
            }
            for w in plan.writes {
                match w {
                    Write::Put(k, v) => txn.put(k, v).await?,
                    Write::Delete(k) => txn.delete(k).await?,
                }
            }
            report.deliveries.extend(plan.deliveries);
            report.checkpoint = ev.stream_seq;
        }
        next.seq = report.checkpoint;
        if next == stored {
            txn.rollback().await?;
            return Ok(report);
        }
        txn.put(cp_key, next.encode()).await?;
        txn.commit().await?;
        Ok(report)
    }
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
    if view.get(&applied_key).await?.is_some() {
        return Ok(Plan {
            duplicate: true,
            ..Default::default()
        });
    }
    let order_key = OrderKey::new(Hlc(ev.hlc), origin, event_id);
    let mut p = Planner {
        view,
        keys,
        cfg,
        now_ms,
        ev,
        version: order_key.to_bytes(),
        order_key,
        plan: Plan::default(),
        staged: BTreeMap::new(),
        timeline_entry: None,
    };
    if !is_message {
        p.put(applied_key, Vec::new());
    }
    if let Err(e) = p.plan().await {
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

struct Planner<'a> {
    view: &'a mut dyn KvTxn,
    keys: &'a Keys,
    cfg: &'a ApplyConfig,
    now_ms: u64,
    ev: &'a EventEnvelope,
    order_key: OrderKey,
    /// The event's order key bytes: the version every register write carries.
    version: Vec<u8>,
    plan: Plan,
    /// Writes keyed by key, so reading a key this plan already wrote sees the new value.
    staged: BTreeMap<Vec<u8>, Option<Vec<u8>>>,
    /// The entry this event appended to a storage timeline: inbox entries equal to it
    /// reference it instead of copying it.
    timeline_entry: Option<(ConversationId, Arc<TimelineEntry>)>,
}

fn cid(s: &str) -> Result<ConversationId> {
    Ok(ConversationId::parse(s)?)
}
fn uid(s: &str) -> Result<UserId> {
    Ok(UserId::parse(s)?)
}

impl Planner<'_> {
    fn put(&mut self, key: Vec<u8>, value: Vec<u8>) {
        self.staged.insert(key, Some(value));
    }

    async fn get(&mut self, key: &[u8]) -> Result<Option<Vec<u8>>> {
        if let Some(v) = self.staged.get(key) {
            return Ok(v.clone());
        }
        self.view.get(key).await
    }

    async fn record<M: prost::Message + Default>(&mut self, key: &[u8]) -> Result<Option<M>> {
        match self.get(key).await? {
            Some(bytes) => Ok(Some(decode(key, &bytes)?)),
            None => Ok(None),
        }
    }

    async fn record_or_default<M: prost::Message + Default>(&mut self, key: &[u8]) -> Result<M> {
        Ok(self.record(key).await?.unwrap_or_default())
    }

    fn put_record<M: prost::Message>(&mut self, key: Vec<u8>, m: &M) {
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

    fn entry(&self, kind: &str, detail: serde_json::Value) -> TimelineEntry {
        TimelineEntry {
            kind: kind.to_string(),
            event_id: self.order_key.event_id.as_bytes().to_vec(),
            actor: self.ev.actor.clone(),
            at_ms: self.order_key.hlc.physical_ms(),
            detail_json: if detail.is_null() {
                String::new()
            } else {
                detail.to_string()
            },
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

    /// Current members of a conversation, sorted: from the derived member list when the
    /// conversation has one, else by scanning its member records.
    async fn members(&mut self, cid: &ConversationId) -> Result<Vec<UserId>> {
        if let Some(list) = self.get(&self.keys.member_list(cid)).await? {
            return decode_member_list(&list);
        }
        self.scan_members(cid).await
    }

    async fn scan_members(&mut self, cid: &ConversationId) -> Result<Vec<UserId>> {
        let prefix = self.keys.members_prefix(cid);
        let end = prefix_end(&prefix);
        let mut out = BTreeSet::new();
        let mut start = prefix.clone();
        loop {
            let page = self.view.scan(&start, &end, 1024, ScanOrder::Forward).await?;
            let n = page.len();
            for (k, v) in &page {
                let rec: MemberRecord = decode(k, v)?;
                if rec.is_member() {
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
                Some(v) if decode::<MemberRecord>(k, v)?.is_member() => {
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
        let mut changed = lww(&mut rec.member, self.bool_reg(member));
        if let Some(role) = role {
            changed |= lww(&mut rec.role, self.int_reg(role));
        }
        if changed {
            self.put_record(key, &rec);
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
            Body::UserUpserted(b) => {
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
            }
            Body::ConversationCreated(b) => {
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
                let entry = self.entry("conversation_created", json!({"name": b.name, "user_ids": users}));
                self.append_timeline(&c, &entry).await?;
                let members = self.members(&c).await?;
                self.fan_out(&c, members, entry).await?;
            }
            Body::ConversationUpdated(b) => {
                let c = cid(&b.conversation_id)?;
                let key = self.keys.conversation(&c);
                let mut rec: ConversationRecord = self.record_or_default(&key).await?;
                let mut detail = serde_json::Map::new();
                if let Some(name) = &b.name {
                    lww(&mut rec.name, self.str_reg(name));
                    detail.insert("name".into(), json!(name));
                }
                if let Some(a) = &b.announcement {
                    lww(&mut rec.announcement, self.str_reg(a));
                    detail.insert("announcement".into(), json!(a));
                }
                if let Some(m) = b.members_can_add {
                    lww(&mut rec.members_can_add, self.bool_reg(m));
                    detail.insert("members_can_add".into(), json!(m));
                }
                self.put_record(key, &rec);
                let entry = self.entry("conversation_updated", serde_json::Value::Object(detail));
                self.append_timeline(&c, &entry).await?;
                let members = self.members(&c).await?;
                self.fan_out(&c, members, entry).await?;
            }
            Body::ConversationDissolved(b) => {
                let c = cid(&b.conversation_id)?;
                let key = self.keys.conversation(&c);
                let mut rec: ConversationRecord = self.record_or_default(&key).await?;
                lww(&mut rec.dissolved, self.bool_reg(true));
                self.put_record(key, &rec);
                let entry = self.entry("conversation_dissolved", serde_json::Value::Null);
                self.append_timeline(&c, &entry).await?;
                let members = self.members(&c).await?;
                self.fan_out(&c, members, entry).await?;
            }
            Body::ConversationHidden(b) => {
                let c = cid(&b.conversation_id)?;
                let user = uid(&b.user_id)?;
                let key = self.keys.settings(&c, &user);
                let mut rec: SettingsRecord = self.record_or_default(&key).await?;
                let version = self.version.clone();
                if max_into(&mut rec.hidden_at, &version) {
                    self.put_record(key, &rec);
                }
                let entry = self.entry("conversation_hidden", serde_json::Value::Null);
                self.fan_out(&c, vec![user], entry).await?;
            }
            Body::MembersAdded(b) => {
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
                let entry = self.entry("member_added", json!({"user_ids": added}));
                self.append_timeline(&c, &entry).await?;
                let members = self.members(&c).await?;
                self.fan_out(&c, members, entry).await?;
            }
            Body::MemberRemoved(b) => {
                let c = cid(&b.conversation_id)?;
                let user = uid(&b.user_id)?;
                // Leaving ends the role too (an explicit write at the removal's version), so
                // someone added back later is a plain member until a role change says
                // otherwise, instead of silently regaining admin or ownership.
                self.set_member(&c, &user, false, Some(MemberRole::Member as i32))
                    .await?;
                let entry = self.entry("member_removed", json!({"user_id": user.as_str()}));
                self.append_timeline(&c, &entry).await?;
                let mut members = self.members(&c).await?;
                members.push(user);
                self.fan_out(&c, members, entry).await?;
            }
            Body::MemberRoleChanged(b) => {
                let c = cid(&b.conversation_id)?;
                let user = uid(&b.user_id)?;
                let key = self.keys.member(&c, &user);
                let mut rec: MemberRecord = self.record_or_default(&key).await?;
                if lww(&mut rec.role, self.int_reg(b.role)) {
                    self.put_record(key, &rec);
                }
                let role = MemberRole::try_from(b.role)
                    .map(|r| r.as_str_name())
                    .unwrap_or("unknown");
                let entry = self.entry(
                    "member_role_changed",
                    json!({"user_id": user.as_str(), "role": role}),
                );
                self.append_timeline(&c, &entry).await?;
                let members = self.members(&c).await?;
                self.fan_out(&c, members, entry).await?;
            }
            Body::UserSettingsChanged(b) => {
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
                let entry = self.entry("settings", json!({"muted": b.muted, "pinned": b.pinned}));
                self.fan_out(&c, vec![user], entry).await?;
            }
            Body::MessageSent(b) => {
                let c = cid(&b.conversation_id)?;
                let sender = uid(&self.ev.actor)?;
                let mut entry = self.entry("message", serde_json::Value::Null);
                entry.msg_type = b.msg_type.clone();
                entry.body_json = b.body_json.clone();
                entry.client_msg_id = b.client_msg_id.clone();
                self.append_timeline(&c, &entry).await?;
                let locator = MessageLocator {
                    conversation_id: c.to_string(),
                    order_key: self.version.clone(),
                    sender: sender.to_string(),
                };
                self.put_record(self.keys.message(&self.order_key.event_id), &locator);
                let members = self.members(&c).await?;
                if members.len() > self.cfg.read_diffusion_threshold {
                    self.fan_out_coalesced(&c, members, &sender, entry).await?;
                } else {
                    self.fan_out(&c, members, entry).await?;
                }
            }
            Body::MessageRecalled(b) => {
                let c = cid(&b.conversation_id)?;
                let msg = EventId::from_bytes(&b.message_id)?;
                let key = self.keys.recall(&c, &msg);
                let mut rec: RecallRecord = self.record_or_default(&key).await?;
                if self.version > rec.version {
                    rec.version = self.version.clone();
                    rec.actor = self.ev.actor.clone();
                    self.put_record(key, &rec);
                }
                let entry = self.entry("recall", json!({"message_id": msg.to_string()}));
                self.append_timeline(&c, &entry).await?;
                let members = self.members(&c).await?;
                self.fan_out(&c, members, entry).await?;
            }
            Body::MessageDeletedForMe(b) => {
                let c = cid(&b.conversation_id)?;
                let msg = EventId::from_bytes(&b.message_id)?;
                let user = uid(&b.user_id)?;
                self.put(self.keys.hidden_message(&c, &user, &msg), Vec::new());
                let entry = self.entry("message_deleted", json!({"message_id": msg.to_string()}));
                self.fan_out(&c, vec![user], entry).await?;
            }
            Body::ReadIndexSet(b) => {
                let c = cid(&b.conversation_id)?;
                let user = uid(&b.user_id)?;
                let read_at = OrderKey::from_bytes(&b.order_key)?;
                let key = self.keys.read_index(&c, &user);
                let mut cur = self.get(&key).await?.unwrap_or_default();
                if max_into(&mut cur, &b.order_key) {
                    self.put(key, cur);
                    let entry = self.entry(
                        "read",
                        json!({"user_id": user.as_str(), "cursor": read_at.cursor().as_str()}),
                    );
                    self.fan_out(&c, vec![user], entry).await?;
                }
            }
            Body::DeviceRegistered(b) => {
                let user = uid(&b.user_id)?;
                meridian_model::DeviceId::parse(b.device_id.as_str())?;
                self.set_device(&user, &b.device_id, true, &b.platform, &b.token)
                    .await?;
            }
            Body::DeviceUnregistered(b) => {
                let user = uid(&b.user_id)?;
                // A token named (push: the provider reported it dead) removes only a
                // registration that still has it; one renewed with a new token stays.
                let key = self.keys.device(&user, &b.device_id);
                let named_token_is_gone = !b.token.is_empty()
                    && self
                        .record::<DeviceRecord>(&key)
                        .await?
                        .is_none_or(|d| d.token != b.token);
                if !named_token_is_gone {
                    self.set_device(&user, &b.device_id, false, "", "").await?;
                }
            }
            Body::RegionFailover(b) => {
                let region = RegionId::parse(b.region.as_str())?;
                let to = RegionId::parse(b.to.as_str())?;
                let serving = if to == region { "" } else { to.as_str() };
                self.set_serving(&region, serving).await?;
            }
            Body::RegionFailback(b) => {
                let region = RegionId::parse(b.region.as_str())?;
                self.set_serving(&region, "").await?;
            }
        }
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
        let cur: Option<DeviceRecord> = self.record(&key).await?;
        if cur.as_ref().is_none_or(|c| c.version < self.version) {
            let rec = DeviceRecord {
                version: self.version.clone(),
                active,
                platform: platform.into(),
                token: token.into(),
            };
            self.put_record(key, &rec);
        }
        Ok(())
    }

    async fn set_serving(&mut self, region: &RegionId, serving: &str) -> Result<()> {
        let key = self.keys.region(region);
        let mut rec: RegionRecord = self.record_or_default(&key).await?;
        if lww(&mut rec.serving, self.str_reg(serving)) {
            self.put_record(key, &rec);
        }
        Ok(())
    }

    /// For each user, the inbox epoch if this region serves them, else `None`.
    async fn served_epochs(&mut self, users: &[UserId]) -> Result<Vec<Option<String>>> {
        let user_keys: Vec<Vec<u8>> = users.iter().map(|u| self.keys.user(u)).collect();
        let found = self.view.batch_get(&user_keys).await?;
        let mut region_cache: HashMap<String, (RegionId, Vec<u8>)> = HashMap::new();
        let mut out = Vec::with_capacity(users.len());
        for (k, v) in user_keys.iter().zip(found) {
            let home = match v {
                Some(v) => decode::<UserRecord>(k, &v)?.home_region.map(|r| r.value),
                None => None,
            };
            let Some(home) = home else {
                out.push(None);
                continue;
            };
            if !region_cache.contains_key(&home) {
                let home_id = RegionId::parse(home.as_str())?;
                let rkey = self.keys.region(&home_id);
                let rec: RegionRecord = self.record_or_default(&rkey).await?;
                let (serving, version) = match rec.serving {
                    Some(s) if !s.value.is_empty() => (RegionId::parse(s.value)?, s.version),
                    Some(s) => (home_id, s.version),
                    None => (home_id, Vec::new()),
                };
                region_cache.insert(home.clone(), (serving, version));
            }
            let (serving, version) = &region_cache[&home];
            out.push((*serving == self.cfg.region).then(|| inbox_epoch(serving, version)));
        }
        Ok(out)
    }

    /// Appends `entry` to the inbox of every user in `users` this region serves.
    async fn fan_out(
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
    async fn fan_out_coalesced(
        &mut self,
        cid: &ConversationId,
        users: Vec<UserId>,
        sender: &UserId,
        entry: TimelineEntry,
    ) -> Result<()> {
        let epochs = self.served_epochs(&users).await?;
        let (entry, in_timeline) = self.shared_entry(cid, entry);
        // Not in the timeline (the message is, under the same order key): stored inline.
        let advanced = Arc::new(self.entry("conversation_advanced", serde_json::Value::Null));
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
