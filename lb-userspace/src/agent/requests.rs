//! Control requests that read or change the configuration and the desired
//! state: listing, adding, removing, draining and weighting backends,
//! explaining a flow, applying a reloaded file. Changes live in the agent's
//! memory; a reload goes back to the file.

use std::{
    collections::BTreeSet,
    net::{IpAddr, SocketAddr},
};

use anyhow::bail;
use lb_common::{FlowKey, FlowKey6, NO_BACKEND, ring_slot};
use log::{info, warn};

use super::{core::Core, overrides};
use crate::{
    config::{BackendConfig, BackendState, Config, Forwarding, Protocol},
    control::{AclView, BackendView, ExplainView, OuterView, Request, VipView},
    datapath::{backend_address, backend_encap_source},
    keys::{BackendKey, VipId},
    mac::MacAddr,
    reconcile::KernelMaps,
};

/// What a handled request returns: its reply data, and whether the state
/// changed (the agent then reconciles).
pub struct Handled {
    pub data: serde_json::Value,
    pub changed: bool,
}

fn reply(x: impl serde::Serialize, changed: bool) -> Handled {
    Handled {
        data: serde_json::to_value(x).unwrap_or(serde_json::Value::Null),
        changed,
    }
}

impl<M: KernelMaps> Core<M> {
    /// Handles a request about VIPs, backends and flows. Status, stats and
    /// reload need the agent's runtime and are handled there.
    pub fn handle(&mut self, req: Request) -> anyhow::Result<Handled> {
        Ok(match req {
            Request::VipList => reply(self.vip_list(), false),
            Request::BackendList { vip } => {
                let vip = vip.map(|s| self.find_vip(&s)).transpose()?;
                reply(self.backend_list(vip), false)
            }
            Request::BackendAdd {
                vip,
                address,
                weight,
            } => {
                let i = self.find_vip(&vip)?;
                check_weight(weight)?;
                let v = &self.cfg.vips[i];
                if let Some(why) =
                    crate::config::backend_family_error(v.address, address, v.forwarding)
                {
                    bail!("VIP {}: {why}", v.name);
                }
                if let Some(bad) = crate::config::unusable_address(address) {
                    bail!("{address} is {bad}, not usable as a backend address");
                }
                if self.find_backend(i, address).is_ok() {
                    bail!(
                        "VIP {} already has backend {address}",
                        self.cfg.vips[i].name
                    );
                }
                let v = &self.cfg.vips[i];
                if let Some(max) = v.scheduler.max_backends()
                    && v.backends.len() >= max as usize
                {
                    bail!(
                        "VIP {} has {} backends, as many as scheduler {} takes",
                        v.name,
                        v.backends.len(),
                        v.scheduler
                    );
                }
                let total: usize = self.cfg.vips.iter().map(|v| v.backends.len()).sum();
                if total as u32 >= self.cfg.agent.kernel.max_backends {
                    bail!(
                        "all {} backend slots are in use",
                        self.cfg.agent.kernel.max_backends
                    );
                }
                let health_check = self.cfg.vips[i].health_check.clone();
                self.cfg.vips[i].backends.push(BackendConfig {
                    address,
                    weight,
                    state: BackendState::Active,
                    mac: None,
                    port: None,
                    health_check,
                });
                self.note_override(i, address);
                reply(
                    format!("added {address} to {}", self.cfg.vips[i].name),
                    true,
                )
            }
            Request::BackendRemove { vip, address } => {
                let i = self.find_vip(&vip)?;
                let j = self.find_backend(i, address)?;
                self.cfg.vips[i].backends.remove(j);
                self.note_override(i, address);
                reply(
                    format!("removed {address} from {}", self.cfg.vips[i].name),
                    true,
                )
            }
            Request::BackendDrain { vip, address } => {
                reply(self.set_state(&vip, address, BackendState::Drain)?, true)
            }
            Request::BackendUndrain { vip, address } => {
                reply(self.set_state(&vip, address, BackendState::Active)?, true)
            }
            Request::BackendSetWeight {
                vip,
                address,
                weight,
            } => {
                let i = self.find_vip(&vip)?;
                let j = self.find_backend(i, address)?;
                check_weight(weight)?;
                self.cfg.vips[i].backends[j].weight = weight;
                self.note_override(i, address);
                let name = &self.cfg.vips[i].name;
                reply(format!("{address} of {name}: weight {weight}"), true)
            }
            Request::Explain { src, dst, protocol } => {
                reply(self.explain(src, dst, protocol)?, false)
            }
            Request::OverrideClear { vip, address } => {
                let vip = vip
                    .map(|s| self.find_vip(&s).map(|i| VipId::of(&self.cfg.vips[i])))
                    .transpose()?;
                let n = self.overrides.clear(vip, address);
                self.cfg = self.overrides.apply(&self.file);
                reply(format!("cleared {n} override(s)"), n > 0)
            }
            Request::VipWithdraw { vip } => reply(self.set_withdrawn(&vip, true)?, false),
            Request::VipAnnounce { vip } => reply(self.set_withdrawn(&vip, false)?, false),
            Request::HostDrain => {
                self.announcing()?;
                self.announce.host_drained = true;
                reply("host drained: every VIP route withdrawn", false)
            }
            Request::HostUndrain => {
                self.announcing()?;
                self.announce.host_drained = false;
                reply("host undrained: ready VIPs are announced", false)
            }
            Request::Status | Request::Stats | Request::Reload => {
                bail!("{req:?} is handled by the agent's runtime")
            }
        })
    }

