//! Low-level pieces of the end-to-end benchmark: the generators (live
//! frames, AF_PACKET TX ring), the counter-and-drop on the switch port,
//! CPU time (/proc/stat, schedstat), interface counters, CPU affinity,
//! real-time priority and threaded NAPI.

use std::{
    collections::BTreeSet,
    os::fd::{AsFd, AsRawFd, FromRawFd, OwnedFd},
    sync::{
        Once,
        atomic::{AtomicBool, AtomicI32, Ordering},
    },
    thread,
    time::{Duration, Instant},
};

use anyhow::{Context, Result, anyhow, bail, ensure};
use aya::programs::{TestRun, TestRunAttrs, TestRunOptions, Xdp};
use lb_tests::{
    netns::Netns,
    testprogs::{SINK, TestProgs},
};

// ---------------------------------------------------------------------------
// CPU affinity
// ---------------------------------------------------------------------------

/// The CPUs this thread may run on.
pub fn allowed_cpus() -> Result<Vec<usize>> {
    // SAFETY: cpu_set_t is plain data; the call gets its exact size.
    unsafe {
        let mut set: libc::cpu_set_t = std::mem::zeroed();
        if libc::sched_getaffinity(0, size_of::<libc::cpu_set_t>(), &mut set) != 0 {
            return Err(std::io::Error::last_os_error()).context("sched_getaffinity");
        }
        Ok((0..libc::CPU_SETSIZE as usize)
            .filter(|&c| libc::CPU_ISSET(c, &set))
            .collect())
    }
}

/// Online CPUs of the machine (not only this thread's).
pub fn online_cpus() -> Vec<usize> {
    // SAFETY: sysconf has no preconditions.
    let n = unsafe { libc::sysconf(libc::_SC_NPROCESSORS_ONLN) };
    (0..n.max(1) as usize).collect()
}

/// Restricts thread (or process) `tid` (0 = the caller) to `cpus`.
pub fn set_affinity(tid: i32, cpus: &[usize]) -> Result<()> {
    // SAFETY: cpu_set_t is plain data; the call gets its exact size.
    unsafe {
        let mut set: libc::cpu_set_t = std::mem::zeroed();
        for &c in cpus {
            libc::CPU_SET(c, &mut set);
        }
        if libc::sched_setaffinity(tid, size_of::<libc::cpu_set_t>(), &set) != 0 {
            return Err(std::io::Error::last_os_error())
                .with_context(|| format!("sched_setaffinity({tid}, {cpus:?})"));
        }
    }
    Ok(())
}

/// Restores the calling thread's affinity on drop.
pub struct AffinityGuard(Vec<usize>);

impl AffinityGuard {
    /// Lets the calling thread (and the threads and processes it starts)
    /// run on every online CPU until dropped.
    pub fn widen() -> Result<AffinityGuard> {
        let old = allowed_cpus()?;
        set_affinity(0, &online_cpus())?;
        Ok(AffinityGuard(old))
    }
}

impl Drop for AffinityGuard {
    fn drop(&mut self) {
        let _ = set_affinity(0, &self.0);
    }
}

fn gettid() -> i32 {
    // SAFETY: gettid has no preconditions.
    unsafe { libc::syscall(libc::SYS_gettid) as i32 }
}

// ---------------------------------------------------------------------------
// CPU time
// ---------------------------------------------------------------------------

/// One CPU's line of /proc/stat, in clock ticks.
#[derive(Clone, Copy, Debug, Default)]
pub struct CpuTicks {
    pub user: u64,
    pub nice: u64,
    pub system: u64,
    pub idle: u64,
    pub iowait: u64,
    pub irq: u64,
    pub softirq: u64,
    pub steal: u64,
}

impl CpuTicks {
    pub fn busy(&self) -> u64 {
        self.user + self.nice + self.system + self.irq + self.softirq + self.steal
    }

    /// The difference (saturating: iowait is known to step backwards).
    pub fn since(&self, earlier: &CpuTicks) -> CpuTicks {
        CpuTicks {
            user: self.user.saturating_sub(earlier.user),
            nice: self.nice.saturating_sub(earlier.nice),
            system: self.system.saturating_sub(earlier.system),
            idle: self.idle.saturating_sub(earlier.idle),
            iowait: self.iowait.saturating_sub(earlier.iowait),
            irq: self.irq.saturating_sub(earlier.irq),
            softirq: self.softirq.saturating_sub(earlier.softirq),
            steal: self.steal.saturating_sub(earlier.steal),
        }
    }
}

