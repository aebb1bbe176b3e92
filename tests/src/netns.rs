//! Network-namespace topologies for end-to-end tests and the demo.
//!
//! A [`Topology`] is one L2 segment (a bridge inside a "switch" namespace)
//! with a client, a load-balancer namespace and N backends, each plugged into
//! the bridge by a veth pair created directly inside the namespaces: nothing
//! is ever added to the root namespace. Every namespace is an RAII guard
//! ([`Netns`]) that kills the processes left in it and deletes it on drop,
//! also when the test panics. Child processes are [`ChildGuard`]s, killed
//! (SIGKILL) and reaped on drop.
//!
//! Addresses come from the benchmarking range 198.18.0.0/15 only: topology
//! number `k` (mod 256) uses 198.18.k.0/24 (client .1, lb .2, backends .11,
//! .12, …) and the VIP 198.19.k.1. Namespaces are isolated, so two
//! topologies using the same numbers at once (two test processes) do not
//! clash either.
//!
//! Everything shells out to iproute2 (`ip`), `sysctl` and `ethtool`; each
//! failure is an error naming the command and its stderr, and every command
//! and wait is bounded in time.

use std::{
    collections::HashSet,
    ffi::{OsStr, OsString},
    fs::File,
    io::Read,
    net::{Ipv4Addr, Ipv6Addr},
    os::fd::AsRawFd,
    process::{Child, Command, ExitStatus, Output, Stdio},
    sync::{
        Once,
        atomic::{AtomicU32, Ordering},
        mpsc,
    },
    thread,
    time::{Duration, Instant},
};

use anyhow::{Context, Result, anyhow, bail, ensure};

/// Prefix of every namespace the harness creates: `lbt<pid>-<n>-<role>`.
pub const NAME_PREFIX: &str = "lbt";

/// Default bound for one helper command (`ip`, `sysctl`, `ethtool`, …).
pub const COMMAND_TIMEOUT: Duration = Duration::from_secs(30);

/// Where `ip netns` keeps its namespace handles.
const NETNS_RUN_DIR: &str = "/var/run/netns";

/// Highest number of backends one topology can hold (.11 … .254).
pub const MAX_BACKENDS: usize = 244;

static TOPOLOGY_COUNTER: AtomicU32 = AtomicU32::new(0);
static STALE_CLEANUP: Once = Once::new();

// ---------------------------------------------------------------------------
// Running commands
// ---------------------------------------------------------------------------

fn describe(cmd: &Command) -> String {
    let mut s = cmd.get_program().to_string_lossy().into_owned();
    for a in cmd.get_args() {
        s.push(' ');
        s.push_str(&a.to_string_lossy());
    }
    s
}

/// Runs `cmd` to completion within `timeout`, capturing its output; a
/// non-zero exit, a failure to start, or the timeout is an error naming the
/// command and quoting its stderr.
pub fn run_command(mut cmd: Command, timeout: Duration) -> Result<Output> {
    let desc = describe(&cmd);
    cmd.stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped());
    let mut child = cmd
        .spawn()
        .with_context(|| format!("cannot start `{desc}`"))?;
    let (tx_out, rx_out) = mpsc::channel();
    let (tx_err, rx_err) = mpsc::channel();
    if let Some(mut out) = child.stdout.take() {
        thread::spawn(move || {
            let mut v = Vec::new();
            let _ = out.read_to_end(&mut v);
            let _ = tx_out.send(v);
        });
    }
    if let Some(mut err) = child.stderr.take() {
        thread::spawn(move || {
            let mut v = Vec::new();
            let _ = err.read_to_end(&mut v);
            let _ = tx_err.send(v);
        });
    }
    let deadline = Instant::now() + timeout;
    let mut nap = Duration::from_micros(200);
    let status = loop {
        if let Some(status) = child
            .try_wait()
            .with_context(|| format!("waiting for `{desc}`"))?
        {
            break status;
        }
        if Instant::now() >= deadline {
            let _ = child.kill();
            let _ = child.wait();
            bail!("`{desc}` did not finish within {timeout:?} and was killed");
        }
        thread::sleep(nap);
        nap = (nap * 2).min(Duration::from_millis(20));
    };
    // Output pipes close when the process exits, unless it left a
    // descendant holding them: wait a little, never forever.
    let grace = Duration::from_secs(2);
    let stdout = rx_out.recv_timeout(grace).unwrap_or_default();
    let stderr = rx_err.recv_timeout(grace).unwrap_or_default();
    let output = Output {
        status,
        stdout,
        stderr,
    };
    if !status.success() {
        bail!(
            "`{desc}` failed ({status}): {}",
            String::from_utf8_lossy(&output.stderr).trim()
        );
    }
    Ok(output)
}

fn ip_cmd<I, S>(args: I) -> Result<Output>
where
    I: IntoIterator<Item = S>,
    S: AsRef<OsStr>,
{
    let mut cmd = Command::new("ip");
    cmd.args(args);
    run_command(cmd, COMMAND_TIMEOUT)
}

