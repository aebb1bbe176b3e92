//! The rules of `[agent.announce]`: the kernel routing table, route
//! protocol and device of the announced VIP routes.

use super::*;
use crate::config::{
    model::{AnnounceSettings, DEFAULT_ANNOUNCE_DEVICE, DEFAULT_ANNOUNCE_PROTOCOL},
    raw::RawAnnounce,
};

/// The kernel's reserved tables: default, main, local.
const RESERVED_TABLES: [(u32, &str); 3] = [(253, "default"), (254, "main"), (255, "local")];
/// Route protocols up to this one are the kernel's own (unspec, redirect,
/// kernel, boot, static).
const LAST_KERNEL_PROTOCOL: i64 = 4;

/// The kernel's `dev_valid_name()`.
pub(super) fn ifname_ok(name: &str) -> bool {
    !name.is_empty()
        && name.len() < 16
        && name != "."
        && name != ".."
        && !name
            .chars()
            .any(|c| c == '/' || c == ':' || c.is_whitespace())
}

impl Ctx<'_> {
    /// `[agent.announce]`: `None` when absent. `table` is required in it;
    /// `protocol` defaults to [`DEFAULT_ANNOUNCE_PROTOCOL`], `device` to
    /// [`DEFAULT_ANNOUNCE_DEVICE`].
    pub(super) fn announce(
        &self,
        raw: Option<&S<RawAnnounce>>,
    ) -> Result<Option<AnnounceSettings>, ConfigError> {
        let Some(raw) = raw else {
            return Ok(None);
        };
        let r = raw.get_ref();
        let Some(t) = &r.table else {
            return Err(self.error(
                raw.span(),
                "agent.announce.table",
                "missing: the routing table of the announced routes (remove [agent.announce] to announce nothing)",
            ));
        };
        let table = self.int(t, "agent.announce.table", 1u32, u32::MAX)?;
        if let Some((_, name)) = RESERVED_TABLES.iter().find(|(n, _)| *n == table) {
            return Err(self.error(
                t.span(),
                "agent.announce.table",
                format!("{table} is the kernel's {name} table: use a table of its own (e.g. 100)"),
            ));
        }
        let protocol = match &r.protocol {
            Some(v) if (0..=LAST_KERNEL_PROTOCOL).contains(v.get_ref()) => {
                return Err(self.error(
                    v.span(),
                    "agent.announce.protocol",
                    format!(
                        "{} is reserved by the kernel (0-{LAST_KERNEL_PROTOCOL}: unspec, redirect, kernel, boot, static); use 5..=255, e.g. {DEFAULT_ANNOUNCE_PROTOCOL}",
                        v.get_ref()
                    ),
                ));
            }
            Some(v) => self.int(v, "agent.announce.protocol", 5u8, u8::MAX)?,
            None => DEFAULT_ANNOUNCE_PROTOCOL,
        };
        let device = match &r.device {
            Some(v) => {
                let name = v.get_ref();
                if !ifname_ok(name) {
                    return Err(self.error(
                        v.span(),
                        "agent.announce.device",
                        format!(
                            "invalid interface name {name:?}: expected 1 to 15 bytes without '/', ':' or whitespace"
                        ),
                    ));
                }
                name.clone()
            }
            None => DEFAULT_ANNOUNCE_DEVICE.to_owned(),
        };
        Ok(Some(AnnounceSettings {
            table,
            protocol,
            device,
        }))
    }
}
