//! `lb run`: the agent. Owns the data path, turns configuration, health and
//! operator commands into kernel map contents, serves the control socket
//! and the metrics endpoint.

use std::{
    collections::{BTreeMap, BTreeSet},
    net::{Ipv4Addr, SocketAddr},
    path::{Path, PathBuf},
    sync::{Arc, Mutex},
    time::{Duration, Instant},
};

use anyhow::{Context as _, bail};
use aya::programs::{
    XdpMode,
    links::{FdLink, PinnedLink},
    xdp::XdpLink,
};
use lb_common::{FlowKey, NO_BACKEND, VIP_FLAG_ADDR_ONLY, VipInfo, VipKey, ring_slot};
use log::{info, warn};
use tokio::{
    io::{AsyncBufReadExt, AsyncWriteExt, BufReader},
    net::UnixListener,
    signal::unix::{SignalKind, signal},
    sync::{mpsc, oneshot},
};

use crate::{
    config::{BackendConfig, BackendState, Config, HealthCheckKind, Protocol, XdpModeSetting},
    control::{
        BackendStatsView, BackendView, ExplainView, InterfaceView, Rates, Reply, Request,
        StatsView, StatusView, VipStatsView, VipView,
    },
    datapath::{self, Datapath, MapSizes},
    health::{BackendKey, CheckTarget, Checker, HealthEvent},
    maglev::{MaglevBackend, MaglevTable},
    neigh::{self, NextHop},
    reconcile::{self, KernelImage, Op, VipImage},
};

/// How `lb run` was invoked.
#[derive(Clone, Debug)]
pub struct RunOptions {
    pub config: PathBuf,
    /// Overrides the config file's interfaces when not empty.
    pub interfaces: Vec<String>,
    pub xdp_mode: Option<XdpModeSetting>,
    /// Leave the program attached (pinned link) and the maps pinned on exit.
    pub keep_datapath: bool,
}

type VipId = (Ipv4Addr, u16, Protocol);

fn backend_key(vip: VipId, addr: Ipv4Addr) -> BackendKey {
    (vip.0, vip.1, vip.2.number(), addr)
}

fn vip_kernel_key(vip: VipId) -> VipKey {
    VipKey::new(vip.0.to_bits(), vip.1, vip.2.number())
}

/// A backend's runtime state (health, next hop).
struct BackendRt {
    id: u32,
    up: bool,
    last_check: Option<String>,
    checker: Option<Checker>,
    next_hop: Option<NextHop>,
    next_hop_error: Option<String>,
}

struct Attachment {
    iface: String,
    ifindex: u32,
    mode: &'static str,
    /// Owned link (pinned under the instance's directory).
    link: Option<FdLink>,
}

pub struct Agent {
    cfg: Config,
    opts: RunOptions,
    dp: Datapath,
    image: KernelImage,
    /// RINGS contents the agent knows, by ring base.
    rings: BTreeMap<u32, Vec<u32>>,
    restored: bool,
    vip_index: BTreeMap<VipId, u32>,
    backends: BTreeMap<BackendKey, BackendRt>,
    health_tx: mpsc::UnboundedSender<HealthEvent>,
    attachments: Vec<Attachment>,
    started: Instant,
    stats: StatsSampler,
    shared: Arc<Mutex<Shared>>,
}

/// What the metrics endpoint reads.
#[derive(Default)]
pub struct Shared {
    pub stats: StatsView,
}

fn xdp_mode_of(s: XdpModeSetting) -> XdpMode {
    match s {
        XdpModeSetting::Auto | XdpModeSetting::Native => XdpMode::Driver,
        XdpModeSetting::Skb => XdpMode::Skb,
    }
}

fn link_pin_path(pin_dir: &Path, iface: &str) -> PathBuf {
    pin_dir.join(format!("link_{iface}"))
}

impl Agent {
    /// Loads the configuration and brings up the data path. Nothing is
    /// touched when the configuration or the command line is invalid.
    pub fn start(
        opts: RunOptions,
        health_tx: mpsc::UnboundedSender<HealthEvent>,
    ) -> anyhow::Result<Self> {
        let cfg = Config::load(&opts.config)?;
        let interfaces = if opts.interfaces.is_empty() {
            cfg.agent.start.interfaces.clone()
        } else {
            opts.interfaces.clone()
        };
        if interfaces.is_empty() {
            bail!(
                "{}: no interface to attach to: list them in [agent] interfaces or pass --iface",
                opts.config.display()
            );
        }
        for iface in &interfaces {
            datapath::ifindex(iface).map_err(|_| {
                anyhow::anyhow!("interface {iface} does not exist (check `ip link`)")
            })?;
        }
        if !datapath::is_root() {
            bail!("lb run needs root to load XDP programs: run it as root");
        }
        let pin_dir = datapath::pin_dir(&cfg.agent.kernel.instance);
        let restored = pin_dir.join(lb_common::map_names::VIPS).exists();
        let sizes = MapSizes {
            max_vips: cfg.agent.kernel.max_vips,
            max_backends: cfg.agent.kernel.max_backends,
            ring_size: cfg.agent.kernel.ring_size,
            conntrack_entries: cfg.agent.kernel.conntrack_entries,
        };
        let dp = Datapath::load(&pin_dir, sizes).context("loading the data path")?;
        let image = if restored {
            read_image(&dp).context("reading the pinned maps")?
        } else {
            KernelImage::default()
        };
        if restored {
            info!(
                "found the pinned data path in {}: {} VIP entries, {} backends, {} conntrack entries kept",
                pin_dir.display(),
                image.vips.len(),
                image.backends.len(),
                dp.conntrack_entries().map(|c| c.len()).unwrap_or(0)
            );
        }
        let mut agent = Agent {
            cfg,
            opts: RunOptions { interfaces, ..opts },
            dp,
            rings: image
                .vips
                .values()
                .filter(|v| v.info.flags & VIP_FLAG_ADDR_ONLY == 0)
                .map(|v| (v.info.ring_base, v.ring.clone()))
                .collect(),
            image,
            restored,
            vip_index: BTreeMap::new(),
            backends: BTreeMap::new(),
            health_tx,
            attachments: Vec::new(),
            started: Instant::now(),
            stats: StatsSampler::default(),
            shared: Arc::new(Mutex::new(Shared::default())),
        };
        agent.adopt_ids();
        agent.sync_backends(true);
        agent.resolve_next_hops(Duration::from_millis(1500));
        agent.reconcile()?;
        agent.attach_all()?;
        Ok(agent)
    }

