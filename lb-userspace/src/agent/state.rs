//! The desired state: from configuration, health and next hops to the
//! kernel image the maps should hold. No I/O: the agent feeds it events and
//! applies what [`State::target`] returns.

use std::{
    collections::{BTreeMap, BTreeSet},
    net::IpAddr,
};

use lb_common::{
    FIRST_BACKEND_ID, VIP_FLAG_ADDR_ONLY, VIP_FLAG_ECHO, VIP_FLAG_LIMITS, VipInfo, nat::NatSnat,
};

use crate::{
    config::{BackendState, Config, Forwarding},
    control::Health,
    datapath::{backend_address, backend_encap_source, backend_entry, set_encap_source},
    health::starts_up,
    keys::{BackendKey, VipId},
    maglev::{MaglevBackend, MaglevError, MaglevTable},
    neigh::NextHop,
    reconcile::KernelImage,
};

/// What the agent knows of one backend besides its configuration.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct BackendStatus {
    /// Index into the backend map; a local label, stable for the
    /// backend's life and across agent restarts.
    pub id: u32,
    /// What the health checks say.
    pub up: bool,
    pub last_check: Option<String>,
    pub next_hop: Option<NextHop>,
    /// Why the next hop is unknown, when it is.
    pub next_hop_error: Option<String>,
    /// A health check passed since this agent started or since the backend
    /// last went down: its `up` is confirmed, not the optimistic start
    /// state (what VIP announcement waits for).
    pub confirmed: bool,
    /// Times the health checks changed `up` since the agent started.
    pub transitions: u64,
    /// How long its passing checks took.
    pub latency: LatencyHistogram,
}

/// Upper bounds (seconds) of the health-check latency histogram's buckets
/// (the last, +Inf, is implied).
pub const LATENCY_BOUNDS: [f64; 12] = [
    0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5,
];

/// Passing health checks by duration: per bucket of [`LATENCY_BOUNDS`]
/// (and one over the last), their count and total (µs).
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct LatencyHistogram {
    pub buckets: [u64; LATENCY_BOUNDS.len() + 1],
    pub sum_us: u64,
    pub count: u64,
}

impl LatencyHistogram {
    pub fn observe(&mut self, d: std::time::Duration) {
        let s = d.as_secs_f64();
        let i = LATENCY_BOUNDS
            .iter()
            .position(|&b| s <= b)
            .unwrap_or(LATENCY_BOUNDS.len());
        self.buckets[i] += 1;
        self.sum_us += u64::try_from(d.as_micros()).unwrap_or(u64::MAX);
        self.count += 1;
    }
}

impl BackendStatus {
    fn new(id: u32, up: bool) -> Self {
        Self {
            id,
            up,
            last_check: None,
            next_hop: None,
            next_hop_error: None,
            confirmed: false,
            transitions: 0,
            latency: LatencyHistogram::default(),
        }
    }

    pub fn health(&self) -> Health {
        match (self.up, &self.next_hop) {
            (_, None) => Health::Unresolved,
            (true, Some(_)) => Health::Up,
            (false, Some(_)) => Health::Down,
        }
    }

    /// May take new flows and keep its established ones.
    pub fn is_usable(&self) -> bool {
        self.health() == Health::Up
    }
}

/// VIP indices and backend ids in use, with each backend's status.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct State {
    vip_index: BTreeMap<VipId, u32>,
    backends: BTreeMap<BackendKey, BackendStatus>,
}

impl State {
    /// Takes over the VIP indices and backend ids found in the kernel (an
    /// earlier agent's), so that conntrack entries keep naming the same
    /// backends; a backend keeps the usability it had there.
    pub fn adopt(cfg: &Config, kernel: &KernelImage) -> Self {
        let mut state = State::default();
        let mut by_index = BTreeMap::new();
        for vip in cfg.vips.iter().map(VipId::of) {
            if let Some(info) = kernel.vips.get(&vip.kernel_key()) {
                by_index.insert(info.index, vip);
                state.vip_index.insert(vip, info.index);
            }
        }
        for (&id, b) in &kernel.backends {
            if let Some(&vip) = by_index.get(&b.vip_index) {
                let address = backend_address(b);
                let mut status = BackendStatus::new(id, b.is_usable());
                // The next hop it was given stays until the kernel's
                // tables say otherwise.
                if b.ifindex != 0 && b.dst_mac != [0; 6] {
                    status.next_hop = Some(NextHop {
                        iface: String::new(),
                        ifindex: b.ifindex,
                        src_mac: b.src_mac,
                        dst_mac: b.dst_mac,
                        gateway: None,
                        encap_src: backend_encap_source(b),
                    });
                }
                state.backends.insert(BackendKey { vip, address }, status);
            }
        }
        state
    }

