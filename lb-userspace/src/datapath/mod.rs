//! The kernel side as userspace sees it: loading the XDP object, pinning
//! its maps under `/sys/fs/bpf/lb/<instance>/`, attaching, and typed access
//! to every map. The only code in lb that writes kernel maps.

use std::{
    collections::BTreeMap,
    ffi::CString,
    fs,
    net::IpAddr,
    path::{Path, PathBuf},
};

use aya::{
    Ebpf, EbpfLoader,
    maps::{Array, HashMap, MapData, PerCpuArray, xdp::DevMapHash},
    programs::{Xdp, XdpMode},
};
use lb_common::{
    Backend, BackendStats, FlowEntry, FlowKey, Reason, VIP_SLOT_EMPTY, VIP_SLOT_TOMBSTONE, VipInfo,
    VipKey, VipSlot, VipStats, map_names, program_names,
};
use thiserror::Error;

mod acl;
mod entry;
mod flows;
mod kernel_maps;
mod nat;
mod ratelimit;
mod sched;
mod v6;

pub use entry::{backend_address, backend_encap_source, set_encap_source};
pub use ratelimit::LimitedSource;
pub use v6::backend_entry6;

use crate::bpf_batch::{batch_unsupported, update_batch_of};

use crate::{flow_keeper::FlowKeeper, pins};

/// The compiled XDP object, built by build.rs.
pub(crate) static OBJECT: &[u8] = aya::include_bytes_aligned!(concat!(env!("OUT_DIR"), "/lb-ebpf"));

pub const BPFFS: &str = "/sys/fs/bpf";
pub const PIN_ROOT: &str = "/sys/fs/bpf/lb";

