//! Incremental Internet checksum updates (RFC 1624, eqn. 3:
//! `HC' = ~(~HC + ~m + m')`), for NAT's address and port rewrites.
//!
//! Everything works on words as loaded natively from the wire bytes
//! (no byte swaps): the one's-complement sum is byte-order independent as
//! long as the checksum field is read and written the same way, and its
//! two special values (0 and 0xFFFF) read the same either way round.
//!
//! A change is first accumulated into a delta ([`diff32`], [`diff16`]),
//! one per set of rewritten words, then applied to each checksum that
//! covers them ([`apply`]): the IPv4 header checksum takes the address
//! delta, TCP and UDP (pseudo-header) the address and port deltas. A
//! delta is a 64-bit one's-complement accumulator: a packet's few dozen
//! words can never overflow it.

/// `acc` plus the change of a 32-bit word from `old` to `new`: `~old +
/// new`, summed as one word (2^32 ≡ 2^16 ≡ 1 modulo 0xFFFF, so a 32-bit
/// word sums as its two halves would).
#[inline(always)]
pub const fn diff32(acc: u64, old: u32, new: u32) -> u64 {
    acc + (!old) as u64 + new as u64
}

/// `acc` plus the change of a 16-bit word from `old` to `new`.
#[inline(always)]
pub const fn diff16(acc: u64, old: u16, new: u16) -> u64 {
    acc + (!old) as u64 + new as u64
}

/// `acc` plus the change of four words (an IPv6 address, or an IPv4 one
/// in word 0 with the rest 0 on both sides).
#[inline(always)]
pub const fn diff128(acc: u64, old: &[u32; 4], new: &[u32; 4]) -> u64 {
    let acc = diff32(acc, old[0], new[0]);
    let acc = diff32(acc, old[1], new[1]);
    let acc = diff32(acc, old[2], new[2]);
    diff32(acc, old[3], new[3])
}

/// `acc` plus `word` (a 16-bit word the sum gains, e.g. a pseudo-header
/// field that appears).
#[inline(always)]
pub const fn add32(acc: u64, word: u32) -> u64 {
    acc + word as u64
}

/// Folds a 64-bit one's-complement accumulator to 16 bits (a fixed
/// number of rounds: no loop for the verifier).
#[inline(always)]
pub const fn fold(acc: u64) -> u16 {
    let s = (acc & 0xFFFF_FFFF) + (acc >> 32);
    let s = (s & 0xFFFF_FFFF) + (s >> 32);
    let s = (s & 0xFFFF) + (s >> 16);
    let s = (s & 0xFFFF) + (s >> 16);
    let s = (s & 0xFFFF) + (s >> 16);
    s as u16
}

/// Checksum `sum` (as stored) after the covered data changed by `delta`:
/// `~(~sum + delta)`. Never 0xFFFF for a non-zero input (RFC 1624: the
/// result a from-scratch computation gives).
#[inline(always)]
pub const fn apply(sum: u16, delta: u64) -> u16 {
    !fold(add32(delta, !sum as u32))
}

/// Checksum `sum` after one 16-bit word of the covered data went from
/// `old` to `new` (the ICMP echo reply's type and TTL changes).
#[inline(always)]
pub const fn replace16(sum: u16, old: u16, new: u16) -> u16 {
    apply(sum, diff16(0, old, new))
}

/// A UDP checksum after `delta`: 0 ("no checksum", IPv4) stays 0; a
/// result of 0 is written 0xFFFF (RFC 768: 0 would mean "none").
#[inline(always)]
pub const fn apply_udp(sum: u16, delta: u64) -> u16 {
    if sum == 0 {
        return 0;
    }
    match apply(sum, delta) {
        0 => 0xFFFF,
        s => s,
    }
}

#[cfg(test)]
mod tests {
    extern crate std;
    use super::*;
    use std::vec::Vec;

