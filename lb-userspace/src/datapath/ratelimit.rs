//! The rate-limit maps as userspace sees them (see lb_common::ratelimit):
//! the per-VIP limits the agent writes, and the per-source buckets the
//! kernel keeps, read for `lb stats` and the metrics (the most limited
//! sources).

use std::net::{IpAddr, Ipv4Addr, Ipv6Addr};

use aya::maps::{Array, HashMap, MapData};
use lb_common::{
    map_names,
    ratelimit::{Bucket, RateKey, RateLimits},
};

use super::{Datapath, Result, map_err};

/// One source prefix's bucket of a VIP's per-source limit.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct LimitedSource {
    pub vip_index: u32,
    /// The source prefix's address (masked to the VIP's prefix length).
    pub source: IpAddr,
    /// `new` (connections) or `packets`.
    pub limit: &'static str,
    pub passed: u64,
    pub dropped: u64,
}

impl Datapath {
    /// Sets the rate limits of the VIP with index `vip_index` (all zero:
    /// none).
    pub fn set_rate_limits(&mut self, vip_index: u32, limits: RateLimits) -> Result<()> {
        self.check("VIP index", vip_index, self.sizes.max_vips)?;
        let mut map: Array<&mut MapData, RateLimits> =
            Array::try_from(self.map_mut(map_names::RATE_LIMITS))
                .map_err(map_err(map_names::RATE_LIMITS))?;
        map.set(vip_index, limits, 0)
            .map_err(map_err(map_names::RATE_LIMITS))
    }

    /// The rate limits of the VIP with index `vip_index`.
    pub fn rate_limits(&self, vip_index: u32) -> Result<RateLimits> {
        self.check("VIP index", vip_index, self.sizes.max_vips)?;
        let map: Array<&MapData, RateLimits> = Array::try_from(self.map(map_names::RATE_LIMITS))
            .map_err(map_err(map_names::RATE_LIMITS))?;
        map.get(&vip_index, 0)
            .map_err(map_err(map_names::RATE_LIMITS))
    }

    /// The source buckets that refused something, most refusals first, at
    /// most `n` (a walk over the whole RATE_SOURCES table: for `lb stats`
    /// and the metrics, not a hot loop).
    pub fn limited_sources(&self, n: usize) -> Result<Vec<LimitedSource>> {
        let map: HashMap<&MapData, RateKey, Bucket> =
            HashMap::try_from(self.map(map_names::RATE_SOURCES))
                .map_err(map_err(map_names::RATE_SOURCES))?;
        let mut out: Vec<LimitedSource> = map
            .iter()
            .filter_map(|r| r.ok())
            .filter(|(_, b)| b.dropped > 0)
            .map(|(k, b)| limited(&k, &b))
            .collect();
        out.sort_by(|a, b| b.dropped.cmp(&a.dropped).then(a.source.cmp(&b.source)));
        out.truncate(n);
        Ok(out)
    }
}

fn limited(k: &RateKey, b: &Bucket) -> LimitedSource {
    let bytes = |w: u32| w.to_ne_bytes();
    let source = if k.is_v6() {
        let mut o = [0u8; 16];
        for (i, w) in k.addr.iter().enumerate() {
            o[4 * i..4 * i + 4].copy_from_slice(&bytes(*w));
        }
        IpAddr::V6(Ipv6Addr::from(o))
    } else {
        IpAddr::V4(Ipv4Addr::from(bytes(k.addr[0])))
    };
    LimitedSource {
        vip_index: k.vip_index,
        source,
        limit: match k.kind {
            lb_common::ratelimit::RATE_PKT_V4 | lb_common::ratelimit::RATE_PKT_V6 => "packets",
            _ => "new",
        },
        passed: b.passed,
        dropped: b.dropped,
    }
}
