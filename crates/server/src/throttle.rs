//! Brute-force protection: token failures from one client address on one context
//! are first slowed down, then refused for a while with 429 and `Retry-After`.
//!
//! Counting per (address, context) keeps an attacker's failures from locking out
//! other clients, and other contexts for the same client. An IPv6 client is
//! counted by its /64 ([`client_net`]): that is what one host or subscriber is
//! given, so an attacker gains nothing from the 2^64 addresses it can send from.
//!
//! The map is bounded in work and memory: past [`SOFT_SLOTS`] pairs, a failure
//! drops the stale ones, at most once a second (a scan per failure would let a
//! client that fails on many contexts make every failure cost a scan of the map).
//! An address that already has [`PAIRS_PER_ADDRESS`] contexts tracked has its
//! failures on further contexts counted against it on every context: one client
//! cannot fill the map with pairs, and a flood of them blocks only the address
//! that sends it.

use dashmap::DashMap;
use std::net::IpAddr;
use std::sync::atomic::{AtomicBool, AtomicU64, AtomicUsize, Ordering};
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
#[derive(Debug, PartialEq, Eq, Clone, Copy)]
pub enum Verdict {
    /// Go ahead.
    Pass,
    /// Go ahead after this pause.
    Slow(Duration),
    /// Refuse; the client may retry after this many seconds.
    Refuse(u64),
}

impl Verdict {
    /// The stricter of two verdicts: a refusal over a pause over a pass, the
    /// longer of two of a kind.
    fn stricter(self, other: Verdict) -> Verdict {
        match (self, other) {
            (Verdict::Refuse(a), Verdict::Refuse(b)) => Verdict::Refuse(a.max(b)),
            (Verdict::Refuse(a), _) | (_, Verdict::Refuse(a)) => Verdict::Refuse(a),
            (Verdict::Slow(a), Verdict::Slow(b)) => Verdict::Slow(a.max(b)),
            (Verdict::Slow(a), _) | (_, Verdict::Slow(a)) => Verdict::Slow(a),
            (Verdict::Pass, Verdict::Pass) => Verdict::Pass,
        }
    }
}

/// Failure counts per (client address, context).
pub struct Throttle {
    settings: ThrottleSettings,
    slots: DashMap<(IpAddr, String), Slot>,
    /// False only while `slots` is empty: lets `check` skip the map, whose
    /// `is_empty` takes every shard's lock, when no client has failed lately.
    tracking: AtomicBool,
    /// The slots of addresses tracked on every context ([`ANY_CONTEXT`]). Counted
    /// under the lock of the map's shard that holds the slot, so it is never 0 while
    /// such a slot exists.
    wide_slots: AtomicUsize,
    /// The contexts tracked per address (its slots other than the address-wide one),
    /// counted as `wide_slots` is.
    per_address: DashMap<IpAddr, usize>,
    /// When a failure last dropped the stale pairs.
    pruned_ms: AtomicU64,
    /// [`SOFT_SLOTS`] and [`PAIRS_PER_ADDRESS`] (smaller in tests).
    soft_slots: usize,
    pairs_per_address: usize,
}

/// Beyond this many tracked pairs, a failure drops the stale ones, at most once a
/// second.
const SOFT_SLOTS: usize = 100_000;
/// An address with this many contexts tracked has its failures on further contexts
/// counted against it on every context.
const PAIRS_PER_ADDRESS: usize = 64;
/// The context of an address's slot for every context (no context is named so).
const ANY_CONTEXT: &str = "";

/// The network a client is counted by: an IPv4 address as it is (an IPv4 address
/// mapped into IPv6 as well, which a dual-stack listener reports), an IPv6 address
/// cut to its /64.
fn client_net(addr: IpAddr) -> IpAddr {
    match addr {
        IpAddr::V4(_) => addr,
        IpAddr::V6(v6) => match v6.to_ipv4_mapped() {
            Some(v4) => IpAddr::V4(v4),
            None => IpAddr::V6((v6.to_bits() & !u128::from(u64::MAX)).into()),
        },
    }
}

impl Throttle {
    /// A throttle with these settings.
    pub fn new(settings: ThrottleSettings) -> Self {
        Self::with_bounds(settings, SOFT_SLOTS, PAIRS_PER_ADDRESS)
    }

