//! The minimal, safely ordered list of kernel map writes that takes the
//! data path from what it holds now to what it should hold.
//!
//! The invariant every intermediate state keeps: each ring slot of an
//! installed VIP names either no backend or a backend entry that is present
//! and usable. Hence the order:
//!
//! 1. backends that are new or become (or stay) usable are written first;
//! 2. ring slots that changed are written (new VIPs get their whole ring);
//! 3. VIP entries are inserted or updated (only now can packets reach a new
//!    ring) and VIPs that went away are removed;
//! 4. backends that become unusable are updated, and removed ones deleted,
//!    only once no slot names them.

use std::collections::BTreeMap;

use lb_common::{BACKEND_FLAG_USABLE, Backend, NO_BACKEND, VipInfo, VipKey};

/// One VIP's kernel contents: its VIP-map entry and its ring.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct VipImage {
    pub info: VipInfo,
    pub ring: Vec<u32>,
}

/// Kernel map contents as the agent knows them (what it wrote, or read
/// back from pinned maps after a restart), or as it wants them.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct KernelImage {
    pub vips: BTreeMap<VipKey, VipImage>,
    pub backends: BTreeMap<u32, Backend>,
}

#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Op {
    SetBackend(u32, Backend),
    /// Writes `(slot, backend id)` pairs of the ring at `ring_base`.
    WriteRing {
        ring_base: u32,
        slots: Vec<(u32, u32)>,
    },
    SetVip(VipKey, VipInfo),
    RemoveVip(VipKey),
    RemoveBackend(u32),
}

fn usable(b: &Backend) -> bool {
    b.flags & BACKEND_FLAG_USABLE != 0
}

