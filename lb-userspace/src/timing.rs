//! The agent's and the CLI's timing constants, in one place.

use std::time::Duration;

/// How long the agent waits, before attaching, for ARP answers for the
/// backends present at start (all asked at once; it waits less when every
/// one has answered or failed). Later answers come as events.
pub const NEXT_HOP_WAIT_AT_START: Duration = Duration::from_millis(1500);
/// Every backend's route and neighbour entry are re-read this often, and
/// failed ARP resolutions asked again (besides following kernel events).
pub const NEXT_HOP_REFRESH: Duration = Duration::from_secs(30);
/// After a route or link event, the tables are re-read this much later
/// (one read for a burst of events).
pub const NEXT_HOP_SETTLE: Duration = Duration::from_millis(50);
/// An address without a neighbour entry is probed at most this often.
pub const NEXT_HOP_PROBE_MIN_INTERVAL: Duration = Duration::from_secs(5);
/// Route lookups in flight at once during a re-read.
pub const NEXT_HOP_CONCURRENT_LOOKUPS: usize = 32;
/// Period of the agent's housekeeping: retrying failed map writes,
/// sampling counters.
pub const TICK: Duration = Duration::from_secs(1);
/// The announce table is re-read this often: a VIP route removed (or one
/// of lb's protocol added) by someone else is put right.
pub const ANNOUNCE_RECHECK: Duration = Duration::from_secs(5);
/// Rates shown by `lb stats` cover at least this long.
pub const MIN_RATE_INTERVAL: Duration = Duration::from_millis(500);
/// A control client must send its request line within this time.
pub const CONTROL_READ_TIMEOUT: Duration = Duration::from_secs(10);
/// The agent gives up writing a reply to a control client after this.
pub const CONTROL_WRITE_TIMEOUT: Duration = Duration::from_secs(5);
/// Pause after a failed accept on the control socket (e.g. EMFILE), so
/// that the loop does not spin.
pub const CONTROL_ACCEPT_BACKOFF: Duration = Duration::from_millis(100);
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
/// The flow clock's tick: how often the agent advances the data path's
/// clock. A flow in use refreshes its conntrack record once per tick.
pub const FLOW_CLOCK_PERIOD: Duration = Duration::from_millis(100);
/// How often the agent counts active flows per backend (one batched pass
/// over the conntrack table; less often when a pass takes longer than a
/// twentieth of this) and re-reads the egress MTUs.
pub const FLOW_COUNT_PERIOD: Duration = Duration::from_secs(2);
