//! lb-decap at packet level: the real object through BPF_PROG_TEST_RUN,
//! with maps of its own (allow-list 198.18.1.0/24 and 2001:2:0:1::/64, GUE
//! port 6080). Every run checks the verdict, the output frame and that
//! exactly one counter moved.

use std::{
    collections::BTreeMap,
    net::{IpAddr, Ipv4Addr, Ipv6Addr},
};

use aya::programs::{TestRun, TestRunOptions};
use lb::decap::{Cidr, DecapProgram, Settings};
use lb_common::decap::{DEFAULT_GUE_PORT, INLINE_PREFIXES};
use lb_tests::{
    fixture::{RunResult, XDP_ABORTED, XDP_DROP, XDP_PASS, run_xdp},
    packet::{
        ETH_P_IPV4, ETH_P_IPV6, Encap, IP_MF, IPPROTO_IPIP, IPPROTO_IPV6, Ipv4Packet,
        TUNNEL_DST_MAC, TUNNEL_SRC_MAC, arp_request, encapsulate, ether_type_of, ethernet_frame,
        icmp_echo, icmpv6_neighbor_solicitation, ipv4_l3, ipv4_udp_l3, ipv6_l3, ipv6_tcp,
        ipv6_udp_l3, tunnel_frame, udp_l4,
    },
    testprogs::TestProgs,
};

const LB4: Ipv4Addr = Ipv4Addr::new(198, 18, 1, 10);
const LB6: Ipv6Addr = Ipv6Addr::new(0x2001, 2, 0, 1, 0, 0, 0, 10);
const FOREIGN4: Ipv4Addr = Ipv4Addr::new(198, 18, 2, 10);
const FOREIGN6: Ipv6Addr = Ipv6Addr::new(0x2001, 2, 0, 2, 0, 0, 0, 10);
const BACKEND4: Ipv4Addr = Ipv4Addr::new(198, 18, 3, 2);
const BACKEND6: Ipv6Addr = Ipv6Addr::new(0x2001, 2, 0, 3, 0, 0, 0, 2);
const CLIENT4: Ipv4Addr = Ipv4Addr::new(198, 18, 5, 1);
const CLIENT6: Ipv6Addr = Ipv6Addr::new(0x2001, 2, 0, 5, 0, 0, 0, 1);
const VIP4: Ipv4Addr = Ipv4Addr::new(198, 18, 10, 1);
const VIP6: Ipv6Addr = Ipv6Addr::new(0x2001, 2, 0, 10, 0, 0, 0, 1);

const GUE: Encap = Encap::Gue {
    src_port: 40123,
    port: DEFAULT_GUE_PORT,
};

struct Decap {
    prog: DecapProgram,
}

impl Decap {
    fn new() -> Self {
        lb_tests::require_root();
        let mut prog = DecapProgram::load_private().expect("load lb-decap");
        let d = Self {
            prog: {
                prog.maps
                    .apply(&settings(
                        &["198.18.1.0/24", "2001:2:0:1::/64"],
                        DEFAULT_GUE_PORT,
                    ))
                    .expect("fill the maps");
                prog
            },
        };
        assert_eq!(
            d.counters().values().sum::<u64>(),
            0,
            "fresh maps count nothing"
        );
        d
    }

    fn counters(&self) -> BTreeMap<&'static str, u64> {
        self.prog
            .maps
            .counters()
            .unwrap()
            .into_iter()
            .map(|(r, n)| (r.name(), n))
            .collect()
    }

    /// The counters that moved since `before`, and by how much.
    fn moved_since(&self, before: &BTreeMap<&'static str, u64>) -> Vec<(&'static str, u64)> {
        self.counters()
            .into_iter()
            .filter(|(k, v)| before[k] != *v)
            .map(|(k, v)| (k, v - before[k]))
            .collect()
    }

    /// Runs `frame` and checks that exactly `reason` moved, by one.
    fn run(&self, frame: &[u8], reason: &str) -> RunResult {
        let before = self.counters();
        let r = run_xdp(self.prog.program(), frame).expect("BPF_PROG_TEST_RUN");
        let moved = self.moved_since(&before);
        assert_eq!(moved, vec![(reason, 1)], "counters for {}", hex(frame));
        r
    }
}

