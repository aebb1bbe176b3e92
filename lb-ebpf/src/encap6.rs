//! Header pushes with an outer IPv6 header (6in6, 4in6, GUE over IPv6) and
//! the ICMPv6 "packet too big" answer. As in [`crate::encap`], every
//! packet pointer taken before a push is invalid afterwards: callers read
//! what they need first and pass it by value.

use aya_ebpf::{
    helpers::generated::{bpf_csum_diff, bpf_xdp_adjust_tail},
    programs::XdpContext,
};
use lb_common::{GUE6_OVERHEAD, IPPROTO_ICMPV6, IPPROTO_UDP, IPV6_MIN_MTU};

use crate::{
    encap::{PushError, fold, halves, push_l2, put_bytes, put16, write_gue_udp},
    parse::{ETH_P_IPV6, IPV6_HDR_LEN, ptr_at, read_macs},
};

/// The outer header's hop limit, and the ICMPv6 answer's.
const HOP_LIMIT: u8 = 64;
/// The bytes [`push_l2`] checks for the IPv6 pushes: the largest L2 header
/// and the largest push (GUE over IPv6, and the ICMPv6 answer's 40 + 8).
const V6_PUSH_WINDOW: usize = 18 + GUE6_OVERHEAD as usize;
/// ICMPv6 "packet too big".
pub const ICMPV6_PACKET_TOO_BIG: u8 = 2;
const ICMPV6_HDR_LEN: usize = 8;
/// The bytes of the original packet an ICMPv6 "packet too big" quotes: as
/// many as fit in IPv6's minimum MTU (RFC 4443 2.4(c)) with the IPv6 and
/// ICMPv6 headers. lb answers only packets longer than 1280 bytes (see
/// [`icmp6_packet_too_big`]), so every answer quotes exactly this many.
pub const PTB_QUOTE_LEN: usize = IPV6_MIN_MTU as usize - IPV6_HDR_LEN - ICMPV6_HDR_LEN;
/// [`PTB_QUOTE_LEN`] in the pieces `bpf_csum_diff` sums in one call (at
/// most 512 bytes, a multiple of 4).
const CSUM_CHUNK: usize = 512;
const _: () = assert!(PTB_QUOTE_LEN == 2 * CSUM_CHUNK + 208);

/// What the outer IPv6 header of one packet holds. The addresses and MACs
/// by reference (to the backend entry): copies of them would crowd the
/// 512-byte BPF stack of the inlined program.
pub struct Outer6<'a> {
    /// Next hop's MAC and the egress interface's (as for DSR at L2).
    pub dst_mac: &'a [u8; 6],
    pub src_mac: &'a [u8; 6],
    /// Addresses as on the wire.
    pub src: &'a [u32; 4],
    pub dst: &'a [u32; 4],
    /// The inner packet's TOS / traffic class, copied outside.
    pub tclass: u8,
    /// The outer flow label (20 bits), from the flow hash.
    pub flow_label: u32,
    /// The inner packet's length (IPv4 total length, or IPv6's 40 +
    /// payload length).
    pub inner_len: u16,
}

/// Writes a 40-byte IPv6 header at `p + off`. `src`/`dst` as on the wire.
///
/// # Safety
/// `p + off` points to 40 writable bytes of the packet (bounds checked),
/// at an even address.
#[inline(always)]
#[expect(clippy::too_many_arguments, reason = "one per header field")]
unsafe fn write_ipv6(
    p: *mut u8,
    off: usize,
    tclass: u8,
    flow_label: u32,
    payload_len: u16,
    next_header: u8,
    src: &[u32; 4],
    dst: &[u32; 4],
) {
    let w0 = 0x6000 | (tclass as u16) << 4 | (flow_label >> 16) as u16 & 0xF;
    // SAFETY: the caller guarantees 40 writable bytes at an even address.
    unsafe {
        put16(p, off, w0);
        put16(p, off + 2, flow_label as u16);
        put16(p, off + 4, payload_len);
        put16(p, off + 6, (next_header as u16) << 8 | HOP_LIMIT as u16);
        let mut i = 0;
        while i < 4 {
            put_bytes(p, off + 8 + 4 * i, src[i].to_ne_bytes());
            put_bytes(p, off + 24 + 4 * i, dst[i].to_ne_bytes());
            i += 1;
        }
    }
}

