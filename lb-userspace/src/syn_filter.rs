//! The agent's side of the SYN filter (see [`lb_common::SYN_FILTER_BITS`]):
//! which TCP flows may have a conntrack record, so that a SYN under the
//! SYN-flood guard skips the conntrack lookup when its flow certainly has
//! none. The kernel sets a flow's bit in both banks when it records the
//! flow and never clears one; the agent, with each pass over conntrack,
//! clears the bank not in use, sets the bits of the records alive in the
//! pass and switches the kernel to that bank. The map is memory-mapped:
//! the agent's stores and the kernel's are atomic word operations on the
//! same memory.
//!
//! Why a record alive at the switch always has its bit in the new bank:
//! the bank is cleared before the pass starts; a record made after its
//! word was cleared got its bit from the kernel, and one made before was
//! there during the whole pass, which set it (a walk of a live hash map
//! sees every element present throughout the walk).

use std::{
    os::fd::{AsRawFd as _, OwnedFd},
    ptr::NonNull,
    sync::atomic::{AtomicU64, Ordering},
};

use lb_common::{
    SYN_FILTER_BANK_WORDS, SYN_FILTER_ENTRIES, SYN_FILTER_OFF, map_names, syn_filter_bit,
};

/// SYN_FILTER, memory-mapped.
pub struct SynFilter {
    words: NonNull<AtomicU64>,
    _fd: OwnedFd,
}

// SAFETY: the mapping is shared memory accessed through atomics only.
unsafe impl Send for SynFilter {}

const LEN: usize = SYN_FILTER_ENTRIES as usize * 8;

impl SynFilter {
    /// Maps SYN_FILTER (`fd`: the loaded program's map, created
    /// memory-mappable).
    pub fn open(fd: OwnedFd) -> anyhow::Result<Self> {
        // SAFETY: a shared read-write mapping of the map's values, which
        // are LEN bytes (SYN_FILTER_ENTRIES words); checked below.
        let p = unsafe {
            libc::mmap(
                std::ptr::null_mut(),
                LEN,
                libc::PROT_READ | libc::PROT_WRITE,
                libc::MAP_SHARED,
                fd.as_raw_fd(),
                0,
            )
        };
        if p == libc::MAP_FAILED {
            anyhow::bail!(
                "memory-mapping {} ({LEN} bytes): {}",
                map_names::SYN_FILTER,
                std::io::Error::last_os_error()
            );
        }
        let words = NonNull::new(p as *mut AtomicU64)
            .ok_or_else(|| anyhow::anyhow!("mmap of {} returned null", map_names::SYN_FILTER))?;
        Ok(Self { words, _fd: fd })
    }

    fn word(&self, i: u32) -> &AtomicU64 {
        assert!(i < SYN_FILTER_ENTRIES, "SYN filter word {i} out of range");
        // SAFETY: within the mapping (checked), which lives as long as
        // self; u64 words are 8-byte aligned (the mapping is page-aligned).
        unsafe { &*self.words.as_ptr().add(i as usize) }
    }

    /// The bank the kernel reads, if one is complete.
    pub fn bank_in_use(&self) -> Option<u32> {
        match self.word(0).load(Ordering::Acquire) {
            1 => Some(0),
            2 => Some(1),
            _ => None,
        }
    }

    /// Starts a rebuild: the bank not in use (bank 0 while none is),
    /// cleared. Its bits are then set with [`Self::note`] for every
    /// record alive in a pass over conntrack that starts after this
    /// returns, and the kernel switched to it with [`Self::use_bank`].
    pub fn begin(&self) -> u32 {
        let bank = match self.bank_in_use() {
            Some(0) => 1,
            _ => 0,
        };
        let first = 1 + bank * SYN_FILTER_BANK_WORDS;
        for i in first..first + SYN_FILTER_BANK_WORDS {
            self.word(i).store(0, Ordering::Relaxed);
        }
        bank
    }

    /// Sets the bit of the TCP flow with hash `hash` in `bank`.
    pub fn note(&self, bank: u32, hash: u32) {
        let (i, bit) = syn_filter_bit(hash, bank);
        self.word(i).fetch_or(bit, Ordering::Relaxed);
    }

    /// Makes the kernel read `bank` (its bits all stored before).
    pub fn use_bank(&self, bank: u32) {
        self.word(0)
            .store(1 + u64::from(bank & 1), Ordering::Release);
    }

    /// Makes the kernel look up conntrack for every guarded SYN again.
    pub fn disable(&self) {
        self.word(0).store(SYN_FILTER_OFF, Ordering::Release);
    }

    /// Whether the bank in use says the flow with hash `hash` may have a
    /// record (true while no bank is complete), as the kernel reads it.
    pub fn may_have_record(&self, hash: u32) -> bool {
        self.bank_in_use().is_none_or(|bank| {
            let (i, bit) = syn_filter_bit(hash, bank);
            self.word(i).load(Ordering::Relaxed) & bit != 0
        })
    }
}

impl Drop for SynFilter {
    fn drop(&mut self) {
        // SAFETY: the mapping made in open, of LEN bytes, unused from here.
        unsafe { libc::munmap(self.words.as_ptr() as *mut libc::c_void, LEN) };
    }
}
