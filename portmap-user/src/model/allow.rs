//! Source allow-lists: which clients may start flows through a mapping (`portmap add --allow`,
//! a mapping's `allow` in the config, the config's top-level `allow` for every mapping without
//! its own, a Docker container's `portmap.allow` label, a CNI network's `allow`).
//!
//! A list is a set of prefixes. A mapping's own list holds prefixes of the mapping's family; the
//! host's list (and a container's label or network list, which apply to mappings of both
//! families) holds either, and each mapping takes the prefixes of its family: a host list with
//! only IPv4 prefixes admits no IPv6 client. No list, or an empty one, admits everyone. Parsing
//! and the effective list are pure functions; the table turns each distinct effective list into
//! one list of `PM_ALLOW` that every mapping with it shares.

use std::{net::IpAddr, str::FromStr};

use ipnet::IpNet;
use portmap_common::{FAMILY_V6, MAX_ALLOW_PREFIXES};

use super::mapping::Mapping;

#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
pub enum AllowError {
    #[error("allow '{0}' is not an address prefix (e.g. 198.18.1.0/24, fd00:1::/64, or one address)")]
    Syntax(String),
    #[error("allow {given} has host bits set: write {network}")]
    HostBits { given: IpNet, network: IpNet },
    #[error(
        "allow {prefix} is {family}, the mapping is {mapping_family}: a mapping stays within one \
         family (give each family's mapping its own list, or use the config's top-level `allow`)",
        family = family_name(prefix.addr()),
        mapping_family = if *v6 { "IPv6" } else { "IPv4" },
    )]
    WrongFamily { prefix: IpNet, v6: bool },
    #[error("allow has {count} {family} prefixes; at most {max} are allowed per list", max = MAX_ALLOW_PREFIXES)]
    TooMany { count: usize, family: &'static str },
}

fn family_name(addr: IpAddr) -> &'static str {
    if addr.is_ipv6() { "IPv6" } else { "IPv4" }
}

/// A prefix as users write it: `198.18.1.0/24`, `fd00:1::/64`, or one address (a /32 or /128).
/// An IPv4-mapped IPv6 prefix (`::ffff:198.18.1.0/120`) is refused by its family check later,
/// not silently turned into IPv4.
pub fn parse_prefix(text: &str) -> Result<IpNet, AllowError> {
    let text = text.trim();
    let net = match IpNet::from_str(text) {
        Ok(net) => net,
        Err(_) => IpAddr::from_str(text)
            .map(IpNet::from)
            .map_err(|_| AllowError::Syntax(text.to_owned()))?,
    };
    check_prefix(net)?;
    Ok(net)
}

/// A prefix must be its network: `198.18.1.1/24` is refused rather than guessed.
pub fn check_prefix(net: IpNet) -> Result<(), AllowError> {
    if net.trunc() != net {
        return Err(AllowError::HostBits {
            given: net,
            network: net.trunc(),
        });
    }
    Ok(())
}

/// Parses a comma-separated list (a label's or a flag's value); empty items are skipped.
pub fn parse_list(text: &str) -> Result<Vec<IpNet>, AllowError> {
    text.split(',')
        .map(str::trim)
        .filter(|item| !item.is_empty())
        .map(parse_prefix)
        .collect()
}

/// A list as serde reads it (the config's `allow`): each item as [`parse_prefix`] reads it, a
/// bad one named in the parser's error (with its position).
pub fn deserialize_list<'de, D: serde::Deserializer<'de>>(deserializer: D) -> Result<Vec<IpNet>, D::Error> {
    let items = <Vec<String> as serde::Deserialize>::deserialize(deserializer)?;
    items
        .iter()
        .map(|text| parse_prefix(text).map_err(serde::de::Error::custom))
        .collect()
}

/// Checks a list that applies to mappings of either family (the host's, a label's, a
/// network's): every prefix a network, at most `MAX_ALLOW_PREFIXES` of each family.
pub fn check_list(list: &[IpNet]) -> Result<(), AllowError> {
    for net in list {
        check_prefix(*net)?;
    }
    for (v6, family) in [(false, "IPv4"), (true, "IPv6")] {
        let count = normalized(list.iter().filter(|n| n.addr().is_ipv6() == v6)).len();
        if count > MAX_ALLOW_PREFIXES {
            return Err(AllowError::TooMany { count, family });
        }
    }
    Ok(())
}

