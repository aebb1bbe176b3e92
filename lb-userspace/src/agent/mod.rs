//! `lb run`: the agent. Loads and attaches the data path, keeps the maps in
//! step with configuration, health and next hops, serves the control socket
//! and the metrics endpoint.
//!
//! Rooms: [`state`] (the desired state, pure), [`core`] (state + kernel
//! image + map writes through [`crate::reconcile::KernelMaps`], no I/O),
//! [`requests`] (control requests on the core), [`links`] (XDP links),
//! [`stats`] (counters and rates); this module ties them to the runtime:
//! files, tasks, signals.

mod acl;
pub mod announce;
pub mod core;
pub mod links;
pub mod lock;
mod nat_explain;
pub mod nexthops;
pub mod overrides;
pub mod requests;
mod sched_explain;
pub mod state;
pub mod stats;

use std::{collections::BTreeSet, net::IpAddr, path::PathBuf, time::Instant};

use anyhow::{Context as _, bail};
use log::{info, warn};
use tokio::{
    signal::unix::{SignalKind, signal},
    sync::{mpsc, watch},
};

use self::{
    core::Core,
    links::Links,
    lock::InstanceLock,
    nexthops::{Batch, Wanted},
    requests::Handled,
    stats::Stats,
};
use crate::{
    budget::Budget,
    config::{Config, XdpModeSetting},
    control::{self, AnnounceStatusView, ControlMsg, Reply, Request, SocketAccess, StatusView},
    datapath::{self, Datapath},
    health::{CheckTarget, Checkers, HealthEvent, ProbeLimit},
    keys::{BackendKey, VipId},
    reconcile::KernelMaps,
    timing,
    vip_routes::VipRoutes,
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
    /// Before loading, detach and remove whatever is pinned for this
    /// instance (pins of another layout are refused otherwise).
    pub reset_datapath: bool,
}

/// A start that failed, with the data path to clean up.
type FailedStart = Box<(anyhow::Error, Datapath)>;

/// The running agent: the core plus what it needs from the outside world.
pub struct Agent {
    core: Core<Datapath>,
    opts: RunOptions,
    links: Links,
    checkers: Checkers,
    /// The addresses the next-hop follower follows.
    next_hops: watch::Sender<Wanted>,
    stats: Stats,
    started: Instant,
    restored: bool,
    /// The announce table, when `[agent.announce]` is set.
    routes: Option<Announcer>,
}

/// The announce table and the last failure writing it.
struct Announcer {
    routes: VipRoutes,
    /// The last route change that failed, retried at every event and tick.
    error: Option<String>,
}

impl Agent {
    /// Brings up the data path for `cfg`. Nothing is touched when the
    /// command line is invalid; a start that fails half-way removes what it
    /// created (maps pinned by this start, links it attached). `known`:
    /// the next hops the follower reported so far.
    pub fn start(
        cfg: Config,
        opts: RunOptions,
        health_tx: mpsc::UnboundedSender<HealthEvent>,
        next_hops: watch::Sender<Wanted>,
        known: Batch,
        probe_limit: ProbeLimit,
        routes: Option<(VipRoutes, BTreeSet<IpAddr>)>,
    ) -> anyhow::Result<Self> {
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
        if opts.reset_datapath {
            datapath::reset(&pin_dir)?;
        }
        let restored = pin_dir.join(lb_common::map_names::VIPS).exists();
        let sizes = cfg.agent.kernel.map_sizes();
        let dp = Datapath::load(&pin_dir, sizes).context("loading the data path")?;
        let setting = opts.xdp_mode.unwrap_or(cfg.agent.start.xdp_mode);
        let started = Self::bring_up(cfg, dp, &interfaces, setting, known);
        let (core, links) = match started {
            Ok(x) => x,
            Err(failed) => {
                let (e, dp) = *failed;
                if !restored && let Err(u) = dp.unpin() {
                    warn!("removing {}: {u}", pin_dir.display());
                }
                return Err(e);
            }
        };
        if restored {
            info!(
                "found the pinned data path in {}: {} VIP entries, {} backends, {} conntrack entries kept",
                pin_dir.display(),
                core.image().vips.len(),
                core.image().backends.len(),
                core.maps().conntrack_len().unwrap_or(0)
            );
        }
        let mut core = core;
        let routes = routes.map(|(routes, found)| {
            if !found.is_empty() {
                info!(
                    "found {} VIP route(s) in table {}: taken over",
                    found.len(),
                    routes.settings().table
                );
            }
            core.set_announced(found);
            Announcer {
                routes,
                error: None,
            }
        });
        let mut agent = Agent {
            routes,
            core,
            opts: RunOptions { interfaces, ..opts },
            links,
            checkers: Checkers::new(health_tx, probe_limit),
            next_hops,
            stats: Stats::default(),
            started: Instant::now(),
            restored,
        };
        agent.sync_checkers();
        Ok(agent)
    }

