//! The full-NAT rows of the kernel section: a NAT VIP (IPv4, backends on
//! port 8080, four SNAT addresses), timed against the floor of the same
//! run.
//!
//! - Forward hit (ACK segments of an established NAT flow) and return
//!   hit (the backend's reply to the SNAT address:port), both served
//!   from the NAT caches (nothing clears them during the run, as nothing
//!   clears FLOW_CACHE for the conntrack hit): each rewrites
//!   the addresses and ports, so `repeat` alone would hand the second
//!   iteration a translated frame; they are timed through `lb_restore`
//!   (see restore.rs), which puts the frame back every iteration.
//! - New flow: a SYN of a fresh 5-tuple per call (a new pair: ring,
//!   SNAT port search, two hash-map inserts), one BPF_PROG_TEST_RUN call
//!   each, minus `lb_return`'s on the same frames (as the conntrack new
//!   flow row).

use std::net::Ipv4Addr;

use anyhow::{Result, ensure};
use lb_common::{IPPROTO_TCP, nat::NatSnat, program_names};
use lb_tests::{
    fixture::{Fixture, INGRESS_IFINDEX, LB_MAC, XDP_PASS, XDP_TX},
    packet::{Ipv4Packet, TCP_ACK},
    testprogs::TestProgs,
};

use crate::{
    report::{Better, Row, Stats, Target, TargetOn},
    restore::{Kind, costs},
};

const VIP: Ipv4Addr = Ipv4Addr::new(198, 19, 0, 8);
const CLIENT: Ipv4Addr = Ipv4Addr::new(198, 18, 0, 2);
const PORT: u16 = 80;
const BACKEND_PORT: u16 = 8080;
/// The VIP's index (after the section's others, 0–7).
const INDEX: u32 = 8;
/// First address of the clients opening new NAT flows (198.18.2.0 + …).
const NEW_FLOW_CLIENTS: u32 = u32::from_be_bytes([198, 18, 2, 0]);
/// Target of the issue: each hit direction ≤ 4× the floor.
const NAT_HIT_TARGET: f64 = 4.0;
/// NAT pairs the section may create (the maps' size, see kernel.rs).
pub const NAT_ENTRIES: u32 = 1 << 17;

pub struct NatBench {
    forward: Vec<u8>,
    reply: Vec<u8>,
    next: u64,
}

/// Per run: forward hit, return hit, new flow (ns per packet).
pub struct NatRun {
    pub forward: f64,
    pub reply: f64,
    pub new_flow: f64,
}

impl NatBench {
    /// Adds the NAT VIP (backends 60–62; encap.rs has 21–59) to `f`, the NAT port range and
    /// SNAT addresses, and opens one flow.
    pub fn new(f: &mut Fixture) -> Result<Self> {
        f.add_nat_vip(
            INDEX,
            (VIP, PORT, IPPROTO_TCP),
            &[(60, 1), (61, 1), (62, 1)],
            BACKEND_PORT,
        );
        let mut rt = f.dp.runtime()?;
        rt.nat_port_min = 1024;
        rt.nat_port_max = 65535;
        f.dp.set_runtime(rt)?;
        let mut snat = NatSnat {
            count: 4,
            ..NatSnat::default()
        };
        for (i, a) in snat.addrs.iter_mut().enumerate() {
            a[0] = Ipv4Addr::new(198, 18, 0, 100 + i as u8).to_bits().to_be();
        }
        f.dp.set_nat_snat(INDEX, snat)?;
        let syn = Ipv4Packet::tcp(CLIENT, 40010, VIP, PORT).build();
        let t = f.run(&syn);
        ensure!(t.action == XDP_TX, "NAT priming: action {}", t.action);
        // Frames of at least lb_restore's 64 bytes.
        let mut p = Ipv4Packet::tcp(CLIENT, 40010, VIP, PORT);
        p.tcp_flags = TCP_ACK;
        p.payload = vec![0x5a; 16];
        let forward = p.build();
        let ip = &t.frame[14..];
        let addr = |o: usize| Ipv4Addr::new(ip[o], ip[o + 1], ip[o + 2], ip[o + 3]);
        let port = |o: usize| u16::from_be_bytes([ip[o], ip[o + 1]]);
        let mut r = Ipv4Packet::tcp(addr(16), port(22), addr(12), port(20));
        r.dst_mac = LB_MAC;
        r.src_mac = t.frame[0..6].try_into()?;
        r.tcp_flags = TCP_ACK;
        r.payload = vec![0xa5; 16];
        let reply = r.build();
        for (frame, what) in [(&forward, "forward"), (&reply, "return")] {
            let r = f.run(frame);
            ensure!(
                r.action == XDP_TX,
                "NAT {what} priming: action {}",
                r.action
            );
        }
        Ok(Self {
            forward,
            reply,
            next: 0,
        })
    }

