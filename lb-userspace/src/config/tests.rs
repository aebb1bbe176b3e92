//! End-to-end tests of [`Config::parse`]: accepted files, defaults and
//! merging, and every rule's error with its position and field path
//! (those of the deserializer located by `raw`, the others by `validate`).

use std::{
    net::{IpAddr, Ipv4Addr},
    path::Path,
    time::Duration,
};

use super::{
    model::{DEFAULT_SYN_GUARD_RATE, SynGuardMode},
    raw::line_col,
    *,
};
use crate::maglev::is_prime;

/// The example of the module documentation.
const EXAMPLE: &str = r#"[agent]
instance = "default"                 # pin dir /sys/fs/bpf/lb/<instance>
interfaces = ["eth0"]
xdp_mode = "auto"                    # auto | native | skb
control_socket = "/run/lb/default.sock"
metrics_listen = "127.0.0.1:9100"
conntrack_entries = 1048576
max_vips = 64
max_backends = 4096
ring_size = 65537
conntrack_udp_idle_ms = 20000
conntrack_tcp_idle_ms = 7200000
conntrack_tcp_closing_ms = 5000
syn_guard = "always"
syn_guard_rate = 500

[[vip]]
name = "web"
address = "198.18.10.1"
port = 80
protocol = "tcp"
ring_size = 65537

[vip.health_check]
kind = "http"
port = 8080
interval_ms = 1000
timeout_ms = 500
rise = 2
fall = 3
path = "/healthz"
expected_status = 200
host = "web.example"

[vip.rate_limit]
new_per_source = 100
source_prefix_v4 = 24
packets_per_source = 5000
packets_per_source_burst = 9000
new_per_vip = 2000

[[vip.backend]]
address = "198.18.0.11"
weight = 1
state = "active"
mac = "02:00:00:00:00:11"
[vip.backend.health_check]
port = 8081
"#;

/// Lines 1-4: a VIP without backends.
const HEAD: &str = "[[vip]]\naddress = \"198.18.10.1\"\nport = 80\nprotocol = \"tcp\"\n";

fn parse(text: &str) -> Result<Config, ConfigError> {
    Config::parse(text, Path::new("lb.toml"))
}

fn ok(text: &str) -> Config {
    parse(text).unwrap_or_else(|e| panic!("unexpected error: {e}"))
}

fn err(text: &str) -> ConfigError {
    match parse(text) {
        Ok(c) => panic!("expected an error, got {c:#?}"),
        Err(e) => e,
    }
}

/// Asserts file, line, field, and a distinctive part of the message.
#[track_caller]
fn check(e: &ConfigError, line: usize, field: &str, needle: &str) {
    assert_eq!(e.file, Path::new("lb.toml"), "{e}");
    assert_eq!(e.line, Some(line), "{e}");
    assert!(e.column.is_some(), "{e}");
    assert_eq!(e.field.as_deref(), Some(field), "{e}");
    assert!(e.message.contains(needle), "{e:?} lacks {needle:?}");
}

fn tcp_check(port: u16) -> HealthCheck {
    HealthCheck {
        kind: HealthCheckKind::Tcp,
        port,
        interval: Duration::from_millis(1000),
        timeout: Duration::from_millis(500),
        rise: 2,
        fall: 3,
    }
}

#[test]
fn full_example() {
    let config = ok(EXAMPLE);
    let web_check = HealthCheck {
        kind: HealthCheckKind::Http {
            path: "/healthz".into(),
            expected_status: 200,
            host: Some("web.example".into()),
        },
        port: 8080,
        interval: Duration::from_millis(1000),
        timeout: Duration::from_millis(500),
        rise: 2,
        fall: 3,
    };
    let expected = Config {
        agent: AgentConfig {
            kernel: KernelSettings {
                instance: "default".into(),
                conntrack_entries: 1 << 20,
                max_vips: 64,
                max_backends: 4096,
                ring_size: 65537,
                nat_entries: lb_common::DEFAULT_NAT_ENTRIES,
                acl_entries: lb_common::acl::DEFAULT_ACL_ENTRIES,
            },
            start: StartSettings {
                interfaces: vec!["eth0".into()],
                xdp_mode: XdpModeSetting::Auto,
                control_socket: "/run/lb/default.sock".into(),
                control_group: None,
                metrics_listen: Some("127.0.0.1:9100".parse().unwrap()),
                announce: None,
                max_kernel_memory: crate::kernel_memory::DEFAULT_MAX_KERNEL_MEMORY,
            },
            conntrack: ConntrackSettings {
                udp_idle: Duration::from_secs(20),
                tcp_idle: Duration::from_secs(7200),
                tcp_closing: Duration::from_secs(5),
                syn_guard: SynGuardMode::Always,
                syn_guard_rate: 500,
            },
            encap: EncapSettings::default(),
            nat: NatSettings::default(),
        },
        vips: vec![VipConfig {
            name: "web".into(),
            address: IpAddr::V4(Ipv4Addr::new(198, 18, 10, 1)),
            port: 80,
            protocol: Protocol::Tcp,
            forwarding: Forwarding::DsrL2,
            icmp_echo: true,
            ring_size: 65537,
            health_check: web_check.clone(),
            backends: vec![BackendConfig {
                address: IpAddr::V4(Ipv4Addr::new(198, 18, 0, 11)),
                weight: 1,
                state: BackendState::Active,
                mac: Some([2, 0, 0, 0, 0, 0x11]),
                port: None,
                // Merged: only the port differs from the VIP's check.
                health_check: HealthCheck {
                    port: 8081,
                    ..web_check
                },
            }],
            snat_addresses: vec![],
            acl: Default::default(),
            rate_limit: RateLimitConfig {
                new_per_source: 100,
                new_per_source_burst: 10,
                packets_per_source: 5000,
                packets_per_source_burst: 9000,
                new_per_vip: 2000,
                new_per_vip_burst: 200,
                source_prefix_v4: 24,
                source_prefix_v6: 128,
            },
            scheduler: Default::default(),
        }],
        source: "lb.toml".into(),
    };
    assert_eq!(config, expected);
    assert_eq!(
        config.vips[0].key(),
        (IpAddr::V4(Ipv4Addr::new(198, 18, 10, 1)), 80, Protocol::Tcp)
    );
}

