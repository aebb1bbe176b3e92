//! Schedulers for new flows: what the agent writes per VIP and the kernel
//! reads when a flow has no honoured conntrack record (or NAT pair).
//! Established flows never consult it.
//!
//! - SCHED (array, one element per VIP index): [`SchedInfo`], which
//!   scheduler and how many slots of the VIP's region are in use.
//! - SCHED_SLOTS (array, [`SCHED_SLOTS_PER_VIP`] elements per VIP index,
//!   the region of VIP `i` starting at `i * SCHED_SLOTS_PER_VIP`):
//!   [`SchedSlot`]s naming usable, non-drained backends. Round robin: one
//!   slot per backend; weighted round robin: the agent's interleaved
//!   sequence; least connections: one slot per backend with its weight.
//! - LC_ACTIVE (array by backend id, written by the kernel only): new flows
//!   of least-connections VIPs minus their first FIN/RST, atomically.
//! - LC_CORRECTION (array by backend id, written by the agent only): what
//!   the agent adds to LC_ACTIVE so that their sum is the active count it
//!   last measured (idle expiry and LRU evictions never reach the kernel's
//!   counter). One writer per word: no update is lost.
//!
//! Maglev (`kind` 0, also what an element never written reads as) uses the
//! VIP's ring as before.

/// The Maglev ring (consistent hashing; the default).
pub const SCHED_MAGLEV: u32 = 0;
/// Slots in turn, by a per-CPU counter per VIP.
pub const SCHED_ROUND_ROBIN: u32 = 1;
/// The agent's smooth weighted sequence, in turn like round robin.
pub const SCHED_WEIGHTED_ROUND_ROBIN: u32 = 2;
/// The backend with the fewest active connections per unit of weight.
pub const SCHED_LEAST_CONNECTIONS: u32 = 3;

/// SCHED_SLOTS elements per VIP: the longest round-robin sequence.
pub const SCHED_SLOTS_PER_VIP: u32 = 1024;

/// Most backends a least-connections VIP may have: the kernel compares
/// them all for each new flow (a bounded loop).
pub const LC_MAX_BACKENDS: u32 = 64;

/// A VIP's scheduler (SCHED at its index).
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct SchedInfo {
    /// One of the `SCHED_*` values.
    pub kind: u32,
    /// Slots of the VIP's region in use (`<= SCHED_SLOTS_PER_VIP`, and
    /// `<= LC_MAX_BACKENDS` for least connections); 0: no usable backend.
    pub len: u32,
}

/// One slot of a VIP's scheduler region.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct SchedSlot {
    pub backend_id: u32,
    /// Least connections: the backend's weight (≥ 1); otherwise 0.
    pub weight: u32,
}

const _: () = assert!(core::mem::size_of::<SchedInfo>() == 8);
const _: () = assert!(core::mem::size_of::<SchedSlot>() == 8);

impl SchedInfo {
    /// Whether new flows of this VIP take the ring.
    pub const fn uses_ring(&self) -> bool {
        self.kind == SCHED_MAGLEV || self.kind > SCHED_LEAST_CONNECTIONS || self.len == 0
    }
}

/// A backend's active-connection count: the kernel's counter plus the
/// agent's correction, both wrapping words; a sum below zero (a close
/// counted before the correction caught up) reads as 0.
#[inline(always)]
pub const fn lc_active(counter: u64, correction: u64) -> u64 {
    let sum = counter.wrapping_add(correction) as i64;
    if sum < 0 { 0 } else { sum as u64 }
}

/// Whether a backend with `active` connections and weight `weight` is
/// less loaded than one with `best_active` and `best_weight`:
/// `active / weight < best_active / best_weight`, cross-multiplied (no
/// division in the kernel, and no 128-bit arithmetic, which BPF lacks:
/// counts are capped at 2^48 and weights are ≤ 10000 < 2^14, so the
/// products fit 64 bits).
#[inline(always)]
pub const fn lc_less(active: u64, weight: u32, best_active: u64, best_weight: u32) -> bool {
    const CAP: u64 = 1 << 48;
    let a = if active > CAP { CAP } else { active };
    let b = if best_active > CAP { CAP } else { best_active };
    a * (best_weight as u64) < b * (weight as u64)
}

/// The index in SCHED_SLOTS of slot `i` of VIP `vip_index`'s region.
#[inline(always)]
pub const fn sched_slot_index(vip_index: u32, i: u32) -> u32 {
    vip_index * SCHED_SLOTS_PER_VIP + i
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_negative_sum_reads_as_zero_and_wrapping_words_add() {
        assert_eq!(lc_active(5, 0), 5);
        assert_eq!(lc_active(5, (-3i64) as u64), 2);
        assert_eq!(lc_active(2, (-3i64) as u64), 0);
        // The kernel's counter below zero (closes of flows opened before
        // the VIP counted), corrected by the agent.
        assert_eq!(lc_active((-4i64) as u64, 10), 6);
    }

    #[test]
    fn less_loaded_is_per_unit_of_weight() {
        // 3/2 < 2/1
        assert!(lc_less(3, 2, 2, 1));
        assert!(!lc_less(2, 1, 3, 2));
        // Equal loads: not less (the first in rotation order stays).
        assert!(!lc_less(2, 2, 1, 1));
        assert!(lc_less(0, 1, 1, 100));
    }
}
