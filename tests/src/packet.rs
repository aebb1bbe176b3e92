//! Crafted Ethernet frames for packet-level tests and benchmarks.

use std::net::{Ipv4Addr, Ipv6Addr};

use lb_common::{IPPROTO_TCP, IPPROTO_UDP};

pub const IPPROTO_ICMP: u8 = 1;

/// An Ethernet/IPv4/TCP-or-UDP frame, field by field.
#[derive(Clone, Debug)]
pub struct Ipv4Packet {
    pub dst_mac: [u8; 6],
    pub src_mac: [u8; 6],
    /// One 802.1Q tag (VLAN id).
    pub vlan: Option<u16>,
    pub src: Ipv4Addr,
    pub dst: Ipv4Addr,
    pub proto: u8,
    pub src_port: u16,
    pub dst_port: u16,
    /// IPv4 options; padded with zeros to a multiple of 4 bytes.
    pub options: Vec<u8>,
    /// The TOS (DSCP + ECN) byte.
    pub tos: u8,
    /// The 16-bit flags + fragment offset field (host order).
    pub frag: u16,
    pub ttl: u8,
    /// TCP flags (ignored for UDP).
    pub tcp_flags: u8,
    pub payload: Vec<u8>,
}

pub const TCP_SYN: u8 = 0x02;
pub const TCP_ACK: u8 = 0x10;
/// IPv4 "more fragments" flag in the flags/offset field.
pub const IP_MF: u16 = 0x2000;

impl Ipv4Packet {
    pub fn tcp(src: Ipv4Addr, src_port: u16, dst: Ipv4Addr, dst_port: u16) -> Self {
        Self {
            dst_mac: [0x02, 0, 0, 0, 0, 0x01],
            src_mac: [0x02, 0, 0, 0, 0, 0x02],
            vlan: None,
            src,
            dst,
            proto: IPPROTO_TCP,
            src_port,
            dst_port,
            options: Vec::new(),
            tos: 0,
            frag: 0x4000, // don't fragment
            ttl: 64,
            tcp_flags: TCP_SYN,
            payload: Vec::new(),
        }
    }

    pub fn udp(src: Ipv4Addr, src_port: u16, dst: Ipv4Addr, dst_port: u16) -> Self {
        Self {
            proto: IPPROTO_UDP,
            payload: b"hello".to_vec(),
            ..Self::tcp(src, src_port, dst, dst_port)
        }
    }

    pub fn build(&self) -> Vec<u8> {
        let mut f = Vec::with_capacity(128);
        f.extend_from_slice(&self.dst_mac);
        f.extend_from_slice(&self.src_mac);
        if let Some(vid) = self.vlan {
            f.extend_from_slice(&0x8100u16.to_be_bytes());
            f.extend_from_slice(&(vid & 0x0FFF).to_be_bytes());
        }
        f.extend_from_slice(&0x0800u16.to_be_bytes());

        let mut options = self.options.clone();
        while !options.len().is_multiple_of(4) {
            options.push(0);
        }
        let ihl = 20 + options.len();
        let l4 = self.l4_bytes();
        let tot_len = (ihl + l4.len()) as u16;
        let ip_start = f.len();
        f.push(0x40 | (ihl / 4) as u8);
        f.push(self.tos);
        f.extend_from_slice(&tot_len.to_be_bytes());
        f.extend_from_slice(&0x1234u16.to_be_bytes());
        f.extend_from_slice(&self.frag.to_be_bytes());
        f.push(self.ttl);
        f.push(self.proto);
        f.extend_from_slice(&[0, 0]);
        f.extend_from_slice(&self.src.octets());
        f.extend_from_slice(&self.dst.octets());
        f.extend_from_slice(&options);
        let csum = checksum(&f[ip_start..ip_start + ihl]);
        f[ip_start + 10..ip_start + 12].copy_from_slice(&csum.to_be_bytes());
        f.extend_from_slice(&l4);
        f
    }

