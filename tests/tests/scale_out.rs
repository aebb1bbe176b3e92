//! Scale-out without the routing daemons: two lb hosts on one segment
//! serve the same VIP over the same backends, listed in other orders and
//! next to another VIP on one host only (so their local backend ids
//! differ); the client's route to the VIP picks the lb host, as an ECMP
//! router's hash would. Every flow must reach the same backend whichever
//! host it crosses, and a connection that moves from one host to the
//! other mid-stream keeps its backend (the second host has no record of
//! it: its ring decides, and it is the same ring). Needs root. Each test
//! builds its own namespaces and removes them, also when it fails.

use std::{
    collections::{BTreeMap, BTreeSet},
    net::{IpAddr, Ipv4Addr, SocketAddr, SocketAddrV4},
    time::Duration,
};

use anyhow::{Context as _, Result, ensure};
use lb_tests::{
    agent::{AgentPaths, LbAgent, VipSpec, render_config},
    netns::{ChildGuard, ExtraLb, Topology},
    require_root,
    servers::{ServerKind, ask, get_from_ports, spawn_on_backends, tcp_connect},
};

const PORT: u16 = 80;
const BACKENDS: usize = 4;

/// Field order is drop order: agents and servers, then the second lb
/// host, then the topology.
struct TwoHosts {
    lb1: LbAgent,
    lb2: LbAgent,
    _servers: Vec<ChildGuard>,
    host2: ExtraLb,
    topo: Topology,
}

fn setup() -> Result<TwoHosts> {
    require_root();
    let topo = Topology::with_backends(BACKENDS)?;
    let servers = spawn_on_backends(&topo, ServerKind::Http, PORT)?;
    let host2 = topo.add_lb(1)?;
    let addrs: Vec<IpAddr> = (0..BACKENDS).map(|i| topo.backend_addr(i).into()).collect();
    let web1 = VipSpec::tcp("web", topo.vip(), PORT, &addrs);
    let mut reversed = addrs.clone();
    reversed.reverse();
    let web2 = VipSpec::tcp("web", topo.vip(), PORT, &reversed);
    // Host 2 also serves another VIP, listed first, over two of the
    // backends: they get the first ids there.
    let o = topo.vip().octets();
    let other = VipSpec::tcp(
        "other",
        Ipv4Addr::new(o[0], o[1], o[2], 2),
        PORT,
        &[addrs[3], addrs[2]],
    );
    let p1 = AgentPaths::new()?;
    let text1 = render_config(&p1.instance, &p1.socket, &topo.lb_iface(), &[web1]);
    let lb1 = LbAgent::start_with(topo.lb_ns(), p1, &text1, &[])?;
    let p2 = AgentPaths::new()?;
    let text2 = render_config(&p2.instance, &p2.socket, host2.iface(), &[other, web2]);
    let lb2 = LbAgent::start_with(host2.ns(), p2, &text2, &[])?;
    for agent in [&lb1, &lb2] {
        for &a in &addrs {
            agent.wait_health(Some("web"), a, "up", Duration::from_secs(15))?;
        }
    }
    let ids = |agent: &LbAgent| -> Result<BTreeMap<String, u64>> {
        let list = agent.json(&["backend", "list", "--vip", "web"])?;
        list.as_array()
            .into_iter()
            .flatten()
            .map(|b| {
                Ok((
                    b["address"].as_str().context("address")?.to_string(),
                    b["id"].as_u64().context("id")?,
                ))
            })
            .collect()
    };
    let (ids1, ids2) = (ids(&lb1)?, ids(&lb2)?);
    ensure!(
        ids1.len() == BACKENDS && ids1 != ids2,
        "the hosts should number the backends differently: {ids1:?} and {ids2:?}"
    );
    Ok(TwoHosts {
        lb1,
        lb2,
        _servers: servers,
        host2,
        topo,
    })
}

impl TwoHosts {
    fn vip(&self) -> SocketAddr {
        SocketAddrV4::new(self.topo.vip(), PORT).into()
    }

