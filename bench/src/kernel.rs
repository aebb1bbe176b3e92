//! Per-packet cost in the kernel: the real programs with real maps, run by
//! BPF_PROG_TEST_RUN.
//!
//! - `repeat` runs the program again on the frame it already modified, so it
//!   is only used where the output is the same kind of packet: the floor
//!   (MACs swapped), a non-VIP frame (untouched) and an established flow
//!   (backend MACs, same 5-tuple: every repeat is a conntrack hit). The
//!   kernel reports the average duration per repeat (`duration` field of
//!   `bpf_attr.test`, total time / repeat, in whole ns; aya passes it on as
//!   `TestRunResult::duration`).
//! - A new flow needs a fresh 5-tuple every packet, so it is one call per
//!   frame (`repeat` = 1); its cost is the per-call time minus the per-call
//!   time of `lb_return` on the same frames, both measured in the same run,
//!   interleaved chunk by chunk.

use std::{
    net::Ipv4Addr,
    path::Path,
    time::{Duration, Instant},
};

use anyhow::{Context, Result, bail, ensure};
use aya::programs::{TestRun, TestRunOptions, TestRunResult, Xdp};
use lb::datapath::{MapSizes, backend_entry};
use lb_common::{FlowKey, IPPROTO_TCP, program_names};
use lb_tests::{
    fixture::{Fixture, INGRESS_IFINDEX, LB_MAC, XDP_DROP, XDP_PASS, XDP_TX, backend_mac},
    packet::{Ipv4Packet, TCP_ACK},
    testprogs::TestProgs,
};

use crate::{
    charts::{self, Bar, RefLine},
    report::{Better, Row, Section, Stats, Table, Target, TargetOn, fmt_num},
    restore::{Kind, costs},
};

const VIP: Ipv4Addr = Ipv4Addr::new(198, 19, 0, 1);
/// A VIP whose backends are all unusable: conntrack miss, ring lookup, drop.
const DEAD_VIP: Ipv4Addr = Ipv4Addr::new(198, 19, 0, 2);
const VIP_PORT: u16 = 80;
/// A destination that is not a VIP address.
const OTHER: Ipv4Addr = Ipv4Addr::new(198, 19, 0, 99);
const CLIENT: Ipv4Addr = Ipv4Addr::new(198, 18, 0, 2);
/// First address of the clients that open new flows (198.18.1.0 + 0..251).
const NEW_FLOW_CLIENTS: u32 = u32::from_be_bytes([198, 18, 1, 0]);
/// Calls of each kind per interleaved chunk in the new-flow measurement.
const CHUNK: usize = 100;

pub struct Config {
    pub runs: usize,
    /// `repeat` for the floor, pass-through and conntrack-hit runs.
    pub repeat: u32,
    /// Fresh flows (calls) per run for the new-flow measurement.
    pub new_flows: usize,
}

/// Targets of the issue, as ratios to the floor.
const HIT_TARGET: f64 = 3.0;
const NEW_FLOW_TARGET: f64 = 8.0;

/// `struct xdp_md` for ctx_in: data, data_end, data_meta, ingress_ifindex,
/// rx_queue_index, egress_ifindex (as the fixture passes it).
fn xdp_md(len: usize) -> [u8; 24] {
    let mut b = [0u8; 24];
    for (i, v) in [0, len as u32, 0, INGRESS_IFINDEX, 0, 0]
        .into_iter()
        .enumerate()
    {
        b[i * 4..i * 4 + 4].copy_from_slice(&v.to_ne_bytes());
    }
    b
}

/// One BPF_PROG_TEST_RUN call. All frames here have the same length, so
/// one ctx serves them all.
fn test_run(
    prog: &Xdp,
    frame: &[u8],
    ctx: &[u8; 24],
    out: &mut [u8],
    repeat: u32,
) -> Result<TestRunResult> {
    prog.test_run(TestRunOptions {
        data_in: Some(frame),
        data_out: Some(out),
        ctx_in: Some(ctx),
        repeat,
        ..TestRunOptions::new()
    })
    .context("BPF_PROG_TEST_RUN")
}

/// One `repeat` measurement, checking the action: (kernel-reported ns per
/// repeat, fixed cost of the call in ms = wall time − repeat × the kernel's
/// figure). The fixed cost is large: with repeat > 1 the kernel swaps the
/// XDP dispatcher before and after the loop, each time waiting for RCU.
pub(crate) fn repeated(
    prog: &Xdp,
    frame: &[u8],
    out: &mut [u8],
    repeat: u32,
    want: u32,
    what: &str,
) -> Result<(f64, f64)> {
    let ctx = xdp_md(frame.len());
    let t = Instant::now();
    let r = test_run(prog, frame, &ctx, out, repeat)?;
    let wall = t.elapsed();
    ensure!(
        r.return_value == want,
        "{what}: action {} instead of {want}",
        r.return_value
    );
    let kernel = r.duration.as_nanos() as f64;
    let fixed = wall.as_nanos() as f64 - kernel * f64::from(repeat);
    Ok((kernel, fixed / 1e6))
}

