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
    pins::{self, LinkTarget},
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
            // A pinned link is taken over only if the kernel says it is
            // attached to this very device (under whichever pin name).
            let own = pinned_link_on(&links.pin_dir, iface, ifindex)?;
            let created = own.is_none();
            let (id, mode) = match &own {
                None => attach_new(dp, iface, setting)?,
                Some(at) => (take_over(dp, iface, at)?, "kept"),
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
            let link = match &own {
                Some(at) if *at == pin => link,
                _ => {
                    let link: FdLink = link
                        .pin(&pin)
                        .with_context(|| format!("pinning the link at {}", pin.display()))?
                        .into();
                    if let Some(old) = &own {
                        // Taken over from a pin named after the device's
                        // earlier name: the link now lives under its new one.
                        std::fs::remove_file(old)
                            .with_context(|| format!("removing {}", old.display()))?;
                        info!("{iface}: pinned link moved from {}", old.display());
                    }
                    link
                }
            };
            links.attachments.push(Attachment {
                iface: iface.clone(),
                ifindex,
                mode,
                link,
                created,
            });
        }
        links.remove_foreign_links()?;
        Ok(links)
    }

    /// Removes link pins of this instance that no attachment uses: links
    /// left on devices this agent is not configured for (detached from
    /// them) and severed ones (their device is gone).
    fn remove_foreign_links(&self) -> anyhow::Result<()> {
        for (name, path) in pins::link_pins(&self.pin_dir)? {
            if self.attachments.iter().any(|a| a.iface == name) {
                continue;
            }
            let target = pins::xdp_link_target(&path);
            std::fs::remove_file(&path).with_context(|| format!("removing {}", path.display()))?;
            match target {
                Ok(LinkTarget::Ifindex(i)) => warn!(
                    "{}: removed: its XDP link was on ifindex {i} ({}), which is not among this agent's interfaces; lb is detached from it",
                    path.display(),
                    pins::ifname(i).unwrap_or_else(|| "no such interface here".into())
                ),
                Ok(LinkTarget::Severed) => {
                    info!("{}: removed: its interface {name} is gone", path.display())
                }
                Err(e) => warn!("{}: removed ({e})", path.display()),
            }
        }
        Ok(())
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

/// The pinned link to take over for `iface` (ifindex `ifindex`): the one
/// the kernel reports attached to that ifindex, whatever its pin name (an
/// interface renamed since). A link pinned under this interface's name but
/// attached elsewhere (the interface was deleted and re-created, or renamed
/// and another took its name) is stale: its pin is removed, which detaches
/// it, so that a fresh link can be made; it is never taken over.
fn pinned_link_on(pin_dir: &Path, iface: &str, ifindex: u32) -> anyhow::Result<Option<PathBuf>> {
    let mut found = None;
    for (name, path) in pins::link_pins(pin_dir)? {
        let target = pins::xdp_link_target(&path)
            .with_context(|| format!("reading the pinned link {}", path.display()))?;
        if target == LinkTarget::Ifindex(ifindex) {
            found = Some(path);
        } else if name == iface {
            std::fs::remove_file(&path)
                .with_context(|| format!("removing the stale link {}", path.display()))?;
            match target {
                LinkTarget::Severed => warn!(
                    "{iface}: the pinned link {} belonged to an interface that is gone (deleted or re-created); replaced by a fresh attachment",
                    path.display()
                ),
                LinkTarget::Ifindex(other) => warn!(
                    "{iface}: the pinned link {} is attached to ifindex {other} ({}), not to {iface} (ifindex {ifindex}); detached from it and replaced by a fresh attachment",
                    path.display(),
                    pins::ifname(other).unwrap_or_else(|| "not in this namespace".into())
                ),
            }
        }
    }
    Ok(found)
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
