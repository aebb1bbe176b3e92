//! Scale-out behind ECMP with real routing daemons, in network
//! namespaces: a router (BIRD 2, `merge paths on`, L4 multipath hash)
//! peers over BGP with BIRD on two lb hosts, each learning the host routes
//! its agent puts in table 100 (`[agent.announce]`); the client sends to
//! the VIP through the router, which spreads flows over the lb hosts;
//! backends answer the client directly (DSR on one segment). BFD (100 ms ×
//! 3) detects a dead lb host. Checked: both hosts carry new connections;
//! `lb host drain` moves traffic to the other host without a failed
//! connection; a host whose health checks fail withdraws the VIP while the
//! other keeps it; a host whose link dies is dropped by the router within
//! a second and 20 long-lived connections (some through each host) keep
//! their backend without a reset, new connections succeeding throughout.
//! Needs root and BIRD 2 (Debian package bird2, installed by `cargo xtask
//! setup`).

use std::{
    collections::BTreeSet,
    io::{Read as _, Write as _},
    net::{IpAddr, Ipv4Addr, SocketAddr, SocketAddrV4, TcpStream},
    path::{Path, PathBuf},
    thread,
    time::{Duration, Instant},
};

use anyhow::{Context as _, Result, bail, ensure};
use lb_tests::{
    agent::{AgentPaths, LbAgent, VipSpec, render_config},
    netns::{ChildGuard, ExtraLb, Netns, Topology},
    require_root,
    servers::{ServerKind, get_from_ports, spawn_on_backends, tcp_connect},
};

const PORT: u16 = 80;
const BACKENDS: usize = 3;
const TABLE: u32 = 100;
/// Bound of every wait for routes and health.
const WAIT: Duration = Duration::from_secs(20);

/// Removes the BIRD files when the test ends, however it ends.
struct TempDir(PathBuf);

impl Drop for TempDir {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}

