//! Backend health checks.
//!
//! Three layers, each usable on its own:
//!
//! * [`HealthState`]: a pure rise/fall state machine. Feed it
//!   [`ProbeOutcome`]s; it tells you when the backend changes state.
//! * [`probe`]: one health check (TCP connect or HTTP GET) against one address,
//!   bounded by the check's timeout. It never fails: every problem is a
//!   [`ProbeOutcome`] whose `Display` is the reason an operator reads in a log.
//! * [`spawn_checker`] / [`Checker`]: a tokio task per backend that probes on
//!   a jittered interval, runs the state machine and reports every probe as a
//!   [`HealthEvent`] on an unbounded channel.
//!
//! # Resource budget
//!
//! Every checker takes a permit of one [`ProbeLimit`] (a semaphore shared by
//! all checkers of an agent) for the duration of each probe, so at most that
//! many probes (each one socket) are in flight however many backends there
//! are. A probe that fails for a reason on lb's own side (out of file
//! descriptors or buffers, no route, no local address) yields
//! [`ProbeOutcome::Unknown`]: it is shown as the last check but counts
//! neither toward `fall` nor toward `rise`, so a starved agent does not take
//! healthy backends down.
//!
//! # Initial state
//!
//! The checker does not decide whether a new backend starts up or down: the
//! agent passes `initially_up`. The intended policy (see [`starts_up`]) is that
//! a new backend starts **DOWN** and needs `rise` consecutive successful checks
//! before it receives traffic, unless its check kind is
//! [`HealthCheckKind::None`], in which case it is always up. A checker with
//! kind `None` never probes: it reports one `Ok` event (with a
//! [`Transition::Up`] if it was started down) and then idles until cancelled.
//!
//! # Cancellation
//!
//! A checker stops when its [`CancellationToken`] is cancelled (tokio-util).
//! The token is watched while sleeping *and* while a probe is in flight, so
//! stopping is prompt: the task returns at its next poll, dropping any
//! half-open connection. A checker also stops by itself when the event
//! receiver has been dropped. [`Checker`] wraps the task and a token and
//! cancels on drop. Aborting the [`JoinHandle`] works too.

use std::fmt;
use std::net::{IpAddr, SocketAddr};
use std::time::{Duration, Instant};

use std::sync::Arc;

use http_body_util::Empty;
use hyper::body::Bytes;
use hyper::header::{CONNECTION, HOST, USER_AGENT};
use hyper::{Method, Request};
use hyper_util::rt::TokioIo;
use tokio::net::TcpStream;
use tokio::sync::Semaphore;
use tokio::sync::mpsc::UnboundedSender;
use tokio::task::JoinHandle;
use tokio_util::sync::CancellationToken;

use crate::config::{HealthCheck, HealthCheckKind};

/// Shortest interval a checker sleeps between probes, whatever the
/// configuration says, so that a zero interval cannot turn into a busy loop.
pub const MIN_INTERVAL: Duration = Duration::from_millis(10);

/// The result of one probe.
///
/// `Display` gives the reason as an operator reads it in a log line, e.g.
/// `timeout after 500ms`, `connection refused`, `HTTP status 503 (want 200)`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum ProbeOutcome {
    /// The check passed; `detail` says how (e.g. `TCP connect in 0.3ms`),
    /// `latency` how long it took (None: no check configured).
    Ok {
        detail: String,
        latency: Option<Duration>,
    },
    /// No answer within the configured timeout (the duration is that timeout).
    Timeout(Duration),
    /// The TCP connection was refused (RST): nothing listens on the port.
    Refused,
    /// Any other failure: unreachable, reset, malformed HTTP response, ...
    Error(String),
    /// The HTTP server answered with a status other than the expected one.
    BadStatus { status: u16, expected: u16 },
    /// The probe could not be made for a reason on lb's side (EMFILE,
    /// ENFILE, ENOBUFS, ENOMEM, ENETUNREACH, EADDRNOTAVAIL): says nothing
    /// about the backend, so it counts neither way.
    Unknown(String),
}

impl ProbeOutcome {
    /// Whether this outcome counts as a successful check.
    pub fn is_ok(&self) -> bool {
        matches!(self, ProbeOutcome::Ok { .. })
    }

    /// Whether this outcome says nothing about the backend (a local
    /// failure): it is neither a success nor a failure.
    pub fn is_unknown(&self) -> bool {
        matches!(self, ProbeOutcome::Unknown(_))
    }
}

impl fmt::Display for ProbeOutcome {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            ProbeOutcome::Ok { detail, .. } => f.write_str(detail),
            ProbeOutcome::Timeout(d) => write!(f, "timeout after {}", fmt_duration(*d)),
            ProbeOutcome::Refused => f.write_str("connection refused"),
            ProbeOutcome::Error(e) => f.write_str(e),
            ProbeOutcome::BadStatus { status, expected } => {
                write!(f, "HTTP status {status} (want {expected})")
            }
            ProbeOutcome::Unknown(e) => write!(f, "unknown: {e} (local error, not counted)"),
        }
    }
}

