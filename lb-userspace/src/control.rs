//! The control protocol between `lb` subcommands and the running agent:
//! one JSON request line over the agent's Unix socket, one JSON reply line.
//! Both ends live here: [`call`] for the CLI, [`bind`] and [`serve`] for
//! the agent.

use std::{
    collections::BTreeMap,
    io::{BufRead, BufReader},
    net::{IpAddr, SocketAddr},
    os::unix::{fs::PermissionsExt as _, net::UnixStream},
    path::Path,
    sync::Arc,
    time::{Duration, Instant},
};

use anyhow::{Context as _, bail};
use log::warn;
use serde::{Deserialize, Serialize};
use tokio::{
    io::{AsyncBufReadExt, AsyncReadExt as _, AsyncWriteExt},
    net::UnixListener,
    sync::{Semaphore, mpsc, oneshot},
};

use crate::{
    config::{Forwarding, Protocol},
    timing,
};

#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(tag = "cmd", rename_all = "snake_case")]
pub enum Request {
    Status,
    VipList,
    BackendList {
        vip: Option<String>,
    },
    BackendAdd {
        vip: String,
        address: IpAddr,
        weight: u32,
    },
    BackendRemove {
        vip: String,
        address: IpAddr,
    },
    BackendDrain {
        vip: String,
        address: IpAddr,
    },
    BackendUndrain {
        vip: String,
        address: IpAddr,
    },
    BackendSetWeight {
        vip: String,
        address: IpAddr,
        weight: u32,
    },
    Stats,
    Explain {
        src: SocketAddr,
        dst: SocketAddr,
        protocol: Protocol,
    },
    Reload,
    /// Drops CLI overrides: all, a VIP's, or one backend's.
    OverrideClear {
        vip: Option<String>,
        address: Option<IpAddr>,
    },
    /// Takes a VIP out of the announcement (its address's route goes
    /// unless another ready VIP shares the address).
    VipWithdraw {
        vip: String,
    },
    /// Undoes [`Request::VipWithdraw`].
    VipAnnounce {
        vip: String,
    },
    /// Withdraws every route of the host.
    HostDrain,
    /// Undoes [`Request::HostDrain`].
    HostUndrain,
}

#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct Reply {
    pub ok: bool,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub error: Option<String>,
    #[serde(default)]
    pub data: serde_json::Value,
}

impl Reply {
    pub fn ok(data: impl Serialize) -> Self {
        Self {
            ok: true,
            error: None,
            data: serde_json::to_value(data).unwrap_or(serde_json::Value::Null),
        }
    }

    pub fn err(e: impl std::fmt::Display) -> Self {
        Self {
            ok: false,
            error: Some(e.to_string()),
            data: serde_json::Value::Null,
        }
    }
}

#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct InterfaceView {
    pub name: String,
    pub ifindex: u32,
    pub mode: String,
}

#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct StatusView {
    pub instance: String,
    pub pid: u32,
    pub uptime_s: u64,
    pub config: String,
    pub pin_dir: String,
    /// The data path was found pinned by an earlier agent and kept.
    pub restored: bool,
    pub interfaces: Vec<InterfaceView>,
    pub vips: usize,
    pub backends: usize,
    pub backends_up: usize,
    pub metrics: Option<String>,
    /// Changes made with the CLI on top of the file (kept by reloads).
    #[serde(default)]
    pub overrides: Vec<OverrideView>,
    /// VIP announcement (`None`: off).
    #[serde(default)]
    pub announce: Option<AnnounceStatusView>,
    /// The agent's version (its crate version).
    #[serde(default)]
    pub version: String,
    /// Flow records the conntrack table holds at most (`conntrack_entries`).
    #[serde(default)]
    pub conntrack_entries: u32,
}

/// VIP announcement as `lb status` shows it.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct AnnounceStatusView {
    pub table: u32,
    pub protocol: u8,
    pub device: String,
    /// `lb host drain`: every route withdrawn.
    pub host_drained: bool,
    /// The addresses with a route in the table.
    pub announced: Vec<IpAddr>,
    /// VIPs taken out with `lb vip withdraw`, by name.
    pub withdrawn: Vec<String>,
    /// The last route change that failed (retried every tick), if any.
    #[serde(default)]
    pub error: Option<String>,
}

/// A CLI change in force on top of the configuration file.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct OverrideView {
    pub vip: String,
    pub address: IpAddr,
    /// e.g. "added", "removed", "state drain (file: active)".
    pub change: String,
}

