//! Source access control: a VIP's `allow` and `deny` lists and
//! `[agent] acl_entries`; every rejection names the VIP, the entry, the
//! line and the field.

use super::*;

/// A VIP named "web" (lines 1-5), then `lists` (from line 6).
fn acl_vip(address: &str, lists: &str) -> String {
    format!(
        "[[vip]]\nname = \"web\"\naddress = \"{address}\"\nport = 80\nprotocol = \"tcp\"\n{lists}"
    )
}

#[test]
fn lists_resolve_sorted_and_deduplicated_across_nothing() {
    let c = ok(&acl_vip(
        "198.18.10.1",
        "allow = [\"198.18.2.0/24\", \"198.18.0.0/16\"]\ndeny = [\"198.18.2.7\"]\n",
    ));
    let acl = &c.vips[0].acl;
    assert_eq!(
        acl.allow,
        [
            "198.18.0.0/16".parse().unwrap(),
            "198.18.2.0/24".parse().unwrap()
        ]
    );
    assert_eq!(acl.deny, ["198.18.2.7/32".parse().unwrap()]);
    assert!(acl.default_deny());
    let v6 = ok(&acl_vip("2001:2::1", "deny = [\"2001:2:0:5::/64\"]\n"));
    assert!(!v6.vips[0].acl.default_deny());
    assert!(ok(HEAD).vips[0].acl.is_empty());
    assert_eq!(
        ok(HEAD).agent.kernel.acl_entries,
        lb_common::acl::DEFAULT_ACL_ENTRIES
    );
}

#[test]
fn a_malformed_prefix_names_the_vip_and_the_entry() {
    let e = err(&acl_vip(
        "198.18.10.1",
        "allow = [\"198.18.0.0/16\", \"198.18.0.0/33\"]\n",
    ));
    check(
        &e,
        6,
        "vip[0].allow[1]",
        "VIP \"web\": allow entry \"198.18.0.0/33\"",
    );
    assert!(e.message.contains("longer than 32 bits"), "{e}");
    let e = err(&acl_vip("198.18.10.1", "deny = [\"nope\"]\n"));
    check(&e, 6, "vip[0].deny[0]", "not an IPv4 or IPv6 address");
}

#[test]
fn host_bits_are_refused() {
    let e = err(&acl_vip("198.18.10.1", "deny = [\"198.18.1.1/24\"]\n"));
    check(
        &e,
        6,
        "vip[0].deny[0]",
        "has host bits set (the prefix is 198.18.1.0/24)",
    );
}

#[test]
fn a_prefix_of_the_other_family_is_refused() {
    let e = err(&acl_vip("198.18.10.1", "allow = [\"2001:2::/48\"]\n"));
    check(
        &e,
        6,
        "vip[0].allow[0]",
        "an IPv6 prefix, but the VIP's address 198.18.10.1 is IPv4",
    );
    let e = err(&acl_vip("2001:2::1", "deny = [\"198.18.0.0/15\"]\n"));
    check(&e, 6, "vip[0].deny[0]", "an IPv4 prefix");
}

#[test]
fn the_same_prefix_in_both_lists_or_twice_is_refused() {
    let e = err(&acl_vip(
        "198.18.10.1",
        "allow = [\"198.18.0.0/16\"]\ndeny = [\"198.18.1.0/24\", \"198.18.0.0/16\"]\n",
    ));
    check(&e, 7, "vip[0].deny[1]", "the same prefix as allow[0]");
    let e = err(&acl_vip(
        "198.18.10.1",
        "allow = [\"198.18.0.0/16\", \"198.18.0.0/16\"]\n",
    ));
    check(&e, 6, "vip[0].allow[1]", "the same prefix as allow[0]");
}

fn prefixes(n: usize) -> String {
    let list: Vec<String> = (0..n)
        .map(|i| {
            format!(
                "\"198.{}.{}.{}/32\"",
                18 + (i >> 16),
                (i >> 8) & 255,
                i & 255
            )
        })
        .collect();
    list.join(",")
}

#[test]
fn more_than_100_000_prefixes_on_one_vip_are_refused() {
    let e = err(&acl_vip(
        "198.18.10.1",
        &format!(
            "allow = [{}]\ndeny = [\"198.30.0.0/16\"]\n",
            prefixes(100_000)
        ),
    ));
    check(
        &e,
        6,
        "vip[0].allow",
        "VIP \"web\" has 100001 allow and deny prefixes, more than the 100000",
    );
    // Exactly the limit is fine.
    let c = ok(&acl_vip(
        "198.18.10.1",
        &format!("allow = [{}]\n", prefixes(100_000)),
    ));
    assert_eq!(c.vips[0].acl.len(), 100_000);
}

#[test]
fn too_many_prefixes_in_total_name_acl_entries() {
    let text = format!(
        "[agent]\nacl_entries = 10\n{}{}",
        acl_vip(
            "198.18.10.1",
            "allow = [\"198.18.0.0/16\", \"198.18.1.0/24\", \"198.18.2.0/24\"]\n"
        ),
        "[[vip]]\nname = \"api\"\naddress = \"198.18.10.2\"\nport = 80\nprotocol = \"tcp\"\ndeny = [\"198.18.4.0/24\", \"198.18.5.0/24\", \"198.18.6.0/24\", \"198.18.7.0/24\"]\n"
    );
    let e = err(&text);
    check(
        &e,
        2,
        "agent.acl_entries",
        "4) during a reload they need 11 trie entries, more than acl_entries = 10",
    );
    assert!(e.message.contains("VIP \"api\""), "{e}");
    // 7 + 4 fit in 11.
    ok(&text.replace("acl_entries = 10", "acl_entries = 11"));
    let e = err("[agent]\nacl_entries = 0\n");
    check(&e, 2, "agent.acl_entries", "out of range");
}

#[test]
fn acl_entries_change_only_with_a_restart() {
    let a = ok(HEAD);
    let b = ok(&format!("[agent]\nacl_entries = 1000\n{HEAD}"));
    let e = model::reload_check(&a, &b).unwrap_err();
    assert!(e.contains("acl_entries"), "{e}");
    // An ACL changes live.
    let c = ok(&format!("{HEAD}deny = [\"198.18.0.0/15\"]\n"));
    assert_eq!(model::reload_check(&a, &c), Ok(None));
}