fn settings(allow: &[&str], port: u16) -> Settings {
    Settings {
        allow: allow.iter().map(|s| s.parse::<Cidr>().unwrap()).collect(),
        gue_port: port,
    }
}

fn hex(b: &[u8]) -> String {
    b.iter().map(|x| format!("{x:02x}")).collect()
}

fn inner4() -> Vec<u8> {
    ipv4_udp_l3(CLIENT4, 40000, VIP4, 53, b"inner v4 payload")
}

fn inner6() -> Vec<u8> {
    ipv6_udp_l3(CLIENT6, 40000, VIP6, 53, b"inner v6 payload")
}

/// Every format: (name, outer source, outer destination, encap, inner).
fn formats() -> Vec<(&'static str, IpAddr, IpAddr, Encap, Vec<u8>)> {
    vec![
        ("4in4", LB4.into(), BACKEND4.into(), Encap::Ipip, inner4()),
        ("6in4", LB4.into(), BACKEND4.into(), Encap::Ipip, inner6()),
        ("6in6", LB6.into(), BACKEND6.into(), Encap::Ipip, inner6()),
        ("4in6", LB6.into(), BACKEND6.into(), Encap::Ipip, inner4()),
        ("gue 4 over 4", LB4.into(), BACKEND4.into(), GUE, inner4()),
        ("gue 6 over 4", LB4.into(), BACKEND4.into(), GUE, inner6()),
        ("gue 6 over 6", LB6.into(), BACKEND6.into(), GUE, inner6()),
        ("gue 4 over 6", LB6.into(), BACKEND6.into(), GUE, inner4()),
    ]
}

fn reason_of(encap: Encap) -> &'static str {
    match encap {
        Encap::Ipip => "decap_ipip",
        Encap::Gue { .. } => "decap_gue",
    }
}

#[test]
fn each_format_decapsulates_to_exactly_the_inner_packet() {
    let d = Decap::new();
    for vlan in [None, Some(42)] {
        for (name, src, dst, encap, inner) in formats() {
            let frame = tunnel_frame(&inner, src, dst, encap, vlan);
            let r = d.run(&frame, reason_of(encap));
            assert_eq!(r.action, XDP_PASS, "{name} vlan {vlan:?}");
            let want = ethernet_frame(
                TUNNEL_DST_MAC,
                TUNNEL_SRC_MAC,
                vlan,
                ether_type_of(&inner),
                &inner,
            );
            assert_eq!(hex(&r.frame), hex(&want), "{name} vlan {vlan:?}");
        }
    }
    let c = d.counters();
    assert_eq!((c["decap_ipip"], c["decap_gue"]), (8, 8));
}

#[test]
fn an_802_1ad_tag_is_kept_as_it_was() {
    let d = Decap::new();
    let mut frame = tunnel_frame(&inner4(), LB4.into(), BACKEND4.into(), Encap::Ipip, Some(7));
    frame[12..14].copy_from_slice(&0x88A8u16.to_be_bytes());
    let r = d.run(&frame, "decap_ipip");
    assert_eq!(r.action, XDP_PASS);
    let mut want = ethernet_frame(
        TUNNEL_DST_MAC,
        TUNNEL_SRC_MAC,
        Some(7),
        ETH_P_IPV4,
        &inner4(),
    );
    want[12..14].copy_from_slice(&0x88A8u16.to_be_bytes());
    assert_eq!(hex(&r.frame), hex(&want));
}

#[test]
fn outer_ipv4_options_are_stripped_with_the_header() {
    let d = Decap::new();
    let inner = inner4();
    // IHL 6: one word of options (NOPs), checksum irrelevant to lb-decap.
    let mut outer = ipv4_l3(LB4, BACKEND4, IPPROTO_IPIP, &inner);
    outer[0] = 0x46;
    outer.splice(20..20, [1u8, 1, 1, 1]);
    let tot = outer.len() as u16;
    outer[2..4].copy_from_slice(&tot.to_be_bytes());
    let frame = ethernet_frame(TUNNEL_DST_MAC, TUNNEL_SRC_MAC, None, ETH_P_IPV4, &outer);
    let r = d.run(&frame, "decap_ipip");
    assert_eq!(r.action, XDP_PASS);
    let want = ethernet_frame(TUNNEL_DST_MAC, TUNNEL_SRC_MAC, None, ETH_P_IPV4, &inner);
    assert_eq!(hex(&r.frame), hex(&want));
}

