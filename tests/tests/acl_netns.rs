//! Source access control end to end, in network namespaces, through the
//! real agent: a client namespace with two source addresses, one the
//! VIP's ACL allows (A, the client's own address) and one it denies (D, a
//! second address on the client's interface). Denied sources cannot
//! connect, allowed ones can; reloads between two ACLs while both send
//! lose no packet of A and let none of D through; a NAT VIP honours its
//! ACL; an agent restart keeps the ACL in force and its next reload
//! switches; a VIP with 100 000 prefixes applies. Needs root.

use std::{
    net::{Ipv4Addr, SocketAddr, SocketAddrV4, TcpStream, UdpSocket},
    sync::atomic::{AtomicBool, Ordering},
    thread,
    time::{Duration, Instant},
};

use anyhow::{Context as _, Result, ensure};
use lb_tests::{
    agent::{AgentPaths, LbAgent, METRICS_LISTEN, VipSpec, render_config},
    netns::{ChildGuard, Netns, Topology},
    require_root,
    routed::{NatArms, RoutedTopology},
    servers::{ServerKind, spawn_on_backends, spawn_server},
};
use socket2::{Domain, Protocol, SockAddr, Socket, Type};

const WEB: u16 = 80;
const DNS: u16 = 53;
const WEB_BACKEND: u16 = 8080;
const T: Duration = Duration::from_secs(3);

/// The denied source: host 50 of the client's /24.
fn denied_addr(client: Ipv4Addr) -> Ipv4Addr {
    let [a, b, c, _] = client.octets();
    Ipv4Addr::new(a, b, c, 50)
}

/// `allow = [...]` / `deny = [...]` lines.
fn acl_lines(allow: &[String], deny: &[String]) -> String {
    let q = |l: &[String]| {
        l.iter()
            .map(|p| format!("\"{p}\""))
            .collect::<Vec<_>>()
            .join(", ")
    };
    format!("allow = [{}]\ndeny = [{}]\n", q(allow), q(deny))
}

/// `text` with `acl` added to the VIP named `vip`.
fn with_acl(text: &str, vip: &str, acl: &str) -> String {
    let at = format!("name = \"{vip}\"\n");
    assert!(text.contains(&at), "no VIP {vip}");
    text.replacen(&at, &format!("{at}{acl}"), 1)
}

/// Adds `addr`/24 to the client's interface.
fn add_client_addr(ns: &Netns, iface: &str, addr: Ipv4Addr) -> Result<()> {
    let o = ns.ip(["addr", "add", &format!("{addr}/24"), "dev", iface])?;
    ensure!(o.status.success(), "ip addr add {addr}: {o:?}");
    Ok(())
}

/// A TCP connection from `src` (port chosen by the kernel) to `dst`.
fn connect_from(src: Ipv4Addr, dst: SocketAddr, timeout: Duration) -> Result<TcpStream> {
    let s = Socket::new(Domain::IPV4, Type::STREAM, Some(Protocol::TCP))?;
    s.bind(&SockAddr::from(SocketAddrV4::new(src, 0)))?;
    s.connect_timeout(&SockAddr::from(dst), timeout)
        .with_context(|| format!("connect {src} -> {dst}"))?;
    Ok(s.into())
}

/// A UDP socket bound to `src`, connected to `dst`, reads bounded by
/// `timeout`.
fn udp_from(src: Ipv4Addr, dst: SocketAddr, timeout: Duration) -> Result<UdpSocket> {
    let s = UdpSocket::bind(SocketAddrV4::new(src, 0))?;
    s.connect(dst)?;
    s.set_read_timeout(Some(timeout))?;
    Ok(s)
}

/// One request and its reply (None: no reply within the socket's
/// timeout).
fn ask(s: &UdpSocket, n: u64) -> Result<Option<Vec<u8>>> {
    s.send(&n.to_be_bytes())?;
    let mut buf = [0u8; 256];
    match s.recv(&mut buf) {
        Ok(len) => Ok(Some(buf[..len].to_vec())),
        Err(e)
            if e.kind() == std::io::ErrorKind::WouldBlock
                || e.kind() == std::io::ErrorKind::TimedOut =>
        {
            Ok(None)
        }
        Err(e) => Err(e.into()),
    }
}

