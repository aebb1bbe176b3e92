//! Packet-level tests of the tunnel forwarding modes (ipip, gue) and of the
//! ICMP "fragmentation needed" answer: the real XDP program, real maps,
//! crafted frames in, every byte of the outer headers checked. Needs root.

use std::{collections::BTreeMap, net::Ipv4Addr};

use lb_common::{
    FORWARD_DSR_L2, FORWARD_GUE, FORWARD_IPIP, FlowKey, IPPROTO_TCP, IPPROTO_UDP, Runtime,
    gue_source_port,
};
use lb_tests::{
    fixture::{
        ENCAP_SRC, Fixture, GUE_PORT, LB_MAC, XDP_DROP, XDP_TX, assert_truncations_handled,
        backend_addr, backend_mac, backend_of_mac, moved,
    },
    packet::{Ipv4Packet, TCP_ACK, checksum},
};

const VIP: Ipv4Addr = Ipv4Addr::new(198, 18, 10, 1);
const DSR_VIP: Ipv4Addr = Ipv4Addr::new(198, 18, 10, 2);
const CLIENT: Ipv4Addr = Ipv4Addr::new(198, 18, 0, 2);
const CLIENT_MAC: [u8; 6] = [0x02, 0, 0, 0, 0, 0x02];
const ROUTER_MAC: [u8; 6] = [0x02, 0, 0, 0, 0, 0x01];

/// A fixture with one TCP VIP in `mode` over backends 1, 2, 3.
fn fixture(mode: u8) -> Fixture {
    let mut f = Fixture::new();
    f.add_vip_forwarding(0, (VIP, 80, IPPROTO_TCP), &[(1, 1), (2, 1), (3, 1)], mode);
    f
}

fn be16(b: &[u8], at: usize) -> u16 {
    u16::from_be_bytes([b[at], b[at + 1]])
}

fn addr(b: &[u8], at: usize) -> Ipv4Addr {
    Ipv4Addr::new(b[at], b[at + 1], b[at + 2], b[at + 3])
}

/// Checks the Ethernet header lb writes for an encapsulated frame (to
/// backend `id`, tagged `vlan` like the input) and returns where the outer
/// IPv4 header starts.
fn check_l2(out: &[u8], id: u32, vlan: Option<u16>) -> usize {
    assert_eq!(&out[0..6], &backend_mac(id), "dst MAC: the next hop's");
    assert_eq!(&out[6..12], &LB_MAC, "src MAC: the egress interface's");
    match vlan {
        Some(vid) => {
            assert_eq!(be16(out, 12), 0x8100, "the VLAN tag is kept");
            assert_eq!(be16(out, 14) & 0x0FFF, vid);
            assert_eq!(be16(out, 16), 0x0800);
            18
        }
        None => {
            assert_eq!(be16(out, 12), 0x0800);
            14
        }
    }
}

/// Checks every field of the outer IPv4 header at `at` (`inner` is the
/// client's IP packet) and returns the backend id its destination names.
fn check_outer_ipv4(out: &[u8], at: usize, proto: u8, extra: usize, inner: &[u8]) -> u32 {
    let h = &out[at..at + 20];
    assert_eq!(h[0], 0x45, "version 4, IHL 5");
    assert_eq!(h[1], inner[1], "TOS copied from the inner header");
    assert_eq!(
        be16(h, 2) as usize,
        inner.len() + 20 + extra,
        "total length"
    );
    assert_eq!(be16(h, 4), 0, "id 0");
    assert_eq!(be16(h, 6), 0x4000, "DF set, no fragment offset");
    assert_eq!(h[8], 64, "TTL");
    assert_eq!(h[9], proto, "protocol");
    assert_eq!(checksum(h), 0, "header checksum valid: {h:02x?}");
    assert_eq!(addr(h, 12), ENCAP_SRC, "outer source: the backend entry's");
    let dst = addr(h, 16);
    (1..=3)
        .find(|&id| backend_addr(id) == dst)
        .unwrap_or_else(|| panic!("outer destination {dst} is no backend"))
}

/// The client's IP packet inside `frame` (from the L3 offset).
fn ip_of(frame: &[u8], vlan: Option<u16>) -> &[u8] {
    &frame[if vlan.is_some() { 18 } else { 14 }..]
}