    fn l4_bytes(&self) -> Vec<u8> {
        let mut l4 = Vec::new();
        l4.extend_from_slice(&self.src_port.to_be_bytes());
        l4.extend_from_slice(&self.dst_port.to_be_bytes());
        match self.proto {
            IPPROTO_TCP => {
                l4.extend_from_slice(&1u32.to_be_bytes()); // seq
                l4.extend_from_slice(&0u32.to_be_bytes()); // ack
                l4.push(5 << 4); // data offset
                l4.push(self.tcp_flags);
                l4.extend_from_slice(&65535u16.to_be_bytes());
                l4.extend_from_slice(&[0, 0, 0, 0]); // checksum, urgent
            }
            IPPROTO_UDP => {
                l4.extend_from_slice(&((8 + self.payload.len()) as u16).to_be_bytes());
                l4.extend_from_slice(&[0, 0]);
            }
            _ => {}
        }
        l4.extend_from_slice(&self.payload);
        l4
    }
}

/// An ICMP message in `base`'s IPv4 packet (its MACs, VLAN, TTL and
/// addresses): type, code, a valid checksum, the 4 header bytes `rest`
/// (identifier and sequence, or unused and next-hop MTU), then `data`.
pub fn icmp4(base: Ipv4Packet, icmp_type: u8, code: u8, rest: [u8; 4], data: &[u8]) -> Vec<u8> {
    let mut payload = rest.to_vec();
    payload.extend_from_slice(data);
    let p = Ipv4Packet {
        proto: IPPROTO_ICMP,
        src_port: u16::from(icmp_type) << 8 | u16::from(code),
        dst_port: 0,
        payload,
        ..base
    };
    let mut f = p.build();
    let l4 = f.len() - (4 + p.payload.len());
    let sum = checksum(&f[l4..]);
    f[l4 + 2..l4 + 4].copy_from_slice(&sum.to_be_bytes());
    f
}

/// An ICMP echo request.
pub fn icmp_echo(src: Ipv4Addr, dst: Ipv4Addr) -> Vec<u8> {
    let p = Ipv4Packet {
        proto: IPPROTO_ICMP,
        src_port: 0x0800, // type 8 code 0
        dst_port: 0,      // checksum (not checked by anyone here)
        payload: vec![0, 1, 0, 1, b'p', b'i', b'n', b'g'],
        ..Ipv4Packet::tcp(src, 0, dst, 0)
    };
    p.build()
}

/// An ARP request "who has `target`".
pub fn arp_request(sender: Ipv4Addr, target: Ipv4Addr) -> Vec<u8> {
    let mut f = vec![0xff; 6];
    f.extend_from_slice(&[0x02, 0, 0, 0, 0, 0x02]);
    f.extend_from_slice(&0x0806u16.to_be_bytes());
    f.extend_from_slice(&[0, 1, 0x08, 0, 6, 4, 0, 1]);
    f.extend_from_slice(&[0x02, 0, 0, 0, 0, 0x02]);
    f.extend_from_slice(&sender.octets());
    f.extend_from_slice(&[0; 6]);
    f.extend_from_slice(&target.octets());
    f
}

/// An IPv6/TCP SYN.
pub fn ipv6_tcp(src: Ipv6Addr, dst: Ipv6Addr, dst_port: u16) -> Vec<u8> {
    let mut f = vec![0x02, 0, 0, 0, 0, 0x01, 0x02, 0, 0, 0, 0, 0x02];
    f.extend_from_slice(&0x86DDu16.to_be_bytes());
    f.extend_from_slice(&[0x60, 0, 0, 0]);
    f.extend_from_slice(&20u16.to_be_bytes());
    f.push(IPPROTO_TCP);
    f.push(64);
    f.extend_from_slice(&src.octets());
    f.extend_from_slice(&dst.octets());
    f.extend_from_slice(&40000u16.to_be_bytes());
    f.extend_from_slice(&dst_port.to_be_bytes());
    f.extend_from_slice(&[
        0, 0, 0, 1, 0, 0, 0, 0, 0x50, TCP_SYN, 0xff, 0xff, 0, 0, 0, 0,
    ]);
    f
}

