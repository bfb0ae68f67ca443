//! Global counters (`PM_GLOBAL_STATS`, a per-CPU array of u64 indexed by [`Stat`] codes).
//!
//! Each packet the programs see is counted exactly once under the reason it left with (its
//! outcome); events such as a new flow are counted in addition. Code, name and kind of every
//! counter come from one line of the table below, so they cannot drift apart. A counter's code is
//! its index in the pinned array that a later daemon adopts: new counters go at the end.

/// What a counter records.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Kind {
    /// The packet was rewritten and sent on (redirected, handed to the stack, or reverse-NATed).
    Forward,
    /// The packet was passed to the kernel untouched.
    Pass,
    /// The packet was dropped.
    Drop,
    /// Not a packet outcome: counted in addition to one.
    Event,
    /// A socket operation of a host-local client (cgroup hooks), not a packet.
    Socket,
}

macro_rules! stats {
    ($( $(#[$doc:meta])* $variant:ident = $name:literal, $kind:ident; )*) => {
        /// A global counter; its discriminant is its index in `PM_GLOBAL_STATS`.
        #[repr(u32)]
        #[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash)]
        pub enum Stat {
            $( $(#[$doc])* $variant, )*
        }

        impl Stat {
            /// Every counter, in code order (`ALL[i] as usize == i`).
            pub const ALL: [Stat; Stat::COUNT] = [$(Stat::$variant),*];
            /// Number of counters (the size of `PM_GLOBAL_STATS`).
            pub const COUNT: usize = [$($name),*].len();

            /// The name `portmap stats` prints.
            #[must_use]
            pub const fn name(self) -> &'static str {
                match self {
                    $( Stat::$variant => $name, )*
                }
            }

            #[must_use]
            pub const fn kind(self) -> Kind {
                match self {
                    $( Stat::$variant => Kind::$kind, )*
                }
            }
        }
    };
}

stats! {
    /// Client → backend, rewritten and redirected (XDP_REDIRECT / bpf_redirect).
    FwdRedirect = "fwd_redirect", Forward;
    /// Client → backend, rewritten and handed to the kernel's routing (bridge egress, neighbour
    /// not yet resolved, TTL expiring, MTU exceeded, VLAN-tagged ingress, non-redirect device).
    FwdStack = "fwd_stack", Forward;
    /// Client → backend on this host (a container behind a veth), rewritten and sent straight
    /// into the veth from the cached addresses of `PM_LOCAL_BACKENDS`, without a FIB lookup (TC:
    /// `bpf_redirect_peer` into the container's namespace; XDP: a devmap redirect to the veth).
    FwdLocal = "fwd_local", Forward;
    /// Backend → client, source rewritten to the published address (TC egress).
    ReplyNat = "reply_nat", Forward;
    /// Not for portmap: not IPv4/IPv6, not TCP/UDP/SCTP, or an IPv6 routing header.
    PassNotOurs = "pass_not_ours", Pass;
    /// TCP/UDP with no mapping and no flow.
    PassNoMapping = "pass_no_mapping", Pass;
    /// A fragment after the first of a datagram whose first fragment was not seen (it arrived
    /// out of order, or the datagram is not for a mapping): left to the kernel.
    PassFragment = "pass_fragment", Pass;
    /// Truncated TCP/UDP header: left to the kernel (which drops it).
    PassMalformedL4 = "pass_malformed_l4", Pass;
    /// IP header invalid (IPv4: IHL < 5, total length beyond the frame or below the header;
    /// IPv6: payload length beyond the frame).
    DropMalformed = "drop_malformed", Drop;
    /// The route to the backend is unreachable / blackhole / prohibit.
    DropNoRoute = "drop_no_route", Drop;
    /// A flow could not be recorded (conntrack full or insert failure).
    DropCtFull = "drop_ct_full", Drop;
    /// The reply 5-tuple of a new flow is already used by another flow (same client port to two
    /// host ports that lead to the same backend port) that is still open or half-closed, or the
    /// new flow's packet is not a TCP SYN (the place of a flow over at both ends goes to a SYN).
    DropNatClash = "drop_nat_clash", Drop;
    /// A helper or packet store failed (should not happen; kept visible).
    DropError = "drop_error", Drop;
    /// A mapping's Maglev table or backend entry is missing (being replaced by the daemon).
    DropNoBackend = "drop_no_backend", Drop;
    /// New flows recorded in conntrack (counted in addition to the packet's outcome).
    FlowNew = "flow_new", Event;
    /// ICMP or ICMPv6 errors about a flow translated (embedded packet and outer address),
    /// counted in addition to their outcome (`reply_nat` towards the client, `fwd_*` towards the
    /// backend).
    IcmpErrorNat = "icmp_error_nat", Event;
    /// Flows that became assured (copied from `PM_CT_NEW` to `PM_CONNTRACK`).
    FlowAssured = "flow_assured", Event;
    /// An assured flow found `PM_CONNTRACK` full: it stays unassured in `PM_CT_NEW`, which may
    /// shed it.
    CtAssuredFull = "ct_assured_full", Event;
    /// A connect() or sendmsg() of a host-local client translated to a backend.
    SockTranslated = "sock_translated", Socket;
    /// A host-local client addressed a mapping whose Maglev table or backend is missing.
    SockNoBackend = "sock_no_backend", Socket;
    /// A bind() of a published port refused (EPERM) in the host's network namespace.
    SockBindRefused = "sock_bind_refused", Socket;
    /// Backend → client, caught at the backend's own veth (TC ingress of its host side): source
    /// rewritten to the published address and sent straight to the client's device (FIB lookup,
    /// then a redirect, or `bpf_redirect_neigh` while the next hop is unresolved), so that the
    /// host's netfilter never sees it and no masquerade rule rewrites it.
    ReplyRedirect = "reply_redirect", Forward;
    /// A reply at its backend's veth that cannot be sent from there (no route, forwarding off on
    /// the veth, MTU exceeded, TTL expiring, VLAN): left untouched to the kernel, and the
    /// client-facing interface's TC egress reverse-NATs it (`reply_nat`).
    PassReply = "pass_reply", Pass;
    /// A new flow from a source outside its mapping's allow-list (`portmap add --allow`, the
    /// config's `allow`): dropped, and counted per mapping too.
    DropDenied = "drop_denied", Drop;
    /// A connect() or sendmsg() of a host-local client refused (EPERM) by the mapping's
    /// allow-list: the client's address is outside it, or cannot be known (a socket of another
    /// network namespace, a container's, not bound to an address).
    SockDenied = "sock_denied", Socket;
}

impl Stat {
    /// The index of this counter in `PM_GLOBAL_STATS`.
    #[inline(always)]
    #[must_use]
    pub const fn code(self) -> u32 {
        self as u32
    }

    /// The counter with this code, if there is one.
    #[must_use]
    pub fn from_code(code: usize) -> Option<Self> {
        Self::ALL.get(code).copied()
    }

    /// The outcome drops the packet.
    #[must_use]
    pub const fn is_drop(self) -> bool {
        matches!(self.kind(), Kind::Drop)
    }

    /// The counter is a packet's outcome (every packet moves exactly one of these).
    #[must_use]
    pub const fn is_outcome(self) -> bool {
        !matches!(self.kind(), Kind::Event | Kind::Socket)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn codes_are_indices_and_names_are_unique() {
        for (i, s) in Stat::ALL.iter().enumerate() {
            assert_eq!(s.code() as usize, i);
            assert_eq!(Stat::from_code(i), Some(*s));
            assert!(
                s.name().starts_with(match s.kind() {
                    Kind::Forward => "",
                    Kind::Pass => "pass_",
                    Kind::Drop => "drop_",
                    Kind::Event => "",
                    Kind::Socket => "sock_",
                }),
                "{} does not say its kind",
                s.name()
            );
        }
        let mut names: [&str; Stat::COUNT] = Stat::ALL.map(Stat::name);
        names.sort_unstable();
        assert!(names.windows(2).all(|w| w[0] != w[1]));
        assert_eq!(Stat::from_code(Stat::COUNT), None);
    }
}
