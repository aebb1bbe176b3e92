//! What the tunnel forwarding modes add to a conntrack hit, measured in the
//! kernel section. An encapsulated frame is no longer a VIP packet, so each
//! iteration goes through `lb_restore` (see restore.rs), for ACKs of an
//! established flow to a dsr-l2, an ipip and a gue VIP. The dsr-l2 hit
//! measured this way is the like-for-like baseline: the difference is what
//! the outer header costs.

use std::net::Ipv4Addr;

use crate::report::{Better, Row, Stats, Target, TargetOn, fmt_num};
use crate::restore::{Kind, costs};
use anyhow::{Result, ensure};
use lb_common::{FORWARD_DSR_L2, FORWARD_GUE, FORWARD_IPIP, IPPROTO_TCP, program_names};
use lb_tests::{
    fixture::{Fixture, XDP_TX},
    packet::{Ipv4Packet, TCP_ACK},
    testprogs::{RESTORE_BYTES, TestProgs},
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

/// One run's costs (ns per packet).
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
            // lb_restore rewrites the first 64 bytes: a segment with a
            // little data is that long.
            ack.payload = vec![0x5a; RESTORE_BYTES - 54];
            frames.push(ack.build());
        }
        let frames: [Vec<u8>; 3] = frames.try_into().expect("three modes");
        Ok(Self { frames })
    }

    /// `repeat` ACKs of each mode's flow through `lb_restore`; checks
    /// every action and that each VIP counted exactly `repeat` conntrack
    /// hits.
    pub fn run(&self, f: &Fixture, progs: &mut TestProgs, repeat: u32) -> Result<EncapRun> {
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
        let ns = costs(
            progs,
            &[
                Kind::new(lb, dsr, XDP_TX, "lb_xdp dsr-l2"),
                Kind::new(lb, ipip, XDP_TX, "lb_xdp ipip"),
                Kind::new(lb, gue, XDP_TX, "lb_xdp gue"),
            ],
            repeat,
        )?;
        let after = hits(f)?;
        for i in 0..3 {
            ensure!(
                after[i] - before[i] == u64::from(repeat),
                "mode {i}: {} conntrack hits, want {repeat}",
                after[i] - before[i]
            );
        }
        Ok(EncapRun {
            dsr: ns[0],
            ipip: ns[1],
            gue: ns[2],
        })
    }
}

/// The kernel section's rows: the ipip and gue hits against the floor,
/// and what each adds to the dsr-l2 hit measured the same way (target:
/// at most 25 ns).
pub fn rows(dsr: &[f64], ipip: &[f64], gue: &[f64], floor: &Stats, repeat: u32) -> Vec<Row> {
    let added = |v: &[f64]| -> Vec<f64> { v.iter().zip(dsr).map(|(e, d)| e - d).collect() };
    let how = format!(
        "ACKs (10 bytes of data) of an established flow, repeat={repeat} through lb_restore: \
         kernel-reported average − lb_restore → lb_return's + lb_return's"
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
        hit("lb_xdp dsr-l2 hit (restored frame)", dsr),
        hit("lb_xdp ipip hit", ipip),
        hit("lb_xdp gue hit", gue),
        add("ipip: added to a hit", ipip),
        add("gue: added to a hit", gue),
    ]
}