/// The Internet checksum of `data`.
pub fn checksum(data: &[u8]) -> u16 {
    let mut sum = 0u32;
    for c in data.chunks(2) {
        let w = if c.len() == 2 {
            u16::from_be_bytes([c[0], c[1]])
        } else {
            u16::from_be_bytes([c[0], 0])
        };
        sum += w as u32;
    }
    while sum >> 16 != 0 {
        sum = (sum & 0xffff) + (sum >> 16);
    }
    !(sum as u16)
}

// ---------------------------------------------------------------------------
// Tunnel frames (for lb-decap): IP headers built from their parts, the
// outer headers of IP-in-IP and GUE, and Ethernet framing with an optional
// VLAN tag.
// ---------------------------------------------------------------------------

pub const ETH_P_IPV4: u16 = 0x0800;
pub const ETH_P_IPV6: u16 = 0x86DD;
pub const IPPROTO_IPIP: u8 = 4;
pub const IPPROTO_IPV6: u8 = 41;
pub const IPPROTO_ICMPV6: u8 = 58;
/// The MACs [`tunnel_frame`] uses.
pub const TUNNEL_DST_MAC: [u8; 6] = [0x02, 0, 0, 0, 0, 0x0b];
pub const TUNNEL_SRC_MAC: [u8; 6] = [0x02, 0, 0, 0, 0, 0x1b];

/// An IPv4 packet (20-byte header, DF set, checksummed) carrying `payload`.
pub fn ipv4_l3(src: Ipv4Addr, dst: Ipv4Addr, proto: u8, payload: &[u8]) -> Vec<u8> {
    let mut h = vec![0x45, 0];
    h.extend_from_slice(&((20 + payload.len()) as u16).to_be_bytes());
    h.extend_from_slice(&[0x12, 0x34, 0x40, 0, 64, proto, 0, 0]);
    h.extend_from_slice(&src.octets());
    h.extend_from_slice(&dst.octets());
    let c = checksum(&h);
    h[10..12].copy_from_slice(&c.to_be_bytes());
    h.extend_from_slice(payload);
    h
}

/// An IPv6 packet (no extension headers) carrying `payload`.
pub fn ipv6_l3(src: Ipv6Addr, dst: Ipv6Addr, next: u8, payload: &[u8]) -> Vec<u8> {
    let mut h = vec![0x60, 0, 0, 0];
    h.extend_from_slice(&(payload.len() as u16).to_be_bytes());
    h.extend_from_slice(&[next, 64]);
    h.extend_from_slice(&src.octets());
    h.extend_from_slice(&dst.octets());
    h.extend_from_slice(payload);
    h
}

/// A UDP header and `payload`, checksum 0 ("none", valid over IPv4 only).
pub fn udp_l4(src_port: u16, dst_port: u16, payload: &[u8]) -> Vec<u8> {
    let mut u = Vec::with_capacity(8 + payload.len());
    u.extend_from_slice(&src_port.to_be_bytes());
    u.extend_from_slice(&dst_port.to_be_bytes());
    u.extend_from_slice(&((8 + payload.len()) as u16).to_be_bytes());
    u.extend_from_slice(&[0, 0]);
    u.extend_from_slice(payload);
    u
}

/// An IPv4/UDP packet (UDP checksum 0).
pub fn ipv4_udp_l3(
    src: Ipv4Addr,
    src_port: u16,
    dst: Ipv4Addr,
    dst_port: u16,
    payload: &[u8],
) -> Vec<u8> {
    ipv4_l3(src, dst, IPPROTO_UDP, &udp_l4(src_port, dst_port, payload))
}

