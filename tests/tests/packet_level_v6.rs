//! Packet-level tests of the IPv6 fast path: the real compiled XDP
//! program, real kernel maps (VIPS6, CONNTRACK6, the shared backends and
//! rings), crafted IPv6 frames in, action and bytes out
//! (BPF_PROG_TEST_RUN). Needs root.

use std::{
    collections::BTreeMap,
    net::{Ipv4Addr, Ipv6Addr},
};

use lb_common::{
    FLOW_FLAG_CLOSING, FORWARD_DSR_L2, FORWARD_IPIP, FlowKey, FlowKey6, IPPROTO_TCP, IPPROTO_UDP,
    ring_slot,
};
use lb_tests::{
    fixture::{
        Fixture, LB_MAC, XDP_ABORTED, XDP_DROP, XDP_PASS, XDP_TX, assert_dropped,
        assert_passed_untouched, backend_mac, backend_of_mac, moved,
    },
    packet::{
        IPV6_DEST_OPTS, IPV6_FRAGMENT, IPV6_HOP_BY_HOP, IPV6_ROUTING, Ipv4Packet, Ipv6Packet,
        TCP_ACK, TCP_SYN, icmpv6_echo, icmpv6_neighbor_solicitation,
    },
};

const VIP: Ipv6Addr = Ipv6Addr::new(0x2001, 2, 0, 10, 0, 0, 0, 1);
const CLIENT: Ipv6Addr = Ipv6Addr::new(0x2001, 2, 0, 0, 0, 0, 0, 2);
const OTHER: Ipv6Addr = Ipv6Addr::new(0x2001, 2, 0, 0, 0, 0, 0, 99);
const TCP_FIN: u8 = 0x01;
const TCP_RST: u8 = 0x04;

/// A fixture with one IPv6 TCP VIP (index 0) over backends 1, 2, 3.
fn three_backends() -> Fixture {
    let mut f = Fixture::new();
    f.add_vip6(
        0,
        (VIP, 80, IPPROTO_TCP),
        &[(1, 1), (2, 1), (3, 1)],
        FORWARD_DSR_L2,
    );
    f
}

/// Runs `frame`, expects it sent back out to a backend with only the MACs
/// rewritten and no reason counted; returns the backend.
fn assert_steered(f: &Fixture, frame: &[u8]) -> u32 {
    let before = f.reasons();
    let r = f.run(frame);
    assert_eq!(r.action, XDP_TX);
    assert_eq!(r.frame.len(), frame.len());
    let backend = backend_of_mac(&r.frame[0..6]).expect("dst MAC is a backend's");
    assert_eq!(&r.frame[6..12], &LB_MAC);
    assert_eq!(&r.frame[12..], &frame[12..], "L3 and L4 bytes untouched");
    assert_eq!(moved(&before, &f.reasons()), BTreeMap::new());
    backend
}

/// The backend the VIP's ring (VIP index 0) gives `key`, by the IPv6 flow
/// hash computed in userspace.
fn ring_backend(f: &Fixture, key: &FlowKey6) -> u32 {
    let m = f.dp.sizes().ring_size;
    let ring = f.dp.read_ring(0, m).unwrap();
    ring[ring_slot(key.hash(), m) as usize]
}

fn key(port: u16) -> FlowKey6 {
    FlowKey6::new(CLIENT, port, VIP, 80, IPPROTO_TCP)
}

#[test]
fn v6_syn_is_sent_to_the_backend_the_v6_hash_predicts_and_recorded() {
    let f = three_backends();
    let pkt = Ipv6Packet::tcp(CLIENT, 40000, VIP, 80).build();
    let backend = assert_steered(&f, &pkt);
    assert!((1..=3).contains(&backend));
    assert_eq!(&f.run(&pkt).frame[0..6], &backend_mac(backend));
    assert_eq!(ring_backend(&f, &key(40000)), backend);
    let entry =
        f.dp.conntrack6_lookup(&key(40000))
            .unwrap()
            .expect("recorded");
    assert_eq!(entry.backend_id, backend);
    // IPv4's conntrack holds nothing.
    assert!(f.dp.conntrack_entries().unwrap().is_empty());
    let s = f.dp.vip_stats(0).unwrap();
    // Two SYNs: each a new flow by the ring.
    assert_eq!(
        (s.packets, s.bytes, s.new_flows, s.conntrack_hits),
        (2, 2 * pkt.len() as u64, 2, 0)
    );
    let b = f.dp.backend_stats(backend).unwrap();
    assert_eq!((b.packets, b.bytes), (2, 2 * pkt.len() as u64));
}

