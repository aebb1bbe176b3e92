//! What the tunnel forwarding modes add to a conntrack hit, measured in the
//! kernel section. An encapsulated frame is no longer a VIP packet, so
//! `repeat` cannot be used (the second repeat would see the outer header):
//! each packet is one BPF_PROG_TEST_RUN call on a fresh copy of an ACK of
//! an established flow, for a dsr-l2, an ipip and a gue VIP, and the cost
//! is the kernel-reported duration per call minus `lb_return`'s on the
//! same frames, interleaved chunk by chunk (the new-flow method). The
//! dsr-l2 hit measured this way is the like-for-like baseline: the
//! difference is what the outer header costs.

use std::net::Ipv4Addr;

use crate::report::{Better, Row, Stats, Target, TargetOn, fmt_num};
use crate::single::{Kind, interleaved};
use anyhow::{Result, ensure};
use aya::programs::Xdp;
use lb_common::{FORWARD_DSR_L2, FORWARD_GUE, FORWARD_IPIP, IPPROTO_TCP, program_names};
use lb_tests::{
    fixture::{Fixture, XDP_PASS, XDP_TX},
    packet::{Ipv4Packet, TCP_ACK},
};

/// The VIPs (indices 2 and 3 of the kernel section's fixture; 0 and 1 are
/// its own) and their backends.
const IPIP_VIP: Ipv4Addr = Ipv4Addr::new(198, 19, 0, 3);
const GUE_VIP: Ipv4Addr = Ipv4Addr::new(198, 19, 0, 4);
const CLIENT: Ipv4Addr = Ipv4Addr::new(198, 18, 0, 2);
const PORT: u16 = 80;
/// The target: what encapsulation adds to a hit, in ns.
const TARGET_NS: f64 = 25.0;

/// ACK frames of one established flow per mode.
pub struct EncapBench {
    frames: [Vec<u8>; 3],
}

/// One run's costs (ns per packet): kernel-reported − lb_return's.
pub struct EncapRun {
    pub dsr: f64,
    pub ipip: f64,
    pub gue: f64,
}

impl EncapBench {
    /// Adds an ipip VIP (index 2) and a gue VIP (index 3) to `f`, whose
    /// VIP 0 (`dsr_vip`) forwards at L2, and opens one flow to each.
    pub fn new(f: &mut Fixture, dsr_vip: Ipv4Addr) -> Result<Self> {
        let backends = |base: u32| [(base, 1), (base + 1, 1), (base + 2, 1)];
        f.add_vip_forwarding(
            2,
            (IPIP_VIP, PORT, IPPROTO_TCP),
            &backends(21),
            FORWARD_IPIP,
        );
        f.add_vip_forwarding(3, (GUE_VIP, PORT, IPPROTO_TCP), &backends(31), FORWARD_GUE);
        let mut frames = Vec::new();
        for (vip, mode) in [
            (dsr_vip, FORWARD_DSR_L2),
            (IPIP_VIP, FORWARD_IPIP),
            (GUE_VIP, FORWARD_GUE),
        ] {
            let syn = Ipv4Packet::tcp(CLIENT, 40100, vip, PORT);
            let r = f.run(&syn.build());
            ensure!(
                r.action == XDP_TX,
                "opening the mode {mode} flow: action {}",
                r.action
            );
            let mut ack = syn;
            ack.tcp_flags = TCP_ACK;
            frames.push(ack.build());
        }
        let frames: [Vec<u8>; 3] = frames.try_into().expect("three modes");
        Ok(Self { frames })
    }

    /// `calls` ACKs of each mode's flow and as many lb_return calls on
    /// each frame, interleaved by chunks in rotating order; checks every
    /// action and that each VIP counted exactly `calls` conntrack hits.
    pub fn run(&self, f: &Fixture, ret: &Xdp, calls: usize) -> Result<EncapRun> {
        let lb = f.dp.program(program_names::BALANCER);
        let hits = |f: &Fixture| -> Result<[u64; 3]> {
            Ok([
                f.dp.vip_stats(0)?.conntrack_hits,
                f.dp.vip_stats(2)?.conntrack_hits,
                f.dp.vip_stats(3)?.conntrack_hits,
            ])
        };
        let before = hits(f)?;
        let [dsr, ipip, gue] = &self.frames;
        let ns = interleaved(
            &[
                Kind::new(lb, dsr, XDP_TX, "lb_xdp dsr-l2"),
                Kind::new(lb, ipip, XDP_TX, "lb_xdp ipip"),
                Kind::new(lb, gue, XDP_TX, "lb_xdp gue"),
                Kind::new(ret, dsr, XDP_PASS, "lb_return"),
                Kind::new(ret, ipip, XDP_PASS, "lb_return"),
                Kind::new(ret, gue, XDP_PASS, "lb_return"),
            ],
            calls,
        )?;
        let after = hits(f)?;
        for i in 0..3 {
            ensure!(
                after[i] - before[i] == calls as u64,
                "mode {i}: {} conntrack hits, want {calls}",
                after[i] - before[i]
            );
        }
        let per = |i: usize| ns[i] as f64 / calls as f64;
        Ok(EncapRun {
            dsr: per(0) - per(3),
            ipip: per(1) - per(4),
            gue: per(2) - per(5),
        })
    }
}

/// The kernel section's rows: the ipip and gue hits against the floor,
/// and what each adds to the dsr-l2 hit measured the same way (target:
/// at most 25 ns).
pub fn rows(dsr: &[f64], ipip: &[f64], gue: &[f64], floor: &Stats, k: usize) -> Vec<Row> {
    let added = |v: &[f64]| -> Vec<f64> { v.iter().zip(dsr).map(|(e, d)| e - d).collect() };
    let how = format!(
        "{k} ACKs of an established flow per run, 1 call each: kernel-reported duration per \
         call − lb_return's on the same frames"
    );
    let hit = |name: &str, v: &[f64]| {
        Row::new(name, "ns/packet", Stats::of(v))
            .ratio(floor)
            .note(how.clone())
    };
    let add = |name: &str, v: &[f64]| {
        let d = Stats::of(dsr).median;
        Row::new(name, "ns/packet", Stats::of(&added(v)))
            .target(Target {
                text: format!("≤ {TARGET_NS} ns"),
                limit: TARGET_NS,
                on: TargetOn::Value,
                better: Better::Lower,
            })
            .note(format!(
                "per run: the hit above − the dsr-l2 hit measured the same way ({} ns median)",
                fmt_num(d)
            ))
    };
    vec![
        hit("lb_xdp dsr-l2 hit, 1 call per packet", dsr),
        hit("lb_xdp ipip hit, 1 call per packet", ipip),
        hit("lb_xdp gue hit, 1 call per packet", gue),
        add("ipip: added to a hit", ipip),
        add("gue: added to a hit", gue),
    ]
}
