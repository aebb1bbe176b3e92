//! The flow keeper: a thread of the agent that keeps the data path's
//! RUNTIME element current (the flow clock, the conntrack timeouts, the
//! egress length limit) and counts the active flows per backend.
//!
//! - The clock: milliseconds of agent time, written every
//!   [`timing::FLOW_CLOCK_PERIOD`] (a tick). It continues from the value
//!   found pinned, so it stands still while no agent runs: an agent that
//!   was away does not expire every flow at once when it comes back.
//! - The flow cache: cleared after each tick's clock write (one batched
//!   update), so that every flow in use goes through its CONNTRACK record
//!   once per tick, which keeps the record fresh in the LRU and stamps it;
//!   a cache hit itself reads no clock (the per-packet cost stays that of
//!   a cache hit).
//! - The count, in a second thread (so that a long pass never holds the
//!   clock back): one pass over CONNTRACK and one over CONNTRACK6 with
//!   batched lookups, counting
//!   per backend the records that have not expired under the kernel's own
//!   rule ([`FlowEntry::is_expired`]), every [`timing::FLOW_COUNT_PERIOD`]
//!   or 20 times the last pass's duration if longer (a pass costs ~0.3 µs
//!   per record: a full 1M-record table is counted every ~7 s, ≤ 5 % of a
//!   core). Expired records are left to the LRU: the kernel already treats
//!   them as misses. Then the NAT pass ([`crate::nat_keeper`]): NAT pairs
//!   that are over are removed (the NAT maps are not LRUs), live ones
//!   counted per backend with the conntrack records.
//! - The SYN filter ([`crate::syn_filter`]): each count pass also
//!   rebuilds the bank not in use from the live TCP records; from the
//!   second pass on, the kernel is switched to it after the pass (the
//!   first one may run while the program is still being attached, and a
//!   program instance replaced meanwhile would not set the new filter's
//!   bits).
//! - Least connections: after each count, every backend's LC_CORRECTION
//!   word is set so that the kernel's counter plus it equals the open
//!   connections counted (see [`crate::sched::LcCounters`]).
//! - The limit: the smallest MTU of the egress interfaces (the attached
//!   ones and the redirect targets), re-read with each count.
//!
//! A thread rather than a task: the clock must not stall behind the event
//! loop (a clock that jumps after a stall would age every flow at once).

use std::{
    collections::{BTreeMap, BTreeSet},
    os::fd::{AsFd as _, AsRawFd as _, BorrowedFd, OwnedFd},
    path::Path,
    sync::{Arc, Condvar, Mutex},
    thread::JoinHandle,
    time::{Duration, Instant},
};

use aya::maps::{Array, Map, MapData};
use lb_common::{FLOW_CACHE_SLOTS, FlowEntry, FlowKey, FlowKey6, Runtime, map_names};
use log::warn;

use crate::{
    bpf_batch::{BPF_MAP_LOOKUP_BATCH, BPF_MAP_UPDATE_BATCH, BatchAttr, bpf_batch},
    timing,
};

/// The flow settings given to the kernel with the clock: the conntrack
/// (and NAT) timeouts and the SNAT port range.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct FlowTimeouts {
    pub udp_idle: Duration,
    pub tcp_idle: Duration,
    pub tcp_closing: Duration,
    /// `[agent] nat_port_range`, host order.
    pub nat_port_min: u16,
    pub nat_port_max: u16,
    /// The SYN-flood guard's word for the kernel (`Runtime::syn_guard`).
    pub syn_guard: u32,
}

impl From<&crate::config::AgentConfig> for FlowTimeouts {
    fn from(a: &crate::config::AgentConfig) -> Self {
        let c = &a.conntrack;
        Self {
            udp_idle: c.udp_idle,
            tcp_idle: c.tcp_idle,
            tcp_closing: c.tcp_closing,
            nat_port_min: a.nat.port_min,
            nat_port_max: a.nat.port_max,
            syn_guard: c.syn_guard_word(timing::FLOW_CLOCK_PERIOD),
        }
    }
}

/// The latest count of active flows.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct FlowCount {
    /// Backend id → records naming it that have not expired.
    pub per_backend: BTreeMap<u32, u64>,
    /// Backend id → those of them not closing (no FIN or RST seen):
    /// the active connections least connections compares.
    pub open_per_backend: BTreeMap<u32, u64>,
    /// Records read in the pass (expired ones included), both families.
    pub records: u64,
    /// Of them, CONNTRACK6's.
    pub records6: u64,
    /// When the pass ended.
    pub at: Option<Instant>,
    /// The NAT pass that followed (its live flows are in `per_backend`).
    pub nat: crate::nat_keeper::NatSweep,
}