/// Replies to `src` within a few tries (the first may wait for ARP).
fn answered(ns: &Netns, src: Ipv4Addr, vip: SocketAddr) -> Result<bool> {
    ns.run(move || -> Result<bool> {
        let s = udp_from(src, vip, Duration::from_millis(300))?;
        for n in 0..5 {
            if ask(&s, n)?.is_some() {
                return Ok(true);
            }
        }
        Ok(false)
    })?
}

/// The VIP's counter as `lb stats` shows it.
fn vip_stat(agent: &LbAgent, vip: &str, field: &str) -> Result<u64> {
    let stats = agent.json(&["stats"])?;
    let v = stats["vips"]
        .as_array()
        .and_then(|a| a.iter().find(|v| v["vip"] == vip))
        .with_context(|| format!("no VIP {vip} in {stats}"))?;
    v[field]
        .as_u64()
        .with_context(|| format!("no {field} in {v}"))
}

/// A topology with HTTP and UDP echo servers on two backends, the second
/// client address, and an agent in front of "web" (TCP) and "dns" (UDP),
/// both with `acl`.
struct Dsr {
    // Field order is drop order: agent and servers before the namespaces.
    agent: LbAgent,
    _servers: Vec<ChildGuard>,
    topo: Topology,
    text: String,
}

impl Dsr {
    /// `acl` gets the client's address (the denied one is host 50 of its
    /// /24).
    fn new(acl: impl Fn(Ipv4Addr) -> String, extra: &[&str]) -> Result<Dsr> {
        Self::with_agent(acl, extra, "")
    }

    /// [`Dsr::new`] with `agent` lines added to `[agent]`.
    fn with_agent(acl: impl Fn(Ipv4Addr) -> String, extra: &[&str], agent: &str) -> Result<Dsr> {
        require_root();
        let topo = Topology::with_backends(2)?;
        let mut servers = spawn_on_backends(&topo, ServerKind::Http, WEB)?;
        servers.extend(spawn_on_backends(&topo, ServerKind::UdpEcho, DNS)?);
        add_client_addr(
            topo.client_ns(),
            &topo.client_iface(),
            denied_addr(topo.client_addr()),
        )?;
        let backends: Vec<Ipv4Addr> = (0..2).map(|i| topo.backend_addr(i)).collect();
        let web = VipSpec::tcp("web", topo.vip(), WEB, &backends);
        let mut dns = VipSpec::tcp("dns", topo.vip(), DNS, &backends);
        dns.protocol = "udp";
        dns.health_check = "kind = \"none\"".into();
        let paths = AgentPaths::new()?;
        let base = render_config(
            &paths.instance,
            &paths.socket,
            &topo.lb_iface(),
            &[web, dns],
        )
        .replacen("[agent]\n", &format!("[agent]\n{agent}"), 1);
        let acl = acl(topo.client_addr());
        let text = with_acl(&with_acl(&base, "web", &acl), "dns", &acl);
        let agent = LbAgent::start_with(topo.lb_ns(), paths, &text, extra)?;
        for i in 0..2 {
            agent.wait_health(
                Some("web"),
                topo.backend_addr(i).into(),
                "up",
                Duration::from_secs(10),
            )?;
        }
        Ok(Dsr {
            agent,
            _servers: servers,
            topo,
            text: base,
        })
    }

    fn a(&self) -> Ipv4Addr {
        self.topo.client_addr()
    }

    fn d(&self) -> Ipv4Addr {
        denied_addr(self.topo.client_addr())
    }

    fn vip(&self, port: u16) -> SocketAddr {
        SocketAddr::new(self.topo.vip().into(), port)
    }

