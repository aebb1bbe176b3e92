//! Path MTU discovery through lb, both ways, in network namespaces (the
//! routed topology of `lb_tests::routed`: client and lb on one segment,
//! backends behind a router, reached by ipip or gue and running
//! `lb decap`). The router's route to the client has MTU 1400 and there is
//! no MSS clamping: a backend's full-size reply to the client makes the
//! router send "fragmentation needed" to the reply's source, the VIP, and
//! it reaches lb (the router routes the VIP to lb). lb must steer it to
//! the backend that sent the packet, encapsulated like the flow, or the
//! backend never lowers its path MTU and the download stalls. The upload
//! direction needs lb's own ICMP answer (the outer header makes the
//! client's full-size segments too big for lb's 1500-byte egress). Needs
//! root.

use std::{
    net::{Ipv4Addr, SocketAddrV4},
    time::Duration,
};

use anyhow::{Context as _, Result, ensure};
use lb_tests::{
    agent::{AgentPaths, LbAgent, VipSpec, render_config},
    decap::DecapAttachment,
    netns::ChildGuard,
    require_root,
    routed::RoutedTopology,
    servers::{EchoStream, ServerKind, backend_name, spawn_server, tcp_connect},
};

const STREAM: u16 = 7000;
/// Each way: many full-size segments.
const BYTES: usize = 1 << 20;

fn reason(agent: &LbAgent, name: &str) -> Result<u64> {
    let stats = agent.json(&["stats"])?;
    Ok(stats["reasons"][name][0].as_u64().unwrap_or(0))
}

fn one_mode(mode: &'static str) -> Result<()> {
    let topo = RoutedTopology::new(2)?;
    // Field order is drop order below: agent, servers and decap first.
    let mut servers: Vec<ChildGuard> = Vec::new();
    let mut decap = Vec::new();
    for i in 0..topo.backend_count() {
        servers.push(spawn_server(
            topo.backend_ns(i),
            ServerKind::Stream,
            SocketAddrV4::new(Ipv4Addr::UNSPECIFIED, STREAM),
            &backend_name(i),
        )?);
        decap.push(DecapAttachment::attach(
            topo.backend_ns(i),
            &topo.backend_iface(i),
            topo.lb_addr(),
        )?);
    }
    let mut vip = VipSpec::tcp("stream", topo.vip(), STREAM, &topo.backend_addrs());
    vip.forwarding = mode;
    let paths = AgentPaths::new()?;
    let text = render_config(&paths.instance, &paths.socket, &topo.lb_iface(), &[vip]);
    let agent = LbAgent::start_with(topo.lb_ns(), paths, &text, &[])?;

    // The narrow path: the router's route to the client, MTU 1400 (its
    // leg stays at 1500: lb's tunnel packets to the backends cross it);
    // and the router's way to the VIP (through lb).
    let router = topo.router_ns();
    let client = format!("{}/32", topo.client_addr());
    let leg = topo.router_front_iface();
    router.ip(["route", "add", &client, "dev", &leg, "mtu", "lock", "1400"])?;
    let vip_route = format!("{}/32", topo.vip());
    router.ip([
        "route",
        "add",
        &vip_route,
        "via",
        &topo.lb_addr().to_string(),
    ])?;

    let steered = reason(&agent, "fwd_icmp_error")?;
    let answered = reason(&agent, "tx_icmp_too_big")?;
    let addr = SocketAddrV4::new(topo.vip(), STREAM);
    let conn = topo
        .client_ns()
        .run(move || tcp_connect(None, addr, Duration::from_secs(3)))??;
    conn.set_read_timeout(Some(Duration::from_secs(15)))?;
    conn.set_write_timeout(Some(Duration::from_secs(15)))?;
    EchoStream::new(conn).roundtrip(BYTES).with_context(|| {
        format!(
            "{mode}: 1 MiB echoed (fwd_icmp_error {} → {})",
            steered,
            reason(&agent, "fwd_icmp_error").unwrap_or(0)
        )
    })?;
    ensure!(
        reason(&agent, "fwd_icmp_error")? > steered,
        "{mode}: the router's errors reached the backend through lb"
    );
    ensure!(
        reason(&agent, "tx_icmp_too_big")? > answered,
        "{mode}: lb answered the client's too-big segments"
    );
    drop(agent);
    drop(servers);
    drop(decap);
    Ok(())
}

#[test]
fn path_mtu_discovery_works_both_ways_through_lb() -> Result<()> {
    require_root();
    one_mode("ipip")?;
    one_mode("gue")
}
