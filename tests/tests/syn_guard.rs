//! Packet-level tests of the SYN-flood guard (lb-ebpf's syn_guard.rs):
//! the real compiled XDP program and maps, crafted frames in, action,
//! bytes, conntrack records and counters out (BPF_PROG_TEST_RUN). Needs
//! root.

use std::net::{Ipv4Addr, Ipv6Addr};

use lb_common::{FORWARD_DSR_L2, FlowKey, FlowKey6, IPPROTO_TCP, Runtime};
use lb_tests::{
    fixture::{Fixture, LB_MAC, XDP_TX, backend_of_mac},
    packet::{Ipv4Packet, Ipv6Packet, TCP_ACK, TCP_SYN},
};

const VIP: Ipv4Addr = Ipv4Addr::new(198, 18, 10, 1);
const CLIENT: Ipv4Addr = Ipv4Addr::new(198, 18, 0, 2);
const VIP6: Ipv6Addr = Ipv6Addr::new(0x2001, 2, 0, 10, 0, 0, 0, 1);
const CLIENT6: Ipv6Addr = Ipv6Addr::new(0x2001, 2, 0, 0, 0, 0, 0, 2);
const UNRECORDED: &str = "fwd_syn_unrecorded";

/// One IPv4 TCP VIP (index 0) over backends 1, 2, 3 and one IPv6 TCP VIP
/// (index 1) over backends 4, 5, 6; the clock at `now_ms` with the guard
/// word `guard`.
fn fixture(guard: u32, now_ms: u64) -> Fixture {
    let mut f = Fixture::new();
    f.add_vip(0, (VIP, 80, IPPROTO_TCP), &[(1, 1), (2, 1), (3, 1)]);
    f.add_vip6(
        1,
        (VIP6, 80, IPPROTO_TCP),
        &[(4, 1), (5, 1), (6, 1)],
        FORWARD_DSR_L2,
    );
    clock(&mut f, guard, now_ms);
    f
}

fn clock(f: &mut Fixture, guard: u32, now_ms: u64) {
    f.dp.set_runtime(Runtime {
        now_ms,
        tcp_idle_ms: 3_600_000,
        tcp_closing_ms: 30_000,
        udp_idle_ms: 30_000,
        syn_guard: guard,
        ..Runtime::default()
    })
    .unwrap();
}

fn segment(port: u16, flags: u8) -> Vec<u8> {
    let mut p = Ipv4Packet::tcp(CLIENT, port, VIP, 80);
    p.tcp_flags = flags;
    p.build()
}

fn key(port: u16) -> FlowKey {
    FlowKey::new(CLIENT.to_bits(), port, VIP.to_bits(), 80, IPPROTO_TCP)
}

/// Runs `frame`: sent back out to a backend, MACs only; the backend.
fn steered(f: &Fixture, frame: &[u8]) -> u32 {
    let r = f.run(frame);
    assert_eq!(r.action, XDP_TX);
    assert_eq!(&r.frame[6..12], &LB_MAC);
    assert_eq!(&r.frame[12..], &frame[12..]);
    backend_of_mac(&r.frame[..6]).expect("a backend's MAC")
}

fn unrecorded(f: &Fixture) -> u64 {
    f.reasons().get(UNRECORDED).copied().unwrap_or(0)
}