    /// Rewrites the config with `acl` on both VIPs and reloads.
    fn reload(&self, acl: &str) -> Result<()> {
        let text = with_acl(&with_acl(&self.text, "web", acl), "dns", acl);
        std::fs::write(&self.agent.config, text)?;
        self.agent.cli_ok(&["reload"])?;
        Ok(())
    }
}

/// The segment's /24 of `client` (host bits clear).
fn net24(client: Ipv4Addr) -> String {
    let [a, b, c, _] = client.octets();
    format!("{a}.{b}.{c}.0/24")
}

/// Allows the client's /24, denies D.
fn allow_net_deny_d(client: Ipv4Addr) -> String {
    acl_lines(&[net24(client)], &[format!("{}/32", denied_addr(client))])
}

#[test]
fn a_denied_client_cannot_connect_and_an_allowed_one_can() -> Result<()> {
    let s = Dsr::new(allow_net_deny_d, &[])?;
    let (a, d, web) = (s.a(), s.d(), s.vip(WEB));
    // A: an HTTP answer from a backend.
    let body = s.topo.client_ns().run(move || -> Result<String> {
        use std::io::{Read as _, Write as _};
        let mut c = connect_from(a, web, T)?;
        c.set_read_timeout(Some(T))?;
        c.write_all(b"GET / HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n")?;
        let mut out = String::new();
        c.read_to_string(&mut out)?;
        Ok(out)
    })??;
    ensure!(body.contains("backend-"), "allowed client got {body:?}");
    // D: no connection (its SYNs are dropped; connect times out).
    let denied = s
        .topo
        .client_ns()
        .run(move || connect_from(d, web, Duration::from_secs(2)).is_err())?;
    ensure!(denied, "the denied client connected");
    ensure!(
        !answered(s.topo.client_ns(), d, s.vip(DNS))?,
        "D got a UDP answer"
    );
    ensure!(
        answered(s.topo.client_ns(), a, s.vip(DNS))?,
        "A got no UDP answer"
    );
    // Counted per VIP and by reason; in the metrics too.
    ensure!(
        vip_stat(&s.agent, "web", "acl_denied")? >= 1,
        "web: no denial counted"
    );
    ensure!(
        vip_stat(&s.agent, "dns", "acl_denied")? >= 1,
        "dns: no denial counted"
    );
    ensure!(s.agent.reason("drop_acl_denied")? >= 2);
    thread::sleep(Duration::from_millis(1200));
    let text = lb_tests::agent::metrics(s.topo.lb_ns())?;
    ensure!(
        text.lines()
            .any(|l| l.starts_with("lb_vip_acl_denied_total{vip=\"web\"}") && !l.ends_with(" 0")),
        "metrics:\n{text}"
    );
    // The CLI's views.
    let list = s.agent.cli_ok(&["vip", "list"])?;
    ensure!(list.contains("acl: allow 1, deny 1"), "{list}");
    let e = s
        .agent
        .explain(SocketAddr::new(d.into(), 40000), web, "tcp")?;
    ensure!(e["acl"]["allowed"] == false, "{e}");
    ensure!(e["acl"]["by"] == format!("deny {d}/32"), "{e}");
    let e = s
        .agent
        .explain(SocketAddr::new(a.into(), 40000), web, "tcp")?;
    ensure!(
        e["acl"]["allowed"] == true && e["acl"]["by"] == format!("allow {}", net24(a)),
        "{e}"
    );
    let _ = METRICS_LISTEN;
    Ok(())
}

/// Sends from `src` until `stop` (at most `limit`), one request at a
/// time, each waiting for its reply up to `wait`: (sent, answered).
fn lockstep(
    ns: &Netns,
    src: Ipv4Addr,
    vip: SocketAddr,
    wait: Duration,
    stop: &AtomicBool,
    limit: u64,
) -> Result<(u64, u64)> {
    ns.run(move || -> Result<(u64, u64)> {
        let s = udp_from(src, vip, wait)?;
        let (mut sent, mut got) = (0u64, 0u64);
        while !stop.load(Ordering::Relaxed) && sent < limit {
            sent += 1;
            if ask(&s, sent)?.is_some() {
                got += 1;
            }
        }
        Ok((sent, got))
    })?
}

