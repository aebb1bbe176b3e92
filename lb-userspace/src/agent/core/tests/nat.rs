//! The core with NAT VIPs: the kernel image it plans (VIP mode, NAT_SNAT,
//! backend ports and route sources, TX_PORTS) and what reloads and
//! restarts do with it.

use std::path::Path;

use lb_common::{FORWARD_NAT, nat::NatSnat};

use super::*;
use crate::agent::state::nat_snat;

/// VIP 0 "v1": 198.19.0.1:80 forwarded by NAT over 198.18.0.11 (port
/// 8080) and 198.18.0.12 (the VIP's port); `agent` and `vip` extra lines.
fn nat_config(agent: &str, vip: &str) -> Config {
    let text = format!(
        "[agent]\nmax_vips = 4\nmax_backends = 16\nring_size = {M}\n{agent}\n\
         [[vip]]\nname = \"v1\"\naddress = \"198.19.0.1\"\nport = 80\nprotocol = \"tcp\"\nring_size = {M}\nforwarding = \"nat\"\n{vip}\
         [vip.health_check]\nkind = \"tcp\"\n\
         [[vip.backend]]\naddress = \"198.18.0.11\"\nport = 8080\n\
         [[vip.backend]]\naddress = \"198.18.0.12\"\n"
    );
    Config::parse(&text, Path::new("test.toml")).unwrap_or_else(|e| panic!("{e}\n{text}"))
}

fn snat_of(core: &Core<FakeMaps>) -> NatSnat {
    core.maps.nat_snat[vip_info(core).index as usize]
}

fn v4(a: Ipv4Addr) -> [u32; 4] {
    [a.to_bits().to_be(), 0, 0, 0]
}

#[test]
fn a_nat_vip_gets_its_mode_snat_addresses_backend_ports_and_route_sources() {
    let cfg = nat_config("snat_addresses = [\"198.18.1.1\", \"2001:2::1\"]", "");
    let mut core = started(cfg, FakeMaps::new(4, M, 16));
    core.on_next_hops(routed_batch(&core, Some(ROUTE_SRC)));
    core.reconcile().unwrap();
    core.assert_true_and_safe();
    assert_eq!(vip_info(&core).forwarding, FORWARD_NAT);
    // The agent's SNAT addresses of the VIP's family only.
    let snat = snat_of(&core);
    assert_eq!(snat.count, 1);
    assert_eq!(snat.addrs[0], v4(Ipv4Addr::new(198, 18, 1, 1)));
    assert_eq!(core.image.snat[&vip_info(&core).index], snat);
    for (b, port) in [(11, 8080u16.to_be()), (12, 0)] {
        let v = core.backend(b);
        // Routed backends are fine: NAT needs a next hop, like a tunnel.
        assert_eq!(v.health, Health::Up, "{v:?}");
        let e = core.maps.backends[v.id as usize];
        assert_eq!(e.port, port, "backend {b}: 0 = the VIP's port");
        assert_eq!(e.dst_mac, GATEWAY_MAC);
        // The route's source: the SNAT address of a VIP naming none.
        assert_eq!(e.encap_src, u32::from(ROUTE_SRC_V4).to_be());
    }
}

#[test]
fn a_nat_vip_without_snat_addresses_needs_a_route_source() {
    let cfg = nat_config("", "");
    let mut core = started(cfg.clone(), FakeMaps::new(4, M, 16));
    assert_eq!(snat_of(&core).count, 0, "count 0: each backend's source");
    assert!(core.image.snat.contains_key(&vip_info(&core).index));
    // No source on the route or the interface: unresolved, and the reason
    // names the setting that would help.
    core.on_next_hops(routed_batch(&core, None));
    core.reconcile().unwrap();
    core.assert_true_and_safe();
    let v = core.backend(11);
    assert_eq!(v.health, Health::Unresolved);
    let why = v.next_hop_error.unwrap();
    assert!(
        why.contains("no SNAT address for 198.18.0.11") && why.contains("snat_addresses"),
        "{why}"
    );
    // With the VIP's own SNAT address the route source is not needed.
    reload(
        &mut core,
        nat_config("", "snat_addresses = [\"198.18.1.7\"]\n"),
    );
    core.on_next_hops(routed_batch(&core, None));
    core.reconcile().unwrap();
    core.assert_true_and_safe();
    assert_eq!(core.backend(11).health, Health::Up);
    assert_eq!(snat_of(&core).addrs[0], v4(Ipv4Addr::new(198, 18, 1, 7)));
}

