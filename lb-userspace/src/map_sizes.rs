//! Sizes of the kernel maps, fixed when the maps are created.

/// Sizes of the kernel maps.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct MapSizes {
    pub max_vips: u32,
    pub max_backends: u32,
    /// Ring stride: every VIP owns `ring_size` consecutive RINGS elements,
    /// and a VIP's own ring size may be anything up to it.
    pub ring_size: u32,
    pub conntrack_entries: u32,
    /// Elements of CONNTRACK6 (IPv6 flows); the agent gives it
    /// `conntrack_entries`.
    pub conntrack6_entries: u32,
    /// Elements of each NAT map (NAT_FWD, NAT_REV, NAT_FWD6, NAT_REV6).
    pub nat_entries: u32,
    /// Elements of each ACL trie (ACL4, ACL6): every VIP's prefixes of
    /// the family, both banks during a switch.
    pub acl_entries: u32,
}

impl MapSizes {
    /// Elements of the backend arrays: ids `0..=max_backends`, id 0 never
    /// given out (see [`lb_common::FIRST_BACKEND_ID`]).
    pub fn backend_slots(&self) -> u32 {
        self.max_backends.saturating_add(1)
    }
}

impl Default for MapSizes {
    fn default() -> Self {
        Self {
            max_vips: lb_common::DEFAULT_MAX_VIPS,
            max_backends: lb_common::DEFAULT_MAX_BACKENDS,
            ring_size: lb_common::DEFAULT_RING_SIZE,
            conntrack_entries: lb_common::DEFAULT_CONNTRACK_ENTRIES,
            conntrack6_entries: lb_common::DEFAULT_CONNTRACK_ENTRIES,
            nat_entries: lb_common::DEFAULT_NAT_ENTRIES,
            acl_entries: lb_common::acl::DEFAULT_ACL_ENTRIES,
        }
    }
}
