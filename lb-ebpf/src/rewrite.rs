//! In-place address and port rewrites for full NAT, each returning the
//! checksum delta it caused (lb_common::csum), so that every checksum
//! covering the rewritten bytes is updated incrementally (RFC 1624): no
//! payload walk, whatever the packet's size.
//!
//! The frame is accessed as 16-bit words only: XDP data is 2-byte
//! aligned and every offset here is even, so each access is one aligned
//! load or store (an unaligned 32-bit store can compile to four byte
//! stores in BPF).

use aya_ebpf::programs::XdpContext;
use lb_common::{
    IPPROTO_UDP,
    csum::{apply, apply_udp, diff16, diff32},
};

/// [`crate::parse::ptr_at`] for offsets the verifier knows only as a
/// range (read back from a map, as the NAT subprogram's are): the
/// pointer is made opaque before its bounds check, so that the compiler
/// cannot fold the offset and the size into one constant the verifier
/// would see on another register than the one accessed.
#[inline(always)]
pub fn ptr_at<T>(ctx: &XdpContext, offset: usize) -> Option<*mut T> {
    let p = core::hint::black_box(ctx.data() + offset);
    if p + core::mem::size_of::<T>() > ctx.data_end() {
        return None;
    }
    Some(p as *mut T)
}

/// Offset of the TCP checksum in its header.
pub const TCP_CSUM_OFFSET: usize = 16;
/// Offset of the UDP checksum in its header.
pub const UDP_CSUM_OFFSET: usize = 6;

/// The checksum deltas of a rewrite.
#[derive(Clone, Copy)]
pub struct Delta {
    /// The change of the words a pseudo-header (or the next checksum
    /// down) sums: the addresses, or the ports.
    pub covered: u64,
    /// The change of every byte written, the rewritten checksum field
    /// included: what a checksum over the whole header (ICMP's over the
    /// packet it quotes) must add.
    pub all: u64,
}

/// Loads the 32-bit word at `p` as two 16-bit loads.
///
/// # Safety
/// `p` points to 4 readable bytes, 2-byte aligned.
#[inline(always)]
pub unsafe fn load32(p: *const u16) -> u32 {
    // SAFETY: as the caller promises.
    let (a, b) = unsafe { (*p, *p.add(1)) };
    let [a0, a1] = a.to_ne_bytes();
    let [b0, b1] = b.to_ne_bytes();
    u32::from_ne_bytes([a0, a1, b0, b1])
}

/// Stores the 32-bit word `v` at `p` as two 16-bit stores.
///
/// # Safety
/// `p` points to 4 writable bytes, 2-byte aligned.
#[inline(always)]
pub unsafe fn store32(p: *mut u16, v: u32) {
    let [a0, a1, b0, b1] = v.to_ne_bytes();
    // SAFETY: as the caller promises.
    unsafe {
        *p = u16::from_ne_bytes([a0, a1]);
        *p.add(1) = u16::from_ne_bytes([b0, b1]);
    }
}

/// Sets the IPv4 header at `l3`'s source and destination addresses (as on
/// the wire) and updates its header checksum. `covered`: the addresses'
/// change (for the TCP/UDP pseudo-header).
#[inline(always)]
pub fn set_addrs4(ctx: &XdpContext, l3: usize, src: u32, dst: u32) -> Option<Delta> {
    let ip: *mut [u16; 10] = ptr_at(ctx, l3)?;
    let ip = ip as *mut u16;
    // SAFETY: 20 bytes bounds checked; words 5 (checksum), 6–7 (source),
    // 8–9 (destination).
    unsafe {
        let old_src = load32(ip.add(6));
        let old_dst = load32(ip.add(8));
        let covered = diff32(diff32(0, old_src, src), old_dst, dst);
        let old_sum = *ip.add(5);
        let sum = apply(old_sum, covered);
        store32(ip.add(6), src);
        store32(ip.add(8), dst);
        *ip.add(5) = sum;
        Some(Delta {
            covered,
            all: diff16(covered, old_sum, sum),
        })
    }
}

/// Sets the IPv6 header at `l3`'s source and destination addresses (as
/// on the wire; IPv6 has no header checksum). `covered` and `all`: the
/// addresses' change.
#[inline(always)]
pub fn set_addrs6(ctx: &XdpContext, l3: usize, src: &[u32; 4], dst: &[u32; 4]) -> Option<Delta> {
    let ip: *mut [u16; 20] = ptr_at(ctx, l3)?;
    let ip = ip as *mut u16;
    let mut d = 0;
    // SAFETY: 40 bytes bounds checked; words 4–11 (source), 12–19
    // (destination).
    unsafe {
        for i in 0..4 {
            let p = ip.add(4 + 2 * i);
            d = diff32(d, load32(p), src[i]);
            store32(p, src[i]);
            let p = ip.add(12 + 2 * i);
            d = diff32(d, load32(p), dst[i]);
            store32(p, dst[i]);
        }
    }
    Some(Delta { covered: d, all: d })
}

/// Sets the TCP or UDP (`proto`) header at `l4`'s ports (network order)
/// and updates its checksum by `pseudo` (the pseudo-header's change) and
/// the ports' change; with `csum` false the checksum is left alone (not
/// in an ICMP error's quoted bytes). A UDP checksum of 0 ("none") stays
/// 0, and one that becomes 0 is written 0xFFFF. `covered`: the ports'
/// change; `all`: every byte written, the checksum field included.
#[inline(always)]
pub fn set_ports(
    ctx: &XdpContext,
    l4: usize,
    proto: u8,
    sport: u16,
    dport: u16,
    pseudo: u64,
    csum: bool,
) -> Option<Delta> {
    // One bounds check covering the ports and the checksum (two checks,
    // one implying the other, lose one to the compiler and the verifier
    // cannot follow).
    let (h, at) = if !csum {
        (ptr_at::<[u16; 2]>(ctx, l4)? as *mut u16, 0)
    } else if proto == IPPROTO_UDP {
        (
            ptr_at::<[u16; 4]>(ctx, l4)? as *mut u16,
            UDP_CSUM_OFFSET / 2,
        )
    } else {
        (
            ptr_at::<[u16; 9]>(ctx, l4)? as *mut u16,
            TCP_CSUM_OFFSET / 2,
        )
    };
    // SAFETY: bounds checked by ptr_at for the words used; l4 is even.
    unsafe {
        let (old_sport, old_dport) = (*h, *h.add(1));
        let covered = diff16(diff16(0, old_sport, sport), old_dport, dport);
        *h = sport;
        *h.add(1) = dport;
        let mut all = covered;
        if csum {
            let sum = h.add(at);
            let old = *sum;
            let new = if proto == IPPROTO_UDP {
                apply_udp(old, pseudo + covered)
            } else {
                apply(old, pseudo + covered)
            };
            *sum = new;
            all = diff16(all, old, new);
        }
        Some(Delta { covered, all })
    }
}
