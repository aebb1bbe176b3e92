//! Schedulers for new flows at packet level: the real XDP program and
//! maps through BPF_PROG_TEST_RUN (one CPU, so a per-CPU rotation is the
//! whole rotation). Needs root.

use std::{collections::BTreeMap, net::Ipv4Addr, net::Ipv6Addr};

use lb::sched::Scheduler;
use lb_common::{FlowKey, IPPROTO_TCP, Runtime};
use lb_tests::{
    fixture::{Fixture, XDP_TX, backend_of_mac},
    packet::{Ipv4Packet, Ipv6Packet, TCP_ACK},
};

const VIP: Ipv4Addr = Ipv4Addr::new(198, 18, 10, 1);
const VIP6: Ipv6Addr = Ipv6Addr::new(0x2001, 2, 0, 0x10, 0, 0, 0, 1);
const CLIENT: Ipv4Addr = Ipv4Addr::new(198, 18, 0, 2);
const CLIENT6: Ipv6Addr = Ipv6Addr::new(0x2001, 2, 0, 0, 0, 0, 0, 2);
const TCP_FIN: u8 = 0x01;

fn set_scheduler(f: &mut Fixture, index: u32, s: Scheduler, members: &[(u32, u32)]) {
    f.set_scheduler(index, s, members);
}

/// The backend a frame went to (by its destination MAC).
fn sent_to(f: &Fixture, frame: &[u8]) -> u32 {
    let r = f.run(frame);
    assert_eq!(r.action, XDP_TX);
    backend_of_mac(&r.frame[0..6]).expect("a backend's MAC")
}

fn syn(port: u16) -> Vec<u8> {
    Ipv4Packet::tcp(CLIENT, port, VIP, 80).build()
}

fn with_flags(port: u16, flags: u8) -> Vec<u8> {
    let mut p = Ipv4Packet::tcp(CLIENT, port, VIP, 80);
    p.tcp_flags = flags;
    p.build()
}

fn shares(picks: &[u32]) -> BTreeMap<u32, usize> {
    let mut n = BTreeMap::new();
    for &b in picks {
        *n.entry(b).or_default() += 1;
    }
    n
}

#[test]
fn round_robin_rotates_exactly_over_three_backends() {
    let mut f = Fixture::new();
    f.add_vip(0, (VIP, 80, IPPROTO_TCP), &[(1, 1), (2, 1), (3, 1)]);
    set_scheduler(&mut f, 0, Scheduler::RoundRobin, &[(1, 1), (2, 1), (3, 1)]);
    let picks: Vec<u32> = (0..3000).map(|i| sent_to(&f, &syn(20000 + i))).collect();
    // One CPU: the exact cycle, whatever the first turn.
    for w in picks.windows(2) {
        assert_eq!(w[1], w[0] % 3 + 1, "{:?}", &picks[..12]);
    }
    for (&b, &n) in &shares(&picks) {
        assert!(n.abs_diff(1000) <= 1, "backend {b}: {n} of 3000");
    }
    // The ring would not have done this: its picks follow the hash.
    let key = |p: u16| FlowKey::new(CLIENT.to_bits(), p, VIP.to_bits(), 80, IPPROTO_TCP);
    let ring = f.dp.read_ring(0, f.dp.sizes().ring_size).unwrap();
    let by_ring: Vec<u32> = (0..3000u16)
        .map(|i| ring[lb_common::ring_slot(key(20000 + i).hash(), f.dp.sizes().ring_size) as usize])
        .collect();
    assert_ne!(by_ring, picks);
    // Each flow is recorded with the backend the rotation gave it, and
    // its next packet follows the record, not the rotation.
    for i in [0u16, 1, 2, 1234] {
        let e = f.dp.conntrack_lookup(&key(20000 + i)).unwrap().unwrap();
        assert_eq!(e.backend_id, picks[i as usize]);
        assert_eq!(
            sent_to(&f, &with_flags(20000 + i, TCP_ACK)),
            picks[i as usize]
        );
    }
}

#[test]
fn round_robin_rotates_an_ipv6_vip_too() {
    let mut f = Fixture::new();
    f.add_vip6(0, (VIP6, 80, IPPROTO_TCP), &[(1, 1), (2, 1), (3, 1)], 0);
    set_scheduler(&mut f, 0, Scheduler::RoundRobin, &[(1, 1), (2, 1), (3, 1)]);
    let picks: Vec<u32> = (0..300)
        .map(|i| sent_to(&f, &Ipv6Packet::tcp(CLIENT6, 20000 + i, VIP6, 80).build()))
        .collect();
    for w in picks.windows(2) {
        assert_eq!(w[1], w[0] % 3 + 1);
    }
}