    /// Gives configured VIPs and backends an index or id (never one the
    /// kernel still holds) and forgets those no longer configured.
    /// `at_start`: new backends start up (the first failed checks take
    /// them out); later additions start down unless they are not checked.
    /// Returns what could not be given an id.
    pub fn sync(&mut self, cfg: &Config, kernel: &KernelImage, at_start: bool) -> Vec<String> {
        let mut problems = Vec::new();
        let mut wanted = BTreeSet::new();
        for vip in &cfg.vips {
            let vid = VipId::of(vip);
            if !self.vip_index.contains_key(&vid) {
                match self.free_vip_index(cfg, kernel) {
                    Some(i) => {
                        self.vip_index.insert(vid, i);
                    }
                    None => {
                        problems.push(format!(
                            "VIP {}: all {} VIP slots are in use",
                            vip.name, cfg.agent.kernel.max_vips
                        ));
                        continue;
                    }
                }
            }
            for b in &vip.backends {
                let key = BackendKey {
                    vip: vid,
                    address: b.address,
                };
                wanted.insert(key);
                if self.backends.contains_key(&key) {
                    continue;
                }
                let Some(id) = self.free_backend_id(cfg, kernel) else {
                    problems.push(format!(
                        "backend {} of {}: all {} backend slots are in use",
                        b.address, vip.name, cfg.agent.kernel.max_backends
                    ));
                    continue;
                };
                let up = at_start || starts_up(&b.health_check);
                self.backends.insert(key, BackendStatus::new(id, up));
            }
        }
        self.backends.retain(|k, _| wanted.contains(k));
        let live: BTreeSet<VipId> = cfg.vips.iter().map(VipId::of).collect();
        self.vip_index.retain(|k, _| live.contains(k));
        problems
    }

    fn free_vip_index(&self, cfg: &Config, kernel: &KernelImage) -> Option<u32> {
        let used: BTreeSet<u32> = self
            .vip_index
            .values()
            .copied()
            .chain(kernel.vips.values().map(|v| v.index))
            .collect();
        (0..cfg.agent.kernel.max_vips).find(|i| !used.contains(i))
    }

    fn free_backend_id(&self, cfg: &Config, kernel: &KernelImage) -> Option<u32> {
        let used: BTreeSet<u32> = self
            .backends
            .values()
            .map(|b| b.id)
            .chain(kernel.backends.keys().copied())
            .collect();
        (FIRST_BACKEND_ID..=cfg.agent.kernel.max_backends).find(|i| !used.contains(i))
    }

    /// Records a health check result; true when the backend's up/down
    /// state changed.
    pub fn record_health(&mut self, key: &BackendKey, up: bool, outcome: String) -> bool {
        let Some(b) = self.backends.get_mut(key) else {
            return false;
        };
        b.last_check = Some(outcome);
        let changed = std::mem::replace(&mut b.up, up) != up;
        b.transitions += u64::from(changed);
        changed
    }

    /// Records how long a passing check of `key` took.
    pub fn record_latency(&mut self, key: &BackendKey, d: std::time::Duration) {
        if let Some(b) = self.backends.get_mut(key) {
            b.latency.observe(d);
        }
    }

    /// Records whether a probe confirmed `key` up (`passed`: it succeeded)
    /// or took it down (`up` false); other results change nothing. True
    /// when the confirmation changed.
    pub fn record_confirmation(&mut self, key: &BackendKey, passed: bool, up: bool) -> bool {
        let Some(b) = self.backends.get_mut(key) else {
            return false;
        };
        let now = if !up { false } else { b.confirmed || passed };
        std::mem::replace(&mut b.confirmed, now) != now
    }

    /// Records how `key` is reached now, or why it cannot be (then it is
    /// out of the ring until it can). True when the next hop changed.
    pub fn set_next_hop(&mut self, key: &BackendKey, next_hop: Result<NextHop, String>) -> bool {
        let Some(b) = self.backends.get_mut(key) else {
            return false;
        };
        let (nh, error) = match next_hop {
            Ok(nh) => (Some(nh), None),
            Err(e) => (None, Some(e)),
        };
        b.next_hop_error = error;
        std::mem::replace(&mut b.next_hop, nh) != b.next_hop
    }

