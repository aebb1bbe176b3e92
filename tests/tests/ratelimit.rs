//! Packet-level tests of the per-VIP rate limits (lb-ebpf's
//! ratelimit.rs): the real compiled XDP program and maps, crafted frames
//! in, actions and counters out (BPF_PROG_TEST_RUN). Needs root.

use std::{
    net::{Ipv4Addr, Ipv6Addr},
    thread,
    time::{Duration, Instant},
};

use lb_common::{FORWARD_DSR_L2, IPPROTO_TCP, IPPROTO_UDP, Runtime, ratelimit::RateLimits};
use lb_tests::{
    fixture::{Fixture, XDP_DROP, XDP_TX},
    packet::{Ipv4Packet, Ipv6Packet, TCP_ACK, TCP_SYN},
};

const VIP: Ipv4Addr = Ipv4Addr::new(198, 18, 10, 1);
const VIP6: Ipv6Addr = Ipv6Addr::new(0x2001, 2, 0, 10, 0, 0, 0, 1);
const A: Ipv4Addr = Ipv4Addr::new(198, 18, 0, 2);
const A2: Ipv4Addr = Ipv4Addr::new(198, 18, 0, 3);
const B: Ipv4Addr = Ipv4Addr::new(198, 18, 5, 2);
const LIMITED: &str = "drop_rate_limited";

/// TCP VIP 0 and UDP VIP 1 (VIP:80) over backends 1-3 and 11-13, IPv6
/// TCP VIP 2 over 21-23.
fn fixture() -> Fixture {
    let mut f = Fixture::new();
    f.add_vip(0, (VIP, 80, IPPROTO_TCP), &[(1, 1), (2, 1), (3, 1)]);
    f.add_vip(1, (VIP, 80, IPPROTO_UDP), &[(11, 1), (12, 1), (13, 1)]);
    f.add_vip6(
        2,
        (VIP6, 80, IPPROTO_TCP),
        &[(21, 1), (22, 1), (23, 1)],
        FORWARD_DSR_L2,
    );
    f
}

fn limits(f: &mut Fixture, index: u32, l: RateLimits) {
    f.set_rate_limits(index, l);
}

fn tcp(src: Ipv4Addr, port: u16, flags: u8) -> Vec<u8> {
    let mut p = Ipv4Packet::tcp(src, port, VIP, 80);
    p.tcp_flags = flags;
    p.build()
}

fn udp(src: Ipv4Addr, port: u16) -> Vec<u8> {
    Ipv4Packet::udp(src, port, VIP, 80).build()
}

/// Runs each frame: how many were forwarded (the rest must be dropped).
fn passed(f: &Fixture, frames: impl IntoIterator<Item = Vec<u8>>) -> usize {
    frames
        .into_iter()
        .map(|fr| match f.run(&fr).action {
            XDP_TX => 1,
            XDP_DROP => 0,
            a => panic!("action {a}"),
        })
        .sum()
}

fn limited(f: &Fixture) -> u64 {
    f.reasons()[LIMITED]
}

#[test]
fn new_connections_per_source_are_limited_and_established_flows_are_not() {
    lb_tests::require_root();
    let mut f = fixture();
    limits(
        &mut f,
        0,
        RateLimits {
            src_new_rate: 1,
            src_new_burst: 5,
            prefix_v4: 32,
            prefix_v6: 128,
            ..RateLimits::default()
        },
    );
    // A burst of 5, then refusals (one token a second: none refills in
    // the test's time).
    assert_eq!(passed(&f, (0..20).map(|i| tcp(A, 40_000 + i, TCP_SYN))), 5);
    assert_eq!(limited(&f), 15);
    assert_eq!(f.dp.vip_stats(0).unwrap().rate_limited, 15);
    // Another source has its own bucket.
    assert_eq!(passed(&f, (0..5).map(|i| tcp(B, 40_000 + i, TCP_SYN))), 5);
    // Established flows of the limited source go on: segments without
    // SYN are never counted.
    assert_eq!(
        passed(&f, (0..50).map(|i| tcp(A, 40_000 + i % 5, TCP_ACK))),
        50
    );
    // Another VIP has no limits.
    assert_eq!(passed(&f, (0..20).map(|i| udp(A, 40_000 + i))), 20);
    assert_eq!(limited(&f), 15);
    // The agent's view: the limited source, not the other.
    let top = f.dp.limited_sources(10).unwrap();
    assert_eq!(top.len(), 1, "{top:?}");
    assert_eq!(
        (
            top[0].vip_index,
            top[0].source,
            top[0].limit,
            top[0].dropped,
            top[0].passed
        ),
        (0, A.into(), "new", 15, 5)
    );
}

