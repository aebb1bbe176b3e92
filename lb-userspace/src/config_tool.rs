//! `lb check`, `lb config show` and `lb run --dry-run`: what a config
//! asks for, from the same parsing and validation as `lb run`, without
//! root, bpffs or a kernel.

use std::fmt::Write;

use crate::{
    config::Config,
    kernel_memory::{self as km, MapMemory},
};

/// The maps `cfg` creates on this host (per-CPU maps for its possible CPUs).
pub fn maps(cfg: &Config) -> anyhow::Result<(Vec<MapMemory>, u32)> {
    let ncpus = km::possible_cpus();
    let maps = km::plan(cfg.agent.kernel.map_sizes(), ncpus).map_err(anyhow::Error::msg)?;
    Ok((maps, ncpus))
}

/// `lb check`'s one line: `N VIPs, M backends, kernel memory X`.
pub fn summary(cfg: &Config) -> anyhow::Result<String> {
    let (maps, _) = maps(cfg)?;
    let backends: usize = cfg.vips.iter().map(|v| v.backends.len()).sum();
    Ok(format!(
        "{}: ok: {} VIPs, {} backends, kernel memory {} (max_kernel_memory {})",
        cfg.source.display(),
        cfg.vips.len(),
        backends,
        km::human(km::total(&maps)),
        km::human(cfg.agent.start.max_kernel_memory),
    ))
}

/// `lb run --dry-run`'s plan: the maps with their bytes and the total, the
/// VIPs; `interfaces` are the command line's (empty: the config's).
pub fn dry_run(cfg: &Config, interfaces: &[String]) -> anyhow::Result<String> {
    let (maps, ncpus) = maps(cfg)?;
    let k = &cfg.agent.kernel;
    let mut out = String::new();
    let ifaces = if interfaces.is_empty() {
        &cfg.agent.start.interfaces
    } else {
        interfaces
    };
    writeln!(out, "config      {}", cfg.source.display())?;
    writeln!(
        out,
        "instance    {} (pin dir {})",
        k.instance,
        crate::datapath::pin_dir(&k.instance).display()
    )?;
    writeln!(
        out,
        "interfaces  {} (xdp_mode {})",
        if ifaces.is_empty() {
            "none: lb run would refuse to start (list them in [agent] interfaces or pass --iface)"
                .to_string()
        } else {
            ifaces.join(", ")
        },
        cfg.agent.start.xdp_mode.as_str()
    )?;
    for name in ifaces {
        // `lb run` refuses to start without them.
        if crate::datapath::ifindex(name).is_err() {
            writeln!(
                out,
                "            interface {name} does not exist here: lb run would refuse to start"
            )?;
        }
    }
    writeln!(
        out,
        "sizes       max_vips {} max_backends {} ring_size {} conntrack_entries {} nat_entries {} acl_entries {}",
        k.max_vips, k.max_backends, k.ring_size, k.conntrack_entries, k.nat_entries, k.acl_entries
    )?;
    writeln!(
        out,
        "{:<18} {:<16} {:>5} {:>6} {:>11} {:>14}",
        "MAP", "TYPE", "KEY", "VALUE", "ENTRIES", "BYTES"
    )?;
    for m in &maps {
        writeln!(
            out,
            "{:<18} {:<16} {:>5} {:>6} {:>11} {:>14}{}",
            m.name,
            m.kind,
            m.key_size,
            m.value_size,
            m.entries,
            m.bytes,
            if m.estimated { " *" } else { "" }
        )?;
    }
    let total = km::total(&maps);
    writeln!(
        out,
        "total       {} ({total} bytes) of max_kernel_memory {}",
        km::human(total),
        km::human(cfg.agent.start.max_kernel_memory)
    )?;
    writeln!(
        out,
        "            * includes an estimated per-element header ({} bytes for hash and LRU maps, {} for LPM tries); per-CPU maps counted for {ncpus} CPUs",
        km::HTAB_ELEM_OVERHEAD,
        km::LPM_NODE_OVERHEAD
    )?;
    writeln!(
        out,
        "{:<16} {:<30} {:<10} {:<26} {:>7} {:>8}",
        "VIP", "ADDRESS", "FORWARDING", "SCHEDULER", "RING", "BACKENDS"
    )?;
    for v in &cfg.vips {
        writeln!(
            out,
            "{:<16} {:<30} {:<10} {:<26} {:>7} {:>8}",
            v.name,
            format!(
                "{}/{}",
                std::net::SocketAddr::new(v.address, v.port),
                v.protocol.as_str()
            ),
            v.forwarding.as_str(),
            v.scheduler.as_str(),
            v.ring_size,
            v.backends.len()
        )?;
    }
    write!(out, "dry run: nothing loaded, attached or pinned")?;
    Ok(out)
}