/// A change of a backend's health state, with the outcome that caused it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Transition {
    Up(ProbeOutcome),
    Down(ProbeOutcome),
}

impl Transition {
    /// The probe outcome that completed the streak.
    pub fn outcome(&self) -> &ProbeOutcome {
        match self {
            Transition::Up(o) | Transition::Down(o) => o,
        }
    }
}

/// The rise/fall state machine of one backend. Pure: no I/O, no clock.
///
/// * While up, `fall` consecutive failed checks take it down.
/// * While down, `rise` consecutive successful checks bring it up.
/// * A success resets the failure streak and a failure the success streak.
/// * An [`ProbeOutcome::Unknown`] outcome changes nothing: the streaks go
///   on as if the probe had not been made.
///
/// `rise` and `fall` of 0 are treated as 1.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct HealthState {
    rise: u32,
    fall: u32,
    up: bool,
    successes: u32,
    failures: u32,
}

impl HealthState {
    /// A new state machine. `initially_up` is the agent's choice: see the
    /// module docs ("Initial state") and [`starts_up`].
    pub fn new(rise: u32, fall: u32, initially_up: bool) -> Self {
        HealthState {
            rise: rise.max(1),
            fall: fall.max(1),
            up: initially_up,
            successes: 0,
            failures: 0,
        }
    }

    /// Records one probe outcome; returns the transition it caused, if any.
    pub fn record(&mut self, outcome: &ProbeOutcome) -> Option<Transition> {
        if outcome.is_unknown() {
            return None;
        }
        if outcome.is_ok() {
            self.failures = 0;
            self.successes = self.successes.saturating_add(1);
            if !self.up && self.successes >= self.rise {
                self.up = true;
                self.successes = 0;
                return Some(Transition::Up(outcome.clone()));
            }
        } else {
            self.successes = 0;
            self.failures = self.failures.saturating_add(1);
            if self.up && self.failures >= self.fall {
                self.up = false;
                self.failures = 0;
                return Some(Transition::Down(outcome.clone()));
            }
        }
        None
    }

    /// Whether the backend is currently considered up.
    pub fn is_up(&self) -> bool {
        self.up
    }

    /// The configured rise threshold (at least 1).
    pub fn rise(&self) -> u32 {
        self.rise
    }

    /// The configured fall threshold (at least 1).
    pub fn fall(&self) -> u32 {
        self.fall
    }
}

/// The recommended initial state of a new backend under `check`: down, unless
/// the check kind is [`HealthCheckKind::None`] (then always up).
pub fn starts_up(check: &HealthCheck) -> bool {
    matches!(check.kind, HealthCheckKind::None)
}

/// Probes `addr` once according to `check`, bounded by `check.timeout`.
///
/// * `Tcp`: a TCP connect; refused → [`ProbeOutcome::Refused`].
/// * `Http`: connect, `GET path` over HTTP/1.1 with a `Host` header (the
///   configured host, else the address), and compare the response status with
///   `expected_status` → [`ProbeOutcome::BadStatus`] on mismatch. The whole
///   exchange (connect, request, response head) is under the timeout; the
///   response body is not read.
/// * `None`: always `Ok`, no I/O.
///
/// The port probed is `addr`'s; `check.port` is not looked at here (see
/// [`spawn_checker`] for how the checker picks the port).
pub async fn probe(addr: SocketAddr, check: &HealthCheck) -> ProbeOutcome {
    let start = Instant::now();
    let timeout = check.timeout;
    let result = match &check.kind {
        HealthCheckKind::None => {
            return ProbeOutcome::Ok {
                detail: "no health check configured".to_string(),
                latency: None,
            };
        }
        HealthCheckKind::Tcp => tokio::time::timeout(timeout, tcp_probe(addr)).await,
        HealthCheckKind::Http {
            path,
            expected_status,
            host,
        } => {
            tokio::time::timeout(
                timeout,
                http_probe(addr, path, *expected_status, host.as_deref()),
            )
            .await
        }
    };
    match result {
        Err(_elapsed) => ProbeOutcome::Timeout(timeout),
        Ok(Err(outcome)) => outcome,
        Ok(Ok(what)) => {
            let latency = start.elapsed();
            ProbeOutcome::Ok {
                detail: format!("{what} in {}", fmt_duration(latency)),
                latency: Some(latency),
            }
        }
    }
}

async fn tcp_probe(addr: SocketAddr) -> Result<String, ProbeOutcome> {
    let stream = TcpStream::connect(addr).await.map_err(io_outcome)?;
    drop(stream);
    Ok("TCP connect".to_string())
}