#[test]
fn tunnel_packets_from_other_sources_are_dropped_and_counted() {
    let d = Decap::new();
    for vlan in [None, Some(42)] {
        for (name, src, dst, encap, inner) in formats() {
            let foreign: IpAddr = match src {
                IpAddr::V4(_) => FOREIGN4.into(),
                IpAddr::V6(_) => FOREIGN6.into(),
            };
            let frame = tunnel_frame(&inner, foreign, dst, encap, vlan);
            let r = d.run(&frame, "drop_not_allowed");
            assert_eq!(r.action, XDP_DROP, "{name} from {foreign}");
        }
    }
    // Even a malformed or fragmented tunnel packet from a foreign source
    // counts as not allowed.
    let mut frag = tunnel_frame(
        &inner4(),
        FOREIGN4.into(),
        BACKEND4.into(),
        Encap::Ipip,
        None,
    );
    frag[20..22].copy_from_slice(&IP_MF.to_be_bytes());
    assert_eq!(d.run(&frag, "drop_not_allowed").action, XDP_DROP);
    assert_eq!(d.counters()["drop_not_allowed"], 17);
}

#[test]
fn the_allow_list_is_a_longest_prefix_match_and_updates_in_place() {
    let mut d = Decap::new();
    let verdict = |d: &Decap, src: IpAddr| {
        let dst: IpAddr = match src {
            IpAddr::V4(_) => BACKEND4.into(),
            IpAddr::V6(_) => BACKEND6.into(),
        };
        let frame = tunnel_frame(&inner4(), src, dst, Encap::Ipip, None);
        run_xdp(d.prog.program(), &frame).unwrap().action
    };
    let v4 = |s: &str| IpAddr::V4(s.parse().unwrap());
    let v6 = |s: &str| IpAddr::V6(s.parse().unwrap());
    // 198.18.1.0/24: both ends in, both neighbours out.
    assert_eq!(verdict(&d, v4("198.18.1.0")), XDP_PASS);
    assert_eq!(verdict(&d, v4("198.18.1.255")), XDP_PASS);
    assert_eq!(verdict(&d, v4("198.18.0.255")), XDP_DROP);
    assert_eq!(verdict(&d, v4("198.18.2.0")), XDP_DROP);
    // 2001:2:0:1::/64.
    assert_eq!(verdict(&d, v6("2001:2:0:1::")), XDP_PASS);
    assert_eq!(verdict(&d, v6("2001:2:0:1:ffff:ffff:ffff:ffff")), XDP_PASS);
    assert_eq!(verdict(&d, v6("2001:2:0:0:ffff:ffff:ffff:ffff")), XDP_DROP);
    assert_eq!(verdict(&d, v6("2001:2:0:2::")), XDP_DROP);
    // Families apart: an IPv6 source whose first 32 bits are an allowed
    // IPv4 address.
    assert_eq!(verdict(&d, v4("198.18.1.10")), XDP_PASS);
    assert_eq!(verdict(&d, v6("c612:10a::")), XDP_DROP);

    // Replace the list: one host and a /16; the /24 and /64 are removed.
    let applied = d
        .prog
        .maps
        .apply(&settings(
            &["198.18.2.7/32", "2001:3::/32"],
            DEFAULT_GUE_PORT,
        ))
        .unwrap();
    assert_eq!(applied.removed.len(), 2, "{applied:?}");
    assert_eq!(applied.added.len(), 2, "{applied:?}");
    assert_eq!(
        d.prog
            .maps
            .allow_list()
            .unwrap()
            .iter()
            .map(|c| c.to_string())
            .collect::<Vec<_>>(),
        ["198.18.2.7/32", "2001:3::/32"]
    );
    assert_eq!(verdict(&d, v4("198.18.2.7")), XDP_PASS);
    assert_eq!(verdict(&d, v4("198.18.2.6")), XDP_DROP);
    assert_eq!(verdict(&d, v4("198.18.2.8")), XDP_DROP);
    // Allowed before the update, not after.
    assert_eq!(verdict(&d, v4("198.18.1.10")), XDP_DROP);
    assert_eq!(verdict(&d, v6("2001:3:ffff::1")), XDP_PASS);
    assert_eq!(verdict(&d, v6("2001:2:0:1::10")), XDP_DROP);
}

