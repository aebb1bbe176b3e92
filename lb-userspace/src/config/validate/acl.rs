//! The rules of source access control: a VIP's `allow` and `deny` lists
//! and `[agent] acl_entries`.

use std::collections::BTreeMap;

use super::*;
use crate::acl::{Cidr, MAX_ACL_PREFIXES, VipAcl};

/// Largest `acl_entries` (elements of each LPM trie).
const MAX_ACL_ENTRIES: u32 = 1 << 24;

impl Ctx<'_> {
    /// `[agent] acl_entries`.
    pub(super) fn acl_entries(&self, raw: &RawAgent) -> Result<u32, ConfigError> {
        self.opt_int(
            raw.acl_entries.as_ref(),
            "agent.acl_entries",
            1,
            MAX_ACL_ENTRIES,
            lb_common::acl::DEFAULT_ACL_ENTRIES,
        )
    }

    /// VIP `name`'s (at `path`, address `vip`) `allow` and `deny` lists.
    pub(super) fn vip_acl(
        &self,
        path: &str,
        name: &str,
        r: &RawVip,
        vip: IpAddr,
    ) -> Result<VipAcl, ConfigError> {
        let mut seen: BTreeMap<Cidr, String> = BTreeMap::new();
        let mut acl = VipAcl::default();
        let total = r.allow.as_ref().map_or(0, |l| l.get_ref().len())
            + r.deny.as_ref().map_or(0, |l| l.get_ref().len());
        if total > MAX_ACL_PREFIXES {
            let span = r
                .allow
                .as_ref()
                .or(r.deny.as_ref())
                .map_or(r.address.span(), |l| l.span());
            return Err(self.error(
                span,
                format!("{path}.allow"),
                format!(
                    "VIP {name:?} has {total} allow and deny prefixes, more than the {MAX_ACL_PREFIXES} a VIP may have"
                ),
            ));
        }
        for (key, list) in [("allow", &r.allow), ("deny", &r.deny)] {
            let Some(list) = list else { continue };
            let out = if key == "allow" {
                &mut acl.allow
            } else {
                &mut acl.deny
            };
            for (i, v) in list.get_ref().iter().enumerate() {
                let field = format!("{path}.{key}[{i}]");
                let s = v.get_ref();
                let bad = |why: String| {
                    self.error(
                        v.span(),
                        field.clone(),
                        format!("VIP {name:?}: {key} entry {s:?}: {why}"),
                    )
                };
                let c: Cidr = s.parse().map_err(bad)?;
                if c.addr.is_ipv4() != vip.is_ipv4() {
                    return Err(bad(format!(
                        "an {} prefix, but the VIP's address {vip} is {}",
                        if c.addr.is_ipv4() { "IPv4" } else { "IPv6" },
                        if vip.is_ipv4() { "IPv4" } else { "IPv6" }
                    )));
                }
                let here = format!("{key}[{i}]");
                if let Some(first) = seen.get(&c) {
                    return Err(bad(format!("the same prefix as {first}")));
                }
                seen.insert(c, here);
                out.push(c);
            }
        }
        acl.allow.sort();
        acl.deny.sort();
        Ok(acl)
    }

    /// The tries hold every VIP's prefixes of their family, plus, during a
    /// switch, a second copy of one VIP's: the largest VIP's must fit
    /// twice.
    pub(super) fn check_acl_total(
        &self,
        raw: &RawFile,
        vips: &[VipConfig],
        acl_entries: u32,
    ) -> Result<(), ConfigError> {
        for v4 in [true, false] {
            let of_family = || vips.iter().filter(|v| v.address.is_ipv4() == v4);
            let total: usize = of_family().map(|v| v.acl.len()).sum();
            let largest = of_family().map(|v| v.acl.len()).max().unwrap_or(0);
            if total + largest > acl_entries as usize {
                let (i, v) = vips
                    .iter()
                    .enumerate()
                    .filter(|(_, v)| v.address.is_ipv4() == v4)
                    .max_by_key(|(_, v)| v.acl.len())
                    .expect("a VIP has prefixes");
                let span = raw
                    .agent
                    .as_ref()
                    .and_then(|a| a.acl_entries.as_ref().map(|e| e.span()))
                    .unwrap_or_else(|| raw.vip[i].span());
                return Err(self.error(
                    span,
                    "agent.acl_entries",
                    format!(
                        "the {} VIPs' ACLs have {total} prefixes; with a second copy of the largest (VIP {:?}, {largest}) during a reload they need {} trie entries, more than acl_entries = {acl_entries}",
                        if v4 { "IPv4" } else { "IPv6" },
                        v.name,
                        total + largest
                    ),
                ));
            }
        }
        Ok(())
    }
}
