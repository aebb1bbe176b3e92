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

/// The only element of DECAP_CONFIG.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct DecapConfig {
    /// GUE destination port, network byte order; 0 turns GUE off.
    pub gue_port: u16,
    pub _pad: u16,
    pub _reserved: u32,
}

const _: () = assert!(size_of::<DecapConfig>() == 8);

impl DecapConfig {
    /// `port` in host order.
    pub const fn new(port: u16) -> Self {
        Self {
            gue_port: port.to_be(),
            _pad: 0,
            _reserved: 0,
        }
    }

    /// The GUE port in host order (0: GUE off).
    pub const fn port(&self) -> u16 {
        u16::from_be(self.gue_port)
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
    fn the_port_is_stored_in_network_order() {
        let c = DecapConfig::new(6080);
        assert_eq!(c.gue_port.to_ne_bytes(), 6080u16.to_be_bytes());
        assert_eq!(c.port(), 6080);
    }
}
