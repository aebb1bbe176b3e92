//! lb's XDP fast path.
//!
//! Per packet: parse Ethernet (one VLAN tag), IPv4 (honouring IHL), TCP or
//! UDP; anything that is not for a configured VIP goes to the kernel
//! untouched. For a VIP: conntrack lookup, else Maglev ring; then direct
//! server return at L2 (rewrite both MACs, `XDP_TX` or redirect).
#![no_std]
#![no_main]

use core::mem::size_of;

use aya_ebpf::{
    bindings::xdp_action::{XDP_DROP, XDP_PASS, XDP_TX},
    macros::{map, xdp},
    maps::{Array, DevMapHash, LruHashMap, PerCpuArray},
    programs::XdpContext,
};
use lb_common::{
    BACKEND_FLAG_USABLE, Backend, BackendStats, DEFAULT_CONNTRACK_ENTRIES, DEFAULT_MAX_BACKENDS,
    DEFAULT_MAX_VIPS, DEFAULT_RING_SIZE, FLOW_CACHE_BITS, FLOW_CACHE_SLOTS, FlowCacheEntry,
    FlowEntry, FlowKey, IPPROTO_TCP, IPPROTO_UDP, NO_BACKEND, Reason, VIP_TABLE_PROBES, VipInfo,
    VipKey, VipSlot, VipStats, ring_slot, vip_table_index, vip_table_size,
};
use network_types::{eth::EthHdr, ip::Ipv4Hdr};

// Every map is pinned by name under the directory the agent chooses, so a
// restarted agent finds the same maps (and the flows in CONNTRACK).
// Sizes here are defaults; the agent sets them at load time.

/// (addr, port, proto) → VIP, plus one address-only marker per VIP
/// address: an open-addressing table in an array (see lb_common::VipSlot).
#[map]
static VIPS: Array<VipSlot> = Array::pinned(vip_table_size(DEFAULT_MAX_VIPS), 0);

/// VIPS has `VIP_TABLE_MASK + 1` slots; set by the agent at load time.
#[unsafe(no_mangle)]
static VIP_TABLE_MASK: u32 = vip_table_size(DEFAULT_MAX_VIPS) - 1;

#[map]
static BACKENDS: Array<Backend> = Array::pinned(DEFAULT_MAX_BACKENDS, 0);

/// All VIPs' Maglev rings, one after the other: slot → backend id.
#[map]
static RINGS: Array<u32> = Array::pinned(DEFAULT_MAX_VIPS * DEFAULT_RING_SIZE, 0);

#[map]
static CONNTRACK: LruHashMap<FlowKey, FlowEntry> = LruHashMap::pinned(DEFAULT_CONNTRACK_ENTRIES, 0);

/// Direct-mapped cache of recent flows (slot = a one-multiply hash of the
/// flow), in front of CONNTRACK: a hit costs an inlined array load and two
/// compares instead of a hash-map lookup. Shared by all CPUs, so that a
/// new connection recorded on one CPU is seen by the next packet on any
/// other; a torn read of a slot being rewritten fails the `check` word and
/// falls back to CONNTRACK. Not pinned: it refills from traffic.
#[map]
static FLOW_CACHE: Array<FlowCacheEntry> = Array::with_max_entries(FLOW_CACHE_SLOTS, 0);

#[map]
static VIP_STATS: PerCpuArray<VipStats> = PerCpuArray::pinned(DEFAULT_MAX_VIPS, 0);

#[map]
static BACKEND_STATS: PerCpuArray<BackendStats> = PerCpuArray::pinned(DEFAULT_MAX_BACKENDS, 0);

#[map]
static REASON_STATS: PerCpuArray<u64> = PerCpuArray::pinned(Reason::COUNT, 0);

/// Egress interfaces other than the ingress one, keyed by ifindex.
#[map]
static TX_PORTS: DevMapHash = DevMapHash::pinned(64, 0);

const ETH_P_IP: u16 = 0x0800;
const ETH_P_8021Q: u16 = 0x8100;
const ETH_P_8021AD: u16 = 0x88A8;
const VLAN_HDR_LEN: usize = 4;
const TCP_MIN_LEN: usize = 20;
const UDP_LEN: usize = 8;
const TCP_FLAGS_OFFSET: usize = 13;
const TCP_SYN: u8 = 0x02;
const TCP_ACK: u8 = 0x10;
/// More-fragments flag and fragment offset, in the 16-bit field as loaded
/// from the wire (host order after `from_be_bytes`).
const IP_MF_OR_OFFSET: u16 = 0x3FFF;

