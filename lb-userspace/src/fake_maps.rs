//! An in-memory stand-in for the kernel maps, for tests without root: the
//! same arrays the XDP program reads (VIP entries, one flat RINGS array,
//! the BACKENDS array), with failure injection, and the reconcile invariant
//! checked after every single write, on the bytes the kernel would hold.

use std::collections::BTreeMap;

use lb_common::{
    Backend, BackendStats, FORWARD_NAT, FlowEntry, FlowKey, FlowKey6, VipInfo, VipStats,
    nat::{NatFwd, NatRev, NatSnat},
    sched::{SCHED_SLOTS_PER_VIP, SchedInfo, SchedSlot},
};

use crate::{
    acl::{AclMaps, AclState, Cidr},
    nat_keeper::NatKey,
    reconcile::{KernelImage, KernelMaps, NatPair, VipEntryKey, check_invariant},
};

#[derive(Debug, thiserror::Error)]
#[error("{0}")]
pub struct FakeError(pub String);

#[derive(Clone, Debug)]
pub struct FakeMaps {
    /// VIPS and VIPS6 (both tables, keyed by family).
    pub vips: BTreeMap<VipEntryKey, VipInfo>,
    /// RINGS: `max_vips * ring_stride` slots, zero-initialised like a BPF
    /// array.
    pub rings: Vec<u32>,
    /// BACKENDS: ids `0..=max_backends`.
    pub backends: Vec<Backend>,
    pub tx_ports: Vec<u32>,
    /// NAT_SNAT: `max_vips` elements, zero-initialised.
    pub nat_snat: Vec<NatSnat>,
    pub rate_limits: Vec<lb_common::ratelimit::RateLimits>,
    /// SCHED: `max_vips` elements; SCHED_SLOTS: `SCHED_SLOTS_PER_VIP` per
    /// VIP index; both zero-initialised.
    pub sched: Vec<SchedInfo>,
    pub sched_slots: Vec<SchedSlot>,
    pub conntrack: std::collections::HashMap<FlowKey, FlowEntry>,
    pub conntrack6: std::collections::HashMap<FlowKey6, FlowEntry>,
    pub nat_fwd: std::collections::HashMap<FlowKey, NatFwd>,
    pub nat_rev: std::collections::HashMap<FlowKey, NatRev>,
    pub nat_fwd6: std::collections::HashMap<FlowKey6, NatFwd>,
    pub nat_rev6: std::collections::HashMap<FlowKey6, NatRev>,
    /// VIP_ACL, by index (absent: 0).
    pub acl_words: BTreeMap<u32, u32>,
    /// ACL4 and ACL6: (VIP index, bank, prefix) → value.
    pub acl_prefixes: BTreeMap<(u32, u32, Cidr), u32>,
    /// Least connections: backend id → the count the kernel would compare.
    pub lc_counts: BTreeMap<u32, u64>,
    /// Successful writes so far.
    pub writes: usize,
    /// Fail the write after this many successful ones.
    pub fail_after: Option<usize>,
    /// Violations of the reconcile invariant seen after a write.
    pub violations: Vec<String>,
}

impl FakeMaps {
    pub fn new(max_vips: u32, ring_stride: u32, max_backends: u32) -> Self {
        Self {
            vips: BTreeMap::new(),
            rings: vec![0; (max_vips * ring_stride) as usize],
            backends: vec![Backend::EMPTY; max_backends as usize + 1],
            tx_ports: Vec::new(),
            nat_snat: vec![NatSnat::default(); max_vips as usize],
            rate_limits: vec![Default::default(); max_vips as usize],
            sched: vec![SchedInfo::default(); max_vips as usize],
            sched_slots: vec![SchedSlot::default(); (max_vips * SCHED_SLOTS_PER_VIP) as usize],
            conntrack: Default::default(),
            conntrack6: Default::default(),
            nat_fwd: Default::default(),
            nat_rev: Default::default(),
            nat_fwd6: Default::default(),
            nat_rev6: Default::default(),
            acl_words: BTreeMap::new(),
            acl_prefixes: BTreeMap::new(),
            lc_counts: BTreeMap::new(),
            writes: 0,
            fail_after: None,
            violations: Vec::new(),
        }
    }

    fn write(
        &mut self,
        what: &str,
        f: impl FnOnce(&mut Self) -> Result<(), FakeError>,
    ) -> Result<(), FakeError> {
        if self.fail_after.is_some_and(|n| self.writes >= n) {
            return Err(FakeError(format!("injected failure at {what}")));
        }
        f(self)?;
        self.writes += 1;
        let img = self.read_image().expect("the fake reads back");
        if let Err(e) = check_invariant(&img) {
            self.violations
                .push(format!("after write {} ({what}): {e}", self.writes));
        }
        Ok(())
    }

