//! The real `lb` binary run as an agent inside a test namespace, with a
//! generated config, a private instance name and control socket; stopped
//! and its pins removed on drop.

use std::{
    fmt::Write as _,
    net::{IpAddr, SocketAddr},
    path::{Path, PathBuf},
    process::{Command, Output, Stdio},
    sync::atomic::{AtomicU32, Ordering},
    thread,
    time::{Duration, Instant},
};

use anyhow::{Context as _, Result, bail};

use crate::netns::{ChildGuard, Netns, spawn_guarded};

/// The `lb` binary: `LB_BIN` (set by `cargo xtask test`), else next to the
/// test executable (target/debug/lb).
pub fn lb_binary() -> PathBuf {
    if let Some(p) = std::env::var_os("LB_BIN") {
        return p.into();
    }
    let exe = std::env::current_exe().expect("current exe");
    for dir in exe.ancestors().skip(1).take(3) {
        let p = dir.join("lb");
        if p.is_file() {
            return p;
        }
    }
    panic!("the lb binary was not found: build it (`cargo build -p lb-userspace`) or set LB_BIN");
}

/// One VIP of a generated config.
#[derive(Clone, Debug)]
pub struct VipSpec {
    pub name: String,
    /// IPv4 or IPv6.
    pub address: IpAddr,
    pub port: u16,
    pub protocol: &'static str,
    /// `(address, weight)`
    pub backends: Vec<(IpAddr, u32)>,
    /// The `[vip.health_check]` table body, e.g. `kind = "none"`.
    pub health_check: String,
    /// `dsr-l2`, `ipip` or `gue`.
    pub forwarding: &'static str,
}

impl VipSpec {
    pub fn tcp<A: Into<IpAddr> + Copy>(
        name: &str,
        address: impl Into<IpAddr>,
        port: u16,
        backends: &[A],
    ) -> Self {
        Self {
            name: name.into(),
            address: address.into(),
            port,
            protocol: "tcp",
            backends: backends.iter().map(|&a| (a.into(), 1)).collect(),
            health_check: "kind = \"tcp\"\ninterval_ms = 200\ntimeout_ms = 150\nrise = 2\nfall = 2"
                .into(),
            forwarding: "dsr-l2",
        }
    }
}

/// Where a test agent serves metrics: loopback of the lb namespace (every
/// topology has its own).
pub const METRICS_LISTEN: &str = "127.0.0.1:9100";

/// The agent's `/metrics` page, fetched inside `lb_ns`.
pub fn metrics(lb_ns: &Netns) -> Result<String> {
    use std::io::{Read as _, Write as _};
    lb_ns.run(|| -> Result<String> {
        let mut c = std::net::TcpStream::connect(METRICS_LISTEN)?;
        c.set_read_timeout(Some(Duration::from_secs(3)))?;
        c.write_all(b"GET /metrics HTTP/1.1\r\nHost: lb\r\nConnection: close\r\n\r\n")?;
        let mut body = String::new();
        c.read_to_string(&mut body)?;
        Ok(body)
    })?
}

/// Renders a config for `iface` with a private instance and socket.
pub fn render_config(instance: &str, socket: &Path, iface: &str, vips: &[VipSpec]) -> String {
    let mut s = String::new();
    let _ = writeln!(
        s,
        "[agent]\ninstance = \"{instance}\"\ninterfaces = [\"{iface}\"]\ncontrol_socket = \"{}\"\nmetrics_listen = \"{METRICS_LISTEN}\"\nmax_vips = 4\nmax_backends = 64\nconntrack_entries = 65536\n",
        socket.display()
    );
    for v in vips {
        let _ = writeln!(
            s,
            "[[vip]]\nname = \"{}\"\naddress = \"{}\"\nport = {}\nprotocol = \"{}\"\nforwarding = \"{}\"\n[vip.health_check]\n{}\n",
            v.name, v.address, v.port, v.protocol, v.forwarding, v.health_check
        );
        for (a, w) in &v.backends {
            let _ = writeln!(s, "[[vip.backend]]\naddress = \"{a}\"\nweight = {w}\n");
        }
    }
    s
}

/// A running agent.
pub struct LbAgent {
    pub instance: String,
    pub socket: PathBuf,
    pub config: PathBuf,
    ns: String,
    dir: PathBuf,
    child: Option<ChildGuard>,
    log: PathBuf,
    /// RLIMIT_NOFILE (soft and hard) the agent is started with.
    nofile: Option<u64>,
}

static N: AtomicU32 = AtomicU32::new(0);

