//! The agent's core: configuration, desired state and the kernel image,
//! driven by events (health results, next hops, requests) and written to
//! the maps through [`KernelMaps`]. No sockets, files or tasks: unit-tested
//! against the in-memory fake.

use std::time::Duration;

use log::{info, warn};

use super::{overrides::Overrides, state::State};
use crate::{
    config::Config,
    health::HealthEvent,
    keys::BackendKey,
    neigh::NextHopSource,
    reconcile::{self, KernelImage, KernelMaps},
};

pub struct Core<M: KernelMaps> {
    /// The configuration in force: the file's with the CLI's overrides.
    pub(super) cfg: Config,
    /// The configuration file as last loaded.
    pub(super) file: Config,
    pub(super) overrides: Overrides,
    pub(super) state: State,
    /// What the maps hold, as far as the agent knows.
    pub(super) image: KernelImage,
    pub(super) maps: M,
}

impl<M: KernelMaps> Core<M> {
    /// Takes over what the maps hold (`image`, read from `maps`: ids,
    /// usability) and gives every configured backend an id. Writes nothing
    /// yet.
    pub fn new(cfg: Config, maps: M, image: KernelImage) -> Self {
        let mut state = State::adopt(&cfg, &image);
        for p in state.sync(&cfg, &image, true) {
            warn!("{p}");
        }
        Self {
            file: cfg.clone(),
            overrides: Overrides::default(),
            cfg,
            state,
            image,
            maps,
        }
    }

    pub fn into_maps(self) -> M {
        self.maps
    }

    pub fn config(&self) -> &Config {
        &self.cfg
    }

    pub fn image(&self) -> &KernelImage {
        &self.image
    }

    pub fn maps(&self) -> &M {
        &self.maps
    }

    pub fn maps_mut(&mut self) -> &mut M {
        &mut self.maps
    }

    /// Brings the kernel maps to the target, in the safe order. Returns the
    /// number of map updates.
    pub fn reconcile(&mut self) -> anyhow::Result<usize> {
        let target = self.state.target(&self.cfg)?;
        let ops = reconcile::plan(&self.image, &target);
        let slots = reconcile::execute(&mut self.maps, &mut self.image, &ops)?;
        if !ops.is_empty() {
            info!("reconciled: {} map updates ({slots} ring slots)", ops.len());
        }
        Ok(ops.len())
    }

    /// Records a health check result; true when the kernel needs an update.
    pub fn on_health(&mut self, ev: HealthEvent) -> bool {
        self.state
            .record_health(&ev.key, ev.up, ev.outcome.to_string())
    }

    /// Finds the next hop of backends that have none yet: primes every
    /// missing one first, then waits up to `wait` once.
    pub fn resolve_next_hops(&mut self, source: &mut impl NextHopSource, wait: Duration) {
        let missing = self.state.unresolved();
        for k in &missing {
            source.prime(k.address);
        }
        for k in missing {
            let result = source
                .next_hop(k.address, self.mac_override(&k), wait)
                .map_err(|e| e.to_string());
            if let Ok(nh) = &result
                && let Err(e) = self.maps.add_tx_port(nh.ifindex)
            {
                warn!("TX port {}: {e}", nh.iface);
            }
            if let Err(e) = &result
                && self
                    .state
                    .backend(&k)
                    .and_then(|b| b.next_hop_error.as_ref())
                    != Some(e)
            {
                warn!("backend {k}: {e}; it gets no traffic until resolved");
            }
            self.state.set_next_hop(&k, result);
        }
    }

    fn mac_override(&self, k: &BackendKey) -> Option<[u8; 6]> {
        self.cfg
            .vips
            .iter()
            .filter(|v| crate::keys::VipId::of(v) == k.vip)
            .flat_map(|v| &v.backends)
            .find(|b| b.address == k.address)
            .and_then(|b| b.mac)
    }