    fn backend_slot(&mut self, id: u32) -> Result<&mut Backend, FakeError> {
        let n = self.backends.len();
        self.backends
            .get_mut(id as usize)
            .ok_or_else(|| FakeError(format!("backend id {id} out of range (array of {n})")))
    }
}

impl AclMaps for FakeMaps {
    type AclError = FakeError;

    fn acl_insert(
        &mut self,
        index: u32,
        bank: u32,
        entries: &BTreeMap<Cidr, u32>,
    ) -> Result<(), FakeError> {
        self.write("insert ACL prefixes", |m| {
            for (c, v) in entries {
                m.acl_prefixes.insert((index, bank, *c), *v);
            }
            Ok(())
        })
    }

    fn acl_delete(
        &mut self,
        index: u32,
        bank: u32,
        prefixes: &mut dyn Iterator<Item = Cidr>,
    ) -> Result<(), FakeError> {
        self.write("delete ACL prefixes", |m| {
            for c in prefixes {
                m.acl_prefixes.remove(&(index, bank, c));
            }
            Ok(())
        })
    }

    fn acl_set_word(&mut self, index: u32, word: u32) -> Result<(), FakeError> {
        self.write("set ACL word", |m| {
            m.acl_words.insert(index, word);
            Ok(())
        })
    }

    fn acl_read(&self) -> Result<AclState, FakeError> {
        Ok(AclState::from_maps(
            self.acl_words.iter().map(|(i, w)| (*i, *w)),
            self.acl_prefixes
                .iter()
                .map(|((i, b, c), v)| (*i, *b, *c, *v)),
        ))
    }
}

impl KernelMaps for FakeMaps {
    type Error = FakeError;

    fn set_backend(&mut self, id: u32, backend: Backend) -> Result<(), FakeError> {
        self.write("set backend", |m| {
            *m.backend_slot(id)? = backend;
            Ok(())
        })
    }

    fn remove_backend(&mut self, id: u32) -> Result<(), FakeError> {
        self.set_backend(id, Backend::EMPTY)
    }

    fn write_ring(&mut self, ring_base: u32, slots: &[(u32, u32)]) -> Result<(), FakeError> {
        // One slot per kernel write, as the real map is written.
        for &(slot, id) in slots {
            self.write("write ring slot", |m| {
                let n = m.rings.len();
                let at = m
                    .rings
                    .get_mut((ring_base + slot) as usize)
                    .ok_or_else(|| {
                        FakeError(format!("ring slot {} out of range ({n})", ring_base + slot))
                    })?;
                *at = id;
                Ok(())
            })?;
        }
        Ok(())
    }

    fn set_vip(&mut self, key: VipEntryKey, info: VipInfo) -> Result<(), FakeError> {
        self.write("set VIP", |m| {
            m.vips.insert(key, info);
            Ok(())
        })
    }

    fn remove_vip(&mut self, key: &VipEntryKey) -> Result<(), FakeError> {
        self.write("remove VIP", |m| {
            m.vips.remove(key);
            Ok(())
        })
    }

    fn add_tx_port(&mut self, ifindex: u32) -> Result<(), FakeError> {
        if !self.tx_ports.contains(&ifindex) {
            self.tx_ports.push(ifindex);
        }
        Ok(())
    }

    fn set_rate_limits(
        &mut self,
        index: u32,
        limits: lb_common::ratelimit::RateLimits,
    ) -> Result<(), FakeError> {
        self.write("set RATE_LIMITS", |m| {
            let n = m.rate_limits.len();
            *m.rate_limits.get_mut(index as usize).ok_or_else(|| {
                FakeError(format!("RATE_LIMITS index {index} out of range ({n})"))
            })? = limits;
            Ok(())
        })
    }

    fn set_nat_snat(&mut self, index: u32, snat: NatSnat) -> Result<(), FakeError> {
        self.write("set NAT_SNAT", |m| {
            let n = m.nat_snat.len();
            *m.nat_snat
                .get_mut(index as usize)
                .ok_or_else(|| FakeError(format!("NAT_SNAT index {index} out of range ({n})")))? =
                snat;
            Ok(())
        })
    }

    fn write_sched_slots(
        &mut self,
        index: u32,
        slots: &[(u32, SchedSlot)],
    ) -> Result<(), FakeError> {
        // One slot per kernel write.
        for &(i, s) in slots {
            self.write("write scheduler slot", |m| {
                if i >= SCHED_SLOTS_PER_VIP {
                    return Err(FakeError(format!("scheduler slot {i} out of the region")));
                }
                let at = (index * SCHED_SLOTS_PER_VIP + i) as usize;
                let n = m.sched_slots.len();
                *m.sched_slots
                    .get_mut(at)
                    .ok_or_else(|| FakeError(format!("SCHED_SLOTS {at} out of range ({n})")))? = s;
                Ok(())
            })?;
        }
        Ok(())
    }

