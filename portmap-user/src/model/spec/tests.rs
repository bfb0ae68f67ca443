//! Parser tests: good and bad specs, round trips, and grammar-shaped proptests.

use portmap_common::{FAMILY_V4, FAMILY_V6, PROTO_UDP};

use super::*;

fn ip(s: &str) -> IpAddr {
    s.parse().unwrap()
}

fn backend(addr: &str, start: u16, end: u16, weight: u16) -> Backend {
    Backend {
        ip: ip(addr),
        ports: PortRange { start, end },
        weight,
    }
}

fn m(proto: Protocol, host: &str, ports: Option<(u16, u16)>, backends: Vec<Backend>) -> Mapping {
    Mapping {
        protocol: proto,
        host_ip: ip(host),
        host_ports: ports.map(|(start, end)| PortRange { start, end }),
        backends,
        allow: Vec::new(),
    }
}

#[test]
fn good_specs() {
    let web = || vec![backend("198.18.2.2", 80, 80, 1)];
    let cases = [
        (
            "8080:198.18.2.2:80",
            m(Protocol::Tcp, "0.0.0.0", Some((8080, 8080)), web()),
        ),
        (
            "8080:198.18.2.2:80/tcp",
            m(Protocol::Tcp, "0.0.0.0", Some((8080, 8080)), web()),
        ),
        (
            "53:198.18.2.2:5353/UDP",
            m(
                Protocol::Udp,
                "0.0.0.0",
                Some((53, 53)),
                vec![backend("198.18.2.2", 5353, 5353, 1)],
            ),
        ),
        (
            "198.18.1.1:8080:198.18.2.2:80",
            m(Protocol::Tcp, "198.18.1.1", Some((8080, 8080)), web()),
        ),
        (
            "8000-8099:198.18.2.2:9000-9099",
            m(
                Protocol::Tcp,
                "0.0.0.0",
                Some((8000, 8099)),
                vec![backend("198.18.2.2", 9000, 9099, 1)],
            ),
        ),
        (
            "8000-8099:198.18.2.2:80",
            m(Protocol::Tcp, "0.0.0.0", Some((8000, 8099)), web()),
        ),
        (":198.18.2.2:80", m(Protocol::Tcp, "0.0.0.0", None, web())),
        // Docker's forms: host port 0, an empty host address, an empty protocol, an
        // IPv4-mapped host address.
        ("0:198.18.2.2:80", m(Protocol::Tcp, "0.0.0.0", None, web())),
        // Docker reads the range 0-0 as port 0: any free port.
        ("0-0:198.18.2.2:80", m(Protocol::Tcp, "0.0.0.0", None, web())),
        (
            ":8084:198.18.2.2:80",
            m(Protocol::Tcp, "0.0.0.0", Some((8084, 8084)), web()),
        ),
        (
            "8080:198.18.2.2:80/",
            m(Protocol::Tcp, "0.0.0.0", Some((8080, 8080)), web()),
        ),
        (
            "[::ffff:198.18.1.1]:8080:198.18.2.2:80",
            m(Protocol::Tcp, "198.18.1.1", Some((8080, 8080)), web()),
        ),
        ("198.18.2.2:80", m(Protocol::Tcp, "0.0.0.0", None, web())),
        (
            "198.18.1.1::198.18.2.2:80",
            m(Protocol::Tcp, "198.18.1.1", None, web()),
        ),
        (
            "[fd00::1]:8080:[fd00::2]:80",
            m(
                Protocol::Tcp,
                "fd00::1",
                Some((8080, 8080)),
                vec![backend("fd00::2", 80, 80, 1)],
            ),
        ),
        (
            "8080:[fd00::2]:80",
            m(
                Protocol::Tcp,
                "::",
                Some((8080, 8080)),
                vec![backend("fd00::2", 80, 80, 1)],
            ),
        ),
        (
            "8080:198.18.2.2:80,198.18.2.3:80@3,198.18.2.4:8080@0",
            m(
                Protocol::Tcp,
                "0.0.0.0",
                Some((8080, 8080)),
                vec![
                    backend("198.18.2.2", 80, 80, 1),
                    backend("198.18.2.3", 80, 80, 3),
                    backend("198.18.2.4", 8080, 8080, 0),
                ],
            ),
        ),
        (
            "9999:198.18.2.2:9999/sctp",
            m(
                Protocol::Sctp,
                "0.0.0.0",
                Some((9999, 9999)),
                vec![backend("198.18.2.2", 9999, 9999, 1)],
            ),
        ),
        // A port of the host itself (REDIRECT): the unspecified backend address.
        (
            "8082:0.0.0.0:8080",
            m(
                Protocol::Tcp,
                "0.0.0.0",
                Some((8082, 8082)),
                vec![backend("0.0.0.0", 8080, 8080, 1)],
            ),
        ),
        (
            "[::1]:5353:[::]:53/udp",
            m(
                Protocol::Udp,
                "::1",
                Some((5353, 5353)),
                vec![backend("::", 53, 53, 1)],
            ),
        ),
        (
            "8000-8001:0.0.0.0:9000-9001",
            m(
                Protocol::Tcp,
                "0.0.0.0",
                Some((8000, 8001)),
                vec![backend("0.0.0.0", 9000, 9001, 1)],
            ),
        ),
    ];
    for (spec, want) in cases {
        assert_eq!(parse(spec), Ok(want), "{spec}");
    }
}

