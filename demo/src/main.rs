//! lb-demo: the load balancer at work, run by `cargo xtask demo` (as root).
//!
//! Builds a topology in network namespaces (a client, lb, three backends on
//! one bridge), starts an HTTP server on every backend and the real `lb run`
//! agent with a generated config (one VIP, HTTP health checks), then drives
//! real HTTP requests from the client for 30 seconds and prints, every
//! second, the requests each backend answered and its health as
//! `lb backend list` reports it:
//!
//! - 0–10 s: all backends up; each must take a fair share;
//! - at 10 s backend-1's server is killed: once lb marks it down (bounded
//!   wait) it gets nothing more and no request fails;
//! - at 20 s it is restarted: once lb marks it up (bounded wait) it takes
//!   its share again, and no request fails;
//! - established flows survive the rejoin: keep-alive connections opened
//!   at 15 s (on the others) are still answered by their backend at 28 s,
//!   also those the new ring gives the victim (held.rs).
//!
//! `--forwarding ipip|gue` tells the same story through routed backends:
//! they sit in another subnet behind a router, lb encapsulates to them and
//! each strips the tunnel with `lb decap` (see net.rs). `--ipv6` tells it
//! with an IPv6 VIP and IPv6 backends (2001:2::/48), in any forwarding
//! mode: 6in6 for `ipip`, GUE over IPv6 for `gue` (the routed topology built dual-stack).
//! `--forwarding nat` tells it with unmodified backends behind the router:
//! lb translates both directions (full NAT).
//!
//! Exit status: 0 when every check held, 1 when one did not or on an error,
//! 2 on a bad argument, 130 when interrupted. Everything (agent, servers, namespaces, pins) is
//! removed by RAII guards, also on errors and panics; `LB_BIN` and
//! `LB_TEST_SERVER` name the binaries (set by `cargo xtask demo`).

use std::{
    net::{IpAddr, SocketAddr},
    process::ExitCode,
    sync::{
        atomic::{AtomicBool, Ordering},
        mpsc,
    },
    thread,
    time::{Duration, Instant},
};

use anyhow::{Context as _, Result, bail};
use lb_tests::{
    agent::{AgentPaths, LbAgent, VipSpec, render_config},
    netns::{ChildGuard, Netns, namespaces_still_present},
    servers::{backend_name, http_get},
};
use net::{Forwarding, Net};

mod held;
mod net;
mod scale_out;
mod summary;

use summary::{Check, summary};

const PORT: u16 = 80;
const BACKENDS: usize = 3;
/// The backend whose server is stopped and restarted.
const VICTIM: usize = 1;
/// Load runs from 0 to RUN; the victim's server is killed at STOP_AT and
/// restarted at RESTART_AT.
const RUN: Duration = Duration::from_secs(30);
const STOP_AT: Duration = Duration::from_secs(10);
const RESTART_AT: Duration = Duration::from_secs(20);
/// Bound for lb to notice a stopped or restarted server.
const NOTICE_BOUND: Duration = Duration::from_secs(5);
/// How often `lb backend list` is polled while a transition is awaited.
const POLL: Duration = Duration::from_millis(100);
/// Client threads, each sending one request per PERIOD (paced).
const WORKERS: usize = 4;
const PERIOD: Duration = Duration::from_millis(20);
/// Leaves room for TCP's own recovery from a packet lost on a busy
/// machine (SYN retransmissions after 1 s and 3 s): a flow lb steers
/// wrongly fails for good, a refused connection at once.
const REQUEST_TIMEOUT: Duration = Duration::from_secs(5);
/// `lb stats` is captured at this moment, under load, and printed at the end.
const STATS_AT: Duration = Duration::from_secs(29);
/// Keep-alive connections are opened during failover and asked again
/// after the rejoin (held.rs).
const HOLD_AT: Duration = Duration::from_secs(15);
const RECHECK_AT: Duration = Duration::from_secs(28);

const HC_INTERVAL_MS: u32 = 500;
const HC_TIMEOUT_MS: u32 = 300;
const HC_RISE: u32 = 2;
const HC_FALL: u32 = 2;

/// Thresholds of the checks. With three equal backends Maglev gives each
/// about 33 % of new flows, two of them about 50 % each.
const MIN_SHARE_ALL_UP: f64 = 15.0;
const MIN_SHARE_FAILOVER: f64 = 30.0;
const MIN_SHARE_REJOINED: f64 = 10.0;
/// A phase with fewer requests than this proves nothing.
const MIN_REQUESTS: usize = 100;