/// The verdict for an IPIP frame from `src` (inner IPv4).
fn verdict_from(d: &Decap, src: IpAddr) -> u32 {
    let dst: IpAddr = match src {
        IpAddr::V4(_) => BACKEND4.into(),
        IpAddr::V6(_) => BACKEND6.into(),
    };
    let frame = tunnel_frame(&inner4(), src, dst, Encap::Ipip, None);
    run_xdp(d.prog.program(), &frame).unwrap().action
}

/// `n` disjoint prefixes per family, in the order the list sorts them:
/// 198.18.1.16*i/28 and 2001:2:0:1:i::/80 (i < n).
fn prefixes(n: u16) -> Vec<String> {
    let v4 = (0..n).map(|i| format!("198.18.1.{}/28", 16 * i));
    let v6 = (0..n).map(|i| format!("2001:2:0:1:{i:x}::/80"));
    v4.chain(v6).collect()
}

#[test]
fn an_inline_list_of_eight_prefixes_allows_the_eighth_and_drops_the_rest() {
    let mut d = Decap::new();
    let list = prefixes(INLINE_PREFIXES as u16);
    let refs: Vec<&str> = list.iter().map(String::as_str).collect();
    d.prog
        .maps
        .apply(&settings(&refs, DEFAULT_GUE_PORT))
        .unwrap();
    assert_eq!(
        d.prog.maps.inline_lists().unwrap(),
        (true, true),
        "8 prefixes per family fit the inline lists"
    );
    let v4 = |s: &str| IpAddr::V4(s.parse().unwrap());
    let v6 = |s: &str| IpAddr::V6(s.parse().unwrap());
    // The 8th prefix: 198.18.1.112/28 and 2001:2:0:1:7::/80, both ends.
    assert_eq!(verdict_from(&d, v4("198.18.1.112")), XDP_PASS);
    assert_eq!(verdict_from(&d, v4("198.18.1.127")), XDP_PASS);
    assert_eq!(verdict_from(&d, v6("2001:2:0:1:7::")), XDP_PASS);
    assert_eq!(
        verdict_from(&d, v6("2001:2:0:1:7:ffff:ffff:ffff")),
        XDP_PASS
    );
    // The first, and a middle one.
    assert_eq!(verdict_from(&d, v4("198.18.1.1")), XDP_PASS);
    assert_eq!(verdict_from(&d, v6("2001:2:0:1:3::9")), XDP_PASS);
    // Just outside the list.
    assert_eq!(verdict_from(&d, v4("198.18.1.128")), XDP_DROP);
    assert_eq!(verdict_from(&d, v4("198.18.0.255")), XDP_DROP);
    assert_eq!(verdict_from(&d, v6("2001:2:0:1:8::")), XDP_DROP);
    assert_eq!(verdict_from(&d, v6("2001:2:0:0:7::")), XDP_DROP);
    // The 8th source is counted as decapsulated, an outsider as not allowed.
    let frame = tunnel_frame(
        &inner4(),
        v4("198.18.1.120"),
        BACKEND4.into(),
        Encap::Ipip,
        None,
    );
    assert_eq!(d.run(&frame, "decap_ipip").action, XDP_PASS);
    let frame = tunnel_frame(
        &inner4(),
        v6("2001:2:0:1:9::1"),
        BACKEND6.into(),
        Encap::Ipip,
        None,
    );
    assert_eq!(d.run(&frame, "drop_not_allowed").action, XDP_DROP);
}

