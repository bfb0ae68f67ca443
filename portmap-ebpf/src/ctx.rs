//! The one seam between the shared datapath and its two hooks.
//!
//! Parse, conntrack and NAT code is generic over [`PacketCtx`]; only the primitives below differ:
//! both write through bounds-checked pointers and compute the IPv4 header checksum with the
//! RFC 1624 arithmetic of `portmap_common::csum`; XDP updates the TCP/UDP checksum the same way,
//! TC with `bpf_l4_csum_replace`, which also keeps `skb->csum` (CHECKSUM_COMPLETE) and partial
//! checksums (CHECKSUM_PARTIAL, GSO) right.

use core::{ffi::c_void, mem::size_of};

use aya_ebpf::{
    bindings::{BPF_F_MARK_MANGLED_0, BPF_F_PSEUDO_HDR, TC_ACT_OK, TC_ACT_REDIRECT, TC_ACT_SHOT, xdp_action},
    helpers::generated::{bpf_csum_update, bpf_redirect, bpf_redirect_peer},
    programs::{TcContext, XdpContext},
};
use portmap_common::{Stat, csum};

use crate::maps::{PM_ICMP_TC, PM_ICMP_XDP, PM_LOCAL_DEVS, PM_REDIRECT_DEVS};

/// A primitive failed (a bounds check or a helper): the packet is dropped and counted.
#[derive(Clone, Copy)]
pub struct StoreError;

/// What the datapath decided for a packet; each hook turns it into its own return code.
#[derive(Clone, Copy)]
pub enum Action {
    Pass,
    Drop,
    /// `PacketCtx::redirect` accepted the packet; carries the hook's return code.
    Redirected(u32),
}

/// A packet's outcome: the counter it is recorded under and what happens to it.
#[derive(Clone, Copy)]
pub struct Verdict {
    pub stat: Stat,
    pub action: Action,
}

impl Verdict {
    #[inline(always)]
    pub fn pass(stat: Stat) -> Self {
        Self {
            stat,
            action: Action::Pass,
        }
    }

    #[inline(always)]
    pub fn drop(stat: Stat) -> Self {
        Self {
            stat,
            action: Action::Drop,
        }
    }
}

/// How an L4 checksum update is applied.
#[derive(Clone, Copy)]
pub struct L4Csum {
    /// The changed field is part of the pseudo-header (an IP address), not of the L4 segment.
    pub pseudo: bool,
    /// UDP: a checksum of 0 means "none" and stays 0; a result of 0 is sent as 0xffff.
    pub udp: bool,
}

/// A translation's change to a TCP/UDP (or ICMPv6) checksum, applied in one go
/// (`PacketCtx::l4_csum_nat`).
#[derive(Clone, Copy)]
pub struct L4Nat {
    /// The pseudo-header's addresses changed by this (a `csum::add_change` accumulator;
    /// `None`: unchanged).
    pub addr_diff: Option<u64>,
    /// A port of the segment changed from `.0` to `.1` (`None`: kept).
    pub port: Option<(u16, u16)>,
    /// UDP: a checksum of 0 means "none" and stays 0; a result of 0 is sent as 0xffff.
    pub udp: bool,
    /// The addresses are IPv6 ones (no header checksum makes up for their change).
    pub v6: bool,
    /// The packet may be CHECKSUM_PARTIAL (`nat::may_be_partial`): only the kernel can apply
    /// the change. Otherwise its field is a full checksum, which arithmetic can.
    pub maybe_partial: bool,
}

/// The full checksum `check` after `change` (RFC 1624 arithmetic, both differences at once).
#[inline(always)]
fn full_l4_update(check: u16, change: &L4Nat) -> u16 {
    let update = |check: u16| {
        let check = change
            .addr_diff
            .map_or(check, |diff| csum::apply_change(check, diff));
        change
            .port
            .map_or(check, |(from, to)| csum::replace2(check, from, to))
    };
    if change.udp {
        csum::udp_mangled(check, update)
    } else {
        update(check)
    }
}

