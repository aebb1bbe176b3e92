//! The example configuration shipped in the README stays valid.

use std::path::Path;

#[test]
fn the_documented_example_parses() {
    let path = Path::new(env!("CARGO_MANIFEST_DIR")).join("../examples/lb.toml");
    let cfg = lb::config::Config::load(&path).unwrap_or_else(|e| panic!("{e}"));
    assert_eq!(cfg.vips.len(), 3);
    assert!(cfg.vips[2].address.is_ipv6());
    assert!(cfg.agent.encap.source_v6.is_some());
    assert_eq!(cfg.vips[0].backends.len(), 3);
    assert_eq!(cfg.vips[0].backends[2].health_check.port, 8080);
    assert_eq!(cfg.vips[0].backends[0].health_check.port, 80);
    let announce = cfg.agent.start.announce.expect("[agent.announce]");
    assert_eq!((announce.table, announce.protocol), (100, 200));
}

#[test]
fn the_nat_example_parses() {
    use lb::config::Forwarding;
    let path = Path::new(env!("CARGO_MANIFEST_DIR")).join("../examples/nat.toml");
    let cfg = lb::config::Config::load(&path).unwrap_or_else(|e| panic!("{e}"));
    assert_eq!(cfg.vips.len(), 3);
    assert!(cfg.vips.iter().all(|v| v.forwarding == Forwarding::Nat));
    assert_eq!(cfg.vips[0].backends[0].port, Some(8080));
    assert_eq!(cfg.vips[0].backends[0].health_check.port, 8080);
    assert_eq!(
        cfg.vips[0].snat_addresses,
        vec!["198.18.1.1".parse::<std::net::IpAddr>().unwrap()]
    );
    assert_eq!(
        cfg.vips[1].snat_addresses,
        vec!["198.18.1.2".parse::<std::net::IpAddr>().unwrap()]
    );
    assert_eq!(
        cfg.vips[2].snat_addresses,
        vec!["2001:2:0:1::1".parse::<std::net::IpAddr>().unwrap()]
    );
    assert_eq!(cfg.agent.start.interfaces.len(), 2);
}
