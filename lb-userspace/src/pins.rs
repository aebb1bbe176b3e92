//! The pinned state under `/sys/fs/bpf/lb/<instance>/` as files: the
//! directory's safety (0700, owned by the agent's user), the layout record
//! (the `LAYOUT` pin: what the maps were made with), the check that
//! refuses pins of another layout, `--reset-datapath`, and which device a
//! pinned XDP link is attached to.

use std::{
    ffi::CString,
    fs, io,
    os::{
        fd::{AsRawFd as _, FromRawFd as _, OwnedFd},
        unix::{
            ffi::OsStrExt as _,
            fs::{DirBuilderExt as _, MetadataExt as _, PermissionsExt as _},
        },
    },
    path::{Path, PathBuf},
};

use aya::maps::{Array, Map, MapData};
use thiserror::Error;

/// The layout record's pin, next to the maps.
pub const LAYOUT_PIN: &str = "LAYOUT";
/// Pinned XDP links are named `link_<interface>`.
pub const LINK_PREFIX: &str = "link_";

/// The record is text (`key value` lines, readable with `bpftool map dump
/// pinned .../LAYOUT`) in one fixed-size array element.
const RECORD_BYTES: usize = 1024;
type Record = [u8; RECORD_BYTES];

#[derive(Debug, Error)]
pub enum PinsError {
    #[error(
        "{path}: {problem}. lb keeps its pinned maps and links in directories that only their owner (uid {euid}) can change: fix it (chown {euid}:{euid} {path}; chmod 700 {path}) or remove it"
    )]
    Unsafe {
        path: PathBuf,
        problem: String,
        euid: u32,
    },
    #[error("{path}: {source}")]
    Io { path: PathBuf, source: io::Error },
    #[error(
        "the pinned data path in {dir} has no layout record ({LAYOUT_PIN}): it was made by an older lb or by hand ({found}), so whether its maps fit this agent cannot be checked. {RESET_ADVICE}"
    )]
    NoRecord { dir: PathBuf, found: String },
    #[error(
        "the pinned data path in {dir} has an unreadable layout record: {problem}. {RESET_ADVICE}"
    )]
    BadRecord { dir: PathBuf, problem: String },
    #[error("{}", mismatch_message(dir, diffs))]
    Mismatch { dir: PathBuf, diffs: Vec<String> },
    #[error("{path}: {source}")]
    Map {
        path: PathBuf,
        source: aya::maps::MapError,
    },
}

const RESET_ADVICE: &str = "To start over, run `lb run --reset-datapath`: it detaches lb from the interfaces pinned there and removes the pinned maps (established flows are then balanced afresh and may move)";

fn mismatch_message(dir: &Path, diffs: &[String]) -> String {
    let mut s = format!(
        "the pinned data path in {} was made with another layout than this agent's:",
        dir.display()
    );
    for d in diffs {
        s.push_str("\n  ");
        s.push_str(d);
    }
    s.push_str(
        "\nTo keep it (and its established flows), start the lb version and [agent] settings that made it. ",
    );
    s.push_str(RESET_ADVICE);
    s.push('.');
    s
}

pub type Result<T, E = PinsError> = std::result::Result<T, E>;

fn io_err(path: &Path) -> impl FnOnce(io::Error) -> PinsError + '_ {
    move |source| PinsError::Io {
        path: path.into(),
        source,
    }
}

fn euid() -> u32 {
    // SAFETY: geteuid has no preconditions.
    unsafe { libc::geteuid() }
}

