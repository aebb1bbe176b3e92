//! Source access control at packet level: the real XDP program and its
//! ACL maps (written with the agent's own `lb::acl::sync`), crafted
//! frames through BPF_PROG_TEST_RUN. IPv4 and IPv6, every forwarding
//! mode, the counters, and the flow cache across a switch. Needs root.

use std::{
    collections::BTreeMap,
    net::{IpAddr, Ipv4Addr, Ipv6Addr},
};

use lb::acl::{AclMaps, AclState, Cidr, VipAcl, sync};
use lb_common::{
    FORWARD_DSR_L2, FORWARD_GUE, FORWARD_IPIP, FORWARD_NAT, IPPROTO_TCP, Runtime,
    acl::{ACL_DENY, acl_bank},
};
use lb_tests::{
    fixture::{Fixture, XDP_DROP, XDP_TX, assert_dropped, moved},
    packet::{Ipv4Packet, Ipv6Packet, TCP_ACK},
};

const VIP: Ipv4Addr = Ipv4Addr::new(198, 18, 10, 1);
const VIP6: Ipv6Addr = Ipv6Addr::new(0x2001, 2, 0, 10, 0, 0, 0, 1);

fn v4(s: &str) -> Ipv4Addr {
    s.parse().unwrap()
}

fn v6(s: &str) -> Ipv6Addr {
    s.parse().unwrap()
}

fn acl(allow: &[&str], deny: &[&str]) -> VipAcl {
    let c = |s: &&str| s.parse::<Cidr>().unwrap();
    let mut a = VipAcl {
        allow: allow.iter().map(c).collect(),
        deny: deny.iter().map(c).collect(),
    };
    a.allow.sort();
    a.deny.sort();
    a
}

/// A fixture with VIP 0 (TCP, port 80) in `forwarding` mode over
/// backends 1, 2, 3 and the clock running (the NAT path needs it).
fn fixture4(forwarding: u8) -> Fixture {
    let mut f = Fixture::new();
    let backends = [(1, 1), (2, 1), (3, 1)];
    if forwarding == FORWARD_NAT {
        f.add_nat_vip(0, (VIP, 80, IPPROTO_TCP), &backends, 8080);
    } else {
        f.add_vip_forwarding(0, (VIP, 80, IPPROTO_TCP), &backends, forwarding);
    }
    f.dp.set_runtime(runtime()).unwrap();
    f
}

fn fixture6(forwarding: u8) -> Fixture {
    let mut f = Fixture::new();
    let backends = [(1, 1), (2, 1), (3, 1)];
    if forwarding == FORWARD_NAT {
        f.add_nat_vip6(0, (VIP6, 80, IPPROTO_TCP), &backends, 8080);
    } else {
        f.add_vip6(0, (VIP6, 80, IPPROTO_TCP), &backends, forwarding);
    }
    f.dp.set_runtime(runtime()).unwrap();
    f
}

fn runtime() -> Runtime {
    Runtime {
        now_ms: 1_000,
        udp_idle_ms: 30_000,
        tcp_idle_ms: 300_000,
        tcp_closing_ms: 10_000,
        nat_port_min: 40000,
        nat_port_max: 40999,
        ..Runtime::default()
    }
}

/// VIP 0's ACL brought to `want` the agent's way; returns the state.
fn set_acl(f: &mut Fixture, state: &mut AclState, want: &VipAcl) {
    sync(&mut f.dp, state, 0, want).expect("ACL written");
}

fn syn4(src: Ipv4Addr, port: u16) -> Vec<u8> {
    Ipv4Packet::tcp(src, port, VIP, 80).build()
}

fn ack4(src: Ipv4Addr, port: u16) -> Vec<u8> {
    let mut p = Ipv4Packet::tcp(src, port, VIP, 80);
    p.tcp_flags = TCP_ACK;
    p.build()
}

fn syn6(src: Ipv6Addr, port: u16) -> Vec<u8> {
    Ipv6Packet::tcp(src, port, VIP6, 80).build()
}

fn ack6(src: Ipv6Addr, port: u16) -> Vec<u8> {
    let mut p = Ipv6Packet::tcp(src, port, VIP6, 80);
    p.tcp_flags = TCP_ACK;
    p.build()
}

