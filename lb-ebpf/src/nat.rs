//! Module of the lb-ebpf binary (main.rs): full NAT's data path (see
//! lb_common::nat for the state and its rules), generic over the family
//! like [`crate::steer`] (IPv4 and IPv6 VIPs, backends of the VIP's
//! family).
//!
//! Forward (client → VIP:port): NAT_FWD(6) by the flow as received; a hit
//! whose backend still serves the VIP is rewritten to SNAT address:port →
//! backend:port. A TCP SYN, a miss or an unusable backend makes a new
//! pair: the ring's backend, a SNAT address, and the first free SNAT port
//! of [`NAT_PORT_TRIES`] candidates, its reverse entry inserted with
//! `BPF_NOEXIST` so that a live flow's port is never taken.
//!
//! Return (backend → SNAT address:port, ports gated by the agent's NAT
//! range before any lookup): NAT_REV(6) by the reply as received; a hit
//! is rewritten to VIP:port → client:port and sent back the way the
//! client's first packet came (its MACs and interface).

use aya_ebpf::{
    bindings::{
        BPF_NOEXIST,
        xdp_action::{XDP_DROP, XDP_PASS, XDP_TX},
        xdp_md,
    },
    macros::map,
    maps::PerCpuArray,
    programs::XdpContext,
};
use lb_common::{
    Backend, FLOW_FLAG_CLOSING, FlowEntry, FlowKey, FlowKey6, Reason, Runtime, VipInfo,
    nat::{
        MAX_SNAT_ADDRS, NAT_PORT_TRIES, NatFwd, NatRev, nat_pair_expired, nat_port_candidate,
        snat_index,
    },
};
use lb_ebpf::{
    parse::{read_macs, write_macs},
    rewrite::ptr_at,
};

pub(crate) use crate::nat_flow::{NatFlow, same_addr};
use crate::nat_flow::{copy_mac, copy4};
use crate::{
    BACKENDS, NAT_SNAT, RUNTIME, TX_PORTS, VIP_STATS, count_reason, nat_cache, send,
    steer::count_steered,
};

/// The kernel's "exists" error, as map helpers return it.
const EEXIST: i32 = 17;

/// Whether `port` (network order) is in the agent's NAT range: only then
/// is a packet to a non-VIP address looked up as a NAT reply. Range 0/0
/// (no agent, or no NAT): never.
#[inline(always)]
pub(crate) fn in_nat_range(port: u16) -> bool {
    let port = u16::from_be(port);
    RUNTIME.get(0).is_some_and(|rt| {
        rt.nat_port_min != 0 && rt.nat_port_min <= port && port <= rt.nat_port_max
    })
}

/// The clock (0 without an agent).
#[inline(always)]
fn now_ms() -> u64 {
    RUNTIME.get(0).map_or(0, |rt| rt.now_ms)
}

/// The packet's position and kind for [`nat_pending`], packed into one
/// word: L3 offset (bits 0–15; read back masked to 8 bits), L4 offset
/// (16–31; masked to 12), protocol (32–39), and the flags below.
#[inline(always)]
pub(crate) const fn nat_pos(l3: usize, l4: usize, proto: u8, flags: u64) -> u64 {
    l3 as u64 | (l4 as u64) << 16 | (proto as u64) << 32 | flags
}
/// A TCP SYN without ACK.
pub(crate) const NAT_NEW_CONNECTION: u64 = 1 << 40;
/// A TCP FIN or RST.
pub(crate) const NAT_CLOSING: u64 = 1 << 41;
/// A reply (to a SNAT address:port), not a VIP's packet.
pub(crate) const NAT_REPLY: u64 = 1 << 42;

/// The VIP's ring for [`nat_pending`], packed: index (bits 0–31), ring
/// base (32–63).
#[inline(always)]
pub(crate) const fn nat_vip(vip: &VipInfo) -> u64 {
    vip.index as u64 | (vip.ring_base as u64) << 32
}

/// An IPv6 packet.
pub(crate) const NAT_V6: u64 = 1 << 43;
/// An ICMP error to a SNAT address about a NAT flow (from the backend's
/// side): see [`crate::nat_icmp`].
pub(crate) const NAT_ICMP_BACKEND_SIDE: u64 = 1 << 44;
/// An ICMP error to a NAT VIP about its flow (from the client's side).
pub(crate) const NAT_ICMP_CLIENT_SIDE: u64 = 1 << 45;
/// The ICMP error quotes the embedded packet's TCP/UDP checksum.
pub(crate) const NAT_INNER_CSUM: u64 = 1 << 46;

