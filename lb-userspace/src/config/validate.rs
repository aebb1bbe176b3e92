//! The rules: resolves the raw file into a [`Config`], applying defaults,
//! and reports the first violation as a located [`ConfigError`].

use std::{
    collections::HashMap,
    fmt,
    net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr},
    ops::Range,
    path::{Path, PathBuf},
    str::FromStr,
    time::Duration,
};

use super::{
    model::{
        AgentConfig, BACKENDS_LIMIT, BackendConfig, BackendState, CONNTRACK_TIMEOUT_MS, Config,
        ConntrackSettings, DEFAULT_INSTANCE, DEFAULT_SYN_GUARD_RATE, DEFAULT_TCP_CLOSING,
        DEFAULT_TCP_IDLE, DEFAULT_UDP_IDLE, EncapSettings, Forwarding, HealthCheck,
        HealthCheckKind, KernelSettings, KindTag, MAX_CONNTRACK_ENTRIES, MAX_RING_SIZE, MAX_WEIGHT,
        MIN_RING_SIZE, ParseKeywordError, Protocol, RING_SLOTS_LIMIT, RateLimitConfig,
        SYN_GUARD_RATE, StartSettings, SynGuardMode, VIPS_LIMIT, VipConfig, XdpModeSetting,
    },
    raw::{self, RawAgent, RawBytes, RawFile, RawHealthCheck, RawVip, S, line_col},
};
use crate::{mac::MacAddr, maglev::is_prime};

mod acl;
mod agent;
mod announce;
mod nat;
mod ratelimit;

const DEFAULT_INTERVAL_MS: u32 = 1000;
const DEFAULT_TIMEOUT_MS: u32 = 500;
const DEFAULT_RISE: u32 = 2;
const DEFAULT_FALL: u32 = 3;
const DEFAULT_HTTP_PATH: &str = "/";
const DEFAULT_HTTP_STATUS: u16 = 200;
const MAX_INTERVAL_MS: u32 = 3_600_000;
/// Longest Unix socket path (`sun_path` minus the terminating NUL).
const MAX_SOCKET_PATH: usize = 107;

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

/// [`Config::parse`]: deserialize, then validate.
pub(super) fn parse(text: &str, file: &Path) -> Result<Config, ConfigError> {
    let raw = raw::parse(text, file)?;
    Ctx { text, file }.resolve(&raw)
}

