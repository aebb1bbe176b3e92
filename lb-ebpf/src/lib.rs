//! Kernel-side code shared by lb's XDP programs. The balancer (`lb_xdp`)
//! is the `lb-ebpf` binary (main.rs), the backends' decapsulation program
//! (`lb_decap`) the `lb-decap` binary (bin/lb-decap.rs, over tunnel.rs);
//! the test and benchmark programs (lb-ebpf-testprogs) parse frames with
//! the same helpers, so that the benchmark floor does the balancer's
//! parsing work.
//!
//! The library is also what lb-userspace names as a build dependency, so
//! that cargo rebuilds the object when this crate changes.
#![no_std]

pub mod encap;
pub mod encap6;
pub mod icmp;
pub mod icmp6;
pub mod parse;
pub mod rewrite;
pub mod tunnel;
