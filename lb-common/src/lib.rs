//! Types and functions shared by the XDP program (lb-ebpf) and the agent
//! (lb-userspace). Every type that crosses the kernel boundary lives here,
//! once, `#[repr(C)]` with explicit padding and its size asserted at compile
//! time. The flow hash and the ring-slot reduction are compiled into both
//! sides so that userspace predicts exactly which backend a flow takes.
//!
//! Byte order: addresses and ports are stored as they appear on the wire
//! (network order), so that the fast path never swaps bytes. Userspace
//! builds them with the constructors below.
#![no_std]

use core::mem::size_of;

pub mod acl;
pub mod csum;
pub mod decap;
pub mod nat;
pub mod ratelimit;
pub mod sched;

/// Map names, as the agent finds them in the object and pins them.
pub mod map_names {
    pub const VIPS: &str = "VIPS";
    pub const BACKENDS: &str = "BACKENDS";
    pub const RINGS: &str = "RINGS";
    pub const CONNTRACK: &str = "CONNTRACK";
    pub const VIP_STATS: &str = "VIP_STATS";
    pub const BACKEND_STATS: &str = "BACKEND_STATS";
    pub const REASON_STATS: &str = "REASON_STATS";
    pub const TX_PORTS: &str = "TX_PORTS";
    pub const RUNTIME: &str = "RUNTIME";
    /// Not pinned: it belongs to the loaded program.
    pub const FLOW_CACHE: &str = "FLOW_CACHE";
    /// The IPv6 VIP table (same size and conventions as VIPS).
    pub const VIPS6: &str = "VIPS6";
    /// IPv6 flows (`FlowKey6` → `FlowEntry`).
    pub const CONNTRACK6: &str = "CONNTRACK6";
    /// Not pinned, like FLOW_CACHE; cleared with it.
    pub const FLOW_CACHE6: &str = "FLOW_CACHE6";
    /// NAT flows, client side (`FlowKey` → `NatFwd`).
    pub const NAT_FWD: &str = "NAT_FWD";
    /// NAT flows, backend side (`FlowKey` of the reply → `NatRev`).
    pub const NAT_REV: &str = "NAT_REV";
    /// IPv6 NAT flows, client side (`FlowKey6` → `NatFwd`).
    pub const NAT_FWD6: &str = "NAT_FWD6";
    /// IPv6 NAT flows, backend side (`FlowKey6` → `NatRev`).
    pub const NAT_REV6: &str = "NAT_REV6";
    /// Per-VIP SNAT addresses (VIP index → `NatSnat`).
    pub const NAT_SNAT: &str = "NAT_SNAT";
    /// Not pinned, like FLOW_CACHE: the NAT caches in front of NAT_FWD,
    /// NAT_REV, NAT_FWD6 and NAT_REV6 (`NatFwdCache`, `NatRevCache`),
    /// cleared with FLOW_CACHE.
    /// Per VIP, per CPU: the SYN-flood guard's SYN count in the current
    /// tick ([`crate::SynWindow`]). Not pinned: it refills from traffic.
    pub const SYN_GUARD: &str = "SYN_GUARD";
    /// Per VIP: until when the guard is on for every CPU (clock ms).
    pub const SYN_FLOOD_UNTIL: &str = "SYN_FLOOD_UNTIL";
    /// The SYN filter ([`crate::syn_filter_bit`]): which TCP flows may
    /// have a conntrack record. Not pinned: it belongs to the loaded
    /// program, and the agent rebuilds it from CONNTRACK.
    pub const SYN_FILTER: &str = "SYN_FILTER";
    /// Per VIP: its rate limits (`ratelimit::RateLimits`). Not pinned:
    /// the agent writes every VIP's at start and on each change.
    pub const RATE_LIMITS: &str = "RATE_LIMITS";
    /// Per VIP: the bucket of its new-connection ceiling. Not pinned.
    pub const RATE_VIP: &str = "RATE_VIP";
    /// Per (VIP, limit, source prefix): a bucket (LRU). Not pinned.
    pub const RATE_SOURCES: &str = "RATE_SOURCES";
    pub const NAT_FWD_CACHE: &str = "NAT_FWD_CACHE";
    pub const NAT_REV_CACHE: &str = "NAT_REV_CACHE";
    pub const NAT_FWD_CACHE6: &str = "NAT_FWD_CACHE6";
    pub const NAT_REV_CACHE6: &str = "NAT_REV_CACHE6";
    /// Source access control (see [`crate::acl`]): the IPv4 and IPv6 LPM
    /// tries and the per-VIP ACL word.
    pub const ACL4: &str = "ACL4";
    pub const ACL6: &str = "ACL6";
    pub const VIP_ACL: &str = "VIP_ACL";
    /// Schedulers (see [`crate::sched`]).
    pub const SCHED: &str = "SCHED";
    pub const SCHED_SLOTS: &str = "SCHED_SLOTS";
    pub const SCHED_RR: &str = "SCHED_RR";
    pub const LC_ACTIVE: &str = "LC_ACTIVE";
    pub const LC_CORRECTION: &str = "LC_CORRECTION";
}

/// Version of the pinned maps' layout, recorded in the pin directory (the
/// `LAYOUT` pin) with the map sizes and struct sizes. Bump it whenever the
/// meaning of a pinned map's contents changes without its sizes changing
/// (a field reinterpreted, a flag added): an agent refuses pins recorded
/// with another version instead of misreading them.
///
/// 2: `VipInfo` carries the forwarding mode and the GUE port (its `flags`
/// narrowed to a byte), `Backend` the outer source address.
/// 3: IPv6: `Backend` grows IPv6 addresses and [`BACKEND_FLAG_V6`], reason
/// 1 becomes `pass_not_ip`, VIPS6 and CONNTRACK6 join the pinned maps.
/// 4: full NAT: `Backend` grows its port, `Runtime` the NAT port range,
/// `VipStats` the return path's counters; reasons 18..=20; the NAT maps
/// join the pinned maps.
/// 5: traffic policy: reasons 21 (`fwd_syn_unrecorded`) and 22
/// (`drop_rate_limited`), `Runtime`'s last word becomes the SYN-flood
/// guard's threshold, `VipStats` grows `rate_limited`.
/// 6: source access control: `VipStats` grows `acl_denied`, reason 23
/// (`drop_acl_denied`); ACL4, ACL6 and VIP_ACL join the pinned maps.
/// 7: schedulers: SCHED, SCHED_SLOTS, LC_ACTIVE and LC_CORRECTION join
/// the pinned maps (see [`sched`]).
pub const LAYOUT_VERSION: u32 = 7;