/// Clock ticks per second (USER_HZ).
pub fn ticks_per_sec() -> f64 {
    // SAFETY: sysconf has no preconditions.
    let t = unsafe { libc::sysconf(libc::_SC_CLK_TCK) };
    if t > 0 { t as f64 } else { 100.0 }
}

/// Every CPU's counters, indexed by CPU number.
pub fn cpu_ticks() -> Result<Vec<CpuTicks>> {
    let text = std::fs::read_to_string("/proc/stat").context("reading /proc/stat")?;
    let mut v = Vec::new();
    for line in text.lines() {
        let Some(rest) = line.strip_prefix("cpu") else {
            continue;
        };
        let mut it = rest.split_whitespace();
        let Some(Ok(cpu)) = it.next().map(str::parse::<usize>) else {
            continue; // the "cpu" total line
        };
        let f: Vec<u64> = it.map(|x| x.parse().unwrap_or(0)).collect();
        ensure!(f.len() >= 8, "short /proc/stat line {line:?}");
        if v.len() <= cpu {
            v.resize(cpu + 1, CpuTicks::default());
        }
        v[cpu] = CpuTicks {
            user: f[0],
            nice: f[1],
            system: f[2],
            idle: f[3],
            iowait: f[4],
            irq: f[5],
            softirq: f[6],
            steal: f[7],
        };
    }
    Ok(v)
}

// ---------------------------------------------------------------------------
// BPF links: swapping the program of an existing XDP link
// ---------------------------------------------------------------------------

const BPF_PROG_GET_FD_BY_ID: libc::c_long = 13;
const BPF_LINK_UPDATE: libc::c_long = 29;
const BPF_LINK_GET_FD_BY_ID: libc::c_long = 30;

fn bpf(cmd: libc::c_long, attr: &mut [u32; 32]) -> std::io::Result<i32> {
    // SAFETY: `attr` is a zero-padded bpf_attr of the size passed.
    let r = unsafe {
        libc::syscall(
            libc::SYS_bpf,
            cmd,
            attr.as_mut_ptr(),
            size_of::<[u32; 32]>() as libc::c_uint,
        )
    };
    if r < 0 {
        Err(std::io::Error::last_os_error())
    } else {
        Ok(r as i32)
    }
}

fn fd_by_id(cmd: libc::c_long, id: u32) -> Result<OwnedFd> {
    let mut attr = [0u32; 32];
    attr[0] = id;
    let fd = bpf(cmd, &mut attr).with_context(|| format!("bpf get fd by id {id}"))?;
    // SAFETY: a new fd the kernel just returned to us.
    Ok(unsafe { OwnedFd::from_raw_fd(fd) })
}

fn link_update(link: &OwnedFd, prog_fd: i32) -> Result<()> {
    let mut attr = [0u32; 32];
    attr[0] = link.as_raw_fd() as u32;
    attr[1] = prog_fd as u32;
    bpf(BPF_LINK_UPDATE, &mut attr).context("BPF_LINK_UPDATE")?;
    Ok(())
}

/// The id of the XDP program attached to `iface` in `ns` (0 = none).
pub fn xdp_prog_id(ns: &Netns, iface: &str) -> Result<u32> {
    let out = ns.ip(["-d", "-j", "link", "show", "dev", iface])?;
    let v: serde_json::Value = serde_json::from_slice(&out.stdout)
        .with_context(|| format!("parsing `ip -j link show {iface}`"))?;
    Ok(v[0]["xdp"]["prog"]["id"].as_u64().unwrap_or(0) as u32)
}

/// An XDP link found by the program it runs, whose program can be swapped
/// and is put back on drop.
pub struct LinkSwap {
    link: OwnedFd,
    original: OwnedFd,
    swapped: bool,
}