static INTERRUPTED: AtomicBool = AtomicBool::new(false);

extern "C" fn on_signal(_: libc::c_int) {
    INTERRUPTED.store(true, Ordering::SeqCst);
}

fn interrupted() -> bool {
    INTERRUPTED.load(Ordering::SeqCst)
}

fn main() -> ExitCode {
    // Ctrl-C / SIGTERM: stop early, but still tear everything down.
    // SAFETY: the handler only stores to an atomic.
    let handler: extern "C" fn(libc::c_int) = on_signal;
    unsafe {
        libc::signal(libc::SIGINT, handler as libc::sighandler_t);
        libc::signal(libc::SIGTERM, handler as libc::sighandler_t);
    }
    let (forwarding, ipv6, scale) = match parse_args(std::env::args().skip(1)) {
        Ok(a) => a,
        Err(e) => {
            println!("lb-demo: {e}");
            println!("usage: lb-demo [--forwarding dsr-l2|ipip|gue|nat] [--ipv6] | --scale-out");
            return ExitCode::from(2);
        }
    };
    let result = if scale {
        // SAFETY: geteuid has no preconditions.
        if unsafe { libc::geteuid() } != 0 {
            Err(anyhow::anyhow!(
                "the demo creates network namespaces and loads XDP programs: run it as root"
            ))
        } else {
            scale_out::scale_out()
        }
    } else {
        demo(forwarding, ipv6)
    };
    if interrupted() {
        println!("lb-demo: interrupted; everything was torn down");
        return ExitCode::from(130);
    }
    match result {
        Ok(true) => {
            println!("lb-demo: PASSED (exit 0)");
            ExitCode::SUCCESS
        }
        Ok(false) => {
            println!("lb-demo: FAILED (exit 1)");
            ExitCode::from(1)
        }
        Err(e) => {
            println!("lb-demo: ERROR (exit 1): {e:#}");
            ExitCode::from(1)
        }
    }
}

/// `[--forwarding MODE] [--ipv6]`, in any order, each at most once, or
/// `--scale-out` alone.
fn parse_args(args: impl Iterator<Item = String>) -> Result<(Forwarding, bool, bool), String> {
    let (mut forwarding, mut ipv6, mut scale) = (None, false, false);
    let mut args = args.peekable();
    while let Some(a) = args.next() {
        match a.as_str() {
            "--forwarding" if forwarding.is_none() => {
                let mode = args.next().ok_or("--forwarding needs a value")?;
                forwarding = Some(Forwarding::parse(&mode).ok_or_else(|| {
                    format!("--forwarding {mode:?}: expected dsr-l2, ipip, gue or nat")
                })?);
            }
            "--ipv6" if !ipv6 => ipv6 = true,
            "--scale-out" if !scale => scale = true,
            "--forwarding" | "--ipv6" | "--scale-out" => {
                return Err(format!("{a} given twice"));
            }
            _ => return Err(format!("unexpected argument {a:?}")),
        }
    }
    if scale && (forwarding.is_some() || ipv6) {
        return Err("--scale-out tells its own story: no --forwarding or --ipv6 with it".into());
    }
    Ok((forwarding.unwrap_or(Forwarding::DsrL2), ipv6, scale))
}

// ---------------------------------------------------------------------------
// The run
// ---------------------------------------------------------------------------

/// One request of the load: when it started and ended (since the load
/// began) and which backend answered.
struct Sample {
    start: Duration,
    end: Duration,
    outcome: Result<usize, String>,
}

/// What `lb backend list` says about one backend.
#[derive(Clone, Default)]
struct Health {
    health: String,
    slots: u64,
    last_check: String,
}

/// When things happened, relative to the start of the load. `down`/`up`
/// are the moments `lb backend list` was first seen to report them.
#[derive(Default)]
struct Timeline {
    stopped: Option<Duration>,
    down: Option<Duration>,
    restarted: Option<Duration>,
    up: Option<Duration>,
}

const PHASES: [&str; 5] = [
    "all up",
    "backend-1 stopped",
    "failover",
    "backend-1 restarted",
    "rejoined",
];

