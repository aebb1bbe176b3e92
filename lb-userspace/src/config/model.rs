//! The validated configuration: the types the rest of the agent works with,
//! their limits, and what a reload may do with a changed `[agent]` table.

use std::{
    fmt,
    net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr},
    path::{Path, PathBuf},
    str::FromStr,
    time::Duration,
};

use serde::{Deserialize, Serialize};

use super::{ConfigError, validate};

/// Smallest accepted ring size.
pub const MIN_RING_SIZE: u32 = 3;
pub use crate::maglev::MAX_RING_SIZE;
/// Largest accepted `conntrack_entries`.
pub const MAX_CONNTRACK_ENTRIES: u32 = 1 << 28;
/// Largest accepted `max_vips`.
pub const VIPS_LIMIT: u32 = 65_536;
/// Largest accepted `max_backends`.
pub const BACKENDS_LIMIT: u32 = 1 << 20;
/// Largest accepted `max_vips * ring_size` (the RINGS map's element count).
pub const RING_SLOTS_LIMIT: u64 = 1 << 28;
/// Largest accepted backend weight.
pub const MAX_WEIGHT: u32 = 10_000;
/// Default instance name.
pub const DEFAULT_INSTANCE: &str = "default";

/// A validated configuration.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Config {
    pub agent: AgentConfig,
    pub vips: Vec<VipConfig>,
    /// The file it came from (or whatever name was given to [`Config::parse`],
    /// conventionally `"<string>"`).
    pub source: PathBuf,
}

/// The `[agent]` table, with defaults applied, grouped by what a reload
/// does with a change (see [`reload_check`]). The file keeps the flat
/// `[agent]` keys.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct AgentConfig {
    pub kernel: KernelSettings,
    pub start: StartSettings,
    pub conntrack: ConntrackSettings,
    pub encap: EncapSettings,
    pub nat: NatSettings,
}

/// Lowest accepted SNAT port: below are the well-known and privileged
/// ports a host's own services listen on.
pub const MIN_NAT_PORT: u16 = 1024;
/// Default `nat_port_range`: above Linux's default ephemeral range
/// (32768-60999), so the host's own connections never pick these ports.
pub const DEFAULT_NAT_PORTS: (u16, u16) = (61_000, 65_535);

/// What full NAT (`forwarding = "nat"`) hands out. Applied at once by a
/// reload; established NAT flows keep the allocation they recorded.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct NatSettings {
    /// The SNAT ports new flows get, `port_min..=port_max`.
    pub port_min: u16,
    pub port_max: u16,
    /// `[agent] snat_addresses`: the SNAT addresses of NAT VIPs that name
    /// none themselves, both families (at most
    /// [`lb_common::nat::MAX_SNAT_ADDRS`] each). Empty: each backend's route
    /// source.
    pub snat_addresses: Vec<IpAddr>,
}

impl Default for NatSettings {
    fn default() -> Self {
        Self {
            port_min: DEFAULT_NAT_PORTS.0,
            port_max: DEFAULT_NAT_PORTS.1,
            snat_addresses: Vec::new(),
        }
    }
}

/// What the tunnel forwarding modes (ipip, gue) put in the outer header.
/// Applied at once by a reload (backend and VIP entries are rewritten).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct EncapSettings {
    /// The outer source address of every encapsulated packet; `None`: per
    /// backend, the preferred source of the kernel's route to it, else the
    /// first IPv4 address of its egress interface.
    pub source_v4: Option<Ipv4Addr>,
    /// The same for IPv6 backends (IPv6 outer headers); `None`: per
    /// backend, the route's preferred source, else the egress
    /// interface's first global IPv6 address.
    pub source_v6: Option<Ipv6Addr>,
    /// The outer UDP destination port of GUE packets: the port the
    /// backends' decap program listens on.
    pub gue_port: u16,
}

impl Default for EncapSettings {
    fn default() -> Self {
        Self {
            source_v4: None,
            source_v6: None,
            gue_port: lb_common::DEFAULT_GUE_PORT,
        }
    }
}

