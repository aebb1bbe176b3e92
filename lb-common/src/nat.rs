//! Full NAT (`forwarding = "nat"`): the kernel's NAT state and the rules
//! both sides share.
//!
//! Forward path (client → VIP): the client's flow as received (a
//! [`crate::FlowKey`] / [`crate::FlowKey6`]) finds its [`NatFwd`] in
//! NAT_FWD / NAT_FWD6: the backend, and the SNAT address and port the flow
//! was given. The packet leaves with destination = backend address and
//! port ([`crate::Backend::port`], 0: the VIP's port) and source = SNAT
//! address:port, checksums updated incrementally (RFC 1624).
//!
//! Return path (backend → SNAT address): the reply as received, a flow key
//! (backend, SNAT address, backend port, SNAT port, protocol), finds its
//! [`NatRev`] in NAT_REV / NAT_REV6: the client and the VIP it talked to,
//! and where the client's packets came from (interface, MACs). The reply
//! leaves with source = VIP:port and destination = the client, back to the
//! MAC the client's first packet came from (no route lookup per packet).
//!
//! Both entries are created together by the flow's first packet (TCP SYN,
//! first UDP datagram); the reverse entry is inserted first and only if
//! its key is free (`BPF_NOEXIST`), so a live flow is never overwritten.
//! The SNAT port is searched from [`nat_port_candidate`] for at most
//! [`NAT_PORT_TRIES`] ports; none free → the packet is dropped and counted
//! (`drop_nat_ports_exhausted`). Neither map is an LRU: entries leave when
//! the agent's flow keeper finds both directions idle past the flow's
//! timeout (or when the kernel reclaims an expired pair's port).
//!
//! Several lb hosts behind ECMP must not hand out the same SNAT
//! address:port: each host gets a disjoint port range (`[agent]
//! nat_port_range`) or its own SNAT addresses.

/// A VIP's SNAT addresses, if it (or the agent) names any: at most this
/// many.
pub const MAX_SNAT_ADDRS: usize = 4;

/// A new flow tries at most this many SNAT ports (consecutive from
/// [`nat_port_candidate`]`(hash, 0, …)`) before it is refused.
pub const NAT_PORT_TRIES: u32 = 16;

/// Value of NAT_FWD (key: the client's `FlowKey` as received) and NAT_FWD6
/// (key: `FlowKey6`).
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct NatFwd {
    /// The SNAT address the flow leaves with, as on the wire (IPv4: word
    /// 0, the rest 0).
    pub snat_addr: [u32; 4],
    /// The backend's address when the flow was created, as on the wire
    /// (IPv4: word 0): with the ports, the reverse entry's key, even after
    /// the backend id has been reused.
    pub backend_addr: [u32; 4],
    pub backend_id: u32,
    /// [`crate::FLOW_FLAG_CLOSING`] once a FIN or RST went forward.
    pub flags: u32,
    /// The SNAT port, network byte order.
    pub snat_port: u16,
    /// The backend's port, network byte order.
    pub backend_port: u16,
    pub _pad: u32,
    /// [`crate::Runtime::now_ms`] when a forward packet was last seen.
    pub last_seen_ms: u64,
}

/// Value of NAT_REV (key: the backend's reply as received, a `FlowKey`
/// with src = backend, dst = SNAT address) and NAT_REV6 (`FlowKey6`).
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct NatRev {
    /// The client, as on the wire (IPv4: word 0).
    pub client_addr: [u32; 4],
    /// The VIP the client talked to (IPv4: word 0).
    pub vip_addr: [u32; 4],
    /// Network byte order.
    pub client_port: u16,
    /// Network byte order.
    pub vip_port: u16,
    /// Index of the VIP (VIP_STATS).
    pub vip_index: u32,
    /// [`crate::FLOW_FLAG_CLOSING`] once a FIN or RST came back.
    pub flags: u32,
    /// The interface the client's first packet came in on: replies leave
    /// through it.
    pub ifindex: u32,
    /// The first packet's source MAC (the client or its router): replies'
    /// destination MAC.
    pub client_mac: [u8; 6],
    /// The first packet's destination MAC (lb's interface): replies'
    /// source MAC.
    pub lb_mac: [u8; 6],
    pub backend_id: u32,
    /// [`crate::Runtime::now_ms`] when a reply was last seen.
    pub last_seen_ms: u64,
}

