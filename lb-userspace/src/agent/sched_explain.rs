//! What a VIP's scheduler decides from, for `lb explain` and `lb backend
//! list`: the rotation of a round-robin VIP, the counts a
//! least-connections VIP compares (read from the kernel's words, so the
//! figures are the ones the next new flow meets).

use std::collections::BTreeMap;

use lb_common::sched::lc_less;

use super::core::Core;
use crate::{
    config::VipConfig, datapath::backend_address, keys::VipId, reconcile::KernelMaps,
    sched::Scheduler,
};

/// A scheduler's decision for the next new flow of a VIP.
pub(super) struct Decision {
    /// The backend id it gives, when it can be told (least connections:
    /// the least loaded, the first in slot order on a tie; a rotation
    /// depends on the CPU the packet lands on).
    pub backend: Option<u32>,
    /// The state it decides from, in words.
    pub state: String,
}

impl<M: KernelMaps> Core<M> {
    /// Least-connections VIPs: backend id → the active connections the
    /// kernel compares, for the backends in the VIP's scheduler slots.
    pub(super) fn lc_counts(&self, vip: &VipConfig) -> Option<BTreeMap<u32, u64>> {
        if vip.scheduler != Scheduler::LeastConnections {
            return None;
        }
        let index = self.state.vip_index(&VipId::of(vip))?;
        let ids: Vec<u32> = self
            .image
            .sched
            .get(&index)
            .map(|s| s.slots.iter().map(|s| s.backend_id).collect())
            .unwrap_or_default();
        self.maps.lc_active(&ids).ok()
    }

    /// The decision of `vip`'s scheduler (None: Maglev, whose decision is
    /// the ring slot).
    pub(super) fn sched_decision(&self, vip: &VipConfig, index: Option<u32>) -> Option<Decision> {
        if vip.scheduler == Scheduler::Maglev {
            return None;
        }
        let sched = index.and_then(|i| self.image.sched.get(&i));
        let slots = sched.map_or(&[][..], |s| &s.slots[..s.info.len as usize]);
        let name = |id: u32| {
            self.image
                .backends
                .get(&id)
                .map_or_else(|| format!("id {id}"), |b| backend_address(b).to_string())
        };
        if slots.is_empty() {
            return Some(Decision {
                backend: None,
                state: "no usable backend: new flows are dropped".into(),
            });
        }
        Some(match vip.scheduler {
            Scheduler::LeastConnections => {
                let counts = self.lc_counts(vip).unwrap_or_default();
                let mut best: Option<(u32, u64, u32)> = None;
                let mut compared = Vec::new();
                for s in slots {
                    let n = counts.get(&s.backend_id).copied().unwrap_or(0);
                    compared.push(format!("{} {n}/{}", name(s.backend_id), s.weight));
                    if best.is_none_or(|(_, bn, bw)| lc_less(n, s.weight, bn, bw)) {
                        best = Some((s.backend_id, n, s.weight));
                    }
                }
                Decision {
                    backend: best.map(|b| b.0),
                    state: format!(
                        "active connections / weight: {} (least wins; ties go by rotation)",
                        compared.join(", ")
                    ),
                }
            }
            _ => {
                let mut order: Vec<String> = Vec::new();
                for s in slots.iter().take(12) {
                    order.push(name(s.backend_id));
                }
                if slots.len() > 12 {
                    order.push(format!("... ({} slots)", slots.len()));
                }
                Decision {
                    backend: None,
                    state: format!(
                        "rotation per CPU over {} slots: {}; the next new flow takes the slot after the one its CPU gave last",
                        slots.len(),
                        order.join(", ")
                    ),
                }
            }
        })
    }
}
