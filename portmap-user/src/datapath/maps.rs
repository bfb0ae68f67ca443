//! The maps as the daemon writes and reads them: the mapping table's writes ([`Maps`]) and the
//! counters.

use std::os::fd::{AsFd as _, AsRawFd as _, RawFd};

use anyhow::{Context as _, anyhow, bail};
use aya::{
    maps::{
        Array, DevMapHash, HashMap, Map, MapData, PerCpuArray,
        lpm_trie::{Key, LpmTrie},
    },
    util::nr_cpus,
};
use std::{
    collections::{BTreeMap, BTreeSet},
    net::IpAddr,
};

use portmap_common::{
    AllowKey, BackendValue, FAMILY_V4, FAMILY_V6, LocalAddrKey, LocalBackend, MaglevTable, MappingCounters,
    MappingKey, MappingValue, PortKey, Stat, addr_words, map_names,
};

use super::{
    Datapath,
    sys::{delete_batch, lookup_all_percpu, update_batch, zero_batch_per_cpu},
};
use crate::model::table::{AllowPlacement, MapContents, Maps};

/// The `PM_ALLOW` key of one prefix of a list.
fn allow_key(list: &AllowPlacement, net: &ipnet::IpNet) -> Key<AllowKey> {
    Key::new(
        AllowKey::LIST_BITS + u32::from(net.prefix_len()),
        AllowKey::new(list.list, list.family, addr_words(net.addr())),
    )
}

/// A `PM_ALLOW` key back as (list, prefix).
fn allow_prefix(key: &Key<AllowKey>) -> Option<(u16, ipnet::IpNet)> {
    let (list, family) = key.data().list();
    let len = key.prefix_len().checked_sub(AllowKey::LIST_BITS)?;
    let addr = portmap_common::words_addr(family, key.data().addr);
    Some((list, ipnet::IpNet::new(addr, u8::try_from(len).ok()?).ok()?))
}

impl Maps for Datapath {
    fn set_mappings(&mut self, entries: &[(MappingKey, MappingValue)]) -> anyhow::Result<()> {
        if entries.is_empty() {
            return Ok(());
        }
        let fd = self.hash_map_fd(map_names::MAPPINGS)?;
        let (keys, values): (Vec<MappingKey>, Vec<MappingValue>) = entries.iter().copied().unzip();
        update_batch(fd, &keys, &values).context("writing mapping entries (BPF_MAP_UPDATE_BATCH)")
    }

    /// Keeps going past a failure and reports the first.
    fn remove_mappings(&mut self, keys: &[MappingKey]) -> anyhow::Result<()> {
        self.remove_all::<_, MappingValue>(map_names::MAPPINGS, keys, |key| {
            format!("the entry of host port {}", u16::from_be(key.port_be))
        })
    }

    fn set_backends(&mut self, slots: &[(u32, BackendValue)]) -> anyhow::Result<()> {
        let mut backends: Array<_, BackendValue> = Array::try_from(self.map_mut(map_names::BACKENDS)?)?;
        for (slot, value) in slots {
            backends
                .set(*slot, value, 0)
                .with_context(|| format!("writing backend slot {slot}"))?;
        }
        Ok(())
    }

    fn set_maglev(&mut self, group: u32, table: &MaglevTable) -> anyhow::Result<()> {
        let mut tables: Array<_, MaglevTable> = Array::try_from(self.map_mut(map_names::MAGLEV)?)?;
        tables
            .set(group, table, 0)
            .with_context(|| format!("writing Maglev table {group}"))
    }

    fn reset_counters(&mut self, slots: &[u32]) -> anyhow::Result<()> {
        if slots.is_empty() {
            return Ok(());
        }
        let cpus = nr_cpus().map_err(|(_, e)| anyhow!("counting CPUs: {e}"))?;
        zero_batch_per_cpu::<MappingCounters>(self.per_cpu_array_fd(map_names::MAPPING_STATS)?, slots, cpus)
            .context("zeroing mapping counters (BPF_MAP_UPDATE_BATCH)")?;
        zero_batch_per_cpu::<u64>(self.per_cpu_array_fd(map_names::MAPPING_DENIED)?, slots, cpus)
            .context("zeroing mapping denied counters (BPF_MAP_UPDATE_BATCH)")
    }

