//! Packet-level tests of the flow table's freshness and expiry and of the
//! egress length limit: the real XDP program and maps, driven through
//! BPF_PROG_TEST_RUN, with the flow clock (the RUNTIME map the agent keeps
//! current) set by the test. Needs root.

use std::{collections::BTreeMap, net::Ipv4Addr};

use lb::datapath::MapSizes;
use lb_common::{
    FLOW_FLAG_CLOSING, FlowKey, IPPROTO_TCP, IPPROTO_UDP, Runtime, flow_cache_mix, flow_cache_slot,
    ring_slot,
};
use lb_tests::{
    fixture::{Fixture, XDP_DROP, XDP_PASS, XDP_TX, backend_of_mac, moved},
    packet::{Ipv4Packet, TCP_ACK},
};

const VIP: Ipv4Addr = Ipv4Addr::new(198, 18, 10, 1);
const CLIENT: Ipv4Addr = Ipv4Addr::new(198, 18, 0, 2);
const TCP_FIN: u8 = 0x01;

fn fixture(conntrack_entries: u32, proto: u8) -> Fixture {
    let mut f = Fixture::with_sizes(MapSizes {
        max_vips: 4,
        max_backends: 64,
        ring_size: lb_common::DEFAULT_RING_SIZE,
        conntrack_entries,
        conntrack6_entries: conntrack_entries,
        nat_entries: 1024,
        acl_entries: 1024,
    });
    f.add_vip(0, (VIP, 80, proto), &[(1, 1), (2, 1), (3, 1)]);
    f
}

/// One tick of the flow clock, as the agent's flow keeper makes it: the
/// clock and timeouts written, then the flow cache cleared.
fn set_clock(f: &mut Fixture, now_ms: u64, udp: u32, tcp: u32, closing: u32) {
    f.dp.set_runtime(Runtime {
        now_ms,
        udp_idle_ms: udp,
        tcp_idle_ms: tcp,
        tcp_closing_ms: closing,
        ..Runtime::default()
    })
    .unwrap();
    f.dp.clear_flow_cache().unwrap();
}

fn key_of(p: &Ipv4Packet) -> FlowKey {
    FlowKey::new(
        p.src.to_bits(),
        p.src_port,
        p.dst.to_bits(),
        p.dst_port,
        p.proto,
    )
}

/// The backend the balancer sends `p` to (it must be forwarded).
fn backend(f: &Fixture, p: &Ipv4Packet) -> u32 {
    let r = f.run(&p.build());
    assert_eq!(r.action, XDP_TX, "{p:?} was not forwarded");
    backend_of_mac(&r.frame).expect("a backend's MAC")
}

/// The backend VIP 0's ring gives `key` now.
fn ring_backend(f: &Fixture, key: &FlowKey) -> u32 {
    let m = f.dp.sizes().ring_size;
    f.dp.read_ring(0, m).unwrap()[ring_slot(key.hash(), m) as usize]
}

/// Rewrites the ring without `gone` (it stays usable, as when drained).
fn ring_without(f: &mut Fixture, gone: u32) {
    let rest: Vec<(u32, u32)> = [1, 2, 3]
        .into_iter()
        .filter(|&b| b != gone)
        .map(|b| (b, 1))
        .collect();
    f.write_ring(0, &rest);
}

fn ack(mut p: Ipv4Packet) -> Ipv4Packet {
    p.tcp_flags = TCP_ACK;
    p
}

#[test]
fn a_flow_answered_by_the_cache_refreshes_its_record_once_per_tick() {
    let mut f = fixture(1 << 16, IPPROTO_TCP);
    set_clock(&mut f, 1_000, 30_000, 3_600_000, 30_000);
    let syn = Ipv4Packet::tcp(CLIENT, 40_000, VIP, 80);
    let key = key_of(&syn);
    let b = backend(&f, &syn);
    let ack = ack(syn);
    assert_eq!(backend(&f, &ack), b);
    assert_eq!(
        f.dp.conntrack_lookup(&key).unwrap().unwrap().last_seen_ms,
        1_000
    );
    // A later tick: the next packet (a cache hit until now) goes through
    // the record and stamps it.
    set_clock(&mut f, 1_100, 30_000, 3_600_000, 30_000);
    assert_eq!(backend(&f, &ack), b);
    let e = f.dp.conntrack_lookup(&key).unwrap().unwrap();
    assert_eq!((e.backend_id, e.last_seen_ms), (b, 1_100));
    let s = f.dp.vip_stats(0).unwrap();
    assert_eq!((s.new_flows, s.conntrack_hits), (1, 2));
}

