//! The gateway's typed configuration: read from the `[gateway]` table of a region file, with
//! environment overrides applied by the binary, validated once at start.

use std::collections::BTreeMap;
use std::net::SocketAddr;

use meridian_model::RegionId;
use serde::Deserialize;

use crate::GatewayError;

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct GatewayConfig {
    /// The region this gateway serves.
    pub region: RegionId,
    /// Where to listen; port 0 picks a free port (tests).
    #[serde(default = "default_listen")]
    pub listen: SocketAddr,
    /// HS256 key for client tokens (at least 32 bytes).
    pub jwt_secret: String,
    /// The key admin calls carry in `X-Admin-Key` (at least 16 bytes).
    pub admin_key: String,
    /// Largest accepted request body; 413 above it.
    #[serde(default = "default_max_body")]
    pub max_body_bytes: usize,
    /// Per-user request rate (token bucket refill per second) and burst.
    #[serde(default = "default_rate")]
    pub rate_limit_per_s: f64,
    #[serde(default = "default_burst")]
    pub rate_limit_burst: f64,
    /// How long after sending a sender may recall a message (admins always may).
    #[serde(default = "default_recall_window")]
    pub recall_window_s: u64,
    /// Longest token lifetime: `POST /v1/admin/tokens` issues no longer `ttl_s`, and a
    /// token (app-minted ones included) whose `exp - iat` (or `exp - now` without `iat`)
    /// is longer is refused 401. At most one year.
    #[serde(default = "default_max_token_ttl")]
    pub max_token_ttl_s: u64,
    /// How long a state change (not a message send) waits for the local applier before
    /// answering, so a client reads its own write. Messages answer at the PubAck.
    #[serde(default = "default_read_your_writes")]
    pub read_your_writes_ms: u64,
    /// WebSockets one user may hold open on this gateway; one more is refused with
    /// `429 too_many_sockets`.
    #[serde(default = "default_max_sockets_per_user")]
    pub max_sockets_per_user: usize,
    /// Live messages one WebSocket's NATS subscription buffers. A socket that falls further
    /// behind loses live entries and fills the gap from the store, so this only bounds
    /// memory: it never loses anything.
    #[serde(default = "default_ws_subscription_capacity")]
    pub ws_subscription_capacity: usize,
    /// Public endpoint of every region's gateway, for `421 wrong_region` answers.
    #[serde(default)]
    pub region_endpoints: BTreeMap<String, String>,
    /// Added to the wall clock the gateway's HLC reads, in ms (negative: behind). 0 in
    /// production; clock-skew drills and tests set it (`MERIDIAN__GATEWAY__CLOCK_OFFSET_MS`).
    #[serde(default)]
    pub clock_offset_ms: i64,
    /// `/readyz` fails while a mirror of another region's stream has not heard from its
    /// origin for longer than this (a cut link still reports mirror lag 0; only the age of
    /// its last contact tells), or reports an error.
    #[serde(default = "default_mirror_unhealthy_after")]
    pub mirror_unhealthy_after_s: u64,
    /// The fence after a hang (docs/design.md §7, [`crate::fence`]): while a mirror of
    /// another region has not heard from its origin for longer than this, this region may
    /// have missed a failover of its users and refuses their writes (`503 region_unsure`).
    /// The price: a link cut for longer than this stops writes of the cut region's users.
    #[serde(default = "default_fence_after")]
    pub fence_after_s: u64,
    /// The durability level of this region's sends (docs/design.md §6): `process`, `disk`
    /// or `geo`. It must match the region's nats-server: `disk` and `geo` promise that it
    /// runs `jetstream { sync_interval: always }` (`meridian up --durability` renders both).
    /// A send may ask for a stronger level with `Meridian-Durability`.
    #[serde(default)]
    pub durability: meridian_bus::Durability,
    /// Group commit (`disk`, `geo`): how long a batch of sends waits for more after its first,
    /// in µs. 0: a batch takes only what arrives while the previous ones are being committed.
    #[serde(default = "default_group_commit_window_us")]
    pub group_commit_window_us: u64,
    /// How long a `geo` send waits for another region to confirm its copy before it answers
    /// `503 not_geo_durable` (stored here; a retry with the same client_msg_id is safe).
    #[serde(default = "default_geo_ack_timeout_ms")]
    pub geo_ack_timeout_ms: u64,
    /// The operator console (`[console]` of the region file, which the region process copies
    /// here): where drill reports are.
    #[serde(default)]
    pub console: crate::console::ConsoleConfig,
}

