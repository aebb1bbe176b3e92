//! Per-VIP source access control: the layout of the ACL4/ACL6 LPM tries
//! and of the per-VIP ACL word (VIP_ACL), shared by the XDP program and
//! the agent.
//!
//! Each family has one LPM trie for every VIP. A key is the VIP's 32-bit
//! tag (`vip_index << 1 | bank`, big-endian) followed by the address, and
//! its prefix length counts the tag's 32 bits: a lookup with a VIP's tag
//! can only match that VIP's (and that bank's) prefixes. Two banks per
//! VIP let the agent write a new ACL next to the one in force and switch
//! with one aligned 32-bit store of the VIP's word; packets see the old
//! ACL or the new one whole, never a mix.

/// Default `[agent] acl_entries`: elements of each LPM trie (ACL4, ACL6).
/// The tries allocate nodes as prefixes are inserted, so the size is a
/// ceiling, not memory taken up front. It holds one VIP of 100 000
/// prefixes during a flip (both banks) with room to spare.
pub const DEFAULT_ACL_ENTRIES: u32 = 262_144;

/// VIP_ACL word bit: the VIP has an ACL (a word of 0 means none: no
/// lookup at all).
pub const ACL_ENABLED: u32 = 1;
/// VIP_ACL word bit: the bank in force (0 or 1).
pub const ACL_BANK: u32 = 2;
/// VIP_ACL word bit: a source matching no prefix is denied (the allow
/// list is not empty).
pub const ACL_DEFAULT_DENY: u32 = 4;
/// The generation counter lives above this bit: every flip changes the
/// word, so flow cache entries made under the old word stop matching.
pub const ACL_GENERATION_SHIFT: u32 = 8;

/// LPM trie value: the prefix comes from the allow list.
pub const ACL_ALLOW: u32 = 1;
/// LPM trie value: the prefix comes from the deny list.
pub const ACL_DENY: u32 = 2;

/// Bits of the tag in front of the address, counted in every prefix
/// length.
pub const ACL_TAG_BITS: u32 = 32;

/// ACL4 key data: tag (big-endian) then the IPv4 address as on the wire.
pub type AclData4 = [u8; 8];
/// ACL6 key data: tag (big-endian) then the IPv6 address as on the wire.
pub type AclData6 = [u8; 20];

/// The tag of VIP `vip_index`'s bank `bank` (0 or 1), big-endian.
#[inline(always)]
pub const fn acl_tag(vip_index: u32, bank: u32) -> [u8; 4] {
    ((vip_index << 1) | (bank & 1)).to_be_bytes()
}

/// The bank in force of a non-zero word.
#[inline(always)]
pub const fn acl_bank(word: u32) -> u32 {
    (word & ACL_BANK) >> 1
}

/// A word's generation.
#[inline(always)]
pub const fn acl_generation(word: u32) -> u32 {
    word >> ACL_GENERATION_SHIFT
}

/// The word of an enabled ACL in `bank` with generation `generation`
/// (truncated to the 24 bits it has; never 0, as the enabled bit is set).
#[inline(always)]
pub const fn acl_word(bank: u32, default_deny: bool, generation: u32) -> u32 {
    ACL_ENABLED
        | ((bank & 1) << 1)
        | if default_deny { ACL_DEFAULT_DENY } else { 0 }
        | (generation << ACL_GENERATION_SHIFT)
}

/// ACL4 key data for `addr` (4 bytes as on the wire) under `tag`.
#[inline(always)]
pub const fn acl_data4(tag: [u8; 4], addr: [u8; 4]) -> AclData4 {
    [
        tag[0], tag[1], tag[2], tag[3], addr[0], addr[1], addr[2], addr[3],
    ]
}

/// ACL6 key data for `addr` (16 bytes as on the wire) under `tag`.
#[inline(always)]
pub fn acl_data6(tag: [u8; 4], addr: [u8; 16]) -> AclData6 {
    let mut d = [0u8; 20];
    let mut i = 0;
    while i < 4 {
        d[i] = tag[i];
        i += 1;
    }
    while i < 20 {
        d[i] = addr[i - 4];
        i += 1;
    }
    d
}

/// Whether a source is allowed given the trie's answer (`verdict`, None
/// when no prefix matched) and the VIP's word.
#[inline(always)]
pub const fn acl_allows(verdict: Option<u32>, word: u32) -> bool {
    match verdict {
        Some(v) => v == ACL_ALLOW,
        None => word & ACL_DEFAULT_DENY == 0,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn word_fields_round_trip_and_a_word_is_never_zero() {
        let w = acl_word(1, true, 0xab_cdef);
        assert_eq!(acl_bank(w), 1);
        assert_eq!(acl_generation(w), 0xab_cdef);
        assert_ne!(w & ACL_DEFAULT_DENY, 0);
        assert_ne!(acl_word(0, false, 0), 0);
        assert_eq!(acl_tag(3, 1), [0, 0, 0, 7]);
        assert_eq!(acl_data6([0, 0, 0, 7], [0xff; 16])[..5], [0, 0, 0, 7, 0xff]);
    }

    #[test]
    fn no_match_follows_the_default() {
        assert!(acl_allows(None, acl_word(0, false, 1)));
        assert!(!acl_allows(None, acl_word(0, true, 1)));
        assert!(acl_allows(Some(ACL_ALLOW), acl_word(0, true, 1)));
        assert!(!acl_allows(Some(ACL_DENY), acl_word(0, false, 1)));
    }
}
