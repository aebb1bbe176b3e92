//! Module of the lb-ebpf binary: per-VIP source access control (see
//! lb_common::acl for the key and word layouts).
//!
//! A VIP without an ACL costs one array load (its word is 0). With one,
//! the source is looked up in the family's LPM trie under the VIP's tag
//! and the bank the word names; the longest matching prefix of the allow
//! and deny lists decides, and a source matching none follows the word's
//! default. The balancer folds the word into the flow cache's check
//! (steer.rs), so a cache hit proves the flow passed this very ACL and
//! skips the lookup; after a flip the cached copies stop matching and
//! every flow is looked up again under the new ACL.

use aya_ebpf::{
    macros::map,
    maps::{Array, LpmTrie, lpm_trie::Key},
};
use lb_common::{
    DEFAULT_MAX_VIPS, FlowKey, FlowKey6, Reason,
    acl::{
        ACL_TAG_BITS, AclData4, AclData6, DEFAULT_ACL_ENTRIES, acl_allows, acl_bank, acl_data4,
        acl_data6, acl_tag,
    },
};

use crate::VIP_STATS;

/// IPv4 prefixes of every VIP's ACL, both banks (sized by the agent:
/// `acl_entries`).
#[map]
static ACL4: LpmTrie<AclData4, u32> = LpmTrie::pinned(DEFAULT_ACL_ENTRIES, 0);

/// IPv6 prefixes of every VIP's ACL, both banks.
#[map]
static ACL6: LpmTrie<AclData6, u32> = LpmTrie::pinned(DEFAULT_ACL_ENTRIES, 0);

/// Per VIP index: the ACL word (0: no ACL). The agent switches a VIP's
/// ACL with one aligned store of this word.
#[map]
static VIP_ACL: Array<u32> = Array::pinned(DEFAULT_MAX_VIPS, 0);

/// The ACL word of VIP `vip_index` (0: none).
#[inline(always)]
pub(crate) fn word(vip_index: u32) -> u32 {
    match VIP_ACL.get_ptr(vip_index) {
        // SAFETY: an array value, valid for the program's run; one aligned
        // 32-bit load sees the old word or the new one.
        Some(w) => unsafe { core::ptr::read_volatile(w) },
        None => 0,
    }
}

/// A flow whose source the ACL can judge.
pub(crate) trait Source {
    /// The trie's value for the longest prefix under `tag` that holds
    /// the source, if any.
    fn verdict(&self, tag: [u8; 4]) -> Option<u32>;
}

impl Source for FlowKey {
    #[inline(always)]
    fn verdict(&self, tag: [u8; 4]) -> Option<u32> {
        let key = Key::new(
            ACL_TAG_BITS + 32,
            acl_data4(tag, self.src_addr.to_ne_bytes()),
        );
        ACL4.get(&key).copied()
    }
}

impl Source for FlowKey6 {
    #[inline(always)]
    fn verdict(&self, tag: [u8; 4]) -> Option<u32> {
        let s = self.src_addr;
        let mut addr = [0u8; 16];
        for i in 0..4 {
            let b = s[i].to_ne_bytes();
            addr[4 * i] = b[0];
            addr[4 * i + 1] = b[1];
            addr[4 * i + 2] = b[2];
            addr[4 * i + 3] = b[3];
        }
        let key = Key::new(ACL_TAG_BITS + 128, acl_data6(tag, addr));
        ACL6.get(&key).copied()
    }
}

/// Whether VIP `vip_index`, whose ACL word is `word`, admits `flow`'s
/// source: `Err(DropAclDenied)`, counted for the VIP, if not.
#[inline(always)]
pub(crate) fn check<S: Source>(flow: &S, vip_index: u32, word: u32) -> Result<(), Reason> {
    if word == 0 {
        return Ok(());
    }
    let verdict = flow.verdict(acl_tag(vip_index, acl_bank(word)));
    if acl_allows(verdict, word) {
        return Ok(());
    }
    if let Some(s) = VIP_STATS.get_ptr_mut(vip_index) {
        // SAFETY: per-CPU slot.
        unsafe { (*s).acl_denied += 1 };
    }
    Err(Reason::DropAclDenied)
}