/// How long a conntrack record steers its flow without packets. Applied
/// at once by a reload.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct ConntrackSettings {
    /// A UDP flow idle this long is over: its next packet is steered by
    /// the ring like a new flow (so draining a UDP backend ends).
    pub udp_idle: Duration,
    /// A TCP connection idle this long is over.
    pub tcp_idle: Duration,
    /// A TCP connection that sent a FIN or RST is over after this long
    /// without packets.
    pub tcp_closing: Duration,
    /// `syn_guard`: when SYNs go unrecorded (see lb-ebpf's syn_guard.rs).
    pub syn_guard: SynGuardMode,
    /// `syn_guard_rate`: in `auto` mode, SYNs per second for one VIP on
    /// one CPU above which that CPU stops recording the VIP's SYNs.
    pub syn_guard_rate: u32,
}

/// When the SYN-flood guard leaves SYNs unrecorded (steered by the ring,
/// the flow recorded by its first ACK).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub enum SynGuardMode {
    /// Above `syn_guard_rate`.
    #[default]
    Auto,
    /// Every SYN.
    Always,
    /// Never: every SYN is recorded.
    Off,
}

impl SynGuardMode {
    pub fn as_str(self) -> &'static str {
        match self {
            SynGuardMode::Auto => "auto",
            SynGuardMode::Always => "always",
            SynGuardMode::Off => "off",
        }
    }
}

/// Default `syn_guard_rate`: far above what one CPU records comfortably
/// (an LRU insert costs ~0.5 µs), far below a flood.
pub const DEFAULT_SYN_GUARD_RATE: u32 = 10_000;
/// Accepted `syn_guard_rate`.
pub const SYN_GUARD_RATE: (u32, u32) = (10, 100_000_000);

impl ConntrackSettings {
    /// The kernel's form ([`lb_common::Runtime::syn_guard`]) for ticks of
    /// `tick`: 0 off, 1 always, else the SYNs one CPU may record for one
    /// VIP per tick, plus one.
    pub fn syn_guard_word(&self, tick: Duration) -> u32 {
        match self.syn_guard {
            SynGuardMode::Off => 0,
            SynGuardMode::Always => 1,
            SynGuardMode::Auto => {
                let per_tick = u64::from(self.syn_guard_rate) * tick.as_millis() as u64 / 1000;
                u32::try_from(per_tick.max(1) + 1).unwrap_or(u32::MAX)
            }
        }
    }
}

/// Default `conntrack_udp_idle_ms`.
pub const DEFAULT_UDP_IDLE: Duration = Duration::from_secs(30);
/// Default `conntrack_tcp_idle_ms`.
pub const DEFAULT_TCP_IDLE: Duration = Duration::from_secs(3600);
/// Default `conntrack_tcp_closing_ms`.
pub const DEFAULT_TCP_CLOSING: Duration = Duration::from_secs(30);
/// Accepted range of the conntrack timeouts, in ms (1 s to 30 days).
pub const CONNTRACK_TIMEOUT_MS: (u32, u32) = (1_000, 2_592_000_000);

impl Default for ConntrackSettings {
    fn default() -> Self {
        Self {
            udp_idle: DEFAULT_UDP_IDLE,
            tcp_idle: DEFAULT_TCP_IDLE,
            tcp_closing: DEFAULT_TCP_CLOSING,
            syn_guard: SynGuardMode::Auto,
            syn_guard_rate: DEFAULT_SYN_GUARD_RATE,
        }
    }
}

/// What the pinned datapath was created with: its pin directory and its
/// map sizes. A reload refuses a file that changes any of them (and
/// applies nothing of it): they change only with a restart.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct KernelSettings {
    /// Pin dir `/sys/fs/bpf/lb/<instance>`.
    pub instance: String,
    pub conntrack_entries: u32,
    pub max_vips: u32,
    pub max_backends: u32,
    /// Default ring size of VIPs, and the ring stride of the datapath.
    pub ring_size: u32,
    /// Elements of each NAT map (NAT_FWD, NAT_REV and their IPv6 twins).
    pub nat_entries: u32,
    /// Elements of each ACL trie (ACL4, ACL6).
    pub acl_entries: u32,
}