/// [`nat_pos`] for an ICMP error: outer L3 at `l3`, ICMP header at
/// `icmp`, the embedded packet's TCP/UDP header (of `proto`) at
/// `inner_l4` (bits 48–59).
#[inline(always)]
pub(crate) const fn nat_icmp_pos(
    l3: usize,
    icmp: usize,
    inner_l4: usize,
    proto: u8,
    flags: u64,
) -> u64 {
    nat_pos(l3, icmp, proto, flags) | ((inner_l4 as u64) & 0xFFF) << 48
}

/// [`nat_icmp_pos`] of an ICMP error whose quoted bytes end at `end`,
/// with [`NAT_INNER_CSUM`] when the quoted L4 checksum is among them
/// (UDP's 8 header bytes always are; TCP's checksum only when 18 bytes of
/// its header are).
#[inline(always)]
pub(crate) fn quoted_pos(
    l3: usize,
    icmp: usize,
    inner_l4: usize,
    proto: u8,
    end: usize,
    flags: u64,
) -> u64 {
    let csum = proto != lb_common::IPPROTO_TCP || inner_l4 + 18 <= end;
    nat_icmp_pos(
        l3,
        icmp,
        inner_l4,
        proto,
        flags | if csum { NAT_INNER_CSUM } else { 0 },
    )
}

/// What [`crate::verdict`] returns for a NAT packet (no XDP action has
/// this value): `lb_xdp` then calls [`nat_pending`].
pub(crate) const NAT_PENDING: u32 = 0x4e41_5400;

/// Records a NAT packet's position ([`nat_pos`]) and VIP ([`nat_vip`],
/// ring size; 0 for a reply) for [`nat_pending`]: `Ok(NAT_PENDING)`.
#[inline(always)]
pub(crate) fn pend(pos: u64, vip: u64, ring_size: u32) -> Result<u32, Reason> {
    let s = NAT_SCRATCH.get_ptr_mut(0).ok_or(Reason::DropNatTableFull)?;
    // SAFETY: this CPU's element, valid for the program's run.
    // Volatile: three plain stores were merged into a memcpy call.
    unsafe {
        core::ptr::write_volatile(&raw mut (*s).pos, pos);
        core::ptr::write_volatile(&raw mut (*s).vip, vip);
        core::ptr::write_volatile(&raw mut (*s).ring_size, ring_size as u64);
    }
    Ok(NAT_PENDING)
}

/// The NAT packet [`pend`] recorded: a NAT VIP's packet (to the backend)
/// or a NAT reply (to the client), as the module doc says. The final XDP
/// action, a refusal's reason counted. A BPF subprogram called by
/// `lb_xdp` after the balancer's returned: the stack of a call chain is
/// 512 bytes, and the balancer's frame takes most of them; the flow key
/// and the values a new pair writes live in the per-CPU [`NAT_SCRATCH`].
#[inline(never)]
pub(crate) fn nat_pending(ctx: *mut xdp_md) -> u32 {
    let ctx = XdpContext::new(ctx);
    let r = match NAT_SCRATCH.get_ptr_mut(0) {
        // SAFETY: this CPU's element, valid for the program's run.
        Some(s) => unsafe {
            let (pos, vip, ring_size) = ((*s).pos, (*s).vip, (*s).ring_size as u32);
            if pos & NAT_V6 != 0 {
                nat_packet::<FlowKey6>(&ctx, s, pos, vip, ring_size)
            } else {
                nat_packet::<FlowKey>(&ctx, s, pos, vip, ring_size)
            }
        },
        None => Err(Reason::DropNatTableFull),
    };
    match r {
        Ok(action) => action,
        Err(reason) => {
            count_reason(reason);
            if reason.is_drop() { XDP_DROP } else { XDP_PASS }
        }
    }
}

