//! End-to-end behaviour of an IPv6 VIP (dsr-l2) in network namespaces on
//! 2001:2::/48: a real client, the real `lb` agent (next hops over
//! neighbour discovery), real servers on the backends holding the VIP on
//! lo and replying directly to the client. Needs root. Each test builds
//! its own topology and removes it, also when it fails.

use std::{
    net::{IpAddr, Ipv6Addr, SocketAddr},
    thread,
    time::{Duration, Instant},
};

use anyhow::{Context as _, Result, ensure};
use lb_tests::{
    agent::{AgentPaths, LbAgent, VipSpec, metrics, render_config},
    netns::{ChildGuard, Topology, TopologyOpts},
    require_root,
    servers::{
        EchoStream, ServerKind, backend_name, get_from_ports, one_udp_flow_one_backend, shares,
        spawn_server, tcp_connect,
    },
};

const PORT: u16 = 80;
const STREAM_PORT: u16 = 7000;
const T: Duration = Duration::from_secs(3);

fn topology(backends: usize) -> Result<Topology> {
    Topology::new(TopologyOpts {
        backends,
        ipv6: true,
    })
}

fn backends6(topo: &Topology) -> Vec<Ipv6Addr> {
    (0..topo.backend_count())
        .map(|i| topo.backend_addr6(i))
        .collect()
}

fn vip6(topo: &Topology, port: u16) -> SocketAddr {
    SocketAddr::new(topo.vip6().into(), port)
}

/// Servers of `kind` on `[::]:port` (IPv6 only) of every backend.
fn spawn_v6(topo: &Topology, kind: ServerKind, port: u16) -> Result<Vec<ChildGuard>> {
    (0..topo.backend_count())
        .map(|i| spawn_v6_on(topo, i, kind, port))
        .collect()
}

fn spawn_v6_on(topo: &Topology, i: usize, kind: ServerKind, port: u16) -> Result<ChildGuard> {
    let listen = match kind {
        // The UDP echo server answers from the address it is bound to.
        ServerKind::UdpEcho => vip6(topo, port),
        _ => SocketAddr::new(Ipv6Addr::UNSPECIFIED.into(), port),
    };
    spawn_server(topo.backend_ns(i), kind, listen, &backend_name(i))
}

/// An IPv6 topology with HTTP servers on every backend and an agent in
/// front of the IPv6 VIP.
struct Setup {
    // Field order is drop order: agent and servers before the namespaces.
    agent: LbAgent,
    servers: Vec<ChildGuard>,
    topo: Topology,
}

fn setup(n: usize) -> Result<Setup> {
    require_root();
    let topo = topology(n)?;
    let servers = spawn_v6(&topo, ServerKind::Http, PORT)?;
    let vip = VipSpec::tcp("web6", topo.vip6(), PORT, &backends6(&topo));
    let agent = LbAgent::start(topo.lb_ns(), &topo.lb_iface(), &[vip])?;
    Ok(Setup {
        agent,
        servers,
        topo,
    })
}

#[test]
fn ipv6_distribution_over_three_backends_resolved_by_neighbour_discovery() -> Result<()> {
    let s = setup(3)?;
    // Every backend's next hop is its own MAC, learnt over ND.
    let list = s.agent.json(&["backend", "list"])?;
    for i in 0..3 {
        let b = list
            .as_array()
            .into_iter()
            .flatten()
            .find(|b| b["address"] == s.topo.backend_addr6(i).to_string())
            .with_context(|| format!("backend {i} listed: {list}"))?;
        let mac = lb::mac::MacAddr(s.topo.backend_mac(i)).to_string();
        ensure!(
            b["mac"] == mac.as_str(),
            "backend {i}: {b}\n{}",
            s.agent.log_text()
        );
    }
    let answers = get_from_ports(s.topo.client_ns(), vip6(&s.topo, PORT), 20_000..22_400)?;
    let sh = shares(&answers);
    for i in 0..3 {
        let got = sh.get(&backend_name(i)).copied().unwrap_or(0.0);
        ensure!(
            (got - 33.33).abs() <= 6.0,
            "backend {i}: {got:.1}% ({sh:?})"
        );
    }
    let stats = s.agent.json(&["stats"])?;
    let new_flows = stats["vips"][0]["new_flows"].as_u64().unwrap_or(0);
    ensure!(new_flows >= 2400, "new flows counted: {new_flows}");
    // `lb vip list` shows the VIP bracketed; metrics label the backends
    // with their IPv6 addresses.
    let vips = s.agent.cli_ok(&["vip", "list"])?;
    let shown = format!("[{}]:{PORT}/tcp", s.topo.vip6());
    ensure!(vips.contains(&shown), "{vips}");
    thread::sleep(Duration::from_millis(1200));
    let text = metrics(s.topo.lb_ns())?;
    for i in 0..3 {
        let up = format!(
            "lb_backend_up{{vip=\"web6\",backend=\"{}\"}} 1",
            s.topo.backend_addr6(i)
        );
        ensure!(text.contains(&up), "missing {up}");
    }
    Ok(())
}

