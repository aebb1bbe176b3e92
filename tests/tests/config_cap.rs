//! `[agent] max_kernel_memory` with the real agent (needs root): a start
//! whose maps need more is refused before anything is loaded, and so is a
//! reload (lower cap, or bigger sizes), which then changes nothing.

use std::path::Path;

use anyhow::{Result, ensure};
use lb_tests::{
    agent::{AgentPaths, LbAgent, VipSpec, lb_in_ns, render_config},
    netns::Topology,
    require_root,
};

const PORT: u16 = 80;

fn vip(topo: &Topology) -> VipSpec {
    let backends: Vec<_> = (0..topo.backend_count())
        .map(|i| topo.backend_addr(i))
        .collect();
    VipSpec::tcp("web", topo.vip(), PORT, &backends)
}

/// The config with `line` added to its `[agent]` table.
fn with_agent_line(text: &str, line: &str) -> String {
    text.replacen("[agent]\n", &format!("[agent]\n{line}\n"), 1)
}

#[test]
fn a_start_over_the_cap_is_refused_and_loads_nothing() -> Result<()> {
    require_root();
    let topo = Topology::with_backends(1)?;
    let paths = AgentPaths::new()?;
    let text = render_config(
        &paths.instance,
        &paths.socket,
        &topo.lb_iface(),
        &[vip(&topo)],
    );
    std::fs::write(
        &paths.config,
        with_agent_line(&text, "max_kernel_memory = \"16MiB\""),
    )?;
    let out = lb_in_ns(topo.lb_ns().name())
        .arg("run")
        .arg("--config")
        .arg(&paths.config)
        .output()?;
    let stderr = String::from_utf8_lossy(&out.stderr).into_owned();
    let socket_left = paths.socket.exists();
    let _ = std::fs::remove_dir_all(&paths.dir);
    ensure!(
        !out.status.success(),
        "lb run accepted a config over the cap"
    );
    ensure!(
        stderr.contains("lb.toml:2:")
            && stderr.contains("agent.max_kernel_memory")
            && stderr.contains("more than max_kernel_memory 16.0 MiB (16777216 bytes)"),
        "{stderr}"
    );
    let link = topo.lb_ns().ip(["link", "show", &topo.lb_iface()])?;
    ensure!(
        !String::from_utf8_lossy(&link.stdout).contains("xdp"),
        "XDP attached"
    );
    ensure!(
        !Path::new("/sys/fs/bpf/lb").join(&paths.instance).exists(),
        "maps pinned by a refused start"
    );
    ensure!(!socket_left, "a control socket was made");
    Ok(())
}

#[test]
fn a_reload_over_the_cap_is_refused_and_changes_nothing() -> Result<()> {
    require_root();
    let topo = Topology::with_backends(2)?;
    let agent = LbAgent::start(topo.lb_ns(), &topo.lb_iface(), &[vip(&topo)])?;
    let backends = |agent: &LbAgent| -> Result<usize> {
        Ok(agent
            .json(&["backend", "list"])?
            .as_array()
            .map_or(0, |a| a.len()))
    };
    ensure!(backends(&agent)? == 2);
    let good = std::fs::read_to_string(&agent.config)?;
    // Without backend 1, which would be applied but for the cap.
    let second = format!("address = \"{}\"", topo.backend_addr(1));
    let fewer = good
        .split("[[vip.backend]]")
        .filter(|part| !part.contains(&second))
        .collect::<Vec<_>>()
        .join("[[vip.backend]]");
    ensure!(fewer != good, "the config names backend 1");
    for (change, needle) in [
        // A cap below what the running maps take.
        (
            with_agent_line(&fewer, "max_kernel_memory = \"16MiB\""),
            "agent.max_kernel_memory: the maps need",
        ),
        // Sizes that would need more than the default cap: refused for the
        // memory (not only as a size change).
        (
            fewer.replace("conntrack_entries = 65536", "conntrack_entries = 268435456"),
            "agent.conntrack_entries: the maps need",
        ),
    ] {
        ensure!(change != fewer, "the change applies to the file");
        std::fs::write(&agent.config, &change)?;
        let out = agent.cli(&["reload"])?;
        let err = String::from_utf8_lossy(&out.stderr);
        ensure!(!out.status.success(), "a reload over the cap succeeded");
        ensure!(
            err.contains("lb.toml:") && err.contains(needle) && err.contains("max_kernel_memory"),
            "{err}"
        );
        ensure!(
            backends(&agent)? == 2,
            "state changed after a refused reload"
        );
    }
    // The same file without the excess is applied.
    std::fs::write(&agent.config, &fewer)?;
    agent.cli_ok(&["reload"])?;
    ensure!(backends(&agent)? == 1, "a good reload was not applied");
    Ok(())
}
