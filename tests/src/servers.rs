//! Small real servers for backends (run as the `lb-test-server` binary in a
//! namespace) and client helpers to call them from a namespace thread
//! ([`crate::netns::Netns::run`]).
//!
//! - `lb-test-server http --listen ADDR:PORT --name NAME`: HTTP/1.1, every
//!   request answered `200` with body `NAME\n`; keep-alive or
//!   `Connection: close`; one thread per connection.
//! - `lb-test-server udp-echo --listen ADDR:PORT --name NAME`: replies to
//!   each datagram with `NAME:` + the datagram, from the address the
//!   datagram was sent to (IP_PKTINFO), so replies to the VIP come from the
//!   VIP even though the socket is bound to 0.0.0.0 (DSR).
//! - `lb-test-server stream --listen ADDR:PORT --name NAME`: echoes every
//!   byte back on each accepted connection.
//! - `lb-test-server peer --listen ADDR:PORT --name NAME`: writes
//!   `NAME PEER_ADDR:PORT\n` (the connection's source as the server sees
//!   it) on each accepted connection and closes it.
//!
//! Each prints one line `ready KIND ADDR` on stdout once it listens, and
//! nothing else on stdout; [`spawn_server`] waits for that line.

use std::{
    io::{self, BufRead, BufReader, Read, Write},
    net::{Ipv4Addr, Shutdown, SocketAddr, SocketAddrV4, TcpListener, TcpStream, UdpSocket},
    os::fd::AsRawFd,
    path::PathBuf,
    process::Stdio,
    sync::mpsc,
    thread,
    time::{Duration, Instant},
};

use anyhow::{Context, Result, anyhow, bail, ensure};
use socket2::{Domain, Protocol, SockAddr, Socket, Type};

use crate::netns::{ChildGuard, Netns, Topology, spawn_guarded};

/// Environment variable naming the server binary explicitly.
pub const SERVER_ENV: &str = "LB_TEST_SERVER";
pub const SERVER_BIN: &str = "lb-test-server";

/// How long [`spawn_server`] waits for the server's ready line.
pub const READY_TIMEOUT: Duration = Duration::from_secs(5);

/// Idle keep-alive connections are closed by the HTTP server after this.
const HTTP_IDLE: Duration = Duration::from_secs(30);

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum ServerKind {
    Http,
    UdpEcho,
    Stream,
    Peer,
}

impl ServerKind {
    pub fn as_str(self) -> &'static str {
        match self {
            ServerKind::Http => "http",
            ServerKind::UdpEcho => "udp-echo",
            ServerKind::Stream => "stream",
            ServerKind::Peer => "peer",
        }
    }

    fn parse(s: &str) -> Option<Self> {
        match s {
            "http" => Some(ServerKind::Http),
            "udp-echo" => Some(ServerKind::UdpEcho),
            "stream" => Some(ServerKind::Stream),
            "peer" => Some(ServerKind::Peer),
            _ => None,
        }
    }
}

// ---------------------------------------------------------------------------
// Finding and starting the binary
// ---------------------------------------------------------------------------

/// Path of the built `lb-test-server`: `$LB_TEST_SERVER` if set, else next
/// to the current executable or in its parent directory (an integration
/// test runs from target/<profile>/deps/, the binary is in
/// target/<profile>/). Panics with a clear message if not found; see
/// [`try_server_binary`].
pub fn server_binary() -> PathBuf {
    try_server_binary().unwrap_or_else(|e| panic!("{e:#}"))
}

pub fn try_server_binary() -> Result<PathBuf> {
    if let Some(p) = std::env::var_os(SERVER_ENV) {
        let p = PathBuf::from(p);
        ensure!(p.is_file(), "{SERVER_ENV}={} is not a file", p.display());
        return Ok(p);
    }
    let exe = std::env::current_exe().context("current_exe")?;
    let mut tried = Vec::new();
    for dir in exe.parent().into_iter().flat_map(|d| [Some(d), d.parent()]) {
        let Some(dir) = dir else { continue };
        let candidate = dir.join(SERVER_BIN);
        if candidate.is_file() {
            return Ok(candidate);
        }
        tried.push(candidate);
    }
    bail!(
        "{SERVER_BIN} not found (tried {tried:?}); build it with `cargo build -p lb-tests --bin {SERVER_BIN}` or set {SERVER_ENV}"
    )
}

