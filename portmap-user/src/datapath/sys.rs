//! Every `bpf(2)` call aya 0.14 does not offer, typed: batch map operations, link update and
//! detach, object get, each with its `union bpf_attr` member as a `#[repr(C)]` struct, through one
//! unsafe wrapper.

use std::{
    ffi::CString,
    os::{
        fd::{AsFd, AsRawFd as _, BorrowedFd, FromRawFd as _, OwnedFd, RawFd},
        unix::ffi::OsStrExt as _,
    },
    path::Path,
};

// Command numbers of `enum bpf_cmd` (include/uapi/linux/bpf.h).
const BPF_OBJ_GET: libc::c_long = 7;
const BPF_MAP_LOOKUP_BATCH: libc::c_long = 24;
const BPF_MAP_UPDATE_BATCH: libc::c_long = 26;
const BPF_MAP_DELETE_BATCH: libc::c_long = 27;
const BPF_LINK_UPDATE: libc::c_long = 29;
const BPF_LINK_DETACH: libc::c_long = 34;

/// `bpf(cmd, attr, size_of::<T>())`; the return value, or the error.
///
/// # Safety
/// `T` must be laid out as the member of `union bpf_attr` that `cmd` reads (`#[repr(C)]`, kernel
/// field order, zeroed where unused), and every pointer in it must be valid for what the kernel
/// reads or writes through it during the call.
unsafe fn bpf<T>(cmd: libc::c_long, attr: &mut T) -> std::io::Result<i64> {
    // SAFETY: the caller guarantees `attr`'s layout and pointers; the kernel reads at most
    // size_of::<T>() bytes of it.
    let ret = unsafe { libc::syscall(libc::SYS_bpf, cmd, std::ptr::from_mut(attr), size_of::<T>()) };
    if ret < 0 {
        Err(std::io::Error::last_os_error())
    } else {
        Ok(ret)
    }
}

/// The `BPF_OBJ_*` member of `union bpf_attr`.
#[repr(C)]
struct ObjAttr {
    pathname: u64,
    bpf_fd: u32,
    file_flags: u32,
}

/// The `link_update` member of `union bpf_attr`.
#[repr(C)]
struct LinkUpdateAttr {
    link_fd: u32,
    new_prog_fd: u32,
    flags: u32,
    old_prog_fd: u32,
}

fn fd_u32(fd: BorrowedFd<'_>) -> std::io::Result<u32> {
    u32::try_from(fd.as_raw_fd()).map_err(std::io::Error::other)
}

/// Opens a pinned bpf object (`BPF_OBJ_GET`).
pub(super) fn obj_get(path: &Path) -> std::io::Result<OwnedFd> {
    let c_path = CString::new(path.as_os_str().as_bytes())
        .map_err(|e| std::io::Error::new(std::io::ErrorKind::InvalidInput, e))?;
    let mut attr = ObjAttr {
        pathname: c_path.as_ptr() as u64,
        bpf_fd: 0,
        file_flags: 0,
    };
    // SAFETY: ObjAttr is the `BPF_OBJ_*` member; the path it points at outlives the call.
    let fd = unsafe { bpf(BPF_OBJ_GET, &mut attr) }?;
    let fd = i32::try_from(fd).map_err(std::io::Error::other)?;
    // SAFETY: BPF_OBJ_GET returned a new file descriptor that nothing else owns.
    Ok(unsafe { OwnedFd::from_raw_fd(fd) })
}

/// The `link_detach` member of `union bpf_attr`.
#[repr(C)]
struct LinkDetachAttr {
    link_fd: u32,
}

/// Detaches a bpf_link now (`BPF_LINK_DETACH`, kernel 5.9+): its program stops running before the
/// call returns, however many references the link still has (the last reference going, as when
/// its pin is removed, detaches it only later, from a workqueue).
pub(super) fn link_detach(link: BorrowedFd<'_>) -> std::io::Result<()> {
    let mut attr = LinkDetachAttr {
        link_fd: fd_u32(link)?,
    };
    // SAFETY: LinkDetachAttr is the `link_detach` member.
    unsafe { bpf(BPF_LINK_DETACH, &mut attr) }.map(drop)
}

/// Replaces the program of a bpf_link atomically (`BPF_LINK_UPDATE`): packets see either the old
/// or the new program, never none. Fails with ENOLINK when the link's device is gone.
pub(super) fn link_update(link: BorrowedFd<'_>, program: BorrowedFd<'_>) -> std::io::Result<()> {
    let mut attr = LinkUpdateAttr {
        link_fd: fd_u32(link)?,
        new_prog_fd: fd_u32(program)?,
        flags: 0,
        old_prog_fd: 0,
    };
    // SAFETY: LinkUpdateAttr is the `link_update` member; it holds no pointers.
    unsafe { bpf(BPF_LINK_UPDATE, &mut attr) }.map(drop)
}

