//! The data path's side of the flow keeper (clock, timeouts, flow counts,
//! flow cache) and the start-up checks of what the attachments need.

use aya::maps::{Array, MapData, xdp::DevMapHash};
use lb_common::{
    Runtime, map_names,
    nat::{NatFwdCache, NatRevCache},
};

use super::{Datapath, Result, ifname, map_err};
use crate::{
    flow_keeper::{FlowCaches, FlowCount, FlowKeeper, FlowTimeouts},
    syn_filter::SynFilter,
};

impl Datapath {
    /// Starts the flow keeper (see [`crate::flow_keeper`]): the clock, the
    /// conntrack timeouts and the length limit of the egress interfaces
    /// (`egress`: the attached ones; redirect targets join as they are
    /// added), and the count of active flows. Needs the pinned maps.
    pub fn start_flow_keeper(
        &mut self,
        timeouts: FlowTimeouts,
        egress: impl IntoIterator<Item = u32>,
    ) -> anyhow::Result<()> {
        let mut egress: Vec<u32> = egress.into_iter().collect();
        egress.extend(self.tx_ports()?);
        let caches = self.flow_caches()?;
        let filter = self.syn_filter()?;
        self.keeper = Some(FlowKeeper::start(
            &self.pin_dir,
            caches,
            filter,
            timeouts,
            egress,
        )?);
        Ok(())
    }

    /// The loaded program's SYN filter, memory-mapped (see
    /// [`crate::syn_filter`]).
    pub fn syn_filter(&self) -> anyhow::Result<SynFilter> {
        use std::os::fd::AsFd as _;
        let name = map_names::SYN_FILTER;
        match self.map(name) {
            aya::maps::Map::Array(d) => SynFilter::open(d.fd().as_fd().try_clone_to_owned()?),
            _ => anyhow::bail!("map {name} is not an array"),
        }
    }

