//! The demo's routed IPv6 network for `--forwarding ipip|gue --ipv6`: the
//! IPv6 counterpart of `lb_tests::routed` (which is IPv4 only), kept here
//! because only the demo needs it so far.
//!
//! ```text
//!  client ─┐                 front segment 2001:2:0:k::/64 (bridge "front")
//!  lb ─────┼── switch ──┐    client ::1, lb ::2, router ::fe
//!  router ─┘            │
//!  router ──────────────┴── back segment 2001:2:0:2kk::/64 (bridge "back")
//!  backends 0..n ─────────  router ::1, backends ::11, ::12, …
//! ```
//!
//! The front is an IPv6 [`Topology`] without backends; this adds a router
//! namespace forwarding IPv6 between the segments, and backends holding
//! the VIP on lo, reached by lb through the router (its route to the back
//! prefix, the router's MAC learnt over neighbour discovery) and answering
//! the client through it (their default route). Addresses are static,
//! without duplicate address detection. Nothing is added to the root
//! namespace; dropping it removes everything.

use std::{net::Ipv6Addr, time::Duration};

use anyhow::{Context as _, Result, ensure};
use lb_tests::{
    agent::lb_in_ns,
    netns::{NAME_PREFIX, Netns, Topology, TopologyOpts, run_command},
};

/// MAC roles (02:18:k:role:index:side), after those of [`Topology`].
const ROLE_ROUTER: u8 = 4;
const ROLE_BACKEND: u8 = 5;

/// See the module docs.
pub struct Routed6 {
    // Drop order = field order: backends and router before the front
    // (whose switch namespace holds both bridges).
    backends: Vec<Netns>,
    router: Netns,
    front: Topology,
}

impl Routed6 {
    /// Builds the topology with `backends` backends; on any error
    /// everything already created is removed again (the guards).
    pub fn new(backends: usize) -> Result<Self> {
        ensure!(backends <= 200, "at most 200 backends");
        let front = Topology::new(TopologyOpts {
            backends: 0,
            ipv6: true,
        })?;
        let tag = front.lb_ns().name().trim_end_matches("-lb").to_owned();
        let router = Netns::create(format!("{tag}-r6"))?;
        let mut topo = Routed6 {
            backends: Vec::new(),
            router,
            front,
        };
        let sw = topo.front.switch_ns();
        let back = topo.back_bridge();
        sw.ip(["link", "add", &back, "type", "bridge", "forward_delay", "0"])?;
        sw.ip(["link", "set", &back, "up"])?;

        topo.router.sysctl(&static_ipv6(true))?;
        let (rf, rb) = (topo.router_front_iface(), topo.router_back_iface());
        let front_bridge = topo.front.bridge();
        topo.front
            .plug_into(&topo.router, &rf, &front_bridge, ROLE_ROUTER, 0, false)?;
        topo.front
            .plug_into(&topo.router, &rb, &back, ROLE_ROUTER, 1, false)?;
        add_addr6(&topo.router, &rf, topo.router_front_addr())?;
        add_addr6(&topo.router, &rb, topo.router_back_addr())?;

        // lb reaches the back prefix through the router.
        let net = format!("{}/64", topo.back_net());
        let via = topo.router_front_addr().to_string();
        topo.front
            .lb_ns()
            .ip(["-6", "route", "add", &net, "via", &via])?;

        for _ in 0..backends {
            topo.add_backend()?;
        }
        Ok(topo)
    }

    fn add_backend(&mut self) -> Result<usize> {
        let i = self.backends.len();
        let tag = self.front.lb_ns().name().trim_end_matches("-lb").to_owned();
        let ns = Netns::create(format!("{tag}-6b{i}"))?;
        ns.sysctl(&static_ipv6(false))?;
        let iface = self.backend_iface(i);
        // TX checksum offload off: the backends' replies leave complete.
        self.front.plug_into(
            &ns,
            &iface,
            &self.back_bridge(),
            ROLE_BACKEND,
            i as u8,
            true,
        )?;
        add_addr6(&ns, &iface, self.backend_addr(i))?;
        let via = self.router_back_addr().to_string();
        ns.ip(["-6", "route", "add", "default", "via", &via])?;
        let vip = format!("{}/128", self.vip());
        ns.ip(["-6", "addr", "add", &vip, "dev", "lo", "nodad"])?;
        self.backends.push(ns);
        self.front.wait_ports_forwarding(
            &self.back_bridge(),
            1 + self.backends.len(),
            Duration::from_secs(5),
        )?;
        Ok(i)
    }

