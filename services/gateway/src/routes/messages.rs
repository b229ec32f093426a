//! Messages: send (the service layer's, idempotent by client_msg_id), history pages,
//! recall, delete-for-me, read indexes.

use std::sync::Arc;

use axum::extract::State;
use axum::http::StatusCode;
use axum::Json;
use meridian_model::events::{self, event_envelope::Body, MemberRole};
use meridian_model::{ConversationId, Cursor, EventId, OrderKey};
use meridian_store::timeline::{CursorPlace, HistoryPage};
use serde::Deserialize;
use serde_json::{json, Value};

use crate::error::{ApiError, ApiResult};
use crate::extract::{ApiJson, ApiPath, ApiQuery, Caller};
use crate::render;
use crate::service::{self, require_member};
use crate::state::AppState;

pub use crate::service::{MAX_CLIENT_MSG_ID, MAX_TYPE};
/// Largest history page.
pub const MAX_HISTORY_LIMIT: usize = 200;

pub async fn post(
    caller: Caller,
    State(s): State<Arc<AppState>>,
    ApiPath(cid): ApiPath<String>,
    headers: axum::http::HeaderMap,
    ApiJson(req): ApiJson<service::SendMessage>,
) -> ApiResult<(StatusCode, Json<Value>)> {
    let requested = crate::durability::requested(&headers)?;
    let accepted = service::send_message(&s, &caller, &cid, req, requested).await?;
    Ok((StatusCode::ACCEPTED, Json(json!(accepted))))
}

#[derive(Deserialize)]
pub struct HistoryQuery {
    after: Option<String>,
    before: Option<String>,
    limit: Option<usize>,
}

fn parse_cursor(c: &str, field: &'static str) -> ApiResult<OrderKey> {
    Cursor::parse(c).map_err(|e| ApiError::from(e).with("field", field))
}

pub async fn history(
    caller: Caller,
    State(s): State<Arc<AppState>>,
    ApiPath(cid): ApiPath<String>,
    ApiQuery(q): ApiQuery<HistoryQuery>,
) -> ApiResult<Json<Value>> {
    let (cid, _) = require_member(&s, &cid, &caller.user).await?;
    let limit = q.limit.unwrap_or(50);
    if !(1..=MAX_HISTORY_LIMIT).contains(&limit) {
        return Err(ApiError::bad_request(
            "invalid_argument",
            format!("limit must be between 1 and {MAX_HISTORY_LIMIT}"),
        )
        .with("field", "limit"));
    }
    let page = match (q.after.as_deref(), q.before.as_deref()) {
        (Some(_), Some(_)) => {
            return Err(ApiError::bad_request(
                "invalid_argument",
                "give after or before, not both",
            ));
        }
        (Some(""), None) => HistoryPage::After(None),
        (Some(a), None) => HistoryPage::After(Some(parse_cursor(a, "after")?)),
        (None, Some(b)) => HistoryPage::Before(parse_cursor(b, "before")?),
        (None, None) => HistoryPage::Latest,
    };
    let forward = matches!(page, HistoryPage::After(_));
    let h = s.store.history(&cid, &caller.user, page, limit).await?;
    // next_cursor continues in the direction read: forward after the last message, or
    // backward before the first.
    let edge = if forward {
        h.messages.last()
    } else {
        h.messages.first()
    };
    let next = if h.more {
        edge.map(|m| m.order_key.cursor().as_str().to_string())
    } else {
        None
    };
    Ok(Json(json!({
        "messages": h.messages.iter().map(render::message).collect::<Vec<_>>(),
        "next_cursor": next,
    })))
}

pub async fn recall(
    caller: Caller,
    State(s): State<Arc<AppState>>,
    ApiPath((cid, mid)): ApiPath<(String, String)>,
) -> ApiResult<Json<Value>> {
    let (cid, role) = require_member(&s, &cid, &caller.user).await?;
    let mid = EventId::parse(&mid)?;
    let msg = s
        .store
        .message(&cid, &caller.user, &mid)
        .await?
        .ok_or_else(|| ApiError::not_found("message_not_found", "no such message"))?;
    if !msg.recalled {
        let is_admin = !cid.is_direct() && role >= MemberRole::Admin;
        if !is_admin {
            if msg.sender != caller.user.as_str() {
                return Err(ApiError::forbidden(
                    "only the sender or a group admin may recall a message",
                ));
            }
            let age_ms = crate::auth::now_s()
                .saturating_mul(1000)
                .saturating_sub(msg.sent_at_ms);
            if age_ms > s.cfg.recall_window_s * 1000 {
                return Err(ApiError::forbidden(format!(
                    "messages can be recalled within {} s of sending",
                    s.cfg.recall_window_s
                ))
                .with("error_detail", "recall_window_passed"));
            }
        }
        s.publish_and_apply(
            Some(&caller),
            Body::MessageRecalled(events::MessageRecalled {
                conversation_id: cid.to_string(),
                message_id: mid.as_bytes().to_vec(),
            }),
        )
        .await?;
    }
    Ok(Json(json!({"message_id": mid.to_string(), "recalled": true})))
}

