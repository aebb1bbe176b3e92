//! Module of the lb-ebpf binary: per-VIP rate limits (see
//! lb_common::ratelimit). Checked after the VIP is found, before anything
//! is steered or recorded:
//!
//! - packets per second per source prefix (optional): every packet to
//!   the VIP, established flows included;
//! - new connections per second per source prefix and for the whole VIP:
//!   a TCP SYN, or the first packet of a UDP flow (a conntrack or NAT
//!   miss). A TCP packet without SYN is never counted: a connection is
//!   counted once, by its SYN, and established flows are never limited by
//!   it (the first ACK of a handshake whose SYN went unrecorded under the
//!   SYN-flood guard included).
//!
//! Refused packets are dropped and counted (`drop_rate_limited`, and per
//! VIP); each source bucket counts what it admitted and refused, for the
//! agent's list of the most limited sources.

use aya_ebpf::{
    helpers::bpf_ktime_get_ns,
    macros::map,
    maps::{Array, LruHashMap, PerCpuArray},
};
use lb_common::{
    DEFAULT_MAX_VIPS, FlowKey, FlowKey6, Reason,
    ratelimit::{
        Bucket, DEFAULT_RATE_SOURCES, RATE_NEW_V4, RATE_NEW_V6, RATE_PKT_V4, RATE_PKT_V6, RateKey,
        RateLimits, mask_v4, mask_v6,
    },
};

use crate::VIP_STATS;

/// Per VIP index: its limits (all zero: none). Written by the agent.
#[map]
static RATE_LIMITS: Array<RateLimits> = Array::with_max_entries(DEFAULT_MAX_VIPS, 0);

/// Per VIP index: the bucket of its new-connection ceiling.
#[map]
static RATE_VIP: Array<Bucket> = Array::with_max_entries(DEFAULT_MAX_VIPS, 0);

/// Per (VIP, limit, source prefix): a bucket. An LRU: a source that went
/// quiet gives its bucket up first (it would be full again anyway).
#[map]
static RATE_SOURCES: LruHashMap<RateKey, Bucket> =
    LruHashMap::with_max_entries(DEFAULT_RATE_SOURCES, 0);

/// A flow's source address, as the limits key it.
pub(crate) trait Source {
    /// The source masked to `limits`' prefix for its family, and the
    /// family's bucket kinds (new connections, packets).
    fn source(&self, limits: &RateLimits) -> ([u32; 4], u32, u32);
}

impl Source for FlowKey {
    #[inline(always)]
    fn source(&self, l: &RateLimits) -> ([u32; 4], u32, u32) {
        (
            [mask_v4(self.src_addr, l.prefix_v4), 0, 0, 0],
            RATE_NEW_V4,
            RATE_PKT_V4,
        )
    }
}

impl Source for FlowKey6 {
    #[inline(always)]
    fn source(&self, l: &RateLimits) -> ([u32; 4], u32, u32) {
        (
            mask_v6(self.src_addr, l.prefix_v6),
            RATE_NEW_V6,
            RATE_PKT_V6,
        )
    }
}

/// The VIP's limits, if it has any.
#[inline(always)]
pub(crate) fn limits(vip_index: u32) -> Option<&'static RateLimits> {
    RATE_LIMITS.get(vip_index).filter(|l| l.any())
}

/// The VIP's limits for a packet of `flow` (a new connection's, if
/// `new_connection`), reading the clock once and only if a limit applies:
/// a packet of an established flow to a VIP without a packet limit costs
/// nothing more than reading the limits.
#[inline(always)]
pub(crate) fn admit<S: Source>(
    l: &RateLimits,
    vip_index: u32,
    flow: &S,
    new_connection: bool,
) -> Result<(), Reason> {
    if l.src_pkt_rate == 0 && !new_connection {
        return Ok(());
    }
    let now = now_ns();
    admit_packet(l, vip_index, flow, now)?;
    if new_connection {
        admit_new(l, vip_index, flow, now)?;
    }
    Ok(())
}

