//! `lb check`, `lb config show` and `lb run --dry-run` run as the built
//! binary: their output and exit status, and that they create nothing (no
//! control socket, lock, pin directory or XDP program). Run as root, the
//! binary is started as nobody (setpriv), which shows they need no root.

use std::{
    os::unix::fs::PermissionsExt,
    path::{Path, PathBuf},
    process::{Command, Output},
};

fn examples() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("../examples")
}

/// Runs `lb args`, as nobody when the test runs as root.
fn lb(args: &[&str]) -> Output {
    let bin = env!("CARGO_BIN_EXE_lb");
    // SAFETY: geteuid has no preconditions.
    let root = unsafe { libc::geteuid() } == 0;
    let mut cmd = if root {
        let mut c = Command::new("setpriv");
        c.args(["--reuid=65534", "--regid=65534", "--clear-groups", bin]);
        c
    } else {
        Command::new(bin)
    };
    cmd.args(args).env("RUST_LOG", "warn");
    cmd.output().expect("running lb")
}

fn text(b: &[u8]) -> String {
    String::from_utf8_lossy(b).into_owned()
}

/// A scratch directory readable by nobody, removed on drop.
struct Scratch(PathBuf);

impl Scratch {
    fn new(tag: &str) -> Scratch {
        let dir = std::env::temp_dir().join(format!("lb-config-cli-{tag}-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        std::fs::create_dir_all(&dir).unwrap();
        std::fs::set_permissions(&dir, std::fs::Permissions::from_mode(0o755)).unwrap();
        Scratch(dir)
    }

    fn write(&self, name: &str, contents: &str) -> PathBuf {
        let p = self.0.join(name);
        std::fs::write(&p, contents).unwrap();
        std::fs::set_permissions(&p, std::fs::Permissions::from_mode(0o644)).unwrap();
        p
    }
}

impl Drop for Scratch {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}

/// An instance of its own: socket in the scratch dir, interface lo.
fn agent_table(instance: &str, dir: &Scratch) -> String {
    format!(
        "[agent]\ninstance = \"{instance}\"\ninterfaces = [\"lo\"]\ncontrol_socket = \"{}/lb.sock\"\n",
        dir.0.display()
    )
}

/// Nothing of `instance` exists: socket, lock, pin dir, and no XDP
/// program on lo.
#[track_caller]
fn nothing_created(instance: &str, dir: &Scratch) {
    assert!(!dir.0.join("lb.sock").exists(), "a control socket appeared");
    let lock = Path::new("/run/lb").join(format!("{instance}.lock"));
    assert!(!lock.exists(), "{} appeared", lock.display());
    let pins = Path::new("/sys/fs/bpf/lb").join(instance);
    assert!(!pins.exists(), "{} appeared", pins.display());
    let link = Command::new("ip")
        .args(["-d", "link", "show", "dev", "lo"])
        .output()
        .expect("ip link");
    assert!(link.status.success());
    assert!(
        !text(&link.stdout).contains("xdp"),
        "an XDP program is on lo: {}",
        text(&link.stdout)
    );
}

#[test]
fn check_accepts_the_example_with_a_summary() {
    let path = examples().join("lb.toml");
    let out = lb(&["check", "--config", path.to_str().unwrap()]);
    let stdout = text(&out.stdout);
    assert!(out.status.success(), "{stdout}{}", text(&out.stderr));
    assert_eq!(stdout.lines().count(), 1, "{stdout}");
    assert!(
        stdout.contains("3 VIPs, 6 backends, kernel memory ") && stdout.contains(" MiB"),
        "{stdout}"
    );
}

#[test]
fn check_refuses_a_bad_file_located_and_creates_nothing() {
    let instance = format!("cfgcli{}", std::process::id());
    let dir = Scratch::new("bad");
    let agent = agent_table(&instance, &dir);
    let lines = agent.lines().count();
    let bad = dir.write(
        "bad.toml",
        &format!(
            "{agent}\n[[vip]]\naddress = \"198.18.10.1\"\nport = 80\nprotocol = \"tcp\"\n\n[[vip.backend]]\naddress = \"198.18.0.11\"\nweight = 0\n"
        ),
    );
    // The weight is on the file's last line.
    let line = lines + 9;
    let out = lb(&["check", "--config", bad.to_str().unwrap()]);
    let stderr = text(&out.stderr);
    assert!(!out.status.success(), "{}", text(&out.stdout));
    assert!(
        stderr.contains(&format!("{}:{line}:", bad.display()))
            && stderr.contains("vip[0].backend[0].weight: 0 is out of range"),
        "{stderr}"
    );
    assert!(out.stdout.is_empty());
    nothing_created(&instance, &dir);

    // Over the memory cap: refused at the key, naming the total and the cap.
    let big = dir.write(
        "big.toml",
        &format!("{agent}conntrack_entries = 268435456\nmax_kernel_memory = \"2GiB\"\n"),
    );
    let out = lb(&["check", "--config", big.to_str().unwrap()]);
    let stderr = text(&out.stderr);
    assert!(!out.status.success());
    assert!(
        stderr.contains(&format!(
            "{}:{}:21: agent.conntrack_entries: the maps need ",
            big.display(),
            lines + 1
        )) && stderr.contains("more than max_kernel_memory 2.00 GiB (2147483648 bytes)")
            && stderr.contains("biggest: CONNTRACK6"),
        "{stderr}"
    );
    // `lb run` refuses it the same way, before anything.
    let out = lb(&["run", "--dry-run", "--config", big.to_str().unwrap()]);
    assert!(!out.status.success());
    assert!(text(&out.stderr).contains("more than max_kernel_memory 2.00 GiB"));
    nothing_created(&instance, &dir);
}

#[test]
fn config_show_output_passes_check_and_shows_itself() {
    let dir = Scratch::new("show");
    for example in ["lb.toml", "nat.toml"] {
        let path = examples().join(example);
        let out = lb(&["config", "show", "--config", path.to_str().unwrap()]);
        assert!(out.status.success(), "{}", text(&out.stderr));
        let shown = text(&out.stdout);
        assert!(shown.contains("max_kernel_memory = \"4GiB\""), "{shown}");
        assert!(shown.contains("conntrack_tcp_idle_ms = "), "{shown}");
        let again = dir.write(example, &shown);
        let check = lb(&["check", "--config", again.to_str().unwrap()]);
        assert!(check.status.success(), "{}\n{shown}", text(&check.stderr));
        let orig = lb(&["check", "--config", path.to_str().unwrap()]);
        // The same VIPs, backends and memory.
        let summary = |o: &Output| text(&o.stdout).split_once(": ok: ").unwrap().1.to_string();
        assert_eq!(summary(&check), summary(&orig));
        let reshown = lb(&["config", "show", "--config", again.to_str().unwrap()]);
        let body = |s: &str| s.lines().skip(1).collect::<Vec<_>>().join("\n");
        assert_eq!(body(&text(&reshown.stdout)), body(&shown));
    }
}

#[test]
fn run_dry_run_prints_the_plan_and_attaches_nothing() {
    let instance = format!("cfgdry{}", std::process::id());
    let dir = Scratch::new("dry");
    let example = std::fs::read_to_string(examples().join("lb.toml")).unwrap();
    // The example's VIPs under an [agent] table of the test's own.
    let vips = &example[example.find("[[vip]]").unwrap()..];
    let agent = agent_table(&instance, &dir);
    let cfg = dir.write("lb.toml", &format!("{agent}{vips}"));
    let out = lb(&["run", "--dry-run", "--config", cfg.to_str().unwrap()]);
    let stdout = text(&out.stdout);
    assert!(out.status.success(), "{stdout}{}", text(&out.stderr));
    for needle in [
        "interfaces  lo (xdp_mode auto)",
        "MAP ",
        "BYTES",
        "total       ",
        "dry run: nothing loaded, attached or pinned",
    ] {
        assert!(stdout.contains(needle), "{needle:?} missing:\n{stdout}");
    }
    assert!(!stdout.contains("does not exist"), "{stdout}");
    // CONNTRACK's row: 2^20 entries, its bytes, estimated.
    let ct = stdout
        .lines()
        .find(|l| l.starts_with("CONNTRACK "))
        .unwrap_or_else(|| panic!("no CONNTRACK row:\n{stdout}"));
    let cols: Vec<&str> = ct.split_whitespace().collect();
    assert_eq!(cols[1], "lru_hash", "{ct}");
    assert_eq!(cols[4], "1048576", "{ct}");
    assert!(cols[5].parse::<u64>().unwrap() > 1048576 * 32, "{ct}");
    assert_eq!(cols.get(6), Some(&"*"), "{ct}");
    // The total is the sum of the rows.
    let rows: u64 = stdout
        .lines()
        .skip_while(|l| !l.starts_with("MAP "))
        .skip(1)
        .take_while(|l| !l.starts_with("total"))
        .map(|l| l.split_whitespace().nth(5).unwrap().parse::<u64>().unwrap())
        .sum();
    assert!(
        stdout.contains(&format!("({rows} bytes) of max_kernel_memory 4.00 GiB")),
        "{stdout}"
    );
    let web = stdout
        .lines()
        .find(|l| l.starts_with("web "))
        .expect("VIP web");
    assert!(
        web.contains("198.19.0.1:80/tcp") && web.contains("dsr-l2") && web.contains("maglev"),
        "{web}"
    );
    assert!(web.trim_end().ends_with(" 3"), "3 backends: {web}");
    nothing_created(&instance, &dir);
}
