//! Tests of the configuration: parsing, validation, overrides, fuzzed documents.

use super::*;

const EXAMPLE: &str = r#"
interfaces = ["eth0"]
attach = "tc"
mappings = ["8080:198.18.2.2:80", "198.18.1.1:5353:198.18.2.2:53/udp"]

[timeouts]
udp_seconds = 30
"#;

#[test]
fn example_parses_with_defaults() {
    let valid = Config::from_toml(EXAMPLE).unwrap().validate().unwrap();
    assert_eq!(valid.config.startup.attach, AttachMode::Tc);
    assert_eq!(valid.config.live.timeouts.udp_seconds, 30);
    assert_eq!(valid.config.live.timeouts.tcp_seconds, 7440);
    assert_eq!(valid.config.startup.pin_dir, PathBuf::from(DEFAULT_PIN_DIR));
    assert_eq!(valid.mappings.len(), 2);
    assert_eq!(valid.mappings[1].to_string(), "198.18.1.1:5353:198.18.2.2:53/udp");
    assert_eq!(
        valid.config.live.dynamic_ports, None,
        "the kernel's, read by the daemon"
    );
}

#[test]
fn metrics_address_parses_and_a_bad_one_is_named() {
    let cfg = Config::from_toml("metrics = \"127.0.0.1:9464\"").unwrap();
    assert_eq!(cfg.startup.metrics, Some("127.0.0.1:9464".parse().unwrap()));
    assert_eq!(Config::default().startup.metrics, None);
    let err = Config::from_toml("metrics = \"localhost\"")
        .unwrap_err()
        .to_string();
    assert!(
        err.contains("metrics") && err.contains("invalid socket address"),
        "{err}"
    );
}

#[test]
fn readme_example_is_valid() {
    let readme = include_str!("../../../README.md");
    let start = readme.find("```toml\n").expect("README has a toml example") + 8;
    let len = readme[start..].find("```").unwrap();
    Config::from_toml(&readme[start..start + len])
        .unwrap()
        .validate()
        .unwrap();
}

#[test]
fn errors_name_the_problem() {
    let cases = [
        ("interfaces = []", "no interface"),
        ("interfaces = [\"eth0\"]\nbogus = 1", "unknown field `bogus`"),
        (
            "interfaces = [\"eth0\"]\nattach = \"fast\"",
            "unknown variant `fast`",
        ),
        (
            "interfaces = [\"eth0\"]\nmappings = [\"8080:x:80\"]",
            "mappings[0] '8080:x:80': backend address 'x'",
        ),
        (
            "interfaces = [\"eth0\"]\nmappings = [\"8080:198.18.2.2:80\", \"0.0.0.0:8080:198.18.2.3:81/tcp\"]",
            "mappings[1] '0.0.0.0:8080:198.18.2.3:81/tcp': port is already allocated by mappings[0] '8080:198.18.2.2:80'",
        ),
        (
            "interfaces = [\"eth0\"]\nmappings = [\"8000-8100:198.18.2.2:8000-8100\", \"8100-8200:198.18.2.3:8100-8200\"]",
            "mappings[1] '8100-8200:198.18.2.3:8100-8200': port is already allocated by mappings[0]",
        ),
        (
            "interfaces = [\"eth0\"]\ndynamic_ports = { start = 100, end = 99 }",
            "dynamic_ports 100-99",
        ),
        (
            "interfaces = [\"eth0\"]\n[timeouts]\nudp_seconds = 0",
            "timeouts.udp_seconds must be at least 1",
        ),
        ("interfaces = [\"a/b\"]", "interface name 'a/b'"),
        (
            "interfaces = [\"eth0\"]\nmappings = [\"1:198.18.2.2:1\", \"2:198.18.2.2:1\"]\n[limits]\nmax_mappings = 1",
            "2 published ports exceed limits.max_mappings = 1",
        ),
        (
            "interfaces = [\"eth0\"]\nmappings = [{ spec = \"5432:198.18.2.2:5432\", allow = [\"fd00:1::/64\"] }]",
            "allow fd00:1::/64 is IPv6, the mapping is IPv4",
        ),
        (
            "interfaces = [\"eth0\"]\nallow = [\"198.18.1.1/24\"]",
            "allow 198.18.1.1/24 has host bits set: write 198.18.1.0/24",
        ),
    ];
    for (text, want) in cases {
        let err = Config::from_toml(text)
            .and_then(Config::validate)
            .expect_err(text)
            .to_string();
        assert!(err.contains(want), "{text:?}: {err:?} lacks {want:?}");
    }
}

