//! The agent's core: configuration, desired state and the kernel image,
//! driven by events (health results, next hops, requests) and written to
//! the maps through [`KernelMaps`]. No sockets, files or tasks: unit-tested
//! against the in-memory fake.

use std::time::Duration;

use log::{info, warn};

use super::state::State;
use crate::{
    config::Config,
    health::HealthEvent,
    keys::BackendKey,
    neigh::NextHopSource,
    reconcile::{self, KernelImage, KernelMaps},
};

pub struct Core<M: KernelMaps> {
    pub(super) cfg: Config,
    pub(super) state: State,
    /// What the maps hold, as far as the agent knows.
    pub(super) image: KernelImage,
    pub(super) maps: M,
}

impl<M: KernelMaps> Core<M> {
    /// Takes over what the maps hold (`image`, read from `maps`: ids,
    /// usability) and gives every configured backend an id. Writes nothing
    /// yet.
    pub fn new(cfg: Config, maps: M, image: KernelImage) -> Self {
        let mut state = State::adopt(&cfg, &image);
        for p in state.sync(&cfg, &image, true) {
            warn!("{p}");
        }
        Self {
            cfg,
            state,
            image,
            maps,
        }
    }

    pub fn into_maps(self) -> M {
        self.maps
    }

    pub fn config(&self) -> &Config {
        &self.cfg
    }

    pub fn image(&self) -> &KernelImage {
        &self.image
    }

    pub fn maps(&self) -> &M {
        &self.maps
    }

    pub fn maps_mut(&mut self) -> &mut M {
        &mut self.maps
    }

    /// Brings the kernel maps to the target, in the safe order. Returns the
    /// number of map updates.
    pub fn reconcile(&mut self) -> anyhow::Result<usize> {
        let target = self.state.target(&self.cfg)?;
        let ops = reconcile::plan(&self.image, &target);
        let slots = reconcile::execute(&mut self.maps, &mut self.image, &ops)?;
        if !ops.is_empty() {
            info!("reconciled: {} map updates ({slots} ring slots)", ops.len());
        }
        Ok(ops.len())
    }

    /// Records a health check result; true when the kernel needs an update.
    pub fn on_health(&mut self, ev: HealthEvent) -> bool {
        self.state
            .record_health(&ev.key, ev.up, ev.outcome.to_string())
    }

    /// Finds the next hop of backends that have none yet: primes every
    /// missing one first, then waits up to `wait` once.
    pub fn resolve_next_hops(&mut self, source: &mut impl NextHopSource, wait: Duration) {
        let missing = self.state.unresolved();
        for k in &missing {
            source.prime(k.address);
        }
        for k in missing {
            let result = source
                .next_hop(k.address, self.mac_override(&k), wait)
                .map_err(|e| e.to_string());
            if let Ok(nh) = &result
                && let Err(e) = self.maps.add_tx_port(nh.ifindex)
            {
                warn!("TX port {}: {e}", nh.iface);
            }
            if let Err(e) = &result
                && self
                    .state
                    .backend(&k)
                    .and_then(|b| b.next_hop_error.as_ref())
                    != Some(e)
            {
                warn!("backend {k}: {e}; it gets no traffic until resolved");
            }
            self.state.set_next_hop(&k, result);
        }
    }

    fn mac_override(&self, k: &BackendKey) -> Option<[u8; 6]> {
        self.cfg
            .vips
            .iter()
            .filter(|v| crate::keys::VipId::of(v) == k.vip)
            .flat_map(|v| &v.backends)
            .find(|b| b.address == k.address)
            .and_then(|b| b.mac)
    }

    /// After the configuration changed: ids for new backends, their next
    /// hops, then the maps.
    pub fn after_change(
        &mut self,
        source: &mut impl NextHopSource,
        wait: Duration,
    ) -> anyhow::Result<()> {
        for p in self.state.sync(&self.cfg, &self.image, false) {
            warn!("{p}");
        }
        self.resolve_next_hops(source, wait);
        self.reconcile()?;
        Ok(())
    }
}