/// `EbpfContext` gives aya-log (and helpers) the raw context.
pub trait PacketCtx: aya_ebpf::EbpfContext {
    fn data(&self) -> usize;
    fn data_end(&self) -> usize;
    /// Length of the whole packet from the Ethernet header on (an skb may be longer than its
    /// linear part, `data_end - data`).
    fn packet_len(&self) -> usize;
    /// The interface the hook runs on (the packet's ingress device for XDP and TC ingress).
    fn hook_ifindex(&self) -> u32;
    /// The VLAN tag was stripped into metadata (skb only): forwarding is left to the kernel.
    fn vlan_offloaded(&self) -> bool;
    /// Tail-calls this ingress hook's ICMP-error program; returns only if the slot is empty.
    /// Tail-calls this hook's ICMP-error program in `slot` (`ICMP_SLOT_INGRESS`, or TC's
    /// `ICMP_SLOT_EGRESS`); returns only if the slot is empty.
    fn tail_call_icmp(&self, slot: u32);
    /// The raw context pointer for helpers that take it (`bpf_fib_lookup`).
    fn raw(&self) -> *mut c_void;
    /// `tot_len` for `bpf_fib_lookup`'s MTU check, given the packet's IPv4 total length.
    fn fib_tot_len(&self, ip_tot_len: u16) -> u16;
    /// A GSO super-packet (always CHECKSUM_PARTIAL): an skb with `gso_size` set.
    fn gso(&self) -> bool;

    fn store<T: Copy>(&mut self, off: usize, v: T) -> Result<(), StoreError>;
    /// `check_off` holds the IPv4 header checksum; a `size`-byte field changed `from` → `to`.
    fn l3_csum_replace(&mut self, check_off: usize, from: u32, to: u32, size: u8) -> Result<(), StoreError>;
    /// `check_off` holds the TCP/UDP checksum; a `size`-byte field changed `from` → `to`.
    fn l4_csum_replace(
        &mut self,
        check_off: usize,
        from: u32,
        to: u32,
        size: u8,
        how: L4Csum,
    ) -> Result<(), StoreError>;
    /// A translation's L4 checksum update in one go: `check_off` holds the checksum `change`
    /// applies to.
    fn l4_csum_nat(&mut self, check_off: usize, change: L4Nat) -> Result<(), StoreError>;

    /// Asks the kernel to send the packet out of `ifindex` once the program returns, and gives
    /// the hook's return code for that; `None` if this hook cannot redirect there. The packet may
    /// still be written afterwards (the helpers only record the target).
    fn redirect(&mut self, ifindex: u32) -> Option<u32>;
    /// As `redirect`, into the host side `ifindex` of a veth whose peer holds the destination:
    /// TC delivers into the peer (its namespace's ingress) at once.
    fn redirect_local(&mut self, ifindex: u32) -> Option<u32>;
    fn verdict(&self, action: Action) -> u32;
}

/// Returns a pointer to a `T` at `off` if it lies entirely inside the packet's linear data.
/// The one bounds check of the datapath: [`load`] reads through it, `PacketCtx::store` writes.
#[inline(always)]
pub fn ptr_at<C: PacketCtx, T>(ctx: &C, off: usize) -> Option<*mut T> {
    let start = ctx.data();
    if start + off + size_of::<T>() > ctx.data_end() {
        return None;
    }
    Some((start + off) as *mut T)
}

/// Writes `v` at `off` straight into the packet (bounds checked).
#[inline(always)]
fn direct_store<C: PacketCtx, T: Copy>(ctx: &C, off: usize, v: T) -> Result<(), StoreError> {
    let p = ptr_at::<_, T>(ctx, off).ok_or(StoreError)?;
    // SAFETY: bounds checked by ptr_at; the linear data of an XDP frame or a TC skb is
    // writable (for TC, made so by the verifier's prologue).
    unsafe { p.write_unaligned(v) };
    Ok(())
}

/// RFC 1624 update of the 16-bit checksum at `check_off` for a `size`-byte (2 or 4) field that
/// changed from `from` to `to`, in place.
#[inline(always)]
fn direct_l3_csum_replace<C: PacketCtx>(
    ctx: &C,
    check_off: usize,
    from: u32,
    to: u32,
    size: u8,
) -> Result<(), StoreError> {
    let p = ptr_at::<_, u16>(ctx, check_off).ok_or(StoreError)?;
    // SAFETY: as in `direct_store`.
    unsafe {
        let check = p.read_unaligned();
        let new = if size == 2 {
            csum::replace2(check, from as u16, to as u16)
        } else {
            csum::replace4(check, from, to)
        };
        p.write_unaligned(new);
    }
    Ok(())
}

/// Copies the `T` at `off` out of the packet, if it lies entirely inside the linear data (for
/// small values: a few header bytes).
#[inline(always)]
pub fn load<C: PacketCtx, T: Copy>(ctx: &C, off: usize) -> Option<T> {
    Header::<T>::at(ctx, off).map(|h| h.read(|t| t))
}

/// A header of type `T` checked to lie inside the packet's linear data, read one field at a
/// time: no copy of the whole header onto the 512-byte BPF stack. Header types of
/// `network_types` have alignment 1, so any offset is aligned for them.
#[derive(Clone, Copy)]
pub struct Header<T> {
    ptr: *const T,
}

