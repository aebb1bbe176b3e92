//! Full NAT end to end, in network namespaces: a client and lb on one
//! segment, three unmodified backends (no VIP, no special sysctls) in
//! another subnet behind a router (`RoutedTopology::new_nat`). lb rewrites
//! the client's packets to backend:port from its SNAT address and the
//! replies back, both in XDP. One arm: lb has one interface, the replies
//! come back through the router; two arms: lb has a leg on the backends'
//! segment too (its SNAT address there). One test per arm and family walks
//! the suite: distribution, weights, affinity (= `lb explain`), what each
//! side sees on the wire (captured: the backend only the SNAT address, the
//! client only the VIP), 1 MB both ways with no checksum error counted by
//! any receiving stack, UDP request/response, drain, failover and rejoin,
//! an established flow across an agent restart, and the lb host's own
//! traffic to a backend. A last test exhausts a tiny SNAT port range.
//! Needs root.

use std::{
    collections::BTreeMap,
    net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr},
    time::{Duration, Instant},
};

use anyhow::{Context as _, Result, bail, ensure};
use lb_tests::{
    agent::{AgentPaths, LbAgent, METRICS_LISTEN},
    capture::{Capture, Seen, checksum_errors},
    netns::ChildGuard,
    require_root,
    routed::{NatArms, RoutedTopology},
    servers::{
        EchoStream, ServerKind, backend_name, get_from_ports, http_get, one_udp_flow_one_backend,
        peer_seen, shares, spawn_server, tcp_connect,
    },
};

/// VIP port → backend port: the web VIP's backends listen elsewhere.
const WEB: u16 = 80;
const WEB_BACKEND: u16 = 8080;
/// A second web VIP with weights 1:1:2 on the same servers.
const WEIGHTED: u16 = 81;
const STREAM: u16 = 7000;
const DNS: u16 = 5353;
const PEER: u16 = 9000;
const PEER_BACKEND: u16 = 9090;
/// The agent's default SNAT port range.
const NAT_PORTS: std::ops::RangeInclusive<u16> = 61000..=65535;
const T: Duration = Duration::from_secs(3);

#[derive(Clone, Copy, Debug)]
struct Case {
    arms: NatArms,
    v6: bool,
}

struct Setup {
    // Field order is drop order: agent and servers before the namespaces.
    agent: LbAgent,
    servers: BTreeMap<(usize, &'static str), ChildGuard>,
    topo: RoutedTopology,
    case: Case,
}

/// The agent's config: four NAT VIPs on the backends (web → 8080,
/// weighted web → 8080 with weights 1:1:2, stream, udp echo, peer → 9090),
/// `agent_extra` added to `[agent]`.
fn config(paths: &AgentPaths, topo: &RoutedTopology, case: Case, agent_extra: &str) -> String {
    let ifaces: Vec<String> = topo.lb_ifaces().iter().map(|i| format!("{i:?}")).collect();
    let mut s = format!(
        "[agent]\ninstance = \"{}\"\ninterfaces = [{}]\ncontrol_socket = \"{}\"\nmetrics_listen = \"{METRICS_LISTEN}\"\nmax_vips = 8\nmax_backends = 64\nconntrack_entries = 65536\n{agent_extra}\n",
        paths.instance,
        ifaces.join(", "),
        paths.socket.display()
    );
    let vip = topo.vip_of(case.v6);
    let backends = topo.backend_addrs_of(case.v6);
    let tcp_check = "kind = \"tcp\"\ninterval_ms = 200\ntimeout_ms = 150\nrise = 2\nfall = 2";
    // (name, VIP port, protocol, backend port, health check, weights)
    type Vip<'a> = (&'a str, u16, &'a str, Option<u16>, &'a str, [u32; 3]);
    let vips: [Vip; 5] = [
        ("web", WEB, "tcp", Some(WEB_BACKEND), tcp_check, [1, 1, 1]),
        (
            "weighted",
            WEIGHTED,
            "tcp",
            Some(WEB_BACKEND),
            tcp_check,
            [1, 1, 2],
        ),
        ("stream", STREAM, "tcp", None, tcp_check, [1, 1, 1]),
        ("dns", DNS, "udp", None, "kind = \"none\"", [1, 1, 1]),
        (
            "peer",
            PEER,
            "tcp",
            Some(PEER_BACKEND),
            tcp_check,
            [1, 1, 1],
        ),
    ];
    for (name, port, proto, backend_port, check, weights) in vips {
        s += &format!(
            "[[vip]]\nname = \"{name}\"\naddress = \"{vip}\"\nport = {port}\nprotocol = \"{proto}\"\nforwarding = \"nat\"\n[vip.health_check]\n{check}\n"
        );
        for (b, w) in backends.iter().zip(weights) {
            s += &format!("[[vip.backend]]\naddress = \"{b}\"\nweight = {w}\n");
            if let Some(p) = backend_port {
                s += &format!("port = {p}\n");
            }
        }
    }
    s
}

