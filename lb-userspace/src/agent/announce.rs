//! VIP announcement, the pure part: which VIP addresses should have a route
//! in the announce table (`[agent.announce]`), given the VIPs' backends and
//! the operator's requests (`lb vip withdraw/announce`, `lb host
//! drain/undrain`). No I/O: the runtime (`agent::mod`) writes the routes
//! with [`crate::vip_routes`] and reports back what is installed.
//!
//! Rules:
//! - A backend is *ready* when it is usable (health up, next hop known),
//!   active (not drained) with a weight > 0, and a health check has passed
//!   since the agent started or it last went down; *pending* when it is
//!   usable only by the agent's optimistic start state (no check has
//!   passed yet, e.g. just after a restart); otherwise not ready.
//! - A VIP is as ready as its readiest backend.
//! - An address (several VIPs may share one, on other ports or protocols)
//!   is announced when the host is not drained and one of its VIPs that is
//!   not withdrawn is ready. When none is ready but one is pending, a route
//!   already installed stays (an agent restart does not withdraw and
//!   re-announce) and none is added. Otherwise it is withdrawn.
//! - So `lb vip withdraw` of a VIP whose address another ready,
//!   not-withdrawn VIP shares leaves the route: a host route cannot exclude
//!   one port. `lb vip list` says so.
//!
//! The requests live in the agent's memory, like the backend overrides:
//! an agent restart forgets them (every VIP announceable, host undrained).

use std::{
    collections::{BTreeMap, BTreeSet},
    net::IpAddr,
};

use super::state::{BackendStatus, State};
use crate::{
    config::{BackendConfig, BackendState, Config},
    keys::{BackendKey, VipId},
};

/// How far a backend (or a VIP: its readiest backend) lets its address be
/// announced. Ordered: `NotReady < Pending < Ready`.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord)]
pub enum Readiness {
    NotReady,
    /// Usable, but no health check has confirmed it yet.
    Pending,
    Ready,
}

/// A backend's readiness from its configuration and status.
pub fn backend_readiness(b: &BackendConfig, status: Option<&BackendStatus>) -> Readiness {
    match status {
        Some(s) if b.state == BackendState::Active && b.weight > 0 && s.is_usable() => {
            if s.confirmed {
                Readiness::Ready
            } else {
                Readiness::Pending
            }
        }
        _ => Readiness::NotReady,
    }
}

/// Every VIP of `cfg` with its readiness, in configuration order.
pub fn vip_readiness(cfg: &Config, state: &State) -> Vec<(VipId, Readiness)> {
    cfg.vips
        .iter()
        .map(|v| {
            let vip = VipId::of(v);
            let r = v
                .backends
                .iter()
                .map(|b| {
                    let key = BackendKey {
                        vip,
                        address: b.address,
                    };
                    backend_readiness(b, state.backend(&key))
                })
                .max()
                .unwrap_or(Readiness::NotReady);
            (vip, r)
        })
        .collect()
}

/// The operator's requests and what is installed.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Announce {
    /// `[agent.announce]` was set when the agent started.
    pub enabled: bool,
    /// VIPs taken out with `lb vip withdraw`.
    pub withdrawn: BTreeSet<VipId>,
    /// `lb host drain`: every route withdrawn.
    pub host_drained: bool,
    /// The addresses whose routes are in the table now, as the runtime
    /// last reported.
    pub installed: BTreeSet<IpAddr>,
}

/// What [`Announce::wanted`] decides for one address.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Decision {
    Announce,
    /// Keep the route if it is there, add none.
    Hold,
    Withdraw,
}

impl Announce {
    /// Per address: the readiest not-withdrawn VIP's readiness (`None`:
    /// every VIP on it is withdrawn).
    fn by_address(&self, vips: &[(VipId, Readiness)]) -> BTreeMap<IpAddr, Option<Readiness>> {
        let mut out: BTreeMap<IpAddr, Option<Readiness>> = BTreeMap::new();
        for (vip, r) in vips {
            let slot = out.entry(vip.address).or_default();
            if !self.withdrawn.contains(vip) {
                *slot = (*slot).max(Some(*r));
            }
        }
        out
    }

    fn decide(&self, best: Option<Readiness>) -> Decision {
        match best {
            _ if self.host_drained || !self.enabled => Decision::Withdraw,
            Some(Readiness::Ready) => Decision::Announce,
            Some(Readiness::Pending) => Decision::Hold,
            Some(Readiness::NotReady) | None => Decision::Withdraw,
        }
    }

