//! `cargo xtask setup`: installs what building, loading and testing lb need,
//! idempotently. Nothing is recorded: every step detects its own state.
//! The recipe is the one in ../shared/docs/toolchain.md.

use std::{
    fs,
    path::{Path, PathBuf},
};

use anyhow::{Context, Result, bail};

use crate::util::{Ctx, Privilege, find_in_path, output, run};

/// bpf-linker release that matches aya 0.14 and the nightly's LLVM.
const BPF_LINKER_VERSION: &str = "0.13.0";
/// Accepted `bpf-linker --version` prefix.
const BPF_LINKER_ACCEPTED: &str = "bpf-linker 0.13.";
/// The vendored rust-src component is for this nightly only.
const RUST_SRC_COMMIT: &str = "e50aa6fba";
const RUST_SRC_TARBALL: &str = "shared/vendor/rust-src-1.97.0-nightly-e50aa6fba.tar.xz";
/// Where the libLLVM links that bpf-linker is built against (and keeps an
/// rpath to) live, relative to $HOME.
const LLVM_PREFIX: &str = ".local/share/lb/llvm-prefix";
const BPFFS: &str = "/sys/fs/bpf";

/// Debian packages used by the tests, the demo and the benchmarks:
/// (name, optional). A missing optional package is only a warning.
const PACKAGES: &[(&str, bool)] = &[
    ("iproute2", false),
    ("ethtool", false),
    ("nftables", false),
    ("bpftool", false),
    ("iputils-ping", false),
    ("procps", false),
    ("curl", false),
    // BIRD 2: the routing daemon of the VIP-announcement test (tests/tests/announce.rs).
    ("bird2", false),
    // FRR: the other routing daemon the announcement test runs.
    ("frr", false),
    // Headless Chromium and its WebDriver: the status page test (tests/tests/status_page.rs).
    ("chromium", false),
    ("chromium-driver", false),
    // promtool (in Debian's prometheus package): deploy/'s rules and the
    // agent's metrics output are checked with it (tests/tests/deploy.rs).
    ("prometheus", false),
    ("tcpdump", true),
    ("haproxy", true),
    ("wrk", true),
];

/// Where step lines go. `setup` prints every line on stdout; the implicit
/// checks of `build`/`run` only report (on stderr) what they install.
pub struct Ui {
    pub verbose: bool,
}

impl Ui {
    fn ok(&self, msg: impl AsRef<str>) {
        if self.verbose {
            println!("ok: {}", msg.as_ref());
        }
    }

    fn installing(&self, msg: impl AsRef<str>) {
        if self.verbose {
            println!("installing: {}", msg.as_ref());
        } else {
            eprintln!("installing: {}", msg.as_ref());
        }
    }

    fn warn(&self, msg: impl AsRef<str>) {
        eprintln!("warning: {}", msg.as_ref());
    }
}

/// Every step: privileges, toolchain, Debian packages, bpffs.
pub fn full(ctx: &Ctx, ui: &Ui) -> Result<()> {
    privileges(ctx, ui);
    toolchain(ctx, ui)?;
    packages(ctx, ui)?;
    bpffs(ctx, ui)?;
    Ok(())
}

/// The cheap steps the build needs: nightly, rust-src, bpf-linker.
pub fn toolchain(ctx: &Ctx, ui: &Ui) -> Result<()> {
    nightly(ctx, ui)?;
    rust_src(ctx, ui)?;
    bpf_linker(ctx, ui)?;
    Ok(())
}

fn privileges(ctx: &Ctx, ui: &Ui) {
    let msg = format!("privileges: {}", ctx.privilege.describe());
    if let Privilege::Unprivileged { .. } = ctx.privilege {
        ui.warn(msg);
    } else {
        ui.ok(msg);
    }
}