#[test]
fn minimal_config_gets_defaults() {
    let config = ok(r#"[[vip]]
address = "198.18.10.1"
port = 443
protocol = "tcp"
[[vip.backend]]
address = "198.18.0.11"
"#);
    assert_eq!(
        config.agent,
        AgentConfig {
            kernel: KernelSettings {
                instance: "default".into(),
                conntrack_entries: lb_common::DEFAULT_CONNTRACK_ENTRIES,
                max_vips: lb_common::DEFAULT_MAX_VIPS,
                max_backends: lb_common::DEFAULT_MAX_BACKENDS,
                ring_size: lb_common::DEFAULT_RING_SIZE,
                nat_entries: lb_common::DEFAULT_NAT_ENTRIES,
                acl_entries: lb_common::acl::DEFAULT_ACL_ENTRIES,
            },
            start: StartSettings {
                interfaces: vec![],
                xdp_mode: XdpModeSetting::Auto,
                control_socket: "/run/lb/default.sock".into(),
                control_group: None,
                metrics_listen: None,
                announce: None,
                max_kernel_memory: crate::kernel_memory::DEFAULT_MAX_KERNEL_MEMORY,
            },
            conntrack: ConntrackSettings {
                udp_idle: Duration::from_secs(30),
                tcp_idle: Duration::from_secs(3600),
                tcp_closing: Duration::from_secs(30),
                syn_guard: SynGuardMode::Auto,
                syn_guard_rate: DEFAULT_SYN_GUARD_RATE,
            },
            encap: EncapSettings {
                source_v4: None,
                source_v6: None,
                gue_port: 6080,
            },
            nat: NatSettings::default(),
        }
    );
    assert_eq!(
        config.vips,
        vec![VipConfig {
            name: "198.18.10.1:443/tcp".into(),
            address: IpAddr::V4(Ipv4Addr::new(198, 18, 10, 1)),
            port: 443,
            protocol: Protocol::Tcp,
            forwarding: Forwarding::DsrL2,
            icmp_echo: true,
            ring_size: lb_common::DEFAULT_RING_SIZE,
            health_check: tcp_check(443),
            backends: vec![BackendConfig {
                address: IpAddr::V4(Ipv4Addr::new(198, 18, 0, 11)),
                weight: 1,
                state: BackendState::Active,
                mac: None,
                port: None,
                health_check: tcp_check(443),
            }],
            snat_addresses: vec![],
            acl: Default::default(),
            rate_limit: RateLimitConfig::default(),
            scheduler: Default::default(),
        }]
    );
}

#[test]
fn empty_file_and_instance_dependent_socket() {
    let config = ok("");
    assert!(config.vips.is_empty());
    assert_eq!(config.agent.kernel.instance, "default");
    let config = ok("[agent]\ninstance = \"edge-1\"\nxdp_mode = \"skb\"\n");
    assert_eq!(
        config.agent.start.control_socket,
        Path::new("/run/lb/edge-1.sock")
    );
    assert_eq!(config.agent.start.xdp_mode, XdpModeSetting::Skb);
}

#[test]
fn vip_without_backends_is_allowed() {
    let config = ok(&format!("{HEAD}ring_size = 13\n"));
    assert!(config.vips[0].backends.is_empty());
    assert_eq!(config.vips[0].ring_size, 13);
}

#[test]
fn syntax_error() {
    let e = err("[agent]\ninstance = \"oops\ninterfaces = []\n");
    check(&e, 2, "agent.instance", "invalid basic string");
    assert_eq!(e.column, Some(17));

    let e = err(&format!(
        "{HEAD}[[vip.backend]]\naddress = \"198.18.0.1\"\nweight = \n"
    ));
    check(&e, 7, "vip[0].backend[0].weight", "");

    // Duplicate keys are syntax errors too.
    let e = err("[agent]\ninstance = \"a\"\ninstance = \"b\"\n");
    check(&e, 3, "agent.instance", "duplicate key");
}

#[test]
fn unknown_keys() {
    let e = err("[agent]\ninstance = \"a\"\ninterface = \"eth0\"\n");
    check(&e, 3, "agent.interface", "unknown field `interface`");
    assert_eq!(e.column, Some(1));

    let e = err("[agnt]\n");
    check(&e, 1, "agnt", "unknown field `agnt`");

    let text = format!(
        "{HEAD}[[vip]]\naddress = \"198.18.10.2\"\nport = 80\nprotocol = \"tcp\"\n\
         [[vip.backend]]\naddress = \"198.18.0.11\"\n[vip.backend.health_check]\nportt = 1\n"
    );
    let e = err(&text);
    check(
        &e,
        12,
        "vip[1].backend[0].health_check.portt",
        "unknown field `portt`",
    );

    // Inline tables are followed too.
    let e = err(&format!(
        "{HEAD}backend = [{{ address = \"198.18.0.1\", wieght = 2 }}]\n"
    ));
    check(&e, 5, "vip[0].backend[0].wieght", "unknown field `wieght`");
}

#[test]
fn wrong_types() {
    let e = err("[[vip]]\naddress = \"198.18.10.1\"\nport = \"80\"\nprotocol = \"tcp\"\n");
    check(
        &e,
        3,
        "vip[0].port",
        "invalid type: string \"80\", expected an integer",
    );
    assert_eq!(e.column, Some(8));

    let e = err("[agent]\ninterfaces = [\"eth0\", 5]\n");
    check(&e, 2, "agent.interfaces[1]", "expected a string");

    let e = err(&format!("{HEAD}[[vip.backend]]\naddress = 198\n"));
    check(&e, 6, "vip[0].backend[0].address", "expected a string");

    let e = err("vip = 3\n");
    check(&e, 1, "vip", "expected a sequence");
}

#[test]
fn missing_fields() {
    let e = err("[[vip]]\nport = 80\nprotocol = \"tcp\"\n");
    check(&e, 1, "vip[0].address", "missing field `address`");

    let e = err(&format!(
        "{HEAD}[[vip.backend]]\naddress = \"198.18.0.1\"\n[[vip.backend]]\nweight = 2\n"
    ));
    check(
        &e,
        7,
        "vip[0].backend[1].address",
        "missing field `address`",
    );
}

#[test]
fn duplicate_vip_points_at_the_second() {
    let text = format!(
        "{HEAD}[[vip]]\naddress = \"198.18.10.1\"\nport = 80\nprotocol = \"udp\"\n\
         [[vip]]\naddress = \"198.18.10.1\"\nport = 80\nprotocol = \"tcp\"\n"
    );
    let e = err(&text);
    check(
        &e,
        10,
        "vip[2].address",
        "duplicate VIP 198.18.10.1:80/tcp (already defined by vip[0] at line 2)",
    );
    assert_eq!(e.column, Some(11));
}

#[test]
fn duplicate_vip_name() {
    let text = format!(
        "{HEAD}[[vip]]\nname = \"198.18.10.1:80/tcp\"\naddress = \"198.18.10.2\"\nport = 80\nprotocol = \"tcp\"\n"
    );
    let e = err(&text);
    check(
        &e,
        6,
        "vip[1].name",
        "duplicate VIP name \"198.18.10.1:80/tcp\"",
    );
}

#[test]
fn duplicate_backend() {
    let text = format!(
        "{HEAD}[[vip.backend]]\naddress = \"198.18.0.11\"\n[[vip.backend]]\naddress = \"198.18.0.12\"\n\
         [[vip.backend]]\naddress = \"198.18.0.11\"\n"
    );
    let e = err(&text);
    check(
        &e,
        10,
        "vip[0].backend[2].address",
        "duplicate backend 198.18.0.11 (already defined by vip[0].backend[0] at line 6)",
    );
}

#[test]
fn weight_out_of_range() {
    let text = r#"[agent]
interfaces = ["eth0"]
[[vip]]
address = "198.18.10.1"
port = 80
protocol = "tcp"
[[vip.backend]]
address = "198.18.0.11"
[[vip]]
address = "198.18.10.2"
port = 53
protocol = "udp"
[[vip.backend]]
weight = 0
address = "198.18.0.12"
"#;
    let e = err(text);
    assert_eq!(
        e.to_string(),
        "lb.toml:14:10: vip[1].backend[0].weight: 0 is out of range 1..=10000"
    );
    let e = err(&format!(
        "{HEAD}[[vip.backend]]\naddress = \"198.18.0.1\"\nweight = 10001\n"
    ));
    check(
        &e,
        7,
        "vip[0].backend[0].weight",
        "10001 is out of range 1..=10000",
    );
}

#[test]
fn ring_sizes() {
    let e = err(&format!("{HEAD}ring_size = 65536\n"));
    check(
        &e,
        5,
        "vip[0].ring_size",
        "65536 is not prime (nearest primes: 65521, 65537)",
    );

    let e = err("[agent]\nring_size = 1000\n");
    check(
        &e,
        2,
        "agent.ring_size",
        "1000 is not prime (nearest primes: 997, 1009)",
    );

    let e = err(&format!("{HEAD}ring_size = 2\n"));
    check(&e, 5, "vip[0].ring_size", "2 is out of range 3..=655373");

    let e = err(&format!("[agent]\nring_size = 13\n{HEAD}ring_size = 17\n"));
    check(
        &e,
        7,
        "vip[0].ring_size",
        "17 is larger than agent.ring_size 13",
    );

    let e = err("[agent]\nmax_vips = 4096\n");
    check(&e, 2, "agent.max_vips", "more than the limit 268435456");

    let config = ok(&format!(
        "[agent]\nring_size = 655373\nmax_vips = 16\n{HEAD}ring_size = 3\n"
    ));
    assert_eq!(config.vips[0].ring_size, 3);
}

#[test]
fn ipv6_vips_and_backends_are_accepted_in_their_family() {
    let c = ok(concat!(
        "[agent]\nencap_source_v6 = \"2001:2::10\"\n",
        "[[vip]]\naddress = \"2001:2:1::1\"\nport = 80\nprotocol = \"tcp\"\n",
        "[[vip.backend]]\naddress = \"2001:2::11\"\n",
        "[[vip.backend]]\naddress = \"2001:2::12\"\n",
        "[[vip]]\naddress = \"198.18.10.1\"\nport = 80\nprotocol = \"tcp\"\nforwarding = \"ipip\"\n",
        "[[vip.backend]]\naddress = \"198.18.0.11\"\n",
        "[[vip.backend]]\naddress = \"2001:2::13\"\n",
        "[[vip]]\naddress = \"2001:2:1::2\"\nport = 53\nprotocol = \"udp\"\nforwarding = \"gue\"\n",
        "[[vip.backend]]\naddress = \"2001:2::14\"\n",
    ));
    let v6: IpAddr = "2001:2:1::1".parse().unwrap();
    assert_eq!(c.vips[0].address, v6);
    assert_eq!(
        c.vips[0].name, "[2001:2:1::1]:80/tcp",
        "bracketed by default"
    );
    assert_eq!(
        c.vips[0].backends[1].address,
        "2001:2::12".parse::<IpAddr>().unwrap()
    );
    // 4in6: an IPv4 tunnel VIP may have IPv6 backends.
    assert_eq!(
        c.vips[1].backends[1].address,
        "2001:2::13".parse::<IpAddr>().unwrap()
    );
    assert_eq!(c.agent.encap.source_v6, Some("2001:2::10".parse().unwrap()));
    assert_eq!(c.vips[2].forwarding, Forwarding::Gue);
}

#[test]
fn a_backend_of_the_wrong_family_is_refused_with_the_rule() {
    // dsr-l2 keeps the IP header: the backend must be of the VIP's family.
    let e = err(&format!("{HEAD}[[vip.backend]]\naddress = \"2001:2::1\"\n"));
    check(
        &e,
        6,
        "vip[0].backend[0].address",
        "backend 2001:2::1 is IPv6 but the VIP 198.18.10.1 is IPv4: forwarding = \"dsr-l2\" keeps the client's IP header",
    );
    let e = err(
        "[[vip]]\naddress = \"2001:2:1::1\"\nport = 80\nprotocol = \"tcp\"\n[[vip.backend]]\naddress = \"198.18.0.11\"\n",
    );
    check(
        &e,
        6,
        "vip[0].backend[0].address",
        "backend 198.18.0.11 is IPv4 but the VIP 2001:2:1::1 is IPv6",
    );
    // 6in4 is not supported.
    for mode in ["ipip", "gue"] {
        let e = err(&format!(
            "[[vip]]\naddress = \"2001:2:1::1\"\nport = 80\nprotocol = \"tcp\"\nforwarding = \"{mode}\"\n[[vip.backend]]\naddress = \"198.18.0.11\"\n"
        ));
        check(
            &e,
            7,
            "vip[0].backend[0].address",
            &format!("IPv6 in IPv4 is not supported (forwarding = \"{mode}\")"),
        );
    }
}

#[test]
fn unusable_ipv6_addresses_are_named() {
    for (addr, what) in [
        ("fe80::1", "a link-local address"),
        ("ff02::1", "a multicast address"),
        ("::", "the unspecified address"),
        ("::1", "a loopback address"),
        ("::ffff:198.18.0.1", "an IPv4-mapped address"),
    ] {
        let e = err(&format!(
            "[[vip]]\naddress = \"{addr}\"\nport = 80\nprotocol = \"tcp\"\n"
        ));
        check(
            &e,
            2,
            "vip[0].address",
            &format!("is {what}, not usable as a VIP address"),
        );
        let e = err(&format!(
            "[[vip]]\naddress = \"2001:2:1::1\"\nport = 80\nprotocol = \"tcp\"\n[[vip.backend]]\naddress = \"{addr}\"\n"
        ));
        check(
            &e,
            6,
            "vip[0].backend[0].address",
            &format!("is {what}, not usable as a backend address"),
        );
    }
    let e = err("[[vip]]\naddress = \"2001:2::zz\"\nport = 80\nprotocol = \"tcp\"\n");
    check(&e, 2, "vip[0].address", "invalid IP address \"2001:2::zz\"");
}

#[test]
fn duplicate_ipv6_vips_and_backends_are_refused() {
    let e = err(concat!(
        "[[vip]]\naddress = \"2001:2:1::1\"\nport = 80\nprotocol = \"tcp\"\n",
        "[[vip]]\naddress = \"2001:2:1:0::1\"\nport = 80\nprotocol = \"tcp\"\n",
    ));
    check(
        &e,
        6,
        "vip[1].address",
        "duplicate VIP [2001:2:1::1]:80/tcp (already defined by vip[0] at line 2)",
    );
    let e = err(concat!(
        "[[vip]]\naddress = \"2001:2:1::1\"\nport = 80\nprotocol = \"tcp\"\n",
        "[[vip.backend]]\naddress = \"2001:2::11\"\n",
        "[[vip.backend]]\naddress = \"2001:2:0::11\"\n",
    ));
    check(
        &e,
        8,
        "vip[0].backend[1].address",
        "duplicate backend 2001:2::11",
    );
}

#[test]
fn encap_source_v6_must_be_a_usable_ipv6_address() {
    for (value, needle) in [
        (
            "198.18.0.10",
            "expected an IPv6 address, got IPv4 address 198.18.0.10",
        ),
        (
            "fe80::1",
            "fe80::1 is a link-local address, not usable as a source address",
        ),
        ("ff02::1", "a multicast address"),
        ("lb.example", "invalid IPv6 address \"lb.example\""),
    ] {
        let e = err(&format!("[agent]\nencap_source_v6 = \"{value}\"\n"));
        check(&e, 2, "agent.encap_source_v6", needle);
    }
}

#[test]
fn invalid_ipv4_address() {
    let e = err("[[vip]]\naddress = \"198.18.10\"\nport = 80\nprotocol = \"tcp\"\n");
    check(&e, 2, "vip[0].address", "invalid IP address \"198.18.10\"");
    let e = err(&format!("{HEAD}[[vip.backend]]\naddress = \"0.0.0.0\"\n"));
    check(
        &e,
        6,
        "vip[0].backend[0].address",
        "0.0.0.0 is the unspecified address",
    );
    let e = err("[[vip]]\naddress = \"224.0.0.1\"\nport = 80\nprotocol = \"tcp\"\n");
    check(&e, 2, "vip[0].address", "multicast");
}

#[test]
fn bad_mac() {
    let backend = "[[vip.backend]]\naddress = \"198.18.0.11\"\n";
    let e = err(&format!("{HEAD}{backend}mac = \"02:00:00:00:00\"\n"));
    check(
        &e,
        7,
        "vip[0].backend[0].mac",
        "invalid MAC address \"02:00:00:00:00\"",
    );
    let e = err(&format!("{HEAD}{backend}mac = \"02:00:00:00:00:1g\"\n"));
    check(&e, 7, "vip[0].backend[0].mac", "invalid MAC address");
    let e = err(&format!("{HEAD}{backend}mac = \"ff:ff:ff:ff:ff:ff\"\n"));
    check(&e, 7, "vip[0].backend[0].mac", "not a unicast MAC address");
    let config = ok(&format!("{HEAD}{backend}mac = \"02-00-00-00-00-AB\"\n"));
    assert_eq!(config.vips[0].backends[0].mac, Some([2, 0, 0, 0, 0, 0xab]));
}

#[test]
fn bad_keywords() {
    let e = err("[[vip]]\naddress = \"198.18.10.1\"\nport = 80\nprotocol = \"icmp\"\n");
    check(
        &e,
        4,
        "vip[0].protocol",
        "invalid protocol \"icmp\", expected tcp or udp",
    );

    let e = err(&format!("{HEAD}[vip.health_check]\nkind = \"ping\"\n"));
    check(
        &e,
        6,
        "vip[0].health_check.kind",
        "invalid health check kind \"ping\", expected one of tcp, http, none",
    );

    let e = err(&format!(
        "{HEAD}[[vip.backend]]\naddress = \"198.18.0.1\"\nstate = \"down\"\n"
    ));
    check(
        &e,
        7,
        "vip[0].backend[0].state",
        "invalid backend state \"down\", expected active or drain",
    );

    let e = err("[agent]\nxdp_mode = \"turbo\"\n");
    check(
        &e,
        2,
        "agent.xdp_mode",
        "invalid xdp_mode \"turbo\", expected one of auto, native, skb",
    );
}

#[test]
fn timeout_greater_than_interval() {
    let e = err(&format!(
        "{HEAD}[vip.health_check]\ninterval_ms = 200\ntimeout_ms = 300\n"
    ));
    check(
        &e,
        7,
        "vip[0].health_check.timeout_ms",
        "timeout_ms 300 is greater than interval_ms 200",
    );

    // A backend override shortening the interval below the VIP's explicit timeout.
    let e = err(&format!(
        "{HEAD}[vip.health_check]\ntimeout_ms = 800\n[[vip.backend]]\naddress = \"198.18.0.1\"\n\
         [vip.backend.health_check]\ninterval_ms = 500\n"
    ));
    check(
        &e,
        10,
        "vip[0].backend[0].health_check.interval_ms",
        "interval_ms 500 is less than the timeout_ms 800 inherited from vip[0].health_check",
    );

    let e = err(&format!("{HEAD}[vip.health_check]\ntimeout_ms = 0\n"));
    check(
        &e,
        6,
        "vip[0].health_check.timeout_ms",
        "0 is out of range 1..=3600000",
    );

    let e = err(&format!("{HEAD}[vip.health_check]\ninterval_ms = 5\n"));
    check(
        &e,
        6,
        "vip[0].health_check.interval_ms",
        "5 is out of range 10..=3600000",
    );

    // An implicit timeout follows a short interval.
    let config = ok(&format!(
        "{HEAD}[vip.health_check]\ninterval_ms = 100\n[[vip.backend]]\naddress = \"198.18.0.1\"\n\
         [vip.backend.health_check]\ninterval_ms = 2000\n"
    ));
    assert_eq!(
        config.vips[0].health_check.timeout,
        Duration::from_millis(100)
    );
    assert_eq!(
        config.vips[0].backends[0].health_check.timeout,
        Duration::from_millis(500)
    );
}

#[test]
fn rise_and_fall_out_of_range() {
    let e = err(&format!("{HEAD}[vip.health_check]\nrise = 0\n"));
    check(
        &e,
        6,
        "vip[0].health_check.rise",
        "0 is out of range 1..=100",
    );
    let e = err(&format!(
        "{HEAD}[[vip.backend]]\naddress = \"198.18.0.1\"\n[vip.backend.health_check]\nfall = 101\n"
    ));
    check(
        &e,
        8,
        "vip[0].backend[0].health_check.fall",
        "101 is out of range 1..=100",
    );
}

#[test]
fn http_only_fields_with_other_kinds() {
    let e = err(&format!(
        "{HEAD}[vip.health_check]\nkind = \"tcp\"\npath = \"/x\"\n"
    ));
    check(
        &e,
        7,
        "vip[0].health_check.path",
        "path is only valid with kind = \"http\", but kind is \"tcp\"",
    );

    let e = err(&format!(
        "{HEAD}[vip.health_check]\nkind = \"none\"\nhost = \"a\"\n"
    ));
    check(&e, 7, "vip[0].health_check.host", "but kind is \"none\"");

    let e = err(&format!(
        "{HEAD}[vip.health_check]\nexpected_status = 204\n"
    ));
    check(
        &e,
        6,
        "vip[0].health_check.expected_status",
        "but kind defaults to \"tcp\"",
    );

    let e = err(&format!(
        "{HEAD}[[vip.backend]]\naddress = \"198.18.0.1\"\n[vip.backend.health_check]\npath = \"/\"\n"
    ));
    check(
        &e,
        8,
        "vip[0].backend[0].health_check.path",
        "but kind is \"tcp\" inherited from vip[0].health_check",
    );

    let e = err(&format!(
        "{HEAD}[vip.health_check]\nkind = \"http\"\npath = \"healthz\"\n"
    ));
    check(&e, 7, "vip[0].health_check.path", "must start with '/'");
    let e = err(&format!(
        "{HEAD}[vip.health_check]\nkind = \"http\"\nexpected_status = 99\n"
    ));
    check(
        &e,
        7,
        "vip[0].health_check.expected_status",
        "99 is out of range 100..=599",
    );
}

#[test]
fn health_check_override_merging() {
    let config = ok(&format!(
        "{HEAD}[vip.health_check]\nkind = \"http\"\npath = \"/ready\"\nrise = 5\n\
         [[vip.backend]]\naddress = \"198.18.0.1\"\n[vip.backend.health_check]\nkind = \"tcp\"\n\
         [[vip.backend]]\naddress = \"198.18.0.2\"\n[vip.backend.health_check]\nexpected_status = 204\nfall = 1\n\
         [[vip.backend]]\naddress = \"198.18.0.3\"\n"
    ));
    let vip = &config.vips[0];
    let http = |status| HealthCheckKind::Http {
        path: "/ready".into(),
        expected_status: status,
        host: None,
    };
    assert_eq!(vip.health_check.kind, http(200));
    assert_eq!(vip.health_check.rise, 5);
    // Switching to tcp drops the HTTP settings and keeps the rest.
    assert_eq!(
        vip.backends[0].health_check,
        HealthCheck {
            rise: 5,
            ..tcp_check(80)
        }
    );
    assert_eq!(
        vip.backends[1].health_check,
        HealthCheck {
            kind: http(204),
            rise: 5,
            fall: 1,
            ..tcp_check(80)
        }
    );
    assert_eq!(vip.backends[2].health_check, vip.health_check);

    // Switching a tcp VIP's backend to http starts from the HTTP defaults.
    let config = ok(&format!(
        "{HEAD}[[vip.backend]]\naddress = \"198.18.0.1\"\n[vip.backend.health_check]\nkind = \"http\"\nhost = \"h\"\n"
    ));
    assert_eq!(
        config.vips[0].backends[0].health_check.kind,
        HealthCheckKind::Http {
            path: "/".into(),
            expected_status: 200,
            host: Some("h".into())
        }
    );
    assert_eq!(config.vips[0].health_check.kind, HealthCheckKind::Tcp);
}

#[test]
fn invalid_instance_name() {
    let e = err("[agent]\ninstance = \"a/b\"\n");
    check(&e, 2, "agent.instance", "invalid instance name \"a/b\"");
    assert_eq!(e.column, Some(12));
    let long = "x".repeat(65);
    let e = err(&format!("[agent]\ninstance = \"{long}\"\n"));
    check(&e, 2, "agent.instance", "1 to 64 characters");
    let e = err("[agent]\ninstance = \"\"\n");
    check(&e, 2, "agent.instance", "invalid instance name");
    ok(&format!("[agent]\ninstance = \"{}\"\n", "A_-9".repeat(16)));
}

#[test]
fn other_agent_fields() {
    let e = err("[agent]\ninterfaces = [\"eth0\", \"eth0\"]\n");
    check(&e, 2, "agent.interfaces[1]", "listed twice");
    let e = err("[agent]\ninterfaces = [\"a-very-long-interface\"]\n");
    check(&e, 2, "agent.interfaces[0]", "invalid interface name");
    let e = err("[agent]\nmetrics_listen = \"localhost\"\n");
    check(
        &e,
        2,
        "agent.metrics_listen",
        "invalid socket address \"localhost\"",
    );
    let e = err("[agent]\nconntrack_entries = 268435457\n");
    check(
        &e,
        2,
        "agent.conntrack_entries",
        "out of range 1..=268435456",
    );
    let e = err("[agent]\nmax_backends = 0\n");
    check(&e, 2, "agent.max_backends", "0 is out of range 1..=1048576");
    let e = err("[agent]\nmax_vips = 2\nconntrack_udp_idle_ms = 999\n");
    check(
        &e,
        3,
        "agent.conntrack_udp_idle_ms",
        "999 is out of range 1000..=2592000000",
    );
    let e = err("[agent]\nconntrack_tcp_idle_ms = 2592000001\n");
    check(&e, 2, "agent.conntrack_tcp_idle_ms", "out of range");
    let e = err("[agent]\nconntrack_tcp_closing_ms = \"10s\"\n");
    check(&e, 2, "agent.conntrack_tcp_closing_ms", "");
    let rl = |table: &str| err(&format!("{HEAD}[vip.rate_limit]\n{table}\n"));
    check(
        &rl("new_per_source = 10000001"),
        6,
        "vip[0].rate_limit.new_per_source",
        "10000001 is out of range 0..=10000000",
    );
    check(
        &rl("new_per_vip_burst = 5"),
        6,
        "vip[0].rate_limit.new_per_vip_burst",
        "a burst without a rate: set new_per_vip too",
    );
    check(
        &rl("new_per_source = 5\nnew_per_source_burst = 0"),
        7,
        "vip[0].rate_limit.new_per_source_burst",
        "0 is out of range 1..=10000000",
    );
    check(
        &rl("source_prefix_v4 = 33"),
        6,
        "vip[0].rate_limit.source_prefix_v4",
        "33 is out of range 1..=32",
    );
    check(
        &rl("per_source = 5"),
        6,
        "vip[0].rate_limit.per_source",
        "unknown field `per_source`",
    );
    let e = err("[agent]\nsyn_guard = \"sometimes\"\n");
    check(
        &e,
        2,
        "agent.syn_guard",
        "invalid syn_guard \"sometimes\", expected one of auto, always, off",
    );
    let e = err("[agent]\nsyn_guard_rate = 9\n");
    check(
        &e,
        2,
        "agent.syn_guard_rate",
        "9 is out of range 10..=100000000",
    );
    let e = err(&format!(
        "[agent]\ncontrol_socket = \"/{}\"\n",
        "s".repeat(107)
    ));
    check(&e, 2, "agent.control_socket", "invalid socket path");
    let e = err("[agent]\ncontrol_group = \"lb admins\"\n");
    check(&e, 2, "agent.control_group", "invalid group \"lb admins\"");
    let e = err(&format!("{HEAD}port = 0\n"));
    // Duplicate key `port`: a syntax error, reported at the second one.
    check(&e, 5, "vip[0].port", "duplicate key");
    let e = err("[[vip]]\naddress = \"198.18.10.1\"\nport = 65536\nprotocol = \"tcp\"\n");
    check(&e, 3, "vip[0].port", "65536 is out of range 1..=65535");
}

#[test]
fn too_many_vips() {
    let vip =
        |i: u8| format!("[[vip]]\naddress = \"198.18.10.{i}\"\nport = 80\nprotocol = \"tcp\"\n");
    let text = format!("[agent]\nmax_vips = 2\n{}{}{}", vip(1), vip(2), vip(3));
    let e = err(&text);
    check(
        &e,
        11,
        "vip[2]",
        "too many VIPs: agent.max_vips is 2 and this is VIP number 3",
    );
    ok(&format!("[agent]\nmax_vips = 2\n{}{}", vip(1), vip(2)));
}

#[test]
fn too_many_backends() {
    let backend = |i: u8| format!("[[vip.backend]]\naddress = \"198.18.0.{i}\"\n");
    // Counted over all VIPs.
    let text = format!(
        "[agent]\nmax_backends = 2\n{HEAD}{}[[vip]]\naddress = \"198.18.10.2\"\nport = 80\nprotocol = \"tcp\"\n{}{}",
        backend(1),
        backend(1),
        backend(2)
    );
    let e = err(&text);
    check(
        &e,
        15,
        "vip[1].backend[1]",
        "too many backends: agent.max_backends is 2 and this is backend number 3",
    );

    let text = format!(
        "{HEAD}ring_size = 3\n{}{}{}{}",
        backend(1),
        backend(2),
        backend(3),
        backend(4)
    );
    let e = err(&text);
    check(&e, 12, "vip[0].backend[3]", "more backends than ring slots");
}

#[test]
fn columns_count_characters() {
    assert_eq!(line_col("", 0), (1, 1));
    assert_eq!(line_col("ab\ncd", 3), (2, 1));
    assert_eq!(line_col("ab\ncd", 4), (2, 2));
    assert_eq!(line_col("ab\ncd", 99), (2, 3));
    // "é" is two bytes, one column.
    assert_eq!(line_col("é = x", 5), (1, 5));
    let e = err("[agent]  # café\ninstance = \"é\" ; x = 1\n");
    assert_eq!(e.line, Some(2));
    assert_eq!(e.column, Some(16));
}

#[test]
fn load_from_file() {
    let dir = std::env::temp_dir().join(format!("lb-config-test-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let path = dir.join("lb.toml");
    std::fs::write(&path, EXAMPLE).unwrap();
    let config = Config::load(&path).unwrap();
    assert_eq!(config.source, path);
    std::fs::write(&path, "[agent]\nmax_vips = 0\n").unwrap();
    let e = Config::load(&path).unwrap_err();
    assert_eq!(e.file, path);
    assert_eq!(
        e.to_string(),
        format!(
            "{}:2:12: agent.max_vips: 0 is out of range 1..=65536",
            path.display()
        )
    );
    std::fs::remove_dir_all(&dir).unwrap();

    let e = Config::load(&dir.join("missing.toml")).unwrap_err();
    assert_eq!((e.line, e.field.as_deref()), (None, None));
    assert!(
        e.to_string()
            .contains("missing.toml: cannot read the configuration file"),
        "{e}"
    );
}

#[test]
fn icmp_echo_is_on_by_default_and_can_be_turned_off() {
    let c = ok(&format!(
        "{HEAD}icmp_echo = false\n[[vip]]\naddress = \"198.18.10.2\"\nport = 80\nprotocol = \"tcp\"\n"
    ));
    let echo: Vec<bool> = c.vips.iter().map(|v| v.icmp_echo).collect();
    assert_eq!(echo, [false, true]);
    let e = err(&format!("{HEAD}icmp_echo = \"yes\"\n"));
    check(&e, 5, "vip[0].icmp_echo", "");
}

#[test]
fn forwarding_modes_and_encap_settings() {
    let c = ok(&format!(
        "[agent]\nencap_source_v4 = \"198.18.0.10\"\ngue_port = 7000\n{HEAD}forwarding = \"gue\"\n[[vip]]\naddress = \"198.18.10.2\"\nport = 80\nprotocol = \"tcp\"\nforwarding = \"ipip\"\n[[vip]]\naddress = \"198.18.10.3\"\nport = 80\nprotocol = \"tcp\"\n"
    ));
    assert_eq!(
        c.agent.encap,
        EncapSettings {
            source_v4: Some(Ipv4Addr::new(198, 18, 0, 10)),
            source_v6: None,
            gue_port: 7000,
        }
    );
    let modes: Vec<Forwarding> = c.vips.iter().map(|v| v.forwarding).collect();
    assert_eq!(
        modes,
        [Forwarding::Gue, Forwarding::Ipip, Forwarding::DsrL2],
        "the default is dsr-l2"
    );

    let e = err(&format!("{HEAD}forwarding = \"snat\"\n"));
    check(
        &e,
        5,
        "vip[0].forwarding",
        "invalid forwarding \"snat\", expected one of dsr-l2, ipip, gue, nat",
    );
    assert_eq!(e.column, Some(14));
    let e = err(&format!("{HEAD}forwarding = 4\n"));
    check(&e, 5, "vip[0].forwarding", "");
    for (value, needle) in [
        ("0", "0 is out of range 1..=65535"),
        ("65536", "65536 is out of range 1..=65535"),
    ] {
        let e = err(&format!("[agent]\nmax_vips = 2\ngue_port = {value}\n"));
        check(&e, 3, "agent.gue_port", needle);
    }
    for (value, needle) in [
        (
            "2001:2::1",
            "expected an IPv4 address, got IPv6 address 2001:2::1",
        ),
        (
            "224.0.0.1",
            "224.0.0.1 is a multicast address, not usable as a source address",
        ),
        ("0.0.0.0", "the unspecified address"),
        ("lb.example", "invalid IPv4 address \"lb.example\""),
    ] {
        let e = err(&format!("[agent]\nencap_source_v4 = \"{value}\"\n"));
        check(&e, 2, "agent.encap_source_v4", needle);
    }
}

#[test]
fn reload_applies_encap_settings_live() {
    let old = ok("[agent]\n");
    let new = ok("[agent]\nencap_source_v4 = \"198.18.0.10\"\ngue_port = 7000\n");
    assert_eq!(reload_check(&old, &new), Ok(None));
}

#[test]
fn primes() {
    let small: Vec<u32> = (0..30).filter(|&n| is_prime(n)).collect();
    assert_eq!(small, [2, 3, 5, 7, 11, 13, 17, 19, 23, 29]);
    assert!(is_prime(65537) && is_prime(MAX_RING_SIZE) && !is_prime(65535));
}

/// Full NAT settings and their errors.
mod nat;

/// `allow` / `deny` and `acl_entries`.
mod acl;
#[test]
fn the_syn_guard_word_is_off_always_or_a_per_tick_threshold() {
    let tick = Duration::from_millis(100);
    let with = |syn_guard, syn_guard_rate| ConntrackSettings {
        syn_guard,
        syn_guard_rate,
        ..ConntrackSettings::default()
    };
    assert_eq!(with(SynGuardMode::Off, 10_000).syn_guard_word(tick), 0);
    assert_eq!(with(SynGuardMode::Always, 10_000).syn_guard_word(tick), 1);
    // 10 000 SYNs/s = 1000 per 100 ms tick: the 1001st is unrecorded.
    assert_eq!(with(SynGuardMode::Auto, 10_000).syn_guard_word(tick), 1001);
    // Below one SYN per tick: still at least one recorded per tick.
    assert_eq!(with(SynGuardMode::Auto, 10).syn_guard_word(tick), 2);
    assert_eq!(ConntrackSettings::default().syn_guard, SynGuardMode::Auto);
}
mod sched;

/// `[agent.announce]`: table, protocol and device, good and bad.
mod announce;

/// `max_kernel_memory`: the cap on the maps' total, and `lb config show`'s
/// round trip.
mod memory;
