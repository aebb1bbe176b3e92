//! The pinned state of an instance (`/sys/fs/bpf/lb/<instance>/`) across
//! agent restarts, with the real agent in network namespaces: the layout
//! record and its checks, `--reset-datapath`, the pin directory's mode and
//! owner, and pinned links after the interface was re-created or renamed.
//! Needs root; every test removes its namespaces and pins, also on failure.

use std::{
    net::SocketAddrV4,
    os::unix::fs::{MetadataExt as _, PermissionsExt as _},
    path::Path,
    process::Stdio,
    time::Duration,
};

use anyhow::{Context as _, Result, bail, ensure};
use lb::pins::{self, LAYOUT_PIN, Layout};
use lb_tests::{
    agent::{AgentPaths, LbAgent, VipSpec, lb_in_ns, render_config},
    netns::{ChildGuard, Topology, spawn_guarded},
    require_root,
    servers::{ServerKind, http_get_from, spawn_on_backends},
};

const PORT: u16 = 80;
const T: Duration = Duration::from_secs(3);

/// A topology with HTTP servers on its backends and an agent (not yet
/// started) configured for it.
struct Setup {
    // Field order is drop order: servers before the namespaces.
    servers: Vec<ChildGuard>,
    topo: Topology,
}

fn setup(backends: usize) -> Result<Setup> {
    require_root();
    let topo = Topology::with_backends(backends)?;
    let servers = spawn_on_backends(&topo, ServerKind::Http, PORT)?;
    Ok(Setup { servers, topo })
}

impl Setup {
    fn vip(&self) -> VipSpec {
        let backends: Vec<_> = (0..self.topo.backend_count())
            .map(|i| self.topo.backend_addr(i))
            .collect();
        VipSpec::tcp("web", self.topo.vip(), PORT, &backends)
    }

    fn config(&self, paths: &AgentPaths) -> String {
        render_config(
            &paths.instance,
            &paths.socket,
            &self.topo.lb_iface(),
            &[self.vip()],
        )
    }

    /// `n` GETs through the VIP from distinct source ports; all must be
    /// answered (the lb namespace does not forward: only lb's XDP program
    /// can carry them).
    fn get_through_lb(&self, first_port: u16, n: u16) -> Result<()> {
        let _ = &self.servers;
        let vip = SocketAddrV4::new(self.topo.vip(), PORT);
        self.topo.client_ns().run(move || -> Result<()> {
            for p in first_port..first_port + n {
                let body =
                    http_get_from(Some(p), vip, T).with_context(|| format!("GET from port {p}"))?;
                ensure!(body.starts_with("backend-"), "port {p}: {body:?}");
            }
            Ok(())
        })?
    }

    /// Whether an XDP program is attached to `iface` in the lb namespace.
    fn xdp_on(&self, iface: &str) -> Result<bool> {
        let out = self.topo.lb_ns().ip(["link", "show", iface])?;
        Ok(String::from_utf8_lossy(&out.stdout).contains("prog/xdp"))
    }

    fn ifindex(&self, iface: &str) -> Result<u64> {
        let out = self.topo.lb_ns().ip(["-o", "link", "show", iface])?;
        let text = String::from_utf8_lossy(&out.stdout);
        text.split(':')
            .next()
            .and_then(|i| i.trim().parse().ok())
            .with_context(|| format!("no ifindex in {text:?}"))
    }
}

fn mode_of(path: &Path) -> Result<u32> {
    Ok(std::fs::symlink_metadata(path)
        .with_context(|| format!("{}", path.display()))?
        .mode()
        & 0o7777)
}

fn pinned_max_entries(dir: &Path, map: &str) -> Result<u32> {
    Ok(aya::maps::MapInfo::from_pin(dir.join(map))?.max_entries())
}

