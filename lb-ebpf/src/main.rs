//! lb's XDP fast path.
//!
//! Per packet: parse Ethernet (one VLAN tag), IPv4 (honouring IHL), TCP or
//! UDP; anything that is not for a configured VIP goes to the kernel
//! untouched. For a VIP: conntrack lookup, else Maglev ring; then by the
//! VIP's forwarding mode: direct server return at L2 (rewrite both MACs),
//! or an outer IP (ipip) or IP + UDP (gue) header pushed in front, IPv4 or
//! IPv6 after the backend's family; `XDP_TX` or redirect. A packet the
//! outer header would make too big for the egress MTU is answered with
//! ICMP "fragmentation needed" (ICMPv6 "packet too big"). IPv6 packets
//! take balance6.rs.
//!
//! Full NAT (nat.rs, nat_flow.rs, nat_icmp.rs, nat_cache.rs): a NAT VIP's
//! packets, the replies to the agent's NAT port range and ICMP errors
//! about NAT flows are recognised here. An IPv4 packet whose flow is in
//! the NAT caches is translated here too (the per-packet hit); every
//! other NAT packet is translated by a BPF subprogram of its own, which
//! `lb_xdp` calls after the balancer's subprogram returned (their stack
//! frames are siblings; the DSR and tunnel paths never enter it).
#![no_std]
#![no_main]
// sched.rs: the atomic add BPF has (no `AtomicU64::fetch_add` on this target).
#![allow(internal_features)]
#![feature(core_intrinsics)]

use aya_ebpf::{
    bindings::xdp_action::{XDP_DROP, XDP_PASS, XDP_TX},
    macros::{map, xdp},
    maps::{Array, DevMapHash, HashMap, LruHashMap, PerCpuArray},
    programs::XdpContext,
};
use lb_common::{
    Backend, BackendStats, DEFAULT_CONNTRACK_ENTRIES, DEFAULT_MAX_BACKENDS, DEFAULT_MAX_VIPS,
    DEFAULT_NAT_ENTRIES, DEFAULT_RING_SIZE, FLOW_CACHE_SLOTS, FORWARD_GUE, FORWARD_IPIP,
    FORWARD_NAT, FlowCacheEntry, FlowCacheEntry6, FlowEntry, FlowKey, FlowKey6, IPPROTO_ICMP,
    IPPROTO_IPIP, IPPROTO_TCP, IPPROTO_UDP, Reason, Runtime, VIP_FLAG_LIMITS, VipInfo, VipKey,
    VipSlot, VipSlot6, VipStats, gue_source_port,
    nat::{NatFwd, NatFwdCache, NatRev, NatRevCache, NatSnat},
    vip_table_probe, vip_table_size,
};
use lb_ebpf::{
    encap::{IP_DF, Outer, PushError, icmp_frag_needed, push_gue, push_ipip},
    icmp::{
        ICMP_DEST_UNREACH, ICMP_ECHO_REQUEST, ICMP_FRAG_NEEDED, ICMP_HDR_LEN, ICMP_TIME_EXCEEDED,
        echo_reply, embedded,
    },
    parse::{
        Connection, ETH_P_IP, ETH_P_IPV6, Ethernet, IP_MF_OR_OFFSET, TCP_MIN_LEN, UDP_LEN,
        connection, ethernet, ipv4, ipv4_header_len, l4_ports, ptr_at, write_macs,
    },
};
use network_types::{eth::EthHdr, ip::Ipv4Hdr};

mod acl;
mod balance6;
mod nat;
mod nat_cache;
mod nat_flow;
mod nat_icmp;
mod ratelimit;
mod sched;
mod steer;
mod syn_guard;
use balance6::push_outer6;
use steer::steer;

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

/// The IPv6 VIP table: the same size (`VIP_TABLE_MASK + 1` slots), probe
/// sequence and conventions as VIPS (see lb_common::VipSlot6).
#[map]
static VIPS6: Array<VipSlot6> = Array::pinned(vip_table_size(DEFAULT_MAX_VIPS), 0);

