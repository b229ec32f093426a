//! The key layout. Every key starts with the store's namespace (empty in production, unique
//! per test), then a one-byte tag naming the record family, then its parts joined by `/`.
//! Ids never contain `/` (user, device and region ids are `[A-Za-z0-9_.-]`, conversation ids
//! are hex), so a prefix scan of `tag/id/` sees exactly that id's records.
//!
//! Replicated families (identical in every region once mirrors catch up, covered by the
//! digest) all carry the conversation id right after the tag where they belong to one, so a
//! conversation's digest is a handful of prefix scans:
//!
//! | tag | key                        | record                                   |
//! |-----|----------------------------|------------------------------------------|
//! | `T` | T/cid/order_key            | storage timeline entry                   |
//! | `C` | C/cid                      | conversation fields (LWW registers)      |
//! | `B` | B/cid/uid                  | membership + role (LWW registers)        |
//! | `I` | I/cid/uid                  | read index (max register)                |
//! | `R` | R/cid/msg_id               | recall tombstone                         |
//! | `H` | H/cid/uid/msg_id           | deleted-for-me marker                    |
//! | `S` | S/cid/uid                  | per-user settings (LWW) + hidden mark    |
//! | `M` | M/msg_id                   | message locator (cid, order key)         |
//! | `U` | U/uid                      | directory entry (LWW registers)          |
//! | `V` | V/uid/device               | push device (LWW)                        |
//! | `G` | G/region                   | region serving state (LWW)               |
//!
//! Derived or region-local families (not in the digest):
//! `L/uid/cid` the user's conversations, `A/cid` last activity, `E/event_id` applied
//! events, `P/stream` applied checkpoints, `X/uid` inbox head, `Y/uid/seq` inbox entries,
//! `W/uid/cid` read-diffusion coalescing window, `Q/cid` read-diffusion activity no member
//! has been told of yet (see `coalesce.rs`), `K/uid/digest` a client's idempotency key
//! (digest of route and key; see `requests.rs`), `N/cid` the current member list (derived
//! from `B/cid/*` in the same transactions that change it, so fan-out is one point read
//! instead of a range scan; conversations from before it existed fall back to the scan),
//! `J/cid` the highest version of any membership change applied to the conversation (a max
//! register: fan-out at an order key above it may use the current member list),
//! `F/stream/instance/seq` the search feed: a message the applier committed from that stream
//! position, until the region's search indexer has committed it (see `search_feed.rs`).

use meridian_model::{ConversationId, EventId, OrderKey, RegionId, UserId};

pub const REPLICATED_TAGS: &[u8] = b"TCBIRHSMUVG";
/// Replicated families keyed by conversation id first.
pub const CONVERSATION_TAGS: &[u8] = b"TCBIRHS";

#[derive(Debug, Clone)]
pub struct Keys {
    ns: Vec<u8>,
}

impl Keys {
    pub fn new(namespace: &[u8]) -> Self {
        Self {
            ns: namespace.to_vec(),
        }
    }

    pub fn namespace(&self) -> &[u8] {
        &self.ns
    }

    fn key(&self, tag: u8, parts: &[&[u8]]) -> Vec<u8> {
        let len = self.ns.len() + 1 + parts.iter().map(|p| p.len() + 1).sum::<usize>();
        let mut k = Vec::with_capacity(len);
        k.extend_from_slice(&self.ns);
        k.push(tag);
        for p in parts {
            k.push(b'/');
            k.extend_from_slice(p);
        }
        k
    }

    /// `tag/` followed by the parts, each followed by `/`: the prefix of everything below.
    pub fn prefix(&self, tag: u8, parts: &[&[u8]]) -> Vec<u8> {
        let mut k = self.key(tag, parts);
        k.push(b'/');
        k
    }

    /// Everything in one family.
    pub fn family(&self, tag: u8) -> Vec<u8> {
        self.prefix(tag, &[])
    }

