//! `lb config show`: a [`Config`] back to the file format, every default
//! written out. [`Config::parse`] of the text gives the same `Config`
//! (apart from `source`).

use std::fmt::Write;

use super::model::{Config, HealthCheck, HealthCheckKind, RateLimitConfig, VipConfig};

/// A TOML string literal.
fn q(s: &str) -> String {
    toml::Value::String(s.to_owned()).to_string()
}

fn list<T: ToString>(items: &[T]) -> String {
    let items: Vec<String> = items.iter().map(|i| q(&i.to_string())).collect();
    format!("[{}]", items.join(", "))
}

/// The effective configuration as TOML.
pub fn render_toml(cfg: &Config) -> String {
    let mut o = String::new();
    // Writing to a String cannot fail.
    let _ = render(cfg, &mut o);
    o
}

fn render(cfg: &Config, o: &mut String) -> std::fmt::Result {
    let a = &cfg.agent;
    let (k, s) = (&a.kernel, &a.start);
    writeln!(
        o,
        "# lb config show: {}, every default filled in",
        cfg.source.display()
    )?;
    writeln!(o, "[agent]")?;
    writeln!(o, "instance = {}", q(&k.instance))?;
    writeln!(o, "interfaces = {}", list(&s.interfaces))?;
    writeln!(o, "xdp_mode = {}", q(s.xdp_mode.as_str()))?;
    writeln!(
        o,
        "control_socket = {}",
        q(&s.control_socket.display().to_string())
    )?;
    if let Some(g) = &s.control_group {
        writeln!(o, "control_group = {}", q(g))?;
    }
    if let Some(m) = &s.metrics_listen {
        writeln!(o, "metrics_listen = {}", q(&m.to_string()))?;
    }
    writeln!(o, "conntrack_entries = {}", k.conntrack_entries)?;
    writeln!(o, "max_vips = {}", k.max_vips)?;
    writeln!(o, "max_backends = {}", k.max_backends)?;
    writeln!(o, "ring_size = {}", k.ring_size)?;
    writeln!(o, "nat_entries = {}", k.nat_entries)?;
    writeln!(o, "acl_entries = {}", k.acl_entries)?;
    writeln!(
        o,
        "max_kernel_memory = {}",
        q(&crate::kernel_memory::format_bytes(s.max_kernel_memory))
    )?;
    let c = &a.conntrack;
    writeln!(o, "conntrack_udp_idle_ms = {}", c.udp_idle.as_millis())?;
    writeln!(o, "conntrack_tcp_idle_ms = {}", c.tcp_idle.as_millis())?;
    writeln!(
        o,
        "conntrack_tcp_closing_ms = {}",
        c.tcp_closing.as_millis()
    )?;
    writeln!(o, "syn_guard = {}", q(c.syn_guard.as_str()))?;
    writeln!(o, "syn_guard_rate = {}", c.syn_guard_rate)?;
    if let Some(v4) = a.encap.source_v4 {
        writeln!(o, "encap_source_v4 = {}", q(&v4.to_string()))?;
    }
    if let Some(v6) = a.encap.source_v6 {
        writeln!(o, "encap_source_v6 = {}", q(&v6.to_string()))?;
    }
    writeln!(o, "gue_port = {}", a.encap.gue_port)?;
    writeln!(
        o,
        "nat_port_range = {}",
        q(&format!("{}-{}", a.nat.port_min, a.nat.port_max))
    )?;
    writeln!(o, "snat_addresses = {}", list(&a.nat.snat_addresses))?;
    if let Some(an) = &s.announce {
        writeln!(o, "\n[agent.announce]")?;
        writeln!(o, "table = {}", an.table)?;
        writeln!(o, "protocol = {}", an.protocol)?;
        writeln!(o, "device = {}", q(&an.device))?;
    }
    for v in &cfg.vips {
        vip(v, o)?;
    }
    Ok(())
}