/// Program names in the object (its only program; the test and benchmark
/// programs live in lb-ebpf-testprogs).
pub mod program_names {
    /// The balancer.
    pub const BALANCER: &str = "lb_xdp";
}

pub const IPPROTO_ICMP: u8 = 1;
pub use decap::{DEFAULT_GUE_PORT, IPPROTO_IPIP};
pub const IPPROTO_TCP: u8 = 6;
pub const IPPROTO_UDP: u8 = 17;
pub const IPPROTO_ICMPV6: u8 = 58;

/// Default map sizes; the agent may override each at load time.
pub const DEFAULT_MAX_VIPS: u32 = 64;
pub const DEFAULT_MAX_BACKENDS: u32 = 4096;
pub const DEFAULT_RING_SIZE: u32 = 65537;
pub const DEFAULT_CONNTRACK_ENTRIES: u32 = 1 << 20;
/// Elements of each NAT map (NAT_FWD, NAT_REV and their IPv6 twins):
/// one per NAT flow and direction.
pub const DEFAULT_NAT_ENTRIES: u32 = 1 << 16;

/// A ring slot that names no backend.
pub const NO_BACKEND: u32 = u32::MAX;

/// Key of the VIP map: (address, port, protocol) as on the wire.
///
/// Besides one entry per service, the agent inserts one entry per VIP
/// *address* with `port == 0 && proto == 0` (flag [`VIP_FLAG_ADDR_ONLY`]):
/// it lets the fast path recognise fragments and malformed L4 headers sent
/// to a VIP address, which carry no usable port.
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct VipKey {
    /// IPv4 address, network byte order (the wire bytes read natively).
    pub addr: u32,
    /// Port, network byte order.
    pub port: u16,
    pub proto: u8,
    pub _pad: u8,
}

impl VipKey {
    /// `addr` and `port` in host order (as `Ipv4Addr::to_bits()` gives).
    pub const fn new(addr_host: u32, port_host: u16, proto: u8) -> Self {
        Self {
            addr: addr_host.to_be(),
            port: port_host.to_be(),
            proto,
            _pad: 0,
        }
    }

    /// The key as one word, for a single-compare equality test in the
    /// fast path.
    #[inline(always)]
    pub fn as_u64(&self) -> u64 {
        // SAFETY: #[repr(C)], 8 bytes, no padding, every bit pattern valid.
        unsafe { core::mem::transmute::<VipKey, u64>(*self) }
    }

    /// The address-only marker entry for `addr_host`.
    pub const fn addr_only(addr_host: u32) -> Self {
        Self::new(addr_host, 0, 0)
    }
}

/// Value of the VIP map.
///
/// 16 bytes; an IPv6 slice keeps it as is (the mode and port are family
/// independent) and widens only the key.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct VipInfo {
    /// Index into VIP_STATS, and the VIP's identity in backend entries.
    pub index: u32,
    /// First element of this VIP's ring in RINGS.
    pub ring_base: u32,
    /// Ring size M (prime); slots `ring_base .. ring_base + ring_size`.
    pub ring_size: u32,
    /// [`VIP_FLAG_ADDR_ONLY`], [`VIP_FLAG_ECHO`].
    pub flags: u8,
    /// How packets reach the backend: one of the `FORWARD_*` values.
    pub forwarding: u8,
    /// GUE: the outer UDP destination port, network byte order (the port
    /// the backends' decap listens on); 0 in other modes.
    pub gue_port: u16,
}

/// The entry marks a VIP address, not a service.
pub const VIP_FLAG_ADDR_ONLY: u8 = 1;
/// On an address-only entry: lb answers ICMP echo requests to the address
/// itself, in XDP (every service at the address allows it).
pub const VIP_FLAG_ECHO: u8 = 2;
/// On a service entry: the VIP has rate limits (RATE_LIMITS at its
/// index, written before this flag). Without it the fast path reads no
/// limits for the VIP's packets.
pub const VIP_FLAG_LIMITS: u8 = 4;

/// Direct server return at L2: rewrite both MACs, nothing else.
pub const FORWARD_DSR_L2: u8 = 0;
/// IPv4-in-IPv4: an outer IPv4 header (protocol 4) in front of the packet.
pub const FORWARD_IPIP: u8 = 1;
/// GUE variant 1: an outer IPv4 + UDP header, the packet right after it.
pub const FORWARD_GUE: u8 = 2;
/// Full NAT: destination rewritten to the backend, source to a SNAT
/// address:port; the replies come back through lb (see [`nat`]).
pub const FORWARD_NAT: u8 = 3;

/// Bytes `FORWARD_IPIP` adds: an IPv4 header without options.
pub const IPIP_OVERHEAD: u32 = 20;
/// Bytes `FORWARD_GUE` adds: an IPv4 header and a UDP header.
pub const GUE_OVERHEAD: u32 = 28;

/// The outer UDP source port of a GUE packet, from the flow hash: the
/// same for every packet of a flow, spread over 16384 ports so that the
/// backend's NIC hashes flows onto its receive queues; kept in
/// 49152..=65535 (the dynamic range, never a well-known port). The kernel
/// and `lb explain` call this same function.
#[inline(always)]
pub const fn gue_source_port(flow_hash: u32) -> u16 {
    0xC000 | (flow_hash & 0x3FFF) as u16
}

impl VipInfo {
    /// The entry marks a VIP address (for fragments and malformed L4
    /// headers), not a service: it has no ring.
    #[inline(always)]
    pub const fn is_address_only(&self) -> bool {
        self.flags & VIP_FLAG_ADDR_ONLY != 0
    }

    /// An address-only entry whose address answers ICMP echo requests.
    #[inline(always)]
    pub const fn answers_echo(&self) -> bool {
        self.flags & VIP_FLAG_ECHO != 0
    }

