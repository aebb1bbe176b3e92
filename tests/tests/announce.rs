//! VIP announcement through the real agent, in network namespaces: with
//! `[agent.announce] table = 100`, the lb namespace's table 100 holds a
//! host route (proto 200, dev lo) for every VIP address that is ready (a
//! backend whose health check passed), and none for the others: before
//! any check passes, after the backend's server stops, after `lb vip
//! withdraw`, while the host is drained, after a clean stop. An agent
//! stopped with `--keep-datapath` leaves its routes; the next one keeps
//! them (no flap) and removes a stale route of its protocol, never a route
//! of another protocol. With BIRD 2 (Debian package bird2, installed by
//! `cargo xtask setup`) in the lb namespace learning table 100 and a BIRD
//! router namespace peering with it over BGP, the router's route to the
//! VIP follows. Needs root.

use std::{
    collections::BTreeSet,
    net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr},
    thread,
    time::{Duration, Instant},
};

use anyhow::{Context as _, Result, bail, ensure};
use lb_tests::{
    agent::{AgentPaths, LbAgent, VipSpec, metrics, render_config},
    netns::{ChildGuard, NAME_PREFIX, Netns, Topology, TopologyOpts},
    require_root,
    scale_out::{TempDir, start_bird},
    servers::{ServerKind, backend_name, spawn_server},
};

const PORT: u16 = 80;
const TABLE: &str = "100";
const PROTO: &str = "200";
/// Bound of every wait for a route to appear or go.
const WAIT: Duration = Duration::from_secs(10);

/// The host routes of `proto` in table 100 of `ns`, both families.
fn routes(ns: &Netns, proto: &str) -> Result<BTreeSet<IpAddr>> {
    let mut out = BTreeSet::new();
    for family in ["-4", "-6"] {
        let o = match ns.ip([family, "route", "show", "table", TABLE, "proto", proto]) {
            Ok(o) => o,
            // No route was ever added to the table (of this family).
            Err(e) if format!("{e:#}").contains("table does not exist") => continue,
            Err(e) => return Err(e),
        };
        for line in String::from_utf8_lossy(&o.stdout).lines() {
            let first = line.split_whitespace().next().unwrap_or("");
            let addr = first.split('/').next().unwrap_or("");
            out.insert(
                addr.parse()
                    .with_context(|| format!("route line {line:?}"))?,
            );
        }
    }
    Ok(out)
}

/// Waits (bounded by [`WAIT`]) until the agent's routes are `want`.
fn wait_routes(s: &Setup, want: &[IpAddr], what: &str) -> Result<()> {
    let want: BTreeSet<IpAddr> = want.iter().copied().collect();
    let deadline = Instant::now() + WAIT;
    loop {
        let now = routes(s.topo.lb_ns(), PROTO)?;
        if now == want {
            return Ok(());
        }
        if Instant::now() >= deadline {
            bail!(
                "{what}: table {TABLE} proto {PROTO} holds {now:?}, not {want:?}, after {WAIT:?}\n{}",
                s.agent.log_text()
            );
        }
        thread::sleep(Duration::from_millis(100));
    }
}

/// Waits (bounded by [`WAIT`]) until the agent's metrics page has `line`
/// (they are sampled once a second).
fn wait_metric(s: &Setup, line: &str) -> Result<()> {
    let deadline = Instant::now() + WAIT;
    loop {
        let text = metrics(s.topo.lb_ns())?;
        if text.lines().any(|l| l == line) {
            return Ok(());
        }
        if Instant::now() >= deadline {
            bail!("no {line:?} in the metrics after {WAIT:?}:\n{text}");
        }
        thread::sleep(Duration::from_millis(200));
    }
}

/// A VIP of `lb vip list --json`, by name.
fn vip_view(agent: &LbAgent, name: &str) -> Result<serde_json::Value> {
    let list = agent.json(&["vip", "list"])?;
    list.as_array()
        .into_iter()
        .flatten()
        .find(|v| v["name"] == name)
        .cloned()
        .with_context(|| format!("no VIP {name} in {list}"))
}

struct Setup {
    // Field order is drop order: agent and servers before the namespaces.
    agent: LbAgent,
    v4_server: Option<ChildGuard>,
    v6_server: Option<ChildGuard>,
    topo: Topology,
}