/// Sends from `src` without waiting (one datagram every half
/// millisecond) until `stop` (at most `limit`), counting replies as they
/// come and for a moment after: (sent, answered).
fn stream(
    ns: &Netns,
    src: Ipv4Addr,
    vip: SocketAddr,
    stop: &AtomicBool,
    limit: u64,
) -> Result<(u64, u64)> {
    ns.run(move || -> Result<(u64, u64)> {
        let s = udp_from(src, vip, Duration::from_millis(300))?;
        s.set_nonblocking(true)?;
        let (mut sent, mut got) = (0u64, 0u64);
        let mut buf = [0u8; 256];
        let mut drain = |s: &UdpSocket, got: &mut u64| {
            while s.recv(&mut buf).is_ok() {
                *got += 1;
            }
        };
        while !stop.load(Ordering::Relaxed) && sent < limit {
            sent += 1;
            // A full socket buffer is no send: not counted.
            if s.send(&sent.to_be_bytes()).is_err() {
                sent -= 1;
            }
            drain(&s, &mut got);
            thread::sleep(Duration::from_micros(500));
        }
        s.set_nonblocking(false)?;
        let end = Instant::now() + Duration::from_millis(300);
        while Instant::now() < end {
            if s.recv(&mut buf).is_ok() {
                got += 1;
            }
        }
        Ok((sent, got))
    })?
}

/// Two ACLs that both allow A and deny D, with different prefixes (so
/// every reload really switches the tries).
fn two_acls(client: Ipv4Addr) -> [String; 2] {
    let [a, b, c, _] = client.octets();
    [
        acl_lines(&[net24(client)], &[format!("{}/32", denied_addr(client))]),
        acl_lines(
            &[format!("{a}.{b}.{c}.0/27"), format!("{a}.{b}.{c}.128/25")],
            &[format!("{a}.{b}.{c}.48/28"), format!("{a}.{b}.{c}.16/28")],
        ),
    ]
}

/// Sends from A and D while the agent reloads `reloads` times between
/// the two ACLs: every request of A answered, none of D, and the VIP's
/// denial counter equal to D's requests.
fn traffic_across_reloads(s: &Dsr, acls: &[String; 2], reloads: usize) -> Result<()> {
    let (a, d, dns) = (s.a(), s.d(), s.vip(DNS));
    // Warm up A (ARP on the backends' side) before counting.
    ensure!(
        answered(s.topo.client_ns(), a, dns)?,
        "A got no answer before the reloads"
    );
    let denied_before = vip_stat(&s.agent, "dns", "acl_denied")?;
    let stop = AtomicBool::new(false);
    let ns = s.topo.client_ns();
    let (ra, rd, reloaded) = thread::scope(|sc| {
        let ta = sc.spawn(|| lockstep(ns, a, dns, Duration::from_secs(2), &stop, 200_000));
        let td = sc.spawn(|| stream(ns, d, dns, &stop, 200_000));
        let mut reloaded = Ok(0);
        for i in 0..reloads {
            thread::sleep(Duration::from_millis(30));
            if let Err(e) = s.reload(&acls[(i + 1) % 2]) {
                reloaded = Err(e);
                break;
            }
            reloaded = reloaded.map(|n| n + 1);
        }
        thread::sleep(Duration::from_millis(100));
        stop.store(true, Ordering::Relaxed);
        (ta.join(), td.join(), reloaded)
    });
    let reloaded = reloaded?;
    let (sent_a, got_a) = ra.map_err(|_| anyhow::anyhow!("A's sender panicked"))??;
    let (sent_d, got_d) = rd.map_err(|_| anyhow::anyhow!("D's sender panicked"))??;
    println!(
        "{reloaded} reloads: A sent {sent_a}, answered {got_a}; D sent {sent_d}, answered {got_d}"
    );
    ensure!(reloaded == reloads);
    ensure!(
        sent_a > 100 && sent_d > 100,
        "too little traffic: {sent_a} {sent_d}"
    );
    ensure!(
        got_a == sent_a,
        "A lost {} of {sent_a} across the reloads",
        sent_a - got_a
    );
    ensure!(got_d == 0, "{got_d} of D's {sent_d} requests got through");
    let denied = vip_stat(&s.agent, "dns", "acl_denied")? - denied_before;
    ensure!(denied == sent_d, "denied {denied}, D sent {sent_d}");
    Ok(())
}