/// Time this thread has spent waiting for a CPU (ns): the second field of
/// /proc/thread-self/schedstat. Tells how much other load the machine had.
fn run_delay_ns() -> Option<u64> {
    std::fs::read_to_string("/proc/thread-self/schedstat")
        .ok()?
        .split_whitespace()
        .nth(1)?
        .parse()
        .ok()
}

/// The template of the new flows timed by `repeat` (see [`fresh_flows`]):
/// a SYN whose source `lb_restore` replaces every iteration (10 bytes of
/// payload: lb_restore rewrites the first 64).
fn fresh_template() -> Vec<u8> {
    let mut p = Ipv4Packet::tcp(CLIENT, 1024, VIP, VIP_PORT);
    p.payload = vec![0; 10];
    p.build()
}

/// The flow key of `lb_restore`'s fresh source `n` on [`fresh_template`]:
/// 198.18.(n >> 24).(n >> 16), source port `n as u16`.
fn fresh_key(n: u64) -> FlowKey {
    let src = (u32::from(CLIENT) & 0xffff_0000) | ((n >> 16) as u32 & 0xffff);
    FlowKey::new(src, n as u16, VIP.to_bits(), VIP_PORT, IPPROTO_TCP)
}

/// First fresh source of the recorded new flows timed by `repeat`
/// (198.18.128.0 on): clear of the clients and backends below 198.18.2.0
/// and of the guarded SYNs' sources.
const FRESH_RECORDED: u64 = 0x8000_0000;
/// First fresh source of the guarded SYNs timed by `repeat` (198.18.192.0
/// on).
const FRESH_GUARDED: u64 = 0xC000_0000;

/// Per-packet cost (ns) of `k` new flows' SYNs timed by `repeat` through
/// `lb_restore`, which gives every iteration a fresh source from `next`
/// on (see restore.rs): the caches as warm as in a receive loop, as for
/// the floor and the hit. Checks the VIP's counters (exactly `k` new
/// flows, or under the guard `k` unrecorded SYNs) and conntrack (the
/// first and last flows recorded, or under the guard neither).
fn fresh_flows(
    f: &Fixture,
    progs: &mut TestProgs,
    next: &mut u64,
    k: u32,
    guarded: bool,
) -> Result<f64> {
    let lb = f.dp.program(program_names::BALANCER);
    let template = fresh_template();
    let what = if guarded {
        "lb_xdp, SYNs under the guard"
    } else {
        "lb_xdp, new flows"
    };
    let kind = Kind::new(lb, &template, XDP_TX, what)?.fresh(*next);
    let before = counters(f)?;
    let ns = costs(progs, &[kind], k)?[0];
    let (new, hits, unrecorded) = counters(f)?.since(before);
    let (want_new, want_unrecorded) = if guarded { (0, k) } else { (k, 0) };
    ensure!(
        new == u64::from(want_new) && hits == 0 && unrecorded == u64::from(want_unrecorded),
        "{what}: VIP counters moved by {new} new flows, {hits} hits and {unrecorded} \
         unrecorded SYNs; want {want_new}, 0 and {want_unrecorded}"
    );
    for n in [*next, *next + u64::from(k) - 1] {
        ensure!(
            f.dp.conntrack_lookup(&fresh_key(n))?.is_some() != guarded,
            "{what}: fresh flow {n} is {} conntrack",
            if guarded { "in" } else { "not in" }
        );
    }
    *next += u64::from(k);
    Ok(ns)
}

fn new_flow_frame(g: u64) -> (Vec<u8>, FlowKey) {
    let src = Ipv4Addr::from_bits(NEW_FLOW_CLIENTS + (g % 251) as u32);
    let port = 1024 + ((g / 251) % 60000) as u16;
    // A connection's first packet: a SYN.
    let frame = Ipv4Packet::tcp(src, port, VIP, VIP_PORT).build();
    let key = FlowKey::new(src.to_bits(), port, VIP.to_bits(), VIP_PORT, IPPROTO_TCP);
    (frame, key)
}

fn unrecorded_syns(f: &Fixture) -> Result<u64> {
    Ok(f.dp
        .reason_stats()?
        .get(lb_common::Reason::FwdSynUnrecorded.name())
        .copied()
        .unwrap_or(0))
}

/// VIP 0's new flows and conntrack hits, and the unrecorded SYNs.
#[derive(Clone, Copy)]
struct Counters(u64, u64, u64);

impl Counters {
    /// (new flows, hits, unrecorded SYNs) since `before`.
    fn since(self, before: Counters) -> (u64, u64, u64) {
        (self.0 - before.0, self.1 - before.1, self.2 - before.2)
    }
}

fn counters(f: &Fixture) -> Result<Counters> {
    let s = f.dp.vip_stats(0)?;
    Ok(Counters(s.new_flows, s.conntrack_hits, unrecorded_syns(f)?))
}

