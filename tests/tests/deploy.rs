//! The monitoring files under deploy/ against a real agent, in network
//! namespaces: the alert rules pass `promtool check rules`, the agent's
//! /metrics output passes `promtool check metrics`, the Grafana dashboard
//! is valid JSON with a query per panel, and every metric the rules and
//! the dashboard use is one the agent exports. Needs root and promtool
//! (Debian package prometheus, installed by `cargo xtask setup`).

use std::{
    collections::BTreeSet,
    io::Write as _,
    path::{Path, PathBuf},
    process::{Command, Stdio},
    thread,
    time::{Duration, Instant},
};

use anyhow::{Context as _, Result, bail, ensure};
use lb_tests::{
    agent::{AgentPaths, LbAgent, VipSpec, metrics, render_config},
    netns::Topology,
    require_root,
    servers::{ServerKind, spawn_on_backends},
};

fn deploy(rel: &str) -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("..")
        .join("deploy")
        .join(rel)
}

fn promtool() -> Result<PathBuf> {
    let p = PathBuf::from("/usr/bin/promtool");
    ensure!(
        p.is_file(),
        "promtool not found: install the Debian package prometheus (`cargo xtask setup` does)"
    );
    Ok(p)
}

/// The `lb_…` names a file mentions.
fn lb_names(text: &str) -> BTreeSet<String> {
    let mut out = BTreeSet::new();
    let mut rest = text;
    while let Some(at) = rest.find("lb_") {
        let before_ok = at == 0
            || !rest[..at]
                .chars()
                .next_back()
                .is_some_and(|c| c.is_ascii_alphanumeric() || c == '_');
        let name: String = rest[at..]
            .chars()
            .take_while(|c| c.is_ascii_lowercase() || c.is_ascii_digit() || *c == '_')
            .collect();
        if before_ok {
            out.insert(name.clone());
        }
        rest = &rest[at + name.len().max(3)..];
    }
    out
}

/// The metric names of a Prometheus text page (samples, not comments).
fn exported(text: &str) -> BTreeSet<String> {
    text.lines()
        .filter(|l| !l.starts_with('#') && !l.trim().is_empty())
        .filter_map(|l| l.split(['{', ' ']).next())
        .map(str::to_string)
        .collect()
}

#[test]
fn the_alert_rules_and_the_dashboard_use_only_metrics_the_agent_exports() -> Result<()> {
    require_root();
    let promtool = promtool()?;
    let rules = deploy("prometheus/lb-alerts.yml");
    let o = Command::new(&promtool)
        .args(["check", "rules"])
        .arg(&rules)
        .output()?;
    ensure!(
        o.status.success(),
        "promtool check rules {}:\n{}{}",
        rules.display(),
        String::from_utf8_lossy(&o.stdout),
        String::from_utf8_lossy(&o.stderr)
    );

    let dashboard_path = deploy("grafana/lb-dashboard.json");
    let dashboard_text = std::fs::read_to_string(&dashboard_path)?;
    let dashboard: serde_json::Value =
        serde_json::from_str(&dashboard_text).context("the dashboard is not JSON")?;
    let panels = dashboard["panels"].as_array().context("no panels")?;
    ensure!(!panels.is_empty(), "the dashboard has no panel");
    for p in panels {
        let exprs: Vec<&str> = p["targets"]
            .as_array()
            .into_iter()
            .flatten()
            .filter_map(|t| t["expr"].as_str())
            .collect();
        ensure!(!exprs.is_empty(), "panel {} has no query", p["title"]);
    }

    // A real agent with one VIP and a healthy backend.
    let topo = Topology::with_backends(1)?;
    let _servers = spawn_on_backends(&topo, ServerKind::Http, 80)?;
    let paths = AgentPaths::new()?;
    let vip = VipSpec::tcp("web", topo.vip(), 80, &[topo.backend_addr(0)]);
    let text = render_config(&paths.instance, &paths.socket, &topo.lb_iface(), &[vip]);
    let agent = LbAgent::start_with(topo.lb_ns(), paths, &text, &[])?;
    agent.wait_health(
        Some("web"),
        topo.backend_addr(0).into(),
        "up",
        Duration::from_secs(10),
    )?;
    // The conntrack figures come with the first count pass: bounded wait.
    let deadline = Instant::now() + Duration::from_secs(10);
    let page = loop {
        let response = metrics(topo.lb_ns())?;
        // The body, after the HTTP head.
        let page = response
            .split_once("\r\n\r\n")
            .map_or(response.as_str(), |(_, body)| body)
            .to_string();
        if page.contains("lb_conntrack_records") {
            break page;
        }
        if Instant::now() >= deadline {
            bail!("no conntrack figures in the agent's metrics after 10 s:\n{page}");
        }
        thread::sleep(Duration::from_millis(200));
    };
    let mut child = Command::new(&promtool)
        .args(["check", "metrics"])
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()?;
    child
        .stdin
        .take()
        .context("promtool stdin")?
        .write_all(page.as_bytes())?;
    let o = child.wait_with_output()?;
    ensure!(
        o.status.success(),
        "promtool check metrics on the agent's output:\n{}{}\n{page}",
        String::from_utf8_lossy(&o.stdout),
        String::from_utf8_lossy(&o.stderr)
    );

    ensure!(
        !page.contains("# EOF"),
        "a plain GET got OpenMetrics, not the classic format:\n{page}"
    );
    // A scraper asking for OpenMetrics (as Prometheus does) gets it.
    let om = topo.lb_ns().run(|| -> Result<String> {
        use std::io::Read as _;
        let mut c = std::net::TcpStream::connect(lb_tests::agent::METRICS_LISTEN)?;
        c.set_read_timeout(Some(Duration::from_secs(3)))?;
        c.write_all(
            b"GET /metrics HTTP/1.1\r\nHost: lb\r\nAccept: application/openmetrics-text;version=1.0.0,text/plain;q=0.5\r\nConnection: close\r\n\r\n",
        )?;
        let mut text = String::new();
        c.read_to_string(&mut text)?;
        Ok(text)
    })??;
    ensure!(
        om.contains("application/openmetrics-text") && om.trim_end().ends_with("# EOF"),
        "an OpenMetrics Accept header did not get OpenMetrics:\n{om}"
    );

    let have = exported(&page);
    for (what, text) in [
        ("the alert rules", std::fs::read_to_string(&rules)?),
        ("the dashboard", dashboard_text),
    ] {
        let used = lb_names(&text);
        ensure!(!used.is_empty(), "{what} use no lb metric");
        let missing: Vec<&String> = used.iter().filter(|n| !have.contains(*n)).collect();
        ensure!(
            missing.is_empty(),
            "{what} use metrics the agent does not export: {missing:?}\nexported: {have:?}"
        );
    }
    Ok(())
}
