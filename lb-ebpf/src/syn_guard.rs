//! Module of the lb-ebpf binary: the SYN-flood guard.
//!
//! A TCP SYN normally records its flow in conntrack (an LRU insert, the
//! most expensive step of the fast path, and one that evicts the least
//! recently used flow when the table is full). A flood of spoofed SYNs
//! would then cost an insert each and push established flows out. So
//! when a CPU sees more SYNs for one VIP in one tick of the flow clock
//! than the agent's threshold allows ([`lb_common::Runtime::syn_guard`]),
//! that VIP's SYNs (on every CPU) are steered by the Maglev ring alone,
//! for the rest of the tick and the next: nothing is inserted, nothing is
//! evicted. The flow is recorded by its first packet without SYN (the
//! handshake's ACK), which finds no record and is steered by the same
//! ring to the same backend. What that gives up: a ring change between a
//! guarded SYN and its ACK sends the ACK to the new ring's backend, which
//! answers with a reset (the client retries); established flows are
//! never moved.

use core::intrinsics::{AtomicOrdering, atomic_or};

use aya_ebpf::{
    bindings::BPF_F_MMAPABLE,
    macros::map,
    maps::{Array, PerCpuArray},
};
use lb_common::{
    Backend, DEFAULT_MAX_VIPS, FLOW_FLAG_CLOSING, Reason, SYN_FILTER_ENTRIES, SYN_FLOOD_HOLD_MS,
    SynWindow, VipInfo, flow_cache_slot, syn_filter_bit,
};

use crate::{
    RUNTIME, count_reason,
    steer::{Flow, count_forwarded, ring_backend_of},
};

/// Per VIP index, per CPU: SYNs counted in the current tick.
#[map]
static SYN_GUARD: PerCpuArray<SynWindow> = PerCpuArray::with_max_entries(DEFAULT_MAX_VIPS, 0);

/// Per VIP index, shared by all CPUs: the clock value until which every
/// CPU leaves the VIP's SYNs unrecorded, set by a CPU whose count went
/// over the threshold. A flood that moves between CPUs (a sender thread
/// migrating, RSS changing) so finds the guard already on where it lands.
/// Read by every SYN, written about once per tick per CPU during a flood.
#[map]
static SYN_FLOOD_UNTIL: Array<u64> = Array::with_max_entries(DEFAULT_MAX_VIPS, 0);

/// Which TCP flows may have a conntrack record (lb_common::SYN_FILTER_BITS
/// says how): the control word, then two banks of bits by flow hash.
/// Memory-mappable: the agent rebuilds a bank with atomic stores while
/// the kernel sets bits.
#[map]
static SYN_FILTER: Array<u64> = Array::with_max_entries(SYN_FILTER_ENTRIES, BPF_F_MMAPABLE);

/// Notes in the SYN filter that the TCP flow with hash `hash` has a
/// record now (both banks: the one in use and the one the agent may be
/// rebuilding).
#[inline(always)]
pub(crate) fn note_record(hash: u32) {
    for bank in 0..2 {
        let (i, bit) = syn_filter_bit(hash, bank);
        if let Some(w) = SYN_FILTER.get_ptr_mut(i) {
            // SAFETY: an array value, valid for the program's run; other
            // CPUs and the agent write it with atomic operations only (the
            // plain load only spares the locked write when the bit is set).
            unsafe {
                if *w & bit == 0 {
                    atomic_or::<u64, u64, { AtomicOrdering::Relaxed }>(w, bit);
                }
            }
        }
    }
}

/// Whether the TCP flow with hash `hash` may have a conntrack record:
/// false only when the bank in use says it certainly has none; true
/// while no bank is complete.
#[inline(always)]
fn may_have_record(hash: u32) -> bool {
    let bank = match SYN_FILTER.get(0) {
        Some(1) => 0,
        Some(2) => 1,
        _ => return true,
    };
    let (i, bit) = syn_filter_bit(hash, bank);
    SYN_FILTER.get(i).is_none_or(|w| *w & bit != 0)
}

/// Counts a SYN of the VIP with index `vip_index` and says whether it
/// goes unrecorded (the guard is on for this VIP on this CPU). Off (every
/// SYN recorded) without an agent's threshold.
#[inline(always)]
pub(crate) fn unrecorded(vip_index: u32) -> bool {
    let Some(rt) = RUNTIME.get(0) else {
        return false;
    };
    if rt.syn_guard == 0 {
        return false;
    }
    let (now, threshold) = (rt.now_ms, rt.syn_guard);
    // Whether the guard is on by this CPU's count, and whether this tick's
    // count went over the threshold (only that sets the shared hold).
    let (on, tripped) = match SYN_GUARD.get_ptr_mut(vip_index) {
        // SAFETY: per-CPU slot, no concurrent writer on this CPU.
        Some(w) => unsafe { ((*w).count_syn(now, threshold), (*w).syns >= threshold) },
        None => (false, false),
    };
    let Some(until) = SYN_FLOOD_UNTIL.get_ptr_mut(vip_index) else {
        return on;
    };
    // SAFETY: an array value; a plain 8-byte aligned load and store (a
    // race between two CPUs leaves one of their values, both valid).
    unsafe {
        let held = core::ptr::read_volatile(until);
        if tripped && held < now + SYN_FLOOD_HOLD_MS {
            core::ptr::write_volatile(until, now + SYN_FLOOD_HOLD_MS);
        }
        on || held > now
    }
}

/// Steers an unrecorded SYN: the ring's backend. A record the flow's
/// 5-tuple already has (a reused source port: a closed connection, or one
/// from before a ring change) is pointed at that backend in place, so that
/// the ACK that follows reaches the backend the SYN did; a flow cache slot
/// holding the 5-tuple likewise. No insert. The conntrack lookup is
/// skipped when the SYN filter says the flow has no record (most SYNs of
/// a flood).
#[inline(always)]
pub(crate) fn steer_syn<F: Flow>(
    flow: &F,
    vip: &VipInfo,
    bytes: u64,
) -> Result<&'static Backend, Reason> {
    let hash = flow.hash();
    let (id, backend) = ring_backend_of(hash, vip)?;
    let mix = flow.mix();
    if let Some(c) = F::cache_slot(flow_cache_slot(mix)) {
        // SAFETY: an array value, valid for the program's run; copied out
        // (a torn copy fails the check and is left alone).
        let copy = unsafe { *c };
        if flow.cached(&copy, mix).is_some_and(|cached| cached != id) {
            // SAFETY: a plain store into the array value; concurrent
            // readers validate with `check`.
            unsafe { F::store(c, flow.cache_entry(id, mix)) };
        }
    }
    if may_have_record(hash)
        && let Some(e) = flow.tracked()
    {
        // SAFETY: the map value stays valid for the program's run (RCU);
        // concurrent writers store whole words.
        let entry = unsafe { &mut *e };
        if entry.backend_id != id || entry.flags & FLOW_FLAG_CLOSING != 0 {
            entry.backend_id = id;
            entry.flags = 0;
            entry.last_seen_ms = RUNTIME.get(0).map_or(0, |rt| rt.now_ms);
        }
    }
    count_forwarded(vip.index, id, bytes);
    count_reason(Reason::FwdSynUnrecorded);
    Ok(backend)
}
