//! Recently notified keys, so one inbox entry notifies a device once even when its delivery
//! arrives twice (the applier republishes after a failed publish; a NATS reconnect can
//! repeat a message).
//!
//! The key is (user, device, seq, order key): the seq alone is not enough, because a new
//! inbox epoch (a failover) starts seqs at 1 again, and the order key names the event the
//! entry came from. Keys are SHA-256 digests cut to 128 bits, so memory per key is fixed.

use std::collections::{HashSet, VecDeque};

use sha2::{Digest, Sha256};

pub(crate) type Key = [u8; 16];

/// How many keys are remembered. Duplicates arrive within moments of the original (a
/// retried publish), so this only has to cover a few seconds of traffic; at 16 bytes a key
/// (twice, in the set and the queue) this is a few MiB.
pub(crate) const CAPACITY: usize = 65_536;

pub(crate) fn key(user: &str, device: &str, seq: u64, order_key: &[u8]) -> Key {
    let mut h = Sha256::new();
    // Length prefixes keep ("ab","c") and ("a","bc") apart.
    for part in [user.as_bytes(), device.as_bytes(), order_key] {
        h.update((part.len() as u64).to_be_bytes());
        h.update(part);
    }
    h.update(seq.to_be_bytes());
    let digest = h.finalize();
    let mut k = [0u8; 16];
    k.copy_from_slice(&digest[..16]);
    k
}

/// A set that forgets its oldest key once it holds `capacity`.
pub(crate) struct RecentKeys {
    set: HashSet<Key>,
    order: VecDeque<Key>,
    capacity: usize,
}

impl RecentKeys {
    pub(crate) fn new(capacity: usize) -> Self {
        Self {
            set: HashSet::new(),
            order: VecDeque::new(),
            capacity: capacity.max(1),
        }
    }

    /// Claims `k`: true the first time (go ahead and notify), false if it is still
    /// remembered. Claimed before the send, so a duplicate arriving mid-send is refused.
    pub(crate) fn insert(&mut self, k: Key) -> bool {
        if !self.set.insert(k) {
            return false;
        }
        self.order.push_back(k);
        while self.order.len() > self.capacity {
            if let Some(old) = self.order.pop_front() {
                self.set.remove(&old);
            }
        }
        true
    }

    /// Gives up a claim (the work it guarded failed and may be tried again). The queue
    /// keeps its slot, so a key claimed again may be forgotten a little early: a repeat,
    /// never a loss.
    pub(crate) fn forget(&mut self, k: &Key) {
        self.set.remove(k);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_key_is_claimed_once_and_the_oldest_is_forgotten() {
        let mut r = RecentKeys::new(2);
        let a = key("bob", "phone", 1, b"ok1");
        let b = key("bob", "phone", 2, b"ok2");
        let c = key("bob", "tablet", 2, b"ok2");
        assert!(r.insert(a));
        assert!(!r.insert(a));
        assert!(r.insert(b));
        assert!(r.insert(c));
        // `a` fell out: capacity 2.
        assert!(r.insert(a));
        assert!(!r.insert(c));
    }

    #[test]
    fn every_component_matters() {
        let base = key("bob", "phone", 7, b"k");
        assert_ne!(base, key("bob", "phone", 8, b"k"));
        assert_ne!(base, key("bob", "phone", 7, b"j"));
        assert_ne!(base, key("bob", "tablet", 7, b"k"));
        assert_ne!(base, key("ann", "phone", 7, b"k"));
        assert_ne!(key("ab", "c", 1, b""), key("a", "bc", 1, b""));
    }
}
