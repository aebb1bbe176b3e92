//! Module of the lb-ebpf binary: full NAT's view of each family (see
//! [`crate::nat`]): the flow key with its NAT maps, its addresses as four
//! words (IPv4: word 0, the rest 0, as NatFwd/NatRev hold them) and the
//! header rewrite.

use aya_ebpf::{bindings::BPF_ANY, programs::XdpContext};
use lb_common::{
    Backend, FlowKey, FlowKey6,
    nat::{
        NAT_CACHE_KEY_WORDS, NatFwd, NatFwdCache, NatRev, NatRevCache, nat_cache_key4,
        nat_cache_key6,
    },
};
use lb_ebpf::rewrite::{Delta, load32, ptr_at, set_addrs4, set_addrs6, set_ports};

use crate::{
    NAT_FWD, NAT_FWD_CACHE, NAT_FWD_CACHE6, NAT_FWD6, NAT_REV, NAT_REV_CACHE, NAT_REV_CACHE6,
    NAT_REV6, steer::Flow,
};

/// Whether two addresses (four words) are equal, word by word: `==` on
/// the arrays can become a byte-wise `memcmp` call in BPF.
#[inline(always)]
pub(crate) fn same_addr(a: &[u32; 4], b: &[u32; 4]) -> bool {
    (a[0] ^ b[0]) | (a[1] ^ b[1]) | (a[2] ^ b[2]) | (a[3] ^ b[3]) == 0
}

/// Copies four words with volatile stores: a plain array copy becomes a
/// byte-wise `memmove` call in BPF.
#[inline(always)]
pub(crate) fn copy4(dst: &mut [u32; 4], src: &[u32; 4]) {
    for i in 0..4 {
        // SAFETY: within `dst`.
        unsafe { core::ptr::write_volatile(&raw mut dst[i], src[i]) };
    }
}

/// Copies a MAC address with volatile stores (see [`copy4`]).
#[inline(always)]
pub(crate) fn copy_mac(dst: &mut [u8; 6], src: [u8; 6]) {
    for i in 0..6 {
        // SAFETY: within `dst`.
        unsafe { core::ptr::write_volatile(&raw mut dst[i], src[i]) };
    }
}

/// A family's flow key with its NAT maps and header rewrite. Addresses
/// travel as four words (IPv4: word 0, the rest 0), as NatFwd/NatRev
/// hold them.
pub(crate) trait NatFlow: Flow + 'static {
    /// Backends of this family carry [`lb_common::BACKEND_FLAG_V6`].
    const V6: bool;
    /// Writes `src:sport → dst:dport` into `self` word by word (a whole
    /// key store can become a memmove call).
    fn set(&mut self, src: &[u32; 4], sport: u16, dst: &[u32; 4], dport: u16, proto: u32);
    fn set_ports(&mut self, sport: u16, dport: u16, proto: u32);
    /// Sets the IP header at `l3`'s addresses (IPv4: its checksum too).
    fn set_addrs(ctx: &XdpContext, l3: usize, src: &[u32; 4], dst: &[u32; 4]) -> Option<Delta>;
    /// Reads the addresses of the IP header at `l3` into `self`.
    fn load_addrs(&mut self, ctx: &XdpContext, l3: usize) -> Option<()>;
    fn src(&self) -> [u32; 4];
    fn dst(&self) -> [u32; 4];
    fn sport(&self) -> u16;
    fn dport(&self) -> u16;
    fn fwd(&self) -> Option<*mut NatFwd>;
    fn insert_fwd(&self, v: &NatFwd) -> Result<(), i32>;
    fn remove_fwd(&self);
    fn rev(&self) -> Option<*mut NatRev>;
    fn insert_rev(&self, v: &NatRev, flags: u64) -> Result<(), i32>;
    fn remove_rev(&self);
    /// The key as the words of a NAT cache slot.
    fn cache_key(&self) -> [u64; NAT_CACHE_KEY_WORDS];
    /// The family's forward and return cache slots (see crate::nat_cache).
    fn fwd_cache(slot: u32) -> Option<*mut NatFwdCache>;
    fn rev_cache(slot: u32) -> Option<*mut NatRevCache>;
    fn backend_addr(b: &Backend) -> [u32; 4];
    /// The address lb's host uses to reach `b` (set by the agent).
    fn route_src(b: &Backend) -> [u32; 4];
    /// Rewrites the IP header at `l3` to `src` → `dst` and the TCP/UDP
    /// header at `l4` to `sport` → `dport`, checksums updated.
    #[expect(clippy::too_many_arguments, reason = "inlined; in registers")]
    fn rewrite(
        ctx: &XdpContext,
        l3: usize,
        l4: usize,
        proto: u8,
        src: &[u32; 4],
        sport: u16,
        dst: &[u32; 4],
        dport: u16,
    ) -> Option<()>;
}

