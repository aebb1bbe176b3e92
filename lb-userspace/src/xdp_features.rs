//! What an interface's driver can do with XDP, as the kernel reports it
//! (the `netdev` generic-netlink family, `xdp-features`, Linux ≥ 6.3).
//!
//! The agent asks this of every redirect target when it attaches in native
//! mode: a frame redirected to a device that cannot transmit XDP frames
//! (no `ndo_xdp_xmit`, e.g. a bridge, or a veth whose peer runs no XDP
//! program) is dropped by the kernel after the program returned
//! `XDP_REDIRECT`, and would be counted as forwarded.

use std::io;

/// `NETDEV_XDP_ACT_NDO_XMIT`: the driver implements `ndo_xdp_xmit`.
pub const NDO_XMIT: u64 = 1 << 2;

const NETLINK_GENERIC: i32 = 16;
const GENL_ID_CTRL: u16 = 0x10;
const CTRL_CMD_GETFAMILY: u8 = 3;
const CTRL_ATTR_FAMILY_ID: u16 = 1;
const CTRL_ATTR_FAMILY_NAME: u16 = 2;
const NETDEV_CMD_DEV_GET: u8 = 1;
const NETDEV_A_DEV_IFINDEX: u16 = 1;
const NETDEV_A_DEV_XDP_FEATURES: u16 = 3;
const NLM_F_REQUEST: u16 = 1;
const NLMSG_ERROR: u16 = 2;

fn attr(buf: &mut Vec<u8>, kind: u16, payload: &[u8]) {
    let len = 4 + payload.len();
    buf.extend_from_slice(&(len as u16).to_ne_bytes());
    buf.extend_from_slice(&kind.to_ne_bytes());
    buf.extend_from_slice(payload);
    while !buf.len().is_multiple_of(4) {
        buf.push(0);
    }
}

/// One generic-netlink request and its reply's attributes.
fn request(fd: i32, family: u16, cmd: u8, attrs: &[u8]) -> io::Result<Vec<(u16, Vec<u8>)>> {
    let mut msg = Vec::with_capacity(64);
    let len = 16 + 4 + attrs.len();
    msg.extend_from_slice(&(len as u32).to_ne_bytes());
    msg.extend_from_slice(&family.to_ne_bytes());
    msg.extend_from_slice(&NLM_F_REQUEST.to_ne_bytes());
    msg.extend_from_slice(&1u32.to_ne_bytes()); // seq
    msg.extend_from_slice(&0u32.to_ne_bytes()); // pid
    msg.extend_from_slice(&[cmd, 1, 0, 0]); // genlmsghdr: cmd, version
    msg.extend_from_slice(attrs);
    // SAFETY: `msg` is a valid buffer of its length.
    if unsafe { libc::send(fd, msg.as_ptr().cast(), msg.len(), 0) } < 0 {
        return Err(io::Error::last_os_error());
    }
    let mut buf = vec![0u8; 8192];
    // SAFETY: `buf` is a valid buffer of its length.
    let n = unsafe { libc::recv(fd, buf.as_mut_ptr().cast(), buf.len(), 0) };
    if n < 0 {
        return Err(io::Error::last_os_error());
    }
    let buf = &buf[..n as usize];
    if buf.len() < 20 {
        return Err(io::Error::other("short netlink reply"));
    }
    let kind = u16::from_ne_bytes([buf[4], buf[5]]);
    if kind == NLMSG_ERROR {
        let errno = i32::from_ne_bytes([buf[16], buf[17], buf[18], buf[19]]);
        return Err(io::Error::from_raw_os_error(-errno));
    }
    let total = (u32::from_ne_bytes([buf[0], buf[1], buf[2], buf[3]]) as usize).min(buf.len());
    let mut out = Vec::new();
    let mut at = 20;
    while at + 4 <= total {
        let len = u16::from_ne_bytes([buf[at], buf[at + 1]]) as usize;
        let kind = u16::from_ne_bytes([buf[at + 2], buf[at + 3]]) & 0x3fff;
        if len < 4 || at + len > total {
            break;
        }
        out.push((kind, buf[at + 4..at + len].to_vec()));
        at += len.next_multiple_of(4);
    }
    Ok(out)
}

struct Socket(i32);

impl Drop for Socket {
    fn drop(&mut self) {
        // SAFETY: our own descriptor.
        unsafe { libc::close(self.0) };
    }
}

/// The `xdp-features` bits of interface `ifindex`; `Ok(None)` when the
/// kernel has no `netdev` family (before Linux 6.3: nothing to ask).
pub fn xdp_features(ifindex: u32) -> io::Result<Option<u64>> {
    // SAFETY: plain socket call.
    let fd = unsafe {
        libc::socket(
            libc::AF_NETLINK,
            libc::SOCK_RAW | libc::SOCK_CLOEXEC,
            NETLINK_GENERIC,
        )
    };
    if fd < 0 {
        return Err(io::Error::last_os_error());
    }
    let sock = Socket(fd);
    let tv = libc::timeval {
        tv_sec: 2,
        tv_usec: 0,
    };
    // SAFETY: a valid timeval for SO_RCVTIMEO.
    unsafe {
        libc::setsockopt(
            sock.0,
            libc::SOL_SOCKET,
            libc::SO_RCVTIMEO,
            (&tv as *const libc::timeval).cast(),
            std::mem::size_of::<libc::timeval>() as u32,
        )
    };
    let mut a = Vec::new();
    attr(&mut a, CTRL_ATTR_FAMILY_NAME, b"netdev\0");
    let family = match request(sock.0, GENL_ID_CTRL, CTRL_CMD_GETFAMILY, &a) {
        Ok(attrs) => attrs
            .iter()
            .find(|(k, v)| *k == CTRL_ATTR_FAMILY_ID && v.len() >= 2)
            .map(|(_, v)| u16::from_ne_bytes([v[0], v[1]]))
            .ok_or_else(|| io::Error::other("no family id in the reply"))?,
        Err(e) if e.raw_os_error() == Some(libc::ENOENT) => return Ok(None),
        Err(e) => return Err(e),
    };
    let mut a = Vec::new();
    attr(&mut a, NETDEV_A_DEV_IFINDEX, &ifindex.to_ne_bytes());
    let attrs = request(sock.0, family, NETDEV_CMD_DEV_GET, &a)?;
    Ok(attrs
        .iter()
        .find(|(k, v)| *k == NETDEV_A_DEV_XDP_FEATURES && v.len() >= 8)
        .map(|(_, v)| u64::from_ne_bytes(v[..8].try_into().expect("8 bytes")))
        .or(Some(0)))
}
