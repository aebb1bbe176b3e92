//! Header pushes of the tunnel forwarding modes (IPv4-in-IPv4, GUE) and the
//! ICMP "fragmentation needed" answer for packets the outer header would
//! make too big. Each moves the frame's start with `bpf_xdp_adjust_head`,
//! so every packet pointer taken before is invalid afterwards: the callers
//! read what they need first and pass it by value.

use aya_ebpf::{
    helpers::generated::{bpf_xdp_adjust_head, bpf_xdp_adjust_tail},
    programs::XdpContext,
};
use lb_common::{GUE_OVERHEAD, IPIP_OVERHEAD, IPPROTO_ICMP, IPPROTO_IPIP, IPPROTO_UDP};

use crate::parse::{ETH_P_IP, ptr_at};

const IPV4_HDR_LEN: usize = 20;
const ICMP_HDR_LEN: usize = 8;
/// The outer header's TTL, and the ICMP answer's.
const TTL: u8 = 64;
/// IPv4 "don't fragment", in the flags/offset field (host order).
pub const IP_DF: u16 = 0x4000;
/// ICMP "destination unreachable", code "fragmentation needed and DF set".
const ICMP_DEST_UNREACH: u8 = 3;
const ICMP_FRAG_NEEDED: u8 = 4;
/// The embedded packet of the ICMP answer: its IP header (at most 60 bytes)
/// and the first 8 bytes of its payload (RFC 792), in 16-bit words.
const MAX_EMBEDDED_WORDS: usize = (60 + 8) / 2;

/// The bytes [`push_l2`] checks for the IPv4 pushes: the largest L2
/// header and the largest IPv4 push (GUE).
const V4_PUSH_WINDOW: usize = 18 + GUE_OVERHEAD as usize;

/// Why a header could not be pushed.
pub enum PushError {
    /// The driver left no room in front of the frame.
    NoHeadroom,
    /// The frame is not what the parser said (cannot happen for a frame
    /// the balancer parsed; kept for the verifier's bounds checks).
    Malformed,
}

/// What the outer header of one packet holds.
pub struct Outer {
    /// Next hop's MAC and the egress interface's (as for DSR at L2).
    pub dst_mac: [u8; 6],
    pub src_mac: [u8; 6],
    /// Addresses as on the wire.
    pub src: u32,
    pub dst: u32,
    /// The inner packet's TOS byte, copied outside.
    pub tos: u8,
    /// The inner packet's IPv4 total length.
    pub inner_len: u16,
}

/// A one's-complement sum folded to 16 bits and complemented: the
/// Internet checksum of the words summed into `sum`.
#[inline(always)]
pub(crate) fn fold(mut sum: u32) -> u16 {
    sum = (sum & 0xFFFF) + (sum >> 16);
    sum = (sum & 0xFFFF) + (sum >> 16);
    !(sum as u16)
}

/// The two 16-bit halves of a 32-bit word summed (one's-complement
/// addends); `w` in host order.
#[inline(always)]
pub(crate) fn halves(w: u32) -> u32 {
    (w >> 16) + (w & 0xFFFF)
}

/// Stores `v` (host order) big-endian at `p + off` as one 16-bit store.
/// The BPF backend splits an unaligned store into byte stores (and
/// shifts); XDP data is at least 2-byte aligned (as `parse::l4_ports`
/// relies on too) and every field lb writes sits at an even offset, so
/// aligned 16-bit stores halve the work.
///
/// # Safety
/// `p + off .. p + off + 2` is writable packet memory (bounds checked) and
/// `p + off` is even.
#[inline(always)]
pub(crate) unsafe fn put16(p: *mut u8, off: usize, v: u16) {
    // SAFETY: guaranteed by the caller.
    unsafe { (p.add(off) as *mut u16).write(v.to_be()) }
}

/// Stores the bytes `b` at `p + off` as 16-bit stores. Same contract as
/// [`put16`] for `N` bytes (`N` even).
#[inline(always)]
pub(crate) unsafe fn put_bytes<const N: usize>(p: *mut u8, off: usize, b: [u8; N]) {
    let mut i = 0;
    while i + 1 < N {
        // SAFETY: guaranteed by the caller.
        unsafe { (p.add(off + i) as *mut u16).write(u16::from_ne_bytes([b[i], b[i + 1]])) };
        i += 2;
    }
}

/// Writes GUE's UDP header at `p + off`: ports in network order, length
/// `udp_len`, checksum 0 (the inner packet carries its own).
///
/// # Safety
/// `p + off` points to 8 writable bytes of the packet (bounds checked),
/// at an even address.
#[inline(always)]
pub(crate) unsafe fn write_gue_udp(
    p: *mut u8,
    off: usize,
    src_port: u16,
    dst_port: u16,
    udp_len: u16,
) {
    // SAFETY: guaranteed by the caller.
    unsafe {
        put16(p, off, u16::from_be(src_port));
        put16(p, off + 2, u16::from_be(dst_port));
        put16(p, off + 4, udp_len);
        put16(p, off + 6, 0);
    }
}