    /// Bytes the VIP's forwarding mode puts in front of a packet.
    #[inline(always)]
    pub const fn encap_overhead(&self) -> u32 {
        match self.forwarding {
            FORWARD_IPIP => IPIP_OVERHEAD,
            FORWARD_GUE => GUE_OVERHEAD,
            _ => 0,
        }
    }
}

/// One slot of the VIP table: an open-addressing hash table kept in a BPF
/// array, so that the fast path finds a VIP with inlined array loads and a
/// few compares instead of a hash-map helper call. Written only by the
/// agent; see [`vip_table_index`] for where a key lives.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct VipSlot {
    pub key: VipKey,
    pub info: VipInfo,
}

impl Default for VipKey {
    fn default() -> Self {
        VIP_SLOT_EMPTY
    }
}

/// A slot never used: a lookup stops here (no VIP has address 0.0.0.0).
pub const VIP_SLOT_EMPTY: VipKey = VipKey {
    addr: 0,
    port: 0,
    proto: 0,
    _pad: 0,
};

/// A slot whose VIP was removed: a lookup goes on past it.
pub const VIP_SLOT_TOMBSTONE: VipKey = VipKey {
    addr: u32::MAX,
    port: 0,
    proto: 0,
    _pad: 0,
};

/// A key is at most this many slots after its home slot.
pub const VIP_TABLE_PROBES: u32 = 8;

/// Table size for `max_vips` services (two entries each: the service and
/// its address marker), a power of two at most 1/4 full.
pub const fn vip_table_size(max_vips: u32) -> u32 {
    let want = max_vips.saturating_mul(8);
    let size = if want < 64 { 64 } else { want };
    size.next_power_of_two()
}

/// The multiplier of the one-multiply mixes (the VIP table's home slot,
/// the flow cache's slot): 2654435761, the prime nearest 2^32 divided by
/// the golden ratio (Knuth's multiplicative hashing).
pub const MIX_MULTIPLIER: u32 = 0x9E37_79B1;

/// Home slot of `key` in a table of `mask + 1` slots.
#[inline(always)]
pub fn vip_table_index(key: &VipKey, mask: u32) -> u32 {
    vip_table_home(key.addr, key.port, key.proto, mask)
}

/// murmur3's finalizer over an address word (IPv6: its words folded),
/// port and protocol: the home slot in a table of `mask + 1` slots, for
/// both families' VIP tables.
#[inline(always)]
pub(crate) fn vip_table_home(addr: u32, port: u16, proto: u8, mask: u32) -> u32 {
    fmix32(addr ^ ((port as u32) << 8 | proto as u32).wrapping_mul(MIX_MULTIPLIER)) & mask
}

/// murmur3's 32-bit finalizer: every input bit moves every output bit
/// (the VIP table's home slot, the SNAT port picks).
#[inline(always)]
pub(crate) const fn fmix32(mut h: u32) -> u32 {
    h ^= h >> 16;
    h = h.wrapping_mul(0x85EB_CA6B);
    h ^= h >> 13;
    h = h.wrapping_mul(0xC2B2_AE35);
    h ^= h >> 16;
    h
}

/// The probe sequence from `home`: it and the
/// [`VIP_TABLE_PROBES`]` - 1` slots after it, wrapping.
#[inline(always)]
pub(crate) fn vip_table_probe_from(home: u32, mask: u32) -> impl Iterator<Item = u32> + use<> {
    (0..VIP_TABLE_PROBES).map(move |i| (home + i) & mask)
}

/// The slots where `key` may be, in the order a lookup visits them: its
/// home slot and the [`VIP_TABLE_PROBES`]` - 1` after it, wrapping, in a
/// table of `mask + 1` slots. The kernel's lookup and the agent's writes
/// both walk this sequence. A lookup stops at the first slot holding `key`
/// or [`VIP_SLOT_EMPTY`]; it goes on past [`VIP_SLOT_TOMBSTONE`]s.
#[inline(always)]
pub fn vip_table_probe(key: &VipKey, mask: u32) -> impl Iterator<Item = u32> + use<> {
    vip_table_probe_from(vip_table_index(key, mask), mask)
}

/// Value of the backend array, indexed by backend id.
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Backend {
    /// IPv4 address, network byte order (informational for DSR at L2).
    pub addr: u32,
    /// Egress interface. Equal to the ingress interface → `XDP_TX`,
    /// otherwise redirect through TX_PORTS.
    pub ifindex: u32,
    /// The VIP this backend serves: a conntrack entry is only honoured when
    /// its backend still belongs to the flow's VIP.
    pub vip_index: u32,
    pub flags: u32,
    /// Next hop's MAC (resolved by the agent).
    pub dst_mac: [u8; 6],
    /// The egress interface's MAC.
    pub src_mac: [u8; 6],
    /// Outer source address of encapsulated packets (ipip, gue), network
    /// byte order; 0 for DSR at L2. IPv4 backends only.
    pub encap_src: u32,
    /// IPv6 backends ([`BACKEND_FLAG_V6`]): the address, as on the wire
    /// (`addr` is then 0). One backend array serves both families, so
    /// that backend ids, rings and BACKEND_STATS are shared.
    pub addr6: [u32; 4],
    /// IPv6 backends: the outer source of encapsulated packets, as on the
    /// wire; zero for DSR at L2.
    pub encap_src6: [u32; 4],
    /// NAT: the backend's port, network byte order; 0: the VIP's port.
    /// Other modes: 0 (a DSR backend answers on the VIP's port).
    pub port: u16,
    pub _pad: u16,
}

/// The backend exists and is healthy: conntrack entries pointing to it are
/// honoured. Cleared when a backend goes down or is removed, so that its
/// flows are re-steered by the ring.
pub const BACKEND_FLAG_USABLE: u32 = 1;
/// The backend is an IPv6 host: its address is `addr6` (and its outer
/// source `encap_src6`), `addr` is 0.
pub const BACKEND_FLAG_V6: u32 = 2;

/// Backend id 0 is never given to a backend, so a ring slot that was never
/// written (0 in the kernel array) names no backend that exists.
pub const FIRST_BACKEND_ID: u32 = 1;