#[derive(Default)]
struct Shared {
    stop: bool,
    timeouts: Option<FlowTimeouts>,
    /// Egress ifindexes: attached interfaces and redirect targets.
    egress: BTreeSet<u32>,
    count: FlowCount,
    /// RUNTIME as last written.
    rt: Runtime,
}

type SharedRef = Arc<(Mutex<Shared>, Condvar)>;

/// Waits `d` or until stopped; true when stopped.
fn wait(shared: &SharedRef, d: Duration) -> bool {
    let (lock, cv) = &**shared;
    let guard = lock.lock().unwrap_or_else(|e| e.into_inner());
    let (guard, _) = cv
        .wait_timeout_while(guard, d, |s| !s.stop)
        .unwrap_or_else(|e| e.into_inner());
    guard.stop
}

/// The running keeper; stops (joining its threads) when dropped.
pub struct FlowKeeper {
    shared: SharedRef,
    threads: Vec<JoinHandle<()>>,
}

fn ms(d: Duration) -> u32 {
    u32::try_from(d.as_millis()).unwrap_or(u32::MAX)
}

impl FlowKeeper {
    /// Starts the keeper on the maps pinned in `pin_dir`, continuing the
    /// pinned clock. `egress`: the ifindexes of the attached interfaces.
    pub fn start(
        pin_dir: &Path,
        flow_caches: FlowCaches,
        syn_filter: crate::syn_filter::SynFilter,
        timeouts: FlowTimeouts,
        egress: impl IntoIterator<Item = u32>,
    ) -> anyhow::Result<Self> {
        let open = |name: &str| {
            let path = pin_dir.join(name);
            MapData::from_pin(&path).map_err(|e| anyhow::anyhow!("opening {}: {e}", path.display()))
        };
        let mut runtime: Array<MapData, Runtime> =
            Array::try_from(Map::Array(open(map_names::RUNTIME)?))
                .map_err(|e| anyhow::anyhow!("map {}: {e}", map_names::RUNTIME))?;
        let conntrack = open(map_names::CONNTRACK)?;
        let conntrack6 = open(map_names::CONNTRACK6)?;
        let mut nat = crate::nat_keeper::NatMaps::open(pin_dir)?;
        let mut lc = crate::sched::LcCounters::open(pin_dir)?;
        let base = runtime
            .get(&0, 0)
            .map_err(|e| anyhow::anyhow!("reading {}: {e}", map_names::RUNTIME))?
            .now_ms;
        let shared: SharedRef = Arc::new((
            Mutex::new(Shared {
                timeouts: Some(timeouts),
                egress: egress.into_iter().collect(),
                ..Shared::default()
            }),
            Condvar::new(),
        ));
        // The first write before returning: the kernel has the timeouts
        // and the limit from the start.
        let started = Instant::now();
        let mut state = KeeperState {
            base,
            started,
            max_l3_len: 0,
            next_mtu: started,
            flow_caches,
        };
        state.step(&shared, &mut runtime)?;
        let clock_shared = shared.clone();
        let clock = std::thread::Builder::new()
            .name("lb-flow-clock".into())
            .spawn(move || {
                let mut failing = false;
                while !wait(&clock_shared, timing::FLOW_CLOCK_PERIOD) {
                    match state.step(&clock_shared, &mut runtime) {
                        Ok(()) => failing = false,
                        Err(e) if !failing => {
                            warn!("flow clock: {e:#}");
                            failing = true;
                        }
                        Err(_) => {}
                    }
                }
            })?;
        let count_shared = shared.clone();
        let counter = std::thread::Builder::new()
            .name("lb-flow-count".into())
            .spawn(move || {
                let mut failing = false;
                let mut period = Duration::ZERO;
                let mut passes = 0u32;
                while !wait(&count_shared, period) {
                    let rt = count_shared.0.lock().unwrap_or_else(|e| e.into_inner()).rt;
                    let t = Instant::now();
                    let lc_before = lc.snapshot();
                    let bank = syn_filter.begin();
                    let counted = count_flows(
                        conntrack.fd().as_fd(),
                        conntrack6.fd().as_fd(),
                        &rt,
                        |hash| syn_filter.note(bank, hash),
                    )
                    .inspect(|_| {
                        passes += 1;
                        if passes >= 2 {
                            syn_filter.use_bank(bank);
                        }
                    })
                    .and_then(|c| with_nat(c, &mut nat, &rt))
                    .and_then(|c| {
                        // Least connections' counts corrected to
                        // what this pass found open.
                        lc.correct(&lc_before?, &c.open_per_backend)?;
                        Ok(c)
                    });
                    match counted {
                        Ok(c) => {
                            failing = false;
                            count_shared
                                .0
                                .lock()
                                .unwrap_or_else(|e| e.into_inner())
                                .count = c;
                        }
                        Err(e) if !failing => {
                            warn!("counting flows: {e:#}");
                            failing = true;
                        }
                        Err(_) => {}
                    }
                    period = timing::FLOW_COUNT_PERIOD.max(t.elapsed() * 20);
                }
            });
        let mut keeper = Self {
            shared,
            threads: vec![clock],
        };
        // On an error here, dropping `keeper` stops the clock thread.
        keeper.threads.push(counter?);
        Ok(keeper)
    }

