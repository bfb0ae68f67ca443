//! Pure decisions of the table: the diff from the applied mappings to a new configuration, and
//! where a free run of dynamic host ports is.

use std::{
    collections::{HashMap, hash_map::Entry},
    net::IpAddr,
};

use crate::model::mapping::{Mapping, PortRange, Protocol};

/// The first run of `count` ports in `pool`, starting the search at `from` and wrapping around,
/// for which `free` holds on every port (Docker also hands out ports round-robin).
#[must_use]
pub fn find_free_run(
    pool: PortRange,
    count: u32,
    from: u16,
    free: impl Fn(u16) -> bool,
) -> Option<PortRange> {
    if count == 0 || count > pool.count() {
        return None;
    }
    let last_start = u32::from(pool.end) + 1 - count;
    let first = u32::from(from.clamp(pool.start, pool.end));
    let starts = (first..=last_start).chain(u32::from(pool.start)..first.min(last_start + 1));
    for start in starts {
        let range = PortRange {
            start: start as u16,
            end: (start + count - 1) as u16,
        };
        if range.ports().all(&free) {
            return Some(range);
        }
    }
    None
}

/// What applying a new list of mappings changes: an exact match stays; a mapping with the same
/// published ports but other backends or allow-list (or a dynamic one with another allow-list)
/// is updated in place (its flows keep going); the rest is removed or added.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Plan {
    pub remove: Vec<Mapping>,
    /// (current, desired)
    pub update: Vec<(Mapping, Mapping)>,
    pub add: Vec<Mapping>,
}

impl Plan {
    #[must_use]
    pub fn is_empty(&self) -> bool {
        self.remove.is_empty() && self.update.is_empty() && self.add.is_empty()
    }
}

/// `N added, N updated, N removed`, as the daemon's answers and logs say what a diff did.
impl std::fmt::Display for Plan {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(
            f,
            "{} added, {} updated, {} removed",
            self.add.len(),
            self.update.len(),
            self.remove.len()
        )
    }
}

pub(super) fn same_ports(a: &Mapping, b: &Mapping) -> bool {
    a.host_ports.is_some()
        && a.protocol == b.protocol
        && a.host_ip == b.host_ip
        && a.host_ports == b.host_ports
}

/// Indices of `current` by a key, each key's in order: a FIFO queue per key, chained through
/// one array so that a key with one index (the usual case) costs no allocation of its own.
struct Queues<K> {
    /// Per key: its first and last index still queued.
    ends: HashMap<K, (usize, usize)>,
    /// Per index: the next one of its key.
    next: Vec<usize>,
}

impl<K: std::hash::Hash + Eq> Queues<K> {
    const END: usize = usize::MAX;

    /// Queues of indices below `indices`, room for `keys` keys.
    fn new(indices: usize, keys: usize) -> Self {
        Self {
            ends: HashMap::with_capacity(keys),
            next: vec![Self::END; indices],
        }
    }

    fn push(&mut self, key: K, i: usize) {
        match self.ends.entry(key) {
            Entry::Occupied(mut ends) => {
                let (_, last) = ends.get_mut();
                self.next[*last] = i;
                *last = i;
            }
            Entry::Vacant(ends) => {
                ends.insert((i, i));
            }
        }
    }

    fn pop(&mut self, key: &K) -> Option<usize> {
        let (first, last) = self.ends.get_mut(key)?;
        let i = *first;
        if i == *last {
            self.ends.remove(key);
        } else {
            *first = self.next[i];
        }
        Some(i)
    }
}

