//! Issue 9, items 5, 8 and 11, in network namespaces with the real agent:
//! the control socket's permissions and bounds, one agent per instance,
//! and a failed start that leaves nothing behind. Needs root; each test
//! builds its own topology and removes it, also when it fails.

use std::{
    io::{Read as _, Write as _},
    net::Ipv4Addr,
    os::unix::{
        fs::PermissionsExt as _,
        net::UnixStream,
        process::{CommandExt as _, ExitStatusExt as _},
    },
    path::{Path, PathBuf},
    process::{Command, Output, Stdio},
    thread,
    time::{Duration, Instant},
};

use anyhow::{Context as _, Result, bail, ensure};
use lb_tests::{
    agent::{AgentPaths, LbAgent, METRICS_LISTEN, VipSpec, lb_binary, lb_in_ns, render_config},
    netns::{ChildGuard, Topology},
    require_root,
    servers::{ServerKind, spawn_on_backends},
};

const PORT: u16 = 80;
/// uid and gid of `nobody`.
const NOBODY: u32 = 65534;

fn backends(topo: &Topology) -> Vec<Ipv4Addr> {
    (0..topo.backend_count())
        .map(|i| topo.backend_addr(i))
        .collect()
}

/// A topology with HTTP servers and an agent in front.
struct Setup {
    // Field order is drop order: agent and servers before the namespaces.
    agent: LbAgent,
    _servers: Vec<ChildGuard>,
    topo: Topology,
}

fn setup(n: usize) -> Result<Setup> {
    require_root();
    let topo = Topology::with_backends(n)?;
    let servers = spawn_on_backends(&topo, ServerKind::Http, PORT)?;
    let vip = VipSpec::tcp("web", topo.vip(), PORT, &backends(&topo));
    let agent = LbAgent::start(topo.lb_ns(), &topo.lb_iface(), &[vip])?;
    Ok(Setup {
        agent,
        _servers: servers,
        topo,
    })
}

/// Restores the process's umask on drop.
struct Umask(libc::mode_t);

impl Umask {
    fn set(mask: libc::mode_t) -> Self {
        // SAFETY: umask has no preconditions.
        Umask(unsafe { libc::umask(mask) })
    }
}

impl Drop for Umask {
    fn drop(&mut self) {
        // SAFETY: as above.
        unsafe { libc::umask(self.0) };
    }
}

/// `lb --socket S ARGS` as user nobody.
fn cli_as_nobody(socket: &Path, args: &[&str]) -> Result<Output> {
    let mut cmd = Command::new(lb_binary());
    cmd.arg("--socket").arg(socket).args(args);
    cmd.uid(NOBODY).gid(NOBODY).stdin(Stdio::null());
    cmd.output().context("running lb as nobody")
}

fn agent_pid(agent: &LbAgent) -> Result<u32> {
    let pid = agent.json(&["status"])?["pid"].as_u64().unwrap_or(0);
    ensure!(pid > 1, "lb status names no pid");
    Ok(pid as u32)
}

/// A `VmRSS`/`VmHWM`-style field of /proc/PID/status, in KiB.
fn proc_kib(pid: u32, field: &str) -> Result<u64> {
    let text = std::fs::read_to_string(format!("/proc/{pid}/status"))?;
    text.lines()
        .find_map(|l| l.strip_prefix(field))
        .and_then(|v| v.trim_start_matches(':').split_whitespace().next())
        .and_then(|v| v.parse().ok())
        .with_context(|| format!("no {field} in /proc/{pid}/status"))
}

fn backend_state(agent: &LbAgent, addr: Ipv4Addr) -> Result<String> {
    let list = agent.json(&["backend", "list"])?;
    list.as_array()
        .into_iter()
        .flatten()
        .find(|b| b["address"] == addr.to_string())
        .map(|b| b["state"].as_str().unwrap_or("").to_string())
        .with_context(|| format!("{addr} not listed: {list}"))
}

