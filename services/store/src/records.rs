//! Stored records (prost-encoded) and the merge rules of docs/design.md §4. Every
//! replicated record merges deterministically: last-writer-wins registers compare versions,
//! which are order-key bytes `(hlc, origin, event_id)`, so every region picks the same
//! winner whatever order events arrive in.

use meridian_model::events::EntryDetail;
use prost::Message;

use crate::{Result, StoreError};

/// Decode a stored record, naming the key if it is corrupt.
pub fn decode<M: Message + Default>(key: &[u8], bytes: &[u8]) -> Result<M> {
    M::decode(bytes).map_err(|e| StoreError::corrupt(key, e))
}

/// A last-writer-wins string register.
#[derive(Clone, PartialEq, Message)]
pub struct StrReg {
    #[prost(string, tag = "1")]
    pub value: String,
    #[prost(bytes = "vec", tag = "2")]
    pub version: Vec<u8>,
}

/// A last-writer-wins bool register.
#[derive(Clone, PartialEq, Message)]
pub struct BoolReg {
    #[prost(bool, tag = "1")]
    pub value: bool,
    #[prost(bytes = "vec", tag = "2")]
    pub version: Vec<u8>,
}

/// A last-writer-wins integer register (roles).
#[derive(Clone, PartialEq, Message)]
pub struct IntReg {
    #[prost(int32, tag = "1")]
    pub value: i32,
    #[prost(bytes = "vec", tag = "2")]
    pub version: Vec<u8>,
}

/// Registers that carry a version.
pub trait Versioned {
    fn version(&self) -> &[u8];
}
impl Versioned for StrReg {
    fn version(&self) -> &[u8] {
        &self.version
    }
}
impl Versioned for BoolReg {
    fn version(&self) -> &[u8] {
        &self.version
    }
}
impl Versioned for IntReg {
    fn version(&self) -> &[u8] {
        &self.version
    }
}

/// Last writer wins: replace `slot` when `new` is newer. Returns whether it changed.
pub fn lww<R: Versioned>(slot: &mut Option<R>, new: R) -> bool {
    match slot {
        Some(cur) if cur.version() >= new.version() => false,
        _ => {
            *slot = Some(new);
            true
        }
    }
}

/// Max register over byte strings (read indexes, activity, hide marks).
pub fn max_into(slot: &mut Vec<u8>, new: &[u8]) -> bool {
    if new > slot.as_slice() {
        *slot = new.to_vec();
        true
    } else {
        false
    }
}

/// One entry of a storage timeline: a message or a message/conversation state change.
#[derive(Clone, PartialEq, Message)]
pub struct TimelineEntry {
    /// `message`, `recall`, `conversation_created`, `member_added`, ...
    #[prost(string, tag = "1")]
    pub kind: String,
    #[prost(bytes = "vec", tag = "2")]
    pub event_id: Vec<u8>,
    #[prost(string, tag = "3")]
    pub actor: String,
    /// HLC physical time of the event, ms since the epoch.
    #[prost(uint64, tag = "4")]
    pub at_ms: u64,
    #[prost(string, tag = "5")]
    pub msg_type: String,
    #[prost(string, tag = "6")]
    pub body_json: String,
    #[prost(string, tag = "7")]
    pub client_msg_id: String,
    /// Written before details were typed: what changed, as JSON with the API's field names.
    /// Never written now; readers fall back to it when `detail` is absent.
    #[prost(string, tag = "8")]
    pub detail_json: String,
    /// For state changes: what changed, typed (the gateway names the fields).
    #[prost(message, optional, tag = "9")]
    pub detail: Option<EntryDetail>,
}

/// Where a message lives; its presence also marks the send as applied.
#[derive(Clone, PartialEq, Message)]
pub struct MessageLocator {
    #[prost(string, tag = "1")]
    pub conversation_id: String,
    #[prost(bytes = "vec", tag = "2")]
    pub order_key: Vec<u8>,
    #[prost(string, tag = "3")]
    pub sender: String,
}

#[derive(Clone, PartialEq, Message)]
pub struct RecallRecord {
    /// Version of the winning recall (max).
    #[prost(bytes = "vec", tag = "1")]
    pub version: Vec<u8>,
    #[prost(string, tag = "2")]
    pub actor: String,
}

#[derive(Clone, PartialEq, Message)]
pub struct ConversationRecord {
    /// `meridian.v1.ConversationKind` as i32; the same for every creator of one id.
    #[prost(int32, tag = "1")]
    pub kind: i32,
    /// The earliest creation wins `created`/`created_by` (a min register).
    #[prost(bytes = "vec", tag = "2")]
    pub created: Vec<u8>,
    #[prost(string, tag = "3")]
    pub created_by: String,
    #[prost(message, optional, tag = "4")]
    pub name: Option<StrReg>,
    #[prost(message, optional, tag = "5")]
    pub announcement: Option<StrReg>,
    #[prost(message, optional, tag = "6")]
    pub members_can_add: Option<BoolReg>,
    #[prost(message, optional, tag = "7")]
    pub dissolved: Option<BoolReg>,
}