#[inline(always)]
fn nat_packet<F: NatFlow>(
    ctx: &XdpContext,
    scratch: *mut NatScratch,
    pos: u64,
    vip: u64,
    ring_size: u32,
) -> Result<u32, Reason> {
    // The frame as received (NAT adds no bytes).
    let bytes = (ctx.data_end() - ctx.data()) as u64;
    // Masked to what an XDP frame (one page) can hold: the verifier marks
    // a bounds check only for offsets it knows stay well below 64 KiB.
    let l3 = (pos & 0xFF) as usize;
    let l4 = ((pos >> 16) & 0xFFF) as usize;
    let proto = ((pos >> 32) & 0xFF) as u32;
    let closing = pos & NAT_CLOSING != 0;
    if pos & (NAT_ICMP_BACKEND_SIDE | NAT_ICMP_CLIENT_SIDE) != 0 {
        return crate::nat_icmp::icmp_error::<F>(ctx, scratch, l3, l4, pos);
    }
    let flow = load_flow::<F>(ctx, scratch_key(scratch, Slot::Flow), l3, l4, proto)?;
    if pos & NAT_REPLY != 0 {
        return reply(ctx, l3, l4, flow, closing, bytes);
    }
    let vip = VipInfo {
        index: vip as u32,
        ring_base: (vip >> 32) as u32,
        ring_size,
        flags: 0,
        forwarding: lb_common::FORWARD_NAT,
        gue_port: 0,
    };
    if pos & (NAT_NEW_CONNECTION | NAT_CLOSING) == 0
        && let Some(r) = nat_cache::forward_hit(ctx, l3, l4, flow, vip.index, bytes)
    {
        return r;
    }
    let now = now_ms();
    if pos & NAT_NEW_CONNECTION == 0
        && let Some(p) = flow.fwd()
    {
        // SAFETY: the map value stays valid for the program's run (RCU);
        // concurrent writers store whole words.
        let e = unsafe { &mut *p };
        if let Some(b) = BACKENDS.get(e.backend_id)
            && b.is_usable()
            && b.vip_index == vip.index
        {
            // Written only when it changes: the entry's line is shared by
            // every CPU the flow's packets arrive on.
            if e.last_seen_ms != now {
                e.last_seen_ms = now;
            }
            if closing && e.flags & FLOW_FLAG_CLOSING == 0 {
                e.flags |= FLOW_FLAG_CLOSING;
                crate::sched::closed(vip.index, e.backend_id);
            }
            nat_cache::cache_fwd(flow, e);
            count_steered(vip.index, e.backend_id, true, bytes);
            return out::<F>(
                ctx,
                l3,
                l4,
                proto as u8,
                &e.snat_addr,
                e.snat_port,
                &e.backend_addr,
                e.backend_port,
                b,
            );
        }
    }
    make_pair(ctx, l3, l4, flow, &vip, closing, bytes, scratch)
}

/// Per-CPU room for the flow key and the values a new pair writes (the
/// BPF stack is 512 bytes for the whole call chain, most of it the fast
/// path's): map values may be handed to map helpers as keys and values.
#[repr(C)]
pub(crate) struct NatScratch {
    /// The pending packet: [`nat_pos`], [`nat_vip`], the ring size.
    pos: u64,
    vip: u64,
    ring_size: u64,
    rev: NatRev,
    fwd: NatFwd,
    /// The packet's flow key (`FlowKey` or `FlowKey6`).
    flow: [u64; 5],
    /// The reverse key being tried.
    key: [u64; 5],
    /// The forward key of a pair being reclaimed.
    fkey: [u64; 5],
}

/// The key slots of [`NatScratch`].
#[derive(Clone, Copy)]
pub(crate) enum Slot {
    Flow,
    Key,
    FKey,
}

/// The key slot `slot` of the scratch element as a `F`.
#[inline(always)]
pub(crate) fn scratch_key<F: NatFlow>(scratch: *mut NatScratch, slot: Slot) -> &'static mut F {
    // SAFETY: this CPU's scratch element, valid for the program's run;
    // each slot holds 40 bytes, 8-byte aligned, room for either key.
    unsafe {
        let p = match slot {
            Slot::Flow => &raw mut (*scratch).flow,
            Slot::Key => &raw mut (*scratch).key,
            Slot::FKey => &raw mut (*scratch).fkey,
        };
        &mut *(p as *mut F)
    }
}