/// Item 9: the pin directory records its layout; an agent with other
/// sizes or another layout version refuses, naming what differs and the
/// way out, and changes nothing; `--reset-datapath` starts over.
#[test]
fn pins_of_another_layout_are_refused_until_reset() -> Result<()> {
    let s = setup(1)?;
    let paths = AgentPaths::new()?;
    let text = s.config(&paths);
    let mut agent = LbAgent::start_with(s.topo.lb_ns(), paths, &text, &["--keep-datapath"])?;
    let dir = agent.pin_dir();
    ensure!(dir.join(LAYOUT_PIN).exists(), "no layout record pinned");
    let record = pins::read_record(&dir)?;
    ensure!(
        record.get("conntrack_entries") == Some("65536"),
        "{record:?}"
    );
    // The IPv6 maps are created and pinned with the others, CONNTRACK6
    // sized like CONNTRACK, VIPS6 like VIPS.
    ensure!(pinned_max_entries(&dir, "CONNTRACK6")? == 65536);
    ensure!(pinned_max_entries(&dir, "VIPS6")? == pinned_max_entries(&dir, "VIPS")?);
    s.get_through_lb(20_000, 5)?;
    let log = agent.stop()?;
    ensure!(log.contains("left attached"), "agent log:\n{log}");

    // Other sizes: refused, nothing changed, the kept data path forwards.
    std::fs::write(
        &agent.config,
        text.replace("conntrack_entries = 65536", "conntrack_entries = 32768"),
    )?;
    let out = run_refused(&s, &agent.config)?;
    ensure!(
        out.contains(
            "conntrack_entries: pinned 65536, this agent 32768 ([agent] conntrack_entries)"
        ) && out.contains(&dir.display().to_string())
            && out.contains("lb run --reset-datapath"),
        "refusal does not say what differs and how to proceed:\n{out}"
    );
    ensure!(
        pinned_max_entries(&dir, "CONNTRACK")? == 65536,
        "CONNTRACK changed"
    );
    ensure!(pins::read_record(&dir)? == record, "record changed");
    ensure!(
        s.xdp_on(&s.topo.lb_iface())?,
        "the kept XDP link was removed"
    );
    s.get_through_lb(20_100, 5)?;

    // Same sizes, another layout version: refused.
    std::fs::write(&agent.config, &text)?;
    let version = format!("layout_version {}\n", lb_common::LAYOUT_VERSION);
    let old = Layout::parse(&record.render().replace(&version, "layout_version 0\n"))
        .map_err(anyhow::Error::msg)?;
    std::fs::remove_file(dir.join(LAYOUT_PIN))?;
    pins::write_record(&dir, &old)?;
    let out = run_refused(&s, &agent.config)?;
    ensure!(
        out.contains(&format!(
            "layout_version: pinned 0, this agent {} (made by another lb version)",
            lb_common::LAYOUT_VERSION
        )),
        "{out}"
    );

    // No record at all (pins of an lb before records): refused.
    std::fs::remove_file(dir.join(LAYOUT_PIN))?;
    let out = run_refused(&s, &agent.config)?;
    ensure!(
        out.contains("has no layout record") && out.contains("lb run --reset-datapath"),
        "{out}"
    );
    ensure!(
        s.xdp_on(&s.topo.lb_iface())?,
        "the kept XDP link was removed"
    );

    // --reset-datapath with the new sizes: detaches, removes, starts over.
    std::fs::write(
        &agent.config,
        text.replace("conntrack_entries = 65536", "conntrack_entries = 32768"),
    )?;
    agent.spawn(&["--reset-datapath"])?;
    let log = agent.log_text();
    ensure!(
        log.contains("--reset-datapath") && log.contains("XDP link detached"),
        "{log}"
    );
    let status = agent.json(&["status"])?;
    ensure!(status["restored"] == false, "{status}");
    ensure!(pinned_max_entries(&dir, "CONNTRACK")? == 32768);
    ensure!(pins::read_record(&dir)?.get("conntrack_entries") == Some("32768"));
    s.get_through_lb(20_200, 5)?;
    agent.stop()?;
    ensure!(!dir.exists(), "pins left after a clean stop");
    Ok(())
}

