//! `lb`: the agent (`lb run`) and the operator's CLI.

use std::{
    net::{IpAddr, SocketAddr},
    path::PathBuf,
    process::ExitCode,
};

use clap::{Parser, Subcommand};
use lb::{
    agent::{self, RunOptions},
    config::{Protocol, XdpModeSetting},
    control::{self, BackendView, ExplainView, Health, Request, StatsView, StatusView, VipView},
    timing,
};

#[derive(Parser)]
#[command(
    name = "lb",
    version,
    about = "An XDP L4 load balancer: Maglev, conntrack, direct server return"
)]
struct Cli {
    /// The agent's control socket (default: /run/lb/<instance>.sock).
    #[arg(long, global = true)]
    socket: Option<PathBuf>,
    /// The agent instance to talk to.
    #[arg(long, global = true, default_value = "default")]
    instance: String,
    #[command(subcommand)]
    cmd: Cmd,
}

#[derive(Subcommand)]
enum Cmd {
    /// Run the agent: load and attach the XDP program, keep the maps in
    /// step with the config and the health checks.
    Run {
        #[arg(long, default_value = "/etc/lb/lb.toml")]
        config: PathBuf,
        /// Interface to attach to (repeatable); overrides the config's list.
        #[arg(long = "iface")]
        ifaces: Vec<String>,
        #[arg(long, value_enum)]
        xdp_mode: Option<XdpModeArg>,
        /// On exit, leave the program attached and the maps pinned so the
        /// next agent takes over without disturbing traffic.
        #[arg(long)]
        keep_datapath: bool,
        /// Before starting, detach and remove the state pinned for this
        /// instance (links, maps): needed when it was made with another
        /// layout (other sizes or lb version). Established flows are lost.
        #[arg(long)]
        reset_datapath: bool,
        /// Read and validate the config, print what would be loaded (maps
        /// with their bytes and the total, VIPs) and exit: no root, nothing
        /// loaded, attached or pinned.
        #[arg(long, conflicts_with_all = ["keep_datapath", "reset_datapath"])]
        dry_run: bool,
    },
    /// Validate a config file as `lb run` would, without root or a kernel:
    /// exit 0 with a summary, or non-zero with the located error.
    Check {
        #[arg(long, default_value = "/etc/lb/lb.toml")]
        config: PathBuf,
    },
    /// The configuration file.
    Config {
        #[command(subcommand)]
        cmd: ConfigCmd,
    },
    /// The agent's state: interfaces, VIPs, backends up.
    Status {
        #[arg(long)]
        json: bool,
    },
    /// VIPs: list, withdraw and announce (the route of their address).
    Vip {
        #[command(subcommand)]
        cmd: VipCmd,
    },
    /// The whole host: drain (withdraw every VIP route) and undrain.
    Host {
        #[command(subcommand)]
        cmd: HostCmd,
    },
    /// Backends: list, add, remove, drain, undrain, set-weight.
    Backend {
        #[command(subcommand)]
        cmd: BackendCmd,
    },
    /// Traffic per VIP and backend, drops by reason.
    Stats {
        /// Refresh every second.
        #[arg(long)]
        watch: bool,
        /// With --watch: stop after this many refreshes.
        #[arg(long)]
        count: Option<u32>,
        #[arg(long)]
        json: bool,
    },
    /// Which backend a flow goes to now, and why.
    Explain {
        /// Client address and port, e.g. 198.18.0.1:40000 or [2001:2::1]:40000
        src: SocketAddr,
        /// VIP address and port, e.g. 198.19.0.1:80 or [2001:2:0:100::1]:80
        dst: SocketAddr,
        /// tcp or udp
        proto: Protocol,
        #[arg(long)]
        json: bool,
    },
    /// Re-read the config file (like SIGHUP). A bad file changes nothing;
    /// CLI changes to backends the file left as it was stay in force.
    Reload,
    /// CLI changes in force on top of the config file (listed by `lb status`).
    Override {
        #[command(subcommand)]
        cmd: OverrideCmd,
    },
    /// On a backend behind encapsulating load balancers: strip IPIP/GUE
    /// from allowed sources in XDP (no tunnel modules, no agent needed).
    Decap {
        #[command(subcommand)]
        cmd: DecapCmd,
    },
}

