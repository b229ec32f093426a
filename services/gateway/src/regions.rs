//! What reaches members served by other regions without being stored: typing frames and
//! presence. Both travel over the NATS link between regions (core NATS, never a stream).
//!
//! - Typing to a member served by region `r` is published on `r`'s ephemeral subject for
//!   that user, where the member's sockets (on `r`'s gateways) are subscribed.
//! - Presence: each gateway answers requests on its region's presence subject from its hub
//!   (request `{"user_ids": [...]}`, reply `{"users": {"<id>": {"online", "last_seen_ms"}}}`),
//!   and `GET /v1/presence` asks the serving region of each user not served here, one request
//!   per region, each bounded by [`PRESENCE_TIMEOUT`]. A region that does not answer in time
//!   reads as "never seen" for its users: presence is a hint, not worth a 5xx.

use std::collections::{BTreeMap, HashMap};
use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use futures::StreamExt as _;
use meridian_bus::Bus;
use meridian_model::{RegionId, UserId};
use serde::{Deserialize, Serialize};
use tokio_util::sync::CancellationToken;

use crate::live::Hub;

/// How long `GET /v1/presence` waits for another region's answer: a WAN round trip is tens
/// of ms, and presence is not worth holding a request much longer.
pub const PRESENCE_TIMEOUT: Duration = Duration::from_millis(500);

/// The most users one presence request to another region may name (what
/// `GET /v1/presence` accepts); a larger request is answered for none of them.
pub const MAX_PRESENCE_REQUEST_USERS: usize = crate::routes::sync::MAX_PRESENCE_USERS;

/// A presence request between regions.
#[derive(Debug, Serialize, Deserialize)]
pub struct PresenceRequest {
    pub user_ids: Vec<String>,
}

/// One user's presence as a region reports it.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct UserPresence {
    pub online: bool,
    /// When a socket of the user was last open there (ms since the Unix epoch); `None` if
    /// never since that gateway started.
    pub last_seen_ms: Option<u64>,
}

/// A presence reply between regions.
#[derive(Debug, Default, Serialize, Deserialize)]
pub struct PresenceReply {
    pub users: BTreeMap<String, UserPresence>,
}

/// Answers presence requests for this region from `hub` until `shutdown`.
pub async fn run_presence_responder(
    bus: Bus,
    mut requests: async_nats::Subscriber,
    hub: Arc<Hub>,
    shutdown: CancellationToken,
) {
    loop {
        let msg = tokio::select! {
            _ = shutdown.cancelled() => return,
            msg = requests.next() => match msg {
                Some(msg) => msg,
                None => return,
            },
        };
        let Some(reply_to) = msg.reply else { continue };
        let reply = match serde_json::from_slice::<PresenceRequest>(&msg.payload) {
            Ok(req) if req.user_ids.len() <= MAX_PRESENCE_REQUEST_USERS => answer(&hub, &req),
            // Unreadable or oversized: an empty answer, which the asker reads as "never seen".
            _ => PresenceReply::default(),
        };
        let payload = match serde_json::to_vec(&reply) {
            Ok(p) => Bytes::from(p),
            Err(_) => continue,
        };
        if let Err(e) = bus.publish_ephemeral(reply_to.to_string(), payload).await {
            tracing::debug!(error = %e, "presence reply failed");
        }
    }
}

fn answer(hub: &Hub, req: &PresenceRequest) -> PresenceReply {
    let users = req
        .user_ids
        .iter()
        .filter_map(|id| UserId::parse(id.clone()).ok())
        .map(|user| {
            let (online, last_seen_ms) = hub.presence(&user);
            (user.to_string(), UserPresence { online, last_seen_ms })
        })
        .collect();
    PresenceReply { users }
}

/// Presence of `users` as their serving regions report it: one request per region, all at
/// once, each bounded by [`PRESENCE_TIMEOUT`]. Users of a region that did not answer (or
/// does not know them) are missing from the map.
pub async fn remote_presence(
    bus: &Bus,
    users: HashMap<RegionId, Vec<UserId>>,
) -> HashMap<UserId, UserPresence> {
    let asks = users.into_iter().map(|(region, users)| async move {
        let req = PresenceRequest {
            user_ids: users.iter().map(|u| u.to_string()).collect(),
        };
        let payload = match serde_json::to_vec(&req) {
            Ok(p) => Bytes::from(p),
            Err(_) => return Vec::new(),
        };
        let subject = bus.presence_subject(&region);
        let reply = match tokio::time::timeout(PRESENCE_TIMEOUT, bus.client().request(subject, payload)).await
        {
            Ok(Ok(msg)) => msg,
            Ok(Err(e)) => {
                tracing::debug!(region = %region, error = %e, "presence request failed");
                return Vec::new();
            }
            Err(_) => {
                tracing::debug!(region = %region, "presence request timed out");
                return Vec::new();
            }
        };
        let Ok(reply) = serde_json::from_slice::<PresenceReply>(&reply.payload) else {
            return Vec::new();
        };
        // Only what was asked: a confused or hostile answer cannot add users.
        users
            .into_iter()
            .filter_map(|u| reply.users.get(u.as_str()).map(|p| (u, *p)))
            .collect::<Vec<_>>()
    });
    futures::future::join_all(asks)
        .await
        .into_iter()
        .flatten()
        .collect()
}