/// Starts a server of `kind` in `ns`, listening on `listen` and answering
/// with `name`, and waits (bounded) until it listens.
pub fn spawn_server(
    ns: &Netns,
    kind: ServerKind,
    listen: impl Into<SocketAddr>,
    name: &str,
) -> Result<ChildGuard> {
    let listen: SocketAddr = listen.into();
    let bin = try_server_binary()?;
    let mut cmd = ns.command(&bin);
    cmd.args([
        kind.as_str(),
        "--listen",
        &listen.to_string(),
        "--name",
        name,
    ])
    .stdin(Stdio::null())
    .stdout(Stdio::piped())
    .stderr(Stdio::inherit());
    let mut guard = spawn_guarded(cmd)?;
    let stdout = guard
        .child_mut()
        .stdout
        .take()
        .ok_or_else(|| anyhow!("no stdout"))?;
    let (tx, rx) = mpsc::channel();
    thread::spawn(move || {
        let mut line = String::new();
        let r = BufReader::new(stdout).read_line(&mut line).map(|_| line);
        let _ = tx.send(r);
    });
    let what = format!("{} {} in {}", kind.as_str(), listen, ns.name());
    match rx.recv_timeout(READY_TIMEOUT) {
        Ok(Ok(line)) if line.starts_with("ready") => Ok(guard),
        Ok(Ok(line)) => {
            let status = guard.wait_timeout(Duration::from_millis(500))?;
            bail!("server {what} did not start (said {line:?}, exit {status:?})")
        }
        Ok(Err(e)) => Err(e).with_context(|| format!("reading the ready line of {what}")),
        Err(_) => bail!("server {what} not ready within {READY_TIMEOUT:?}"),
    }
}

/// Starts one server of `kind` on every backend of `topo`, on 0.0.0.0:port,
/// named `backend-<i>`.
pub fn spawn_on_backends(topo: &Topology, kind: ServerKind, port: u16) -> Result<Vec<ChildGuard>> {
    (0..topo.backend_count())
        .map(|i| {
            spawn_server(
                topo.backend_ns(i),
                kind,
                SocketAddrV4::new(Ipv4Addr::UNSPECIFIED, port),
                &backend_name(i),
            )
        })
        .collect()
}

/// The name [`spawn_on_backends`] gives backend `i`.
pub fn backend_name(i: usize) -> String {
    format!("backend-{i}")
}

// ---------------------------------------------------------------------------
// The servers (run by the binary)
// ---------------------------------------------------------------------------

/// Entry point of `lb-test-server` (arguments without the program name).
pub fn server_main(args: impl IntoIterator<Item = String>) -> Result<()> {
    let usage = "usage: lb-test-server http|udp-echo|stream|peer --listen ADDR:PORT --name NAME";
    let mut args = args.into_iter();
    let kind = args
        .next()
        .and_then(|k| ServerKind::parse(&k))
        .ok_or_else(|| anyhow!("{usage}"))?;
    let mut listen = None;
    let mut name = None;
    while let Some(a) = args.next() {
        match a.as_str() {
            "--listen" => listen = args.next(),
            "--name" => name = args.next(),
            _ => bail!("unexpected argument {a:?}\n{usage}"),
        }
    }
    let listen: SocketAddr = listen
        .ok_or_else(|| anyhow!("--listen missing\n{usage}"))?
        .parse()
        .context("--listen must be ADDR:PORT ([ADDR]:PORT for IPv6)")?;
    let name = name.ok_or_else(|| anyhow!("--name missing\n{usage}"))?;
    raise_nofile_limit();
    match kind {
        ServerKind::Http => serve_tcp(listen, kind, name, handle_http),
        ServerKind::Stream => serve_tcp(listen, kind, name, handle_stream),
        ServerKind::Peer => serve_tcp(listen, kind, name, handle_peer),
        ServerKind::UdpEcho => match listen {
            SocketAddr::V4(l) => serve_udp_echo(l, &name),
            SocketAddr::V6(l) => serve_udp_echo6(l, &name),
        },
    }
}

fn raise_nofile_limit() {
    let mut lim = libc::rlimit {
        rlim_cur: 0,
        rlim_max: 0,
    };
    // SAFETY: plain syscalls on a local struct.
    unsafe {
        if libc::getrlimit(libc::RLIMIT_NOFILE, &mut lim) == 0 && lim.rlim_cur < lim.rlim_max {
            lim.rlim_cur = lim.rlim_max;
            libc::setrlimit(libc::RLIMIT_NOFILE, &lim);
        }
    }
}

