//! `lb decap` attached to a backend's interface by the real CLI, detached
//! when the guard drops (its pins live in the host-wide bpffs, not in the
//! namespace, so a test must not leave them behind).

use std::{net::IpAddr, time::Duration};

use anyhow::{Context as _, Result};

use crate::{
    agent::lb_in_ns,
    netns::{Netns, run_command},
    routed::RoutedTopology,
};

const CLI_TIMEOUT: Duration = Duration::from_secs(20);

pub struct DecapAttachment {
    ns: String,
    iface: String,
}

impl DecapAttachment {
    /// `lb decap attach --iface IFACE --allow-source ALLOW/32` (or /128)
    /// in `ns`.
    pub fn attach(ns: &Netns, iface: &str, allow: impl Into<IpAddr>) -> Result<Self> {
        let mut cmd = lb_in_ns(ns.name());
        let allow: IpAddr = allow.into();
        let allow = format!("{allow}/{}", if allow.is_ipv4() { 32 } else { 128 });
        cmd.args([
            "decap",
            "attach",
            "--iface",
            iface,
            "--allow-source",
            &allow,
        ]);
        run_command(cmd, CLI_TIMEOUT).context("lb decap attach")?;
        Ok(Self {
            ns: ns.name().into(),
            iface: iface.into(),
        })
    }
}

impl DecapAttachment {
    /// `lb decap` on every backend of `topo`, allowing only lb's address
    /// of the outer header's family (IPv6 when `v6`).
    pub fn attach_all(topo: &RoutedTopology, v6: bool) -> Result<Vec<Self>> {
        (0..topo.backend_count())
            .map(|i| Self::attach(topo.backend_ns(i), &topo.backend_iface(i), topo.lb_of(v6)))
            .collect()
    }
}

impl Drop for DecapAttachment {
    fn drop(&mut self) {
        let mut cmd = lb_in_ns(&self.ns);
        cmd.args(["decap", "detach", "--iface", &self.iface]);
        if let Err(e) = run_command(cmd, CLI_TIMEOUT) {
            eprintln!("lb decap detach in {}: {e:#}", self.ns);
        }
    }
}