fn nightly(ctx: &Ctx, ui: &Ui) -> Result<()> {
    let list = output(ctx.cmd("rustup").args(["toolchain", "list"]))
        .context("rustup is needed (https://rustup.rs)")?;
    let present = list.lines().any(|line| {
        let name = line.split_whitespace().next().unwrap_or("");
        name == "nightly" || name.starts_with("nightly-")
    });
    if present {
        ui.ok("nightly toolchain");
        return Ok(());
    }
    ui.installing("nightly toolchain");
    run(ctx
        .cmd("rustup")
        .args(["toolchain", "install", "nightly", "--profile", "minimal"]))
}

fn nightly_sysroot(ctx: &Ctx) -> Result<PathBuf> {
    let sysroot = output(ctx.cmd("rustc").args(["+nightly", "--print", "sysroot"]))?;
    Ok(PathBuf::from(sysroot.trim()))
}

/// `rustc +nightly -vV` field (`commit-hash`, `LLVM version`, ...).
fn nightly_version_field(ctx: &Ctx, field: &str) -> Result<String> {
    let vv = output(ctx.cmd("rustc").args(["+nightly", "-vV"]))?;
    vv.lines()
        .find_map(|line| line.strip_prefix(field)?.strip_prefix(':'))
        .map(|v| v.trim().to_string())
        .with_context(|| format!("no `{field}` in `rustc +nightly -vV`"))
}

fn rust_src(ctx: &Ctx, ui: &Ui) -> Result<()> {
    let src = nightly_sysroot(ctx)?.join("lib/rustlib/src/rust");
    let marker = src.join("library/core/Cargo.toml");
    if marker.is_file() {
        ui.ok("rust-src for nightly");
        return Ok(());
    }
    ui.installing("rust-src for nightly");
    let added =
        run(ctx
            .cmd("rustup")
            .args(["component", "add", "rust-src", "--toolchain", "nightly"]));
    let failure = match added {
        Err(e) => Some(format!("{e:#}")),
        Ok(()) if !marker.is_file() => Some(format!(
            "rustup reports rust-src installed, but {} is missing",
            marker.display()
        )),
        Ok(()) => None,
    };
    if let Some(failure) = failure {
        ui.warn(format!("{failure}; falling back to the vendored rust-src"));
        let commit = nightly_version_field(ctx, "commit-hash")?;
        if !commit.starts_with(RUST_SRC_COMMIT) {
            bail!(
                "cannot install rust-src: rustup failed, and the vendored component is for \
                 nightly {RUST_SRC_COMMIT} while the installed nightly is {commit}"
            );
        }
        let tarball = ctx
            .root
            .parent()
            .context("workspace root has no parent")?
            .join(RUST_SRC_TARBALL);
        if !tarball.is_file() {
            bail!(
                "cannot install rust-src: rustup failed and {} does not exist",
                tarball.display()
            );
        }
        // The tarball holds `library/` and `src/` at its top level.
        fs::create_dir_all(&src).with_context(|| format!("cannot create {}", src.display()))?;
        run(ctx.cmd("tar").arg("-xJf").arg(&tarball).arg("-C").arg(&src))?;
    }
    if !marker.is_file() {
        bail!("rust-src installed, but {} is missing", marker.display());
    }
    Ok(())
}

/// `bpf-linker --version` of the first bpf-linker in the children's PATH
/// (cargo's bin directories come first), if it runs.
fn bpf_linker_version(ctx: &Ctx) -> Option<(PathBuf, String)> {
    let bin = find_in_path("bpf-linker", &ctx.path)?;
    let version = output(ctx.cmd(&bin).arg("--version")).ok()?;
    Some((bin, version.trim().to_string()))
}

