//! End-to-end behaviour in network namespaces: a real client, the real `lb`
//! agent attached to the lb namespace's veth, real servers on the backends
//! replying directly to the client (DSR). Needs root. Each test builds its
//! own topology and removes it, also when it fails.

use std::{
    net::{Ipv4Addr, SocketAddrV4},
    thread,
    time::{Duration, Instant},
};

use anyhow::{Context as _, Result, ensure};
use lb_tests::{
    agent::{AgentPaths, LbAgent, VipSpec, lb_in_ns, render_config},
    netns::{ChildGuard, Topology},
    require_root,
    servers::{
        EchoStream, ServerKind, backend_name, get_from_ports, http_get_from,
        one_udp_flow_one_backend, shares, spawn_on_backends, spawn_server, tcp_connect,
    },
};

const PORT: u16 = 80;
const T: Duration = Duration::from_secs(3);

fn vip_addr(topo: &Topology) -> SocketAddrV4 {
    SocketAddrV4::new(topo.vip(), PORT)
}

fn backends(topo: &Topology) -> Vec<Ipv4Addr> {
    (0..topo.backend_count())
        .map(|i| topo.backend_addr(i))
        .collect()
}

/// A topology with HTTP servers on every backend and an agent in front.
struct Setup {
    // Field order is drop order: agent and servers before the namespaces.
    agent: LbAgent,
    servers: Vec<ChildGuard>,
    topo: Topology,
}

fn setup(n: usize, weights: Option<&[u32]>) -> Result<Setup> {
    require_root();
    let topo = Topology::with_backends(n)?;
    let servers = spawn_on_backends(&topo, ServerKind::Http, PORT)?;
    let mut vip = VipSpec::tcp("web", topo.vip(), PORT, &backends(&topo));
    if let Some(w) = weights {
        for (b, w) in vip.backends.iter_mut().zip(w) {
            b.1 = *w;
        }
    }
    let agent = LbAgent::start(topo.lb_ns(), &topo.lb_iface(), &[vip])?;
    Ok(Setup {
        agent,
        servers,
        topo,
    })
}

#[test]
fn distribution_over_three_equal_backends() -> Result<()> {
    let s = setup(3, None)?;
    let answers = get_from_ports(s.topo.client_ns(), vip_addr(&s.topo).into(), 20_000..23_000)?;
    let sh = shares(&answers);
    for i in 0..3 {
        let got = sh.get(&backend_name(i)).copied().unwrap_or(0.0);
        ensure!(
            (got - 33.33).abs() <= 5.0,
            "backend {i}: {got:.1}% ({sh:?})"
        );
    }
    // The kernel counted those flows: one new flow per connection.
    let stats = s.agent.json(&["stats"])?;
    let new_flows = stats["vips"][0]["new_flows"].as_u64().unwrap_or(0);
    ensure!(new_flows >= 3000, "new flows counted: {new_flows}");
    // And Prometheus sees them (the agent's sample is at most a second old).
    thread::sleep(Duration::from_millis(1200));
    let text = lb_tests::agent::metrics(s.topo.lb_ns())?;
    let flows = text
        .lines()
        .find(|l| l.starts_with("lb_vip_new_flows_total{vip=\"web\"}"))
        .and_then(|l| l.split_whitespace().last())
        .and_then(|v| v.parse::<u64>().ok())
        .unwrap_or(0);
    ensure!(flows >= 3000, "metrics: new flows {flows}\n{text}");
    for i in 0..3 {
        let up = format!(
            "lb_backend_up{{vip=\"web\",backend=\"{}\"}} 1",
            s.topo.backend_addr(i)
        );
        ensure!(text.contains(&up), "missing {up}");
    }
    Ok(())
}

