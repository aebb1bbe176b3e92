//! Where a backend is reached at L2: the egress interface (route lookup in
//! /proc/net/route) and the next hop's MAC (the kernel's neighbour table,
//! /proc/net/arp, primed by a datagram when the entry is missing).
//!
//! The agent resolves MACs and stores them in the backend map rather than
//! calling `bpf_fib_lookup` per packet: one array lookup the fast path
//! already does, instead of a helper call on every packet.

use std::{
    fs,
    net::{Ipv4Addr, UdpSocket},
    time::{Duration, Instant},
};

use thiserror::Error;

use crate::mac::MacAddr;

#[derive(Debug, Error)]
pub enum NeighError {
    #[error("no route to {0}")]
    NoRoute(Ipv4Addr),
    #[error(
        "{addr} is reached through gateway {gateway}: direct server return needs backends on the same L2 segment"
    )]
    NotOnLink { addr: Ipv4Addr, gateway: Ipv4Addr },
    #[error("no ARP answer from {addr} on {iface}")]
    Unresolved { addr: Ipv4Addr, iface: String },
    #[error("{path}: {source}")]
    Io {
        path: String,
        source: std::io::Error,
    },
}

/// How to reach one backend.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct NextHop {
    pub iface: String,
    pub ifindex: u32,
    pub src_mac: [u8; 6],
    pub dst_mac: [u8; 6],
}

fn read(path: &str) -> Result<String, NeighError> {
    fs::read_to_string(path).map_err(|source| NeighError::Io {
        path: path.into(),
        source,
    })
}

/// Longest-prefix match in /proc/net/route: (interface, gateway if any).
pub fn route(addr: Ipv4Addr) -> Result<(String, Option<Ipv4Addr>), NeighError> {
    let table = read("/proc/net/route")?;
    let a = u32::from(addr);
    let mut best: Option<(u32, String, Option<Ipv4Addr>)> = None;
    for line in table.lines().skip(1) {
        let f: Vec<&str> = line.split_whitespace().collect();
        if f.len() < 8 {
            continue;
        }
        // Fields are the address bytes in memory order, printed as a
        // native (little-endian here) u32 in hex.
        let hex = |s: &str| {
            u32::from_str_radix(s, 16)
                .ok()
                .map(|v| u32::from(Ipv4Addr::from(v.to_ne_bytes())))
        };
        let (Some(dest), Some(gw), Some(mask)) = (hex(f[1]), hex(f[2]), hex(f[7])) else {
            continue;
        };
        if a & mask != dest {
            continue;
        }
        if best
            .as_ref()
            .is_none_or(|(m, ..)| mask.count_ones() > m.count_ones())
        {
            let gw = (gw != 0).then(|| Ipv4Addr::from(gw));
            best = Some((mask, f[0].to_string(), gw));
        }
    }
    best.map(|(_, iface, gw)| (iface, gw))
        .ok_or(NeighError::NoRoute(addr))
}

/// The interface's own MAC, asked of the kernel (SIOCGIFHWADDR) in the
/// caller's network namespace. Not read from /sys/class/net: a process
/// that entered a namespace with setns(2) still sees the sysfs of the
/// namespace that mounted it.
pub fn iface_mac(iface: &str) -> Result<[u8; 6], NeighError> {
    let err = |source| NeighError::Io {
        path: format!("SIOCGIFHWADDR {iface}"),
        source,
    };
    if iface.len() >= libc::IFNAMSIZ {
        return Err(err(std::io::Error::other("interface name too long")));
    }
    // SAFETY: a plain datagram socket, closed below.
    let fd = unsafe { libc::socket(libc::AF_INET, libc::SOCK_DGRAM | libc::SOCK_CLOEXEC, 0) };
    if fd < 0 {
        return Err(err(std::io::Error::last_os_error()));
    }
    // SAFETY: ifreq is plain data; the name is NUL-terminated (zeroed and
    // shorter than IFNAMSIZ).
    let mut req: libc::ifreq = unsafe { std::mem::zeroed() };
    for (d, s) in req.ifr_name.iter_mut().zip(iface.as_bytes()) {
        *d = *s as libc::c_char;
    }
    // SAFETY: fd is valid and req is a properly sized ifreq.
    let rc = unsafe { libc::ioctl(fd, libc::SIOCGIFHWADDR, &mut req) };
    let e = std::io::Error::last_os_error();
    // SAFETY: fd is ours.
    unsafe { libc::close(fd) };
    if rc != 0 {
        return Err(err(e));
    }
    // SAFETY: SIOCGIFHWADDR fills ifru_hwaddr.
    let data = unsafe { req.ifr_ifru.ifru_hwaddr.sa_data };
    let mut mac = [0u8; 6];
    for (m, d) in mac.iter_mut().zip(data.iter()) {
        *m = *d as u8;
    }
    Ok(mac)
}