/// Makes sure `dir` is a directory owned by this user that nobody else can
/// write to, creating it (mode 0700, whatever the umask) if it is missing.
/// With `tighten`, an existing directory that others may read or enter is
/// made 0700.
pub fn secure_dir(dir: &Path, tighten: bool) -> Result<()> {
    let euid = euid();
    let unsafe_dir = |problem: String| PinsError::Unsafe {
        path: dir.into(),
        problem,
        euid,
    };
    let meta = match fs::symlink_metadata(dir) {
        Ok(m) => m,
        Err(e) if e.kind() == io::ErrorKind::NotFound => {
            match fs::DirBuilder::new().mode(0o700).create(dir) {
                Ok(()) => {}
                // Another process made it meanwhile: check it like any other.
                Err(e) if e.kind() == io::ErrorKind::AlreadyExists => {}
                Err(e) => return Err(io_err(dir)(e)),
            }
            // The umask may have removed owner bits: set the mode exactly.
            let m = fs::symlink_metadata(dir).map_err(io_err(dir))?;
            if m.is_dir() && m.uid() == euid && m.mode() & 0o7777 != 0o700 {
                fs::set_permissions(dir, fs::Permissions::from_mode(0o700)).map_err(io_err(dir))?;
            }
            fs::symlink_metadata(dir).map_err(io_err(dir))?
        }
        Err(e) => return Err(io_err(dir)(e)),
    };
    if meta.file_type().is_symlink() {
        return Err(unsafe_dir("is a symbolic link".into()));
    }
    if !meta.is_dir() {
        return Err(unsafe_dir("is not a directory".into()));
    }
    if meta.uid() != euid {
        return Err(unsafe_dir(format!(
            "is owned by uid {}, not by uid {euid} that runs lb",
            meta.uid()
        )));
    }
    let mode = meta.mode() & 0o7777;
    if mode & 0o022 != 0 {
        return Err(unsafe_dir(format!(
            "has mode {mode:o}: others than its owner can create or replace pins in it"
        )));
    }
    if tighten && mode & 0o077 != 0 {
        fs::set_permissions(dir, fs::Permissions::from_mode(0o700)).map_err(io_err(dir))?;
        log::info!("{}: mode {mode:o} tightened to 700", dir.display());
    }
    Ok(())
}

/// What a pin directory's maps were made with: the layout version, the
/// configured sizes and the sizes of the structs stored in them.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Layout(Vec<(String, String)>);

/// The `[agent]` settings a layout records (named in a mismatch).
const SETTINGS: &[&str] = &[
    "max_vips",
    "max_backends",
    "ring_size",
    "conntrack_entries",
    "nat_entries",
    "acl_entries",
];

impl Layout {
    pub fn of(sizes: crate::map_sizes::MapSizes) -> Self {
        use std::mem::size_of;

        use lb_common::{
            Backend, BackendStats, FlowEntry, FlowKey, FlowKey6, Reason, VipSlot, VipSlot6,
            VipStats,
        };
        let e = |k: &str, v: u64| (k.to_string(), v.to_string());
        Layout(vec![
            e("layout_version", lb_common::LAYOUT_VERSION.into()),
            e("max_vips", sizes.max_vips.into()),
            e("max_backends", sizes.max_backends.into()),
            e("ring_size", sizes.ring_size.into()),
            e("conntrack_entries", sizes.conntrack_entries.into()),
            e("conntrack6_entries", sizes.conntrack6_entries.into()),
            e("nat_entries", sizes.nat_entries.into()),
            e("acl_entries", sizes.acl_entries.into()),
            e("reasons", Reason::COUNT.into()),
            e("size_of_VipSlot", size_of::<VipSlot>() as u64),
            e("size_of_Backend", size_of::<Backend>() as u64),
            e("size_of_FlowKey", size_of::<FlowKey>() as u64),
            e("size_of_VipSlot6", size_of::<VipSlot6>() as u64),
            e("size_of_FlowKey6", size_of::<FlowKey6>() as u64),
            e("size_of_FlowEntry", size_of::<FlowEntry>() as u64),
            e("size_of_VipStats", size_of::<VipStats>() as u64),
            e("size_of_BackendStats", size_of::<BackendStats>() as u64),
            e("size_of_NatFwd", size_of::<lb_common::nat::NatFwd>() as u64),
            e("size_of_NatRev", size_of::<lb_common::nat::NatRev>() as u64),
        ])
    }

    pub fn get(&self, key: &str) -> Option<&str> {
        self.0
            .iter()
            .find(|(k, _)| k == key)
            .map(|(_, v)| v.as_str())
    }

    /// `key value` lines.
    pub fn render(&self) -> String {
        self.0.iter().map(|(k, v)| format!("{k} {v}\n")).collect()
    }

