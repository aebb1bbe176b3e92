//! Weighted Maglev consistent hashing (Eisenbud et al., "Maglev: A Fast and
//! Reliable Software Network Load Balancer", NSDI '16, section 3.4).
//!
//! Every backend walks its own pseudo-random permutation of the `m` ring
//! slots, `permutation[j] = (offset + j * skip) % m`, with `offset = h1 % m`
//! and `skip = h2 % (m - 1) + 1` from two 64-bit hashes of the backend's
//! stable key; `m` prime makes every permutation visit every slot. Backends
//! take turns claiming the next still-empty slot of their permutation until
//! the ring is full.
//!
//! Weights: each backend first gets an exact slot *target*, its weighted share
//! `m * w / W` apportioned by largest remainder (ties to the smaller key), so
//! it ends up with exactly `floor` or `ceil` of that share. Population then
//! runs in rounds in which every backend claims slots at a pace proportional
//! to its target, so all backends advance through their permutations at the
//! same relative speed and finish together (which is what keeps disruption
//! low), and a backend that has reached its target stops claiming. With equal
//! weights this is the classic Maglev population: one slot per backend per
//! round.
//!
//! Backends are sorted by key before anything else, so the table depends on
//! the set of (key, weight) pairs only, never on input order; `id` is only
//! the label written into the slots.
//!
//! Cost: about `m * ln(m)` probes for the classic algorithm, most of them
//! spent finding the last few free slots. Here the probes test a bitmap, and
//! the last `sqrt(m) / 2` slots are found by scanning the list of free slots
//! (each claim picks the free slot that comes first on the backend's
//! permutation, computed with the modular inverse of `skip`), which gives
//! exactly the table plain probing would give.

use std::collections::BTreeMap;

use lb_common::NO_BACKEND;

/// Largest ring size lb builds (a prime); the configuration's limit.
pub const MAX_RING_SIZE: u32 = 655_373;

// The arithmetic below needs `m < 2^31` (it keeps `cur + skip` within
// `u32`); the largest ring size lb accepts is far below that.
const _: () = assert!(MAX_RING_SIZE < 1 << 31);

/// One backend as the table builder sees it.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct MaglevBackend {
    /// Stable identity that determines the backend's permutation (the agent
    /// passes the backend's IPv4 address as u32 combined with its port, e.g.
    /// `(addr as u64) << 16 | port`). Tables depend on this key and the weight
    /// only, never on input order or on `id`.
    pub key: u64,
    /// What the table stores in the slots (the kernel backend id).
    pub id: u32,
    /// Relative weight; 0 means the backend gets no slots (drained / down).
    pub weight: u32,
}

/// Why [`MaglevTable::build`] refused its input.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum MaglevError {
    #[error("ring size {0} is not prime")]
    NotPrime(u32),
    #[error("ring size {0} is too large (at most {MAX_RING_SIZE})")]
    TooLarge(u32),
    #[error("duplicate backend key {0:#x}")]
    DuplicateKey(u64),
}

/// A populated Maglev lookup table: `slots()[i]` is the id of the backend
/// that owns ring slot `i`, or [`NO_BACKEND`].
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct MaglevTable {
    slots: Vec<u32>,
}

impl MaglevTable {
    /// Builds the table for `backends` over a ring of `m` slots.
    ///
    /// `m` must be a prime of at most [`MAX_RING_SIZE`]. Backends with
    /// weight 0 get no slots; if no backend has a positive weight (or
    /// `backends` is empty) every slot is [`NO_BACKEND`]. Each backend with
    /// weight `w` gets `floor` or `ceil` of `m * w / W` slots, `W` being
    /// the total weight. Duplicate keys are rejected (even among weight-0
    /// backends).
    pub fn build(backends: &[MaglevBackend], m: u32) -> Result<MaglevTable, MaglevError> {
        if !is_prime(m) {
            return Err(MaglevError::NotPrime(m));
        }
        if m > MAX_RING_SIZE {
            return Err(MaglevError::TooLarge(m));
        }

        let mut sorted = backends.to_vec();
        sorted.sort_unstable_by_key(|b| b.key);
        if let Some(w) = sorted.windows(2).find(|w| w[0].key == w[1].key) {
            return Err(MaglevError::DuplicateKey(w[0].key));
        }
        sorted.retain(|b| b.weight > 0);

        let mut slots = vec![NO_BACKEND; m as usize];
        let total: u64 = sorted.iter().map(|b| u64::from(b.weight)).sum();
        if total == 0 {
            return Ok(MaglevTable { slots });
        }
        let targets = apportion(&sorted, m, total);
        populate(&sorted, &targets, &mut slots);
        Ok(MaglevTable { slots })
    }