/// The longest `mirror_unhealthy_after_s`: beyond a day a dead link would go unnoticed.
pub const MAX_MIRROR_UNHEALTHY_AFTER_S: u64 = 24 * 3600;

/// The largest `max_token_ttl_s` a config may give: tokens cannot be revoked one by one,
/// so their lifetime is the window a leaked one stays useful.
pub const MAX_TOKEN_TTL_LIMIT_S: u64 = 365 * 24 * 3600;

/// A skew drill has no use for more than a week, and a typo in the sign or unit of a larger
/// one would stamp events years off.
const MAX_CLOCK_OFFSET_MS: u64 = 7 * 24 * 3600 * 1000;

fn default_listen() -> SocketAddr {
    SocketAddr::from(([127, 0, 0, 1], 0))
}
fn default_max_body() -> usize {
    64 * 1024
}
fn default_rate() -> f64 {
    500.0
}
fn default_burst() -> f64 {
    1_000.0
}
fn default_recall_window() -> u64 {
    120
}
fn default_max_token_ttl() -> u64 {
    30 * 24 * 3600
}
fn default_max_sockets_per_user() -> usize {
    16
}
fn default_ws_subscription_capacity() -> usize {
    256
}
fn default_read_your_writes() -> u64 {
    3_000
}
fn default_mirror_unhealthy_after() -> u64 {
    30
}
fn default_group_commit_window_us() -> u64 {
    200
}
fn default_geo_ack_timeout_ms() -> u64 {
    5_000
}

fn default_fence_after() -> u64 {
    30
}

impl GatewayConfig {
    /// A config with defaults for everything but the region and keys.
    pub fn new(region: RegionId, jwt_secret: impl Into<String>, admin_key: impl Into<String>) -> Self {
        Self {
            region,
            listen: default_listen(),
            jwt_secret: jwt_secret.into(),
            admin_key: admin_key.into(),
            max_body_bytes: default_max_body(),
            rate_limit_per_s: default_rate(),
            rate_limit_burst: default_burst(),
            recall_window_s: default_recall_window(),
            max_token_ttl_s: default_max_token_ttl(),
            read_your_writes_ms: default_read_your_writes(),
            max_sockets_per_user: default_max_sockets_per_user(),
            ws_subscription_capacity: default_ws_subscription_capacity(),
            region_endpoints: BTreeMap::new(),
            clock_offset_ms: 0,
            mirror_unhealthy_after_s: default_mirror_unhealthy_after(),
            fence_after_s: default_fence_after(),
            durability: meridian_bus::Durability::default(),
            group_commit_window_us: default_group_commit_window_us(),
            geo_ack_timeout_ms: default_geo_ack_timeout_ms(),
            console: Default::default(),
        }
    }

