//! `lb explain` for a NAT VIP: the backend address:port a flow goes to
//! and, when the kernel has recorded the flow, its SNAT address:port and
//! reverse entry; otherwise the SNAT address the first packet would take
//! (the port is allocated by that packet).

use std::net::{IpAddr, Ipv4Addr, SocketAddr};

use lb_common::{
    Backend,
    nat::{NatFwd, NatRev, snat_index},
};

use super::{core::Core, requests::FlowKeyOf};
use crate::{
    config::VipConfig,
    control::{NatReverseView, NatView},
    datapath::{backend_address, backend_encap_source},
    reconcile::KernelMaps,
};

/// An address of a NAT entry (wire words; IPv4 in word 0).
fn addr(words: [u32; 4], v6: bool) -> IpAddr {
    if v6 {
        IpAddr::V6(lb_common::addr6_of_words(words))
    } else {
        IpAddr::V4(Ipv4Addr::from(u32::from_be(words[0])))
    }
}

fn sock(words: [u32; 4], port_be: u16, v6: bool) -> SocketAddr {
    SocketAddr::new(addr(words, v6), u16::from_be(port_be))
}

impl<M: KernelMaps> Core<M> {
    /// The NAT part of `lb explain` for the flow `key` (flow hash `hash`)
    /// of NAT VIP `vip`, `entry` being the backend a new flow would get.
    /// Also returns the backend an established NAT flow goes to.
    pub(super) fn explain_nat(
        &self,
        vip: &VipConfig,
        key: &FlowKeyOf,
        hash: u32,
        entry: Option<&Backend>,
    ) -> anyhow::Result<(NatView, Option<IpAddr>)> {
        let read = |e| anyhow::anyhow!("reading the NAT maps: {e}");
        let (v6, pair): (bool, Option<(NatFwd, Option<NatRev>)>) = match key {
            FlowKeyOf::V4(k) => (
                false,
                self.maps
                    .nat_pair(k)
                    .map_err(read)?
                    .map(|(f, r)| (f, r.map(|r| r.1))),
            ),
            FlowKeyOf::V6(k) => (
                true,
                self.maps
                    .nat_pair6(k)
                    .map_err(read)?
                    .map(|(f, r)| (f, r.map(|r| r.1))),
            ),
        };
        if let Some((f, rev)) = pair {
            let backend = sock(f.backend_addr, f.backend_port, v6);
            let snat = sock(f.snat_addr, f.snat_port, v6);
            let reverse = rev.map(|r| NatReverseView {
                from: backend,
                to: snat,
                vip: sock(r.vip_addr, r.vip_port, v6),
                client: sock(r.client_addr, r.client_port, v6),
                ifindex: r.ifindex,
            });
            let view = NatView {
                backend: Some(backend),
                snat: Some(snat),
                snat_address: Some(snat.ip()),
                reverse,
            };
            return Ok((view, Some(backend.ip())));
        }
        // No flow yet: what its first packet gets, by the kernel's rules.
        let backend = entry.map(|b| {
            let port = match u16::from_be(b.port) {
                0 => vip.port,
                p => p,
            };
            SocketAddr::new(backend_address(b), port)
        });
        let snat_address = match vip.snat_addresses.len() as u32 {
            0 => entry.and_then(backend_encap_source),
            n => Some(vip.snat_addresses[snat_index(hash, n) as usize]),
        };
        let view = NatView {
            backend,
            snat: None,
            snat_address,
            reverse: None,
        };
        Ok((view, None))
    }
}
