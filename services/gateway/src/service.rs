//! What a client call does, whichever transport carried it. The HTTP handlers (`routes/`)
//! and the WebSocket frames (`ws`) both go through here, so a limit enforced here holds for
//! both: the per-user rate limit, membership, send validation and the message size limit,
//! send idempotency, inbox pages, the typing fan-out bound and the per-user socket cap.
//!
//! Everything answers [`ApiError`]; each transport renders it its own way (an HTTP status and
//! body, or an `error` frame carrying the same code).

use std::sync::Arc;

use axum::http::StatusCode;
use meridian_bus::Durability;
use meridian_model::events::{self, event_envelope::Body, MemberRole};
use meridian_model::{ConversationId, EventId, OrderKey, UserId};
use meridian_store::inbox::SyncOutcome;
use serde::{Deserialize, Serialize};
use serde_json::{json, Value};

use crate::error::{ApiError, ApiResult};
use crate::extract::Caller;
use crate::live::Hub;
use crate::render;
use crate::state::AppState;

pub const MAX_CLIENT_MSG_ID: usize = 128;
pub const MAX_TYPE: usize = 32;
/// Typing is relayed in conversations of at most this many members: in bigger groups it is
/// noise, and each frame would cost one publish per member.
pub const MAX_TYPING_MEMBERS: usize = 100;

/// Takes one request's worth of the user's rate limit: every HTTP call and every WebSocket
/// frame pays it.
pub fn admit(s: &AppState, user: &UserId) -> ApiResult<()> {
    s.limiter.check(user.as_str()).map_err(|wait| {
        s.metrics.rate_limited.inc();
        ApiError::rate_limited(wait)
    })
}

/// The caller's role in `cid`, or 404 for non-members and unknown ids alike.
pub async fn require_member(
    s: &AppState,
    cid: &str,
    user: &UserId,
) -> ApiResult<(ConversationId, MemberRole)> {
    let cid = ConversationId::parse(cid.to_string())?;
    match s.store.member_role(&cid, user).await? {
        Some(role) => Ok((cid, role)),
        None => Err(ApiError::conversation_not_found()),
    }
}

/// A send, as POST's body or a `send` frame's fields carry it.
#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
pub struct SendMessage {
    pub client_msg_id: String,
    #[serde(rename = "type", default = "default_type")]
    pub msg_type: String,
    pub body: Value,
}

fn default_type() -> String {
    "text".into()
}

impl SendMessage {
    fn validate(&self) -> ApiResult<()> {
        if self.client_msg_id.is_empty()
            || self.client_msg_id.len() > MAX_CLIENT_MSG_ID
            || self.client_msg_id.chars().any(|c| c.is_control())
        {
            return Err(ApiError::bad_request(
                "invalid_argument",
                format!("client_msg_id must be 1-{MAX_CLIENT_MSG_ID} bytes without control characters"),
            )
            .with("field", "client_msg_id"));
        }
        if self.msg_type.is_empty()
            || self.msg_type.len() > MAX_TYPE
            || !self
                .msg_type
                .chars()
                .all(|c| c.is_ascii_alphanumeric() || "_.-/".contains(c))
        {
            return Err(ApiError::bad_request(
                "invalid_argument",
                format!("type must be 1-{MAX_TYPE} characters of [A-Za-z0-9_.-/]"),
            )
            .with("field", "type"));
        }
        if !self.body.is_object() {
            return Err(
                ApiError::bad_request("invalid_argument", "body must be a JSON object").with("field", "body"),
            );
        }
        Ok(())
    }
}

/// The answer to an accepted send (HTTP 202, WebSocket `ack`).
#[derive(Debug, Serialize)]
pub struct Accepted {
    pub message_id: String,
    pub cursor: String,
    pub accepted_at: u64,
    /// The durability level met (docs/design.md §6): `process`, `disk` or `geo`.
    pub durability: Durability,
}

impl Accepted {
    fn new(id: &EventId, key: &OrderKey, durability: Durability) -> Self {
        Accepted {
            message_id: id.to_string(),
            cursor: key.cursor().as_str().to_string(),
            accepted_at: key.hlc.physical_ms(),
            durability,
        }
    }
}

/// What a stored send met without waiting for another region: `disk` when this region's
/// JetStream fsyncs before acking, else `process`.
fn local_level(s: &AppState) -> Durability {
    if s.cfg.durability.fsyncs() {
        Durability::Disk
    } else {
        Durability::Process
    }
}

