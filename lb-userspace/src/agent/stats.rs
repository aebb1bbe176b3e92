//! Counters and rates: the sampler that turns the kernel's counters into
//! the stats view `lb stats` shows, published to the metrics endpoint
//! through a watch channel.

use std::{collections::BTreeMap, net::IpAddr, time::Instant};

use tokio::sync::watch;

use super::core::Core;
use crate::{
    control::{
        BackendStatsView, Health, LimitedSourceView, Rates, StatsView, TOP_LIMITED_SOURCES,
        VipStatsView,
    },
    keys::{BackendKey, VipId},
    reconcile::KernelMaps,
    timing,
};

/// Samples counters once a tick and on request; publishes every periodic
/// sample.
pub struct Stats {
    sampler: StatsSampler,
    tx: watch::Sender<StatsView>,
}

impl Default for Stats {
    fn default() -> Self {
        Self {
            sampler: StatsSampler::default(),
            tx: watch::Sender::new(StatsView::default()),
        }
    }
}

impl Stats {
    /// The latest periodic view, for the metrics endpoint.
    pub fn subscribe(&self) -> watch::Receiver<StatsView> {
        self.tx.subscribe()
    }

    /// Reads the counters, updates rates and publishes the view.
    pub fn sample<M: KernelMaps>(&mut self, core: &Core<M>) {
        let (vips, backends, reasons) = read_counters(core);
        self.sampler.update(Instant::now(), vips, backends, reasons);
        decorate(core, &mut self.sampler.view);
        self.tx.send_replace(self.sampler.view.clone());
    }

    /// Counters read now, rates over the time since the last periodic
    /// sample (which stays the reference), over at least
    /// [`timing::MIN_RATE_INTERVAL`].
    pub fn fresh<M: KernelMaps>(&mut self, core: &Core<M>) -> StatsView {
        let s = &mut self.sampler;
        let (prev, older) = (s.prev.clone(), s.older.clone());
        // Right after a periodic sample, measure from the one before it.
        if let (Some(p), Some(o)) = (&prev, &older)
            && p.0.elapsed() < timing::MIN_RATE_INTERVAL
        {
            s.prev = Some(o.clone());
        }
        let (vips, backends, reasons) = read_counters(core);
        s.update(Instant::now(), vips, backends, reasons);
        decorate(core, &mut s.view);
        let view = s.view.clone();
        if prev.is_some() {
            (s.prev, s.older) = (prev, older);
        }
        view
    }
}

/// The most limited source prefixes, by VIP name (only VIPs with
/// per-source limits have any).
fn limited_sources<M: KernelMaps>(core: &Core<M>) -> Vec<LimitedSourceView> {
    let names: BTreeMap<u32, String> = core
        .config()
        .vips
        .iter()
        .filter_map(|v| Some((core.state.vip_index(&VipId::of(v))?, v.name.clone())))
        .collect();
    core.maps()
        .limited_sources(TOP_LIMITED_SOURCES)
        .into_iter()
        .filter_map(|l| {
            Some(LimitedSourceView {
                vip: names.get(&l.vip_index)?.clone(),
                source: l.source,
                limit: l.limit.to_string(),
                dropped: l.dropped,
                passed: l.passed,
            })
        })
        .collect()
}