    /// Records why `key`'s next hop is not known yet, when it is not: a
    /// known one stays.
    pub fn note_next_hop_pending(&mut self, key: &BackendKey, why: String) {
        if let Some(b) = self.backends.get_mut(key)
            && b.next_hop.is_none()
        {
            b.next_hop_error = Some(why);
        }
    }

    /// Backends whose next hop is not known yet.
    pub fn unresolved(&self) -> Vec<BackendKey> {
        self.backends
            .iter()
            .filter(|(_, b)| b.next_hop.is_none())
            .map(|(k, _)| *k)
            .collect()
    }

    pub fn vip_index(&self, vip: &VipId) -> Option<u32> {
        self.vip_index.get(vip).copied()
    }

    pub fn backend(&self, key: &BackendKey) -> Option<&BackendStatus> {
        self.backends.get(key)
    }

    pub fn backends(&self) -> impl Iterator<Item = (&BackendKey, &BackendStatus)> {
        self.backends.iter()
    }

    /// The kernel contents `cfg` and the backends' status call for: per
    /// VIP its entry, its address marker and its Maglev ring over the
    /// usable, non-drained backends; every known backend's entry (usable
    /// or not, so its established flows can be re-steered).
    pub fn target(&self, cfg: &Config) -> Result<KernelImage, MaglevError> {
        self.target_with(cfg, &mut RingCache::default())
    }

    /// [`State::target`], rebuilding only the Maglev tables whose members
    /// differ from those `rings` last built them from.
    pub fn target_with(
        &self,
        cfg: &Config,
        rings: &mut RingCache,
    ) -> Result<KernelImage, MaglevError> {
        rings.retain(cfg);
        let mut img = KernelImage::default();
        for vip in &cfg.vips {
            let vid = VipId::of(vip);
            let Some(index) = self.vip_index(&vid) else {
                continue;
            };
            let info = VipInfo {
                index,
                ring_base: index * cfg.agent.kernel.ring_size,
                ring_size: vip.ring_size,
                flags: if vip.rate_limit.any() {
                    VIP_FLAG_LIMITS
                } else {
                    0
                },
                forwarding: vip.forwarding.kernel_value(),
                gue_port: match vip.forwarding {
                    Forwarding::Gue => cfg.agent.encap.gue_port.to_be(),
                    _ => 0,
                },
            };
            let mut members = Vec::new();
            for b in &vip.backends {
                let Some(status) = self.backends.get(&BackendKey {
                    vip: vid,
                    address: b.address,
                }) else {
                    continue;
                };
                let usable = status.is_usable();
                let (ifindex, dst, src, encap_src) = status
                    .next_hop
                    .as_ref()
                    .map(|n| (n.ifindex, n.dst_mac, n.src_mac, n.encap_src))
                    .unwrap_or_default();
                let mut entry = backend_entry(b.address, ifindex, index, usable, dst, src);
                if vip.forwarding.is_routed() {
                    set_encap_source(&mut entry, encap_src);
                }
                if vip.forwarding == Forwarding::Nat {
                    // 0: the VIP's port (the kernel keeps the packet's).
                    let port = vip.backend_port(b);
                    entry.port = if port == vip.port { 0 } else { port.to_be() };
                }
                img.backends.insert(status.id, entry);
                let weight = match b.state {
                    BackendState::Drain => 0,
                    BackendState::Active => b.weight,
                };
                if usable && weight > 0 {
                    members.push(MaglevBackend {
                        // The ring depends on addresses and weights only,
                        // never on the local ids.
                        key: maglev_key(b.address, vip.port),
                        id: status.id,
                        weight,
                    });
                }
            }
            if vip.forwarding == Forwarding::Nat {
                img.snat.insert(index, nat_snat(&vip.snat_addresses));
            }
            if vip.rate_limit.any() {
                img.rate.insert(index, vip.rate_limit.kernel());
            }
            // The scheduler's slots: the ring's members, in config order.
            let sched_members: Vec<(u32, u32)> = members.iter().map(|m| (m.id, m.weight)).collect();
            img.sched.insert(
                index,
                crate::sched::vip_sched(vip.scheduler, &sched_members),
            );
            let ring = rings.ring(vid, members, vip.ring_size)?;
            img.vips.insert(vid.kernel_key(), info);
            img.rings.insert(info.ring_base, ring);
            // The address answers pings only if every VIP at it allows it.
            let echo = if vip.icmp_echo { VIP_FLAG_ECHO } else { 0 };
            img.vips
                .entry(vid.address_key())
                .and_modify(|marker| marker.flags &= echo | VIP_FLAG_ADDR_ONLY)
                .or_insert(VipInfo {
                    flags: VIP_FLAG_ADDR_ONLY | echo,
                    ..info
                });
        }
        Ok(img)
    }
}