    fn publish_ports(&mut self, ports: &[PortKey]) -> anyhow::Result<()> {
        if ports.is_empty() {
            return Ok(());
        }
        let fd = self.hash_map_fd(map_names::PUBLISHED_PORTS)?;
        update_batch(fd, ports, &vec![1u8; ports.len()]).context("writing published ports")
    }

    fn unpublish_ports(&mut self, ports: &[PortKey]) -> anyhow::Result<()> {
        self.remove_all::<_, u8>(map_names::PUBLISHED_PORTS, ports, |key| {
            format!("published port {}", u16::from_be(key.port_be))
        })
    }

    fn set_allow(&mut self, list: &AllowPlacement) -> anyhow::Result<()> {
        let mut trie: LpmTrie<_, AllowKey, u8> = LpmTrie::try_from(self.map_mut(map_names::ALLOW)?)?;
        for net in &list.prefixes {
            trie.insert(&allow_key(list, net), 1, 0)
                .with_context(|| format!("writing {net} of allow-list {}", list.list))?;
        }
        Ok(())
    }

    /// Keeps going past a failure and reports the first.
    fn clear_allow(&mut self, list: &AllowPlacement) -> anyhow::Result<()> {
        let mut trie: LpmTrie<_, AllowKey, u8> = LpmTrie::try_from(self.map_mut(map_names::ALLOW)?)?;
        let mut first_error = None;
        for net in &list.prefixes {
            match trie.remove(&allow_key(list, net)) {
                Err(aya::maps::MapError::SyscallError(e))
                    if e.io_error.raw_os_error() == Some(libc::ENOENT) => {}
                Err(e) if first_error.is_none() => {
                    first_error = Some(anyhow!("removing {net} of allow-list {}: {e}", list.list));
                }
                _ => {}
            }
        }
        first_error.map_or(Ok(()), Err)
    }
}

/// The one policy of multi-entry removals: every key is tried, whatever failed before (a
/// half-done removal leaves as little behind as it can); a key that is not there (never written,
/// as in the rollback of a batch that failed) is as good as removed; the first real failure is
/// returned, naming its entry.
fn remove_each<K: aya::Pod, V: aya::Pod>(
    map: &mut HashMap<&mut MapData, K, V>,
    keys: &[K],
    describe: impl Fn(&K) -> String,
) -> anyhow::Result<()> {
    let mut first_error = None;
    for key in keys {
        match map.remove(key) {
            Err(aya::maps::MapError::SyscallError(e)) if e.io_error.raw_os_error() == Some(libc::ENOENT) => {}
            Err(e) if first_error.is_none() => {
                first_error = Some(anyhow!("removing {}: {e}", describe(key)));
            }
            _ => {}
        }
    }
    first_error.map_or(Ok(()), Err)
}

impl Datapath {
    /// Removes `keys` from the hash map `name` as `remove_each` does, in batches of one system
    /// call (`BPF_MAP_DELETE_BATCH`, which skips a key that is not there); when the kernel
    /// refuses a batch, key by key, to try every key and name the first that fails.
    fn remove_all<K: aya::Pod, V: aya::Pod>(
        &mut self,
        name: &str,
        keys: &[K],
        describe: impl Fn(&K) -> String,
    ) -> anyhow::Result<()> {
        if keys.is_empty() || delete_batch(self.hash_map_fd(name)?, keys).is_ok() {
            return Ok(());
        }
        let mut map: HashMap<_, K, V> = HashMap::try_from(self.map_mut(name)?)?;
        remove_each(&mut map, keys, describe)
    }

