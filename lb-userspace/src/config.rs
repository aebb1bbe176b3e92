//! The agent's configuration file: TOML parsing, validation with precise
//! errors, and the resolved types the rest of the agent works with.
//!
//! # Format
//!
//! ```toml
//! [agent]                              # optional table; every key has a default
//! instance = "default"                 # pin dir /sys/fs/bpf/lb/<instance>; [A-Za-z0-9_-]{1,64}
//! interfaces = ["eth0"]                # may be empty here when given on the command line
//! xdp_mode = "auto"                    # auto | native | skb
//! control_socket = "/run/lb/default.sock"   # default: /run/lb/<instance>.sock
//! metrics_listen = "127.0.0.1:9100"    # optional SocketAddr; absent = no metrics server
//! conntrack_entries = 1048576          # optional, 1..=2^28, default lb_common::DEFAULT_CONNTRACK_ENTRIES
//! max_vips = 64                        # optional, 1..=65536, default lb_common::DEFAULT_MAX_VIPS
//! max_backends = 4096                  # optional, 1..=2^20, default lb_common::DEFAULT_MAX_BACKENDS
//! ring_size = 65537                    # optional, prime, 3..=655373, default lb_common::DEFAULT_RING_SIZE;
//!                                      # the default ring size of VIPs and the ring stride of the
//!                                      # datapath: max_vips * ring_size must be <= 2^28
//!
//! [[vip]]                              # zero or more; identified by (address, port, protocol)
//! name = "web"                         # optional, default "<address>:<port>/<protocol>"; unique
//! address = "198.18.10.1"
//! port = 80                            # 1..=65535
//! protocol = "tcp"                     # tcp | udp
//! ring_size = 65537                    # optional, prime, 3..=655373 and <= [agent] ring_size
//!                                      # (default: [agent] ring_size); >= the number of backends
//!
//! [vip.health_check]                   # optional; default kind = "tcp" with defaults below
//! kind = "http"                        # tcp | http | none
//! port = 8080                          # optional, default = the VIP port
//! interval_ms = 1000                   # default 1000, 10..=3_600_000
//! timeout_ms = 500                     # default 500 (or interval_ms if smaller), must be >= 1 and <= interval_ms
//! rise = 2                             # default 2, 1..=100
//! fall = 3                             # default 3, 1..=100
//! path = "/healthz"                    # http only, default "/", must start with '/'
//! expected_status = 200                # http only, default 200, 100..=599
//! host = "web.example"                 # http only, optional Host header
//!
//! [[vip.backend]]                      # zero or more; a VIP without backends drops its packets
//! address = "198.18.0.11"              # unique within the VIP (backend port = VIP port: DSR)
//! weight = 1                           # default 1, 1..=10000
//! state = "active"                     # active | drain, default active
//! mac = "02:00:00:00:00:11"            # optional: next-hop MAC override (otherwise the agent resolves it)
//! [vip.backend.health_check]           # optional per-backend override: any subset of the fields above;
//! port = 8081                          # unspecified fields come from the VIP's health_check
//! ```
//!
//! `[vip.health_check]` and `[[vip.backend]]` apply to the last `[[vip]]`
//! above them, `[vip.backend.health_check]` to the last backend. Unknown keys
//! are errors everywhere. The number of VIPs may not exceed `max_vips`, nor
//! the total number of backends (over all VIPs) `max_backends`.
//!
//! Backend health-check overrides are merged field by field with the VIP's
//! health check; an override that switches `kind` to `tcp`/`none` drops the
//! VIP's HTTP settings, one that switches it to `http` starts from the HTTP
//! defaults.
//!
//! # Errors
//!
//! Every [`ConfigError`] names the file, the position (1-based line and
//! column, in characters) and the field path (`vip[i]`, `backend[j]`
//! zero-based), e.g.
//! `lb.toml:14:10: vip[1].backend[0].weight: 0 is out of range 1..=10000`.

use std::{
    collections::HashMap,
    fmt,
    net::{IpAddr, Ipv4Addr, SocketAddr},
    ops::Range,
    path::{Path, PathBuf},
    str::FromStr,
    time::Duration,
};

use serde::{Deserialize, Serialize};
use toml::Spanned;

use crate::{mac::MacAddr, maglev::is_prime};

/// Smallest accepted ring size.
pub const MIN_RING_SIZE: u32 = 3;
/// Largest accepted ring size (a prime).
pub const MAX_RING_SIZE: u32 = 655_373;
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

const DEFAULT_INTERVAL_MS: u32 = 1000;
const DEFAULT_TIMEOUT_MS: u32 = 500;
const DEFAULT_RISE: u32 = 2;
const DEFAULT_FALL: u32 = 3;
const DEFAULT_HTTP_PATH: &str = "/";
const DEFAULT_HTTP_STATUS: u16 = 200;
const MAX_INTERVAL_MS: u32 = 3_600_000;
/// Longest Unix socket path (`sun_path` minus the terminating NUL).
const MAX_SOCKET_PATH: usize = 107;

// ---------------------------------------------------------------------------
// Resolved types
// ---------------------------------------------------------------------------

/// A validated configuration.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Config {
    pub agent: AgentConfig,
    pub vips: Vec<VipConfig>,
    /// The file it came from (or whatever name was given to [`Config::parse`],
    /// conventionally `"<string>"`).
    pub source: PathBuf,
}

/// The `[agent]` table, with defaults applied.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct AgentConfig {
    pub instance: String,
    /// May be empty: the command line may supply the interfaces.
    pub interfaces: Vec<String>,
    pub xdp_mode: XdpModeSetting,
    pub control_socket: PathBuf,
    pub metrics_listen: Option<SocketAddr>,
    pub conntrack_entries: u32,
    pub max_vips: u32,
    pub max_backends: u32,
    /// Default ring size of VIPs, and the ring stride of the datapath.
    pub ring_size: u32,
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

/// One `[[vip]]`, with defaults applied.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct VipConfig {
    pub name: String,
    pub address: Ipv4Addr,
    pub port: u16,
    pub protocol: Protocol,
    /// Prime, at most the agent's ring size.
    pub ring_size: u32,
    pub health_check: HealthCheck,
    /// Unique by address; may be empty.
    pub backends: Vec<BackendConfig>,
}

/// One `[[vip.backend]]`, with defaults applied.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct BackendConfig {
    pub address: Ipv4Addr,
    pub weight: u32,
    pub state: BackendState,
    /// Next-hop MAC override (a unicast address).
    pub mac: Option<[u8; 6]>,
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
        let ctx = Ctx { text, file: source };
        let raw: RawFile = toml::from_str(text).map_err(|e| ctx.toml_error(&e))?;
        ctx.resolve(&raw)
    }
}

