//! The rules of full NAT: `[agent] nat_port_range`, `nat_entries` and
//! `snat_addresses`, a NAT VIP's own `snat_addresses` and its backends'
//! `port`.

use std::collections::BTreeMap;

use lb_common::nat::MAX_SNAT_ADDRS;

use super::*;
use crate::config::model::{DEFAULT_NAT_PORTS, MIN_NAT_PORT, NatSettings};

/// Default `nat_entries`.
const DEFAULT_NAT_ENTRIES: u32 = lb_common::DEFAULT_NAT_ENTRIES;

impl Ctx<'_> {
    /// `[agent]`'s NAT settings and `nat_entries` (a kernel setting).
    pub(super) fn nat_settings(&self, raw: &RawAgent) -> Result<(NatSettings, u32), ConfigError> {
        let (port_min, port_max) = match &raw.nat_port_range {
            Some(v) => self.port_range(v, "agent.nat_port_range")?,
            None => DEFAULT_NAT_PORTS,
        };
        let nat_entries = self.opt_int(
            raw.nat_entries.as_ref(),
            "agent.nat_entries",
            1,
            MAX_CONNTRACK_ENTRIES,
            DEFAULT_NAT_ENTRIES,
        )?;
        let snat_addresses = match &raw.snat_addresses {
            Some(list) => self.snat_list(list, "agent.snat_addresses", None)?,
            None => Vec::new(),
        };
        Ok((
            NatSettings {
                port_min,
                port_max,
                snat_addresses,
            },
            nat_entries,
        ))
    }

    /// `"min-max"`, `MIN_NAT_PORT <= min <= max <= 65535`.
    fn port_range(&self, v: &S<String>, field: &str) -> Result<(u16, u16), ConfigError> {
        let s = v.get_ref();
        let bad = |why: String| self.error(v.span(), field, why);
        let (lo, hi) = s.split_once('-').ok_or_else(|| {
            bad(format!(
                "invalid port range {s:?}: expected \"MIN-MAX\", e.g. \"61000-65535\""
            ))
        })?;
        let port = |p: &str| {
            p.trim().parse::<u16>().map_err(|_| {
                bad(format!(
                    "invalid port range {s:?}: {:?} is not a port (0..=65535)",
                    p.trim()
                ))
            })
        };
        let (lo, hi) = (port(lo)?, port(hi)?);
        if lo > hi {
            return Err(bad(format!(
                "invalid port range {s:?}: the first port {lo} is above the last {hi}"
            )));
        }
        if lo < MIN_NAT_PORT {
            return Err(bad(format!(
                "invalid port range {s:?}: ports below {MIN_NAT_PORT} are the host's services', not SNAT ports"
            )));
        }
        Ok((lo, hi))
    }

    /// A list of SNAT addresses: unicast (not unspecified, multicast,
    /// loopback, link-local), no duplicates, at most [`MAX_SNAT_ADDRS`] per
    /// family, and all of `family`'s when given (a VIP's own list).
    fn snat_list(
        &self,
        list: &S<Vec<S<String>>>,
        field: &str,
        family: Option<IpAddr>,
    ) -> Result<Vec<IpAddr>, ConfigError> {
        let mut out: Vec<IpAddr> = Vec::new();
        for (i, v) in list.get_ref().iter().enumerate() {
            let f = format!("{field}[{i}]");
            let a = self.ip(v, &f, "SNAT")?;
            if let IpAddr::V4(a4) = a
                && a4.is_link_local()
            {
                return Err(self.error(
                    v.span(),
                    f,
                    format!("{a} is a link-local address, not usable as a SNAT address"),
                ));
            }
            if let Some(vip) = family
                && vip.is_ipv4() != a.is_ipv4()
            {
                return Err(self.error(
                    v.span(),
                    f,
                    format!(
                        "SNAT address {a} is {} but the VIP {vip} is {}: a NAT VIP's flows keep its family",
                        super::family(a),
                        super::family(vip)
                    ),
                ));
            }
            if out.contains(&a) {
                return Err(self.error(v.span(), f, format!("SNAT address {a} is listed twice")));
            }
            if out.iter().filter(|o| o.is_ipv4() == a.is_ipv4()).count() == MAX_SNAT_ADDRS {
                return Err(self.error(
                    v.span(),
                    f,
                    format!(
                        "more than {MAX_SNAT_ADDRS} {} SNAT addresses",
                        super::family(a)
                    ),
                ));
            }
            out.push(a);
        }
        Ok(out)
    }

    /// A backend's `port`: NAT VIPs only.
    pub(super) fn backend_port(
        &self,
        v: Option<&S<i64>>,
        field: &str,
        forwarding: Forwarding,
    ) -> Result<Option<u16>, ConfigError> {
        let Some(v) = v else { return Ok(None) };
        if forwarding != Forwarding::Nat {
            return Err(self.error(
                v.span(),
                field,
                format!(
                    "a backend port is only valid with forwarding = \"nat\" (this VIP's is \"{forwarding}\": the packet keeps the VIP's port)"
                ),
            ));
        }
        Ok(Some(self.int(v, field, 1u16, u16::MAX)?))
    }

    /// The SNAT addresses a VIP's new flows take: its own list (NAT VIPs
    /// only), else the agent's of its family; none for other modes.
    pub(super) fn vip_snat_addresses(
        &self,
        path: &str,
        r: &RawVip,
        vip: IpAddr,
        forwarding: Forwarding,
        agent: &AgentConfig,
    ) -> Result<Vec<IpAddr>, ConfigError> {
        let field = format!("{path}.snat_addresses");
        match (&r.snat_addresses, forwarding) {
            (Some(list), Forwarding::Nat) => self.snat_list(list, &field, Some(vip)),
            (Some(list), f) => Err(self.error(
                list.span(),
                field,
                format!(
                    "snat_addresses is only valid with forwarding = \"nat\" (this VIP's is \"{f}\")"
                ),
            )),
            (None, Forwarding::Nat) => Ok(agent
                .nat
                .snat_addresses
                .iter()
                .copied()
                .filter(|a| a.is_ipv4() == vip.is_ipv4())
                .collect()),
            (None, _) => Ok(Vec::new()),
        }
    }

    /// No SNAT address may be a VIP address: replies to it would be taken
    /// for the VIP's traffic.
    pub(super) fn check_snat_addresses(
        &self,
        raw: &RawFile,
        vips: &[VipConfig],
    ) -> Result<(), ConfigError> {
        let vip_at: BTreeMap<IpAddr, usize> = vips
            .iter()
            .enumerate()
            .rev()
            .map(|(i, v)| (v.address, i))
            .collect();
        let lists = raw
            .agent
            .as_ref()
            .and_then(|a| a.snat_addresses.as_ref())
            .map(|l| ("agent.snat_addresses".to_owned(), l))
            .into_iter()
            .chain(raw.vip.iter().enumerate().filter_map(|(i, v)| {
                v.get_ref()
                    .snat_addresses
                    .as_ref()
                    .map(|l| (format!("vip[{i}].snat_addresses"), l))
            }));
        for (field, list) in lists {
            for (j, v) in list.get_ref().iter().enumerate() {
                // Already validated: every entry parses.
                let Ok(a) = v.get_ref().parse::<IpAddr>() else {
                    continue;
                };
                if let Some(&i) = vip_at.get(&a) {
                    return Err(self.error(
                        v.span(),
                        format!("{field}[{j}]"),
                        format!(
                            "{a} is the address of VIP {} (vip[{i}]): a SNAT address must not be a VIP address",
                            vips[i].name
                        ),
                    ));
                }
            }
        }
        Ok(())
    }
}