impl Timeline {
    /// The phase a request belongs to (index into PHASES): "all up" if it
    /// ended before the server was stopped; "stopped" if it overlapped the
    /// stop and started before lb reported the backend down; after that by
    /// its start.
    fn phase_of(&self, s: &Sample) -> usize {
        let stopped = self.stopped.unwrap_or(Duration::MAX);
        if s.end < stopped {
            return 0;
        }
        let restarted = self.restarted.unwrap_or(Duration::MAX);
        if s.start < self.down.unwrap_or(restarted).min(restarted) {
            return 1;
        }
        if s.start < restarted {
            return 2;
        }
        if s.start < self.up.unwrap_or(Duration::MAX) {
            return 3;
        }
        4
    }

    /// The phase at time `t` (for the live table).
    fn phase_at(&self, t: Duration) -> usize {
        let reached = |e: Option<Duration>| e.is_some_and(|e| e <= t);
        if reached(self.up) {
            4
        } else if reached(self.restarted) {
            3
        } else if reached(self.down) {
            2
        } else if reached(self.stopped) {
            1
        } else {
            0
        }
    }

    /// (from, to) of each phase, for the summary.
    fn bounds(&self, end: Duration) -> [(Option<Duration>, Option<Duration>); 5] {
        let down = self.down.or(self.restarted);
        [
            (Some(Duration::ZERO), self.stopped),
            (self.stopped, down),
            (self.down, self.restarted),
            (self.restarted, self.up.or(Some(end))),
            (self.up, self.up.map(|_| end)),
        ]
    }
}

fn demo(forwarding: Forwarding, ipv6: bool) -> Result<bool> {
    // SAFETY: geteuid has no preconditions.
    if unsafe { libc::geteuid() } != 0 {
        bail!("the demo creates network namespaces and loads XDP programs: run it as root");
    }
    println!("lb demo: an XDP load balancer at work, in network namespaces");
    println!();

    // Locals drop in reverse order: the agent, then the servers, then the
    // namespaces, also on every early return.
    let setup_started = Instant::now();
    let topo = Net::build(forwarding, ipv6, BACKENDS).context("building the topology")?;
    let mut servers: Vec<Option<ChildGuard>> = (0..BACKENDS)
        .map(|i| topo.spawn_http(i, PORT).map(Some))
        .collect::<Result<_>>()
        .context("starting the HTTP servers")?;
    let addrs: Vec<IpAddr> = (0..BACKENDS).map(|i| topo.backend_addr(i)).collect();
    let mut vip = VipSpec::tcp("web", topo.vip(), PORT, &addrs);
    vip.forwarding = forwarding.as_str();
    vip.health_check = format!(
        "kind = \"http\"\npath = \"/\"\ninterval_ms = {HC_INTERVAL_MS}\ntimeout_ms = {HC_TIMEOUT_MS}\nrise = {HC_RISE}\nfall = {HC_FALL}"
    );
    let paths = AgentPaths::new()?;
    let config = render_config(&paths.instance, &paths.socket, &topo.lb_iface(), &[vip]);
    let mut agent =
        LbAgent::start_with(topo.lb_ns(), paths, &config, &[]).context("starting `lb run`")?;
    wait_all_up(&agent, &addrs)?;
    let mode = xdp_mode(&agent).unwrap_or_else(|_| "?".into());
    let vip_addr = SocketAddr::new(topo.vip(), PORT);
    intro(&topo, forwarding, &mode, setup_started.elapsed());

    if interrupted() {
        return Ok(false);
    }
    let (samples, timeline, transitions, stats_text) =
        drive(&topo, &agent, &mut servers, &addrs, vip_addr)?;
    if interrupted() {
        return Ok(false);
    }

    let mut checks = summary(&samples, &timeline, RUN, transitions);

    // The kernel's own count: every answered request was a new flow that
    // lb's XDP program steered (lb's kernel does not forward by itself).
    let stats = agent.json(&["stats"])?;
    let new_flows = stats["vips"][0]["new_flows"].as_u64().unwrap_or(0);
    let served = samples.iter().filter(|s| s.outcome.is_ok()).count();
    checks.push(Check::new(
        new_flows >= served as u64,
        format!("lb's XDP program counted a new flow for each answered request ({new_flows} flows, {served} answers)"),
    ));

    println!();
    println!("checks:");
    for c in &checks {
        println!("  {}  {}", if c.ok { "PASS" } else { "FAIL" }, c.what);
    }
    println!();
    println!("`lb stats` at {} s, under load:", STATS_AT.as_secs());
    for l in stats_text.lines() {
        println!("  {l}");
    }

    // Teardown, explicitly so it can be reported (the guards would do the
    // same on any early return).
    let names = topo.namespace_names();
    let torn = Instant::now();
    let log = agent.stop();
    drop(agent);
    drop(servers);
    drop(topo);
    let left = namespaces_still_present(&names)?;
    println!();
    let passed = checks.iter().filter(|c| c.ok).count();
    let all_ok = passed == checks.len() && left.is_empty() && log.is_ok();
    match &log {
        Ok(_) => {}
        Err(e) => println!("lb run did not stop cleanly: {e:#}"),
    }
    if left.is_empty() {
        println!(
            "teardown: lb stopped (XDP detached, pins removed), servers killed, {} namespaces removed ({:.1} s)",
            names.len(),
            torn.elapsed().as_secs_f64()
        );
    } else {
        println!("teardown: namespaces still present: {left:?}");
    }
    println!("{passed} of {} checks passed", checks.len());
    if !all_ok && let Ok(log) = &log {
        println!();
        println!("last lines of the agent's log:");
        let lines: Vec<&str> = log.lines().collect();
        for l in &lines[lines.len().saturating_sub(30)..] {
            println!("  {l}");
        }
    }
    Ok(all_ok)
}

