//! IP fragments (Cilium's fragment tracking): only a datagram's first fragment carries the L4
//! header. It is translated like any packet and leaves its ports in `PM_FRAGMENTS`, keyed by the
//! addresses, protocol and identification all fragments share; the fragments that follow find
//! their flow through those ports and get only their addresses rewritten. A later fragment that
//! arrives before its first is left to the kernel (`pass_fragment`).

use portmap_common::{FragKey, FragPorts, Stat};

use crate::{
    ctx::Verdict,
    maps::PM_FRAGMENTS,
    parse::{FRAG_FIRST, FRAG_LATER, Packet},
};

#[inline(always)]
fn key(pkt: &Packet) -> FragKey {
    FragKey {
        src: pkt.saddr,
        dst: pkt.daddr,
        id: pkt.frag_id,
        proto: pkt.proto,
        family: pkt.family,
        _pad: [0; 2],
    }
}

/// Gives a later fragment its first fragment's ports; `pass_fragment` if that was not seen.
#[inline(always)]
pub fn complete(pkt: &mut Packet) -> Result<(), Verdict> {
    if pkt.frag == FRAG_LATER {
        let (sport, dport) = ports(pkt).ok_or(Verdict::pass(Stat::PassFragment))?;
        pkt.sport = sport;
        pkt.dport = dport;
    }
    Ok(())
}

/// After a translated first fragment: its ports, for the rest of the datagram.
#[inline(always)]
pub fn remember(pkt: &Packet) {
    if pkt.frag != FRAG_FIRST {
        return;
    }
    let ports = FragPorts {
        src_port_be: pkt.sport,
        dst_port_be: pkt.dport,
    };
    let _ = PM_FRAGMENTS.insert(key(pkt), ports, 0);
}

/// A later fragment's ports, as its first fragment carried them.
#[inline(always)]
fn ports(pkt: &Packet) -> Option<(u16, u16)> {
    // SAFETY: the value is copied out before any other map operation.
    let p = unsafe { PM_FRAGMENTS.get(key(pkt)) }?;
    Some((p.src_port_be, p.dst_port_be))
}
