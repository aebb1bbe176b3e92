//! The test and benchmark XDP programs (crate lb-ebpf-testprogs, built by
//! this crate's build.rs), kept out of lb's production object:
//!
//! - `lb_floor`: parses Ethernet, IPv4 and TCP with the balancer's helpers,
//!   swaps MACs, `XDP_TX`: the per-packet floor the balancer is compared
//!   against;
//! - `lb_return`: returns `XDP_PASS`: the fixed cost of one
//!   BPF_PROG_TEST_RUN call, and the program a veth peer needs to receive
//!   frames sent by XDP (it makes the peer run NAPI);
//! - `lb_gen_tx`: the end-to-end benchmark's live-frames generator, which
//!   rewrites every frame's headers from a template and returns `XDP_TX`;
//! - `lb_sink`: counts and drops the end-to-end benchmark's flood (plain,
//!   IP-in-IP or GUE), passes everything else;
//! - `lb_ref_fwd`: the end-to-end benchmark's reference forwarder (parse,
//!   one VIP, a backend by a fixed hash, MACs rewritten, `XDP_TX`; see
//!   [`TestProgs::set_ref_forward`]);
//! - `lb_restore`: puts the frame back as it was (length, first 64 bytes)
//!   and tail-calls a target program, so that `repeat` can time programs
//!   that push or strip headers (see [`TestProgs::set_restore`]).

use anyhow::{Context, Result, ensure};
use aya::{
    Ebpf, EbpfLoader,
    maps::{Array, PerCpuArray, ProgramArray},
    programs::{ProgramFd, Xdp, XdpMode, xdp::XdpLinkId},
};

use crate::fixture::{RunResult, run_xdp};

static OBJECT: &[u8] = aya::include_bytes_aligned!(concat!(env!("OUT_DIR"), "/lb-ebpf-testprogs"));

/// The per-packet floor.
pub const FLOOR: &str = "lb_floor";
/// The live-frames generator.
pub const GEN_TX: &str = "lb_gen_tx";
/// Returns `XDP_PASS` and nothing else.
pub const RETURN_ONLY: &str = "lb_return";
/// Restores the frame, then tail-calls its target.
pub const RESTORE: &str = "lb_restore";
/// Counts and drops a flood (see [`TestProgs::set_sink_ports`]).
pub const SINK: &str = "lb_sink";

/// The reference forwarder (see [`TestProgs::set_ref_forward`]).
pub const REF_FWD: &str = "lb_ref_fwd";

const PROGRAMS: [&str; 6] = [FLOOR, GEN_TX, RETURN_ONLY, RESTORE, SINK, REF_FWD];
const REF_FORWARD: &str = "REF_FORWARD";
/// Next hops `lb_ref_fwd` picks from, at most.
pub const REF_MAX_BACKENDS: usize = 4;

/// `lb_ref_fwd`'s configuration (one element of REF_FORWARD).
#[repr(C)]
#[derive(Clone, Copy)]
struct RefForward {
    vip: u32,
    port: u16,
    proto: u8,
    count: u8,
    src_mac: [u8; 6],
    _pad: [u8; 2],
    dst_macs: [[u8; 6]; REF_MAX_BACKENDS],
}

// SAFETY: #[repr(C)], integers only, no padding (40 bytes).
unsafe impl aya::Pod for RefForward {}
const SINK_PORTS: &str = "SINK_PORTS";
const SINK_COUNT: &str = "SINK_COUNT";
/// `lb_restore`'s frame (one [`RestoreFrame`]) and target (a program
/// array of one).
const RESTORE_FRAME: &str = "RESTORE_FRAME";
const RESTORE_TARGET: &str = "RESTORE_TARGET";
/// `lb_restore`'s fresh-source counter (see [`TestProgs::set_fresh`]).
const RESTORE_FRESH: &str = "RESTORE_FRESH";
/// Bytes of the frame's start `lb_restore` rewrites.
pub const RESTORE_BYTES: usize = 64;

/// `lb_restore`'s view of the frame: its length and first 64 bytes.
#[repr(C)]
#[derive(Clone, Copy)]
struct RestoreFrame {
    len: u64,
    head: [u64; RESTORE_BYTES / 8],
}

// SAFETY: #[repr(C)], integers only, no padding.
unsafe impl aya::Pod for RestoreFrame {}
/// `lb_gen_tx`'s frame template: one [`GenTemplate`].
const GEN_TEMPLATE: &str = "GEN_TEMPLATE";
/// Bytes `lb_gen_tx` stamps on an IPv4 frame (Ethernet + IPv4 + UDP
/// headers are 42) and on an IPv6 one (62).
pub const GEN_TEMPLATE_BYTES_V4: usize = 48;
pub const GEN_TEMPLATE_BYTES_V6: usize = 64;

/// `lb_gen_tx`'s view of the template: how many bytes to write (0 =
/// unset) and the bytes.
#[repr(C)]
#[derive(Clone, Copy)]
struct GenTemplate {
    len: u64,
    head: [u64; GEN_TEMPLATE_BYTES_V6 / 8],
}

