//! Per-VIP rate limits, shared by the XDP program and the agent: the
//! limits the agent writes per VIP ([`RateLimits`], RATE_LIMITS at the
//! VIP's index), the token buckets the fast path keeps per source prefix
//! ([`RateKey`] → [`Bucket`] in the RATE_SOURCES LRU) and per VIP
//! (RATE_VIP), and the bucket arithmetic both sides test.
//!
//! A bucket holds up to `burst` tokens and gains `rate` per second; an
//! event takes one token or is refused. Tokens are kept in millionths, so
//! that rates from 1/s to 10^7/s refill smoothly from nanosecond clocks.
//! Buckets are updated without locks: two CPUs taking a token from the
//! same bucket at the same instant can both succeed (a limit may admit a
//! few events more than it allows; it never refuses one it should admit
//! because of that race).

/// Millionths of a token in one token.
pub const TOKEN: u64 = 1_000_000;

/// The longest refill interval counted (a bucket idle longer is full
/// anyway): keeps `elapsed × rate` inside 64 bits for any accepted rate.
pub const MAX_REFILL_NS: u64 = 100_000_000_000;

/// Largest accepted rate and burst (events per second, events).
pub const MAX_RATE: u32 = 10_000_000;

/// Default size of RATE_SOURCES (`[agent] rate_limit_sources`).
pub const DEFAULT_RATE_SOURCES: u32 = 65_536;

/// What a VIP limits, per second (0: that limit is off). Written by the
/// agent at the VIP's index; all zero: no limit (the fast path then does
/// nothing more than read this element).
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct RateLimits {
    /// New connections per second per source prefix, and the burst.
    pub src_new_rate: u32,
    pub src_new_burst: u32,
    /// Packets per second per source prefix, and the burst.
    pub src_pkt_rate: u32,
    pub src_pkt_burst: u32,
    /// New connections per second to the whole VIP, and the burst.
    pub vip_new_rate: u32,
    pub vip_new_burst: u32,
    /// The source prefix lengths the per-source limits count by (32 and
    /// 128: per address).
    pub prefix_v4: u8,
    pub prefix_v6: u8,
    pub _pad: [u8; 6],
}

impl RateLimits {
    /// Any limit on.
    #[inline(always)]
    pub fn any(&self) -> bool {
        self.src_new_rate | self.src_pkt_rate | self.vip_new_rate != 0
    }
}

/// [`RateKey::kind`]: the new-connection bucket of an IPv4 source prefix.
pub const RATE_NEW_V4: u32 = 1;
/// The new-connection bucket of an IPv6 source prefix.
pub const RATE_NEW_V6: u32 = 2;
/// The packet bucket of an IPv4 source prefix.
pub const RATE_PKT_V4: u32 = 3;
/// The packet bucket of an IPv6 source prefix.
pub const RATE_PKT_V6: u32 = 4;

/// Key of RATE_SOURCES: one bucket per VIP, limit and source prefix.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct RateKey {
    pub vip_index: u32,
    /// One of the `RATE_*` kinds.
    pub kind: u32,
    /// The source address masked to the limit's prefix, as on the wire
    /// (IPv4 in the first word, the rest zero).
    pub addr: [u32; 4],
}

impl RateKey {
    /// Whether the key counts an IPv6 prefix.
    pub fn is_v6(&self) -> bool {
        self.kind == RATE_NEW_V6 || self.kind == RATE_PKT_V6
    }
}

/// A token bucket (value of RATE_SOURCES and of RATE_VIP), with what it
/// admitted and refused (for `lb stats`' top limited sources).
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Bucket {
    /// Clock (ns, the kernel's monotonic clock) of the last refill; 0: new.
    pub last_ns: u64,
    /// Millionths of a token.
    pub tokens: u64,
    pub passed: u64,
    pub dropped: u64,
}