impl KernelSettings {
    /// The map sizes these settings give the data path.
    pub fn map_sizes(&self) -> crate::map_sizes::MapSizes {
        crate::map_sizes::MapSizes {
            max_vips: self.max_vips,
            max_backends: self.max_backends,
            ring_size: self.ring_size,
            conntrack_entries: self.conntrack_entries,
            // IPv6 flows get as many records as IPv4 ones (one setting
            // sizes both tables).
            conntrack6_entries: self.conntrack_entries,
            nat_entries: self.nat_entries,
            acl_entries: self.acl_entries,
        }
    }
}

/// What the agent reads once when it starts. A reload that changes any of
/// them applies the VIPs and backends and warns that these take effect at
/// the next start.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct StartSettings {
    /// May be empty: the command line may supply the interfaces.
    pub interfaces: Vec<String>,
    pub xdp_mode: XdpModeSetting,
    pub control_socket: PathBuf,
    /// A group (name or gid) whose members may use the control socket
    /// (mode 0660, and changing requests); `None`: root only (mode 0600).
    pub control_group: Option<String>,
    pub metrics_listen: Option<SocketAddr>,
    /// `[agent.announce]`: where ready VIP addresses are published for a
    /// routing daemon. `None`: no announcement.
    pub announce: Option<AnnounceSettings>,
    /// `max_kernel_memory`: the most the maps may ask the kernel for, in
    /// bytes (see [`crate::kernel_memory`]); a config whose maps need more
    /// is refused.
    pub max_kernel_memory: u64,
}

/// Default route protocol number of the announced routes.
pub const DEFAULT_ANNOUNCE_PROTOCOL: u8 = 200;
/// Default device of the announced routes.
pub const DEFAULT_ANNOUNCE_DEVICE: &str = "lo";

/// `[agent.announce]`: every ready VIP address becomes a host route
/// (`ADDR/32` or `ADDR/128`) `dev device table table proto protocol` in the
/// agent's network namespace, for BIRD or FRR to pick up.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct AnnounceSettings {
    /// The kernel routing table: 1..=2^32-1, not 253, 254 or 255
    /// (default, main, local).
    pub table: u32,
    /// The route protocol the agent tags its routes with and recognises
    /// them by: 5..=255 (0-4 are the kernel's own).
    pub protocol: u8,
    /// The routes' device (must exist when the agent starts).
    pub device: String,
}

/// How to attach the XDP program.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash)]
pub enum XdpModeSetting {
    /// Native if the driver supports it, otherwise generic (skb).
    #[default]
    Auto,
    Native,
    Skb,
}

/// A VIP's L4 protocol. Its serde form (`"tcp"`, `"udp"`) is part of the
/// control protocol.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Protocol {
    Tcp,
    Udp,
}

/// How a VIP's packets reach its backends.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash, Serialize, Deserialize)]
pub enum Forwarding {
    /// Direct server return at L2: the frame's MACs rewritten; backends on
    /// lb's L2 segment.
    #[default]
    #[serde(rename = "dsr-l2")]
    DsrL2,
    /// IPv4-in-IPv4 to the backend's address; backends anywhere routed.
    #[serde(rename = "ipip")]
    Ipip,
    /// GUE (the packet in UDP to `gue_port`); backends anywhere routed.
    #[serde(rename = "gue")]
    Gue,
    /// Full NAT: destination rewritten to the backend, source to a SNAT
    /// address:port; replies come back through lb. Unmodified backends
    /// anywhere routed.
    #[serde(rename = "nat")]
    Nat,
}

