//! Full NAT at the packet level (issue 11): the real XDP program and maps
//! through BPF_PROG_TEST_RUN. The forward path's rewrite and the pair it
//! records, the return path's translation back, checksums against a
//! from-scratch computation for random payloads and sizes (both
//! directions, IPv4 and IPv6, TCP and UDP), replies without a flow, port
//! exhaustion and reclaim, SYN reuse and re-steering. Needs root.

use std::net::{Ipv4Addr, Ipv6Addr};

use lb_common::{
    FlowKey, FlowKey6, IPPROTO_TCP, IPPROTO_UDP, Runtime,
    nat::{NatSnat, nat_port_candidate},
};
use lb_tests::{
    fixture::{
        ENCAP_SRC, ENCAP_SRC6, Fixture, LB_MAC, XDP_DROP, XDP_TX, assert_passed_untouched,
        backend_addr, backend_addr6, backend_mac, moved,
    },
    packet::{Ipv4Packet, Ipv6Packet, TCP_ACK, checksum},
};

const VIP: Ipv4Addr = Ipv4Addr::new(198, 18, 10, 1);
const CLIENT: Ipv4Addr = Ipv4Addr::new(198, 18, 0, 2);
const VIP6: Ipv6Addr = Ipv6Addr::new(0x2001, 2, 0, 10, 0, 0, 0, 1);
const CLIENT6: Ipv6Addr = Ipv6Addr::new(0x2001, 2, 0, 0, 0, 0, 0, 2);
const BACKEND_PORT: u16 = 8080;
/// The UDP VIP's backend ids: the TCP VIP's plus this (same addresses).
const UDP_IDS: u32 = 10;
const PORT_MIN: u16 = 40000;
const PORT_MAX: u16 = 40999;
/// The MACs of the client's frames (Ipv4Packet/Ipv6Packet defaults).
const CLIENT_MAC: [u8; 6] = [0x02, 0, 0, 0, 0, 0x02];
const LB_IN_MAC: [u8; 6] = [0x02, 0, 0, 0, 0, 0x01];

fn runtime(min: u16, max: u16) -> Runtime {
    Runtime {
        now_ms: 1_000,
        udp_idle_ms: 30_000,
        tcp_idle_ms: 300_000,
        tcp_closing_ms: 10_000,
        nat_port_min: min,
        nat_port_max: max,
        ..Runtime::default()
    }
}

/// A fixture with NAT VIP 0 (VIP:80, TCP and UDP) over `backends`, the
/// NAT range set.
fn nat4(backends: &[(u32, u32)], min: u16, max: u16) -> Fixture {
    let mut f = Fixture::new();
    f.add_nat_vip(0, (VIP, 80, IPPROTO_TCP), backends, BACKEND_PORT);
    // The UDP VIP's backends: the same hosts under ids of their own (a
    // backend id serves one VIP).
    let udp: Vec<(u32, u32)> = backends.iter().map(|&(id, w)| (id + UDP_IDS, w)).collect();
    f.add_nat_vip(1, (VIP, 80, IPPROTO_UDP), &udp, BACKEND_PORT);
    for &(id, _) in backends {
        let mut b = f.dp.backend(id).unwrap();
        b.vip_index = 1;
        f.dp.set_backend(id + UDP_IDS, b).unwrap();
    }
    f.dp.set_runtime(runtime(min, max)).unwrap();
    f
}

fn nat6(backends: &[(u32, u32)]) -> Fixture {
    let mut f = Fixture::new();
    f.add_nat_vip6(0, (VIP6, 80, IPPROTO_TCP), backends, BACKEND_PORT);
    let udp: Vec<(u32, u32)> = backends.iter().map(|&(id, w)| (id + UDP_IDS, w)).collect();
    f.add_nat_vip6(1, (VIP6, 80, IPPROTO_UDP), &udp, BACKEND_PORT);
    for &(id, _) in backends {
        let mut b = f.dp.backend(id).unwrap();
        b.vip_index = 1;
        f.dp.set_backend(id + UDP_IDS, b).unwrap();
    }
    f.dp.set_runtime(runtime(PORT_MIN, PORT_MAX)).unwrap();
    f
}

/// The sum of `data` as 16-bit words, not folded-and-inverted.
fn l4_valid(pseudo: &[u8], l4: &[u8]) -> bool {
    let mut all = pseudo.to_vec();
    all.extend_from_slice(l4);
    checksum(&all) == 0
}

/// Checks an Ethernet/IPv4/TCP-or-UDP frame's checksums from scratch:
/// the IPv4 header's, and the L4 one over its pseudo-header (UDP 0:
/// none, accepted only when `udp_zero_ok`).
fn assert_v4_checksums(frame: &[u8], what: &str) {
    let ip = &frame[14..];
    let ihl = (ip[0] & 0xf) as usize * 4;
    assert_eq!(checksum(&ip[..ihl]), 0, "{what}: IPv4 header checksum");
    let tot = u16::from_be_bytes([ip[2], ip[3]]) as usize;
    let l4 = &ip[ihl..tot];
    let proto = ip[9];
    if proto == IPPROTO_UDP && l4[6..8] == [0, 0] {
        return;
    }
    let mut pseudo = ip[12..20].to_vec();
    pseudo.extend_from_slice(&[0, proto]);
    pseudo.extend_from_slice(&(l4.len() as u16).to_be_bytes());
    assert!(l4_valid(&pseudo, l4), "{what}: L4 checksum");
}

fn assert_v6_checksums(frame: &[u8], what: &str) {
    let ip = &frame[14..];
    let plen = u16::from_be_bytes([ip[4], ip[5]]) as usize;
    let l4 = &ip[40..40 + plen];
    let mut pseudo = ip[8..40].to_vec();
    pseudo.extend_from_slice(&(l4.len() as u32).to_be_bytes());
    pseudo.extend_from_slice(&[0, 0, 0, ip[6]]);
    assert!(l4_valid(&pseudo, l4), "{what}: L4 checksum");
    assert_ne!(
        l4[if ip[6] == IPPROTO_UDP { 6 } else { 16 }..][..2],
        [0, 0],
        "{what}"
    );
}

/// Fills in the L4 checksum of a built IPv4 frame (the builder leaves it
/// 0), from scratch.
fn with_l4_checksum_v4(mut f: Vec<u8>) -> Vec<u8> {
    let ihl = (f[14] & 0xf) as usize * 4;
    let proto = f[14 + 9];
    let at = 14 + ihl + if proto == IPPROTO_UDP { 6 } else { 16 };
    let mut pseudo = f[14 + 12..14 + 20].to_vec();
    pseudo.extend_from_slice(&[0, proto]);
    let l4 = f[14 + ihl..].to_vec();
    pseudo.extend_from_slice(&(l4.len() as u16).to_be_bytes());
    pseudo.extend_from_slice(&l4);
    let mut c = checksum(&pseudo);
    if proto == IPPROTO_UDP && c == 0 {
        c = 0xffff;
    }
    f[at..at + 2].copy_from_slice(&c.to_be_bytes());
    f
}