    pub fn parse(text: &str) -> Result<Self, String> {
        let mut entries = Vec::new();
        for (n, line) in text.lines().enumerate() {
            if line.trim().is_empty() {
                continue;
            }
            let (k, v) = line
                .split_once(' ')
                .filter(|(k, v)| !k.is_empty() && !v.is_empty() && !v.contains(' '))
                .ok_or_else(|| format!("line {}: {line:?} is not `key value`", n + 1))?;
            if entries.iter().any(|(e, _): &(String, String)| e == k) {
                return Err(format!("line {}: {k} recorded twice", n + 1));
            }
            entries.push((k.to_string(), v.to_string()));
        }
        if entries.is_empty() {
            return Err("the record is empty".into());
        }
        Ok(Layout(entries))
    }

    /// One line per difference between what `pinned` records and what
    /// this agent wants, naming the setting to change where there is one.
    pub fn diff(pinned: &Layout, wanted: &Layout) -> Vec<String> {
        let mut out = Vec::new();
        for (k, w) in &wanted.0 {
            let why = if SETTINGS.contains(&k.as_str()) {
                format!("[agent] {k}")
            } else if k == "conntrack6_entries" {
                // Sized from the IPv4 setting until IPv6 has its own.
                "[agent] conntrack_entries".to_string()
            } else {
                "made by another lb version".to_string()
            };
            match pinned.get(k) {
                Some(p) if p == w => {}
                Some(p) => out.push(format!("{k}: pinned {p}, this agent {w} ({why})")),
                None => out.push(format!("{k}: not recorded, this agent {w} ({why})")),
            }
        }
        for (k, p) in &pinned.0 {
            if wanted.get(k).is_none() {
                out.push(format!(
                    "{k}: pinned {p}, unknown to this agent (made by another lb version)"
                ));
            }
        }
        out
    }

    fn to_record(&self) -> Record {
        let text = self.render();
        assert!(text.len() < RECORD_BYTES, "layout record too long");
        let mut r = [0u8; RECORD_BYTES];
        r[..text.len()].copy_from_slice(text.as_bytes());
        r
    }

    fn from_record(r: &Record) -> Result<Self, String> {
        let end = r.iter().position(|&b| b == 0).unwrap_or(RECORD_BYTES);
        let text = std::str::from_utf8(&r[..end]).map_err(|_| "the record is not UTF-8")?;
        Self::parse(text)
    }
}

/// What [`check`] found in a pin directory.
#[derive(Debug, PartialEq, Eq)]
pub enum Found {
    /// Nothing pinned: a fresh start.
    Empty,
    /// Pins whose record matches this agent's layout.
    Matching,
}

/// A map the object pins, as the kernel would hold it with this agent's
/// sizes.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct MapSpec {
    pub name: String,
    pub map_type: u32,
    pub key_size: u32,
    pub value_size: u32,
    pub max_entries: u32,
}

/// Checks what is pinned in `dir` against `wanted` (the record) and `maps`
/// (each pinned map's type and sizes as the kernel reports them), before
/// anything is loaded: pins of another layout are refused with what
/// differs. Missing maps are fine (the loader creates them).
pub fn check(dir: &Path, wanted: &Layout, maps: &[MapSpec]) -> Result<Found> {
    let names = pin_names(dir)?;
    if names.is_empty() {
        return Ok(Found::Empty);
    }
    if !names.iter().any(|n| n == LAYOUT_PIN) {
        return Err(PinsError::NoRecord {
            dir: dir.into(),
            found: names.join(", "),
        });
    }
    let pinned = read_record(dir)?;
    let mut diffs = Layout::diff(&pinned, wanted);
    for spec in maps {
        if !names.contains(&spec.name) {
            continue;
        }
        let path = dir.join(&spec.name);
        let info = aya::maps::MapInfo::from_pin(&path).map_err(|source| PinsError::Map {
            path: path.clone(),
            source,
        })?;
        let map_type = info.map_type().map(|t| t as u32).unwrap_or(u32::MAX);
        let have = [
            ("type", map_type, spec.map_type),
            ("key size", info.key_size(), spec.key_size),
            ("value size", info.value_size(), spec.value_size),
            ("max_entries", info.max_entries(), spec.max_entries),
        ];
        for (what, p, w) in have {
            if p != w {
                diffs.push(format!(
                    "map {} {what}: pinned {p}, this agent {w}",
                    spec.name
                ));
            }
        }
    }
    if diffs.is_empty() {
        Ok(Found::Matching)
    } else {
        Err(PinsError::Mismatch {
            dir: dir.into(),
            diffs,
        })
    }
}