impl Forwarding {
    pub fn as_str(self) -> &'static str {
        match self {
            Forwarding::DsrL2 => "dsr-l2",
            Forwarding::Ipip => "ipip",
            Forwarding::Gue => "gue",
            Forwarding::Nat => "nat",
        }
    }

    /// The mode's number in the kernel's VIP entry.
    pub fn kernel_value(self) -> u8 {
        match self {
            Forwarding::DsrL2 => lb_common::FORWARD_DSR_L2,
            Forwarding::Ipip => lb_common::FORWARD_IPIP,
            Forwarding::Gue => lb_common::FORWARD_GUE,
            Forwarding::Nat => lb_common::FORWARD_NAT,
        }
    }

    /// Puts an outer header in front of packets (ipip, gue): encapsulation
    /// overhead, an outer source, decap on the backend.
    pub fn is_tunnel(self) -> bool {
        matches!(self, Forwarding::Ipip | Forwarding::Gue)
    }

    /// Sends packets to a routed next hop (every mode but dsr-l2): the
    /// backend may sit behind a gateway, and its entry carries the route's
    /// source address (the outer source of a tunnel, NAT's default SNAT
    /// address).
    pub fn is_routed(self) -> bool {
        self != Forwarding::DsrL2
    }
}

/// One `[[vip]]`, with defaults applied.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct VipConfig {
    pub name: String,
    /// IPv4 or IPv6.
    pub address: IpAddr,
    pub port: u16,
    pub protocol: Protocol,
    pub forwarding: Forwarding,
    /// lb answers ICMP echo requests to the VIP's address itself (in XDP);
    /// an address answers only if every VIP at it allows it.
    pub icmp_echo: bool,
    /// Prime, at most the agent's ring size.
    pub ring_size: u32,
    pub health_check: HealthCheck,
    /// Unique by address; may be empty.
    pub backends: Vec<BackendConfig>,
    /// NAT VIPs: the SNAT addresses of the VIP's family its new flows
    /// take (its own `snat_addresses`, else the agent's), at most
    /// [`lb_common::nat::MAX_SNAT_ADDRS`]; empty: each backend's route
    /// source. Always empty for other modes.
    pub snat_addresses: Vec<IpAddr>,
    /// Source access control (empty: every source allowed).
    pub acl: crate::acl::VipAcl,
    /// `[vip.rate_limit]`; all zero: none.
    pub rate_limit: RateLimitConfig,
    /// Who picks the backend of a new flow.
    pub scheduler: crate::sched::Scheduler,
}

/// A VIP's `[vip.rate_limit]` table: rates per second (0: that limit is
/// off) and bursts (default: a tenth of a second's worth, at least 1).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct RateLimitConfig {
    /// New connections (TCP SYNs, first packets of UDP flows) per source.
    pub new_per_source: u32,
    pub new_per_source_burst: u32,
    /// Packets per source, established flows included.
    pub packets_per_source: u32,
    pub packets_per_source_burst: u32,
    /// New connections to the whole VIP.
    pub new_per_vip: u32,
    pub new_per_vip_burst: u32,
    /// The source prefix the per-source limits count by (default 32 and
    /// 128: per address).
    pub source_prefix_v4: u8,
    pub source_prefix_v6: u8,
}

impl RateLimitConfig {
    /// The kernel's form (RATE_LIMITS at the VIP's index).
    pub fn kernel(&self) -> lb_common::ratelimit::RateLimits {
        lb_common::ratelimit::RateLimits {
            src_new_rate: self.new_per_source,
            src_new_burst: self.new_per_source_burst,
            src_pkt_rate: self.packets_per_source,
            src_pkt_burst: self.packets_per_source_burst,
            vip_new_rate: self.new_per_vip,
            vip_new_burst: self.new_per_vip_burst,
            prefix_v4: self.source_prefix_v4,
            prefix_v6: self.source_prefix_v6,
            _pad: [0; 6],
        }
    }

    /// Any limit on.
    pub fn any(&self) -> bool {
        self.kernel().any()
    }
}