    /// Slot contents: backend ids or [`NO_BACKEND`].
    pub fn slots(&self) -> &[u32] {
        &self.slots
    }

    /// Ring size `m`.
    pub fn len(&self) -> usize {
        self.slots.len()
    }

    /// Never true for a built table (`m >= 2`); here for clippy's sake.
    pub fn is_empty(&self) -> bool {
        self.slots.is_empty()
    }

    /// `(slot, new id)` for every slot whose content differs between `self`
    /// and `new`, in increasing slot order.
    ///
    /// # Panics
    ///
    /// If the two tables have different sizes.
    pub fn diff<'a>(&'a self, new: &'a MaglevTable) -> impl Iterator<Item = (u32, u32)> + 'a {
        assert_eq!(
            self.len(),
            new.len(),
            "MaglevTable::diff between tables of different sizes"
        );
        diff_slots(&self.slots, &new.slots)
    }

    /// Number of slots per backend id. Ids that own no slot are absent, and
    /// so are empty ([`NO_BACKEND`]) slots.
    pub fn shares(&self) -> BTreeMap<u32, u32> {
        let mut shares = BTreeMap::new();
        for &id in self.slots.iter().filter(|&&id| id != NO_BACKEND) {
            *shares.entry(id).or_insert(0) += 1;
        }
        shares
    }
}

/// Exact slot counts for `backends` (sorted by key, all with positive
/// weight, total weight `total > 0`): largest-remainder apportionment of `m`
/// slots, ties going to the smaller key. Every count is the floor or the ceil
/// of `m * w / total`, and they sum to `m`.
fn apportion(backends: &[MaglevBackend], m: u32, total: u64) -> Vec<u32> {
    let m = u64::from(m);
    let mut targets = Vec::with_capacity(backends.len());
    let mut remainders = Vec::with_capacity(backends.len());
    let mut assigned = 0u64;
    for (i, b) in backends.iter().enumerate() {
        // m < 2^31 and w < 2^32: no overflow.
        let exact = m * u64::from(b.weight);
        let floor = exact / total;
        assigned += floor;
        targets.push(floor as u32);
        remainders.push((exact % total, i));
    }
    // Fractional parts sum to `left`, each < 1: more than `left` backends
    // have a positive remainder, so only those get rounded up.
    let left = (m - assigned) as usize;
    if left > 0 {
        // Index order is key order, so the index breaks ties by key.
        remainders.sort_unstable_by(|a, b| b.0.cmp(&a.0).then(a.1.cmp(&b.1)));
        for &(_, i) in &remainders[..left] {
            targets[i] += 1;
        }
    }
    targets
}

/// Per-backend population state.
struct Walker {
    /// Next slot of the backend's permutation.
    cur: u32,
    skip: u32,
    /// `skip^-1 mod m`; 0 until the tail search needs it.
    inv_skip: u32,
    id: u32,
    /// Slots still to claim.
    left: u32,
    /// Claiming credit: one slot costs `quantum`.
    credit: u32,
    /// Credit earned per round: the backend's target.
    rate: u32,
}