#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct VipView {
    pub name: String,
    pub address: IpAddr,
    pub port: u16,
    pub protocol: Protocol,
    pub index: u32,
    pub ring_size: u32,
    pub backends: usize,
    pub backends_in_ring: usize,
    pub health_check: String,
    /// How packets reach the backends.
    #[serde(default)]
    pub forwarding: Forwarding,
    /// NAT VIPs: the SNAT addresses new flows take (empty: each backend's
    /// route source).
    #[serde(default)]
    pub snat_addresses: Vec<IpAddr>,
    /// Source access control: prefixes in the allow and deny lists.
    #[serde(default)]
    pub acl_allow: usize,
    #[serde(default)]
    pub acl_deny: usize,
    /// Who picks a new flow's backend.
    #[serde(default)]
    pub scheduler: crate::sched::Scheduler,
    /// Rate limits (per second; 0: off).
    #[serde(default)]
    pub rate_limit: RateLimitView,
    /// The VIP's address has a route in the announce table.
    #[serde(default)]
    pub announced: bool,
    /// Why (or why not), e.g. "ready", "withdrawn (lb vip announce)",
    /// "no usable backend", "off ([agent.announce] is not set)".
    #[serde(default)]
    pub announce: String,
}

/// A VIP's rate limits as `lb vip list` shows them (per second; 0: off).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct RateLimitView {
    pub new_per_source: u32,
    pub packets_per_source: u32,
    pub new_per_vip: u32,
    pub source_prefix_v4: u8,
    pub source_prefix_v6: u8,
}

#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct BackendView {
    pub vip: String,
    pub address: IpAddr,
    pub id: u32,
    pub weight: u32,
    pub state: String,
    pub health: Health,
    pub last_check: Option<String>,
    /// Ring slots this backend owns now.
    pub slots: u32,
    pub mac: Option<String>,
    pub iface: Option<String>,
    /// The route's gateway, when the backend is routed (tunnel modes):
    /// `mac` is the gateway's.
    #[serde(default)]
    pub gateway: Option<IpAddr>,
    /// Why the next hop is unknown (health `unresolved`), or not known yet.
    #[serde(default)]
    pub next_hop_error: Option<String>,
    /// Conntrack records and live NAT flows naming this backend that have
    /// not expired, as last counted (the agent counts every few seconds); None before the
    /// first count.
    #[serde(default)]
    pub flows: Option<u64>,
    /// NAT VIPs: the port the backend's packets go to.
    #[serde(default)]
    pub port: Option<u16>,
    /// Least-connections VIPs: the active connections the kernel compares
    /// for this backend (its counter plus the agent's last correction).
    #[serde(default)]
    pub active_connections: Option<u64>,
}

/// A backend's health as the agent sees it.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Health {
    /// Passing its checks, next hop resolved: in the ring.
    Up,
    /// Failing its checks: out of the ring.
    Down,
    /// Its next hop is unknown: out of the ring whatever its checks say.
    Unresolved,
}

impl Health {
    pub fn as_str(self) -> &'static str {
        match self {
            Health::Up => "up",
            Health::Down => "down",
            Health::Unresolved => "unresolved",
        }
    }
}

impl std::fmt::Display for Health {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.pad(self.as_str())
    }
}

#[derive(Clone, Debug, Default, Serialize, Deserialize)]
pub struct Rates {
    pub packets: u64,
    pub bytes: u64,
    pub pps: f64,
    pub bps: f64,
}

#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct VipStatsView {
    pub vip: String,
    #[serde(flatten)]
    pub traffic: Rates,
    pub new_flows: u64,
    pub new_flows_ps: f64,
    pub conntrack_hits: u64,
    /// Conntrack hits / packets over the last interval (all time if idle).
    pub conntrack_hit_ratio: f64,
    /// NAT VIPs: replies translated back to clients, and their bytes.
    #[serde(default)]
    pub return_packets: u64,
    #[serde(default)]
    pub return_bytes: u64,
    /// Packets dropped by the VIP's source access control.
    #[serde(default)]
    pub acl_denied: u64,
    /// Packets refused by the VIP's rate limits.
    #[serde(default)]
    pub rate_limited: u64,
}

/// A source prefix a VIP's per-source limit refused packets of.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct LimitedSourceView {
    pub vip: String,
    /// The source prefix (its address, masked to the VIP's prefix length).
    pub source: IpAddr,
    /// `new` (connections) or `packets`.
    pub limit: String,
    pub dropped: u64,
    pub passed: u64,
}

#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct BackendStatsView {
    pub vip: String,
    pub address: IpAddr,
    pub health: Health,
    #[serde(flatten)]
    pub traffic: Rates,
    /// Least-connections VIPs: the active connections the kernel compares.
    #[serde(default)]
    pub active_connections: Option<u64>,
    /// Times its health changed (up to down or back) since the agent
    /// started.
    #[serde(default)]
    pub health_transitions: u64,
    /// How long its passing health checks took (None: no check passed).
    #[serde(default)]
    pub check_latency: Option<LatencyView>,
}

/// A histogram of health-check durations: `counts[i]` checks took at most
/// `le[i]` seconds (and more than the bound before); the last count is
/// over the last bound.
#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize)]
pub struct LatencyView {
    pub le: Vec<f64>,
    pub counts: Vec<u64>,
    pub sum_s: f64,
    pub count: u64,
}