impl NatFlow for FlowKey {
    const V6: bool = false;
    #[inline(always)]
    fn set(&mut self, src: &[u32; 4], sport: u16, dst: &[u32; 4], dport: u16, proto: u32) {
        self.src_addr = src[0];
        self.dst_addr = dst[0];
        self.set_ports(sport, dport, proto);
    }
    #[inline(always)]
    fn set_ports(&mut self, sport: u16, dport: u16, proto: u32) {
        self.src_port = sport;
        self.dst_port = dport;
        self.proto = proto;
    }
    #[inline(always)]
    fn load_addrs(&mut self, ctx: &XdpContext, l3: usize) -> Option<()> {
        let ip: *const [u16; 10] = ptr_at(ctx, l3)?;
        let ip = ip as *const u16;
        // SAFETY: 20 bytes bounds checked.
        unsafe {
            self.src_addr = load32(ip.add(6));
            self.dst_addr = load32(ip.add(8));
        }
        Some(())
    }
    #[inline(always)]
    fn src(&self) -> [u32; 4] {
        [self.src_addr, 0, 0, 0]
    }
    #[inline(always)]
    fn dst(&self) -> [u32; 4] {
        [self.dst_addr, 0, 0, 0]
    }
    #[inline(always)]
    fn sport(&self) -> u16 {
        self.src_port
    }
    #[inline(always)]
    fn dport(&self) -> u16 {
        self.dst_port
    }
    #[inline(always)]
    fn fwd(&self) -> Option<*mut NatFwd> {
        NAT_FWD.get_ptr_mut(self)
    }
    #[inline(always)]
    fn insert_fwd(&self, v: &NatFwd) -> Result<(), i32> {
        NAT_FWD.insert(self, v, BPF_ANY as u64)
    }
    #[inline(always)]
    fn remove_fwd(&self) {
        let _ = NAT_FWD.remove(self);
    }
    #[inline(always)]
    fn rev(&self) -> Option<*mut NatRev> {
        NAT_REV.get_ptr_mut(self)
    }
    #[inline(always)]
    fn insert_rev(&self, v: &NatRev, flags: u64) -> Result<(), i32> {
        NAT_REV.insert(self, v, flags)
    }
    #[inline(always)]
    fn remove_rev(&self) {
        let _ = NAT_REV.remove(self);
    }
    #[inline(always)]
    fn cache_key(&self) -> [u64; NAT_CACHE_KEY_WORDS] {
        nat_cache_key4(self)
    }
    #[inline(always)]
    fn fwd_cache(slot: u32) -> Option<*mut NatFwdCache> {
        NAT_FWD_CACHE.get_ptr_mut(slot)
    }
    #[inline(always)]
    fn rev_cache(slot: u32) -> Option<*mut NatRevCache> {
        NAT_REV_CACHE.get_ptr_mut(slot)
    }
    #[inline(always)]
    fn backend_addr(b: &Backend) -> [u32; 4] {
        [b.addr, 0, 0, 0]
    }
    #[inline(always)]
    fn route_src(b: &Backend) -> [u32; 4] {
        [b.encap_src, 0, 0, 0]
    }
    #[inline(always)]
    fn rewrite(
        ctx: &XdpContext,
        l3: usize,
        l4: usize,
        proto: u8,
        src: &[u32; 4],
        sport: u16,
        dst: &[u32; 4],
        dport: u16,
    ) -> Option<()> {
        let d = set_addrs4(ctx, l3, src[0], dst[0])?;
        set_ports(ctx, l4, proto, sport, dport, d.covered, true).map(|_| ())
    }
    #[inline(always)]
    fn set_addrs(ctx: &XdpContext, l3: usize, src: &[u32; 4], dst: &[u32; 4]) -> Option<Delta> {
        set_addrs4(ctx, l3, src[0], dst[0])
    }
}