/// Waits (bounded) until lb reports every backend up: the load starts
/// with all of them in the ring.
fn wait_all_up(agent: &LbAgent, addrs: &[IpAddr]) -> Result<()> {
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        let health = backend_health(agent, addrs)?;
        if health.iter().all(|h| h.health == "up") {
            return Ok(());
        }
        if Instant::now() >= deadline || interrupted() {
            let words: Vec<&str> = health.iter().map(|h| h.health.as_str()).collect();
            bail!("lb does not report every backend up after 10 s: {words:?}");
        }
        thread::sleep(POLL);
    }
}

fn xdp_mode(agent: &LbAgent) -> Result<String> {
    let status = agent.json(&["status"])?;
    Ok(status["interfaces"][0]["mode"]
        .as_str()
        .unwrap_or("?")
        .to_string())
}

fn intro(topo: &Net, forwarding: Forwarding, mode: &str, setup: Duration) {
    let ns = |n: &Netns| n.name().to_string();
    println!("set up in {:.1} s: {}", setup.as_secs_f64(), topo.layout());
    // IPv6 addresses are longer: the column takes the longest.
    let width = (0..topo.backend_count())
        .map(|i| topo.backend_addr(i))
        .chain([topo.client_addr(), topo.lb_addr()])
        .map(|a| a.to_string().len())
        .max()
        .unwrap_or(13)
        .max(13);
    let line = |role: &str, addr: String, ns: String, what: String| {
        println!("  {role:<10} {addr:<width$} {ns:<15} {what}");
    };
    line(
        "client",
        topo.client_addr().to_string(),
        ns(topo.client_ns()),
        format!(
            "{WORKERS} threads, a new TCP connection per GET /, ~{} requests/s",
            WORKERS as u128 * 1000 / PERIOD.as_millis()
        ),
    );
    line(
        "lb",
        topo.lb_addr().to_string(),
        ns(topo.lb_ns()),
        format!(
            "`lb run`, XDP program ({mode} mode) on {}, forwarding {}",
            topo.lb_iface(),
            forwarding.as_str()
        ),
    );
    for i in 0..topo.backend_count() {
        line(
            &backend_name(i),
            topo.backend_addr(i).to_string(),
            ns(topo.backend_ns(i)),
            if forwarding == Forwarding::Nat {
                format!("HTTP server on :{PORT} answering its name; no VIP (unmodified)")
            } else {
                format!("HTTP server on :{PORT} answering its name; VIP on lo")
            },
        );
    }
    println!(
        "  {:<10} {:<w$} Maglev over {} backends, health check GET / every {HC_INTERVAL_MS} ms",
        "VIP",
        format!("{}/tcp", SocketAddr::new(topo.vip(), PORT)),
        topo.backend_count(),
        w = width + 16
    );
    println!(
        "  {:<w$} (down after {HC_FALL} failures, up after {HC_RISE} successes)",
        "",
        w = width + 27
    );
    println!("{}", topo.path(forwarding));
    println!();
    println!(
        "plan: all up until {} s; then {}'s server is killed; restarted at {} s; the end at {} s",
        STOP_AT.as_secs(),
        backend_name(VICTIM),
        RESTART_AT.as_secs(),
        RUN.as_secs()
    );
    println!(
        "each row: requests each backend answered in that second, its health as \
         `lb backend list` shows it, failed requests"
    );
    println!();
}

