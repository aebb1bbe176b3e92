//! Follows the kernel's tables for the backends' next hops, off the event
//! loop: a task subscribed to rtnetlink neighbour, route and link events
//! that keeps what it learnt per backend address and sends what changed to
//! the event loop as a [`Batch`] (the core turns it into next hops and
//! backend entries).
//!
//! - A neighbour event for a followed address is applied at once (a MAC
//!   that changed, an ARP or ND resolution that failed).
//! - A route or link event (an interface deleted, re-created, renamed, its
//!   MAC changed; a route added or removed), lost events and the periodic
//!   refresh re-read the tables: every route is looked up again.
//! - An address with no neighbour entry is probed (a datagram makes the
//!   kernel send an ARP request, or a neighbour solicitation for IPv6; the answer or the failure comes back as an
//!   event), all of them at once and never more than once per
//!   [`timing::NEXT_HOP_PROBE_MIN_INTERVAL`]; the periodic refresh probes
//!   failed ones again.
//! - A failure to ask the kernel (not an answer about an address) changes
//!   nothing: what was known stays until the next refresh.

use std::{
    collections::BTreeMap,
    net::{IpAddr, UdpSocket},
    time::Instant,
};

use futures_util::{Stream, StreamExt, stream};
use log::{debug, warn};
use tokio::{
    sync::{mpsc, watch},
    time::sleep_until,
};

use crate::{
    config::Config,
    neigh::{Egress, Link, Need, NeighError, Neighbour, Resolution, Route, TableEvent, Tables},
    timing,
};

/// The addresses to follow: backend address → whether its next hop's MAC
/// is to be resolved (false: every backend at that address has a `mac`
/// override, only its route matters) and whether a gateway is fine.
pub type Wanted = BTreeMap<IpAddr, Need>;

/// What changed, per address.
pub type Batch = Vec<(IpAddr, Resolution)>;

/// The addresses `cfg`'s backends need followed.
pub fn wanted(cfg: &Config) -> Wanted {
    let mut w = Wanted::new();
    for v in &cfg.vips {
        for b in &v.backends {
            let need = w.entry(b.address).or_default();
            need.arp |= b.mac.is_none();
            need.routed |= v.forwarding.is_routed();
        }
    }
    w
}

/// Starts following `wanted` (updated through the watch channel); batches
/// go to `tx`. Fails only when rtnetlink sockets cannot be opened.
pub fn spawn(
    wanted: watch::Receiver<Wanted>,
    tx: mpsc::UnboundedSender<Batch>,
) -> std::io::Result<()> {
    let events = Tables::subscribe()?;
    let tables = Tables::connect()?;
    let socket = |bind: &str, what: &str| {
        UdpSocket::bind(bind)
            .and_then(|s| s.set_nonblocking(true).map(|()| s))
            .inspect_err(|e| {
                warn!("no socket to send {what} probes from ({e}): resolution waits for the kernel")
            })
            .ok()
    };
    let probe = socket("0.0.0.0:0", "ARP");
    let probe6 = socket("[::]:0", "neighbour discovery");
    let follower = Follower {
        tables,
        wanted: wanted.borrow().clone(),
        links: BTreeMap::new(),
        addresses: BTreeMap::new(),
        routes: BTreeMap::new(),
        neighbours: BTreeMap::new(),
        sent: BTreeMap::new(),
        probed: BTreeMap::new(),
        probe,
        probe6,
        tx,
    };
    tokio::spawn(follower.run(wanted, events));
    Ok(())
}

/// Collects batches until every address that needs ARP has an answer (a
/// MAC or a failure) or `wait` has passed: the next hops known at start.
pub async fn first_answers(
    rx: &mut mpsc::UnboundedReceiver<Batch>,
    wanted: &Wanted,
    wait: std::time::Duration,
) -> Batch {
    let deadline = tokio::time::Instant::now() + wait;
    let mut got: BTreeMap<IpAddr, Resolution> = BTreeMap::new();
    let done = |got: &BTreeMap<IpAddr, Resolution>| {
        wanted
            .iter()
            .all(|(a, &need)| got.get(a).is_some_and(|r| !r.is_pending(need)))
    };
    while !done(&got) {
        tokio::select! {
            b = rx.recv() => match b {
                Some(b) => got.extend(b),
                None => break,
            },
            _ = sleep_until(deadline) => break,
        }
    }
    got.into_iter().collect()
}