/// Sets the SYN-flood guard word of RUNTIME (1: every SYN unrecorded, 0:
/// off), the rest as it is.
/// Through the pinned map: the fixture's own handle is borrowed by the
/// program being measured.
fn syn_guard(f: &Fixture, word: u32) -> Result<()> {
    let data = aya::maps::MapData::from_pin(f.dp.pin_dir().join(lb_common::map_names::RUNTIME))?;
    let mut map: aya::maps::Array<_, lb_common::Runtime> =
        aya::maps::Array::try_from(aya::maps::Map::Array(data))?;
    let rt = map.get(&0, 0)?;
    map.set(
        0,
        lb_common::Runtime {
            syn_guard: word,
            ..rt
        },
        0,
    )?;
    Ok(())
}

/// Per-call times (ns) of one new-flow run. Wall times are medians over
/// the chunks (a preemption inflates one chunk, not the figure); kernel
/// times are means over all calls.
#[derive(Default)]
struct NewFlowRun {
    /// Median over chunks of (new flow − return-only) per call.
    new_cost_wall: f64,
    /// Median over chunks of (hit − return-only) per call.
    hit_cost_wall: f64,
    lb_wall: f64,
    ret_wall: f64,
    lb_kernel: f64,
    ret_kernel: f64,
    hit_kernel: f64,
}

/// The three kinds of single calls of a new-flow run.
#[derive(Clone, Copy, PartialEq, Eq)]
enum Call {
    /// A fresh 5-tuple through lb_xdp.
    NewFlow,
    /// The same frame through lb_return.
    ReturnOnly,
    /// The established flow through lb_xdp (a conntrack hit, one call).
    Hit,
}

/// `k` fresh flows through the balancer, one call each; the same frames
/// through `lb_return`; and `k` single calls of the established flow
/// (`hit_frame`), interleaved by chunks in rotating order. Checks every
/// action and the VIP's counters (exactly `k` new flows and `k` hits).
fn new_flows(
    f: &Fixture,
    progs: &TestProgs,
    next: &mut u64,
    k: usize,
    hit_frame: &[u8],
    out: &mut [u8],
    guarded: bool,
) -> Result<NewFlowRun> {
    let lb = f.dp.program(program_names::BALANCER);
    let ret = progs.return_only();
    let frames: Vec<(Vec<u8>, FlowKey)> =
        (0..k as u64).map(|i| new_flow_frame(*next + i)).collect();
    *next += k as u64;
    let ctx = xdp_md(hit_frame.len());
    ensure!(
        frames.iter().all(|(fr, _)| fr.len() == hit_frame.len()),
        "new-flow frames differ in length"
    );
    let before = counters(f)?;
    let order = [Call::NewFlow, Call::ReturnOnly, Call::Hit];
    // Per chunk, per kind: wall ns per call.
    let mut chunk_walls: Vec<[f64; 3]> = Vec::with_capacity(k.div_ceil(CHUNK));
    let mut kernel = [0u64; 3];
    let mut bad = 0usize;
    for (c, chunk) in frames.chunks(CHUNK).enumerate() {
        let mut per_call = [0.0; 3];
        // Rotate the order, so no kind always runs on caches warmed by
        // another.
        for j in 0..3 {
            let which = (c + j) % 3;
            let (prog, want) = match order[which] {
                Call::NewFlow | Call::Hit => (lb, XDP_TX),
                Call::ReturnOnly => (ret, XDP_PASS),
            };
            let mut kern = 0u64;
            let t = Instant::now();
            for (frame, _) in chunk {
                let frame = if order[which] == Call::Hit {
                    hit_frame
                } else {
                    frame
                };
                let r = test_run(prog, frame, &ctx, out, 1)?;
                kern += r.duration.as_nanos() as u64;
                bad += usize::from(r.return_value != want);
            }
            per_call[which] = t.elapsed().as_nanos() as f64 / chunk.len() as f64;
            kernel[which] += kern;
        }
        chunk_walls.push(per_call);
    }
    ensure!(
        bad == 0,
        "new flows: {bad} calls returned an unexpected action"
    );
    let (new, hits, unrecorded) = counters(f)?.since(before);
    // Under the SYN-flood guard the SYNs are forwarded and counted as
    // unrecorded, not as new flows, and make no record.
    let (want_new, want_unrecorded) = if guarded { (0, k) } else { (k, 0) };
    ensure!(
        new == want_new as u64 && hits == k as u64 && unrecorded == want_unrecorded as u64,
        "new flows: VIP counters moved by {new} new flows and {hits} hits, {unrecorded} \
         unrecorded SYNs; want {want_new}, {k} and {want_unrecorded}"
    );
    // LRU eviction would distort the insert cost: the oldest flow of this
    // run must still be tracked (or, guarded, never was).
    ensure!(
        f.dp.conntrack_lookup(&frames[0].1)?.is_some() != guarded,
        "new flows: the first flow of the run is {} conntrack",
        if guarded {
            "in (recorded by the guard)"
        } else {
            "not in (evicted: map too small)"
        }
    );
    let n = k as f64;
    let median = |f: &dyn Fn(&[f64; 3]) -> f64| {
        Stats::of(&chunk_walls.iter().map(f).collect::<Vec<_>>()).median
    };
    let w = |i: usize| median(&|c| c[i]);
    let kn = |i: usize| kernel[i] as f64 / n;
    Ok(NewFlowRun {
        new_cost_wall: median(&|c| c[0] - c[1]),
        hit_cost_wall: median(&|c| c[2] - c[1]),
        lb_wall: w(0),
        ret_wall: w(1),
        lb_kernel: kn(0),
        ret_kernel: kn(1),
        hit_kernel: kn(2),
    })
}

