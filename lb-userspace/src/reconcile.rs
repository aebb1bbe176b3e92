//! The one model of the kernel contents ([`KernelImage`]), the minimal,
//! safely ordered list of map writes that takes the data path from what it
//! holds to what it should hold ([`plan`]), and the code that performs them
//! through [`KernelMaps`] while keeping the image true ([`execute`]). The
//! agent runs exactly this code against the real maps; tests run it against
//! an in-memory fake.
//!
//! The invariant every intermediate state keeps: each ring slot of an
//! installed VIP names either no backend or a backend entry that is present
//! and usable. Hence the order:
//!
//! 1. backends that are new or become (or stay) usable are written first;
//! 2. ring slots that changed are written (new VIPs get their whole ring);
//! 3. VIP entries are inserted or updated (only now can packets reach a new
//!    ring) and VIPs that went away are removed;
//!
//! 4. backends that become unusable are updated, and removed ones deleted,
//!    only once no slot names them.
//!
//! A NAT VIP's SNAT addresses (NAT_SNAT at its index) are written with the
//! backends, before its VIP entry: a new flow never reads a stale list.
//! A VIP's scheduler follows the ring's rule: the slots of its region are
//! written with the ring slots (2.), its SCHED element (which says how
//! many slots are read) before the VIP entries (3.); so the slots read
//! name usable backends at every step (a shrinking list leaves the old
//! tail in place until the element shortens it, and those backends are
//! made unusable only in 4.).

use std::collections::BTreeMap;

use lb_common::{
    Backend, BackendStats, FORWARD_NAT, FlowEntry, FlowKey, FlowKey6, NO_BACKEND, VipInfo, VipKey,
    VipKey6, VipStats,
    nat::{NatFwd, NatRev, NatSnat},
    ratelimit::RateLimits,
};

use crate::{maglev::diff_slots, sched::VipSched};
use lb_common::sched::{SchedInfo, SchedSlot};

/// A key of either VIP table: VIPS (IPv4) or VIPS6. Both tables share
/// the VIP indices, the RINGS array and the backend ids, so one image and
/// one plan cover both families.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum VipEntryKey {
    V4(VipKey),
    V6(VipKey6),
}

impl From<VipKey> for VipEntryKey {
    fn from(k: VipKey) -> Self {
        VipEntryKey::V4(k)
    }
}

impl From<VipKey6> for VipEntryKey {
    fn from(k: VipKey6) -> Self {
        VipEntryKey::V6(k)
    }
}

/// Kernel map contents as the agent knows them (what it wrote, or read back
/// from pinned maps after a restart), or as it wants them. Mirrors the maps
/// one to one: the VIP table's entries, the RINGS array cut at each VIP's
/// ring base, the BACKENDS array's present entries.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct KernelImage {
    /// VIP entries of both tables: services and address-only markers.
    pub vips: BTreeMap<VipEntryKey, VipInfo>,
    /// Ring contents by ring base. A ring stays here after its VIP entry is
    /// removed: the kernel array still holds it.
    pub rings: BTreeMap<u32, Vec<u32>>,
    /// Present backend entries by id.
    pub backends: BTreeMap<u32, Backend>,
    /// NAT_SNAT of each installed NAT VIP, by VIP index (the array's
    /// other elements are never read: the kernel reads it for NAT VIPs
    /// only).
    pub snat: BTreeMap<u32, NatSnat>,
    /// The VIPs' ACLs (not planned here: written by crate::acl around
    /// the plan, see agent::core).
    pub acl: crate::acl::AclState,
    /// RATE_LIMITS of each installed service VIP that has limits, by VIP
    /// index (the others' elements are all zero).
    pub rate: BTreeMap<u32, RateLimits>,
    /// Each VIP index's scheduler: its SCHED element and the slots of its
    /// region (as far as written or read back: the element's `len`). Like
    /// a ring, it stays after its VIP entry is removed.
    pub sched: BTreeMap<u32, VipSched>,
}

impl KernelImage {
    /// The ring a service VIP entry points at (`ring_size` slots from its
    /// base), as far as the image knows it.
    pub fn ring_of(&self, info: &VipInfo) -> Option<&[u32]> {
        if info.is_address_only() {
            return None;
        }
        self.rings
            .get(&info.ring_base)
            .and_then(|r| r.get(..info.ring_size as usize))
    }

