//! XDP programs for lb's tests and benchmarks, kept out of the production
//! object (lb-ebpf holds only the balancer). Loaded by
//! `lb_tests::testprogs`.
#![no_std]
#![no_main]

use aya_ebpf::{
    bindings::xdp_action::{XDP_ABORTED, XDP_DROP, XDP_PASS, XDP_TX},
    helpers::generated::bpf_xdp_adjust_head,
    macros::{map, xdp},
    maps::{Array, PerCpuArray, ProgramArray},
    programs::XdpContext,
};
use lb_common::{
    IPPROTO_TCP, IPPROTO_UDP,
    decap::{IPPROTO_IPIP, IPPROTO_IPV6},
};
use lb_ebpf::parse::{
    ETH_P_IP, ETH_P_IPV6, IPV6_HDR_LEN, ethernet, ipv4, ipv4_header_len, ipv6, l4_ports, ptr_at,
    read_macs, write_macs,
};

/// The per-packet floor for benchmarks: parse Ethernet, IPv4 and TCP with
/// the balancer's helpers and bounds checks, swap MACs, `XDP_TX`.
#[xdp]
pub fn lb_floor(ctx: XdpContext) -> u32 {
    floor(&ctx).unwrap_or(XDP_PASS)
}

#[inline(always)]
fn floor(ctx: &XdpContext) -> Option<u32> {
    let eth = ethernet(ctx)?;
    if eth.ether_type != ETH_P_IP {
        return None;
    }
    let ip = ipv4(ctx, eth.l3)?;
    if ip.proto != IPPROTO_TCP {
        return None;
    }
    let _ports = l4_ports(ctx, eth.l3 + ipv4_header_len(ip))?;
    let frame = eth.hdr as *mut u8;
    // SAFETY: the 14-byte Ethernet header was bounds checked by ethernet().
    unsafe {
        let (dst, src) = read_macs(frame);
        write_macs(frame, src, dst);
    }
    Some(XDP_TX)
}

/// The end-to-end benchmark's frame template: the headers to stamp on
/// every frame (Ethernet + IPv4 + UDP is 42 bytes, Ethernet + IPv6 + UDP
/// 62) and how many bytes of them to write.
#[repr(C)]
#[derive(Clone, Copy)]
pub struct GenTemplate {
    /// 0: unset (frames go out as they are); 48 or 64: the first 6 or 8
    /// words of `head` are written. Two fixed sizes keep every store
    /// bounds-checked by a constant (the verifier refuses a variable
    /// length) and an IPv4 flood's short frames valid.
    len: u64,
    head: [u64; GEN_TEMPLATE_WORDS],
}

#[map]
static GEN_TEMPLATE: Array<GenTemplate> = Array::with_max_entries(1, 0);

const GEN_TEMPLATE_WORDS: usize = 8;

/// The traffic generator of the end-to-end benchmark (BPF_PROG_TEST_RUN
/// with live frames): rewrites the first 48 (IPv4) or 64 (IPv6) bytes of
/// every frame from GEN_TEMPLATE, when set, and returns `XDP_TX`. Live
/// frames reuse pages without resetting them, and a system that modifies
/// a frame in place (NAT, TTL, MACs, a pushed tunnel header) would
/// otherwise get its own output back.
#[xdp]
pub fn lb_gen_tx(ctx: XdpContext) -> u32 {
    if let Some(t) = GEN_TEMPLATE.get(0) {
        match t.len {
            48 => stamp::<6>(&ctx, &t.head),
            64 => stamp::<8>(&ctx, &t.head),
            _ => {}
        }
    }
    XDP_TX
}

/// Writes the first `N` words of `head` over the frame's start, if the
/// frame is that long.
#[inline(always)]
fn stamp<const N: usize>(ctx: &XdpContext, head: &[u64; GEN_TEMPLATE_WORDS]) {
    let Some(frame) = ptr_at::<[u64; N]>(ctx, 0) else {
        return;
    };
    let frame = frame as *mut u64;
    // SAFETY: N words bounds checked by ptr_at. Word stores, as in
    // lb_restore: an array copy would become a byte-wise memmove.
    unsafe {
        for (i, w) in head.iter().take(N).enumerate() {
            frame.add(i).write_unaligned(*w);
        }
    }
}

/// Only returns `XDP_PASS`: the fixed cost of one BPF_PROG_TEST_RUN call,
/// and the program on a veth peer that must run NAPI to receive frames
/// sent by XDP.
#[xdp]
pub fn lb_return(_ctx: XdpContext) -> u32 {
    XDP_PASS
}

