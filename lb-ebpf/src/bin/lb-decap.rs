//! `lb_decap`: the backends' side of lb's encapsulating forwarding modes.
//!
//! Strips IP-in-IP (4in4, 6in4, 6in6, 4in6) and GUE (variant 1) headers
//! from tunnel packets whose outer source is on an allow-list, keeps the
//! Ethernet header (and one VLAN tag), sets the inner EtherType and passes
//! the client's packet up, so the backend's stack answers the client
//! directly. A tunnel packet from any other source is dropped: a tunnel
//! must not be an open relay into the host. Everything that is not a
//! tunnel packet passes untouched.
//!
//! Its own object, so that loading it on a backend creates none of the
//! balancer's maps; `lb decap attach` pins these maps per interface.
#![no_std]
#![no_main]

use aya_ebpf::{
    bindings::xdp_action::{XDP_DROP, XDP_PASS},
    helpers::generated::bpf_xdp_adjust_head,
    macros::{map, xdp},
    maps::{Array, LpmTrie, PerCpuArray, lpm_trie::Key},
    programs::XdpContext,
};
use lb_common::decap::{DecapConfig, DecapReason, INLINE_PREFIXES, MAX_ALLOW_PREFIXES};
use lb_ebpf::{
    parse::{ethernet, ptr_at},
    tunnel::{OuterSource, TunnelKind, fast_v4, inner, outer},
};
use network_types::eth::EthHdr;

/// Allowed outer IPv4 sources (the load balancers), longest prefix match:
/// the whole list, looked up only when it is longer than the inline copy
/// in DECAP_CONFIG can hold.
#[map]
static DECAP_ALLOW_V4: LpmTrie<[u8; 4], u32> = LpmTrie::pinned(MAX_ALLOW_PREFIXES, 0);

/// Allowed outer IPv6 sources.
#[map]
static DECAP_ALLOW_V6: LpmTrie<[u8; 16], u32> = LpmTrie::pinned(MAX_ALLOW_PREFIXES, 0);

/// One element: the GUE port (0: GUE off until `lb decap` sets it) and
/// the inline allow-lists.
#[map]
static DECAP_CONFIG: Array<DecapConfig> = Array::pinned(1, 0);

#[map]
static DECAP_STATS: PerCpuArray<u64> = PerCpuArray::pinned(DecapReason::COUNT, 0);

#[xdp]
pub fn lb_decap(ctx: XdpContext) -> u32 {
    let reason = match decap(&ctx) {
        Ok(r) | Err(r) => r,
    };
    if let Some(c) = DECAP_STATS.get_ptr_mut(reason as u32) {
        // SAFETY: per-CPU slot, no concurrent writer on this CPU.
        unsafe { *c += 1 };
    }
    if reason.is_drop() { XDP_DROP } else { XDP_PASS }
}

/// Any allowed prefix holds `source`: the inline entries of `cfg` when
/// its list is short (a bounded, unrolled mask-and-compare), else the
/// trie. An allow/deny decision needs any match, not the longest.
#[inline(always)]
fn allowed(cfg: &DecapConfig, source: &OuterSource) -> bool {
    match *source {
        OuterSource::V4(a) => {
            let n = cfg.v4_count as usize;
            if n > INLINE_PREFIXES {
                return DECAP_ALLOW_V4.get(Key::new(32, a.to_ne_bytes())).is_some();
            }
            for (i, p) in cfg.v4.iter().enumerate() {
                if i >= n {
                    return false;
                }
                if a & p.mask == p.addr {
                    return true;
                }
            }
            false
        }
        OuterSource::V6(a) => {
            let n = cfg.v6_count as usize;
            if n > INLINE_PREFIXES {
                // SAFETY: [u64; 2] and [u8; 16] have the same size; the
                // words hold the address's bytes in wire order.
                let bytes: [u8; 16] = unsafe { core::mem::transmute(a) };
                return DECAP_ALLOW_V6.get(Key::new(128, bytes)).is_some();
            }
            for (i, p) in cfg.v6.iter().enumerate() {
                if i >= n {
                    return false;
                }
                if a[0] & p.mask[0] == p.addr[0] && a[1] & p.mask[1] == p.addr[1] {
                    return true;
                }
            }
            false
        }
    }
}

