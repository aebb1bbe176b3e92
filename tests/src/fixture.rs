//! The real XDP program loaded into the kernel with maps of its own, driven
//! packet by packet through BPF_PROG_TEST_RUN ([`run_xdp`], which also
//! runs the programs of [`crate::testprogs`]).

use std::{
    net::{Ipv4Addr, Ipv6Addr},
    path::PathBuf,
    sync::atomic::{AtomicU32, Ordering},
};

use aya::programs::{TestRun, TestRunOptions, Xdp};
use lb::{
    datapath::{Datapath, MapSizes, backend_entry, backend_entry6, pin_dir, remove_pins},
    maglev::{MaglevBackend, MaglevTable},
};
use lb_common::{FORWARD_DSR_L2, VipInfo, VipKey, VipKey6, program_names};

pub const XDP_ABORTED: u32 = 0;
pub const XDP_DROP: u32 = 1;
pub const XDP_PASS: u32 = 2;
pub const XDP_TX: u32 = 3;
pub const XDP_REDIRECT: u32 = 4;

/// XDP metadata bytes in front of the frame (none).
const META: usize = 0;

/// The ifindex test_run reports as ingress: the loopback device, which
/// exists in every namespace. Backends "behind" it are reached by XDP_TX.
pub const INGRESS_IFINDEX: u32 = 1;

/// The MAC the fixture gives the egress interface.
pub const LB_MAC: [u8; 6] = [0x02, 0x1b, 0, 0, 0, 0xfe];

/// The outer source address the fixture gives encapsulating backends.
pub const ENCAP_SRC: Ipv4Addr = Ipv4Addr::new(198, 18, 0, 10);

/// The outer IPv6 source address the fixture gives encapsulating IPv6
/// backends.
pub const ENCAP_SRC6: Ipv6Addr = Ipv6Addr::new(0x2001, 2, 0, 0, 0, 0, 0, 10);

/// The GUE port of the fixture's GUE VIPs (not the default, so that a
/// test sees it comes from the VIP entry).
pub const GUE_PORT: u16 = 7777;

/// IPv6 backend `id`'s address.
pub fn backend_addr6(id: u32) -> Ipv6Addr {
    Ipv6Addr::new(0x2001, 2, 0, 1, 0, 0, 0, id as u16)
}

/// Backend `id`'s address.
pub fn backend_addr(id: u32) -> Ipv4Addr {
    Ipv4Addr::new(198, 18, 1, id as u8)
}

pub fn backend_mac(id: u32) -> [u8; 6] {
    let b = id.to_be_bytes();
    [0x02, 0xbe, b[0], b[1], b[2], b[3]]
}

/// Inverse of [`backend_mac`].
pub fn backend_of_mac(mac: &[u8]) -> Option<u32> {
    (mac[0] == 0x02 && mac[1] == 0xbe).then(|| u32::from_be_bytes([mac[2], mac[3], mac[4], mac[5]]))
}

/// A loaded datapath pinned under a directory of its own, removed on drop.
pub struct Fixture {
    pub dp: Datapath,
    dir: PathBuf,
}

pub struct RunResult {
    pub action: u32,
    pub frame: Vec<u8>,
}

impl Fixture {
    pub fn new() -> Self {
        Self::with_sizes(MapSizes {
            max_vips: 4,
            max_backends: 64,
            ring_size: lb_common::DEFAULT_RING_SIZE,
            conntrack_entries: 1 << 16,
            conntrack6_entries: 1 << 16,
            nat_entries: 1024,
            acl_entries: 4096,
        })
    }

    pub fn with_sizes(sizes: MapSizes) -> Self {
        crate::require_root();
        static N: AtomicU32 = AtomicU32::new(0);
        let dir = pin_dir(&format!(
            "test-{}-{}",
            std::process::id(),
            N.fetch_add(1, Ordering::Relaxed)
        ));
        remove_pins(&dir).expect("remove stale pins");
        let dp = Datapath::load(&dir, sizes).expect("load the XDP object");
        Self { dp, dir }
    }