impl<T> Header<T> {
    #[inline(always)]
    pub fn at<C: PacketCtx>(ctx: &C, off: usize) -> Option<Self> {
        ptr_at::<C, T>(ctx, off).map(|p| Self { ptr: p.cast_const() })
    }

    /// One field (or the whole header, for small ones) of the header.
    #[inline(always)]
    pub fn read<F: Copy>(&self, field: impl FnOnce(&T) -> &F) -> F {
        // SAFETY: `at` checked that the whole T lies within the packet, which stays valid and in
        // place for the program's run; read_unaligned as packet headers promise no alignment.
        unsafe { core::ptr::from_ref(field(&*self.ptr)).read_unaligned() }
    }
}

impl PacketCtx for XdpContext {
    #[inline(always)]
    fn tail_call_icmp(&self, slot: u32) {
        // SAFETY: a tail call to an XDP program of the same hook; control only returns if the
        // slot is empty.
        unsafe { PM_ICMP_XDP.tail_call(self, slot) };
    }
    #[inline(always)]
    fn data(&self) -> usize {
        XdpContext::data(self)
    }
    #[inline(always)]
    fn data_end(&self) -> usize {
        XdpContext::data_end(self)
    }
    #[inline(always)]
    fn packet_len(&self) -> usize {
        // Volatile loads: otherwise LLVM derives "the L4 header is in bounds" from the IPv4
        // total-length check and deletes the bounds check the verifier needs.
        // SAFETY: the context pointer is valid for the program's lifetime.
        unsafe {
            let end = core::ptr::read_volatile(&raw const (*self.ctx).data_end);
            let start = core::ptr::read_volatile(&raw const (*self.ctx).data);
            end.wrapping_sub(start) as usize
        }
    }
    #[inline(always)]
    fn hook_ifindex(&self) -> u32 {
        XdpContext::ingress_ifindex(self) as u32
    }
    #[inline(always)]
    fn vlan_offloaded(&self) -> bool {
        false
    }
    #[inline(always)]
    fn raw(&self) -> *mut c_void {
        self.ctx.cast()
    }
    #[inline(always)]
    fn fib_tot_len(&self, ip_tot_len: u16) -> u16 {
        ip_tot_len
    }
    #[inline(always)]
    fn gso(&self) -> bool {
        false
    }

    #[inline(always)]
    fn store<T: Copy>(&mut self, off: usize, v: T) -> Result<(), StoreError> {
        direct_store(self, off, v)
    }

    #[inline(always)]
    fn l3_csum_replace(&mut self, check_off: usize, from: u32, to: u32, size: u8) -> Result<(), StoreError> {
        direct_l3_csum_replace(self, check_off, from, to, size)
    }

    #[inline(always)]
    fn l4_csum_replace(
        &mut self,
        check_off: usize,
        from: u32,
        to: u32,
        size: u8,
        how: L4Csum,
    ) -> Result<(), StoreError> {
        let p = ptr_at::<_, u16>(self, check_off).ok_or(StoreError)?;
        let update = |check: u16| {
            if size == 2 {
                csum::replace2(check, from as u16, to as u16)
            } else {
                csum::replace4(check, from, to)
            }
        };
        // SAFETY: bounds checked by ptr_at; XDP packet memory is writable.
        unsafe {
            let check = p.read_unaligned();
            let new = if how.udp {
                csum::udp_mangled(check, update)
            } else {
                update(check)
            };
            p.write_unaligned(new);
        }
        Ok(())
    }

    /// RFC 1624 arithmetic: both changes applied to the field at once.
    #[inline(always)]
    fn l4_csum_nat(&mut self, check_off: usize, change: L4Nat) -> Result<(), StoreError> {
        let p = ptr_at::<_, u16>(self, check_off).ok_or(StoreError)?;
        // SAFETY: bounds checked by ptr_at; XDP packet memory is writable.
        unsafe { p.write_unaligned(full_l4_update(p.read_unaligned(), &change)) };
        Ok(())
    }

    #[inline(always)]
    fn redirect(&mut self, ifindex: u32) -> Option<u32> {
        // XDP_REDIRECT only works into devices that implement ndo_xdp_xmit (not bridges) and, for
        // a veth, whose peer has NAPI (an XDP program or GRO): the daemon lists those. One devmap
        // lookup: bpf_redirect_map fails when the device is not listed.
        PM_REDIRECT_DEVS.redirect(ifindex, 0).ok()
    }

