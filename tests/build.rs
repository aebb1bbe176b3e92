//! Builds the test and benchmark XDP programs (lb-ebpf-testprogs) with the
//! nightly toolchain and bpf-linker, and leaves the object in OUT_DIR for
//! `lb_tests::testprogs`. `cargo xtask setup` installs what this needs.
fn main() -> anyhow::Result<()> {
    let root = concat!(env!("CARGO_MANIFEST_DIR"), "/../lb-ebpf-testprogs");
    aya_build::build_ebpf(
        [aya_build::Package {
            name: "lb-ebpf-testprogs",
            root_dir: root,
            ..Default::default()
        }],
        aya_build::Toolchain::default(),
    )
}
