//! Internet checksum arithmetic (RFC 1071) and incremental updates (RFC 1624).
//!
//! All values are "raw": 16/32-bit words loaded from packet memory in native byte order without
//! swapping. One's-complement sums are byte-order neutral, so a checksum updated from raw words
//! and stored back raw is correct on any host.
//!
//! Used by the XDP context of the datapath (the TC context uses the kernel's
//! `bpf_l3_csum_replace`/`bpf_l4_csum_replace`, which also keep `skb->csum` right) and by the
//! unit tests, which check every update against a full recomputation.

/// Folds a 64-bit one's-complement accumulator to 16 bits (without complementing).
#[inline(always)]
#[must_use]
pub fn fold(mut sum: u64) -> u16 {
    // Four folds bring any u64 down to 16 bits; a fixed count keeps the verifier happy.
    sum = (sum & 0xffff_ffff) + (sum >> 32);
    sum = (sum & 0xffff_ffff) + (sum >> 32);
    sum = (sum & 0xffff) + (sum >> 16);
    sum = (sum & 0xffff) + (sum >> 16);
    sum as u16
}

/// RFC 1624 eqn. 3: the checksum `check` after a 32-bit field changes from `from` to `to`.
#[inline(always)]
#[must_use]
pub fn replace4(check: u16, from: u32, to: u32) -> u16 {
    let sum = u64::from(!check) + u64::from(!from) + u64::from(to);
    !fold(sum)
}

/// RFC 1624 eqn. 3 for a 16-bit field.
#[inline(always)]
#[must_use]
pub fn replace2(check: u16, from: u16, to: u16) -> u16 {
    let sum = u64::from(!check) + u64::from(!from) + u64::from(to);
    !fold(sum)
}

/// UDP over IPv4: a checksum of 0 means "none" and must stay 0; an update that yields 0 must be
/// sent as 0xffff (RFC 768). The kernel's `BPF_F_MARK_MANGLED_0` does the same.
#[inline(always)]
#[must_use]
pub fn udp_mangled(check: u16, updated: impl FnOnce(u16) -> u16) -> u16 {
    if check == 0 {
        return 0;
    }
    match updated(check) {
        0 => 0xffff,
        c => c,
    }
}

/// Full one's-complement checksum of `data` (big-endian word value, as a header field reads
/// once converted with `u16::from_be_bytes`), seeded with `initial`. Test and userspace helper.
#[must_use]
pub fn checksum_be(initial: u64, data: &[u8]) -> u16 {
    let mut sum = initial;
    let mut chunks = data.chunks_exact(2);
    for w in &mut chunks {
        sum += u64::from(u16::from_be_bytes([w[0], w[1]]));
    }
    if let [last] = chunks.remainder() {
        sum += u64::from(u16::from_be_bytes([*last, 0]));
    }
    !fold(sum)
}