#[test]
fn a_long_lived_flow_outlives_churn_that_never_touches_its_cache_slot() {
    // A 1024-record table, one long-lived connection, and 10 x 1024 new
    // flows from other sources, none of which shares its cache slot: only
    // the per-tick refresh keeps its record alive in the LRU. Then another
    // flow takes its cache slot and the ring changes: it keeps its backend.
    const ENTRIES: u32 = 1024;
    let mut f = fixture(ENTRIES, IPPROTO_TCP);
    let mut now = 1_000;
    set_clock(&mut f, now, 30_000, 3_600_000, 30_000);
    let long = Ipv4Packet::tcp(CLIENT, 40_000, VIP, 80);
    let long_key = key_of(&long);
    let long_slot = flow_cache_slot(flow_cache_mix(&long_key));
    let b = backend(&f, &long);
    let long = ack(long);

    let churn_flows = (0..).map(|i: u32| {
        let src = Ipv4Addr::new(198, 19, 100 + (i / 60_000) as u8, 1);
        Ipv4Packet::tcp(src, 1_024 + (i % 60_000) as u16, VIP, 80)
    });
    let mut churned = 0;
    for p in churn_flows
        .clone()
        .filter(|p| flow_cache_slot(flow_cache_mix(&key_of(p))) != long_slot)
        .take(10 * ENTRIES as usize)
    {
        assert_eq!(f.run(&p.build()).action, XDP_TX);
        churned += 1;
        if churned % 128 == 0 {
            // A tick passes and the long-lived flow sends a segment.
            now += 100;
            set_clock(&mut f, now, 30_000, 3_600_000, 30_000);
            assert_eq!(backend(&f, &long), b, "after {churned} new flows");
        }
    }
    assert_eq!(churned, 10 * ENTRIES);
    let e = f.dp.conntrack_lookup(&long_key).unwrap();
    assert_eq!(
        e.map(|e| e.backend_id),
        Some(b),
        "the long-lived flow's record was evicted by the churn"
    );

    // Another flow takes its cache slot; the ring stops giving its slot
    // to its backend.
    let thief = churn_flows
        .skip(20 * ENTRIES as usize)
        .find(|p| flow_cache_slot(flow_cache_mix(&key_of(p))) == long_slot)
        .unwrap();
    f.run(&thief.build());
    ring_without(&mut f, b);
    assert_ne!(
        ring_backend(&f, &long_key),
        b,
        "the ring still sends it to {b}"
    );
    now += 100;
    set_clock(&mut f, now, 30_000, 3_600_000, 30_000);
    assert_eq!(backend(&f, &long), b, "the long-lived flow moved");
}

#[test]
fn an_idle_udp_flow_expires_and_is_steered_by_the_ring_again() {
    let mut f = fixture(1 << 16, IPPROTO_UDP);
    set_clock(&mut f, 0, 1_000, 3_600_000, 30_000);
    let p = Ipv4Packet::udp(CLIENT, 45_000, VIP, 80);
    let key = key_of(&p);
    let b = backend(&f, &p);
    ring_without(&mut f, b);
    let now_ring = ring_backend(&f, &key);
    // Within the idle timeout (counted from the last packet) it stays.
    for now in [500, 1_400, 2_300] {
        set_clock(&mut f, now, 1_000, 3_600_000, 30_000);
        assert_eq!(backend(&f, &p), b, "at {now} ms");
    }
    // Idle for more than the timeout: a new flow, steered by the ring.
    set_clock(&mut f, 3_301, 1_000, 3_600_000, 30_000);
    assert_eq!(backend(&f, &p), now_ring);
    let s = f.dp.vip_stats(0).unwrap();
    assert_eq!((s.new_flows, s.conntrack_hits), (2, 3));
    let e = f.dp.conntrack_lookup(&key).unwrap().unwrap();
    assert_eq!((e.backend_id, e.last_seen_ms), (now_ring, 3_301));
}

