//! Project tasks: `cargo xtask <command>` (see `cargo xtask --help`).

mod bench;
mod demo;
mod setup;
mod util;

use std::{
    ffi::OsString,
    io::Write,
    os::unix::process::CommandExt,
    path::{Path, PathBuf},
    process::ExitCode,
};

use anyhow::{Context, Result, bail};
use clap::{Parser, Subcommand};

use setup::Ui;
use util::{Ctx, Privilege, describe, run};

#[derive(Parser)]
#[command(
    name = "cargo xtask",
    bin_name = "cargo xtask",
    about = "Build, load and test lb"
)]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Install what lb needs (nightly, rust-src, bpf-linker, Debian
    /// packages, bpffs); idempotent.
    Setup,
    /// Build lb (and its XDP object) and print the path of the binary.
    Build {
        /// Release profile.
        #[arg(long)]
        release: bool,
    },
    /// Build, then run `lb run --iface IF [--config FILE]` as root.
    BuildAndLoad {
        /// Interface to attach the XDP program to.
        #[arg(long)]
        iface: String,
        /// Configuration file passed to `lb run`.
        #[arg(long)]
        config: Option<PathBuf>,
        /// Release profile.
        #[arg(long)]
        release: bool,
    },
    /// Build, then run `lb ARGS...`.
    Run {
        /// Release profile.
        #[arg(long)]
        release: bool,
        /// Arguments for lb (after `--`).
        #[arg(trailing_var_arg = true, allow_hyphen_values = true)]
        args: Vec<OsString>,
    },
    /// Full setup, then the benchmarks as root (release build); report and
    /// charts in target/bench.
    Bench {
        /// Fewer iterations (5 runs each): about a minute.
        #[arg(long)]
        quick: bool,
        /// Exit with 3 when a performance target is missed.
        #[arg(long)]
        strict: bool,
    },
    /// Full setup, then a 30-second live demo in network namespaces as
    /// root: traffic, a backend failing and rejoining; exit 0 if all checks
    /// pass.
    Demo {
        /// The VIP's forwarding mode: dsr-l2 (backends on lb's segment),
        /// ipip / gue (backends behind a router, running `lb decap`), or nat
        /// (unmodified backends behind a router, full NAT).
        #[arg(long, default_value = "dsr-l2", value_parser = ["dsr-l2", "ipip", "gue", "nat"])]
        forwarding: String,
        /// The same story with an IPv6 VIP and IPv6 backends (2001:2::/48):
        /// 6in6 for ipip, GUE over IPv6 for gue.
        #[arg(long)]
        ipv6: bool,
        /// Two lb hosts behind an ECMP router (BIRD 2, BGP, BFD): traffic
        /// split per host, one host's link down at 10 s and back at 20 s,
        /// connections surviving.
        #[arg(long, conflicts_with_all = ["ipv6", "forwarding"])]
        scale_out: bool,
    },
    /// Full setup, then the whole test suite as root, one test at a time.
    Test {
        /// Extra arguments for the test binaries (after `--`).
        #[arg(trailing_var_arg = true, allow_hyphen_values = true)]
        args: Vec<OsString>,
    },
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    match dispatch(cli.command) {
        Ok(code) => code,
        Err(e) => {
            eprintln!("error: {e:#}");
            ExitCode::FAILURE
        }
    }
}

fn dispatch(command: Command) -> Result<ExitCode> {
    let ctx = Ctx::new()?;
    match command {
        Command::Setup => {
            setup::full(&ctx, &Ui { verbose: true })?;
            Ok(ExitCode::SUCCESS)
        }
        Command::Build { release } => {
            let bin = build(&ctx, release)?;
            println!("{}", bin.display());
            Ok(ExitCode::SUCCESS)
        }
        Command::BuildAndLoad {
            iface,
            config,
            release,
        } => {
            let bin = build(&ctx, release)?;
            let mut cmd = ctx.privileged(&bin, "loading the XDP program")?;
            cmd.args(["run", "--iface", &iface]);
            if let Some(config) = config {
                cmd.arg("--config").arg(config);
            }
            Err(exec(cmd))
        }
        Command::Run { release, args } => {
            let bin = build(&ctx, release)?;
            let mut cmd = ctx.cmd(&bin);
            cmd.args(args);
            Err(exec(cmd))
        }
        Command::Test { args } => test(&ctx, &args),
        Command::Demo {
            forwarding,
            ipv6,
            scale_out,
        } => demo::demo(&ctx, &forwarding, ipv6, scale_out),
        Command::Bench { quick, strict } => bench::bench(&ctx, quick, strict),
    }
}