impl Setup {
    fn vip4(&self) -> IpAddr {
        self.topo.vip().into()
    }

    fn vip6(&self) -> IpAddr {
        self.topo.vip6().into()
    }

    fn start_v4_server(&mut self) -> Result<()> {
        let listen = SocketAddr::new(Ipv4Addr::UNSPECIFIED.into(), PORT);
        self.v4_server = Some(spawn_server(
            self.topo.backend_ns(0),
            ServerKind::Http,
            listen,
            &backend_name(0),
        )?);
        Ok(())
    }

    fn start_v6_server(&mut self) -> Result<()> {
        let listen = SocketAddr::new(Ipv6Addr::UNSPECIFIED.into(), PORT);
        self.v6_server = Some(spawn_server(
            self.topo.backend_ns(0),
            ServerKind::Http,
            listen,
            &backend_name(0),
        )?);
        Ok(())
    }
}

/// One backend, no server yet; "web" (IPv4) and "web6" (IPv6) in front of
/// it, announced in table 100.
fn setup() -> Result<Setup> {
    require_root();
    let topo = Topology::new(TopologyOpts {
        backends: 1,
        ipv6: true,
    })?;
    let paths = AgentPaths::new()?;
    let vips = [
        VipSpec::tcp("web", topo.vip(), PORT, &[topo.backend_addr(0)]),
        VipSpec::tcp("web6", topo.vip6(), PORT, &[topo.backend_addr6(0)]),
    ];
    let mut text = render_config(&paths.instance, &paths.socket, &topo.lb_iface(), &vips);
    text += &format!("[agent.announce]\ntable = {TABLE}\nprotocol = {PROTO}\n");
    let agent = LbAgent::start_with(topo.lb_ns(), paths, &text, &[])?;
    Ok(Setup {
        agent,
        v4_server: None,
        v6_server: None,
        topo,
    })
}