#[derive(Clone, Debug, Default, Serialize, Deserialize)]
pub struct StatsView {
    pub interval_s: f64,
    pub vips: Vec<VipStatsView>,
    pub backends: Vec<BackendStatsView>,
    /// reason → (total, per second)
    pub reasons: BTreeMap<String, (u64, f64)>,
    /// NAT flows recorded (NAT_FWD + NAT_FWD6 entries) as last counted;
    /// None before the first count.
    #[serde(default)]
    pub nat_entries: Option<u64>,
    /// The source prefixes the per-source rate limits refused most (at
    /// most [`TOP_LIMITED_SOURCES`], most refusals first).
    #[serde(default)]
    pub limited_sources: Vec<LimitedSourceView>,
    /// Per VIP name: whether its address has a route in the announce
    /// table (`None`: announcing is off).
    #[serde(default)]
    pub announced: Option<BTreeMap<String, bool>>,
    /// Maglev tables the agent built since it started (not taken from its
    /// cache).
    #[serde(default)]
    pub ring_builds: u64,
    /// The agent's version.
    #[serde(default)]
    pub version: String,
    /// When the agent started (Unix time, seconds).
    #[serde(default)]
    pub started_unix_s: f64,
    /// Conntrack records as last counted and the tables' sizes; None
    /// before the first count.
    #[serde(default)]
    pub conntrack: Option<ConntrackView>,
}

/// Conntrack occupancy: records (expired ones included, until the LRU
/// reuses them) and capacity, per family.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct ConntrackView {
    pub records_v4: u64,
    pub records_v6: u64,
    pub capacity_v4: u64,
    pub capacity_v6: u64,
}

/// How many limited sources `lb stats` and the metrics show.
pub const TOP_LIMITED_SOURCES: usize = 10;

#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct ExplainView {
    pub vip: String,
    pub hash: u32,
    pub slot: u32,
    pub ring_size: u32,
    /// The backend the ring gives a new flow.
    pub ring_backend: Option<IpAddr>,
    /// The backend a conntrack entry holds for this flow, if any.
    pub conntrack_backend: Option<IpAddr>,
    /// Where the next packet of this flow goes.
    pub backend: Option<IpAddr>,
    pub reason: String,
    /// The outer header that packet gets (tunnel modes, when it goes to a
    /// backend).
    #[serde(default)]
    pub outer: Option<OuterView>,
    /// The translation the flow gets (NAT VIPs).
    #[serde(default)]
    pub nat: Option<NatView>,
    /// The VIP's scheduler (it decides new flows only).
    #[serde(default)]
    pub scheduler: crate::sched::Scheduler,
    /// What the scheduler would decide from (its rotation, or the counts it
    /// compares), when it is not Maglev.
    #[serde(default)]
    pub scheduler_state: Option<String>,
    /// The VIP's source access control on the flow's source (None: the
    /// VIP has no ACL).
    #[serde(default)]
    pub acl: Option<AclView>,
}

/// What a VIP's ACL says about a flow's source.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct AclView {
    pub allowed: bool,
    /// The longest matching prefix (`allow 198.18.0.0/16`), or the
    /// default that decided.
    pub by: String,
}

/// A NAT VIP's flow as the kernel translates it.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct NatView {
    /// Where the flow's packets go: the backend's address and port.
    pub backend: Option<SocketAddr>,
    /// The SNAT address:port the flow's NAT_FWD entry records (None: no
    /// entry, the first packet allocates the port).
    pub snat: Option<SocketAddr>,
    /// No NAT entry yet: the SNAT address the first packet would take
    /// (None: not known, the backend's route source is not resolved).
    pub snat_address: Option<IpAddr>,
    /// The flow's NAT_REV entry (the backend's replies: backend → SNAT),
    /// when present: the client and VIP they are translated back to.
    pub reverse: Option<NatReverseView>,
}

/// A NAT_REV entry, as `lb explain` shows it.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct NatReverseView {
    /// The replies' key: from the backend to the SNAT address.
    pub from: SocketAddr,
    pub to: SocketAddr,
    /// Translated back to: from the VIP to the client.
    pub vip: SocketAddr,
    pub client: SocketAddr,
    /// The interface the replies leave through (the client's packets'
    /// ingress).
    pub ifindex: u32,
}

/// The outer header of an encapsulated packet.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct OuterView {
    pub src: IpAddr,
    pub dst: IpAddr,
    /// `"ipip"` (IPv4 protocol 4, IPv6 next header 41 for 6in6 or 4 for
    /// 4in6) or `"gue"` (protocol / next header 17, UDP).
    pub forwarding: Forwarding,
    /// GUE: the UDP ports.
    pub src_port: Option<u16>,
    pub dst_port: Option<u16>,
}