    /// Configures VIP number `index` with `(backend id, weight)` pairs,
    /// forwarded at L2; backend `id` gets MAC `backend_mac(id)` and sits
    /// behind the ingress interface.
    pub fn add_vip(&mut self, index: u32, vip: (Ipv4Addr, u16, u8), backends: &[(u32, u32)]) {
        self.add_vip_forwarding(index, vip, backends, FORWARD_DSR_L2);
    }

    /// [`Fixture::add_vip`] with a forwarding mode (`lb_common::FORWARD_*`):
    /// backend `id` has address [`backend_addr`]`(id)` and outer source
    /// [`ENCAP_SRC`]; a GUE VIP sends to [`GUE_PORT`].
    pub fn add_vip_forwarding(
        &mut self,
        index: u32,
        vip: (Ipv4Addr, u16, u8),
        backends: &[(u32, u32)],
        forwarding: u8,
    ) {
        for &(id, _) in backends {
            self.set_backend4(index, id, forwarding);
        }
        self.add_vip4_entries(index, vip, backends, forwarding);
    }

    /// [`Fixture::add_vip_forwarding`] with IPv6 backends (4in6): backend
    /// `id` has address [`backend_addr6`]`(id)` and outer source
    /// [`ENCAP_SRC6`].
    pub fn add_vip_forwarding_v6_backends(
        &mut self,
        index: u32,
        vip: (Ipv4Addr, u16, u8),
        backends: &[(u32, u32)],
        forwarding: u8,
    ) {
        for &(id, _) in backends {
            self.set_backend6(index, id, forwarding);
        }
        self.add_vip4_entries(index, vip, backends, forwarding);
    }

    /// Writes IPv4 backend `id` of VIP `index` (behind the ingress
    /// interface; with an outer source in a tunnel mode).
    pub fn set_backend4(&mut self, index: u32, id: u32, forwarding: u8) {
        let mut b = backend_entry(
            backend_addr(id),
            INGRESS_IFINDEX,
            index,
            true,
            backend_mac(id),
            LB_MAC,
        );
        if forwarding != FORWARD_DSR_L2 {
            b.encap_src = ENCAP_SRC.to_bits().to_be();
        }
        self.dp.set_backend(id, b).unwrap();
    }

    /// Writes IPv6 backend `id` of VIP `index` (behind the ingress
    /// interface; with an outer source in a tunnel mode).
    pub fn set_backend6(&mut self, index: u32, id: u32, forwarding: u8) {
        let mut b = backend_entry6(
            backend_addr6(id),
            INGRESS_IFINDEX,
            index,
            true,
            backend_mac(id),
            LB_MAC,
        );
        if forwarding != FORWARD_DSR_L2 {
            b.encap_src6 = lb_common::addr6_words(ENCAP_SRC6);
        }
        self.dp.set_backend(id, b).unwrap();
    }

    /// A NAT VIP (`FORWARD_NAT`) number `index` over IPv4 backends whose
    /// service port is `backend_port` (host order); each backend's route
    /// source (the default SNAT address) is [`ENCAP_SRC`].
    pub fn add_nat_vip(
        &mut self,
        index: u32,
        vip: (Ipv4Addr, u16, u8),
        backends: &[(u32, u32)],
        backend_port: u16,
    ) {
        self.add_vip_forwarding(index, vip, backends, lb_common::FORWARD_NAT);
        for &(id, _) in backends {
            self.set_backend_port(id, backend_port);
        }
    }

    /// [`Fixture::add_nat_vip`] for an IPv6 VIP and IPv6 backends (route
    /// source [`ENCAP_SRC6`]).
    pub fn add_nat_vip6(
        &mut self,
        index: u32,
        vip: (Ipv6Addr, u16, u8),
        backends: &[(u32, u32)],
        backend_port: u16,
    ) {
        self.add_vip6(index, vip, backends, lb_common::FORWARD_NAT);
        for &(id, _) in backends {
            self.set_backend_port(id, backend_port);
        }
    }

    /// Sets backend `id`'s port (host order), keeping the rest.
    pub fn set_backend_port(&mut self, id: u32, port: u16) {
        let mut b = self.dp.backend(id).unwrap();
        b.port = port.to_be();
        self.dp.set_backend(id, b).unwrap();
    }

