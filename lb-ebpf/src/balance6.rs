//! Module of the lb-ebpf binary (main.rs), not of the library: the IPv6
//! fast path. The same steps as IPv4 (VIP lookup, TCP SYN/FIN/RST
//! semantics, flow cache → CONNTRACK6 → ring, counters) through
//! [`crate::steer`]; forwarding at L2 (`dsr-l2`) or in an outer IPv6
//! header (6in6, GUE over IPv6; the outer push is shared with IPv4 VIPs'
//! IPv6 backends, 4in6). ICMPv6 to a VIP address: echo requests answered,
//! "packet too big" about a VIP's flow steered to its backend; a packet
//! the outer header makes too big is answered with "packet too big".

use aya_ebpf::{bindings::xdp_action::XDP_TX, programs::XdpContext};
use lb_common::{
    Backend, FORWARD_GUE, FORWARD_IPIP, FORWARD_NAT, FlowKey6, IPPROTO_ICMPV6, IPPROTO_TCP,
    IPPROTO_UDP, IPV6_MIN_MTU, MAX_IPV6_EXT_HEADERS, Reason, VipInfo, VipKey6, decap::IPPROTO_IPV6,
    gue_source_port, ipv6_flow_label, vip_table_probe6,
};
use lb_ebpf::{
    encap6::{Outer6, icmp6_packet_too_big, push_gue6, push_ipip6},
    icmp6::{
        ICMPV6_DEST_UNREACH, ICMPV6_ECHO_REQUEST, ICMPV6_HDR_LEN, ICMPV6_PACKET_TOO_BIG,
        ICMPV6_TIME_EXCEEDED, echo_reply6, embedded6,
    },
    parse::{
        Connection, Ethernet, IPV6_HDR_LEN, Ipv6Next, TCP_MIN_LEN, UDP_LEN, connection, ipv6,
        ipv6_upper, l4_ports, ptr_at, write_macs,
    },
};

use crate::{
    MIN_LIMITED_L3_LEN, RUNTIME, VIP_TABLE_MASK, VIPS6, count_reason, nat, push_reason, steer,
};

/// Finds `key` in the IPv6 VIP table: a few inlined array loads.
#[inline(always)]
fn find_vip6(key: &VipKey6) -> Option<VipInfo> {
    // SAFETY: a read-only global set at load time.
    let mask = unsafe { core::ptr::read_volatile(&VIP_TABLE_MASK) };
    for at in vip_table_probe6(key, mask) {
        let slot = VIPS6.get(at)?;
        let a = slot.key.addr;
        if a[0] | a[1] | a[2] | a[3] == 0 {
            return None;
        }
        if a == key.addr && slot.key.tail() == key.tail() {
            return Some(slot.info);
        }
    }
    None
}

/// As main.rs's `unsteerable`: dropped when addressed to a VIP address,
/// passed otherwise.
#[inline(always)]
fn unsteerable6(dst: [u32; 4], drop: Reason, pass: Reason) -> Reason {
    let marker = VipKey6::from_wire(dst, 0, 0);
    if find_vip6(&marker).is_some() {
        drop
    } else {
        pass
    }
}