/// The least-connections VIPs' backends get the counts the kernel
/// compares.
/// What a view carries besides the counters: NAT flows, limited sources,
/// announcements, active connections, health transitions, ring builds,
/// the agent's version and start.
fn decorate<M: KernelMaps>(core: &Core<M>, view: &mut StatsView) {
    view.nat_entries = core.maps().nat_entries();
    view.limited_sources = limited_sources(core);
    view.announced = core.vips_announced();
    set_active_connections(core, view);
    view.ring_builds = core.rings.builds();
    view.version = env!("CARGO_PKG_VERSION").to_string();
    view.started_unix_s = *STARTED;
    let capacity = u64::from(core.config().agent.kernel.conntrack_entries);
    view.conntrack =
        core.maps()
            .conntrack_records()
            .map(|(v4, v6)| crate::control::ConntrackView {
                records_v4: v4,
                records_v6: v6,
                capacity_v4: capacity,
                capacity_v6: capacity,
            });
    for v in &core.config().vips {
        for b in &v.backends {
            let key = BackendKey {
                vip: VipId::of(v),
                address: b.address,
            };
            if let Some(status) = core.state.backend(&key)
                && let Some(row) = view
                    .backends
                    .iter_mut()
                    .find(|r| r.vip == v.name && r.address == b.address)
            {
                row.health_transitions = status.transitions;
                let h = &status.latency;
                row.check_latency = (h.count > 0).then(|| crate::control::LatencyView {
                    le: super::state::LATENCY_BOUNDS.to_vec(),
                    counts: h.buckets.to_vec(),
                    sum_s: h.sum_us as f64 / 1e6,
                    count: h.count,
                });
            }
        }
    }
}

/// When this agent process started (Unix time, seconds): taken the first
/// time a view is decorated, at the agent's first sample.
static STARTED: std::sync::LazyLock<f64> = std::sync::LazyLock::new(|| {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0.0, |d| d.as_secs_f64())
});

fn set_active_connections<M: KernelMaps>(core: &Core<M>, view: &mut crate::control::StatsView) {
    for v in &core.config().vips {
        let Some(counts) = core.lc_counts(v) else {
            continue;
        };
        for b in &v.backends {
            let key = BackendKey {
                vip: VipId::of(v),
                address: b.address,
            };
            let Some(status) = core.state.backend(&key) else {
                continue;
            };
            if let Some(row) = view
                .backends
                .iter_mut()
                .find(|r| r.vip == v.name && r.address == b.address)
            {
                row.active_connections = Some(counts.get(&status.id).copied().unwrap_or(0));
            }
        }
    }
}

fn read_counters<M: KernelMaps>(
    core: &Core<M>,
) -> (VipCounters, BackendCounters, BTreeMap<&'static str, u64>) {
    let (cfg, maps) = (core.config(), core.maps());
    let mut vips = BTreeMap::new();
    let mut backends = BTreeMap::new();
    for v in &cfg.vips {
        let vip = VipId::of(v);
        if let Some(i) = core.state.vip_index(&vip)
            && let Ok(s) = maps.vip_stats(i)
        {
            vips.insert(v.name.clone(), s);
        }
        for b in &v.backends {
            let key = BackendKey {
                vip,
                address: b.address,
            };
            if let Some(status) = core.state.backend(&key)
                && let Ok(s) = maps.backend_stats(status.id)
            {
                backends.insert((v.name.clone(), b.address), (s, status.health()));
            }
        }
    }
    (vips, backends, maps.reason_stats().unwrap_or_default())
}

type VipCounters = BTreeMap<String, lb_common::VipStats>;
type BackendCounters = BTreeMap<(String, IpAddr), (lb_common::BackendStats, Health)>;

type Sample = (
    Instant,
    VipCounters,
    BackendCounters,
    BTreeMap<&'static str, u64>,
);

/// Turns counter samples into rates.
#[derive(Default)]
pub struct StatsSampler {
    prev: Option<Sample>,
    /// The sample before `prev`.
    older: Option<Sample>,
    view: StatsView,
}

