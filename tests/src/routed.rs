//! A routed topology for the tunnel forwarding modes: backends in another
//! subnet than lb, behind a router namespace.
//!
//! ```text
//!  client ─┐                 front segment 198.18.k.0/24 (bridge "front")
//!  lb ─────┼── switch ──┐    client .1, lb .2, router .254; MTU 1500
//!  router ─┘            │
//!  router ──────────────┴── back segment 198.18.(k^128).0/24 (bridge "back")
//!  backends 0..n ─────────  router .1, backends .11, .12, …
//! ```
//!
//! The front part is a [`Topology`] without backends (client, lb, the
//! switch namespace and its bridge, the XDP program on lb's switch port);
//! this adds a router namespace with a leg on each segment, a second bridge
//! in the switch namespace, and backends on it. lb reaches the backends
//! through the router (its route to the back subnet), the backends hold the
//! VIP on lo (ARP for it suppressed) and answer the client directly through
//! the router (their default route). Nothing is added to the root
//! namespace; dropping it removes everything, also when a test fails.
//!
//! [`RoutedTopology::new_dual_stack`] adds IPv6 on every host next to
//! IPv4 (static `nodad` addresses; no DAD, RA or autoconfiguration, as
//! [`TopologyOpts::ipv6`] does): the front segment 2001:2:0:k::/64 (client
//! ::1, lb ::2, router ::fe), the back segment 2001:2:0:80kk::/64 (router
//! ::1, backends ::11, ::12, …), the IPv6 VIP 2001:2:0:1kk::1 on the
//! backends' lo too, the router forwarding both families. Both VIPs on
//! every backend let one topology serve 4in4, 6in6 and 4in6 (an IPv4 VIP
//! reached over IPv6 backend addresses).
//!
//! [`RoutedTopology::new_nat`] builds the same for full NAT: the backends
//! hold no VIP and get no special sysctls (unmodified hosts). One arm: lb
//! has only its front leg; the backends' replies to its address (the SNAT
//! address) come back through the router. Two arms: lb also has a leg on
//! the back segment (198.18.(k^128).2, 2001:2:0:80kk::2; its SNAT address
//! towards the backends, on-link), with an XDP program on that leg's
//! switch port so that frames lb redirects out of it arrive.

use std::{
    net::{IpAddr, Ipv4Addr, Ipv6Addr},
    time::Duration,
};

use anyhow::{Result, ensure};

use crate::netns::{NAME_PREFIX, Netns, Topology, TopologyOpts, add_addr6, basic_sysctls};

/// MAC roles (02:18:k:role:index:side), after those of [`Topology`].
const ROLE_ROUTER: u8 = 4;
const ROLE_BACKEND: u8 = 5;
const ROLE_LB_BACK: u8 = 6;

/// Where lb sits in a NAT topology ([`RoutedTopology::new_nat`]).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum NatArms {
    /// lb on a stick: one interface, on the client's segment.
    One,
    /// A second interface on the backends' segment.
    Two,
}

/// See the module docs.
pub struct RoutedTopology {
    // Drop order = field order: backends and router before the front
    // (whose switch namespace holds both bridges).
    backends: Vec<Netns>,
    router: Netns,
    /// Two-arm NAT: the XDP program on the switch port of lb's back leg.
    lb_back_peer_xdp: Option<crate::testprogs::TestProgs>,
    front: Topology,
    ipv6: bool,
    /// NAT topologies: the arms; backends hold no VIP.
    nat: Option<NatArms>,
}

impl RoutedTopology {
    /// Builds the IPv4 topology with `backends` backends; on any error
    /// everything already created is removed again.
    pub fn new(backends: usize) -> Result<Self> {
        Self::build(backends, false, None)
    }

    /// The same with IPv6 next to IPv4 on every host (see the module docs).
    pub fn new_dual_stack(backends: usize) -> Result<Self> {
        Self::build(backends, true, None)
    }

    /// The dual-stack topology for full NAT (see the module docs).
    pub fn new_nat(backends: usize, arms: NatArms) -> Result<Self> {
        Self::build(backends, true, Some(arms))
    }

