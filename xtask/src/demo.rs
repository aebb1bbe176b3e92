//! `cargo xtask demo`: full setup, a debug build of `lb`, `lb-test-server`
//! and `lb-demo` (crate `demo`), then `target/debug/lb-demo` as
//! root with `LB_BIN` and `LB_TEST_SERVER` naming the other two, and the
//! `--forwarding` / `--ipv6` choice. Its exit code is passed on.

use std::{path::Path, process::ExitCode};

use anyhow::{Context, Result, bail};

use crate::{
    setup::{self, Ui},
    util::{Ctx, describe, run},
};

pub fn demo(ctx: &Ctx, forwarding: &str, ipv6: bool, scale_out: bool) -> Result<ExitCode> {
    if !ctx.privilege.can_escalate() {
        bail!(
            "the demo needs root (network namespaces, XDP, bpffs): this process is not root \
             and `sudo` is not installed; run `cargo xtask demo` as root"
        );
    }
    setup::full(ctx, &Ui { verbose: true })?;

    let lb = absolute(crate::build(ctx, false)?);
    let mut cmd = ctx.cargo();
    cmd.args([
        "build",
        "-p",
        "lb-demo",
        "-p",
        "lb-tests",
        "--bin",
        "lb-demo",
        "--bin",
        "lb-test-server",
    ]);
    run(&mut cmd)?;
    let debug = ctx.target_dir().join("debug");
    let (demo, server) = (debug.join("lb-demo"), debug.join("lb-test-server"));
    for bin in [&demo, &server] {
        if !bin.is_file() {
            bail!("build succeeded but {} does not exist", bin.display());
        }
    }
    let server = absolute(server);

    let mut cmd = ctx.privileged(absolute(demo), "running the demo")?;
    cmd.current_dir(&ctx.root)
        .env("LB_BIN", &lb)
        .env("LB_TEST_SERVER", &server);
    if scale_out {
        cmd.arg("--scale-out");
    } else {
        cmd.args(["--forwarding", forwarding]);
    }
    if ipv6 {
        cmd.arg("--ipv6");
    }
    println!("running: {}", describe(&cmd));
    println!();
    let status = cmd
        .status()
        .with_context(|| format!("cannot run `{}`", describe(&cmd)))?;
    Ok(match status.code() {
        Some(0) => ExitCode::SUCCESS,
        Some(code) => ExitCode::from(u8::try_from(code).ok().filter(|&c| c != 0).unwrap_or(1)),
        None => {
            println!("xtask demo: lb-demo ended by {status}");
            ExitCode::FAILURE
        }
    })
}

fn absolute(p: impl AsRef<Path>) -> std::path::PathBuf {
    let p = p.as_ref();
    std::path::absolute(p).unwrap_or_else(|_| p.to_path_buf())
}
