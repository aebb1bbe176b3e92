//! Types shared by the backend-side decapsulation program (`lb_decap`, the
//! `lb-decap` object of lb-ebpf) and `lb decap` (lb-userspace). A separate
//! object with maps of its own: loading it on a backend creates none of the
//! balancer's maps.

use core::mem::size_of;

/// The program's name in the `lb-decap` object.
pub const PROGRAM: &str = "lb_decap";

/// Map names, as `lb decap` pins them under `/sys/fs/bpf/lb-decap/<IF>/`.
pub mod map_names {
    /// LPM trie of allowed outer IPv4 sources: `Key<[u8; 4]>` → u32.
    pub const ALLOW_V4: &str = "DECAP_ALLOW_V4";
    /// LPM trie of allowed outer IPv6 sources: `Key<[u8; 16]>` → u32.
    pub const ALLOW_V6: &str = "DECAP_ALLOW_V6";
    /// One element: [`super::DecapConfig`].
    pub const CONFIG: &str = "DECAP_CONFIG";
    /// Per-CPU u64 per [`super::DecapReason`].
    pub const STATS: &str = "DECAP_STATS";
}

/// The GUE port Katran and lb's balancer use unless configured otherwise.
pub const DEFAULT_GUE_PORT: u16 = 6080;

/// Capacity of each allow-list (prefixes).
pub const MAX_ALLOW_PREFIXES: u32 = 1024;

/// IP protocol numbers of the tunnels the program strips.
pub const IPPROTO_IPIP: u8 = 4;
pub const IPPROTO_IPV6: u8 = 41;

/// Prefixes per family the program checks inline (from DECAP_CONFIG)
/// instead of looking the outer source up in the LPM trie: a backend
/// usually allows one or two load balancers, and a few mask-and-compare
/// steps cost less than a trie lookup. Longer lists use the trie.
pub const INLINE_PREFIXES: usize = 8;

/// A family's inline count meaning "look the source up in the trie".
pub const USE_TRIE: u32 = u32::MAX;

/// An IPv4 prefix as the program compares it: `source & mask == addr`,
/// both words as loaded from the packet (network byte order in memory).
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct InlinePrefix4 {
    pub addr: u32,
    pub mask: u32,
}

/// An IPv6 prefix, as two 64-bit words each (network byte order in
/// memory): two masked compares per prefix.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct InlinePrefix6 {
    pub addr: [u64; 2],
    pub mask: [u64; 2],
}

impl InlinePrefix4 {
    /// `octets/len` (host bits must already be zero).
    pub fn new(octets: [u8; 4], len: u8) -> Self {
        let mask = u32::MAX.checked_shl(32 - len as u32).unwrap_or(0);
        Self {
            addr: u32::from_ne_bytes(octets) & mask.to_be(),
            mask: mask.to_be(),
        }
    }

    /// What the program decides for `source`.
    pub fn matches(&self, source: [u8; 4]) -> bool {
        u32::from_ne_bytes(source) & self.mask == self.addr
    }
}

impl InlinePrefix6 {
    pub fn new(octets: [u8; 16], len: u8) -> Self {
        let mask = u128::MAX.checked_shl(128 - len as u32).unwrap_or(0);
        let m = mask.to_be_bytes();
        let word = |b: &[u8; 16], i: usize| {
            u64::from_ne_bytes(b[i * 8..i * 8 + 8].try_into().expect("8 bytes"))
        };
        let mask = [word(&m, 0), word(&m, 1)];
        Self {
            addr: [word(&octets, 0) & mask[0], word(&octets, 1) & mask[1]],
            mask,
        }
    }

    pub fn matches(&self, source: [u8; 16]) -> bool {
        let word =
            |i: usize| u64::from_ne_bytes(source[i * 8..i * 8 + 8].try_into().expect("8 bytes"));
        word(0) & self.mask[0] == self.addr[0] && word(1) & self.mask[1] == self.addr[1]
    }
}

/// The only element of DECAP_CONFIG.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct DecapConfig {
    /// GUE destination port, network byte order; 0 turns GUE off.
    pub gue_port: u16,
    pub _pad: u16,
    /// Prefixes of `v4` in use (0: no IPv4 source is allowed), or
    /// [`USE_TRIE`]: the list is longer than [`INLINE_PREFIXES`].
    pub v4_count: u32,
    /// The same for `v6`.
    pub v6_count: u32,
    pub _reserved: u32,
    pub v4: [InlinePrefix4; INLINE_PREFIXES],
    pub v6: [InlinePrefix6; INLINE_PREFIXES],
}

const _: () = assert!(size_of::<DecapConfig>() == 16 + 8 * 8 + 8 * 32);

