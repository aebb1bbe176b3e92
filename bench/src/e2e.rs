//! End to end in network namespaces: the behaviour tests' topology
//! (client, load balancer, 3 backends on one bridge) and traffic through
//! lb, nftables DNAT, HAProxy and plain kernel forwarding; lb also with an
//! IPv6 VIP and backends (v6.rs), in each forwarding mode; lb's full NAT
//! against nftables DNAT + masquerade and HAProxy (nat.rs).
//!
//! UDP packets per second
//! - Generator: frames enter the LB's veth from its switch-side peer, as
//!   the bridge delivers them (client MAC and address as source, one
//!   60-byte UDP flow to the VIP), pinned to one CPU. Through the bridge
//!   itself one core offers only ~0.5 Mpps here (skb, bridge, netfilter
//!   bridge hooks), far below what lb forwards.
//!   - every system: BPF_PROG_TEST_RUN in live-frames mode on `lb_gen_tx`,
//!     several Mpps from one core. The kernel recycles live frames' pages
//!     without rewriting them, so whatever the receiver changes in place
//!     (MACs, an outer header pushed in front, TTL, DNAT) would come back
//!     in later frames: `lb_gen_tx` stamps the headers from a template
//!     into every frame before `XDP_TX`. nftables also gets the AF_PACKET
//!     generator ([`kit::packet_generate`]: fresh skbs, slower) as a
//!     cross-check.
//! - The LB's receive path (its veth's NAPI, threaded, SCHED_FIFO like a
//!   softirq) runs on the other CPU; its CPU time is read exactly from the
//!   NAPI thread's schedstat.
//! - Counted: frames the LB hands to the next hop (its veth's XDP_TX
//!   counters, or transmitted skbs), including those the next hop could
//!   not take; dropped there by a counter-and-drop at the first hop after
//!   the LB ([`kit::Sink`]), so that neither the bridge nor the backends
//!   limit the figure.
//!
//! New TCP connections per second: `wrk` in the client namespace with
//! `Connection: close` against the VIP, the real HTTP test servers on the
//! backends.
//!
//! Every load is bounded in time (the generators also in count);
//! everything lives in namespaces this benchmark creates and removes, also
//! on failure (RAII guards).

mod kit;
mod nat;
mod reference;
mod section;
mod v6;

use std::{
    fmt::Write as _,
    net::{IpAddr, Ipv4Addr, SocketAddrV4},
    path::{Path, PathBuf},
    process::Stdio,
    thread,
    time::{Duration, Instant},
};

use anyhow::{Context, Result, anyhow, bail, ensure};
use lb_common::decap::DEFAULT_GUE_PORT;
use lb_tests::{
    agent::{LbAgent, VipSpec},
    netns::{ChildGuard, Netns, Topology, TopologyOpts, spawn_guarded},
    packet::Ipv4Packet,
    servers::{ServerKind, http_get, spawn_on_backends, try_server_binary},
    testprogs::TestProgs,
};

use crate::report::{Section, Stats};

use kit::{CpuTicks, GenControl, Sink};

const TCP_PORT: u16 = 80;
/// The flood's destination port (nothing listens: frames never get past
/// the sink anyway).
const UDP_PORT: u16 = 5001;
const UDP_SRC_PORT: u16 = 40000;
/// The generator's frame: Ethernet + IPv4 + UDP + 18 bytes = 60 bytes
/// (80 bytes over IPv6).
const FRAME_PAYLOAD: usize = 18;
/// Issue target: lb's end-to-end UDP packet rate ≥ 4× nftables DNAT's.
const UDP_TARGET: f64 = 4.0;
/// A rate no generator reaches here: bounds each run's frame count.
const GEN_MAX_RATE: f64 = 25e6;
/// Warm-up before each measured window (generator start, ring fill).
const WARM_SECS: f64 = 0.2;
/// A system whose receive path was at least this busy limited the rate
/// itself; below, the generator did.
const SATURATED: f64 = 0.85;
/// SCHED_FIFO priority of the thread that reads the counters (above the
/// NAPI threads': it only wakes up twice per run).
const MEASURE_PRIORITY: i32 = 60;

pub struct Config {
    pub runs: usize,
    /// Measured window of each UDP run.
    pub udp_secs: f64,
    /// Duration of each wrk run.
    pub tcp_secs: u32,
    pub wrk_threads: u32,
    pub wrk_connections: u32,
}

/// lb's forwarding mode for the VIPs.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Fwd {
    DsrL2,
    Ipip,
    Gue,
    Nat,
}

impl Fwd {
    /// As the config names it.
    fn name(self) -> &'static str {
        match self {
            Fwd::DsrL2 => "dsr-l2",
            Fwd::Ipip => "ipip",
            Fwd::Gue => "gue",
            Fwd::Nat => "nat",
        }
    }
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum System {
    Lb(Fwd),
    /// lb with an IPv6 VIP and IPv6 backends (UDP only).
    Lb6(Fwd),
    Nft,
    /// nftables DNAT and masquerade: full NAT in the kernel (nat.rs).
    NftMasq,
    Haproxy(u8),
    Routing,
    /// The reference XDP forwarder (reference.rs).
    RefXdp,
}

