//! The core with IPv6 VIPs and backends: the VIPS6 entries, backend
//! entries and rings it plans, next to IPv4 VIPs in one id space; requests
//! with IPv6 addresses; 4in6 next hops; adoption after a restart.

use std::{
    net::{IpAddr, Ipv6Addr, SocketAddr},
    path::Path,
};

use lb_common::{BACKEND_FLAG_V6, FlowEntry, FlowKey6, VipKey6, addr6_words};

use super::*;
use crate::{
    config::Forwarding,
    reconcile::{VipEntryKey, check_invariant},
};

const VIP6: Ipv6Addr = Ipv6Addr::new(0x2001, 2, 0, 0x100, 0, 0, 0, 1);

fn b6(last: u16) -> Ipv6Addr {
    Ipv6Addr::new(0x2001, 2, 0, 0, 0, 0, 0, last)
}

/// VIP 0: IPv4 198.19.0.1:80 over 198.18.0.11 and .12; VIP 1: IPv6
/// [VIP6]:80 over 2001:2::11 and ::12, forwarded by `mode6`; `extra`
/// appended to `[agent]`.
fn dual(mode6: &str, extra: &str) -> Config {
    let text = format!(
        "[agent]\nmax_vips = 4\nmax_backends = 16\nring_size = {M}\n{extra}\n\
         [[vip]]\nname = \"v4\"\naddress = \"198.19.0.1\"\nport = 80\nprotocol = \"tcp\"\nring_size = {M}\n\
         [vip.health_check]\nkind = \"tcp\"\n\
         [[vip.backend]]\naddress = \"198.18.0.11\"\n[[vip.backend]]\naddress = \"198.18.0.12\"\n\
         [[vip]]\nname = \"v6\"\naddress = \"{VIP6}\"\nport = 80\nprotocol = \"tcp\"\nring_size = {M}\nforwarding = \"{mode6}\"\n\
         [vip.health_check]\nkind = \"tcp\"\n\
         [[vip.backend]]\naddress = \"{}\"\n[[vip.backend]]\naddress = \"{}\"\n",
        b6(0x11),
        b6(0x12)
    );
    Config::parse(&text, Path::new("test.toml")).unwrap_or_else(|e| panic!("{e}\n{text}"))
}

fn view6(core: &Core<FakeMaps>, last: u16) -> BackendView {
    let addr = IpAddr::V6(b6(last));
    core.backends()
        .into_iter()
        .find(|v| v.address == addr)
        .unwrap_or_else(|| panic!("no backend {addr}"))
}

fn vip6_key() -> VipEntryKey {
    VipKey6::new(VIP6, 80, 6).into()
}

#[test]
fn an_ipv6_vip_next_to_an_ipv4_one_gets_vips6_entries_and_ipv6_backend_entries() {
    let core = started(dual("dsr-l2", ""), FakeMaps::new(4, M, 16));
    let info6 = core.image.vips[&vip6_key()];
    let info4 = core.image.vips[&VipId::of(&core.cfg.vips[0]).kernel_key()];
    // One index space, one ring array, one backend-id space.
    assert_ne!(info6.index, info4.index);
    assert_ne!(info6.ring_base, info4.ring_base);
    let marker = core.image.vips[&VipKey6::addr_only(VIP6).into()];
    assert!(marker.is_address_only());
    let ids6: Vec<u32> = [0x11, 0x12].iter().map(|&b| view6(&core, b).id).collect();
    let ids4: Vec<u32> = [11, 12].iter().map(|&b| core.backend(b).id).collect();
    assert!(ids6.iter().all(|i| !ids4.contains(i)), "{ids6:?} {ids4:?}");
    for (&id, last) in ids6.iter().zip([0x11u16, 0x12]) {
        let e = core.maps.backends[id as usize];
        assert_ne!(e.flags & BACKEND_FLAG_V6, 0);
        assert_eq!(e.addr6, addr6_words(b6(last)));
        assert_eq!(e.addr, 0);
        assert_eq!(e.vip_index, info6.index);
        // Resolved by the (fake) neighbour table, as for IPv4.
        assert_eq!(e.dst_mac, [2, 0, 0, 0, 0, last as u8]);
        assert_eq!(view6(&core, last).health, Health::Up);
    }
    let ring = core.image.ring(&vip6_key()).unwrap();
    for id in &ids6 {
        let n = ring.iter().filter(|&&s| s == *id).count();
        assert!(n > 100, "backend {id}: {n} slots of {M}");
    }
    // The IPv4 VIP's entries are untouched by the IPv6 one.
    let e4 = core.maps.backends[ids4[0] as usize];
    assert_eq!(e4.flags & BACKEND_FLAG_V6, 0);
    assert!(check_invariant(&core.image).is_ok());
}

