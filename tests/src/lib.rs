//! Test support for lb: crafted packets, a fixture that loads the real XDP
//! program with its own pinned maps, and (later) network-namespace
//! topologies.

pub mod agent;
pub mod fixture;
pub mod netns;
pub mod packet;
pub mod servers;

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
