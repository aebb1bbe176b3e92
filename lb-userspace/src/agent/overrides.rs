//! What operators changed with the CLI on top of the configuration file
//! (backends added, removed, drained, reweighted). A reload keeps every
//! override whose backend the file left as it was, and drops (with a log
//! line) those the file changed: the newer word wins. No I/O.

use std::{collections::BTreeMap, net::IpAddr};

use crate::{
    config::{BackendConfig, Config},
    control::OverrideView,
    keys::{BackendKey, VipId},
};

/// One backend's override.
#[derive(Clone, Debug, PartialEq, Eq)]
struct Override {
    /// The file's entry when the override was made (`None`: the file has
    /// no such backend).
    base: Option<BackendConfig>,
    /// What the backend is instead (`None`: removed).
    now: Option<BackendConfig>,
}

#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Overrides {
    by_backend: BTreeMap<BackendKey, Override>,
}

fn find<'a>(cfg: &'a Config, key: &BackendKey) -> Option<&'a BackendConfig> {
    cfg.vips
        .iter()
        .find(|v| VipId::of(v) == key.vip)
        .and_then(|v| v.backends.iter().find(|b| b.address == key.address))
}

impl Overrides {
    /// Records that the CLI made `key` what `now` says (`None`: removed),
    /// where `file` holds the configuration file's view.
    pub fn set(&mut self, file: &Config, key: BackendKey, now: Option<BackendConfig>) {
        let base = find(file, &key).cloned();
        if base == now {
            self.by_backend.remove(&key);
        } else {
            self.by_backend.insert(key, Override { base, now });
        }
    }

    pub fn is_empty(&self) -> bool {
        self.by_backend.is_empty()
    }

    /// The configuration in force: `file` with the overrides applied.
    pub fn apply(&self, file: &Config) -> Config {
        let mut cfg = file.clone();
        for vip in &mut cfg.vips {
            let id = VipId::of(vip);
            let here: Vec<(IpAddr, &Override)> = self
                .by_backend
                .iter()
                .filter(|(k, _)| k.vip == id)
                .map(|(k, o)| (k.address, o))
                .collect();
            vip.backends
                .retain_mut(|b| match here.iter().find(|(a, _)| *a == b.address) {
                    Some((_, o)) => match &o.now {
                        Some(now) => {
                            *b = now.clone();
                            true
                        }
                        None => false,
                    },
                    None => true,
                });
            for (address, o) in &here {
                if let Some(now) = &o.now
                    && !vip.backends.iter().any(|b| b.address == *address)
                {
                    vip.backends.push(now.clone());
                }
            }
        }
        cfg
    }

    /// Moves the overrides onto a reloaded file: those whose backend the
    /// new file changed (or whose VIP it dropped) are dropped. Returns a
    /// line per dropped override.
    pub fn rebase(&mut self, new_file: &Config) -> Vec<String> {
        let mut dropped = Vec::new();
        self.by_backend.retain(|key, o| {
            let vip_kept = new_file.vips.iter().any(|v| VipId::of(v) == key.vip);
            let now = find(new_file, key);
            if vip_kept && now == o.base.as_ref() {
                return true;
            }
            dropped.push(format!(
                "backend {key}: the reloaded file changed it; the CLI's change ({}) is dropped",
                describe(o)
            ));
            false
        });
        dropped
    }

    /// Drops the overrides of `vip` (all VIPs when `None`), of `address`
    /// only when given. Returns how many.
    pub fn clear(&mut self, vip: Option<VipId>, address: Option<IpAddr>) -> usize {
        let before = self.by_backend.len();
        self.by_backend.retain(|k, _| {
            !(vip.is_none_or(|v| v == k.vip) && address.is_none_or(|a| a == k.address))
        });
        before - self.by_backend.len()
    }

    /// Every override, with the VIP named as in `cfg`.
    pub fn views(&self, cfg: &Config) -> Vec<OverrideView> {
        self.by_backend
            .iter()
            .map(|(k, o)| OverrideView {
                vip: cfg
                    .vips
                    .iter()
                    .find(|v| VipId::of(v) == k.vip)
                    .map_or_else(|| k.vip.to_string(), |v| v.name.clone()),
                address: k.address,
                change: describe(o),
            })
            .collect()
    }
}