    pub fn shared(&self) -> Arc<Mutex<Shared>> {
        self.shared.clone()
    }

    pub fn control_socket(&self) -> PathBuf {
        self.cfg.agent.start.control_socket.clone()
    }

    pub fn metrics_listen(&self) -> Option<SocketAddr> {
        self.cfg.agent.start.metrics_listen
    }

    /// Takes over VIP indices and backend ids found in pinned maps, so that
    /// conntrack entries keep naming the same backends.
    fn adopt_ids(&mut self) {
        let by_index: BTreeMap<u32, VipId> = self
            .cfg
            .vips
            .iter()
            .filter_map(|v| {
                let id = v.key();
                self.image
                    .vips
                    .get(&vip_kernel_key(id))
                    .map(|img| (img.info.index, id))
            })
            .collect();
        for (&index, &vip) in &by_index {
            self.vip_index.insert(vip, index);
        }
        for (&id, b) in &self.image.backends {
            if let Some(&vip) = by_index.get(&b.vip_index) {
                let addr = Ipv4Addr::from(u32::from_be(b.addr));
                let key = backend_key(vip, addr);
                self.backends.insert(
                    key,
                    BackendRt {
                        id,
                        up: b.flags & lb_common::BACKEND_FLAG_USABLE != 0,
                        last_check: None,
                        checker: None,
                        next_hop: None,
                        next_hop_error: None,
                    },
                );
            }
        }
    }

    fn free_vip_index(&self) -> anyhow::Result<u32> {
        let used: BTreeSet<u32> = self
            .vip_index
            .values()
            .copied()
            .chain(self.image.vips.values().map(|v| v.info.index))
            .collect();
        (0..self.cfg.agent.kernel.max_vips)
            .find(|i| !used.contains(i))
            .ok_or_else(|| {
                anyhow::anyhow!(
                    "all {} VIP slots are in use",
                    self.cfg.agent.kernel.max_vips
                )
            })
    }

    fn free_backend_id(&self) -> anyhow::Result<u32> {
        let used: BTreeSet<u32> = self
            .backends
            .values()
            .map(|b| b.id)
            .chain(self.image.backends.keys().copied())
            .collect();
        (0..self.cfg.agent.kernel.max_backends)
            .find(|i| !used.contains(i))
            .ok_or_else(|| {
                anyhow::anyhow!(
                    "all {} backend slots are in use",
                    self.cfg.agent.kernel.max_backends
                )
            })
    }

    /// Creates runtime state (ids, health checkers) for configured backends
    /// and drops it for backends no longer configured. `at_start`: new
    /// backends start up (the agent is starting; the first failed checks
    /// take them out); later additions start down and must pass `rise`
    /// checks first.
    fn sync_backends(&mut self, at_start: bool) {
        let mut wanted = BTreeSet::new();
        let vips: Vec<_> = self.cfg.vips.clone();
        for vip in &vips {
            let vid = vip.key();
            if !self.vip_index.contains_key(&vid) {
                match self.free_vip_index() {
                    Ok(i) => {
                        self.vip_index.insert(vid, i);
                    }
                    Err(e) => {
                        warn!("VIP {}: {e}", vip.name);
                        continue;
                    }
                }
            }
            for b in &vip.backends {
                let key = backend_key(vid, b.address);
                wanted.insert(key);
                if !self.backends.contains_key(&key) {
                    let id = match self.free_backend_id() {
                        Ok(id) => id,
                        Err(e) => {
                            warn!("backend {} of {}: {e}", b.address, vip.name);
                            continue;
                        }
                    };
                    let up = at_start || matches!(b.health_check.kind, HealthCheckKind::None);
                    self.backends.insert(
                        key,
                        BackendRt {
                            id,
                            up,
                            last_check: None,
                            checker: None,
                            next_hop: None,
                            next_hop_error: None,
                        },
                    );
                }
                let rt = self.backends.get_mut(&key).expect("inserted above");
                if rt.checker.is_none() {
                    rt.checker = Some(Checker::spawn(
                        CheckTarget {
                            key,
                            label: vip.name.clone(),
                        },
                        b.health_check.clone(),
                        rt.up,
                        self.health_tx.clone(),
                    ));
                }
            }
        }
        self.backends.retain(|k, _| wanted.contains(k));
        let live: BTreeSet<VipId> = self.cfg.vips.iter().map(|v| v.key()).collect();
        self.vip_index.retain(|k, _| live.contains(k));
    }

