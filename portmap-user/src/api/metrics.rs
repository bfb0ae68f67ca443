//! Prometheus exposition of the daemon's counters (`metrics = "ADDR:PORT"` or `--metrics`):
//! `GET /metrics` asks the main loop for the same report as `portmap stats` (counters only, no
//! conntrack walk) and encodes it with prometheus-client. Encoding is a pure function of the
//! report, tested without a daemon.

use std::{convert::Infallible, time::Duration};

use http_body_util::Full;
use hyper::{
    Method, StatusCode, body::Bytes, header::CONTENT_TYPE, server::conn::http1, service::service_fn,
};
use hyper_util::rt::{TokioIo, TokioTimer};
use log::warn;
use prometheus_client::{
    encoding::EncodeLabelSet,
    metrics::{counter::Counter, family::Family, gauge::Gauge, info::Info},
    registry::Registry,
};
use tokio::{
    net::TcpListener,
    sync::{mpsc, oneshot},
};

use crate::api::control::{Pending, Request, Response, StatsReport};

/// The labels of one mapping's series.
#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct MappingLabels {
    protocol: String,
    host_address: String,
    /// One port, or a range (`9000-9099`).
    host_port: String,
    /// The backends, comma-separated as in the spec.
    backend: String,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct DirectionLabels {
    #[prometheus(flatten)]
    mapping: MappingLabels,
    /// `forward` (client → backend) or `reply`.
    direction: &'static str,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct CounterLabels {
    /// The counter's name in `portmap stats` (`fwd_redirect`, `drop_no_route`, ...).
    counter: String,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct InterfaceLabels {
    interface: String,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct TableLabels {
    /// `assured` (flows that completed a handshake) or `new`.
    table: &'static str,
}

/// `report` in the OpenMetrics text format.
///
/// # Errors
/// Only if formatting fails (it does not for these types).
pub fn encode(report: &StatsReport) -> Result<String, std::fmt::Error> {
    let mut registry = Registry::with_prefix("portmap");
    register_mappings(&mut registry, report);
    register_datapath(&mut registry, report);
    register_host(&mut registry, report);
    let mut out = String::new();
    prometheus_client::encoding::text::encode(&mut out, &registry)?;
    Ok(out)
}

/// Per mapping: packets and bytes by direction, flows.
fn register_mappings(registry: &mut Registry, report: &StatsReport) {
    let packets = Family::<DirectionLabels, Counter>::default();
    let bytes = Family::<DirectionLabels, Counter>::default();
    let flows = Family::<MappingLabels, Counter>::default();
    let denied = Family::<MappingLabels, Counter>::default();
    for m in &report.mappings {
        let labels = MappingLabels {
            protocol: m.mapping.protocol.to_string(),
            host_address: m.mapping.host_ip.to_string(),
            host_port: m.mapping.host_ports.map(|r| r.to_string()).unwrap_or_default(),
            backend: m
                .mapping
                .backends
                .iter()
                .map(ToString::to_string)
                .collect::<Vec<_>>()
                .join(","),
        };
        let c = m.counters;
        for (direction, p, b) in [
            ("forward", c.fwd_packets, c.fwd_bytes),
            ("reply", c.reply_packets, c.reply_bytes),
        ] {
            let key = DirectionLabels {
                mapping: labels.clone(),
                direction,
            };
            packets.get_or_create(&key).inc_by(p);
            bytes.get_or_create(&key).inc_by(b);
        }
        flows.get_or_create(&labels).inc_by(c.flows);
        denied.get_or_create(&labels).inc_by(m.drop_denied);
    }
    registry.register(
        "mapping_packets",
        "Packets NATed by a mapping, per direction",
        packets,
    );
    registry.register(
        "mapping_bytes",
        "L3 bytes NATed by a mapping, per direction",
        bytes,
    );
    registry.register("mapping_flows", "Flows created through a mapping", flows);
    registry.register(
        "mapping_denied",
        "New flows a mapping's source allow-list refused",
        denied,
    );
}

/// The global counters and the flow tables' fill.
fn register_datapath(registry: &mut Registry, report: &StatsReport) {
    let datapath = Family::<CounterLabels, Counter>::default();
    for (name, value) in &report.counters {
        datapath
            .get_or_create(&CounterLabels {
                counter: name.clone(),
            })
            .inc_by(*value);
    }
    registry.register(
        "datapath",
        "The global counters of `portmap stats`: packet outcomes (fwd_*, pass_*, drop_*), \
         events, and socket-hook decisions (sock_*)",
        datapath,
    );

    let active = Family::<TableLabels, Gauge>::default();
    let capacity = Family::<TableLabels, Gauge>::default();
    for (table, now, max) in [
        ("assured", report.active_flows, report.flow_capacity),
        ("new", report.new_flows, report.new_flow_capacity),
    ] {
        let key = TableLabels { table };
        active
            .get_or_create(&key)
            .set(i64::try_from(now).unwrap_or(i64::MAX));
        capacity
            .get_or_create(&key)
            .set(i64::try_from(max).unwrap_or(i64::MAX));
    }
    registry.register("flows", "Flows in a flow table at the last expiry pass", active);
    registry.register("flow_capacity", "Flows a flow table holds", capacity);
}

/// Interfaces, local backends, the Docker follower, the build.
fn register_host(registry: &mut Registry, report: &StatsReport) {
    let up = Family::<InterfaceLabels, Gauge>::default();
    for (interface, attached) in &report.interfaces {
        up.get_or_create(&InterfaceLabels {
            interface: interface.clone(),
        })
        .set(i64::from(*attached));
    }
    registry.register(
        "interface_attached",
        "1 while a client-facing interface exists and the programs are attached to it",
        up,
    );
    let local = Gauge::<i64>::default();
    local.set(i64::try_from(report.local_backends.len()).unwrap_or(i64::MAX));
    registry.register(
        "local_backends",
        "Backends behind a veth of this host that the datapath sends to directly (the fast path)",
        local,
    );
    if let Some(docker) = &report.docker {
        let connected = Gauge::<i64>::default();
        connected.set(i64::from(docker.connected));
        registry.register(
            "docker_connected",
            "1 while the Docker follower is connected to dockerd (`docker` set)",
            connected,
        );
    }
    registry.register(
        "build",
        "The portmap build",
        Info::new(vec![("version", env!("CARGO_PKG_VERSION"))]),
    );
}

/// Serves `GET /metrics` on `listener` until the daemon stops; each scrape asks the main loop
/// for a stats report through `requests`. A connection that stalls is dropped after 10 s.
pub async fn serve(listener: TcpListener, requests: mpsc::Sender<Pending>) {
    loop {
        let stream = match listener.accept().await {
            Ok((stream, _)) => stream,
            Err(e) => {
                warn!("metrics: accept failed: {e}");
                tokio::time::sleep(Duration::from_millis(100)).await;
                continue;
            }
        };
        let requests = requests.clone();
        tokio::spawn(async move {
            let service = service_fn(move |request| scrape(request, requests.clone()));
            let conn = http1::Builder::new()
                .timer(TokioTimer::new())
                .header_read_timeout(Duration::from_secs(5))
                .keep_alive(false)
                .serve_connection(TokioIo::new(stream), service);
            let _ = tokio::time::timeout(Duration::from_secs(10), conn).await;
        });
    }
}

async fn scrape(
    request: hyper::Request<hyper::body::Incoming>,
    requests: mpsc::Sender<Pending>,
) -> Result<hyper::Response<Full<Bytes>>, Infallible> {
    let reply = |status: StatusCode, content_type: &str, body: String| {
        let mut response = hyper::Response::new(Full::new(Bytes::from(body)));
        *response.status_mut() = status;
        if let Ok(value) = content_type.parse() {
            response.headers_mut().insert(CONTENT_TYPE, value);
        }
        Ok(response)
    };
    if request.method() != Method::GET || request.uri().path() != "/metrics" {
        return reply(
            StatusCode::NOT_FOUND,
            "text/plain",
            "portmap serves GET /metrics\n".into(),
        );
    }
    let (tx, rx) = oneshot::channel();
    let answer = match requests.send((Request::Stats, tx)).await {
        Ok(()) => rx.await.ok(),
        Err(_) => None,
    };
    match answer.map(|r| match r {
        Response::Stats { stats } => encode(&stats).map_err(|e| e.to_string()),
        Response::Error { message } => Err(message),
        other => Err(format!("unexpected answer {other:?}")),
    }) {
        Some(Ok(text)) => reply(
            StatusCode::OK,
            "application/openmetrics-text; version=1.0.0; charset=utf-8",
            text,
        ),
        Some(Err(message)) => reply(StatusCode::INTERNAL_SERVER_ERROR, "text/plain", message + "\n"),
        None => reply(
            StatusCode::SERVICE_UNAVAILABLE,
            "text/plain",
            "the daemon is stopping\n".into(),
        ),
    }
}

#[cfg(test)]
mod tests {
    use portmap_common::MappingCounters;

    use super::*;
    use crate::api::control::MappingStats;

    #[test]
    fn encodes_mappings_counters_and_tables() {
        let report = StatsReport {
            mappings: vec![MappingStats {
                mapping: crate::model::spec::parse("8080:198.18.1.2:80,198.18.1.3:80").unwrap(),
                counters: MappingCounters {
                    fwd_packets: 10,
                    fwd_bytes: 1000,
                    reply_packets: 8,
                    reply_bytes: 4000,
                    flows: 2,
                },
                drop_denied: 5,
            }],
            counters: vec![("forwarded".into(), 18), ("drop_no_mapping".into(), 3)],
            active_flows: 2,
            flow_capacity: 65_536,
            new_flows: 0,
            new_flow_capacity: 32_768,
            interfaces: vec![("eth0".into(), true), ("eth1".into(), false)],
            local_backends: vec![crate::api::control::LocalBackendReport {
                addr: "198.18.1.2".parse().unwrap(),
                device: "veth1".into(),
                mac: "02:00:00:00:00:02".into(),
            }],
            docker: Some(crate::api::control::DockerStatus {
                url: "unix:///var/run/docker.sock".into(),
                connected: false,
                error: Some("no Docker socket".into()),
            }),
        };
        let text = encode(&report).unwrap();
        let labels =
            r#"protocol="tcp",host_address="0.0.0.0",host_port="8080",backend="198.18.1.2:80,198.18.1.3:80""#;
        for line in [
            format!("portmap_mapping_packets_total{{{labels},direction=\"forward\"}} 10"),
            format!("portmap_mapping_bytes_total{{{labels},direction=\"reply\"}} 4000"),
            format!("portmap_mapping_flows_total{{{labels}}} 2"),
            format!("portmap_mapping_denied_total{{{labels}}} 5"),
            "portmap_datapath_total{counter=\"drop_no_mapping\"} 3".to_string(),
            "portmap_flows{table=\"assured\"} 2".to_string(),
            "portmap_flow_capacity{table=\"new\"} 32768".to_string(),
            "portmap_interface_attached{interface=\"eth1\"} 0".to_string(),
            "portmap_local_backends 1".to_string(),
            "portmap_docker_connected 0".to_string(),
            format!(
                "portmap_build_info{{version=\"{}\"}} 1",
                env!("CARGO_PKG_VERSION")
            ),
        ] {
            assert!(text.lines().any(|l| l == line), "{line} missing from\n{text}");
        }
        assert!(text.ends_with("# EOF\n"), "{text}");
    }
}