impl LbAgent {
    /// Writes `config_text` (which must use [`LbAgent::paths`]' instance
    /// and socket) and starts `lb run` in `ns`.
    pub fn start_with(
        ns: &Netns,
        paths: AgentPaths,
        config_text: &str,
        extra: &[&str],
    ) -> Result<Self> {
        Self::launch(ns, paths, config_text, extra, None)
    }

    /// Like [`LbAgent::start_with`], the agent started with RLIMIT_NOFILE
    /// set to `nofile` (soft and hard, so it cannot raise it).
    pub fn start_with_nofile(
        ns: &Netns,
        paths: AgentPaths,
        config_text: &str,
        nofile: u64,
    ) -> Result<Self> {
        Self::launch(ns, paths, config_text, &[], Some(nofile))
    }

    fn launch(
        ns: &Netns,
        paths: AgentPaths,
        config_text: &str,
        extra: &[&str],
        nofile: Option<u64>,
    ) -> Result<Self> {
        std::fs::write(&paths.config, config_text)
            .with_context(|| format!("writing {}", paths.config.display()))?;
        let mut agent = LbAgent {
            instance: paths.instance,
            socket: paths.socket,
            config: paths.config,
            ns: ns.name().to_string(),
            dir: paths.dir,
            child: None,
            log: PathBuf::new(),
            nofile,
        };
        agent.spawn(extra)?;
        Ok(agent)
    }

    /// The agent's process id while it runs.
    pub fn pid(&self) -> Option<u32> {
        self.child.as_ref().map(|c| c.id())
    }

    /// Starts an agent in `ns` attached to `iface` with these VIPs.
    pub fn start(ns: &Netns, iface: &str, vips: &[VipSpec]) -> Result<Self> {
        let paths = AgentPaths::new()?;
        let text = render_config(&paths.instance, &paths.socket, iface, vips);
        Self::start_with(ns, paths, &text, &[])
    }

    /// (Re)starts the agent process with the same config and instance.
    pub fn spawn(&mut self, extra: &[&str]) -> Result<()> {
        if self.child.is_some() {
            bail!("agent already running");
        }
        let n = N.fetch_add(1, Ordering::Relaxed);
        self.log = self.dir.join(format!("lb-{n}.log"));
        let log = std::fs::File::create(&self.log)?;
        let mut cmd = lb_in_ns(&self.ns);
        cmd.arg("run").arg("--config").arg(&self.config).args(extra);
        cmd.stdout(log.try_clone()?).stderr(log);
        cmd.env("RUST_LOG", "info");
        if let Some(n) = self.nofile {
            use std::os::unix::process::CommandExt as _;
            let lim = libc::rlimit {
                rlim_cur: n,
                rlim_max: n,
            };
            // SAFETY: setrlimit is async-signal-safe and `lim` is a plain
            // copy owned by the closure.
            unsafe {
                cmd.pre_exec(move || {
                    if libc::setrlimit(libc::RLIMIT_NOFILE, &lim) != 0 {
                        return Err(std::io::Error::last_os_error());
                    }
                    Ok(())
                });
            }
        }
        self.child = Some(spawn_guarded(cmd)?);
        self.wait_ready(Duration::from_secs(20))
    }

    fn wait_ready(&mut self, timeout: Duration) -> Result<()> {
        let deadline = Instant::now() + timeout;
        loop {
            if let Some(c) = self.child.as_mut()
                && let Some(status) = c.try_wait()?
            {
                bail!(
                    "lb run exited ({status}) during start:\n{}",
                    self.log_text()
                );
            }
            if self.cli(&["status"]).is_ok_and(|o| o.status.success()) {
                return Ok(());
            }
            if Instant::now() >= deadline {
                bail!(
                    "lb run did not answer on {} within {timeout:?}:\n{}",
                    self.socket.display(),
                    self.log_text()
                );
            }
            thread::sleep(Duration::from_millis(100));
        }
    }

    /// Runs `lb ARGS` against this agent's socket.
    pub fn cli(&self, args: &[&str]) -> Result<Output> {
        let mut cmd = Command::new(lb_binary());
        cmd.arg("--socket").arg(&self.socket).args(args);
        cmd.stdin(Stdio::null());
        cmd.output().context("running lb")
    }

    /// Runs `lb ARGS`, fails unless it succeeds, returns stdout.
    pub fn cli_ok(&self, args: &[&str]) -> Result<String> {
        let o = self.cli(args)?;
        if !o.status.success() {
            bail!(
                "lb {} failed: {}{}",
                args.join(" "),
                String::from_utf8_lossy(&o.stdout),
                String::from_utf8_lossy(&o.stderr)
            );
        }
        Ok(String::from_utf8_lossy(&o.stdout).into_owned())
    }