    /// Finds the next hop of backends that have none yet.
    fn resolve_next_hops(&mut self, wait: Duration) {
        let overrides: BTreeMap<BackendKey, [u8; 6]> = self
            .cfg
            .vips
            .iter()
            .flat_map(|v| {
                v.backends
                    .iter()
                    .filter_map(move |b| b.mac.map(|m| (backend_key(v.key(), b.address), m)))
            })
            .collect();
        // Prime every missing ARP entry first, then wait once.
        let missing: Vec<BackendKey> = self
            .backends
            .iter()
            .filter(|(_, rt)| rt.next_hop.is_none())
            .map(|(k, _)| *k)
            .collect();
        if missing.is_empty() {
            return;
        }
        for k in &missing {
            let _ = neigh::resolve(k.3, Duration::ZERO);
        }
        for k in missing {
            let result = match overrides.get(&k) {
                Some(&mac) => {
                    neigh::route(k.3)
                        .map_err(|e| e.to_string())
                        .and_then(|(iface, _)| {
                            Ok(NextHop {
                                ifindex: datapath::ifindex(&iface).map_err(|e| e.to_string())?,
                                src_mac: neigh::iface_mac(&iface).map_err(|e| e.to_string())?,
                                iface,
                                dst_mac: mac,
                            })
                        })
                }
                None => neigh::resolve(k.3, wait).map_err(|e| e.to_string()),
            };
            let rt = self.backends.get_mut(&k).expect("listed above");
            match result {
                Ok(nh) => {
                    if let Err(e) = self.dp.add_tx_port(nh.ifindex) {
                        warn!("TX port {}: {e}", nh.iface);
                    }
                    rt.next_hop = Some(nh);
                    rt.next_hop_error = None;
                }
                Err(e) => {
                    if rt.next_hop_error.as_deref() != Some(e.as_str()) {
                        warn!("backend {}: {e}; it gets no traffic until resolved", k.3);
                    }
                    rt.next_hop_error = Some(e);
                }
            }
        }
    }

    /// The kernel contents the current configuration, health and next hops
    /// call for.
    fn target(&self) -> anyhow::Result<KernelImage> {
        let mut img = KernelImage::default();
        for vip in &self.cfg.vips {
            let vid = vip.key();
            let Some(&index) = self.vip_index.get(&vid) else {
                continue;
            };
            let info = VipInfo {
                index,
                ring_base: index * self.cfg.agent.kernel.ring_size,
                ring_size: vip.ring_size,
                flags: 0,
            };
            let mut members = Vec::new();
            for b in &vip.backends {
                let key = backend_key(vid, b.address);
                let Some(rt) = self.backends.get(&key) else {
                    continue;
                };
                let usable = rt.up && rt.next_hop.is_some();
                let (ifindex, dst, src) = rt
                    .next_hop
                    .as_ref()
                    .map(|n| (n.ifindex, n.dst_mac, n.src_mac))
                    .unwrap_or_default();
                img.backends.insert(
                    rt.id,
                    datapath::backend_entry(b.address, ifindex, index, usable, dst, src),
                );
                let weight = match b.state {
                    BackendState::Drain => 0,
                    BackendState::Active => b.weight,
                };
                if usable && weight > 0 {
                    members.push(MaglevBackend {
                        key: ((b.address.to_bits() as u64) << 16) | vip.port as u64,
                        id: rt.id,
                        weight,
                    });
                }
            }
            let ring = MaglevTable::build(&members, vip.ring_size)?
                .slots()
                .to_vec();
            img.vips
                .insert(vip_kernel_key(vid), VipImage { info, ring });
            img.vips
                .entry(VipKey::addr_only(vip.address.to_bits()))
                .or_insert(VipImage {
                    info: VipInfo {
                        flags: VIP_FLAG_ADDR_ONLY,
                        ..info
                    },
                    ring: Vec::new(),
                });
        }
        Ok(img)
    }

    /// Brings the kernel maps to the target, in the safe order.
    pub fn reconcile(&mut self) -> anyhow::Result<usize> {
        let target = self.target()?;
        let ops = reconcile::plan(&self.image, &target);
        let n = ops.len();
        let mut slots_written = 0;
        for op in &ops {
            let r = match op {
                Op::SetBackend(id, b) => self.dp.set_backend(*id, *b),
                Op::RemoveBackend(id) => self.dp.set_backend(*id, datapath::empty_backend()),
                Op::WriteRing { ring_base, slots } => {
                    slots_written += slots.len();
                    self.dp
                        .write_ring(*ring_base, slots.iter().copied())
                        .map(|_| ())
                }
                Op::SetVip(k, info) => self.dp.set_vip(*k, *info),
                Op::RemoveVip(k) => self.dp.remove_vip(k),
            };
            if let Err(e) = r {
                // The ops before this one are applied and safe; the image
                // keeps the truth and the next reconcile retries the rest.
                self.image_after_partial(op);
                return Err(anyhow::anyhow!("writing the kernel maps: {e}"));
            }
            self.image_after_partial(op);
        }
        if n > 0 {
            info!("reconciled: {n} map updates ({slots_written} ring slots)");
        }
        Ok(n)
    }