    /// What the mapping maps hold (`PM_MAPPINGS`, the Maglev tables and backend slots they use,
    /// `PM_PUBLISHED_PORTS`): for a table rebuilt from an adopted datapath without saved state.
    pub fn mapping_contents(&self) -> anyhow::Result<MapContents> {
        let mut contents = MapContents::default();
        let mappings: HashMap<_, MappingKey, MappingValue> =
            HashMap::try_from(self.map(map_names::MAPPINGS)?)?;
        for entry in mappings.iter() {
            let (key, value) = entry.context("reading PM_MAPPINGS")?;
            contents.mappings.insert(key, value);
        }
        let groups: BTreeSet<u32> = contents
            .mappings
            .values()
            .map(|v| v.group)
            .filter(|g| *g != portmap_common::NO_GROUP)
            .collect();
        let tables: Array<_, MaglevTable> = Array::try_from(self.map(map_names::MAGLEV)?)?;
        let backends: Array<_, BackendValue> = Array::try_from(self.map(map_names::BACKENDS)?)?;
        for group in groups {
            let table = tables
                .get(&group, 0)
                .with_context(|| format!("reading Maglev table {group}"))?;
            for slot in &table.backends {
                if let std::collections::hash_map::Entry::Vacant(e) = contents.backends.entry(*slot) {
                    e.insert(
                        backends
                            .get(slot, 0)
                            .with_context(|| format!("reading backend slot {slot}"))?,
                    );
                }
            }
            contents.maglev.insert(group, table.backends.to_vec());
        }
        let ports: HashMap<_, PortKey, u8> = HashMap::try_from(self.map(map_names::PUBLISHED_PORTS)?)?;
        contents.published_ports = ports.keys().filter_map(Result::ok).collect();
        let trie: LpmTrie<_, AllowKey, u8> = LpmTrie::try_from(self.map(map_names::ALLOW)?)?;
        contents.allow = trie
            .keys()
            .filter_map(Result::ok)
            .filter_map(|k| allow_prefix(&k))
            .collect();
        Ok(contents)
    }

    /// Removes the `PM_MAPPINGS` entries outside `keep`, the `PM_PUBLISHED_PORTS` entries
    /// outside `published` and the `PM_ALLOW` entries outside `allow` (what an adopted datapath has that the restored table does not: a
    /// change the previous daemon wrote but did not live to save, or no saved state at all).
    /// Returns how many entries it removed.
    pub fn retain_mappings(
        &mut self,
        keep: &std::collections::HashSet<MappingKey>,
        published: &BTreeSet<PortKey>,
        allow: &BTreeSet<(u16, ipnet::IpNet)>,
    ) -> anyhow::Result<usize> {
        let mut trie: LpmTrie<_, AllowKey, u8> = LpmTrie::try_from(self.map_mut(map_names::ALLOW)?)?;
        let stale_allow: Vec<Key<AllowKey>> = trie
            .keys()
            .filter_map(Result::ok)
            .filter(|k| allow_prefix(k).is_none_or(|entry| !allow.contains(&entry)))
            .collect();
        for key in &stale_allow {
            let _ = trie.remove(key);
        }
        let map: HashMap<_, MappingKey, MappingValue> = HashMap::try_from(self.map(map_names::MAPPINGS)?)?;
        let stale: Vec<MappingKey> = map
            .keys()
            .filter_map(Result::ok)
            .filter(|k| !keep.contains(k))
            .collect();
        let ports: HashMap<_, PortKey, u8> = HashMap::try_from(self.map(map_names::PUBLISHED_PORTS)?)?;
        let stale_ports: Vec<PortKey> = ports
            .keys()
            .filter_map(Result::ok)
            .filter(|k| !published.contains(k))
            .collect();
        self.remove_mappings(&stale)?;
        self.unpublish_ports(&stale_ports)?;
        Ok(stale.len() + stale_ports.len() + stale_allow.len())
    }

    /// Makes `PM_LOCAL_ADDRS` hold exactly `addrs` (the host's addresses): wildcard mappings
    /// match only these destinations.
    pub fn sync_local_addrs(&mut self, addrs: &BTreeSet<IpAddr>) -> anyhow::Result<()> {
        let mut map: HashMap<_, LocalAddrKey, u8> = HashMap::try_from(self.map_mut(map_names::LOCAL_ADDRS)?)?;
        let want: Vec<LocalAddrKey> = addrs.iter().map(|a| local_addr_key(*a)).collect();
        let have: Vec<LocalAddrKey> = map.keys().filter_map(Result::ok).collect();
        for key in have.iter().filter(|k| !want.contains(k)) {
            map.remove(key)?;
        }
        for key in want.iter().filter(|k| !have.contains(k)) {
            map.insert(key, 1, 0)
                .with_context(|| format!("adding a local address ({} known)", want.len()))?;
        }
        Ok(())
    }

