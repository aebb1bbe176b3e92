//! The backends' decapsulation program (`lb_decap`, the `lb-decap` object
//! of lb-ebpf): loading it, its maps (allow-lists, GUE port, counters),
//! attaching it, and the pins `lb decap` keeps per interface under
//! `/sys/fs/bpf/lb-decap/<IF>/`. No agent runs on a backend: the pinned
//! link keeps the program attached, and every `lb decap` command works on
//! the pins directly.

use std::{
    collections::BTreeSet,
    fs,
    net::IpAddr,
    path::{Path, PathBuf},
};

use anyhow::Context as _;
use aya::{
    Ebpf, EbpfLoader,
    maps::{Array, LpmTrie, Map, MapData, PerCpuArray, lpm_trie::Key},
    programs::{Xdp, XdpMode, links::FdLink},
};
use lb_common::decap::{
    DecapConfig, DecapReason, INLINE_PREFIXES, InlinePrefix4, InlinePrefix6, PROGRAM, USE_TRIE,
    map_names,
};

use crate::datapath;

mod cidr;
pub mod cli;

pub use cidr::{Cidr, parse_allow_list};

/// The compiled decap object, built by build.rs next to the balancer's.
pub(crate) static OBJECT: &[u8] =
    aya::include_bytes_aligned!(concat!(env!("OUT_DIR"), "/lb-decap"));

/// Where `lb decap` pins, one directory per interface (see [`pin_root`]).
pub const PIN_ROOT: &str = "/sys/fs/bpf/lb-decap";
/// The pinned link's name in an interface's directory.
pub const LINK_PIN: &str = "link";
/// Prefix of the directories under [`PIN_ROOT`] that belong to other
/// network namespaces than the host's.
const NETNS_PREFIX: &str = "netns-";

/// The directory holding this network namespace's interface directories.
/// bpffs is one per host, interface names are one per namespace: two
/// namespaces (containers, test namespaces) may both have an `eth0`. The
/// host's own namespace uses [`PIN_ROOT`] itself; any other uses
/// `PIN_ROOT/netns-<inode of its namespace>` (the calling thread's: a
/// test may enter a namespace on one thread only).
pub fn pin_root() -> PathBuf {
    use std::os::unix::fs::MetadataExt as _;
    let inode = |p: &str| fs::metadata(p).map(|m| m.ino()).ok();
    let Some(own) = inode("/proc/thread-self/ns/net") else {
        return PathBuf::from(PIN_ROOT);
    };
    // The host's namespace: init's, when /proc/1 may be read (a sandbox
    // may forbid it), else the inode the kernel gives the initial
    // namespace (fixed since Linux 6.x; older kernels number it like any
    // other, and the host then gets a netns- directory of its own too).
    let host = inode("/proc/1/ns/net").unwrap_or(INIT_NET_INODE);
    if own == host {
        PathBuf::from(PIN_ROOT)
    } else {
        Path::new(PIN_ROOT).join(format!("{NETNS_PREFIX}{own}"))
    }
}

/// `PROC_NET_INIT_INO` (include/linux/proc_ns.h).
const INIT_NET_INODE: u64 = 0xEFFF_FFF9;

pub fn pin_dir(iface: &str) -> PathBuf {
    pin_root().join(iface)
}

/// Creates (or checks) [`PIN_ROOT`] and this namespace's [`pin_root`].
pub(super) fn secure_pin_root() -> Result<()> {
    crate::pins::secure_dir(Path::new(PIN_ROOT), false)?;
    let root = pin_root();
    if root != Path::new(PIN_ROOT) {
        crate::pins::secure_dir(&root, false)?;
    }
    Ok(())
}

type Result<T> = anyhow::Result<T>;

/// What `lb decap attach` asks for.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Settings {
    pub allow: Vec<Cidr>,
    /// Host order; 0 turns GUE off.
    pub gue_port: u16,
}

/// What [`DecapMaps::apply`] changed.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Applied {
    pub added: Vec<Cidr>,
    pub removed: Vec<Cidr>,
    /// The previous GUE port, when it changed.
    pub old_port: Option<u16>,
}

/// The program's maps, owned (from a fresh load or from their pins).
pub struct DecapMaps {
    allow_v4: LpmTrie<MapData, [u8; 4], u32>,
    allow_v6: LpmTrie<MapData, [u8; 16], u32>,
    config: Array<MapData, DecapConfig>,
    stats: PerCpuArray<MapData, u64>,
}