/// Reads the flow of the packet whose IP header is at `l3` and TCP/UDP
/// header at `l4` into `flow`.
#[inline(always)]
pub(crate) fn load_flow<'a, F: NatFlow>(
    ctx: &XdpContext,
    flow: &'a mut F,
    l3: usize,
    l4: usize,
    proto: u32,
) -> Result<&'a F, Reason> {
    let ports: *const [u16; 2] = ptr_at(ctx, l4).ok_or(Reason::DropMalformed)?;
    // SAFETY: bounds checked.
    let [sport, dport] = unsafe { *ports };
    flow.load_addrs(ctx, l3).ok_or(Reason::DropMalformed)?;
    flow.set_ports(sport, dport, proto);
    Ok(flow)
}

#[map]
static NAT_SCRATCH: PerCpuArray<NatScratch> = PerCpuArray::with_max_entries(1, 0);

#[inline(always)]
#[expect(clippy::too_many_arguments, reason = "inlined; in registers")]
fn make_pair<F: NatFlow>(
    ctx: &XdpContext,
    l3: usize,
    l4: usize,
    flow: &F,
    vip: &VipInfo,
    closing: bool,
    bytes: u64,
    scratch: *mut NatScratch,
) -> Result<u32, Reason> {
    let proto = flow.proto();
    if proto != lb_common::IPPROTO_TCP as u32 {
        // A UDP flow's first packet: a new connection for the rate limits
        // (a TCP one was counted by its SYN).
        crate::ratelimit::admit_new_flow(vip.index, flow)?;
    }
    let now = now_ms();
    let (id, b) = crate::sched::pick(flow, vip)?;
    if b.is_v6() != F::V6 {
        return Err(Reason::DropUnsupportedForwarding);
    }
    let flags = if closing { FLOW_FLAG_CLOSING } else { 0 };
    if let Some(p) = flow.fwd() {
        // SAFETY: the map value stays valid for the program's run (RCU);
        // concurrent writers store whole words.
        let e = unsafe { &mut *p };
        let rev = scratch_key::<F>(scratch, Slot::Key);
        rev.set(
            &e.backend_addr,
            e.backend_port,
            &e.snat_addr,
            e.snat_port,
            proto,
        );
        if e.backend_id == id {
            // A new connection (SYN) on a pair whose backend the ring
            // still gives: the pair is reused, both directions start
            // afresh.
            e.last_seen_ms = now;
            // Counted again if it had been counted closed.
            if e.flags & FLOW_FLAG_CLOSING != 0 && !closing {
                crate::sched::opened(vip.index, id);
            }
            e.flags = flags;
            if let Some(r) = rev.rev() {
                // SAFETY: as above.
                unsafe {
                    (*r).flags = 0;
                    (*r).last_seen_ms = now;
                }
            }
            nat_cache::cache_fwd(flow, e);
            count_steered(vip.index, id, false, bytes);
            return out::<F>(
                ctx,
                l3,
                l4,
                proto as u8,
                &e.snat_addr,
                e.snat_port,
                &e.backend_addr,
                e.backend_port,
                b,
            );
        }
        // Re-steered: the old pair's port is released with its reverse
        // entry; the forward entry is overwritten below.
        rev.remove_rev();
        nat_cache::forget_rev(rev);
    }

    let rt = RUNTIME.get(0).ok_or(Reason::DropNatPortsExhausted)?;
    let (min, max) = (rt.nat_port_min, rt.nat_port_max);
    if min == 0 || min > max {
        return Err(Reason::DropNatPortsExhausted);
    }
    let hash = flow.hash();
    let backend_port = if b.port != 0 { b.port } else { flow.dport() };
    let eth: *mut [u8; 14] = ptr_at(ctx, 0).ok_or(Reason::DropMalformed)?;
    // SAFETY: this CPU's element, valid for the program's run; written
    // field by field (a whole-struct store becomes a memmove call), and
    // the addresses built in place (the stack is short).
    let (fwd, rev, key) = unsafe {
        let f = &mut (*scratch).fwd;
        copy4(&mut f.backend_addr, &F::backend_addr(b));
        match NAT_SNAT.get(vip.index) {
            Some(s) if s.count != 0 => {
                let count = if s.count > MAX_SNAT_ADDRS as u32 {
                    MAX_SNAT_ADDRS as u32
                } else {
                    s.count
                };
                // Below count ≤ MAX_SNAT_ADDRS (a power of two): the mask
                // changes nothing but shows the verifier the bound.
                let i = snat_index(hash, count) as usize & (MAX_SNAT_ADDRS - 1);
                copy4(&mut f.snat_addr, &s.addrs[i]);
            }
            _ => copy4(&mut f.snat_addr, &F::route_src(b)),
        }
        f.backend_id = id;
        f.flags = flags;
        f.snat_port = 0;
        f.backend_port = backend_port;
        f._pad = 0;
        f.last_seen_ms = now;
        let r = &mut (*scratch).rev;
        let (lb_mac, client_mac) = read_macs(eth as *const u8);
        copy4(&mut r.client_addr, &flow.src());
        copy4(&mut r.vip_addr, &flow.dst());
        r.client_port = flow.sport();
        r.vip_port = flow.dport();
        r.vip_index = vip.index;
        r.flags = 0;
        r.ifindex = ctx.ingress_ifindex() as u32;
        copy_mac(&mut r.client_mac, client_mac);
        copy_mac(&mut r.lb_mac, lb_mac);
        r.backend_id = id;
        r.last_seen_ms = now;
        (
            &mut (*scratch).fwd,
            &(*scratch).rev,
            scratch_key::<F>(scratch, Slot::Key),
        )
    };
    let mut snat_port = 0;
    for i in 0..NAT_PORT_TRIES {
        let port = nat_port_candidate(hash, i, min, max).to_be();
        key.set(&fwd.backend_addr, backend_port, &fwd.snat_addr, port, proto);
        match key.insert_rev(rev, BPF_NOEXIST as u64) {
            Ok(()) => {
                snat_port = port;
                break;
            }
            Err(e) if e == -EEXIST => {
                if reclaim(key, rt, scratch) && key.insert_rev(rev, BPF_NOEXIST as u64).is_ok() {
                    snat_port = port;
                    break;
                }
            }
            Err(_) => return Err(Reason::DropNatTableFull),
        }
    }
    if snat_port == 0 {
        return Err(Reason::DropNatPortsExhausted);
    }
    fwd.snat_port = snat_port;
    if flow.insert_fwd(fwd).is_err() {
        key.remove_rev();
        return Err(Reason::DropNatTableFull);
    }
    // Both slots rewritten: a copy of an earlier pair with either key
    // (a reclaimed or re-steered one) must not outlive it.
    nat_cache::cache_fwd(flow, fwd);
    nat_cache::cache_rev(key, rev);
    if !closing {
        crate::sched::opened(vip.index, id);
    }
    count_steered(vip.index, id, false, bytes);
    out::<F>(
        ctx,
        l3,
        l4,
        proto as u8,
        &fwd.snat_addr,
        snat_port,
        &fwd.backend_addr,
        backend_port,
        b,
    )
}

