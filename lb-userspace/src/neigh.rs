//! Where a backend is reached at L2: the egress interface (the kernel's
//! route lookup, as `ip route get`) and the next hop's MAC (the kernel's
//! neighbour table: ARP for IPv4, neighbour discovery for IPv6), asked of
//! the kernel over rtnetlink. Both families go through the same code, on
//! `IpAddr`.
//!
//! The agent resolves MACs and stores them in the backend map rather than
//! calling `bpf_fib_lookup` per packet: one array lookup the fast path
//! already does, instead of a helper call on every packet. The price is
//! that the agent must follow the kernel's tables: [`Tables`] answers
//! questions and [`Tables::subscribe`] delivers the kernel's neighbour,
//! route and link events; `agent::nexthops` does the following. This
//! module holds the pure part too: what a [`Resolution`] means for a
//! backend ([`Resolution::lookup`]).

use std::{
    collections::BTreeMap,
    net::{IpAddr, Ipv4Addr, Ipv6Addr},
};

use futures_util::{Stream, StreamExt, TryStreamExt};
use rtnetlink::{
    Handle, MulticastGroup, RouteMessageBuilder,
    packet_core::{NetlinkMessage, NetlinkPayload},
    packet_route::{
        AddressFamily, RouteNetlinkMessage,
        address::{AddressAttribute, AddressMessage},
        link::{LinkAttribute, LinkMessage},
        neighbour::{NeighbourAddress, NeighbourAttribute, NeighbourMessage, NeighbourState},
        route::{RouteAddress, RouteAttribute, RouteMessage, RouteType},
    },
};
use thiserror::Error;

/// Why a backend has no next hop.
#[derive(Clone, Debug, Error, PartialEq, Eq)]
pub enum NeighError {
    #[error("no route to {addr}: {reason}")]
    NoRoute { addr: IpAddr, reason: String },
    #[error(
        "{addr} is reached through gateway {gateway}: direct server return needs backends on the same L2 segment (forwarding = \"ipip\" or \"gue\" reaches routed backends)"
    )]
    NotOnLink { addr: IpAddr, gateway: IpAddr },
    #[error("no {} answer from gateway {gateway} (next hop to {addr}) on {iface}", resolver(*gateway))]
    GatewayUnresolved {
        addr: IpAddr,
        gateway: IpAddr,
        iface: String,
    },
    #[error(
        "resolving: {} for gateway {gateway} (next hop to {addr}) sent on {iface}, no answer yet", request(*gateway)
    )]
    GatewayResolving {
        addr: IpAddr,
        gateway: IpAddr,
        iface: String,
    },
    #[error(
        "no outer source address for {addr}: the route has no preferred source and {iface} has no {} address; set [agent] encap_source_{}", family(*addr), if addr.is_ipv4() { "v4" } else { "v6" }
    )]
    NoSource { addr: IpAddr, iface: String },
    #[error(
        "no SNAT address for {addr}: the route has no preferred source and {iface} has no {} address; set snat_addresses (per VIP or in [agent])", family(*addr)
    )]
    NoSnatSource { addr: IpAddr, iface: String },
    #[error("{0} is an address of this host")]
    Local(IpAddr),
    #[error("the route to {addr} leaves through interface index {ifindex}, which is gone")]
    NoInterface { addr: IpAddr, ifindex: u32 },
    #[error("no {} answer from {addr} on {iface}", resolver(*addr))]
    Unresolved { addr: IpAddr, iface: String },
    #[error("resolving: {} for {addr} sent on {iface}, no answer yet", request(*addr))]
    Resolving { addr: IpAddr, iface: String },
    #[error("not resolved yet")]
    Unknown,
}

/// The protocol that resolves `addr`'s MAC.
fn resolver(addr: IpAddr) -> &'static str {
    if addr.is_ipv4() {
        "ARP"
    } else {
        "neighbour discovery"
    }
}

/// What that protocol sends.
fn request(addr: IpAddr) -> &'static str {
    if addr.is_ipv4() {
        "ARP request"
    } else {
        "neighbour solicitation"
    }
}

fn family(addr: IpAddr) -> &'static str {
    if addr.is_ipv4() {
        "IPv4"
    } else {
        "global IPv6"
    }
}