impl VipConfig {
    /// The VIP's identity.
    pub fn key(&self) -> (Ipv4Addr, u16, Protocol) {
        (self.address, self.port, self.protocol)
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
keyword_enum!(XdpModeSetting, "xdp_mode", [
    "auto" => XdpModeSetting::Auto,
    "native" => XdpModeSetting::Native,
    "skb" => XdpModeSetting::Skb,
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
enum KindTag {
    Tcp,
    Http,
    None,
}

impl KindTag {
    fn of(kind: &HealthCheckKind) -> KindTag {
        match kind {
            HealthCheckKind::Tcp => KindTag::Tcp,
            HealthCheckKind::Http { .. } => KindTag::Http,
            HealthCheckKind::None => KindTag::None,
        }
    }

    fn as_str(self) -> &'static str {
        match self {
            KindTag::Tcp => "tcp",
            KindTag::Http => "http",
            KindTag::None => "none",
        }
    }
}

// ---------------------------------------------------------------------------
// Errors
// ---------------------------------------------------------------------------

/// A configuration error, displayed as
/// `<file>:<line>:<column>: <field>: <message>` (absent parts omitted).
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
#[error("{}", self.render())]
pub struct ConfigError {
    pub file: PathBuf,
    /// 1-based.
    pub line: Option<usize>,
    /// 1-based, in characters.
    pub column: Option<usize>,
    /// Path of the offending field, e.g. `vip[1].backend[0].weight`.
    pub field: Option<String>,
    pub message: String,
}

impl ConfigError {
    fn render(&self) -> String {
        let mut out = self.file.display().to_string();
        if let Some(line) = self.line {
            out.push_str(&format!(":{line}"));
            if let Some(column) = self.column {
                out.push_str(&format!(":{column}"));
            }
        }
        out.push_str(": ");
        if let Some(field) = &self.field {
            out.push_str(field);
            out.push_str(": ");
        }
        out.push_str(&self.message);
        out
    }
}

/// 1-based line and column (in characters) of byte `offset` in `text`.
fn line_col(text: &str, offset: usize) -> (usize, usize) {
    let mut offset = offset.min(text.len());
    while !text.is_char_boundary(offset) {
        offset -= 1;
    }
    let before = &text[..offset];
    let line_start = before.rfind('\n').map_or(0, |i| i + 1);
    (
        before.matches('\n').count() + 1,
        before[line_start..].chars().count() + 1,
    )
}

fn join(prefix: &str, key: &str) -> String {
    if prefix.is_empty() {
        key.to_owned()
    } else {
        format!("{prefix}.{key}")
    }
}

fn span_contains(span: Option<Range<usize>>, offset: usize) -> bool {
    span.is_some_and(|s| s.start <= offset && offset < s.end.max(s.start + 1))
}

/// The field path of the item at byte `offset`, for errors reported by the
/// TOML deserializer (which carry a span but no key path).
fn field_at(text: &str, offset: usize) -> Option<String> {
    match toml_edit::ImDocument::parse(text) {
        Ok(doc) => walk_table(doc.as_table(), "", offset).or_else(|| scan_path(text, offset)),
        Err(_) => scan_path(text, offset),
    }
}

fn walk_table(table: &toml_edit::Table, path: &str, offset: usize) -> Option<String> {
    for (key, item) in table.iter() {
        let child = join(path, key);
        if span_contains(table.key(key).and_then(|k| k.span()), offset) {
            return Some(child);
        }
        if let Some(found) = walk_item(item, &child, offset) {
            return Some(found);
        }
    }
    None
}

fn walk_item(item: &toml_edit::Item, path: &str, offset: usize) -> Option<String> {
    match item {
        toml_edit::Item::None => None,
        toml_edit::Item::Value(value) => walk_value(value, path, offset),
        toml_edit::Item::Table(table) => walk_table(table, path, offset)
            .or_else(|| span_contains(table.span(), offset).then(|| path.to_owned())),
        toml_edit::Item::ArrayOfTables(tables) => {
            tables.iter().enumerate().find_map(|(i, table)| {
                let element = format!("{path}[{i}]");
                walk_table(table, &element, offset)
                    .or_else(|| span_contains(table.span(), offset).then_some(element))
            })
        }
    }
}

fn walk_value(value: &toml_edit::Value, path: &str, offset: usize) -> Option<String> {
    let inner = match value {
        toml_edit::Value::Array(array) => array
            .iter()
            .enumerate()
            .find_map(|(i, v)| walk_value(v, &format!("{path}[{i}]"), offset)),
        toml_edit::Value::InlineTable(table) => table.iter().find_map(|(key, v)| {
            let child = join(path, key);
            if span_contains(table.key(key).and_then(|k| k.span()), offset) {
                Some(child)
            } else {
                walk_value(v, &child, offset)
            }
        }),
        _ => None,
    };
    inner.or_else(|| span_contains(value.span(), offset).then(|| path.to_owned()))
}

/// Fallback for documents that do not parse: follows the table headers
/// above `offset` line by line and appends the key of `offset`'s line.
fn scan_path(text: &str, offset: usize) -> Option<String> {
    let mut offset = offset.min(text.len());
    while !text.is_char_boundary(offset) {
        offset -= 1;
    }
    let line_start = text[..offset].rfind('\n').map_or(0, |i| i + 1);
    let mut counts: HashMap<String, usize> = HashMap::new();
    let mut current = String::new();
    for line in text[..line_start].lines() {
        if let Some(path) = scan_header(line, &mut counts) {
            current = path;
        }
    }
    let line = text[line_start..].lines().next().unwrap_or("");
    if let Some(path) = scan_header(line, &mut counts) {
        return Some(path);
    }
    let key = line
        .split_once('=')
        .map(|(key, _)| key.trim())
        .filter(|key| {
            !key.is_empty()
                && key
                    .chars()
                    .all(|c| c.is_ascii_alphanumeric() || "_-.\"' ".contains(c))
        })
        .map(|key| dotted(key).join("."));
    match key {
        Some(key) => Some(join(&current, &key)),
        None if current.is_empty() => None,
        None => Some(current),
    }
}

fn dotted(key: &str) -> Vec<String> {
    key.split('.')
        .map(|part| part.trim().trim_matches(['"', '\'']).to_owned())
        .collect()
}

fn scan_header(line: &str, counts: &mut HashMap<String, usize>) -> Option<String> {
    let line = line.trim_start();
    let (name, array) = if let Some(rest) = line.strip_prefix("[[") {
        (&rest[..rest.find("]]")?], true)
    } else if let Some(rest) = line.strip_prefix('[') {
        (&rest[..rest.find(']')?], false)
    } else {
        return None;
    };
    let parts = dotted(name);
    let mut path = String::new();
    for (i, part) in parts.iter().enumerate() {
        let name = join(&path, part);
        if array && i + 1 == parts.len() {
            let n = counts.entry(name.clone()).or_insert(0);
            path = format!("{name}[{n}]");
            *n += 1;
        } else if let Some(n) = counts.get(&name) {
            path = format!("{name}[{}]", n.saturating_sub(1));
        } else {
            path = name;
        }
    }
    Some(path)
}

// ---------------------------------------------------------------------------
// Raw (as written) types
// ---------------------------------------------------------------------------

type S<T> = Spanned<T>;

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct RawFile {
    #[serde(default)]
    agent: Option<S<RawAgent>>,
    #[serde(default)]
    vip: Vec<S<RawVip>>,
}

#[derive(Default, Deserialize)]
#[serde(deny_unknown_fields)]
struct RawAgent {
    instance: Option<S<String>>,
    interfaces: Option<S<Vec<S<String>>>>,
    xdp_mode: Option<S<String>>,
    control_socket: Option<S<String>>,
    metrics_listen: Option<S<String>>,
    conntrack_entries: Option<S<i64>>,
    max_vips: Option<S<i64>>,
    max_backends: Option<S<i64>>,
    ring_size: Option<S<i64>>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct RawVip {
    name: Option<S<String>>,
    address: S<String>,
    port: S<i64>,
    protocol: S<String>,
    ring_size: Option<S<i64>>,
    health_check: Option<S<RawHealthCheck>>,
    #[serde(default)]
    backend: Vec<S<RawBackend>>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct RawHealthCheck {
    kind: Option<S<String>>,
    port: Option<S<i64>>,
    interval_ms: Option<S<i64>>,
    timeout_ms: Option<S<i64>>,
    rise: Option<S<i64>>,
    fall: Option<S<i64>>,
    path: Option<S<String>>,
    expected_status: Option<S<i64>>,
    host: Option<S<String>>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct RawBackend {
    address: S<String>,
    weight: Option<S<i64>>,
    state: Option<S<String>>,
    mac: Option<S<String>>,
    health_check: Option<S<RawHealthCheck>>,
}

// ---------------------------------------------------------------------------
// Validation
// ---------------------------------------------------------------------------

struct Ctx<'a> {
    text: &'a str,
    file: &'a Path,
}

/// What a health-check table is resolved against.
struct HcBase<'a> {
    hc: HealthCheck,
    /// `timeout` was written explicitly (and is thus not re-derived from a
    /// changed interval).
    timeout_explicit: bool,
    /// Field path of the health check inherited from, for messages.
    origin: Option<&'a str>,
}

impl HcBase<'_> {
    fn defaults(port: u16) -> Self {
        HcBase {
            hc: HealthCheck {
                kind: HealthCheckKind::Tcp,
                port,
                interval: Duration::from_millis(DEFAULT_INTERVAL_MS.into()),
                timeout: Duration::from_millis(DEFAULT_TIMEOUT_MS.into()),
                rise: DEFAULT_RISE,
                fall: DEFAULT_FALL,
            },
            timeout_explicit: false,
            origin: None,
        }
    }
}

impl Ctx<'_> {
    fn error(
        &self,
        span: Range<usize>,
        field: impl Into<String>,
        message: impl Into<String>,
    ) -> ConfigError {
        let (line, column) = line_col(self.text, span.start);
        ConfigError {
            file: self.file.to_path_buf(),
            line: Some(line),
            column: Some(column),
            field: Some(field.into()),
            message: message.into(),
        }
    }

    fn line(&self, offset: usize) -> usize {
        line_col(self.text, offset).0
    }

    fn toml_error(&self, e: &toml::de::Error) -> ConfigError {
        let message = e
            .message()
            .trim()
            .replace("expected i64", "expected an integer");
        let (line, column, mut field) = match e.span() {
            Some(span) => {
                let (line, column) = line_col(self.text, span.start);
                (Some(line), Some(column), field_at(self.text, span.start))
            }
            None => (None, None, None),
        };
        if let Some(missing) = message
            .strip_prefix("missing field `")
            .and_then(|rest| rest.split('`').next())
        {
            field = Some(join(field.as_deref().unwrap_or(""), missing));
        }
        ConfigError {
            file: self.file.to_path_buf(),
            line,
            column,
            field,
            message,
        }
    }

    /// An integer in `lo..=hi`.
    fn int<T>(&self, v: &S<i64>, field: &str, lo: T, hi: T) -> Result<T, ConfigError>
    where
        T: TryFrom<i64> + Into<i64> + Copy + fmt::Display,
    {
        let n = *v.get_ref();
        match T::try_from(n) {
            Ok(t) if (lo.into()..=hi.into()).contains(&n) => Ok(t),
            _ => Err(self.error(v.span(), field, format!("{n} is out of range {lo}..={hi}"))),
        }
    }

    fn opt_int<T>(
        &self,
        v: Option<&S<i64>>,
        field: &str,
        lo: T,
        hi: T,
        default: T,
    ) -> Result<T, ConfigError>
    where
        T: TryFrom<i64> + Into<i64> + Copy + fmt::Display,
    {
        v.map_or(Ok(default), |v| self.int(v, field, lo, hi))
    }

    fn keyword<T: FromStr<Err = ParseKeywordError>>(
        &self,
        v: &S<String>,
        field: &str,
    ) -> Result<T, ConfigError> {
        v.get_ref()
            .parse()
            .map_err(|e: ParseKeywordError| self.error(v.span(), field, e.to_string()))
    }

    fn ring_size(&self, v: &S<i64>, field: &str) -> Result<u32, ConfigError> {
        let n = self.int(v, field, MIN_RING_SIZE, MAX_RING_SIZE)?;
        if is_prime(n) {
            return Ok(n);
        }
        let below = (MIN_RING_SIZE..n).rev().find(|&m| is_prime(m));
        let above = (n + 1..=MAX_RING_SIZE).find(|&m| is_prime(m));
        let nearest: Vec<String> = [below, above]
            .into_iter()
            .flatten()
            .map(|m| m.to_string())
            .collect();
        Err(self.error(
            v.span(),
            field,
            format!("{n} is not prime (nearest primes: {})", nearest.join(", ")),
        ))
    }

    fn ipv4(&self, v: &S<String>, field: &str, what: &str) -> Result<Ipv4Addr, ConfigError> {
        let s = v.get_ref();
        let err = |message: String| Err(self.error(v.span(), field, message));
        match s.parse::<IpAddr>() {
            Ok(IpAddr::V4(a)) => {
                let bad = if a.is_unspecified() {
                    Some("the unspecified address")
                } else if a.is_broadcast() {
                    Some("the broadcast address")
                } else if a.is_multicast() {
                    Some("a multicast address")
                } else if a.is_loopback() {
                    Some("a loopback address")
                } else {
                    None
                };
                match bad {
                    Some(bad) => err(format!("{a} is {bad}, not usable as a {what} address")),
                    None => Ok(a),
                }
            }
            Ok(IpAddr::V6(_)) => err(format!("expected an IPv4 address, got IPv6 address {s}")),
            Err(_) => err(format!("invalid IPv4 address {s:?}")),
        }
    }

    fn resolve(&self, raw: &RawFile) -> Result<Config, ConfigError> {
        let agent = self.agent(raw.agent.as_ref().map(|a| a.get_ref()))?;
        let mut vips: Vec<VipConfig> = Vec::with_capacity(raw.vip.len());
        // key → (vip index, offset of its address); name → vip index.
        let mut keys: HashMap<(Ipv4Addr, u16, Protocol), (usize, usize)> = HashMap::new();
        let mut names: HashMap<String, usize> = HashMap::new();
        let mut total_backends = 0usize;
        for (i, raw_vip) in raw.vip.iter().enumerate() {
            let path = format!("vip[{i}]");
            if i >= agent.max_vips as usize {
                return Err(self.error(
                    raw_vip.span(),
                    path,
                    format!(
                        "too many VIPs: agent.max_vips is {} and this is VIP number {}",
                        agent.max_vips,
                        i + 1
                    ),
                ));
            }
            let vip = self.vip(&path, raw_vip.get_ref(), &agent, &mut total_backends)?;
            let r = raw_vip.get_ref();
            if let Some(&(first, offset)) = keys.get(&vip.key()) {
                return Err(self.error(
                    r.address.span(),
                    format!("{path}.address"),
                    format!(
                        "duplicate VIP {}:{}/{} (already defined by vip[{first}] at line {})",
                        vip.address,
                        vip.port,
                        vip.protocol,
                        self.line(offset)
                    ),
                ));
            }
            keys.insert(vip.key(), (i, r.address.span().start));
            if let Some(&first) = names.get(&vip.name) {
                let span = r.name.as_ref().map_or(raw_vip.span(), |n| n.span());
                return Err(self.error(
                    span,
                    format!("{path}.name"),
                    format!(
                        "duplicate VIP name {:?} (already used by vip[{first}] at line {})",
                        vip.name,
                        self.line(raw.vip[first].span().start)
                    ),
                ));
            }
            names.insert(vip.name.clone(), i);
            vips.push(vip);
        }
        Ok(Config {
            agent,
            vips,
            source: self.file.to_path_buf(),
        })
    }

    fn agent(&self, raw: Option<&RawAgent>) -> Result<AgentConfig, ConfigError> {
        let default = RawAgent::default();
        let raw = raw.unwrap_or(&default);

        let instance = match &raw.instance {
            Some(v) => {
                let s = v.get_ref();
                let ok = (1..=64).contains(&s.len())
                    && s.bytes()
                        .all(|b| b.is_ascii_alphanumeric() || b == b'_' || b == b'-');
                if !ok {
                    return Err(self.error(
                        v.span(),
                        "agent.instance",
                        format!(
                            "invalid instance name {s:?}: expected 1 to 64 characters from [A-Za-z0-9_-]"
                        ),
                    ));
                }
                s.clone()
            }
            None => DEFAULT_INSTANCE.to_owned(),
        };

        let mut interfaces: Vec<String> = Vec::new();
        if let Some(list) = &raw.interfaces {
            for (i, v) in list.get_ref().iter().enumerate() {
                let field = format!("agent.interfaces[{i}]");
                let name = v.get_ref();
                // The kernel's dev_valid_name().
                let ok = !name.is_empty()
                    && name.len() < 16
                    && name != "."
                    && name != ".."
                    && !name
                        .chars()
                        .any(|c| c == '/' || c == ':' || c.is_whitespace());
                if !ok {
                    return Err(self.error(
                        v.span(),
                        field,
                        format!(
                            "invalid interface name {name:?}: expected 1 to 15 bytes without '/', ':' or whitespace"
                        ),
                    ));
                }
                if interfaces.contains(name) {
                    return Err(self.error(
                        v.span(),
                        field,
                        format!("interface {name:?} is listed twice"),
                    ));
                }
                interfaces.push(name.clone());
            }
        }

        let xdp_mode = match &raw.xdp_mode {
            Some(v) => self.keyword(v, "agent.xdp_mode")?,
            None => XdpModeSetting::Auto,
        };

        let control_socket = match &raw.control_socket {
            Some(v) => {
                let s = v.get_ref();
                if s.is_empty() || s.len() > MAX_SOCKET_PATH || s.contains('\0') {
                    return Err(self.error(
                        v.span(),
                        "agent.control_socket",
                        format!(
                            "invalid socket path {s:?}: expected 1 to {MAX_SOCKET_PATH} bytes without NUL"
                        ),
                    ));
                }
                PathBuf::from(s)
            }
            None => PathBuf::from(format!("/run/lb/{instance}.sock")),
        };

        let metrics_listen = match &raw.metrics_listen {
            Some(v) => Some(v.get_ref().parse::<SocketAddr>().map_err(|_| {
                self.error(
                    v.span(),
                    "agent.metrics_listen",
                    format!(
                        "invalid socket address {:?}: expected e.g. \"127.0.0.1:9100\" or \"[::1]:9100\"",
                        v.get_ref()
                    ),
                )
            })?),
            None => None,
        };

        let conntrack_entries = self.opt_int(
            raw.conntrack_entries.as_ref(),
            "agent.conntrack_entries",
            1,
            MAX_CONNTRACK_ENTRIES,
            lb_common::DEFAULT_CONNTRACK_ENTRIES,
        )?;
        let max_vips = self.opt_int(
            raw.max_vips.as_ref(),
            "agent.max_vips",
            1,
            VIPS_LIMIT,
            lb_common::DEFAULT_MAX_VIPS,
        )?;
        let max_backends = self.opt_int(
            raw.max_backends.as_ref(),
            "agent.max_backends",
            1,
            BACKENDS_LIMIT,
            lb_common::DEFAULT_MAX_BACKENDS,
        )?;
        let ring_size = match &raw.ring_size {
            Some(v) => self.ring_size(v, "agent.ring_size")?,
            None => lb_common::DEFAULT_RING_SIZE,
        };
        let slots = u64::from(max_vips) * u64::from(ring_size);
        if slots > RING_SLOTS_LIMIT {
            let (span, field) = match (&raw.ring_size, &raw.max_vips) {
                (Some(v), _) => (v.span(), "agent.ring_size"),
                (None, Some(v)) => (v.span(), "agent.max_vips"),
                (None, None) => unreachable!("the defaults fit"),
            };
            return Err(self.error(
                span,
                field,
                format!(
                    "max_vips * ring_size = {max_vips} * {ring_size} = {slots} ring slots, more than the limit {RING_SLOTS_LIMIT}"
                ),
            ));
        }

        Ok(AgentConfig {
            instance,
            interfaces,
            xdp_mode,
            control_socket,
            metrics_listen,
            conntrack_entries,
            max_vips,
            max_backends,
            ring_size,
        })
    }

    fn vip(
        &self,
        path: &str,
        r: &RawVip,
        agent: &AgentConfig,
        total_backends: &mut usize,
    ) -> Result<VipConfig, ConfigError> {
        let f = |key: &str| format!("{path}.{key}");
        let address = self.ipv4(&r.address, &f("address"), "VIP")?;
        let port = self.int(&r.port, &f("port"), 1u16, u16::MAX)?;
        let protocol: Protocol = self.keyword(&r.protocol, &f("protocol"))?;
        let name = match &r.name {
            Some(v) => {
                let s = v.get_ref();
                if s.is_empty() || s.chars().count() > 64 || s.chars().any(char::is_control) {
                    return Err(self.error(
                        v.span(),
                        f("name"),
                        format!("invalid VIP name {s:?}: expected 1 to 64 characters, no control characters"),
                    ));
                }
                s.clone()
            }
            None => format!("{address}:{port}/{protocol}"),
        };
        let ring_size = match &r.ring_size {
            Some(v) => {
                let n = self.ring_size(v, &f("ring_size"))?;
                if n > agent.ring_size {
                    return Err(self.error(
                        v.span(),
                        f("ring_size"),
                        format!(
                            "{n} is larger than agent.ring_size {} (the datapath's ring stride)",
                            agent.ring_size
                        ),
                    ));
                }
                n
            }
            None => agent.ring_size,
        };

        let hc_path = f("health_check");
        let defaults = HcBase::defaults(port);
        let (health_check, timeout_explicit) = match &r.health_check {
            Some(h) => self.health_check(h.get_ref(), &hc_path, &defaults)?,
            None => (defaults.hc, false),
        };
        let base = HcBase {
            hc: health_check.clone(),
            timeout_explicit,
            origin: Some(&hc_path),
        };

        let mut backends: Vec<BackendConfig> = Vec::with_capacity(r.backend.len());
        // address → (backend index, offset of its address)
        let mut seen: HashMap<Ipv4Addr, (usize, usize)> = HashMap::new();
        for (j, raw_backend) in r.backend.iter().enumerate() {
            let bpath = format!("{path}.backend[{j}]");
            let b = raw_backend.get_ref();
            *total_backends += 1;
            if *total_backends > agent.max_backends as usize {
                return Err(self.error(
                    raw_backend.span(),
                    bpath,
                    format!(
                        "too many backends: agent.max_backends is {} and this is backend number {} in the file",
                        agent.max_backends, total_backends
                    ),
                ));
            }
            if j >= ring_size as usize {
                return Err(self.error(
                    raw_backend.span(),
                    bpath,
                    format!("more backends than ring slots: the VIP's ring_size is {ring_size}"),
                ));
            }
            let bf = |key: &str| format!("{bpath}.{key}");
            let address = self.ipv4(&b.address, &bf("address"), "backend")?;
            if let Some(&(first, offset)) = seen.get(&address) {
                return Err(self.error(
                    b.address.span(),
                    bf("address"),
                    format!(
                        "duplicate backend {address} (already defined by {path}.backend[{first}] at line {})",
                        self.line(offset)
                    ),
                ));
            }
            seen.insert(address, (j, b.address.span().start));
            let weight = self.opt_int(b.weight.as_ref(), &bf("weight"), 1, MAX_WEIGHT, 1)?;
            let state = match &b.state {
                Some(v) => self.keyword(v, &bf("state"))?,
                None => BackendState::Active,
            };
            let mac = match &b.mac {
                Some(v) => {
                    let s = v.get_ref();
                    let mac: MacAddr = s
                        .parse()
                        .map_err(|e| self.error(v.span(), bf("mac"), format!("{e}")))?;
                    if !mac.is_unicast() {
                        return Err(self.error(
                            v.span(),
                            bf("mac"),
                            format!("{s} is not a unicast MAC address"),
                        ));
                    }
                    Some(mac.octets())
                }
                None => None,
            };
            let health_check = match &b.health_check {
                Some(h) => {
                    self.health_check(h.get_ref(), &bf("health_check"), &base)?
                        .0
                }
                None => health_check.clone(),
            };
            backends.push(BackendConfig {
                address,
                weight,
                state,
                mac,
                health_check,
            });
        }

        Ok(VipConfig {
            name,
            address,
            port,
            protocol,
            ring_size,
            health_check,
            backends,
        })
    }

    /// Resolves a health-check table against `base` (defaults for a VIP, the
    /// VIP's health check for a backend override). Also returns whether the
    /// timeout is explicit.
    fn health_check(
        &self,
        r: &RawHealthCheck,
        path: &str,
        base: &HcBase<'_>,
    ) -> Result<(HealthCheck, bool), ConfigError> {
        let f = |key: &str| format!("{path}.{key}");
        let inherited = base
            .origin
            .map(|o| format!(" inherited from {o}"))
            .unwrap_or_default();

        let tag = match &r.kind {
            Some(v) => self.keyword(v, &f("kind"))?,
            None => KindTag::of(&base.hc.kind),
        };
        let port = self.opt_int(r.port.as_ref(), &f("port"), 1, u16::MAX, base.hc.port)?;
        let base_interval = u32::try_from(base.hc.interval.as_millis()).unwrap_or(u32::MAX);
        let interval_ms = self.opt_int(
            r.interval_ms.as_ref(),
            &f("interval_ms"),
            10,
            MAX_INTERVAL_MS,
            base_interval,
        )?;
        let timeout_ms = match &r.timeout_ms {
            Some(v) => {
                let t = self.int(v, &f("timeout_ms"), 1, MAX_INTERVAL_MS)?;
                if t > interval_ms {
                    return Err(self.error(
                        v.span(),
                        f("timeout_ms"),
                        format!("timeout_ms {t} is greater than interval_ms {interval_ms}"),
                    ));
                }
                t
            }
            None if base.timeout_explicit => {
                let t = u32::try_from(base.hc.timeout.as_millis()).unwrap_or(u32::MAX);
                if let Some(v) = r.interval_ms.as_ref().filter(|_| t > interval_ms) {
                    return Err(self.error(
                        v.span(),
                        f("interval_ms"),
                        format!(
                            "interval_ms {interval_ms} is less than the timeout_ms {t}{inherited}"
                        ),
                    ));
                }
                t
            }
            None => DEFAULT_TIMEOUT_MS.min(interval_ms),
        };
        let rise = self.opt_int(r.rise.as_ref(), &f("rise"), 1, 100, base.hc.rise)?;
        let fall = self.opt_int(r.fall.as_ref(), &f("fall"), 1, 100, base.hc.fall)?;

        let kind = match tag {
            KindTag::Http => {
                let (base_path, base_status, base_host) = match &base.hc.kind {
                    HealthCheckKind::Http {
                        path,
                        expected_status,
                        host,
                    } => (path.clone(), *expected_status, host.clone()),
                    _ => (DEFAULT_HTTP_PATH.to_owned(), DEFAULT_HTTP_STATUS, None),
                };
                let http_path = match &r.path {
                    Some(v) => {
                        let s = v.get_ref();
                        if !s.starts_with('/')
                            || s.chars().any(|c| c.is_whitespace() || c.is_control())
                        {
                            return Err(self.error(
                                v.span(),
                                f("path"),
                                format!("invalid HTTP path {s:?}: must start with '/' and contain no whitespace"),
                            ));
                        }
                        s.clone()
                    }
                    None => base_path,
                };
                let expected_status = self.opt_int(
                    r.expected_status.as_ref(),
                    &f("expected_status"),
                    100,
                    599,
                    base_status,
                )?;
                let host = match &r.host {
                    Some(v) => {
                        let s = v.get_ref();
                        if s.is_empty() || s.chars().any(|c| c.is_whitespace() || c.is_control()) {
                            return Err(self.error(
                                v.span(),
                                f("host"),
                                format!("invalid Host header {s:?}: must be non-empty, without whitespace"),
                            ));
                        }
                        Some(s.clone())
                    }
                    None => base_host,
                };
                HealthCheckKind::Http {
                    path: http_path,
                    expected_status,
                    host,
                }
            }
            KindTag::Tcp | KindTag::None => {
                let http_only = [
                    ("path", r.path.as_ref().map(|v| v.span())),
                    (
                        "expected_status",
                        r.expected_status.as_ref().map(|v| v.span()),
                    ),
                    ("host", r.host.as_ref().map(|v| v.span())),
                ];
                if let Some((key, Some(span))) = http_only.into_iter().find(|(_, s)| s.is_some()) {
                    let why = if r.kind.is_some() {
                        format!("kind is \"{}\"", tag.as_str())
                    } else if base.origin.is_some() {
                        format!("kind is \"{}\"{inherited}", tag.as_str())
                    } else {
                        format!("kind defaults to \"{}\"", tag.as_str())
                    };
                    return Err(self.error(
                        span,
                        f(key),
                        format!("{key} is only valid with kind = \"http\", but {why}"),
                    ));
                }
                if tag == KindTag::Tcp {
                    HealthCheckKind::Tcp
                } else {
                    HealthCheckKind::None
                }
            }
        };

        Ok((
            HealthCheck {
                kind,
                port,
                interval: Duration::from_millis(interval_ms.into()),
                timeout: Duration::from_millis(timeout_ms.into()),
                rise,
                fall,
            },
            r.timeout_ms.is_some() || base.timeout_explicit,
        ))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The example of the module documentation.
    const EXAMPLE: &str = r#"[agent]
instance = "default"                 # pin dir /sys/fs/bpf/lb/<instance>
interfaces = ["eth0"]
xdp_mode = "auto"                    # auto | native | skb
control_socket = "/run/lb/default.sock"
metrics_listen = "127.0.0.1:9100"
conntrack_entries = 1048576
max_vips = 64
max_backends = 4096
ring_size = 65537

[[vip]]
name = "web"
address = "198.18.10.1"
port = 80
protocol = "tcp"
ring_size = 65537

[vip.health_check]
kind = "http"
port = 8080
interval_ms = 1000
timeout_ms = 500
rise = 2
fall = 3
path = "/healthz"
expected_status = 200
host = "web.example"

[[vip.backend]]
address = "198.18.0.11"
weight = 1
state = "active"
mac = "02:00:00:00:00:11"
[vip.backend.health_check]
port = 8081
"#;

    /// Lines 1-4: a VIP without backends.
    const HEAD: &str = "[[vip]]\naddress = \"198.18.10.1\"\nport = 80\nprotocol = \"tcp\"\n";

    fn parse(text: &str) -> Result<Config, ConfigError> {
        Config::parse(text, Path::new("lb.toml"))
    }

    fn ok(text: &str) -> Config {
        parse(text).unwrap_or_else(|e| panic!("unexpected error: {e}"))
    }

    fn err(text: &str) -> ConfigError {
        match parse(text) {
            Ok(c) => panic!("expected an error, got {c:#?}"),
            Err(e) => e,
        }
    }

    /// Asserts file, line, field, and a distinctive part of the message.
    #[track_caller]
    fn check(e: &ConfigError, line: usize, field: &str, needle: &str) {
        assert_eq!(e.file, Path::new("lb.toml"), "{e}");
        assert_eq!(e.line, Some(line), "{e}");
        assert!(e.column.is_some(), "{e}");
        assert_eq!(e.field.as_deref(), Some(field), "{e}");
        assert!(e.message.contains(needle), "{e:?} lacks {needle:?}");
    }

    fn tcp_check(port: u16) -> HealthCheck {
        HealthCheck {
            kind: HealthCheckKind::Tcp,
            port,
            interval: Duration::from_millis(1000),
            timeout: Duration::from_millis(500),
            rise: 2,
            fall: 3,
        }
    }

    #[test]
    fn full_example() {
        let config = ok(EXAMPLE);
        let web_check = HealthCheck {
            kind: HealthCheckKind::Http {
                path: "/healthz".into(),
                expected_status: 200,
                host: Some("web.example".into()),
            },
            port: 8080,
            interval: Duration::from_millis(1000),
            timeout: Duration::from_millis(500),
            rise: 2,
            fall: 3,
        };
        let expected = Config {
            agent: AgentConfig {
                instance: "default".into(),
                interfaces: vec!["eth0".into()],
                xdp_mode: XdpModeSetting::Auto,
                control_socket: "/run/lb/default.sock".into(),
                metrics_listen: Some("127.0.0.1:9100".parse().unwrap()),
                conntrack_entries: 1 << 20,
                max_vips: 64,
                max_backends: 4096,
                ring_size: 65537,
            },
            vips: vec![VipConfig {
                name: "web".into(),
                address: Ipv4Addr::new(198, 18, 10, 1),
                port: 80,
                protocol: Protocol::Tcp,
                ring_size: 65537,
                health_check: web_check.clone(),
                backends: vec![BackendConfig {
                    address: Ipv4Addr::new(198, 18, 0, 11),
                    weight: 1,
                    state: BackendState::Active,
                    mac: Some([2, 0, 0, 0, 0, 0x11]),
                    // Merged: only the port differs from the VIP's check.
                    health_check: HealthCheck {
                        port: 8081,
                        ..web_check
                    },
                }],
            }],
            source: "lb.toml".into(),
        };
        assert_eq!(config, expected);
        assert_eq!(
            config.vips[0].key(),
            (Ipv4Addr::new(198, 18, 10, 1), 80, Protocol::Tcp)
        );
    }

    #[test]
    fn minimal_config_gets_defaults() {
        let config = ok(r#"[[vip]]
address = "198.18.10.1"
port = 443
protocol = "tcp"
[[vip.backend]]
address = "198.18.0.11"
"#);
        assert_eq!(
            config.agent,
            AgentConfig {
                instance: "default".into(),
                interfaces: vec![],
                xdp_mode: XdpModeSetting::Auto,
                control_socket: "/run/lb/default.sock".into(),
                metrics_listen: None,
                conntrack_entries: lb_common::DEFAULT_CONNTRACK_ENTRIES,
                max_vips: lb_common::DEFAULT_MAX_VIPS,
                max_backends: lb_common::DEFAULT_MAX_BACKENDS,
                ring_size: lb_common::DEFAULT_RING_SIZE,
            }
        );
        assert_eq!(
            config.vips,
            vec![VipConfig {
                name: "198.18.10.1:443/tcp".into(),
                address: Ipv4Addr::new(198, 18, 10, 1),
                port: 443,
                protocol: Protocol::Tcp,
                ring_size: lb_common::DEFAULT_RING_SIZE,
                health_check: tcp_check(443),
                backends: vec![BackendConfig {
                    address: Ipv4Addr::new(198, 18, 0, 11),
                    weight: 1,
                    state: BackendState::Active,
                    mac: None,
                    health_check: tcp_check(443),
                }],
            }]
        );
    }

    #[test]
    fn empty_file_and_instance_dependent_socket() {
        let config = ok("");
        assert!(config.vips.is_empty());
        assert_eq!(config.agent.instance, "default");
        let config = ok("[agent]\ninstance = \"edge-1\"\nxdp_mode = \"skb\"\n");
        assert_eq!(
            config.agent.control_socket,
            Path::new("/run/lb/edge-1.sock")
        );
        assert_eq!(config.agent.xdp_mode, XdpModeSetting::Skb);
    }

    #[test]
    fn vip_without_backends_is_allowed() {
        let config = ok(&format!("{HEAD}ring_size = 13\n"));
        assert!(config.vips[0].backends.is_empty());
        assert_eq!(config.vips[0].ring_size, 13);
    }

    #[test]
    fn syntax_error() {
        let e = err("[agent]\ninstance = \"oops\ninterfaces = []\n");
        check(&e, 2, "agent.instance", "invalid basic string");
        assert_eq!(e.column, Some(17));

        let e = err(&format!(
            "{HEAD}[[vip.backend]]\naddress = \"198.18.0.1\"\nweight = \n"
        ));
        check(&e, 7, "vip[0].backend[0].weight", "");

        // Duplicate keys are syntax errors too.
        let e = err("[agent]\ninstance = \"a\"\ninstance = \"b\"\n");
        check(&e, 3, "agent.instance", "duplicate key");
    }

    #[test]
    fn unknown_keys() {
        let e = err("[agent]\ninstance = \"a\"\ninterface = \"eth0\"\n");
        check(&e, 3, "agent.interface", "unknown field `interface`");
        assert_eq!(e.column, Some(1));

        let e = err("[agnt]\n");
        check(&e, 1, "agnt", "unknown field `agnt`");

        let text = format!(
            "{HEAD}[[vip]]\naddress = \"198.18.10.2\"\nport = 80\nprotocol = \"tcp\"\n\
             [[vip.backend]]\naddress = \"198.18.0.11\"\n[vip.backend.health_check]\nportt = 1\n"
        );
        let e = err(&text);
        check(
            &e,
            12,
            "vip[1].backend[0].health_check.portt",
            "unknown field `portt`",
        );

        // Inline tables are followed too.
        let e = err(&format!(
            "{HEAD}backend = [{{ address = \"198.18.0.1\", wieght = 2 }}]\n"
        ));
        check(&e, 5, "vip[0].backend[0].wieght", "unknown field `wieght`");
    }

    #[test]
    fn wrong_types() {
        let e = err("[[vip]]\naddress = \"198.18.10.1\"\nport = \"80\"\nprotocol = \"tcp\"\n");
        check(
            &e,
            3,
            "vip[0].port",
            "invalid type: string \"80\", expected an integer",
        );
        assert_eq!(e.column, Some(8));

        let e = err("[agent]\ninterfaces = [\"eth0\", 5]\n");
        check(&e, 2, "agent.interfaces[1]", "expected a string");

        let e = err(&format!("{HEAD}[[vip.backend]]\naddress = 198\n"));
        check(&e, 6, "vip[0].backend[0].address", "expected a string");

        let e = err("vip = 3\n");
        check(&e, 1, "vip", "expected a sequence");
    }

    #[test]
    fn missing_fields() {
        let e = err("[[vip]]\nport = 80\nprotocol = \"tcp\"\n");
        check(&e, 1, "vip[0].address", "missing field `address`");

        let e = err(&format!(
            "{HEAD}[[vip.backend]]\naddress = \"198.18.0.1\"\n[[vip.backend]]\nweight = 2\n"
        ));
        check(
            &e,
            7,
            "vip[0].backend[1].address",
            "missing field `address`",
        );
    }

    #[test]
    fn duplicate_vip_points_at_the_second() {
        let text = format!(
            "{HEAD}[[vip]]\naddress = \"198.18.10.1\"\nport = 80\nprotocol = \"udp\"\n\
             [[vip]]\naddress = \"198.18.10.1\"\nport = 80\nprotocol = \"tcp\"\n"
        );
        let e = err(&text);
        check(
            &e,
            10,
            "vip[2].address",
            "duplicate VIP 198.18.10.1:80/tcp (already defined by vip[0] at line 2)",
        );
        assert_eq!(e.column, Some(11));
    }

    #[test]
    fn duplicate_vip_name() {
        let text = format!(
            "{HEAD}[[vip]]\nname = \"198.18.10.1:80/tcp\"\naddress = \"198.18.10.2\"\nport = 80\nprotocol = \"tcp\"\n"
        );
        let e = err(&text);
        check(
            &e,
            6,
            "vip[1].name",
            "duplicate VIP name \"198.18.10.1:80/tcp\"",
        );
    }

    #[test]
    fn duplicate_backend() {
        let text = format!(
            "{HEAD}[[vip.backend]]\naddress = \"198.18.0.11\"\n[[vip.backend]]\naddress = \"198.18.0.12\"\n\
             [[vip.backend]]\naddress = \"198.18.0.11\"\n"
        );
        let e = err(&text);
        check(
            &e,
            10,
            "vip[0].backend[2].address",
            "duplicate backend 198.18.0.11 (already defined by vip[0].backend[0] at line 6)",
        );
    }

    #[test]
    fn weight_out_of_range() {
        let text = r#"[agent]
interfaces = ["eth0"]
[[vip]]
address = "198.18.10.1"
port = 80
protocol = "tcp"
[[vip.backend]]
address = "198.18.0.11"
[[vip]]
address = "198.18.10.2"
port = 53
protocol = "udp"
[[vip.backend]]
weight = 0
address = "198.18.0.12"
"#;
        let e = err(text);
        assert_eq!(
            e.to_string(),
            "lb.toml:14:10: vip[1].backend[0].weight: 0 is out of range 1..=10000"
        );
        let e = err(&format!(
            "{HEAD}[[vip.backend]]\naddress = \"198.18.0.1\"\nweight = 10001\n"
        ));
        check(
            &e,
            7,
            "vip[0].backend[0].weight",
            "10001 is out of range 1..=10000",
        );
    }

    #[test]
    fn ring_sizes() {
        let e = err(&format!("{HEAD}ring_size = 65536\n"));
        check(
            &e,
            5,
            "vip[0].ring_size",
            "65536 is not prime (nearest primes: 65521, 65537)",
        );

        let e = err("[agent]\nring_size = 1000\n");
        check(
            &e,
            2,
            "agent.ring_size",
            "1000 is not prime (nearest primes: 997, 1009)",
        );

        let e = err(&format!("{HEAD}ring_size = 2\n"));
        check(&e, 5, "vip[0].ring_size", "2 is out of range 3..=655373");

        let e = err(&format!("[agent]\nring_size = 13\n{HEAD}ring_size = 17\n"));
        check(
            &e,
            7,
            "vip[0].ring_size",
            "17 is larger than agent.ring_size 13",
        );

        let e = err("[agent]\nmax_vips = 4096\n");
        check(&e, 2, "agent.max_vips", "more than the limit 268435456");

        let config = ok(&format!(
            "[agent]\nring_size = 655373\nmax_vips = 16\n{HEAD}ring_size = 3\n"
        ));
        assert_eq!(config.vips[0].ring_size, 3);
    }

    #[test]
    fn ipv6_address_where_ipv4_is_required() {
        let e = err(&format!("{HEAD}[[vip.backend]]\naddress = \"2001:2::1\"\n"));
        check(
            &e,
            6,
            "vip[0].backend[0].address",
            "expected an IPv4 address, got IPv6 address 2001:2::1",
        );
        let e = err("[[vip]]\naddress = \"2001:2::1\"\nport = 80\nprotocol = \"tcp\"\n");
        check(&e, 2, "vip[0].address", "got IPv6 address 2001:2::1");
    }

    #[test]
    fn invalid_ipv4_address() {
        let e = err("[[vip]]\naddress = \"198.18.10\"\nport = 80\nprotocol = \"tcp\"\n");
        check(
            &e,
            2,
            "vip[0].address",
            "invalid IPv4 address \"198.18.10\"",
        );
        let e = err(&format!("{HEAD}[[vip.backend]]\naddress = \"0.0.0.0\"\n"));
        check(
            &e,
            6,
            "vip[0].backend[0].address",
            "0.0.0.0 is the unspecified address",
        );
        let e = err("[[vip]]\naddress = \"224.0.0.1\"\nport = 80\nprotocol = \"tcp\"\n");
        check(&e, 2, "vip[0].address", "multicast");
    }

    #[test]
    fn bad_mac() {
        let backend = "[[vip.backend]]\naddress = \"198.18.0.11\"\n";
        let e = err(&format!("{HEAD}{backend}mac = \"02:00:00:00:00\"\n"));
        check(
            &e,
            7,
            "vip[0].backend[0].mac",
            "invalid MAC address \"02:00:00:00:00\"",
        );
        let e = err(&format!("{HEAD}{backend}mac = \"02:00:00:00:00:1g\"\n"));
        check(&e, 7, "vip[0].backend[0].mac", "invalid MAC address");
        let e = err(&format!("{HEAD}{backend}mac = \"ff:ff:ff:ff:ff:ff\"\n"));
        check(&e, 7, "vip[0].backend[0].mac", "not a unicast MAC address");
        let config = ok(&format!("{HEAD}{backend}mac = \"02-00-00-00-00-AB\"\n"));
        assert_eq!(config.vips[0].backends[0].mac, Some([2, 0, 0, 0, 0, 0xab]));
    }

    #[test]
    fn bad_keywords() {
        let e = err("[[vip]]\naddress = \"198.18.10.1\"\nport = 80\nprotocol = \"icmp\"\n");
        check(
            &e,
            4,
            "vip[0].protocol",
            "invalid protocol \"icmp\", expected tcp or udp",
        );

        let e = err(&format!("{HEAD}[vip.health_check]\nkind = \"ping\"\n"));
        check(
            &e,
            6,
            "vip[0].health_check.kind",
            "invalid health check kind \"ping\", expected one of tcp, http, none",
        );

        let e = err(&format!(
            "{HEAD}[[vip.backend]]\naddress = \"198.18.0.1\"\nstate = \"down\"\n"
        ));
        check(
            &e,
            7,
            "vip[0].backend[0].state",
            "invalid backend state \"down\", expected active or drain",
        );

        let e = err("[agent]\nxdp_mode = \"turbo\"\n");
        check(
            &e,
            2,
            "agent.xdp_mode",
            "invalid xdp_mode \"turbo\", expected one of auto, native, skb",
        );
    }

    #[test]
    fn timeout_greater_than_interval() {
        let e = err(&format!(
            "{HEAD}[vip.health_check]\ninterval_ms = 200\ntimeout_ms = 300\n"
        ));
        check(
            &e,
            7,
            "vip[0].health_check.timeout_ms",
            "timeout_ms 300 is greater than interval_ms 200",
        );

        // A backend override shortening the interval below the VIP's explicit timeout.
        let e = err(&format!(
            "{HEAD}[vip.health_check]\ntimeout_ms = 800\n[[vip.backend]]\naddress = \"198.18.0.1\"\n\
             [vip.backend.health_check]\ninterval_ms = 500\n"
        ));
        check(
            &e,
            10,
            "vip[0].backend[0].health_check.interval_ms",
            "interval_ms 500 is less than the timeout_ms 800 inherited from vip[0].health_check",
        );

        let e = err(&format!("{HEAD}[vip.health_check]\ntimeout_ms = 0\n"));
        check(
            &e,
            6,
            "vip[0].health_check.timeout_ms",
            "0 is out of range 1..=3600000",
        );

        let e = err(&format!("{HEAD}[vip.health_check]\ninterval_ms = 5\n"));
        check(
            &e,
            6,
            "vip[0].health_check.interval_ms",
            "5 is out of range 10..=3600000",
        );

        // An implicit timeout follows a short interval.
        let config = ok(&format!(
            "{HEAD}[vip.health_check]\ninterval_ms = 100\n[[vip.backend]]\naddress = \"198.18.0.1\"\n\
             [vip.backend.health_check]\ninterval_ms = 2000\n"
        ));
        assert_eq!(
            config.vips[0].health_check.timeout,
            Duration::from_millis(100)
        );
        assert_eq!(
            config.vips[0].backends[0].health_check.timeout,
            Duration::from_millis(500)
        );
    }

    #[test]
    fn rise_and_fall_out_of_range() {
        let e = err(&format!("{HEAD}[vip.health_check]\nrise = 0\n"));
        check(
            &e,
            6,
            "vip[0].health_check.rise",
            "0 is out of range 1..=100",
        );
        let e = err(&format!(
            "{HEAD}[[vip.backend]]\naddress = \"198.18.0.1\"\n[vip.backend.health_check]\nfall = 101\n"
        ));
        check(
            &e,
            8,
            "vip[0].backend[0].health_check.fall",
            "101 is out of range 1..=100",
        );
    }

    #[test]
    fn http_only_fields_with_other_kinds() {
        let e = err(&format!(
            "{HEAD}[vip.health_check]\nkind = \"tcp\"\npath = \"/x\"\n"
        ));
        check(
            &e,
            7,
            "vip[0].health_check.path",
            "path is only valid with kind = \"http\", but kind is \"tcp\"",
        );

        let e = err(&format!(
            "{HEAD}[vip.health_check]\nkind = \"none\"\nhost = \"a\"\n"
        ));
        check(&e, 7, "vip[0].health_check.host", "but kind is \"none\"");

        let e = err(&format!(
            "{HEAD}[vip.health_check]\nexpected_status = 204\n"
        ));
        check(
            &e,
            6,
            "vip[0].health_check.expected_status",
            "but kind defaults to \"tcp\"",
        );

        let e = err(&format!(
            "{HEAD}[[vip.backend]]\naddress = \"198.18.0.1\"\n[vip.backend.health_check]\npath = \"/\"\n"
        ));
        check(
            &e,
            8,
            "vip[0].backend[0].health_check.path",
            "but kind is \"tcp\" inherited from vip[0].health_check",
        );

        let e = err(&format!(
            "{HEAD}[vip.health_check]\nkind = \"http\"\npath = \"healthz\"\n"
        ));
        check(&e, 7, "vip[0].health_check.path", "must start with '/'");
        let e = err(&format!(
            "{HEAD}[vip.health_check]\nkind = \"http\"\nexpected_status = 99\n"
        ));
        check(
            &e,
            7,
            "vip[0].health_check.expected_status",
            "99 is out of range 100..=599",
        );
    }

    #[test]
    fn health_check_override_merging() {
        let config = ok(&format!(
            "{HEAD}[vip.health_check]\nkind = \"http\"\npath = \"/ready\"\nrise = 5\n\
             [[vip.backend]]\naddress = \"198.18.0.1\"\n[vip.backend.health_check]\nkind = \"tcp\"\n\
             [[vip.backend]]\naddress = \"198.18.0.2\"\n[vip.backend.health_check]\nexpected_status = 204\nfall = 1\n\
             [[vip.backend]]\naddress = \"198.18.0.3\"\n"
        ));
        let vip = &config.vips[0];
        let http = |status| HealthCheckKind::Http {
            path: "/ready".into(),
            expected_status: status,
            host: None,
        };
        assert_eq!(vip.health_check.kind, http(200));
        assert_eq!(vip.health_check.rise, 5);
        // Switching to tcp drops the HTTP settings and keeps the rest.
        assert_eq!(
            vip.backends[0].health_check,
            HealthCheck {
                rise: 5,
                ..tcp_check(80)
            }
        );
        assert_eq!(
            vip.backends[1].health_check,
            HealthCheck {
                kind: http(204),
                rise: 5,
                fall: 1,
                ..tcp_check(80)
            }
        );
        assert_eq!(vip.backends[2].health_check, vip.health_check);

        // Switching a tcp VIP's backend to http starts from the HTTP defaults.
        let config = ok(&format!(
            "{HEAD}[[vip.backend]]\naddress = \"198.18.0.1\"\n[vip.backend.health_check]\nkind = \"http\"\nhost = \"h\"\n"
        ));
        assert_eq!(
            config.vips[0].backends[0].health_check.kind,
            HealthCheckKind::Http {
                path: "/".into(),
                expected_status: 200,
                host: Some("h".into())
            }
        );
        assert_eq!(config.vips[0].health_check.kind, HealthCheckKind::Tcp);
    }

    #[test]
    fn invalid_instance_name() {
        let e = err("[agent]\ninstance = \"a/b\"\n");
        check(&e, 2, "agent.instance", "invalid instance name \"a/b\"");
        assert_eq!(e.column, Some(12));
        let long = "x".repeat(65);
        let e = err(&format!("[agent]\ninstance = \"{long}\"\n"));
        check(&e, 2, "agent.instance", "1 to 64 characters");
        let e = err("[agent]\ninstance = \"\"\n");
        check(&e, 2, "agent.instance", "invalid instance name");
        ok(&format!("[agent]\ninstance = \"{}\"\n", "A_-9".repeat(16)));
    }

    #[test]
    fn other_agent_fields() {
        let e = err("[agent]\ninterfaces = [\"eth0\", \"eth0\"]\n");
        check(&e, 2, "agent.interfaces[1]", "listed twice");
        let e = err("[agent]\ninterfaces = [\"a-very-long-interface\"]\n");
        check(&e, 2, "agent.interfaces[0]", "invalid interface name");
        let e = err("[agent]\nmetrics_listen = \"localhost\"\n");
        check(
            &e,
            2,
            "agent.metrics_listen",
            "invalid socket address \"localhost\"",
        );
        let e = err("[agent]\nconntrack_entries = 268435457\n");
        check(
            &e,
            2,
            "agent.conntrack_entries",
            "out of range 1..=268435456",
        );
        let e = err("[agent]\nmax_backends = 0\n");
        check(&e, 2, "agent.max_backends", "0 is out of range 1..=1048576");
        let e = err(&format!(
            "[agent]\ncontrol_socket = \"/{}\"\n",
            "s".repeat(107)
        ));
        check(&e, 2, "agent.control_socket", "invalid socket path");
        let e = err(&format!("{HEAD}port = 0\n"));
        // Duplicate key `port`: a syntax error, reported at the second one.
        check(&e, 5, "vip[0].port", "duplicate key");
        let e = err("[[vip]]\naddress = \"198.18.10.1\"\nport = 65536\nprotocol = \"tcp\"\n");
        check(&e, 3, "vip[0].port", "65536 is out of range 1..=65535");
    }

    #[test]
    fn too_many_vips() {
        let vip = |i: u8| {
            format!("[[vip]]\naddress = \"198.18.10.{i}\"\nport = 80\nprotocol = \"tcp\"\n")
        };
        let text = format!("[agent]\nmax_vips = 2\n{}{}{}", vip(1), vip(2), vip(3));
        let e = err(&text);
        check(
            &e,
            11,
            "vip[2]",
            "too many VIPs: agent.max_vips is 2 and this is VIP number 3",
        );
        ok(&format!("[agent]\nmax_vips = 2\n{}{}", vip(1), vip(2)));
    }

    #[test]
    fn too_many_backends() {
        let backend = |i: u8| format!("[[vip.backend]]\naddress = \"198.18.0.{i}\"\n");
        // Counted over all VIPs.
        let text = format!(
            "[agent]\nmax_backends = 2\n{HEAD}{}[[vip]]\naddress = \"198.18.10.2\"\nport = 80\nprotocol = \"tcp\"\n{}{}",
            backend(1),
            backend(1),
            backend(2)
        );
        let e = err(&text);
        check(
            &e,
            15,
            "vip[1].backend[1]",
            "too many backends: agent.max_backends is 2 and this is backend number 3",
        );

        let text = format!(
            "{HEAD}ring_size = 3\n{}{}{}{}",
            backend(1),
            backend(2),
            backend(3),
            backend(4)
        );
        let e = err(&text);
        check(&e, 12, "vip[0].backend[3]", "more backends than ring slots");
    }

    #[test]
    fn display_format() {
        let mut e = ConfigError {
            file: "lb.toml".into(),
            line: Some(3),
            column: Some(7),
            field: Some("agent.instance".into()),
            message: "boom".into(),
        };
        assert_eq!(e.to_string(), "lb.toml:3:7: agent.instance: boom");
        e.column = None;
        assert_eq!(e.to_string(), "lb.toml:3: agent.instance: boom");
        e.field = None;
        assert_eq!(e.to_string(), "lb.toml:3: boom");
        e.line = None;
        assert_eq!(e.to_string(), "lb.toml: boom");
    }

    #[test]
    fn columns_count_characters() {
        assert_eq!(line_col("", 0), (1, 1));
        assert_eq!(line_col("ab\ncd", 3), (2, 1));
        assert_eq!(line_col("ab\ncd", 4), (2, 2));
        assert_eq!(line_col("ab\ncd", 99), (2, 3));
        // "é" is two bytes, one column.
        assert_eq!(line_col("é = x", 5), (1, 5));
        let e = err("[agent]  # café\ninstance = \"é\" ; x = 1\n");
        assert_eq!(e.line, Some(2));
        assert_eq!(e.column, Some(16));
    }

    #[test]
    fn load_from_file() {
        let dir = std::env::temp_dir().join(format!("lb-config-test-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let path = dir.join("lb.toml");
        std::fs::write(&path, EXAMPLE).unwrap();
        let config = Config::load(&path).unwrap();
        assert_eq!(config.source, path);
        std::fs::write(&path, "[agent]\nmax_vips = 0\n").unwrap();
        let e = Config::load(&path).unwrap_err();
        assert_eq!(e.file, path);
        assert_eq!(
            e.to_string(),
            format!(
                "{}:2:12: agent.max_vips: 0 is out of range 1..=65536",
                path.display()
            )
        );
        std::fs::remove_dir_all(&dir).unwrap();

        let e = Config::load(&dir.join("missing.toml")).unwrap_err();
        assert_eq!((e.line, e.field.as_deref()), (None, None));
        assert!(
            e.to_string()
                .contains("missing.toml: cannot read the configuration file"),
            "{e}"
        );
    }

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

    #[test]
    fn primes() {
        let small: Vec<u32> = (0..30).filter(|&n| is_prime(n)).collect();
        assert_eq!(small, [2, 3, 5, 7, 11, 13, 17, 19, 23, 29]);
        assert!(is_prime(65537) && is_prime(MAX_RING_SIZE) && !is_prime(65535));
    }
}