    /// The ring of the service VIP `key`.
    pub fn ring(&self, key: &VipEntryKey) -> Option<&[u32]> {
        self.vips.get(key).and_then(|info| self.ring_of(info))
    }
}

/// One map write.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Op {
    SetBackend(u32, Backend),
    /// Writes `(slot, backend id)` pairs of the ring at `ring_base`.
    WriteRing {
        ring_base: u32,
        slots: Vec<(u32, u32)>,
    },
    SetVip(VipEntryKey, VipInfo),
    RemoveVip(VipEntryKey),
    RemoveBackend(u32),
    /// Writes a NAT VIP's SNAT addresses (NAT_SNAT at its index).
    SetSnat(u32, NatSnat),
    /// Writes a VIP's rate limits (RATE_LIMITS at its index; all zero:
    /// none).
    SetRateLimits(u32, RateLimits),
    /// Writes `(slot, value)` pairs of VIP index `index`'s scheduler region.
    WriteSchedSlots {
        index: u32,
        slots: Vec<(u32, SchedSlot)>,
    },
    /// Writes SCHED at VIP index `index`.
    SetSched(u32, SchedInfo),
}

/// What the data path offers the agent: the map writes of [`Op`], reading
/// the maps back, and the counters. Implemented by
/// the data path (`Datapath`) on the real maps and by an in-memory fake
/// in tests.
pub trait KernelMaps: crate::acl::AclMaps {
    type Error: std::error::Error + Send + Sync + 'static;

    fn set_backend(&mut self, id: u32, backend: Backend) -> Result<(), Self::Error>;
    /// Deletes a backend entry (its slot reads back as not present).
    fn remove_backend(&mut self, id: u32) -> Result<(), Self::Error>;
    fn write_ring(&mut self, ring_base: u32, slots: &[(u32, u32)]) -> Result<(), Self::Error>;
    /// Inserts or updates an entry of the VIP table of `key`'s family.
    fn set_vip(&mut self, key: VipEntryKey, info: VipInfo) -> Result<(), Self::Error>;
    fn remove_vip(&mut self, key: &VipEntryKey) -> Result<(), Self::Error>;
    /// Makes `ifindex` a redirect target.
    fn add_tx_port(&mut self, ifindex: u32) -> Result<(), Self::Error>;
    /// Writes NAT_SNAT at VIP index `index`.
    fn set_nat_snat(&mut self, index: u32, snat: NatSnat) -> Result<(), Self::Error>;
    /// Writes RATE_LIMITS at VIP index `index`.
    fn set_rate_limits(&mut self, index: u32, limits: RateLimits) -> Result<(), Self::Error>;
    /// Writes slots of VIP index `index`'s scheduler region.
    fn write_sched_slots(
        &mut self,
        index: u32,
        slots: &[(u32, SchedSlot)],
    ) -> Result<(), Self::Error>;
    /// Writes SCHED at VIP index `index`.
    fn set_sched(&mut self, index: u32, info: SchedInfo) -> Result<(), Self::Error>;
    /// Least connections: backend id → active connections as the kernel
    /// counts them (its counter plus the agent's correction), for the
    /// backends of `ids`.
    fn lc_active(&self, _ids: &[u32]) -> Result<BTreeMap<u32, u64>, Self::Error> {
        Ok(BTreeMap::new())
    }
    /// What the maps hold: every VIP entry, the ring of each service VIP,
    /// every present backend.
    fn read_image(&self) -> Result<KernelImage, Self::Error>;
    fn conntrack_lookup(&self, key: &FlowKey) -> Result<Option<FlowEntry>, Self::Error>;
    fn conntrack6_lookup(&self, key: &FlowKey6) -> Result<Option<FlowEntry>, Self::Error>;
    fn conntrack_len(&self) -> Result<usize, Self::Error>;
    /// The NAT_FWD entry of the client's IPv4 flow `key` and, if present,
    /// the NAT_REV entry of its replies.
    fn nat_pair(&self, key: &FlowKey) -> Result<Option<NatPair<FlowKey>>, Self::Error>;
    /// The same for an IPv6 flow (NAT_FWD6, NAT_REV6).
    fn nat_pair6(&self, key: &FlowKey6) -> Result<Option<NatPair<FlowKey6>>, Self::Error>;
    /// NAT flows recorded (NAT_FWD + NAT_FWD6 entries) as last counted;
    /// None before the first count.
    fn nat_entries(&self) -> Option<u64> {
        None
    }
    /// Conntrack records (IPv4, IPv6) as last counted, expired ones
    /// included (the LRU holds them until it needs the room); None before
    /// the first count.
    fn conntrack_records(&self) -> Option<(u64, u64)> {
        None
    }
    /// A VIP's counters summed over CPUs.
    fn vip_stats(&self, index: u32) -> Result<VipStats, Self::Error>;
    /// A backend's counters summed over CPUs.
    fn backend_stats(&self, id: u32) -> Result<BackendStats, Self::Error>;
    /// Pass/drop counters by reason name, summed over CPUs.
    fn reason_stats(&self) -> Result<BTreeMap<&'static str, u64>, Self::Error>;
    /// The source buckets of the per-source rate limits that refused the
    /// most, at most `n` (none where the maps keep none).
    fn limited_sources(&self, n: usize) -> Vec<crate::datapath::LimitedSource> {
        let _ = n;
        Vec::new()
    }
    /// Backend id → conntrack records naming it that have not expired, as
    /// last counted; None before the first count.
    fn active_flows(&self) -> Option<BTreeMap<u32, u64>> {
        None
    }
}

