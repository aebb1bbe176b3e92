//! Module of the lb-ebpf binary: the direct-mapped caches in front of
//! the NAT maps (NAT_FWD_CACHE(6) before NAT_FWD(6), NAT_REV_CACHE(6)
//! before NAT_REV(6)), the design of FLOW_CACHE (see main.rs): the slot
//! from the flow's one-multiply mix, copied and stored word by word, a
//! check word over the whole copy, cleared by the agent once per tick of
//! the flow clock.
//!
//! A hit costs an inlined array load of 11 (forward) or 13 (return)
//! words instead of a hash-map lookup, and reads no clock: the map entry
//! is refreshed (`last_seen_ms`) by the flow's first packet in each tick,
//! which misses because the agent cleared the cache. FIN and RST bypass
//! the cache so that the map entry learns the flow is closing.
//!
//! A copy is used only if its key equals the packet's flow and its check
//! word matches every other word of the copy: a copy torn by a concurrent
//! writer (the key of one flow, the client of another) falls back to the
//! map. Whenever the kernel removes or reuses a NAT entry (re-steering,
//! a reclaimed port) it rewrites or clears that key's slot, so a reused
//! SNAT port is never translated with the previous flow's values.

use lb_common::{
    flow_cache_slot,
    nat::{
        NAT_CACHE_KEY_WORDS, NAT_FWD_CACHE_WORDS, NAT_REV_CACHE_WORDS, NatFwd, NatFwdCache, NatRev,
        NatRevCache, nat_cache_check,
    },
};

use aya_ebpf::programs::XdpContext;
use lb_common::Reason;
use lb_ebpf::{parse::write_macs, rewrite::ptr_at};

use crate::{
    BACKENDS,
    nat::{back_to_client, count_return},
    nat_flow::NatFlow,
    steer::count_steered,
};

/// Loads `N` words from `p`, each with a volatile load (a plain copy of
/// the value becomes a byte-wise `memcpy` call in BPF).
///
/// # Safety
/// `p` is valid for `N` words and 8-byte aligned.
#[inline(always)]
unsafe fn load_words<const N: usize>(p: *const u64) -> [u64; N] {
    let mut w = [0u64; N];
    for (i, x) in w.iter_mut().enumerate() {
        // SAFETY: within the caller's N words.
        *x = unsafe { core::ptr::read_volatile(p.add(i)) };
    }
    w
}

/// Stores `w` at `p` word by word (see [`load_words`]).
///
/// # Safety
/// As [`load_words`], for writes.
#[inline(always)]
unsafe fn store_words<const N: usize>(p: *mut u64, w: &[u64; N]) {
    for (i, x) in w.iter().enumerate() {
        // SAFETY: within the caller's N words.
        unsafe { core::ptr::write_volatile(p.add(i), *x) };
    }
}

/// Whether a copy's key words (words 1..=5) equal `key` and its check
/// word (word 0, low half) matches the rest.
#[inline(always)]
fn valid<const N: usize>(w: &[u64; N], key: &[u64; NAT_CACHE_KEY_WORDS]) -> bool {
    let mut diff = 0;
    for i in 0..NAT_CACHE_KEY_WORDS {
        diff |= w[1 + i] ^ key[i];
    }
    diff == 0 && w[0] as u32 == nat_cache_check(w)
}

/// The cached forward values of `flow`, if its slot holds a valid copy.
#[inline(always)]
pub(crate) fn fwd_cached<F: NatFlow>(flow: &F) -> Option<NatFwdCache> {
    let p = F::fwd_cache(flow_cache_slot(flow.mix()))?;
    // SAFETY: an array value, valid for the program's run, 8-byte aligned.
    let w = unsafe { load_words::<NAT_FWD_CACHE_WORDS>(p as *const u64) };
    valid(&w, &flow.cache_key()).then(|| NatFwdCache::from_words(w))
}

/// Caches `flow`'s forward entry `e`.
#[inline(always)]
pub(crate) fn cache_fwd<F: NatFlow>(flow: &F, e: &NatFwd) {
    let Some(p) = F::fwd_cache(flow_cache_slot(flow.mix())) else {
        return;
    };
    let c = NatFwdCache {
        check: 0,
        _pad: 0,
        key: flow.cache_key(),
        snat_addr: e.snat_addr,
        backend_addr: e.backend_addr,
        snat_port: e.snat_port,
        backend_port: e.backend_port,
        backend_id: e.backend_id,
    }
    .sealed();
    // SAFETY: as in fwd_cached; readers validate the copy.
    unsafe { store_words(p as *mut u64, &c.to_words()) };
}

