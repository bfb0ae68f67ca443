//! One netlink request/answer loop for every family the daemon asks (rtnetlink for links,
//! neighbours and routes; sock_diag for listening sockets), and the subscription sockets it
//! watches for changes.

use std::{
    fmt::Debug,
    io,
    os::fd::{AsRawFd, RawFd},
};

use netlink_packet_core::{
    NLM_F_DUMP, NLM_F_REQUEST, NetlinkDeserializable, NetlinkHeader, NetlinkMessage, NetlinkPayload,
    NetlinkSerializable,
};
use netlink_sys::{Socket, SocketAddr};

/// A connected netlink socket of one protocol (`netlink_sys::protocols::*`).
pub struct Netlink {
    socket: Socket,
    seq: u32,
    buf: Vec<u8>,
}

impl Netlink {
    pub fn new(protocol: isize) -> io::Result<Self> {
        let mut socket = Socket::new(protocol)?;
        socket.bind_auto()?;
        socket.connect(&SocketAddr::new(0, 0))?;
        Ok(Self {
            socket,
            seq: 0,
            buf: vec![0; 64 * 1024],
        })
    }

    /// Every object the kernel lists for a dump request (`NLM_F_DUMP`).
    pub fn dump<M>(&mut self, request: M) -> io::Result<Vec<M>>
    where
        M: NetlinkSerializable + NetlinkDeserializable + Debug,
    {
        self.exchange(request, NLM_F_REQUEST | NLM_F_DUMP)
    }

    /// The kernel's one answer to a get request (such as RTM_GETROUTE for an address); an
    /// error answer (no route: ENETUNREACH, ...) is the `Err`.
    pub fn get<M>(&mut self, request: M) -> io::Result<Option<M>>
    where
        M: NetlinkSerializable + NetlinkDeserializable + Debug,
    {
        Ok(self.exchange(request, NLM_F_REQUEST)?.into_iter().next())
    }

    fn exchange<M>(&mut self, request: M, flags: u16) -> io::Result<Vec<M>>
    where
        M: NetlinkSerializable + NetlinkDeserializable + Debug,
    {
        let dump = flags & NLM_F_DUMP != 0;
        self.seq = self.seq.wrapping_add(1);
        let mut header = NetlinkHeader::default();
        header.flags = flags;
        header.sequence_number = self.seq;
        let mut packet = NetlinkMessage::new(header, NetlinkPayload::InnerMessage(request));
        packet.finalize();
        let mut out = vec![0; packet.buffer_len()];
        packet.serialize(&mut out);
        self.socket.send(&out, 0)?;
        let mut answers = Vec::new();
        loop {
            let size = self.socket.recv(&mut &mut self.buf[..], 0)?;
            let mut offset = 0;
            while offset < size {
                let message = <NetlinkMessage<M>>::deserialize(&self.buf[offset..size])
                    .map_err(|e| io::Error::new(io::ErrorKind::InvalidData, e.to_string()))?;
                let length = message.header.length as usize;
                if message.header.sequence_number == self.seq {
                    match message.payload {
                        NetlinkPayload::InnerMessage(m) => {
                            answers.push(m);
                            if !dump {
                                return Ok(answers);
                            }
                        }
                        NetlinkPayload::Done(_) => return Ok(answers),
                        NetlinkPayload::Error(e) => {
                            return match e.code {
                                // An acknowledgement.
                                None => Ok(answers),
                                Some(code) => Err(io::Error::from_raw_os_error(-code.get())),
                            };
                        }
                        _ => {}
                    }
                }
                if length == 0 {
                    break;
                }
                offset += length;
            }
        }
    }
}

/// A netlink socket subscribed to multicast groups (`RTMGRP_*` bits): it becomes readable when
/// the kernel reports a change of what they cover.
pub struct Watch {
    socket: Socket,
}

impl Watch {
    pub fn new(protocol: isize, groups: u32) -> io::Result<Self> {
        let mut socket = Socket::new(protocol)?;
        socket.bind(&SocketAddr::new(0, groups))?;
        socket.set_non_blocking(true)?;
        Ok(Self { socket })
    }

    /// Reads every pending notification; true if there was any.
    pub fn drain(&mut self) -> bool {
        let mut buf = vec![0u8; 16 * 1024];
        let mut any = false;
        // A full receive queue (ENOBUFS) also means "something changed": resync either way.
        loop {
            match self.socket.recv(&mut &mut buf[..], 0) {
                Ok(0) => break,
                Ok(_) => any = true,
                Err(e) if e.raw_os_error() == Some(libc::ENOBUFS) => any = true,
                Err(_) => break,
            }
        }
        any
    }
}

impl AsRawFd for Watch {
    fn as_raw_fd(&self) -> RawFd {
        self.socket.as_raw_fd()
    }
}
