//! The demo's network, by forwarding mode and address family: for
//! `dsr-l2` the L2 topology (client, lb and backends on one bridge); for
//! `ipip` and `gue` the routed one (backends in another subnet behind a
//! router, each running `lb decap` for lb's address only). With `--ipv6`
//! the VIP, the backends and every address the story uses are IPv6
//! (2001:2::/48): the L2 topology with its IPv6 option, or the routed
//! one built dual-stack. For `nat` the routed topology without decap:
//! the backends are unmodified hosts (no VIP, no tunnel), lb translates
//! both directions.

use std::net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr};

use anyhow::{Context as _, Result};
use lb_tests::{
    decap::DecapAttachment,
    netns::{ChildGuard, Netns, Topology, TopologyOpts},
    routed::{NatArms, RoutedTopology},
    servers::{ServerKind, backend_name, spawn_server},
};

/// `--forwarding`: what the VIP is configured with.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Forwarding {
    DsrL2,
    Ipip,
    Gue,
    Nat,
}

impl Forwarding {
    pub fn parse(s: &str) -> Option<Self> {
        match s {
            "dsr-l2" => Some(Self::DsrL2),
            "ipip" => Some(Self::Ipip),
            "gue" => Some(Self::Gue),
            "nat" => Some(Self::Nat),
            _ => None,
        }
    }

    /// The config keyword.
    pub fn as_str(self) -> &'static str {
        match self {
            Self::DsrL2 => "dsr-l2",
            Self::Ipip => "ipip",
            Self::Gue => "gue",
            Self::Nat => "nat",
        }
    }
}

pub enum Net {
    /// `v6`: the story uses the topology's IPv6 addresses.
    L2 { topo: Topology, v6: bool },
    // Field order is drop order: lb decap is detached before the
    // namespaces go.
    /// `v6`: dual-stack, and the story uses the IPv6 addresses.
    Routed {
        _decap: Vec<DecapAttachment>,
        topo: RoutedTopology,
        v6: bool,
    },
}

impl Net {
    pub fn build(forwarding: Forwarding, ipv6: bool, backends: usize) -> Result<Net> {
        if forwarding == Forwarding::DsrL2 {
            let topo = Topology::new(TopologyOpts { backends, ipv6 })?;
            return Ok(Net::L2 { topo, v6: ipv6 });
        }
        if forwarding == Forwarding::Nat {
            let topo = RoutedTopology::new_nat(backends, NatArms::One)?;
            return Ok(Net::Routed {
                _decap: Vec::new(),
                topo,
                v6: ipv6,
            });
        }
        let topo = if ipv6 {
            RoutedTopology::new_dual_stack(backends)?
        } else {
            RoutedTopology::new(backends)?
        };
        let decap = DecapAttachment::attach_all(&topo, ipv6)
            .context("attaching lb decap on the backends")?;
        Ok(Net::Routed {
            _decap: decap,
            topo,
            v6: ipv6,
        })
    }

    /// The front part every variant has: client, lb, the switch.
    fn front(&self) -> &Topology {
        match self {
            Net::L2 { topo, .. } => topo,
            Net::Routed { topo, .. } => topo.front(),
        }
    }

    /// Whether the story runs over IPv6.
    pub fn is_v6(&self) -> bool {
        match self {
            Net::L2 { v6, .. } | Net::Routed { v6, .. } => *v6,
        }
    }

    pub fn client_ns(&self) -> &Netns {
        self.front().client_ns()
    }

    pub fn lb_ns(&self) -> &Netns {
        self.front().lb_ns()
    }

    pub fn backend_ns(&self, i: usize) -> &Netns {
        match self {
            Net::L2 { topo, .. } => topo.backend_ns(i),
            Net::Routed { topo, .. } => topo.backend_ns(i),
        }
    }

    pub fn backend_count(&self) -> usize {
        match self {
            Net::L2 { topo, .. } => topo.backend_count(),
            Net::Routed { topo, .. } => topo.backend_count(),
        }
    }