#[test]
fn same_source_port_lands_on_the_same_backend() -> Result<()> {
    let s = setup(3, None)?;
    for port in [30_001u16, 30_002, 30_003, 30_004, 30_005] {
        let answers = get_from_ports(s.topo.client_ns(), vip_addr(&s.topo).into(), vec![port; 10])?;
        let first = &answers[0].1;
        ensure!(
            answers.iter().all(|(_, b)| b == first),
            "port {port}: {answers:?}"
        );
        // And lb explain predicts it with the kernel's hash.
        let src = SocketAddrV4::new(s.topo.client_addr(), port);
        let e = s
            .agent
            .explain(src.into(), vip_addr(&s.topo).into(), "tcp")?;
        let predicted = e["ring_backend"].as_str().unwrap_or("").to_string();
        let i: usize = first.trim_start_matches("backend-").parse()?;
        ensure!(
            predicted == s.topo.backend_addr(i).to_string(),
            "explain says {predicted}, {first} answered"
        );
    }
    Ok(())
}

#[test]
fn weights_one_to_three() -> Result<()> {
    let s = setup(2, Some(&[1, 3]))?;
    let answers = get_from_ports(s.topo.client_ns(), vip_addr(&s.topo).into(), 21_000..23_000)?;
    let sh = shares(&answers);
    let b0 = sh.get(&backend_name(0)).copied().unwrap_or(0.0);
    let b1 = sh.get(&backend_name(1)).copied().unwrap_or(0.0);
    ensure!(
        (b0 - 25.0).abs() <= 5.0 && (b1 - 75.0).abs() <= 5.0,
        "{sh:?}"
    );
    Ok(())
}

#[test]
fn a_fourth_backend_takes_a_quarter_of_the_source_ports() -> Result<()> {
    let mut s = setup(3, None)?;
    let ports: Vec<u16> = (24_000..26_000).collect();
    let before = get_from_ports(s.topo.client_ns(), vip_addr(&s.topo).into(), ports.clone())?;
    let i = s.topo.add_backend()?;
    let addr = s.topo.backend_addr(i);
    s.servers.push(spawn_server(
        s.topo.backend_ns(i),
        ServerKind::Http,
        SocketAddrV4::new(Ipv4Addr::UNSPECIFIED, PORT),
        &backend_name(i),
    )?);
    s.agent
        .cli_ok(&["backend", "add", "web", &addr.to_string()])?;
    s.agent
        .wait_health(None, addr.into(), "up", Duration::from_secs(10))?;
    let after = get_from_ports(s.topo.client_ns(), vip_addr(&s.topo).into(), ports)?;
    let moved = before
        .iter()
        .zip(&after)
        .filter(|(b, a)| b.1 != a.1)
        .collect::<Vec<_>>();
    let to_new = moved.iter().filter(|(_, a)| a.1 == backend_name(i)).count();
    let pct = 100.0 * to_new as f64 / before.len() as f64;
    ensure!(
        (20.0..=30.0).contains(&pct),
        "{pct:.1}% moved to the new backend"
    );
    // Maglev is near-minimal: almost nothing moves between old backends.
    let between_old = moved.len() - to_new;
    ensure!(
        between_old * 100 <= before.len(),
        "{between_old} ports moved between old backends"
    );
    Ok(())
}