/// Names of the namespaces `ip netns list` shows.
pub fn list_namespaces() -> Result<Vec<String>> {
    let out = ip_cmd(["netns", "list"])?;
    Ok(String::from_utf8_lossy(&out.stdout)
        .lines()
        .filter_map(|l| l.split_whitespace().next())
        .map(str::to_owned)
        .collect())
}

/// Names of the links in the caller's (normally the root) namespace.
pub fn root_link_names() -> Result<Vec<String>> {
    let out = ip_cmd(["-o", "link", "show"])?;
    let mut names: Vec<String> = String::from_utf8_lossy(&out.stdout)
        .lines()
        .filter_map(|l| l.split(':').nth(1))
        .map(|n| n.trim().split('@').next().unwrap_or("").to_owned())
        .collect();
    names.sort();
    Ok(names)
}

fn process_alive(pid: i32) -> bool {
    std::path::Path::new(&format!("/proc/{pid}")).exists()
}

/// Removes namespaces left behind by harness processes that no longer exist
/// (a test binary killed by SIGKILL cannot run its destructors), killing the
/// processes still inside them. Namespaces of live processes are left alone.
pub fn cleanup_stale_namespaces() -> Result<Vec<String>> {
    let me = std::process::id() as i32;
    let mut removed = Vec::new();
    for name in list_namespaces()? {
        let Some(rest) = name.strip_prefix(NAME_PREFIX) else {
            continue;
        };
        let Some((pid, tail)) = rest.split_once('-') else {
            continue;
        };
        let Ok(pid) = pid.parse::<i32>() else {
            continue;
        };
        if pid == me || process_alive(pid) || !tail.contains('-') {
            continue;
        }
        kill_namespace_pids(&name);
        ip_cmd(["netns", "delete", &name])?;
        removed.push(name);
    }
    Ok(removed)
}

/// SIGKILLs every process whose network namespace is `name` (never this
/// process) and reaps none: they are either our children (reaped by their
/// guards) or orphans (reaped by init).
fn kill_namespace_pids(name: &str) {
    let me = std::process::id();
    let Ok(out) = ip_cmd(["netns", "pids", name]) else {
        return;
    };
    for pid in String::from_utf8_lossy(&out.stdout)
        .split_whitespace()
        .filter_map(|p| p.parse::<u32>().ok())
        .filter(|&p| p != me && p > 1)
    {
        // SAFETY: kill has no memory-safety preconditions.
        unsafe { libc::kill(pid as libc::pid_t, libc::SIGKILL) };
    }
}

// ---------------------------------------------------------------------------
// Child processes
// ---------------------------------------------------------------------------

/// A child process, killed (SIGKILL) and reaped when dropped.
pub struct ChildGuard {
    child: Child,
    what: String,
    reaped: Option<ExitStatus>,
}

impl ChildGuard {
    pub fn new(child: Child, what: impl Into<String>) -> Self {
        Self {
            child,
            what: what.into(),
            reaped: None,
        }
    }

    /// The process id (of the program itself: `ip netns exec` execs it).
    pub fn id(&self) -> u32 {
        self.child.id()
    }

    /// The command line it was started with.
    pub fn what(&self) -> &str {
        &self.what
    }

    /// The underlying child, e.g. to take its stdout.
    pub fn child_mut(&mut self) -> &mut Child {
        &mut self.child
    }

    /// Its exit status if it has exited (reaping it), `None` if running.
    pub fn try_wait(&mut self) -> Result<Option<ExitStatus>> {
        if let Some(s) = self.reaped {
            return Ok(Some(s));
        }
        let s = self
            .child
            .try_wait()
            .with_context(|| format!("waiting for `{}`", self.what))?;
        self.reaped = s;
        Ok(s)
    }

    pub fn is_running(&mut self) -> bool {
        matches!(self.try_wait(), Ok(None))
    }

    /// Waits up to `timeout` for it to exit.
    pub fn wait_timeout(&mut self, timeout: Duration) -> Result<Option<ExitStatus>> {
        let deadline = Instant::now() + timeout;
        loop {
            if let Some(s) = self.try_wait()? {
                return Ok(Some(s));
            }
            if Instant::now() >= deadline {
                return Ok(None);
            }
            thread::sleep(Duration::from_millis(5));
        }
    }

    /// Sends `sig` (e.g. `libc::SIGTERM`) if it has not been reaped yet (so
    /// the pid is still ours).
    pub fn signal(&mut self, sig: i32) -> Result<()> {
        if self.try_wait()?.is_some() {
            return Ok(());
        }
        // SAFETY: kill has no memory-safety preconditions; the pid is our
        // unreaped child.
        let rc = unsafe { libc::kill(self.child.id() as libc::pid_t, sig) };
        if rc != 0 {
            return Err(std::io::Error::last_os_error())
                .with_context(|| format!("kill({sig}) `{}`", self.what));
        }
        Ok(())
    }