/// How to reach one backend.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct NextHop {
    pub iface: String,
    pub ifindex: u32,
    pub src_mac: [u8; 6],
    /// The backend's MAC, or the gateway's when it is routed.
    pub dst_mac: [u8; 6],
    /// The route's gateway (tunnel modes only; DSR at L2 refuses one).
    pub gateway: Option<IpAddr>,
    /// The outer source address of encapsulated packets (tunnel modes
    /// only).
    pub encap_src: Option<IpAddr>,
}

/// An interface packets leave through.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Egress {
    pub iface: String,
    pub ifindex: u32,
    /// The route's gateway, when the address is not on-link: fine for a
    /// backend whose MAC the operator gives, refused otherwise.
    pub gateway: Option<IpAddr>,
    /// The interface's own MAC (the source MAC of forwarded frames).
    pub mac: [u8; 6],
    /// The source address the kernel would use towards the address: the
    /// route's preferred source (RTA_PREFSRC), else the interface's first
    /// address of the backend's family (global scope for IPv6). The
    /// default outer source of encapsulated packets.
    pub source: Option<IpAddr>,
}

/// How one address's backends are reached, as far as following it goes.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Need {
    /// Some backend at the address has no `mac` override: its next hop's
    /// MAC is to be resolved.
    pub arp: bool,
    /// Some backend at the address is forwarded through a tunnel: a route
    /// through a gateway is fine for it.
    pub routed: bool,
}

/// The kernel's neighbour entry for an address on an interface.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Neighbour {
    /// An entry with a link-layer address (reachable, stale, being
    /// confirmed, permanent): frames can be sent to it.
    Known([u8; 6]),
    /// An ARP request is out (INCOMPLETE).
    Resolving,
    /// ARP got no answer (FAILED).
    Failed,
    /// No entry: nothing asked yet, or the kernel dropped it.
    Missing,
}

/// What the kernel's tables say about one backend address.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Resolution {
    /// The interface the route to the address leaves through, or why
    /// there is none.
    pub egress: Result<Egress, NeighError>,
    /// The neighbour entry of the next hop (the route's gateway if it has
    /// one, else the address itself) on that interface.
    pub neighbour: Neighbour,
}

/// What a [`Resolution`] means for one backend.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Lookup {
    /// Reachable through this next hop.
    Found(NextHop),
    /// Not known yet (the answer may still come): a known next hop stays.
    Pending(NeighError),
    /// Not reachable: out of the ring until it is.
    Failed(NeighError),
}

/// What a backend entry's source address is, by forwarding mode.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum HopSource {
    /// dsr-l2: none (and the backend must be on-link).
    None,
    /// ipip, gue: the outer source, the operator's (when of the backend's
    /// family) over the route's; required.
    Tunnel(Option<IpAddr>),
    /// nat: the route's source, the SNAT address of a VIP that names none;
    /// `required` when the VIP names none of the backend's family.
    Nat { required: bool },
}

impl Resolution {
    /// The next hop of backend `addr`; `mac` is an operator's override,
    /// used instead of the neighbour table. `tunnel`: the backend's VIP
    /// encapsulates (a gateway is fine, an outer source is needed);
    /// `encap_source`: the operator's outer source, over the route's.
    pub fn lookup(
        &self,
        addr: IpAddr,
        mac: Option<[u8; 6]>,
        tunnel: bool,
        encap_source: Option<IpAddr>,
    ) -> Lookup {
        let source = if tunnel {
            HopSource::Tunnel(encap_source)
        } else {
            HopSource::None
        };
        self.lookup_as(addr, mac, source)
    }