#[test]
fn the_control_socket_is_private_and_a_non_root_user_cannot_drain() -> Result<()> {
    require_root();
    let topo = Topology::with_backends(2)?;
    let _servers = spawn_on_backends(&topo, ServerKind::Http, PORT)?;
    let vip = VipSpec::tcp("web", topo.vip(), PORT, &backends(&topo));
    let agent = {
        // The most permissive umask: the socket must still be 0600.
        let _umask = Umask::set(0);
        LbAgent::start(topo.lb_ns(), &topo.lb_iface(), &[vip])?
    };
    let mode = std::fs::metadata(&agent.socket)?.permissions().mode() & 0o7777;
    ensure!(
        mode == 0o600,
        "control socket mode {mode:o} under umask 000"
    );
    // Nobody cannot even connect.
    let out = cli_as_nobody(&agent.socket, &["status"])?;
    ensure!(
        !out.status.success() && String::from_utf8_lossy(&out.stderr).contains("permission denied"),
        "nobody ran lb status on a 0600 socket: {out:?}"
    );
    // Made world-writable by mistake: reading is allowed, changing is not
    // (the agent checks the peer's credentials).
    std::fs::set_permissions(&agent.socket, std::fs::Permissions::from_mode(0o666))?;
    let addr = topo.backend_addr(0);
    let out = cli_as_nobody(&agent.socket, &["status"])?;
    ensure!(
        out.status.success(),
        "nobody could not read status: {out:?}"
    );
    let out = cli_as_nobody(
        &agent.socket,
        &["backend", "drain", "web", &addr.to_string()],
    )?;
    let err = String::from_utf8_lossy(&out.stderr);
    ensure!(
        !out.status.success() && err.contains("permission denied") && err.contains("root"),
        "nobody's drain was not refused: {out:?}"
    );
    let state = backend_state(&agent, addr)?;
    ensure!(state == "active", "{addr} is {state} after nobody's drain");
    ensure!(
        agent
            .log_text()
            .contains("refused `backend drain` from uid 65534"),
        "the agent did not log the refusal:\n{}",
        agent.log_text()
    );
    // Root still may.
    agent.cli_ok(&["backend", "drain", "web", &addr.to_string()])?;
    ensure!(backend_state(&agent, addr)? == "drain");
    Ok(())
}

#[test]
fn a_request_line_without_newline_does_not_grow_the_agent() -> Result<()> {
    let s = setup(1)?;
    let pid = agent_pid(&s.agent)?;
    // Let the start-up settle, then take the high-water mark of its RSS.
    thread::sleep(Duration::from_millis(500));
    let hwm_before = proc_kib(pid, "VmHWM")?;
    const FLOOD: usize = 200 << 20;
    let floods: Vec<_> = (0..3)
        .map(|_| {
            let socket = s.agent.socket.clone();
            thread::spawn(move || -> Result<(usize, String)> {
                let mut c = UnixStream::connect(&socket)?;
                c.set_write_timeout(Some(Duration::from_secs(5)))?;
                c.set_read_timeout(Some(Duration::from_secs(5)))?;
                let chunk = vec![b'x'; 1 << 20];
                let mut sent = 0;
                while sent < FLOOD {
                    match c.write(&chunk) {
                        Ok(n) => sent += n,
                        Err(_) => break,
                    }
                }
                let mut reply = Vec::new();
                let _ = c.read_to_end(&mut reply);
                Ok((sent, String::from_utf8_lossy(&reply).into_owned()))
            })
        })
        .collect();
    // lb status answers meanwhile.
    for _ in 0..5 {
        let t = Instant::now();
        s.agent.cli_ok(&["status"])?;
        ensure!(
            t.elapsed() < Duration::from_secs(5),
            "lb status took {:?} during the flood",
            t.elapsed()
        );
    }
    for f in floods {
        let (sent, reply) = f.join().expect("flood thread")?;
        ensure!(
            sent < FLOOD,
            "the agent accepted all {sent} bytes of one request line"
        );
        ensure!(
            reply.contains("longer than 65536 bytes"),
            "reply to an overlong line: {reply:?}"
        );
    }
    let hwm_after = proc_kib(pid, "VmHWM")?;
    let grown_mib = hwm_after.saturating_sub(hwm_before) as f64 / 1024.0;
    println!("agent peak RSS: {hwm_before} KiB before, {hwm_after} KiB after ({grown_mib:.1} MiB)");
    ensure!(
        grown_mib < 8.0,
        "the agent's peak RSS grew by {grown_mib:.1} MiB"
    );
    ensure!(s.agent.log_text().contains("longer than 65536 bytes"));
    s.agent.cli_ok(&["status"])?;
    Ok(())
}

