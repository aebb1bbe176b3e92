//! Next hops that follow the network (issue 9, items 1 and 6), with the
//! real agent in network namespaces: a backend whose MAC changes gets new
//! connections again within seconds and none go to its old MAC; backends
//! whose ARP never answers neither slow the start nor the CLI; the same
//! following over IPv6 neighbour discovery. Needs root.
//! Each test builds its own topology and removes it, also when it fails.

use std::{
    net::{IpAddr, Ipv4Addr, SocketAddr, SocketAddrV4},
    sync::atomic::{AtomicBool, Ordering},
    thread,
    time::{Duration, Instant},
};

use anyhow::{Context as _, Result, bail, ensure};
use lb::mac::MacAddr;
use lb_tests::{
    agent::{AgentPaths, LbAgent, VipSpec, render_config},
    netns::{Netns, Topology, TopologyOpts},
    require_root,
    servers::{ServerKind, backend_name, http_get, http_get_from, spawn_on_backends, spawn_server},
    testprogs::{RETURN_ONLY, TestProgs},
};
use serde_json::Value;

const PORT: u16 = 80;

fn backends(topo: &Topology) -> Vec<Ipv4Addr> {
    (0..topo.backend_count())
        .map(|i| topo.backend_addr(i))
        .collect()
}

/// `lb backend list`'s entry for `addr`.
fn listed(agent: &LbAgent, addr: impl Into<IpAddr>) -> Result<Value> {
    let addr: IpAddr = addr.into();
    let list = agent.json(&["backend", "list"])?;
    list.as_array()
        .into_iter()
        .flatten()
        .find(|b| b["address"] == addr.to_string())
        .cloned()
        .with_context(|| format!("{addr} not in lb backend list: {list}"))
}

/// Waits (bounded) until `pred` holds for `addr`'s entry; returns how long
/// it took.
fn wait_listed(
    agent: &LbAgent,
    addr: impl Into<IpAddr> + Copy,
    what: &str,
    timeout: Duration,
    pred: impl Fn(&Value) -> bool,
) -> Result<Duration> {
    let start = Instant::now();
    loop {
        let b = listed(agent, addr)?;
        if pred(&b) {
            return Ok(start.elapsed());
        }
        if start.elapsed() >= timeout {
            bail!("{}: not {what} after {timeout:?}: {b}", addr.into());
        }
        thread::sleep(Duration::from_millis(50));
    }
}

/// Frames the bridge forwards to `mac`, counted by an nftables rule in the
/// switch namespace (removed with the namespace).
struct MacCounter<'a> {
    switch: &'a Netns,
}

impl<'a> MacCounter<'a> {
    fn new(switch: &'a Netns, mac: MacAddr) -> Result<Self> {
        switch.exec(["nft", "add", "table", "bridge", "lbtest"])?;
        switch.exec([
            "nft",
            "add chain bridge lbtest seen { type filter hook forward priority 0; policy accept; }",
        ])?;
        switch.exec([
            "nft",
            "add",
            "rule",
            "bridge",
            "lbtest",
            "seen",
            "ether",
            "daddr",
            &mac.to_string(),
            "counter",
        ])?;
        Ok(Self { switch })
    }

    fn packets(&self) -> Result<u64> {
        let out = self
            .switch
            .exec(["nft", "list", "chain", "bridge", "lbtest", "seen"])?;
        let text = String::from_utf8_lossy(&out.stdout);
        text.split_whitespace()
            .skip_while(|w| *w != "packets")
            .nth(1)
            .and_then(|n| n.parse().ok())
            .with_context(|| format!("no counter in:\n{text}"))
    }
}