/// For a `geo` send: waits (bounded) until another region's mirror holds this region's
/// stream through `seq`, then answers `geo`; otherwise `503 not_geo_durable`.
async fn geo_confirmed(s: &AppState, seq: u64, id: &EventId) -> ApiResult<Durability> {
    let within = std::time::Duration::from_millis(s.cfg.geo_ack_timeout_ms);
    if s.geo.wait(seq, within).await {
        Ok(Durability::Geo)
    } else {
        Err(crate::durability::not_geo_durable(
            &s.cfg.region,
            local_level(s),
            within,
            &id.to_string(),
        ))
    }
}

/// Validates, publishes and answers a send. The idempotency key is (sender, conversation,
/// client_msg_id), the message id derived from it: a retry with the same key and the same
/// content (type and body) answers with the original message id and cursor; the same key
/// with other content is `409 idempotency_conflict` naming the original. Both hold while the
/// first send is in flight or inside JetStream's duplicate window (the stream answers with
/// the original's seq, and the original is read back from the stream) and after it was
/// applied (the store's copy).
///
/// `requested` is the level the send asks for (`Meridian-Durability`, or the frame's
/// `durability`); the answer says the level met (see [`crate::durability::level_for`]).
pub async fn send_message(
    s: &AppState,
    caller: &Caller,
    cid: &str,
    req: SendMessage,
    requested: Option<Durability>,
) -> ApiResult<Accepted> {
    let cid = ConversationId::parse(cid.to_string())?;
    req.validate()?;
    let level = crate::durability::level_for(s.cfg.durability, requested, s.geo.available())?;
    let body_json = req.body.to_string();
    if body_json.len() > s.cfg.max_body_bytes {
        return Err(ApiError::too_large("message body", s.cfg.max_body_bytes).with("field", "body"));
    }
    // WebSocket sends come here without the HTTP extractor's fence check.
    s.fence.check(s, &caller.view).await?;
    let event_id = EventId::for_message(&caller.user, &cid, &req.client_msg_id);
    // Membership, dissolution and an earlier application, from one snapshot.
    let check = s.store.send_check(&cid, &caller.user, &event_id).await?;
    if check.role.is_none() {
        return Err(ApiError::conversation_not_found());
    }
    // Already applied (a retry, possibly later than the stream's duplicate window): answer
    // from the store, publish nothing.
    if let Some(loc) = check.applied {
        let key = OrderKey::from_bytes(&loc.order_key)?;
        // A recalled message has no body left to compare, and one the sender deleted for
        // themselves is not theirs to read: both answer as the original.
        if let Some(original) = s.store.message(&cid, &caller.user, &event_id).await? {
            if let Some(body) = &original.body_json {
                if !same_content(&original.msg_type, body, &req) {
                    return Err(idempotency_conflict(&event_id));
                }
            }
        }
        let met = if level < Durability::Geo {
            local_level(s)
        } else if key.origin != s.cfg.region {
            // Published by another region (a retry after a failover): that region's stream
            // holds it, and this region's mirror of it did too, or it would not be applied.
            Durability::Geo
        } else {
            // Its sequence here is not recorded; everything of this stream applied here is
            // at or below the checkpoint, so another region holding that much holds it.
            let applied = s.store.checkpoint(&s.bus.stream()).await?;
            geo_confirmed(s, applied, &event_id).await?
        };
        return Ok(Accepted::new(&event_id, &key, met));
    }
    if check.dissolved {
        return Err(ApiError::new(
            StatusCode::CONFLICT,
            "conversation_dissolved",
            "the group was dissolved",
        ));
    }
    let published = s
        .publish(
            Some(caller),
            event_id,
            Body::MessageSent(events::MessageSent {
                conversation_id: cid.to_string(),
                client_msg_id: req.client_msg_id.clone(),
                msg_type: req.msg_type.clone(),
                body_json,
            }),
        )
        .await?;
    // A duplicate: `published` holds the original event, read back from the stream.
    if published.ack.duplicate {
        if let Some(Body::MessageSent(original)) = &published.envelope.body {
            if !same_content(&original.msg_type, &original.body_json, &req) {
                return Err(idempotency_conflict(&event_id));
            }
        }
    }
    let met = if level == Durability::Geo {
        geo_confirmed(s, published.ack.stream_seq, &event_id).await?
    } else {
        local_level(s)
    };
    Ok(Accepted::new(&event_id, &published.order_key()?, met))
}

/// Whether a stored message (type and body JSON) is what `req` sends. Bodies compare as JSON
/// values, so key order and spacing do not matter.
fn same_content(msg_type: &str, body_json: &str, req: &SendMessage) -> bool {
    msg_type == req.msg_type && serde_json::from_str::<Value>(body_json).is_ok_and(|b| b == req.body)
}

fn idempotency_conflict(original: &EventId) -> ApiError {
    ApiError::new(
        StatusCode::CONFLICT,
        "idempotency_conflict",
        "this client_msg_id was already used for another message in this conversation",
    )
    .with("message_id", original.to_string())
}

