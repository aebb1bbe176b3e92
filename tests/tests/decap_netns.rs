//! `lb decap` end to end: a sender namespace (the load balancer's address
//! 198.18.20.1, a foreign one 198.18.20.9, and the client's 198.18.30.1)
//! and a backend namespace (198.18.20.2, the VIP 198.18.10.1 on lo, a UDP
//! server bound to it) on one veth pair. The real `lb decap` CLI runs in
//! the backend namespace; the sender emits IP-in-IP and GUE packets whose
//! inner datagram goes from the client to the VIP, and receives the
//! backend's direct reply as the client.

use std::{
    io::ErrorKind,
    net::{Ipv4Addr, Ipv6Addr, SocketAddr, SocketAddrV4, SocketAddrV6, UdpSocket},
    path::{Path, PathBuf},
    time::{Duration, Instant},
};

use anyhow::{Context as _, Result, bail, ensure};
use aya::programs::XdpMode;
use lb_tests::{
    agent::lb_in_ns,
    netns::{NAME_PREFIX, Netns, run_command},
    packet::{ipv4_udp_l3, ipv6_udp_l3},
    testprogs::{RETURN_ONLY, TestProgs},
};
use socket2::{Domain, Protocol, SockAddr, Socket, Type};

const LB: Ipv4Addr = Ipv4Addr::new(198, 18, 20, 1);
const BACKEND: Ipv4Addr = Ipv4Addr::new(198, 18, 20, 2);
const FOREIGN: Ipv4Addr = Ipv4Addr::new(198, 18, 20, 9);
const CLIENT: Ipv4Addr = Ipv4Addr::new(198, 18, 30, 1);
const VIP: Ipv4Addr = Ipv4Addr::new(198, 18, 10, 1);
const VIP_PORT: u16 = 5353;
const GUE_PORT: u16 = 6080;
const TIMEOUT: Duration = Duration::from_secs(10);

/// Removes an interface's lb-decap pins on drop (a failed test must not
/// leave them in bpffs, which outlives its namespaces), and its
/// namespace's directory once empty.
struct PinGuard(PathBuf);

impl Drop for PinGuard {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
        if let Some(parent) = self.0.parent()
            && parent != Path::new(lb::decap::PIN_ROOT)
        {
            let _ = std::fs::remove_dir(parent);
        }
    }
}

struct Pair {
    // Fields drop in order: pins first, then the namespaces.
    _pins: (PinGuard, PinGuard),
    sender: Netns,
    backend: Netns,
    s_if: String,
    b_if: String,
}

impl Pair {
    fn new(tag: &str) -> Result<Pair> {
        lb_tests::require_root();
        let pid = std::process::id();
        let (s_if, b_if) = (format!("ds{tag}{pid}"), format!("db{tag}{pid}"));
        let sender = Netns::create(format!("{NAME_PREFIX}{pid}-{tag}snd"))?;
        let backend = Netns::create(format!("{NAME_PREFIX}{pid}-{tag}be"))?;
        // lb-decap's pin directories, as the CLI run in each namespace
        // names them (per namespace: see lb::decap::pin_root).
        let pin_dir_in = |ns: &Netns, iface: &str| {
            let iface = iface.to_string();
            ns.run(move || lb::decap::pin_dir(&iface))
        };
        let pins = (
            PinGuard(pin_dir_in(&sender, &s_if)?),
            PinGuard(pin_dir_in(&backend, &b_if)?),
        );
        sender.ip([
            "link",
            "add",
            &s_if,
            "type",
            "veth",
            "peer",
            "name",
            &b_if,
            "netns",
            backend.name(),
        ])?;
        for a in ["198.18.20.1/24", "198.18.20.9/24"] {
            sender.ip(["addr", "add", a, "dev", &s_if])?;
        }
        sender.ip(["addr", "add", "198.18.30.1/32", "dev", "lo"])?;
        sender.ip(["link", "set", &s_if, "up"])?;
        sender.ip(["route", "add", "198.18.10.0/24", "via", "198.18.20.2"])?;
        // Checksums complete in software: the outer UDP checksum is not
        // left to an offload the decapsulated packet no longer matches.
        sender.ethtool_features(&s_if, &[("tx", false)])?;
        backend.ip(["addr", "add", "198.18.20.2/24", "dev", &b_if])?;
        backend.ip(["link", "set", &b_if, "up"])?;
        backend.ip(["addr", "add", "198.18.10.1/32", "dev", "lo"])?;
        backend.ip(["route", "add", "198.18.30.0/24", "via", "198.18.20.1"])?;
        for ns in [&sender, &backend] {
            ns.sysctl(&[
                ("net.ipv4.conf.all.rp_filter", "0"),
                ("net.ipv4.conf.default.rp_filter", "0"),
            ])?;
        }
        Ok(Pair {
            _pins: pins,
            sender,
            backend,
            s_if,
            b_if,
        })
    }