    /// Takes a re-read configuration file: refused as a whole when it
    /// changes what needs a restart. CLI overrides of backends the file
    /// left unchanged stay in force; health checks restart where they
    /// changed (the runtime sees the new check).
    pub fn apply_reload(&mut self, file: Config) -> anyhow::Result<()> {
        if let Some(warning) =
            crate::config::reload_check(&self.file, &file).map_err(anyhow::Error::msg)?
        {
            warn!("{warning}");
        }
        for dropped in self.overrides.rebase(&file) {
            warn!("{dropped}");
        }
        if !self.overrides.is_empty() {
            info!(
                "{}: {} CLI override(s) kept (see `lb status`; `lb override clear` drops them)",
                file.source.display(),
                self.overrides.views(&file).len()
            );
        }
        self.cfg = self.overrides.apply(&file);
        self.file = file;
        self.announce.retain_vips(&self.cfg);
        Ok(())
    }

    fn announcing(&self) -> anyhow::Result<()> {
        if !self.announce.enabled {
            bail!(
                "VIP announcement is off: set [agent.announce] table in the config file and restart the agent"
            );
        }
        Ok(())
    }

    /// `lb vip withdraw` (`withdrawn`) or `lb vip announce`.
    fn set_withdrawn(&mut self, sel: &str, withdrawn: bool) -> anyhow::Result<String> {
        self.announcing()?;
        let i = self.find_vip(sel)?;
        let v = &self.cfg.vips[i];
        let id = VipId::of(v);
        let name = v.name.clone();
        if withdrawn {
            self.announce.withdrawn.insert(id);
        } else {
            self.announce.withdrawn.remove(&id);
        }
        let vips = super::announce::vip_readiness(&self.cfg, &self.state);
        let keeps = self.announce.wanted(&vips).contains(&id.address);
        Ok(match (withdrawn, keeps) {
            (true, false) => format!("{name} withdrawn: {} is not announced", id.address),
            (true, true) => format!(
                "{name} withdrawn; {} stays announced for another ready VIP on the same address",
                id.address
            ),
            (false, true) => format!("{name} announced: {}", id.address),
            (false, false) => format!(
                "{name} may be announced again; {} is announced once a backend is ready{}",
                id.address,
                if self.announce.host_drained {
                    " and the host is undrained"
                } else {
                    ""
                }
            ),
        })
    }

