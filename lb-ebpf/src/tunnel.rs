//! Tunnel headers as the backends' decapsulation program (`lb_decap`)
//! reads them: IP-in-IP (IPv4 or IPv6 outer, protocol 4 or 41) and GUE
//! variant 1 (the inner IP header directly after the outer UDP header, as
//! Katran and lb's balancer send it). Map-free: the program checks the
//! outer source against its allow-list between [`outer`] and [`inner`].

use aya_ebpf::programs::XdpContext;
use lb_common::{
    IPPROTO_UDP,
    decap::{DecapReason, IPPROTO_IPIP, IPPROTO_IPV6},
};
use network_types::ip::{Ipv4Hdr, Ipv6Hdr};

use crate::parse::{
    ETH_P_IP, ETH_P_IPV6, Ethernet, IP_MF_OR_OFFSET, UDP_LEN, ipv4, ipv4_header_len, ptr_at,
};

/// How the inner packet is carried.
#[derive(Clone, Copy, PartialEq, Eq)]
pub enum TunnelKind {
    Ipip,
    Gue,
}

/// The outer source address as loaded from the wire (network byte order
/// in memory): word loads, compared against the allow-list's words.
#[derive(Clone, Copy)]
pub enum OuterSource {
    V4(u32),
    V6([u64; 2]),
}

/// A frame that is a tunnel packet by its outer header (IP protocol, or
/// UDP destination port); not yet checked further.
#[derive(Clone, Copy)]
pub struct Outer {
    pub kind: TunnelKind,
    pub source: OuterSource,
    /// Offset of the inner IP header.
    pub inner: usize,
    /// Bytes the outer headers say the inner packet has.
    pub room: usize,
    /// The inner IP version the outer protocol announces; 0 for GUE, where
    /// the inner header's version nibble decides.
    pub version: u8,
    /// Why the outer headers are unusable, if they are: checked only after
    /// the allow-list, so that a foreign source is always counted as such.
    pub problem: Option<DecapReason>,
}

/// IPv6 next-header values that are extension headers (not parsed here).
#[inline(always)]
fn is_ipv6_ext_header(nh: u8) -> bool {
    matches!(nh, 0 | 43 | 44 | 51 | 60 | 135 | 139 | 140)
}

/// The UDP destination port at `l4` is `gue_port` (network order, non-zero).
#[inline(always)]
fn is_gue(ctx: &XdpContext, l4: usize, gue_port: u16) -> bool {
    if gue_port == 0 {
        return false;
    }
    match ptr_at::<[u16; 2]>(ctx, l4) {
        // SAFETY: bounds checked by ptr_at; L4 offsets are even.
        Some(p) => (unsafe { (*p)[1] }) == gue_port,
        None => false,
    }
}

/// The UDP length field at `l4` as the inner room (UDP length − 8), if it
/// is consistent with `ip_room` (the bytes the IP header says follow it).
#[inline(always)]
fn gue_room(ctx: &XdpContext, l4: usize, ip_room: usize) -> Option<usize> {
    let udp: *const [u8; UDP_LEN] = ptr_at(ctx, l4)?;
    // SAFETY: bounds checked by ptr_at.
    let udp = unsafe { *udp };
    let len = u16::from_be_bytes([udp[4], udp[5]]) as usize;
    if len < UDP_LEN || len > ip_room {
        return None;
    }
    Some(len - UDP_LEN)
}