/// One `[[vip.backend]]`, with defaults applied.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct BackendConfig {
    /// Of the VIP's family for `dsr-l2`; a tunnel VIP over IPv4 may also
    /// have IPv6 backends (4in6).
    pub address: IpAddr,
    pub weight: u32,
    pub state: BackendState,
    /// Next-hop MAC override (a unicast address).
    pub mac: Option<[u8; 6]>,
    /// NAT VIPs: the port the backend listens on, when not the VIP's.
    pub port: Option<u16>,
    /// Fully resolved: the VIP's health check merged with the override.
    pub health_check: HealthCheck,
}

/// Administrative state of a backend.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash)]
pub enum BackendState {
    /// Receives new flows (when healthy).
    #[default]
    Active,
    /// Keeps its existing flows, receives no new ones.
    Drain,
}

/// A resolved health check.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct HealthCheck {
    pub kind: HealthCheckKind,
    pub port: u16,
    pub interval: Duration,
    pub timeout: Duration,
    pub rise: u32,
    pub fall: u32,
}

/// What a health check does.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum HealthCheckKind {
    /// A TCP connect.
    Tcp,
    /// `GET <path>` expecting `expected_status`.
    Http {
        path: String,
        expected_status: u16,
        host: Option<String>,
    },
    /// No checks: the backend is always considered healthy.
    None,
}

impl Config {
    /// Reads and validates `path`.
    pub fn load(path: &Path) -> Result<Config, ConfigError> {
        let text = std::fs::read_to_string(path).map_err(|e| ConfigError {
            file: path.to_path_buf(),
            line: None,
            column: None,
            field: None,
            message: format!("cannot read the configuration file: {e}"),
        })?;
        Config::parse(&text, path)
    }

    /// Parses and validates `text`; `source` names it in errors and becomes
    /// [`Config::source`].
    pub fn parse(text: &str, source: &Path) -> Result<Config, ConfigError> {
        validate::parse(text, source)
    }
}

/// Whether a reload may apply `new` over the running `old`, judged on the
/// `[agent]` settings only; messages name `new.source`.
///
/// - `Err(refusal)`: [`KernelSettings`] differ; nothing may be applied.
/// - `Ok(Some(warning))`: [`StartSettings`] differ; VIPs and backends are
///   applied now, these settings at the next start.
/// - `Ok(None)`: nothing restart-only changed.
pub fn reload_check(old: &Config, new: &Config) -> Result<Option<String>, String> {
    // Exhaustive on purpose: a new `[agent]` setting must join one of the
    // groups (and so be refused or reported on reload), or be handled here.
    // `conntrack` and `encap` are applied live.
    let AgentConfig {
        kernel,
        start,
        conntrack: _,
        encap: _,
        nat: _,
    } = &new.agent;
    if *kernel != old.agent.kernel {
        return Err(format!(
            "{}: instance and map sizes (max_vips, max_backends, ring_size, conntrack_entries, nat_entries, acl_entries) change only with a restart; nothing applied",
            new.source.display()
        ));
    }
    if *start != old.agent.start {
        return Ok(Some(format!(
            "{}: interfaces, xdp_mode, control_socket, control_group, metrics_listen, max_kernel_memory and [agent.announce] take effect at the next start; VIPs and backends are applied now",
            new.source.display()
        )));
    }
    Ok(None)
}

impl VipConfig {
    /// The VIP's identity.
    pub fn key(&self) -> (IpAddr, u16, Protocol) {
        (self.address, self.port, self.protocol)
    }

    /// The port `backend`'s packets go to: its own (NAT), else the VIP's.
    pub fn backend_port(&self, backend: &BackendConfig) -> u16 {
        backend.port.unwrap_or(self.port)
    }
}

impl Protocol {
    /// The IP protocol number.
    pub fn number(self) -> u8 {
        match self {
            Protocol::Tcp => lb_common::IPPROTO_TCP,
            Protocol::Udp => lb_common::IPPROTO_UDP,
        }
    }

    pub fn as_str(self) -> &'static str {
        match self {
            Protocol::Tcp => "tcp",
            Protocol::Udp => "udp",
        }
    }
}

