//! Module of the lb-ebpf binary (main.rs), not of the library: the steps
//! a VIP's packet takes to its backend, shared by IPv4 and IPv6 over the
//! [`Flow`] trait (each family has its own flow key, flow cache and
//! conntrack map; the backends, rings and counters are shared). Inlined
//! per family, so each compiles to what a hand-written path would.

use lb_common::{
    Backend, FLOW_FLAG_CLOSING, FlowCacheEntry, FlowCacheEntry6, FlowEntry, FlowKey, FlowKey6,
    IPPROTO_TCP, NO_BACKEND, Reason, VipInfo, flow_cache_mix, flow_cache_mix6, flow_cache_slot,
    ring_slot,
};

use crate::{
    BACKEND_STATS, BACKENDS, CONNTRACK, CONNTRACK6, FLOW_CACHE, FLOW_CACHE6, RINGS, RUNTIME,
    VIP_STATS, acl, syn_guard,
};

/// A family's flow key, with its flow cache and conntrack map.
/// Whether two keys' words are equal. Folded with XOR and OR: `==` on an
/// array of more than two words becomes a call to a byte-wise `memcmp`
/// in BPF (40 iterations for an IPv6 key).
#[inline(always)]
fn words_equal<const N: usize>(a: [u64; N], b: [u64; N]) -> bool {
    let mut diff = 0;
    for i in 0..N {
        diff |= a[i] ^ b[i];
    }
    diff == 0
}

/// Stores `value` at `dst` as `N` 64-bit words: a plain struct store
/// becomes a call to a byte-wise `memmove` in BPF.
///
/// # Safety
/// `dst` is valid for writes and 8-byte aligned; `T` is `N` words long.
#[inline(always)]
unsafe fn store_words<T: Copy, const N: usize>(dst: *mut T, value: T) {
    const { assert!(core::mem::size_of::<T>() == N * 8) };
    // SAFETY: T is N words long (asserted), plain data.
    let words: [u64; N] = unsafe { core::mem::transmute_copy(&value) };
    let dst = dst as *mut u64;
    for (i, w) in words.iter().enumerate() {
        // SAFETY: within `dst`'s N words, as the caller promises.
        unsafe { dst.add(i).write(*w) };
    }
}

pub(crate) trait Flow: Copy + crate::ratelimit::Source {
    type Cache: Copy;
    /// The flow cache's one-multiply mix.
    fn mix(&self) -> u32;
    /// The flow hash (the ring's).
    fn hash(&self) -> u32;
    fn proto(&self) -> u32;
    fn cache_slot(slot: u32) -> Option<*mut Self::Cache>;
    /// The backend id of a cache copy that holds this flow and passes the
    /// check.
    fn cached(&self, c: &Self::Cache, mix: u32) -> Option<u32>;
    fn cache_entry(&self, backend_id: u32, mix: u32) -> Self::Cache;
    /// Stores `entry` into the cache slot `c` word by word.
    ///
    /// # Safety
    /// `c` is a valid, 8-byte aligned array value.
    unsafe fn store(c: *mut Self::Cache, entry: Self::Cache);
    fn tracked(&self) -> Option<*mut FlowEntry>;
    fn track(&self, entry: &FlowEntry);
}

impl Flow for FlowKey {
    type Cache = FlowCacheEntry;
    #[inline(always)]
    fn mix(&self) -> u32 {
        flow_cache_mix(self)
    }
    #[inline(always)]
    fn hash(&self) -> u32 {
        FlowKey::hash(self)
    }
    #[inline(always)]
    fn proto(&self) -> u32 {
        self.proto
    }
    #[inline(always)]
    fn cache_slot(slot: u32) -> Option<*mut FlowCacheEntry> {
        FLOW_CACHE.get_ptr_mut(slot)
    }
    #[inline(always)]
    fn cached(&self, c: &FlowCacheEntry, mix: u32) -> Option<u32> {
        (words_equal(c.key.as_words(), self.as_words()) && c.check == mix ^ c.backend_id)
            .then_some(c.backend_id)
    }
    #[inline(always)]
    unsafe fn store(c: *mut FlowCacheEntry, entry: FlowCacheEntry) {
        // SAFETY: as the caller promises.
        unsafe { store_words::<_, 3>(c, entry) }
    }
    #[inline(always)]
    fn cache_entry(&self, backend_id: u32, mix: u32) -> FlowCacheEntry {
        FlowCacheEntry {
            key: *self,
            backend_id,
            check: mix ^ backend_id,
        }
    }
    #[inline(always)]
    fn tracked(&self) -> Option<*mut FlowEntry> {
        // The key by reference: by value it is copied to the stack once
        // more.
        CONNTRACK.get_ptr_mut(self)
    }
    #[inline(always)]
    fn track(&self, entry: &FlowEntry) {
        let _ = CONNTRACK.insert(self, entry, 0);
    }
}

