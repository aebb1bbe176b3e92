//! lb's userspace: the agent, the CLI and the pieces they share.

pub mod acl;
pub mod agent;
mod bpf_batch;
pub mod budget;
pub mod config;
pub mod config_tool;
pub mod control;
pub mod datapath;
pub mod decap;
#[cfg(test)]
mod fake_maps;
pub mod flow_keeper;
pub mod health;
pub mod kernel_memory;
pub mod keys;
pub mod mac;
pub mod maglev;
pub mod map_sizes;
pub mod metrics;
pub mod nat_keeper;
pub mod neigh;
#[cfg(test)]
mod object_calls;
pub mod pins;
pub mod reconcile;
pub mod rundir;
pub mod sched;
pub mod status_page;
pub mod syn_filter;
pub mod timing;
pub mod vip_routes;
pub mod xdp_features;