#[test]
fn an_unrecorded_syn_goes_where_the_ring_says_and_its_ack_records_the_flow() {
    lb_tests::require_root();
    let f = fixture(1, 1_000);
    let syn_to = steered(&f, &segment(40_000, TCP_SYN));
    assert_eq!(f.dp.conntrack_lookup(&key(40_000)).unwrap(), None);
    assert_eq!(unrecorded(&f), 1);
    let s = f.dp.vip_stats(0).unwrap();
    assert_eq!((s.packets, s.new_flows, s.conntrack_hits), (1, 0, 0));

    let ack_to = steered(&f, &segment(40_000, TCP_ACK));
    assert_eq!(ack_to, syn_to, "the ACK follows the SYN");
    let e =
        f.dp.conntrack_lookup(&key(40_000))
            .unwrap()
            .expect("recorded");
    assert_eq!(e.backend_id, syn_to);
    let s = f.dp.vip_stats(0).unwrap();
    assert_eq!((s.packets, s.new_flows, s.conntrack_hits), (2, 1, 0));
    assert_eq!(steered(&f, &segment(40_000, TCP_ACK)), syn_to);
    assert_eq!(f.dp.vip_stats(0).unwrap().conntrack_hits, 1);
    assert_eq!(unrecorded(&f), 1);

    // IPv6 alike.
    let mut p = Ipv6Packet::tcp(CLIENT6, 40_000, VIP6, 80);
    let key6 = FlowKey6::new(CLIENT6, 40_000, VIP6, 80, IPPROTO_TCP);
    let syn6 = p.build();
    p.tcp_flags = TCP_ACK;
    let ack6 = p.build();
    let to = steered(&f, &syn6);
    assert_eq!(f.dp.conntrack6_lookup(&key6).unwrap(), None);
    assert_eq!(steered(&f, &ack6), to);
    assert_eq!(
        f.dp.conntrack6_lookup(&key6).unwrap().map(|e| e.backend_id),
        Some(to)
    );
    assert_eq!(unrecorded(&f), 2);
}

#[test]
fn a_syn_flood_under_the_guard_records_nothing_and_moves_no_flow() {
    lb_tests::require_root();
    let mut f = fixture(0, 1_000);
    // An established flow, recorded with the guard off.
    let home = steered(&f, &segment(40_000, TCP_SYN));
    steered(&f, &segment(40_000, TCP_ACK));
    clock(&mut f, 1, 1_100);
    let before = f.dp.conntrack_entries().unwrap().len();
    assert_eq!(before, 1);
    for i in 0..3000u32 {
        let src = Ipv4Addr::from_bits(u32::from_be_bytes([198, 18, 100, 0]) + i);
        let mut p = Ipv4Packet::tcp(src, 1024 + (i % 50_000) as u16, VIP, 80);
        p.tcp_flags = TCP_SYN;
        steered(&f, &p.build());
    }
    assert_eq!(f.dp.conntrack_entries().unwrap().len(), before);
    assert_eq!(unrecorded(&f), 3000);
    // The ring changes under the flood: the established flow stays.
    f.set_backend4(0, 7, FORWARD_DSR_L2);
    f.write_ring(0, &[(1, 1), (2, 1), (3, 1), (7, 1)]);
    assert_eq!(steered(&f, &segment(40_000, TCP_ACK)), home);
}

#[test]
fn in_auto_mode_a_cpu_stops_recording_above_the_threshold_for_that_tick_and_the_next() {
    lb_tests::require_root();
    // Threshold word 4: three SYNs per tick recorded, then none.
    let mut f = fixture(4, 1_000);
    let recorded = |f: &Fixture, ports: std::ops::Range<u16>| {
        ports
            .map(|p| {
                steered(f, &segment(p, TCP_SYN));
                f.dp.conntrack_lookup(&key(p)).unwrap().is_some()
            })
            .collect::<Vec<_>>()
    };
    assert_eq!(
        recorded(&f, 41_000..41_005),
        [true, true, true, false, false]
    );
    // The next tick: still guarded (the last one went over).
    clock(&mut f, 4, 1_100);
    assert_eq!(recorded(&f, 41_100..41_102), [false, false]);
    // A tick after a quiet one records again.
    clock(&mut f, 4, 1_200);
    assert_eq!(recorded(&f, 41_200..41_202), [true, true]);
    // Guard off: every SYN recorded.
    clock(&mut f, 0, 1_300);
    assert!(recorded(&f, 41_300..41_310).iter().all(|&r| r));
}

