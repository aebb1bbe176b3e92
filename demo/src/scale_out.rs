//! `lb-demo --scale-out`: two lb hosts behind an ECMP router, live. The
//! lab is the one `tests/tests/scale_out_bgp.rs` checks
//! ([`lb_tests::scale_out::EcmpLab`]): BIRD 2 on a router and on both lb
//! hosts, BGP with BFD, each agent announcing the VIP through its table
//! 100. For 30 s the client opens new connections and keeps 20 long-lived
//! ones asking; lb1's link goes down at 10 s and comes back at 20 s. Each
//! second prints the router's next hops, the new connections and which
//! host counted them, and the long-lived connections' state; then the
//! checks.

use std::{
    net::Ipv4Addr,
    sync::{
        Arc, Mutex,
        atomic::{AtomicBool, Ordering},
    },
    thread,
    time::{Duration, Instant},
};

use anyhow::{Context as _, Result};
use lb_tests::{
    netns::{Netns, namespaces_still_present},
    scale_out::{EcmpLab, ecmp_lab},
    servers::{ask, http_get_from, tcp_connect},
};

use crate::{interrupted, summary::Check};

const RUN: u64 = 30;
const DOWN_AT: u64 = 10;
const UP_AT: u64 = 20;
const LONG_LIVED: u16 = 20;
/// New connections per second.
const NEW_PER_S: u16 = 10;

/// Runs the story; true when every check passed and everything was torn
/// down.
pub fn scale_out() -> Result<bool> {
    println!("lb demo --scale-out: two lb hosts behind an ECMP router, in network namespaces");
    println!();
    let t = Instant::now();
    let lab = ecmp_lab(3).context("building the ECMP lab")?;
    let (l1, l2) = (lab.topo.lb_addr(), lab.host2.addr());
    let name = |a: &Ipv4Addr| {
        if *a == l1 {
            "lb1".to_string()
        } else if *a == l2 {
            "lb2".to_string()
        } else {
            a.to_string()
        }
    };
    let ns = |n: &Netns| n.name().to_string();
    println!("ready in {:.1} s:", t.elapsed().as_secs_f64());
    println!(
        "  client {} ({}) -> router {} ({}: BIRD 2, ECMP by L4 hash, BFD 100 ms x 3)",
        lab.topo.client_addr(),
        ns(lab.topo.client_ns()),
        lab.router.addr(),
        ns(lab.router.ns())
    );
    println!(
        "  -> lb1 {l1} ({}) and lb2 {l2} ({}): `lb run` + BIRD each, announcing VIP {}:80 via table 100",
        ns(lab.topo.lb_ns()),
        ns(lab.host2.ns()),
        lab.topo.vip()
    );
    println!(
        "  -> 3 backends {}..{} (HTTP, VIP on lo: they answer the client directly)",
        lab.topo.backend_addr(0),
        lab.topo.backend_addr(2)
    );
    println!(
        "  same VIP and backends on both hosts: each sends a flow to the same backend (Maglev ring of addresses)"
    );
    println!();

    let vip = lab.vip();
    let mut conns = lab.topo.client_ns().run(move || {
        (42_000..42_000 + LONG_LIVED)
            .map(|p| tcp_connect(Some(p), vip, Duration::from_secs(3)))
            .collect::<Result<Vec<_>>>()
    })??;
    let first: Vec<String> = conns.iter_mut().map(ask).collect::<Result<_>>()?;
    println!(
        "{LONG_LIVED} long-lived connections open (keep-alive, one request per second each); lb1's link goes down at {DOWN_AT} s, up at {UP_AT} s"
    );
    println!();
    println!("   t  router next hops   new conns  lb1  lb2   long-lived ok");

    let mut next_port: u16 = 44_000;
    let (mut tried, mut ok) = (0u32, 0u32);
    let (mut before_split, mut after_split) = ((0u64, 0u64), (0u64, 0u64));
    let mut long_failures: Vec<String> = Vec::new();
    let events = Arc::new(Mutex::new(Events::default()));
    let watcher = Watcher::start(ns(lab.router.ns()), lab.topo.vip(), l1, events.clone());
    let start = Instant::now();
    for sec in 0..RUN {
        if interrupted() {
            return Ok(false);
        }
        if sec == DOWN_AT {
            lab.topo
                .lb_ns()
                .ip(["link", "set", &lab.topo.lb_iface(), "down"])?;
            events.lock().unwrap_or_else(|e| e.into_inner()).down = Some(Instant::now());
            println!("  -- {sec} s: lb1's link goes down (the host is gone for the router)");
        }
        if sec == UP_AT {
            lab.topo
                .lb_ns()
                .ip(["link", "set", &lab.topo.lb_iface(), "up"])?;
            events.lock().unwrap_or_else(|e| e.into_inner()).up = Some(Instant::now());
            println!("  -- {sec} s: lb1's link is back");
        }
        let (a, b) = (
            EcmpLab::new_flows(&lab.lb1).unwrap_or(0),
            EcmpLab::new_flows(&lab.lb2)?,
        );
        let mut sec_ok = 0;
        for _ in 0..NEW_PER_S {
            let port = next_port;
            next_port += 1;
            tried += 1;
            let got = lab
                .topo
                .client_ns()
                .run(move || http_get_from(Some(port), vip, Duration::from_secs(3)))?;
            if got.is_ok() {
                ok += 1;
                sec_ok += 1;
            }
        }
        let mut long_ok = 0;
        for (i, (c, was)) in conns.iter_mut().zip(&first).enumerate() {
            match ask(c) {
                Ok(now) if &now == was => long_ok += 1,
                Ok(now) => {
                    long_failures.push(format!("{sec} s: connection {i} moved from {was} to {now}"))
                }
                Err(e) => long_failures.push(format!("{sec} s: connection {i}: {e:#}")),
            }
        }
        let (d1, d2) = (
            EcmpLab::new_flows(&lab.lb1).unwrap_or(a) - a,
            EcmpLab::new_flows(&lab.lb2)? - b,
        );
        if sec < DOWN_AT {
            before_split = (before_split.0 + d1, before_split.1 + d2);
        }
        if sec >= RUN - 5 {
            after_split = (after_split.0 + d1, after_split.1 + d2);
        }
        let hops: Vec<String> = lab.next_hops()?.iter().map(name).collect();
        println!(
            "{:>4}  {:<17}  {:>5}/{:<3}  {:>3}  {:>3}   {long_ok}/{LONG_LIVED}",
            sec,
            hops.join(" "),
            sec_ok,
            NEW_PER_S,
            d1,
            d2
        );
        let rest = Duration::from_secs(sec + 1).saturating_sub(start.elapsed());
        thread::sleep(rest);
    }
    println!();
    let (dropped_after, back_after) = watcher.finish();

    let checks = [
        Check::new(
            before_split.0 > 0 && before_split.1 > 0,
            format!(
                "both hosts carried new connections before the failure (lb1 {}, lb2 {})",
                before_split.0, before_split.1
            ),
        ),
        Check::new(
            dropped_after.is_some_and(|d| d < Duration::from_secs(2)),
            format!(
                "the router dropped lb1 within 2 s of its link going down ({})",
                dropped_after.map_or("never".into(), |d| format!("{} ms", d.as_millis()))
            ),
        ),
        Check::new(
            long_failures.is_empty(),
            format!(
                "every long-lived connection answered every second from its backend ({} failures)",
                long_failures.len()
            ),
        ),
        Check::new(
            f64::from(ok) >= 0.99 * f64::from(tried),
            format!("{ok} of {tried} new connections succeeded (>= 99 % required)"),
        ),
        Check::new(
            back_after.is_some() && after_split.0 > 0 && after_split.1 > 0,
            format!(
                "lb1 came back into the route ({}) and both hosts carried new connections in the last 5 s (lb1 {}, lb2 {})",
                back_after.map_or("never".into(), |d| format!(
                    "after {:.1} s",
                    d.as_secs_f64()
                )),
                after_split.0,
                after_split.1
            ),
        ),
    ];
    println!("checks:");
    for c in &checks {
        println!("  {}  {}", if c.ok { "PASS" } else { "FAIL" }, c.what);
    }
    for f in long_failures.iter().take(5) {
        println!("    {f}");
    }

    let names = lab.topo.namespace_names();
    let extra = [ns(lab.router.ns()), ns(lab.host2.ns())];
    drop(conns);
    let torn = Instant::now();
    drop(lab);
    let all: Vec<String> = names.into_iter().chain(extra).collect();
    let left = namespaces_still_present(&all)?;
    println!();
    if left.is_empty() {
        println!(
            "teardown: agents and BIRD stopped, {} namespaces removed ({:.1} s)",
            all.len(),
            torn.elapsed().as_secs_f64()
        );
    } else {
        println!("teardown: namespaces still present: {left:?}");
    }
    let passed = checks.iter().filter(|c| c.ok).count();
    println!("{passed} of {} checks passed", checks.len());
    Ok(passed == checks.len() && left.is_empty())
}

