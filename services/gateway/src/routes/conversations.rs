//! Conversations: create, list, info, update, dissolve/hide, members, roles, settings.
//!
//! Every call on one conversation checks membership first and answers a non-member exactly
//! like a missing conversation, so ids cannot be probed.

use std::collections::BTreeSet;
use std::sync::Arc;

use axum::extract::State;
use axum::http::StatusCode;
use axum::response::Response;
use axum::Json;
use meridian_model::events::{self, event_envelope::Body, ConversationKind, MemberGrant, MemberRole};
use meridian_model::{ConversationId, EventId, UserId};
use serde::{Deserialize, Serialize};
use serde_json::{json, Value};

use crate::error::{ApiError, ApiResult};
use crate::extract::{ApiJson, ApiPath, ApiQuery, Caller};
use crate::idempotency::{self, IdempotencyKey};
use crate::render;
use crate::service::require_member;
use crate::state::AppState;

/// Largest member list one create or add call may carry.
pub const MAX_MEMBERS_PER_CALL: usize = 1_000;
pub const MAX_NAME_CHARS: usize = 128;
pub const MAX_ANNOUNCEMENT_CHARS: usize = 4_096;
/// Largest page of the conversation list.
pub const MAX_LIST_LIMIT: usize = 200;

/// The caller's role in a group (`cid` must name a group: direct conversations have two
/// fixed members, no roles and no settings, so `why` explains the 400).
async fn require_group_member(
    s: &AppState,
    cid: &str,
    user: &UserId,
    why: &str,
) -> ApiResult<(ConversationId, MemberRole)> {
    let (cid, role) = require_member(s, cid, user).await?;
    if cid.is_direct() {
        return Err(ApiError::bad_request("not_a_group", why));
    }
    Ok((cid, role))
}

/// Refuses writes to a dissolved group.
async fn require_active(
    s: &AppState,
    cid: &ConversationId,
) -> ApiResult<meridian_store::conversations::ConversationView> {
    let view = s
        .store
        .conversation(cid)
        .await?
        .ok_or_else(ApiError::conversation_not_found)?;
    if view.dissolved {
        return Err(ApiError::new(
            StatusCode::CONFLICT,
            "conversation_dissolved",
            "the group was dissolved",
        ));
    }
    Ok(view)
}

fn parse_users(ids: Vec<String>, field: &'static str) -> ApiResult<Vec<UserId>> {
    if ids.len() > MAX_MEMBERS_PER_CALL {
        return Err(ApiError::bad_request(
            "invalid_argument",
            format!("{field} may list at most {MAX_MEMBERS_PER_CALL} users"),
        )
        .with("field", field));
    }
    ids.into_iter()
        .map(|u| UserId::parse(u).map_err(|e| ApiError::from(e).with("field", field)))
        .collect()
}

/// Every user must be provisioned; the answer names the ones that are not.
async fn require_users_exist(s: &AppState, users: &[UserId]) -> ApiResult<()> {
    let mut missing = Vec::new();
    for u in users {
        if s.store.user(u).await?.is_none() {
            missing.push(u.to_string());
        }
    }
    if missing.is_empty() {
        Ok(())
    } else {
        Err(
            ApiError::bad_request("unknown_user", format!("no such user: {}", missing.join(", ")))
                .with("user_ids", missing),
        )
    }
}

fn check_len(value: &str, max: usize, field: &'static str) -> ApiResult<()> {
    if value.chars().count() > max {
        return Err(ApiError::bad_request(
            "invalid_argument",
            format!("{field} is longer than {max} characters"),
        )
        .with("field", field));
    }
    Ok(())
}

#[derive(Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct CreateConversation {
    kind: String,
    #[serde(default)]
    name: String,
    #[serde(default)]
    members: Vec<String>,
}

pub async fn create(
    caller: Caller,
    State(s): State<Arc<AppState>>,
    key: IdempotencyKey,
    ApiJson(req): ApiJson<CreateConversation>,
) -> ApiResult<Response> {
    let fingerprint = idempotency::fingerprint(&req);
    idempotency::once(
        &s,
        &caller,
        "POST /v1/conversations",
        key,
        &fingerprint,
        |event_id| create_once(&s, &caller, req, event_id),
    )
    .await
}

