//! How the agent names a service and a backend of it.

use std::{fmt, net::Ipv4Addr};

use lb_common::VipKey;

use crate::config::{Protocol, VipConfig};

/// A service: address, port and protocol.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct VipId {
    pub address: Ipv4Addr,
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

    /// The service's key in the kernel's VIP table.
    pub fn kernel_key(&self) -> VipKey {
        VipKey::new(self.address.to_bits(), self.port, self.protocol.number())
    }

    /// The key of the address-only marker entry for this service's address.
    pub fn address_key(&self) -> VipKey {
        VipKey::addr_only(self.address.to_bits())
    }
}

impl fmt::Display for VipId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(
            f,
            "{}:{}/{}",
            self.address,
            self.port,
            self.protocol.as_str()
        )
    }
}

/// One backend of one service (the same address may serve several).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct BackendKey {
    pub vip: VipId,
    pub address: Ipv4Addr,
}

impl fmt::Display for BackendKey {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{} of {}", self.address, self.vip)
    }
}
