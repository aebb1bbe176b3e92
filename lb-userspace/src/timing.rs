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
/// The flow clock's tick: how often the agent advances the data path's
/// clock. A flow in use refreshes its conntrack record once per tick.
pub const FLOW_CLOCK_PERIOD: Duration = Duration::from_millis(100);
/// How often the agent counts active flows per backend (one batched pass
/// over the conntrack table; less often when a pass takes longer than a
/// twentieth of this) and re-reads the egress MTUs.
pub const FLOW_COUNT_PERIOD: Duration = Duration::from_secs(2);