    /// One run: both hits through `lb_restore` (`repeat` iterations each)
    /// and `new_flows` fresh SYNs, every count checked in VIP_STATS.
    pub fn run(
        &mut self,
        f: &Fixture,
        progs: &mut TestProgs,
        repeat: u32,
        new_flows: usize,
    ) -> Result<NatRun> {
        let lb = f.dp.program(program_names::BALANCER);
        let before = f.dp.vip_stats(INDEX)?;
        let c = costs(
            progs,
            &[
                Kind::new(lb, &self.forward, XDP_TX, "NAT forward hit")?,
                Kind::new(lb, &self.reply, XDP_TX, "NAT return hit")?,
            ],
            repeat,
        )?;
        let after = f.dp.vip_stats(INDEX)?;
        let hits = after.conntrack_hits - before.conntrack_hits;
        let returns = after.return_packets - before.return_packets;
        ensure!(
            hits == u64::from(repeat)
                && returns == u64::from(repeat)
                && after.new_flows == before.new_flows,
            "NAT hits: {hits} forward hits and {returns} returns, want {repeat} each, no new flow"
        );
        let new_flow = self.new_flows(f, progs, new_flows)?;
        Ok(NatRun {
            forward: c[0],
            reply: c[1],
            new_flow,
        })
    }

    /// `k` SYNs of fresh 5-tuples, one call each, and the same frames
    /// through `lb_return`, in chunks of 100 alternating: kernel-reported
    /// ns per call, lb_xdp − lb_return.
    fn new_flows(&mut self, f: &Fixture, progs: &TestProgs, k: usize) -> Result<f64> {
        let lb = f.dp.program(program_names::BALANCER);
        let frames: Vec<Vec<u8>> = (self.next..self.next + k as u64)
            .map(|g| {
                let src = Ipv4Addr::from_bits(NEW_FLOW_CLIENTS + (g % 251) as u32);
                let port = 1024 + ((g / 251) % 60000) as u16;
                Ipv4Packet::tcp(src, port, VIP, PORT).build()
            })
            .collect();
        self.next += k as u64;
        let before = f.dp.vip_stats(INDEX)?;
        let mut out = vec![0u8; frames[0].len() + 256];
        let (mut lb_ns, mut ret_ns) = (0u128, 0u128);
        for chunk in frames.chunks(100) {
            for frame in chunk {
                lb_ns += one(lb, frame, &mut out, XDP_TX)?;
            }
            for frame in chunk {
                ret_ns += one(progs.return_only(), frame, &mut out, XDP_PASS)?;
            }
        }
        let after = f.dp.vip_stats(INDEX)?;
        ensure!(
            after.new_flows - before.new_flows == k as u64,
            "NAT new flows: {} counted, want {k}",
            after.new_flows - before.new_flows
        );
        Ok((lb_ns as f64 - ret_ns as f64) / k as f64)
    }
}

/// One call's kernel-reported duration (ns), checking the action.
pub(crate) fn one(
    prog: &aya::programs::Xdp,
    frame: &[u8],
    out: &mut [u8],
    want: u32,
) -> Result<u128> {
    use aya::programs::{TestRun, TestRunOptions};
    let mut ctx = [0u8; 24];
    for (i, v) in [0, frame.len() as u32, 0, INGRESS_IFINDEX, 0, 0]
        .into_iter()
        .enumerate()
    {
        ctx[i * 4..i * 4 + 4].copy_from_slice(&v.to_ne_bytes());
    }
    let r = prog.test_run(TestRunOptions {
        data_in: Some(frame),
        data_out: Some(out),
        ctx_in: Some(&ctx),
        ..TestRunOptions::new()
    })?;
    ensure!(
        r.return_value == want,
        "action {} instead of {want}",
        r.return_value
    );
    Ok(r.duration.as_nanos())
}

/// The NAT rows against the floor.
pub fn rows(runs: &[NatRun], floor: &Stats, repeat: u32, new_flows: usize) -> Vec<Row> {
    let col = |f: fn(&NatRun) -> f64| Stats::of(&runs.iter().map(f).collect::<Vec<_>>());
    let target = || Target {
        text: format!("≤ {NAT_HIT_TARGET}× floor"),
        limit: NAT_HIT_TARGET,
        on: TargetOn::Ratio,
        better: Better::Lower,
    };
    vec![
        Row::new("lb_xdp NAT forward hit", "ns/packet", col(|r| r.forward))
            .ratio(floor)
            .target(target())
            .note(format!(
                "repeat={repeat} through lb_restore, ACK segments of an established NAT flow \
                 (addresses, ports, checksums rewritten), served from NAT_FWD_CACHE as the \
                 conntrack hit is from FLOW_CACHE (the agent's per-tick clear not running)"
            )),
        Row::new("lb_xdp NAT return hit", "ns/packet", col(|r| r.reply))
            .ratio(floor)
            .target(target())
            .note(format!(
                "repeat={repeat} through lb_restore, the backend's ACKs to the SNAT \
                 address:port, translated back to VIP → client, served from NAT_REV_CACHE"
            )),
        Row::new("lb_xdp NAT new flow", "ns/packet", col(|r| r.new_flow))
            .ratio(floor)
            .note(format!(
                "{new_flows} SYNs of fresh 5-tuples, 1 call each: kernel-reported duration per \
                 call − lb_return's on the same frames (ring, SNAT port search, NAT_REV and \
                 NAT_FWD inserts)"
            )),
    ]
}
