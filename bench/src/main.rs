//! lb-bench: the benchmarks behind `cargo xtask bench [--quick]`.
//!
//! ```text
//! lb-bench [--quick] [--strict] [--out DIR] [--only kernel|maglev|e2e|decap]
//! ```
//!
//! Needs root (it loads the XDP object). Writes DIR/report.md,
//! DIR/README-section.md and PNG charts (default DIR: target/bench), and
//! prints the summary table. Exit status: 0 when every measurement ran and
//! every check held (a missed target is reported, not an error, unless
//! `--strict`: then 3), 1 on an error, 2 on bad arguments.

mod acl;
mod charts;
mod decap;
mod e2e;
mod encap;
mod kernel;
mod maglev;
mod nat;
mod report;
mod restore;
mod sched;
mod v6;

use std::{
    fs,
    path::{Path, PathBuf},
    process::{Command, ExitCode},
    time::{Instant, SystemTime, UNIX_EPOCH},
};

use anyhow::{Context, Result, bail};
use clap::{Parser, ValueEnum};

use report::{Machine, Section};

/// The benchmarks behind `cargo xtask bench`; needs root.
#[derive(Parser)]
#[command(name = "lb-bench")]
struct Args {
    /// Fewer iterations (5 runs each).
    #[arg(long)]
    quick: bool,
    /// Exit with 3 when a performance target is missed.
    #[arg(long)]
    strict: bool,
    /// Output directory (report, README section, charts).
    #[arg(long, value_name = "DIR", default_value = "target/bench")]
    out: PathBuf,
    /// Run only the named section (development aid).
    #[arg(long, value_enum)]
    only: Option<SectionName>,
}

#[derive(Clone, Copy, PartialEq, Eq, ValueEnum)]
enum SectionName {
    Kernel,
    Maglev,
    E2e,
    /// Only lb_decap's rows, printed (no report): a development aid for
    /// the decap program.
    Decap,
}

fn main() -> ExitCode {
    // Bad arguments: clap prints the usage and exits with 2.
    let args = Args::parse();
    match run(&args) {
        Ok(code) => code,
        Err(e) => {
            eprintln!("lb-bench: error: {e:#}");
            ExitCode::FAILURE
        }
    }
}

fn run(args: &Args) -> Result<ExitCode> {
    // SAFETY: geteuid has no preconditions.
    if unsafe { libc::geteuid() } != 0 {
        bail!(
            "lb-bench loads XDP programs and needs root; run `cargo xtask bench` as root \
             (benchmarks are never skipped)"
        );
    }
    let started = Instant::now();
    let mut machine = machine_info(args);
    machine.pinned_cpu = pin_to_last_cpu();
    fs::create_dir_all(&args.out)
        .with_context(|| format!("cannot create {}", args.out.display()))?;
    match charts::font() {
        Some(path) => println!("lb-bench: chart font {path}"),
        None => eprintln!(
            "lb-bench: warning: no TrueType font found (install fonts-dejavu-core); \
             charts are drawn without text"
        ),
    }
    println!(
        "lb-bench: {} mode, {} cores, kernel {}, pinned to CPU {}",
        machine.mode,
        machine.cores,
        machine.kernel,
        machine
            .pinned_cpu
            .map_or("(none)".to_string(), |c| c.to_string())
    );

    let (kcfg, mcfg, ecfg) = if args.quick {
        (
            kernel::Config {
                runs: 5,
                repeat: 200_000,
                new_flows: 20_000,
            },
            maglev::Config {
                runs: 5,
                sample_ms: 10.0,
            },
            e2e::Config {
                runs: 5,
                udp_secs: 0.5,
                tcp_secs: 1,
                wrk_threads: 2,
                wrk_connections: 32,
            },
        )
    } else {
        (
            kernel::Config {
                runs: 7,
                repeat: 1_000_000,
                new_flows: 100_000,
            },
            maglev::Config {
                runs: 9,
                sample_ms: 30.0,
            },
            e2e::Config {
                runs: 7,
                udp_secs: 2.0,
                tcp_secs: 3,
                wrk_threads: 2,
                wrk_connections: 32,
            },
        )
    };

    if args.only == Some(SectionName::Decap) {
        decap::print_quick(if args.quick { 5 } else { 15 }, kcfg.repeat)?;
        return Ok(ExitCode::SUCCESS);
    }
    let wanted = |section: SectionName| args.only.is_none_or(|o| o == section);
    let mut sections: Vec<Section> = Vec::new();
    if wanted(SectionName::Kernel) {
        let t = Instant::now();
        println!("lb-bench: per-packet cost in the kernel ...");
        sections.push(kernel::run(&kcfg, &args.out).context("per-packet benchmarks")?);
        println!("lb-bench:   done in {:.1} s", t.elapsed().as_secs_f64());
    }
    if wanted(SectionName::Maglev) {
        let t = Instant::now();
        println!("lb-bench: Maglev ...");
        sections.push(maglev::run(&mcfg, &args.out).context("Maglev benchmarks")?);
        println!("lb-bench:   done in {:.1} s", t.elapsed().as_secs_f64());
    }
    if wanted(SectionName::E2e) {
        let t = Instant::now();
        println!("lb-bench: end to end in network namespaces ...");
        sections.push(e2e::run(&ecfg, &args.out).context("end-to-end benchmarks")?);
        println!("lb-bench:   done in {:.1} s", t.elapsed().as_secs_f64());
    }
    let out_rel = args.out.to_string_lossy().into_owned();
    let report_path = args.out.join("report.md");
    let mut report = report::report_markdown(&machine, &sections);
    report.push_str(&format!(
        "Total benchmark time: {:.1} s.\n",
        started.elapsed().as_secs_f64()
    ));
    write(&report_path, &report)?;
    let readme_path = args.out.join("README-section.md");
    write(
        &readme_path,
        &report::readme_section(&machine, &sections, &out_rel),
    )?;

    println!();
    print!("{}", report::summary_text(&sections));
    let (pass, miss) = report::verdicts(&sections);
    println!();
    println!("targets: {pass} met, {miss} missed");
    println!(
        "report: {}  README section: {}  charts: {}",
        report_path.display(),
        readme_path.display(),
        sections
            .iter()
            .flat_map(|s| &s.charts)
            .map(|c| args.out.join(c).display().to_string())
            .collect::<Vec<_>>()
            .join(" ")
    );
    println!(
        "lb-bench: finished in {:.1} s",
        started.elapsed().as_secs_f64()
    );
    if args.strict && miss > 0 {
        return Ok(ExitCode::from(3));
    }
    Ok(ExitCode::SUCCESS)
}

