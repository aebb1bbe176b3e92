//! Test support for lb, shared by the tests in tests/tests and by the
//! lb-bench and lb-demo tools: crafted packets (`packet`), a fixture that
//! loads the real XDP program with its own pinned maps (`fixture`), the
//! test and benchmark XDP programs (`testprogs`), network-namespace
//! topologies (`netns`, and `routed`: backends behind a router), test
//! servers (`servers`), the real agent run in a namespace (`agent`) and
//! `lb decap` attached to a backend (`decap`), packet capture in a
//! namespace (`capture`) and paced floods of crafted frames (`flood`).

pub mod agent;
pub mod capture;
pub mod decap;
pub mod fixture;
pub mod flood;
pub mod netns;
pub mod packet;
pub mod routed;
pub mod scale_out;
pub mod servers;
pub mod testprogs;

/// Fails the calling test loudly when not run as root: kernel tests are
/// never skipped silently.
pub fn require_root() {
    // SAFETY: geteuid has no preconditions.
    let euid = unsafe { libc::geteuid() };
    assert_eq!(
        euid, 0,
        "this test loads XDP programs and needs root; run it with `cargo xtask test` as root"
    );
}
