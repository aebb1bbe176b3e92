//! The namespace topology harness itself, without lb: connectivity to the
//! backends, DSR replies from the VIP, cleanup (also on panic), and proof
//! that the VIP is unreachable while nothing balances it. Needs root.
//!
//! `cargo test -p lb-tests --test netns_harness -- --test-threads=1`

use std::{
    io::{Read, Write},
    net::{Ipv4Addr, SocketAddrV4},
    panic::{AssertUnwindSafe, catch_unwind},
    sync::Mutex,
    time::{Duration, Instant},
};

use lb_tests::{
    netns::{Topology, TopologyOpts, list_namespaces, namespaces_still_present, root_link_names},
    require_root,
    servers::{
        ServerKind, backend_name, http_get, http_get_from, spawn_on_backends, spawn_server,
        tcp_connect, udp_request, udp_request_from,
    },
};

const HTTP_PORT: u16 = 80;
const UDP_PORT: u16 = 5353;
const STREAM_PORT: u16 = 7000;
/// Fixed client ports sit below ip_local_port_range (32768-60999) so that
/// no ephemeral connection ever takes them.
const FIXED_PORT: u16 = 20001;
const T: Duration = Duration::from_secs(2);

fn any(port: u16) -> SocketAddrV4 {
    SocketAddrV4::new(Ipv4Addr::UNSPECIFIED, port)
}

fn assert_gone(names: &[String]) {
    let left = namespaces_still_present(names).unwrap();
    assert!(left.is_empty(), "namespaces left behind: {left:?}");
}