    pub fn timeline(&self, cid: &ConversationId, key: &OrderKey) -> Vec<u8> {
        self.key(b'T', &[cid.as_str().as_bytes(), &key.to_bytes()])
    }
    pub fn timeline_prefix(&self, cid: &ConversationId) -> Vec<u8> {
        self.prefix(b'T', &[cid.as_str().as_bytes()])
    }
    pub fn conversation(&self, cid: &ConversationId) -> Vec<u8> {
        self.key(b'C', &[cid.as_str().as_bytes()])
    }
    pub fn member(&self, cid: &ConversationId, uid: &UserId) -> Vec<u8> {
        self.key(b'B', &[cid.as_str().as_bytes(), uid.as_str().as_bytes()])
    }
    pub fn members_prefix(&self, cid: &ConversationId) -> Vec<u8> {
        self.prefix(b'B', &[cid.as_str().as_bytes()])
    }
    pub fn read_index(&self, cid: &ConversationId, uid: &UserId) -> Vec<u8> {
        self.key(b'I', &[cid.as_str().as_bytes(), uid.as_str().as_bytes()])
    }
    pub fn read_index_prefix(&self, cid: &ConversationId) -> Vec<u8> {
        self.prefix(b'I', &[cid.as_str().as_bytes()])
    }
    pub fn recall(&self, cid: &ConversationId, msg: &EventId) -> Vec<u8> {
        self.key(b'R', &[cid.as_str().as_bytes(), msg.as_bytes()])
    }
    pub fn hidden_message(&self, cid: &ConversationId, uid: &UserId, msg: &EventId) -> Vec<u8> {
        self.key(
            b'H',
            &[cid.as_str().as_bytes(), uid.as_str().as_bytes(), msg.as_bytes()],
        )
    }
    pub fn settings(&self, cid: &ConversationId, uid: &UserId) -> Vec<u8> {
        self.key(b'S', &[cid.as_str().as_bytes(), uid.as_str().as_bytes()])
    }
    /// A message's locator; also the applied marker of its `MessageSent` event.
    pub fn message(&self, msg: &EventId) -> Vec<u8> {
        self.key(b'M', &[msg.as_bytes()])
    }
    pub fn user(&self, uid: &UserId) -> Vec<u8> {
        self.key(b'U', &[uid.as_str().as_bytes()])
    }
    pub fn device(&self, uid: &UserId, device: &str) -> Vec<u8> {
        self.key(b'V', &[uid.as_str().as_bytes(), device.as_bytes()])
    }
    pub fn devices_prefix(&self, uid: &UserId) -> Vec<u8> {
        self.prefix(b'V', &[uid.as_str().as_bytes()])
    }
    pub fn region(&self, region: &RegionId) -> Vec<u8> {
        self.key(b'G', &[region.as_str().as_bytes()])
    }
    pub fn user_conversation(&self, uid: &UserId, cid: &ConversationId) -> Vec<u8> {
        self.key(b'L', &[uid.as_str().as_bytes(), cid.as_str().as_bytes()])
    }
    pub fn user_conversations_prefix(&self, uid: &UserId) -> Vec<u8> {
        self.prefix(b'L', &[uid.as_str().as_bytes()])
    }
    pub fn activity(&self, cid: &ConversationId) -> Vec<u8> {
        self.key(b'A', &[cid.as_str().as_bytes()])
    }
    /// The applied marker of every event but `MessageSent` (see [`Keys::message`]).
    pub fn applied_event(&self, id: &EventId) -> Vec<u8> {
        self.key(b'E', &[id.as_bytes()])
    }
    pub fn checkpoint(&self, stream: &str) -> Vec<u8> {
        self.key(b'P', &[stream.as_bytes()])
    }
    pub fn inbox_head(&self, uid: &UserId) -> Vec<u8> {
        self.key(b'X', &[uid.as_str().as_bytes()])
    }
    pub fn inbox_entry(&self, uid: &UserId, seq: u64) -> Vec<u8> {
        self.key(b'Y', &[uid.as_str().as_bytes(), &seq.to_be_bytes()])
    }
    pub fn coalesce_window(&self, uid: &UserId, cid: &ConversationId) -> Vec<u8> {
        self.key(b'W', &[uid.as_str().as_bytes(), cid.as_str().as_bytes()])
    }
    /// A read-diffusion conversation with messages some members were not notified of.
    pub fn coalesce_pending(&self, cid: &ConversationId) -> Vec<u8> {
        self.key(b'Q', &[cid.as_str().as_bytes()])
    }

    /// An idempotency key of `uid`'s: `digest` covers the route and the key.
    pub fn request(&self, uid: &UserId, digest: &str) -> Vec<u8> {
        self.key(b'K', &[uid.as_str().as_bytes(), digest.as_bytes()])
    }

    /// The highest membership-change version applied to `cid` (see the module table).
    pub fn membership_changed(&self, cid: &ConversationId) -> Vec<u8> {
        self.key(b'J', &[cid.as_str().as_bytes()])
    }

    /// The search feed entry of a message applied from `stream`'s `instance` at `seq`.
    pub fn search_feed(&self, stream: &str, instance: u64, seq: u64) -> Vec<u8> {
        self.key(
            b'F',
            &[stream.as_bytes(), &instance.to_be_bytes(), &seq.to_be_bytes()],
        )
    }
    pub fn search_feed_prefix(&self, stream: &str, instance: u64) -> Vec<u8> {
        self.prefix(b'F', &[stream.as_bytes(), &instance.to_be_bytes()])
    }

    pub fn member_list(&self, cid: &ConversationId) -> Vec<u8> {
        self.key(b'N', &[cid.as_str().as_bytes()])
    }
    pub fn suffix<'a>(&self, prefix: &[u8], key: &'a [u8]) -> &'a [u8] {
        &key[prefix.len().min(key.len())..]
    }
}