struct Follower {
    tables: Tables,
    wanted: Wanted,
    links: BTreeMap<u32, Link>,
    /// Each interface's IPv4 and global IPv6 addresses, the primary first.
    addresses: BTreeMap<u32, Vec<IpAddr>>,
    /// Per address: the egress interface index, or why there is none.
    routes: BTreeMap<IpAddr, Result<Route, NeighError>>,
    /// Neighbour entries of followed addresses and of the gateways their
    /// routes go through: (ifindex, address).
    neighbours: BTreeMap<(u32, IpAddr), Neighbour>,
    /// What the event loop was last told, per address.
    sent: BTreeMap<IpAddr, Resolution>,
    probed: BTreeMap<IpAddr, Instant>,
    probe: Option<UdpSocket>,
    /// The same for IPv6 addresses (neighbour solicitations).
    probe6: Option<UdpSocket>,
    tx: mpsc::UnboundedSender<Batch>,
}

impl Follower {
    async fn run(
        mut self,
        mut wanted_rx: watch::Receiver<Wanted>,
        events: impl Stream<Item = TableEvent> + Unpin,
    ) {
        let mut events = Some(events);
        let mut refresh = tokio::time::interval(timing::NEXT_HOP_REFRESH);
        // The first tick is now: the first full round.
        let mut reread_at: Option<tokio::time::Instant> = None;
        loop {
            tokio::select! {
                r = wanted_rx.changed() => {
                    if r.is_err() {
                        return; // the agent is gone
                    }
                    self.wanted = wanted_rx.borrow_and_update().clone();
                    self.full_round(false).await;
                }
                ev = async { events.as_mut()?.next().await }, if events.is_some() => match ev {
                    Some(TableEvent::Neighbour { ifindex, addr, entry }) => {
                        if self.follows_neighbour(addr) {
                            match entry {
                                Some(n) => self.neighbours.insert((ifindex, addr), n),
                                None => self.neighbours.remove(&(ifindex, addr)),
                            };
                            self.emit(false);
                        }
                    }
                    Some(TableEvent::Routes | TableEvent::Overrun) => {
                        // Changes come in bursts (an interface re-created:
                        // link, addresses, routes): read once after them.
                        reread_at.get_or_insert(tokio::time::Instant::now() + timing::NEXT_HOP_SETTLE);
                    }
                    Some(TableEvent::Other) => {}
                    None => {
                        warn!("the rtnetlink event socket closed: next hops are re-read every {:?} only", timing::NEXT_HOP_REFRESH);
                        events = None;
                    }
                },
                _ = async { sleep_until(reread_at.unwrap_or_else(tokio::time::Instant::now)).await }, if reread_at.is_some() => {
                    reread_at = None;
                    self.full_round(false).await;
                }
                _ = refresh.tick() => self.full_round(true).await,
            }
        }
    }