fn with_l4_checksum_v6(mut f: Vec<u8>) -> Vec<u8> {
    let proto = f[14 + 6];
    let at = 14 + 40 + if proto == IPPROTO_UDP { 6 } else { 16 };
    let mut pseudo = f[14 + 8..14 + 40].to_vec();
    let l4 = f[14 + 40..].to_vec();
    pseudo.extend_from_slice(&(l4.len() as u32).to_be_bytes());
    pseudo.extend_from_slice(&[0, 0, 0, proto]);
    pseudo.extend_from_slice(&l4);
    let mut c = checksum(&pseudo);
    if proto == IPPROTO_UDP && c == 0 {
        c = 0xffff;
    }
    f[at..at + 2].copy_from_slice(&c.to_be_bytes());
    f
}

fn ipv4_of(b: &[u8]) -> Ipv4Addr {
    Ipv4Addr::new(b[0], b[1], b[2], b[3])
}

fn port_at(f: &[u8], at: usize) -> u16 {
    u16::from_be_bytes([f[at], f[at + 1]])
}

/// A small deterministic generator (xorshift), seeded per test.
struct Rng(u64);
impl Rng {
    fn next(&mut self) -> u64 {
        self.0 ^= self.0 << 13;
        self.0 ^= self.0 >> 7;
        self.0 ^= self.0 << 17;
        self.0
    }
    /// Random bytes, a random count below `max`.
    fn sized(&mut self, max: u64) -> Vec<u8> {
        let n = (self.next() % max) as usize;
        self.bytes(n)
    }
    fn bytes(&mut self, n: usize) -> Vec<u8> {
        (0..n).map(|_| self.next() as u8).collect()
    }
}

/// The reply a backend sends to the translated frame `out` (IPv4): the
/// tuple reversed, MACs swapped, `payload`, L4 checksum from scratch.
fn reply_v4(out: &[u8], proto: u8, payload: Vec<u8>) -> Vec<u8> {
    let ip = &out[14..];
    let ihl = (ip[0] & 0xf) as usize * 4;
    let mut p = if proto == IPPROTO_TCP {
        Ipv4Packet::tcp(
            ipv4_of(&ip[16..20]),
            port_at(ip, ihl + 2),
            ipv4_of(&ip[12..16]),
            port_at(ip, ihl),
        )
    } else {
        Ipv4Packet::udp(
            ipv4_of(&ip[16..20]),
            port_at(ip, ihl + 2),
            ipv4_of(&ip[12..16]),
            port_at(ip, ihl),
        )
    };
    p.dst_mac = LB_MAC;
    p.src_mac = out[0..6].try_into().unwrap();
    p.tcp_flags = TCP_ACK;
    p.payload = payload;
    with_l4_checksum_v4(p.build())
}

#[test]
fn first_packet_is_rewritten_to_the_backend_and_records_both_entries() {
    let f = nat4(&[(1, 1), (2, 1), (3, 1)], PORT_MIN, PORT_MAX);
    let mut syn = Ipv4Packet::tcp(CLIENT, 33000, VIP, 80);
    syn.ttl = 61;
    let pkt = with_l4_checksum_v4(syn.build());
    let r = f.run(&pkt);
    assert_eq!(r.action, XDP_TX);
    let out = &r.frame;
    assert_eq!(out.len(), pkt.len(), "NAT adds no bytes");
    let key = FlowKey::new(CLIENT.to_bits(), 33000, VIP.to_bits(), 80, IPPROTO_TCP);
    let fwd = f.dp.nat_fwd(&key).unwrap().expect("forward entry");
    let b = fwd.backend_id;
    assert!((1..=3).contains(&b));
    assert_eq!(&out[0..6], &backend_mac(b), "next hop: the backend's MAC");
    assert_eq!(&out[6..12], &LB_MAC);
    let ip = &out[14..];
    assert_eq!(ipv4_of(&ip[12..16]), ENCAP_SRC, "source: the route source");
    assert_eq!(ipv4_of(&ip[16..20]), backend_addr(b));
    let sport = port_at(ip, 20);
    assert!((PORT_MIN..=PORT_MAX).contains(&sport), "{sport}");
    assert_eq!(port_at(ip, 22), BACKEND_PORT);
    assert_eq!(ip[8], 61, "TTL untouched");
    assert_eq!(&ip[24..36], &pkt[14 + 24..14 + 36], "TCP header untouched");
    assert_eq!(&ip[38..], &pkt[14 + 38..], "the rest untouched");
    assert_v4_checksums(out, "forward");
    // The pair, read back.
    assert_eq!(fwd.snat_addr[0], ENCAP_SRC.to_bits().to_be());
    assert_eq!(u16::from_be(fwd.snat_port), sport);
    assert_eq!(u16::from_be(fwd.backend_port), BACKEND_PORT);
    assert_eq!(fwd.last_seen_ms, 1_000);
    let rkey = FlowKey::new(
        backend_addr(b).to_bits(),
        BACKEND_PORT,
        ENCAP_SRC.to_bits(),
        sport,
        IPPROTO_TCP,
    );
    let rev = f.dp.nat_rev(&rkey).unwrap().expect("reverse entry");
    assert_eq!(rev.client_addr[0], CLIENT.to_bits().to_be());
    assert_eq!(rev.vip_addr[0], VIP.to_bits().to_be());
    assert_eq!(
        (u16::from_be(rev.client_port), u16::from_be(rev.vip_port)),
        (33000, 80)
    );
    assert_eq!((rev.client_mac, rev.lb_mac), (CLIENT_MAC, LB_IN_MAC));
    assert_eq!((rev.backend_id, rev.vip_index, rev.ifindex), (b, 0, 1));

    // Later packets reuse the pair.
    syn.tcp_flags = TCP_ACK;
    syn.payload = b"GET / HTTP/1.1\r\n\r\n".to_vec();
    let r2 = f.run(&with_l4_checksum_v4(syn.build()));
    assert_eq!(r2.action, XDP_TX);
    assert_eq!(port_at(&r2.frame, 14 + 20), sport);
    assert_eq!(&r2.frame[14 + 12..14 + 20], &out[14 + 12..14 + 20]);
    assert_v4_checksums(&r2.frame, "second");
    let s = f.dp.vip_stats(0).unwrap();
    assert_eq!((s.packets, s.new_flows, s.conntrack_hits), (2, 1, 1));
    assert_eq!(f.dp.backend_stats(b).unwrap().packets, 2);
    assert_eq!(f.dp.nat_fwd_entries().unwrap().len(), 1);
    assert_eq!(f.dp.nat_rev_entries().unwrap().len(), 1);

    // The backend's reply goes back from the VIP to the client.
    let reply = reply_v4(&r2.frame, IPPROTO_TCP, b"HTTP/1.1 200 OK\r\n\r\n".to_vec());
    let back = f.run(&reply);
    assert_eq!(back.action, XDP_TX);
    assert_eq!(&back.frame[0..6], &CLIENT_MAC);
    assert_eq!(&back.frame[6..12], &LB_IN_MAC);
    let ip = &back.frame[14..];
    assert_eq!(ipv4_of(&ip[12..16]), VIP);
    assert_eq!(ipv4_of(&ip[16..20]), CLIENT);
    assert_eq!((port_at(ip, 20), port_at(ip, 22)), (80, 33000));
    assert_eq!(
        &back.frame[14 + 40..],
        &reply[14 + 40..],
        "payload untouched"
    );
    assert_v4_checksums(&back.frame, "return");
    let s = f.dp.vip_stats(0).unwrap();
    assert_eq!((s.return_packets, s.return_bytes), (1, reply.len() as u64));
}