#[derive(Debug, Error)]
pub enum DatapathError {
    #[error("lb needs root (CAP_BPF, CAP_NET_ADMIN) to load its XDP program; run it as root")]
    NotRoot,
    #[error("cannot mount bpffs at {BPFFS}: {0}")]
    MountBpffs(std::io::Error),
    #[error("{path}: {source}")]
    Io {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("loading the XDP object: {0}")]
    Load(#[from] aya::EbpfError),
    #[error("program {name}: {source}")]
    Program {
        name: &'static str,
        source: aya::programs::ProgramError,
    },
    #[error("map {name}: {source}")]
    Map {
        name: &'static str,
        source: aya::maps::MapError,
    },
    #[error(
        "the VIP table ({slots} slots) has no free slot near this VIP's home slot; raise max_vips"
    )]
    VipTableFull { slots: usize },
    #[error("IPv6 VIP address {0} is reserved (:: marks an empty slot, all ones a removed one)")]
    BadVip6(std::net::Ipv6Addr),
    #[error("map TX_PORTS: {0}")]
    TxPort(String),
    #[error("interface {0} does not exist")]
    NoSuchInterface(String),
    #[error(transparent)]
    Pins(#[from] crate::pins::PinsError),
    #[error("map {name} is full: more than {max} prefixes ([agent] acl_entries)")]
    AclFull { name: &'static str, max: u32 },
    #[error("map {name}: batch update: {source}")]
    TrieBatch {
        name: &'static str,
        source: std::io::Error,
    },
    #[error("parsing the XDP object: {0}")]
    Object(String),
    #[error("{what} {index} is outside the map (max {max})")]
    OutOfRange {
        what: &'static str,
        index: u32,
        max: u32,
    },
}

pub type Result<T, E = DatapathError> = std::result::Result<T, E>;

pub use crate::map_sizes::MapSizes;

pub fn is_root() -> bool {
    // SAFETY: geteuid has no preconditions.
    unsafe { libc::geteuid() == 0 }
}

/// Mounts bpffs at /sys/fs/bpf unless it is mounted already.
pub fn ensure_bpffs() -> Result<()> {
    let mounts = fs::read_to_string("/proc/mounts").map_err(|source| DatapathError::Io {
        path: "/proc/mounts".into(),
        source,
    })?;
    let mounted = mounts.lines().any(|l| {
        let mut f = l.split_whitespace();
        let (_, mnt, fstype) = (f.next(), f.next(), f.next());
        mnt == Some(BPFFS) && fstype == Some("bpf")
    });
    if mounted {
        return Ok(());
    }
    let c = |s: &str| CString::new(s).expect("no NUL");
    let (src, target, fstype) = (c("bpf"), c(BPFFS), c("bpf"));
    // SAFETY: valid NUL-terminated strings, no data argument.
    let rc = unsafe {
        libc::mount(
            src.as_ptr(),
            target.as_ptr(),
            fstype.as_ptr(),
            0,
            std::ptr::null(),
        )
    };
    if rc != 0 {
        return Err(DatapathError::MountBpffs(std::io::Error::last_os_error()));
    }
    Ok(())
}

pub fn ifindex(iface: &str) -> Result<u32> {
    let c = CString::new(iface).map_err(|_| DatapathError::NoSuchInterface(iface.into()))?;
    // SAFETY: valid NUL-terminated string.
    match unsafe { libc::if_nametoindex(c.as_ptr()) } {
        0 => Err(DatapathError::NoSuchInterface(iface.into())),
        i => Ok(i),
    }
}

/// The name of interface `ifindex`.
pub fn ifname(ifindex: u32) -> Option<String> {
    let mut name = [0 as libc::c_char; libc::IF_NAMESIZE];
    // SAFETY: `name` has IF_NAMESIZE bytes, as if_indextoname requires.
    let p = unsafe { libc::if_indextoname(ifindex, name.as_mut_ptr()) };
    if p.is_null() {
        return None;
    }
    // SAFETY: if_indextoname wrote a NUL-terminated name into `name`.
    let s = unsafe { std::ffi::CStr::from_ptr(name.as_ptr()) };
    Some(s.to_string_lossy().into_owned())
}

pub fn pin_dir(instance: &str) -> PathBuf {
    Path::new(PIN_ROOT).join(instance)
}

/// The loaded object with its pinned maps.
pub struct Datapath {
    ebpf: Ebpf,
    pin_dir: PathBuf,
    sizes: MapSizes,
    /// Mirror of the VIPS array (the agent is its only writer).
    vip_table: Vec<VipSlot>,
    /// Ring writes go through `BPF_MAP_UPDATE_BATCH` (until the kernel
    /// says it has none).
    batch_writes: bool,
    /// ACL prefixes are inserted with `BPF_MAP_UPDATE_BATCH` (until the
    /// kernel says tries have none).
    acl_batch: bool,
    /// Keeps RUNTIME current and counts flows, once started.
    keeper: Option<FlowKeeper>,
}

fn map_err(name: &'static str) -> impl FnOnce(aya::maps::MapError) -> DatapathError {
    move |source| DatapathError::Map { name, source }
}

impl Datapath {
    /// Loads the programs. Maps are pinned under `pin_dir` (made 0700,
    /// its owner checked); maps already pinned there (by an earlier agent)
    /// are reused with their contents if their layout record and the
    /// kernel's view of each map match this agent's, and refused otherwise
    /// (see [`crate::pins::check`]). A fresh directory gets the record.
    pub fn load(pin_dir: &Path, sizes: MapSizes) -> Result<Self> {
        if !is_root() {
            return Err(DatapathError::NotRoot);
        }
        ensure_bpffs()?;
        pins::secure_dir(Path::new(PIN_ROOT), false)?;
        pins::secure_dir(pin_dir, true)?;
        let layout = pins::Layout::of(sizes);
        let found = pins::check(pin_dir, &layout, &pinned_map_specs(sizes)?)?;
        if found == pins::Found::Empty {
            pins::write_record(pin_dir, &layout)?;
        }
        let loaded = Self::load_object(pin_dir, sizes);
        if loaded.is_err() && found == pins::Found::Empty {
            // Nothing was pinned here before: leave nothing behind.
            let _ = remove_pins(pin_dir);
        }
        loaded
    }

    fn load_object(pin_dir: &Path, sizes: MapSizes) -> Result<Self> {
        let vip_slots = lb_common::vip_table_size(sizes.max_vips);
        let mask = vip_slots - 1;
        let mut loader = EbpfLoader::new();
        loader
            .default_map_pin_directory(pin_dir)
            .override_global("VIP_TABLE_MASK", &mask, true);
        for (name, n) in sized_maps(sizes) {
            loader.map_max_entries(name, n);
        }
        let mut ebpf = loader.load(OBJECT)?;
        let name = program_names::BALANCER;
        let prog: &mut Xdp = ebpf
            .program_mut(name)
            .expect("program is in the object")
            .try_into()
            .map_err(|source| DatapathError::Program { name, source })?;
        prog.load()
            .map_err(|source| DatapathError::Program { name, source })?;
        let vip_table = {
            let map: Array<&MapData, VipSlot> =
                Array::try_from(ebpf.map(map_names::VIPS).expect("map is in the object"))
                    .map_err(map_err(map_names::VIPS))?;
            (0..vip_slots)
                .map(|i| map.get(&i, 0))
                .collect::<Result<Vec<_>, _>>()
                .map_err(map_err(map_names::VIPS))?
        };
        Ok(Self {
            ebpf,
            pin_dir: pin_dir.into(),
            sizes,
            vip_table,
            batch_writes: true,
            acl_batch: true,
            keeper: None,
        })
    }

    /// Loads the object with maps of its own that nobody else can open
    /// (pinned only while loading, then unpinned): for helper programs and
    /// tools that must not touch an agent's maps.
    pub fn load_private(sizes: MapSizes) -> Result<Self> {
        use std::sync::atomic::{AtomicU32, Ordering};
        static N: AtomicU32 = AtomicU32::new(0);
        let dir = Path::new(PIN_ROOT).join(format!(
            "private-{}-{}",
            std::process::id(),
            N.fetch_add(1, Ordering::Relaxed)
        ));
        let loaded = Self::load(&dir, sizes);
        remove_pins(&dir)?;
        loaded
    }

    pub fn sizes(&self) -> MapSizes {
        self.sizes
    }

    pub fn pin_dir(&self) -> &Path {
        &self.pin_dir
    }

    pub fn program(&self, name: &'static str) -> &Xdp {
        self.ebpf
            .program(name)
            .and_then(|p| p.try_into().ok())
            .expect("loaded XDP program")
    }

    pub fn balancer_mut(&mut self) -> &mut Xdp {
        self.ebpf
            .program_mut(program_names::BALANCER)
            .and_then(|p| p.try_into().ok())
            .expect("loaded XDP program")
    }

    /// Attaches the balancer to `iface` in `mode`.
    pub fn attach(&mut self, iface: &str, mode: XdpMode) -> Result<aya::programs::xdp::XdpLinkId> {
        ifindex(iface)?;
        self.balancer_mut()
            .attach(iface, mode)
            .map_err(|source| DatapathError::Program {
                name: program_names::BALANCER,
                source,
            })
    }

    fn map_mut(&mut self, name: &'static str) -> &mut aya::maps::Map {
        self.ebpf.map_mut(name).expect("map is in the object")
    }

    fn map(&self, name: &'static str) -> &aya::maps::Map {
        self.ebpf.map(name).expect("map is in the object")
    }

    fn vip_array_mut(&mut self) -> Result<Array<&mut MapData, VipSlot>> {
        Array::try_from(self.map_mut(map_names::VIPS)).map_err(map_err(map_names::VIPS))
    }

    fn write_vip_slot(&mut self, i: u32, slot: VipSlot) -> Result<()> {
        self.vip_array_mut()?
            .set(i, slot, 0)
            .map_err(map_err(map_names::VIPS))?;
        self.vip_table[i as usize] = slot;
        Ok(())
    }

    /// The probe sequence of `key`, the kernel's: (slot index, slot) pairs.
    fn vip_probe(&self, key: &VipKey) -> impl Iterator<Item = (u32, VipSlot)> + '_ {
        let mask = self.vip_table.len() as u32 - 1;
        lb_common::vip_table_probe(key, mask).map(move |at| (at, self.vip_table[at as usize]))
    }

    fn find_vip_slot(&self, key: &VipKey) -> Option<u32> {
        for (at, slot) in self.vip_probe(key) {
            if slot.key == VIP_SLOT_EMPTY {
                return None;
            }
            if slot.key == *key {
                return Some(at);
            }
        }
        None
    }

    /// Inserts or updates a VIP entry. A new key goes to the first free
    /// slot of its probe sequence in two writes (info under a tombstone
    /// key, then the key), so that a packet reading the slot meanwhile
    /// never pairs the new key with a stale entry.
    pub fn set_vip(&mut self, key: VipKey, info: VipInfo) -> Result<()> {
        self.check("VIP index", info.index, self.sizes.max_vips)?;
        if key == VIP_SLOT_EMPTY || key == VIP_SLOT_TOMBSTONE {
            return Err(DatapathError::OutOfRange {
                what: "VIP address",
                index: key.addr,
                max: u32::MAX,
            });
        }
        if let Some(at) = self.find_vip_slot(&key) {
            return self.write_vip_slot(at, VipSlot { key, info });
        }
        let free = self
            .vip_probe(&key)
            .find(|(_, s)| s.key == VIP_SLOT_EMPTY || s.key == VIP_SLOT_TOMBSTONE)
            .map(|(at, _)| at)
            .ok_or(DatapathError::VipTableFull {
                slots: self.vip_table.len(),
            })?;
        self.write_vip_slot(
            free,
            VipSlot {
                key: VIP_SLOT_TOMBSTONE,
                info,
            },
        )?;
        self.write_vip_slot(free, VipSlot { key, info })
    }

    /// Removes a VIP entry: its key becomes a tombstone (the info stays,
    /// so a concurrent reader sees either the whole old entry or a skip).
    pub fn remove_vip(&mut self, key: &VipKey) -> Result<()> {
        if let Some(at) = self.find_vip_slot(key) {
            let info = self.vip_table[at as usize].info;
            self.write_vip_slot(
                at,
                VipSlot {
                    key: VIP_SLOT_TOMBSTONE,
                    info,
                },
            )?;
        }
        Ok(())
    }

    /// Every VIP entry (services and address markers).
    pub fn vips(&self) -> Result<BTreeMap<VipKey, VipInfo>> {
        Ok(self
            .vip_table
            .iter()
            .filter(|s| s.key != VIP_SLOT_EMPTY && s.key != VIP_SLOT_TOMBSTONE)
            .map(|s| (s.key, s.info))
            .collect())
    }

    fn check(&self, what: &'static str, index: u32, max: u32) -> Result<()> {
        if index >= max {
            return Err(DatapathError::OutOfRange { what, index, max });
        }
        Ok(())
    }

    pub fn set_backend(&mut self, id: u32, backend: Backend) -> Result<()> {
        self.check("backend id", id, self.sizes.backend_slots())?;
        let mut map: Array<&mut MapData, Backend> =
            Array::try_from(self.map_mut(map_names::BACKENDS))
                .map_err(map_err(map_names::BACKENDS))?;
        map.set(id, backend, 0)
            .map_err(map_err(map_names::BACKENDS))
    }

    pub fn backend(&self, id: u32) -> Result<Backend> {
        let map: Array<&MapData, Backend> =
            Array::try_from(self.map(map_names::BACKENDS)).map_err(map_err(map_names::BACKENDS))?;
        map.get(&id, 0).map_err(map_err(map_names::BACKENDS))
    }

    /// Writes `(slot, backend id)` pairs into the ring starting at
    /// `ring_base`: in one `BPF_MAP_UPDATE_BATCH` call (the kernel then
    /// writes the elements one by one, in order, as separate updates
    /// would), or element by element where the kernel has no batch update.
    pub fn write_ring(
        &mut self,
        ring_base: u32,
        slots: impl IntoIterator<Item = (u32, u32)>,
    ) -> Result<usize> {
        let total = self.sizes.max_vips.saturating_mul(self.sizes.ring_size);
        let (mut keys, mut values) = (Vec::new(), Vec::new());
        for (slot, id) in slots {
            let index = ring_base + slot;
            if index >= total {
                return Err(DatapathError::OutOfRange {
                    what: "ring slot",
                    index,
                    max: total,
                });
            }
            keys.push(index);
            values.push(id);
        }
        if keys.is_empty() {
            return Ok(0);
        }
        if self.batch_writes {
            match update_batch_of(self.map_fd(map_names::RINGS), &keys, &values) {
                Ok(()) => return Ok(keys.len()),
                Err(e) if batch_unsupported(&e) => {
                    log::info!(
                        "BPF_MAP_UPDATE_BATCH unsupported ({e}): ring slots written one by one"
                    );
                    self.batch_writes = false;
                }
                Err(e) => {
                    return Err(DatapathError::Io {
                        path: self.pin_dir.join(map_names::RINGS),
                        source: e,
                    });
                }
            }
        }
        self.write_ring_each(&keys, &values)
    }

    /// Writes ring elements one `BPF_MAP_UPDATE_ELEM` call each.
    pub fn write_ring_each(&mut self, keys: &[u32], values: &[u32]) -> Result<usize> {
        let mut map: Array<&mut MapData, u32> =
            Array::try_from(self.map_mut(map_names::RINGS)).map_err(map_err(map_names::RINGS))?;
        for (&index, &id) in keys.iter().zip(values) {
            map.set(index, id, 0).map_err(map_err(map_names::RINGS))?;
        }
        Ok(keys.len())
    }

    /// Whether ring writes use `BPF_MAP_UPDATE_BATCH`; `false` makes them
    /// one call per element (for measurements and tests).
    pub fn set_batch_writes(&mut self, on: bool) {
        self.batch_writes = on;
    }

    /// Whether ring writes use `BPF_MAP_UPDATE_BATCH` now.
    pub fn batch_writes(&self) -> bool {
        self.batch_writes
    }

    fn map_fd(&self, name: &'static str) -> std::os::fd::RawFd {
        use std::os::fd::{AsFd as _, AsRawFd as _};
        let data = match self.map(name) {
            aya::maps::Map::Array(d) => d,
            _ => unreachable!("{name} is a BPF array"),
        };
        data.fd().as_fd().as_raw_fd()
    }

    /// Reads `len` ring slots starting at `ring_base`.
    pub fn read_ring(&self, ring_base: u32, len: u32) -> Result<Vec<u32>> {
        let map: Array<&MapData, u32> =
            Array::try_from(self.map(map_names::RINGS)).map_err(map_err(map_names::RINGS))?;
        (ring_base..ring_base + len)
            .map(|i| map.get(&i, 0).map_err(map_err(map_names::RINGS)))
            .collect()
    }

    /// Makes `ifindex` a redirect target for backends behind another
    /// interface than the one a packet arrived on.
    pub fn add_tx_port(&mut self, ifindex: u32) -> Result<()> {
        if let Some(k) = &self.keeper {
            k.add_egress(ifindex);
        }
        let mut map: DevMapHash<&mut MapData> =
            DevMapHash::try_from(self.map_mut(map_names::TX_PORTS))
                .map_err(map_err(map_names::TX_PORTS))?;
        map.insert(ifindex, ifindex, None, 0).map_err(|e| match e {
            aya::maps::xdp::XdpMapError::MapError(e) => map_err(map_names::TX_PORTS)(e),
            other => DatapathError::TxPort(other.to_string()),
        })
    }

    pub fn conntrack_lookup(&self, key: &FlowKey) -> Result<Option<FlowEntry>> {
        self.hash_lookup(map_names::CONNTRACK, key)
    }

    /// `key`'s value in the hash (or LRU hash) map `name`, if it is there.
    pub(crate) fn hash_lookup<K: aya::Pod, V: aya::Pod>(
        &self,
        name: &'static str,
        key: &K,
    ) -> Result<Option<V>> {
        let map: HashMap<&MapData, K, V> =
            HashMap::try_from(self.map(name)).map_err(map_err(name))?;
        match map.get(key, 0) {
            Ok(v) => Ok(Some(v)),
            Err(aya::maps::MapError::KeyNotFound) => Ok(None),
            Err(e) => Err(map_err(name)(e)),
        }
    }

    /// Every conntrack entry (walks the whole map: for tests and
    /// diagnostics, not for a hot loop).
    pub fn conntrack_entries(&self) -> Result<Vec<(FlowKey, FlowEntry)>> {
        let map: HashMap<&MapData, FlowKey, FlowEntry> =
            HashMap::try_from(self.map(map_names::CONNTRACK))
                .map_err(map_err(map_names::CONNTRACK))?;
        map.iter()
            .collect::<Result<_, _>>()
            .map_err(map_err(map_names::CONNTRACK))
    }

    /// A VIP's counters summed over CPUs.
    pub fn vip_stats(&self, index: u32) -> Result<VipStats> {
        let map: PerCpuArray<&MapData, VipStats> =
            PerCpuArray::try_from(self.map(map_names::VIP_STATS))
                .map_err(map_err(map_names::VIP_STATS))?;
        let per_cpu = map.get(&index, 0).map_err(map_err(map_names::VIP_STATS))?;
        Ok(per_cpu.iter().fold(VipStats::default(), |a, s| VipStats {
            packets: a.packets + s.packets,
            bytes: a.bytes + s.bytes,
            new_flows: a.new_flows + s.new_flows,
            conntrack_hits: a.conntrack_hits + s.conntrack_hits,
            return_packets: a.return_packets + s.return_packets,
            return_bytes: a.return_bytes + s.return_bytes,
            acl_denied: a.acl_denied + s.acl_denied,
            rate_limited: a.rate_limited + s.rate_limited,
        }))
    }

    /// A backend's counters summed over CPUs.
    pub fn backend_stats(&self, id: u32) -> Result<BackendStats> {
        let map: PerCpuArray<&MapData, BackendStats> =
            PerCpuArray::try_from(self.map(map_names::BACKEND_STATS))
                .map_err(map_err(map_names::BACKEND_STATS))?;
        let per_cpu = map.get(&id, 0).map_err(map_err(map_names::BACKEND_STATS))?;
        Ok(per_cpu
            .iter()
            .fold(BackendStats::default(), |a, s| BackendStats {
                packets: a.packets + s.packets,
                bytes: a.bytes + s.bytes,
            }))
    }

    /// Pass/drop counters by reason, summed over CPUs.
    pub fn reason_stats(&self) -> Result<BTreeMap<&'static str, u64>> {
        let map: PerCpuArray<&MapData, u64> =
            PerCpuArray::try_from(self.map(map_names::REASON_STATS))
                .map_err(map_err(map_names::REASON_STATS))?;
        Reason::ALL
            .iter()
            .map(|r| {
                let v = map
                    .get(&(*r as u32), 0)
                    .map_err(map_err(map_names::REASON_STATS))?;
                Ok((r.name(), v.iter().sum()))
            })
            .collect()
    }

    /// Removes the pinned maps (the next load starts empty). The loaded
    /// programs and maps stay usable until `self` is dropped.
    pub fn unpin(&self) -> Result<()> {
        remove_pins(&self.pin_dir)
    }
}

