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
//! client's full-size segments too big for lb's 1500-byte egress). The
//! same over IPv6 (6in6 and GUE over IPv6, on the dual-stack topology):
//! the router's and lb's errors are ICMPv6 "packet too big". Each backend
//! serves one connection, so each must learn its path MTU through lb.
//! Needs root.

use std::{
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
    servers::{EchoStream, ServerKind, backend_name, spawn_server, tcp_connect},
};

const STREAM: u16 = 7000;
/// Each way: many full-size segments.
const BYTES: usize = 1 << 20;

/// One mode over one family (`v6`: client, VIP and backends IPv6).
fn one_mode(mode: &'static str, v6: bool) -> Result<()> {
    let topo = if v6 {
        RoutedTopology::new_dual_stack(2)?
    } else {
        RoutedTopology::new(2)?
    };
    // Field order is drop order below: agent, servers and decap first.
    let mut servers: Vec<ChildGuard> = Vec::new();
    let any: IpAddr = if v6 {
        Ipv6Addr::UNSPECIFIED.into()
    } else {
        Ipv4Addr::UNSPECIFIED.into()
    };
    for i in 0..topo.backend_count() {
        servers.push(spawn_server(
            topo.backend_ns(i),
            ServerKind::Stream,
            SocketAddr::new(any, STREAM),
            &backend_name(i),
        )?);
    }
    let decap = DecapAttachment::attach_all(&topo, v6)?;
    let backends = topo.backend_addrs_of(v6);
    let mut vip = VipSpec::tcp("stream", topo.vip_of(v6), STREAM, &backends);
    vip.forwarding = mode;
    let paths = AgentPaths::new()?;
    let text = render_config(&paths.instance, &paths.socket, &topo.lb_iface(), &[vip]);
    let agent = LbAgent::start_with(topo.lb_ns(), paths, &text, &[])?;

    // The narrow path: the router's route to the client, MTU 1400 (its
    // leg stays at 1500: lb's tunnel packets to the backends cross it);
    // and the router's way to the VIP (through lb).
    let router = topo.router_ns();
    let family = if v6 { "-6" } else { "-4" };
    let host = if v6 { 128 } else { 32 };
    let client = format!("{}/{host}", topo.client_of(v6));
    let leg = topo.router_front_iface();
    router.ip([
        family, "route", "add", &client, "dev", &leg, "mtu", "lock", "1400",
    ])?;
    let vip_route = format!("{}/{host}", topo.vip_of(v6));
    let lb = topo.lb_of(v6).to_string();
    router.ip([family, "route", "add", &vip_route, "via", &lb])?;

    let answered = agent.reason("tx_icmp_too_big")?;
    let addr = SocketAddr::new(topo.vip_of(v6), STREAM);
    for (i, backend) in backends.iter().enumerate() {
        // A client port whose flow lb sends to this backend.
        let port = (41_000..41_200)
            .find(|&p| {
                let from = SocketAddr::new(topo.client_of(v6), p).to_string();
                agent
                    .json(&["explain", &from, &addr.to_string(), "tcp"])
                    .is_ok_and(|e| e["backend"] == backend.to_string())
            })
            .with_context(|| format!("{mode}: no client port maps to {backend}"))?;
        let steered = agent.reason("fwd_icmp_error")?;
        let conn = topo
            .client_ns()
            .run(move || tcp_connect(Some(port), addr, Duration::from_secs(3)))??;
        conn.set_read_timeout(Some(Duration::from_secs(15)))?;
        conn.set_write_timeout(Some(Duration::from_secs(15)))?;
        let mut stream = EchoStream::new(conn);
        stream.roundtrip(BYTES).with_context(|| {
            format!(
                "{mode}: 1 MiB echoed by backend {i} (fwd_icmp_error {} → {})",
                steered,
                agent.reason("fwd_icmp_error").unwrap_or(0)
            )
        })?;
        ensure!(
            agent.reason("fwd_icmp_error")? > steered,
            "{mode}: the router's errors reached backend {i} through lb"
        );
    }
    ensure!(
        agent.reason("tx_icmp_too_big")? > answered,
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
    one_mode("ipip", false)?;
    one_mode("gue", false)
}

/// 6in6 and GUE over IPv6.
#[test]
fn path_mtu_discovery_works_both_ways_through_lb_over_ipv6() -> Result<()> {
    require_root();
    one_mode("ipip", true)?;
    one_mode("gue", true)
}
