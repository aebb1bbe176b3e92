//! `BPF_MAP_UPDATE_BATCH` on arrays of u32 (aya 0.14 has no batch call).

/// `attr.batch` of the bpf(2) syscall (include/uapi/linux/bpf.h).
#[repr(C)]
#[derive(Default)]
struct BatchAttr {
    in_batch: u64,
    out_batch: u64,
    keys: u64,
    values: u64,
    count: u32,
    map_fd: u32,
    elem_flags: u64,
    flags: u64,
}

const BPF_MAP_UPDATE_BATCH: libc::c_long = 26;

/// `BPF_MAP_UPDATE_BATCH` of `keys[i] -> values[i]` on the array `fd`.
pub(super) fn update_batch(
    fd: std::os::fd::RawFd,
    keys: &[u32],
    values: &[u32],
) -> std::io::Result<()> {
    assert_eq!(keys.len(), values.len());
    let mut attr = BatchAttr {
        keys: keys.as_ptr() as u64,
        values: values.as_ptr() as u64,
        count: keys.len() as u32,
        map_fd: fd as u32,
        ..Default::default()
    };
    // SAFETY: `attr` is a valid bpf_attr prefix for this command; the key
    // and value buffers hold `count` u32 elements each and outlive the
    // call; the kernel writes back only `attr.count`.
    let rc = unsafe {
        libc::syscall(
            libc::SYS_bpf,
            BPF_MAP_UPDATE_BATCH,
            &mut attr as *mut BatchAttr,
            std::mem::size_of::<BatchAttr>() as u32,
        )
    };
    if rc < 0 {
        return Err(std::io::Error::last_os_error());
    }
    if attr.count as usize != keys.len() {
        return Err(std::io::Error::other(format!(
            "batch update wrote {} of {} elements",
            attr.count,
            keys.len()
        )));
    }
    Ok(())
}

/// The kernel has no batch update for this map (EINVAL on kernels before
/// 5.6, ENOTSUPP/EOPNOTSUPP where the map type has none).
pub(super) fn batch_unsupported(e: &std::io::Error) -> bool {
    const ENOTSUPP: i32 = 524;
    matches!(
        e.raw_os_error(),
        Some(libc::EINVAL | libc::EOPNOTSUPP | ENOTSUPP)
    )
}
