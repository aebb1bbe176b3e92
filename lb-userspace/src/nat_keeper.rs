//! The flow keeper's NAT pass: removes NAT pairs that are over and counts
//! the live ones per backend.
//!
//! The kernel never expires a NAT pair (NAT_FWD/NAT_REV and their IPv6
//! twins are hash maps, not LRUs: a live flow is never evicted); this
//! pass does, with the rule the kernel applies to reclaim a port
//! ([`nat_pair_expired`]: both directions idle past the flow's timeout).
//! Each pass reads NAT_REV(6) and NAT_FWD(6) with batched lookups (the
//! reverse map first: a pair being created has its reverse entry first,
//! so a forward entry read second finds its partner), joins them in
//! memory (the reverse key of a forward entry is the backend's reply:
//! backend addr:port → SNAT addr:port), then deletes at most
//! [`MAX_REMOVALS_PER_PASS`] pairs, each re-read just before (a packet
//! may have refreshed it since the walk), reverse entry first so that no
//! reply finds a forward-less pair, and reverse entries whose forward
//! entry is gone once they are idle past their own timeout (orphans).

use std::{
    collections::{BTreeMap, HashMap},
    hash::Hash,
    net::Ipv6Addr,
    os::fd::{AsFd as _, BorrowedFd},
    path::Path,
};

use aya::maps::{HashMap as BpfHashMap, Map, MapData, MapError};
use lb_common::{
    FlowEntry, FlowKey, FlowKey6, Runtime, map_names,
    nat::{NatFwd, NatRev, nat_pair_expired},
};

use crate::flow_keeper::for_each_entry;

/// Removals (pairs and orphans) per pass at most: a pass's work stays
/// bounded however many flows ended at once; the rest go next pass.
pub const MAX_REMOVALS_PER_PASS: usize = 65_536;

/// A NAT map key: FlowKey (NAT_FWD, NAT_REV) or FlowKey6 (the IPv6 maps).
pub trait NatKey: Copy + Eq + Hash + aya::Pod {
    const FWD: &'static str;
    const REV: &'static str;
    const ZERO: Self;
    /// The key of the backend's replies to the flow `fwd` records.
    fn reverse_of(fwd: &NatFwd, proto: u32) -> Self;
    fn proto(&self) -> u32;
}

impl NatKey for FlowKey {
    const FWD: &'static str = map_names::NAT_FWD;
    const REV: &'static str = map_names::NAT_REV;
    const ZERO: Self = FlowKey::new(0, 0, 0, 0, 0);

    fn reverse_of(fwd: &NatFwd, proto: u32) -> Self {
        // Wire order throughout, as the kernel builds it.
        FlowKey {
            src_addr: fwd.backend_addr[0],
            dst_addr: fwd.snat_addr[0],
            src_port: fwd.backend_port,
            dst_port: fwd.snat_port,
            proto,
        }
    }

    fn proto(&self) -> u32 {
        self.proto
    }
}

impl NatKey for FlowKey6 {
    const FWD: &'static str = map_names::NAT_FWD6;
    const REV: &'static str = map_names::NAT_REV6;
    const ZERO: Self = FlowKey6::new(Ipv6Addr::UNSPECIFIED, 0, Ipv6Addr::UNSPECIFIED, 0, 0);

    fn reverse_of(fwd: &NatFwd, proto: u32) -> Self {
        FlowKey6 {
            src_addr: fwd.backend_addr,
            dst_addr: fwd.snat_addr,
            src_port: fwd.backend_port,
            dst_port: fwd.snat_port,
            proto,
        }
    }

    fn proto(&self) -> u32 {
        self.proto
    }
}

/// What one family's maps call for at `rt`: no I/O.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct SweepPlan<K> {
    /// Pairs that are over: (forward key, reverse key).
    pub expired: Vec<(K, K)>,
    /// Reverse entries without a forward entry, idle past their timeout.
    pub orphans: Vec<K>,
    /// Backend id → live pairs naming it.
    pub live_per_backend: BTreeMap<u32, u64>,
    /// Backend id → live pairs whose client has not sent a FIN or RST
    /// (what least connections counts).
    pub open_per_backend: BTreeMap<u32, u64>,
    /// Live pairs.
    pub live: u64,
}

/// Whether a reverse entry with no forward entry is over by its own
/// timestamp.
pub fn orphan_expired(key_proto: u32, rev: &NatRev, rt: &Runtime) -> bool {
    FlowEntry {
        backend_id: rev.backend_id,
        flags: rev.flags,
        last_seen_ms: rev.last_seen_ms,
    }
    .is_expired(key_proto, rt)
}