    /// Records in the image what an applied op changed in the kernel.
    fn image_after_partial(&mut self, op: &Op) {
        match op {
            Op::SetBackend(id, b) => {
                self.image.backends.insert(*id, *b);
            }
            Op::RemoveBackend(id) => {
                self.image.backends.remove(id);
            }
            Op::WriteRing { ring_base, slots } => {
                let ring = self.rings.entry(*ring_base).or_default();
                for &(s, id) in slots {
                    let s = s as usize;
                    if ring.len() <= s {
                        ring.resize(s + 1, NO_BACKEND);
                    }
                    ring[s] = id;
                }
                for v in self.image.vips.values_mut() {
                    if v.info.ring_base == *ring_base && v.info.flags & VIP_FLAG_ADDR_ONLY == 0 {
                        for &(s, id) in slots {
                            if let Some(x) = v.ring.get_mut(s as usize) {
                                *x = id;
                            }
                        }
                    }
                }
            }
            Op::SetVip(k, info) => {
                let ring = if info.flags & VIP_FLAG_ADDR_ONLY != 0 {
                    Vec::new()
                } else {
                    let mut r = self.rings.get(&info.ring_base).cloned().unwrap_or_default();
                    r.resize(info.ring_size as usize, NO_BACKEND);
                    r
                };
                self.image.vips.insert(*k, VipImage { info: *info, ring });
            }
            Op::RemoveVip(k) => {
                self.image.vips.remove(k);
            }
        }
    }
}

/// Reads what an earlier agent left in the pinned maps.
fn read_image(dp: &Datapath) -> anyhow::Result<KernelImage> {
    let mut img = KernelImage::default();
    for (key, info) in dp.vips()? {
        let ring = if info.flags & VIP_FLAG_ADDR_ONLY != 0 {
            Vec::new()
        } else {
            dp.read_ring(info.ring_base, info.ring_size)?
        };
        img.vips.insert(key, VipImage { info, ring });
    }
    let empty = datapath::empty_backend();
    for id in 0..dp.sizes().max_backends {
        let b = dp.backend(id)?;
        if b != empty && (b.addr != 0 || b.flags != 0) {
            img.backends.insert(id, b);
        }
    }
    Ok(img)
}

impl Agent {
    /// Attaches the balancer to every interface: takes over a link pinned
    /// by an earlier agent (replacing its program in place, so packets
    /// never meet a detached interface), or creates and pins a new one.
    fn attach_all(&mut self) -> anyhow::Result<()> {
        let pin_dir = self.dp.pin_dir().to_path_buf();
        let setting = self.opts.xdp_mode.unwrap_or(self.cfg.agent.start.xdp_mode);
        for iface in self.opts.interfaces.clone() {
            let ifindex = datapath::ifindex(&iface)?;
            let pin = link_pin_path(&pin_dir, &iface);
            let (id, mode) = if pin.exists() {
                let pinned = PinnedLink::from_pin(&pin)
                    .with_context(|| format!("opening the pinned link {}", pin.display()))?;
                let link = XdpLink::try_from(FdLink::from(pinned))
                    .with_context(|| format!("{} is not an XDP link", pin.display()))?;
                let id = self
                    .dp
                    .balancer_mut()
                    .attach_to_link(link)
                    .with_context(|| format!("replacing the program on {iface}"))?;
                info!("{iface}: took over the pinned XDP link; program replaced in place");
                (id, "kept")
            } else {
                self.attach_new(&iface, setting)?
            };
            let link = self.dp.balancer_mut().take_link(id)?;
            let link = match FdLink::try_from(link) {
                Ok(fd_link) => {
                    if !pin.exists() {
                        fd_link
                            .pin(&pin)
                            .with_context(|| format!("pinning the link at {}", pin.display()))
                            .map(FdLink::from)?
                    } else {
                        fd_link
                    }
                }
                Err(e) => {
                    warn!(
                        "{iface}: the kernel attached without a BPF link ({e}); --keep-datapath is not available"
                    );
                    continue;
                }
            };
            self.attachments.push(Attachment {
                iface,
                ifindex,
                mode,
                link: Some(link),
            });
        }
        Ok(())
    }

    fn attach_new(
        &mut self,
        iface: &str,
        setting: XdpModeSetting,
    ) -> anyhow::Result<(aya::programs::xdp::XdpLinkId, &'static str)> {
        match self.dp.attach(iface, xdp_mode_of(setting)) {
            Ok(id) => Ok((
                id,
                if setting == XdpModeSetting::Skb {
                    "skb"
                } else {
                    "native"
                },
            )),
            Err(e) if setting == XdpModeSetting::Auto => {
                warn!("{iface}: native XDP failed ({e}); falling back to generic (skb) mode");
                let id = self
                    .dp
                    .attach(iface, XdpMode::Skb)
                    .with_context(|| format!("attaching to {iface} in skb mode"))?;
                Ok((id, "skb"))
            }
            Err(e) => Err(e).with_context(|| format!("attaching to {iface}")),
        }
    }

    /// Detaches and removes every pin (a clean stop), or leaves the data
    /// path running for the next agent.
    pub fn shutdown(mut self) {
        let keep = self.opts.keep_datapath;
        let pin_dir = self.dp.pin_dir().to_path_buf();
        for a in self.attachments.drain(..) {
            let pin = link_pin_path(&pin_dir, &a.iface);
            if keep {
                info!(
                    "{}: XDP program left attached (pinned at {})",
                    a.iface,
                    pin.display()
                );
                // Dropping our fd leaves the pinned link (and the program) in place.
                drop(a.link);
            } else {
                let _ = std::fs::remove_file(&pin);
                if let Some(link) = a.link {
                    drop(link);
                }
                info!("{}: detached", a.iface);
            }
        }
        for (_, rt) in std::mem::take(&mut self.backends) {
            drop(rt.checker);
        }
        if !keep {
            if let Err(e) = self.dp.unpin() {
                warn!("removing {}: {e}", pin_dir.display());
            }
        } else {
            info!("maps kept pinned in {}", pin_dir.display());
        }
        let _ = std::fs::remove_file(&self.cfg.agent.start.control_socket);
    }