/// Value of NAT_SNAT, indexed by VIP index: the SNAT addresses of a NAT
/// VIP (the VIP's own list, else the agent's). `count == 0`: the
/// backend's route source ([`crate::Backend::encap_src`] /
/// `encap_src6`), the address lb's host uses to reach the backend.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct NatSnat {
    /// As on the wire (IPv4: word 0 of each).
    pub addrs: [[u32; 4]; MAX_SNAT_ADDRS],
    pub count: u32,
    pub _pad: u32,
}

/// Whether a NAT flow is over: both directions idle longer than the
/// flow's timeout at `rt.now_ms` (the timeouts of [`crate::FlowEntry`]:
/// by protocol, the closing one once either direction sent a FIN or RST;
/// 0: never). A missing reverse entry counts as idle forever. The kernel
/// applies this rule only to reclaim a SNAT port a new flow wants (it
/// never expires a flow on the forward path: a one-way stream from the
/// backend keeps its flow), the agent's flow keeper to remove pairs.
#[inline(always)]
pub fn nat_pair_expired(
    fwd: &NatFwd,
    rev: Option<&NatRev>,
    proto: u32,
    rt: &crate::Runtime,
) -> bool {
    let (rev_seen, rev_flags) = rev.map_or((0, 0), |r| (r.last_seen_ms, r.flags));
    let last = crate::FlowEntry {
        backend_id: fwd.backend_id,
        flags: fwd.flags | rev_flags,
        last_seen_ms: if rev_seen > fwd.last_seen_ms {
            rev_seen
        } else {
            fwd.last_seen_ms
        },
    };
    last.is_expired(proto, rt)
}

/// Which of a VIP's `count` SNAT addresses a new flow with flow hash
/// `hash` takes (`count` ≥ 1).
#[inline(always)]
pub const fn snat_index(hash: u32, count: u32) -> u32 {
    // The top bits: the low ones pick the port.
    ((hash >> 16) * count) >> 16
}

/// The `attempt`-th SNAT port (host order) a new flow with flow hash
/// `hash` tries in the range `min..=max` (host order, `min <= max`).
///
/// A range of at most [`NAT_PORT_TRIES`] ports is walked in order from a
/// start the hash picks, so every port is tried. In a larger one each
/// attempt takes a port of its own from a mix of the hash and the attempt
/// number: consecutive ports would pile flows into runs of taken ports
/// (linear probing), and a flow whose start falls into a long run would be
/// refused with free ports elsewhere; independent picks fail only when
/// the range is nearly full (all tries taken: load^tries, ~2e-6 at 44 %).
#[inline(always)]
pub fn nat_port_candidate(hash: u32, attempt: u32, min: u16, max: u16) -> u16 {
    let span = (max - min) as u32 + 1;
    if span <= NAT_PORT_TRIES {
        let start = ((hash & 0xFFFF) * span) >> 16;
        return min + ((start + attempt) % span) as u16;
    }
    let h = crate::fmix32(hash ^ attempt.wrapping_mul(crate::MIX_MULTIPLIER));
    min + crate::ring_slot(h, span) as u16
}

/// Words of a NAT cache slot's key: room for a `FlowKey6`; a `FlowKey`
/// fills the first two, the rest 0.
pub const NAT_CACHE_KEY_WORDS: usize = 5;

/// A slot of NAT_FWD_CACHE / NAT_FWD_CACHE6: a copy of one flow's
/// [`NatFwd`], all the forward hit needs, in front of NAT_FWD(6) (the
/// same design as `FLOW_CACHE` in front of CONNTRACK: slot from
/// [`crate::flow_cache_mix`] / [`crate::flow_cache_mix6`] of the key,
/// cleared by the agent once per tick of the flow clock). One layout for
/// both families, so that both share the code that copies, checks and
/// stores it word by word.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct NatFwdCache {
    /// [`nat_cache_check`] of every word after the first. Slots are
    /// copied and stored without a lock: a copy mixing two writes is
    /// rejected unless its check matches all of its words.
    pub check: u32,
    pub _pad: u32,
    /// The client's flow as received, as words (see
    /// [`NAT_CACHE_KEY_WORDS`]).
    pub key: [u64; NAT_CACHE_KEY_WORDS],
    pub snat_addr: [u32; 4],
    pub backend_addr: [u32; 4],
    pub snat_port: u16,
    pub backend_port: u16,
    pub backend_id: u32,
}