/// Decides, from a walk of both maps, which pairs and orphans go and
/// which flows are live (`rev` is consumed: its entries are matched off).
pub fn plan<K: NatKey>(
    fwd: &[(K, NatFwd)],
    mut rev: HashMap<K, NatRev>,
    rt: &Runtime,
) -> SweepPlan<K> {
    let mut plan = SweepPlan {
        expired: Vec::new(),
        orphans: Vec::new(),
        live_per_backend: BTreeMap::new(),
        open_per_backend: BTreeMap::new(),
        live: 0,
    };
    for (k, f) in fwd {
        let rk = K::reverse_of(f, k.proto());
        // Taken out: what is left at the end has no forward entry.
        let r = rev.remove(&rk);
        if nat_pair_expired(f, r.as_ref(), k.proto(), rt) {
            plan.expired.push((*k, rk));
        } else {
            plan.live += 1;
            *plan.live_per_backend.entry(f.backend_id).or_default() += 1;
            if f.flags & lb_common::FLOW_FLAG_CLOSING == 0 {
                *plan.open_per_backend.entry(f.backend_id).or_default() += 1;
            }
        }
    }
    for (rk, r) in &rev {
        if orphan_expired(rk.proto(), r, rt) {
            plan.orphans.push(*rk);
        }
    }
    plan
}

/// What a pass did.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct NatSweep {
    /// Backend id → live NAT flows naming it (both families).
    pub live_per_backend: BTreeMap<u32, u64>,
    /// Backend id → those of them the client has not closed.
    pub open_per_backend: BTreeMap<u32, u64>,
    /// Live NAT flows (both families).
    pub live: u64,
    /// NAT_FWD + NAT_FWD6 and NAT_REV + NAT_REV6 entries after the pass.
    pub fwd_entries: u64,
    pub rev_entries: u64,
    /// Pairs and orphans removed.
    pub removed_pairs: u64,
    pub removed_orphans: u64,
}

/// The four NAT maps, opened from their pins (or borrowed from the loaded
/// object).
pub struct NatMaps {
    pub fwd: Map,
    pub rev: Map,
    pub fwd6: Map,
    pub rev6: Map,
}

impl NatMaps {
    /// Opens the maps pinned in `pin_dir`.
    pub fn open(pin_dir: &Path) -> anyhow::Result<Self> {
        let open = |name: &str| {
            let path = pin_dir.join(name);
            MapData::from_pin(&path)
                .map(Map::HashMap)
                .map_err(|e| anyhow::anyhow!("opening {}: {e}", path.display()))
        };
        Ok(Self {
            fwd: open(map_names::NAT_FWD)?,
            rev: open(map_names::NAT_REV)?,
            fwd6: open(map_names::NAT_FWD6)?,
            rev6: open(map_names::NAT_REV6)?,
        })
    }

    /// One pass over both families at `rt`.
    pub fn sweep(&mut self, rt: &Runtime) -> anyhow::Result<NatSweep> {
        let mut out = NatSweep::default();
        let mut budget = MAX_REMOVALS_PER_PASS;
        sweep_family::<FlowKey>(&mut self.fwd, &mut self.rev, rt, &mut budget, &mut out)?;
        sweep_family::<FlowKey6>(&mut self.fwd6, &mut self.rev6, rt, &mut budget, &mut out)?;
        Ok(out)
    }
}

fn fd(map: &Map) -> anyhow::Result<BorrowedFd<'_>> {
    match map {
        Map::HashMap(d) => Ok(d.fd().as_fd()),
        _ => anyhow::bail!("not a hash map"),
    }
}

/// `Ok(None)` for a missing key.
fn get<K: aya::Pod, V: aya::Pod>(
    map: &BpfHashMap<&mut MapData, K, V>,
    key: &K,
) -> Result<Option<V>, MapError> {
    match map.get(key, 0) {
        Ok(v) => Ok(Some(v)),
        Err(MapError::KeyNotFound) => Ok(None),
        Err(e) => Err(e),
    }
}

/// Deletes `key`; one already gone (the kernel reclaimed it) is fine.
fn remove<K: aya::Pod, V: aya::Pod>(
    map: &mut BpfHashMap<&mut MapData, K, V>,
    key: &K,
) -> Result<bool, MapError> {
    match map.remove(key) {
        Ok(()) => Ok(true),
        Err(MapError::SyscallError(e)) if e.io_error.raw_os_error() == Some(libc::ENOENT) => {
            Ok(false)
        }
        Err(e) => Err(e),
    }
}