#[test]
fn allow_lists_parse_on_mappings_and_for_the_host() {
    let text = "interfaces = [\"eth0\"]\nallow = [\"198.18.1.0/24\", \"fd00:1::/64\"]\nmappings = [\
                { spec = \"5432:198.18.2.2:5432\", allow = [\"198.18.3.7\", \"198.18.1.0/24\"] }, \"8080:198.18.2.2:80\"]";
    let valid = Config::from_toml(text).unwrap().validate().unwrap();
    let nets = |l: &[&str]| {
        l.iter()
            .map(|s| s.parse().unwrap())
            .collect::<Vec<ipnet::IpNet>>()
    };
    assert_eq!(valid.config.live.allow, nets(&["198.18.1.0/24", "fd00:1::/64"]));
    // Sorted, a bare address a /32.
    assert_eq!(valid.mappings[0].allow, nets(&["198.18.1.0/24", "198.18.3.7/32"]));
    assert!(valid.mappings[1].allow.is_empty());
}

#[test]
fn same_port_on_specific_and_wildcard_address_is_allowed() {
    let specs = vec![
        MappingEntry::Spec("8080:198.18.2.2:80".to_string()),
        MappingEntry::Spec("198.18.1.1:8080:198.18.2.3:80".to_string()),
        MappingEntry::Spec("8080:[fd00::2]:80".to_string()),
    ];
    assert_eq!(parse_mappings(&specs).unwrap().len(), 3);
}

#[test]
fn structured_mappings_round_trip_through_json_and_toml() {
    let specs = [
        "8080:198.18.2.2:80,198.18.2.3:80@2/tcp",
        "[fd00::1]:53:[fd00::2]:5353/udp",
        "8000-8009:198.18.2.2:9000-9009/tcp",
        "9999:198.18.2.2:9999/sctp",
    ];
    let mappings: Vec<MappingEntry> = specs
        .iter()
        .map(|s| MappingEntry::Structured(spec::parse(s).unwrap()))
        .collect();
    let json = serde_json::json!({ "interfaces": ["eth0"], "mappings": mappings }).to_string();
    let from_json = Config::from_json(&json).unwrap().validate().unwrap();
    let config = Config {
        startup: Startup {
            interfaces: vec!["eth0".into()],
            ..Startup::default()
        },
        live: Live {
            mappings,
            ..Live::default()
        },
    };
    let from_toml = Config::from_toml(&toml::to_string(&config).unwrap())
        .unwrap()
        .validate()
        .unwrap();
    for valid in [from_json, from_toml] {
        let got: Vec<String> = valid.mappings.iter().map(ToString::to_string).collect();
        assert_eq!(got, specs);
    }
}

/// Config-shaped documents: known and unknown keys, at top level and in tables, with values
/// of every TOML type, so most inputs reach deserialisation and validation.
fn config_like() -> impl proptest::strategy::Strategy<Value = String> {
    use proptest::prelude::*;
    let key = prop_oneof![
        Just("interfaces"),
        Just("attach"),
        Just("redirect_interfaces"),
        Just("local_fast_path"),
        Just("pin_dir"),
        Just("state_file"),
        Just("socket"),
        Just("cgroup"),
        Just("cgroup_mount"),
        Just("mappings"),
        Just("tcp_seconds"),
        Just("udp_seconds"),
        Just("max_mappings"),
        Just("conntrack_entries"),
        Just("bogus"),
    ];
    let value = prop_oneof![
        Just("[\"eth0\"]".to_string()),
        Just("[\"8080:198.18.2.2:80\", \"8080:198.18.2.3:80\"]".to_string()),
        "\\[\"[a-z0-9:./ -]{0,20}\"\\]",
        "\"[a-z0-9:./]{0,12}\"",
        (0u64..100_000).prop_map(|n| n.to_string()),
        Just("-1".to_string()),
        Just("true".to_string()),
        Just("{}".to_string()),
    ];
    let table = prop_oneof![
        Just(""),
        Just("[timeouts]\n"),
        Just("[limits]\n"),
        Just("[nope]\n")
    ];
    proptest::collection::vec((table, key, value), 0..6).prop_map(|lines| {
        lines
            .into_iter()
            .map(|(table, key, value)| format!("{table}{key} = {value}\n"))
            .collect()
    })
}

/// A config error names the problem in terms of the input: TOML and JSON errors a line the
/// input has, the rest a value or key the input wrote (the message quoting it as well).
fn names_the_problem(input: &str, err: &ConfigError) -> bool {
    let msg = err.to_string();
    let quoted = |text: &str| msg.contains(text) && input.contains(text);
    match err {
        ConfigError::Toml(_) | ConfigError::Json(_) => names_a_line_of(input, &msg),
        ConfigError::Spec { spec, .. } | ConfigError::Overlap { spec, .. } => quoted(spec),
        ConfigError::DynamicPorts(_) => quoted("dynamic_ports"),
        ConfigError::NoInterfaces => msg.contains("interfaces") && !lists_interfaces(input),
        ConfigError::Interface(name) => quoted(name),
        // The field as the message names it (`limits.max_mappings`), its key as the input does.
        ConfigError::Zero { field } => {
            msg.contains(field) && field.rsplit('.').next().is_some_and(|key| input.contains(key))
        }
        ConfigError::TooManyMappings { .. } => {
            msg.contains("limits.max_mappings") && input.contains("mappings")
        }
        ConfigError::Cgroup(path) => quoted(path) && input.contains("cgroup"),
        ConfigError::Allow(_) => msg.contains("allow") && input.contains("allow"),
    }
}