/// Fills `slots` (all [`NO_BACKEND`], length `m` prime) so that
/// `backends[i]` owns exactly `targets[i]` slots; `targets` sum to `m`.
fn populate(backends: &[MaglevBackend], targets: &[u32], slots: &mut [u32]) {
    let m = slots.len() as u32;
    let md = Modulus::new(m);
    let n = targets.iter().filter(|&&t| t > 0).count() as u32;
    let t_max = targets.iter().copied().max().unwrap_or(1);
    // Pacing: a backend with target t claims t / quantum slots per round on
    // average, so every backend finishes after about `quantum` rounds. With
    // `quantum = t_max` the largest backends claim exactly one slot per round
    // (classic Maglev when the weights are equal); the cap keeps the number
    // of rounds times backends within O(m + n) under very skewed weights.
    // 2m < 2^32 since m < 2^31.
    let quantum = t_max.min((2 * m).div_ceil(n)).max(1);
    let mut walkers: Vec<Walker> = backends
        .iter()
        .zip(targets)
        .filter(|&(_, &t)| t > 0)
        .map(|(b, &t)| {
            let (offset, skip) = permutation(b.key, m);
            Walker {
                cur: offset,
                skip,
                inv_skip: 0,
                id: b.id,
                left: t,
                // Everyone claims its first preference in the first round.
                credit: quantum - 1,
                rate: t,
            }
        })
        .collect();

    // Occupancy bitmap for the probes: 8 KiB for m = 65537.
    let mut filled = vec![0u64; slots.len().div_ceil(64)];
    let mut empty = m;
    // Probing for a free slot costs m / empty probes on average, so the last
    // few slots would cost most of the build: once `tail_at` or fewer slots
    // are free, claims scan the list of free slots instead (`search`), which
    // picks exactly the slot probing would have.
    let tail_at = (m.isqrt() / 2).max(1);
    let mut free: Option<Vec<u32>> = None;
    while !walkers.is_empty() {
        let mut someone_done = false;
        for w in walkers.iter_mut() {
            // credit < quantum at the start of a round and rate <= m, so
            // this stays below 2^32.
            w.credit += w.rate;
            while w.credit >= quantum && w.left > 0 {
                w.credit -= quantum;
                w.left -= 1;
                let p = if empty > tail_at {
                    let p = probe(&filled, w, m);
                    filled[(p >> 6) as usize] |= 1 << (p & 63);
                    p
                } else {
                    let free = free.get_or_insert_with(|| free_slots(&filled, m));
                    search(free, w, md)
                };
                slots[p as usize] = w.id;
                empty -= 1;
            }
            someone_done |= w.left == 0;
        }
        if someone_done {
            walkers.retain(|w| w.left > 0);
        }
    }
}

/// Walks `w`'s permutation up to the first slot that is free in `filled`
/// and returns it, leaving `w.cur` just past it. Terminates as long as a
/// slot is free: `m` prime and `1 <= skip < m` make the walk visit every slot.
#[inline(always)]
fn probe(filled: &[u64], w: &mut Walker, m: u32) -> u32 {
    loop {
        let p = w.cur;
        w.cur = add_mod(w.cur, w.skip, m);
        if filled[(p >> 6) as usize] & (1 << (p & 63)) == 0 {
            return p;
        }
    }
}

/// `(a + b) mod m` for `a, b < m < 2^31`, without a branch or a division.
#[inline(always)]
fn add_mod(a: u32, b: u32, m: u32) -> u32 {
    let r = a + b;
    // If r < m, r - m wraps around to more than r.
    r.min(r.wrapping_sub(m))
}

/// The slots that are free in `filled`, in increasing order.
fn free_slots(filled: &[u64], m: u32) -> Vec<u32> {
    let mut free = Vec::new();
    for (i, &word) in filled.iter().enumerate() {
        let mut bits = !word;
        while bits != 0 {
            let p = i as u32 * 64 + bits.trailing_zeros();
            if p >= m {
                break;
            }
            free.push(p);
            bits &= bits - 1;
        }
    }
    free
}