fn setup(case: Case, backends: usize, agent_extra: &str) -> Result<Setup> {
    require_root();
    let topo = RoutedTopology::new_nat(backends, case.arms)?;
    let mut servers = BTreeMap::new();
    for i in 0..topo.backend_count() {
        for (kind, port) in [
            (ServerKind::Http, WEB_BACKEND),
            (ServerKind::Stream, STREAM),
            (ServerKind::UdpEcho, DNS),
            (ServerKind::Peer, PEER_BACKEND),
        ] {
            servers.insert((i, kind.as_str()), server(&topo, case, i, kind, port)?);
        }
    }
    let paths = AgentPaths::new()?;
    let text = config(&paths, &topo, case, agent_extra);
    let agent = LbAgent::start_with(topo.lb_ns(), paths, &text, &["--keep-datapath"])?;
    Ok(Setup {
        agent,
        servers,
        topo,
        case,
    })
}

/// Backend `i`'s server of `kind` on `port`, on the wildcard address of
/// the case's family.
fn server(
    topo: &RoutedTopology,
    case: Case,
    i: usize,
    kind: ServerKind,
    port: u16,
) -> Result<ChildGuard> {
    // IPv6 UDP echo answers from the one address it listens on: the
    // backend's own (NAT sends the datagrams there).
    let any: IpAddr = match (case.v6, kind) {
        (true, ServerKind::UdpEcho) => topo.backend_addr6(i).into(),
        (true, _) => Ipv6Addr::UNSPECIFIED.into(),
        (false, _) => Ipv4Addr::UNSPECIFIED.into(),
    };
    spawn_server(
        topo.backend_ns(i),
        kind,
        SocketAddr::new(any, port),
        &backend_name(i),
    )
}

impl Setup {
    fn vip(&self, port: u16) -> SocketAddr {
        SocketAddr::new(self.topo.vip_of(self.case.v6), port)
    }

    fn client(&self) -> IpAddr {
        self.topo.client_of(self.case.v6)
    }

    fn snat(&self) -> IpAddr {
        self.topo.snat_of(self.case.v6)
    }

    fn backends(&self) -> Vec<IpAddr> {
        self.topo.backend_addrs_of(self.case.v6)
    }

    fn get_from_ports(
        &self,
        port: u16,
        from: impl IntoIterator<Item = u16>,
    ) -> Result<Vec<String>> {
        let answers = get_from_ports(self.topo.client_ns(), self.vip(port), from)?;
        Ok(answers.into_iter().map(|(_, b)| b).collect())
    }

    fn wait_health(&self, vip: &str, addr: IpAddr, health: &str) -> Result<()> {
        self.agent
            .wait_health(Some(vip), addr, health, Duration::from_secs(10))
    }

    fn stream_from(&self, port: u16) -> Result<EchoStream> {
        EchoStream::connect(
            self.topo.client_ns(),
            port,
            self.vip(STREAM),
            Duration::from_secs(10),
        )
    }

    fn explain_backend(&self, port: u16, vip_port: u16, proto: &str) -> Result<IpAddr> {
        let client = SocketAddr::new(self.client(), port).to_string();
        let vip = self.vip(vip_port).to_string();
        let e = self.agent.json(&["explain", &client, &vip, proto])?;
        e["backend"]
            .as_str()
            .with_context(|| format!("no backend in {e}"))?
            .parse()
            .with_context(|| format!("backend in {e}"))
    }

    /// Checksum errors counted by the client's and every backend's stack.
    fn checksum_errors(&self) -> Result<u64> {
        let mut n = checksum_errors(self.topo.client_ns())?;
        for i in 0..self.topo.backend_count() {
            n += checksum_errors(self.topo.backend_ns(i))?;
        }
        Ok(n)
    }
}

fn index_of(name: &str) -> Result<usize> {
    Ok(name
        .strip_prefix("backend-")
        .with_context(|| format!("answer {name:?}"))?
        .parse()?)
}

/// `share` (percent, as [`shares`] gives it) within 7 points of `want`.
fn within(share: f64, want: f64, name: &str, all: &BTreeMap<String, f64>) -> Result<()> {
    ensure!(
        (share - want).abs() <= 7.0,
        "{name}: {share:.1}% instead of {want:.1}% ({all:?})"
    );
    Ok(())
}