    /// `lb decap ARGS` in `ns`: (success, stdout, stderr).
    fn lb(&self, ns: &Netns, args: &[&str]) -> Result<(bool, String, String)> {
        let mut cmd = lb_in_ns(ns.name());
        cmd.arg("decap").args(args);
        let out = match run_command(cmd, TIMEOUT) {
            Ok(o) => o,
            Err(e) => return Ok((false, String::new(), format!("{e:#}"))),
        };
        Ok((
            out.status.success(),
            String::from_utf8_lossy(&out.stdout).into_owned(),
            String::from_utf8_lossy(&out.stderr).into_owned(),
        ))
    }

    fn lb_ok(&self, ns: &Netns, args: &[&str]) -> Result<String> {
        let (ok, out, err) = self.lb(ns, args)?;
        ensure!(ok, "lb decap {args:?} failed: {err}");
        Ok(out)
    }

    fn status(&self) -> Result<serde_json::Value> {
        let out = self.lb_ok(&self.backend, &["status", "--iface", &self.b_if, "--json"])?;
        let v: serde_json::Value = serde_json::from_str(&out).context("status --json")?;
        Ok(v["interfaces"][0].clone())
    }

    fn counter(&self, name: &str) -> Result<u64> {
        self.status()?["counters"][name]
            .as_u64()
            .with_context(|| format!("counter {name}"))
    }

    /// The XDP program id on the backend's interface, if any.
    fn backend_xdp(&self) -> Result<Option<String>> {
        let out = self.backend.ip(["-d", "link", "show", "dev", &self.b_if])?;
        let text = String::from_utf8_lossy(&out.stdout);
        Ok(text
            .lines()
            .find(|l| l.trim_start().starts_with("prog/xdp"))
            .map(|l| l.trim().to_string()))
    }
}

/// Sends `inner` from `src` to the backend as IP-in-IP (a raw socket of
/// protocol 4: the kernel writes the outer header).
fn send_ipip(p: &Pair, src: Ipv4Addr, inner: &[u8]) -> Result<()> {
    let inner = inner.to_vec();
    p.sender.run(move || -> Result<()> {
        let s = Socket::new(Domain::IPV4, Type::RAW, Some(Protocol::from(4)))?;
        s.bind(&SockAddr::from(SocketAddrV4::new(src, 0)))?;
        s.send_to(&inner, &SockAddr::from(SocketAddrV4::new(BACKEND, 0)))?;
        Ok(())
    })?
}

/// Sends `inner` from `src` to the backend as GUE (the inner packet is
/// the UDP payload).
fn send_gue(p: &Pair, src: Ipv4Addr, inner: &[u8]) -> Result<()> {
    let inner = inner.to_vec();
    p.sender.run(move || -> Result<()> {
        let s = UdpSocket::bind(SocketAddrV4::new(src, 0))?;
        s.send_to(&inner, SocketAddrV4::new(BACKEND, GUE_PORT))?;
        Ok(())
    })?
}

/// Receives one datagram within `TIMEOUT` (bounded wait, not a timing
/// assertion: a missing datagram fails the test either way).
fn recv(sock: &UdpSocket) -> Result<(Vec<u8>, SocketAddr)> {
    sock.set_read_timeout(Some(TIMEOUT))?;
    let mut buf = [0u8; 2048];
    let (n, from) = sock.recv_from(&mut buf).context("waiting for a datagram")?;
    Ok((buf[..n].to_vec(), from))
}

/// Polls `f` until it holds, at most 100 times over `TIMEOUT`.
fn wait_until(what: &str, mut f: impl FnMut() -> Result<bool>) -> Result<()> {
    let start = Instant::now();
    for _ in 0..100 {
        if f()? {
            return Ok(());
        }
        if start.elapsed() > TIMEOUT {
            break;
        }
        std::thread::sleep(Duration::from_millis(100));
    }
    bail!("{what}: not within {TIMEOUT:?}")
}

