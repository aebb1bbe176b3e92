//! lb-decap's per-packet cost, measured in the kernel section next to the
//! floor. Stripping a tunnel header changes the frame, so `repeat` cannot
//! be used (the second repeat would see the inner packet): each packet is
//! one BPF_PROG_TEST_RUN call on a fresh copy of the tunnel frame, and the
//! cost is the kernel-reported duration per call minus `lb_return`'s on
//! the same frames, interleaved chunk by chunk (the new-flow method).

use std::net::Ipv4Addr;

use crate::report::{Better, Row, Stats, Target, TargetOn, fmt_num};
use crate::single::{Kind, interleaved};
use anyhow::{Result, ensure};
use aya::programs::Xdp;
use lb::decap::{Cidr, DecapProgram, Settings};
use lb_common::decap::DEFAULT_GUE_PORT;
use lb_tests::{
    fixture::{XDP_PASS, XDP_TX},
    packet::{Encap, Ipv4Packet, TCP_ACK, tunnel_frame},
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
    /// The inner packet as a plain frame (for the floor).
    plain: Vec<u8>,
}

/// One run's costs (ns per packet): kernel-reported − lb_return's.
pub struct DecapRun {
    pub ipip: f64,
    pub gue: f64,
    /// The floor program measured the same way (one call per packet), on
    /// the inner packet: the like-for-like baseline.
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
        let plain = inner.build();
        let inner = plain[14..].to_vec();
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

    /// `calls` packets of each kind (IPIP, GUE, lb_return on each frame),
    /// interleaved by chunks in rotating order; checks every action and
    /// that the decap counters moved by exactly `calls` each.
    pub fn run(&self, ret: &Xdp, floor: &Xdp, calls: usize) -> Result<DecapRun> {
        let before = self.decapsulated()?;
        let prog = self.prog.program();
        let ns = interleaved(
            &[
                Kind::new(prog, &self.ipip, XDP_PASS, "lb_decap IPIP"),
                Kind::new(prog, &self.gue, XDP_PASS, "lb_decap GUE"),
                Kind::new(ret, &self.ipip, XDP_PASS, "lb_return"),
                Kind::new(ret, &self.gue, XDP_PASS, "lb_return"),
                Kind::new(floor, &self.plain, XDP_TX, "lb_floor"),
                Kind::new(ret, &self.plain, XDP_PASS, "lb_return"),
            ],
            calls,
        )?;
        let after = self.decapsulated()?;
        let moved = (after.0 - before.0, after.1 - before.1);
        ensure!(
            moved == (calls as u64, calls as u64),
            "lb_decap: decap_ipip and decap_gue moved by {moved:?}, want {calls} each"
        );
        let per = |i: usize| ns[i] as f64 / calls as f64;
        Ok(DecapRun {
            ipip: per(0) - per(2),
            gue: per(1) - per(3),
            floor: per(4) - per(5),
        })
    }
}

/// The kernel section's rows: IPIP and GUE against the floor (`floor`,
/// measured with `repeat`), with the like-for-like ratio to the floor
/// measured one call per packet (`single_floor`) in the notes.
pub fn rows(ipip: &[f64], gue: &[f64], single_floor: &[f64], floor: &Stats, k: usize) -> Vec<Row> {
    let single = Stats::of(single_floor).median;
    let target = Target {
        text: format!("≤ {TARGET}× floor"),
        limit: TARGET,
        on: TargetOn::Ratio,
        better: Better::Lower,
    };
    let row = |name: &str, v: &[f64]| {
        let st = Stats::of(v);
        Row::new(name, "ns/packet", st)
            .ratio(floor)
            .target(target.clone())
            .note(format!(
                "backends' lb_decap, {k} tunnel frames (inner TCP ACK) per run, 1 call each: \
                 kernel-reported duration per call − lb_return's on the same frames; lb_floor \
                 measured the same way: {} ns, {:.2}× that",
                fmt_num(single),
                st.median / single
            ))
    };
    vec![
        row("lb_decap IPIP (4in4) strip", ipip),
        row("lb_decap GUE (4 over 4) strip", gue),
    ]
}