impl LinkSwap {
    /// The link that runs program `prog_id`.
    pub fn find(prog_id: u32) -> Result<LinkSwap> {
        ensure!(prog_id != 0, "no XDP program attached");
        let mut found = None;
        for info in aya::programs::loaded_links() {
            let Ok(info) = info else { continue };
            if info.program_id() == prog_id {
                found = Some(info.id());
                break;
            }
        }
        let link_id = found.ok_or_else(|| anyhow!("no BPF link runs program {prog_id}"))?;
        Ok(LinkSwap {
            link: fd_by_id(BPF_LINK_GET_FD_BY_ID, link_id)?,
            original: fd_by_id(BPF_PROG_GET_FD_BY_ID, prog_id)?,
            swapped: false,
        })
    }

    /// Makes the link run `prog` (atomically).
    pub fn swap_to(&mut self, prog: &Xdp) -> Result<()> {
        let fd = prog.fd().context("program fd")?;
        link_update(&self.link, fd.as_fd().as_raw_fd())?;
        self.swapped = true;
        Ok(())
    }

    /// Puts the original program back.
    pub fn restore(&mut self) -> Result<()> {
        if self.swapped {
            link_update(&self.link, self.original.as_raw_fd())?;
            self.swapped = false;
        }
        Ok(())
    }
}

impl Drop for LinkSwap {
    fn drop(&mut self) {
        if let Err(e) = self.restore() {
            eprintln!("lb-bench: restoring an XDP link: {e:#}");
        }
    }
}

// ---------------------------------------------------------------------------
// The counter-and-drop at the first hop after the load balancer
// ---------------------------------------------------------------------------

/// The test object's `lb_sink`, which counts and drops the flood's frames
/// (plain, IP-in-IP or GUE: whatever lb's forwarding mode) and passes
/// everything else. Runs on the switch-side peer of the LB's veth, in
/// place of the XDP_PASS program the topology keeps there.
pub struct Sink {
    progs: TestProgs,
    swap: Option<LinkSwap>,
}

impl Sink {
    /// Counts UDP to `port` or to `gue_port`, and IP-in-IP.
    pub fn new(port: u16, gue_port: u16) -> Result<Sink> {
        let mut progs = TestProgs::load().context("loading the sink's XDP object")?;
        progs.set_sink_ports(port, gue_port)?;
        Ok(Sink { progs, swap: None })
    }

    /// Puts the sink in place of the program attached to `iface` in `ns`.
    pub fn install(&mut self, ns: &Netns, iface: &str) -> Result<()> {
        ensure!(self.swap.is_none(), "sink already installed");
        let id = xdp_prog_id(ns, iface)?;
        let mut swap = LinkSwap::find(id)
            .with_context(|| format!("the XDP link on {iface} in {}", ns.name()))?;
        swap.swap_to(self.progs.program(SINK))?;
        self.swap = Some(swap);
        Ok(())
    }

    /// Puts the original program back.
    pub fn remove(&mut self) -> Result<()> {
        if let Some(mut s) = self.swap.take() {
            s.restore()?;
        }
        Ok(())
    }

    /// Frames counted and dropped so far.
    pub fn count(&self) -> Result<u64> {
        self.progs.sink_count()
    }
}

impl Drop for Sink {
    fn drop(&mut self) {
        let _ = self.remove();
    }
}

// ---------------------------------------------------------------------------
// The generator: BPF_PROG_TEST_RUN with live frames
// ---------------------------------------------------------------------------

static SIGNAL_HANDLER: Once = Once::new();
/// Interrupts the generator's syscall (a handler that does nothing, so
/// that the signal only makes the syscall return EINTR).
const STOP_SIGNAL: i32 = libc::SIGUSR1;

extern "C" fn on_stop_signal(_: libc::c_int) {}

fn install_stop_handler() -> Result<()> {
    let mut result = Ok(());
    SIGNAL_HANDLER.call_once(|| {
        // SAFETY: a handler that does nothing; no SA_RESTART so that the
        // interrupted syscall returns EINTR.
        unsafe {
            let mut sa: libc::sigaction = std::mem::zeroed();
            sa.sa_sigaction = on_stop_signal as *const () as usize;
            libc::sigemptyset(&mut sa.sa_mask);
            sa.sa_flags = 0;
            if libc::sigaction(STOP_SIGNAL, &sa, std::ptr::null_mut()) != 0 {
                result = Err(std::io::Error::last_os_error()).context("sigaction");
            }
        }
    });
    result
}

