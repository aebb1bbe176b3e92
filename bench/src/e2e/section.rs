//! The end-to-end section of the report: headline rows (each system's
//! UDP rate and CPU per packet against lb's, TCP connection rates), the
//! detail tables, the charts and the notes on how it was measured.

use std::path::Path;

use anyhow::{Result, anyhow};

use super::{
    Config, Fwd, GenKind, System, TCP_REPORT, TcpResult, UDP_TARGET, UdpResult, UdpSample,
    WARM_SECS,
};
use crate::{
    charts::{self, Bar, RefLine},
    report::{Better, Row, Section, Stats, Table, Target, TargetOn, fmt_num},
};

pub(super) fn section(
    cfg: &Config,
    out_dir: &Path,
    udp: &[UdpResult],
    tcp: &[TcpResult],
    lb_cpu: usize,
    gen_cpu: usize,
) -> Result<Section> {
    let find_udp = |sys: System, kind: GenKind| {
        udp.iter()
            .find(|r| r.sys == sys && r.kind == kind)
            .ok_or_else(|| anyhow!("no UDP result for {}", sys.label()))
    };
    let lb_live = find_udp(System::Lb(Fwd::DsrL2), GenKind::Live)?;
    let nft = find_udp(System::Nft, GenKind::Live)?;
    let mpps = |r: &UdpResult| r.stats(|s| s.pps / 1e6);
    let cpu = |r: &UdpResult| r.stats(|s| s.cpu_per_m);
    let lb_mpps = mpps(lb_live);
    let bound = |r: &UdpResult| {
        if r.saturated() {
            "LB-bound".to_string()
        } else {
            format!(
                "generator-bound: receive path {:.0}% busy",
                r.stats(|s| s.busy).median * 100.0
            )
        }
    };

    let mut rows = Vec::new();
    // Headline rates: each system with the fastest generator valid for it.
    for r in [lb_live]
        .into_iter()
        .chain(udp.iter().filter(|r| r.sys != System::Lb(Fwd::DsrL2)))
    {
        let label = match r.kind {
            GenKind::Live => format!("UDP rate, {}", r.sys.label()),
            GenKind::Packet => format!("UDP rate, {} (AF_PACKET generator)", r.sys.label()),
        };
        let mut row = Row::new(label, "Mpps", mpps(r))
            .ratio(&lb_mpps)
            .note(format!(
                "{}-byte UDP frames, one flow, {} generator; {}",
                r.frame_len,
                r.kind.label(),
                bound(r)
            ));
        if r.sys == System::Nft && r.kind == GenKind::Live {
            let caveat = if !nft.saturated() {
                " (nftables generator-bound: ratio overstated)"
            } else if !lb_live.saturated() {
                " (lb generator-bound: ratio understated)"
            } else {
                ""
            };
            row = row.target(Target {
                text: format!(
                    "lb ≥ {UDP_TARGET}× nftables (≤ {:.2}×){caveat}",
                    1.0 / UDP_TARGET
                ),
                limit: 1.0 / UDP_TARGET,
                on: TargetOn::Ratio,
                better: Better::Lower,
            });
        }
        rows.push(row);
    }
    let lb_cpu_stats = cpu(lb_live);
    for r in udp {
        rows.push(
            Row::new(
                match r.kind {
                    GenKind::Live => format!("UDP LB CPU per Mpkt, {}", r.sys.label()),
                    GenKind::Packet => {
                        format!(
                            "UDP LB CPU per Mpkt, {} (AF_PACKET generator)",
                            r.sys.label()
                        )
                    }
                },
                "CPU-s/Mpkt",
                cpu(r),
            )
            .ratio(&lb_cpu_stats)
            .note(format!(
                "CPU time of the LB's receive path (its threaded NAPI) per million forwarded \
                 frames, {} generator",
                r.kind.label()
            )),
        );
    }
    let lb_tcp = tcp
        .iter()
        .find(|r| r.sys == System::Lb(Fwd::DsrL2))
        .map(|r| r.stats(|s| s.conns_per_sec))
        .ok_or_else(|| anyhow!("no TCP result for lb"))?;
    for sys in TCP_REPORT {
        let Some(r) = tcp.iter().find(|r| r.sys == sys) else {
            continue;
        };
        let errors: u64 = r.samples.iter().map(|s| s.errors).sum();
        rows.push(
            Row::new(
                format!("TCP new connections, {}", sys.label()),
                "conn/s",
                r.stats(|s| s.conns_per_sec),
            )
            .ratio(&lb_tcp)
            .note(format!(
                "wrk -t{} -c{} -d{}s, Connection: close; {errors} errors",
                cfg.wrk_threads, cfg.wrk_connections, cfg.tcp_secs
            )),
        );
    }

    rows.extend(super::reference::rows(udp)?);
    rows.extend(super::nat::rows(udp, tcp)?);

    let mut udp_table = Table::new(
        "UDP detail (medians over the runs)",
        &[
            "system",
            "generator",
            "forwarded Mpps",
            "counted at the sink Mpps",
            "refused by the next hop",
            "offered Mpps",
            "refused at the LB's veth",
            "LB receive path busy",
            "LB CPU-s/Mpkt",
            &format!("CPU {lb_cpu} busy (all tasks)"),
            &format!("CPU {gen_cpu} busy (generator, sink)"),
            "limited by",
        ],
    );
    for r in udp {
        let m = |f: fn(&UdpSample) -> f64| r.stats(f).median;
        udp_table.push(vec![
            r.sys.label(),
            r.kind.label().into(),
            fmt_num(m(|s| s.pps) / 1e6),
            fmt_num(m(|s| s.sink_pps) / 1e6),
            format!("{:.0}%", m(|s| s.lost) * 100.0),
            fmt_num(m(|s| s.offered_pps) / 1e6),
            format!("{:.0}%", m(|s| s.refused) * 100.0),
            format!("{:.0}%", m(|s| s.busy) * 100.0),
            fmt_num(m(|s| s.cpu_per_m)),
            format!("{:.0}%", m(|s| s.lb_cpu_busy) * 100.0),
            format!("{:.0}%", m(|s| s.gen_cpu_busy) * 100.0),
            if r.saturated() { "LB" } else { "generator" }.into(),
        ]);
    }
    let mut tcp_table = Table::new(
        "TCP detail",
        &[
            "system",
            "conn/s (median, min–max)",
            "errors (all runs)",
            "machine CPU-s per 1000 connections (client, LB, servers)",
        ],
    );
    for sys in TCP_REPORT {
        let Some(r) = tcp.iter().find(|r| r.sys == sys) else {
            continue;
        };
        let s = r.stats(|s| s.conns_per_sec);
        tcp_table.push(vec![
            sys.label(),
            format!("{:.0} ({:.0}–{:.0})", s.median, s.min, s.max),
            r.samples.iter().map(|s| s.errors).sum::<u64>().to_string(),
            fmt_num(r.stats(|s| s.machine_cpu_per_k).median),
        ]);
    }
    let mut how = Table::new("Systems", &["system", "configuration"]);
    for sys in [
        System::Lb(Fwd::DsrL2),
        System::Lb(Fwd::Ipip),
        System::Lb(Fwd::Gue),
        System::Lb6(Fwd::DsrL2),
        System::Lb6(Fwd::Ipip),
        System::Lb6(Fwd::Gue),
        System::Lb(Fwd::Nat),
        System::Nft,
        System::NftMasq,
        System::Haproxy(1),
        System::Routing,
        System::RefXdp,
    ] {
        let label = match sys {
            System::Haproxy(_) => "HAProxy (nbthread 1 and 2)".into(),
            _ => sys.label(),
        };
        how.push(vec![label, sys.how().into()]);
    }

    // Charts.
    let udp_chart = "e2e-udp.png";
    let bars: Vec<Bar> = udp
        .iter()
        .map(|r| {
            Bar::new(
                format!("{} ({})", r.sys.chart_label(), r.kind.label()),
                scale(&mpps(r), 1000.0),
            )
        })
        .collect();
    let nft_k = mpps(nft).median * 1000.0;
    charts::bars(
        &out_dir.join(udp_chart),
        "UDP through the LB (60-byte frames, 80 over IPv6), median with min-max",
        "thousand packets/s forwarded",
        &bars,
        &[RefLine::new(
            format!("target for lb: {UDP_TARGET}x nftables"),
            UDP_TARGET * nft_k,
        )],
    )?;
    let tcp_chart = "e2e-tcp.png";
    let tcp_bars: Vec<Bar> = TCP_REPORT
        .iter()
        .filter_map(|sys| tcp.iter().find(|r| r.sys == *sys))
        .map(|r| Bar::new(r.sys.chart_label(), r.stats(|s| s.conns_per_sec)))
        .collect();
    charts::bars(
        &out_dir.join(tcp_chart),
        "New TCP connections per second through the LB (wrk), median with min-max",
        "connections/s",
        &tcp_bars,
        &[],
    )?;

    let gen_note = format!(
        "UDP: every run is {WARM_SECS} s of warm-up and a {} s window; {} runs per system after \
         one discarded run. Frames enter the LB's veth from its switch-side peer (in the switch \
         namespace), as the bridge delivers them, from a generator pinned to CPU {gen_cpu}; \
         the LB's receive path is threaded NAPI pinned to CPU {lb_cpu} with SCHED_FIFO (it \
         preempts other tasks as softirq processing would), and its CPU time is read from the \
         NAPI thread's schedstat (exact, unlike tick-sampled softirq time). Forwarded = frames \
         the LB handed to the next hop (XDP_TX or transmitted skbs, including those the next \
         hop could not take); they are counted and dropped at the first hop after the LB by \
         the test program `lb_sink` (the flood's UDP, plain or in an IP-in-IP or GUE tunnel), \
         its NAPI pinned to CPU {gen_cpu}.",
        cfg.udp_secs, cfg.runs
    );
    let stand_in = "Generators: every system is fed by BPF_PROG_TEST_RUN in live-frames \
        mode on `lb_gen_tx`, which stamps the frame's headers from a template (48 bytes of an \
        IPv4 frame, 64 of an IPv6 one) and returns XDP_TX: the kernel recycles live frames' \
        pages without rewriting them, and the stamp undoes whatever the receiver changed in \
        place (MACs, a pushed outer header, TTL, DNAT). nftables is also fed by an AF_PACKET \
        TX ring (fresh skbs, slower: see 'offered') as a cross-check. Where a system's \
        receive path was below 85% busy, its rate is the generator's, not its own ('limited \
        by')."
        .to_string();
    Ok(Section {
        key: "e2e".into(),
        title: "End to end in network namespaces".into(),
        intro: vec![
            "The behaviour tests' topology (client, LB, 3 backends on one bridge, every \
             namespace created and removed by the benchmark; addresses in 198.18.0.0/15), \
             with lb, nftables DNAT, HAProxy (TCP only) and plain kernel routing to one \
             backend in the LB namespace in turn. lb's UDP rate is also measured with an \
             IPv6 VIP and the backends' IPv6 addresses (2001:2::/48) in each forwarding \
             mode: the same flow over IPv6, 80-byte frames (20 bytes more header)."
                .into(),
            gen_note,
            stand_in,
            format!(
                "TCP: `wrk -t{} -c{} -d{}s -H 'Connection: close'` against http://VIP/ from \
                 the client namespace, {} runs per system after a 1 s warm-up; the servers \
                 are the test HTTP servers (a thread per connection) on the backends. These \
                 rates are bound by the client's and the servers' CPU on this 2-core \
                 machine, not by the LB.",
                cfg.wrk_threads, cfg.wrk_connections, cfg.tcp_secs, cfg.runs
            ),
        ],
        baseline: Some("lb".into()),
        rows,
        tables: vec![udp_table, tcp_table, how],
        charts: vec![udp_chart.into(), tcp_chart.into()],
        notes: vec![
            "The machine is shared: other work running on either CPU during a run shows in \
             the min–max spread and in the 'busy (all tasks)' columns."
                .into(),
            "Reference figures for this machine kind (docs/toolchain.md, not measured here): \
             plain routing ~0.94 Mpps, nftables DNAT ~0.65 Mpps, a minimal XDP forwarder \
             ~4.0 Mpps; TCP with wrk and nginx: routing ~20k, nftables ~18k, HAProxy ~9–10k \
             connections/s."
                .into(),
        ],
    })
}

/// `s` with every figure multiplied by `k`.
fn scale(s: &Stats, k: f64) -> Stats {
    Stats {
        median: s.median * k,
        min: s.min * k,
        max: s.max * k,
        runs: s.runs,
    }
}