/// Same result as [`probe`], computed from the list of free slots: the
/// first free slot on `w`'s walk is the free slot `e` whose distance along
/// the walk, `(e - cur) * skip^-1 mod m`, is smallest. Removes it from
/// `free`.
fn search(free: &mut Vec<u32>, w: &mut Walker, md: Modulus) -> u32 {
    if w.inv_skip == 0 {
        w.inv_skip = md.inverse(w.skip);
    }
    let (m, cur, inv) = (md.m, w.cur, w.inv_skip);
    // (distance << 32 | index): distances are distinct, so the minimum is
    // unique whatever the order of `free`.
    let mut best = u64::MAX;
    for (k, &e) in free.iter().enumerate() {
        let d = e.wrapping_sub(cur);
        let d = d.min(d.wrapping_add(m)); // (e - cur) mod m
        best = best.min(u64::from(md.mul(d, inv)) << 32 | k as u64);
    }
    let p = free.swap_remove(best as u32 as usize);
    w.cur = add_mod(p, w.skip, m);
    p
}

/// Arithmetic modulo `m < 2^31` without division (Barrett reduction).
#[derive(Clone, Copy, Debug)]
struct Modulus {
    m: u32,
    /// floor((2^64 - 1) / m)
    mu: u64,
}

impl Modulus {
    fn new(m: u32) -> Self {
        Self {
            m,
            mu: u64::MAX / u64::from(m),
        }
    }

    /// `a * b mod m` for `a, b < m`.
    #[inline(always)]
    fn mul(self, a: u32, b: u32) -> u32 {
        let x = u64::from(a) * u64::from(b);
        // mu <= 2^64 / m < mu + 2 and x < 2^62, so q is floor(x / m) or one
        // less, and r < 2m < 2^32.
        let q = ((u128::from(x) * u128::from(self.mu)) >> 64) as u64;
        let r = (x - q * u64::from(self.m)) as u32;
        r.min(r.wrapping_sub(self.m))
    }

    /// `a^-1 mod m` for `0 < a < m`, `m` prime (extended Euclid).
    fn inverse(self, a: u32) -> u32 {
        let (mut r0, mut r1) = (self.m, a);
        let (mut t0, mut t1) = (0i64, 1i64);
        while r1 != 0 {
            let q = r0 / r1;
            (r0, r1) = (r1, r0 - q * r1);
            (t0, t1) = (t1, t0 - i64::from(q) * t1);
        }
        debug_assert_eq!(r0, 1, "{a} has no inverse modulo {}", self.m);
        t0.rem_euclid(i64::from(self.m)) as u32
    }
}

/// `(offset, skip)` of the permutation of the backend with `key` over `m`
/// (prime) slots: `offset` in `[0, m)`, `skip` in `[1, m)`.
fn permutation(key: u64, m: u32) -> (u32, u32) {
    const SEED_OFFSET: u64 = 0x6c62_6d61_676c_6576; // "lbmaglev"
    const SEED_SKIP: u64 = 0x2545_f491_4f6c_dd1d;
    let h1 = splitmix64(key ^ SEED_OFFSET);
    let h2 = splitmix64(key ^ SEED_SKIP);
    let offset = (h1 % u64::from(m)) as u32;
    let skip = (h2 % u64::from(m - 1)) as u32 + 1;
    (offset, skip)
}