#[test]
fn a_reused_port_follows_the_ring_under_the_guard_not_the_old_record() {
    lb_tests::require_root();
    let mut f = fixture(1, 1_000);
    // An old connection on some port, recorded by its ACK, in the flow
    // cache too (several packets).
    let port = 42_000;
    let old = steered(&f, &segment(port, TCP_SYN));
    for _ in 0..3 {
        assert_eq!(steered(&f, &segment(port, TCP_ACK)), old);
    }
    // The ring no longer names that backend (drained: still usable, so
    // the old record would still be honoured).
    ring_without(&mut f, old);
    assert_eq!(
        steered(&f, &segment(port, TCP_ACK)),
        old,
        "the record holds"
    );
    // A new connection on the same port: its SYN follows the ring, and so
    // does its ACK (the record was pointed at the new backend).
    let new = steered(&f, &segment(port, TCP_SYN));
    assert_ne!(new, old);
    assert_eq!(
        f.dp.conntrack_lookup(&key(port))
            .unwrap()
            .map(|e| e.backend_id),
        Some(new)
    );
    for _ in 0..3 {
        assert_eq!(steered(&f, &segment(port, TCP_ACK)), new);
    }
}

/// Pins the calling thread to `cpu`.
fn pin_to(cpu: usize) {
    // SAFETY: a zeroed cpu_set_t is valid; CPU_SET and sched_setaffinity
    // get valid pointers.
    unsafe {
        let mut set: libc::cpu_set_t = std::mem::zeroed();
        libc::CPU_SET(cpu, &mut set);
        let rc = libc::sched_setaffinity(0, std::mem::size_of::<libc::cpu_set_t>(), &set);
        assert_eq!(
            rc,
            0,
            "sched_setaffinity: {}",
            std::io::Error::last_os_error()
        );
    }
}

#[test]
fn a_cpu_that_trips_the_guard_turns_it_on_for_every_cpu() {
    lb_tests::require_root();
    let cpus = std::thread::available_parallelism().map_or(1, |n| n.get());
    assert!(cpus >= 2, "this test needs 2 CPUs");
    let f = fixture(4, 1_000);
    // BPF_PROG_TEST_RUN runs the program on the calling thread's CPU.
    let recorded = |cpu: usize, port: u16| {
        pin_to(cpu);
        steered(&f, &segment(port, TCP_SYN));
        f.dp.conntrack_lookup(&key(port)).unwrap().is_some()
    };
    // CPU 1 records its first SYN: nothing tripped yet.
    assert!(recorded(1, 43_000));
    // CPU 0 goes over the threshold...
    assert_eq!(
        (43_001..43_005).map(|p| recorded(0, p)).collect::<Vec<_>>(),
        [true, true, true, false]
    );
    // ...and CPU 1, under its own threshold, records no more SYNs.
    assert!(!recorded(1, 43_100));
    assert!(!recorded(1, 43_101));
}

/// The fixture's VIP with every backend but `gone` in its ring (`gone`
/// drained: still usable, so a record naming it would still be honoured).
fn ring_without(f: &mut Fixture, gone: u32) {
    let rest: Vec<(u32, u32)> = [1, 2, 3]
        .into_iter()
        .filter(|&b| b != gone)
        .map(|b| (b, 1))
        .collect();
    f.write_ring(0, &rest);
}

#[test]
fn with_the_syn_filter_in_use_a_reused_port_still_follows_the_ring() {
    lb_tests::require_root();
    let mut f = fixture(1, 1_000);
    let port = 42_100;
    let old = steered(&f, &segment(port, TCP_SYN));
    assert_eq!(steered(&f, &segment(port, TCP_ACK)), old);
    // The agent's rebuild: the live record's bit is in the bank in use.
    f.dp.rebuild_syn_filter().unwrap();
    let filter = f.dp.syn_filter().unwrap();
    assert!(filter.bank_in_use().is_some());
    assert!(filter.may_have_record(key(port).hash()));
    ring_without(&mut f, old);
    let new = steered(&f, &segment(port, TCP_SYN));
    assert_ne!(new, old);
    assert_eq!(
        f.dp.conntrack_lookup(&key(port))
            .unwrap()
            .map(|e| e.backend_id),
        Some(new),
        "the SYN looked the record up and pointed it at the ring's backend"
    );
    assert_eq!(steered(&f, &segment(port, TCP_ACK)), new);
}