    fn on_health(&mut self, ev: HealthEvent) -> bool {
        let Some(rt) = self.backends.get_mut(&ev.key) else {
            return false;
        };
        rt.last_check = Some(ev.outcome.to_string());
        if rt.up != ev.up {
            rt.up = ev.up;
            return true;
        }
        false
    }

    fn find_vip(&self, sel: &str) -> anyhow::Result<usize> {
        self.cfg
            .vips
            .iter()
            .position(|v| {
                v.name == sel
                    || format!("{}:{}/{}", v.address, v.port, v.protocol.as_str()) == sel
                    || format!("{}:{}", v.address, v.port) == sel
            })
            .ok_or_else(|| {
                anyhow::anyhow!(
                    "no VIP named {sel:?} (use its name or ADDR:PORT/PROTO; see `lb vip list`)"
                )
            })
    }

    fn find_backend(&self, vip: usize, addr: Ipv4Addr) -> anyhow::Result<usize> {
        self.cfg.vips[vip]
            .backends
            .iter()
            .position(|b| b.address == addr)
            .ok_or_else(|| anyhow::anyhow!("VIP {} has no backend {addr}", self.cfg.vips[vip].name))
    }

    /// Handles a control request; `Ok(true)` when the state changed.
    fn handle(&mut self, req: Request) -> anyhow::Result<(serde_json::Value, bool)> {
        fn v(x: impl serde::Serialize) -> serde_json::Value {
            serde_json::to_value(x).unwrap_or(serde_json::Value::Null)
        }
        Ok(match req {
            Request::Status => (v(self.status()), false),
            Request::VipList => (v(self.vip_list()), false),
            Request::BackendList { vip } => {
                let vip = vip.map(|s| self.find_vip(&s)).transpose()?;
                (v(self.backend_list(vip)), false)
            }
            Request::BackendAdd {
                vip,
                address,
                weight,
            } => {
                let i = self.find_vip(&vip)?;
                check_weight(weight)?;
                if self.find_backend(i, address).is_ok() {
                    bail!(
                        "VIP {} already has backend {address}",
                        self.cfg.vips[i].name
                    );
                }
                let total: usize = self.cfg.vips.iter().map(|v| v.backends.len()).sum();
                if total as u32 >= self.cfg.agent.kernel.max_backends {
                    bail!(
                        "all {} backend slots are in use",
                        self.cfg.agent.kernel.max_backends
                    );
                }
                let hc = self.cfg.vips[i].health_check.clone();
                self.cfg.vips[i].backends.push(BackendConfig {
                    address,
                    weight,
                    state: BackendState::Active,
                    mac: None,
                    health_check: hc,
                });
                (
                    v(format!("added {address} to {}", self.cfg.vips[i].name)),
                    true,
                )
            }
            Request::BackendRemove { vip, address } => {
                let i = self.find_vip(&vip)?;
                let j = self.find_backend(i, address)?;
                self.cfg.vips[i].backends.remove(j);
                (
                    v(format!("removed {address} from {}", self.cfg.vips[i].name)),
                    true,
                )
            }
            Request::BackendDrain { vip, address } => (
                v(&self.set_state(&vip, address, BackendState::Drain)?),
                true,
            ),
            Request::BackendUndrain { vip, address } => (
                v(&self.set_state(&vip, address, BackendState::Active)?),
                true,
            ),
            Request::BackendSetWeight {
                vip,
                address,
                weight,
            } => {
                let i = self.find_vip(&vip)?;
                let j = self.find_backend(i, address)?;
                check_weight(weight)?;
                self.cfg.vips[i].backends[j].weight = weight;
                (
                    v(format!(
                        "{address} of {}: weight {weight}",
                        self.cfg.vips[i].name
                    )),
                    true,
                )
            }
            Request::Stats => (v(self.fresh_stats()), false),
            Request::Explain { src, dst, protocol } => {
                (v(self.explain(src, dst, protocol)?), false)
            }
            Request::Reload => {
                let cfg = Config::load(&self.opts.config)?;
                self.apply_reload(cfg)?;
                (v("reloaded"), true)
            }
        })
    }

    fn set_state(
        &mut self,
        vip: &str,
        address: Ipv4Addr,
        state: BackendState,
    ) -> anyhow::Result<String> {
        let i = self.find_vip(vip)?;
        let j = self.find_backend(i, address)?;
        self.cfg.vips[i].backends[j].state = state;
        Ok(format!(
            "{address} of {}: {}",
            self.cfg.vips[i].name,
            state.as_str()
        ))
    }

    fn apply_reload(&mut self, cfg: Config) -> anyhow::Result<()> {
        if let Some(warning) =
            crate::config::reload_check(&self.cfg, &cfg).map_err(anyhow::Error::msg)?
        {
            warn!("{warning}");
        }
        // Health checks restart for backends whose check changed.
        for vip in &cfg.vips {
            for b in &vip.backends {
                let key = backend_key(vip.key(), b.address);
                let old = self
                    .cfg
                    .vips
                    .iter()
                    .find(|v| v.key() == vip.key())
                    .and_then(|v| v.backends.iter().find(|o| o.address == b.address));
                if let (Some(old), Some(rt)) = (old, self.backends.get_mut(&key))
                    && old.health_check != b.health_check
                {
                    rt.checker = None;
                }
            }
        }
        self.cfg = cfg;
        Ok(())
    }

    fn after_change(&mut self) -> anyhow::Result<()> {
        self.sync_backends(false);
        self.resolve_next_hops(Duration::from_millis(300));
        self.reconcile()?;
        Ok(())
    }