    /// Sends `sig`, waits up to `grace` for a clean exit, then SIGKILLs.
    /// Returns the exit status.
    pub fn stop(mut self, sig: i32, grace: Duration) -> Result<ExitStatus> {
        self.signal(sig)?;
        if let Some(s) = self.wait_timeout(grace)? {
            return Ok(s);
        }
        self.kill_now()
    }

    /// SIGKILLs and reaps it now.
    pub fn kill(mut self) -> Result<ExitStatus> {
        self.kill_now()
    }

    fn kill_now(&mut self) -> Result<ExitStatus> {
        if let Some(s) = self.try_wait()? {
            return Ok(s);
        }
        let _ = self.child.kill();
        let s = self
            .child
            .wait()
            .with_context(|| format!("reaping `{}`", self.what))?;
        self.reaped = Some(s);
        Ok(s)
    }
}

impl Drop for ChildGuard {
    fn drop(&mut self) {
        if let Err(e) = self.kill_now() {
            eprintln!("lb-tests: {e:#}");
        }
    }
}

// ---------------------------------------------------------------------------
// Namespaces
// ---------------------------------------------------------------------------

/// A named network namespace (`ip netns add`), deleted on drop after the
/// processes still inside it are SIGKILLed.
pub struct Netns {
    name: String,
}

impl Netns {
    /// Creates the namespace `name` (an error if it exists) with `lo` up.
    pub fn create(name: impl Into<String>) -> Result<Netns> {
        let name = name.into();
        ensure!(
            !name.is_empty() && !name.contains('/'),
            "bad namespace name {name:?}"
        );
        ip_cmd(["netns", "add", &name])?;
        let ns = Netns { name };
        ns.ip(["link", "set", "lo", "up"])?;
        Ok(ns)
    }

    pub fn name(&self) -> &str {
        &self.name
    }

    /// A `Command` for `ip netns exec NAME program`; add arguments and
    /// configure stdio as needed.
    pub fn command(&self, program: impl AsRef<OsStr>) -> Command {
        let mut cmd = Command::new("ip");
        cmd.args(["netns", "exec", &self.name]).arg(program);
        cmd
    }

    fn command_from<I, S>(&self, args: I) -> Result<Command>
    where
        I: IntoIterator<Item = S>,
        S: AsRef<OsStr>,
    {
        let mut args = args.into_iter();
        let program = args
            .next()
            .ok_or_else(|| anyhow!("no program given to run in {}", self.name))?;
        let mut cmd = self.command(program);
        cmd.args(args);
        Ok(cmd)
    }

    /// Runs `args` (program first) inside the namespace to completion
    /// (bounded by [`COMMAND_TIMEOUT`]); a non-zero exit is an error with
    /// the command's stderr.
    pub fn exec<I, S>(&self, args: I) -> Result<Output>
    where
        I: IntoIterator<Item = S>,
        S: AsRef<OsStr>,
    {
        self.exec_timeout(args, COMMAND_TIMEOUT)
    }

    /// [`Netns::exec`] with an explicit time bound.
    pub fn exec_timeout<I, S>(&self, args: I, timeout: Duration) -> Result<Output>
    where
        I: IntoIterator<Item = S>,
        S: AsRef<OsStr>,
    {
        run_command(self.command_from(args)?, timeout)
    }

    /// `ip -n NAME args…`
    pub fn ip<I, S>(&self, args: I) -> Result<Output>
    where
        I: IntoIterator<Item = S>,
        S: AsRef<OsStr>,
    {
        let mut full: Vec<OsString> = vec!["-n".into(), self.name.clone().into()];
        full.extend(args.into_iter().map(|a| a.as_ref().to_owned()));
        ip_cmd(full)
    }

    /// `sysctl -w key=value …` inside the namespace.
    pub fn sysctl(&self, settings: &[(&str, &str)]) -> Result<()> {
        let mut args = vec!["sysctl".to_owned(), "-q".to_owned(), "-w".to_owned()];
        args.extend(settings.iter().map(|(k, v)| format!("{k}={v}")));
        self.exec(args)?;
        Ok(())
    }

    /// Reads one sysctl inside the namespace.
    pub fn sysctl_get(&self, key: &str) -> Result<String> {
        let out = self.exec(["sysctl", "-n", key])?;
        Ok(String::from_utf8_lossy(&out.stdout).trim().to_owned())
    }

    /// `ethtool -K iface feature on|off …` inside the namespace.
    pub fn ethtool_features(&self, iface: &str, features: &[(&str, bool)]) -> Result<()> {
        let mut args = vec!["ethtool".to_owned(), "-K".to_owned(), iface.to_owned()];
        for (f, on) in features {
            args.push((*f).to_owned());
            args.push(if *on { "on" } else { "off" }.to_owned());
        }
        self.exec(args)?;
        Ok(())
    }

    /// Whether `ethtool -k iface` reports `feature` (its long name, e.g.
    /// `generic-receive-offload`, `tx-checksumming`) as on.
    pub fn ethtool_feature_on(&self, iface: &str, feature: &str) -> Result<bool> {
        let out = self.exec(["ethtool", "-k", iface])?;
        let text = String::from_utf8_lossy(&out.stdout);
        let prefix = format!("{feature}:");
        let line = text
            .lines()
            .map(str::trim)
            .find(|l| l.starts_with(&prefix))
            .ok_or_else(|| anyhow!("ethtool -k {iface} in {} lists no {feature}", self.name))?;
        Ok(line[prefix.len()..].trim_start().starts_with("on"))
    }

