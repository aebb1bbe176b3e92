//! XDP programs for lb's tests and benchmarks, kept out of the production
//! object (lb-ebpf holds only the balancer). Loaded by
//! `lb_tests::testprogs`.
#![no_std]
#![no_main]

use aya_ebpf::{
    bindings::xdp_action::{XDP_PASS, XDP_TX},
    macros::{map, xdp},
    maps::Array,
    programs::XdpContext,
};
use lb_common::IPPROTO_TCP;
use lb_ebpf::parse::{
    ETH_P_IP, ethernet, ipv4, ipv4_header_len, l4_ports, ptr_at, read_macs, write_macs,
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

/// The end-to-end benchmark's frame template (Ethernet + IPv4 + UDP
/// headers); unset (all zero) means "send frames as they are".
#[map]
static GEN_TEMPLATE: Array<[u64; GEN_TEMPLATE_WORDS]> = Array::with_max_entries(1, 0);

const GEN_TEMPLATE_WORDS: usize = 6;

/// The traffic generator of the end-to-end benchmark (BPF_PROG_TEST_RUN
/// with live frames): rewrites the first 48 bytes of every frame from
/// GEN_TEMPLATE, when set, and returns `XDP_TX`. Live frames reuse pages
/// without resetting them, and a system that modifies a frame in place
/// (NAT, TTL, MACs) would otherwise get its own output back.
#[xdp]
pub fn lb_gen_tx(ctx: XdpContext) -> u32 {
    if let Some(t) = GEN_TEMPLATE.get(0)
        && t[1] != 0
        && let Some(frame) = ptr_at::<[u64; GEN_TEMPLATE_WORDS]>(&ctx, 0)
    {
        // SAFETY: 48 bytes bounds checked by ptr_at.
        unsafe { frame.write_unaligned(*t) };
    }
    XDP_TX
}

/// Only returns `XDP_PASS`: the fixed cost of one BPF_PROG_TEST_RUN call,
/// and the program on a veth peer that must run NAPI to receive frames
/// sent by XDP.
#[xdp]
pub fn lb_return(_ctx: XdpContext) -> u32 {
    XDP_PASS
}

#[cfg(not(test))]
#[panic_handler]
fn panic(_info: &core::panic::PanicInfo) -> ! {
    loop {}
}