/// IPv6 flows; sized by the agent (its conntrack6_entries).
#[map]
static CONNTRACK6: LruHashMap<FlowKey6, FlowEntry> =
    LruHashMap::pinned(DEFAULT_CONNTRACK_ENTRIES, 0);

/// Direct-mapped cache of recent flows (slot = a one-multiply hash of the
/// flow), in front of CONNTRACK: a hit costs an inlined array load and two
/// compares instead of a hash-map lookup. Shared by all CPUs, so that a
/// new connection recorded on one CPU is seen by the next packet on any
/// other. Not pinned: it refills from traffic.
///
/// The agent clears every slot once per tick of the flow clock, so a
/// flow's first packet in each tick goes through CONNTRACK, which refreshes
/// its record (see the fast path).
///
/// Slots are copied without a lock, so a copy taken while another CPU
/// rewrites the slot can mix two writes. Such a copy is used only if its
/// key equals this packet's flow and its `check` equals this flow's mix
/// XOR its `backend_id`: that rejects a `backend_id` from another write
/// than its `check` (unless the two flows have the same mix), but not a
/// key and a `backend_id` from two writes of flows with the same mix.
/// The backend so read is still honoured only if it is usable and serves
/// this VIP, like any tracked backend: at worst one packet goes to another
/// live backend of the same VIP. Any other torn copy falls back to
/// CONNTRACK.
#[map]
static FLOW_CACHE: Array<FlowCacheEntry> = Array::with_max_entries(FLOW_CACHE_SLOTS, 0);

/// FLOW_CACHE for IPv6 flows, in front of CONNTRACK6: the same design,
/// cleared by the agent with FLOW_CACHE.
#[map]
static FLOW_CACHE6: Array<FlowCacheEntry6> = Array::with_max_entries(FLOW_CACHE_SLOTS, 0);

#[map]
static VIP_STATS: PerCpuArray<VipStats> = PerCpuArray::pinned(DEFAULT_MAX_VIPS, 0);

#[map]
static BACKEND_STATS: PerCpuArray<BackendStats> = PerCpuArray::pinned(DEFAULT_MAX_BACKENDS, 0);

#[map]
static REASON_STATS: PerCpuArray<u64> = PerCpuArray::pinned(Reason::COUNT, 0);

/// Egress interfaces other than the ingress one, keyed by ifindex.
#[map]
static TX_PORTS: DevMapHash = DevMapHash::pinned(64, 0);

/// One element: the flow clock, the conntrack timeouts and the length
/// limit, kept current by the agent (see lb_common::Runtime). Pinned, so a
/// new agent continues the clock.
///
/// Packets up to this IPv4 length are not checked against the limit.
const MIN_LIMITED_L3_LEN: usize = lb_common::MIN_LIMITED_L3_LEN as usize;

#[map]
static RUNTIME: Array<Runtime> = Array::pinned(1, 0);

// Full NAT (see lb_common::nat). Hash maps, not LRUs: a live NAT flow is
// never evicted to make room (a new flow is refused instead); the agent's
// flow keeper removes idle pairs. Sized by the agent (nat_entries).

/// Client side: the client's flow as received → backend, SNAT address
/// and port.
#[map]
static NAT_FWD: HashMap<FlowKey, NatFwd> = HashMap::pinned(DEFAULT_NAT_ENTRIES, 0);

/// Backend side: the reply as received (backend → SNAT address:port) →
/// the client, the VIP and the way back.
#[map]
static NAT_REV: HashMap<FlowKey, NatRev> = HashMap::pinned(DEFAULT_NAT_ENTRIES, 0);

/// NAT_FWD for IPv6 flows.
#[map]
static NAT_FWD6: HashMap<FlowKey6, NatFwd> = HashMap::pinned(DEFAULT_NAT_ENTRIES, 0);