    /// Starts `args` (program first) inside the namespace, stdin closed and
    /// stdout/stderr inherited; the guard SIGKILLs and reaps it on drop.
    pub fn spawn<I, S>(&self, args: I) -> Result<ChildGuard>
    where
        I: IntoIterator<Item = S>,
        S: AsRef<OsStr>,
    {
        let mut cmd = self.command_from(args)?;
        cmd.stdin(Stdio::null());
        spawn_guarded(cmd)
    }

    /// Runs `f` on a new thread that has joined this namespace (setns with
    /// CLONE_NEWNET), and returns its result: sockets `f` creates belong to
    /// the namespace (and stay there wherever they are used later). A panic
    /// in `f` is resumed in the caller.
    pub fn run<F, T>(&self, f: F) -> Result<T>
    where
        F: FnOnce() -> T + Send,
        T: Send,
    {
        let path = format!("{NETNS_RUN_DIR}/{}", self.name);
        let file = File::open(&path).with_context(|| format!("opening {path}"))?;
        let name = self.name.clone();
        thread::scope(|s| {
            let handle = thread::Builder::new()
                .name(format!("netns {name}"))
                .spawn_scoped(s, move || -> Result<T> {
                    // SAFETY: a valid fd of a network namespace; setns
                    // affects only this thread.
                    let rc = unsafe { libc::setns(file.as_raw_fd(), libc::CLONE_NEWNET) };
                    if rc != 0 {
                        return Err(std::io::Error::last_os_error())
                            .with_context(|| format!("setns({path}, CLONE_NEWNET)"));
                    }
                    drop(file);
                    Ok(f())
                })
                .context("spawning a thread")?;
            match handle.join() {
                Ok(r) => r,
                Err(panic) => std::panic::resume_unwind(panic),
            }
        })
    }
}

impl Drop for Netns {
    fn drop(&mut self) {
        kill_namespace_pids(&self.name);
        if let Err(e) = ip_cmd(["netns", "delete", &self.name]) {
            eprintln!("lb-tests: removing namespace {}: {e:#}", self.name);
        }
    }
}

/// Spawns `cmd` as a guarded child.
pub fn spawn_guarded(mut cmd: Command) -> Result<ChildGuard> {
    let what = describe(&cmd);
    let child = cmd
        .spawn()
        .with_context(|| format!("cannot start `{what}`"))?;
    Ok(ChildGuard::new(child, what))
}

// ---------------------------------------------------------------------------
// Topology
// ---------------------------------------------------------------------------

/// A load balancer host added to a topology ([`Topology::add_lb`]).
pub struct ExtraLb {
    // Drop order: the program on the switch port first, then the
    // namespace (and its veth).
    _peer_xdp: crate::testprogs::TestProgs,
    ns: Netns,
    iface: String,
    addr: Ipv4Addr,
}

impl ExtraLb {
    pub fn ns(&self) -> &Netns {
        &self.ns
    }

    /// Its interface (to attach lb to).
    pub fn iface(&self) -> &str {
        &self.iface
    }

    pub fn addr(&self) -> Ipv4Addr {
        self.addr
    }
}

/// Options for [`Topology::new`].
#[derive(Clone, Debug)]
pub struct TopologyOpts {
    /// Backends created up front (more can be added with
    /// [`Topology::add_backend`]).
    pub backends: usize,
    /// Keep IPv6 enabled in the namespaces and give every host an IPv6
    /// address too (2001:2:0:k::/64; VIP 2001:2:0:1k::1 on the backends'
    /// lo), without DAD, router solicitations or autoconfiguration. Off by
    /// default: no MLD or ND frames disturb packet counts.
    pub ipv6: bool,
}

impl Default for TopologyOpts {
    fn default() -> Self {
        Self {
            backends: 3,
            ipv6: false,
        }
    }
}

/// Roles, used in MAC addresses: 02:18:k:role:index:side.
const ROLE_CLIENT: u8 = 1;
const ROLE_LB: u8 = 2;
const ROLE_BACKEND: u8 = 3;

/// One L2 segment (bridge in its own namespace) with a client, an lb and
/// backends. See the module docs. Dropping it removes everything.
pub struct Topology {
    n: u32,
    k: u8,
    ipv6: bool,
    // Drop order = field order: endpoints first, the switch last.
    /// An XDP_PASS program on the switch-side peer of the lb's veth: frames
    /// lb sends with XDP_TX arrive only at a veth peer running XDP (GRO
    /// alone did not deliver them on this kernel: the peer's NAPI was never
    /// kicked). Detached when dropped.
    lb_peer_xdp: Option<crate::testprogs::TestProgs>,
    client: Netns,
    lb: Netns,
    backends: Vec<Netns>,
    switch: Netns,
}