    /// [`Resolution::lookup`] for any forwarding mode: `source` says what
    /// the backend entry's source address is (and whether a gateway is
    /// fine: for every mode but dsr-l2).
    pub fn lookup_as(&self, addr: IpAddr, mac: Option<[u8; 6]>, source: HopSource) -> Lookup {
        let egress = match &self.egress {
            Ok(e) => e,
            Err(e) => return Lookup::Failed(e.clone()),
        };
        let iface = egress.iface.clone();
        // Only a source of the backend's family can head its packets.
        let same_family = |s: &IpAddr| s.is_ipv4() == addr.is_ipv4();
        let tunnel = source != HopSource::None;
        let encap_src = match source {
            HopSource::None => None,
            HopSource::Tunnel(encap_source) => match encap_source
                .filter(same_family)
                .or(egress.source.filter(same_family))
            {
                Some(s) => Some(s),
                None => return Lookup::Failed(NeighError::NoSource { addr, iface }),
            },
            HopSource::Nat { required } => match egress.source.filter(same_family) {
                None if required => {
                    return Lookup::Failed(NeighError::NoSnatSource { addr, iface });
                }
                s => s,
            },
        };
        let gateway = egress.gateway.filter(|_| tunnel);
        let next_hop = |dst_mac| NextHop {
            iface: egress.iface.clone(),
            ifindex: egress.ifindex,
            src_mac: egress.mac,
            dst_mac,
            gateway,
            encap_src,
        };
        if let Some(m) = mac {
            return Lookup::Found(next_hop(m));
        }
        match (egress.gateway, tunnel) {
            (Some(gateway), false) => Lookup::Failed(NeighError::NotOnLink { addr, gateway }),
            (Some(gateway), true) => match self.neighbour {
                Neighbour::Known(m) => Lookup::Found(next_hop(m)),
                Neighbour::Failed => Lookup::Failed(NeighError::GatewayUnresolved {
                    addr,
                    gateway,
                    iface,
                }),
                Neighbour::Resolving | Neighbour::Missing => {
                    Lookup::Pending(NeighError::GatewayResolving {
                        addr,
                        gateway,
                        iface,
                    })
                }
            },
            (None, _) => match self.neighbour {
                Neighbour::Known(m) => Lookup::Found(next_hop(m)),
                Neighbour::Failed => Lookup::Failed(NeighError::Unresolved { addr, iface }),
                Neighbour::Resolving | Neighbour::Missing => {
                    Lookup::Pending(NeighError::Resolving { addr, iface })
                }
            },
        }
    }

    /// An answer may still come: the route is known and usable for what
    /// `need` says, and, when a MAC is to be resolved, ARP has not
    /// answered nor failed.
    pub fn is_pending(&self, need: Need) -> bool {
        self.egress
            .as_ref()
            .is_ok_and(|e| e.gateway.is_none() || need.routed)
            && need.arp
            && matches!(self.neighbour, Neighbour::Resolving | Neighbour::Missing)
    }
}

/// An interface as the kernel lists it.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Link {
    pub name: String,
    pub mac: [u8; 6],
}

/// A failure to ask the kernel (not an answer about an address).
#[derive(Debug, Error)]
#[error("rtnetlink: {0}")]
pub struct NetlinkError(String);

impl From<rtnetlink::Error> for NetlinkError {
    fn from(e: rtnetlink::Error) -> Self {
        Self(e.to_string())
    }
}

/// What a kernel event is about, as far as next hops care.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum TableEvent {
    /// A neighbour entry changed (`None`: deleted).
    Neighbour {
        ifindex: u32,
        addr: IpAddr,
        entry: Option<Neighbour>,
    },
    /// Routes, links or addresses changed: every route (and outer source)
    /// may have.
    Routes,
    /// Events were lost (the socket's buffer overflowed): everything may
    /// have changed.
    Overrun,
    /// Not about next hops.
    Other,
}

type EventMessage = (
    NetlinkMessage<RouteNetlinkMessage>,
    rtnetlink::sys::SocketAddr,
);

/// The kernel's routing, neighbour and link tables of the current network
/// namespace, over rtnetlink.
#[derive(Clone)]
pub struct Tables {
    handle: Handle,
}

/// A netlink error's errno (positive), if it is one.
fn errno(e: &rtnetlink::Error) -> Option<i32> {
    match e {
        rtnetlink::Error::NetlinkError(m) => Some(m.raw_code().abs()),
        _ => None,
    }
}

impl Tables {
    /// Opens a request socket; its connection runs as a task of the
    /// current tokio runtime.
    pub fn connect() -> std::io::Result<Self> {
        let (conn, handle, _) = rtnetlink::new_connection()?;
        tokio::spawn(conn);
        Ok(Self { handle })
    }

    /// Subscribes to neighbour, route, link and address events of both
    /// families. Subscribe
    /// before reading the tables, so that no change falls in between.
    pub fn subscribe() -> std::io::Result<impl Stream<Item = TableEvent> + Unpin> {
        let (conn, _, messages) = rtnetlink::new_multicast_connection(&[
            MulticastGroup::Neigh,
            MulticastGroup::Ipv4Route,
            MulticastGroup::Ipv6Route,
            MulticastGroup::Link,
            MulticastGroup::Ipv4Ifaddr,
            MulticastGroup::Ipv6Ifaddr,
        ])?;
        tokio::spawn(conn);
        Ok(messages.map(|(m, _): EventMessage| classify(m)))
    }