impl Bucket {
    /// Takes one token at `now_ns` from a bucket of `rate` per second
    /// holding at most `burst` (a new bucket starts full): true if there
    /// was one. Counts the outcome.
    #[inline(always)]
    pub fn take(&mut self, now_ns: u64, rate: u32, burst: u32) -> bool {
        let cap = u64::from(burst.max(1)) * TOKEN;
        let tokens = if self.last_ns == 0 {
            cap
        } else {
            let elapsed = now_ns.saturating_sub(self.last_ns).min(MAX_REFILL_NS);
            // elapsed ns × rate/s = elapsed × rate / 10^9 tokens
            // = elapsed × rate / 1000 millionths.
            let gained = elapsed * u64::from(rate) / 1000;
            (self.tokens + gained).min(cap)
        };
        self.last_ns = now_ns;
        if tokens >= TOKEN {
            self.tokens = tokens - TOKEN;
            self.passed += 1;
            true
        } else {
            self.tokens = tokens;
            self.dropped += 1;
            false
        }
    }
}

/// The first word of an IPv4 address (as on the wire, read natively)
/// masked to `prefix` bits.
#[inline(always)]
pub fn mask_v4(addr: u32, prefix: u8) -> u32 {
    if prefix >= 32 {
        return addr;
    }
    // The mask in network order, read natively like the address.
    let host = if prefix == 0 {
        0
    } else {
        u32::MAX << (32 - prefix as u32)
    };
    addr & host.to_be()
}

/// An IPv6 address (four wire-order words, read natively) masked to
/// `prefix` bits.
#[inline(always)]
pub fn mask_v6(addr: [u32; 4], prefix: u8) -> [u32; 4] {
    let mut out = [0u32; 4];
    let mut i = 0;
    while i < 4 {
        let bits = (prefix as i32 - 32 * i as i32).clamp(0, 32) as u8;
        out[i] = mask_v4(addr[i], bits);
        i += 1;
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    const S: u64 = 1_000_000_000;

    #[test]
    fn a_bucket_admits_its_burst_then_its_rate() {
        let mut b = Bucket::default();
        // 100/s, burst 10: ten at once, then one per 10 ms.
        let t0 = 5 * S;
        let first: u32 = (0..20).map(|_| u32::from(b.take(t0, 100, 10))).sum();
        assert_eq!(first, 10);
        assert!(!b.take(t0 + 9_000_000, 100, 10));
        assert!(b.take(t0 + 10_000_000, 100, 10));
        // Over one second at 1000 attempts/s: ~100 admitted.
        let mut n = 0;
        for i in 1..=1000u64 {
            n += u32::from(b.take(t0 + 10_000_000 + i * 1_000_000, 100, 10));
        }
        assert!((99..=101).contains(&n), "{n}");
        assert_eq!(b.passed + b.dropped, 1022);
        // Idle for a long time: full again, never more than the burst.
        let later = t0 + 1000 * S;
        let again: u32 = (0..20).map(|_| u32::from(b.take(later, 100, 10))).sum();
        assert_eq!(again, 10);
    }

    #[test]
    fn slow_rates_refill_in_fractions() {
        let mut b = Bucket::default();
        assert!(b.take(S, 1, 1));
        assert!(!b.take(S + S / 2, 1, 1));
        assert!(b.take(2 * S + 1, 1, 1));
    }

    #[test]
    fn prefixes_mask_in_wire_order() {
        let a = u32::from_ne_bytes([198, 18, 7, 9]);
        assert_eq!(mask_v4(a, 32), a);
        assert_eq!(mask_v4(a, 24), u32::from_ne_bytes([198, 18, 7, 0]));
        assert_eq!(mask_v4(a, 12), u32::from_ne_bytes([198, 16, 0, 0]));
        assert_eq!(mask_v4(a, 0), 0);
        let w = |b: [u8; 4]| u32::from_ne_bytes(b);
        let v6 = [
            w([0x20, 1, 0, 2]),
            w([0, 7, 0, 9]),
            w([1, 2, 3, 4]),
            w([5, 6, 7, 8]),
        ];
        assert_eq!(mask_v6(v6, 128), v6);
        assert_eq!(mask_v6(v6, 64), [w([0x20, 1, 0, 2]), w([0, 7, 0, 9]), 0, 0]);
        assert_eq!(mask_v6(v6, 48), [w([0x20, 1, 0, 2]), w([0, 7, 0, 0]), 0, 0]);
    }
}