impl OuterView {
    /// The outer header's protocol field in words, for a packet whose inner
    /// header is IPv6 when `inner_v6`: what an operator compares with a
    /// capture on the way to the backend.
    pub fn protocol(&self, inner_v6: bool) -> String {
        let (family, field) = if self.dst.is_ipv4() {
            ("IPv4", "protocol")
        } else {
            ("IPv6", "next header")
        };
        let (mode, number) = match self.forwarding {
            Forwarding::Gue => ("gue", 17),
            _ if inner_v6 => ("ipip", 41),
            _ => ("ipip", 4),
        };
        format!("{mode}: {family} {field} {number}")
    }
}

#[derive(Debug, thiserror::Error)]
pub enum ClientError {
    #[error(
        "no lb agent is listening on {0} (start one with `lb run --config FILE`, or pass --socket)"
    )]
    NoAgent(String),
    #[error(
        "permission denied on {0}: run lb as root (or as a member of the agent's control_group)"
    )]
    Permission(String),
    #[error("talking to the agent on {path}: {source}")]
    Io {
        path: String,
        source: std::io::Error,
    },
    #[error("the agent sent a reply that is not JSON: {0}")]
    BadReply(serde_json::Error),
    #[error("{0}")]
    Agent(String),
}

/// Sends one request and waits for the reply (bounded by `timeout`).
pub fn call(
    socket: &Path,
    req: &Request,
    timeout: Duration,
) -> Result<serde_json::Value, ClientError> {
    let shown = socket.display().to_string();
    let stream = UnixStream::connect(socket).map_err(|e| match e.kind() {
        std::io::ErrorKind::NotFound | std::io::ErrorKind::ConnectionRefused => {
            ClientError::NoAgent(shown.clone())
        }
        std::io::ErrorKind::PermissionDenied => ClientError::Permission(shown.clone()),
        _ => ClientError::Io {
            path: shown.clone(),
            source: e,
        },
    })?;
    let io = |source| ClientError::Io {
        path: shown.clone(),
        source,
    };
    stream.set_read_timeout(Some(timeout)).map_err(io)?;
    stream.set_write_timeout(Some(timeout)).map_err(io)?;
    let mut line = serde_json::to_string(req).expect("requests serialize");
    line.push('\n');
    send_all(&stream, line.as_bytes()).map_err(io)?;
    let mut reply = String::new();
    BufReader::new(&stream).read_line(&mut reply).map_err(io)?;
    let reply: Reply = serde_json::from_str(&reply).map_err(ClientError::BadReply)?;
    if reply.ok {
        Ok(reply.data)
    } else {
        Err(ClientError::Agent(
            reply.error.unwrap_or_else(|| "unknown error".into()),
        ))
    }
}

/// Writes all of `buf` without raising SIGPIPE when the agent has gone
/// (the CLI runs with SIGPIPE's default action, so that `lb ... | head`
/// ends quietly).
fn send_all(stream: &UnixStream, mut buf: &[u8]) -> std::io::Result<()> {
    use std::os::fd::AsRawFd as _;
    while !buf.is_empty() {
        // SAFETY: `buf` is valid for `buf.len()` bytes; the fd is open.
        let n = unsafe {
            libc::send(
                stream.as_raw_fd(),
                buf.as_ptr().cast(),
                buf.len(),
                libc::MSG_NOSIGNAL,
            )
        };
        if n < 0 {
            let e = std::io::Error::last_os_error();
            if e.kind() == std::io::ErrorKind::Interrupted {
                continue;
            }
            return Err(e);
        }
        buf = &buf[n as usize..];
    }
    Ok(())
}

/// A request from a control client and where its reply goes.
pub type ControlMsg = (Request, oneshot::Sender<Reply>);

/// The longest request line the agent reads; a longer one gets an error
/// reply and the connection is closed.
pub const MAX_REQUEST_LINE: usize = 64 * 1024;
/// Control clients served at once; more get a "busy" reply.
pub const MAX_CLIENTS: usize = 32;

/// Who may use the control socket. The socket file is `0600` (root only),
/// or `0660` with `group`; on top of that, requests that change the agent
/// are accepted only from root or members of `group` (checked on the
/// peer's credentials), read-only ones from whoever can connect.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct SocketAccess {
    /// `(name, gid)` of `[agent] control_group`.
    pub group: Option<(String, u32)>,
}

impl SocketAccess {
    /// Resolves `[agent] control_group` (a group name or a numeric gid).
    pub fn resolve(group: Option<&str>) -> anyhow::Result<Self> {
        let Some(name) = group else {
            return Ok(Self::default());
        };
        let gid = match name.parse::<u32>() {
            Ok(gid) => gid,
            Err(_) => match gid_of(name)
                .with_context(|| format!("agent.control_group: looking up group {name:?}"))?
            {
                Some(gid) => gid,
                None => bail!("agent.control_group: no group named {name:?} on this host"),
            },
        };
        Ok(Self {
            group: Some((name.to_string(), gid)),
        })
    }

    /// The socket file's mode.
    pub fn mode(&self) -> u32 {
        if self.group.is_some() { 0o660 } else { 0o600 }
    }