/// Recognises a tunnel packet by its outer header. `Err` is the reason to
/// pass the frame untouched: it is not a tunnel packet this program takes.
#[inline(always)]
pub fn outer(ctx: &XdpContext, eth: &Ethernet, gue_port: u16) -> Result<Outer, DecapReason> {
    let l3 = eth.l3;
    let frame_len = ctx.data_end() - ctx.data();
    match eth.ether_type {
        ETH_P_IP => {
            let ip = ipv4(ctx, l3).ok_or(DecapReason::PassNotTunnel)?;
            if ip.vihl >> 4 != 4 {
                return Err(DecapReason::PassNotTunnel);
            }
            let ihl = ipv4_header_len(ip);
            let tot_len = u16::from_be_bytes(ip.tot_len) as usize;
            // SAFETY: within the 20 bytes ipv4() checked; unaligned loads
            // of packet data are allowed.
            let source = OuterSource::V4(unsafe {
                (core::ptr::addr_of!(ip.src_addr) as *const u32).read_unaligned()
            });
            let (kind, version, l4_len) = match ip.proto {
                IPPROTO_IPIP => (TunnelKind::Ipip, 4, 0),
                IPPROTO_IPV6 => (TunnelKind::Ipip, 6, 0),
                IPPROTO_UDP if ihl >= Ipv4Hdr::LEN && is_gue(ctx, l3 + ihl, gue_port) => {
                    (TunnelKind::Gue, 0, UDP_LEN)
                }
                _ => return Err(DecapReason::PassNotTunnel),
            };
            let mut problem = None;
            let mut room = 0;
            if ihl < Ipv4Hdr::LEN || tot_len < ihl + l4_len || l3 + tot_len > frame_len {
                problem = Some(DecapReason::DropMalformed);
            } else if u16::from_be_bytes(ip.frags) & IP_MF_OR_OFFSET != 0 {
                problem = Some(DecapReason::DropFragment);
            } else if kind == TunnelKind::Gue {
                match gue_room(ctx, l3 + ihl, tot_len - ihl) {
                    Some(r) => room = r,
                    None => problem = Some(DecapReason::DropMalformed),
                }
            } else {
                room = tot_len - ihl;
            }
            Ok(Outer {
                kind,
                source,
                inner: l3 + ihl + l4_len,
                room,
                version,
                problem,
            })
        }
        ETH_P_IPV6 => {
            let ip: *const Ipv6Hdr = ptr_at(ctx, l3).ok_or(DecapReason::PassNotTunnel)?;
            // SAFETY: bounds checked by ptr_at; a byte-aligned plain struct.
            let ip = unsafe { &*ip };
            if ip.vcf[0] >> 4 != 6 {
                return Err(DecapReason::PassNotTunnel);
            }
            let payload_len = u16::from_be_bytes(ip.payload_len) as usize;
            let l4 = l3 + Ipv6Hdr::LEN;
            let src = core::ptr::addr_of!(ip.src_addr) as *const u64;
            // SAFETY: within the 40 bytes ptr_at checked.
            let source =
                OuterSource::V6(unsafe { [src.read_unaligned(), src.add(1).read_unaligned()] });
            let (kind, version, l4_len) = match ip.next_hdr {
                IPPROTO_IPIP => (TunnelKind::Ipip, 4, 0),
                IPPROTO_IPV6 => (TunnelKind::Ipip, 6, 0),
                IPPROTO_UDP if is_gue(ctx, l4, gue_port) => (TunnelKind::Gue, 0, UDP_LEN),
                nh if is_ipv6_ext_header(nh) => return Err(DecapReason::PassIpv6ExtHeaders),
                _ => return Err(DecapReason::PassNotTunnel),
            };
            let mut problem = None;
            let mut room = 0;
            if payload_len < l4_len || l4 + payload_len > frame_len {
                problem = Some(DecapReason::DropMalformed);
            } else if kind == TunnelKind::Gue {
                match gue_room(ctx, l4, payload_len) {
                    Some(r) => room = r,
                    None => problem = Some(DecapReason::DropMalformed),
                }
            } else {
                room = payload_len;
            }
            Ok(Outer {
                kind,
                source,
                inner: l4 + l4_len,
                room,
                version,
                problem,
            })
        }
        _ => Err(DecapReason::PassNotTunnel),
    }
}

/// Checks the inner IP header of `outer` (complete, the announced
/// version, its length within the room the outer headers give) and
/// returns its EtherType; `Err(DropMalformed)` otherwise.
#[inline(always)]
pub fn inner(ctx: &XdpContext, outer: &Outer) -> Result<u16, DecapReason> {
    // Every inner header is at least an IPv4 header long: one 20-byte
    // check covers the version nibble (a 1-byte check compiles to a
    // comparison the verifier cannot follow).
    let ip = ipv4(ctx, outer.inner).ok_or(DecapReason::DropMalformed)?;
    let version = ip.vihl >> 4;
    if outer.version != 0 && version != outer.version {
        return Err(DecapReason::DropMalformed);
    }
    match version {
        4 => {
            let ihl = ipv4_header_len(ip);
            let tot_len = u16::from_be_bytes(ip.tot_len) as usize;
            if ihl < Ipv4Hdr::LEN || tot_len < ihl || tot_len > outer.room {
                return Err(DecapReason::DropMalformed);
            }
            Ok(ETH_P_IP)
        }
        6 => {
            let ip: *const Ipv6Hdr = ptr_at(ctx, outer.inner).ok_or(DecapReason::DropMalformed)?;
            // SAFETY: bounds checked by ptr_at; a byte-aligned plain struct.
            let payload_len = u16::from_be_bytes(unsafe { (*ip).payload_len }) as usize;
            if Ipv6Hdr::LEN + payload_len > outer.room {
                return Err(DecapReason::DropMalformed);
            }
            Ok(ETH_P_IPV6)
        }
        _ => Err(DecapReason::DropMalformed),
    }
}