impl Flow for FlowKey6 {
    type Cache = FlowCacheEntry6;
    #[inline(always)]
    fn mix(&self) -> u32 {
        flow_cache_mix6(self)
    }
    #[inline(always)]
    fn hash(&self) -> u32 {
        FlowKey6::hash(self)
    }
    #[inline(always)]
    fn proto(&self) -> u32 {
        self.proto
    }
    #[inline(always)]
    fn cache_slot(slot: u32) -> Option<*mut FlowCacheEntry6> {
        FLOW_CACHE6.get_ptr_mut(slot)
    }
    #[inline(always)]
    fn cached(&self, c: &FlowCacheEntry6, mix: u32) -> Option<u32> {
        (words_equal(c.key.as_words(), self.as_words()) && c.check == mix ^ c.backend_id)
            .then_some(c.backend_id)
    }
    #[inline(always)]
    unsafe fn store(c: *mut FlowCacheEntry6, entry: FlowCacheEntry6) {
        // SAFETY: as the caller promises.
        unsafe { store_words::<_, 6>(c, entry) }
    }
    #[inline(always)]
    fn cache_entry(&self, backend_id: u32, mix: u32) -> FlowCacheEntry6 {
        FlowCacheEntry6 {
            key: *self,
            backend_id,
            check: mix ^ backend_id,
        }
    }
    #[inline(always)]
    fn tracked(&self) -> Option<*mut FlowEntry> {
        CONNTRACK6.get_ptr_mut(self)
    }
    #[inline(always)]
    fn track(&self, entry: &FlowEntry) {
        let _ = CONNTRACK6.insert(self, entry, 0);
    }
}

/// The backend for `flow` of `vip`, with the VIP's and the backend's
/// counters moved (`bytes`: the frame as received).
///
/// Established flow: honoured while its backend is usable and still
/// serves this VIP, and its record has not expired; otherwise the VIP's
/// scheduler picks (crate::sched: the ring, a rotation or least
/// connections). The flow cache answers for flows it already
/// answered since the agent last cleared it (once per tick of the flow
/// clock) with one inlined array load; the first packet of a flow in a
/// tick (and every FIN or RST) goes through the conntrack map (the LRU),
/// the record: the lookup keeps the record fresh in the LRU, checks its
/// expiry and stamps it with the clock. So a flow in use refreshes its
/// record once per tick at the cost of one lookup, whatever else shares
/// its cache slot, and a cache hit reads no clock. The cache slot comes
/// from one multiply (the full flow hash is only needed, and computed, on
/// the way to the ring).
///
/// A TCP SYN without ACK (`new_connection`) is steered by the scheduler
/// even when a record exists (a reused source port must follow the
/// current ring); a FIN or RST (`closing`) moves the record to the
/// closing timeout (the first one also ends its count for least
/// connections).
///
/// Under the SYN-flood guard (syn_guard.rs), a SYN is steered by the
/// Maglev ring and not recorded; a TCP packet without SYN that finds no
/// record (the first ACK after such a SYN) is steered by the ring too,
/// whatever the VIP's scheduler, so that it reaches the SYN's backend.
#[inline(always)]
pub(crate) fn steer<F: Flow + acl::Source>(
    flow: &F,
    vip: &VipInfo,
    new_connection: bool,
    closing: bool,
    bytes: u64,
) -> Result<&'static Backend, Reason> {
    if new_connection && syn_guard::unrecorded(vip.index) {
        return syn_guard::steer_syn(flow, vip, bytes);
    }
    let mix = flow.mix();
    let cache_slot = F::cache_slot(flow_cache_slot(mix));
    // The VIP's ACL word goes into the cache check: a hit proves the flow
    // passed the ACL in force (acl.rs); every other packet is checked.
    let acl = acl::word(vip.index);
    let check = mix ^ acl;
    let mut cached = false;
    // The clock, once read (on the way to conntrack); 0 without an agent.
    let mut now = 0;
    let tracked = if new_connection {
        acl::check(flow, vip.index, acl)?;
        None
    } else {
        let copy = cache_slot.map(|c| {
            // SAFETY: an array value, valid for the program's run; it is
            // copied out, and a copy torn by a concurrent writer is handled
            // as FLOW_CACHE describes.
            unsafe { *c }
        });
        match copy.and_then(|c| flow.cached(&c, check)) {
            Some(id) if !closing => {
                cached = true;
                Some(id)
            }
            _ => match acl::check(flow, vip.index, acl).map(|()| flow.tracked())? {
                Some(e) => {
                    // SAFETY: the map value stays valid for the program's
                    // run (RCU); concurrent writers store whole words.
                    let entry = unsafe { &mut *e };
                    let rt = RUNTIME.get(0);
                    now = rt.map_or(0, |rt| rt.now_ms);
                    if rt.is_some_and(|rt| entry.is_expired(flow.proto(), rt)) {
                        None
                    } else {
                        entry.last_seen_ms = now;
                        if closing {
                            if entry.flags & FLOW_FLAG_CLOSING == 0 {
                                crate::sched::closed(vip.index, entry.backend_id);
                            }
                            entry.flags |= FLOW_FLAG_CLOSING;
                        }
                        Some(entry.backend_id)
                    }
                }
                None => None,
            },
        }
    };
    let mut hit = false;
    let mut backend_id = NO_BACKEND;
    let mut backend: Option<&'static Backend> = None;
    if let Some(id) = tracked
        && let Some(b) = BACKENDS.get(id)
        && b.is_usable()
        && b.vip_index == vip.index
    {
        hit = true;
        backend_id = id;
        backend = Some(b);
    }
    let backend = match backend {
        Some(b) => b,
        None => {
            // A UDP flow's first packet is a new connection for the rate
            // limits (a TCP one was counted by its SYN).
            let tcp = flow.proto() == IPPROTO_TCP as u32;
            if !tcp && vip.flags & lb_common::VIP_FLAG_LIMITS != 0 {
                crate::ratelimit::admit_new_flow(vip.index, flow)?;
            }
            // A TCP packet without SYN and without record: the ring (the
            // guarded SYN before it went by the ring); else the VIP's
            // scheduler.
            let (id, b) = if tcp && !new_connection {
                ring_backend(flow, vip)?
            } else {
                crate::sched::pick(flow, vip)?
            };
            backend_id = id;
            if now == 0 {
                now = RUNTIME.get(0).map_or(0, |rt| rt.now_ms);
            }
            flow.track(&FlowEntry {
                backend_id,
                flags: if closing { FLOW_FLAG_CLOSING } else { 0 },
                last_seen_ms: now,
            });
            if tcp {
                syn_guard::note_record(flow.hash());
            }
            if !closing {
                crate::sched::opened(vip.index, id);
            }
            b
        }
    };
    if !(cached && hit)
        && let Some(c) = cache_slot
    {
        // SAFETY: a plain store into the array value; concurrent readers
        // validate with `check`.
        unsafe { F::store(c, flow.cache_entry(backend_id, check)) };
    }

    count_steered(vip.index, backend_id, hit, bytes);
    Ok(backend)
}