    /// Whether a peer may send requests that change the agent.
    fn may_change(&self, uid: u32, gid: u32, pid: Option<i32>) -> bool {
        // SAFETY: geteuid has no preconditions.
        if uid == 0 || uid == unsafe { libc::geteuid() } {
            return true;
        }
        let Some((_, group)) = self.group else {
            return false;
        };
        gid == group || pid.is_some_and(|pid| supplementary_groups(pid).contains(&group))
    }

    fn who_may_change(&self) -> String {
        match &self.group {
            Some((name, _)) => format!("root or members of group {name}"),
            None => "root".into(),
        }
    }
}

fn gid_of(name: &str) -> anyhow::Result<Option<u32>> {
    let cname = std::ffi::CString::new(name).context("a group name without NUL")?;
    let mut buf = vec![0u8; 16 * 1024];
    // SAFETY: an all-zero `group` is a valid out-parameter.
    let mut grp: libc::group = unsafe { std::mem::zeroed() };
    let mut out: *mut libc::group = std::ptr::null_mut();
    // SAFETY: every pointer is valid for the call; `buf` outlives it.
    let rc = unsafe {
        libc::getgrnam_r(
            cname.as_ptr(),
            &mut grp,
            buf.as_mut_ptr().cast(),
            buf.len(),
            &mut out,
        )
    };
    if rc != 0 {
        bail!(std::io::Error::from_raw_os_error(rc));
    }
    Ok((!out.is_null()).then_some(grp.gr_gid))
}

/// The supplementary groups of a process (empty if it is gone).
fn supplementary_groups(pid: i32) -> Vec<u32> {
    std::fs::read_to_string(format!("/proc/{pid}/status"))
        .ok()
        .and_then(|s| {
            s.lines().find_map(|l| l.strip_prefix("Groups:")).map(|g| {
                g.split_whitespace()
                    .filter_map(|x| x.parse().ok())
                    .collect()
            })
        })
        .unwrap_or_default()
}

impl Request {
    /// Requests that only read the agent's state.
    pub fn is_read_only(&self) -> bool {
        matches!(
            self,
            Request::Status
                | Request::VipList
                | Request::BackendList { .. }
                | Request::Stats
                | Request::Explain { .. }
        )
    }

    fn name(&self) -> &'static str {
        match self {
            Request::Status => "status",
            Request::VipList => "vip list",
            Request::BackendList { .. } => "backend list",
            Request::BackendAdd { .. } => "backend add",
            Request::BackendRemove { .. } => "backend remove",
            Request::BackendDrain { .. } => "backend drain",
            Request::BackendUndrain { .. } => "backend undrain",
            Request::BackendSetWeight { .. } => "backend set-weight",
            Request::Stats => "stats",
            Request::Explain { .. } => "explain",
            Request::Reload => "reload",
            Request::OverrideClear { .. } => "override clear",
            Request::VipWithdraw { .. } => "vip withdraw",
            Request::VipAnnounce { .. } => "vip announce",
            Request::HostDrain => "host drain",
            Request::HostUndrain => "host undrain",
        }
    }
}

/// Binds the agent's control socket with `access.mode()` whatever the
/// umask, refusing to steal it from a running agent and replacing a stale
/// one.
pub fn bind(path: &Path, access: &SocketAccess) -> anyhow::Result<UnixListener> {
    if let Some(dir) = path.parent().filter(|d| !d.as_os_str().is_empty()) {
        crate::rundir::create(dir)?;
    }
    if std::fs::symlink_metadata(path).is_ok() {
        if UnixStream::connect(path).is_ok() {
            bail!(
                "another lb agent is already listening on {}; stop it first or use another instance",
                path.display()
            );
        }
        let _ = std::fs::remove_file(path);
    }
    let mode = access.mode();
    let listener = bind_with_mode(path, mode)
        .with_context(|| format!("binding the control socket {}", path.display()))?;
    let set = || -> std::io::Result<()> {
        if let Some((_, gid)) = access.group {
            std::os::unix::fs::lchown(path, None, Some(gid))?;
        }
        // The umask may have taken bits from `mode`: set it exactly.
        std::fs::set_permissions(path, std::fs::Permissions::from_mode(mode))
    };
    if let Err(e) = set() {
        let _ = std::fs::remove_file(path);
        return Err(e).with_context(|| {
            format!(
                "setting owner and mode {mode:o} of the control socket {}",
                path.display()
            )
        });
    }
    listener.set_nonblocking(true)?;
    Ok(UnixListener::from_std(listener)?)
}