    /// Records the CLI's change to backend `address` of VIP `i`.
    fn note_override(&mut self, i: usize, address: IpAddr) {
        let vip = VipId::of(&self.cfg.vips[i]);
        let now = overrides::entry(&self.cfg, vip, address);
        self.overrides
            .set(&self.file, BackendKey { vip, address }, now);
    }

    fn set_state(
        &mut self,
        vip: &str,
        address: IpAddr,
        state: BackendState,
    ) -> anyhow::Result<String> {
        let i = self.find_vip(vip)?;
        let j = self.find_backend(i, address)?;
        self.cfg.vips[i].backends[j].state = state;
        self.note_override(i, address);
        Ok(format!(
            "{address} of {}: {}",
            self.cfg.vips[i].name,
            state.as_str()
        ))
    }

    fn find_vip(&self, sel: &str) -> anyhow::Result<usize> {
        self.cfg
            .vips
            .iter()
            .position(|v| {
                let id = VipId::of(v);
                v.name == sel
                    || id.to_string() == sel
                    || id.socket_addr().to_string() == sel
                    || format!("{}:{}", id.address, id.port) == sel
            })
            .ok_or_else(|| {
                anyhow::anyhow!(
                    "no VIP named {sel:?} (use its name or ADDR:PORT/PROTO; see `lb vip list`)"
                )
            })
    }

    fn find_backend(&self, vip: usize, addr: IpAddr) -> anyhow::Result<usize> {
        self.cfg.vips[vip]
            .backends
            .iter()
            .position(|b| b.address == addr)
            .ok_or_else(|| anyhow::anyhow!("VIP {} has no backend {addr}", self.cfg.vips[vip].name))
    }

    pub(super) fn vip_list(&self) -> Vec<VipView> {
        let ready = super::announce::vip_readiness(&self.cfg, &self.state);
        let names = self
            .cfg
            .vips
            .iter()
            .map(|v| (VipId::of(v), v.name.clone()))
            .collect();
        self.cfg
            .vips
            .iter()
            .map(|v| {
                let id = VipId::of(v);
                let (announced, announce) = self.announce.view(id, &ready, &names);
                let in_ring: BTreeSet<u32> = self
                    .image
                    .ring(&id.kernel_key())
                    .map(|r| r.iter().copied().filter(|&b| b != NO_BACKEND).collect())
                    .unwrap_or_default();
                VipView {
                    name: v.name.clone(),
                    address: v.address,
                    port: v.port,
                    protocol: v.protocol,
                    index: self.state.vip_index(&id).unwrap_or(u32::MAX),
                    ring_size: v.ring_size,
                    backends: v.backends.len(),
                    backends_in_ring: in_ring.len(),
                    health_check: v.health_check.kind.to_string(),
                    forwarding: v.forwarding,
                    snat_addresses: v.snat_addresses.clone(),
                    acl_allow: v.acl.allow.len(),
                    acl_deny: v.acl.deny.len(),
                    scheduler: v.scheduler,
                    rate_limit: crate::control::RateLimitView {
                        new_per_source: v.rate_limit.new_per_source,
                        packets_per_source: v.rate_limit.packets_per_source,
                        new_per_vip: v.rate_limit.new_per_vip,
                        source_prefix_v4: v.rate_limit.source_prefix_v4,
                        source_prefix_v6: v.rate_limit.source_prefix_v6,
                    },
                    announced,
                    announce,
                }
            })
            .collect()
    }