#[derive(Default)]
struct Samples {
    floor: Vec<f64>,
    floor_fixed: Vec<f64>,
    pass: Vec<f64>,
    pass_fixed: Vec<f64>,
    hit: Vec<f64>,
    hit_fixed: Vec<f64>,
    hit6: Vec<f64>,
    dead: Vec<f64>,
    new_lb_wall: Vec<f64>,
    new_ret_wall: Vec<f64>,
    new_lb_kernel: Vec<f64>,
    new_ret_kernel: Vec<f64>,
    new_cost_wall: Vec<f64>,
    new_cost_kernel: Vec<f64>,
    /// New flows' SYNs under the SYN-flood guard (unrecorded), one call
    /// each.
    syn_guarded: Vec<f64>,
    /// New flows timed by `repeat` (a fresh source per iteration).
    fresh_new: Vec<f64>,
    /// SYNs under the guard timed by `repeat`.
    fresh_guarded: Vec<f64>,
    single_hit_wall: Vec<f64>,
    single_hit_kernel: Vec<f64>,
    decap_ipip: Vec<f64>,
    decap_gue: Vec<f64>,
    decap_floor: Vec<f64>,
    encap: Vec<crate::encap::EncapRun>,
    nat: Vec<crate::nat::NatRun>,
    acl: Vec<crate::acl::AclRun>,
    sched: Vec<crate::sched::SchedRun>,
}

