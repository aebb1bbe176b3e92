//! Tunnels with an outer IPv6 header at packet level: 6in6 and GUE over
//! IPv6 for IPv6 VIPs, 4in6 and GUE over IPv6 for IPv4 VIPs' IPv6
//! backends; every outer field, new flows and conntrack hits, VLAN,
//! truncations; what lb-decap makes of the frames; the ICMPv6 "packet too
//! big" answer; ICMPv6 echo to a VIP; "packet too big" about a VIP's flow
//! steered to its backend.

use std::{
    collections::BTreeMap,
    net::{Ipv4Addr, Ipv6Addr},
};

use lb::decap::{Cidr, DecapProgram, Settings};
use lb_common::{
    FORWARD_DSR_L2, FORWARD_GUE, FORWARD_IPIP, FlowKey, FlowKey6, IPPROTO_TCP, Runtime,
    gue_source_port, ipv6_flow_label,
};
use lb_tests::{
    fixture::{
        ENCAP_SRC6, Fixture, GUE_PORT, LB_MAC, XDP_DROP, XDP_PASS, XDP_TX, assert_passed_untouched,
        assert_truncations_handled, backend_addr6, backend_mac, backend_of_mac, moved, run_xdp,
    },
    packet::{
        IPPROTO_ICMPV6, Ipv4Packet, Ipv6Packet, TCP_ACK, TCP_SYN, ether_type_of, ethernet_frame,
        icmpv6_checksum, icmpv6_l3, icmpv6_neighbor_solicitation,
    },
};

const VIP6: Ipv6Addr = Ipv6Addr::new(0x2001, 2, 0, 10, 0, 0, 0, 1);
const CLIENT6: Ipv6Addr = Ipv6Addr::new(0x2001, 2, 0, 5, 0, 0, 0, 1);
const ROUTER6: Ipv6Addr = Ipv6Addr::new(0x2001, 2, 0, 5, 0, 0, 0, 0xfe);
const OTHER6: Ipv6Addr = Ipv6Addr::new(0x2001, 2, 0, 11, 0, 0, 0, 1);
const VIP4: Ipv4Addr = Ipv4Addr::new(198, 18, 10, 1);
const CLIENT4: Ipv4Addr = Ipv4Addr::new(198, 18, 0, 2);
const CLIENT_MAC: [u8; 6] = [0x02, 0, 0, 0, 0, 0x02];
const ROUTER_MAC: [u8; 6] = [0x02, 0, 0, 0, 0, 0x01];
const BACKENDS: [(u32, u32); 3] = [(1, 1), (2, 1), (3, 1)];

fn v6_vip(mode: u8) -> Fixture {
    let mut f = Fixture::new();
    f.add_vip6(0, (VIP6, 80, IPPROTO_TCP), &BACKENDS, mode);
    f
}

fn v4_vip_v6_backends(mode: u8) -> Fixture {
    let mut f = Fixture::new();
    f.add_vip_forwarding_v6_backends(0, (VIP4, 80, IPPROTO_TCP), &BACKENDS, mode);
    f
}

fn be16(b: &[u8], at: usize) -> u16 {
    u16::from_be_bytes([b[at], b[at + 1]])
}

fn addr6(b: &[u8], at: usize) -> Ipv6Addr {
    Ipv6Addr::from(<[u8; 16]>::try_from(&b[at..at + 16]).unwrap())
}

fn l2_len(vlan: Option<u16>) -> usize {
    if vlan.is_some() { 18 } else { 14 }
}

fn limit(f: &mut Fixture, mtu: u32) {
    f.dp.set_runtime(Runtime {
        max_l3_len: mtu,
        ..Runtime::default()
    })
    .unwrap();
}

/// Sets the traffic class of the IPv6 packet at `l3` and a flow label of
/// its own (which lb must not copy outside).
fn set_tclass(frame: &mut [u8], l3: usize, tclass: u8) {
    frame[l3] = 0x60 | tclass >> 4;
    frame[l3 + 1] = (tclass & 0x0F) << 4 | 0x0A;
    frame[l3 + 2] = 0xBC;
    frame[l3 + 3] = 0xDE;
}