/// Item 9: the pin directory is created 0700 whatever the umask; one
/// owned by another user, or writable by others, is refused before
/// anything is loaded or attached.
#[test]
fn the_pin_directory_is_private_and_a_foreign_one_is_refused() -> Result<()> {
    let s = setup(1)?;
    let paths = AgentPaths::new()?;
    let text = s.config(&paths);
    let dir = Path::new("/sys/fs/bpf/lb").join(&paths.instance);
    std::fs::write(&paths.config, &text)?;
    // Whatever happens, remove the directory this test makes.
    let agent_dir = dir.clone();
    let _cleanup = Guard(move || {
        let _ = std::fs::remove_dir_all(&agent_dir);
    });

    for (uid, mode, problem) in [
        (65534, 0o700, "is owned by uid 65534, not by uid 0"),
        (0, 0o777, "has mode 777"),
    ] {
        let _ = std::fs::remove_dir_all(&dir);
        std::fs::create_dir_all(&dir)?;
        std::fs::set_permissions(&dir, std::fs::Permissions::from_mode(mode))?;
        std::os::unix::fs::chown(&dir, Some(uid), Some(uid))?;
        let out = run_refused(&s, &paths.config)?;
        ensure!(
            out.contains(&dir.display().to_string()) && out.contains(problem),
            "refusal does not name the directory and the problem ({problem}):\n{out}"
        );
        ensure!(
            std::fs::read_dir(&dir)?.next().is_none(),
            "something was pinned in the refused directory"
        );
        ensure!(!s.xdp_on(&s.topo.lb_iface())?, "XDP attached");
    }
    std::fs::remove_dir_all(&dir)?;

    // Fresh, under umask 000: still 0700.
    // SAFETY: umask has no preconditions; tests run one at a time.
    let old = unsafe { libc::umask(0) };
    let started = LbAgent::start_with(s.topo.lb_ns(), paths, &text, &[]);
    // SAFETY: as above.
    unsafe { libc::umask(old) };
    let mut agent = started?;
    ensure!(mode_of(&dir)? == 0o700, "pin dir mode {:o}", mode_of(&dir)?);
    ensure!(std::fs::symlink_metadata(&dir)?.uid() == 0);
    s.get_through_lb(21_000, 3)?;
    agent.stop()?;
    Ok(())
}

/// Runs `lb run --config CONFIG` expecting it to refuse to start: returns
/// its output. Running longer than 20 s means it started, which is a
/// failure (it is then stopped).
fn run_refused(s: &Setup, config: &Path) -> Result<String> {
    let out_path = config.with_extension("refused.log");
    let out = std::fs::File::create(&out_path)?;
    let mut cmd = lb_in_ns(s.topo.lb_ns().name());
    cmd.arg("run")
        .arg("--config")
        .arg(config)
        .stdout(Stdio::from(out.try_clone()?))
        .stderr(Stdio::from(out));
    let mut child = spawn_guarded(cmd)?;
    let status = child.wait_timeout(Duration::from_secs(20))?;
    let text = std::fs::read_to_string(&out_path).unwrap_or_default();
    match status {
        None => bail!("lb run started where it had to refuse:\n{text}"),
        Some(st) if st.success() => bail!("lb run exited 0 where it had to refuse:\n{text}"),
        Some(_) => Ok(text),
    }
}

struct Guard<F: FnMut()>(F);

impl<F: FnMut()> Drop for Guard<F> {
    fn drop(&mut self) {
        (self.0)()
    }
}

/// Item 10: `--keep-datapath`, stop, the interface deleted and re-created
/// with the same name (a new ifindex; the pinned link is severed): the
/// next agent replaces the stale link, attaches and forwards.
#[test]
fn a_recreated_interface_gets_a_fresh_link() -> Result<()> {
    let mut s = setup(2)?;
    let paths = AgentPaths::new()?;
    let text = s.config(&paths);
    let iface = s.topo.lb_iface();
    let mut agent = LbAgent::start_with(s.topo.lb_ns(), paths, &text, &["--keep-datapath"])?;
    s.get_through_lb(22_000, 5)?;
    agent.stop()?;
    let before = s.ifindex(&iface)?;
    s.topo.recreate_lb_iface(None)?;
    let after = s.ifindex(&iface)?;
    ensure!(before != after, "ifindex unchanged: {before}");
    let pin = agent.pin_dir().join(format!("link_{iface}"));
    ensure!(
        pins::xdp_link_target(&pin)? == pins::LinkTarget::Severed,
        "the kernel does not report the old link as severed"
    );

    agent.spawn(&[])?;
    let log = agent.log_text();
    ensure!(log.contains("replaced by a fresh attachment"), "{log}");
    ensure!(s.xdp_on(&iface)?, "no XDP program on the new {iface}");
    ensure!(
        pins::xdp_link_target(&pin)? == pins::LinkTarget::Ifindex(after as u32),
        "the pinned link is not on the new interface"
    );
    let status = agent.json(&["status"])?;
    ensure!(status["restored"] == true, "maps not kept: {status}");
    ensure!(
        status["interfaces"][0]["ifindex"] == after,
        "status shows another ifindex: {status}"
    );
    let flows_before = agent.json(&["stats"])?["vips"][0]["new_flows"]
        .as_u64()
        .unwrap_or(0);
    s.get_through_lb(22_100, 20)?;
    let flows = agent.json(&["stats"])?["vips"][0]["new_flows"]
        .as_u64()
        .unwrap_or(0);
    ensure!(
        flows >= flows_before + 20,
        "lb counted {} new flows for 20 connections",
        flows - flows_before
    );
    agent.stop()?;
    ensure!(!s.xdp_on(&iface)?, "still attached after a clean stop");
    ensure!(!agent.pin_dir().exists(), "pins left after a clean stop");
    Ok(())
}

