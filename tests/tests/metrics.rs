//! Prometheus metrics (`--metrics ADDR:PORT`): scraped over HTTP from inside the daemon's
//! namespace and read with a Prometheus exposition-format parser.

use std::{
    io::{BufRead as _, BufReader, Read as _, Write as _},
    net::{SocketAddrV4, TcpStream},
    time::Duration,
};

use anyhow::{Context as _, ensure};
use portmap_tests::{BackendLink, Daemon, HOST_IP, Netns, Topology, tcp_exchange, tcp_server};
use prometheus_parse::{Sample, Scrape, Value};

const METRICS: &str = "127.0.0.1:9464";

/// `GET path` on the metrics address inside `ns`: the status line and the body.
fn get(ns: &Netns, path: &str) -> anyhow::Result<(String, String)> {
    let path = path.to_owned();
    ns.run(move || {
        let mut stream = TcpStream::connect(METRICS)?;
        stream.set_read_timeout(Some(Duration::from_secs(10)))?;
        write!(
            stream,
            "GET {path} HTTP/1.1\r\nHost: portmap\r\nConnection: close\r\n\r\n"
        )?;
        let mut reader = BufReader::new(stream);
        let mut status = String::new();
        reader.read_line(&mut status)?;
        let mut rest = String::new();
        reader.read_to_string(&mut rest)?;
        let body = rest
            .split_once("\r\n\r\n")
            .map(|(_, b)| b.to_owned())
            .unwrap_or_default();
        Ok((status.trim().to_owned(), body))
    })
}

fn value(sample: &Sample) -> f64 {
    match sample.value {
        Value::Counter(v) | Value::Gauge(v) | Value::Untyped(v) => v,
        _ => f64::NAN,
    }
}

/// The value of the one sample named `metric` whose labels include `labels`.
fn find(scrape: &Scrape, metric: &str, labels: &[(&str, &str)]) -> anyhow::Result<f64> {
    let found: Vec<&Sample> = scrape
        .samples
        .iter()
        .filter(|s| s.metric == metric && labels.iter().all(|(k, v)| s.labels.get(k) == Some(*v)))
        .collect();
    ensure!(found.len() == 1, "{metric} {labels:?}: {} samples", found.len());
    Ok(value(found[0]))
}

/// Per-mapping packets, bytes and flows by direction with their labels, the outcome counters,
/// flow-table fill and build info; other paths get 404.
#[test]
fn scrape_shows_mapping_counters() -> anyhow::Result<()> {
    let topo = Topology::new(BackendLink::Veth)?;
    let daemon = Daemon::start(
        &topo.host,
        &["--iface", "h0", "--attach", "tc", "--metrics", METRICS],
    )?;
    daemon.cli_ok(&["add", "8080:198.18.1.2:80"])?;
    let server = tcp_server(&topo.backend, 80, b"pong".to_vec())?;
    let host = SocketAddrV4::new(HOST_IP, 8080);
    assert_eq!(tcp_exchange(&topo.client, host, b"ping".to_vec())?, b"pong");
    server.join().unwrap()?;

    let (status, body) = get(&topo.host, "/metrics")?;
    assert!(status.ends_with("200 OK"), "{status}");
    let scrape = Scrape::parse(body.lines().map(|l| Ok(l.to_owned()))).context("parsing the scrape")?;
    let mapping = [
        ("protocol", "tcp"),
        ("host_address", "0.0.0.0"),
        ("host_port", "8080"),
        ("backend", "198.18.1.2:80"),
    ];
    let with = |direction| {
        let mut labels = mapping.to_vec();
        labels.push(("direction", direction));
        labels
    };
    let stats = daemon.stats()?;
    let counters = stats.mapping_on_port(8080).context("no stats for 8080")?.counters;
    // No traffic flows any more: the scrape and `stats` read the same counters.
    assert_eq!(
        find(&scrape, "portmap_mapping_packets_total", &with("forward"))?,
        counters.fwd_packets as f64
    );
    assert_eq!(
        find(&scrape, "portmap_mapping_bytes_total", &with("reply"))?,
        counters.reply_bytes as f64
    );
    assert!(
        counters.fwd_packets >= 3 && counters.reply_packets >= 2,
        "{counters:?}"
    );
    assert_eq!(find(&scrape, "portmap_mapping_flows_total", &mapping)?, 1.0);
    let forwarded = find(&scrape, "portmap_datapath_total", &[("counter", "fwd_redirect")])?
        + find(&scrape, "portmap_datapath_total", &[("counter", "fwd_local")])?
        + find(&scrape, "portmap_datapath_total", &[("counter", "fwd_stack")])?;
    assert!(forwarded >= 3.0, "{forwarded}");
    assert_eq!(
        find(&scrape, "portmap_flow_capacity", &[("table", "assured")])?,
        stats.flow_capacity as f64
    );
    assert_eq!(
        find(
            &scrape,
            "portmap_build_info",
            &[("version", env!("CARGO_PKG_VERSION"))]
        )?,
        1.0
    );

    let (status, _) = get(&topo.host, "/")?;
    assert!(status.contains("404"), "{status}");
    Ok(())
}