/// A NAT VIP's NAT_SNAT element: its SNAT addresses as on the wire
/// (count 0: each backend's route source).
pub fn nat_snat(addresses: &[IpAddr]) -> NatSnat {
    let mut snat = NatSnat::default();
    for (slot, a) in snat.addrs.iter_mut().zip(addresses) {
        *slot = match a {
            IpAddr::V4(a) => [a.to_bits().to_be(), 0, 0, 0],
            IpAddr::V6(a) => lb_common::addr6_words(*a),
        };
        snat.count += 1;
    }
    snat
}

/// A backend's Maglev key: `address << 16 | port` for IPv4 (the key the
/// rings were always built with, so an upgrade moves no slot); for IPv6
/// the 128-bit address folded to 48 bits by a fixed mix, then the port.
/// The key depends on the address only, so every agent builds the same
/// ring.
pub fn maglev_key(address: IpAddr, port: u16) -> u64 {
    let folded = match address {
        IpAddr::V4(a) => u64::from(a.to_bits()),
        IpAddr::V6(a) => {
            let bits = a.to_bits();
            let mixed = crate::maglev::splitmix64((bits >> 64) as u64)
                ^ crate::maglev::splitmix64(bits as u64 ^ 0x9e37_79b9_7f4a_7c15);
            // Above 2^32: never equal to an IPv4 address's key.
            (mixed & 0xffff_ffff_ffff) | (1 << 47)
        }
    };
    (folded << 16) | u64::from(port)
}

/// Maglev tables by VIP with the members and size they were built from,
/// so that a new target rebuilds only the tables of VIPs whose members
/// (address, id, weight of each usable, active backend) changed.
#[derive(Clone, Debug, Default)]
pub struct RingCache {
    tables: BTreeMap<VipId, (u32, Vec<MaglevBackend>, Vec<u32>)>,
    builds: u64,
}

impl RingCache {
    /// Tables built so far (not taken from the cache).
    pub fn builds(&self) -> u64 {
        self.builds
    }

    fn ring(
        &mut self,
        vip: VipId,
        members: Vec<MaglevBackend>,
        size: u32,
    ) -> Result<Vec<u32>, MaglevError> {
        if let Some((s, m, slots)) = self.tables.get(&vip)
            && *s == size
            && *m == members
        {
            return Ok(slots.clone());
        }
        let slots = MaglevTable::build(&members, size)?.slots().to_vec();
        self.builds += 1;
        self.tables.insert(vip, (size, members, slots.clone()));
        Ok(slots)
    }

    /// Forgets the tables of VIPs `cfg` no longer has.
    fn retain(&mut self, cfg: &Config) {
        let live: BTreeSet<VipId> = cfg.vips.iter().map(VipId::of).collect();
        self.tables.retain(|v, _| live.contains(v));
    }
}

#[cfg(test)]
pub(crate) mod tests {
    #[allow(unused_imports)]
    use std::net::{IpAddr, Ipv4Addr};

    #[allow(unused_imports)]
    use crate::keys::ip4;
    use std::path::Path;

    use lb_common::NO_BACKEND;

    use super::*;
    use crate::reconcile::{self, check_invariant};

    const M: u32 = 251;