    /// Makes `PM_LOCAL_BACKENDS` hold exactly `backends` (`local_backends::read`): entries that
    /// went are removed, new and changed ones written whole. Returns how many entries changed.
    pub fn sync_local_backends<'a>(
        &mut self,
        backends: impl IntoIterator<Item = (IpAddr, &'a LocalBackend)>,
    ) -> anyhow::Result<usize> {
        let mut map: HashMap<_, LocalAddrKey, LocalBackend> =
            HashMap::try_from(self.map_mut(map_names::LOCAL_BACKENDS)?)?;
        let want: BTreeMap<LocalAddrKey, LocalBackend> = backends
            .into_iter()
            .map(|(addr, b)| (local_addr_key(addr), *b))
            .collect();
        let have: BTreeMap<LocalAddrKey, LocalBackend> = map.iter().filter_map(Result::ok).collect();
        let mut changed = 0;
        for key in have.keys().filter(|k| !want.contains_key(k)) {
            map.remove(key)?;
            changed += 1;
        }
        for (key, backend) in want.iter().filter(|(k, b)| have.get(k) != Some(b)) {
            map.insert(key, backend, 0)
                .with_context(|| format!("adding a local backend ({} known)", want.len()))?;
            changed += 1;
        }
        // Their veths, in the devmap the kernel keeps free of unregistered devices.
        let want_devs: BTreeSet<u32> = want.values().map(|b| b.ifindex).collect();
        let mut devs: DevMapHash<_> = DevMapHash::try_from(self.map_mut(map_names::LOCAL_DEVS)?)?;
        let have_devs: BTreeSet<u32> = devs.keys().filter_map(Result::ok).collect();
        for gone in have_devs.difference(&want_devs) {
            // Already removed by the kernel if the device went.
            let _ = devs.remove(*gone);
        }
        for dev in want_devs.difference(&have_devs) {
            // A device that went since it was read: its backends take the FIB path until the
            // next change notification.
            if let Err(e) = devs.insert(*dev, *dev, None, 0) {
                log::info!("local backend device {dev}: {e}");
            }
        }
        if changed > 0 {
            self.invalidate_routes()?;
        }
        Ok(changed)
    }

    /// Moves the route generation (`PM_ROUTE_GEN`) on: every flow's cached route
    /// (`FlowRoute`) is looked up again at the flow's next packet. Called on every link, address,
    /// neighbour and route change the daemon is told of, and when `PM_LOCAL_BACKENDS` changes.
    pub fn invalidate_routes(&mut self) -> anyhow::Result<()> {
        let mut generation: Array<_, u32> = Array::try_from(self.map_mut(map_names::ROUTE_GEN)?)?;
        let now = generation.get(&0, 0)?;
        generation
            .set(0, now.wrapping_add(1), 0)
            .context("moving the route generation on")?;
        Ok(())
    }

    /// The route generation (`PM_ROUTE_GEN`).
    pub fn route_generation(&self) -> anyhow::Result<u32> {
        let generation: Array<_, u32> = Array::try_from(self.map(map_names::ROUTE_GEN)?)?;
        Ok(generation.get(&0, 0)?)
    }

    pub(super) fn hash_map_fd(&self, name: &str) -> anyhow::Result<RawFd> {
        match self.map(name)? {
            aya::maps::Map::HashMap(d) | aya::maps::Map::LruHashMap(d) => Ok(d.fd().as_fd().as_raw_fd()),
            _ => bail!("{name} is not a hash map"),
        }
    }

    fn per_cpu_array_fd(&self, name: &str) -> anyhow::Result<RawFd> {
        match self.map(name)? {
            aya::maps::Map::PerCpuArray(d) => Ok(d.fd().as_fd().as_raw_fd()),
            _ => bail!("{name} is not a per-CPU array"),
        }
    }