// ---------------------------------------------------------------------------
// Load and the live table
// ---------------------------------------------------------------------------

/// Sets a flag when dropped: the load threads stop on any exit path.
struct StopOnDrop<'a>(&'a AtomicBool);

impl Drop for StopOnDrop<'_> {
    fn drop(&mut self) {
        self.0.store(true, Ordering::SeqCst);
    }
}

/// One client thread (inside the client namespace): paced requests, each
/// on a new connection, until `end` or `stop`.
fn worker(w: usize, vip: SocketAddr, t0: Instant, stop: &AtomicBool, tx: mpsc::Sender<Sample>) {
    // Spread the workers over one period.
    let mut next = PERIOD * w as u32 / WORKERS as u32;
    loop {
        let now = t0.elapsed();
        if next > now {
            thread::sleep(next - now);
        }
        let start = t0.elapsed();
        if start >= RUN || stop.load(Ordering::SeqCst) {
            return;
        }
        let outcome = match http_get(vip, REQUEST_TIMEOUT) {
            Ok(body) => match body.trim().strip_prefix("backend-").map(str::parse) {
                Some(Ok(i)) if i < BACKENDS => Ok(i),
                _ => Err(format!("unexpected answer {body:?}")),
            },
            Err(e) => Err(format!("{:#}", e.root_cause())),
        };
        let end = t0.elapsed();
        if tx
            .send(Sample {
                start,
                end,
                outcome,
            })
            .is_err()
        {
            return;
        }
        next = (next + PERIOD).max(end);
    }
}

fn backend_health(agent: &LbAgent, addrs: &[IpAddr]) -> Result<Vec<Health>> {
    let list = agent.json(&["backend", "list"])?;
    addrs
        .iter()
        .map(|a| {
            let b = list
                .as_array()
                .into_iter()
                .flatten()
                .find(|b| b["address"] == a.to_string())
                .with_context(|| format!("`lb backend list` does not show {a}"))?;
            Ok(Health {
                health: b["health"].as_str().unwrap_or("?").to_string(),
                slots: b["slots"].as_u64().unwrap_or(0),
                last_check: b["last_check"].as_str().unwrap_or("").to_string(),
            })
        })
        .collect()
}

fn backend_packets(agent: &LbAgent, addr: IpAddr) -> Result<u64> {
    let stats = agent.json(&["stats"])?;
    stats["backends"]
        .as_array()
        .into_iter()
        .flatten()
        .find(|b| b["address"] == addr.to_string())
        .and_then(|b| b["packets"].as_u64())
        .with_context(|| format!("`lb stats` shows no packet count for {addr}"))
}

/// The victim's health in `health` is `want`: prints the event and
/// records the check (`Some` once decided: in time, or the bound passed);
/// returns whether `want` was seen now.
fn watch(
    health: &[Health],
    want: &str,
    after: &str,
    since: Duration,
    t: Duration,
    check: &mut Option<Check>,
) -> bool {
    let victim = backend_name(VICTIM);
    let v = &health[VICTIM];
    let took = t.saturating_sub(since);
    if v.health == want {
        let slots: Vec<String> = health.iter().map(|h| h.slots.to_string()).collect();
        event(
            t,
            format!(
                "lb marks {victim} {want} {} after {after} ({}); ring slots now {}",
                secs(took),
                v.last_check,
                slots.join(" / ")
            ),
        );
        check.get_or_insert_with(|| {
            Check::new(
                took <= NOTICE_BOUND,
                format!(
                    "lb marked {victim} {want} {} after {after} (bound {})",
                    secs(took),
                    secs(NOTICE_BOUND)
                ),
            )
        });
        return true;
    }
    if check.is_none() && took > NOTICE_BOUND {
        event(
            t,
            format!(
                "lb still shows {victim} {} {} after {after}",
                v.health,
                secs(NOTICE_BOUND)
            ),
        );
        *check = Some(Check::new(
            false,
            format!(
                "lb marked {victim} {want} within {} of {after}",
                secs(NOTICE_BOUND)
            ),
        ));
    }
    false
}

