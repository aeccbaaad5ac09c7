//! Brute-force protection: token failures from one client address on one context
//! are first slowed down, then refused for a while with 429 and `Retry-After`.
//!
//! Counting per (address, context) keeps an attacker's failures from locking out
//! other clients, and other contexts for the same client.

use dashmap::DashMap;
use std::net::IpAddr;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Duration;

/// The throttle's settings.
#[derive(Debug, Clone, Copy)]
pub struct ThrottleSettings {
    /// Failures within `window` that block the pair; half of it starts slowing down.
    pub max_failures: u32,
    /// How long failures are remembered.
    pub window: Duration,
    /// How long a blocked pair is refused.
    pub block: Duration,
}

impl Default for ThrottleSettings {
    fn default() -> Self {
        ThrottleSettings {
            max_failures: 10,
            window: Duration::from_secs(60),
            block: Duration::from_secs(60),
        }
    }
}

#[derive(Debug, Default, Clone, Copy)]
struct Slot {
    failures: u32,
    first_ms: u64,
    blocked_until_ms: u64,
}

/// What the throttle says of a request about to run.
#[derive(Debug, PartialEq, Eq)]
pub enum Verdict {
    /// Go ahead.
    Pass,
    /// Go ahead after this pause.
    Slow(Duration),
    /// Refuse; the client may retry after this many seconds.
    Refuse(u64),
}

/// Failure counts per (client address, context).
pub struct Throttle {
    settings: ThrottleSettings,
    slots: DashMap<(IpAddr, String), Slot>,
    /// False only while `slots` is empty: lets `check` skip the map, whose
    /// `is_empty` takes every shard's lock, when no client has failed lately.
    tracking: AtomicBool,
}

/// Beyond this many tracked pairs, stale ones are dropped at once.
const MAX_SLOTS: usize = 100_000;

impl Throttle {
    /// A throttle with these settings.
    pub fn new(settings: ThrottleSettings) -> Self {
        Throttle {
            settings,
            slots: DashMap::new(),
            tracking: AtomicBool::new(false),
        }
    }

    /// True when no failure is tracked: every request passes.
    pub fn quiet(&self) -> bool {
        !self.tracking.load(Ordering::SeqCst)
    }

    /// Judges a request of `addr` on `context` at `now_ms`.
    pub fn check(&self, addr: IpAddr, context: &str, now_ms: u64) -> Verdict {
        // The common case, no failures anywhere: no lookup key to build.
        if self.quiet() {
            return Verdict::Pass;
        }
        let Some(slot) = self.slots.get(&(addr, context.to_owned())).map(|s| *s) else {
            return Verdict::Pass;
        };
        if slot.blocked_until_ms > now_ms {
            return Verdict::Refuse((slot.blocked_until_ms - now_ms).div_ceil(1000));
        }
        if now_ms.saturating_sub(slot.first_ms) > self.settings.window.as_millis() as u64 {
            return Verdict::Pass;
        }
        let half = (self.settings.max_failures / 2).max(1);
        if slot.failures >= half {
            let steps = u64::from(slot.failures - half + 1);
            return Verdict::Slow(Duration::from_millis((steps * 200).min(2000)));
        }
        Verdict::Pass
    }

    /// Counts one token failure; answers true when it blocked the pair.
    pub fn fail(&self, addr: IpAddr, context: &str, now_ms: u64) -> bool {
        if self.slots.len() >= MAX_SLOTS {
            self.prune(now_ms);
        }
        let window = self.settings.window.as_millis() as u64;
        let mut slot = self.slots.entry((addr, context.to_owned())).or_default();
        if now_ms.saturating_sub(slot.first_ms) > window {
            slot.failures = 0;
            slot.first_ms = now_ms;
        }
        slot.failures += 1;
        let blocked = slot.failures >= self.settings.max_failures;
        if blocked {
            slot.blocked_until_ms = now_ms + self.settings.block.as_millis() as u64;
            slot.failures = 0;
            slot.first_ms = now_ms;
        }
        drop(slot);
        // After the slot is in the map: `prune` clears the flag only when it finds
        // the map empty after clearing it, so the flag is never left false beside a slot.
        self.tracking.store(true, Ordering::SeqCst);
        blocked
    }

    /// Forgets pairs that are neither blocked nor within their window.
    pub fn prune(&self, now_ms: u64) {
        let window = self.settings.window.as_millis() as u64;
        self.slots.retain(|_, s| {
            s.blocked_until_ms > now_ms || now_ms.saturating_sub(s.first_ms) <= window
        });
        if self.slots.is_empty() {
            self.tracking.store(false, Ordering::SeqCst);
            if !self.slots.is_empty() {
                self.tracking.store(true, Ordering::SeqCst);
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn slows_then_blocks_then_forgets() {
        let t = Throttle::new(ThrottleSettings {
            max_failures: 4,
            window: Duration::from_secs(10),
            block: Duration::from_secs(5),
        });
        let a: IpAddr = "127.0.0.2".parse().unwrap();
        let b: IpAddr = "127.0.0.3".parse().unwrap();
        assert_eq!(t.check(a, "c", 0), Verdict::Pass);
        assert!(!t.fail(a, "c", 0));
        assert_eq!(t.check(a, "c", 1), Verdict::Pass);
        assert!(!t.fail(a, "c", 1));
        assert_eq!(
            t.check(a, "c", 2),
            Verdict::Slow(Duration::from_millis(200))
        );
        assert!(!t.fail(a, "c", 2));
        assert_eq!(
            t.check(a, "c", 3),
            Verdict::Slow(Duration::from_millis(400))
        );
        assert!(t.fail(a, "c", 3));
        assert_eq!(t.check(a, "c", 4), Verdict::Refuse(5));
        // Other clients and other contexts are not affected.
        assert_eq!(t.check(b, "c", 4), Verdict::Pass);
        assert_eq!(t.check(a, "other", 4), Verdict::Pass);
        // After the block, and after the window, all is forgotten.
        assert_eq!(t.check(a, "c", 5_004), Verdict::Pass);
        t.prune(20_000);
        assert_eq!(t.slots.len(), 0);
        assert!(!t.tracking.load(Ordering::SeqCst));
        // Failures are counted again after the map was emptied.
        assert!(!t.fail(a, "c", 20_001));
        assert!(!t.fail(a, "c", 20_002));
        assert_eq!(
            t.check(a, "c", 20_003),
            Verdict::Slow(Duration::from_millis(200))
        );
    }
}