    fn build(backends: usize, ipv6: bool, nat: Option<NatArms>) -> Result<Self> {
        ensure!(backends <= 200, "at most 200 backends");
        let front = Topology::new(TopologyOpts { backends: 0, ipv6 })?;
        let tag = front.lb_ns().name().trim_end_matches("-lb").to_owned();
        let router = Netns::create(format!("{tag}-rt"))?;
        let mut topo = RoutedTopology {
            backends: Vec::new(),
            router,
            lb_back_peer_xdp: None,
            front,
            ipv6,
            nat,
        };
        let sw = topo.front.switch_ns();
        let back = topo.back_bridge();
        sw.ip(["link", "add", &back, "type", "bridge", "forward_delay", "0"])?;
        sw.ip(["link", "set", &back, "up"])?;

        // The router: a leg on each segment, forwarding.
        basic_sysctls(&topo.router, ipv6)?;
        topo.router.sysctl(&[("net.ipv4.ip_forward", "1")])?;
        if ipv6 {
            topo.router
                .sysctl(&[("net.ipv6.conf.all.forwarding", "1")])?;
        }
        let (rf, rb) = (topo.router_front_iface(), topo.router_back_iface());
        topo.plug(&topo.router, &rf, &topo.front.bridge(), ROLE_ROUTER, 0)?;
        topo.plug(&topo.router, &rb, &back, ROLE_ROUTER, 1)?;
        let cidr = format!("{}/24", topo.router_front_addr());
        topo.router.ip(["addr", "add", &cidr, "dev", &rf])?;
        let cidr = format!("{}/24", topo.router_back_addr());
        topo.router.ip(["addr", "add", &cidr, "dev", &rb])?;
        if ipv6 {
            add_addr6(&topo.router, &rf, topo.router_front_addr6(), 64)?;
            add_addr6(&topo.router, &rb, topo.router_back_addr6(), 64)?;
        }

        if nat == Some(NatArms::Two) {
            topo.add_lb_back_leg()?;
        } else {
            topo.route_lb_via_router()?;
        }
        for _ in 0..backends {
            topo.add_backend()?;
        }
        Ok(topo)
    }

    /// Two-arm NAT: lb's leg on the back segment (the back subnet is then
    /// on-link for lb), with an XDP program on its switch port.
    fn add_lb_back_leg(&mut self) -> Result<()> {
        let iface = self.lb_back_iface().expect("two arms");
        self.plug(
            self.front.lb_ns(),
            &iface,
            &self.back_bridge(),
            ROLE_LB_BACK,
            0,
        )?;
        let cidr = format!("{}/24", self.lb_back_addr());
        self.front
            .lb_ns()
            .ip(["addr", "add", &cidr, "dev", &iface])?;
        if self.ipv6 {
            add_addr6(self.front.lb_ns(), &iface, self.lb_back_addr6(), 64)?;
        }
        let port = format!("{iface}s");
        self.lb_back_peer_xdp = Some(crate::testprogs::return_only_on(
            self.front.switch_ns(),
            &port,
        )?);
        Ok(())
    }

    /// lb reaches the back subnet through the router.
    fn route_lb_via_router(&self) -> Result<()> {
        let topo = self;
        let net = format!("{}/24", topo.back_net());
        topo.front.lb_ns().ip([
            "route",
            "add",
            &net,
            "via",
            &topo.router_front_addr().to_string(),
        ])?;
        if topo.ipv6 {
            let net = format!("{}/64", topo.back_net6());
            let via = topo.router_front_addr6().to_string();
            topo.front
                .lb_ns()
                .ip(["-6", "route", "add", &net, "via", &via])?;
        }
        Ok(())
    }