impl Topology {
    /// Builds the topology; on any error everything already created is
    /// removed again.
    pub fn new(opts: TopologyOpts) -> Result<Topology> {
        ensure!(
            opts.backends <= MAX_BACKENDS,
            "at most {MAX_BACKENDS} backends"
        );
        STALE_CLEANUP.call_once(|| match cleanup_stale_namespaces() {
            Ok(v) if !v.is_empty() => eprintln!("lb-tests: removed stale namespaces {v:?}"),
            Ok(_) => {}
            Err(e) => eprintln!("lb-tests: stale namespace cleanup: {e:#}"),
        });
        let n = TOPOLOGY_COUNTER.fetch_add(1, Ordering::Relaxed);
        let k = (n % 256) as u8;
        let tag = format!("{NAME_PREFIX}{}-{n}", std::process::id());

        let switch = Netns::create(format!("{tag}-sw"))?;
        basic_sysctls(&switch, opts.ipv6)?;
        let bridge = format!("{NAME_PREFIX}{n}br");
        check_ifname(&bridge)?;
        let bridge_mac = mac_string([0x02, 0x18, k, 0, 0, 0]);
        // STP is off by default; forward_delay 0 so ports forward at once.
        switch.ip([
            "link",
            "add",
            &bridge,
            "address",
            &bridge_mac,
            "type",
            "bridge",
            "forward_delay",
            "0",
        ])?;
        switch.ip(["link", "set", &bridge, "up"])?;

        let client = Netns::create(format!("{tag}-cl"))?;
        let lb = Netns::create(format!("{tag}-lb"))?;
        let mut topo = Topology {
            n,
            k,
            ipv6: opts.ipv6,
            lb_peer_xdp: None,
            client,
            lb,
            backends: Vec::new(),
            switch,
        };

        // Client.
        basic_sysctls(&topo.client, opts.ipv6)?;
        topo.plug(&topo.client, &topo.client_iface(), ROLE_CLIENT, 0, true)?;
        let cidr = format!("{}/24", topo.client_addr());
        topo.client
            .ip(["addr", "add", &cidr, "dev", &topo.client_iface()])?;
        if opts.ipv6 {
            add_addr6(&topo.client, &topo.client_iface(), topo.client_addr6(), 64)?;
        }

        // Load balancer: the kernel must not forward, lb does.
        basic_sysctls(&topo.lb, opts.ipv6)?;
        topo.lb.sysctl(&[("net.ipv4.ip_forward", "0")])?;
        topo.plug(&topo.lb, &topo.lb_iface(), ROLE_LB, 0, false)?;
        let cidr = format!("{}/24", topo.lb_addr());
        topo.lb
            .ip(["addr", "add", &cidr, "dev", &topo.lb_iface()])?;
        if opts.ipv6 {
            topo.lb.sysctl(&[("net.ipv6.conf.all.forwarding", "0")])?;
            add_addr6(&topo.lb, &topo.lb_iface(), topo.lb_addr6(), 64)?;
        }

        topo.client_route_vip_via(topo.lb_addr())?;
        if opts.ipv6 {
            topo.client_route_vip6_via(topo.lb_addr6())?;
        }
        let port = topo.lb_switch_port();
        topo.lb_peer_xdp = Some(crate::testprogs::return_only_on(&topo.switch, &port)?);

        for _ in 0..opts.backends {
            topo.add_backend()?;
        }
        topo.wait_bridge_forwarding(Duration::from_secs(5))?;
        Ok(topo)
    }

    /// `Topology::new` with `backends` backends and default options.
    pub fn with_backends(backends: usize) -> Result<Topology> {
        Self::new(TopologyOpts {
            backends,
            ..Default::default()
        })
    }

    /// Adds one more backend (address .11 + index, VIP on lo, ARP for the
    /// VIP suppressed) and returns its index.
    pub fn add_backend(&mut self) -> Result<usize> {
        let i = self.backends.len();
        ensure!(i < MAX_BACKENDS, "at most {MAX_BACKENDS} backends");
        let tag = self.tag();
        let ns = Netns::create(format!("{tag}-b{i}"))?;
        basic_sysctls(&ns, self.ipv6)?;
        ns.sysctl(&[
            ("net.ipv4.conf.all.arp_ignore", "1"),
            ("net.ipv4.conf.all.arp_announce", "2"),
            ("net.ipv4.conf.lo.rp_filter", "0"),
        ])?;
        let iface = self.backend_iface(i);
        self.plug(&ns, &iface, ROLE_BACKEND, i as u8, true)?;
        let cidr = format!("{}/24", self.backend_addr(i));
        ns.ip(["addr", "add", &cidr, "dev", &iface])?;
        let vip = format!("{}/32", self.vip());
        ns.ip(["addr", "add", &vip, "dev", "lo"])?;
        if self.ipv6 {
            add_addr6(&ns, &iface, self.backend_addr6(i), 64)?;
            // On lo, the VIP is not answered for in neighbour discovery on
            // the backend's interface (the kernel answers solicitations
            // only for addresses of the interface they arrive on).
            add_addr6(&ns, "lo", self.vip6(), 128)?;
        }
        self.backends.push(ns);
        self.wait_bridge_forwarding(Duration::from_secs(5))?;
        Ok(i)
    }