#[derive(Clone, PartialEq, Message)]
pub struct MemberRecord {
    /// The membership now: the last writer among `history`.
    #[prost(message, optional, tag = "1")]
    pub member: Option<BoolReg>,
    /// `meridian.v1.MemberRole` as i32.
    #[prost(message, optional, tag = "2")]
    pub role: Option<IntReg>,
    /// Every membership change applied (adds, removals, creations), sorted by version, one
    /// per version: a set, so the same in every region once the same events are applied,
    /// whatever their order. Fan-out and inbox reads ask it for the membership in force at
    /// an event's order key (docs/design.md §4), not the membership at apply time. Empty
    /// in records written before it existed ([`MemberRecord::member_at`] then knows nothing).
    #[prost(message, repeated, tag = "3")]
    pub history: Vec<MemberChange>,
}

/// One membership change of a [`MemberRecord`]'s history.
#[derive(Clone, PartialEq, Message)]
pub struct MemberChange {
    #[prost(bytes = "vec", tag = "1")]
    pub version: Vec<u8>,
    #[prost(bool, tag = "2")]
    pub member: bool,
}

/// What recording one membership change found.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RecordedChange {
    /// False when the history had this version already (a redelivery).
    pub inserted: bool,
    /// The membership in force just before the change's version.
    pub before: bool,
    /// The version of the next change after it, if any: the change decides the membership
    /// at order keys from its version up to that one.
    pub next: Option<Vec<u8>>,
}

impl MemberRecord {
    pub fn is_member(&self) -> bool {
        self.member.as_ref().is_some_and(|m| m.value)
    }

    /// The membership in force at order key `key` (a change at `key` itself counts), or
    /// `None` for a record from before histories were kept.
    pub fn member_at(&self, key: &[u8]) -> Option<bool> {
        if self.history.is_empty() {
            return None;
        }
        let after = self.history.partition_point(|c| c.version.as_slice() <= key);
        Some(after > 0 && self.history[after - 1].member)
    }

    /// Adds a change at `version` to the history (a record from before histories starts
    /// its history with its register). The `member` register is left to the caller's LWW.
    pub fn record_change(&mut self, version: &[u8], member: bool) -> RecordedChange {
        if self.history.is_empty() {
            if let Some(reg) = &self.member {
                self.history.push(MemberChange {
                    version: reg.version.clone(),
                    member: reg.value,
                });
            }
        }
        let at = self.history.partition_point(|c| c.version.as_slice() < version);
        let before = at > 0 && self.history[at - 1].member;
        let exists = self.history.get(at).is_some_and(|c| c.version == version);
        if !exists {
            self.history.insert(
                at,
                MemberChange {
                    version: version.to_vec(),
                    member,
                },
            );
        }
        RecordedChange {
            inserted: !exists,
            before,
            next: self.history.get(at + 1).map(|c| c.version.clone()),
        }
    }
    /// `meridian.v1.MemberRole` as i32; a member no creation or role change gave a role to
    /// (added later) is a plain member.
    pub fn role(&self) -> i32 {
        self.role
            .as_ref()
            .map_or(meridian_model::events::MemberRole::Member as i32, |r| r.value)
    }
}

#[derive(Clone, PartialEq, Message)]
pub struct SettingsRecord {
    #[prost(message, optional, tag = "1")]
    pub muted: Option<BoolReg>,
    #[prost(message, optional, tag = "2")]
    pub pinned: Option<BoolReg>,
    /// Version of the latest hide (max register); hidden while no activity is newer.
    #[prost(bytes = "vec", tag = "3")]
    pub hidden_at: Vec<u8>,
}

#[derive(Clone, PartialEq, Message)]
pub struct UserRecord {
    #[prost(message, optional, tag = "1")]
    pub home_region: Option<StrReg>,
    #[prost(message, optional, tag = "2")]
    pub display_name: Option<StrReg>,
}