impl System {
    fn label(self) -> String {
        match self {
            System::Lb(Fwd::DsrL2) => "lb".into(),
            System::Lb(f) => format!("lb {}", f.name()),
            System::Lb6(Fwd::DsrL2) => "lb IPv6".into(),
            System::Lb6(Fwd::Ipip) => "lb ipip IPv6 (6in6)".into(),
            System::Lb6(Fwd::Gue) => "lb gue IPv6".into(),
            System::Lb6(Fwd::Nat) => "lb nat IPv6".into(),
            System::Nft => "nftables DNAT".into(),
            System::NftMasq => "nftables DNAT+masquerade".into(),
            System::Haproxy(n) => format!("HAProxy nbthread {n}"),
            System::Routing => "kernel routing".into(),
            System::RefXdp => "reference XDP forwarder".into(),
        }
    }

    /// An XDP program on the LB's veth does the work (its NAPI runs
    /// because of it).
    fn is_xdp(self) -> bool {
        matches!(self, System::Lb(_) | System::Lb6(_) | System::RefXdp)
    }

    fn chart_label(self) -> String {
        match self {
            System::Lb(Fwd::DsrL2) => "lb".into(),
            System::Lb(f) => format!("lb {}", f.name()),
            System::Lb6(Fwd::DsrL2) => "lb v6".into(),
            System::Lb6(f) => format!("lb {} v6", f.name()),
            System::Nft => "nftables".into(),
            System::NftMasq => "nft masq".into(),
            System::Haproxy(n) => format!("HAProxy x{n}"),
            System::Routing => "routing".into(),
            System::RefXdp => "reference".into(),
        }
    }

    fn how(self) -> &'static str {
        match self {
            System::Lb(Fwd::DsrL2) => {
                "the lb agent on the LB's veth (native XDP), one UDP and one TCP VIP over \
                 the 3 backends; DSR"
            }
            System::Lb(Fwd::Ipip) => {
                "as lb, with the VIPs' forwarding = \"ipip\": each frame leaves in an \
                 IPv4-in-IPv4 tunnel (20 bytes pushed), to the backends' MACs"
            }
            System::Lb(Fwd::Gue) => {
                "as lb, with the VIPs' forwarding = \"gue\": each frame leaves in IPv4 + \
                 UDP (28 bytes pushed, source port from the flow hash)"
            }
            System::Lb6(Fwd::DsrL2) => {
                "as lb, with an IPv6 VIP over the 3 backends' IPv6 addresses (UDP flood only); \
                 80-byte frames"
            }
            System::Lb6(Fwd::Ipip) => {
                "as lb IPv6, forwarding = \"ipip\": each frame leaves in an IPv6-in-IPv6 \
                 tunnel (40 bytes pushed)"
            }
            System::Lb6(Fwd::Gue) => {
                "as lb IPv6, forwarding = \"gue\": each frame leaves in IPv6 + UDP (48 bytes \
                 pushed, flow label and source port from the flow hash)"
            }
            System::Lb(Fwd::Nat) | System::Lb6(Fwd::Nat) => nat::LB_HOW,
            System::NftMasq => nat::NFT_HOW,
            System::Nft => {
                "ip_forward=1; nftables prerouting `dnat to jhash ip saddr . sport mod 3 map \
                 {0: b0, 1: b1, 2: b2}`; for TCP the backends route the client via the LB"
            }
            System::Haproxy(_) => {
                "HAProxy mode tcp, balance roundrobin over the 3 backends, VIP on the LB's lo"
            }
            System::Routing => "ip_forward=1, VIP/32 via backend 0 (which holds the VIP)",
            System::RefXdp => reference::HOW,
        }
    }
}

/// How frames are generated.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum GenKind {
    /// BPF_PROG_TEST_RUN live frames on `lb_gen_tx`.
    Live,
    /// The AF_PACKET TX ring (see [`kit::packet_generate`]).
    Packet,
}

impl GenKind {
    fn label(self) -> &'static str {
        match self {
            GenKind::Live => "live frames",
            GenKind::Packet => "AF_PACKET",
        }
    }
}

/// The UDP measurements, in order: each system with the fastest generator
/// whose frames stay valid for it.
/// Every system gets the same live-frames generator (it rewrites each
/// frame's headers from a template, so in-place changes by NAT or routing
/// do not come back); nftables also with AF_PACKET, as a cross-check.
/// lb's tunnel modes right after its dsr-l2: what the outer header costs
/// end to end; then the same three with an IPv6 VIP (80-byte frames).
const UDP_CASES: [(System, GenKind); 12] = [
    (System::Lb(Fwd::DsrL2), GenKind::Live),
    (System::RefXdp, GenKind::Live),
    (System::Lb(Fwd::Ipip), GenKind::Live),
    (System::Lb(Fwd::Gue), GenKind::Live),
    (System::Lb(Fwd::Nat), GenKind::Live),
    (System::Lb6(Fwd::DsrL2), GenKind::Live),
    (System::Lb6(Fwd::Ipip), GenKind::Live),
    (System::Lb6(Fwd::Gue), GenKind::Live),
    (System::Nft, GenKind::Live),
    (System::NftMasq, GenKind::Live),
    (System::Routing, GenKind::Live),
    (System::Nft, GenKind::Packet),
];

/// Run order. HAProxy last: its TIME_WAIT sockets (VIP:80 ↔ client ports)
/// stay in the LB namespace for a minute, and early demux makes the
/// kernel drop forwarded segments of the same 4-tuples.
const TCP_ORDER: [System; 7] = [
    System::Lb(Fwd::DsrL2),
    System::Lb(Fwd::Nat),
    System::Nft,
    System::NftMasq,
    System::Routing,
    System::Haproxy(1),
    System::Haproxy(2),
];
/// Report order.
const TCP_REPORT: [System; 7] = [
    System::Lb(Fwd::DsrL2),
    System::Lb(Fwd::Nat),
    System::Nft,
    System::NftMasq,
    System::Haproxy(1),
    System::Haproxy(2),
    System::Routing,
];

