//! Admin calls (`X-Admin-Key`): provisioning users, minting tokens, region status, digests.

use std::sync::Arc;

use axum::extract::State;
use axum::Json;
use meridian_model::events::{event_envelope::Body, UserUpserted};
use meridian_model::{DeviceId, RegionId, UserId};
use serde::Deserialize;
use serde_json::{json, Value};

use crate::auth::{self, Claims};
use crate::error::{ApiError, ApiResult};
use crate::extract::{Admin, ApiJson, ApiPath};
use crate::state::AppState;

pub const MAX_DISPLAY_NAME_CHARS: usize = 128;

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
pub struct UpsertUser {
    home_region: String,
    #[serde(default)]
    display_name: String,
}

pub async fn put_user(
    _: Admin,
    State(s): State<Arc<AppState>>,
    ApiPath(user_id): ApiPath<String>,
    ApiJson(req): ApiJson<UpsertUser>,
) -> ApiResult<Json<Value>> {
    let user = UserId::parse(user_id)?;
    let home =
        RegionId::parse(req.home_region).map_err(|e| ApiError::from(e).with("field", "home_region"))?;
    if home != s.cfg.region && !s.cfg.region_endpoints.contains_key(home.as_str()) {
        return Err(
            ApiError::bad_request("unknown_region", format!("no region {home} in this deployment"))
                .with("field", "home_region"),
        );
    }
    if req.display_name.chars().count() > MAX_DISPLAY_NAME_CHARS {
        return Err(ApiError::bad_request(
            "invalid_argument",
            format!("display_name is longer than {MAX_DISPLAY_NAME_CHARS} characters"),
        )
        .with("field", "display_name"));
    }
    s.publish_and_apply(
        None,
        Body::UserUpserted(UserUpserted {
            user_id: user.to_string(),
            home_region: home.to_string(),
            display_name: req.display_name.clone(),
        }),
    )
    .await?;
    Ok(Json(json!({
        "user_id": user.as_str(),
        "home_region": home.as_str(),
        "display_name": req.display_name,
    })))
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
pub struct MintToken {
    user_id: String,
    device_id: String,
    /// Default: [`DEFAULT_TOKEN_TTL_S`], or the maximum when that is shorter.
    ttl_s: Option<u64>,
}

pub const DEFAULT_TOKEN_TTL_S: u64 = 3600;

pub async fn post_token(
    _: Admin,
    State(s): State<Arc<AppState>>,
    ApiJson(req): ApiJson<MintToken>,
) -> ApiResult<Json<Value>> {
    let user = UserId::parse(req.user_id)?;
    let device = DeviceId::parse(req.device_id)?;
    let ttl_s = req
        .ttl_s
        .unwrap_or(DEFAULT_TOKEN_TTL_S.min(s.cfg.max_token_ttl_s));
    if ttl_s == 0 || ttl_s > s.cfg.max_token_ttl_s {
        return Err(ApiError::bad_request(
            "invalid_argument",
            format!("ttl_s must be between 1 and {}", s.cfg.max_token_ttl_s),
        )
        .with("field", "ttl_s"));
    }
    if s.store.user(&user).await?.is_none() {
        return Err(ApiError::not_found("user_not_found", format!("no user {user}")));
    }
    let now = auth::now_s();
    let exp = now + ttl_s;
    let token = auth::sign(
        s.cfg.jwt_secret.as_bytes(),
        &Claims {
            sub: user.to_string(),
            dev: device.to_string(),
            exp,
            iat: Some(now),
        },
    );
    Ok(Json(json!({"token": token, "expires_at": exp})))
}

pub async fn get_regions(_: Admin, State(s): State<Arc<AppState>>) -> ApiResult<Json<Value>> {
    let stream = s.bus.stream();
    let cp = s.store.stream_checkpoint(&stream).await?;
    let state = s.bus.stream_state(&stream).await.ok();
    let applied = state
        .as_ref()
        .map_or(cp.seq, |st| crate::state::applied_in(&cp, st));
    let last = state.map(|st| st.last_seq);
    let serving = s.store.region_serving(&s.cfg.region).await?;
    let status = if serving.serving == s.cfg.region {
        "active"
    } else {
        "failed"
    };
    Ok(Json(json!({
        "regions": [{
            "region": s.cfg.region.as_str(),
            "status": status,
            "serving_for": [],
            "epoch": serving.epoch,
            "streams": {
                stream.clone(): {
                    "last_seq": last,
                    "applied": applied,
                    "apply_lag": last.map(|l| l.saturating_sub(applied)),
                    "mirror_lag": 0,
                }
            }
        }]
    })))
}

pub async fn get_digest(_: Admin, State(s): State<Arc<AppState>>) -> ApiResult<Json<Value>> {
    let stream = s.bus.stream();
    let applied = s.store.checkpoint(&stream).await?;
    let digest = s.store.digest().await?;
    Ok(Json(json!({
        "region": s.cfg.region.as_str(),
        "applied": { stream: applied },
        "digest": digest,
    })))
}