    #[inline(always)]
    fn redirect_local(&mut self, ifindex: u32) -> Option<u32> {
        // The veth's host side: XDP frames go through its ndo_xdp_xmit to the peer, under the
        // same conditions as any redirect (listed, peer with NAPI).
        self.redirect(ifindex)
    }

    #[inline(always)]
    fn verdict(&self, action: Action) -> u32 {
        match action {
            Action::Pass => xdp_action::XDP_PASS,
            Action::Drop => xdp_action::XDP_DROP,
            Action::Redirected(code) => code,
        }
    }
}

impl PacketCtx for TcContext {
    #[inline(always)]
    fn tail_call_icmp(&self, slot: u32) {
        // SAFETY: a tail call to a TC program of the same hook; control only returns if the slot
        // is empty.
        unsafe { PM_ICMP_TC.tail_call(self, slot) };
    }
    #[inline(always)]
    fn data(&self) -> usize {
        TcContext::data(self)
    }
    #[inline(always)]
    fn data_end(&self) -> usize {
        TcContext::data_end(self)
    }
    #[inline(always)]
    fn packet_len(&self) -> usize {
        self.len() as usize
    }
    #[inline(always)]
    fn hook_ifindex(&self) -> u32 {
        // SAFETY: the __sk_buff the kernel passed in is valid for the program's run.
        unsafe { (*self.skb.skb).ifindex }
    }
    #[inline(always)]
    fn vlan_offloaded(&self) -> bool {
        // SAFETY: the __sk_buff the kernel passed in is valid for the program's run.
        unsafe { (*self.skb.skb).vlan_present != 0 }
    }
    #[inline(always)]
    fn raw(&self) -> *mut c_void {
        self.skb.skb.cast()
    }
    #[inline(always)]
    fn gso(&self) -> bool {
        // SAFETY: the __sk_buff the kernel passed in is valid for the program's run.
        unsafe { (*self.skb.skb).gso_size != 0 }
    }
    #[inline(always)]
    fn fib_tot_len(&self, ip_tot_len: u16) -> u16 {
        // A GSO super-packet: 0, the helper checks the skb itself, GSO-aware (it is forwardable
        // if its segments fit the egress device's MTU); its tot_len would always exceed it.
        // Any other packet: its length, so that a route MTU below the device's applies too and
        // a too-big packet gets FRAG_NEEDED (the kernel then fragments it or sends the ICMP
        // error) instead of being dropped after the redirect.
        if self.gso() { 0 } else { ip_tot_len }
    }

    /// A direct write: the verifier's prologue of a TC program that writes packet data unclones
    /// a cloned skb first, as `bpf_skb_store_bytes` would, and no store here touches
    /// `skb->csum` (the L4 checksum helper below keeps it).
    #[inline(always)]
    fn store<T: Copy>(&mut self, off: usize, v: T) -> Result<(), StoreError> {
        direct_store(self, off, v)
    }

    /// The IPv4 header checksum is never offloaded (no CHECKSUM_PARTIAL covers it) and a field
    /// changed with its checksum leaves the header's sum, which `skb->csum` of a
    /// CHECKSUM_COMPLETE skb includes, unchanged: computed here, as for XDP, without a helper call.
    #[inline(always)]
    fn l3_csum_replace(&mut self, check_off: usize, from: u32, to: u32, size: u8) -> Result<(), StoreError> {
        direct_l3_csum_replace(self, check_off, from, to, size)
    }

    #[inline(always)]
    fn l4_csum_replace(
        &mut self,
        check_off: usize,
        from: u32,
        to: u32,
        size: u8,
        how: L4Csum,
    ) -> Result<(), StoreError> {
        let mut flags = u64::from(size);
        if how.pseudo {
            flags |= u64::from(BPF_F_PSEUDO_HDR);
        }
        if how.udp {
            flags |= u64::from(BPF_F_MARK_MANGLED_0);
        }
        TcContext::l4_csum_replace(self, check_off, u64::from(from), u64::from(to), flags)
            .map_err(|_| StoreError)
    }

