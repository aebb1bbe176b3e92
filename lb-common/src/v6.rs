//! The IPv6 counterparts of the VIP table key, the flow key, the flow hash
//! and the flow cache entry. Addresses are four 32-bit words holding the
//! wire bytes read natively (like the IPv4 `u32`s), so the fast path loads
//! and compares them without swapping bytes. `VipInfo`, `FlowEntry`, the
//! backend array, the rings and the counters are family independent and
//! shared with IPv4.

use core::net::Ipv6Addr;

use crate::{MIX_MULTIPLIER, VipInfo};

/// An IPv6 address as four words of wire bytes, read natively.
pub const fn addr6_words(addr: Ipv6Addr) -> [u32; 4] {
    let o = addr.octets();
    [
        u32::from_ne_bytes([o[0], o[1], o[2], o[3]]),
        u32::from_ne_bytes([o[4], o[5], o[6], o[7]]),
        u32::from_ne_bytes([o[8], o[9], o[10], o[11]]),
        u32::from_ne_bytes([o[12], o[13], o[14], o[15]]),
    ]
}

/// Inverse of [`addr6_words`].
pub const fn addr6_of_words(w: [u32; 4]) -> Ipv6Addr {
    let [a, b, c, d] = [
        w[0].to_ne_bytes(),
        w[1].to_ne_bytes(),
        w[2].to_ne_bytes(),
        w[3].to_ne_bytes(),
    ];
    Ipv6Addr::from_octets([
        a[0], a[1], a[2], a[3], b[0], b[1], b[2], b[3], c[0], c[1], c[2], c[3], d[0], d[1], d[2],
        d[3],
    ])
}

/// Bytes an outer IPv6 header adds (6in6, 4in6).
pub const IPIP6_OVERHEAD: u32 = 40;
/// Bytes an outer IPv6 header and a UDP header add (GUE over IPv6).
pub const GUE6_OVERHEAD: u32 = 48;
/// IPv6's minimum link MTU (RFC 8200): no path MTU below it is announced.
pub const IPV6_MIN_MTU: u32 = 1280;

/// The flow label of an outer IPv6 header, from the flow hash: the same
/// for every packet of a flow, different across flows, so that the
/// backend's NIC and stack (which hash on the label, RFC 6438) spread
/// flows over receive queues even for 6in6 and 4in6, which have no ports
/// outside. The kernel and `lb explain` call this same function.
#[inline(always)]
pub const fn ipv6_flow_label(flow_hash: u32) -> u32 {
    flow_hash & 0xF_FFFF
}

impl VipInfo {
    /// Bytes the VIP's forwarding mode puts in front of a packet when the
    /// outer header is IPv6 (an IPv6 backend).
    #[inline(always)]
    pub const fn encap_overhead6(&self) -> u32 {
        match self.forwarding {
            crate::FORWARD_IPIP => IPIP6_OVERHEAD,
            crate::FORWARD_GUE => GUE6_OVERHEAD,
            _ => 0,
        }
    }
}

/// Key of the IPv6 VIP table (VIPS6): (address, port, protocol) as on the
/// wire. Like [`crate::VipKey`], one address-only marker per VIP address
/// (`port == 0 && proto == 0`, [`crate::VIP_FLAG_ADDR_ONLY`]) lets the
/// fast path recognise fragments and malformed packets to a VIP address.
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct VipKey6 {
    pub addr: [u32; 4],
    /// Port, network byte order.
    pub port: u16,
    pub proto: u8,
    pub _pad: u8,
}

impl VipKey6 {
    /// `port` in host order.
    pub const fn new(addr: Ipv6Addr, port_host: u16, proto: u8) -> Self {
        Self::from_wire(addr6_words(addr), port_host.to_be(), proto)
    }

    /// `addr` as on the wire, `port` in network order: the key as the
    /// fast path reads it from a packet.
    #[inline(always)]
    pub const fn from_wire(addr: [u32; 4], port: u16, proto: u8) -> Self {
        Self {
            addr,
            port,
            proto,
            _pad: 0,
        }
    }