/// Forwarded (the mode's action; NAT too sends on with XDP_TX here),
/// and no drop counted.
#[track_caller]
fn assert_forwarded(f: &Fixture, frame: &[u8], what: &str) {
    let before = f.reasons();
    let r = f.run(frame);
    assert_eq!(
        r.action,
        XDP_TX,
        "{what}: {:?}",
        moved(&before, &f.reasons())
    );
}

#[track_caller]
fn assert_denied(f: &Fixture, frame: &[u8]) {
    assert_dropped(f, frame, "drop_acl_denied");
}

#[test]
fn without_an_acl_every_source_passes_and_nothing_is_counted() {
    let f = fixture4(FORWARD_DSR_L2);
    assert_forwarded(&f, &syn4(v4("198.18.7.7"), 1000), "no ACL");
    assert_eq!(f.dp.vip_stats(0).unwrap().acl_denied, 0);
}

#[test]
fn v4_allow_only_admits_its_prefixes_and_denies_the_rest() {
    let mut f = fixture4(FORWARD_DSR_L2);
    let mut st = AclState::default();
    set_acl(&mut f, &mut st, &acl(&["198.18.0.0/24"], &[]));
    assert_forwarded(&f, &syn4(v4("198.18.0.2"), 1000), "allowed");
    assert_denied(&f, &syn4(v4("198.18.7.2"), 1000));
    assert_denied(&f, &ack4(v4("198.18.7.2"), 1001));
    let s = f.dp.vip_stats(0).unwrap();
    assert_eq!((s.acl_denied, s.packets, s.new_flows), (2, 1, 1));
}

#[test]
fn v4_deny_only_denies_its_prefixes_and_admits_the_rest() {
    let mut f = fixture4(FORWARD_DSR_L2);
    let mut st = AclState::default();
    set_acl(
        &mut f,
        &mut st,
        &acl(&[], &["198.18.0.0/24", "198.18.9.9/32"]),
    );
    assert_denied(&f, &syn4(v4("198.18.0.2"), 1000));
    assert_denied(&f, &syn4(v4("198.18.9.9"), 1000));
    assert_forwarded(&f, &syn4(v4("198.18.9.8"), 1000), "not in the deny list");
    assert_forwarded(&f, &syn4(v4("198.19.0.2"), 1000), "not in the deny list");
    assert_eq!(f.dp.vip_stats(0).unwrap().acl_denied, 2);
}

#[test]
fn v4_the_longest_prefix_of_either_list_decides_then_the_default() {
    let mut f = fixture4(FORWARD_DSR_L2);
    let mut st = AclState::default();
    let a = acl(
        &["198.18.0.0/16", "198.18.5.128/25", "198.18.5.7/32"],
        &["198.18.5.0/24", "198.18.0.0/20"],
    );
    set_acl(&mut f, &mut st, &a);
    for (src, allowed) in [
        ("198.18.200.1", true), // /16 allow
        ("198.18.1.1", false),  // /20 deny beats /16 allow
        ("198.18.5.1", false),  // /24 deny
        ("198.18.5.7", true),   // /32 allow beats /24 deny
        ("198.18.5.200", true), // /25 allow beats /24 deny
        ("198.19.0.1", false),  // no match, allow list present: default deny
    ] {
        let frame = syn4(v4(src), 2000);
        assert_eq!(
            a.decide(IpAddr::V4(v4(src))).allowed,
            allowed,
            "{src}: the agent's model"
        );
        if allowed {
            assert_forwarded(&f, &frame, src);
        } else {
            assert_denied(&f, &frame);
        }
    }
    assert_eq!(f.dp.vip_stats(0).unwrap().acl_denied, 3);
}

#[test]
fn v4_every_forwarding_mode_honours_the_acl() {
    for mode in [FORWARD_DSR_L2, FORWARD_IPIP, FORWARD_GUE, FORWARD_NAT] {
        let mut f = fixture4(mode);
        let mut st = AclState::default();
        set_acl(
            &mut f,
            &mut st,
            &acl(&["198.18.0.0/24"], &["198.18.0.66/32"]),
        );
        assert_forwarded(&f, &syn4(v4("198.18.0.2"), 3000), &format!("mode {mode}"));
        assert_forwarded(&f, &ack4(v4("198.18.0.2"), 3000), &format!("mode {mode}"));
        assert_denied(&f, &syn4(v4("198.18.0.66"), 3000));
        assert_denied(&f, &syn4(v4("198.18.1.1"), 3000));
        let s = f.dp.vip_stats(0).unwrap();
        assert_eq!(s.acl_denied, 2, "mode {mode}");
    }
}