    pub fn backend_addr(&self, i: usize) -> IpAddr {
        match self {
            Net::L2 { topo, v6: false } => topo.backend_addr(i).into(),
            Net::L2 { topo, v6: true } => topo.backend_addr6(i).into(),
            Net::Routed {
                topo, v6: false, ..
            } => topo.backend_addr(i).into(),
            Net::Routed { topo, v6: true, .. } => topo.backend_addr6(i).into(),
        }
    }

    pub fn client_addr(&self) -> IpAddr {
        let f = self.front();
        if self.is_v6() {
            f.client_addr6().into()
        } else {
            f.client_addr().into()
        }
    }

    pub fn lb_addr(&self) -> IpAddr {
        let f = self.front();
        if self.is_v6() {
            f.lb_addr6().into()
        } else {
            f.lb_addr().into()
        }
    }

    pub fn vip(&self) -> IpAddr {
        let f = self.front();
        if self.is_v6() {
            f.vip6().into()
        } else {
            f.vip().into()
        }
    }

    pub fn lb_iface(&self) -> String {
        self.front().lb_iface()
    }

    /// Every namespace, for the teardown check.
    pub fn namespace_names(&self) -> Vec<String> {
        let router = match self {
            Net::L2 { topo, .. } => return topo.namespace_names(),
            Net::Routed { topo, .. } => topo.router_ns(),
        };
        let mut v = self.front().namespace_names();
        v.push(router.name().to_owned());
        v.extend((0..self.backend_count()).map(|i| self.backend_ns(i).name().to_owned()));
        v
    }

    /// One line on how the pieces are connected.
    pub fn layout(&self) -> String {
        let routed = |net: String, router: &Netns| {
            format!(
                "{} network namespaces: client and lb on one segment, the backends in {net} \
                 behind a router ({}), reached through it",
                self.namespace_names().len(),
                router.name()
            )
        };
        match self {
            Net::L2 { topo: t, .. } => format!(
                "{} network namespaces on one L2 segment (bridge {} in {})",
                t.namespaces().len(),
                t.bridge(),
                t.switch_ns().name()
            ),
            Net::Routed {
                topo, v6: false, ..
            } => routed(format!("{}/24", topo.back_net()), topo.router_ns()),
            Net::Routed { topo, v6: true, .. } => {
                routed(format!("{}/64", topo.back_net6()), topo.router_ns())
            }
        }
    }

    /// How the backends receive and answer, for the introduction.
    pub fn path(&self, forwarding: Forwarding) -> String {
        match forwarding {
            Forwarding::DsrL2 => {
                "backends reply straight to the client (direct server return at L2)".into()
            }
            Forwarding::Nat => "lb rewrites each connection to a backend's address, from its own \
                address and a port of its own (full NAT), and the replies back, both in XDP: \
                the backends are unmodified and see only lb, the client sees only the VIP"
                .into(),
            mode => format!(
                "lb encapsulates ({}) to each backend's address through the router; `lb decap` on \
                 the backend strips it (only from lb's address) and the backend replies straight \
                 to the client",
                match (mode, self.is_v6()) {
                    (Forwarding::Ipip, false) => "IPv4 in IPv4",
                    (Forwarding::Ipip, true) => "IPv6 in IPv6",
                    (_, false) => "GUE: IPv4 in UDP",
                    (_, true) => "GUE: IPv6 in UDP over IPv6",
                }
            ),
        }
    }

    /// An HTTP server on backend `i`, port `port` of every address of the
    /// story's family, answering its name.
    pub fn spawn_http(&self, i: usize, port: u16) -> Result<ChildGuard> {
        let any: IpAddr = if self.is_v6() {
            Ipv6Addr::UNSPECIFIED.into()
        } else {
            Ipv4Addr::UNSPECIFIED.into()
        };
        spawn_server(
            self.backend_ns(i),
            ServerKind::Http,
            SocketAddr::new(any, port),
            &backend_name(i),
        )
    }
}
