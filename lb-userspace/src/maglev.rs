//! Weighted Maglev consistent hashing (Eisenbud et al., "Maglev: A Fast and
//! Reliable Software Network Load Balancer", NSDI '16, section 3.4).
//!
//! Every backend walks its own pseudo-random permutation of the `m` ring
//! slots, `permutation[j] = (offset + j * skip) % m`, with `offset` and `skip`
//! derived from a 64-bit hash of the backend's stable key; `m` prime makes
//! every permutation visit every slot. Backends take turns claiming the next
//! still-empty slot of their permutation until the ring is full.
//!
//! Weights: each backend first gets an exact slot *target*, its weighted share
//! `m * w / W` apportioned by largest remainder (ties to the smaller key), so
//! it ends up with exactly `floor` or `ceil` of that share. Population then
//! runs in rounds in which every backend claims slots at a pace proportional
//! to its target (so all backends advance through their permutations at the
//! same relative speed and finish together, which is what keeps the
//! disruption low), and a backend that has reached its target stops claiming.
//! With equal weights this is the classic Maglev population: one slot per
//! backend per round.
//!
//! Backends are sorted by key before anything else, so the table depends on
//! the set of (key, weight) pairs only, never on input order; `id` is only
//! the label written into the slots.

use std::collections::BTreeMap;

use lb_common::NO_BACKEND;

/// Largest accepted ring size (exclusive of itself, since it is not prime):
/// keeps `cur + skip` within `u32`.
pub const MAX_RING_SIZE: u32 = 1 << 31;

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

#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum MaglevError {
    #[error("ring size {0} is not prime")]
    NotPrime(u32),
    #[error("ring size {0} is too large (must be below 2^31)")]
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
    /// `m` must be a prime below 2^31. Backends with weight 0 get no slots;
    /// if no backend has a positive weight (or `backends` is empty) every slot
    /// is [`NO_BACKEND`]. Each backend with weight `w` gets `floor` or `ceil`
    /// of `m * w / W` slots, `W` being the total weight. Duplicate keys are
    /// rejected (even among weight-0 backends).
    pub fn build(backends: &[MaglevBackend], m: u32) -> Result<MaglevTable, MaglevError> {
        if !is_prime(m) {
            return Err(MaglevError::NotPrime(m));
        }
        if m >= MAX_RING_SIZE {
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
        self.slots
            .iter()
            .zip(new.slots.iter())
            .enumerate()
            .filter(|(_, (old, new))| old != new)
            .map(|(i, (_, &new))| (i as u32, new))
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
    /// Next slot of the permutation.
    cur: u32,
    skip: u32,
    id: u32,
    /// Slots still to claim.
    left: u32,
    /// Claiming credit; one slot costs `m`.
    credit: u64,
    /// Credit earned per round: `target * n`, so `n` slots are claimed per
    /// round in total and every backend finishes after about `m / n` rounds.
    rate: u64,
}

/// Fills `slots` (all [`NO_BACKEND`], length `m` prime) so that
/// `backends[i]` owns exactly `targets[i]` slots; `targets` sum to `m`.
fn populate(backends: &[MaglevBackend], targets: &[u32], slots: &mut [u32]) {
    let m = slots.len() as u32;
    let m64 = u64::from(m);
    let n = targets.iter().filter(|&&t| t > 0).count() as u64;
    let mut walkers: Vec<Walker> = backends
        .iter()
        .zip(targets)
        .filter(|(_, t)| **t > 0)
        .map(|(b, &t)| {
            let (offset, skip) = permutation(b.key, m);
            Walker {
                cur: offset,
                skip,
                id: b.id,
                left: t,
                // Everyone claims its first preference in the first round.
                credit: m64 - 1,
                // t <= m and n <= m < 2^31: no overflow.
                rate: u64::from(t) * n,
            }
        })
        .collect();

    // Occupancy bitmap: probes hit it rather than `slots` (8 KiB instead of
    // 256 KiB for m = 65537, so it stays in L1).
    let mut filled = vec![0u64; slots.len().div_ceil(64)];
    while !walkers.is_empty() {
        let mut someone_done = false;
        for w in walkers.iter_mut() {
            w.credit += w.rate;
            while w.credit >= m64 && w.left > 0 {
                w.credit -= m64;
                w.left -= 1;
                // Terminates: the permutation visits every slot and fewer
                // than m slots are filled while anyone has slots left.
                loop {
                    let p = w.cur;
                    w.cur += w.skip;
                    if w.cur >= m {
                        w.cur -= m;
                    }
                    let (word, bit) = ((p >> 6) as usize, 1u64 << (p & 63));
                    if filled[word] & bit == 0 {
                        filled[word] |= bit;
                        slots[p as usize] = w.id;
                        break;
                    }
                }
            }
            someone_done |= w.left == 0;
        }
        if someone_done {
            walkers.retain(|w| w.left > 0);
        }
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
fn splitmix64(x: u64) -> u64 {
    let mut z = x.wrapping_add(0x9e37_79b9_7f4a_7c15);
    z = (z ^ (z >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
    z = (z ^ (z >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
    z ^ (z >> 31)
}

/// Whether `n` is prime (deterministic for every `u32`: trial division by
/// the primes up to 37, then Miller-Rabin with bases 2, 7 and 61).
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

    /// `cargo test --release -p lb-userspace --lib maglev::tests::timing -- --ignored --nocapture`
    #[test]
    #[ignore = "timing, run in release mode"]
    fn timing() {
        for (n, m) in [(1000, 65_537), (100, 65_537), (1000, 655_373)] {
            let b = backends(n, &[1]);
            let mut times: Vec<std::time::Duration> = (0..50)
                .map(|_| {
                    let start = std::time::Instant::now();
                    let t = build(std::hint::black_box(&b), m);
                    let e = start.elapsed();
                    std::hint::black_box(t);
                    e
                })
                .collect();
            times.sort();
            println!(
                "N={n} M={m}: min {:?} median {:?} max {:?}",
                times[0], times[25], times[49]
            );
        }
    }
}