    fn status(&self) -> StatusView {
        StatusView {
            instance: self.cfg.agent.kernel.instance.clone(),
            pid: std::process::id(),
            uptime_s: self.started.elapsed().as_secs(),
            config: self.opts.config.display().to_string(),
            pin_dir: self.dp.pin_dir().display().to_string(),
            restored: self.restored,
            interfaces: self
                .attachments
                .iter()
                .map(|a| InterfaceView {
                    name: a.iface.clone(),
                    ifindex: a.ifindex,
                    mode: a.mode.into(),
                })
                .collect(),
            vips: self.cfg.vips.len(),
            backends: self.backends.len(),
            backends_up: self.backends.values().filter(|b| b.up).count(),
            metrics: self.cfg.agent.start.metrics_listen.map(|a| a.to_string()),
        }
    }

    fn vip_list(&self) -> Vec<VipView> {
        self.cfg
            .vips
            .iter()
            .map(|v| {
                let key = vip_kernel_key(v.key());
                let ring = self.image.vips.get(&key).map(|i| &i.ring);
                let in_ring: BTreeSet<u32> = ring
                    .map(|r| r.iter().copied().filter(|&id| id != NO_BACKEND).collect())
                    .unwrap_or_default();
                VipView {
                    name: v.name.clone(),
                    address: v.address,
                    port: v.port,
                    protocol: v.protocol,
                    index: self.vip_index.get(&v.key()).copied().unwrap_or(u32::MAX),
                    ring_size: v.ring_size,
                    backends: v.backends.len(),
                    backends_in_ring: in_ring.len(),
                    health_check: v.health_check.kind.to_string(),
                }
            })
            .collect()
    }

    fn backend_list(&self, only: Option<usize>) -> Vec<BackendView> {
        let mut out = Vec::new();
        for (i, v) in self.cfg.vips.iter().enumerate() {
            if only.is_some_and(|o| o != i) {
                continue;
            }
            let ring = self
                .image
                .vips
                .get(&vip_kernel_key(v.key()))
                .map(|i| &i.ring);
            for b in &v.backends {
                let Some(rt) = self.backends.get(&backend_key(v.key(), b.address)) else {
                    continue;
                };
                let slots = ring
                    .map(|r| r.iter().filter(|&&id| id == rt.id).count() as u32)
                    .unwrap_or(0);
                out.push(BackendView {
                    vip: v.name.clone(),
                    address: b.address,
                    id: rt.id,
                    weight: b.weight,
                    state: b.state.as_str().into(),
                    health: health_word(rt),
                    last_check: rt.last_check.clone(),
                    slots,
                    mac: rt.next_hop.as_ref().map(|n| fmt_mac(n.dst_mac)),
                    iface: rt.next_hop.as_ref().map(|n| n.iface.clone()),
                });
            }
        }
        out
    }

    fn explain(
        &self,
        src: std::net::SocketAddrV4,
        dst: std::net::SocketAddrV4,
        protocol: Protocol,
    ) -> anyhow::Result<ExplainView> {
        let vid = (*dst.ip(), dst.port(), protocol);
        let vip = self
            .cfg
            .vips
            .iter()
            .find(|v| v.key() == vid)
            .ok_or_else(|| {
                anyhow::anyhow!(
                    "{dst}/{} is not a VIP: lb passes this flow to the kernel untouched",
                    protocol.as_str()
                )
            })?;
        let key = FlowKey::new(
            src.ip().to_bits(),
            src.port(),
            dst.ip().to_bits(),
            dst.port(),
            protocol.number(),
        );
        let hash = key.hash();
        let slot = ring_slot(hash, vip.ring_size);
        let img = self.image.vips.get(&vip_kernel_key(vid));
        let ring_id = img.and_then(|i| i.ring.get(slot as usize).copied());
        let addr_of = |id: u32| {
            self.image
                .backends
                .get(&id)
                .map(|b| Ipv4Addr::from(u32::from_be(b.addr)))
        };
        let ring_backend = ring_id.filter(|&id| id != NO_BACKEND).and_then(addr_of);
        let index = img.map(|i| i.info.index);
        let tracked = self.dp.conntrack_lookup(&key)?.map(|e| e.backend_id);
        let tracked_ok = tracked.and_then(|id| {
            self.image.backends.get(&id).filter(|b| {
                b.flags & lb_common::BACKEND_FLAG_USABLE != 0 && Some(b.vip_index) == index
            })
        });
        let conntrack_backend = tracked.and_then(addr_of);
        let (backend, reason) = match (tracked_ok, ring_backend) {
            (Some(b), _) => (
                Some(Ipv4Addr::from(u32::from_be(b.addr))),
                "established flow: conntrack entry".to_string(),
            ),
            (None, Some(r)) if tracked.is_some() => (
                Some(r),
                "conntrack entry names an unusable backend: re-steered by the ring".into(),
            ),
            (None, Some(r)) => (Some(r), "new flow: Maglev ring slot".into()),
            (None, None) => (None, "no usable backend: packets are dropped".into()),
        };
        Ok(ExplainView {
            vip: vip.name.clone(),
            hash,
            slot,
            ring_size: vip.ring_size,
            ring_backend,
            conntrack_backend,
            backend,
            reason,
        })
    }

    /// Counters read now, rates over the time since the last periodic
    /// sample (which stays the reference).
    fn fresh_stats(&mut self) -> StatsView {
        let (prev, older) = (self.stats.prev.clone(), self.stats.older.clone());
        // Rates over at least half a second: right after a periodic sample,
        // measure from the one before it.
        if let (Some(p), Some(o)) = (&prev, &older)
            && p.0.elapsed() < Duration::from_millis(500)
        {
            self.stats.prev = Some(o.clone());
        }
        self.sample_stats();
        let view = self.stats.view.clone();
        if prev.is_some() {
            (self.stats.prev, self.stats.older) = (prev, older);
        }
        view
    }

