//! The tunnel forwarding modes end to end, in network namespaces: a client
//! and lb on one segment, three backends in another subnet behind a router
//! (see `lb_tests::routed`). lb encapsulates (ipip or gue) to the backends'
//! addresses through the router; each backend strips the outer header with
//! `lb decap` (only from lb's address) and answers the client directly
//! through the router. One test per mode walks the behaviour suite in
//! sequence on one topology: distribution, affinity, a 1 MB upload from a
//! client with MTU 1500 (path MTU discovery through lb's ICMP answer), UDP,
//! drain, failover and rejoin, and established connections across an agent
//! restart with --keep-datapath, then ICMP echo to the VIP (answered by
//! lb, and not once the VIP turns `icmp_echo` off). The same suite runs
//! for each family: IPv4 (4in4, GUE over IPv4), IPv6 (6in6, GUE over IPv6)
//! and an IPv4 VIP over IPv6 backend addresses (4in6), on the dual-stack
//! routed topology for the last three. Needs root.

use std::{
    collections::BTreeMap,
    net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr},
    time::Duration,
};

use anyhow::{Context as _, Result, ensure};
use lb_tests::{
    agent::{AgentPaths, LbAgent, VipSpec, render_config},
    decap::DecapAttachment,
    netns::ChildGuard,
    require_root,
    routed::RoutedTopology,
    servers::{EchoStream, ServerKind, backend_name, one_udp_flow_one_backend, spawn_server},
};

const WEB: u16 = 80;
const STREAM: u16 = 7000;
const DNS: u16 = 5353;

/// One run of the suite: the forwarding mode and the address families of
/// the VIP (and the client) and of the backends (the outer header).
#[derive(Clone, Copy, Debug)]
struct Case {
    mode: &'static str,
    vip_v6: bool,
    backends_v6: bool,
}

impl Case {
    /// The outer header's protocol field as `lb explain` words it.
    fn outer_protocol(&self) -> &'static str {
        match (self.mode, self.backends_v6, self.vip_v6) {
            ("gue", false, _) => "gue: IPv4 protocol 17",
            ("gue", true, _) => "gue: IPv6 next header 17",
            (_, false, _) => "ipip: IPv4 protocol 4",
            (_, true, true) => "ipip: IPv6 next header 41",
            (_, true, false) => "ipip: IPv6 next header 4",
        }
    }
}

/// The routed topology with servers on every backend, `lb decap` on each,
/// and an agent forwarding three VIPs (web, stream, dns) in the case's
/// mode.
struct Setup {
    // Field order is drop order: agent, servers and decap before the
    // namespaces.
    agent: LbAgent,
    /// Per backend and kind: the IPv4 server, and on dual-stack topologies
    /// the IPv6 one (health checks reach the backend's address, clients
    /// the VIP, and the two may differ in family).
    servers: BTreeMap<(usize, &'static str), Vec<ChildGuard>>,
    _decap: Vec<DecapAttachment>,
    topo: RoutedTopology,
    case: Case,
}

fn setup(case: Case) -> Result<Setup> {
    require_root();
    let topo = if case.vip_v6 || case.backends_v6 {
        RoutedTopology::new_dual_stack(3)?
    } else {
        RoutedTopology::new(3)?
    };
    let mut servers = BTreeMap::new();
    for i in 0..topo.backend_count() {
        for (kind, port) in [
            (ServerKind::Http, WEB),
            (ServerKind::Stream, STREAM),
            (ServerKind::UdpEcho, DNS),
        ] {
            servers.insert((i, kind.as_str()), servers_of(&topo, i, kind, port)?);
        }
    }
    let decap = DecapAttachment::attach_all(&topo, case.backends_v6)?;
    let backends = topo.backend_addrs_of(case.backends_v6);
    let vip = topo.vip_of(case.vip_v6);
    let mut web = VipSpec::tcp("web", vip, WEB, &backends);
    let mut stream = VipSpec::tcp("stream", vip, STREAM, &backends);
    let mut dns = VipSpec::tcp("dns", vip, DNS, &backends);
    dns.protocol = "udp";
    dns.health_check = "kind = \"none\"".into();
    for v in [&mut web, &mut stream, &mut dns] {
        v.forwarding = case.mode;
    }
    let paths = AgentPaths::new()?;
    let text = render_config(
        &paths.instance,
        &paths.socket,
        &topo.lb_iface(),
        &[web, stream, dns],
    );
    let agent = LbAgent::start_with(topo.lb_ns(), paths, &text, &["--keep-datapath"])?;
    Ok(Setup {
        agent,
        servers,
        _decap: decap,
        topo,
        case,
    })
}

/// Backend `i`'s servers of `kind` on `port`: on 0.0.0.0, and on
/// dual-stack topologies on [::] too (UDP: on the IPv6 VIP, so that
/// replies leave from it).
fn servers_of(
    topo: &RoutedTopology,
    i: usize,
    kind: ServerKind,
    port: u16,
) -> Result<Vec<ChildGuard>> {
    let mut listen = vec![SocketAddr::new(Ipv4Addr::UNSPECIFIED.into(), port)];
    if topo.is_dual_stack() {
        let v6: IpAddr = match kind {
            ServerKind::UdpEcho => topo.vip6().into(),
            _ => Ipv6Addr::UNSPECIFIED.into(),
        };
        listen.push(SocketAddr::new(v6, port));
    }
    listen
        .into_iter()
        .map(|l| spawn_server(topo.backend_ns(i), kind, l, &backend_name(i)))
        .collect()
}

impl Setup {
    fn vip(&self, port: u16) -> SocketAddr {
        SocketAddr::new(self.topo.vip_of(self.case.vip_v6), port)
    }