/// A push device: a last-writer-wins register over registrations and unregistrations
/// (`version`, `registered`, `platform`, `token`), plus the tokens push providers reported
/// dead after it. A report names a token, so it is not a plain write: it deactivates the
/// registration of that token ordered before it, not a renewal with a new token, whatever
/// order the two arrive in.
#[derive(Clone, PartialEq, Message)]
pub struct DeviceRecord {
    #[prost(bytes = "vec", tag = "1")]
    pub version: Vec<u8>,
    /// Whether the device gets pushes: `registered`, unless its token was reported dead by
    /// a report newer than the registration.
    #[prost(bool, tag = "2")]
    pub active: bool,
    #[prost(string, tag = "3")]
    pub platform: String,
    #[prost(string, tag = "4")]
    pub token: String,
    /// Per token reported dead, the newest report's version, kept while newer than
    /// `version` (an older report can never matter again: the register only moves up), so
    /// the set is the same in every region once the same events are applied.
    #[prost(message, repeated, tag = "5")]
    pub dead_tokens: Vec<DeadToken>,
    /// What the last registration or unregistration said. Records from before reports
    /// were kept lack it: their `active` says it.
    #[prost(bool, tag = "6")]
    pub registered: bool,
}

#[derive(Clone, PartialEq, Message)]
pub struct DeadToken {
    #[prost(string, tag = "1")]
    pub token: String,
    #[prost(bytes = "vec", tag = "2")]
    pub version: Vec<u8>,
}

impl DeviceRecord {
    /// Records a report at `version` that `token` is dead. Returns whether it changed.
    pub fn report_dead(&mut self, token: &str, version: &[u8]) -> bool {
        if version <= self.version.as_slice() {
            return false;
        }
        // A record from before reports were kept: its `active` was the register's value.
        self.registered |= self.active;
        match self.dead_tokens.iter_mut().find(|d| d.token == token) {
            Some(d) if d.version.as_slice() >= version => return false,
            Some(d) => d.version = version.to_vec(),
            None => {
                let at = self.dead_tokens.partition_point(|d| d.token.as_str() < token);
                self.dead_tokens.insert(
                    at,
                    DeadToken {
                        token: token.to_string(),
                        version: version.to_vec(),
                    },
                );
            }
        }
        self.settle();
        true
    }

    /// After the register moved: drops the reports it overtook and works out `active`.
    pub fn settle(&mut self) {
        let version = self.version.clone();
        self.dead_tokens.retain(|d| d.version > version);
        let reported_dead = self.dead_tokens.iter().any(|d| d.token == self.token);
        self.active = self.registered && !reported_dead;
    }
}

#[derive(Clone, PartialEq, Message)]
pub struct RegionRecord {
    /// Region serving this region's users; empty when it serves them itself.
    #[prost(message, optional, tag = "1")]
    pub serving: Option<StrReg>,
    /// The failover point of the failover that set `serving` (empty after a failback): how
    /// far the acting region had applied each stream; written with the register, so the
    /// winning event's point is the one kept.
    #[prost(message, repeated, tag = "2")]
    pub failover_point: Vec<meridian_model::events::StreamPosition>,
}

/// The head of one user's inbox in the region serving them.
#[derive(Clone, PartialEq, Message)]
pub struct InboxHead {
    #[prost(string, tag = "1")]
    pub epoch: String,
    /// Last seq handed out (0 when empty).
    #[prost(uint64, tag = "2")]
    pub head: u64,
    /// Oldest seq still retained; `head + 1` when every entry has expired.
    #[prost(uint64, tag = "3")]
    pub oldest: u64,
    /// Seqs an earlier epoch may have left above `head`, up to this one (0: none). A new
    /// epoch restarts at seq 1 and overwrites the old entries as it goes; the ones above its
    /// head are garbage that the sweeper deletes in bounded chunks, so an epoch change never
    /// deletes a whole inbox in one transaction (`inbox::Store::sweep_stale_epoch`).
    #[prost(uint64, tag = "4")]
    pub stale_through: u64,
}

/// One inbox (sync timeline) entry.
///
/// As stored, an entry that is also in its conversation's storage timeline (messages,
/// conversation and membership changes) has no `entry`: it references the timeline entry
/// at (`conversation_id`, `order_key`), so a message to a group is stored once instead of
/// once per member. Entries that exist only in the inbox (settings, read marks, hides,
/// read-diffusion notices, all small) carry their `entry` inline, as did every entry written
/// before references existed. `Store::read_inbox` returns entries with `entry` filled in.
#[derive(Clone, PartialEq, Message)]
pub struct InboxEntry {
    #[prost(uint64, tag = "1")]
    pub seq: u64,
    #[prost(string, tag = "2")]
    pub conversation_id: String,
    #[prost(bytes = "vec", tag = "3")]
    pub order_key: Vec<u8>,
    /// Local wall time of the append; the TTL counts from here.
    #[prost(uint64, tag = "4")]
    pub appended_at_ms: u64,
    #[prost(message, optional, tag = "5")]
    pub entry: Option<TimelineEntry>,
}