fn describe(o: &Override) -> String {
    match (&o.base, &o.now) {
        (None, Some(_)) => "added".into(),
        (_, None) => "removed".into(),
        (Some(f), Some(n)) => {
            let mut parts = Vec::new();
            if f.state != n.state {
                parts.push(format!(
                    "state {} (file: {})",
                    n.state.as_str(),
                    f.state.as_str()
                ));
            }
            if f.weight != n.weight {
                parts.push(format!("weight {} (file: {})", n.weight, f.weight));
            }
            if parts.is_empty() {
                parts.push("changed".into());
            }
            parts.join(", ")
        }
    }
}

/// The backend `address` of `vip` in `cfg`, as an override records it.
pub fn entry(cfg: &Config, vip: VipId, address: IpAddr) -> Option<BackendConfig> {
    find(cfg, &BackendKey { vip, address }).cloned()
}

#[cfg(test)]
mod tests {
    #[allow(unused_imports)]
    use std::net::{IpAddr, Ipv4Addr};

    use super::*;
    use crate::agent::state::tests::config;
    use crate::config::BackendState;
    #[allow(unused_imports)]
    use crate::keys::ip4;

    fn key(b: u8) -> BackendKey {
        BackendKey {
            vip: VipId::of(&config(&[(1, &[])], "tcp").vips[0]),
            address: ip4(198, 18, 0, b),
        }
    }

    fn state_of(cfg: &Config, b: u8) -> Option<(BackendState, u32)> {
        find(cfg, &key(b)).map(|e| (e.state, e.weight))
    }

    fn drained(file: &Config, b: u8) -> BackendConfig {
        let mut e = find(file, &key(b)).unwrap().clone();
        e.state = BackendState::Drain;
        e
    }

    #[test]
    fn a_drain_survives_the_reload_of_an_unchanged_file() {
        let file = config(&[(1, &[(11, 1), (12, 1)])], "tcp");
        let mut o = Overrides::default();
        o.set(&file, key(12), Some(drained(&file, 12)));
        assert_eq!(
            state_of(&o.apply(&file), 12),
            Some((BackendState::Drain, 1))
        );
        let reloaded = file.clone();
        assert!(o.rebase(&reloaded).is_empty());
        assert_eq!(
            state_of(&o.apply(&reloaded), 12),
            Some((BackendState::Drain, 1))
        );
        assert_eq!(o.views(&reloaded)[0].change, "state drain (file: active)");
    }

    #[test]
    fn the_file_wins_where_it_changed_the_backend() {
        let file = config(&[(1, &[(11, 1), (12, 1)])], "tcp");
        let mut o = Overrides::default();
        o.set(&file, key(12), Some(drained(&file, 12)));
        let reweighted = config(&[(1, &[(11, 1), (12, 3)])], "tcp");
        let dropped = o.rebase(&reweighted);
        assert_eq!(dropped.len(), 1, "{dropped:?}");
        assert!(dropped[0].contains("198.18.0.12"), "{dropped:?}");
        assert_eq!(
            state_of(&o.apply(&reweighted), 12),
            Some((BackendState::Active, 3))
        );
        assert!(o.is_empty());
    }

    #[test]
    fn added_and_removed_backends_are_kept_and_can_be_cleared() {
        let file = config(&[(1, &[(11, 1), (12, 1)])], "tcp");
        let mut o = Overrides::default();
        let mut added = find(&file, &key(11)).unwrap().clone();
        added.address = ip4(198, 18, 0, 13);
        o.set(&file, key(13), Some(added));
        o.set(&file, key(11), None);
        let cfg = o.apply(&file);
        let addrs: Vec<u8> = cfg.vips[0]
            .backends
            .iter()
            .map(|b| crate::keys::last_octet(b.address))
            .collect();
        assert_eq!(addrs, vec![12, 13]);
        assert!(o.rebase(&file).is_empty());
        assert_eq!(o.apply(&file), cfg);
        // A change back to the file's entry is no override.
        o.set(&file, key(11), find(&file, &key(11)).cloned());
        assert_eq!(o.views(&file).len(), 1);
        assert_eq!(o.clear(None, Some(key(13).address)), 1);
        assert_eq!(o.apply(&file), file);
    }
}
