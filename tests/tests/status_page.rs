//! The agent's status page (`/` and `/status.json` on the metrics
//! listener) through the real agent in network namespaces: the JSON over
//! plain HTTP, and the page in headless Chromium driven by chromedriver,
//! both run inside the lb namespace. Needs root, and Chromium
//! (`cargo xtask setup` installs `chromium` and `chromium-driver`). Each
//! test builds its own topology and removes it, also when it fails.

use std::{
    io::{Read as _, Write as _},
    net::{SocketAddr, SocketAddrV4, TcpStream},
    path::{Path, PathBuf},
    process::Stdio,
    sync::atomic::{AtomicBool, Ordering},
    thread,
    time::{Duration, Instant},
};

use anyhow::{Context as _, Result, bail, ensure};
use lb_tests::{
    agent::{AgentPaths, LbAgent, METRICS_LISTEN, VipSpec, render_config},
    netns::{ChildGuard, Netns, Topology, spawn_guarded},
    require_root,
    servers::{ServerKind, get_from_ports, spawn_on_backends},
};
use serde_json::Value;

const PORT: u16 = 80;
/// The health check of the test VIP: a backend is down after `FALL`
/// failed checks `INTERVAL` apart.
const INTERVAL_MS: u64 = 200;
const TIMEOUT_MS: u64 = 150;
const FALL: u64 = 2;
/// How often the page polls `/status.json` (REFRESH_MS in the page).
const PAGE_REFRESH: Duration = Duration::from_secs(1);
const CHROMEDRIVER_PORT: u16 = 9515;
const CHROMIUM: &str = "/usr/bin/chromium";

struct Setup {
    // Field order is drop order: agent and servers before the namespaces.
    agent: LbAgent,
    servers: Vec<ChildGuard>,
    topo: Topology,
}

fn setup(backends: usize) -> Result<Setup> {
    require_root();
    let topo = Topology::with_backends(backends)?;
    let servers = spawn_on_backends(&topo, ServerKind::Http, PORT)?;
    let paths = AgentPaths::new()?;
    let addrs: Vec<_> = (0..backends).map(|i| topo.backend_addr(i)).collect();
    let mut vip = VipSpec::tcp("web", topo.vip(), PORT, &addrs);
    vip.health_check = format!(
        "kind = \"tcp\"\ninterval_ms = {INTERVAL_MS}\ntimeout_ms = {TIMEOUT_MS}\nrise = 2\nfall = {FALL}"
    );
    let text = render_config(&paths.instance, &paths.socket, &topo.lb_iface(), &[vip]);
    let agent = LbAgent::start_with(topo.lb_ns(), paths, &text, &[])?;
    for a in &addrs {
        agent.wait_health(Some("web"), (*a).into(), "up", Duration::from_secs(5))?;
    }
    Ok(Setup {
        agent,
        servers,
        topo,
    })
}

/// One HTTP/1.1 request to the agent's listener from inside `ns`:
/// (status code, body).
fn http(ns: &Netns, method: &str, path: &str) -> Result<(u16, String)> {
    ns.run(|| -> Result<(u16, String)> {
        let mut c = TcpStream::connect(METRICS_LISTEN)?;
        c.set_read_timeout(Some(Duration::from_secs(5)))?;
        write!(
            c,
            "{method} {path} HTTP/1.1\r\nHost: lb\r\nContent-Length: 0\r\nConnection: close\r\n\r\n"
        )?;
        let mut raw = String::new();
        c.read_to_string(&mut raw)?;
        let (head, body) = raw
            .split_once("\r\n\r\n")
            .with_context(|| format!("no header end in {raw:?}"))?;
        let code = head
            .split(' ')
            .nth(1)
            .and_then(|c| c.parse().ok())
            .with_context(|| format!("no status in {head:?}"))?;
        Ok((code, body.to_string()))
    })?
}

fn backend_health(json: &Value, addr: &str) -> Option<String> {
    json["backends"]
        .as_array()?
        .iter()
        .find(|b| b["address"] == addr)
        .and_then(|b| b["health"].as_str().map(str::to_string))
}

