//! The agent's side of full NAT with the real agent in network namespaces,
//! read straight from its pinned maps: a NAT VIP's entry, NAT_SNAT, the
//! backends' ports and route sources, the attached interface as a redirect
//! target, the SNAT port range in RUNTIME; a reload that changes them and
//! one that is refused; the flow keeper removing an idle NAT pair and
//! keeping a live one, which also survives an agent restart. Needs root;
//! every test removes its namespaces and pins, also on failure.

use std::{
    net::{IpAddr, Ipv4Addr},
    thread,
    time::{Duration, Instant},
};

use anyhow::{Context as _, Result, bail, ensure};
use aya::maps::{Array, HashMap, Map, MapData, xdp::DevMapHash};
use lb_common::{
    Backend, FlowKey, IPPROTO_TCP, IPPROTO_UDP, Runtime, map_names,
    nat::{NatFwd, NatRev, NatSnat},
};
use lb_tests::{
    agent::{AgentPaths, LbAgent},
    netns::Topology,
    require_root,
};

const SNAT: Ipv4Addr = Ipv4Addr::new(198, 18, 1, 1);

/// A NAT VIP at the topology's VIP, port 80, over both backends (the
/// first at port 8080), with `agent` lines added to `[agent]`.
fn config(topo: &Topology, paths: &AgentPaths, agent: &str, snat: &str) -> String {
    format!(
        "[agent]\ninstance = \"{}\"\ninterfaces = [\"{}\"]\ncontrol_socket = \"{}\"\nmax_vips = 4\nmax_backends = 16\nconntrack_entries = 1024\nnat_entries = 1024\nconntrack_udp_idle_ms = 1000\n{agent}\n\
         [[vip]]\nname = \"web\"\naddress = \"{}\"\nport = 80\nprotocol = \"tcp\"\nforwarding = \"nat\"\nsnat_addresses = [\"{snat}\"]\n\
         [vip.health_check]\nkind = \"none\"\n\
         [[vip.backend]]\naddress = \"{}\"\nport = 8080\n\
         [[vip.backend]]\naddress = \"{}\"\n",
        paths.instance,
        topo.lb_iface(),
        paths.socket.display(),
        topo.vip(),
        topo.backend_addr(0),
        topo.backend_addr(1),
    )
}

fn open(agent: &LbAgent, name: &str) -> Result<MapData> {
    let path = agent.pin_dir().join(name);
    MapData::from_pin(&path).with_context(|| format!("opening {}", path.display()))
}

fn runtime(agent: &LbAgent) -> Result<Runtime> {
    let a: Array<_, Runtime> = Array::try_from(Map::Array(open(agent, map_names::RUNTIME)?))?;
    Ok(a.get(&0, 0)?)
}

fn nat_snat(agent: &LbAgent, index: u32) -> Result<NatSnat> {
    let a: Array<_, NatSnat> = Array::try_from(Map::Array(open(agent, map_names::NAT_SNAT)?))?;
    Ok(a.get(&index, 0)?)
}

fn backend_entry(agent: &LbAgent, id: u32) -> Result<Backend> {
    let a: Array<_, Backend> = Array::try_from(Map::Array(open(agent, map_names::BACKENDS)?))?;
    Ok(a.get(&id, 0)?)
}

/// The VIP's index and each backend's (address, id), from the CLI.
fn ids(agent: &LbAgent) -> Result<(u32, Vec<(IpAddr, u32)>)> {
    let vips = agent.json(&["vip", "list"])?;
    let index = vips[0]["index"].as_u64().context("index")? as u32;
    let backends = agent.json(&["backend", "list"])?;
    let list = backends
        .as_array()
        .context("backend list")?
        .iter()
        .map(|b| {
            let a: IpAddr = b["address"].as_str().unwrap_or("").parse()?;
            Ok((a, b["id"].as_u64().context("id")? as u32))
        })
        .collect::<Result<_>>()?;
    Ok((index, list))
}

fn ifindex(topo: &Topology, iface: &str) -> Result<u32> {
    let out = topo.lb_ns().ip(["-o", "link", "show", iface])?;
    let text = String::from_utf8_lossy(&out.stdout);
    Ok(text.split(':').next().unwrap_or("").trim().parse()?)
}

fn wire(a: Ipv4Addr) -> [u32; 4] {
    [a.to_bits().to_be(), 0, 0, 0]
}

/// Polls `f` (bounded: 100 tries over at most 10 s) until it holds.
fn eventually(what: &str, mut f: impl FnMut() -> Result<bool>) -> Result<()> {
    let deadline = Instant::now() + Duration::from_secs(10);
    for _ in 0..100 {
        if f()? {
            return Ok(());
        }
        if Instant::now() >= deadline {
            break;
        }
        thread::sleep(Duration::from_millis(100));
    }
    bail!("{what}: not reached")
}