fn announce_ready(kind: ServerKind, addr: SocketAddr) -> Result<()> {
    let mut out = io::stdout().lock();
    writeln!(out, "ready {} {addr}", kind.as_str())?;
    out.flush()?;
    Ok(())
}

fn serve_tcp(
    listen: SocketAddr,
    kind: ServerKind,
    name: String,
    handler: fn(TcpStream, &str) -> io::Result<()>,
) -> Result<()> {
    let socket = Socket::new(
        Domain::for_address(listen),
        Type::STREAM,
        Some(Protocol::TCP),
    )?;
    socket.set_reuse_address(true)?;
    if listen.is_ipv6() {
        // IPv6 only: an IPv4 server may listen on the same port.
        socket.set_only_v6(true)?;
    }
    socket
        .bind(&SockAddr::from(listen))
        .with_context(|| format!("bind {listen}"))?;
    socket.listen(4096)?;
    let listener: TcpListener = socket.into();
    announce_ready(kind, listener.local_addr()?)?;
    let name: &'static str = Box::leak(name.into_boxed_str());
    loop {
        let stream = match listener.accept() {
            Ok((s, _)) => s,
            Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
            Err(_) => {
                // EMFILE/ENOBUFS…: back off briefly, keep serving.
                thread::sleep(Duration::from_millis(10));
                continue;
            }
        };
        // On spawn failure (thread limit) the connection is just closed.
        if let Err(e) = thread::Builder::new()
            .stack_size(128 * 1024)
            .spawn(move || {
                let _ = handler(stream, name);
            })
        {
            eprintln!("lb-test-server: no thread for a connection: {e}");
        }
    }
}

fn handle_peer(mut stream: TcpStream, name: &str) -> io::Result<()> {
    let peer = stream.peer_addr()?;
    stream.write_all(format!("{name} {peer}\n").as_bytes())?;
    stream.shutdown(Shutdown::Write)
}

/// Connects to a `peer` server at `addr` (from `ns`): the backend's name
/// and the source address:port it saw.
pub fn peer_seen(ns: &Netns, addr: SocketAddr, timeout: Duration) -> Result<(String, SocketAddr)> {
    let line = ns.run(move || -> Result<String> {
        let mut c = tcp_connect(None, addr, timeout)?;
        c.set_read_timeout(Some(timeout))?;
        let mut s = String::new();
        c.read_to_string(&mut s)?;
        Ok(s)
    })??;
    let (name, peer) = line
        .trim()
        .split_once(' ')
        .with_context(|| format!("peer answer {line:?}"))?;
    Ok((name.to_owned(), peer.parse().context("peer address")?))
}

fn handle_stream(stream: TcpStream, _name: &str) -> io::Result<()> {
    stream.set_nodelay(true)?;
    let mut reader = stream.try_clone()?;
    let mut writer = stream;
    io::copy(&mut reader, &mut writer)?;
    writer.shutdown(Shutdown::Write)
}

fn handle_http(stream: TcpStream, name: &str) -> io::Result<()> {
    stream.set_nodelay(true)?;
    stream.set_read_timeout(Some(HTTP_IDLE))?;
    let body = format!("{name}\n");
    let mut writer = stream.try_clone()?;
    let mut reader = BufReader::new(stream);
    let mut line = String::new();
    loop {
        // Request line (skip stray empty lines between requests).
        line.clear();
        if reader.read_line(&mut line)? == 0 {
            return Ok(());
        }
        if line.trim().is_empty() {
            continue;
        }
        let http10 = line.trim_end().ends_with("HTTP/1.0");
        let mut keep_alive = !http10;
        let mut content_length = 0usize;
        let mut head_bytes = line.len();
        loop {
            line.clear();
            if reader.read_line(&mut line)? == 0 {
                return Ok(());
            }
            head_bytes += line.len();
            if head_bytes > 64 * 1024 {
                return Err(io::Error::other("request head too large"));
            }
            let l = line.trim();
            if l.is_empty() {
                break;
            }
            if let Some((k, v)) = l.split_once(':') {
                let (k, v) = (k.trim(), v.trim());
                if k.eq_ignore_ascii_case("connection") {
                    if v.eq_ignore_ascii_case("close") {
                        keep_alive = false;
                    } else if v.eq_ignore_ascii_case("keep-alive") {
                        keep_alive = true;
                    }
                } else if k.eq_ignore_ascii_case("content-length") {
                    content_length = v.parse().unwrap_or(0);
                }
            }
        }
        if content_length > 0 {
            io::copy(
                &mut (&mut reader).take(content_length as u64),
                &mut io::sink(),
            )?;
        }
        let response = format!(
            "HTTP/1.1 200 OK\r\nContent-Type: text/plain\r\nContent-Length: {}\r\nConnection: {}\r\n\r\n{body}",
            body.len(),
            if keep_alive { "keep-alive" } else { "close" }
        );
        writer.write_all(response.as_bytes())?;
        if !keep_alive {
            // The server closes first: TIME_WAIT stays on this side.
            return Ok(());
        }
    }
}