    /// One rebuild of the SYN filter now, as the keeper does with each
    /// count (the bank not in use cleared, the live TCP records' bits set,
    /// the kernel switched to it), under the RUNTIME clock and timeouts;
    /// tests and benchmarks drive it with this.
    pub fn rebuild_syn_filter(&self) -> anyhow::Result<()> {
        let filter = self.syn_filter()?;
        let bank = filter.begin();
        self.count_flows_noting(|hash| filter.note(bank, hash))?;
        filter.use_bank(bank);
        Ok(())
    }
    fn flow_caches(&self) -> anyhow::Result<FlowCaches> {
        use std::os::fd::AsFd as _;
        let fd = |name: &'static str| match self.map(name) {
            aya::maps::Map::Array(d) => Ok(d.fd().as_fd().try_clone_to_owned()?),
            _ => anyhow::bail!("map {name} is not an array"),
        };
        Ok(FlowCaches {
            v4: fd(map_names::FLOW_CACHE)?,
            v6: fd(map_names::FLOW_CACHE6)?,
            nat_fwd: fd(map_names::NAT_FWD_CACHE)?,
            nat_rev: fd(map_names::NAT_REV_CACHE)?,
            nat_fwd6: fd(map_names::NAT_FWD_CACHE6)?,
            nat_rev6: fd(map_names::NAT_REV_CACHE6)?,
        })
    }

    /// Empties the flow caches (IPv4 and IPv6, and the NAT caches), as the flow keeper does
    /// once per tick of the clock (tests drive the ticks with this and
    /// [`Self::set_runtime`]).
    pub fn clear_flow_cache(&self) -> anyhow::Result<()> {
        self.flow_caches()?.clear()
    }

    /// Slot `slot` of NAT_FWD_CACHE (IPv4), as a packet finds it (tests
    /// check and forge what the kernel caches).
    pub fn nat_fwd_cache(&self, slot: u32) -> Result<NatFwdCache> {
        let name = map_names::NAT_FWD_CACHE;
        let map: Array<&MapData, NatFwdCache> =
            Array::try_from(self.map(name)).map_err(map_err(name))?;
        map.get(&slot, 0).map_err(map_err(name))
    }

    /// Overwrites slot `slot` of NAT_FWD_CACHE (tests: a torn copy).
    pub fn set_nat_fwd_cache(&mut self, slot: u32, value: NatFwdCache) -> Result<()> {
        let name = map_names::NAT_FWD_CACHE;
        let mut map: Array<&mut MapData, NatFwdCache> =
            Array::try_from(self.map_mut(name)).map_err(map_err(name))?;
        map.set(slot, value, 0).map_err(map_err(name))
    }

    /// Slot `slot` of NAT_REV_CACHE (IPv4).
    pub fn nat_rev_cache(&self, slot: u32) -> Result<NatRevCache> {
        let name = map_names::NAT_REV_CACHE;
        let map: Array<&MapData, NatRevCache> =
            Array::try_from(self.map(name)).map_err(map_err(name))?;
        map.get(&slot, 0).map_err(map_err(name))
    }

    /// Overwrites slot `slot` of NAT_REV_CACHE (tests: a torn copy).
    pub fn set_nat_rev_cache(&mut self, slot: u32, value: NatRevCache) -> Result<()> {
        let name = map_names::NAT_REV_CACHE;
        let mut map: Array<&mut MapData, NatRevCache> =
            Array::try_from(self.map_mut(name)).map_err(map_err(name))?;
        map.set(slot, value, 0).map_err(map_err(name))
    }

    /// New conntrack timeouts for the running keeper (a reload).
    pub fn set_flow_timeouts(&self, timeouts: FlowTimeouts) {
        if let Some(k) = &self.keeper {
            k.set_timeouts(timeouts);
        }
    }

    /// The keeper's latest count of active flows (None: no keeper).
    pub fn flow_count(&self) -> Option<FlowCount> {
        self.keeper.as_ref().map(|k| k.count())
    }

    /// Counts the active flows per backend now, as the keeper does (one
    /// pass over CONNTRACK and CONNTRACK6 under the RUNTIME clock and
    /// timeouts).
    pub fn count_flows(&self) -> anyhow::Result<FlowCount> {
        self.count_flows_noting(|_| {})
    }

    fn count_flows_noting(&self, tcp_live: impl FnMut(u32)) -> anyhow::Result<FlowCount> {
        use std::os::fd::AsFd as _;
        let rt = self.runtime()?;
        let fd = |name: &'static str| match self.map(name) {
            aya::maps::Map::LruHashMap(d) | aya::maps::Map::HashMap(d) => Ok(d.fd().as_fd()),
            _ => anyhow::bail!("map {name} is not a hash map"),
        };
        crate::flow_keeper::count_flows(
            fd(map_names::CONNTRACK)?,
            fd(map_names::CONNTRACK6)?,
            &rt,
            tcp_live,
        )
    }

    /// One NAT pass now, as the keeper runs after each count (under the
    /// RUNTIME clock and timeouts): removes the NAT pairs that are over.
    pub fn sweep_nat(&self) -> anyhow::Result<crate::nat_keeper::NatSweep> {
        let rt = self.runtime()?;
        self.nat_maps()?.sweep(&rt)
    }

    /// The four NAT maps, on fds of their own.
    fn nat_maps(&self) -> anyhow::Result<crate::nat_keeper::NatMaps> {
        use std::os::fd::AsFd as _;
        let open = |name: &'static str| match self.map(name) {
            aya::maps::Map::HashMap(d) => Ok(aya::maps::Map::HashMap(MapData::from_fd(
                d.fd().as_fd().try_clone_to_owned()?,
            )?)),
            _ => anyhow::bail!("map {name} is not a hash map"),
        };
        Ok(crate::nat_keeper::NatMaps {
            fwd: open(map_names::NAT_FWD)?,
            rev: open(map_names::NAT_REV)?,
            fwd6: open(map_names::NAT_FWD6)?,
            rev6: open(map_names::NAT_REV6)?,
        })
    }

    /// The RUNTIME element: clock, timeouts, length limit.
    pub fn runtime(&self) -> Result<Runtime> {
        let map: Array<&MapData, Runtime> =
            Array::try_from(self.map(map_names::RUNTIME)).map_err(map_err(map_names::RUNTIME))?;
        map.get(&0, 0).map_err(map_err(map_names::RUNTIME))
    }

    /// Writes the RUNTIME element (the keeper does this while the agent
    /// runs; tests drive the clock with it).
    pub fn set_runtime(&mut self, rt: Runtime) -> Result<()> {
        let mut map: Array<&mut MapData, Runtime> =
            Array::try_from(self.map_mut(map_names::RUNTIME))
                .map_err(map_err(map_names::RUNTIME))?;
        map.set(0, rt, 0).map_err(map_err(map_names::RUNTIME))
    }

    /// Checks what the attachments need of the interfaces, at start-up.
    /// `attached`: (interface, ifindex, mode) of each attachment.
    ///
    /// - Native mode: every redirect target must be able to transmit XDP
    ///   frames (`ndo_xdp_xmit`); otherwise the kernel drops what the
    ///   program redirects there while lb counts it forwarded: an error.
    /// - Generic (skb) mode: GRO hands the program aggregated frames
    ///   larger than the MTU; lb drops them (`drop_too_big`): a warning
    ///   that says how to keep them from forming.
    pub fn check_attachments(
        &self,
        attached: &[(String, u32, String)],
        targets: &std::collections::BTreeSet<u32>,
    ) -> anyhow::Result<()> {
        for (iface, _, _) in attached.iter().filter(|a| a.2 == "skb") {
            log::warn!(
                "{iface}: generic (skb) mode: packets for a VIP longer than the egress MTU \
                 (GRO/LRO aggregates) are dropped and counted as drop_too_big; \
                 turn aggregation off with `ethtool -K {iface} gro off lro off`"
            );
        }
        if !attached.iter().any(|a| a.2 == "native") {
            return Ok(());
        }
        for &ifindex in targets {
            if attached.iter().any(|a| a.1 == ifindex) {
                continue;
            }
            let name = ifname(ifindex).unwrap_or_else(|| format!("ifindex {ifindex}"));
            match crate::xdp_features::xdp_features(ifindex) {
                Ok(Some(f)) if f & crate::xdp_features::NDO_XMIT == 0 => anyhow::bail!(
                    "backends behind {name} are reached by XDP redirect, but {name} cannot \
                     transmit XDP frames (no ndo_xdp_xmit: a bridge, a driver without XDP \
                     support, or a veth whose peer runs no XDP program); the kernel would drop \
                     them after lb counted them forwarded. Attach in generic mode \
                     (--xdp-mode skb) or give {name} a driver that supports XDP transmit"
                ),
                Ok(Some(_)) => {}
                Ok(None) => log::warn!(
                    "{name}: the kernel does not report XDP features (before Linux 6.3): \
                     not checked whether it can transmit redirected XDP frames"
                ),
                Err(e) => log::warn!("{name}: cannot read its XDP features ({e}); not checked"),
            }
        }
        Ok(())
    }

    /// The redirect targets in TX_PORTS.
    pub fn tx_ports(&self) -> Result<Vec<u32>> {
        let map: DevMapHash<&MapData> = DevMapHash::try_from(self.map(map_names::TX_PORTS))
            .map_err(map_err(map_names::TX_PORTS))?;
        map.keys()
            .collect::<Result<_, _>>()
            .map_err(map_err(map_names::TX_PORTS))
    }
}
