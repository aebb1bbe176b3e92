//! The agent's core: configuration, desired state and the kernel image,
//! driven by events (health results, next hops, requests) and written to
//! the maps through [`KernelMaps`]. No sockets, files or tasks: unit-tested
//! against the in-memory fake.

use std::{collections::BTreeMap, net::IpAddr};

use log::{info, warn};

use super::{
    announce::{self, Announce},
    nexthops::{self, Batch, Wanted},
    overrides::Overrides,
    state::{RingCache, State},
};
use crate::{
    config::{Config, Forwarding},
    health::HealthEvent,
    keys::{BackendKey, VipId},
    mac::MacAddr,
    neigh::{HopSource, Lookup, NeighError, Resolution},
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
    /// What the kernel's tables said last, per backend address.
    pub(super) resolutions: BTreeMap<IpAddr, Resolution>,
    /// The Maglev tables last built, by VIP.
    pub(super) rings: RingCache,
    /// Something changed since the last successful reconcile (or it
    /// failed): the maps may differ from the target.
    pub(super) dirty: bool,
    /// VIP announcement: the operator's requests, the routes installed.
    pub(super) announce: Announce,
}

impl<M: KernelMaps> Core<M> {
    /// Takes over what the maps hold (`image`, read from `maps`: ids,
    /// usability) and gives every configured backend an id. Writes nothing
    /// yet.
    pub fn new(cfg: Config, maps: M, image: KernelImage) -> Self {
        let cfg_announce = cfg.agent.start.announce.is_some();
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
            resolutions: BTreeMap::new(),
            rings: RingCache::default(),
            dirty: true,
            announce: Announce {
                enabled: cfg_announce,
                ..Default::default()
            },
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

    /// Brings the kernel maps to the target, in the safe order, rebuilding
    /// only the Maglev tables of VIPs whose members changed. Returns the
    /// number of map updates.
    pub fn reconcile(&mut self) -> anyhow::Result<usize> {
        self.dirty = true;
        let target = self.state.target_with(&self.cfg, &mut self.rings)?;
        // A VIP's ACL is in force before its entry is written, and removed
        // only after its entry is gone (agent/acl.rs).
        let live = self.sync_acls()?;
        let ops = reconcile::plan(&self.image, &target);
        let slots = reconcile::execute(&mut self.maps, &mut self.image, &ops)?;
        self.prune_acls(&live)?;
        if !ops.is_empty() {
            info!("reconciled: {} map updates ({slots} ring slots)", ops.len());
        }
        self.dirty = false;
        Ok(ops.len())
    }

    /// Makes every interface the program is attached to (`ifindexes`) a
    /// redirect target: a NAT reply goes back out of the interface its
    /// client's packets came in on, which is not the reply's own in a
    /// two-arm setup. A failure is logged: only such replies suffer.
    pub fn add_attached_tx_ports(&mut self, ifindexes: &[u32]) {
        for &i in ifindexes {
            if let Err(e) = self.maps.add_tx_port(i) {
                warn!("TX port ifindex {i} (an attached interface): {e}");
            }
        }
    }

    /// The VIP addresses that should have a route in the announce table
    /// now (empty when announcing is off).
    pub fn announce_wanted(&self) -> std::collections::BTreeSet<IpAddr> {
        self.announce
            .wanted(&announce::vip_readiness(&self.cfg, &self.state))
    }

    /// Records the addresses whose routes are in the announce table.
    pub fn set_announced(&mut self, installed: std::collections::BTreeSet<IpAddr>) {
        self.announce.installed = installed;
    }

    pub fn announced(&self) -> &std::collections::BTreeSet<IpAddr> {
        &self.announce.installed
    }

    /// Per VIP name: whether its address is announced (`None`: off).
    pub fn vips_announced(&self) -> Option<BTreeMap<String, bool>> {
        self.announce.enabled.then(|| {
            self.cfg
                .vips
                .iter()
                .map(|v| {
                    let on = self.announce.installed.contains(&v.address);
                    (v.name.clone(), on)
                })
                .collect()
        })
    }

    /// Whether something changed since the last successful reconcile.
    pub fn needs_reconcile(&self) -> bool {
        self.dirty
    }

    /// Reconciles when something changed since the last success: `None`
    /// when nothing did.
    pub fn reconcile_if_needed(&mut self) -> Option<anyhow::Result<usize>> {
        self.dirty.then(|| self.reconcile())
    }

    /// Maglev tables built so far.
    pub fn ring_builds(&self) -> u64 {
        self.rings.builds()
    }

    /// Records a health check result; true when the kernel needs an update.
    pub fn on_health(&mut self, ev: HealthEvent) -> bool {
        if let crate::health::ProbeOutcome::Ok {
            latency: Some(d), ..
        } = &ev.outcome
        {
            self.state.record_latency(&ev.key, *d);
        }
        let changed = self
            .state
            .record_health(&ev.key, ev.up, ev.outcome.to_string());
        self.state
            .record_confirmation(&ev.key, ev.outcome.is_ok(), ev.up);
        self.dirty |= changed;
        changed
    }

    /// Records a batch of health check results (all those queued at once),
    /// so that one reconcile follows however many transitions: true when
    /// the kernel needs an update.
    pub fn on_health_batch(&mut self, events: impl IntoIterator<Item = HealthEvent>) -> bool {
        events
            .into_iter()
            .fold(false, |changed, ev| self.on_health(ev) | changed)
    }

    /// The addresses whose next hops the agent must follow.
    pub fn wanted_next_hops(&self) -> Wanted {
        nexthops::wanted(&self.cfg)
    }

    /// Takes what the kernel's tables say now about some addresses; true
    /// when the kernel maps need an update.
    pub fn on_next_hops(&mut self, batch: Batch) -> bool {
        self.resolutions.extend(batch);
        let changed = self.apply_next_hops();
        self.dirty |= changed;
        changed
    }

    /// Gives every backend the next hop the latest resolutions and its
    /// `mac` override call for: a changed one replaces the old (egress
    /// interface made a redirect target first), an unreachable one takes
    /// the backend out of the ring, a pending one keeps what was known.
    /// True when the kernel maps need an update.
    fn apply_next_hops(&mut self) -> bool {
        // Per backend: its `mac` override and what its VIP's mode asks of
        // the next hop's source.
        let encap = self.cfg.agent.encap;
        let how: BTreeMap<BackendKey, (Option<[u8; 6]>, HopSource)> = self
            .cfg
            .vips
            .iter()
            .flat_map(|v| {
                let vip = VipId::of(v);
                let source = match v.forwarding {
                    Forwarding::DsrL2 => HopSource::None,
                    // The operator's outer source is filled in per backend.
                    Forwarding::Ipip | Forwarding::Gue => HopSource::Tunnel(None),
                    Forwarding::Nat => HopSource::Nat {
                        required: v.snat_addresses.is_empty(),
                    },
                };
                v.backends.iter().map(move |b| {
                    let address = b.address;
                    (BackendKey { vip, address }, (b.mac, source))
                })
            })
            .collect();
        let keys: Vec<BackendKey> = self.state.backends().map(|(k, _)| *k).collect();
        let mut changed = false;
        for k in keys {
            let (mac, source) = how.get(&k).copied().unwrap_or((None, HopSource::None));
            let lookup = match self.resolutions.get(&k.address) {
                Some(r) => {
                    let source = match source {
                        // The operator's outer source of the backend's family.
                        HopSource::Tunnel(_) => HopSource::Tunnel(match k.address {
                            IpAddr::V4(_) => encap.source_v4.map(IpAddr::V4),
                            IpAddr::V6(_) => encap.source_v6.map(IpAddr::V6),
                        }),
                        other => other,
                    };
                    r.lookup_as(k.address, mac, source)
                }
                None => Lookup::Pending(NeighError::Unknown),
            };
            changed |= self.apply_lookup(&k, lookup);
        }
        changed
    }

    fn apply_lookup(&mut self, k: &BackendKey, lookup: Lookup) -> bool {
        let Some(b) = self.state.backend(k) else {
            return false;
        };
        match lookup {
            Lookup::Found(nh) => {
                if b.next_hop.as_ref() == Some(&nh) {
                    return false;
                }
                let mac = MacAddr(nh.dst_mac);
                match &b.next_hop {
                    Some(old) if (old.ifindex, old.dst_mac) != (nh.ifindex, nh.dst_mac) => info!(
                        "backend {k}: next hop now {mac} on {} (was {} on ifindex {})",
                        nh.iface,
                        MacAddr(old.dst_mac),
                        old.ifindex
                    ),
                    Some(_) => {}
                    None => info!("backend {k}: reached through {mac} on {}", nh.iface),
                }
                if b.next_hop.as_ref().map(|o| o.ifindex) != Some(nh.ifindex)
                    && let Err(e) = self.maps.add_tx_port(nh.ifindex)
                {
                    warn!("TX port {} (ifindex {}): {e}", nh.iface, nh.ifindex);
                }
                self.state.set_next_hop(k, Ok(nh))
            }
            Lookup::Failed(e) => {
                let e = e.to_string();
                if b.next_hop_error.as_ref() != Some(&e) {
                    warn!("backend {k}: {e}; it gets no traffic until resolved");
                }
                self.state.set_next_hop(k, Err(e))
            }
            Lookup::Pending(e) => {
                // Asked again after ARP failed there: the failure stays the
                // reason shown until an answer comes.
                let asked_again = match &e {
                    NeighError::Resolving { addr, iface } => {
                        let failed = NeighError::Unresolved {
                            addr: *addr,
                            iface: iface.clone(),
                        };
                        b.next_hop_error.as_deref() == Some(failed.to_string().as_str())
                    }
                    _ => false,
                };
                if !asked_again {
                    self.state.note_next_hop_pending(k, e.to_string());
                }
                false
            }
        }
    }

    /// After the configuration changed: ids for new backends, their next
    /// hops as far as known (and `mac` overrides as the file has them
    /// now), then the maps. The caller gives the follower the new
    /// [`Core::wanted_next_hops`].
    pub fn after_change(&mut self) -> anyhow::Result<()> {
        for p in self.state.sync(&self.cfg, &self.image, false) {
            warn!("{p}");
        }
        let wanted = self.wanted_next_hops();
        self.resolutions.retain(|a, _| wanted.contains_key(a));
        self.apply_next_hops();
        self.reconcile()?;
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    #[allow(unused_imports)]
    use std::net::{IpAddr, Ipv4Addr};

    #[allow(unused_imports)]
    use crate::keys::ip4;
    use std::{collections::BTreeMap, net::SocketAddr};

    use lb_common::{FlowEntry, FlowKey, NO_BACKEND};

    use super::*;
    use crate::{
        config::Protocol,
        control::{BackendView, ExplainView, Health, Request},
        fake_maps::FakeMaps,
        health::ProbeOutcome,
        neigh::{Egress, Neighbour},
    };

    const M: u32 = 251;

    /// IPv6 VIPs and backends through the same core.
    mod v6;

    /// NAT VIPs: NAT_SNAT, backend ports and sources, TX_PORTS, reloads.
    mod nat;

    /// Source access control: ACL writes around the VIP entries, reloads,
    /// restarts, `lb explain` and `lb vip list`.
    mod acl;
    /// Schedulers: their slots, reloads, explain and the counts shown.
    mod sched;

    fn config(backends: &[(u8, u32)]) -> Config {
        super::super::state::tests::config(&[(1, backends)], "tcp")
    }

    /// The kernel's tables as the follower would report them: next hops by
    /// the backend address's last byte (absent = ARP failed), all on
    /// `eth0` (index `ifindex`) unless the address has no route.
    struct FakeNeighbours {
        macs: BTreeMap<u8, u8>,
        ifindex: u32,
        no_route: Vec<u8>,
    }

    impl FakeNeighbours {
        fn all() -> Self {
            Self {
                macs: (1..=40).map(|b| (b, b)).collect(),
                ifindex: 2,
                no_route: Vec::new(),
            }
        }

        fn resolution(&self, addr: IpAddr) -> Resolution {
            let b = crate::keys::last_octet(addr);
            if self.no_route.contains(&b) {
                return Resolution {
                    egress: Err(NeighError::NoRoute {
                        addr,
                        reason: "Network is unreachable (os error 101)".into(),
                    }),
                    neighbour: Neighbour::Missing,
                };
            }
            Resolution {
                egress: Ok(Egress {
                    iface: "eth0".into(),
                    ifindex: self.ifindex,
                    gateway: None,
                    mac: [2, 0, 0, 0, 0, 0xfe],
                    source: Some(ip4(198, 18, 0, 10)),
                }),
                neighbour: match self.macs.get(&b) {
                    Some(&m) => Neighbour::Known([2, 0, 0, 0, 0, m]),
                    None => Neighbour::Failed,
                },
            }
        }

        /// What the follower sends for every address `core` follows.
        fn batch(&self, core: &Core<FakeMaps>) -> Batch {
            core.wanted_next_hops()
                .keys()
                .map(|&a| (a, self.resolution(a)))
                .collect()
        }
    }

    /// A started core on fresh fake maps, as `lb run` brings it up.
    fn started(cfg: Config, maps: FakeMaps) -> Core<FakeMaps> {
        let image = maps.read_image().unwrap();
        let mut core = Core::new(cfg, maps, image);
        core.on_next_hops(FakeNeighbours::all().batch(&core));
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
            let indices: Vec<u32> = visible
                .vips
                .values()
                .filter(|i| !i.is_address_only())
                .map(|i| i.index)
                .collect();
            visible.sched.retain(|i, _| indices.contains(i));
            for s in visible.sched.values_mut() {
                s.slots.truncate(s.info.len as usize);
            }
            assert_eq!(self.maps.read_image().unwrap(), visible);
        }

        fn backends(&self) -> Vec<BackendView> {
            let h = self.ask(Request::BackendList { vip: None }).unwrap();
            serde_json::from_value(h.data).unwrap()
        }

        fn backend(&self, b: u8) -> BackendView {
            let addr = ip4(198, 18, 0, b);
            self.backends()
                .into_iter()
                .find(|v| v.address == addr)
                .unwrap_or_else(|| panic!("no backend {addr}"))
        }

        fn request(&mut self, req: Request) -> anyhow::Result<()> {
            if self.handle(req)?.changed {
                self.after_change()?;
                self.on_next_hops(FakeNeighbours::all().batch(self));
                self.reconcile()?;
            }
            self.assert_true_and_safe();
            Ok(())
        }

        fn health(&mut self, b: u8, up: bool) {
            let key = BackendKey {
                vip: VipId::of(&self.cfg.vips[0]),
                address: ip4(198, 18, 0, b),
            };
            let outcome = if up {
                ProbeOutcome::Ok {
                    detail: "TCP connect".into(),
                    latency: Some(std::time::Duration::from_micros(700)),
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
                resolutions: self.resolutions.clone(),
                rings: self.rings.clone(),
                dirty: self.dirty,
                announce: self.announce.clone(),
            };
            let writes = copy.maps.writes;
            let h = Core::handle(&mut copy, req)?;
            assert_eq!(copy.maps.writes, writes, "handle writes no map");
            Ok(h)
        }
    }

    #[test]
    fn announcement_follows_checks_withdraw_and_drain_and_needs_the_table() {
        // Off: nothing wanted, and the requests say how to turn it on.
        let mut off = started(config(&[(11, 1)]), FakeMaps::new(4, M, 16));
        off.health(11, true);
        assert!(off.announce_wanted().is_empty());
        let e = off.handle(Request::HostDrain).err().unwrap();
        assert!(e.to_string().contains("[agent.announce]"), "{e}");

        let mut cfg = config(&[(11, 1), (12, 1)]);
        cfg.agent.start.announce = Some(crate::config::AnnounceSettings {
            table: 100,
            protocol: 200,
            device: "lo".into(),
        });
        let mut core = started(cfg.clone(), FakeMaps::new(4, M, 16));
        let vip = ip4(198, 19, 0, 1);
        let only_vip = std::collections::BTreeSet::from([vip]);
        // Up at start but unchecked: not announced yet.
        assert!(core.announce_wanted().is_empty());
        core.health(11, true);
        assert_eq!(core.announce_wanted(), only_vip);
        core.set_announced(only_vip.clone());
        assert!(core.vip_list()[0].announced);
        core.handle(Request::VipWithdraw { vip: "v1".into() })
            .unwrap();
        assert!(core.announce_wanted().is_empty());
        core.set_announced(Default::default());
        assert_eq!(core.vip_list()[0].announce, "withdrawn (lb vip announce)");
        // A reload keeps the withdrawal of a VIP it keeps.
        core.apply_reload(cfg.clone()).unwrap();
        assert!(core.announce_wanted().is_empty());
        core.handle(Request::VipAnnounce {
            vip: "198.19.0.1:80/tcp".into(),
        })
        .unwrap();
        assert_eq!(core.announce_wanted(), only_vip);
        core.handle(Request::HostDrain).unwrap();
        assert!(core.announce_wanted().is_empty());
        core.handle(Request::HostUndrain).unwrap();
        assert_eq!(core.announce_wanted(), only_vip);
        // Down: withdrawn; the other backend, once checked, brings it back.
        core.health(11, false);
        assert!(core.announce_wanted().is_empty());
        core.health(12, true);
        assert_eq!(core.announce_wanted(), only_vip);
        assert!(
            core.handle(Request::VipWithdraw { vip: "nope".into() })
                .is_err()
        );
    }

    fn vip_request(address: u8) -> (String, IpAddr) {
        ("v1".into(), ip4(198, 18, 0, address))
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
                address: ip4(198, 18, 0, 30),
                weight: 1,
            },
            Request::BackendSetWeight {
                vip: vip.clone(),
                address: a11,
                weight: 0,
            },
            Request::BackendRemove {
                vip,
                address: ip4(198, 18, 0, 99),
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
        core.after_change().unwrap();
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
            address: ip4(198, 18, 0, 13),
            weight: 2,
        })
        .unwrap();
        let reload = |core: &mut Core<FakeMaps>, cfg: Config| {
            core.apply_reload(cfg).unwrap();
            core.after_change().unwrap();
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

    fn health_event(core: &Core<FakeMaps>, b: u8, up: bool) -> HealthEvent {
        HealthEvent {
            key: BackendKey {
                vip: VipId::of(&core.cfg.vips[0]),
                address: ip4(198, 18, 0, b),
            },
            outcome: if up {
                ProbeOutcome::Ok {
                    detail: "TCP connect".into(),
                    latency: Some(std::time::Duration::from_micros(700)),
                }
            } else {
                ProbeOutcome::Refused
            },
            transition: None,
            up,
        }
    }

    #[test]
    fn nothing_changed_means_no_reconcile_and_no_table_built() {
        let mut core = started(
            config(&[(11, 1), (12, 1), (13, 1)]),
            FakeMaps::new(4, M, 16),
        );
        let (builds, writes) = (core.ring_builds(), core.maps.writes);
        assert!(!core.needs_reconcile());
        // A check that changes nothing but the last check's text.
        assert!(!core.on_health(health_event(&core, 11, true)));
        assert!(core.reconcile_if_needed().is_none());
        assert_eq!((core.ring_builds(), core.maps.writes), (builds, writes));
        // A transition: one reconcile, one table.
        assert!(core.on_health(health_event(&core, 12, false)));
        assert!(core.needs_reconcile());
        assert!(core.reconcile_if_needed().unwrap().unwrap() > 0);
        assert_eq!(core.ring_builds(), builds + 1);
        assert!(core.reconcile_if_needed().is_none());
        // A failed write leaves it to be retried.
        core.on_health(health_event(&core, 12, true));
        core.maps.fail_after = Some(core.maps.writes);
        assert!(core.reconcile_if_needed().unwrap().is_err());
        assert!(core.needs_reconcile());
        core.maps.fail_after = None;
        assert!(core.reconcile_if_needed().unwrap().is_ok());
        assert!(!core.needs_reconcile());
        core.assert_true_and_safe();
        assert!(core.backend(12).slots > 0);
    }

    #[test]
    fn a_burst_of_transitions_is_applied_in_one_reconcile() {
        let all: Vec<(u8, u32)> = (11..=20).map(|b| (b, 1)).collect();
        let mut core = started(config(&all), FakeMaps::new(4, M, 16));
        let builds = core.ring_builds();
        let burst: Vec<HealthEvent> = (11..=15).map(|b| health_event(&core, b, false)).collect();
        assert!(core.on_health_batch(burst));
        let updates = core.reconcile().unwrap();
        core.assert_true_and_safe();
        assert_eq!(
            core.ring_builds(),
            builds + 1,
            "one table for five transitions"
        );
        // Five backends marked unusable and one ring write, not five.
        assert_eq!(updates, 6);
        for b in 11..=15 {
            assert_eq!(core.backend(b).slots, 0);
        }
        assert_eq!(
            (16..=20).map(|b| core.backend(b).slots).sum::<u32>(),
            M,
            "the five left share the ring"
        );
    }

    #[test]
    fn a_failed_write_is_retried_by_the_next_reconcile() {
        let mut maps = FakeMaps::new(4, M, 16);
        maps.fail_after = Some(3);
        let image = maps.read_image().unwrap();
        let mut core = Core::new(config(&[(11, 1), (12, 1)]), maps, image);
        core.on_next_hops(FakeNeighbours::all().batch(&core));
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
        core.on_next_hops(arp.batch(&core));
        core.reconcile().unwrap();
        let b = core.backend(12);
        assert_eq!((b.health, b.slots, b.mac), (Health::Unresolved, 0, None));
        assert_eq!(
            b.next_hop_error.as_deref(),
            Some("no ARP answer from 198.18.0.12 on eth0")
        );
        // An answer comes later.
        core.on_next_hops(FakeNeighbours::all().batch(&core));
        core.reconcile().unwrap();
        core.assert_true_and_safe();
        let b = core.backend(12);
        assert_eq!((b.health, b.next_hop_error), (Health::Up, None));
        assert_eq!(b.mac.as_deref(), Some("02:00:00:00:00:0c"));
        assert!(core.maps.tx_ports.contains(&2));
    }

    fn entry_of(core: &Core<FakeMaps>, b: u8) -> lb_common::Backend {
        core.maps.backends[core.backend(b).id as usize]
    }

    #[test]
    fn a_changed_mac_replaces_the_old_one_in_the_backend_entry() {
        let mut core = started(config(&[(11, 1), (12, 1)]), FakeMaps::new(4, M, 16));
        let slots = core.backend(12).slots;
        let mut arp = FakeNeighbours::all();
        arp.macs.insert(12, 0x99);
        // Only what changed is reported.
        let batch: Batch = arp
            .batch(&core)
            .into_iter()
            .filter(|(a, _)| crate::keys::last_octet(*a) == 12)
            .collect();
        assert!(core.on_next_hops(batch));
        core.reconcile().unwrap();
        core.assert_true_and_safe();
        assert_eq!(entry_of(&core, 12).dst_mac, [2, 0, 0, 0, 0, 0x99]);
        assert!(entry_of(&core, 12).is_usable());
        let b = core.backend(12);
        assert_eq!(b.mac.as_deref(), Some("02:00:00:00:00:99"));
        assert_eq!(b.slots, slots, "the ring does not move");
        // The same answer again changes nothing.
        assert!(!core.on_next_hops(arp.batch(&core)));
    }

    #[test]
    fn a_failed_arp_or_a_lost_route_takes_the_backend_out_with_the_reason() {
        let mut core = started(
            config(&[(11, 1), (12, 1), (13, 1)]),
            FakeMaps::new(4, M, 16),
        );
        let mut arp = FakeNeighbours::all();
        arp.macs.remove(&12);
        arp.no_route.push(13);
        assert!(core.on_next_hops(arp.batch(&core)));
        core.reconcile().unwrap();
        core.assert_true_and_safe();
        for (b, why) in [
            (12, "no ARP answer from 198.18.0.12 on eth0"),
            (
                13,
                "no route to 198.18.0.13: Network is unreachable (os error 101)",
            ),
        ] {
            let v = core.backend(b);
            assert_eq!((v.health, v.slots), (Health::Unresolved, 0), "{b}");
            assert_eq!(v.next_hop_error.as_deref(), Some(why));
            // Its entry stays, unusable: its flows are re-steered.
            assert!(!entry_of(&core, b).is_usable());
        }
        assert_eq!(core.backend(11).slots, M);
        // Asked again (a health check re-triggers ARP): the failure stays
        // the reason until an answer comes.
        let a12 = ip4(198, 18, 0, 12);
        let mut r = arp.resolution(a12);
        r.neighbour = Neighbour::Resolving;
        assert!(!core.on_next_hops(vec![(a12, r)]));
        assert_eq!(
            core.backend(12).next_hop_error.as_deref(),
            Some("no ARP answer from 198.18.0.12 on eth0")
        );
    }

    #[test]
    fn a_pending_answer_keeps_the_known_next_hop() {
        let mut core = started(config(&[(11, 1), (12, 1)]), FakeMaps::new(4, M, 16));
        let mut r = FakeNeighbours::all().resolution(ip4(198, 18, 0, 12));
        // The kernel dropped the entry (or re-asks): nothing is known to be
        // wrong with the MAC the backend has.
        r.neighbour = Neighbour::Resolving;
        assert!(!core.on_next_hops(vec![(ip4(198, 18, 0, 12), r)]));
        let b = core.backend(12);
        assert_eq!((b.health, b.next_hop_error), (Health::Up, None));
        assert!(b.slots > 0);
    }

    #[test]
    fn a_recreated_egress_interface_gets_its_tx_port_and_the_new_ifindex() {
        let mut core = started(config(&[(11, 1), (12, 1)]), FakeMaps::new(4, M, 16));
        // Deleted: its route is gone.
        let mut gone = FakeNeighbours::all();
        gone.no_route = vec![11, 12];
        assert!(core.on_next_hops(gone.batch(&core)));
        core.reconcile().unwrap();
        core.assert_true_and_safe();
        assert!(core.backends().iter().all(|b| b.slots == 0));
        // Re-created under another index.
        let mut again = FakeNeighbours::all();
        again.ifindex = 9;
        assert!(core.on_next_hops(again.batch(&core)));
        core.reconcile().unwrap();
        core.assert_true_and_safe();
        assert!(core.maps.tx_ports.contains(&9));
        assert_eq!(entry_of(&core, 11).ifindex, 9);
        assert!(
            core.backends()
                .iter()
                .all(|b| b.slots > 0 && b.health == Health::Up)
        );
    }

    #[test]
    fn a_mac_override_changed_in_the_file_applies_on_reload() {
        let mut cfg = config(&[(11, 1), (12, 1)]);
        cfg.vips[0].backends[1].mac = Some([2, 0, 0, 0, 0, 0x77]);
        let mut core = started(cfg.clone(), FakeMaps::new(4, M, 16));
        assert_eq!(entry_of(&core, 12).dst_mac, [2, 0, 0, 0, 0, 0x77]);
        let addr = ip4(198, 18, 0, 12);
        assert_eq!(
            core.wanted_next_hops().get(&addr).map(|n| n.arp),
            Some(false),
            "no ARP"
        );
        cfg.vips[0].backends[1].mac = Some([2, 0, 0, 0, 0, 0x78]);
        core.apply_reload(cfg.clone()).unwrap();
        core.after_change().unwrap();
        core.assert_true_and_safe();
        assert_eq!(entry_of(&core, 12).dst_mac, [2, 0, 0, 0, 0, 0x78]);
        // Dropped from the file: the neighbour table's MAC again.
        cfg.vips[0].backends[1].mac = None;
        core.apply_reload(cfg).unwrap();
        core.after_change().unwrap();
        core.assert_true_and_safe();
        assert_eq!(entry_of(&core, 12).dst_mac, [2, 0, 0, 0, 0, 12]);
        assert_eq!(
            core.wanted_next_hops().get(&addr).map(|n| n.arp),
            Some(true)
        );
    }

    #[test]
    fn a_backend_added_at_a_known_address_gets_its_next_hop_at_once() {
        let mut core = started(
            super::super::state::tests::config(&[(1, &[(11, 1)]), (2, &[(12, 1)])], "none"),
            FakeMaps::new(4, M, 16),
        );
        // 12 is known (VIP 2's backend); VIP 1 gains it, no new answer.
        let mut cfg = core.file.clone();
        let b12 = cfg.vips[1].backends[0].clone();
        cfg.vips[0].backends.push(b12);
        core.apply_reload(cfg).unwrap();
        core.after_change().unwrap();
        core.assert_true_and_safe();
        let v1: Vec<BackendView> = core
            .backends()
            .into_iter()
            .filter(|b| b.vip == "v1")
            .collect();
        assert_eq!(v1.len(), 2);
        assert!(
            v1.iter().all(|b| b.health == Health::Up && b.slots > 0),
            "{v1:?}"
        );
    }

    const GATEWAY: IpAddr = ip4(198, 18, 0, 1);
    const GATEWAY_MAC: [u8; 6] = [2, 0, 0, 0, 0, 0x01];
    const ROUTE_SRC: IpAddr = ip4(198, 18, 0, 10);
    const ROUTE_SRC_V4: Ipv4Addr = Ipv4Addr::new(198, 18, 0, 10);

    /// What the follower reports when every backend is routed through
    /// [`GATEWAY`] (known by ARP), the route's source being `source`.
    fn routed_batch(core: &Core<FakeMaps>, source: Option<IpAddr>) -> Batch {
        core.wanted_next_hops()
            .keys()
            .map(|&a| {
                (
                    a,
                    Resolution {
                        egress: Ok(Egress {
                            iface: "eth0".into(),
                            ifindex: 2,
                            gateway: Some(GATEWAY),
                            mac: [2, 0, 0, 0, 0, 0xfe],
                            source,
                        }),
                        neighbour: Neighbour::Known(GATEWAY_MAC),
                    },
                )
            })
            .collect()
    }

    /// `cfg` with VIP 0 forwarded in `mode`.
    fn with_mode(mut cfg: Config, mode: crate::config::Forwarding) -> Config {
        cfg.vips[0].forwarding = mode;
        cfg
    }

    fn vip_info(core: &Core<FakeMaps>) -> lb_common::VipInfo {
        core.image.vips[&VipId::of(&core.cfg.vips[0]).kernel_key()]
    }

    fn reload(core: &mut Core<FakeMaps>, cfg: Config) {
        core.apply_reload(cfg).unwrap();
        core.after_change().unwrap();
        core.assert_true_and_safe();
    }

    #[test]
    fn routed_backends_are_refused_for_dsr_and_reached_through_the_gateway_when_tunnelled() {
        use crate::config::Forwarding;
        let dsr = config(&[(11, 1), (12, 1)]);
        let mut core = started(dsr.clone(), FakeMaps::new(4, M, 16));
        core.on_next_hops(routed_batch(&core, Some(ROUTE_SRC)));
        core.reconcile().unwrap();
        core.assert_true_and_safe();
        for b in [11, 12] {
            let v = core.backend(b);
            assert_eq!(v.health, Health::Unresolved);
            assert!(
                v.next_hop_error
                    .as_deref()
                    .unwrap()
                    .contains("through gateway 198.18.0.1"),
                "{v:?}"
            );
        }

        // The same file in ipip: applied by a reload; both backends are
        // reached through the gateway's MAC, with the route's source.
        reload(&mut core, with_mode(dsr.clone(), Forwarding::Ipip));
        assert_eq!(vip_info(&core).forwarding, lb_common::FORWARD_IPIP);
        for b in [11, 12] {
            let v = core.backend(b);
            assert_eq!(v.health, Health::Up, "{v:?}");
            assert_eq!(v.gateway, Some(GATEWAY));
            assert_eq!(v.mac.as_deref(), Some("02:00:00:00:00:01"));
            assert!(v.slots > 0);
            let e = entry_of(&core, b);
            assert_eq!(e.dst_mac, GATEWAY_MAC);
            assert_eq!(e.encap_src, ROUTE_SRC_V4.to_bits().to_be());
        }
        let vips: Vec<crate::control::VipView> =
            serde_json::from_value(core.ask(Request::VipList).unwrap().data).unwrap();
        assert_eq!(vips[0].forwarding, Forwarding::Ipip);

        // gue with an operator's outer source and port.
        let mut gue = with_mode(dsr.clone(), Forwarding::Gue);
        gue.agent.encap.source_v4 = Some(Ipv4Addr::new(198, 18, 0, 99));
        gue.agent.encap.gue_port = 7000;
        reload(&mut core, gue);
        let info = vip_info(&core);
        assert_eq!(
            (info.forwarding, u16::from_be(info.gue_port)),
            (lb_common::FORWARD_GUE, 7000)
        );
        assert_eq!(
            entry_of(&core, 11).encap_src,
            Ipv4Addr::new(198, 18, 0, 99).to_bits().to_be()
        );
        let src: SocketAddr = "198.18.1.1:40000".parse().unwrap();
        let e: ExplainView = explain_tcp(&core, src, "198.19.0.1:80".parse().unwrap());
        let outer = e.outer.expect("a tunnelled flow shows its outer header");
        assert_eq!(outer.src, ip4(198, 18, 0, 99));
        assert_eq!(Some(outer.dst), e.backend);
        assert_eq!(outer.src_port, Some(lb_common::gue_source_port(e.hash)));
        assert_eq!(outer.dst_port, Some(7000));

        // Back to DSR at L2: routed backends leave the ring again.
        reload(&mut core, dsr);
        assert_eq!(vip_info(&core).forwarding, lb_common::FORWARD_DSR_L2);
        assert_eq!(core.backend(11).health, Health::Unresolved);
        assert_eq!(core.backend(11).slots, 0);
    }

    #[test]
    fn a_mode_change_keeps_ids_and_ring_and_needs_an_outer_source() {
        use crate::config::Forwarding;
        let dsr = config(&[(11, 1), (12, 1)]);
        let mut core = started(dsr.clone(), FakeMaps::new(4, M, 16));
        let ring_before = core
            .image
            .ring(&VipId::of(&core.cfg.vips[0]).kernel_key())
            .unwrap()
            .to_vec();
        let id11 = core.backend(11).id;
        assert_eq!(entry_of(&core, 11).encap_src, 0, "DSR: no outer source");
        let writes = core.maps.writes;
        reload(&mut core, with_mode(dsr.clone(), Forwarding::Gue));
        assert_eq!(core.backend(11).id, id11);
        assert_eq!(
            core.image
                .ring(&VipId::of(&core.cfg.vips[0]).kernel_key())
                .unwrap(),
            ring_before.as_slice(),
            "the ring does not move"
        );
        // Two backend entries gain their outer source, then the VIP entry
        // (and its address marker, a copy) switch: four writes, no ring
        // slot.
        assert_eq!(core.maps.writes - writes, 4);
        assert_eq!(
            entry_of(&core, 11).encap_src,
            ROUTE_SRC_V4.to_bits().to_be(),
            "on-link: the egress interface's address"
        );
        // Without a source from the route or the operator: out, with why.
        let mut batch = FakeNeighbours::all().batch(&core);
        for (_, r) in &mut batch {
            if let Ok(e) = &mut r.egress {
                e.source = None;
            }
        }
        core.on_next_hops(batch);
        core.reconcile().unwrap();
        core.assert_true_and_safe();
        let v = core.backend(11);
        assert_eq!(v.health, Health::Unresolved);
        assert!(
            v.next_hop_error
                .unwrap()
                .contains("set [agent] encap_source_v4"),
            "clear reason"
        );
    }

    /// `lb explain SRC DST tcp` as the core answers it.
    fn explain_tcp(core: &Core<FakeMaps>, src: SocketAddr, dst: SocketAddr) -> ExplainView {
        let h = core
            .ask(Request::Explain {
                src,
                dst,
                protocol: Protocol::Tcp,
            })
            .unwrap();
        serde_json::from_value(h.data).unwrap()
    }

    #[test]
    fn explain_follows_conntrack_then_the_ring() {
        let mut core = started(config(&[(11, 1), (12, 1)]), FakeMaps::new(4, M, 16));
        let src: SocketAddr = "198.18.1.1:40000".parse().unwrap();
        let dst: SocketAddr = "198.19.0.1:80".parse().unwrap();
        let explain = |core: &Core<FakeMaps>| explain_tcp(core, src, dst);
        let e = explain(&core);
        assert_eq!(e.reason, "new flow: Maglev ring slot");
        let ring_backend = e.ring_backend.unwrap();
        let other = if crate::keys::last_octet(ring_backend) == 11 {
            12
        } else {
            11
        };
        let (IpAddr::V4(s), IpAddr::V4(d)) = (src.ip(), dst.ip()) else {
            unreachable!()
        };
        let key = FlowKey::new(s.to_bits(), src.port(), d.to_bits(), 80, 6);
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
        assert_eq!(
            core.backend(crate::keys::last_octet(ring_backend)).flows,
            Some(0)
        );
        let e = explain(&core);
        assert_eq!(e.backend, Some(ip4(198, 18, 0, other)));
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