impl DecapConfig {
    /// `port` in host order, no source allowed.
    pub fn new(port: u16) -> Self {
        Self {
            gue_port: port.to_be(),
            ..Self::default()
        }
    }

    /// The GUE port in host order (0: GUE off).
    pub const fn port(&self) -> u16 {
        u16::from_be(self.gue_port)
    }

    /// Both families looked up in the trie (the inline entries kept).
    pub fn trie_only(mut self) -> Self {
        self.v4_count = USE_TRIE;
        self.v6_count = USE_TRIE;
        self
    }
}

/// Why the decap program passed or dropped a frame: one counter each.
#[repr(u32)]
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum DecapReason {
    /// IP-in-IP (4in4, 6in4, 6in6, 4in6) stripped, inner packet passed up.
    DecapIpip = 0,
    /// GUE (variant 1: IP directly in UDP) stripped, inner packet passed up.
    DecapGue = 1,
    /// Not a tunnel packet (ARP, ICMP, TCP, UDP to other ports, short or
    /// unparsable frames): passed untouched.
    PassNotTunnel = 2,
    /// Outer IPv6 with extension headers: not parsed, passed untouched.
    PassIpv6ExtHeaders = 3,
    /// A tunnel packet from a source outside the allow-list.
    DropNotAllowed = 4,
    /// A tunnel packet whose outer or inner header is truncated or
    /// inconsistent (lengths, version).
    DropMalformed = 5,
    /// An outer IPv4 fragment of a tunnel protocol: it cannot be stripped
    /// alone.
    DropFragment = 6,
}

impl DecapReason {
    pub const COUNT: u32 = 7;
    pub const ALL: [DecapReason; Self::COUNT as usize] = [
        DecapReason::DecapIpip,
        DecapReason::DecapGue,
        DecapReason::PassNotTunnel,
        DecapReason::PassIpv6ExtHeaders,
        DecapReason::DropNotAllowed,
        DecapReason::DropMalformed,
        DecapReason::DropFragment,
    ];

    pub const fn name(self) -> &'static str {
        match self {
            DecapReason::DecapIpip => "decap_ipip",
            DecapReason::DecapGue => "decap_gue",
            DecapReason::PassNotTunnel => "pass_not_tunnel",
            DecapReason::PassIpv6ExtHeaders => "pass_ipv6_ext_headers",
            DecapReason::DropNotAllowed => "drop_not_allowed",
            DecapReason::DropMalformed => "drop_malformed",
            DecapReason::DropFragment => "drop_fragment",
        }
    }

    pub const fn is_drop(self) -> bool {
        matches!(
            self,
            DecapReason::DropNotAllowed | DecapReason::DropMalformed | DecapReason::DropFragment
        )
    }
}

#[cfg(feature = "user")]
mod pod {
    // SAFETY: #[repr(C)], integers only, no implicit padding (size
    // asserted above).
    unsafe impl aya::Pod for super::DecapConfig {}
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn reasons_are_indexed_by_their_value() {
        for (i, r) in DecapReason::ALL.iter().enumerate() {
            assert_eq!(*r as usize, i, "{}", r.name());
        }
    }

    #[test]
    fn inline_prefixes_match_like_a_prefix() {
        let p = InlinePrefix4::new([198, 18, 1, 0], 24);
        assert!(p.matches([198, 18, 1, 10]));
        assert!(!p.matches([198, 18, 2, 10]));
        assert!(InlinePrefix4::new([0; 4], 0).matches([1, 2, 3, 4]));
        let host = InlinePrefix4::new([198, 18, 1, 10], 32);
        assert!(host.matches([198, 18, 1, 10]) && !host.matches([198, 18, 1, 11]));
        let mut a = [0u8; 16];
        a[..6].copy_from_slice(&[0x20, 0x01, 0, 2, 0, 1]);
        let p6 = InlinePrefix6::new(a, 48);
        let mut inside = a;
        inside[15] = 7;
        inside[6] = 0xff;
        assert!(p6.matches(inside));
        let mut outside = a;
        outside[5] = 2;
        assert!(!p6.matches(outside));
        // A prefix longer than 64 bits compares the second word too.
        let p70 = InlinePrefix6::new(a, 70);
        let mut low = a;
        low[8] = 0x80;
        assert!(!p70.matches(low));
        low[8] = 0x01;
        assert!(p70.matches(low));
    }

    #[test]
    fn the_port_is_stored_in_network_order() {
        let c = DecapConfig::new(6080);
        assert_eq!(c.gue_port.to_ne_bytes(), 6080u16.to_be_bytes());
        assert_eq!(c.port(), 6080);
    }
}