/// Counters at one instant of a UDP run.
struct Snapshot {
    at: Instant,
    sink: u64,
    napi_ns: u64,
    /// The LB's veth (in the LB namespace).
    lb: kit::DevStats,
    /// Its switch-side peer.
    port: kit::DevStats,
    cpus: Vec<CpuTicks>,
}

/// One UDP run.
#[derive(Clone, Copy, Debug)]
struct UdpSample {
    /// Frames per second the LB handed to the next hop.
    pps: f64,
    /// Frames per second counted at the sink.
    sink_pps: f64,
    /// Share of the frames the LB handed on that the next hop could not
    /// take (its ring full).
    lost: f64,
    /// Frames per second the generator offered to the LB's veth.
    offered_pps: f64,
    /// Share of those the LB's veth refused (its receive ring full).
    refused: f64,
    /// CPU-seconds of the LB's receive path (its NAPI thread, where the
    /// softirq work runs in threaded mode) per million forwarded frames.
    cpu_per_m: f64,
    /// Share of one CPU the NAPI thread used.
    busy: f64,
    /// Share of the LB's CPU busy with anything (other load included).
    lb_cpu_busy: f64,
    /// Share of the generator's CPU busy.
    gen_cpu_busy: f64,
}

/// One wrk run.
#[derive(Clone, Copy, Debug)]
struct TcpSample {
    conns_per_sec: f64,
    errors: u64,
    /// Busy CPU-seconds of the whole machine per 1000 connections.
    machine_cpu_per_k: f64,
}

struct UdpResult {
    sys: System,
    kind: GenKind,
    /// The flood's frame length (60 bytes over IPv4, 80 over IPv6).
    frame_len: usize,
    samples: Vec<UdpSample>,
}

impl UdpResult {
    fn stats(&self, f: impl Fn(&UdpSample) -> f64) -> Stats {
        Stats::of(&self.samples.iter().map(f).collect::<Vec<_>>())
    }

    fn saturated(&self) -> bool {
        self.stats(|s| s.busy).median >= SATURATED
    }
}

struct TcpResult {
    sys: System,
    samples: Vec<TcpSample>,
}

impl TcpResult {
    fn stats(&self, f: impl Fn(&TcpSample) -> f64) -> Stats {
        Stats::of(&self.samples.iter().map(f).collect::<Vec<_>>())
    }
}

fn which(tool: &str) -> Option<PathBuf> {
    let paths = std::env::var_os("PATH").unwrap_or_default();
    std::env::split_paths(&paths)
        .chain(["/usr/sbin".into(), "/sbin".into()])
        .map(|d| d.join(tool))
        .find(|p| p.is_file())
}

fn need(tool: &str, package: &str) -> Result<PathBuf> {
    which(tool).ok_or_else(|| {
        anyhow!("`{tool}` is not installed (Debian package {package}; `cargo xtask setup`)")
    })
}

/// The `lb` binary the agent runs, found as `lb_tests::agent::lb_binary`
/// finds it (which panics when it is missing).
fn check_lb_binary() -> Result<()> {
    if std::env::var_os("LB_BIN").is_some() {
        return Ok(());
    }
    let exe = std::env::current_exe().context("current_exe")?;
    if let Some(lb) = exe
        .ancestors()
        .skip(1)
        .take(3)
        .map(|d| d.join("lb"))
        .find(|p| p.is_file())
    {
        // The agent's XDP object is compiled into the `lb` binary: an old
        // one measures old code.
        let modified = |p: &Path| std::fs::metadata(p).and_then(|m| m.modified()).ok();
        if let (Some(l), Some(e)) = (modified(&lb), modified(&exe))
            && e.duration_since(l)
                .is_ok_and(|d| d > Duration::from_secs(60))
        {
            eprintln!(
                "lb-bench: warning: {} is older than {}; rebuild it \
                 (`cargo build --release -p lb-userspace --bin lb`) to measure the current code",
                lb.display(),
                exe.display()
            );
        }
        return Ok(());
    }
    bail!(
        "the `lb` binary is not next to {}: build it (`cargo build --release -p lb-userspace \
         --bin lb`) or set LB_BIN",
        exe.display()
    )
}

struct Tools {
    haproxy: PathBuf,
    wrk: PathBuf,
}

fn tools() -> Result<Tools> {
    need("nft", "nftables")?;
    need("bridge", "iproute2")?;
    need("ethtool", "ethtool")?;
    try_server_binary()?;
    check_lb_binary()?;
    Ok(Tools {
        haproxy: need("haproxy", "haproxy")?,
        wrk: need("wrk", "wrk")?,
    })
}

fn backends(topo: &Topology) -> Vec<Ipv4Addr> {
    (0..topo.backend_count())
        .map(|i| topo.backend_addr(i))
        .collect()
}

fn mac(m: [u8; 6]) -> String {
    lb::mac::MacAddr(m).to_string()
}

fn ifindex(ns: &Netns, iface: &str) -> Result<u32> {
    let out = ns.ip(["-j", "link", "show", "dev", iface])?;
    let v: serde_json::Value = serde_json::from_slice(&out.stdout)?;
    v[0]["ifindex"]
        .as_u64()
        .map(|i| i as u32)
        .ok_or_else(|| anyhow!("no ifindex for {iface} in {}", ns.name()))
}