/// Replaces the program of the link pinned at `path`.
pub(super) fn link_update_pinned(path: &Path, program: &impl AsFd) -> std::io::Result<()> {
    let link = obj_get(path)?;
    link_update(link.as_fd(), program.as_fd())
}

/// The `batch` member of `union bpf_attr`.
#[repr(C)]
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

/// `BPF_MAP_LOOKUP_BATCH` (kernel ≥ 5.6) of a whole per-CPU array of `max_entries` values of
/// `value_size` bytes: every slot's per-CPU values (`cpus` of them, each padded to 8 bytes), in
/// a few system calls instead of one per slot. Returns (key, values) bytes per slot.
pub(super) fn lookup_all_percpu(
    map_fd: RawFd,
    max_entries: usize,
    value_size: usize,
    cpus: usize,
) -> std::io::Result<(Vec<u32>, Vec<u8>)> {
    let stride = value_size.next_multiple_of(8) * cpus;
    let mut keys = vec![0u32; max_entries];
    let mut values = vec![0u8; max_entries * stride];
    let (mut done, mut in_batch, mut out_batch) = (0usize, None::<u32>, 0u32);
    while done < max_entries {
        let mut attr = BatchAttr {
            in_batch: in_batch.as_ref().map_or(0, |b| std::ptr::from_ref(b) as u64),
            out_batch: (&raw mut out_batch) as u64,
            keys: keys[done..].as_mut_ptr() as u64,
            values: values[done * stride..].as_mut_ptr() as u64,
            count: u32::try_from(max_entries - done).unwrap_or(u32::MAX),
            map_fd: map_fd as u32,
            elem_flags: 0,
            flags: 0,
        };
        // SAFETY: BatchAttr is the `batch` member of bpf_attr; it points at room for `count`
        // keys and values (`stride` bytes each) and at the batch cursors, all alive for the call.
        let rc = unsafe { bpf(BPF_MAP_LOOKUP_BATCH, &mut attr) };
        done += attr.count as usize;
        match rc {
            // ENOENT: the end of the map was reached (with `count` entries copied).
            Err(e) if e.raw_os_error() == Some(libc::ENOENT) => break,
            Err(e) => return Err(e),
            Ok(_) => {}
        }
        if attr.count == 0 {
            break;
        }
        in_batch = Some(out_batch);
    }
    keys.truncate(done);
    values.truncate(done * stride);
    Ok((keys, values))
}

/// Entries one hash-map batch call moves at most (a bucket never holds nearly as many).
const HASH_BATCH: usize = 4096;

/// `BPF_MAP_LOOKUP_BATCH` of a hash map (kernel ≥ 5.6): up to `limit` entries, bucket by bucket,
/// one system call per `HASH_BATCH` entries instead of two per entry (aya's iterator asks for the
/// next key, then its value), and without revisiting keys that the datapath deletes meanwhile.
pub(super) fn lookup_hash<K, V>(map_fd: RawFd, limit: usize) -> std::io::Result<Vec<(K, V)>>
where
    K: zerocopy::FromZeros + Copy,
    V: zerocopy::FromZeros + Copy,
{
    let mut keys = vec![K::new_zeroed(); HASH_BATCH];
    let mut values = vec![V::new_zeroed(); HASH_BATCH];
    let mut entries = Vec::new();
    let (mut in_batch, mut out_batch) = (None::<u32>, 0u32);
    while entries.len() < limit {
        let mut attr = BatchAttr {
            in_batch: in_batch.as_ref().map_or(0, |b| std::ptr::from_ref(b) as u64),
            out_batch: (&raw mut out_batch) as u64,
            keys: keys.as_mut_ptr() as u64,
            values: values.as_mut_ptr() as u64,
            count: HASH_BATCH as u32,
            map_fd: map_fd as u32,
            elem_flags: 0,
            flags: 0,
        };
        // SAFETY: BatchAttr is the `batch` member of bpf_attr; it points at room for `count` keys
        // and values of the map's sizes (K and V are its key and value layouts) and at the
        // bucket cursors (a u32 for hash maps), all alive for the call.
        let rc = unsafe { bpf(BPF_MAP_LOOKUP_BATCH, &mut attr) };
        let got = (attr.count as usize).min(HASH_BATCH);
        entries.extend(keys[..got].iter().copied().zip(values[..got].iter().copied()));
        match rc {
            // ENOENT: the last bucket was read (with `count` entries copied).
            Err(e) if e.raw_os_error() == Some(libc::ENOENT) => break,
            Err(e) => return Err(e),
            // Not the end, yet nothing copied: never loop on it.
            Ok(_) if got == 0 => return Err(std::io::Error::other("the kernel read no entry")),
            Ok(_) => {}
        }
        in_batch = Some(out_batch);
    }
    entries.truncate(limit);
    Ok(entries)
}

