//! Established flows across the rejoin: keep-alive HTTP connections opened
//! while the victim is out of the ring (so each is on one of the others),
//! asked again after it rejoined. The rejoin gives the victim about a third
//! of the ring's slots back, so about a third of these connections now
//! hash to it; only lb's connection tracking keeps them on the backend
//! that holds their TCP state (a wrongly steered segment would be answered
//! with a reset by the victim, which knows no such connection).

use std::{
    io::{Read as _, Write as _},
    net::{SocketAddr, TcpStream},
    time::{Duration, Instant},
};

use anyhow::{Context as _, Result, bail, ensure};
use lb_tests::{agent::LbAgent, netns::Netns, servers::backend_name};

/// How many connections are held: enough that some surely hash to the
/// victim after the rejoin ((2/3)^24 < 1e-4 that none does).
pub const HELD: usize = 24;
const TIMEOUT: Duration = Duration::from_secs(5);

/// One keep-alive HTTP/1.1 connection to the VIP and the backend that
/// answered its first request.
pub struct Held {
    stream: TcpStream,
    local: SocketAddr,
    pub backend: usize,
}

impl Held {
    /// Connects from the client namespace (the socket stays in it) and
    /// sends a first request.
    pub fn open_all(client: &Netns, vip: SocketAddr, n: usize) -> Result<Vec<Held>> {
        client.run(move || {
            (0..n)
                .map(|_| {
                    let stream = TcpStream::connect_timeout(&vip, TIMEOUT)
                        .with_context(|| format!("connecting to {vip}"))?;
                    let local = stream.local_addr()?;
                    let mut h = Held {
                        stream,
                        local,
                        backend: usize::MAX,
                    };
                    h.backend = h.get(vip)?;
                    Ok(h)
                })
                .collect()
        })?
    }

    /// `GET /` on this connection; returns the index of the backend that
    /// answered (its body is `backend-<i>`).
    pub fn get(&mut self, vip: SocketAddr) -> Result<usize> {
        let request = format!(
            "GET / HTTP/1.1\r\nHost: {vip}\r\nUser-Agent: lb-demo\r\nConnection: keep-alive\r\n\r\n"
        );
        self.stream.set_read_timeout(Some(TIMEOUT))?;
        self.stream
            .write_all(request.as_bytes())
            .with_context(|| format!("sending on the connection from {}", self.local))?;
        let deadline = Instant::now() + TIMEOUT;
        let mut buf = Vec::new();
        let mut chunk = [0u8; 1024];
        loop {
            if let Some(body) = complete_body(&buf) {
                let name = String::from_utf8_lossy(body).trim().to_string();
                return match name.strip_prefix("backend-").map(str::parse) {
                    Some(Ok(i)) => Ok(i),
                    _ => bail!("unexpected answer {name:?} on {}", self.local),
                };
            }
            ensure!(
                Instant::now() < deadline,
                "no full answer on the connection from {} within {TIMEOUT:?}",
                self.local
            );
            match self.stream.read(&mut chunk) {
                Ok(0) => bail!("the connection from {} was closed", self.local),
                Ok(n) => buf.extend_from_slice(&chunk[..n]),
                Err(e) => {
                    return Err(e)
                        .with_context(|| format!("reading on the connection from {}", self.local));
                }
            }
        }
    }
}

/// The body of a complete response with a Content-Length, if `buf` holds
/// one.
fn complete_body(buf: &[u8]) -> Option<&[u8]> {
    let end = buf.windows(4).position(|w| w == b"\r\n\r\n")? + 4;
    let head = String::from_utf8_lossy(&buf[..end]);
    let len: usize = head.lines().find_map(|l| {
        let (k, v) = l.split_once(':')?;
        k.trim()
            .eq_ignore_ascii_case("content-length")
            .then(|| v.trim().parse().ok())?
    })?;
    buf.get(end..end + len)
}

/// Asks every held connection again and returns the check's verdict and
/// text: every one answered by its backend, and how many of them the
/// ring (per `lb explain`) now gives the victim.
pub fn recheck(
    held: &mut [Held],
    agent: &LbAgent,
    vip: SocketAddr,
    victim: usize,
    victim_addr: std::net::IpAddr,
) -> (bool, String) {
    let mut moved = 0;
    let mut kept = 0;
    let mut first_problem = None;
    for h in held.iter_mut() {
        let ring = agent
            .json(&["explain", &h.local.to_string(), &vip.to_string(), "tcp"])
            .map(|e| e["ring_backend"] == victim_addr.to_string());
        match ring {
            Ok(true) => moved += 1,
            Ok(false) => {}
            Err(e) => {
                first_problem.get_or_insert(format!("lb explain: {e:#}"));
            }
        }
        match h.get(vip) {
            Ok(b) if b == h.backend => kept += 1,
            Ok(b) => {
                first_problem.get_or_insert(format!(
                    "{} moved from {} to {}",
                    h.local,
                    backend_name(h.backend),
                    backend_name(b)
                ));
            }
            Err(e) => {
                first_problem.get_or_insert(format!("{e:#}"));
            }
        }
    }
    let victim = backend_name(victim);
    let ok = kept == held.len() && moved > 0 && first_problem.is_none();
    let text = format!(
        "established flows survive the rejoin: {kept} of {} keep-alive connections opened during \
         failover answered again by their backend, {moved} of them now hashing to {victim} \
         (kept by connection tracking){}",
        held.len(),
        first_problem
            .map(|p| format!("; first problem: {p}"))
            .unwrap_or_default()
    );
    (ok, text)
}

#[cfg(test)]
mod tests {
    use super::complete_body;

    #[test]
    fn a_body_is_complete_once_content_length_bytes_arrived() {
        let r = b"HTTP/1.1 200 OK\r\nContent-Length: 10\r\n\r\nbackend-1\n";
        assert_eq!(complete_body(r), Some(&b"backend-1\n"[..]));
        assert_eq!(complete_body(&r[..r.len() - 1]), None);
        assert_eq!(complete_body(b"HTTP/1.1 200 OK\r\nContent-Le"), None);
    }
}