    /// Every interface: index → name and MAC.
    pub async fn links(&self) -> Result<BTreeMap<u32, Link>, NetlinkError> {
        let msgs: Vec<LinkMessage> = self.handle.link().get().execute().try_collect().await?;
        Ok(msgs.iter().filter_map(parse_link).collect())
    }

    /// Every interface's IPv4 addresses and global IPv6 addresses, in the
    /// kernel's order (the first of a family is its primary one):
    /// interface index → addresses.
    pub async fn addresses(&self) -> Result<BTreeMap<u32, Vec<IpAddr>>, NetlinkError> {
        let msgs: Vec<AddressMessage> = self.handle.address().get().execute().try_collect().await?;
        let mut out: BTreeMap<u32, Vec<IpAddr>> = BTreeMap::new();
        for m in &msgs {
            // IFA_LOCAL is the interface's own address (IFA_ADDRESS is the
            // peer's on point-to-point links; IPv6 gives IFA_ADDRESS only).
            let local = m.attributes.iter().find_map(|a| match a {
                AddressAttribute::Local(a) => Some(*a),
                _ => None,
            });
            let address = m.attributes.iter().find_map(|a| match a {
                AddressAttribute::Address(a) => Some(*a),
                _ => None,
            });
            let usable = |a: &IpAddr| match a {
                IpAddr::V4(_) => m.header.family == AddressFamily::Inet,
                // A link-local source cannot leave the link.
                IpAddr::V6(a) => {
                    m.header.family == AddressFamily::Inet6
                        && !a.is_unicast_link_local()
                        && !a.is_loopback()
                }
            };
            if let Some(a) = local.or(address).filter(usable) {
                out.entry(m.header.index).or_default().push(a);
            }
        }
        Ok(out)
    }

    /// Every IPv4 (ARP) and IPv6 (ND) neighbour entry: (interface index,
    /// address) → entry.
    pub async fn neighbours(&self) -> Result<BTreeMap<(u32, IpAddr), Neighbour>, NetlinkError> {
        let mut out = BTreeMap::new();
        for family in [AddressFamily::Inet, AddressFamily::Inet6] {
            let msgs: Vec<NeighbourMessage> = self
                .handle
                .neighbours()
                .get()
                .set_address_family(family)
                .execute()
                .try_collect()
                .await?;
            out.extend(
                msgs.iter()
                    .filter_map(parse_neighbour)
                    .filter_map(|(i, a, n)| Some(((i, a), n?))),
            );
        }
        Ok(out)
    }

    /// The kernel's route lookup for `addr` (`ip route get`): the egress
    /// interface index and gateway if any, or why the address is not
    /// reachable. `Err(Err(_))`: asking failed (try again later).
    pub async fn route(&self, addr: IpAddr) -> Result<Result<Route, NeighError>, NetlinkError> {
        let msg = match addr {
            IpAddr::V4(a) => RouteMessageBuilder::<Ipv4Addr>::new()
                .destination_prefix(a, 32)
                .build(),
            IpAddr::V6(a) => RouteMessageBuilder::<Ipv6Addr>::new()
                .destination_prefix(a, 128)
                .build(),
        };
        let mut answers = self.handle.route().get(msg).execute();
        match answers.next().await {
            Some(Ok(r)) => Ok(parse_route(addr, &r)),
            Some(Err(e)) => match errno(&e) {
                // Local trouble, not an answer about the address.
                Some(libc::ENOBUFS | libc::ENOMEM | libc::EAGAIN | libc::EINTR | libc::EBUSY)
                | None => Err(e.into()),
                Some(code) => Ok(Err(NeighError::NoRoute {
                    addr,
                    reason: std::io::Error::from_raw_os_error(code).to_string(),
                })),
            },
            None => Err(NetlinkError("no answer to a route lookup".into())),
        }
    }

    /// Makes the kernel resolve `addr` (it sends an ARP request or a
    /// neighbour solicitation and reports the outcome as a neighbour
    /// event): any datagram to it does; port 9 is "discard". `socket` is
    /// of `addr`'s family.
    pub fn probe(socket: &std::net::UdpSocket, addr: IpAddr) {
        let _ = socket.send_to(&[0], (addr, 9));
    }
}