#[test]
fn tunnelled_datagrams_reach_the_vip_and_the_reply_goes_to_the_client() -> Result<()> {
    let p = Pair::new("a")?;
    let server = p
        .backend
        .run(|| UdpSocket::bind(SocketAddrV4::new(VIP, VIP_PORT)))??;
    let out = p.lb_ok(
        &p.backend,
        &[
            "attach",
            "--iface",
            &p.b_if,
            "--allow-source",
            "198.18.20.1/32",
        ],
    )?;
    ensure!(out.contains("attached lb-decap"), "{out}");
    let prog = p.backend_xdp()?.context("no XDP program after attach")?;
    ensure!(prog.contains("lb_decap"), "{prog}");
    ensure!(p._pins.1.0.join("link").exists());

    for (i, kind) in ["ipip", "gue"].into_iter().enumerate() {
        let client_port = 40000 + i as u16;
        let client = p
            .sender
            .run(move || UdpSocket::bind(SocketAddrV4::new(CLIENT, client_port)))??;
        let payload = format!("hello over {kind}");
        let inner = ipv4_udp_l3(CLIENT, client_port, VIP, VIP_PORT, payload.as_bytes());
        match kind {
            "ipip" => send_ipip(&p, LB, &inner)?,
            _ => send_gue(&p, LB, &inner)?,
        }
        let (got, from) = recv(&server).with_context(|| format!("server, {kind}"))?;
        assert_eq!(got, payload.as_bytes(), "{kind}");
        assert_eq!(
            from,
            SocketAddr::from(SocketAddrV4::new(CLIENT, client_port)),
            "{kind}: the server sees the client"
        );
        let reply = format!("reply to {kind}");
        server.send_to(reply.as_bytes(), from)?;
        let (got, from) = recv(&client).with_context(|| format!("client, {kind}"))?;
        assert_eq!(got, reply.as_bytes(), "{kind}");
        assert_eq!(
            from,
            SocketAddr::from(SocketAddrV4::new(VIP, VIP_PORT)),
            "{kind}: the reply comes from the VIP, directly"
        );
    }
    let st = p.status()?;
    assert_eq!(st["counters"]["decap_ipip"], 1, "{st}");
    assert_eq!(st["counters"]["decap_gue"], 1, "{st}");
    assert_eq!(st["counters"]["drop_not_allowed"], 0, "{st}");
    assert!(
        st["counters"]["pass_not_tunnel"].as_u64().unwrap() > 0,
        "ARP: {st}"
    );

    // A foreign source's tunnel packets are dropped and counted.
    let inner = ipv4_udp_l3(CLIENT, 40100, VIP, VIP_PORT, b"from a foreign source");
    send_gue(&p, FOREIGN, &inner)?;
    send_ipip(&p, FOREIGN, &inner)?;
    wait_until("two packets counted as not allowed", || {
        Ok(p.counter("drop_not_allowed")? == 2)
    })?;
    server.set_nonblocking(true)?;
    let mut buf = [0u8; 64];
    match server.recv_from(&mut buf) {
        Err(e) if e.kind() == ErrorKind::WouldBlock => {}
        other => panic!("the foreign source's datagram was delivered: {other:?}"),
    }
    let st = p.status()?;
    assert_eq!(
        (
            st["counters"]["decap_ipip"].as_u64(),
            st["counters"]["decap_gue"].as_u64()
        ),
        (Some(1), Some(1)),
        "{st}"
    );

    // Detach: program and pins gone; a second detach is an error.
    let out = p.lb_ok(&p.backend, &["detach", "--iface", &p.b_if])?;
    ensure!(out.contains("detached"), "{out}");
    assert_eq!(p.backend_xdp()?, None, "still attached after detach");
    assert!(!p._pins.1.0.exists(), "pins left");
    let (ok, _, err) = p.lb(&p.backend, &["detach", "--iface", &p.b_if])?;
    assert!(!ok && err.contains("not attached"), "{err}");
    Ok(())
}