fn sweep_family<K: NatKey>(
    fwd_map: &mut Map,
    rev_map: &mut Map,
    rt: &Runtime,
    budget: &mut usize,
    out: &mut NatSweep,
) -> anyhow::Result<()> {
    // Reverse first: see the module doc.
    let mut rev: HashMap<K, NatRev> = HashMap::new();
    for_each_entry(fd(rev_map)?, K::REV, K::ZERO, NatRev::default(), |k, v| {
        rev.insert(*k, *v);
    })?;
    let mut fwd: Vec<(K, NatFwd)> = Vec::new();
    for_each_entry(fd(fwd_map)?, K::FWD, K::ZERO, NatFwd::default(), |k, v| {
        fwd.push((*k, *v));
    })?;
    let rev_len = rev.len() as u64;
    let p = plan(&fwd, rev, rt);
    let mut fwd_entries = fwd.len() as u64;
    let mut rev_entries = rev_len;
    let err = |name: &'static str| move |e: MapError| anyhow::anyhow!("{name}: {e}");
    let mut fwd_map: BpfHashMap<&mut MapData, K, NatFwd> =
        BpfHashMap::try_from(fwd_map).map_err(err(K::FWD))?;
    let mut rev_map: BpfHashMap<&mut MapData, K, NatRev> =
        BpfHashMap::try_from(rev_map).map_err(err(K::REV))?;
    for (fk, rk) in p.expired {
        if *budget == 0 {
            break;
        }
        // Re-read: a packet since the walk keeps the pair.
        let Some(f) = get(&fwd_map, &fk).map_err(err(K::FWD))? else {
            continue;
        };
        let r = get(&rev_map, &rk).map_err(err(K::REV))?;
        if !nat_pair_expired(&f, r.as_ref(), fk.proto(), rt) {
            continue;
        }
        *budget -= 1;
        if r.is_some() && remove(&mut rev_map, &rk).map_err(err(K::REV))? {
            rev_entries -= 1;
        }
        if remove(&mut fwd_map, &fk).map_err(err(K::FWD))? {
            fwd_entries -= 1;
            out.removed_pairs += 1;
        }
    }
    for rk in p.orphans {
        if *budget == 0 {
            break;
        }
        let Some(r) = get(&rev_map, &rk).map_err(err(K::REV))? else {
            continue;
        };
        if !orphan_expired(rk.proto(), &r, rt) {
            continue;
        }
        *budget -= 1;
        if remove(&mut rev_map, &rk).map_err(err(K::REV))? {
            rev_entries -= 1;
            out.removed_orphans += 1;
        }
    }
    for (id, n) in p.live_per_backend {
        *out.live_per_backend.entry(id).or_default() += n;
    }
    for (id, n) in p.open_per_backend {
        *out.open_per_backend.entry(id).or_default() += n;
    }
    out.live += p.live;
    out.fwd_entries += fwd_entries;
    out.rev_entries += rev_entries;
    Ok(())
}

#[cfg(test)]
mod tests {
    use std::net::Ipv4Addr;

    use lb_common::{FLOW_FLAG_CLOSING, IPPROTO_TCP, IPPROTO_UDP};

    use super::*;

    const RT: Runtime = Runtime {
        now_ms: 100_000,
        udp_idle_ms: 30_000,
        tcp_idle_ms: 60_000,
        tcp_closing_ms: 5_000,
        max_l3_len: 0,
        nat_port_min: 61000,
        nat_port_max: 65535,
        syn_guard: 0,
    };

    fn w(a: [u8; 4]) -> u32 {
        u32::from(Ipv4Addr::from(a)).to_be()
    }

    /// Client 198.18.0.<c>:<cport> → VIP, given SNAT 198.18.1.1:<sport>
    /// to backend 198.18.2.<b>:8080; both directions last seen at the
    /// given times (None: no reverse entry).
    /// A forward entry and, maybe, its reverse entry.
    type Pair = ((FlowKey, NatFwd), Option<(FlowKey, NatRev)>);

    fn pair(
        c: u8,
        sport: u16,
        b: u8,
        proto: u8,
        fwd_seen: u64,
        rev_seen: Option<(u64, u32)>,
    ) -> Pair {
        let key = FlowKey::new(
            u32::from(Ipv4Addr::new(198, 18, 0, c)),
            40000,
            u32::from(Ipv4Addr::new(198, 19, 0, 1)),
            80,
            proto,
        );
        let fwd = NatFwd {
            snat_addr: [w([198, 18, 1, 1]), 0, 0, 0],
            backend_addr: [w([198, 18, 2, b]), 0, 0, 0],
            backend_id: b.into(),
            snat_port: sport.to_be(),
            backend_port: 8080u16.to_be(),
            last_seen_ms: fwd_seen,
            ..NatFwd::default()
        };
        let rev = rev_seen.map(|(seen, flags)| {
            // The reply as the kernel sees it, built independently.
            let rk = FlowKey::new(
                u32::from(Ipv4Addr::new(198, 18, 2, b)),
                8080,
                u32::from(Ipv4Addr::new(198, 18, 1, 1)),
                sport,
                proto,
            );
            (
                rk,
                NatRev {
                    backend_id: b.into(),
                    last_seen_ms: seen,
                    flags,
                    ..NatRev::default()
                },
            )
        });
        ((key, fwd), rev)
    }