    /// Checks every field; the error names the bad one.
    pub fn validate(&self) -> Result<(), GatewayError> {
        let bad = |field: &'static str, reason: String| Err(GatewayError::Config { field, reason });
        if self.jwt_secret.len() < 32 {
            return bad("gateway.jwt_secret", "must be at least 32 bytes".into());
        }
        if self.admin_key.len() < 16 {
            return bad("gateway.admin_key", "must be at least 16 bytes".into());
        }
        if !(1024..=64 * 1024 * 1024).contains(&self.max_body_bytes) {
            return bad(
                "gateway.max_body_bytes",
                "must be between 1 KiB and 64 MiB".into(),
            );
        }
        if !(self.rate_limit_per_s > 0.0 && self.rate_limit_per_s.is_finite()) {
            return bad("gateway.rate_limit_per_s", "must be a positive number".into());
        }
        if !(self.rate_limit_burst >= 1.0 && self.rate_limit_burst.is_finite()) {
            return bad("gateway.rate_limit_burst", "must be at least 1".into());
        }
        if self.clock_offset_ms.unsigned_abs() > MAX_CLOCK_OFFSET_MS {
            return bad(
                "gateway.clock_offset_ms",
                format!("must be within ±{MAX_CLOCK_OFFSET_MS} ms (one week)"),
            );
        }
        if !(1..=MAX_TOKEN_TTL_LIMIT_S).contains(&self.max_token_ttl_s) {
            return bad(
                "gateway.max_token_ttl_s",
                format!("must be between 1 and {MAX_TOKEN_TTL_LIMIT_S} (one year)"),
            );
        }
        if self.max_sockets_per_user == 0 {
            return bad("gateway.max_sockets_per_user", "must be at least 1".into());
        }
        if !(1..=65_536).contains(&self.ws_subscription_capacity) {
            return bad(
                "gateway.ws_subscription_capacity",
                "must be between 1 and 65536".into(),
            );
        }
        if !(1..=MAX_MIRROR_UNHEALTHY_AFTER_S).contains(&self.fence_after_s) {
            return bad(
                "gateway.fence_after_s",
                format!("must be between 1 and {MAX_MIRROR_UNHEALTHY_AFTER_S} (one day)"),
            );
        }
        if !(1..=MAX_MIRROR_UNHEALTHY_AFTER_S).contains(&self.mirror_unhealthy_after_s) {
            return bad(
                "gateway.mirror_unhealthy_after_s",
                format!("must be between 1 and {MAX_MIRROR_UNHEALTHY_AFTER_S} (one day)"),
            );
        }
        if self.group_commit_window_us > 10_000 {
            return bad(
                "gateway.group_commit_window_us",
                "must be at most 10000 (10 ms): every send waits for it".into(),
            );
        }
        if !(1..=60_000).contains(&self.geo_ack_timeout_ms) {
            return bad("gateway.geo_ack_timeout_ms", "must be between 1 and 60000".into());
        }
        for (region, endpoint) in &self.region_endpoints {
            if RegionId::parse(region.clone()).is_err() {
                return bad(
                    "gateway.region_endpoints",
                    format!("{region:?} is not a region id"),
                );
            }
            if !(endpoint.starts_with("http://") || endpoint.starts_with("https://")) {
                return bad(
                    "gateway.region_endpoints",
                    format!("{endpoint:?} is not an http(s) URL"),
                );
            }
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn cfg() -> GatewayConfig {
        GatewayConfig::new(RegionId::parse("us").unwrap(), "k".repeat(32), "a".repeat(16))
    }

    #[test]
    fn item6_mirror_unhealthy_after_defaults_to_30_s_and_is_bounded() {
        assert_eq!(cfg().mirror_unhealthy_after_s, 30);
        for (value, ok) in [
            (0, false),
            (1, true),
            (MAX_MIRROR_UNHEALTHY_AFTER_S, true),
            (MAX_MIRROR_UNHEALTHY_AFTER_S + 1, false),
        ] {
            let mut c = cfg();
            c.mirror_unhealthy_after_s = value;
            match c.validate() {
                Ok(()) => assert!(ok, "{value} accepted"),
                Err(GatewayError::Config { field, .. }) => {
                    assert!(!ok, "{value} refused");
                    assert_eq!(field, "gateway.mirror_unhealthy_after_s");
                }
                Err(e) => panic!("{e}"),
            }
        }
        // A region file without the field gets the default.
        let parsed: GatewayConfig = toml_like_defaults();
        assert_eq!(parsed.mirror_unhealthy_after_s, 30);
    }

    /// The config as serde fills it from only the required fields.
    fn toml_like_defaults() -> GatewayConfig {
        serde_json::from_value(serde_json::json!({
            "region": "us", "jwt_secret": "k".repeat(32), "admin_key": "a".repeat(16)
        }))
        .unwrap()
    }
}
