//! The NAT maps as userspace sees them (see lb_common::nat): the per-VIP
//! SNAT addresses the agent writes, and the NAT flows the kernel records,
//! read for `lb explain`, tests and diagnostics (whole-map walks: not for
//! a hot loop; the flow keeper reads them with batched lookups).

use aya::maps::{Array, HashMap, MapData};
use lb_common::{
    FlowKey, FlowKey6, map_names,
    nat::{NatFwd, NatRev, NatSnat},
};

use super::{Datapath, Result, map_err};

impl Datapath {
    /// Sets the SNAT addresses of the NAT VIP with index `vip_index`
    /// (`count == 0`: each backend's route source).
    pub fn set_nat_snat(&mut self, vip_index: u32, snat: NatSnat) -> Result<()> {
        self.check("VIP index", vip_index, self.sizes.max_vips)?;
        let mut map: Array<&mut MapData, NatSnat> =
            Array::try_from(self.map_mut(map_names::NAT_SNAT))
                .map_err(map_err(map_names::NAT_SNAT))?;
        map.set(vip_index, snat, 0)
            .map_err(map_err(map_names::NAT_SNAT))
    }

    /// The SNAT addresses of the VIP with index `vip_index`.
    pub fn nat_snat(&self, vip_index: u32) -> Result<NatSnat> {
        self.check("VIP index", vip_index, self.sizes.max_vips)?;
        let map: Array<&MapData, NatSnat> =
            Array::try_from(self.map(map_names::NAT_SNAT)).map_err(map_err(map_names::NAT_SNAT))?;
        map.get(&vip_index, 0).map_err(map_err(map_names::NAT_SNAT))
    }

    /// The NAT flow of the client's IPv4 flow `key` (as received).
    pub fn nat_fwd(&self, key: &FlowKey) -> Result<Option<NatFwd>> {
        self.hash_lookup(map_names::NAT_FWD, key)
    }

    /// The NAT flow a backend's IPv4 reply `key` (as received) belongs to.
    pub fn nat_rev(&self, key: &FlowKey) -> Result<Option<NatRev>> {
        self.hash_lookup(map_names::NAT_REV, key)
    }

    /// The NAT flow of the client's IPv6 flow `key`.
    pub fn nat_fwd6(&self, key: &FlowKey6) -> Result<Option<NatFwd>> {
        self.hash_lookup(map_names::NAT_FWD6, key)
    }

    /// The NAT flow a backend's IPv6 reply `key` belongs to.
    pub fn nat_rev6(&self, key: &FlowKey6) -> Result<Option<NatRev>> {
        self.hash_lookup(map_names::NAT_REV6, key)
    }

    /// Every NAT_FWD entry.
    pub fn nat_fwd_entries(&self) -> Result<Vec<(FlowKey, NatFwd)>> {
        self.hash_entries(map_names::NAT_FWD)
    }

    /// Every NAT_REV entry.
    pub fn nat_rev_entries(&self) -> Result<Vec<(FlowKey, NatRev)>> {
        self.hash_entries(map_names::NAT_REV)
    }

    /// Every NAT_FWD6 entry.
    pub fn nat_fwd6_entries(&self) -> Result<Vec<(FlowKey6, NatFwd)>> {
        self.hash_entries(map_names::NAT_FWD6)
    }

    /// Every NAT_REV6 entry.
    pub fn nat_rev6_entries(&self) -> Result<Vec<(FlowKey6, NatRev)>> {
        self.hash_entries(map_names::NAT_REV6)
    }

    /// Records a NAT pair as the kernel's first packet would (reverse
    /// entry first): for tests and diagnostics; the data path creates
    /// them itself.
    pub fn insert_nat_pair(
        &mut self,
        fwd_key: &FlowKey,
        fwd: NatFwd,
        rev_key: &FlowKey,
        rev: NatRev,
    ) -> Result<()> {
        self.hash_insert(map_names::NAT_REV, rev_key, rev)?;
        self.hash_insert(map_names::NAT_FWD, fwd_key, fwd)
    }

    /// [`Self::insert_nat_pair`] for IPv6 flows.
    pub fn insert_nat_pair6(
        &mut self,
        fwd_key: &FlowKey6,
        fwd: NatFwd,
        rev_key: &FlowKey6,
        rev: NatRev,
    ) -> Result<()> {
        self.hash_insert(map_names::NAT_REV6, rev_key, rev)?;
        self.hash_insert(map_names::NAT_FWD6, fwd_key, fwd)
    }

    /// Deletes the NAT_FWD entry `key` alone (tests: an orphaned reverse
    /// entry).
    pub fn remove_nat_fwd(&mut self, key: &FlowKey) -> Result<()> {
        let mut map: HashMap<&mut MapData, FlowKey, NatFwd> =
            HashMap::try_from(self.map_mut(map_names::NAT_FWD))
                .map_err(map_err(map_names::NAT_FWD))?;
        map.remove(key).map_err(map_err(map_names::NAT_FWD))
    }

    fn hash_insert<K: aya::Pod, V: aya::Pod>(
        &mut self,
        name: &'static str,
        key: &K,
        value: V,
    ) -> Result<()> {
        let mut map: HashMap<&mut MapData, K, V> =
            HashMap::try_from(self.map_mut(name)).map_err(map_err(name))?;
        map.insert(key, value, 0).map_err(map_err(name))
    }

    fn hash_entries<K: aya::Pod, V: aya::Pod>(&self, name: &'static str) -> Result<Vec<(K, V)>> {
        let map: HashMap<&MapData, K, V> =
            HashMap::try_from(self.map(name)).map_err(map_err(name))?;
        map.iter()
            .collect::<std::result::Result<_, _>>()
            .map_err(map_err(name))
    }
}

#[cfg(test)]
mod tests {
    use std::mem::size_of;

    use lb_common::{FlowKey, FlowKey6, map_names};

    use super::*;
    use crate::map_sizes::MapSizes;

    /// A restarted agent reuses the NAT maps only if they are pinned and
    /// match: each is in the pinned specs with its configured size and
    /// the shared types' sizes, so another layout is refused.
    #[test]
    fn the_nat_maps_are_pinned_with_their_sizes() {
        let sizes = MapSizes {
            nat_entries: 4096,
            acl_entries: 1024,
            max_vips: 8,
            ..MapSizes::default()
        };
        let specs = crate::datapath::pinned_map_specs(sizes).unwrap();
        let spec = |name: &str| {
            specs
                .iter()
                .find(|s| s.name == name)
                .unwrap_or_else(|| panic!("{name} is not pinned"))
        };
        let k4 = size_of::<FlowKey>() as u32;
        let k6 = size_of::<FlowKey6>() as u32;
        let (f, r) = (size_of::<NatFwd>() as u32, size_of::<NatRev>() as u32);
        for (name, key, value) in [
            (map_names::NAT_FWD, k4, f),
            (map_names::NAT_REV, k4, r),
            (map_names::NAT_FWD6, k6, f),
            (map_names::NAT_REV6, k6, r),
        ] {
            let s = spec(name);
            assert_eq!(
                (s.key_size, s.value_size, s.max_entries),
                (key, value, 4096),
                "{name}"
            );
            // A hash map, not an LRU: the kernel never evicts a live flow.
            assert_eq!(
                s.map_type,
                aya_obj::generated::bpf_map_type::BPF_MAP_TYPE_HASH as u32,
                "{name}"
            );
        }
        let s = spec(map_names::NAT_SNAT);
        assert_eq!(
            (s.value_size, s.max_entries),
            (size_of::<NatSnat>() as u32, 8)
        );
    }
}
