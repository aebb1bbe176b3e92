//! Packet-level tests: the real compiled XDP program, real kernel maps,
//! crafted frames in, action and bytes out (BPF_PROG_TEST_RUN). Needs root.

use std::{collections::BTreeMap, net::Ipv4Addr};

use lb_common::{FlowKey, IPPROTO_TCP, IPPROTO_UDP};
use lb_tests::{
    fixture::{
        Fixture, LB_MAC, XDP_ABORTED, XDP_DROP, XDP_PASS, XDP_TX, assert_dropped,
        assert_passed_untouched, backend_mac, backend_of_mac, moved,
    },
    packet::{IP_MF, Ipv4Packet, TCP_ACK, arp_request, icmp_echo, ipv6_tcp},
    testprogs::{self, TestProgs},
};

const VIP: Ipv4Addr = Ipv4Addr::new(198, 18, 10, 1);
const CLIENT: Ipv4Addr = Ipv4Addr::new(198, 18, 0, 2);
const OTHER: Ipv4Addr = Ipv4Addr::new(198, 18, 0, 99);

fn tcp_vip() -> (Ipv4Addr, u16, u8) {
    (VIP, 80, IPPROTO_TCP)
}

/// A fixture with one TCP VIP over backends 1, 2, 3 (equal weights).
fn three_backends() -> Fixture {
    let mut f = Fixture::new();
    f.add_vip(0, tcp_vip(), &[(1, 1), (2, 1), (3, 1)]);
    f
}

/// A source port in `ports` whose new flow the ring gives to `backend`.
fn port_steered_to(f: &Fixture, ports: std::ops::Range<u16>, backend: u32) -> u16 {
    let m = f.dp.sizes().ring_size;
    let ring = f.dp.read_ring(0, m).unwrap();
    ports
        .into_iter()
        .find(|&p| {
            let key = FlowKey::new(CLIENT.to_bits(), p, VIP.to_bits(), 80, IPPROTO_TCP);
            ring[lb_common::ring_slot(key.hash(), m) as usize] == backend
        })
        .expect("some port maps to the backend")
}

#[test]
fn vip_tcp_syn_is_sent_back_out_with_the_backend_mac_and_unchanged_l3_l4() {
    let f = three_backends();
    let pkt = Ipv4Packet::tcp(CLIENT, 40000, VIP, 80).build();
    let r = f.run(&pkt);
    assert_eq!(r.action, XDP_TX);
    assert_eq!(r.frame.len(), pkt.len());
    let backend = backend_of_mac(&r.frame[0..6]).expect("dst MAC is a backend's");
    assert!((1..=3).contains(&backend));
    assert_eq!(&r.frame[0..6], &backend_mac(backend));
    assert_eq!(
        &r.frame[6..12],
        &LB_MAC,
        "src MAC is the egress interface's"
    );
    assert_eq!(&r.frame[12..], &pkt[12..], "IP and TCP bytes untouched");

    // The flow was recorded, and userspace predicts the backend with the
    // same hash the kernel used.
    let key = FlowKey::new(CLIENT.to_bits(), 40000, VIP.to_bits(), 80, IPPROTO_TCP);
    let entry = f.dp.conntrack_lookup(&key).unwrap().expect("flow recorded");
    assert_eq!(entry.backend_id, backend);
    let ring = f.dp.read_ring(0, f.dp.sizes().ring_size).unwrap();
    let slot = lb_common::ring_slot(key.hash(), f.dp.sizes().ring_size);
    assert_eq!(ring[slot as usize], backend);

    let s = f.dp.vip_stats(0).unwrap();
    assert_eq!(
        (s.packets, s.bytes, s.new_flows, s.conntrack_hits),
        (1, pkt.len() as u64, 1, 0)
    );
    let b = f.dp.backend_stats(backend).unwrap();
    assert_eq!((b.packets, b.bytes), (1, pkt.len() as u64));
}

#[test]
fn second_packet_of_a_flow_takes_the_same_backend_as_a_conntrack_hit() {
    let f = three_backends();
    let mut p = Ipv4Packet::tcp(CLIENT, 40001, VIP, 80);
    let first = f.run(&p.build());
    p.tcp_flags = TCP_ACK;
    p.payload = b"GET / HTTP/1.1\r\n\r\n".to_vec();
    let second = f.run(&p.build());
    assert_eq!((first.action, second.action), (XDP_TX, XDP_TX));
    assert_eq!(first.frame[0..6], second.frame[0..6]);
    let s = f.dp.vip_stats(0).unwrap();
    assert_eq!((s.packets, s.new_flows, s.conntrack_hits), (2, 1, 1));
}