/// The benchmark's world. Field order is drop order: processes and
/// programs before the namespaces.
struct Bench {
    agent: Option<LbAgent>,
    haproxy: Option<ChildGuard>,
    _servers: Vec<ChildGuard>,
    sink: Sink,
    /// Holds `lb_gen_tx` during the UDP phase.
    generator: Option<TestProgs>,
    /// Holds the reference forwarder while it is attached.
    reference: Option<TestProgs>,
    dir: PathBuf,
    lb_cpu: usize,
    gen_cpu: usize,
    haproxy_bin: PathBuf,
    topo: Topology,
}

impl Drop for Bench {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}

impl Bench {
    fn new(lb_cpu: usize, gen_cpu: usize, haproxy_bin: PathBuf) -> Result<Bench> {
        // IPv6 on for lb's IPv6 rows; no IPv6 frame moves in the others
        // (static neighbours, no DAD, RA or autoconfiguration).
        let topo = Topology::new(TopologyOpts {
            backends: 3,
            ipv6: true,
        })?;
        let dir = std::env::temp_dir().join(format!("lb-bench-e2e-{}", std::process::id()));
        std::fs::create_dir_all(&dir)?;
        let servers = spawn_on_backends(&topo, ServerKind::Http, TCP_PORT)?;
        let sink = Sink::new(UDP_PORT, DEFAULT_GUE_PORT)?;
        let bench = Bench {
            agent: None,
            haproxy: None,
            _servers: servers,
            sink,
            generator: None,
            reference: None,
            dir,
            lb_cpu,
            gen_cpu,
            haproxy_bin,
            topo,
        };
        bench.static_neighbours()?;
        bench.tcp_sysctls()?;
        Ok(bench)
    }

    /// Permanent neighbour entries (IPv4 and IPv6) and static bridge FDB
    /// entries: no ARP, no neighbour discovery and no flooding in the
    /// middle of a measurement (lb's next hops come from these entries).
    fn static_neighbours(&self) -> Result<()> {
        let t = &self.topo;
        // `ip neigh` takes the family from the address.
        let neigh = |ns: &Netns, iface: &str, addr: IpAddr, m: [u8; 6]| -> Result<()> {
            ns.ip([
                "neigh",
                "replace",
                &addr.to_string(),
                "lladdr",
                &mac(m),
                "dev",
                iface,
                "nud",
                "permanent",
            ])?;
            Ok(())
        };
        for v6 in [false, true] {
            let pick = |a4: Ipv4Addr, a6: std::net::Ipv6Addr| -> IpAddr {
                if v6 { a6.into() } else { a4.into() }
            };
            let client = pick(t.client_addr(), t.client_addr6());
            let lb = pick(t.lb_addr(), t.lb_addr6());
            neigh(t.client_ns(), &t.client_iface(), lb, t.lb_mac())?;
            neigh(t.lb_ns(), &t.lb_iface(), client, t.client_mac())?;
            for i in 0..t.backend_count() {
                let backend = pick(t.backend_addr(i), t.backend_addr6(i));
                neigh(t.lb_ns(), &t.lb_iface(), backend, t.backend_mac(i))?;
                let b = t.backend_ns(i);
                neigh(b, &t.backend_iface(i), client, t.client_mac())?;
                neigh(b, &t.backend_iface(i), lb, t.lb_mac())?;
            }
        }
        let fdb = |m: [u8; 6], port: String| -> Result<()> {
            t.switch_ns().exec([
                "bridge",
                "fdb",
                "replace",
                &mac(m),
                "dev",
                &port,
                "master",
                "static",
            ])?;
            Ok(())
        };
        fdb(t.client_mac(), t.client_switch_port())?;
        fdb(t.lb_mac(), t.lb_switch_port())?;
        for i in 0..t.backend_count() {
            fdb(t.backend_mac(i), t.backend_switch_port(i))?;
        }
        Ok(())
    }

    /// Room for thousands of short connections per second.
    fn tcp_sysctls(&self) -> Result<()> {
        let t = &self.topo;
        let mut all = vec![t.client_ns(), t.lb_ns()];
        all.extend((0..t.backend_count()).map(|i| t.backend_ns(i)));
        for ns in all {
            ns.sysctl(&[
                ("net.ipv4.ip_local_port_range", "1024 65000"),
                ("net.ipv4.tcp_tw_reuse", "1"),
                ("net.core.somaxconn", "4096"),
                ("net.ipv4.tcp_max_syn_backlog", "4096"),
            ])?;
        }
        Ok(())
    }

    // -- the systems ---------------------------------------------------------