/// The complete ARP entry for `addr` on `iface`, if the kernel has one.
pub fn arp_entry(addr: Ipv4Addr, iface: &str) -> Result<Option<[u8; 6]>, NeighError> {
    let table = read("/proc/net/arp")?;
    let want = addr.to_string();
    Ok(table.lines().skip(1).find_map(|line| {
        let f: Vec<&str> = line.split_whitespace().collect();
        // IP address, HW type, Flags, HW address, Mask, Device
        let complete = f
            .get(2)
            .and_then(|fl| u32::from_str_radix(fl.trim_start_matches("0x"), 16).ok())
            .is_some_and(|fl| fl & 0x2 != 0);
        (f.len() >= 6 && f[0] == want && f[5] == iface && complete)
            .then(|| f[3].parse::<MacAddr>().ok().map(MacAddr::octets))
            .flatten()
    }))
}

/// Resolves how to reach `addr`, waiting up to `wait` for ARP.
pub fn resolve(addr: Ipv4Addr, wait: Duration) -> Result<NextHop, NeighError> {
    let (iface, gateway) = route(addr)?;
    if let Some(gateway) = gateway {
        return Err(NeighError::NotOnLink { addr, gateway });
    }
    let ifindex = crate::datapath::ifindex(&iface).map_err(|_| NeighError::NoRoute(addr))?;
    let src_mac = iface_mac(&iface)?;
    let deadline = Instant::now() + wait;
    let mut primed = false;
    loop {
        if let Some(dst_mac) = arp_entry(addr, &iface)? {
            return Ok(NextHop {
                iface,
                ifindex,
                src_mac,
                dst_mac,
            });
        }
        if !primed {
            // Any datagram makes the kernel send an ARP request; port 9
            // is "discard".
            if let Ok(s) = UdpSocket::bind("0.0.0.0:0") {
                let _ = s.send_to(&[0], (addr, 9));
            }
            primed = true;
        }
        if Instant::now() >= deadline {
            return Err(NeighError::Unresolved { addr, iface });
        }
        std::thread::sleep(Duration::from_millis(20));
    }
}

/// Where the agent learns next hops: the kernel's tables in production, a
/// fixed table in tests.
pub trait NextHopSource {
    /// Starts resolving `addr` without waiting (an ARP request goes out).
    fn prime(&mut self, addr: Ipv4Addr);
    /// How to reach `addr`, waiting up to `wait` for ARP. With `mac` (an
    /// operator's override) only the egress interface is looked up.
    fn next_hop(
        &mut self,
        addr: Ipv4Addr,
        mac: Option<[u8; 6]>,
        wait: Duration,
    ) -> Result<NextHop, NeighError>;
}

/// The kernel's routing and neighbour tables of the current namespace.
pub struct KernelTables;

impl NextHopSource for KernelTables {
    fn prime(&mut self, addr: Ipv4Addr) {
        let _ = resolve(addr, Duration::ZERO);
    }

    fn next_hop(
        &mut self,
        addr: Ipv4Addr,
        mac: Option<[u8; 6]>,
        wait: Duration,
    ) -> Result<NextHop, NeighError> {
        let Some(dst_mac) = mac else {
            return resolve(addr, wait);
        };
        let (iface, _) = route(addr)?;
        Ok(NextHop {
            ifindex: crate::datapath::ifindex(&iface).map_err(|_| NeighError::NoRoute(addr))?,
            src_mac: iface_mac(&iface)?,
            iface,
            dst_mac,
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn loopback_routes_nowhere_but_lo_is_known() {
        // Every namespace has lo; its MAC is all zeros.
        assert_eq!(iface_mac("lo").unwrap(), [0; 6]);
    }
}
