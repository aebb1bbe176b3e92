//! Module of the lb-ebpf binary (main.rs): the scheduler that picks the
//! backend of a new flow (a packet with no honoured conntrack record or
//! NAT pair), per VIP. Maps and their rules: lb_common::sched.
//!
//! - maglev: the VIP's ring (what every lb host agrees on);
//! - round robin and weighted round robin: slot `turn % len` of the VIP's
//!   region, `turn` a per-CPU counter per VIP (exact rotation on each CPU;
//!   CPUs rotate independently, so over several CPUs the shares are exact
//!   only on average);
//! - least connections: the region's backends compared by active
//!   connections per unit of weight; among those that share the least,
//!   the `turn % ties`-th (ties rotate).

use core::intrinsics::{AtomicOrdering, atomic_xadd};

use aya_ebpf::{
    cty::c_void,
    helpers::bpf_loop,
    macros::map,
    maps::{Array, PerCpuArray},
};
use lb_common::{
    Backend, DEFAULT_MAX_BACKENDS, DEFAULT_MAX_VIPS, NO_BACKEND, Reason, VipInfo,
    sched::{
        LC_MAX_BACKENDS, SCHED_LEAST_CONNECTIONS, SCHED_SLOTS_PER_VIP, SchedInfo, SchedSlot,
        lc_active, lc_less, sched_slot_index,
    },
};

use crate::{
    BACKENDS,
    steer::{Flow, ring_backend},
};

/// Per VIP index: its scheduler (an element never written: maglev).
#[map]
static SCHED: Array<SchedInfo> = Array::pinned(DEFAULT_MAX_VIPS, 0);

/// Per VIP index, a region of `SCHED_SLOTS_PER_VIP` slots naming its
/// usable, non-drained backends (written before the SCHED element that
/// makes them read).
#[map]
static SCHED_SLOTS: Array<SchedSlot> = Array::pinned(DEFAULT_MAX_VIPS * SCHED_SLOTS_PER_VIP, 0);

/// Per CPU, per VIP index: the next turn of the rotation. Not pinned: a
/// restarted agent starts the rotation afresh, which moves no flow.
#[map]
static SCHED_RR: PerCpuArray<u32> = PerCpuArray::with_max_entries(DEFAULT_MAX_VIPS, 0);

/// Per backend id: new flows of least-connections VIPs minus their first
/// FIN or RST. Written by the kernel only, atomically.
#[map]
static LC_ACTIVE: Array<u64> = Array::pinned(DEFAULT_MAX_BACKENDS + 1, 0);

/// Per backend id: the agent's correction, added to LC_ACTIVE. Written by
/// the agent only.
#[map]
static LC_CORRECTION: Array<u64> = Array::pinned(DEFAULT_MAX_BACKENDS + 1, 0);

/// The backend a new flow `flow` of `vip` takes, and its id. (A pair,
/// like `ring_backend`'s: a struct mixing the pointer with a flag came
/// back packed into one register, which the verifier refuses.)
#[inline(always)]
pub(crate) fn pick<F: Flow>(flow: &F, vip: &VipInfo) -> Result<(u32, &'static Backend), Reason> {
    let s = match SCHED.get(vip.index) {
        Some(s) if !s.uses_ring() => *s,
        _ => return ring_backend(flow, vip),
    };
    let id = pick_slot(vip.index, s.kind, s.len);
    let backend = BACKENDS.get(id).ok_or(Reason::DropNoBackend)?;
    if !backend.is_usable() {
        return Err(Reason::DropNoBackend);
    }
    Ok((id, backend))
}

