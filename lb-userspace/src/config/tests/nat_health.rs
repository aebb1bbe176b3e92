//! A NAT backend's own port is where its health check goes, unless the
//! check names a port.

use super::*;

#[test]
fn a_nat_backend_on_its_own_port_is_checked_there() {
    let c = ok(r#"[[vip]]
address = "198.18.0.100"
port = 80
protocol = "tcp"
forwarding = "nat"
[vip.health_check]
kind = "tcp"

[[vip.backend]]
address = "198.18.2.10"
port = 8080

[[vip.backend]]
address = "198.18.2.11"

[[vip.backend]]
address = "198.18.2.12"
port = 8080
[vip.backend.health_check]
port = 9000
"#);
    let ports: Vec<u16> = c.vips[0]
        .backends
        .iter()
        .map(|b| b.health_check.port)
        .collect();
    assert_eq!(ports, [8080, 80, 9000]);
    // A port the VIP's check names wins.
    let c = ok(r#"[[vip]]
address = "198.18.0.100"
port = 80
protocol = "tcp"
forwarding = "nat"
[vip.health_check]
kind = "tcp"
port = 7000

[[vip.backend]]
address = "198.18.2.10"
port = 8080
"#);
    assert_eq!(c.vips[0].backends[0].health_check.port, 7000);
}
