//! ICMP to VIP addresses. lb answers pings to a VIP address itself, in XDP
//! (`icmp_echo`, per VIP, default on), and forwards "fragmentation needed"
//! about a VIP's flow to the backend that owns the flow, in the VIP's
//! forwarding mode. Packet level (BPF_PROG_TEST_RUN on the real object)
//! and in namespaces with the real agent. Needs root.

use std::{collections::BTreeMap, net::Ipv4Addr};

use anyhow::{Result, ensure};
use lb_common::{
    FORWARD_DSR_L2, FORWARD_GUE, FORWARD_IPIP, IPPROTO_ICMP, IPPROTO_TCP, IPPROTO_UDP,
};
use lb_tests::{
    agent::{LbAgent, VipSpec},
    fixture::{
        Fixture, LB_MAC, XDP_ABORTED, XDP_PASS, XDP_TX, backend_addr, backend_mac, backend_of_mac,
        moved,
    },
    netns::Topology,
    packet::{Ipv4Packet, TCP_SYN, checksum, icmp4},
    require_root,
};

const VIP: Ipv4Addr = Ipv4Addr::new(198, 18, 10, 1);
const CLIENT: Ipv4Addr = Ipv4Addr::new(198, 18, 0, 2);
const OTHER: Ipv4Addr = Ipv4Addr::new(198, 18, 0, 99);
/// A router on the client's side that sends "fragmentation needed".
const ROUTER: Ipv4Addr = Ipv4Addr::new(198, 18, 0, 254);
const CLIENT_MAC: [u8; 6] = [0x02, 0, 0, 0, 0, 0x02];
const LB_SIDE_MAC: [u8; 6] = [0x02, 0, 0, 0, 0, 0x01];

/// An ICMP packet of `icmp_type` with a valid checksum: identifier,
/// sequence number and `data` after the 4-byte type/code/checksum.
fn icmp(
    src: Ipv4Addr,
    dst: Ipv4Addr,
    icmp_type: u8,
    ttl: u8,
    vlan: Option<u16>,
    data: &[u8],
) -> Vec<u8> {
    let base = Ipv4Packet {
        dst_mac: if src == CLIENT {
            LB_SIDE_MAC
        } else {
            CLIENT_MAC
        },
        src_mac: if src == CLIENT {
            CLIENT_MAC
        } else {
            LB_SIDE_MAC
        },
        vlan,
        ttl,
        ..Ipv4Packet::tcp(src, 0, dst, 0)
    };
    icmp4(base, icmp_type, 0, [0x12, 0x34, 0x00, 0x07], data)
}

fn data(len: usize) -> Vec<u8> {
    (0..len).map(|i| (i * 7 + 3) as u8).collect()
}

fn fixture(echo: bool) -> Fixture {
    let mut f = Fixture::new();
    f.add_vip(0, (VIP, 80, IPPROTO_TCP), &[(1, 1), (2, 1)]);
    f.set_echo(0, VIP, echo);
    f
}

#[test]
fn an_echo_request_to_a_vip_address_is_answered_from_the_vip() {
    let f = fixture(true);
    for vlan in [None, Some(7)] {
        for len in [0, 1, 56, 57, 1000, 1452] {
            let request = icmp(CLIENT, VIP, 8, 17, vlan, &data(len));
            // Built independently: what the client must get back.
            let reply = icmp(VIP, CLIENT, 0, 64, vlan, &data(len));
            let before = f.reasons();
            let r = f.run(&request);
            assert_eq!(r.action, XDP_TX, "len {len} vlan {vlan:?}");
            assert_eq!(r.frame, reply, "len {len} vlan {vlan:?}");
            assert_eq!(
                moved(&before, &f.reasons()),
                BTreeMap::from([("tx_icmp_echo_reply", 1)])
            );
        }
    }
}