/// `Ok` names what was stripped; `Err` why the frame passes untouched or
/// is dropped.
#[inline(always)]
fn decap(ctx: &XdpContext) -> Result<DecapReason, DecapReason> {
    // An array's only element: never absent once loaded.
    let cfg = DECAP_CONFIG.get(0).ok_or(DecapReason::PassNotTunnel)?;
    if let Some(fast) = fast_v4(ctx, cfg.gue_port)
        && allowed(cfg, &OuterSource::V4(fast.source))
    {
        return strip(ctx, EthHdr::LEN, fast.inner, fast.ether_type, fast.kind);
    }
    let eth = ethernet(ctx).ok_or(DecapReason::PassNotTunnel)?;
    let tunnel = outer(ctx, &eth, cfg.gue_port)?;
    if !allowed(cfg, &tunnel.source) {
        return Err(DecapReason::DropNotAllowed);
    }
    if let Some(problem) = tunnel.problem {
        return Err(problem);
    }
    let ether_type = inner(ctx, &tunnel)?;

    strip(ctx, eth.l3, tunnel.inner, ether_type, tunnel.kind)
}

/// The counter of a stripped `kind`.
#[inline(always)]
fn decapsulated(kind: TunnelKind) -> DecapReason {
    match kind {
        TunnelKind::Ipip => DecapReason::DecapIpip,
        TunnelKind::Gue => DecapReason::DecapGue,
    }
}

/// The frame's start with `N` bytes bounds checked, from volatile loads
/// of the context: LLVM would otherwise reuse an earlier comparison of
/// the same addresses (dropping this one), which the verifier, having
/// forgotten it across the trie lookup, then refuses.
#[inline(always)]
fn fresh_start<const N: usize>(ctx: &XdpContext) -> Option<*const [u8; N]> {
    // SAFETY: ctx.ctx is the program's xdp_md.
    let (start, end) = unsafe {
        (
            core::ptr::read_volatile(&(*ctx.ctx).data) as usize,
            core::ptr::read_volatile(&(*ctx.ctx).data_end) as usize,
        )
    };
    if start + N > end {
        return None;
    }
    Some(start as *const [u8; N])
}

/// Strips everything between the L2 header (`l2` bytes: 14, or 18 with
/// one VLAN tag, 802.1Q or 802.1ad, kept as it was) and the inner header
/// at `inner`: copies the L2 header out (two or three word loads), moves
/// the frame's start to the inner header minus the L2 length, and writes
/// it back there with the inner EtherType (three or four stores).
#[inline(always)]
fn strip(
    ctx: &XdpContext,
    l2: usize,
    inner: usize,
    ether_type: u16,
    kind: TunnelKind,
) -> Result<DecapReason, DecapReason> {
    const MAX_L2: usize = EthHdr::LEN + 4;
    // One check for both layouts: a tunnel packet is longer than any L2
    // header and an inner IPv4 header. Checked again here: the verifier
    // forgets the parsers' checks across the trie lookup.
    let frame = fresh_start::<MAX_L2>(ctx).ok_or(DecapReason::DropMalformed)?;
    // SAFETY: 18 bytes bounds checked by ptr_at; packet loads and stores
    // need no alignment in BPF (read_unaligned and write_unaligned compile
    // to byte loads and stores). The MACs; then the tag protocol
    // identifier and the tag, if any.
    let (macs, tail, tag) = unsafe {
        let w = frame as *const u32;
        (
            (frame as *const u64).read(),
            w.add(2).read(),
            w.add(3).read(),
        )
    };
    // SAFETY: ctx.ctx is the program's xdp_md; the helper checks the delta.
    if unsafe { bpf_xdp_adjust_head(ctx.ctx, (inner - l2) as i32) } != 0 {
        return Err(DecapReason::DropMalformed);
    }
    let hdr: *mut [u8; MAX_L2] = ptr_at(ctx, 0).ok_or(DecapReason::DropMalformed)?;
    let hdr = hdr as *mut u8;
    // SAFETY: 18 bytes bounds checked by ptr_at (the old outer header
    // bytes, now in front of the inner header); see above on alignment.
    unsafe {
        (hdr as *mut u64).write(macs);
        (hdr.add(8) as *mut u32).write(tail);
        if l2 == EthHdr::LEN {
            (hdr.add(12) as *mut u16).write(ether_type.to_be());
        } else {
            (hdr.add(12) as *mut u32).write(tag);
            (hdr.add(16) as *mut u16).write(ether_type.to_be());
        }
    }
    Ok(decapsulated(kind))
}

#[cfg(not(test))]
#[panic_handler]
fn panic(_info: &core::panic::PanicInfo) -> ! {
    loop {}
}
