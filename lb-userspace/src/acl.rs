//! Per-VIP source access control, the agent's side: the configured ACL
//! ([`VipAcl`]) and its decision for one address (what `lb explain`
//! says), what the kernel holds ([`AclState`], read back after a
//! restart), and the write sequence that switches a VIP from one ACL to
//! another without a window ([`sync`], [`prune`]).
//!
//! The switch (see lb_common::acl): the new prefixes go into the VIP's
//! inactive bank, then one store of the VIP's word makes that bank the
//! one in force, then the old bank's prefixes are deleted. Packets see
//! the old ACL or the new one whole. Removing an ACL stores word 0 first
//! and deletes after.

use std::{
    collections::{BTreeMap, BTreeSet},
    net::IpAddr,
};

use lb_common::acl::{ACL_ALLOW, ACL_DEFAULT_DENY, ACL_DENY, acl_bank, acl_generation, acl_word};

pub use crate::decap::Cidr;

/// The most prefixes (allow + deny) one VIP may have.
pub const MAX_ACL_PREFIXES: usize = 100_000;

/// A VIP's `allow` and `deny` lists, validated: prefixes of the VIP's
/// family, host bits clear, no prefix in both lists (each list sorted,
/// without duplicates).
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct VipAcl {
    pub allow: Vec<Cidr>,
    pub deny: Vec<Cidr>,
}

/// What a VIP's ACL says about one source.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct AclDecision {
    pub allowed: bool,
    /// The longest matching prefix, None when the default decided.
    pub by: Option<Cidr>,
}

impl VipAcl {
    /// No ACL: every source is allowed and the kernel does no lookup.
    pub fn is_empty(&self) -> bool {
        self.allow.is_empty() && self.deny.is_empty()
    }

    pub fn len(&self) -> usize {
        self.allow.len() + self.deny.len()
    }

    /// A source matching no prefix is denied when there is an allow list.
    pub fn default_deny(&self) -> bool {
        !self.allow.is_empty()
    }

    /// Every prefix with its trie value.
    pub fn entries(&self) -> BTreeMap<Cidr, u32> {
        let allow = self.allow.iter().map(|c| (*c, ACL_ALLOW));
        let deny = self.deny.iter().map(|c| (*c, ACL_DENY));
        allow.chain(deny).collect()
    }

    /// The kernel's decision for `src`: the longest matching prefix of
    /// either list, else the default.
    pub fn decide(&self, src: IpAddr) -> AclDecision {
        let allow = self.allow.iter().map(|c| (c, true));
        let deny = self.deny.iter().map(|c| (c, false));
        let best = allow
            .chain(deny)
            .filter(|(c, _)| c.contains(src))
            .max_by_key(|(c, _)| c.prefix_len);
        match best {
            Some((c, allowed)) => AclDecision {
                allowed,
                by: Some(*c),
            },
            None => AclDecision {
                allowed: !self.default_deny(),
                by: None,
            },
        }
    }

    /// `allow N, deny M` (or `none`), for `lb vip list`.
    pub fn summary(&self) -> String {
        if self.is_empty() {
            "none".into()
        } else {
            format!("allow {}, deny {}", self.allow.len(), self.deny.len())
        }
    }
}

/// One VIP's ACL as the kernel holds it.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct VipAclState {
    /// The VIP_ACL word (never 0 here).
    pub word: u32,
    /// The prefixes of the bank in force, with their trie values.
    pub prefixes: BTreeMap<Cidr, u32>,
}

/// Every VIP's ACL in the kernel, by VIP index, and prefixes left in
/// banks not in force (by an agent stopped during a switch), which the
/// next [`sync`] deletes before it reuses the bank.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct AclState {
    pub vips: BTreeMap<u32, VipAclState>,
    /// (VIP index, bank) → prefixes.
    pub stale: BTreeMap<(u32, u32), BTreeSet<Cidr>>,
}

impl AclState {
    /// Sorts what the maps hold (`words` by VIP index, every trie entry
    /// as (index, bank, prefix, value)) into the banks in force and the
    /// leftovers.
    pub fn from_maps(
        words: impl IntoIterator<Item = (u32, u32)>,
        entries: impl IntoIterator<Item = (u32, u32, Cidr, u32)>,
    ) -> Self {
        let mut s = AclState::default();
        for (index, word) in words {
            if word != 0 {
                s.vips.insert(
                    index,
                    VipAclState {
                        word,
                        prefixes: BTreeMap::new(),
                    },
                );
            }
        }
        for (index, bank, cidr, value) in entries {
            match s.vips.get_mut(&index) {
                Some(v) if acl_bank(v.word) == bank => {
                    v.prefixes.insert(cidr, value);
                }
                _ => {
                    s.stale.entry((index, bank)).or_default().insert(cidr);
                }
            }
        }
        s
    }

    /// Prefixes in force, per family, over all VIPs.
    pub fn len(&self) -> usize {
        self.vips.values().map(|v| v.prefixes.len()).sum()
    }