#[test]
fn ipv6_same_source_port_same_backend_as_explain_predicts() -> Result<()> {
    let s = setup(3)?;
    let vip = vip6(&s.topo, PORT);
    for port in [30_001u16, 30_002, 30_003, 30_004, 30_005] {
        let answers = get_from_ports(s.topo.client_ns(), vip, vec![port; 8])?;
        let first = &answers[0].1;
        ensure!(
            answers.iter().all(|(_, b)| b == first),
            "port {port}: {answers:?}"
        );
        let src = SocketAddr::new(s.topo.client_addr6().into(), port);
        let e = s.agent.explain(src, vip, "tcp")?;
        let i: usize = first.trim_start_matches("backend-").parse()?;
        ensure!(
            e["ring_backend"] == s.topo.backend_addr6(i).to_string(),
            "explain says {}, {first} answered",
            e["ring_backend"]
        );
    }
    Ok(())
}

#[test]
fn ipv6_failover_and_rejoin() -> Result<()> {
    let mut s = setup(3)?;
    let vip = vip6(&s.topo, PORT);
    let victim: IpAddr = s.topo.backend_addr6(1).into();
    // The health check (TCP to [backend]:80) sees the kill.
    let server = s.servers.remove(1);
    server.kill()?;
    s.agent
        .wait_health(None, victim, "down", Duration::from_secs(10))?;
    let answers = get_from_ports(s.topo.client_ns(), vip, 26_000..26_600)?;
    ensure!(
        answers.iter().all(|(_, b)| b != &backend_name(1)),
        "a connection went to the dead backend"
    );
    s.servers
        .push(spawn_v6_on(&s.topo, 1, ServerKind::Http, PORT)?);
    s.agent
        .wait_health(None, victim, "up", Duration::from_secs(10))?;
    let answers = get_from_ports(s.topo.client_ns(), vip, 27_000..27_600)?;
    let back = answers
        .iter()
        .filter(|(_, b)| b == &backend_name(1))
        .count();
    ensure!(
        back > 100,
        "only {back} of 600 connections reached the rejoined backend"
    );
    Ok(())
}

#[test]
fn ipv6_http_health_checks_reach_bracketed_addresses() -> Result<()> {
    require_root();
    let topo = topology(2)?;
    let mut servers = spawn_v6(&topo, ServerKind::Http, PORT)?;
    let mut vip = VipSpec::tcp("web6", topo.vip6(), PORT, &backends6(&topo));
    vip.health_check =
        "kind = \"http\"\npath = \"/\"\ninterval_ms = 200\ntimeout_ms = 150\nrise = 2\nfall = 2"
            .into();
    let agent = LbAgent::start(topo.lb_ns(), &topo.lb_iface(), &[vip])?;
    let b0: IpAddr = topo.backend_addr6(0).into();
    // Backends start up; the first HTTP answer shows in last_check.
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        let list = agent.json(&["backend", "list"])?;
        let last = list[0]["last_check"].as_str().unwrap_or("").to_string();
        if last.contains("200") {
            break;
        }
        ensure!(
            Instant::now() < deadline,
            "no HTTP 200 check outcome: {list}"
        );
        thread::sleep(Duration::from_millis(100));
    }
    servers.remove(0).kill()?;
    agent.wait_health(None, b0, "down", Duration::from_secs(10))?;
    Ok(())
}

