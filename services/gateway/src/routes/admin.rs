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
use crate::health;
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

/// Every region of the deployment (this one first) with its status as this region's directory has it
/// (`active`: serving its own users; `failed`: another region serves them) and the regions
/// whose users it serves for them (`serving_for`); this region's entry also has every
/// stream it applies, its own and each mirror (see [`crate::health`]).
pub async fn get_regions(_: Admin, State(s): State<Arc<AppState>>) -> ApiResult<Json<Value>> {
    // This region first, then the others by name.
    let mut known = vec![s.cfg.region.clone()];
    known.extend(
        s.cfg
            .region_endpoints
            .keys()
            .filter_map(|r| RegionId::parse(r.clone()).ok())
            .filter(|r| *r != s.cfg.region),
    );
    let mut serving = Vec::with_capacity(known.len());
    for r in &known {
        serving.push(s.store.region_serving(r).await?);
    }
    let streams = health::streams(&s).await?;
    let regions: Vec<Value> = serving
        .iter()
        .map(|rs| {
            let serving_for: Vec<&str> = serving
                .iter()
                .filter(|other| other.region != rs.region && other.serving == rs.region)
                .map(|other| other.region.as_str())
                .collect();
            let mut entry = json!({
                "region": rs.region.as_str(),
                "status": if rs.serving == rs.region { "active" } else { "failed" },
                "serving": rs.serving.as_str(),
                "serving_for": serving_for,
                "epoch": rs.epoch,
            });
            if rs.region == s.cfg.region {
                let by_name: serde_json::Map<String, Value> =
                    streams.iter().map(|h| (h.stream.clone(), json!(h))).collect();
                entry["streams"] = Value::Object(by_name);
                entry["mirror_problems"] = json!(health::mirror_problems(
                    &streams,
                    std::time::Duration::from_secs(s.cfg.mirror_unhealthy_after_s)
                ));
            }
            entry
        })
        .collect();
    Ok(Json(json!({
        "region": s.cfg.region.as_str(),
        "regions": regions,
    })))
}

/// The digest of the replicated state (a store digest: it covers whatever every applied
/// stream wrote, not one stream's share) with the applied position of each stream, own and
/// mirrors. Equal digests at equal positions mean equal replicas. The positions are read
/// before and after the digest and the answer says whether they held still (`settled`), so
/// a digest taken while the applier moves is not compared as if it were not.
pub async fn get_digest(_: Admin, State(s): State<Arc<AppState>>) -> ApiResult<Json<Value>> {
    let streams = s.bus.applied_streams();
    let positions = |s: Arc<AppState>, streams: Vec<String>| async move {
        let mut applied = serde_json::Map::new();
        for stream in streams {
            let seq = s.store.checkpoint(&stream).await?;
            applied.insert(stream, json!(seq));
        }
        ApiResult::Ok(applied)
    };
    let mut answer = None;
    // A few tries for a digest between two equal readings; the applier rarely stops long.
    for _ in 0..3 {
        let before = positions(s.clone(), streams.clone()).await?;
        let digest = s.store.digest().await?;
        let after = positions(s.clone(), streams.clone()).await?;
        let settled = before == after;
        answer = Some((after, digest, settled));
        if settled {
            break;
        }
    }
    let (applied, digest, settled) = answer.expect("at least one try");
    Ok(Json(json!({
        "region": s.cfg.region.as_str(),
        "applied": applied,
        "digest": digest,
        "settled": settled,
    })))
}
