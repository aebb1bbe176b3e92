//! The agent's resource budget, in network namespaces with the real agent:
//! a flood of idle metrics connections under a small file-descriptor limit
//! takes no backend down, stops no traffic and does not make the agent
//! spin; half of 1000 backends checked every 50 ms failing at once is
//! applied in a few reconciles while the CLI stays responsive; ring writes
//! in one batch. Needs root.

use std::{
    fmt::Write as _,
    io::{Read, Write},
    net::{Ipv4Addr, SocketAddrV4, TcpStream},
    thread,
    time::{Duration, Instant},
};

use anyhow::{Context as _, Result, bail, ensure};
use lb::datapath::{Datapath, MapSizes};
use lb_tests::{
    agent::{AgentPaths, LbAgent, METRICS_LISTEN, VipSpec, render_config},
    netns::{ChildGuard, Topology},
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
        conntrack6_entries: 1024,
        nat_entries: 1024,
        acl_entries: 1024,
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

/// Backends in the mass-failure test: `LB_TEST_MANY_BACKENDS`, else 1000.
fn many_backends() -> usize {
    std::env::var("LB_TEST_MANY_BACKENDS")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(1000)
}

/// The `i`-th extra address behind backend namespace `side` (0 or 1):
/// 198.18.252.0/23 and 198.18.254.0/23, local addresses of that namespace,
/// routed in the lb namespace through its veth address.
fn extra_addr(side: usize, i: usize) -> Ipv4Addr {
    let base = u32::from(Ipv4Addr::new(198, 18, 252 + 2 * side as u8, 1));
    Ipv4Addr::from(base + i as u32)
}

/// `lb backend drain`, timed.
fn timed_drain(agent: &LbAgent, addr: Ipv4Addr) -> Result<Duration> {
    let t = Instant::now();
    agent.cli_ok(&["backend", "drain", "web", &addr.to_string()])?;
    Ok(t.elapsed())
}

fn down_count(agent: &LbAgent, side: &[String]) -> Result<usize> {
    let list = agent.json(&["backend", "list"])?;
    Ok(list
        .as_array()
        .into_iter()
        .flatten()
        .filter(|b| {
            side.iter().any(|a| b["address"] == a.as_str())
                && b["health"] == "down"
                && b["slots"].as_u64() == Some(0)
        })
        .count())
}

/// Seconds since midnight UTC of an agent log line
/// (`[2026-12-02T18:20:36.421Z ...`).
fn log_time_of_day(line: &str) -> Option<f64> {
    let t = line.get(line.find('T')? + 1..)?;
    let t = t.get(..t.find('Z')?)?;
    let mut f = t.split(':');
    let (h, m, s) = (f.next()?, f.next()?, f.next()?);
    Some(h.parse::<f64>().ok()? * 3600.0 + m.parse::<f64>().ok()? * 60.0 + s.parse::<f64>().ok()?)
}

#[test]
fn half_of_a_thousand_backends_failing_at_once_is_applied_in_few_reconciles() -> Result<()> {
    require_root();
    let n = many_backends();
    ensure!(
        (4..=1000).contains(&n),
        "LB_TEST_MANY_BACKENDS must be in 4..=1000"
    );
    let half = n / 2;
    let topo = Topology::with_backends(2)?;
    ensure!(
        topo.index() < 252,
        "topology index {} collides with the extra range",
        topo.index()
    );
    let mut servers: Vec<Option<ChildGuard>> = spawn_on_backends(&topo, ServerKind::Http, PORT)?
        .into_iter()
        .map(Some)
        .collect();
    // Backend namespace `side` holds `half` local addresses; the lb
    // namespace reaches them through it (no neighbour entry each: lb gets
    // their MAC from the config, the kernel's checks go through the
    // namespace's veth address as a gateway).
    let mut sides: Vec<Vec<String>> = Vec::new();
    for side in 0..2 {
        let addrs: Vec<Ipv4Addr> = (0..half).map(|i| extra_addr(side, i)).collect();
        let batch: String = addrs
            .iter()
            .map(|a| format!("addr add {a}/32 dev lo\n"))
            .collect();
        let file = std::env::temp_dir().join(format!("lb-budget-{}-{side}.ip", std::process::id()));
        std::fs::write(&file, batch)?;
        let r = topo
            .backend_ns(side)
            .ip(["-batch", &file.to_string_lossy()]);
        let _ = std::fs::remove_file(&file);
        r?;
        let net = format!("{}/23", extra_addr(side, 0));
        let net = net.replace(".1/23", ".0/23");
        topo.lb_ns().ip([
            "route",
            "add",
            &net,
            "via",
            &topo.backend_addr(side).to_string(),
        ])?;
        sides.push(addrs.iter().map(|a| a.to_string()).collect());
    }
    let paths = AgentPaths::new()?;
    let mut text = String::new();
    let _ = writeln!(
        text,
        "[agent]\ninstance = \"{}\"\ninterfaces = [\"{}\"]\ncontrol_socket = \"{}\"\n\
         max_vips = 2\nmax_backends = {}\nconntrack_entries = 4096\n\n\
         [[vip]]\nname = \"web\"\naddress = \"{}\"\nport = {PORT}\nprotocol = \"tcp\"\n\
         [vip.health_check]\nkind = \"tcp\"\ninterval_ms = 50\ntimeout_ms = 50\nrise = 2\nfall = 3\n",
        paths.instance,
        topo.lb_iface(),
        paths.socket.display(),
        n + 8,
        topo.vip()
    );
    for (side, addrs) in sides.iter().enumerate() {
        let mac = lb::mac::MacAddr(topo.backend_mac(side));
        for a in addrs {
            let _ = writeln!(
                text,
                "[[vip.backend]]\naddress = \"{a}\"\nmac = \"{mac}\"\n"
            );
        }
    }
    let t = Instant::now();
    let agent = LbAgent::start_with(topo.lb_ns(), paths, &text, &[])?;
    let start_up = t.elapsed();
    // Stable: every backend up, and still so a moment later.
    let all: Vec<String> = sides.concat();
    let deadline = Instant::now() + Duration::from_secs(30);
    loop {
        let list = agent.json(&["backend", "list"])?;
        let up = list
            .as_array()
            .into_iter()
            .flatten()
            .filter(|b| b["health"] == "up")
            .count();
        if up == all.len() {
            break;
        }
        ensure!(
            Instant::now() < deadline,
            "{up} of {} backends up after 30 s:\n{}",
            all.len(),
            agent.log_text()
        );
        thread::sleep(Duration::from_millis(200));
    }
    ensure!(
        !agent.log_text().contains("DOWN"),
        "a backend went down before the test:\n{}",
        agent.log_text()
    );
    let drain_idle = timed_drain(&agent, extra_addr(0, 0))?;
    let log_before = agent.log_text().len();

    // Side 1's server dies: `half` backends fail their checks together.
    let t0 = Instant::now();
    let killed_at = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)?
        .as_secs_f64()
        % 86_400.0;
    servers[1].take().context("server 1")?.kill()?;
    thread::sleep(Duration::from_millis(100));
    let drain_busy = timed_drain(&agent, extra_addr(0, 1))?;
    let failover = loop {
        let down = down_count(&agent, &sides[1])?;
        if down == half {
            break t0.elapsed();
        }
        ensure!(
            t0.elapsed() < Duration::from_secs(60),
            "{down} of {half} backends out of the ring 60 s after their server died"
        );
        thread::sleep(Duration::from_millis(50));
    };
    let log = agent.log_text();
    let after = &log[log_before.min(log.len())..];
    let reconciles = after.lines().filter(|l| l.contains("reconciled:")).count();
    let downs = after.lines().filter(|l| l.contains("DOWN after")).count();
    eprintln!(
        "{n} backends, TCP checks every 50 ms (fall 3): start-up (to the first answer of lb \
         status) {start_up:?}; lb backend drain {drain_idle:?} idle, {drain_busy:?} while \
         {half} backends fail; all {half} out of the ring {failover:?} after their server \
         died, in {reconciles} reconciles ({downs} DOWN transitions logged)"
    );
    // The agent's own view: from the kill to the end of the last
    // reconcile (log timestamps, UTC, millisecond resolution).
    let applied = after
        .lines()
        .filter(|l| l.contains("reconciled:"))
        .filter_map(log_time_of_day)
        .next_back()
        .map(|t| Duration::from_secs_f64((t - killed_at).rem_euclid(86_400.0)));
    eprintln!("  in the agent's log: last reconcile {applied:?} after the kill");
    ensure!(
        downs >= half,
        "{downs} DOWN lines for {half} failed backends"
    );
    ensure!(
        reconciles <= half / 5 + 2,
        "{reconciles} reconciles for {half} transitions: not coalesced"
    );
    ensure!(
        failover < Duration::from_secs(15),
        "failover of {half} backends took {failover:?}"
    );
    ensure!(
        drain_busy < Duration::from_secs(2),
        "lb backend drain took {drain_busy:?} during the failure"
    );
    // Side 0 kept every backend (but the two drained ones, up and out of
    // the ring).
    let list = agent.json(&["backend", "list"])?;
    let side0_up = list
        .as_array()
        .into_iter()
        .flatten()
        .filter(|b| sides[0].iter().any(|a| b["address"] == a.as_str()) && b["health"] == "up")
        .count();
    ensure!(side0_up == half, "{side0_up} of {half} healthy backends up");
    drop(servers);
    Ok(())
}