#[test]
fn v6_flows_spread_over_the_ring_and_each_keeps_its_backend() {
    let f = three_backends();
    let m = f.dp.sizes().ring_size;
    let ring = f.dp.read_ring(0, m).unwrap();
    let mut per_backend = BTreeMap::<u32, u32>::new();
    for port in 10000..13000u16 {
        let mut p = Ipv6Packet::tcp(CLIENT, port, VIP, 80);
        let first = assert_steered(&f, &p.build());
        let predicted = ring[ring_slot(key(port).hash(), m) as usize];
        assert_eq!(first, predicted, "port {port}");
        p.tcp_flags = TCP_ACK;
        assert_eq!(f.run(&p.build()).frame[0..6], backend_mac(first));
        *per_backend.entry(first).or_default() += 1;
    }
    assert_eq!(per_backend.len(), 3, "{per_backend:?}");
    for (&b, &n) in &per_backend {
        assert!(n.abs_diff(1000) < 150, "backend {b}: {n} of 3000 flows");
    }
    let s = f.dp.vip_stats(0).unwrap();
    assert_eq!((s.new_flows, s.conntrack_hits), (3000, 3000));
}

#[test]
fn an_established_v6_flow_keeps_its_backend_after_a_ring_change_and_a_syn_re_steers() {
    let mut f = three_backends();
    let mut p = Ipv6Packet::tcp(CLIENT, 40100, VIP, 80);
    let b = assert_steered(&f, &p.build());
    // The ring no longer names b (b stays usable): the flow's record
    // keeps it there, through the flow cache and through CONNTRACK6.
    let rest: Vec<(u32, u32)> = (1..=3).filter(|&x| x != b).map(|x| (x, 1)).collect();
    f.write_ring(0, &rest);
    p.tcp_flags = TCP_ACK;
    assert_eq!(assert_steered(&f, &p.build()), b);
    f.dp.clear_flow_cache().unwrap();
    assert_eq!(assert_steered(&f, &p.build()), b);
    let s = f.dp.vip_stats(0).unwrap();
    assert_eq!((s.new_flows, s.conntrack_hits), (1, 2));
    // A new SYN on the same tuple follows the ring.
    p.tcp_flags = TCP_SYN;
    let now = assert_steered(&f, &p.build());
    assert_ne!(now, b);
    assert_eq!(now, ring_backend(&f, &key(40100)));
    assert_eq!(
        f.dp.conntrack6_lookup(&key(40100))
            .unwrap()
            .unwrap()
            .backend_id,
        now
    );
}

#[test]
fn fin_and_rst_mark_the_v6_record_closing() {
    for flag in [TCP_FIN, TCP_RST] {
        let f = three_backends();
        let port = 40200 + flag as u16;
        let mut p = Ipv6Packet::tcp(CLIENT, port, VIP, 80);
        let b = assert_steered(&f, &p.build());
        p.tcp_flags = TCP_ACK;
        assert_steered(&f, &p.build());
        let e = f.dp.conntrack6_lookup(&key(port)).unwrap().unwrap();
        assert_eq!(e.flags & FLOW_FLAG_CLOSING, 0);
        p.tcp_flags = TCP_ACK | flag;
        assert_eq!(assert_steered(&f, &p.build()), b);
        let e = f.dp.conntrack6_lookup(&key(port)).unwrap().unwrap();
        assert_eq!(
            e.flags & FLOW_FLAG_CLOSING,
            FLOW_FLAG_CLOSING,
            "flag {flag:#x}"
        );
    }
}