/// A route to a backend address.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Route {
    pub ifindex: u32,
    pub gateway: Option<IpAddr>,
    /// The route's preferred source address (RTA_PREFSRC).
    pub prefsrc: Option<IpAddr>,
}

fn parse_route(addr: IpAddr, r: &RouteMessage) -> Result<Route, NeighError> {
    match r.header.kind {
        RouteType::Local | RouteType::Broadcast => return Err(NeighError::Local(addr)),
        RouteType::Unicast => {}
        other => {
            return Err(NeighError::NoRoute {
                addr,
                reason: format!("route type {other:?}"),
            });
        }
    }
    let mut oif = None;
    let mut gateway = None;
    let mut prefsrc = None;
    for a in &r.attributes {
        match a {
            RouteAttribute::Gateway(RouteAddress::Inet(g)) if IpAddr::V4(*g) != addr => {
                gateway = Some(IpAddr::V4(*g))
            }
            RouteAttribute::Gateway(RouteAddress::Inet6(g)) if IpAddr::V6(*g) != addr => {
                gateway = Some(IpAddr::V6(*g))
            }
            RouteAttribute::PrefSource(RouteAddress::Inet(s)) => prefsrc = Some(IpAddr::V4(*s)),
            RouteAttribute::PrefSource(RouteAddress::Inet6(s)) => prefsrc = Some(IpAddr::V6(*s)),
            RouteAttribute::Oif(i) => oif = Some(*i),
            _ => {}
        }
    }
    let ifindex = oif.ok_or_else(|| NeighError::NoRoute {
        addr,
        reason: "the route names no interface".into(),
    })?;
    Ok(Route {
        ifindex,
        gateway,
        prefsrc,
    })
}

fn mac_of(bytes: &[u8]) -> Option<[u8; 6]> {
    bytes.try_into().ok()
}

fn parse_link(m: &LinkMessage) -> Option<(u32, Link)> {
    let mut name = None;
    let mut mac = [0; 6];
    for a in &m.attributes {
        match a {
            LinkAttribute::IfName(n) => name = Some(n.clone()),
            LinkAttribute::Address(b) => mac = mac_of(b).unwrap_or([0; 6]),
            _ => {}
        }
    }
    Some((m.header.index, Link { name: name?, mac }))
}

/// (interface index, address, entry); entry `None`: an entry that holds
/// nothing usable (NUD_NONE, a proxy entry).
fn parse_neighbour(m: &NeighbourMessage) -> Option<(u32, IpAddr, Option<Neighbour>)> {
    if !matches!(m.header.family, AddressFamily::Inet | AddressFamily::Inet6) {
        return None;
    }
    let mut addr = None;
    let mut lladdr = None;
    for a in &m.attributes {
        match a {
            NeighbourAttribute::Destination(NeighbourAddress::Inet(ip)) => {
                addr = Some(IpAddr::V4(*ip))
            }
            NeighbourAttribute::Destination(NeighbourAddress::Inet6(ip)) => {
                addr = Some(IpAddr::V6(*ip))
            }
            NeighbourAttribute::LinkLayerAddress(b) => lladdr = mac_of(b),
            _ => {}
        }
    }
    let entry = match m.header.state {
        NeighbourState::Incomplete => Some(Neighbour::Resolving),
        NeighbourState::Failed => Some(Neighbour::Failed),
        NeighbourState::Reachable
        | NeighbourState::Stale
        | NeighbourState::Delay
        | NeighbourState::Probe
        | NeighbourState::Permanent
        | NeighbourState::Noarp => lladdr.map(Neighbour::Known),
        _ => None,
    };
    Some((m.header.ifindex, addr?, entry))
}

