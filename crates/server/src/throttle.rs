//! Brute-force protection: token failures from one client address on one context
//! are first slowed down, then refused for a while with 429 and `Retry-After`.
//!
//! Counting per (address, context) keeps an attacker's failures from locking out
//! other clients, and other contexts for the same client.
//!
//! The map is bounded in work and memory: past [`SOFT_SLOTS`] pairs, a failure
//! drops the stale ones, at most once a second (a scan per failure would let a
//! client that fails on many contexts make every failure cost a scan of the map);
//! past [`HARD_SLOTS`], a failure on a pair not yet tracked counts against the
//! client address on every context, so that flooding the map with pairs does not
//! buy untracked guesses.

use dashmap::DashMap;
use std::net::IpAddr;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
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
    /// True when some address is tracked on every context ([`ANY_CONTEXT`]).
    wide: AtomicBool,
    /// When a failure last dropped the stale pairs.
    pruned_ms: AtomicU64,
    /// [`SOFT_SLOTS`] and [`HARD_SLOTS`] (smaller in tests).
    soft_slots: usize,
    hard_slots: usize,
}

/// Beyond this many tracked pairs, a failure drops the stale ones, at most once a
/// second.
const SOFT_SLOTS: usize = 100_000;
/// Beyond this many, a failure on a new pair counts against its address on every
/// context.
const HARD_SLOTS: usize = 200_000;
/// The context of an address's slot for every context (no context is named so).
const ANY_CONTEXT: &str = "";

impl Throttle {
    /// A throttle with these settings.
    pub fn new(settings: ThrottleSettings) -> Self {
        Self::with_bounds(settings, SOFT_SLOTS, HARD_SLOTS)
    }

    fn with_bounds(settings: ThrottleSettings, soft_slots: usize, hard_slots: usize) -> Self {
        Throttle {
            settings,
            slots: DashMap::new(),
            tracking: AtomicBool::new(false),
            wide: AtomicBool::new(false),
            pruned_ms: AtomicU64::new(0),
            soft_slots,
            hard_slots,
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
        match self.judge(addr, context, now_ms) {
            Verdict::Pass if self.wide.load(Ordering::SeqCst) => {
                self.judge(addr, ANY_CONTEXT, now_ms)
            }
            verdict => verdict,
        }
    }

    /// The verdict of the slot of `addr` on `context` alone.
    fn judge(&self, addr: IpAddr, context: &str, now_ms: u64) -> Verdict {
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
        let mut key = (addr, context.to_owned());
        let tracked = self.slots.len();
        if tracked >= self.soft_slots {
            let last = self.pruned_ms.load(Ordering::SeqCst);
            if now_ms >= last.saturating_add(1000)
                && self
                    .pruned_ms
                    .compare_exchange(last, now_ms, Ordering::SeqCst, Ordering::SeqCst)
                    .is_ok()
            {
                self.prune(now_ms);
            }
            if self.slots.len() >= self.hard_slots && !self.slots.contains_key(&key) {
                key.1 = ANY_CONTEXT.to_owned();
            }
        }
        let wide = key.1 == ANY_CONTEXT;
        let window = self.settings.window.as_millis() as u64;
        let mut slot = self.slots.entry(key).or_default();
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
        if wide {
            self.wide.store(true, Ordering::SeqCst);
        }
        blocked
    }

    /// Forgets pairs that are neither blocked nor within their window.
    pub fn prune(&self, now_ms: u64) {
        let window = self.settings.window.as_millis() as u64;
        // Cleared first, set again for each address-wide slot kept: a `fail` that adds
        // one meanwhile sets it after adding it.
        self.wide.store(false, Ordering::SeqCst);
        self.slots.retain(|(_, context), s| {
            let keep = s.blocked_until_ms > now_ms || now_ms.saturating_sub(s.first_ms) <= window;
            if keep && context == ANY_CONTEXT {
                self.wide.store(true, Ordering::SeqCst);
            }
            keep
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

    #[test]
    fn a_full_map_is_pruned_once_a_second_then_counts_per_address() {
        let settings = ThrottleSettings {
            max_failures: 4,
            window: Duration::from_secs(10),
            block: Duration::from_secs(5),
        };
        let t = Throttle::with_bounds(settings, 100, 200);
        let a: IpAddr = "127.0.0.2".parse().unwrap();
        let b: IpAddr = "127.0.0.3".parse().unwrap();
        // 100 stale pairs: the next failure past the window drops them.
        for i in 0..100 {
            t.fail(a, &format!("old{i}"), 0);
        }
        t.fail(a, "c0", 20_000);
        assert_eq!(t.slots.len(), 1);
        // Within a second of that, a full map is not scanned again, stale pairs
        // or not.
        for i in 0..99 {
            t.fail(a, &format!("old{i}"), 0);
        }
        t.fail(b, "x", 20_500);
        t.fail(b, "y", 20_900);
        assert_eq!(t.slots.len(), 102);
        // After it, it is: all of them are stale by then.
        t.fail(b, "z", 31_000);
        assert_eq!(t.slots.len(), 1);
        // 200 live pairs: a failure on a new one counts against the address.
        for i in 0..199 {
            t.fail(a, &format!("live{i}"), 31_000);
        }
        assert_eq!(t.slots.len(), 200);
        assert_eq!(t.check(a, "fresh0", 31_100), Verdict::Pass);
        for i in 0..4 {
            t.fail(a, &format!("fresh{i}"), 31_100);
        }
        assert_eq!(t.slots.len(), 201);
        assert_eq!(t.check(a, "fresh9", 31_200), Verdict::Refuse(5));
        assert_eq!(t.check(a, "live0", 31_200), Verdict::Refuse(5));
        // Other addresses are not affected, and tracked pairs count as before.
        assert_eq!(t.check(b, "fresh9", 31_200), Verdict::Pass);
        t.fail(b, "z", 31_200);
        assert_eq!(t.slots.get(&(b, "z".to_owned())).unwrap().failures, 2);
        // When the address-wide slot goes stale, the flag goes with it.
        t.prune(100_000);
        assert!(!t.wide.load(Ordering::SeqCst));
        assert_eq!(t.check(a, "fresh9", 100_000), Verdict::Pass);
    }
}