/// A slot of NAT_REV_CACHE / NAT_REV_CACHE6: a copy of one reply key's
/// [`NatRev`], all the return hit needs, in front of NAT_REV(6) (see
/// [`NatFwdCache`]).
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct NatRevCache {
    /// As [`NatFwdCache::check`].
    pub check: u32,
    pub _pad: u32,
    /// The backend's reply as received, as words.
    pub key: [u64; NAT_CACHE_KEY_WORDS],
    pub client_addr: [u32; 4],
    pub vip_addr: [u32; 4],
    pub client_port: u16,
    pub vip_port: u16,
    pub vip_index: u32,
    pub client_mac: [u8; 6],
    pub lb_mac: [u8; 6],
    pub ifindex: u32,
}

/// Words of a [`NatFwdCache`] and of a [`NatRevCache`].
pub const NAT_FWD_CACHE_WORDS: usize = 11;
pub const NAT_REV_CACHE_WORDS: usize = 13;

/// The check word of a NAT cache slot whose words are `words`: a sum of
/// every word but the first (which holds the check), each times an odd
/// constant of its own, folded to 32 bits. A torn copy (the key of one
/// write, some value words of another) passes only if the words it
/// mixes happen to cancel out (about 2^-32). The products do not depend
/// on each other, so the CPU computes them in parallel (a chain of
/// multiplies cost ~10 ns a hit).
#[inline(always)]
pub fn nat_cache_check<const N: usize>(words: &[u64; N]) -> u32 {
    let mut h: u64 = 0;
    let mut i = 1;
    while i < N {
        let k = 0x9E37_79B9_7F4A_7C15u64.wrapping_add((i as u64) << 33) | 1;
        h = h.wrapping_add(words[i].wrapping_mul(k));
        i += 1;
    }
    (h ^ (h >> 32)) as u32
}

impl NatFwdCache {
    #[inline(always)]
    pub fn to_words(self) -> [u64; NAT_FWD_CACHE_WORDS] {
        // SAFETY: #[repr(C)], 88 bytes (asserted), no padding bytes.
        unsafe { core::mem::transmute(self) }
    }
    #[inline(always)]
    pub fn from_words(w: [u64; NAT_FWD_CACHE_WORDS]) -> Self {
        // SAFETY: as above; every bit pattern is valid.
        unsafe { core::mem::transmute(w) }
    }
    /// The slot with its check word set.
    #[inline(always)]
    pub fn sealed(mut self) -> Self {
        self.check = nat_cache_check(&self.to_words());
        self
    }
}

impl NatRevCache {
    #[inline(always)]
    pub fn to_words(self) -> [u64; NAT_REV_CACHE_WORDS] {
        // SAFETY: #[repr(C)], 104 bytes (asserted), no padding bytes.
        unsafe { core::mem::transmute(self) }
    }
    #[inline(always)]
    pub fn from_words(w: [u64; NAT_REV_CACHE_WORDS]) -> Self {
        // SAFETY: as above; every bit pattern is valid.
        unsafe { core::mem::transmute(w) }
    }
    /// The slot with its check word set.
    #[inline(always)]
    pub fn sealed(mut self) -> Self {
        self.check = nat_cache_check(&self.to_words());
        self
    }
}

/// A flow key as the words of a NAT cache slot's key.
#[inline(always)]
pub fn nat_cache_key4(key: &crate::FlowKey) -> [u64; NAT_CACHE_KEY_WORDS] {
    let [a, b] = key.as_words();
    [a, b, 0, 0, 0]
}

/// [`nat_cache_key4`] for IPv6.
#[inline(always)]
pub fn nat_cache_key6(key: &crate::FlowKey6) -> [u64; NAT_CACHE_KEY_WORDS] {
    key.as_words()
}

const _: () = {
    assert!(core::mem::size_of::<NatFwd>() == 56);
    assert!(core::mem::size_of::<NatFwdCache>() == NAT_FWD_CACHE_WORDS * 8);
    assert!(core::mem::size_of::<NatRevCache>() == NAT_REV_CACHE_WORDS * 8);
    assert!(core::mem::size_of::<NatRev>() == 72);
    assert!(core::mem::size_of::<NatSnat>() == 72);
};

#[cfg(test)]
mod tests {
    extern crate std;
    use super::*;