impl Backend {
    /// What a never-written or removed slot of the backend array holds.
    pub const EMPTY: Backend = Backend {
        addr: 0,
        ifindex: 0,
        vip_index: 0,
        flags: 0,
        dst_mac: [0; 6],
        src_mac: [0; 6],
        encap_src: 0,
        addr6: [0; 4],
        encap_src6: [0; 4],
        port: 0,
        _pad: 0,
    };

    /// The slot holds a backend: every backend has an address (the agent
    /// refuses 0.0.0.0 and ::), an empty slot has none.
    #[inline(always)]
    pub const fn is_present(&self) -> bool {
        self.addr != 0 || self.flags & BACKEND_FLAG_V6 != 0
    }

    /// An IPv6 backend (address in `addr6`).
    #[inline(always)]
    pub const fn is_v6(&self) -> bool {
        self.flags & BACKEND_FLAG_V6 != 0
    }

    /// Conntrack entries naming this backend are honoured and ring slots
    /// may name it.
    #[inline(always)]
    pub const fn is_usable(&self) -> bool {
        self.flags & BACKEND_FLAG_USABLE != 0
    }
}

/// Connection-tracking key: the flow's 5-tuple as on the wire.
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub struct FlowKey {
    pub src_addr: u32,
    pub dst_addr: u32,
    pub src_port: u16,
    pub dst_port: u16,
    /// The IP protocol number, widened so that the key is four 32-bit
    /// words (no padding bytes for the fast path to clear one by one).
    pub proto: u32,
}

impl FlowKey {
    /// Host-order constructor for userspace.
    pub const fn new(src: u32, src_port: u16, dst: u32, dst_port: u16, proto: u8) -> Self {
        Self {
            src_addr: src.to_be(),
            dst_addr: dst.to_be(),
            src_port: src_port.to_be(),
            dst_port: dst_port.to_be(),
            proto: proto as u32,
        }
    }

    /// The key as two words, for a two-compare equality test in the fast
    /// path.
    #[inline(always)]
    pub fn as_words(&self) -> [u64; 2] {
        // SAFETY: #[repr(C)], 16 bytes, no padding, every bit pattern valid.
        unsafe { core::mem::transmute::<FlowKey, [u64; 2]>(*self) }
    }

    /// The flow hash. The kernel and the agent call this same function.
    #[inline(always)]
    pub fn hash(&self) -> u32 {
        flow_hash(
            self.src_addr,
            self.dst_addr,
            self.src_port,
            self.dst_port,
            self.proto as u8,
        )
    }
}

/// Value of the conntrack map.
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct FlowEntry {
    pub backend_id: u32,
    /// [`FLOW_FLAG_CLOSING`].
    pub flags: u32,
    /// [`Runtime::now_ms`] when the flow was last seen (refreshed at most
    /// once per tick of that clock, see the fast path).
    pub last_seen_ms: u64,
}

/// The flow's TCP connection sent a FIN or a RST: it expires after
/// [`Runtime::tcp_closing_ms`] without packets instead of
/// [`Runtime::tcp_idle_ms`].
pub const FLOW_FLAG_CLOSING: u32 = 1;

impl FlowEntry {
    /// The idle time after which this entry no longer steers its flow
    /// (the next packet is steered by the ring like a new flow), in ms;
    /// 0: never (the agent has not set the timeouts).
    #[inline(always)]
    pub fn timeout_ms(&self, proto: u32, rt: &Runtime) -> u32 {
        if proto != IPPROTO_TCP as u32 {
            rt.udp_idle_ms
        } else if self.flags & FLOW_FLAG_CLOSING != 0 {
            rt.tcp_closing_ms
        } else {
            rt.tcp_idle_ms
        }
    }

    /// Idle longer than its timeout at `rt.now_ms`. The kernel and the
    /// agent's count of active flows apply this same rule.
    #[inline(always)]
    pub fn is_expired(&self, proto: u32, rt: &Runtime) -> bool {
        let timeout = self.timeout_ms(proto, rt);
        timeout != 0 && rt.now_ms.saturating_sub(self.last_seen_ms) > timeout as u64
    }
}

/// What the agent keeps current while it runs, in the one element of the
/// RUNTIME array: the flow clock, the conntrack timeouts and the largest
/// frame the egress interfaces take.
///
/// The clock counts milliseconds of agent time: a new agent continues from
/// the value it finds pinned, so the clock stands still (and nothing
/// expires) while no agent runs. All zero (no agent yet): nothing expires,
/// no length limit.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Runtime {
    pub now_ms: u64,
    /// A UDP flow idle this long is over (0: never).
    pub udp_idle_ms: u32,
    /// A TCP flow idle this long is over (0: never).
    pub tcp_idle_ms: u32,
    /// A TCP flow that sent a FIN or RST is over after this long without
    /// packets (0: never).
    pub tcp_closing_ms: u32,
    /// Largest IPv4 total length the egress interfaces take (their
    /// smallest MTU); longer packets for a VIP are dropped
    /// ([`Reason::DropTooBig`]): in generic (skb) mode GRO hands XDP
    /// aggregated frames that no interface may send. 0: no limit. Packets
    /// up to [`MIN_LIMITED_L3_LEN`] bytes are not checked (so a limit
    /// below it is not enforced for them).
    pub max_l3_len: u32,
    /// The SNAT ports NAT flows get, `nat_port_min..=nat_port_max`, host
    /// byte order; replies to a port outside it are never looked up (the
    /// host's own connections use the rest). Both 0: no NAT.
    pub nat_port_min: u16,
    pub nat_port_max: u16,
    /// The SYN-flood guard ([`syn_guard`]): 0, off (every SYN is
    /// recorded); otherwise a CPU that sees more than `syn_guard - 1`
    /// SYNs for one VIP within one tick of the clock stops recording that
    /// VIP's SYNs for the rest of the tick and the next (1: never records
    /// a SYN).
    pub syn_guard: u32,
}

/// One CPU's SYN count for one VIP in one tick of the flow clock: what
/// the SYN-flood guard ([`Runtime::syn_guard`]) compares with its
/// threshold. Per CPU, so counted without atomics.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct SynWindow {
    /// [`Runtime::now_ms`] of the tick counted.
    pub tick_ms: u64,
    /// SYNs counted in that tick.
    pub syns: u32,
    /// 1: the previous tick went over the threshold (the guard stays on
    /// for this whole tick).
    pub flooded: u32,
}