/// Names in `dir` (none if it does not exist).
fn pin_names(dir: &Path) -> Result<Vec<String>> {
    let entries = match fs::read_dir(dir) {
        Ok(e) => e,
        Err(e) if e.kind() == io::ErrorKind::NotFound => return Ok(Vec::new()),
        Err(e) => return Err(io_err(dir)(e)),
    };
    let mut names = entries
        .map(|e| e.map(|e| e.file_name().to_string_lossy().into_owned()))
        .collect::<io::Result<Vec<_>>>()
        .map_err(io_err(dir))?;
    names.sort();
    Ok(names)
}

/// Reads the layout record pinned in `dir`.
pub fn read_record(dir: &Path) -> Result<Layout> {
    let path = dir.join(LAYOUT_PIN);
    let map_err = |source| PinsError::Map {
        path: path.clone(),
        source,
    };
    let bad = |problem: String| PinsError::BadRecord {
        dir: dir.into(),
        problem,
    };
    let data = MapData::from_pin(&path).map_err(map_err)?;
    let array: Array<MapData, Record> = Array::try_from(Map::Array(data)).map_err(|e| {
        bad(format!(
            "{LAYOUT_PIN} is not a {RECORD_BYTES}-byte array ({e})"
        ))
    })?;
    let record = array.get(&0, 0).map_err(map_err)?;
    Layout::from_record(&record).map_err(bad)
}

/// Pins `layout` as the record of `dir` (a fresh directory).
pub fn write_record(dir: &Path, layout: &Layout) -> Result<()> {
    let path = dir.join(LAYOUT_PIN);
    let map_err = |source| PinsError::Map {
        path: path.clone(),
        source,
    };
    let mut array: Array<MapData, Record> = Array::create(1, 0).map_err(map_err)?;
    array.set(0, layout.to_record(), 0).map_err(map_err)?;
    array.pin(&path).map_err(|e| PinsError::Io {
        path: path.clone(),
        source: io::Error::other(e),
    })
}

/// `lb run --reset-datapath`: removes everything pinned in `dir` (links,
/// which detaches lb from their interfaces once no agent holds them, maps,
/// the record). Returns one line per pin removed.
pub fn reset(dir: &Path) -> Result<Vec<String>> {
    let names = pin_names(dir)?;
    let mut done = Vec::new();
    for name in &names {
        let path = dir.join(name);
        let what = if let Some(iface) = name.strip_prefix(LINK_PREFIX) {
            match xdp_link_target(&path) {
                Ok(LinkTarget::Ifindex(i)) => format!(
                    "{name}: XDP link detached from ifindex {i} ({})",
                    ifname(i).unwrap_or_else(|| format!("pinned for {iface}"))
                ),
                Ok(LinkTarget::Severed) => {
                    format!("{name}: XDP link removed (its interface was gone)")
                }
                Err(e) => format!("{name}: removed ({e})"),
            }
        } else {
            format!("{name}: removed")
        };
        fs::remove_file(&path).map_err(io_err(&path))?;
        done.push(what);
    }
    match fs::remove_dir(dir) {
        Ok(()) => {}
        Err(e) if e.kind() == io::ErrorKind::NotFound => {}
        Err(e) => return Err(io_err(dir)(e)),
    }
    Ok(done)
}

/// The pinned XDP links in `dir`: (interface name from the pin name, path).
pub fn link_pins(dir: &Path) -> Result<Vec<(String, PathBuf)>> {
    Ok(pin_names(dir)?
        .into_iter()
        .filter_map(|n| {
            let iface = n.strip_prefix(LINK_PREFIX)?.to_string();
            Some((iface, dir.join(&n)))
        })
        .collect())
}