/// Moves the counters of a packet (`bytes` as received) steered to
/// `backend_id` of the VIP with index `vip_index`: a tracked flow's
/// (`hit`) or a new one's.
#[inline(always)]
pub(crate) fn count_steered(vip_index: u32, backend_id: u32, hit: bool, bytes: u64) {
    if let Some(s) = VIP_STATS.get_ptr_mut(vip_index) {
        // SAFETY: per-CPU slot.
        unsafe {
            (*s).packets += 1;
            (*s).bytes += bytes;
            if hit {
                (*s).conntrack_hits += 1;
            } else {
                (*s).new_flows += 1;
            }
        }
    }
    count_backend(backend_id, bytes);
}

/// Moves the packet and byte counters of a packet steered to
/// `backend_id` of the VIP with index `vip_index` that neither hit a
/// record nor made one (an unrecorded SYN).
#[inline(always)]
pub(crate) fn count_forwarded(vip_index: u32, backend_id: u32, bytes: u64) {
    if let Some(s) = VIP_STATS.get_ptr_mut(vip_index) {
        // SAFETY: per-CPU slot.
        unsafe {
            (*s).packets += 1;
            (*s).bytes += bytes;
        }
    }
    count_backend(backend_id, bytes);
}

#[inline(always)]
fn count_backend(backend_id: u32, bytes: u64) {
    if let Some(s) = BACKEND_STATS.get_ptr_mut(backend_id) {
        // SAFETY: per-CPU slot.
        unsafe {
            (*s).packets += 1;
            (*s).bytes += bytes;
        }
    }
}

/// The backend `vip`'s Maglev ring gives `flow` (and its id), if it is
/// usable.
#[inline(always)]
pub(crate) fn ring_backend<F: Flow>(
    flow: &F,
    vip: &VipInfo,
) -> Result<(u32, &'static Backend), Reason> {
    ring_backend_of(flow.hash(), vip)
}

/// The backend `vip`'s Maglev ring gives the flow hash `hash` (and its
/// id), if it is usable.
#[inline(always)]
pub(crate) fn ring_backend_of(hash: u32, vip: &VipInfo) -> Result<(u32, &'static Backend), Reason> {
    let slot = vip.ring_base + ring_slot(hash, vip.ring_size);
    let id = *RINGS.get(slot).ok_or(Reason::DropNoBackend)?;
    let b = BACKENDS.get(id).ok_or(Reason::DropNoBackend)?;
    if !b.is_usable() {
        return Err(Reason::DropNoBackend);
    }
    Ok((id, b))
}

/// The backend that owns `flow` of `vip` for an ICMP error about it: the
/// flow's conntrack entry if it is honoured, else the VIP's ring. Read
/// only: an error creates no entry, refreshes none, moves no counter.
#[inline(always)]
pub(crate) fn owner<F: Flow>(flow: &F, vip: &VipInfo) -> Result<&'static Backend, Reason> {
    let tracked = flow.tracked().map(|entry| {
        // SAFETY: the map value stays valid for the program's run (RCU);
        // it is only read.
        unsafe { (*entry).backend_id }
    });
    match tracked.and_then(|id| BACKENDS.get(id)) {
        Some(b) if b.is_usable() && b.vip_index == vip.index => Ok(b),
        _ => ring_backend(flow, vip).map(|(_, b)| b),
    }
}
