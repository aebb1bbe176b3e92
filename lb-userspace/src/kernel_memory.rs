//! The kernel memory a configuration asks for: every map of the eBPF
//! object at the sizes the config gives, key and value sizes read from the
//! object itself (the structs of lb-common), bytes per map and the total.
//!
//! Element sizes are what the kernel allocates for the data; the
//! per-element bookkeeping of hash, LRU and LPM-trie maps is an estimate
//! (the kernel's `htab_elem` and `lpm_trie_node` headers on 64-bit), said
//! so by [`MapMemory::estimated`]. Per-CPU maps count once per possible CPU.

use aya_obj::generated::bpf_map_type as t;

use crate::map_sizes::MapSizes;

/// Estimated per-element header of a hash or LRU hash map (`struct
/// htab_elem` before the key: list node, LRU node/free list, hash).
pub const HTAB_ELEM_OVERHEAD: u64 = 48;
/// Estimated per-element header of an LPM trie (`struct lpm_trie_node`).
pub const LPM_NODE_OVERHEAD: u64 = 40;
/// Default `[agent] max_kernel_memory`: 4 GiB.
pub const DEFAULT_MAX_KERNEL_MEMORY: u64 = 4 << 30;
/// Smallest accepted `max_kernel_memory`: 1 MiB.
pub const MIN_MAX_KERNEL_MEMORY: u64 = 1 << 20;

/// One map's share.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct MapMemory {
    pub name: String,
    /// hash, lru_hash, array, percpu_array, lpm_trie, ...
    pub kind: &'static str,
    pub key_size: u32,
    pub value_size: u32,
    pub entries: u32,
    pub bytes: u64,
    /// The bytes include an estimated per-element header.
    pub estimated: bool,
}

fn round8(n: u32) -> u64 {
    (u64::from(n) + 7) & !7
}

/// Bytes of a map of `map_type` with these sizes.
pub fn map_bytes(map_type: u32, key: u32, value: u32, entries: u32, ncpus: u32) -> (u64, bool) {
    let n = u64::from(entries);
    let cpus = u64::from(ncpus.max(1));
    match map_type {
        x if x == t::BPF_MAP_TYPE_ARRAY as u32 => (n * round8(value), false),
        x if x == t::BPF_MAP_TYPE_PERCPU_ARRAY as u32 => (n * round8(value) * cpus, false),
        x if x == t::BPF_MAP_TYPE_HASH as u32 || x == t::BPF_MAP_TYPE_LRU_HASH as u32 => {
            (n * (round8(key) + round8(value) + HTAB_ELEM_OVERHEAD), true)
        }
        x if x == t::BPF_MAP_TYPE_PERCPU_HASH as u32
            || x == t::BPF_MAP_TYPE_LRU_PERCPU_HASH as u32 =>
        {
            (
                n * (round8(key) + HTAB_ELEM_OVERHEAD + round8(value) * cpus),
                true,
            )
        }
        x if x == t::BPF_MAP_TYPE_LPM_TRIE as u32 => (
            // The node holds the key's data (without its prefix length)
            // and the value.
            n * (LPM_NODE_OVERHEAD + u64::from(key.saturating_sub(4)) + u64::from(value)),
            true,
        ),
        x if x == t::BPF_MAP_TYPE_RINGBUF as u32 => (n, false),
        _ => (n * (u64::from(key) + u64::from(value)), true),
    }
}

fn kind(map_type: u32) -> &'static str {
    match map_type {
        x if x == t::BPF_MAP_TYPE_ARRAY as u32 => "array",
        x if x == t::BPF_MAP_TYPE_PERCPU_ARRAY as u32 => "percpu_array",
        x if x == t::BPF_MAP_TYPE_HASH as u32 => "hash",
        x if x == t::BPF_MAP_TYPE_LRU_HASH as u32 => "lru_hash",
        x if x == t::BPF_MAP_TYPE_PERCPU_HASH as u32 => "percpu_hash",
        x if x == t::BPF_MAP_TYPE_LRU_PERCPU_HASH as u32 => "lru_percpu_hash",
        x if x == t::BPF_MAP_TYPE_LPM_TRIE as u32 => "lpm_trie",
        x if x == t::BPF_MAP_TYPE_PROG_ARRAY as u32 => "prog_array",
        x if x == t::BPF_MAP_TYPE_RINGBUF as u32 => "ringbuf",
        _ => "other",
    }
}

