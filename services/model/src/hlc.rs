//! The hybrid logical clock. A timestamp packs physical milliseconds in the high 48 bits
//! and a logical counter in the low 16, so plain `u64` comparison is HLC order. A clock
//! never hands out the same or a smaller value twice, even when the wall clock steps back,
//! and it moves past every remote timestamp it observes, so an event caused by another
//! region's event always sorts after it.

use std::fmt;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{SystemTime, UNIX_EPOCH};

/// One HLC timestamp.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash, Default)]
pub struct Hlc(pub u64);

impl Hlc {
    const LOGICAL_BITS: u32 = 16;

    pub fn new(physical_ms: u64, logical: u16) -> Self {
        Hlc((physical_ms << Self::LOGICAL_BITS) | u64::from(logical))
    }
    pub fn physical_ms(self) -> u64 {
        self.0 >> Self::LOGICAL_BITS
    }
    pub fn logical(self) -> u16 {
        (self.0 & 0xffff) as u16
    }
}

impl fmt::Display for Hlc {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}.{}", self.physical_ms(), self.logical())
    }
}

type WallClock = Box<dyn Fn() -> u64 + Send + Sync>;

/// A clock shared by everything in one process that stamps events.
pub struct HybridClock {
    last: AtomicU64,
    wall_ms: WallClock,
}

fn system_ms() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_millis() as u64)
        .unwrap_or(0)
}

impl Default for HybridClock {
    fn default() -> Self {
        Self::new()
    }
}

impl HybridClock {
    /// A clock on the system wall clock.
    pub fn new() -> Self {
        Self::with_wall_clock(Box::new(system_ms))
    }

    /// A clock on the system wall clock shifted by `offset_ms` (negative: behind), for
    /// clock-skew drills.
    pub fn with_offset_ms(offset_ms: i64) -> Self {
        Self::with_wall_clock(Box::new(move || system_ms().saturating_add_signed(offset_ms)))
    }

    /// A clock on a wall clock of the caller's (tests use this to inject skew).
    fn with_wall_clock(wall_ms: WallClock) -> Self {
        Self {
            last: AtomicU64::new(0),
            wall_ms,
        }
    }

    /// A timestamp for a local event: greater than every timestamp this clock has issued or
    /// observed. If the logical counter overflows it carries into the millisecond, which keeps
    /// order at the cost of running a millisecond ahead.
    pub fn now(&self) -> Hlc {
        self.advance(0)
    }

    /// Observe a timestamp received from elsewhere and return a local timestamp after it.
    pub fn observe(&self, remote: Hlc) -> Hlc {
        self.advance(remote.0)
    }

    fn advance(&self, floor: u64) -> Hlc {
        let physical = Hlc::new((self.wall_ms)(), 0).0;
        let mut last = self.last.load(Ordering::Acquire);
        loop {
            let next = physical.max(last.max(floor).saturating_add(1));
            match self
                .last
                .compare_exchange_weak(last, next, Ordering::AcqRel, Ordering::Acquire)
            {
                Ok(_) => return Hlc(next),
                Err(seen) => last = seen,
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;
    use std::sync::atomic::AtomicI64;
    use std::sync::Arc;

    #[test]
    fn packs_physical_and_logical() {
        let t = Hlc::new(1_700_000_000_000, 7);
        assert_eq!(t.physical_ms(), 1_700_000_000_000);
        assert_eq!(t.logical(), 7);
        assert!(Hlc::new(5, 65535) < Hlc::new(6, 0));
    }

    #[derive(Debug, Clone)]
    enum Step {
        Skew(i64),
        Local,
        Receive(i64),
    }

    fn step() -> impl Strategy<Value = Step> {
        prop_oneof![
            (-5_000i64..5_000).prop_map(Step::Skew),
            Just(Step::Local),
            (-10_000i64..10_000).prop_map(Step::Receive),
        ]
    }

    proptest! {
        /// Whatever the wall clock does and whatever remote timestamps arrive, issued
        /// timestamps strictly increase and every issued timestamp is above what was observed.
        #[test]
        fn never_goes_back_under_skew_and_receipt(steps in prop::collection::vec(step(), 1..200)) {
            let base = 1_700_000_000_000i64;
            let wall = Arc::new(AtomicI64::new(base));
            let w = wall.clone();
            let clock = HybridClock::with_wall_clock(Box::new(move || w.load(Ordering::SeqCst) as u64));
            let mut prev = Hlc(0);
            for s in steps {
                let issued = match s {
                    Step::Skew(d) => { wall.fetch_add(d, Ordering::SeqCst); continue; }
                    Step::Local => clock.now(),
                    Step::Receive(offset) => {
                        let remote = Hlc::new((wall.load(Ordering::SeqCst) + offset) as u64, 3);
                        let t = clock.observe(remote);
                        prop_assert!(t > remote);
                        t
                    }
                };
                prop_assert!(issued > prev, "{issued} after {prev}");
                prev = issued;
            }
        }
    }

    #[test]
    fn concurrent_callers_get_distinct_increasing_stamps() {
        let clock = Arc::new(HybridClock::new());
        let handles: Vec<_> = (0..4)
            .map(|_| {
                let c = clock.clone();
                std::thread::spawn(move || {
                    let mut v = Vec::new();
                    for _ in 0..10_000 {
                        v.push(c.now());
                    }
                    v
                })
            })
            .collect();
        let mut all = Vec::new();
        for h in handles {
            let v = h.join().unwrap();
            assert!(v.windows(2).all(|w| w[0] < w[1]));
            all.extend(v);
        }
        let n = all.len();
        all.sort();
        all.dedup();
        assert_eq!(all.len(), n);
    }
}
