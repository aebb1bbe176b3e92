//! The desired state: from configuration, health and next hops to the
//! kernel image the maps should hold. No I/O: the agent feeds it events and
//! applies what [`State::target`] returns.

use std::{
    collections::{BTreeMap, BTreeSet},
    net::Ipv4Addr,
};

use lb_common::{FIRST_BACKEND_ID, VIP_FLAG_ADDR_ONLY, VipInfo};

use crate::{
    config::{BackendState, Config},
    control::Health,
    datapath::backend_entry,
    health::starts_up,
    keys::{BackendKey, VipId},
    maglev::{MaglevBackend, MaglevError, MaglevTable},
    neigh::NextHop,
    reconcile::KernelImage,
};

/// What the agent knows of one backend besides its configuration.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct BackendStatus {
    /// Index into the backend map; a local label, stable for the
    /// backend's life and across agent restarts.
    pub id: u32,
    /// What the health checks say.
    pub up: bool,
    pub last_check: Option<String>,
    pub next_hop: Option<NextHop>,
    /// Why the next hop is unknown, when it is.
    pub next_hop_error: Option<String>,
}

impl BackendStatus {
    fn new(id: u32, up: bool) -> Self {
        Self {
            id,
            up,
            last_check: None,
            next_hop: None,
            next_hop_error: None,
        }
    }

    pub fn health(&self) -> Health {
        match (self.up, &self.next_hop) {
            (_, None) => Health::Unresolved,
            (true, Some(_)) => Health::Up,
            (false, Some(_)) => Health::Down,
        }
    }

    /// May take new flows and keep its established ones.
    pub fn is_usable(&self) -> bool {
        self.health() == Health::Up
    }
}

/// VIP indices and backend ids in use, with each backend's status.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct State {
    vip_index: BTreeMap<VipId, u32>,
    backends: BTreeMap<BackendKey, BackendStatus>,
}

impl State {
    /// Takes over the VIP indices and backend ids found in the kernel (an
    /// earlier agent's), so that conntrack entries keep naming the same
    /// backends; a backend keeps the usability it had there.
    pub fn adopt(cfg: &Config, kernel: &KernelImage) -> Self {
        let mut state = State::default();
        let mut by_index = BTreeMap::new();
        for vip in cfg.vips.iter().map(VipId::of) {
            if let Some(info) = kernel.vips.get(&vip.kernel_key()) {
                by_index.insert(info.index, vip);
                state.vip_index.insert(vip, info.index);
            }
        }
        for (&id, b) in &kernel.backends {
            if let Some(&vip) = by_index.get(&b.vip_index) {
                let address = Ipv4Addr::from(u32::from_be(b.addr));
                state.backends.insert(
                    BackendKey { vip, address },
                    BackendStatus::new(id, b.is_usable()),
                );
            }
        }
        state
    }

    /// Gives configured VIPs and backends an index or id (never one the
    /// kernel still holds) and forgets those no longer configured.
    /// `at_start`: new backends start up (the first failed checks take
    /// them out); later additions start down unless they are not checked.
    /// Returns what could not be given an id.
    pub fn sync(&mut self, cfg: &Config, kernel: &KernelImage, at_start: bool) -> Vec<String> {
        let mut problems = Vec::new();
        let mut wanted = BTreeSet::new();
        for vip in &cfg.vips {
            let vid = VipId::of(vip);
            if !self.vip_index.contains_key(&vid) {
                match self.free_vip_index(cfg, kernel) {
                    Some(i) => {
                        self.vip_index.insert(vid, i);
                    }
                    None => {
                        problems.push(format!(
                            "VIP {}: all {} VIP slots are in use",
                            vip.name, cfg.agent.kernel.max_vips
                        ));
                        continue;
                    }
                }
            }
            for b in &vip.backends {
                let key = BackendKey {
                    vip: vid,
                    address: b.address,
                };
                wanted.insert(key);
                if self.backends.contains_key(&key) {
                    continue;
                }
                let Some(id) = self.free_backend_id(cfg, kernel) else {
                    problems.push(format!(
                        "backend {} of {}: all {} backend slots are in use",
                        b.address, vip.name, cfg.agent.kernel.max_backends
                    ));
                    continue;
                };
                let up = at_start || starts_up(&b.health_check);
                self.backends.insert(key, BackendStatus::new(id, up));
            }
        }
        self.backends.retain(|k, _| wanted.contains(k));
        let live: BTreeSet<VipId> = cfg.vips.iter().map(VipId::of).collect();
        self.vip_index.retain(|k, _| live.contains(k));
        problems
    }

