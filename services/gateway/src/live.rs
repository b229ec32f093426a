//! Who is connected to this gateway: open WebSockets per user, for presence and for the
//! region fence (a user whose serving region moves away has its sockets closed, see
//! [`run_fence`]).
//!
//! Live entries do not pass through here: each WebSocket subscribes to its user's core-NATS
//! delivery subject itself, so an entry reaches exactly the gateways holding that user and
//! NATS does the routing. A connection that falls behind or misses a publish sees a seq gap
//! and fills it from the store, so nothing here has to be reliable.

use std::collections::HashMap;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use meridian_model::{RegionId, UserId};
use meridian_store::Store;
use tokio::sync::watch;
use tokio_util::sync::CancellationToken;

use crate::extract::WrongRegion;
use crate::GatewayConfig;

#[derive(Default)]
pub struct Hub {
    users: Mutex<HashMap<UserId, Presence>>,
}

struct Presence {
    connections: usize,
    last_seen_ms: u64,
    /// Set when the user's serving region moved away: the user's sockets watch it and
    /// close with `wrong_region`.
    fence: watch::Sender<Option<WrongRegion>>,
}

impl Default for Presence {
    fn default() -> Self {
        Self {
            connections: 0,
            last_seen_ms: 0,
            fence: watch::Sender::new(None),
        }
    }
}

impl Hub {
    /// Counts one more connection of `user` unless it already has `cap`; check and count
    /// are one step, so sockets opened at the same moment cannot pass the cap together.
    /// The receiver tells the socket when the user is no longer served here.
    pub fn try_connect(&self, user: &UserId, cap: usize) -> Option<watch::Receiver<Option<WrongRegion>>> {
        let mut users = self.users.lock().unwrap_or_else(|p| p.into_inner());
        let p = users.entry(user.clone()).or_default();
        if p.connections >= cap {
            return None;
        }
        if p.connections == 0 {
            // The socket was admitted after a fresh directory read: a fence from an earlier
            // move (the user has since moved back) no longer holds.
            p.fence.send_replace(None);
        }
        p.connections += 1;
        p.last_seen_ms = now_ms();
        let mut fence = p.fence.subscribe();
        if fence.borrow().is_some() {
            // The user's other sockets are being fenced: this one must hear it too (the
            // fence only notifies on a change), and reconnects for a fresh directory read.
            fence.mark_changed();
        }
        Some(fence)
    }

    /// Users with at least one socket open here.
    pub fn connected_users(&self) -> Vec<UserId> {
        let users = self.users.lock().unwrap_or_else(|p| p.into_inner());
        users
            .iter()
            .filter(|(_, p)| p.connections > 0)
            .map(|(u, _)| u.clone())
            .collect()
    }

    /// Tells `user`'s sockets that the user is served elsewhere now.
    pub fn fence(&self, user: &UserId, moved: WrongRegion) {
        let users = self.users.lock().unwrap_or_else(|p| p.into_inner());
        if let Some(p) = users.get(user) {
            p.fence.send_if_modified(|current| {
                let changed = current.as_ref() != Some(&moved);
                *current = Some(moved);
                changed
            });
        }
    }

    pub fn disconnected(&self, user: &UserId) {
        let mut users = self.users.lock().unwrap_or_else(|p| p.into_inner());
        if let Some(p) = users.get_mut(user) {
            p.connections = p.connections.saturating_sub(1);
            p.last_seen_ms = now_ms();
        }
    }

    /// Whether the user has a WebSocket open here, and when one was last open (ms; `None`
    /// if never since this gateway started).
    pub fn presence(&self, user: &UserId) -> (bool, Option<u64>) {
        let users = self.users.lock().unwrap_or_else(|p| p.into_inner());
        match users.get(user) {
            Some(p) if p.connections > 0 => (true, Some(now_ms())),
            Some(p) => (false, Some(p.last_seen_ms)),
            None => (false, None),
        }
    }

    pub fn online_users(&self) -> usize {
        let users = self.users.lock().unwrap_or_else(|p| p.into_inner());
        users.values().filter(|p| p.connections > 0).count()
    }
}

/// How often the fence checks who serves each region: a failover moves every user of a
/// region at once, and costs the fence one read per region to see.
pub const FENCE_POLL: Duration = Duration::from_millis(250);
/// How often the fence re-reads the home region of each connected user (a user re-homed by
/// the admin): one user record per connected user, so less often than [`FENCE_POLL`]. Calls
/// and frames read the directory themselves; this only reaches sockets that only receive.
pub const FENCE_HOME_REFRESH: Duration = Duration::from_secs(2);

/// Closes the sockets of users whose serving region moved away: every [`FENCE_POLL`] it
/// reads who serves each region the connected users are homed in, and every
/// [`FENCE_HOME_REFRESH`] it re-reads those users' homes; users served elsewhere are fenced
/// ([`Hub::fence`]). The next round starts [`FENCE_POLL`] after one ends, so however many
/// users are online the fence takes a bounded share of a core. Runs until `shutdown`.
pub async fn run_fence(cfg: GatewayConfig, store: Store, hub: Arc<Hub>, shutdown: CancellationToken) {
    let mut homes: HashMap<UserId, RegionId> = HashMap::new();
    let mut homes_read_at = tokio::time::Instant::now();
    loop {
        // A pause after each round, not a fixed rate: a long round cannot run into the next.
        tokio::select! {
            _ = shutdown.cancelled() => return,
            _ = tokio::time::sleep(FENCE_POLL) => {}
        }
        let connected = hub.connected_users();
        if homes_read_at.elapsed() >= FENCE_HOME_REFRESH {
            homes.clear();
            homes_read_at = tokio::time::Instant::now();
        }
        let keep: std::collections::HashSet<&UserId> = connected.iter().collect();
        homes.retain(|u, _| keep.contains(u));
        match fence_round(&cfg, &store, &hub, &connected, &mut homes, &shutdown).await {
            Ok(()) => {}
            // The next round tries again; a store outage shows in /readyz.
            Err(e) => tracing::debug!(error = %e, "fence: reading the directory failed"),
        }
    }
}

/// One round of [`run_fence`]: homes not known yet are read, serving regions always.
async fn fence_round(
    cfg: &GatewayConfig,
    store: &Store,
    hub: &Hub,
    connected: &[UserId],
    homes: &mut HashMap<UserId, RegionId>,
    shutdown: &CancellationToken,
) -> Result<(), meridian_store::StoreError> {
    let mut serving: HashMap<RegionId, RegionId> = HashMap::new();
    for user in connected {
        if shutdown.is_cancelled() {
            return Ok(());
        }
        let home = match homes.get(user) {
            Some(home) => home.clone(),
            None => match store.user(user).await? {
                Some(view) => {
                    serving.insert(view.home_region.clone(), view.serving_region.clone());
                    homes.insert(user.clone(), view.home_region.clone());
                    view.home_region
                }
                None => continue,
            },
        };
        let served_by = match serving.get(&home) {
            Some(r) => r.clone(),
            None => {
                let r = store.region_serving(&home).await?.serving;
                serving.insert(home.clone(), r.clone());
                r
            }
        };
        if served_by != cfg.region {
            hub.fence(user, WrongRegion::to(cfg, served_by));
        }
    }
    Ok(())
}

pub fn now_ms() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_millis() as u64)
        .unwrap_or(0)
}