#[test]
fn v4_a_cached_flow_is_cut_by_a_switch_to_an_acl_that_denies_it() {
    for mode in [FORWARD_DSR_L2, FORWARD_NAT] {
        let mut f = fixture4(mode);
        let mut st = AclState::default();
        let client = v4("198.18.0.2");
        set_acl(&mut f, &mut st, &acl(&[], &["198.18.3.0/24"]));
        assert_forwarded(&f, &syn4(client, 4000), "first packet");
        assert_forwarded(&f, &ack4(client, 4000), "cached");
        assert_forwarded(&f, &ack4(client, 4000), "cached");
        if mode == FORWARD_DSR_L2 {
            let s = f.dp.vip_stats(0).unwrap();
            assert_eq!(s.conntrack_hits, 2, "the flow is established");
        }
        set_acl(&mut f, &mut st, &acl(&[], &["198.18.0.0/24"]));
        assert_denied(&f, &ack4(client, 4000));
        assert_denied(&f, &ack4(client, 4000));
        // And back: the flow continues.
        set_acl(&mut f, &mut st, &acl(&[], &[]));
        assert_forwarded(&f, &ack4(client, 4000), "ACL removed");
    }
}

/// The flow cache answers an established flow without the LPM lookup: a
/// prefix slipped into the bank in force without a switch (which the
/// agent never does) is seen by a new flow but not by the cached one;
/// the next switch re-checks the cached flow too.
#[test]
fn a_cache_hit_skips_the_lookup_and_a_switch_rechecks_it() {
    let mut f = fixture4(FORWARD_DSR_L2);
    let mut st = AclState::default();
    let client = v4("198.18.0.2");
    let a = acl(&[], &["198.18.3.0/24"]);
    set_acl(&mut f, &mut st, &a);
    assert_forwarded(&f, &syn4(client, 5000), "first packet");
    assert_forwarded(&f, &ack4(client, 5000), "second packet");
    let bank = acl_bank(st.vips[&0].word);
    let deny_client = BTreeMap::from([("198.18.0.0/24".parse::<Cidr>().unwrap(), ACL_DENY)]);
    f.dp.acl_insert(0, bank, &deny_client).unwrap();
    assert_forwarded(&f, &ack4(client, 5000), "a cache hit does no lookup");
    assert_denied(&f, &syn4(client, 5001));
    // A switch (to the same prefixes as the bank now holds) re-checks.
    f.dp.acl_delete(0, bank, &mut deny_client.keys().copied())
        .unwrap();
    set_acl(
        &mut f,
        &mut st,
        &acl(&[], &["198.18.0.0/24", "198.18.3.0/24"]),
    );
    assert_denied(&f, &ack4(client, 5000));
}

#[test]
fn v6_allow_deny_longest_match_and_default() {
    let mut f = fixture6(FORWARD_DSR_L2);
    let mut st = AclState::default();
    // Allow-only.
    set_acl(&mut f, &mut st, &acl(&["2001:2::/64"], &[]));
    assert_forwarded(&f, &syn6(v6("2001:2::5"), 1000), "allowed");
    assert_denied(&f, &syn6(v6("2001:2:0:1::5"), 1000));
    // Deny-only.
    set_acl(&mut f, &mut st, &acl(&[], &["2001:2::/64"]));
    assert_denied(&f, &syn6(v6("2001:2::5"), 1001));
    assert_forwarded(&f, &syn6(v6("2001:2:0:1::5"), 1001), "not denied");
    // Longest match across both lists, then the default.
    let a = acl(
        &["2001:2::/48", "2001:2:0:5:8000::/65", "2001:2:0:5::7/128"],
        &["2001:2:0:5::/64"],
    );
    set_acl(&mut f, &mut st, &a);
    for (src, allowed) in [
        ("2001:2:0:9::1", true),
        ("2001:2:0:5::1", false),
        ("2001:2:0:5::7", true),
        ("2001:2:0:5:8000::1", true),
        ("2001:2:1::1", false),
    ] {
        assert_eq!(a.decide(IpAddr::V6(v6(src))).allowed, allowed, "{src}");
        if allowed {
            assert_forwarded(&f, &syn6(v6(src), 1002), src);
        } else {
            assert_denied(&f, &syn6(v6(src), 1002));
        }
    }
    assert_eq!(f.dp.vip_stats(0).unwrap().acl_denied, 4);
}

