//! What the tunnel forwarding modes add to a conntrack hit, measured in the
//! kernel section. An encapsulated frame is no longer a VIP packet, so each
//! iteration goes through `lb_restore` (see restore.rs), for ACKs of an
//! established flow to a dsr-l2, an ipip, a gue and a 4in6 IPv4 VIP and a
//! dsr-l2, a 6in6 and a gue IPv6 VIP. The dsr-l2 hit of the same family
//! measured this way is the like-for-like baseline: the difference is what
//! the outer header costs.

use std::net::{Ipv4Addr, Ipv6Addr};

use crate::report::{Better, Row, Stats, Target, TargetOn, fmt_num};
use crate::restore::{Kind, costs};
use anyhow::{Result, ensure};
use lb_common::{FORWARD_GUE, FORWARD_IPIP, IPPROTO_TCP, program_names};
use lb_tests::{
    fixture::{Fixture, XDP_TX},
    packet::{Ipv4Packet, Ipv6Packet, TCP_ACK},
    testprogs::TestProgs,
};

/// The VIPs (indices 2 and 3 of the kernel section's fixture; 0 and 1 are
/// its own, 4 is the IPv6 rows' dsr-l2 VIP, which serves here as the IPv6
/// baseline) and their backends; 5–7 carry the outer-IPv6 modes.
const IPIP_VIP: Ipv4Addr = Ipv4Addr::new(198, 19, 0, 3);
const GUE_VIP: Ipv4Addr = Ipv4Addr::new(198, 19, 0, 4);
const IPIP_4IN6_VIP: Ipv4Addr = Ipv4Addr::new(198, 19, 0, 5);
const IPIP6_VIP: Ipv6Addr = Ipv6Addr::new(0x2001, 2, 0, 0x10, 0, 0, 0, 6);
const GUE6_VIP: Ipv6Addr = Ipv6Addr::new(0x2001, 2, 0, 0x10, 0, 0, 0, 7);
const CLIENT: Ipv4Addr = Ipv4Addr::new(198, 18, 0, 2);
const CLIENT6: Ipv6Addr = Ipv6Addr::new(0x2001, 2, 0, 0, 0, 0, 0, 2);
const PORT: u16 = 80;
/// The target: what encapsulation adds to a hit, in ns.
const TARGET_NS: f64 = 25.0;

/// The modes timed, in the order of [`EncapRun::ns`]: (name, VIP index,
/// index of the dsr-l2 mode of the same family in this list).
const MODES: [(&str, u32, usize); 7] = [
    ("dsr-l2", 0, 0),
    ("ipip", 2, 0),
    ("gue", 3, 0),
    ("4in6", 5, 0),
    ("IPv6 dsr-l2", 4, 4),
    ("6in6", 6, 4),
    ("gue over IPv6", 7, 4),
];

/// ACK frames of one established flow per mode.
pub struct EncapBench {
    frames: Vec<Vec<u8>>,
}

/// One run's costs (ns per packet) per mode of [`MODES`].
pub struct EncapRun {
    pub ns: [f64; MODES.len()],
}

