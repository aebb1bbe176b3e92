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
    parse::{ethernet, ptr_at, read_macs, write_macs},
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
        return strip_untagged(ctx, fast.inner, fast.ether_type, fast.kind);
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

    // Keep the L2 header: copy it out, move the frame's start to the
    // inner header minus the L2 length, and write it back there.
    let frame = eth.hdr as *const u8;
    // SAFETY: the 14-byte Ethernet header was bounds checked by ethernet().
    let (dst, src) = unsafe { read_macs(frame) };
    let vlan = eth.l3 != EthHdr::LEN;
    let tag: u32 = if vlan {
        // The tag protocol identifier (802.1Q or 802.1ad) and the tag.
        // SAFETY: ethernet() checked the 18 bytes up to the EtherType after
        // the tag when it found one.
        unsafe { (frame.add(12) as *const u32).read_unaligned() }
    } else {
        0
    };
    let strip = (tunnel.inner - eth.l3) as i32;
    // SAFETY: ctx.ctx is the program's xdp_md; the helper checks the delta.
    if unsafe { bpf_xdp_adjust_head(ctx.ctx, strip) } != 0 {
        return Err(DecapReason::DropMalformed);
    }
    if vlan {
        let hdr: *mut [u8; EthHdr::LEN + 4] = ptr_at(ctx, 0).ok_or(DecapReason::DropMalformed)?;
        let hdr = hdr as *mut u8;
        // SAFETY: 18 bytes bounds checked by ptr_at (the old outer header
        // bytes, now in front of the inner header).
        unsafe {
            write_macs(hdr, dst, src);
            (hdr.add(12) as *mut u32).write_unaligned(tag);
            (hdr.add(16) as *mut u16).write_unaligned(ether_type.to_be());
        }
    } else {
        let hdr: *mut [u8; EthHdr::LEN] = ptr_at(ctx, 0).ok_or(DecapReason::DropMalformed)?;
        let hdr = hdr as *mut u8;
        // SAFETY: 14 bytes bounds checked by ptr_at.
        unsafe {
            write_macs(hdr, dst, src);
            (hdr.add(12) as *mut u16).write_unaligned(ether_type.to_be());
        }
    }
    Ok(decapsulated(tunnel.kind))
}

/// The counter of a stripped `kind`.
#[inline(always)]
fn decapsulated(kind: TunnelKind) -> DecapReason {
    match kind {
        TunnelKind::Ipip => DecapReason::DecapIpip,
        TunnelKind::Gue => DecapReason::DecapGue,
    }
}

/// Strips everything between an untagged Ethernet header and the inner
/// header at `inner`, keeping the MAC addresses: two loads before the
/// move, three stores after it.
#[inline(always)]
fn strip_untagged(
    ctx: &XdpContext,
    inner: usize,
    ether_type: u16,
    kind: TunnelKind,
) -> Result<DecapReason, DecapReason> {
    // Checked again: the verifier forgets fast_v4's check across the
    // trie lookup.
    let frame: *const [u8; EthHdr::LEN] = ptr_at(ctx, 0).ok_or(DecapReason::DropMalformed)?;
    // SAFETY: 14 bytes bounds checked by ptr_at; packet loads and stores
    // need no alignment in BPF (read_unaligned and write_unaligned compile
    // to byte loads and stores).
    let (macs, tail) = unsafe {
        (
            (frame as *const u64).read(),
            (frame as *const u32).add(2).read(),
        )
    };
    let strip = (inner - EthHdr::LEN) as i32;
    // SAFETY: ctx.ctx is the program's xdp_md; the helper checks the delta.
    if unsafe { bpf_xdp_adjust_head(ctx.ctx, strip) } != 0 {
        return Err(DecapReason::DropMalformed);
    }
    let hdr: *mut [u8; EthHdr::LEN] = ptr_at(ctx, 0).ok_or(DecapReason::DropMalformed)?;
    let hdr = hdr as *mut u8;
    // SAFETY: 14 bytes bounds checked by ptr_at; see above on alignment.
    unsafe {
        (hdr as *mut u64).write(macs);
        (hdr.add(8) as *mut u32).write(tail);
        (hdr.add(12) as *mut u16).write(ether_type.to_be());
    }
    Ok(decapsulated(kind))
}

#[cfg(not(test))]
#[panic_handler]
fn panic(_info: &core::panic::PanicInfo) -> ! {
    loop {}
}