/// A listening Unix socket whose file is created with at most `mode`: the
/// kernel gives the new file the socket inode's mode (set here before
/// `bind`) less the umask, so it is never wider than `mode`, not even for
/// an instant.
fn bind_with_mode(path: &Path, mode: u32) -> std::io::Result<std::os::unix::net::UnixListener> {
    use std::os::{fd::FromRawFd as _, unix::ffi::OsStrExt as _};
    let bytes = path.as_os_str().as_bytes();
    // SAFETY: an all-zero sockaddr_un is valid.
    let mut addr: libc::sockaddr_un = unsafe { std::mem::zeroed() };
    if bytes.len() >= addr.sun_path.len() || bytes.contains(&0) {
        return Err(std::io::Error::new(
            std::io::ErrorKind::InvalidInput,
            format!(
                "a socket path must be shorter than {} bytes, without NUL",
                addr.sun_path.len()
            ),
        ));
    }
    addr.sun_family = libc::AF_UNIX as libc::sa_family_t;
    for (d, s) in addr.sun_path.iter_mut().zip(bytes) {
        *d = *s as libc::c_char;
    }
    let cvt = |rc: libc::c_int| {
        if rc < 0 {
            Err(std::io::Error::last_os_error())
        } else {
            Ok(rc)
        }
    };
    // SAFETY: plain syscalls on an fd owned by the returned listener (or
    // closed by it when dropped on an error).
    unsafe {
        let fd = cvt(libc::socket(
            libc::AF_UNIX,
            libc::SOCK_STREAM | libc::SOCK_CLOEXEC,
            0,
        ))?;
        let listener = std::os::unix::net::UnixListener::from_raw_fd(fd);
        cvt(libc::fchmod(fd, mode as libc::mode_t))?;
        let len = std::mem::size_of::<libc::sa_family_t>() + bytes.len() + 1;
        cvt(libc::bind(
            fd,
            (&raw const addr).cast(),
            len as libc::socklen_t,
        ))?;
        if let Err(e) = cvt(libc::listen(fd, 128)) {
            let _ = std::fs::remove_file(path);
            return Err(e);
        }
        Ok(listener)
    }
}

/// Accepts control clients until the process ends: reads one request line
/// from each (at most [`MAX_REQUEST_LINE`] bytes), hands it to the agent
/// over `tx` and writes back the reply; at most [`MAX_CLIENTS`] at once.
pub async fn serve(listener: UnixListener, tx: mpsc::Sender<ControlMsg>, access: SocketAccess) {
    let slots = Arc::new(Semaphore::new(MAX_CLIENTS));
    let access = Arc::new(access);
    let mut last_busy_log: Option<Instant> = None;
    loop {
        let stream = match listener.accept().await {
            Ok((stream, _)) => stream,
            Err(e) => {
                // EMFILE and the like: don't spin; try again shortly.
                warn!("control socket: accept failed: {e}");
                tokio::time::sleep(timing::CONTROL_ACCEPT_BACKOFF).await;
                continue;
            }
        };
        let Ok(slot) = slots.clone().try_acquire_owned() else {
            if last_busy_log.is_none_or(|t| t.elapsed() >= Duration::from_secs(10)) {
                warn!("control socket: {MAX_CLIENTS} clients connected; refusing more");
                last_busy_log = Some(Instant::now());
            }
            // A fresh socket's buffer takes a short reply at once: no
            // task, no waiting.
            let reply = Reply::err(format!(
                "the agent is busy: {MAX_CLIENTS} control clients are connected; try again"
            ));
            let mut out = serde_json::to_string(&reply).unwrap_or_default();
            out.push('\n');
            let _ = stream.try_write(out.as_bytes());
            continue;
        };
        let tx = tx.clone();
        let access = access.clone();
        tokio::spawn(async move {
            serve_client(stream, tx, &access).await;
            drop(slot);
        });
    }
}

async fn serve_client(
    stream: tokio::net::UnixStream,
    tx: mpsc::Sender<ControlMsg>,
    access: &SocketAccess,
) {
    let cred = stream.peer_cred().ok();
    let (r, mut w) = stream.into_split();
    let mut r = tokio::io::BufReader::new(r).take(MAX_REQUEST_LINE as u64 + 1);
    let mut line = Vec::new();
    let read = tokio::time::timeout(timing::CONTROL_READ_TIMEOUT, r.read_until(b'\n', &mut line));
    let who = || match cred {
        Some(c) => format!("uid {} pid {}", c.uid(), c.pid().unwrap_or(0)),
        None => "a client".into(),
    };
    let reply = match read.await {
        Ok(Ok(0)) | Ok(Err(_)) | Err(_) => return,
        Ok(Ok(n)) if n > MAX_REQUEST_LINE && line.last() != Some(&b'\n') => {
            warn!(
                "control socket: {} sent a request line longer than {MAX_REQUEST_LINE} bytes; connection closed",
                who()
            );
            Reply::err(format!(
                "request line longer than {MAX_REQUEST_LINE} bytes; connection closed"
            ))
        }
        Ok(Ok(_)) => match serde_json::from_slice::<Request>(&line) {
            Err(e) => Reply::err(format!("bad request: {e}")),
            Ok(req)
                if !req.is_read_only()
                    && !cred.is_some_and(|c| access.may_change(c.uid(), c.gid(), c.pid())) =>
            {
                warn!(
                    "control socket: refused `{}` from {}: only {} may change the agent",
                    req.name(),
                    who(),
                    access.who_may_change()
                );
                Reply::err(format!(
                    "permission denied: `{}` changes the agent and needs {}; others may only read (status, lists, stats, explain)",
                    req.name(),
                    access.who_may_change()
                ))
            }
            Ok(req) => {
                let (otx, orx) = oneshot::channel();
                if tx.send((req, otx)).await.is_err() {
                    Reply::err("the agent is shutting down")
                } else {
                    orx.await
                        .unwrap_or_else(|_| Reply::err("the agent is shutting down"))
                }
            }
        },
    };
    let _ = write_reply(&mut w, &reply).await;
}