pub async fn delete_for_me(
    caller: Caller,
    State(s): State<Arc<AppState>>,
    ApiPath((cid, mid)): ApiPath<(String, String)>,
) -> ApiResult<StatusCode> {
    let (cid, _) = require_member(&s, &cid, &caller.user).await?;
    let mid = EventId::parse(&mid)?;
    if s.store.message(&cid, &caller.user, &mid).await?.is_none() {
        return Err(ApiError::not_found("message_not_found", "no such message"));
    }
    s.publish_and_apply(
        Some(&caller),
        Body::MessageDeletedForMe(events::MessageDeletedForMe {
            conversation_id: cid.to_string(),
            message_id: mid.as_bytes().to_vec(),
            user_id: caller.user.to_string(),
        }),
    )
    .await?;
    Ok(StatusCode::NO_CONTENT)
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
pub struct PutRead {
    cursor: String,
}

pub async fn put_read(
    caller: Caller,
    State(s): State<Arc<AppState>>,
    ApiPath(cid): ApiPath<String>,
    ApiJson(req): ApiJson<PutRead>,
) -> ApiResult<Json<Value>> {
    let (cid, _) = require_member(&s, &cid, &caller.user).await?;
    let key = parse_cursor(&req.cursor, "cursor")?;
    require_cursor_of(&s, &cid, &key).await?;
    let current = s.store.read_index(&cid, &caller.user).await?;
    // A max register: an older cursor is accepted and changes nothing.
    if current.as_ref().is_none_or(|c| *c < key) {
        s.publish_and_apply(
            Some(&caller),
            Body::ReadIndexSet(events::ReadIndexSet {
                conversation_id: cid.to_string(),
                user_id: caller.user.to_string(),
                order_key: key.to_bytes(),
            }),
        )
        .await?;
    }
    let now = s
        .store
        .read_index(&cid, &caller.user)
        .await?
        .map(|k| k.cursor().as_str().to_string());
    Ok(Json(json!({"conversation_id": cid.as_str(), "cursor": now})))
}

/// How far from now a cursor's time may be for it to name a message the applier has not
/// reached yet (a client marking its own just-sent message read).
const IN_FLIGHT_PAST_MS: u64 = 60_000;
const IN_FLIGHT_FUTURE_MS: u64 = 1_000;

/// A read index must name an entry of this conversation's timeline: a cursor past the newest
/// message (made up) or from another conversation would count every later message as read.
/// A recent cursor nothing names yet may be a send still on its way to the applier, so it
/// gets the read-your-writes wait before it is refused.
async fn require_cursor_of(s: &AppState, cid: &ConversationId, key: &OrderKey) -> ApiResult<()> {
    let refuse = |why: &str| {
        Err(ApiError::bad_request("invalid_argument", format!("cursor {why}")).with("field", "cursor"))
    };
    let now = crate::live::now_ms();
    let at = key.hlc.physical_ms();
    let in_flight = at + IN_FLIGHT_PAST_MS >= now && at <= now + IN_FLIGHT_FUTURE_MS;
    let deadline = std::time::Instant::now() + std::time::Duration::from_millis(s.cfg.read_your_writes_ms);
    let mut pause = std::time::Duration::from_millis(1);
    loop {
        match s.store.cursor_place(cid, key).await? {
            CursorPlace::Here => return Ok(()),
            CursorPlace::Elsewhere => return refuse("belongs to another conversation"),
            CursorPlace::Unknown if !in_flight || std::time::Instant::now() >= deadline => {
                return refuse("names no message of this conversation (past its newest?)")
            }
            CursorPlace::Unknown => {}
        }
        tokio::time::sleep(pause).await;
        pause = (pause * 2).min(std::time::Duration::from_millis(20));
    }
}

pub async fn get_read(
    caller: Caller,
    State(s): State<Arc<AppState>>,
    ApiPath(cid): ApiPath<String>,
) -> ApiResult<Json<Value>> {
    let (cid, _) = require_member(&s, &cid, &caller.user).await?;
    let rows = s.store.read_indexes(&cid).await?;
    Ok(Json(json!({
        "members": rows.iter().map(|(u, k)| json!({"user_id": u.as_str(), "cursor": k.cursor().as_str()})).collect::<Vec<_>>(),
    })))
}