fn serve_udp_echo(listen: SocketAddrV4, name: &str) -> Result<()> {
    let socket = Socket::new(Domain::IPV4, Type::DGRAM, Some(Protocol::UDP))?;
    socket.set_reuse_address(true)?;
    socket
        .bind(&SockAddr::from(listen))
        .with_context(|| format!("bind {listen}"))?;
    let sock: UdpSocket = socket.into();
    let fd = sock.as_raw_fd();
    let one: libc::c_int = 1;
    // SAFETY: valid fd and option buffer.
    let rc = unsafe {
        libc::setsockopt(
            fd,
            libc::IPPROTO_IP,
            libc::IP_PKTINFO,
            (&one as *const libc::c_int).cast(),
            std::mem::size_of::<libc::c_int>() as libc::socklen_t,
        )
    };
    if rc != 0 {
        return Err(io::Error::last_os_error()).context("setsockopt IP_PKTINFO");
    }
    announce_ready(ServerKind::UdpEcho, sock.local_addr()?)?;
    let prefix = format!("{name}:");
    let mut buf = vec![0u8; 65536];
    let mut reply = Vec::with_capacity(65536 + prefix.len());
    loop {
        let (n, peer, local) = match recv_with_dst(fd, &mut buf) {
            Ok(r) => r,
            Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
            Err(e) => return Err(e).context("recvmsg"),
        };
        reply.clear();
        reply.extend_from_slice(prefix.as_bytes());
        reply.extend_from_slice(&buf[..n]);
        // A failed send (no ARP reply yet, full buffer) is like a lost
        // datagram: the client retries.
        let _ = send_from(fd, &reply, peer, local);
    }
}

/// The IPv6 UDP echo server: bound to one address (the VIP), so that its
/// replies leave from it without packet-info ancillary data.
fn serve_udp_echo6(listen: std::net::SocketAddrV6, name: &str) -> Result<()> {
    ensure!(
        !listen.ip().is_unspecified(),
        "an IPv6 udp-echo server listens on one address (the VIP), not {listen}"
    );
    let socket = Socket::new(Domain::IPV6, Type::DGRAM, Some(Protocol::UDP))?;
    socket.set_reuse_address(true)?;
    socket.set_only_v6(true)?;
    socket
        .bind(&SockAddr::from(listen))
        .with_context(|| format!("bind {listen}"))?;
    let sock: UdpSocket = socket.into();
    announce_ready(ServerKind::UdpEcho, sock.local_addr()?)?;
    let prefix = format!("{name}:");
    let mut buf = vec![0u8; 65536];
    let mut reply = Vec::with_capacity(65536 + prefix.len());
    loop {
        let (n, peer) = match sock.recv_from(&mut buf) {
            Ok(r) => r,
            Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
            Err(e) => return Err(e).context("recv_from"),
        };
        reply.clear();
        reply.extend_from_slice(prefix.as_bytes());
        reply.extend_from_slice(&buf[..n]);
        let _ = sock.send_to(&reply, peer);
    }
}