    pub fn is_empty(&self) -> bool {
        self.vips.is_empty()
    }
}

/// The ACL writes the data path offers (ACL4/ACL6 and VIP_ACL).
pub trait AclMaps {
    type AclError: std::error::Error + Send + Sync + 'static;

    /// Inserts (or overwrites) prefixes of VIP `index`'s bank `bank`.
    fn acl_insert(
        &mut self,
        index: u32,
        bank: u32,
        entries: &BTreeMap<Cidr, u32>,
    ) -> Result<(), Self::AclError>;
    /// Deletes prefixes of VIP `index`'s bank `bank` (absent ones are
    /// not an error).
    fn acl_delete(
        &mut self,
        index: u32,
        bank: u32,
        prefixes: &mut dyn Iterator<Item = Cidr>,
    ) -> Result<(), Self::AclError>;
    /// Stores VIP `index`'s word: one aligned 32-bit write.
    fn acl_set_word(&mut self, index: u32, word: u32) -> Result<(), Self::AclError>;
    /// What the maps hold.
    fn acl_read(&self) -> Result<AclState, Self::AclError>;
}

/// Brings VIP `index`'s ACL in the kernel to `want` (none when empty),
/// keeping `state` true to what was written. An unchanged ACL costs no
/// write.
pub fn sync<M: AclMaps>(
    maps: &mut M,
    state: &mut AclState,
    index: u32,
    want: &VipAcl,
) -> Result<(), M::AclError> {
    if want.is_empty() {
        return remove(maps, state, index);
    }
    let entries = want.entries();
    let (old_bank, generation) = match state.vips.get(&index) {
        Some(v)
            if v.prefixes == entries && (v.word & ACL_DEFAULT_DENY != 0) == want.default_deny() =>
        {
            return Ok(());
        }
        Some(v) => (
            Some(acl_bank(v.word)),
            acl_generation(v.word).wrapping_add(1),
        ),
        None => (None, 1),
    };
    let bank = old_bank.map_or(0, |b| b ^ 1);
    // Leftovers of an interrupted switch in the bank about to be used.
    if let Some(stale) = state.stale.remove(&(index, bank)) {
        maps.acl_delete(index, bank, &mut stale.iter().copied())
            .inspect_err(|_| {
                state.stale.insert((index, bank), stale.clone());
            })?;
    }
    if let Err(e) = maps.acl_insert(index, bank, &entries) {
        // The bank is not in force: whatever went in is a leftover.
        let _ = maps.acl_delete(index, bank, &mut entries.keys().copied());
        return Err(e);
    }
    let word = acl_word(bank, want.default_deny(), generation);
    if let Err(e) = maps.acl_set_word(index, word) {
        // Not switched: the new bank is a leftover for the next try.
        state
            .stale
            .insert((index, bank), entries.into_keys().collect());
        return Err(e);
    }
    let old = state.vips.insert(
        index,
        VipAclState {
            word,
            prefixes: entries,
        },
    );
    if let (Some(old), Some(old_bank)) = (old, old_bank) {
        let old_prefixes: BTreeSet<Cidr> = old.prefixes.into_keys().collect();
        if let Err(e) = maps.acl_delete(index, old_bank, &mut old_prefixes.iter().copied()) {
            state.stale.insert((index, old_bank), old_prefixes);
            return Err(e);
        }
    }
    Ok(())
}

/// Removes VIP `index`'s ACL: word 0 first (no lookup from then on), then
/// its prefixes.
pub fn remove<M: AclMaps>(
    maps: &mut M,
    state: &mut AclState,
    index: u32,
) -> Result<(), M::AclError> {
    let Some(old) = state.vips.get(&index).cloned() else {
        return Ok(());
    };
    maps.acl_set_word(index, 0)?;
    state.vips.remove(&index);
    let bank = acl_bank(old.word);
    let prefixes: BTreeSet<Cidr> = old.prefixes.into_keys().collect();
    if let Err(e) = maps.acl_delete(index, bank, &mut prefixes.iter().copied()) {
        state.stale.insert((index, bank), prefixes);
        return Err(e);
    }
    Ok(())
}

/// Removes the ACL of every VIP index not in `live`, and every leftover
/// of an index not in `live`: after the VIP entries that used them are
/// gone.
pub fn prune<M: AclMaps>(
    maps: &mut M,
    state: &mut AclState,
    live: &BTreeSet<u32>,
) -> Result<(), M::AclError> {
    let gone: Vec<u32> = state
        .vips
        .keys()
        .copied()
        .filter(|i| !live.contains(i))
        .collect();
    for index in gone {
        remove(maps, state, index)?;
    }
    let stale: Vec<(u32, u32)> = state
        .stale
        .keys()
        .copied()
        .filter(|(i, _)| !live.contains(i))
        .collect();
    for key in stale {
        if let Some(p) = state.stale.remove(&key) {
            maps.acl_delete(key.0, key.1, &mut p.iter().copied())
                .inspect_err(|_| {
                    state.stale.insert(key, p.clone());
                })?;
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests;