impl StatsSampler {
    fn update(
        &mut self,
        now: Instant,
        vips: VipCounters,
        backends: BackendCounters,
        reasons: BTreeMap<&'static str, u64>,
    ) {
        let (dt, pv, pb, pr) = match &self.prev {
            Some((t, pv, pb, pr)) => (
                now.duration_since(*t).as_secs_f64().max(1e-3),
                Some(pv),
                Some(pb),
                Some(pr),
            ),
            None => (1.0, None, None, None),
        };
        let rate = |now: u64, before: Option<u64>| {
            before.map_or(0.0, |b| now.saturating_sub(b) as f64 / dt)
        };
        let view = StatsView {
            interval_s: dt,
            vips: vips
                .iter()
                .map(|(name, s)| {
                    let p = pv.and_then(|p| p.get(name));
                    let dp = s.packets - p.map_or(0, |p| p.packets.min(s.packets));
                    let dh =
                        s.conntrack_hits - p.map_or(0, |p| p.conntrack_hits.min(s.conntrack_hits));
                    let ratio = if dp > 0 {
                        dh as f64 / dp as f64
                    } else if s.packets > 0 {
                        s.conntrack_hits as f64 / s.packets as f64
                    } else {
                        0.0
                    };
                    VipStatsView {
                        vip: name.clone(),
                        traffic: Rates {
                            packets: s.packets,
                            bytes: s.bytes,
                            pps: rate(s.packets, p.map(|p| p.packets)),
                            bps: 8.0 * rate(s.bytes, p.map(|p| p.bytes)),
                        },
                        new_flows: s.new_flows,
                        new_flows_ps: rate(s.new_flows, p.map(|p| p.new_flows)),
                        conntrack_hits: s.conntrack_hits,
                        conntrack_hit_ratio: ratio,
                        return_packets: s.return_packets,
                        return_bytes: s.return_bytes,
                        acl_denied: s.acl_denied,
                        rate_limited: s.rate_limited,
                    }
                })
                .collect(),
            backends: backends
                .iter()
                .map(|((vip, addr), (s, health))| {
                    let p = pb.and_then(|p| p.get(&(vip.clone(), *addr))).map(|x| x.0);
                    BackendStatsView {
                        vip: vip.clone(),
                        address: *addr,
                        health: *health,
                        traffic: Rates {
                            packets: s.packets,
                            bytes: s.bytes,
                            pps: rate(s.packets, p.map(|p| p.packets)),
                            bps: 8.0 * rate(s.bytes, p.map(|p| p.bytes)),
                        },
                        active_connections: None,
                        health_transitions: 0,
                        check_latency: None,
                    }
                })
                .collect(),
            reasons: reasons
                .iter()
                .map(|(k, v)| {
                    (
                        k.to_string(),
                        (*v, rate(*v, pr.and_then(|p| p.get(k)).copied())),
                    )
                })
                .collect(),
            nat_entries: None,
            limited_sources: Vec::new(),
            announced: None,
            ring_builds: 0,
            version: String::new(),
            started_unix_s: 0.0,
            conntrack: None,
        };
        self.view = view;
        self.older = self.prev.replace((now, vips, backends, reasons));
    }
}

#[cfg(test)]
mod tests {
    use std::time::Duration;

    use super::*;

    fn vip(packets: u64, hits: u64) -> VipCounters {
        [(
            "web".to_string(),
            lb_common::VipStats {
                packets,
                bytes: packets * 100,
                new_flows: packets - hits,
                conntrack_hits: hits,
                ..Default::default()
            },
        )]
        .into()
    }

    #[test]
    fn rates_and_hit_ratio_come_from_the_last_interval() {
        let mut s = StatsSampler::default();
        let t0 = Instant::now();
        s.update(t0, vip(1000, 0), BTreeMap::new(), BTreeMap::new());
        s.update(
            t0 + Duration::from_secs(2),
            vip(3000, 1500),
            BTreeMap::new(),
            [("pass_not_vip", 10)].into(),
        );
        let v = &s.view.vips[0];
        assert_eq!(v.traffic.pps, 1000.0);
        assert_eq!(v.traffic.bps, 8.0 * 100.0 * 1000.0);
        assert_eq!(v.new_flows_ps, 250.0);
        assert_eq!(v.conntrack_hit_ratio, 0.75);
        assert_eq!(s.view.reasons["pass_not_vip"].0, 10);
        assert!(s.older.is_some(), "the sample before the last is kept");
    }
}