/// The behaviour suite for one case (see the module docs).
fn suite(case: Case) -> Result<()> {
    let mut s = setup(case, 3, "")?;
    let backends = s.backends();
    let (vip, client, snat) = (s.vip(0).ip(), s.client(), s.snat());

    let vips = s.agent.json(&["vip", "list"])?;
    ensure!(
        vips.as_array()
            .is_some_and(|a| a.len() == 5 && a.iter().all(|v| v["forwarding"] == "nat")),
        "{vips}"
    );
    for b in &backends {
        s.wait_health("web", *b, "up")?;
        s.wait_health("weighted", *b, "up")?;
        s.wait_health("peer", *b, "up")?;
        s.wait_health("stream", *b, "up")?;
    }
    let csum_before = s.checksum_errors()?;

    // What each side sees: captured on the client's interface and on
    // backend 0's while the flows below run.
    let client_cap = Capture::start(s.topo.client_ns(), &s.topo.front().client_iface())?;
    let backend_cap = Capture::start(s.topo.backend_ns(0), &s.topo.backend_iface(0))?;

    // Distribution: 600 connections from distinct source ports, to
    // backends listening on another port than the VIP's.
    let answers = get_from_ports(s.topo.client_ns(), s.vip(WEB), 20_000..20_600)?;
    let all = shares(&answers);
    for i in 0..3 {
        let name = backend_name(i);
        within(
            all.get(&name).copied().unwrap_or(0.0),
            100.0 / 3.0,
            &name,
            &all,
        )?;
    }
    // Weights 1:1:2.
    let answers = get_from_ports(s.topo.client_ns(), s.vip(WEIGHTED), 21_000..21_800)?;
    let all = shares(&answers);
    for (i, want) in [(0, 25.0), (1, 25.0), (2, 50.0)] {
        let name = backend_name(i);
        within(all.get(&name).copied().unwrap_or(0.0), want, &name, &all)?;
    }

    // Affinity: one source port, one backend, the one explain names.
    for port in [30_001u16, 30_002, 30_003] {
        let got = s.get_from_ports(WEB, [port; 5])?;
        ensure!(got.iter().all(|b| *b == got[0]), "port {port}: {got:?}");
        let named = s.explain_backend(port, WEB, "tcp")?;
        ensure!(
            named == backends[index_of(&got[0])?],
            "port {port}: explain says {named}, {} answered",
            got[0]
        );
    }

    // The backend sees the SNAT address and a port of the NAT range.
    for _ in 0..6 {
        let (name, peer) = peer_seen(s.topo.client_ns(), s.vip(PEER), T)?;
        ensure!(
            peer.ip() == snat && NAT_PORTS.contains(&peer.port()),
            "{name} saw the connection from {peer}, not from {snat}:{NAT_PORTS:?}"
        );
    }

    // 1 MB each way on one connection (uploaded and echoed back).
    let mut long = s.stream_from(40_000)?;
    long.roundtrip(1 << 20).context("1 MB each way")?;
    let serving = s.explain_backend(40_000, STREAM, "tcp")?;

    // UDP: one flow, one backend, every request answered.
    one_udp_flow_one_backend(s.topo.client_ns(), s.vip(DNS), 45_000, 10)?;

    let client_saw = client_cap.finish()?;
    let backend_saw = backend_cap.finish()?;
    ensure!(
        s.checksum_errors()? == csum_before,
        "a receiving stack counted checksum errors"
    );
    check_client_view(&client_saw, client, vip, &backends)?;
    check_backend_view(&backend_saw, client, snat, backends[0])?;

    // Drain the long connection's backend for the stream VIP and backend
    // 0 for web: the connection goes on, new web connections avoid 0.
    s.agent
        .cli_ok(&["backend", "drain", "stream", &serving.to_string()])?;
    s.agent
        .cli_ok(&["backend", "drain", "web", &backends[0].to_string()])?;
    let answers = s.get_from_ports(WEB, 31_000..31_150)?;
    ensure!(
        answers.iter().all(|b| *b != backend_name(0)),
        "a new connection went to the drained backend"
    );
    long.roundtrip(64 * 1024).context("after the drain")?;
    s.agent
        .cli_ok(&["backend", "undrain", "web", &backends[0].to_string()])?;

    // Failover and rejoin: backend 1's web server dies, then comes back.
    if let Some(g) = s.servers.remove(&(1, ServerKind::Http.as_str())) {
        g.kill()?;
    }
    s.wait_health("web", backends[1], "down")?;
    let answers = s.get_from_ports(WEB, 32_000..32_300)?;
    ensure!(
        answers.iter().all(|b| *b != backend_name(1)),
        "a connection went to the dead backend"
    );
    long.roundtrip(64 * 1024).context("during the failover")?;
    s.servers.insert(
        (1, ServerKind::Http.as_str()),
        server(&s.topo, case, 1, ServerKind::Http, WEB_BACKEND)?,
    );
    s.wait_health("web", backends[1], "up")?;
    let answers = s.get_from_ports(WEB, 33_000..33_300)?;
    let back = answers.iter().filter(|b| **b == backend_name(1)).count();
    ensure!(back > 50, "only {back} of 300 reached the rejoined backend");

    // The agent stops with --keep-datapath: the pinned program goes on
    // translating both ways; a new agent takes over the NAT flows.
    let log = s.agent.stop()?;
    ensure!(log.contains("left attached"), "agent log:\n{log}");
    long.roundtrip(64 * 1024).context("with no agent running")?;
    s.agent.spawn(&[])?;
    let status = s.agent.json(&["status"])?;
    ensure!(status["restored"] == true, "{status}");
    long.roundtrip(64 * 1024).context("after the restart")?;
    ensure!(
        s.explain_backend(40_000, STREAM, "tcp")? == serving,
        "the flow moved"
    );

    // The lb host's own connections from its SNAT address still work
    // (their ports are outside the NAT range).
    let direct = SocketAddr::new(backends[2], WEB_BACKEND);
    let body = s.topo.lb_ns().run(move || http_get(direct, T))??;
    ensure!(body.trim() == backend_name(2), "direct GET: {body:?}");
    ensure!(
        s.checksum_errors()? == csum_before,
        "a receiving stack counted checksum errors"
    );
    s.agent.stop()?;
    Ok(())
}

