//! `GET /v1/search`: full-text search over the caller's conversations, newest first.
//!
//! The index (`meridian-search`) knows words, conversations, senders and times; what the
//! caller may see is decided here, from the store, for each hit: membership (only the
//! caller's conversations are searched), deletes-for-me and recalls (such hits are skipped).

use std::sync::Arc;

use axum::extract::State;
use axum::Json;
use meridian_model::{ConversationId, Cursor, OrderKey, UserId};
use meridian_search::{message_text, SearchQuery};
use serde::Deserialize;
use serde_json::{json, Value};

use crate::error::{ApiError, ApiResult};
use crate::extract::{ApiQuery, Caller};
use crate::render;
use crate::service::require_member;
use crate::state::AppState;

/// Largest page.
pub const MAX_SEARCH_LIMIT: usize = 100;
/// Longest query, in characters.
pub const MAX_QUERY_CHARS: usize = 256;
/// Index reads per call: hits the caller may not see (recalled, deleted for them) are
/// skipped, and a page that still is not full after this many reads is answered short,
/// with a cursor that continues after the last hit examined.
const MAX_ROUNDS: usize = 4;

#[derive(Deserialize)]
pub struct SearchParams {
    q: Option<String>,
    conversation_id: Option<String>,
    sender: Option<String>,
    before: Option<u64>,
    after: Option<u64>,
    limit: Option<usize>,
    cursor: Option<String>,
}

pub async fn search(
    caller: Caller,
    State(s): State<Arc<AppState>>,
    ApiQuery(p): ApiQuery<SearchParams>,
) -> ApiResult<Json<Value>> {
    let text =
        p.q.ok_or_else(|| ApiError::bad_request("invalid_argument", "q is required").with("field", "q"))?;
    if text.is_empty() || text.chars().count() > MAX_QUERY_CHARS {
        return Err(ApiError::bad_request(
            "invalid_argument",
            format!("q must hold 1 to {MAX_QUERY_CHARS} characters"),
        )
        .with("field", "q"));
    }
    let limit = p.limit.unwrap_or(20);
    if !(1..=MAX_SEARCH_LIMIT).contains(&limit) {
        return Err(ApiError::bad_request(
            "invalid_argument",
            format!("limit must be between 1 and {MAX_SEARCH_LIMIT}"),
        )
        .with("field", "limit"));
    }
    let sender = p
        .sender
        .map(|u| UserId::parse(u).map_err(|e| ApiError::from(e).with("field", "sender")))
        .transpose()?;
    let mut below: Option<OrderKey> = p
        .cursor
        .as_deref()
        .map(|c| Cursor::parse(c).map_err(|e| ApiError::from(e).with("field", "cursor")))
        .transpose()?;
    let conversations: Vec<ConversationId> = match p.conversation_id.as_deref() {
        Some(cid) => vec![require_member(&s, cid, &caller.user).await?.0],
        None => s.store.member_conversation_ids(&caller.user).await?,
    };
    let search = s
        .search
        .as_ref()
        .ok_or_else(|| ApiError::unavailable("search is not served by this gateway process"))?;
    let query = SearchQuery {
        text,
        conversations,
        sender: sender.map(|u| u.as_str().to_string()),
        sent_after_ms: p.after,
        sent_before_ms: p.before,
    };

    let mut found = Vec::with_capacity(limit);
    let mut exhausted = false;
    'rounds: for _ in 0..MAX_ROUNDS {
        let page = search
            .query(query.clone(), below.clone(), limit - found.len())
            .await?;
        for hit in page.hits {
            if found.len() == limit {
                break 'rounds;
            }
            below = Some(hit.order_key.clone());
            let Some(m) = s
                .store
                .message(&hit.conversation_id, &caller.user, &hit.message_id)
                .await?
            else {
                continue; // deleted for the caller (or not applied here yet)
            };
            if m.recalled {
                continue;
            }
            found.push((hit.conversation_id, m));
        }
        if page.exhausted {
            exhausted = true;
            break;
        }
        if found.len() == limit {
            break;
        }
    }
    let texts = found
        .iter()
        .map(|(_, m)| m.body_json.as_deref().map(message_text).unwrap_or_default())
        .collect();
    let highlights = search.highlights(query, texts).await?;
    let messages: Vec<Value> = found
        .iter()
        .zip(highlights)
        .map(|((cid, m), h)| {
            let mut v = render::message(m);
            v["conversation_id"] = json!(cid.as_str());
            v["highlights"] = h
                .into_iter()
                .map(|h| json!({"fragment": h.fragment, "ranges": h.ranges.iter().map(|(s, e)| json!([s, e])).collect::<Vec<_>>()}))
                .collect();
            v
        })
        .collect();
    let next_cursor = match (exhausted, &below) {
        (false, Some(k)) => Some(k.cursor().as_str().to_string()),
        _ => None,
    };
    Ok(Json(json!({"messages": messages, "next_cursor": next_cursor})))
}
