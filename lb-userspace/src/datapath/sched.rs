//! The scheduler maps as userspace sees them (see lb_common::sched): the
//! per-VIP SCHED element and slot region the agent writes, and the
//! least-connections counters (LC_ACTIVE, the kernel's; LC_CORRECTION,
//! the agent's).

use std::collections::BTreeMap;

use aya::maps::{Array, MapData};
use lb_common::{
    map_names,
    sched::{SCHED_SLOTS_PER_VIP, SchedInfo, SchedSlot, sched_slot_index},
};

use super::{Datapath, DatapathError, Result, map_err};
use crate::sched::{VipSched, active_count};

impl Datapath {
    /// Writes SCHED at VIP index `vip_index`.
    pub fn set_sched(&mut self, vip_index: u32, info: SchedInfo) -> Result<()> {
        self.check("VIP index", vip_index, self.sizes.max_vips)?;
        let mut map: Array<&mut MapData, SchedInfo> =
            Array::try_from(self.map_mut(map_names::SCHED)).map_err(map_err(map_names::SCHED))?;
        map.set(vip_index, info, 0)
            .map_err(map_err(map_names::SCHED))
    }

    /// Writes `(slot, value)` pairs of VIP index `vip_index`'s region, one
    /// element at a time, in order.
    pub fn write_sched_slots(&mut self, vip_index: u32, slots: &[(u32, SchedSlot)]) -> Result<()> {
        self.check("VIP index", vip_index, self.sizes.max_vips)?;
        let mut map: Array<&mut MapData, SchedSlot> =
            Array::try_from(self.map_mut(map_names::SCHED_SLOTS))
                .map_err(map_err(map_names::SCHED_SLOTS))?;
        for &(i, s) in slots {
            if i >= SCHED_SLOTS_PER_VIP {
                return Err(DatapathError::OutOfRange {
                    what: "scheduler slot",
                    index: i,
                    max: SCHED_SLOTS_PER_VIP,
                });
            }
            map.set(sched_slot_index(vip_index, i), s, 0)
                .map_err(map_err(map_names::SCHED_SLOTS))?;
        }
        Ok(())
    }

    /// VIP index `vip_index`'s scheduler: its SCHED element and the slots
    /// that element makes read.
    pub fn sched(&self, vip_index: u32) -> Result<VipSched> {
        self.check("VIP index", vip_index, self.sizes.max_vips)?;
        let info = Array::<&MapData, SchedInfo>::try_from(self.map(map_names::SCHED))
            .map_err(map_err(map_names::SCHED))?
            .get(&vip_index, 0)
            .map_err(map_err(map_names::SCHED))?;
        let map: Array<&MapData, SchedSlot> = Array::try_from(self.map(map_names::SCHED_SLOTS))
            .map_err(map_err(map_names::SCHED_SLOTS))?;
        let slots = (0..info.len.min(SCHED_SLOTS_PER_VIP))
            .map(|i| {
                map.get(&sched_slot_index(vip_index, i), 0)
                    .map_err(map_err(map_names::SCHED_SLOTS))
            })
            .collect::<Result<Vec<_>>>()?;
        Ok(VipSched { info, slots })
    }

    /// Backend id → active connections as the kernel compares them, for
    /// `ids`.
    pub fn lc_active(&self, ids: &[u32]) -> Result<BTreeMap<u32, u64>> {
        let active: Array<&MapData, u64> = Array::try_from(self.map(map_names::LC_ACTIVE))
            .map_err(map_err(map_names::LC_ACTIVE))?;
        let corr: Array<&MapData, u64> = Array::try_from(self.map(map_names::LC_CORRECTION))
            .map_err(map_err(map_names::LC_CORRECTION))?;
        ids.iter()
            .map(|&id| {
                let a = active.get(&id, 0).map_err(map_err(map_names::LC_ACTIVE))?;
                let c = corr
                    .get(&id, 0)
                    .map_err(map_err(map_names::LC_CORRECTION))?;
                Ok((id, active_count(a, c)))
            })
            .collect()
    }
}

impl Datapath {
    /// Backend `id`'s raw least-connections words: the kernel's counter
    /// and the agent's correction.
    pub fn lc_words(&self, id: u32) -> Result<(u64, u64)> {
        let active: Array<&MapData, u64> = Array::try_from(self.map(map_names::LC_ACTIVE))
            .map_err(map_err(map_names::LC_ACTIVE))?;
        let corr: Array<&MapData, u64> = Array::try_from(self.map(map_names::LC_CORRECTION))
            .map_err(map_err(map_names::LC_CORRECTION))?;
        Ok((
            active.get(&id, 0).map_err(map_err(map_names::LC_ACTIVE))?,
            corr.get(&id, 0)
                .map_err(map_err(map_names::LC_CORRECTION))?,
        ))
    }

    /// Writes backend `id`'s correction word (the agent is its only
    /// writer; see [`crate::sched::corrections`]).
    pub fn set_lc_correction(&mut self, id: u32, correction: u64) -> Result<()> {
        self.check("backend id", id, self.sizes.backend_slots())?;
        let mut map: Array<&mut MapData, u64> =
            Array::try_from(self.map_mut(map_names::LC_CORRECTION))
                .map_err(map_err(map_names::LC_CORRECTION))?;
        map.set(id, correction, 0)
            .map_err(map_err(map_names::LC_CORRECTION))
    }
}