/// IP-in-IPv6: pushes an Ethernet header (EtherType IPv6, a VLAN tag
/// kept) and an outer IPv6 header (next header `next_header`: 41 for an
/// inner IPv6 packet, 4 for an inner IPv4 one; hop limit 64) in front of
/// the packet at `l3`.
#[inline(always)]
pub fn push_ipip6(
    ctx: &XdpContext,
    l3: usize,
    o: &Outer6<'_>,
    next_header: u8,
) -> Result<(), PushError> {
    let by = IPV6_HDR_LEN;
    let start = push_l2::<V6_PUSH_WINDOW>(ctx, by, l3, *o.dst_mac, *o.src_mac, ETH_P_IPV6)?;
    // SAFETY: push_l2 checked 66 bytes, l3 <= 18: l3 + 40 fits.
    unsafe {
        write_ipv6(
            start,
            l3,
            o.tclass,
            o.flow_label,
            o.inner_len,
            next_header,
            o.src,
            o.dst,
        );
    }
    Ok(())
}

/// GUE variant 1 over IPv6: pushes an Ethernet header, an outer IPv6
/// header (next header 17) and a UDP header (`src_port`, `dst_port` in
/// network order) in front of the packet at `l3`. The UDP checksum is
/// zero, as RFC 6935/6936 allow for tunnel protocols (see the README's
/// Forwarding modes: what the backends' decap accepts).
#[inline(always)]
pub fn push_gue6(
    ctx: &XdpContext,
    l3: usize,
    o: &Outer6<'_>,
    src_port: u16,
    dst_port: u16,
) -> Result<(), PushError> {
    let by = GUE6_OVERHEAD as usize;
    let start = push_l2::<V6_PUSH_WINDOW>(ctx, by, l3, *o.dst_mac, *o.src_mac, ETH_P_IPV6)?;
    let udp_len = o.inner_len + 8;
    // SAFETY: push_l2 checked 66 bytes, l3 <= 18: l3 + 48 fits.
    unsafe {
        write_ipv6(
            start,
            l3,
            o.tclass,
            o.flow_label,
            udp_len,
            IPPROTO_UDP,
            o.src,
            o.dst,
        );
        write_gue_udp(start, l3 + IPV6_HDR_LEN, src_port, dst_port, udp_len);
    }
    Ok(())
}

/// The one's-complement sum of an IPv6 address's eight 16-bit words
/// (`a` as on the wire).
///
/// # Safety
/// `a` points to 16 readable bytes of the packet (bounds checked).
#[inline(always)]
unsafe fn addr_sum(a: *const [u32; 4]) -> u32 {
    // SAFETY: guaranteed by the caller; unaligned loads are fine on the
    // architectures lb supports.
    let [w0, w1, w2, w3] = unsafe { a.read_unaligned() };
    halves(u32::from_be(w0))
        + halves(u32::from_be(w1))
        + halves(u32::from_be(w2))
        + halves(u32::from_be(w3))
}

