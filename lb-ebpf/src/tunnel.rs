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

/// The outer source address, as on the wire.
#[derive(Clone, Copy)]
pub enum OuterSource {
    V4([u8; 4]),
    V6([u8; 16]),
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
            let source = OuterSource::V4(ip.src_addr);
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
            let source = OuterSource::V6(ip.src_addr);
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
