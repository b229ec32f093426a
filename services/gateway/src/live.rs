//! Who is connected to this gateway: open WebSockets per user, for presence.
//!
//! Live entries do not pass through here: each WebSocket subscribes to its user's core-NATS
//! delivery subject itself, so an entry reaches exactly the gateways holding that user and
//! NATS does the routing. A connection that falls behind or misses a publish sees a seq gap
//! and fills it from the store, so nothing here has to be reliable.

use std::collections::HashMap;
use std::sync::Mutex;

use meridian_model::UserId;

#[derive(Default)]
pub struct Hub {
    users: Mutex<HashMap<UserId, Presence>>,
}

#[derive(Default, Clone, Copy)]
struct Presence {
    connections: usize,
    last_seen_ms: u64,
}

impl Hub {
    /// Counts one more connection of `user` unless it already has `cap`; check and count
    /// are one step, so sockets opened at the same moment cannot pass the cap together.
    pub fn try_connect(&self, user: &UserId, cap: usize) -> bool {
        let mut users = self.users.lock().unwrap_or_else(|p| p.into_inner());
        let p = users.entry(user.clone()).or_default();
        if p.connections >= cap {
            return false;
        }
        p.connections += 1;
        p.last_seen_ms = now_ms();
        true
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

pub fn now_ms() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_millis() as u64)
        .unwrap_or(0)
}