    fn start(&mut self, sys: System, tcp: bool) -> Result<()> {
        let t = &self.topo;
        match sys {
            System::Lb(fwd) => {
                let bs = backends(t);
                let mut web = VipSpec::tcp("web", t.vip(), TCP_PORT, &bs);
                web.forwarding = fwd.name();
                web.health_check =
                    "kind = \"tcp\"\ninterval_ms = 1000\ntimeout_ms = 500\nrise = 2\nfall = 3"
                        .into();
                let mut flood = VipSpec::tcp("flood", t.vip(), UDP_PORT, &bs);
                flood.protocol = "udp";
                flood.health_check = "kind = \"none\"".into();
                flood.forwarding = fwd.name();
                self.agent = Some(if fwd == Fwd::Nat {
                    nat::start_lb(t, &[web, flood])?
                } else {
                    LbAgent::start(t.lb_ns(), &t.lb_iface(), &[web, flood])?
                });
            }
            System::Lb6(fwd) => {
                ensure!(!tcp, "{} is measured with UDP only", sys.label());
                let flood = v6::flood_vip(t, fwd.name());
                self.agent = Some(LbAgent::start(t.lb_ns(), &t.lb_iface(), &[flood])?);
            }
            System::Nft => {
                self.forwarding(true)?;
                let bs = backends(t);
                let map = bs
                    .iter()
                    .enumerate()
                    .map(|(i, b)| format!("{i} : {b}"))
                    .collect::<Vec<_>>()
                    .join(", ");
                let (n, vip) = (bs.len(), t.vip());
                let mut rules = String::from(
                    "table ip lbbench {\n  chain pre {\n    \
                     type nat hook prerouting priority -100;\n",
                );
                for (proto, port) in [("udp", UDP_PORT), ("tcp", TCP_PORT)] {
                    let _ = writeln!(
                        rules,
                        "    ip daddr {vip} {proto} dport {port} dnat to jhash ip saddr . \
                         {proto} sport mod {n} map {{ {map} }}"
                    );
                }
                rules.push_str("  }\n}\n");
                let path = self.dir.join("nft.conf");
                std::fs::write(&path, rules)?;
                t.lb_ns()
                    .exec(["nft", "-f", &path.to_string_lossy()])
                    .context("loading the nftables DNAT rules")?;
                if tcp {
                    self.backend_routes_via_lb(true)?;
                }
            }
            System::NftMasq => {
                self.forwarding(true)?;
                let path = self.dir.join("nft-masq.conf");
                std::fs::write(&path, nat::nft_rules(t, &backends(t)))?;
                t.lb_ns()
                    .exec(["nft", "-f", &path.to_string_lossy()])
                    .context("loading the nftables DNAT + masquerade rules")?;
            }
            System::Haproxy(threads) => {
                let vip32 = format!("{}/32", t.vip());
                t.lb_ns().ip(["addr", "add", &vip32, "dev", "lo"])?;
                let mut cfg = format!(
                    "global\n  nbthread {threads}\n  maxconn 5000\n\n\
                     defaults\n  mode tcp\n  timeout connect 2s\n  timeout client 10s\n  \
                     timeout server 10s\n\n\
                     frontend vip\n  bind {}:{TCP_PORT}\n  default_backend servers\n\n\
                     backend servers\n  balance roundrobin\n",
                    t.vip()
                );
                for (i, b) in backends(t).iter().enumerate() {
                    let _ = writeln!(cfg, "  server b{i} {b}:{TCP_PORT}");
                }
                let path = self.dir.join(format!("haproxy-{threads}.cfg"));
                std::fs::write(&path, cfg)?;
                let log = std::fs::File::create(self.dir.join("haproxy.log"))?;
                let mut cmd = t.lb_ns().command(&self.haproxy_bin);
                cmd.arg("-f")
                    .arg(&path)
                    .arg("-db")
                    .stdin(Stdio::null())
                    .stdout(log.try_clone()?)
                    .stderr(log);
                self.haproxy = Some(spawn_guarded(cmd)?);
            }
            System::RefXdp => {
                ensure!(!tcp, "{} is measured with UDP only", sys.label());
                self.reference = Some(reference::start(t)?);
            }
            System::Routing => {
                self.forwarding(true)?;
                let vip32 = format!("{}/32", t.vip());
                let via = t.backend_addr(0).to_string();
                t.lb_ns().ip(["route", "replace", &vip32, "via", &via])?;
            }
        }
        if tcp && let Err(e) = self.wait_tcp_service() {
            let log = std::fs::read_to_string(self.dir.join("haproxy.log")).unwrap_or_default();
            return Err(match sys {
                System::Haproxy(_) => e.context(format!("HAProxy's output:\n{log}")),
                _ => e,
            });
        }
        Ok(())
    }

    fn stop(&mut self, sys: System) -> Result<()> {
        let t = &self.topo;
        match sys {
            System::Lb(_) | System::Lb6(_) => {
                if let Some(mut a) = self.agent.take() {
                    a.stop()?;
                }
            }
            System::Nft => {
                t.lb_ns()
                    .exec(["nft", "delete", "table", "ip", "lbbench"])?;
                self.backend_routes_via_lb(false)?;
                self.forwarding(false)?;
            }
            System::NftMasq => {
                t.lb_ns()
                    .exec(["nft", "delete", "table", "ip", nat::NFT_TABLE])?;
                self.forwarding(false)?;
            }
            System::Haproxy(_) => {
                if let Some(h) = self.haproxy.take() {
                    h.stop(libc::SIGTERM, Duration::from_secs(5))?;
                }
                let vip32 = format!("{}/32", t.vip());
                t.lb_ns().ip(["addr", "del", &vip32, "dev", "lo"])?;
            }
            System::RefXdp => self.reference = None,
            System::Routing => {
                let vip32 = format!("{}/32", t.vip());
                t.lb_ns().ip(["route", "del", &vip32])?;
                self.forwarding(false)?;
            }
        }
        Ok(())
    }

    fn forwarding(&self, on: bool) -> Result<()> {
        let t = &self.topo;
        // In and out of the same interface: no ICMP redirects to the
        // client (it would then bypass the LB).
        let redirects = format!("net.ipv4.conf.{}.send_redirects", t.lb_iface());
        t.lb_ns().sysctl(&[
            ("net.ipv4.conf.all.send_redirects", "0"),
            ("net.ipv4.conf.default.send_redirects", "0"),
            (&redirects, "0"),
            ("net.ipv4.ip_forward", if on { "1" } else { "0" }),
        ])
    }

