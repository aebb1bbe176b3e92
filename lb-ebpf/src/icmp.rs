//! ICMP to VIP addresses: echo requests lb answers itself, so that
//! operators can ping a VIP (the backends hold it only on lo, and lb's host
//! does not hold it at all); and the packet embedded in an ICMP error,
//! whose flow says which backend the error is for.

use aya_ebpf::programs::XdpContext;

use lb_common::{IPPROTO_TCP, IPPROTO_UDP, csum::replace16};

use crate::parse::{ipv4, ipv4_header_len, l4_ports, ptr_at, read_macs, write_macs};

pub const ICMP_ECHO_REPLY: u8 = 0;
pub const ICMP_ECHO_REQUEST: u8 = 8;
/// "Destination unreachable", code "fragmentation needed and DF set".
pub const ICMP_DEST_UNREACH: u8 = 3;
pub const ICMP_FRAG_NEEDED: u8 = 4;
/// "Time exceeded" (TTL expired in transit, or reassembly).
pub const ICMP_TIME_EXCEEDED: u8 = 11;
/// The ICMP header: type, code, checksum, identifier, sequence number.
pub const ICMP_HDR_LEN: usize = 8;
/// The TTL of lb's answers.
const TTL: u8 = 64;

/// Turns the echo request at `l3` (IPv4 header) and `icmp` (its ICMP
/// header, bounds checked by the caller) into its reply in place: MACs and
/// IPv4 addresses swapped (which leaves the IPv4 checksum as it was), TTL
/// reset, type 8 → 0; both checksums updated incrementally. Identifier,
/// sequence number and data are echoed untouched. The caller sends the
/// frame back out with `XDP_TX`.
///
/// # Safety
/// `icmp` points to the packet's 8-byte ICMP header, bounds checked.
#[inline(always)]
pub unsafe fn echo_reply(ctx: &XdpContext, l3: usize, icmp: *mut [u8; ICMP_HDR_LEN]) -> Option<()> {
    let eth: *mut [u8; 14] = ptr_at(ctx, 0)?;
    let ip: *mut [u16; 10] = ptr_at(ctx, l3)?;
    // SAFETY: every pointer was bounds checked (by ptr_at, or by the caller
    // for `icmp`) for the size it is used with; XDP data is 2-byte aligned
    // and the L3/L4 offsets are even, and unaligned accesses are fine on
    // the architectures lb supports.
    unsafe {
        let frame = eth as *mut u8;
        let (dst_mac, src_mac) = read_macs(frame);
        write_macs(frame, src_mac, dst_mac);

        let ip = ip as *mut u16;
        // Word 4: TTL and protocol; word 5: the header checksum.
        let old = u16::from_be(ip.add(4).read_unaligned());
        let new = (TTL as u16) << 8 | (old & 0x00FF);
        let sum = u16::from_be(ip.add(5).read_unaligned());
        ip.add(4).write_unaligned(new.to_be());
        ip.add(5).write_unaligned(replace16(sum, old, new).to_be());
        // Words 6–7 source, 8–9 destination.
        let addrs = ip.add(6) as *mut [u32; 2];
        let [src, dst] = addrs.read_unaligned();
        addrs.write_unaligned([dst, src]);

        let icmp = icmp as *mut u16;
        let old = u16::from_be(icmp.read_unaligned());
        let new = (ICMP_ECHO_REPLY as u16) << 8 | (old & 0x00FF);
        let sum = u16::from_be(icmp.add(1).read_unaligned());
        icmp.write_unaligned(new.to_be());
        icmp.add(1)
            .write_unaligned(replace16(sum, old, new).to_be());
    }
    Some(())
}

/// The flow an ICMP error is about, read from the packet it embeds (IPv4
/// header + the first 8 bytes of its payload): as the backend sent it,
/// from the VIP (`vip_addr`, `vip_port`) to the client.
pub struct Embedded {
    pub vip_addr: u32,
    pub client_addr: u32,
    /// Network order.
    pub vip_port: u16,
    pub client_port: u16,
    pub proto: u8,
    /// Offset of the embedded TCP/UDP header in the frame.
    pub l4: usize,
}

/// Reads the packet embedded in the ICMP error at `l4` (`room` bytes of
/// ICMP message, as the outer IPv4 total length says): `None` unless it is
/// an IPv4 TCP or UDP header with its ports, all within `room`.
#[inline(always)]
pub fn embedded(ctx: &XdpContext, l4: usize, room: usize) -> Option<Embedded> {
    let inner = l4 + ICMP_HDR_LEN;
    let ip = ipv4(ctx, inner)?;
    let ihl = ipv4_header_len(ip);
    // The ports' bounds check comes before the length checks (after them
    // the compiler would drop it as implied, and the verifier cannot
    // follow).
    let ports = l4_ports(ctx, inner + ihl)?;
    let proto = ip.proto;
    if ip.vihl >> 4 != 4
        || ihl < 20
        || ICMP_HDR_LEN + ihl + 8 > room
        || (proto != IPPROTO_TCP && proto != IPPROTO_UDP)
    {
        return None;
    }
    let [vip_port, client_port] = ports;
    Some(Embedded {
        vip_addr: u32::from_ne_bytes(ip.src_addr),
        client_addr: u32::from_ne_bytes(ip.dst_addr),
        vip_port,
        client_port,
        proto,
        l4: inner + ihl,
    })
}
