//! The flow keeper's NAT pass on the real maps: pairs idle in both
//! directions are removed (reverse entry first), live ones stay and are
//! counted per backend, orphaned reverse entries go once idle, for both
//! families. Needs root.

use std::net::{Ipv4Addr, Ipv6Addr};

use lb::datapath::{Datapath, MapSizes};
use lb_common::{
    FLOW_FLAG_CLOSING, FlowKey, FlowKey6, IPPROTO_TCP, IPPROTO_UDP, Runtime,
    nat::{NatFwd, NatRev},
};
use lb_tests::require_root;

const SNAT: Ipv4Addr = Ipv4Addr::new(198, 18, 1, 1);

fn datapath() -> Datapath {
    Datapath::load_private(MapSizes {
        max_vips: 4,
        max_backends: 16,
        ring_size: 13,
        conntrack_entries: 64,
        conntrack6_entries: 64,
        nat_entries: 64,
        acl_entries: 1024,
    })
    .unwrap()
}

fn words(a: Ipv4Addr) -> [u32; 4] {
    [a.to_bits().to_be(), 0, 0, 0]
}

/// Client 198.18.0.<c>:40000 → 198.19.0.1:80 through SNAT port `sport` to
/// backend 198.18.2.<b>:8080, last seen `fwd_seen` / `rev_seen` (with
/// `rev_flags`); inserted as the kernel would.
#[expect(
    clippy::too_many_arguments,
    reason = "one pair, spelled out per test case"
)]
fn insert(
    dp: &mut Datapath,
    c: u8,
    sport: u16,
    b: u8,
    proto: u8,
    fwd_seen: u64,
    rev_seen: u64,
    rev_flags: u32,
) -> (FlowKey, FlowKey) {
    let client = Ipv4Addr::new(198, 18, 0, c);
    let backend = Ipv4Addr::new(198, 18, 2, b);
    let fk = FlowKey::new(
        client.to_bits(),
        40000,
        Ipv4Addr::new(198, 19, 0, 1).to_bits(),
        80,
        proto,
    );
    let rk = FlowKey::new(backend.to_bits(), 8080, SNAT.to_bits(), sport, proto);
    let fwd = NatFwd {
        snat_addr: words(SNAT),
        backend_addr: words(backend),
        backend_id: b.into(),
        snat_port: sport.to_be(),
        backend_port: 8080u16.to_be(),
        last_seen_ms: fwd_seen,
        ..NatFwd::default()
    };
    let rev = NatRev {
        client_addr: words(client),
        backend_id: b.into(),
        flags: rev_flags,
        last_seen_ms: rev_seen,
        ..NatRev::default()
    };
    dp.insert_nat_pair(&fk, fwd, &rk, rev).unwrap();
    (fk, rk)
}

fn clock(dp: &mut Datapath, now_ms: u64) {
    dp.set_runtime(Runtime {
        now_ms,
        udp_idle_ms: 30_000,
        tcp_idle_ms: 60_000,
        tcp_closing_ms: 5_000,
        ..Runtime::default()
    })
    .unwrap();
}