#[test]
fn bad_specs_name_the_problem() {
    let cases = [
        ("", "empty"),
        ("8080", "does not match"),
        ("1:2:3:4:5", "brackets"),
        ("fd00::1:8080:fd00::2:80", "brackets"),
        ("0-5:198.18.2.2:80", "host port 0 is out of range"),
        (
            "8000-8001:198.18.2.2:90-91,198.18.2.3:80",
            "has 1 ports for 2 host ports",
        ),
        ("8080:198.18.2.2:0", "backend port 0 is out of range"),
        ("65536:198.18.2.2:80", "host port 65536 is out of range"),
        (
            "8080:198.18.2.2:99999999",
            "backend port '99999999' is not a port number",
        ),
        ("http:198.18.2.2:80", "host port 'http' is not a port number"),
        (
            "8080:198.18.2:80",
            "backend address '198.18.2' is not an IP address",
        ),
        ("1.2.3.400:8080:198.18.2.2:80", "host address '1.2.3.400'"),
        ("8080:198.18.2.2:80/icmp", "unknown protocol 'icmp'"),
        ("8080::80", "backend address is missing"),
        ("8099-8000:198.18.2.2:80", "ends before it starts"),
        ("8000-8009:198.18.2.2:90-91", "has 2 ports for 10 host ports"),
        (
            "8080:255.255.255.255:80",
            "backend address 255.255.255.255 cannot be a destination",
        ),
        (
            "8080:[ff02::1]:80",
            "backend address ff02::1 cannot be a destination",
        ),
        (
            "8080:0.0.0.0:80,198.18.2.2:80",
            "the backend 0.0.0.0 (the host itself, at the address each packet came to) cannot be balanced",
        ),
        ("8080:198.18.2.2:80,[::]:80", "mixes IPv4 and IPv6"),
        (
            "8082:8080",
            "'8082:8080' has no backend address: for a port of this host itself (iptables' REDIRECT \
             --to-port 8080) write '8082:0.0.0.0:8080' (IPv4) or '8082:[::]:8080' (IPv6)",
        ),
        ("8000-8010:9000-9010/udp", "write '8000-8010:0.0.0.0:9000-9010'"),
        (
            "224.0.0.1:8080:198.18.2.2:80",
            "host address 224.0.0.1 cannot be published",
        ),
        ("8080:198.18.2.2:80,[fd00::2]:80", "mixes IPv4 and IPv6"),
        ("[fd00::1]:8080:198.18.2.2:80", "mixes IPv4 and IPv6"),
        ("8080:198.18.2.2:80@x", "weight 'x'"),
        ("8080:198.18.2.2:80@1001", "weight '1001'"),
        ("8080:198.18.2.2:80@0", "every backend has weight 0"),
        ("8080:198.18.2.2:80,198.18.2.2:80", "same backend twice"),
        ("8080:198.18.2.2:80/sctp", "SCTP mapping must keep the port"),
        (":198.18.2.2:80/sctp", "SCTP mapping must keep the port"),
        // Published where no packet can reach it: a loopback backend from the wire.
        (
            "8082:127.0.0.1:8080",
            "publish it on 127.0.0.1 for host processes only ('127.0.0.1:8082:127.0.0.1:8080')",
        ),
        (
            "198.18.0.1:8082:127.0.0.5:8080",
            "as iptables' REDIRECT does ('8082:0.0.0.0:8080')",
        ),
        (
            "8082:[::1]:8080",
            "('[::1]:8082:[::1]:8080'), or publish a port of this host itself",
        ),
        ("8082:[::1]:8080", "('8082:[::]:8080')"),
    ];
    for (spec, want) in cases {
        let err = parse(spec).expect_err(spec).to_string();
        assert!(err.contains(want), "{spec:?}: {err:?} lacks {want:?}");
    }
    let many: Vec<String> = (1..=41).map(|i| format!("198.18.3.{i}:80")).collect();
    let err = parse(&format!("8080:{}", many.join(",")))
        .unwrap_err()
        .to_string();
    assert!(err.contains("41 backends"), "{err}");
}