#[test]
fn attach_again_updates_in_place_and_errors_change_nothing() -> Result<()> {
    let p = Pair::new("b")?;
    let b_if = p.b_if.as_str();
    p.lb_ok(
        &p.backend,
        &[
            "attach",
            "--iface",
            b_if,
            "--allow-source",
            "198.18.20.0/24",
        ],
    )?;
    let prog = p.backend_xdp()?.context("attached")?;

    // Updated in place: the same program stays attached, entries removed
    // are removed.
    let out = p.lb_ok(
        &p.backend,
        &[
            "attach",
            "--iface",
            b_if,
            "--allow-source",
            "198.18.20.1/32",
            "--allow-source",
            "2001:2::/48",
            "--gue-port",
            "7000",
        ],
    )?;
    ensure!(out.contains("updated in place"), "{out}");
    assert_eq!(
        p.backend_xdp()?.as_deref(),
        Some(prog.as_str()),
        "same program"
    );
    let st = p.status()?;
    assert_eq!(
        st["allow_sources"],
        serde_json::json!(["198.18.20.1/32", "2001:2::/48"]),
        "{st}"
    );
    assert_eq!(st["gue_port"], 7000);

    // Bad input: a clear error naming what and where, nothing changed.
    let before = p.status()?;
    let cases: Vec<(Vec<&str>, &str)> = vec![
        (
            vec![
                "attach",
                "--iface",
                b_if,
                "--allow-source",
                "198.18.20.1/32",
                "--allow-source",
                "198.18.20.0/33",
            ],
            "--allow-source #2 (\"198.18.20.0/33\")",
        ),
        (
            vec!["attach", "--iface", b_if, "--allow-source", "lb-host"],
            "\"lb-host\" is not an IPv4 or IPv6 address",
        ),
        (
            vec!["attach", "--iface", b_if],
            "at least one --allow-source",
        ),
        (
            vec![
                "attach",
                "--iface",
                b_if,
                "--allow-source",
                "198.18.20.1/32",
                "--gue-port",
                "0",
            ],
            "--gue-port 0",
        ),
        (
            vec![
                "attach",
                "--iface",
                "nosuch0",
                "--allow-source",
                "198.18.20.1/32",
            ],
            "interface nosuch0 does not exist",
        ),
        (
            vec!["detach", "--iface", "nosuch0"],
            "not attached to nosuch0",
        ),
        (
            vec!["status", "--iface", "nosuch0"],
            "not attached to nosuch0",
        ),
    ];
    for (args, want) in cases {
        let (ok, _, err) = p.lb(&p.backend, &args)?;
        assert!(!ok, "{args:?} succeeded");
        assert!(err.contains(want), "{args:?}: {err}");
        let now = p.status()?;
        assert_eq!(
            (&now["allow_sources"], &now["gue_port"], &now["attached"]),
            (
                &before["allow_sources"],
                &before["gue_port"],
                &before["attached"]
            ),
            "{args:?} changed something"
        );
        assert_eq!(p.backend_xdp()?.as_deref(), Some(prog.as_str()));
    }
    assert!(!p.backend.run(|| lb::decap::pin_dir("nosuch0"))?.exists());

    // Another XDP program on the interface (here the test's return-only
    // program, as the balancer would be): refused, nothing pinned.
    let s_if = p.s_if.clone();
    let other = p.sender.run(move || -> Result<TestProgs> {
        let mut t = TestProgs::load()?;
        t.attach(RETURN_ONLY, &s_if, XdpMode::Driver)?;
        Ok(t)
    })??;
    let (ok, _, err) = p.lb(
        &p.sender,
        &[
            "attach",
            "--iface",
            &p.s_if,
            "--allow-source",
            "198.18.20.2/32",
        ],
    )?;
    assert!(!ok, "attached over another XDP program");
    assert!(err.contains("not lb-decap"), "{err}");
    assert!(!p._pins.0.0.exists(), "pins left behind");
    drop(other);

    // Text status names the interface, the list and the counters.
    let text = p.lb_ok(&p.backend, &["status"])?;
    ensure!(
        text.contains(b_if) && text.contains("2001:2::/48") && text.contains("drop_not_allowed"),
        "{text}"
    );
    p.lb_ok(&p.backend, &["detach", "--iface", b_if])?;
    assert_eq!(p.backend_xdp()?, None);
    Ok(())
}

const LB6: Ipv6Addr = Ipv6Addr::new(0x2001, 2, 0, 0x20, 0, 0, 0, 1);
const BACKEND6: Ipv6Addr = Ipv6Addr::new(0x2001, 2, 0, 0x20, 0, 0, 0, 2);
/// On the sender's link but not on the allow-list.
const FOREIGN6: Ipv6Addr = Ipv6Addr::new(0x2001, 2, 0, 0x20, 0, 0, 0, 9);
const CLIENT6: Ipv6Addr = Ipv6Addr::new(0x2001, 2, 0, 0x30, 0, 0, 0, 1);
const VIP6: Ipv6Addr = Ipv6Addr::new(0x2001, 2, 0, 0x10, 0, 0, 0, 1);