/// Forward and return checksums for random payloads and sizes, TCP and
/// UDP (the builder's UDP datagrams may carry checksum 0: it stays 0).
#[test]
fn checksums_verify_from_scratch_for_random_payloads_both_directions_v4() {
    let f = nat4(&[(1, 1), (2, 1)], PORT_MIN, PORT_MAX);
    let mut rng = Rng(0x5eed_0001);
    for i in 0..200u16 {
        let proto = if i % 2 == 0 { IPPROTO_TCP } else { IPPROTO_UDP };
        let len = (rng.next() % 1200) as usize;
        let mut p = if proto == IPPROTO_TCP {
            Ipv4Packet::tcp(CLIENT, 20000 + i, VIP, 80)
        } else {
            Ipv4Packet::udp(CLIENT, 20000 + i, VIP, 80)
        };
        p.payload = rng.bytes(len);
        // Every fourth UDP datagram without a checksum.
        let zero = proto == IPPROTO_UDP && i % 4 == 1;
        let pkt = if zero {
            p.build()
        } else {
            with_l4_checksum_v4(p.build())
        };
        let r = f.run(&pkt);
        assert_eq!(r.action, XDP_TX, "{i}");
        assert_v4_checksums(&r.frame, &format!("forward {i}"));
        if zero {
            assert_eq!(&r.frame[14 + 26..14 + 28], &[0, 0], "{i}: UDP 0 stays 0");
        }
        let reply = reply_v4(&r.frame, proto, rng.sized(1200));
        let back = f.run(&reply);
        assert_eq!(back.action, XDP_TX, "{i}");
        assert_v4_checksums(&back.frame, &format!("return {i}"));
    }
}

/// A UDP checksum the translation makes 0 is sent as 0xFFFF (0 would
/// mean "none"): the second datagram's last two payload bytes are chosen
/// so that the translated sum is 0.
#[test]
fn a_udp_checksum_that_becomes_zero_is_sent_as_ffff() {
    let f = nat4(&[(1, 1)], PORT_MIN, PORT_MAX);
    let mut p = Ipv4Packet::udp(CLIENT, 5353, VIP, 80);
    p.payload = vec![1, 2, 3, 4, 0, 0];
    let first = f.run(&with_l4_checksum_v4(p.build()));
    assert_eq!(first.action, XDP_TX);
    // The translated datagram with the payload's last word 0 sums to S,
    // its checksum C = !S. A last word of C makes it sum to S + !S =
    // 0xFFFF, whose checksum is 0.
    let c = port_at(&first.frame, 14 + 26);
    p.payload[4..6].copy_from_slice(&c.to_be_bytes());
    let r = f.run(&with_l4_checksum_v4(p.build()));
    assert_eq!(r.action, XDP_TX);
    assert_eq!(port_at(&r.frame, 14 + 26), 0xffff);
    assert_v4_checksums(&r.frame, "0xFFFF");
}

#[test]
fn replies_without_a_flow_or_outside_the_range_pass_untouched() {
    let f = nat4(&[(1, 1)], PORT_MIN, PORT_MAX);
    let no_flow = with_l4_checksum_v4(
        Ipv4Packet::tcp(backend_addr(1), BACKEND_PORT, ENCAP_SRC, PORT_MIN + 5).build(),
    );
    assert_passed_untouched(&f, &no_flow, "pass_nat_no_flow");
    let outside = with_l4_checksum_v4(
        Ipv4Packet::tcp(backend_addr(1), BACKEND_PORT, ENCAP_SRC, PORT_MAX + 1).build(),
    );
    assert_passed_untouched(&f, &outside, "pass_not_vip");
    let below = with_l4_checksum_v4(
        Ipv4Packet::udp(backend_addr(1), BACKEND_PORT, ENCAP_SRC, PORT_MIN - 1).build(),
    );
    assert_passed_untouched(&f, &below, "pass_not_vip");
}

/// Range of 2 ports: a third flow towards the same backend finds none
/// free and is dropped, counted, the two pairs untouched; a flow to
/// another SNAT address still gets a port.
#[test]
fn ports_exhausted_drops_the_new_flow_and_keeps_the_live_ones() {
    let mut f = nat4(&[(1, 1)], PORT_MIN, PORT_MIN + 1);
    for port in [41000, 41001] {
        let r = f.run(&Ipv4Packet::tcp(CLIENT, port, VIP, 80).build());
        assert_eq!(r.action, XDP_TX, "{port}");
    }
    let before_fwd = f.dp.nat_fwd_entries().unwrap();
    let before_rev = f.dp.nat_rev_entries().unwrap();
    let reasons = f.reasons();
    let r = f.run(&Ipv4Packet::tcp(CLIENT, 41002, VIP, 80).build());
    assert_eq!(r.action, XDP_DROP);
    assert_eq!(
        moved(&reasons, &f.reasons()),
        std::collections::BTreeMap::from([("drop_nat_ports_exhausted", 1)])
    );
    let mut after_fwd = f.dp.nat_fwd_entries().unwrap();
    let mut after_rev = f.dp.nat_rev_entries().unwrap();
    let (mut bf, mut br) = (before_fwd, before_rev);
    for v in [&mut bf, &mut after_fwd] {
        v.sort_by_key(|(k, _)| k.src_port);
    }
    for v in [&mut br, &mut after_rev] {
        v.sort_by_key(|(k, _)| k.dst_port);
    }
    assert_eq!(bf, after_fwd, "live forward entries untouched");
    assert_eq!(br, after_rev, "live reverse entries untouched");
    // Another backend (another reverse key) still gets a port.
    f.set_backend4(1, 2, lb_common::FORWARD_NAT);
    f.set_backend_port(2, BACKEND_PORT);
    f.write_ring(1, &[(2, 1)]);
    let r = f.run(&Ipv4Packet::udp(CLIENT, 41002, VIP, 80).build());
    assert_eq!(r.action, XDP_TX);
    assert_eq!(ipv4_of(&r.frame[14 + 16..14 + 20]), backend_addr(2));
}