#[test]
fn reloads_between_two_acls_lose_no_allowed_packet_and_let_no_denied_one_through() -> Result<()> {
    let s = Dsr::new(|c| two_acls(c)[0].clone(), &[])?;
    let acls = two_acls(s.a());
    traffic_across_reloads(&s, &acls, 20)
}

#[test]
fn an_agent_restart_keeps_the_acl_in_force_and_the_next_reload_switches() -> Result<()> {
    let mut s = Dsr::new(allow_net_deny_d, &["--keep-datapath"])?;
    let (a, d, dns) = (s.a(), s.d(), s.vip(DNS));
    ensure!(answered(s.topo.client_ns(), a, dns)?);
    ensure!(!answered(s.topo.client_ns(), d, dns)?);
    s.agent.stop()?;
    // No agent: the data path keeps the ACL.
    ensure!(
        answered(s.topo.client_ns(), a, dns)?,
        "A refused without an agent"
    );
    ensure!(
        !answered(s.topo.client_ns(), d, dns)?,
        "D answered without an agent"
    );
    s.agent.spawn(&["--keep-datapath"])?;
    ensure!(
        answered(s.topo.client_ns(), a, dns)?,
        "A refused after the restart"
    );
    ensure!(
        !answered(s.topo.client_ns(), d, dns)?,
        "D answered after the restart"
    );
    // The restarted agent adopted the ACL: reloads switch without a gap.
    let acls = two_acls(a);
    traffic_across_reloads(&s, &acls, 6)?;
    // And a reload to the opposite ACL takes effect.
    s.reload(&acl_lines(&[format!("{d}/32")], &[]))?;
    ensure!(
        answered(s.topo.client_ns(), d, dns)?,
        "D refused after the switch"
    );
    ensure!(
        !answered(s.topo.client_ns(), a, dns)?,
        "A answered after the switch"
    );
    Ok(())
}

/// 100 000 host prefixes: D and 99 999 other hosts of 198.18.0.0/15
/// outside the client's /24, starting `shift` hosts in.
fn hundred_thousand(client: Ipv4Addr, shift: usize) -> Vec<String> {
    let [_, _, k, _] = client.octets();
    let d = denied_addr(client);
    let mut deny = vec![format!("{d}/32")];
    deny.extend(
        (u32::from(Ipv4Addr::new(198, 18, 0, 0))..=u32::from(Ipv4Addr::new(198, 19, 255, 255)))
            .map(Ipv4Addr::from)
            .filter(|a| !(a.octets()[1] == 18 && a.octets()[2] == k))
            .skip(shift)
            .take(99_999)
            .map(|a| format!("{a}/32")),
    );
    deny
}

#[test]
fn a_vip_with_100_000_prefixes_applies_and_reloads() -> Result<()> {
    let t0 = Instant::now();
    // Both VIPs get them: 200 000 in force, a third copy during a switch.
    let s = Dsr::with_agent(
        |c| acl_lines(&[], &hundred_thousand(c, 0)),
        &[],
        "acl_entries = 300000\n",
    )?;
    let started = t0.elapsed();
    let (a, d, dns) = (s.a(), s.d(), s.vip(DNS));
    ensure!(answered(s.topo.client_ns(), a, dns)?);
    ensure!(!answered(s.topo.client_ns(), d, dns)?);
    let t1 = Instant::now();
    s.reload(&acl_lines(&[], &hundred_thousand(a, 7)))?;
    let reloaded = t1.elapsed();
    ensure!(answered(s.topo.client_ns(), a, dns)?);
    ensure!(!answered(s.topo.client_ns(), d, dns)?);
    let list = s.agent.cli_ok(&["vip", "list"])?;
    ensure!(list.contains("acl: allow 0, deny 100000"), "{list}");
    println!(
        "100 000 prefixes on each of 2 VIPs: agent start (config, load, both ACLs written, health) {:.2} s; reload switching both to another 100 000 {:.2} s",
        started.as_secs_f64(),
        reloaded.as_secs_f64()
    );
    Ok(())
}