#[test]
fn a_list_longer_than_the_inline_capacity_is_enforced_through_the_trie() {
    let mut d = Decap::new();
    let n = INLINE_PREFIXES as u16 + 1;
    let list = prefixes(n);
    let refs: Vec<&str> = list.iter().map(String::as_str).collect();
    d.prog
        .maps
        .apply(&settings(&refs, DEFAULT_GUE_PORT))
        .unwrap();
    assert_eq!(d.prog.maps.inline_lists().unwrap(), (false, false));
    let v4 = |s: &str| IpAddr::V4(s.parse().unwrap());
    let v6 = |s: &str| IpAddr::V6(s.parse().unwrap());
    // The 9th prefix (beyond the inline capacity) and the first.
    assert_eq!(verdict_from(&d, v4("198.18.1.128")), XDP_PASS);
    assert_eq!(verdict_from(&d, v4("198.18.1.143")), XDP_PASS);
    assert_eq!(verdict_from(&d, v4("198.18.1.0")), XDP_PASS);
    assert_eq!(verdict_from(&d, v6("2001:2:0:1:8::5")), XDP_PASS);
    assert_eq!(verdict_from(&d, v6("2001:2:0:1::5")), XDP_PASS);
    // Outside.
    assert_eq!(verdict_from(&d, v4("198.18.1.144")), XDP_DROP);
    assert_eq!(verdict_from(&d, v6("2001:2:0:1:9::")), XDP_DROP);

    // One family long, the other short: each is checked its own way.
    let mut mixed = prefixes(1)[..1].to_vec();
    mixed.extend(list[n as usize..].iter().cloned());
    let refs: Vec<&str> = mixed.iter().map(String::as_str).collect();
    d.prog
        .maps
        .apply(&settings(&refs, DEFAULT_GUE_PORT))
        .unwrap();
    assert_eq!(d.prog.maps.inline_lists().unwrap(), (true, false));
    assert_eq!(verdict_from(&d, v4("198.18.1.15")), XDP_PASS);
    assert_eq!(verdict_from(&d, v4("198.18.1.128")), XDP_DROP);
    assert_eq!(verdict_from(&d, v6("2001:2:0:1:8::5")), XDP_PASS);
    assert_eq!(verdict_from(&d, v6("2001:2:0:1:9::")), XDP_DROP);

    // Back to a short list: the prefixes left out are refused again.
    d.prog
        .maps
        .apply(&settings(&["198.18.1.128/28"], DEFAULT_GUE_PORT))
        .unwrap();
    assert_eq!(d.prog.maps.inline_lists().unwrap(), (true, true));
    assert_eq!(verdict_from(&d, v4("198.18.1.130")), XDP_PASS);
    assert_eq!(verdict_from(&d, v4("198.18.1.0")), XDP_DROP);
    assert_eq!(verdict_from(&d, v6("2001:2:0:1:8::5")), XDP_DROP);
    assert_eq!(
        d.prog.maps.allow_list().unwrap().len(),
        1,
        "the trie holds the list too"
    );
}