#[test]
fn a_backend_whose_mac_changes_gets_new_connections_again_and_none_go_to_the_old_mac() -> Result<()>
{
    require_root();
    let topo = Topology::with_backends(3)?;
    let _servers = spawn_on_backends(&topo, ServerKind::Http, PORT)?;
    let vip = VipSpec::tcp("web", topo.vip(), PORT, &backends(&topo));
    let agent = LbAgent::start(topo.lb_ns(), &topo.lb_iface(), &[vip])?;
    let vip = SocketAddrV4::new(topo.vip(), PORT);
    let victim = 1;
    let addr = topo.backend_addr(victim);
    let old = MacAddr(topo.backend_mac(victim));
    let new = MacAddr([0x02, 0x18, topo.index(), 0x33, victim as u8, 0]);
    for i in 0..3 {
        wait_listed(
            &agent,
            topo.backend_addr(i),
            "up",
            Duration::from_secs(10),
            |b| b["health"] == "up",
        )?;
    }
    ensure!(listed(&agent, addr)?["mac"] == old.to_string());
    let counter = MacCounter::new(topo.switch_ns(), old)?;

    // Traffic from the client all along: one new connection after another.
    let stop = AtomicBool::new(false);
    let (converged, during) = thread::scope(|s| -> Result<_> {
        let traffic = s.spawn(|| {
            topo.client_ns().run(|| {
                let start = Instant::now();
                let mut failed = 0;
                let mut total = 0;
                while !stop.load(Ordering::Relaxed)
                    && total < 2000
                    && start.elapsed() < Duration::from_secs(30)
                {
                    total += 1;
                    if http_get(vip, Duration::from_secs(1)).is_err() {
                        failed += 1;
                    }
                }
                (failed, total)
            })
        });
        thread::sleep(Duration::from_millis(500));
        // The victim's NIC is swapped: same address, another MAC; its
        // kernel announces it (gratuitous ARP, arp_notify).
        let ns = topo.backend_ns(victim);
        let iface = topo.backend_iface(victim);
        ns.sysctl(&[(&format!("net.ipv4.conf.{iface}.arp_notify"), "1")])?;
        ns.ip(["link", "set", "dev", &iface, "address", &new.to_string()])?;
        let converged = wait_listed(
            &agent,
            addr,
            "at its new MAC",
            Duration::from_secs(10),
            |b| b["mac"] == new.to_string() && b["health"] == "up",
        );
        thread::sleep(Duration::from_millis(500));
        stop.store(true, Ordering::Relaxed);
        let during = traffic.join().expect("traffic thread")?;
        Ok((converged?, during))
    })?;
    eprintln!(
        "new MAC in use {converged:?} after the change; traffic meanwhile: {} of {} connections failed",
        during.0, during.1
    );
    ensure!(
        converged < Duration::from_secs(5),
        "lb took {converged:?} to follow the new MAC"
    );

    // From now on every new connection succeeds, the victim takes its
    // share, and not one frame goes to the old MAC.
    after_the_change(&topo, &agent, &counter, vip.into(), victim, old, new)
}

/// After a backend's MAC changed from `old` to `new` and lb shows the new
/// one: 150 new connections all succeed, the victim takes its share, not
/// one frame goes to the old MAC, and the change is logged.
fn after_the_change(
    topo: &Topology,
    agent: &LbAgent,
    counter: &MacCounter,
    vip: SocketAddr,
    victim: usize,
    old: MacAddr,
    new: MacAddr,
) -> Result<()> {
    let before = counter.packets()?;
    let answers = topo.client_ns().run(|| {
        (30_000..30_150)
            .map(|p| http_get_from(Some(p), vip, Duration::from_secs(3)))
            .collect::<Result<Vec<String>>>()
    })??;
    let to_victim = answers
        .iter()
        .filter(|a| a.trim() == backend_name(victim))
        .count();
    ensure!(
        to_victim >= 25,
        "{to_victim} of 150 connections reached the victim"
    );
    let after = counter.packets()?;
    ensure!(
        after == before,
        "{} frames went to the old MAC {old} after lb showed the new one",
        after - before
    );
    let log = agent.log_text();
    ensure!(
        log.contains(&format!("next hop now {new}")),
        "the change is not logged:\n{log}"
    );
    Ok(())
}

#[test]
fn an_ipv6_backend_whose_mac_changes_is_followed_over_neighbour_discovery() -> Result<()> {
    require_root();
    let topo = Topology::new(TopologyOpts {
        backends: 3,
        ipv6: true,
    })?;
    let _servers = (0..3)
        .map(|i| {
            spawn_server(
                topo.backend_ns(i),
                ServerKind::Http,
                SocketAddr::new(std::net::Ipv6Addr::UNSPECIFIED.into(), PORT),
                &backend_name(i),
            )
        })
        .collect::<Result<Vec<_>>>()?;
    let backends6: Vec<_> = (0..3).map(|i| topo.backend_addr6(i)).collect();
    let vip = VipSpec::tcp("web6", topo.vip6(), PORT, &backends6);
    let agent = LbAgent::start(topo.lb_ns(), &topo.lb_iface(), &[vip])?;
    let vip = SocketAddr::new(topo.vip6().into(), PORT);
    let victim = 1;
    let addr = topo.backend_addr6(victim);
    let old = MacAddr(topo.backend_mac(victim));
    let new = MacAddr([0x02, 0x18, topo.index(), 0x33, victim as u8, 0]);
    wait_listed(&agent, addr, "up", Duration::from_secs(10), |b| {
        b["health"] == "up"
    })?;
    ensure!(listed(&agent, addr)?["mac"] == old.to_string());
    let counter = MacCounter::new(topo.switch_ns(), old)?;

    // The victim's NIC is swapped; its kernel announces the new MAC with
    // an unsolicited neighbour advertisement (ndisc_notify).
    let ns = topo.backend_ns(victim);
    let iface = topo.backend_iface(victim);
    ns.sysctl(&[(&format!("net.ipv6.conf.{iface}.ndisc_notify"), "1")])?;
    ns.ip(["link", "set", "dev", &iface, "address", &new.to_string()])?;
    wait_listed(
        &agent,
        addr,
        "at its new MAC",
        Duration::from_secs(10),
        |b| b["mac"] == new.to_string() && b["health"] == "up",
    )?;
    after_the_change(&topo, &agent, &counter, vip, victim, old, new)
}