#[test]
fn ipip_pushes_an_exact_outer_header_before_the_untouched_packet() {
    let f = fixture(FORWARD_IPIP);
    for (port, vlan, tos) in [(40000, None, 0), (40001, Some(42), 0xB8)] {
        let mut p = Ipv4Packet::tcp(CLIENT, port, VIP, 80);
        p.vlan = vlan;
        p.tos = tos;
        p.payload = b"some bytes".to_vec();
        let pkt = p.build();
        let r = f.run(&pkt);
        assert_eq!(r.action, XDP_TX, "{vlan:?}");
        assert_eq!(r.frame.len(), pkt.len() + 20);
        let id = backend_of_mac(&r.frame).expect("a backend's MAC");
        let l3 = check_l2(&r.frame, id, vlan);
        let inner = ip_of(&pkt, vlan);
        assert_eq!(
            check_outer_ipv4(&r.frame, l3, 4, 0, inner),
            id,
            "the outer destination is the chosen backend's address"
        );
        assert_eq!(&r.frame[l3 + 20..], inner, "inner packet byte-identical");
        // The backend is the one the ring gives the flow.
        let key = FlowKey::new(CLIENT.to_bits(), port, VIP.to_bits(), 80, IPPROTO_TCP);
        assert_eq!(f.dp.conntrack_lookup(&key).unwrap().unwrap().backend_id, id);
    }
}

#[test]
fn gue_pushes_ip_and_udp_with_the_flow_hash_source_port() {
    let f = fixture(FORWARD_GUE);
    let mut ports = std::collections::BTreeSet::new();
    for (port, vlan) in [
        (40010, None),
        (40011, Some(7)),
        (40012, None),
        (40013, None),
    ] {
        let mut p = Ipv4Packet::tcp(CLIENT, port, VIP, 80);
        p.vlan = vlan;
        p.tos = 0x10;
        let pkt = p.build();
        let r = f.run(&pkt);
        assert_eq!(r.action, XDP_TX);
        assert_eq!(r.frame.len(), pkt.len() + 28);
        let id = backend_of_mac(&r.frame).expect("a backend's MAC");
        let l3 = check_l2(&r.frame, id, vlan);
        let inner = ip_of(&pkt, vlan);
        assert_eq!(check_outer_ipv4(&r.frame, l3, 17, 8, inner), id);
        let udp = &r.frame[l3 + 20..l3 + 28];
        let key = FlowKey::new(CLIENT.to_bits(), port, VIP.to_bits(), 80, IPPROTO_TCP);
        let src_port = be16(udp, 0);
        assert_eq!(
            src_port,
            gue_source_port(key.hash()),
            "source port from the flow hash"
        );
        assert!(src_port >= 0xC000);
        assert_eq!(
            be16(udp, 2),
            GUE_PORT,
            "destination port from the VIP entry"
        );
        assert_eq!(be16(udp, 4) as usize, inner.len() + 8, "UDP length");
        assert_eq!(be16(udp, 6), 0, "UDP checksum 0");
        assert_eq!(&r.frame[l3 + 28..], inner, "inner packet byte-identical");
        ports.insert(src_port);

        // The flow's next packet (a conntrack hit): the same source port.
        let mut next = p.clone();
        next.tcp_flags = TCP_ACK;
        next.payload = b"more".to_vec();
        let again = f.run(&next.build());
        assert_eq!(again.action, XDP_TX);
        assert_eq!(&again.frame[..6], &r.frame[..6], "same backend");
        assert_eq!(be16(&again.frame, l3 + 20), src_port, "stable per flow");
    }
    assert_eq!(ports.len(), 4, "four flows, four source ports: {ports:?}");
}

#[test]
fn new_flows_and_conntrack_hits_both_encapsulate_and_count_inner_bytes() {
    for (mode, extra) in [(FORWARD_IPIP, 20), (FORWARD_GUE, 28)] {
        let f = fixture(mode);
        let syn = Ipv4Packet::tcp(CLIENT, 40020, VIP, 80);
        let mut ack = syn.clone();
        ack.tcp_flags = TCP_ACK;
        ack.payload = vec![0x5a; 100];
        let (syn, ack) = (syn.build(), ack.build());
        let a = f.run(&syn);
        let b = f.run(&ack);
        assert_eq!((a.action, b.action), (XDP_TX, XDP_TX));
        assert_eq!(a.frame.len(), syn.len() + extra);
        assert_eq!(b.frame.len(), ack.len() + extra);
        assert_eq!(&b.frame[14 + extra..], &ack[14..]);
        let id = backend_of_mac(&a.frame).unwrap();
        assert_eq!(backend_of_mac(&b.frame), Some(id));
        let s = f.dp.vip_stats(0).unwrap();
        let bytes = (syn.len() + ack.len()) as u64;
        assert_eq!(
            (s.packets, s.bytes, s.new_flows, s.conntrack_hits),
            (2, bytes, 1, 1),
            "mode {mode}: bytes as received, without the outer header"
        );
        let bs = f.dp.backend_stats(id).unwrap();
        assert_eq!((bs.packets, bs.bytes), (2, bytes));
    }
}