fn with_name<T, E: std::error::Error + Send + Sync + 'static>(
    name: &str,
    r: std::result::Result<T, E>,
) -> Result<T> {
    r.map_err(|e| anyhow::Error::new(e).context(format!("map {name}")))
}

impl DecapMaps {
    fn from_maps(mut take: impl FnMut(&'static str) -> Result<Map>) -> Result<Self> {
        let (v4, v6, cfg, st) = (
            map_names::ALLOW_V4,
            map_names::ALLOW_V6,
            map_names::CONFIG,
            map_names::STATS,
        );
        Ok(Self {
            allow_v4: with_name(v4, LpmTrie::try_from(take(v4)?))?,
            allow_v6: with_name(v6, LpmTrie::try_from(take(v6)?))?,
            config: match Array::try_from(take(cfg)?) {
                Err(aya::maps::MapError::InvalidValueSize { size, expected }) => anyhow::bail!(
                    "map {cfg}: its elements have {size} bytes, this lb's have {expected} \
                     (pinned by another lb version): detach this interface with \
                     `lb decap detach` and attach it again"
                ),
                r => with_name(cfg, r)?,
            },
            stats: with_name(st, PerCpuArray::try_from(take(st)?))?,
        })
    }

    /// The maps pinned in `dir` by `lb decap attach`.
    pub fn from_pins(dir: &Path) -> Result<Self> {
        Self::from_maps(|name| {
            let path = dir.join(name);
            let data = with_name(name, MapData::from_pin(&path))?;
            with_name(name, Map::from_map_data(data))
        })
    }

    /// Makes the maps say `s`: new prefixes are inserted before stale
    /// ones are removed, so a source allowed before and after is never
    /// refused meanwhile. The tries always hold the whole list; a list of
    /// up to [`INLINE_PREFIXES`] per family is also copied into the
    /// config, which the program checks instead of the trie.
    pub fn apply(&mut self, s: &Settings) -> Result<Applied> {
        let have: BTreeSet<Cidr> = self.allow_list()?.into_iter().collect();
        let want: BTreeSet<Cidr> = s.allow.iter().copied().collect();
        let mut applied = Applied::default();
        for c in want.difference(&have) {
            self.insert(c)?;
            applied.added.push(*c);
        }
        let old = self.config()?;
        let new = config_for(&want, s.gue_port);
        if old != new {
            // The program may read the element while it is rewritten: the
            // counts change alone (a word each) and the entries only while
            // the counts say "trie", which holds both lists meanwhile.
            let steps = [
                DecapConfig {
                    gue_port: new.gue_port,
                    ..old.trie_only()
                },
                new.trie_only(),
                new,
            ];
            let mut last = old;
            for step in steps {
                if step != last {
                    with_name(map_names::CONFIG, self.config.set(0, step, 0))?;
                    last = step;
                }
            }
        }
        if old.port() != s.gue_port {
            applied.old_port = Some(old.port());
        }
        for c in have.difference(&want) {
            self.remove(c)?;
            applied.removed.push(*c);
        }
        Ok(applied)
    }

    fn config(&self) -> Result<DecapConfig> {
        with_name(map_names::CONFIG, self.config.get(&0, 0))
    }

    fn insert(&mut self, c: &Cidr) -> Result<()> {
        let len = c.prefix_len as u32;
        match c.addr {
            IpAddr::V4(a) => with_name(
                map_names::ALLOW_V4,
                self.allow_v4.insert(&Key::new(len, a.octets()), 1, 0),
            ),
            IpAddr::V6(a) => with_name(
                map_names::ALLOW_V6,
                self.allow_v6.insert(&Key::new(len, a.octets()), 1, 0),
            ),
        }
    }

    fn remove(&mut self, c: &Cidr) -> Result<()> {
        let len = c.prefix_len as u32;
        match c.addr {
            IpAddr::V4(a) => with_name(
                map_names::ALLOW_V4,
                self.allow_v4.remove(&Key::new(len, a.octets())),
            ),
            IpAddr::V6(a) => with_name(
                map_names::ALLOW_V6,
                self.allow_v6.remove(&Key::new(len, a.octets())),
            ),
        }
    }

    /// The allowed prefixes, IPv4 first, sorted.
    pub fn allow_list(&self) -> Result<Vec<Cidr>> {
        let mut out = BTreeSet::new();
        for k in self.allow_v4.keys() {
            let k = with_name(map_names::ALLOW_V4, k)?;
            out.insert(Cidr {
                addr: IpAddr::from(k.data()),
                prefix_len: k.prefix_len() as u8,
            });
        }
        for k in self.allow_v6.keys() {
            let k = with_name(map_names::ALLOW_V6, k)?;
            out.insert(Cidr {
                addr: IpAddr::from(k.data()),
                prefix_len: k.prefix_len() as u8,
            });
        }
        Ok(out.into_iter().collect())
    }

    /// The GUE port, host order (0: GUE off).
    pub fn gue_port(&self) -> Result<u16> {
        Ok(self.config()?.port())
    }

    /// Whether the program checks each family's list inline (IPv4, IPv6)
    /// rather than in the trie.
    pub fn inline_lists(&self) -> Result<(bool, bool)> {
        let c = self.config()?;
        Ok((c.v4_count != USE_TRIE, c.v6_count != USE_TRIE))
    }

    /// Every counter, summed over CPUs, in [`DecapReason::ALL`] order.
    pub fn counters(&self) -> Result<Vec<(DecapReason, u64)>> {
        DecapReason::ALL
            .iter()
            .map(|r| {
                let per_cpu = with_name(map_names::STATS, self.stats.get(&(*r as u32), 0))?;
                Ok((*r, per_cpu.iter().sum()))
            })
            .collect()
    }
}

/// The config element for `allow` and `port` (host order): each family's
/// prefixes inline when they fit, else [`USE_TRIE`].
fn config_for(allow: &BTreeSet<Cidr>, port: u16) -> DecapConfig {
    let mut c = DecapConfig::new(port);
    let (mut n4, mut n6) = (0usize, 0usize);
    for cidr in allow {
        match cidr.addr {
            IpAddr::V4(a) => {
                if n4 < INLINE_PREFIXES {
                    c.v4[n4] = InlinePrefix4::new(a.octets(), cidr.prefix_len);
                }
                n4 += 1;
            }
            IpAddr::V6(a) => {
                if n6 < INLINE_PREFIXES {
                    c.v6[n6] = InlinePrefix6::new(a.octets(), cidr.prefix_len);
                }
                n6 += 1;
            }
        }
    }
    let count = |n: usize| {
        if n > INLINE_PREFIXES {
            USE_TRIE
        } else {
            n as u32
        }
    };
    c.v4_count = count(n4);
    c.v6_count = count(n6);
    if c.v4_count == USE_TRIE {
        c.v4 = Default::default();
    }
    if c.v6_count == USE_TRIE {
        c.v6 = Default::default();
    }
    c
}

/// The loaded program with its maps.
pub struct DecapProgram {
    ebpf: Ebpf,
    pub maps: DecapMaps,
}

impl DecapProgram {
    /// Loads the object with its maps pinned in `dir` (created; maps
    /// already pinned there are reused).
    pub fn load_pinned(dir: &Path) -> Result<Self> {
        if !datapath::is_root() {
            anyhow::bail!("lb decap needs root (CAP_BPF, CAP_NET_ADMIN): run it as root");
        }
        datapath::ensure_bpffs()?;
        secure_pin_root()?;
        crate::pins::secure_dir(dir, true)?;
        let mut ebpf = EbpfLoader::new()
            .default_map_pin_directory(dir)
            .load(OBJECT)
            .context("loading the lb-decap object")?;
        let prog: &mut Xdp = ebpf
            .program_mut(PROGRAM)
            .expect("lb_decap is in the object")
            .try_into()
            .with_context(|| format!("program {PROGRAM}"))?;
        prog.load().with_context(|| format!("loading {PROGRAM}"))?;
        let maps = DecapMaps::from_maps(|name| {
            ebpf.take_map(name)
                .with_context(|| format!("map {name} is not in the lb-decap object"))
        })?;
        Ok(Self { ebpf, maps })
    }

