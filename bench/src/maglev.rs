//! Maglev: table build time, balance, disruption on removal, and the
//! agent's path to apply a one-backend change to a real loaded datapath.

use std::{hint::black_box, net::Ipv4Addr, path::Path, time::Instant};

use anyhow::{Context, Result, ensure};
use lb::{
    datapath::MapSizes,
    maglev::{MaglevBackend, MaglevTable, is_prime},
};
use lb_common::IPPROTO_TCP;
use lb_tests::fixture::Fixture;

use crate::{
    charts::{self, Line, Panel, RefLine},
    report::{Better, Row, Section, Stats, Table, Target, TargetOn, fmt_num},
};

pub struct Config {
    pub runs: usize,
    /// Each build-time sample repeats the build until it has taken about
    /// this long (at least once), and reports the mean.
    pub sample_ms: f64,
}

const BACKEND_COUNTS: [usize; 3] = [10, 100, 1000];
const RING_SIZES: [u32; 2] = [65537, 655373];
/// Google's Maglev paper (NSDI 2016), table generation with 1000 backends:
/// external reference figures, not measured here.
const PAPER_MS: [(u32, f64); 2] = [(65537, 1.8), (655373, 22.9)];

fn paper_ms(m: u32) -> Option<f64> {
    PAPER_MS.iter().find(|p| p.0 == m).map(|p| p.1)
}

/// Backends as the agent keys them: IPv4 address << 16 | port.
fn backends(n: usize) -> Vec<MaglevBackend> {
    let base = u32::from(Ipv4Addr::new(198, 18, 2, 0));
    (0..n)
        .map(|i| MaglevBackend {
            key: (u64::from(base + i as u32) << 16) | 80,
            id: i as u32 + 1,
            weight: 1,
        })
        .collect()
}

fn ms(d: std::time::Duration) -> f64 {
    d.as_secs_f64() * 1e3
}

/// Build-time samples (ms per build) for one (N, M).
fn build_times(set: &[MaglevBackend], m: u32, cfg: &Config) -> Result<(Stats, usize)> {
    // A warm-up build, then calibrate on the fastest of three.
    black_box(MaglevTable::build(black_box(set), m)?);
    let mut once = f64::MAX;
    for _ in 0..3 {
        let t = Instant::now();
        black_box(MaglevTable::build(black_box(set), m)?);
        once = once.min(ms(t.elapsed()));
    }
    let once = once.max(1e-3);
    let inner = ((cfg.sample_ms / once).ceil() as usize).clamp(1, 1000);
    let mut samples = Vec::with_capacity(cfg.runs);
    for _ in 0..cfg.runs {
        let t = Instant::now();
        for _ in 0..inner {
            black_box(MaglevTable::build(black_box(set), m)?);
        }
        samples.push(ms(t.elapsed()) / inner as f64);
    }
    Ok((Stats::of(&samples), inner))
}

struct Disruption {
    min_slots: u32,
    max_slots: u32,
    changed: usize,
    removed_slots: usize,
    survivors: usize,
    survivors_moved: usize,
}

fn disruption(set: &[MaglevBackend], m: u32) -> Result<Disruption> {
    let old = MaglevTable::build(set, m)?;
    let shares = old.shares();
    ensure!(
        shares.len() == set.len(),
        "N={} M={m}: {} backends own slots",
        set.len(),
        shares.len()
    );
    let removed = set[set.len() / 2];
    let rest: Vec<MaglevBackend> = set
        .iter()
        .copied()
        .filter(|b| b.key != removed.key)
        .collect();
    let new = MaglevTable::build(&rest, m)?;
    let (mut changed, mut removed_slots, mut survivors, mut survivors_moved) = (0, 0, 0, 0);
    for (&o, &n) in old.slots().iter().zip(new.slots()) {
        changed += usize::from(o != n);
        if o == removed.id {
            removed_slots += 1;
        } else {
            survivors += 1;
            survivors_moved += usize::from(o != n);
        }
    }
    Ok(Disruption {
        min_slots: *shares.values().min().unwrap_or(&0),
        max_slots: *shares.values().max().unwrap_or(&0),
        changed,
        removed_slots,
        survivors,
        survivors_moved,
    })
}

/// Times of one applied change.
struct Applied {
    slots: usize,
    build: f64,
    diff: f64,
    write: f64,
    total: f64,
}

/// The agent's path: new table, diff against the table in memory, changed
/// slots written with `Datapath::write_ring`.
fn apply(
    f: &mut Fixture,
    old: &MaglevTable,
    set: &[MaglevBackend],
    m: u32,
) -> Result<(MaglevTable, Applied)> {
    let t0 = Instant::now();
    let new = MaglevTable::build(set, m)?;
    let t1 = Instant::now();
    let diff: Vec<(u32, u32)> = old.diff(&new).collect();
    let t2 = Instant::now();
    let slots = f.dp.write_ring(0, diff.iter().copied())?;
    let t3 = Instant::now();
    ensure!(
        slots == diff.len(),
        "write_ring wrote {slots} of {} slots",
        diff.len()
    );
    Ok((
        new,
        Applied {
            slots,
            build: ms(t1 - t0),
            diff: ms(t2 - t1),
            write: ms(t3 - t2),
            total: ms(t3 - t0),
        },
    ))
}