#[xdp]
pub fn lb_xdp(ctx: XdpContext) -> u32 {
    match balance(&ctx) {
        Ok(action) => action,
        Err(reason) => {
            count_reason(reason);
            if reason.is_drop() { XDP_DROP } else { XDP_PASS }
        }
    }
}

#[inline(always)]
fn count_reason(reason: Reason) {
    if let Some(c) = REASON_STATS.get_ptr_mut(reason as u32) {
        // SAFETY: per-CPU slot, no concurrent writer on this CPU.
        unsafe { *c += 1 };
    }
}

/// Bounds-checked pointer to a `T` at `offset` from the start of the frame.
#[inline(always)]
fn ptr_at<T>(ctx: &XdpContext, offset: usize) -> Option<*mut T> {
    let start = ctx.data();
    if start + offset + size_of::<T>() > ctx.data_end() {
        return None;
    }
    Some((start + offset) as *mut T)
}

/// Finds `key` in the VIP table: a few inlined array loads.
#[inline(always)]
fn find_vip(key: &VipKey) -> Option<VipInfo> {
    // SAFETY: a read-only global set at load time.
    let mask = unsafe { core::ptr::read_volatile(&VIP_TABLE_MASK) };
    let home = vip_table_index(key, mask);
    for i in 0..VIP_TABLE_PROBES {
        let slot = VIPS.get((home + i) & mask)?;
        if slot.key.addr == 0 {
            return None;
        }
        if slot.key.as_u64() == key.as_u64() {
            return Some(slot.info);
        }
    }
    None
}

#[inline(always)]
fn is_vip_addr(addr: u32) -> bool {
    find_vip(&VipKey {
        addr,
        port: 0,
        proto: 0,
        _pad: 0,
    })
    .is_some()
}

/// The reason for a packet that cannot be steered: dropped when it is
/// addressed to a VIP address (it must not reach a wrong place), passed to
/// the kernel otherwise.
#[inline(always)]
fn unsteerable(dst: u32, drop: Reason, pass: Reason) -> Reason {
    if is_vip_addr(dst) { drop } else { pass }
}