/// Writes one reply line, giving up after [`timing::CONTROL_WRITE_TIMEOUT`].
async fn write_reply(
    w: &mut tokio::net::unix::OwnedWriteHalf,
    reply: &Reply,
) -> std::io::Result<()> {
    let mut out = serde_json::to_string(reply).unwrap_or_default();
    out.push('\n');
    match tokio::time::timeout(timing::CONTROL_WRITE_TIMEOUT, w.write_all(out.as_bytes())).await {
        Ok(r) => r,
        Err(_) => Err(std::io::ErrorKind::TimedOut.into()),
    }
}

#[cfg(test)]
mod tests {
    #[allow(unused_imports)]
    use std::net::{IpAddr, Ipv4Addr};

    use super::*;
    #[allow(unused_imports)]
    use crate::keys::ip4;

    #[test]
    fn the_outer_protocol_names_the_family_and_number_of_each_tunnel() {
        let outer = |forwarding, dst: &str| OuterView {
            src: dst.parse().unwrap(),
            dst: dst.parse().unwrap(),
            forwarding,
            src_port: None,
            dst_port: None,
        };
        let cases = [
            (
                Forwarding::Ipip,
                "198.18.0.11",
                false,
                "ipip: IPv4 protocol 4",
            ),
            (
                Forwarding::Gue,
                "198.18.0.11",
                false,
                "gue: IPv4 protocol 17",
            ),
            (
                Forwarding::Ipip,
                "2001:2::11",
                true,
                "ipip: IPv6 next header 41",
            ),
            (
                Forwarding::Ipip,
                "2001:2::11",
                false,
                "ipip: IPv6 next header 4",
            ),
            (
                Forwarding::Gue,
                "2001:2::11",
                true,
                "gue: IPv6 next header 17",
            ),
        ];
        for (f, dst, inner_v6, want) in cases {
            assert_eq!(outer(f, dst).protocol(inner_v6), want, "{f:?} to {dst}");
        }
    }

    #[test]
    fn requests_round_trip_as_json_lines() {
        let reqs = [
            Request::Status,
            Request::BackendDrain {
                vip: "web".into(),
                address: ip4(198, 18, 0, 11),
            },
            Request::Explain {
                src: "198.18.0.1:40000".parse().unwrap(),
                dst: "198.19.0.1:80".parse().unwrap(),
                protocol: Protocol::Tcp,
            },
            Request::VipWithdraw { vip: "web".into() },
            Request::HostDrain,
        ];
        for r in reqs {
            let s = serde_json::to_string(&r).unwrap();
            assert!(!s.contains('\n'));
            assert_eq!(serde_json::from_str::<Request>(&s).unwrap(), r);
        }
    }

    #[test]
    fn a_missing_socket_says_no_agent_runs() {
        let e = call(
            Path::new("/nonexistent/lb.sock"),
            &Request::Status,
            Duration::from_secs(1),
        )
        .unwrap_err();
        assert!(matches!(e, ClientError::NoAgent(_)), "{e}");
        assert!(e.to_string().contains("lb run"));
    }

