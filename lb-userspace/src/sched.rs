//! Schedulers for new flows, the agent's side: the `scheduler` key, what
//! the agent writes for each VIP (lb_common::sched: the SCHED element and
//! the VIP's slot region), the weighted round-robin sequence, and the
//! least-connections counts (the kernel's counter plus the agent's
//! correction).
//!
//! Established flows never reach a scheduler: conntrack (or the NAT pair)
//! keeps them on their backend whatever the VIP's scheduler, so changing
//! it (a reload) moves no established flow.

use std::{collections::BTreeMap, fmt, str::FromStr};

use lb_common::sched::{
    LC_MAX_BACKENDS, SCHED_LEAST_CONNECTIONS, SCHED_MAGLEV, SCHED_ROUND_ROBIN, SCHED_SLOTS_PER_VIP,
    SCHED_WEIGHTED_ROUND_ROBIN, SchedInfo, SchedSlot, lc_active,
};
use serde::{Deserialize, Serialize};

use crate::config::ParseKeywordError;

/// A VIP's `scheduler`.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash, Serialize, Deserialize)]
pub enum Scheduler {
    /// Consistent hashing on the VIP's Maglev ring: every lb host picks
    /// the same backend for a flow.
    #[default]
    #[serde(rename = "maglev")]
    Maglev,
    /// Each usable backend in turn (weights ignored).
    #[serde(rename = "round_robin")]
    RoundRobin,
    /// In turn, each backend as often as its weight says (interleaved).
    #[serde(rename = "weighted_round_robin")]
    WeightedRoundRobin,
    /// The backend with the fewest active connections per unit of weight.
    #[serde(rename = "least_connections")]
    LeastConnections,
}

impl Scheduler {
    pub const ALL: [Scheduler; 4] = [
        Scheduler::Maglev,
        Scheduler::RoundRobin,
        Scheduler::WeightedRoundRobin,
        Scheduler::LeastConnections,
    ];

    pub fn as_str(self) -> &'static str {
        match self {
            Scheduler::Maglev => "maglev",
            Scheduler::RoundRobin => "round_robin",
            Scheduler::WeightedRoundRobin => "weighted_round_robin",
            Scheduler::LeastConnections => "least_connections",
        }
    }

    /// The kernel's `SCHED_*` value.
    pub fn kernel_value(self) -> u32 {
        match self {
            Scheduler::Maglev => SCHED_MAGLEV,
            Scheduler::RoundRobin => SCHED_ROUND_ROBIN,
            Scheduler::WeightedRoundRobin => SCHED_WEIGHTED_ROUND_ROBIN,
            Scheduler::LeastConnections => SCHED_LEAST_CONNECTIONS,
        }
    }

    /// Most backends a VIP with this scheduler may have (all of them may
    /// be usable at once): the slot region for the rotations, the
    /// kernel's bounded comparison loop for least connections.
    pub fn max_backends(self) -> Option<u32> {
        match self {
            Scheduler::Maglev => None,
            Scheduler::RoundRobin | Scheduler::WeightedRoundRobin => Some(SCHED_SLOTS_PER_VIP),
            Scheduler::LeastConnections => Some(LC_MAX_BACKENDS),
        }
    }
}

impl FromStr for Scheduler {
    type Err = ParseKeywordError;
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        Scheduler::ALL
            .into_iter()
            .find(|k| k.as_str() == s)
            .ok_or_else(|| ParseKeywordError {
                what: "scheduler",
                got: s.to_owned(),
                expected: &[
                    "maglev",
                    "round_robin",
                    "weighted_round_robin",
                    "least_connections",
                ],
            })
    }
}