    /// Adds another load balancer host on the segment (scale-out tests):
    /// a namespace of its own with a veth `index` (1..=8) plugged into the
    /// bridge, address 198.18.k.(2 + index), the same sysctls as the first
    /// lb and the XDP_PASS program on its switch port. The client's VIP
    /// route is left as it is (see [`Topology::client_route_vip_via`]).
    /// Keep it in a binding declared after the topology's, so that it is
    /// dropped first.
    pub fn add_lb(&self, index: u8) -> Result<ExtraLb> {
        self.add_host(&format!("lb{index}"), index)
    }

    /// [`Topology::add_lb`] with the namespace named after `role` (e.g. a
    /// router on the segment: the caller turns forwarding on).
    pub fn add_host(&self, role: &str, index: u8) -> Result<ExtraLb> {
        ensure!((1..=8).contains(&index), "host index {index} not in 1..=8");
        let ns = Netns::create(format!("{}-{role}", self.tag()))?;
        basic_sysctls(&ns, self.ipv6)?;
        ns.sysctl(&[("net.ipv4.ip_forward", "0")])?;
        let iface = format!("{}{index}", self.lb_iface());
        check_ifname(&format!("{iface}s"))?;
        self.plug(&ns, &iface, ROLE_LB, index, false)?;
        let addr = Ipv4Addr::new(198, 18, self.k, 2 + index);
        ns.ip(["addr", "add", &format!("{addr}/24"), "dev", &iface])?;
        let peer_xdp = crate::testprogs::return_only_on(&self.switch, &format!("{iface}s"))?;
        self.wait_ports_forwarding(
            &self.bridge(),
            3 + self.backends.len(),
            Duration::from_secs(5),
        )?;
        Ok(ExtraLb {
            _peer_xdp: peer_xdp,
            ns,
            iface,
            addr,
        })
    }

    /// Replaces the lb's veth with a new one of the same name, address and
    /// MAC (a new ifindex): the old one is deleted, or, with
    /// `rename_old_to`, renamed (it and its switch port, `NAME`+"s") and
    /// left down without an address. The switch-side XDP program moves to
    /// the new peer.
    pub fn recreate_lb_iface(&mut self, rename_old_to: Option<&str>) -> Result<()> {
        let iface = self.lb_iface();
        let port = self.lb_switch_port();
        self.lb_peer_xdp = None;
        match rename_old_to {
            None => {
                self.lb.ip(["link", "del", &iface])?;
            }
            Some(new) => {
                let new_port = format!("{new}s");
                check_ifname(&new_port)?;
                self.lb.ip(["link", "set", &iface, "down"])?;
                self.lb.ip(["addr", "flush", "dev", &iface])?;
                self.lb.ip(["link", "set", &iface, "name", new])?;
                self.switch.ip(["link", "set", &port, "down"])?;
                self.switch.ip(["link", "set", &port, "name", &new_port])?;
            }
        }
        self.plug(&self.lb, &iface, ROLE_LB, 0, false)?;
        let cidr = format!("{}/24", self.lb_addr());
        self.lb.ip(["addr", "add", &cidr, "dev", &iface])?;
        if self.ipv6 {
            add_addr6(&self.lb, &iface, self.lb_addr6(), 64)?;
        }
        self.lb_peer_xdp = Some(crate::testprogs::return_only_on(&self.switch, &port)?);
        self.wait_bridge_forwarding(Duration::from_secs(5))
    }

    /// Creates the veth pair `iface` (in `ns`) / `iface`+"s" (in the switch
    /// namespace, enslaved to the bridge), with GRO on both ends and, if
    /// `tx_off`, TX checksum offload off on `iface`.
    fn plug(&self, ns: &Netns, iface: &str, role: u8, index: u8, tx_off: bool) -> Result<()> {
        self.plug_into(ns, iface, &self.bridge(), role, index, tx_off)
    }