/// NAT_REV for IPv6 flows.
#[map]
static NAT_REV6: HashMap<FlowKey6, NatRev> = HashMap::pinned(DEFAULT_NAT_ENTRIES, 0);

/// Per VIP index: the NAT VIP's SNAT addresses (none: the backend's
/// route source).
#[map]
static NAT_SNAT: Array<NatSnat> = Array::pinned(DEFAULT_MAX_VIPS, 0);

/// Direct-mapped caches in front of NAT_FWD and NAT_REV (IPv4) and
/// NAT_FWD6 and NAT_REV6: FLOW_CACHE's design (see nat_cache.rs). Not
/// pinned: they refill from traffic; cleared by the agent with
/// FLOW_CACHE.
#[map]
static NAT_FWD_CACHE: Array<NatFwdCache> = Array::with_max_entries(FLOW_CACHE_SLOTS, 0);
#[map]
static NAT_REV_CACHE: Array<NatRevCache> = Array::with_max_entries(FLOW_CACHE_SLOTS, 0);
#[map]
static NAT_FWD_CACHE6: Array<NatFwdCache> = Array::with_max_entries(FLOW_CACHE_SLOTS, 0);
#[map]
static NAT_REV_CACHE6: Array<NatRevCache> = Array::with_max_entries(FLOW_CACHE_SLOTS, 0);

#[xdp]
pub fn lb_xdp(ctx: XdpContext) -> u32 {
    match verdict(ctx.ctx) {
        nat::NAT_PENDING => nat::nat_pending(ctx.ctx),
        action => action,
    }
}

/// The balancer's verdict on the packet: the XDP action (a refusal's
/// reason counted), or [`nat::NAT_PENDING`] for a NAT packet, which
/// `lb_xdp` hands to the NAT subprogram after this one returned. A
/// subprogram of its own so that the two frames are siblings, not
/// stacked: BPF's 512 bytes of stack hold this one's frame or NAT's, not
/// both.
#[inline(never)]
fn verdict(ctx: *mut aya_ebpf::bindings::xdp_md) -> u32 {
    let ctx = XdpContext::new(ctx);
    match balance(&ctx) {
        Ok(action) => action,
        Err(reason) => {
            count_reason(reason);
            if reason.is_drop() { XDP_DROP } else { XDP_PASS }
        }
    }
}

#[inline(always)]
pub(crate) fn count_reason(reason: Reason) {
    if let Some(c) = REASON_STATS.get_ptr_mut(reason as u32) {
        // SAFETY: per-CPU slot, no concurrent writer on this CPU.
        unsafe { *c += 1 };
    }
}

