//! Raw SCTP packets with their CRC32c: the kernel here has no SCTP module, so tests send and
//! receive SCTP over raw sockets.

use std::net::Ipv4Addr;

use anyhow::{Context as _, ensure};

/// CRC32c (Castagnoli), as SCTP uses it.
const CRC32C: crc::Crc<u32> = crc::Crc::<u32>::new(&crc::CRC_32_ISCSI);

/// An SCTP packet (common header and one INIT chunk carrying `extra`, padded) with its CRC32c,
/// stored as the kernel's `sctp_compute_cksum` does (little-endian).
#[must_use]
pub fn sctp_packet(sport: u16, dport: u16, extra: &[u8]) -> Vec<u8> {
    let params_len = extra.len().div_ceil(4) * 4;
    let mut packet = Vec::with_capacity(32 + params_len);
    packet.extend_from_slice(&sport.to_be_bytes());
    packet.extend_from_slice(&dport.to_be_bytes());
    packet.extend_from_slice(&0u32.to_be_bytes()); // verification tag: 0 in an INIT
    packet.extend_from_slice(&[0; 4]); // checksum, below
    packet.extend_from_slice(&[1, 0]); // INIT, no flags
    packet.extend_from_slice(&u16::try_from(20 + params_len).unwrap_or(u16::MAX).to_be_bytes());
    packet.extend_from_slice(&0x1111_2222u32.to_be_bytes()); // initiate tag
    packet.extend_from_slice(&65_535u32.to_be_bytes()); // a_rwnd
    packet.extend_from_slice(&10u16.to_be_bytes()); // outbound streams
    packet.extend_from_slice(&10u16.to_be_bytes()); // inbound streams
    packet.extend_from_slice(&1u32.to_be_bytes()); // initial TSN
    packet.extend_from_slice(extra);
    packet.resize(32 + params_len, 0);
    let crc = sctp_checksum(&packet);
    packet[8..12].copy_from_slice(&crc);
    packet
}

/// The checksum field an SCTP packet (12 bytes or more) must carry: its CRC32c computed with
/// the field zeroed, little-endian.
#[must_use]
pub fn sctp_checksum(packet: &[u8]) -> [u8; 4] {
    let mut digest = CRC32C.digest();
    digest.update(&packet[..8]);
    digest.update(&[0; 4]);
    digest.update(&packet[12..]);
    digest.finalize().to_le_bytes()
}

/// Whether an SCTP packet's CRC32c verifies.
#[must_use]
pub fn sctp_crc_ok(packet: &[u8]) -> bool {
    packet.len() >= 12 && sctp_checksum(packet) == packet[8..12]
}

/// A raw IPv4 SCTP socket in the calling thread's namespace (works without the kernel's SCTP
/// module: raw sockets take any protocol). Received packets start with the IPv4 header.
pub fn raw_sctp_socket() -> anyhow::Result<std::os::fd::OwnedFd> {
    use nix::sys::socket::{AddressFamily, SockFlag, SockProtocol, SockType, setsockopt, socket, sockopt};
    let fd = socket(
        AddressFamily::Inet,
        SockType::Raw,
        SockFlag::empty(),
        SockProtocol::Sctp,
    )
    .context("raw SCTP socket")?;
    setsockopt(&fd, sockopt::ReceiveTimeout, &nix::sys::time::TimeVal::new(5, 0))?;
    Ok(fd)
}

/// Sends an SCTP packet (the kernel adds the IPv4 header) to `dst`.
pub fn raw_send(fd: &std::os::fd::OwnedFd, dst: Ipv4Addr, packet: &[u8]) -> anyhow::Result<()> {
    use std::os::fd::AsRawFd as _;
    let addr = nix::sys::socket::SockaddrIn::from(std::net::SocketAddrV4::new(dst, 0));
    nix::sys::socket::sendto(fd.as_raw_fd(), packet, &addr, nix::sys::socket::MsgFlags::empty())
        .with_context(|| format!("sending SCTP to {dst}"))?;
    Ok(())
}

/// Receives the next SCTP packet: (source, destination, SCTP bytes).
pub fn raw_recv(fd: &std::os::fd::OwnedFd) -> anyhow::Result<(Ipv4Addr, Ipv4Addr, Vec<u8>)> {
    use std::os::fd::AsRawFd as _;
    let mut buf = vec![0u8; 65_536];
    let n = nix::sys::socket::recv(fd.as_raw_fd(), &mut buf, nix::sys::socket::MsgFlags::empty())
        .context("no SCTP packet within 5 s")?;
    ensure!(n >= 20, "short packet");
    let ihl = usize::from(buf[0] & 0x0f) * 4;
    let addr = |o: usize| Ipv4Addr::new(buf[o], buf[o + 1], buf[o + 2], buf[o + 3]);
    Ok((addr(12), addr(16), buf[ihl..n].to_vec()))
}