    /// Adds a backend on the back segment (address .11 + index, default
    /// route via the router, VIP on lo with ARP for it suppressed).
    pub fn add_backend(&mut self) -> Result<usize> {
        let i = self.backends.len();
        let tag = self.front.lb_ns().name().trim_end_matches("-lb").to_owned();
        let ns = Netns::create(format!("{tag}-rb{i}"))?;
        basic_sysctls(&ns, self.ipv6)?;
        let holds_vip = self.nat.is_none();
        if holds_vip {
            ns.sysctl(&[
                ("net.ipv4.conf.lo.rp_filter", "0"),
                ("net.ipv4.conf.all.arp_ignore", "1"),
                ("net.ipv4.conf.all.arp_announce", "2"),
            ])?;
        }
        let iface = self.backend_iface(i);
        self.plug(&ns, &iface, &self.back_bridge(), ROLE_BACKEND, i as u8)?;
        // Complete TCP checksums: the backends' replies are not offloaded.
        ns.ethtool_features(&iface, &[("tx", false)])?;
        let cidr = format!("{}/24", self.backend_addr(i));
        ns.ip(["addr", "add", &cidr, "dev", &iface])?;
        ns.ip([
            "route",
            "add",
            "default",
            "via",
            &self.router_back_addr().to_string(),
        ])?;
        if holds_vip {
            let vip = format!("{}/32", self.vip());
            ns.ip(["addr", "add", &vip, "dev", "lo"])?;
        }
        if self.ipv6 {
            add_addr6(&ns, &iface, self.backend_addr6(i), 64)?;
            let via = self.router_back_addr6().to_string();
            ns.ip(["-6", "route", "add", "default", "via", &via])?;
            if holds_vip {
                // On lo: not answered for in neighbour discovery.
                add_addr6(&ns, "lo", self.vip6(), 128)?;
            }
        }
        self.backends.push(ns);
        self.wait_forwarding(Duration::from_secs(5))?;
        Ok(i)
    }

    /// A veth pair `iface` (in `ns`) / `iface`+"s" (in the switch
    /// namespace, enslaved to `bridge`), as the front topology plugs its
    /// own (GRO off: XDP must see wire-sized frames).
    fn plug(&self, ns: &Netns, iface: &str, bridge: &str, role: u8, index: u8) -> Result<()> {
        self.front.plug_into(ns, iface, bridge, role, index, false)
    }

    /// Waits (bounded) until every port of the back bridge forwards.
    fn wait_forwarding(&self, timeout: Duration) -> Result<()> {
        let lb_leg = usize::from(self.nat == Some(NatArms::Two));
        self.front.wait_ports_forwarding(
            &self.back_bridge(),
            1 + lb_leg + self.backends.len(),
            timeout,
        )
    }

    /// The front part: client, lb, switch.
    pub fn front(&self) -> &Topology {
        &self.front
    }

    pub fn client_ns(&self) -> &Netns {
        self.front.client_ns()
    }

    pub fn lb_ns(&self) -> &Netns {
        self.front.lb_ns()
    }

    pub fn router_ns(&self) -> &Netns {
        &self.router
    }

    pub fn backend_ns(&self, i: usize) -> &Netns {
        &self.backends[i]
    }

    pub fn backend_count(&self) -> usize {
        self.backends.len()
    }

    pub fn lb_iface(&self) -> String {
        self.front.lb_iface()
    }

    /// Backend `i`'s interface. Its name carries the test process's id:
    /// `lb decap` pins under `/sys/fs/bpf/lb-decap/<interface>`, and bpffs
    /// is shared by every namespace, so two test processes (two worktrees,
    /// say) must not use the same names.
    pub fn backend_iface(&self, i: usize) -> String {
        format!("r{:x}{}b{i}", std::process::id(), self.front.index())
    }

    /// Two-arm NAT: lb's leg on the back segment.
    pub fn lb_back_iface(&self) -> Option<String> {
        (self.nat == Some(NatArms::Two)).then(|| format!("{NAME_PREFIX}{}lk", self.front.index()))
    }

    /// Every interface lb's program is attached to: the front leg, and the
    /// back leg with two arms.
    pub fn lb_ifaces(&self) -> Vec<String> {
        std::iter::once(self.lb_iface())
            .chain(self.lb_back_iface())
            .collect()
    }

    /// Two-arm NAT: lb's address on the back segment, 198.18.(k^128).2.
    pub fn lb_back_addr(&self) -> Ipv4Addr {
        let [a, b, c, _] = self.back_net().octets();
        Ipv4Addr::new(a, b, c, 2)
    }

    /// Two-arm NAT: lb's IPv6 address on the back segment, ::2.
    pub fn lb_back_addr6(&self) -> Ipv6Addr {
        let mut s = self.back_net6().segments();
        s[7] = 2;
        s.into()
    }

    /// The address lb's host uses to reach the backends (its route's
    /// preferred source): the default SNAT address of a NAT VIP. One arm:
    /// the front address; two arms: the back leg's.
    pub fn snat_of(&self, v6: bool) -> IpAddr {
        if self.nat == Some(NatArms::Two) {
            pick(v6, self.lb_back_addr(), self.lb_back_addr6())
        } else {
            self.lb_of(v6)
        }
    }