/// Checks a mapping's own list (of a mapping of `family`): as [`check_list`], and every prefix
/// of the mapping's family.
pub fn check_own(list: &[IpNet], family: u8) -> Result<(), AllowError> {
    let v6 = family == FAMILY_V6;
    if let Some(prefix) = list.iter().find(|n| n.addr().is_ipv6() != v6) {
        return Err(AllowError::WrongFamily { prefix: *prefix, v6 });
    }
    check_list(list)
}

/// Sorted, without duplicates: the form lists are compared and shared in.
fn normalized<'a>(list: impl Iterator<Item = &'a IpNet>) -> Vec<IpNet> {
    let mut out: Vec<IpNet> = list.copied().collect();
    out.sort_unstable();
    out.dedup();
    out
}

/// The prefixes of `list` of `family`, normalized.
#[must_use]
pub fn of_family(list: &[IpNet], family: u8) -> Vec<IpNet> {
    let v6 = family == FAMILY_V6;
    normalized(list.iter().filter(|n| n.addr().is_ipv6() == v6))
}

/// Whose list a mapping enforces (its prefixes of the mapping's family, `of_family`).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Source {
    /// Its own.
    Own,
    /// The host's (`policy`): its own is empty. Of a family the host's list names none of,
    /// it admits nobody.
    Host,
}

/// The list a mapping with `own` enforces: its own if it has one, else the host's (`policy`);
/// `None` (everyone) when neither has one.
#[must_use]
pub fn source(own: &[IpNet], policy: &[IpNet]) -> Option<Source> {
    if !own.is_empty() {
        Some(Source::Own)
    } else {
        (!policy.is_empty()).then_some(Source::Host)
    }
}

/// Whether `addr` is in `list` (what the datapath's lookup answers).
#[must_use]
pub fn admits(list: &[IpNet], addr: IpAddr) -> bool {
    list.iter().any(|net| net.contains(&addr))
}

/// A container's mappings under its list (a Docker label's, a CNI network's), which may name
/// both families: each mapping gets the list's prefixes of its family as its own, and one of a
/// family the list names none of is left out (second) rather than published to everyone. An
/// empty list changes nothing (the host's list applies).
#[must_use]
pub fn for_container(mappings: Vec<Mapping>, list: &[IpNet]) -> (Vec<Mapping>, Vec<Mapping>) {
    if list.is_empty() {
        return (mappings, Vec::new());
    }
    let (kept, left_out): (Vec<Mapping>, Vec<Mapping>) = mappings
        .into_iter()
        .map(|m| {
            let own = of_family(list, m.family());
            m.with_allow(own)
        })
        .partition(|m| !m.allow.is_empty());
    (kept, left_out)
}

/// Why [`for_container`] left mappings out, for a log line or an answer.
#[must_use]
pub fn left_out_message(left_out: &[Mapping]) -> Option<String> {
    (!left_out.is_empty()).then(|| {
        let specs: Vec<String> = left_out.iter().map(ToString::to_string).collect();
        format!(
            "not published: {} (the allow-list names no prefix of their family)",
            specs.join(", ")
        )
    })
}

#[cfg(test)]
mod tests {
    use portmap_common::FAMILY_V4;

    use super::*;

    fn nets(list: &[&str]) -> Vec<IpNet> {
        list.iter().map(|s| s.parse().unwrap()).collect()
    }