/// Start-up and CLI latency with 3 good backends next to 100 whose ARP
/// never answers (item 6): resolution runs off the event loop, all at once.
#[test]
fn unresolvable_backends_slow_neither_the_start_nor_the_cli() -> Result<()> {
    require_root();
    let topo = Topology::with_backends(3)?;
    let _servers = spawn_on_backends(&topo, ServerKind::Http, PORT)?;
    let mut vip = VipSpec::tcp("web", topo.vip(), PORT, &backends(&topo));
    let dead: Vec<Ipv4Addr> = (100..200)
        .map(|b| Ipv4Addr::new(198, 18, topo.index(), b))
        .collect();
    vip.backends.extend(dead.iter().map(|&a| (a.into(), 1)));
    let paths = AgentPaths::new()?;
    let text = render_config(&paths.instance, &paths.socket, &topo.lb_iface(), &[vip])
        .replace("max_backends = 64", "max_backends = 256");
    let start = Instant::now();
    let agent = LbAgent::start_with(topo.lb_ns(), paths, &text, &[])?;
    let ready = start.elapsed();
    // The good ones are in service; the dead ones out, saying why.
    for i in 0..3 {
        wait_listed(
            &agent,
            topo.backend_addr(i),
            "up",
            Duration::from_secs(10),
            |b| b["health"] == "up",
        )?;
    }
    let reason = wait_listed(
        &agent,
        dead[0],
        "unresolved",
        Duration::from_secs(10),
        |b| {
            b["health"] == "unresolved"
                && b["next_hop_error"]
                    .as_str()
                    .is_some_and(|e| e.contains("no ARP answer from"))
        },
    );
    let answers = topo.client_ns().run(|| {
        (31_000..31_060)
            .map(|p| {
                http_get_from(
                    Some(p),
                    SocketAddrV4::new(topo.vip(), PORT),
                    Duration::from_secs(3),
                )
            })
            .collect::<Result<Vec<String>>>()
    })??;
    ensure!(answers.len() == 60);
    reason?;
    // A drain answers at once while 100 ARP resolutions are outstanding.
    let mut drains = Vec::new();
    for i in 0..5 {
        let target = topo.backend_addr(i % 3).to_string();
        for cmd in ["drain", "undrain"] {
            let t = Instant::now();
            agent.cli_ok(&["backend", cmd, "web", &target])?;
            drains.push(t.elapsed());
        }
    }
    drains.sort();
    let worst = *drains.last().unwrap_or(&Duration::ZERO);
    eprintln!(
        "3 good + 100 unresolvable backends: lb status answered {ready:?} after lb run; drain/undrain median {:?}, worst {worst:?}",
        drains[drains.len() / 2]
    );
    ensure!(
        ready < Duration::from_secs(6),
        "lb run answered only after {ready:?}"
    );
    ensure!(
        worst < Duration::from_secs(2),
        "a drain took {worst:?}: {drains:?}"
    );
    Ok(())
}

/// A backend behind a second interface of the lb namespace (a veth pair
/// `<lb iface>x` ↔ `bxe` into its own namespace, 198.19.200.0/24): lb
/// redirects to it through the DEVMAP. Replies go back through the lb
/// namespace's kernel (forwarding on for this test only).
struct SecondSegment<'a> {
    topo: &'a Topology,
    ns: Netns,
    iface: String,
    /// XDP_PASS on the backend's end, so redirected frames are received.
    peer_xdp: Option<TestProgs>,
}

const SECOND_LB: &str = "198.19.200.1/24";
const SECOND_BACKEND: Ipv4Addr = Ipv4Addr::new(198, 19, 200, 2);

impl<'a> SecondSegment<'a> {
    fn new(topo: &'a Topology) -> Result<Self> {
        let ns = Netns::create(format!("{}-x", topo.lb_ns().name()))?;
        ns.sysctl(&[
            ("net.ipv4.conf.all.rp_filter", "0"),
            ("net.ipv4.conf.default.rp_filter", "0"),
            ("net.ipv4.conf.all.arp_ignore", "1"),
            ("net.ipv4.conf.all.arp_announce", "2"),
        ])?;
        ns.ip(["link", "set", "lo", "up"])?;
        ns.ip(["addr", "add", &format!("{}/32", topo.vip()), "dev", "lo"])?;
        topo.lb_ns().sysctl(&[("net.ipv4.ip_forward", "1")])?;
        let mut seg = Self {
            iface: format!("{}x", topo.lb_iface()),
            topo,
            ns,
            peer_xdp: None,
        };
        seg.plug()?;
        Ok(seg)
    }

