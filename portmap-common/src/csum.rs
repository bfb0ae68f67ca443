//! Internet checksum arithmetic (RFC 1071) and incremental updates (RFC 1624).
//!
//! All values are "raw": 16/32-bit words loaded from packet memory in native byte order without
//! swapping. One's-complement sums are byte-order neutral, so a checksum updated from raw words
//! and stored back raw is correct on any host.
//!
//! Used by the XDP context of the datapath; by the TC context for full checksums too, for telling
//! them from CHECKSUM_PARTIAL ones (`pseudo_header`, `may_be_partial`), and to read back how the
//! kernel's `bpf_l4_csum_replace` (which keeps partial checksums right) applied an address
//! change (`applied`); and by the unit tests, which check every update against a full
//! recomputation.

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

/// Adds the change of a 32-bit field from `from` to `to` to the one's-complement accumulator
/// `acc` (the RFC 1624 difference of several fields, summed before it is applied once).
#[inline(always)]
#[must_use]
pub fn add_change(acc: u64, from: u32, to: u32) -> u64 {
    acc + u64::from(!from) + u64::from(to)
}

/// Folds an accumulator to the 32-bit one's-complement sum the kernel calls `__wsum` (the
/// difference `bpf_l4_csum_replace` takes when its size is 0).
#[inline(always)]
#[must_use]
pub fn fold32(mut sum: u64) -> u32 {
    sum = (sum & 0xffff_ffff) + (sum >> 32);
    sum = (sum & 0xffff_ffff) + (sum >> 32);
    sum as u32
}

/// The checksum `check` after fields whose difference is `diff` (an `add_change` accumulator)
/// changed: RFC 1624 eqn. 3 applied once.
#[inline(always)]
#[must_use]
pub fn apply_change(check: u16, diff: u64) -> u16 {
    !fold(u64::from(!check) + u64::from(fold(diff)))
}

/// The folded one's-complement sum of a TCP, UDP or ICMPv6 pseudo-header (raw words): the
/// addresses (an IPv4 address in the first word, zeros after), the protocol and the segment's
/// length. It is what the L4 checksum field of a CHECKSUM_PARTIAL packet holds (the kernel
/// writes `~csum_tcpudp_magic(..)` or `~csum_ipv6_magic(..)` of it there, and the device, or
/// `skb_checksum_help`, completes it with the segment's own sum).
#[inline(always)]
#[must_use]
pub fn pseudo_header(saddr: &[u32; 4], daddr: &[u32; 4], proto: u8, l4_len: u32) -> u16 {
    let len = l4_len.to_be_bytes();
    let mut sum = u64::from(u16::from_ne_bytes([0, proto]))
        + u64::from(u16::from_ne_bytes([len[0], len[1]]))
        + u64::from(u16::from_ne_bytes([len[2], len[3]]));
    for i in 0..4 {
        sum += u64::from(saddr[i]) + u64::from(daddr[i]);
    }
    fold(sum)
}

/// Whether the L4 checksum field `check` may be a CHECKSUM_PARTIAL packet's, whose pseudo-header
/// sums to `pseudo` (`pseudo_header`): equal as one's-complement numbers (0x0000 and 0xffff are
/// one zero). Where it is not, the packet is certainly not CHECKSUM_PARTIAL (a partial field
/// that did not hold its pseudo-header's sum would complete to a wrong checksum), so its field
/// is a full checksum; where it is, the packet is CHECKSUM_PARTIAL or its full checksum happens
/// to equal that sum (about one packet in 65,535), which only the kernel can tell.
#[inline(always)]
#[must_use]
pub fn may_be_partial(check: u16, pseudo: u16) -> bool {
    let zero_as_one = |c: u16| if c == 0xffff { 0 } else { c };
    zero_as_one(check) == zero_as_one(pseudo)
}

/// What `skb->csum` of a CHECKSUM_COMPLETE skb (the sum of the packet from its IP header on, as
/// a `__wsum`) must still be moved by, with `bpf_csum_update`, after a translation whose
/// addresses changed by `addr_diff` (an `add_change` accumulator) was applied to its checksums
/// by arithmetic (`by_kernel` false) or by the kernel's `bpf_l4_csum_replace` with
/// `BPF_F_PSEUDO_HDR` (true); 0: nothing.
///
/// Over the whole translation the sum moves by minus the addresses' difference for IPv4 (the IP
/// header's sum stays, as its checksum makes up for the address; a port and the L4 checksum make
/// up for each other; the L4 checksum also moves by minus the pseudo-header's change) and not at
/// all for IPv6 (the L4 checksum's change makes up for the addresses'). Arithmetic moves it by
/// nothing, so IPv4 needs that difference. The kernel's helper moves it by minus the difference
/// for both families, so IPv6 needs it back: the kernel's own fix, a `BPF_F_IPV6` flag (2025),
/// is an unknown flag to older kernels, which refuse the call.
#[inline(always)]
#[must_use]
pub fn complete_correction(addr_diff: Option<u64>, v6: bool, by_kernel: bool) -> u32 {
    match (addr_diff, v6, by_kernel) {
        (Some(diff), false, false) => !fold32(diff),
        (Some(diff), true, true) => fold32(diff),
        _ => 0,
    }
}