#[test]
fn the_syn_filter_spares_the_lookup_of_a_flow_without_a_live_record() {
    lb_tests::require_root();
    let mut f = fixture(1, 1_000);
    let port = 42_200;
    let old = steered(&f, &segment(port, TCP_SYN));
    assert_eq!(steered(&f, &segment(port, TCP_ACK)), old);
    // An hour and more later the record has expired (it stays in the
    // LRU); the rebuild leaves its bit out.
    let later = 1_000 + 3_600_000 + 1;
    clock(&mut f, 1, later);
    f.dp.rebuild_syn_filter().unwrap();
    let filter = f.dp.syn_filter().unwrap();
    assert!(!filter.may_have_record(key(port).hash()));
    f.dp.clear_flow_cache().unwrap();
    ring_without(&mut f, old);
    let new = steered(&f, &segment(port, TCP_SYN));
    assert_ne!(new, old);
    let e =
        f.dp.conntrack_lookup(&key(port))
            .unwrap()
            .expect("the expired record is still in the map");
    assert_eq!(
        (e.backend_id, e.last_seen_ms),
        (old, 1_000),
        "no lookup: the expired record was left as it was"
    );
    // The ACK finds only the expired record: steered by the ring, where
    // the SYN went, and recorded (the kernel sets the bit).
    assert_eq!(steered(&f, &segment(port, TCP_ACK)), new);
    assert_eq!(
        f.dp.conntrack_lookup(&key(port))
            .unwrap()
            .map(|e| (e.backend_id, e.last_seen_ms)),
        Some((new, later))
    );
    assert!(filter.may_have_record(key(port).hash()));
}

#[test]
fn a_record_made_during_a_rebuild_keeps_its_bit_and_the_walk_sets_the_older_ones() {
    lb_tests::require_root();
    let f = fixture(0, 1_000);
    let (before, during) = (42_300, 42_301);
    assert_eq!(steered(&f, &segment(before, TCP_SYN)), {
        f.dp.conntrack_lookup(&key(before))
            .unwrap()
            .expect("recorded")
            .backend_id
    });
    let filter = f.dp.syn_filter().unwrap();
    assert_eq!(filter.bank_in_use(), None, "no bank before a rebuild");
    assert!(
        filter.may_have_record(key(before).hash()),
        "no bank: every SYN looks up"
    );
    // A rebuild begins: the bank is cleared; a flow recorded now gets its
    // bit from the kernel; switching without the walk shows that the
    // older record's bit comes from the walk only.
    let bank = filter.begin();
    steered(&f, &segment(during, TCP_SYN));
    filter.use_bank(bank);
    assert!(filter.may_have_record(key(during).hash()));
    assert!(!filter.may_have_record(key(before).hash()));
    // A whole rebuild (into the other bank) has both.
    f.dp.rebuild_syn_filter().unwrap();
    assert_eq!(filter.bank_in_use(), Some(1 - bank));
    assert!(filter.may_have_record(key(during).hash()));
    assert!(filter.may_have_record(key(before).hash()));
    // A flow never recorded (by chance its bit may be shared: not
    // asserted for one flow); over 1000 such flows almost none match.
    let shared = (0..1000u16)
        .filter(|&i| filter.may_have_record(key(10_000 + i).hash()))
        .count();
    assert!(
        shared < 10,
        "{shared} of 1000 unrecorded flows look recorded"
    );
    filter.disable();
    assert_eq!(filter.bank_in_use(), None);
}
