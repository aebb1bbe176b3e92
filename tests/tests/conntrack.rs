//! Conntrack freshness and expiry with the real agent in network
//! namespaces: a long-lived connection survives churn of ten times the
//! table's size and a ring change; a drained UDP backend's flows idle out
//! and `lb backend list` shows it. Needs root.

use std::{
    io::{Read, Write},
    net::{Ipv4Addr, SocketAddrV4, TcpStream, UdpSocket},
    thread,
    time::{Duration, Instant},
};

use anyhow::{Context as _, Result, bail, ensure};
use lb_common::{FlowKey, IPPROTO_TCP, IPPROTO_UDP, flow_cache_mix, flow_cache_slot};
use lb_tests::{
    agent::{AgentPaths, LbAgent, VipSpec, render_config},
    netns::Topology,
    require_root,
    servers::{ServerKind, echo_reply_backend, spawn_on_backends, tcp_connect, udp_request_from},
};

const T: Duration = Duration::from_secs(3);
const STREAM_PORT: u16 = 7000;
const UDP_PORT: u16 = 5353;

fn backends(topo: &Topology) -> Vec<Ipv4Addr> {
    (0..topo.backend_count())
        .map(|i| topo.backend_addr(i))
        .collect()
}

/// Starts an agent for `vips` with `extra` lines appended to `[agent]`
/// (the rendered table ends with `conntrack_entries`).
fn agent_with(topo: &Topology, vips: &[VipSpec], agent_lines: &str) -> Result<LbAgent> {
    let paths = AgentPaths::new()?;
    let text = render_config(&paths.instance, &paths.socket, &topo.lb_iface(), vips);
    let text = text.replacen(
        "conntrack_entries = 65536\n",
        &format!("conntrack_entries = 65536\n{agent_lines}"),
        1,
    );
    ensure!(text.contains(agent_lines), "config not patched:\n{text}");
    LbAgent::start_with(topo.lb_ns(), paths, &text, &[])
}

/// Echo round trip on a stream connection, every byte checked.
fn roundtrip(conn: &mut TcpStream, sent: &mut u64, n: usize) -> Result<()> {
    let chunk: Vec<u8> = (0..n).map(|i| ((*sent as usize + i) % 251) as u8).collect();
    conn.write_all(&chunk)
        .context("write on the long-lived connection")?;
    let mut back = vec![0u8; n];
    conn.read_exact(&mut back)
        .context("read on the long-lived connection (reset or lost bytes?)")?;
    ensure!(back == chunk, "echoed bytes differ at offset {sent}");
    *sent += n as u64;
    Ok(())
}

fn backend_row(agent: &LbAgent, vip: &str, addr: Ipv4Addr) -> Result<serde_json::Value> {
    let list = agent.json(&["backend", "list", "--vip", vip])?;
    list.as_array()
        .into_iter()
        .flatten()
        .find(|b| b["address"] == addr.to_string())
        .cloned()
        .with_context(|| format!("{addr} not in `lb backend list`: {list}"))
}

/// Pins the calling thread (and the threads it starts) to the CPU it runs
/// on.
fn pin_to_this_cpu() -> Result<()> {
    // SAFETY: plain libc calls on a zeroed cpu_set_t of the right size.
    unsafe {
        let cpu = libc::sched_getcpu();
        ensure!(cpu >= 0, "sched_getcpu failed");
        let mut set: libc::cpu_set_t = std::mem::zeroed();
        libc::CPU_SET(cpu as usize, &mut set);
        let rc = libc::sched_setaffinity(0, std::mem::size_of::<libc::cpu_set_t>(), &set);
        ensure!(
            rc == 0,
            "sched_setaffinity: {}",
            std::io::Error::last_os_error()
        );
    }
    Ok(())
}