    fn with_bounds(
        settings: ThrottleSettings,
        soft_slots: usize,
        pairs_per_address: usize,
    ) -> Self {
        Throttle {
            settings,
            slots: DashMap::new(),
            tracking: AtomicBool::new(false),
            wide_slots: AtomicUsize::new(0),
            per_address: DashMap::new(),
            pruned_ms: AtomicU64::new(0),
            soft_slots,
            pairs_per_address,
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
        let addr = client_net(addr);
        let verdict = self.judge(addr, context, now_ms);
        if self.wide_slots.load(Ordering::SeqCst) == 0 {
            return verdict;
        }
        verdict.stricter(self.judge(addr, ANY_CONTEXT, now_ms))
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
        let addr = client_net(addr);
        if self.slots.len() >= self.soft_slots {
            let last = self.pruned_ms.load(Ordering::SeqCst);
            if now_ms >= last.saturating_add(1000)
                && self
                    .pruned_ms
                    .compare_exchange(last, now_ms, Ordering::SeqCst, Ordering::SeqCst)
                    .is_ok()
            {
                self.prune(now_ms);
            }
        }
        let mut key = (addr, context.to_owned());
        if !self.slots.contains_key(&key)
            && self
                .per_address
                .get(&addr)
                .is_some_and(|n| *n >= self.pairs_per_address)
        {
            key.1 = ANY_CONTEXT.to_owned();
        }
        let wide = key.1 == ANY_CONTEXT;
        let window = self.settings.window.as_millis() as u64;
        // Counted while the new slot's shard is locked: `prune` uncounts it under the
        // same lock.
        let mut slot = self.slots.entry(key).or_insert_with(|| {
            if wide {
                self.wide_slots.fetch_add(1, Ordering::SeqCst);
            } else {
                *self.per_address.entry(addr).or_default() += 1;
            }
            Slot::default()
        });
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
        self.slots.retain(|(addr, context), s| {
            let keep = s.blocked_until_ms > now_ms || now_ms.saturating_sub(s.first_ms) <= window;
            if !keep {
                if context == ANY_CONTEXT {
                    self.wide_slots.fetch_sub(1, Ordering::SeqCst);
                } else if let Some(mut n) = self.per_address.get_mut(addr) {
                    *n -= 1;
                }
            }
            keep
        });
        self.per_address.retain(|_, n| *n > 0);
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

    fn small() -> Throttle {
        let settings = ThrottleSettings {
            max_failures: 4,
            window: Duration::from_secs(10),
            block: Duration::from_secs(5),
        };
        Throttle::with_bounds(settings, 100, 50)
    }

    #[test]
    fn a_full_map_is_pruned_at_most_once_a_second() {
        let t = small();
        let addr = |i: u32| IpAddr::from((0x7f00_0000 + i).to_be_bytes());
        // 100 stale pairs, two per address: the next failure past the window drops them.
        for i in 0..100 {
            t.fail(addr(i / 2), &format!("old{i}"), 0);
        }
        t.fail(addr(1000), "c0", 20_000);
        assert_eq!(t.slots.len(), 1);
        assert_eq!(t.per_address.len(), 1);
        // Within a second of that, a full map is not scanned again, stale pairs or not.
        for i in 0..99 {
            t.fail(addr(i / 2), &format!("old{i}"), 0);
        }
        t.fail(addr(1001), "x", 20_500);
        t.fail(addr(1001), "y", 20_900);
        assert_eq!(t.slots.len(), 102);
        // After it, it is: all of them are stale by then.
        t.fail(addr(1001), "z", 31_000);
        assert_eq!(t.slots.len(), 1);
        assert_eq!(*t.per_address.get(&addr(1001)).unwrap(), 1);
    }

    #[test]
    fn an_address_failing_on_many_contexts_is_counted_on_all_of_them() {
        let t = small();
        let a: IpAddr = "127.0.0.2".parse().unwrap();
        let b: IpAddr = "127.0.0.3".parse().unwrap();
        // 50 contexts of its own, then failures on new ones count address-wide.
        for i in 0..50 {
            t.fail(a, &format!("own{i}"), 1_000);
        }
        assert_eq!(t.check(a, "fresh0", 1_100), Verdict::Pass);
        for i in 0..4 {
            t.fail(a, &format!("fresh{i}"), 1_100);
        }
        assert_eq!(t.slots.len(), 51);
        assert_eq!(t.check(a, "fresh9", 1_200), Verdict::Refuse(5));
        assert_eq!(t.check(a, "own0", 1_200), Verdict::Refuse(5));
        // A context slowed on its own is refused as well: the stricter verdict wins.
        t.fail(a, "own1", 1_200);
        assert_eq!(t.check(a, "own1", 1_300), Verdict::Refuse(5));
        // Another address, even with a map this full, counts per context.
        for i in 0..3 {
            t.fail(b, &format!("fresh{i}"), 1_200);
        }
        assert_eq!(t.check(b, "fresh9", 1_300), Verdict::Pass);
        assert_eq!(t.slots.get(&(b, "fresh0".to_owned())).unwrap().failures, 1);
        // Once the address-wide slot is stale and pruned, nothing is refused.
        t.prune(100_000);
        assert_eq!(t.wide_slots.load(Ordering::SeqCst), 0);
        assert!(t.per_address.is_empty());
        assert_eq!(t.check(a, "fresh9", 100_000), Verdict::Pass);
    }

    #[test]
    fn an_ipv6_client_is_counted_by_its_64() {
        let t = small();
        let ip = |s: &str| s.parse::<IpAddr>().unwrap();
        // Four failures from four addresses of one /64 block all of it...
        for i in 1..=4 {
            t.fail(ip(&format!("2001:db8:0:1::{i}")), "c", 0);
        }
        assert_eq!(
            t.check(ip("2001:db8:0:1:ffff::9"), "c", 1),
            Verdict::Refuse(5)
        );
        // ...and no neighbouring /64.
        assert_eq!(t.check(ip("2001:db8:0:2::1"), "c", 1), Verdict::Pass);
        // IPv4 clients, mapped into IPv6 or not, are one address each.
        for _ in 0..4 {
            t.fail(ip("::ffff:192.0.2.1"), "c", 0);
        }
        assert_eq!(t.check(ip("192.0.2.1"), "c", 1), Verdict::Refuse(5));
        assert_eq!(t.check(ip("::ffff:192.0.2.2"), "c", 1), Verdict::Pass);
        assert_eq!(t.check(ip("192.0.2.2"), "c", 1), Verdict::Pass);
    }

    #[test]
    fn the_stricter_verdict_wins() {
        let slow = |ms| Verdict::Slow(Duration::from_millis(ms));
        assert_eq!(Verdict::Pass.stricter(slow(200)), slow(200));
        assert_eq!(slow(400).stricter(slow(200)), slow(400));
        assert_eq!(slow(400).stricter(Verdict::Refuse(3)), Verdict::Refuse(3));
        assert_eq!(
            Verdict::Refuse(2).stricter(Verdict::Refuse(3)),
            Verdict::Refuse(3)
        );
        assert_eq!(Verdict::Pass.stricter(Verdict::Pass), Verdict::Pass);
    }
}
