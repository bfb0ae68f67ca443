//! [`Prefixes`]: an allow-list as the table holds it, shared and not copied. The host's list
//! applies to every mapping without its own, so 50,000 mappings under a 1,000-prefix list are
//! 50,000 handles on one list: cloning one, hashing it (the table finds a list by what it holds)
//! and comparing two handles on the same list cost the same whatever the list's length.

use std::{
    hash::{Hash, Hasher},
    ops::Deref,
    sync::Arc,
};

use ipnet::IpNet;

/// Sorted prefixes without duplicates (the normalized form `allow::of_family` makes), behind
/// an `Arc`, with their hash computed once.
#[derive(Clone, Debug)]
pub struct Prefixes {
    nets: Arc<[IpNet]>,
    hash: u64,
}

impl Prefixes {
    /// `nets` as one shared list (the caller normalizes: lists that hold the same prefixes in
    /// another order are different lists).
    #[must_use]
    pub fn new(nets: Vec<IpNet>) -> Self {
        let mut hasher = std::collections::hash_map::DefaultHasher::new();
        nets.hash(&mut hasher);
        Self {
            nets: nets.into(),
            hash: hasher.finish(),
        }
    }
}

impl Default for Prefixes {
    fn default() -> Self {
        Self::new(Vec::new())
    }
}

impl Deref for Prefixes {
    type Target = [IpNet];

    fn deref(&self) -> &[IpNet] {
        &self.nets
    }
}

impl<'a> IntoIterator for &'a Prefixes {
    type Item = &'a IpNet;
    type IntoIter = std::slice::Iter<'a, IpNet>;

    fn into_iter(self) -> Self::IntoIter {
        self.nets.iter()
    }
}

impl PartialEq for Prefixes {
    fn eq(&self, other: &Self) -> bool {
        Arc::ptr_eq(&self.nets, &other.nets) || (self.hash == other.hash && self.nets == other.nets)
    }
}

impl Eq for Prefixes {}

impl Hash for Prefixes {
    fn hash<H: Hasher>(&self, state: &mut H) {
        state.write_u64(self.hash);
    }
}

impl From<Vec<IpNet>> for Prefixes {
    fn from(nets: Vec<IpNet>) -> Self {
        Self::new(nets)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn nets(list: &[&str]) -> Vec<IpNet> {
        list.iter().map(|n| n.parse().unwrap()).collect()
    }

    #[test]
    fn equal_by_content_and_shared_by_clone() {
        let a = Prefixes::new(nets(&["198.18.1.0/24", "198.18.2.0/24"]));
        let b = Prefixes::new(nets(&["198.18.1.0/24", "198.18.2.0/24"]));
        let c = Prefixes::new(nets(&["198.18.1.0/24"]));
        assert_eq!(a, b);
        assert_ne!(a, c);
        let hash = |p: &Prefixes| {
            let mut h = std::collections::hash_map::DefaultHasher::new();
            p.hash(&mut h);
            h.finish()
        };
        assert_eq!(hash(&a), hash(&b));
        let shared = a.clone();
        assert!(Arc::ptr_eq(&shared.nets, &a.nets));
        assert_eq!(&*shared, &nets(&["198.18.1.0/24", "198.18.2.0/24"])[..]);
        assert!(Prefixes::default().is_empty());
    }
}