/// No agent (range 0/0): every new NAT flow is refused as exhausted.
#[test]
fn no_port_range_refuses_new_flows() {
    let f = nat4(&[(1, 1)], 0, 0);
    let pkt = Ipv4Packet::tcp(CLIENT, 41000, VIP, 80).build();
    lb_tests::fixture::assert_dropped(&f, &pkt, "drop_nat_ports_exhausted");
    assert!(f.dp.nat_fwd_entries().unwrap().is_empty());
}

/// An expired pair's port is taken by a new flow that wants it: the old
/// pair's entries are removed, the new flow's recorded.
#[test]
fn an_expired_pairs_port_is_reclaimed() {
    let mut f = nat4(&[(1, 1)], PORT_MIN, PORT_MIN);
    let first = f.run(&Ipv4Packet::udp(CLIENT, 41000, VIP, 80).build());
    assert_eq!(first.action, XDP_TX);
    // Still live: the one port is held.
    assert_eq!(
        f.run(&Ipv4Packet::udp(CLIENT, 41001, VIP, 80).build())
            .action,
        XDP_DROP
    );
    // Past the UDP idle timeout, the port is reclaimed.
    let mut rt = runtime(PORT_MIN, PORT_MIN);
    rt.now_ms = 1_000 + 30_001;
    f.dp.set_runtime(rt).unwrap();
    let r = f.run(&Ipv4Packet::udp(CLIENT, 41001, VIP, 80).build());
    assert_eq!(r.action, XDP_TX);
    assert_eq!(port_at(&r.frame, 14 + 20), PORT_MIN);
    let old = FlowKey::new(CLIENT.to_bits(), 41000, VIP.to_bits(), 80, IPPROTO_UDP);
    assert_eq!(f.dp.nat_fwd(&old).unwrap(), None, "the old pair is gone");
    let rev = f.dp.nat_rev_entries().unwrap();
    assert_eq!(rev.len(), 1);
    assert_eq!(u16::from_be(rev[0].1.client_port), 41001);
}

/// A SYN on a pair whose backend the ring still gives reuses it; an
/// unusable backend's flow is re-steered with a new allocation.
#[test]
fn syn_reuses_the_pair_and_an_unusable_backend_is_resteered() {
    let mut f = nat4(&[(1, 1), (2, 1)], PORT_MIN, PORT_MAX);
    let syn = Ipv4Packet::tcp(CLIENT, 42000, VIP, 80);
    let a = f.run(&syn.build());
    let key = FlowKey::new(CLIENT.to_bits(), 42000, VIP.to_bits(), 80, IPPROTO_TCP);
    let first = f.dp.nat_fwd(&key).unwrap().unwrap();
    let b = f.run(&syn.build());
    assert_eq!(a.frame, b.frame, "the same translation");
    assert_eq!(
        f.dp.nat_fwd(&key).unwrap().unwrap().snat_port,
        first.snat_port
    );
    assert_eq!(f.dp.nat_rev_entries().unwrap().len(), 1);
    // The backend goes down: the flow moves with a new pair.
    let mut be = f.dp.backend(first.backend_id).unwrap();
    be.flags &= !lb_common::BACKEND_FLAG_USABLE;
    f.dp.set_backend(first.backend_id, be).unwrap();
    let other = 3 - first.backend_id;
    f.write_ring(0, &[(other, 1)]);
    let mut ack = syn.clone();
    ack.tcp_flags = TCP_ACK;
    let c = f.run(&ack.build());
    assert_eq!(c.action, XDP_TX);
    assert_eq!(ipv4_of(&c.frame[14 + 16..14 + 20]), backend_addr(other));
    let moved_fwd = f.dp.nat_fwd(&key).unwrap().unwrap();
    assert_eq!(moved_fwd.backend_id, other);
    let rev = f.dp.nat_rev_entries().unwrap();
    assert_eq!(rev.len(), 1, "the old pair's reverse entry was released");
    assert_eq!(rev[0].1.backend_id, other);
}

/// SNAT addresses named for the VIP are used instead of the route
/// source.
#[test]
fn the_vips_snat_addresses_are_used_when_set() {
    let mut f = nat4(&[(1, 1)], PORT_MIN, PORT_MAX);
    let snat = Ipv4Addr::new(198, 18, 0, 77);
    let mut s = NatSnat::default();
    s.addrs[0][0] = snat.to_bits().to_be();
    s.count = 1;
    f.dp.set_nat_snat(0, s).unwrap();
    let r = f.run(&Ipv4Packet::tcp(CLIENT, 43000, VIP, 80).build());
    assert_eq!(r.action, XDP_TX);
    assert_eq!(ipv4_of(&r.frame[14 + 12..14 + 16]), snat);
    let key = FlowKey::new(CLIENT.to_bits(), 43000, VIP.to_bits(), 80, IPPROTO_TCP);
    let hash = key.hash();
    assert_eq!(
        port_at(&r.frame, 14 + 20),
        nat_port_candidate(hash, 0, PORT_MIN, PORT_MAX),
        "the first candidate port, as userspace predicts it"
    );
}

fn reply_v6(out: &[u8], proto: u8, payload: Vec<u8>) -> Vec<u8> {
    let ip = &out[14..];
    let a = |o: usize| Ipv6Addr::from(<[u8; 16]>::try_from(&ip[o..o + 16]).unwrap());
    let mut p = if proto == IPPROTO_TCP {
        Ipv6Packet::tcp(a(24), port_at(ip, 42), a(8), port_at(ip, 40))
    } else {
        Ipv6Packet::udp(a(24), port_at(ip, 42), a(8), port_at(ip, 40))
    };
    p.dst_mac = LB_MAC;
    p.src_mac = out[0..6].try_into().unwrap();
    p.tcp_flags = TCP_ACK;
    p.payload = payload;
    with_l4_checksum_v6(p.build())
}