#[derive(Subcommand)]
enum ConfigCmd {
    /// The effective configuration, every default filled in, as TOML
    /// (accepted by `lb check`).
    Show {
        #[arg(long, default_value = "/etc/lb/lb.toml")]
        config: PathBuf,
    },
}

#[derive(Subcommand)]
enum DecapCmd {
    /// Load and attach lb-decap (pinned, stays after the command exits);
    /// on an interface it serves already, update its allow-list and GUE
    /// port in place.
    Attach {
        #[arg(long)]
        iface: String,
        /// Outer source prefix allowed to send tunnel packets (repeatable,
        /// at least one): the load balancers' addresses.
        #[arg(long = "allow-source", value_name = "CIDR")]
        allow_source: Vec<String>,
        /// UDP destination port of GUE packets.
        #[arg(long, default_value_t = lb_common::decap::DEFAULT_GUE_PORT)]
        gue_port: u16,
        #[arg(long, value_enum, default_value = "auto")]
        xdp_mode: lb::decap::cli::DecapXdpMode,
    },
    /// Detach lb-decap and remove its pins.
    Detach {
        #[arg(long)]
        iface: String,
    },
    /// Interfaces served by lb-decap: allow-list, GUE port, counters.
    Status {
        #[arg(long)]
        iface: Option<String>,
        #[arg(long)]
        json: bool,
    },
}

#[derive(Subcommand)]
enum OverrideCmd {
    /// Drop CLI changes so the file's settings apply again: all of them,
    /// a VIP's, or one backend's.
    Clear {
        vip: Option<String>,
        address: Option<IpAddr>,
    },
}

#[derive(Subcommand)]
enum VipCmd {
    List {
        #[arg(long)]
        json: bool,
    },
    /// Withdraw the route of the VIP's address from the announce table
    /// (kept while another ready VIP shares the address). Traffic that
    /// still arrives is served.
    Withdraw {
        /// Name or ADDR:PORT/PROTO.
        vip: String,
    },
    /// Undo `lb vip withdraw`: the address is announced while the VIP is
    /// ready.
    Announce {
        /// Name or ADDR:PORT/PROTO.
        vip: String,
    },
}

#[derive(Subcommand)]
enum HostCmd {
    /// Withdraw every VIP route of this host (shown by `lb status`); the
    /// data path keeps serving what still arrives.
    Drain,
    /// Undo `lb host drain`: ready VIPs are announced again.
    Undrain,
}

#[derive(Subcommand)]
enum BackendCmd {
    List {
        /// Only this VIP (name or ADDR:PORT/PROTO).
        #[arg(long)]
        vip: Option<String>,
        #[arg(long)]
        json: bool,
    },
    Add {
        vip: String,
        address: IpAddr,
        #[arg(long, default_value_t = 1)]
        weight: u32,
    },
    Remove {
        vip: String,
        address: IpAddr,
    },
    /// No new flows; established ones stay.
    Drain {
        vip: String,
        address: IpAddr,
    },
    Undrain {
        vip: String,
        address: IpAddr,
    },
    SetWeight {
        vip: String,
        address: IpAddr,
        weight: u32,
    },
}

#[derive(Clone, Copy, clap::ValueEnum)]
enum XdpModeArg {
    Auto,
    Native,
    Skb,
}

fn main() -> ExitCode {
    env_logger::Builder::from_env(env_logger::Env::default().default_filter_or("info"))
        .format_timestamp_millis()
        .init();
    let cli = Cli::parse();
    if !matches!(cli.cmd, Cmd::Run { dry_run: false, .. }) {
        // The CLI ends quietly when its reader goes away (`lb ... | head`),
        // like any Unix filter; the agent keeps SIGPIPE ignored. Writes to
        // the control socket use MSG_NOSIGNAL and report errors instead.
        // SAFETY: no other thread runs yet; SIG_DFL is a valid disposition.
        unsafe { libc::signal(libc::SIGPIPE, libc::SIG_DFL) };
    }
    match real_main(cli) {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("lb: {e:#}");
            ExitCode::FAILURE
        }
    }
}

