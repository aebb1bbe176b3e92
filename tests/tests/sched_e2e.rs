//! Schedulers through the real agent in network namespaces: a client,
//! `lb run` attached in the lb namespace, HTTP servers on the backends
//! (DSR). Needs root. Each test builds its own topology and removes it,
//! also when it fails.

use std::{
    collections::BTreeMap,
    net::{Ipv4Addr, SocketAddr, SocketAddrV4, TcpStream},
    thread,
    time::{Duration, Instant},
};

use anyhow::{Context as _, Result, bail, ensure};
use lb_tests::{
    agent::{AgentPaths, LbAgent, VipSpec, render_config},
    netns::{ChildGuard, Topology},
    require_root,
    servers::{ServerKind, ask, backend_name, get_from_ports, spawn_on_backends, tcp_connect},
};

const PORT: u16 = 80;

struct Setup {
    // Field order is drop order: agent and servers before the namespaces.
    agent: LbAgent,
    _servers: Vec<ChildGuard>,
    topo: Topology,
}

/// The config of one TCP VIP "web" over every backend with `scheduler`,
/// `agent_extra` added to the [agent] table.
fn config(topo: &Topology, paths: &AgentPaths, scheduler: &str, agent_extra: &str) -> String {
    let backends: Vec<_> = (0..topo.backend_count())
        .map(|i| topo.backend_addr(i))
        .collect();
    let vip = VipSpec::tcp("web", topo.vip(), PORT, &backends);
    with_scheduler(
        &render_config(&paths.instance, &paths.socket, &topo.lb_iface(), &[vip]),
        scheduler,
    )
    .replace(
        "conntrack_entries = 65536\n",
        &format!("conntrack_entries = 65536\n{agent_extra}"),
    )
}

fn with_scheduler(text: &str, scheduler: &str) -> String {
    text.replace(
        "forwarding = \"dsr-l2\"\n",
        &format!("forwarding = \"dsr-l2\"\nscheduler = \"{scheduler}\"\n"),
    )
}

fn setup(n: usize, scheduler: &str, agent_extra: &str, run_extra: &[&str]) -> Result<Setup> {
    require_root();
    let topo = Topology::with_backends(n)?;
    let servers = spawn_on_backends(&topo, ServerKind::Http, PORT)?;
    let paths = AgentPaths::new()?;
    let text = config(&topo, &paths, scheduler, agent_extra);
    let agent = LbAgent::start_with(topo.lb_ns(), paths, &text, run_extra)?;
    Ok(Setup {
        agent,
        _servers: servers,
        topo,
    })
}

impl Setup {
    fn vip(&self) -> SocketAddr {
        SocketAddrV4::new(self.topo.vip(), PORT).into()
    }

    /// Backend name → requests it answered, one new connection per port.
    fn answers(&self, ports: std::ops::Range<u16>) -> Result<BTreeMap<String, usize>> {
        let mut n = BTreeMap::new();
        for (_, b) in get_from_ports(self.topo.client_ns(), self.vip(), ports)? {
            *n.entry(b).or_default() += 1;
        }
        Ok(n)
    }

    /// Backend address → active connections `lb backend list` shows.
    fn active(&self) -> Result<BTreeMap<String, u64>> {
        let list = self.agent.json(&["backend", "list"])?;
        let mut out = BTreeMap::new();
        for b in list.as_array().into_iter().flatten() {
            let n = b["active_connections"]
                .as_u64()
                .with_context(|| format!("no active count: {b}"))?;
            out.insert(b["address"].as_str().unwrap_or("").to_string(), n);
        }
        Ok(out)
    }

    /// Polls [`Setup::active`] until `want` holds (bounded).
    fn wait_active(
        &self,
        what: &str,
        want: impl Fn(&BTreeMap<String, u64>) -> bool,
    ) -> Result<BTreeMap<String, u64>> {
        let deadline = Instant::now() + Duration::from_secs(20);
        loop {
            let a = self.active()?;
            if want(&a) {
                return Ok(a);
            }
            if Instant::now() >= deadline {
                bail!("{what}: active connections {a:?}");
            }
            thread::sleep(Duration::from_millis(200));
        }
    }

    /// `n` connections to the VIP from ports `from..`, kept open and idle.
    fn open_idle(&self, from: u16, n: u16) -> Result<Vec<TcpStream>> {
        let vip = self.vip();
        self.topo.client_ns().run(move || {
            (from..from + n)
                .map(|p| tcp_connect(Some(p), vip, Duration::from_secs(3)))
                .collect::<Result<Vec<_>>>()
        })?
    }

