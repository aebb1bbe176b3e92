//! Full NAT end to end: lb's `forwarding = "nat"` against nftables DNAT +
//! masquerade (the kernel's own full NAT, with nf_conntrack) and HAProxy
//! (a full proxy), on the same topology. The backends are the benchmark's
//! usual ones; in these modes their replies go to the LB's address (the
//! SNAT address), on the same segment, and come back through the LB.
//!
//! Issue targets: lb nat ≥ 1.5× nftables and ≥ 2× HAProxy in TCP
//! connections/s; ≥ 4× less LB CPU per packet than nftables.

use std::{fmt::Write as _, net::Ipv4Addr};

use anyhow::{Result, anyhow};
use lb_tests::{
    agent::{AgentPaths, LbAgent, VipSpec, render_config},
    netns::Topology,
};

use super::{Fwd, GenKind, System, TcpResult, TcpSample, UdpResult, UdpSample};
use crate::report::{Better, Row, Target, TargetOn};

/// nftables table of the masquerade system.
pub(super) const NFT_TABLE: &str = "lbnat";

/// lb nat ≥ this × nftables masquerade in TCP connections/s.
const TCP_VS_NFT: f64 = 1.5;
/// lb nat ≥ this × HAProxy (its better thread count) in connections/s.
const TCP_VS_HAPROXY: f64 = 2.0;
/// nftables masquerade's LB CPU per packet ≥ this × lb nat's.
const CPU_VS_NFT: f64 = 4.0;

pub(super) const LB_HOW: &str = "as lb, with the VIPs' forwarding = \"nat\": destination \
    rewritten to the backend, source to the LB's address and a port of its own \
    (nat_port_range 10000-65000, closing timeout 2 s: a connection's port is free again soon \
    after it closes); the replies translated back in XDP";

pub(super) const NFT_HOW: &str = "ip_forward=1; nftables prerouting `dnat to jhash ip saddr \
    . sport mod 3 map {0: b0, 1: b1, 2: b2}` and postrouting `masquerade` towards the \
    backends (nf_conntrack translates the replies)";

/// Starts the agent with `vips` in NAT mode, tuned for thousands of short
/// connections per second.
pub(super) fn start_lb(t: &Topology, vips: &[VipSpec]) -> Result<LbAgent> {
    let paths = AgentPaths::new()?;
    let text = render_config(&paths.instance, &paths.socket, &t.lb_iface(), vips).replacen(
        "[agent]\n",
        "[agent]\nnat_port_range = \"10000-65000\"\nnat_entries = 262144\n\
         conntrack_tcp_closing_ms = 2000\n",
        1,
    );
    LbAgent::start_with(t.lb_ns(), paths, &text, &[])
}

/// The DNAT + masquerade rules for the TCP and UDP VIPs.
pub(super) fn nft_rules(t: &Topology, backends: &[Ipv4Addr]) -> String {
    let map = backends
        .iter()
        .enumerate()
        .map(|(i, b)| format!("{i} : {b}"))
        .collect::<Vec<_>>()
        .join(", ");
    let (n, vip) = (backends.len(), t.vip());
    let set = backends
        .iter()
        .map(Ipv4Addr::to_string)
        .collect::<Vec<_>>()
        .join(", ");
    let mut rules = format!(
        "table ip {NFT_TABLE} {{\n  chain pre {{\n    type nat hook prerouting priority -100;\n"
    );
    for (proto, port) in [("udp", super::UDP_PORT), ("tcp", super::TCP_PORT)] {
        let _ = writeln!(
            rules,
            "    ip daddr {vip} {proto} dport {port} dnat to jhash ip saddr . {proto} sport \
             mod {n} map {{ {map} }}"
        );
    }
    let _ = write!(
        rules,
        "  }}\n  chain post {{\n    type nat hook postrouting priority 100;\n    \
         ip daddr {{ {set} }} masquerade\n  }}\n}}\n"
    );
    rules
}

/// The headline rows of full NAT, each against lb nat, with the targets.
pub(super) fn rows(udp: &[UdpResult], tcp: &[TcpResult]) -> Result<Vec<Row>> {
    let find_udp = |sys: System| {
        udp.iter()
            .find(|r| r.sys == sys && r.kind == GenKind::Live)
            .ok_or_else(|| anyhow!("no UDP result for {}", sys.label()))
    };
    let find_tcp = |sys: System| {
        tcp.iter()
            .find(|r| r.sys == sys)
            .ok_or_else(|| anyhow!("no TCP result for {}", sys.label()))
    };
    let lb = System::Lb(Fwd::Nat);
    let (lb_udp, nft_udp) = (find_udp(lb)?, find_udp(System::NftMasq)?);
    let cpu = |r: &UdpResult| r.stats(|s: &UdpSample| s.cpu_per_m);
    let conns = |r: &TcpResult| r.stats(|s: &TcpSample| s.conns_per_sec);
    let lb_tcp = conns(find_tcp(lb)?);
    let mut rows = vec![
        Row::new(
            "NAT: UDP LB CPU per Mpkt, nftables DNAT+masquerade vs lb nat",
            "CPU-s/Mpkt",
            cpu(nft_udp),
        )
        .ratio(&cpu(lb_udp))
        .note("CPU time of the LB's receive path per million forwarded frames, one UDP flow")
        .target(Target {
            text: format!("nftables ≥ {CPU_VS_NFT}× lb nat's CPU per packet"),
            limit: CPU_VS_NFT,
            on: TargetOn::Ratio,
            better: Better::Higher,
        }),
        Row::new(
            "NAT: TCP new connections, nftables DNAT+masquerade vs lb nat",
            "conn/s",
            conns(find_tcp(System::NftMasq)?),
        )
        .ratio(&lb_tcp)
        .note("wrk, Connection: close; ratio = nftables / lb nat")
        .target(Target {
            text: format!(
                "lb nat ≥ {TCP_VS_NFT}× nftables (≤ {:.2}×)",
                1.0 / TCP_VS_NFT
            ),
            limit: 1.0 / TCP_VS_NFT,
            on: TargetOn::Ratio,
            better: Better::Lower,
        }),
    ];
    // HAProxy with its better thread count.
    let best = [System::Haproxy(1), System::Haproxy(2)]
        .into_iter()
        .filter_map(|s| find_tcp(s).ok())
        .max_by(|a, b| conns(a).median.total_cmp(&conns(b).median))
        .ok_or_else(|| anyhow!("no TCP result for HAProxy"))?;
    rows.push(
        Row::new(
            format!("NAT: TCP new connections, {} vs lb nat", best.sys.label()),
            "conn/s",
            conns(best),
        )
        .ratio(&lb_tcp)
        .note("wrk, Connection: close; ratio = HAProxy / lb nat")
        .target(Target {
            text: format!(
                "lb nat ≥ {TCP_VS_HAPROXY}× HAProxy (≤ {:.2}×)",
                1.0 / TCP_VS_HAPROXY
            ),
            limit: 1.0 / TCP_VS_HAPROXY,
            on: TargetOn::Ratio,
            better: Better::Lower,
        }),
    );
    Ok(rows)
}