#[test]
fn a_new_syn_follows_the_ring_even_over_an_old_conntrack_entry() {
    let mut f = three_backends();
    // Find a source port whose flow the ring sends to backend 1.
    let port = port_steered_to(&f, 30_000..31_000, 1);
    let syn = Ipv4Packet::tcp(CLIENT, port, VIP, 80);
    assert_eq!(backend_of_mac(&f.run(&syn.build()).frame), Some(1));
    // The ring changes (1 leaves it, but stays usable: drained).
    f.write_ring(0, &[(2, 1), (3, 1)]);
    let mut ack = syn.clone();
    ack.tcp_flags = TCP_ACK;
    assert_eq!(
        backend_of_mac(&f.run(&ack.build()).frame),
        Some(1),
        "established: conntrack"
    );
    // A new connection from the same port (a SYN) follows the ring.
    let now = backend_of_mac(&f.run(&syn.build()).frame).unwrap();
    assert!(now == 2 || now == 3, "SYN went to {now}");
    // And its next packets stay there.
    assert_eq!(backend_of_mac(&f.run(&ack.build()).frame), Some(now));
    let s = f.dp.vip_stats(0).unwrap();
    assert_eq!((s.new_flows, s.conntrack_hits), (2, 2));
}

#[test]
fn thirty_thousand_flows_split_by_weight_1_1_2() {
    let mut f = Fixture::new();
    f.add_vip(0, tcp_vip(), &[(1, 1), (2, 1), (3, 2)]);
    let mut counts = BTreeMap::<u32, u32>::new();
    let n = 30_000u32;
    for i in 0..n {
        let src = Ipv4Addr::from_bits(CLIENT.to_bits() + (i / 20_000));
        let p = Ipv4Packet::tcp(src, 10_000 + (i % 20_000) as u16, VIP, 80).build();
        let r = f.run(&p);
        assert_eq!(r.action, XDP_TX);
        *counts.entry(backend_of_mac(&r.frame).unwrap()).or_default() += 1;
    }
    let share = |id| 100.0 * counts.get(&id).copied().unwrap_or(0) as f64 / n as f64;
    for (id, want) in [(1, 25.0), (2, 25.0), (3, 50.0)] {
        assert!(
            (share(id) - want).abs() <= 2.0,
            "backend {id}: {:.2}% of flows, want {want}% ± 2 ({counts:?})",
            share(id)
        );
    }
    let s = f.dp.vip_stats(0).unwrap();
    assert_eq!(s.new_flows, n as u64);
}

#[test]
fn removing_a_backend_keeps_established_flows_on_the_survivors() {
    let mut f = three_backends();
    let flows: Vec<Vec<u8>> = (0..3000u16)
        .map(|i| Ipv4Packet::tcp(CLIENT, 20_000 + i, VIP, 80).build())
        .collect();
    let before: Vec<u32> = flows
        .iter()
        .map(|p| backend_of_mac(&f.run(p).frame).unwrap())
        .collect();
    assert!(before.contains(&3));

    // Backend 3 leaves: the ring is rebuilt without it and its entry is
    // marked unusable (the agent's order of operations).
    f.write_ring(0, &[(1, 1), (2, 1)]);
    let mut gone = f.dp.backend(3).unwrap();
    gone.flags = 0;
    f.dp.set_backend(3, gone).unwrap();

    // The flows' next packets (ACKs: a SYN would open a new connection).
    let flows: Vec<Vec<u8>> = (0..3000u16)
        .map(|i| {
            let mut p = Ipv4Packet::tcp(CLIENT, 20_000 + i, VIP, 80);
            p.tcp_flags = TCP_ACK;
            p.build()
        })
        .collect();
    let hits_before = f.dp.vip_stats(0).unwrap().conntrack_hits;
    let mut moved_from_3 = 0;
    for (p, &was) in flows.iter().zip(&before) {
        let now = backend_of_mac(&f.run(p).frame).unwrap();
        if was == 3 {
            assert_ne!(now, 3, "flows of a removed backend are re-steered");
            moved_from_3 += 1;
        } else {
            assert_eq!(now, was, "an established flow must stay on its backend");
        }
    }
    let s = f.dp.vip_stats(0).unwrap();
    assert_eq!(s.conntrack_hits - hits_before, 3000 - moved_from_3);
}