/// Finds `key` in the VIP table: a few inlined array loads.
#[inline(always)]
fn find_vip(key: &VipKey) -> Option<VipInfo> {
    // SAFETY: a read-only global set at load time.
    let mask = unsafe { core::ptr::read_volatile(&VIP_TABLE_MASK) };
    for at in vip_table_probe(key, mask) {
        let slot = VIPS.get(at)?;
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

/// ICMP to `dst`: an echo request to a VIP address that answers echo is
/// answered here, a "fragmentation needed" about a VIP's flow goes to the
/// flow's backend; everything else passes to the kernel as before.
#[inline(always)]
fn icmp_to(
    ctx: &XdpContext,
    eth: &Ethernet,
    ihl: usize,
    tot_len: usize,
    dst: u32,
    tos: u8,
) -> Result<u32, Reason> {
    let l3 = eth.l3;
    let l4 = l3 + ihl;
    // The bounds check comes first: after the length check below, the
    // compiler would drop it as implied, and the verifier cannot follow.
    let icmp: *mut [u8; ICMP_HDR_LEN] = ptr_at(ctx, l4).ok_or(Reason::PassNotVip)?;
    if ihl + ICMP_HDR_LEN > tot_len {
        return Err(Reason::PassNotVip);
    }
    // SAFETY: bounds checked by ptr_at.
    let [icmp_type, code, ..] = unsafe { *icmp };
    match (icmp_type, code) {
        (ICMP_ECHO_REQUEST, 0) => {
            let marker = VipKey {
                addr: dst,
                port: 0,
                proto: 0,
                _pad: 0,
            };
            match find_vip(&marker) {
                Some(info) if info.answers_echo() => {
                    // SAFETY: `icmp` was bounds checked above.
                    unsafe { echo_reply(ctx, l3, icmp) }.ok_or(Reason::PassMalformed)?;
                    count_reason(Reason::TxIcmpEchoReply);
                    Ok(XDP_TX)
                }
                _ => Err(Reason::PassNotVip),
            }
        }
        (ICMP_DEST_UNREACH, _) | (ICMP_TIME_EXCEEDED, _) => {
            let frag_needed = icmp_type == ICMP_DEST_UNREACH && code == ICMP_FRAG_NEEDED;
            let action =
                icmp_error_to_backend(ctx, eth, l4, tot_len - ihl, dst, tos, tot_len, frag_needed)?;
            // A NAT translation counts itself when it is done.
            if action != nat::NAT_PENDING {
                count_reason(Reason::FwdIcmpError);
            }
            Ok(action)
        }
        _ => Err(Reason::PassNotVip),
    }
}

/// A "fragmentation needed" to VIP address `dst` (from a router on the
/// client's side, about a packet a backend sent from the VIP): steered
/// like the flow it embeds, reversed (client → VIP), so that it reaches
/// the backend that sent the packet: the flow's conntrack entry if it is
/// honoured, else the VIP's ring (read only: an error creates no entry).
/// The backend lowers its path MTU towards the client.
///
/// Full NAT (any destination-unreachable or time-exceeded error): one
/// about a NAT VIP's flow (to the VIP address, embedding VIP → client)
/// is translated towards the flow's backend, and one to a SNAT address
/// about a NAT flow (embedding SNAT address:port → backend, the port in
/// the NAT range) back towards the client: both by the NAT subprogram
/// ([`nat::NAT_PENDING`]). Errors about anything else pass to the
/// kernel.
#[inline(always)]
#[expect(
    clippy::too_many_arguments,
    reason = "inlined; the values are in registers"
)]
fn icmp_error_to_backend(
    ctx: &XdpContext,
    eth: &Ethernet,
    l4: usize,
    room: usize,
    dst: u32,
    tos: u8,
    tot_len: usize,
    frag_needed: bool,
) -> Result<u32, Reason> {
    let e = embedded(ctx, l4, room).ok_or(Reason::PassNotVip)?;
    if e.vip_addr != dst {
        return Err(Reason::PassNotVip);
    }
    let pos = |side| nat::quoted_pos(eth.l3, l4, e.l4, e.proto, eth.l3 + tot_len, side);
    let Some(vip) = find_vip(&VipKey {
        addr: e.vip_addr,
        port: e.vip_port,
        proto: e.proto,
        _pad: 0,
    }) else {
        if nat::in_nat_range(e.vip_port) {
            return nat::pend(pos(nat::NAT_ICMP_BACKEND_SIDE), 0, 0);
        }
        return Err(Reason::PassNotVip);
    };
    if vip.forwarding == FORWARD_NAT {
        return nat::pend(pos(nat::NAT_ICMP_CLIENT_SIDE), 0, 0);
    }
    if !frag_needed {
        return Err(Reason::PassNotVip);
    }
    let flow = FlowKey {
        src_addr: e.client_addr,
        dst_addr: e.vip_addr,
        src_port: e.client_port,
        dst_port: e.vip_port,
        proto: e.proto as u32,
    };
    let backend = steer::owner(&flow, &vip)?;
    forward(ctx, eth.hdr, eth.l3, &vip, backend, tos, tot_len, &flow)
}