/// SplitMix64's output function (Steele, Lea, Flood 2014): a bijective,
/// well-avalanching 64-bit mixer.
pub(crate) fn splitmix64(x: u64) -> u64 {
    let mut z = x.wrapping_add(0x9e37_79b9_7f4a_7c15);
    z = (z ^ (z >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
    z = (z ^ (z >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
    z ^ (z >> 31)
}

/// Whether `n` is prime (deterministic for every `u32`: trial division by
/// the primes up to 37, then Miller-Rabin with bases 2, 7 and 61).
/// `(slot, new id)` for every slot of `new` whose content differs from
/// `old`'s, in increasing slot order; slots beyond `old`'s end count as
/// changed (a ring written for the first time, or grown).
pub fn diff_slots<'a>(old: &'a [u32], new: &'a [u32]) -> impl Iterator<Item = (u32, u32)> + 'a {
    new.iter()
        .enumerate()
        .filter(move |&(i, id)| old.get(i) != Some(id))
        .map(|(i, &id)| (i as u32, id))
}

pub fn is_prime(n: u32) -> bool {
    const SMALL: [u32; 12] = [2, 3, 5, 7, 11, 13, 17, 19, 23, 29, 31, 37];
    if n < 2 {
        return false;
    }
    for p in SMALL {
        if n.is_multiple_of(p) {
            return n == p;
        }
    }
    // A composite below 41^2 has a prime factor of at most 37.
    if n < 41 * 41 {
        return true;
    }
    let n = u64::from(n);
    let s = (n - 1).trailing_zeros();
    let d = (n - 1) >> s;
    'bases: for a in [2u64, 7, 61] {
        // All values stay below n < 2^32, so products fit in u64.
        let mut x = pow_mod(a, d, n);
        if x == 1 || x == n - 1 {
            continue;
        }
        for _ in 1..s {
            x = x * x % n;
            if x == n - 1 {
                continue 'bases;
            }
        }
        return false;
    }
    true
}

/// `base^exp mod n` for `n < 2^32`.
fn pow_mod(mut base: u64, mut exp: u64, n: u64) -> u64 {
    let mut acc = 1u64;
    base %= n;
    while exp > 0 {
        if exp & 1 == 1 {
            acc = acc * base % n;
        }
        base = base * base % n;
        exp >>= 1;
    }
    acc
}

#[cfg(test)]
mod tests {
    use super::*;

    const M: u32 = 65537;

    /// `n` backends with realistic keys (10.0.x.y:8080), ids 100.., and the
    /// given weights (cycled).
    fn backends(n: usize, weights: &[u32]) -> Vec<MaglevBackend> {
        (0..n)
            .map(|i| {
                let addr = u32::from_be_bytes([10, 0, (i / 250) as u8, (i % 250 + 1) as u8]);
                MaglevBackend {
                    key: (u64::from(addr) << 16) | 8080,
                    id: 100 + i as u32,
                    weight: weights[i % weights.len()],
                }
            })
            .collect()
    }

    fn build(b: &[MaglevBackend], m: u32) -> MaglevTable {
        MaglevTable::build(b, m).unwrap()
    }

    /// Every backend's slot count is floor or ceil of its weighted share and
    /// within 1% of the ring of it; no slot is left empty.
    fn assert_fair(b: &[MaglevBackend], m: u32) {
        assert_fair_within(b, m, 0.01);
    }

    fn assert_fair_within(b: &[MaglevBackend], m: u32, tolerance: f64) {
        let t = build(b, m);
        assert_eq!(t.len(), m as usize);
        assert!(t.slots().iter().all(|&s| s != NO_BACKEND), "empty slot");
        let shares = t.shares();
        let total: u64 = b.iter().map(|b| u64::from(b.weight)).sum();
        assert_eq!(
            shares.values().map(|&c| u64::from(c)).sum::<u64>(),
            u64::from(m)
        );
        for be in b {
            let got = shares.get(&be.id).copied().unwrap_or(0);
            let exact = u64::from(m) * u64::from(be.weight);
            let floor = (exact / total) as u32;
            let ceil = exact.div_ceil(total) as u32;
            assert!(
                got == floor || got == ceil,
                "backend {} weight {}: {got} slots, want {floor} or {ceil}",
                be.id,
                be.weight
            );
            let frac = f64::from(got) / f64::from(m);
            let want = be.weight as f64 / total as f64;
            assert!((frac - want).abs() <= tolerance, "{frac} vs {want}");
        }
    }

    #[test]
    fn equal_weights_are_fair() {
        for n in [1, 2, 3, 10, 100] {
            assert_fair(&backends(n, &[1]), M);
        }
        assert_fair(&backends(1000, &[7]), M);
    }

    #[test]
    fn weighted_shares_are_fair() {
        assert_fair(&backends(3, &[1, 1, 2]), M);
        assert_fair(&backends(10, &[1, 2, 3, 4, 5, 6, 7, 8, 9, 10]), M);
        assert_fair(&backends(100, &[1, 2, 3, 4, 5, 6, 7, 8, 9, 10]), M);
        assert_fair(&backends(50, &[1, 1000]), M);
        // Extreme weights must neither overflow nor take forever.
        assert_fair(&backends(5, &[1, u32::MAX]), M);
        // Concrete check: 1:1:2 is 1/4, 1/4, 1/2.
        let t = build(&backends(3, &[1, 1, 2]), M);
        let s: Vec<u32> = t.shares().into_values().collect();
        assert!(s[0].abs_diff(M / 4) <= 1 && s[1].abs_diff(M / 4) <= 1);
        assert!(s[2].abs_diff(M / 2) <= 1);
    }

    #[test]
    fn more_backends_than_slots() {
        let b = backends(20, &[1]);
        let t = build(&b, 7);
        let shares = t.shares();
        assert_eq!(shares.len(), 7);
        assert!(shares.values().all(|&c| c == 1));
        assert!(t.slots().iter().all(|&s| s != NO_BACKEND));
    }

    #[test]
    fn tiny_rings() {
        let b = backends(3, &[1]);
        for m in [2, 3, 5] {
            // floor/ceil still holds; 1% of a tiny ring is less than a slot.
            assert_fair_within(&b, m, 1.0 / f64::from(m));
        }
    }

    #[test]
    fn large_ring() {
        assert_fair(&backends(1000, &[1, 2, 3]), 655_373);
    }

    /// Removing one backend keeps (almost) every slot of the survivors.
    fn assert_removal_disruption(n: usize, weights: &[u32]) {
        let before_set = backends(n, weights);
        let before = build(&before_set, M);
        for gone in [0, n / 2, n - 1] {
            let mut after_set = before_set.clone();
            let removed = after_set.remove(gone);
            let after = build(&after_set, M);
            assert!(!after.slots().contains(&removed.id));
            let mut surviving = 0u32;
            let mut moved = 0u32;
            for (&old, &new) in before.slots().iter().zip(after.slots()) {
                if old != removed.id {
                    surviving += 1;
                    moved += u32::from(old != new);
                }
            }
            let frac = f64::from(moved) / f64::from(surviving);
            assert!(
                frac <= 1.0 / n as f64 + 0.01,
                "n={n}: removing #{gone} moved {moved}/{surviving} surviving slots ({frac})"
            );
        }
    }

    #[test]
    fn removal_moves_few_slots() {
        for n in [2, 3, 10, 100] {
            assert_removal_disruption(n, &[1]);
        }
        assert_removal_disruption(10, &[1, 2, 3]);
        assert_removal_disruption(100, &[1, 1, 2, 5]);
    }

    #[test]
    fn drain_to_zero_weight_is_removal() {
        let mut b = backends(10, &[1]);
        let mut removed = b.clone();
        removed.remove(4);
        b[4].weight = 0;
        assert_eq!(build(&b, M), build(&removed, M));
        assert!(!build(&b, M).shares().contains_key(&b[4].id));
    }

    #[test]
    fn input_order_does_not_matter() {
        for n in [3, 10, 100] {
            let b = backends(n, &[1, 2, 3]);
            let t = build(&b, M);
            let mut rev = b.clone();
            rev.reverse();
            assert_eq!(build(&rev, M).slots(), t.slots());
            // Deterministic shuffle.
            let mut shuffled = b.clone();
            let mut r = 0x1234_5678u64;
            for i in (1..shuffled.len()).rev() {
                r = splitmix64(r);
                shuffled.swap(i, (r % (i as u64 + 1)) as usize);
            }
            if shuffled == b {
                shuffled.swap(0, 1);
            }
            assert_eq!(build(&shuffled, M).slots(), t.slots());
        }
    }

    #[test]
    fn ids_are_only_labels() {
        let b = backends(10, &[1, 3]);
        let relabelled: Vec<_> = b
            .iter()
            .map(|x| MaglevBackend {
                id: 1000 - x.id,
                ..*x
            })
            .collect();
        let t = build(&b, M);
        let u = build(&relabelled, M);
        for (&a, &c) in t.slots().iter().zip(u.slots()) {
            assert_eq!(c, 1000 - a);
        }
    }

    #[test]
    fn not_prime_rejected() {
        for m in [0, 1, 4, 9, 65536, 65535, 1 << 20, u32::MAX] {
            assert_eq!(
                MaglevTable::build(&backends(3, &[1]), m),
                Err(MaglevError::NotPrime(m))
            );
        }
        // 2^32 - 5 is prime but too large.
        assert_eq!(
            MaglevTable::build(&[], 4_294_967_291),
            Err(MaglevError::TooLarge(4_294_967_291))
        );
        assert_eq!(
            MaglevError::NotPrime(4).to_string(),
            "ring size 4 is not prime"
        );
    }

    #[test]
    fn duplicate_key_rejected() {
        let mut b = backends(5, &[1]);
        b[3].key = b[1].key;
        b[3].weight = 0;
        assert_eq!(
            MaglevTable::build(&b, M),
            Err(MaglevError::DuplicateKey(b[1].key))
        );
    }

    #[test]
    fn empty_or_all_drained_gives_no_backend() {
        let t = build(&[], M);
        assert_eq!(t.len(), M as usize);
        assert!(!t.is_empty());
        assert!(t.slots().iter().all(|&s| s == NO_BACKEND));
        assert!(t.shares().is_empty());

        let t = build(&backends(4, &[0]), 13);
        assert_eq!(t.slots(), &[NO_BACKEND; 13]);
    }

    #[test]
    fn zero_weight_backend_gets_nothing() {
        let b = backends(10, &[1, 0]);
        let t = build(&b, M);
        let shares = t.shares();
        for x in &b {
            assert_eq!(shares.contains_key(&x.id), x.weight > 0, "{x:?}");
        }
        assert_fair(&b, M);
    }

    #[test]
    fn diff_is_exactly_the_changed_slots() {
        let b = backends(10, &[1]);
        let old = build(&b, M);
        let new = build(&b[1..], M);
        let d: Vec<(u32, u32)> = old.diff(&new).collect();
        let want: Vec<(u32, u32)> = (0..M)
            .filter(|&i| old.slots()[i as usize] != new.slots()[i as usize])
            .map(|i| (i, new.slots()[i as usize]))
            .collect();
        assert!(!d.is_empty());
        assert_eq!(d, want);
        // Applying the diff to the old table yields the new one.
        let mut applied = old.slots().to_vec();
        for &(slot, id) in &d {
            applied[slot as usize] = id;
        }
        assert_eq!(applied, new.slots());
        assert_eq!(old.diff(&old).count(), 0);
        assert_eq!(build(&[], 7).diff(&build(&b, 7)).count(), 7);
    }

    #[test]
    fn permutation_is_in_range_and_depends_on_key() {
        let mut seen = std::collections::HashSet::new();
        for key in 0..1000u64 {
            let (o, s) = permutation(key, M);
            assert!(o < M && (1..M).contains(&s));
            seen.insert((o, s));
        }
        assert_eq!(seen.len(), 1000);
        assert_eq!(permutation(42, 2).1, 1);
    }

    /// Straightforward Maglev population: same targets and pacing, but
    /// per-step `%`, probing of `slots` itself and no tail search.
    fn reference(backends: &[MaglevBackend], m: u32) -> Vec<u32> {
        let mut b = backends.to_vec();
        b.sort_by_key(|b| b.key);
        b.retain(|b| b.weight > 0);
        let mut slots = vec![NO_BACKEND; m as usize];
        let total: u64 = b.iter().map(|b| u64::from(b.weight)).sum();
        if total == 0 {
            return slots;
        }
        let targets = apportion(&b, m, total);
        let n = targets.iter().filter(|&&t| t > 0).count() as u32;
        let t_max = *targets.iter().max().unwrap();
        let quantum = t_max.min((2 * m).div_ceil(n)).max(1);
        let m64 = u64::from(m);
        // (offset, skip, j, left, credit, target, id)
        let mut st: Vec<_> = b
            .iter()
            .zip(&targets)
            .map(|(b, &t)| {
                let (o, s) = permutation(b.key, m);
                (u64::from(o), u64::from(s), 0u64, t, quantum - 1, t, b.id)
            })
            .collect();
        while st.iter().any(|s| s.3 > 0) {
            for (o, s, j, left, credit, t, id) in st.iter_mut() {
                if *left == 0 {
                    continue;
                }
                *credit += *t;
                while *credit >= quantum && *left > 0 {
                    *credit -= quantum;
                    *left -= 1;
                    loop {
                        let p = ((*o + *j * *s) % m64) as usize;
                        *j += 1;
                        if slots[p] == NO_BACKEND {
                            slots[p] = *id;
                            break;
                        }
                    }
                }
            }
        }
        slots
    }

    #[test]
    fn matches_reference_implementation() {
        let cases: &[(usize, &[u32], u32)] = &[
            (1, &[1], 2),
            (2, &[1], 2),
            (3, &[1], 3),
            (3, &[1, 0, 5], 5),
            (5, &[1, 2], 7),
            (20, &[1], 13),
            (10, &[3, 1, 4, 1, 5, 9, 2, 6], 1009),
            (1, &[1], M),
            (2, &[1], M),
            (3, &[1], M),
            (10, &[1], M),
            (100, &[1], M),
            (1000, &[1], M),
            (100, &[1, 2, 3, 100], M),
            (7, &[1, 1000], M),
            (3, &[1, u32::MAX], M),
        ];
        for &(n, weights, m) in cases {
            let b = backends(n, weights);
            assert_eq!(
                build(&b, m).slots(),
                &reference(&b, m)[..],
                "n={n} weights={weights:?} m={m}"
            );
        }
    }

    #[test]
    fn modular_arithmetic() {
        let mut r = 7u64;
        for m in [2u32, 3, 5, 13, 65_537, 655_373, 1_000_003, 2_147_483_647] {
            let md = Modulus::new(m);
            let edge = [0, 1, m / 2, m - 2, m - 1];
            for i in 0..2000 {
                r = splitmix64(r);
                let (a, b) = if i < 25 {
                    (edge[i / 5].min(m - 1), edge[i % 5].min(m - 1))
                } else {
                    ((r % u64::from(m)) as u32, ((r >> 32) % u64::from(m)) as u32)
                };
                let want = (u64::from(a) * u64::from(b) % u64::from(m)) as u32;
                assert_eq!(md.mul(a, b), want, "{a} * {b} mod {m}");
                assert_eq!(
                    add_mod(a, b, m),
                    ((u64::from(a) + u64::from(b)) % u64::from(m)) as u32
                );
                if a != 0 {
                    let inv = md.inverse(a);
                    assert!(inv < m);
                    assert_eq!(
                        u64::from(a) * u64::from(inv) % u64::from(m),
                        1,
                        "{a}^-1 mod {m}"
                    );
                }
            }
        }
    }

    #[test]
    fn is_prime_matches_sieve() {
        const LIMIT: usize = 100_000;
        let mut sieve = vec![true; LIMIT];
        sieve[0] = false;
        sieve[1] = false;
        for i in 2..LIMIT {
            if sieve[i] {
                for j in (i * i..LIMIT).step_by(i) {
                    sieve[j] = false;
                }
            }
        }
        for (n, &p) in sieve.iter().enumerate() {
            assert_eq!(is_prime(n as u32), p, "{n}");
        }
    }

    #[test]
    fn is_prime_large_values() {
        for p in [65_537, 655_373, 1_000_003, 2_147_483_647, 4_294_967_291] {
            assert!(is_prime(p), "{p}");
        }
        // Carmichael numbers, strong pseudoprimes to base 2 (2047, 3277,
        // 4033) and to bases 2, 3, 5, 7 (3_215_031_751), squares of primes,
        // products of large primes.
        for c in [
            561,
            1105,
            2047,
            3277,
            4033,
            3_215_031_751,
            65_537 * 65_521,
            65_521 * 65_521,
            655_373 * 6553,
            u32::MAX,
            1 << 31,
        ] {
            assert!(!is_prime(c), "{c}");
        }
    }
}
