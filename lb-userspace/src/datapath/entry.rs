//! Reading and completing backend entries of either family: the address
//! an entry names and the outer source it gives encapsulated packets.

use std::net::{IpAddr, Ipv4Addr};

use lb_common::Backend;

/// The address a backend entry names.
pub fn backend_address(b: &Backend) -> IpAddr {
    if b.flags & lb_common::BACKEND_FLAG_V6 != 0 {
        IpAddr::V6(lb_common::addr6_of_words(b.addr6))
    } else {
        IpAddr::V4(Ipv4Addr::from(u32::from_be(b.addr)))
    }
}

/// The outer source a backend entry gives encapsulated packets (of the
/// backend's family), if any.
pub fn backend_encap_source(b: &Backend) -> Option<IpAddr> {
    if b.flags & lb_common::BACKEND_FLAG_V6 != 0 {
        (b.encap_src6 != [0; 4]).then(|| IpAddr::V6(lb_common::addr6_of_words(b.encap_src6)))
    } else {
        (b.encap_src != 0).then(|| IpAddr::V4(Ipv4Addr::from(u32::from_be(b.encap_src))))
    }
}

/// Sets the outer source of encapsulated packets in a backend entry: the
/// IPv4 or IPv6 field, by the source's family.
pub fn set_encap_source(b: &mut Backend, source: Option<IpAddr>) {
    match source {
        Some(IpAddr::V4(a)) => b.encap_src = a.to_bits().to_be(),
        Some(IpAddr::V6(a)) => b.encap_src6 = lb_common::addr6_words(a),
        None => {}
    }
}