/// Checks the Ethernet header of an encapsulated frame (to backend `id`,
/// tagged `vlan` like the input, EtherType IPv6) and returns where the
/// outer IPv6 header starts.
fn check_l2(out: &[u8], id: u32, vlan: Option<u16>) -> usize {
    assert_eq!(&out[0..6], &backend_mac(id), "dst MAC: the next hop's");
    assert_eq!(&out[6..12], &LB_MAC, "src MAC: the egress interface's");
    let l3 = l2_len(vlan);
    if let Some(vid) = vlan {
        assert_eq!(be16(out, 12), 0x8100, "the VLAN tag is kept");
        assert_eq!(be16(out, 14) & 0x0FFF, vid);
    }
    assert_eq!(be16(out, l3 - 2), 0x86DD, "EtherType IPv6");
    l3
}

/// Checks every field of the outer IPv6 header at `at`: traffic class
/// `tclass`, flow label from `hash`, payload length `inner_len + extra`,
/// `next` header, hop limit 64, source ENCAP_SRC6; returns the backend id
/// its destination names.
fn check_outer_ipv6(
    out: &[u8],
    at: usize,
    tclass: u8,
    hash: u32,
    next: u8,
    inner_len: usize,
    extra: usize,
) -> u32 {
    let h = &out[at..at + 40];
    let word = u32::from_be_bytes([h[0], h[1], h[2], h[3]]);
    assert_eq!(word >> 28, 6, "version 6");
    assert_eq!(
        (word >> 20) as u8,
        tclass,
        "traffic class copied from inside"
    );
    assert_eq!(
        word & 0xF_FFFF,
        ipv6_flow_label(hash),
        "flow label from the flow hash"
    );
    assert_ne!(word & 0xF_FFFF, 0xA_BCDE, "not the inner flow label");
    assert_eq!(be16(h, 4) as usize, inner_len + extra, "payload length");
    assert_eq!(h[6], next, "next header");
    assert_eq!(h[7], 64, "hop limit");
    assert_eq!(addr6(h, 8), ENCAP_SRC6, "outer source: the backend entry's");
    let dst = addr6(h, 24);
    (1..=3)
        .find(|&id| backend_addr6(id) == dst)
        .unwrap_or_else(|| panic!("outer destination {dst} is no backend"))
}

fn flow6(port: u16) -> FlowKey6 {
    FlowKey6::new(CLIENT6, port, VIP6, 80, IPPROTO_TCP)
}

fn flow4(port: u16) -> FlowKey {
    FlowKey::new(CLIENT4.to_bits(), port, VIP4.to_bits(), 80, IPPROTO_TCP)
}

/// An IPv6 TCP segment to the VIP (`tclass` set, a flow label inside).
fn segment6(port: u16, vlan: Option<u16>, tclass: u8, flags: u8, payload: usize) -> Vec<u8> {
    let mut p = Ipv6Packet::tcp(CLIENT6, port, VIP6, 80);
    p.vlan = vlan;
    p.tcp_flags = flags;
    p.dst_mac = ROUTER_MAC;
    p.src_mac = CLIENT_MAC;
    p.payload = (0..payload).map(|i| (i * 7) as u8).collect();
    let mut f = p.build();
    set_tclass(&mut f, l2_len(vlan), tclass);
    f
}

fn segment4(port: u16, vlan: Option<u16>, tos: u8, flags: u8, payload: usize) -> Vec<u8> {
    let mut p = Ipv4Packet::tcp(CLIENT4, port, VIP4, 80);
    p.vlan = vlan;
    p.tos = tos;
    p.tcp_flags = flags;
    p.payload = (0..payload).map(|i| (i * 7) as u8).collect();
    p.build()
}

/// One mode of the outer IPv6 header: which VIP family, the fixture, the
/// next header and the bytes lb adds.
struct Case {
    name: &'static str,
    mode: u8,
    v6_vip: bool,
}