/// What [`fast_v4`] found: a complete, consistent tunnel packet in an
/// untagged frame with an option-less outer IPv4 header.
#[derive(Clone, Copy)]
pub struct Fast {
    pub kind: TunnelKind,
    /// The outer source, as loaded (network order in memory).
    pub source: u32,
    /// Offset of the inner IP header (34, or 42 for GUE).
    pub inner: usize,
    /// The inner packet's EtherType, host order.
    pub ether_type: u16,
}

/// Bytes [`fast_v4`] checks at once: Ethernet, IPv4 without options, UDP
/// and an inner IPv4 header (the shortest inner header), so that an IPIP
/// or GUE packet needs one bounds check. Shorter frames take the general
/// path.
pub const FAST_LEN: usize = 14 + 20 + UDP_LEN + 20;

/// A word of the packet at `p`.
///
/// # Safety
/// `p .. p + size_of::<T>()` was bounds checked. Packet loads need no
/// alignment in BPF; `read_unaligned` would compile to byte loads.
#[inline(always)]
unsafe fn load<T: Copy>(p: usize) -> T {
    // SAFETY: see above.
    unsafe { (p as *const T).read() }
}

/// The common case in few instructions: an untagged frame, outer IPv4
/// without options, not a fragment, IPIP (4in4, 6in4) or GUE to
/// `gue_port` (network order), every length consistent and the inner
/// header checked as [`inner`] checks it. Loads whole words and checks
/// bounds once for [`FAST_LEN`] bytes (6in4 once more for the 40-byte
/// inner header). `None` for anything else: the general path ([`outer`],
/// the allow-list, [`inner`]) then decides, so a frame taken here is one
/// the general path would strip the same way.
#[inline(always)]
pub fn fast_v4(ctx: &XdpContext, gue_port: u16) -> Option<Fast> {
    let data = ctx.data();
    let end = ctx.data_end();
    if data + FAST_LEN > end {
        return None;
    }
    // SAFETY: every load is within the FAST_LEN bytes checked above.
    // The EtherType; version 4, IHL 5, TOS and the total length;
    // identification, flags and fragment offset; TTL, protocol,
    // checksum; the source address.
    let (ether_type, w0, w1, w2, source) = unsafe {
        (
            load::<u16>(data + 12),
            load::<u32>(data + 14),
            load::<u32>(data + 18),
            load::<u32>(data + 22),
            load::<u32>(data + 26),
        )
    };
    if ether_type != ETH_P_IP.to_be() || w0 & 0xff != 0x45 {
        return None;
    }
    let tot_len = u16::from_be((w0 >> 16) as u16) as usize;
    let frame_len = end - data;
    // MF or an offset: a fragment.
    if (w1 >> 16) as u16 & IP_MF_OR_OFFSET.to_be() != 0 || 14 + tot_len > frame_len {
        return None;
    }
    let (kind, inner, room, version) = match (w2 >> 8) as u8 {
        IPPROTO_IPIP => (TunnelKind::Ipip, 34, tot_len.checked_sub(20)?, 4),
        IPPROTO_IPV6 => (TunnelKind::Ipip, 34, tot_len.checked_sub(20)?, 6),
        IPPROTO_UDP => {
            // SAFETY: within FAST_LEN. Both ports, then the UDP length.
            let (ports, udp_len) = unsafe { (load::<u32>(data + 34), load::<u16>(data + 38)) };
            let udp_len = u16::from_be(udp_len) as usize;
            if gue_port == 0
                || (ports >> 16) as u16 != gue_port
                || udp_len < UDP_LEN
                || udp_len + 20 > tot_len
            {
                return None;
            }
            (TunnelKind::Gue, 42, udp_len - UDP_LEN, 0)
        }
        _ => return None,
    };
    // SAFETY: inner + 4 <= FAST_LEN.
    let first: u32 = unsafe { load(data + inner) };
    let vihl = first as u8;
    if version != 0 && vihl >> 4 != version {
        return None;
    }
    let ether_type = match vihl >> 4 {
        4 => {
            let ihl = ((vihl & 0x0f) as usize) * 4;
            let len = u16::from_be((first >> 16) as u16) as usize;
            if ihl < Ipv4Hdr::LEN || len < ihl || len > room {
                return None;
            }
            ETH_P_IP
        }
        6 => {
            if data + inner + Ipv6Hdr::LEN > end {
                return None;
            }
            // SAFETY: bounds checked just above.
            let payload_len = u16::from_be(unsafe { load::<u16>(data + inner + 4) }) as usize;
            if Ipv6Hdr::LEN + payload_len > room {
                return None;
            }
            ETH_P_IPV6
        }
        _ => return None,
    };
    Some(Fast {
        kind,
        source,
        inner,
        ether_type,
    })
}