    /// Only a CHECKSUM_PARTIAL skb needs the kernel's `bpf_l4_csum_replace` (its field holds the
    /// pseudo-header's sum, which the address change moves the other way and the port's not at
    /// all), and that helper costs ~60 ns of a packet in `test_run` on the benchmark's machine.
    /// A packet that cannot be one (`L4Nat::maybe_partial`) has a full checksum, which takes the
    /// arithmetic XDP uses. Either way, a CHECKSUM_COMPLETE skb then has `skb->csum` corrected
    /// by `bpf_csum_update`, a helper that only adds (`csum::complete_correction`).
    #[inline(always)]
    fn l4_csum_nat(&mut self, check_off: usize, change: L4Nat) -> Result<(), StoreError> {
        let check = load::<_, u16>(self, check_off).ok_or(StoreError)?;
        // UDP without a checksum: BPF_F_MARK_MANGLED_0 would leave it alone too.
        if change.udp && check == 0 {
            return Ok(());
        }
        let by_kernel = change.maybe_partial;
        if by_kernel {
            l4_csum_nat_by_kernel(self, check_off, check, &change)?;
        } else {
            direct_store(self, check_off, full_l4_update(check, &change))?;
        }
        let correction = csum::complete_correction(change.addr_diff, change.v6, by_kernel);
        if correction != 0 {
            // SAFETY: the __sk_buff the kernel passed in; the helper only adds to skb->csum
            // (-ENOTSUPP, ignored, unless the skb is CHECKSUM_COMPLETE).
            let _ = unsafe { bpf_csum_update(self.skb.skb, correction) };
        }
        Ok(())
    }

    #[inline(always)]
    fn redirect(&mut self, ifindex: u32) -> Option<u32> {
        // bpf_redirect() of an skb works into any device, bridges included (br_dev_xmit).
        // SAFETY: a helper without pointer arguments; TC_ACT_REDIRECT on success, TC_ACT_SHOT on
        // bad flags.
        let code = unsafe { bpf_redirect(ifindex, 0) } as u32;
        (code == TC_ACT_REDIRECT as u32).then_some(code)
    }

    #[inline(always)]
    fn redirect_local(&mut self, ifindex: u32) -> Option<u32> {
        // The veth still exists (the kernel removed it from the devmap otherwise): a redirect to
        // a device that is gone would drop the packet.
        PM_LOCAL_DEVS.get(ifindex)?;
        // bpf_redirect_peer() (kernel >= 5.10; from TC ingress, which is where the datapath runs):
        // the skb enters the veth peer's namespace in this softirq, without the veth's transmit,
        // the per-CPU backlog and a second round of the receive path.
        // SAFETY: a helper without pointer arguments; TC_ACT_REDIRECT on success, TC_ACT_SHOT on
        // bad flags.
        let code = unsafe { bpf_redirect_peer(ifindex, 0) } as u32;
        (code == TC_ACT_REDIRECT as u32).then_some(code)
    }

    #[inline(always)]
    fn verdict(&self, action: Action) -> u32 {
        match action {
            Action::Pass => TC_ACT_OK as u32,
            Action::Drop => TC_ACT_SHOT as u32,
            Action::Redirected(code) => code,
        }
    }
}

/// `PacketCtx::l4_csum_nat` by the kernel, for a skb that may be CHECKSUM_PARTIAL: one
/// `bpf_l4_csum_replace` of the addresses' difference (size 0, `BPF_F_PSEUDO_HDR`), which
/// alone knows how to apply it. Read back, the field shows which way it went
/// (`csum::applied`): a full checksum takes the port's change here, as the helper would (the
/// field and the port move `skb->csum` by opposite amounts), a partial one never does; when
/// that cannot be told, the port takes its own helper call. `skb->csum` is left to
/// `csum::complete_correction`.
#[inline(always)]
fn l4_csum_nat_by_kernel(
    ctx: &mut TcContext,
    check_off: usize,
    check: u16,
    change: &L4Nat,
) -> Result<(), StoreError> {
    let mangled = if change.udp {
        u64::from(BPF_F_MARK_MANGLED_0)
    } else {
        0
    };
    let mut port_left = change.port;
    if let Some(diff) = change.addr_diff {
        // Size 0: `to` is the difference itself (`from` must be 0).
        let flags = u64::from(BPF_F_PSEUDO_HDR) | mangled;
        let diff32 = csum::fold32(diff);
        TcContext::l4_csum_replace(ctx, check_off, 0, u64::from(diff32), flags).map_err(|_| StoreError)?;
        if let Some((from, to)) = change.port {
            let after = load::<_, u16>(ctx, check_off).ok_or(StoreError)?;
            match csum::applied(check, after, diff) {
                csum::Applied::Full => {
                    let new = csum::replace2(after, from, to);
                    let new = if change.udp && new == 0 { 0xffff } else { new };
                    direct_store(ctx, check_off, new)?;
                    port_left = None;
                }
                csum::Applied::Partial => port_left = None,
                csum::Applied::Unknown => {}
            }
        }
    }
    if let Some((from, to)) = port_left {
        TcContext::l4_csum_replace(ctx, check_off, u64::from(from), u64::from(to), 2 | mangled)
            .map_err(|_| StoreError)?;
    }
    Ok(())
}
