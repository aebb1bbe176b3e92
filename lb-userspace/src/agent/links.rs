//! The balancer's XDP links: attach (native with a fallback to generic
//! mode), take over a link pinned by an earlier agent, pin, detach.

use std::path::{Path, PathBuf};

use anyhow::Context as _;
use aya::programs::{
    XdpMode,
    links::{FdLink, PinnedLink},
    xdp::{XdpLink, XdpLinkId},
};
use log::{info, warn};

use crate::{
    config::XdpModeSetting,
    control::InterfaceView,
    datapath::{self, Datapath},
};

struct Attachment {
    iface: String,
    ifindex: u32,
    mode: &'static str,
    /// The link, pinned at `link_pin_path`.
    link: FdLink,
    /// This agent created the link (rather than taking it over).
    created: bool,
}

/// The balancer's links, one per interface.
pub struct Links {
    pin_dir: PathBuf,
    attachments: Vec<Attachment>,
}

fn link_pin_path(pin_dir: &Path, iface: &str) -> PathBuf {
    pin_dir.join(format!("link_{iface}"))
}

fn xdp_mode_of(s: XdpModeSetting) -> XdpMode {
    match s {
        XdpModeSetting::Auto | XdpModeSetting::Native => XdpMode::Driver,
        XdpModeSetting::Skb => XdpMode::Skb,
    }
}

impl Links {
    /// Attaches the balancer to every interface: takes over a link pinned
    /// by an earlier agent (replacing its program in place, so packets
    /// never meet a detached interface), or creates and pins a new one.
    /// On failure the links created so far are detached again (taken-over
    /// ones stay, serving as before).
    pub fn attach_all(
        dp: &mut Datapath,
        interfaces: &[String],
        setting: XdpModeSetting,
    ) -> anyhow::Result<Links> {
        // Dropped on an early return: undoes what this call created.
        let mut links = Links {
            pin_dir: dp.pin_dir().to_path_buf(),
            attachments: Vec::new(),
        };
        for iface in interfaces {
            let ifindex = datapath::ifindex(iface)?;
            let pin = link_pin_path(&links.pin_dir, iface);
            let created = !pin.exists();
            let (id, mode) = if created {
                attach_new(dp, iface, setting)?
            } else {
                (take_over(dp, iface, &pin)?, "kept")
            };
            let link = dp.balancer_mut().take_link(id)?;
            let link = match FdLink::try_from(link) {
                Ok(l) => l,
                Err(e) => {
                    warn!(
                        "{iface}: the kernel attached without a BPF link ({e}); --keep-datapath is not available"
                    );
                    continue;
                }
            };
            let link = if created {
                link.pin(&pin)
                    .with_context(|| format!("pinning the link at {}", pin.display()))?
                    .into()
            } else {
                link
            };
            links.attachments.push(Attachment {
                iface: iface.clone(),
                ifindex,
                mode,
                link,
                created,
            });
        }
        Ok(links)
    }

    pub fn views(&self) -> Vec<InterfaceView> {
        self.attachments
            .iter()
            .map(|a| InterfaceView {
                name: a.iface.clone(),
                ifindex: a.ifindex,
                mode: a.mode.into(),
            })
            .collect()
    }

    /// Leaves every link attached and pinned for the next agent.
    pub fn keep(mut self) {
        for a in self.attachments.drain(..) {
            info!(
                "{}: XDP program left attached (pinned at {})",
                a.iface,
                link_pin_path(&self.pin_dir, &a.iface).display()
            );
            // Dropping our fd leaves the pinned link (and the program) in place.
            drop(a.link);
        }
    }

    /// Detaches from every interface (also from taken-over links).
    pub fn detach(mut self) {
        for a in self.attachments.drain(..) {
            let _ = std::fs::remove_file(link_pin_path(&self.pin_dir, &a.iface));
            drop(a.link);
            info!("{}: detached", a.iface);
        }
    }
}

impl Drop for Links {
    /// A half-done [`Links::attach_all`]: remove what it created.
    fn drop(&mut self) {
        for a in self.attachments.drain(..).filter(|a| a.created) {
            let _ = std::fs::remove_file(link_pin_path(&self.pin_dir, &a.iface));
            warn!("{}: detached again (the start did not complete)", a.iface);
        }
    }
}

fn take_over(dp: &mut Datapath, iface: &str, pin: &Path) -> anyhow::Result<XdpLinkId> {
    let pinned = PinnedLink::from_pin(pin)
        .with_context(|| format!("opening the pinned link {}", pin.display()))?;
    let link = XdpLink::try_from(FdLink::from(pinned))
        .with_context(|| format!("{} is not an XDP link", pin.display()))?;
    let id = dp
        .balancer_mut()
        .attach_to_link(link)
        .with_context(|| format!("replacing the program on {iface}"))?;
    info!("{iface}: took over the pinned XDP link; program replaced in place");
    Ok(id)
}

fn attach_new(
    dp: &mut Datapath,
    iface: &str,
    setting: XdpModeSetting,
) -> anyhow::Result<(XdpLinkId, &'static str)> {
    match dp.attach(iface, xdp_mode_of(setting)) {
        Ok(id) => Ok((
            id,
            if setting == XdpModeSetting::Skb {
                "skb"
            } else {
                "native"
            },
        )),
        Err(e) if setting == XdpModeSetting::Auto => {
            warn!("{iface}: native XDP failed ({e}); falling back to generic (skb) mode");
            let id = dp
                .attach(iface, XdpMode::Skb)
                .with_context(|| format!("attaching to {iface} in skb mode"))?;
            Ok((id, "skb"))
        }
        Err(e) => Err(e).with_context(|| format!("attaching to {iface}")),
    }
}