    #[test]
    fn port_candidates_stay_in_range_and_cover_small_ranges() {
        for hash in [0u32, 1, 0xFFFF, 0x1234_5678, u32::MAX] {
            let mut seen = [false; 4];
            for attempt in 0..4 {
                let p = nat_port_candidate(hash, attempt, 40000, 40003);
                assert!((40000..=40003).contains(&p));
                seen[(p - 40000) as usize] = true;
            }
            assert!(seen.iter().all(|&s| s), "{hash:#x}: {seen:?}");
            let p = nat_port_candidate(hash, 7, 1024, 65535);
            assert!(p >= 1024);
            assert_eq!(
                nat_port_candidate(hash, 0, 1024, 65535),
                nat_port_candidate(hash, 0, 1024, 65535)
            );
            assert_eq!(nat_port_candidate(hash, 3, 5, 5), 5);
        }
    }

    #[test]
    fn a_pair_lives_while_either_direction_is_fresh() {
        use crate::{FLOW_FLAG_CLOSING, IPPROTO_TCP, IPPROTO_UDP, Runtime};
        let rt = Runtime {
            now_ms: 10_000,
            udp_idle_ms: 1_000,
            tcp_idle_ms: 5_000,
            tcp_closing_ms: 2_000,
            ..Runtime::default()
        };
        let fwd = |last_seen_ms, flags| NatFwd {
            last_seen_ms,
            flags,
            ..NatFwd::default()
        };
        let rev = |last_seen_ms, flags| NatRev {
            last_seen_ms,
            flags,
            ..NatRev::default()
        };
        let (tcp, udp) = (IPPROTO_TCP as u32, IPPROTO_UDP as u32);
        // UDP: idle forward, fresh replies (a one-way stream): alive.
        assert!(!nat_pair_expired(
            &fwd(1_000, 0),
            Some(&rev(9_500, 0)),
            udp,
            &rt
        ));
        assert!(nat_pair_expired(
            &fwd(1_000, 0),
            Some(&rev(8_999, 0)),
            udp,
            &rt
        ));
        assert!(nat_pair_expired(&fwd(8_999, 0), None, udp, &rt));
        assert!(!nat_pair_expired(&fwd(9_000, 0), None, udp, &rt));
        // TCP: a FIN in either direction moves the pair to closing.
        assert!(!nat_pair_expired(
            &fwd(6_000, 0),
            Some(&rev(6_000, 0)),
            tcp,
            &rt
        ));
        assert!(nat_pair_expired(
            &fwd(6_000, 0),
            Some(&rev(6_000, FLOW_FLAG_CLOSING)),
            tcp,
            &rt
        ));
        assert!(nat_pair_expired(
            &fwd(6_000, FLOW_FLAG_CLOSING),
            Some(&rev(6_000, 0)),
            tcp,
            &rt
        ));
        // No agent (timeouts 0): never.
        assert!(!nat_pair_expired(
            &fwd(0, 0),
            None,
            tcp,
            &Runtime {
                now_ms: u64::MAX,
                ..Runtime::default()
            }
        ));
    }

    #[test]
    fn large_ranges_fail_only_when_nearly_full() {
        // 2000 of 4536 ports taken (44 %), placed by the same rule: every
        // one of 20000 further flows finds a free port within its tries.
        let (min, max) = (61000u16, 65535u16);
        let mut taken = std::vec![false; 4536];
        let place = |hash: u32, taken: &mut std::vec::Vec<bool>| {
            (0..NAT_PORT_TRIES)
                .map(|i| (nat_port_candidate(hash, i, min, max) - min) as usize)
                .find(|&p| !taken[p])
                .map(|p| taken[p] = true)
                .is_some()
        };
        let mut x = 0x1234_5678u32;
        let mut next = || {
            x ^= x << 13;
            x ^= x >> 17;
            x ^= x << 5;
            x
        };
        for _ in 0..2000 {
            assert!(place(next(), &mut taken));
        }
        for _ in 0..20000 {
            let mut t = taken.clone();
            assert!(place(next(), &mut t));
        }
        let spread: std::collections::BTreeSet<u16> = (0..1000)
            .map(|i| nat_port_candidate(i * 7919, 0, min, max))
            .collect();
        assert!(spread.len() > 800, "{}", spread.len());
    }

    #[test]
    fn snat_index_stays_below_count() {
        for hash in [0u32, 0xFFFF_0000, u32::MAX, 0x8000_0000] {
            for count in 1..=MAX_SNAT_ADDRS as u32 {
                assert!(snat_index(hash, count) < count);
            }
        }
        assert_eq!(snat_index(u32::MAX, 4), 3);
        assert_eq!(snat_index(0, 4), 0);
    }
}
