//! `lb decap attach | detach | status`: act on the pins under
//! `/sys/fs/bpf/lb-decap/<IF>/` directly (no agent runs on a backend).
//! Each command checks everything it can before it changes anything, so
//! an error leaves the host as it was.

use std::{fmt::Write as _, path::Path};

use anyhow::{Context as _, Result, anyhow, bail};
use aya::programs::{XdpMode, links::PinnedLink};
use log::warn;
use serde_json::json;

use super::{
    AttachError, DecapMaps, DecapProgram, LINK_PIN, Settings, parse_allow_list, pin_dir,
    pinned_interfaces, remove_dir,
};
use crate::{
    datapath,
    pins::{self, LinkTarget},
};

/// `--xdp-mode` of `lb decap attach`.
#[derive(Clone, Copy, Debug, PartialEq, Eq, clap::ValueEnum)]
pub enum DecapXdpMode {
    /// Driver mode, falling back to generic (skb) mode with a warning.
    Auto,
    Driver,
    Skb,
}

fn need_root() -> Result<()> {
    if !datapath::is_root() {
        bail!("lb decap needs root (CAP_BPF, CAP_NET_ADMIN): run it as root");
    }
    Ok(())
}

/// `lb decap attach`: a first attach loads, fills the maps, attaches and
/// pins; on an interface lb-decap already serves it rewrites the
/// allow-list and the GUE port in place (the program stays attached).
pub fn attach(iface: &str, allow: &[String], gue_port: u16, mode: DecapXdpMode) -> Result<String> {
    let allow = parse_allow_list(allow).map_err(|e| anyhow!(e))?;
    if gue_port == 0 {
        bail!("--gue-port 0: the GUE port must be 1..=65535");
    }
    need_root()?;
    let ifindex = datapath::ifindex(iface)?;
    datapath::ensure_bpffs()?;
    super::secure_pin_root()?;
    let dir = pin_dir(iface);
    let link_pin = dir.join(LINK_PIN);
    let settings = Settings { allow, gue_port };
    let mut note = String::new();
    if link_pin.exists() {
        match pins::xdp_link_target(&link_pin) {
            Ok(LinkTarget::Ifindex(i)) if i == ifindex => {
                return update_in_place(iface, &dir, &settings);
            }
            Ok(LinkTarget::Ifindex(i)) => bail!(
                "{} holds lb-decap attached to ifindex {i} ({}), not to {iface} (ifindex {ifindex}): \
                 was the interface renamed? Detach it first with `lb decap detach --iface {iface}`",
                dir.display(),
                pins::ifname(i).unwrap_or_else(|| "no name".into())
            ),
            Ok(LinkTarget::Severed) => {
                note = format!(
                    " (removed stale pins in {}: their interface was deleted)",
                    dir.display()
                );
            }
            Err(e) => bail!(
                "{} is not a usable lb-decap link ({e}); remove {} by hand",
                link_pin.display(),
                dir.display()
            ),
        }
    }
    // Leftovers of a severed link or an interrupted attach.
    remove_dir(&dir)?;
    let attached = attach_fresh(iface, &dir, &settings, mode);
    if attached.is_err() {
        let _ = remove_dir(&dir);
    }
    let mode = attached?;
    Ok(format!(
        "attached lb-decap to {iface} ({mode} mode){note}: tunnel packets from {} are \
         decapsulated, GUE on UDP port {gue_port}; pinned under {}",
        list(&settings),
        dir.display()
    ))
}

fn list(s: &Settings) -> String {
    s.allow
        .iter()
        .map(|c| c.to_string())
        .collect::<Vec<_>>()
        .join(", ")
}

fn update_in_place(iface: &str, dir: &Path, settings: &Settings) -> Result<String> {
    let mut maps = DecapMaps::from_pins(dir)?;
    let applied = maps.apply(settings)?;
    let mut changes = Vec::new();
    if !applied.added.is_empty() {
        let added: Vec<String> = applied.added.iter().map(|c| c.to_string()).collect();
        changes.push(format!("allowed {}", added.join(", ")));
    }
    if !applied.removed.is_empty() {
        let removed: Vec<String> = applied.removed.iter().map(|c| c.to_string()).collect();
        changes.push(format!("no longer allowed {}", removed.join(", ")));
    }
    if let Some(old) = applied.old_port {
        changes.push(format!("GUE port {old} -> {}", settings.gue_port));
    }
    let what = if changes.is_empty() {
        "nothing to change".to_string()
    } else {
        changes.join("; ")
    };
    Ok(format!(
        "lb-decap was already attached to {iface}: updated in place, without detaching ({what}); \
         allow-list now {}, GUE port {}",
        list(settings),
        settings.gue_port
    ))
}