    pub(super) fn backend_list(&self, only: Option<usize>) -> Vec<BackendView> {
        let mut out = Vec::new();
        let flows = self.maps.active_flows();
        for (i, v) in self.cfg.vips.iter().enumerate() {
            if only.is_some_and(|o| o != i) {
                continue;
            }
            let vip = VipId::of(v);
            let active = self.lc_counts(v);
            // Slots per backend id in one pass over the ring.
            let mut slots_of = std::collections::HashMap::<u32, u32>::new();
            for &id in self.image.ring(&vip.kernel_key()).unwrap_or_default() {
                *slots_of.entry(id).or_default() += 1;
            }
            for b in &v.backends {
                let key = BackendKey {
                    vip,
                    address: b.address,
                };
                let Some(status) = self.state.backend(&key) else {
                    continue;
                };
                let slots = slots_of.get(&status.id).copied().unwrap_or(0);
                out.push(BackendView {
                    vip: v.name.clone(),
                    address: b.address,
                    id: status.id,
                    weight: b.weight,
                    state: b.state.as_str().into(),
                    health: status.health(),
                    last_check: status.last_check.clone(),
                    slots,
                    mac: status
                        .next_hop
                        .as_ref()
                        .map(|n| MacAddr(n.dst_mac).to_string()),
                    iface: status.next_hop.as_ref().map(|n| n.iface.clone()),
                    gateway: status.next_hop.as_ref().and_then(|n| n.gateway),
                    next_hop_error: status.next_hop_error.clone(),
                    flows: flows
                        .as_ref()
                        .map(|f| f.get(&status.id).copied().unwrap_or(0)),
                    port: (v.forwarding == Forwarding::Nat).then(|| v.backend_port(b)),
                    active_connections: active
                        .as_ref()
                        .map(|a| a.get(&status.id).copied().unwrap_or(0)),
                });
            }
        }
        out
    }