#[test]
fn weighted_round_robin_1_2_3_over_30k_flows_is_within_2_points() {
    let mut f = Fixture::new();
    let members = [(1, 1), (2, 2), (3, 3)];
    f.add_vip(0, (VIP, 80, IPPROTO_TCP), &members);
    set_scheduler(&mut f, 0, Scheduler::WeightedRoundRobin, &members);
    let mut picks = Vec::new();
    for i in 0..30_000u32 {
        // Distinct source address and port per flow.
        let src = Ipv4Addr::from_bits(CLIENT.to_bits() + (i >> 14));
        let pkt = Ipv4Packet::tcp(src, 10000 + (i & 0x3fff) as u16, VIP, 80).build();
        picks.push(sent_to(&f, &pkt));
    }
    let n = shares(&picks);
    for (b, want) in [(1u32, 1.0 / 6.0), (2, 2.0 / 6.0), (3, 3.0 / 6.0)] {
        let got = n[&b] as f64 / 30_000.0;
        assert!(
            (got - want).abs() < 0.02,
            "backend {b}: {:.2} % (want {:.2} %)",
            got * 100.0,
            want * 100.0
        );
    }
    // Interleaved: no backend gets a run of its whole share.
    assert!(picks.windows(3).all(|w| !(w[0] == w[1] && w[1] == w[2])));
}

#[test]
fn least_connections_picks_the_least_loaded_per_weight_and_counts_opens_and_closes() {
    let mut f = Fixture::new();
    let members = [(1, 1), (2, 1), (3, 2)];
    f.add_vip(0, (VIP, 80, IPPROTO_TCP), &members);
    set_scheduler(&mut f, 0, Scheduler::LeastConnections, &members);
    // 40 new connections, none closed: shares by weight 1:1:2.
    let picks: Vec<u32> = (0..40).map(|i| sent_to(&f, &syn(30000 + i))).collect();
    let n = shares(&picks);
    assert_eq!((n[&1], n[&2], n[&3]), (10, 10, 20), "{picks:?}");
    let words = |id| f.dp.lc_words(id).unwrap();
    assert_eq!(words(1), (10, 0));
    assert_eq!(words(3), (20, 0));
    // Established packets move no count.
    sent_to(&f, &with_flags(30000, TCP_ACK));
    assert_eq!(f.dp.lc_active(&[1, 2, 3]).unwrap()[&picks[0]], 10);
    // Backend 1's connections close (FIN, then a second FIN and an RST
    // of the same flows: counted once per record).
    let ones: Vec<u16> = (0..40u16).filter(|&i| picks[i as usize] == 1).collect();
    for &i in &ones {
        assert_eq!(sent_to(&f, &with_flags(30000 + i, TCP_FIN | TCP_ACK)), 1);
        sent_to(&f, &with_flags(30000 + i, TCP_FIN | TCP_ACK));
    }
    assert_eq!(words(1), (0, 0));
    // So the next 10 new connections all go to backend 1 (0 < 10/1, 20/2).
    let next: Vec<u32> = (0..10).map(|i| sent_to(&f, &syn(31000 + i))).collect();
    assert_eq!(next, [1; 10]);
    // Ties are broken by rotation: all at 10 per unit of weight now, the
    // next 4 go to each in turn by weight (3 takes two before it is above).
    let more: Vec<u32> = (0..4).map(|i| sent_to(&f, &syn(32000 + i))).collect();
    let m = shares(&more);
    assert_eq!((m[&1], m[&2], m[&3]), (1, 1, 2), "{more:?}");
    // The agent's correction is added: backend 2 said to hold 100 gets
    // nothing while the others are below.
    let (a2, _) = words(2);
    f.dp.set_lc_correction(2, 100u64.wrapping_sub(a2)).unwrap();
    assert_eq!(f.dp.lc_active(&[2]).unwrap()[&2], 100);
    let after: Vec<u32> = (0..20).map(|i| sent_to(&f, &syn(33000 + i))).collect();
    assert!(!after.contains(&2), "{after:?}");
}

#[test]
fn established_flows_stay_on_their_backend_when_the_scheduler_changes() {
    let mut f = Fixture::new();
    let members = [(1, 1), (2, 1), (3, 1)];
    f.add_vip(0, (VIP, 80, IPPROTO_TCP), &members);
    let before: Vec<u32> = (0..60).map(|i| sent_to(&f, &syn(40000 + i))).collect();
    set_scheduler(&mut f, 0, Scheduler::RoundRobin, &members);
    for i in 0..60u16 {
        assert_eq!(
            sent_to(&f, &with_flags(40000 + i, TCP_ACK)),
            before[i as usize]
        );
    }
    // New flows rotate; back to maglev, they follow the ring again and
    // the established ones still stay.
    let rr: Vec<u32> = (0..6).map(|i| sent_to(&f, &syn(41000 + i))).collect();
    assert!(rr.windows(2).all(|w| w[1] == w[0] % 3 + 1), "{rr:?}");
    set_scheduler(&mut f, 0, Scheduler::Maglev, &members);
    let ring = f.dp.read_ring(0, f.dp.sizes().ring_size).unwrap();
    for i in 0..6u16 {
        let k = FlowKey::new(CLIENT.to_bits(), 42000 + i, VIP.to_bits(), 80, IPPROTO_TCP);
        let want = ring[lb_common::ring_slot(k.hash(), f.dp.sizes().ring_size) as usize];
        assert_eq!(sent_to(&f, &syn(42000 + i)), want);
        assert_eq!(sent_to(&f, &with_flags(41000 + i, TCP_ACK)), rr[i as usize]);
    }
}