/// A NAT VIP (lb on a stick, backends behind a router) with an ACL that
/// allows the client's /24 and denies D: A gets the backend's answer, D
/// no connection; counted for the VIP; a reload to the opposite ACL
/// cuts A's and admits D's.
#[test]
fn a_nat_vip_honours_its_acl() -> Result<()> {
    require_root();
    let topo = RoutedTopology::new_nat(2, NatArms::One)?;
    let mut servers = Vec::new();
    for i in 0..topo.backend_count() {
        servers.push(spawn_server(
            topo.backend_ns(i),
            ServerKind::Http,
            SocketAddr::new(Ipv4Addr::UNSPECIFIED.into(), WEB_BACKEND),
            &format!("backend-{i}"),
        )?);
    }
    let (a, vip) = (topo.client_addr(), SocketAddr::new(topo.vip().into(), WEB));
    let d = denied_addr(a);
    add_client_addr(topo.client_ns(), &topo.front().client_iface(), d)?;
    let paths = AgentPaths::new()?;
    let ifaces: Vec<String> = topo.lb_ifaces().iter().map(|i| format!("{i:?}")).collect();
    let (instance, socket) = (paths.instance.clone(), paths.socket.clone());
    let config = |acl: &str| {
        let mut s = format!(
            "[agent]\ninstance = \"{}\"\ninterfaces = [{}]\ncontrol_socket = \"{}\"\nmax_vips = 4\nmax_backends = 16\nconntrack_entries = 65536\n\
             [[vip]]\nname = \"web\"\naddress = \"{}\"\nport = {WEB}\nprotocol = \"tcp\"\nforwarding = \"nat\"\n{acl}\
             [vip.health_check]\nkind = \"tcp\"\ninterval_ms = 200\ntimeout_ms = 150\nrise = 2\nfall = 2\n",
            instance,
            ifaces.join(", "),
            socket.display(),
            topo.vip()
        );
        for b in topo.backend_addrs() {
            s += &format!("[[vip.backend]]\naddress = \"{b}\"\nport = {WEB_BACKEND}\n");
        }
        s
    };
    let text = config(&allow_net_deny_d(a));
    let agent = LbAgent::start_with(topo.lb_ns(), paths, &text, &[])?;
    for b in topo.backend_addrs() {
        agent.wait_health(Some("web"), b.into(), "up", Duration::from_secs(10))?;
    }
    let get = |src: Ipv4Addr, timeout: Duration| {
        topo.client_ns().run(move || -> Result<String> {
            use std::io::{Read as _, Write as _};
            let mut c = connect_from(src, vip, timeout)?;
            c.set_read_timeout(Some(T))?;
            c.write_all(b"GET / HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n")?;
            let mut out = String::new();
            c.read_to_string(&mut out)?;
            Ok(out)
        })?
    };
    let body = get(a, T)?;
    ensure!(body.contains("backend-"), "A got {body:?}");
    ensure!(
        get(d, Duration::from_secs(2)).is_err(),
        "D connected to the NAT VIP"
    );
    let denied = vip_stat(&agent, "web", "acl_denied")?;
    ensure!(denied >= 1, "no denial counted");
    // The opposite ACL: D in, A out.
    std::fs::write(&agent.config, config(&acl_lines(&[format!("{d}/32")], &[])))?;
    agent.cli_ok(&["reload"])?;
    ensure!(
        get(d, T)?.contains("backend-"),
        "D refused after the switch"
    );
    ensure!(
        get(a, Duration::from_secs(2)).is_err(),
        "A connected after the switch"
    );
    drop(agent);
    drop(servers);
    Ok(())
}