#[inline(always)]
fn balance(ctx: &XdpContext) -> Result<u32, Reason> {
    let eth = ethernet(ctx).ok_or(Reason::PassShortFrame)?;
    if eth.ether_type == ETH_P_IPV6 {
        return balance6::balance6(ctx, &eth);
    }
    if eth.ether_type != ETH_P_IP {
        return Err(Reason::PassNotIp);
    }
    let l3 = eth.l3;

    let ip = ipv4(ctx, l3).ok_or(Reason::PassMalformed)?;
    if ip.vihl >> 4 != 4 {
        return Err(Reason::PassMalformed);
    }
    let ihl = ipv4_header_len(ip);
    let dst = u32::from_ne_bytes(ip.dst_addr);
    let tot_len = u16::from_be_bytes(ip.tot_len) as usize;
    let frame_len = ctx.data_end() - ctx.data();
    let tos = ip.tos;
    let frags = u16::from_be_bytes(ip.frags);
    if ihl < Ipv4Hdr::LEN || tot_len < ihl || l3 + tot_len > frame_len {
        return Err(unsteerable(
            dst,
            Reason::DropMalformed,
            Reason::PassMalformed,
        ));
    }
    if frags & IP_MF_OR_OFFSET != 0 {
        return Err(unsteerable(dst, Reason::DropFragment, Reason::PassFragment));
    }
    let proto = ip.proto;
    let l4_min = match proto {
        IPPROTO_TCP => TCP_MIN_LEN,
        IPPROTO_UDP => UDP_LEN,
        IPPROTO_ICMP => return icmp_to(ctx, &eth, ihl, tot_len, dst, tos),
        _ => return Err(Reason::PassNotVip),
    };
    let l4 = l3 + ihl;
    if ihl + l4_min > tot_len {
        return Err(unsteerable(
            dst,
            Reason::DropMalformed,
            Reason::PassMalformed,
        ));
    }
    // The L4 header fits in the total length, which fits in the frame: the
    // ports are in the frame (checked again for the verifier; as for the
    // TCP flags below, a failure here could only be a malformed frame).
    let [src_port, dst_port] = l4_ports(ctx, l4).ok_or(Reason::DropMalformed)?;
    let vip_key = VipKey {
        addr: dst,
        port: dst_port,
        proto,
        _pad: 0,
    };
    let Some(vip) = find_vip(&vip_key) else {
        // Not a VIP: a NAT flow's reply if its port is in the NAT range
        // (the gate costs one array load; no hash lookup outside it).
        if !nat::in_nat_range(dst_port) {
            return Err(Reason::PassNotVip);
        }
        let closing = connection(ctx, proto, l4)
            .ok_or(Reason::DropMalformed)?
            .closing;
        // A cached reply is translated here, without the handoff.
        let reply = FlowKey {
            src_addr: u32::from_ne_bytes(ip.src_addr),
            dst_addr: dst,
            src_port,
            dst_port,
            proto: proto as u32,
        };
        if !closing && let Some(r) = nat_cache::reply_hit(ctx, l3, l4, &reply, frame_len as u64) {
            return r;
        }
        let flags = nat::NAT_REPLY | if closing { nat::NAT_CLOSING } else { 0 };
        return nat::pend(nat::nat_pos(l3, l4, proto, flags), 0, 0);
    };

    // A TCP SYN (without ACK) opens a new connection: it is steered by the
    // ring even when a conntrack entry exists for its 5-tuple (a reused
    // source port must follow the current ring, not a closed connection).
    // A FIN or RST starts the end of a connection: its record goes to the
    // shorter closing timeout.
    let Connection {
        new_connection,
        closing,
    } = connection(ctx, proto, l4).ok_or(Reason::DropMalformed)?;

    // Size limits. The limit (max_l3_len) is the smallest egress MTU, and
    // lb takes it for the ingress MTU too (one interface, or all alike):
    // - a packet longer than it cannot have come over the wire as one
    //   packet (a GRO aggregate in generic mode): dropped, never forwarded;
    // - a packet that fits it but not with the VIP's outer header could
    //   have been sent smaller: with DF set it is answered with ICMP
    //   "fragmentation needed" carrying the limit minus the outer header
    //   (the client lowers its path MTU and sends again); with DF clear it
    //   is dropped (lb never fragments).
    // The limit is read only for packets longer than IPv4's minimum
    // datagram size once encapsulated: shorter ones fit any MTU lb
    // accepts, and cost nothing here.
    let flow = FlowKey {
        src_addr: u32::from_ne_bytes(ip.src_addr),
        dst_addr: dst,
        src_port,
        dst_port,
        proto: proto as u32,
    };
    let overhead = vip.encap_overhead() as usize;
    // A source the VIP's ACL denies gets no ICMP answer either.
    let admit = || acl::check(&flow, vip.index, acl::word(vip.index));
    if let Some(action) = size_limit(ctx, frame_len, l3, ihl, tot_len, frags, overhead, admit)? {
        return Ok(action);
    }
    // The ACL before the rate limits for what they count (a denied source
    // spends no token of the VIP's ceiling), and before the NAT caches,
    // which do not know it; other packets are checked in steer (a flow
    // cache hit needs no lookup).
    if new_connection || vip.forwarding == FORWARD_NAT {
        acl::check(&flow, vip.index, acl::word(vip.index))?;
    }
    policy(&flow, &vip, new_connection)?;
    if vip.forwarding == FORWARD_NAT {
        // A cached flow is translated here, without the handoff.
        if !new_connection
            && !closing
            && let Some(r) = nat_cache::forward_hit(ctx, l3, l4, &flow, vip.index, frame_len as u64)
        {
            return r;
        }
        let flags = if new_connection {
            nat::NAT_NEW_CONNECTION
        } else {
            0
        } | if closing { nat::NAT_CLOSING } else { 0 };
        return nat::pend(
            nat::nat_pos(l3, l4, proto, flags),
            nat::nat_vip(&vip),
            vip.ring_size,
        );
    }
    // Bytes as received: the client's frame, without any outer header lb
    // adds (the same count whatever the VIP's mode).
    let backend = steer(&flow, &vip, new_connection, closing, frame_len as u64)?;
    // 4in6: an IPv6 backend's outer header is 20 bytes longer than the
    // VIP's IPv4 one, and the backend is known only now (so a packet
    // answered here has been counted and its flow recorded: the client
    // sends it again, smaller, on the same flow).
    if overhead != 0
        && backend.is_v6()
        && let Some(action) = size_limit(
            ctx,
            frame_len,
            l3,
            ihl,
            tot_len,
            frags,
            vip.encap_overhead6() as usize,
            // Steered: the ACL admitted it.
            || Ok(()),
        )?
    {
        return Ok(action);
    }

    forward(ctx, eth.hdr, l3, &vip, backend, tos, tot_len, &flow)
}