#[test]
fn a_nat_vip_with_round_robin_rotates_and_least_connections_counts_its_pairs() {
    let mut f = Fixture::new();
    let members = [(1, 1), (2, 1), (3, 1)];
    f.add_nat_vip(0, (VIP, 80, IPPROTO_TCP), &members, 8080);
    f.dp.set_runtime(Runtime {
        now_ms: 1_000,
        udp_idle_ms: 30_000,
        tcp_idle_ms: 300_000,
        tcp_closing_ms: 10_000,
        nat_port_min: 40000,
        nat_port_max: 40999,
        ..Runtime::default()
    })
    .unwrap();
    set_scheduler(&mut f, 0, Scheduler::RoundRobin, &members);
    let picks: Vec<u32> = (0..30).map(|i| sent_to(&f, &syn(50000 + i))).collect();
    assert!(picks.windows(2).all(|w| w[1] == w[0] % 3 + 1), "{picks:?}");
    for i in 0..30u16 {
        let k = FlowKey::new(CLIENT.to_bits(), 50000 + i, VIP.to_bits(), 80, IPPROTO_TCP);
        assert_eq!(
            f.dp.nat_fwd(&k).unwrap().unwrap().backend_id,
            picks[i as usize]
        );
    }

    set_scheduler(&mut f, 0, Scheduler::LeastConnections, &members);
    let lc: Vec<u32> = (0..30).map(|i| sent_to(&f, &syn(51000 + i))).collect();
    let n = shares(&lc);
    assert_eq!((n[&1], n[&2], n[&3]), (10, 10, 10));
    assert_eq!(f.dp.lc_words(2).unwrap(), (10, 0));
    for i in (0..30u16).filter(|&i| lc[i as usize] == 2) {
        assert_eq!(sent_to(&f, &with_flags(51000 + i, TCP_FIN | TCP_ACK)), 2);
    }
    assert_eq!(f.dp.lc_words(2).unwrap(), (0, 0));
    let next: Vec<u32> = (0..10).map(|i| sent_to(&f, &syn(52000 + i))).collect();
    assert_eq!(next, [2; 10]);
}

#[test]
fn a_vip_whose_scheduler_has_no_backend_drops_like_an_empty_ring() {
    let mut f = Fixture::new();
    f.add_vip(0, (VIP, 80, IPPROTO_TCP), &[]);
    set_scheduler(&mut f, 0, Scheduler::LeastConnections, &[]);
    let r = f.run(&syn(60000));
    assert_eq!(r.action, lb_tests::fixture::XDP_DROP);
    assert_eq!(f.reasons().get("drop_no_backend"), Some(&1));
}

/// Under the SYN-flood guard a round-robin VIP's SYN goes by the Maglev
/// ring unrecorded, and its ACK (no record, no SYN) by the same ring: the
/// handshake stays on one backend whatever the rotation says.
#[test]
fn under_the_syn_guard_a_round_robin_vips_handshake_stays_on_one_backend() {
    lb_tests::require_root();
    let mut f = Fixture::new();
    let members = [(1, 1), (2, 1), (3, 1)];
    f.add_vip(0, (VIP, 80, IPPROTO_TCP), &members);
    set_scheduler(&mut f, 0, Scheduler::RoundRobin, &members);
    f.dp.set_runtime(Runtime {
        now_ms: 1_000,
        tcp_idle_ms: 60_000,
        tcp_closing_ms: 10_000,
        udp_idle_ms: 30_000,
        // Every SYN unrecorded.
        syn_guard: 1,
        ..Runtime::default()
    })
    .unwrap();
    let mut backends = std::collections::BTreeSet::new();
    for port in 48_000..48_030u16 {
        let to = sent_to(&f, &syn(port));
        let key = FlowKey::new(CLIENT.to_bits(), port, VIP.to_bits(), 80, IPPROTO_TCP);
        assert_eq!(f.dp.conntrack_lookup(&key).unwrap(), None, "port {port}");
        // The rotation would move each next pick; the ring does not.
        assert_eq!(sent_to(&f, &with_flags(port, TCP_ACK)), to, "port {port}");
        assert_eq!(sent_to(&f, &with_flags(port, TCP_ACK)), to, "port {port}");
        assert_eq!(
            f.dp.conntrack_lookup(&key).unwrap().map(|e| e.backend_id),
            Some(to)
        );
        backends.insert(to);
    }
    assert_eq!(
        backends.len(),
        3,
        "30 flows over the ring reach every backend"
    );
}