#[test]
fn traffic_not_for_a_vip_passes_untouched() {
    let f = three_backends();
    // Another address, another port of the VIP, another protocol.
    assert_passed_untouched(
        &f,
        &Ipv4Packet::tcp(CLIENT, 1, OTHER, 80).build(),
        "pass_not_vip",
    );
    assert_passed_untouched(
        &f,
        &Ipv4Packet::tcp(CLIENT, 1, VIP, 443).build(),
        "pass_not_vip",
    );
    assert_passed_untouched(
        &f,
        &Ipv4Packet::udp(CLIENT, 1, VIP, 80).build(),
        "pass_not_vip",
    );
    assert_passed_untouched(&f, &icmp_echo(CLIENT, VIP), "pass_not_vip");
    assert_passed_untouched(&f, &arp_request(CLIENT, VIP), "pass_not_ip");
    let v6 = ipv6_tcp(
        "2001:2::2".parse().unwrap(),
        "2001:2::10".parse().unwrap(),
        80,
    );
    // Not a VIP of either family (none is configured for IPv6).
    assert_passed_untouched(&f, &v6, "pass_not_vip");
    assert_eq!(f.dp.vip_stats(0).unwrap().packets, 0);
}

#[test]
fn vlan_tagged_vip_traffic_is_balanced_and_keeps_its_tag() {
    let f = three_backends();
    let mut p = Ipv4Packet::tcp(CLIENT, 40002, VIP, 80);
    p.vlan = Some(42);
    let pkt = p.build();
    let r = f.run(&pkt);
    assert_eq!(r.action, XDP_TX);
    assert!(backend_of_mac(&r.frame).is_some());
    assert_eq!(&r.frame[12..], &pkt[12..], "tag, IP and TCP untouched");
    // Same flow untagged: same backend (VLAN is not part of the flow).
    let untagged = f.run(&Ipv4Packet::tcp(CLIENT, 40002, VIP, 80).build());
    assert_eq!(untagged.frame[0..6], r.frame[0..6]);
}

#[test]
fn ipv4_options_are_skipped_by_ihl() {
    let f = three_backends();
    let mut p = Ipv4Packet::tcp(CLIENT, 40003, VIP, 80);
    // Record-route-like option bytes, 8 bytes: IHL = 7.
    p.options = vec![7, 7, 4, 0, 0, 0, 0, 1];
    let pkt = p.build();
    let r = f.run(&pkt);
    assert_eq!(r.action, XDP_TX);
    assert_eq!(&r.frame[12..], &pkt[12..]);
    // The ports were read after the options: the flow was recorded with
    // source port 40003.
    let key = FlowKey::new(CLIENT.to_bits(), 40003, VIP.to_bits(), 80, IPPROTO_TCP);
    assert!(f.dp.conntrack_lookup(&key).unwrap().is_some());
    // With 40 bytes of options (IHL 15) too.
    p.options = vec![1; 40];
    p.src_port = 40004;
    assert_eq!(f.run(&p.build()).action, XDP_TX);
}

#[test]
fn fragments_are_never_forwarded() {
    let f = three_backends();
    let before = f.reasons();
    let mut first = Ipv4Packet::tcp(CLIENT, 40005, VIP, 80);
    first.frag = IP_MF;
    assert_eq!(f.run(&first.build()).action, XDP_DROP);
    let mut later = Ipv4Packet::tcp(CLIENT, 40005, VIP, 80);
    later.frag = 185; // offset 1480 bytes, no MF: the last fragment
    assert_eq!(f.run(&later.build()).action, XDP_DROP);
    assert_eq!(
        moved(&before, &f.reasons()),
        BTreeMap::from([("drop_fragment", 2)])
    );
    // A fragment for someone else goes to the kernel untouched.
    let mut other = Ipv4Packet::udp(CLIENT, 5000, OTHER, 5000);
    other.frag = IP_MF;
    assert_passed_untouched(&f, &other.build(), "pass_fragment");
    assert_eq!(f.dp.vip_stats(0).unwrap().packets, 0);
}

/// Which counter a VIP TCP frame cut to `len` bytes must hit.
fn expected_reason_for_truncation(len: usize, full: usize) -> Option<&'static str> {
    match len {
        // IPv4 header incomplete: the destination cannot be trusted.
        14..34 => Some("pass_malformed"),
        // The header names the VIP but the frame is shorter than its
        // total length (or the TCP header is cut): dropped.
        _ if len < full => Some("drop_malformed"),
        _ => None,
    }
}