async fn http_probe(
    addr: SocketAddr,
    path: &str,
    expected: u16,
    host: Option<&str>,
) -> Result<String, ProbeOutcome> {
    let host = match host {
        Some(h) => h.to_string(),
        None => default_host(addr),
    };
    let uri = if path.starts_with('/') {
        path.to_string()
    } else {
        format!("/{path}")
    };
    let req = Request::builder()
        .method(Method::GET)
        .uri(uri.as_str())
        .header(HOST, host.as_str())
        .header(USER_AGENT, concat!("lb-health/", env!("CARGO_PKG_VERSION")))
        .header(CONNECTION, "close")
        .body(Empty::<Bytes>::new())
        .map_err(|e| ProbeOutcome::Error(format!("invalid HTTP request for path {path:?}: {e}")))?;

    let stream = TcpStream::connect(addr).await.map_err(io_outcome)?;
    let (mut sender, conn) = hyper::client::conn::http1::handshake(TokioIo::new(stream))
        .await
        .map_err(|e| http_outcome("HTTP handshake failed", &e))?;

    // Drive the connection in this task, not a spawned one, so that the
    // caller's timeout (and cancellation) drops everything at once.
    let send = sender.send_request(req);
    tokio::pin!(conn);
    tokio::pin!(send);
    let resp = tokio::select! {
        biased;
        r = &mut send => r,
        c = &mut conn => match c {
            Err(e) => return Err(http_outcome("HTTP connection failed", &e)),
            // The connection ended cleanly before a response: the pending
            // request resolves with an error now.
            Ok(()) => send.await,
        },
    }
    .map_err(|e| http_outcome("HTTP request failed", &e))?;

    let status = resp.status().as_u16();
    if status != expected {
        return Err(ProbeOutcome::BadStatus { status, expected });
    }
    Ok(format!("HTTP {status}"))
}

/// The `Host` header used when the check names none: the address, without the
/// port when it is 80.
fn default_host(addr: SocketAddr) -> String {
    match (addr.ip(), addr.port()) {
        (IpAddr::V4(ip), 80) => ip.to_string(),
        (IpAddr::V6(ip), 80) => format!("[{ip}]"),
        _ => addr.to_string(),
    }
}

/// Errors of `socket`/`connect` that are lb's own problem, not the
/// backend's.
const LOCAL_ERRNOS: [i32; 6] = [
    libc::EMFILE,
    libc::ENFILE,
    libc::ENOBUFS,
    libc::ENOMEM,
    libc::ENETUNREACH,
    libc::EADDRNOTAVAIL,
];

fn io_outcome(e: std::io::Error) -> ProbeOutcome {
    if e.kind() == std::io::ErrorKind::ConnectionRefused {
        ProbeOutcome::Refused
    } else if e.raw_os_error().is_some_and(|n| LOCAL_ERRNOS.contains(&n)) {
        ProbeOutcome::Unknown(format!("connect: {e}"))
    } else {
        ProbeOutcome::Error(format!("connect: {e}"))
    }
}

fn http_outcome(what: &str, e: &hyper::Error) -> ProbeOutcome {
    // Refused can only come from connect, which is handled above; a reset or
    // closed connection during the exchange is an Error.
    let mut msg = format!("{what}: {e}");
    let mut source = std::error::Error::source(e);
    while let Some(s) = source {
        msg.push_str(&format!(": {s}"));
        source = s.source();
    }
    ProbeOutcome::Error(msg)
}

/// Formats a duration for a log line: `500ms`, `2s`, `1.5s`, `0.3ms`.
fn fmt_duration(d: Duration) -> String {
    if d >= Duration::from_secs(1) {
        if d.subsec_nanos() == 0 {
            format!("{}s", d.as_secs())
        } else {
            format!("{:.1}s", d.as_secs_f64())
        }
    } else if d >= Duration::from_millis(10) {
        format!("{}ms", d.as_millis())
    } else {
        format!("{:.1}ms", d.as_secs_f64() * 1000.0)
    }
}

pub use crate::keys::BackendKey;

/// How many probes may be in flight at once, shared by every checker of an
/// agent (each probe holds one socket).
#[derive(Clone, Debug)]
pub struct ProbeLimit(Arc<Semaphore>);

impl ProbeLimit {
    pub fn new(max: usize) -> Self {
        Self(Arc::new(Semaphore::new(max.max(1))))
    }

    /// Permits not taken right now.
    pub fn available(&self) -> usize {
        self.0.available_permits()
    }

    /// Runs one probe under a permit; waiting for the permit does not eat
    /// into the probe's timeout.
    async fn probe(&self, addr: SocketAddr, check: &HealthCheck) -> ProbeOutcome {
        let _permit = self
            .0
            .acquire()
            .await
            .expect("the semaphore is never closed");
        probe(addr, check).await
    }
}

/// What a checker checks.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct CheckTarget {
    /// Opaque to the checker; copied into every [`HealthEvent`] so the agent
    /// can map events back. The backend address probed is `key.address`.
    pub key: BackendKey,
    /// The VIP's name, for log lines: "backend 198.18.0.11 of {label}: ...".
    pub label: String,
}

/// One probe's result, sent by a checker after every probe.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct HealthEvent {
    pub key: BackendKey,
    pub outcome: ProbeOutcome,
    /// Set when this probe changed the backend's state.
    pub transition: Option<Transition>,
    /// The backend's state after this probe.
    pub up: bool,
}

