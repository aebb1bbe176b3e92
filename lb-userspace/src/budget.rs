//! The agent's file-descriptor budget: RLIMIT_NOFILE raised at start, and
//! the share of it each kind of socket may take, so that no one of them
//! (a flood of metrics clients, a thousand health checks) can starve the
//! others.
//!
//! The descriptors are split as follows: [`RESERVED_FDS`] for the agent's
//! own files (maps, programs, links, netlink, epoll, logs), then
//! [`CONTROL_CLIENTS`] for control-socket clients, then at most
//! [`MAX_METRICS_CONNECTIONS`] for metrics clients (a quarter of what is
//! left on a small limit), and the rest, up to [`MAX_PROBES`], for health
//! probes in flight.

use log::{info, warn};

/// Descriptors kept for the agent's own files.
pub const RESERVED_FDS: u64 = 64;
/// Descriptors kept for control-socket clients: the control server's 32
/// clients at once, and a few more accepted only to be told it is busy.
pub const CONTROL_CLIENTS: u64 = 40;
/// Most metrics connections open at once.
pub const MAX_METRICS_CONNECTIONS: usize = 64;
/// Most health probes in flight at once.
pub const MAX_PROBES: usize = 256;
/// Highest soft limit the agent asks for, whatever the hard limit.
const MAX_NOFILE: u64 = 1 << 20;

/// How many descriptors each kind of socket may use.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Budget {
    /// RLIMIT_NOFILE's soft limit in force.
    pub nofile: u64,
    pub probes: usize,
    pub metrics_connections: usize,
}

impl Budget {
    /// The split of `nofile` descriptors.
    pub fn split(nofile: u64) -> Self {
        let left = nofile.saturating_sub(RESERVED_FDS + CONTROL_CLIENTS);
        let metrics = (left / 4).clamp(1, MAX_METRICS_CONNECTIONS as u64);
        let probes = left.saturating_sub(metrics).clamp(1, MAX_PROBES as u64);
        Self {
            nofile,
            probes: probes as usize,
            metrics_connections: metrics as usize,
        }
    }

    /// The descriptors an agent with `backends` backends needs to run
    /// every probe of a round at once and serve every client.
    pub fn need(backends: usize) -> u64 {
        RESERVED_FDS
            + CONTROL_CLIENTS
            + MAX_METRICS_CONNECTIONS as u64
            + backends.clamp(1, MAX_PROBES) as u64
    }

    /// Raises the soft RLIMIT_NOFILE to the hard limit (capped at 2^20),
    /// says so in the log, warns when even that is below what `backends`
    /// backends need, and returns the split of what it got.
    pub fn at_start(backends: usize) -> Self {
        let need = Self::need(backends);
        let nofile = match raise_nofile() {
            Ok((before, after)) => {
                if after > before {
                    info!("RLIMIT_NOFILE: soft limit raised from {before} to {after}");
                }
                after
            }
            Err((current, e)) => {
                warn!("RLIMIT_NOFILE: cannot raise the soft limit {current}: {e}");
                current
            }
        };
        let b = Self::split(nofile);
        if nofile < need {
            warn!(
                "RLIMIT_NOFILE {nofile} is below the {need} file descriptors {backends} backends \
                 and the clients need: at most {} health checks run at once and {} metrics \
                 connections are served (raise the hard limit, e.g. LimitNOFILE=)",
                b.probes, b.metrics_connections
            );
        } else {
            info!(
                "file descriptors: limit {nofile}, up to {} health checks at once, up to {} \
                 metrics connections",
                b.probes, b.metrics_connections
            );
        }
        b
    }
}

/// Sets the soft limit to the hard one: `Ok((before, after))`, or the soft
/// limit in force with the error.
fn raise_nofile() -> Result<(u64, u64), (u64, std::io::Error)> {
    let mut lim = libc::rlimit {
        rlim_cur: 0,
        rlim_max: 0,
    };
    // SAFETY: a valid pointer to an rlimit.
    if unsafe { libc::getrlimit(libc::RLIMIT_NOFILE, &mut lim) } != 0 {
        return Err((1024, std::io::Error::last_os_error()));
    }
    let before = lim.rlim_cur;
    let want = lim.rlim_max.min(MAX_NOFILE).max(before);
    if want == before {
        return Ok((before, before));
    }
    let new = libc::rlimit {
        rlim_cur: want,
        rlim_max: lim.rlim_max,
    };
    // SAFETY: a valid pointer to an rlimit.
    if unsafe { libc::setrlimit(libc::RLIMIT_NOFILE, &new) } != 0 {
        return Err((before, std::io::Error::last_os_error()));
    }
    Ok((before, want))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_small_limit_is_shared_and_never_overdrawn() {
        for nofile in [0, 16, 100, 256, 1024, 4096, 1 << 20] {
            let b = Budget::split(nofile);
            assert!(b.probes >= 1 && b.metrics_connections >= 1, "{b:?}");
            assert!(b.probes <= MAX_PROBES, "{b:?}");
            assert!(b.metrics_connections <= MAX_METRICS_CONNECTIONS, "{b:?}");
            if nofile >= RESERVED_FDS + CONTROL_CLIENTS + 2 {
                let used =
                    RESERVED_FDS + CONTROL_CLIENTS + b.probes as u64 + b.metrics_connections as u64;
                assert!(used <= nofile, "{nofile}: {b:?} uses {used}");
            }
        }
        assert_eq!(
            Budget::split(256),
            Budget {
                nofile: 256,
                probes: 114,
                metrics_connections: 38
            }
        );
        let big = Budget::split(1 << 20);
        assert_eq!(
            (big.probes, big.metrics_connections),
            (MAX_PROBES, MAX_METRICS_CONNECTIONS)
        );
        assert_eq!(Budget::need(3), 64 + 40 + 64 + 3);
        assert_eq!(Budget::need(10_000), 64 + 40 + 64 + 256);
    }
}
