//! The agent's resource budget, in network namespaces with the real agent:
//! a flood of idle metrics connections under a small file-descriptor limit
//! takes no backend down, stops no traffic and does not make the agent
//! spin. Needs root.

use std::{
    io::{Read, Write},
    net::{SocketAddrV4, TcpStream},
    thread,
    time::{Duration, Instant},
};

use anyhow::{Context as _, Result, bail, ensure};
use lb::datapath::{Datapath, MapSizes};
use lb_tests::{
    agent::{AgentPaths, LbAgent, METRICS_LISTEN, VipSpec, render_config},
    netns::Topology,
    require_root,
    servers::{ServerKind, http_get_from, spawn_on_backends},
};

const PORT: u16 = 80;
const T: Duration = Duration::from_secs(3);

/// User + system CPU time of `pid` so far.
fn cpu_time(pid: u32) -> Result<Duration> {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat"))?;
    // Fields after the command name (which may hold spaces), 1-based from
    // field 3: utime is field 14, stime 15.
    let rest = &stat[stat.rfind(')').context("malformed stat")? + 2..];
    let f: Vec<&str> = rest.split_whitespace().collect();
    let ticks: u64 = f[11].parse::<u64>()? + f[12].parse::<u64>()?;
    // SAFETY: sysconf has no preconditions.
    let hz = unsafe { libc::sysconf(libc::_SC_CLK_TCK) }.max(1) as u64;
    Ok(Duration::from_millis(ticks * 1000 / hz))
}

fn open_fds(pid: u32) -> usize {
    std::fs::read_dir(format!("/proc/{pid}/fd"))
        .map(|d| d.count())
        .unwrap_or(0)
}

fn metrics_get() -> Result<String> {
    let mut c = TcpStream::connect_timeout(&METRICS_LISTEN.parse()?, T)?;
    c.set_read_timeout(Some(T))?;
    c.write_all(b"GET /metrics HTTP/1.1\r\nHost: lb\r\nConnection: close\r\n\r\n")?;
    let mut body = String::new();
    c.read_to_string(&mut body)?;
    ensure!(
        body.starts_with("HTTP/1.1 200"),
        "metrics answered {body:?}"
    );
    Ok(body)
}

/// Health of every backend as `lb backend list` shows it.
fn healths(agent: &LbAgent) -> Result<Vec<(String, String, String)>> {
    let list = agent.json(&["backend", "list"])?;
    Ok(list
        .as_array()
        .into_iter()
        .flatten()
        .map(|b| {
            (
                b["address"].as_str().unwrap_or("").to_string(),
                b["health"].as_str().unwrap_or("").to_string(),
                b["last_check"].as_str().unwrap_or("").to_string(),
            )
        })
        .collect())
}