/// The reverse entry at `key` holds a SNAT port a new flow wants: if its
/// pair is over ([`nat_pair_expired`]), both entries are removed and
/// `true` returned (the port may be taken). The pair's forward entry is
/// found by the flow the reverse entry records, and counts only if it
/// still names this SNAT address:port (otherwise the reverse entry is an
/// orphan, judged by its own last packet).
#[inline(always)]
fn reclaim<F: NatFlow>(key: &F, rt: &Runtime, scratch: *mut NatScratch) -> bool {
    let Some(r) = key.rev() else {
        // Removed meanwhile: free.
        return true;
    };
    // SAFETY: the map value stays valid for the program's run (RCU).
    let r = unsafe { &*r };
    let proto = key.proto();
    let fkey = scratch_key::<F>(scratch, Slot::FKey);
    fkey.set(
        &r.client_addr,
        r.client_port,
        &r.vip_addr,
        r.vip_port,
        proto,
    );
    let fwd = fkey.fwd().filter(|f| {
        // SAFETY: as above.
        let f = unsafe { &**f };
        f.snat_port == key.dport() && same_addr(&f.snat_addr, &key.dst())
    });
    let expired = match fwd {
        // SAFETY: as above.
        Some(f) => nat_pair_expired(unsafe { &*f }, Some(r), proto, rt),
        // An orphan: idle since its own last reply.
        None => FlowEntry {
            backend_id: r.backend_id,
            flags: r.flags,
            last_seen_ms: r.last_seen_ms,
        }
        .is_expired(proto, rt),
    };
    if expired {
        key.remove_rev();
        nat_cache::forget_rev(key);
        if fwd.is_some() {
            fkey.remove_fwd();
            nat_cache::forget_fwd(fkey);
        }
    }
    expired
}