/// What a message from the event socket means for next hops.
pub fn classify(m: NetlinkMessage<RouteNetlinkMessage>) -> TableEvent {
    match m.payload {
        NetlinkPayload::Overrun(_) => TableEvent::Overrun,
        NetlinkPayload::InnerMessage(inner) => match inner {
            RouteNetlinkMessage::NewNeighbour(n) => match parse_neighbour(&n) {
                Some((ifindex, addr, entry)) => TableEvent::Neighbour {
                    ifindex,
                    addr,
                    entry,
                },
                None => TableEvent::Other,
            },
            RouteNetlinkMessage::DelNeighbour(n) => match parse_neighbour(&n) {
                Some((ifindex, addr, _)) => TableEvent::Neighbour {
                    ifindex,
                    addr,
                    entry: None,
                },
                None => TableEvent::Other,
            },
            RouteNetlinkMessage::NewRoute(_)
            | RouteNetlinkMessage::DelRoute(_)
            | RouteNetlinkMessage::NewAddress(_)
            | RouteNetlinkMessage::DelAddress(_)
            | RouteNetlinkMessage::NewLink(_)
            | RouteNetlinkMessage::DelLink(_) => TableEvent::Routes,
            _ => TableEvent::Other,
        },
        _ => TableEvent::Other,
    }
}

#[cfg(test)]
mod tests {
    #[allow(unused_imports)]
    use std::net::{IpAddr, Ipv4Addr};

    use super::*;
    #[allow(unused_imports)]
    use crate::keys::ip4;

    fn resolution(neighbour: Neighbour) -> Resolution {
        Resolution {
            egress: Ok(Egress {
                iface: "eth0".into(),
                ifindex: 2,
                gateway: None,
                mac: [2, 0, 0, 0, 0, 0xfe],
                source: Some(ip4(198, 18, 0, 10)),
            }),
            neighbour,
        }
    }

    const A: IpAddr = ip4(198, 18, 0, 11);

    #[test]
    fn a_known_entry_or_an_override_gives_the_next_hop() {
        let r = resolution(Neighbour::Known([2, 0, 0, 0, 0, 0x11]));
        let Lookup::Found(nh) = r.lookup(A, None, false, None) else {
            panic!()
        };
        assert_eq!(
            (nh.ifindex, nh.dst_mac, nh.src_mac),
            (2, [2, 0, 0, 0, 0, 0x11], [2, 0, 0, 0, 0, 0xfe])
        );
        // The operator's MAC wins, even over a failed ARP.
        let o = [2, 0, 0, 0, 0, 0x99];
        for n in [
            Neighbour::Known([2; 6]),
            Neighbour::Failed,
            Neighbour::Missing,
        ] {
            assert!(
                matches!(resolution(n).lookup(A, Some(o), false, None), Lookup::Found(h) if h.dst_mac == o)
            );
        }
    }

    #[test]
    fn arp_in_flight_is_pending_and_a_failed_one_is_a_failure() {
        assert!(matches!(
            resolution(Neighbour::Resolving).lookup(A, None, false, None),
            Lookup::Pending(NeighError::Resolving { .. })
        ));
        assert!(resolution(Neighbour::Missing).is_pending(Need {
            arp: true,
            routed: false
        }));
        assert!(!resolution(Neighbour::Missing).is_pending(Need::default()));
        let Lookup::Failed(e) = resolution(Neighbour::Failed).lookup(A, None, false, None) else {
            panic!()
        };
        assert_eq!(e.to_string(), "no ARP answer from 198.18.0.11 on eth0");
        // No route: a failure even with an override.
        let r = Resolution {
            egress: Err(NeighError::NoRoute {
                addr: A,
                reason: "unreachable".into(),
            }),
            neighbour: Neighbour::Missing,
        };
        assert!(!r.is_pending(Need {
            arp: true,
            routed: false
        }));
        assert!(matches!(
            r.lookup(A, Some([2; 6]), false, None),
            Lookup::Failed(_)
        ));
    }

    #[test]
    fn a_route_through_a_gateway_needs_the_operators_mac() {
        let mut r = resolution(Neighbour::Missing);
        if let Ok(e) = &mut r.egress {
            e.gateway = Some(ip4(198, 18, 0, 1));
        }
        assert!(!r.is_pending(Need {
            arp: true,
            routed: false
        }));
        let Lookup::Failed(e) = r.lookup(A, None, false, None) else {
            panic!()
        };
        assert!(e.to_string().contains("through gateway 198.18.0.1"), "{e}");
        assert!(
            matches!(r.lookup(A, Some([2; 6]), false, None), Lookup::Found(h) if h.dst_mac == [2; 6])
        );
    }

    /// A resolution through gateway 198.18.0.1, whose neighbour entry is
    /// `gateway_entry`, with `source` as the route's source.
    fn routed(gateway_entry: Neighbour, source: Option<IpAddr>) -> Resolution {
        let mut r = resolution(gateway_entry);
        if let Ok(e) = &mut r.egress {
            e.gateway = Some(GW);
            e.source = source;
        }
        r
    }