/// A loopback backend is fine where only host processes reach the mapping: on a loopback host
/// address (the socket hooks serve it, as iptables' OUTPUT REDIRECT).
#[test]
fn a_loopback_backend_on_a_loopback_host_address_is_accepted() {
    for spec in ["127.0.0.1:8082:127.0.0.1:8080", "[::1]:8082:[::1]:8080"] {
        parse(spec).unwrap();
    }
}

#[test]
fn display_round_trips_and_docker_lines() {
    for spec in [
        "8080:198.18.2.2:80/tcp",
        "198.18.1.1:53:198.18.2.2:5353/udp",
        "[fd00::1]:8080:[fd00::2]:80/tcp",
        "8000-8002:198.18.2.2:9000-9002/udp",
        ":198.18.2.2:80/tcp",
        "8080:198.18.2.2:80,198.18.2.3:81@5/tcp",
    ] {
        let mapping = parse(spec).unwrap();
        assert_eq!(mapping.to_string(), spec);
    }
    assert_eq!(
        parse("8080:198.18.2.2:80").unwrap().docker_lines(),
        ["198.18.2.2:80/tcp -> 0.0.0.0:8080"]
    );
    assert_eq!(
        parse("8080:[fd00::2]:80").unwrap().docker_lines(),
        ["[fd00::2]:80/tcp -> [::]:8080"]
    );
    assert_eq!(
        parse("8000-8001:198.18.2.2:9000-9001,198.18.2.3:80-81/udp")
            .unwrap()
            .docker_lines(),
        [
            "198.18.2.2:9000,198.18.2.3:80/udp -> 0.0.0.0:8000",
            "198.18.2.2:9001,198.18.2.3:81/udp -> 0.0.0.0:8001"
        ]
    );
    // One port of the range, as Docker: a single line for the requested form.
    assert!(parse("8000-8010:198.18.2.2:80").unwrap().picks_one());
}

#[test]
fn port_lines_answer_like_docker_port() {
    let ms: Vec<Mapping> = [
        "8080:198.18.2.2:80",
        "198.18.1.1:8443:198.18.2.2:443,198.18.2.3:443",
        "53:198.18.2.2:5353/udp",
        "9000-9001:198.18.2.2:7000-7001",
        "8080:[fd00::2]:80",
        "5353:198.18.2.2:80/udp",
    ]
    .iter()
    .map(|s| parse(s).unwrap())
    .collect();
    let ask = |q: &str| port_lines(&ms, &PortQuery::parse(q).unwrap());
    // A port without a protocol is TCP, as in Docker.
    assert_eq!(ask("198.18.2.2:80"), ["0.0.0.0:8080"]);
    assert_eq!(ask("198.18.2.2:80/udp"), ["0.0.0.0:5353"]);
    assert_eq!(ask("198.18.2.2:7001/tcp"), ["0.0.0.0:9001"]);
    assert!(ask("198.18.2.2:5353").is_empty());
    // Natural order, numbers by value: 80 before 443, as `docker port` sorts.
    assert_eq!(
        ask("198.18.2.2"),
        [
            "80/tcp -> 0.0.0.0:8080",
            "80/udp -> 0.0.0.0:5353",
            "443/tcp -> 198.18.1.1:8443",
            "5353/udp -> 0.0.0.0:53",
            "7000/tcp -> 0.0.0.0:9000",
            "7001/tcp -> 0.0.0.0:9001"
        ]
    );
    assert_eq!(ask("198.18.2.3:443"), ["198.18.1.1:8443"]);
    assert_eq!(ask("[fd00::2]:80"), ["[::]:8080"]);
    assert!(ask("198.18.9.9").is_empty());
    assert!(
        PortQuery::parse("nope")
            .unwrap_err()
            .to_string()
            .contains("'nope'")
    );
}

