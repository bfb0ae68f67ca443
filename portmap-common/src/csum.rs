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

#[cfg(test)]
mod tests {
    extern crate std;
    use std::vec::Vec;

    use proptest::prelude::*;

    use super::*;

    /// Raw (native-order) 16/32-bit words at `off`, as the datapath loads them.
    fn raw16(b: &[u8], off: usize) -> u16 {
        u16::from_ne_bytes([b[off], b[off + 1]])
    }
    fn raw32(b: &[u8], off: usize) -> u32 {
        u32::from_ne_bytes([b[off], b[off + 1], b[off + 2], b[off + 3]])
    }

    fn ipv4_header(seed: &[u8; 20]) -> [u8; 20] {
        let mut h = *seed;
        h[0] = 0x45;
        h[10] = 0;
        h[11] = 0;
        let c = checksum_be(0, &h);
        h[10..12].copy_from_slice(&c.to_be_bytes());
        h
    }

    /// Checksum of an L4 segment (checksum field zeroed) with the IPv4 pseudo-header.
    fn l4_checksum(src: [u8; 4], dst: [u8; 4], proto: u8, seg: &[u8], check_off: usize) -> u16 {
        let mut seg = seg.to_vec();
        seg[check_off] = 0;
        seg[check_off + 1] = 0;
        let mut pseudo = Vec::new();
        pseudo.extend_from_slice(&src);
        pseudo.extend_from_slice(&dst);
        pseudo.extend_from_slice(&[0, proto]);
        pseudo.extend_from_slice(&(seg.len() as u16).to_be_bytes());
        pseudo.extend_from_slice(&seg);
        checksum_be(0, &pseudo)
    }

    proptest! {
        #[test]
        fn ipv4_address_update_matches_recomputation(seed: [u8; 20], new_dst: [u8; 4]) {
            let h = ipv4_header(&seed);
            let mut updated = h;
            updated[16..20].copy_from_slice(&new_dst);
            let incremental = replace4(raw16(&h, 10), raw32(&h, 16), raw32(&updated, 16));
            updated[10..12].copy_from_slice(&incremental.to_ne_bytes());
            prop_assert_eq!(checksum_be(0, &updated), 0, "header sums to 0xffff");
        }

        #[test]
        fn ttl_update_matches_recomputation(seed: [u8; 20]) {
            let h = ipv4_header(&seed);
            prop_assume!(h[8] > 0);
            let mut updated = h;
            updated[8] -= 1;
            let incremental = replace2(raw16(&h, 10), raw16(&h, 8), raw16(&updated, 8));
            updated[10..12].copy_from_slice(&incremental.to_ne_bytes());
            prop_assert_eq!(checksum_be(0, &updated), 0);
        }

        #[test]
        fn tcp_dnat_update_matches_recomputation(
            src: [u8; 4], dst: [u8; 4], new_dst: [u8; 4], new_port: u16,
            seg in proptest::collection::vec(any::<u8>(), 20..200),
        ) {
            let mut seg = seg;
            let c = l4_checksum(src, dst, 6, &seg, 16);
            seg[16..18].copy_from_slice(&c.to_be_bytes());
            // Destination address (pseudo-header) and destination port (segment) change.
            let mut check = replace4(raw16(&seg, 16), u32::from_ne_bytes(dst), u32::from_ne_bytes(new_dst));
            let old_port = raw16(&seg, 2);
            seg[2..4].copy_from_slice(&new_port.to_be_bytes());
            check = replace2(check, old_port, raw16(&seg, 2));
            seg[16..18].copy_from_slice(&check.to_ne_bytes());
            let want = l4_checksum(src, new_dst, 6, &seg, 16);
            prop_assert_eq!(u16::from_be_bytes([seg[16], seg[17]]), want);
        }

        #[test]
        fn udp_update_keeps_zero_and_matches_recomputation(
            src: [u8; 4], dst: [u8; 4], new_src: [u8; 4], with_checksum: bool,
            seg in proptest::collection::vec(any::<u8>(), 8..100),
        ) {
            let mut seg = seg;
            let c = if with_checksum { match l4_checksum(src, dst, 17, &seg, 6) { 0 => 0xffff, c => c } } else { 0 };
            seg[6..8].copy_from_slice(&c.to_be_bytes());
            let updated = udp_mangled(raw16(&seg, 6), |check| {
                replace4(check, u32::from_ne_bytes(src), u32::from_ne_bytes(new_src))
            });
            if !with_checksum {
                prop_assert_eq!(updated, 0);
            } else {
                let want = match l4_checksum(new_src, dst, 17, &seg, 6) { 0 => 0xffff, c => c };
                prop_assert_eq!(u16::from_be_bytes(updated.to_ne_bytes()), want);
            }
        }
    }

    /// A UDP update whose result is 0x0000 must be sent as 0xffff (0 would mean "no checksum").
    #[test]
    fn udp_update_yielding_zero_becomes_ffff() {
        let (src, dst, new_dst) = ([198, 18, 0, 2], [198, 18, 0, 1], [198, 18, 1, 2]);
        let mut seg = [0x30u8, 0x39, 0x14, 0xe9, 0, 12, 0, 0, 0, 0, 0, 0];
        // Choose the last payload word so that the checksum after the change is exactly 0.
        let partial = !l4_checksum(src, new_dst, 17, &seg, 6);
        seg[10..12].copy_from_slice(&(!partial).to_be_bytes());
        assert_eq!(l4_checksum(src, new_dst, 17, &seg, 6), 0);
        let before = l4_checksum(src, dst, 17, &seg, 6);
        let updated = udp_mangled(before.to_be(), |check| {
            replace4(check, u32::from_ne_bytes(dst), u32::from_ne_bytes(new_dst))
        });
        assert_eq!(updated, 0xffff);
    }
}
