//! lb-decap's per-packet cost, measured in the kernel section next to the
//! floor. Stripping a tunnel header changes the frame, so each iteration
//! goes through `lb_restore` (see restore.rs): the cost is what lb_decap
//! would cost if `repeat` could run it.

use std::net::Ipv4Addr;

use crate::report::{Better, Row, Stats, Target, TargetOn, fmt_num};
use crate::restore::{Kind, costs};
use anyhow::{Result, ensure};
use lb::decap::{Cidr, DecapProgram, Settings};
use lb_common::decap::DEFAULT_GUE_PORT;
use lb_tests::{
    fixture::{XDP_PASS, XDP_TX},
    packet::{Encap, Ipv4Packet, TCP_ACK, tunnel_frame},
    testprogs::TestProgs,
};

const LB: Ipv4Addr = Ipv4Addr::new(198, 18, 1, 10);
const BACKEND: Ipv4Addr = Ipv4Addr::new(198, 18, 3, 2);
/// The target, as a ratio to the floor.
const TARGET: f64 = 2.0;

/// The decap program with an allow-list holding the bench's LB source,
/// and the two tunnel frames it strips.
pub struct DecapBench {
    prog: DecapProgram,
    ipip: Vec<u8>,
    gue: Vec<u8>,
    /// The inner packet as a plain frame with 10 bytes of data (lb_restore
    /// rewrites 64 bytes), for the floor timed the same way.
    plain: Vec<u8>,
}

/// One run's costs (ns per packet).
pub struct DecapRun {
    pub ipip: f64,
    pub gue: f64,
    /// lb_floor through lb_restore: the like-for-like baseline (the
    /// harness's rewrite of the frame slows the reads that follow it
    /// alike for every program).
    pub floor: f64,
}

impl DecapBench {
    pub fn new() -> Result<Self> {
        let mut prog = DecapProgram::load_private()?;
        prog.maps.apply(&Settings {
            allow: vec![
                "198.18.1.0/24"
                    .parse::<Cidr>()
                    .map_err(anyhow::Error::msg)?,
            ],
            gue_port: DEFAULT_GUE_PORT,
        })?;
        // The inner packet: a mid-connection TCP segment, as most tunnelled
        // traffic is.
        let mut inner = Ipv4Packet::tcp(
            Ipv4Addr::new(198, 18, 5, 1),
            40000,
            Ipv4Addr::new(198, 19, 0, 1),
            80,
        );
        inner.tcp_flags = TCP_ACK;
        let mut with_data = inner.clone();
        with_data.payload = vec![0x5a; 10];
        let plain = with_data.build();
        let inner = inner.build()[14..].to_vec();
        let gue = Encap::Gue {
            src_port: 40000,
            port: DEFAULT_GUE_PORT,
        };
        Ok(Self {
            ipip: tunnel_frame(&inner, LB.into(), BACKEND.into(), Encap::Ipip, None),
            gue: tunnel_frame(&inner, LB.into(), BACKEND.into(), gue, None),
            prog,
            plain,
        })
    }

    fn decapsulated(&self) -> Result<(u64, u64)> {
        let c = self.prog.maps.counters()?;
        let get = |name: &str| {
            c.iter()
                .find(|(r, _)| r.name() == name)
                .map_or(0, |(_, n)| *n)
        };
        Ok((get("decap_ipip"), get("decap_gue")))
    }

    /// `repeat` packets of each kind through `lb_restore`; checks every
    /// action and that the decap counters moved by exactly `repeat` each
    /// (every iteration stripped a header).
    pub fn run(&self, progs: &mut TestProgs, repeat: u32) -> Result<DecapRun> {
        let before = self.decapsulated()?;
        let prog = self.prog.program();
        let kinds = [
            Kind::new(prog, &self.ipip, XDP_PASS, "lb_decap IPIP")?,
            Kind::new(prog, &self.gue, XDP_PASS, "lb_decap GUE")?,
            Kind::new(progs.floor(), &self.plain, XDP_TX, "lb_floor")?,
        ];
        let ns = costs(progs, &kinds, repeat)?;
        let after = self.decapsulated()?;
        let moved = (after.0 - before.0, after.1 - before.1);
        let want = u64::from(repeat);
        ensure!(
            moved == (want, want),
            "lb_decap: decap_ipip and decap_gue moved by {moved:?}, want {repeat} each"
        );
        Ok(DecapRun {
            ipip: ns[0],
            gue: ns[1],
            floor: ns[2],
        })
    }
}

/// `runs` runs of lb_decap and the floor (repeat `repeat`), printed as
/// medians and ratios: `lb-bench --only decap`.
pub fn print_quick(runs: usize, repeat: u32) -> Result<()> {
    let bench = DecapBench::new()?;
    let mut progs = TestProgs::load()?;
    bench.run(&mut progs, repeat)?;
    let (mut ipip, mut gue, mut floor) = (Vec::new(), Vec::new(), Vec::new());
    for _ in 0..runs {
        let r = bench.run(&mut progs, repeat)?;
        ipip.push(r.ipip);
        gue.push(r.gue);
        floor.push(r.floor);
    }
    let f = Stats::of(&floor).median;
    for (name, v) in [("lb_decap IPIP", &ipip), ("lb_decap GUE", &gue)] {
        let m = Stats::of(v).median;
        println!(
            "{name}: {} ns/packet, {:.2}× floor ({} ns)",
            fmt_num(m),
            m / f,
            fmt_num(f)
        );
    }
    Ok(())
}

/// The kernel section's rows: IPIP and GUE against the floor timed the
/// same way (`floor`, through lb_restore).
pub fn rows(ipip: &[f64], gue: &[f64], floor: &[f64], repeat: u32) -> Vec<Row> {
    let floor = Stats::of(floor);
    let target = Target {
        text: format!("≤ {TARGET}× floor"),
        limit: TARGET,
        on: TargetOn::Ratio,
        better: Better::Lower,
    };
    let row = |name: &str, v: &[f64]| {
        Row::new(name, "ns/packet", Stats::of(v))
            .ratio(&floor)
            .target(target.clone())
            .note(format!(
                "backends' lb_decap on a tunnel frame (inner TCP ACK) from an allowed source \
                 (one /24: the inline allow-list), repeat={repeat} through lb_restore: kernel-reported average − lb_restore → lb_return's + lb_return's; \
                 ratio to lb_floor timed the same way: {} ns",
                fmt_num(floor.median)
            ))
    };
    vec![
        row("lb_decap IPIP (4in4) strip", ipip),
        row("lb_decap GUE (4 over 4) strip", gue),
    ]
}