/// How the kernel applied a pseudo-header difference to an L4 checksum field
/// (`bpf_l4_csum_replace` with `BPF_F_PSEUDO_HDR`), read back from the field.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Applied {
    /// As to a full checksum (eqn. 3): the skb is not CHECKSUM_PARTIAL, so a change inside the
    /// segment (a port) is applied to the field too.
    Full,
    /// As to CHECKSUM_PARTIAL's pseudo-header sum, which the segment's own changes never touch.
    Partial,
    /// Neither can be told (the difference is a one's-complement zero, or the field was left
    /// alone): ask the kernel again for the segment's change.
    Unknown,
}

/// Tells from the field before (`before`) and after (`after`) the kernel applied `diff` which of
/// its two ways it took: a full checksum moves by minus the difference, a partial sum by plus it.
/// A zero reads as 0x0000 or 0xffff (the kernel writes `CSUM_MANGLED_0` for UDP), so both count
/// as one.
#[inline(always)]
#[must_use]
pub fn applied(before: u16, after: u16, diff: u64) -> Applied {
    let zero_as_one = |c: u16| if c == 0xffff { 0 } else { c };
    let d = fold(diff);
    let full = zero_as_one(!fold(u64::from(!before) + u64::from(d)));
    let partial = zero_as_one(fold(u64::from(before) + u64::from(d)));
    let after = zero_as_one(after);
    if full == partial {
        Applied::Unknown
    } else if after == full {
        Applied::Full
    } else if after == partial {
        Applied::Partial
    } else {
        Applied::Unknown
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

    /// The kernel's `inet_proto_csum_replace_by_diff` on the field (`partial`: the skb is
    /// CHECKSUM_PARTIAL) with `BPF_F_PSEUDO_HDR`, as `bpf_l4_csum_replace` of size 0 applies it.
    fn kernel_by_diff(field: u16, diff: u32, partial: bool) -> u16 {
        let csum_add = |a: u32, b: u32| {
            let (s, carry) = a.overflowing_add(b);
            s + u32::from(carry)
        };
        let csum_fold = |s: u32| {
            let s = (s & 0xffff) + (s >> 16);
            let s = (s & 0xffff) + (s >> 16);
            !(s as u16)
        };
        if partial {
            !csum_fold(csum_add(u32::from(field), diff))
        } else {
            csum_fold(csum_add(diff, !u32::from(field)))
        }
    }

    proptest! {
        /// DNAT of a TCP segment as the TC datapath does it: the address by one kernel call,
        /// the port by hand once the field shows the skb's checksum is a full one.
        #[test]
        fn address_by_kernel_then_port_by_hand_matches_recomputation(
            src: [u8; 4], dst: [u8; 4], new_dst: [u8; 4], new_port: u16,
            seg in proptest::collection::vec(any::<u8>(), 20..200),
        ) {
            prop_assume!(!fold(add_change(0, u32::from_ne_bytes(dst), u32::from_ne_bytes(new_dst))).is_multiple_of(0xffff));
            let mut seg = seg;
            let c = l4_checksum(src, dst, 6, &seg, 16);
            seg[16..18].copy_from_slice(&c.to_be_bytes());
            let diff = add_change(0, u32::from_ne_bytes(dst), u32::from_ne_bytes(new_dst));
            let before = raw16(&seg, 16);
            let after = kernel_by_diff(before, fold32(diff), false);
            prop_assert_eq!(after, apply_change(before, diff));
            prop_assert_eq!(applied(before, after, diff), Applied::Full);
            let old_port = raw16(&seg, 2);
            seg[2..4].copy_from_slice(&new_port.to_be_bytes());
            let check = replace2(after, old_port, raw16(&seg, 2));
            seg[16..18].copy_from_slice(&check.to_ne_bytes());
            prop_assert_eq!(u16::from_be_bytes([seg[16], seg[17]]), l4_checksum(src, new_dst, 6, &seg, 16));
        }

        /// CHECKSUM_PARTIAL: the field holds the pseudo-header's sum; the kernel moves it by the
        /// address change, which reads as `Partial`, and the port is left to the checksum's
        /// completion.
        #[test]
        fn a_partial_sum_reads_as_partial(src: [u8; 4], dst: [u8; 4], new_dst: [u8; 4], len: u16) {
            let diff = add_change(0, u32::from_ne_bytes(dst), u32::from_ne_bytes(new_dst));
            prop_assume!(!fold(diff).is_multiple_of(0xffff));
            let pseudo = |dst: [u8; 4]| {
                let mut p = Vec::new();
                p.extend_from_slice(&src);
                p.extend_from_slice(&dst);
                p.extend_from_slice(&[0, 6]);
                p.extend_from_slice(&len.to_be_bytes());
                !checksum_be(0, &p)
            };
            let before = pseudo(dst).to_be();
            let after = kernel_by_diff(before, fold32(diff), true);
            prop_assert_eq!(after % 0xffff, pseudo(new_dst).to_be() % 0xffff);
            prop_assert_eq!(applied(before, after, diff), Applied::Partial);
        }

        /// IPv6: four address words in one difference, as one per word.
        #[test]
        fn one_difference_of_four_words_is_four_updates(check: u16, from: [u32; 4], to: [u32; 4]) {
            let diff = (0..4).fold(0, |acc, i| add_change(acc, from[i], to[i]));
            let one_by_one = (0..4).fold(check, |c, i| replace4(c, from[i], to[i]));
            prop_assert_eq!(apply_change(check, diff) % 0xffff, one_by_one % 0xffff);
        }
    }

    /// The pseudo-header of an IPv6 segment with `src`, `dst` and length `len`, as bytes.
    fn pseudo_v6(src: [u8; 16], dst: [u8; 16], proto: u8, len: u32) -> Vec<u8> {
        let mut p = Vec::new();
        p.extend_from_slice(&src);
        p.extend_from_slice(&dst);
        p.extend_from_slice(&len.to_be_bytes());
        p.extend_from_slice(&[0, 0, 0, proto]);
        p
    }

    fn words(a: &[u8]) -> [u32; 4] {
        let mut w = [0; 4];
        for (i, c) in a.chunks_exact(4).enumerate() {
            w[i] = u32::from_ne_bytes([c[0], c[1], c[2], c[3]]);
        }
        w
    }

    proptest! {
        /// A field holding `pseudo_header` completes, as a device or `skb_checksum_help` does
        /// (the segment's sum, field included, complemented), to the full checksum: the value
        /// is the one a CHECKSUM_PARTIAL packet carries (IPv4).
        #[test]
        fn a_partial_field_completes_to_the_full_checksum_v4(
            src: [u8; 4], dst: [u8; 4], udp: bool,
            seg in proptest::collection::vec(any::<u8>(), 20..200),
        ) {
            let (proto, check_off) = if udp { (17, 6) } else { (6, 16) };
            let mut seg = seg;
            let pseudo = pseudo_header(&words(&src), &words(&dst), proto, seg.len() as u32);
            seg[check_off..check_off + 2].copy_from_slice(&pseudo.to_ne_bytes());
            let completed = checksum_be(0, &seg);
            prop_assert_eq!(completed % 0xffff, l4_checksum(src, dst, proto, &seg, check_off) % 0xffff);
            prop_assert!(may_be_partial(pseudo, pseudo));
        }

        /// The same for IPv6 (a 32-bit length, the next header in the last byte).
        #[test]
        fn a_partial_field_completes_to_the_full_checksum_v6(
            src: [u8; 16], dst: [u8; 16],
            seg in proptest::collection::vec(any::<u8>(), 20..200),
        ) {
            let mut seg = seg;
            let len = seg.len() as u32;
            let pseudo = pseudo_header(&words(&src), &words(&dst), 6, len);
            seg[16..18].copy_from_slice(&pseudo.to_ne_bytes());
            let completed = checksum_be(0, &seg);
            let mut full = pseudo_v6(src, dst, 6, len);
            let mut zeroed = seg.clone();
            zeroed[16..18].copy_from_slice(&[0, 0]);
            full.extend_from_slice(&zeroed);
            prop_assert_eq!(completed % 0xffff, checksum_be(0, &full) % 0xffff);
        }

        /// A full checksum is told from a partial one unless the two are equal numbers.
        #[test]
        fn a_full_checksum_is_not_partial_unless_equal(
            src: [u8; 4], dst: [u8; 4],
            seg in proptest::collection::vec(any::<u8>(), 20..200),
        ) {
            let full = l4_checksum(src, dst, 6, &seg, 16).to_be();
            let pseudo = pseudo_header(&words(&src), &words(&dst), 6, seg.len() as u32);
            prop_assert_eq!(may_be_partial(full, pseudo), full % 0xffff == pseudo % 0xffff);
        }
    }

    /// `skb->csum` of a CHECKSUM_COMPLETE skb: the one's-complement sum of `bytes` (raw words).
    fn wsum(bytes: &[u8]) -> u64 {
        let mut sum = 0u64;
        let mut chunks = bytes.chunks_exact(2);
        for w in &mut chunks {
            sum += u64::from(u16::from_ne_bytes([w[0], w[1]]));
        }
        if let [last] = chunks.remainder() {
            sum += u64::from(u16::from_ne_bytes([*last, 0]));
        }
        sum
    }

    /// The kernel's `bpf_csum_update`: `skb->csum` plus `by`.
    fn csum_update(skb_csum: u64, by: u32) -> u64 {
        skb_csum + u64::from(by)
    }

    /// DNAT of a TCP segment (destination address and port) with its checksums updated either
    /// way; returns the packet's `skb->csum` (as the translation and the correction left it)
    /// and the sum of the packet it left, which a receiving stack compares.
    fn complete_after_dnat(
        ip: &mut [u8],
        seg: &mut [u8],
        dst_off: usize,
        words: usize,
        new_dst: &[u8],
        new_port: u16,
        by_kernel: bool,
    ) -> (u16, u16) {
        let v6 = words == 4;
        let before = wsum(&[&ip[..], &seg[..]].concat());
        let mut diff = 0;
        for i in 0..words {
            let (from, to) = (raw32(ip, dst_off + 4 * i), raw32(new_dst, 4 * i));
            diff = add_change(diff, from, to);
            if !v6 {
                let c = replace4(raw16(ip, 10), from, to);
                ip[10..12].copy_from_slice(&c.to_ne_bytes());
            }
            ip[dst_off + 4 * i..dst_off + 4 * i + 4].copy_from_slice(&to.to_ne_bytes());
        }
        let old_port = raw16(seg, 2);
        seg[2..4].copy_from_slice(&new_port.to_be_bytes());
        let check = replace2(apply_change(raw16(seg, 16), diff), old_port, raw16(seg, 2));
        seg[16..18].copy_from_slice(&check.to_ne_bytes());
        // The kernel's helper moves skb->csum by minus the difference (for either family).
        let moved = if by_kernel {
            csum_update(before, !fold32(diff))
        } else {
            before
        };
        let skb_csum = csum_update(moved, complete_correction(Some(diff), v6, by_kernel));
        let after = wsum(&[&ip[..], &seg[..]].concat());
        (fold(skb_csum) % 0xffff, fold(after) % 0xffff)
    }

    proptest! {
        /// A CHECKSUM_COMPLETE skb's sum still matches its packet after the translation and the
        /// correction, IPv4 and IPv6, by arithmetic and by the kernel's helper.
        #[test]
        fn a_complete_sum_follows_the_translation(
            seed: [u8; 20], src6: [u8; 16], dst6: [u8; 16], new_dst6: [u8; 16], new_port: u16,
            by_kernel: bool, seg in proptest::collection::vec(any::<u8>(), 20..200),
        ) {
            let mut ip = ipv4_header(&seed);
            let mut seg4 = seg.clone();
            let (src, dst) = ([ip[12], ip[13], ip[14], ip[15]], [ip[16], ip[17], ip[18], ip[19]]);
            let c = l4_checksum(src, dst, 6, &seg4, 16);
            seg4[16..18].copy_from_slice(&c.to_be_bytes());
            let (skb, packet) =
                complete_after_dnat(&mut ip, &mut seg4, 16, 1, &new_dst6[..4], new_port, by_kernel);
            prop_assert_eq!(skb, packet, "IPv4");

            let mut ip6 = [0u8; 40];
            ip6[0] = 0x60;
            ip6[4..6].copy_from_slice(&(seg.len() as u16).to_be_bytes());
            ip6[6] = 6;
            ip6[8..24].copy_from_slice(&src6);
            ip6[24..40].copy_from_slice(&dst6);
            let mut seg6 = seg;
            seg6[16..18].copy_from_slice(&[0, 0]);
            let mut full = pseudo_v6(src6, dst6, 6, seg6.len() as u32);
            full.extend_from_slice(&seg6);
            seg6[16..18].copy_from_slice(&checksum_be(0, &full).to_be_bytes());
            let (skb, packet) = complete_after_dnat(&mut ip6, &mut seg6, 24, 4, &new_dst6, new_port, by_kernel);
            prop_assert_eq!(skb, packet, "IPv6");
        }
    }

    #[test]
    fn both_zeros_may_be_partial() {
        assert!(may_be_partial(0, 0xffff) && may_be_partial(0xffff, 0));
        assert!(!may_be_partial(0x1234, 0x1235));
    }

    /// A difference that is a one's-complement zero moves the field either way: not told apart.
    #[test]
    fn a_zero_difference_is_unknown() {
        let (from, to) = (
            u32::from_ne_bytes([10, 0, 0, 1]),
            u32::from_ne_bytes([0, 1, 10, 0]),
        );
        let diff = add_change(0, from, to);
        assert!(fold(diff).is_multiple_of(0xffff));
        assert_eq!(
            applied(0x1234, kernel_by_diff(0x1234, fold32(diff), false), diff),
            Applied::Unknown
        );
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