    fn maps(pairs: &[Pair]) -> (Vec<(FlowKey, NatFwd)>, HashMap<FlowKey, NatRev>) {
        let fwd = pairs.iter().map(|p| p.0).collect();
        let rev = pairs.iter().filter_map(|p| p.1).collect();
        (fwd, rev)
    }

    #[test]
    fn a_pair_goes_only_when_both_directions_are_idle() {
        let (tcp, udp) = (IPPROTO_TCP, IPPROTO_UDP);
        let pairs = [
            // UDP: idle forward, fresh replies: live (a one-way stream).
            pair(1, 61001, 11, udp, 10_000, Some((95_000, 0))),
            // UDP: both idle 31 s: over.
            pair(2, 61002, 11, udp, 69_000, Some((69_000, 0))),
            // TCP: idle 50 s, open: live.
            pair(3, 61003, 12, tcp, 50_000, Some((50_000, 0))),
            // TCP: a FIN came back 6 s ago: over (closing timeout 5 s).
            pair(4, 61004, 12, tcp, 94_000, Some((94_000, FLOW_FLAG_CLOSING))),
            // No reverse entry and the forward one idle: over.
            pair(5, 61005, 13, udp, 60_000, None),
            // No reverse entry yet, forward fresh: live.
            pair(6, 61006, 13, udp, 99_000, None),
        ];
        let (fwd, rev) = maps(&pairs);
        let p = plan(&fwd, rev.clone(), &RT);
        let gone: Vec<u8> = p
            .expired
            .iter()
            .map(|(k, _)| Ipv4Addr::from(u32::from_be(k.src_addr)).octets()[3])
            .collect();
        assert_eq!(gone, vec![2, 4, 5]);
        // Each expired pair names its own reverse entry.
        for (fk, rk) in &p.expired {
            let i = fwd.iter().position(|(k, _)| k == fk).unwrap();
            if let Some((want, _)) = pairs[i].1 {
                assert_eq!(*rk, want);
            }
        }
        assert_eq!(p.live, 3);
        assert_eq!(
            p.live_per_backend,
            BTreeMap::from([(11, 1), (12, 1), (13, 1)])
        );
        assert!(p.orphans.is_empty(), "{:?}", p.orphans);
    }

    #[test]
    fn a_reverse_entry_without_its_forward_entry_goes_once_idle() {
        let (_, stale) = pair(1, 61001, 11, IPPROTO_UDP, 0, Some((60_000, 0)));
        let (_, fresh) = pair(2, 61002, 11, IPPROTO_UDP, 0, Some((99_000, 0)));
        let rev: HashMap<FlowKey, NatRev> = [stale.unwrap(), fresh.unwrap()].into_iter().collect();
        let p = plan::<FlowKey>(&[], rev, &RT);
        assert_eq!(p.orphans, vec![stale.unwrap().0]);
        assert_eq!(p.live, 0);
    }

    #[test]
    fn ipv6_pairs_find_their_reverse_entry() {
        let b: Ipv6Addr = "2001:2:0:2::10".parse().unwrap();
        let s: Ipv6Addr = "2001:2:0:1::1".parse().unwrap();
        let fwd = NatFwd {
            snat_addr: lb_common::addr6_words(s),
            backend_addr: lb_common::addr6_words(b),
            backend_id: 3,
            snat_port: 61000u16.to_be(),
            backend_port: 80u16.to_be(),
            last_seen_ms: 10_000,
            ..NatFwd::default()
        };
        let fk = FlowKey6::new(
            "2001:2::1".parse().unwrap(),
            40000,
            "2001:2::100".parse().unwrap(),
            80,
            IPPROTO_UDP,
        );
        let rk = FlowKey6::new(b, 80, s, 61000, IPPROTO_UDP);
        let rev = HashMap::from([(
            rk,
            NatRev {
                last_seen_ms: 99_000,
                ..NatRev::default()
            },
        )]);
        let p = plan(&[(fk, fwd)], rev, &RT);
        assert!(p.expired.is_empty(), "fresh replies keep it");
        assert_eq!(p.live_per_backend, BTreeMap::from([(3, 1)]));
        let idle = HashMap::from([(
            rk,
            NatRev {
                last_seen_ms: 10_000,
                ..NatRev::default()
            },
        )]);
        assert_eq!(plan(&[(fk, fwd)], idle, &RT).expired, vec![(fk, rk)]);
    }
}