#[test]
fn non_tunnel_traffic_passes_untouched() {
    let d = Decap::new();
    let udp_from_lb = |port: u16| {
        Ipv4Packet {
            payload: inner4(),
            ..Ipv4Packet::udp(LB4, 40000, BACKEND4, port)
        }
        .build()
    };
    let cases: Vec<(&str, Vec<u8>, &str)> = vec![
        ("arp", arp_request(LB4, BACKEND4), "pass_not_tunnel"),
        ("icmp echo", icmp_echo(LB4, BACKEND4), "pass_not_tunnel"),
        (
            "icmpv6 neighbour solicitation",
            icmpv6_neighbor_solicitation(LB6, BACKEND6),
            "pass_not_tunnel",
        ),
        (
            "tcp from an allowed source",
            Ipv4Packet::tcp(LB4, 40000, BACKEND4, 80).build(),
            "pass_not_tunnel",
        ),
        (
            "tcp to the VIP",
            Ipv4Packet::tcp(CLIENT4, 40000, VIP4, 80).build(),
            "pass_not_tunnel",
        ),
        ("ipv6 tcp", ipv6_tcp(LB6, BACKEND6, 80), "pass_not_tunnel"),
        (
            "udp to another port, carrying an IP packet",
            udp_from_lb(6081),
            "pass_not_tunnel",
        ),
        (
            "udp from the GUE port",
            Ipv4Packet::udp(LB4, DEFAULT_GUE_PORT, BACKEND4, 53).build(),
            "pass_not_tunnel",
        ),
        (
            "udp to another port from a foreign source",
            Ipv4Packet::udp(FOREIGN4, 40000, BACKEND4, 53).build(),
            "pass_not_tunnel",
        ),
        (
            "ipv6 with a hop-by-hop header (MLD)",
            ethernet_frame(
                TUNNEL_DST_MAC,
                TUNNEL_SRC_MAC,
                None,
                ETH_P_IPV6,
                &ipv6_l3(LB6, BACKEND6, 0, &[IPPROTO_IPIP, 0, 5, 2, 0, 0, 1, 0]),
            ),
            "pass_ipv6_ext_headers",
        ),
        (
            "lldp",
            ethernet_frame(
                [0x01, 0x80, 0xc2, 0, 0, 0x0e],
                TUNNEL_SRC_MAC,
                None,
                0x88cc,
                &[0; 46],
            ),
            "pass_not_tunnel",
        ),
    ];
    for (name, frame, reason) in cases {
        let r = d.run(&frame, reason);
        assert_eq!(r.action, XDP_PASS, "{name}");
        assert_eq!(hex(&r.frame), hex(&frame), "{name}: untouched");
    }
}

#[test]
fn gue_and_ipip_with_a_wrong_inner_version_are_dropped() {
    let d = Decap::new();
    let mut bad_nibble = inner4();
    bad_nibble[0] = 0x55;
    let cases: Vec<(&str, Vec<u8>)> = vec![
        (
            "gue, inner version 5",
            tunnel_frame(&bad_nibble, LB4.into(), BACKEND4.into(), GUE, None),
        ),
        (
            "gue, inner garbage",
            tunnel_frame(&[0u8; 40], LB4.into(), BACKEND4.into(), GUE, None),
        ),
        (
            "gue over 6, inner version 5",
            tunnel_frame(&bad_nibble, LB6.into(), BACKEND6.into(), GUE, None),
        ),
        (
            "protocol 4 carrying IPv6",
            ethernet_frame(
                TUNNEL_DST_MAC,
                TUNNEL_SRC_MAC,
                None,
                ETH_P_IPV4,
                &ipv4_l3(LB4, BACKEND4, IPPROTO_IPIP, &inner6()),
            ),
        ),
        (
            "protocol 41 carrying IPv4",
            ethernet_frame(
                TUNNEL_DST_MAC,
                TUNNEL_SRC_MAC,
                None,
                ETH_P_IPV4,
                &ipv4_l3(LB4, BACKEND4, IPPROTO_IPV6, &inner4()),
            ),
        ),
        (
            "next header 4 carrying IPv6",
            ethernet_frame(
                TUNNEL_DST_MAC,
                TUNNEL_SRC_MAC,
                None,
                ETH_P_IPV6,
                &ipv6_l3(LB6, BACKEND6, IPPROTO_IPIP, &inner6()),
            ),
        ),
        ("inner IPv4 IHL 4", {
            let mut i = inner4();
            i[0] = 0x44;
            tunnel_frame(&i, LB4.into(), BACKEND4.into(), Encap::Ipip, None)
        }),
        ("inner IPv4 longer than the outer room", {
            let mut i = inner4();
            let l = i.len() as u16 + 1;
            i[2..4].copy_from_slice(&l.to_be_bytes());
            tunnel_frame(&i, LB4.into(), BACKEND4.into(), GUE, None)
        }),
        ("inner IPv6 longer than the outer room", {
            let mut i = inner6();
            let l = u16::from_be_bytes([i[4], i[5]]) + 1;
            i[4..6].copy_from_slice(&l.to_be_bytes());
            tunnel_frame(&i, LB6.into(), BACKEND6.into(), Encap::Ipip, None)
        }),
        ("gue with a UDP length beyond the IP length", {
            let mut f = tunnel_frame(&inner4(), LB4.into(), BACKEND4.into(), GUE, None);
            let at = 14 + 20 + 4;
            let l = u16::from_be_bytes([f[at], f[at + 1]]) + 1;
            f[at..at + 2].copy_from_slice(&l.to_be_bytes());
            f
        }),
        ("gue with a UDP length below 8", {
            let mut f = tunnel_frame(&inner4(), LB4.into(), BACKEND4.into(), GUE, None);
            f[14 + 20 + 4..14 + 20 + 6].copy_from_slice(&7u16.to_be_bytes());
            f
        }),
        ("outer IPv4 length beyond the frame", {
            let mut f = tunnel_frame(&inner4(), LB4.into(), BACKEND4.into(), Encap::Ipip, None);
            let l = u16::from_be_bytes([f[16], f[17]]) + 1;
            f[16..18].copy_from_slice(&l.to_be_bytes());
            f
        }),
        ("outer IPv6 payload length beyond the frame", {
            let mut f = tunnel_frame(&inner4(), LB6.into(), BACKEND6.into(), Encap::Ipip, None);
            let l = u16::from_be_bytes([f[18], f[19]]) + 1;
            f[18..20].copy_from_slice(&l.to_be_bytes());
            f
        }),
    ];
    for (name, frame) in cases {
        let r = d.run(&frame, "drop_malformed");
        assert_eq!(r.action, XDP_DROP, "{name}");
    }
}