fn bpf_linker(ctx: &Ctx, ui: &Ui) -> Result<()> {
    let found = bpf_linker_version(ctx);
    if let Some((bin, version)) = found
        .as_ref()
        .filter(|(_, version)| version.starts_with(BPF_LINKER_ACCEPTED))
    {
        ui.ok(format!("{version} ({})", bin.display()));
        return Ok(());
    }
    let why = match &found {
        Some((bin, version)) => format!("found `{version}` at {}", bin.display()),
        None => "not found or does not run".to_string(),
    };
    ui.installing(format!(
        "bpf-linker {BPF_LINKER_VERSION} against the nightly's LLVM ({why})"
    ));

    // Link the nightly's own libLLVM into a prefix that bpf-linker's build
    // (llvm-sys) accepts: lib/libLLVM.so plus the soname the binary asks for.
    let sysroot = nightly_sysroot(ctx)?;
    let libdir = sysroot.join("lib");
    let lib = find_libllvm(&libdir)?;
    let major = nightly_version_field(ctx, "LLVM version")?
        .split('.')
        .next()
        .unwrap_or("")
        .to_string();
    if major.is_empty() || !major.bytes().all(|b| b.is_ascii_digit()) {
        bail!("cannot read the LLVM major version from `rustc +nightly -vV`");
    }
    let prefix = ctx.home.join(LLVM_PREFIX);
    let prefix_lib = prefix.join("lib");
    fs::create_dir_all(&prefix_lib)
        .with_context(|| format!("cannot create {}", prefix_lib.display()))?;
    let target = libdir.join(&lib);
    force_symlink(&target, &prefix_lib.join("libLLVM.so"))?;
    force_symlink(&target, &prefix_lib.join(&lib))?;

    let install = |locked: bool| {
        let mut cmd = ctx.cmd(&ctx.cargo);
        // Outside the workspace, so its .cargo/config.toml does not apply.
        cmd.current_dir(&prefix)
            .env("LLVM_PREFIX", &prefix)
            .args(["install", "bpf-linker", "--version", BPF_LINKER_VERSION])
            .args(["--no-default-features", "--features"])
            .arg(format!("llvm-{major}"))
            // Replace a binary that no longer runs (e.g. nightly updated).
            .arg("--force");
        if locked {
            cmd.arg("--locked");
        }
        run(&mut cmd)
    };
    if let Err(e) = install(true) {
        ui.warn(format!("{e:#}; retrying without --locked"));
        install(false)?;
    }

    match bpf_linker_version(ctx) {
        Some((_, version)) if version.starts_with(BPF_LINKER_ACCEPTED) => Ok(()),
        Some((bin, version)) => bail!(
            "bpf-linker installed, but {} reports `{version}` (is another bpf-linker earlier \
             in PATH?)",
            bin.display()
        ),
        None => bail!(
            "bpf-linker installed, but `bpf-linker --version` does not run (expected in {})",
            ctx.cargo_home.join("bin").display()
        ),
    }
}

/// File name of the nightly's libLLVM (`libLLVM.so.22.1-rust-…`).
fn find_libllvm(libdir: &Path) -> Result<String> {
    let mut names: Vec<String> = fs::read_dir(libdir)
        .with_context(|| format!("cannot read {}", libdir.display()))?
        .filter_map(|e| e.ok()?.file_name().into_string().ok())
        .collect();
    names.sort();
    names
        .iter()
        .find(|n| n.starts_with("libLLVM.so."))
        .or_else(|| {
            names
                .iter()
                .find(|n| n.starts_with("libLLVM-") && n.ends_with(".so"))
        })
        .cloned()
        .with_context(|| {
            format!(
                "no libLLVM in {}: the nightly toolchain should ship it",
                libdir.display()
            )
        })
}

/// `ln -sf target link`.
fn force_symlink(target: &Path, link: &Path) -> Result<()> {
    if fs::symlink_metadata(link).is_ok() {
        fs::remove_file(link).with_context(|| format!("cannot remove {}", link.display()))?;
    }
    std::os::unix::fs::symlink(target, link)
        .with_context(|| format!("cannot link {} -> {}", link.display(), target.display()))
}

fn package_installed(ctx: &Ctx, pkg: &str) -> bool {
    output(ctx.cmd("dpkg-query").args(["-W", "-f=${Status}", pkg]))
        .map(|status| status.contains("install ok installed"))
        .unwrap_or(false)
}