fn write(path: &Path, text: &str) -> Result<()> {
    fs::write(path, text).with_context(|| format!("cannot write {}", path.display()))
}

fn command_output(program: &str, args: &[&str]) -> Option<String> {
    let out = Command::new(program).args(args).output().ok()?;
    out.status
        .success()
        .then(|| String::from_utf8_lossy(&out.stdout).trim().to_string())
        .filter(|s| !s.is_empty())
}

fn machine_info(args: &Args) -> Machine {
    let cores = command_output("nproc", &[]).unwrap_or_else(|| {
        std::thread::available_parallelism().map_or("?".into(), |n| n.to_string())
    });
    let kernel = command_output("uname", &["-r"]).unwrap_or_else(|| {
        fs::read_to_string("/proc/sys/kernel/osrelease")
            .map(|s| s.trim().to_string())
            .unwrap_or_else(|_| "?".into())
    });
    let cpu_model = fs::read_to_string("/proc/cpuinfo")
        .ok()
        .and_then(|s| {
            s.lines()
                .find(|l| l.starts_with("model name"))
                .and_then(|l| l.split_once(':'))
                .map(|(_, v)| v.trim().to_string())
        })
        .unwrap_or_else(|| "unknown".into());
    let invocation = std::iter::once("lb-bench".to_string())
        .chain(std::env::args().skip(1))
        .collect::<Vec<_>>()
        .join(" ");
    let invocation = match std::env::args().next() {
        Some(argv0) if argv0.contains('/') => {
            invocation.replacen("lb-bench", &display_path(&argv0), 1)
        }
        _ => invocation,
    };
    let command = std::env::var("LB_BENCH_COMMAND")
        .ok()
        .filter(|c| !c.is_empty())
        .unwrap_or_else(|| invocation.clone());
    Machine {
        date: utc_now(),
        cores,
        kernel,
        cpu_model,
        pinned_cpu: None,
        command,
        invocation,
        mode: if args.quick {
            "quick (5 runs, fewer iterations)".into()
        } else {
            "full".into()
        },
    }
}

/// argv[0] relative to the current directory when it lies below it.
fn display_path(p: &str) -> String {
    let path = Path::new(p);
    match std::env::current_dir() {
        Ok(cwd) => path
            .strip_prefix(&cwd)
            .map(|r| r.display().to_string())
            .unwrap_or_else(|_| p.to_string()),
        Err(_) => p.to_string(),
    }
}

/// Pins this thread to the highest CPU it may run on (BPF_PROG_TEST_RUN
/// runs the program on the calling CPU), away from CPU 0's interrupts.
fn pin_to_last_cpu() -> Option<usize> {
    // SAFETY: cpu_set_t is plain data; the calls get its exact size.
    unsafe {
        let mut set: libc::cpu_set_t = std::mem::zeroed();
        if libc::sched_getaffinity(0, size_of::<libc::cpu_set_t>(), &mut set) != 0 {
            return None;
        }
        let cpu = (0..libc::CPU_SETSIZE as usize)
            .rev()
            .find(|&c| libc::CPU_ISSET(c, &set))?;
        let mut one: libc::cpu_set_t = std::mem::zeroed();
        libc::CPU_SET(cpu, &mut one);
        (libc::sched_setaffinity(0, size_of::<libc::cpu_set_t>(), &one) == 0).then_some(cpu)
    }
}

/// "YYYY-MM-DD HH:MM UTC" from the system clock.
fn utc_now() -> String {
    let secs = SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| d.as_secs());
    let days = (secs / 86400) as i64;
    let rem = secs % 86400;
    // Civil date from days since 1970-01-01 (H. Hinnant's algorithm).
    let z = days + 719_468;
    let era = z.div_euclid(146_097);
    let doe = z.rem_euclid(146_097);
    let yoe = (doe - doe / 1460 + doe / 36524 - doe / 146_096) / 365;
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy + 2) / 153;
    let d = doy - (153 * mp + 2) / 5 + 1;
    let m = if mp < 10 { mp + 3 } else { mp - 9 };
    let y = yoe + era * 400 + i64::from(m <= 2);
    format!(
        "{y:04}-{m:02}-{d:02} {:02}:{:02} UTC",
        rem / 3600,
        (rem % 3600) / 60
    )
}
