//! Timing by `repeat` for paths that change the frame's length (a pushed
//! or stripped header), where `repeat` alone would hand the second
//! iteration the first one's output: the test object's `lb_restore` puts
//! the frame back (length, first 64 bytes) and tail-calls the program
//! under test, every iteration. Its own cost is measured the same way with
//! `lb_return` as the target and subtracted, and `lb_return`'s cost with
//! `repeat` added back, so a figure compares with the floor and the hit
//! (timed by `repeat` directly): it is what the program would cost if
//! `repeat` could run it. The caches are as warm as in a NIC's receive
//! loop, unlike one BPF_PROG_TEST_RUN call per packet, whose syscall
//! evicts them between packets. With a fresh source per iteration
//! (`Kind::fresh`), the same times a stream of new flows.

use anyhow::{Context, Result, ensure};
use aya::programs::{ProgramFd, Xdp};
use lb_tests::{fixture::XDP_PASS, testprogs::TestProgs};

use crate::kernel::repeated;

/// One program (its fd: the program may live in the test object that
/// `costs` borrows) on one frame, with the action it must give.
pub struct Kind<'a> {
    pub prog: ProgramFd,
    pub frame: &'a [u8],
    pub want: u32,
    pub what: &'a str,
    /// A new flow every iteration: the first value of `lb_restore`'s
    /// fresh-source counter (see `TestProgs::set_fresh`); the target's
    /// iterations stamp `fresh .. fresh + repeat`.
    pub fresh: Option<u64>,
}

impl<'a> Kind<'a> {
    pub fn new(prog: &Xdp, frame: &'a [u8], want: u32, what: &'a str) -> Result<Self> {
        Ok(Self {
            prog: prog.fd()?.try_clone()?,
            frame,
            want,
            what,
            fresh: None,
        })
    }

    /// Gives every iteration a fresh source, from `first` on.
    pub fn fresh(self, first: u64) -> Self {
        Self {
            fresh: Some(first),
            ..self
        }
    }
}

/// Chunks each kind's iterations are split into: the three timings of a
/// chunk follow each other within milliseconds, so a burst of other load
/// on the machine hits them alike, and the median over chunks drops the
/// chunks it hit unevenly.
const CHUNKS: u32 = 9;

/// Per-iteration cost (ns) of each kind, `repeat` iterations each: per
/// chunk, the kernel-reported average through `lb_restore` −
/// `lb_restore` → `lb_return`'s on the same frame + `lb_return`'s alone;
/// the median over the chunks. Fails on any other action than the kind's.
pub fn costs(progs: &mut TestProgs, kinds: &[Kind], repeat: u32) -> Result<Vec<f64>> {
    let ret_fd = progs.return_only().fd()?.try_clone()?;
    let chunk = (repeat / CHUNKS).max(1);
    let mut out = Vec::new();
    let mut costs = Vec::with_capacity(kinds.len());
    for k in kinds {
        out.resize(k.frame.len() + 256, 0);
        // The next fresh source of the target's iterations (0: off). The
        // harness's own run stamps the same ones (lb_return records none).
        let mut fresh = k.fresh.unwrap_or(0);
        let mut per_chunk = Vec::with_capacity(CHUNKS as usize);
        for c in 0..CHUNKS {
            // The last chunk takes the remainder: `repeat` iterations in all.
            let n = if c + 1 == CHUNKS {
                repeat - chunk * (CHUNKS - 1)
            } else {
                chunk
            };
            let mut through = |fd, want, what: &str| -> Result<f64> {
                progs.set_restore(fd, k.frame)?;
                progs.set_fresh(fresh)?;
                let (ns, _) = repeated(progs.restorer(), k.frame, &mut out, n, want, what)
                    .with_context(|| format!("lb_restore → {what}"))?;
                Ok(ns)
            };
            let base = through(&ret_fd, XDP_PASS, "lb_return")?;
            let target = through(&k.prog, k.want, k.what)?;
            if fresh != 0 {
                let next = progs.fresh()?;
                ensure!(
                    next == fresh + u64::from(n),
                    "{}: lb_restore stamped {} fresh sources, want {n}",
                    k.what,
                    next - fresh
                );
                fresh = next;
            }
            let (ret, _) = repeated(
                progs.return_only(),
                k.frame,
                &mut out,
                n,
                XDP_PASS,
                "lb_return",
            )?;
            per_chunk.push(target - base + ret);
        }
        progs.set_fresh(0)?;
        per_chunk.sort_by(f64::total_cmp);
        costs.push(per_chunk[per_chunk.len() / 2]);
    }
    Ok(costs)
}