/// Creates the conversation with event `event_id`; a group's id is derived from it, so an
/// idempotent retry that publishes the same event names the same group.
async fn create_once(
    s: &AppState,
    caller: &Caller,
    req: CreateConversation,
    event_id: EventId,
) -> ApiResult<(StatusCode, Value)> {
    let members = parse_users(req.members, "members")?;
    check_len(&req.name, MAX_NAME_CHARS, "name")?;
    let (cid, kind, grants) = match req.kind.as_str() {
        "direct" => {
            let others: BTreeSet<&UserId> = members.iter().filter(|u| **u != caller.user).collect();
            let [other] = others.into_iter().collect::<Vec<_>>()[..] else {
                return Err(ApiError::bad_request(
                    "invalid_argument",
                    "a direct conversation has exactly one other member",
                )
                .with("field", "members"));
            };
            let cid = ConversationId::direct(&caller.user, other);
            let grants = [&caller.user, other]
                .into_iter()
                .map(|u| MemberGrant {
                    user_id: u.to_string(),
                    role: MemberRole::Member as i32,
                })
                .collect::<Vec<_>>();
            (cid, ConversationKind::Direct, grants)
        }
        "group" => {
            let mut grants = vec![MemberGrant {
                user_id: caller.user.to_string(),
                role: MemberRole::Owner as i32,
            }];
            let unique: BTreeSet<&UserId> = members.iter().filter(|u| **u != caller.user).collect();
            grants.extend(unique.into_iter().map(|u| MemberGrant {
                user_id: u.to_string(),
                role: MemberRole::Member as i32,
            }));
            let cid = ConversationId::parse(format!("g_{}", event_id.to_string().replace('-', "")))?;
            (cid, ConversationKind::Group, grants)
        }
        other => {
            return Err(ApiError::bad_request(
                "invalid_argument",
                format!("kind must be \"direct\" or \"group\", not {other:?}"),
            )
            .with("field", "kind"))
        }
    };
    let users: Vec<UserId> = grants
        .iter()
        .filter_map(|g| UserId::parse(g.user_id.clone()).ok())
        .collect();
    require_users_exist(s, &users).await?;
    // A direct conversation that exists already is answered as it is: its id is derived, so
    // creating it again (from either side, in any region) meets the same conversation.
    let existing = if kind == ConversationKind::Direct {
        s.store.member_role(&cid, &caller.user).await?.is_some()
    } else {
        false
    };
    if !existing {
        s.publish_and_apply_as(
            Some(caller),
            event_id,
            Body::ConversationCreated(events::ConversationCreated {
                conversation_id: cid.to_string(),
                kind: kind as i32,
                name: if kind == ConversationKind::Group {
                    req.name
                } else {
                    String::new()
                },
                members: grants,
            }),
        )
        .await?;
    }
    let body = match s.store.conversation(&cid).await? {
        Some(v) => render::conversation(&v),
        // Durable but not applied within the read-your-writes bound: answer with the id.
        None => json!({"conversation_id": cid.as_str(), "kind": req.kind}),
    };
    let status = if existing {
        StatusCode::OK
    } else {
        StatusCode::CREATED
    };
    Ok((status, body))
}

#[derive(Deserialize)]
pub struct ListQuery {
    limit: Option<usize>,
    cursor: Option<String>,
}

pub async fn list(
    caller: Caller,
    State(s): State<Arc<AppState>>,
    ApiQuery(q): ApiQuery<ListQuery>,
) -> ApiResult<Json<Value>> {
    let limit = q.limit.unwrap_or(50);
    if !(1..=MAX_LIST_LIMIT).contains(&limit) {
        return Err(ApiError::bad_request(
            "invalid_argument",
            format!("limit must be between 1 and {MAX_LIST_LIMIT}"),
        )
        .with("field", "limit"));
    }
    let after = match q.cursor.as_deref() {
        Some(c) if !c.is_empty() => Some(render::parse_list_cursor(c)?),
        _ => None,
    };
    let (items, more) = s
        .store
        .conversations_for(
            &caller.user,
            limit,
            after.as_ref().map(|(a, c)| (a.as_slice(), c)),
        )
        .await?;
    let next = if more {
        items
            .last()
            .map(|l| render::list_cursor(&l.activity, &l.conversation_id))
    } else {
        None
    };
    Ok(Json(json!({
        "conversations": items.iter().map(render::summary).collect::<Vec<_>>(),
        "next_cursor": next,
    })))
}