    fn client(&self) -> IpAddr {
        self.topo.client_of(self.case.vip_v6)
    }

    /// GETs from the client namespace from each source port: the backend
    /// that answered each (every request must succeed).
    fn get_from_ports(&self, ports: impl IntoIterator<Item = u16>) -> Result<Vec<String>> {
        let answers =
            lb_tests::servers::get_from_ports(self.topo.client_ns(), self.vip(WEB), ports)?;
        Ok(answers.into_iter().map(|(_, b)| b).collect())
    }

    /// Waits (bounded) until `lb backend list --vip VIP` shows `addr` with
    /// `health`.
    fn wait_health(&self, vip: &str, addr: IpAddr, health: &str) -> Result<()> {
        self.agent
            .wait_health(Some(vip), addr, health, Duration::from_secs(10))
    }

    /// A connection to the stream (echo) VIP from `port`.
    fn stream_from(&self, port: u16) -> Result<EchoStream> {
        EchoStream::connect(
            self.topo.client_ns(),
            port,
            self.vip(STREAM),
            Duration::from_secs(10),
        )
    }

    /// The backend `lb explain` says the flow from `port` to `vip_port`
    /// takes, with the whole answer.
    fn explain(&self, port: u16, vip_port: u16, proto: &'static str) -> Result<serde_json::Value> {
        let args = self.explain_args(port, vip_port, proto);
        self.agent.json(&args.each_ref().map(String::as_str))
    }

    fn explain_args(&self, port: u16, vip_port: u16, proto: &'static str) -> [String; 4] {
        [
            "explain".into(),
            SocketAddr::new(self.client(), port).to_string(),
            self.vip(vip_port).to_string(),
            proto.into(),
        ]
    }