#[test]
fn idle_pairs_are_removed_and_live_ones_counted_per_backend() {
    require_root();
    let mut dp = datapath();
    clock(&mut dp, 100_000);
    // UDP, replies fresh: live. UDP, both idle: over. TCP open, idle 50 s:
    // live. TCP after a FIN back, idle 6 s: over.
    let live_udp = insert(&mut dp, 1, 61001, 11, IPPROTO_UDP, 10_000, 95_000, 0);
    let idle_udp = insert(&mut dp, 2, 61002, 11, IPPROTO_UDP, 69_000, 69_000, 0);
    let live_tcp = insert(&mut dp, 3, 61003, 12, IPPROTO_TCP, 50_000, 50_000, 0);
    let closed = insert(
        &mut dp,
        4,
        61004,
        12,
        IPPROTO_TCP,
        94_000,
        94_000,
        FLOW_FLAG_CLOSING,
    );
    // An orphaned reverse entry, idle: its forward entry is gone.
    let orphan = insert(&mut dp, 5, 61005, 13, IPPROTO_UDP, 0, 60_000, 0);
    let fresh_orphan = insert(&mut dp, 6, 61006, 13, IPPROTO_UDP, 0, 99_000, 0);
    // Only their reverse entries are left, as after a half-done removal.
    for (fk, _) in [orphan, fresh_orphan] {
        dp.remove_nat_fwd(&fk).unwrap();
    }
    let sweep = dp.sweep_nat().unwrap();
    for (fk, rk) in [idle_udp, closed] {
        assert_eq!(dp.nat_fwd(&fk).unwrap(), None);
        assert_eq!(dp.nat_rev(&rk).unwrap(), None);
    }
    for (fk, rk) in [live_udp, live_tcp] {
        assert!(dp.nat_fwd(&fk).unwrap().is_some());
        assert!(dp.nat_rev(&rk).unwrap().is_some());
    }
    assert_eq!(dp.nat_rev(&orphan.1).unwrap(), None);
    assert!(dp.nat_rev(&fresh_orphan.1).unwrap().is_some());
    assert_eq!((sweep.removed_pairs, sweep.removed_orphans), (2, 1));
    assert_eq!(sweep.live, 2);
    assert_eq!(sweep.live_per_backend.get(&11), Some(&1));
    assert_eq!(sweep.live_per_backend.get(&12), Some(&1));
    assert_eq!((sweep.fwd_entries, sweep.rev_entries), (2, 3));
    // A second pass finds nothing more to do.
    let again = dp.sweep_nat().unwrap();
    assert_eq!((again.removed_pairs, again.removed_orphans), (0, 0));
    // Without an agent's timeouts nothing is ever over.
    dp.set_runtime(Runtime {
        now_ms: u64::MAX / 2,
        ..Runtime::default()
    })
    .unwrap();
    assert_eq!(dp.sweep_nat().unwrap().removed_pairs, 0);
}

#[test]
fn ipv6_pairs_are_removed_by_the_same_rule() {
    require_root();
    let mut dp = datapath();
    clock(&mut dp, 100_000);
    let (client, vip): (Ipv6Addr, Ipv6Addr) =
        ("2001:2::1".parse().unwrap(), "2001:2::100".parse().unwrap());
    let (backend, snat): (Ipv6Addr, Ipv6Addr) = (
        "2001:2:0:2::10".parse().unwrap(),
        "2001:2:0:1::1".parse().unwrap(),
    );
    let mut keys = Vec::new();
    for (cport, sport, seen) in [(40001u16, 61001u16, 99_000u64), (40002, 61002, 10_000)] {
        let fk = FlowKey6::new(client, cport, vip, 80, IPPROTO_UDP);
        let rk = FlowKey6::new(backend, 80, snat, sport, IPPROTO_UDP);
        let fwd = NatFwd {
            snat_addr: lb_common::addr6_words(snat),
            backend_addr: lb_common::addr6_words(backend),
            backend_id: 3,
            snat_port: sport.to_be(),
            backend_port: 80u16.to_be(),
            last_seen_ms: seen,
            ..NatFwd::default()
        };
        let rev = NatRev {
            backend_id: 3,
            last_seen_ms: seen,
            ..NatRev::default()
        };
        dp.insert_nat_pair6(&fk, fwd, &rk, rev).unwrap();
        keys.push((fk, rk));
    }
    let sweep = dp.sweep_nat().unwrap();
    assert_eq!(sweep.removed_pairs, 1);
    assert!(dp.nat_fwd6(&keys[0].0).unwrap().is_some());
    assert!(dp.nat_rev6(&keys[0].1).unwrap().is_some());
    assert_eq!(dp.nat_fwd6(&keys[1].0).unwrap(), None);
    assert_eq!(dp.nat_rev6(&keys[1].1).unwrap(), None);
    assert_eq!(sweep.live_per_backend.get(&3), Some(&1));
}
