//! The core with schedulers: the slots it writes (usable, non-drained
//! backends only), a reload that changes the scheduler (no ring write,
//! no backend moved), `lb explain` and `lb backend list` for least
//! connections.

use lb_common::sched::{SCHED_LEAST_CONNECTIONS, SCHED_MAGLEV, SCHED_ROUND_ROBIN};

use super::*;
use crate::sched::Scheduler;

fn with_scheduler(mut cfg: Config, s: Scheduler) -> Config {
    cfg.vips[0].scheduler = s;
    cfg
}

fn sched_of(core: &Core<FakeMaps>) -> crate::sched::VipSched {
    core.image.sched[&vip_info(core).index].clone()
}

fn slot_ids(core: &Core<FakeMaps>) -> Vec<u32> {
    let s = sched_of(core);
    s.slots[..s.info.len as usize]
        .iter()
        .map(|s| s.backend_id)
        .collect()
}

#[test]
fn a_scheduler_change_rewrites_its_slots_not_the_ring_and_skips_drained_and_down_backends() {
    let cfg = config(&[(11, 1), (12, 2), (13, 1)]);
    let mut core = started(cfg.clone(), FakeMaps::new(4, M, 16));
    assert_eq!(sched_of(&core).info.kind, SCHED_MAGLEV);
    let ring = core.image.rings.clone();
    reload(
        &mut core,
        with_scheduler(cfg.clone(), Scheduler::RoundRobin),
    );
    assert_eq!(core.image.rings, ring, "the ring does not move");
    assert_eq!(sched_of(&core).info.kind, SCHED_ROUND_ROBIN);
    let ids: Vec<u32> = [11, 12, 13].map(|b| core.backend(b).id).to_vec();
    assert_eq!(slot_ids(&core), ids);
    // Drained (weight 0) and down backends leave the rotation.
    core.request(Request::BackendDrain {
        vip: "v1".into(),
        address: ip4(198, 18, 0, 12),
    })
    .unwrap();
    core.health(13, false);
    assert_eq!(slot_ids(&core), [ids[0]]);
    // The kernel image read back (a restart) holds the same scheduler.
    let back = core.maps.read_image().unwrap();
    assert_eq!(
        back.sched[&vip_info(&core).index].info,
        sched_of(&core).info
    );
}

#[test]
fn explain_and_backend_list_show_least_connections_counts() {
    let cfg = with_scheduler(
        config(&[(11, 1), (12, 2), (13, 1)]),
        Scheduler::LeastConnections,
    );
    let mut core = started(cfg, FakeMaps::new(4, M, 16));
    assert_eq!(sched_of(&core).info.kind, SCHED_LEAST_CONNECTIONS);
    let id = |core: &Core<FakeMaps>, b| core.backend(b).id;
    // 11: 4/1, 12: 6/2 (least), 13: 5/1.
    for (b, n) in [(11, 4), (12, 6), (13, 5)] {
        let i = id(&core, b);
        core.maps.lc_counts.insert(i, n);
    }
    assert_eq!(core.backend(12).active_connections, Some(6));
    let e = explain_tcp(
        &core,
        "198.18.1.1:40000".parse().unwrap(),
        "198.19.0.1:80".parse().unwrap(),
    );
    assert_eq!(e.scheduler, Scheduler::LeastConnections);
    assert_eq!(e.backend, Some(ip4(198, 18, 0, 12)));
    assert_eq!(e.reason, "new flow: least_connections decides");
    let state = e.scheduler_state.unwrap();
    assert!(
        state.contains("198.18.0.11 4/1, 198.18.0.12 6/2, 198.18.0.13 5/1"),
        "{state}"
    );
    // A maglev VIP shows no counts.
    let cfg = config(&[(11, 1)]);
    let core = started(cfg, FakeMaps::new(4, M, 16));
    assert_eq!(core.backend(11).active_connections, None);
}

#[test]
fn adding_a_backend_past_the_schedulers_limit_is_refused_and_changes_nothing() {
    let mut text = format!(
        "[agent]\nmax_vips = 4\nmax_backends = 100\nring_size = {M}\n\
         [[vip]]\nname = \"v1\"\naddress = \"198.19.0.1\"\nport = 80\nprotocol = \"tcp\"\n\
         ring_size = {M}\nscheduler = \"least_connections\"\n[vip.health_check]\nkind = \"tcp\"\n"
    );
    for b in 1..=64 {
        text += &format!("[[vip.backend]]\naddress = \"198.18.0.{b}\"\n");
    }
    let cfg = Config::parse(&text, std::path::Path::new("test.toml")).unwrap();
    let mut core = started(cfg, FakeMaps::new(4, M, 100));
    let before = core.image.clone();
    let err = core
        .request(Request::BackendAdd {
            vip: "v1".into(),
            address: ip4(198, 18, 0, 65),
            weight: 1,
        })
        .unwrap_err();
    assert_eq!(
        err.to_string(),
        "VIP v1 has 64 backends, as many as scheduler least_connections takes"
    );
    assert_eq!(core.image, before);
}