/// For each direction (remove one, add it back): per-run times.
#[derive(Default)]
struct AgentRuns {
    slots: Vec<usize>,
    build: Vec<f64>,
    diff: Vec<f64>,
    write: Vec<f64>,
    total: Vec<f64>,
}

impl AgentRuns {
    fn push(&mut self, a: &Applied) {
        self.slots.push(a.slots);
        self.build.push(a.build);
        self.diff.push(a.diff);
        self.write.push(a.write);
        self.total.push(a.total);
    }
}

/// A fixture with one VIP over `n` backends and a ring of `m`; then
/// `runs` × (remove the middle backend, add it back), each applied through
/// the agent's path. The keys are the fixture's (backend id), so the table
/// in memory is the one the fixture wrote.
fn agent_path(n: usize, m: u32, runs: usize) -> Result<(AgentRuns, AgentRuns)> {
    let max_backends = (n as u32 + 2).next_power_of_two();
    let mut f = Fixture::with_sizes(MapSizes {
        max_vips: 1,
        max_backends,
        ring_size: m,
        conntrack_entries: 1024,
        conntrack6_entries: 1024,
        nat_entries: 1024,
        acl_entries: 1024,
    });
    let pairs: Vec<(u32, u32)> = (1..=n as u32).map(|id| (id, 1)).collect();
    f.add_vip(0, (Ipv4Addr::new(198, 19, 0, 1), 80, IPPROTO_TCP), &pairs);
    let full: Vec<MaglevBackend> = pairs
        .iter()
        .map(|&(id, weight)| MaglevBackend {
            key: u64::from(id),
            id,
            weight,
        })
        .collect();
    let removed = full[n / 2].id;
    let less: Vec<MaglevBackend> = full.iter().copied().filter(|b| b.id != removed).collect();
    let mut table = MaglevTable::build(&full, m)?;
    ensure!(
        f.dp.read_ring(0, m)? == table.slots(),
        "the fixture's ring differs from the table in memory"
    );
    let (mut remove, mut add) = (AgentRuns::default(), AgentRuns::default());
    for run in 0..runs {
        let (t, a) = apply(&mut f, &table, &less, m)?;
        remove.push(&a);
        if run == 0 {
            ensure!(
                f.dp.read_ring(0, m)? == t.slots(),
                "N={n} M={m}: ring after removal differs from the new table"
            );
        }
        let (t, a) = apply(&mut f, &t, &full, m)?;
        add.push(&a);
        table = t;
    }
    ensure!(
        f.dp.read_ring(0, m)? == table.slots(),
        "N={n} M={m}: ring after the last change differs from the table"
    );
    Ok((remove, add))
}

fn stat_cells(v: &[f64]) -> [String; 3] {
    let s = Stats::of(v);
    [fmt_num(s.median), fmt_num(s.min), fmt_num(s.max)]
}

