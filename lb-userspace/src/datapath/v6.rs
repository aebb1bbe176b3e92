//! The IPv6 maps as userspace sees them: the VIP table VIPS6 (same size,
//! probe sequence and two-write insertion as VIPS) and CONNTRACK6, and the
//! backend entry of an IPv6 backend. [`KernelMaps`](crate::reconcile::KernelMaps)
//! dispatches IPv6 VIP entries here.

use std::{collections::BTreeMap, net::Ipv6Addr};

use aya::maps::{Array, MapData};
use lb_common::{
    BACKEND_FLAG_USABLE, BACKEND_FLAG_V6, Backend, FlowEntry, FlowKey6, VIP6_SLOT_EMPTY,
    VIP6_SLOT_TOMBSTONE, VipInfo, VipKey6, VipSlot6, addr6_words, map_names,
};

use super::{Datapath, DatapathError, Result, map_err};

impl Datapath {
    fn vip6_slot(&self, at: u32) -> Result<VipSlot6> {
        let map: Array<&MapData, VipSlot6> =
            Array::try_from(self.map(map_names::VIPS6)).map_err(map_err(map_names::VIPS6))?;
        map.get(&at, 0).map_err(map_err(map_names::VIPS6))
    }

    fn write_vip6_slot(&mut self, at: u32, slot: VipSlot6) -> Result<()> {
        let mut map: Array<&mut MapData, VipSlot6> =
            Array::try_from(self.map_mut(map_names::VIPS6)).map_err(map_err(map_names::VIPS6))?;
        map.set(at, slot, 0).map_err(map_err(map_names::VIPS6))
    }

    /// `key`'s probe sequence in VIPS6 (as the kernel walks it): (slot
    /// index, slot) pairs, read from the map.
    fn vip6_probe(&self, key: &VipKey6) -> Result<Vec<(u32, VipSlot6)>> {
        let mask = lb_common::vip_table_size(self.sizes.max_vips) - 1;
        lb_common::vip_table_probe6(key, mask)
            .map(|at| Ok((at, self.vip6_slot(at)?)))
            .collect()
    }

    fn find_vip6_slot(&self, key: &VipKey6) -> Result<Option<u32>> {
        for (at, slot) in self.vip6_probe(key)? {
            if slot.key == VIP6_SLOT_EMPTY {
                return Ok(None);
            }
            if slot.key == *key {
                return Ok(Some(at));
            }
        }
        Ok(None)
    }

    /// Inserts or updates an IPv6 VIP entry, as [`Datapath::set_vip`]: a
    /// new key goes to the first free slot of its probe sequence in two
    /// writes (info under a tombstone key, then the key).
    pub fn set_vip6(&mut self, key: VipKey6, info: VipInfo) -> Result<()> {
        self.check("VIP index", info.index, self.sizes.max_vips)?;
        if key.addr == VIP6_SLOT_EMPTY.addr || key.addr == VIP6_SLOT_TOMBSTONE.addr {
            return Err(DatapathError::BadVip6(lb_common::addr6_of_words(key.addr)));
        }
        if let Some(at) = self.find_vip6_slot(&key)? {
            return self.write_vip6_slot(at, VipSlot6 { key, info });
        }
        let free = self
            .vip6_probe(&key)?
            .into_iter()
            .find(|(_, s)| s.key == VIP6_SLOT_EMPTY || s.key == VIP6_SLOT_TOMBSTONE)
            .map(|(at, _)| at)
            .ok_or(DatapathError::VipTableFull {
                slots: lb_common::vip_table_size(self.sizes.max_vips) as usize,
            })?;
        let tomb = VipSlot6 {
            key: VIP6_SLOT_TOMBSTONE,
            info,
        };
        self.write_vip6_slot(free, tomb)?;
        self.write_vip6_slot(free, VipSlot6 { key, info })
    }

    /// Removes an IPv6 VIP entry: its key becomes a tombstone.
    pub fn remove_vip6(&mut self, key: &VipKey6) -> Result<()> {
        if let Some(at) = self.find_vip6_slot(key)? {
            let info = self.vip6_slot(at)?.info;
            let tomb = VipSlot6 {
                key: VIP6_SLOT_TOMBSTONE,
                info,
            };
            self.write_vip6_slot(at, tomb)?;
        }
        Ok(())
    }

    /// Every IPv6 VIP entry (services and address markers), read from the
    /// map (the agent keeps no mirror of VIPS6: it is read at start only).
    pub fn vips6(&self) -> Result<BTreeMap<VipKey6, VipInfo>> {
        let map: Array<&MapData, VipSlot6> =
            Array::try_from(self.map(map_names::VIPS6)).map_err(map_err(map_names::VIPS6))?;
        let mut out = BTreeMap::new();
        for slot in map.iter() {
            let slot = slot.map_err(map_err(map_names::VIPS6))?;
            if slot.key != VIP6_SLOT_EMPTY && slot.key != VIP6_SLOT_TOMBSTONE {
                out.insert(slot.key, slot.info);
            }
        }
        Ok(out)
    }

    /// Every CONNTRACK6 record.
    pub fn conntrack6_entries(&self) -> Result<Vec<(FlowKey6, FlowEntry)>> {
        let map: aya::maps::HashMap<&MapData, FlowKey6, FlowEntry> =
            aya::maps::HashMap::try_from(self.map(map_names::CONNTRACK6))
                .map_err(map_err(map_names::CONNTRACK6))?;
        map.iter()
            .collect::<std::result::Result<_, _>>()
            .map_err(map_err(map_names::CONNTRACK6))
    }

    pub fn conntrack6_lookup(&self, key: &FlowKey6) -> Result<Option<FlowEntry>> {
        self.hash_lookup(map_names::CONNTRACK6, key)
    }
}

/// Builds the backend map entry of an IPv6 backend (see
/// [`super::backend_entry`] for IPv4).
pub fn backend_entry6(
    addr: Ipv6Addr,
    ifindex: u32,
    vip_index: u32,
    usable: bool,
    dst_mac: [u8; 6],
    src_mac: [u8; 6],
) -> Backend {
    Backend {
        addr: 0,
        ifindex,
        vip_index,
        flags: BACKEND_FLAG_V6 | if usable { BACKEND_FLAG_USABLE } else { 0 },
        dst_mac,
        src_mac,
        encap_src: 0,
        addr6: addr6_words(addr),
        encap_src6: [0; 4],
        port: 0,
        _pad: 0,
    }
}