    /// The router's leg on the front segment (client and lb).
    pub fn router_front_iface(&self) -> String {
        format!("{NAME_PREFIX}{}rf", self.front.index())
    }

    /// The router's leg on the back segment (the backends').
    pub fn router_back_iface(&self) -> String {
        format!("{NAME_PREFIX}{}rb", self.front.index())
    }

    fn back_bridge(&self) -> String {
        format!("{NAME_PREFIX}{}bk", self.front.index())
    }

    pub fn client_addr(&self) -> Ipv4Addr {
        self.front.client_addr()
    }

    /// lb's address: the outer source of its encapsulated packets.
    pub fn lb_addr(&self) -> Ipv4Addr {
        self.front.lb_addr()
    }

    pub fn vip(&self) -> Ipv4Addr {
        self.front.vip()
    }

    pub fn router_front_addr(&self) -> Ipv4Addr {
        let [a, b, c, _] = self.front.client_addr().octets();
        Ipv4Addr::new(a, b, c, 254)
    }

    /// The back subnet, 198.18.(k^128).0.
    pub fn back_net(&self) -> Ipv4Addr {
        Ipv4Addr::new(198, 18, self.front.index() ^ 0x80, 0)
    }

    pub fn router_back_addr(&self) -> Ipv4Addr {
        let [a, b, c, _] = self.back_net().octets();
        Ipv4Addr::new(a, b, c, 1)
    }

    pub fn backend_addr(&self, i: usize) -> Ipv4Addr {
        let [a, b, c, _] = self.back_net().octets();
        Ipv4Addr::new(a, b, c, 11 + i as u8)
    }

    pub fn backend_addrs(&self) -> Vec<Ipv4Addr> {
        (0..self.backends.len())
            .map(|i| self.backend_addr(i))
            .collect()
    }

    /// Dual-stack topologies: the client's IPv6 address.
    pub fn client_addr6(&self) -> Ipv6Addr {
        self.front.client_addr6()
    }

    /// lb's IPv6 address: the outer source of its IPv6 tunnel packets.
    pub fn lb_addr6(&self) -> Ipv6Addr {
        self.front.lb_addr6()
    }

    pub fn vip6(&self) -> Ipv6Addr {
        self.front.vip6()
    }

    /// The router's leg on the front segment, 2001:2:0:k::fe.
    pub fn router_front_addr6(&self) -> Ipv6Addr {
        let mut s = self.front.subnet6().segments();
        s[7] = 0xfe;
        s.into()
    }

    /// The back subnet, 2001:2:0:80kk::/64.
    pub fn back_net6(&self) -> Ipv6Addr {
        Ipv6Addr::new(
            0x2001,
            2,
            0,
            0x8000 | u16::from(self.front.index()),
            0,
            0,
            0,
            0,
        )
    }

    pub fn router_back_addr6(&self) -> Ipv6Addr {
        let mut s = self.back_net6().segments();
        s[7] = 1;
        s.into()
    }

    pub fn backend_addr6(&self, i: usize) -> Ipv6Addr {
        let mut s = self.back_net6().segments();
        s[7] = 0x11 + i as u16;
        s.into()
    }

    /// The client, lb (outer source), VIP and router (lb's gateway)
    /// addresses of one family: IPv6 when `v6` (dual-stack topologies).
    pub fn client_of(&self, v6: bool) -> IpAddr {
        pick(v6, self.client_addr(), self.client_addr6())
    }

    pub fn lb_of(&self, v6: bool) -> IpAddr {
        pick(v6, self.lb_addr(), self.lb_addr6())
    }

    pub fn vip_of(&self, v6: bool) -> IpAddr {
        pick(v6, self.vip(), self.vip6())
    }

    pub fn router_front_of(&self, v6: bool) -> IpAddr {
        pick(v6, self.router_front_addr(), self.router_front_addr6())
    }

    /// Every backend's address of one family.
    pub fn backend_addrs_of(&self, v6: bool) -> Vec<IpAddr> {
        (0..self.backends.len())
            .map(|i| pick(v6, self.backend_addr(i), self.backend_addr6(i)))
            .collect()
    }

    /// Whether the hosts have IPv6 addresses too.
    pub fn is_dual_stack(&self) -> bool {
        self.ipv6
    }
}

fn pick(v6: bool, a4: Ipv4Addr, a6: Ipv6Addr) -> IpAddr {
    if v6 { a6.into() } else { a4.into() }
}