/// Plans the writes from `current` to `target`.
pub fn plan(current: &KernelImage, target: &KernelImage) -> Vec<Op> {
    let mut ops = Vec::new();

    // 1. New backends, and changed ones that are usable in the target.
    let mut late_backend_updates = Vec::new();
    for (&id, want) in &target.backends {
        match current.backends.get(&id) {
            Some(have) if have == want => {}
            Some(have) if usable(have) && !usable(want) => {
                late_backend_updates.push(Op::SetBackend(id, *want));
            }
            _ => ops.push(Op::SetBackend(id, *want)),
        }
    }

    // 2. Ring slots.
    for (key, want) in &target.vips {
        let have_ring = current
            .vips
            .get(key)
            .filter(|have| have.info.ring_base == want.info.ring_base)
            .map(|have| have.ring.as_slice());
        let slots: Vec<(u32, u32)> = want
            .ring
            .iter()
            .enumerate()
            .filter(|&(i, id)| have_ring.and_then(|r| r.get(i)) != Some(id))
            .map(|(i, &id)| (i as u32, id))
            .collect();
        if !slots.is_empty() {
            ops.push(Op::WriteRing {
                ring_base: want.info.ring_base,
                slots,
            });
        }
    }

    // 3. VIP entries.
    for (key, want) in &target.vips {
        if current.vips.get(key).map(|h| h.info) != Some(want.info) {
            ops.push(Op::SetVip(*key, want.info));
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

/// Applies `op` to an in-memory image (what the kernel holds after it).
pub fn apply(image: &mut KernelImage, op: &Op) {
    match op {
        Op::SetBackend(id, b) => {
            image.backends.insert(*id, *b);
        }
        Op::RemoveBackend(id) => {
            image.backends.remove(id);
        }
        Op::WriteRing { ring_base, slots } => {
            // Every VIP image whose ring starts at ring_base sees the write;
            // a VIP not yet installed has no image: keep the slots on the
            // side in a pending entry keyed by ring_base.
            for v in image.vips.values_mut() {
                if v.info.ring_base == *ring_base {
                    for &(s, id) in slots {
                        if let Some(x) = v.ring.get_mut(s as usize) {
                            *x = id;
                        }
                    }
                }
            }
            let pending = image
                .vips
                .entry(pending_key(*ring_base))
                .or_insert_with(|| VipImage {
                    info: VipInfo {
                        index: u32::MAX,
                        ring_base: *ring_base,
                        ring_size: 0,
                        flags: PENDING,
                    },
                    ring: Vec::new(),
                });
            for &(s, id) in slots {
                let s = s as usize;
                if pending.ring.len() <= s {
                    pending.ring.resize(s + 1, NO_BACKEND);
                }
                pending.ring[s] = id;
            }
        }
        Op::SetVip(key, info) => {
            let ring = image
                .vips
                .get(&pending_key(info.ring_base))
                .map(|p| p.ring.clone())
                .or_else(|| image.vips.get(key).map(|v| v.ring.clone()))
                .unwrap_or_default();
            image.vips.insert(*key, VipImage { info: *info, ring });
        }
        Op::RemoveVip(key) => {
            image.vips.remove(key);
        }
    }
}

/// Simulation bookkeeping for [`apply`]: ring writes land in the RINGS
/// array whether or not a VIP points there yet.
const PENDING: u32 = 0x8000_0000;

fn pending_key(ring_base: u32) -> VipKey {
    VipKey {
        addr: ring_base,
        port: 0,
        proto: 0xff,
        _pad: 0xff,
    }
}

/// The invariant of the module doc, checked on an image: the first
/// violation found, as text.
pub fn check_invariant(image: &KernelImage) -> Result<(), String> {
    for (key, v) in &image.vips {
        if v.info.flags & PENDING != 0 || v.info.flags & lb_common::VIP_FLAG_ADDR_ONLY != 0 {
            continue;
        }
        for (slot, &id) in v.ring.iter().enumerate() {
            if id == NO_BACKEND {
                continue;
            }
            match image.backends.get(&id) {
                Some(b) if usable(b) => {}
                Some(_) => return Err(format!("{key:?} slot {slot} names unusable backend {id}")),
                None => return Err(format!("{key:?} slot {slot} names missing backend {id}")),
            }
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::maglev::{MaglevBackend, MaglevTable};

    const M: u32 = 251;

    fn backend(id: u32, usable: bool) -> Backend {
        crate::datapath::backend_entry(
            std::net::Ipv4Addr::new(198, 18, 0, id as u8),
            2,
            0,
            usable,
            [2, 0, 0, 0, 0, id as u8],
            [2, 0, 0, 0, 0, 0xfe],
        )
    }

    fn vip_key(n: u8) -> VipKey {
        VipKey::new(u32::from_be_bytes([198, 19, 0, n]), 80, 6)
    }

    /// (backend id, weight, usable)
    type Member = (u32, u32, bool);

    /// A target image: VIP n (index n) with the given members.
    fn target(vips: &[(u8, &[Member])]) -> KernelImage {
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
                flags: 0,
            };
            img.vips.insert(vip_key(n), VipImage { info, ring });
            for &(id, _, usable) in backends {
                img.backends.insert(id, backend(id, usable));
            }
        }
        img
    }

    /// Applies the plan op by op, checking the invariant after each, and
    /// returns the final image.
    fn run(current: &KernelImage, want: &KernelImage) -> (Vec<Op>, KernelImage) {
        let ops = plan(current, want);
        let mut img = current.clone();
        for (i, op) in ops.iter().enumerate() {
            apply(&mut img, op);
            if let Err(e) = check_invariant(&img) {
                panic!("after op {i} ({op:?}): {e}\nplan: {ops:?}");
            }
        }
        img.vips.retain(|_, v| v.info.flags & PENDING == 0);
        (ops, img)
    }

    #[test]
    fn a_fresh_vip_gets_backends_then_ring_then_vip_entry() {
        let want = target(&[(1, &[(1, 1, true), (2, 1, true)])]);
        let (ops, img) = run(&KernelImage::default(), &want);
        assert_eq!(img, want);
        assert!(matches!(ops[0], Op::SetBackend(..)));
        assert!(matches!(ops[1], Op::SetBackend(..)));
        assert!(matches!(ops[2], Op::WriteRing { .. }));
        assert!(matches!(ops[3], Op::SetVip(..)));
        assert_eq!(ops.len(), 4);
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
        assert!(img.backends[&2].flags & BACKEND_FLAG_USABLE != 0);
        assert!(!img.vips[&vip_key(1)].ring.contains(&2));
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
    fn many_random_transitions_keep_the_invariant() {
        // Deterministic pseudo-random walk over backend sets, weights and
        // health of two VIPs.
        let mut seed = 0x1234_5678_u64;
        let mut rnd = |n: u64| {
            seed = seed
                .wrapping_mul(6364136223846793005)
                .wrapping_add(1442695040888963407);
            (seed >> 33) % n
        };
        let mut have = KernelImage::default();
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
            let want = target(&spec);
            let (_, img) = run(&have, &want);
            assert_eq!(img, want);
            have = img;
        }
    }
}