fn vip(v: &VipConfig, o: &mut String) -> std::fmt::Result {
    writeln!(o, "\n[[vip]]")?;
    writeln!(o, "name = {}", q(&v.name))?;
    writeln!(o, "address = {}", q(&v.address.to_string()))?;
    writeln!(o, "port = {}", v.port)?;
    writeln!(o, "protocol = {}", q(v.protocol.as_str()))?;
    writeln!(o, "forwarding = {}", q(v.forwarding.as_str()))?;
    writeln!(o, "icmp_echo = {}", v.icmp_echo)?;
    writeln!(o, "ring_size = {}", v.ring_size)?;
    writeln!(o, "scheduler = {}", q(v.scheduler.as_str()))?;
    if !v.snat_addresses.is_empty() {
        writeln!(o, "snat_addresses = {}", list(&v.snat_addresses))?;
    }
    writeln!(o, "allow = {}", list(&v.acl.allow))?;
    writeln!(o, "deny = {}", list(&v.acl.deny))?;
    writeln!(o, "\n[vip.health_check]")?;
    health_check(&v.health_check, o)?;
    let r = &v.rate_limit;
    // Absent, the table leaves every field zero (which a written table
    // cannot say: its prefixes are 1 or more).
    if *r != RateLimitConfig::default() {
        rate_limit(r, o)?;
    }
    backends(v, o)
}

fn rate_limit(r: &RateLimitConfig, o: &mut String) -> std::fmt::Result {
    writeln!(o, "\n[vip.rate_limit]")?;
    for (name, rate, burst) in [
        ("new_per_source", r.new_per_source, r.new_per_source_burst),
        (
            "packets_per_source",
            r.packets_per_source,
            r.packets_per_source_burst,
        ),
        ("new_per_vip", r.new_per_vip, r.new_per_vip_burst),
    ] {
        writeln!(o, "{name} = {rate}")?;
        if rate != 0 {
            writeln!(o, "{name}_burst = {burst}")?;
        }
    }
    writeln!(o, "source_prefix_v4 = {}", r.source_prefix_v4)?;
    writeln!(o, "source_prefix_v6 = {}", r.source_prefix_v6)?;
    Ok(())
}

fn backends(v: &VipConfig, o: &mut String) -> std::fmt::Result {
    for b in &v.backends {
        writeln!(o, "\n[[vip.backend]]")?;
        writeln!(o, "address = {}", q(&b.address.to_string()))?;
        writeln!(o, "weight = {}", b.weight)?;
        writeln!(o, "state = {}", q(b.state.as_str()))?;
        if let Some(m) = b.mac {
            writeln!(o, "mac = {}", q(&crate::mac::MacAddr(m).to_string()))?;
        }
        if let Some(p) = b.port {
            writeln!(o, "port = {p}")?;
        }
        // The VIP's check unless overridden: written whole when it differs.
        if b.health_check != v.health_check {
            writeln!(o, "[vip.backend.health_check]")?;
            health_check(&b.health_check, o)?;
        }
    }
    Ok(())
}

fn health_check(h: &HealthCheck, o: &mut String) -> std::fmt::Result {
    writeln!(o, "kind = {}", q(h.kind.name()))?;
    writeln!(o, "port = {}", h.port)?;
    writeln!(o, "interval_ms = {}", h.interval.as_millis())?;
    writeln!(o, "timeout_ms = {}", h.timeout.as_millis())?;
    writeln!(o, "rise = {}", h.rise)?;
    writeln!(o, "fall = {}", h.fall)?;
    if let HealthCheckKind::Http {
        path,
        expected_status,
        host,
    } = &h.kind
    {
        writeln!(o, "path = {}", q(path))?;
        writeln!(o, "expected_status = {expected_status}")?;
        if let Some(host) = host {
            writeln!(o, "host = {}", q(host))?;
        }
    }
    Ok(())
}