#[test]
fn a_dsr_vip_next_to_an_encapsulating_one_is_forwarded_as_before() {
    let mut f = fixture(FORWARD_GUE);
    f.add_vip_forwarding(
        1,
        (DSR_VIP, 80, IPPROTO_TCP),
        &[(4, 1), (5, 1)],
        FORWARD_DSR_L2,
    );
    let pkt = Ipv4Packet::tcp(CLIENT, 40030, DSR_VIP, 80).build();
    let r = f.run(&pkt);
    assert_eq!(r.action, XDP_TX);
    assert_eq!(r.frame.len(), pkt.len());
    assert!(matches!(backend_of_mac(&r.frame), Some(4 | 5)));
    assert_eq!(&r.frame[6..12], &LB_MAC);
    assert_eq!(&r.frame[12..], &pkt[12..], "IP and TCP untouched");
    // And the GUE VIP still encapsulates.
    let gue = Ipv4Packet::tcp(CLIENT, 40030, VIP, 80).build();
    assert_eq!(f.run(&gue).frame.len(), gue.len() + 28);
}

#[test]
fn a_udp_vip_encapsulates_too() {
    let mut f = Fixture::new();
    f.add_vip_forwarding(0, (VIP, 53, IPPROTO_UDP), &[(1, 1), (2, 1)], FORWARD_IPIP);
    let pkt = Ipv4Packet::udp(CLIENT, 5353, VIP, 53).build();
    let r = f.run(&pkt);
    assert_eq!(r.action, XDP_TX);
    let id = backend_of_mac(&r.frame).unwrap();
    assert_eq!(check_outer_ipv4(&r.frame, 14, 4, 0, &pkt[14..]), id);
    assert_eq!(&r.frame[34..], &pkt[14..]);
}

/// A TCP segment to the VIP whose IP packet is `tot_len` bytes long.
fn segment(port: u16, tot_len: usize, df: bool, vlan: Option<u16>, options: usize) -> Ipv4Packet {
    let mut p = Ipv4Packet::tcp(CLIENT, port, VIP, 80);
    p.dst_mac = ROUTER_MAC;
    p.src_mac = CLIENT_MAC;
    p.tcp_flags = TCP_ACK;
    p.vlan = vlan;
    p.options = vec![1; options];
    p.payload = (0..tot_len - 40 - options).map(|i| i as u8).collect();
    p.frag = if df { 0x4000 } else { 0 };
    p
}

fn limit(f: &mut Fixture, mtu: u32) {
    f.dp.set_runtime(Runtime {
        max_l3_len: mtu,
        ..Runtime::default()
    })
    .unwrap();
}

