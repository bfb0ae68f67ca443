//! Addresses as the maps store them.

use crate::FAMILY_V6;

/// An IPv4 or IPv6 address as maps store it: four words holding the address bytes in wire order
/// (`u32::from_ne_bytes` of each 4-byte group). IPv4 fills word 0 and leaves the rest zero, as
/// Katran's address unions do, so one key layout serves both families (with a `family` field).
pub type Addr = [u32; 4];

/// `addr` of `family` as the words of an [`Addr`].
#[must_use]
pub fn addr_words(addr: core::net::IpAddr) -> Addr {
    match addr {
        core::net::IpAddr::V4(v4) => [u32::from_ne_bytes(v4.octets()), 0, 0, 0],
        core::net::IpAddr::V6(v6) => {
            let o = v6.octets();
            let w = |i: usize| u32::from_ne_bytes([o[i], o[i + 1], o[i + 2], o[i + 3]]);
            [w(0), w(4), w(8), w(12)]
        }
    }
}

/// The address an [`Addr`] of `family` holds.
#[must_use]
pub fn words_addr(family: u8, words: Addr) -> core::net::IpAddr {
    if family == FAMILY_V6 {
        let mut o = [0u8; 16];
        for (i, w) in words.iter().enumerate() {
            o[i * 4..i * 4 + 4].copy_from_slice(&w.to_ne_bytes());
        }
        core::net::IpAddr::from(o)
    } else {
        core::net::IpAddr::from(words[0].to_ne_bytes())
    }
}
