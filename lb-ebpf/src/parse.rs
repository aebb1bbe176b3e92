//! Frame access and header parsing: every packet access goes through
//! [`ptr_at`], which the verifier sees bounds-checked against `data_end`.

use core::mem::size_of;

use aya_ebpf::programs::XdpContext;
use network_types::{eth::EthHdr, ip::Ipv4Hdr};

pub const ETH_P_IP: u16 = 0x0800;
pub const ETH_P_IPV6: u16 = 0x86DD;
pub const ETH_P_8021Q: u16 = 0x8100;
pub const ETH_P_8021AD: u16 = 0x88A8;
pub const VLAN_HDR_LEN: usize = 4;
pub const TCP_MIN_LEN: usize = 20;
pub const UDP_LEN: usize = 8;
pub const TCP_FLAGS_OFFSET: usize = 13;
pub const TCP_FIN: u8 = 0x01;
pub const TCP_SYN: u8 = 0x02;
pub const TCP_RST: u8 = 0x04;
pub const TCP_ACK: u8 = 0x10;
/// More-fragments flag and fragment offset, in the 16-bit field as loaded
/// from the wire (host order after `from_be_bytes`).
pub const IP_MF_OR_OFFSET: u16 = 0x3FFF;

/// Bounds-checked pointer to a `T` at `offset` from the start of the frame.
#[inline(always)]
pub fn ptr_at<T>(ctx: &XdpContext, offset: usize) -> Option<*mut T> {
    let start = ctx.data();
    if start + offset + size_of::<T>() > ctx.data_end() {
        return None;
    }
    Some((start + offset) as *mut T)
}

/// The Ethernet header, read through one optional VLAN tag (802.1Q or
/// 802.1ad).
#[derive(Clone, Copy)]
pub struct Ethernet {
    /// Start of the frame, 14 bytes checked.
    pub hdr: *mut EthHdr,
    /// The EtherType after the tag, host order.
    pub ether_type: u16,
    /// Offset of the L3 header.
    pub l3: usize,
}

/// Parses the Ethernet header and one VLAN tag; `None` when the frame is
/// too short for them.
#[inline(always)]
pub fn ethernet(ctx: &XdpContext) -> Option<Ethernet> {
    let hdr: *mut EthHdr = ptr_at(ctx, 0)?;
    // SAFETY: `hdr` was bounds checked by ptr_at.
    let mut ether_type = u16::from_be(unsafe { (*hdr).ether_type });
    let mut l3 = EthHdr::LEN;
    if ether_type == ETH_P_8021Q || ether_type == ETH_P_8021AD {
        let inner: *const u16 = ptr_at(ctx, EthHdr::LEN + 2)?;
        // SAFETY: `inner` was bounds checked by ptr_at.
        ether_type = u16::from_be(unsafe { *inner });
        l3 += VLAN_HDR_LEN;
    }
    Some(Ethernet {
        hdr,
        ether_type,
        l3,
    })
}

/// The IPv4 header at `l3`, bounds checked for its fixed 20 bytes.
#[inline(always)]
pub fn ipv4(ctx: &XdpContext, l3: usize) -> Option<&Ipv4Hdr> {
    let ip: *const Ipv4Hdr = ptr_at(ctx, l3)?;
    // SAFETY: bounds checked by ptr_at; the frame outlives `ctx`'s borrow
    // and `Ipv4Hdr` is a byte-aligned plain struct.
    Some(unsafe { &*ip })
}

/// Header length from IHL, in bytes (not validated).
#[inline(always)]
pub fn ipv4_header_len(ip: &Ipv4Hdr) -> usize {
    ((ip.vihl & 0x0F) as usize) * 4
}

/// Source and destination ports (network order): the first four bytes of
/// TCP and UDP, at `l4`.
#[inline(always)]
pub fn l4_ports(ctx: &XdpContext, l4: usize) -> Option<[u16; 2]> {
    let ports: *const [u16; 2] = ptr_at(ctx, l4)?;
    // SAFETY: bounds checked by ptr_at; XDP data is at least 2-byte aligned
    // and the L4 offset is even (14 or 18 bytes of L2, IHL * 4 of L3).
    Some(unsafe { *ports })
}

/// Both MAC addresses of the Ethernet header at `frame` (destination,
/// source), read as 32- and 16-bit loads.
///
/// # Safety
/// `frame` points to at least 14 bytes of the packet (bounds checked).
#[inline(always)]
pub unsafe fn read_macs(frame: *const u8) -> ([u8; 6], [u8; 6]) {
    // SAFETY: the caller guarantees 14 readable bytes; unaligned loads are
    // fine on the architectures lb supports.
    unsafe {
        let [d0, d1, d2, d3] = (frame as *const u32).read_unaligned().to_ne_bytes();
        let [d4, d5] = (frame.add(4) as *const u16).read_unaligned().to_ne_bytes();
        let [s0, s1] = (frame.add(6) as *const u16).read_unaligned().to_ne_bytes();
        let [s2, s3, s4, s5] = (frame.add(8) as *const u32).read_unaligned().to_ne_bytes();
        ([d0, d1, d2, d3, d4, d5], [s0, s1, s2, s3, s4, s5])
    }
}