// SAFETY: #[repr(C)], integers only, no padding.
unsafe impl aya::Pod for GenTemplate {}

/// The loaded programs, with their one map (not pinned). Dropping this
/// detaches what [`TestProgs::attach`] attached.
pub struct TestProgs {
    ebpf: Ebpf,
}

/// The test programs loaded with `lb_return_only` attached (native mode)
/// to `port` in `ns`: what a veth peer needs so that frames lb sends out
/// of its end with XDP_TX or a redirect arrive. Detached when dropped.
pub fn return_only_on(ns: &crate::netns::Netns, port: &str) -> Result<TestProgs> {
    let port = port.to_owned();
    ns.run(move || -> Result<_> {
        let mut progs = TestProgs::load()?;
        progs.attach(RETURN_ONLY, &port, XdpMode::Driver)?;
        Ok(progs)
    })?
}

impl TestProgs {
    /// Loads every program of the object (needs root).
    pub fn load() -> Result<Self> {
        let mut ebpf = EbpfLoader::new()
            .load(OBJECT)
            .context("loading the test XDP object")?;
        for name in PROGRAMS {
            let prog: &mut Xdp = ebpf
                .program_mut(name)
                .with_context(|| format!("program {name} is not in the test object"))?
                .try_into()
                .with_context(|| format!("program {name}"))?;
            prog.load().with_context(|| format!("loading {name}"))?;
        }
        Ok(Self { ebpf })
    }

    /// One of [`FLOOR`], [`GEN_TX`], [`RETURN_ONLY`].
    pub fn program(&self, name: &str) -> &Xdp {
        self.ebpf
            .program(name)
            .and_then(|p| p.try_into().ok())
            .unwrap_or_else(|| panic!("{name} is not an XDP program of the test object"))
    }

    /// The floor program.
    pub fn floor(&self) -> &Xdp {
        self.program(FLOOR)
    }

    /// The return-only program.
    pub fn return_only(&self) -> &Xdp {
        self.program(RETURN_ONLY)
    }

    /// The restoring program (see [`TestProgs::set_restore`]).
    pub fn restorer(&self) -> &Xdp {
        self.program(RESTORE)
    }

    /// Makes `lb_restore` put every frame back to `frame` (its length and
    /// first 64 bytes: `frame` must be at least that long) and then
    /// tail-call `target`, an XDP program loaded in any object. Run it with
    /// `frame` as the input and any `repeat`: each iteration hands
    /// `target` the same frame, even when it strips or pushes a header
    /// (its length changes: the start moves back; bytes beyond the first
    /// 64 must not be written by `target`).
    pub fn set_restore(&mut self, target: &ProgramFd, frame: &[u8]) -> Result<()> {
        ensure!(
            frame.len() >= RESTORE_BYTES,
            "lb_restore needs frames of at least {RESTORE_BYTES} bytes, this one has {}",
            frame.len()
        );
        let mut head = [0u64; RESTORE_BYTES / 8];
        for (w, chunk) in head.iter_mut().zip(frame.chunks_exact(8)) {
            *w = u64::from_ne_bytes(chunk.try_into().expect("8 bytes"));
        }
        let want = RestoreFrame {
            len: frame.len() as u64,
            head,
        };
        let mut map: Array<_, RestoreFrame> = Array::try_from(
            self.ebpf
                .map_mut(RESTORE_FRAME)
                .context("map RESTORE_FRAME is not in the test object")?,
        )?;
        map.set(0, want, 0).context("writing RESTORE_FRAME")?;
        let mut targets = ProgramArray::try_from(
            self.ebpf
                .map_mut(RESTORE_TARGET)
                .context("map RESTORE_TARGET is not in the test object")?,
        )?;
        targets
            .set(0, target, 0)
            .context("setting lb_restore's target (an XDP program of compatible type)")
    }

    /// Makes `lb_restore` give every frame a source of its own: the
    /// counter `next` is stamped (and then incremented) on each iteration
    /// as the low 16 bits of the IPv4 source address (`next >> 16`) and
    /// the L4 source port (`next as u16`), so that `repeat` times a stream
    /// of new flows. The frame must be IPv4 without options (TCP or UDP);
    /// its IPv4 checksum is not updated. 0 turns it off.
    pub fn set_fresh(&mut self, next: u64) -> Result<()> {
        let mut map: Array<_, u64> = Array::try_from(
            self.ebpf
                .map_mut(RESTORE_FRESH)
                .context("map RESTORE_FRESH is not in the test object")?,
        )?;
        map.set(0, next, 0).context("writing RESTORE_FRESH")
    }

    /// The fresh-source counter's value: the next source `lb_restore`
    /// stamps (see [`TestProgs::set_fresh`]).
    pub fn fresh(&self) -> Result<u64> {
        let map: Array<_, u64> = Array::try_from(
            self.ebpf
                .map(RESTORE_FRESH)
                .context("map RESTORE_FRESH is not in the test object")?,
        )?;
        map.get(&0, 0).context("reading RESTORE_FRESH")
    }