/// The client talked to the VIP only: no packet on its wire carries a
/// backend's address, and its TCP/UDP packets go to or come from the VIP.
fn check_client_view(saw: &[Seen], client: IpAddr, vip: IpAddr, backends: &[IpAddr]) -> Result<()> {
    let ours: Vec<&Seen> = saw
        .iter()
        .filter(|p| p.src == client || p.dst == client)
        .collect();
    ensure!(
        ours.len() > 1000,
        "only {} packets captured at the client",
        ours.len()
    );
    for p in &ours {
        if backends.contains(&p.src) || backends.contains(&p.dst) {
            bail!("the client saw a backend address: {p:?}");
        }
        let peer = if p.src == client { p.dst } else { p.src };
        ensure!(
            peer == vip,
            "the client exchanged a packet with {peer}: {p:?}"
        );
    }
    Ok(())
}

/// The backend saw lb's SNAT address only: never the client's address;
/// everything at its service ports comes from the SNAT address (NAT flows
/// from ports of the NAT range, lb's health checks from others).
fn check_backend_view(saw: &[Seen], client: IpAddr, snat: IpAddr, backend: IpAddr) -> Result<()> {
    let service = [WEB_BACKEND, STREAM, DNS, PEER_BACKEND];
    let mut nat_flows = 0;
    for p in saw {
        ensure!(
            p.src != client && p.dst != client,
            "the backend saw the client's address: {p:?}"
        );
        let (port, peer, peer_port) = if p.src == backend {
            (p.src_port, p.dst, p.dst_port)
        } else if p.dst == backend {
            (p.dst_port, p.src, p.src_port)
        } else {
            continue;
        };
        if service.contains(&port) {
            ensure!(peer == snat, "backend service traffic with {peer}: {p:?}");
            if NAT_PORTS.contains(&peer_port) {
                nat_flows += 1;
            }
        }
    }
    ensure!(
        nat_flows > 100,
        "only {nat_flows} NAT packets captured at the backend"
    );
    Ok(())
}

#[test]
fn nat_one_arm_ipv4() -> Result<()> {
    suite(Case {
        arms: NatArms::One,
        v6: false,
    })
}

#[test]
fn nat_one_arm_ipv6() -> Result<()> {
    suite(Case {
        arms: NatArms::One,
        v6: true,
    })
}

#[test]
fn nat_two_arms_ipv4() -> Result<()> {
    suite(Case {
        arms: NatArms::Two,
        v6: false,
    })
}

#[test]
fn nat_two_arms_ipv6() -> Result<()> {
    suite(Case {
        arms: NatArms::Two,
        v6: true,
    })
}