#[test]
fn a_udp_flow_counts_once_by_its_first_packet() {
    lb_tests::require_root();
    let mut f = fixture();
    limits(
        &mut f,
        1,
        RateLimits {
            src_new_rate: 1,
            src_new_burst: 3,
            prefix_v4: 32,
            prefix_v6: 128,
            ..RateLimits::default()
        },
    );
    // Three flows admitted, each with many packets; a fourth refused.
    for i in 0..3 {
        assert_eq!(passed(&f, (0..10).map(|_| udp(A, 50_000 + i))), 10);
    }
    assert_eq!(passed(&f, [udp(A, 50_003)]), 0);
    assert_eq!(limited(&f), 1);
}

#[test]
fn a_source_prefix_shares_one_bucket() {
    lb_tests::require_root();
    let mut f = fixture();
    limits(
        &mut f,
        0,
        RateLimits {
            src_new_rate: 1,
            src_new_burst: 4,
            prefix_v4: 24,
            prefix_v6: 64,
            ..RateLimits::default()
        },
    );
    // A and A2 are in one /24: four new connections between them.
    let frames = (0..10).map(|i| tcp(if i % 2 == 0 { A } else { A2 }, 41_000 + i, TCP_SYN));
    assert_eq!(passed(&f, frames), 4);
    assert_eq!(passed(&f, [tcp(B, 41_000, TCP_SYN)]), 1);
    let top = f.dp.limited_sources(10).unwrap();
    assert_eq!(top[0].source, Ipv4Addr::new(198, 18, 0, 0));
    // IPv6: a /64 shares its bucket, another /64 has its own.
    limits(
        &mut f,
        2,
        RateLimits {
            src_new_rate: 1,
            src_new_burst: 2,
            prefix_v4: 24,
            prefix_v6: 64,
            ..RateLimits::default()
        },
    );
    let syn6 = |src: Ipv6Addr, port| Ipv6Packet::tcp(src, port, VIP6, 80).build();
    let (c1, c2) = (
        Ipv6Addr::new(0x2001, 2, 0, 7, 0, 0, 0, 1),
        Ipv6Addr::new(0x2001, 2, 0, 7, 0xff, 0, 0, 2),
    );
    let other = Ipv6Addr::new(0x2001, 2, 0, 8, 0, 0, 0, 1);
    assert_eq!(
        passed(
            &f,
            (0..6).map(|i| syn6(if i % 2 == 0 { c1 } else { c2 }, 42_000 + i))
        ),
        2
    );
    assert_eq!(passed(&f, [syn6(other, 42_000)]), 1);
    let top = f.dp.limited_sources(10).unwrap();
    assert!(
        top.iter()
            .any(|t| t.source == Ipv6Addr::new(0x2001, 2, 0, 7, 0, 0, 0, 0) && t.dropped == 4),
        "{top:?}"
    );
}

#[test]
fn packets_per_source_and_the_vip_ceiling() {
    lb_tests::require_root();
    let mut f = fixture();
    // Packets per source: every packet counts, established flows too.
    limits(
        &mut f,
        0,
        RateLimits {
            src_pkt_rate: 1,
            src_pkt_burst: 3,
            prefix_v4: 32,
            prefix_v6: 128,
            ..RateLimits::default()
        },
    );
    assert_eq!(passed(&f, (0..10).map(|_| tcp(A, 43_000, TCP_ACK))), 3);
    assert_eq!(passed(&f, (0..10).map(|_| tcp(B, 43_000, TCP_ACK))), 3);
    // The VIP's ceiling: new connections from any source share it.
    limits(
        &mut f,
        0,
        RateLimits {
            vip_new_rate: 1,
            vip_new_burst: 4,
            prefix_v4: 32,
            prefix_v6: 128,
            ..RateLimits::default()
        },
    );
    let sources = (0..10u8).map(|i| Ipv4Addr::new(198, 18, 9, i));
    assert_eq!(passed(&f, sources.map(|s| tcp(s, 44_000, TCP_SYN))), 4);
    // Lifted: everything passes again.
    limits(&mut f, 0, RateLimits::default());
    assert_eq!(passed(&f, (0..10).map(|i| tcp(B, 45_000 + i, TCP_SYN))), 10);
}