/// recvmsg with IP_PKTINFO: (length, sender, destination address).
fn recv_with_dst(
    fd: libc::c_int,
    buf: &mut [u8],
) -> io::Result<(usize, libc::sockaddr_in, Option<libc::in_addr>)> {
    // SAFETY: all pointers refer to live local buffers of the stated sizes;
    // the CMSG_* macros walk the control buffer the kernel filled.
    unsafe {
        let mut peer: libc::sockaddr_in = std::mem::zeroed();
        let mut iov = libc::iovec {
            iov_base: buf.as_mut_ptr().cast(),
            iov_len: buf.len(),
        };
        let mut control = [0u64; 16];
        let mut msg: libc::msghdr = std::mem::zeroed();
        msg.msg_name = (&mut peer as *mut libc::sockaddr_in).cast();
        msg.msg_namelen = std::mem::size_of::<libc::sockaddr_in>() as libc::socklen_t;
        msg.msg_iov = &mut iov;
        msg.msg_iovlen = 1;
        msg.msg_control = control.as_mut_ptr().cast();
        msg.msg_controllen = std::mem::size_of_val(&control);
        let n = libc::recvmsg(fd, &mut msg, 0);
        if n < 0 {
            return Err(io::Error::last_os_error());
        }
        let mut dst = None;
        let mut cmsg = libc::CMSG_FIRSTHDR(&msg);
        while !cmsg.is_null() {
            if (*cmsg).cmsg_level == libc::IPPROTO_IP && (*cmsg).cmsg_type == libc::IP_PKTINFO {
                let info: libc::in_pktinfo = std::ptr::read_unaligned(libc::CMSG_DATA(cmsg).cast());
                dst = Some(info.ipi_addr);
            }
            cmsg = libc::CMSG_NXTHDR(&msg, cmsg);
        }
        Ok((n as usize, peer, dst))
    }
}

/// sendmsg to `peer` with source address `src` (IP_PKTINFO) if known.
fn send_from(
    fd: libc::c_int,
    data: &[u8],
    mut peer: libc::sockaddr_in,
    src: Option<libc::in_addr>,
) -> io::Result<()> {
    // SAFETY: as in recv_with_dst; the control buffer is sized and aligned
    // for one in_pktinfo cmsg.
    unsafe {
        let mut iov = libc::iovec {
            iov_base: data.as_ptr() as *mut libc::c_void,
            iov_len: data.len(),
        };
        let mut control = [0u64; 8];
        let mut msg: libc::msghdr = std::mem::zeroed();
        msg.msg_name = (&mut peer as *mut libc::sockaddr_in).cast();
        msg.msg_namelen = std::mem::size_of::<libc::sockaddr_in>() as libc::socklen_t;
        msg.msg_iov = &mut iov;
        msg.msg_iovlen = 1;
        if let Some(src) = src {
            let space = libc::CMSG_SPACE(std::mem::size_of::<libc::in_pktinfo>() as u32) as usize;
            debug_assert!(space <= std::mem::size_of_val(&control));
            msg.msg_control = control.as_mut_ptr().cast();
            msg.msg_controllen = space;
            let cmsg = libc::CMSG_FIRSTHDR(&msg);
            (*cmsg).cmsg_level = libc::IPPROTO_IP;
            (*cmsg).cmsg_type = libc::IP_PKTINFO;
            (*cmsg).cmsg_len =
                libc::CMSG_LEN(std::mem::size_of::<libc::in_pktinfo>() as u32) as usize;
            let info = libc::in_pktinfo {
                ipi_ifindex: 0,
                ipi_spec_dst: src,
                ipi_addr: libc::in_addr { s_addr: 0 },
            };
            std::ptr::write_unaligned(libc::CMSG_DATA(cmsg).cast(), info);
        }
        if libc::sendmsg(fd, &msg, 0) < 0 {
            return Err(io::Error::last_os_error());
        }
    }
    Ok(())
}

// ---------------------------------------------------------------------------
// Client helpers (call them from a namespace thread: Netns::run)
// ---------------------------------------------------------------------------

/// A TCP connection to `addr` from the optional fixed `local_port`
/// (SO_REUSEADDR set so the port can be bound again right after an earlier
/// connection), with `timeout` as connect, read and write timeout.
///
/// With a fixed port, `EADDRINUSE`/`EADDRNOTAVAIL` are retried for up to
/// [`PORT_REUSE_RETRY`] (within `timeout`): a `fork` in another thread (any
/// `Command::spawn`) duplicates every descriptor until the child execs, so
/// an earlier connection on the same port that was just closed can live on
/// for a moment.
pub fn tcp_connect(
    local_port: Option<u16>,
    addr: impl Into<SocketAddr>,
    timeout: Duration,
) -> Result<TcpStream> {
    let addr: SocketAddr = addr.into();
    let start = Instant::now();
    let retry_until = start + PORT_REUSE_RETRY.min(timeout);
    loop {
        match try_tcp_connect(local_port, addr, timeout.saturating_sub(start.elapsed())) {
            Err(e)
                if local_port.is_some()
                    && Instant::now() < retry_until
                    && matches!(
                        e.raw_os_error(),
                        Some(libc::EADDRNOTAVAIL | libc::EADDRINUSE)
                    ) =>
            {
                thread::sleep(Duration::from_millis(5));
            }
            Err(e) => {
                let what = match local_port {
                    Some(p) => format!("connect to {addr} from port {p}"),
                    None => format!("connect to {addr}"),
                };
                return Err(e).context(what);
            }
            Ok(stream) => {
                stream.set_read_timeout(Some(timeout))?;
                stream.set_write_timeout(Some(timeout))?;
                stream.set_nodelay(true)?;
                return Ok(stream);
            }
        }
    }
}

