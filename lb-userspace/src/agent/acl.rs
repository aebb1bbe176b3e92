//! The core's ACL step around each reconcile: every configured VIP's ACL
//! brought to the configuration before the VIP entries are written (so a
//! new VIP is never reachable without its ACL), and the ACLs of VIPs that
//! went away removed after their entries.

use std::collections::BTreeSet;

use anyhow::Context;

use super::core::Core;
use crate::{acl, keys::VipId, reconcile::KernelMaps};

impl<M: KernelMaps> Core<M> {
    /// Writes the ACL of every configured VIP that has an index; returns
    /// those indices. VIPs whose ACL shrinks go first, so that the tries
    /// hold at most one VIP's two banks at a time.
    pub(super) fn sync_acls(&mut self) -> anyhow::Result<BTreeSet<u32>> {
        let mut order: Vec<(i64, u32, usize)> = Vec::new();
        for (i, vip) in self.cfg.vips.iter().enumerate() {
            let Some(index) = self.state.vip_index(&VipId::of(vip)) else {
                continue;
            };
            let now = self
                .image
                .acl
                .vips
                .get(&index)
                .map_or(0, |v| v.prefixes.len());
            order.push((vip.acl.len() as i64 - now as i64, index, i));
        }
        order.sort();
        let mut live = BTreeSet::new();
        for (_, index, i) in order {
            let vip = &self.cfg.vips[i];
            live.insert(index);
            acl::sync(&mut self.maps, &mut self.image.acl, index, &vip.acl)
                .with_context(|| format!("VIP {:?}: writing its ACL", vip.name))?;
        }
        Ok(live)
    }

    /// Removes the ACLs of VIP indices not in `live`.
    pub(super) fn prune_acls(&mut self, live: &BTreeSet<u32>) -> anyhow::Result<()> {
        acl::prune(&mut self.maps, &mut self.image.acl, live).context("removing ACLs")
    }
}