#[test]
fn the_cli_ends_quietly_when_its_reader_goes_away() -> Result<()> {
    let s = setup(1)?;
    // `lb backend list | head -0`: stdout is a pipe nobody reads.
    let (reader, writer) = std::io::pipe()?;
    drop(reader);
    let out = Command::new(lb_binary())
        .arg("--socket")
        .arg(&s.agent.socket)
        .args(["backend", "list"])
        .stdin(Stdio::null())
        .stdout(writer)
        .stderr(Stdio::piped())
        .output()?;
    let err = String::from_utf8_lossy(&out.stderr);
    ensure!(
        err.is_empty() && (out.status.success() || out.status.signal() == Some(libc::SIGPIPE)),
        "lb backend list into a closed pipe: {} {err}",
        out.status
    );
    // A reader that stays gets the list.
    let list = s.agent.cli_ok(&["backend", "list"])?;
    ensure!(list.contains(&s.topo.backend_addr(0).to_string()), "{list}");
    Ok(())
}

/// Runs `cmd` (stdout and stderr captured) and waits for it to exit within
/// `timeout`; a process still running then is killed and is an error.
fn run_to_exit(mut cmd: Command, timeout: Duration) -> Result<Output> {
    cmd.stdout(Stdio::piped()).stderr(Stdio::piped());
    let mut child = cmd.spawn().context("starting lb")?;
    let deadline = Instant::now() + timeout;
    loop {
        if child.try_wait()?.is_some() {
            return Ok(child.wait_with_output()?);
        }
        if Instant::now() >= deadline {
            let _ = child.kill();
            let out = child.wait_with_output()?;
            bail!(
                "lb run was still running after {timeout:?}:\n{}",
                String::from_utf8_lossy(&out.stderr)
            );
        }
        thread::sleep(Duration::from_millis(50));
    }
}

fn lock_file(instance: &str) -> PathBuf {
    Path::new("/run/lb").join(format!("{instance}.lock"))
}

#[test]
fn a_second_agent_for_the_same_instance_exits_naming_the_first() -> Result<()> {
    let s = setup(1)?;
    let pid = agent_pid(&s.agent)?;
    // Same instance, another socket and no metrics port: only the
    // instance is shared.
    let dir = AgentPaths::new()?;
    let text = std::fs::read_to_string(&s.agent.config)?
        .replace(
            &format!("control_socket = \"{}\"", s.agent.socket.display()),
            &format!("control_socket = \"{}\"", dir.socket.display()),
        )
        .replace(&format!("metrics_listen = \"{METRICS_LISTEN}\"\n"), "");
    ensure!(text.contains(&dir.socket.display().to_string()));
    std::fs::write(&dir.config, &text)?;
    let mut cmd = lb_in_ns(s.topo.lb_ns().name());
    cmd.arg("run").arg("--config").arg(&dir.config);
    let out = run_to_exit(cmd, Duration::from_secs(20));
    let _ = std::fs::remove_dir_all(&dir.dir);
    let out = out?;
    let err = String::from_utf8_lossy(&out.stderr);
    ensure!(!out.status.success(), "a second agent ran: {err}");
    ensure!(
        err.contains(&format!("pid {pid}")) && err.contains(&s.agent.instance),
        "the error does not name the instance and the running agent's pid {pid}: {err}"
    );
    ensure!(
        !dir.socket.exists(),
        "the refused agent left its socket behind"
    );
    // The first agent is untouched: it answers, its lock names it.
    ensure!(agent_pid(&s.agent)? == pid);
    let lock = std::fs::read_to_string(lock_file(&s.agent.instance))?;
    ensure!(lock.trim() == pid.to_string(), "lock file says {lock:?}");
    Ok(())
}

/// The XDP programs attached to `iface` in `topo`'s lb namespace.
fn has_xdp(topo: &Topology, iface: &str) -> Result<bool> {
    let link = topo.lb_ns().ip(["link", "show", iface])?;
    Ok(String::from_utf8_lossy(&link.stdout).contains("xdp"))
}

/// What a failed fresh start must not leave: XDP on `ifaces`, pins, the
/// socket file, the lock file.
fn ensure_nothing_left(topo: &Topology, paths: &AgentPaths, ifaces: &[&str]) -> Result<()> {
    for iface in ifaces {
        ensure!(!has_xdp(topo, iface)?, "XDP left attached to {iface}");
    }
    let pins = Path::new("/sys/fs/bpf/lb").join(&paths.instance);
    ensure!(!pins.exists(), "pins left in {}", pins.display());
    ensure!(
        !paths.socket.exists(),
        "socket left at {}",
        paths.socket.display()
    );
    let lock = lock_file(&paths.instance);
    ensure!(!lock.exists(), "lock left at {}", lock.display());
    Ok(())
}

/// Removes pins of an instance on drop (in case a test fails half-way).
struct PinsGuard(PathBuf);