/// How long a fixed-port connect retries a port still held (see
/// [`tcp_connect`]).
pub const PORT_REUSE_RETRY: Duration = Duration::from_secs(1);

fn try_tcp_connect(
    local_port: Option<u16>,
    addr: SocketAddr,
    timeout: Duration,
) -> io::Result<TcpStream> {
    if timeout.is_zero() {
        return Err(io::ErrorKind::TimedOut.into());
    }
    let socket = Socket::new(Domain::for_address(addr), Type::STREAM, Some(Protocol::TCP))?;
    if let Some(port) = local_port {
        socket.set_reuse_address(true)?;
        socket.bind(&SockAddr::from(unspecified_of(addr, port)))?;
    }
    socket.connect_timeout(&SockAddr::from(addr), timeout)?;
    Ok(socket.into())
}

/// The unspecified address of `addr`'s family, with `port`.
fn unspecified_of(addr: SocketAddr, port: u16) -> SocketAddr {
    match addr {
        SocketAddr::V4(_) => SocketAddr::new(Ipv4Addr::UNSPECIFIED.into(), port),
        SocketAddr::V6(_) => SocketAddr::new(std::net::Ipv6Addr::UNSPECIFIED.into(), port),
    }
}

/// `GET /` over a fresh connection; returns the body.
pub fn http_get(addr: impl Into<SocketAddr>, timeout: Duration) -> Result<String> {
    http_get_from(None, addr, timeout)
}

/// One request on a keep-alive HTTP connection to the test servers: the
/// body, the answering backend's name (5 s read timeout).
pub fn ask(conn: &mut std::net::TcpStream) -> Result<String> {
    use std::io::{Read as _, Write as _};
    conn.write_all(b"GET / HTTP/1.1\r\nHost: lb\r\n\r\n")?;
    conn.set_read_timeout(Some(std::time::Duration::from_secs(5)))?;
    let mut buf = Vec::new();
    let mut chunk = [0u8; 1024];
    loop {
        let n = conn
            .read(&mut chunk)
            .context("reading a keep-alive answer")?;
        ensure!(n > 0, "the connection was closed");
        buf.extend_from_slice(&chunk[..n]);
        let text = String::from_utf8_lossy(&buf);
        if let Some(at) = text.find("\r\n\r\n")
            && text[at + 4..].ends_with('\n')
        {
            return Ok(text[at + 4..].trim().to_string());
        }
    }
}

/// `GET /` with `Connection: close` from the optional fixed source port;
/// the whole exchange is bounded by `timeout`. Returns the body of a 200.
///
/// TIME_WAIT: the server closes first (Connection: close) and the client
/// waits for that FIN (up to [`EOF_GRACE`] after a complete response), so
/// the client side normally holds no TIME_WAIT. With a fixed source port
/// the client also closes with SO_LINGER 0 (an RST after the full
/// response): neither side keeps any state for the 4-tuple and the same
/// port can be used again at once (see [`tcp_connect`] for the one race
/// left, which it retries).
pub fn http_get_from(
    local_port: Option<u16>,
    addr: impl Into<SocketAddr>,
    timeout: Duration,
) -> Result<String> {
    let addr: SocketAddr = addr.into();
    let deadline = Instant::now() + timeout;
    let mut stream = tcp_connect(local_port, addr, timeout)?;
    let request = format!(
        "GET / HTTP/1.1\r\nHost: {addr}\r\nUser-Agent: lb-tests\r\nConnection: close\r\n\r\n"
    );
    stream
        .write_all(request.as_bytes())
        .with_context(|| format!("sending a request to {addr}"))?;
    let mut response = Vec::new();
    let mut chunk = [0u8; 4096];
    let mut complete_at: Option<Instant> = None;
    loop {
        let mut left = deadline.saturating_duration_since(Instant::now());
        if let Some(t) = complete_at {
            left = left.min(EOF_GRACE.saturating_sub(t.elapsed()));
            if left.is_zero() {
                break; // complete, but the server keeps the connection open
            }
        }
        ensure!(
            !left.is_zero(),
            "HTTP GET {addr}: no full response within {timeout:?}"
        );
        stream.set_read_timeout(Some(left))?;
        match stream.read(&mut chunk) {
            Ok(0) => break,
            Ok(n) => response.extend_from_slice(&chunk[..n]),
            Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
            Err(e) if complete_at.is_some() && is_timeout(&e) => break,
            Err(e) => return Err(e).with_context(|| format!("reading the response of {addr}")),
        }
        if complete_at.is_none() && complete_response(&response) {
            complete_at = Some(Instant::now());
        }
    }
    if local_port.is_some() {
        let _ = socket2::SockRef::from(&stream).set_linger(Some(Duration::ZERO));
    }
    drop(stream);
    parse_response(&response).with_context(|| format!("HTTP GET {addr}"))
}