#[test]
fn tcp_expires_after_fin_or_rst_plus_grace_and_after_the_long_idle_timeout() {
    const IDLE: u32 = 10_000;
    const CLOSING: u32 = 1_000;
    let mut f = fixture(1 << 16, IPPROTO_TCP);
    set_clock(&mut f, 0, 1_000, IDLE, CLOSING);
    // Three connections on the same backend: one open, one ended by a
    // FIN, one by a RST.
    let b = backend(&f, &Ipv4Packet::tcp(CLIENT, 30_000, VIP, 80));
    let on_b: Vec<Ipv4Packet> = (30_001..40_000)
        .map(|port| Ipv4Packet::tcp(CLIENT, port, VIP, 80))
        .filter(|p| ring_backend(&f, &key_of(p)) == b)
        .take(3)
        .collect();
    for p in &on_b {
        assert_eq!(backend(&f, p), b);
    }
    let [open, fin, rst] = [0, 1, 2].map(|i| ack(on_b[i].clone()));
    ring_without(&mut f, b);
    let mut fin_pkt = fin.clone();
    fin_pkt.tcp_flags = TCP_FIN | TCP_ACK;
    let mut rst_pkt = rst.clone();
    rst_pkt.tcp_flags = 0x04;
    set_clock(&mut f, 100, 1_000, IDLE, CLOSING);
    for p in [&open, &fin_pkt, &rst_pkt] {
        assert_eq!(backend(&f, p), b);
    }
    for p in [&fin, &rst] {
        let e = f.dp.conntrack_lookup(&key_of(p)).unwrap().unwrap();
        assert_eq!(e.flags & FLOW_FLAG_CLOSING, FLOW_FLAG_CLOSING);
    }
    // Packets after the FIN keep it alive (a half-closed connection still
    // acknowledges); the grace counts from the last one.
    set_clock(&mut f, 1_000, 1_000, IDLE, CLOSING);
    assert_eq!(backend(&f, &fin), b);
    // 1.1 s after the RST, 1.0 s after the FIN's last ACK: the RST's
    // connection is over, the FIN's not yet, the open one stays.
    set_clock(&mut f, 2_000, 1_000, IDLE, CLOSING);
    assert_eq!(backend(&f, &fin), b);
    assert_ne!(
        backend(&f, &rst),
        b,
        "the reset connection is still tracked"
    );
    set_clock(&mut f, 3_001, 1_000, IDLE, CLOSING);
    assert_ne!(
        backend(&f, &fin),
        b,
        "the closed connection is still tracked"
    );
    assert_eq!(backend(&f, &open), b);
    // The open one, idle just under the long timeout, stays; idle longer
    // than it, it is over.
    set_clock(&mut f, 3_001 + u64::from(IDLE), 1_000, IDLE, CLOSING);
    assert_eq!(backend(&f, &open), b);
    set_clock(&mut f, 3_002 + 2 * u64::from(IDLE), 1_000, IDLE, CLOSING);
    assert_ne!(
        backend(&f, &open),
        b,
        "the idle connection is still tracked"
    );
}

#[test]
fn without_an_agent_the_clock_stands_still_and_nothing_expires() {
    // All-zero RUNTIME (no agent ever ran): no timeout applies.
    let f = fixture(1 << 16, IPPROTO_UDP);
    let p = Ipv4Packet::udp(CLIENT, 45_001, VIP, 80);
    let b = backend(&f, &p);
    let mut f = f;
    ring_without(&mut f, b);
    assert_eq!(backend(&f, &p), b);
    assert_eq!(f.dp.runtime().unwrap(), Runtime::default());
}

/// A TCP segment of `tot_len` bytes of IP packet.
fn segment(dst: Ipv4Addr, tot_len: usize) -> Vec<u8> {
    let mut p = ack(Ipv4Packet::tcp(CLIENT, 41_000, dst, 80));
    p.payload = vec![0x5a; tot_len - 40];
    p.build()
}

