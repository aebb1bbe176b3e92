//! The reference XDP forwarder end to end: the least an XDP load
//! balancer does per packet (`lb_ref_fwd` of the test programs: parse,
//! one VIP, a backend by a fixed hash of the 5-tuple, MACs rewritten,
//! `XDP_TX`), on lb's topology with lb's generator and sink, so that lb's
//! LB-side CPU per frame can be put against it.
//!
//! Issue target: lb's LB CPU per frame ≤ 1.2× the reference's.

use anyhow::{Result, anyhow};
use aya::programs::XdpMode;
use lb_common::IPPROTO_UDP;
use lb_tests::{
    netns::Topology,
    testprogs::{REF_FWD, TestProgs},
};

use super::{Fwd, GenKind, System, UDP_PORT, UdpResult, UdpSample};
use crate::report::{Better, Row, Target, TargetOn};

/// lb's LB CPU per frame ≤ this × the reference forwarder's.
const CPU_VS_REFERENCE: f64 = 1.2;

pub(super) const HOW: &str = "`lb_ref_fwd` (test programs) alone on the LB's veth, native \
    XDP: parse Ethernet, IPv4 and the ports, match the UDP VIP, pick one of the 3 backends by a \
    fixed multiplicative hash of the 5-tuple, rewrite both MACs, XDP_TX; no state, no counters, \
    no health";

/// Loads the test programs in the LB's namespace, points `lb_ref_fwd` at
/// the UDP VIP and the backends' MACs, and attaches it to the LB's veth;
/// detached when the returned value is dropped.
pub(super) fn start(t: &Topology) -> Result<TestProgs> {
    let vip = t.vip();
    let lb_mac = t.lb_mac();
    let macs: Vec<[u8; 6]> = (0..t.backend_count()).map(|i| t.backend_mac(i)).collect();
    let iface = t.lb_iface();
    t.lb_ns().run(move || -> Result<TestProgs> {
        let mut progs = TestProgs::load()?;
        progs.set_ref_forward(vip, UDP_PORT, IPPROTO_UDP, lb_mac, &macs)?;
        progs.attach(REF_FWD, &iface, XdpMode::Driver)?;
        Ok(progs)
    })?
}

/// The headline row: lb's LB CPU per frame against the reference's, with
/// the target.
pub(super) fn rows(udp: &[UdpResult]) -> Result<Vec<Row>> {
    let find = |sys: System| {
        udp.iter()
            .find(|r| r.sys == sys && r.kind == GenKind::Live)
            .ok_or_else(|| anyhow!("no UDP result for {}", sys.label()))
    };
    let (lb, reference) = (find(System::Lb(Fwd::DsrL2))?, find(System::RefXdp)?);
    let cpu = |r: &UdpResult| r.stats(|s: &UdpSample| s.cpu_per_m);
    let busy = |r: &UdpResult| r.stats(|s: &UdpSample| s.busy).median;
    Ok(vec![
        Row::new(
            "UDP LB CPU per Mpkt, lb vs the reference XDP forwarder",
            "CPU-s/Mpkt",
            cpu(lb),
        )
        .ratio(&cpu(reference))
        .note(format!(
            "CPU time of the LB's receive path per million forwarded frames, one UDP flow, \
             same generator and sink; ratio = lb / reference; receive path busy: lb {:.0}%, \
             reference {:.0}%{}",
            busy(lb) * 100.0,
            busy(reference) * 100.0,
            if lb.saturated() && reference.saturated() {
                ""
            } else {
                " (generator-bound: the per-poll cost both share weighs more than at saturation)"
            }
        ))
        .target(Target {
            text: format!("lb ≤ {CPU_VS_REFERENCE}× the reference"),
            limit: CPU_VS_REFERENCE,
            on: TargetOn::Ratio,
            better: Better::Lower,
        }),
    ])
}