/// The backend id a rotating scheduler (`kind`, `len` slots) gives the
/// next new flow of VIP `vip_index` on this CPU; [`NO_BACKEND`] if its
/// state cannot be read. A subprogram of its own: one copy for both
/// families and NAT, and the least-connections loop's frame is a
/// sibling of the caller's, not on top of it.
#[inline(never)]
fn pick_slot(vip_index: u32, kind: u32, len: u32) -> u32 {
    if len == 0 || len > SCHED_SLOTS_PER_VIP {
        return NO_BACKEND;
    }
    let Some(turn) = SCHED_RR.get_ptr_mut(vip_index) else {
        return NO_BACKEND;
    };
    // SAFETY: this CPU's element.
    let t = unsafe {
        let t = *turn;
        *turn = t.wrapping_add(1);
        t
    };
    let start = t % len;
    if kind != SCHED_LEAST_CONNECTIONS {
        return SCHED_SLOTS
            .get(sched_slot_index(vip_index, start))
            .map_or(NO_BACKEND, |s| s.backend_id);
    }
    if len > LC_MAX_BACKENDS {
        return NO_BACKEND;
    }
    let Some(scan) = LC_SCAN.get_ptr_mut(0) else {
        return NO_BACKEND;
    };
    // SAFETY: this CPU's element, valid for the program's run; written
    // field by field (a struct store becomes a memmove call).
    unsafe {
        (*scan).vip_index = vip_index;
        (*scan).len = len;
        (*scan).phase = 0;
        (*scan).best = NO_BACKEND;
        (*scan).best_weight = 0;
        (*scan).ties = 0;
        (*scan).best_active = 0;
    }
    // Two scans: the least load and how many backends share it, then the
    // `turn % ties`-th of them, so that ties rotate evenly (starting the
    // one scan at a rotating slot would favour the backend after a loaded
    // one).
    //
    // bpf_loop: the verifier checks the step once, not once per turn of
    // an unrolled loop (a plain loop of 64 turns at each of the three call
    // sites exceeded its budget of a million instructions). Its state is
    // in LC_SCAN, not on the stack: NAT's frame leaves no room.
    // SAFETY: `lc_step` has the callback's signature and takes no context.
    unsafe {
        bpf_loop(
            len,
            lc_step as *const () as *mut c_void,
            core::ptr::null_mut(),
            0,
        )
    };
    // SAFETY: as above.
    unsafe {
        let ties = (*scan).ties;
        if ties > 1 {
            (*scan).nth = t % ties;
            (*scan).phase = 1;
            bpf_loop(
                len,
                lc_step as *const () as *mut c_void,
                core::ptr::null_mut(),
                0,
            );
        }
        (*scan).best
    }
}

/// Per CPU: the state of the least-connections scan in progress.
#[map]
static LC_SCAN: PerCpuArray<LcScan> = PerCpuArray::with_max_entries(1, 0);

/// The state of a least-connections scan (bpf_loop's context).
#[repr(C)]
struct LcScan {
    vip_index: u32,
    len: u32,
    /// 0: find the least load; 1: pick the `nth` backend that has it.
    phase: u32,
    /// The least loaded backend (the first found, then the pick), its
    /// weight and count, and how many backends share that load.
    best: u32,
    best_weight: u32,
    ties: u32,
    nth: u32,
    _pad: u32,
    best_active: u64,
}

/// Turn `j` of a scan: slot `j` against the least load so far (phase 0),
/// or counted if it has the least load (phase 1).
extern "C" fn lc_step(j: u64, _ctx: *mut c_void) -> i64 {
    let Some(s) = LC_SCAN.get_ptr_mut(0) else {
        return 1;
    };
    // SAFETY: this CPU's element, set up by pick_slot, which waits for
    // bpf_loop to return.
    let s = unsafe { &mut *s };
    let i = j as u32;
    if i >= s.len {
        return 1;
    }
    let Some(slot) = SCHED_SLOTS.get(sched_slot_index(s.vip_index, i)) else {
        return 1;
    };
    let (id, weight) = (slot.backend_id, slot.weight);
    let active = lc_active(
        LC_ACTIVE.get(id).copied().unwrap_or(0),
        LC_CORRECTION.get(id).copied().unwrap_or(0),
    );
    let less = lc_less(active, weight, s.best_active, s.best_weight);
    let more = lc_less(s.best_active, s.best_weight, active, weight);
    if s.phase == 0 {
        if s.best == NO_BACKEND || less {
            s.best = id;
            s.best_active = active;
            s.best_weight = weight;
            s.ties = 1;
        } else if !more {
            s.ties += 1;
        }
        return 0;
    }
    if !less && !more {
        if s.nth == 0 {
            s.best = id;
            return 1;
        }
        s.nth -= 1;
    }
    0
}

/// Adds `delta` (wrapping) to backend `id`'s LC_ACTIVE word, atomically.
#[inline(always)]
fn count(id: u32, delta: u64) {
    if let Some(p) = LC_ACTIVE.get_ptr_mut(id) {
        // SAFETY: an 8-byte aligned array value, valid for the program's
        // run; every CPU writes it through atomic adds only. (The BPF
        // target has no `AtomicU64::fetch_add`; the intrinsic compiles to
        // BPF's atomic add.)
        unsafe { atomic_xadd::<u64, u64, { AtomicOrdering::Relaxed }>(p, delta) };
    }
}

/// A new flow of VIP `vip_index` to backend `id` has been recorded
/// (conntrack record, NAT pair): one connection more if the VIP counts
/// them.
#[inline(always)]
pub(crate) fn opened(vip_index: u32, id: u32) {
    if counts(vip_index) {
        count(id, 1);
    }
}

#[inline(always)]
fn counts(vip_index: u32) -> bool {
    SCHED
        .get(vip_index)
        .is_some_and(|s| s.kind == SCHED_LEAST_CONNECTIONS)
}

/// A record of VIP `vip_index` naming backend `id` moved to closing (its
/// first FIN or RST): one connection fewer if the VIP counts them.
#[inline(always)]
pub(crate) fn closed(vip_index: u32, id: u32) {
    if counts(vip_index) {
        count(id, u64::MAX);
    }
}