/// Spawns a tokio task that health-checks `target` until `cancel` is
/// cancelled (or the receiver of `tx` is dropped).
///
/// The address probed is `target.key.address` on port `check.port`, or,
/// when `check.port` is 0, on the VIP port.
///
/// The first probe comes after a random delay in `[0, interval)` so that
/// checks don't fire in lockstep; after that, each probe follows the previous
/// one's end by `interval` ± 10 % (random). Every probe is reported as a
/// [`HealthEvent`]; transitions are also logged (`info!` up, `warn!` down).
/// `initially_up` is the backend's starting state (see [`starts_up`]).
/// Each probe runs under a permit of `limit`.
///
/// Must be called within a tokio runtime.
fn spawn_checker(
    target: CheckTarget,
    check: HealthCheck,
    initially_up: bool,
    tx: UnboundedSender<HealthEvent>,
    cancel: CancellationToken,
    limit: ProbeLimit,
) -> JoinHandle<()> {
    tokio::spawn(async move {
        tokio::select! {
            biased;
            _ = cancel.cancelled() => {}
            _ = run_checker(target, check, initially_up, tx, limit) => {}
        }
    })
}

async fn run_checker(
    target: CheckTarget,
    check: HealthCheck,
    initially_up: bool,
    tx: UnboundedSender<HealthEvent>,
    limit: ProbeLimit,
) {
    let backend = target.key.address;
    let port = if check.port != 0 {
        check.port
    } else {
        target.key.vip.port
    };
    let addr = SocketAddr::new(backend, port);

    if matches!(check.kind, HealthCheckKind::None) {
        // Always up: one event, then idle until cancelled (or the receiver
        // goes away).
        let mut state = HealthState::new(1, 1, initially_up);
        let outcome = probe(addr, &check).await;
        let transition = state.record(&outcome);
        if let Some(t) = &transition {
            log_transition(&target, &state, t);
        }
        let _ = tx.send(HealthEvent {
            key: target.key,
            outcome,
            transition,
            up: state.is_up(),
        });
        tx.closed().await;
        return;
    }

    let interval = check.interval.max(MIN_INTERVAL);
    let mut state = HealthState::new(check.rise, check.fall, initially_up);
    let mut delay = interval.mul_f64(fastrand::f64());
    let mut was_unknown = false;
    loop {
        sleep_or_closed(delay, &tx).await;
        if tx.is_closed() {
            return;
        }
        let outcome = limit.probe(addr, &check).await;
        log::debug!(
            "health check of backend {backend} (port {port}) of {}: {outcome}",
            target.label
        );
        // Once per streak: a local failure is lb's problem to report.
        if outcome.is_unknown() && !was_unknown {
            log::warn!(
                "backend {backend} of {}: health check not made: {outcome}; state kept ({})",
                target.label,
                if state.is_up() { "up" } else { "down" }
            );
        }
        was_unknown = outcome.is_unknown();
        let transition = state.record(&outcome);
        if let Some(t) = &transition {
            log_transition(&target, &state, t);
        }
        let event = HealthEvent {
            key: target.key,
            outcome,
            transition,
            up: state.is_up(),
        };
        if tx.send(event).is_err() {
            return;
        }
        delay = interval.mul_f64(0.9 + 0.2 * fastrand::f64());
    }
}

/// Sleeps for `d`, returning early if the event receiver goes away.
async fn sleep_or_closed(d: Duration, tx: &UnboundedSender<HealthEvent>) {
    tokio::select! {
        _ = tokio::time::sleep(d) => {}
        _ = tx.closed() => {}
    }
}

fn log_transition(target: &CheckTarget, state: &HealthState, t: &Transition) {
    let backend = target.key.address;
    let label = &target.label;
    match t {
        Transition::Up(o) => {
            let n = state.rise();
            let s = if n == 1 { "" } else { "s" };
            log::info!("backend {backend} of {label}: UP after {n} successful check{s} ({o})");
        }
        Transition::Down(o) => {
            let n = state.fall();
            let s = if n == 1 { "" } else { "s" };
            log::warn!("backend {backend} of {label}: DOWN after {n} failed check{s} ({o})");
        }
    }
}

/// A running checker that stops when dropped (or with [`Checker::stop`]).
#[derive(Debug)]
pub struct Checker {
    cancel: CancellationToken,
    handle: JoinHandle<()>,
}

impl Checker {
    /// Like [`spawn_checker`], with a token of its own.
    pub fn spawn(
        target: CheckTarget,
        check: HealthCheck,
        initially_up: bool,
        tx: UnboundedSender<HealthEvent>,
        limit: ProbeLimit,
    ) -> Checker {
        let cancel = CancellationToken::new();
        let handle = spawn_checker(target, check, initially_up, tx, cancel.clone(), limit);
        Checker { cancel, handle }
    }

    /// Cancels the checker and waits for its task to end.
    pub async fn stop(mut self) {
        self.cancel.cancel();
        let _ = (&mut self.handle).await;
    }
}

impl Drop for Checker {
    fn drop(&mut self) {
        self.cancel.cancel();
    }
}

/// One running checker per backend, restarted when its check changes.
pub struct Checkers {
    running: std::collections::BTreeMap<BackendKey, (HealthCheck, Checker)>,
    tx: UnboundedSender<HealthEvent>,
    limit: ProbeLimit,
}

