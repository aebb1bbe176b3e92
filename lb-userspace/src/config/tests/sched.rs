//! `scheduler`: the default, each value, and the rejections (an unknown
//! name, too many backends for the scheduler), which name the VIP, the
//! line and the field.

use super::*;
use crate::sched::Scheduler;

fn vip_with(scheduler: &str, backends: usize) -> String {
    let mut s = format!("{HEAD}name = \"web\"\nscheduler = \"{scheduler}\"\n");
    for i in 0..backends {
        s += &format!(
            "[[vip.backend]]\naddress = \"198.18.{}.{}\"\n",
            1 + i / 250,
            1 + i % 250
        );
    }
    s
}

#[test]
fn the_default_is_maglev_and_each_scheduler_parses() {
    assert_eq!(ok(HEAD).vips[0].scheduler, Scheduler::Maglev);
    for s in Scheduler::ALL {
        assert_eq!(ok(&vip_with(s.as_str(), 3)).vips[0].scheduler, s);
    }
}

#[test]
fn an_unknown_scheduler_is_refused_naming_the_vip_and_the_choices() {
    let e = err(&vip_with("random", 1));
    check(
        &e,
        6,
        "vip[0].scheduler",
        "VIP \"web\": invalid scheduler \"random\"",
    );
    assert!(
        e.to_string()
            .contains("maglev, round_robin, weighted_round_robin, least_connections"),
        "{e}"
    );
    // Case matters, as for every keyword.
    err(&vip_with("Round_Robin", 1));
}

#[test]
fn least_connections_takes_at_most_64_backends() {
    ok(&vip_with("least_connections", 64));
    let e = err(&vip_with("least_connections", 65));
    check(
        &e,
        6,
        "vip[0].scheduler",
        "VIP \"web\" has 65 backends, more than scheduler least_connections takes (64)",
    );
    // Maglev has no such limit.
    ok(&vip_with("maglev", 65));
}

#[test]
fn round_robins_take_at_most_1024_backends() {
    let text = format!(
        "[agent]\nmax_backends = 2000\n{}",
        vip_with("round_robin", 1025)
    );
    let e = err(&text);
    check(
        &e,
        8,
        "vip[0].scheduler",
        "more than scheduler round_robin takes (1024)",
    );
    let text = format!(
        "[agent]\nmax_backends = 2000\n{}",
        vip_with("weighted_round_robin", 1024)
    );
    ok(&text);
}

#[test]
fn a_wrong_type_is_refused() {
    let e = err(&format!("{HEAD}scheduler = 3\n"));
    assert_eq!(e.line, Some(5), "{e}");
    assert!(e.to_string().contains("scheduler"), "{e}");
}