#[test]
fn every_truncation_of_a_vip_packet_is_passed_or_dropped_with_its_reason() {
    for vlan in [None, Some(7)] {
        let f = three_backends();
        let mut p = Ipv4Packet::tcp(CLIENT, 40006, VIP, 80);
        p.vlan = vlan;
        p.payload = b"data".to_vec();
        let pkt = p.build();
        let l2 = if vlan.is_some() { 4 } else { 0 };
        for len in 0..=pkt.len() {
            let before = f.reasons();
            let r = match f.try_run(&pkt[..len]) {
                Ok(r) => r,
                // The kernel never runs XDP on a frame shorter than an
                // Ethernet header: BPF_PROG_TEST_RUN refuses it (EINVAL),
                // as drivers do. Anything from 14 bytes up reaches lb.
                Err(e) if len < 14 => {
                    let msg = format!("{e:?}");
                    assert!(msg.contains("InvalidInput"), "len {len}: {msg}");
                    continue;
                }
                Err(e) => panic!("len {len}: {e:?}"),
            };
            assert_ne!(r.action, XDP_ABORTED, "len {len}");
            // Shift the expectations by the VLAN tag's 4 bytes.
            let want = match len {
                0..14 => Some("pass_short_frame"),
                _ if len < 14 + l2 => Some("pass_short_frame"),
                _ => expected_reason_for_truncation(len - l2, pkt.len() - l2),
            };
            match want {
                Some(reason) => {
                    let want_action = if reason.starts_with("drop") {
                        XDP_DROP
                    } else {
                        XDP_PASS
                    };
                    assert_eq!(r.action, want_action, "len {len} ({reason})");
                    assert_eq!(
                        moved(&before, &f.reasons()),
                        BTreeMap::from([(reason, 1)]),
                        "len {len}"
                    );
                    if want_action == XDP_PASS {
                        assert_eq!(r.frame, &pkt[..len], "len {len}: passed untouched");
                    }
                }
                None => assert_eq!(r.action, XDP_TX, "the whole packet is forwarded"),
            }
        }
    }
}

#[test]
fn malformed_ipv4_headers_are_not_forwarded() {
    let f = three_backends();
    let good = Ipv4Packet::tcp(CLIENT, 40007, VIP, 80).build();
    type Case = (&'static str, fn(&mut Vec<u8>), &'static str);
    let cases: [Case; 4] = [
        ("IHL below 5", |p| p[14] = 0x44, "drop_malformed"),
        (
            "version 6 in an IPv4 frame",
            |p| p[14] = 0x65,
            "pass_malformed",
        ),
        (
            "total length beyond the frame",
            |p| p[16..18].copy_from_slice(&200u16.to_be_bytes()),
            "drop_malformed",
        ),
        (
            "total length shorter than the TCP header",
            |p| p[16..18].copy_from_slice(&30u16.to_be_bytes()),
            "drop_malformed",
        ),
    ];
    for (what, mangle, reason) in cases {
        let mut p = good.clone();
        mangle(&mut p);
        let before = f.reasons();
        let r = f.run(&p);
        let want = if reason.starts_with("drop") {
            XDP_DROP
        } else {
            XDP_PASS
        };
        assert_eq!(r.action, want, "{what}");
        assert_eq!(
            moved(&before, &f.reasons()),
            BTreeMap::from([(reason, 1)]),
            "{what}"
        );
    }
}

#[test]
fn a_frame_whose_ip_packet_ends_inside_the_ports_is_dropped_only_for_a_vip() {
    let f = three_backends();
    // IPv4 total length: the header and 2 bytes (half the ports), and the
    // frame ends there too.
    let cut = |dst: Ipv4Addr| {
        let mut p = Ipv4Packet::tcp(CLIENT, 40008, dst, 80).build();
        p[16..18].copy_from_slice(&22u16.to_be_bytes());
        p.truncate(14 + 22);
        p
    };
    assert_dropped(&f, &cut(VIP), "drop_malformed");
    assert_passed_untouched(&f, &cut(OTHER), "pass_malformed");
}