    const GW: IpAddr = ip4(198, 18, 0, 1);
    const SRC: IpAddr = ip4(198, 18, 0, 10);

    #[test]
    fn a_tunnel_backend_behind_a_gateway_is_reached_through_the_gateways_mac() {
        let gw_mac = [2, 0, 0, 0, 0, 0x01];
        let r = routed(Neighbour::Known(gw_mac), Some(SRC));
        let Lookup::Found(nh) = r.lookup(A, None, true, None) else {
            panic!("{:?}", r.lookup(A, None, true, None))
        };
        assert_eq!(
            (nh.ifindex, nh.dst_mac, nh.gateway, nh.encap_src),
            (2, gw_mac, Some(GW), Some(SRC))
        );
        // The same route is refused for DSR at L2, naming the way out.
        let Lookup::Failed(e) = r.lookup(A, None, false, None) else {
            panic!()
        };
        assert!(
            e.to_string().contains("forwarding = \"ipip\" or \"gue\""),
            "{e}"
        );
        // The gateway's ARP: pending, then failed, named as the gateway's.
        let pending = routed(Neighbour::Resolving, Some(SRC));
        assert!(matches!(
            pending.lookup(A, None, true, None),
            Lookup::Pending(NeighError::GatewayResolving { gateway: GW, .. })
        ));
        let need = Need {
            arp: true,
            routed: true,
        };
        assert!(pending.is_pending(need));
        assert!(!pending.is_pending(Need {
            arp: true,
            routed: false
        }));
        let Lookup::Failed(e) = routed(Neighbour::Failed, Some(SRC)).lookup(A, None, true, None)
        else {
            panic!()
        };
        assert_eq!(
            e.to_string(),
            "no ARP answer from gateway 198.18.0.1 (next hop to 198.18.0.11) on eth0"
        );
    }

    #[test]
    fn the_outer_source_is_the_operators_else_the_routes_else_an_error() {
        let mine = ip4(198, 18, 0, 99);
        let r = routed(Neighbour::Known([2; 6]), Some(SRC));
        let src = |r: &Resolution, over| match r.lookup(A, None, true, over) {
            Lookup::Found(nh) => Ok(nh.encap_src),
            Lookup::Failed(e) | Lookup::Pending(e) => Err(e.to_string()),
        };
        assert_eq!(src(&r, None), Ok(Some(SRC)), "the route's");
        assert_eq!(src(&r, Some(mine)), Ok(Some(mine)), "encap_source_v4 wins");
        let none = routed(Neighbour::Known([2; 6]), None);
        assert_eq!(src(&none, Some(mine)), Ok(Some(mine)));
        assert_eq!(
            src(&none, None),
            Err("no outer source address for 198.18.0.11: the route has no preferred source and eth0 has no IPv4 address; set [agent] encap_source_v4".into())
        );
        // DSR at L2 needs none, and gets none.
        let on_link = resolution(Neighbour::Known([2; 6]));
        assert!(
            matches!(on_link.lookup(A, None, false, None), Lookup::Found(nh) if nh.encap_src.is_none() && nh.gateway.is_none())
        );
        // An on-link tunnel backend: its own MAC, no gateway.
        assert!(
            matches!(on_link.lookup(A, None, true, None), Lookup::Found(nh) if nh.encap_src == Some(SRC) && nh.gateway.is_none() && nh.dst_mac == [2; 6])
        );
    }

    #[test]
    fn neighbour_states_map_to_entries() {
        let mut m = NeighbourMessage::default();
        m.header.family = AddressFamily::Inet;
        m.header.ifindex = 7;
        m.attributes = vec![
            NeighbourAttribute::Destination(NeighbourAddress::Inet(Ipv4Addr::new(198, 18, 0, 11))),
            NeighbourAttribute::LinkLayerAddress(vec![2, 0, 0, 0, 0, 0x11]),
        ];
        for (state, want) in [
            (
                NeighbourState::Reachable,
                Some(Neighbour::Known([2, 0, 0, 0, 0, 0x11])),
            ),
            (
                NeighbourState::Stale,
                Some(Neighbour::Known([2, 0, 0, 0, 0, 0x11])),
            ),
            (NeighbourState::Incomplete, Some(Neighbour::Resolving)),
            (NeighbourState::Failed, Some(Neighbour::Failed)),
            (NeighbourState::None, None),
        ] {
            m.header.state = state;
            assert_eq!(parse_neighbour(&m), Some((7, A, want)), "{state:?}");
        }
        let ev = classify(NetlinkMessage::from(RouteNetlinkMessage::DelNeighbour(
            m.clone(),
        )));
        assert_eq!(
            ev,
            TableEvent::Neighbour {
                ifindex: 7,
                addr: A,
                entry: None
            }
        );
    }