/// `lb stats`, its rates measured over most of a second: they cover the
/// time since the agent's last 1-second sample, so wait until that is
/// at least 0.8 s old (the agent reports its age as `interval_s`).
fn stats_over_most_of_a_second(agent: &LbAgent) -> Result<String> {
    let age = agent.json(&["stats"])?["interval_s"]
        .as_f64()
        .unwrap_or(1.0);
    if (0.0..0.8).contains(&age) {
        thread::sleep(Duration::from_secs_f64(0.8 - age));
    }
    agent.cli_ok(&["stats"])
}

fn secs(d: Duration) -> String {
    format!("{:.1} s", d.as_secs_f64())
}

fn event(t: Duration, what: impl std::fmt::Display) {
    println!("  {:>5.1}  >> {what}", t.as_secs_f64());
}

fn row_header() {
    let mut names = format!("  {:>5}  {:<20}", "t (s)", "phase");
    let mut units = format!("  {:>5}  {:<20}", "", "");
    for i in 0..BACKENDS {
        names.push_str(&format!("  {:<12}", backend_name(i)));
        units.push_str("  req/s health");
    }
    names.push_str(&format!("  {:>6}", "failed"));
    units.push_str(&format!("  {:>6}", "req/s"));
    println!("{names}");
    println!("{}", units.trim_end());
}

/// Checks made while the script runs (None: the moment never came).
#[derive(Default)]
struct Transitions {
    down: Option<Check>,
    forwarded: Option<Check>,
    up: Option<Check>,
    held: Option<Check>,
}