/// Writes both MAC addresses of the Ethernet header at `frame` as 32- and
/// 16-bit stores: a 6-byte array copy compiles to a byte-by-byte memmove
/// subprogram call in BPF.
///
/// # Safety
/// `frame` points to at least 14 writable bytes of the packet (bounds
/// checked).
#[inline(always)]
pub unsafe fn write_macs(frame: *mut u8, dst: [u8; 6], src: [u8; 6]) {
    let [d0, d1, d2, d3, d4, d5] = dst;
    let [s0, s1, s2, s3, s4, s5] = src;
    // SAFETY: the caller guarantees 14 writable bytes; XDP data is at least
    // 2-byte aligned, and unaligned stores are fine on the architectures lb
    // supports.
    unsafe {
        (frame as *mut u32).write_unaligned(u32::from_ne_bytes([d0, d1, d2, d3]));
        (frame.add(4) as *mut u16).write_unaligned(u16::from_ne_bytes([d4, d5]));
        (frame.add(6) as *mut u16).write_unaligned(u16::from_ne_bytes([s0, s1]));
        (frame.add(8) as *mut u32).write_unaligned(u32::from_ne_bytes([s2, s3, s4, s5]));
    }
}

/// The fixed IPv6 header's length.
pub const IPV6_HDR_LEN: usize = 40;
pub const IPV6_NEXT_HOP_BY_HOP: u8 = 0;
pub const IPV6_NEXT_ROUTING: u8 = 43;
pub const IPV6_NEXT_FRAGMENT: u8 = 44;
pub const IPV6_NEXT_DEST_OPTS: u8 = 60;

/// The fixed IPv6 header, as the fast path reads it: the addresses as four
/// native words of wire bytes each (as `lb_common::FlowKey6` holds them).
#[repr(C)]
#[derive(Clone, Copy)]
pub struct Ipv6Hdr {
    /// Version, traffic class, flow label.
    pub vcf: [u8; 4],
    /// Payload length, network order.
    pub payload_len: [u8; 2],
    pub next_header: u8,
    pub hop_limit: u8,
    pub src: [u32; 4],
    pub dst: [u32; 4],
}

/// The IPv6 header at `l3`, bounds checked for its fixed 40 bytes.
#[inline(always)]
pub fn ipv6(ctx: &XdpContext, l3: usize) -> Option<&Ipv6Hdr> {
    let ip: *const Ipv6Hdr = ptr_at(ctx, l3)?;
    // SAFETY: bounds checked by ptr_at; the frame outlives `ctx`'s borrow.
    // The words may be only 2-byte aligned: XDP data is, and BPF loads of
    // any alignment are fine on the architectures lb supports.
    Some(unsafe { &*ip })
}

/// Where an IPv6 packet's extension headers lead.
#[derive(Clone, Copy, PartialEq, Eq)]
pub enum Ipv6Next {
    /// The upper-layer header: its protocol and offset in the frame.
    Upper { proto: u8, l4: usize },
    /// A fragment header: the packet is a fragment (even at offset 0, its
    /// L4 header may be split), never steered by flow.
    Fragment,
    /// More than `MAX_IPV6_EXT_HEADERS` extension headers.
    TooMany,
    /// An extension header runs past the payload (or the frame).
    Truncated,
}

/// Walks the extension headers (hop-by-hop, routing, destination options)
/// after the fixed header at `l3`, at most `max` of them; `end` is the
/// payload's end (offset in the frame, checked against the frame by the
/// caller). A bounded loop: the verifier sees at most `max` rounds.
#[inline(always)]
pub fn ipv6_upper(ctx: &XdpContext, l3: usize, first: u8, end: usize, max: u32) -> Ipv6Next {
    let mut next = first;
    let mut off = l3 + IPV6_HDR_LEN;
    for _ in 0..max {
        match next {
            IPV6_NEXT_HOP_BY_HOP | IPV6_NEXT_ROUTING | IPV6_NEXT_DEST_OPTS => {
                // Next header and length (in 8-byte units, not counting
                // the first 8) are the first two bytes.
                let Some(h) = ptr_at::<[u8; 2]>(ctx, off) else {
                    return Ipv6Next::Truncated;
                };
                // SAFETY: bounds checked by ptr_at.
                let [n, len] = unsafe { *h };
                next = n;
                off += (len as usize + 1) * 8;
                if off > end {
                    return Ipv6Next::Truncated;
                }
            }
            IPV6_NEXT_FRAGMENT => return Ipv6Next::Fragment,
            _ => {
                return Ipv6Next::Upper {
                    proto: next,
                    l4: off,
                };
            }
        }
    }
    match next {
        IPV6_NEXT_HOP_BY_HOP | IPV6_NEXT_ROUTING | IPV6_NEXT_DEST_OPTS => Ipv6Next::TooMany,
        IPV6_NEXT_FRAGMENT => Ipv6Next::Fragment,
        _ => Ipv6Next::Upper {
            proto: next,
            l4: off,
        },
    }
}

/// What a packet's TCP flags say about its connection (UDP: neither).
#[derive(Clone, Copy)]
pub struct Connection {
    /// A SYN without ACK: steered by the ring even when conntrack has the
    /// 5-tuple.
    pub new_connection: bool,
    /// A FIN or RST: its record goes to the closing timeout.
    pub closing: bool,
}

/// [`Connection`] of the packet whose L4 header (of `proto`) is at `l4`;
/// `None` if the TCP flags are not in the frame.
#[inline(always)]
pub fn connection(ctx: &XdpContext, proto: u8, l4: usize) -> Option<Connection> {
    let flags = if proto == lb_common::IPPROTO_TCP {
        let flags: *const u8 = ptr_at(ctx, l4 + TCP_FLAGS_OFFSET)?;
        // SAFETY: bounds checked by ptr_at.
        unsafe { *flags }
    } else {
        0
    };
    Some(Connection {
        new_connection: flags & (TCP_SYN | TCP_ACK) == TCP_SYN,
        closing: flags & (TCP_FIN | TCP_RST) != 0,
    })
}