impl fmt::Display for Scheduler {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

/// What the kernel holds for one VIP's scheduler: its SCHED element and
/// the slots of its region that element makes read (`slots.len() ==
/// info.len`).
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct VipSched {
    pub info: SchedInfo,
    pub slots: Vec<SchedSlot>,
}

/// The scheduler state of a VIP whose usable, non-drained backends are
/// `members` (backend id, weight ≥ 1), in a stable order (the config's).
/// More members than the scheduler takes (a CLI addition past the limit
/// the file is held to): the first ones are kept.
pub fn vip_sched(scheduler: Scheduler, members: &[(u32, u32)]) -> VipSched {
    let limit = scheduler.max_backends().unwrap_or(0) as usize;
    let members = &members[..members.len().min(limit)];
    let slots: Vec<SchedSlot> = match scheduler {
        Scheduler::Maglev => Vec::new(),
        Scheduler::RoundRobin => members
            .iter()
            .map(|&(backend_id, _)| SchedSlot {
                backend_id,
                weight: 0,
            })
            .collect(),
        Scheduler::WeightedRoundRobin => wrr_sequence(members, SCHED_SLOTS_PER_VIP as usize)
            .into_iter()
            .map(|backend_id| SchedSlot {
                backend_id,
                weight: 0,
            })
            .collect(),
        Scheduler::LeastConnections => members
            .iter()
            .map(|&(backend_id, weight)| SchedSlot {
                backend_id,
                weight: weight.max(1),
            })
            .collect(),
    };
    VipSched {
        info: SchedInfo {
            kind: scheduler.kernel_value(),
            len: slots.len() as u32,
        },
        slots,
    }
}

fn gcd(a: u32, b: u32) -> u32 {
    if b == 0 { a } else { gcd(b, a % b) }
}

/// The weights `members` give, reduced to a sum of at most `max_len`: by
/// their gcd, then (if still too long) scaled down proportionally, each
/// kept ≥ 1, the budget lowered until the sum fits.
pub fn wrr_weights(members: &[(u32, u32)], max_len: usize) -> Vec<u32> {
    let g = members.iter().fold(0, |g, &(_, w)| gcd(g, w.max(1)));
    let mut weights: Vec<u32> = members.iter().map(|&(_, w)| w.max(1) / g.max(1)).collect();
    let total: u64 = weights.iter().map(|&w| u64::from(w)).sum();
    if total as usize > max_len && members.len() <= max_len {
        let mut budget = max_len as u64;
        loop {
            let scaled: Vec<u32> = weights
                .iter()
                .map(|&w| (u64::from(w) * budget / total).max(1) as u32)
                .collect();
            let sum: u64 = scaled.iter().map(|&w| u64::from(w)).sum();
            if sum as usize <= max_len {
                weights = scaled;
                break;
            }
            budget -= sum - max_len as u64;
        }
        let g = weights.iter().fold(0, |g, &w| gcd(g, w));
        weights.iter_mut().for_each(|w| *w /= g.max(1));
    }
    weights
}

/// The weighted round-robin sequence of `members` (id, weight): each id
/// as often as its reduced weight ([`wrr_weights`]), interleaved by the
/// smooth weighted round robin (nginx's): every step adds each weight to
/// its backend's credit and takes the backend with the most, which pays
/// the total back. Weights 1:2:3 give `c b a c b c`: no backend gets a
/// run of its whole share.
pub fn wrr_sequence(members: &[(u32, u32)], max_len: usize) -> Vec<u32> {
    let weights = wrr_weights(members, max_len);
    let total: i64 = weights.iter().map(|&w| i64::from(w)).sum();
    let mut credit = vec![0i64; members.len()];
    let mut seq = Vec::with_capacity(total as usize);
    for _ in 0..total {
        let mut best = 0;
        for (i, &w) in weights.iter().enumerate() {
            credit[i] += i64::from(w);
            if credit[i] > credit[best] {
                best = i;
            }
        }
        credit[best] -= total;
        seq.push(members[best].0);
    }
    seq
}

/// The LC_CORRECTION words that make each backend's count equal `truth`
/// (backend id → open connections the agent counted), given the kernel's
/// counters `active` (indexed by backend id) read after the count,
/// `before` read before it, and the corrections `current` in place:
/// `(id, new correction)` for every word that changes. Backends absent
/// from `truth` have no open connection. A backend whose counter moved
/// during the count is left alone: the count may or may not have seen
/// the connection that moved it, and a correction off by one would stay
/// until the next count (left alone, the next quiet count corrects it).
pub fn corrections(
    active: &[u64],
    before: &[u64],
    current: &[u64],
    truth: &BTreeMap<u32, u64>,
) -> Vec<(u32, u64)> {
    let mut out = Vec::new();
    for (id, ((&a, &b), &c)) in active.iter().zip(before).zip(current).enumerate() {
        if a != b {
            continue;
        }
        let want = truth.get(&(id as u32)).copied().unwrap_or(0);
        let corr = want.wrapping_sub(a);
        if corr != c {
            out.push((id as u32, corr));
        }
    }
    out
}

/// The count the kernel compares for a backend.
pub fn active_count(counter: u64, correction: u64) -> u64 {
    lc_active(counter, correction)
}

/// LC_ACTIVE and LC_CORRECTION, opened from their pins by the flow
/// keeper's counting thread (the only writer of LC_CORRECTION).
///
/// Accuracy: the kernel counts a connection when its record is made and
/// uncounts it at its first FIN or RST; what it cannot see (a record that
/// expired idle, one the LRU evicted, a SYN that replaced an open record,
/// two CPUs closing one record at once, closes of connections opened
/// before the VIP counted) is corrected here after every count of the
/// flow keeper (every 2 s, longer for big tables). Between two counts a
/// backend's figure lags by what those events did since the last count.
/// A backend whose counter moved while the pass ran is not corrected by
/// that pass (the pass may or may not have seen the connection that moved
/// it, and an off-by-one correction would stay for a whole period and
/// skew the picks): a later pass during which it is quiet corrects it, so
/// a backend opening or closing connections without pause keeps the
/// kernel's own count, exact but for what expiry and eviction took. Each
/// lb host counts only the flows it forwarded: behind ECMP, each compares
/// its own share of connections.
pub struct LcCounters {
    active: aya::maps::Array<aya::maps::MapData, u64>,
    correction: aya::maps::Array<aya::maps::MapData, u64>,
    /// The corrections as last written (this thread is their only writer).
    current: Vec<u64>,
}

impl LcCounters {
    pub fn open(pin_dir: &std::path::Path) -> anyhow::Result<Self> {
        use aya::maps::{Array, Map, MapData};
        use lb_common::map_names;
        let open = |name: &str| -> anyhow::Result<Array<MapData, u64>> {
            let path = pin_dir.join(name);
            let data = MapData::from_pin(&path)
                .map_err(|e| anyhow::anyhow!("opening {}: {e}", path.display()))?;
            Array::try_from(Map::Array(data)).map_err(|e| anyhow::anyhow!("map {name}: {e}"))
        };
        let active = open(map_names::LC_ACTIVE)?;
        let correction = open(map_names::LC_CORRECTION)?;
        let current = read_all(&correction, map_names::LC_CORRECTION)?;
        Ok(Self {
            active,
            correction,
            current,
        })
    }