/// Writes a 20-byte IPv4 header (no options, id 0) at `p + off`, its
/// checksum computed. `src`/`dst` as on the wire.
///
/// # Safety
/// `p + off` points to 20 writable bytes of the packet (bounds checked),
/// at an even address.
#[inline(always)]
#[expect(clippy::too_many_arguments, reason = "one per header field")]
unsafe fn write_ipv4(
    p: *mut u8,
    off: usize,
    tos: u8,
    tot_len: u16,
    frags: u16,
    proto: u8,
    src: u32,
    dst: u32,
) {
    let w0 = 0x4500 | tos as u16;
    let w4 = (TTL as u16) << 8 | proto as u16;
    let check = fold(
        w0 as u32
            + tot_len as u32
            + frags as u32
            + w4 as u32
            + halves(u32::from_be(src))
            + halves(u32::from_be(dst)),
    );
    // SAFETY: the caller guarantees 20 writable bytes at an even address.
    unsafe {
        put16(p, off, w0);
        put16(p, off + 2, tot_len);
        put16(p, off + 4, 0);
        put16(p, off + 6, frags);
        put16(p, off + 8, w4);
        put16(p, off + 10, check);
        put_bytes(p, off + 12, src.to_ne_bytes());
        put_bytes(p, off + 16, dst.to_ne_bytes());
    }
}

/// Moves the frame's start `by` bytes earlier and writes the Ethernet
/// header (and the VLAN tag, when `l3` says there is one) at the new
/// start: `dst`, `src`, the tag copied from the old header, `ether_type`.
/// Returns the new frame's start, `W` bytes checked (`W` = 18 + the
/// largest `by` of the callers: 46 for the IPv4 pushes, so that they ask
/// no more of short frames than before).
#[inline(always)]
pub(crate) fn push_l2<const W: usize>(
    ctx: &XdpContext,
    by: usize,
    l3: usize,
    dst: [u8; 6],
    src: [u8; 6],
    ether_type: u16,
) -> Result<*mut u8, PushError> {
    // SAFETY: a helper call on the program's own context.
    if unsafe { bpf_xdp_adjust_head(ctx.ctx, -(by as i32)) } != 0 {
        return Err(PushError::NoHeadroom);
    }
    // The old Ethernet header now starts at `by`; only the tag (if any) is
    // copied from it, the rest is rewritten. Every write of the callers
    // falls within the first W bytes (l3 <= 18, by <= W - 18), which hold
    // the old L2 header and the start of the packet.
    if l3 > 18 || by + 18 > W {
        return Err(PushError::Malformed);
    }
    let start: *mut [u8; W] = ptr_at(ctx, 0).ok_or(PushError::Malformed)?;
    let start = start as *mut u8;
    // SAFETY: W bytes checked above, l3 <= 18 and by + 18 <= W; the frame
    // starts at an even address and `by` is even.
    unsafe {
        if l3 > 14 {
            let tag = start.add(by + 12) as *const [u16; 2];
            (start.add(12) as *mut [u16; 2]).write(tag.read());
        }
        put16(start, l3 - 2, ether_type);
        put_bytes(start, 0, dst);
        put_bytes(start, 6, src);
    }
    Ok(start)
}

/// IPv4-in-IPv4: pushes an Ethernet header and an outer IPv4 header
/// (protocol 4, DF, TTL 64, id 0) in front of the IPv4 packet at `l3`.
#[inline(always)]
pub fn push_ipip(ctx: &XdpContext, l3: usize, o: &Outer) -> Result<(), PushError> {
    let by = IPIP_OVERHEAD as usize;
    let start = push_l2::<V4_PUSH_WINDOW>(ctx, by, l3, o.dst_mac, o.src_mac, ETH_P_IP)?;
    // SAFETY: push_l2 checked 46 bytes, l3 <= 18: l3 + 20 fits.
    unsafe {
        write_ipv4(
            start,
            l3,
            o.tos,
            o.inner_len + by as u16,
            IP_DF,
            IPPROTO_IPIP,
            o.src,
            o.dst,
        );
    }
    Ok(())
}

