//! A flood of spoofed TCP flows (tests/syn_flood.rs, the benchmark's flood measurement).

use std::{
    net::Ipv4Addr,
    os::fd::{AsRawFd as _, FromRawFd as _, OwnedFd},
};

use anyhow::ensure;

use crate::Netns;

/// Sends `count` spoofed flows, a TCP SYN and then an ACK each, to `dst`:`port` from sources in
/// 198.19.0.0/16 (the benchmark range, routed nowhere) through a raw socket of `ns`; returns how
/// many packets were sent.
pub fn spoofed_flood(ns: &Netns, dst: Ipv4Addr, port: u16, count: u32) -> anyhow::Result<u32> {
    ns.run(move || {
        // SAFETY: socket(2) with constant arguments; the fd is owned below.
        let fd = unsafe { libc::socket(libc::AF_INET, libc::SOCK_RAW, libc::IPPROTO_RAW) };
        ensure!(fd >= 0, "raw socket: {}", std::io::Error::last_os_error());
        // SAFETY: a new descriptor nothing else owns.
        let socket = unsafe { OwnedFd::from_raw_fd(fd) };
        let to = libc::sockaddr_in {
            sin_family: libc::AF_INET as libc::sa_family_t,
            sin_port: 0,
            sin_addr: libc::in_addr {
                s_addr: u32::from_ne_bytes(dst.octets()),
            },
            sin_zero: [0; 8],
        };
        let mut sent = 0;
        let mut packet = Vec::with_capacity(64);
        for i in 0..2 * count {
            let flow = i / 2;
            let src = [198, 19, (flow >> 8) as u8, flow as u8];
            let tcp = etherparse::PacketBuilder::ipv4(src, dst.octets(), 64).tcp(
                1024 + (flow % 50_000) as u16,
                port,
                flow,
                64_240,
            );
            packet.clear();
            if i % 2 == 0 {
                tcp.syn().write(&mut packet, &[])?;
            } else {
                tcp.ack(1).write(&mut packet, &[])?;
            }
            // SAFETY: `packet` and `to` are valid for the sizes passed.
            let n = unsafe {
                libc::sendto(
                    socket.as_raw_fd(),
                    packet.as_ptr().cast(),
                    packet.len(),
                    0,
                    (&raw const to).cast(),
                    size_of::<libc::sockaddr_in>() as libc::socklen_t,
                )
            };
            if n > 0 {
                sent += 1;
            }
        }
        Ok(sent)
    })
}