/// `lb_restore`'s frame: its length and its first [`RESTORE_WORDS`]
/// words, as the benchmark set them.
#[repr(C)]
#[derive(Clone, Copy)]
pub struct RestoreFrame {
    len: u64,
    head: [u64; RESTORE_WORDS],
}

/// Bytes of the frame's start `lb_restore` rewrites: every byte a header
/// push or strip of a tunnel mode touches in the original frame (an outer
/// Ethernet + IPv6 + UDP header is 62 bytes).
const RESTORE_WORDS: usize = 8;

#[map]
static RESTORE_FRAME: Array<RestoreFrame> = Array::with_max_entries(1, 0);

/// When not 0, `lb_restore` gives every frame a fresh source: the value
/// `n` here (then `n + 1`) is stamped as the low 16 bits of the IPv4
/// source address (`n >> 16`) and as the L4 source port (`n`), so that
/// `repeat` can time a stream of new flows (the frame must be IPv4
/// without options, TCP or UDP; the IPv4 checksum is left as it was).
#[map]
static RESTORE_FRESH: Array<u64> = Array::with_max_entries(1, 0);

/// Offsets of the IPv4 source address's low 16 bits and of the L4 source
/// port in an Ethernet + IPv4 (no options) frame.
const FRESH_ADDR_LOW: usize = 14 + 14;
const FRESH_PORT: usize = 14 + 20;

/// The program `lb_restore` hands each restored frame to (index 0).
#[map]
static RESTORE_TARGET: ProgramArray = ProgramArray::with_max_entries(1, 0);

/// Times, with BPF_PROG_TEST_RUN's `repeat`, a program that changes the
/// frame's length (a pushed or stripped tunnel header): `repeat` hands
/// every iteration the previous one's output, so this program first puts
/// the frame back as RESTORE_FRAME holds it (moves its start so that it
/// has the original length, rewrites its first 64 bytes), then tail-calls
/// RESTORE_TARGET. The same with `lb_return` as the target is the
/// harness's own cost, subtracted by the benchmark. With RESTORE_FRESH
/// set, every iteration also gets a source of its own (a new flow).
/// `XDP_ABORTED` if it cannot (unset frame, failed move or tail call).
#[xdp]
pub fn lb_restore(ctx: XdpContext) -> u32 {
    let Some(want) = RESTORE_FRAME.get(0) else {
        return XDP_ABORTED;
    };
    let len = (ctx.data_end() - ctx.data()) as i64;
    // Bounded (frames are shorter than a page): the verifier refuses
    // packet-pointer arithmetic with an unbounded value.
    let delta = len - (want.len & 0xffff) as i64;
    // Also when the length is right (delta 0): the harness then costs the
    // same whatever the target does to the frame.
    // SAFETY: ctx.ctx is the program's xdp_md; the helper checks the delta.
    if unsafe { bpf_xdp_adjust_head(ctx.ctx, delta as i32) } != 0 {
        return XDP_ABORTED;
    }
    let Some(frame) = ptr_at::<[u64; RESTORE_WORDS]>(&ctx, 0) else {
        return XDP_ABORTED;
    };
    let frame = frame as *mut u64;
    // SAFETY: 64 bytes bounds checked by ptr_at; the target is a loaded
    // XDP program or nothing (then the call returns and we abort). Word
    // stores: a copy of the array would become a call to a byte-wise
    // memmove, slow and noisy; BPF does not fault on unaligned stores.
    unsafe {
        for (i, w) in want.head.iter().enumerate() {
            frame.add(i).write(*w);
        }
        if let Some(next) = RESTORE_FRESH.get_ptr_mut(0) {
            let n = *next;
            if n != 0 {
                *next = n + 1;
                let bytes = frame as *mut u8;
                // Within the 64 bytes checked above.
                (bytes.add(FRESH_ADDR_LOW) as *mut u16).write_unaligned(((n >> 16) as u16).to_be());
                (bytes.add(FRESH_PORT) as *mut u16).write_unaligned((n as u16).to_be());
            }
        }
        RESTORE_TARGET.tail_call(&ctx, 0);
    }
    XDP_ABORTED
}

/// The UDP destination ports `lb_sink` counts, network order: the flood's
/// and the GUE port (a GUE-encapsulated flood).
#[map]
static SINK_PORTS: Array<[u16; 2]> = Array::with_max_entries(1, 0);