#[test]
fn ipv6_flows_are_translated_both_ways_with_valid_checksums() {
    let f = nat6(&[(1, 1), (2, 1)]);
    let mut rng = Rng(0x5eed_0006);
    for i in 0..100u16 {
        let proto = if i % 2 == 0 { IPPROTO_TCP } else { IPPROTO_UDP };
        let mut p = if proto == IPPROTO_TCP {
            Ipv6Packet::tcp(CLIENT6, 20000 + i, VIP6, 80)
        } else {
            Ipv6Packet::udp(CLIENT6, 20000 + i, VIP6, 80)
        };
        p.payload = rng.sized(1200);
        let pkt = with_l4_checksum_v6(p.build());
        let r = f.run(&pkt);
        assert_eq!(r.action, XDP_TX, "{i}");
        let ip = &r.frame[14..];
        let key = FlowKey6::new(CLIENT6, 20000 + i, VIP6, 80, proto);
        let fwd = f.dp.nat_fwd6(&key).unwrap().expect("forward entry");
        assert_eq!(&ip[8..24], &ENCAP_SRC6.octets());
        assert_eq!(
            &ip[24..40],
            &backend_addr6(fwd.backend_id % UDP_IDS).octets()
        );
        assert_eq!(port_at(ip, 40), u16::from_be(fwd.snat_port));
        assert_eq!(port_at(ip, 42), BACKEND_PORT);
        assert_eq!(ip[7], 64, "hop limit untouched");
        assert_v6_checksums(&r.frame, &format!("forward {i}"));
        let reply = reply_v6(&r.frame, proto, rng.sized(1200));
        let rkey = FlowKey6::new(
            backend_addr6(fwd.backend_id % UDP_IDS),
            BACKEND_PORT,
            ENCAP_SRC6,
            u16::from_be(fwd.snat_port),
            proto,
        );
        assert!(
            f.dp.nat_rev6(&rkey).unwrap().is_some(),
            "{i}: reverse entry"
        );
        let back = f.run(&reply);
        assert_eq!(back.action, XDP_TX, "{i}");
        let ip = &back.frame[14..];
        assert_eq!(&ip[8..24], &VIP6.octets());
        assert_eq!(&ip[24..40], &CLIENT6.octets());
        assert_eq!((port_at(ip, 40), port_at(ip, 42)), (80, 20000 + i));
        assert_eq!(&back.frame[0..6], &CLIENT_MAC);
        assert_v6_checksums(&back.frame, &format!("return {i}"));
    }
    let s = f.dp.vip_stats(0).unwrap();
    assert_eq!((s.new_flows, s.return_packets), (50, 50));
}

const ROUTER: Ipv4Addr = Ipv4Addr::new(198, 18, 5, 1);
const ROUTER_MAC: [u8; 6] = [0x02, 0, 0, 0, 0, 0x99];

/// An ICMP error from `src` to `dst` (arriving from `src_mac` at lb)
/// quoting `quoted`.
fn icmp_error4(
    src: Ipv4Addr,
    dst: Ipv4Addr,
    src_mac: [u8; 6],
    kind: (u8, u8),
    quoted: &[u8],
) -> Vec<u8> {
    let mut base = Ipv4Packet::tcp(src, 0, dst, 0);
    base.src_mac = src_mac;
    base.dst_mac = LB_IN_MAC;
    lb_tests::packet::icmp4(base, kind.0, kind.1, [0, 0, 0x05, 0xdc], quoted)
}

/// The outer IPv4 header's and the ICMP message's checksums verify; the
/// quoted packet, returned.
fn icmp4_checked(frame: &[u8], what: &str) -> Vec<u8> {
    let ip = &frame[14..];
    assert_eq!(checksum(&ip[..20]), 0, "{what}: outer IPv4 checksum");
    assert_eq!(checksum(&ip[20..]), 0, "{what}: ICMP checksum");
    ip[28..].to_vec()
}

/// ICMP errors about a NAT flow from the backend's side (a router's
/// "fragmentation needed", the backend's own "port unreachable") reach
/// the client quoting exactly what the client sent, from the router or
/// the VIP (never the backend); every checksum verifies.
#[test]
fn icmp_errors_from_the_backend_side_are_translated_back_to_the_client() {
    let f = nat4(&[(1, 1)], PORT_MIN, PORT_MAX);
    let mut p = Ipv4Packet::udp(CLIENT, 50000, VIP, 80);
    p.payload = b"some datagram payload".to_vec();
    let sent = with_l4_checksum_v4(p.build());
    let t = f.run(&sent);
    assert_eq!(t.action, XDP_TX);
    let backend = ipv4_of(&t.frame[14 + 16..14 + 20]);
    for (src, kind, from) in [
        (ROUTER, (3, 4), ROUTER),
        (backend, (3, 3), VIP),
        (ROUTER, (11, 0), ROUTER),
    ] {
        let err = icmp_error4(src, ENCAP_SRC, ROUTER_MAC, kind, &t.frame[14..]);
        let before = f.reasons();
        let r = f.run(&err);
        assert_eq!(r.action, XDP_TX, "{kind:?}");
        assert_eq!(
            moved(&before, &f.reasons()),
            std::collections::BTreeMap::from([("fwd_icmp_error", 1)])
        );
        assert_eq!(&r.frame[0..6], &CLIENT_MAC);
        assert_eq!(&r.frame[6..12], &LB_IN_MAC);
        assert_eq!(
            ipv4_of(&r.frame[14 + 12..14 + 16]),
            from,
            "{kind:?}: outer source"
        );
        assert_eq!(ipv4_of(&r.frame[14 + 16..14 + 20]), CLIENT);
        let quoted = icmp4_checked(&r.frame, "backend side");
        assert_eq!(
            quoted,
            sent[14..],
            "{kind:?}: the client's own packet, checksums included"
        );
    }
    // A TCP flow, quoted with 8 bytes of TCP only (no checksum in them).
    let syn = Ipv4Packet::tcp(CLIENT, 50001, VIP, 80).build();
    let t = f.run(&syn);
    let err = icmp_error4(ROUTER, ENCAP_SRC, ROUTER_MAC, (3, 4), &t.frame[14..14 + 28]);
    let r = f.run(&err);
    assert_eq!(r.action, XDP_TX);
    assert_eq!(icmp4_checked(&r.frame, "tcp 8 bytes"), syn[14..14 + 28]);
    // No NAT flow behind the quoted port: passed untouched.
    let mut other = t.frame[14..14 + 28].to_vec();
    other[20..22].copy_from_slice(&(PORT_MAX - 1).to_be_bytes());
    let err = icmp_error4(ROUTER, ENCAP_SRC, ROUTER_MAC, (3, 4), &other);
    assert_passed_untouched(&f, &err, "pass_nat_no_flow");
}