/// How long [`http_get_from`] waits for the server's FIN after a complete
/// response.
pub const EOF_GRACE: Duration = Duration::from_millis(500);

fn is_timeout(e: &io::Error) -> bool {
    matches!(
        e.kind(),
        io::ErrorKind::WouldBlock | io::ErrorKind::TimedOut
    )
}

fn split_head(response: &[u8]) -> Option<(&[u8], &[u8])> {
    let pos = response.windows(4).position(|w| w == b"\r\n\r\n")?;
    Some((&response[..pos], &response[pos + 4..]))
}

fn content_length(head: &str) -> Option<usize> {
    head.lines().find_map(|l| {
        let (k, v) = l.split_once(':')?;
        k.trim()
            .eq_ignore_ascii_case("content-length")
            .then(|| v.trim().parse().ok())?
    })
}

fn complete_response(response: &[u8]) -> bool {
    let Some((head, body)) = split_head(response) else {
        return false;
    };
    match content_length(&String::from_utf8_lossy(head)) {
        Some(len) => body.len() >= len,
        None => false,
    }
}

fn parse_response(response: &[u8]) -> Result<String> {
    let (head, body) = split_head(response).ok_or_else(|| {
        anyhow!(
            "incomplete response ({} bytes): {:?}",
            response.len(),
            String::from_utf8_lossy(response)
        )
    })?;
    let head = String::from_utf8_lossy(head);
    let status = head.lines().next().unwrap_or("");
    ensure!(
        status.starts_with("HTTP/1.") && status.split_whitespace().nth(1) == Some("200"),
        "unexpected status line {status:?}"
    );
    let body = match content_length(&head) {
        Some(len) => {
            ensure!(body.len() >= len, "body shorter than Content-Length {len}");
            &body[..len]
        }
        None => body,
    };
    Ok(String::from_utf8_lossy(body).into_owned())
}

/// Sends `payload` to `addr` over UDP and returns the first reply.
pub fn udp_request(
    addr: impl Into<SocketAddr>,
    payload: &[u8],
    timeout: Duration,
) -> Result<Vec<u8>> {
    udp_request_from(None, addr, payload, timeout)
}

/// [`udp_request`] from the optional fixed source port (SO_REUSEADDR). The
/// socket is connected, so only a reply from `addr` itself is accepted.
pub fn udp_request_from(
    local_port: Option<u16>,
    addr: impl Into<SocketAddr>,
    payload: &[u8],
    timeout: Duration,
) -> Result<Vec<u8>> {
    let addr: SocketAddr = addr.into();
    let socket = Socket::new(Domain::for_address(addr), Type::DGRAM, Some(Protocol::UDP))?;
    socket.set_reuse_address(true)?;
    let local = unspecified_of(addr, local_port.unwrap_or(0));
    socket
        .bind(&SockAddr::from(local))
        .with_context(|| format!("bind {local}"))?;
    let sock: UdpSocket = socket.into();
    sock.connect(addr)
        .with_context(|| format!("connect UDP to {addr}"))?;
    sock.set_read_timeout(Some(timeout))?;
    sock.send(payload)
        .with_context(|| format!("sending a datagram to {addr}"))?;
    let mut buf = vec![0u8; 65536];
    let n = sock
        .recv(&mut buf)
        .with_context(|| format!("no UDP reply from {addr} within {timeout:?}"))?;
    buf.truncate(n);
    Ok(buf)
}