    /// Reads the counters and updates rates (once a second).
    fn sample_stats(&mut self) {
        let now = Instant::now();
        let mut vips = BTreeMap::new();
        for v in &self.cfg.vips {
            if let Some(&i) = self.vip_index.get(&v.key())
                && let Ok(s) = self.dp.vip_stats(i)
            {
                vips.insert(v.name.clone(), s);
            }
        }
        let mut backends = BTreeMap::new();
        for v in &self.cfg.vips {
            for b in &v.backends {
                if let Some(rt) = self.backends.get(&backend_key(v.key(), b.address))
                    && let Ok(s) = self.dp.backend_stats(rt.id)
                {
                    backends.insert((v.name.clone(), b.address), (s, health_word(rt)));
                }
            }
        }
        let reasons = self.dp.reason_stats().unwrap_or_default();
        self.stats.update(now, vips, backends, reasons);
        if let Ok(mut sh) = self.shared.lock() {
            sh.stats = self.stats.view.clone();
        }
    }
}

fn check_weight(w: u32) -> anyhow::Result<()> {
    if !(1..=crate::config::MAX_WEIGHT).contains(&w) {
        bail!(
            "weight {w} is out of range 1..={}",
            crate::config::MAX_WEIGHT
        );
    }
    Ok(())
}

fn health_word(rt: &BackendRt) -> String {
    match (rt.up, &rt.next_hop) {
        (_, None) => "unresolved".into(),
        (true, Some(_)) => "up".into(),
        (false, Some(_)) => "down".into(),
    }
}

pub fn fmt_mac(m: [u8; 6]) -> String {
    m.iter()
        .map(|b| format!("{b:02x}"))
        .collect::<Vec<_>>()
        .join(":")
}

type VipCounters = BTreeMap<String, lb_common::VipStats>;
type BackendCounters = BTreeMap<(String, Ipv4Addr), (lb_common::BackendStats, String)>;

type Sample = (
    Instant,
    VipCounters,
    BackendCounters,
    BTreeMap<&'static str, u64>,
);

/// Turns counter samples into rates.
#[derive(Default)]
struct StatsSampler {
    prev: Option<Sample>,
    /// The sample before `prev`.
    older: Option<Sample>,
    view: StatsView,
}

impl StatsSampler {
    fn update(
        &mut self,
        now: Instant,
        vips: VipCounters,
        backends: BackendCounters,
        reasons: BTreeMap<&'static str, u64>,
    ) {
        let (dt, pv, pb, pr) = match &self.prev {
            Some((t, pv, pb, pr)) => (
                now.duration_since(*t).as_secs_f64().max(1e-3),
                Some(pv),
                Some(pb),
                Some(pr),
            ),
            None => (1.0, None, None, None),
        };
        let rate = |now: u64, before: Option<u64>| {
            before.map_or(0.0, |b| now.saturating_sub(b) as f64 / dt)
        };
        let view = StatsView {
            interval_s: dt,
            vips: vips
                .iter()
                .map(|(name, s)| {
                    let p = pv.and_then(|p| p.get(name));
                    let dp = s.packets - p.map_or(0, |p| p.packets.min(s.packets));
                    let dh =
                        s.conntrack_hits - p.map_or(0, |p| p.conntrack_hits.min(s.conntrack_hits));
                    let ratio = if dp > 0 {
                        dh as f64 / dp as f64
                    } else if s.packets > 0 {
                        s.conntrack_hits as f64 / s.packets as f64
                    } else {
                        0.0
                    };
                    VipStatsView {
                        vip: name.clone(),
                        traffic: Rates {
                            packets: s.packets,
                            bytes: s.bytes,
                            pps: rate(s.packets, p.map(|p| p.packets)),
                            bps: 8.0 * rate(s.bytes, p.map(|p| p.bytes)),
                        },
                        new_flows: s.new_flows,
                        new_flows_ps: rate(s.new_flows, p.map(|p| p.new_flows)),
                        conntrack_hits: s.conntrack_hits,
                        conntrack_hit_ratio: ratio,
                    }
                })
                .collect(),
            backends: backends
                .iter()
                .map(|((vip, addr), (s, health))| {
                    let p = pb.and_then(|p| p.get(&(vip.clone(), *addr))).map(|x| x.0);
                    BackendStatsView {
                        vip: vip.clone(),
                        address: *addr,
                        health: health.clone(),
                        traffic: Rates {
                            packets: s.packets,
                            bytes: s.bytes,
                            pps: rate(s.packets, p.map(|p| p.packets)),
                            bps: 8.0 * rate(s.bytes, p.map(|p| p.bytes)),
                        },
                    }
                })
                .collect(),
            reasons: reasons
                .iter()
                .map(|(k, v)| {
                    (
                        k.to_string(),
                        (*v, rate(*v, pr.and_then(|p| p.get(k)).copied())),
                    )
                })
                .collect(),
        };
        self.view = view;
        self.older = self.prev.replace((now, vips, backends, reasons));
    }
}

type ControlMsg = (Request, oneshot::Sender<Reply>);