    /// The address-only marker entry for `addr`.
    pub const fn addr_only(addr: Ipv6Addr) -> Self {
        Self::new(addr, 0, 0)
    }

    /// Port and protocol as one word (the rest of the key).
    #[inline(always)]
    pub fn tail(&self) -> u32 {
        (self.port as u32) << 16 | (self.proto as u32) << 8
    }
}

impl Default for VipKey6 {
    fn default() -> Self {
        VIP6_SLOT_EMPTY
    }
}

/// A slot never used: a lookup stops here (no VIP has address ::).
pub const VIP6_SLOT_EMPTY: VipKey6 = VipKey6 {
    addr: [0; 4],
    port: 0,
    proto: 0,
    _pad: 0,
};

/// A slot whose VIP was removed: a lookup goes on past it (no VIP has
/// address ffff:…:ffff, a multicast address).
pub const VIP6_SLOT_TOMBSTONE: VipKey6 = VipKey6 {
    addr: [u32::MAX; 4],
    port: 0,
    proto: 0,
    _pad: 0,
};

/// One slot of the IPv6 VIP table, an array of the same size as VIPS
/// (`VIP_TABLE_MASK + 1` slots) with the same open addressing, probe
/// sequence and empty/tombstone conventions.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct VipSlot6 {
    pub key: VipKey6,
    pub info: VipInfo,
}

/// Home slot of `key` in a table of `mask + 1` slots: the address words
/// folded, then the same murmur3 finalizer as [`crate::vip_table_index`].
#[inline(always)]
pub fn vip_table_index6(key: &VipKey6, mask: u32) -> u32 {
    let [a, b, c, d] = key.addr;
    let folded = a ^ b.rotate_left(8) ^ c.rotate_left(16) ^ d.rotate_left(24);
    crate::vip_table_home(folded, key.port, key.proto, mask)
}

/// The slots where `key` may be, in lookup order (as
/// [`crate::vip_table_probe`]).
#[inline(always)]
pub fn vip_table_probe6(key: &VipKey6, mask: u32) -> impl Iterator<Item = u32> + use<> {
    crate::vip_table_probe_from(vip_table_index6(key, mask), mask)
}

/// IPv6 connection-tracking key: the 5-tuple as on the wire, ten words
/// without padding.
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub struct FlowKey6 {
    pub src_addr: [u32; 4],
    pub dst_addr: [u32; 4],
    pub src_port: u16,
    pub dst_port: u16,
    /// The protocol (next header) number, widened to a word.
    pub proto: u32,
}

impl FlowKey6 {
    /// Ports in host order.
    pub const fn new(
        src: Ipv6Addr,
        src_port: u16,
        dst: Ipv6Addr,
        dst_port: u16,
        proto: u8,
    ) -> Self {
        Self {
            src_addr: addr6_words(src),
            dst_addr: addr6_words(dst),
            src_port: src_port.to_be(),
            dst_port: dst_port.to_be(),
            proto: proto as u32,
        }
    }

    /// The key as five words, for equality tests in the fast path.
    #[inline(always)]
    pub fn as_words(&self) -> [u64; 5] {
        // SAFETY: #[repr(C)], 40 bytes, no padding, every bit pattern valid.
        unsafe { core::mem::transmute::<FlowKey6, [u64; 5]>(*self) }
    }

    /// The IPv6 flow hash. The kernel and the agent call this same
    /// function.
    #[inline(always)]
    pub fn hash(&self) -> u32 {
        flow_hash6(
            &self.src_addr,
            &self.dst_addr,
            self.src_port,
            self.dst_port,
            self.proto as u8,
        )
    }
}