const CASES: [Case; 4] = [
    Case {
        name: "6in6",
        mode: FORWARD_IPIP,
        v6_vip: true,
    },
    Case {
        name: "4in6",
        mode: FORWARD_IPIP,
        v6_vip: false,
    },
    Case {
        name: "gue 6 over 6",
        mode: FORWARD_GUE,
        v6_vip: true,
    },
    Case {
        name: "gue 4 over 6",
        mode: FORWARD_GUE,
        v6_vip: false,
    },
];

impl Case {
    fn fixture(&self) -> Fixture {
        if self.v6_vip {
            v6_vip(self.mode)
        } else {
            v4_vip_v6_backends(self.mode)
        }
    }

    fn segment(&self, port: u16, vlan: Option<u16>, tclass: u8, flags: u8) -> Vec<u8> {
        if self.v6_vip {
            segment6(port, vlan, tclass, flags, 10)
        } else {
            segment4(port, vlan, tclass, flags, 10)
        }
    }

    fn hash(&self, port: u16) -> u32 {
        if self.v6_vip {
            flow6(port).hash()
        } else {
            flow4(port).hash()
        }
    }

    fn tracked(&self, f: &Fixture, port: u16) -> Option<u32> {
        if self.v6_vip {
            f.dp.conntrack6_lookup(&flow6(port)).unwrap()
        } else {
            f.dp.conntrack_lookup(&flow4(port)).unwrap()
        }
        .map(|e| e.backend_id)
    }

    fn overhead(&self) -> usize {
        if self.mode == FORWARD_GUE { 48 } else { 40 }
    }

    /// The outer next header, and the bytes between the outer IPv6 header
    /// and the inner packet.
    fn next_and_extra(&self) -> (u8, usize) {
        match (self.mode, self.v6_vip) {
            (FORWARD_GUE, _) => (17, 8),
            (_, true) => (41, 0),
            _ => (4, 0),
        }
    }

    /// Checks the encapsulated `out` of `frame` (flow from source port
    /// `port`) field by field; returns the backend id.
    fn check(&self, out: &[u8], frame: &[u8], port: u16, vlan: Option<u16>, tclass: u8) -> u32 {
        let name = self.name;
        assert_eq!(out.len(), frame.len() + self.overhead(), "{name}");
        let id = backend_of_mac(out).expect("a backend's MAC");
        let l3 = check_l2(out, id, vlan);
        let inner = &frame[l2_len(vlan)..];
        let (next, extra) = self.next_and_extra();
        let hash = self.hash(port);
        assert_eq!(
            check_outer_ipv6(out, l3, tclass, hash, next, inner.len(), extra),
            id,
            "{name}: the outer destination is the chosen backend's address"
        );
        if extra == 8 {
            let udp = &out[l3 + 40..l3 + 48];
            assert_eq!(be16(udp, 0), gue_source_port(hash), "{name}: source port");
            assert_eq!(be16(udp, 2), GUE_PORT, "{name}: the VIP's GUE port");
            assert_eq!(be16(udp, 4) as usize, inner.len() + 8, "{name}: UDP length");
            assert_eq!(be16(udp, 6), 0, "{name}: zero UDP checksum (RFC 6935)");
        }
        assert_eq!(
            &out[l3 + 40 + extra..],
            inner,
            "{name}: inner packet untouched"
        );
        id
    }
}