    /// The ring, service entry and address marker of IPv4 VIP `index`.
    fn add_vip4_entries(
        &mut self,
        index: u32,
        vip: (Ipv4Addr, u16, u8),
        backends: &[(u32, u32)],
        forwarding: u8,
    ) {
        let ring_size = self.dp.sizes().ring_size;
        let ring_base = index * ring_size;
        self.write_ring(index, backends);
        let (addr, port, proto) = vip;
        self.dp
            .set_vip(
                VipKey::new(addr.to_bits(), port, proto),
                VipInfo {
                    index,
                    ring_base,
                    ring_size,
                    flags: 0,
                    forwarding,
                    gue_port: GUE_PORT.to_be(),
                },
            )
            .unwrap();
        self.dp
            .set_vip(
                VipKey::addr_only(addr.to_bits()),
                VipInfo {
                    index,
                    ring_base,
                    ring_size,
                    flags: lb_common::VIP_FLAG_ADDR_ONLY,
                    forwarding,
                    gue_port: GUE_PORT.to_be(),
                },
            )
            .unwrap();
    }

    /// The IPv6 [`Fixture::add_vip`]: VIP number `index` at an IPv6
    /// address, forwarded in mode `forwarding`; backend `id` is IPv6
    /// ([`backend_addr6`]) with MAC `backend_mac(id)`, behind the ingress
    /// interface (outer source [`ENCAP_SRC6`] in a tunnel mode). Service
    /// entry and address marker in VIPS6.
    pub fn add_vip6(
        &mut self,
        index: u32,
        vip: (Ipv6Addr, u16, u8),
        backends: &[(u32, u32)],
        forwarding: u8,
    ) {
        let ring_size = self.dp.sizes().ring_size;
        for &(id, _) in backends {
            self.set_backend6(index, id, forwarding);
        }
        self.write_ring(index, backends);
        let (addr, port, proto) = vip;
        let info = |flags| VipInfo {
            index,
            ring_base: index * ring_size,
            ring_size,
            flags,
            forwarding,
            gue_port: GUE_PORT.to_be(),
        };
        self.dp
            .set_vip6(VipKey6::new(addr, port, proto), info(0))
            .unwrap();
        self.dp
            .set_vip6(
                VipKey6::addr_only(addr),
                info(lb_common::VIP_FLAG_ADDR_ONLY),
            )
            .unwrap();
    }

    /// Sets (or clears) on VIP `index`'s address-only entry the flag that
    /// makes lb answer pings to `addr`, as the agent does from the VIPs'
    /// `icmp_echo` settings.
    pub fn set_echo(&mut self, index: u32, addr: Ipv4Addr, on: bool) {
        let ring_size = self.dp.sizes().ring_size;
        let echo = if on { lb_common::VIP_FLAG_ECHO } else { 0 };
        self.dp
            .set_vip(
                VipKey::addr_only(addr.to_bits()),
                VipInfo {
                    index,
                    ring_base: index * ring_size,
                    ring_size,
                    flags: lb_common::VIP_FLAG_ADDR_ONLY | echo,
                    forwarding: FORWARD_DSR_L2,
                    gue_port: GUE_PORT.to_be(),
                },
            )
            .unwrap();
    }

    /// [`Fixture::set_echo`] for an IPv6 VIP address (its marker in VIPS6,
    /// forwarded in mode `forwarding`).
    pub fn set_echo6(&mut self, index: u32, addr: Ipv6Addr, forwarding: u8, on: bool) {
        let ring_size = self.dp.sizes().ring_size;
        let echo = if on { lb_common::VIP_FLAG_ECHO } else { 0 };
        self.dp
            .set_vip6(
                VipKey6::addr_only(addr),
                VipInfo {
                    index,
                    ring_base: index * ring_size,
                    ring_size,
                    flags: lb_common::VIP_FLAG_ADDR_ONLY | echo,
                    forwarding,
                    gue_port: GUE_PORT.to_be(),
                },
            )
            .unwrap();
    }