#[test]
fn the_ring_of_an_ipv6_vip_depends_on_addresses_not_on_ids() {
    // The same backends with other ids (another VIP took the first ones):
    // the same backend per slot.
    let a = started(dual("dsr-l2", ""), FakeMaps::new(4, M, 16));
    let mut cfg = dual("dsr-l2", "");
    cfg.vips.swap(0, 1);
    let b = started(cfg, FakeMaps::new(4, M, 16));
    let addr_ring = |core: &Core<FakeMaps>| -> Vec<IpAddr> {
        core.image
            .ring(&vip6_key())
            .unwrap()
            .iter()
            .map(|&id| crate::datapath::backend_address(&core.image.backends[&id]))
            .collect()
    };
    assert_ne!(view6(&a, 0x11).id, view6(&b, 0x11).id, "ids differ");
    assert_eq!(addr_ring(&a), addr_ring(&b));
}

#[test]
fn a_restarted_core_adopts_the_ipv6_entries_and_writes_nothing() {
    let first = started(dual("dsr-l2", ""), FakeMaps::new(4, M, 16));
    let maps = first.maps.clone();
    let image = maps.read_image().unwrap();
    assert!(image.vips.contains_key(&vip6_key()), "VIPS6 read back");
    let mut second = Core::new(dual("dsr-l2", ""), maps, image);
    second.on_next_hops(FakeNeighbours::all().batch(&second));
    let writes = second.maps.writes;
    assert_eq!(second.reconcile().unwrap(), 0, "nothing to write");
    assert_eq!(second.maps.writes, writes);
    for b in [0x11, 0x12] {
        assert_eq!(view6(&second, b).id, view6(&first, b).id);
    }
}

#[test]
fn backend_requests_take_ipv6_addresses_and_refuse_the_wrong_family() {
    let mut core = started(dual("dsr-l2", ""), FakeMaps::new(4, M, 16));
    let before = (core.image.clone(), core.maps.writes, core.cfg.clone());
    for (address, needle) in [
        (
            ip4(198, 18, 0, 13),
            "is IPv4 but the VIP 2001:2:0:100::1 is IPv6",
        ),
        (
            IpAddr::V6("fe80::13".parse().unwrap()),
            "fe80::13 is a link-local address",
        ),
    ] {
        let e = core
            .request(Request::BackendAdd {
                vip: "v6".into(),
                address,
                weight: 1,
            })
            .unwrap_err()
            .to_string();
        assert!(e.contains(needle), "{e}");
        assert_eq!(
            (core.image.clone(), core.maps.writes, core.cfg.clone()),
            before,
            "a refused request changes nothing"
        );
    }
    // A good one: added (it starts down until checked), then drained and
    // removed by its IPv6 address; the VIP is found by [ADDR]:PORT too.
    let added = IpAddr::V6(b6(0x13));
    core.request(Request::BackendAdd {
        vip: format!("[{VIP6}]:80"),
        address: added,
        weight: 1,
    })
    .unwrap();
    assert_eq!(view6(&core, 0x13).state, "active");
    core.request(Request::BackendDrain {
        vip: "v6".into(),
        address: IpAddr::V6(b6(0x11)),
    })
    .unwrap();
    assert_eq!(view6(&core, 0x11).state, "drain");
    assert_eq!(view6(&core, 0x11).slots, 0);
    core.request(Request::BackendRemove {
        vip: "v6".into(),
        address: added,
    })
    .unwrap();
    assert!(core.backends().iter().all(|b| b.address != added));
}