#[test]
fn each_ipv6_tunnel_pushes_an_exact_outer_header_for_new_flows_and_hits() {
    for case in &CASES {
        let f = case.fixture();
        let mut labels = std::collections::BTreeSet::new();
        for (port, vlan, tclass) in [
            (40000, None, 0),
            (40001, Some(42), 0xB8),
            (40002, None, 0x11),
            (40003, Some(7), 0x02),
        ] {
            let syn = case.segment(port, vlan, tclass, TCP_SYN);
            let r = f.run(&syn);
            assert_eq!(r.action, XDP_TX, "{}", case.name);
            let id = case.check(&r.frame, &syn, port, vlan, tclass);
            assert_eq!(case.tracked(&f, port), Some(id), "the ring's choice");
            let l3 = l2_len(vlan);
            labels.insert(be16(&r.frame, l3 + 2));

            // The flow's next packet (a conntrack hit): the same backend,
            // the same outer header.
            let ack = case.segment(port, vlan, tclass, TCP_ACK);
            let again = f.run(&ack);
            assert_eq!(again.action, XDP_TX);
            assert_eq!(case.check(&again.frame, &ack, port, vlan, tclass), id);
            assert_eq!(&again.frame[..l3 + 48], &r.frame[..l3 + 48]);
        }
        assert_eq!(labels.len(), 4, "{}: four flows, four labels", case.name);
        let s = f.dp.vip_stats(0).unwrap();
        assert_eq!(
            (s.packets, s.new_flows, s.conntrack_hits),
            (8, 4, 4),
            "{}",
            case.name
        );
        assert_eq!(f.reasons().values().sum::<u64>(), 0, "nothing else counted");
    }
}

#[test]
fn bytes_are_counted_as_received_without_the_outer_header() {
    for case in &CASES {
        let f = case.fixture();
        let syn = case.segment(40100, None, 0, TCP_SYN);
        let r = f.run(&syn);
        let id = backend_of_mac(&r.frame).unwrap();
        let s = f.dp.vip_stats(0).unwrap();
        assert_eq!(s.bytes, syn.len() as u64, "{}", case.name);
        assert_eq!(f.dp.backend_stats(id).unwrap().bytes, syn.len() as u64);
    }
}

#[test]
fn lb_decap_turns_each_ipv6_tunnel_frame_back_into_the_client_packet() {
    lb_tests::require_root();
    let mut decap = DecapProgram::load_private().expect("load lb-decap");
    decap
        .maps
        .apply(&Settings {
            allow: vec![format!("{ENCAP_SRC6}/128").parse::<Cidr>().unwrap()],
            gue_port: GUE_PORT,
        })
        .expect("fill the decap maps");
    for case in &CASES {
        let f = case.fixture();
        for vlan in [None, Some(9)] {
            let syn = case.segment(40200, vlan, 0x20, TCP_SYN);
            let r = f.run(&syn);
            assert_eq!(r.action, XDP_TX);
            let d = run_xdp(decap.program(), &r.frame).expect("BPF_PROG_TEST_RUN");
            assert_eq!(d.action, XDP_PASS, "{} vlan {vlan:?}", case.name);
            let inner = &syn[l2_len(vlan)..];
            let want = ethernet_frame(
                r.frame[0..6].try_into().unwrap(),
                LB_MAC,
                vlan,
                ether_type_of(inner),
                inner,
            );
            assert_eq!(d.frame, want, "{} vlan {vlan:?}", case.name);
        }
    }
    let counters: BTreeMap<_, _> = decap
        .maps
        .counters()
        .unwrap()
        .into_iter()
        .map(|(r, n)| (r.name(), n))
        .filter(|(_, n)| *n != 0)
        .collect();
    assert_eq!(
        counters,
        BTreeMap::from([("decap_gue", 4), ("decap_ipip", 4)])
    );
}