/// An IPv6 frame (L3 at `eth.l3`): steered if it is for an IPv6 VIP,
/// otherwise passed untouched (ND, ICMPv6 and all other traffic to the
/// host included).
#[inline(always)]
pub(crate) fn balance6(ctx: &XdpContext, eth: &Ethernet) -> Result<u32, Reason> {
    let l3 = eth.l3;
    let ip = ipv6(ctx, l3).ok_or(Reason::PassMalformed)?;
    if ip.vcf[0] >> 4 != 6 {
        return Err(Reason::PassMalformed);
    }
    let dst = ip.dst;
    let src = ip.src;
    let next_header = ip.next_header;
    let tclass = ip.vcf[0] << 4 | ip.vcf[1] >> 4;
    // The packet's length (the fixed header and the payload); a jumbogram
    // (payload length 0, a hop-by-hop option) never fits its L4 header in
    // it and counts as malformed.
    let tot_len = IPV6_HDR_LEN + u16::from_be_bytes(ip.payload_len) as usize;
    let frame_len = ctx.data_end() - ctx.data();
    if l3 + tot_len > frame_len {
        return Err(unsteerable6(
            dst,
            Reason::DropMalformed,
            Reason::PassMalformed,
        ));
    }
    let end = l3 + tot_len;
    let (proto, l4) = match ipv6_upper(ctx, l3, next_header, end, MAX_IPV6_EXT_HEADERS) {
        Ipv6Next::Upper { proto, l4 } => (proto, l4),
        Ipv6Next::Fragment => {
            return Err(unsteerable6(
                dst,
                Reason::DropFragment,
                Reason::PassFragment,
            ));
        }
        Ipv6Next::TooMany => {
            return Err(unsteerable6(
                dst,
                Reason::DropTooManyExtHeaders,
                Reason::PassTooManyExtHeaders,
            ));
        }
        Ipv6Next::Truncated => {
            return Err(unsteerable6(
                dst,
                Reason::DropMalformed,
                Reason::PassMalformed,
            ));
        }
    };
    let l4_min = match proto {
        IPPROTO_TCP => TCP_MIN_LEN,
        IPPROTO_UDP => UDP_LEN,
        IPPROTO_ICMPV6 => return icmp6_to(ctx, eth, l4, end, dst, tclass, tot_len),
        // ESP, AH, …: not a VIP flow.
        _ => return Err(Reason::PassNotVip),
    };
    if l4 + l4_min > end {
        return Err(unsteerable6(
            dst,
            Reason::DropMalformed,
            Reason::PassMalformed,
        ));
    }
    // In the frame (checked again for the verifier).
    let [src_port, dst_port] = l4_ports(ctx, l4).ok_or(Reason::DropMalformed)?;
    let Some(vip) = find_vip6(&VipKey6::from_wire(dst, dst_port, proto)) else {
        // Not a VIP: a NAT flow's reply if its port is in the NAT range.
        if !nat::in_nat_range(dst_port) {
            return Err(Reason::PassNotVip);
        }
        let closing = connection(ctx, proto, l4)
            .ok_or(Reason::DropMalformed)?
            .closing;
        let flags = nat::NAT_REPLY | if closing { nat::NAT_CLOSING } else { 0 };
        return nat::pend(nat::nat_pos(l3, l4, proto, flags | nat::NAT_V6), 0, 0);
    };

    // TCP flags: as for IPv4 (see main.rs).
    let Connection {
        new_connection,
        closing,
    } = connection(ctx, proto, l4).ok_or(Reason::DropMalformed)?;

    // Size limits, as for IPv4 (see main.rs) with IPv6's rules: a packet
    // longer than the limit (a GRO aggregate) is dropped; one that fits
    // it but not with the outer header is answered with ICMPv6 "packet
    // too big" (IPv6 has no DF: routers never fragment) carrying the
    // limit minus the outer header, never less than 1280 (RFC 8201): a
    // packet not above what the answer would announce cannot be sent
    // smaller and is dropped.
    let flow = FlowKey6 {
        src_addr: src,
        dst_addr: dst,
        src_port,
        dst_port,
        proto: proto as u32,
    };
    let overhead = vip.encap_overhead6() as usize;
    if tot_len + overhead > MIN_LIMITED_L3_LEN {
        // The outer payload length (and GUE's UDP length) is 16 bits.
        if tot_len + overhead - IPV6_HDR_LEN > u16::MAX as usize {
            return Err(Reason::DropTooBig);
        }
        if let Some(rt) = RUNTIME.get(0)
            && rt.max_l3_len != 0
            && (tot_len + overhead) as u32 > rt.max_l3_len
        {
            let limit = rt.max_l3_len as usize;
            let mtu = limit.saturating_sub(overhead).max(IPV6_MIN_MTU as usize);
            if tot_len > limit || tot_len <= mtu {
                return Err(Reason::DropTooBig);
            }
            // A source the VIP's ACL denies gets no answer either.
            crate::acl::check(&flow, vip.index, crate::acl::word(vip.index))?;
            icmp6_packet_too_big(ctx, frame_len, l3, mtu as u32).map_err(push_reason)?;
            count_reason(Reason::TxIcmpTooBig);
            return Ok(XDP_TX);
        }
    }

    // The ACL before the rate limits for what they count (a denied source
    // spends no token of the VIP's ceiling), and before the NAT path,
    // whose caches do not know the ACL; other packets are checked in
    // steer (a flow cache hit needs no lookup).
    if new_connection || vip.forwarding == FORWARD_NAT {
        crate::acl::check(&flow, vip.index, crate::acl::word(vip.index))?;
    }
    crate::policy(&flow, &vip, new_connection)?;
    if vip.forwarding == FORWARD_NAT {
        let flags = if new_connection {
            nat::NAT_NEW_CONNECTION
        } else {
            0
        } | if closing { nat::NAT_CLOSING } else { 0 };
        return nat::pend(
            nat::nat_pos(l3, l4, proto, flags | nat::NAT_V6),
            nat::nat_vip(&vip),
            vip.ring_size,
        );
    }
    let backend = steer(&flow, &vip, new_connection, closing, frame_len as u64)?;
    forward6(ctx, eth, &vip, backend, tclass, tot_len, &flow)
}