    fn with<T>(&self, f: impl FnOnce(&mut Shared) -> T) -> T {
        let mut g = self.shared.0.lock().unwrap_or_else(|e| e.into_inner());
        f(&mut g)
    }

    /// New timeouts (a reload); the kernel has them within a clock period.
    pub fn set_timeouts(&self, timeouts: FlowTimeouts) {
        self.with(|s| s.timeouts = Some(timeouts));
    }

    /// One more egress interface (a redirect target).
    pub fn add_egress(&self, ifindex: u32) {
        self.with(|s| s.egress.insert(ifindex));
    }

    /// The latest count of active flows.
    pub fn count(&self) -> FlowCount {
        self.with(|s| s.count.clone())
    }

    /// The flow clock as last written (ms of agent time).
    pub fn now_ms(&self) -> u64 {
        self.with(|s| s.rt.now_ms)
    }
}

impl Drop for FlowKeeper {
    fn drop(&mut self) {
        self.with(|s| s.stop = true);
        self.shared.1.notify_all();
        for t in self.threads.drain(..) {
            let _ = t.join();
        }
    }
}

/// The flow caches the keeper clears each tick: FLOW_CACHE (IPv4) and
/// FLOW_CACHE6 (IPv6), and the NAT caches in front of NAT_FWD, NAT_REV,
/// NAT_FWD6 and NAT_REV6, all belonging to the loaded program (not
/// pinned). Cleared each tick so that a flow's first packet in the tick
/// goes through its map entry and refreshes it (conntrack record, NAT
/// entry `last_seen_ms`): a flow served from a cache never looks idle to
/// the keeper.
pub struct FlowCaches {
    pub v4: OwnedFd,
    pub v6: OwnedFd,
    pub nat_fwd: OwnedFd,
    pub nat_rev: OwnedFd,
    pub nat_fwd6: OwnedFd,
    pub nat_rev6: OwnedFd,
}

impl FlowCaches {
    /// Empties every cache.
    pub fn clear(&self) -> anyhow::Result<()> {
        use lb_common::nat::{NatFwdCache, NatRevCache};
        use std::mem::size_of;
        let caches = [
            (
                &self.v4,
                size_of::<lb_common::FlowCacheEntry>(),
                map_names::FLOW_CACHE,
            ),
            (
                &self.v6,
                size_of::<lb_common::FlowCacheEntry6>(),
                map_names::FLOW_CACHE6,
            ),
            (
                &self.nat_fwd,
                size_of::<NatFwdCache>(),
                map_names::NAT_FWD_CACHE,
            ),
            (
                &self.nat_rev,
                size_of::<NatRevCache>(),
                map_names::NAT_REV_CACHE,
            ),
            (
                &self.nat_fwd6,
                size_of::<NatFwdCache>(),
                map_names::NAT_FWD_CACHE6,
            ),
            (
                &self.nat_rev6,
                size_of::<NatRevCache>(),
                map_names::NAT_REV_CACHE6,
            ),
        ];
        for (fd, value_size, name) in caches {
            clear_flow_cache(fd.as_fd(), value_size, name)?;
        }
        Ok(())
    }
}

struct KeeperState {
    flow_caches: FlowCaches,
    base: u64,
    started: Instant,
    max_l3_len: u32,
    /// When to re-read the egress MTUs.
    next_mtu: Instant,
}