/// Rewrites the packet to `src:sport → dst:dport` and sends it to `b`'s
/// next hop.
#[inline(always)]
#[expect(clippy::too_many_arguments, reason = "inlined; in registers")]
pub(crate) fn out<F: NatFlow>(
    ctx: &XdpContext,
    l3: usize,
    l4: usize,
    proto: u8,
    src: &[u32; 4],
    sport: u16,
    dst: &[u32; 4],
    dport: u16,
    b: &Backend,
) -> Result<u32, Reason> {
    let eth: *mut [u8; 14] = ptr_at(ctx, 0).ok_or(Reason::DropMalformed)?;
    F::rewrite(ctx, l3, l4, proto, src, sport, dst, dport).ok_or(Reason::DropMalformed)?;
    // SAFETY: bounds checked by ptr_at.
    unsafe { write_macs(eth as *mut u8, b.dst_mac, b.src_mac) };
    send(ctx, b)
}

/// A packet to a non-VIP address and a port of the NAT range (`flow` as
/// received): a NAT flow's reply is translated back to VIP:port →
/// client:port and sent the client's way; anything else passes untouched
/// (`pass_nat_no_flow`).
#[inline(always)]
fn reply<F: NatFlow>(
    ctx: &XdpContext,
    l3: usize,
    l4: usize,
    flow: &F,
    closing: bool,
    bytes: u64,
) -> Result<u32, Reason> {
    let eth: *mut [u8; 14] = ptr_at(ctx, 0).ok_or(Reason::DropMalformed)?;
    if !closing && let Some(r) = nat_cache::reply_hit(ctx, l3, l4, flow, bytes) {
        return r;
    }
    let p = flow.rev().ok_or(Reason::PassNatNoFlow)?;
    // SAFETY: the map value stays valid for the program's run (RCU);
    // concurrent writers store whole words.
    let e = unsafe { &mut *p };
    let now = now_ms();
    if e.last_seen_ms != now {
        e.last_seen_ms = now;
    }
    if closing && e.flags & FLOW_FLAG_CLOSING == 0 {
        e.flags |= FLOW_FLAG_CLOSING;
    }
    nat_cache::cache_rev(flow, e);
    F::rewrite(
        ctx,
        l3,
        l4,
        flow.proto() as u8,
        &e.vip_addr,
        e.vip_port,
        &e.client_addr,
        e.client_port,
    )
    .ok_or(Reason::DropMalformed)?;
    // SAFETY: bounds checked by ptr_at.
    unsafe { write_macs(eth as *mut u8, e.client_mac, e.lb_mac) };
    count_return(e.vip_index, bytes);
    back_to_client(ctx, e.ifindex)
}

/// Moves VIP `vip_index`'s return-path counters.
#[inline(always)]
pub(crate) fn count_return(vip_index: u32, bytes: u64) {
    if let Some(s) = VIP_STATS.get_ptr_mut(vip_index) {
        // SAFETY: per-CPU slot.
        unsafe {
            (*s).return_packets += 1;
            (*s).return_bytes += bytes;
        }
    }
}

/// Out through `ifindex`, the interface the client's packets came in on:
/// `XDP_TX` when it is this one, else a redirect.
#[inline(always)]
pub(crate) fn back_to_client(ctx: &XdpContext, ifindex: u32) -> Result<u32, Reason> {
    if ifindex == ctx.ingress_ifindex() as u32 {
        Ok(XDP_TX)
    } else {
        TX_PORTS
            .redirect(ifindex, 0)
            .map_err(|_| Reason::DropNoTxPort)
    }
}

const _: () = {
    assert!(core::mem::size_of::<FlowKey6>() <= core::mem::size_of::<[u64; 5]>());
    assert!(core::mem::size_of::<FlowKey>() <= core::mem::size_of::<[u64; 5]>());
};