/// The diff from `current` to `desired` (both as requested, dynamic ones without host ports).
#[must_use]
pub fn plan(current: &[Mapping], desired: &[Mapping]) -> Plan {
    // `current` indexed by mapping and by published ports, each in order, so that the first
    // match wins; linear in the sizes (a reload of 65,000 mappings must not be quadratic).
    let mut left: Vec<Option<&Mapping>> = current.iter().map(Some).collect();
    let n = current.len();
    let mut exact: Queues<&Mapping> = Queues::new(n, n);
    let mut by_ports: Queues<(Protocol, IpAddr, PortRange)> = Queues::new(n, n);
    // Dynamic ones (no host ports) by all but their allow-list: a new list keeps the port.
    let mut dynamic: Queues<Mapping> = Queues::new(n, 0);
    for (i, c) in current.iter().enumerate() {
        exact.push(c, i);
        if let Some(ports) = c.host_ports {
            by_ports.push((c.protocol, c.host_ip, ports), i);
        } else {
            dynamic.push(c.with_allow(Vec::new()), i);
        }
    }
    let mut plan = Plan::default();
    let mut pending = Vec::new();
    for want in desired {
        match exact.pop(&want) {
            Some(i) => left[i] = None,
            None => pending.push(want),
        }
    }
    for want in pending {
        // `same_ports`: an unchanged binding whose mapping is still left (not matched exactly);
        // a dynamic one that differs only in its allow-list.
        let same = match want.host_ports {
            Some(ports) => {
                let key = (want.protocol, want.host_ip, ports);
                std::iter::from_fn(|| by_ports.pop(&key)).find(|&i| left[i].is_some())
            }
            None => {
                let key = want.with_allow(Vec::new());
                std::iter::from_fn(|| dynamic.pop(&key)).find(|&i| left[i].is_some())
            }
        };
        match same {
            Some(i) => {
                let old = left[i].take().expect("still left");
                plan.update.push((old.clone(), want.clone()));
            }
            None => plan.add.push(want.clone()),
        }
    }
    plan.remove = left.into_iter().flatten().cloned().collect();
    plan
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::model::spec::parse;

    fn ms(specs: &[&str]) -> Vec<Mapping> {
        specs.iter().map(|s| parse(s).unwrap()).collect()
    }

    #[test]
    fn plan_keeps_updates_removes_and_adds() {
        let current = ms(&[
            "8080:198.18.2.2:80",
            "8081:198.18.2.2:81",
            ":198.18.2.2:90",
            "53:198.18.2.2:53/udp",
        ]);
        let desired = ms(&[
            ":198.18.2.2:90",
            "8080:198.18.2.2:80,198.18.2.3:80",
            "9000-9009:198.18.2.2:9000-9009",
            "53:198.18.2.2:53/udp",
        ]);
        let p = plan(&current, &desired);
        assert_eq!(p.remove, ms(&["8081:198.18.2.2:81"]));
        assert_eq!(p.update, vec![(current[0].clone(), desired[1].clone())]);
        assert_eq!(p.add, ms(&["9000-9009:198.18.2.2:9000-9009"]));
        assert!(plan(&current, &current).is_empty());
    }

    #[test]
    fn queues_pop_each_keys_indices_in_order() {
        let mut q: Queues<&str> = Queues::new(6, 2);
        for (i, key) in ["a", "b", "a", "a", "b", "c"].into_iter().enumerate() {
            q.push(key, i);
        }
        assert_eq!(q.pop(&"a"), Some(0));
        assert_eq!(q.pop(&"b"), Some(1));
        assert_eq!(q.pop(&"a"), Some(2));
        q.push("b", 1);
        assert_eq!(q.pop(&"b"), Some(4));
        assert_eq!(q.pop(&"b"), Some(1));
        assert_eq!(q.pop(&"b"), None);
        assert_eq!(q.pop(&"a"), Some(3));
        assert_eq!(q.pop(&"a"), None);
        assert_eq!(q.pop(&"c"), Some(5));
        assert_eq!(q.pop(&"d"), None);
    }

    #[test]
    fn duplicates_match_in_order() {
        // Two requests of one dynamic mapping: one stays, the other goes (the later one).
        let current = ms(&[":198.18.2.2:90", "8080:198.18.2.2:80", ":198.18.2.2:90"]);
        let p = plan(&current, &ms(&[":198.18.2.2:90", "8080:198.18.2.2:80"]));
        assert_eq!((p.update, p.add), (vec![], vec![]));
        assert_eq!(p.remove, vec![current[2].clone()]);
        // Both given an allow-list: each is updated, paired with the current ones in order.
        let desired = vec![
            current[0].with_allow(vec!["198.18.0.0/24".parse().unwrap()]),
            current[2].with_allow(vec!["198.18.1.0/24".parse().unwrap()]),
        ];
        let p = plan(&current, &desired);
        assert_eq!(
            p.update,
            vec![
                (current[0].clone(), desired[0].clone()),
                (current[2].clone(), desired[1].clone())
            ]
        );
        assert_eq!(p.remove, vec![current[1].clone()]);
        assert!(p.add.is_empty());
    }

    #[test]
    fn free_runs_wrap_around_and_skip_taken_ports() {
        let pool = PortRange { start: 100, end: 109 };
        assert_eq!(
            find_free_run(pool, 1, 100, |_| true),
            Some(PortRange::single(100))
        );
        assert_eq!(
            find_free_run(pool, 3, 108, |_| true),
            Some(PortRange { start: 100, end: 102 })
        );
        assert_eq!(
            find_free_run(pool, 2, 100, |p| p != 101 && p != 103),
            Some(PortRange { start: 104, end: 105 })
        );
        assert_eq!(
            find_free_run(pool, 1, 105, |p| p < 103),
            Some(PortRange::single(100))
        );
        assert_eq!(find_free_run(pool, 11, 100, |_| true), None);
        assert_eq!(find_free_run(pool, 1, 100, |_| false), None);
    }
}