/// The per-packet limit of the flow's source, if the VIP has one.
#[inline(always)]
fn admit_packet<S: Source>(
    l: &RateLimits,
    vip_index: u32,
    flow: &S,
    now: u64,
) -> Result<(), Reason> {
    if l.src_pkt_rate == 0 {
        return Ok(());
    }
    let (addr, _, kind) = flow.source(l);
    take_source(vip_index, kind, addr, now, l.src_pkt_rate, l.src_pkt_burst)
}

/// The new-connection limits (the VIP's ceiling, then the source's) for
/// a new connection of `flow`.
#[inline(always)]
fn admit_new<S: Source>(l: &RateLimits, vip_index: u32, flow: &S, now: u64) -> Result<(), Reason> {
    if l.vip_new_rate != 0
        && let Some(b) = RATE_VIP.get_ptr_mut(vip_index)
        // SAFETY: an array value; racing CPUs may both take a token (see
        // lb_common::ratelimit).
        && !unsafe { (*b).take(now, l.vip_new_rate, l.vip_new_burst) }
    {
        return Err(refused(vip_index));
    }
    if l.src_new_rate == 0 {
        return Ok(());
    }
    let (addr, kind, _) = flow.source(l);
    take_source(vip_index, kind, addr, now, l.src_new_rate, l.src_new_burst)
}

/// Same as [`admit_new`] for a VIP that may have no limits.
#[inline(always)]
pub(crate) fn admit_new_flow<S: Source>(vip_index: u32, flow: &S) -> Result<(), Reason> {
    match limits(vip_index) {
        Some(l) if l.src_new_rate | l.vip_new_rate != 0 => admit_new(l, vip_index, flow, now_ns()),
        _ => Ok(()),
    }
}

/// Per-CPU room for the key and a new bucket: map helpers take pointers
/// to map values as keys and values, and the stack (512 bytes for the
/// whole call chain, most of it the fast path's and NAT's) keeps none.
#[repr(C)]
#[derive(Clone, Copy)]
struct RateScratch {
    key: RateKey,
    bucket: Bucket,
}

#[map]
static RATE_SCRATCH: PerCpuArray<RateScratch> = PerCpuArray::with_max_entries(1, 0);

// The key and bucket by reference to the scratch element: by value they
// would be copied to the stack.
#[expect(
    clippy::needless_borrows_for_generic_args,
    reason = "by value costs stack (see above)"
)]
#[inline(always)]
fn take_source(
    vip_index: u32,
    kind: u32,
    addr: [u32; 4],
    now: u64,
    rate: u32,
    burst: u32,
) -> Result<(), Reason> {
    // No scratch (cannot happen): admitted, the limit is best effort.
    let Some(s) = RATE_SCRATCH.get_ptr_mut(0) else {
        return Ok(());
    };
    // SAFETY: this CPU's element, valid for the program's run; written
    // field by field (a struct store would become a memcpy call).
    let admitted = unsafe {
        let key = &raw mut (*s).key;
        (*key).vip_index = vip_index;
        (*key).kind = kind;
        for (i, w) in addr.iter().enumerate() {
            (*key).addr[i] = *w;
        }
        match RATE_SOURCES.get_ptr_mut(&*key) {
            // The map value stays valid for the program's run; racing
            // CPUs may both take a token.
            Some(b) => (*b).take(now, rate, burst),
            None => {
                let b = &raw mut (*s).bucket;
                (*b).last_ns = 0;
                (*b).tokens = 0;
                (*b).passed = 0;
                (*b).dropped = 0;
                let admitted = (*b).take(now, rate, burst);
                // A full table evicts the least recently used bucket; a
                // failed insert admits (the limit is best effort, never a
                // reason to refuse what it cannot count).
                let _ = RATE_SOURCES.insert(&*key, &*b, 0);
                admitted
            }
        }
    };
    if admitted {
        Ok(())
    } else {
        Err(refused(vip_index))
    }
}

/// Counts a refusal for the VIP; the reason is counted by the caller.
#[inline(always)]
fn refused(vip_index: u32) -> Reason {
    if let Some(s) = VIP_STATS.get_ptr_mut(vip_index) {
        // SAFETY: per-CPU slot.
        unsafe { (*s).rate_limited += 1 };
    }
    Reason::DropRateLimited
}

#[inline(always)]
fn now_ns() -> u64 {
    // SAFETY: no preconditions.
    unsafe { bpf_ktime_get_ns() }
}