#[test]
fn status_json_has_vips_and_backends_with_health() -> Result<()> {
    let s = setup(2)?;
    let ns = s.topo.lb_ns();
    let (code, body) = http(ns, "GET", "/status.json")?;
    ensure!(code == 200, "GET /status.json: {code} {body}");
    let json: Value = serde_json::from_str(&body).context("parsing /status.json")?;
    ensure!(
        json["status"]["version"] == env!("CARGO_PKG_VERSION"),
        "version: {}",
        json["status"]
    );
    // The same views as the CLI's --json.
    ensure!(
        json["status"]["instance"] == s.agent.instance.as_str(),
        "status: {}",
        json["status"]
    );
    ensure!(json["status"]["backends_up"] == 2, "{}", json["status"]);
    let vips = json["vips"].as_array().context("vips")?;
    ensure!(vips.len() == 1, "vips: {vips:?}");
    ensure!(vips[0]["name"] == "web", "{vips:?}");
    ensure!(vips[0]["address"] == s.topo.vip().to_string(), "{vips:?}");
    ensure!(vips[0]["scheduler"].is_string(), "{vips:?}");
    let cli = s.agent.json(&["backend", "list"])?;
    for i in 0..2 {
        let a = s.topo.backend_addr(i).to_string();
        ensure!(
            backend_health(&json, &a).as_deref() == Some("up"),
            "{a} in {}",
            json["backends"]
        );
        ensure!(
            cli.as_array()
                .into_iter()
                .flatten()
                .any(|b| b["address"] == a.as_str() && b["health"] == "up"),
            "CLI: {cli}"
        );
    }
    ensure!(json["stats"]["reasons"].is_object(), "{}", json["stats"]);
    ensure!(
        json["stats"]["vips"][0]["vip"] == "web",
        "{}",
        json["stats"]
    );

    // The page itself, self-contained.
    let (code, page) = http(ns, "GET", "/")?;
    ensure!(
        code == 200 && page.contains("<title>lb status</title>") && page.contains("/status.json"),
        "GET /: {code} {page}"
    );
    // Read-only, and nothing else.
    let (code, _) = http(ns, "POST", "/status.json")?;
    ensure!(code == 405, "POST /status.json: {code}");
    let (code, _) = http(ns, "GET", "/nope")?;
    ensure!(code == 404, "GET /nope: {code}");
    let (code, metrics) = http(ns, "GET", "/metrics")?;
    ensure!(
        code == 200 && metrics.contains("lb_backend_up"),
        "{metrics}"
    );
    Ok(())
}

/// Where the screenshot goes: target/status-page.png.
fn target_dir() -> PathBuf {
    std::env::var_os("CARGO_TARGET_DIR")
        .map(PathBuf::from)
        .unwrap_or_else(|| Path::new(env!("CARGO_MANIFEST_DIR")).join("../target"))
}

fn find_in_path(name: &str) -> Option<PathBuf> {
    std::env::split_paths(&std::env::var_os("PATH")?)
        .map(|d| d.join(name))
        .find(|p| p.is_file())
}

/// chromedriver in the lb namespace, with a private TMPDIR; stopped with
/// `GET /shutdown` (then killed by its guard if it lingers).
struct Chromedriver {
    ns_name: String,
    tmp: PathBuf,
    child: Option<ChildGuard>,
}

impl Chromedriver {
    fn start(ns: &Netns) -> Result<Self> {
        let driver = find_in_path("chromedriver");
        assert!(
            driver.is_some() && Path::new(CHROMIUM).is_file(),
            "this test needs Chromium and chromedriver ({CHROMIUM} and chromedriver in PATH): \
             install them with `cargo xtask setup` (Debian packages chromium, chromium-driver)"
        );
        let tmp = std::env::temp_dir().join(format!("lb-status-page-{}", std::process::id()));
        std::fs::create_dir_all(&tmp)?;
        let mut cmd = ns.command(driver.unwrap());
        cmd.arg(format!("--port={CHROMEDRIVER_PORT}"))
            .env("TMPDIR", &tmp)
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::null());
        let mut d = Chromedriver {
            ns_name: ns.name().to_string(),
            tmp,
            child: Some(spawn_guarded(cmd)?),
        };
        let deadline = Instant::now() + Duration::from_secs(10);
        loop {
            if ns.run(|| TcpStream::connect(("127.0.0.1", CHROMEDRIVER_PORT)).is_ok())? {
                return Ok(d);
            }
            if let Some(c) = d.child.as_mut()
                && let Some(st) = c.try_wait()?
            {
                bail!("chromedriver exited at start: {st}");
            }
            ensure!(
                Instant::now() < deadline,
                "chromedriver not listening after 10 s"
            );
            thread::sleep(Duration::from_millis(50));
        }
    }
}

impl Drop for Chromedriver {
    fn drop(&mut self) {
        let path = format!("/var/run/netns/{}", self.ns_name);
        let ns_ok = Path::new(&path).exists();
        if ns_ok {
            // A plain GET /shutdown from inside the namespace.
            let _ = std::process::Command::new("ip")
                .args(["netns", "exec", &self.ns_name, "curl", "-s", "-m", "3"])
                .arg(format!("http://127.0.0.1:{CHROMEDRIVER_PORT}/shutdown"))
                .stdout(Stdio::null())
                .stderr(Stdio::null())
                .status();
        }
        if let Some(mut c) = self.child.take() {
            let _ = c.wait_timeout(Duration::from_secs(3));
            drop(c); // kills it if it is still running
        }
        let _ = std::fs::remove_dir_all(&self.tmp);
    }
}

/// Each backend row of the page: (address, health shown).
const ROWS_JS: &str = "return Array.from(document.querySelectorAll('#backends tr')).map(tr => \
    [tr.dataset.backend, (tr.querySelector('.health') || {}).textContent || '']);";

