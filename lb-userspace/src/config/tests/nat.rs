//! `forwarding = "nat"`: the port range, NAT map size, SNAT addresses
//! (agent and VIP) and backend ports; every rule's error names the line
//! and the field.

use super::*;

/// A NAT VIP (lines 1-5) with `extra` VIP keys, then one backend.
fn nat_vip(extra: &str, backend: &str) -> String {
    format!(
        "[[vip]]\naddress = \"198.18.0.100\"\nport = 80\nprotocol = \"tcp\"\nforwarding = \"nat\"\n{extra}[[vip.backend]]\naddress = \"198.18.2.10\"\n{backend}"
    )
}

#[test]
fn the_nat_example_resolves() {
    let c = ok(r#"[agent]
nat_port_range = "40000-40999"
nat_entries = 4096
snat_addresses = ["198.18.1.1", "2001:2:0:1::1", "198.18.1.2"]

[[vip]]
address = "198.18.0.100"
port = 80
protocol = "tcp"
forwarding = "nat"

[[vip.backend]]
address = "198.18.2.10"
port = 8080

[[vip.backend]]
address = "198.18.2.11"

[[vip]]
address = "2001:2::100"
port = 443
protocol = "tcp"
forwarding = "nat"
snat_addresses = ["2001:2:0:1::2"]

[[vip.backend]]
address = "2001:2:0:2::10"

[[vip]]
address = "198.18.0.101"
port = 80
protocol = "udp"
"#);
    assert_eq!(c.agent.nat.port_min, 40000);
    assert_eq!(c.agent.nat.port_max, 40999);
    assert_eq!(c.agent.kernel.nat_entries, 4096);
    let ip = |s: &str| s.parse::<IpAddr>().unwrap();
    assert_eq!(c.vips[0].forwarding, Forwarding::Nat);
    // The agent's list, of the VIP's family.
    assert_eq!(
        c.vips[0].snat_addresses,
        vec![ip("198.18.1.1"), ip("198.18.1.2")]
    );
    assert_eq!(c.vips[0].backends[0].port, Some(8080));
    assert_eq!(c.vips[0].backend_port(&c.vips[0].backends[0]), 8080);
    assert_eq!(c.vips[0].backends[1].port, None);
    assert_eq!(c.vips[0].backend_port(&c.vips[0].backends[1]), 80);
    // The VIP's own list replaces the agent's.
    assert_eq!(c.vips[1].snat_addresses, vec![ip("2001:2:0:1::2")]);
    // Not NAT: none.
    assert!(c.vips[2].snat_addresses.is_empty());
}

#[test]
fn nat_defaults() {
    let c = ok(&nat_vip("", ""));
    assert_eq!((c.agent.nat.port_min, c.agent.nat.port_max), (61000, 65535));
    assert_eq!(c.agent.kernel.nat_entries, lb_common::DEFAULT_NAT_ENTRIES);
    assert!(c.vips[0].snat_addresses.is_empty(), "route source");
    assert_eq!(Forwarding::Nat.kernel_value(), lb_common::FORWARD_NAT);
    assert!(Forwarding::Nat.is_routed() && !Forwarding::Nat.is_tunnel());
    assert!(Forwarding::Gue.is_routed() && Forwarding::Gue.is_tunnel());
    assert!(!Forwarding::DsrL2.is_routed());
}

#[test]
fn port_range_errors() {
    for (range, needle) in [
        ("61000", r#"expected "MIN-MAX""#),
        ("x-65535", r#""x" is not a port"#),
        ("61000-70000", r#""70000" is not a port"#),
        (
            "62000-61000",
            "the first port 62000 is above the last 61000",
        ),
        ("80-1000", "ports below 1024"),
    ] {
        let e = err(&format!("[agent]\nnat_port_range = \"{range}\"\n"));
        check(&e, 2, "agent.nat_port_range", needle);
    }
    // The smallest range: one port.
    let c = ok("[agent]\nnat_port_range = \"1024-1024\"\n");
    assert_eq!((c.agent.nat.port_min, c.agent.nat.port_max), (1024, 1024));
}

#[test]
fn nat_entries_range() {
    let e = err("[agent]\nnat_entries = 0\n");
    check(&e, 2, "agent.nat_entries", "0 is out of range 1..=");
}

#[test]
fn agent_snat_address_errors() {
    for (list, field, needle) in [
        ("[\"0.0.0.0\"]", "[0]", "the unspecified address"),
        ("[\"224.0.0.1\"]", "[0]", "multicast"),
        ("[\"169.254.1.1\"]", "[0]", "link-local"),
        ("[\"fe80::1\"]", "[0]", "link-local"),
        ("[\"::\"]", "[0]", "the unspecified address"),
        ("[\"nope\"]", "[0]", "invalid IP address"),
        (
            "[\"198.18.1.1\", \"198.18.1.1\"]",
            "[1]",
            "198.18.1.1 is listed twice",
        ),
        (
            "[\"198.18.1.1\", \"2001:2::1\", \"198.18.1.2\", \"198.18.1.3\", \"198.18.1.4\", \"198.18.1.5\"]",
            "[5]",
            "more than 4 IPv4 SNAT addresses",
        ),
    ] {
        let e = err(&format!("[agent]\nsnat_addresses = {list}\n"));
        check(&e, 2, &format!("agent.snat_addresses{field}"), needle);
    }
    // Four of each family is fine.
    ok(
        "[agent]\nsnat_addresses = [\"198.18.1.1\", \"198.18.1.2\", \"198.18.1.3\", \"198.18.1.4\", \"2001:2::1\", \"2001:2::2\", \"2001:2::3\", \"2001:2::4\"]\n",
    );
}

#[test]
fn a_snat_address_must_not_be_a_vip_address() {
    // The agent's: named where it is written, with the VIP it collides with.
    let e = err(&format!(
        "[agent]\nsnat_addresses = [\"198.18.1.1\", \"198.18.0.100\"]\n{}",
        nat_vip("", "")
    ));
    check(
        &e,
        2,
        "agent.snat_addresses[1]",
        "198.18.0.100 is the address of VIP 198.18.0.100:80/tcp (vip[0])",
    );
    // Any VIP's address, whatever its mode.
    let text = format!(
        "{}[[vip]]\naddress = \"198.18.0.7\"\nport = 53\nprotocol = \"udp\"\n",
        nat_vip("snat_addresses = [\"198.18.0.7\"]\n", "")
    );
    let e = err(&text);
    check(
        &e,
        6,
        "vip[0].snat_addresses[0]",
        "must not be a VIP address",
    );
}

#[test]
fn vip_snat_address_errors() {
    let e = err(&nat_vip("snat_addresses = [\"2001:2::1\"]\n", ""));
    check(
        &e,
        6,
        "vip[0].snat_addresses[0]",
        "SNAT address 2001:2::1 is IPv6 but the VIP 198.18.0.100 is IPv4",
    );
    let e = err(&nat_vip("snat_addresses = [\"224.1.1.1\"]\n", ""));
    check(&e, 6, "vip[0].snat_addresses[0]", "multicast");
    let e = err(&nat_vip(
        "snat_addresses = [\"198.18.1.1\", \"198.18.1.2\", \"198.18.1.3\", \"198.18.1.4\", \"198.18.1.5\"]\n",
        "",
    ));
    check(&e, 6, "vip[0].snat_addresses[4]", "more than 4 IPv4");
    // Only NAT VIPs take SNAT addresses.
    let e = err(&format!(
        "{HEAD}forwarding = \"gue\"\nsnat_addresses = [\"198.18.1.1\"]\n"
    ));
    check(
        &e,
        6,
        "vip[0].snat_addresses",
        "only valid with forwarding = \"nat\" (this VIP's is \"gue\")",
    );
}

#[test]
fn backend_port_rules() {
    let e = err(&nat_vip("", "port = 0\n"));
    check(
        &e,
        8,
        "vip[0].backend[0].port",
        "0 is out of range 1..=65535",
    );
    // Elsewhere the packet keeps the VIP's port: an error.
    let e = err(&format!(
        "{HEAD}[[vip.backend]]\naddress = \"198.18.0.11\"\nport = 8080\n"
    ));
    check(
        &e,
        7,
        "vip[0].backend[0].port",
        "a backend port is only valid with forwarding = \"nat\" (this VIP's is \"dsr-l2\"",
    );
}

#[test]
fn nat_backends_are_of_the_vips_family() {
    let e = err(
        "[[vip]]\naddress = \"198.18.0.100\"\nport = 80\nprotocol = \"tcp\"\nforwarding = \"nat\"\n[[vip.backend]]\naddress = \"2001:2::10\"\n",
    );
    check(
        &e,
        7,
        "vip[0].backend[0].address",
        "forwarding = \"nat\" translates addresses within one family",
    );
    let e = err(
        "[[vip]]\naddress = \"2001:2::100\"\nport = 80\nprotocol = \"tcp\"\nforwarding = \"nat\"\n[[vip.backend]]\naddress = \"198.18.2.10\"\n",
    );
    check(&e, 7, "vip[0].backend[0].address", "is IPv4 but the VIP");
}

#[test]
fn nat_settings_reload_live_but_nat_entries_needs_a_restart() {
    let old = ok(&nat_vip("", ""));
    let new = ok(&format!(
        "[agent]\nnat_port_range = \"50000-50100\"\nsnat_addresses = [\"198.18.1.1\"]\n{}",
        nat_vip("", "port = 8080\n")
    ));
    assert_eq!(reload_check(&old, &new), Ok(None));
    let bigger = ok(&format!("[agent]\nnat_entries = 1024\n{}", nat_vip("", "")));
    let refusal = reload_check(&old, &bigger).unwrap_err();
    assert!(refusal.contains("nat_entries"), "{refusal}");
}

#[test]
fn a_nat_backends_health_check_defaults_to_its_port() {
    let c = ok(&format!(
        "{}[[vip.backend]]\naddress = \"198.18.2.11\"\n",
        nat_vip("", "port = 8080\n")
    ));
    assert_eq!(c.vips[0].backends[0].health_check.port, 8080);
    assert_eq!(c.vips[0].backends[1].health_check.port, 80, "the VIP's");
    // An explicit port wins, the VIP's or the backend's.
    let c = ok(&nat_vip(
        "[vip.health_check]\nport = 9000\n",
        "port = 8080\n",
    ));
    assert_eq!(c.vips[0].backends[0].health_check.port, 9000);
    let c = ok(&nat_vip(
        "",
        "port = 8080\n[vip.backend.health_check]\nport = 9001\n",
    ));
    assert_eq!(c.vips[0].backends[0].health_check.port, 9001);
}
