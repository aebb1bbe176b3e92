//! Prometheus metrics: `GET /metrics` on the configured address, in the
//! text exposition format, rendered from the agent's latest counter sample.
//! The same listener serves the status page (`/`, `/status.json`; see
//! [`crate::status_page`]).
//!
//! The server is bounded: at most a given number of connections at once
//! (more are accepted and closed at once, with a log line at most every
//! [`timing::METRICS_REFUSAL_LOG_EVERY`]); a client must send its request
//! head within [`timing::METRICS_HEADER_READ_TIMEOUT`] (also between
//! requests on a kept-alive connection, so idle connections are closed);
//! no connection lives longer than [`timing::METRICS_CONNECTION_LIFETIME`];
//! and a failing `accept` (out of descriptors) pauses the loop instead of
//! spinning.

use std::{
    convert::Infallible,
    sync::{Arc, atomic::AtomicU64},
    time::Instant,
};

use bytes::Bytes;
use http_body_util::Full;
use hyper::{Request, Response, body::Incoming, server::conn::http1, service::service_fn};
use hyper_util::rt::{TokioIo, TokioTimer};
use prometheus_client::{
    encoding::{EncodeLabelSet, text::encode},
    metrics::{counter::Counter, family::Family, gauge::Gauge},
    registry::Registry,
};

use tokio::sync::{Semaphore, mpsc, watch};