impl KeeperState {
    /// One tick: RUNTIME written, then the flow cache cleared.
    fn step(
        &mut self,
        shared: &SharedRef,
        runtime: &mut Array<MapData, Runtime>,
    ) -> anyhow::Result<()> {
        let (timeouts, egress) = {
            let s = shared.0.lock().unwrap_or_else(|e| e.into_inner());
            (s.timeouts, s.egress.clone())
        };
        if Instant::now() >= self.next_mtu {
            self.next_mtu = Instant::now() + timing::FLOW_COUNT_PERIOD;
            self.max_l3_len = egress.iter().filter_map(|&i| mtu(i)).min().unwrap_or(0);
        }
        let rt = Runtime {
            now_ms: self.base + self.started.elapsed().as_millis() as u64,
            udp_idle_ms: timeouts.map_or(0, |t| ms(t.udp_idle)),
            tcp_idle_ms: timeouts.map_or(0, |t| ms(t.tcp_idle)),
            tcp_closing_ms: timeouts.map_or(0, |t| ms(t.tcp_closing)),
            max_l3_len: self.max_l3_len,
            nat_port_min: timeouts.map_or(0, |t| t.nat_port_min),
            nat_port_max: timeouts.map_or(0, |t| t.nat_port_max),
            syn_guard: timeouts.map_or(0, |t| t.syn_guard),
        };
        runtime
            .set(0, rt, 0)
            .map_err(|e| anyhow::anyhow!("writing {}: {e}", map_names::RUNTIME))?;
        self.flow_caches.clear()?;
        shared.0.lock().unwrap_or_else(|e| e.into_inner()).rt = rt;
        Ok(())
    }
}

/// Runs the NAT pass after a conntrack count: removes the NAT pairs that
/// are over and adds the live ones to the per-backend counts.
pub fn with_nat(
    mut count: FlowCount,
    nat: &mut crate::nat_keeper::NatMaps,
    rt: &Runtime,
) -> anyhow::Result<FlowCount> {
    let sweep = nat.sweep(rt)?;
    for (&id, &n) in &sweep.live_per_backend {
        *count.per_backend.entry(id).or_default() += n;
    }
    for (&id, &n) in &sweep.open_per_backend {
        *count.open_per_backend.entry(id).or_default() += n;
    }
    count.nat = sweep;
    count.at = Some(Instant::now());
    Ok(count)
}

/// Counts the records of CONNTRACK and CONNTRACK6 that have not expired
/// at `rt`, per backend (ids are shared by both families): one pass of
/// batched lookups over each. `tcp_live` gets the flow hash of every TCP
/// record that has not expired (the SYN filter's bits).
pub fn count_flows(
    conntrack: BorrowedFd<'_>,
    conntrack6: BorrowedFd<'_>,
    rt: &Runtime,
    mut tcp_live: impl FnMut(u32),
) -> anyhow::Result<FlowCount> {
    let mut count = FlowCount::default();
    let mut add = |v6: bool, proto: u32, hash: &dyn Fn() -> u32, e: &FlowEntry| {
        count.records += 1;
        count.records6 += u64::from(v6);
        if !e.is_expired(proto, rt) {
            if proto == u32::from(lb_common::IPPROTO_TCP) {
                tcp_live(hash());
            }
            *count.per_backend.entry(e.backend_id).or_default() += 1;
            if e.flags & lb_common::FLOW_FLAG_CLOSING == 0 {
                *count.open_per_backend.entry(e.backend_id).or_default() += 1;
            }
        }
    };
    for_each_flow::<FlowKey>(conntrack, |k, e| add(false, k.proto, &|| k.hash(), e))?;
    for_each_flow::<FlowKey6>(conntrack6, |k, e| add(true, k.proto, &|| k.hash(), e))?;
    count.at = Some(Instant::now());
    Ok(count)
}

/// A conntrack key type: FlowKey (CONNTRACK) or FlowKey6 (CONNTRACK6).
pub trait ConntrackKey: Copy {
    /// The map holding such keys, for messages.
    const MAP: &'static str;
    /// A placeholder for the batch buffer.
    const ZERO: Self;
}

impl ConntrackKey for FlowKey {
    const MAP: &'static str = map_names::CONNTRACK;
    const ZERO: Self = FlowKey::new(0, 0, 0, 0, 0);
}

impl ConntrackKey for FlowKey6 {
    const MAP: &'static str = map_names::CONNTRACK6;
    const ZERO: Self = FlowKey6::new(
        std::net::Ipv6Addr::UNSPECIFIED,
        0,
        std::net::Ipv6Addr::UNSPECIFIED,
        0,
        0,
    );
}