    fn addr(&self, i: usize) -> String {
        self.topo.backend_addr(i).to_string()
    }
}

fn cpus() -> usize {
    thread::available_parallelism().map_or(1, |n| n.get())
}

#[test]
fn round_robin_rotates_new_connections_through_the_agent() -> Result<()> {
    let s = setup(3, "round_robin", "", &[])?;
    let n = s.answers(20_000..20_300)?;
    println!("300 connections, round robin: {n:?}");
    // Each CPU rotates exactly: every backend within one per CPU of 100.
    for i in 0..3 {
        let got = n.get(&backend_name(i)).copied().unwrap_or(0);
        ensure!(
            got.abs_diff(100) <= cpus(),
            "backend {i}: {got} of 300 ({n:?})"
        );
    }
    let list = s.agent.cli_ok(&["vip", "list"])?;
    ensure!(list.contains("round_robin"), "{list}");
    let e = s.agent.explain(
        SocketAddrV4::new(s.topo.client_addr(), 41_000).into(),
        s.vip(),
        "tcp",
    )?;
    ensure!(e["scheduler"] == "round_robin", "{e}");
    ensure!(
        e["scheduler_state"]
            .as_str()
            .is_some_and(|t| t.contains("rotation per CPU over 3 slots")),
        "{e}"
    );
    Ok(())
}

#[test]
fn least_connections_spares_the_backend_holding_200_idle_connections() -> Result<()> {
    let s = setup(3, "least_connections", "", &[])?;
    // Only backend 0 takes new flows while the others are drained.
    for i in [1, 2] {
        s.agent.cli_ok(&["backend", "drain", "web", &s.addr(i)])?;
    }
    let idle = s.open_idle(30_000, 200)?;
    let a = s.wait_active("200 idle connections counted", |a| {
        a.get(&s.addr(0)) == Some(&200)
    })?;
    ensure!(a[&s.addr(1)] == 0 && a[&s.addr(2)] == 0, "{a:?}");
    let text = s.agent.cli_ok(&["backend", "list"])?;
    ensure!(text.contains("ACTIVE"), "{text}");
    for i in [1, 2] {
        s.agent.cli_ok(&["backend", "undrain", "web", &s.addr(i)])?;
    }
    let e = s.agent.explain(
        SocketAddrV4::new(s.topo.client_addr(), 41_000).into(),
        s.vip(),
        "tcp",
    )?;
    ensure!(
        e["scheduler_state"]
            .as_str()
            .is_some_and(|t| t.contains(&format!("{} 200/1", s.addr(0)))),
        "{e}"
    );

    // 3000 short connections.
    let n = s.answers(20_000..23_000)?;
    println!("3000 short connections with 200 idle on backend-0: {n:?}");
    let share = |i| n.get(&backend_name(i)).copied().unwrap_or(0) as f64 / 3000.0;
    ensure!(share(0) < 0.10, "backend 0 (200 idle): {n:?}");
    ensure!(
        share(1) >= 0.40 && share(2) >= 0.40,
        "the other two share the rest: {n:?}"
    );
    // Prometheus shows the counts too.
    thread::sleep(Duration::from_millis(1200));
    let metrics = lb_tests::agent::metrics(s.topo.lb_ns())?;
    let line = format!(
        "lb_backend_active_connections{{vip=\"web\",backend=\"{}\"}} 200",
        s.addr(0)
    );
    ensure!(
        metrics.contains(&line),
        "missing {line}: {}",
        metrics
            .lines()
            .filter(|l| l.contains("active"))
            .collect::<Vec<_>>()
            .join("\n")
    );

    // The idle connections close: every count returns to 0.
    drop(idle);
    s.wait_active("after the closes", |a| a.values().all(|&n| n == 0))?;
    Ok(())
}

#[test]
fn least_connections_counts_return_to_the_truth_after_idle_expiry() -> Result<()> {
    // Records idle for 2 s are over; the kernel never sees these
    // connections end, the agent's correction does.
    let s = setup(
        3,
        "least_connections",
        "conntrack_tcp_idle_ms = 2000\n",
        &[],
    )?;
    let idle = s.open_idle(31_000, 30)?;
    let a = s.wait_active("30 connections counted", |a| a.values().sum::<u64>() == 30)?;
    ensure!(
        a.values().all(|&n| n == 10),
        "spread by least connections: {a:?}"
    );
    s.wait_active("after idle expiry", |a| a.values().all(|&n| n == 0))?;
    // Still open on the client: only their records expired.
    ensure!(idle.len() == 30);
    drop(idle);
    // Their FINs meet no record: nothing is uncounted twice.
    thread::sleep(Duration::from_millis(500));
    let a = s.active()?;
    ensure!(a.values().all(|&n| n == 0), "{a:?}");
    Ok(())
}