#[test]
fn a_reload_changes_snat_addresses_and_backend_ports_in_place() {
    let mut core = started(nat_config("", ""), FakeMaps::new(4, M, 16));
    core.on_next_hops(routed_batch(&core, Some(ROUTE_SRC)));
    core.reconcile().unwrap();
    let ids: Vec<u32> = [11, 12].iter().map(|&b| core.backend(b).id).collect();
    let ring = core
        .image
        .ring(&VipId::of(&core.cfg.vips[0]).kernel_key())
        .unwrap()
        .to_vec();
    let index = vip_info(&core).index;

    let mut changed = nat_config(
        "snat_addresses = [\"198.18.1.1\", \"198.18.1.2\"]\nnat_port_range = \"40000-40099\"",
        "",
    );
    changed.vips[0].backends[0].port = Some(9090);
    changed.vips[0].backends[1].port = Some(80);
    reload(&mut core, changed);
    core.on_next_hops(routed_batch(&core, Some(ROUTE_SRC)));
    core.reconcile().unwrap();
    core.assert_true_and_safe();
    // Same index, ids and ring: established flows (their NAT entries
    // record their own allocation) are not disturbed.
    assert_eq!(vip_info(&core).index, index);
    let again: Vec<u32> = [11, 12].iter().map(|&b| core.backend(b).id).collect();
    assert_eq!(again, ids);
    assert_eq!(
        core.image
            .ring(&VipId::of(&core.cfg.vips[0]).kernel_key())
            .unwrap(),
        ring.as_slice()
    );
    assert_eq!(
        snat_of(&core),
        nat_snat(&["198.18.1.1".parse().unwrap(), "198.18.1.2".parse().unwrap()])
    );
    assert_eq!(snat_of(&core).count, 2);
    assert_eq!(core.maps.backends[ids[0] as usize].port, 9090u16.to_be());
    // The VIP's own port, written out: still 0.
    assert_eq!(core.maps.backends[ids[1] as usize].port, 0);
    assert_eq!(core.config().agent.nat.port_min, 40000);

    // Back to dsr-l2: the entry leaves the image's NAT_SNAT with the mode.
    let mut dsr = nat_config("", "");
    dsr.vips[0].forwarding = crate::config::Forwarding::DsrL2;
    for b in &mut dsr.vips[0].backends {
        b.port = None;
    }
    dsr.vips[0].snat_addresses.clear();
    reload(&mut core, dsr);
    assert!(core.image.snat.is_empty());
    assert_eq!(core.maps.backends[ids[0] as usize].port, 0);
}

#[test]
fn a_rejected_reload_changes_nothing() {
    let mut core = started(nat_config("", ""), FakeMaps::new(4, M, 16));
    let before = (core.maps.clone(), core.image.clone(), core.cfg.clone());
    // nat_entries sizes the pinned maps: a restart only.
    let refused = nat_config("nat_entries = 1024\nsnat_addresses = [\"198.18.1.1\"]", "");
    let e = core.apply_reload(refused).unwrap_err();
    assert!(e.to_string().contains("nat_entries"), "{e}");
    core.after_change().unwrap();
    assert_eq!(core.cfg, before.2);
    assert_eq!(core.image, before.1);
    assert_eq!(core.maps.nat_snat, before.0.nat_snat);
    assert_eq!(core.maps.backends, before.0.backends);
}

#[test]
fn a_restarted_agent_reads_back_the_snat_addresses_and_writes_nothing() {
    let cfg = nat_config("snat_addresses = [\"198.18.1.1\"]", "");
    let core = started(cfg.clone(), FakeMaps::new(4, M, 16));
    let maps = core.into_maps();
    let writes = maps.writes;
    let image = maps.read_image().unwrap();
    assert_eq!(image.snat.len(), 1);
    let mut again = Core::new(cfg, maps, image);
    again.on_next_hops(FakeNeighbours::all().batch(&again));
    again.reconcile().unwrap();
    again.assert_true_and_safe();
    assert_eq!(
        again.maps.writes, writes,
        "nothing to write after a restart"
    );
}

#[test]
fn attached_interfaces_are_redirect_targets() {
    let mut core = started(nat_config("", ""), FakeMaps::new(4, M, 16));
    // Backends' egress interface (ifindex 2) and both arms.
    core.add_attached_tx_ports(&[2, 7]);
    let mut ports = core.maps.tx_ports.clone();
    ports.sort();
    assert_eq!(ports, vec![2, 7]);
}

