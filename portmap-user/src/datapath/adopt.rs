//! Adopting the pinned datapath an earlier daemon left attached (a restart, a crash, an upgrade),
//! as kube-proxy and Cilium do: the maps are reused as they are (flows, counters, mappings keep
//! working while no daemon runs) and the new programs replace the old ones in the same links
//! (`BPF_LINK_UPDATE`, atomic per hook).
//!
//! Maps are adopted only when `PM_META` carries this build's [`LAYOUT_VERSION`] and every pinned
//! map has the type, key size, value size, capacity and flags this build would create; anything
//! else is refused with a message naming `portmap cleanup`, never misread.

use std::path::Path;

use anyhow::{Context as _, bail};
use aya::maps::{Array, Map, MapData, MapInfo};
use portmap_common::{DatapathStamp, LAYOUT_VERSION, map_names};

use super::{EBPF_OBJECT, hooks};
use crate::config::Limits;

/// What a pinned map must look like to be adopted.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(super) struct Shape {
    map_type: u32,
    key_size: u32,
    value_size: u32,
    max_entries: u32,
    flags: u32,
}

impl std::fmt::Display for Shape {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(
            f,
            "type {}, key {} B, value {} B, {} entries, flags {:#x}",
            self.map_type, self.key_size, self.value_size, self.max_entries, self.flags
        )
    }
}

/// The capacity `limits` gives a map (the others keep the object's).
pub(super) fn configured_capacity(name: &str, limits: &Limits) -> Option<u32> {
    Some(match name {
        map_names::MAPPINGS
        | map_names::MAPPING_STATS
        | map_names::MAPPING_DENIED
        | map_names::PUBLISHED_PORTS => limits.max_mappings,
        map_names::BACKENDS => limits.max_backends,
        map_names::MAGLEV => limits.max_backend_groups,
        map_names::CONNTRACK => limits.conntrack_entries,
        map_names::CT_NEW => limits.conntrack_new_entries,
        _ => return None,
    })
}

/// Every map of the object as this build creates it with `limits`.
fn expected_shapes(limits: &Limits) -> anyhow::Result<Vec<(&'static str, Shape)>> {
    let object = aya_obj::Object::parse(EBPF_OBJECT).context("parsing the eBPF object")?;
    map_names::ALL
        .iter()
        .map(|name| {
            let map = object
                .maps
                .get(*name)
                .with_context(|| format!("map {name} missing from the object"))?;
            let shape = Shape {
                map_type: map.map_type(),
                key_size: map.key_size(),
                value_size: map.value_size(),
                max_entries: configured_capacity(name, limits).unwrap_or(map.max_entries()),
                flags: map.map_flags(),
            };
            Ok((*name, shape))
        })
        .collect()
}

fn pinned_shape(path: &Path) -> anyhow::Result<Shape> {
    let info = MapInfo::from_pin(path).with_context(|| format!("reading {}", path.display()))?;
    Ok(Shape {
        map_type: info.map_type()? as u32,
        key_size: info.key_size(),
        value_size: info.value_size(),
        max_entries: info.max_entries(),
        // The kernel adds BPF_F_RDONLY_PROG to device maps itself; portmap never sets it.
        flags: info.map_flags() & !BPF_F_RDONLY_PROG,
    })
}

const BPF_F_RDONLY_PROG: u32 = 1 << 7;

/// The advice of every refusal.
const CLEANUP: &str = "to start afresh, run `portmap cleanup` (this drops the established flows and \
                       runtime-added mappings of the old datapath), then start the daemon again";

/// Whether the pinned maps under `pin_dir` can be adopted: `None` when there are none, the stamp
/// when every pinned map matches this build; an error naming the difference otherwise.
pub(super) fn check_pinned(pin_dir: &Path, limits: &Limits) -> anyhow::Result<Option<DatapathStamp>> {
    let pinned: Vec<&str> = map_names::ALL
        .into_iter()
        .filter(|name| hooks::map_pin(pin_dir, name).exists())
        .collect();
    if pinned.is_empty() {
        return Ok(None);
    }
    let stamp_pin = hooks::map_pin(pin_dir, map_names::META);
    if !stamp_pin.exists() {
        bail!(
            "{} holds maps of a portmap without a layout stamp (an older version): they cannot be \
             adopted; {CLEANUP}",
            pin_dir.display()
        );
    }
    let stamp = read_stamp(&stamp_pin)?;
    if stamp.layout_version != LAYOUT_VERSION {
        bail!(
            "the maps pinned in {} have layout version {}, this portmap uses {LAYOUT_VERSION}: they \
             cannot be adopted; {CLEANUP}",
            pin_dir.display(),
            stamp.layout_version
        );
    }
    for (name, want) in expected_shapes(limits)? {
        if !pinned.contains(&name) {
            continue;
        }
        let have = pinned_shape(&hooks::map_pin(pin_dir, name))?;
        if have != want {
            let hint = if configured_capacity(name, limits).is_some() && have.max_entries != want.max_entries
            {
                " (a [limits] value changed: restore it to keep the running datapath)"
            } else {
                ""
            };
            bail!(
                "pinned map {name} in {} is ({have}), this portmap needs ({want}){hint}; {CLEANUP}",
                pin_dir.display()
            );
        }
    }
    Ok(Some(stamp))
}

fn read_stamp(path: &Path) -> anyhow::Result<DatapathStamp> {
    let data = MapData::from_pin(path).with_context(|| format!("opening {}", path.display()))?;
    let array: Array<_, DatapathStamp> = Array::try_from(Map::Array(data))?;
    Ok(array.get(&0, 0)?)
}

/// Writes the stamp of freshly created maps.
pub(super) fn write_stamp(map: &mut Map, stamp: DatapathStamp) -> anyhow::Result<()> {
    let mut array: Array<_, DatapathStamp> = Array::try_from(map)?;
    array.set(0, stamp, 0).context("writing the layout stamp")?;
    Ok(())
}

/// A new stamp for maps created now.
pub(super) fn new_stamp() -> DatapathStamp {
    DatapathStamp {
        layout_version: LAYOUT_VERSION,
        _pad: 0,
        id: random_u64(),
    }
}

/// 64 random bits from the standard library's per-process hash keys (no RNG crate needed for
/// an identifier).
fn random_u64() -> u64 {
    use std::hash::{BuildHasher as _, Hasher as _};
    let mut hasher = std::collections::hash_map::RandomState::new().build_hasher();
    hasher.write_u128(
        std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map_or(0, |d| d.as_nanos()),
    );
    hasher.finish()
}