impl Checkers {
    /// Checkers whose probes share `limit`.
    pub fn new(tx: UnboundedSender<HealthEvent>, limit: ProbeLimit) -> Self {
        Self {
            running: Default::default(),
            tx,
            limit,
        }
    }

    /// Makes the running checkers exactly `wanted`: (what, how, whether
    /// the backend is up now). A checker whose check changed starts over
    /// from the backend's current state; others keep running.
    pub fn sync(&mut self, wanted: impl IntoIterator<Item = (CheckTarget, HealthCheck, bool)>) {
        let mut keep = std::collections::BTreeSet::new();
        for (target, check, up) in wanted {
            keep.insert(target.key);
            if self
                .running
                .get(&target.key)
                .is_some_and(|(c, _)| *c == check)
            {
                continue;
            }
            let key = target.key;
            let checker = Checker::spawn(
                target,
                check.clone(),
                up,
                self.tx.clone(),
                self.limit.clone(),
            );
            self.running.insert(key, (check, checker));
        }
        self.running.retain(|k, _| keep.contains(k));
    }

    /// Stops every checker.
    pub fn clear(&mut self) {
        self.running.clear();
    }
}

#[cfg(test)]
mod tests {
    #[allow(unused_imports)]
    use std::net::{IpAddr, Ipv4Addr};

    #[allow(unused_imports)]
    use crate::keys::ip4;

    use super::*;
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    use tokio::net::TcpListener;
    use tokio::sync::mpsc;
    use tokio::time::timeout;

    use crate::{config::Protocol, keys::VipId};

    fn test_key(address: IpAddr) -> BackendKey {
        BackendKey {
            vip: VipId {
                address: ip4(198, 18, 0, 1),
                port: 80,
                protocol: Protocol::Tcp,
            },
            address,
        }
    }

    const BOUND: Duration = Duration::from_secs(5);

    fn tcp_check(port: u16) -> HealthCheck {
        HealthCheck {
            kind: HealthCheckKind::Tcp,
            port,
            interval: Duration::from_millis(50),
            timeout: Duration::from_millis(500),
            rise: 2,
            fall: 2,
        }
    }

    fn http_check(port: u16, path: &str, host: Option<&str>) -> HealthCheck {
        HealthCheck {
            kind: HealthCheckKind::Http {
                path: path.to_string(),
                expected_status: 200,
                host: host.map(str::to_string),
            },
            port,
            interval: Duration::from_millis(50),
            timeout: Duration::from_millis(2000),
            rise: 2,
            fall: 2,
        }
    }

    fn ok() -> ProbeOutcome {
        ProbeOutcome::Ok {
            detail: "test".into(),
            latency: None,
        }
    }

    /// A port on 127.0.0.1 with nothing listening.
    async fn closed_port() -> u16 {
        let l = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let port = l.local_addr().unwrap().port();
        drop(l);
        port
    }

    /// Serves one HTTP request with `status`; returns the request head bytes.
    async fn serve_one(listener: TcpListener, status: &'static str) -> Vec<u8> {
        let (mut sock, _) = listener.accept().await.unwrap();
        let mut req = Vec::new();
        let mut buf = [0u8; 1024];
        while !req.windows(4).any(|w| w == b"\r\n\r\n") {
            let n = sock.read(&mut buf).await.unwrap();
            if n == 0 {
                break;
            }
            req.extend_from_slice(&buf[..n]);
        }
        let resp = format!("HTTP/1.1 {status}\r\nContent-Length: 2\r\n\r\nok");
        sock.write_all(resp.as_bytes()).await.unwrap();
        sock.shutdown().await.ok();
        req
    }

    #[test]
    fn fall_needs_consecutive_failures() {
        let mut s = HealthState::new(2, 3, true);
        assert!(s.is_up());
        assert_eq!(s.record(&ProbeOutcome::Refused), None);
        assert_eq!(s.record(&ProbeOutcome::Refused), None);
        // An interleaved success resets the failure streak.
        assert_eq!(s.record(&ok()), None);
        assert_eq!(s.record(&ProbeOutcome::Refused), None);
        assert_eq!(
            s.record(&ProbeOutcome::Timeout(Duration::from_millis(5))),
            None
        );
        assert!(s.is_up());
        let t = s.record(&ProbeOutcome::Error("boom".into()));
        assert_eq!(
            t,
            Some(Transition::Down(ProbeOutcome::Error("boom".into())))
        );
        assert!(!s.is_up());
        // Further failures while down cause no transition.
        assert_eq!(s.record(&ProbeOutcome::Refused), None);
        assert_eq!(s.record(&ProbeOutcome::Refused), None);
        assert_eq!(s.record(&ProbeOutcome::Refused), None);
    }