#[test]
fn backends_reachable_directly_and_everything_removed() {
    require_root();
    let links_before = root_link_names().unwrap();
    let started = Instant::now();
    let topo = Topology::new(TopologyOpts {
        backends: 2,
        ..Default::default()
    })
    .unwrap();
    eprintln!("topology built in {:?}", started.elapsed());
    let names = topo.namespace_names();
    let present = list_namespaces().unwrap();
    for n in &names {
        assert!(present.contains(n), "{n} missing from ip netns list");
    }
    // Nothing appeared in the root namespace.
    assert_eq!(root_link_names().unwrap(), links_before);

    // Offloads and sysctls as promised.
    // GRO off (XDP must see wire-sized frames), an XDP program on the
    // lb's peer so that XDP_TX frames are delivered.
    let gro = "generic-receive-offload";
    assert!(
        !topo
            .lb_ns()
            .ethtool_feature_on(&topo.lb_iface(), gro)
            .unwrap()
    );
    let sw = topo.switch_ns();
    for port in [
        topo.lb_switch_port(),
        topo.client_switch_port(),
        topo.backend_switch_port(1),
    ] {
        assert!(!sw.ethtool_feature_on(&port, gro).unwrap(), "{port}");
    }
    let peer = sw.ip(["link", "show", &topo.lb_switch_port()]).unwrap();
    assert!(String::from_utf8_lossy(&peer.stdout).contains("prog/xdp"));
    let tx = "tx-checksumming";
    assert!(
        !topo
            .client_ns()
            .ethtool_feature_on(&topo.client_iface(), tx)
            .unwrap()
    );
    assert!(
        !topo
            .backend_ns(0)
            .ethtool_feature_on(&topo.backend_iface(0), tx)
            .unwrap()
    );
    assert_eq!(topo.lb_ns().sysctl_get("net.ipv4.ip_forward").unwrap(), "0");
    let b = topo.backend_ns(1);
    assert_eq!(b.sysctl_get("net.ipv4.conf.all.arp_ignore").unwrap(), "1");
    assert_eq!(b.sysctl_get("net.ipv4.conf.all.arp_announce").unwrap(), "2");
    let lo = String::from_utf8(b.ip(["-o", "addr", "show", "dev", "lo"]).unwrap().stdout).unwrap();
    assert!(lo.contains(&format!("{}/32", topo.vip())), "{lo}");

    // exec errors name the command and carry its stderr.
    let err = topo
        .client_ns()
        .exec(["ls", "/nonexistent-lbt"])
        .unwrap_err();
    let msg = format!("{err:#}");
    assert!(
        msg.contains("ls /nonexistent-lbt") && msg.contains("No such file"),
        "{msg}"
    );

    let _http = spawn_on_backends(&topo, ServerKind::Http, HTTP_PORT).unwrap();
    let _udp = spawn_on_backends(&topo, ServerKind::UdpEcho, UDP_PORT).unwrap();
    let _stream = spawn_on_backends(&topo, ServerKind::Stream, STREAM_PORT).unwrap();

    topo.client_ns()
        .run(|| {
            for i in 0..topo.backend_count() {
                let addr = topo.backend_addr(i);
                let body = http_get(SocketAddrV4::new(addr, HTTP_PORT), T).unwrap();
                assert_eq!(body, format!("{}\n", backend_name(i)));
                let reply = udp_request(SocketAddrV4::new(addr, UDP_PORT), b"ping", T).unwrap();
                assert_eq!(reply, format!("{}:ping", backend_name(i)).into_bytes());
            }
            // A fixed source port, reused by back-to-back connections.
            let b0 = SocketAddrV4::new(topo.backend_addr(0), HTTP_PORT);
            for _ in 0..50 {
                assert_eq!(
                    http_get_from(Some(FIXED_PORT), b0, T).unwrap(),
                    "backend-0\n"
                );
            }
            let u0 = SocketAddrV4::new(topo.backend_addr(0), UDP_PORT);
            for _ in 0..3 {
                let r = udp_request_from(Some(FIXED_PORT + 1), u0, b"x", T).unwrap();
                assert_eq!(r, b"backend-0:x");
            }
        })
        .unwrap();

    // 3,000 short connections from 4 client threads, bounded in time.
    let started = Instant::now();
    let deadline = started + Duration::from_secs(15);
    std::thread::scope(|s| {
        for t in 0..4 {
            let topo = &topo;
            s.spawn(move || {
                topo.client_ns()
                    .run(|| {
                        for j in 0..750 {
                            assert!(Instant::now() < deadline, "3,000 connections too slow");
                            let i = (t + j) % 2;
                            let a = SocketAddrV4::new(topo.backend_addr(i), HTTP_PORT);
                            let body = http_get(a, T).unwrap_or_else(|e| panic!("#{j}: {e:#}"));
                            assert_eq!(body, format!("backend-{i}\n"));
                        }
                    })
                    .unwrap();
            });
        }
    });
    let tw = topo
        .client_ns()
        .exec(["ss", "-Htan", "state", "time-wait"])
        .unwrap()
        .stdout;
    let tw = String::from_utf8_lossy(&tw).lines().count();
    eprintln!(
        "3,000 HTTP connections in {:?}; client sockets in TIME_WAIT: {tw}",
        started.elapsed()
    );
    // The server closes first, so the client keeps (almost) no TIME_WAIT.
    assert!(tw < 100, "{tw} client sockets in TIME_WAIT");

    // A long-lived echo stream: 1 MiB, every byte back in order.
    topo.client_ns()
        .run(|| {
            let a = SocketAddrV4::new(topo.backend_addr(1), STREAM_PORT);
            let mut s = tcp_connect(None, a, T).unwrap();
            let data: Vec<u8> = (0..1u32 << 20).map(|i| (i * 7 + i / 251) as u8).collect();
            let mut w = s.try_clone().unwrap();
            let writer = std::thread::spawn({
                let data = data.clone();
                move || w.write_all(&data).unwrap()
            });
            let mut back = vec![0u8; data.len()];
            s.read_exact(&mut back).unwrap();
            writer.join().unwrap();
            assert!(back == data, "stream echo corrupted");
        })
        .unwrap();

    drop((_http, _udp, _stream));
    drop(topo);
    assert_gone(&names);
    assert_eq!(root_link_names().unwrap(), links_before);
}