/// Go's sortorder.NaturalLess, which `docker port` sorts with.
#[test]
fn natural_order_compares_numbers_by_value() {
    use std::cmp::Ordering::{Equal, Greater, Less};
    for (a, b, want) in [
        ("80/tcp", "443/tcp", Less),
        ("a2", "a10", Less),
        ("a02", "a2", Greater),
        ("a", "a1", Less),
        ("1a", "a", Less),
        ("x", "x", Equal),
        ("0.0.0.0:8080", "0.0.0.0:80", Greater),
    ] {
        assert_eq!(natural_cmp(a, b), want, "{a} vs {b}");
    }
}

#[test]
fn overlap_needs_same_protocol_address_and_ports() {
    let a = parse("8000-8010:198.18.2.2:80").unwrap();
    assert!(a.overlaps(&parse("8010:198.18.2.3:80").unwrap()));
    assert!(!a.overlaps(&parse("8011:198.18.2.3:80").unwrap()));
    assert!(!a.overlaps(&parse("8005:198.18.2.3:80/udp").unwrap()));
    assert!(!a.overlaps(&parse("198.18.1.1:8005:198.18.2.3:80").unwrap()));
}

#[test]
fn first_overlap_finds_ranges_that_share_a_port() {
    let parse_all = |specs: &[&str]| specs.iter().map(|s| parse(s).unwrap()).collect::<Vec<_>>();
    let ms = parse_all(&[
        "8000-8100:198.18.2.2:8000-8100",
        "9000:198.18.2.2:80",
        "8050:198.18.2.3:80",
    ]);
    assert_eq!(first_overlap(&ms), Some((0, 2)));
    // Ranges of which one port is chosen at add time never overlap in a config.
    let ms = parse_all(&["8000-8010:198.18.2.2:80", "8000-8010:198.18.2.3:80"]);
    assert_eq!(first_overlap(&ms), None);
    let ms = parse_all(&[
        "8000:198.18.2.2:80",
        "8000:198.18.2.2:80/udp",
        "198.18.1.1:8000:198.18.2.2:80",
    ]);
    assert_eq!(first_overlap(&ms), None);
    let ms = parse_all(&[
        "1-100:198.18.2.2:1-100",
        "200-300:198.18.2.2:200-300",
        "50:198.18.2.3:80",
        "250:198.18.2.3:80",
    ]);
    assert_eq!(first_overlap(&ms), Some((0, 2)));
}

#[test]
fn map_key_is_wire_order() {
    let key = parse("198.18.1.1:8080:198.18.2.2:80/udp").unwrap().map_key(8080);
    assert_eq!(key.addr[0].to_ne_bytes(), [198, 18, 1, 1]);
    assert_eq!(key.addr[1..], [0, 0, 0]);
    assert_eq!(key.port_be.to_ne_bytes(), [0x1f, 0x90]);
    assert_eq!((key.proto, key.family), (PROTO_UDP, FAMILY_V4));
    let v6 = parse("[fd00::1]:8080:[fd00::2]:80").unwrap().map_key(8080);
    assert_eq!(v6.addr[0].to_ne_bytes(), [0xfd, 0, 0, 0]);
    assert_eq!(v6.addr[3].to_ne_bytes(), [0, 0, 0, 1]);
    assert_eq!(v6.family, FAMILY_V6);
}