    /// A config: one VIP per entry, each with backends 198.18.0.<b> of the
    /// given weight (0 = drained) and health check kind `check`.
    pub(crate) fn config(vips: &[(u8, &[(u8, u32)])], check: &str) -> Config {
        let mut text = format!("[agent]\nmax_vips = 4\nmax_backends = 16\nring_size = {M}\n");
        for &(v, backends) in vips {
            text += &format!(
                "[[vip]]\nname = \"v{v}\"\naddress = \"198.19.0.{v}\"\nport = 80\nprotocol = \"tcp\"\nring_size = {M}\n[vip.health_check]\nkind = \"{check}\"\n"
            );
            for &(b, w) in backends {
                let (weight, state) = if w == 0 { (1, "drain") } else { (w, "active") };
                text += &format!(
                    "[[vip.backend]]\naddress = \"198.18.0.{b}\"\nweight = {weight}\nstate = \"{state}\"\n"
                );
            }
        }
        Config::parse(&text, Path::new("test.toml")).unwrap_or_else(|e| panic!("{e}\n{text}"))
    }

    fn key(v: u8, b: u8) -> BackendKey {
        BackendKey {
            vip: VipId {
                address: ip4(198, 19, 0, v),
                port: 80,
                protocol: crate::config::Protocol::Tcp,
            },
            address: ip4(198, 18, 0, b),
        }
    }

    pub(crate) fn next_hop(b: u8) -> NextHop {
        NextHop {
            iface: "eth0".into(),
            ifindex: 2,
            src_mac: [2, 0, 0, 0, 0, 1],
            dst_mac: [2, 0, 0, 0, 0, b],
            gateway: None,
            encap_src: None,
        }
    }

    /// A state for `cfg` starting from `kernel`, every backend resolved.
    fn resolved(cfg: &Config, kernel: &KernelImage) -> State {
        let mut s = State::adopt(cfg, kernel);
        assert!(s.sync(cfg, kernel, true).is_empty());
        for k in s.unresolved() {
            s.set_next_hop(&k, Ok(next_hop(crate::keys::last_octet(k.address))));
        }
        s
    }

    /// Ring slots per backend address of VIP `v`.
    fn shares(img: &KernelImage, v: u8) -> BTreeMap<u8, usize> {
        let vid = key(v, 0).vip;
        let mut out = BTreeMap::new();
        for &id in img.ring(&vid.kernel_key()).expect("VIP installed") {
            let b = if id == NO_BACKEND {
                0
            } else {
                Ipv4Addr::from(u32::from_be(img.backends[&id].addr)).octets()[3]
            };
            *out.entry(b).or_default() += 1;
        }
        out
    }

    #[test]
    fn ids_are_stable_across_restarts_whatever_the_config_order() {
        let cfg = config(
            &[(1, &[(11, 1), (12, 1), (13, 1)]), (2, &[(11, 1), (21, 1)])],
            "tcp",
        );
        let first = resolved(&cfg, &KernelImage::default());
        let kernel = first.target(&cfg).unwrap();
        // The next agent reads the kernel back, with VIPs and backends
        // listed in another order.
        let reordered = config(
            &[(2, &[(21, 1), (11, 1)]), (1, &[(13, 1), (11, 1), (12, 1)])],
            "tcp",
        );
        let second = resolved(&reordered, &kernel);
        for (k, b) in first.backends() {
            assert_eq!(second.backend(k).map(|s| s.id), Some(b.id), "{k}");
        }
        assert_eq!(
            second.target(&reordered).unwrap(),
            kernel,
            "nothing to write after a restart"
        );
    }

    /// The backend address (last octet; 0 for an empty slot) in each ring
    /// slot of VIP `v`.
    fn ring_addresses(img: &KernelImage, v: u8) -> Vec<u8> {
        let vid = key(v, 0).vip;
        img.ring(&vid.kernel_key())
            .expect("VIP installed")
            .iter()
            .map(|&id| {
                if id == NO_BACKEND {
                    0
                } else {
                    Ipv4Addr::from(u32::from_be(img.backends[&id].addr)).octets()[3]
                }
            })
            .collect()
    }