fn real_main(cli: Cli) -> anyhow::Result<()> {
    let socket = cli
        .socket
        .clone()
        .unwrap_or_else(|| PathBuf::from(format!("/run/lb/{}.sock", cli.instance)));
    let call = |req: Request| control::call(&socket, &req, timing::CONTROL_CALL_TIMEOUT);
    match cli.cmd {
        Cmd::Decap { cmd } => {
            let out = match cmd {
                DecapCmd::Attach {
                    iface,
                    allow_source,
                    gue_port,
                    xdp_mode,
                } => lb::decap::cli::attach(&iface, &allow_source, gue_port, xdp_mode)?,
                DecapCmd::Detach { iface } => lb::decap::cli::detach(&iface)?,
                DecapCmd::Status { iface, json } => lb::decap::cli::status(iface.as_deref(), json)?,
            };
            println!("{out}");
        }
        Cmd::Run {
            config,
            ifaces,
            xdp_mode,
            keep_datapath: _,
            reset_datapath: _,
            dry_run: true,
        } => {
            // What `lb run` reads before touching the kernel: the same
            // parsing and validation, the same sizes.
            let mut cfg = lb::config::Config::load(&config)?;
            if let Some(m) = xdp_mode {
                cfg.agent.start.xdp_mode = xdp_setting(m);
            }
            println!("{}", lb::config_tool::dry_run(&cfg, &ifaces)?);
        }
        Cmd::Check { config } => {
            let cfg = lb::config::Config::load(&config)?;
            println!("{}", lb::config_tool::summary(&cfg)?);
        }
        Cmd::Config {
            cmd: ConfigCmd::Show { config },
        } => {
            let cfg = lb::config::Config::load(&config)?;
            print!("{}", lb::config::render_toml(&cfg));
        }
        Cmd::Run {
            config,
            ifaces,
            xdp_mode,
            keep_datapath,
            reset_datapath,
            dry_run: false,
        } => {
            let rt = tokio::runtime::Builder::new_multi_thread()
                .worker_threads(2)
                .enable_all()
                .build()?;
            rt.block_on(agent::run(RunOptions {
                config,
                interfaces: ifaces,
                xdp_mode: xdp_mode.map(xdp_setting),
                keep_datapath,
                reset_datapath,
            }))?;
        }
        Cmd::Status { json } => {
            let v = call(Request::Status)?;
            if json {
                return print_json(&v);
            }
            let s: StatusView = serde_json::from_value(v)?;
            println!(
                "instance   {} (pid {}, up {}s, version {})",
                s.instance, s.pid, s.uptime_s, s.version
            );
            println!("config     {}", s.config);
            println!(
                "datapath   {}{}",
                s.pin_dir,
                if s.restored {
                    " (taken over from an earlier agent)"
                } else {
                    ""
                }
            );
            for i in &s.interfaces {
                println!("interface  {} (ifindex {}, {})", i.name, i.ifindex, i.mode);
            }
            println!("vips       {}", s.vips);
            println!("backends   {} ({} up)", s.backends, s.backends_up);
            if let Some(m) = s.metrics {
                println!("metrics    http://{m}/metrics");
            }
            for o in &s.overrides {
                println!("override   {} of {}: {}", o.address, o.vip, o.change);
            }
            if !s.overrides.is_empty() {
                println!("           (kept by `lb reload`; `lb override clear` drops them)");
            }
            match &s.announce {
                None => println!("announce   off"),
                Some(a) => {
                    println!(
                        "announce   table {} proto {} dev {}: {}",
                        a.table,
                        a.protocol,
                        a.device,
                        if a.host_drained {
                            "host drained, every route withdrawn (`lb host undrain`)".to_string()
                        } else {
                            format!("{} address(es) announced", a.announced.len())
                        }
                    );
                    for addr in &a.announced {
                        println!("           {addr}");
                    }
                    if !a.withdrawn.is_empty() {
                        println!("withdrawn  {}", a.withdrawn.join(", "));
                    }
                    if let Some(e) = &a.error {
                        println!("           failing: {e}");
                    }
                }
            }
        }
        Cmd::Vip {
            cmd: VipCmd::Withdraw { vip },
        } => print_msg(call(Request::VipWithdraw { vip })?),
        Cmd::Vip {
            cmd: VipCmd::Announce { vip },
        } => print_msg(call(Request::VipAnnounce { vip })?),
        Cmd::Host { cmd } => print_msg(call(match cmd {
            HostCmd::Drain => Request::HostDrain,
            HostCmd::Undrain => Request::HostUndrain,
        })?),
        Cmd::Vip {
            cmd: VipCmd::List { json },
        } => {
            let v = call(Request::VipList)?;
            if json {
                return print_json(&v);
            }
            let vips: Vec<VipView> = serde_json::from_value(v)?;
            println!(
                "{:<16} {:<22} {:<10} {:<20} {:>5} {:>8} {:>8} {:>8} {:<9}  CHECK",
                "NAME",
                "VIP",
                "FORWARDING",
                "SCHEDULER",
                "INDEX",
                "RING",
                "BACKENDS",
                "IN RING",
                "ANNOUNCED"
            );
            for v in vips {
                // NAT VIPs: what their flows' source becomes.
                let snat = match (v.forwarding, v.snat_addresses.as_slice()) {
                    (lb::config::Forwarding::Nat, []) => "  snat: route source".to_string(),
                    (lb::config::Forwarding::Nat, list) => format!(
                        "  snat: {}",
                        list.iter()
                            .map(|a| a.to_string())
                            .collect::<Vec<_>>()
                            .join(",")
                    ),
                    _ => String::new(),
                };
                // Source access control: the lists' sizes.
                let acl = if v.acl_allow + v.acl_deny == 0 {
                    String::new()
                } else {
                    format!("  acl: allow {}, deny {}", v.acl_allow, v.acl_deny)
                };
                // Rate limits, per second.
                let limits = [
                    ("new/source", v.rate_limit.new_per_source),
                    ("packets/source", v.rate_limit.packets_per_source),
                    ("new", v.rate_limit.new_per_vip),
                ]
                .iter()
                .filter(|(_, r)| *r != 0)
                .map(|(what, r)| format!("{what} {r}/s"))
                .collect::<Vec<_>>();
                let limits = if limits.is_empty() {
                    String::new()
                } else {
                    format!("  limits: {}", limits.join(", "))
                };
                // Announcement: yes/no, and why unless plainly ready.
                let (shown, why) = match (v.announced, v.announce.as_str()) {
                    (_, w) if w.starts_with("off") => ("-", String::new()),
                    (true, "ready") => ("yes", String::new()),
                    (true, w) => ("yes", format!("  announce: {w}")),
                    (false, w) => ("no", format!("  announce: {w}")),
                };
                println!(
                    "{:<16} {:<22} {:<10} {:<20} {:>5} {:>8} {:>8} {:>8} {:<9}  {}{snat}{acl}{limits}{why}",
                    v.name,
                    format!(
                        "{}/{}",
                        SocketAddr::new(v.address, v.port),
                        v.protocol.as_str()
                    ),
                    v.forwarding.as_str(),
                    v.scheduler.as_str(),
                    v.index,
                    v.ring_size,
                    v.backends,
                    v.backends_in_ring,
                    shown,
                    v.health_check
                );
            }
        }
        Cmd::Backend { cmd } => match cmd {
            BackendCmd::List { vip, json } => {
                let v = call(Request::BackendList { vip })?;
                if json {
                    return print_json(&v);
                }
                let list: Vec<BackendView> = serde_json::from_value(v)?;
                println!(
                    "{:<12} {:<15} {:>4} {:>6} {:<7} {:<10} {:>6} {:>8} {:>6}  {:<17}  {:<15}  LAST CHECK (UNRESOLVED: WHY)",
                    "VIP",
                    "BACKEND",
                    "ID",
                    "WEIGHT",
                    "STATE",
                    "HEALTH",
                    "SLOTS",
                    "FLOWS",
                    "ACTIVE",
                    "MAC",
                    "VIA"
                );
                for b in list {
                    // A NAT backend with its port.
                    let address = match b.port {
                        Some(p) => SocketAddr::new(b.address, p).to_string(),
                        None => b.address.to_string(),
                    };
                    println!(
                        "{:<12} {:<15} {:>4} {:>6} {:<7} {:<10} {:>6} {:>8} {:>6}  {:<17}  {:<15}  {}",
                        b.vip,
                        address,
                        b.id,
                        b.weight,
                        b.state,
                        b.health,
                        b.slots,
                        b.flows.map_or_else(|| "-".into(), |n| n.to_string()),
                        // Least connections: the count it compares.
                        b.active_connections
                            .map_or_else(|| "-".into(), |n| n.to_string()),
                        b.mac.unwrap_or_else(|| "-".into()),
                        // The gateway whose MAC that is, for a routed one.
                        b.gateway.map_or_else(|| "-".into(), |g| g.to_string()),
                        // An unresolved backend: why, rather than its checks.
                        match (b.health, b.next_hop_error) {
                            (Health::Unresolved, Some(e)) => e,
                            _ => b.last_check.unwrap_or_else(|| "-".into()),
                        }
                    );
                }
            }
            BackendCmd::Add {
                vip,
                address,
                weight,
            } => print_msg(call(Request::BackendAdd {
                vip,
                address,
                weight,
            })?),
            BackendCmd::Remove { vip, address } => {
                print_msg(call(Request::BackendRemove { vip, address })?)
            }
            BackendCmd::Drain { vip, address } => {
                print_msg(call(Request::BackendDrain { vip, address })?)
            }
            BackendCmd::Undrain { vip, address } => {
                print_msg(call(Request::BackendUndrain { vip, address })?)
            }
            BackendCmd::SetWeight {
                vip,
                address,
                weight,
            } => print_msg(call(Request::BackendSetWeight {
                vip,
                address,
                weight,
            })?),
        },
        Cmd::Stats { watch, count, json } => {
            let mut n = 0u32;
            loop {
                let v = call(Request::Stats)?;
                if json {
                    println!("{}", serde_json::to_string(&v)?);
                } else {
                    print_stats(&serde_json::from_value(v)?);
                }
                n += 1;
                if !watch || count.is_some_and(|c| n >= c) {
                    break;
                }
                std::thread::sleep(timing::STATS_WATCH_PERIOD);
                if !json {
                    println!();
                }
            }
        }
        Cmd::Explain {
            src,
            dst,
            proto,
            json,
        } => {
            let v = call(Request::Explain {
                src,
                dst,
                protocol: proto,
            })?;
            if json {
                return print_json(&v);
            }
            let e: ExplainView = serde_json::from_value(v)?;
            let show = |a: Option<IpAddr>| a.map_or("-".to_string(), |a| a.to_string());
            println!(
                "flow       {src} -> {dst}/{} (VIP {})",
                proto.as_str(),
                e.vip
            );
            println!("hash       {:#010x}", e.hash);
            println!(
                "ring slot  {} of {} -> {}",
                e.slot,
                e.ring_size,
                show(e.ring_backend)
            );
            println!("conntrack  {}", show(e.conntrack_backend));
            if let Some(a) = &e.acl {
                let verdict = if a.allowed { "allowed" } else { "denied" };
                println!("acl        source {verdict} by {}", a.by);
            }
            println!("backend    {} ({})", show(e.backend), e.reason);
            println!("scheduler  {}", e.scheduler);
            if let Some(s) = &e.scheduler_state {
                println!("           {s}");
            }
            if let Some(o) = e.outer {
                let ports = match (o.src_port, o.dst_port) {
                    (Some(s), Some(d)) => format!(", UDP {s} -> {d}"),
                    _ => String::new(),
                };
                let proto = o.protocol(dst.is_ipv6());
                println!("outer      {} -> {} ({proto}{ports})", o.src, o.dst);
            }
            if let Some(n) = e.nat {
                let show_sock =
                    |a: Option<SocketAddr>| a.map_or("-".to_string(), |a| a.to_string());
                println!("nat to     {}", show_sock(n.backend));
                match (n.snat, n.snat_address) {
                    (Some(s), _) => println!("snat       {s} (NAT_FWD entry)"),
                    (None, Some(a)) => {
                        println!("snat       {a}, SNAT port allocated by the first packet")
                    }
                    (None, None) => println!(
                        "snat       the backend's route source (not resolved), SNAT port allocated by the first packet"
                    ),
                }
                match n.reverse {
                    Some(r) => println!(
                        "reverse    {} -> {} => {} -> {} (NAT_REV entry, out ifindex {})",
                        r.from, r.to, r.vip, r.client, r.ifindex
                    ),
                    None if n.snat.is_some() => println!("reverse    - (no NAT_REV entry)"),
                    None => {}
                }
            }
        }
        Cmd::Reload => print_msg(call(Request::Reload)?),
        Cmd::Override {
            cmd: OverrideCmd::Clear { vip, address },
        } => print_msg(call(Request::OverrideClear { vip, address })?),
    }
    Ok(())
}

