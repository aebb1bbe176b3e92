//! The source access control rows of the kernel section: what an ACL of
//! 10 000 prefixes, with the VIP's rate limits on (new connections per
//! source prefix and per VIP: what a hit pays for them is reading the
//! VIP's limits), adds to a packet, against the same packet to a VIP
//! without either, timed back to back in the same run.
//!
//! - Conntrack hit (ACK segments of an established flow, `repeat`): the
//!   VIP's ACL word is folded into the flow cache check, so a hit does no
//!   LPM lookup; what it adds is one array load (the word).
//! - Flow cache miss (FIN+ACK segments of an established flow,
//!   `repeat`: a FIN bypasses the flow cache and goes through conntrack,
//!   as a flow's first packet in a tick does): the ACL VIP's packet does
//!   the LPM lookup, the other one does not. The difference is the
//!   lookup's cost on every packet the cache does not answer.

use std::net::Ipv4Addr;

use anyhow::{Result, ensure};
use lb::acl::{AclState, Cidr, VipAcl, sync};
use lb_common::{IPPROTO_TCP, program_names, ratelimit::RateLimits};
use lb_tests::{
    fixture::{Fixture, XDP_TX},
    packet::{Ipv4Packet, TCP_ACK},
};

use crate::{
    kernel::repeated,
    report::{Better, Row, Stats, Target, TargetOn},
};

/// The ACL VIP and the VIP without an ACL (the section's conntrack-hit
/// VIP, index 0).
const ACL_VIP: Ipv4Addr = Ipv4Addr::new(198, 19, 0, 9);
const PLAIN_VIP: Ipv4Addr = Ipv4Addr::new(198, 19, 0, 1);
const CLIENT: Ipv4Addr = Ipv4Addr::new(198, 18, 0, 2);
const PORT: u16 = 80;
/// The ACL VIP's index (after the section's others, 0–8).
pub const INDEX: u32 = 9;
/// Prefixes in the ACL.
pub const PREFIXES: usize = 10_000;
/// Target of the issue: an ACL (with rate limits) adds ≤ 15 ns to a hit.
const HIT_ADDED_TARGET: f64 = 15.0;
const TCP_FIN: u8 = 0x01;

/// 10 000 prefixes of 198.18.0.0/15, /29 to /32, every other one allowed
/// (the client's, 198.18.0.0/29, is): a trie of realistic depth whose
/// lookups for the client end at a /29.
pub fn bench_acl() -> VipAcl {
    let mut acl = VipAcl::default();
    let base = u32::from(Ipv4Addr::new(198, 18, 0, 0));
    for i in 0..PREFIXES as u32 {
        let c = Cidr::new(Ipv4Addr::from(base + 8 * i).into(), 29 + (i % 4) as u8)
            .expect("aligned prefix");
        if i % 2 == 0 {
            acl.allow.push(c);
        } else {
            acl.deny.push(c);
        }
    }
    acl.allow.sort();
    acl.deny.sort();
    acl
}

pub struct AclBench {
    hit_acl: Vec<u8>,
    hit_plain: Vec<u8>,
    miss_acl: Vec<u8>,
    miss_plain: Vec<u8>,
}

/// Per run (ns per packet, kernel-reported): hits and misses, with and
/// without the ACL.
pub struct AclRun {
    pub hit_acl: f64,
    pub hit_plain: f64,
    pub miss_acl: f64,
    pub miss_plain: f64,
}