pub async fn get(
    caller: Caller,
    State(s): State<Arc<AppState>>,
    ApiPath(cid): ApiPath<String>,
) -> ApiResult<Json<Value>> {
    let (cid, _) = require_member(&s, &cid, &caller.user).await?;
    let view = s
        .store
        .conversation(&cid)
        .await?
        .ok_or_else(ApiError::conversation_not_found)?;
    let settings = s.store.settings(&cid, &caller.user).await?;
    let mut body = render::conversation(&view);
    body["dissolved"] = json!(view.dissolved);
    body["muted"] = json!(settings.muted);
    body["pinned"] = json!(settings.pinned);
    Ok(Json(body))
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
pub struct UpdateConversation {
    name: Option<String>,
    announcement: Option<String>,
    members_can_add: Option<bool>,
}

pub async fn update(
    caller: Caller,
    State(s): State<Arc<AppState>>,
    ApiPath(cid): ApiPath<String>,
    ApiJson(req): ApiJson<UpdateConversation>,
) -> ApiResult<Json<Value>> {
    let (cid, role) = require_group_member(
        &s,
        &cid,
        &caller.user,
        "direct conversations have no settings to update",
    )
    .await?;
    if role < MemberRole::Admin {
        return Err(ApiError::forbidden(
            "only the owner or an admin may update the group",
        ));
    }
    require_active(&s, &cid).await?;
    if let Some(n) = &req.name {
        check_len(n, MAX_NAME_CHARS, "name")?;
    }
    if let Some(a) = &req.announcement {
        check_len(a, MAX_ANNOUNCEMENT_CHARS, "announcement")?;
    }
    if req.name.is_none() && req.announcement.is_none() && req.members_can_add.is_none() {
        return Err(ApiError::bad_request("invalid_argument", "nothing to update"));
    }
    s.publish_and_apply(
        Some(&caller),
        Body::ConversationUpdated(events::ConversationUpdated {
            conversation_id: cid.to_string(),
            name: req.name,
            announcement: req.announcement,
            members_can_add: req.members_can_add,
        }),
    )
    .await?;
    let view = s
        .store
        .conversation(&cid)
        .await?
        .ok_or_else(ApiError::conversation_not_found)?;
    Ok(Json(render::conversation(&view)))
}

/// Group: the owner dissolves it. Direct: hides it for the caller (until a new message).
pub async fn delete(
    caller: Caller,
    State(s): State<Arc<AppState>>,
    ApiPath(cid): ApiPath<String>,
) -> ApiResult<StatusCode> {
    let (cid, role) = require_member(&s, &cid, &caller.user).await?;
    let body = if cid.is_direct() {
        Body::ConversationHidden(events::ConversationHidden {
            conversation_id: cid.to_string(),
            user_id: caller.user.to_string(),
        })
    } else {
        if role != MemberRole::Owner {
            return Err(ApiError::forbidden("only the owner may dissolve the group"));
        }
        require_active(&s, &cid).await?;
        Body::ConversationDissolved(events::ConversationDissolved {
            conversation_id: cid.to_string(),
        })
    };
    s.publish_and_apply(Some(&caller), body).await?;
    Ok(StatusCode::NO_CONTENT)
}

#[derive(Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct AddMembers {
    user_ids: Vec<String>,
}

pub async fn add_members(
    caller: Caller,
    State(s): State<Arc<AppState>>,
    ApiPath(cid): ApiPath<String>,
    key: IdempotencyKey,
    ApiJson(req): ApiJson<AddMembers>,
) -> ApiResult<Response> {
    let fingerprint = idempotency::fingerprint(&req);
    let route = format!("POST /v1/conversations/{cid}/members");
    idempotency::once(&s, &caller, &route, key, &fingerprint, |event_id| {
        add_members_once(&s, &caller, &cid, req, event_id)
    })
    .await
}

async fn add_members_once(
    s: &AppState,
    caller: &Caller,
    cid: &str,
    req: AddMembers,
    event_id: EventId,
) -> ApiResult<(StatusCode, Value)> {
    let (cid, role) = require_group_member(
        s,
        cid,
        &caller.user,
        "direct conversations have exactly two members",
    )
    .await?;
    let view = require_active(s, &cid).await?;
    if role < MemberRole::Admin && !view.members_can_add {
        return Err(ApiError::forbidden(
            "only the owner or an admin may add members to this group",
        ));
    }
    let users = parse_users(req.user_ids, "user_ids")?;
    if users.is_empty() {
        return Err(ApiError::bad_request("invalid_argument", "user_ids is empty").with("field", "user_ids"));
    }
    require_users_exist(s, &users).await?;
    // Only people who are not members yet: an add creates membership, it never touches the
    // role of someone already in the group (roles change through the role call alone).
    // Adding only current members changes nothing and publishes nothing.
    let current: BTreeSet<&UserId> = view.members.iter().map(|m| &m.user_id).collect();
    let new_members: BTreeSet<String> = users
        .iter()
        .filter(|u| !current.contains(u))
        .map(|u| u.to_string())
        .collect();
    if !new_members.is_empty() {
        s.publish_and_apply_as(
            Some(caller),
            event_id,
            Body::MembersAdded(events::MembersAdded {
                conversation_id: cid.to_string(),
                user_ids: new_members.into_iter().collect(),
            }),
        )
        .await?;
    }
    let view = s
        .store
        .conversation(&cid)
        .await?
        .ok_or_else(ApiError::conversation_not_found)?;
    Ok((StatusCode::OK, render::conversation(&view)))
}