#[test]
fn explain_follows_conntrack6_then_the_ring() {
    let mut core = started(dual("dsr-l2", ""), FakeMaps::new(4, M, 16));
    let src: SocketAddr = "[2001:2::1]:40000".parse().unwrap();
    let dst = SocketAddr::new(VIP6.into(), 80);
    let explain = |core: &Core<FakeMaps>| explain_tcp(core, src, dst);
    let e = explain(&core);
    assert_eq!(e.reason, "new flow: Maglev ring slot");
    let key = FlowKey6::new("2001:2::1".parse().unwrap(), 40000, VIP6, 80, 6);
    assert_eq!(e.hash, key.hash(), "the kernel's IPv6 hash");
    let ring_backend = e.ring_backend.unwrap();
    let other = if ring_backend == IpAddr::V6(b6(0x11)) {
        0x12
    } else {
        0x11
    };
    core.maps.conntrack6.insert(
        key,
        FlowEntry {
            backend_id: view6(&core, other).id,
            flags: 0,
            last_seen_ms: 0,
        },
    );
    let e = explain(&core);
    assert_eq!(e.backend, Some(IpAddr::V6(b6(other))));
    assert_eq!(e.reason, "established flow: conntrack entry");
    assert_eq!(view6(&core, other).flows, Some(1));
    // A source of the other family is no flow of this VIP.
    let err = core
        .ask(Request::Explain {
            src: "198.18.1.1:40000".parse().unwrap(),
            dst,
            protocol: Protocol::Tcp,
        })
        .err()
        .unwrap();
    assert!(err.to_string().contains("same address family"), "{err}");
}

/// IPv6 next hops through a gateway, with the route's IPv6 source.
fn routed6(core: &Core<FakeMaps>, source: Option<IpAddr>) -> Batch {
    core.wanted_next_hops()
        .keys()
        .map(|&a| {
            let gateway = if a.is_ipv4() {
                GATEWAY
            } else {
                IpAddr::V6(b6(1))
            };
            (
                a,
                Resolution {
                    egress: Ok(Egress {
                        iface: "eth0".into(),
                        ifindex: 2,
                        gateway: Some(gateway),
                        mac: [2, 0, 0, 0, 0, 0xfe],
                        source: if a.is_ipv4() { Some(ROUTE_SRC) } else { source },
                    }),
                    neighbour: Neighbour::Known(GATEWAY_MAC),
                },
            )
        })
        .collect()
}

#[test]
fn ipv6_backends_of_an_ipv4_tunnel_vip_get_an_ipv6_outer_source() {
    // 4in6: the IPv4 VIP gue-forwarded to IPv6 backends behind a gateway.
    let text = format!(
        "[agent]\nmax_vips = 4\nmax_backends = 16\nring_size = {M}\n\
         [[vip]]\nname = \"v4\"\naddress = \"198.19.0.1\"\nport = 80\nprotocol = \"tcp\"\nring_size = {M}\nforwarding = \"gue\"\n\
         [[vip.backend]]\naddress = \"{}\"\n[[vip.backend]]\naddress = \"{}\"\n",
        b6(0x11),
        b6(0x12)
    );
    let cfg = Config::parse(&text, Path::new("test.toml")).unwrap();
    let mut core = started(cfg.clone(), FakeMaps::new(4, M, 16));
    let route_src = IpAddr::V6(b6(0x10));
    core.on_next_hops(routed6(&core, Some(route_src)));
    core.reconcile().unwrap();
    core.assert_true_and_safe();
    let v = view6(&core, 0x11);
    assert_eq!(v.health, Health::Up, "{v:?}");
    assert_eq!(v.gateway, Some(IpAddr::V6(b6(1))));
    let e = core.maps.backends[v.id as usize];
    assert_eq!(e.dst_mac, GATEWAY_MAC);
    assert_eq!(e.encap_src6, addr6_words(b6(0x10)));
    assert_eq!(e.encap_src, 0);
    let x: ExplainView = explain_tcp(
        &core,
        "198.18.1.1:40000".parse().unwrap(),
        "198.19.0.1:80".parse().unwrap(),
    );
    let outer = x.outer.expect("outer header");
    assert_eq!(outer.src, route_src);
    assert_eq!(Some(outer.dst), x.backend);

    // The operator's encap_source_v6 wins over the route's; an IPv4
    // encap_source_v4 is not used for IPv6 backends.
    let mut own = cfg.clone();
    own.agent.encap.source_v6 = Some(b6(0x99));
    own.agent.encap.source_v4 = Some(std::net::Ipv4Addr::new(198, 18, 0, 99));
    reload(&mut core, own);
    core.on_next_hops(routed6(&core, Some(route_src)));
    core.reconcile().unwrap();
    let e = core.maps.backends[view6(&core, 0x11).id as usize];
    assert_eq!(e.encap_src6, addr6_words(b6(0x99)));

    // No IPv6 source anywhere: out of the ring, the reason names the
    // setting.
    reload(&mut core, cfg);
    core.on_next_hops(routed6(&core, None));
    core.reconcile().unwrap();
    core.assert_true_and_safe();
    let v = view6(&core, 0x11);
    assert_eq!(v.health, Health::Unresolved);
    let why = v.next_hop_error.unwrap();
    assert!(
        why.contains("no global IPv6 address") && why.contains("encap_source_v6"),
        "{why}"
    );
}