    const A6: IpAddr = IpAddr::V6(std::net::Ipv6Addr::new(0x2001, 2, 0, 0, 0, 0, 0, 0x11));

    #[test]
    fn ipv6_neighbour_entries_parse_in_every_nud_state() {
        let mut m = NeighbourMessage::default();
        m.header.family = AddressFamily::Inet6;
        m.header.ifindex = 7;
        let IpAddr::V6(a6) = A6 else { unreachable!() };
        m.attributes = vec![
            NeighbourAttribute::Destination(NeighbourAddress::Inet6(a6)),
            NeighbourAttribute::LinkLayerAddress(vec![2, 0, 0, 0, 0, 0x11]),
        ];
        let mac = Neighbour::Known([2, 0, 0, 0, 0, 0x11]);
        for (state, want) in [
            (NeighbourState::Reachable, Some(mac)),
            (NeighbourState::Stale, Some(mac)),
            (NeighbourState::Delay, Some(mac)),
            (NeighbourState::Probe, Some(mac)),
            (NeighbourState::Permanent, Some(mac)),
            (NeighbourState::Incomplete, Some(Neighbour::Resolving)),
            (NeighbourState::Failed, Some(Neighbour::Failed)),
            (NeighbourState::None, None),
        ] {
            m.header.state = state;
            assert_eq!(parse_neighbour(&m), Some((7, A6, want)), "{state:?}");
        }
        m.header.state = NeighbourState::Reachable;
        assert_eq!(
            classify(NetlinkMessage::from(RouteNetlinkMessage::NewNeighbour(m))),
            TableEvent::Neighbour {
                ifindex: 7,
                addr: A6,
                entry: Some(mac)
            }
        );
    }

    #[test]
    fn ipv6_reasons_name_neighbour_discovery_and_the_v6_setting() {
        let r = resolution(Neighbour::Resolving);
        let Lookup::Pending(e) = r.lookup(A6, None, false, None) else {
            panic!()
        };
        assert_eq!(
            e.to_string(),
            "resolving: neighbour solicitation for 2001:2::11 sent on eth0, no answer yet"
        );
        let Lookup::Failed(e) = resolution(Neighbour::Failed).lookup(A6, None, false, None) else {
            panic!()
        };
        assert_eq!(
            e.to_string(),
            "no neighbour discovery answer from 2001:2::11 on eth0"
        );
        // The egress's source is IPv4: no outer source for an IPv6
        // backend, and the operator's IPv4 one does not count either.
        let r = resolution(Neighbour::Known([2; 6]));
        let Lookup::Failed(e) = r.lookup(A6, None, true, Some(ip4(198, 18, 0, 99))) else {
            panic!()
        };
        assert_eq!(
            e.to_string(),
            "no outer source address for 2001:2::11: the route has no preferred source and eth0 has no global IPv6 address; set [agent] encap_source_v6"
        );
        // IPv4 messages are unchanged.
        let Lookup::Failed(e) = resolution(Neighbour::Failed).lookup(A, None, false, None) else {
            panic!()
        };
        assert_eq!(e.to_string(), "no ARP answer from 198.18.0.11 on eth0");
    }

    #[tokio::test]
    async fn the_kernel_answers_for_loopback() {
        // Every namespace has lo (index 1, MAC all zeros) and a local
        // route to 127.0.0.1: no root needed to ask.
        let t = Tables::connect().unwrap();
        let links = t.links().await.unwrap();
        assert_eq!(links.get(&1).map(|l| l.name.as_str()), Some("lo"));
        assert_eq!(links[&1].mac, [0; 6]);
        assert_eq!(
            t.route(IpAddr::V4(Ipv4Addr::LOCALHOST)).await.unwrap(),
            Err(NeighError::Local(IpAddr::V4(Ipv4Addr::LOCALHOST)))
        );
        t.neighbours().await.unwrap();
    }
}