impl Pair {
    /// IPv6 next to IPv4: the LB 2001:2:0:20::1, the backend ::2, the
    /// client 2001:2:0:30::1 on the sender's lo, the VIP 2001:2:0:10::1 on
    /// the backend's lo (no duplicate address detection, so usable at once).
    fn add_ipv6(&self) -> Result<()> {
        let s = &self.sender;
        s.ip([
            "addr",
            "add",
            "2001:2:0:20::1/64",
            "dev",
            &self.s_if,
            "nodad",
        ])?;
        s.ip([
            "addr",
            "add",
            "2001:2:0:20::9/64",
            "dev",
            &self.s_if,
            "nodad",
        ])?;
        s.ip(["addr", "add", "2001:2:0:30::1/128", "dev", "lo", "nodad"])?;
        s.ip([
            "-6",
            "route",
            "add",
            "2001:2:0:10::/64",
            "via",
            "2001:2:0:20::2",
        ])?;
        let b = &self.backend;
        b.ip([
            "addr",
            "add",
            "2001:2:0:20::2/64",
            "dev",
            &self.b_if,
            "nodad",
        ])?;
        b.ip(["addr", "add", "2001:2:0:10::1/128", "dev", "lo", "nodad"])?;
        b.ip([
            "-6",
            "route",
            "add",
            "2001:2:0:30::/64",
            "via",
            "2001:2:0:20::1",
        ])?;
        Ok(())
    }
}

/// Sends `inner` over IPv6 from `src` to the backend: a raw socket of
/// next header `proto` (41: 6in6, 4: 4in6), or UDP to the GUE port.
fn send_v6(p: &Pair, how: &str, src: Ipv6Addr, inner: &[u8]) -> Result<()> {
    let inner = inner.to_vec();
    let how = how.to_string();
    p.sender.run(move || -> Result<()> {
        let to = SocketAddrV6::new(BACKEND6, 0, 0, 0);
        match how.as_str() {
            "gue" => {
                let s = UdpSocket::bind(SocketAddrV6::new(src, 0, 0, 0))?;
                s.send_to(&inner, SocketAddrV6::new(BACKEND6, GUE_PORT, 0, 0))?;
            }
            _ => {
                let proto = if how == "6in6" { 41 } else { 4 };
                let s = Socket::new(Domain::IPV6, Type::RAW, Some(Protocol::from(proto)))?;
                s.bind(&SockAddr::from(SocketAddrV6::new(src, 0, 0, 0)))?;
                s.send_to(&inner, &SockAddr::from(to))?;
            }
        }
        Ok(())
    })?
}