/// The text being validated, for locating errors.
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

    /// An IPv4 or IPv6 address usable as a unicast `what` address.
    fn ip(&self, v: &S<String>, field: &str, what: &str) -> Result<IpAddr, ConfigError> {
        let s = v.get_ref();
        let a: IpAddr = s
            .parse()
            .map_err(|_| self.error(v.span(), field, format!("invalid IP address {s:?}")))?;
        match unusable_address(a) {
            Some(bad) => Err(self.error(
                v.span(),
                field,
                format!("{a} is {bad}, not usable as a {what} address"),
            )),
            None => Ok(a),
        }
    }

    fn ipv4(&self, v: &S<String>, field: &str, what: &str) -> Result<Ipv4Addr, ConfigError> {
        match self.ip(v, field, what) {
            Ok(IpAddr::V4(a)) => Ok(a),
            Ok(IpAddr::V6(_)) => Err(self.error(
                v.span(),
                field,
                format!("expected an IPv4 address, got IPv6 address {}", v.get_ref()),
            )),
            Err(_) if v.get_ref().parse::<IpAddr>().is_err() => Err(self.error(
                v.span(),
                field,
                format!("invalid IPv4 address {:?}", v.get_ref()),
            )),
            Err(e) => Err(e),
        }
    }

    fn ipv6(&self, v: &S<String>, field: &str, what: &str) -> Result<Ipv6Addr, ConfigError> {
        match self.ip(v, field, what) {
            Ok(IpAddr::V6(a)) => Ok(a),
            Ok(IpAddr::V4(_)) => Err(self.error(
                v.span(),
                field,
                format!("expected an IPv6 address, got IPv4 address {}", v.get_ref()),
            )),
            Err(_) if v.get_ref().parse::<IpAddr>().is_err() => Err(self.error(
                v.span(),
                field,
                format!("invalid IPv6 address {:?}", v.get_ref()),
            )),
            Err(e) => Err(e),
        }
    }

    fn resolve(&self, raw: &RawFile) -> Result<Config, ConfigError> {
        let agent = self.agent(raw.agent.as_ref())?;
        let mut vips: Vec<VipConfig> = Vec::with_capacity(raw.vip.len());
        // key → (vip index, offset of its address); name → vip index.
        let mut keys: HashMap<(IpAddr, u16, Protocol), (usize, usize)> = HashMap::new();
        let mut names: HashMap<String, usize> = HashMap::new();
        let mut total_backends = 0usize;
        for (i, raw_vip) in raw.vip.iter().enumerate() {
            let path = format!("vip[{i}]");
            if i >= agent.kernel.max_vips as usize {
                return Err(self.error(
                    raw_vip.span(),
                    path,
                    format!(
                        "too many VIPs: agent.max_vips is {} and this is VIP number {}",
                        agent.kernel.max_vips,
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
                        "duplicate VIP {}/{} (already defined by vip[{first}] at line {})",
                        SocketAddr::new(vip.address, vip.port),
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
        self.check_snat_addresses(raw, &vips)?;
        self.check_acl_total(raw, &vips, agent.kernel.acl_entries)?;
        Ok(Config {
            agent,
            vips,
            source: self.file.to_path_buf(),
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
        let address = self.ip(&r.address, &f("address"), "VIP")?;
        let port = self.int(&r.port, &f("port"), 1u16, u16::MAX)?;
        let protocol: Protocol = self.keyword(&r.protocol, &f("protocol"))?;
        let forwarding: Forwarding = match &r.forwarding {
            Some(v) => self.keyword(v, &f("forwarding"))?,
            None => Forwarding::DsrL2,
        };
        let icmp_echo = r.icmp_echo.as_ref().is_none_or(|v| *v.get_ref());
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
            None => format!("{}/{protocol}", SocketAddr::new(address, port)),
        };
        let ring_size = match &r.ring_size {
            Some(v) => {
                let n = self.ring_size(v, &f("ring_size"))?;
                if n > agent.kernel.ring_size {
                    return Err(self.error(
                        v.span(),
                        f("ring_size"),
                        format!(
                            "{n} is larger than agent.ring_size {} (the datapath's ring stride)",
                            agent.kernel.ring_size
                        ),
                    ));
                }
                n
            }
            None => agent.kernel.ring_size,
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

        let vip_address = address;
        let mut backends: Vec<BackendConfig> = Vec::with_capacity(r.backend.len());
        // address → (backend index, offset of its address)
        let mut seen: HashMap<IpAddr, (usize, usize)> = HashMap::new();
        for (j, raw_backend) in r.backend.iter().enumerate() {
            let bpath = format!("{path}.backend[{j}]");
            let b = raw_backend.get_ref();
            *total_backends += 1;
            if *total_backends > agent.kernel.max_backends as usize {
                return Err(self.error(
                    raw_backend.span(),
                    bpath,
                    format!(
                        "too many backends: agent.max_backends is {} and this is backend number {} in the file",
                        agent.kernel.max_backends, total_backends
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
            let address = self.ip(&b.address, &bf("address"), "backend")?;
            if let Some(why) = backend_family_error(vip_address, address, forwarding) {
                return Err(self.error(b.address.span(), bf("address"), why));
            }
            let backend_port = self.backend_port(b.port.as_ref(), &bf("port"), forwarding)?;
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
            let mut health_check = match &b.health_check {
                Some(h) => {
                    self.health_check(h.get_ref(), &bf("health_check"), &base)?
                        .0
                }
                None => health_check.clone(),
            };
            // A NAT backend is checked where it serves, unless told.
            let explicit = |h: &Option<S<RawHealthCheck>>| {
                h.as_ref().is_some_and(|h| h.get_ref().port.is_some())
            };
            if let Some(p) = backend_port
                && !explicit(&r.health_check)
                && !explicit(&b.health_check)
            {
                health_check.port = p;
            }
            backends.push(BackendConfig {
                address,
                weight,
                state,
                mac,
                port: backend_port,
                health_check,
            });
        }
        let snat_addresses = self.vip_snat_addresses(path, r, vip_address, forwarding, agent)?;
        let acl = self.vip_acl(path, &name, r, vip_address)?;
        let rate_limit = match &r.rate_limit {
            Some(t) => self.rate_limit(t.get_ref(), &f("rate_limit"))?,
            None => RateLimitConfig::default(),
        };
        let scheduler = self.scheduler(path, &name, r)?;

        Ok(VipConfig {
            name,
            address,
            port,
            protocol,
            forwarding,
            icmp_echo,
            ring_size,
            health_check,
            backends,
            snat_addresses,
            acl,
            rate_limit,
            scheduler,
        })
    }

    /// A VIP's `scheduler` (default maglev), checked against the number
    /// of its backends. Errors name the VIP.
    fn scheduler(
        &self,
        path: &str,
        name: &str,
        r: &RawVip,
    ) -> Result<crate::sched::Scheduler, ConfigError> {
        let field = format!("{path}.scheduler");
        let Some(v) = &r.scheduler else {
            return Ok(crate::sched::Scheduler::Maglev);
        };
        let s: crate::sched::Scheduler = v.get_ref().parse().map_err(|e: ParseKeywordError| {
            self.error(v.span(), &field, format!("VIP {name:?}: {e}"))
        })?;
        if let Some(max) = s.max_backends()
            && r.backend.len() > max as usize
        {
            return Err(self.error(
                v.span(),
                &field,
                format!(
                    "VIP {name:?} has {} backends, more than scheduler {s} takes ({max})",
                    r.backend.len()
                ),
            ));
        }
        Ok(s)
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

/// Why `a` cannot be a VIP, backend or source address: not one host
/// reachable by unicast (IPv6 link-local addresses also need an interface
/// the config cannot name).
pub fn unusable_address(a: IpAddr) -> Option<&'static str> {
    match a {
        IpAddr::V4(a) if a.is_unspecified() => Some("the unspecified address"),
        IpAddr::V4(a) if a.is_broadcast() => Some("the broadcast address"),
        IpAddr::V4(a) if a.is_multicast() => Some("a multicast address"),
        IpAddr::V4(a) if a.is_loopback() => Some("a loopback address"),
        IpAddr::V6(a) if a.is_unspecified() => Some("the unspecified address"),
        IpAddr::V6(a) if a.is_multicast() => Some("a multicast address"),
        IpAddr::V6(a) if a.is_loopback() => Some("a loopback address"),
        IpAddr::V6(a) if a.is_unicast_link_local() => Some("a link-local address"),
        IpAddr::V6(a) if a.to_ipv4_mapped().is_some() => Some("an IPv4-mapped address"),
        _ => None,
    }
}

fn family(a: IpAddr) -> &'static str {
    if a.is_ipv4() { "IPv4" } else { "IPv6" }
}

/// Why a backend at `backend` cannot serve a VIP at `vip` forwarded by
/// `forwarding`: at L2 the frame keeps its IP header, so the backend must
/// be of the VIP's family; a tunnel can carry IPv4 in IPv6 (4in6), but
/// not IPv6 in IPv4.
pub fn backend_family_error(
    vip: IpAddr,
    backend: IpAddr,
    forwarding: Forwarding,
) -> Option<String> {
    match (vip, backend, forwarding) {
        (IpAddr::V4(_), IpAddr::V4(_), _) | (IpAddr::V6(_), IpAddr::V6(_), _) => None,
        (IpAddr::V4(_), IpAddr::V6(_), Forwarding::Ipip | Forwarding::Gue) => None,
        (_, _, Forwarding::Nat) => Some(format!(
            "backend {backend} is {} but the VIP {vip} is {}: forwarding = \"nat\" translates addresses within one family, so backends must be of the VIP's family",
            family(backend),
            family(vip)
        )),
        (_, _, Forwarding::DsrL2) => Some(format!(
            "backend {backend} is {} but the VIP {vip} is {}: forwarding = \"dsr-l2\" keeps the client's IP header, so backends must be of the VIP's family",
            family(backend),
            family(vip)
        )),
        (IpAddr::V6(_), IpAddr::V4(_), f) => Some(format!(
            "backend {backend} is IPv4 but the VIP {vip} is IPv6: IPv6 in IPv4 is not supported (forwarding = \"{f}\"); give IPv6 backends"
        )),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

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
}
