//! Request extractors that answer bad input with the API's JSON errors instead of axum's
//! plain-text rejections: bodies (`ApiJson`, with the 413 limit), queries, paths, the
//! authenticated caller and the admin key.

use std::sync::Arc;

use axum::extract::rejection::{BytesRejection, PathRejection, QueryRejection};
use axum::extract::{FromRequest, FromRequestParts, Path, Query, Request};
use axum::http::request::Parts;
use axum::http::StatusCode;
use bytes::Bytes;
use meridian_model::{DeviceId, RegionId, UserId};
use meridian_store::directory::UserView;
use serde::de::DeserializeOwned;

use crate::auth::{self, TokenError};
use crate::error::ApiError;
use crate::state::AppState;
use crate::GatewayConfig;

/// A JSON body. Oversized → 413 `too_large`; unparsable → 400 `malformed_json`.
pub struct ApiJson<T>(pub T);

impl<T: DeserializeOwned> FromRequest<Arc<AppState>> for ApiJson<T> {
    type Rejection = ApiError;

    async fn from_request(req: Request, state: &Arc<AppState>) -> Result<Self, ApiError> {
        let bytes = Bytes::from_request(req, state)
            .await
            .map_err(|e: BytesRejection| {
                if e.status() == StatusCode::PAYLOAD_TOO_LARGE {
                    ApiError::too_large("request body", state.cfg.max_body_bytes)
                } else {
                    ApiError::bad_request("malformed_body", e.body_text())
                }
            })?;
        serde_json::from_slice(&bytes)
            .map(ApiJson)
            .map_err(|e| ApiError::bad_request("malformed_json", format!("request body: {e}")))
    }
}

/// A query string; bad values → 400 `invalid_argument`.
pub struct ApiQuery<T>(pub T);

impl<T: DeserializeOwned + Send, S: Send + Sync> FromRequestParts<S> for ApiQuery<T> {
    type Rejection = ApiError;

    async fn from_request_parts(parts: &mut Parts, state: &S) -> Result<Self, ApiError> {
        Query::<T>::from_request_parts(parts, state)
            .await
            .map(|Query(q)| ApiQuery(q))
            .map_err(|e: QueryRejection| ApiError::bad_request("invalid_argument", e.body_text()))
    }
}

/// Path parameters; bad values → 400 `invalid_argument`.
pub struct ApiPath<T>(pub T);

impl<T: DeserializeOwned + Send, S: Send + Sync> FromRequestParts<S> for ApiPath<T> {
    type Rejection = ApiError;

    async fn from_request_parts(parts: &mut Parts, state: &S) -> Result<Self, ApiError> {
        Path::<T>::from_request_parts(parts, state)
            .await
            .map(|Path(p)| ApiPath(p))
            .map_err(|e: PathRejection| ApiError::bad_request("invalid_argument", e.body_text()))
    }
}

/// The authenticated user of a client call, served by this region, within its rate limit.
#[derive(Debug, Clone)]
pub struct Caller {
    pub user: UserId,
    pub device: DeviceId,
    pub view: UserView,
    /// The token's `exp` (seconds since the Unix epoch): a WebSocket closes then.
    pub token_expires_at_s: u64,
}

/// Where a user is served when it is not here: the `421 wrong_region` answer (HTTP) or the
/// `wrong_region` frame before close code 4421 (WebSocket).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct WrongRegion {
    pub region: RegionId,
    /// The region's public endpoint (`GatewayConfig::region_endpoints`); empty when this
    /// deployment's config does not name it.
    pub endpoint: String,
}

impl WrongRegion {
    /// `Some` when `view`'s user is served by another region than this gateway's.
    pub fn of(cfg: &GatewayConfig, view: &UserView) -> Option<WrongRegion> {
        (view.serving_region != cfg.region).then(|| WrongRegion::to(cfg, view.serving_region.clone()))
    }

    /// Go to `region`, at its endpoint in `cfg`.
    pub fn to(cfg: &GatewayConfig, region: RegionId) -> WrongRegion {
        WrongRegion {
            endpoint: cfg
                .region_endpoints
                .get(region.as_str())
                .cloned()
                .unwrap_or_default(),
            region,
        }
    }

    /// The WebSocket frame sent before closing with [`crate::ws::CLOSE_WRONG_REGION`].
    pub fn frame(&self) -> String {
        serde_json::json!({
            "op": "wrong_region",
            "region": self.region.as_str(),
            "endpoint": self.endpoint,
        })
        .to_string()
    }
}

impl From<WrongRegion> for ApiError {
    fn from(w: WrongRegion) -> Self {
        ApiError::new(
            StatusCode::MISDIRECTED_REQUEST,
            "wrong_region",
            format!("this user is served by region {}", w.region),
        )
        .with("region", w.region.as_str())
        .with("endpoint", w.endpoint)
    }
}