/// `lb run --reset-datapath`: detaches and removes everything pinned in
/// `dir` (links, maps, layout record), logging each pin.
pub fn reset(dir: &Path) -> Result<()> {
    if !is_root() {
        return Err(DatapathError::NotRoot);
    }
    ensure_bpffs()?;
    let removed = pins::reset(dir)?;
    if removed.is_empty() {
        log::info!("--reset-datapath: nothing pinned in {}", dir.display());
    }
    for r in removed {
        log::info!("--reset-datapath: {}/{r}", dir.display());
    }
    Ok(())
}

/// The maps whose sizes come from [`MapSizes`], with their element counts.
pub(crate) fn sized_maps(sizes: MapSizes) -> [(&'static str, u32); 25] {
    [
        (map_names::VIPS, lb_common::vip_table_size(sizes.max_vips)),
        (map_names::VIPS6, lb_common::vip_table_size(sizes.max_vips)),
        (map_names::CONNTRACK6, sizes.conntrack6_entries),
        (map_names::BACKENDS, sizes.backend_slots()),
        (
            map_names::RINGS,
            sizes.max_vips.saturating_mul(sizes.ring_size),
        ),
        (map_names::CONNTRACK, sizes.conntrack_entries),
        (map_names::VIP_STATS, sizes.max_vips),
        (map_names::BACKEND_STATS, sizes.backend_slots()),
        (map_names::NAT_FWD, sizes.nat_entries),
        (map_names::NAT_REV, sizes.nat_entries),
        (map_names::NAT_FWD6, sizes.nat_entries),
        (map_names::NAT_REV6, sizes.nat_entries),
        (map_names::NAT_SNAT, sizes.max_vips),
        (map_names::ACL4, sizes.acl_entries),
        (map_names::ACL6, sizes.acl_entries),
        (map_names::VIP_ACL, sizes.max_vips),
        (map_names::SYN_GUARD, sizes.max_vips),
        (map_names::SYN_FLOOD_UNTIL, sizes.max_vips),
        (map_names::RATE_LIMITS, sizes.max_vips),
        (map_names::RATE_VIP, sizes.max_vips),
        (map_names::SCHED, sizes.max_vips),
        (
            map_names::SCHED_SLOTS,
            sizes
                .max_vips
                .saturating_mul(lb_common::sched::SCHED_SLOTS_PER_VIP),
        ),
        (map_names::SCHED_RR, sizes.max_vips),
        (map_names::LC_ACTIVE, sizes.backend_slots()),
        (map_names::LC_CORRECTION, sizes.backend_slots()),
    ]
}

/// Every map the object pins by name, as the loader would create it with
/// `sizes`: what pinned maps must match to be reused.
pub fn pinned_map_specs(sizes: MapSizes) -> Result<Vec<pins::MapSpec>> {
    let obj = aya_obj::Object::parse(OBJECT).map_err(|e| DatapathError::Object(e.to_string()))?;
    let sized = sized_maps(sizes);
    let mut specs: Vec<_> = obj
        .maps
        .iter()
        .filter(|(_, m)| m.pinning() == aya_obj::maps::PinningType::ByName)
        .map(|(name, m)| pins::MapSpec {
            name: name.clone(),
            map_type: m.map_type(),
            key_size: m.key_size(),
            value_size: m.value_size(),
            max_entries: sized
                .iter()
                .find(|(n, _)| n == name)
                .map_or(m.max_entries(), |(_, v)| *v),
        })
        .collect();
    specs.sort_by(|a, b| a.name.cmp(&b.name));
    Ok(specs)
}

/// Removes a pin directory and everything pinned in it.
pub fn remove_pins(dir: &Path) -> Result<()> {
    match fs::remove_dir_all(dir) {
        Ok(()) => Ok(()),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(()),
        Err(source) => Err(DatapathError::Io {
            path: dir.into(),
            source,
        }),
    }
}

/// Builds a backend map entry (an IPv6 address gives the entry of
/// [`backend_entry6`]).
pub fn backend_entry(
    addr: impl Into<IpAddr>,
    ifindex: u32,
    vip_index: u32,
    usable: bool,
    dst_mac: [u8; 6],
    src_mac: [u8; 6],
) -> Backend {
    let addr = match addr.into() {
        IpAddr::V4(a) => a,
        IpAddr::V6(a) => return backend_entry6(a, ifindex, vip_index, usable, dst_mac, src_mac),
    };
    Backend {
        addr: u32::from(addr).to_be(),
        ifindex,
        vip_index,
        flags: if usable {
            lb_common::BACKEND_FLAG_USABLE
        } else {
            0
        },
        dst_mac,
        src_mac,
        encap_src: 0,
        addr6: [0; 4],
        encap_src6: [0; 4],
        port: 0,
        _pad: 0,
    }
}
