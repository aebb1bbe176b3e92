//! Egress checks at start-up, with the real agent in network namespaces:
//! in native mode, a redirect target that cannot transmit XDP frames is
//! refused with a clear error (the kernel would drop what lb counts as
//! forwarded), and accepted once it can. Needs root.

use std::{net::Ipv4Addr, time::Duration};

use anyhow::{Context as _, Result, ensure};
use lb_tests::{
    agent::{AgentPaths, LbAgent, VipSpec, lb_in_ns, render_config},
    netns::{NAME_PREFIX, Netns, Topology, run_command},
    require_root,
    testprogs::{RETURN_ONLY, TestProgs},
};

/// lb's side and the far side of a second link out of the lb namespace.
const NEAR: Ipv4Addr = Ipv4Addr::new(198, 19, 250, 1);
const FAR: Ipv4Addr = Ipv4Addr::new(198, 19, 250, 2);

#[test]
fn a_redirect_target_that_cannot_transmit_xdp_frames_is_refused_at_start() -> Result<()> {
    require_root();
    let topo = Topology::with_backends(0)?;
    // A second veth out of the lb namespace, to a namespace holding one
    // backend; its peer runs no XDP program and has GRO off, so lb's side
    // cannot transmit XDP frames.
    let far = Netns::create(format!("{NAME_PREFIX}{}-far", std::process::id()))?;
    let lb = topo.lb_ns();
    lb.ip([
        "link",
        "add",
        "lbtx0",
        "type",
        "veth",
        "peer",
        "name",
        "lbtx1",
        "netns",
        far.name(),
    ])?;
    lb.ip(["addr", "add", &format!("{NEAR}/30"), "dev", "lbtx0"])?;
    lb.ip(["link", "set", "lbtx0", "up"])?;
    far.ip(["addr", "add", &format!("{FAR}/30"), "dev", "lbtx1"])?;
    far.ip(["link", "set", "lbtx1", "up"])?;
    far.ethtool_features("lbtx1", &[("gro", false)])?;
    // Wait (bounded) for the neighbour to answer, so the agent resolves it.
    lb.exec_timeout(
        ["ping", "-c", "1", "-W", "2", &FAR.to_string()],
        Duration::from_secs(5),
    )
    .context("ping the far side")?;

    let mut vip = VipSpec::tcp("far", topo.vip(), 80, &[FAR]);
    vip.health_check = "kind = \"none\"".into();
    let paths = AgentPaths::new()?;
    let text = render_config(
        &paths.instance,
        &paths.socket,
        &topo.lb_iface(),
        std::slice::from_ref(&vip),
    )
    .replacen("[agent]\n", "[agent]\nxdp_mode = \"native\"\n", 1);
    std::fs::write(&paths.config, &text)?;
    let mut cmd = lb_in_ns(lb.name());
    cmd.arg("run").arg("--config").arg(&paths.config);
    let refused = run_command(cmd, Duration::from_secs(30));
    let message = match refused {
        Ok(out) => anyhow::bail!(
            "lb run started with an unusable redirect target: {}",
            String::from_utf8_lossy(&out.stderr)
        ),
        Err(e) => format!("{e:#}"),
    };
    ensure!(
        message.contains("lbtx0") && message.contains("cannot transmit XDP frames"),
        "the error does not say what is wrong: {message}"
    );
    // Nothing left behind by the failed start.
    let link = lb.ip(["link", "show", &topo.lb_iface()])?;
    ensure!(
        !String::from_utf8_lossy(&link.stdout).contains("xdp"),
        "XDP left attached"
    );
    ensure!(
        !std::path::Path::new("/sys/fs/bpf/lb")
            .join(&paths.instance)
            .exists(),
        "maps left pinned"
    );

    // With an XDP program on the peer, lb's side can transmit: accepted.
    let _peer_xdp = far.run(|| -> Result<TestProgs> {
        let mut progs = TestProgs::load()?;
        progs.attach(RETURN_ONLY, "lbtx1", aya::programs::XdpMode::Driver)?;
        Ok(progs)
    })??;
    let agent = LbAgent::start_with(lb, paths, &text, &[])?;
    let status = agent.json(&["status"])?;
    ensure!(status["interfaces"][0]["mode"] == "native", "{status}");
    Ok(())
}
