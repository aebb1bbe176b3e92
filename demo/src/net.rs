//! The demo's network, by forwarding mode: for `dsr-l2` the L2 topology
//! (client, lb and backends on one bridge); for `ipip` and `gue` the routed
//! one (backends in another subnet behind a router, each running
//! `lb decap` for lb's address only).

use std::net::{Ipv4Addr, SocketAddrV4};

use anyhow::{Context as _, Result};
use lb_tests::{
    decap::DecapAttachment,
    netns::{ChildGuard, Netns, Topology},
    routed::RoutedTopology,
    servers::{ServerKind, backend_name, spawn_server},
};

/// `--forwarding`: what the VIP is configured with.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Forwarding {
    DsrL2,
    Ipip,
    Gue,
}

impl Forwarding {
    pub fn parse(s: &str) -> Option<Self> {
        match s {
            "dsr-l2" => Some(Self::DsrL2),
            "ipip" => Some(Self::Ipip),
            "gue" => Some(Self::Gue),
            _ => None,
        }
    }

    /// The config keyword.
    pub fn as_str(self) -> &'static str {
        match self {
            Self::DsrL2 => "dsr-l2",
            Self::Ipip => "ipip",
            Self::Gue => "gue",
        }
    }
}

pub enum Net {
    L2(Topology),
    // Field order is drop order: lb decap is detached before the
    // namespaces go.
    Routed {
        _decap: Vec<DecapAttachment>,
        topo: RoutedTopology,
    },
}

impl Net {
    pub fn build(forwarding: Forwarding, backends: usize) -> Result<Net> {
        if forwarding == Forwarding::DsrL2 {
            return Ok(Net::L2(Topology::with_backends(backends)?));
        }
        let topo = RoutedTopology::new(backends)?;
        let decap = (0..backends)
            .map(|i| {
                DecapAttachment::attach(topo.backend_ns(i), &topo.backend_iface(i), topo.lb_addr())
            })
            .collect::<Result<Vec<_>>>()
            .context("attaching lb decap on the backends")?;
        Ok(Net::Routed {
            _decap: decap,
            topo,
        })
    }

    pub fn client_ns(&self) -> &Netns {
        match self {
            Net::L2(t) => t.client_ns(),
            Net::Routed { topo, .. } => topo.client_ns(),
        }
    }

    pub fn lb_ns(&self) -> &Netns {
        match self {
            Net::L2(t) => t.lb_ns(),
            Net::Routed { topo, .. } => topo.lb_ns(),
        }
    }

    pub fn backend_ns(&self, i: usize) -> &Netns {
        match self {
            Net::L2(t) => t.backend_ns(i),
            Net::Routed { topo, .. } => topo.backend_ns(i),
        }
    }

    pub fn backend_count(&self) -> usize {
        match self {
            Net::L2(t) => t.backend_count(),
            Net::Routed { topo, .. } => topo.backend_count(),
        }
    }

    pub fn backend_addr(&self, i: usize) -> Ipv4Addr {
        match self {
            Net::L2(t) => t.backend_addr(i),
            Net::Routed { topo, .. } => topo.backend_addr(i),
        }
    }

    pub fn client_addr(&self) -> Ipv4Addr {
        match self {
            Net::L2(t) => t.client_addr(),
            Net::Routed { topo, .. } => topo.client_addr(),
        }
    }

    pub fn lb_addr(&self) -> Ipv4Addr {
        match self {
            Net::L2(t) => t.lb_addr(),
            Net::Routed { topo, .. } => topo.lb_addr(),
        }
    }

    pub fn vip(&self) -> Ipv4Addr {
        match self {
            Net::L2(t) => t.vip(),
            Net::Routed { topo, .. } => topo.vip(),
        }
    }

    pub fn lb_iface(&self) -> String {
        match self {
            Net::L2(t) => t.lb_iface(),
            Net::Routed { topo, .. } => topo.lb_iface(),
        }
    }

    /// Every namespace, for the teardown check.
    pub fn namespace_names(&self) -> Vec<String> {
        match self {
            Net::L2(t) => t.namespace_names(),
            Net::Routed { topo, .. } => {
                let mut v = topo.front().namespace_names();
                v.push(topo.router_ns().name().to_owned());
                v.extend((0..topo.backend_count()).map(|i| topo.backend_ns(i).name().to_owned()));
                v
            }
        }
    }

    /// One line on how the pieces are connected.
    pub fn layout(&self) -> String {
        match self {
            Net::L2(t) => format!(
                "{} network namespaces on one L2 segment (bridge {} in {})",
                t.namespaces().len(),
                t.bridge(),
                t.switch_ns().name()
            ),
            Net::Routed { topo, .. } => format!(
                "{} network namespaces: client and lb on one segment, the backends in {}/24 \
                 behind a router ({}), reached through it",
                self.namespace_names().len(),
                topo.back_net(),
                topo.router_ns().name()
            ),
        }
    }

    /// How the backends receive and answer, for the introduction.
    pub fn path(&self, forwarding: Forwarding) -> String {
        match forwarding {
            Forwarding::DsrL2 => {
                "backends reply straight to the client (direct server return at L2)".into()
            }
            mode => format!(
                "lb encapsulates ({}) to each backend's address through the router; `lb decap` on \
                 the backend strips it (only from lb's address) and the backend replies straight \
                 to the client",
                if mode == Forwarding::Ipip {
                    "IPv4 in IPv4"
                } else {
                    "GUE: IPv4 in UDP"
                }
            ),
        }
    }

    /// An HTTP server on backend `i`, port `port`, answering its name.
    pub fn spawn_http(&self, i: usize, port: u16) -> Result<ChildGuard> {
        spawn_server(
            self.backend_ns(i),
            ServerKind::Http,
            SocketAddrV4::new(Ipv4Addr::UNSPECIFIED, port),
            &backend_name(i),
        )
    }
}