    /// Core, first reconcile, links; on failure hands the data path back
    /// for cleanup.
    fn bring_up(
        cfg: Config,
        dp: Datapath,
        interfaces: &[String],
        setting: XdpModeSetting,
        known: Batch,
    ) -> Result<(Core<Datapath>, Links), FailedStart> {
        let image = match dp.read_image() {
            Ok(i) => i,
            Err(e) => {
                let e = anyhow::Error::from(e).context("reading the pinned maps");
                return Err(Box::new((e, dp)));
            }
        };
        let mut core = Core::new(cfg, dp, image);
        core.on_next_hops(known);
        let timeouts = (&core.config().agent).into();
        let egress: Vec<u32> = interfaces
            .iter()
            .filter_map(|i| datapath::ifindex(i).ok())
            .collect();
        core.add_attached_tx_ports(&egress);
        let links = core
            .reconcile()
            .and_then(|_| core.maps_mut().start_flow_keeper(timeouts, egress))
            .and_then(|_| Links::attach_all(core.maps_mut(), interfaces, setting))
            .and_then(|links| {
                let attached: Vec<_> = links
                    .views()
                    .into_iter()
                    .map(|v| (v.name, v.ifindex, v.mode))
                    .collect();
                // Redirect targets: the egress interfaces of the backends
                // in service now (TX_PORTS may also hold stale ones).
                let targets = core
                    .image()
                    .backends
                    .values()
                    .filter(|b| b.is_usable())
                    .map(|b| b.ifindex)
                    .collect();
                core.maps().check_attachments(&attached, &targets)?;
                Ok(links)
            });
        match links {
            Ok(l) => Ok((core, l)),
            Err(e) => Err(Box::new((e, core.into_maps()))),
        }
    }

    /// One checker per configured backend with an id.
    fn sync_checkers(&mut self) {
        let cfg = self.core.config();
        let state = &self.core.state;
        let wanted: Vec<_> = cfg
            .vips
            .iter()
            .flat_map(|v| {
                let vip = VipId::of(v);
                v.backends.iter().filter_map(move |b| {
                    let key = BackendKey {
                        vip,
                        address: b.address,
                    };
                    let up = state.backend(&key)?.up;
                    let target = CheckTarget {
                        key,
                        label: v.name.clone(),
                    };
                    Some((target, b.health_check.clone(), up))
                })
            })
            .collect();
        self.checkers.sync(wanted);
    }

    /// After the configuration changed (request, reload).
    fn after_change(&mut self) -> anyhow::Result<()> {
        let r = self.core.after_change();
        let wanted = self.core.wanted_next_hops();
        self.next_hops.send_if_modified(|w| {
            let changed = *w != wanted;
            *w = wanted;
            changed
        });
        let timeouts = (&self.core.config().agent).into();
        self.core.maps().set_flow_timeouts(timeouts);
        self.sync_checkers();
        r
    }

    fn reload(&mut self) -> anyhow::Result<()> {
        let cfg = Config::load(&self.opts.config)?;
        self.core.apply_reload(cfg)?;
        self.after_change()
    }

    fn on_sighup(&mut self) {
        let path = self.opts.config.display().to_string();
        let loaded = Config::load(&self.opts.config).map_err(anyhow::Error::from);
        match loaded.and_then(|cfg| self.core.apply_reload(cfg)) {
            Ok(()) => {
                info!("SIGHUP: reloaded {path}");
                if let Err(e) = self.after_change() {
                    warn!("{e:#}");
                }
            }
            Err(e) => warn!("SIGHUP: reload refused, running state kept: {e:#}"),
        }
    }

    /// Brings the announce table to what the VIPs' readiness and the
    /// operator's requests call for: adds missing routes, removes the
    /// others. A failure is logged once and retried at the next call.
    async fn sync_routes(&mut self) {
        let Some(a) = self.routes.as_mut() else {
            return;
        };
        let wanted = self.core.announce_wanted();
        Self::apply_routes(a, &mut self.core, &wanted).await;
    }

    async fn apply_routes(a: &mut Announcer, core: &mut Core<Datapath>, wanted: &BTreeSet<IpAddr>) {
        let installed = core.announced().clone();
        if *wanted == installed {
            a.error = None;
            return;
        }
        let mut now = installed.clone();
        let mut error = None;
        for &addr in installed.difference(wanted) {
            match a.routes.del(addr).await {
                Ok(()) => {
                    info!("VIP address {addr}: route withdrawn");
                    now.remove(&addr);
                }
                Err(e) => error = Some(format!("{e:#}")),
            }
        }
        for &addr in wanted.difference(&installed) {
            match a.routes.add(addr).await {
                Ok(()) => {
                    info!("VIP address {addr}: route announced");
                    now.insert(addr);
                }
                Err(e) => error = Some(format!("{e:#}")),
            }
        }
        core.set_announced(now);
        if let Some(e) = &error
            && a.error.as_ref() != Some(e)
        {
            warn!("{e} (retried every {:?})", timing::TICK);
        }
        a.error = error;
    }