/// An ICMP error about a NAT flow from the client's side (to the VIP,
/// quoting what the client got) reaches the backend from the SNAT
/// address, quoting exactly what the backend sent.
#[test]
fn icmp_errors_from_the_client_side_are_translated_to_the_backend() {
    let f = nat4(&[(1, 1)], PORT_MIN, PORT_MAX);
    let mut p = Ipv4Packet::udp(CLIENT, 50002, VIP, 80);
    p.payload = b"request".to_vec();
    let t = f.run(&with_l4_checksum_v4(p.build()));
    let reply = reply_v4(&t.frame, IPPROTO_UDP, b"a long answer".to_vec());
    let back = f.run(&reply);
    assert_eq!(back.action, XDP_TX);
    for kind in [(3, 4), (11, 0)] {
        let err = icmp_error4(ROUTER, VIP, ROUTER_MAC, kind, &back.frame[14..]);
        let r = f.run(&err);
        assert_eq!(r.action, XDP_TX, "{kind:?}");
        assert_eq!(&r.frame[0..6], &backend_mac(1));
        assert_eq!(&r.frame[6..12], &LB_MAC);
        assert_eq!(ipv4_of(&r.frame[14 + 12..14 + 16]), ENCAP_SRC);
        assert_eq!(ipv4_of(&r.frame[14 + 16..14 + 20]), backend_addr(1));
        let quoted = icmp4_checked(&r.frame, "client side");
        assert_eq!(quoted, reply[14..], "{kind:?}: the backend's own packet");
    }
    // An error about a flow lb has no NAT entry for passes as before.
    let mut stray = back.frame[14..14 + 28].to_vec();
    stray[22..24].copy_from_slice(&1234u16.to_be_bytes());
    let err = icmp_error4(ROUTER, VIP, ROUTER_MAC, (3, 4), &stray);
    assert_passed_untouched(&f, &err, "pass_not_vip");
}

/// IPv6: "packet too big" both ways, ICMPv6 checksum (with its
/// pseudo-header) verified from scratch.
#[test]
fn icmpv6_errors_are_translated_both_ways() {
    use lb_tests::packet::{ETH_P_IPV6, ethernet_frame, icmpv6_checksum, icmpv6_l3};
    let f = nat6(&[(1, 1)]);
    let router = Ipv6Addr::new(0x2001, 2, 0, 5, 0, 0, 0, 1);
    let mut p = Ipv6Packet::udp(CLIENT6, 50000, VIP6, 80);
    p.payload = b"datagram".to_vec();
    let sent = with_l4_checksum_v6(p.build());
    let t = f.run(&sent);
    assert_eq!(t.action, XDP_TX);
    let addr = |b: &[u8]| Ipv6Addr::from(<[u8; 16]>::try_from(b).unwrap());
    let err6 = |src: Ipv6Addr, dst: Ipv6Addr, kind: (u8, u8), quoted: &[u8]| {
        ethernet_frame(
            LB_IN_MAC,
            ROUTER_MAC,
            None,
            ETH_P_IPV6,
            &icmpv6_l3(src, dst, kind.0, kind.1, [0, 0, 0x05, 0x00], quoted),
        )
    };
    let checked = |frame: &[u8]| {
        let ip = &frame[14..];
        assert_eq!(
            icmpv6_checksum(addr(&ip[8..24]), addr(&ip[24..40]), &ip[40..]),
            0
        );
        ip[48..].to_vec()
    };
    let backend = addr(&t.frame[14 + 24..14 + 40]);
    for (src, kind, from) in [
        (router, (2, 0), router),
        (backend, (1, 4), VIP6),
        (router, (3, 0), router),
    ] {
        let r = f.run(&err6(src, ENCAP_SRC6, kind, &t.frame[14..]));
        assert_eq!(r.action, XDP_TX, "{kind:?}");
        assert_eq!(&r.frame[0..6], &CLIENT_MAC);
        assert_eq!(addr(&r.frame[14 + 8..14 + 24]), from);
        assert_eq!(addr(&r.frame[14 + 24..14 + 40]), CLIENT6);
        assert_eq!(checked(&r.frame), sent[14..], "{kind:?}");
    }
    let reply = reply_v6(&t.frame, IPPROTO_UDP, b"answer".to_vec());
    let back = f.run(&reply);
    let r = f.run(&err6(router, VIP6, (2, 0), &back.frame[14..]));
    assert_eq!(r.action, XDP_TX);
    assert_eq!(&r.frame[0..6], &backend_mac(1));
    assert_eq!(addr(&r.frame[14 + 8..14 + 24]), ENCAP_SRC6);
    assert_eq!(addr(&r.frame[14 + 24..14 + 40]), backend);
    assert_eq!(checked(&r.frame), reply[14..]);
}

/// Every truncation of a NAT VIP's frame (IPv4 and IPv6): never aborted,
/// short ones passed or dropped with the parsing reasons, the whole frame
/// translated (NAT adds no bytes).
#[test]
fn truncated_nat_frames_are_handled() {
    let f = nat4(&[(1, 1)], PORT_MIN, PORT_MAX);
    let mut p = Ipv4Packet::tcp(CLIENT, 51000, VIP, 80);
    p.payload = b"payload".to_vec();
    lb_tests::fixture::assert_truncations_handled(&f, &p.build(), 14, 20, 0, "nat v4");
    let f = nat6(&[(1, 1)]);
    let mut p = Ipv6Packet::udp(CLIENT6, 51000, VIP6, 80);
    p.payload = b"payload".to_vec();
    lb_tests::fixture::assert_truncations_handled(&f, &p.build(), 14, 40, 0, "nat v6");
}

/// NAT maps full: a new flow is refused and counted
/// (`drop_nat_table_full`), no half pair left behind, the live pairs
/// untouched and still translated.
#[test]
fn a_full_nat_table_refuses_new_flows_and_leaves_no_half_pair() {
    let mut f = Fixture::with_sizes(lb::datapath::MapSizes {
        max_vips: 4,
        max_backends: 64,
        ring_size: lb_common::DEFAULT_RING_SIZE,
        conntrack_entries: 1 << 10,
        conntrack6_entries: 1 << 10,
        nat_entries: 2,
        acl_entries: 1024,
    });
    f.add_nat_vip(0, (VIP, 80, IPPROTO_TCP), &[(1, 1)], BACKEND_PORT);
    f.dp.set_runtime(runtime(PORT_MIN, PORT_MAX)).unwrap();
    for port in [44000, 44001] {
        assert_eq!(
            f.run(&Ipv4Packet::tcp(CLIENT, port, VIP, 80).build())
                .action,
            XDP_TX
        );
    }
    let pkt = Ipv4Packet::tcp(CLIENT, 44002, VIP, 80).build();
    lb_tests::fixture::assert_dropped(&f, &pkt, "drop_nat_table_full");
    assert_eq!(f.dp.nat_fwd_entries().unwrap().len(), 2);
    assert_eq!(f.dp.nat_rev_entries().unwrap().len(), 2);
    let mut ack = Ipv4Packet::tcp(CLIENT, 44000, VIP, 80);
    ack.tcp_flags = TCP_ACK;
    assert_eq!(f.run(&ack.build()).action, XDP_TX);
}

// The NAT caches (NAT_FWD_CACHE, NAT_REV_CACHE in front of NAT_FWD and
// NAT_REV): a flow's packets are served from a cache slot until the
// agent clears the caches (once per tick of the flow clock; the tests
// clear them as the keeper does, with `clear_flow_cache`).

const TCP_FIN: u8 = 0x01;