/// Two SNAT ports for one backend: two connections hold them, a third is
/// refused and counted while the two go on; once one closes (and its pair
/// times out), a new connection gets its port.
#[test]
fn a_tiny_nat_port_range_refuses_new_flows_and_keeps_live_ones() -> Result<()> {
    let case = Case {
        arms: NatArms::One,
        v6: false,
    };
    let s = setup(
        case,
        1,
        "nat_port_range = \"61000-61001\"\nconntrack_tcp_closing_ms = 1000\n",
    )?;
    let backend = s.backends()[0];
    s.wait_health("stream", backend, "up")?;
    let mut a = s.stream_from(41_000)?;
    let mut b = s.stream_from(41_001)?;
    a.roundtrip(1000)?;
    b.roundtrip(1000)?;
    let refused_before = s.agent.reason("drop_nat_ports_exhausted")?;
    let vip = s.vip(STREAM);
    let third = s
        .topo
        .client_ns()
        .run(move || tcp_connect(Some(41_002), vip, Duration::from_secs(2)))?;
    ensure!(
        third.is_err(),
        "a third connection got through with two ports"
    );
    ensure!(
        s.agent.reason("drop_nat_ports_exhausted")? > refused_before,
        "the refused flow was not counted"
    );
    a.roundtrip(64 * 1024)
        .context("a live flow after the refusal")?;
    b.roundtrip(64 * 1024)
        .context("a live flow after the refusal")?;

    // One closes: within the closing timeout and a flow-keeper pass, its
    // port is free again.
    drop(a);
    let deadline = Instant::now() + Duration::from_secs(15);
    let mut port = 41_100;
    loop {
        let got = s
            .topo
            .client_ns()
            .run(move || tcp_connect(Some(port), vip, Duration::from_secs(1)))?;
        if let Ok(c) = got {
            let mut c = EchoStream::new(c);
            c.roundtrip(1000)?;
            break;
        }
        ensure!(
            Instant::now() < deadline,
            "no new connection within 15 s of a close"
        );
        port += 1;
    }
    b.roundtrip(1000).context("the other flow at the end")?;
    Ok(())
}

/// The topologies themselves, without lb: lb's host reaches an unmodified
/// backend from the address a NAT VIP takes by default (one arm: through
/// the router; two arms: on-link), in both families, and the backend
/// holds no VIP.
#[test]
fn the_nat_topologies_reach_backends_from_the_default_snat_address() -> Result<()> {
    require_root();
    for arms in [NatArms::One, NatArms::Two] {
        let topo = RoutedTopology::new_nat(1, arms)?;
        for v6 in [false, true] {
            let case = Case { arms, v6 };
            let _peer = server(&topo, case, 0, ServerKind::Peer, PEER_BACKEND)?;
            let at = SocketAddr::new(topo.backend_addrs_of(v6)[0], PEER_BACKEND);
            let (_, seen) = peer_seen(topo.lb_ns(), at, T)?;
            ensure!(
                seen.ip() == topo.snat_of(v6),
                "{arms:?}: the backend saw lb's host as {seen}, not {}",
                topo.snat_of(v6)
            );
            let lo = topo.backend_ns(0).ip(["addr", "show", "dev", "lo"])?;
            let lo = String::from_utf8_lossy(&lo.stdout).into_owned();
            ensure!(
                !lo.contains(&format!("{}/", topo.vip_of(v6))),
                "{arms:?}: the backend holds the VIP:\n{lo}"
            );
        }
    }
    Ok(())
}

/// Path MTU discovery through the NAT: the router's leg towards the
/// backends has MTU 1400 (the backend sends at most that much, by its
/// route, while advertising the MSS of its 1500-byte interface), so the
/// client's full-size segments are answered by the router with
/// "fragmentation needed", addressed to lb's SNAT address and quoting the
/// translated packet. lb translates the error back (to the client,
/// quoting what the client sent) and the client's 1 MB upload completes.
#[test]
fn path_mtu_discovery_works_through_the_nat() -> Result<()> {
    let case = Case {
        arms: NatArms::One,
        v6: false,
    };
    let s = setup(case, 1, "")?;
    s.topo
        .router_ns()
        .ip(["link", "set", &s.topo.router_back_iface(), "mtu", "1400"])?;
    let via = s.topo.router_back_addr().to_string();
    s.topo.backend_ns(0).ip([
        "route", "replace", "default", "via", &via, "mtu", "lock", "1400", "advmss", "1460",
    ])?;
    s.wait_health("stream", s.backends()[0], "up")?;
    let before = s.agent.reason("fwd_icmp_error")?;
    let mut c = s.stream_from(42_000)?;
    c.roundtrip(1 << 20)
        .context("1 MB each way through a 1400-byte link")?;
    ensure!(
        s.agent.reason("fwd_icmp_error")? > before,
        "no ICMP error was translated for the client"
    );
    Ok(())
}