    #[test]
    fn two_hosts_with_the_same_backends_put_the_same_address_in_every_ring_slot() {
        // Scale-out: every lb host behind ECMP must send a flow to the same
        // backend. Two hosts with the same VIPs and backends, listed in
        // other orders (so their local ids differ).
        let a_cfg = config(
            &[(1, &[(11, 1), (12, 2), (13, 1)]), (2, &[(21, 1), (22, 1)])],
            "tcp",
        );
        let b_cfg = config(
            &[(2, &[(22, 1), (21, 1)]), (1, &[(13, 1), (11, 1), (12, 2)])],
            "tcp",
        );
        let mut a = resolved(&a_cfg, &KernelImage::default());
        let mut b = resolved(&b_cfg, &KernelImage::default());
        assert!(
            a.backends()
                .any(|(k, s)| b.backend(k).is_some_and(|t| t.id != s.id)),
            "the hosts' ids should differ for this test to mean something"
        );
        let same = |a: &State, b: &State| {
            let (ia, ib) = (a.target(&a_cfg).unwrap(), b.target(&b_cfg).unwrap());
            for v in [1, 2] {
                let (ra, rb) = (ring_addresses(&ia, v), ring_addresses(&ib, v));
                assert_eq!(ra.len(), M as usize);
                let differ = ra.iter().zip(&rb).filter(|(x, y)| x != y).count();
                assert_eq!(differ, 0, "VIP {v}: {differ} slots differ");
            }
        };
        same(&a, &b);
        // A backend goes down on both hosts (their own health checks), in
        // another order of events: still the same rings.
        for (s, order) in [(&mut a, [12, 21]), (&mut b, [21, 12])] {
            for x in order {
                let v = if x == 12 { 1 } else { 2 };
                s.record_health(&key(v, x), false, "down".into());
            }
        }
        same(&a, &b);
        let ia = a.target(&a_cfg).unwrap();
        assert!(!ring_addresses(&ia, 1).contains(&12) && !ring_addresses(&ia, 2).contains(&21));
    }

    #[test]
    fn check_durations_land_in_the_first_bucket_that_holds_them() {
        let mut h = LatencyHistogram::default();
        for us in [300, 500, 501, 2_000_000, 9_000_000] {
            h.observe(std::time::Duration::from_micros(us));
        }
        // 0.3 and 0.5 ms: ≤ 0.5 ms; 0.501 ms: ≤ 1 ms; 2 s: ≤ 2.5 s; 9 s: over.
        assert_eq!(h.buckets[0], 2);
        assert_eq!(h.buckets[1], 1);
        assert_eq!(h.buckets[LATENCY_BOUNDS.len() - 1], 1);
        assert_eq!(h.buckets[LATENCY_BOUNDS.len()], 1);
        assert_eq!((h.count, h.sum_us), (5, 11_001_301));
    }

    #[test]
    fn an_address_answers_echo_only_if_every_vip_at_it_allows_it() {
        let mut text = format!("[agent]\nmax_vips = 4\nmax_backends = 16\nring_size = {M}\n");
        // 198.19.0.1: two VIPs, one refusing echo; 198.19.0.2: the default.
        for (addr, port, echo) in [(1, 80, ""), (1, 81, "icmp_echo = false\n"), (2, 80, "")] {
            text += &format!(
                "[[vip]]\naddress = \"198.19.0.{addr}\"\nport = {port}\nprotocol = \"tcp\"\nring_size = {M}\n{echo}"
            );
        }
        let cfg = Config::parse(&text, Path::new("test.toml")).unwrap();
        let img = resolved(&cfg, &KernelImage::default())
            .target(&cfg)
            .unwrap();
        let marker = |a: u8| {
            img.vips[&lb_common::VipKey::addr_only(u32::from(Ipv4Addr::new(198, 19, 0, a))).into()]
        };
        assert!(marker(1).is_address_only() && !marker(1).answers_echo());
        assert!(marker(2).is_address_only() && marker(2).answers_echo());
        // Service entries never carry the flag.
        assert!(
            img.vips
                .iter()
                .all(|(_, i)| i.is_address_only() || !i.answers_echo())
        );
    }

    #[test]
    fn ids_start_at_one_and_are_not_reused_while_the_kernel_holds_them() {
        let cfg = config(&[(1, &[(11, 1), (12, 1)])], "tcp");
        let s = resolved(&cfg, &KernelImage::default());
        let ids: BTreeSet<u32> = s.backends().map(|(_, b)| b.id).collect();
        assert_eq!(ids, BTreeSet::from([1, 2]));
        // 12 is replaced by 13 while the kernel still holds 12's entry.
        let kernel = s.target(&cfg).unwrap();
        let mut s2 = s.clone();
        let cfg2 = config(&[(1, &[(11, 1), (13, 1)])], "tcp");
        assert!(s2.sync(&cfg2, &kernel, false).is_empty());
        assert_eq!(s2.backend(&key(1, 13)).unwrap().id, 3);
        assert!(s2.backend(&key(1, 12)).is_none());
    }