/// A NAT flow's forward entry and, if present, its reverse entry with the
/// key it is found under.
pub type NatPair<K> = (NatFwd, Option<(K, NatRev)>);

/// Plans the writes from `current` to `target`.
pub fn plan(current: &KernelImage, target: &KernelImage) -> Vec<Op> {
    let mut ops = Vec::new();

    // 1. New backends, and changed ones that are usable in the target.
    let mut late_backend_updates = Vec::new();
    for (&id, want) in &target.backends {
        match current.backends.get(&id) {
            Some(have) if have == want => {}
            Some(have) if have.is_usable() && !want.is_usable() => {
                late_backend_updates.push(Op::SetBackend(id, *want));
            }
            _ => ops.push(Op::SetBackend(id, *want)),
        }
    }

    // NAT VIPs' SNAT addresses, before the VIP entries that use them.
    for (&index, want) in &target.snat {
        if current.snat.get(&index) != Some(want) {
            ops.push(Op::SetSnat(index, *want));
        }
    }

    // Rate limits: new or changed ones before the VIP entries (a new VIP
    // is limited from its first packet), lifted ones too (a VIP whose
    // limits are gone, or removed: its index may be reused).
    for (&index, want) in &target.rate {
        if current.rate.get(&index) != Some(want) {
            ops.push(Op::SetRateLimits(index, *want));
        }
    }
    for &index in current.rate.keys() {
        if !target.rate.contains_key(&index) {
            ops.push(Op::SetRateLimits(index, RateLimits::default()));
        }
    }

    // 2. Ring slots.
    for (&ring_base, want) in &target.rings {
        let have = current
            .rings
            .get(&ring_base)
            .map_or(&[][..], |r| r.as_slice());
        let slots: Vec<(u32, u32)> = diff_slots(have, want).collect();
        if !slots.is_empty() {
            ops.push(Op::WriteRing { ring_base, slots });
        }
    }
    for (&index, want) in &target.sched {
        let have = current.sched.get(&index).map_or(&[][..], |s| &s.slots[..]);
        let slots: Vec<(u32, SchedSlot)> = want
            .slots
            .iter()
            .enumerate()
            .filter(|&(i, s)| have.get(i) != Some(s))
            .map(|(i, s)| (i as u32, *s))
            .collect();
        if !slots.is_empty() {
            ops.push(Op::WriteSchedSlots { index, slots });
        }
    }

    // 3. Scheduler elements, then VIP entries.
    for (&index, want) in &target.sched {
        if current.sched.get(&index).map(|s| s.info) != Some(want.info) {
            ops.push(Op::SetSched(index, want.info));
        }
    }

    for (key, want) in &target.vips {
        if current.vips.get(key) != Some(want) {
            ops.push(Op::SetVip(*key, *want));
        }
    }
    for key in current.vips.keys() {
        if !target.vips.contains_key(key) {
            ops.push(Op::RemoveVip(*key));
        }
    }

    // 4. Backends leaving service, then removed ones.
    ops.extend(late_backend_updates);
    for &id in current.backends.keys() {
        if !target.backends.contains_key(&id) {
            ops.push(Op::RemoveBackend(id));
        }
    }
    ops
}