use crate::{
    control::{ControlMsg, Health, StatsView},
    status_page::{self, Route},
    timing,
};

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct VipLabels {
    vip: String,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct LimitedLabels {
    vip: String,
    source: String,
    limit: String,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct BackendLabels {
    vip: String,
    backend: String,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct FamilyLabels {
    family: String,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct BuildLabels {
    version: String,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct ReasonLabels {
    reason: String,
}

type Ctr = Counter<u64, AtomicU64>;

/// A histogram whose buckets are already counted (the agent's; see
/// [`crate::control::LatencyView`]): prometheus-client's own Histogram
/// only observes.
#[derive(Debug, Default)]
struct CountedHistogram(std::sync::Mutex<crate::control::LatencyView>);

impl CountedHistogram {
    fn set(&self, v: &crate::control::LatencyView) {
        *self.0.lock().unwrap_or_else(|e| e.into_inner()) = v.clone();
    }
}

impl prometheus_client::metrics::TypedMetric for CountedHistogram {
    const TYPE: prometheus_client::metrics::MetricType =
        prometheus_client::metrics::MetricType::Histogram;
}

impl prometheus_client::encoding::EncodeMetric for CountedHistogram {
    fn encode(
        &self,
        mut encoder: prometheus_client::encoding::MetricEncoder,
    ) -> Result<(), std::fmt::Error> {
        let v = self.0.lock().unwrap_or_else(|e| e.into_inner()).clone();
        // Per bucket (not cumulated: the encoder sums them), the last one
        // +Inf.
        let buckets: Vec<(f64, u64)> =
            v.le.iter()
                .copied()
                .chain(std::iter::once(f64::MAX))
                .zip(v.counts.iter().copied())
                .collect();
        encoder.encode_histogram::<prometheus_client::encoding::NoLabelSet>(
            v.sum_s, v.count, &buckets, None,
        )
    }

    fn metric_type(&self) -> prometheus_client::metrics::MetricType {
        prometheus_client::metrics::MetricType::Histogram
    }
}

/// The classic Prometheus text format (0.0.4) of an OpenMetrics page as
/// [`render`] makes it: a counter's HELP and TYPE lines name its samples
/// (`x_total`, where OpenMetrics names the family `x`), no `# UNIT` lines,
/// no `# EOF`. The samples are the same.
pub fn classic(openmetrics: &str) -> String {
    let counters: std::collections::BTreeSet<&str> = openmetrics
        .lines()
        .filter_map(|l| l.strip_prefix("# TYPE "))
        .filter_map(|l| l.strip_suffix(" counter"))
        .collect();
    let mut out = String::with_capacity(openmetrics.len());
    for line in openmetrics.lines() {
        if line == "# EOF" || line.starts_with("# UNIT ") {
            continue;
        }
        let renamed = ["# HELP ", "# TYPE "].iter().find_map(|prefix| {
            let rest = line.strip_prefix(prefix)?;
            let (name, tail) = rest.split_once(' ')?;
            counters
                .contains(name)
                .then(|| format!("{prefix}{name}_total {tail}"))
        });
        out.push_str(renamed.as_deref().unwrap_or(line));
        out.push('\n');
    }
    out
}

/// Renders one sample as Prometheus text (OpenMetrics).
pub fn render(stats: &StatsView) -> String {
    let mut reg = Registry::with_prefix("lb");
    let vip_packets = Family::<VipLabels, Ctr>::default();
    let vip_bytes = Family::<VipLabels, Ctr>::default();
    let vip_flows = Family::<VipLabels, Ctr>::default();
    let vip_hits = Family::<VipLabels, Ctr>::default();
    let vip_return_packets = Family::<VipLabels, Ctr>::default();
    let vip_return_bytes = Family::<VipLabels, Ctr>::default();
    let vip_acl_denied = Family::<VipLabels, Ctr>::default();
    let vip_rate_limited = Family::<VipLabels, Ctr>::default();
    let limited = Family::<LimitedLabels, Gauge>::default();
    let be_packets = Family::<BackendLabels, Ctr>::default();
    let be_bytes = Family::<BackendLabels, Ctr>::default();
    let be_up = Family::<BackendLabels, Gauge>::default();
    let be_active = Family::<BackendLabels, Gauge>::default();
    let be_transitions = Family::<BackendLabels, Ctr>::default();
    let be_latency = Family::<BackendLabels, CountedHistogram>::default();
    let reasons = Family::<ReasonLabels, Ctr>::default();
    let announced = Family::<VipLabels, Gauge>::default();
    for (vip, on) in stats.announced.iter().flatten() {
        announced
            .get_or_create(&VipLabels { vip: vip.clone() })
            .set(i64::from(*on));
    }
    for v in &stats.vips {
        let l = VipLabels { vip: v.vip.clone() };
        vip_packets.get_or_create(&l).inc_by(v.traffic.packets);
        vip_bytes.get_or_create(&l).inc_by(v.traffic.bytes);
        vip_flows.get_or_create(&l).inc_by(v.new_flows);
        vip_hits.get_or_create(&l).inc_by(v.conntrack_hits);
        vip_return_packets
            .get_or_create(&l)
            .inc_by(v.return_packets);
        vip_return_bytes.get_or_create(&l).inc_by(v.return_bytes);
        vip_acl_denied.get_or_create(&l).inc_by(v.acl_denied);
        vip_rate_limited.get_or_create(&l).inc_by(v.rate_limited);
    }
    for s in &stats.limited_sources {
        limited
            .get_or_create(&LimitedLabels {
                vip: s.vip.clone(),
                source: s.source.to_string(),
                limit: s.limit.clone(),
            })
            .set(i64::try_from(s.dropped).unwrap_or(i64::MAX));
    }
    for b in &stats.backends {
        let l = BackendLabels {
            vip: b.vip.clone(),
            backend: b.address.to_string(),
        };
        be_packets.get_or_create(&l).inc_by(b.traffic.packets);
        be_bytes.get_or_create(&l).inc_by(b.traffic.bytes);
        be_up
            .get_or_create(&l)
            .set(i64::from(b.health == Health::Up));
        be_transitions
            .get_or_create(&l)
            .inc_by(b.health_transitions);
        if let Some(h) = &b.check_latency {
            be_latency.get_or_create(&l).set(h);
        }
        if let Some(n) = b.active_connections {
            be_active
                .get_or_create(&l)
                .set(i64::try_from(n).unwrap_or(i64::MAX));
        }
    }
    for (reason, (total, _)) in &stats.reasons {
        reasons
            .get_or_create(&ReasonLabels {
                reason: reason.clone(),
            })
            .inc_by(*total);
    }
    reg.register("vip_packets", "Packets forwarded for a VIP", vip_packets);
    reg.register("vip_bytes", "Bytes forwarded for a VIP", vip_bytes);
    reg.register(
        "vip_new_flows",
        "New flows steered by the Maglev ring",
        vip_flows,
    );
    reg.register(
        "vip_conntrack_hits",
        "Packets of established flows",
        vip_hits,
    );
    reg.register(
        "vip_return_packets",
        "NAT replies translated back to clients of a VIP",
        vip_return_packets,
    );
    reg.register(
        "vip_return_bytes",
        "Bytes of NAT replies translated back to clients of a VIP",
        vip_return_bytes,
    );
    reg.register(
        "vip_acl_denied",
        "Packets dropped by a VIP's source access control",
        vip_acl_denied,
    );
    reg.register(
        "vip_rate_limited_packets",
        "Packets refused by a VIP's rate limits",
        vip_rate_limited,
    );
    reg.register(
        "rate_limited_source_drops",
        "Packets a VIP's per-source rate limit refused from one source prefix (the most limited \
         sources only, at most 10)",
        limited,
    );
    if stats.announced.is_some() {
        reg.register(
            "vip_announced",
            "1 when the VIP's address has a route in the announce table ([agent.announce]), else 0",
            announced,
        );
    }
    if let Some(n) = stats.nat_entries {
        let g = Gauge::<i64, std::sync::atomic::AtomicI64>::default();
        g.set(i64::try_from(n).unwrap_or(i64::MAX));
        reg.register(
            "nat_entries",
            "NAT flows recorded (NAT_FWD + NAT_FWD6 entries), as last counted",
            g,
        );
    }
    reg.register(
        "backend_packets",
        "Packets forwarded to a backend",
        be_packets,
    );
    reg.register("backend_bytes", "Bytes forwarded to a backend", be_bytes);
    reg.register("backend_up", "1 when the backend is healthy", be_up);
    reg.register(
        "backend_health_transitions",
        "Times the backend's health checks changed its state (up to down or back) since the \
         agent started",
        be_transitions,
    );
    reg.register(
        "backend_check_duration_seconds",
        "How long the backend's passing health checks took",
        be_latency,
    );
    if let Some(c) = stats.conntrack {
        let records = Family::<FamilyLabels, Gauge>::default();
        let capacity = Family::<FamilyLabels, Gauge>::default();
        for (family, n, cap) in [
            ("ipv4", c.records_v4, c.capacity_v4),
            ("ipv6", c.records_v6, c.capacity_v6),
        ] {
            let l = FamilyLabels {
                family: family.into(),
            };
            records
                .get_or_create(&l)
                .set(i64::try_from(n).unwrap_or(i64::MAX));
            capacity
                .get_or_create(&l)
                .set(i64::try_from(cap).unwrap_or(i64::MAX));
        }
        reg.register(
            "conntrack_records",
            "Conntrack records as last counted (expired ones included until the LRU reuses \
             them)",
            records,
        );
        reg.register(
            "conntrack_capacity",
            "Conntrack table size (records it holds before evicting the least recently used)",
            capacity,
        );
    }
    // The agent itself (absent from a view that has none: before the
    // first sample).
    if !stats.version.is_empty() {
        let info = Family::<BuildLabels, Gauge>::default();
        info.get_or_create(&BuildLabels {
            version: stats.version.clone(),
        })
        .set(1);
        reg.register("build_info", "The agent's version (value 1)", info);
        let started = Gauge::<f64, std::sync::atomic::AtomicU64>::default();
        started.set(stats.started_unix_s);
        reg.register(
            "agent_start_time_seconds",
            "When the agent started, Unix time",
            started,
        );
        let builds = Ctr::default();
        builds.inc_by(stats.ring_builds);
        reg.register(
            "ring_builds",
            "Maglev tables the agent built since it started (a backend set or weight changed)",
            builds,
        );
    }
    reg.register(
        "backend_active_connections",
        "Least-connections VIPs: the active connections the kernel compares",
        be_active,
    );
    reg.register(
        "packets_by_reason",
        "Packets passed to the kernel or dropped, by reason",
        reasons,
    );
    let mut out = String::new();
    encode(&mut out, &reg).expect("writing to a String");
    out
}

/// Logs a repeated event at most once per period, with the number of
/// events since the last line.
struct Throttled {
    period: std::time::Duration,
    last: Option<Instant>,
    since: u64,
}

impl Throttled {
    fn new(period: std::time::Duration) -> Self {
        Self {
            period,
            last: None,
            since: 0,
        }
    }

    /// Counts one event; returns how many to report when a line is due.
    fn note(&mut self) -> Option<u64> {
        self.since += 1;
        let due = self.last.is_none_or(|t| t.elapsed() >= self.period);
        due.then(|| {
            self.last = Some(Instant::now());
            std::mem::take(&mut self.since)
        })
    }
}

/// Serves `/metrics` until the task is dropped, with at most
/// `max_connections` connections open at once; with `control` (the
/// control socket's channel to the agent), also the status page and
/// `/status.json` ([`status_page`]).
pub async fn serve(
    listener: tokio::net::TcpListener,
    stats: watch::Receiver<StatsView>,
    control: Option<mpsc::Sender<ControlMsg>>,
    max_connections: usize,
) {
    let slots = Arc::new(Semaphore::new(max_connections.max(1)));
    let mut refused = Throttled::new(timing::METRICS_REFUSAL_LOG_EVERY);
    let mut failed = Throttled::new(timing::METRICS_REFUSAL_LOG_EVERY);
    loop {
        let (stream, peer) = match listener.accept().await {
            Ok(x) => x,
            Err(e) => {
                // EMFILE and the like: the connection stays queued; retrying
                // at once would spin.
                if let Some(n) = failed.note() {
                    log::warn!(
                        "metrics: accept failed ({n} times since the last report): {e}; \
                         pausing accepts for {:?}",
                        timing::METRICS_ACCEPT_BACKOFF
                    );
                }
                tokio::time::sleep(timing::METRICS_ACCEPT_BACKOFF).await;
                continue;
            }
        };
        let Ok(slot) = slots.clone().try_acquire_owned() else {
            drop(stream);
            if let Some(n) = refused.note() {
                log::warn!(
                    "metrics: refused {n} connection(s) (latest from {peer}): \
                     {max_connections} connections open, the most served at once"
                );
            }
            continue;
        };
        let stats = stats.clone();
        let control = control.clone();
        tokio::spawn(async move {
            let _slot = slot;
            let svc = service_fn(move |req: Request<Incoming>| {
                let stats = stats.clone();
                let control = control.clone();
                async move {
                    // OpenMetrics to a scraper that asks for it (Prometheus
                    // does); the classic text format otherwise.
                    let openmetrics = req.headers().get_all("accept").iter().any(|v| {
                        v.to_str()
                            .is_ok_and(|v| v.contains("application/openmetrics-text"))
                    });
                    let route = status_page::route(
                        req.method().as_str(),
                        req.uri().path(),
                        control.is_some(),
                    );
                    let resp = match route {
                        Route::Metrics if openmetrics => Response::builder()
                            .header(
                                "content-type",
                                "application/openmetrics-text; version=1.0.0; charset=utf-8",
                            )
                            .body(Full::new(Bytes::from(render(&stats.borrow())))),
                        Route::Metrics => Response::builder()
                            .header("content-type", "text/plain; version=0.0.4; charset=utf-8")
                            .body(Full::new(Bytes::from(classic(&render(&stats.borrow()))))),
                        Route::Page => Response::builder()
                            .header("content-type", "text/html; charset=utf-8")
                            .header("cache-control", "no-store")
                            .body(Full::new(Bytes::from_static(status_page::PAGE.as_bytes()))),
                        Route::Json => {
                            let answer = match &control {
                                Some(c) => status_page::status_json(c).await,
                                None => Err("the status page is off".into()),
                            };
                            match answer {
                                Ok(v) => Response::builder()
                                    .header("content-type", "application/json")
                                    .header("cache-control", "no-store")
                                    .body(Full::new(Bytes::from(v.to_string()))),
                                Err(e) => Response::builder()
                                    .status(503)
                                    .header("content-type", "text/plain; charset=utf-8")
                                    .body(Full::new(Bytes::from(format!("{e}\n")))),
                            }
                        }
                        Route::MethodNotAllowed => Response::builder()
                            .status(405)
                            .header("allow", "GET, HEAD")
                            .body(Full::new(Bytes::from_static(b"read-only: GET or HEAD\n"))),
                        Route::NotFound => {
                            Response::builder()
                                .status(404)
                                .body(Full::new(Bytes::from_static(if control.is_some() {
                                    b"try /metrics, / or /status.json\n"
                                } else {
                                    b"try /metrics\n"
                                })))
                        }
                    };
                    Ok::<_, Infallible>(resp.expect("valid response"))
                }
            });
            let conn = http1::Builder::new()
                .timer(TokioTimer::new())
                .header_read_timeout(timing::METRICS_HEADER_READ_TIMEOUT)
                .serve_connection(TokioIo::new(stream), svc);
            let _ = tokio::time::timeout(timing::METRICS_CONNECTION_LIFETIME, conn).await;
        });
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::control::{BackendStatsView, Rates, VipStatsView};

    #[test]
    fn renders_every_family_with_labels() {
        let stats = StatsView {
            interval_s: 1.0,
            vips: vec![VipStatsView {
                vip: "web".into(),
                traffic: Rates {
                    packets: 10,
                    bytes: 1000,
                    pps: 0.0,
                    bps: 0.0,
                },
                new_flows: 3,
                new_flows_ps: 0.0,
                conntrack_hits: 7,
                conntrack_hit_ratio: 0.7,
                return_packets: 5,
                return_bytes: 500,
                acl_denied: 2,
                rate_limited: 6,
            }],
            backends: vec![BackendStatsView {
                vip: "web".into(),
                address: "198.18.0.11".parse().unwrap(),
                health: Health::Up,
                traffic: Rates {
                    packets: 4,
                    bytes: 400,
                    pps: 0.0,
                    bps: 0.0,
                },
                active_connections: Some(12),
                health_transitions: 3,
                check_latency: Some(crate::control::LatencyView {
                    le: vec![0.001, 0.01],
                    counts: vec![2, 1, 1],
                    sum_s: 0.5,
                    count: 4,
                }),
            }],
            reasons: [("drop_no_backend".to_string(), (2, 0.0))].into(),
            nat_entries: Some(9),
            limited_sources: vec![crate::control::LimitedSourceView {
                vip: "web".into(),
                source: "198.18.7.0".parse().unwrap(),
                limit: "new".into(),
                dropped: 4,
                passed: 100,
            }],
            announced: Some([("web".to_string(), true), ("dns".to_string(), false)].into()),
            ring_builds: 4,
            version: "9.8.7".into(),
            started_unix_s: 1_800_000_000.5,
            conntrack: Some(crate::control::ConntrackView {
                records_v4: 70,
                records_v6: 8,
                capacity_v4: 1024,
                capacity_v6: 1024,
            }),
        };
        let text = render(&stats);
        for want in [
            r#"lb_vip_packets_total{vip="web"} 10"#,
            r#"lb_vip_bytes_total{vip="web"} 1000"#,
            r#"lb_vip_new_flows_total{vip="web"} 3"#,
            r#"lb_vip_conntrack_hits_total{vip="web"} 7"#,
            r#"lb_backend_packets_total{vip="web",backend="198.18.0.11"} 4"#,
            r#"lb_backend_up{vip="web",backend="198.18.0.11"} 1"#,
            r#"lb_backend_active_connections{vip="web",backend="198.18.0.11"} 12"#,
            r#"lb_packets_by_reason_total{reason="drop_no_backend"} 2"#,
            r#"lb_vip_return_packets_total{vip="web"} 5"#,
            r#"lb_vip_return_bytes_total{vip="web"} 500"#,
            "lb_nat_entries 9",
            r#"lb_vip_acl_denied_total{vip="web"} 2"#,
            r#"lb_vip_rate_limited_packets_total{vip="web"} 6"#,
            r#"lb_rate_limited_source_drops{vip="web",source="198.18.7.0",limit="new"} 4"#,
            r#"lb_vip_announced{vip="web"} 1"#,
            r#"lb_vip_announced{vip="dns"} 0"#,
            r#"lb_backend_health_transitions_total{vip="web",backend="198.18.0.11"} 3"#,
            r#"lb_build_info{version="9.8.7"} 1"#,
            "lb_agent_start_time_seconds 1800000000.5",
            "lb_ring_builds_total 4",
            r#"lb_conntrack_records{family="ipv4"} 70"#,
            r#"lb_conntrack_records{family="ipv6"} 8"#,
            r#"lb_conntrack_capacity{family="ipv6"} 1024"#,
            r#"lb_backend_check_duration_seconds_bucket{le="0.001",vip="web",backend="198.18.0.11"} 2"#,
            r#"lb_backend_check_duration_seconds_bucket{le="0.01",vip="web",backend="198.18.0.11"} 3"#,
            r#"lb_backend_check_duration_seconds_bucket{le="+Inf",vip="web",backend="198.18.0.11"} 4"#,
            r#"lb_backend_check_duration_seconds_count{vip="web",backend="198.18.0.11"} 4"#,
        ] {
            assert!(text.contains(want), "missing {want} in:\n{text}");
        }
    }
}

#[cfg(test)]
mod classic_tests {
    use super::*;

    #[test]
    fn the_classic_format_names_counters_by_their_samples_and_has_no_eof() {
        let om = render(&StatsView {
            version: "1.2.3".into(),
            ..StatsView::default()
        });
        assert!(om.contains("# TYPE lb_ring_builds counter") && om.ends_with("# EOF\n"));
        let text = classic(&om);
        assert!(
            text.contains("# TYPE lb_ring_builds_total counter"),
            "{text}"
        );
        assert!(text.contains("# HELP lb_ring_builds_total "), "{text}");
        assert!(text.contains("lb_ring_builds_total 0"), "{text}");
        assert!(text.contains("# TYPE lb_build_info gauge"), "{text}");
        assert!(!text.contains("# EOF"), "{text}");
        // Only the comment lines differ.
        let samples = |t: &str| -> Vec<String> {
            t.lines()
                .filter(|l| !l.starts_with('#'))
                .map(str::to_string)
                .collect()
        };
        assert_eq!(samples(&om), samples(&text));
    }
}

#[cfg(test)]
mod nat_tests {
    use super::*;

    #[test]
    fn no_nat_entries_gauge_before_the_first_count() {
        let text = render(&StatsView::default());
        assert!(!text.contains("lb_nat_entries"), "{text}");
        // Announcing off: no announce gauge either; no agent figures in a
        // view without them.
        assert!(!text.contains("lb_vip_announced"), "{text}");
        assert!(!text.contains("lb_build_info"), "{text}");
    }
}