#[test]
fn a_long_lived_connection_keeps_its_backend_through_churn_and_a_ring_change() -> Result<()> {
    require_root();
    // The connection's record and the churn's records are made on one CPU:
    // the kernel's LRU keeps each CPU's newest records in a list of that
    // CPU's own, where records made on another CPU than the churn's could
    // outlive any churn by accident and prove nothing.
    pin_to_this_cpu()?;
    const ENTRIES: usize = 1024;
    let topo = Topology::with_backends(3)?;
    let _servers = spawn_on_backends(&topo, ServerKind::Stream, STREAM_PORT)?;
    let stream_vip = VipSpec::tcp("stream", topo.vip(), STREAM_PORT, &backends(&topo));
    let mut churn_vip = VipSpec::tcp("churn", topo.vip(), UDP_PORT, &backends(&topo));
    churn_vip.protocol = "udp";
    churn_vip.health_check = "kind = \"none\"".into();
    let paths = AgentPaths::new()?;
    let text = render_config(
        &paths.instance,
        &paths.socket,
        &topo.lb_iface(),
        &[stream_vip, churn_vip],
    )
    .replacen(
        "conntrack_entries = 65536",
        &format!("conntrack_entries = {ENTRIES}"),
        1,
    );
    let agent = LbAgent::start_with(topo.lb_ns(), paths, &text, &[])?;

    let vip = topo.vip();
    let client = topo.client_addr();
    let vip_sa = SocketAddrV4::new(vip, STREAM_PORT);
    let mut conn = topo
        .client_ns()
        .run(move || tcp_connect(Some(40_000), vip_sa, T))??;
    conn.set_read_timeout(Some(T))?;
    let mut sent = 0;
    roundtrip(&mut conn, &mut sent, 4096)?;
    let src = format!("{client}:40000");
    let e = agent.json(&["explain", &src, &vip_sa.to_string(), "tcp"])?;
    let serving: Ipv4Addr = e["conntrack_backend"]
        .as_str()
        .with_context(|| format!("not tracked: {e}"))?
        .parse()?;
    let long_key = FlowKey::new(
        client.to_bits(),
        40_000,
        vip.to_bits(),
        STREAM_PORT,
        IPPROTO_TCP,
    );
    let slot_of = |port: u16| {
        flow_cache_slot(flow_cache_mix(&FlowKey::new(
            client.to_bits(),
            port,
            vip.to_bits(),
            UDP_PORT,
            IPPROTO_UDP,
        )))
    };
    let long_slot = flow_cache_slot(flow_cache_mix(&long_key));

    // Churn: 10 x the table's size of new UDP flows from other source
    // ports, none in the long-lived flow's cache slot (so only the
    // refresh by design keeps its record), while it keeps talking.
    let churn_ports: Vec<u16> = (10_000..60_000u16)
        .filter(|&p| p != 40_000 && slot_of(p) != long_slot)
        .take(10 * ENTRIES + 512)
        .collect();
    let udp_sa = SocketAddrV4::new(vip, UDP_PORT);
    let started = Instant::now();
    for (i, batch) in churn_ports.chunks(64).enumerate() {
        let batch = batch.to_vec();
        topo.client_ns().run(move || -> Result<()> {
            for p in batch {
                let s = UdpSocket::bind(SocketAddrV4::new(Ipv4Addr::UNSPECIFIED, p))
                    .with_context(|| format!("bind UDP port {p}"))?;
                s.send_to(b"churn", udp_sa)?;
            }
            Ok(())
        })??;
        roundtrip(&mut conn, &mut sent, 1024)
            .with_context(|| format!("during the churn, batch {i}"))?;
        thread::sleep(Duration::from_millis(25));
        ensure!(
            started.elapsed() < Duration::from_secs(60),
            "churn too slow"
        );
    }
    let stats = agent.json(&["stats"])?;
    let churned = stats["vips"]
        .as_array()
        .into_iter()
        .flatten()
        .find(|v| v["vip"] == "churn")
        .and_then(|v| v["new_flows"].as_u64())
        .unwrap_or(0);
    ensure!(
        churned >= (10 * ENTRIES) as u64,
        "only {churned} new flows reached lb: {stats}"
    );
    let e = agent.json(&["explain", &src, &vip_sa.to_string(), "tcp"])?;
    ensure!(
        e["conntrack_backend"] == serving.to_string(),
        "the long-lived flow's record is gone after the churn: {e}"
    );

    // Another flow takes its cache slot; then its backend is drained, so
    // the ring would send it elsewhere.
    let thief = (10_000..60_000u16)
        .find(|&p| slot_of(p) == long_slot)
        .context("no port in the long-lived flow's cache slot")?;
    topo.client_ns().run(move || -> Result<()> {
        UdpSocket::bind(SocketAddrV4::new(Ipv4Addr::UNSPECIFIED, thief))?
            .send_to(b"thief", udp_sa)?;
        Ok(())
    })??;
    agent.cli_ok(&["backend", "drain", "stream", &serving.to_string()])?;
    let e = agent.json(&["explain", &src, &vip_sa.to_string(), "tcp"])?;
    ensure!(
        e["ring_backend"] != serving.to_string(),
        "the ring still gives the flow to {serving}: {e}"
    );
    for _ in 0..4 {
        roundtrip(&mut conn, &mut sent, 64 * 1024).context("after the ring change")?;
        thread::sleep(Duration::from_millis(150));
    }
    let e = agent.json(&["explain", &src, &vip_sa.to_string(), "tcp"])?;
    ensure!(e["backend"] == serving.to_string(), "{e}");
    ensure!(
        sent == 4096 + 1024 * churn_ports.len().div_ceil(64) as u64 + 4 * 64 * 1024,
        "bytes echoed: {sent}"
    );
    Ok(())
}