/// A client call's authenticated, provisioned user within its rate limit, wherever it is
/// served. Handlers take [`Caller`], which also refuses users served elsewhere; the
/// WebSocket upgrade takes this, because a browser cannot read an upgrade's refusal and is
/// told `wrong_region` in a frame instead.
#[derive(Debug, Clone)]
pub struct Authenticated {
    pub user: UserId,
    pub device: DeviceId,
    pub view: UserView,
    pub token_expires_at_s: u64,
}

impl Authenticated {
    /// The caller, or where it is served when that is not here.
    pub fn served_here(self, cfg: &GatewayConfig) -> Result<Caller, WrongRegion> {
        match WrongRegion::of(cfg, &self.view) {
            Some(w) => Err(w),
            None => Ok(Caller {
                user: self.user,
                device: self.device,
                view: self.view,
                token_expires_at_s: self.token_expires_at_s,
            }),
        }
    }
}

impl FromRequestParts<Arc<AppState>> for Authenticated {
    type Rejection = ApiError;

    async fn from_request_parts(parts: &mut Parts, state: &Arc<AppState>) -> Result<Self, ApiError> {
        let token = bearer(parts).ok_or_else(|| ApiError::unauthorized("missing bearer token"))?;
        let claims = auth::verify(
            state.cfg.jwt_secret.as_bytes(),
            &token,
            auth::now_s(),
            state.cfg.max_token_ttl_s,
        )
        .map_err(|e| {
            state.metrics.auth_failures.inc();
            match e {
                TokenError::Expired => ApiError::unauthorized("token has expired"),
                other => ApiError::unauthorized(other.to_string()),
            }
        })?;
        let user = UserId::parse(claims.sub)
            .map_err(|_| ApiError::unauthorized("token subject is not a user id"))?;
        let device = DeviceId::parse(claims.dev)
            .map_err(|_| ApiError::unauthorized("token device is not a device id"))?;
        crate::service::admit(state, &user)?;
        let view = state
            .store
            .user(&user)
            .await?
            .ok_or_else(|| ApiError::forbidden("the user of this token is not provisioned"))?;
        Ok(Authenticated {
            user,
            device,
            view,
            token_expires_at_s: claims.exp,
        })
    }
}

impl FromRequestParts<Arc<AppState>> for Caller {
    type Rejection = ApiError;

    /// Every client call but the WebSocket upgrade: a user served by another region gets
    /// `421 wrong_region` with that region's endpoint, read from the directory per request.
    async fn from_request_parts(parts: &mut Parts, state: &Arc<AppState>) -> Result<Self, ApiError> {
        let who = Authenticated::from_request_parts(parts, state).await?;
        let caller = who.served_here(&state.cfg)?;
        // A write of a user served here, while this region cannot tell whether they were
        // failed over elsewhere (the fence after a hang, `crate::fence`).
        if parts.method != axum::http::Method::GET && parts.method != axum::http::Method::HEAD {
            state.fence.check(state, &caller.view).await?;
        }
        Ok(caller)
    }
}

/// The token from `Authorization: Bearer`, or `?token=` (browsers cannot set headers on a
/// WebSocket, so the query form is accepted on `/v1/ws` only: elsewhere it would end up in
/// access logs).
fn bearer(parts: &Parts) -> Option<String> {
    if let Some(h) = parts.headers.get(axum::http::header::AUTHORIZATION) {
        let h = h.to_str().ok()?;
        let (scheme, token) = h.split_once(' ')?;
        return scheme
            .eq_ignore_ascii_case("bearer")
            .then(|| token.trim().to_string());
    }
    if parts.uri.path() == "/v1/ws" {
        let q = parts.uri.query()?;
        return q
            .split('&')
            .filter_map(|kv| kv.split_once('='))
            .find(|(k, _)| *k == "token")
            .map(|(_, v)| v.to_string());
    }
    None
}

/// An admin call: `X-Admin-Key` must match.
pub struct Admin;

impl FromRequestParts<Arc<AppState>> for Admin {
    type Rejection = ApiError;

    async fn from_request_parts(parts: &mut Parts, state: &Arc<AppState>) -> Result<Self, ApiError> {
        let given = parts
            .headers
            .get("x-admin-key")
            .and_then(|v| v.to_str().ok())
            .ok_or_else(|| ApiError::unauthorized("missing X-Admin-Key"))?;
        if auth::admin_key_matches(&state.cfg.admin_key, given) {
            Ok(Admin)
        } else {
            state.metrics.auth_failures.inc();
            Err(ApiError::unauthorized("wrong admin key"))
        }
    }
}