#[test]
fn vip_and_backend_lists_show_the_mode_snat_addresses_and_backend_ports() {
    let core = started(
        nat_config("", "snat_addresses = [\"198.18.1.1\"]\n"),
        FakeMaps::new(4, M, 16),
    );
    let h = core.ask(Request::VipList).unwrap();
    let vips: Vec<crate::control::VipView> = serde_json::from_value(h.data).unwrap();
    assert_eq!(vips[0].forwarding, crate::config::Forwarding::Nat);
    assert_eq!(vips[0].snat_addresses, vec![ip4(198, 18, 1, 1)]);
    assert_eq!(core.backend(11).port, Some(8080));
    assert_eq!(core.backend(12).port, Some(80), "the VIP's");
}

#[test]
fn explain_names_the_nat_translation_before_and_after_the_first_packet() {
    use lb_common::nat::NatRev;
    let snat_list = ["198.18.1.1", "198.18.1.2", "198.18.1.3"];
    let vip_line = format!(
        "snat_addresses = [{}]\n",
        snat_list.map(|a| format!("\"{a}\"")).join(", ")
    );
    let mut core = started(nat_config("", &vip_line), FakeMaps::new(4, M, 16));
    let src: SocketAddr = "198.18.0.50:40000".parse().unwrap();
    let dst: SocketAddr = "198.19.0.1:80".parse().unwrap();
    let e = explain_tcp(&core, src, dst);
    let nat = e.nat.clone().expect("a NAT VIP's flow");
    // The backend the ring gives, at its port.
    let b = e.ring_backend.unwrap();
    let port = if b == ip4(198, 18, 0, 11) { 8080 } else { 80 };
    assert_eq!(nat.backend, Some(SocketAddr::new(b, port)));
    // No entry yet: the SNAT address the kernel's rule picks, no port.
    assert_eq!(nat.snat, None);
    let want: IpAddr = snat_list[lb_common::nat::snat_index(e.hash, 3) as usize]
        .parse()
        .unwrap();
    assert_eq!(nat.snat_address, Some(want));
    assert_eq!(nat.reverse, None);

    // The kernel recorded the flow (to backend 12 at 8081, through
    // 198.18.1.3:61234): explain follows the entries.
    let key = FlowKey::new(
        u32::from(Ipv4Addr::new(198, 18, 0, 50)),
        40000,
        u32::from(Ipv4Addr::new(198, 19, 0, 1)),
        80,
        6,
    );
    let fwd = lb_common::nat::NatFwd {
        snat_addr: v4(Ipv4Addr::new(198, 18, 1, 3)),
        backend_addr: v4(Ipv4Addr::new(198, 18, 0, 12)),
        backend_id: core.backend(12).id,
        snat_port: 61234u16.to_be(),
        backend_port: 8081u16.to_be(),
        ..Default::default()
    };
    core.maps.nat_fwd.insert(key, fwd);
    let e = explain_tcp(&core, src, dst);
    let nat = e.nat.unwrap();
    assert_eq!(nat.backend, Some("198.18.0.12:8081".parse().unwrap()));
    assert_eq!(nat.snat, Some("198.18.1.3:61234".parse().unwrap()));
    assert_eq!(nat.reverse, None, "no reverse entry yet");
    assert_eq!(e.backend, Some(ip4(198, 18, 0, 12)));
    assert_eq!(e.reason, "established NAT flow: NAT_FWD entry");
    // Its reverse entry, under the replies' key.
    let rk = FlowKey::new(
        u32::from(Ipv4Addr::new(198, 18, 0, 12)),
        8081,
        u32::from(Ipv4Addr::new(198, 18, 1, 3)),
        61234,
        6,
    );
    core.maps.nat_rev.insert(
        rk,
        NatRev {
            client_addr: v4(Ipv4Addr::new(198, 18, 0, 50)),
            vip_addr: v4(Ipv4Addr::new(198, 19, 0, 1)),
            client_port: 40000u16.to_be(),
            vip_port: 80u16.to_be(),
            ifindex: 3,
            ..Default::default()
        },
    );
    let r = explain_tcp(&core, src, dst).nat.unwrap().reverse.unwrap();
    assert_eq!(r.from, "198.18.0.12:8081".parse().unwrap());
    assert_eq!(r.to, "198.18.1.3:61234".parse().unwrap());
    assert_eq!(r.vip, dst);
    assert_eq!(r.client, src);
    assert_eq!(r.ifindex, 3);
}

#[test]
fn explain_without_snat_addresses_names_the_route_source() {
    let mut core = started(nat_config("", ""), FakeMaps::new(4, M, 16));
    core.on_next_hops(routed_batch(&core, Some(ROUTE_SRC)));
    core.reconcile().unwrap();
    let e = explain_tcp(
        &core,
        "198.18.0.50:40000".parse().unwrap(),
        "198.19.0.1:80".parse().unwrap(),
    );
    assert_eq!(e.nat.unwrap().snat_address, Some(ROUTE_SRC));
}