/// Hash of an IPv6 flow's 5-tuple, fields as on the wire.
///
/// The addresses enter as four 64-bit halves, each folded in with a
/// multiply and a rotate (so high bits reach the low ones), then the ports
/// and protocol, then [`crate::flow_hash`]'s finalizer: a handful more
/// multiplies than the IPv4 hash, fixed constants (the same backend on
/// every lb host).
#[inline(always)]
pub fn flow_hash6(src: &[u32; 4], dst: &[u32; 4], src_port: u16, dst_port: u16, proto: u8) -> u32 {
    use crate::{FLOW_K1, FLOW_K2, FLOW_K3};
    let half = |a: u32, b: u32| ((a as u64) << 32) | b as u64;
    let b = crate::flow_hash_ports(src_port, dst_port, proto);
    let mut h = half(src[0], src[1]).wrapping_mul(FLOW_K1);
    h = (h.rotate_left(29) ^ half(src[2], src[3])).wrapping_mul(FLOW_K2);
    h = (h.rotate_left(29) ^ half(dst[0], dst[1])).wrapping_mul(FLOW_K3);
    h = (h.rotate_left(29) ^ half(dst[2], dst[3])).wrapping_mul(FLOW_K1);
    h = (h.rotate_left(29) ^ b.wrapping_add(FLOW_K2)).wrapping_mul(FLOW_K3);
    crate::flow_hash_finish(h)
}

/// The flow cache's one-multiply mix of an IPv6 flow (as
/// [`crate::flow_cache_mix`]: its top bits pick the slot of FLOW_CACHE6,
/// the word goes into the entry's `check`).
#[inline(always)]
pub fn flow_cache_mix6(key: &FlowKey6) -> u32 {
    let s = key.src_addr;
    let d = key.dst_addr;
    (s[0] ^ s[1] ^ s[2] ^ s[3] ^ d[3] ^ ((key.src_port as u32) << 16 | key.dst_port as u32))
        .wrapping_mul(MIX_MULTIPLIER)
}

/// One slot of the IPv6 flow cache (FLOW_CACHE6) in front of CONNTRACK6;
/// the same design as [`crate::FlowCacheEntry`].
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct FlowCacheEntry6 {
    pub key: FlowKey6,
    pub backend_id: u32,
    /// [`flow_cache_mix6`] of `key` XOR `backend_id`.
    pub check: u32,
}

#[cfg(test)]
mod tests {
    extern crate std;
    use super::*;
    use crate::{FLOW_CACHE_SLOTS, IPPROTO_TCP, VIP_TABLE_PROBES, flow_cache_slot, ring_slot};

    const CLIENT: Ipv6Addr = Ipv6Addr::new(0x2001, 2, 0, 0, 0, 0, 0, 2);
    const VIP: Ipv6Addr = Ipv6Addr::new(0x2001, 2, 0, 10, 0, 0, 0, 1);

    fn spread_ok(buckets: &[u32; 16], n: u32) {
        let mean = n / 16;
        for b in buckets {
            assert!(b.abs_diff(mean) < mean / 10, "{buckets:?}");
        }
    }

    #[test]
    fn hash6_spreads_adjacent_source_ports() {
        let mut buckets = [0u32; 16];
        for port in 1000u16..61000 {
            let k = FlowKey6::new(CLIENT, port, VIP, 80, IPPROTO_TCP);
            buckets[ring_slot(k.hash(), 16) as usize] += 1;
        }
        spread_ok(&buckets, 60000);
    }

    #[test]
    fn hash6_spreads_addresses_differing_in_one_word() {
        // Clients differing only in one 32-bit word of the address (each
        // word in turn, the others fixed), same port: spread evenly.
        for word in 0..4 {
            let mut buckets = [0u32; 16];
            for i in 0..32000u32 {
                let mut k = FlowKey6::new(CLIENT, 40000, VIP, 80, IPPROTO_TCP);
                k.src_addr[word] ^= i.to_be();
                buckets[ring_slot(k.hash(), 16) as usize] += 1;
            }
            spread_ok(&buckets, 32000);
        }
    }