/// The test and benchmark programs (lb-ebpf-testprogs), outside the
/// production object: the floor swaps MACs, the generator stamps its
/// template, the return-only program passes, the reference forwarder
/// forwards its VIP's packets by a fixed hash.
#[test]
fn the_test_programs_do_what_the_benchmarks_rely_on() {
    lb_tests::require_root();
    let mut progs = TestProgs::load().unwrap();
    let frame = Ipv4Packet::tcp(CLIENT, 40009, VIP, 80).build();

    let r = progs.run(testprogs::FLOOR, &frame).unwrap();
    assert_eq!(r.action, XDP_TX);
    assert_eq!(
        (&r.frame[..6], &r.frame[6..12]),
        (&frame[6..12], &frame[..6])
    );
    assert_eq!(r.frame[12..], frame[12..]);

    let r = progs.run(testprogs::RETURN_ONLY, &frame).unwrap();
    assert_eq!((r.action, &r.frame), (XDP_PASS, &frame));

    // Unset template: frames go out as they are.
    let r = progs.run(testprogs::GEN_TX, &frame).unwrap();
    assert_eq!((r.action, &r.frame), (XDP_TX, &frame));
    let mut template = Ipv4Packet::udp(OTHER, 9, CLIENT, 9);
    template.payload = vec![0x5a; 18];
    let template = template.build();
    progs.set_gen_template(&template).unwrap();
    let r = progs.run(testprogs::GEN_TX, &frame).unwrap();
    assert_eq!(r.action, XDP_TX);
    assert_eq!(r.frame[..48], template[..48]);
    assert_eq!(r.frame[48..], frame[48..]);

    // The reference forwarder: unset, everything passes; set, a packet to
    // its VIP goes back out to one of the backends' MACs (the same one
    // for the same flow, every backend for some flow), with the LB's MAC
    // as source and nothing else changed; other packets pass.
    let r = progs.run(testprogs::REF_FWD, &frame).unwrap();
    assert_eq!((r.action, &r.frame), (XDP_PASS, &frame));
    let lb_mac = [2, 0, 0, 0, 0, 0xaa];
    let macs = [[2, 0, 0, 0, 0, 1], [2, 0, 0, 0, 0, 2], [2, 0, 0, 0, 0, 3]];
    progs
        .set_ref_forward(VIP, 80, IPPROTO_TCP, lb_mac, &macs)
        .unwrap();
    let mut seen = std::collections::BTreeSet::new();
    for port in 40000..40064 {
        let frame = Ipv4Packet::tcp(CLIENT, port, VIP, 80).build();
        let r = progs.run(testprogs::REF_FWD, &frame).unwrap();
        assert_eq!(r.action, XDP_TX, "source port {port}");
        assert_eq!(r.frame[6..12], lb_mac);
        assert_eq!(r.frame[12..], frame[12..]);
        let dst: [u8; 6] = r.frame[..6].try_into().unwrap();
        assert!(macs.contains(&dst), "source port {port}: {dst:?}");
        let again = progs.run(testprogs::REF_FWD, &frame).unwrap();
        assert_eq!(
            again.frame, r.frame,
            "source port {port}: same flow, same backend"
        );
        seen.insert(dst);
    }
    assert_eq!(seen.len(), 3, "64 flows reach every backend");
    for other in [
        Ipv4Packet::tcp(CLIENT, 40000, VIP, 81).build(),
        Ipv4Packet::udp(CLIENT, 40000, VIP, 80).build(),
        Ipv4Packet::tcp(CLIENT, 40000, OTHER, 80).build(),
    ] {
        let r = progs.run(testprogs::REF_FWD, &other).unwrap();
        assert_eq!((r.action, &r.frame), (XDP_PASS, &other));
    }
}

#[test]
fn udp_vip_is_balanced_per_flow() {
    let mut f = Fixture::new();
    f.add_vip(1, (VIP, 53, IPPROTO_UDP), &[(10, 1), (11, 1)]);
    let p = Ipv4Packet::udp(CLIENT, 5353, VIP, 53).build();
    let a = f.run(&p);
    let b = f.run(&p);
    assert_eq!((a.action, b.action), (XDP_TX, XDP_TX));
    let id = backend_of_mac(&a.frame).unwrap();
    assert!(id == 10 || id == 11);
    assert_eq!(a.frame[0..6], b.frame[0..6]);
    assert_eq!(&a.frame[12..], &p[12..]);
    let s = f.dp.vip_stats(1).unwrap();
    assert_eq!((s.packets, s.new_flows, s.conntrack_hits), (2, 1, 1));
    // TCP to the same port is not this VIP.
    assert_passed_untouched(
        &f,
        &Ipv4Packet::tcp(CLIENT, 5353, VIP, 53).build(),
        "pass_not_vip",
    );
}

#[test]
fn a_vip_without_backends_drops_with_its_reason() {
    let mut f = Fixture::new();
    f.add_vip(0, tcp_vip(), &[]);
    assert_dropped(
        &f,
        &Ipv4Packet::tcp(CLIENT, 40008, VIP, 80).build(),
        "drop_no_backend",
    );
}