#[test]
fn failover_and_rejoin() -> Result<()> {
    let mut s = setup(3, None)?;
    let victim = s.topo.backend_addr(1);
    // Kill backend 1's server: after `fall` checks it is down.
    let server = s.servers.remove(1);
    server.kill()?;
    s.agent
        .wait_health(None, victim.into(), "down", Duration::from_secs(10))?;
    // From now on no connection fails and none goes to backend 1.
    let answers = get_from_ports(s.topo.client_ns(), vip_addr(&s.topo).into(), 26_000..26_600)?;
    ensure!(
        answers.iter().all(|(_, b)| b != &backend_name(1)),
        "a connection went to the dead backend"
    );
    // Restart it: it rejoins after `rise` checks and gets traffic again.
    s.servers.push(spawn_server(
        s.topo.backend_ns(1),
        ServerKind::Http,
        SocketAddrV4::new(Ipv4Addr::UNSPECIFIED, PORT),
        &backend_name(1),
    )?);
    s.agent
        .wait_health(None, victim.into(), "up", Duration::from_secs(10))?;
    let answers = get_from_ports(s.topo.client_ns(), vip_addr(&s.topo).into(), 27_000..27_600)?;
    let back = answers
        .iter()
        .filter(|(_, b)| b == &backend_name(1))
        .count();
    ensure!(
        back > 100,
        "only {back} of 600 connections reached the rejoined backend"
    );
    // The metrics tell the story: two transitions for the victim (down,
    // up), none for the others, and a ring built for each change (the
    // view is sampled once a tick: polled, bounded).
    let line = |b: Ipv4Addr, n: u64| {
        format!("lb_backend_health_transitions_total{{vip=\"web\",backend=\"{b}\"}} {n}")
    };
    let deadline = std::time::Instant::now() + Duration::from_secs(5);
    let text = loop {
        let text = lb_tests::agent::metrics(s.topo.lb_ns())?;
        if text.contains(&line(victim, 2)) || std::time::Instant::now() >= deadline {
            break text;
        }
        std::thread::sleep(Duration::from_millis(200));
    };
    let builds: u64 = text
        .lines()
        .find_map(|l| l.strip_prefix("lb_ring_builds_total "))
        .and_then(|v| v.trim().parse().ok())
        .unwrap_or(0);
    ensure!(
        text.contains(&line(victim, 2))
            && text.contains(&line(s.topo.backend_addr(0), 0))
            && text.contains(&format!(
                "lb_build_info{{version=\"{}\"}} 1",
                env!("CARGO_PKG_VERSION")
            ))
            && text.contains("lb_agent_start_time_seconds ")
            && text.contains(&format!(
                "lb_backend_check_duration_seconds_count{{vip=\"web\",backend=\"{}\"}} ",
                s.topo.backend_addr(0)
            ))
            && builds >= 3,
        "metrics after a failover and a rejoin ({builds} ring builds):\n{text}"
    );
    Ok(())
}

const STREAM_PORT: u16 = 7000;