#[test]
fn a_nat_vip_fills_the_maps_the_kernel_reads_and_reloads_in_place() -> Result<()> {
    require_root();
    let topo = Topology::with_backends(2)?;
    let paths = AgentPaths::new()?;
    let text = config(
        &topo,
        &paths,
        "nat_port_range = \"50000-50099\"",
        "198.18.1.1",
    );
    let mut agent = LbAgent::start_with(topo.lb_ns(), paths, &text, &[])?;
    let (index, backends) = ids(&agent)?;
    // The keeper writes the range with its first clock tick, before the
    // agent answers.
    let rt = runtime(&agent)?;
    ensure!(
        (rt.nat_port_min, rt.nat_port_max) == (50000, 50099),
        "{rt:?}"
    );
    let snat = nat_snat(&agent, index)?;
    ensure!(snat.count == 1 && snat.addrs[0] == wire(SNAT), "{snat:?}");
    // Backend entries: port (0 = the VIP's), the route source (lb's own
    // address on the link), the next hop.
    for (addr, id) in &backends {
        let b = backend_entry(&agent, *id)?;
        let want_port = if *addr == IpAddr::V4(topo.backend_addr(0)) {
            8080u16.to_be()
        } else {
            0
        };
        ensure!(b.port == want_port, "{addr}: port {:#x}", b.port);
        ensure!(
            b.encap_src == topo.lb_addr().to_bits().to_be(),
            "{addr}: {b:?}"
        );
        ensure!(b.is_usable(), "{addr}: {b:?}");
    }
    // The attached interface is a redirect target (replies go back out of
    // it).
    let lb_if = ifindex(&topo, &topo.lb_iface())?;
    let tx: DevMapHash<_> =
        DevMapHash::try_from(Map::DevMapHash(open(&agent, map_names::TX_PORTS)?))?;
    let ports: Vec<u32> = tx.keys().collect::<Result<_, _>>()?;
    ensure!(ports.contains(&lb_if), "TX_PORTS {ports:?} lacks {lb_if}");
    let vip = agent.json(&["vip", "list"])?;
    ensure!(vip[0]["forwarding"] == "nat", "{vip}");
    let list = agent.cli_ok(&["vip", "list"])?;
    ensure!(
        list.contains(" nat ") && list.contains("snat: 198.18.1.1"),
        "{list}"
    );
    // Before any packet: the backend address:port and the SNAT address.
    let client = format!("{}:40000", topo.client_addr());
    let vip_addr = format!("{}:80", topo.vip());
    let text = agent.cli_ok(&["explain", &client, &vip_addr, "tcp"])?;
    ensure!(
        text.contains("snat       198.18.1.1, SNAT port allocated by the first packet"),
        "{text}"
    );
    let x = agent.explain(client.parse()?, vip_addr.parse()?, "tcp")?;
    let to = x["nat"]["backend"]
        .as_str()
        .context("nat.backend")?
        .to_string();
    let ring = x["ring_backend"].as_str().context("ring_backend")?;
    let port = if ring == topo.backend_addr(0).to_string() {
        8080
    } else {
        80
    };
    ensure!(to == format!("{ring}:{port}"), "{x}");
    ensure!(text.contains(&format!("nat to     {to}")), "{text}");

    // Reload: another range, SNAT address and backend port, in place.
    std::fs::write(
        &agent.config,
        config(
            &topo,
            &paths_of(&agent),
            "nat_port_range = \"50100-50199\"",
            "198.18.1.2",
        )
        .replace("port = 8080", "port = 9090"),
    )?;
    agent.cli_ok(&["reload"])?;
    let (index2, backends2) = ids(&agent)?;
    ensure!(index2 == index && backends2 == backends, "ids moved");
    ensure!(nat_snat(&agent, index)?.addrs[0] == wire(Ipv4Addr::new(198, 18, 1, 2)));
    let first = backends
        .iter()
        .find(|b| b.0 == IpAddr::V4(topo.backend_addr(0)))
        .unwrap()
        .1;
    ensure!(backend_entry(&agent, first)?.port == 9090u16.to_be());
    eventually("the new range in RUNTIME", || {
        let rt = runtime(&agent)?;
        Ok((rt.nat_port_min, rt.nat_port_max) == (50100, 50199))
    })?;

    // A refused reload (nat_entries sizes the pinned maps) changes nothing.
    std::fs::write(
        &agent.config,
        config(
            &topo,
            &paths_of(&agent),
            "nat_port_range = \"50200-50299\"",
            "198.18.1.3",
        )
        .replace("nat_entries = 1024", "nat_entries = 2048"),
    )?;
    let out = agent.cli(&["reload"])?;
    ensure!(!out.status.success(), "the reload must fail");
    let err =
        String::from_utf8_lossy(&out.stderr).to_string() + &String::from_utf8_lossy(&out.stdout);
    ensure!(err.contains("nat_entries"), "{err}");
    ensure!(nat_snat(&agent, index)?.addrs[0] == wire(Ipv4Addr::new(198, 18, 1, 2)));
    let rt = runtime(&agent)?;
    ensure!(
        (rt.nat_port_min, rt.nat_port_max) == (50100, 50199),
        "{rt:?}"
    );
    agent.stop()?;
    Ok(())
}

