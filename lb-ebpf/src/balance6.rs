//! Module of the lb-ebpf binary (main.rs), not of the library: the IPv6
//! fast path. The same steps as IPv4 (VIP lookup, TCP SYN/FIN/RST
//! semantics, flow cache → CONNTRACK6 → ring, counters) through
//! [`crate::steer`]; forwarding at L2 (`dsr-l2`). Tunnel modes for IPv6
//! VIPs (6in6, GUE over IPv6) are a later slice: such a VIP's packets are
//! dropped as `drop_unsupported_forwarding`, never misdelivered.

use aya_ebpf::programs::XdpContext;
use lb_common::{
    FORWARD_DSR_L2, FlowKey6, IPPROTO_TCP, IPPROTO_UDP, MAX_IPV6_EXT_HEADERS, Reason, VipInfo,
    VipKey6, vip_table_probe6,
};
use lb_ebpf::parse::{
    Connection, Ethernet, IPV6_HDR_LEN, Ipv6Next, TCP_MIN_LEN, UDP_LEN, connection, ipv6,
    ipv6_upper, l4_ports, write_macs,
};

use crate::{MIN_LIMITED_L3_LEN, RUNTIME, VIP_TABLE_MASK, VIPS6, steer};

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
    let marker = VipKey6 {
        addr: dst,
        port: 0,
        proto: 0,
        _pad: 0,
    };
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
        // ICMPv6 (ND, echo, errors), ESP, AH, …: not a VIP flow.
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
    let vip = find_vip6(&VipKey6 {
        addr: dst,
        port: dst_port,
        proto,
        _pad: 0,
    })
    .ok_or(Reason::PassNotVip)?;

    // TCP flags: as for IPv4 (see main.rs).
    let Connection {
        new_connection,
        closing,
    } = connection(ctx, proto, l4).ok_or(Reason::DropMalformed)?;

    // Size limit, as for IPv4 at L2 (no outer header): a packet longer
    // than the egress MTU (a GRO aggregate in generic mode) is dropped.
    if tot_len > MIN_LIMITED_L3_LEN
        && let Some(rt) = RUNTIME.get(0)
        && rt.max_l3_len != 0
        && tot_len as u32 > rt.max_l3_len
    {
        return Err(Reason::DropTooBig);
    }
    if vip.forwarding != FORWARD_DSR_L2 {
        return Err(Reason::DropUnsupportedForwarding);
    }

    let flow = FlowKey6 {
        src_addr: src,
        dst_addr: dst,
        src_port,
        dst_port,
        proto: proto as u32,
    };
    let backend = steer(&flow, &vip, new_connection, closing, frame_len as u64)?;

    // SAFETY: the 14-byte Ethernet header was bounds checked by ethernet().
    unsafe { write_macs(eth.hdr as *mut u8, backend.dst_mac, backend.src_mac) };
    crate::send(ctx, backend)
}