/// The device a pinned XDP link is attached to, as the kernel says.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum LinkTarget {
    /// Attached to this ifindex (in the namespace the link was made in).
    Ifindex(u32),
    /// Its device was deleted: the link is attached to nothing and cannot
    /// be updated ("Link has been severed").
    Severed,
}

/// The name of `ifindex` in this namespace.
pub fn ifname(ifindex: u32) -> Option<String> {
    let mut buf = [0 as libc::c_char; libc::IF_NAMESIZE];
    // SAFETY: buf has IF_NAMESIZE bytes, as if_indextoname requires.
    let p = unsafe { libc::if_indextoname(ifindex, buf.as_mut_ptr()) };
    if p.is_null() {
        return None;
    }
    // SAFETY: on success buf holds a NUL-terminated name.
    let name = unsafe { std::ffi::CStr::from_ptr(buf.as_ptr()) };
    Some(name.to_string_lossy().into_owned())
}

const BPF_OBJ_GET: libc::c_long = 7;
const BPF_OBJ_GET_INFO_BY_FD: libc::c_long = 15;
const BPF_LINK_TYPE_XDP: u32 = 6;

/// `union bpf_attr` for BPF_OBJ_GET.
#[repr(C)]
struct ObjGetAttr {
    pathname: u64,
    bpf_fd: u32,
    file_flags: u32,
}

/// `union bpf_attr` for BPF_OBJ_GET_INFO_BY_FD.
#[repr(C)]
struct InfoAttr {
    bpf_fd: u32,
    info_len: u32,
    info: u64,
}

/// `struct bpf_link_info` up to the XDP member: three u32, then a union
/// aligned to 8 whose `xdp.ifindex` is its first u32. The tail leaves room
/// for the rest of the kernel's struct (it must be zero when passed in).
#[repr(C, align(8))]
struct LinkInfo {
    link_type: u32,
    id: u32,
    prog_id: u32,
    _pad: u32,
    xdp_ifindex: u32,
    _rest: [u32; 59],
}