#[test]
fn vip_unreachable_without_lb_but_dsr_path_works() {
    require_root();
    let mut topo = Topology::with_backends(2).unwrap();
    let _http = spawn_on_backends(&topo, ServerKind::Http, HTTP_PORT).unwrap();
    let _udp = spawn_on_backends(&topo, ServerKind::UdpEcho, UDP_PORT).unwrap();
    let vip_http = SocketAddrV4::new(topo.vip(), HTTP_PORT);
    let vip_udp = SocketAddrV4::new(topo.vip(), UDP_PORT);

    // The client routes the VIP via lb, which has no program and does not
    // forward: nothing gets through.
    let started = Instant::now();
    let r = topo
        .client_ns()
        .run(|| http_get(vip_http, Duration::from_millis(1500)))
        .unwrap();
    assert!(r.is_err(), "VIP answered without lb: {r:?}");
    assert!(started.elapsed() < Duration::from_secs(3));
    let r = topo
        .client_ns()
        .run(|| udp_request(vip_udp, b"ping", Duration::from_millis(1000)))
        .unwrap();
    assert!(r.is_err(), "VIP answered UDP without lb: {r:?}");

    // Bypass lb (route the VIP to backend 1): the backend accepts traffic to
    // the VIP on lo and answers straight to the client, from the VIP (UDP
    // too, through IP_PKTINFO), which is what DSR needs.
    topo.client_route_vip_via(topo.backend_addr(1)).unwrap();
    topo.client_ns()
        .run(|| {
            assert_eq!(http_get(vip_http, T).unwrap(), "backend-1\n");
            assert_eq!(udp_request(vip_udp, b"hi", T).unwrap(), b"backend-1:hi");
        })
        .unwrap();
    topo.client_route_vip_via(topo.lb_addr()).unwrap();

    // A backend added later is wired like the others.
    let i = topo.add_backend().unwrap();
    assert_eq!(i, 2);
    let _extra =
        spawn_server(topo.backend_ns(i), ServerKind::Http, any(HTTP_PORT), "late").unwrap();
    let late = SocketAddrV4::new(topo.backend_addr(i), HTTP_PORT);
    let body = topo.client_ns().run(|| http_get(late, T)).unwrap().unwrap();
    assert_eq!(body, "late\n");
    let r = topo
        .client_ns()
        .run(|| http_get(vip_http, Duration::from_millis(1000)))
        .unwrap();
    assert!(
        r.is_err(),
        "VIP answered without lb after add_backend: {r:?}"
    );
}

#[test]
fn panicking_scope_still_cleans_up() {
    require_root();
    let seen: Mutex<(Vec<String>, u32)> = Mutex::new((Vec::new(), 0));
    let result = catch_unwind(AssertUnwindSafe(|| {
        let topo = Topology::with_backends(1).unwrap();
        let server = spawn_server(topo.backend_ns(0), ServerKind::Http, any(8080), "x").unwrap();
        *seen.lock().unwrap() = (topo.namespace_names(), server.id());
        panic!("deliberate panic with a live topology");
    }));
    assert!(result.is_err());
    let (names, pid) = seen.into_inner().unwrap();
    assert_eq!(names.len(), 4);
    assert_gone(&names);
    assert!(
        !std::path::Path::new(&format!("/proc/{pid}")).exists(),
        "server {pid} survived"
    );

    // A panic inside Netns::run reaches the caller, and cleanup follows.
    let seen = Mutex::new(Vec::new());
    let result = catch_unwind(AssertUnwindSafe(|| {
        let topo = Topology::with_backends(0).unwrap();
        *seen.lock().unwrap() = topo.namespace_names();
        topo.lb_ns().run(|| panic!("inside the namespace")).unwrap();
    }));
    let msg = result.unwrap_err();
    assert_eq!(msg.downcast_ref::<&str>(), Some(&"inside the namespace"));
    assert_gone(&seen.into_inner().unwrap());
}