async fn rows(c: &fantoccini::Client) -> Result<Vec<(String, String)>> {
    let v = c.execute(ROWS_JS, vec![]).await?;
    Ok(serde_json::from_value(v)?)
}

/// Waits (bounded) until the page shows every `(address, health)` of
/// `want`; returns how long that took.
async fn wait_rows(
    c: &fantoccini::Client,
    want: &[(String, &str)],
    timeout: Duration,
) -> Result<Duration> {
    let start = Instant::now();
    loop {
        let now = rows(c).await?;
        if want
            .iter()
            .all(|(a, h)| now.iter().any(|(ra, rh)| ra == a && rh == h))
        {
            return Ok(start.elapsed());
        }
        if start.elapsed() >= timeout {
            bail!("the page shows {now:?}, not {want:?}, after {timeout:?}");
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

#[test]
fn status_page_in_a_browser_shows_a_backend_going_down() -> Result<()> {
    let mut s = setup(3)?;
    let ns = s.topo.lb_ns();
    let driver = Chromedriver::start(ns)?;
    let addrs: Vec<String> = (0..3).map(|i| s.topo.backend_addr(i).to_string()).collect();
    let vip: SocketAddr = SocketAddrV4::new(s.topo.vip(), PORT).into();

    // Some traffic for the charts while the page is open (bounded).
    let stop = AtomicBool::new(false);
    let client_ns = s.topo.client_ns();
    let screenshot = target_dir().join("status-page.png");
    let servers = &mut s.servers;
    let result = thread::scope(|scope| {
        let traffic = scope.spawn(|| {
            let mut port = 20000u16;
            let start = Instant::now();
            while !stop.load(Ordering::Relaxed) && start.elapsed() < Duration::from_secs(20) {
                let _ = get_from_ports(client_ns, vip, port..port + 20);
                port = if port >= 60000 { 20000 } else { port + 20 };
                thread::sleep(Duration::from_millis(50));
            }
        });
        let r = ns.run(|| browse(&addrs, servers, &screenshot));
        stop.store(true, Ordering::Relaxed);
        let _ = traffic.join();
        r
    });
    drop(driver);
    let shown_after = result??;
    eprintln!("the page showed the backend down {shown_after:?} after its server stopped");
    ensure!(
        std::fs::metadata(&screenshot)?.len() > 1000,
        "no screenshot at {}",
        screenshot.display()
    );
    Ok(())
}

/// Runs inside the lb namespace: opens the page, checks every backend up,
/// stops backend 0's server and waits for the page to show it down.
/// Returns how long that took.
fn browse(addrs: &[String], servers: &mut Vec<ChildGuard>, screenshot: &Path) -> Result<Duration> {
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()?;
    rt.block_on(async {
        let mut caps = serde_json::Map::new();
        caps.insert("browserName".into(), "chrome".into());
        caps.insert(
            "goog:chromeOptions".into(),
            serde_json::json!({
                "binary": CHROMIUM,
                "args": ["--headless=new", "--no-sandbox", "--disable-gpu",
                         "--disable-dev-shm-usage", "--window-size=1400,1000"],
            }),
        );
        let connector = hyper_util::client::legacy::connect::HttpConnector::new();
        let c = fantoccini::ClientBuilder::new(connector)
            .capabilities(caps)
            .connect(&format!("http://127.0.0.1:{CHROMEDRIVER_PORT}"))
            .await
            .context("starting Chromium through chromedriver")?;
        let r = async {
            c.goto(&format!("http://{METRICS_LISTEN}/")).await?;
            let all_up: Vec<(String, &str)> = addrs.iter().map(|a| (a.clone(), "up")).collect();
            wait_rows(&c, &all_up, Duration::from_secs(5))
                .await
                .context("every backend up on the page")?;
            let title = c.title().await?;
            ensure!(title == "lb status", "title {title:?}");
            // Let the charts get a few points of traffic.
            tokio::time::sleep(Duration::from_secs(3)).await;
            let server = servers.remove(0);
            server.kill()?;
            let stopped = Instant::now();
            let bound = Duration::from_millis(INTERVAL_MS * FALL + TIMEOUT_MS)
                + PAGE_REFRESH
                + Duration::from_secs(1);
            let mut want: Vec<(String, &str)> = vec![(addrs[0].clone(), "down")];
            want.extend(addrs[1..].iter().map(|a| (a.clone(), "up")));
            wait_rows(&c, &want, bound)
                .await
                .context("backend 0 down on the page")?;
            let took = stopped.elapsed();
            // One more refresh so the charts show the drop, then the picture.
            tokio::time::sleep(PAGE_REFRESH).await;
            let png = c.screenshot().await?;
            if let Some(dir) = screenshot.parent() {
                std::fs::create_dir_all(dir)?;
            }
            std::fs::write(screenshot, png)?;
            anyhow::Ok(took)
        }
        .await;
        let _ = c.close().await;
        r
    })
}