    /// A reader of the counter maps with file descriptors of its own, usable while the datapath
    /// itself is busy (a reload runs on another thread).
    pub fn counters(&self) -> anyhow::Result<Counters> {
        let open = |name: &str| -> anyhow::Result<Map> {
            let fd = match self.map(name)? {
                Map::PerCpuArray(data) => data.fd().as_fd().try_clone_to_owned()?,
                _ => bail!("{name} is not a per-CPU array"),
            };
            Ok(Map::PerCpuArray(MapData::from_fd(fd)?))
        };
        let slots = |name: &str| SlotArray::open(self.map(name)?, name);
        Ok(Counters {
            mappings: slots(map_names::MAPPING_STATS)?,
            denied: slots(map_names::MAPPING_DENIED)?,
            global: PerCpuArray::try_from(open(map_names::GLOBAL_STATS)?)?,
        })
    }
}

/// A per-CPU array indexed by stats slot, read whole in batches (a few system calls however
/// many mappings there are), with a file descriptor of its own.
struct SlotArray {
    fd: std::os::fd::OwnedFd,
    max: usize,
}

impl SlotArray {
    fn open(map: &Map, name: &str) -> anyhow::Result<Self> {
        match map {
            Map::PerCpuArray(data) => Ok(Self {
                fd: data.fd().as_fd().try_clone_to_owned()?,
                max: data.info()?.max_entries() as usize,
            }),
            _ => bail!("{name} is not a per-CPU array"),
        }
    }

    /// Every slot's values summed over CPUs, indexed by slot.
    fn sum_all<T>(&self, what: &str) -> anyhow::Result<Vec<T>>
    where
        T: aya::Pod + Default + std::iter::Sum,
    {
        let cpus = aya::util::nr_cpus().map_err(|(_, e)| anyhow!("counting CPUs: {e}"))?;
        let size = size_of::<T>();
        let (keys, values) = lookup_all_percpu(self.fd.as_raw_fd(), self.max, size, cpus)
            .with_context(|| format!("reading {what} (BPF_MAP_LOOKUP_BATCH)"))?;
        let stride = size.next_multiple_of(8) * cpus;
        let mut all = vec![T::default(); self.max];
        for (key, chunk) in keys.iter().zip(values.chunks_exact(stride)) {
            let total = chunk
                .chunks_exact(size.next_multiple_of(8))
                .map(|bytes| {
                    // SAFETY: `bytes` holds at least size_of::<T>() bytes (the kernel's per-CPU
                    // stride rounds it up), and T is Pod: any bytes are a value.
                    unsafe { std::ptr::read_unaligned(bytes.as_ptr().cast::<T>()) }
                })
                .sum();
            if let Some(slot) = all.get_mut(*key as usize) {
                *slot = total;
            }
        }
        Ok(all)
    }
}

/// The counters as `portmap stats` and the metrics read them.
pub struct Counters {
    /// `PM_MAPPING_STATS`.
    mappings: SlotArray,
    /// `PM_MAPPING_DENIED`.
    denied: SlotArray,
    global: PerCpuArray<MapData, u64>,
}

impl Counters {
    /// Every stats slot's counters summed over CPUs, indexed by slot.
    pub fn all_mappings(&self) -> anyhow::Result<Vec<MappingCounters>> {
        self.mappings.sum_all("the mapping counters")
    }

    /// Every stats slot's new flows refused by its allow-list, summed over CPUs, by slot.
    pub fn all_denied(&self) -> anyhow::Result<Vec<u64>> {
        self.denied.sum_all("the allow-list counters")
    }

    /// Global counters summed over CPUs, in `Stat` code order.
    pub fn global(&self) -> anyhow::Result<Vec<u64>> {
        Stat::ALL
            .iter()
            .map(|s| Ok(self.global.get(&s.code(), 0)?.iter().sum()))
            .collect()
    }
}

fn local_addr_key(addr: IpAddr) -> LocalAddrKey {
    LocalAddrKey::new(
        addr_words(addr),
        if addr.is_ipv6() { FAMILY_V6 } else { FAMILY_V4 },
    )
}