#[test]
fn ipv6_tunnels_6in6_4in6_and_gue_over_ipv6_reach_the_vips() -> Result<()> {
    let p = Pair::new("c")?;
    p.add_ipv6()?;
    let server4 = p
        .backend
        .run(|| UdpSocket::bind(SocketAddrV4::new(VIP, VIP_PORT)))??;
    let server6 = p
        .backend
        .run(|| UdpSocket::bind(SocketAddrV6::new(VIP6, VIP_PORT, 0, 0)))??;
    p.lb_ok(
        &p.backend,
        &[
            "attach",
            "--iface",
            &p.b_if,
            "--allow-source",
            "2001:2:0:20::1/128",
        ],
    )?;
    for (i, how) in ["6in6", "4in6", "gue"].into_iter().enumerate() {
        let port = 41000 + i as u16;
        let payload = format!("hello over {how}");
        let v4 = how == "4in6";
        let (inner, client, server) = if v4 {
            let c = p
                .sender
                .run(move || UdpSocket::bind(SocketAddrV4::new(CLIENT, port)))??;
            let inner = ipv4_udp_l3(CLIENT, port, VIP, VIP_PORT, payload.as_bytes());
            (inner, c, &server4)
        } else {
            let c = p
                .sender
                .run(move || UdpSocket::bind(SocketAddrV6::new(CLIENT6, port, 0, 0)))??;
            let inner = ipv6_udp_l3(CLIENT6, port, VIP6, VIP_PORT, payload.as_bytes());
            (inner, c, &server6)
        };
        send_v6(&p, how, LB6, &inner)?;
        let (got, from) = recv(server).with_context(|| format!("server, {how}"))?;
        assert_eq!(got, payload.as_bytes(), "{how}");
        let want_from: SocketAddr = if v4 {
            SocketAddrV4::new(CLIENT, port).into()
        } else {
            SocketAddrV6::new(CLIENT6, port, 0, 0).into()
        };
        assert_eq!(from, want_from, "{how}: the server sees the client");
        server.send_to(b"reply", from)?;
        let (got, from) = recv(&client).with_context(|| format!("client, {how}"))?;
        assert_eq!(got, b"reply", "{how}");
        assert_eq!(
            from,
            server.local_addr()?,
            "{how}: the reply comes from the VIP"
        );
    }
    let st = p.status()?;
    assert_eq!(st["counters"]["decap_ipip"], 2, "{st}");
    assert_eq!(st["counters"]["decap_gue"], 1, "{st}");
    // A foreign IPv6 source's tunnel packets (each kind) are dropped and
    // counted, and the IPv4 LB address is not on this allow-list either.
    let inner6 = ipv6_udp_l3(CLIENT6, 41100, VIP6, VIP_PORT, b"not allowed");
    let inner = ipv4_udp_l3(CLIENT, 41100, VIP, VIP_PORT, b"not allowed");
    send_v6(&p, "6in6", FOREIGN6, &inner6)?;
    send_v6(&p, "gue", FOREIGN6, &inner6)?;
    send_v6(&p, "4in6", FOREIGN6, &inner)?;
    send_ipip(&p, LB, &inner)?;
    wait_until("four packets counted as not allowed", || {
        Ok(p.counter("drop_not_allowed")? == 4)
    })?;
    for server in [&server4, &server6] {
        server.set_nonblocking(true)?;
        let mut buf = [0u8; 64];
        match server.recv_from(&mut buf) {
            Err(e) if e.kind() == ErrorKind::WouldBlock => {}
            other => panic!("a foreign source's datagram was delivered: {other:?}"),
        }
    }
    let st = p.status()?;
    assert_eq!(st["counters"]["decap_ipip"], 2, "{st}");
    assert_eq!(st["counters"]["decap_gue"], 1, "{st}");
    p.lb_ok(&p.backend, &["detach", "--iface", &p.b_if])?;
    Ok(())
}

#[test]
fn two_namespaces_with_the_same_interface_name_each_get_their_own_pins() -> Result<()> {
    lb_tests::require_root();
    let pid = std::process::id();
    let a = Netns::create(format!("{NAME_PREFIX}{pid}-dupa"))?;
    let b = Netns::create(format!("{NAME_PREFIX}{pid}-dupb"))?;
    let mut pins = Vec::new();
    for ns in [&a, &b] {
        ns.ip([
            "link", "add", "eth7", "type", "veth", "peer", "name", "eth8",
        ])?;
        ns.ip(["link", "set", "eth7", "up"])?;
        ns.ip(["link", "set", "eth8", "up"])?;
        pins.push(PinGuard(ns.run(|| lb::decap::pin_dir("eth7"))?));
    }
    ensure!(
        pins[0].0 != pins[1].0,
        "one directory for both: {:?}",
        pins[0].0
    );
    let decap = |ns: &Netns, args: &[&str]| -> Result<String> {
        let mut cmd = lb_in_ns(ns.name());
        cmd.arg("decap").args(args);
        let out = run_command(cmd, TIMEOUT)?;
        Ok(String::from_utf8_lossy(&out.stdout).into_owned())
    };
    for ns in [&a, &b] {
        let out = decap(
            ns,
            &[
                "attach",
                "--iface",
                "eth7",
                "--allow-source",
                "198.18.20.1/32",
            ],
        )?;
        ensure!(out.contains("attached lb-decap"), "{out}");
    }
    for (ns, dir) in [(&a, &pins[0].0), (&b, &pins[1].0)] {
        ensure!(dir.join("link").exists(), "{dir:?}");
        let status = decap(ns, &["status", "--json"])?;
        let v: serde_json::Value = serde_json::from_str(&status)?;
        ensure!(
            v["interfaces"].as_array().map(Vec::len) == Some(1),
            "each namespace lists its own interface only: {status}"
        );
    }
    // Detaching in one leaves the other attached.
    decap(&a, &["detach", "--iface", "eth7"])?;
    ensure!(!pins[0].0.exists() && pins[1].0.join("link").exists());
    decap(&b, &["detach", "--iface", "eth7"])?;
    ensure!(!pins[1].0.exists());
    for p in &pins {
        let root = p.0.parent().expect("a parent");
        ensure!(!root.exists(), "{root:?} left behind");
    }
    Ok(())
}