impl SynWindow {
    /// Counts one SYN at clock `now_ms` against `threshold`
    /// ([`Runtime::syn_guard`], not 0) and says whether it goes
    /// unrecorded: the guard is on when this tick's count is over the
    /// threshold, or the previous tick's was.
    #[inline(always)]
    pub fn count_syn(&mut self, now_ms: u64, threshold: u32) -> bool {
        if self.tick_ms != now_ms {
            // The tick before this one: the last one counted, if it ended
            // just now (a gap of ticks without SYNs ends a flood).
            let over = self.syns >= threshold;
            self.flooded = u32::from(over && now_ms.wrapping_sub(self.tick_ms) <= MAX_TICK_GAP_MS);
            self.tick_ms = now_ms;
            self.syns = 0;
        }
        self.syns = self.syns.saturating_add(1);
        self.flooded != 0 || self.syns >= threshold
    }
}

/// How long (in ms of the flow clock) every CPU leaves a VIP's SYNs
/// unrecorded after one CPU's count went over the threshold: the rest of
/// the tick and the next one (ticks are 100 ms apart).
pub const SYN_FLOOD_HOLD_MS: u64 = 200;

/// log2 of the bits in one bank of the SYN filter (2^21 bits: 256 KiB, a
/// size that stays in a core's L2 cache).
///
/// The filter spares a SYN under the SYN-flood guard the conntrack lookup
/// (a cold bucket of a table far larger than the caches) when the flow
/// certainly has no record: one bit per flow hash, set by the kernel in
/// both banks whenever it records a TCP flow, never cleared by it. The
/// agent rebuilds the bank not in use from the records alive in a pass
/// over conntrack (cleared first, so a record made during the pass keeps
/// the bit the kernel set) and then switches to it: a live record's bit is
/// always set in the bank in use; a set bit may belong to a record gone
/// since, or to another flow with the same bits (then the SYN looks up).
pub const SYN_FILTER_BITS: u32 = 21;
/// 64-bit words of one bank of the SYN filter.
pub const SYN_FILTER_BANK_WORDS: u32 = 1 << (SYN_FILTER_BITS - 6);
/// Elements (64-bit words) of SYN_FILTER: the control word
/// ([`SYN_FILTER_OFF`] or `1 + bank`), then bank 0, then bank 1.
pub const SYN_FILTER_ENTRIES: u32 = 1 + 2 * SYN_FILTER_BANK_WORDS;
/// SYN_FILTER's control word when no bank is complete yet (every guarded
/// SYN looks up conntrack).
pub const SYN_FILTER_OFF: u64 = 0;

/// The element of SYN_FILTER and the bit in it of the flow hash `hash`
/// ([`FlowKey::hash`], [`FlowKey6::hash`]) in bank `bank` (0 or 1).
#[inline(always)]
pub fn syn_filter_bit(hash: u32, bank: u32) -> (u32, u64) {
    let b = hash >> (32 - SYN_FILTER_BITS);
    (
        1 + (bank & 1) * SYN_FILTER_BANK_WORDS + (b >> 6),
        1u64 << (b & 63),
    )
}

/// Ticks of the flow clock are 100 ms apart (the agent's period); a
/// window this much later than the last one counted follows it directly.
pub const MAX_TICK_GAP_MS: u64 = 250;

/// IPv4's minimum datagram size every host accepts: packets up to this
/// length are not checked against [`Runtime::max_l3_len`].
pub const MIN_LIMITED_L3_LEN: u32 = 576;

/// Slots of the flow cache: 2^FLOW_CACHE_BITS.
pub const FLOW_CACHE_BITS: u32 = 12;
pub const FLOW_CACHE_SLOTS: u32 = 1 << FLOW_CACHE_BITS;

/// The flow cache's one-multiply mix of a flow: its top
/// [`FLOW_CACHE_BITS`] bits pick the slot ([`flow_cache_slot`]), and the
/// whole word goes into [`FlowCacheEntry::check`]. Not the flow hash: it
/// folds the 5-tuple with XOR, so different flows can share a mix.
#[inline(always)]
pub fn flow_cache_mix(key: &FlowKey) -> u32 {
    (key.src_addr ^ key.dst_addr ^ ((key.src_port as u32) << 16 | key.dst_port as u32))
        .wrapping_mul(MIX_MULTIPLIER)
}

/// The flow cache slot of a flow whose [`flow_cache_mix`] is `mix`.
#[inline(always)]
pub fn flow_cache_slot(mix: u32) -> u32 {
    mix >> (32 - FLOW_CACHE_BITS)
}

/// One slot of the flow cache in front of CONNTRACK.
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct FlowCacheEntry {
    pub key: FlowKey,
    pub backend_id: u32,
    /// [`flow_cache_mix`] of `key` XOR `backend_id`. A slot copied while
    /// another CPU rewrites it can mix two writes: this word rejects a
    /// copy whose `backend_id` and `check` come from different writes
    /// (unless both flows have the same mix), but it does not cover the
    /// key; see the fast path for what a torn copy can do.
    pub check: u32,
}

/// Per-VIP counters (per CPU).
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct VipStats {
    pub packets: u64,
    pub bytes: u64,
    pub new_flows: u64,
    pub conntrack_hits: u64,
    /// NAT: replies translated back to the client (and their bytes as
    /// received); 0 in other modes.
    pub return_packets: u64,
    pub return_bytes: u64,
    /// Packets dropped by the VIP's source access control.
    pub acl_denied: u64,
    /// Packets refused by the VIP's rate limits.
    pub rate_limited: u64,
}

/// Per-backend counters (per CPU).
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct BackendStats {
    pub packets: u64,
    pub bytes: u64,
}

