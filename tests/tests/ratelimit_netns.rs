//! Rate limits with the real agent in network namespaces: a spoofed
//! source opening ~1000 connections/s against `new_per_source = 100`
//! gets ~100/s through while a real client's connections all succeed;
//! `lb stats` names the limited source; a reload lifts the limit. Needs
//! root.

use std::{
    net::{Ipv4Addr, SocketAddr, SocketAddrV4},
    sync::atomic::AtomicBool,
    thread,
    time::{Duration, Instant},
};

use anyhow::{Context as _, Result, ensure};
use lb_tests::{
    agent::{AgentPaths, LbAgent, VipSpec, render_config},
    flood::flood,
    netns::Topology,
    packet::{Ipv4Packet, TCP_SYN},
    require_root,
    servers::{EchoStream, ServerKind, spawn_on_backends},
};

const T: Duration = Duration::from_secs(3);
const PORT: u16 = 7000;
const RATE: u64 = 100;
const BURST: u64 = 10;

fn config(instance: &str, socket: &std::path::Path, topo: &Topology, limit: bool) -> String {
    let backends: Vec<Ipv4Addr> = (0..2).map(|i| topo.backend_addr(i)).collect();
    let mut vip = VipSpec::tcp("web", topo.vip(), PORT, &backends);
    if limit {
        // The table follows the health check's (render_config writes the
        // health check body last before the backends).
        vip.health_check.push_str(&format!(
            "\n[vip.rate_limit]\nnew_per_source = {RATE}\nnew_per_source_burst = {BURST}\n"
        ));
    }
    render_config(instance, socket, &topo.lb_iface(), &[vip])
}

#[test]
fn a_source_over_its_new_connection_limit_gets_the_limit_and_others_are_unaffected() -> Result<()> {
    require_root();
    let topo = Topology::with_backends(2)?;
    let _servers = spawn_on_backends(&topo, ServerKind::Stream, PORT)?;
    let paths = AgentPaths::new()?;
    let text = config(&paths.instance, &paths.socket, &topo, true);
    ensure!(text.contains("new_per_source"), "{text}");
    let agent = LbAgent::start_with(topo.lb_ns(), paths, &text, &[])?;

    // The limited source: spoofed SYNs from 198.19.k.130 (the topology
    // does not use the upper half of the VIP's /24; the backends
    // blackhole their SYN-ACKs).
    let [a, b, k, _] = topo.vip().octets();
    let spoofed = Ipv4Addr::new(a, b, k, 130);
    for i in 0..2 {
        topo.backend_ns(i)
            .ip(["route", "add", "blackhole", &format!("{spoofed}/32")])?;
    }
    let (lb_mac, client_mac, vip) = (topo.lb_mac(), topo.client_mac(), topo.vip());
    let frame = move |i: u64| {
        let mut p = Ipv4Packet::tcp(spoofed, 1024 + (i % 60_000) as u16, vip, PORT);
        p.tcp_flags = TCP_SYN;
        p.dst_mac = lb_mac;
        p.src_mac = client_mac;
        p.build()
    };
    let vip_sa = SocketAddr::from(SocketAddrV4::new(topo.vip(), PORT));
    let stop = AtomicBool::new(false);
    let (iface, client_ns) = (topo.client_iface(), topo.client_ns());
    let started = Instant::now();
    let (sent, client) = thread::scope(|s| {
        let flooder = s.spawn(|| {
            flood(
                client_ns,
                &iface,
                1000,
                Duration::from_secs(3),
                &stop,
                frame,
            )
        });
        // The real client, meanwhile: ~20 connections/s, each must work.
        let client = (|| -> Result<u32> {
            let mut n = 0u32;
            while started.elapsed() < Duration::from_millis(2800) && n < 100 {
                let mut c = EchoStream::connect(client_ns, 42_000 + n as u16, vip_sa, T)
                    .with_context(|| format!("client connection {n}"))?;
                c.roundtrip(256)
                    .with_context(|| format!("client connection {n}"))?;
                n += 1;
                thread::sleep(Duration::from_millis(50));
            }
            Ok(n)
        })();
        let sent = flooder
            .join()
            .map_err(|_| anyhow::anyhow!("the flood thread panicked"));
        (sent, client)
    });
    let secs = started.elapsed().as_secs_f64();
    let sent = sent??;
    let client = client?;
    ensure!(sent >= 2000, "the flood sent only {sent} SYNs");

    let stats = agent.json(&["stats"])?;
    let limited = stats["limited_sources"]
        .as_array()
        .context("no limited_sources in lb stats")?;
    let row = limited
        .iter()
        .find(|l| l["source"] == spoofed.to_string())
        .with_context(|| format!("{spoofed} is not listed: {stats}"))?;
    ensure!(row["vip"] == "web" && row["limit"] == "new", "{row}");
    let (passed, dropped) = (
        row["passed"].as_u64().unwrap_or(0),
        row["dropped"].as_u64().unwrap_or(0),
    );
    ensure!(
        passed + dropped == sent,
        "{passed} + {dropped} != {sent} SYNs sent"
    );
    let rate = passed.saturating_sub(BURST) as f64 / secs;
    eprintln!(
        "limited source: {sent} SYNs, {passed} admitted ({rate:.1}/s), {dropped} refused; \
         client: {client} connections"
    );
    ensure!(
        (0.85 * RATE as f64..=1.15 * RATE as f64).contains(&rate),
        "{rate:.1}/s admitted, want {RATE} ± 15 %"
    );
    ensure!(
        !limited
            .iter()
            .any(|l| l["source"] == topo.client_addr().to_string()),
        "the real client was limited: {stats}"
    );
    let vip_row = stats["vips"]
        .as_array()
        .and_then(|v| v.iter().find(|v| v["vip"] == "web"))
        .context("no VIP row")?;
    ensure!(vip_row["rate_limited"] == dropped, "{vip_row}");
    ensure!(agent.reason("drop_rate_limited")? == dropped);

    // A reload without the limit lifts it at once.
    std::fs::write(
        &agent.config,
        config(&agent.instance, &agent.socket, &topo, false),
    )?;
    agent.cli_ok(&["reload"])?;
    let stop = AtomicBool::new(false);
    let again = flood(
        client_ns,
        &topo.client_iface(),
        500,
        Duration::from_secs(1),
        &stop,
        |i| frame(i + 100_000),
    )?;
    ensure!(again > 0);
    ensure!(
        agent.reason("drop_rate_limited")? == dropped,
        "SYNs were refused after the limit was lifted"
    );
    Ok(())
}
