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