#[inline(always)]
fn balance(ctx: &XdpContext) -> Result<u32, Reason> {
    let eth: *mut EthHdr = ptr_at(ctx, 0).ok_or(Reason::PassShortFrame)?;
    // SAFETY: bounds checked by ptr_at.
    let mut ether_type = u16::from_be(unsafe { (*eth).ether_type });
    let mut l3 = EthHdr::LEN;
    if ether_type == ETH_P_8021Q || ether_type == ETH_P_8021AD {
        let inner: *const u16 = ptr_at(ctx, EthHdr::LEN + 2).ok_or(Reason::PassShortFrame)?;
        ether_type = u16::from_be(unsafe { *inner });
        l3 += VLAN_HDR_LEN;
    }
    if ether_type != ETH_P_IP {
        return Err(Reason::PassNotIpv4);
    }

    let ip: *const Ipv4Hdr = ptr_at(ctx, l3).ok_or(Reason::PassMalformed)?;
    // SAFETY: bounds checked by ptr_at.
    let ip = unsafe { &*ip };
    if ip.vihl >> 4 != 4 {
        return Err(Reason::PassMalformed);
    }
    let ihl = ((ip.vihl & 0x0F) as usize) * 4;
    let dst = u32::from_ne_bytes(ip.dst_addr);
    let tot_len = u16::from_be_bytes(ip.tot_len) as usize;
    let frame_len = ctx.data_end() - ctx.data();
    if ihl < Ipv4Hdr::LEN || tot_len < ihl || l3 + tot_len > frame_len {
        return Err(unsteerable(
            dst,
            Reason::DropMalformed,
            Reason::PassMalformed,
        ));
    }
    if u16::from_be_bytes(ip.frags) & IP_MF_OR_OFFSET != 0 {
        return Err(unsteerable(dst, Reason::DropFragment, Reason::PassFragment));
    }
    let proto = ip.proto;
    let l4_min = match proto {
        IPPROTO_TCP => TCP_MIN_LEN,
        IPPROTO_UDP => UDP_LEN,
        _ => return Err(Reason::PassNotVip),
    };
    let l4 = l3 + ihl;
    // Source and destination ports: the first four bytes of TCP and UDP.
    let ports: *const [u16; 2] = ptr_at(ctx, l4).ok_or(Reason::PassMalformed)?;
    if ihl + l4_min > tot_len {
        return Err(unsteerable(
            dst,
            Reason::DropMalformed,
            Reason::PassMalformed,
        ));
    }
    // SAFETY: bounds checked by ptr_at.
    let [src_port, dst_port] = unsafe { *ports };
    let vip_key = VipKey {
        addr: dst,
        port: dst_port,
        proto,
        _pad: 0,
    };
    let vip = find_vip(&vip_key).ok_or(Reason::PassNotVip)?;
    // A TCP SYN (without ACK) opens a new connection: it is steered by the
    // ring even when a conntrack entry exists for its 5-tuple (a reused
    // source port must follow the current ring, not a closed connection).
    let new_connection = proto == IPPROTO_TCP && {
        let flags: *const u8 = ptr_at(ctx, l4 + TCP_FLAGS_OFFSET).ok_or(Reason::DropMalformed)?;
        // SAFETY: bounds checked by ptr_at.
        let flags = unsafe { *flags };
        flags & (TCP_SYN | TCP_ACK) == TCP_SYN
    };

    let flow = FlowKey {
        src_addr: u32::from_ne_bytes(ip.src_addr),
        dst_addr: dst,
        src_port,
        dst_port,
        proto: proto as u32,
    };

    // Established flow: honoured while its backend is usable and still
    // serves this VIP; otherwise it falls through to the ring. The flow
    // cache answers for recently seen flows with one inlined array load;
    // CONNTRACK (the LRU) is the record.
    // The cache slot comes from one multiply (the full flow hash is only
    // needed, and computed, on the way to the ring).
    let mix = (flow.src_addr ^ flow.dst_addr ^ ((src_port as u32) << 16 | dst_port as u32))
        .wrapping_mul(0x9E37_79B1);
    let cache_slot = FLOW_CACHE.get_ptr_mut(mix >> (32 - FLOW_CACHE_BITS));
    let mut cached = false;
    let tracked = if new_connection {
        None
    } else {
        // SAFETY: the slot is copied out; a torn copy fails `check`.
        match cache_slot.map(|c| unsafe { *c }) {
            Some(c) if c.key.as_words() == flow.as_words() && c.check == mix ^ c.backend_id => {
                cached = true;
                Some(c.backend_id)
            }
            // SAFETY: the entry is copied out immediately.
            _ => unsafe { CONNTRACK.get(&flow) }.map(|e| e.backend_id),
        }
    };
    let mut hit = false;
    let mut backend_id = NO_BACKEND;
    let mut backend: Option<&Backend> = None;
    if let Some(id) = tracked
        && let Some(b) = BACKENDS.get(id)
        && b.flags & BACKEND_FLAG_USABLE != 0
        && b.vip_index == vip.index
    {
        hit = true;
        backend_id = id;
        backend = Some(b);
    }
    let backend = match backend {
        Some(b) => b,
        None => {
            let slot = vip.ring_base + ring_slot(flow.hash(), vip.ring_size);
            backend_id = *RINGS.get(slot).ok_or(Reason::DropNoBackend)?;
            let b = BACKENDS.get(backend_id).ok_or(Reason::DropNoBackend)?;
            if b.flags & BACKEND_FLAG_USABLE == 0 {
                return Err(Reason::DropNoBackend);
            }
            let _ = CONNTRACK.insert(
                &flow,
                &FlowEntry {
                    backend_id,
                    _pad: 0,
                },
                0,
            );
            b
        }
    };
    if !(cached && hit)
        && let Some(c) = cache_slot
    {
        // SAFETY: a plain store into the array value; concurrent readers
        // validate with `check`.
        unsafe {
            *c = FlowCacheEntry {
                key: flow,
                backend_id,
                check: mix ^ backend_id,
            };
        }
    }

    let bytes = frame_len as u64;
    if let Some(s) = VIP_STATS.get_ptr_mut(vip.index) {
        // SAFETY: per-CPU slot.
        unsafe {
            (*s).packets += 1;
            (*s).bytes += bytes;
            if hit {
                (*s).conntrack_hits += 1;
            } else {
                (*s).new_flows += 1;
            }
        }
    }
    if let Some(s) = BACKEND_STATS.get_ptr_mut(backend_id) {
        // SAFETY: per-CPU slot.
        unsafe {
            (*s).packets += 1;
            (*s).bytes += bytes;
        }
    }

    // Both MACs as 32- and 16-bit stores: a 6-byte array copy compiles to
    // a byte-by-byte memmove subprogram call in BPF.
    let [d0, d1, d2, d3, d4, d5] = backend.dst_mac;
    let [s0, s1, s2, s3, s4, s5] = backend.src_mac;
    let frame = eth as *mut u8;
    // SAFETY: the 14-byte Ethernet header was bounds checked above; XDP
    // data is at least 2-byte aligned, and unaligned stores are fine on
    // the architectures lb supports.
    unsafe {
        (frame as *mut u32).write_unaligned(u32::from_ne_bytes([d0, d1, d2, d3]));
        (frame.add(4) as *mut u16).write_unaligned(u16::from_ne_bytes([d4, d5]));
        (frame.add(6) as *mut u16).write_unaligned(u16::from_ne_bytes([s0, s1]));
        (frame.add(8) as *mut u32).write_unaligned(u32::from_ne_bytes([s2, s3, s4, s5]));
    }
    if backend.ifindex == ctx.ingress_ifindex() as u32 {
        Ok(XDP_TX)
    } else {
        TX_PORTS
            .redirect(backend.ifindex, 0)
            .map_err(|_| Reason::DropNoTxPort)
    }
}