    /// The addresses that should have a route, given the VIPs' readiness
    /// (from [`vip_readiness`]) and what is installed: every other
    /// installed route (of an address no VIP has any more, too) goes.
    pub fn wanted(&self, vips: &[(VipId, Readiness)]) -> BTreeSet<IpAddr> {
        self.by_address(vips)
            .into_iter()
            .filter(|(addr, best)| match self.decide(*best) {
                Decision::Announce => true,
                Decision::Hold => self.installed.contains(addr),
                Decision::Withdraw => false,
            })
            .map(|(addr, _)| addr)
            .collect()
    }

    /// Forgets the withdrawals of VIPs `cfg` no longer has.
    pub fn retain_vips(&mut self, cfg: &Config) {
        let live: BTreeSet<VipId> = cfg.vips.iter().map(VipId::of).collect();
        self.withdrawn.retain(|v| live.contains(v));
    }

    /// Whether `vip`'s address is announced, and why (or why not), for
    /// `lb vip list`. `names`: VIP names, for the VIP that keeps a shared
    /// address announced.
    pub fn view(
        &self,
        vip: VipId,
        vips: &[(VipId, Readiness)],
        names: &BTreeMap<VipId, String>,
    ) -> (bool, String) {
        if !self.enabled {
            return (false, "off ([agent.announce] is not set)".into());
        }
        let announced = self.installed.contains(&vip.address);
        let own = vips
            .iter()
            .find(|(v, _)| *v == vip)
            .map_or(Readiness::NotReady, |(_, r)| *r);
        let why = if self.host_drained {
            "host drained (lb host undrain)".to_string()
        } else if self.withdrawn.contains(&vip) {
            let keeper = vips
                .iter()
                .filter(|(v, r)| {
                    v.address == vip.address
                        && *v != vip
                        && !self.withdrawn.contains(v)
                        && *r > Readiness::NotReady
                })
                .max_by_key(|(_, r)| *r)
                .map(|(v, _)| names.get(v).cloned().unwrap_or_else(|| v.to_string()));
            match (announced, keeper) {
                (true, Some(k)) => format!(
                    "withdrawn, but the address stays announced for VIP {k} (shared address)"
                ),
                _ => "withdrawn (lb vip announce)".into(),
            }
        } else {
            match (own, announced) {
                (Readiness::Ready, true) => "ready".into(),
                (Readiness::Ready, false) => "ready, route not installed yet".into(),
                (Readiness::Pending, true) => "kept until a health check passes".into(),
                (Readiness::Pending, false) => "waiting for a health check to pass".into(),
                (Readiness::NotReady, true) => {
                    "no usable backend, address announced for another VIP".into()
                }
                (Readiness::NotReady, false) => "no usable backend".into(),
            }
        };
        (announced, why)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::{
        agent::state::tests::{config, next_hop},
        config::Protocol,
        keys::ip4,
        reconcile::KernelImage,
    };
    use Readiness::*;

    fn vip(a: u8, port: u16) -> VipId {
        VipId {
            address: ip4(198, 19, 0, a),
            port,
            protocol: Protocol::Tcp,
        }
    }

    fn on() -> Announce {
        Announce {
            enabled: true,
            ..Default::default()
        }
    }

    fn addrs(list: &[u8]) -> BTreeSet<IpAddr> {
        list.iter().map(|&a| ip4(198, 19, 0, a)).collect()
    }

    #[test]
    fn an_address_is_wanted_when_a_vip_on_it_is_ready() {
        let a = on();
        let vips = [
            (vip(1, 80), Ready),
            (vip(2, 80), NotReady),
            (vip(3, 80), Pending),
        ];
        assert_eq!(a.wanted(&vips), addrs(&[1]));
        // Off: nothing, whatever is ready.
        assert_eq!(Announce::default().wanted(&vips), addrs(&[]));
    }

    #[test]
    fn a_pending_vip_keeps_an_installed_route_but_adds_none() {
        let mut a = on();
        let vips = [(vip(1, 80), Pending), (vip(2, 80), Pending)];
        assert_eq!(a.wanted(&vips), addrs(&[]));
        // After a restart: the earlier agent's routes stay until checked;
        // a stale one (no VIP any more) goes.
        a.installed = addrs(&[1, 9]);
        assert_eq!(a.wanted(&vips), addrs(&[1]));
        // Checked and down: withdrawn.
        assert_eq!(a.wanted(&[(vip(1, 80), NotReady)]), addrs(&[]));
    }

    #[test]
    fn a_shared_address_is_announced_while_any_of_its_vips_is_ready() {
        let mut a = on();
        let web = vip(1, 80);
        let tls = vip(1, 443);
        assert_eq!(a.wanted(&[(web, Ready), (tls, NotReady)]), addrs(&[1]));
        assert_eq!(a.wanted(&[(web, NotReady), (tls, NotReady)]), addrs(&[]));
        // Withdrawing one VIP leaves the address to the other.
        a.withdrawn.insert(web);
        assert_eq!(a.wanted(&[(web, Ready), (tls, Ready)]), addrs(&[1]));
        assert_eq!(a.wanted(&[(web, Ready), (tls, NotReady)]), addrs(&[]));
        a.withdrawn.insert(tls);
        assert_eq!(a.wanted(&[(web, Ready), (tls, Ready)]), addrs(&[]));
    }

    #[test]
    fn a_drained_host_announces_nothing_and_undrained_everything_ready() {
        let mut a = on();
        a.installed = addrs(&[1, 2]);
        let vips = [(vip(1, 80), Ready), (vip(2, 80), Pending)];
        a.host_drained = true;
        assert_eq!(a.wanted(&vips), addrs(&[]));
        a.host_drained = false;
        assert_eq!(a.wanted(&vips), addrs(&[1, 2]));
    }

    #[test]
    fn the_view_says_why() {
        let mut a = on();
        let web = vip(1, 80);
        let tls = vip(1, 443);
        let dns = vip(2, 53);
        let names: BTreeMap<VipId, String> = [(web, "web"), (tls, "tls"), (dns, "dns")]
            .map(|(v, n)| (v, n.to_string()))
            .into();
        let vips = [(web, Ready), (tls, Ready), (dns, NotReady)];
        a.installed = a.wanted(&vips);
        assert_eq!(a.view(web, &vips, &names), (true, "ready".into()));
        assert_eq!(
            a.view(dns, &vips, &names),
            (false, "no usable backend".into())
        );
        a.withdrawn.insert(web);
        a.installed = a.wanted(&vips);
        let (shown, why) = a.view(web, &vips, &names);
        assert!(
            shown && why.contains("stays announced for VIP tls"),
            "{why}"
        );
        a.withdrawn.insert(tls);
        a.installed = a.wanted(&vips);
        assert_eq!(
            a.view(web, &vips, &names),
            (false, "withdrawn (lb vip announce)".into())
        );
        a.host_drained = true;
        assert_eq!(
            a.view(dns, &vips, &names).1,
            "host drained (lb host undrain)"
        );
        assert!(!Announce::default().view(web, &vips, &names).0);
    }

    #[test]
    fn readiness_needs_a_passed_check_an_active_backend_and_a_next_hop() {
        // v1: backend 11 active, 12 drained; v2: backend 21.
        let cfg = config(&[(1, &[(11, 1), (12, 0)]), (2, &[(21, 1)])], "tcp");
        let mut s = State::default();
        s.sync(&cfg, &KernelImage::default(), true);
        let key = |v: usize, b: u8| BackendKey {
            vip: VipId::of(&cfg.vips[v]),
            address: ip4(198, 18, 0, b),
        };
        let ready = |s: &State| -> Vec<Readiness> {
            vip_readiness(&cfg, s).into_iter().map(|(_, r)| r).collect()
        };
        // Up at start, but no next hop yet.
        assert_eq!(ready(&s), [NotReady, NotReady]);
        for (v, b) in [(0, 11), (0, 12), (1, 21)] {
            s.set_next_hop(&key(v, b), Ok(next_hop(b)));
        }
        // Optimistically up: pending.
        assert_eq!(ready(&s), [Pending, Pending]);
        // A passed check on the drained backend counts for nothing.
        s.record_confirmation(&key(0, 12), true, true);
        assert_eq!(ready(&s), [Pending, Pending]);
        s.record_confirmation(&key(0, 11), true, true);
        assert_eq!(ready(&s), [Ready, Pending]);
        // A failed probe that leaves it up keeps the confirmation; down
        // clears it, and up again needs a passed check.
        s.record_confirmation(&key(0, 11), false, true);
        assert_eq!(ready(&s), [Ready, Pending]);
        s.record_health(&key(0, 11), false, "refused".into());
        s.record_confirmation(&key(0, 11), false, false);
        assert_eq!(ready(&s), [NotReady, Pending]);
        s.record_health(&key(0, 11), true, "ok".into());
        assert_eq!(ready(&s), [Pending, Pending]);
        // Unresolved: not ready whatever the checks say.
        s.record_confirmation(&key(1, 21), true, true);
        s.set_next_hop(&key(1, 21), Err("no route".into()));
        assert_eq!(ready(&s), [Pending, NotReady]);
    }
}