#[test]
fn ready_vip_addresses_are_routes_in_the_announce_table() -> Result<()> {
    let mut s = setup()?;
    let (v4, v6) = (s.vip4(), s.vip6());

    // No backend has passed a check: no route, also once they are down.
    let until = Instant::now() + Duration::from_millis(1500);
    while Instant::now() < until {
        let now = routes(s.topo.lb_ns(), PROTO)?;
        ensure!(now.is_empty(), "announced before any check passed: {now:?}");
        thread::sleep(Duration::from_millis(100));
    }
    s.agent
        .wait_health(Some("web"), s.topo.backend_addr(0).into(), "down", WAIT)?;
    ensure!(routes(s.topo.lb_ns(), PROTO)?.is_empty());
    let web = vip_view(&s.agent, "web")?;
    ensure!(web["announced"] == false, "{web}");
    ensure!(web["announce"] == "no usable backend", "{web}");

    // Servers up: both addresses announced, dev lo, proto 200.
    s.start_v4_server()?;
    s.start_v6_server()?;
    wait_routes(&s, &[v4, v6], "backends up")?;
    let shown = s.topo.lb_ns().ip(["-4", "route", "show", "table", TABLE])?;
    let shown = String::from_utf8_lossy(&shown.stdout).into_owned();
    ensure!(
        shown.contains(&format!("{v4} dev lo proto {PROTO}")),
        "{shown}"
    );
    let web = vip_view(&s.agent, "web")?;
    ensure!(
        web["announced"] == true && web["announce"] == "ready",
        "{web}"
    );
    let list = s.agent.cli_ok(&["vip", "list"])?;
    ensure!(list.contains("ANNOUNCED"), "{list}");
    wait_metric(&s, r#"lb_vip_announced{vip="web"} 1"#)?;

    // A route removed behind the agent's back is put back (the table is
    // re-read every 5 s).
    let o = s.topo.lb_ns().ip([
        "route",
        "del",
        &format!("{v4}/32"),
        "table",
        TABLE,
        "proto",
        PROTO,
    ])?;
    ensure!(o.status.success(), "{o:?}");
    ensure!(!routes(s.topo.lb_ns(), PROTO)?.contains(&v4));
    wait_routes(&s, &[v4, v6], "route removed by someone else")?;
    ensure!(
        s.agent.log_text().contains("changed outside lb"),
        "{}",
        s.agent.log_text()
    );

    // The IPv4 backend's server stops: its address goes, the other stays.
    drop(s.v4_server.take());
    wait_routes(&s, &[v6], "IPv4 server stopped")?;
    s.start_v4_server()?;
    wait_routes(&s, &[v4, v6], "IPv4 server back")?;

    // Withdraw and announce one VIP.
    let said = s.agent.cli_ok(&["vip", "withdraw", "web"])?;
    ensure!(said.contains("withdrawn"), "{said}");
    wait_routes(&s, &[v6], "web withdrawn")?;
    wait_metric(&s, r#"lb_vip_announced{vip="web"} 0"#)?;
    let web = vip_view(&s.agent, "web")?;
    ensure!(web["announced"] == false, "{web}");
    ensure!(
        web["announce"].as_str().unwrap_or("").contains("withdrawn"),
        "{web}"
    );
    let status = s.agent.json(&["status"])?;
    ensure!(status["announce"]["withdrawn"][0] == "web", "{status}");
    s.agent
        .cli_ok(&["vip", "announce", &format!("{v4}:{PORT}/tcp")])?;
    wait_routes(&s, &[v4, v6], "web announced again")?;

    // Drain and undrain the host.
    s.agent.cli_ok(&["host", "drain"])?;
    wait_routes(&s, &[], "host drained")?;
    let status = s.agent.cli_ok(&["status"])?;
    ensure!(status.contains("host drained"), "{status}");
    ensure!(
        s.agent.json(&["status"])?["announce"]["host_drained"] == true,
        "{status}"
    );
    let web6 = vip_view(&s.agent, "web6")?;
    ensure!(
        web6["announced"] == false && web6["announce"].as_str().unwrap_or("").contains("drained"),
        "{web6}"
    );
    s.agent.cli_ok(&["host", "undrain"])?;
    wait_routes(&s, &[v4, v6], "host undrained")?;
    let status = s.agent.cli_ok(&["status"])?;
    ensure!(status.contains("2 address(es) announced"), "{status}");

    // A clean stop withdraws everything.
    s.agent.stop()?;
    let now = routes(s.topo.lb_ns(), PROTO)?;
    ensure!(now.is_empty(), "routes left by a clean stop: {now:?}");

    // Again, stopped with --keep-datapath: the routes stay.
    s.agent.spawn(&["--keep-datapath"])?;
    wait_routes(&s, &[v4, v6], "restarted")?;
    s.agent.stop()?;
    thread::sleep(Duration::from_millis(500));
    let now = routes(s.topo.lb_ns(), PROTO)?;
    ensure!(
        now == BTreeSet::from([v4, v6]),
        "--keep-datapath left {now:?}"
    );

    // A stale route of the agent's protocol (no VIP has the address) and
    // a route of another protocol in the same table.
    let stale = "198.18.77.77";
    let foreign = "198.18.77.78";
    for (a, proto) in [(stale, PROTO), (foreign, "201")] {
        let o = s.topo.lb_ns().ip([
            "route", "add", a, "dev", "lo", "table", TABLE, "proto", proto,
        ])?;
        ensure!(o.status.success(), "ip route add {a}: {o:?}");
    }
    ensure!(routes(s.topo.lb_ns(), PROTO)?.contains(&stale.parse::<IpAddr>()?));

    // The next agent takes the routes over: the VIPs' stay throughout,
    // the stale one goes, the foreign one is left alone.
    s.agent.spawn(&[])?;
    let now = routes(s.topo.lb_ns(), PROTO)?;
    ensure!(
        now.contains(&v4) && now.contains(&v6),
        "the VIP routes went at the takeover: {now:?}"
    );
    wait_routes(&s, &[v4, v6], "stale route removed")?;
    let foreign_left = routes(s.topo.lb_ns(), "201")?;
    ensure!(
        foreign_left == BTreeSet::from([foreign.parse::<IpAddr>()?]),
        "{foreign_left:?}"
    );
    ensure!(
        s.agent.log_text().contains("taken over"),
        "{}",
        s.agent.log_text()
    );
    s.agent.stop()?;
    ensure!(routes(s.topo.lb_ns(), PROTO)?.is_empty());
    Ok(())
}

#[test]
fn a_missing_announce_device_fails_the_start_and_attaches_nothing() -> Result<()> {
    require_root();
    let topo = Topology::with_backends(1)?;
    let paths = AgentPaths::new()?;
    let vips = [VipSpec::tcp(
        "web",
        topo.vip(),
        PORT,
        &[topo.backend_addr(0)],
    )];
    let mut text = render_config(&paths.instance, &paths.socket, &topo.lb_iface(), &vips);
    text += &format!("[agent.announce]\ntable = {TABLE}\ndevice = \"nosuchdev0\"\n");
    match LbAgent::start_with(topo.lb_ns(), paths, &text, &[]) {
        Ok(a) => bail!("started with a missing device:\n{}", a.log_text()),
        Err(e) => {
            let e = format!("{e:#}");
            ensure!(e.contains("\"nosuchdev0\" does not exist"), "{e}");
        }
    }
    let o = topo.lb_ns().ip(["link", "show", &topo.lb_iface()])?;
    let link = String::from_utf8_lossy(&o.stdout).into_owned();
    ensure!(!link.contains("xdp"), "XDP left attached: {link}");
    Ok(())
}

/// The lb host's side of the BGP link, and the router's.
const LB_LINK: &str = "198.18.254.2";
const RT_LINK: &str = "198.18.254.1";
/// The same link's IPv6 addresses (the IPv6 BGP session).
const LB_LINK6: &str = "2001:2:0:fe::2";
const RT_LINK6: &str = "2001:2:0:fe::1";

/// The router's BIRD-installed route to `vip`, if any (its line).
fn router_route(rt: &Netns, vip: IpAddr) -> Result<Option<String>> {
    let family = if vip.is_ipv4() { "-4" } else { "-6" };
    let o = rt.ip([family, "route", "show", "proto", "bird"])?;
    Ok(String::from_utf8_lossy(&o.stdout)
        .lines()
        .find(|l| l.split_whitespace().next() == Some(vip.to_string().as_str()))
        .map(str::to_string))
}

/// Waits (bounded by [`WAIT`]) until the router has a route to the IPv4
/// VIP through the lb host (`present`) or none.
fn wait_router_route(s: &Setup, rt: &Netns, present: bool, what: &str) -> Result<()> {
    wait_router_route_to(s, rt, s.vip4(), present, what)
}

/// [`wait_router_route`] for `vip` (IPv4 or IPv6).
fn wait_router_route_to(
    s: &Setup,
    rt: &Netns,
    vip: IpAddr,
    present: bool,
    what: &str,
) -> Result<()> {
    let via = if vip.is_ipv4() { LB_LINK } else { LB_LINK6 };
    let deadline = Instant::now() + WAIT;
    loop {
        let route = router_route(rt, vip)?;
        match &route {
            Some(l) if present && l.contains(&format!("via {via} ")) => return Ok(()),
            None if !present => return Ok(()),
            _ => {}
        }
        if Instant::now() >= deadline {
            bail!(
                "{what}: the router's route to {vip} is {route:?} after {WAIT:?}; lb table {TABLE}: {:?}\n{}",
                routes(s.topo.lb_ns(), PROTO)?,
                s.agent.log_text()
            );
        }
        thread::sleep(Duration::from_millis(100));
    }
}

/// BGP timers of every BIRD session here: retry within a second.
const TIMERS: &str = "connect delay time 1; connect retry time 1; error wait time 1, 10;";

/// A router namespace linked to the lb namespace (`rt0` there, `up0` in
/// the lb namespace, IPv4 addresses RT_LINK/LB_LINK; veths made inside the
/// namespaces: nothing appears in the root namespace).
fn router_namespace(s: &Setup, role: &str) -> Result<Netns> {
    let rt = Netns::create(format!("{NAME_PREFIX}{}-{role}-rt", std::process::id()))?;
    let lb_ns = s.topo.lb_ns().name().to_string();
    let o = rt.ip([
        "link", "add", "rt0", "type", "veth", "peer", "name", "up0", "netns", &lb_ns,
    ])?;
    ensure!(o.status.success(), "{o:?}");
    rt.ip(["addr", "add", &format!("{RT_LINK}/30"), "dev", "rt0"])?;
    rt.ip(["link", "set", "rt0", "up"])?;
    s.topo
        .lb_ns()
        .ip(["addr", "add", &format!("{LB_LINK}/30"), "dev", "up0"])?;
    s.topo.lb_ns().ip(["link", "set", "up0", "up"])?;
    Ok(rt)
}

/// The BIRD router's config: the lb host's routes into its kernel table,
/// over an IPv4 session (and an IPv6 one with `v6`).
fn bird_router_conf(v6: bool) -> String {
    let mut conf = format!(
        "router id {RT_LINK};\nprotocol device {{ }}\n\
         protocol kernel k4 {{ ipv4 {{ import none; export all; }}; merge paths on; }}\n\
         protocol bgp lb1 {{ local {RT_LINK} as 65000; neighbor {LB_LINK} as 65001; {TIMERS}\n  \
         ipv4 {{ import all; export none; }}; }}\n"
    );
    if v6 {
        conf += &format!(
            "protocol kernel k6 {{ ipv6 {{ import none; export all; }}; merge paths on; }}\n\
             protocol bgp lb1v6 {{ local {RT_LINK6} as 65000; neighbor {LB_LINK6} as 65001; {TIMERS}\n  \
             ipv6 {{ import all; export none; }}; }}\n"
        );
    }
    conf
}

#[test]
fn bird_learns_the_table_and_the_router_follows_over_bgp() -> Result<()> {
    let mut s = setup()?;
    // A router namespace linked to the lb namespace (veths made inside
    // the namespaces: nothing appears in the root namespace).
    let rt = router_namespace(&s, "bird")?;
    for (ns, dev, addr) in [(&rt, "rt0", RT_LINK6), (s.topo.lb_ns(), "up0", LB_LINK6)] {
        ns.sysctl(&[(&format!("net.ipv6.conf.{dev}.disable_ipv6"), "0")])?;
        let o = ns.ip([
            "-6",
            "addr",
            "add",
            &format!("{addr}/64"),
            "dev",
            dev,
            "nodad",
        ])?;
        ensure!(o.status.success(), "{o:?}");
    }
    let dir = TempDir(std::env::temp_dir().join(format!("lb-bird-{}", std::process::id())));
    std::fs::create_dir_all(&dir.0)?;
    let router_conf = bird_router_conf(true);
    let lb_conf = format!(
        "router id {LB_LINK};\nprotocol device {{ }}\n\
         protocol kernel vip4 {{ kernel table {TABLE}; learn; ipv4 {{ import all; export none; }}; }}\n\
         protocol kernel vip6 {{ kernel table {TABLE}; learn; ipv6 {{ import all; export none; }}; }}\n\
         protocol bgp rt4 {{ local {LB_LINK} as 65001; neighbor {RT_LINK} as 65000; {TIMERS}\n  \
         ipv4 {{ import none; export where proto = \"vip4\"; }}; }}\n\
         protocol bgp up6 {{ local {LB_LINK6} as 65001; neighbor {RT_LINK6} as 65000; {TIMERS}\n  \
         ipv6 {{ import none; export where proto = \"vip6\"; }}; }}\n"
    );
    // Field order of the guards: dropped (killed) before the namespaces.
    let _router_bird = start_bird(&rt, &dir.0, "router", &router_conf)?;
    let _lb_bird = start_bird(s.topo.lb_ns(), &dir.0, "lb", &lb_conf)?;

    // Nothing ready: no route anywhere.
    s.agent
        .wait_health(Some("web"), s.topo.backend_addr(0).into(), "down", WAIT)?;
    ensure!(router_route(&rt, s.vip4())?.is_none());
    // Ready: lb's table, BIRD, BGP, the router's table.
    s.start_v4_server()?;
    wait_router_route(&s, &rt, true, "backend up")?;
    s.agent.cli_ok(&["vip", "withdraw", "web"])?;
    wait_router_route(&s, &rt, false, "web withdrawn")?;
    s.agent.cli_ok(&["vip", "announce", "web"])?;
    wait_router_route(&s, &rt, true, "web announced")?;
    drop(s.v4_server.take());
    wait_router_route(&s, &rt, false, "server stopped")?;
    s.start_v4_server()?;
    wait_router_route(&s, &rt, true, "server back")?;
    // IPv6: its own session and kernel table import; the IPv6 VIP follows
    // its own readiness and requests, the IPv4 one stays.
    let vip6 = s.vip6();
    ensure!(
        router_route(&rt, vip6)?.is_none(),
        "IPv6 VIP routed before its server ran"
    );
    s.start_v6_server()?;
    wait_router_route_to(&s, &rt, vip6, true, "IPv6 backend up")?;
    s.agent.cli_ok(&["vip", "withdraw", "web6"])?;
    wait_router_route_to(&s, &rt, vip6, false, "web6 withdrawn")?;
    wait_router_route(&s, &rt, true, "web stays while web6 is withdrawn")?;
    s.agent.cli_ok(&["vip", "announce", "web6"])?;
    wait_router_route_to(&s, &rt, vip6, true, "web6 announced")?;
    s.agent.stop()?;
    wait_router_route(&s, &rt, false, "agent stopped")?;
    wait_router_route_to(&s, &rt, vip6, false, "agent stopped (IPv6)")?;
    Ok(())
}

/// An FRR daemon (`zebra` or `bgpd`) of the lb namespace, in the
/// foreground, as user frr, with private config, zserv socket, vty socket
/// directory and pid file under `run` (owned by frr).
fn start_frr(ns: &Netns, run: &std::path::Path, daemon: &str, conf: &str) -> Result<ChildGuard> {
    let bin = std::path::Path::new("/usr/lib/frr").join(daemon);
    ensure!(
        bin.is_file(),
        "{} not found: install the Debian package frr (`cargo xtask setup` does)",
        bin.display()
    );
    let path = run.join(format!("{daemon}.conf"));
    std::fs::write(&path, conf)?;
    let chown = std::process::Command::new("chown")
        .args(["-R", "frr:frr"])
        .arg(run)
        .status()?;
    ensure!(chown.success(), "chown frr {}", run.display());
    let zserv = run.join("zserv.api");
    let pid = run.join(format!("{daemon}.pid"));
    let mut g = ns.spawn([
        bin.as_os_str(),
        "-z".as_ref(),
        zserv.as_os_str(),
        "--vty_socket".as_ref(),
        run.as_os_str(),
        "-P".as_ref(),
        "0".as_ref(),
        "-f".as_ref(),
        path.as_os_str(),
        "-i".as_ref(),
        pid.as_os_str(),
    ])?;
    thread::sleep(Duration::from_millis(500));
    if let Some(status) = g.try_wait()? {
        bail!("FRR {daemon} exited at once ({status}); config:\n{conf}");
    }
    Ok(g)
}

#[test]
fn frr_imports_the_table_and_the_router_follows_over_bgp() -> Result<()> {
    let mut s = setup()?;
    // The same link and BIRD router as the BIRD test; FRR on the lb host
    // (zebra imports table 100, bgpd redistributes it), as the README
    // documents.
    let rt = router_namespace(&s, "frr")?;
    let dir = TempDir(std::env::temp_dir().join(format!("lb-frr-{}", std::process::id())));
    std::fs::create_dir_all(&dir.0)?;
    let router_conf = bird_router_conf(false);
    let run = dir.0.join("frr");
    std::fs::create_dir_all(&run)?;
    let zebra_conf = format!("ip import-table {TABLE}\n");
    let bgpd_conf = format!(
        "router bgp 65001\n bgp router-id {LB_LINK}\n no bgp ebgp-requires-policy\n \
         timers bgp 1 3\n neighbor {RT_LINK} remote-as 65000\n neighbor {RT_LINK} timers connect 1\n \
         address-family ipv4 unicast\n  redistribute table {TABLE}\n exit-address-family\n"
    );
    // Guards: dropped (killed) before the namespaces.
    let _router_bird = start_bird(&rt, &dir.0, "router", &router_conf)?;
    let _zebra = start_frr(s.topo.lb_ns(), &run, "zebra", &zebra_conf)?;
    let _bgpd = start_frr(s.topo.lb_ns(), &run, "bgpd", &bgpd_conf)?;

    s.agent
        .wait_health(Some("web"), s.topo.backend_addr(0).into(), "down", WAIT)?;
    ensure!(router_route(&rt, s.vip4())?.is_none());
    s.start_v4_server()?;
    wait_router_route(&s, &rt, true, "FRR: backend up")?;
    s.agent.cli_ok(&["vip", "withdraw", "web"])?;
    wait_router_route(&s, &rt, false, "FRR: web withdrawn")?;
    s.agent.cli_ok(&["vip", "announce", "web"])?;
    wait_router_route(&s, &rt, true, "FRR: web announced")?;
    s.agent.stop()?;
    wait_router_route(&s, &rt, false, "FRR: agent stopped")?;
    Ok(())
}