impl AclBench {
    /// Adds the ACL VIP (backends 63, 64) with its ACL to `f` and opens
    /// its flows and the plain VIP's.
    pub fn new(f: &mut Fixture) -> Result<Self> {
        f.add_vip(INDEX, (ACL_VIP, PORT, IPPROTO_TCP), &[(63, 1), (64, 1)]);
        let mut state = AclState::default();
        sync(&mut f.dp, &mut state, INDEX, &bench_acl())?;
        // Limits the benchmark's few new flows stay under (with the VIP
        // entry's flag, as the agent sets it: the fast path reads them).
        f.set_rate_limits(
            INDEX,
            RateLimits {
                src_new_rate: 1000,
                src_new_burst: 100,
                vip_new_rate: 100_000,
                vip_new_burst: 10_000,
                prefix_v4: 24,
                prefix_v6: 64,
                ..RateLimits::default()
            },
        );
        let seg = |vip, port, flags| {
            let mut p = Ipv4Packet::tcp(CLIENT, port, vip, PORT);
            p.tcp_flags = flags;
            p.build()
        };
        let b = Self {
            hit_acl: seg(ACL_VIP, 40020, TCP_ACK),
            hit_plain: seg(PLAIN_VIP, 40021, TCP_ACK),
            miss_acl: seg(ACL_VIP, 40022, TCP_ACK | TCP_FIN),
            miss_plain: seg(PLAIN_VIP, 40023, TCP_ACK | TCP_FIN),
        };
        for (vip, port) in [
            (ACL_VIP, 40020),
            (PLAIN_VIP, 40021),
            (ACL_VIP, 40022),
            (PLAIN_VIP, 40023),
        ] {
            let r = f.run(&Ipv4Packet::tcp(CLIENT, port, vip, PORT).build());
            ensure!(
                r.action == XDP_TX,
                "ACL priming {vip}:{port}: action {}",
                r.action
            );
        }
        Ok(b)
    }

    /// One run: the four kinds back to back, `repeat` each; checks that
    /// the ACL VIP's packets were all hits or tracked, none denied.
    pub fn run(&self, f: &Fixture, repeat: u32) -> Result<AclRun> {
        let lb = f.dp.program(program_names::BALANCER);
        let mut out = vec![0u8; self.hit_acl.len() + 256];
        let before = f.dp.vip_stats(INDEX)?;
        let (hit_acl, _) = repeated(lb, &self.hit_acl, &mut out, repeat, XDP_TX, "ACL hit")?;
        let (hit_plain, _) = repeated(lb, &self.hit_plain, &mut out, repeat, XDP_TX, "hit")?;
        let (miss_acl, _) = repeated(lb, &self.miss_acl, &mut out, repeat, XDP_TX, "ACL miss")?;
        let (miss_plain, _) = repeated(lb, &self.miss_plain, &mut out, repeat, XDP_TX, "miss")?;
        let after = f.dp.vip_stats(INDEX)?;
        ensure!(
            after.conntrack_hits - before.conntrack_hits == 2 * u64::from(repeat)
                && after.acl_denied == before.acl_denied,
            "ACL VIP: {} hits and {} denials, want {} and 0",
            after.conntrack_hits - before.conntrack_hits,
            after.acl_denied - before.acl_denied,
            2 * repeat
        );
        Ok(AclRun {
            hit_acl,
            hit_plain,
            miss_acl,
            miss_plain,
        })
    }
}

/// The ACL rows: the cost with the ACL and what it adds.
pub fn rows(runs: &[AclRun], floor: &Stats, repeat: u32) -> Vec<Row> {
    let col = |f: fn(&AclRun) -> f64| Stats::of(&runs.iter().map(f).collect::<Vec<_>>());
    vec![
        Row::new(
            format!("lb_xdp conntrack hit, ACL of {PREFIXES} prefixes + rate limits"),
            "ns/packet",
            col(|r| r.hit_acl),
        )
        .ratio(floor)
        .note(format!(
            "repeat={repeat}, ACK segments of an established flow to a VIP with an ACL \
             (flow cache hit: no LPM lookup, the ACL word is in the cache check)"
        )),
        Row::new(
            "ACL + rate limits added to a conntrack hit",
            "ns/packet",
            col(|r| r.hit_acl - r.hit_plain),
        )
        .target(Target {
            text: format!("≤ {HIT_ADDED_TARGET} ns"),
            limit: HIT_ADDED_TARGET,
            on: TargetOn::Value,
            better: Better::Lower,
        })
        .note(
            "per run: the hit above − the same hit to a VIP without ACL or limits, back to \
             back (limits: new connections per /24 and per VIP)",
        ),
        Row::new(
            format!("lb_xdp flow-cache miss (FIN), ACL of {PREFIXES} prefixes"),
            "ns/packet",
            col(|r| r.miss_acl),
        )
        .ratio(floor)
        .note(format!(
            "repeat={repeat}, FIN+ACK segments of an established flow: no flow cache, \
             conntrack lookup, and the LPM lookup in ACL4"
        )),
        Row::new(
            "ACL added to a flow-cache miss (LPM lookup)",
            "ns/packet",
            col(|r| r.miss_acl - r.miss_plain),
        )
        .note("per run: the miss above − the same miss to a VIP without ACL, back to back"),
    ]
}
