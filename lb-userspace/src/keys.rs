//! How the agent names a service and a backend of it.

use std::{
    fmt,
    net::{IpAddr, SocketAddr},
};

use lb_common::{VipKey, VipKey6};

use crate::{
    config::{Protocol, VipConfig},
    reconcile::VipEntryKey,
};

/// A service: address, port and protocol.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct VipId {
    pub address: IpAddr,
    pub port: u16,
    pub protocol: Protocol,
}

impl VipId {
    pub fn of(vip: &VipConfig) -> Self {
        Self {
            address: vip.address,
            port: vip.port,
            protocol: vip.protocol,
        }
    }

    /// The service's key in the kernel's VIP table of its family (VIPS
    /// or VIPS6).
    pub fn kernel_key(&self) -> VipEntryKey {
        let proto = self.protocol.number();
        match self.address {
            IpAddr::V4(a) => VipEntryKey::V4(VipKey::new(a.to_bits(), self.port, proto)),
            IpAddr::V6(a) => VipEntryKey::V6(VipKey6::new(a, self.port, proto)),
        }
    }

    /// The key of the address-only marker entry for this service's address.
    pub fn address_key(&self) -> VipEntryKey {
        match self.address {
            IpAddr::V4(a) => VipEntryKey::V4(VipKey::addr_only(a.to_bits())),
            IpAddr::V6(a) => VipEntryKey::V6(VipKey6::addr_only(a)),
        }
    }

    /// `ADDR:PORT` (`[ADDR]:PORT` for IPv6).
    pub fn socket_addr(&self) -> SocketAddr {
        SocketAddr::new(self.address, self.port)
    }
}

impl fmt::Display for VipId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}/{}", self.socket_addr(), self.protocol.as_str())
    }
}

/// One backend of one service (the same address may serve several).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct BackendKey {
    pub vip: VipId,
    pub address: IpAddr,
}

impl fmt::Display for BackendKey {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{} of {}", self.address, self.vip)
    }
}

/// `IpAddr::V4(Ipv4Addr::new(a, b, c, d))`, for tests.
#[cfg(test)]
pub(crate) const fn ip4(a: u8, b: u8, c: u8, d: u8) -> IpAddr {
    IpAddr::V4(std::net::Ipv4Addr::new(a, b, c, d))
}

/// The last byte of an address, for tests that number their backends.
#[cfg(test)]
pub(crate) fn last_octet(a: IpAddr) -> u8 {
    match a {
        IpAddr::V4(a) => a.octets()[3],
        IpAddr::V6(a) => a.octets()[15],
    }
}