    #[test]
    fn down_drained_and_unresolved_backends_are_out_of_the_ring() {
        let cfg = config(&[(1, &[(11, 1), (12, 1), (13, 0), (14, 1)])], "tcp");
        let mut s = resolved(&cfg, &KernelImage::default());
        assert!(s.record_health(&key(1, 12), false, "connection refused".into()));
        s.backends.get_mut(&key(1, 14)).unwrap().next_hop = None;
        let img = s.target(&cfg).unwrap();
        let sh = shares(&img, 1);
        assert_eq!(sh.keys().copied().collect::<Vec<_>>(), vec![11], "{sh:?}");
        assert_eq!(sh[&11], M as usize);
        // Every backend keeps its entry; only the down and unresolved ones
        // are unusable (a drained one keeps its established flows).
        let usable: BTreeMap<u8, bool> = img
            .backends
            .values()
            .map(|b| {
                (
                    Ipv4Addr::from(u32::from_be(b.addr)).octets()[3],
                    b.is_usable(),
                )
            })
            .collect();
        assert_eq!(
            usable,
            BTreeMap::from([(11, true), (12, false), (13, true), (14, false)])
        );
        assert_eq!(s.backend(&key(1, 12)).unwrap().health(), Health::Down);
        assert_eq!(s.backend(&key(1, 14)).unwrap().health(), Health::Unresolved);
        check_invariant(&img).unwrap();
    }

    #[test]
    fn a_vip_with_no_usable_backend_keeps_its_entry_and_an_empty_ring() {
        let cfg = config(&[(1, &[(11, 1)])], "tcp");
        let mut s = resolved(&cfg, &KernelImage::default());
        s.record_health(&key(1, 11), false, "timeout".into());
        let img = s.target(&cfg).unwrap();
        let vid = key(1, 0).vip;
        assert!(img.vips.contains_key(&vid.kernel_key()));
        assert!(img.vips[&vid.address_key()].is_address_only());
        assert!(
            img.ring(&vid.kernel_key())
                .unwrap()
                .iter()
                .all(|&id| id == NO_BACKEND)
        );
    }

    #[test]
    fn weights_set_ring_shares() {
        let cfg = config(&[(1, &[(11, 1), (12, 2), (13, 3)])], "tcp");
        let s = resolved(&cfg, &KernelImage::default());
        let sh = shares(&s.target(&cfg).unwrap(), 1);
        for (b, w) in [(11, 1.0), (12, 2.0), (13, 3.0)] {
            let want = M as f64 * w / 6.0;
            assert!((sh[&b] as f64 - want).abs() <= 1.0, "{sh:?}");
        }
    }

    #[test]
    fn backends_added_later_start_down_unless_unchecked() {
        let cfg = config(&[(1, &[(11, 1)])], "tcp");
        let mut s = resolved(&cfg, &KernelImage::default());
        assert!(s.backend(&key(1, 11)).unwrap().up, "present at start: up");
        let kernel = s.target(&cfg).unwrap();
        let more = config(&[(1, &[(11, 1), (12, 1)])], "tcp");
        s.sync(&more, &kernel, false);
        assert!(
            !s.backend(&key(1, 12)).unwrap().up,
            "added later: down until rise"
        );
        let unchecked = config(&[(1, &[(11, 1), (12, 1)])], "none");
        let mut s = resolved(&config(&[(1, &[(11, 1)])], "none"), &KernelImage::default());
        s.sync(&unchecked, &kernel, false);
        assert!(s.backend(&key(1, 12)).unwrap().up, "kind none: always up");
    }

    #[test]
    fn adopted_backends_keep_the_usability_the_kernel_has() {
        let cfg = config(&[(1, &[(11, 1), (12, 1)])], "tcp");
        let mut s = resolved(&cfg, &KernelImage::default());
        s.record_health(&key(1, 12), false, "refused".into());
        let kernel = s.target(&cfg).unwrap();
        let again = State::adopt(&cfg, &kernel);
        assert!(again.backend(&key(1, 11)).unwrap().up);
        assert!(!again.backend(&key(1, 12)).unwrap().up);
        // And the next hop it was given, until the kernel's tables speak:
        // a restart moves no backend out of the ring.
        let nh = again
            .backend(&key(1, 11))
            .unwrap()
            .next_hop
            .clone()
            .unwrap();
        assert_eq!((nh.ifindex, nh.dst_mac), (2, [2, 0, 0, 0, 0, 11]));
        assert_eq!(again.target(&cfg).unwrap(), kernel);
    }