/// Records in `image` what `op` changed in the kernel.
pub fn apply(image: &mut KernelImage, op: &Op) {
    match op {
        Op::SetBackend(id, b) => {
            image.backends.insert(*id, *b);
        }
        Op::RemoveBackend(id) => {
            image.backends.remove(id);
        }
        Op::WriteRing { ring_base, slots } => {
            let ring = image.rings.entry(*ring_base).or_default();
            for &(s, id) in slots {
                let s = s as usize;
                if ring.len() <= s {
                    ring.resize(s + 1, NO_BACKEND);
                }
                ring[s] = id;
            }
        }
        Op::SetVip(key, info) => {
            image.vips.insert(*key, *info);
            // A service VIP that no longer translates: its NAT_SNAT
            // element is not read any more (nor read back).
            if !info.is_address_only() && info.forwarding != FORWARD_NAT {
                image.snat.remove(&info.index);
            }
        }
        Op::RemoveVip(key) => {
            if let Some(info) = image.vips.remove(key)
                && !info.is_address_only()
            {
                image.snat.remove(&info.index);
            }
        }
        Op::SetSnat(index, snat) => {
            image.snat.insert(*index, *snat);
        }
        Op::SetRateLimits(index, limits) => {
            if limits.any() {
                image.rate.insert(*index, *limits);
            } else {
                image.rate.remove(index);
            }
        }
        Op::WriteSchedSlots { index, slots } => {
            let have = &mut image.sched.entry(*index).or_default().slots;
            for &(i, s) in slots {
                let i = i as usize;
                if have.len() <= i {
                    have.resize(i + 1, SchedSlot::default());
                }
                have[i] = s;
            }
        }
        Op::SetSched(index, info) => {
            let s = image.sched.entry(*index).or_default();
            s.info = *info;
        }
    }
}

/// A write that failed, after the writes before it were applied.
#[derive(Debug, thiserror::Error)]
#[error("writing the kernel maps ({op}): {source}")]
pub struct ExecuteError<E: std::error::Error + 'static> {
    pub op: String,
    #[source]
    pub source: E,
}

/// Performs `ops` on `maps` in order, recording each applied write in
/// `image`. Stops at the first failure: the writes before it are applied
/// and safe, the image says exactly which, and the next plan retries the
/// rest. Returns the number of ring slots written.
pub fn execute<M: KernelMaps>(
    maps: &mut M,
    image: &mut KernelImage,
    ops: &[Op],
) -> Result<usize, ExecuteError<M::Error>> {
    let mut slots_written = 0;
    for op in ops {
        let r = match op {
            Op::SetBackend(id, b) => maps.set_backend(*id, *b),
            Op::RemoveBackend(id) => maps.remove_backend(*id),
            Op::WriteRing { ring_base, slots } => {
                slots_written += slots.len();
                maps.write_ring(*ring_base, slots)
            }
            Op::SetVip(k, info) => maps.set_vip(*k, *info),
            Op::RemoveVip(k) => maps.remove_vip(k),
            Op::SetSnat(index, snat) => maps.set_nat_snat(*index, *snat),
            Op::SetRateLimits(index, limits) => maps.set_rate_limits(*index, *limits),
            Op::WriteSchedSlots { index, slots } => maps.write_sched_slots(*index, slots),
            Op::SetSched(index, info) => maps.set_sched(*index, *info),
        };
        r.map_err(|source| ExecuteError {
            op: op.describe(),
            source,
        })?;
        apply(image, op);
    }
    Ok(slots_written)
}

impl Op {
    /// A short description for errors and logs.
    pub fn describe(&self) -> String {
        match self {
            Op::SetBackend(id, _) => format!("set backend {id}"),
            Op::RemoveBackend(id) => format!("remove backend {id}"),
            Op::WriteRing { ring_base, slots } => {
                format!("write {} slots of the ring at {ring_base}", slots.len())
            }
            Op::SetVip(k, _) => format!("set VIP entry {k:?}"),
            Op::RemoveVip(k) => format!("remove VIP entry {k:?}"),
            Op::SetSnat(index, _) => format!("set the SNAT addresses of VIP index {index}"),
            Op::SetRateLimits(index, _) => format!("set the rate limits of VIP index {index}"),
            Op::WriteSchedSlots { index, slots } => {
                format!("write {} scheduler slots of VIP index {index}", slots.len())
            }
            Op::SetSched(index, info) => {
                format!("set the scheduler of VIP index {index} ({info:?})")
            }
        }
    }
}