/// Turns the frame into an ICMPv6 "packet too big" (type 2, code 0)
/// answer to its sender, carrying `mtu`: Ethernet MACs swapped (a VLAN tag
/// kept), an IPv6 header from the packet's destination to its source
/// (traffic class and flow label 0, hop limit 64), the ICMPv6 header, then
/// the first [`PTB_QUOTE_LEN`] bytes of the packet (left in place); the
/// rest is cut. The checksum covers the pseudo-header. The caller sends
/// it back out with `XDP_TX`.
///
/// The IPv6 packet at `l3` must be longer than 1280 bytes (an answer is
/// only due for a packet above the MTU it announces, never below 1280);
/// the frame is `frame_len` bytes long.
#[inline(always)]
pub fn icmp6_packet_too_big(
    ctx: &XdpContext,
    frame_len: usize,
    l3: usize,
    mtu: u32,
) -> Result<(), PushError> {
    // What the answer needs from the packet, read before the move (the
    // addresses are read after it, from the quoted header).
    let frame: *const [u8; 14] = ptr_at(ctx, 0).ok_or(PushError::Malformed)?;
    // SAFETY: 14 bytes checked by ptr_at.
    let (dst_mac, src_mac) = unsafe { read_macs(frame as *const u8) };

    let by = IPV6_HDR_LEN + ICMPV6_HDR_LEN;
    let start = push_l2::<V6_PUSH_WINDOW>(ctx, by, l3, src_mac, dst_mac, ETH_P_IPV6)?;
    let quote = l3 + by;
    // The quoted bytes, summed by the kernel in three pieces (the bounds
    // check of the whole quote first).
    let q: *mut [u8; PTB_QUOTE_LEN] = ptr_at(ctx, quote).ok_or(PushError::Malformed)?;
    let q = q as *mut u8;
    let mut seed = 0u32;
    let mut off = 0;
    while off < PTB_QUOTE_LEN {
        let len = if PTB_QUOTE_LEN - off < CSUM_CHUNK {
            PTB_QUOTE_LEN - off
        } else {
            CSUM_CHUNK
        };
        // SAFETY: `q + off .. q + off + len` lies within the quote, bounds
        // checked above; the helper only reads it.
        let s = unsafe {
            bpf_csum_diff(
                core::ptr::null_mut(),
                0,
                q.add(off) as *mut u32,
                len as u32,
                seed,
            )
        };
        if s < 0 {
            return Err(PushError::Malformed);
        }
        seed = s as u32;
        off += len;
    }
    // The helper sums native words: folded, it is the sum of the wire's
    // big-endian words in network byte order.
    let quoted = u16::from_be(!fold(seed)) as u32;
    let icmp_len = (ICMPV6_HDR_LEN + PTB_QUOTE_LEN) as u32;
    // The quoted IPv6 header's source (the client) and destination (the
    // VIP), at bytes 8 and 24.
    // SAFETY: within the quote, bounds checked above.
    let (client, vip) = unsafe { (q.add(8) as *const [u32; 4], q.add(24) as *const [u32; 4]) };
    // SAFETY: as above.
    let sum = unsafe { addr_sum(vip) + addr_sum(client) }
        + icmp_len
        + IPPROTO_ICMPV6 as u32
        + ((ICMPV6_PACKET_TOO_BIG as u32) << 8)
        + halves(mtu)
        + quoted;
    // SAFETY: push_l2 checked 66 bytes, l3 <= 18: l3 + 48 fits, before the
    // quote; the addresses are read from the quote before any write.
    unsafe {
        let (vip, client) = (vip.read_unaligned(), client.read_unaligned());
        write_ipv6(
            start,
            l3,
            0,
            0,
            icmp_len as u16,
            IPPROTO_ICMPV6,
            &vip,
            &client,
        );
        let icmp = l3 + IPV6_HDR_LEN;
        put16(start, icmp, (ICMPV6_PACKET_TOO_BIG as u16) << 8);
        put16(start, icmp + 2, fold(sum));
        put16(start, icmp + 4, (mtu >> 16) as u16);
        put16(start, icmp + 6, mtu as u16);
    }
    // (The length is not taken from the context again: the verifier
    // refuses arithmetic on the end-of-packet pointer.)
    let want = (quote + PTB_QUOTE_LEN) as i32;
    let have = (frame_len + by) as i32;
    // SAFETY: a helper call on the program's own context; the answer is
    // shorter than the packet (longer than 1280 bytes).
    if unsafe { bpf_xdp_adjust_tail(ctx.ctx, want - have) } != 0 {
        return Err(PushError::Malformed);
    }
    Ok(())
}