/// The translated addresses and ports of an IPv4 frame (bytes 12..24 of
/// its IP header, no options).
fn tuple_of(frame: &[u8]) -> Vec<u8> {
    frame[14 + 12..14 + 24].to_vec()
}

/// Forward and reply frames of one established TCP flow from client port
/// `port`: (ACK, reply, forward key, reverse key, the SYN's translation).
fn established(f: &Fixture, port: u16) -> (Vec<u8>, Vec<u8>, FlowKey, FlowKey, Vec<u8>) {
    let mut p = Ipv4Packet::tcp(CLIENT, port, VIP, 80);
    let syn = f.run(&with_l4_checksum_v4(p.build()));
    assert_eq!(syn.action, XDP_TX, "{port}: SYN");
    p.tcp_flags = TCP_ACK;
    p.payload = format!("ping {port}").into_bytes();
    let ack = with_l4_checksum_v4(p.build());
    let key = FlowKey::new(CLIENT.to_bits(), port, VIP.to_bits(), 80, IPPROTO_TCP);
    let fwd = f.dp.nat_fwd(&key).unwrap().expect("forward entry");
    let rkey = FlowKey::new(
        backend_addr(fwd.backend_id).to_bits(),
        BACKEND_PORT,
        ENCAP_SRC.to_bits(),
        u16::from_be(fwd.snat_port),
        IPPROTO_TCP,
    );
    let reply = reply_v4(&syn.frame, IPPROTO_TCP, format!("pong {port}").into_bytes());
    (ack, reply, key, rkey, tuple_of(&syn.frame))
}

/// Runs `ack` and `reply` of the flow from client port `port` and checks
/// both translations: forward to `want_fwd` (the SYN's), back to
/// VIP:80 → the client's port.
fn assert_translated(f: &Fixture, ack: &[u8], reply: &[u8], want_fwd: &[u8], port: u16) {
    let r = f.run(ack);
    assert_eq!(r.action, XDP_TX, "{port}: forward");
    assert_eq!(tuple_of(&r.frame), want_fwd, "{port}: forward translation");
    assert_v4_checksums(&r.frame, "forward");
    let b = f.run(reply);
    assert_eq!(b.action, XDP_TX, "{port}: return");
    let ip = &b.frame[14..];
    assert_eq!(ipv4_of(&ip[12..16]), VIP, "{port}");
    assert_eq!(ipv4_of(&ip[16..20]), CLIENT, "{port}");
    assert_eq!((port_at(ip, 20), port_at(ip, 22)), (80, port), "{port}");
    assert_eq!(&b.frame[0..6], &CLIENT_MAC);
    assert_v4_checksums(&b.frame, "return");
}

/// A cache hit leaves the map entry alone (its `last_seen_ms` stays put
/// while the clock moves); after each clear (a tick) the flow's first
/// packet in each direction goes through the map and refreshes it, then
/// the cache serves again. The translation is the same throughout.
#[test]
fn cached_nat_flows_refresh_their_entries_once_per_tick_and_survive_clears() {
    let mut f = nat4(&[(1, 1), (2, 1), (3, 1)], PORT_MIN, PORT_MAX);
    let (ack, reply, key, rkey, want) = established(&f, 43000);
    let seen = |f: &Fixture| {
        (
            f.dp.nat_fwd(&key).unwrap().unwrap().last_seen_ms,
            f.dp.nat_rev(&rkey).unwrap().unwrap().last_seen_ms,
        )
    };
    assert_eq!(seen(&f), (1_000, 1_000));
    let mut rounds = 0;
    for now in [2_000u64, 3_000, 4_000] {
        let mut rt = runtime(PORT_MIN, PORT_MAX);
        rt.now_ms = now;
        f.dp.set_runtime(rt).unwrap();
        let before = seen(&f);
        for _ in 0..3 {
            assert_translated(&f, &ack, &reply, &want, 43000);
            rounds += 1;
        }
        assert_eq!(seen(&f), before, "{now}: served from the caches");
        // The keeper's tick.
        f.dp.clear_flow_cache().unwrap();
        for _ in 0..3 {
            assert_translated(&f, &ack, &reply, &want, 43000);
            rounds += 1;
        }
        assert_eq!(seen(&f), (now, now), "{now}: refreshed after the clear");
    }
    let s = f.dp.vip_stats(0).unwrap();
    assert_eq!(
        (s.new_flows, s.conntrack_hits, s.return_packets),
        (1, rounds, rounds)
    );
    assert_eq!(f.dp.nat_fwd_entries().unwrap().len(), 1);
}

/// A FIN (or RST) bypasses the caches: the map entry of each direction
/// learns the flow is closing even though the flow's other packets are
/// served from the caches.
#[test]
fn a_fin_through_a_cached_nat_flow_marks_its_entries_closing() {
    use lb_common::FLOW_FLAG_CLOSING;
    let f = nat4(&[(1, 1), (2, 1)], PORT_MIN, PORT_MAX);
    let (ack, reply, key, rkey, want) = established(&f, 43100);
    assert_translated(&f, &ack, &reply, &want, 43100);
    assert_eq!(f.dp.nat_fwd(&key).unwrap().unwrap().flags, 0);
    let mut fin = Ipv4Packet::tcp(CLIENT, 43100, VIP, 80);
    fin.tcp_flags = TCP_FIN | TCP_ACK;
    let r = f.run(&with_l4_checksum_v4(fin.build()));
    assert_eq!(r.action, XDP_TX);
    assert_eq!(tuple_of(&r.frame), want);
    assert_eq!(
        f.dp.nat_fwd(&key).unwrap().unwrap().flags & FLOW_FLAG_CLOSING,
        FLOW_FLAG_CLOSING,
        "forward entry closing"
    );
    assert_eq!(f.dp.nat_rev(&rkey).unwrap().unwrap().flags, 0);
    let mut rfin = reply.clone();
    rfin[14 + 20 + 13] |= TCP_FIN;
    rfin[14 + 20 + 16..14 + 20 + 18].fill(0);
    let rfin = with_l4_checksum_v4(rfin);
    let b = f.run(&rfin);
    assert_eq!(b.action, XDP_TX);
    assert_eq!(port_at(&b.frame, 14 + 22), 43100);
    assert_eq!(
        f.dp.nat_rev(&rkey).unwrap().unwrap().flags & FLOW_FLAG_CLOSING,
        FLOW_FLAG_CLOSING,
        "reverse entry closing"
    );
}