#[test]
fn a_backend_behind_an_unknown_egress_port_is_dropped_not_aborted() {
    let mut f = three_backends();
    for id in 1..=3 {
        let mut b = f.dp.backend(id).unwrap();
        b.ifindex = 999_999;
        f.dp.set_backend(id, b).unwrap();
    }
    assert_dropped(
        &f,
        &Ipv4Packet::tcp(CLIENT, 40009, VIP, 80).build(),
        "drop_no_tx_port",
    );
}

#[test]
fn the_vip_table_finds_every_vip_after_removals_and_reinserts() {
    use lb_common::{VipInfo, VipKey};
    let mut f = Fixture::new();
    f.add_vip(0, tcp_vip(), &[(1, 1)]);
    // Many services on one address: every one must be found, also after
    // some are removed (tombstones) and others inserted in their place.
    let info = VipInfo {
        index: 0,
        ring_base: 0,
        ring_size: f.dp.sizes().ring_size,
        ..VipInfo::default()
    };
    let key = |port: u16| VipKey::new(VIP.to_bits(), port, IPPROTO_TCP);
    for port in 1000..1010u16 {
        f.dp.set_vip(key(port), info).unwrap();
    }
    for port in (1000..1010u16).step_by(2) {
        f.dp.remove_vip(&key(port)).unwrap();
    }
    for port in 2000..2005u16 {
        f.dp.set_vip(key(port), info).unwrap();
    }
    let forwarded = |port| {
        f.run(&Ipv4Packet::tcp(CLIENT, 5000, VIP, port).build())
            .action
    };
    for port in (1001..1010u16).step_by(2).chain(2000..2005).chain([80]) {
        assert_eq!(forwarded(port), XDP_TX, "port {port} is a VIP");
    }
    for port in (1000..1010u16).step_by(2).chain([443]) {
        assert_eq!(forwarded(port), XDP_PASS, "port {port} is not a VIP");
    }
    // The table reports exactly the live entries (services + 1 marker).
    let live = f.dp.vips().unwrap();
    assert_eq!(live.len(), 1 + 1 + 5 + 5);
}

/// Runs `f` on a thread pinned to `cpu` (BPF_PROG_TEST_RUN runs the
/// program on the calling CPU).
fn on_cpu<T: Send>(cpu: usize, f: impl FnOnce() -> T + Send) -> T {
    std::thread::scope(|s| {
        s.spawn(|| {
            // SAFETY: a zeroed cpu_set_t with one bit set.
            unsafe {
                let mut set: libc::cpu_set_t = std::mem::zeroed();
                libc::CPU_SET(cpu, &mut set);
                assert_eq!(
                    libc::sched_setaffinity(0, std::mem::size_of::<libc::cpu_set_t>(), &set),
                    0,
                    "pinning to CPU {cpu}"
                );
            }
            f()
        })
        .join()
        .unwrap()
    })
}

#[test]
fn a_new_connection_seen_on_one_cpu_steers_its_next_packets_on_another() {
    let cpus = std::thread::available_parallelism().map_or(1, |n| n.get());
    assert!(
        cpus >= 2,
        "this test needs two CPUs, the machine has {cpus}"
    );
    let mut f = three_backends();
    let port = port_steered_to(&f, 31_000..32_000, 1);
    let syn = Ipv4Packet::tcp(CLIENT, port, VIP, 80);
    let mut ack = syn.clone();
    ack.tcp_flags = TCP_ACK;
    let (syn, ack) = (syn.build(), ack.build());
    // A first connection from this port, handled on CPU 0: backend 1.
    let f = &mut f;
    on_cpu(0, || {
        assert_eq!(backend_of_mac(&f.run(&syn).frame), Some(1));
        assert_eq!(backend_of_mac(&f.run(&ack).frame), Some(1));
    });
    // Backend 1 leaves the ring; a new connection from the same port opens
    // on CPU 1 and goes elsewhere.
    f.write_ring(0, &[(2, 1), (3, 1)]);
    let now = on_cpu(1, || backend_of_mac(&f.run(&syn).frame).unwrap());
    assert_ne!(now, 1);
    // Its next packet arrives on CPU 0: same backend as its SYN.
    let next = on_cpu(0, || backend_of_mac(&f.run(&ack).frame).unwrap());
    assert_eq!(
        next, now,
        "CPU 0 must not steer by a stale record of the old connection"
    );
}
