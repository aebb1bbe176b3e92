//! `[agent.announce]`: absent is off, the defaults, each key's bounds and
//! the reserved values, every error naming the file, the line and the key.

use super::*;

/// `[agent.announce]` with `body` (lines 2..), then a VIP.
fn with(body: &str) -> String {
    format!("[agent.announce]\n{body}\n{HEAD}")
}

#[test]
fn absent_is_off_and_the_defaults_are_proto_200_on_lo() {
    assert_eq!(ok(HEAD).agent.start.announce, None);
    assert_eq!(
        ok(&with("table = 100")).agent.start.announce,
        Some(AnnounceSettings {
            table: 100,
            protocol: 200,
            device: "lo".into(),
        })
    );
    assert_eq!(
        ok(&with("table = 4294967295\nprotocol = 5\ndevice = \"ifb0\""))
            .agent
            .start
            .announce,
        Some(AnnounceSettings {
            table: u32::MAX,
            protocol: 5,
            device: "ifb0".into(),
        })
    );
    // The other bounds and the neighbours of the reserved values.
    for (t, p) in [(1, 255), (252, 6), (256, 199)] {
        let a = ok(&with(&format!("table = {t}\nprotocol = {p}")))
            .agent
            .start
            .announce
            .unwrap();
        assert_eq!((a.table, a.protocol), (t, p as u8));
    }
}

#[test]
fn the_kernels_tables_and_out_of_range_tables_are_refused() {
    for (t, name) in [(253, "default"), (254, "main"), (255, "local")] {
        let e = err(&with(&format!("table = {t}")));
        check(
            &e,
            2,
            "agent.announce.table",
            &format!("kernel's {name} table"),
        );
    }
    let e = err(&with("table = 0"));
    check(
        &e,
        2,
        "agent.announce.table",
        "0 is out of range 1..=4294967295",
    );
    let e = err(&with("table = 4294967296"));
    check(&e, 2, "agent.announce.table", "out of range");
    let e = err(&with("table = \"100\""));
    assert_eq!(e.line, Some(2), "{e}");
    assert_eq!(e.field.as_deref(), Some("agent.announce.table"), "{e}");
    // The rendered error: file:line:column: key: message.
    assert!(
        err(&with("table = 254"))
            .to_string()
            .starts_with("lb.toml:2:9: agent.announce.table: 254 is the kernel's main table"),
        "{}",
        err(&with("table = 254"))
    );
}

#[test]
fn a_table_is_required_in_the_announce_table() {
    let e = err(&with("protocol = 200"));
    assert_eq!(e.field.as_deref(), Some("agent.announce.table"), "{e}");
    assert!(e.line.is_some(), "{e}");
    assert!(e.message.contains("remove [agent.announce]"), "{e}");
}

#[test]
fn the_kernels_route_protocols_and_out_of_range_ones_are_refused() {
    for p in 0..=4 {
        let e = err(&with(&format!("table = 100\nprotocol = {p}")));
        check(&e, 3, "agent.announce.protocol", "reserved by the kernel");
    }
    let e = err(&with("table = 100\nprotocol = 256"));
    check(
        &e,
        3,
        "agent.announce.protocol",
        "256 is out of range 5..=255",
    );
    let e = err(&with("table = 100\nprotocol = -1"));
    check(
        &e,
        3,
        "agent.announce.protocol",
        "-1 is out of range 5..=255",
    );
}

#[test]
fn a_bad_device_name_or_an_unknown_key_is_refused() {
    for bad in ["", "a/b", "eth0:1", "a b", "sixteen-chars-xx"] {
        let e = err(&with(&format!("table = 100\ndevice = \"{bad}\"")));
        check(&e, 3, "agent.announce.device", "invalid interface name");
    }
    let e = err(&with("table = 100\ntabel = 100"));
    assert_eq!(e.line, Some(3), "{e}");
    assert!(e.to_string().contains("tabel"), "{e}");
}

#[test]
fn a_reload_that_changes_it_applies_the_vips_and_warns() {
    let old = ok(&with("table = 100"));
    let new = ok(&with("table = 101"));
    let w = reload_check(&old, &new).unwrap().expect("a warning");
    assert!(w.contains("[agent.announce]"), "{w}");
    assert_eq!(reload_check(&old, &old.clone()), Ok(None));
}