/// Why a packet was passed to the kernel or dropped. Index into
/// REASON_STATS. Forwarded packets are counted per VIP and per backend.
#[repr(u32)]
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum Reason {
    /// Frame too short for its Ethernet (or VLAN) header.
    PassShortFrame = 0,
    /// Neither IPv4 nor IPv6 (ARP, LLDP…), or more than one VLAN tag.
    PassNotIp = 1,
    /// IPv4 or TCP/UDP header truncated or invalid, not for a VIP address.
    PassMalformed = 2,
    /// Not addressed to a configured VIP (address, port, protocol).
    PassNotVip = 3,
    /// A fragment not addressed to a VIP address.
    PassFragment = 4,
    /// A fragment addressed to a VIP address: it cannot be steered by flow.
    DropFragment = 5,
    /// Addressed to a VIP address, with a truncated or invalid IPv4, TCP or
    /// UDP header.
    DropMalformed = 6,
    /// The VIP's ring has no usable backend for this flow.
    DropNoBackend = 7,
    /// The backend's egress interface is missing from TX_PORTS.
    DropNoTxPort = 8,
    /// Addressed to a VIP, longer than the egress interfaces' MTU (a GRO
    /// aggregate in generic mode): forwarding it would fail or be wrong.
    DropTooBig = 9,
    /// Addressed to an encapsulating VIP, fits the egress MTU but not with
    /// the outer header, DF set: answered with ICMP "fragmentation needed"
    /// (sent back out, `XDP_TX`), so the client lowers its path MTU; for
    /// IPv6 (no DF), answered with ICMPv6 "packet too big".
    TxIcmpTooBig = 10,
    /// As [`Reason::TxIcmpTooBig`] with DF clear: dropped (lb never
    /// fragments).
    DropTooBigNoDf = 11,
    /// The driver left no room in front of the frame for an outer header
    /// (or an ICMP answer).
    DropNoHeadroom = 12,
    /// An ICMP or ICMPv6 echo request to a VIP address that answers echo:
    /// answered by lb itself (sent back out, `XDP_TX`).
    TxIcmpEchoReply = 13,
    /// An ICMP "fragmentation needed" (or ICMPv6 "packet too big") to a
    /// VIP address about a packet a backend sent from the VIP: forwarded
    /// to the backend that owns the embedded flow (its conntrack entry,
    /// else the ring), in the VIP's forwarding mode, so path MTU discovery
    /// works for backends.
    FwdIcmpError = 14,
    /// IPv6 with more extension headers before the L4 header than the
    /// fast path walks ([`MAX_IPV6_EXT_HEADERS`]), not to a VIP address.
    PassTooManyExtHeaders = 15,
    /// As [`Reason::PassTooManyExtHeaders`], to a VIP address: it cannot
    /// be steered and must not reach the host's stack as if it were.
    DropTooManyExtHeaders = 16,
    /// A VIP's forwarding mode the fast path cannot apply to this packet:
    /// an IPv6 VIP's IPv4 backend in a tunnel mode (6in4, which lb does
    /// not send). Dropped, never misdelivered.
    DropUnsupportedForwarding = 17,
    /// A new NAT flow found no free SNAT port (every port it may try is
    /// held by a live flow): refused, never overwriting a live flow.
    DropNatPortsExhausted = 18,
    /// A new NAT flow could not be recorded: the NAT maps are full.
    DropNatTableFull = 19,
    /// To a SNAT port of the NAT range but no NAT flow's reply: passed to
    /// the kernel untouched.
    PassNatNoFlow = 20,
    /// A TCP SYN steered by the ring without being recorded (the SYN-flood
    /// guard, [`Runtime::syn_guard`]): its flow is recorded by its first
    /// packet without SYN. Forwarded; counted here besides the VIP's and
    /// the backend's packets.
    FwdSynUnrecorded = 21,
    /// Refused by a VIP's rate limits (new connections or packets per
    /// source, new connections to the VIP): dropped.
    DropRateLimited = 22,
    /// The VIP's source access control denies the packet's source.
    DropAclDenied = 23,
}

/// Extension headers (hop-by-hop, routing, destination options) the fast
/// path skips in front of an IPv6 packet's L4 header; more are counted and
/// not steered. Real traffic carries at most two or three.
pub const MAX_IPV6_EXT_HEADERS: u32 = 4;

impl Reason {
    pub const COUNT: u32 = 24;
    pub const ALL: [Reason; Self::COUNT as usize] = [
        Reason::PassShortFrame,
        Reason::PassNotIp,
        Reason::PassMalformed,
        Reason::PassNotVip,
        Reason::PassFragment,
        Reason::DropFragment,
        Reason::DropMalformed,
        Reason::DropNoBackend,
        Reason::DropNoTxPort,
        Reason::DropTooBig,
        Reason::TxIcmpTooBig,
        Reason::DropTooBigNoDf,
        Reason::DropNoHeadroom,
        Reason::TxIcmpEchoReply,
        Reason::FwdIcmpError,
        Reason::PassTooManyExtHeaders,
        Reason::DropTooManyExtHeaders,
        Reason::DropUnsupportedForwarding,
        Reason::DropNatPortsExhausted,
        Reason::DropNatTableFull,
        Reason::PassNatNoFlow,
        Reason::FwdSynUnrecorded,
        Reason::DropRateLimited,
        Reason::DropAclDenied,
    ];

    pub const fn name(self) -> &'static str {
        match self {
            Reason::PassShortFrame => "pass_short_frame",
            Reason::PassNotIp => "pass_not_ip",
            Reason::PassMalformed => "pass_malformed",
            Reason::PassNotVip => "pass_not_vip",
            Reason::PassFragment => "pass_fragment",
            Reason::DropFragment => "drop_fragment",
            Reason::DropMalformed => "drop_malformed",
            Reason::DropNoBackend => "drop_no_backend",
            Reason::DropNoTxPort => "drop_no_tx_port",
            Reason::DropTooBig => "drop_too_big",
            Reason::TxIcmpTooBig => "tx_icmp_too_big",
            Reason::DropTooBigNoDf => "drop_too_big_no_df",
            Reason::DropNoHeadroom => "drop_no_headroom",
            Reason::TxIcmpEchoReply => "tx_icmp_echo_reply",
            Reason::FwdIcmpError => "fwd_icmp_error",
            Reason::PassTooManyExtHeaders => "pass_too_many_ext_headers",
            Reason::DropTooManyExtHeaders => "drop_too_many_ext_headers",
            Reason::DropUnsupportedForwarding => "drop_unsupported_forwarding",
            Reason::DropNatPortsExhausted => "drop_nat_ports_exhausted",
            Reason::DropNatTableFull => "drop_nat_table_full",
            Reason::PassNatNoFlow => "pass_nat_no_flow",
            Reason::FwdSynUnrecorded => "fwd_syn_unrecorded",
            Reason::DropRateLimited => "drop_rate_limited",
            Reason::DropAclDenied => "drop_acl_denied",
        }
    }

    pub const fn is_drop(self) -> bool {
        matches!(
            self,
            Reason::DropFragment
                | Reason::DropMalformed
                | Reason::DropNoBackend
                | Reason::DropNoTxPort
                | Reason::DropTooBig
                | Reason::DropTooBigNoDf
                | Reason::DropNoHeadroom
                | Reason::DropTooManyExtHeaders
                | Reason::DropUnsupportedForwarding
                | Reason::DropNatPortsExhausted
                | Reason::DropNatTableFull
                | Reason::DropAclDenied
                | Reason::DropRateLimited
        )
    }
}

