//! Scale-out behind ECMP with real routing daemons, in network
//! namespaces (the lab: `lb_tests::scale_out::EcmpLab`): a router (BIRD
//! 2, `merge paths on`, L4 multipath hash) peers over BGP with BIRD on two
//! lb hosts, each learning the host routes its agent puts in table 100
//! (`[agent.announce]`); the client sends to the VIP through the router,
//! which spreads flows over the lb hosts; backends answer the client
//! directly (DSR on one segment). BFD (100 ms × 3) detects a dead lb host.
//! Checked: both hosts carry new connections; `lb host drain` moves
//! traffic to the other host without a failed connection; a host whose
//! health checks fail withdraws the VIP while the other keeps it; a host
//! whose link dies is dropped by the router within a second and 20
//! long-lived connections (some through each host) keep their backend
//! without a reset, new connections succeeding throughout. Needs root and
//! BIRD 2 (Debian package bird2, installed by `cargo xtask setup`).

use std::{
    collections::BTreeSet,
    thread,
    time::{Duration, Instant},
};

use anyhow::{Result, ensure};
use lb_tests::{
    require_root,
    scale_out::{EcmpLab, WAIT, ecmp_lab, still_served},
    servers::{ask, get_from_ports, tcp_connect},
};

const BACKENDS: usize = 3;

#[test]
fn an_ecmp_tier_of_two_lb_hosts_spreads_drains_withdraws_and_fails_over() -> Result<()> {
    require_root();
    let lab = ecmp_lab(BACKENDS)?;
    let (l1, l2) = (lab.topo.lb_addr(), lab.host2.addr());

    // 1. Both hosts carry new connections (each at least a quarter).
    let (n1, n2) = lab.connect(40_000..41_000)?;
    ensure!(
        n1 >= 250 && n2 >= 250,
        "1000 connections: {n1} through lb1, {n2} through lb2"
    );

    // Long-lived connections, some through each host.
    let vip = lab.vip();
    let (a, b) = (EcmpLab::new_flows(&lab.lb1)?, EcmpLab::new_flows(&lab.lb2)?);
    let mut conns = lab.topo.client_ns().run(move || {
        (42_000..42_020)
            .map(|p| tcp_connect(Some(p), vip, Duration::from_secs(3)))
            .collect::<Result<Vec<_>>>()
    })??;
    let first: Vec<String> = conns.iter_mut().map(ask).collect::<Result<_>>()?;
    let (c1, c2) = (
        EcmpLab::new_flows(&lab.lb1)? - a,
        EcmpLab::new_flows(&lab.lb2)? - b,
    );
    ensure!(
        c1 >= 2 && c2 >= 2,
        "20 long-lived connections: {c1} through lb1, {c2} through lb2"
    );

    // 4. lb2 drained: the router keeps lb1 only; no connection fails and
    // lb2 records no new flow.
    lab.lb2.cli_ok(&["host", "drain"])?;
    lab.wait_next_hops(&[l1], "lb2 drained")?;
    still_served(&mut conns, &first, "lb2 drained")?;
    let (n1, n2) = lab.connect(41_000..41_100)?;
    ensure!(
        n2 == 0 && n1 >= 100,
        "lb2 drained: {n1} new flows on lb1, {n2} on lb2"
    );
    lab.lb2.cli_ok(&["host", "undrain"])?;
    lab.wait_next_hops(&[l1, l2], "lb2 undrained")?;
    still_served(&mut conns, &first, "lb2 undrained")?;

    // 5. lb1's health checks fail (a firewall in its namespace): lb1
    // withdraws the VIP, lb2 keeps it.
    let ns1 = lab.topo.lb_ns();
    for cmd in [
        "add table inet lbtest",
        "add chain inet lbtest out { type filter hook output priority 0 ; }",
        "add rule inet lbtest out tcp dport 80 drop",
    ] {
        let o = ns1.exec(std::iter::once("nft").chain(cmd.split(' ')))?;
        ensure!(o.status.success(), "nft {cmd}: {o:?}");
    }
    lab.wait_next_hops(&[l2], "lb1's checks failing")?;
    still_served(&mut conns, &first, "lb1's checks failing")?;
    let o = ns1.exec(["nft", "delete", "table", "inet", "lbtest"])?;
    ensure!(o.status.success(), "nft delete: {o:?}");
    lab.wait_next_hops(&[l1, l2], "lb1's checks passing again")?;

    // 3. lb1's link dies: BFD drops it from the route; the long-lived
    // connections that crossed it go on through lb2, to the same backend;
    // new connections succeed during and after.
    let t = Instant::now();
    ns1.ip(["link", "set", &lab.topo.lb_iface(), "down"])?;
    let mut tried = 0;
    let during = loop {
        let hops = lab.next_hops()?;
        if hops == BTreeSet::from([l2]) {
            break t.elapsed();
        }
        ensure!(t.elapsed() < WAIT, "lb1 down: next hops still {hops:?}");
        // New connections while the router may still pick lb1 (a SYN
        // lost there is sent again).
        if tried < 5 {
            get_from_ports(lab.topo.client_ns(), vip, [43_000 + tried])?;
            tried += 1;
        }
        thread::sleep(Duration::from_millis(20));
    };
    eprintln!("scale-out: the router dropped the dead lb host after {during:?}");
    ensure!(
        during < Duration::from_secs(2),
        "the router kept the dead lb host for {during:?} (BFD should take ~0.3 s)"
    );
    still_served(&mut conns, &first, "lb1 dead")?;
    let (_, n2) = lab.connect(44_000..44_100)?;
    ensure!(n2 >= 100, "lb1 dead: lb2 counted {n2} of 100 new flows");
    drop(lab.birds);
    Ok(())
}