    /// After the configuration changed: ids for new backends, their next
    /// hops, then the maps.
    pub fn after_change(
        &mut self,
        source: &mut impl NextHopSource,
        wait: Duration,
    ) -> anyhow::Result<()> {
        for p in self.state.sync(&self.cfg, &self.image, false) {
            warn!("{p}");
        }
        self.resolve_next_hops(source, wait);
        self.reconcile()?;
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use std::{
        collections::BTreeMap,
        net::{Ipv4Addr, SocketAddrV4},
    };

    use lb_common::{FlowEntry, FlowKey, NO_BACKEND};

    use super::*;
    use crate::{
        config::Protocol,
        control::{BackendView, ExplainView, Health, Request},
        fake_maps::FakeMaps,
        health::ProbeOutcome,
        keys::VipId,
        neigh::{NeighError, NextHop},
    };

    const M: u32 = 251;

    fn config(backends: &[(u8, u32)]) -> Config {
        super::super::state::tests::config(&[(1, backends)], "tcp")
    }

    /// Next hops by the backend address's last byte; absent = no ARP answer.
    #[derive(Default)]
    struct FakeNeighbours {
        macs: BTreeMap<u8, u8>,
    }

    impl FakeNeighbours {
        fn all() -> Self {
            Self {
                macs: (1..=40).map(|b| (b, b)).collect(),
            }
        }
    }

    impl NextHopSource for FakeNeighbours {
        fn prime(&mut self, _addr: Ipv4Addr) {}

        fn next_hop(
            &mut self,
            addr: Ipv4Addr,
            mac: Option<[u8; 6]>,
            _wait: Duration,
        ) -> Result<NextHop, NeighError> {
            let b = addr.octets()[3];
            let dst_mac = match (mac, self.macs.get(&b)) {
                (Some(m), _) => m,
                (None, Some(&m)) => [2, 0, 0, 0, 0, m],
                (None, None) => {
                    return Err(NeighError::Unresolved {
                        addr,
                        iface: "eth0".into(),
                    });
                }
            };
            Ok(NextHop {
                iface: "eth0".into(),
                ifindex: 2,
                src_mac: [2, 0, 0, 0, 0, 0xfe],
                dst_mac,
            })
        }
    }

    /// A started core on fresh fake maps, as `lb run` brings it up.
    fn started(cfg: Config, maps: FakeMaps) -> Core<FakeMaps> {
        let image = maps.read_image().unwrap();
        let mut core = Core::new(cfg, maps, image);
        core.resolve_next_hops(&mut FakeNeighbours::all(), Duration::ZERO);
        core.reconcile().unwrap();
        core.assert_true_and_safe();
        core
    }

    impl Core<FakeMaps> {
        /// The image is exactly what the maps hold, and no write ever
        /// broke the reconcile invariant.
        fn assert_true_and_safe(&self) {
            assert!(
                self.maps.violations.is_empty(),
                "{:?}",
                self.maps.violations
            );
            let mut visible = self.image.clone();
            let bases: Vec<u32> = visible
                .vips
                .values()
                .filter(|i| !i.is_address_only())
                .map(|i| i.ring_base)
                .collect();
            visible.rings.retain(|b, _| bases.contains(b));
            assert_eq!(self.maps.read_image().unwrap(), visible);
        }

        fn backends(&self) -> Vec<BackendView> {
            let h = self.ask(Request::BackendList { vip: None }).unwrap();
            serde_json::from_value(h.data).unwrap()
        }

        fn backend(&self, b: u8) -> BackendView {
            let addr = Ipv4Addr::new(198, 18, 0, b);
            self.backends()
                .into_iter()
                .find(|v| v.address == addr)
                .unwrap_or_else(|| panic!("no backend {addr}"))
        }

        fn request(&mut self, req: Request) -> anyhow::Result<()> {
            if self.handle(req)?.changed {
                self.after_change(&mut FakeNeighbours::all(), Duration::ZERO)?;
            }
            self.assert_true_and_safe();
            Ok(())
        }

        fn health(&mut self, b: u8, up: bool) {
            let key = BackendKey {
                vip: VipId::of(&self.cfg.vips[0]),
                address: Ipv4Addr::new(198, 18, 0, b),
            };
            let outcome = if up {
                ProbeOutcome::Ok {
                    detail: "TCP connect".into(),
                }
            } else {
                ProbeOutcome::Refused
            };
            if self.on_health(HealthEvent {
                key,
                outcome,
                transition: None,
                up,
            }) {
                self.reconcile().unwrap();
            }
            self.assert_true_and_safe();
        }
    }

    /// A request that must not write the maps, on a copy of the core.
    trait Ask {
        fn ask(&self, req: Request) -> anyhow::Result<super::super::requests::Handled>;
    }

    impl Ask for Core<FakeMaps> {
        fn ask(&self, req: Request) -> anyhow::Result<super::super::requests::Handled> {
            let mut copy = Core {
                cfg: self.cfg.clone(),
                file: self.file.clone(),
                overrides: self.overrides.clone(),
                state: self.state.clone(),
                image: self.image.clone(),
                maps: self.maps.clone(),
            };
            let writes = copy.maps.writes;
            let h = Core::handle(&mut copy, req)?;
            assert_eq!(copy.maps.writes, writes, "handle writes no map");
            Ok(h)
        }
    }

    fn vip_request(address: u8) -> (String, Ipv4Addr) {
        ("v1".into(), Ipv4Addr::new(198, 18, 0, address))
    }

    #[test]
    fn a_restarted_agent_adopts_ids_and_writes_nothing() {
        let core = started(
            config(&[(11, 1), (12, 1), (13, 1)]),
            FakeMaps::new(4, M, 16),
        );
        let ids: Vec<u32> = core.backends().iter().map(|b| b.id).collect();
        assert_eq!(ids, vec![1, 2, 3]);
        // The next agent finds the maps as the first one left them, with
        // the backends listed in another order.
        let maps = core.into_maps();
        let writes = maps.writes;
        let core = started(config(&[(13, 1), (11, 1), (12, 1)]), maps);
        assert_eq!(core.maps.writes, writes, "no map write after a restart");
        assert_eq!(core.backend(11).id, 1);
        assert_eq!(core.backend(13).id, 3);
    }

    #[test]
    fn a_backend_going_down_and_up_leaves_and_rejoins_the_ring() {
        let mut core = started(
            config(&[(11, 1), (12, 1), (13, 1)]),
            FakeMaps::new(4, M, 16),
        );
        assert!(core.backend(12).slots > 0);
        core.health(12, false);
        let b = core.backend(12);
        assert_eq!((b.health, b.slots), (Health::Down, 0));
        assert!(!core.maps.backends[b.id as usize].is_usable());
        core.health(12, true);
        let b = core.backend(12);
        assert_eq!(b.health, Health::Up);
        assert!(b.slots > 0);
        assert_eq!(b.last_check.as_deref(), Some("TCP connect"));
    }

    #[test]
    fn added_drained_reweighted_and_removed_backends() {
        let mut core = started(config(&[(11, 1), (12, 1)]), FakeMaps::new(4, M, 16));
        let (vip, a13) = vip_request(13);
        core.request(Request::BackendAdd {
            vip: vip.clone(),
            address: a13,
            weight: 1,
        })
        .unwrap();
        // Added later: checked down until `rise` successes.
        assert_eq!(
            (core.backend(13).health, core.backend(13).slots),
            (Health::Down, 0)
        );
        core.health(13, true);
        assert!(core.backend(13).slots > 70);
        // Drained: out of the ring, still usable for its established flows.
        core.request(Request::BackendDrain {
            vip: vip.clone(),
            address: a13,
        })
        .unwrap();
        let b = core.backend(13);
        assert_eq!((b.slots, b.state.as_str()), (0, "drain"));
        assert!(core.maps.backends[b.id as usize].is_usable());
        core.request(Request::BackendUndrain {
            vip: vip.clone(),
            address: a13,
        })
        .unwrap();
        core.request(Request::BackendSetWeight {
            vip: vip.clone(),
            address: a13,
            weight: 2,
        })
        .unwrap();
        let s13 = core.backend(13).slots as f64;
        assert!((s13 - M as f64 / 2.0).abs() <= 1.0, "{s13}");
        let id = core.backend(13).id;
        core.request(Request::BackendRemove { vip, address: a13 })
            .unwrap();
        assert!(!core.maps.backends[id as usize].is_present());
        assert_eq!(core.backends().len(), 2);
    }

    #[test]
    fn bad_requests_change_nothing() {
        let mut core = started(config(&[(11, 1), (12, 1)]), FakeMaps::new(4, M, 16));
        let before = (core.cfg.clone(), core.image.clone(), core.maps.writes);
        let (vip, a11) = vip_request(11);
        let bad = [
            Request::BackendAdd {
                vip: vip.clone(),
                address: a11,
                weight: 1,
            },
            Request::BackendAdd {
                vip: "nope".into(),
                address: Ipv4Addr::new(198, 18, 0, 30),
                weight: 1,
            },
            Request::BackendSetWeight {
                vip: vip.clone(),
                address: a11,
                weight: 0,
            },
            Request::BackendRemove {
                vip,
                address: Ipv4Addr::new(198, 18, 0, 99),
            },
        ];
        for req in bad {
            let shown = format!("{req:?}");
            assert!(core.request(req).is_err(), "{shown} was accepted");
        }
        assert_eq!(
            (core.cfg.clone(), core.image.clone(), core.maps.writes),
            before
        );
    }

    #[test]
    fn a_reload_that_needs_a_restart_is_refused_whole() {
        let mut core = started(config(&[(11, 1), (12, 1)]), FakeMaps::new(4, M, 16));
        let before = core.cfg.clone();
        let mut bigger = config(&[(11, 1)]);
        bigger.agent.kernel.max_vips = 8;
        let e = core.apply_reload(bigger).unwrap_err();
        assert!(e.to_string().contains("change only with a restart"), "{e}");
        assert_eq!(core.cfg, before);
        // The same file without the size change is applied.
        core.apply_reload(config(&[(11, 1)])).unwrap();
        core.after_change(&mut FakeNeighbours::all(), Duration::ZERO)
            .unwrap();
        core.assert_true_and_safe();
        assert_eq!(core.backends().len(), 1);
    }

    #[test]
    fn cli_changes_survive_the_reload_of_an_unchanged_file_until_cleared() {
        let file = config(&[(11, 1), (12, 1), (13, 1)]);
        let mut core = started(file.clone(), FakeMaps::new(4, M, 16));
        let (vip, a12) = vip_request(12);
        core.request(Request::BackendDrain {
            vip: vip.clone(),
            address: a12,
        })
        .unwrap();
        core.request(Request::BackendSetWeight {
            vip: vip.clone(),
            address: Ipv4Addr::new(198, 18, 0, 13),
            weight: 2,
        })
        .unwrap();
        let reload = |core: &mut Core<FakeMaps>, cfg: Config| {
            core.apply_reload(cfg).unwrap();
            core.after_change(&mut FakeNeighbours::all(), Duration::ZERO)
                .unwrap();
            core.assert_true_and_safe();
        };
        reload(&mut core, file.clone());
        assert_eq!(core.backend(12).slots, 0, "the drain survives the reload");
        assert_eq!(core.backend(12).state, "drain");
        assert_eq!(core.backend(13).weight, 2);
        assert_eq!(core.overrides.views(&core.cfg).len(), 2);
        // The file changes backend 13: its word wins there, not for 12.
        reload(&mut core, config(&[(11, 1), (12, 1), (13, 5)]));
        assert_eq!(core.backend(13).weight, 5);
        assert_eq!(core.backend(12).slots, 0);
        // Clearing drops the last override: the file applies again.
        core.request(Request::OverrideClear {
            vip: None,
            address: None,
        })
        .unwrap();
        assert!(core.backend(12).slots > 0);
        assert!(core.overrides.is_empty());
    }

    #[test]
    fn a_failed_write_is_retried_by_the_next_reconcile() {
        let mut maps = FakeMaps::new(4, M, 16);
        maps.fail_after = Some(3);
        let image = maps.read_image().unwrap();
        let mut core = Core::new(config(&[(11, 1), (12, 1)]), maps, image);
        core.resolve_next_hops(&mut FakeNeighbours::all(), Duration::ZERO);
        let e = core.reconcile().unwrap_err();
        assert!(e.to_string().contains("injected failure"), "{e:#}");
        core.assert_true_and_safe();
        core.maps.fail_after = None;
        assert!(core.reconcile().unwrap() > 0);
        core.assert_true_and_safe();
        assert_eq!(core.reconcile().unwrap(), 0);
        assert!(core.backends().iter().all(|b| b.slots > 100));
    }

    #[test]
    fn an_unresolved_backend_waits_out_of_the_ring_until_its_next_hop_is_known() {
        let cfg = config(&[(11, 1), (12, 1)]);
        let maps = FakeMaps::new(4, M, 16);
        let image = maps.read_image().unwrap();
        let mut core = Core::new(cfg, maps, image);
        let mut arp = FakeNeighbours::all();
        arp.macs.remove(&12);
        core.resolve_next_hops(&mut arp, Duration::ZERO);
        core.reconcile().unwrap();
        let b = core.backend(12);
        assert_eq!((b.health, b.slots, b.mac), (Health::Unresolved, 0, None));
        // A later tick finds it.
        core.resolve_next_hops(&mut FakeNeighbours::all(), Duration::ZERO);
        core.reconcile().unwrap();
        core.assert_true_and_safe();
        let b = core.backend(12);
        assert_eq!(b.health, Health::Up);
        assert_eq!(b.mac.as_deref(), Some("02:00:00:00:00:0c"));
        assert!(core.maps.tx_ports.contains(&2));
    }

    #[test]
    fn explain_follows_conntrack_then_the_ring() {
        let mut core = started(config(&[(11, 1), (12, 1)]), FakeMaps::new(4, M, 16));
        let src: SocketAddrV4 = "198.18.1.1:40000".parse().unwrap();
        let dst: SocketAddrV4 = "198.19.0.1:80".parse().unwrap();
        let explain = |core: &Core<FakeMaps>| -> ExplainView {
            let h = core
                .ask(Request::Explain {
                    src,
                    dst,
                    protocol: Protocol::Tcp,
                })
                .unwrap();
            serde_json::from_value(h.data).unwrap()
        };
        let e = explain(&core);
        assert_eq!(e.reason, "new flow: Maglev ring slot");
        let ring_backend = e.ring_backend.unwrap();
        let other = if ring_backend.octets()[3] == 11 {
            12
        } else {
            11
        };
        let key = FlowKey::new(src.ip().to_bits(), src.port(), dst.ip().to_bits(), 80, 6);
        core.maps.conntrack.insert(
            key,
            FlowEntry {
                backend_id: core.backend(other).id,
                flags: 0,
                last_seen_ms: 0,
            },
        );
        // `lb backend list` counts it for its backend.
        assert_eq!(core.backend(other).flows, Some(1));
        assert_eq!(core.backend(ring_backend.octets()[3]).flows, Some(0));
        let e = explain(&core);
        assert_eq!(e.backend, Some(Ipv4Addr::new(198, 18, 0, other)));
        assert_eq!(e.reason, "established flow: conntrack entry");
        core.health(other, false);
        let e = explain(&core);
        assert_eq!(e.backend, Some(ring_backend));
        assert!(e.reason.contains("re-steered"), "{}", e.reason);
        // Not a VIP: said so.
        let err = core
            .ask(Request::Explain {
                src,
                dst: "198.19.0.1:81".parse().unwrap(),
                protocol: Protocol::Tcp,
            })
            .err()
            .unwrap();
        assert!(err.to_string().contains("not a VIP"), "{err}");
        assert!(
            core.image
                .ring(&VipId::of(&core.cfg.vips[0]).kernel_key())
                .unwrap()
                .iter()
                .all(|&id| id != NO_BACKEND)
        );
    }
}