/// `BPF_MAP_DELETE_BATCH` (kernel ≥ 5.6) of `keys`, a key already gone included (the kernel
/// stops at it: it is skipped and the batch goes on). Returns how many were deleted.
pub(super) fn delete_batch<K: Copy>(map_fd: RawFd, keys: &[K]) -> std::io::Result<usize> {
    let (mut done, mut deleted) = (0, 0);
    while done < keys.len() {
        let mut attr = BatchAttr {
            in_batch: 0,
            out_batch: 0,
            keys: keys[done..].as_ptr() as u64,
            values: 0,
            count: u32::try_from(keys.len() - done).unwrap_or(u32::MAX),
            map_fd: map_fd as u32,
            elem_flags: 0,
            flags: 0,
        };
        // SAFETY: BatchAttr is the `batch` member of bpf_attr; it points at `count` keys that
        // live for the call; the kernel reads them and writes back only `count`.
        let rc = unsafe { bpf(BPF_MAP_DELETE_BATCH, &mut attr) };
        let count = attr.count as usize;
        done += count;
        deleted += count;
        match rc {
            Ok(_) if count == 0 => return Err(std::io::Error::other("the kernel deleted no entry")),
            Ok(_) => {}
            // The key at `done` is not in the map: skip it.
            Err(e) if e.raw_os_error() == Some(libc::ENOENT) => done += 1,
            Err(e) => return Err(e),
        }
    }
    Ok(deleted)
}

/// `BPF_MAP_UPDATE_BATCH` (kernel ≥ 5.6): writes `keys[i]` → `values[i]` in as few system calls
/// as the kernel allows (aya 0.14 has no batch API).
pub(super) fn update_batch<K: Copy, V: Copy>(map_fd: RawFd, keys: &[K], values: &[V]) -> std::io::Result<()> {
    assert_eq!(keys.len(), values.len(), "a value for every key");
    // SAFETY: `values` holds `keys.len()` values of `size_of::<V>()` bytes each.
    unsafe { update_batch_raw(map_fd, keys, values.as_ptr().cast(), size_of::<V>()) }
}

/// `update_batch` of a per-CPU map, every key's value zero on every CPU (`cpus` of them, as the
/// kernel counts possible CPUs): the kernel wants each key's values side by side, each rounded
/// up to 8 bytes.
pub(super) fn zero_batch_per_cpu<V>(map_fd: RawFd, keys: &[u32], cpus: usize) -> std::io::Result<()> {
    let stride = size_of::<V>().next_multiple_of(8) * cpus;
    let zeroes = vec![0u8; stride * keys.len()];
    // SAFETY: `zeroes` holds `keys.len()` values of `stride` bytes each.
    unsafe { update_batch_raw(map_fd, keys, zeroes.as_ptr(), stride) }
}

/// # Safety
/// `values` points at `keys.len()` values of `stride` bytes each, the map's value size.
unsafe fn update_batch_raw<K: Copy>(
    map_fd: RawFd,
    keys: &[K],
    values: *const u8,
    stride: usize,
) -> std::io::Result<()> {
    let mut done = 0;
    while done < keys.len() {
        let mut attr = BatchAttr {
            in_batch: 0,
            out_batch: 0,
            keys: keys[done..].as_ptr() as u64,
            // SAFETY: `done < keys.len()`, so this stays inside the caller's values.
            values: unsafe { values.add(done * stride) } as u64,
            count: u32::try_from(keys.len() - done).unwrap_or(u32::MAX),
            map_fd: map_fd as u32,
            elem_flags: 0,
            flags: 0,
        };
        // SAFETY: BatchAttr is the `batch` member of bpf_attr; it points at `count` keys and
        // values that live for the call; the kernel reads them and writes back only `count`.
        unsafe { bpf(BPF_MAP_UPDATE_BATCH, &mut attr) }?;
        if attr.count == 0 {
            return Err(std::io::Error::other("the kernel wrote no entry"));
        }
        done += attr.count as usize;
    }
    Ok(())
}