/// A BIRD daemon in a namespace, with private config, socket and pid file.
fn start_bird(ns: &Netns, dir: &Path, name: &str, conf: &str) -> Result<ChildGuard> {
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

const BFD: &str = "protocol bfd { interface \"*\" { min rx interval 100 ms; min tx interval 100 ms; multiplier 3; }; }";
const TIMERS: &str = "connect delay time 1; connect retry time 1; error wait time 1, 10; bfd on;";

/// Field order is drop order: connections' users first, then daemons and
/// agents, then the extra hosts, then the topology.
struct Lab {
    birds: Vec<ChildGuard>,
    lb1: LbAgent,
    lb2: LbAgent,
    _servers: Vec<ChildGuard>,
    router: ExtraLb,
    host2: ExtraLb,
    topo: Topology,
    _dir: TempDir,
}

fn lab() -> Result<Lab> {
    require_root();
    let dir = TempDir(std::env::temp_dir().join(format!("lb-ecmp-{}", std::process::id())));
    std::fs::create_dir_all(&dir.0)?;
    let topo = Topology::with_backends(BACKENDS)?;
    let servers = spawn_on_backends(&topo, ServerKind::Http, PORT)?;
    let host2 = topo.add_lb(1)?;
    // The router: one more host on the segment that forwards, spreads the
    // VIP's flows by L4 hash and sends no redirects (the lb hosts are on
    // the client's segment too).
    let router = topo.add_lb(2)?;
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

    let addrs: Vec<IpAddr> = (0..BACKENDS).map(|i| topo.backend_addr(i).into()).collect();
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
    let lab = Lab {
        birds,
        lb1,
        lb2,
        _servers: servers,
        router,
        host2,
        topo,
        _dir: dir,
    };
    lab.wait_next_hops(&[l1, l2], "start")?;
    Ok(lab)
}

impl Lab {
    fn vip(&self) -> SocketAddr {
        SocketAddrV4::new(self.topo.vip(), PORT).into()
    }

    /// The router's next hops for the VIP (its BIRD-installed route).
    fn next_hops(&self) -> Result<BTreeSet<Ipv4Addr>> {
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
    fn wait_next_hops(&self, want: &[Ipv4Addr], what: &str) -> Result<Duration> {
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
    fn new_flows(agent: &LbAgent) -> Result<u64> {
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
    fn connect(&self, ports: std::ops::Range<u16>) -> Result<(u64, u64)> {
        let (a, b) = (Self::new_flows(&self.lb1)?, Self::new_flows(&self.lb2)?);
        let got = get_from_ports(self.topo.client_ns(), self.vip(), ports.clone())?;
        ensure!(got.len() == ports.len(), "{} answers", got.len());
        Ok((
            Self::new_flows(&self.lb1)? - a,
            Self::new_flows(&self.lb2)? - b,
        ))
    }
}

/// One request on a keep-alive connection: the backend's name.
fn ask(conn: &mut TcpStream) -> Result<String> {
    conn.write_all(b"GET / HTTP/1.1\r\nHost: lb\r\n\r\n")?;
    conn.set_read_timeout(Some(Duration::from_secs(5)))?;
    let mut buf = Vec::new();
    let mut chunk = [0u8; 1024];
    loop {
        let n = conn
            .read(&mut chunk)
            .context("reading a keep-alive answer")?;
        ensure!(n > 0, "the connection was closed");
        buf.extend_from_slice(&chunk[..n]);
        let text = String::from_utf8_lossy(&buf);
        if let Some(at) = text.find("\r\n\r\n")
            && text[at + 4..].ends_with('\n')
        {
            return Ok(text[at + 4..].trim().to_string());
        }
    }
}

/// Every long-lived connection answers again, from the backend it had.
fn still_served(conns: &mut [TcpStream], first: &[String], what: &str) -> Result<()> {
    for (i, (c, was)) in conns.iter_mut().zip(first).enumerate() {
        let now = ask(c).with_context(|| format!("{what}: connection {i}"))?;
        ensure!(
            &now == was,
            "{what}: connection {i} moved from {was} to {now}"
        );
    }
    Ok(())
}

#[test]
fn an_ecmp_tier_of_two_lb_hosts_spreads_drains_withdraws_and_fails_over() -> Result<()> {
    let lab = lab()?;
    let (l1, l2) = (lab.topo.lb_addr(), lab.host2.addr());

    // 1. Both hosts carry new connections (each at least a quarter).
    let (n1, n2) = lab.connect(40_000..41_000)?;
    ensure!(
        n1 >= 250 && n2 >= 250,
        "1000 connections: {n1} through lb1, {n2} through lb2"
    );

    // Long-lived connections, some through each host.
    let vip = lab.vip();
    let (a, b) = (Lab::new_flows(&lab.lb1)?, Lab::new_flows(&lab.lb2)?);
    let mut conns = lab.topo.client_ns().run(move || {
        (42_000..42_020)
            .map(|p| tcp_connect(Some(p), vip, Duration::from_secs(3)))
            .collect::<Result<Vec<_>>>()
    })??;
    let first: Vec<String> = conns.iter_mut().map(ask).collect::<Result<_>>()?;
    let (c1, c2) = (Lab::new_flows(&lab.lb1)? - a, Lab::new_flows(&lab.lb2)? - b);
    ensure!(
        c1 >= 2 && c2 >= 2,
        "20 long-lived connections: {c1} through lb1, {c2} through lb2"
    );

    // 4. lb2 drained: the router keeps lb1 only; no connection fails and
    // lb2 records no new flow.
    lab.lb2.cli_ok(&["host", "drain"])?;
    lab.wait_next_hops(&[l1], "lb2 drained")?;
    still_served(&mut conns, &first, "lb2 drained")?;
    let (n1, n2) = lab.connect(41_000..41_100)?;
    ensure!(
        n2 == 0 && n1 >= 100,
        "lb2 drained: {n1} new flows on lb1, {n2} on lb2"
    );
    lab.lb2.cli_ok(&["host", "undrain"])?;
    lab.wait_next_hops(&[l1, l2], "lb2 undrained")?;
    still_served(&mut conns, &first, "lb2 undrained")?;

    // 5. lb1's health checks fail (a firewall in its namespace): lb1
    // withdraws the VIP, lb2 keeps it.
    let ns1 = lab.topo.lb_ns();
    for cmd in [
        "add table inet lbtest",
        "add chain inet lbtest out { type filter hook output priority 0 ; }",
        "add rule inet lbtest out tcp dport 80 drop",
    ] {
        let o = ns1.exec(std::iter::once("nft").chain(cmd.split(' ')))?;
        ensure!(o.status.success(), "nft {cmd}: {o:?}");
    }
    lab.wait_next_hops(&[l2], "lb1's checks failing")?;
    still_served(&mut conns, &first, "lb1's checks failing")?;
    let o = ns1.exec(["nft", "delete", "table", "inet", "lbtest"])?;
    ensure!(o.status.success(), "nft delete: {o:?}");
    lab.wait_next_hops(&[l1, l2], "lb1's checks passing again")?;

    // 3. lb1's link dies: BFD drops it from the route; the long-lived
    // connections that crossed it go on through lb2, to the same backend;
    // new connections succeed during and after.
    let t = Instant::now();
    ns1.ip(["link", "set", &lab.topo.lb_iface(), "down"])?;
    let mut tried = 0;
    let during = loop {
        let hops = lab.next_hops()?;
        if hops == BTreeSet::from([l2]) {
            break t.elapsed();
        }
        ensure!(t.elapsed() < WAIT, "lb1 down: next hops still {hops:?}");
        // New connections while the router may still pick lb1 (a SYN
        // lost there is sent again).
        if tried < 5 {
            get_from_ports(lab.topo.client_ns(), vip, [43_000 + tried])?;
            tried += 1;
        }
        thread::sleep(Duration::from_millis(20));
    };
    eprintln!("scale-out: the router dropped the dead lb host after {during:?}");
    ensure!(
        during < Duration::from_secs(2),
        "the router kept the dead lb host for {during:?} (BFD should take ~0.3 s)"
    );
    still_served(&mut conns, &first, "lb1 dead")?;
    let (_, n2) = lab.connect(44_000..44_100)?;
    ensure!(n2 >= 100, "lb1 dead: lb2 counted {n2} of 100 new flows");
    drop(lab.birds);
    Ok(())
}