#[test]
fn an_ipv6_tunnel_vip_keeps_its_mode_in_its_vips6_entry() {
    let core = started(dual("ipip", ""), FakeMaps::new(4, M, 16));
    assert_eq!(
        core.image.vips[&vip6_key()].forwarding,
        Forwarding::Ipip.kernel_value()
    );
}

#[test]
fn an_ipv6_backend_with_a_mac_override_needs_no_neighbour_discovery() {
    let mut cfg = dual("dsr-l2", "");
    cfg.vips[1].backends[0].mac = Some([2, 0, 0, 0, 0, 0x77]);
    let mut core = started(cfg, FakeMaps::new(4, M, 16));
    let wanted = core.wanted_next_hops();
    assert!(!wanted[&IpAddr::V6(b6(0x11))].arp, "only its route matters");
    assert!(wanted[&IpAddr::V6(b6(0x12))].arp);
    // ND fails for both: the override still reaches its backend.
    let mut nd = FakeNeighbours::all();
    nd.macs.clear();
    core.on_next_hops(nd.batch(&core));
    core.reconcile().unwrap();
    core.assert_true_and_safe();
    let v = view6(&core, 0x11);
    assert_eq!(v.health, Health::Up, "{v:?}");
    assert_eq!(
        core.maps.backends[v.id as usize].dst_mac,
        [2, 0, 0, 0, 0, 0x77]
    );
    let v = view6(&core, 0x12);
    assert_eq!(v.health, Health::Unresolved);
    assert_eq!(
        v.next_hop_error.as_deref(),
        Some("no neighbour discovery answer from 2001:2::12 on eth0")
    );
}

#[test]
fn an_ipv6_nat_vip_gets_ipv6_snat_addresses_and_route_sources() {
    let snat6 = b6(0x5a);
    let cfg = dual(
        "nat",
        &format!("snat_addresses = [\"198.18.1.1\", \"{snat6}\"]"),
    );
    let mut core = started(cfg, FakeMaps::new(4, M, 16));
    let route_src = IpAddr::V6(b6(0x10));
    core.on_next_hops(routed6(&core, Some(route_src)));
    core.reconcile().unwrap();
    core.assert_true_and_safe();
    let info = core.image.vips[&vip6_key()];
    assert_eq!(info.forwarding, Forwarding::Nat.kernel_value());
    // The agent's IPv6 SNAT address only, as on the wire.
    let snat = core.maps.nat_snat[info.index as usize];
    assert_eq!(snat.count, 1);
    assert_eq!(snat.addrs[0], addr6_words(snat6));
    for last in [0x11, 0x12] {
        let v = view6(&core, last);
        assert_eq!(v.health, Health::Up, "{v:?}");
        let e = core.maps.backends[v.id as usize];
        assert_eq!(e.encap_src6, addr6_words(b6(0x10)), "the route source");
        assert_eq!(e.port, 0, "the VIP's port");
    }
    // explain: the IPv6 SNAT address, no port yet.
    let x = core
        .ask(Request::Explain {
            src: "[2001:2::99]:40000".parse().unwrap(),
            dst: SocketAddr::new(IpAddr::V6(VIP6), 80),
            protocol: crate::config::Protocol::Tcp,
        })
        .unwrap();
    let x: crate::control::ExplainView = serde_json::from_value(x.data).unwrap();
    let nat = x.nat.unwrap();
    assert_eq!(nat.snat_address, Some(IpAddr::V6(snat6)));
    assert_eq!(nat.snat, None);
    assert_eq!(nat.backend.map(|b| b.port()), Some(80));
}
