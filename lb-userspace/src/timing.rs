//! The agent's and the CLI's timing constants, in one place.

use std::time::Duration;

/// How long the agent waits for ARP answers for backends present at start.
pub const NEXT_HOP_WAIT_AT_START: Duration = Duration::from_millis(1500);
/// How long a change (reload, CLI command) waits for new backends' ARP.
pub const NEXT_HOP_WAIT_ON_CHANGE: Duration = Duration::from_millis(300);
/// Period of the agent's housekeeping: retrying unresolved next hops and
/// failed map writes, sampling counters.
pub const TICK: Duration = Duration::from_secs(1);
/// Rates shown by `lb stats` cover at least this long.
pub const MIN_RATE_INTERVAL: Duration = Duration::from_millis(500);
/// A control client must send its request line within this time.
pub const CONTROL_READ_TIMEOUT: Duration = Duration::from_secs(10);
/// The CLI waits this long for the agent's answer.
pub const CONTROL_CALL_TIMEOUT: Duration = Duration::from_secs(30);
/// Refresh period of `lb stats --watch`.
pub const STATS_WATCH_PERIOD: Duration = Duration::from_secs(1);
/// A metrics client must send its request head within this time (also
/// between requests on a kept-alive connection).
pub const METRICS_HEADER_READ_TIMEOUT: Duration = Duration::from_secs(5);
/// The longest a metrics connection is kept.
pub const METRICS_CONNECTION_LIFETIME: Duration = Duration::from_secs(60);
/// The metrics accept loop pauses this long after a failed accept.
pub const METRICS_ACCEPT_BACKOFF: Duration = Duration::from_millis(200);
/// Refused metrics connections are logged at most this often.
pub const METRICS_REFUSAL_LOG_EVERY: Duration = Duration::from_secs(10);
/// Most health results recorded before one reconcile (the rest wait for
/// the next turn of the event loop, so requests are not starved).
pub const HEALTH_BATCH_MAX: usize = 4096;