    /// Re-reads links, neighbours and every followed route, then tells
    /// what changed. `reprobe_failed`: ask again where ARP failed.
    async fn full_round(&mut self, reprobe_failed: bool) {
        // One dump at a time: a netlink socket refuses a dump while
        // another is in progress (EBUSY).
        let links = self.tables.links().await;
        let neighbours = self.tables.neighbours().await;
        let addresses = self.tables.addresses().await;
        let (links, neighbours, addresses) = match (links, neighbours, addresses) {
            (Ok(l), Ok(n), Ok(a)) => (l, n, a),
            (Err(e), _, _) | (_, Err(e), _) | (_, _, Err(e)) => {
                warn!("reading the kernel's tables for next hops: {e}; what was known stays");
                return;
            }
        };
        self.links = links;
        self.addresses = addresses;
        let tables = &self.tables;
        let routes: Vec<_> = stream::iter(self.wanted.keys().copied())
            .map(|a| async move { (a, tables.route(a).await) })
            .buffer_unordered(timing::NEXT_HOP_CONCURRENT_LOOKUPS)
            .collect()
            .await;
        for (a, r) in routes {
            match r {
                Ok(r) => {
                    self.routes.insert(a, r);
                }
                Err(e) => warn!("route lookup for {a}: {e}; what was known stays"),
            }
        }
        let wanted = &self.wanted;
        self.routes.retain(|a, _| wanted.contains_key(a));
        self.probed.retain(|a, _| wanted.contains_key(a));
        // Kept after the routes: which gateways matter depends on them.
        self.neighbours = neighbours
            .into_iter()
            .filter(|((_, a), _)| self.follows_neighbour(*a))
            .collect();
        self.emit(reprobe_failed);
    }

    /// `addr` is a followed address, or the gateway of a followed
    /// address's route.
    fn follows_neighbour(&self, addr: IpAddr) -> bool {
        self.wanted.contains_key(&addr)
            || self
                .routes
                .values()
                .any(|r| matches!(r, Ok(r) if r.gateway == Some(addr)))
    }

    fn resolution(&self, addr: IpAddr) -> Option<Resolution> {
        let route = self.routes.get(&addr)?;
        let egress = route.clone().and_then(
            |Route {
                 ifindex,
                 gateway,
                 prefsrc,
             }| {
                self.links
                    .get(&ifindex)
                    .map(|l| Egress {
                        iface: l.name.clone(),
                        ifindex,
                        gateway,
                        mac: l.mac,
                        source: prefsrc.or_else(|| {
                            self.addresses.get(&ifindex).and_then(|a| {
                                a.iter().copied().find(|s| s.is_ipv4() == addr.is_ipv4())
                            })
                        }),
                    })
                    .ok_or(NeighError::NoInterface { addr, ifindex })
            },
        );
        let neighbour = match &egress {
            Ok(e) => self
                .neighbours
                .get(&(e.ifindex, e.gateway.unwrap_or(addr)))
                .copied()
                .unwrap_or(Neighbour::Missing),
            Err(_) => Neighbour::Missing,
        };
        Some(Resolution { egress, neighbour })
    }

    /// Probes what needs it and sends what changed since last time.
    fn emit(&mut self, reprobe_failed: bool) {
        let mut batch = Batch::new();
        let mut probe = Vec::new();
        for (&a, &need) in &self.wanted {
            let Some(r) = self.resolution(a) else {
                continue;
            };
            // A datagram to a routed address makes the kernel resolve its
            // gateway.
            if need.arp
                && r.egress
                    .as_ref()
                    .is_ok_and(|e| e.gateway.is_none() || need.routed)
                && (r.neighbour == Neighbour::Missing
                    || (reprobe_failed && r.neighbour == Neighbour::Failed))
            {
                probe.push(a);
            }
            if self.sent.get(&a) != Some(&r) {
                self.sent.insert(a, r.clone());
                batch.push((a, r));
            }
        }
        let wanted = &self.wanted;
        self.sent.retain(|a, _| wanted.contains_key(a));
        for a in probe {
            self.probe(a);
        }
        if !batch.is_empty() {
            debug!("next hops: {} address(es) changed", batch.len());
            let _ = self.tx.send(batch);
        }
    }

    fn probe(&mut self, addr: IpAddr) {
        let now = Instant::now();
        if self
            .probed
            .get(&addr)
            .is_some_and(|t| now.duration_since(*t) < timing::NEXT_HOP_PROBE_MIN_INTERVAL)
        {
            return;
        }
        let socket = if addr.is_ipv4() {
            &self.probe
        } else {
            &self.probe6
        };
        if let Some(s) = socket {
            Tables::probe(s, addr);
            self.probed.insert(addr, now);
        }
    }
}