    /// Re-reads the announce table, so that the next [`Agent::sync_routes`]
    /// puts right what someone else changed there.
    async fn recheck_routes(&mut self) {
        let Some(a) = self.routes.as_mut() else {
            return;
        };
        match a.routes.list().await {
            Ok(found) => {
                if found != *self.core.announced() {
                    warn!(
                        "table {}: VIP routes changed outside lb (found {:?}, announced {:?}); putting them right",
                        a.routes.settings().table,
                        found,
                        self.core.announced()
                    );
                    self.core.set_announced(found);
                }
            }
            Err(e) => warn!("{e:#}"),
        }
    }

    /// Removes every route the agent announced (a clean stop).
    async fn withdraw_all(&mut self) {
        if let Some(a) = self.routes.as_mut() {
            Self::apply_routes(a, &mut self.core, &BTreeSet::new()).await;
        }
    }

    fn status(&self) -> StatusView {
        let cfg = self.core.config();
        StatusView {
            instance: cfg.agent.kernel.instance.clone(),
            pid: std::process::id(),
            uptime_s: self.started.elapsed().as_secs(),
            config: self.opts.config.display().to_string(),
            pin_dir: self.core.maps().pin_dir().display().to_string(),
            restored: self.restored,
            interfaces: self.links.views(),
            vips: cfg.vips.len(),
            backends: self.core.state.backends().count(),
            backends_up: self.core.state.backends().filter(|(_, b)| b.up).count(),
            metrics: cfg.agent.start.metrics_listen.map(|a| a.to_string()),
            overrides: self.core.overrides.views(cfg),
            announce: self.routes.as_ref().map(|a| {
                let s = a.routes.settings();
                let ann = &self.core.announce;
                AnnounceStatusView {
                    table: s.table,
                    protocol: s.protocol,
                    device: s.device.clone(),
                    host_drained: ann.host_drained,
                    announced: ann.installed.iter().copied().collect(),
                    withdrawn: cfg
                        .vips
                        .iter()
                        .filter(|v| ann.withdrawn.contains(&VipId::of(v)))
                        .map(|v| v.name.clone())
                        .collect(),
                    error: a.error.clone(),
                }
            }),
            version: env!("CARGO_PKG_VERSION").to_string(),
            conntrack_entries: cfg.agent.kernel.conntrack_entries,
        }
    }

    fn request(&mut self, req: Request) -> anyhow::Result<serde_json::Value> {
        match req {
            Request::Status => Ok(serde_json::to_value(self.status())?),
            Request::Stats => Ok(serde_json::to_value(self.stats.fresh(&self.core))?),
            Request::Reload => {
                self.reload()?;
                Ok(serde_json::Value::from("reloaded"))
            }
            req => {
                let Handled { data, changed } = self.core.handle(req)?;
                if changed {
                    self.after_change()?;
                }
                Ok(data)
            }
        }
    }

    /// Housekeeping once a tick: retry failed writes (no reconcile when
    /// nothing changed), sample counters.
    fn tick(&mut self) {
        if let Some(Err(e)) = self.core.reconcile_if_needed() {
            warn!("{e:#}");
        }
        self.stats.sample(&self.core);
    }

    /// Detaches and removes every pin (a clean stop), or leaves the data
    /// path running for the next agent.
    pub fn shutdown(mut self) {
        self.checkers.clear();
        let pin_dir = self.core.maps().pin_dir().to_path_buf();
        if self.opts.keep_datapath {
            self.links.keep();
            info!("maps kept pinned in {}", pin_dir.display());
        } else {
            self.links.detach();
            if let Err(e) = self.core.maps().unpin() {
                warn!("removing {}: {e}", pin_dir.display());
            }
        }
        let _ = std::fs::remove_file(&self.core.config().agent.start.control_socket);
    }
}