#[test]
fn ipv6_drained_backend_keeps_its_flow_and_gets_no_new_ones() -> Result<()> {
    require_root();
    let topo = topology(3)?;
    let _streams = spawn_v6(&topo, ServerKind::Stream, STREAM_PORT)?;
    let _http = spawn_v6(&topo, ServerKind::Http, PORT)?;
    let vips = [
        VipSpec::tcp("stream6", topo.vip6(), STREAM_PORT, &backends6(&topo)),
        VipSpec::tcp("web6", topo.vip6(), PORT, &backends6(&topo)),
    ];
    let agent = LbAgent::start(topo.lb_ns(), &topo.lb_iface(), &vips)?;
    let stream_vip = vip6(&topo, STREAM_PORT);
    let src = SocketAddr::new(topo.client_addr6().into(), 41_000);
    let e = agent.explain(src, stream_vip, "tcp")?;
    let serving: Ipv6Addr = e["ring_backend"].as_str().unwrap_or_default().parse()?;
    let serving_name = backend_name(
        backends6(&topo)
            .iter()
            .position(|a| *a == serving)
            .context("explain names a backend")?,
    );
    let conn = topo
        .client_ns()
        .run(move || tcp_connect(Some(41_000), stream_vip, T))??;
    conn.set_read_timeout(Some(T))?;
    let mut stream = EchoStream::new(conn);
    stream.roundtrip(1000)?;
    // The flow keeper counts the CONNTRACK6 record as the backend's flow.
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        let list = agent.json(&["backend", "list", "--vip", "stream6"])?;
        let flows = list
            .as_array()
            .into_iter()
            .flatten()
            .find(|b| b["address"] == serving.to_string())
            .and_then(|b| b["flows"].as_u64())
            .unwrap_or(0);
        if flows >= 1 {
            break;
        }
        ensure!(
            Instant::now() < deadline,
            "the IPv6 flow is not counted: {list}"
        );
        thread::sleep(Duration::from_millis(200));
    }
    // The CLI takes IPv6 backend addresses.
    agent.cli_ok(&["backend", "drain", "stream6", &serving.to_string()])?;
    agent.cli_ok(&["backend", "drain", "web6", &serving.to_string()])?;
    let answers = get_from_ports(topo.client_ns(), vip6(&topo, PORT), 28_000..28_300)?;
    ensure!(
        answers.iter().all(|(_, b)| *b != serving_name),
        "a new connection went to the drained backend"
    );
    let list = agent.json(&["backend", "list", "--vip", "web6"])?;
    let drained = list
        .as_array()
        .into_iter()
        .flatten()
        .find(|b| b["address"] == serving.to_string())
        .cloned()
        .unwrap_or_default();
    ensure!(
        drained["state"] == "drain" && drained["slots"] == 0,
        "{drained}"
    );
    // The established flow stays on it, by its CONNTRACK6 record.
    let e = agent.explain(src, stream_vip, "tcp")?;
    ensure!(e["backend"] == serving.to_string(), "{e}");
    ensure!(
        e["reason"].as_str().unwrap_or("").contains("conntrack"),
        "{e}"
    );
    stream.roundtrip(64 * 1024)?;
    Ok(())
}