    /// For DNAT the replies must come back through the LB (un-DNAT).
    fn backend_routes_via_lb(&self, on: bool) -> Result<()> {
        let t = &self.topo;
        let client32 = format!("{}/32", t.client_addr());
        let lb = t.lb_addr().to_string();
        for i in 0..t.backend_count() {
            let b = t.backend_ns(i);
            if on {
                b.ip(["route", "replace", &client32, "via", &lb])?;
            } else {
                let _ = b.ip(["route", "del", &client32]);
            }
        }
        Ok(())
    }

    /// Waits (bounded) until GET http://VIP/ answers from the client.
    fn wait_tcp_service(&self) -> Result<()> {
        let vip = SocketAddrV4::new(self.topo.vip(), TCP_PORT);
        let timeout = Duration::from_secs(15);
        let deadline = Instant::now() + timeout;
        loop {
            let r = self.topo.client_ns().run(move || {
                (0..6).try_for_each(|_| http_get(vip, Duration::from_secs(1)).map(|_| ()))
            })?;
            match r {
                Ok(()) => return Ok(()),
                Err(e) if Instant::now() >= deadline => {
                    return Err(e.context(format!("{vip} did not answer within {timeout:?}")));
                }
                Err(_) => thread::sleep(Duration::from_millis(100)),
            }
        }
    }

    // -- UDP -----------------------------------------------------------------

    fn udp_phase_start(&mut self) -> Result<()> {
        let t = &self.topo;
        // The template is set per system (its family's frame).
        self.generator = Some(TestProgs::load()?);
        let port = t.lb_switch_port();
        self.sink.install(t.switch_ns(), &port)?;
        // The sink's work (the first hop after the LB) stays off the LB's
        // CPU.
        kit::threaded_napi_on(t.switch_ns(), &port, self.gen_cpu)?;
        Ok(())
    }

    fn udp_phase_end(&mut self) -> Result<()> {
        let t = &self.topo;
        let r = kit::threaded_napi_off(t.switch_ns(), &t.lb_switch_port());
        self.sink.remove()?;
        self.generator = None;
        r
    }

    /// Threaded NAPI on the LB's veth, pinned to the LB CPU. Frames sent by
    /// XDP reach a veth only through its NAPI, which exists when an XDP
    /// program is attached (lb) or GRO is on (the kernel's own paths: the
    /// path of a NIC driver without XDP; GRO aggregates nothing here, UDP
    /// GRO forwarding is off). Returns the NAPI threads.
    fn steer_on(&self, sys: System, kind: GenKind) -> Result<Vec<i32>> {
        let t = &self.topo;
        if !sys.is_xdp() {
            t.lb_ns()
                .ethtool_features(&t.lb_iface(), &[("gro", true)])?;
        }
        if kind == GenKind::Packet && !sys.is_xdp() {
            // A veth hands an skb to its peer's NAPI only if it could be
            // aggregated: not when the sender has TSO on (an XDP program on
            // the peer turns it off by itself).
            t.switch_ns()
                .ethtool_features(&t.lb_switch_port(), &[("tso", false)])?;
        }
        kit::threaded_napi_on(t.lb_ns(), &t.lb_iface(), self.lb_cpu)
    }

    fn steer_off(&self, sys: System) -> Result<()> {
        let t = &self.topo;
        let r = kit::threaded_napi_off(t.lb_ns(), &t.lb_iface());
        if !sys.is_xdp() {
            t.lb_ns()
                .ethtool_features(&t.lb_iface(), &[("gro", false)])?;
            t.switch_ns()
                .ethtool_features(&t.lb_switch_port(), &[("tso", true)])?;
        }
        r
    }

    /// The flood's frame for `sys`: to the IPv6 VIP for lb's IPv6 rows,
    /// to the IPv4 VIP for every other.
    fn udp_frame(&self, sys: System) -> Vec<u8> {
        let t = &self.topo;
        if let System::Lb6(_) = sys {
            return v6::udp_frame(t);
        }
        // nftables keeps a flow's NAT binding in its conntrack entry after
        // the rules are gone: each nftables system gets a flow of its own.
        let src_port = match sys {
            System::NftMasq => UDP_SRC_PORT + 1,
            _ => UDP_SRC_PORT,
        };
        let mut p = Ipv4Packet::udp(t.client_addr(), src_port, t.vip(), UDP_PORT);
        p.dst_mac = t.lb_mac();
        p.src_mac = t.client_mac();
        p.frag = 0;
        p.payload = vec![0x5a; FRAME_PAYLOAD];
        p.build()
    }

