//! `pm-probe`: one socket operation, run as its own process so that a test can place it in a
//! network namespace and a cgroup (the socket hooks act on processes, not threads). Prints one
//! JSON line: `{"ok":true,...}` or `{"ok":false,"error":KIND,"errno":N}`.
//!
//! ```text
//! pm-probe tcp ADDR                    connect, send "hello\n", half-close, read the reply
//! pm-probe tcp ADDR from SRC           the same from a socket bound to SRC (port 0) first
//! pm-probe udp ADDR connected|unconnected   send "hello\n", receive one answer and its source
//! pm-probe bind tcp|udp ADDR           bind (and listen, for TCP)
//! ```

use std::{
    io::{Read as _, Write as _},
    net::{Shutdown, SocketAddr, TcpListener, TcpStream, UdpSocket},
    time::Duration,
};

use serde_json::{Value, json};

const TIMEOUT: Duration = Duration::from_secs(3);

fn failed(e: &std::io::Error) -> Value {
    json!({"ok": false, "error": format!("{:?}", e.kind()), "errno": e.raw_os_error(), "message": e.to_string()})
}

fn tcp(addr: SocketAddr, from: Option<SocketAddr>) -> std::io::Result<Value> {
    let mut stream: TcpStream = match from {
        None => TcpStream::connect_timeout(&addr, TIMEOUT)?,
        Some(src) => {
            let socket = socket2::Socket::new(
                socket2::Domain::for_address(addr),
                socket2::Type::STREAM,
                Some(socket2::Protocol::TCP),
            )?;
            socket.bind(&src.into())?;
            socket.connect_timeout(&addr.into(), TIMEOUT)?;
            socket.into()
        }
    };
    stream.set_read_timeout(Some(TIMEOUT))?;
    let peer = stream.peer_addr()?;
    stream.write_all(b"hello\n")?;
    stream.shutdown(Shutdown::Write)?;
    let mut reply = Vec::new();
    stream.read_to_end(&mut reply)?;
    Ok(json!({"ok": true, "peer": peer.to_string(), "reply": String::from_utf8_lossy(&reply)}))
}

fn udp(addr: SocketAddr, connected: bool) -> std::io::Result<Value> {
    let any: SocketAddr = if addr.is_ipv6() { "[::]:0" } else { "0.0.0.0:0" }
        .parse()
        .expect("literal");
    let socket = UdpSocket::bind(any)?;
    socket.set_read_timeout(Some(TIMEOUT))?;
    if connected {
        socket.connect(addr)?;
        socket.send(b"hello\n")?;
    } else {
        socket.send_to(b"hello\n", addr)?;
    }
    let mut buf = [0u8; 2048];
    let (n, from) = socket.recv_from(&mut buf)?;
    let peer = if connected {
        Some(socket.peer_addr()?.to_string())
    } else {
        None
    };
    Ok(
        json!({"ok": true, "from": from.to_string(), "peer": peer, "reply": String::from_utf8_lossy(&buf[..n])}),
    )
}

fn bind(proto: &str, addr: SocketAddr) -> std::io::Result<Value> {
    match proto {
        "tcp" => drop(TcpListener::bind(addr)?),
        _ => drop(UdpSocket::bind(addr)?),
    }
    Ok(json!({"ok": true}))
}

/// A runtime's reservation: listens on `addr`, then reports what a second bind of it gets.
fn reserve(addr: SocketAddr) -> std::io::Result<Value> {
    let held = TcpListener::bind(addr)?;
    let second = match TcpListener::bind(addr) {
        Ok(_) => json!({"ok": true}),
        Err(e) => failed(&e),
    };
    drop(held);
    Ok(json!({"ok": true, "second": second}))
}

fn main() {
    let args: Vec<String> = std::env::args().skip(1).collect();
    let parse =
        |s: &str| -> SocketAddr { s.parse().unwrap_or_else(|e| panic!("pm-probe: address {s}: {e}")) };
    let result = match args.iter().map(String::as_str).collect::<Vec<_>>().as_slice() {
        ["tcp", addr] => tcp(parse(addr), None),
        ["tcp", addr, "from", src] => tcp(parse(addr), Some(parse(src))),
        ["udp", addr, mode] => udp(parse(addr), *mode == "connected"),
        ["bind", proto, addr] => bind(proto, parse(addr)),
        ["reserve", addr] => reserve(parse(addr)),
        _ => panic!(
            "pm-probe: usage: tcp ADDR [from SRC] | udp ADDR connected|unconnected | bind tcp|udp ADDR | reserve ADDR"
        ),
    };
    println!("{}", result.unwrap_or_else(|e| failed(&e)));
}
