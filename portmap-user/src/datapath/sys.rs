//! The `bpf(2)` calls aya 0.14 does not offer (batch map operations, link update, object get),
//! through one wrapper.

/// `bpf(cmd, attr, size_of::<T>())`; the return value, or the error.
///
/// # Safety
/// `T` must be laid out as the member of `union bpf_attr` that `cmd` reads (`#[repr(C)]`, kernel
/// field order, zeroed where unused), and every pointer in it must be valid for what the kernel
/// reads or writes through it during the call.
pub(super) unsafe fn bpf<T>(cmd: libc::c_long, attr: &mut T) -> std::io::Result<i64> {
    // SAFETY: the caller guarantees `attr`'s layout and pointers; the kernel reads at most
    // size_of::<T>() bytes of it.
    let ret = unsafe { libc::syscall(libc::SYS_bpf, cmd, std::ptr::from_mut(attr), size_of::<T>()) };
    if ret < 0 {
        Err(std::io::Error::last_os_error())
    } else {
        Ok(ret)
    }
}