#[test]
fn udp_v6_vip_is_balanced_per_flow() {
    let mut f = Fixture::new();
    f.add_vip6(0, (VIP, 53, IPPROTO_UDP), &[(1, 1), (2, 1)], FORWARD_DSR_L2);
    let mut seen = BTreeMap::<u32, u32>::new();
    for port in 20000..20200u16 {
        let pkt = Ipv6Packet::udp(CLIENT, port, VIP, 53).build();
        let b = assert_steered(&f, &pkt);
        assert_eq!(assert_steered(&f, &pkt), b);
        let k = FlowKey6::new(CLIENT, port, VIP, 53, IPPROTO_UDP);
        assert_eq!(f.dp.conntrack6_lookup(&k).unwrap().unwrap().backend_id, b);
        *seen.entry(b).or_default() += 1;
    }
    assert_eq!(seen.len(), 2, "{seen:?}");
    // TCP to the UDP service's port is not a VIP.
    assert_passed_untouched(
        &f,
        &Ipv6Packet::tcp(CLIENT, 1, VIP, 53).build(),
        "pass_not_vip",
    );
}

#[test]
fn each_extension_header_type_is_skipped_and_the_flow_still_steered() {
    let f = three_backends();
    let chains: [&[u8]; 5] = [
        &[IPV6_HOP_BY_HOP],
        &[IPV6_ROUTING],
        &[IPV6_DEST_OPTS],
        &[IPV6_HOP_BY_HOP, IPV6_DEST_OPTS, IPV6_ROUTING],
        // As many as the fast path walks.
        &[
            IPV6_HOP_BY_HOP,
            IPV6_DEST_OPTS,
            IPV6_ROUTING,
            IPV6_DEST_OPTS,
        ],
    ];
    for (i, chain) in chains.iter().enumerate() {
        let port = 41000 + i as u16;
        let mut p = Ipv6Packet::tcp(CLIENT, port, VIP, 80);
        p.ext = chain.to_vec();
        let b = assert_steered(&f, &p.build());
        // The same backend as without the headers: the flow is the same.
        assert_eq!(b, ring_backend(&f, &key(port)), "{chain:?}");
    }
}

#[test]
fn too_many_extension_headers_are_dropped_for_a_vip_and_passed_otherwise() {
    let f = three_backends();
    let five = vec![
        IPV6_HOP_BY_HOP,
        IPV6_DEST_OPTS,
        IPV6_ROUTING,
        IPV6_DEST_OPTS,
        IPV6_DEST_OPTS,
    ];
    let mut p = Ipv6Packet::tcp(CLIENT, 41100, VIP, 80);
    p.ext = five.clone();
    assert_dropped(&f, &p.build(), "drop_too_many_ext_headers");
    p.dst = OTHER;
    assert_passed_untouched(&f, &p.build(), "pass_too_many_ext_headers");
    assert_eq!(f.dp.vip_stats(0).unwrap().packets, 0);
}

#[test]
fn fragment_headers_are_dropped_for_a_vip_address_and_passed_otherwise() {
    let f = three_backends();
    for chain in [vec![IPV6_FRAGMENT], vec![IPV6_HOP_BY_HOP, IPV6_FRAGMENT]] {
        let mut p = Ipv6Packet::tcp(CLIENT, 41200, VIP, 80);
        p.ext = chain.clone();
        assert_dropped(&f, &p.build(), "drop_fragment");
        // To the VIP address on a port that is no service: still dropped.
        p.dst_port = 81;
        assert_dropped(&f, &p.build(), "drop_fragment");
        p.dst = OTHER;
        assert_passed_untouched(&f, &p.build(), "pass_fragment");
    }
    assert_eq!(f.dp.vip_stats(0).unwrap().packets, 0);
}

#[test]
fn vlan_tagged_v6_vip_traffic_is_balanced_and_keeps_its_tag() {
    let f = three_backends();
    let mut p = Ipv6Packet::tcp(CLIENT, 41300, VIP, 80);
    p.vlan = Some(42);
    p.ext = vec![IPV6_DEST_OPTS];
    let pkt = p.build();
    let b = assert_steered(&f, &pkt);
    assert_eq!(b, ring_backend(&f, &key(41300)));
    assert_eq!(&f.run(&pkt).frame[12..16], &[0x81, 0x00, 0x00, 42]);
}