/// Item 10: `--keep-datapath`, stop, the interface renamed and a new one
/// created under its old name: the next agent does not take over the link
/// on the renamed device (it detaches it) and attaches to the device that
/// now bears the configured name.
#[test]
fn a_link_left_on_a_renamed_interface_is_not_taken_over() -> Result<()> {
    let mut s = setup(1)?;
    let paths = AgentPaths::new()?;
    let text = s.config(&paths);
    let iface = s.topo.lb_iface();
    let renamed = format!("{iface}o");
    let mut agent = LbAgent::start_with(s.topo.lb_ns(), paths, &text, &["--keep-datapath"])?;
    s.get_through_lb(23_000, 3)?;
    agent.stop()?;
    s.topo.recreate_lb_iface(Some(&renamed))?;
    ensure!(
        s.xdp_on(&renamed)?,
        "the kept link did not follow the rename"
    );

    agent.spawn(&[])?;
    ensure!(s.xdp_on(&iface)?, "no XDP program on the new {iface}");
    ensure!(
        !s.xdp_on(&renamed)?,
        "lb's program is still on the renamed {renamed}"
    );
    let log = agent.log_text();
    ensure!(
        log.contains(&format!("({renamed}), not to {iface}")),
        "the log does not name the device the stale link was on:\n{log}"
    );
    s.get_through_lb(23_100, 10)?;
    agent.stop()?;
    ensure!(!s.xdp_on(&iface)?, "still attached after a clean stop");
    Ok(())
}

/// Item 10: a link this instance pinned on an interface its configuration
/// no longer names is detached and its pin removed at the next start,
/// rather than left forwarding on a device no agent manages.
#[test]
fn a_link_on_an_interface_no_longer_configured_is_removed() -> Result<()> {
    let s = setup(1)?;
    let paths = AgentPaths::new()?;
    let text = s.config(&paths);
    let iface = s.topo.lb_iface();
    // A second interface for lb (a veth pair inside the lb namespace,
    // removed with it).
    let extra = format!("{iface}x");
    s.topo.lb_ns().ip([
        "link",
        "add",
        &extra,
        "type",
        "veth",
        "peer",
        "name",
        &format!("{iface}y"),
    ])?;
    s.topo.lb_ns().ip(["link", "set", &extra, "up"])?;
    let mut agent = LbAgent::start_with(
        s.topo.lb_ns(),
        paths,
        &text,
        &["--keep-datapath", "--iface", &iface, "--iface", &extra],
    )?;
    agent.stop()?;
    let pin = agent.pin_dir().join(format!("link_{extra}"));
    ensure!(pin.exists() && s.xdp_on(&extra)?, "{extra} not attached");

    agent.spawn(&[])?;
    ensure!(!s.xdp_on(&extra)?, "lb's program is still on {extra}");
    ensure!(!pin.exists(), "{} left behind", pin.display());
    let log = agent.log_text();
    ensure!(log.contains("not among this agent's interfaces"), "{log}");
    ensure!(s.xdp_on(&iface)?, "no XDP program on {iface}");
    s.get_through_lb(24_000, 3)?;
    agent.stop()?;
    Ok(())
}