    #[test]
    fn full_tables_are_reported_not_overrun() {
        // 16 backends fill the ids; replacing one while the kernel still
        // holds its entry leaves no id for the new one until it is gone.
        let all: Vec<(u8, u32)> = (1..=16).map(|b| (b, 1)).collect();
        let cfg = config(&[(1, &all)], "tcp");
        let s = resolved(&cfg, &KernelImage::default());
        let kernel = s.target(&cfg).unwrap();
        let mut swapped = all.clone();
        swapped[15] = (17, 1);
        let cfg2 = config(&[(1, &swapped)], "tcp");
        let mut s2 = s.clone();
        let problems = s2.sync(&cfg2, &kernel, false);
        assert_eq!(problems.len(), 1, "{problems:?}");
        assert!(
            problems[0].contains("all 16 backend slots are in use"),
            "{problems:?}"
        );
        assert!(s2.backend(&key(1, 17)).is_none());
        // Once the kernel no longer holds backend 16, 17 gets its id.
        let after = s2.target(&cfg2).unwrap();
        assert!(s2.sync(&cfg2, &after, false).is_empty());
        assert_eq!(s2.backend(&key(1, 17)).unwrap().id, 16);
    }

    #[test]
    fn the_target_is_reached_safely_from_any_earlier_target() {
        // Through the production write path, on the fake maps.
        let cfg_a = config(&[(1, &[(11, 1), (12, 1)]), (2, &[(21, 1)])], "tcp");
        let cfg_b = config(&[(1, &[(12, 2), (13, 1)]), (3, &[(21, 1)])], "tcp");
        let mut maps = crate::fake_maps::FakeMaps::new(4, M, 16);
        let mut img = KernelImage::default();
        let mut s = resolved(&cfg_a, &img);
        for cfg in [&cfg_a, &cfg_b, &cfg_a] {
            s.sync(cfg, &img, false);
            for k in s.unresolved() {
                s.set_next_hop(&k, Ok(next_hop(crate::keys::last_octet(k.address))));
            }
            let want = s.target(cfg).unwrap();
            let ops = reconcile::plan(&img, &want);
            reconcile::execute(&mut maps, &mut img, &ops).unwrap();
            assert!(maps.violations.is_empty(), "{:?}", maps.violations);
            assert_eq!(
                reconcile::KernelMaps::read_image(&maps).unwrap().backends,
                want.backends
            );
        }
    }

    #[test]
    fn the_ring_cache_rebuilds_only_the_tables_whose_members_changed() {
        let cfg = config(&[(1, &[(11, 1), (12, 1)]), (2, &[(21, 1), (22, 1)])], "tcp");
        let mut s = resolved(&cfg, &KernelImage::default());
        let mut cache = RingCache::default();
        let check = |s: &State, cfg: &Config, cache: &mut RingCache| {
            let cached = s.target_with(cfg, cache).unwrap();
            assert_eq!(
                cached,
                s.target(cfg).unwrap(),
                "the cache changed the target"
            );
        };
        check(&s, &cfg, &mut cache);
        assert_eq!(cache.builds(), 2);
        // Nothing changed: nothing rebuilt. A last_check alone is no change.
        s.record_health(&key(1, 11), true, "TCP connect in 0.1ms".into());
        check(&s, &cfg, &mut cache);
        assert_eq!(cache.builds(), 2);
        // A backend of VIP 2 goes down: VIP 2's table only.
        assert!(s.record_health(&key(2, 22), false, "connection refused".into()));
        check(&s, &cfg, &mut cache);
        assert_eq!(cache.builds(), 3);
        // A weight change in VIP 1: VIP 1's table only.
        let cfg2 = config(&[(1, &[(11, 1), (12, 3)]), (2, &[(21, 1), (22, 1)])], "tcp");
        check(&s, &cfg2, &mut cache);
        assert_eq!(cache.builds(), 4);
        // Back up: its old table is not kept, it is built again (once).
        assert!(s.record_health(&key(2, 22), true, "TCP connect".into()));
        check(&s, &cfg2, &mut cache);
        check(&s, &cfg2, &mut cache);
        assert_eq!(cache.builds(), 5);
    }
}