/// An admin removes a member (not the owner, and an admin only plain members), or anyone
/// leaves. The owner cannot leave without dissolving (there is no owner transfer yet).
pub async fn remove_member(
    caller: Caller,
    State(s): State<Arc<AppState>>,
    ApiPath((cid, uid)): ApiPath<(String, String)>,
) -> ApiResult<StatusCode> {
    let (cid, role) = require_group_member(
        &s,
        &cid,
        &caller.user,
        "direct conversations have exactly two members",
    )
    .await?;
    require_active(&s, &cid).await?;
    let target = UserId::parse(uid)?;
    let target_role = s
        .store
        .member_role(&cid, &target)
        .await?
        .ok_or_else(|| ApiError::not_found("member_not_found", format!("{target} is not a member")))?;
    if target_role == MemberRole::Owner {
        return Err(ApiError::forbidden(
            "the owner cannot be removed; dissolve the group instead",
        ));
    }
    if target != caller.user
        && (role < MemberRole::Admin || (role == MemberRole::Admin && target_role >= MemberRole::Admin))
    {
        return Err(ApiError::forbidden(
            "only the owner or an admin may remove members",
        ));
    }
    s.publish_and_apply(
        Some(&caller),
        Body::MemberRemoved(events::MemberRemoved {
            conversation_id: cid.to_string(),
            user_id: target.to_string(),
        }),
    )
    .await?;
    Ok(StatusCode::NO_CONTENT)
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ChangeRole {
    role: String,
}

pub async fn change_role(
    caller: Caller,
    State(s): State<Arc<AppState>>,
    ApiPath((cid, uid)): ApiPath<(String, String)>,
    ApiJson(req): ApiJson<ChangeRole>,
) -> ApiResult<Json<Value>> {
    let (cid, role) =
        require_group_member(&s, &cid, &caller.user, "direct conversations have no roles").await?;
    if role != MemberRole::Owner {
        return Err(ApiError::forbidden("only the owner may change roles"));
    }
    require_active(&s, &cid).await?;
    let new_role = match req.role.as_str() {
        "admin" => MemberRole::Admin,
        "member" => MemberRole::Member,
        other => {
            return Err(ApiError::bad_request(
                "invalid_argument",
                format!("role must be \"admin\" or \"member\", not {other:?}"),
            )
            .with("field", "role"))
        }
    };
    let target = UserId::parse(uid)?;
    let target_role = s
        .store
        .member_role(&cid, &target)
        .await?
        .ok_or_else(|| ApiError::not_found("member_not_found", format!("{target} is not a member")))?;
    if target_role == MemberRole::Owner {
        return Err(ApiError::forbidden("the owner's role cannot be changed"));
    }
    s.publish_and_apply(
        Some(&caller),
        Body::MemberRoleChanged(events::MemberRoleChanged {
            conversation_id: cid.to_string(),
            user_id: target.to_string(),
            role: new_role as i32,
        }),
    )
    .await?;
    Ok(Json(json!({"user_id": target.as_str(), "role": req.role})))
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
pub struct PutSettings {
    muted: Option<bool>,
    pinned: Option<bool>,
}

pub async fn put_settings(
    caller: Caller,
    State(s): State<Arc<AppState>>,
    ApiPath(cid): ApiPath<String>,
    ApiJson(req): ApiJson<PutSettings>,
) -> ApiResult<Json<Value>> {
    let (cid, _) = require_member(&s, &cid, &caller.user).await?;
    if req.muted.is_none() && req.pinned.is_none() {
        return Err(ApiError::bad_request(
            "invalid_argument",
            "give muted and/or pinned",
        ));
    }
    s.publish_and_apply(
        Some(&caller),
        Body::UserSettingsChanged(events::UserSettingsChanged {
            user_id: caller.user.to_string(),
            conversation_id: cid.to_string(),
            muted: req.muted,
            pinned: req.pinned,
        }),
    )
    .await?;
    let st = s.store.settings(&cid, &caller.user).await?;
    Ok(Json(
        json!({"conversation_id": cid.as_str(), "muted": st.muted, "pinned": st.pinned}),
    ))
}