/// Two flows whose forward keys share a cache slot, and two whose reply
/// keys do, take turns: each keeps its own translation. A copy in a slot
/// is used only if its check word matches all of it: a torn copy (this
/// flow's key, another flow's values) is refused and the map answers; a
/// consistent copy is used (what the check alone guards against).
#[test]
fn nat_flows_sharing_a_cache_slot_keep_their_own_translation() {
    use lb_common::{
        flow_cache_mix, flow_cache_slot,
        nat::{NatFwdCache, NatRevCache, nat_cache_key4},
    };
    let mut f = nat4(&[(1, 1), (2, 1), (3, 1)], PORT_MIN, PORT_MAX);
    let slot = |k: &FlowKey| flow_cache_slot(flow_cache_mix(k));
    let flows: Vec<_> = (0..400u16)
        .map(|i| (20000 + i, established(&f, 20000 + i)))
        .collect();
    // Forward keys of one client differ in the source port only, which
    // the mix spreads: search the ports for one sharing 20000's slot.
    let key_of = |port| FlowKey::new(CLIENT.to_bits(), port, VIP.to_bits(), 80, IPPROTO_TCP);
    let partner = (21000..=65535u16)
        .find(|&p| slot(&key_of(p)) == slot(&key_of(20000)))
        .expect("a source port sharing the slot");
    let fb = &(partner, established(&f, partner));
    let fa = &flows[0];
    let rev_pair = flows.iter().enumerate().find_map(|(i, a)| {
        flows[i + 1..]
            .iter()
            .find(|b| slot(&a.1.3) == slot(&b.1.3))
            .map(|b| (a, b))
    });
    let (ra, rb) = rev_pair.expect("two reply keys in one slot among 400");
    for _ in 0..3 {
        for (port, (ack, reply, _, _, want)) in [fa, fb, ra, rb] {
            assert_translated(&f, ack, reply, want, *port);
        }
    }

    // The reply slot now holds rb's copy (it went last).
    let (a_port, (a_ack, a_reply, _, a_rkey, a_want)) = ra;
    let (b_port, (_, _, _, b_rkey, _)) = rb;
    let rs = slot(a_rkey);
    let held = f.dp.nat_rev_cache(rs).unwrap();
    assert_eq!(
        held.key,
        nat_cache_key4(b_rkey),
        "the slot caches the last reply key"
    );
    assert_eq!(u16::from_be(held.client_port), *b_port);
    // a's key with b's client: torn (b's check), then a's own check.
    let torn = NatRevCache {
        key: nat_cache_key4(a_rkey),
        ..held
    };
    f.dp.set_nat_rev_cache(rs, torn).unwrap();
    assert_translated(&f, a_ack, a_reply, a_want, *a_port);
    let own = f.dp.nat_rev_cache(rs).unwrap();
    assert_eq!(own.key, nat_cache_key4(a_rkey), "re-cached by the map pass");
    assert_eq!(u16::from_be(own.client_port), *a_port);
    let torn = NatRevCache {
        client_port: (*b_port).to_be(),
        ..own
    };
    f.dp.set_nat_rev_cache(rs, torn).unwrap();
    assert_translated(&f, a_ack, a_reply, a_want, *a_port);
    // A consistent copy is believed: the check word is what refuses a
    // torn one.
    f.dp.set_nat_rev_cache(rs, torn.sealed()).unwrap();
    let b = f.run(a_reply);
    assert_eq!(port_at(&b.frame, 14 + 22), *b_port);

    // The forward slot: a's key with b's values, b's or a's check.
    let (a_port, (a_ack, a_reply, a_key, _, a_want)) = fa;
    let fs = slot(a_key);
    f.dp.clear_flow_cache().unwrap();
    assert_translated(&f, a_ack, a_reply, a_want, *a_port);
    let own = f.dp.nat_fwd_cache(fs).unwrap();
    assert_eq!(own.key, nat_cache_key4(a_key));
    let (_, (b_ack, _, _, _, _)) = fb;
    let b_out = f.run(b_ack);
    let b_snat_port = port_at(&b_out.frame, 14 + 20);
    assert_ne!(b_snat_port, port_at(a_want, 8));
    let torn = NatFwdCache {
        snat_port: b_snat_port.to_be(),
        ..own
    };
    f.dp.set_nat_fwd_cache(fs, torn).unwrap();
    assert_translated(&f, a_ack, a_reply, a_want, *a_port);
}

/// IPv6: the same caches (NAT_FWD_CACHE6, NAT_REV_CACHE6, consulted by
/// the NAT subprogram): hits leave the map entries alone, the keeper's
/// clear lets the next packet of each direction refresh them, and the
/// translation holds throughout.
#[test]
fn cached_ipv6_nat_flows_refresh_their_entries_once_per_tick() {
    let mut f = nat6(&[(1, 1), (2, 1)]);
    let mut p = Ipv6Packet::tcp(CLIENT6, 44000, VIP6, 80);
    let syn = f.run(&with_l4_checksum_v6(p.build()));
    assert_eq!(syn.action, XDP_TX);
    p.tcp_flags = TCP_ACK;
    p.payload = b"ping".to_vec();
    let ack = with_l4_checksum_v6(p.build());
    let reply = reply_v6(&syn.frame, IPPROTO_TCP, b"pong".to_vec());
    let key = FlowKey6::new(CLIENT6, 44000, VIP6, 80, IPPROTO_TCP);
    let fwd = f.dp.nat_fwd6(&key).unwrap().expect("forward entry");
    let rkey = FlowKey6::new(
        backend_addr6(fwd.backend_id),
        BACKEND_PORT,
        ENCAP_SRC6,
        u16::from_be(fwd.snat_port),
        IPPROTO_TCP,
    );
    let seen = |f: &Fixture| {
        (
            f.dp.nat_fwd6(&key).unwrap().unwrap().last_seen_ms,
            f.dp.nat_rev6(&rkey).unwrap().unwrap().last_seen_ms,
        )
    };
    let both = |f: &Fixture| {
        let r = f.run(&ack);
        assert_eq!(r.action, XDP_TX);
        assert_eq!(&r.frame[14 + 8..14 + 44], &syn.frame[14 + 8..14 + 44]);
        assert_v6_checksums(&r.frame, "forward");
        let b = f.run(&reply);
        assert_eq!(b.action, XDP_TX);
        let ip = &b.frame[14..];
        assert_eq!(&ip[8..24], &VIP6.octets());
        assert_eq!(&ip[24..40], &CLIENT6.octets());
        assert_eq!((port_at(ip, 40), port_at(ip, 42)), (80, 44000));
        assert_v6_checksums(&b.frame, "return");
    };
    let mut rt = runtime(PORT_MIN, PORT_MAX);
    rt.now_ms = 2_000;
    f.dp.set_runtime(rt).unwrap();
    both(&f);
    both(&f);
    assert_eq!(seen(&f), (1_000, 1_000), "served from the caches");
    f.dp.clear_flow_cache().unwrap();
    both(&f);
    assert_eq!(seen(&f), (2_000, 2_000), "refreshed after the clear");
    rt.now_ms = 3_000;
    f.dp.set_runtime(rt).unwrap();
    both(&f);
    assert_eq!(seen(&f), (2_000, 2_000), "cached again");
}