/// The VIP's policy for a packet of `flow` (both families), before it is
/// steered or translated: its rate limits (a TCP SYN is a new
/// connection; a UDP flow's first packet is counted where it misses its
/// record, see steer.rs and nat.rs).
#[inline(always)]
pub(crate) fn policy<S: ratelimit::Source>(
    flow: &S,
    vip: &VipInfo,
    new_connection: bool,
) -> Result<(), Reason> {
    if vip.flags & VIP_FLAG_LIMITS != 0
        && let Some(l) = ratelimit::limits(vip.index)
    {
        ratelimit::admit(l, vip.index, flow, new_connection)?;
    }
    Ok(())
}

/// The size limits above for an outer header of `overhead` bytes:
/// `Some(XDP_TX)` when the packet was answered with ICMP "fragmentation
/// needed", `None` when it may go on. `admit` is asked before answering
/// (the VIP's ACL).
#[inline(always)]
#[expect(
    clippy::too_many_arguments,
    reason = "inlined; the values are in registers"
)]
fn size_limit(
    ctx: &XdpContext,
    frame_len: usize,
    l3: usize,
    ihl: usize,
    tot_len: usize,
    frags: u16,
    overhead: usize,
    admit: impl FnOnce() -> Result<(), Reason>,
) -> Result<Option<u32>, Reason> {
    if tot_len + overhead > MIN_LIMITED_L3_LEN {
        if tot_len + overhead > u16::MAX as usize {
            return Err(Reason::DropTooBig);
        }
        if let Some(rt) = RUNTIME.get(0)
            && rt.max_l3_len != 0
            && (tot_len + overhead) as u32 > rt.max_l3_len
        {
            let limit = rt.max_l3_len as usize;
            if tot_len > limit {
                return Err(Reason::DropTooBig);
            }
            if frags & IP_DF == 0 {
                return Err(Reason::DropTooBigNoDf);
            }
            admit()?;
            icmp_frag_needed(ctx, frame_len, l3, ihl, (limit - overhead) as u16)
                .map_err(push_reason)?;
            count_reason(Reason::TxIcmpTooBig);
            return Ok(Some(XDP_TX));
        }
    }
    Ok(None)
}

