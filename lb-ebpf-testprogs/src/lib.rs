#![no_std]
//! The programs live in main.rs (the `lb-ebpf-testprogs` binary); this
//! empty library only lets the test-support crate (lb-tests) name this
//! crate as a build dependency, so that cargo rebuilds the object when it
//! changes.