/// An IPv6/UDP packet with its (mandatory) UDP checksum.
pub fn ipv6_udp_l3(
    src: Ipv6Addr,
    src_port: u16,
    dst: Ipv6Addr,
    dst_port: u16,
    payload: &[u8],
) -> Vec<u8> {
    let mut u = udp_l4(src_port, dst_port, payload);
    let mut pseudo = Vec::with_capacity(40 + u.len());
    pseudo.extend_from_slice(&src.octets());
    pseudo.extend_from_slice(&dst.octets());
    pseudo.extend_from_slice(&(u.len() as u32).to_be_bytes());
    pseudo.extend_from_slice(&[0, 0, 0, IPPROTO_UDP]);
    pseudo.extend_from_slice(&u);
    let c = match checksum(&pseudo) {
        0 => 0xffff,
        c => c,
    };
    u[6..8].copy_from_slice(&c.to_be_bytes());
    ipv6_l3(src, dst, IPPROTO_UDP, &u)
}

/// How [`encapsulate`] wraps the inner packet.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Encap {
    /// IP-in-IP: protocol/next header 4 (inner IPv4) or 41 (inner IPv6).
    Ipip,
    /// GUE variant 1: the inner packet directly in UDP to `port`.
    Gue { src_port: u16, port: u16 },
}

/// The outer packet (IP header [+ UDP] + `inner`) from `src` to `dst`
/// (both IPv4 or both IPv6); for IP-in-IP the protocol follows the inner
/// packet's version nibble.
pub fn encapsulate(
    inner: &[u8],
    src: std::net::IpAddr,
    dst: std::net::IpAddr,
    encap: Encap,
) -> Vec<u8> {
    use std::net::IpAddr;
    let (proto, payload) = match encap {
        Encap::Ipip => {
            let proto = if inner[0] >> 4 == 6 {
                IPPROTO_IPV6
            } else {
                IPPROTO_IPIP
            };
            (proto, inner.to_vec())
        }
        Encap::Gue { src_port, port } => (IPPROTO_UDP, udp_l4(src_port, port, inner)),
    };
    match (src, dst) {
        (IpAddr::V4(s), IpAddr::V4(d)) => ipv4_l3(s, d, proto, &payload),
        (IpAddr::V6(s), IpAddr::V6(d)) => {
            let mut p = payload;
            if let Encap::Gue { .. } = encap {
                // Over IPv6 a UDP checksum is due; lb-decap does not check
                // it, but keep the frame honest.
                let mut pseudo = Vec::new();
                pseudo.extend_from_slice(&s.octets());
                pseudo.extend_from_slice(&d.octets());
                pseudo.extend_from_slice(&(p.len() as u32).to_be_bytes());
                pseudo.extend_from_slice(&[0, 0, 0, IPPROTO_UDP]);
                pseudo.extend_from_slice(&p);
                let c = match checksum(&pseudo) {
                    0 => 0xffff,
                    c => c,
                };
                p[6..8].copy_from_slice(&c.to_be_bytes());
            }
            ipv6_l3(s, d, proto, &p)
        }
        _ => panic!("encapsulate: outer addresses of two families ({src}, {dst})"),
    }
}

/// An Ethernet frame (with one 802.1Q tag when `vlan` is set) around `l3`.
pub fn ethernet_frame(
    dst_mac: [u8; 6],
    src_mac: [u8; 6],
    vlan: Option<u16>,
    ether_type: u16,
    l3: &[u8],
) -> Vec<u8> {
    let mut f = Vec::with_capacity(18 + l3.len());
    f.extend_from_slice(&dst_mac);
    f.extend_from_slice(&src_mac);
    if let Some(vid) = vlan {
        f.extend_from_slice(&0x8100u16.to_be_bytes());
        f.extend_from_slice(&(vid & 0x0FFF).to_be_bytes());
    }
    f.extend_from_slice(&ether_type.to_be_bytes());
    f.extend_from_slice(l3);
    f
}