/// The ICMPv6 answer `out` to `frame` (an IPv6 packet to VIP6 from
/// CLIENT6 via ROUTER_MAC, tagged `vlan`), checked byte for byte;
/// returns the announced MTU.
fn check_packet_too_big(out: &[u8], frame: &[u8], vlan: Option<u16>) -> u32 {
    let l3 = l2_len(vlan);
    let mut want_l2 = frame[..l3].to_vec();
    want_l2[0..6].copy_from_slice(&CLIENT_MAC);
    want_l2[6..12].copy_from_slice(&ROUTER_MAC);
    assert_eq!(&out[..l3], &want_l2[..], "MACs swapped, VLAN tag kept");
    assert_eq!(out.len(), l3 + 1280, "as long as IPv6's minimum MTU");
    let ip = &out[l3..l3 + 40];
    assert_eq!(
        &ip[0..4],
        &[0x60, 0, 0, 0],
        "traffic class and flow label 0"
    );
    assert_eq!(be16(ip, 4), 1240, "payload length");
    assert_eq!((ip[6], ip[7]), (IPPROTO_ICMPV6, 64), "ICMPv6, hop limit 64");
    assert_eq!(addr6(ip, 8), VIP6, "from the VIP");
    assert_eq!(addr6(ip, 24), CLIENT6, "to the client");
    let icmp = &out[l3 + 40..];
    assert_eq!((icmp[0], icmp[1]), (2, 0), "packet too big");
    assert_eq!(
        icmpv6_checksum(VIP6, CLIENT6, icmp),
        0,
        "checksum valid with the pseudo-header"
    );
    assert_eq!(
        &icmp[8..],
        &frame[l3..l3 + 1232],
        "as much of the packet as fits in 1280 bytes"
    );
    u32::from_be_bytes([icmp[4], icmp[5], icmp[6], icmp[7]])
}

#[test]
fn a_v6_packet_the_outer_header_makes_too_big_is_answered_with_packet_too_big() {
    for (mode, overhead) in [(FORWARD_IPIP, 40usize), (FORWARD_GUE, 48)] {
        let mut f = v6_vip(mode);
        limit(&mut f, 1500);
        // The largest packet that fits once encapsulated goes through.
        let fits = segment6(41000, None, 0, TCP_ACK, 1500 - overhead - 60);
        let r = f.run(&fits);
        assert_eq!(r.action, XDP_TX, "mode {mode}");
        assert_eq!(r.frame.len(), fits.len() + overhead);

        for (port, tot_len, vlan) in [(41001, 1500 - overhead + 1, None), (41002, 1500, Some(9))] {
            let frame = segment6(port, vlan, 0x28, TCP_ACK, tot_len - 60);
            let before = f.reasons();
            let stats = f.dp.vip_stats(0).unwrap();
            let r = f.run(&frame);
            assert_eq!(r.action, XDP_TX, "mode {mode}, {tot_len} bytes: sent back");
            assert_eq!(
                moved(&before, &f.reasons()),
                BTreeMap::from([("tx_icmp_too_big", 1)])
            );
            assert_eq!(f.dp.vip_stats(0).unwrap(), stats, "not forwarded");
            assert_eq!(f.dp.conntrack6_lookup(&flow6(port)).unwrap(), None);
            assert_eq!(
                check_packet_too_big(&r.frame, &frame, vlan),
                (1500 - overhead) as u32,
                "the limit minus the outer header"
            );
        }
        // Longer than the limit itself (a GRO aggregate): dropped.
        let before = f.reasons();
        let r = f.run(&segment6(41003, None, 0, TCP_ACK, 3000));
        assert_eq!(r.action, XDP_DROP);
        assert_eq!(
            moved(&before, &f.reasons()),
            BTreeMap::from([("drop_too_big", 1)])
        );
    }
}

#[test]
fn packet_too_big_never_announces_less_than_1280() {
    let mut f = v6_vip(FORWARD_IPIP);
    limit(&mut f, 1300);
    // 1300 - 40 = 1260: announced as 1280.
    let frame = segment6(41100, None, 0, TCP_ACK, 1290 - 60);
    let r = f.run(&frame);
    assert_eq!(r.action, XDP_TX);
    assert_eq!(check_packet_too_big(&r.frame, &frame, None), 1280);
    // A packet not above 1280 cannot be sent smaller: dropped, counted.
    let before = f.reasons();
    let r = f.run(&segment6(41101, None, 0, TCP_ACK, 1270 - 60));
    assert_eq!(r.action, XDP_DROP);
    assert_eq!(
        moved(&before, &f.reasons()),
        BTreeMap::from([("drop_too_big", 1)])
    );
}