/// Which device the XDP link pinned at `path` is attached to
/// (`bpf_link_get_info_by_fd`; aya 0.14 does not expose the XDP member).
pub fn xdp_link_target(path: &Path) -> io::Result<LinkTarget> {
    let c = CString::new(path.as_os_str().as_bytes())
        .map_err(|_| io::Error::new(io::ErrorKind::InvalidInput, "NUL in path"))?;
    let mut get = ObjGetAttr {
        pathname: c.as_ptr() as u64,
        bpf_fd: 0,
        file_flags: 0,
    };
    // SAFETY: `get` is a valid BPF_OBJ_GET attr of the size passed; the
    // path outlives the call.
    let fd = unsafe {
        libc::syscall(
            libc::SYS_bpf,
            BPF_OBJ_GET,
            &mut get as *mut ObjGetAttr,
            std::mem::size_of::<ObjGetAttr>(),
        )
    };
    if fd < 0 {
        return Err(io::Error::last_os_error());
    }
    // SAFETY: the kernel returned a new fd that nothing else owns.
    let fd = unsafe { OwnedFd::from_raw_fd(fd as i32) };
    // A pinned map or program would answer with another info struct.
    let kind = fs::read_link(format!("/proc/self/fd/{}", fd.as_raw_fd()))?;
    if kind.as_os_str() != "anon_inode:bpf-link" {
        return Err(io::Error::new(
            io::ErrorKind::InvalidData,
            format!("not a BPF link ({})", kind.display()),
        ));
    }
    // SAFETY: all-zero is a valid LinkInfo (plain integers).
    let mut info: LinkInfo = unsafe { std::mem::zeroed() };
    let mut attr = InfoAttr {
        bpf_fd: fd.as_raw_fd() as u32,
        info_len: std::mem::size_of::<LinkInfo>() as u32,
        info: &mut info as *mut LinkInfo as u64,
    };
    // SAFETY: `attr` points at `info`, which is info_len bytes and lives
    // across the call.
    let rc = unsafe {
        libc::syscall(
            libc::SYS_bpf,
            BPF_OBJ_GET_INFO_BY_FD,
            &mut attr as *mut InfoAttr,
            std::mem::size_of::<InfoAttr>(),
        )
    };
    if rc < 0 {
        return Err(io::Error::last_os_error());
    }
    if info.link_type != BPF_LINK_TYPE_XDP {
        return Err(io::Error::new(
            io::ErrorKind::InvalidData,
            format!("not an XDP link (link type {})", info.link_type),
        ));
    }
    Ok(match info.xdp_ifindex {
        0 => LinkTarget::Severed,
        i => LinkTarget::Ifindex(i),
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::map_sizes::MapSizes;

    #[test]
    fn a_layout_survives_its_record() {
        let l = Layout::of(MapSizes::default());
        assert_eq!(Layout::from_record(&l.to_record()).unwrap(), l);
        assert_eq!(
            l.get("layout_version"),
            Some(lb_common::LAYOUT_VERSION.to_string().as_str())
        );
        assert!(l.get("size_of_FlowEntry").is_some());
    }

    #[test]
    fn the_same_layout_has_no_difference() {
        let l = Layout::of(MapSizes::default());
        assert!(Layout::diff(&l, &l).is_empty());
    }

    #[test]
    fn differences_name_the_setting_and_both_values() {
        let pinned = Layout::of(MapSizes {
            conntrack_entries: 65536,
            conntrack6_entries: 65536,
            ..MapSizes::default()
        });
        let wanted = Layout::of(MapSizes {
            conntrack_entries: 32768,
            conntrack6_entries: 32768,
            ..MapSizes::default()
        });
        let d = Layout::diff(&pinned, &wanted);
        assert_eq!(
            d,
            [
                "conntrack_entries: pinned 65536, this agent 32768 ([agent] conntrack_entries)",
                "conntrack6_entries: pinned 65536, this agent 32768 ([agent] conntrack_entries)"
            ]
        );
    }

    #[test]
    fn the_nat_maps_size_is_a_named_difference() {
        let pinned = Layout::of(MapSizes::default());
        let wanted = Layout::of(MapSizes {
            nat_entries: 1024,
            ..MapSizes::default()
        });
        assert_eq!(
            Layout::diff(&pinned, &wanted),
            ["nat_entries: pinned 65536, this agent 1024 ([agent] nat_entries)"]
        );
    }

    #[test]
    fn another_version_and_unknown_keys_are_differences() {
        let wanted = Layout::of(MapSizes::default());
        let mut text = wanted.render().replace(
            &format!("layout_version {}\n", lb_common::LAYOUT_VERSION),
            "layout_version 0\n",
        );
        text.push_str("size_of_Gone 8\n");
        let pinned = Layout::parse(&text).unwrap();
        let d = Layout::diff(&pinned, &wanted);
        assert_eq!(d.len(), 2, "{d:?}");
        assert!(d[0].starts_with("layout_version: pinned 0, this agent "));
        assert!(d[0].ends_with("(made by another lb version)"));
        assert!(d[1].starts_with("size_of_Gone: pinned 8, unknown to this agent"));
    }

    #[test]
    fn a_bad_record_is_an_error_naming_the_line() {
        assert!(Layout::parse("").is_err());
        let e = Layout::parse("layout_version 1\nmax_vips\n").unwrap_err();
        assert!(e.contains("line 2"), "{e}");
        let e = Layout::parse("a 1\na 2\n").unwrap_err();
        assert!(e.contains("twice"), "{e}");
        let mut r = [0xffu8; RECORD_BYTES];
        r[0] = b'a';
        assert!(Layout::from_record(&r).is_err());
    }

    #[test]
    fn the_mismatch_message_says_what_differs_and_how_to_proceed() {
        let e = PinsError::Mismatch {
            dir: "/sys/fs/bpf/lb/x".into(),
            diffs: vec!["max_vips: pinned 4, this agent 8 ([agent] max_vips)".into()],
        };
        let m = e.to_string();
        assert!(m.contains("/sys/fs/bpf/lb/x"), "{m}");
        assert!(m.contains("max_vips: pinned 4, this agent 8"), "{m}");
        assert!(m.contains("lb run --reset-datapath"), "{m}");
    }
}