#[test]
fn v6_every_mode_honours_the_acl_and_a_cached_flow_is_cut_by_a_switch() {
    for mode in [FORWARD_DSR_L2, FORWARD_IPIP, FORWARD_GUE, FORWARD_NAT] {
        let mut f = fixture6(mode);
        let mut st = AclState::default();
        let client = v6("2001:2::2");
        set_acl(&mut f, &mut st, &acl(&["2001:2::/64"], &[]));
        assert_forwarded(&f, &syn6(client, 6000), &format!("mode {mode}"));
        assert_forwarded(&f, &ack6(client, 6000), &format!("mode {mode}"));
        assert_forwarded(&f, &ack6(client, 6000), &format!("mode {mode}"));
        assert_denied(&f, &syn6(v6("2001:2:0:7::2"), 6000));
        set_acl(&mut f, &mut st, &acl(&["2001:2::/64"], &["2001:2::2/128"]));
        assert_denied(&f, &ack6(client, 6000));
        assert_eq!(f.dp.vip_stats(0).unwrap().acl_denied, 2, "mode {mode}");
    }
}

#[test]
fn the_maps_read_back_what_was_written_and_old_banks_are_emptied() {
    let mut f = fixture4(FORWARD_DSR_L2);
    let mut st = AclState::default();
    set_acl(
        &mut f,
        &mut st,
        &acl(&["198.18.0.0/16"], &["198.18.1.0/24"]),
    );
    set_acl(
        &mut f,
        &mut st,
        &acl(&["198.18.0.0/16"], &["198.18.2.0/24"]),
    );
    let back = f.dp.acl_read().unwrap();
    assert_eq!(back, st);
    assert!(back.stale.is_empty(), "{:?}", back.stale);
    assert_eq!(back.len(), 2);
    set_acl(&mut f, &mut st, &VipAcl::default());
    assert_eq!(f.dp.acl_read().unwrap(), AclState::default());
    assert_eq!(
        f.dp.vip_stats(0).unwrap().acl_denied,
        0,
        "no packet in this test"
    );
    let _ = XDP_DROP;
}

/// A packet the outer header makes too big is answered with ICMP
/// ("fragmentation needed", ICMPv6 "packet too big") only for a source
/// the ACL admits: a denied source's is dropped and counted like any.
#[test]
fn a_denied_source_gets_no_too_big_answer() {
    let set_limit = |f: &mut Fixture| {
        let mut rt = runtime();
        rt.max_l3_len = 1500;
        f.dp.set_runtime(rt).unwrap();
    };
    let too_big4 = |src| {
        let mut p = Ipv4Packet::tcp(src, 7000, VIP, 80);
        p.tcp_flags = TCP_ACK;
        p.payload = vec![0; 1500 - 40];
        p.frag = 0x4000;
        p.build()
    };
    let mut f = fixture4(FORWARD_IPIP);
    set_limit(&mut f);
    let mut st = AclState::default();
    set_acl(&mut f, &mut st, &acl(&["198.18.0.0/24"], &[]));
    let before = f.reasons();
    assert_eq!(f.run(&too_big4(v4("198.18.0.2"))).action, XDP_TX);
    assert_eq!(
        moved(&before, &f.reasons()),
        BTreeMap::from([("tx_icmp_too_big", 1)])
    );
    assert_denied(&f, &too_big4(v4("198.18.9.2")));

    let too_big6 = |src| {
        let mut p = Ipv6Packet::tcp(src, 7000, VIP6, 80);
        p.tcp_flags = TCP_ACK;
        p.payload = vec![0; 1500 - 60];
        p.build()
    };
    let mut f = fixture6(FORWARD_IPIP);
    set_limit(&mut f);
    let mut st = AclState::default();
    set_acl(&mut f, &mut st, &acl(&["2001:2::/64"], &[]));
    let before = f.reasons();
    assert_eq!(f.run(&too_big6(v6("2001:2::2"))).action, XDP_TX);
    assert_eq!(
        moved(&before, &f.reasons()),
        BTreeMap::from([("tx_icmp_too_big", 1)])
    );
    assert_denied(&f, &too_big6(v6("2001:2:0:9::2")));
}