#[test]
fn ipv6_connection_keeps_every_byte_across_an_agent_restart() -> Result<()> {
    require_root();
    let topo = topology(3)?;
    let _servers = spawn_v6(&topo, ServerKind::Stream, STREAM_PORT)?;
    let vip = VipSpec::tcp("stream6", topo.vip6(), STREAM_PORT, &backends6(&topo));
    let paths = AgentPaths::new()?;
    let text = render_config(&paths.instance, &paths.socket, &topo.lb_iface(), &[vip]);
    let mut agent = LbAgent::start_with(topo.lb_ns(), paths, &text, &["--keep-datapath"])?;
    let stream_vip = vip6(&topo, STREAM_PORT);
    let conn = topo
        .client_ns()
        .run(move || tcp_connect(Some(40_000), stream_vip, T))??;
    conn.set_read_timeout(Some(T))?;
    let mut stream = EchoStream::new(conn);
    stream.roundtrip(64 * 1024).context("connecting")?;
    let before = agent.json(&["vip", "list"])?;

    let log = agent.stop()?;
    ensure!(log.contains("left attached"), "agent log:\n{log}");
    let tracked = agent.pinned_flows::<lb_common::FlowKey6>("CONNTRACK6")?;
    ensure!(tracked >= 1, "CONNTRACK6 records after the stop: {tracked}");
    stream
        .roundtrip(64 * 1024)
        .context("with no agent running")?;
    agent.spawn(&[])?;
    let status = agent.json(&["status"])?;
    ensure!(status["restored"] == true, "{status}");
    // The IPv6 VIP entry was read back: same index, nothing rebuilt.
    let after = agent.json(&["vip", "list"])?;
    ensure!(
        before[0]["index"] == after[0]["index"] && after[0]["backends_in_ring"] == 3,
        "before {before}\nafter {after}"
    );
    stream.roundtrip(64 * 1024).context("after the restart")?;
    ensure!(
        stream.sent == 3 * 64 * 1024,
        "bytes echoed: {}",
        stream.sent
    );
    ensure!(
        agent.pinned_flows::<lb_common::FlowKey6>("CONNTRACK6")? >= tracked,
        "CONNTRACK6 records lost across the restart"
    );
    agent.stop()?;
    ensure!(!agent.pin_dir().exists(), "pins left after a clean stop");
    Ok(())
}

#[test]
fn ipv6_udp_flow_stays_on_one_backend() -> Result<()> {
    require_root();
    let topo = topology(3)?;
    let _servers = spawn_v6(&topo, ServerKind::UdpEcho, 5353)?;
    let mut vip = VipSpec::tcp("dns6", topo.vip6(), 5353, &backends6(&topo));
    vip.protocol = "udp";
    vip.health_check = "kind = \"none\"".into();
    let agent = LbAgent::start(topo.lb_ns(), &topo.lb_iface(), &[vip])?;
    let sa = vip6(&topo, 5353);
    let name = one_udp_flow_one_backend(topo.client_ns(), sa, 45_000, 20)?;
    let src = SocketAddr::new(topo.client_addr6().into(), 45_000);
    let e = agent.explain(src, sa, "udp")?;
    let i: usize = name.trim_start_matches("backend-").parse()?;
    ensure!(
        e["backend"] == topo.backend_addr6(i).to_string(),
        "explain: {e}"
    );
    Ok(())
}

#[test]
fn ipv4_and_ipv6_vips_side_by_side_in_one_agent() -> Result<()> {
    require_root();
    let topo = topology(3)?;
    let _v6 = spawn_v6(&topo, ServerKind::Http, PORT)?;
    let _v4 = lb_tests::servers::spawn_on_backends(&topo, ServerKind::Http, PORT)?;
    let backends4: Vec<_> = (0..3).map(|i| topo.backend_addr(i)).collect();
    let vips = [
        VipSpec::tcp("web4", topo.vip(), PORT, &backends4),
        VipSpec::tcp("web6", topo.vip6(), PORT, &backends6(&topo)),
    ];
    let agent = LbAgent::start(topo.lb_ns(), &topo.lb_iface(), &vips)?;
    let v4 = SocketAddr::new(topo.vip().into(), PORT);
    let a4 = get_from_ports(topo.client_ns(), v4, 31_000..31_600)?;
    let a6 = get_from_ports(topo.client_ns(), vip6(&topo, PORT), 31_000..31_600)?;
    for (what, a) in [("IPv4", &a4), ("IPv6", &a6)] {
        let sh = shares(a);
        ensure!(sh.len() == 3, "{what}: {sh:?}");
    }
    // Backend ids and VIP indices come from one space: all distinct.
    let list = agent.json(&["backend", "list"])?;
    let ids: std::collections::BTreeSet<u64> = list
        .as_array()
        .into_iter()
        .flatten()
        .filter_map(|b| b["id"].as_u64())
        .collect();
    ensure!(ids.len() == 6, "backend ids: {list}");
    let vips = agent.json(&["vip", "list"])?;
    ensure!(vips[0]["index"] != vips[1]["index"], "{vips}");
    Ok(())
}