    pub fn front(&self) -> &Topology {
        &self.front
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

    /// Backend `i`'s interface. `lb decap` pins under
    /// `/sys/fs/bpf/lb-decap/<interface>`, shared by every namespace: the
    /// name carries this process's id so that another process's demo or
    /// tests never use the same one.
    pub fn backend_iface(&self, i: usize) -> String {
        format!("d{:x}{}b{i}", std::process::id(), self.front.index())
    }

    fn router_front_iface(&self) -> String {
        format!("{NAME_PREFIX}{}6f", self.front.index())
    }

    fn router_back_iface(&self) -> String {
        format!("{NAME_PREFIX}{}6b", self.front.index())
    }

    fn back_bridge(&self) -> String {
        format!("{NAME_PREFIX}{}6k", self.front.index())
    }

    pub fn router_front_addr(&self) -> Ipv6Addr {
        let s = self.front.subnet6().segments();
        Ipv6Addr::new(s[0], s[1], s[2], s[3], 0, 0, 0, 0xfe)
    }

    /// The back prefix, 2001:2:0:2kk::/64.
    pub fn back_net(&self) -> Ipv6Addr {
        Ipv6Addr::new(
            0x2001,
            2,
            0,
            0x200 + u16::from(self.front.index()),
            0,
            0,
            0,
            0,
        )
    }

    pub fn router_back_addr(&self) -> Ipv6Addr {
        let s = self.back_net().segments();
        Ipv6Addr::new(s[0], s[1], s[2], s[3], 0, 0, 0, 1)
    }

    pub fn backend_addr(&self, i: usize) -> Ipv6Addr {
        let s = self.back_net().segments();
        Ipv6Addr::new(s[0], s[1], s[2], s[3], 0, 0, 0, 0x11 + i as u16)
    }

    pub fn vip(&self) -> Ipv6Addr {
        self.front.vip6()
    }
}

/// IPv6 sysctls of a router (`forwarding`) or a host: static addresses
/// usable at once (no DAD, router solicitations or autoconfiguration).
fn static_ipv6(forwarding: bool) -> Vec<(&'static str, &'static str)> {
    let mut v = vec![
        ("net.ipv6.conf.all.disable_ipv6", "0"),
        ("net.ipv6.conf.default.disable_ipv6", "0"),
        (
            "net.ipv6.conf.all.forwarding",
            if forwarding { "1" } else { "0" },
        ),
    ];
    for (key_all, key_default, value) in [
        (
            "net.ipv6.conf.all.accept_dad",
            "net.ipv6.conf.default.accept_dad",
            "0",
        ),
        (
            "net.ipv6.conf.all.dad_transmits",
            "net.ipv6.conf.default.dad_transmits",
            "0",
        ),
        (
            "net.ipv6.conf.all.accept_ra",
            "net.ipv6.conf.default.accept_ra",
            "0",
        ),
        (
            "net.ipv6.conf.all.router_solicitations",
            "net.ipv6.conf.default.router_solicitations",
            "0",
        ),
        (
            "net.ipv6.conf.all.autoconf",
            "net.ipv6.conf.default.autoconf",
            "0",
        ),
    ] {
        v.push((key_all, value));
        v.push((key_default, value));
    }
    v
}

fn add_addr6(ns: &Netns, iface: &str, addr: Ipv6Addr) -> Result<()> {
    let cidr = format!("{addr}/64");
    ns.ip(["-6", "addr", "add", &cidr, "dev", iface, "nodad"])?;
    Ok(())
}

/// `lb decap attach --iface IFACE --allow-source LB/128` on an IPv6
/// backend (lb_tests' `DecapAttachment` takes an IPv4 source); detached
/// when dropped, since the pins live in the host-wide bpffs.
pub struct Decap6 {
    ns: String,
    iface: String,
}

const CLI_TIMEOUT: Duration = Duration::from_secs(20);

impl Decap6 {
    pub fn attach(ns: &Netns, iface: &str, allow: Ipv6Addr) -> Result<Self> {
        let mut cmd = lb_in_ns(ns.name());
        let allow = format!("{allow}/128");
        cmd.args([
            "decap",
            "attach",
            "--iface",
            iface,
            "--allow-source",
            &allow,
        ]);
        run_command(cmd, CLI_TIMEOUT).context("lb decap attach")?;
        Ok(Self {
            ns: ns.name().into(),
            iface: iface.into(),
        })
    }
}

impl Drop for Decap6 {
    fn drop(&mut self) {
        let mut cmd = lb_in_ns(&self.ns);
        cmd.args(["decap", "detach", "--iface", &self.iface]);
        if let Err(e) = run_command(cmd, CLI_TIMEOUT) {
            eprintln!("lb decap detach in {}: {e:#}", self.ns);
        }
    }
}