    /// Where a flow goes now, from the kernel's own hash, the ring and the
    /// conntrack entry, without running the program.
    fn explain(
        &self,
        src: SocketAddr,
        dst: SocketAddr,
        protocol: Protocol,
    ) -> anyhow::Result<ExplainView> {
        let vid = VipId {
            address: dst.ip(),
            port: dst.port(),
            protocol,
        };
        let vip = self
            .cfg
            .vips
            .iter()
            .find(|v| VipId::of(v) == vid)
            .ok_or_else(|| {
                anyhow::anyhow!(
                    "{dst}/{} is not a VIP: lb passes this flow to the kernel untouched",
                    protocol.as_str()
                )
            })?;
        // The flow key and hash of the VIP's family, as the kernel builds
        // them.
        let key = match (src.ip(), dst.ip()) {
            (IpAddr::V4(s), IpAddr::V4(d)) => FlowKeyOf::V4(FlowKey::new(
                s.to_bits(),
                src.port(),
                d.to_bits(),
                dst.port(),
                protocol.number(),
            )),
            (IpAddr::V6(s), IpAddr::V6(d)) => FlowKeyOf::V6(FlowKey6::new(
                s,
                src.port(),
                d,
                dst.port(),
                protocol.number(),
            )),
            _ => bail!("the source {src} and the VIP {dst} are not of the same address family"),
        };
        let hash = match &key {
            FlowKeyOf::V4(k) => k.hash(),
            FlowKeyOf::V6(k) => k.hash(),
        };
        let slot = ring_slot(hash, vip.ring_size);
        let info = self.image.vips.get(&vid.kernel_key());
        let ring_id = self
            .image
            .ring(&vid.kernel_key())
            .and_then(|r| r.get(slot as usize).copied());
        let addr_of = |id: u32| self.image.backends.get(&id).map(backend_address);
        let ring_backend = ring_id.filter(|&id| id != NO_BACKEND).and_then(addr_of);
        let index = info.map(|i| i.index);
        let tracked = match &key {
            FlowKeyOf::V4(k) => self.maps.conntrack_lookup(k),
            FlowKeyOf::V6(k) => self.maps.conntrack6_lookup(k),
        }
        .map_err(|e| anyhow::anyhow!("reading conntrack: {e}"))?
        .map(|e| e.backend_id);
        let tracked_ok = tracked.and_then(|id| {
            self.image
                .backends
                .get(&id)
                .filter(|b| b.is_usable() && Some(b.vip_index) == index)
        });
        let conntrack_backend = tracked.and_then(addr_of);
        let ring_entry = ring_id
            .filter(|&id| id != NO_BACKEND)
            .and_then(|id| self.image.backends.get(&id));
        let decision = self.sched_decision(vip, index);
        let (entry, reason) = match (tracked_ok, ring_entry, &decision) {
            (Some(b), _, _) => (Some(b), "established flow: conntrack entry".to_string()),
            (None, _, Some(d)) => (
                d.backend.and_then(|id| self.image.backends.get(&id)),
                format!(
                    "{}: {} decides",
                    if tracked.is_some() {
                        "conntrack entry names an unusable backend"
                    } else {
                        "new flow"
                    },
                    vip.scheduler
                ),
            ),
            (None, Some(r), None) if tracked.is_some() => (
                Some(r),
                "conntrack entry names an unusable backend: re-steered by the ring".into(),
            ),
            (None, Some(r), None) => (Some(r), "new flow: Maglev ring slot".into()),
            (None, None, None) => (None, "no usable backend: packets are dropped".into()),
        };
        let backend = entry.map(backend_address);
        // What the kernel writes in front of the packet: the same entry
        // fields and the same port function.
        let outer = entry
            .filter(|_| vip.forwarding.is_tunnel())
            .map(|b| OuterView {
                src: backend_encap_source(b).unwrap_or(if backend_address(b).is_ipv4() {
                    IpAddr::V4(std::net::Ipv4Addr::UNSPECIFIED)
                } else {
                    IpAddr::V6(std::net::Ipv6Addr::UNSPECIFIED)
                }),
                dst: backend_address(b),
                forwarding: vip.forwarding,
                src_port: (vip.forwarding == Forwarding::Gue)
                    .then(|| lb_common::gue_source_port(hash)),
                dst_port: (vip.forwarding == Forwarding::Gue)
                    .then_some(self.cfg.agent.encap.gue_port),
            });
        let (mut backend, mut reason) = (backend, reason);
        let nat = if vip.forwarding == Forwarding::Nat {
            let (view, established) = self.explain_nat(vip, &key, hash, entry)?;
            if let Some(b) = established {
                // The kernel follows the flow's NAT entry.
                backend = Some(b);
                reason = "established NAT flow: NAT_FWD entry".into();
            }
            Some(view)
        } else {
            None
        };
        let acl = (!vip.acl.is_empty()).then(|| {
            let d = vip.acl.decide(src.ip());
            AclView {
                allowed: d.allowed,
                by: match d.by {
                    Some(c) if d.allowed => format!("allow {c}"),
                    Some(c) => format!("deny {c}"),
                    None if d.allowed => "default (no allow list)".into(),
                    None => "default (not in the allow list)".into(),
                },
            }
        });
        if let Some(a) = acl.as_ref().filter(|a| !a.allowed) {
            // Dropped before steering, whatever conntrack holds.
            backend = None;
            reason = format!(
                "source denied by the VIP's ACL ({}): packets are dropped (drop_acl_denied)",
                a.by
            );
        }
        Ok(ExplainView {
            acl,
            vip: vip.name.clone(),
            hash,
            slot,
            ring_size: vip.ring_size,
            ring_backend,
            conntrack_backend,
            backend,
            reason,
            outer,
            nat,
            scheduler: vip.scheduler,
            scheduler_state: decision.map(|d| d.state),
        })
    }
}

/// A flow's conntrack key, of its family.
pub(super) enum FlowKeyOf {
    V4(FlowKey),
    V6(FlowKey6),
}

fn check_weight(w: u32) -> anyhow::Result<()> {
    if !(1..=crate::config::MAX_WEIGHT).contains(&w) {
        bail!(
            "weight {w} is out of range 1..={}",
            crate::config::MAX_WEIGHT
        );
    }
    Ok(())
}