async fn serve_control(listener: UnixListener, tx: mpsc::Sender<ControlMsg>) {
    loop {
        let Ok((stream, _)) = listener.accept().await else {
            continue;
        };
        let tx = tx.clone();
        tokio::spawn(async move {
            let (r, mut w) = stream.into_split();
            let mut line = String::new();
            let mut r = BufReader::new(r);
            let reply =
                match tokio::time::timeout(Duration::from_secs(10), r.read_line(&mut line)).await {
                    Ok(Ok(n)) if n > 0 => match serde_json::from_str::<Request>(&line) {
                        Ok(req) => {
                            let (otx, orx) = oneshot::channel();
                            if tx.send((req, otx)).await.is_err() {
                                Reply::err("the agent is shutting down")
                            } else {
                                orx.await
                                    .unwrap_or_else(|_| Reply::err("the agent is shutting down"))
                            }
                        }
                        Err(e) => Reply::err(format!("bad request: {e}")),
                    },
                    _ => return,
                };
            let mut out = serde_json::to_string(&reply).unwrap_or_default();
            out.push('\n');
            let _ = w.write_all(out.as_bytes()).await;
        });
    }
}

fn bind_control(path: &Path) -> anyhow::Result<UnixListener> {
    if let Some(dir) = path.parent() {
        std::fs::create_dir_all(dir).with_context(|| format!("creating {}", dir.display()))?;
    }
    if path.exists() {
        if std::os::unix::net::UnixStream::connect(path).is_ok() {
            bail!(
                "another lb agent is already listening on {}; stop it first or use another instance",
                path.display()
            );
        }
        let _ = std::fs::remove_file(path);
    }
    UnixListener::bind(path)
        .with_context(|| format!("binding the control socket {}", path.display()))
}

/// `lb run`: runs until SIGINT or SIGTERM.
pub async fn run(opts: RunOptions) -> anyhow::Result<()> {
    let (health_tx, mut health_rx) = mpsc::unbounded_channel();
    // Validate the control socket before touching the kernel.
    let pre = Config::load(&opts.config)?;
    let listener = bind_control(&pre.agent.start.control_socket)?;
    let mut agent = match Agent::start(opts, health_tx) {
        Ok(a) => a,
        Err(e) => {
            let _ = std::fs::remove_file(&pre.agent.start.control_socket);
            return Err(e);
        }
    };
    let (ctl_tx, mut ctl_rx) = mpsc::channel::<ControlMsg>(16);
    tokio::spawn(serve_control(listener, ctl_tx));
    if let Some(addr) = agent.metrics_listen() {
        let shared = agent.shared();
        let l = tokio::net::TcpListener::bind(addr)
            .await
            .with_context(|| format!("binding the metrics address {addr}"))?;
        tokio::spawn(crate::metrics::serve(l, shared));
        info!("metrics on http://{addr}/metrics");
    }
    let mut sigint = signal(SignalKind::interrupt())?;
    let mut sigterm = signal(SignalKind::terminate())?;
    let mut sighup = signal(SignalKind::hangup())?;
    let mut tick = tokio::time::interval(Duration::from_secs(1));
    info!(
        "lb running: instance {}, control socket {}",
        agent.cfg.agent.kernel.instance,
        agent.control_socket().display()
    );
    agent.sample_stats();
    loop {
        tokio::select! {
            _ = sigint.recv() => break,
            _ = sigterm.recv() => break,
            _ = sighup.recv() => {
                match Config::load(&agent.opts.config).map_err(anyhow::Error::from).and_then(|c| agent.apply_reload(c)) {
                    Ok(()) => {
                        info!("SIGHUP: reloaded {}", agent.opts.config.display());
                        if let Err(e) = agent.after_change() { warn!("{e:#}"); }
                    }
                    Err(e) => warn!("SIGHUP: reload refused, running state kept: {e:#}"),
                }
            }
            Some(ev) = health_rx.recv() => {
                if agent.on_health(ev)
                    && let Err(e) = agent.reconcile() { warn!("{e:#}"); }
            }
            Some((req, reply)) = ctl_rx.recv() => {
                let r = agent.handle(req).and_then(|(data, changed)| {
                    if changed { agent.after_change()?; }
                    Ok(data)
                });
                let _ = reply.send(match r {
                    Ok(data) => Reply { ok: true, error: None, data },
                    Err(e) => Reply::err(format!("{e:#}")),
                });
            }
            _ = tick.tick() => {
                agent.resolve_next_hops(Duration::ZERO);
                if let Err(e) = agent.reconcile() { warn!("{e:#}"); }
                agent.sample_stats();
            }
        }
    }
    info!("stopping");
    agent.shutdown();
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn vip(packets: u64, hits: u64) -> VipCounters {
        [(
            "web".to_string(),
            lb_common::VipStats {
                packets,
                bytes: packets * 100,
                new_flows: packets - hits,
                conntrack_hits: hits,
            },
        )]
        .into()
    }

    #[test]
    fn rates_and_hit_ratio_come_from_the_last_interval() {
        let mut s = StatsSampler::default();
        let t0 = Instant::now();
        s.update(t0, vip(1000, 0), BTreeMap::new(), BTreeMap::new());
        s.update(
            t0 + Duration::from_secs(2),
            vip(3000, 1500),
            BTreeMap::new(),
            [("pass_not_vip", 10)].into(),
        );
        let v = &s.view.vips[0];
        assert_eq!(v.traffic.pps, 1000.0);
        assert_eq!(v.traffic.bps, 8.0 * 100.0 * 1000.0);
        assert_eq!(v.new_flows_ps, 250.0);
        assert_eq!(v.conntrack_hit_ratio, 0.75);
        assert_eq!(s.view.reasons["pass_not_vip"].0, 10);
        assert!(s.older.is_some(), "the sample before the last is kept");
    }
}
