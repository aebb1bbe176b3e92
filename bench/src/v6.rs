//! The IPv6 rows of the kernel section: an IPv6 conntrack hit (a dsr-l2
//! VIP on 2001:2::/48, ACK segments of one established flow, timed with
//! `repeat` like the IPv4 hit), against the IPv4 hit of the same run.

use std::net::Ipv6Addr;

use anyhow::{Result, ensure};
use aya::programs::Xdp;
use lb_common::{FORWARD_DSR_L2, IPPROTO_TCP};
use lb_tests::{
    fixture::{Fixture, XDP_TX},
    packet::{Ipv6Packet, TCP_ACK},
};

use crate::report::{Better, Row, Stats, Target, TargetOn};

pub(crate) const VIP6: Ipv6Addr = Ipv6Addr::new(0x2001, 2, 0, 0x10, 0, 0, 0, 1);
const CLIENT6: Ipv6Addr = Ipv6Addr::new(0x2001, 2, 0, 0, 0, 0, 0, 2);
const PORT: u16 = 80;
/// The VIP's index (after the IPv4 ones of the section).
const INDEX: u32 = 4;
/// Target: an IPv6 hit costs at most this many IPv4 hits.
const V6_HIT_TARGET: f64 = 1.3;

pub struct V6Bench {
    established: Vec<u8>,
    out: Vec<u8>,
}

impl V6Bench {
    /// Adds the IPv6 VIP (backends 41–43) to `f` and opens one flow.
    pub fn new(f: &mut Fixture) -> Result<Self> {
        f.add_vip6(
            INDEX,
            (VIP6, PORT, IPPROTO_TCP),
            &[(41, 1), (42, 1), (43, 1)],
            FORWARD_DSR_L2,
        );
        let syn = Ipv6Packet::tcp(CLIENT6, 40002, VIP6, PORT).build();
        let r = f.run(&syn);
        ensure!(r.action == XDP_TX, "IPv6 priming: action {}", r.action);
        let mut p = Ipv6Packet::tcp(CLIENT6, 40002, VIP6, PORT);
        p.tcp_flags = TCP_ACK;
        let established = p.build();
        let out = vec![0u8; established.len() + 256];
        Ok(Self { established, out })
    }

    /// One measurement: ns per packet (kernel-reported, `repeat` calls),
    /// checking that every repeat was a conntrack hit.
    pub fn hit(&mut self, f: &Fixture, lb: &Xdp, repeat: u32) -> Result<f64> {
        let before = f.dp.vip_stats(INDEX)?;
        let (k, _) =
            crate::kernel::repeated(lb, &self.established, &mut self.out, repeat, XDP_TX, "hit6")?;
        let after = f.dp.vip_stats(INDEX)?;
        let hits = after.conntrack_hits - before.conntrack_hits;
        ensure!(
            hits == u64::from(repeat) && after.new_flows == before.new_flows,
            "IPv6 conntrack hit: {hits} hits, want {repeat}"
        );
        Ok(k)
    }
}

/// The IPv6 hit against the floor, and its ratio to the IPv4 hit of the
/// same runs (median of per-run ratios) with the target.
pub fn rows(v6_hit: &[f64], v4_hit: &[f64], floor: &Stats, repeat: u32) -> Vec<Row> {
    let ratios: Vec<f64> = v6_hit.iter().zip(v4_hit).map(|(a, b)| a / b).collect();
    vec![
        Row::new("lb_xdp IPv6 conntrack hit", "ns/packet", Stats::of(v6_hit))
            .ratio(floor)
            .note(format!(
                "repeat={repeat}, ACK segments of an established IPv6 flow (dsr-l2), \
                 kernel-reported average"
            )),
        Row::new("IPv6 hit / IPv4 hit", "×", Stats::of(&ratios))
            .target(Target {
                text: format!("≤ {V6_HIT_TARGET}× the IPv4 hit"),
                limit: V6_HIT_TARGET,
                on: TargetOn::Value,
                better: Better::Lower,
            })
            .note("per run: the two hits timed back to back"),
    ]
}