/// The invariant of the module doc, checked on an image: the first
/// violation found, as text.
pub fn check_invariant(image: &KernelImage) -> Result<(), String> {
    for (key, info) in &image.vips {
        if info.is_address_only() {
            continue;
        }
        let ring = image
            .rings
            .get(&info.ring_base)
            .map_or(&[][..], |r| r.as_slice());
        for slot in 0..info.ring_size as usize {
            // A slot never written holds 0 in the kernel array.
            let id = ring.get(slot).copied().unwrap_or(0);
            if id == NO_BACKEND {
                continue;
            }
            match image.backends.get(&id) {
                Some(b) if b.is_usable() => {}
                Some(_) => return Err(format!("{key:?} slot {slot} names unusable backend {id}")),
                None => return Err(format!("{key:?} slot {slot} names missing backend {id}")),
            }
        }
        let Some(sched) = image.sched.get(&info.index) else {
            continue;
        };
        if sched.info.uses_ring() {
            continue;
        }
        for slot in 0..sched.info.len as usize {
            // A slot never written holds backend 0, never present.
            let id = sched.slots.get(slot).map_or(0, |s| s.backend_id);
            match image.backends.get(&id) {
                Some(b) if b.is_usable() => {}
                Some(_) => {
                    return Err(format!(
                        "{key:?} scheduler slot {slot} names unusable backend {id}"
                    ));
                }
                None => {
                    return Err(format!(
                        "{key:?} scheduler slot {slot} names missing backend {id}"
                    ));
                }
            }
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use std::net::Ipv4Addr;

    use lb_common::BACKEND_FLAG_USABLE;

    use super::*;
    use crate::{
        fake_maps::FakeMaps,
        maglev::{MaglevBackend, MaglevTable},
        sched::Scheduler,
    };

    const M: u32 = 251;

    fn backend(id: u32, usable: bool) -> Backend {
        Backend {
            addr: u32::from(Ipv4Addr::new(198, 18, (id >> 8) as u8, id as u8)).to_be(),
            ifindex: 2,
            vip_index: 0,
            flags: if usable { BACKEND_FLAG_USABLE } else { 0 },
            dst_mac: [2, 0, 0, 0, 0, id as u8],
            src_mac: [2, 0, 0, 0, 0, 0xfe],
            encap_src: 0,
            addr6: [0; 4],
            encap_src6: [0; 4],
            port: 0,
            _pad: 0,
        }
    }

    /// VIP n: IPv4 for odd n, IPv6 for even n (both tables in one plan).
    fn vip_key(n: u8) -> VipEntryKey {
        if n % 2 == 1 {
            VipKey::new(u32::from_be_bytes([198, 19, 0, n]), 80, 6).into()
        } else {
            VipKey6::new(
                std::net::Ipv6Addr::new(0x2001, 2, 1, 0, 0, 0, 0, n.into()),
                80,
                6,
            )
            .into()
        }
    }

    /// (backend id, weight, usable)
    type Member = (u32, u32, bool);

    /// A target image: VIP n (index n) with the given members.
    fn target(vips: &[(u8, &[Member])]) -> KernelImage {
        target_sched(vips, |_| Scheduler::Maglev)
    }

    /// [`target`] with VIP n's scheduler `sched(n)`.
    fn target_sched(vips: &[(u8, &[Member])], sched: impl Fn(u8) -> Scheduler) -> KernelImage {
        let mut img = KernelImage::default();
        for &(n, backends) in vips {
            let set: Vec<MaglevBackend> = backends
                .iter()
                .filter(|b| b.2 && b.1 > 0)
                .map(|&(id, weight, _)| MaglevBackend {
                    key: id as u64,
                    id,
                    weight,
                })
                .collect();
            let ring = MaglevTable::build(&set, M).unwrap().slots().to_vec();
            let info = VipInfo {
                index: n as u32,
                ring_base: n as u32 * M,
                ring_size: M,
                ..VipInfo::default()
            };
            img.vips.insert(vip_key(n), info);
            img.rings.insert(info.ring_base, ring);
            let members: Vec<(u32, u32)> = set.iter().map(|m| (m.id, m.weight)).collect();
            img.sched
                .insert(n as u32, crate::sched::vip_sched(sched(n), &members));
            for &(id, _, usable) in backends {
                img.backends.insert(id, backend(id, usable));
            }
        }
        img
    }

    /// `img` restricted to what reading the maps back shows: rings and
    /// schedulers of installed service VIPs only, the slots a scheduler
    /// element makes read.
    fn visible(img: &KernelImage) -> KernelImage {
        let mut v = img.clone();
        v.rings.retain(|base, _| {
            img.vips
                .values()
                .any(|i| !i.is_address_only() && i.ring_base == *base)
        });
        v.sched.retain(|index, _| {
            img.vips
                .values()
                .any(|i| !i.is_address_only() && i.index == *index)
        });
        for s in v.sched.values_mut() {
            s.slots.truncate(s.info.len as usize);
        }
        v
    }

    /// Plans from `img` to `want` and executes the plan.
    fn step(
        maps: &mut FakeMaps,
        img: &mut KernelImage,
        want: &KernelImage,
    ) -> Result<usize, ExecuteError<crate::fake_maps::FakeError>> {
        let ops = plan(img, want);
        execute(maps, img, &ops)
    }

    /// Runs the plan through [`execute`] on a fake loaded with `current`:
    /// the fake checks the invariant after every single write. Returns the
    /// ops and the image.
    fn run(current: &KernelImage, want: &KernelImage) -> (Vec<Op>, KernelImage) {
        let mut maps = FakeMaps::new(4, M, 1000);
        let mut img = KernelImage::default();
        execute(&mut maps, &mut img, &plan(&KernelImage::default(), current)).unwrap();
        assert_eq!(visible(&img), visible(current));
        let ops = plan(&img, want);
        execute(&mut maps, &mut img, &ops).unwrap();
        assert!(
            maps.violations.is_empty(),
            "{:?}\nplan: {ops:?}",
            maps.violations
        );
        assert_eq!(
            maps.read_image().unwrap(),
            visible(&img),
            "the image is what the maps hold"
        );
        (ops, visible(&img))
    }

    #[test]
    fn a_fresh_vip_gets_backends_then_ring_then_vip_entry() {
        let want = target(&[(1, &[(1, 1, true), (2, 1, true)])]);
        let (ops, img) = run(&KernelImage::default(), &want);
        assert_eq!(img, want);
        assert!(matches!(ops[0], Op::SetBackend(..)));
        assert!(matches!(ops[1], Op::SetBackend(..)));
        assert!(matches!(ops[2], Op::WriteRing { .. }));
        assert!(matches!(ops[3], Op::SetSched(1, _)));
        assert!(matches!(ops[4], Op::SetVip(..)));
        assert_eq!(ops.len(), 5);
    }

    #[test]
    fn scheduler_slots_then_element_then_vip_entry_and_a_leaving_backend_last() {
        let rr = |_| Scheduler::RoundRobin;
        let want = target_sched(&[(1, &[(1, 1, true), (2, 1, true)])], rr);
        let (ops, img) = run(&KernelImage::default(), &want);
        assert_eq!(img, want);
        let at = |f: &dyn Fn(&Op) -> bool| ops.iter().position(f).unwrap();
        let slots = at(&|op| matches!(op, Op::WriteSchedSlots { index: 1, .. }));
        let element = at(&|op| matches!(op, Op::SetSched(1, i) if i.len == 2));
        let vip = at(&|op| matches!(op, Op::SetVip(..)));
        assert!(at(&|op| matches!(op, Op::SetBackend(2, _))) < slots);
        assert!(slots < element && element < vip, "{ops:?}");
        // Backend 1 goes down: the list shrinks to backend 2 before
        // backend 1 is marked unusable (the fake checks every write).
        let down = target_sched(&[(1, &[(1, 1, false), (2, 1, true)])], rr);
        let (ops, img) = run(&want, &down);
        assert_eq!(img, down);
        assert_eq!(ops.last(), Some(&Op::SetBackend(1, backend(1, false))));
        assert!(
            ops.iter()
                .any(|op| matches!(op, Op::SetSched(1, i) if i.len == 1))
        );
        // A scheduler change rewrites the element, not the ring.
        let lc = target_sched(&[(1, &[(1, 1, false), (2, 1, true)])], |_| {
            Scheduler::LeastConnections
        });
        let (ops, img) = run(&down, &lc);
        assert_eq!(img, lc);
        assert!(
            !ops.iter().any(|op| matches!(op, Op::WriteRing { .. })),
            "{ops:?}"
        );
    }

    #[test]
    fn a_nat_vips_snat_addresses_are_written_before_its_vip_entry_and_forgotten_with_it() {
        let mut want = target(&[(1, &[(1, 1, true)])]);
        want.vips.get_mut(&vip_key(1)).unwrap().forwarding = FORWARD_NAT;
        let snat = NatSnat {
            count: 1,
            ..NatSnat::default()
        };
        want.snat.insert(1, snat);
        let (ops, img) = run(&KernelImage::default(), &want);
        assert_eq!(img, want);
        let at = |f: &dyn Fn(&Op) -> bool| ops.iter().position(f).unwrap();
        assert!(
            at(&|op| matches!(op, Op::SetSnat(1, s) if *s == snat))
                < at(&|op| matches!(op, Op::SetVip(..)))
        );
        assert!(plan(&want, &want).is_empty());
        // The VIP goes: so does its NAT_SNAT element from the image.
        let (_, img) = run(&want, &KernelImage::default());
        assert!(img.snat.is_empty());
    }

    #[test]
    fn an_unchanged_image_needs_no_writes() {
        let want = target(&[(1, &[(1, 1, true), (2, 1, true)])]);
        assert!(plan(&want, &want).is_empty());
    }

    #[test]
    fn adding_a_backend_writes_it_before_the_slots_that_name_it() {
        let have = target(&[(1, &[(1, 1, true), (2, 1, true)])]);
        let want = target(&[(1, &[(1, 1, true), (2, 1, true), (3, 1, true)])]);
        let (ops, img) = run(&have, &want);
        assert_eq!(img, want);
        assert_eq!(ops[0], Op::SetBackend(3, backend(3, true)));
        // Only changed slots are written, about a third of the ring.
        let Op::WriteRing { slots, .. } = &ops[1] else {
            panic!("{ops:?}")
        };
        // Maglev moves mostly slots that now go to 3, a few others shift.
        let to_new = slots.iter().filter(|&&(_, id)| id == 3).count();
        assert!(
            to_new * 10 >= slots.len() * 8,
            "{to_new} of {}",
            slots.len()
        );
        assert!(slots.len() < M as usize / 2);
    }

    #[test]
    fn a_removed_backend_is_deleted_only_after_no_slot_names_it() {
        let have = target(&[(1, &[(1, 1, true), (2, 1, true), (3, 1, true)])]);
        let want = target(&[(1, &[(1, 1, true), (2, 1, true)])]);
        let (ops, img) = run(&have, &want);
        assert_eq!(img, want);
        assert_eq!(ops.last(), Some(&Op::RemoveBackend(3)));
    }

    #[test]
    fn a_backend_going_down_leaves_the_ring_before_it_is_marked_unusable() {
        let have = target(&[(1, &[(1, 1, true), (2, 1, true)])]);
        let want = target(&[(1, &[(1, 1, true), (2, 1, false)])]);
        let (ops, img) = run(&have, &want);
        assert_eq!(img, want);
        assert!(matches!(ops[0], Op::WriteRing { .. }));
        assert_eq!(ops.last(), Some(&Op::SetBackend(2, backend(2, false))));
    }

    #[test]
    fn a_backend_coming_back_is_usable_before_the_ring_names_it() {
        let have = target(&[(1, &[(1, 1, true), (2, 1, false)])]);
        let want = target(&[(1, &[(1, 1, true), (2, 1, true)])]);
        let (ops, img) = run(&have, &want);
        assert_eq!(img, want);
        assert_eq!(ops[0], Op::SetBackend(2, backend(2, true)));
    }

    #[test]
    fn drain_keeps_the_backend_usable_but_out_of_the_ring() {
        let have = target(&[(1, &[(1, 1, true), (2, 1, true)])]);
        let want = target(&[(1, &[(1, 1, true), (2, 0, true)])]);
        let (ops, img) = run(&have, &want);
        assert_eq!(img, want);
        assert!(img.backends[&2].is_usable());
        assert!(!img.ring(&vip_key(1)).unwrap().contains(&2));
        assert!(
            ops.iter()
                .all(|op| !matches!(op, Op::SetBackend(..) | Op::RemoveBackend(_)))
        );
    }

    #[test]
    fn removing_a_vip_removes_its_entry_before_its_backends() {
        let have = target(&[(1, &[(1, 1, true)]), (2, &[(2, 1, true)])]);
        let want = target(&[(1, &[(1, 1, true)])]);
        let (ops, img) = run(&have, &want);
        assert_eq!(img, want);
        assert_eq!(ops, vec![Op::RemoveVip(vip_key(2)), Op::RemoveBackend(2)]);
    }

    #[test]
    fn a_ring_left_by_a_removed_vip_is_rewritten_only_where_it_differs() {
        // VIP 2 goes away, then comes back on the same ring base: the
        // kernel array still holds its old ring, so only changed slots are
        // written.
        let with2 = target(&[(1, &[(1, 1, true)]), (2, &[(2, 1, true), (3, 1, true)])]);
        let without2 = target(&[(1, &[(1, 1, true)])]);
        let mut maps = FakeMaps::new(4, M, 1000);
        let mut img = KernelImage::default();
        step(&mut maps, &mut img, &with2).unwrap();
        step(&mut maps, &mut img, &without2).unwrap();
        let back = plan(&img, &with2);
        execute(&mut maps, &mut img, &back).unwrap();
        assert!(maps.violations.is_empty(), "{:?}", maps.violations);
        assert_eq!(maps.read_image().unwrap(), with2);
        assert!(
            !back.iter().any(|op| matches!(op, Op::WriteRing { .. })),
            "{back:?}"
        );
    }

    #[test]
    fn a_failed_write_leaves_a_safe_kernel_and_an_image_that_knows_what_was_written() {
        let sched =
            |n| [Scheduler::WeightedRoundRobin, Scheduler::LeastConnections][n as usize % 2];
        let have = target_sched(&[(1, &[(1, 1, true), (2, 1, true)])], sched);
        let want = target_sched(
            &[(1, &[(1, 1, true), (3, 2, true)]), (2, &[(4, 1, true)])],
            sched,
        );
        // Fail after every possible number of writes: the kernel stays
        // safe, the image matches it, and the next plan completes the job.
        let total = {
            let mut maps = FakeMaps::new(4, M, 1000);
            let mut img = KernelImage::default();
            execute(&mut maps, &mut img, &plan(&KernelImage::default(), &have)).unwrap();
            let before = maps.writes;
            step(&mut maps, &mut img, &want).unwrap();
            maps.writes - before
        };
        assert!(total > 10, "{total} writes");
        for fail_at in (0..total).step_by(7) {
            let mut maps = FakeMaps::new(4, M, 1000);
            let mut img = KernelImage::default();
            execute(&mut maps, &mut img, &plan(&KernelImage::default(), &have)).unwrap();
            maps.fail_after = Some(maps.writes + fail_at);
            let e = step(&mut maps, &mut img, &want);
            assert!(e.is_err(), "fail_at {fail_at}");
            assert!(maps.violations.is_empty(), "{:?}", maps.violations);
            maps.fail_after = None;
            step(&mut maps, &mut img, &want).unwrap();
            assert!(maps.violations.is_empty(), "{:?}", maps.violations);
            assert_eq!(maps.read_image().unwrap(), want, "fail_at {fail_at}");
        }
    }

    #[test]
    fn many_random_transitions_keep_the_invariant_after_every_write() {
        // Deterministic pseudo-random walk over backend sets, weights and
        // health of two VIPs, through the production write path.
        let mut seed = 0x1234_5678_u64;
        let mut rnd = |n: u64| {
            seed = seed
                .wrapping_mul(6364136223846793005)
                .wrapping_add(1442695040888963407);
            (seed >> 33) % n
        };
        let mut maps = FakeMaps::new(4, M, 1000);
        let mut img = KernelImage::default();
        for _ in 0..200 {
            let mut vips: Vec<(u8, Vec<Member>)> = Vec::new();
            for n in 1..=2u8 {
                if rnd(5) == 0 {
                    continue;
                }
                let mut backends = Vec::new();
                for b in 0..8u32 {
                    if rnd(3) != 0 {
                        backends.push((n as u32 * 100 + b, rnd(3) as u32, rnd(4) != 0));
                    }
                }
                vips.push((n, backends));
            }
            let spec: Vec<(u8, &[Member])> = vips.iter().map(|(n, b)| (*n, b.as_slice())).collect();
            let kinds = [rnd(4), rnd(4)];
            let want = target_sched(&spec, |n| Scheduler::ALL[kinds[n as usize - 1] as usize]);
            let ops = plan(&img, &want);
            execute(&mut maps, &mut img, &ops).unwrap();
            assert!(maps.violations.is_empty(), "{:?}", maps.violations);
            assert_eq!(visible(&img), want);
            assert_eq!(maps.read_image().unwrap(), want);
        }
    }
}