/// How the generator ended.
#[derive(Debug)]
pub struct GenOutcome {
    /// Whether it ran to its bound (instead of being stopped).
    pub completed: bool,
}

/// Shared between the generator thread and its controller.
pub struct GenControl {
    tid: AtomicI32,
    stop: AtomicBool,
    done: AtomicBool,
}

/// Marks a generator finished when dropped (also on an early error).
pub struct GenDone<'a>(&'a GenControl);

impl Drop for GenDone<'_> {
    fn drop(&mut self) {
        self.0.done.store(true, Ordering::SeqCst);
    }
}

impl GenControl {
    /// A generator thread's start: stop handler, pinned to `cpu`, its tid
    /// recorded for `stop`; the guard marks it done.
    fn enter(&self, cpu: usize) -> Result<GenDone<'_>> {
        let done = GenDone(self);
        install_stop_handler()?;
        set_affinity(0, &[cpu])?;
        self.tid.store(gettid(), Ordering::SeqCst);
        Ok(done)
    }

    pub fn new() -> GenControl {
        GenControl {
            tid: AtomicI32::new(0),
            stop: AtomicBool::new(false),
            done: AtomicBool::new(false),
        }
    }

    /// Stops the generator (bounded wait).
    pub fn stop(&self, timeout: Duration) -> Result<()> {
        self.stop.store(true, Ordering::SeqCst);
        let deadline = Instant::now() + timeout;
        while !self.done.load(Ordering::SeqCst) {
            let tid = self.tid.load(Ordering::SeqCst);
            if tid > 0 {
                // SAFETY: tgkill to a thread of this process that installed
                // nothing but a no-op handler for this signal.
                unsafe {
                    libc::syscall(
                        libc::SYS_tgkill,
                        libc::getpid(),
                        tid,
                        STOP_SIGNAL as libc::c_long,
                    )
                };
            }
            if Instant::now() >= deadline {
                bail!("the generator did not stop within {timeout:?}");
            }
            thread::sleep(Duration::from_millis(5));
        }
        Ok(())
    }
}

/// `struct xdp_md` for ctx_in with `ingress_ifindex`.
fn xdp_md(len: usize, ifindex: u32) -> [u8; 24] {
    let mut b = [0u8; 24];
    for (i, v) in [0, len as u32, 0, ifindex, 0, 0].into_iter().enumerate() {
        b[i * 4..i * 4 + 4].copy_from_slice(&v.to_ne_bytes());
    }
    b
}

/// Live-frames batch size (the kernel's maximum is 256).
pub const GEN_BATCH: u32 = 256;

/// Runs `prog` (which returns XDP_TX without touching the frame) in
/// live-frames mode on `frame`, as if received on `ifindex`: every frame
/// goes out of that interface. Must run on a thread inside the
/// interface's namespace. Returns when `ctl` is stopped or after `bound`
/// frames, whichever comes first.
pub fn generate(
    prog: &Xdp,
    frame: &[u8],
    ifindex: u32,
    cpu: usize,
    bound: u32,
    ctl: &GenControl,
) -> Result<GenOutcome> {
    let _done = ctl.enter(cpu)?;
    let ctx = xdp_md(frame.len(), ifindex);
    if ctl.stop.load(Ordering::SeqCst) {
        return Ok(GenOutcome { completed: false });
    }
    let r = prog.test_run(TestRunOptions {
        data_in: Some(frame),
        ctx_in: Some(&ctx),
        repeat: bound,
        attrs: TestRunAttrs::new().xdp_live_frames(GEN_BATCH),
        ..TestRunOptions::new()
    });
    match r {
        Ok(_) => Ok(GenOutcome { completed: true }),
        Err(e) if is_eintr(&e) => Ok(GenOutcome { completed: false }),
        Err(e) => Err(e).context("BPF_PROG_TEST_RUN (live frames)"),
    }
}

/// AF_PACKET TX ring geometry: frames of 2 KiB, 2 per 4 KiB block.
const RING_FRAME: usize = 2048;
const RING_FRAMES: usize = 512;
const RING_BLOCK: usize = 4096;
const PACKET_VERSION: libc::c_int = 10;
const PACKET_TX_RING: libc::c_int = 13;
const TPACKET_V2: libc::c_int = 1;
const TP_STATUS_AVAILABLE: u32 = 0;
const TP_STATUS_SEND_REQUEST: u32 = 1;
/// Frame data offset in a TPACKET_V2 TX slot: TPACKET2_HDRLEN (the
/// 32-byte header aligned, plus a sockaddr_ll) minus the sockaddr_ll.
const TPACKET2_DATA: usize = 32;