    /// Sends the client's VIP traffic through host 1 or host 2.
    fn via(&self, host: u8) -> Result<()> {
        let via = if host == 1 {
            self.topo.lb_addr()
        } else {
            self.host2.addr()
        };
        self.topo.client_route_vip_via(via)
    }

    /// The VIP "web"'s new flows and conntrack hits on `agent`.
    fn counts(agent: &LbAgent) -> Result<(u64, u64)> {
        let stats = agent.json(&["stats"])?;
        let web = stats["vips"]
            .as_array()
            .into_iter()
            .flatten()
            .find(|v| v["vip"].as_str().is_some_and(|n| n.contains("web")))
            .with_context(|| format!("no VIP web in {stats}"))?;
        Ok((
            web["new_flows"].as_u64().context("new_flows")?,
            web["conntrack_hits"].as_u64().context("conntrack_hits")?,
        ))
    }
}

#[test]
fn every_flow_reaches_the_same_backend_through_either_lb_host() -> Result<()> {
    let s = setup()?;
    let ports = 30_000..30_200;
    s.via(1)?;
    let before1 = TwoHosts::counts(&s.lb1)?;
    let through1 = get_from_ports(s.topo.client_ns(), s.vip(), ports.clone())?;
    s.via(2)?;
    let before2 = TwoHosts::counts(&s.lb2)?;
    let through2 = get_from_ports(s.topo.client_ns(), s.vip(), ports.clone())?;
    // Each host carried its half: its own VIP counters moved.
    let n = ports.len() as u64;
    let new1 = TwoHosts::counts(&s.lb1)?.0 - before1.0;
    let new2 = TwoHosts::counts(&s.lb2)?.0 - before2.0;
    ensure!(
        new1 >= n && new2 >= n,
        "host 1 counted {new1} new flows, host 2 {new2}; want at least {n} each"
    );
    let used: BTreeSet<&String> = through1.iter().map(|(_, b)| b).collect();
    ensure!(
        used.len() == BACKENDS,
        "{n} flows reached only {used:?} through host 1"
    );
    let differ: Vec<_> = through1
        .iter()
        .zip(&through2)
        .filter(|(a, b)| a != b)
        .collect();
    ensure!(
        differ.is_empty(),
        "{} of {n} flows reached another backend through host 2: {:?}",
        differ.len(),
        &differ[..differ.len().min(5)]
    );
    Ok(())
}

#[test]
fn connections_moved_to_the_other_lb_host_keep_their_backend() -> Result<()> {
    let s = setup()?;
    s.via(1)?;
    let vip = s.vip();
    let mut conns = s.topo.client_ns().run(move || {
        (31_000..31_020)
            .map(|p| tcp_connect(Some(p), vip, Duration::from_secs(3)))
            .collect::<Result<Vec<_>>>()
    })??;
    let first: Vec<String> = conns.iter_mut().map(ask).collect::<Result<_>>()?;
    let used: BTreeSet<&String> = first.iter().collect();
    ensure!(used.len() >= 2, "20 connections reached only {used:?}");
    // The route moves (host 1 left the ECMP group): host 2 has no record
    // of these connections.
    let (new_before, _) = TwoHosts::counts(&s.lb2)?;
    s.via(2)?;
    for (i, (c, was)) in conns.iter_mut().zip(&first).enumerate() {
        let now = ask(c).with_context(|| format!("connection {i} after the move"))?;
        ensure!(&now == was, "connection {i} moved from {was} to {now}");
    }
    let (new_after, _) = TwoHosts::counts(&s.lb2)?;
    ensure!(
        new_after - new_before >= conns.len() as u64,
        "host 2 recorded {} flows, want the {} moved connections",
        new_after - new_before,
        conns.len()
    );
    // And they go on through host 2 (now recorded there).
    for (c, was) in conns.iter_mut().zip(&first) {
        ensure!(&ask(c)? == was);
    }
    Ok(())
}