/// Every map the data path creates with `sizes`, biggest first.
pub fn plan(sizes: MapSizes, ncpus: u32) -> Result<Vec<MapMemory>, String> {
    let obj = aya_obj::Object::parse(crate::datapath::OBJECT).map_err(|e| e.to_string())?;
    let sized = crate::datapath::sized_maps(sizes);
    let mut maps: Vec<MapMemory> = obj
        .maps
        .iter()
        .map(|(name, m)| {
            let entries = sized
                .iter()
                .find(|(n, _)| n == name)
                .map_or(m.max_entries(), |(_, v)| *v);
            let (bytes, estimated) =
                map_bytes(m.map_type(), m.key_size(), m.value_size(), entries, ncpus);
            MapMemory {
                name: name.clone(),
                kind: kind(m.map_type()),
                key_size: m.key_size(),
                value_size: m.value_size(),
                entries,
                bytes,
                estimated,
            }
        })
        .collect();
    maps.sort_by(|a, b| b.bytes.cmp(&a.bytes).then_with(|| a.name.cmp(&b.name)));
    Ok(maps)
}

/// The total of [`plan`].
pub fn total(maps: &[MapMemory]) -> u64 {
    maps.iter().map(|m| m.bytes).sum()
}

/// The CPUs per-CPU maps are allocated for: the kernel's possible CPUs
/// (`/sys/devices/system/cpu/possible`), else the available parallelism.
pub fn possible_cpus() -> u32 {
    std::fs::read_to_string("/sys/devices/system/cpu/possible")
        .ok()
        .and_then(|s| parse_cpu_list(s.trim()))
        .unwrap_or_else(|| std::thread::available_parallelism().map_or(1, |n| n.get() as u32))
}

/// Counts the CPUs of a list like `0-3,5,7-8`.
fn parse_cpu_list(s: &str) -> Option<u32> {
    let mut n = 0u32;
    for part in s.split(',') {
        match part.split_once('-') {
            Some((a, b)) => {
                let (a, b): (u32, u32) = (a.parse().ok()?, b.parse().ok()?);
                n += b.checked_sub(a)? + 1;
            }
            None => {
                part.parse::<u32>().ok()?;
                n += 1;
            }
        }
    }
    Some(n)
}

/// `bytes` for people: `1.50 GiB`, `12.0 MiB`, `640 KiB`, `100 B`.
pub fn human(bytes: u64) -> String {
    const K: f64 = 1024.0;
    let b = bytes as f64;
    if b >= K * K * K {
        format!("{:.2} GiB", b / (K * K * K))
    } else if b >= K * K {
        format!("{:.1} MiB", b / (K * K))
    } else if b >= K {
        format!("{:.0} KiB", b / K)
    } else {
        format!("{bytes} B")
    }
}

/// Parses `max_kernel_memory`'s text form: a number with an optional unit
/// B, KiB, MiB, GiB or TiB (`"2GiB"`, `"512 MiB"`, `"1048576"`).
pub fn parse_bytes(s: &str) -> Option<u64> {
    let s = s.trim();
    let split = s.find(|c: char| !c.is_ascii_digit()).unwrap_or(s.len());
    let (digits, unit) = s.split_at(split);
    let n: u64 = digits.parse().ok()?;
    let mult: u64 = match unit.trim() {
        "" | "B" => 1,
        "KiB" => 1 << 10,
        "MiB" => 1 << 20,
        "GiB" => 1 << 30,
        "TiB" => 1 << 40,
        _ => return None,
    };
    n.checked_mul(mult)
}