#[repr(C)]
struct TpacketReq {
    block_size: u32,
    block_nr: u32,
    frame_size: u32,
    frame_nr: u32,
}

/// The mapped TX ring, unmapped on drop.
struct Ring {
    base: *mut u8,
    len: usize,
}

impl Drop for Ring {
    fn drop(&mut self) {
        // SAFETY: the mapping this struct owns.
        unsafe { libc::munmap(self.base.cast(), self.len) };
    }
}

fn setsockopt_int(
    fd: &OwnedFd,
    level: libc::c_int,
    opt: libc::c_int,
    v: libc::c_int,
) -> Result<()> {
    // SAFETY: a plain int option on a socket we own.
    let rc = unsafe {
        libc::setsockopt(
            fd.as_raw_fd(),
            level,
            opt,
            (&v as *const libc::c_int).cast(),
            size_of::<libc::c_int>() as libc::socklen_t,
        )
    };
    if rc != 0 {
        return Err(std::io::Error::last_os_error()).with_context(|| format!("setsockopt {opt}"));
    }
    Ok(())
}

/// The slower stand-in generator: an AF_PACKET socket bound to `ifindex`
/// with a TX ring (TPACKET_V2, qdisc bypassed) full of copies of `frame`,
/// sent again and again. Each send builds a fresh skb, so whatever the
/// receiver does to a frame in place cannot leak into the next one. Must
/// run on a thread inside the interface's namespace; returns when `ctl` is
/// stopped or after `bound` frames.
pub fn packet_generate(
    frame: &[u8],
    ifindex: u32,
    cpu: usize,
    bound: u64,
    ctl: &GenControl,
) -> Result<GenOutcome> {
    let _done = ctl.enter(cpu)?;
    ensure!(frame.len() + TPACKET2_DATA <= RING_FRAME, "frame too long");
    // SAFETY: socket calls on a socket this function owns; the ring is
    // written only inside its mapping (slot i at i × RING_FRAME, below
    // RING_FRAMES × RING_FRAME = its length).
    unsafe {
        let fd = libc::socket(libc::AF_PACKET, libc::SOCK_RAW, 0);
        if fd < 0 {
            return Err(std::io::Error::last_os_error()).context("socket(AF_PACKET)");
        }
        let fd = OwnedFd::from_raw_fd(fd);
        setsockopt_int(&fd, libc::SOL_PACKET, PACKET_VERSION, TPACKET_V2)?;
        setsockopt_int(&fd, libc::SOL_PACKET, libc::PACKET_QDISC_BYPASS, 1)?;
        let req = TpacketReq {
            block_size: RING_BLOCK as u32,
            block_nr: (RING_FRAMES * RING_FRAME / RING_BLOCK) as u32,
            frame_size: RING_FRAME as u32,
            frame_nr: RING_FRAMES as u32,
        };
        if libc::setsockopt(
            fd.as_raw_fd(),
            libc::SOL_PACKET,
            PACKET_TX_RING,
            (&req as *const TpacketReq).cast(),
            size_of::<TpacketReq>() as libc::socklen_t,
        ) != 0
        {
            return Err(std::io::Error::last_os_error()).context("PACKET_TX_RING");
        }
        let len = RING_FRAMES * RING_FRAME;
        let base = libc::mmap(
            std::ptr::null_mut(),
            len,
            libc::PROT_READ | libc::PROT_WRITE,
            libc::MAP_SHARED,
            fd.as_raw_fd(),
            0,
        );
        if base == libc::MAP_FAILED {
            return Err(std::io::Error::last_os_error()).context("mmap of the TX ring");
        }
        let ring = Ring {
            base: base.cast(),
            len,
        };
        let mut sll: libc::sockaddr_ll = std::mem::zeroed();
        sll.sll_family = libc::AF_PACKET as u16;
        sll.sll_ifindex = ifindex as i32;
        if libc::bind(
            fd.as_raw_fd(),
            (&sll as *const libc::sockaddr_ll).cast(),
            size_of::<libc::sockaddr_ll>() as libc::socklen_t,
        ) != 0
        {
            return Err(std::io::Error::last_os_error()).context("bind(AF_PACKET)");
        }
        let slot = |i: usize| ring.base.add(i * RING_FRAME);
        let status = |i: usize| &*(slot(i) as *const std::sync::atomic::AtomicU32);
        for i in 0..RING_FRAMES {
            std::ptr::copy_nonoverlapping(frame.as_ptr(), slot(i).add(TPACKET2_DATA), frame.len());
            // tp_len: the second u32 of tpacket2_hdr.
            (slot(i).add(4) as *mut u32).write(frame.len() as u32);
        }
        let mut sent = 0u64;
        while !ctl.stop.load(Ordering::Relaxed) {
            if sent >= bound {
                return Ok(GenOutcome { completed: true });
            }
            let mut queued = 0u64;
            for i in 0..RING_FRAMES {
                if status(i).load(Ordering::Acquire) == TP_STATUS_AVAILABLE {
                    status(i).store(TP_STATUS_SEND_REQUEST, Ordering::Release);
                    queued += 1;
                }
            }
            // Blocking: returns once the queued frames have been sent.
            let n = libc::send(fd.as_raw_fd(), std::ptr::null(), 0, 0);
            if n < 0 {
                let e = std::io::Error::last_os_error();
                match e.raw_os_error() {
                    Some(libc::EINTR | libc::ENOBUFS | libc::EAGAIN) => {}
                    _ => return Err(e).context("send(AF_PACKET TX ring)"),
                }
            }
            sent += queued;
        }
        drop(ring);
        Ok(GenOutcome { completed: false })
    }
}