    fn set_sched(&mut self, index: u32, info: SchedInfo) -> Result<(), FakeError> {
        self.write("set SCHED", |m| {
            let n = m.sched.len();
            *m.sched
                .get_mut(index as usize)
                .ok_or_else(|| FakeError(format!("SCHED index {index} out of range ({n})")))? =
                info;
            Ok(())
        })
    }

    fn lc_active(&self, ids: &[u32]) -> Result<BTreeMap<u32, u64>, FakeError> {
        Ok(ids
            .iter()
            .map(|&id| (id, self.lc_counts.get(&id).copied().unwrap_or(0)))
            .collect())
    }

    fn read_image(&self) -> Result<KernelImage, FakeError> {
        let mut img = KernelImage {
            vips: self.vips.clone(),
            ..KernelImage::default()
        };
        for info in self.vips.values().filter(|i| !i.is_address_only()) {
            let (base, len) = (info.ring_base as usize, info.ring_size as usize);
            let ring = self
                .rings
                .get(base..base + len)
                .ok_or_else(|| FakeError(format!("ring at {base} of {len} slots out of range")))?;
            img.rings.insert(info.ring_base, ring.to_vec());
            if let Some(l) = self.rate_limits.get(info.index as usize)
                && l.any()
            {
                img.rate.insert(info.index, *l);
            }
            let sched = self.sched[info.index as usize];
            let base = (info.index * SCHED_SLOTS_PER_VIP) as usize;
            img.sched.insert(
                info.index,
                crate::sched::VipSched {
                    info: sched,
                    slots: self.sched_slots[base..base + sched.len as usize].to_vec(),
                },
            );
            if info.forwarding == FORWARD_NAT {
                let snat = self.nat_snat.get(info.index as usize).ok_or_else(|| {
                    FakeError(format!("NAT_SNAT index {} out of range", info.index))
                })?;
                img.snat.insert(info.index, *snat);
            }
        }
        for (id, b) in self.backends.iter().enumerate() {
            if b.is_present() {
                img.backends.insert(id as u32, *b);
            }
        }
        img.acl = self.acl_read()?;
        Ok(img)
    }

    fn conntrack_lookup(&self, key: &FlowKey) -> Result<Option<FlowEntry>, FakeError> {
        Ok(self.conntrack.get(key).copied())
    }

    fn conntrack6_lookup(&self, key: &FlowKey6) -> Result<Option<FlowEntry>, FakeError> {
        Ok(self.conntrack6.get(key).copied())
    }

    fn conntrack_len(&self) -> Result<usize, FakeError> {
        Ok(self.conntrack.len() + self.conntrack6.len())
    }

    fn nat_pair(&self, key: &FlowKey) -> Result<Option<NatPair<FlowKey>>, FakeError> {
        Ok(pair_of(&self.nat_fwd, &self.nat_rev, key))
    }

    fn nat_pair6(&self, key: &FlowKey6) -> Result<Option<NatPair<FlowKey6>>, FakeError> {
        Ok(pair_of(&self.nat_fwd6, &self.nat_rev6, key))
    }

    fn nat_entries(&self) -> Option<u64> {
        Some((self.nat_fwd.len() + self.nat_fwd6.len()) as u64)
    }

    fn vip_stats(&self, _index: u32) -> Result<VipStats, FakeError> {
        Ok(VipStats::default())
    }

    fn backend_stats(&self, _id: u32) -> Result<BackendStats, FakeError> {
        Ok(BackendStats::default())
    }

    fn reason_stats(&self) -> Result<BTreeMap<&'static str, u64>, FakeError> {
        Ok(BTreeMap::new())
    }

    /// Every record counts (the fake has no clock).
    fn active_flows(&self) -> Option<BTreeMap<u32, u64>> {
        let mut n = BTreeMap::new();
        for e in self.conntrack.values().chain(self.conntrack6.values()) {
            *n.entry(e.backend_id).or_default() += 1;
        }
        Some(n)
    }
}

fn pair_of<K: NatKey>(
    fwd: &std::collections::HashMap<K, NatFwd>,
    rev: &std::collections::HashMap<K, NatRev>,
    key: &K,
) -> Option<NatPair<K>> {
    let f = fwd.get(key)?;
    let rk = K::reverse_of(f, key.proto());
    Some((*f, rev.get(&rk).map(|r| (rk, *r))))
}