/// The cached return values of reply key `key`, if its slot holds a
/// valid copy.
#[inline(always)]
pub(crate) fn rev_cached<F: NatFlow>(key: &F) -> Option<NatRevCache> {
    let p = F::rev_cache(flow_cache_slot(key.mix()))?;
    // SAFETY: an array value, valid for the program's run, 8-byte aligned.
    let w = unsafe { load_words::<NAT_REV_CACHE_WORDS>(p as *const u64) };
    valid(&w, &key.cache_key()).then(|| NatRevCache::from_words(w))
}

/// Caches reply key `key`'s reverse entry `e`.
#[inline(always)]
pub(crate) fn cache_rev<F: NatFlow>(key: &F, e: &NatRev) {
    let Some(p) = F::rev_cache(flow_cache_slot(key.mix())) else {
        return;
    };
    let c = NatRevCache {
        check: 0,
        _pad: 0,
        key: key.cache_key(),
        client_addr: e.client_addr,
        vip_addr: e.vip_addr,
        client_port: e.client_port,
        vip_port: e.vip_port,
        vip_index: e.vip_index,
        client_mac: e.client_mac,
        lb_mac: e.lb_mac,
        ifindex: e.ifindex,
    }
    .sealed();
    // SAFETY: as in rev_cached; readers validate the copy.
    unsafe { store_words(p as *mut u64, &c.to_words()) };
}

/// Empties the forward slot of `flow` (its entry is being removed).
#[inline(always)]
pub(crate) fn forget_fwd<F: NatFlow>(flow: &F) {
    if let Some(p) = F::fwd_cache(flow_cache_slot(flow.mix())) {
        // SAFETY: as in fwd_cached.
        unsafe { store_words(p as *mut u64, &[0u64; NAT_FWD_CACHE_WORDS]) };
    }
}

/// Empties the return slot of reply key `key` (its entry is being
/// removed).
#[inline(always)]
pub(crate) fn forget_rev<F: NatFlow>(key: &F) {
    if let Some(p) = F::rev_cache(flow_cache_slot(key.mix())) {
        // SAFETY: as in rev_cached.
        unsafe { store_words(p as *mut u64, &[0u64; NAT_REV_CACHE_WORDS]) };
    }
}

/// A forward packet (not a SYN, FIN or RST) of a flow whose cached copy
/// names a backend still usable and serving VIP `vip_index`: counted,
/// rewritten and sent (`Some`, the action). `None`: the map's way.
/// Called by the balancer for IPv4 (no handoff to the NAT subprogram) and
/// by [`crate::nat`] for IPv6.
#[inline(always)]
pub(crate) fn forward_hit<F: NatFlow>(
    ctx: &XdpContext,
    l3: usize,
    l4: usize,
    flow: &F,
    vip_index: u32,
    bytes: u64,
) -> Option<Result<u32, Reason>> {
    let c = fwd_cached(flow)?;
    let b = BACKENDS.get(c.backend_id)?;
    if !b.is_usable() || b.vip_index != vip_index {
        return None;
    }
    count_steered(vip_index, c.backend_id, true, bytes);
    Some(crate::nat::out::<F>(
        ctx,
        l3,
        l4,
        flow.proto() as u8,
        &c.snat_addr,
        c.snat_port,
        &c.backend_addr,
        c.backend_port,
        b,
    ))
}

/// A reply (not a FIN or RST) whose reply key `flow` has a cached copy:
/// translated back and sent the client's way (`Some`, the action).
/// `None`: the map's way.
#[inline(always)]
pub(crate) fn reply_hit<F: NatFlow>(
    ctx: &XdpContext,
    l3: usize,
    l4: usize,
    flow: &F,
    bytes: u64,
) -> Option<Result<u32, Reason>> {
    let c = rev_cached(flow)?;
    let eth: *mut [u8; 14] = ptr_at(ctx, 0)?;
    if F::rewrite(
        ctx,
        l3,
        l4,
        flow.proto() as u8,
        &c.vip_addr,
        c.vip_port,
        &c.client_addr,
        c.client_port,
    )
    .is_none()
    {
        return Some(Err(Reason::DropMalformed));
    }
    // SAFETY: bounds checked by ptr_at.
    unsafe { write_macs(eth as *mut u8, c.client_mac, c.lb_mac) };
    count_return(c.vip_index, bytes);
    Some(back_to_client(ctx, c.ifindex))
}