    /// The kernel's counters now: taken before a count, for
    /// [`LcCounters::correct`].
    pub fn snapshot(&self) -> anyhow::Result<Vec<u64>> {
        read_all(&self.active, lb_common::map_names::LC_ACTIVE)
    }

    /// Sets the correction of every backend whose counter did not move
    /// since `before` (a [`LcCounters::snapshot`] taken before the count)
    /// so that its count is `open`'s (backend id → open connections just
    /// counted). Returns the words written.
    pub fn correct(&mut self, before: &[u64], open: &BTreeMap<u32, u64>) -> anyhow::Result<usize> {
        let active = read_all(&self.active, lb_common::map_names::LC_ACTIVE)?;
        let writes = corrections(&active, before, &self.current, open);
        for &(id, c) in &writes {
            self.correction
                .set(id, c, 0)
                .map_err(|e| anyhow::anyhow!("writing LC_CORRECTION[{id}]: {e}"))?;
            self.current[id as usize] = c;
        }
        Ok(writes.len())
    }
}

fn read_all(
    map: &aya::maps::Array<aya::maps::MapData, u64>,
    name: &str,
) -> anyhow::Result<Vec<u64>> {
    (0..map.len())
        .map(|i| {
            map.get(&i, 0)
                .map_err(|e| anyhow::anyhow!("reading {name}[{i}]: {e}"))
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn unknown_scheduler_names_the_choices() {
        let e = "fastest".parse::<Scheduler>().unwrap_err();
        assert_eq!(
            e.to_string(),
            "invalid scheduler \"fastest\", expected one of maglev, round_robin, weighted_round_robin, least_connections"
        );
        for s in Scheduler::ALL {
            assert_eq!(s.as_str().parse::<Scheduler>().unwrap(), s);
        }
    }

    #[test]
    fn wrr_1_2_3_is_interleaved_with_exact_shares() {
        let seq = wrr_sequence(&[(1, 1), (2, 2), (3, 3)], 1024);
        assert_eq!(seq.len(), 6);
        for (id, n) in [(1, 1), (2, 2), (3, 3)] {
            assert_eq!(seq.iter().filter(|&&x| x == id).count(), n);
        }
        // Never the same backend three times in a row, even cyclically.
        let twice: Vec<u32> = seq.iter().chain(&seq).copied().collect();
        assert!(twice.windows(3).all(|w| !(w[0] == w[1] && w[1] == w[2])));
    }

    #[test]
    fn wrr_weights_reduce_by_their_gcd() {
        assert_eq!(
            wrr_weights(&[(1, 100), (2, 200), (3, 300)], 1024),
            [1, 2, 3]
        );
        assert_eq!(wrr_weights(&[(1, 4), (2, 6)], 1024), [2, 3]);
    }

    #[test]
    fn wrr_weights_too_long_are_scaled_to_fit_within_a_slot_each() {
        // 10000 + 9999 + 1: reduced sum 20000 > 1024.
        let members = [(1, 10_000), (2, 9_999), (3, 1)];
        let w = wrr_weights(&members, 1024);
        let sum: u32 = w.iter().sum();
        assert!(sum <= 1024, "{w:?}");
        assert!(w.iter().all(|&x| x >= 1), "{w:?}");
        // Each share within one slot of the exact one.
        let total = 20_000f64;
        for (&(_, want), &got) in members.iter().zip(&w) {
            let exact = f64::from(want) / total * f64::from(sum);
            assert!((f64::from(got) - exact).abs() <= 1.0, "{w:?}");
        }
        assert_eq!(wrr_sequence(&members, 1024).len(), sum as usize);
        // 1000 backends of weights 1..=1000: still fits.
        let many: Vec<(u32, u32)> = (1..=1000).map(|i| (i, i)).collect();
        let w = wrr_weights(&many, 1024);
        assert!(w.iter().sum::<u32>() <= 1024);
        assert!(w.iter().all(|&x| x >= 1));
    }

    #[test]
    fn each_scheduler_writes_its_slots() {
        let m = [(7, 1), (9, 3)];
        let rr = vip_sched(Scheduler::RoundRobin, &m);
        assert_eq!(rr.info.kind, SCHED_ROUND_ROBIN);
        assert_eq!(
            rr.slots.iter().map(|s| s.backend_id).collect::<Vec<_>>(),
            [7, 9]
        );
        let wrr = vip_sched(Scheduler::WeightedRoundRobin, &m);
        assert_eq!(wrr.info.len, 4);
        assert_eq!(wrr.slots.iter().filter(|s| s.backend_id == 9).count(), 3);
        let lc = vip_sched(Scheduler::LeastConnections, &m);
        assert_eq!(
            lc.slots,
            [
                SchedSlot {
                    backend_id: 7,
                    weight: 1
                },
                SchedSlot {
                    backend_id: 9,
                    weight: 3
                }
            ]
        );
        let mg = vip_sched(Scheduler::Maglev, &m);
        assert_eq!((mg.info.kind, mg.info.len), (SCHED_MAGLEV, 0));
        let none = vip_sched(Scheduler::RoundRobin, &[]);
        assert_eq!(none.info.len, 0);
    }

    #[test]
    fn corrections_bring_each_count_to_the_truth_and_leave_the_rest() {
        // Backend 1: kernel says 5, truth 3 (two idle-expired);
        // backend 2: kernel -1 (a close of a flow it never counted), truth 0;
        // backend 3: already corrected.
        let active = [0, 5, u64::MAX, 4];
        let current = [0, 0, 0, (-1i64) as u64];
        let truth = BTreeMap::from([(1, 3), (3, 3)]);
        let c = corrections(&active, &active, &current, &truth);
        assert_eq!(c, [(1, (-2i64) as u64), (2, 1)]);
        // A counter that moved during the count: left for a later one.
        let mut before = active;
        before[1] = 4;
        assert_eq!(corrections(&active, &before, &current, &truth), [(2, 1)]);
        for (id, corr) in c {
            let want = truth.get(&id).copied().unwrap_or(0);
            assert_eq!(active_count(active[id as usize], corr), want);
        }
    }
}
