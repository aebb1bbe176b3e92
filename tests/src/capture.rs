//! Packet capture on one interface of a test namespace (an `AF_PACKET`
//! socket, both directions), to check what a host really sees on the wire:
//! for full NAT, that the client never sees a backend's address and the
//! backend never sees the client's.
//!
//! The socket is opened inside the namespace and read by a thread of its
//! own, bounded in frames and time; [`Capture::finish`] stops it and
//! returns the IP packets' endpoints.

use std::{
    net::{IpAddr, Ipv4Addr, Ipv6Addr},
    os::fd::{AsRawFd as _, FromRawFd as _, OwnedFd},
    sync::{
        Arc,
        atomic::{AtomicBool, Ordering},
    },
    thread::JoinHandle,
    time::{Duration, Instant},
};

use anyhow::{Context as _, Result, anyhow, ensure};

use crate::netns::Netns;

/// A capture stops by itself after this many frames…
const MAX_FRAMES: usize = 200_000;
/// …or this long.
const MAX_TIME: Duration = Duration::from_secs(120);

/// One captured IPv4/IPv6 TCP or UDP packet: its endpoints as on the wire.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Seen {
    pub src: IpAddr,
    pub dst: IpAddr,
    pub proto: u8,
    pub src_port: u16,
    pub dst_port: u16,
}

/// A running capture (see the module docs).
pub struct Capture {
    stop: Arc<AtomicBool>,
    reader: Option<JoinHandle<Result<Vec<Seen>>>>,
}

impl Capture {
    /// Starts capturing every frame `iface` (in `ns`) sends or receives.
    pub fn start(ns: &Netns, iface: &str) -> Result<Capture> {
        let name = iface.to_owned();
        let fd = ns.run(move || open_packet_socket(&name))??;
        let stop = Arc::new(AtomicBool::new(false));
        let flag = stop.clone();
        let reader = std::thread::Builder::new()
            .name(format!("capture {iface}"))
            .spawn(move || read_frames(&fd, &flag))
            .context("spawning the capture thread")?;
        Ok(Capture {
            stop,
            reader: Some(reader),
        })
    }

    /// Stops the capture: the TCP and UDP packets seen.
    pub fn finish(mut self) -> Result<Vec<Seen>> {
        self.stop.store(true, Ordering::Relaxed);
        self.reader
            .take()
            .expect("finished once")
            .join()
            .map_err(|_| anyhow!("the capture thread panicked"))?
    }
}

impl Drop for Capture {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::Relaxed);
        if let Some(r) = self.reader.take() {
            let _ = r.join();
        }
    }
}

pub(crate) fn open_packet_socket(iface: &str) -> Result<OwnedFd> {
    let eth_p_all = (libc::ETH_P_ALL as u16).to_be();
    // SAFETY: plain socket call.
    let raw = unsafe { libc::socket(libc::AF_PACKET, libc::SOCK_RAW, eth_p_all.into()) };
    ensure!(
        raw >= 0,
        "AF_PACKET socket: {}",
        std::io::Error::last_os_error()
    );
    // SAFETY: a fresh descriptor we own.
    let fd = unsafe { OwnedFd::from_raw_fd(raw) };
    let cname = std::ffi::CString::new(iface)?;
    // SAFETY: a valid C string.
    let ifindex = unsafe { libc::if_nametoindex(cname.as_ptr()) };
    ensure!(ifindex != 0, "no interface {iface}");
    // SAFETY: zeroed sockaddr_ll is valid; filled below.
    let mut sll: libc::sockaddr_ll = unsafe { std::mem::zeroed() };
    sll.sll_family = libc::AF_PACKET as u16;
    sll.sll_protocol = eth_p_all;
    sll.sll_ifindex = ifindex as i32;
    // SAFETY: sll is a sockaddr_ll of the given size.
    let rc = unsafe {
        libc::bind(
            fd.as_raw_fd(),
            (&sll as *const libc::sockaddr_ll).cast(),
            std::mem::size_of::<libc::sockaddr_ll>() as u32,
        )
    };
    ensure!(
        rc == 0,
        "binding to {iface}: {}",
        std::io::Error::last_os_error()
    );
    let tv = libc::timeval {
        tv_sec: 0,
        tv_usec: 100_000,
    };
    // SAFETY: a timeval of the right size.
    unsafe {
        libc::setsockopt(
            fd.as_raw_fd(),
            libc::SOL_SOCKET,
            libc::SO_RCVTIMEO,
            (&tv as *const libc::timeval).cast(),
            std::mem::size_of::<libc::timeval>() as u32,
        )
    };
    Ok(fd)
}