/// The EtherType of an IP packet, by its version nibble.
pub fn ether_type_of(l3: &[u8]) -> u16 {
    if l3[0] >> 4 == 6 {
        ETH_P_IPV6
    } else {
        ETH_P_IPV4
    }
}

/// A tunnel frame: `inner` encapsulated from `src` to `dst`, framed with
/// [`TUNNEL_DST_MAC`]/[`TUNNEL_SRC_MAC`] and `vlan`.
pub fn tunnel_frame(
    inner: &[u8],
    src: std::net::IpAddr,
    dst: std::net::IpAddr,
    encap: Encap,
    vlan: Option<u16>,
) -> Vec<u8> {
    let outer = encapsulate(inner, src, dst, encap);
    ethernet_frame(
        TUNNEL_DST_MAC,
        TUNNEL_SRC_MAC,
        vlan,
        ether_type_of(&outer),
        &outer,
    )
}

/// An ICMPv6 neighbour solicitation for `target` from `src`.
pub fn icmpv6_neighbor_solicitation(src: Ipv6Addr, target: Ipv6Addr) -> Vec<u8> {
    let mut icmp = vec![135, 0, 0, 0, 0, 0, 0, 0];
    icmp.extend_from_slice(&target.octets());
    let o = target.octets();
    let solicited = Ipv6Addr::new(
        0xff02,
        0,
        0,
        0,
        0,
        1,
        0xff00 | o[13] as u16,
        u16::from_be_bytes([o[14], o[15]]),
    );
    let l3 = ipv6_l3(src, solicited, IPPROTO_ICMPV6, &icmp);
    ethernet_frame(
        [0x33, 0x33, 0xff, o[13], o[14], o[15]],
        TUNNEL_SRC_MAC,
        None,
        ETH_P_IPV6,
        &l3,
    )
}

// ---------------------------------------------------------------------------
// IPv6 frames for the fast path's IPv6 tests: extension headers, VLAN,
// fragments.
// ---------------------------------------------------------------------------

pub const IPV6_HOP_BY_HOP: u8 = 0;
pub const IPV6_ROUTING: u8 = 43;
pub const IPV6_FRAGMENT: u8 = 44;
pub const IPV6_DEST_OPTS: u8 = 60;

/// An Ethernet/IPv6/TCP-or-UDP frame, field by field.
#[derive(Clone, Debug)]
pub struct Ipv6Packet {
    pub dst_mac: [u8; 6],
    pub src_mac: [u8; 6],
    /// One 802.1Q tag (VLAN id).
    pub vlan: Option<u16>,
    pub src: Ipv6Addr,
    pub dst: Ipv6Addr,
    /// Extension headers in order, by type (0, 43, 44, 60 or any other
    /// number, written as an 8-byte header: options are one PadN, the
    /// routing header has no segments left, the fragment header has
    /// offset 0 and M set).
    pub ext: Vec<u8>,
    pub proto: u8,
    pub src_port: u16,
    pub dst_port: u16,
    /// TCP flags (ignored for UDP).
    pub tcp_flags: u8,
    pub payload: Vec<u8>,
}

impl Ipv6Packet {
    pub fn tcp(src: Ipv6Addr, src_port: u16, dst: Ipv6Addr, dst_port: u16) -> Self {
        Self {
            dst_mac: [0x02, 0, 0, 0, 0, 0x01],
            src_mac: [0x02, 0, 0, 0, 0, 0x02],
            vlan: None,
            src,
            dst,
            ext: Vec::new(),
            proto: IPPROTO_TCP,
            src_port,
            dst_port,
            tcp_flags: TCP_SYN,
            payload: Vec::new(),
        }
    }

    pub fn udp(src: Ipv6Addr, src_port: u16, dst: Ipv6Addr, dst_port: u16) -> Self {
        Self {
            proto: IPPROTO_UDP,
            payload: b"hello".to_vec(),
            ..Self::tcp(src, src_port, dst, dst_port)
        }
    }