const _: () = {
    assert!(size_of::<ratelimit::RateLimits>() == 32);
    assert!(size_of::<ratelimit::RateKey>() == 24);
    assert!(size_of::<ratelimit::Bucket>() == 32);
    assert!(size_of::<VipKey>() == 8);
    assert!(size_of::<VipInfo>() == 16);
    assert!(size_of::<VipSlot>() == 24);
    assert!(size_of::<Backend>() == 68);
    assert!(size_of::<VipKey6>() == 20);
    assert!(size_of::<VipSlot6>() == 36);
    assert!(size_of::<FlowKey6>() == 40);
    assert!(size_of::<FlowCacheEntry6>() == 48);
    assert!(size_of::<FlowKey>() == 16);
    assert!(size_of::<FlowEntry>() == 16);
    assert!(size_of::<FlowCacheEntry>() == 24);
    assert!(size_of::<Runtime>() == 32);
    assert!(size_of::<VipStats>() == 64);
    assert!(size_of::<BackendStats>() == 16);
};

/// Hash of a flow's 5-tuple, fields as on the wire.
///
/// Two rounds of 64-bit multiply-xorshift mixing: a handful of instructions
/// in BPF, and well spread even for flows that differ in one source port.
/// The constants are fixed (no per-host seed) so that several lb hosts
/// behind ECMP pick the same backend for a flow.
#[inline(always)]
pub fn flow_hash(src_addr: u32, dst_addr: u32, src_port: u16, dst_port: u16, proto: u8) -> u32 {
    let a = ((src_addr as u64) << 32) | dst_addr as u64;
    let b = flow_hash_ports(src_port, dst_port, proto);
    flow_hash_finish(a.wrapping_mul(FLOW_K1) ^ b.wrapping_add(FLOW_K2).wrapping_mul(FLOW_K3))
}

/// The flow hashes' fixed multipliers (both families).
pub(crate) const FLOW_K1: u64 = 0x9E37_79B9_7F4A_7C15;
pub(crate) const FLOW_K2: u64 = 0xBF58_476D_1CE4_E5B9;
pub(crate) const FLOW_K3: u64 = 0x94D0_49BB_1331_11EB;

/// Ports and protocol as one word, for both families' flow hashes.
#[inline(always)]
pub(crate) const fn flow_hash_ports(src_port: u16, dst_port: u16, proto: u8) -> u64 {
    ((src_port as u64) << 32) | ((dst_port as u64) << 8) | proto as u64
}

/// The flow hashes' last two multiply-xorshift rounds, folded to 32 bits.
#[inline(always)]
pub(crate) const fn flow_hash_finish(mut h: u64) -> u32 {
    h ^= h >> 31;
    h = h.wrapping_mul(FLOW_K2);
    h ^= h >> 29;
    h = h.wrapping_mul(FLOW_K3);
    h ^= h >> 32;
    h as u32
}

/// Maps a 32-bit hash onto `0..ring_size` without a division
/// (multiply-shift range reduction).
#[inline(always)]
pub fn ring_slot(hash: u32, ring_size: u32) -> u32 {
    ((hash as u64 * ring_size as u64) >> 32) as u32
}

mod v6;
pub use v6::*;

#[cfg(feature = "user")]
mod pod {
    use super::*;
    // SAFETY: all of these are #[repr(C)], contain only integers and byte
    // arrays, and have no implicit padding (sizes asserted above).
    unsafe impl aya::Pod for VipKey {}
    unsafe impl aya::Pod for VipInfo {}
    unsafe impl aya::Pod for VipSlot {}
    unsafe impl aya::Pod for Backend {}
    unsafe impl aya::Pod for FlowKey {}
    unsafe impl aya::Pod for FlowEntry {}
    unsafe impl aya::Pod for Runtime {}
    unsafe impl aya::Pod for SynWindow {}
    unsafe impl aya::Pod for crate::ratelimit::RateLimits {}
    unsafe impl aya::Pod for crate::ratelimit::RateKey {}
    unsafe impl aya::Pod for crate::ratelimit::Bucket {}
    unsafe impl aya::Pod for VipStats {}
    unsafe impl aya::Pod for BackendStats {}
    unsafe impl aya::Pod for VipKey6 {}
    unsafe impl aya::Pod for VipSlot6 {}
    unsafe impl aya::Pod for FlowKey6 {}
    unsafe impl aya::Pod for FlowCacheEntry6 {}
    unsafe impl aya::Pod for nat::NatFwd {}
    unsafe impl aya::Pod for nat::NatRev {}
    unsafe impl aya::Pod for nat::NatSnat {}
    unsafe impl aya::Pod for nat::NatFwdCache {}
    unsafe impl aya::Pod for nat::NatRevCache {}
    unsafe impl aya::Pod for sched::SchedInfo {}
    unsafe impl aya::Pod for sched::SchedSlot {}
}

#[cfg(test)]
mod tests {
    extern crate std;
    use super::*;

    #[test]
    fn ring_slot_stays_in_range() {
        for m in [2u32, 13, 65537, 655373] {
            for h in [0u32, 1, 0x8000_0000, u32::MAX] {
                assert!(ring_slot(h, m) < m);
            }
        }
        assert_eq!(ring_slot(u32::MAX, 65537), 65536);
        assert_eq!(ring_slot(0, 65537), 0);
    }