    fn temp_socket(tag: &str) -> std::path::PathBuf {
        let dir = std::env::temp_dir().join(format!("lb-ctl-{tag}-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        dir.join("lb.sock")
    }

    /// An agent that answers every request it is handed with "ok".
    fn answer_everything(mut rx: mpsc::Receiver<ControlMsg>) {
        tokio::spawn(async move {
            while let Some((_, reply)) = rx.recv().await {
                let _ = reply.send(Reply::ok("ok"));
            }
        });
    }

    fn mode_of(path: &Path) -> u32 {
        std::fs::metadata(path).unwrap().permissions().mode() & 0o7777
    }

    #[tokio::test]
    async fn the_socket_is_0600_and_a_live_one_is_not_stolen() {
        let path = temp_socket("mode");
        let l = bind(&path, &SocketAccess::default()).unwrap();
        assert_eq!(mode_of(&path), 0o600);
        let e = bind(&path, &SocketAccess::default())
            .unwrap_err()
            .to_string();
        assert!(e.contains("already listening"), "{e}");
        drop(l);
        // Stale: replaced.
        let _l = bind(&path, &SocketAccess::default()).unwrap();
        assert_eq!(mode_of(&path), 0o600);
        let _ = std::fs::remove_dir_all(path.parent().unwrap());
    }

    #[tokio::test]
    async fn with_a_group_the_socket_is_0660_and_owned_by_it() {
        use std::os::unix::fs::MetadataExt as _;
        let path = temp_socket("group");
        // gid 0 exists everywhere; given as a number it needs no lookup.
        let access = SocketAccess::resolve(Some("0")).unwrap();
        let _l = bind(&path, &access).unwrap();
        assert_eq!(mode_of(&path), 0o660);
        assert_eq!(std::fs::metadata(&path).unwrap().gid(), 0);
        let _ = std::fs::remove_dir_all(path.parent().unwrap());
    }

    #[test]
    fn an_unknown_group_is_an_error_naming_the_key() {
        let e = SocketAccess::resolve(Some("no-such-group-lb"))
            .unwrap_err()
            .to_string();
        assert!(
            e.contains("agent.control_group") && e.contains("no-such-group-lb"),
            "{e}"
        );
        let root = SocketAccess::resolve(Some("root")).unwrap();
        assert_eq!(root.group, Some(("root".into(), 0)));
    }

    #[test]
    fn only_root_or_the_group_may_change_the_agent() {
        let none = SocketAccess::default();
        assert!(none.may_change(0, 0, None));
        assert!(!none.may_change(65534, 65534, None));
        let group = SocketAccess {
            group: Some(("lb".into(), 4242)),
        };
        assert!(group.may_change(1000, 4242, None));
        assert!(!group.may_change(1000, 1000, None));
        // Supplementary groups come from the peer process: ours has no 4242.
        assert!(!group.may_change(1000, 1000, Some(std::process::id() as i32)));
        assert!(Request::Status.is_read_only());
        assert!(
            !Request::BackendDrain {
                vip: "web".into(),
                address: ip4(198, 18, 0, 11),
            }
            .is_read_only()
        );
        assert!(!Request::Reload.is_read_only());
    }

    #[tokio::test]
    async fn a_request_line_over_the_limit_is_refused_and_the_connection_closed() {
        use tokio::io::AsyncReadExt as _;
        let path = temp_socket("long");
        let l = bind(&path, &SocketAccess::default()).unwrap();
        let (tx, rx) = mpsc::channel(4);
        answer_everything(rx);
        tokio::spawn(serve(l, tx, SocketAccess::default()));
        let mut c = tokio::net::UnixStream::connect(&path).await.unwrap();
        // Sends up to 8 MiB without a newline; the agent stops reading
        // after the limit, so the writes end with an error (or stall).
        let chunk = vec![b'x'; 64 * 1024];
        let mut sent = 0usize;
        while sent < 8 << 20 {
            match tokio::time::timeout(Duration::from_secs(2), c.write_all(&chunk)).await {
                Ok(Ok(())) => sent += chunk.len(),
                _ => break,
            }
        }
        assert!(sent < 8 << 20, "the agent read {sent} bytes of one line");
        let mut reply = Vec::new();
        let _ = tokio::time::timeout(Duration::from_secs(2), c.read_to_end(&mut reply)).await;
        let reply = String::from_utf8_lossy(&reply);
        assert!(reply.contains("longer than 65536 bytes"), "{reply}");
        // A good request still works afterwards.
        let r = tokio::task::spawn_blocking(move || {
            call(&path, &Request::Status, Duration::from_secs(5))
        })
        .await
        .unwrap()
        .unwrap();
        assert_eq!(r, serde_json::Value::from("ok"));
    }

    #[tokio::test]
    async fn clients_over_the_limit_get_a_busy_reply() {
        let path = temp_socket("busy");
        let l = bind(&path, &SocketAccess::default()).unwrap();
        let (tx, rx) = mpsc::channel(4);
        answer_everything(rx);
        tokio::spawn(serve(l, tx, SocketAccess::default()));
        let mut idle = Vec::new();
        for _ in 0..MAX_CLIENTS {
            idle.push(tokio::net::UnixStream::connect(&path).await.unwrap());
        }
        let p = path.clone();
        let e =
            tokio::task::spawn_blocking(move || call(&p, &Request::Status, Duration::from_secs(5)))
                .await
                .unwrap()
                .unwrap_err()
                .to_string();
        assert!(e.contains("busy"), "{e}");
        drop(idle);
        // Slots come back when clients leave.
        let deadline = Instant::now() + Duration::from_secs(5);
        loop {
            let p = path.clone();
            let r = tokio::task::spawn_blocking(move || {
                call(&p, &Request::Status, Duration::from_secs(5))
            })
            .await
            .unwrap();
            if r.is_ok() {
                break;
            }
            assert!(Instant::now() < deadline, "{r:?}");
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
        let _ = std::fs::remove_dir_all(path.parent().unwrap());
    }
}
