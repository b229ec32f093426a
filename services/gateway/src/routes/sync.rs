//! The caller's identity, inbox sync, push devices and presence.

use std::collections::{HashMap, HashSet};
use std::sync::Arc;

use axum::extract::State;
use axum::http::StatusCode;
use axum::Json;
use meridian_model::events::{self, event_envelope::Body};
use meridian_model::{DeviceId, RegionId, UserId};
use serde::Deserialize;
use serde_json::{json, Value};

use crate::error::{ApiError, ApiResult};
use crate::extract::{ApiJson, ApiPath, ApiQuery, Caller};
use crate::state::AppState;
use crate::{regions, service};

pub async fn me(caller: Caller, State(s): State<Arc<AppState>>) -> Json<Value> {
    Json(json!({
        "user_id": caller.user.as_str(),
        "device_id": caller.device.as_str(),
        "display_name": caller.view.display_name,
        "home_region": caller.view.home_region.as_str(),
        "serving_region": caller.view.serving_region.as_str(),
        "served_by": s.cfg.region.as_str(),
        "epoch": caller.view.epoch,
    }))
}

#[derive(Deserialize)]
pub struct SyncQuery {
    #[serde(default)]
    after: u64,
    epoch: Option<String>,
    limit: Option<usize>,
}

pub const MAX_SYNC_LIMIT: usize = 1_000;

pub async fn sync(
    caller: Caller,
    State(s): State<Arc<AppState>>,
    ApiQuery(q): ApiQuery<SyncQuery>,
) -> ApiResult<Json<Value>> {
    let limit = q.limit.unwrap_or(200);
    if !(1..=MAX_SYNC_LIMIT).contains(&limit) {
        return Err(ApiError::bad_request(
            "invalid_argument",
            format!("limit must be between 1 and {MAX_SYNC_LIMIT}"),
        )
        .with("field", "limit"));
    }
    match service::inbox_page(
        &s,
        &caller,
        &caller.view.epoch,
        q.epoch.as_deref(),
        q.after,
        limit,
    )
    .await?
    {
        Ok(page) => Ok(Json(page)),
        Err((epoch, head)) => Err(service::resync_required(epoch, head)),
    }
}

pub const MAX_DEVICE_TOKEN_BYTES: usize = 4096;
pub const PUSH_PLATFORMS: [&str; 3] = ["apns", "fcm", "webhook"];

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
pub struct PutDevice {
    platform: String,
    token: String,
}

pub async fn put_device(
    caller: Caller,
    State(s): State<Arc<AppState>>,
    ApiPath(device_id): ApiPath<String>,
    ApiJson(req): ApiJson<PutDevice>,
) -> ApiResult<Json<Value>> {
    let device = DeviceId::parse(device_id)?;
    if !PUSH_PLATFORMS.contains(&req.platform.as_str()) {
        return Err(ApiError::bad_request(
            "invalid_argument",
            "platform must be \"apns\", \"fcm\" or \"webhook\"",
        )
        .with("field", "platform"));
    }
    if req.token.is_empty() || req.token.len() > MAX_DEVICE_TOKEN_BYTES {
        return Err(ApiError::bad_request(
            "invalid_argument",
            format!("token must be 1-{MAX_DEVICE_TOKEN_BYTES} bytes"),
        )
        .with("field", "token"));
    }
    s.publish_and_apply(
        Some(&caller),
        Body::DeviceRegistered(events::DeviceRegistered {
            user_id: caller.user.to_string(),
            device_id: device.to_string(),
            platform: req.platform.clone(),
            token: req.token,
        }),
    )
    .await?;
    Ok(Json(
        json!({"device_id": device.as_str(), "platform": req.platform}),
    ))
}

pub async fn delete_device(
    caller: Caller,
    State(s): State<Arc<AppState>>,
    ApiPath(device_id): ApiPath<String>,
) -> ApiResult<StatusCode> {
    let device = DeviceId::parse(device_id)?;
    s.publish_and_apply(
        Some(&caller),
        Body::DeviceUnregistered(events::DeviceUnregistered {
            user_id: caller.user.to_string(),
            device_id: device.to_string(),
            // The user's own call removes the registration whatever its token.
            token: String::new(),
        }),
    )
    .await?;
    Ok(StatusCode::NO_CONTENT)
}

#[derive(Deserialize)]
pub struct PresenceQuery {
    user_ids: String,
}

/// Most users one presence call may ask about.
pub const MAX_PRESENCE_USERS: usize = 200;

/// Presence of the users who share a conversation with the caller. Anyone else is reported
/// exactly like a user never seen (`online: false, last_seen: null`), so the call tells a
/// stranger nothing, not even that the user is hidden from them. Users served here are
/// answered from this gateway's connections; users served by other regions by asking those
/// regions over NATS (one request per region, bounded; a region that does not answer in time
/// reads as "never seen", see [`crate::regions`]).
pub async fn presence(
    caller: Caller,
    State(s): State<Arc<AppState>>,
    ApiQuery(q): ApiQuery<PresenceQuery>,
) -> ApiResult<Json<Value>> {
    let ids: Vec<&str> = q.user_ids.split(',').filter(|u| !u.is_empty()).collect();
    if ids.is_empty() || ids.len() > MAX_PRESENCE_USERS {
        return Err(ApiError::bad_request(
            "invalid_argument",
            format!("user_ids must list 1-{MAX_PRESENCE_USERS} users"),
        )
        .with("field", "user_ids"));
    }
    let users = ids
        .into_iter()
        .map(|id| UserId::parse(id).map_err(|e| ApiError::from(e).with("field", "user_ids")))
        .collect::<ApiResult<Vec<_>>>()?;
    let visible = s.store.sharing_a_conversation(&caller.user, &users).await?;
    let mut elsewhere: HashMap<RegionId, Vec<UserId>> = HashMap::new();
    for user in users.iter().filter(|u| visible.contains(*u)) {
        if let Some(view) = s.store.user(user).await? {
            if view.serving_region != s.cfg.region {
                elsewhere
                    .entry(view.serving_region)
                    .or_default()
                    .push(user.clone());
            }
        }
    }
    let remote = if elsewhere.is_empty() {
        HashMap::new()
    } else {
        regions::remote_presence(&s.bus, elsewhere.clone()).await
    };
    let served_elsewhere: HashSet<&UserId> = elsewhere.values().flatten().collect();
    let answer = users
        .iter()
        .map(|user| {
            let (online, last_seen) = if !visible.contains(user) {
                (false, None)
            } else if served_elsewhere.contains(user) {
                let p = remote.get(user).copied().unwrap_or_default();
                (p.online, p.last_seen_ms)
            } else {
                s.hub.presence(user)
            };
            json!({"user_id": user.as_str(), "online": online, "last_seen": last_seen})
        })
        .collect::<Vec<_>>();
    Ok(Json(json!({"users": answer})))
}
