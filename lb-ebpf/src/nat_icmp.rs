//! Module of the lb-ebpf binary: ICMP errors about full-NAT flows, so
//! that PMTU discovery (and the rest of ICMP's error reporting) works
//! through the NAT. Called by [`crate::nat`]'s subprogram for the errors
//! main.rs and balance6.rs picked (IPv4: destination unreachable,
//! fragmentation needed included, and time exceeded; IPv6: packet too
//! big, destination unreachable, time exceeded).
//!
//! - From the backend's side, to a SNAT address, quoting the packet lb
//!   sent (SNAT address:port → backend:port): the quoted packet becomes
//!   what the client sent (client:port → VIP:port), the error goes to the
//!   client, from the VIP when the backend itself sent it (the backend's
//!   address is never shown), from the router that sent it otherwise; out
//!   the client's way back.
//! - From the client's side, to the VIP, quoting what the client got
//!   (VIP:port → client:port): the quoted packet becomes what the backend
//!   sent (backend:port → SNAT address:port), the error goes from the
//!   SNAT address to the backend, on the backend's next hop.
//!
//! Checksums: the outer IPv4 header's, the quoted IPv4 header's, the
//! quoted TCP/UDP checksum when it is in the quoted bytes, and the ICMP
//! checksum over all of these changes (ICMPv6: with its pseudo-header's,
//! the outer addresses), each updated incrementally.

use aya_ebpf::programs::XdpContext;
use lb_common::{Reason, csum::apply};
use lb_ebpf::{
    parse::write_macs,
    rewrite::{ptr_at, set_ports},
};

use crate::{
    BACKENDS, count_reason,
    nat::{
        NAT_ICMP_BACKEND_SIDE, NAT_INNER_CSUM, NatFlow, NatScratch, Slot, back_to_client,
        load_flow, same_addr, scratch_key,
    },
    send,
};

/// The ICMP error at `icmp` (outer IP header at `l3`) described by `pos`
/// ([`crate::nat::nat_icmp_pos`]): translated and sent, or `Err` (no NAT
/// flow: passed untouched).
#[inline(always)]
pub(crate) fn icmp_error<F: NatFlow>(
    ctx: &XdpContext,
    scratch: *mut NatScratch,
    l3: usize,
    icmp: usize,
    pos: u64,
) -> Result<u32, Reason> {
    let proto = ((pos >> 32) & 0xFF) as u32;
    let inner_l4 = ((pos >> 48) & 0xFFF) as usize;
    let inner_l3 = icmp + 8;
    let csum = pos & NAT_INNER_CSUM != 0;
    // The quoted packet's flow, and the outer addresses.
    let q = load_flow::<F>(
        ctx,
        scratch_key(scratch, Slot::Flow),
        inner_l3,
        inner_l4,
        proto,
    )?;
    let outer = scratch_key::<F>(scratch, Slot::FKey);
    outer.load_addrs(ctx, l3).ok_or(Reason::DropMalformed)?;
    // The flow the quoted packet belongs to, seen from the other end:
    // the backend's reply, or the client's packet.
    let key = scratch_key::<F>(scratch, Slot::Key);
    key.set(&q.dst(), q.dport(), &q.src(), q.sport(), proto);
    let inner = Inner {
        l3: inner_l3,
        l4: inner_l4,
        proto: proto as u8,
        csum,
    };
    if pos & NAT_ICMP_BACKEND_SIDE != 0 {
        let e = key.rev().ok_or(Reason::PassNatNoFlow)?;
        // SAFETY: the map value stays valid for the program's run (RCU).
        let e = unsafe { &*e };
        // The backend's own error leaves from the VIP; a router's keeps
        // its address.
        let outer_src = if same_addr(&outer.src(), &q.dst()) {
            e.vip_addr
        } else {
            outer.src()
        };
        translate::<F>(
            ctx,
            l3,
            icmp,
            &inner,
            [&outer_src, &e.client_addr],
            [&e.client_addr, &e.vip_addr],
            [e.client_port, e.vip_port],
        )?;
        let eth: *mut [u8; 14] = ptr_at(ctx, 0).ok_or(Reason::DropMalformed)?;
        // SAFETY: bounds checked by ptr_at.
        unsafe { write_macs(eth as *mut u8, e.client_mac, e.lb_mac) };
        count_reason(Reason::FwdIcmpError);
        back_to_client(ctx, e.ifindex)
    } else {
        let e = key.fwd().ok_or(Reason::PassNotVip)?;
        // SAFETY: as above.
        let e = unsafe { &*e };
        let b = BACKENDS
            .get(e.backend_id)
            .filter(|b| b.is_usable())
            .ok_or(Reason::PassNotVip)?;
        translate::<F>(
            ctx,
            l3,
            icmp,
            &inner,
            [&e.snat_addr, &e.backend_addr],
            [&e.backend_addr, &e.snat_addr],
            [e.backend_port, e.snat_port],
        )?;
        let eth: *mut [u8; 14] = ptr_at(ctx, 0).ok_or(Reason::DropMalformed)?;
        // SAFETY: bounds checked by ptr_at.
        unsafe { write_macs(eth as *mut u8, b.dst_mac, b.src_mac) };
        count_reason(Reason::FwdIcmpError);
        send(ctx, b)
    }
}

/// Where the quoted packet's headers are.
struct Inner {
    l3: usize,
    l4: usize,
    proto: u8,
    /// Its TCP/UDP checksum is in the quoted bytes.
    csum: bool,
}

/// Rewrites the outer addresses to `outer` (source, destination), the
/// quoted packet's to `addrs` and its ports to `ports`, and updates every
/// checksum (see the module doc).
#[inline(always)]
fn translate<F: NatFlow>(
    ctx: &XdpContext,
    l3: usize,
    icmp: usize,
    inner: &Inner,
    outer: [&[u32; 4]; 2],
    addrs: [&[u32; 4]; 2],
    ports: [u16; 2],
) -> Result<(), Reason> {
    // Checked before anything is written.
    let sum: *mut [u16; 2] = ptr_at(ctx, icmp).ok_or(Reason::DropMalformed)?;
    let o = F::set_addrs(ctx, l3, outer[0], outer[1]).ok_or(Reason::DropMalformed)?;
    let i = F::set_addrs(ctx, inner.l3, addrs[0], addrs[1]).ok_or(Reason::DropMalformed)?;
    let p = set_ports(
        ctx,
        inner.l4,
        inner.proto,
        ports[0],
        ports[1],
        i.covered,
        inner.csum,
    )
    .ok_or(Reason::DropMalformed)?;
    // ICMP sums the quoted bytes; ICMPv6 also the pseudo-header (the
    // outer addresses).
    let mut d = i.all + p.all;
    if F::V6 {
        d += o.covered;
    }
    // SAFETY: bounds checked by ptr_at; word 1 is the checksum.
    unsafe {
        let s = (sum as *mut u16).add(1);
        *s = apply(*s, d);
    }
    Ok(())
}