impl Drop for PinsGuard {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}

#[test]
fn a_start_that_fails_on_a_taken_metrics_port_leaves_nothing_behind() -> Result<()> {
    require_root();
    let topo = Topology::with_backends(1)?;
    let paths = AgentPaths::new()?;
    let _pins = PinsGuard(Path::new("/sys/fs/bpf/lb").join(&paths.instance));
    let text = render_config(
        &paths.instance,
        &paths.socket,
        &topo.lb_iface(),
        &[VipSpec::tcp("web", topo.vip(), PORT, &backends(&topo))],
    );
    std::fs::write(&paths.config, &text)?;
    // Someone else holds the metrics port in the lb namespace.
    let taken = topo
        .lb_ns()
        .run(|| std::net::TcpListener::bind(METRICS_LISTEN))??;
    let mut cmd = lb_in_ns(topo.lb_ns().name());
    cmd.arg("run").arg("--config").arg(&paths.config);
    let out = run_to_exit(cmd, Duration::from_secs(20))?;
    drop(taken);
    let err = String::from_utf8_lossy(&out.stderr);
    ensure!(!out.status.success(), "lb run succeeded: {err}");
    ensure!(
        err.contains("metrics"),
        "the error does not name the metrics port: {err}"
    );
    ensure_nothing_left(&topo, &paths, &[&topo.lb_iface()])?;
    let _ = std::fs::remove_dir_all(&paths.dir);
    Ok(())
}

#[test]
fn a_second_interface_that_fails_to_attach_undoes_the_first() -> Result<()> {
    require_root();
    let topo = Topology::with_backends(1)?;
    let paths = AgentPaths::new()?;
    let _pins = PinsGuard(Path::new("/sys/fs/bpf/lb").join(&paths.instance));
    let iface = topo.lb_iface();
    // Native XDP works on the veth and not on lo (no driver support).
    let text = render_config(
        &paths.instance,
        &paths.socket,
        &iface,
        &[VipSpec::tcp("web", topo.vip(), PORT, &backends(&topo))],
    )
    .replace(
        &format!("interfaces = [\"{iface}\"]"),
        &format!("interfaces = [\"{iface}\", \"lo\"]\nxdp_mode = \"native\""),
    );
    ensure!(text.contains("\"lo\""));
    std::fs::write(&paths.config, &text)?;
    let mut cmd = lb_in_ns(topo.lb_ns().name());
    cmd.arg("run").arg("--config").arg(&paths.config);
    let out = run_to_exit(cmd, Duration::from_secs(20))?;
    let err = String::from_utf8_lossy(&out.stderr);
    ensure!(!out.status.success(), "lb run succeeded: {err}");
    ensure!(err.contains("lo"), "the error does not name lo: {err}");
    ensure!(
        err.contains(&format!("{iface}: detached again")),
        "the first interface was not detached: {err}"
    );
    ensure_nothing_left(&topo, &paths, &[&iface, "lo"])?;

    // A data path taken over from an earlier agent is left as found: a
    // good start with --keep-datapath, then the same failing start.
    let good = text.replace(
        &format!("interfaces = [\"{iface}\", \"lo\"]"),
        &format!("interfaces = [\"{iface}\"]"),
    );
    let mut agent = LbAgent::start_with(
        topo.lb_ns(),
        AgentPaths {
            instance: paths.instance.clone(),
            socket: paths.socket.clone(),
            config: paths.config.clone(),
            dir: paths.dir.clone(),
        },
        &good,
        &["--keep-datapath"],
    )?;
    agent.stop()?;
    ensure!(has_xdp(&topo, &iface)?, "--keep-datapath left no XDP");
    std::fs::write(&paths.config, &text)?;
    let mut cmd = lb_in_ns(topo.lb_ns().name());
    cmd.arg("run").arg("--config").arg(&paths.config);
    let out = run_to_exit(cmd, Duration::from_secs(20))?;
    let err = String::from_utf8_lossy(&out.stderr);
    ensure!(!out.status.success(), "lb run succeeded: {err}");
    ensure!(has_xdp(&topo, &iface)?, "the taken-over link was detached");
    let pins = agent.pin_dir();
    ensure!(
        pins.join(format!("link_{iface}")).exists(),
        "the taken-over link's pin was removed"
    );
    ensure!(!has_xdp(&topo, "lo")?, "XDP left on lo");
    ensure!(!paths.socket.exists(), "socket left behind");
    ensure!(!lock_file(&paths.instance).exists(), "lock left behind");
    Ok(())
}