    /// One run: `warm` seconds, then a measured window of `secs`. Every
    /// counter is read without starting a process, by a SCHED_FIFO thread,
    /// so that the window is the same for all of them.
    fn udp_run(
        &self,
        sys: System,
        kind: GenKind,
        napi: &[i32],
        warm: f64,
        secs: f64,
    ) -> Result<UdpSample> {
        let t = &self.topo;
        let generator = self
            .generator
            .as_ref()
            .ok_or_else(|| anyhow!("generator not loaded"))?;
        let prog = generator.generator();
        let frame = self.udp_frame(sys);
        let (lb_if, port) = (t.lb_iface(), t.lb_switch_port());
        let ifindex = ifindex(t.switch_ns(), &port)?;
        let mut lb_dev = kit::NetDev::open(t.lb_ns())?;
        let mut sw_dev = kit::NetDev::open(t.switch_ns())?;
        let bound = (GEN_MAX_RATE * (warm + secs + 4.0)) as u32;
        let ctl = GenControl::new();
        let switch = t.switch_ns();
        let gen_cpu = self.gen_cpu;
        thread::scope(|s| -> Result<UdpSample> {
            let h = s.spawn(|| {
                switch.run(|| match kind {
                    GenKind::Live => kit::generate(prog, &frame, ifindex, gen_cpu, bound, &ctl),
                    GenKind::Packet => {
                        kit::packet_generate(&frame, ifindex, gen_cpu, u64::from(bound), &ctl)
                    }
                })
            });
            let measured = (|| {
                let _fifo = kit::FifoGuard::new(MEASURE_PRIORITY)?;
                let mut snap = || -> Result<Snapshot> {
                    Ok(Snapshot {
                        at: Instant::now(),
                        sink: self.sink.count()?,
                        napi_ns: napi
                            .iter()
                            .map(|&p| kit::task_cpu_ns(p))
                            .sum::<Result<_>>()?,
                        lb: lb_dev.read(&lb_if)?,
                        port: sw_dev.read(&port)?,
                        cpus: kit::cpu_ticks()?,
                    })
                };
                thread::sleep(Duration::from_secs_f64(warm));
                let a = snap()?;
                thread::sleep(Duration::from_secs_f64(secs));
                let b = snap()?;
                anyhow::Ok((a, b))
            })();
            let stopped = ctl.stop(Duration::from_secs(10));
            let outcome = h
                .join()
                .map_err(|_| anyhow!("the generator thread panicked"))???;
            stopped?;
            ensure!(
                !outcome.completed,
                "the generator reached its bound of {bound} frames before it was stopped"
            );
            let (a, b) = measured?;
            let dt = (b.at - a.at).as_secs_f64();
            let d = |f: fn(&Snapshot) -> u64| (f(&b) - f(&a)) as f64;
            // Handed to the next hop: taken by it (its NAPI processed them)
            // or refused (its ring full).
            let delivered = d(|s| s.lb.tx_packets);
            let lost = d(|s| s.lb.tx_dropped);
            let forwarded = delivered + lost;
            let sunk = d(|s| s.sink);
            ensure!(sunk > 0.0, "no frame reached the sink");
            let refused = d(|s| s.port.tx_dropped);
            let offered = d(|s| s.port.tx_packets) + refused;
            let napi_s = d(|s| s.napi_ns) / 1e9;
            let hz = kit::ticks_per_sec();
            let share = |c: usize| {
                b.cpus
                    .get(c)
                    .zip(a.cpus.get(c))
                    .map_or(0.0, |(x, y)| x.since(y).busy() as f64 / hz / dt)
            };
            Ok(UdpSample {
                pps: forwarded / dt,
                sink_pps: sunk / dt,
                lost: lost / forwarded.max(1.0),
                offered_pps: offered / dt,
                refused: refused / offered.max(1.0),
                cpu_per_m: napi_s / (forwarded.max(1.0) / 1e6),
                busy: napi_s / dt,
                lb_cpu_busy: share(self.lb_cpu),
                gen_cpu_busy: share(self.gen_cpu),
            })
        })
    }

    fn udp(&mut self, sys: System, kind: GenKind, runs: usize, secs: f64) -> Result<UdpResult> {
        let frame = self.udp_frame(sys);
        self.generator
            .as_mut()
            .ok_or_else(|| anyhow!("generator not loaded"))?
            .set_gen_template(&frame)?;
        self.start(sys, false)?;
        let r = (|| {
            let napi = self.steer_on(sys, kind)?;
            // Warm-up (discarded): caches, conntrack, the agent's MACs.
            self.udp_run(sys, kind, &napi, WARM_SECS, 0.3)?;
            (0..runs)
                .map(|_| self.udp_run(sys, kind, &napi, WARM_SECS, secs))
                .collect::<Result<Vec<_>>>()
        })();
        let off = self.steer_off(sys);
        let stopped = self.stop(sys);
        let samples = r?;
        off?;
        stopped?;
        Ok(UdpResult {
            sys,
            kind,
            frame_len: frame.len(),
            samples,
        })
    }

    // -- TCP -----------------------------------------------------------------

    fn wrk_run(&self, cfg: &Config, wrk: &Path, secs: u32) -> Result<TcpSample> {
        let t = &self.topo;
        let url = format!("http://{}:{TCP_PORT}/", t.vip());
        let k0 = kit::cpu_ticks()?;
        let args = [
            wrk.to_string_lossy().into_owned(),
            "-t".into(),
            cfg.wrk_threads.to_string(),
            "-c".into(),
            cfg.wrk_connections.to_string(),
            "-d".into(),
            format!("{secs}s"),
            "--timeout".into(),
            "2s".into(),
            "-H".into(),
            "Connection: close".into(),
            url,
        ];
        let out = t
            .client_ns()
            .exec_timeout(args, Duration::from_secs(u64::from(secs) + 20))
            .context("running wrk")?;
        let k1 = kit::cpu_ticks()?;
        let text = String::from_utf8_lossy(&out.stdout).into_owned();
        let rate = parse_wrk_rate(&text)
            .ok_or_else(|| anyhow!("no `Requests/sec` in wrk's output:\n{text}"))?;
        let requests = parse_wrk_requests(&text).unwrap_or(0);
        let busy: u64 = k1.iter().zip(&k0).map(|(a, b)| a.since(b).busy()).sum();
        Ok(TcpSample {
            conns_per_sec: rate,
            errors: parse_wrk_errors(&text),
            machine_cpu_per_k: busy as f64 / kit::ticks_per_sec() / (requests.max(1) as f64 / 1e3),
        })
    }