/// The input is a TOML document with a non-empty top-level `interfaces` list.
fn lists_interfaces(input: &str) -> bool {
    input.parse::<toml::Table>().is_ok_and(|doc| {
        doc.get("interfaces")
            .and_then(toml::Value::as_array)
            .is_some_and(|l| !l.is_empty())
    })
}

/// The message names `line N` for an N within the input (or one past its end, where a document
/// ends too early).
fn names_a_line_of(input: &str, msg: &str) -> bool {
    let lines = input.lines().count().max(1) + 1;
    msg.match_indices("line ").any(|(at, word)| {
        let digits: String = msg[at + word.len()..]
            .chars()
            .take_while(char::is_ascii_digit)
            .collect();
        digits.parse::<usize>().is_ok_and(|n| (1..=lines).contains(&n))
    })
}

proptest::proptest! {
    #![proptest_config(proptest::prelude::ProptestConfig::with_cases(2000))]
    #[test]
    fn any_text_parses_or_names_the_problem(s in "\\PC{0,200}") {
        if let Err(e) = Config::from_toml(&s).and_then(Config::validate) {
            proptest::prop_assert!(names_the_problem(&s, &e), "{s:?}: {e}");
        }
    }

    #[test]
    fn config_shaped_text_parses_or_names_the_problem(s in config_like()) {
        match Config::from_toml(&s).and_then(Config::validate) {
            Ok(valid) => proptest::prop_assert!(!valid.config.startup.interfaces.is_empty()),
            Err(e) => proptest::prop_assert!(names_the_problem(&s, &e), "{s:?}: {e}"),
        }
    }
}

#[test]
fn unknown_keys_are_named_with_their_line() {
    let err = Config::from_toml("interfaces = [\"eth0\"]\n\nbogus = 1")
        .unwrap_err()
        .to_string();
    assert!(
        err.contains("line 3") && err.contains("unknown field `bogus`"),
        "{err}"
    );
    let err = Config::from_json("{\"interfaces\": [\"eth0\"],\n \"bogus\": 1}")
        .unwrap_err()
        .to_string();
    assert!(
        err.contains("line 2") && err.contains("unknown field `bogus`"),
        "{err}"
    );
    // A type error inside one part keeps the parser's position and the key too.
    let err = Config::from_toml("interfaces = [\"eth0\"]\npin_dir = 3")
        .unwrap_err()
        .to_string();
    assert!(err.contains("line 2") && err.contains("pin_dir"), "{err}");
}

#[test]
fn known_keys_are_exactly_what_the_config_writes() {
    let written = serde_json::to_value(Config {
        startup: Startup {
            cgroup_mount: Some("/m".into()),
            metrics: Some("127.0.0.1:1".parse().unwrap()),
            ..Startup::default()
        },
        live: Live {
            dynamic_ports: Some(PortRange { start: 1, end: 2 }),
            ..Live::default()
        },
    })
    .unwrap();
    let mut written: Vec<&str> = written.as_object().unwrap().keys().map(String::as_str).collect();
    let mut known = known_keys().to_vec();
    written.sort_unstable();
    known.sort_unstable();
    assert_eq!(written, known);
}

#[test]
fn a_reload_names_the_startup_keys_that_changed_and_no_live_one() {
    let old = Config::from_toml("interfaces = [\"eth0\"]\nmetrics = \"127.0.0.1:9464\"").unwrap();
    let new = Config::from_toml(
        "interfaces = [\"eth0\"]\nmetrics = \"127.0.0.1:9465\"\n[limits]\nmax_mappings = 10\n[timeouts]\nudp_seconds = 5",
    )
    .unwrap();
    assert_eq!(startup_changes(&old.startup, &new.startup), ["metrics", "limits"]);
    assert!(startup_changes(&old.startup, &old.startup).is_empty());
}

#[test]
fn command_line_flags_replace_the_files_values_and_the_rest_stays() {
    let mut cfg = Config::from_toml(
        "interfaces = [\"eth0\"]\nredirect_interfaces = [\"v0\"]\ncgroup_mount = \"/m\"\nmetrics = \"127.0.0.1:1\"",
    )
    .unwrap()
    .startup;
    let flags = Overrides {
        interfaces: vec!["eth1".into(), "eth2".into()],
        attach: Some(AttachMode::Xdp),
        metrics: Some("127.0.0.1:2".parse().unwrap()),
        ..Overrides::default()
    };
    flags.apply(&mut cfg);
    assert_eq!(cfg.interfaces, ["eth1", "eth2"]);
    assert_eq!(cfg.attach, AttachMode::Xdp);
    assert_eq!(cfg.metrics, Some("127.0.0.1:2".parse().unwrap()));
    // Not given on the command line: the file's values.
    assert_eq!(cfg.redirect_interfaces, ["v0"]);
    assert_eq!(cfg.cgroup_mount, Some("/m".into()));
    assert_eq!(cfg.pin_dir, PathBuf::from(DEFAULT_PIN_DIR));
}