    /// Writes VIP `index`'s scheduler over `members` (id, weight) as the
    /// agent does: its slots first, then its SCHED element.
    pub fn set_scheduler(
        &mut self,
        index: u32,
        scheduler: lb::sched::Scheduler,
        members: &[(u32, u32)],
    ) {
        let sched = lb::sched::vip_sched(scheduler, members);
        let slots: Vec<_> = sched
            .slots
            .iter()
            .enumerate()
            .map(|(i, s)| (i as u32, *s))
            .collect();
        self.dp.write_sched_slots(index, &slots).unwrap();
        self.dp.set_sched(index, sched.info).unwrap();
    }

    /// Sets VIP `index`'s rate limits as the agent does: RATE_LIMITS, then
    /// the flag of its VIP entries (without it the fast path reads no
    /// limits).
    pub fn set_rate_limits(&mut self, index: u32, limits: lb_common::ratelimit::RateLimits) {
        use lb_common::VIP_FLAG_LIMITS;
        self.dp.set_rate_limits(index, limits).unwrap();
        let flag = if limits.any() { VIP_FLAG_LIMITS } else { 0 };
        let with_flag = |mut info: VipInfo| {
            info.flags = info.flags & !VIP_FLAG_LIMITS | flag;
            info
        };
        for (k, info) in self.dp.vips().unwrap() {
            if info.index == index && !info.is_address_only() {
                self.dp.set_vip(k, with_flag(info)).unwrap();
            }
        }
        for (k, info) in self.dp.vips6().unwrap() {
            if info.index == index && !info.is_address_only() {
                self.dp.set_vip6(k, with_flag(info)).unwrap();
            }
        }
    }

    /// Rewrites VIP `index`'s ring for the given `(backend id, weight)` set.
    pub fn write_ring(&mut self, index: u32, backends: &[(u32, u32)]) {
        let ring_size = self.dp.sizes().ring_size;
        let set: Vec<MaglevBackend> = backends
            .iter()
            .map(|&(id, weight)| MaglevBackend {
                key: id as u64,
                id,
                weight,
            })
            .collect();
        let table = MaglevTable::build(&set, ring_size).unwrap();
        self.dp
            .write_ring(
                index * ring_size,
                table
                    .slots()
                    .iter()
                    .enumerate()
                    .map(|(s, &id)| (s as u32, id)),
            )
            .unwrap();
    }

    /// Runs the balancer once on `frame`.
    pub fn run(&self, frame: &[u8]) -> RunResult {
        self.run_program(program_names::BALANCER, frame)
    }

    pub fn run_program(&self, program: &'static str, frame: &[u8]) -> RunResult {
        self.try_run_program(program, frame)
            .expect("BPF_PROG_TEST_RUN")
    }

    /// Runs the balancer once; the kernel's own refusal is returned, not
    /// unwrapped (it refuses frames shorter than an Ethernet header).
    pub fn try_run(&self, frame: &[u8]) -> Result<RunResult, aya::programs::ProgramError> {
        self.try_run_program(program_names::BALANCER, frame)
    }

    pub fn try_run_program(
        &self,
        program: &'static str,
        frame: &[u8],
    ) -> Result<RunResult, aya::programs::ProgramError> {
        run_xdp(self.dp.program(program), frame)
    }

    pub fn reasons(&self) -> std::collections::BTreeMap<&'static str, u64> {
        self.dp.reason_stats().unwrap()
    }
}

impl Default for Fixture {
    fn default() -> Self {
        Self::new()
    }
}

impl Drop for Fixture {
    fn drop(&mut self) {
        let _ = remove_pins(&self.dir);
    }
}

/// Runs `prog` once on `frame` through BPF_PROG_TEST_RUN, arriving on
/// [`INGRESS_IFINDEX`]; the kernel's own refusal is returned (it refuses
/// frames shorter than an Ethernet header).
pub fn run_xdp(prog: &Xdp, frame: &[u8]) -> Result<RunResult, aya::programs::ProgramError> {
    let mut data_in = vec![0u8; META];
    data_in.extend_from_slice(frame);
    let mut data_out = vec![0u8; data_in.len() + 256];
    let ctx = xdp_md(META as u32, data_in.len() as u32);
    let mut ctx_out = [0u8; 24];
    let r = prog.test_run(TestRunOptions {
        data_in: Some(&data_in),
        data_out: Some(&mut data_out),
        ctx_in: Some(&ctx),
        ctx_out: Some(&mut ctx_out),
        ..TestRunOptions::new()
    })?;
    let out_len = r.data_size_out as usize;
    data_out.truncate(out_len);
    // The output starts at data_meta: strip the metadata again.
    let frame = data_out.get(META..).map(<[u8]>::to_vec).unwrap_or_default();
    Ok(RunResult {
        action: r.return_value,
        frame,
    })
}

