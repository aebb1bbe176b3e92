//! The SYN-flood guard with the real agent in network namespaces: a flood
//! of spoofed SYNs at many times the conntrack table's size neither fills
//! the table nor evicts an established connection, new legitimate
//! connections keep succeeding, and a ring change during the flood moves
//! no established flow. Needs root.

use std::{
    net::{Ipv4Addr, SocketAddr, SocketAddrV4},
    sync::atomic::{AtomicBool, Ordering},
    thread,
    time::{Duration, Instant},
};

use anyhow::{Context as _, Result, ensure};
use lb_common::FlowKey;
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
/// conntrack_entries of the agent: the flood sends many times this.
const ENTRIES: u64 = 1024;
const FLOOD_RATE: u64 = 4000;
const FLOOD_SECS: u64 = 10;

#[test]
fn a_spoofed_syn_flood_neither_fills_conntrack_nor_moves_established_flows() -> Result<()> {
    require_root();
    let topo = Topology::with_backends(3)?;
    let _servers = spawn_on_backends(&topo, ServerKind::Stream, PORT)?;
    let backends: Vec<Ipv4Addr> = (0..3).map(|i| topo.backend_addr(i)).collect();
    let vip = VipSpec::tcp("stream", topo.vip(), PORT, &backends);
    let paths = AgentPaths::new()?;
    // The guard in auto mode, with a threshold a flood of FLOOD_RATE
    // SYNs/s crosses on any CPU (two here) and a handful of test
    // connections does not.
    let text = render_config(&paths.instance, &paths.socket, &topo.lb_iface(), &[vip]).replacen(
        "conntrack_entries = 65536",
        &format!("conntrack_entries = {ENTRIES}\nsyn_guard_rate = 500"),
        1,
    );
    ensure!(
        text.contains("syn_guard_rate"),
        "config not patched:\n{text}"
    );
    let agent = LbAgent::start_with(topo.lb_ns(), paths, &text, &[])?;

    // The flood's sources: the upper half of the VIP's /24 (198.19.k.128/25,
    // not used by the topology), random ports. The backends blackhole
    // their SYN-ACKs (no ARP for addresses that do not exist).
    let [a, b, k, _] = topo.vip().octets();
    let flood_net = Ipv4Addr::new(a, b, k, 128);
    for i in 0..3 {
        topo.backend_ns(i)
            .ip(["route", "add", "blackhole", &format!("{flood_net}/25")])?;
    }
    let vip_sa = SocketAddr::from(SocketAddrV4::new(topo.vip(), PORT));
    let mut long = EchoStream::connect(topo.client_ns(), 40_000, vip_sa, T)?;
    long.roundtrip(4096)?;
    let src = SocketAddr::from(SocketAddrV4::new(topo.client_addr(), 40_000));
    let e = agent.explain(src, vip_sa, "tcp")?;
    let serving = e["conntrack_backend"]
        .as_str()
        .with_context(|| format!("the long-lived connection is not tracked: {e}"))?
        .to_string();

    let (lb_mac, client_mac, vip_addr) = (topo.lb_mac(), topo.client_mac(), topo.vip());
    let frame = move |i: u64| {
        // A multiplicative hash spreads sources and ports.
        let h = (i.wrapping_add(1)).wrapping_mul(0x9E37_79B9_7F4A_7C15);
        let src = Ipv4Addr::new(a, b, k, 128 + 1 + (h % 126) as u8);
        let port = 1024 + ((h >> 16) % 60_000) as u16;
        let mut p = Ipv4Packet::tcp(src, port, vip_addr, PORT);
        p.tcp_flags = TCP_SYN;
        p.dst_mac = lb_mac;
        p.src_mac = client_mac;
        p.build()
    };
    let stop = AtomicBool::new(false);
    let iface = topo.client_iface();
    let client_ns = topo.client_ns();
    let (sent, outcome) = thread::scope(|s| {
        let flooder = s.spawn(|| {
            flood(
                client_ns,
                &iface,
                FLOOD_RATE,
                Duration::from_secs(FLOOD_SECS),
                &stop,
                frame,
            )
        });
        let outcome = (|| -> Result<(u32, u32, usize)> {
            let started = Instant::now();
            let (mut tried, mut ok, mut max_flows) = (0u32, 0u32, 0usize);
            let mut drained = false;
            let mut port = 41_000u16;
            // Bounded: the flood's duration, with a cap on iterations.
            while started.elapsed() < Duration::from_secs(FLOOD_SECS - 1) && tried < 400 {
                long.roundtrip(1024).with_context(|| {
                    format!("the long-lived connection, {:?} in", started.elapsed())
                })?;
                tried += 1;
                port += 1;
                let fresh = EchoStream::connect(client_ns, port, vip_sa, T)
                    .and_then(|mut c| c.roundtrip(256));
                ok += u32::from(fresh.is_ok());
                if !drained && started.elapsed() > Duration::from_secs(4) {
                    // A ring change during the flood: the long-lived
                    // connection's backend leaves the ring.
                    agent.cli_ok(&["backend", "drain", "stream", &serving])?;
                    drained = true;
                }
                if tried % 10 == 0 {
                    max_flows = max_flows.max(agent.pinned_flows::<FlowKey>("CONNTRACK")?);
                }
                thread::sleep(Duration::from_millis(50));
            }
            ensure!(drained, "the flood ended before the drain");
            Ok((tried, ok, max_flows))
        })();
        stop.store(true, Ordering::Relaxed);
        let sent = flooder
            .join()
            .map_err(|_| anyhow::anyhow!("the flood thread panicked"));
        (sent, outcome)
    });
    let sent = sent??;
    let (tried, ok, max_flows) = outcome?;
    eprintln!(
        "SYN flood: {sent} SYNs ({}x conntrack_entries); {ok}/{tried} new connections; \
         at most {max_flows} conntrack records",
        sent / ENTRIES
    );
    ensure!(
        sent >= 10 * ENTRIES,
        "the flood sent {sent} SYNs, fewer than 10x the table"
    );
    let unrecorded = agent.reason("fwd_syn_unrecorded")?;
    ensure!(
        unrecorded >= sent * 9 / 10,
        "only {unrecorded} of {sent} SYNs went unrecorded"
    );
    ensure!(
        (max_flows as u64) < ENTRIES / 2,
        "conntrack held {max_flows} records during the flood (size {ENTRIES})"
    );
    ensure!(
        f64::from(ok) >= 0.99 * f64::from(tried),
        "only {ok} of {tried} new connections succeeded during the flood"
    );
    // After the drain the ring sends the flow elsewhere, its record still
    // to the backend that serves it.
    let e = agent.explain(src, vip_sa, "tcp")?;
    ensure!(
        e["ring_backend"] != serving,
        "the drain did not move the ring: {e}"
    );
    ensure!(e["backend"] == serving, "the long-lived flow moved: {e}");
    long.roundtrip(64 * 1024)?;
    // The agent keeps the SYN filter (rebuilt with each count pass, in
    // use from the second): the guarded SYNs of the flood skipped the
    // conntrack lookup of flows without a record.
    ensure!(
        syn_filters_in_use()? >= 1,
        "no loaded SYN_FILTER map has a bank in use"
    );
    Ok(())
}

/// Loaded SYN_FILTER maps (the agent's program's; not pinned) whose
/// control word names a bank.
fn syn_filters_in_use() -> Result<usize> {
    let mut n = 0;
    for info in aya::maps::loaded_maps() {
        let info = info?;
        if info.name_as_str() != Some(lb_common::map_names::SYN_FILTER) {
            continue;
        }
        let data = aya::maps::MapData::from_id(info.id())?;
        let map: aya::maps::Array<_, u64> =
            aya::maps::Array::try_from(aya::maps::Map::Array(data))?;
        if matches!(map.get(&0, 0)?, 1 | 2) {
            n += 1;
        }
    }
    Ok(n)
}