/// Empties every slot of a flow cache (`map`: FLOW_CACHE, FLOW_CACHE6 or a NAT cache,
/// named `name`, values of `value_size` bytes) in one batched update. A
/// packet reading a slot meanwhile sees the old entry, an empty one, or a
/// torn mix that its check word rejects.
pub fn clear_flow_cache(map: BorrowedFd<'_>, value_size: usize, name: &str) -> anyhow::Result<()> {
    let keys: Vec<u32> = (0..FLOW_CACHE_SLOTS).collect();
    let values = vec![0u8; FLOW_CACHE_SLOTS as usize * value_size];
    let mut attr = BatchAttr {
        in_batch: 0,
        out_batch: 0,
        keys: keys.as_ptr() as u64,
        values: values.as_ptr() as u64,
        count: FLOW_CACHE_SLOTS,
        map_fd: map.as_raw_fd() as u32,
        elem_flags: 0,
        flags: 0,
    };
    bpf_batch(BPF_MAP_UPDATE_BATCH, &mut attr)
        .map_err(|e| anyhow::anyhow!("clearing {name} (BPF_MAP_UPDATE_BATCH): {e}"))
}
/// Records per batched lookup.
const BATCH: usize = 1024;

/// Calls `f` on every record of a hash map of `K → FlowEntry` (CONNTRACK
/// or CONNTRACK6), read with BPF_MAP_LOOKUP_BATCH (records added or
/// removed meanwhile may be seen or not, as with any walk of a live hash
/// map).
pub fn for_each_flow<K: ConntrackKey>(
    map: BorrowedFd<'_>,
    f: impl FnMut(&K, &FlowEntry),
) -> anyhow::Result<()> {
    let zero = FlowEntry {
        backend_id: 0,
        flags: 0,
        last_seen_ms: 0,
    };
    for_each_entry(map, K::MAP, K::ZERO, zero, f)
}

/// Calls `f` on every element of the hash map `map` (named `name` in
/// errors) of `K → V`, read with BPF_MAP_LOOKUP_BATCH, [`BATCH`] elements
/// per call; `zero_k` and `zero_v` fill the buffers.
pub fn for_each_entry<K: Copy, V: Copy>(
    map: BorrowedFd<'_>,
    name: &str,
    zero_k: K,
    zero_v: V,
    mut f: impl FnMut(&K, &V),
) -> anyhow::Result<()> {
    let mut keys = vec![zero_k; BATCH];
    let mut values = vec![zero_v; BATCH];
    // For hash maps the batch cursor is a bucket index.
    let mut cursor: u32 = 0;
    let mut next: u32 = 0;
    let mut first = true;
    loop {
        let mut attr = BatchAttr {
            in_batch: if first {
                0
            } else {
                &cursor as *const u32 as u64
            },
            out_batch: &mut next as *mut u32 as u64,
            keys: keys.as_mut_ptr() as u64,
            values: values.as_mut_ptr() as u64,
            count: BATCH as u32,
            map_fd: map.as_raw_fd() as u32,
            elem_flags: 0,
            flags: 0,
        };
        let err = bpf_batch(BPF_MAP_LOOKUP_BATCH, &mut attr).err();
        let done = match &err {
            None => false,
            Some(e) if e.raw_os_error() == Some(libc::ENOENT) => true,
            Some(e) => anyhow::bail!("BPF_MAP_LOOKUP_BATCH on {name}: {e}"),
        };
        let n = (attr.count as usize).min(BATCH);
        for i in 0..n {
            f(&keys[i], &values[i]);
        }
        if done {
            return Ok(());
        }
        cursor = next;
        first = false;
    }
}

/// The MTU of interface `ifindex` (None when it is gone).
pub fn mtu(ifindex: u32) -> Option<u32> {
    let mut name = [0 as libc::c_char; libc::IF_NAMESIZE];
    // SAFETY: `name` has IF_NAMESIZE bytes, as if_indextoname requires.
    if unsafe { libc::if_indextoname(ifindex, name.as_mut_ptr()) }.is_null() {
        return None;
    }
    // SAFETY: plain socket call.
    let fd = unsafe { libc::socket(libc::AF_INET, libc::SOCK_DGRAM | libc::SOCK_CLOEXEC, 0) };
    if fd < 0 {
        return None;
    }
    // SAFETY: an all-zero ifreq is valid.
    let mut req: libc::ifreq = unsafe { std::mem::zeroed() };
    req.ifr_name = name;
    // SAFETY: `req` is a valid ifreq naming the interface; the kernel
    // writes ifru_mtu.
    let rc = unsafe { libc::ioctl(fd, libc::SIOCGIFMTU as _, &mut req) };
    // SAFETY: `fd` is ours.
    unsafe { libc::close(fd) };
    if rc < 0 {
        return None;
    }
    // SAFETY: SIOCGIFMTU filled the mtu member of the union.
    let mtu = unsafe { req.ifr_ifru.ifru_mtu };
    u32::try_from(mtu).ok()
}
