//! `cargo xtask bench [--quick]`: full setup, a release build of the
//! benchmark binary (crate `bench`, package lb-bench), then
//! `target/release/lb-bench [--quick] --out target/bench` as root, from the
//! workspace root. Its exit code is passed on.

use std::{path::Path, process::ExitCode};

use anyhow::{Context, Result, bail};

use crate::{
    setup::{self, Ui},
    util::{Ctx, describe, run},
};

/// Output directory, relative to the workspace root.
const OUT: &str = "target/bench";
/// The font the charts' text is drawn with (fonts-dejavu-core).
const FONT: &str = "/usr/share/fonts/truetype/dejavu/DejaVuSans.ttf";

pub fn bench(ctx: &Ctx, quick: bool, strict: bool) -> Result<ExitCode> {
    if !ctx.privilege.can_escalate() {
        bail!(
            "the benchmarks need root (they load XDP programs and pin maps in bpffs) and are \
             never skipped: this process is not root and `sudo` is not installed; run \
             `cargo xtask bench` as root"
        );
    }
    setup::full(ctx, &Ui { verbose: true })?;
    chart_font(ctx);

    let mut cmd = ctx.cargo();
    // The end-to-end section runs the real agent (which embeds the XDP
    // object) and the test servers: build them with the benchmark.
    cmd.args([
        "build",
        "--release",
        "-p",
        "lb-bench",
        "-p",
        "lb-tests",
        "-p",
        "lb-userspace",
        "--bin",
        "lb-bench",
        "--bin",
        "lb-test-server",
        "--bin",
        "lb",
    ]);
    run(&mut cmd)?;
    let bin = ctx.target_dir().join("release").join("lb-bench");
    if !bin.is_file() {
        bail!("build succeeded but {} does not exist", bin.display());
    }
    let bin = bin
        .strip_prefix(&ctx.root)
        .map(Path::to_path_buf)
        .unwrap_or(bin);

    let mut typed = String::from("cargo xtask bench");
    let mut cmd = ctx.privileged(ctx.root.join(&bin), "running the benchmarks")?;
    cmd.current_dir(&ctx.root);
    if quick {
        cmd.arg("--quick");
        typed.push_str(" --quick");
    }
    if strict {
        cmd.arg("--strict");
        typed.push_str(" --strict");
    }
    cmd.args(["--out", OUT]).env("LB_BENCH_COMMAND", &typed);
    println!("running: {}", describe(&cmd));
    let status = cmd
        .status()
        .with_context(|| format!("cannot run `{}`", describe(&cmd)))?;
    if status.success() {
        println!("xtask bench: done; report in {OUT}/report.md");
        Ok(ExitCode::SUCCESS)
    } else {
        let code = status.code().unwrap_or(1);
        println!("xtask bench: FAILED (lb-bench exited with {status})");
        Ok(ExitCode::from(
            u8::try_from(code).ok().filter(|&c| c != 0).unwrap_or(1),
        ))
    }
}

/// Installs fonts-dejavu-core when the charts' font is missing; the charts
/// are drawn without text if that fails, so this only warns.
fn chart_font(ctx: &Ctx) {
    if Path::new(FONT).is_file() {
        return;
    }
    println!("installing: fonts-dejavu-core (text in the benchmark charts)");
    let installed = ctx
        .privileged("apt-get", "installing fonts-dejavu-core")
        .and_then(|mut cmd| {
            cmd.args([
                "install",
                "-y",
                "--no-install-recommends",
                "fonts-dejavu-core",
            ])
            .env("DEBIAN_FRONTEND", "noninteractive");
            run(&mut cmd)
        });
    if let Err(e) = installed {
        eprintln!("warning: cannot install fonts-dejavu-core ({e:#}); charts will have no text");
    }
}