    /// Pings the VIP from the client namespace (3 echo requests): whether
    /// any answer came back.
    fn ping_vip(&self) -> Result<bool> {
        let vip = self.topo.vip_of(self.case.vip_v6).to_string();
        let args = ["ping", "-n", "-c", "3", "-i", "0.2", "-W", "1", &vip];
        match self
            .topo
            .client_ns()
            .exec_timeout(args, Duration::from_secs(10))
        {
            Ok(_) => Ok(true),
            // iputils ping exits 1 when no reply came back; anything else
            // (the address refused, ping missing) is an error.
            Err(e) if format!("{e:#}").contains("exit status: 1") => Ok(false),
            Err(e) => Err(e),
        }
    }
}

fn index_of(name: &str) -> Result<usize> {
    Ok(name
        .strip_prefix("backend-")
        .with_context(|| format!("answer {name:?}"))?
        .parse()?)
}

/// The behaviour suite for one case (see the module docs).
fn suite(case: Case) -> Result<()> {
    let mut s = setup(case)?;
    let mode = case.mode;
    let backends = s.topo.backend_addrs_of(case.backends_v6);
    let lb = s.topo.lb_of(case.backends_v6);

    // The CLI shows the mode and the routed next hops.
    let vips = s.agent.json(&["vip", "list"])?;
    ensure!(
        vips.as_array()
            .into_iter()
            .flatten()
            .all(|v| v["forwarding"] == mode),
        "{vips}"
    );
    for b in &backends {
        s.wait_health("web", *b, "up")?;
    }
    let list = s.agent.json(&["backend", "list", "--vip", "web"])?;
    for b in list.as_array().into_iter().flatten() {
        ensure!(
            b["gateway"] == s.topo.router_front_of(case.backends_v6).to_string(),
            "routed through the router: {b}"
        );
    }

    // Distribution: 900 connections from distinct source ports.
    let answers = s.get_from_ports(20_000..20_900)?;
    let mut counts = BTreeMap::<String, usize>::new();
    for a in &answers {
        *counts.entry(a.clone()).or_default() += 1;
    }
    for i in 0..3 {
        let pct = 100.0 * counts.get(&backend_name(i)).copied().unwrap_or(0) as f64 / 900.0;
        ensure!(
            (pct - 33.3).abs() <= 6.0,
            "{mode}: backend {i} {pct:.1}% ({counts:?})"
        );
    }

    // Affinity: one source port, one backend, the one explain predicts,
    // with the outer header it names.
    for port in [30_001u16, 30_002, 30_003] {
        let got = s.get_from_ports([port; 5])?;
        ensure!(got.iter().all(|b| *b == got[0]), "port {port}: {got:?}");
        let e = s.explain(port, WEB, "tcp")?;
        let i = index_of(&got[0])?;
        ensure!(e["backend"] == backends[i].to_string(), "{e}");
        ensure!(e["outer"]["dst"] == backends[i].to_string(), "{e}");
        ensure!(e["outer"]["src"] == lb.to_string(), "{e}");
        ensure!(e["outer"]["forwarding"] == mode, "{e}");
        // The text form names the outer header's family and protocol.
        let args = s.explain_args(port, WEB, "tcp");
        let text = s.agent.cli_ok(&args.each_ref().map(String::as_str))?;
        let line = format!(
            "outer      {lb} -> {} ({}",
            backends[i],
            case.outer_protocol()
        );
        ensure!(text.contains(&line), "{line:?} not in:\n{text}");
    }

    // A 1 MB upload (echoed back) from the client, whose MTU is 1500 like
    // the path lb sends on: its full-size segments no longer fit once
    // encapsulated, lb answers them with "fragmentation needed", the
    // client lowers its path MTU and the upload completes.
    let icmp_before = s.agent.reason("tx_icmp_too_big")?;
    let mut long = s.stream_from(40_000)?;
    long.roundtrip(1 << 20).context("1 MB upload")?;
    let icmp = s.agent.reason("tx_icmp_too_big")? - icmp_before;
    ensure!(icmp >= 1, "{mode}: no ICMP fragmentation-needed sent");
    let e = s.explain(40_000, STREAM, "tcp")?;
    let serving: IpAddr = e["backend"].as_str().unwrap_or_default().parse()?;

    // UDP: one flow, one backend, echoed.
    one_udp_flow_one_backend(s.topo.client_ns(), s.vip(DNS), 45_000, 10)?;

    // Drain the stream connection's backend: its connection goes on, new
    // web connections avoid the backend drained there.
    let drained = index_of(&s.get_from_ports([30_001])?[0])?;
    let drained_addr = backends[drained].to_string();
    s.agent
        .cli_ok(&["backend", "drain", "web", &drained_addr])?;
    s.agent
        .cli_ok(&["backend", "drain", "stream", &serving.to_string()])?;
    let answers = s.get_from_ports(31_000..31_150)?;
    ensure!(
        answers.iter().all(|b| *b != backend_name(drained)),
        "a new connection went to the drained backend"
    );
    long.roundtrip(64 * 1024).context("after the drain")?;
    s.agent
        .cli_ok(&["backend", "undrain", "web", &drained_addr])?;

    // Failover and rejoin: backend 1's web server dies, then comes back.
    let victim = backends[1];
    for g in s
        .servers
        .remove(&(1, ServerKind::Http.as_str()))
        .unwrap_or_default()
    {
        g.kill()?;
    }
    s.wait_health("web", victim, "down")?;
    let answers = s.get_from_ports(32_000..32_300)?;
    ensure!(
        answers.iter().all(|b| *b != backend_name(1)),
        "a connection went to the dead backend"
    );
    s.servers.insert(
        (1, ServerKind::Http.as_str()),
        servers_of(&s.topo, 1, ServerKind::Http, WEB)?,
    );
    s.wait_health("web", victim, "up")?;
    let answers = s.get_from_ports(33_000..33_300)?;
    let back = answers.iter().filter(|b| **b == backend_name(1)).count();
    ensure!(back > 50, "only {back} of 300 reached the rejoined backend");

    // The agent stops with --keep-datapath: the pinned program goes on
    // encapsulating; a new agent takes over; the connection survives.
    let log = s.agent.stop()?;
    ensure!(log.contains("left attached"), "agent log:\n{log}");
    long.roundtrip(64 * 1024).context("with no agent running")?;
    s.agent.spawn(&[])?;
    let status = s.agent.json(&["status"])?;
    ensure!(status["restored"] == true, "{status}");
    long.roundtrip(64 * 1024).context("after the restart")?;
    let e = s.explain(40_000, STREAM, "tcp")?;
    ensure!(e["backend"] == serving.to_string(), "the flow moved: {e}");

    // ICMP echo to the VIP: answered by lb itself (the backends hold the
    // VIP on lo too, but lb never forwards an echo request to them).
    let replies = s.agent.reason("tx_icmp_echo_reply")?;
    ensure!(
        s.ping_vip()?,
        "{mode}: ping {} got no answer",
        s.vip(0).ip()
    );
    ensure!(
        s.agent.reason("tx_icmp_echo_reply")? > replies,
        "{mode}: the echo replies did not come from lb"
    );

    // The VIPs turn icmp_echo off (a new agent, fresh state): lb answers no
    // more, and nothing else does.
    s.agent.stop()?;
    let text = std::fs::read_to_string(&s.agent.config)?;
    let off = format!("forwarding = \"{mode}\"\nicmp_echo = false\n");
    let text = text.replace(&format!("forwarding = \"{mode}\"\n"), &off);
    ensure!(text.matches("icmp_echo = false").count() == 3, "{text}");
    std::fs::write(&s.agent.config, text)?;
    s.agent.spawn(&[])?;
    let replies = s.agent.reason("tx_icmp_echo_reply")?;
    ensure!(
        !s.ping_vip()?,
        "{mode}: ping answered with icmp_echo = false"
    );
    ensure!(s.agent.reason("tx_icmp_echo_reply")? == replies);
    s.agent.stop()?;
    Ok(())
}

#[test]
fn ipip_to_routed_backends() -> Result<()> {
    suite(Case {
        mode: "ipip",
        vip_v6: false,
        backends_v6: false,
    })
}

#[test]
fn gue_to_routed_backends() -> Result<()> {
    suite(Case {
        mode: "gue",
        vip_v6: false,
        backends_v6: false,
    })
}

/// 6in6.
#[test]
fn ipip_to_routed_ipv6_backends() -> Result<()> {
    suite(Case {
        mode: "ipip",
        vip_v6: true,
        backends_v6: true,
    })
}

/// GUE over IPv6.
#[test]
fn gue_to_routed_ipv6_backends() -> Result<()> {
    suite(Case {
        mode: "gue",
        vip_v6: true,
        backends_v6: true,
    })
}

/// 4in6: an IPv4 VIP whose backends are IPv6 addresses.
#[test]
fn ipip_ipv4_vip_to_routed_ipv6_backends() -> Result<()> {
    suite(Case {
        mode: "ipip",
        vip_v6: false,
        backends_v6: true,
    })
}
