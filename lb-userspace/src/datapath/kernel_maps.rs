//! [`KernelMaps`] on the real maps: what the agent's core writes and reads.

use std::collections::BTreeMap;

use lb_common::{Backend, BackendStats, FlowEntry, FlowKey, FlowKey6, VipInfo, VipStats};

use super::{Datapath, DatapathError, Result};
use crate::{
    nat_keeper::NatKey as _,
    reconcile::{KernelImage, KernelMaps, NatPair, VipEntryKey},
};

impl KernelMaps for Datapath {
    type Error = DatapathError;

    fn set_backend(&mut self, id: u32, backend: Backend) -> Result<()> {
        Datapath::set_backend(self, id, backend)
    }

    fn remove_backend(&mut self, id: u32) -> Result<()> {
        Datapath::set_backend(self, id, Backend::EMPTY)
    }

    fn write_ring(&mut self, ring_base: u32, slots: &[(u32, u32)]) -> Result<()> {
        Datapath::write_ring(self, ring_base, slots.iter().copied()).map(|_| ())
    }

    fn set_vip(&mut self, key: VipEntryKey, info: VipInfo) -> Result<()> {
        match key {
            VipEntryKey::V4(k) => Datapath::set_vip(self, k, info),
            VipEntryKey::V6(k) => Datapath::set_vip6(self, k, info),
        }
    }

    fn remove_vip(&mut self, key: &VipEntryKey) -> Result<()> {
        match key {
            VipEntryKey::V4(k) => Datapath::remove_vip(self, k),
            VipEntryKey::V6(k) => Datapath::remove_vip6(self, k),
        }
    }

    fn add_tx_port(&mut self, ifindex: u32) -> Result<()> {
        Datapath::add_tx_port(self, ifindex)
    }

    fn set_nat_snat(&mut self, index: u32, snat: lb_common::nat::NatSnat) -> Result<()> {
        Datapath::set_nat_snat(self, index, snat)
    }

    fn limited_sources(&self, n: usize) -> Vec<crate::datapath::LimitedSource> {
        Datapath::limited_sources(self, n).unwrap_or_default()
    }

    fn set_rate_limits(
        &mut self,
        index: u32,
        limits: lb_common::ratelimit::RateLimits,
    ) -> Result<()> {
        Datapath::set_rate_limits(self, index, limits)
    }

    fn write_sched_slots(
        &mut self,
        index: u32,
        slots: &[(u32, lb_common::sched::SchedSlot)],
    ) -> Result<()> {
        Datapath::write_sched_slots(self, index, slots)
    }

    fn set_sched(&mut self, index: u32, info: lb_common::sched::SchedInfo) -> Result<()> {
        Datapath::set_sched(self, index, info)
    }

    fn lc_active(&self, ids: &[u32]) -> Result<BTreeMap<u32, u64>> {
        Datapath::lc_active(self, ids)
    }

    /// What an earlier agent (or this one) left in the maps.
    fn read_image(&self) -> Result<KernelImage> {
        let mut img = KernelImage::default();
        let v4 = self
            .vips()?
            .into_iter()
            .map(|(k, i)| (VipEntryKey::V4(k), i));
        let v6 = self
            .vips6()?
            .into_iter()
            .map(|(k, i)| (VipEntryKey::V6(k), i));
        for (key, info) in v4.chain(v6) {
            if !info.is_address_only() {
                img.rings.insert(
                    info.ring_base,
                    self.read_ring(info.ring_base, info.ring_size)?,
                );
                if info.forwarding == lb_common::FORWARD_NAT {
                    img.snat.insert(info.index, self.nat_snat(info.index)?);
                }
                // Not pinned: after a new load, all zero (and rewritten).
                let limits = self.rate_limits(info.index)?;
                if limits.any() {
                    img.rate.insert(info.index, limits);
                }
                img.sched.insert(info.index, self.sched(info.index)?);
            }
            img.vips.insert(key, info);
        }
        img.acl = crate::acl::AclMaps::acl_read(self)?;
        for id in 0..self.sizes.backend_slots() {
            let b = self.backend(id)?;
            if b.is_present() {
                img.backends.insert(id, b);
            }
        }
        Ok(img)
    }

    fn conntrack_lookup(&self, key: &FlowKey) -> Result<Option<FlowEntry>> {
        Datapath::conntrack_lookup(self, key)
    }

    fn conntrack6_lookup(&self, key: &FlowKey6) -> Result<Option<FlowEntry>> {
        Datapath::conntrack6_lookup(self, key)
    }

    fn conntrack_len(&self) -> Result<usize> {
        Ok(self.conntrack_entries()?.len() + self.conntrack6_entries()?.len())
    }

    fn nat_pair(&self, key: &FlowKey) -> Result<Option<NatPair<FlowKey>>> {
        let Some(f) = self.nat_fwd(key)? else {
            return Ok(None);
        };
        let rk = FlowKey::reverse_of(&f, key.proto);
        Ok(Some((f, self.nat_rev(&rk)?.map(|r| (rk, r)))))
    }

    fn nat_pair6(&self, key: &FlowKey6) -> Result<Option<NatPair<FlowKey6>>> {
        let Some(f) = self.nat_fwd6(key)? else {
            return Ok(None);
        };
        let rk = FlowKey6::reverse_of(&f, key.proto);
        Ok(Some((f, self.nat_rev6(&rk)?.map(|r| (rk, r)))))
    }

    fn nat_entries(&self) -> Option<u64> {
        self.flow_count()
            .filter(|c| c.at.is_some())
            .map(|c| c.nat.fwd_entries)
    }

    fn conntrack_records(&self) -> Option<(u64, u64)> {
        self.flow_count()
            .filter(|c| c.at.is_some())
            .map(|c| (c.records - c.records6, c.records6))
    }

    fn vip_stats(&self, index: u32) -> Result<VipStats> {
        Datapath::vip_stats(self, index)
    }

    fn backend_stats(&self, id: u32) -> Result<BackendStats> {
        Datapath::backend_stats(self, id)
    }

    fn reason_stats(&self) -> Result<BTreeMap<&'static str, u64>> {
        Datapath::reason_stats(self)
    }

    fn active_flows(&self) -> Option<BTreeMap<u32, u64>> {
        self.flow_count()
            .filter(|c| c.at.is_some())
            .map(|c| c.per_backend)
    }
}