    #[test]
    fn hash_spreads_adjacent_source_ports() {
        // 60,000 flows differing only in the source port, reduced onto 16
        // buckets: every bucket within 10% of the mean.
        let mut buckets = [0u32; 16];
        for port in 1000u16..61000 {
            let k = FlowKey::new(0xC612_0001, port, 0xC612_0A01, 80, IPPROTO_TCP);
            buckets[ring_slot(k.hash(), 16) as usize] += 1;
        }
        let mean = 60000 / 16;
        for b in buckets {
            assert!(b.abs_diff(mean) < mean / 10, "{buckets:?}");
        }
    }

    #[test]
    fn vip_table_homes_spread_services_of_one_address() {
        // 16 ports of one address in a 64-slot table: no slot is home to
        // more than 3 of them.
        let mut homes = [0u32; 64];
        for port in 1000..1016 {
            homes[vip_table_index(&VipKey::new(0xC613_0001, port, IPPROTO_TCP), 63) as usize] += 1;
        }
        assert!(homes.iter().all(|&n| n <= 3), "{homes:?}");
        assert_eq!(vip_table_size(4), 64);
        assert_eq!(vip_table_size(64), 512);
    }

    #[test]
    fn vip_probe_sequence_starts_home_and_wraps() {
        let key = VipKey::new(0xC613_0001, 80, IPPROTO_TCP);
        let home = vip_table_index(&key, 63);
        let seq: std::vec::Vec<u32> = vip_table_probe(&key, 63).collect();
        assert_eq!(seq.len(), VIP_TABLE_PROBES as usize);
        for (i, &at) in seq.iter().enumerate() {
            assert_eq!(at, (home + i as u32) % 64);
        }
    }

    #[test]
    fn flow_cache_slot_is_in_range() {
        for port in [0u16, 1, 80, 40000, u16::MAX] {
            let k = FlowKey::new(0xC612_0001, port, 0xFFFF_FFFF, 80, IPPROTO_TCP);
            assert!(flow_cache_slot(flow_cache_mix(&k)) < FLOW_CACHE_SLOTS);
        }
    }

    #[test]
    fn the_syn_guard_trips_over_the_threshold_and_holds_for_the_next_tick() {
        let mut w = SynWindow::default();
        // Threshold 4: three SYNs per tick are recorded, the fourth is not.
        fn tick<const N: usize>(w: &mut SynWindow, now: u64) -> [bool; N] {
            core::array::from_fn(|_| w.count_syn(now, 4))
        }
        assert_eq!(tick::<3>(&mut w, 100), [false, false, false]);
        assert_eq!(tick::<5>(&mut w, 200), [false, false, false, true, true]);
        // The tick after a flooded one: guarded from its first SYN.
        assert_eq!(tick::<1>(&mut w, 300), [true]);
        // That one was quiet: the next records again.
        assert_eq!(tick::<2>(&mut w, 400), [false, false]);
        assert_eq!(tick::<4>(&mut w, 500), [false, false, false, true]);
        // A flooded tick followed by a gap of silent ticks ends the flood.
        assert_eq!(tick::<1>(&mut w, 900), [false]);
        // Threshold 1: every SYN unrecorded.
        let mut w = SynWindow::default();
        assert!(w.count_syn(100, 1));
        assert!(w.count_syn(200, 1));
    }

    #[test]
    fn expiry_follows_protocol_and_closing_and_zero_means_never() {
        let rt = Runtime {
            now_ms: 10_000,
            udp_idle_ms: 1_000,
            tcp_idle_ms: 5_000,
            tcp_closing_ms: 2_000,
            ..Runtime::default()
        };
        let e = |flags, last_seen_ms| FlowEntry {
            backend_id: 1,
            flags,
            last_seen_ms,
        };
        let (tcp, udp) = (IPPROTO_TCP as u32, IPPROTO_UDP as u32);
        assert!(!e(0, 9_000).is_expired(udp, &rt));
        assert!(e(0, 8_999).is_expired(udp, &rt));
        assert!(!e(0, 5_000).is_expired(tcp, &rt));
        assert!(e(0, 4_999).is_expired(tcp, &rt));
        assert!(!e(FLOW_FLAG_CLOSING, 8_000).is_expired(tcp, &rt));
        assert!(e(FLOW_FLAG_CLOSING, 7_999).is_expired(tcp, &rt));
        // Seen "after" now (a clock behind the record): not expired.
        assert!(!e(0, 20_000).is_expired(udp, &rt));
        // No agent yet: nothing expires.
        assert!(!e(0, 0).is_expired(
            udp,
            &Runtime {
                now_ms: u64::MAX,
                ..Runtime::default()
            }
        ));
    }

    #[test]
    fn gue_source_ports_stay_in_the_dynamic_range_and_spread() {
        let mut seen = std::collections::BTreeSet::new();
        for port in 1000u16..5000 {
            let k = FlowKey::new(0xC612_0001, port, 0xC612_0A01, 80, IPPROTO_TCP);
            let p = gue_source_port(k.hash());
            assert!(p >= 0xC000, "{p}");
            seen.insert(p);
        }
        // 4000 flows over 16384 ports: most get a port of their own.
        assert!(seen.len() > 3400, "{}", seen.len());
        assert_eq!(gue_source_port(u32::MAX), 0xFFFF);
        assert_eq!(gue_source_port(0x4000), 0xC000);
    }

    #[test]
    fn the_flow_hashes_are_fixed_values() {
        // lb hosts behind ECMP, possibly of different versions, must pick
        // the same backend: the hashes never change. Values computed by an
        // independent implementation of the documented rounds.
        assert_eq!(
            flow_hash(0x0200_12c6, 0x010a_12c6, 0x409c, 0x5000, 6),
            0x6761_0d0a
        );
        assert_eq!(flow_hash(1, 2, 3, 4, 17), 0x006d_f5e8);
        assert_eq!(
            crate::v6::flow_hash6(&[1, 2, 3, 4], &[5, 6, 7, 8], 0x409c, 0x5000, 6),
            0xbd60_e11e
        );
    }

    #[test]
    fn constructors_store_network_order() {
        let k = VipKey::new(0xC612_0A01, 80, IPPROTO_TCP);
        assert_eq!(k.addr.to_ne_bytes(), [198, 18, 10, 1]);
        assert_eq!(k.port.to_ne_bytes(), [0, 80]);
    }
}
