//! Admin calls (`X-Admin-Key`): provisioning users, minting tokens, region status, digests,
//! failover and failback, storage timelines as stored.

use std::sync::Arc;

use axum::extract::State;
use axum::Json;
use meridian_model::events::{
    event_envelope::Body, RegionFailback, RegionFailover, StreamPosition, UserUpserted,
};
use meridian_model::{ConversationId, Cursor, DeviceId, EventId, RegionId, UserId};
use meridian_store::directory::RegionServing;
use meridian_store::timeline::HistoryPage;
use serde::Deserialize;
use serde_json::{json, Value};

use crate::auth::{self, Claims};
use crate::error::{ApiError, ApiResult};
use crate::extract::{Admin, ApiJson, ApiPath, ApiQuery};
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
    Ok(Json(regions_json(&s).await?))
}

/// The answer of [`get_regions`] (the console's feed samples it too).
pub async fn regions_json(s: &AppState) -> ApiResult<Value> {
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
    let streams = health::streams(s).await?;
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
                if let Some(search) = &s.search {
                    let st = search.status();
                    entry["search"] = json!({"documents": st.documents, "lag_events": st.lag_events,
                        "rebuilding": st.rebuilding, "last_commit_ms": st.last_commit_ms});
                }
            }
            entry
        })
        .collect();
    Ok(json!({
        "region": s.cfg.region.as_str(),
        "regions": regions,
    }))
}

/// Rebuilds this region's search index from the store (`meridian admin reindex`). The
/// index keeps answering meanwhile, from what it held and what the rebuild has added;
/// `GET /v1/admin/regions` shows `search.rebuilding` until it is done.
pub async fn post_search_reindex(_: Admin, State(s): State<Arc<AppState>>) -> ApiResult<Json<Value>> {
    let search = s
        .search
        .as_ref()
        .ok_or_else(|| ApiError::unavailable("this process does not run the search index"))?;
    let started = search.request_reindex();
    Ok(Json(json!({
        "region": s.cfg.region.as_str(),
        "requested": started,
        "rebuilding": search.status().rebuilding,
    })))
}

/// The digest of the replicated state (a store digest: it covers whatever every applied
/// stream wrote, not one stream's share) with the applied position of each stream, own and
/// mirrors. Equal digests at equal positions mean equal replicas. The positions are read
/// before and after the digest and the answer says whether they held still (`settled`), so
/// a digest taken while the applier moves is not compared as if it were not.
pub async fn get_digest(_: Admin, State(s): State<Arc<AppState>>) -> ApiResult<Json<Value>> {
    Ok(Json(digest_json(&s).await?))
}

