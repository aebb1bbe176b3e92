//! ICMPv6 to IPv6 VIP addresses, as [`crate::icmp`] for IPv4: echo
//! requests lb answers itself, and the packet embedded in a "packet too
//! big", whose flow says which backend the error is for.

use aya_ebpf::programs::XdpContext;
use lb_common::{IPPROTO_TCP, IPPROTO_UDP, csum::replace16};

use crate::parse::{IPV6_HDR_LEN, ipv6, l4_ports, ptr_at, read_macs, write_macs};

pub const ICMPV6_ECHO_REQUEST: u8 = 128;
pub const ICMPV6_ECHO_REPLY: u8 = 129;
pub use crate::encap6::ICMPV6_PACKET_TOO_BIG;
pub const ICMPV6_DEST_UNREACH: u8 = 1;
pub const ICMPV6_TIME_EXCEEDED: u8 = 3;
/// Type, code, checksum and four bytes (identifier and sequence, or MTU).
pub const ICMPV6_HDR_LEN: usize = 8;
/// The hop limit of lb's answers.
const HOP_LIMIT: u8 = 64;

/// Turns the echo request at `l3` (IPv6 header, followed directly by the
/// ICMPv6 header at `icmp`, bounds checked by the caller) into its reply
/// in place: MACs and addresses swapped, hop limit reset, type 128 → 129.
/// The checksum's pseudo-header sums both addresses, so swapping them
/// leaves it as it was; only the type word changes it (RFC 1624).
/// Identifier, sequence number and data are echoed untouched. The caller
/// sends the frame back out with `XDP_TX`.
///
/// # Safety
/// `icmp` points to the packet's 8-byte ICMPv6 header, bounds checked.
#[inline(always)]
pub unsafe fn echo_reply6(
    ctx: &XdpContext,
    l3: usize,
    icmp: *mut [u8; ICMPV6_HDR_LEN],
) -> Option<()> {
    let eth: *mut [u8; 14] = ptr_at(ctx, 0)?;
    let ip: *mut [u32; 10] = ptr_at(ctx, l3)?;
    // SAFETY: every pointer was bounds checked (by ptr_at, or by the caller
    // for `icmp`) for the size it is used with; XDP data is 2-byte aligned
    // and the L3/L4 offsets are even, and unaligned accesses are fine on
    // the architectures lb supports.
    unsafe {
        let frame = eth as *mut u8;
        let (dst_mac, src_mac) = read_macs(frame);
        write_macs(frame, src_mac, dst_mac);

        let ip = ip as *mut u8;
        // Byte 7: the hop limit (not in the pseudo-header).
        ip.add(7).write(HOP_LIMIT);
        // Bytes 8–23 source, 24–39 destination.
        let addrs = ip.add(8) as *mut [[u32; 4]; 2];
        let [src, dst] = addrs.read_unaligned();
        addrs.write_unaligned([dst, src]);

        let icmp = icmp as *mut u16;
        let old = u16::from_be(icmp.read_unaligned());
        let new = (ICMPV6_ECHO_REPLY as u16) << 8 | (old & 0x00FF);
        let sum = u16::from_be(icmp.add(1).read_unaligned());
        icmp.write_unaligned(new.to_be());
        icmp.add(1)
            .write_unaligned(replace16(sum, old, new).to_be());
    }
    Some(())
}

/// The flow an ICMPv6 error is about, read from the packet it embeds (the
/// IPv6 header and the first 8 bytes of its payload): as the backend sent
/// it, from the VIP to the client.
pub struct Embedded6 {
    pub vip_addr: [u32; 4],
    pub client_addr: [u32; 4],
    /// Network order.
    pub vip_port: u16,
    pub client_port: u16,
    pub proto: u8,
    /// Offset of the embedded TCP/UDP header in the frame.
    pub l4: usize,
}

/// Reads the packet embedded in the ICMPv6 error at `l4` (`room` bytes of
/// ICMPv6 message, as the outer payload length says): `None` unless it is
/// an IPv6 header followed directly by a TCP or UDP header with its ports
/// (a backend's reply carries no extension headers), all within `room`.
#[inline(always)]
pub fn embedded6(ctx: &XdpContext, l4: usize, room: usize) -> Option<Embedded6> {
    let inner = l4 + ICMPV6_HDR_LEN;
    let ip = ipv6(ctx, inner)?;
    // The ports' bounds check comes before the length checks (after them
    // the compiler would drop it as implied, and the verifier cannot
    // follow).
    let ports = l4_ports(ctx, inner + IPV6_HDR_LEN)?;
    let proto = ip.next_header;
    if ip.vcf[0] >> 4 != 6
        || ICMPV6_HDR_LEN + IPV6_HDR_LEN + 8 > room
        || (proto != IPPROTO_TCP && proto != IPPROTO_UDP)
    {
        return None;
    }
    let [vip_port, client_port] = ports;
    Some(Embedded6 {
        vip_addr: ip.src,
        client_addr: ip.dst,
        vip_port,
        client_port,
        proto,
        l4: inner + IPV6_HDR_LEN,
    })
}
