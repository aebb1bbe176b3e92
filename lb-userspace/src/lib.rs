//! lb's userspace: the agent, the CLI and the pieces they share.

pub mod config;
pub mod datapath;
pub mod maglev;