    /// Loads the object with maps nobody else can open (pinned only while
    /// loading): for packet-level tests and benchmarks.
    pub fn load_private() -> Result<Self> {
        use std::sync::atomic::{AtomicU32, Ordering};
        static N: AtomicU32 = AtomicU32::new(0);
        // Outside PIN_ROOT, whose entries are interfaces (bpffs refuses
        // names starting with a dot).
        let dir = Path::new(datapath::BPFFS).join(format!(
            "lb-decap-private-{}-{}",
            std::process::id(),
            N.fetch_add(1, Ordering::Relaxed)
        ));
        let loaded = Self::load_pinned(&dir);
        remove_dir(&dir)?;
        loaded
    }

    pub fn program(&self) -> &Xdp {
        self.ebpf
            .program(PROGRAM)
            .and_then(|p| p.try_into().ok())
            .expect("loaded XDP program")
    }

    /// Attaches to `ifindex` in `mode` through a BPF link (which
    /// `lb decap` pins so the program outlives the command).
    pub fn attach(
        &mut self,
        iface: &str,
        mode: XdpMode,
    ) -> std::result::Result<FdLink, AttachError> {
        let prog: &mut Xdp = self
            .ebpf
            .program_mut(PROGRAM)
            .and_then(|p| p.try_into().ok())
            .expect("loaded XDP program");
        let id = prog.attach(iface, mode).map_err(AttachError::from)?;
        let link = prog.take_link(id).map_err(AttachError::Other)?;
        FdLink::try_from(link).map_err(|_| AttachError::NoBpfLink)
    }
}

/// Why attaching failed.
#[derive(Debug, thiserror::Error)]
pub enum AttachError {
    /// The interface already runs an XDP program.
    #[error("the interface already has an XDP program attached")]
    Occupied,
    #[error("the kernel attached without a BPF link (Linux >= 5.9 needed), which cannot be pinned")]
    NoBpfLink,
    #[error(transparent)]
    Other(aya::programs::ProgramError),
}

impl From<aya::programs::ProgramError> for AttachError {
    fn from(e: aya::programs::ProgramError) -> Self {
        use aya::programs::ProgramError;
        if let ProgramError::SyscallError(s) = &e
            && matches!(s.io_error.raw_os_error(), Some(libc::EBUSY | libc::EEXIST))
        {
            return AttachError::Occupied;
        }
        AttachError::Other(e)
    }
}

/// Removes `dir` and everything pinned in it (a missing `dir` is fine).
pub fn remove_dir(dir: &Path) -> Result<()> {
    match fs::remove_dir_all(dir) {
        Ok(()) => Ok(()),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(()),
        Err(e) => Err(anyhow::Error::new(e).context(format!("removing {}", dir.display()))),
    }
}

/// This namespace's interfaces with a pin directory, sorted.
pub fn pinned_interfaces() -> Result<Vec<String>> {
    let mut out = Vec::new();
    let root = pin_root();
    let entries = match fs::read_dir(&root) {
        Ok(e) => e,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(out),
        Err(e) => {
            return Err(anyhow::Error::new(e).context(format!("reading {}", root.display())));
        }
    };
    for e in entries {
        let e = e.with_context(|| format!("reading {}", root.display()))?;
        let name = e.file_name().to_string_lossy().into_owned();
        // Other namespaces' directories, in the host's root.
        if e.path().is_dir() && !name.starts_with(NETNS_PREFIX) {
            out.push(name);
        }
    }
    out.sort();
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn set(list: &[&str]) -> BTreeSet<Cidr> {
        list.iter().map(|s| s.parse().unwrap()).collect()
    }

    #[test]
    fn short_lists_go_inline_and_long_ones_to_the_trie() {
        let c = config_for(&set(&["198.18.1.0/24", "2001:2:0:1::/64"]), 6080);
        assert_eq!((c.v4_count, c.v6_count, c.port()), (1, 1, 6080));
        assert!(c.v4[0].matches([198, 18, 1, 77]));
        assert!(!c.v4[0].matches([198, 18, 2, 77]));
        let mut a6 = [0u8; 16];
        a6[..8].copy_from_slice(&[0x20, 0x01, 0, 2, 0, 0, 0, 1]);
        a6[15] = 9;
        assert!(c.v6[0].matches(a6));

        let eight: Vec<String> = (0..8).map(|i| format!("198.18.{i}.0/24")).collect();
        let refs: Vec<&str> = eight.iter().map(String::as_str).collect();
        let c = config_for(&set(&refs), 6080);
        assert_eq!((c.v4_count, c.v6_count), (8, 0));
        assert!(c.v4[7].matches([198, 18, 7, 1]));

        let nine: Vec<String> = (0..9).map(|i| format!("198.18.{i}.0/24")).collect();
        let refs: Vec<&str> = nine.iter().map(String::as_str).collect();
        let c = config_for(&set(&refs), 6080);
        assert_eq!((c.v4_count, c.v6_count), (USE_TRIE, 0));
    }
}