/// Sends the IPv6 packet at `eth.l3` (`tot_len` bytes, traffic class
/// `tclass`) of `flow` to `backend` in `vip`'s forwarding mode: next hop's
/// MACs (DSR at L2), or an outer IPv6 header pushed in front (6in6, GUE
/// over IPv6); then `XDP_TX` or a redirect. A tunnel VIP's IPv4 backend
/// (6in4) is not supported: dropped, never misdelivered.
#[inline(always)]
fn forward6(
    ctx: &XdpContext,
    eth: &Ethernet,
    vip: &VipInfo,
    backend: &Backend,
    tclass: u8,
    tot_len: usize,
    flow: &FlowKey6,
) -> Result<u32, Reason> {
    match vip.forwarding {
        FORWARD_IPIP | FORWARD_GUE if backend.is_v6() => {
            push_outer6(
                ctx,
                eth.l3,
                vip,
                backend,
                tclass,
                tot_len,
                flow.hash(),
                IPPROTO_IPV6,
            )?;
        }
        FORWARD_IPIP | FORWARD_GUE => return Err(Reason::DropUnsupportedForwarding),
        // SAFETY: the 14-byte Ethernet header was bounds checked by
        // ethernet().
        _ => unsafe { write_macs(eth.hdr as *mut u8, backend.dst_mac, backend.src_mac) },
    }
    crate::send(ctx, backend)
}

/// Pushes the outer IPv6 header of `vip`'s tunnel mode (ipip: next header
/// `inner_proto`, 41 for 6in6 or 4 for 4in6; gue: UDP to the VIP's GUE
/// port) to IPv6 `backend` in front of the packet at `l3` (`tot_len`
/// bytes, TOS / traffic class `tclass`); flow label and GUE source port
/// from the flow hash `hash`. Shared by IPv6 VIPs and IPv4 VIPs' IPv6
/// backends.
#[inline(always)]
#[expect(
    clippy::too_many_arguments,
    reason = "inlined; the values are in registers"
)]
pub(crate) fn push_outer6(
    ctx: &XdpContext,
    l3: usize,
    vip: &VipInfo,
    backend: &Backend,
    tclass: u8,
    tot_len: usize,
    hash: u32,
    inner_proto: u8,
) -> Result<(), Reason> {
    let outer = Outer6 {
        dst_mac: &backend.dst_mac,
        src_mac: &backend.src_mac,
        src: &backend.encap_src6,
        dst: &backend.addr6,
        tclass,
        flow_label: ipv6_flow_label(hash),
        inner_len: tot_len as u16,
    };
    if vip.forwarding == FORWARD_IPIP {
        push_ipip6(ctx, l3, &outer, inner_proto)
    } else {
        push_gue6(ctx, l3, &outer, gue_source_port(hash).to_be(), vip.gue_port)
    }
    .map_err(push_reason)
}