/// Sends the packet at `l3` (`tot_len` bytes, TOS `tos`) of `flow` to
/// `backend` in `vip`'s forwarding mode: next hop's MACs (DSR at L2), or an
/// outer header pushed in front (ipip, gue); then `XDP_TX` or a redirect.
#[inline(always)]
#[expect(
    clippy::too_many_arguments,
    reason = "inlined; the values are in registers"
)]
fn forward(
    ctx: &XdpContext,
    eth: *mut EthHdr,
    l3: usize,
    vip: &VipInfo,
    backend: &Backend,
    tos: u8,
    tot_len: usize,
    flow: &FlowKey,
) -> Result<u32, Reason> {
    match vip.forwarding {
        FORWARD_IPIP | FORWARD_GUE if backend.is_v6() => {
            push_outer6(
                ctx,
                l3,
                vip,
                backend,
                tos,
                tot_len,
                flow.hash(),
                IPPROTO_IPIP,
            )?;
        }
        FORWARD_IPIP | FORWARD_GUE => {
            let outer = Outer {
                dst_mac: backend.dst_mac,
                src_mac: backend.src_mac,
                src: backend.encap_src,
                dst: backend.addr,
                tos,
                inner_len: tot_len as u16,
            };
            if vip.forwarding == FORWARD_IPIP {
                push_ipip(ctx, l3, &outer)
            } else {
                let src_port = gue_source_port(flow.hash()).to_be();
                push_gue(ctx, l3, &outer, src_port, vip.gue_port)
            }
            .map_err(push_reason)?;
        }
        // SAFETY: the 14-byte Ethernet header was bounds checked by
        // ethernet().
        _ => unsafe { write_macs(eth as *mut u8, backend.dst_mac, backend.src_mac) },
    }
    send(ctx, backend)
}

/// Sends the rewritten frame towards `backend`: back out the ingress
/// interface (`XDP_TX`) or redirected to its egress interface.
#[inline(always)]
pub(crate) fn send(ctx: &XdpContext, backend: &Backend) -> Result<u32, Reason> {
    if backend.ifindex == ctx.ingress_ifindex() as u32 {
        Ok(XDP_TX)
    } else {
        TX_PORTS
            .redirect(backend.ifindex, 0)
            .map_err(|_| Reason::DropNoTxPort)
    }
}

#[inline(always)]
pub(crate) fn push_reason(e: PushError) -> Reason {
    match e {
        PushError::NoHeadroom => Reason::DropNoHeadroom,
        PushError::Malformed => Reason::DropMalformed,
    }
}

#[cfg(not(test))]
#[panic_handler]
fn panic(_info: &core::panic::PanicInfo) -> ! {
    loop {}
}