/// Frames `lb_sink` counted and dropped.
#[map]
static SINK_COUNT: PerCpuArray<u64> = PerCpuArray::with_max_entries(1, 0);

/// The end-to-end benchmark's counter-and-drop at the first hop after the
/// load balancer: IPv4 or IPv6 frames of the flood (UDP to one of
/// SINK_PORTS) or carrying it in an IP-in-IP tunnel (protocol 4 or 41)
/// are counted and dropped, whatever their addresses; everything else
/// (ARP, ND, health checks, TCP) passes.
#[xdp]
pub fn lb_sink(ctx: XdpContext) -> u32 {
    if !is_flood(&ctx) {
        return XDP_PASS;
    }
    if let Some(c) = SINK_COUNT.get_ptr_mut(0) {
        // SAFETY: per-CPU slot, no concurrent writer on this CPU.
        unsafe { *c += 1 };
    }
    XDP_DROP
}

#[inline(always)]
fn is_flood(ctx: &XdpContext) -> bool {
    let (Some(eth), Some(ports)) = (ethernet(ctx), SINK_PORTS.get(0)) else {
        return false;
    };
    let (proto, l4) = match eth.ether_type {
        ETH_P_IP => match ipv4(ctx, eth.l3) {
            Some(ip) => (ip.proto, eth.l3 + ipv4_header_len(ip)),
            None => return false,
        },
        ETH_P_IPV6 => match ipv6(ctx, eth.l3) {
            Some(ip) => (ip.next_header, eth.l3 + IPV6_HDR_LEN),
            None => return false,
        },
        _ => return false,
    };
    match proto {
        IPPROTO_IPIP | IPPROTO_IPV6 => true,
        IPPROTO_UDP => l4_ports(ctx, l4).is_some_and(|p| p[1] == ports[0] || p[1] == ports[1]),
        _ => false,
    }
}

/// The reference forwarder's configuration: one VIP (wire order) and up
/// to [`REF_MAX_BACKENDS`] next hops by MAC.
#[repr(C)]
#[derive(Clone, Copy)]
pub struct RefForward {
    vip: u32,
    port: u16,
    proto: u8,
    /// Backends in `dst_macs` (0: pass everything).
    count: u8,
    src_mac: [u8; 6],
    _pad: [u8; 2],
    dst_macs: [[u8; 6]; REF_MAX_BACKENDS],
}

const REF_MAX_BACKENDS: usize = 4;

#[map]
static REF_FORWARD: Array<RefForward> = Array::with_max_entries(1, 0);

/// The end-to-end benchmark's reference: the least an XDP load balancer
/// does for a packet to its VIP, and nothing more: parse Ethernet, IPv4
/// (honouring IHL) and the TCP/UDP ports, match one VIP, pick a backend
/// by a fixed hash of the 5-tuple (no state, no counters, no health, no
/// consistent ring), rewrite both MACs and send it back out (`XDP_TX`,
/// what lb does when the backend is behind the ingress interface).
/// Everything else passes.
#[xdp]
pub fn lb_ref_fwd(ctx: XdpContext) -> u32 {
    ref_fwd(&ctx).unwrap_or(XDP_PASS)
}

#[inline(always)]
fn ref_fwd(ctx: &XdpContext) -> Option<u32> {
    let cfg = REF_FORWARD.get(0)?;
    let eth = ethernet(ctx)?;
    if eth.ether_type != ETH_P_IP {
        return None;
    }
    let ip = ipv4(ctx, eth.l3)?;
    let dst = u32::from_ne_bytes(ip.dst_addr);
    if dst != cfg.vip || ip.proto != cfg.proto {
        return None;
    }
    let [src_port, dst_port] = l4_ports(ctx, eth.l3 + ipv4_header_len(ip))?;
    if dst_port != cfg.port {
        return None;
    }
    let src = u32::from_ne_bytes(ip.src_addr);
    let h = (src ^ dst ^ ((src_port as u32) << 16 | dst_port as u32)).wrapping_mul(0x9E37_79B1);
    let i = ((h as u64 * cfg.count as u64) >> 32) as usize;
    let dst_mac = *cfg.dst_macs.get(i)?;
    // SAFETY: the 14-byte Ethernet header was bounds checked by ethernet().
    unsafe { write_macs(eth.hdr as *mut u8, dst_mac, cfg.src_mac) };
    Some(XDP_TX)
}

#[cfg(not(test))]
#[panic_handler]
fn panic(_info: &core::panic::PanicInfo) -> ! {
    loop {}
}