    #[test]
    fn prefixes_parse_with_or_without_a_length_and_refuse_host_bits() {
        assert_eq!(
            parse_prefix("198.18.1.0/24").unwrap(),
            nets(&["198.18.1.0/24"])[0]
        );
        assert_eq!(parse_prefix("198.18.1.7").unwrap(), nets(&["198.18.1.7/32"])[0]);
        assert_eq!(parse_prefix("fd00:1::/64").unwrap(), nets(&["fd00:1::/64"])[0]);
        let err = parse_prefix("198.18.1.1/24").unwrap_err();
        assert_eq!(
            err.to_string(),
            "allow 198.18.1.1/24 has host bits set: write 198.18.1.0/24"
        );
        assert!(matches!(
            parse_prefix("198.18.1.0/33"),
            Err(AllowError::Syntax(_))
        ));
        assert!(matches!(parse_prefix("lan"), Err(AllowError::Syntax(_))));
        assert_eq!(
            parse_list(" 198.18.1.0/24, fd00:1::/64 ,").unwrap(),
            nets(&["198.18.1.0/24", "fd00:1::/64"])
        );
    }

    #[test]
    fn a_mappings_own_list_stays_within_its_family() {
        assert!(check_own(&nets(&["198.18.1.0/24"]), FAMILY_V4).is_ok());
        let err = check_own(&nets(&["198.18.1.0/24", "fd00:1::/64"]), FAMILY_V4).unwrap_err();
        assert!(
            err.to_string()
                .contains("fd00:1::/64 is IPv6, the mapping is IPv4"),
            "{err}"
        );
        assert!(check_list(&nets(&["198.18.1.0/24", "fd00:1::/64"])).is_ok());
    }

    #[test]
    fn more_than_the_maximum_per_family_is_refused() {
        let many: Vec<IpNet> = (0..=MAX_ALLOW_PREFIXES as u32)
            .map(|i| IpNet::from(IpAddr::from((0xc612_0000u32 + i).to_be_bytes())))
            .collect();
        assert_eq!(
            check_list(&many),
            Err(AllowError::TooMany {
                count: MAX_ALLOW_PREFIXES + 1,
                family: "IPv4"
            })
        );
        assert!(check_list(&many[..MAX_ALLOW_PREFIXES]).is_ok());
    }

    #[test]
    fn the_effective_list_is_the_own_one_else_the_hosts_of_the_family() {
        let host = nets(&["198.18.1.0/24", "fd00:1::/64"]);
        let own = nets(&["198.18.3.0/24", "198.18.3.0/24"]);
        let effective = |own: &[IpNet], host: &[IpNet], family| {
            source(own, host).map(|s| of_family(if s == Source::Own { own } else { host }, family))
        };
        assert_eq!(source(&own, &host), Some(Source::Own));
        assert_eq!(effective(&own, &host, FAMILY_V4), Some(nets(&["198.18.3.0/24"])));
        assert_eq!(source(&[], &host), Some(Source::Host));
        assert_eq!(effective(&[], &host, FAMILY_V6), Some(nets(&["fd00:1::/64"])));
        assert_eq!(source(&[], &[]), None);
        // A host list of one family admits nobody of the other.
        assert_eq!(effective(&[], &host[..1], FAMILY_V6), Some(vec![]));
        assert!(admits(&host, "198.18.1.9".parse().unwrap()));
        assert!(!admits(&host, "198.18.2.9".parse().unwrap()));
    }

    #[test]
    fn a_container_list_splits_by_family_and_leaves_out_an_unnamed_family() {
        let v4 = crate::model::spec::parse("8080:198.18.2.2:80").unwrap();
        let v6 = crate::model::spec::parse("[::]:8080:[fd00:2::2]:80").unwrap();
        let both = vec![v4.clone(), v6.clone()];
        let (kept, left_out) = for_container(both.clone(), &nets(&["198.18.1.0/24"]));
        assert_eq!(kept, vec![v4.with_allow(nets(&["198.18.1.0/24"]))]);
        assert_eq!(left_out, vec![v6.with_allow(vec![])]);
        assert!(left_out_message(&left_out).unwrap().contains("[fd00:2::2]:80"));
        let (kept, left_out) = for_container(both.clone(), &nets(&["fd00:1::/64", "198.18.1.0/24"]));
        assert_eq!(kept[1].allow, nets(&["fd00:1::/64"]));
        assert!(left_out.is_empty() && left_out_message(&left_out).is_none());
        assert_eq!(for_container(both.clone(), &[]), (both, vec![]));
    }
}