impl XdpModeSetting {
    pub fn as_str(self) -> &'static str {
        match self {
            XdpModeSetting::Auto => "auto",
            XdpModeSetting::Native => "native",
            XdpModeSetting::Skb => "skb",
        }
    }
}

impl BackendState {
    pub fn as_str(self) -> &'static str {
        match self {
            BackendState::Active => "active",
            BackendState::Drain => "drain",
        }
    }
}

impl HealthCheckKind {
    /// `"tcp"`, `"http"` or `"none"`.
    pub fn name(&self) -> &'static str {
        KindTag::of(self).as_str()
    }
}

/// The error of the `FromStr` implementations of the keyword enums.
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
#[error("invalid {what} {got:?}, expected {}", one_of(.expected))]
pub struct ParseKeywordError {
    /// What was parsed, e.g. `"protocol"`.
    pub what: &'static str,
    pub got: String,
    pub expected: &'static [&'static str],
}

fn one_of(words: &[&str]) -> String {
    match words {
        [a, b] => format!("{a} or {b}"),
        _ => format!("one of {}", words.join(", ")),
    }
}

macro_rules! keyword_enum {
    ($ty:ty, $what:literal, [$($word:literal => $variant:expr),+ $(,)?]) => {
        impl FromStr for $ty {
            type Err = ParseKeywordError;
            fn from_str(s: &str) -> Result<Self, Self::Err> {
                match s {
                    $($word => Ok($variant),)+
                    _ => Err(ParseKeywordError {
                        what: $what,
                        got: s.to_owned(),
                        expected: &[$($word),+],
                    }),
                }
            }
        }
        impl fmt::Display for $ty {
            fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
                f.write_str(self.as_str())
            }
        }
    };
}

keyword_enum!(Protocol, "protocol", ["tcp" => Protocol::Tcp, "udp" => Protocol::Udp]);
keyword_enum!(Forwarding, "forwarding", [
    "dsr-l2" => Forwarding::DsrL2,
    "ipip" => Forwarding::Ipip,
    "gue" => Forwarding::Gue,
    "nat" => Forwarding::Nat,
]);
keyword_enum!(XdpModeSetting, "xdp_mode", [
    "auto" => XdpModeSetting::Auto,
    "native" => XdpModeSetting::Native,
    "skb" => XdpModeSetting::Skb,
]);
keyword_enum!(SynGuardMode, "syn_guard", [
    "auto" => SynGuardMode::Auto,
    "always" => SynGuardMode::Always,
    "off" => SynGuardMode::Off,
]);

keyword_enum!(BackendState, "backend state", [
    "active" => BackendState::Active,
    "drain" => BackendState::Drain,
]);
keyword_enum!(KindTag, "health check kind", [
    "tcp" => KindTag::Tcp,
    "http" => KindTag::Http,
    "none" => KindTag::None,
]);

impl fmt::Display for HealthCheckKind {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.name())
    }
}

/// `HealthCheckKind` without its data.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(super) enum KindTag {
    Tcp,
    Http,
    None,
}

impl KindTag {
    pub(super) fn of(kind: &HealthCheckKind) -> KindTag {
        match kind {
            HealthCheckKind::Tcp => KindTag::Tcp,
            HealthCheckKind::Http { .. } => KindTag::Http,
            HealthCheckKind::None => KindTag::None,
        }
    }