    /// The Internet checksum of `data` from scratch (big-endian words).
    fn checksum(data: &[u8]) -> u16 {
        let mut sum = 0u32;
        for c in data.chunks(2) {
            sum += u16::from_be_bytes([c[0], *c.get(1).unwrap_or(&0)]) as u32;
        }
        while sum >> 16 != 0 {
            sum = (sum & 0xFFFF) + (sum >> 16);
        }
        !(sum as u16)
    }

    /// A small deterministic generator (xorshift).
    struct Rng(u64);
    impl Rng {
        fn next(&mut self) -> u64 {
            self.0 ^= self.0 << 13;
            self.0 ^= self.0 >> 7;
            self.0 ^= self.0 << 17;
            self.0
        }
    }

    /// Rewrites 32-bit words of random buffers at random aligned offsets
    /// and checks the incremental update against a recomputation, with
    /// words loaded natively (as the kernel does).
    #[test]
    fn incremental_update_matches_a_recomputation() {
        let mut rng = Rng(0x1234_5678_9abc_def1);
        for round in 0..2000 {
            let len = 12 + (rng.next() % 120) as usize * 2;
            let mut data: Vec<u8> = (0..len).map(|_| rng.next() as u8).collect();
            // The checksum lives at bytes 2..4 (as a TCP/UDP/IP field).
            data[2] = 0;
            data[3] = 0;
            let c = checksum(&data);
            data[2..4].copy_from_slice(&c.to_be_bytes());
            let mut delta = 0;
            for _ in 0..(1 + rng.next() % 6) {
                let at = 4 + (rng.next() as usize % ((len - 8) / 4)) * 4;
                let old = u32::from_ne_bytes(data[at..at + 4].try_into().unwrap());
                // Sometimes an all-ones or zero word, the edge cases.
                let new = match rng.next() % 4 {
                    0 => 0,
                    1 => u32::MAX,
                    _ => rng.next() as u32,
                };
                delta = diff32(delta, old, new);
                data[at..at + 4].copy_from_slice(&new.to_ne_bytes());
            }
            let stored = u16::from_ne_bytes([data[2], data[3]]);
            let updated = apply(stored, delta);
            data[2..4].copy_from_slice(&updated.to_ne_bytes());
            assert_eq!(
                checksum(&data),
                0,
                "round {round}: the updated sum verifies"
            );
            data[2] = 0;
            data[3] = 0;
            assert_eq!(
                u16::from_be_bytes(updated.to_ne_bytes()),
                checksum(&data),
                "round {round}: the same value a recomputation gives"
            );
        }
    }

    #[test]
    fn sixteen_bit_changes_and_the_udp_rules() {
        let data = [0x12u8, 0x34, 0, 0, 0xab, 0xcd];
        let mut d = data;
        let c = checksum(&d);
        d[2..4].copy_from_slice(&c.to_be_bytes());
        let old = u16::from_ne_bytes([d[4], d[5]]);
        let new = u16::from_ne_bytes([0x55, 0x66]);
        let sum = u16::from_ne_bytes([d[2], d[3]]);
        let upd = apply(sum, diff16(0, old, new));
        d[4..6].copy_from_slice(&new.to_ne_bytes());
        d[2..4].copy_from_slice(&upd.to_ne_bytes());
        assert_eq!(checksum(&d), 0);
        // UDP: "no checksum" stays; a computed 0 is sent as 0xFFFF.
        assert_eq!(apply_udp(0, diff16(0, 1, 2)), 0);
        // ~(~0x0001 + delta) == 0 when ~0x0001 + delta ≡ 0xFFFF: delta
        // adds 1 (old 0x0000 → new 0x0001 adds ~0 + 1 ≡ 1).
        assert_eq!(apply(0x0001, diff16(0, 0, 1)), 0);
        assert_eq!(apply_udp(0x0001, diff16(0, 0, 1)), 0xFFFF);
        assert_eq!(fold(0), 0);
        assert_eq!(fold(u64::MAX), 0xFFFF);
    }
}