/// One page of the caller's inbox, or the epoch and head to resync to. `current` is the
/// inbox epoch the directory gives now: a request's own read of the caller is fresh enough,
/// a long-lived WebSocket must read it again (a failover changes it).
pub async fn inbox_page(
    s: &AppState,
    caller: &Caller,
    current: &str,
    epoch: Option<&str>,
    after: u64,
    limit: usize,
) -> ApiResult<Result<Value, (String, u64)>> {
    let epoch = epoch.filter(|e| !e.is_empty());
    match s
        .store
        .read_inbox(&caller.user, current, epoch, after, limit)
        .await?
    {
        SyncOutcome::Page(p) => Ok(Ok(json!({
            "epoch": p.epoch,
            "entries": p
                .entries
                .iter()
                .map(|e| render::inbox_entry(e, p.recalled.contains(&e.seq)))
                .collect::<Vec<_>>(),
            "head": p.head,
            "has_more": p.has_more,
        }))),
        SyncOutcome::ResyncRequired { epoch } => {
            // Where the device continues from after resyncing: the head of the current epoch.
            let head = s
                .store
                .inbox_head(&caller.user)
                .await?
                .filter(|h| h.epoch == epoch)
                .map_or(0, |h| h.head);
            Ok(Err((epoch, head)))
        }
    }
}

pub fn resync_required(epoch: String, head: u64) -> ApiError {
    ApiError::new(
        StatusCode::CONFLICT,
        "resync_required",
        "this checkpoint cannot be continued: resync from the storage timelines",
    )
    .with("epoch", epoch)
    .with("head", head)
}

/// Relays "`caller` is typing in `cid`" to the other members wherever they are served,
/// never stored. Refused in
/// groups of more than [`MAX_TYPING_MEMBERS`]: the size comes from the conversation's one
/// derived member list, so a refusal costs one point read, not a scan of member records.
pub async fn typing(s: &AppState, caller: &Caller, cid: &str) -> ApiResult<()> {
    let (cid, _) = require_member(s, cid, &caller.user).await?;
    let members = match s.store.fan_out_members(&cid).await? {
        Some(members) => members,
        // Conversations from before the derived list existed.
        None => s
            .store
            .conversation(&cid)
            .await?
            .map(|v| v.members.into_iter().map(|m| m.user_id).collect())
            .unwrap_or_default(),
    };
    if members.len() > MAX_TYPING_MEMBERS {
        return Err(ApiError::bad_request(
            "group_too_large",
            format!("typing is relayed in conversations of at most {MAX_TYPING_MEMBERS} members"),
        )
        .with("limit", MAX_TYPING_MEMBERS));
    }
    let frame =
        json!({"op": "typing", "conversation_id": cid.as_str(), "user_id": caller.user.as_str()}).to_string();
    for m in members.iter().filter(|m| **m != caller.user) {
        // To the region serving the member, where its sockets are: over the NATS link when
        // that is another region (docs/design.md §3), never stored.
        let subject = match s.store.user(m).await? {
            Some(view) if view.serving_region != s.cfg.region => {
                s.bus.ephemeral_subject_in(&view.serving_region, m)
            }
            Some(_) => s.bus.ephemeral_subject(m),
            None => continue,
        };
        // Best effort: typing is worth nothing late.
        let _ = s.bus.publish_ephemeral(subject, frame.clone().into()).await;
    }
    Ok(())
}

/// One of a user's WebSocket slots on this gateway; the slot frees (and presence counts one
/// connection less) when it is dropped.
pub struct SocketSlot {
    hub: Arc<Hub>,
    user: UserId,
    /// Becomes `Some` when the user is no longer served here (see [`crate::live::run_fence`]).
    pub fence: tokio::sync::watch::Receiver<Option<crate::extract::WrongRegion>>,
}

impl Drop for SocketSlot {
    fn drop(&mut self) {
        self.hub.disconnected(&self.user);
    }
}

/// Takes one of the caller's WebSocket slots, or refuses with `429 too_many_sockets`.
pub fn open_socket(s: &AppState, caller: &Caller) -> ApiResult<SocketSlot> {
    let cap = s.cfg.max_sockets_per_user;
    let Some(fence) = s.hub.try_connect(&caller.user, cap) else {
        s.metrics.rate_limited.inc();
        return Err(ApiError::new(
            StatusCode::TOO_MANY_REQUESTS,
            "too_many_sockets",
            format!("at most {cap} WebSockets per user; close one first"),
        )
        .with("limit", cap));
    };
    Ok(SocketSlot {
        hub: s.hub.clone(),
        user: caller.user.clone(),
        fence,
    })
}