#[test]
fn established_flows_keep_their_backend_across_a_scheduler_reload_and_a_restart() -> Result<()> {
    let mut s = setup(3, "maglev", "", &["--keep-datapath"])?;
    let vip = s.vip();
    let mut held: Vec<TcpStream> = s.topo.client_ns().run(move || {
        (0..24u16)
            .map(|i| tcp_connect(Some(32_000 + i), vip, Duration::from_secs(3)))
            .collect::<Result<Vec<_>>>()
    })??;
    let before: Vec<String> = held.iter_mut().map(ask).collect::<Result<_>>()?;

    // Reload: maglev → round_robin.
    let text = std::fs::read_to_string(&s.agent.config)?;
    std::fs::write(
        &s.agent.config,
        text.replace("scheduler = \"maglev\"", "scheduler = \"round_robin\""),
    )?;
    s.agent.cli_ok(&["reload"])?;
    let list = s.agent.cli_ok(&["vip", "list"])?;
    ensure!(list.contains("round_robin"), "{list}");
    let after: Vec<String> = held.iter_mut().map(ask).collect::<Result<_>>()?;
    ensure!(
        before == after,
        "moved by the reload: {before:?} -> {after:?}"
    );
    let n = s.answers(21_000..21_090)?;
    for i in 0..3 {
        let got = n.get(&backend_name(i)).copied().unwrap_or(0);
        ensure!(
            got.abs_diff(30) <= cpus(),
            "rotation after the reload: {n:?}"
        );
    }

    // Restart: the pinned state (scheduler included) is read back.
    s.agent.stop()?;
    s.agent.spawn(&[])?;
    let again: Vec<String> = held.iter_mut().map(ask).collect::<Result<_>>()?;
    ensure!(
        before == again,
        "moved by the restart: {before:?} -> {again:?}"
    );
    let n = s.answers(22_000..22_090)?;
    for i in 0..3 {
        let got = n.get(&backend_name(i)).copied().unwrap_or(0);
        ensure!(
            got.abs_diff(30) <= cpus(),
            "rotation after the restart: {n:?}"
        );
    }
    Ok(())
}

#[test]
fn drained_and_down_backends_get_no_new_flows_from_any_scheduler() -> Result<()> {
    require_root();
    let topo = Topology::with_backends(3)?;
    // No server on backend 2: its checks fail and it goes down.
    let _servers: Vec<ChildGuard> = (0..2)
        .map(|i| {
            lb_tests::servers::spawn_server(
                topo.backend_ns(i),
                ServerKind::Http,
                SocketAddrV4::new(Ipv4Addr::UNSPECIFIED, PORT),
                &backend_name(i),
            )
        })
        .collect::<Result<_>>()?;
    let paths = AgentPaths::new()?;
    let text = config(&topo, &paths, "SCHED", "");
    let mut s = Setup {
        agent: LbAgent::start_with(
            topo.lb_ns(),
            paths,
            &text.replace("\"SCHED\"", "\"round_robin\""),
            &[],
        )?,
        _servers: Vec::new(),
        topo,
    };
    let down = s.topo.backend_addr(2);
    s.agent
        .wait_health(None, down.into(), "down", Duration::from_secs(10))?;
    s.agent.cli_ok(&["backend", "drain", "web", &s.addr(1)])?;
    for (k, sched) in [
        "round_robin",
        "weighted_round_robin",
        "least_connections",
        "maglev",
    ]
    .into_iter()
    .enumerate()
    {
        std::fs::write(
            &s.agent.config,
            text.replace("\"SCHED\"", &format!("\"{sched}\"")),
        )?;
        s.agent.cli_ok(&["reload"])?;
        let from = 23_000 + 100 * k as u16;
        let n = s.answers(from..from + 60)?;
        ensure!(
            n.len() == 1 && n.get(&backend_name(0)) == Some(&60),
            "{sched}: {n:?}"
        );
    }
    s._servers.clear();
    Ok(())
}