/// GUE variant 1: pushes an Ethernet header, an outer IPv4 header
/// (protocol 17, DF, TTL 64, id 0) and a UDP header (`src_port` and
/// `dst_port` in network order, checksum 0) in front of the IPv4 packet at
/// `l3`, which follows the UDP header directly.
#[inline(always)]
pub fn push_gue(
    ctx: &XdpContext,
    l3: usize,
    o: &Outer,
    src_port: u16,
    dst_port: u16,
) -> Result<(), PushError> {
    let by = GUE_OVERHEAD as usize;
    let start = push_l2::<V4_PUSH_WINDOW>(ctx, by, l3, o.dst_mac, o.src_mac, ETH_P_IP)?;
    let udp_len = o.inner_len + 8;
    // SAFETY: push_l2 checked 46 bytes, l3 <= 18: l3 + 28 fits.
    unsafe {
        write_ipv4(
            start,
            l3,
            o.tos,
            udp_len + IPV4_HDR_LEN as u16,
            IP_DF,
            IPPROTO_UDP,
            o.src,
            o.dst,
        );
        write_gue_udp(start, l3 + IPV4_HDR_LEN, src_port, dst_port, udp_len);
    }
    Ok(())
}

/// Turns the frame into an ICMP "fragmentation needed" (type 3, code 4)
/// answer to its sender, carrying `mtu`: Ethernet MACs swapped (a VLAN tag
/// kept), an IPv4 header from the packet's destination to its source (TTL
/// 64), the ICMP header, then the packet's own IP header (`ihl` bytes, left
/// in place) and the first 8 bytes of its payload; the rest is cut. The
/// caller sends it back out with `XDP_TX`. The packet at `l3` holds at
/// least `ihl + 8` bytes; the frame is `frame_len` bytes long.
#[inline(always)]
pub fn icmp_frag_needed(
    ctx: &XdpContext,
    frame_len: usize,
    l3: usize,
    ihl: usize,
    mtu: u16,
) -> Result<(), PushError> {
    // What the answer needs from the packet, read before the move.
    let frame: *const [u8; 14] = ptr_at(ctx, 0).ok_or(PushError::Malformed)?;
    // SAFETY: 14 bytes checked by ptr_at.
    let (dst_mac, src_mac) = unsafe { crate::parse::read_macs(frame as *const u8) };
    let addrs: *const [[u8; 2]; 4] = ptr_at(ctx, l3 + 12).ok_or(PushError::Malformed)?;
    // SAFETY: bounds checked by ptr_at.
    let [[s0, s1], [s2, s3], [d0, d1], [d2, d3]] = unsafe { addrs.read() };
    let (src, dst) = (
        u32::from_ne_bytes([s0, s1, s2, s3]),
        u32::from_ne_bytes([d0, d1, d2, d3]),
    );

    let by = IPV4_HDR_LEN + ICMP_HDR_LEN;
    let start = push_l2::<V4_PUSH_WINDOW>(ctx, by, l3, src_mac, dst_mac, ETH_P_IP)?;
    let icmp_len = ICMP_HDR_LEN + ihl + 8;
    // The ICMP header and the embedded bytes, summed.
    let mut sum =
        halves((ICMP_DEST_UNREACH as u32) << 24 | (ICMP_FRAG_NEEDED as u32) << 16) + mtu as u32;
    let embedded = l3 + by;
    let words = (ihl + 8) / 2;
    for i in 0..MAX_EMBEDDED_WORDS {
        if i >= words {
            break;
        }
        let w: *const u16 = ptr_at(ctx, embedded + i * 2).ok_or(PushError::Malformed)?;
        // SAFETY: bounds checked by ptr_at; an even offset (see put16).
        sum += u16::from_be(unsafe { w.read() }) as u32;
    }
    // SAFETY: push_l2 checked 46 bytes, l3 <= 18: l3 + 28 fits.
    unsafe {
        write_ipv4(
            start,
            l3,
            0,
            (IPV4_HDR_LEN + icmp_len) as u16,
            0,
            IPPROTO_ICMP,
            dst,
            src,
        );
        let icmp = l3 + IPV4_HDR_LEN;
        put16(
            start,
            icmp,
            (ICMP_DEST_UNREACH as u16) << 8 | ICMP_FRAG_NEEDED as u16,
        );
        put16(start, icmp + 2, fold(sum));
        put16(start, icmp + 4, 0);
        put16(start, icmp + 6, mtu);
    }
    // (The length is not taken from the context again: the verifier
    // refuses arithmetic on the end-of-packet pointer.)
    let want = (l3 + IPV4_HDR_LEN + icmp_len) as i32;
    let have = (frame_len + by) as i32;
    // SAFETY: a helper call on the program's own context; the answer is
    // shorter than the packet (which exceeds 576 bytes).
    if unsafe { bpf_xdp_adjust_tail(ctx.ctx, want - have) } != 0 {
        return Err(PushError::Malformed);
    }
    Ok(())
}
