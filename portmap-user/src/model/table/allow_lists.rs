//! The lists of `PM_ALLOW`: one per distinct effective allow-list (family and prefixes), shared
//! by every mapping that enforces it (the host's list on 10,000 mappings is one list), with how
//! many mappings use it. A list's prefixes are written when its first user is placed and
//! removed when its last one goes; ids come from a pool, as stats slots do.

use anyhow::ensure;
use ipnet::IpNet;
use portmap_common::{MAX_ALLOW_ENTRIES, NO_ALLOW_LIST};
use serde::{Deserialize, Serialize};

use super::{Maps, TableError, pool::Pool};
use crate::model::prefixes::Prefixes;

/// Where a mapping's allow-list is: its `PM_ALLOW` list and what that list holds.
///
/// Saved without the prefixes: a state file holds each list once ([`SavedList`]), not once
/// per mapping that uses it, and restoring fills them in.
#[derive(Clone, Debug, PartialEq, Eq, Hash, Serialize, Deserialize)]
pub struct AllowPlacement {
    /// `MappingValue::allow_list` (never `NO_ALLOW_LIST`).
    pub list: u16,
    /// `FAMILY_V4` or `FAMILY_V6`, the mapping's.
    pub family: u8,
    /// Sorted, of `family`; empty: the list admits nobody. Shared by every mapping on the list.
    #[serde(skip)]
    pub prefixes: Prefixes,
}

/// One list as saved: its id, family and prefixes.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct SavedList {
    pub list: u16,
    pub family: u8,
    pub prefixes: Vec<IpNet>,
}

impl From<AllowPlacement> for SavedList {
    fn from(p: AllowPlacement) -> Self {
        Self {
            list: p.list,
            family: p.family,
            prefixes: p.prefixes.to_vec(),
        }
    }
}

/// Lists are found by what they hold.
type ListKey = (u8, Prefixes);

/// What `take` did, for `untake` to give back exactly.
#[derive(Clone, Copy, Debug, Default)]
pub(super) struct ListTaken {
    /// The list was made for this mapping (its prefixes are to be written), with whether its
    /// id was used before.
    pub(super) created: Option<bool>,
}

#[derive(Clone, Debug, PartialEq, Eq)]
pub(super) struct AllowLists {
    /// Every list in use: its id and how many mappings use it.
    by_set: imbl::HashMap<ListKey, (u16, u32)>,
    /// The same lists by id.
    by_id: imbl::HashMap<u16, ListKey>,
    /// Ids less one (`NO_ALLOW_LIST` is 0).
    ids: Pool,
    /// Prefixes `PM_ALLOW` holds.
    entries: u32,
}

impl Default for AllowLists {
    fn default() -> Self {
        Self {
            by_set: imbl::HashMap::new(),
            by_id: imbl::HashMap::new(),
            ids: Pool::new(u32::from(u16::MAX)),
            entries: 0,
        }
    }
}

impl AllowLists {
    /// The list holding `prefixes` of `family`: the existing one with one more user, or a new
    /// one (whose prefixes the caller writes: `ListTaken::created`).
    pub(super) fn take(
        &mut self,
        family: u8,
        prefixes: Prefixes,
    ) -> Result<(AllowPlacement, ListTaken), TableError> {
        let key = (family, prefixes);
        if let Some((list, users)) = self.by_set.get_mut(&key) {
            *users += 1;
            let place = AllowPlacement {
                list: *list,
                family,
                prefixes: key.1,
            };
            return Ok((place, ListTaken::default()));
        }
        let count = key.1.len() as u32;
        let full = TableError::AllowFull {
            max: MAX_ALLOW_ENTRIES,
        };
        if self.entries + count > MAX_ALLOW_ENTRIES {
            return Err(full);
        }
        let (id, reused) = self.ids.take_reused().ok_or(full)?;
        let list = id as u16 + 1;
        self.entries += count;
        self.by_set.insert(key.clone(), (list, 1));
        self.by_id.insert(list, key.clone());
        let place = AllowPlacement {
            list,
            family,
            prefixes: key.1,
        };
        Ok((
            place,
            ListTaken {
                created: Some(reused),
            },
        ))
    }

