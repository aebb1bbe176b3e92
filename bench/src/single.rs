//! Timing by single calls, for paths `repeat` cannot time (the program
//! changes the frame: a pushed or stripped header): each packet is one
//! BPF_PROG_TEST_RUN call on a fresh copy of its frame, and the calls of
//! several kinds are interleaved chunk by chunk in rotating order, so that
//! a slow stretch of the machine hits every kind alike.

use anyhow::{Context, Result, ensure};
use aya::programs::{TestRun, TestRunOptions, Xdp};

/// Calls of each kind per interleaved chunk.
const CHUNK: usize = 100;

/// One kind of call: the program, its frame, and the action it must give.
pub struct Kind<'a> {
    pub prog: &'a Xdp,
    pub frame: &'a [u8],
    pub want: u32,
    pub what: &'a str,
}

impl<'a> Kind<'a> {
    pub fn new(prog: &'a Xdp, frame: &'a [u8], want: u32, what: &'a str) -> Self {
        Self {
            prog,
            frame,
            want,
            what,
        }
    }
}

/// `calls` calls of each kind, interleaved; the kernel-reported duration
/// summed per kind (ns). Fails on any call that gives another action.
pub fn interleaved(kinds: &[Kind], calls: usize) -> Result<Vec<u64>> {
    let longest = kinds.iter().map(|k| k.frame.len()).max().unwrap_or(0);
    let mut out = vec![0u8; longest + 256];
    let mut ns = vec![0u64; kinds.len()];
    for c in 0..calls.div_ceil(CHUNK) {
        let n = CHUNK.min(calls - c * CHUNK);
        for j in 0..kinds.len() {
            let which = (c + j) % kinds.len();
            let k = &kinds[which];
            for _ in 0..n {
                let r = k
                    .prog
                    .test_run(TestRunOptions {
                        data_in: Some(k.frame),
                        data_out: Some(&mut out),
                        ..TestRunOptions::new()
                    })
                    .context("BPF_PROG_TEST_RUN")?;
                ensure!(
                    r.return_value == k.want,
                    "{}: action {}, want {}",
                    k.what,
                    r.return_value,
                    k.want
                );
                ns[which] += r.duration.as_nanos() as u64;
            }
        }
    }
    Ok(ns)
}