/// The answer of [`get_digest`] (the console's feed samples it too).
pub async fn digest_json(s: &Arc<AppState>) -> ApiResult<Value> {
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
    Ok(json!({
        "region": s.cfg.region.as_str(),
        "applied": applied,
        "digest": digest,
        "settled": settled,
    }))
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
pub struct FailoverRequest {
    pub region: String,
    /// The acting region; default: this one. Another region's answer is `421` to it.
    pub to: Option<String>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
pub struct FailbackRequest {
    pub region: String,
}

/// Who asked for a failover or failback (`X-Operator`, optional: the console always sends
/// it), for the region log. A name, not a credential.
pub const OPERATOR_HEADER: &str = "x-operator";

/// The operator named in `headers`, validated (`^[A-Za-z0-9][A-Za-z0-9 _.@-]{0,63}$`).
pub fn operator(headers: &axum::http::HeaderMap) -> ApiResult<Option<String>> {
    let Some(v) = headers.get(OPERATOR_HEADER) else {
        return Ok(None);
    };
    let name = v.to_str().unwrap_or_default();
    let valid = (1..=64).contains(&name.len())
        && name.as_bytes()[0].is_ascii_alphanumeric()
        && name
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || matches!(b, b' ' | b'_' | b'.' | b'@' | b'-'));
    if !valid {
        return Err(ApiError::bad_request(
            "invalid_argument",
            "X-Operator must be 1-64 characters of [A-Za-z0-9 _.@-], starting with a letter or digit",
        )
        .with("field", "X-Operator"));
    }
    Ok(Some(name.to_string()))
}

/// One failover or failback at a time in this process: with the event ids derived from the
/// register they change, two concurrent calls publish the same event (JetStream keeps one).
static REGION_MOVES: tokio::sync::Mutex<()> = tokio::sync::Mutex::const_new(());

/// How long a failover or failback waits for this region to apply its own event before
/// answering (the event is in the stream already: the answer then says `applied: false`).
const MOVE_APPLY_WAIT: std::time::Duration = std::time::Duration::from_secs(10);

pub(crate) fn deployment_region(s: &AppState, name: String, field: &str) -> ApiResult<RegionId> {
    let r = RegionId::parse(name).map_err(|e| ApiError::from(e).with("field", field))?;
    if r != s.cfg.region && !s.cfg.region_endpoints.contains_key(r.as_str()) {
        return Err(
            ApiError::bad_request("unknown_region", format!("no region {r} in this deployment"))
                .with("field", field),
        );
    }
    Ok(r)
}

/// The id of the event that moves `region`'s users away from the state `epoch` names: the
/// same for every repetition of the same move, so JetStream's duplicate window and the
/// applier's record of applied events keep one.
fn move_event_id(kind: &str, region: &RegionId, to: &RegionId, epoch: &str) -> EventId {
    use sha2::{Digest, Sha256};
    let mut h = Sha256::new();
    for part in [
        "meridian/region-move/1",
        kind,
        region.as_str(),
        to.as_str(),
        epoch,
    ] {
        h.update(part.as_bytes());
        h.update(b"\0");
    }
    let d = h.finalize();
    let mut b = [0u8; 16];
    b.copy_from_slice(&d[..16]);
    // Version 8 (custom) and the RFC variant, like message ids.
    b[6] = (b[6] & 0x0f) | 0x80;
    b[8] = (b[8] & 0x3f) | 0x80;
    EventId::from_bytes(&b).expect("16 bytes")
}

/// Polls until this region's register says `serving` serves `region`, bounded.
async fn wait_serving(
    s: &AppState,
    region: &RegionId,
    serving: &RegionId,
) -> ApiResult<(RegionServing, bool)> {
    let deadline = std::time::Instant::now() + MOVE_APPLY_WAIT;
    loop {
        let now = s.store.region_serving(region).await?;
        if now.serving == *serving || std::time::Instant::now() >= deadline {
            let applied = now.serving == *serving;
            return Ok((now, applied));
        }
        tokio::time::sleep(std::time::Duration::from_millis(20)).await;
    }
}

fn move_answer(rs: &RegionServing, changed: bool, applied: bool) -> Value {
    let point: serde_json::Map<String, Value> = rs
        .failover_point
        .iter()
        .map(|(stream, seq)| (stream.clone(), json!(seq)))
        .collect();
    json!({
        "region": rs.region.as_str(),
        "serving": rs.serving.as_str(),
        "epoch": rs.epoch,
        "changed": changed,
        "applied": applied,
        "failover_point": point,
    })
}

/// `POST /v1/admin/failover {"region", "to"}`, answered by the acting region `to`: its users
/// are served here from the moment this region applies the event. The event records the
/// failover point (how far this region had applied every stream; its own stream: all it
/// holds), which failback waits for. Repeating it answers the same without a new event.
pub async fn post_failover(
    _: Admin,
    State(s): State<Arc<AppState>>,
    headers: axum::http::HeaderMap,
    ApiJson(req): ApiJson<FailoverRequest>,
) -> ApiResult<Json<Value>> {
    let who = operator(&headers)?;
    Ok(Json(failover(&s, req, who.as_deref()).await?))
}

/// What [`post_failover`] does, for `operator` (logged with the move).
pub async fn failover(s: &AppState, req: FailoverRequest, operator: Option<&str>) -> ApiResult<Value> {
    let region = deployment_region(s, req.region, "region")?;
    let to = match req.to {
        Some(t) => deployment_region(s, t, "to")?,
        None => s.cfg.region.clone(),
    };
    if to == region {
        // Well-formed, but in conflict with where the region's users are: 409, not 400 (the
        // document cannot state "region differs from to", and 400 means "fix the request's
        // shape").
        return Err(ApiError::new(
            axum::http::StatusCode::CONFLICT,
            "failover_to_itself",
            format!("region {region} cannot be failed over to itself: use failback"),
        )
        .with("field", "to"));
    }
    if to != s.cfg.region {
        // The acting region publishes the move on its own stream, so that repeats and races
        // meet in one stream's duplicate window.
        return Err(crate::extract::WrongRegion::to(&s.cfg, to).into());
    }
    let _one = REGION_MOVES.lock().await;
    let before = s.store.region_serving(&region).await?;
    if before.serving == to {
        tracing::info!(%region, %to, operator = operator.unwrap_or("-"), "failover repeated: already so");
        return Ok(move_answer(&before, false, true));
    }
    let own = s.bus.stream();
    let mut applied = Vec::new();
    for stream in s.bus.applied_streams() {
        let mut seq = s.store.checkpoint(&stream).await?;
        if stream == own {
            // Everything this region acknowledged, applied yet or not.
            seq = seq.max(s.bus.stream_state(&stream).await?.last_seq);
        }
        applied.push(StreamPosition { stream, seq });
    }
    s.publish_and_apply_as(
        None,
        move_event_id("failover", &region, &to, &before.epoch),
        Body::RegionFailover(RegionFailover {
            region: region.to_string(),
            to: to.to_string(),
            applied,
        }),
    )
    .await?;
    let (after, done) = wait_serving(s, &region, &to).await?;
    tracing::info!(%region, %to, epoch = %after.epoch, operator = operator.unwrap_or("-"), "failover");
    Ok(move_answer(&after, true, done))
}

/// `POST /v1/admin/failback {"region"}`, answered by the home region `region` (elsewhere
/// `421` to it): `409 not_caught_up` with the lag per stream until this region has applied
/// every stream up to the failover point, and every mirror up to what its origin holds
/// (the acting region's: what it accepted from the moved users since), with every mirror
/// heard from within `fence_after_s` and the fence ([`crate::fence`]) sure; then a
/// RegionFailback on this region's stream.
pub async fn post_failback(
    _: Admin,
    State(s): State<Arc<AppState>>,
    headers: axum::http::HeaderMap,
    ApiJson(req): ApiJson<FailbackRequest>,
) -> ApiResult<Json<Value>> {
    let who = operator(&headers)?;
    Ok(Json(failback(&s, req, who.as_deref()).await?))
}

/// What [`post_failback`] does, for `operator` (logged with the move or the refusal).
pub async fn failback(s: &AppState, req: FailbackRequest, operator: Option<&str>) -> ApiResult<Value> {
    let region = deployment_region(s, req.region, "region")?;
    if region != s.cfg.region {
        return Err(crate::extract::WrongRegion::to(&s.cfg, region).into());
    }
    let _one = REGION_MOVES.lock().await;
    let rs = s.store.region_serving(&region).await?;
    let streams = health::streams(s).await?;
    let mut lag = serde_json::Map::new();
    let mut behind = |stream: &str, target: u64, applied: u64| {
        if applied < target {
            let prev = lag.get(stream).and_then(Value::as_u64).unwrap_or(0);
            lag.insert(stream.to_string(), json!(prev.max(target - applied)));
        }
    };
    for (stream, seq) in &rs.failover_point {
        let applied = s.store.checkpoint(stream).await?;
        behind(stream, *seq, applied);
    }
    // Every mirror applied up to what its origin holds now (the acting region's: what the
    // moved users sent meanwhile), and heard from lately: a mirror that has not re-attached
    // since a restart reports a stale position and lag 0.
    let mut reasons = s.fence.unsure(s).await;
    let bound_ms = s.cfg.fence_after_s.saturating_mul(1000);
    for h in streams.iter().filter(|h| h.mirror) {
        behind(&h.stream, h.last_seq.unwrap_or(0) + h.mirror_lag, h.applied);
        if h.active_age_ms.is_none_or(|a| a > bound_ms) || h.error.is_some() {
            reasons.push(format!(
                "mirror {} of region {} has not heard from its origin lately (active age {:?} ms, error {:?})",
                h.stream, h.origin, h.active_age_ms, h.error
            ));
        }
    }
    if !lag.is_empty() || !reasons.is_empty() {
        tracing::info!(%region, operator = operator.unwrap_or("-"), lag = ?lag, reasons = ?reasons, "failback refused: not caught up");
        return Err(ApiError::new(
            axum::http::StatusCode::CONFLICT,
            "not_caught_up",
            format!(
                "region {region} has not applied everything region {} had when it took over, or cannot tell yet",
                rs.serving
            ),
        )
        .with("lag", Value::Object(lag))
        .with("reasons", reasons)
        .retry_after(1));
    }
    // The checks took a while: a failover applied meanwhile (its event reached this region
    // through the mirror the checks waited for) makes the state read above stale, and
    // answering from it would call a region "already home" that was just failed over. Ask
    // again; the next call reads the failover and checks its point.
    let now = s.store.region_serving(&region).await?;
    if (&now.serving, &now.epoch) != (&rs.serving, &rs.epoch) {
        return Err(ApiError::new(
            axum::http::StatusCode::CONFLICT,
            "not_caught_up",
            format!("region {region}'s serving state changed while it was checked; retry"),
        )
        .with("lag", Value::Object(serde_json::Map::new()))
        .with(
            "reasons",
            vec![format!("region {region} was moved while checking")],
        )
        .retry_after(1));
    }
    if rs.serving == region {
        tracing::info!(%region, operator = operator.unwrap_or("-"), "failback repeated: already home");
        return Ok(move_answer(&rs, false, true));
    }
    s.publish_and_apply_as(
        None,
        move_event_id("failback", &region, &region, &rs.epoch),
        Body::RegionFailback(RegionFailback {
            region: region.to_string(),
        }),
    )
    .await?;
    let (after, done) = wait_serving(s, &region, &region).await?;
    tracing::info!(%region, epoch = %after.epoch, operator = operator.unwrap_or("-"), "failback");
    Ok(move_answer(&after, true, done))
}

/// Largest page of [`get_timeline`].
pub const MAX_TIMELINE_LIMIT: usize = 1000;
const DEFAULT_TIMELINE_LIMIT: usize = 100;

#[derive(Deserialize)]
pub struct TimelineQuery {
    after: Option<String>,
    limit: Option<usize>,
}

/// `GET /v1/admin/conversations/{cid}/messages?after&limit`: this region's storage timeline of
/// a conversation as stored, oldest first, recalled messages included as tombstones, for no
/// member in particular (nothing anyone deleted for themselves is left out). The drill's
/// checker reads it in every region to prove each acknowledged message is stored exactly
/// once everywhere.
pub async fn get_timeline(
    _: Admin,
    State(s): State<Arc<AppState>>,
    ApiPath(cid): ApiPath<String>,
    ApiQuery(q): ApiQuery<TimelineQuery>,
) -> ApiResult<Json<Value>> {
    let cid = ConversationId::parse(cid)?;
    let limit = q.limit.unwrap_or(DEFAULT_TIMELINE_LIMIT);
    if !(1..=MAX_TIMELINE_LIMIT).contains(&limit) {
        return Err(ApiError::bad_request(
            "invalid_argument",
            format!("limit must be between 1 and {MAX_TIMELINE_LIMIT}"),
        )
        .with("field", "limit"));
    }
    let page = match q.after.as_deref() {
        None | Some("") => HistoryPage::After(None),
        Some(a) => HistoryPage::After(Some(
            Cursor::parse(a).map_err(|e| ApiError::from(e).with("field", "after"))?,
        )),
    };
    if s.store.conversation(&cid).await?.is_none() {
        return Err(ApiError::not_found(
            "not_found",
            format!("no conversation {cid} in region {}", s.cfg.region),
        ));
    }
    let h = s.store.timeline_as_stored(&cid, page, limit).await?;
    let next = if h.more {
        h.messages
            .last()
            .map(|m| m.order_key.cursor().as_str().to_string())
    } else {
        None
    };
    Ok(Json(json!({
        "messages": h.messages.iter().map(crate::render::message).collect::<Vec<_>>(),
        "next_cursor": next,
    })))
}