fn xdp_setting(m: XdpModeArg) -> XdpModeSetting {
    match m {
        XdpModeArg::Auto => XdpModeSetting::Auto,
        XdpModeArg::Native => XdpModeSetting::Native,
        XdpModeArg::Skb => XdpModeSetting::Skb,
    }
}

fn print_json(v: &serde_json::Value) -> anyhow::Result<()> {
    println!("{}", serde_json::to_string_pretty(v)?);
    Ok(())
}

fn print_msg(v: serde_json::Value) {
    match v {
        serde_json::Value::String(s) => println!("{s}"),
        other => println!("{other}"),
    }
}

fn human(x: f64) -> String {
    match x {
        x if x >= 1e9 => format!("{:.2}G", x / 1e9),
        x if x >= 1e6 => format!("{:.2}M", x / 1e6),
        x if x >= 1e3 => format!("{:.1}k", x / 1e3),
        x => format!("{x:.0}"),
    }
}

fn print_stats(s: &StatsView) {
    println!(
        "{:<14} {:>10} {:>10} {:>10} {:>12} {:>10} {:>12} {:>12} {:>12}",
        "VIP",
        "PKT/S",
        "BIT/S",
        "FLOWS/S",
        "PACKETS",
        "CT HIT %",
        "RETURNED",
        "ACL DENIED",
        "RATE-LIMITED"
    );
    for v in &s.vips {
        println!(
            "{:<14} {:>10} {:>10} {:>10} {:>12} {:>9.1}% {:>12} {:>12} {:>12}",
            v.vip,
            human(v.traffic.pps),
            human(v.traffic.bps),
            human(v.new_flows_ps),
            v.traffic.packets,
            100.0 * v.conntrack_hit_ratio,
            // NAT replies translated back to clients.
            v.return_packets,
            v.acl_denied,
            v.rate_limited
        );
    }
    if let Some(n) = s.nat_entries {
        println!("nat flows  {n}");
    }
    if !s.limited_sources.is_empty() {
        println!(
            "{:<14} {:<40} {:<8} {:>12} {:>12}",
            "VIP", "LIMITED SOURCE", "LIMIT", "DROPPED", "PASSED"
        );
        for l in &s.limited_sources {
            println!(
                "{:<14} {:<40} {:<8} {:>12} {:>12}",
                l.vip, l.source, l.limit, l.dropped, l.passed
            );
        }
    }
    println!(
        "{:<14} {:<15} {:<10} {:>10} {:>10} {:>12}",
        "VIP", "BACKEND", "HEALTH", "PKT/S", "BIT/S", "PACKETS"
    );
    for b in &s.backends {
        println!(
            "{:<14} {:<15} {:<10} {:>10} {:>10} {:>12}",
            b.vip,
            b.address,
            b.health,
            human(b.traffic.pps),
            human(b.traffic.bps),
            b.traffic.packets
        );
    }
    let moved: Vec<String> = s
        .reasons
        .iter()
        .filter(|(_, (t, _))| *t > 0)
        .map(|(k, (t, r))| format!("{k}={t} ({}/s)", human(*r)))
        .collect();
    println!(
        "pass/drop  {}",
        if moved.is_empty() {
            "none".to_string()
        } else {
            moved.join("  ")
        }
    );
}