#[test]
fn non_vip_v6_traffic_and_icmpv6_to_the_host_pass_untouched() {
    let f = three_backends();
    let not_vip = [
        Ipv6Packet::tcp(CLIENT, 1, OTHER, 80).build(),
        Ipv6Packet::udp(CLIENT, 1, OTHER, 80).build(),
        // The VIP address, another port or protocol.
        Ipv6Packet::tcp(CLIENT, 1, VIP, 22).build(),
        Ipv6Packet::udp(CLIENT, 1, VIP, 80).build(),
        // Neighbour discovery and echo, to the host and to the VIP address.
        icmpv6_neighbor_solicitation(CLIENT, OTHER),
        icmpv6_neighbor_solicitation(CLIENT, VIP),
        icmpv6_echo(CLIENT, OTHER),
        icmpv6_echo(CLIENT, VIP),
    ];
    for frame in &not_vip {
        assert_passed_untouched(&f, frame, "pass_not_vip");
    }
    // ESP (50) to the VIP address: not a flow lb steers.
    let mut esp = Ipv6Packet::tcp(CLIENT, 1, VIP, 80);
    esp.proto = 50;
    assert_passed_untouched(&f, &esp.build(), "pass_not_vip");
    assert_eq!(f.dp.vip_stats(0).unwrap().packets, 0);
}

#[test]
fn every_truncation_of_a_v6_vip_packet_is_passed_or_dropped_with_its_reason() {
    for (dst, vlan) in [(VIP, None), (VIP, Some(7)), (OTHER, None)] {
        let f = three_backends();
        let mut p = Ipv6Packet::tcp(CLIENT, 41400, dst, 80);
        p.vlan = vlan;
        p.ext = vec![IPV6_HOP_BY_HOP, IPV6_ROUTING];
        p.payload = b"data".to_vec();
        let pkt = p.build();
        let l3 = 14 + if vlan.is_some() { 4 } else { 0 };
        for len in 14..=pkt.len() {
            let before = f.reasons();
            let r = f.run(&pkt[..len]);
            assert_ne!(r.action, XDP_ABORTED, "len {len}");
            let want = match len {
                _ if len < l3 => Some("pass_short_frame"),
                // The fixed header incomplete: the destination cannot be
                // trusted.
                _ if len < l3 + 40 => Some("pass_malformed"),
                _ if len < pkt.len() && dst == VIP => Some("drop_malformed"),
                _ if len < pkt.len() => Some("pass_malformed"),
                _ if dst == VIP => None,
                _ => Some("pass_not_vip"),
            };
            match want {
                Some(reason) => {
                    let action = if reason.starts_with("drop") {
                        XDP_DROP
                    } else {
                        XDP_PASS
                    };
                    assert_eq!(r.action, action, "len {len} ({reason})");
                    assert_eq!(
                        moved(&before, &f.reasons()),
                        BTreeMap::from([(reason, 1)]),
                        "len {len}"
                    );
                    if action == XDP_PASS {
                        assert_eq!(r.frame, &pkt[..len], "len {len}: passed untouched");
                    }
                }
                None => assert_eq!(r.action, XDP_TX, "the whole packet is forwarded"),
            }
        }
        assert_eq!(f.dp.vip_stats(0).unwrap().packets, u64::from(dst == VIP));
    }
}

#[test]
fn malformed_v6_headers_are_not_forwarded() {
    let f = three_backends();
    // An extension header whose length runs past the payload.
    let mut p = Ipv6Packet::tcp(CLIENT, 41500, VIP, 80);
    p.ext = vec![IPV6_DEST_OPTS];
    let mut pkt = p.build();
    pkt[14 + 40 + 1] = 200;
    assert_dropped(&f, &pkt, "drop_malformed");
    // A payload length shorter than the TCP header (the frame is whole).
    let mut pkt = Ipv6Packet::tcp(CLIENT, 41501, VIP, 80).build();
    pkt[18..20].copy_from_slice(&10u16.to_be_bytes());
    assert_dropped(&f, &pkt, "drop_malformed");
    // A payload length longer than the frame.
    let mut pkt = Ipv6Packet::tcp(CLIENT, 41502, VIP, 80).build();
    pkt[18..20].copy_from_slice(&100u16.to_be_bytes());
    assert_dropped(&f, &pkt, "drop_malformed");
    // The same to another address: passed.
    let mut p = Ipv6Packet::tcp(CLIENT, 41503, OTHER, 80);
    p.ext = vec![IPV6_DEST_OPTS];
    let mut pkt = p.build();
    pkt[14 + 40 + 1] = 200;
    assert_passed_untouched(&f, &pkt, "pass_malformed");
    // Version 4 in an IPv6 EtherType.
    let mut pkt = Ipv6Packet::tcp(CLIENT, 41504, VIP, 80).build();
    pkt[14] = 0x40;
    assert_passed_untouched(&f, &pkt, "pass_malformed");
    assert_eq!(f.dp.vip_stats(0).unwrap().packets, 0);
}