#[test]
fn other_icmp_and_pings_lb_does_not_answer_pass_untouched() {
    let on = fixture(true);
    let off = fixture(false);
    let cases = [
        (
            "echo, icmp_echo off",
            &off,
            icmp(CLIENT, VIP, 8, 64, None, b"x"),
        ),
        (
            "echo to another address",
            &on,
            icmp(CLIENT, OTHER, 8, 64, None, b"x"),
        ),
        (
            "echo reply to the VIP",
            &on,
            icmp(CLIENT, VIP, 0, 64, None, b"x"),
        ),
        (
            "unreachable to the VIP",
            &on,
            icmp(CLIENT, VIP, 3, 64, None, b"x"),
        ),
    ];
    for (what, f, frame) in cases {
        let before = f.reasons();
        let r = f.run(&frame);
        assert_eq!(r.action, XDP_PASS, "{what}");
        assert_eq!(r.frame, frame, "{what}: untouched");
        assert_eq!(
            moved(&before, &f.reasons()),
            BTreeMap::from([("pass_not_vip", 1)]),
            "{what}"
        );
    }
    // A code other than 0 is not an echo request.
    let mut frame = icmp(CLIENT, VIP, 8, 64, None, b"x");
    frame[14 + 20 + 1] = 1;
    let r = on.run(&frame);
    assert_eq!((r.action, r.frame == frame), (XDP_PASS, true));
}

#[test]
fn every_truncation_of_an_echo_request_passes_or_is_answered_whole() {
    let f = fixture(true);
    let request = icmp(CLIENT, VIP, 8, 64, None, &data(16));
    // (The kernel refuses frames shorter than an Ethernet header.)
    for cut in 14..request.len() {
        let frame = &request[..cut];
        let r = f.run(frame);
        // Shorter than its IPv4 total length: never answered (dropped as
        // malformed, being addressed to a VIP address, or passed
        // untouched when too short to tell).
        assert_ne!(r.action, XDP_ABORTED, "cut {cut}");
        assert_ne!(r.action, XDP_TX, "cut {cut}");
        if r.action == XDP_PASS {
            assert_eq!(r.frame, frame, "cut {cut}");
        }
    }
    // A total length that leaves no room for the ICMP header: passed.
    for tot_len in 20..28u16 {
        let mut frame = request.clone();
        frame[16..18].copy_from_slice(&tot_len.to_be_bytes());
        frame[24..26].copy_from_slice(&[0, 0]);
        let sum = checksum(&frame[14..34]);
        frame[24..26].copy_from_slice(&sum.to_be_bytes());
        let r = f.run(&frame);
        assert_eq!(r.action, XDP_PASS, "tot_len {tot_len}");
        assert_eq!(r.frame, frame);
    }
}

/// Pings `dst` from the client namespace: how many of `count` answered.
fn ping(topo: &Topology, dst: Ipv4Addr, count: u32) -> Result<u32> {
    // ping bounds itself (-w: the whole run; -W: each answer) and exits
    // non-zero when answers are missing, which is an answer here.
    let out = topo
        .client_ns()
        .command("ping")
        .args([
            "-n",
            "-c",
            &count.to_string(),
            "-i",
            "0.2",
            "-W",
            "1",
            "-w",
            "5",
        ])
        .arg(dst.to_string())
        .output()?;
    let text = String::from_utf8_lossy(&out.stdout);
    let received = text
        .lines()
        .find_map(|l| {
            let (_, rest) = l.split_once(" packets transmitted, ")?;
            rest.split_once(" received")?.0.trim().parse().ok()
        })
        .unwrap_or(0);
    Ok(received)
}

fn echo_replies(agent: &LbAgent) -> Result<u64> {
    let stats = agent.json(&["stats"])?;
    Ok(stats["reasons"]["tx_icmp_echo_reply"][0]
        .as_u64()
        .unwrap_or(0))
}

#[test]
fn a_vip_answers_ping_until_a_reload_turns_it_off() -> Result<()> {
    require_root();
    let topo = Topology::with_backends(1)?;
    let vip = VipSpec::tcp("web", topo.vip(), 80, &[topo.backend_addr(0)]);
    let agent = LbAgent::start(topo.lb_ns(), &topo.lb_iface(), &[vip])?;
    // The backends hold the VIP on lo and do not answer ARP for it; the
    // client routes it to lb, which answers.
    let before = echo_replies(&agent)?;
    let got = ping(&topo, topo.vip(), 3)?;
    ensure!(got == 3, "3 pings to the VIP, {got} answered");
    ensure!(
        echo_replies(&agent)? - before == 3,
        "the answers came from lb's program"
    );
    // icmp_echo = false: lb stops answering (and nothing else does).
    let text = std::fs::read_to_string(&agent.config)?;
    let off = text.replacen("forwarding = ", "icmp_echo = false\nforwarding = ", 1);
    ensure!(off != text);
    std::fs::write(&agent.config, off)?;
    agent.cli_ok(&["reload"])?;
    let before = echo_replies(&agent)?;
    let got = ping(&topo, topo.vip(), 2)?;
    ensure!(got == 0, "{got} pings answered with icmp_echo = false");
    ensure!(echo_replies(&agent)? == before);
    Ok(())
}

