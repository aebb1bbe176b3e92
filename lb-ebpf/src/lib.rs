#![no_std]
//! The XDP programs live in main.rs (the `lb-ebpf` binary); this empty
//! library only lets lb-userspace name this crate as a build dependency.
