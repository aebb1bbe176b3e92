//! The bpf(2) batch commands on maps (aya 0.14 has none): one syscall for
//! many elements.

/// `union bpf_attr` for the BPF_MAP_*_BATCH commands
/// (include/uapi/linux/bpf.h).
#[repr(C)]
#[derive(Default)]
pub(crate) struct BatchAttr {
    pub in_batch: u64,
    pub out_batch: u64,
    pub keys: u64,
    pub values: u64,
    pub count: u32,
    pub map_fd: u32,
    pub elem_flags: u64,
    pub flags: u64,
}

pub(crate) const BPF_MAP_LOOKUP_BATCH: libc::c_long = 24;
pub(crate) const BPF_MAP_UPDATE_BATCH: libc::c_long = 26;

/// Runs batch command `cmd` with `attr`; the kernel writes back
/// `attr.count` (and the batch cursors for lookups).
pub(crate) fn bpf_batch(cmd: libc::c_long, attr: &mut BatchAttr) -> std::io::Result<()> {
    // SAFETY: `attr` is a valid union bpf_attr prefix for the batch
    // commands; the pointers in it are the caller's live buffers of
    // `count` elements each.
    let rc = unsafe {
        libc::syscall(
            libc::SYS_bpf,
            cmd,
            attr as *mut BatchAttr,
            std::mem::size_of::<BatchAttr>(),
        )
    };
    if rc < 0 {
        return Err(std::io::Error::last_os_error());
    }
    Ok(())
}

/// The kernel has no batch update for this map (EINVAL on kernels before
/// 5.6, ENOTSUPP/EOPNOTSUPP where the map type has none).
pub(crate) fn batch_unsupported(e: &std::io::Error) -> bool {
    const ENOTSUPP: i32 = 524;
    matches!(
        e.raw_os_error(),
        Some(libc::EINVAL | libc::EOPNOTSUPP | ENOTSUPP)
    )
}

/// `BPF_MAP_UPDATE_BATCH` of `keys[i] -> values[i]` on the map `fd`, any
/// map type with batch updates, `K` and `V` its key and value exactly
/// (plain data without padding, as the kernel copies `key_size` and
/// `value_size` bytes per element).
pub(crate) fn update_batch_of<K: aya::Pod, V: aya::Pod>(
    fd: std::os::fd::RawFd,
    keys: &[K],
    values: &[V],
) -> std::io::Result<()> {
    assert_eq!(keys.len(), values.len());
    let mut attr = BatchAttr {
        keys: keys.as_ptr() as u64,
        values: values.as_ptr() as u64,
        count: keys.len() as u32,
        map_fd: fd as u32,
        ..Default::default()
    };
    bpf_batch(BPF_MAP_UPDATE_BATCH, &mut attr)?;
    if attr.count as usize != keys.len() {
        return Err(std::io::Error::other(format!(
            "batch update wrote {} of {} elements",
            attr.count,
            keys.len()
        )));
    }
    Ok(())
}

pub(crate) const BPF_MAP_DELETE_BATCH: libc::c_long = 27;

/// `BPF_MAP_DELETE_BATCH` of `keys` on the map `fd` (`K` its key
/// exactly). The kernel stops at the first key it cannot delete (absent:
/// ENOENT): the error comes with the number deleted before it.
pub(crate) fn delete_batch_of<K: aya::Pod>(
    fd: std::os::fd::RawFd,
    keys: &[K],
) -> Result<(), (std::io::Error, usize)> {
    let mut attr = BatchAttr {
        keys: keys.as_ptr() as u64,
        count: keys.len() as u32,
        map_fd: fd as u32,
        ..Default::default()
    };
    bpf_batch(BPF_MAP_DELETE_BATCH, &mut attr).map_err(|e| (e, attr.count as usize))
}
