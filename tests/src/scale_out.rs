//! Scale-out labs in network namespaces (tests and the demo): BIRD 2
//! daemons with private files, and an ECMP tier of two lb hosts behind a
//! BIRD router ([`EcmpLab`]).
//!
//! The ECMP lab: one segment ([`Topology`]) with the client, the backends
//! (HTTP servers, VIP on lo, DSR), lb1 (the topology's lb namespace), lb2
//! and a router (hosts added with [`Topology::add_lb`]). The client sends
//! to the VIP through the router; the router (BIRD 2, `merge paths on`,
//! `fib_multipath_hash_policy = 1`, no redirects) learns the VIP over BGP
//! from BIRD on each lb host, which learns the host routes its agent puts
//! in table [`TABLE`] (`[agent.announce]`); BFD 100 ms × 3 on every
//! session. Backends answer the client directly.

use std::{
    collections::BTreeSet,
    net::{IpAddr, Ipv4Addr, SocketAddr, SocketAddrV4, TcpStream},
    path::{Path, PathBuf},
    thread,
    time::{Duration, Instant},
};

use anyhow::{Context as _, Result, bail, ensure};

use crate::{
    agent::{AgentPaths, LbAgent, VipSpec, render_config},
    netns::{ChildGuard, ExtraLb, Netns, Topology},
    servers::{ServerKind, ask, get_from_ports, spawn_on_backends},
};

/// The VIP's port.
pub const PORT: u16 = 80;
/// The agents' announce table.
pub const TABLE: u32 = 100;
/// Bound of every wait for routes.
pub const WAIT: Duration = Duration::from_secs(20);

/// Removes the BIRD files when the test ends, however it ends.
pub struct TempDir(pub PathBuf);

impl Drop for TempDir {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}

/// A BIRD daemon in a namespace, with private config, socket and pid file.
pub fn start_bird(ns: &Netns, dir: &Path, name: &str, conf: &str) -> Result<ChildGuard> {
    let bird = ["/usr/sbin/bird", "/usr/bin/bird"]
        .into_iter()
        .find(|p| Path::new(p).is_file())
        .context("bird not found: install the Debian package bird2 (`cargo xtask setup` does)")?;
    let path = dir.join(format!("{name}.conf"));
    std::fs::write(&path, conf)?;
    let sock = dir.join(format!("{name}.ctl"));
    let pid = dir.join(format!("{name}.pid"));
    let mut g = ns.spawn([
        bird.as_ref(),
        "-f".as_ref(),
        "-c".as_ref(),
        path.as_os_str(),
        "-s".as_ref(),
        sock.as_os_str(),
        "-P".as_ref(),
        pid.as_os_str(),
    ])?;
    thread::sleep(Duration::from_millis(300));
    if let Some(status) = g.try_wait()? {
        bail!("bird {name} exited at once ({status}); config:\n{conf}");
    }
    Ok(g)
}

pub const BFD: &str = "protocol bfd { interface \"*\" { min rx interval 100 ms; min tx interval 100 ms; multiplier 3; }; }";
pub const TIMERS: &str =
    "connect delay time 1; connect retry time 1; error wait time 1, 10; bfd on;";

/// The ECMP lab (see the module docs). Field order is drop order: the
/// daemons and agents, then the servers, the extra hosts, the topology.
pub struct EcmpLab {
    pub birds: Vec<ChildGuard>,
    pub lb1: LbAgent,
    pub lb2: LbAgent,
    pub servers: Vec<ChildGuard>,
    pub router: ExtraLb,
    pub host2: ExtraLb,
    pub topo: Topology,
    _dir: TempDir,
}