#[test]
fn established_flows_survive_changes_and_agent_restart() -> Result<()> {
    require_root();
    let mut topo = Topology::with_backends(3)?;
    let mut servers = spawn_on_backends(&topo, ServerKind::Stream, STREAM_PORT)?;
    let mut vip = VipSpec::tcp("stream", topo.vip(), STREAM_PORT, &backends(&topo));
    vip.health_check =
        "kind = \"tcp\"\ninterval_ms = 200\ntimeout_ms = 150\nrise = 2\nfall = 2".into();
    let paths = AgentPaths::new()?;
    let text = render_config(&paths.instance, &paths.socket, &topo.lb_iface(), &[vip]);
    let mut agent = LbAgent::start_with(topo.lb_ns(), paths, &text, &["--keep-datapath"])?;
    let vip_sa = SocketAddrV4::new(topo.vip(), STREAM_PORT);

    // A socket made in the client namespace stays there wherever it is
    // used: the test drives it from this thread.
    let conn = topo
        .client_ns()
        .run(move || tcp_connect(Some(40_000), vip_sa, T))??;
    conn.set_read_timeout(Some(T))?;
    let mut stream = EchoStream::new(conn);
    let mut step = |what: &str| -> Result<u64> {
        stream
            .roundtrip(64 * 1024)
            .with_context(|| format!("after {what}"))?;
        Ok(stream.sent)
    };
    step("connecting")?;
    // Which backend serves it?
    let src = SocketAddrV4::new(topo.client_addr(), 40000);
    let e = agent.explain(src.into(), vip_sa.into(), "tcp")?;
    let serving: Ipv4Addr = e["backend"].as_str().unwrap_or_default().parse()?;
    step("finding the backend")?;

    // Add a fourth backend.
    let i = topo.add_backend()?;
    servers.push(spawn_server(
        topo.backend_ns(i),
        ServerKind::Stream,
        SocketAddrV4::new(Ipv4Addr::UNSPECIFIED, STREAM_PORT),
        &backend_name(i),
    )?);
    agent.cli_ok(&[
        "backend",
        "add",
        "stream",
        &topo.backend_addr(i).to_string(),
    ])?;
    agent.wait_health(
        None,
        topo.backend_addr(i).into(),
        "up",
        Duration::from_secs(10),
    )?;
    step("adding a backend")?;
    // Drain another backend, remove a third one (neither serves our flow).
    let others: Vec<Ipv4Addr> = backends(&topo)
        .into_iter()
        .filter(|a| *a != serving && *a != topo.backend_addr(i))
        .collect();
    agent.cli_ok(&["backend", "drain", "stream", &others[0].to_string()])?;
    step("draining a backend")?;
    agent.cli_ok(&["backend", "remove", "stream", &others[1].to_string()])?;
    step("removing a backend")?;
    // Change the weight of the serving backend.
    agent.cli_ok(&["backend", "set-weight", "stream", &serving.to_string(), "5"])?;
    step("changing its weight")?;

    // Restart the agent with --keep-datapath: the pinned link keeps
    // forwarding while no agent runs.
    let log = agent.stop()?;
    ensure!(log.contains("left attached"), "agent log:\n{log}");
    ensure!(agent.pin_dir().join("CONNTRACK").exists());
    let tracked = agent.pinned_flows::<lb_common::FlowKey>("CONNTRACK")?;
    ensure!(tracked >= 1, "conntrack entries after the stop: {tracked}");
    step("stopping the agent (data path left running)")?;
    // The new agent runs without --keep-datapath: its stop is a clean one.
    agent.spawn(&[])?;
    let status = agent.json(&["status"])?;
    ensure!(status["restored"] == true, "{status}");
    ensure!(
        agent.pinned_flows::<lb_common::FlowKey>("CONNTRACK")? >= tracked,
        "conntrack entries lost across the restart"
    );
    let sent = step("restarting the agent")?;
    ensure!(sent == 8 * 64 * 1024, "bytes echoed: {sent}");
    // Clean stop: detaches and unpins.
    agent.stop()?;
    let attached = topo.lb_ns().ip(["link", "show", &topo.lb_iface()])?;
    ensure!(
        !String::from_utf8_lossy(&attached.stdout).contains("prog/xdp"),
        "still attached after a clean stop"
    );
    ensure!(!agent.pin_dir().exists(), "pins left after a clean stop");
    Ok(())
}