/// True when apt has no package lists yet (fresh container images).
fn apt_lists_empty() -> bool {
    match fs::read_dir("/var/lib/apt/lists") {
        Ok(entries) => !entries
            .filter_map(|e| e.ok())
            .any(|e| e.file_name().to_string_lossy().contains("_Packages")),
        Err(_) => true,
    }
}

fn apt_update(ctx: &Ctx) -> Result<()> {
    run(ctx
        .privileged("apt-get", "installing Debian packages")?
        .args(["-q", "update"]))
}

fn apt_install(ctx: &Ctx, pkgs: &[&str]) -> Result<()> {
    run(ctx
        .privileged("apt-get", "installing Debian packages")?
        .env("DEBIAN_FRONTEND", "noninteractive")
        .args([
            "-q",
            "-o",
            "DPkg::Lock::Timeout=300",
            "install",
            "-y",
            "--no-install-recommends",
        ])
        .args(pkgs))
}

fn packages(ctx: &Ctx, ui: &Ui) -> Result<()> {
    if find_in_path("dpkg-query", &ctx.path).is_none() {
        bail!("dpkg-query not found: `cargo xtask setup` supports Debian-based machines only");
    }
    let missing: Vec<&str> = PACKAGES
        .iter()
        .map(|(pkg, _)| *pkg)
        .filter(|pkg| !package_installed(ctx, pkg))
        .collect();
    let all: Vec<&str> = PACKAGES.iter().map(|(pkg, _)| *pkg).collect();
    if missing.is_empty() {
        ui.ok(format!("debian packages: {}", all.join(" ")));
        return Ok(());
    }
    ui.installing(format!("debian packages: {}", missing.join(" ")));
    // Fail early with a clear message if we cannot become root.
    ctx.privileged("apt-get", "installing Debian packages")?;

    let mut updated = false;
    if apt_lists_empty() {
        apt_update(ctx)?;
        updated = true;
    }
    if apt_install(ctx, &missing).is_ok() {
        return Ok(());
    }
    if !updated {
        ui.warn("apt-get install failed; running apt-get update and retrying");
        apt_update(ctx)?;
        if apt_install(ctx, &missing).is_ok() {
            return Ok(());
        }
    }
    // One by one, so that an unavailable optional package does not stop the
    // others.
    let mut failed_required = Vec::new();
    for pkg in &missing {
        if apt_install(ctx, &[pkg]).is_ok() {
            continue;
        }
        let optional = PACKAGES.iter().any(|(p, opt)| p == pkg && *opt);
        if optional {
            ui.warn(format!(
                "optional package `{pkg}` could not be installed; continuing without it"
            ));
        } else {
            failed_required.push(*pkg);
        }
    }
    if !failed_required.is_empty() {
        bail!(
            "required Debian packages could not be installed: {}",
            failed_required.join(" ")
        );
    }
    Ok(())
}

fn bpffs_mounted() -> Result<bool> {
    let mounts = fs::read_to_string("/proc/mounts").context("cannot read /proc/mounts")?;
    Ok(mounts.lines().any(|line| {
        let mut fields = line.split_whitespace();
        let _source = fields.next();
        fields.next() == Some(BPFFS) && fields.next() == Some("bpf")
    }))
}

fn bpffs(ctx: &Ctx, ui: &Ui) -> Result<()> {
    if bpffs_mounted()? {
        ui.ok(format!("bpffs mounted at {BPFFS}"));
        return Ok(());
    }
    ui.installing(format!("bpffs at {BPFFS}"));
    if !Path::new(BPFFS).is_dir() {
        run(ctx
            .privileged("mkdir", "mounting bpffs")?
            .args(["-p", BPFFS]))?;
    }
    run(ctx
        .privileged("mount", "mounting bpffs")?
        .args(["-t", "bpf", "bpf", BPFFS]))?;
    if !bpffs_mounted()? {
        bail!("`mount -t bpf bpf {BPFFS}` succeeded but no bpf mount is listed in /proc/mounts");
    }
    Ok(())
}