    /// Undoes the latest `take` of `place` (in reverse order of taking).
    pub(super) fn untake(&mut self, place: &AllowPlacement, taken: ListTaken) {
        let key = (place.family, place.prefixes.clone());
        match taken.created {
            Some(reused) => {
                self.by_set.remove(&key);
                self.by_id.remove(&place.list);
                self.entries -= place.prefixes.len() as u32;
                self.ids.untake(u32::from(place.list - 1), reused);
            }
            None => {
                if let Some((_, users)) = self.by_set.get_mut(&key) {
                    *users -= 1;
                }
            }
        }
    }

    /// A mapping no longer uses `place`; true when it was the list's last user (its prefixes
    /// are to be removed, which `give` leaves to the caller).
    pub(super) fn give(&mut self, place: &AllowPlacement) -> bool {
        let key = (place.family, place.prefixes.clone());
        let Some((_, users)) = self.by_set.get_mut(&key) else {
            return false;
        };
        *users -= 1;
        if *users > 0 {
            return false;
        }
        self.by_set.remove(&key);
        self.by_id.remove(&place.list);
        self.entries -= place.prefixes.len() as u32;
        self.ids.give(u32::from(place.list - 1));
        true
    }

    /// The lists of restored mappings: each set with one id, each id with one set.
    pub(super) fn restored<'a>(places: impl Iterator<Item = &'a AllowPlacement>) -> anyhow::Result<Self> {
        let mut lists = Self::default();
        let mut sets: std::collections::HashMap<u16, ListKey> = std::collections::HashMap::new();
        for place in places {
            ensure!(place.list != NO_ALLOW_LIST, "allow list 0 is no list");
            let key = (place.family, place.prefixes.clone());
            let known = sets.entry(place.list).or_insert_with(|| key.clone());
            ensure!(*known == key, "allow list {} saved with two contents", place.list);
            let (list, users) = lists.by_set.entry(key).or_insert((place.list, 0));
            ensure!(*list == place.list, "the same allow-list saved under two ids");
            *users += 1;
        }
        let used: std::collections::HashSet<u32> = sets.keys().map(|l| u32::from(l - 1)).collect();
        lists.ids = super::snapshot::derived_pool(u32::from(u16::MAX), &used);
        lists.entries = sets.values().map(|(_, p)| p.len() as u32).sum();
        lists.by_id = sets.into_iter().collect();
        Ok(lists)
    }

    /// List `list` with its contents, if it is in use.
    pub(super) fn content(&self, list: u16) -> Option<AllowPlacement> {
        self.by_id.get(&list).map(|(family, prefixes)| AllowPlacement {
            list,
            family: *family,
            prefixes: prefixes.clone(),
        })
    }

    /// Every list, with its contents.
    pub(super) fn all(&self) -> impl Iterator<Item = AllowPlacement> + '_ {
        self.by_set
            .iter()
            .map(|((family, prefixes), (list, _))| AllowPlacement {
                list: *list,
                family: *family,
                prefixes: prefixes.clone(),
            })
    }

    /// The lists `self` has and `other` has not (not with the same id).
    fn missing_from<'a>(&'a self, other: &'a Self) -> impl Iterator<Item = AllowPlacement> + 'a {
        self.all().filter(|p| {
            other
                .by_set
                .get(&(p.family, p.prefixes.clone()))
                .map(|(list, _)| *list)
                != Some(p.list)
        })
    }

    /// A rollback from `other` to `self`, first step: the lists only `self` has are written
    /// again (before the mappings that use them).
    pub(super) fn write_back<M: Maps + ?Sized>(&self, other: &Self, maps: &mut M) {
        for list in self.missing_from(other) {
            super::undo("an allow-list", maps.set_allow(&list));
        }
    }

    /// The last step: the lists only `other` had are removed (once no mapping uses them).
    pub(super) fn clear_extra<M: Maps + ?Sized>(&self, other: &Self, maps: &mut M) {
        for list in other.missing_from(self) {
            super::undo("an allow-list", maps.clear_allow(&list));
        }
    }
}