/// Polls the router's next hops for the VIP every 20 ms in a thread of
/// its own (new connections can stall a second while the router still
/// sends to a dead host): when lb1 left them after `down`, and when it was
/// back after `up`.
struct Watcher {
    stop: Arc<AtomicBool>,
    handle: Option<thread::JoinHandle<(Option<Duration>, Option<Duration>)>>,
}

impl Watcher {
    fn start(router_ns: String, vip: Ipv4Addr, l1: Ipv4Addr, events: Arc<Mutex<Events>>) -> Self {
        let stop = Arc::new(AtomicBool::new(false));
        let flag = stop.clone();
        let handle = thread::spawn(move || {
            let (mut dropped, mut back) = (None, None);
            while !flag.load(Ordering::Relaxed) {
                let out = std::process::Command::new("ip")
                    .args([
                        "-n",
                        &router_ns,
                        "-4",
                        "route",
                        "show",
                        &vip.to_string(),
                        "proto",
                        "bird",
                    ])
                    .output();
                let has_l1 = out.is_ok_and(|o| {
                    String::from_utf8_lossy(&o.stdout).contains(&format!("via {l1} "))
                });
                let ev = *events.lock().unwrap_or_else(|e| e.into_inner());
                if let Some(down) = ev.down
                    && dropped.is_none()
                    && !has_l1
                {
                    dropped = Some(down.elapsed());
                }
                if let Some(up) = ev.up
                    && back.is_none()
                    && has_l1
                {
                    back = Some(up.elapsed());
                }
                thread::sleep(Duration::from_millis(20));
            }
            (dropped, back)
        });
        Self {
            stop,
            handle: Some(handle),
        }
    }

    fn finish(mut self) -> (Option<Duration>, Option<Duration>) {
        self.stop.store(true, Ordering::Relaxed);
        self.handle
            .take()
            .and_then(|h| h.join().ok())
            .unwrap_or((None, None))
    }
}

impl Drop for Watcher {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::Relaxed);
    }
}

/// When lb1's link went down and came back.
#[derive(Clone, Copy, Default)]
struct Events {
    down: Option<Instant>,
    up: Option<Instant>,
}