/// The first 28 bytes of a packet a backend sent from the VIP: its IPv4
/// header and the first 8 bytes of its payload (what an ICMP error embeds).
fn backend_packet(src: Ipv4Addr, src_port: u16, dst_port: u16, proto: u8) -> Vec<u8> {
    let p = Ipv4Packet {
        proto,
        payload: vec![0; 1400],
        ..Ipv4Packet::tcp(src, src_port, CLIENT, dst_port)
    };
    p.build()[14..14 + 28].to_vec()
}

/// ICMP `icmp_type`/`code` from ROUTER to the VIP with next-hop MTU 1400,
/// embedding `embedded`; the ICMP checksum valid.
fn icmp_error(icmp_type: u8, code: u8, embedded: &[u8]) -> Vec<u8> {
    let base = Ipv4Packet {
        dst_mac: LB_SIDE_MAC,
        src_mac: CLIENT_MAC,
        ..Ipv4Packet::tcp(ROUTER, 0, VIP, 0)
    };
    icmp4(base, icmp_type, code, [0, 0, 0x05, 0x78], embedded)
}

/// Which backend a frame lb sent goes to, and that the packet it carries
/// (after the outer header, if any) is `sent` unchanged.
fn delivered_to(mode: u8, out: &[u8], sent: &[u8]) -> u32 {
    let id = backend_of_mac(&out[0..6]).expect("sent to a backend's MAC");
    assert_eq!(&out[0..6], &backend_mac(id));
    assert_eq!(&out[6..12], &LB_MAC);
    let overhead = match mode {
        FORWARD_IPIP => 20,
        FORWARD_GUE => 28,
        _ => 0,
    };
    if overhead != 0 {
        // The outer IPv4 header goes to the backend's address.
        assert_eq!(&out[14 + 16..14 + 20], &backend_addr(id).octets());
    }
    assert_eq!(&out[12..14], &sent[12..14], "EtherType");
    assert_eq!(
        &out[14 + overhead..],
        &sent[14..],
        "the packet itself unchanged"
    );
    id
}

#[test]
fn a_frag_needed_about_a_flow_goes_to_the_backend_that_sent_the_packet() {
    for mode in [FORWARD_DSR_L2, FORWARD_IPIP, FORWARD_GUE] {
        let mut f = Fixture::new();
        f.add_vip_forwarding(0, (VIP, 80, IPPROTO_TCP), &[(1, 1), (2, 1), (3, 1)], mode);
        // 60 connections: their backends, as lb chose them.
        let mut owner = BTreeMap::new();
        for port in 40_000..40_060u16 {
            let syn = Ipv4Packet {
                tcp_flags: TCP_SYN,
                ..Ipv4Packet::tcp(CLIENT, port, VIP, 80)
            }
            .build();
            let r = f.run(&syn);
            assert_eq!(r.action, XDP_TX);
            owner.insert(port, backend_of_mac(&r.frame[0..6]).unwrap());
        }
        assert!(owner.values().any(|&b| b != 1), "some flows on 2 or 3");
        // The ring now names backend 1 only: an error about a tracked flow
        // must follow its conntrack entry, not the ring.
        f.write_ring(0, &[(1, 1)]);
        for (&port, &id) in &owner {
            let frame = icmp_error(3, 4, &backend_packet(VIP, 80, port, IPPROTO_TCP));
            let before = f.reasons();
            let r = f.run(&frame);
            assert_eq!(r.action, XDP_TX, "mode {mode} port {port}");
            assert_eq!(
                delivered_to(mode, &r.frame, &frame),
                id,
                "mode {mode} port {port}"
            );
            assert_eq!(
                moved(&before, &f.reasons()),
                BTreeMap::from([("fwd_icmp_error", 1)])
            );
        }
        // A flow lb never saw: the ring's choice (backend 1).
        let frame = icmp_error(3, 4, &backend_packet(VIP, 80, 50_000, IPPROTO_TCP));
        let r = f.run(&frame);
        assert_eq!(r.action, XDP_TX);
        assert_eq!(delivered_to(mode, &r.frame, &frame), 1);
    }
}

