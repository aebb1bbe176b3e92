//! The rules of a VIP's `[vip.rate_limit]` table.

use lb_common::ratelimit::MAX_RATE;

use super::*;
use crate::config::raw::RawRateLimit;

impl Ctx<'_> {
    /// A VIP's rate limits: each rate 0 (off) to [`MAX_RATE`] per second,
    /// each burst 1 to [`MAX_RATE`] (default: a tenth of the rate, at
    /// least 1; given without its rate, an error), source prefixes 1..=32
    /// and 1..=128.
    pub(super) fn rate_limit(
        &self,
        r: &RawRateLimit,
        path: &str,
    ) -> Result<RateLimitConfig, ConfigError> {
        let f = |key: &str| format!("{path}.{key}");
        let pair = |rate: &Option<S<i64>>, burst: &Option<S<i64>>, name: &str| {
            let rate_v = self.opt_int(rate.as_ref(), &f(name), 0, MAX_RATE, 0)?;
            let burst_name = format!("{name}_burst");
            let burst_v = match burst {
                Some(b) if rate_v == 0 => {
                    return Err(self.error(
                        b.span(),
                        f(&burst_name),
                        format!("a burst without a rate: set {name} too"),
                    ));
                }
                Some(b) => self.int(b, &f(&burst_name), 1, MAX_RATE)?,
                None => (rate_v / 10).max(1),
            };
            Ok((rate_v, burst_v))
        };
        let (new_per_source, new_per_source_burst) =
            pair(&r.new_per_source, &r.new_per_source_burst, "new_per_source")?;
        let (packets_per_source, packets_per_source_burst) = pair(
            &r.packets_per_source,
            &r.packets_per_source_burst,
            "packets_per_source",
        )?;
        let (new_per_vip, new_per_vip_burst) =
            pair(&r.new_per_vip, &r.new_per_vip_burst, "new_per_vip")?;
        Ok(RateLimitConfig {
            new_per_source,
            new_per_source_burst,
            packets_per_source,
            packets_per_source_burst,
            new_per_vip,
            new_per_vip_burst,
            source_prefix_v4: self.opt_int(
                r.source_prefix_v4.as_ref(),
                &f("source_prefix_v4"),
                1,
                32,
                32,
            )?,
            source_prefix_v6: self.opt_int(
                r.source_prefix_v6.as_ref(),
                &f("source_prefix_v6"),
                1,
                128,
                128,
            )?,
        })
    }
}