fn read_frames(fd: &OwnedFd, stop: &AtomicBool) -> Result<Vec<Seen>> {
    let started = Instant::now();
    let mut seen = Vec::new();
    let mut buf = vec![0u8; 65_536];
    let mut frames = 0;
    while !stop.load(Ordering::Relaxed) && frames < MAX_FRAMES && started.elapsed() < MAX_TIME {
        // SAFETY: buf is valid for its length.
        let n = unsafe { libc::recv(fd.as_raw_fd(), buf.as_mut_ptr().cast(), buf.len(), 0) };
        if n < 0 {
            let e = std::io::Error::last_os_error();
            match e.kind() {
                std::io::ErrorKind::WouldBlock | std::io::ErrorKind::Interrupted => continue,
                _ => return Err(e).context("reading the capture"),
            }
        }
        frames += 1;
        if let Some(s) = parse(&buf[..n as usize]) {
            seen.push(s);
        }
    }
    Ok(seen)
}

/// The endpoints of an Ethernet frame's IPv4/IPv6 TCP or UDP packet (no
/// VLAN tag, no IPv6 extension headers: the tests send none).
pub fn parse(f: &[u8]) -> Option<Seen> {
    let ether_type = u16::from_be_bytes([*f.get(12)?, *f.get(13)?]);
    let l3 = f.get(14..)?;
    let (src, dst, proto, l4): (IpAddr, IpAddr, u8, &[u8]) = match ether_type {
        0x0800 => {
            let ihl = usize::from(l3.first()? & 0xF) * 4;
            let a: [u8; 4] = l3.get(12..16)?.try_into().ok()?;
            let b: [u8; 4] = l3.get(16..20)?.try_into().ok()?;
            (
                Ipv4Addr::from(a).into(),
                Ipv4Addr::from(b).into(),
                *l3.get(9)?,
                l3.get(ihl..)?,
            )
        }
        0x86DD => {
            let a: [u8; 16] = l3.get(8..24)?.try_into().ok()?;
            let b: [u8; 16] = l3.get(24..40)?.try_into().ok()?;
            (
                Ipv6Addr::from(a).into(),
                Ipv6Addr::from(b).into(),
                *l3.get(6)?,
                l3.get(40..)?,
            )
        }
        _ => return None,
    };
    if proto != 6 && proto != 17 {
        return None;
    }
    Some(Seen {
        src,
        dst,
        proto,
        src_port: u16::from_be_bytes([*l4.first()?, *l4.get(1)?]),
        dst_port: u16::from_be_bytes([*l4.get(2)?, *l4.get(3)?]),
    })
}

/// The TCP and UDP checksum errors the namespace's stack counted
/// (`/proc/net/snmp`: Tcp InCsumErrors + Udp InCsumErrors + Udp6
/// InCsumErrors).
pub fn checksum_errors(ns: &Netns) -> Result<u64> {
    let snmp = String::from_utf8(ns.exec(["cat", "/proc/net/snmp"])?.stdout)?;
    let snmp6 = String::from_utf8(ns.exec(["cat", "/proc/net/snmp6"])?.stdout)?;
    let mut total = 0;
    for proto in ["Tcp", "Udp"] {
        total += snmp_field(&snmp, proto, "InCsumErrors")?;
    }
    total += snmp6
        .lines()
        .find_map(|l| l.strip_prefix("Udp6InCsumErrors"))
        .ok_or_else(|| anyhow!("no Udp6InCsumErrors in /proc/net/snmp6"))?
        .trim()
        .parse::<u64>()?;
    Ok(total)
}

fn snmp_field(snmp: &str, proto: &str, field: &str) -> Result<u64> {
    let prefix = format!("{proto}:");
    let mut lines = snmp.lines().filter(|l| l.starts_with(&prefix));
    let (names, values) = (lines.next(), lines.next());
    let (names, values) = names
        .zip(values)
        .ok_or_else(|| anyhow!("no {proto} lines in /proc/net/snmp"))?;
    let at = names
        .split_whitespace()
        .position(|n| n == field)
        .ok_or_else(|| anyhow!("no {proto} {field} in /proc/net/snmp"))?;
    values
        .split_whitespace()
        .nth(at)
        .ok_or_else(|| anyhow!("{proto} {field} has no value"))?
        .parse()
        .context("parsing /proc/net/snmp")
}