/// The paths of a running agent, to render its config again.
fn paths_of(agent: &LbAgent) -> AgentPaths {
    AgentPaths {
        instance: agent.instance.clone(),
        socket: agent.socket.clone(),
        config: agent.config.clone(),
        dir: agent.config.parent().unwrap().to_path_buf(),
    }
}

/// A NAT pair of client 198.18.0.<c>:40000 through SNAT port `sport` to
/// backend `b` (id `id`), both directions last seen at `seen` (agent
/// clock), inserted into the pinned maps as the kernel would.
fn insert_pair(
    agent: &LbAgent,
    c: u8,
    sport: u16,
    b: Ipv4Addr,
    id: u32,
    proto: u8,
    seen: u64,
) -> Result<(FlowKey, FlowKey)> {
    let client = Ipv4Addr::new(198, 18, 0, c);
    let fk = FlowKey::new(
        client.to_bits(),
        40000,
        Ipv4Addr::new(198, 19, 0, 1).to_bits(),
        80,
        proto,
    );
    let rk = FlowKey::new(b.to_bits(), 8080, SNAT.to_bits(), sport, proto);
    let mut rev: HashMap<_, FlowKey, NatRev> =
        HashMap::try_from(Map::HashMap(open(agent, map_names::NAT_REV)?))?;
    let r = NatRev {
        client_addr: wire(client),
        backend_id: id,
        last_seen_ms: seen,
        ..NatRev::default()
    };
    rev.insert(rk, r, 0)?;
    let mut fwd: HashMap<_, FlowKey, NatFwd> =
        HashMap::try_from(Map::HashMap(open(agent, map_names::NAT_FWD)?))?;
    let f = NatFwd {
        snat_addr: wire(SNAT),
        backend_addr: wire(b),
        backend_id: id,
        snat_port: sport.to_be(),
        backend_port: 8080u16.to_be(),
        last_seen_ms: seen,
        ..NatFwd::default()
    };
    fwd.insert(fk, f, 0)?;
    Ok((fk, rk))
}

/// Whether the forward and the reverse entry of a pair are in the maps.
fn present(agent: &LbAgent, keys: (FlowKey, FlowKey)) -> Result<(bool, bool)> {
    let fwd: HashMap<_, FlowKey, NatFwd> =
        HashMap::try_from(Map::HashMap(open(agent, map_names::NAT_FWD)?))?;
    let rev: HashMap<_, FlowKey, NatRev> =
        HashMap::try_from(Map::HashMap(open(agent, map_names::NAT_REV)?))?;
    Ok((fwd.get(&keys.0, 0).is_ok(), rev.get(&keys.1, 0).is_ok()))
}

#[test]
fn the_keeper_removes_idle_nat_pairs_and_a_restart_keeps_live_ones() -> Result<()> {
    require_root();
    let topo = Topology::with_backends(2)?;
    let paths = AgentPaths::new()?;
    // UDP pairs idle 1 s are over; TCP ones after the default hour.
    let text = config(&topo, &paths, "", "198.18.1.1");
    let mut agent = LbAgent::start_with(topo.lb_ns(), paths, &text, &["--keep-datapath"])?;
    let (_, backends) = ids(&agent)?;
    let b = topo.backend_addr(0);
    let id = backends
        .iter()
        .find(|x| x.0 == IpAddr::V4(b))
        .context("backend 0")?
        .1;
    let now = runtime(&agent)?.now_ms;
    let live = insert_pair(&agent, 1, 50001, b, id, IPPROTO_TCP, now)?;
    let idle = insert_pair(&agent, 2, 50002, b, id, IPPROTO_UDP, now)?;
    // Once the clock is 1 s past `now`, a keeper pass removes the UDP
    // pair, both entries; the TCP one stays and is counted for its
    // backend.
    eventually("the idle UDP pair removed", || {
        Ok(present(&agent, idle)? == (false, false))
    })?;
    ensure!(
        runtime(&agent)?.now_ms > now + 1000,
        "removed before it was idle"
    );
    ensure!(present(&agent, live)? == (true, true));
    eventually("the live pair counted", || {
        let list = agent.json(&["backend", "list"])?;
        Ok(list
            .as_array()
            .into_iter()
            .flatten()
            .any(|v| v["address"] == b.to_string() && v["flows"].as_u64() == Some(1)))
    })?;
    // A restart with the maps kept keeps the NAT flow.
    agent.stop()?;
    ensure!(
        present(&agent, live)? == (true, true),
        "kept while no agent runs"
    );
    agent.spawn(&[])?;
    ensure!(
        present(&agent, live)? == (true, true),
        "a restart keeps NAT flows"
    );
    agent.stop()?;
    Ok(())
}