fn is_eintr(e: &aya::programs::ProgramError) -> bool {
    let mut src: Option<&dyn std::error::Error> = Some(e);
    while let Some(s) = src {
        if let Some(io) = s.downcast_ref::<std::io::Error>()
            && io.raw_os_error() == Some(libc::EINTR)
        {
            return true;
        }
        src = s.source();
    }
    format!("{e:?}").contains("Interrupted")
}

// ---------------------------------------------------------------------------
// Steering the receive path to a CPU
// ---------------------------------------------------------------------------

/// Pids of the NAPI kernel threads (`napi/<iface>-<id>`) whose name starts
/// with `prefix`.
fn napi_threads(prefix: &str) -> BTreeSet<i32> {
    let mut out = BTreeSet::new();
    let Ok(dir) = std::fs::read_dir("/proc") else {
        return out;
    };
    for e in dir.flatten() {
        let Some(pid) = e.file_name().to_str().and_then(|s| s.parse::<i32>().ok()) else {
            continue;
        };
        if let Ok(comm) = std::fs::read_to_string(format!("/proc/{pid}/comm"))
            && comm.trim_end().starts_with(prefix)
        {
            out.insert(pid);
        }
    }
    out
}

/// Writes `value` to `/sys/class/net/<iface>/<file>` inside `ns`.
pub fn sysfs_net_write(ns: &Netns, iface: &str, file: &str, value: &str) -> Result<()> {
    let path = format!("/sys/class/net/{iface}/{file}");
    ns.exec(["sh", "-c", &format!("echo {value} > {path}")])
        .with_context(|| format!("writing {value} to {path} in {}", ns.name()))?;
    Ok(())
}

/// Turns threaded NAPI on for `iface` in `ns` and pins its NAPI threads to
/// `cpu`. Returns the threads' pids.
pub fn threaded_napi_on(ns: &Netns, iface: &str, cpu: usize) -> Result<Vec<i32>> {
    let prefix = format!("napi/{iface}-");
    // comm is at most 15 characters: compare what fits.
    let prefix: String = prefix.chars().take(15).collect();
    let before = napi_threads(&prefix);
    sysfs_net_write(ns, iface, "threaded", "1")?;
    let deadline = Instant::now() + Duration::from_secs(2);
    let new: Vec<i32> = loop {
        let now = napi_threads(&prefix);
        let new: Vec<i32> = now.difference(&before).copied().collect();
        if !new.is_empty() {
            break new;
        }
        if Instant::now() >= deadline {
            bail!("no NAPI thread appeared for {iface} in {}", ns.name());
        }
        thread::sleep(Duration::from_millis(10));
    };
    for &pid in &new {
        set_affinity(pid, &[cpu])?;
        set_fifo(pid, NAPI_PRIORITY)?;
    }
    Ok(new)
}