#[test]
fn v4_and_v6_vips_side_by_side_keep_their_own_flows_and_counters() {
    let vip4 = Ipv4Addr::new(198, 18, 10, 1);
    let client4 = Ipv4Addr::new(198, 18, 0, 2);
    let mut f = Fixture::new();
    f.add_vip(0, (vip4, 80, IPPROTO_TCP), &[(1, 1), (2, 1)]);
    f.add_vip6(1, (VIP, 80, IPPROTO_TCP), &[(3, 1), (4, 1)], FORWARD_DSR_L2);
    for port in 42000..42050u16 {
        let b4 = assert_steered(&f, &Ipv4Packet::tcp(client4, port, vip4, 80).build());
        assert!([1, 2].contains(&b4), "{b4}");
        let b6 = assert_steered(&f, &Ipv6Packet::tcp(CLIENT, port, VIP, 80).build());
        assert!([3, 4].contains(&b6), "{b6}");
        let k4 = FlowKey::new(client4.to_bits(), port, vip4.to_bits(), 80, IPPROTO_TCP);
        assert_eq!(f.dp.conntrack_lookup(&k4).unwrap().unwrap().backend_id, b4);
        assert_eq!(
            f.dp.conntrack6_lookup(&key(port))
                .unwrap()
                .unwrap()
                .backend_id,
            b6
        );
    }
    assert_eq!(f.dp.vip_stats(0).unwrap().packets, 50);
    assert_eq!(f.dp.vip_stats(1).unwrap().packets, 50);
    assert_eq!(f.dp.conntrack_entries().unwrap().len(), 50);
    // The v6 VIP's address as an IPv4 packet's destination is no VIP (and
    // the other way round): each family looks in its own table.
    assert_passed_untouched(
        &f,
        &Ipv6Packet::tcp(CLIENT, 1, "::ffff:198.18.10.1".parse().unwrap(), 80).build(),
        "pass_not_vip",
    );
}

#[test]
fn a_v6_vip_in_a_tunnel_mode_with_an_ipv4_backend_is_dropped_never_misdelivered() {
    // 6in4 is not a mode lb sends: an IPv4 backend in a v6 tunnel VIP's
    // ring is dropped (the agent does not configure one).
    let mut f = Fixture::new();
    f.add_vip6(0, (VIP, 80, IPPROTO_TCP), &[(1, 1)], FORWARD_IPIP);
    f.set_backend4(0, 1, FORWARD_IPIP);
    assert_dropped(
        &f,
        &Ipv6Packet::tcp(CLIENT, 1, VIP, 80).build(),
        "drop_unsupported_forwarding",
    );
}

#[test]
fn a_removed_v6_vip_passes_and_a_v6_vip_without_backends_drops() {
    let mut f = three_backends();
    f.dp.remove_vip6(&lb_common::VipKey6::new(VIP, 80, IPPROTO_TCP))
        .unwrap();
    assert_passed_untouched(
        &f,
        &Ipv6Packet::tcp(CLIENT, 1, VIP, 80).build(),
        "pass_not_vip",
    );
    let mut f = Fixture::new();
    f.add_vip6(0, (VIP, 80, IPPROTO_TCP), &[], FORWARD_DSR_L2);
    assert_dropped(
        &f,
        &Ipv6Packet::tcp(CLIENT, 1, VIP, 80).build(),
        "drop_no_backend",
    );
}