/// A connection to a `stream` (echo) server: every round trip writes a
/// chunk (from a second thread, so that neither side blocks on a full
/// window however large the chunk) and checks that all of it comes back,
/// in order.
pub struct EchoStream {
    pub conn: TcpStream,
    /// Bytes echoed so far.
    pub sent: u64,
}

impl EchoStream {
    /// A connection from `client` (its namespace) to `addr` from `port`,
    /// reads bounded by `read_timeout`.
    pub fn connect(
        client: &Netns,
        port: u16,
        addr: SocketAddr,
        read_timeout: Duration,
    ) -> Result<Self> {
        let conn = client.run(move || tcp_connect(Some(port), addr, Duration::from_secs(3)))??;
        conn.set_read_timeout(Some(read_timeout))?;
        Ok(Self::new(conn))
    }

    pub fn new(conn: TcpStream) -> Self {
        Self { conn, sent: 0 }
    }

    pub fn roundtrip(&mut self, n: usize) -> Result<()> {
        let start = self.sent as usize;
        let chunk: Vec<u8> = (0..n).map(|i| ((start + i) % 251) as u8).collect();
        let mut writer = self.conn.try_clone()?;
        let data = chunk.clone();
        let w = thread::spawn(move || writer.write_all(&data));
        let mut back = vec![0u8; n];
        let read = self.conn.read_exact(&mut back);
        let wrote = w.join().map_err(|_| anyhow!("writer panicked"))?;
        wrote.context("write on the connection")?;
        read.context("read on the connection (reset or lost bytes?)")?;
        ensure!(back == chunk, "echoed bytes differ after offset {start}");
        self.sent += n as u64;
        Ok(())
    }
}

/// GETs `vip` from `client` once from each source port: the backend name
/// that answered per port (every request must succeed).
pub fn get_from_ports(
    client: &Netns,
    vip: SocketAddr,
    ports: impl IntoIterator<Item = u16>,
) -> Result<Vec<(u16, String)>> {
    let ports: Vec<u16> = ports.into_iter().collect();
    client.run(move || {
        ports
            .into_iter()
            .map(|p| {
                let body = http_get_from(Some(p), vip, std::time::Duration::from_secs(3))
                    .with_context(|| format!("GET {vip} from port {p}"))?;
                Ok((p, body.trim().to_string()))
            })
            .collect::<Result<Vec<_>>>()
    })?
}

/// Each answering backend's share of `answers`, in percent.
pub fn shares(answers: &[(u16, String)]) -> std::collections::BTreeMap<String, f64> {
    let mut counts = std::collections::BTreeMap::<String, usize>::new();
    for (_, b) in answers {
        *counts.entry(b.clone()).or_default() += 1;
    }
    counts
        .into_iter()
        .map(|(k, v)| (k, 100.0 * v as f64 / answers.len() as f64))
        .collect()
}

/// The backend name a UDP echo reply starts with (`backend-N:payload`).
pub fn echo_reply_backend(reply: &[u8]) -> String {
    String::from_utf8_lossy(reply)
        .split(':')
        .next()
        .unwrap_or("")
        .to_string()
}

/// `n` UDP echo requests from `client`, all from source port `src_port`
/// to `vip`: one flow, so one backend must answer every one of them, each
/// echoing its payload. Returns that backend's name.
pub fn one_udp_flow_one_backend(
    client: &Netns,
    vip: SocketAddr,
    src_port: u16,
    n: usize,
) -> Result<String> {
    let t = std::time::Duration::from_secs(3);
    let replies = client.run(move || {
        (0..n)
            .map(|i| udp_request_from(Some(src_port), vip, format!("q{i}").as_bytes(), t))
            .collect::<Result<Vec<_>>>()
    })??;
    let names: Vec<String> = replies.iter().map(|r| echo_reply_backend(r)).collect();
    ensure!(names[0].starts_with("backend-"), "{names:?}");
    ensure!(
        names.iter().all(|n| *n == names[0]),
        "one flow, several backends: {names:?}"
    );
    for (i, r) in replies.iter().enumerate() {
        ensure!(
            String::from_utf8_lossy(r).ends_with(&format!("q{i}")),
            "echo payload of request {i}: {r:?}"
        );
    }
    Ok(names[0].clone())
}