#[test]
fn a_drained_backend_gets_no_new_flows_but_keeps_its_own() -> Result<()> {
    require_root();
    let topo = Topology::with_backends(3)?;
    let _servers = spawn_on_backends(&topo, ServerKind::Stream, STREAM_PORT)?;
    let _http = spawn_on_backends(&topo, ServerKind::Http, PORT)?;
    let vips = [
        VipSpec::tcp("stream", topo.vip(), STREAM_PORT, &backends(&topo)),
        VipSpec::tcp("web", topo.vip(), PORT, &backends(&topo)),
    ];
    let agent = LbAgent::start(topo.lb_ns(), &topo.lb_iface(), &vips)?;
    let vip_sa = SocketAddrV4::new(topo.vip(), STREAM_PORT);
    let client_addr = topo.client_addr();
    let e = agent.explain(
        SocketAddrV4::new(client_addr, 41000).into(),
        vip_sa.into(),
        "tcp",
    )?;
    let serving: Ipv4Addr = e["ring_backend"].as_str().unwrap_or_default().parse()?;
    let serving_name = backend_name(backends(&topo).iter().position(|a| *a == serving).unwrap());
    let web = vip_addr(&topo);
    let conn = topo
        .client_ns()
        .run(move || tcp_connect(Some(41_000), vip_sa, T))??;
    conn.set_read_timeout(Some(T))?;
    let mut stream = EchoStream::new(conn);
    stream.roundtrip(1000)?;
    // Drain the backend of the stream VIP's flow and of the web VIP.
    agent.cli_ok(&["backend", "drain", "stream", &serving.to_string()])?;
    agent.cli_ok(&["backend", "drain", "web", &serving.to_string()])?;
    // New web connections avoid it.
    let answers = topo.client_ns().run(move || {
        (28_000..28_300u16)
            .map(|p| http_get_from(Some(p), web, T).map(|b| b.trim().to_string()))
            .collect::<Result<Vec<_>>>()
    })??;
    ensure!(
        answers.iter().all(|b| *b != serving_name),
        "a new connection went to the drained backend"
    );
    let list = agent.json(&["backend", "list", "--vip", "web"])?;
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
    // Its established flow still goes to it: explain says conntrack.
    let e = agent.explain(
        SocketAddrV4::new(client_addr, 41000).into(),
        vip_sa.into(),
        "tcp",
    )?;
    ensure!(e["backend"] == serving.to_string(), "{e}");
    ensure!(
        e["reason"].as_str().unwrap_or("").contains("conntrack"),
        "{e}"
    );
    // And it keeps working, all bytes echoed.
    stream.roundtrip(64 * 1024)?;
    Ok(())
}

#[test]
fn udp_flow_reaches_one_backend_and_replies_reach_the_client() -> Result<()> {
    require_root();
    let topo = Topology::with_backends(3)?;
    let _servers = spawn_on_backends(&topo, ServerKind::UdpEcho, 5353)?;
    let mut vip = VipSpec::tcp("dns", topo.vip(), 5353, &backends(&topo));
    vip.protocol = "udp";
    vip.health_check = "kind = \"none\"".into();
    let _agent = LbAgent::start(topo.lb_ns(), &topo.lb_iface(), &[vip])?;
    let sa = SocketAddrV4::new(topo.vip(), 5353);
    one_udp_flow_one_backend(topo.client_ns(), sa.into(), 45_000, 20)?;
    Ok(())
}

#[test]
fn the_lb_hosts_own_traffic_keeps_working() -> Result<()> {
    let s = setup(2, None)?;
    // A TCP server on the lb host's own address, and ping.
    let _own = spawn_server(
        s.topo.lb_ns(),
        ServerKind::Http,
        SocketAddrV4::new(s.topo.lb_addr(), 8080),
        "lb-host",
    )?;
    let addr = SocketAddrV4::new(s.topo.lb_addr(), 8080);
    let bodies = s.topo.client_ns().run(move || {
        (0..20)
            .map(|_| lb_tests::servers::http_get(addr, T))
            .collect::<Result<Vec<_>>>()
    })??;
    ensure!(bodies.iter().all(|b| b.trim() == "lb-host"));
    s.topo
        .client_ns()
        .exec(["ping", "-c", "2", "-W", "2", &s.topo.lb_addr().to_string()])?;
    let stats = s.agent.json(&["stats"])?;
    let passed = stats["reasons"]["pass_not_vip"][0].as_u64().unwrap_or(0);
    ensure!(
        passed > 0,
        "the host's traffic passed through lb's program: {stats}"
    );
    Ok(())
}