    /// [`Topology::plug`] into another bridge of the switch namespace (a
    /// topology built on this one, e.g. `routed`'s back segment or the
    /// demo's IPv6 routed one).
    pub(crate) fn plug_into(
        &self,
        ns: &Netns,
        iface: &str,
        bridge: &str,
        role: u8,
        index: u8,
        tx_off: bool,
    ) -> Result<()> {
        let port = format!("{iface}s");
        check_ifname(&port)?;
        let mac = mac_string([0x02, 0x18, self.k, role, index, 0]);
        let port_mac = mac_string([0x02, 0x18, self.k, role, index, 1]);
        // Both ends are created directly in their namespaces: nothing ever
        // appears in the root namespace.
        ip_cmd([
            "link",
            "add",
            iface,
            "address",
            &mac,
            "netns",
            ns.name(),
            "type",
            "veth",
            "peer",
            "name",
            &port,
            "address",
            &port_mac,
            "netns",
            self.switch.name(),
        ])?;
        let rp = format!("net.ipv4.conf.{iface}.rp_filter");
        ns.sysctl(&[(&rp, "0")])?;
        self.switch.ip(["link", "set", &port, "master", bridge])?;
        // GRO off everywhere: as on a real NIC, XDP must see wire-sized
        // frames. A veth with GRO aggregates segments before the next hop,
        // and lb would forward a super-frame whose TCP checksum is only
        // valid once resegmented (backends count TcpInCsumErrors). XDP_TX
        // delivery to the switch is ensured by an XDP program on the
        // lb's peer instead (see `lb_peer_xdp`).
        self.switch.ethtool_features(&port, &[("gro", false)])?;
        self.switch.ip(["link", "set", &port, "up"])?;
        let mut features = vec![("gro", false)];
        if tx_off {
            features.push(("tx", false));
        }
        ns.ethtool_features(iface, &features)?;
        ns.ip(["link", "set", iface, "up"])?;
        Ok(())
    }

    /// Waits (bounded) until every bridge port is forwarding.
    fn wait_bridge_forwarding(&self, timeout: Duration) -> Result<()> {
        self.wait_ports_forwarding(&self.bridge(), 2 + self.backends.len(), timeout)
    }

    /// Waits (bounded) until `expected` ports of `bridge` (in the switch
    /// namespace) are forwarding.
    pub(crate) fn wait_ports_forwarding(
        &self,
        bridge: &str,
        expected: usize,
        timeout: Duration,
    ) -> Result<()> {
        let deadline = Instant::now() + timeout;
        loop {
            let out = self
                .switch
                .ip(["-d", "-o", "link", "show", "master", bridge])?;
            let text = String::from_utf8_lossy(&out.stdout);
            let forwarding = text
                .lines()
                .filter(|l| l.contains("bridge_slave state forwarding"))
                .count();
            if forwarding >= expected {
                return Ok(());
            }
            if Instant::now() >= deadline {
                bail!(
                    "ports of {bridge} in {} not forwarding after {timeout:?} ({forwarding}/{expected}):\n{text}",
                    self.switch.name()
                );
            }
            thread::sleep(Duration::from_millis(20));
        }
    }

    fn tag(&self) -> String {
        format!("{NAME_PREFIX}{}-{}", std::process::id(), self.n)
    }

    /// Replaces the client's route to the VIP (/32) to go via `via` (the lb
    /// address normally; a backend address to bypass the lb).
    pub fn client_route_vip_via(&self, via: Ipv4Addr) -> Result<()> {
        let dst = format!("{}/32", self.vip());
        self.client
            .ip(["route", "replace", &dst, "via", &via.to_string()])?;
        Ok(())
    }

    /// The same for the IPv6 VIP (/128).
    pub fn client_route_vip6_via(&self, via: Ipv6Addr) -> Result<()> {
        let dst = format!("{}/128", self.vip6());
        self.client
            .ip(["-6", "route", "replace", &dst, "via", &via.to_string()])?;
        Ok(())
    }

    pub fn client_ns(&self) -> &Netns {
        &self.client
    }

    pub fn lb_ns(&self) -> &Netns {
        &self.lb
    }

    pub fn switch_ns(&self) -> &Netns {
        &self.switch
    }

    /// Panics if there is no backend `i`.
    pub fn backend_ns(&self, i: usize) -> &Netns {
        self.backends.get(i).unwrap_or_else(|| {
            panic!(
                "backend {i} does not exist ({} backends)",
                self.backends.len()
            )
        })
    }

    pub fn backend_count(&self) -> usize {
        self.backends.len()
    }

    /// Every namespace of the topology (client, lb, backends, switch).
    pub fn namespaces(&self) -> Vec<&Netns> {
        let mut v = vec![&self.client, &self.lb];
        v.extend(self.backends.iter());
        v.push(&self.switch);
        v
    }

    pub fn namespace_names(&self) -> Vec<String> {
        self.namespaces()
            .iter()
            .map(|n| n.name().to_owned())
            .collect()
    }

    /// The lb's veth inside [`Topology::lb_ns`]: attach the XDP program here.
    pub fn lb_iface(&self) -> String {
        format!("{NAME_PREFIX}{}l", self.n)
    }

    pub fn client_iface(&self) -> String {
        format!("{NAME_PREFIX}{}c", self.n)
    }

    pub fn backend_iface(&self, i: usize) -> String {
        format!("{NAME_PREFIX}{}b{i}", self.n)
    }

    /// The bridge inside [`Topology::switch_ns`].
    pub fn bridge(&self) -> String {
        format!("{NAME_PREFIX}{}br", self.n)
    }

    /// The switch-side peer of the lb's veth (the first hop after lb).
    pub fn lb_switch_port(&self) -> String {
        format!("{}s", self.lb_iface())
    }

    pub fn client_switch_port(&self) -> String {
        format!("{}s", self.client_iface())
    }

    pub fn backend_switch_port(&self, i: usize) -> String {
        format!("{}s", self.backend_iface(i))
    }

