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
}
