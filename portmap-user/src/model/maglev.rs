//! Maglev consistent hashing (Eisenbud et al., NSDI 2016, §3.4), weighted as IPVS `mh` and
//! Katran do: in each round of the population a backend takes as many turns as its weight.
//!
//! Every backend walks its own permutation of the table's slots (offset and skip from hashes of
//! the backend's identity, not of its position in the list), claiming the next free slot on each
//! turn. So each backend ends up with its exact share of the slots (± 1 per turn), and removing
//! or adding one backend moves only about that backend's share of slots: flows of the others
//! keep their backend. The datapath maps a flow hash to a slot (`maglev_slot`); conntrack then
//! pins established flows, whatever the table becomes later.

use std::net::IpAddr;

use portmap_common::MAGLEV_SIZE;

/// A backend as Maglev sees it: its identity (which fixes its permutation) and its weight.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Member {
    pub ip: IpAddr,
    pub port: u16,
    pub weight: u16,
}

/// FNV-1a (64 bit) of the member's identity, seeded: stable across runs and machines, unlike
/// the standard library's hasher.
fn identity_hash(m: &Member, seed: u64) -> u64 {
    let mut h: u64 = 0xcbf2_9ce4_8422_2325 ^ seed;
    let ip = match m.ip {
        IpAddr::V4(a) => a.octets().to_vec(),
        IpAddr::V6(a) => a.octets().to_vec(),
    };
    for b in ip.iter().chain(&m.port.to_be_bytes()) {
        h ^= u64::from(*b);
        h = h.wrapping_mul(0x0000_0100_0000_01b3);
    }
    h
}

fn gcd(a: u16, b: u16) -> u16 {
    if b == 0 { a } else { gcd(b, a % b) }
}

/// The table for `members`: slot → index into `members`. Members of weight 0 get no slot.
/// `None` if no member has a weight.
#[must_use]
pub fn populate(members: &[Member], size: usize) -> Option<Vec<u32>> {
    let divisor = members.iter().map(|m| m.weight).fold(0, gcd);
    if divisor == 0 {
        return None;
    }
    let size_u64 = size as u64;
    let perm: Vec<(u64, u64)> = members
        .iter()
        .map(|m| {
            let offset = identity_hash(m, 0x5151) % size_u64;
            let skip = identity_hash(m, 0xa5a5) % (size_u64 - 1) + 1;
            (offset, skip)
        })
        .collect();
    let mut next = vec![0u64; members.len()];
    let mut table = vec![u32::MAX; size];
    let mut filled = 0;
    while filled < size {
        for (i, m) in members.iter().enumerate() {
            for _ in 0..m.weight / divisor {
                let (offset, skip) = perm[i];
                let mut slot = ((offset + next[i] * skip) % size_u64) as usize;
                while table[slot] != u32::MAX {
                    next[i] += 1;
                    slot = ((offset + next[i] * skip) % size_u64) as usize;
                }
                table[slot] = i as u32;
                next[i] += 1;
                filled += 1;
                if filled == size {
                    return Some(table);
                }
            }
        }
    }
    Some(table)
}

/// The table the datapath uses (`MAGLEV_SIZE` slots).
#[must_use]
pub fn table(members: &[Member]) -> Option<Vec<u32>> {
    populate(members, MAGLEV_SIZE)
}

#[cfg(test)]
mod tests {
    use std::net::Ipv4Addr;

    use super::*;

    fn members(n: u8) -> Vec<Member> {
        (1..=n)
            .map(|i| Member {
                ip: IpAddr::V4(Ipv4Addr::new(198, 18, 2, i)),
                port: 80,
                weight: 1,
            })
            .collect()
    }

    fn shares(table: &[u32], n: usize) -> Vec<usize> {
        let mut counts = vec![0; n];
        for &b in table {
            counts[b as usize] += 1;
        }
        counts
    }

    #[test]
    fn every_slot_goes_to_a_member_in_equal_shares() {
        for n in [1u8, 2, 3, 7, 10, 40] {
            let t = table(&members(n)).unwrap();
            let counts = shares(&t, usize::from(n));
            let (min, max) = (counts.iter().min().unwrap(), counts.iter().max().unwrap());
            // Round-robin turns: shares differ by at most one slot.
            assert!(max - min <= 1, "{n} backends: {counts:?}");
        }
    }

    #[test]
    fn weights_set_the_shares() {
        let mut m = members(3);
        m[0].weight = 1;
        m[1].weight = 3;
        m[2].weight = 0;
        let counts = shares(&table(&m).unwrap(), 3);
        assert_eq!(counts[2], 0, "weight 0 gets nothing");
        let ratio = counts[1] as f64 / counts[0] as f64;
        assert!((2.95..=3.05).contains(&ratio), "{counts:?}");
        assert!(table(&[Member { weight: 0, ..m[0] }]).is_none());
    }

    /// Fraction of slots whose member (by identity) differs between two tables.
    fn moved(a: &[u32], am: &[Member], b: &[u32], bm: &[Member]) -> f64 {
        let changed = a
            .iter()
            .zip(b)
            .filter(|(x, y)| am[**x as usize] != bm[**y as usize])
            .count();
        changed as f64 / a.len() as f64
    }

    #[test]
    fn removing_or_adding_one_backend_moves_about_its_share() {
        for n in [3u8, 5, 10, 20] {
            let all = members(n);
            let before = table(&all).unwrap();
            let fewer: Vec<Member> = all.iter().copied().filter(|m| m.ip != all[1].ip).collect();
            let after = table(&fewer).unwrap();
            let share = 1.0 / f64::from(n);
            let removed = moved(&before, &all, &after, &fewer);
            // At least the removed backend's slots move; Maglev keeps the rest close to it.
            assert!(
                removed >= share * 0.99 && removed <= share * 1.6,
                "{n}: {removed}"
            );
            // Slots of surviving backends mostly stay.
            let more = members(n + 1);
            let grown = table(&more).unwrap();
            let added = moved(&before, &all, &grown, &more);
            let new_share = 1.0 / f64::from(n + 1);
            assert!(added <= new_share * 1.6, "{n}+1: {added}");
        }
    }

    #[test]
    fn order_of_the_list_does_not_matter() {
        let m = members(6);
        let mut reversed = m.clone();
        reversed.reverse();
        let (a, b) = (table(&m).unwrap(), table(&reversed).unwrap());
        // Same member per slot, though indices differ; ties in turn order may shift a few slots.
        assert!(moved(&a, &m, &b, &reversed) < 0.05);
    }
}
