//! The caller's identity, inbox sync, push devices and presence.

use std::sync::Arc;

use axum::extract::State;
use axum::http::StatusCode;
use axum::Json;
use meridian_model::events::{self, event_envelope::Body};
use meridian_model::{DeviceId, UserId};
use meridian_store::inbox::SyncOutcome;
use serde::Deserialize;
use serde_json::{json, Value};

use crate::error::{ApiError, ApiResult};
use crate::extract::{ApiJson, ApiPath, ApiQuery, Caller};
use crate::render;
use crate::state::AppState;

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
            "entries": p.entries.iter().map(render::inbox_entry).collect::<Vec<_>>(),
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
    match inbox_page(
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
        Err((epoch, head)) => Err(resync_required(epoch, head)),
    }
}

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
    if !["apns", "fcm", "webhook"].contains(&req.platform.as_str()) {
        return Err(ApiError::bad_request(
            "invalid_argument",
            "platform must be \"apns\", \"fcm\" or \"webhook\"",
        )
        .with("field", "platform"));
    }
    if req.token.is_empty() || req.token.len() > 4096 {
        return Err(
            ApiError::bad_request("invalid_argument", "token must be 1-4096 bytes").with("field", "token"),
        );
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

pub async fn presence(
    _caller: Caller,
    State(s): State<Arc<AppState>>,
    ApiQuery(q): ApiQuery<PresenceQuery>,
) -> ApiResult<Json<Value>> {
    let ids: Vec<&str> = q.user_ids.split(',').filter(|u| !u.is_empty()).collect();
    if ids.is_empty() || ids.len() > 200 {
        return Err(
            ApiError::bad_request("invalid_argument", "user_ids must list 1-200 users")
                .with("field", "user_ids"),
        );
    }
    let mut users = Vec::with_capacity(ids.len());
    for id in ids {
        let user = UserId::parse(id).map_err(|e| ApiError::from(e).with("field", "user_ids"))?;
        let (online, last_seen) = s.hub.presence(&user);
        users.push(json!({"user_id": user.as_str(), "online": online, "last_seen": last_seen}));
    }
    Ok(Json(json!({"users": users})))
}