impl NatFlow for FlowKey6 {
    const V6: bool = true;
    #[inline(always)]
    fn set(&mut self, src: &[u32; 4], sport: u16, dst: &[u32; 4], dport: u16, proto: u32) {
        copy4(&mut self.src_addr, src);
        copy4(&mut self.dst_addr, dst);
        self.set_ports(sport, dport, proto);
    }
    #[inline(always)]
    fn set_ports(&mut self, sport: u16, dport: u16, proto: u32) {
        self.src_port = sport;
        self.dst_port = dport;
        self.proto = proto;
    }
    #[inline(always)]
    fn load_addrs(&mut self, ctx: &XdpContext, l3: usize) -> Option<()> {
        let ip: *const [u16; 20] = ptr_at(ctx, l3)?;
        let ip = ip as *const u16;
        // SAFETY: 40 bytes bounds checked.
        unsafe {
            for i in 0..4 {
                self.src_addr[i] = load32(ip.add(4 + 2 * i));
                self.dst_addr[i] = load32(ip.add(12 + 2 * i));
            }
        }
        Some(())
    }
    #[inline(always)]
    fn src(&self) -> [u32; 4] {
        self.src_addr
    }
    #[inline(always)]
    fn dst(&self) -> [u32; 4] {
        self.dst_addr
    }
    #[inline(always)]
    fn sport(&self) -> u16 {
        self.src_port
    }
    #[inline(always)]
    fn dport(&self) -> u16 {
        self.dst_port
    }
    #[inline(always)]
    fn fwd(&self) -> Option<*mut NatFwd> {
        NAT_FWD6.get_ptr_mut(self)
    }
    #[inline(always)]
    fn insert_fwd(&self, v: &NatFwd) -> Result<(), i32> {
        NAT_FWD6.insert(self, v, BPF_ANY as u64)
    }
    #[inline(always)]
    fn remove_fwd(&self) {
        let _ = NAT_FWD6.remove(self);
    }
    #[inline(always)]
    fn rev(&self) -> Option<*mut NatRev> {
        NAT_REV6.get_ptr_mut(self)
    }
    #[inline(always)]
    fn insert_rev(&self, v: &NatRev, flags: u64) -> Result<(), i32> {
        NAT_REV6.insert(self, v, flags)
    }
    #[inline(always)]
    fn remove_rev(&self) {
        let _ = NAT_REV6.remove(self);
    }
    #[inline(always)]
    fn cache_key(&self) -> [u64; NAT_CACHE_KEY_WORDS] {
        nat_cache_key6(self)
    }
    #[inline(always)]
    fn fwd_cache(slot: u32) -> Option<*mut NatFwdCache> {
        NAT_FWD_CACHE6.get_ptr_mut(slot)
    }
    #[inline(always)]
    fn rev_cache(slot: u32) -> Option<*mut NatRevCache> {
        NAT_REV_CACHE6.get_ptr_mut(slot)
    }
    #[inline(always)]
    fn backend_addr(b: &Backend) -> [u32; 4] {
        b.addr6
    }
    #[inline(always)]
    fn route_src(b: &Backend) -> [u32; 4] {
        b.encap_src6
    }
    #[inline(always)]
    fn rewrite(
        ctx: &XdpContext,
        l3: usize,
        l4: usize,
        proto: u8,
        src: &[u32; 4],
        sport: u16,
        dst: &[u32; 4],
        dport: u16,
    ) -> Option<()> {
        let d = set_addrs6(ctx, l3, src, dst)?;
        set_ports(ctx, l4, proto, sport, dport, d.covered, true).map(|_| ())
    }
    #[inline(always)]
    fn set_addrs(ctx: &XdpContext, l3: usize, src: &[u32; 4], dst: &[u32; 4]) -> Option<Delta> {
        set_addrs6(ctx, l3, src, dst)
    }
}