#[test]
fn a_4in6_packet_too_big_is_answered_with_frag_needed_for_the_ipv6_overhead() {
    for (mode, overhead) in [(FORWARD_IPIP, 40usize), (FORWARD_GUE, 48)] {
        let mut f = v4_vip_v6_backends(mode);
        limit(&mut f, 1500);
        let fits = segment4(42000, None, 0, TCP_ACK, 1500 - overhead - 40);
        let r = f.run(&fits);
        assert_eq!(r.action, XDP_TX, "mode {mode}");
        assert_eq!(r.frame.len(), fits.len() + overhead);
        // Fits with an IPv4 outer header, not with the IPv6 one.
        let frame = segment4(42001, None, 0, TCP_ACK, 1500 - overhead - 40 + 1);
        let before = f.reasons();
        let r = f.run(&frame);
        assert_eq!(r.action, XDP_TX);
        assert_eq!(
            moved(&before, &f.reasons()),
            BTreeMap::from([("tx_icmp_too_big", 1)])
        );
        let icmp = &r.frame[34..];
        assert_eq!((icmp[0], icmp[1]), (3, 4), "fragmentation needed");
        assert_eq!(lb_tests::packet::checksum(icmp), 0);
        assert_eq!(be16(icmp, 6) as usize, 1500 - overhead);
        assert_eq!(&icmp[8..], &frame[14..14 + 28], "IP header + 8 bytes");
        assert_eq!(&r.frame[0..6], &frame[6..12], "back to the sender");
    }
}

#[test]
fn every_truncation_of_an_outer_ipv6_packet_is_handled_never_aborted() {
    for case in &CASES {
        for vlan in [None, Some(7)] {
            let mut f = case.fixture();
            limit(&mut f, 1500);
            let pkt = case.segment(43000, vlan, 0, TCP_ACK);
            let l2 = l2_len(vlan);
            let ip_hdr = if case.v6_vip { 40 } else { 20 };
            let name = case.name;
            assert_truncations_handled(&f, &pkt, l2, ip_hdr, case.overhead(), name);
        }
    }
}

fn echo_request(dst: Ipv6Addr, vlan: Option<u16>) -> Vec<u8> {
    let l3 = icmpv6_l3(CLIENT6, dst, 128, 0, [0x12, 0x34, 0, 7], b"ping data!");
    ethernet_frame(ROUTER_MAC, CLIENT_MAC, vlan, 0x86DD, &l3)
}

#[test]
fn icmpv6_echo_to_a_v6_vip_is_answered_in_xdp() {
    for mode in [FORWARD_DSR_L2, FORWARD_IPIP, FORWARD_GUE] {
        let mut f = v6_vip(mode);
        f.set_echo6(0, VIP6, mode, true);
        for vlan in [None, Some(5)] {
            let req = echo_request(VIP6, vlan);
            let before = f.reasons();
            let r = f.run(&req);
            assert_eq!(r.action, XDP_TX, "mode {mode}");
            assert_eq!(
                moved(&before, &f.reasons()),
                BTreeMap::from([("tx_icmp_echo_reply", 1)])
            );
            let l3 = l2_len(vlan);
            let mut want = req.clone();
            want[0..6].copy_from_slice(&CLIENT_MAC);
            want[6..12].copy_from_slice(&ROUTER_MAC);
            want[l3 + 7] = 64;
            want[l3 + 8..l3 + 24].copy_from_slice(&VIP6.octets());
            want[l3 + 24..l3 + 40].copy_from_slice(&CLIENT6.octets());
            want[l3 + 40] = 129;
            let out = &r.frame;
            assert_eq!(out.len(), req.len());
            // Everything but the checksum as expected; the checksum valid.
            assert_eq!(&out[..l3 + 42], &want[..l3 + 42]);
            assert_eq!(&out[l3 + 44..], &want[l3 + 44..]);
            assert_eq!(icmpv6_checksum(VIP6, CLIENT6, &out[l3 + 40..]), 0);
        }
        assert_eq!(f.dp.vip_stats(0).unwrap().packets, 0, "not a VIP flow");
    }
}

