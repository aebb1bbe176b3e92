//! The `[agent]` table's rules.

use std::{net::SocketAddr, path::PathBuf};

use super::*;

impl Ctx<'_> {
    pub(super) fn agent(&self, raw: Option<&RawAgent>) -> Result<AgentConfig, ConfigError> {
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
                if !super::announce::ifname_ok(name) {
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

        let control_group = match &raw.control_group {
            Some(v) => {
                let g = v.get_ref();
                let ok = (1..=32).contains(&g.len())
                    && !g.starts_with('-')
                    && g.chars()
                        .all(|c| c.is_ascii_alphanumeric() || matches!(c, '_' | '-' | '.'));
                if !ok {
                    return Err(self.error(
                        v.span(),
                        "agent.control_group",
                        format!(
                            "invalid group {g:?}: expected a group name (1 to 32 of A-Z a-z 0-9 _ - .) or a numeric gid"
                        ),
                    ));
                }
                Some(g.clone())
            }
            None => None,
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

        let timeout = |v: &Option<S<i64>>, field: &str, default: Duration| {
            let (lo, hi) = CONNTRACK_TIMEOUT_MS;
            let d = u32::try_from(default.as_millis()).expect("defaults fit");
            self.opt_int(v.as_ref(), field, lo, hi, d)
                .map(|ms| Duration::from_millis(ms.into()))
        };
        let conntrack = ConntrackSettings {
            udp_idle: timeout(
                &raw.conntrack_udp_idle_ms,
                "agent.conntrack_udp_idle_ms",
                DEFAULT_UDP_IDLE,
            )?,
            tcp_idle: timeout(
                &raw.conntrack_tcp_idle_ms,
                "agent.conntrack_tcp_idle_ms",
                DEFAULT_TCP_IDLE,
            )?,
            tcp_closing: timeout(
                &raw.conntrack_tcp_closing_ms,
                "agent.conntrack_tcp_closing_ms",
                DEFAULT_TCP_CLOSING,
            )?,
            syn_guard: match &raw.syn_guard {
                Some(v) => self.keyword(v, "agent.syn_guard")?,
                None => SynGuardMode::Auto,
            },
            syn_guard_rate: self.opt_int(
                raw.syn_guard_rate.as_ref(),
                "agent.syn_guard_rate",
                SYN_GUARD_RATE.0,
                SYN_GUARD_RATE.1,
                DEFAULT_SYN_GUARD_RATE,
            )?,
        };

        let source_v4 = match &raw.encap_source_v4 {
            Some(v) => Some(self.ipv4(v, "agent.encap_source_v4", "source")?),
            None => None,
        };
        let source_v6 = match &raw.encap_source_v6 {
            Some(v) => Some(self.ipv6(v, "agent.encap_source_v6", "source")?),
            None => None,
        };
        let gue_port = self.opt_int(
            raw.gue_port.as_ref(),
            "agent.gue_port",
            1,
            u16::MAX,
            lb_common::DEFAULT_GUE_PORT,
        )?;

        let (nat, nat_entries) = self.nat_settings(raw)?;
        let acl_entries = self.acl_entries(raw)?;
        let announce = self.announce(raw.announce.as_ref())?;

        let kernel = KernelSettings {
            instance,
            conntrack_entries,
            max_vips,
            max_backends,
            ring_size,
            nat_entries,
            acl_entries,
        };
        let max_kernel_memory = self.kernel_memory(raw, &kernel)?;

        Ok(AgentConfig {
            nat,
            conntrack,
            encap: EncapSettings {
                source_v4,
                source_v6,
                gue_port,
            },
            kernel,
            start: StartSettings {
                interfaces,
                xdp_mode,
                control_socket,
                control_group,
                metrics_listen,
                announce,
                max_kernel_memory,
            },
        })
    }

    /// `max_kernel_memory`, and the maps' total checked against it.
    fn kernel_memory(&self, raw: &RawAgent, kernel: &KernelSettings) -> Result<u64, ConfigError> {
        use crate::kernel_memory::{self as km, MIN_MAX_KERNEL_MEMORY};
        let field = "agent.max_kernel_memory";
        let cap = match &raw.max_kernel_memory {
            None => km::DEFAULT_MAX_KERNEL_MEMORY,
            Some(v) => {
                let bytes = match v.get_ref() {
                    RawBytes::Int(n) => u64::try_from(*n).ok(),
                    RawBytes::Text(s) => km::parse_bytes(s),
                };
                match bytes {
                    Some(b) if b >= MIN_MAX_KERNEL_MEMORY => b,
                    _ => {
                        return Err(self.error(
                            v.span(),
                            field,
                            format!(
                                "invalid size {}: expected bytes (an integer) or a string like \"512MiB\" or \"4GiB\" (units B, KiB, MiB, GiB, TiB), at least 1MiB",
                                match v.get_ref() {
                                    RawBytes::Int(n) => n.to_string(),
                                    RawBytes::Text(s) => format!("{s:?}"),
                                }
                            ),
                        ));
                    }
                }
            }
        };
        let maps = km::plan(kernel.map_sizes(), km::possible_cpus()).map_err(|e| ConfigError {
            file: self.file.to_path_buf(),
            line: None,
            column: None,
            field: Some(field.into()),
            message: format!("cannot read the eBPF object's maps: {e}"),
        })?;
        let total = km::total(&maps);
        if total <= cap {
            return Ok(cap);
        }
        let biggest = maps
            .iter()
            .take(3)
            .map(|m| {
                format!(
                    "{} {} ({} x {} entries)",
                    m.name,
                    km::human(m.bytes),
                    m.kind,
                    m.entries
                )
            })
            .collect::<Vec<_>>()
            .join(", ");
        let message = format!(
            "the maps need {} ({total} bytes) of kernel memory, more than max_kernel_memory {} ({cap} bytes); biggest: {biggest}. Lower the sizes or raise max_kernel_memory",
            km::human(total),
            km::human(cap),
        );
        // Located at the key that sizes the biggest map, if written; else
        // at max_kernel_memory, if written.
        let sizing = match maps[0].name.as_str() {
            "CONNTRACK" | "CONNTRACK6" => raw
                .conntrack_entries
                .as_ref()
                .map(|v| (v.span(), "agent.conntrack_entries")),
            "RINGS" => raw
                .ring_size
                .as_ref()
                .map(|v| (v.span(), "agent.ring_size"))
                .or_else(|| raw.max_vips.as_ref().map(|v| (v.span(), "agent.max_vips"))),
            n if n.starts_with("NAT_") => raw
                .nat_entries
                .as_ref()
                .map(|v| (v.span(), "agent.nat_entries")),
            n if n.starts_with("ACL") => raw
                .acl_entries
                .as_ref()
                .map(|v| (v.span(), "agent.acl_entries")),
            "BACKENDS" | "BACKEND_STATS" | "LC_ACTIVE" | "LC_CORRECTION" => raw
                .max_backends
                .as_ref()
                .map(|v| (v.span(), "agent.max_backends")),
            _ => raw.max_vips.as_ref().map(|v| (v.span(), "agent.max_vips")),
        }
        .or_else(|| raw.max_kernel_memory.as_ref().map(|v| (v.span(), field)));
        Err(match sizing {
            Some((span, key)) => self.error(span, key, message),
            None => ConfigError {
                file: self.file.to_path_buf(),
                line: None,
                column: None,
                field: Some(field.into()),
                message,
            },
        })
    }
}