    /// `lb ARGS --json`, parsed.
    pub fn json(&self, args: &[&str]) -> Result<serde_json::Value> {
        let mut a = args.to_vec();
        a.push("--json");
        Ok(serde_json::from_str(&self.cli_ok(&a)?)?)
    }

    /// Stops the agent with SIGTERM and waits for it (it detaches, unless
    /// it was started with `--keep-datapath`). Returns its log.
    pub fn stop(&mut self) -> Result<String> {
        if let Some(c) = self.child.take() {
            let status = c.stop(libc::SIGTERM, Duration::from_secs(10))?;
            if !status.success() {
                bail!("lb run exited with {status}:\n{}", self.log_text());
            }
        }
        Ok(self.log_text())
    }

    pub fn log_text(&self) -> String {
        std::fs::read_to_string(&self.log).unwrap_or_default()
    }

    pub fn pin_dir(&self) -> PathBuf {
        Path::new("/sys/fs/bpf/lb").join(&self.instance)
    }

    /// `lb explain SRC DST PROTO --json`.
    pub fn explain(
        &self,
        src: SocketAddr,
        dst: SocketAddr,
        proto: &str,
    ) -> Result<serde_json::Value> {
        self.json(&["explain", &src.to_string(), &dst.to_string(), proto])
    }

    /// A pass/drop reason's count, as `lb stats` shows it.
    pub fn reason(&self, name: &str) -> Result<u64> {
        let stats = self.json(&["stats"])?;
        Ok(stats["reasons"][name][0].as_u64().unwrap_or(0))
    }

    /// Waits (bounded by `timeout`) until `lb backend list` (of `vip`
    /// only, if given) shows `addr` with `health`.
    pub fn wait_health(
        &self,
        vip: Option<&str>,
        addr: IpAddr,
        health: &str,
        timeout: Duration,
    ) -> Result<()> {
        let deadline = Instant::now() + timeout;
        let mut args = vec!["backend", "list"];
        args.extend(vip.iter().flat_map(|v| ["--vip", v]));
        loop {
            let list = self.json(&args)?;
            let now = list
                .as_array()
                .into_iter()
                .flatten()
                .find(|b| b["address"] == addr.to_string())
                .map(|b| b["health"].as_str().unwrap_or("").to_string());
            if now.as_deref() == Some(health) {
                return Ok(());
            }
            if Instant::now() >= deadline {
                bail!("{addr} is {now:?}, not {health}, after {timeout:?}: {list}");
            }
            thread::sleep(Duration::from_millis(100));
        }
    }

    /// Records in the pinned flow table `map` (CONNTRACK or CONNTRACK6,
    /// keyed by `K`), read straight from bpffs.
    pub fn pinned_flows<K: aya::Pod>(&self, map: &str) -> Result<usize> {
        let data = aya::maps::MapData::from_pin(self.pin_dir().join(map))?;
        let ct: aya::maps::HashMap<_, K, lb_common::FlowEntry> =
            aya::maps::HashMap::try_from(aya::maps::Map::HashMap(data))?;
        Ok(ct.keys().filter(|k| k.is_ok()).count())
    }
}

impl Drop for LbAgent {
    fn drop(&mut self) {
        if let Some(c) = self.child.take() {
            let _ = c.stop(libc::SIGTERM, Duration::from_secs(5));
        }
        // Whatever happened, leave no pinned link or map behind.
        let _ = std::fs::remove_dir_all(self.pin_dir());
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}

/// The private names of one agent: instance, socket, config path.
pub struct AgentPaths {
    pub instance: String,
    pub socket: PathBuf,
    pub config: PathBuf,
    pub dir: PathBuf,
}

impl AgentPaths {
    pub fn new() -> Result<Self> {
        let n = N.fetch_add(1, Ordering::Relaxed);
        let instance = format!("t{}x{n}", std::process::id());
        let dir = std::env::temp_dir().join(format!("lb-test-{instance}"));
        std::fs::create_dir_all(&dir)?;
        Ok(Self {
            socket: dir.join("lb.sock"),
            config: dir.join("lb.toml"),
            instance,
            dir,
        })
    }
}

/// `lb` run inside `ns`'s network namespace, keeping the mount namespace:
/// `ip netns exec` would remount /sys, and bpffs pins made under it would
/// vanish with the process.
pub fn lb_in_ns(ns: &str) -> Command {
    let mut cmd = Command::new("nsenter");
    cmd.arg(format!("--net=/var/run/netns/{ns}"))
        .arg("--")
        .arg(lb_binary());
    cmd.stdin(Stdio::null());
    cmd
}