#[test]
fn a_rejected_ipv6_reload_changes_nothing() -> Result<()> {
    let s = setup(3)?;
    let good = std::fs::read_to_string(&s.agent.config)?;
    let third = format!("address = \"{}\"", s.topo.backend_addr6(2));
    let listed =
        |agent: &LbAgent| -> Result<serde_json::Value> { agent.json(&["backend", "list"]) };
    let before = listed(&s.agent)?;
    // An IPv4 backend for the IPv6 dsr-l2 VIP, then a link-local one.
    for (bad, needle) in [
        (
            good.replace(&third, "address = \"198.18.0.13\""),
            "is IPv4 but the VIP",
        ),
        (good.replace(&third, "address = \"fe80::13\""), "link-local"),
    ] {
        ensure!(bad != good, "the config names backend 2");
        std::fs::write(&s.agent.config, &bad)?;
        let out = s.agent.cli(&["reload"])?;
        let err = String::from_utf8_lossy(&out.stderr);
        ensure!(!out.status.success(), "a bad reload succeeded");
        ensure!(
            err.contains("lb.toml:")
                && err.contains("vip[0].backend[2].address")
                && err.contains(needle),
            "{err}"
        );
        let after = listed(&s.agent)?;
        let ids = |v: &serde_json::Value| -> Vec<(String, u64, u64)> {
            v.as_array()
                .into_iter()
                .flatten()
                .map(|b| {
                    (
                        b["address"].as_str().unwrap_or("").to_string(),
                        b["id"].as_u64().unwrap_or(0),
                        b["slots"].as_u64().unwrap_or(0),
                    )
                })
                .collect()
        };
        ensure!(
            ids(&after) == ids(&before),
            "before {before}\nafter {after}"
        );
    }
    let answers = get_from_ports(s.topo.client_ns(), vip6(&s.topo, PORT), 29_000..29_090)?;
    ensure!(shares(&answers).len() == 3, "traffic still over 3 backends");
    Ok(())
}

#[test]
fn a_routed_ipv6_backend_of_a_tunnel_vip_is_reached_through_its_gateways_mac() -> Result<()> {
    require_root();
    let topo = topology(1)?;
    // A backend in another subnet, routed through backend 0 (the gateway):
    // an IPv4 GUE VIP served by an IPv6 backend (4in6). Its next hop is
    // the gateway's MAC, learnt over ND; the outer source is lb's IPv6
    // address (the route's preferred source).
    let far = Ipv6Addr::new(0x2001, 2, 0, 0x200 + u16::from(topo.index()), 0, 0, 0, 5);
    let gateway = topo.backend_addr6(0);
    topo.lb_ns().ip([
        "-6",
        "route",
        "add",
        &format!("{far}/128"),
        "via",
        &gateway.to_string(),
    ])?;
    let mut vip = VipSpec::tcp("gue4in6", topo.vip(), PORT, &[far]);
    vip.forwarding = "gue";
    vip.health_check = "kind = \"none\"".into();
    let agent = LbAgent::start(topo.lb_ns(), &topo.lb_iface(), &[vip])?;
    let deadline = Instant::now() + Duration::from_secs(10);
    let gw_mac = lb::mac::MacAddr(topo.backend_mac(0)).to_string();
    let b = loop {
        let list = agent.json(&["backend", "list"])?;
        let b = list[0].clone();
        if b["mac"] == gw_mac.as_str() {
            break b;
        }
        ensure!(
            Instant::now() < deadline,
            "the gateway's MAC was not resolved: {list}\n{}",
            agent.log_text()
        );
        thread::sleep(Duration::from_millis(100));
    };
    ensure!(b["address"] == far.to_string(), "{b}");
    ensure!(b["gateway"] == gateway.to_string(), "{b}");
    ensure!(b["health"] == "up", "{b}");
    // explain shows the IPv6 outer header the kernel is to write.
    let src = SocketAddr::new(topo.client_addr().into(), 40_000);
    let e = agent.explain(src, SocketAddr::new(topo.vip().into(), PORT), "tcp")?;
    ensure!(
        e["outer"]["src"] == topo.lb_addr6().to_string() && e["outer"]["dst"] == far.to_string(),
        "{e}"
    );
    Ok(())
}