/// Loads, fills, attaches, pins; returns the mode it attached in.
fn attach_fresh(
    iface: &str,
    dir: &Path,
    settings: &Settings,
    mode: DecapXdpMode,
) -> Result<&'static str> {
    let mut prog = DecapProgram::load_pinned(dir)?;
    // The maps are complete before the first packet meets the program.
    prog.maps.apply(settings)?;
    let tries: &[(XdpMode, &'static str)] = match mode {
        DecapXdpMode::Auto => &[(XdpMode::Driver, "driver"), (XdpMode::Skb, "skb")],
        DecapXdpMode::Driver => &[(XdpMode::Driver, "driver")],
        DecapXdpMode::Skb => &[(XdpMode::Skb, "skb")],
    };
    let mut last = None;
    for (i, (m, name)) in tries.iter().enumerate() {
        match prog.attach(iface, *m) {
            Ok(link) => {
                let path = dir.join(LINK_PIN);
                link.pin(&path)
                    .with_context(|| format!("pinning the link at {}", path.display()))?;
                return Ok(name);
            }
            Err(AttachError::Occupied) => bail!(
                "{iface} already has an XDP program attached that is not lb-decap (the \
                 balancer's `lb run`, or another program); lb decap does not replace it: detach \
                 that one first. Nothing was changed"
            ),
            Err(e) => {
                if i + 1 < tries.len() {
                    warn!("{iface}: {name} mode failed ({e}); trying generic (skb) mode");
                }
                last = Some(e);
            }
        }
    }
    Err(anyhow::Error::new(last.expect("at least one mode tried")))
        .with_context(|| format!("attaching lb-decap to {iface}"))
}

/// `lb decap detach`: unpins the link (which detaches the program) and
/// removes the interface's pin directory.
pub fn detach(iface: &str) -> Result<String> {
    need_root()?;
    let dir = pin_dir(iface);
    let link_pin = dir.join(LINK_PIN);
    if !link_pin.exists() {
        bail!(
            "lb-decap is not attached to {iface} (nothing pinned at {})",
            link_pin.display()
        );
    }
    let link = PinnedLink::from_pin(&link_pin)
        .with_context(|| format!("opening {}", link_pin.display()))?;
    // Dropping the last reference to the link detaches the program.
    drop(
        link.unpin()
            .with_context(|| format!("unpinning {}", link_pin.display()))?,
    );
    remove_dir(&dir)?;
    // A namespace's own directory goes with its last interface (it fails,
    // harmlessly, while others remain).
    let root = super::pin_root();
    if root != Path::new(super::PIN_ROOT) {
        let _ = std::fs::remove_dir(&root);
    }
    Ok(format!(
        "detached lb-decap from {iface} and removed {}",
        dir.display()
    ))
}

/// One interface as `lb decap status` shows it.
struct Entry {
    iface: String,
    /// `Some(ifindex)` while the link is attached.
    attached: Option<u32>,
    allow: Vec<String>,
    gue_port: u16,
    counters: Vec<(&'static str, u64)>,
}

fn entry(iface: &str) -> Result<Entry> {
    let dir = pin_dir(iface);
    let attached = match pins::xdp_link_target(&dir.join(LINK_PIN)) {
        Ok(LinkTarget::Ifindex(i)) => Some(i),
        _ => None,
    };
    let maps = DecapMaps::from_pins(&dir)?;
    Ok(Entry {
        iface: iface.into(),
        attached,
        allow: maps.allow_list()?.iter().map(|c| c.to_string()).collect(),
        gue_port: maps.gue_port()?,
        counters: maps
            .counters()?
            .into_iter()
            .map(|(r, n)| (r.name(), n))
            .collect(),
    })
}

/// `lb decap status`: every interface with lb-decap pins (or one), with
/// its allow-list, GUE port and counters summed over CPUs.
pub fn status(iface: Option<&str>, json_out: bool) -> Result<String> {
    need_root()?;
    let ifaces = match iface {
        Some(i) => {
            if !pin_dir(i).join(LINK_PIN).exists() {
                bail!(
                    "lb-decap is not attached to {i} (nothing pinned under {})",
                    pin_dir(i).display()
                );
            }
            vec![i.to_string()]
        }
        None => pinned_interfaces()?,
    };
    let entries = ifaces
        .iter()
        .map(|i| entry(i))
        .collect::<Result<Vec<_>>>()?;
    if json_out {
        let v: Vec<_> = entries
            .iter()
            .map(|e| {
                let counters: serde_json::Map<String, serde_json::Value> = e
                    .counters
                    .iter()
                    .map(|(k, v)| (k.to_string(), json!(v)))
                    .collect();
                json!({
                    "iface": e.iface,
                    "attached": e.attached.is_some(),
                    "ifindex": e.attached,
                    "allow_sources": e.allow,
                    "gue_port": e.gue_port,
                    "counters": counters,
                })
            })
            .collect();
        return Ok(serde_json::to_string_pretty(&json!({ "interfaces": v }))?);
    }
    if entries.is_empty() {
        return Ok("lb-decap is attached to no interface".into());
    }
    let mut out = String::new();
    for e in &entries {
        let state = match e.attached {
            Some(i) => format!("attached (ifindex {i})"),
            None => "NOT attached (link severed: its interface was deleted)".into(),
        };
        let _ = writeln!(out, "{}: {state}, GUE port {}", e.iface, e.gue_port);
        let _ = writeln!(out, "  allow-source: {}", e.allow.join(", "));
        for (name, n) in &e.counters {
            let _ = writeln!(out, "  {name:<24} {n}");
        }
    }
    Ok(out.trim_end().to_string())
}