impl EncapBench {
    /// Adds an ipip VIP (index 2), a gue VIP (3), an ipip VIP with IPv6
    /// backends (5), and IPv6 ipip and gue VIPs (6, 7) to `f`, whose VIP 0
    /// (`dsr_vip`) forwards at L2 and VIP 4 (`dsr_vip6`) is an IPv6 dsr-l2
    /// VIP, and opens one flow to each.
    pub fn new(f: &mut Fixture, dsr_vip: Ipv4Addr, dsr_vip6: Ipv6Addr) -> Result<Self> {
        let backends = |base: u32| [(base, 1), (base + 1, 1), (base + 2, 1)];
        f.add_vip_forwarding(
            2,
            (IPIP_VIP, PORT, IPPROTO_TCP),
            &backends(21),
            FORWARD_IPIP,
        );
        f.add_vip_forwarding(3, (GUE_VIP, PORT, IPPROTO_TCP), &backends(31), FORWARD_GUE);
        f.add_vip_forwarding_v6_backends(
            5,
            (IPIP_4IN6_VIP, PORT, IPPROTO_TCP),
            &backends(51),
            FORWARD_IPIP,
        );
        f.add_vip6(
            6,
            (IPIP6_VIP, PORT, IPPROTO_TCP),
            &backends(54),
            FORWARD_IPIP,
        );
        f.add_vip6(7, (GUE6_VIP, PORT, IPPROTO_TCP), &backends(57), FORWARD_GUE);
        let mut frames = Vec::new();
        for vip in [dsr_vip, IPIP_VIP, GUE_VIP, IPIP_4IN6_VIP] {
            let syn = Ipv4Packet::tcp(CLIENT, 40100, vip, PORT);
            let mut ack = syn.clone();
            ack.tcp_flags = TCP_ACK;
            // lb_restore rewrites the first 64 bytes: a segment with a
            // little data is that long.
            ack.payload = vec![0x5a; 10];
            frames.push((syn.build(), ack.build()));
        }
        for vip in [dsr_vip6, IPIP6_VIP, GUE6_VIP] {
            let syn = Ipv6Packet::tcp(CLIENT6, 40100, vip, PORT);
            let mut ack = syn.clone();
            ack.tcp_flags = TCP_ACK;
            frames.push((syn.build(), ack.build()));
        }
        let mut acks = Vec::new();
        for ((syn, ack), (name, ..)) in frames.into_iter().zip(MODES) {
            let r = f.run(&syn);
            ensure!(
                r.action == XDP_TX,
                "opening the {name} flow: action {}",
                r.action
            );
            acks.push(ack);
        }
        Ok(Self { frames: acks })
    }

    /// `repeat` ACKs of each mode's flow through `lb_restore`; checks
    /// every action and that each VIP counted exactly `repeat` conntrack
    /// hits.
    pub fn run(&self, f: &Fixture, progs: &mut TestProgs, repeat: u32) -> Result<EncapRun> {
        let lb = f.dp.program(program_names::BALANCER);
        let hits = |f: &Fixture| -> Result<Vec<u64>> {
            MODES
                .iter()
                .map(|&(_, index, _)| Ok(f.dp.vip_stats(index)?.conntrack_hits))
                .collect()
        };
        let before = hits(f)?;
        let kinds = self
            .frames
            .iter()
            .zip(MODES)
            .map(|(frame, (name, ..))| Kind::new(lb, frame, XDP_TX, name))
            .collect::<Result<Vec<_>>>()?;
        let ns = costs(progs, &kinds, repeat)?;
        let after = hits(f)?;
        for (i, (name, ..)) in MODES.iter().enumerate() {
            ensure!(
                after[i] - before[i] == u64::from(repeat),
                "{name}: {} conntrack hits, want {repeat}",
                after[i] - before[i]
            );
        }
        Ok(EncapRun {
            ns: std::array::from_fn(|i| ns[i]),
        })
    }
}

/// The kernel section's rows: each mode's hit against the floor, and what
/// each tunnel mode adds to the dsr-l2 hit of its VIP's family measured
/// the same way (target: at most 25 ns). `runs[r]` is run r's costs.
pub fn rows(runs: &[EncapRun], floor: &Stats, repeat: u32) -> Vec<Row> {
    let of = |i: usize| -> Vec<f64> { runs.iter().map(|r| r.ns[i]).collect() };
    let how = format!(
        "ACKs (IPv4: 10 bytes of data) of an established flow, repeat={repeat} through \
         lb_restore: kernel-reported average − lb_restore → lb_return's + lb_return's"
    );
    let mut hits = Vec::new();
    let mut added = Vec::new();
    for (i, &(name, _, base)) in MODES.iter().enumerate() {
        hits.push(
            Row::new(
                format!("lb_xdp {name} hit (restored frame)"),
                "ns/packet",
                Stats::of(&of(i)),
            )
            .ratio(floor)
            .note(how.clone()),
        );
        if i == base {
            continue;
        }
        let d: Vec<f64> = of(i).iter().zip(of(base)).map(|(e, d)| e - d).collect();
        let (base_name, ..) = MODES[base];
        added.push(
            Row::new(
                format!("{name}: added to a hit"),
                "ns/packet",
                Stats::of(&d),
            )
            .target(Target {
                text: format!("≤ {TARGET_NS} ns"),
                limit: TARGET_NS,
                on: TargetOn::Value,
                better: Better::Lower,
            })
            .note(format!(
                "per run: the hit above − the {base_name} hit measured the same way ({} \
                     ns median)",
                fmt_num(Stats::of(&of(base)).median)
            )),
        );
    }
    [hits, added].concat()
}