    #[test]
    fn rise_needs_consecutive_successes() {
        let mut s = HealthState::new(2, 3, false);
        assert!(!s.is_up());
        assert_eq!(s.record(&ok()), None);
        // An interleaved failure resets the success streak.
        assert_eq!(s.record(&ProbeOutcome::Refused), None);
        assert_eq!(s.record(&ok()), None);
        assert!(!s.is_up());
        assert_eq!(s.record(&ok()), Some(Transition::Up(ok())));
        assert!(s.is_up());
        // Successes while up cause no transition.
        assert_eq!(s.record(&ok()), None);
        // And the way down needs fall=3 fresh failures.
        assert_eq!(s.record(&ProbeOutcome::Refused), None);
        assert_eq!(s.record(&ProbeOutcome::Refused), None);
        assert!(matches!(
            s.record(&ProbeOutcome::Refused),
            Some(Transition::Down(ProbeOutcome::Refused))
        ));
    }

    #[test]
    fn unknown_outcomes_count_neither_way() {
        let unknown = ProbeOutcome::Unknown("connect: Too many open files (os error 24)".into());
        // Up with fall = 2: any number of unknowns keeps it up, and they do
        // not break a failure streak either.
        let mut s = HealthState::new(2, 2, true);
        for _ in 0..10 {
            assert_eq!(s.record(&unknown), None);
        }
        assert!(s.is_up());
        assert_eq!(s.record(&ProbeOutcome::Refused), None);
        assert_eq!(s.record(&unknown), None);
        assert!(matches!(
            s.record(&ProbeOutcome::Refused),
            Some(Transition::Down(ProbeOutcome::Refused))
        ));
        // Down with rise = 2: unknowns never bring it up.
        for _ in 0..10 {
            assert_eq!(s.record(&unknown), None);
        }
        assert!(!s.is_up());
        assert_eq!(s.record(&ok()), None);
        assert_eq!(s.record(&unknown), None);
        assert_eq!(s.record(&ok()), Some(Transition::Up(ok())));
        assert_eq!(
            unknown.to_string(),
            "unknown: connect: Too many open files (os error 24) (local error, not counted)"
        );
    }

    #[test]
    fn local_connect_errors_are_unknown_remote_ones_are_failures() {
        for errno in [
            libc::EMFILE,
            libc::ENFILE,
            libc::ENOBUFS,
            libc::ENOMEM,
            libc::ENETUNREACH,
            libc::EADDRNOTAVAIL,
        ] {
            let o = io_outcome(std::io::Error::from_raw_os_error(errno));
            assert!(o.is_unknown(), "errno {errno}: {o:?}");
        }
        for errno in [libc::EHOSTUNREACH, libc::ECONNRESET, libc::ETIMEDOUT] {
            let o = io_outcome(std::io::Error::from_raw_os_error(errno));
            assert!(matches!(o, ProbeOutcome::Error(_)), "errno {errno}: {o:?}");
        }
        assert_eq!(
            io_outcome(std::io::Error::from_raw_os_error(libc::ECONNREFUSED)),
            ProbeOutcome::Refused
        );
    }

    #[test]
    fn zero_thresholds_act_as_one() {
        let mut s = HealthState::new(0, 0, false);
        assert!(matches!(s.record(&ok()), Some(Transition::Up(_))));
        assert!(matches!(
            s.record(&ProbeOutcome::Refused),
            Some(Transition::Down(_))
        ));
    }

    #[test]
    fn display_reasons() {
        assert_eq!(
            ProbeOutcome::Timeout(Duration::from_millis(500)).to_string(),
            "timeout after 500ms"
        );
        assert_eq!(
            ProbeOutcome::Timeout(Duration::from_secs(2)).to_string(),
            "timeout after 2s"
        );
        assert_eq!(ProbeOutcome::Refused.to_string(), "connection refused");
        assert_eq!(
            ProbeOutcome::BadStatus {
                status: 503,
                expected: 200
            }
            .to_string(),
            "HTTP status 503 (want 200)"
        );
        assert_eq!(
            ProbeOutcome::Error("connect: no route to host".into()).to_string(),
            "connect: no route to host"
        );
    }

    #[test]
    fn initial_state_policy() {
        assert!(!starts_up(&tcp_check(80)));
        assert!(!starts_up(&http_check(80, "/", None)));
        let mut none = tcp_check(80);
        none.kind = HealthCheckKind::None;
        assert!(starts_up(&none));
    }

    #[tokio::test]
    async fn probe_tcp_ok_and_refused() {
        let l = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = l.local_addr().unwrap();
        let out = timeout(BOUND, probe(addr, &tcp_check(addr.port())))
            .await
            .unwrap();
        assert!(out.is_ok(), "{out:?}");
        assert!(out.to_string().starts_with("TCP connect in "), "{out}");

        let port = closed_port().await;
        let addr: SocketAddr = ([127, 0, 0, 1], port).into();
        let out = timeout(BOUND, probe(addr, &tcp_check(port))).await.unwrap();
        assert_eq!(out, ProbeOutcome::Refused);
    }

    #[tokio::test]
    async fn probe_none_is_ok_without_io() {
        let port = closed_port().await;
        let mut check = tcp_check(port);
        check.kind = HealthCheckKind::None;
        let out = probe(([127, 0, 0, 1], port).into(), &check).await;
        assert!(out.is_ok(), "{out:?}");
    }

