//! The newest version a state change would overwrite, for the clock that stamps it.
//!
//! Replicated state merges by last-writer-wins on `(hlc, origin, event_id)` (docs/design.md
//! §4). A gateway whose clock is behind what is stored (restarted on a wall clock that
//! stepped back, or lagging a region whose events it applied) would stamp a change below the
//! version it replaces: the change is dropped by the merge while the call answers 200, or a
//! new message sorts before ones already stored. So before stamping, the gateway observes the
//! highest version among the records the event will overwrite, which this module reads.

use meridian_model::events::event_envelope::Body;
use meridian_model::{ConversationId, Hlc, RegionId, UserId};

use crate::records::*;
use crate::{Result, Store};

/// The HLC of a version (order-key bytes start with the HLC, big-endian).
fn hlc_of(version: &[u8]) -> Option<u64> {
    let bytes: [u8; 8] = version.get(..8)?.try_into().ok()?;
    Some(u64::from_be_bytes(bytes))
}

fn reg_hlc<R: Versioned>(reg: &Option<R>) -> Option<u64> {
    reg.as_ref().and_then(|r| hlc_of(r.version()))
}

/// What to read for one event body.
enum Source {
    /// The conversation's activity: the highest order key of its timeline, which is at or
    /// above the version of every conversation and member register (each change to those
    /// appends a timeline entry) and of every message.
    Activity(ConversationId),
    /// Activity plus the user's settings registers (settings append no timeline entry).
    Settings(ConversationId, UserId),
    User(UserId),
    Device(UserId, String),
    Region(RegionId),
}

fn source(body: &Body) -> Option<Source> {
    let conv = |c: &str| ConversationId::parse(c.to_string()).ok();
    let user = |u: &str| UserId::parse(u.to_string()).ok();
    Some(match body {
        Body::ConversationCreated(b) => Source::Activity(conv(&b.conversation_id)?),
        Body::ConversationUpdated(b) => Source::Activity(conv(&b.conversation_id)?),
        Body::ConversationDissolved(b) => Source::Activity(conv(&b.conversation_id)?),
        Body::ConversationHidden(b) => Source::Activity(conv(&b.conversation_id)?),
        Body::MembersAdded(b) => Source::Activity(conv(&b.conversation_id)?),
        Body::MemberRemoved(b) => Source::Activity(conv(&b.conversation_id)?),
        Body::MemberRoleChanged(b) => Source::Activity(conv(&b.conversation_id)?),
        Body::MessageSent(b) => Source::Activity(conv(&b.conversation_id)?),
        Body::MessageRecalled(b) => Source::Activity(conv(&b.conversation_id)?),
        Body::MessageDeletedForMe(b) => Source::Activity(conv(&b.conversation_id)?),
        Body::ReadIndexSet(b) => Source::Activity(conv(&b.conversation_id)?),
        Body::UserSettingsChanged(b) => Source::Settings(conv(&b.conversation_id)?, user(&b.user_id)?),
        Body::UserUpserted(b) => Source::User(user(&b.user_id)?),
        Body::DeviceRegistered(b) => Source::Device(user(&b.user_id)?, b.device_id.clone()),
        Body::DeviceUnregistered(b) => Source::Device(user(&b.user_id)?, b.device_id.clone()),
        Body::RegionFailover(b) => Source::Region(RegionId::parse(b.region.as_str()).ok()?),
        Body::RegionFailback(b) => Source::Region(RegionId::parse(b.region.as_str()).ok()?),
    })
}

impl Store {
    /// The highest HLC among the versions an event with `body` would overwrite or must sort
    /// after (`None` when nothing is stored yet). A caller stamping the event observes it
    /// first, so the event's version is above it.
    pub async fn overwritten_version(&self, body: &Body) -> Result<Option<Hlc>> {
        let Some(source) = source(body) else {
            return Ok(None);
        };
        let keys = self.keys();
        // The newest version of each, not a snapshot: read on every send, so through the
        // backend's latest-value read (the embedded store's read cache).
        let wanted = match &source {
            Source::Activity(c) => vec![keys.activity(c)],
            Source::Settings(c, u) => vec![keys.activity(c), keys.settings(c, u)],
            Source::User(u) => vec![keys.user(u)],
            Source::Device(u, d) => vec![keys.device(u, d)],
            Source::Region(r) => vec![keys.region(r)],
        };
        let found = self.kv().get_latest(&wanted).await?;
        let value = |i: usize| found.get(i).cloned().flatten();
        let versions: Vec<Option<u64>> = match &source {
            Source::Activity(_) => vec![value(0).and_then(|v| hlc_of(&v))],
            Source::Settings(c, u) => {
                let mut out = vec![value(0).and_then(|v| hlc_of(&v))];
                if let Some(v) = value(1) {
                    let rec: SettingsRecord = decode(&keys.settings(c, u), &v)?;
                    out.extend([reg_hlc(&rec.muted), reg_hlc(&rec.pinned), hlc_of(&rec.hidden_at)]);
                }
                out
            }
            Source::User(u) => match value(0) {
                Some(v) => {
                    let rec: UserRecord = decode(&keys.user(u), &v)?;
                    vec![reg_hlc(&rec.home_region), reg_hlc(&rec.display_name)]
                }
                None => Vec::new(),
            },
            Source::Device(u, d) => match value(0) {
                Some(v) => {
                    let rec: DeviceRecord = decode(&keys.device(u, d), &v)?;
                    // A registration must also sort after a report that its token is dead.
                    let reports = rec.dead_tokens.iter().map(|t| hlc_of(&t.version));
                    std::iter::once(hlc_of(&rec.version)).chain(reports).collect()
                }
                None => Vec::new(),
            },
            Source::Region(r) => match value(0) {
                Some(v) => {
                    let rec: RegionRecord = decode(&keys.region(r), &v)?;
                    vec![reg_hlc(&rec.serving)]
                }
                None => Vec::new(),
            },
        };
        Ok(versions.into_iter().flatten().max().map(Hlc))
    }
}