    #[test]
    fn hash6_depends_on_every_field() {
        let k = FlowKey6::new(CLIENT, 40000, VIP, 80, IPPROTO_TCP);
        let mut seen = std::collections::BTreeSet::from([k.hash()]);
        let mut changed = |f: &dyn Fn(&mut FlowKey6)| {
            let mut m = k;
            f(&mut m);
            assert!(seen.insert(m.hash()), "{m:?} collides");
        };
        changed(&|m| m.src_addr[0] ^= 1);
        changed(&|m| m.src_addr[3] ^= 1 << 31);
        changed(&|m| m.dst_addr[1] ^= 1);
        changed(&|m| m.dst_addr[3] ^= 1);
        changed(&|m| m.src_port ^= 1);
        changed(&|m| m.dst_port ^= 1);
        changed(&|m| m.proto = 17);
        // Source and destination swapped: another flow, another hash.
        changed(&|m| core::mem::swap(&mut m.src_addr, &mut m.dst_addr));
    }

    #[test]
    fn vip6_probe_sequence_starts_home_and_wraps_and_spreads() {
        let key = VipKey6::new(VIP, 80, IPPROTO_TCP);
        let home = vip_table_index6(&key, 63);
        let seq: std::vec::Vec<u32> = vip_table_probe6(&key, 63).collect();
        assert_eq!(seq.len(), VIP_TABLE_PROBES as usize);
        for (i, &at) in seq.iter().enumerate() {
            assert_eq!(at, (home + i as u32) % 64);
        }
        // 16 ports of one address, and 16 addresses differing in the
        // last word: no slot of 64 is home to more than 3 of either.
        let mut homes = [0u32; 64];
        for port in 1000..1016 {
            homes[vip_table_index6(&VipKey6::new(VIP, port, IPPROTO_TCP), 63) as usize] += 1;
        }
        assert!(homes.iter().all(|&n| n <= 3), "{homes:?}");
        let mut homes = [0u32; 64];
        for last in 1..17u16 {
            let a = Ipv6Addr::new(0x2001, 2, 0, 10, 0, 0, 0, last);
            homes[vip_table_index6(&VipKey6::new(a, 80, IPPROTO_TCP), 63) as usize] += 1;
        }
        assert!(homes.iter().all(|&n| n <= 3), "{homes:?}");
    }

    #[test]
    fn flow_labels_fit_20_bits_and_spread_flows() {
        let labels: std::collections::BTreeSet<u32> = (40000u16..41000)
            .map(|port| ipv6_flow_label(FlowKey6::new(CLIENT, port, VIP, 80, IPPROTO_TCP).hash()))
            .collect();
        assert!(labels.iter().all(|&l| l < 1 << 20));
        assert!(labels.len() > 995, "1000 flows, {} labels", labels.len());
        let vip = |forwarding| VipInfo {
            forwarding,
            ..VipInfo::default()
        };
        assert_eq!(vip(crate::FORWARD_IPIP).encap_overhead6(), 40);
        assert_eq!(vip(crate::FORWARD_GUE).encap_overhead6(), 48);
        assert_eq!(vip(crate::FORWARD_DSR_L2).encap_overhead6(), 0);
    }

    #[test]
    fn words_round_trip_and_keep_wire_order() {
        let k = VipKey6::new(VIP, 80, IPPROTO_TCP);
        assert_eq!(k.addr[0].to_ne_bytes(), [0x20, 0x01, 0, 2]);
        assert_eq!(addr6_of_words(k.addr), VIP);
        assert_eq!(k.port.to_ne_bytes(), [0, 80]);
        assert_ne!(VipKey6::addr_only(VIP), VIP6_SLOT_EMPTY);
        let k = FlowKey6::new(CLIENT, 1, VIP, 2, IPPROTO_TCP);
        assert_eq!(k.as_words().len(), 5);
        assert!(flow_cache_slot(flow_cache_mix6(&k)) < FLOW_CACHE_SLOTS);
    }
}