    fn free_vip_index(&self, cfg: &Config, kernel: &KernelImage) -> Option<u32> {
        let used: BTreeSet<u32> = self
            .vip_index
            .values()
            .copied()
            .chain(kernel.vips.values().map(|v| v.index))
            .collect();
        (0..cfg.agent.kernel.max_vips).find(|i| !used.contains(i))
    }

    fn free_backend_id(&self, cfg: &Config, kernel: &KernelImage) -> Option<u32> {
        let used: BTreeSet<u32> = self
            .backends
            .values()
            .map(|b| b.id)
            .chain(kernel.backends.keys().copied())
            .collect();
        (FIRST_BACKEND_ID..=cfg.agent.kernel.max_backends).find(|i| !used.contains(i))
    }

    /// Records a health check result; true when the backend's up/down
    /// state changed.
    pub fn record_health(&mut self, key: &BackendKey, up: bool, outcome: String) -> bool {
        let Some(b) = self.backends.get_mut(key) else {
            return false;
        };
        b.last_check = Some(outcome);
        std::mem::replace(&mut b.up, up) != up
    }

    /// Records how `key` is reached now, or why that is unknown.
    pub fn set_next_hop(&mut self, key: &BackendKey, next_hop: Result<NextHop, String>) {
        if let Some(b) = self.backends.get_mut(key) {
            match next_hop {
                Ok(nh) => {
                    b.next_hop = Some(nh);
                    b.next_hop_error = None;
                }
                Err(e) => b.next_hop_error = Some(e),
            }
        }
    }

    /// Backends whose next hop is not known yet.
    pub fn unresolved(&self) -> Vec<BackendKey> {
        self.backends
            .iter()
            .filter(|(_, b)| b.next_hop.is_none())
            .map(|(k, _)| *k)
            .collect()
    }

    pub fn vip_index(&self, vip: &VipId) -> Option<u32> {
        self.vip_index.get(vip).copied()
    }

    pub fn backend(&self, key: &BackendKey) -> Option<&BackendStatus> {
        self.backends.get(key)
    }

    pub fn backends(&self) -> impl Iterator<Item = (&BackendKey, &BackendStatus)> {
        self.backends.iter()
    }

    /// The kernel contents `cfg` and the backends' status call for: per
    /// VIP its entry, its address marker and its Maglev ring over the
    /// usable, non-drained backends; every known backend's entry (usable
    /// or not, so its established flows can be re-steered).
    pub fn target(&self, cfg: &Config) -> Result<KernelImage, MaglevError> {
        let mut img = KernelImage::default();
        for vip in &cfg.vips {
            let vid = VipId::of(vip);
            let Some(index) = self.vip_index(&vid) else {
                continue;
            };
            let info = VipInfo {
                index,
                ring_base: index * cfg.agent.kernel.ring_size,
                ring_size: vip.ring_size,
                flags: 0,
            };
            let mut members = Vec::new();
            for b in &vip.backends {
                let Some(status) = self.backends.get(&BackendKey {
                    vip: vid,
                    address: b.address,
                }) else {
                    continue;
                };
                let usable = status.is_usable();
                let (ifindex, dst, src) = status
                    .next_hop
                    .as_ref()
                    .map(|n| (n.ifindex, n.dst_mac, n.src_mac))
                    .unwrap_or_default();
                img.backends.insert(
                    status.id,
                    backend_entry(b.address, ifindex, index, usable, dst, src),
                );
                let weight = match b.state {
                    BackendState::Drain => 0,
                    BackendState::Active => b.weight,
                };
                if usable && weight > 0 {
                    members.push(MaglevBackend {
                        // The ring depends on addresses and weights only,
                        // never on the local ids.
                        key: (u64::from(b.address.to_bits()) << 16) | u64::from(vip.port),
                        id: status.id,
                        weight,
                    });
                }
            }
            let ring = MaglevTable::build(&members, vip.ring_size)?;
            img.vips.insert(vid.kernel_key(), info);
            img.rings.insert(info.ring_base, ring.slots().to_vec());
            img.vips.entry(vid.address_key()).or_insert(VipInfo {
                flags: VIP_FLAG_ADDR_ONLY,
                ..info
            });
        }
        Ok(img)
    }
}
