use super::*;
use crate::kernel_memory::{self as km, DEFAULT_MAX_KERNEL_MEMORY};

/// The maps' total for `cfg` on this host, as the validation computes it.
fn total_of(cfg: &Config) -> u64 {
    km::total(&km::plan(cfg.agent.kernel.map_sizes(), km::possible_cpus()).unwrap())
}

#[test]
fn the_defaults_fit_comfortably_under_the_default_cap() {
    let cfg = ok("");
    assert_eq!(cfg.agent.start.max_kernel_memory, DEFAULT_MAX_KERNEL_MEMORY);
    assert!(total_of(&cfg) < DEFAULT_MAX_KERNEL_MEMORY / 4);
}

#[test]
fn just_under_the_cap_passes_just_over_fails_naming_cap_and_total() {
    let total = total_of(&ok(""));
    let at = ok(&format!("[agent]\nmax_kernel_memory = {total}\n"));
    assert_eq!(at.agent.start.max_kernel_memory, total);
    let e = err(&format!("[agent]\nmax_kernel_memory = {}\n", total - 1));
    // No size written: located at the cap.
    check(
        &e,
        2,
        "agent.max_kernel_memory",
        &format!("({total} bytes)"),
    );
    assert!(
        e.message
            .contains(&format!("max_kernel_memory {}", km::human(total - 1))),
        "{e}"
    );
    assert!(e.message.contains(&format!("({} bytes)", total - 1)), "{e}");
    assert!(e.message.contains("biggest: CONNTRACK6"), "{e}");
}

#[test]
fn a_big_conntrack_is_refused_at_its_key() {
    // 2^28 flows in each family: well over the default 4 GiB.
    let e = err("[agent]\nmax_vips = 8\nconntrack_entries = 268435456\n");
    check(
        &e,
        3,
        "agent.conntrack_entries",
        "more than max_kernel_memory 4.00 GiB",
    );
    assert!(e.message.contains("(4294967296 bytes)"), "{e}");
    assert!(e.message.contains("CONNTRACK6"), "{e}");
    assert!(e.message.contains("CONNTRACK "), "{e}");
    // A cap that covers it lets it through.
    let cfg = ok("[agent]\nconntrack_entries = 268435456\nmax_kernel_memory = \"1TiB\"\n");
    assert_eq!(cfg.agent.start.max_kernel_memory, 1 << 40);
    // Rings: max_vips * ring_size under its slot limit but over a small cap.
    let e = err("[agent]\nmax_vips = 2048\nring_size = 65537\nmax_kernel_memory = \"1GiB\"\n");
    check(&e, 3, "agent.ring_size", "biggest: RINGS");
}

#[test]
fn max_kernel_memory_values() {
    for (text, bytes) in [
        ("\"2GiB\"", 2u64 << 30),
        ("\"512 MiB\"", 512 << 20),
        ("1073741824", 1 << 30),
    ] {
        let cfg = ok(&format!("[agent]\nmax_kernel_memory = {text}\n"));
        assert_eq!(cfg.agent.start.max_kernel_memory, bytes, "{text}");
    }
    for bad in ["\"2GB\"", "\"lots\"", "-1", "1000", "\"1KiB\""] {
        let e = err(&format!("[agent]\nmax_kernel_memory = {bad}\n"));
        check(&e, 2, "agent.max_kernel_memory", "invalid size");
    }
    for bad in ["1.5", "true", "[1]"] {
        let e = err(&format!("[agent]\nmax_kernel_memory = {bad}\n"));
        check(
            &e,
            2,
            "agent.max_kernel_memory",
            "expected bytes (an integer) or a string like \"4GiB\"",
        );
    }
}

/// `render_toml`, parsed again, gives the same Config.
#[track_caller]
fn round_trip(cfg: &Config) {
    let text = render_toml(cfg);
    let again = Config::parse(&text, &cfg.source)
        .unwrap_or_else(|e| panic!("lb config show's output does not parse: {e}\n{text}"));
    assert_eq!(&again, cfg, "{text}");
    // Every default written out: the output shows itself unchanged.
    assert_eq!(render_toml(&again), text);
}

#[test]
fn config_show_round_trips_with_defaults_filled_in() {
    let minimal = ok(HEAD);
    let text = render_toml(&minimal);
    for key in [
        "conntrack_entries = 1048576",
        "max_kernel_memory = \"4GiB\"",
        "control_socket = \"/run/lb/default.sock\"",
        "nat_port_range = \"61000-65535\"",
        "syn_guard = \"auto\"",
        "forwarding = \"dsr-l2\"",
        "scheduler = \"maglev\"",
        "interval_ms = 1000",
    ] {
        assert!(text.contains(key), "{key:?} missing from\n{text}");
    }
    round_trip(&minimal);
    round_trip(&ok(""));
    round_trip(&ok(EXAMPLE));
    let dir = Path::new(env!("CARGO_MANIFEST_DIR")).join("../examples");
    for f in ["lb.toml", "nat.toml"] {
        round_trip(&Config::load(&dir.join(f)).unwrap_or_else(|e| panic!("{e}")));
    }
    round_trip(&ok(r#"[agent]
interfaces = ["eth0", "eth1"]
control_group = "lbadmin"
max_kernel_memory = 3000000000
snat_addresses = ["198.18.1.1"]
encap_source_v4 = "198.18.0.10"

[agent.announce]
table = 100

[[vip]]
address = "198.18.10.1"
port = 80
protocol = "tcp"
forwarding = "ipip"
icmp_echo = false
ring_size = 1031
scheduler = "least_connections"
allow = ["198.18.0.0/15"]
deny = ["198.18.66.0/24"]

[vip.health_check]
kind = "none"

[[vip.backend]]
address = "198.18.0.11"
weight = 7
state = "drain"
[vip.backend.health_check]
kind = "http"
path = "/up"

[[vip.backend]]
address = "198.18.0.12"

[[vip]]
address = "198.18.10.2"
port = 53
protocol = "udp"
forwarding = "nat"
snat_addresses = ["198.18.1.2"]

[vip.rate_limit]
new_per_vip = 10

[[vip.backend]]
address = "198.18.0.21"
port = 5353
"#));
}