    /// The third octet `k` of 198.18.k.0/24 and 198.19.k.1.
    pub fn index(&self) -> u8 {
        self.k
    }

    /// The segment's network and prefix length: (198.18.k.0, 24).
    pub fn subnet_prefix(&self) -> (Ipv4Addr, u8) {
        (Ipv4Addr::new(198, 18, self.k, 0), 24)
    }

    pub fn client_addr(&self) -> Ipv4Addr {
        Ipv4Addr::new(198, 18, self.k, 1)
    }

    pub fn lb_addr(&self) -> Ipv4Addr {
        Ipv4Addr::new(198, 18, self.k, 2)
    }

    pub fn backend_addr(&self, i: usize) -> Ipv4Addr {
        assert!(i < MAX_BACKENDS, "backend index {i} out of range");
        Ipv4Addr::new(198, 18, self.k, 11 + i as u8)
    }

    pub fn vip(&self) -> Ipv4Addr {
        Ipv4Addr::new(198, 19, self.k, 1)
    }

    /// IPv6 topologies ([`TopologyOpts::ipv6`]): the segment 2001:2:0:k::/64.
    pub fn subnet6(&self) -> Ipv6Addr {
        Ipv6Addr::new(0x2001, 2, 0, self.k.into(), 0, 0, 0, 0)
    }

    pub fn client_addr6(&self) -> Ipv6Addr {
        Ipv6Addr::new(0x2001, 2, 0, self.k.into(), 0, 0, 0, 1)
    }

    pub fn lb_addr6(&self) -> Ipv6Addr {
        Ipv6Addr::new(0x2001, 2, 0, self.k.into(), 0, 0, 0, 2)
    }

    pub fn backend_addr6(&self, i: usize) -> Ipv6Addr {
        assert!(i < MAX_BACKENDS, "backend index {i} out of range");
        Ipv6Addr::new(0x2001, 2, 0, self.k.into(), 0, 0, 0, 0x11 + i as u16)
    }

    /// The IPv6 VIP, outside the segment: 2001:2:0:1kk::1.
    pub fn vip6(&self) -> Ipv6Addr {
        Ipv6Addr::new(0x2001, 2, 0, 0x100 + u16::from(self.k), 0, 0, 0, 1)
    }

    pub fn client_mac(&self) -> [u8; 6] {
        [0x02, 0x18, self.k, ROLE_CLIENT, 0, 0]
    }

    pub fn lb_mac(&self) -> [u8; 6] {
        [0x02, 0x18, self.k, ROLE_LB, 0, 0]
    }

    pub fn backend_mac(&self, i: usize) -> [u8; 6] {
        [0x02, 0x18, self.k, ROLE_BACKEND, i as u8, 0]
    }
}

pub(crate) fn basic_sysctls(ns: &Netns, ipv6: bool) -> Result<()> {
    let mut settings: Vec<(String, &str)> = vec![
        ("net.ipv4.conf.all.rp_filter".into(), "0"),
        ("net.ipv4.conf.default.rp_filter".into(), "0"),
    ];
    if std::path::Path::new("/proc/sys/net/ipv6").exists() {
        if ipv6 {
            // Static addresses only, usable at once: no duplicate address
            // detection, router solicitations or autoconfiguration.
            for conf in ["all", "default"] {
                for (key, value) in [
                    ("accept_dad", "0"),
                    ("dad_transmits", "0"),
                    ("accept_ra", "0"),
                    ("router_solicitations", "0"),
                    ("autoconf", "0"),
                ] {
                    settings.push((format!("net.ipv6.conf.{conf}.{key}"), value));
                }
            }
        } else {
            settings.push(("net.ipv6.conf.all.disable_ipv6".into(), "1"));
            settings.push(("net.ipv6.conf.default.disable_ipv6".into(), "1"));
        }
    }
    let settings: Vec<(&str, &str)> = settings.iter().map(|(k, v)| (k.as_str(), *v)).collect();
    ns.sysctl(&settings)
}

/// Adds an IPv6 address without duplicate address detection (usable at
/// once).
pub(crate) fn add_addr6(ns: &Netns, iface: &str, addr: Ipv6Addr, prefix: u8) -> Result<()> {
    let cidr = format!("{addr}/{prefix}");
    ns.ip(["-6", "addr", "add", &cidr, "dev", iface, "nodad"])?;
    Ok(())
}

fn check_ifname(name: &str) -> Result<()> {
    ensure!(
        name.len() <= 15,
        "interface name {name:?} is longer than 15 characters"
    );
    Ok(())
}

fn mac_string(mac: [u8; 6]) -> String {
    lb::mac::MacAddr(mac).to_string()
}

/// The namespaces among `names` that `ip netns list` still shows.
pub fn namespaces_still_present(names: &[String]) -> Result<Vec<String>> {
    let present: HashSet<String> = list_namespaces()?.into_iter().collect();
    Ok(names
        .iter()
        .filter(|n| present.contains(*n))
        .cloned()
        .collect())
}