    pub(super) fn as_str(self) -> &'static str {
        match self {
            KindTag::Tcp => "tcp",
            KindTag::Http => "http",
            KindTag::None => "none",
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn keyword_enums() {
        assert_eq!(Protocol::Tcp.number(), 6);
        assert_eq!(Protocol::Udp.number(), 17);
        assert_eq!("udp".parse::<Protocol>(), Ok(Protocol::Udp));
        assert_eq!(Protocol::Tcp.to_string(), "tcp");
        assert_eq!(BackendState::Drain.to_string(), "drain");
        assert_eq!(
            "native".parse::<XdpModeSetting>(),
            Ok(XdpModeSetting::Native)
        );
        assert_eq!(
            "TCP".parse::<Protocol>().unwrap_err().to_string(),
            "invalid protocol \"TCP\", expected tcp or udp"
        );
        assert_eq!(HealthCheckKind::None.to_string(), "none");
        assert_eq!("gue".parse::<Forwarding>(), Ok(Forwarding::Gue));
        assert_eq!(Forwarding::DsrL2.to_string(), "dsr-l2");
        assert_eq!(
            "IPIP".parse::<Forwarding>().unwrap_err().to_string(),
            "invalid forwarding \"IPIP\", expected one of dsr-l2, ipip, gue, nat"
        );
        assert_eq!(
            serde_json::to_string(&Forwarding::DsrL2).unwrap(),
            "\"dsr-l2\""
        );
    }

    #[test]
    fn protocol_serde_form() {
        // The control protocol carries protocols as these strings.
        assert_eq!(serde_json::to_string(&Protocol::Udp).unwrap(), "\"udp\"");
        assert_eq!(
            serde_json::from_str::<Protocol>("\"tcp\"").unwrap(),
            Protocol::Tcp
        );
    }

    fn config(agent: &str) -> Config {
        Config::parse(&format!("[agent]\n{agent}\n"), Path::new("lb.toml"))
            .unwrap_or_else(|e| panic!("{e}"))
    }

    const REFUSAL: &str = "lb.toml: instance and map sizes (max_vips, max_backends, ring_size, conntrack_entries, nat_entries, acl_entries) change only with a restart; nothing applied";
    const WARNING: &str = "lb.toml: interfaces, xdp_mode, control_socket, control_group, metrics_listen, max_kernel_memory and [agent.announce] take effect at the next start; VIPs and backends are applied now";

    #[test]
    fn reload_applies_vips_and_backends_of_an_unchanged_agent_table() {
        let old = config("interfaces = [\"eth0\"]");
        let mut new = config("interfaces = [\"eth0\"]");
        assert_eq!(reload_check(&old, &new), Ok(None));
        new.vips = Config::parse(
            "[[vip]]\naddress = \"198.18.10.1\"\nport = 80\nprotocol = \"tcp\"\n",
            Path::new("lb.toml"),
        )
        .unwrap()
        .vips;
        assert_eq!(reload_check(&old, &new), Ok(None));
    }

    #[test]
    fn reload_refuses_each_kernel_setting() {
        let old = config("");
        for changed in [
            "instance = \"other\"",
            "conntrack_entries = 1000",
            "max_vips = 8",
            "max_backends = 8",
            "ring_size = 13",
            "nat_entries = 1024",
        ] {
            let new = config(changed);
            assert_eq!(
                reload_check(&old, &new),
                Err(REFUSAL.to_owned()),
                "{changed}"
            );
        }
        // A refusal wins over a warning.
        let new = config("max_vips = 8\nxdp_mode = \"skb\"");
        assert_eq!(reload_check(&old, &new), Err(REFUSAL.to_owned()));
    }

    #[test]
    fn reload_warns_about_each_start_setting() {
        let old = config("");
        for changed in [
            "interfaces = [\"eth1\"]",
            "xdp_mode = \"native\"",
            "control_socket = \"/run/lb/x.sock\"",
            "control_group = \"lb\"",
            "metrics_listen = \"127.0.0.1:9100\"",
        ] {
            let new = config(changed);
            assert_eq!(
                reload_check(&old, &new),
                Ok(Some(WARNING.to_owned())),
                "{changed}"
            );
        }
    }

    #[test]
    fn reload_messages_name_the_new_source() {
        let old = config("");
        let mut new = config("max_vips = 8");
        new.source = "/etc/lb/new.toml".into();
        let refusal = reload_check(&old, &new).unwrap_err();
        assert!(
            refusal.starts_with("/etc/lb/new.toml: instance"),
            "{refusal}"
        );
    }
}