pub fn run(cfg: &Config, out_dir: &Path) -> Result<Section> {
    ensure!(cfg.runs >= 5, "at least 5 runs");
    for m in RING_SIZES {
        ensure!(is_prime(m), "{m} is not prime");
    }
    let mut rows = Vec::new();
    let mut build_table = Table::new(
        "Build time (ms per table)",
        &[
            "N",
            "M",
            "median",
            "min",
            "max",
            "builds per sample",
            "Google's paper (external, N=1000)",
        ],
    );
    let mut balance = Table::new(
        "Balance and disruption (one backend of N removed)",
        &[
            "N",
            "M",
            "slots per backend (min–max)",
            "max/min share",
            "slots changed on removal",
            "ideal (1/N)",
            "changed / ideal",
            "surviving owners' slots moved",
        ],
    );
    let mut lines: Vec<Line> = Vec::new();
    for m in RING_SIZES {
        let mut points = Vec::new();
        for n in BACKEND_COUNTS {
            let set = backends(n);
            let t = Instant::now();
            let (stats, inner) =
                build_times(&set, m, cfg).with_context(|| format!("build N={n} M={m}"))?;
            eprintln!(
                "lb-bench:   build N={n} M={m}: {} ms per build ({:.1} s)",
                fmt_num(stats.median),
                t.elapsed().as_secs_f64()
            );
            points.push((n as f64, stats));
            build_table.push(vec![
                n.to_string(),
                m.to_string(),
                fmt_num(stats.median),
                fmt_num(stats.min),
                fmt_num(stats.max),
                inner.to_string(),
                match (n, paper_ms(m)) {
                    (1000, Some(p)) => format!("{p} ms"),
                    _ => "—".into(),
                },
            ]);
            if n == 1000 {
                let mut row = Row::new(format!("Maglev build N=1000 M={m}"), "ms", stats);
                if m == 65537 {
                    row = row.target(Target {
                        text: "< 1.8 ms (Google's paper, external)".into(),
                        limit: 1.8,
                        on: TargetOn::Value,
                        better: Better::Lower,
                    });
                }
                let note = match paper_ms(m) {
                    Some(p) => format!(
                        "mean of {inner} builds per sample; Google's Maglev paper: {p} ms (external reference)"
                    ),
                    None => format!("mean of {inner} builds per sample"),
                };
                rows.push(row.note(note));
            }
            let d = disruption(&set, m)?;
            let ideal = m as f64 / n as f64;
            balance.push(vec![
                n.to_string(),
                m.to_string(),
                format!("{}–{}", d.min_slots, d.max_slots),
                format!("{:.4}", f64::from(d.max_slots) / f64::from(d.min_slots)),
                format!(
                    "{} ({:.3}%)",
                    d.changed,
                    100.0 * d.changed as f64 / f64::from(m)
                ),
                format!("{:.0} ({:.3}%)", ideal, 100.0 / n as f64),
                format!("{:.3}", d.changed as f64 / ideal),
                format!(
                    "{} of {} ({:.3}%)",
                    d.survivors_moved,
                    d.survivors,
                    100.0 * d.survivors_moved as f64 / d.survivors as f64
                ),
            ]);
            ensure!(
                d.removed_slots as u32 >= d.min_slots,
                "the removed backend owned too few slots"
            );
        }
        lines.push(Line {
            label: "lb (median, min-max)".into(),
            points,
        });
    }

    let mut agent = Table::new(
        "Applying a one-backend change to a loaded datapath (ms; median, min–max)",
        &[
            "N",
            "M",
            "change",
            "slots written",
            "build",
            "diff",
            "write_ring",
            "total",
            "total min",
            "total max",
        ],
    );
    for m in RING_SIZES {
        for n in BACKEND_COUNTS {
            let t = Instant::now();
            let (remove, add) =
                agent_path(n, m, cfg.runs).with_context(|| format!("agent path N={n} M={m}"))?;
            eprintln!(
                "lb-bench:   agent path N={n} M={m}: {:.1} s",
                t.elapsed().as_secs_f64()
            );
            for (what, r) in [("remove one", &remove), ("add it back", &add)] {
                let slots = {
                    let mut s = r.slots.clone();
                    s.sort_unstable();
                    s[s.len() / 2]
                };
                let total = Stats::of(&r.total);
                agent.push(vec![
                    n.to_string(),
                    m.to_string(),
                    what.into(),
                    slots.to_string(),
                    stat_cells(&r.build)[0].clone(),
                    stat_cells(&r.diff)[0].clone(),
                    stat_cells(&r.write)[0].clone(),
                    fmt_num(total.median),
                    fmt_num(total.min),
                    fmt_num(total.max),
                ]);
                if n == 1000 && m == 65537 && what == "remove one" {
                    rows.push(
                        Row::new("apply one-backend removal N=1000 M=65537", "ms", total).note(
                            format!(
                                "new table + diff + {slots} slots written by Datapath::write_ring"
                            ),
                        ),
                    );
                }
            }
        }
    }

    let chart = "maglev-build.png";
    let panels: Vec<Panel> = lines
        .into_iter()
        .zip(RING_SIZES)
        .map(|(line, m)| Panel {
            title: format!("M = {m}"),
            lines: vec![line],
            refs: paper_ms(m)
                .map(|p| RefLine::new("Google's paper, N=1000 (external)", p))
                .into_iter()
                .collect(),
        })
        .collect();
    charts::panels(
        &out_dir.join(chart),
        "Maglev table build time, median with min-max",
        "backends (N)",
        "ms per build",
        &panels,
    )?;

    Ok(Section {
        key: "maglev".into(),
        title: "Maglev".into(),
        intro: vec![
            "`lb::maglev::MaglevTable::build` for N backends of weight 1, keyed as the agent \
             keys them (IPv4 address << 16 | port), over rings of M slots. Each build-time \
             sample repeats the build and takes the mean; the figure is the median of the \
             samples. Balance is the ratio of the largest to the smallest slot count; \
             disruption removes the middle backend and counts the slots whose owner changes \
             (ideal: the removed backend's 1/N, and none of the others')."
                .into(),
            "The agent's path: a loaded fixture with one VIP over N backends; the new table \
             is computed, diffed against the table in memory, and only the changed slots are \
             written into the kernel's RINGS map with `Datapath::write_ring` (one \
             BPF_MAP_UPDATE_ELEM per slot); then the backend is added back the same way. The \
             ring read back from the kernel is checked against the table."
                .into(),
        ],
        baseline: None,
        rows,
        tables: vec![build_table, balance, agent],
        charts: vec![chart.into()],
        notes: vec![
            "The 1.8 ms and 22.9 ms figures are from Google's Maglev paper (NSDI 2016, \
             1000 backends, M = 65537 and 655373), measured on their hardware: external \
             references, not a baseline measured here."
                .into(),
        ],
    })
}