#[test]
fn echo_with_the_flag_off_echo_to_other_addresses_and_nd_pass_untouched() {
    let mut f = v6_vip(FORWARD_IPIP);
    f.set_echo6(0, VIP6, FORWARD_IPIP, false);
    assert_passed_untouched(&f, &echo_request(VIP6, None), "pass_not_vip");
    f.set_echo6(0, VIP6, FORWARD_IPIP, true);
    assert_passed_untouched(&f, &echo_request(OTHER6, None), "pass_not_vip");
    assert_passed_untouched(
        &f,
        &icmpv6_neighbor_solicitation(CLIENT6, VIP6),
        "pass_not_vip",
    );
    // An echo reply (type 129) to the VIP is not answered either.
    let mut reply = echo_request(VIP6, None);
    reply[14 + 40] = 129;
    assert_passed_untouched(&f, &reply, "pass_not_vip");
}

/// A "packet too big" from ROUTER6 to `to`, about the backend's packet
/// from `vip:80` to CLIENT6 port `port` (its IPv6 and TCP headers and
/// some data, as routers quote).
fn packet_too_big_about(to: Ipv6Addr, vip: Ipv6Addr, port: u16, mtu: u32) -> Vec<u8> {
    let mut sent = Ipv6Packet::tcp(vip, 80, CLIENT6, port);
    sent.tcp_flags = TCP_ACK;
    sent.payload = vec![0x42; 200];
    let l3 = icmpv6_l3(ROUTER6, to, 2, 0, mtu.to_be_bytes(), &sent.l3());
    ethernet_frame(ROUTER_MAC, CLIENT_MAC, None, 0x86DD, &l3)
}

#[test]
fn packet_too_big_about_a_vip_flow_goes_to_the_backend_that_sent_it() {
    for mode in [FORWARD_DSR_L2, FORWARD_IPIP, FORWARD_GUE] {
        let f = v6_vip(mode);
        // A tracked flow: the error follows its conntrack entry.
        let port = 44000;
        let syn = segment6(port, None, 0, TCP_SYN, 0);
        let id = backend_of_mac(&f.run(&syn).frame).unwrap();
        // An untracked one: the ring's choice, and no entry made.
        let other = 44001;
        for (port, tracked) in [(port, true), (other, false)] {
            let err = packet_too_big_about(VIP6, VIP6, port, 1400);
            let before = f.reasons();
            let stats = f.dp.vip_stats(0).unwrap();
            let r = f.run(&err);
            assert_eq!(r.action, XDP_TX, "mode {mode}");
            assert_eq!(
                moved(&before, &f.reasons()),
                BTreeMap::from([("fwd_icmp_error", 1)])
            );
            assert_eq!(f.dp.vip_stats(0).unwrap(), stats, "no flow counted");
            let to = backend_of_mac(&r.frame).unwrap();
            if tracked {
                assert_eq!(to, id, "mode {mode}: the flow's backend");
            } else {
                assert_eq!(f.dp.conntrack6_lookup(&flow6(port)).unwrap(), None);
                let ring = f.run(&segment6(port, None, 0, TCP_SYN, 0));
                assert_eq!(backend_of_mac(&ring.frame), Some(to), "the ring's");
            }
            match mode {
                FORWARD_DSR_L2 => {
                    assert_eq!(r.frame.len(), err.len());
                    assert_eq!(&r.frame[12..], &err[12..], "the error untouched");
                }
                _ => {
                    let extra = if mode == FORWARD_GUE { 8 } else { 0 };
                    let next = if mode == FORWARD_GUE { 17 } else { 41 };
                    let l3 = check_l2(&r.frame, to, None);
                    assert_eq!(
                        check_outer_ipv6(
                            &r.frame,
                            l3,
                            0,
                            flow6(port).hash(),
                            next,
                            err.len() - 14,
                            extra
                        ),
                        to
                    );
                    assert_eq!(&r.frame[l3 + 40 + extra..], &err[14..]);
                }
            }
        }
    }
}