/// Cheap toolchain checks (installing what is missing), then
/// `cargo build -p lb-userspace`; returns the path of `lb`.
fn build(ctx: &Ctx, release: bool) -> Result<PathBuf> {
    setup::toolchain(ctx, &Ui { verbose: false })?;
    let mut cmd = ctx.cargo();
    cmd.args(["build", "-p", "lb-userspace"]);
    if release {
        cmd.arg("--release");
    }
    run(&mut cmd)?;
    let bin = lb_path(ctx, release);
    if !bin.is_file() {
        bail!("build succeeded but {} does not exist", bin.display());
    }
    Ok(bin)
}

fn lb_path(ctx: &Ctx, release: bool) -> PathBuf {
    let profile = if release { "release" } else { "debug" };
    ctx.target_dir().join(profile).join("lb")
}

/// Replaces this process with `cmd` (keeps the terminal, signals and the
/// exit code); returns only on failure.
fn exec(mut cmd: std::process::Command) -> anyhow::Error {
    let _ = std::io::stdout().flush();
    let what = describe(&cmd);
    anyhow::Error::new(cmd.exec()).context(format!("cannot run `{what}`"))
}

fn test(ctx: &Ctx, args: &[OsString]) -> Result<ExitCode> {
    if !ctx.privilege.can_escalate() {
        bail!(
            "the tests need root (network namespaces, XDP, bpffs) and must not be skipped: \
             this process is not root and `sudo` is not installed; run `cargo xtask test` as root"
        );
    }
    setup::full(ctx, &Ui { verbose: true })?;

    let lb = build(ctx, false)?;
    let lb = std::path::absolute(&lb).unwrap_or(lb);

    let mut cmd = ctx.cargo();
    if let Privilege::Sudo { sudo, .. } = &ctx.privilege {
        // Build as the caller, run the test binaries as root.
        cmd.arg("--config").arg(format!(
            "target.'cfg(all())'.runner = [{}, \"-E\"]",
            toml_string(sudo)
        ));
    }
    // The eBPF crates are `#![no_std]`/`#![no_main]` and build only for
    // bpfel-unknown-none (through the build.rs of lb-userspace and
    // lb-tests); `--all-targets` would build their binaries for the host,
    // which cannot link.
    cmd.args([
        "test",
        "--workspace",
        "--exclude",
        "lb-ebpf",
        "--exclude",
        "lb-ebpf-testprogs",
        "--all-targets",
        "--",
    ])
    .arg("--test-threads=1")
    .args(args)
    .env("LB_BIN", &lb);
    println!("running: LB_BIN={} {}", lb.display(), describe(&cmd));
    let status = cmd
        .status()
        .with_context(|| format!("cannot run `{}`", describe(&cmd)))?;
    let filtered = if args.is_empty() {
        String::new()
    } else {
        let args: Vec<_> = args.iter().map(|a| a.to_string_lossy()).collect();
        format!("; extra test arguments: {}", args.join(" "))
    };
    if status.success() {
        println!("xtask test: PASSED (cargo test exited with 0{filtered})");
        Ok(ExitCode::SUCCESS)
    } else {
        let code = status.code().unwrap_or(1);
        println!("xtask test: FAILED (cargo test exited with {status}{filtered})");
        Ok(ExitCode::from(
            u8::try_from(code).ok().filter(|&c| c != 0).unwrap_or(1),
        ))
    }
}

/// A path as a TOML basic string.
fn toml_string(path: &Path) -> String {
    let s = path.to_string_lossy();
    format!("\"{}\"", s.replace('\\', "\\\\").replace('"', "\\\""))
}