/// Builds the lab with `backends` backends (every lb host up, the router
/// routing the VIP over both).
pub fn ecmp_lab(backends: usize) -> Result<EcmpLab> {
    let dir = TempDir(std::env::temp_dir().join(format!("lb-ecmp-{}", std::process::id())));
    std::fs::create_dir_all(&dir.0)?;
    let topo = Topology::with_backends(backends)?;
    let servers = spawn_on_backends(&topo, ServerKind::Http, PORT)?;
    let host2 = topo.add_lb(1)?;
    // The router: one more host on the segment that forwards, spreads the
    // VIP's flows by L4 hash and sends no redirects (the lb hosts are on
    // the client's segment too).
    let router = topo.add_host("rt", 2)?;
    let rif = router.iface().to_string();
    router.ns().sysctl(&[
        ("net.ipv4.ip_forward", "1"),
        ("net.ipv4.fib_multipath_hash_policy", "1"),
        ("net.ipv4.conf.all.send_redirects", "0"),
        (&format!("net.ipv4.conf.{rif}.send_redirects"), "0"),
    ])?;
    topo.client_ns()
        .sysctl(&[("net.ipv4.conf.all.accept_redirects", "0")])?;
    topo.client_route_vip_via(router.addr())?;

    let addrs: Vec<IpAddr> = (0..backends).map(|i| topo.backend_addr(i).into()).collect();
    let announce = format!("[agent.announce]\ntable = {TABLE}\n");
    let start = |ns: &Netns, iface: &str| -> Result<LbAgent> {
        let p = AgentPaths::new()?;
        let vip = VipSpec::tcp("web", topo.vip(), PORT, &addrs);
        let text = render_config(&p.instance, &p.socket, iface, &[vip]) + &announce;
        LbAgent::start_with(ns, p, &text, &[])
    };
    let lb1 = start(topo.lb_ns(), &topo.lb_iface())?;
    let lb2 = start(host2.ns(), host2.iface())?;

    let r = router.addr();
    let (l1, l2) = (topo.lb_addr(), host2.addr());
    let router_conf = format!(
        "router id {r};\nprotocol device {{ }}\n\
         protocol kernel k4 {{ ipv4 {{ import none; export all; }}; merge paths on; }}\n{BFD}\n\
         protocol bgp lb1 {{ local {r} as 65000; neighbor {l1} as 65001; {TIMERS} ipv4 {{ import all; export none; }}; }}\n\
         protocol bgp lb2 {{ local {r} as 65000; neighbor {l2} as 65002; {TIMERS} ipv4 {{ import all; export none; }}; }}\n"
    );
    let lb_conf = |me: Ipv4Addr, asn: u32| {
        format!(
            "router id {me};\nprotocol device {{ }}\n\
             protocol kernel vip4 {{ kernel table {TABLE}; learn; ipv4 {{ import all; export none; }}; }}\n{BFD}\n\
             protocol bgp uplink {{ local {me} as {asn}; neighbor {r} as 65000; {TIMERS} ipv4 {{ import none; export where proto = \"vip4\"; }}; }}\n"
        )
    };
    let birds = vec![
        start_bird(router.ns(), &dir.0, "router", &router_conf)?,
        start_bird(topo.lb_ns(), &dir.0, "lb1", &lb_conf(l1, 65001))?,
        start_bird(host2.ns(), &dir.0, "lb2", &lb_conf(l2, 65002))?,
    ];
    let lab = EcmpLab {
        birds,
        lb1,
        lb2,
        servers,
        router,
        host2,
        topo,
        _dir: dir,
    };
    lab.wait_next_hops(&[l1, l2], "start")?;
    Ok(lab)
}

impl EcmpLab {
    pub fn vip(&self) -> SocketAddr {
        SocketAddrV4::new(self.topo.vip(), PORT).into()
    }

    /// The router's next hops for the VIP (its BIRD-installed route).
    pub fn next_hops(&self) -> Result<BTreeSet<Ipv4Addr>> {
        let o = self.router.ns().ip([
            "-4",
            "route",
            "show",
            &self.topo.vip().to_string(),
            "proto",
            "bird",
        ])?;
        let text = String::from_utf8_lossy(&o.stdout);
        let words: Vec<&str> = text.split_whitespace().collect();
        Ok(words
            .windows(2)
            .filter(|w| w[0] == "via")
            .filter_map(|w| w[1].parse().ok())
            .collect())
    }

    /// Waits (bounded) until the router's next hops for the VIP are
    /// exactly `want`; the time it took.
    pub fn wait_next_hops(&self, want: &[Ipv4Addr], what: &str) -> Result<Duration> {
        let want: BTreeSet<Ipv4Addr> = want.iter().copied().collect();
        let t = Instant::now();
        loop {
            let now = self.next_hops()?;
            if now == want {
                return Ok(t.elapsed());
            }
            if t.elapsed() >= WAIT {
                bail!(
                    "{what}: the router's next hops for the VIP are {now:?}, want {want:?}\nlb1:\n{}\nlb2:\n{}",
                    self.lb1.log_text(),
                    self.lb2.log_text()
                );
            }
            thread::sleep(Duration::from_millis(20));
        }
    }

    /// The VIP's new flows on `agent`.
    pub fn new_flows(agent: &LbAgent) -> Result<u64> {
        let stats = agent.json(&["stats"])?;
        stats["vips"]
            .as_array()
            .into_iter()
            .flatten()
            .find(|v| v["vip"].as_str().is_some_and(|n| n.contains("web")))
            .and_then(|v| v["new_flows"].as_u64())
            .with_context(|| format!("no new_flows for web in {stats}"))
    }

    /// New connections from `ports`, one request each: every one must
    /// succeed. New flows counted by (lb1, lb2) meanwhile.
    pub fn connect(&self, ports: std::ops::Range<u16>) -> Result<(u64, u64)> {
        let (a, b) = (Self::new_flows(&self.lb1)?, Self::new_flows(&self.lb2)?);
        let got = get_from_ports(self.topo.client_ns(), self.vip(), ports.clone())?;
        ensure!(got.len() == ports.len(), "{} answers", got.len());
        Ok((
            Self::new_flows(&self.lb1)? - a,
            Self::new_flows(&self.lb2)? - b,
        ))
    }
}

/// Every long-lived connection answers again, from the backend it had.
pub fn still_served(conns: &mut [TcpStream], first: &[String], what: &str) -> Result<()> {
    for (i, (c, was)) in conns.iter_mut().zip(first).enumerate() {
        let now = ask(c).with_context(|| format!("{what}: connection {i}"))?;
        ensure!(
            &now == was,
            "{what}: connection {i} moved from {was} to {now}"
        );
    }
    Ok(())
}