    /// Makes `lb_sink` count and drop UDP to `flood` or `gue` (host order)
    /// and IP-in-IP frames.
    pub fn set_sink_ports(&mut self, flood: u16, gue: u16) -> Result<()> {
        let mut map: Array<_, [u16; 2]> = Array::try_from(
            self.ebpf
                .map_mut(SINK_PORTS)
                .context("map SINK_PORTS is not in the test object")?,
        )?;
        map.set(0, [flood.to_be(), gue.to_be()], 0)
            .context("writing SINK_PORTS")
    }

    /// Frames `lb_sink` counted and dropped so far (all CPUs).
    pub fn sink_count(&self) -> Result<u64> {
        let map: PerCpuArray<_, u64> = PerCpuArray::try_from(
            self.ebpf
                .map(SINK_COUNT)
                .context("map SINK_COUNT is not in the test object")?,
        )?;
        Ok(map.get(&0, 0).context("reading SINK_COUNT")?.iter().sum())
    }

    /// Makes `lb_ref_fwd` forward packets to `vip:port` (`proto`, 6 or
    /// 17) to one of `backends` (their MACs, at most
    /// [`REF_MAX_BACKENDS`]), picked by a fixed hash of the 5-tuple, with
    /// `src_mac` as the new source MAC.
    pub fn set_ref_forward(
        &mut self,
        vip: std::net::Ipv4Addr,
        port: u16,
        proto: u8,
        src_mac: [u8; 6],
        backends: &[[u8; 6]],
    ) -> Result<()> {
        ensure!(
            !backends.is_empty() && backends.len() <= REF_MAX_BACKENDS,
            "lb_ref_fwd takes 1 to {REF_MAX_BACKENDS} backends, not {}",
            backends.len()
        );
        let mut dst_macs = [[0; 6]; REF_MAX_BACKENDS];
        dst_macs[..backends.len()].copy_from_slice(backends);
        let cfg = RefForward {
            vip: u32::from_ne_bytes(vip.octets()),
            port: port.to_be(),
            proto,
            count: backends.len() as u8,
            src_mac,
            _pad: [0; 2],
            dst_macs,
        };
        let mut map: Array<_, RefForward> = Array::try_from(
            self.ebpf
                .map_mut(REF_FORWARD)
                .context("map REF_FORWARD is not in the test object")?,
        )?;
        map.set(0, cfg, 0).context("writing REF_FORWARD")
    }

    /// The generator program (see [`TestProgs::set_gen_template`]).
    pub fn generator(&self) -> &Xdp {
        self.program(GEN_TX)
    }

    /// Runs program `name` once on `frame` through BPF_PROG_TEST_RUN, as
    /// the fixture runs the balancer.
    pub fn run(&self, name: &str, frame: &[u8]) -> Result<RunResult> {
        run_xdp(self.program(name), frame).with_context(|| format!("BPF_PROG_TEST_RUN of {name}"))
    }

    /// Attaches program `name` to `iface` (in the calling thread's network
    /// namespace) until `self` is dropped; e.g. [`RETURN_ONLY`] on a veth
    /// peer that must accept `XDP_TX` frames.
    pub fn attach(&mut self, name: &str, iface: &str, mode: XdpMode) -> Result<XdpLinkId> {
        let prog: &mut Xdp = self
            .ebpf
            .program_mut(name)
            .and_then(|p| p.try_into().ok())
            .with_context(|| format!("{name} is not an XDP program of the test object"))?;
        prog.attach(iface, mode)
            .with_context(|| format!("attaching {name} to {iface}"))
    }

    /// Sets the generator's frame template: the first 48 bytes of an IPv4
    /// `frame`, or 64 of an IPv6 one (by its EtherType), are copied over
    /// every frame it sends. A frame shorter than that is refused.
    pub fn set_gen_template(&mut self, frame: &[u8]) -> Result<()> {
        let len = match frame.get(12..14) {
            Some([0x86, 0xdd]) => GEN_TEMPLATE_BYTES_V6,
            _ => GEN_TEMPLATE_BYTES_V4,
        };
        ensure!(
            frame.len() >= len,
            "generator template: a {}-byte frame is shorter than the {len} bytes to stamp",
            frame.len()
        );
        let mut t = GenTemplate {
            len: len as u64,
            head: [0; GEN_TEMPLATE_BYTES_V6 / 8],
        };
        for (w, chunk) in t.head.iter_mut().zip(frame[..len].chunks(8)) {
            let mut b = [0u8; 8];
            b[..chunk.len()].copy_from_slice(chunk);
            *w = u64::from_ne_bytes(b);
        }
        let mut map: Array<_, GenTemplate> = Array::try_from(
            self.ebpf
                .map_mut(GEN_TEMPLATE)
                .context("map GEN_TEMPLATE is not in the test object")?,
        )?;
        map.set(0, t, 0).context("writing GEN_TEMPLATE")
    }
}