#[test]
fn outer_ipv4_fragments_of_tunnel_protocols_are_dropped() {
    let d = Decap::new();
    for (name, encap) in [("ipip", Encap::Ipip), ("gue", GUE)] {
        for frag in [IP_MF, 0x0001, IP_MF | 0x4000] {
            let mut f = tunnel_frame(&inner4(), LB4.into(), BACKEND4.into(), encap, None);
            f[20..22].copy_from_slice(&frag.to_be_bytes());
            let r = d.run(&f, "drop_fragment");
            assert_eq!(r.action, XDP_DROP, "{name} frag field {frag:#x}");
        }
    }
}

#[test]
fn the_gue_port_comes_from_the_config_map() {
    let mut d = Decap::new();
    let to = |port| {
        tunnel_frame(
            &inner4(),
            LB4.into(),
            BACKEND4.into(),
            Encap::Gue {
                src_port: 40000,
                port,
            },
            None,
        )
    };
    assert_eq!(d.run(&to(6080), "decap_gue").action, XDP_PASS);
    let other = to(7000);
    let r = d.run(&other, "pass_not_tunnel");
    assert_eq!(hex(&r.frame), hex(&other), "untouched");
    d.prog
        .maps
        .apply(&settings(&["198.18.1.0/24", "2001:2:0:1::/64"], 7000))
        .unwrap();
    assert_eq!(d.prog.maps.gue_port().unwrap(), 7000);
    assert_eq!(d.run(&other, "decap_gue").action, XDP_PASS);
    let old = to(6080);
    let r = d.run(&old, "pass_not_tunnel");
    assert_eq!(hex(&r.frame), hex(&old), "untouched");
}

/// Rewrites the outer length fields of `frame` (outer header at `l3`) to
/// match its length, so that only the inner packet is short.
fn fit_outer_lengths(frame: &mut [u8], l3: usize, gue: bool) {
    let n = frame.len();
    if n <= l3 {
        return;
    }
    let l4 = if frame[l3] >> 4 == 4 {
        if n >= l3 + 4 {
            let l = (n - l3) as u16;
            frame[l3 + 2..l3 + 4].copy_from_slice(&l.to_be_bytes());
        }
        l3 + 20
    } else {
        if n >= l3 + 6 {
            let l = n.saturating_sub(l3 + 40) as u16;
            frame[l3 + 4..l3 + 6].copy_from_slice(&l.to_be_bytes());
        }
        l3 + 40
    };
    if gue && n >= l4 + 6 {
        let l = (n - l4) as u16;
        frame[l4 + 4..l4 + 6].copy_from_slice(&l.to_be_bytes());
    }
}