/// `struct xdp_md` for ctx_in: data, data_end, data_meta, ingress_ifindex,
/// rx_queue_index, egress_ifindex.
fn xdp_md(data: u32, data_end: u32) -> [u8; 24] {
    let mut b = [0u8; 24];
    for (i, v) in [data, data_end, 0, INGRESS_IFINDEX, 0, 0]
        .into_iter()
        .enumerate()
    {
        b[i * 4..i * 4 + 4].copy_from_slice(&v.to_ne_bytes());
    }
    b
}

/// Counter deltas between two reason snapshots ([`Fixture::reasons`]),
/// only the ones that moved.
pub fn moved(
    before: &std::collections::BTreeMap<&'static str, u64>,
    after: &std::collections::BTreeMap<&'static str, u64>,
) -> std::collections::BTreeMap<&'static str, u64> {
    after
        .iter()
        .filter_map(|(k, v)| {
            let d = v - before.get(k).copied().unwrap_or(0);
            (d != 0).then_some((*k, d))
        })
        .collect()
}

/// Runs every truncation (from 14 bytes up) of `pkt`, a frame to a tunnel
/// VIP whose L2 header is `l2` bytes and IP header `ip_hdr` bytes: never
/// aborted; shorter than the L2 header it passes (`pass_short_frame`),
/// than the IP header too (`pass_malformed`), otherwise it is dropped
/// (`drop_malformed`), exactly that reason counted once; the whole frame
/// is sent on (`XDP_TX`) `overhead` bytes longer.
pub fn assert_truncations_handled(
    f: &Fixture,
    pkt: &[u8],
    l2: usize,
    ip_hdr: usize,
    overhead: usize,
    what: &str,
) {
    for len in 14..=pkt.len() {
        let before = f.reasons();
        let r = f
            .try_run(&pkt[..len])
            .unwrap_or_else(|e| panic!("{what} len {len}: {e:?}"));
        assert_ne!(r.action, XDP_ABORTED, "{what} len {len}");
        let want = if len < l2 {
            Some(("pass_short_frame", XDP_PASS))
        } else if len < l2 + ip_hdr {
            Some(("pass_malformed", XDP_PASS))
        } else if len < pkt.len() {
            Some(("drop_malformed", XDP_DROP))
        } else {
            None
        };
        match want {
            Some((reason, action)) => {
                assert_eq!(r.action, action, "{what} len {len}");
                assert_eq!(
                    moved(&before, &f.reasons()),
                    std::collections::BTreeMap::from([(reason, 1)]),
                    "{what} len {len}"
                );
            }
            None => {
                assert_eq!(r.action, XDP_TX, "{what}");
                assert_eq!(r.frame.len(), pkt.len() + overhead, "{what}");
            }
        }
    }
}

/// Runs `frame` through the balancer, expects PASS with the frame byte for
/// byte untouched and exactly one `reason` counted.
pub fn assert_passed_untouched(f: &Fixture, frame: &[u8], reason: &'static str) {
    let before = f.reasons();
    let r = f.run(frame);
    assert_eq!(r.action, XDP_PASS, "expected XDP_PASS for {reason}");
    assert_eq!(
        r.frame, frame,
        "a passed frame must be byte for byte untouched"
    );
    assert_eq!(
        moved(&before, &f.reasons()),
        std::collections::BTreeMap::from([(reason, 1)])
    );
}

/// Runs `frame` through the balancer, expects DROP and exactly one
/// `reason` counted.
pub fn assert_dropped(f: &Fixture, frame: &[u8], reason: &'static str) {
    let before = f.reasons();
    assert_eq!(
        f.run(frame).action,
        XDP_DROP,
        "expected XDP_DROP for {reason}"
    );
    assert_eq!(
        moved(&before, &f.reasons()),
        std::collections::BTreeMap::from([(reason, 1)])
    );
}