#[test]
fn idle_metrics_flood_under_a_small_fd_limit_takes_nothing_down() -> Result<()> {
    require_root();
    let topo = Topology::with_backends(2)?;
    let _servers = spawn_on_backends(&topo, ServerKind::Http, PORT)?;
    let backends: Vec<_> = (0..2).map(|i| topo.backend_addr(i)).collect();
    let mut vip = VipSpec::tcp("web", topo.vip(), PORT, &backends);
    vip.health_check =
        "kind = \"tcp\"\ninterval_ms = 50\ntimeout_ms = 40\nrise = 2\nfall = 2".into();
    let paths = AgentPaths::new()?;
    let text = render_config(&paths.instance, &paths.socket, &topo.lb_iface(), &[vip]);
    let agent = LbAgent::start_with_nofile(topo.lb_ns(), paths, &text, 256)?;
    let pid = agent.pid().context("agent pid")?;
    let deadline = Instant::now() + Duration::from_secs(10);
    while !healths(&agent)?.iter().all(|(_, h, _)| h == "up") {
        ensure!(
            Instant::now() < deadline,
            "backends not up: {:?}",
            healths(&agent)?
        );
        thread::sleep(Duration::from_millis(100));
    }
    let fds_before = open_fds(pid);

    // 300 idle connections to the metrics port, held open.
    let flood = topo.lb_ns().run(|| -> Result<Vec<TcpStream>> {
        let addr = METRICS_LISTEN.parse()?;
        (0..300)
            .map(|i| {
                TcpStream::connect_timeout(&addr, T)
                    .with_context(|| format!("metrics connection {i}"))
            })
            .collect()
    })??;
    thread::sleep(Duration::from_millis(500));
    let fds_flood = open_fds(pid);

    // For three seconds: client traffic through the VIP, the CLI, the CPU.
    let cpu0 = cpu_time(pid)?;
    let t0 = Instant::now();
    let vip = SocketAddrV4::new(topo.vip(), PORT);
    let mut served = 0;
    while t0.elapsed() < Duration::from_secs(3) {
        let body = topo
            .client_ns()
            .run(move || http_get_from(None, vip, T))?
            .with_context(|| format!("client request {} during the flood", served + 1))?;
        ensure!(body.starts_with("backend-"), "answer {body:?}");
        served += 1;
        agent
            .cli_ok(&["status"])
            .context("lb status during the flood")?;
        thread::sleep(Duration::from_millis(100));
    }
    let cpu = cpu_time(pid)? - cpu0;
    let wall = t0.elapsed();
    let h = healths(&agent)?;
    let log = agent.log_text();
    eprintln!(
        "fds: {fds_before} before, {fds_flood} during the flood (limit 256); agent CPU {cpu:?} \
         in {wall:?}; {served} client requests served; backends {h:?}"
    );
    ensure!(
        h.iter().all(|(_, health, _)| health == "up"),
        "a backend went down during the flood: {h:?}\n{log}"
    );
    ensure!(!log.contains("DOWN"), "a backend went down:\n{log}");
    ensure!(
        log.contains("metrics: refused"),
        "the agent did not log the refused connections:\n{log}"
    );
    // Idle: health checks of two backends every 50 ms cost a few percent;
    // a spinning accept loop costs whole cores.
    ensure!(
        cpu.as_secs_f64() < 0.3 * wall.as_secs_f64(),
        "the agent used {cpu:?} of CPU in {wall:?} during the flood"
    );

    // The idle connections are closed by the header-read timeout (5 s):
    // then /metrics answers again.
    let deadline = Instant::now() + Duration::from_secs(15);
    loop {
        match topo.lb_ns().run(metrics_get)? {
            Ok(_) => break,
            Err(e) if Instant::now() >= deadline => {
                bail!("/metrics did not answer again after the idle connections: {e:#}")
            }
            Err(_) => thread::sleep(Duration::from_millis(250)),
        }
    }
    drop(flood);
    Ok(())
}

#[test]
fn ring_writes_in_one_batch_hold_what_single_writes_hold() -> Result<()> {
    require_root();
    const M: u32 = 65_537;
    let sizes = MapSizes {
        max_vips: 2,
        max_backends: 1000,
        ring_size: M,
        conntrack_entries: 1024,
    };
    let mut dp = Datapath::load_private(sizes)?;
    // A full ring for 1000 backends, then one with every slot changed.
    let first: Vec<(u32, u32)> = (0..M).map(|s| (s, 1 + s % 1000)).collect();
    let second: Vec<(u32, u32)> = (0..M).map(|s| (s, 1 + (s + 7) % 1000)).collect();
    let t = Instant::now();
    dp.write_ring(M, first.iter().copied())?;
    let batched = t.elapsed();
    ensure!(dp.batch_writes(), "the kernel refused BPF_MAP_UPDATE_BATCH");
    ensure!(
        dp.read_ring(M, M)? == first.iter().map(|s| s.1).collect::<Vec<_>>(),
        "the batch write left other contents"
    );
    ensure!(
        dp.read_ring(0, M)?.iter().all(|&id| id == 0),
        "the batch write touched another VIP's ring"
    );
    dp.set_batch_writes(false);
    let t = Instant::now();
    dp.write_ring(M, second.iter().copied())?;
    let single = t.elapsed();
    ensure!(dp.read_ring(M, M)? == second.iter().map(|s| s.1).collect::<Vec<_>>());
    // Out of range: an error, nothing written.
    dp.set_batch_writes(true);
    ensure!(dp.write_ring(M, [(0, 5), (M, 5)]).is_err());
    ensure!(dp.read_ring(M, 1)? == vec![second[0].1]);
    eprintln!(
        "writing {M} ring slots: {batched:?} in one BPF_MAP_UPDATE_BATCH, {single:?} one \
         BPF_MAP_UPDATE_ELEM each"
    );
    Ok(())
}