    fn tcp(&mut self, sys: System, cfg: &Config, wrk: &Path) -> Result<TcpResult> {
        self.start(sys, true)?;
        let r = (|| {
            // Warm-up (discarded).
            self.wrk_run(cfg, wrk, 1)?;
            (0..cfg.runs)
                .map(|_| self.wrk_run(cfg, wrk, cfg.tcp_secs))
                .collect::<Result<Vec<_>>>()
        })();
        let stopped = self.stop(sys);
        let samples = r?;
        stopped?;
        Ok(TcpResult { sys, samples })
    }
}

fn parse_wrk_rate(text: &str) -> Option<f64> {
    text.lines()
        .find_map(|l| l.trim().strip_prefix("Requests/sec:"))
        .and_then(|v| v.trim().parse().ok())
}

/// "N requests in 3.00s, …"
fn parse_wrk_requests(text: &str) -> Option<u64> {
    text.lines()
        .find(|l| l.contains(" requests in "))
        .and_then(|l| l.split_whitespace().next())
        .and_then(|n| n.parse().ok())
}

/// Socket errors (connect, read, write, timeout) and non-2xx responses.
fn parse_wrk_errors(text: &str) -> u64 {
    let mut n = 0;
    for l in text.lines().map(str::trim) {
        if let Some(rest) = l.strip_prefix("Socket errors:") {
            n += rest
                .split(',')
                .filter_map(|p| p.split_whitespace().last()?.parse::<u64>().ok())
                .sum::<u64>();
        } else if let Some(rest) = l.strip_prefix("Non-2xx or 3xx responses:") {
            n += rest.trim().parse::<u64>().unwrap_or(0);
        }
    }
    n
}

pub fn run(cfg: &Config, out_dir: &Path) -> Result<Section> {
    let tools = tools()?;
    // The calling thread is pinned to one CPU: what it starts (servers,
    // agent, HAProxy, wrk) must be free to use every CPU.
    let _wide = kit::AffinityGuard::widen()?;
    let cpus = kit::online_cpus();
    ensure!(
        cpus.len() >= 2,
        "the end-to-end benchmark needs 2 CPUs (generator and load balancer apart)"
    );
    let (gen_cpu, lb_cpu) = (cpus[0], cpus[cpus.len() - 1]);
    let mut bench = Bench::new(lb_cpu, gen_cpu, tools.haproxy.clone())?;

    let mut udp = Vec::new();
    bench.udp_phase_start()?;
    for (sys, kind) in UDP_CASES {
        let t = Instant::now();
        let r = bench
            .udp(sys, kind, cfg.runs, cfg.udp_secs)
            .with_context(|| format!("UDP through {} ({})", sys.label(), kind.label()))?;
        let s = r.stats(|s| s.pps / 1e6);
        println!(
            "lb-bench:   UDP {:<15} {:<12} {:>6.3} Mpps ({:.3}–{:.3}), receive path {:.0}% busy, \
             {:.3} CPU-s/Mpkt ({:.1} s)",
            sys.label(),
            kind.label(),
            s.median,
            s.min,
            s.max,
            r.stats(|s| s.busy).median * 100.0,
            r.stats(|s| s.cpu_per_m).median,
            t.elapsed().as_secs_f64()
        );
        udp.push(r);
    }
    bench.udp_phase_end()?;

    let mut tcp = Vec::new();
    for sys in TCP_ORDER {
        let t = Instant::now();
        let r = bench
            .tcp(sys, cfg, &tools.wrk)
            .with_context(|| format!("TCP through {}", sys.label()))?;
        let s = r.stats(|s| s.conns_per_sec);
        println!(
            "lb-bench:   TCP {:<20} {:>7.0} conn/s ({:.0}–{:.0}), {} errors ({:.1} s)",
            sys.label(),
            s.median,
            s.min,
            s.max,
            r.samples.iter().map(|s| s.errors).sum::<u64>(),
            t.elapsed().as_secs_f64()
        );
        tcp.push(r);
    }
    drop(bench);
    section::section(cfg, out_dir, &udp, &tcp, lb_cpu, gen_cpu)
}

#[cfg(test)]
mod tests {
    use super::*;

    const WRK: &str = "Running 1s test @ http://198.19.0.1:80/
  2 threads and 32 connections
  Thread Stats   Avg      Stdev     Max   +/- Stdev
    Latency     3.50ms    1.20ms  20.00ms   80.00%
    Req/Sec     4.00k   200.00     4.50k    70.00%
  8000 requests in 1.00s, 900.00KB read
  Socket errors: connect 0, read 5, write 0, timeout 2
  Non-2xx or 3xx responses: 3
Requests/sec:   7990.12
Transfer/sec:    900.00KB
";

    #[test]
    fn wrk_output() {
        assert_eq!(parse_wrk_rate(WRK), Some(7990.12));
        assert_eq!(parse_wrk_requests(WRK), Some(8000));
        assert_eq!(parse_wrk_errors(WRK), 10);
        assert_eq!(parse_wrk_errors("Requests/sec: 1.0\n"), 0);
    }

    #[test]
    fn generator_frame_is_60_bytes() {
        let mut p = Ipv4Packet::udp(
            Ipv4Addr::new(198, 18, 0, 1),
            UDP_SRC_PORT,
            Ipv4Addr::new(198, 19, 0, 1),
            UDP_PORT,
        );
        p.payload = vec![0; FRAME_PAYLOAD];
        assert_eq!(p.build().len(), 60);
    }
}