pub fn run(cfg: &Config, out_dir: &Path) -> Result<Section> {
    ensure!(cfg.runs >= 5, "at least 5 runs");
    // Each run's new flows: half one call per packet, half timed by
    // `repeat` with a fresh source per iteration.
    let single_k = cfg.new_flows / 2;
    let fresh_k = u32::try_from(cfg.new_flows - single_k).context("too many new flows")?;
    let warm_flows = (single_k / 10).max(CHUNK);
    let fresh_warm = (fresh_k / 10).max(CHUNK as u32);
    let total_flows = cfg.new_flows * cfg.runs + warm_flows + fresh_warm as usize;
    // The agent's default conntrack size, so that quick and full runs insert
    // into the same table; at most 3/4 full, so the LRU never has to evict.
    let default = lb_common::DEFAULT_CONNTRACK_ENTRIES as usize;
    let conntrack_entries = if 4 * (total_flows + 1) <= 3 * default {
        default
    } else {
        2 * total_flows
    };
    let conntrack_entries = u32::try_from(conntrack_entries).context("too many flows")?;
    let sizes = MapSizes {
        max_vips: 10,
        max_backends: 64,
        ring_size: lb_common::DEFAULT_RING_SIZE,
        conntrack_entries,
        conntrack6_entries: conntrack_entries,
        nat_entries: crate::nat::NAT_ENTRIES,
        acl_entries: 32768,
    };
    let t = Instant::now();
    let mut f = Fixture::with_sizes(sizes);
    let mut progs = TestProgs::load()?;
    let decap = crate::decap::DecapBench::new()?;
    eprintln!(
        "lb-bench:   fixture loaded in {:.1} s (conntrack: {conntrack_entries} entries)",
        t.elapsed().as_secs_f64()
    );
    f.add_vip(0, (VIP, VIP_PORT, IPPROTO_TCP), &[(1, 1), (2, 1), (3, 1)]);
    f.add_vip(
        1,
        (DEAD_VIP, VIP_PORT, IPPROTO_TCP),
        &[(11, 1), (12, 1), (13, 1)],
    );
    for id in [11, 12, 13] {
        let addr = Ipv4Addr::new(198, 18, 1, id as u8);
        let b = backend_entry(addr, INGRESS_IFINDEX, 1, false, backend_mac(id), LB_MAC);
        f.dp.set_backend(id, b)?;
    }
    let mut v6 = crate::v6::V6Bench::new(&mut f)?;
    let encap = crate::encap::EncapBench::new(&mut f, VIP, crate::v6::VIP6)?;
    let mut nat = crate::nat::NatBench::new(&mut f)?;
    let acl = crate::acl::AclBench::new(&mut f)?;
    // New NAT pairs per run: fewer than conntrack's new flows (each fills
    // two hash maps of NAT_ENTRIES).
    let nat_flows = (cfg.new_flows / 4).max(CHUNK);
    // Schedulers: as many new flows per kind as NAT's, in a fixture of
    // their own.
    let mut sched = crate::sched::SchedBench::new(nat_flows * (cfg.runs + 1))?;

    // Mid-connection segments (ACK) except where a connection opens (SYN):
    // the balancer steers a SYN by the ring whatever conntrack holds.
    let ack = |src_port: u16, dst: Ipv4Addr| {
        let mut p = Ipv4Packet::tcp(CLIENT, src_port, dst, VIP_PORT);
        p.tcp_flags = TCP_ACK;
        p.build()
    };
    let to_vip = ack(40000, VIP);
    let to_other = ack(40001, OTHER);
    let established = ack(40002, VIP);
    let established_syn = Ipv4Packet::tcp(CLIENT, 40002, VIP, VIP_PORT).build();
    let to_dead = ack(40003, DEAD_VIP);
    let mut out = vec![0u8; to_vip.len() + 256];

    let lb = f.dp.program(program_names::BALANCER);

    // Prime the established flow: its first packet is a new flow.
    let s0 = f.dp.vip_stats(0)?;
    let r = f.run(&established_syn);
    ensure!(r.action == XDP_TX, "priming: action {}", r.action);
    let s1 = f.dp.vip_stats(0)?;
    ensure!(
        s1.new_flows - s0.new_flows == 1,
        "priming did not record a new flow"
    );

    let mut next_flow = 0u64;
    // Guarded SYNs record nothing: their 5-tuples come from far above the
    // recorded ones (new_flow_frame cycles after 251 × 60000).
    let mut guard_next = 8_000_000u64;
    let (mut fresh_next, mut fresh_guard_next) = (FRESH_RECORDED, FRESH_GUARDED);
    // Warm-up (discarded): code, maps and caches.
    let warm_repeat = (cfg.repeat / 10).max(1000);
    repeated(
        progs.floor(),
        &to_vip,
        &mut out,
        warm_repeat,
        XDP_TX,
        "floor",
    )?;
    repeated(lb, &to_other, &mut out, warm_repeat, XDP_PASS, "pass")?;
    repeated(lb, &established, &mut out, warm_repeat, XDP_TX, "hit")?;
    repeated(lb, &to_dead, &mut out, warm_repeat, XDP_DROP, "no backend")?;
    new_flows(
        &f,
        &progs,
        &mut next_flow,
        warm_flows,
        &established,
        &mut out,
        false,
    )?;

    fresh_flows(&f, &mut progs, &mut fresh_next, fresh_warm, false)?;

    decap.run(&mut progs, warm_repeat)?;
    encap.run(&f, &mut progs, warm_repeat)?;
    nat.run(&f, &mut progs, warm_repeat, CHUNK)?;
    acl.run(&f, warm_repeat)?;
    sched.run(&progs, nat_flows)?;

    let mut s = Samples::default();
    let (measure_start, delay_start) = (Instant::now(), run_delay_ns());
    let (mut hits_counted, mut passes_counted) = (0u64, 0u64);
    let mut new_counted = 0u64;
    let mut dead_counted = 0u64;
    let mut per_run: Vec<Vec<String>> = Vec::new();
    for _ in 0..cfg.runs {
        let (k, w) = repeated(
            progs.floor(),
            &to_vip,
            &mut out,
            cfg.repeat,
            XDP_TX,
            "floor",
        )?;
        // Each repeat swaps the MACs again: an odd count leaves them swapped.
        let swapped = out[..6] == to_vip[6..12] && out[6..12] == to_vip[..6];
        let same = out[..to_vip.len()] == to_vip[..];
        ensure!(
            if cfg.repeat % 2 == 1 { swapped } else { same },
            "floor: output frame is not the input with its MACs swapped {} times",
            cfg.repeat
        );
        s.floor.push(k);
        s.floor_fixed.push(w);

        let before = f.reasons();
        let (k, w) = repeated(lb, &to_other, &mut out, cfg.repeat, XDP_PASS, "pass")?;
        let moved = f.reasons()["pass_not_vip"] - before["pass_not_vip"];
        ensure!(
            moved == u64::from(cfg.repeat),
            "pass-through: pass_not_vip moved by {moved}, want {}",
            cfg.repeat
        );
        ensure!(
            out[..to_other.len()] == to_other[..],
            "pass-through: frame modified"
        );
        passes_counted += moved;
        s.pass.push(k);
        s.pass_fixed.push(w);

        let before = f.dp.vip_stats(0)?;
        let (k, w) = repeated(lb, &established, &mut out, cfg.repeat, XDP_TX, "hit")?;
        let after = f.dp.vip_stats(0)?;
        let hits = after.conntrack_hits - before.conntrack_hits;
        let new = after.new_flows - before.new_flows;
        ensure!(
            hits == u64::from(cfg.repeat) && new == 0,
            "conntrack hit: {hits} hits and {new} new flows, want {} and 0",
            cfg.repeat
        );
        hits_counted += hits;
        s.hit.push(k);
        s.hit_fixed.push(w);
        s.hit6.push(v6.hit(&f, lb, cfg.repeat)?);

        let before = f.reasons();
        let (k, _) = repeated(lb, &to_dead, &mut out, cfg.repeat, XDP_DROP, "no backend")?;
        let moved = f.reasons()["drop_no_backend"] - before["drop_no_backend"];
        ensure!(
            moved == u64::from(cfg.repeat),
            "no usable backend: drop_no_backend moved by {moved}, want {}",
            cfg.repeat
        );
        dead_counted += moved;
        s.dead.push(k);

        let tracked_before = next_flow + (fresh_next - FRESH_RECORDED) + 1;
        let nf = new_flows(
            &f,
            &progs,
            &mut next_flow,
            single_k,
            &established,
            &mut out,
            false,
        )?;
        new_counted += single_k as u64;
        s.fresh_new.push(fresh_flows(
            &f,
            &mut progs,
            &mut fresh_next,
            fresh_k,
            false,
        )?);
        new_counted += u64::from(fresh_k);
        syn_guard(&f, 1)?;
        // The SYN filter as the agent keeps it (rebuilt with each count
        // pass): the live records' bits, so that a SYN of a flow without
        // one skips the conntrack lookup.
        f.dp.rebuild_syn_filter()?;
        let guarded = new_flows(
            &f,
            &progs,
            &mut guard_next,
            single_k,
            &established,
            &mut out,
            true,
        )
        .and_then(|g| {
            let fresh = fresh_flows(&f, &mut progs, &mut fresh_guard_next, fresh_k, true)?;
            Ok((g, fresh))
        });
        syn_guard(&f, 0)?;
        let (guarded, fresh_guarded) = guarded?;
        s.syn_guarded.push(guarded.lb_kernel - guarded.ret_kernel);
        s.fresh_guarded.push(fresh_guarded);
        per_run.push(vec![
            (per_run.len() + 1).to_string(),
            format!(
                "{tracked_before} ({:.0}%)",
                100.0 * tracked_before as f64 / f64::from(conntrack_entries)
            ),
            fmt_num(s.fresh_new.last().copied().unwrap_or(f64::NAN)),
            fmt_num(nf.lb_kernel - nf.ret_kernel),
            fmt_num(nf.new_cost_wall),
        ]);
        s.single_hit_wall.push(nf.hit_cost_wall);
        s.single_hit_kernel.push(nf.hit_kernel - nf.ret_kernel);
        s.new_lb_wall.push(nf.lb_wall);
        s.new_ret_wall.push(nf.ret_wall);
        s.new_lb_kernel.push(nf.lb_kernel);
        s.new_ret_kernel.push(nf.ret_kernel);
        s.new_cost_wall.push(nf.new_cost_wall);
        s.new_cost_kernel.push(nf.lb_kernel - nf.ret_kernel);
        let d = decap.run(&mut progs, cfg.repeat)?;
        s.decap_ipip.push(d.ipip);
        s.decap_gue.push(d.gue);
        s.decap_floor.push(d.floor);
        let e = encap.run(&f, &mut progs, cfg.repeat)?;
        s.encap.push(e);
        s.nat.push(nat.run(&f, &mut progs, cfg.repeat, nat_flows)?);
        s.acl.push(acl.run(&f, cfg.repeat)?);
        s.sched.push(sched.run(&progs, nat_flows)?);
    }
    let measured = measure_start.elapsed();
    let waited = run_delay_ns()
        .zip(delay_start)
        .map(|(b, a)| Duration::from_nanos(b.saturating_sub(a)));
    // The very first measured-or-warm-up flow must still be there: no
    // eviction over the whole benchmark.
    if f.dp.conntrack_lookup(&new_flow_frame(0).1)?.is_none()
        || f.dp.conntrack_lookup(&fresh_key(FRESH_RECORDED))?.is_none()
    {
        bail!("conntrack evicted flows during the benchmark (map too small)");
    }

    let st = |v: &[f64]| Stats::of(v);
    let floor_s = st(&s.floor);
    let rep = cfg.repeat;
    let k = single_k;
    let rows = vec![
        Row::new("floor (lb_floor)", "ns/packet", floor_s)
            .ratio(&floor_s)
            .note(format!("repeat={rep}, kernel-reported average")),
        Row::new("lb_xdp non-VIP pass-through", "ns/packet", st(&s.pass))
            .ratio(&floor_s)
            .note(format!("repeat={rep}, kernel-reported average")),
        Row::new("lb_xdp conntrack hit", "ns/packet", st(&s.hit))
            .ratio(&floor_s)
            .target(Target {
                text: format!("≤ {HIT_TARGET}× floor"),
                limit: HIT_TARGET,
                on: TargetOn::Ratio,
                better: Better::Lower,
            })
            .note(format!(
                "repeat={rep}, ACK segments of an established flow, kernel-reported average"
            )),
        Row::new("lb_xdp new flow", "ns/packet", st(&s.fresh_new))
            .ratio(&floor_s)
            .target(Target {
                text: format!("≤ {NEW_FLOW_TARGET}× floor"),
                limit: NEW_FLOW_TARGET,
                on: TargetOn::Ratio,
                better: Better::Lower,
            })
            .note(format!(
                "{fresh_k} SYNs of fresh 5-tuples per run, repeat through lb_restore (a new \
                 source every iteration; caches as warm as in a receive loop): kernel-reported \
                 average − lb_restore → lb_return's + lb_return's"
            )),
        Row::new(
            "lb_xdp new flow, SYN under the SYN-flood guard",
            "ns/packet",
            st(&s.fresh_guarded),
        )
        .ratio(&floor_s)
        .target(Target {
            text: format!("≤ {NEW_FLOW_TARGET}× floor"),
            limit: NEW_FLOW_TARGET,
            on: TargetOn::Ratio,
            better: Better::Lower,
        })
        .note(format!(
            "{fresh_k} SYNs of fresh 5-tuples per run with the guard on (steered by the ring, \
             no record; the connection's first ACK then costs a new flow above) and the SYN \
             filter rebuilt from conntrack before the run, as the agent keeps it; timed as \
             the row above"
        )),
        Row::new(
            "lb_xdp new flow, one call per packet",
            "ns/packet",
            st(&s.new_cost_kernel),
        )
        .ratio(&floor_s)
        .note(format!(
            "{k} SYNs of fresh 5-tuples per run, 1 call each: kernel-reported duration per \
             call − lb_return's on the same frames (cross-check of the row timed by repeat)"
        )),
        Row::new(
            "lb_xdp new flow, SYN under the guard, one call per packet",
            "ns/packet",
            st(&s.syn_guarded),
        )
        .ratio(&floor_s)
        .note(format!(
            "{k} SYNs of fresh 5-tuples per run with the guard on, 1 call each, minus lb_return"
        )),
        Row::new(
            "lb_xdp new flow (wall-clock cross-check)",
            "ns/packet",
            st(&s.new_cost_wall),
        )
        .ratio(&floor_s)
        .note(format!(
            "same calls: userspace wall time per call − lb_return's, median over chunks of \
             {CHUNK} (syscall noise and machine load included)"
        )),
    ];
    let rows = [
        rows,
        crate::decap::rows(&s.decap_ipip, &s.decap_gue, &s.decap_floor, cfg.repeat),
        crate::encap::rows(&s.encap, &floor_s, cfg.repeat),
        crate::v6::rows(&s.hit6, &s.hit, &floor_s, rep),
        crate::nat::rows(&s.nat, &floor_s, rep, nat_flows),
        crate::acl::rows(&s.acl, &floor_s, rep),
        crate::sched::rows(&s.sched, &floor_s, nat_flows),
    ]
    .concat();

    let mut detail = Table::new(
        "Detail and breakdown (ns)",
        &["measurement", "median", "min", "max", "how"],
    );
    let mut push = |name: &str, v: &[f64], how: &str| {
        let x = Stats::of(v);
        detail.push(vec![
            name.into(),
            fmt_num(x.median),
            fmt_num(x.min),
            fmt_num(x.max),
            how.into(),
        ]);
    };
    push(
        "VIP flow, no usable backend (drop)",
        &s.dead,
        "repeat, ACK segments to a VIP whose backends are all unusable: VIPS hit, conntrack miss, \
         hash, RINGS + BACKENDS lookups, reason counter, XDP_DROP (no LRU insert, no VIP \
         or backend counters, no rewrite)",
    );
    push(
        "fixed cost of one repeated call (ms, not ns)",
        &[s.floor_fixed.as_slice(), &s.pass_fixed, &s.hit_fixed].concat(),
        "wall time − repeat × kernel figure, over the floor, pass and hit calls: the \
         kernel swaps the XDP dispatcher around a repeated run (two RCU waits), and it \
         leaves out time spent rescheduling; the kernel's per-repeat figure excludes both",
    );
    push(
        "conntrack hit, one call per packet: wall − lb_return",
        &s.single_hit_wall,
        "the established flow with the new-flow method, in the same runs (median over \
         chunks): how much the one-call method itself adds compared with repeat",
    );
    push(
        "conntrack hit, one call per packet: kernel-reported − lb_return",
        &s.single_hit_kernel,
        "idem, kernel-reported durations",
    );
    push(
        "new flow: lb_xdp wall per call",
        &s.new_lb_wall,
        "syscall included; median over chunks",
    );
    push(
        "new flow: lb_return wall per call",
        &s.new_ret_wall,
        "the fixed cost of one BPF_PROG_TEST_RUN call",
    );
    push(
        "new flow: lb_xdp kernel-reported per call",
        &s.new_lb_kernel,
        "duration field, repeat=1",
    );
    push(
        "new flow: lb_return kernel-reported per call",
        &s.new_ret_kernel,
        "duration field, repeat=1 (timer overhead of one run)",
    );

    let mut by_run = Table::new(
        "New flow by run (ns per packet): conntrack fills up as the runs go",
        &[
            "run",
            "flows in conntrack before the run",
            "repeat, fresh sources",
            "one call: kernel-reported − lb_return",
            "one call: wall − lb_return",
        ],
    );
    for r in per_run {
        by_run.push(r);
    }
    let mut checks = Table::new(
        "Checks (counters read back from the maps)",
        &["check", "value"],
    );
    checks.push(vec![
        "conntrack hits counted in VIP_STATS during the hit runs".into(),
        format!("{hits_counted} = {} runs × repeat {rep}", cfg.runs),
    ]);
    checks.push(vec![
        "pass_not_vip counted during the pass-through runs".into(),
        format!("{passes_counted} = {} runs × repeat {rep}", cfg.runs),
    ]);
    checks.push(vec![
        "drop_no_backend counted during the no-usable-backend runs".into(),
        format!("{dead_counted} = {} runs × repeat {rep}", cfg.runs),
    ]);
    checks.push(vec![
        "new flows counted in VIP_STATS during the new-flow runs".into(),
        format!(
            "{new_counted} = {} runs × ({k} one call each + {fresh_k} by repeat) (and {k} hits \
             per run from the single-call hits)",
            cfg.runs
        ),
    ]);
    checks.push(vec![
        "time the measuring thread waited for a CPU (other load on the machine)".into(),
        match waited {
            Some(w) => format!(
                "{:.2} s of {:.2} s measured ({:.0}%)",
                w.as_secs_f64(),
                measured.as_secs_f64(),
                100.0 * w.as_secs_f64() / measured.as_secs_f64()
            ),
            None => "unknown (no /proc/thread-self/schedstat)".into(),
        },
    ]);
    checks.push(vec![
        "conntrack map size / flows inserted".into(),
        format!(
            "{conntrack_entries} / {} (oldest flow still tracked at the end: no eviction)",
            total_flows + 1
        ),
    ]);

    let hit = st(&s.hit);
    let new = st(&s.fresh_new);
    let bars = vec![
        Bar::new("floor", floor_s),
        Bar::new("non-VIP pass", st(&s.pass)),
        Bar::new("conntrack hit", hit),
        Bar::new("new flow", new),
        Bar::new("new flow, guarded SYN", st(&s.fresh_guarded)),
    ];
    let refs = vec![
        RefLine::new(format!("{HIT_TARGET}x floor"), HIT_TARGET * floor_s.median),
        RefLine::new(
            format!("{NEW_FLOW_TARGET}x floor"),
            NEW_FLOW_TARGET * floor_s.median,
        ),
    ];
    let chart = "per-packet.png";
    charts::bars(
        &out_dir.join(chart),
        "lb per-packet cost (BPF_PROG_TEST_RUN), median with min-max",
        "ns per packet",
        &bars,
        &refs,
    )?;

    Ok(Section {
        key: "kernel".into(),
        title: "Per-packet cost in the kernel".into(),
        intro: vec![
            "BPF_PROG_TEST_RUN on the real programs with real maps: one TCP VIP over 3 \
             backends. The floor is `lb_floor` (parse Ethernet, IPv4, TCP with the same \
             bounds checks, swap MACs, `XDP_TX`), measured in every run next to the others."
                .into(),
            format!(
                "Floor, non-VIP pass-through and conntrack hit use `repeat`={rep} (the output \
                 frame is the same kind of packet, so every repeat takes the same path); the \
                 figure is the kernel's `duration` (total / repeat, whole ns). A new flow \
                 needs a fresh 5-tuple per packet: {fresh_k} SYNs per run go through \
                 `lb_restore`, which stamps a new source address and port on every iteration \
                 and tail-calls lb_xdp (its own cost, measured with `lb_return` as the target, \
                 is subtracted and `lb_return`'s added back, so the figure compares with the \
                 floor); this is the target's row. As a cross-check, {k} more SYNs per run go \
                 one call each, interleaved in chunks of {CHUNK} with the same frames through \
                 `lb_return` and single calls of the established flow (cost = lb_xdp per call − \
                 lb_return per call; the same method puts the hit below its `repeat` figure, \
                 see the detail table: subtracting a whole call's timer overhead takes off \
                 more than lb_xdp's own call carries). \
                 The runs insert into one conntrack map (the agent's default size), which \
                 fills up from run to run (see the by-run table). The userspace wall-clock \
                 difference of the single calls is shown too: it also carries the syscall's \
                 run-to-run noise and any other load on the \
                 machine."
            ),
        ],
        baseline: Some("floor".into()),
        rows,
        tables: vec![detail, by_run, checks],
        charts: vec![chart.into()],
        notes: vec![
            "For context only (not measured here): docs/architecture.md quotes, for this \
             machine kind, a minimal forwarder at 25 ns, Katran at 150 ns for an established \
             flow and 300 ns for a SYN through its ring with an LRU write."
                .into(),
        ],
    })
}
