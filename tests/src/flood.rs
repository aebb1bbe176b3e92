//! A paced flood of crafted frames sent from a test namespace with an
//! `AF_PACKET` socket (no routing, no source check: spoofed sources go
//! out as built), bounded in count and time.

use std::{
    os::fd::AsRawFd as _,
    sync::atomic::{AtomicBool, Ordering},
    thread,
    time::{Duration, Instant},
};

use anyhow::{Result, ensure};

use crate::{capture::open_packet_socket, netns::Netns};

/// Sends `frame(i)` for i = 0, 1, … out of `iface` in `ns`, about `rate`
/// frames per second, until `duration` has passed, `stop` is set or
/// `rate × duration` frames went out. Returns the frames sent.
pub fn flood(
    ns: &Netns,
    iface: &str,
    rate: u64,
    duration: Duration,
    stop: &AtomicBool,
    frame: impl Fn(u64) -> Vec<u8>,
) -> Result<u64> {
    // The socket belongs to the namespace it was made in, wherever it is
    // used from.
    let name = iface.to_owned();
    let fd = ns.run(move || open_packet_socket(&name))??;
    let limit = rate.saturating_mul(duration.as_secs().max(1));
    let started = Instant::now();
    let mut sent = 0u64;
    while sent < limit && !stop.load(Ordering::Relaxed) {
        let elapsed = started.elapsed();
        if elapsed >= duration {
            break;
        }
        // Catch up with the pace, then sleep a little.
        let due = ((elapsed.as_secs_f64() * rate as f64) as u64).min(limit);
        while sent < due {
            let f = frame(sent);
            // SAFETY: a bound AF_PACKET socket and a valid buffer.
            let n = unsafe { libc::send(fd.as_raw_fd(), f.as_ptr().cast(), f.len(), 0) };
            ensure!(
                n == f.len() as isize,
                "sending frame {sent} on {iface}: {}",
                std::io::Error::last_os_error()
            );
            sent += 1;
        }
        thread::sleep(Duration::from_millis(2));
    }
    Ok(sent)
}