    /// The L3 packet (fixed header, extension headers, L4).
    pub fn l3(&self) -> Vec<u8> {
        let mut body = Vec::new();
        let chain: Vec<u8> = self.ext.iter().copied().chain([self.proto]).collect();
        for (i, &kind) in self.ext.iter().enumerate() {
            let next = chain[i + 1];
            match kind {
                IPV6_FRAGMENT => body.extend_from_slice(&[next, 0, 0, 1, 0, 0, 0x12, 0x34]),
                IPV6_ROUTING => body.extend_from_slice(&[next, 0, 0, 0, 0, 0, 0, 0]),
                _ => body.extend_from_slice(&[next, 0, 1, 4, 0, 0, 0, 0]),
            }
        }
        body.extend_from_slice(&self.src_port.to_be_bytes());
        body.extend_from_slice(&self.dst_port.to_be_bytes());
        match self.proto {
            IPPROTO_TCP => {
                body.extend_from_slice(&1u32.to_be_bytes());
                body.extend_from_slice(&0u32.to_be_bytes());
                body.push(5 << 4);
                body.push(self.tcp_flags);
                body.extend_from_slice(&65535u16.to_be_bytes());
                body.extend_from_slice(&[0, 0, 0, 0]);
            }
            IPPROTO_UDP => {
                body.extend_from_slice(&((8 + self.payload.len()) as u16).to_be_bytes());
                body.extend_from_slice(&[0, 0]);
            }
            _ => {}
        }
        body.extend_from_slice(&self.payload);
        ipv6_l3(self.src, self.dst, chain[0], &body)
    }

    pub fn build(&self) -> Vec<u8> {
        ethernet_frame(
            self.dst_mac,
            self.src_mac,
            self.vlan,
            ETH_P_IPV6,
            &self.l3(),
        )
    }
}

/// An ICMPv6 echo request from `src` to `dst` (checksum not computed:
/// nothing here checks it).
pub fn icmpv6_echo(src: Ipv6Addr, dst: Ipv6Addr) -> Vec<u8> {
    let icmp = [128, 0, 0, 0, 0, 1, 0, 1, b'p', b'i', b'n', b'g'];
    ethernet_frame(
        [0x02, 0, 0, 0, 0, 0x01],
        [0x02, 0, 0, 0, 0, 0x02],
        None,
        ETH_P_IPV6,
        &ipv6_l3(src, dst, IPPROTO_ICMPV6, &icmp),
    )
}

/// The ICMPv6 checksum of `msg` (the ICMPv6 message, its checksum field
/// included) from `src` to `dst`: 0 when the message's checksum is valid.
pub fn icmpv6_checksum(src: Ipv6Addr, dst: Ipv6Addr, msg: &[u8]) -> u16 {
    let mut pseudo = Vec::with_capacity(40 + msg.len());
    pseudo.extend_from_slice(&src.octets());
    pseudo.extend_from_slice(&dst.octets());
    pseudo.extend_from_slice(&(msg.len() as u32).to_be_bytes());
    pseudo.extend_from_slice(&[0, 0, 0, IPPROTO_ICMPV6]);
    pseudo.extend_from_slice(msg);
    checksum(&pseudo)
}

/// An IPv6 packet (no extension headers) carrying an ICMPv6 message: type,
/// code, a valid checksum, the 4 header bytes `rest` (identifier and
/// sequence, or the MTU), then `data`.
pub fn icmpv6_l3(
    src: Ipv6Addr,
    dst: Ipv6Addr,
    icmp_type: u8,
    code: u8,
    rest: [u8; 4],
    data: &[u8],
) -> Vec<u8> {
    let mut msg = vec![icmp_type, code, 0, 0];
    msg.extend_from_slice(&rest);
    msg.extend_from_slice(data);
    let c = icmpv6_checksum(src, dst, &msg);
    msg[2..4].copy_from_slice(&c.to_be_bytes());
    ipv6_l3(src, dst, IPPROTO_ICMPV6, &msg)
}
