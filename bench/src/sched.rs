//! The scheduler rows of the kernel section: the cost of a new flow under
//! each scheduler, next to Maglev's measured the same way in the same
//! run. A fixture of its own (one VIP per scheduler, its own conntrack),
//! so the section's other VIPs and tables are untouched.
//!
//! Each kind gets `k` SYNs of fresh 5-tuples, one BPF_PROG_TEST_RUN call
//! each, minus `lb_return`'s on the same frames (as the conntrack new-flow
//! row), the kinds interleaved chunk by chunk so that none always runs on
//! caches another warmed.

use std::net::Ipv4Addr;

use anyhow::{Result, ensure};
use lb::{datapath::MapSizes, sched::Scheduler};
use lb_common::{IPPROTO_TCP, program_names};
use lb_tests::{
    fixture::{Fixture, XDP_PASS, XDP_TX},
    packet::Ipv4Packet,
    testprogs::TestProgs,
};

use crate::{
    nat::one,
    report::{Row, Stats},
};

const PORT: u16 = 80;
/// First address of the clients opening new flows (198.18.3.0 + …).
const NEW_FLOW_CLIENTS: u32 = u32::from_be_bytes([198, 18, 3, 0]);

/// The kinds timed: (row name, scheduler, backends).
const KINDS: [(&str, Scheduler, u32); 5] = [
    ("maglev", Scheduler::Maglev, 3),
    ("round_robin", Scheduler::RoundRobin, 3),
    ("weighted_round_robin", Scheduler::WeightedRoundRobin, 3),
    ("least_connections", Scheduler::LeastConnections, 3),
    (
        "least_connections, 64 backends",
        Scheduler::LeastConnections,
        64,
    ),
];

pub struct SchedBench {
    f: Fixture,
    next: u64,
}

/// Per run: ns per new flow of each kind, in [`KINDS`] order.
pub struct SchedRun {
    pub ns: [f64; KINDS.len()],
}

fn vip(index: u32) -> Ipv4Addr {
    Ipv4Addr::new(198, 19, 1, 1 + index as u8)
}

impl SchedBench {
    /// A fixture for `flows` new flows in all: one VIP per kind
    /// (weights 1, 2, 3, … for the weighted ones).
    pub fn new(flows: usize) -> Result<Self> {
        let conntrack = u32::try_from(2 * flows + 1024)?.next_power_of_two();
        let mut f = Fixture::with_sizes(MapSizes {
            max_vips: KINDS.len() as u32,
            max_backends: 128,
            ring_size: lb_common::DEFAULT_RING_SIZE,
            conntrack_entries: conntrack,
            conntrack6_entries: 1024,
            nat_entries: 1024,
            acl_entries: 1024,
        });
        let mut id = 1;
        for (index, &(_, s, n)) in KINDS.iter().enumerate() {
            let members: Vec<(u32, u32)> = (0..n).map(|i| (id + i, 1 + i % 3)).collect();
            id += n;
            let index = index as u32;
            f.add_vip(index, (vip(index), PORT, IPPROTO_TCP), &members);
            f.set_scheduler(index, s, &members);
        }
        Ok(Self { f, next: 0 })
    }

    /// `k` new flows of each kind.
    pub fn run(&mut self, progs: &TestProgs, k: usize) -> Result<SchedRun> {
        let lb = self.f.dp.program(program_names::BALANCER);
        let ret = progs.return_only();
        let frames: Vec<Vec<Vec<u8>>> = (0..KINDS.len() as u32)
            .map(|index| {
                (self.next..self.next + k as u64)
                    .map(|g| {
                        let src = Ipv4Addr::from_bits(NEW_FLOW_CLIENTS + (g % 251) as u32);
                        let port = 1024 + ((g / 251) % 60000) as u16;
                        Ipv4Packet::tcp(src, port, vip(index), PORT).build()
                    })
                    .collect()
            })
            .collect();
        self.next += k as u64;
        let before: Vec<u64> = (0..KINDS.len() as u32)
            .map(|i| Ok(self.f.dp.vip_stats(i)?.new_flows))
            .collect::<Result<_>>()?;
        let mut out = vec![0u8; frames[0][0].len() + 256];
        let mut lb_ns = [0u128; KINDS.len()];
        let mut ret_ns = [0u128; KINDS.len()];
        for c in 0..k.div_ceil(100) {
            for j in 0..KINDS.len() {
                let kind = (c + j) % KINDS.len();
                let chunk = &frames[kind][c * 100..((c + 1) * 100).min(k)];
                for frame in chunk {
                    lb_ns[kind] += one(lb, frame, &mut out, XDP_TX)?;
                }
                for frame in chunk {
                    ret_ns[kind] += one(ret, frame, &mut out, XDP_PASS)?;
                }
            }
        }
        for (i, b) in before.iter().enumerate() {
            let n = self.f.dp.vip_stats(i as u32)?.new_flows - b;
            ensure!(n == k as u64, "{}: {n} new flows, want {k}", KINDS[i].0);
        }
        let mut ns = [0.0; KINDS.len()];
        for i in 0..KINDS.len() {
            ns[i] = (lb_ns[i] as f64 - ret_ns[i] as f64) / k as f64;
        }
        Ok(SchedRun { ns })
    }
}

/// One row per kind, against the floor, each noting its ratio to the
/// Maglev new flow of the same runs.
pub fn rows(runs: &[SchedRun], floor: &Stats, k: usize) -> Vec<Row> {
    let col = |i: usize| Stats::of(&runs.iter().map(|r| r.ns[i]).collect::<Vec<_>>());
    let maglev = col(0);
    KINDS
        .iter()
        .enumerate()
        .map(|(i, &(name, _, n))| {
            let s = col(i);
            Row::new(format!("lb_xdp new flow, scheduler {name}"), "ns/packet", s)
                .ratio(floor)
                .note(format!(
                    "{k} SYNs of fresh 5-tuples per run to a VIP with {n} backends, 1 call each: \
                     kernel-reported duration − lb_return's; {:.2}× the maglev row's median",
                    s.median / maglev.median
                ))
        })
        .collect()
}