/// `lb run`: runs until SIGINT or SIGTERM.
pub async fn run(opts: RunOptions) -> anyhow::Result<()> {
    let cfg = Config::load(&opts.config)?;
    // One agent per instance, whatever its socket path: held until return.
    let _lock = InstanceLock::acquire(&cfg.agent.kernel.instance)?;
    let access = SocketAccess::resolve(cfg.agent.start.control_group.as_deref())
        .with_context(|| opts.config.display().to_string())?;
    let budget = Budget::at_start(cfg.vips.iter().map(|v| v.backends.len()).sum());
    // Everything that can fail without the kernel comes first: a start
    // that fails after attaching must not happen for a taken port.
    let mut sigint = signal(SignalKind::interrupt())?;
    let mut sigterm = signal(SignalKind::terminate())?;
    let mut sighup = signal(SignalKind::hangup())?;
    let metrics = match cfg.agent.start.metrics_listen {
        Some(addr) => Some(
            tokio::net::TcpListener::bind(addr)
                .await
                .with_context(|| format!("binding the metrics address {addr}"))?,
        ),
        None => None,
    };
    let socket = cfg.agent.start.control_socket.clone();
    let listener = control::bind(&socket, &access)?;
    let (health_tx, mut health_rx) = mpsc::unbounded_channel();
    // Next hops are followed off the event loop, all backends at once; the
    // start waits (bounded) for those the kernel can answer.
    let wanted = nexthops::wanted(&cfg);
    let (wanted_tx, wanted_rx) = watch::channel(wanted.clone());
    let (nh_tx, mut nh_rx) = mpsc::unbounded_channel();
    let known = match nexthops::spawn(wanted_rx, nh_tx) {
        Ok(()) => {
            nexthops::first_answers(&mut nh_rx, &wanted, timing::NEXT_HOP_WAIT_AT_START).await
        }
        Err(e) => {
            let _ = std::fs::remove_file(&socket);
            return Err(
                anyhow::Error::from(e).context("opening rtnetlink sockets to follow next hops")
            );
        }
    };
    let probe_limit = ProbeLimit::new(budget.probes);
    // The announce table: its device checked and the routes an earlier
    // agent left read before anything is attached.
    let routes = match &cfg.agent.start.announce {
        Some(s) => {
            let found = async {
                let r = VipRoutes::connect(s)?;
                let found = r.list().await?;
                anyhow::Ok((r, found))
            };
            match found.await {
                Ok(x) => Some(x),
                Err(e) => {
                    let _ = std::fs::remove_file(&socket);
                    return Err(e.context(format!("{}: [agent.announce]", opts.config.display())));
                }
            }
        }
        None => None,
    };
    let mut agent = Agent::start(cfg, opts, health_tx, wanted_tx, known, probe_limit, routes)
        .inspect_err(|_| {
            let _ = std::fs::remove_file(&socket);
        })?;
    let (ctl_tx, mut ctl_rx) = mpsc::channel::<ControlMsg>(16);
    tokio::spawn(control::serve(listener, ctl_tx.clone(), access));
    if let Some(l) = metrics {
        if let Ok(addr) = l.local_addr() {
            info!("metrics on http://{addr}/metrics, status page on http://{addr}/");
        }
        tokio::spawn(crate::metrics::serve(
            l,
            agent.stats.subscribe(),
            Some(ctl_tx.clone()),
            budget.metrics_connections,
        ));
    }
    let mut tick = tokio::time::interval(timing::TICK);
    let mut recheck = tokio::time::interval(timing::ANNOUNCE_RECHECK);
    info!(
        "lb running: instance {}, control socket {}",
        agent.core.config().agent.kernel.instance,
        socket.display()
    );
    agent.stats.sample(&agent.core);
    loop {
        tokio::select! {
            _ = sigint.recv() => break,
            _ = sigterm.recv() => break,
            _ = sighup.recv() => agent.on_sighup(),
            Some(batch) = nh_rx.recv() => {
                if agent.core.on_next_hops(batch) && let Err(e) = agent.core.reconcile() {
                    warn!("{e:#}");
                }
            }
            Some(ev) = health_rx.recv() => {
                // Coalesced: every result queued by now, then one reconcile.
                let mut batch = vec![ev];
                while batch.len() < timing::HEALTH_BATCH_MAX
                    && let Ok(ev) = health_rx.try_recv()
                {
                    batch.push(ev);
                }
                if agent.core.on_health_batch(batch) && let Err(e) = agent.core.reconcile() {
                    warn!("{e:#}");
                }
            }
            Some((req, reply)) = ctl_rx.recv() => {
                let _ = reply.send(match agent.request(req) {
                    Ok(data) => Reply { ok: true, error: None, data },
                    Err(e) => Reply::err(format!("{e:#}")),
                });
            }
            _ = tick.tick() => agent.tick(),
            _ = recheck.tick(), if agent.routes.is_some() => agent.recheck_routes().await,
        }
        // Whatever happened may have changed which VIPs are ready.
        agent.sync_routes().await;
    }
    info!("stopping");
    if agent.opts.keep_datapath {
        if !agent.core.announced().is_empty() {
            info!(
                "{} VIP route(s) left for the next agent (--keep-datapath)",
                agent.core.announced().len()
            );
        }
    } else {
        agent.withdraw_all().await;
    }
    agent.shutdown();
    Ok(())
}