/// Spec-shaped input: fields drawn from valid and invalid addresses, ports, ranges, weights
/// and protocols, joined by ':' and ',' with an optional '/proto', so most inputs get deep
/// into the parser.
fn spec_like() -> impl proptest::strategy::Strategy<Value = String> {
    use proptest::prelude::*;
    let field = prop_oneof![
        "[0-9]{1,6}",
        "[0-9]{1,5}-[0-9]{1,5}",
        "[0-9]{1,5}@[0-9]{1,4}",
        (0u8..=255, 0u8..=255, 0u8..=255, 0u8..=255).prop_map(|(a, b, c, d)| format!("{a}.{b}.{c}.{d}")),
        Just("[fd00::2]".to_string()),
        Just("[::]".to_string()),
        // Docker's forms: host port 0, IPv4-mapped host addresses.
        Just("0".to_string()),
        Just("[::ffff:198.18.1.1]".to_string()),
        "[0-9a-f.\\[\\]]{0,12}",
        Just(String::new()),
        "\\PC{0,6}",
    ];
    let proto = prop_oneof![
        Just(String::new()),
        Just("/tcp".to_string()),
        Just("/UDP".to_string()),
        Just("/sctp".to_string()),
        Just("/".to_string()),
        "/\\PC{0,5}",
    ];
    let sep = prop_oneof![Just(":"), Just(":"), Just(",")];
    (proptest::collection::vec((field, sep), 1..8), proto).prop_map(|(fields, proto)| {
        let mut s: String = fields
            .into_iter()
            .flat_map(|(f, sep)| [f, sep.to_string()])
            .collect();
        s.pop();
        s + &proto
    })
}

/// An error names the problem: the piece of input it is about appears in the input and in
/// the message, or it says which part is missing (and one is), or that all of it is.
/// (Exhaustive: a new variant must say what it names.)
fn names_the_problem(input: &str, err: &SpecError) -> bool {
    let piece = match err {
        SpecError::Empty => return input.trim().is_empty(),
        // A spec string carries no allow-list: this comes only from a mapping's `allow`.
        SpecError::Allow(_) => return false,
        SpecError::Missing { .. } => {
            // `parse` trims the spec first (" :0" is missing its backend address).
            return input
                .trim()
                .split('/')
                .next()
                .is_some_and(|b| b.split([':', ',', '@']).any(str::is_empty));
        }
        SpecError::Shape(s)
        | SpecError::Protocol(s)
        | SpecError::MixedFamilies(s)
        | SpecError::Weight(s)
        | SpecError::AllWeightsZero(s)
        | SpecError::DuplicateBackend(s)
        | SpecError::SctpPortChange(s)
        | SpecError::DestinationWithOthers(s, _)
        | SpecError::NoBackendAddress { spec: s, .. }
        | SpecError::TooManyBackends { spec: s, .. } => s.clone(),
        SpecError::Port { value, .. }
        | SpecError::ReversedRange { value, .. }
        | SpecError::Address { value, .. }
        | SpecError::Ipv6Brackets { value, .. } => value.clone(),
        SpecError::RangeLength { backend, .. } => return err.to_string().contains(backend.as_str()),
        SpecError::LoopbackBackend { backend, .. } => {
            return err.to_string().contains(&backend.to_string());
        }
        SpecError::PortRange { value, .. } => value.to_string(),
        SpecError::BackendAddress(a) | SpecError::HostAddress(a) => a.to_string(),
    };
    !piece.is_empty() && input.contains(&piece) && err.to_string().contains(&piece)
}

proptest::proptest! {
    #![proptest_config(proptest::prelude::ProptestConfig::with_cases(2000))]
    #[test]
    fn parse_never_panics_and_errors_name_the_problem(s in "\\PC{0,40}") {
        match parse(&s) {
            Ok(m) => proptest::prop_assert_eq!(parse(&m.to_string()), Ok(m)),
            Err(e) => proptest::prop_assert!(names_the_problem(&s, &e), "{s:?}: {e}"),
        }
    }

    #[test]
    fn spec_shaped_input_parses_or_names_the_problem(s in spec_like()) {
        match parse(&s) {
            Ok(m) => proptest::prop_assert_eq!(parse(&m.to_string()), Ok(m)),
            Err(e) => proptest::prop_assert!(names_the_problem(&s, &e), "{s:?}: {e}"),
        }
    }

    #[test]
    fn parse_round_trips_any_valid(hp in 1u16.., bp in 1u16.., a in 1u8..=223, udp: bool, bind: bool) {
        let mapping = Mapping {
            protocol: if udp { Protocol::Udp } else { Protocol::Tcp },
            host_ip: if bind { IpAddr::from([198, 18, 1, a]) } else { IpAddr::from([0, 0, 0, 0]) },
            host_ports: Some(PortRange::single(hp)),
            backends: vec![Backend { ip: IpAddr::from([198, 18, 2, a]), ports: PortRange::single(bp), weight: 1 }],
            allow: Vec::new(),
        };
        proptest::prop_assert_eq!(parse(&mapping.to_string()), Ok(mapping));
    }
}