/// A trie too small for a switch refuses it with an error naming the
/// setting; the ACL in force stays, and no prefix is left behind.
#[test]
fn a_full_trie_refuses_the_switch_and_keeps_the_acl_in_force() {
    let mut f = Fixture::with_sizes(lb::datapath::MapSizes {
        max_vips: 4,
        max_backends: 64,
        acl_entries: 8,
        ..lb::datapath::MapSizes::default()
    });
    f.add_vip(0, (VIP, 80, IPPROTO_TCP), &[(1, 1), (2, 1), (3, 1)]);
    let mut st = AclState::default();
    let small = acl(&["198.18.0.0/24"], &["198.18.0.66/32"]);
    set_acl(&mut f, &mut st, &small);
    let hosts: Vec<String> = (1..=7).map(|i| format!("198.18.7.{i}/32")).collect();
    let hosts: Vec<&str> = hosts.iter().map(String::as_str).collect();
    let big = acl(&["198.18.0.0/24"], &hosts);
    let e = sync(&mut f.dp, &mut st, 0, &big).unwrap_err().to_string();
    assert!(
        e.contains("ACL4 is full") && e.contains("acl_entries"),
        "{e}"
    );
    assert_eq!(f.dp.acl_read().unwrap(), st);
    assert_eq!(st.vips[&0].prefixes, small.entries());
    assert_denied(&f, &syn4(v4("198.18.0.66"), 8000));
    assert_forwarded(&f, &syn4(v4("198.18.0.2"), 8000), "still allowed");
}

/// 100 000 host prefixes on one VIP, written and switched to another
/// 100 000 the agent's way (the times are printed, not asserted): the
/// maps read back exactly the ACL in force, and packets follow it.
#[test]
fn a_vip_of_100_000_prefixes_is_written_and_switched() {
    let mut f = Fixture::with_sizes(lb::datapath::MapSizes {
        max_vips: 4,
        max_backends: 64,
        acl_entries: 200_000,
        ..lb::datapath::MapSizes::default()
    });
    f.add_vip(0, (VIP, 80, IPPROTO_TCP), &[(1, 1), (2, 1), (3, 1)]);
    // Hosts from 198.18.1.0 on: the client 198.18.0.2 is not among them.
    let base = u32::from(v4("198.18.1.0"));
    let hosts = |shift: u32| {
        let mut deny: Vec<Cidr> = (0..100_000u32)
            .map(|i| Cidr::new(Ipv4Addr::from(base + i + shift).into(), 32).unwrap())
            .collect();
        deny.sort();
        VipAcl {
            allow: vec![],
            deny,
        }
    };
    let (a, b) = (hosts(0), hosts(7));
    let mut st = AclState::default();
    let t = std::time::Instant::now();
    set_acl(&mut f, &mut st, &a);
    let first = t.elapsed();
    let t = std::time::Instant::now();
    set_acl(&mut f, &mut st, &b);
    let switch = t.elapsed();
    let t = std::time::Instant::now();
    let back = f.dp.acl_read().unwrap();
    let read = t.elapsed();
    assert_eq!(back, st);
    assert_eq!(back.len(), 100_000);
    println!(
        "100 000 prefixes: written in {:.0} ms, switched to another 100 000 in {:.0} ms \
         (insert + delete of the old bank), read back in {:.0} ms",
        first.as_secs_f64() * 1e3,
        switch.as_secs_f64() * 1e3,
        read.as_secs_f64() * 1e3
    );
    assert_denied(&f, &syn4(Ipv4Addr::from(base + 7), 9000));
    assert_forwarded(
        &f,
        &syn4(Ipv4Addr::from(base + 3), 9000),
        "only in the old ACL",
    );
    assert_forwarded(&f, &syn4(v4("198.18.0.2"), 9000), "in neither");
}