    #[tokio::test]
    async fn probe_http_ok_sends_path_and_default_host() {
        let l = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = l.local_addr().unwrap();
        let server = tokio::spawn(serve_one(l, "200 OK"));
        let out = timeout(
            BOUND,
            probe(addr, &http_check(addr.port(), "/healthz", None)),
        )
        .await
        .unwrap();
        assert!(out.is_ok(), "{out:?}");
        assert!(out.to_string().starts_with("HTTP 200 in "), "{out}");
        let req = timeout(BOUND, server).await.unwrap().unwrap();
        let req = String::from_utf8(req).unwrap();
        let first = req.lines().next().unwrap();
        assert_eq!(first, "GET /healthz HTTP/1.1", "{req}");
        let host = format!("host: 127.0.0.1:{}", addr.port());
        assert!(
            req.lines().any(|l| l.eq_ignore_ascii_case(&host)),
            "no {host:?} in {req:?}"
        );
    }

    #[tokio::test]
    async fn probe_http_bad_status_and_custom_host() {
        let l = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = l.local_addr().unwrap();
        let server = tokio::spawn(serve_one(l, "503 Service Unavailable"));
        let check = http_check(addr.port(), "/status?full=1", Some("web.example"));
        let out = timeout(BOUND, probe(addr, &check)).await.unwrap();
        assert_eq!(
            out,
            ProbeOutcome::BadStatus {
                status: 503,
                expected: 200
            }
        );
        assert_eq!(out.to_string(), "HTTP status 503 (want 200)");
        let req = String::from_utf8(timeout(BOUND, server).await.unwrap().unwrap()).unwrap();
        assert!(req.starts_with("GET /status?full=1 HTTP/1.1\r\n"), "{req}");
        assert!(
            req.lines()
                .any(|l| l.eq_ignore_ascii_case("host: web.example")),
            "{req:?}"
        );
    }

    #[tokio::test]
    async fn probe_http_refused() {
        let port = closed_port().await;
        let out = timeout(
            BOUND,
            probe(([127, 0, 0, 1], port).into(), &http_check(port, "/", None)),
        )
        .await
        .unwrap();
        assert_eq!(out, ProbeOutcome::Refused);
    }

    #[tokio::test]
    async fn probe_http_times_out_on_silent_server() {
        let l = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = l.local_addr().unwrap();
        // Accept and hold the connection open without ever answering.
        let server = tokio::spawn(async move {
            let (sock, _) = l.accept().await.unwrap();
            tokio::time::sleep(BOUND).await;
            drop(sock);
        });
        let mut check = http_check(addr.port(), "/", None);
        check.timeout = Duration::from_millis(200);
        let out = timeout(BOUND, probe(addr, &check)).await.unwrap();
        assert_eq!(out, ProbeOutcome::Timeout(Duration::from_millis(200)));
        assert_eq!(out.to_string(), "timeout after 200ms");
        server.abort();
    }

    #[tokio::test]
    async fn probe_http_error_on_garbage() {
        let l = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = l.local_addr().unwrap();
        let server = tokio::spawn(async move {
            let (mut sock, _) = l.accept().await.unwrap();
            let mut buf = [0u8; 1024];
            let _ = sock.read(&mut buf).await;
            sock.write_all(b"SSH-2.0-OpenSSH\r\n\r\n").await.ok();
            sock.shutdown().await.ok();
        });
        let out = timeout(BOUND, probe(addr, &http_check(addr.port(), "/", None)))
            .await
            .unwrap();
        assert!(matches!(out, ProbeOutcome::Error(_)), "{out:?}");
        server.await.unwrap();
    }

    async fn next_event(rx: &mut mpsc::UnboundedReceiver<HealthEvent>) -> HealthEvent {
        timeout(BOUND, rx.recv())
            .await
            .expect("no health event in time")
            .expect("checker ended")
    }

    #[tokio::test]
    async fn checker_goes_up_then_down() {
        let l = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let port = l.local_addr().unwrap().port();
        // Accept (and drop) connections until told to stop.
        let stop = CancellationToken::new();
        let server_stop = stop.clone();
        let server = tokio::spawn(async move {
            loop {
                tokio::select! {
                    _ = server_stop.cancelled() => break,
                    r = l.accept() => drop(r),
                }
            }
            // The listener is dropped here: the port now refuses.
        });

        let key = test_key(ip4(127, 0, 0, 1));
        let target = CheckTarget {
            key,
            label: "web".into(),
        };
        let (tx, mut rx) = mpsc::unbounded_channel();
        let cancel = CancellationToken::new();
        let handle = spawn_checker(
            target,
            tcp_check(port),
            false,
            tx,
            cancel.clone(),
            ProbeLimit::new(8),
        );

        // Two successes: the first leaves it down, the second brings it up.
        let e = next_event(&mut rx).await;
        assert_eq!(e.key, key);
        assert!(e.outcome.is_ok(), "{e:?}");
        assert_eq!(e.transition, None);
        assert!(!e.up);
        let e = next_event(&mut rx).await;
        assert!(
            matches!(e.transition, Some(Transition::Up(ProbeOutcome::Ok { .. }))),
            "{e:?}"
        );
        assert!(e.up);

        stop.cancel();
        timeout(BOUND, server).await.unwrap().unwrap();

        // Possibly a few more successes raced with the shutdown; then fall=2
        // refusals take it down.
        let down = loop {
            let e = next_event(&mut rx).await;
            if e.transition.is_some() {
                break e;
            }
        };
        assert_eq!(
            down.transition,
            Some(Transition::Down(ProbeOutcome::Refused)),
            "{down:?}"
        );
        assert_eq!(down.outcome, ProbeOutcome::Refused);
        assert!(!down.up);

        // Cancellation is prompt.
        cancel.cancel();
        timeout(Duration::from_secs(1), handle)
            .await
            .unwrap()
            .unwrap();
    }