/// CPU time (ns) a task has run, from /proc/<pid>/schedstat.
pub fn task_cpu_ns(pid: i32) -> Result<u64> {
    let path = format!("/proc/{pid}/schedstat");
    let text = std::fs::read_to_string(&path).with_context(|| format!("reading {path}"))?;
    text.split_whitespace()
        .next()
        .and_then(|v| v.parse().ok())
        .ok_or_else(|| anyhow!("unexpected {path}: {text:?}"))
}

/// Real-time priority of the NAPI threads the benchmark creates.
const NAPI_PRIORITY: i32 = 50;

/// SCHED_FIFO at `prio` for task `pid`: a NAPI thread then preempts
/// ordinary tasks as softirq processing would.
pub fn set_fifo(pid: i32, prio: i32) -> Result<()> {
    let param = libc::sched_param {
        sched_priority: prio,
    };
    // SAFETY: plain syscall with a valid sched_param.
    if unsafe { libc::sched_setscheduler(pid, libc::SCHED_FIFO, &param) } != 0 {
        return Err(std::io::Error::last_os_error())
            .with_context(|| format!("sched_setscheduler({pid}, SCHED_FIFO {prio})"));
    }
    Ok(())
}

pub fn threaded_napi_off(ns: &Netns, iface: &str) -> Result<()> {
    sysfs_net_write(ns, iface, "threaded", "0")
}

// ---------------------------------------------------------------------------
// Interface counters without a process
// ---------------------------------------------------------------------------

/// /proc/net/dev of one namespace, opened by a thread inside it (the file
/// keeps showing that namespace's interfaces whoever reads it later).
pub struct NetDev(std::fs::File);

/// One interface's line of /proc/net/dev.
#[derive(Clone, Copy, Debug, Default)]
pub struct DevStats {
    pub tx_packets: u64,
    pub tx_dropped: u64,
}

impl NetDev {
    pub fn open(ns: &Netns) -> Result<NetDev> {
        let f = ns.run(|| std::fs::File::open("/proc/thread-self/net/dev"))??;
        Ok(NetDev(f))
    }

    pub fn read(&mut self, iface: &str) -> Result<DevStats> {
        use std::io::{Read, Seek, SeekFrom};
        self.0.seek(SeekFrom::Start(0))?;
        let mut text = String::new();
        self.0.read_to_string(&mut text)?;
        for line in text.lines() {
            let Some((name, rest)) = line.split_once(':') else {
                continue;
            };
            if name.trim() != iface {
                continue;
            }
            let f: Vec<u64> = rest
                .split_whitespace()
                .map(|x| x.parse().unwrap_or(0))
                .collect();
            ensure!(f.len() >= 16, "short /proc/net/dev line {line:?}");
            return Ok(DevStats {
                tx_packets: f[9],
                tx_dropped: f[11],
            });
        }
        bail!("{iface} is not in /proc/net/dev")
    }
}

/// Makes the calling thread SCHED_FIFO (children start as ordinary
/// tasks) until dropped: the measuring thread must read its counters on
/// time on a machine the benchmark keeps busy.
pub struct FifoGuard;

impl FifoGuard {
    pub fn new(prio: i32) -> Result<FifoGuard> {
        let param = libc::sched_param {
            sched_priority: prio,
        };
        // SAFETY: plain syscall on the calling thread.
        if unsafe {
            libc::sched_setscheduler(0, libc::SCHED_FIFO | libc::SCHED_RESET_ON_FORK, &param)
        } != 0
        {
            return Err(std::io::Error::last_os_error())
                .context("SCHED_FIFO for the measuring thread");
        }
        Ok(FifoGuard)
    }
}

impl Drop for FifoGuard {
    fn drop(&mut self) {
        let param = libc::sched_param { sched_priority: 0 };
        // SAFETY: plain syscall on the calling thread.
        unsafe { libc::sched_setscheduler(0, libc::SCHED_OTHER, &param) };
    }
}
