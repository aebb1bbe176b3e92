//! The core with ACLs: the ACL is in force before a new VIP's entry
//! exists and gone only after a removed VIP's entry is, a reload switches
//! banks, a restart adopts what the maps hold and writes nothing, and the
//! views say what the kernel does.

use std::path::Path;

use lb_common::acl::{ACL_DEFAULT_DENY, acl_bank};

use super::*;
use crate::{
    acl::{AclMaps, Cidr},
    control::VipView,
};

/// VIP "v1" 198.19.0.1:80 over 198.18.0.11 and .12 with `lists`; a second
/// VIP "v2" without an ACL when `second`.
fn acl_config(lists: &str, second: bool) -> Config {
    let v2 = if second {
        "[[vip]]\nname = \"v2\"\naddress = \"198.19.0.2\"\nport = 80\nprotocol = \"tcp\"\nring_size = 251\n[[vip.backend]]\naddress = \"198.18.0.13\"\n"
    } else {
        ""
    };
    let text = format!(
        "[agent]\nmax_vips = 4\nmax_backends = 16\nring_size = {M}\n\
         [[vip]]\nname = \"v1\"\naddress = \"198.19.0.1\"\nport = 80\nprotocol = \"tcp\"\nring_size = {M}\n{lists}\n\
         [[vip.backend]]\naddress = \"198.18.0.11\"\n\
         [[vip.backend]]\naddress = \"198.18.0.12\"\n{v2}"
    );
    Config::parse(&text, Path::new("test.toml")).unwrap_or_else(|e| panic!("{e}\n{text}"))
}

/// The prefixes of VIP `index`'s bank in force in the fake maps, None
/// when its word is 0.
fn in_force(maps: &FakeMaps, index: u32) -> Option<Vec<(Cidr, u32)>> {
    let w = maps.acl_words.get(&index).copied().unwrap_or(0);
    (w != 0).then(|| {
        maps.acl_prefixes
            .iter()
            .filter(|((i, b, _), _)| *i == index && *b == acl_bank(w))
            .map(|((_, _, c), v)| (*c, *v))
            .collect()
    })
}

fn v1_present(maps: &FakeMaps) -> Option<u32> {
    maps.vips
        .iter()
        .find(|(k, i)| {
            !i.is_address_only()
                && matches!(k, crate::reconcile::VipEntryKey::V4(k) if k.addr == u32::from_ne_bytes([198, 19, 0, 1]))
        })
        .map(|(_, i)| i.index)
}

#[test]
fn a_new_vips_acl_is_in_force_before_its_entry_at_every_write() {
    let cfg = acl_config(
        "allow = [\"198.18.0.0/16\"]\ndeny = [\"198.18.5.0/24\"]",
        false,
    );
    let want = cfg.vips[0].acl.entries().into_iter().collect::<Vec<_>>();
    let mut k = 0;
    loop {
        let mut maps = FakeMaps::new(4, M, 16);
        maps.fail_after = Some(k);
        let image = maps.read_image().unwrap();
        let mut core = Core::new(cfg.clone(), maps, image);
        core.on_next_hops(FakeNeighbours::all().batch(&core));
        let done = core.reconcile().is_ok();
        if let Some(index) = v1_present(&core.maps) {
            assert_eq!(
                in_force(&core.maps, index).as_ref(),
                Some(&want),
                "after {k} writes"
            );
        }
        if done {
            break;
        }
        k += 1;
    }
    assert!(k > 3, "the run wrote the ACL and the VIP");
}

#[test]
fn a_removed_vips_acl_goes_only_after_its_entry_at_every_write() {
    let with = acl_config("deny = [\"198.18.5.0/24\"]", true);
    // v1 goes away; v2 stays.
    let without = {
        let mut c = with.clone();
        c.vips.remove(0);
        c
    };
    let base = started(with, FakeMaps::new(4, M, 16));
    let index = v1_present(&base.maps).expect("v1 installed");
    let mut k = base.maps.writes;
    loop {
        let mut core = started(base.cfg.clone(), base.maps.clone());
        core.maps.fail_after = Some(k);
        let done = core.apply_reload(without.clone()).is_ok() && core.after_change().is_ok();
        if v1_present(&core.maps).is_some() {
            assert!(in_force(&core.maps, index).is_some(), "after {k} writes");
        }
        if done {
            assert_eq!(in_force(&core.maps, index), None);
            assert!(core.maps.acl_prefixes.is_empty());
            break;
        }
        k += 1;
    }
}

#[test]
fn a_reload_switches_banks_and_a_restart_adopts_the_acl_and_writes_nothing() {
    let a = acl_config("deny = [\"198.18.5.0/24\"]", false);
    let mut core = started(a.clone(), FakeMaps::new(4, M, 16));
    let index = v1_present(&core.maps).unwrap();
    let w0 = core.maps.acl_words[&index];
    assert_eq!(w0 & ACL_DEFAULT_DENY, 0, "deny-only: default allow");
    let b = acl_config(
        "allow = [\"198.18.0.0/16\"]\ndeny = [\"198.18.6.0/24\"]",
        false,
    );
    reload(&mut core, b.clone());
    let w1 = core.maps.acl_words[&index];
    assert_ne!(acl_bank(w1), acl_bank(w0));
    assert_ne!(w1 & ACL_DEFAULT_DENY, 0);
    assert_eq!(
        in_force(&core.maps, index).unwrap(),
        b.vips[0].acl.entries().into_iter().collect::<Vec<_>>()
    );
    assert_eq!(core.maps.acl_prefixes.len(), 2, "the old bank is empty");
    // A new agent on the same maps: adopts, writes nothing.
    let maps = core.into_maps();
    let writes = maps.writes;
    let restarted = started(b.clone(), maps);
    assert_eq!(restarted.maps.writes, writes);
    // ... and its next reload switches back to the other bank.
    let mut restarted = restarted;
    reload(&mut restarted, a);
    let w2 = restarted.maps.acl_words[&index];
    assert_eq!(acl_bank(w2), acl_bank(w0));
    assert_eq!(restarted.maps.acl_read().unwrap(), restarted.image.acl);
    assert_eq!(restarted.maps.acl_prefixes.len(), 1);
}

#[test]
fn explain_and_vip_list_say_what_the_acl_does() {
    let cfg = acl_config(
        "allow = [\"198.18.0.0/16\"]\ndeny = [\"198.18.5.0/24\"]",
        false,
    );
    let core = started(cfg, FakeMaps::new(4, M, 16));
    let vip: SocketAddr = "198.19.0.1:80".parse().unwrap();
    let denied = explain_tcp(&core, "198.18.5.9:1234".parse().unwrap(), vip);
    let a = denied.acl.clone().unwrap();
    assert!(!a.allowed);
    assert_eq!(a.by, "deny 198.18.5.0/24");
    assert_eq!(denied.backend, None);
    assert!(
        denied.reason.contains("drop_acl_denied"),
        "{}",
        denied.reason
    );
    let allowed = explain_tcp(&core, "198.18.1.9:1234".parse().unwrap(), vip);
    assert_eq!(allowed.acl.unwrap().by, "allow 198.18.0.0/16");
    assert!(allowed.backend.is_some());
    let default = explain_tcp(&core, "198.20.1.9:1234".parse().unwrap(), vip);
    let d = default.acl.unwrap();
    assert!(!d.allowed);
    assert!(d.by.starts_with("default"), "{}", d.by);
    let list: Vec<VipView> =
        serde_json::from_value(core.ask(Request::VipList).unwrap().data).unwrap();
    assert_eq!((list[0].acl_allow, list[0].acl_deny), (1, 1));
}