#[test]
fn a_nat_vip_is_limited_too() {
    lb_tests::require_root();
    let mut f = Fixture::new();
    f.add_nat_vip(0, (VIP, 80, IPPROTO_TCP), &[(1, 1), (2, 1)], 8080);
    f.add_nat_vip(1, (VIP, 80, IPPROTO_UDP), &[(11, 1), (12, 1)], 8080);
    f.dp.set_runtime(Runtime {
        now_ms: 1_000,
        udp_idle_ms: 30_000,
        tcp_idle_ms: 60_000,
        tcp_closing_ms: 10_000,
        nat_port_min: 61_000,
        nat_port_max: 65_535,
        ..Runtime::default()
    })
    .unwrap();
    let l = RateLimits {
        src_new_rate: 1,
        src_new_burst: 2,
        prefix_v4: 32,
        prefix_v6: 128,
        ..RateLimits::default()
    };
    limits(&mut f, 0, l);
    limits(&mut f, 1, l);
    assert_eq!(passed(&f, (0..6).map(|i| tcp(A, 46_000 + i, TCP_SYN))), 2);
    // UDP: counted by a flow's first packet (its NAT pair's creation).
    for i in 0..2 {
        assert_eq!(passed(&f, (0..5).map(|_| udp(A, 47_000 + i))), 5);
    }
    assert_eq!(passed(&f, [udp(A, 47_002)]), 0);
    assert_eq!(limited(&f), 5);
}

/// A source opening new connections at ~1000/s against a limit of 100/s
/// gets ~100/s through (± 15 % over the run, its burst of 10 aside),
/// while a second source at ~50/s is never refused.
#[test]
fn a_source_at_ten_times_its_limit_gets_its_limit() {
    lb_tests::require_root();
    let mut f = fixture();
    limits(
        &mut f,
        0,
        RateLimits {
            src_new_rate: 100,
            src_new_burst: 10,
            prefix_v4: 32,
            prefix_v6: 128,
            ..RateLimits::default()
        },
    );
    let started = Instant::now();
    let (mut sent_a, mut passed_a, mut sent_b, mut passed_b) = (0u32, 0u32, 0u32, 0u32);
    // 3 s, paced by the clock: ~1000 SYNs/s from A, ~50/s from B
    // (bounded in count too).
    while started.elapsed() < Duration::from_secs(3) && sent_a < 10_000 {
        let due = (started.elapsed().as_secs_f64() * 1000.0) as u32;
        while sent_a < due {
            passed_a += u32::from(
                f.run(&tcp(A, 10_000 + (sent_a % 50_000) as u16, TCP_SYN))
                    .action
                    == XDP_TX,
            );
            sent_a += 1;
            if sent_a % 20 == 0 {
                passed_b += u32::from(
                    f.run(&tcp(B, 10_000 + (sent_b % 50_000) as u16, TCP_SYN))
                        .action
                        == XDP_TX,
                );
                sent_b += 1;
            }
        }
        thread::sleep(Duration::from_millis(1));
    }
    let secs = started.elapsed().as_secs_f64();
    let rate_a = f64::from(passed_a.saturating_sub(10)) / secs;
    eprintln!(
        "source A: {sent_a} SYNs in {secs:.2} s, {passed_a} admitted ({rate_a:.1}/s after the burst); \
         source B: {passed_b}/{sent_b}"
    );
    assert!(
        f64::from(sent_a) / secs > 500.0,
        "the test sent only {sent_a} SYNs in {secs:.2} s: too slow to exceed the limit 5x"
    );
    assert!(
        (85.0..=115.0).contains(&rate_a),
        "A got {rate_a:.1}/s through, want 100 ± 15 %"
    );
    assert_eq!(passed_b, sent_b, "B was refused");
}