/// Runs the load and the timeline; prints the live table. Returns every
/// request, the timeline and the checks about the transitions.
fn drive(
    topo: &Net,
    agent: &LbAgent,
    servers: &mut [Option<ChildGuard>],
    addrs: &[IpAddr],
    vip: SocketAddr,
) -> Result<(Vec<Sample>, Timeline, Transitions, String)> {
    let stop = AtomicBool::new(false);
    let (tx, rx) = mpsc::channel::<Sample>();
    let client: &Netns = topo.client_ns();
    let victim = backend_name(VICTIM);
    let mut checks = Transitions::default();

    let mut health = backend_health(agent, addrs)?;
    let t0 = Instant::now();
    let mut stats_text = String::new();
    let result = thread::scope(|s| -> Result<(Vec<Sample>, Timeline)> {
        let _stop = StopOnDrop(&stop);
        let mut handles = Vec::new();
        for w in 0..WORKERS {
            let tx = tx.clone();
            let stop = &stop;
            handles.push(s.spawn(move || client.run(move || worker(w, vip, t0, stop, tx))));
        }
        drop(tx);

        row_header();
        let mut samples: Vec<Sample> = Vec::new();
        let mut tl = Timeline::default();
        let mut packets_at_down: Option<u64> = None;
        let mut held: Option<Vec<held::Held>> = None;
        let mut next_row = Duration::from_secs(1);
        let mut row_from = 0;
        loop {
            if interrupted() {
                break;
            }
            let now = t0.elapsed();

            // The script.
            if tl.stopped.is_none() && now >= STOP_AT {
                let server = servers[VICTIM].take().context("no server to stop")?;
                // The moment before the signal: whatever ended earlier
                // cannot have been disturbed by it.
                let t = t0.elapsed();
                server.kill()?;
                tl.stopped = Some(t);
                event(t, format!("killed {victim}'s HTTP server (SIGKILL)"));
            }
            if tl.restarted.is_none() && now >= RESTART_AT {
                if let Some(before) = packets_at_down {
                    let after = backend_packets(agent, addrs[VICTIM])?;
                    checks.forwarded = Some(Check::new(
                        after == before,
                        format!(
                            "failover: lb's XDP program forwarded no packet to {victim} while it was down ({} packets)",
                            after.saturating_sub(before)
                        ),
                    ));
                }
                servers[VICTIM] = Some(topo.spawn_http(VICTIM, PORT)?);
                let t = t0.elapsed();
                tl.restarted = Some(t);
                event(t, format!("restarted {victim}'s HTTP server"));
            }
            if held.is_none() && checks.held.is_none() && now >= HOLD_AT && tl.down.is_some() {
                match held::Held::open_all(client, vip, held::HELD) {
                    Ok(h) => {
                        let on: Vec<String> = (0..BACKENDS)
                            .map(|i| {
                                let n = h.iter().filter(|c| c.backend == i).count();
                                format!("{n} on {}", backend_name(i))
                            })
                            .collect();
                        event(
                            t0.elapsed(),
                            format!(
                                "opened {} keep-alive connections ({})",
                                h.len(),
                                on.join(", ")
                            ),
                        );
                        held = Some(h);
                    }
                    Err(e) => {
                        checks.held = Some(Check::new(
                            false,
                            format!("established flows: opening the connections failed: {e:#}"),
                        ))
                    }
                }
            }
            if now >= RECHECK_AT
                && tl.up.is_some()
                && let Some(mut h) = held.take()
            {
                let (ok, text) = held::recheck(&mut h, agent, vip, VICTIM, addrs[VICTIM]);
                event(t0.elapsed(), &text);
                checks.held = Some(Check::new(ok, text));
            }

            // Health: every row, and every POLL while lb should notice
            // a change (until it did or the bound passed; after that it is
            // still watched once a second, for the record).
            let awaiting_down = tl.stopped.is_some() && tl.down.is_none() && tl.restarted.is_none();
            let awaiting_up = tl.down.is_some() && tl.restarted.is_some() && tl.up.is_none();
            let row_due = now >= next_row;
            if (awaiting_down && checks.down.is_none())
                || (awaiting_up && checks.up.is_none())
                || row_due
            {
                match backend_health(agent, addrs) {
                    Ok(h) => health = h,
                    Err(e) => {
                        for h in &mut health {
                            h.health = "error".into();
                        }
                        event(t0.elapsed(), format!("`lb backend list` failed: {e:#}"));
                    }
                }
                let t = t0.elapsed();
                if awaiting_down {
                    let since = tl.stopped.unwrap_or_default();
                    if watch(&health, "down", "the kill", since, t, &mut checks.down) {
                        tl.down = Some(t);
                        packets_at_down = Some(backend_packets(agent, addrs[VICTIM])?);
                    }
                }
                if awaiting_up {
                    let since = tl.restarted.unwrap_or_default();
                    if watch(&health, "up", "the restart", since, t, &mut checks.up) {
                        tl.up = Some(t);
                    }
                }
            }

            samples.extend(rx.try_iter());
            if row_due {
                let mut per = [0usize; BACKENDS];
                let mut failed = 0;
                for s in &samples[row_from..] {
                    match s.outcome {
                        Ok(i) => per[i] += 1,
                        Err(_) => failed += 1,
                    }
                }
                row_from = samples.len();
                let mut r = format!(
                    "  {:>5}  {:<20}",
                    next_row.as_secs(),
                    PHASES[tl.phase_at(t0.elapsed())]
                );
                for (n, h) in per.iter().zip(&health) {
                    r.push_str(&format!("  {n:>5} {:<6}", h.health));
                }
                r.push_str(&format!("  {failed:>6}"));
                println!("{r}");
                if next_row == STATS_AT {
                    stats_text = stats_over_most_of_a_second(agent)?;
                }
                next_row += Duration::from_secs(1);
                if next_row > RUN {
                    break;
                }
            }

            // Sleep until the next thing to do.
            let now = t0.elapsed();
            let mut wake = next_row;
            if tl.stopped.is_none() {
                wake = wake.min(STOP_AT);
            }
            if tl.restarted.is_none() {
                wake = wake.min(RESTART_AT);
            }
            let awaiting_down = tl.stopped.is_some() && tl.down.is_none() && tl.restarted.is_none();
            let awaiting_up = tl.down.is_some() && tl.restarted.is_some() && tl.up.is_none();
            if (awaiting_down && checks.down.is_none()) || (awaiting_up && checks.up.is_none()) {
                wake = wake.min(now + POLL);
            }
            if wake > now {
                thread::sleep(wake - now);
            }
        }
        drop(_stop);
        for h in handles {
            match h.join() {
                Ok(Ok(())) => {}
                Ok(Err(e)) => bail!("a client thread failed: {e:#}"),
                Err(p) => std::panic::resume_unwind(p),
            }
        }
        samples.extend(rx.try_iter());
        Ok((samples, tl))
    });
    let (samples, tl) = result?;
    Ok((samples, tl, checks, stats_text))
}