#[test]
fn a_bad_config_fails_and_attaches_nothing() -> Result<()> {
    require_root();
    let topo = Topology::with_backends(1)?;
    let paths = AgentPaths::new()?;
    let mut text = render_config(
        &paths.instance,
        &paths.socket,
        &topo.lb_iface(),
        &[VipSpec::tcp("web", topo.vip(), PORT, &backends(&topo))],
    );
    text = text.replace("weight = 1", "weight = 0");
    std::fs::write(&paths.config, &text)?;
    let out = lb_in_ns(topo.lb_ns().name())
        .arg("run")
        .arg("--config")
        .arg(&paths.config)
        .output()?;
    let stderr = String::from_utf8_lossy(&out.stderr);
    let _ = std::fs::remove_dir_all(&paths.dir);
    ensure!(!out.status.success(), "lb run accepted a bad config");
    ensure!(
        stderr.contains("weight") && stderr.contains("lb.toml:"),
        "error does not name file and field: {stderr}"
    );
    let link = topo.lb_ns().ip(["link", "show", &topo.lb_iface()])?;
    ensure!(
        !String::from_utf8_lossy(&link.stdout).contains("xdp"),
        "XDP attached"
    );
    ensure!(
        !std::path::Path::new("/sys/fs/bpf/lb")
            .join(&paths.instance)
            .exists(),
        "maps pinned by a rejected start"
    );
    Ok(())
}

#[test]
fn reload_applies_a_good_file_and_refuses_a_bad_one() -> Result<()> {
    let s = setup(3, None)?;
    let listed = |agent: &LbAgent| -> Result<Vec<String>> {
        Ok(agent
            .json(&["backend", "list"])?
            .as_array()
            .into_iter()
            .flatten()
            .map(|b| b["address"].as_str().unwrap_or("").to_string())
            .collect())
    };
    assert_eq!(listed(&s.agent)?.len(), 3);
    let good = std::fs::read_to_string(&s.agent.config)?;
    // A bad file: reported with file, line and field; nothing changes.
    let third = format!("address = \"{}\"", s.topo.backend_addr(2));
    let bad = good.replace(&third, "address = \"2001:2::13\"");
    ensure!(bad != good, "the config names backend 2");
    std::fs::write(&s.agent.config, &bad)?;
    let out = s.agent.cli(&["reload"])?;
    let err = String::from_utf8_lossy(&out.stderr);
    ensure!(!out.status.success(), "a bad reload succeeded");
    ensure!(err.contains("lb.toml:") && err.contains("IPv6"), "{err}");
    ensure!(
        listed(&s.agent)?.len() == 3,
        "state changed after a bad reload"
    );
    let answers = get_from_ports(s.topo.client_ns(), vip_addr(&s.topo).into(), 29_000..29_090)?;
    ensure!(
        shares(&answers).len() == 3,
        "traffic still spread over 3 backends"
    );
    // A good file without backend 2: applied, and its traffic moves.
    let without = good
        .split("[[vip.backend]]")
        .filter(|part| !part.contains(&third))
        .collect::<Vec<_>>()
        .join("[[vip.backend]]");
    std::fs::write(&s.agent.config, &without)?;
    s.agent.cli_ok(&["reload"])?;
    ensure!(listed(&s.agent)?.len() == 2);
    let answers = get_from_ports(s.topo.client_ns(), vip_addr(&s.topo).into(), 29_100..29_400)?;
    ensure!(
        answers.iter().all(|(_, b)| b != &backend_name(2)),
        "a connection went to the removed backend"
    );
    // SIGHUP reloads too: the original file brings backend 2 back.
    std::fs::write(&s.agent.config, &good)?;
    let pid = s.agent.json(&["status"])?["pid"].as_i64().unwrap_or(0);
    ensure!(pid > 1, "status names the agent's pid");
    // SAFETY: kill has no memory-safety preconditions.
    ensure!(unsafe { libc::kill(pid as libc::pid_t, libc::SIGHUP) } == 0);
    let deadline = Instant::now() + Duration::from_secs(5);
    while listed(&s.agent)?.len() != 3 {
        ensure!(Instant::now() < deadline, "SIGHUP did not reload the file");
        thread::sleep(Duration::from_millis(100));
    }
    Ok(())
}