    #[tokio::test]
    async fn checker_stops_promptly_mid_interval_and_on_drop() {
        let port = closed_port().await;
        let target = CheckTarget {
            key: test_key(IpAddr::V4(Ipv4Addr::LOCALHOST)),
            label: "web".into(),
        };
        let mut check = tcp_check(port);
        check.interval = Duration::from_secs(3600);
        let (tx, _rx) = mpsc::unbounded_channel();
        let checker = Checker::spawn(
            target.clone(),
            check.clone(),
            true,
            tx.clone(),
            ProbeLimit::new(8),
        );
        timeout(Duration::from_secs(1), checker.stop())
            .await
            .unwrap();

        // Dropping the receiver also ends a checker.
        let (tx2, rx2) = mpsc::unbounded_channel();
        let handle = spawn_checker(
            target,
            check,
            true,
            tx2,
            CancellationToken::new(),
            ProbeLimit::new(8),
        );
        drop(rx2);
        timeout(Duration::from_secs(1), handle)
            .await
            .unwrap()
            .unwrap();
        drop(tx);
    }

    #[tokio::test]
    async fn probes_in_flight_never_exceed_the_shared_limit() {
        use std::sync::atomic::{AtomicUsize, Ordering::SeqCst};
        // An HTTP server that holds every connection 100 ms before
        // answering, counting how many are open at once.
        let l = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let port = l.local_addr().unwrap().port();
        let open = Arc::new(AtomicUsize::new(0));
        let peak = Arc::new(AtomicUsize::new(0));
        let served = Arc::new(AtomicUsize::new(0));
        let (o, p, n) = (open.clone(), peak.clone(), served.clone());
        let server = tokio::spawn(async move {
            loop {
                let (mut sock, _) = l.accept().await.unwrap();
                let now = o.fetch_add(1, SeqCst) + 1;
                p.fetch_max(now, SeqCst);
                let (o, n) = (o.clone(), n.clone());
                tokio::spawn(async move {
                    let mut buf = [0u8; 1024];
                    let _ = sock.read(&mut buf).await;
                    tokio::time::sleep(Duration::from_millis(100)).await;
                    let _ = sock
                        .write_all(b"HTTP/1.1 200 OK\r\nContent-Length: 0\r\n\r\n")
                        .await;
                    o.fetch_sub(1, SeqCst);
                    n.fetch_add(1, SeqCst);
                });
            }
        });
        let limit = ProbeLimit::new(2);
        let (tx, _rx) = mpsc::unbounded_channel();
        let mut check = http_check(port, "/", None);
        check.interval = Duration::from_millis(20);
        let checkers: Vec<Checker> = (0..8)
            .map(|i| {
                let mut key = test_key(IpAddr::V4(Ipv4Addr::LOCALHOST));
                key.vip.port = 1000 + i;
                let target = CheckTarget {
                    key,
                    label: "web".into(),
                };
                Checker::spawn(target, check.clone(), true, tx.clone(), limit.clone())
            })
            .collect();
        let deadline = Instant::now() + BOUND;
        while served.load(SeqCst) < 16 && Instant::now() < deadline {
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
        drop(checkers);
        server.abort();
        assert!(
            served.load(SeqCst) >= 16,
            "{} probes served",
            served.load(SeqCst)
        );
        let peak = peak.load(SeqCst);
        assert!(
            peak <= 2,
            "{peak} probes in flight at once with a limit of 2"
        );
    }

    #[tokio::test]
    async fn checker_kind_none_reports_up_once() {
        let target = CheckTarget {
            key: test_key(IpAddr::V4(Ipv4Addr::LOCALHOST)),
            label: "web".into(),
        };
        let mut check = tcp_check(closed_port().await);
        check.kind = HealthCheckKind::None;
        check.rise = 3;
        let (tx, mut rx) = mpsc::unbounded_channel();
        let checker = Checker::spawn(target, check, false, tx, ProbeLimit::new(8));
        let e = next_event(&mut rx).await;
        assert!(e.up);
        assert!(matches!(e.transition, Some(Transition::Up(_))));
        // No further probes.
        assert!(
            timeout(Duration::from_millis(200), rx.recv())
                .await
                .is_err()
        );
        drop(checker);
        assert!(timeout(BOUND, rx.recv()).await.unwrap().is_none());
    }
}