#[test]
fn a_drained_udp_backend_loses_its_flows_when_they_idle_out() -> Result<()> {
    require_root();
    let topo = Topology::with_backends(3)?;
    let _servers = spawn_on_backends(&topo, ServerKind::UdpEcho, UDP_PORT)?;
    let mut vip = VipSpec::tcp("dns", topo.vip(), UDP_PORT, &backends(&topo));
    vip.protocol = "udp";
    vip.health_check = "kind = \"none\"".into();
    let agent = agent_with(&topo, &[vip], "conntrack_udp_idle_ms = 1500\n")?;
    let sa = SocketAddrV4::new(topo.vip(), UDP_PORT);
    let ask = |q: &'static str| -> Result<String> {
        let r = topo
            .client_ns()
            .run(move || udp_request_from(Some(45_000), sa, q.as_bytes(), T))??;
        Ok(echo_reply_backend(&r))
    };
    let first = ask("q0")?;
    ensure!(first.starts_with("backend-"), "{first}");
    let i: usize = first["backend-".len()..].parse()?;
    let serving = topo.backend_addr(i);

    // `lb backend list` counts the flow for its backend (the flow keeps
    // talking meanwhile: idle, it would end).
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        ensure!(ask("q")? == first, "one flow, two backends");
        let row = backend_row(&agent, "dns", serving)?;
        if row["flows"].as_u64() == Some(1) {
            break;
        }
        if Instant::now() > deadline {
            bail!(
                "the flow is not counted: {row}\nagent log:\n{}",
                agent.log_text()
            );
        }
        thread::sleep(Duration::from_millis(200));
    }
    // Drained: its flow stays while it talks...
    agent.cli_ok(&["backend", "drain", "dns", &serving.to_string()])?;
    for q in ["q1", "q2", "q3"] {
        ensure!(ask(q)? == first, "the drained backend's flow moved early");
        thread::sleep(Duration::from_millis(300));
    }
    // ...and ends once idle longer than the timeout: the list shows 0.
    let idle_from = Instant::now();
    let deadline = idle_from + Duration::from_secs(15);
    loop {
        let row = backend_row(&agent, "dns", serving)?;
        if row["flows"].as_u64() == Some(0) {
            break;
        }
        if Instant::now() > deadline {
            bail!("the drained backend still has flows: {row}");
        }
        thread::sleep(Duration::from_millis(200));
    }
    ensure!(
        idle_from.elapsed() >= Duration::from_millis(1400),
        "counted as ended before the idle timeout"
    );
    // The same source port now starts a new flow on another backend.
    let after = ask("q4")?;
    ensure!(
        after != first && after.starts_with("backend-"),
        "{after} answered after the drain ended"
    );
    Ok(())
}