#[test]
fn packets_longer_than_the_egress_mtu_are_dropped_with_their_reason() {
    let mut f = fixture(1 << 16, IPPROTO_TCP);
    // No limit set (no agent): a 3000-byte GRO-style aggregate goes out.
    assert_eq!(f.run(&segment(VIP, 3000)).action, XDP_TX);
    f.dp.set_runtime(Runtime {
        max_l3_len: 1500,
        ..Runtime::default()
    })
    .unwrap();
    assert_eq!(f.run(&segment(VIP, 1500)).action, XDP_TX);
    for len in [1501, 3000] {
        let before = f.reasons();
        assert_eq!(f.run(&segment(VIP, len)).action, XDP_DROP, "{len} bytes");
        assert_eq!(
            moved(&before, &f.reasons()),
            BTreeMap::from([("drop_too_big", 1)])
        );
    }
    // Not for a VIP: passed to the kernel untouched, whatever its length.
    let other = segment(Ipv4Addr::new(198, 18, 0, 99), 3000);
    let r = f.run(&other);
    assert_eq!((r.action, r.frame == other), (XDP_PASS, true));
}

#[test]
fn active_flows_are_counted_per_backend_and_expired_records_are_not() {
    let mut f = fixture(1 << 16, IPPROTO_UDP);
    set_clock(&mut f, 0, 1_000, 3_600_000, 30_000);
    let mut want: BTreeMap<u32, u64> = BTreeMap::new();
    for port in 20_000..20_300 {
        *want
            .entry(backend(&f, &Ipv4Packet::udp(CLIENT, port, VIP, 80)))
            .or_default() += 1;
    }
    let c = f.dp.count_flows().unwrap();
    assert_eq!((c.records, &c.per_backend), (300, &want));
    // 1.5 s later, ten of them have talked again: only they are active.
    set_clock(&mut f, 1_500, 1_000, 3_600_000, 30_000);
    let mut want: BTreeMap<u32, u64> = BTreeMap::new();
    for port in 20_000..20_010 {
        *want
            .entry(backend(&f, &Ipv4Packet::udp(CLIENT, port, VIP, 80)))
            .or_default() += 1;
    }
    let c = f.dp.count_flows().unwrap();
    assert_eq!((c.records, &c.per_backend), (300, &want));
}

#[test]
fn ipv6_flows_are_counted_with_ipv4_ones_per_backend_and_expire_by_the_same_rule() {
    use std::net::Ipv6Addr;

    use lb_tests::packet::Ipv6Packet;
    const VIP6: Ipv6Addr = Ipv6Addr::new(0x2001, 2, 0, 0x100, 0, 0, 0, 1);
    const CLIENT6: Ipv6Addr = Ipv6Addr::new(0x2001, 2, 0, 0, 0, 0, 0, 2);
    let mut f = fixture(1 << 16, IPPROTO_UDP);
    // An IPv6 VIP over backends 4 and 5 and backend 1, shared with the
    // IPv4 VIP (one id space, one count).
    f.add_vip6(
        1,
        (VIP6, 80, IPPROTO_UDP),
        &[(4, 1), (5, 1)],
        lb_common::FORWARD_DSR_L2,
    );
    set_clock(&mut f, 0, 1_000, 3_600_000, 30_000);
    let backend6 = |f: &Fixture, port: u16| -> u32 {
        let r = f.run(&Ipv6Packet::udp(CLIENT6, port, VIP6, 80).build());
        assert_eq!(r.action, XDP_TX, "IPv6 flow from port {port} not forwarded");
        backend_of_mac(&r.frame).expect("a backend's MAC")
    };
    let mut want: BTreeMap<u32, u64> = BTreeMap::new();
    for port in 20_000..20_100 {
        *want
            .entry(backend(&f, &Ipv4Packet::udp(CLIENT, port, VIP, 80)))
            .or_default() += 1;
        *want.entry(backend6(&f, port)).or_default() += 1;
    }
    assert!(want.contains_key(&4) && want.contains_key(&5), "{want:?}");
    let c = f.dp.count_flows().unwrap();
    assert_eq!((c.records, &c.per_backend), (200, &want));
    // 1.5 s later only the IPv6 flows that talked again are active: the
    // UDP idle timeout applies to CONNTRACK6 records as to CONNTRACK's.
    set_clock(&mut f, 1_500, 1_000, 3_600_000, 30_000);
    let mut want: BTreeMap<u32, u64> = BTreeMap::new();
    for port in 20_000..20_010 {
        *want.entry(backend6(&f, port)).or_default() += 1;
    }
    let c = f.dp.count_flows().unwrap();
    assert_eq!((c.records, &c.per_backend), (200, &want));
}