/// The per-packet floor for benchmarks: parse Ethernet, IPv4 and TCP with
/// the same bounds checks, swap MACs, `XDP_TX`.
#[xdp]
pub fn lb_floor(ctx: XdpContext) -> u32 {
    floor(&ctx).unwrap_or(XDP_PASS)
}

#[inline(always)]
fn floor(ctx: &XdpContext) -> Option<u32> {
    let eth: *mut EthHdr = ptr_at(ctx, 0)?;
    // SAFETY: bounds checked by ptr_at.
    if u16::from_be(unsafe { (*eth).ether_type }) != ETH_P_IP {
        return None;
    }
    let ip: *const Ipv4Hdr = ptr_at(ctx, EthHdr::LEN)?;
    let ip = unsafe { &*ip };
    if ip.proto != IPPROTO_TCP {
        return None;
    }
    let ihl = ((ip.vihl & 0x0F) as usize) * 4;
    let _ports: *const [u16; 2] = ptr_at(ctx, EthHdr::LEN + ihl)?;
    // Swapped with 32- and 16-bit moves, as lb_xdp rewrites its MACs
    // (a 6-byte array copy would be a byte-loop subprogram call).
    let frame = eth as *mut u8;
    // SAFETY: the Ethernet header was bounds checked.
    unsafe {
        let d0 = (frame as *const u32).read_unaligned();
        let d1 = (frame.add(4) as *const u16).read_unaligned();
        let s0 = (frame.add(6) as *const u16).read_unaligned();
        let s1 = (frame.add(8) as *const u32).read_unaligned();
        let [a, b, c, d] = s1.to_ne_bytes();
        let [e, f] = s0.to_ne_bytes();
        let [g, h, i, j] = d0.to_ne_bytes();
        let [k, l] = d1.to_ne_bytes();
        // New dst = old src (bytes 6..12), new src = old dst (bytes 0..6).
        (frame as *mut u32).write_unaligned(u32::from_ne_bytes([e, f, a, b]));
        (frame.add(4) as *mut u16).write_unaligned(u16::from_ne_bytes([c, d]));
        (frame.add(6) as *mut u16).write_unaligned(u16::from_ne_bytes([g, h]));
        (frame.add(8) as *mut u32).write_unaligned(u32::from_ne_bytes([i, j, k, l]));
    }
    Some(XDP_TX)
}

/// The end-to-end benchmark's frame template (Ethernet + IPv4 + UDP
/// headers); unset (all zero) means "send frames as they are".
#[map]
static GEN_TEMPLATE: Array<[u64; GEN_TEMPLATE_WORDS]> = Array::with_max_entries(1, 0);

const GEN_TEMPLATE_WORDS: usize = 6;

/// The traffic generator of the end-to-end benchmark (BPF_PROG_TEST_RUN
/// with live frames): rewrites the first 48 bytes of every frame from
/// GEN_TEMPLATE, when set, and returns `XDP_TX`. Live frames reuse pages
/// without resetting them, and a system that modifies a frame in place
/// (NAT, TTL, MACs) would otherwise get its own output back.
#[xdp]
pub fn lb_gen_tx(ctx: XdpContext) -> u32 {
    if let Some(t) = GEN_TEMPLATE.get(0)
        && t[1] != 0
        && let Some(frame) = ptr_at::<[u64; GEN_TEMPLATE_WORDS]>(&ctx, 0)
    {
        // SAFETY: 48 bytes bounds checked by ptr_at.
        unsafe { frame.write_unaligned(*t) };
    }
    XDP_TX
}

/// Only returns: the fixed cost of one BPF_PROG_TEST_RUN call.
#[xdp]
pub fn lb_return(_ctx: XdpContext) -> u32 {
    XDP_PASS
}

#[cfg(not(test))]
#[panic_handler]
fn panic(_info: &core::panic::PanicInfo) -> ! {
    loop {}
}