/// The shortest exact text form of `bytes` for the config file.
pub fn format_bytes(bytes: u64) -> String {
    for (unit, shift) in [("TiB", 40), ("GiB", 30), ("MiB", 20), ("KiB", 10)] {
        if bytes != 0 && bytes.is_multiple_of(1u64 << shift) {
            return format!("{}{unit}", bytes >> shift);
        }
    }
    bytes.to_string()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn sizes_1m() -> MapSizes {
        MapSizes {
            conntrack_entries: 1_048_576,
            conntrack6_entries: 1_048_576,
            ..MapSizes::default()
        }
    }

    #[test]
    fn conntrack_bytes_from_the_real_key_and_value_sizes() {
        let maps = plan(sizes_1m(), 4).unwrap();
        let ct = maps.iter().find(|m| m.name == "CONNTRACK").unwrap();
        let key = std::mem::size_of::<lb_common::FlowKey>() as u64;
        let value = std::mem::size_of::<lb_common::FlowEntry>() as u64;
        assert_eq!(u64::from(ct.key_size), key);
        assert_eq!(u64::from(ct.value_size), value);
        assert_eq!(ct.kind, "lru_hash");
        assert_eq!(ct.entries, 1_048_576);
        assert!(ct.estimated);
        let r8 = |n: u64| n.div_ceil(8) * 8;
        assert_eq!(
            ct.bytes,
            1_048_576 * (r8(key) + r8(value) + HTAB_ELEM_OVERHEAD)
        );
        let ct6 = maps.iter().find(|m| m.name == "CONNTRACK6").unwrap();
        let key6 = std::mem::size_of::<lb_common::FlowKey6>() as u64;
        assert_eq!(
            ct6.bytes,
            1_048_576 * (r8(key6) + r8(value) + HTAB_ELEM_OVERHEAD)
        );
    }

    #[test]
    fn rings_and_percpu_maps() {
        let sizes = MapSizes::default();
        let maps = plan(sizes, 4).unwrap();
        let rings = maps.iter().find(|m| m.name == "RINGS").unwrap();
        assert_eq!(
            rings.bytes,
            u64::from(sizes.max_vips) * u64::from(sizes.ring_size) * 8
        );
        assert!(!rings.estimated);
        let stats = maps.iter().find(|m| m.name == "BACKEND_STATS").unwrap();
        let one = plan(sizes, 1).unwrap();
        let stats1 = one.iter().find(|m| m.name == "BACKEND_STATS").unwrap();
        assert_eq!(stats.bytes, 4 * stats1.bytes);
        assert_eq!(
            stats1.bytes,
            u64::from(sizes.backend_slots())
                * (std::mem::size_of::<lb_common::BackendStats>() as u64).div_ceil(8)
                * 8
        );
        // Biggest first, and the total is the sum.
        assert!(maps.windows(2).all(|w| w[0].bytes >= w[1].bytes));
        assert_eq!(total(&maps), maps.iter().map(|m| m.bytes).sum::<u64>());
    }

    #[test]
    fn doubling_conntrack_grows_the_total_by_its_two_maps() {
        let small = plan(sizes_1m(), 2).unwrap();
        let big = plan(
            MapSizes {
                conntrack_entries: 2_097_152,
                conntrack6_entries: 2_097_152,
                ..MapSizes::default()
            },
            2,
        )
        .unwrap();
        let ct = |m: &[MapMemory]| {
            m.iter()
                .filter(|m| m.name.starts_with("CONNTRACK"))
                .map(|m| m.bytes)
                .sum::<u64>()
        };
        assert_eq!(total(&big) - total(&small), ct(&small));
    }

    #[test]
    fn bytes_text() {
        assert_eq!(parse_bytes("2GiB"), Some(2 << 30));
        assert_eq!(parse_bytes("512 MiB"), Some(512 << 20));
        assert_eq!(parse_bytes("1048576"), Some(1 << 20));
        assert_eq!(parse_bytes("7B"), Some(7));
        assert_eq!(parse_bytes("2GB"), None);
        assert_eq!(parse_bytes("GiB"), None);
        assert_eq!(parse_bytes("-1"), None);
        assert_eq!(format_bytes(4 << 30), "4GiB");
        assert_eq!(format_bytes(1536 << 20), "1536MiB");
        assert_eq!(format_bytes(1000), "1000");
        assert_eq!(parse_cpu_list("0-3,5,7-8"), Some(7));
        assert_eq!(parse_cpu_list("0"), Some(1));
    }
}