#[test]
fn icmpv6_errors_about_anything_else_pass_untouched() {
    let f = v6_vip(FORWARD_IPIP);
    // About another address than the one it is sent to.
    assert_passed_untouched(
        &f,
        &packet_too_big_about(VIP6, OTHER6, 44100, 1400),
        "pass_not_vip",
    );
    // To a host address.
    assert_passed_untouched(
        &f,
        &packet_too_big_about(OTHER6, OTHER6, 44100, 1400),
        "pass_not_vip",
    );
    // About the VIP address on a port that is no VIP.
    let mut sent = Ipv6Packet::tcp(VIP6, 81, CLIENT6, 44100);
    sent.tcp_flags = TCP_ACK;
    let l3 = icmpv6_l3(ROUTER6, VIP6, 2, 0, 1400u32.to_be_bytes(), &sent.l3());
    let frame = ethernet_frame(ROUTER_MAC, CLIENT_MAC, None, 0x86DD, &l3);
    assert_passed_untouched(&f, &frame, "pass_not_vip");
    // Cut before the embedded ports.
    let full = packet_too_big_about(VIP6, VIP6, 44100, 1400);
    let mut cut = full[..14 + 40 + 8 + 40 + 2].to_vec();
    let payload = (cut.len() - 54) as u16;
    cut[18..20].copy_from_slice(&payload.to_be_bytes());
    assert_passed_untouched(&f, &cut, "pass_not_vip");
}

#[test]
fn a_4in6_packet_too_big_without_df_is_dropped() {
    let mut f = v4_vip_v6_backends(FORWARD_IPIP);
    limit(&mut f, 1500);
    let mut p = Ipv4Packet::tcp(CLIENT4, 42100, VIP4, 80);
    p.frag = 0;
    p.tcp_flags = TCP_ACK;
    p.payload = vec![1; 1470 - 40];
    let before = f.reasons();
    assert_eq!(f.run(&p.build()).action, XDP_DROP, "never fragmented");
    assert_eq!(
        moved(&before, &f.reasons()),
        BTreeMap::from([("drop_too_big_no_df", 1)])
    );
}

#[test]
fn frag_needed_to_a_v4_vip_goes_4in6_to_the_flows_ipv6_backend() {
    for mode in [FORWARD_IPIP, FORWARD_GUE] {
        let f = v4_vip_v6_backends(mode);
        let port = 44200;
        let syn = f.run(&segment4(port, None, 0, TCP_SYN, 0));
        let id = backend_of_mac(&syn.frame).unwrap();
        // What a router on the client's side sends the VIP about the
        // backend's reply (VIP:80 → client:port): its IPv4 header and 8
        // bytes.
        let mut sent = Ipv4Packet::tcp(VIP4, 80, CLIENT4, port);
        sent.payload = vec![0; 1400];
        let embedded = sent.build()[14..14 + 28].to_vec();
        let base = Ipv4Packet::tcp(Ipv4Addr::new(198, 18, 0, 1), 0, VIP4, 0);
        let err = lb_tests::packet::icmp4(base, 3, 4, [0, 0, 0x05, 0x78], &embedded);
        let before = f.reasons();
        let r = f.run(&err);
        assert_eq!(r.action, XDP_TX, "mode {mode}");
        assert_eq!(
            moved(&before, &f.reasons()),
            BTreeMap::from([("fwd_icmp_error", 1)])
        );
        let (next, extra) = if mode == FORWARD_GUE { (17, 8) } else { (4, 0) };
        let l3 = check_l2(&r.frame, id, None);
        assert_eq!(
            check_outer_ipv6(
                &r.frame,
                l3,
                0,
                flow4(port).hash(),
                next,
                err.len() - 14,
                extra
            ),
            id,
            "mode {mode}: the flow's backend"
        );
        assert_eq!(
            &r.frame[l3 + 40 + extra..],
            &err[14..],
            "the error untouched"
        );
    }
}