#[test]
fn a_packet_the_outer_header_makes_too_big_is_answered_with_frag_needed() {
    for (mode, overhead) in [(FORWARD_IPIP, 20usize), (FORWARD_GUE, 28)] {
        let mut f = fixture(mode);
        limit(&mut f, 1500);
        // The largest packet that fits once encapsulated goes through.
        let fits = segment(41000, 1500 - overhead, true, None, 0).build();
        let r = f.run(&fits);
        assert_eq!(r.action, XDP_TX, "mode {mode}");
        assert_eq!(r.frame.len(), fits.len() + overhead);

        for (port, tot_len, vlan, options) in [
            (41001, 1500 - overhead + 1, None, 0),
            (41002, 1500, Some(9), 0),
            (41003, 1490, None, 12),
        ] {
            let p = segment(port, tot_len, true, vlan, options);
            let pkt = p.build();
            let before = f.reasons();
            let stats_before = f.dp.vip_stats(0).unwrap();
            let r = f.run(&pkt);
            assert_eq!(r.action, XDP_TX, "mode {mode}, {tot_len} bytes: sent back");
            assert_eq!(
                moved(&before, &f.reasons()),
                BTreeMap::from([("tx_icmp_too_big", 1)])
            );
            assert_eq!(f.dp.vip_stats(0).unwrap(), stats_before, "not forwarded");
            let key = FlowKey::new(CLIENT.to_bits(), port, VIP.to_bits(), 80, IPPROTO_TCP);
            assert_eq!(
                f.dp.conntrack_lookup(&key).unwrap(),
                None,
                "no flow recorded"
            );

            let out = &r.frame;
            // Ethernet: back to where it came from, same VLAN.
            assert_eq!(&out[0..6], &CLIENT_MAC);
            assert_eq!(&out[6..12], &ROUTER_MAC);
            let l3 = match vlan {
                Some(vid) => {
                    assert_eq!((be16(out, 12), be16(out, 14) & 0xFFF), (0x8100, vid));
                    18
                }
                None => 14,
            };
            assert_eq!(be16(out, l3 - 2), 0x0800);
            let ihl = 20 + options;
            let icmp_len = 8 + ihl + 8;
            assert_eq!(
                out.len(),
                l3 + 20 + icmp_len,
                "cut after 8 bytes of payload"
            );
            let ip = &out[l3..l3 + 20];
            assert_eq!(ip[0], 0x45);
            assert_eq!(ip[1], 0, "TOS");
            assert_eq!(be16(ip, 2) as usize, 20 + icmp_len, "total length");
            assert_eq!((be16(ip, 4), be16(ip, 6)), (0, 0), "id, flags");
            assert_eq!(ip[8], 64, "TTL");
            assert_eq!(ip[9], 1, "ICMP");
            assert_eq!(checksum(ip), 0, "IPv4 header checksum valid");
            assert_eq!(addr(ip, 12), VIP, "from the VIP");
            assert_eq!(addr(ip, 16), CLIENT, "to the client");
            let icmp = &out[l3 + 20..];
            assert_eq!((icmp[0], icmp[1]), (3, 4), "fragmentation needed");
            assert_eq!(checksum(icmp), 0, "ICMP checksum valid");
            assert_eq!(be16(icmp, 4), 0, "unused");
            assert_eq!(
                be16(icmp, 6) as usize,
                1500 - overhead,
                "next-hop MTU: the limit minus the outer header"
            );
            let l3_in = if vlan.is_some() { 18 } else { 14 };
            assert_eq!(
                &icmp[8..],
                &pkt[l3_in..l3_in + ihl + 8],
                "the original IP header and 8 bytes of its payload"
            );
        }
    }
}

#[test]
fn too_big_without_df_is_dropped_and_aggregates_stay_dropped() {
    let mut f = fixture(FORWARD_GUE);
    limit(&mut f, 1500);
    let before = f.reasons();
    let r = f.run(&segment(42000, 1480, false, None, 0).build());
    assert_eq!(r.action, XDP_DROP, "DF clear: never fragmented");
    assert_eq!(
        moved(&before, &f.reasons()),
        BTreeMap::from([("drop_too_big_no_df", 1)])
    );
    // Longer than the MTU itself (a GRO aggregate): dropped as before,
    // no ICMP, DF or not.
    for df in [true, false] {
        let before = f.reasons();
        let r = f.run(&segment(42001, 3000, df, None, 0).build());
        assert_eq!(r.action, XDP_DROP);
        assert_eq!(
            moved(&before, &f.reasons()),
            BTreeMap::from([("drop_too_big", 1)])
        );
    }
    // DSR-L2 keeps its rule: up to the MTU goes out.
    f.add_vip_forwarding(1, (DSR_VIP, 80, IPPROTO_TCP), &[(4, 1)], FORWARD_DSR_L2);
    let mut p = segment(42002, 1500, true, None, 0);
    p.dst = DSR_VIP;
    assert_eq!(f.run(&p.build()).action, XDP_TX);
    assert_eq!(f.dp.vip_stats(0).unwrap().packets, 0);
}

#[test]
fn every_truncation_of_an_encapsulated_vip_packet_is_handled_never_aborted() {
    for mode in [FORWARD_IPIP, FORWARD_GUE] {
        for vlan in [None, Some(7)] {
            let mut f = fixture(mode);
            limit(&mut f, 1500);
            let mut p = Ipv4Packet::tcp(CLIENT, 43000, VIP, 80);
            p.vlan = vlan;
            p.payload = b"data".to_vec();
            let pkt = p.build();
            let l2 = if vlan.is_some() { 18 } else { 14 };
            let overhead = if mode == FORWARD_GUE { 28 } else { 20 };
            let what = format!("mode {mode}");
            assert_truncations_handled(&f, &pkt, l2, 20, overhead, &what);
        }
    }
}