#[test]
fn a_frag_needed_for_an_untracked_flow_follows_the_ring_like_its_packets() {
    let mut f = Fixture::new();
    f.add_vip(0, (VIP, 53, IPPROTO_UDP), &[(1, 1), (2, 1), (3, 1)]);
    let mut seen = std::collections::BTreeSet::new();
    for port in 41_000..41_060u16 {
        // The error first (nothing tracked), then the flow's own packet:
        // the same backend.
        let frame = icmp_error(3, 4, &backend_packet(VIP, 53, port, IPPROTO_UDP));
        let r = f.run(&frame);
        assert_eq!(r.action, XDP_TX);
        let by_error = delivered_to(FORWARD_DSR_L2, &r.frame, &frame);
        let r = f.run(&Ipv4Packet::udp(CLIENT, port, VIP, 53).build());
        assert_eq!(
            backend_of_mac(&r.frame[0..6]),
            Some(by_error),
            "port {port}"
        );
        seen.insert(by_error);
    }
    assert_eq!(seen.len(), 3, "the errors spread like the flows");
}

#[test]
fn icmp_errors_lb_cannot_place_pass_untouched() {
    let mut f = Fixture::new();
    f.add_vip(0, (VIP, 80, IPPROTO_TCP), &[(1, 1), (2, 1), (3, 1)]);
    let about_vip = backend_packet(VIP, 80, 40_000, IPPROTO_TCP);
    let mut not_ip4 = about_vip.clone();
    not_ip4[0] = 0x65;
    let cases = [
        ("time exceeded", icmp_error(11, 0, &about_vip)),
        ("port unreachable", icmp_error(3, 3, &about_vip)),
        (
            "about another address",
            icmp_error(3, 4, &backend_packet(OTHER, 80, 40_000, IPPROTO_TCP)),
        ),
        (
            "about a port that is no VIP",
            icmp_error(3, 4, &backend_packet(VIP, 81, 40_000, IPPROTO_TCP)),
        ),
        (
            "about UDP where the VIP is TCP",
            icmp_error(3, 4, &backend_packet(VIP, 80, 40_000, IPPROTO_UDP)),
        ),
        (
            "about ICMP",
            icmp_error(3, 4, &backend_packet(VIP, 80, 40_000, IPPROTO_ICMP)),
        ),
        (
            "embedding 4 bytes of payload",
            icmp_error(3, 4, &about_vip[..24]),
        ),
        ("embedding no IPv4 header", icmp_error(3, 4, &not_ip4)),
    ];
    for (what, frame) in cases {
        let before = f.reasons();
        let r = f.run(&frame);
        assert_eq!(r.action, XDP_PASS, "{what}");
        assert_eq!(r.frame, frame, "{what}: untouched");
        assert_eq!(
            moved(&before, &f.reasons()),
            BTreeMap::from([("pass_not_vip", 1)]),
            "{what}"
        );
    }
}

#[test]
fn every_truncation_of_a_frag_needed_is_handled_never_aborted() {
    for mode in [FORWARD_DSR_L2, FORWARD_GUE] {
        let mut f = Fixture::new();
        f.add_vip_forwarding(0, (VIP, 80, IPPROTO_TCP), &[(1, 1), (2, 1), (3, 1)], mode);
        let whole = icmp_error(3, 4, &backend_packet(VIP, 80, 40_000, IPPROTO_TCP));
        for cut in 14..whole.len() {
            let frame = &whole[..cut];
            let r = f.run(frame);
            assert_ne!(r.action, XDP_ABORTED, "cut {cut}");
            assert_ne!(
                r.action, XDP_TX,
                "cut {cut}: a truncated error is not forwarded"
            );
            if r.action == XDP_PASS {
                assert_eq!(r.frame, frame, "cut {cut}");
            }
        }
        // With the total length shortened to match each cut (a short but
        // well-formed error): forwarded only when the embedded ports fit.
        let embedded_end = whole.len();
        for end in 14 + 28..=embedded_end {
            let mut frame = whole[..end].to_vec();
            let tot_len = (end - 14) as u16;
            frame[16..18].copy_from_slice(&tot_len.to_be_bytes());
            frame[24..26].copy_from_slice(&[0, 0]);
            let sum = checksum(&frame[14..34]);
            frame[24..26].copy_from_slice(&sum.to_be_bytes());
            let r = f.run(&frame);
            assert_ne!(r.action, XDP_ABORTED, "end {end}");
            let complete = end == embedded_end;
            assert_eq!(r.action == XDP_TX, complete, "mode {mode} end {end}");
        }
    }
}
