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
//! control_group = "lbadmin"            # optional group name or gid: socket 0660 for that group,
//!                                      # whose members may change the agent; absent = 0600, root only
//! metrics_listen = "127.0.0.1:9100"    # optional SocketAddr; absent = no metrics server (nor status page)
//! conntrack_entries = 1048576          # optional, 1..=2^28, default lb_common::DEFAULT_CONNTRACK_ENTRIES
//! max_vips = 64                        # optional, 1..=65536, default lb_common::DEFAULT_MAX_VIPS
//! max_backends = 4096                  # optional, 1..=2^20, default lb_common::DEFAULT_MAX_BACKENDS
//! ring_size = 65537                    # optional, prime, 3..=655373, default lb_common::DEFAULT_RING_SIZE;
//!                                      # the default ring size of VIPs and the ring stride of the
//!                                      # datapath: max_vips * ring_size must be <= 2^28
//! conntrack_udp_idle_ms = 30000        # optional, 1000..=2_592_000_000: a UDP flow idle this long is over
//! conntrack_tcp_idle_ms = 3600000      # optional, same range: a TCP flow idle this long is over
//! conntrack_tcp_closing_ms = 30000     # optional, same range: idle time after a FIN or RST
//!                                      # (the three apply at once on reload)
//! syn_guard = "auto"                   # optional: auto (default) | always | off: when TCP SYNs to a VIP go
//!                                      # unrecorded (steered by the ring, recorded by the first ACK), so that
//!                                      # a SYN flood neither costs inserts nor evicts flows; applied on reload
//! syn_guard_rate = 10000               # optional, 10..=10^8: auto's threshold, SYNs/s for one VIP on one CPU
//! encap_source_v4 = "198.18.0.10"      # optional: outer source of ipip/gue packets (default: per
//!                                      # backend, the route's preferred source, else the egress
//!                                      # interface's first IPv4 address); applied on reload
//! gue_port = 6080                      # optional, 1..=65535, default 6080: GUE destination port
//! nat_port_range = "61000-65535"       # optional, MIN-MAX with 1024 <= MIN <= MAX: the SNAT ports of
//!                                      # NAT VIPs (default above Linux's ephemeral range); applied on reload
//! nat_entries = 65536                  # optional, 1..=2^28: elements of each NAT map (restart only)
//! acl_entries = 262144                 # optional, 1..=2^24: prefixes each ACL trie holds (restart only)
//! max_kernel_memory = "4GiB"           # optional, bytes or "N[B|KiB|MiB|GiB|TiB]", >= 1MiB, default 4GiB:
//!                                      # the most the maps may need (crate::kernel_memory); more is an
//!                                      # error located at the size key of the biggest map if written
//! snat_addresses = ["198.18.1.1"]      # optional, both families, <= 4 each: SNAT addresses of NAT VIPs
//!                                      # naming none (default: each backend's route source); never a VIP
//!
//! [agent.announce]                     # optional: publish ready VIP addresses as routes ADDR/32 (/128)
//!                                      # dev DEVICE table TABLE proto PROTOCOL for BIRD/FRR (absent: off);
//!                                      # read at start (a reload that changes it warns)
//! table = 100                          # 1..=4294967295, not 253/254/255 (default/main/local); required
//! protocol = 200                       # optional, 5..=255, default 200: tags the agent's routes (0-4 are
//!                                      # the kernel's); routes of this protocol in the table are the agent's
//! device = "lo"                        # optional, default "lo": the routes' device
//!
//! [[vip]]                              # zero or more; identified by (address, port, protocol)
//! name = "web"                         # optional, default "<address>:<port>/<protocol>"; unique
//! address = "198.18.10.1"
//! port = 80                            # 1..=65535
//! protocol = "tcp"                     # tcp | udp
//! forwarding = "dsr-l2"                # dsr-l2 (default) | ipip | gue | nat; a reload that changes it
//!                                      # is applied (established flows go on in the new mode)
//! icmp_echo = true                     # default true: lb answers pings to the VIP address itself
//!                                      # (in XDP); an address answers if all its VIPs allow it
//! ring_size = 65537                    # optional, prime, 3..=655373 and <= [agent] ring_size
//!                                      # (default: [agent] ring_size); >= the number of backends
//! snat_addresses = ["198.18.1.2"]      # nat only: this VIP's SNAT addresses (its family), over the agent's
//! allow = ["198.18.0.0/15"]            # optional: source prefixes of the VIP's family; the longest
//! deny = ["198.18.66.0/24"]            # match of either list decides, no match: denied iff allow is
//!                                      # not empty; <= 100000 per VIP (see crate::acl)
//! scheduler = "maglev"                 # maglev (default) | round_robin | weighted_round_robin |
//!                                      # least_connections: who picks a new flow's backend (see
//!                                      # crate::sched); round robins take <= 1024 backends, least
//!                                      # connections <= 64
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
//! port = 8080                          # nat only: the backend's port (default: the VIP's), and its
//!                                      # health check's unless a health_check table sets one
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
//!
//! # Layout
//!
//! - `model`: the validated types ([`Config`] and what it holds),
//!   their limits, and [`reload_check`], which says what a reload may do
//!   with a changed `[agent]` table;
//! - `raw`: the file as written (serde shapes with spans) and the lookups
//!   that locate deserializer errors (line, column, field path);
//! - `validate`: the rules, defaults and merging, and [`ConfigError`].

mod model;
mod raw;
mod show;
mod validate;

pub use model::{
    AgentConfig, AnnounceSettings, BACKENDS_LIMIT, BackendConfig, BackendState, Config,
    ConntrackSettings, DEFAULT_ANNOUNCE_DEVICE, DEFAULT_ANNOUNCE_PROTOCOL, DEFAULT_INSTANCE,
    EncapSettings, Forwarding, HealthCheck, HealthCheckKind, KernelSettings, MAX_CONNTRACK_ENTRIES,
    MAX_RING_SIZE, MAX_WEIGHT, MIN_RING_SIZE, NatSettings, ParseKeywordError, Protocol,
    RING_SLOTS_LIMIT, RateLimitConfig, StartSettings, SynGuardMode, VIPS_LIMIT, VipConfig,
    XdpModeSetting, reload_check,
};
pub use show::render_toml;
pub use validate::{ConfigError, backend_family_error, unusable_address};

#[cfg(test)]
mod tests;