#[test]
fn every_truncation_is_dropped_or_passed_untouched_never_aborted() {
    let d = Decap::new();
    for vlan in [None, Some(42)] {
        let l3 = if vlan.is_some() { 18 } else { 14 };
        for (name, src, dst, encap, inner) in formats() {
            let full = tunnel_frame(&inner, src, dst, encap, vlan);
            let gue = matches!(encap, Encap::Gue { .. });
            for len in 14..full.len() {
                for fit in [false, true] {
                    let mut f = full[..len].to_vec();
                    if fit {
                        fit_outer_lengths(&mut f, l3, gue);
                    }
                    let before = d.counters();
                    let r = run_xdp(d.prog.program(), &f).expect("BPF_PROG_TEST_RUN");
                    let after = d.counters();
                    let what = format!("{name} vlan {vlan:?} cut at {len} (outer fitted: {fit})");
                    assert_ne!(r.action, XDP_ABORTED, "{what}");
                    assert!(
                        r.action == XDP_DROP || (r.action == XDP_PASS && r.frame == f),
                        "{what}: action {} output {}",
                        r.action,
                        hex(&r.frame)
                    );
                    let moved: u64 = after.iter().map(|(k, v)| v - before[k]).sum();
                    assert_eq!(moved, 1, "{what}: one counter");
                    assert_eq!(after["decap_ipip"] + after["decap_gue"], 0, "{what}");
                }
            }
        }
    }
}

#[test]
fn a_complete_inner_packet_with_trailing_padding_is_decapsulated() {
    // A short inner packet in a frame padded to Ethernet's minimum: the
    // outer lengths cover only the packet, the padding stays behind it and
    // the kernel trims it by the inner length.
    let d = Decap::new();
    let inner = ipv4_l3(CLIENT4, VIP4, 17, &udp_l4(1, 2, &[]));
    let outer = encapsulate(&inner, LB4.into(), BACKEND4.into(), Encap::Ipip);
    let mut frame = ethernet_frame(TUNNEL_DST_MAC, TUNNEL_SRC_MAC, None, ETH_P_IPV4, &outer);
    frame.extend_from_slice(&[0u8; 6]);
    let r = d.run(&frame, "decap_ipip");
    assert_eq!(r.action, XDP_PASS);
    let mut want = ethernet_frame(TUNNEL_DST_MAC, TUNNEL_SRC_MAC, None, ETH_P_IPV4, &inner);
    want.extend_from_slice(&[0u8; 6]);
    assert_eq!(hex(&r.frame), hex(&want));
}

/// The benchmark times lb_decap with `repeat` through the test object's
/// `lb_restore`, which puts the tunnel frame back before every iteration:
/// each of them must strip a header (the counter moves by `repeat`, and
/// nothing else moves), and the last one's output is the inner packet.
#[test]
fn through_lb_restore_every_repeat_strips_the_same_tunnel_frame() {
    const REPEAT: u32 = 1000;
    let d = Decap::new();
    let mut progs = TestProgs::load().expect("load the test programs");
    let target = d.prog.program().fd().unwrap().try_clone().unwrap();
    for (name, src, dst, encap, inner) in formats() {
        let frame = tunnel_frame(&inner, src, dst, encap, None);
        progs.set_restore(&target, &frame).expect("set lb_restore");
        let before = d.counters();
        let mut out = vec![0u8; frame.len() + 256];
        let r = progs
            .restorer()
            .test_run(TestRunOptions {
                data_in: Some(&frame),
                data_out: Some(&mut out),
                repeat: REPEAT,
                ..TestRunOptions::new()
            })
            .expect("BPF_PROG_TEST_RUN");
        assert_eq!(r.return_value, XDP_PASS, "{name}");
        let moved = d.moved_since(&before);
        assert_eq!(moved, vec![(reason_of(encap), u64::from(REPEAT))], "{name}");
        let want = ethernet_frame(
            TUNNEL_DST_MAC,
            TUNNEL_SRC_MAC,
            None,
            ether_type_of(&inner),
            &inner,
        );
        out.truncate(r.data_size_out as usize);
        assert_eq!(hex(&out), hex(&want), "{name}");
    }
}