    /// (Re)creates the veth pair: a new interface index each time.
    fn plug(&mut self) -> Result<()> {
        let lb = self.topo.lb_ns();
        lb.ip([
            "link",
            "add",
            &self.iface,
            "type",
            "veth",
            "peer",
            "name",
            "bxe",
            "netns",
            self.ns.name(),
        ])?;
        lb.ip(["addr", "add", SECOND_LB, "dev", &self.iface])?;
        lb.ip(["link", "set", &self.iface, "up"])?;
        let cidr = format!("{SECOND_BACKEND}/24");
        self.ns.ip(["addr", "add", &cidr, "dev", "bxe"])?;
        self.ns.ip(["link", "set", "bxe", "up"])?;
        self.ns
            .ip(["route", "add", "default", "via", "198.19.200.1"])?;
        self.peer_xdp = Some(self.ns.run(|| -> Result<TestProgs> {
            let mut progs = TestProgs::load()?;
            progs.attach(RETURN_ONLY, "bxe", aya::programs::XdpMode::Driver)?;
            Ok(progs)
        })??);
        Ok(())
    }

    fn unplug(&mut self) -> Result<()> {
        self.peer_xdp = None;
        self.topo.lb_ns().ip(["link", "del", &self.iface])?;
        Ok(())
    }

    fn ifindex(&self) -> Result<u64> {
        let out = self.topo.lb_ns().ip(["-o", "link", "show", &self.iface])?;
        let text = String::from_utf8_lossy(&out.stdout);
        text.split(':')
            .next()
            .and_then(|n| n.trim().parse().ok())
            .with_context(|| format!("no index in {text:?}"))
    }
}

fn get_all(topo: &Topology, ports: std::ops::Range<u16>) -> Result<Vec<String>> {
    let vip = SocketAddrV4::new(topo.vip(), PORT);
    topo.client_ns().run(|| {
        ports
            .map(|p| {
                http_get_from(Some(p), vip, Duration::from_secs(3))
                    .map(|b| b.trim().to_string())
                    .with_context(|| format!("GET from port {p}"))
            })
            .collect::<Result<Vec<String>>>()
    })?
}

#[test]
fn a_recreated_egress_interface_is_followed_to_its_new_index() -> Result<()> {
    require_root();
    let topo = Topology::with_backends(0)?;
    let mut seg = SecondSegment::new(&topo)?;
    let _server = spawn_server(
        &seg.ns,
        ServerKind::Http,
        SocketAddrV4::new(Ipv4Addr::UNSPECIFIED, PORT),
        "bx",
    )?;
    let vip = VipSpec::tcp("web", topo.vip(), PORT, &[SECOND_BACKEND]);
    let agent = LbAgent::start(topo.lb_ns(), &topo.lb_iface(), &[vip])?;
    let iface = seg.iface.clone();
    let up = |b: &Value| b["health"] == "up" && b["iface"] == iface.as_str();
    wait_listed(&agent, SECOND_BACKEND, "up", Duration::from_secs(10), up)?;
    let answers = get_all(&topo, 32_000..32_020)?;
    ensure!(answers.iter().all(|a| a == "bx"), "{answers:?}");
    let first = seg.ifindex()?;

    // The egress interface goes away: the backend is out, saying why.
    seg.unplug()?;
    wait_listed(
        &agent,
        SECOND_BACKEND,
        "unresolved",
        Duration::from_secs(10),
        |b| {
            b["health"] == "unresolved"
                && b["next_hop_error"]
                    .as_str()
                    .is_some_and(|e| e.contains("no route to"))
        },
    )?;
    // And comes back under a new index: lb follows it.
    seg.plug()?;
    let second = seg.ifindex()?;
    ensure!(first != second, "the interface kept index {first}");
    let took = wait_listed(&agent, SECOND_BACKEND, "up", Duration::from_secs(10), up)?;
    eprintln!("egress re-created (ifindex {first} -> {second}): backend up again after {took:?}");
    let answers = get_all(&topo, 32_100..32_120)?;
    ensure!(answers.iter().all(|a| a == "bx"), "{answers:?}");
    let stats = agent.json(&["stats"])?;
    let no_tx_port = stats["reasons"]["drop_no_tx_port"][0].as_u64().unwrap_or(0);
    ensure!(
        no_tx_port == 0,
        "{no_tx_port} packets dropped for want of a TX port: {stats}"
    );
    Ok(())
}