/// ICMPv6 at `l4` (the payload ends at `end`) to `dst`: an echo request to
/// a VIP address that answers echo is answered here, a "packet too big"
/// about a VIP's flow goes to the flow's backend; everything else (ND,
/// echo to other addresses, other errors) passes to the kernel untouched.
#[inline(always)]
fn icmp6_to(
    ctx: &XdpContext,
    eth: &Ethernet,
    l4: usize,
    end: usize,
    dst: [u32; 4],
    tclass: u8,
    tot_len: usize,
) -> Result<u32, Reason> {
    // The bounds check comes first: after the length check below, the
    // compiler would drop it as implied, and the verifier cannot follow.
    let icmp: *mut [u8; ICMPV6_HDR_LEN] = ptr_at(ctx, l4).ok_or(Reason::PassNotVip)?;
    if l4 + ICMPV6_HDR_LEN > end {
        return Err(Reason::PassNotVip);
    }
    // SAFETY: bounds checked by ptr_at.
    let [icmp_type, code, ..] = unsafe { *icmp };
    match (icmp_type, code) {
        // Answered only without extension headers (a routing header would
        // make the destination field another hop's address).
        (ICMPV6_ECHO_REQUEST, 0) if l4 == eth.l3 + IPV6_HDR_LEN => {
            match find_vip6(&VipKey6::from_wire(dst, 0, 0)) {
                Some(info) if info.answers_echo() => {
                    // SAFETY: `icmp` was bounds checked above.
                    unsafe { echo_reply6(ctx, eth.l3, icmp) }.ok_or(Reason::PassMalformed)?;
                    count_reason(Reason::TxIcmpEchoReply);
                    Ok(XDP_TX)
                }
                _ => Err(Reason::PassNotVip),
            }
        }
        (ICMPV6_PACKET_TOO_BIG, 0) | (ICMPV6_DEST_UNREACH, _) | (ICMPV6_TIME_EXCEEDED, _) => {
            let too_big = icmp_type == ICMPV6_PACKET_TOO_BIG;
            let action =
                icmp6_error_to_backend(ctx, eth, l4, end - l4, dst, tclass, tot_len, too_big)?;
            // A NAT translation counts itself when it is done.
            if action != nat::NAT_PENDING {
                count_reason(Reason::FwdIcmpError);
            }
            Ok(action)
        }
        _ => Err(Reason::PassNotVip),
    }
}

/// A "packet too big" to VIP address `dst` (from a router on the client's
/// side, about a packet a backend sent from the VIP): steered like the
/// flow it embeds, reversed (client → VIP), to the backend that owns it
/// (read only, see [`crate::steer::owner`]), in the VIP's forwarding mode;
/// the backend lowers its path MTU towards the client. Full NAT: as for
/// IPv4 (see main.rs's `icmp_error_to_backend`), for packet-too-big,
/// destination-unreachable and time-exceeded errors. Errors about
/// anything else pass to the kernel.
#[inline(always)]
#[expect(
    clippy::too_many_arguments,
    reason = "inlined; the values are in registers"
)]
fn icmp6_error_to_backend(
    ctx: &XdpContext,
    eth: &Ethernet,
    l4: usize,
    room: usize,
    dst: [u32; 4],
    tclass: u8,
    tot_len: usize,
    too_big: bool,
) -> Result<u32, Reason> {
    let e = embedded6(ctx, l4, room).ok_or(Reason::PassNotVip)?;
    if e.vip_addr != dst {
        return Err(Reason::PassNotVip);
    }
    let pos = |side| nat::quoted_pos(eth.l3, l4, e.l4, e.proto, l4 + room, side | nat::NAT_V6);
    let Some(vip) = find_vip6(&VipKey6::from_wire(e.vip_addr, e.vip_port, e.proto)) else {
        if nat::in_nat_range(e.vip_port) {
            return nat::pend(pos(nat::NAT_ICMP_BACKEND_SIDE), 0, 0);
        }
        return Err(Reason::PassNotVip);
    };
    if vip.forwarding == FORWARD_NAT {
        return nat::pend(pos(nat::NAT_ICMP_CLIENT_SIDE), 0, 0);
    }
    if !too_big {
        return Err(Reason::PassNotVip);
    }
    // The outer payload length (and GUE's UDP length) is 16 bits.
    if tot_len + GUE_UDP_LEN > u16::MAX as usize {
        return Err(Reason::DropTooBig);
    }
    let flow = FlowKey6 {
        src_addr: e.client_addr,
        dst_addr: e.vip_addr,
        src_port: e.client_port,
        dst_port: e.vip_port,
        proto: e.proto as u32,
    };
    let backend = crate::steer::owner(&flow, &vip)?;
    forward6(ctx, eth, &vip, backend, tclass, tot_len, &flow)
}

/// The UDP header GUE adds after the outer IPv6 header.
const GUE_UDP_LEN: usize = UDP_LEN;
