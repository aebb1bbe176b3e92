//! The control protocol between `lb` subcommands and the running agent:
//! one JSON request line over the agent's Unix socket, one JSON reply line.
//! Both ends live here: [`call`] for the CLI, [`bind`] and [`serve`] for
//! the agent.

use std::{
    collections::BTreeMap,
    io::{BufRead, BufReader, Write},
    net::{Ipv4Addr, SocketAddrV4},
    os::unix::net::UnixStream,
    path::Path,
    time::Duration,
};

use anyhow::{Context as _, bail};
use serde::{Deserialize, Serialize};
use tokio::{
    io::{AsyncBufReadExt, AsyncWriteExt},
    net::UnixListener,
    sync::{mpsc, oneshot},
};

use crate::{config::Protocol, timing};

#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(tag = "cmd", rename_all = "snake_case")]
pub enum Request {
    Status,
    VipList,
    BackendList {
        vip: Option<String>,
    },
    BackendAdd {
        vip: String,
        address: Ipv4Addr,
        weight: u32,
    },
    BackendRemove {
        vip: String,
        address: Ipv4Addr,
    },
    BackendDrain {
        vip: String,
        address: Ipv4Addr,
    },
    BackendUndrain {
        vip: String,
        address: Ipv4Addr,
    },
    BackendSetWeight {
        vip: String,
        address: Ipv4Addr,
        weight: u32,
    },
    Stats,
    Explain {
        src: SocketAddrV4,
        dst: SocketAddrV4,
        protocol: Protocol,
    },
    Reload,
    /// Drops CLI overrides: all, a VIP's, or one backend's.
    OverrideClear {
        vip: Option<String>,
        address: Option<Ipv4Addr>,
    },
}

#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct Reply {
    pub ok: bool,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub error: Option<String>,
    #[serde(default)]
    pub data: serde_json::Value,
}

impl Reply {
    pub fn ok(data: impl Serialize) -> Self {
        Self {
            ok: true,
            error: None,
            data: serde_json::to_value(data).unwrap_or(serde_json::Value::Null),
        }
    }

    pub fn err(e: impl std::fmt::Display) -> Self {
        Self {
            ok: false,
            error: Some(e.to_string()),
            data: serde_json::Value::Null,
        }
    }
}

#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct InterfaceView {
    pub name: String,
    pub ifindex: u32,
    pub mode: String,
}

#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct StatusView {
    pub instance: String,
    pub pid: u32,
    pub uptime_s: u64,
    pub config: String,
    pub pin_dir: String,
    /// The data path was found pinned by an earlier agent and kept.
    pub restored: bool,
    pub interfaces: Vec<InterfaceView>,
    pub vips: usize,
    pub backends: usize,
    pub backends_up: usize,
    pub metrics: Option<String>,
    /// Changes made with the CLI on top of the file (kept by reloads).
    #[serde(default)]
    pub overrides: Vec<OverrideView>,
}

/// A CLI change in force on top of the configuration file.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct OverrideView {
    pub vip: String,
    pub address: Ipv4Addr,
    /// e.g. "added", "removed", "state drain (file: active)".
    pub change: String,
}

#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct VipView {
    pub name: String,
    pub address: Ipv4Addr,
    pub port: u16,
    pub protocol: Protocol,
    pub index: u32,
    pub ring_size: u32,
    pub backends: usize,
    pub backends_in_ring: usize,
    pub health_check: String,
}

#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct BackendView {
    pub vip: String,
    pub address: Ipv4Addr,
    pub id: u32,
    pub weight: u32,
    pub state: String,
    pub health: Health,
    pub last_check: Option<String>,
    /// Ring slots this backend owns now.
    pub slots: u32,
    pub mac: Option<String>,
    pub iface: Option<String>,
    /// Conntrack records naming this backend that have not expired, as
    /// last counted (the agent counts every few seconds); None before the
    /// first count.
    #[serde(default)]
    pub flows: Option<u64>,
}

/// A backend's health as the agent sees it.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Health {
    /// Passing its checks, next hop resolved: in the ring.
    Up,
    /// Failing its checks: out of the ring.
    Down,
    /// Its next hop is unknown: out of the ring whatever its checks say.
    Unresolved,
}

impl Health {
    pub fn as_str(self) -> &'static str {
        match self {
            Health::Up => "up",
            Health::Down => "down",
            Health::Unresolved => "unresolved",
        }
    }
}

impl std::fmt::Display for Health {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.pad(self.as_str())
    }
}

#[derive(Clone, Debug, Default, Serialize, Deserialize)]
pub struct Rates {
    pub packets: u64,
    pub bytes: u64,
    pub pps: f64,
    pub bps: f64,
}

#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct VipStatsView {
    pub vip: String,
    #[serde(flatten)]
    pub traffic: Rates,
    pub new_flows: u64,
    pub new_flows_ps: f64,
    pub conntrack_hits: u64,
    /// Conntrack hits / packets over the last interval (all time if idle).
    pub conntrack_hit_ratio: f64,
}

#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct BackendStatsView {
    pub vip: String,
    pub address: Ipv4Addr,
    pub health: Health,
    #[serde(flatten)]
    pub traffic: Rates,
}

#[derive(Clone, Debug, Default, Serialize, Deserialize)]
pub struct StatsView {
    pub interval_s: f64,
    pub vips: Vec<VipStatsView>,
    pub backends: Vec<BackendStatsView>,
    /// reason → (total, per second)
    pub reasons: BTreeMap<String, (u64, f64)>,
}

#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct ExplainView {
    pub vip: String,
    pub hash: u32,
    pub slot: u32,
    pub ring_size: u32,
    /// The backend the ring gives a new flow.
    pub ring_backend: Option<Ipv4Addr>,
    /// The backend a conntrack entry holds for this flow, if any.
    pub conntrack_backend: Option<Ipv4Addr>,
    /// Where the next packet of this flow goes.
    pub backend: Option<Ipv4Addr>,
    pub reason: String,
}

#[derive(Debug, thiserror::Error)]
pub enum ClientError {
    #[error(
        "no lb agent is listening on {0} (start one with `lb run --config FILE`, or pass --socket)"
    )]
    NoAgent(String),
    #[error("permission denied on {0}: run lb as root")]
    Permission(String),
    #[error("talking to the agent on {path}: {source}")]
    Io {
        path: String,
        source: std::io::Error,
    },
    #[error("the agent sent a reply that is not JSON: {0}")]
    BadReply(serde_json::Error),
    #[error("{0}")]
    Agent(String),
}

/// Sends one request and waits for the reply (bounded by `timeout`).
pub fn call(
    socket: &Path,
    req: &Request,
    timeout: Duration,
) -> Result<serde_json::Value, ClientError> {
    let shown = socket.display().to_string();
    let mut stream = UnixStream::connect(socket).map_err(|e| match e.kind() {
        std::io::ErrorKind::NotFound | std::io::ErrorKind::ConnectionRefused => {
            ClientError::NoAgent(shown.clone())
        }
        std::io::ErrorKind::PermissionDenied => ClientError::Permission(shown.clone()),
        _ => ClientError::Io {
            path: shown.clone(),
            source: e,
        },
    })?;
    let io = |source| ClientError::Io {
        path: shown.clone(),
        source,
    };
    stream.set_read_timeout(Some(timeout)).map_err(io)?;
    stream.set_write_timeout(Some(timeout)).map_err(io)?;
    let mut line = serde_json::to_string(req).expect("requests serialize");
    line.push('\n');
    stream.write_all(line.as_bytes()).map_err(io)?;
    let mut reply = String::new();
    BufReader::new(&stream).read_line(&mut reply).map_err(io)?;
    let reply: Reply = serde_json::from_str(&reply).map_err(ClientError::BadReply)?;
    if reply.ok {
        Ok(reply.data)
    } else {
        Err(ClientError::Agent(
            reply.error.unwrap_or_else(|| "unknown error".into()),
        ))
    }
}

/// A request from a control client and where its reply goes.
pub type ControlMsg = (Request, oneshot::Sender<Reply>);

/// Binds the agent's control socket, refusing to steal it from a running
/// agent and replacing a stale one.
pub fn bind(path: &Path) -> anyhow::Result<UnixListener> {
    if let Some(dir) = path.parent() {
        std::fs::create_dir_all(dir).with_context(|| format!("creating {}", dir.display()))?;
    }
    if path.exists() {
        if UnixStream::connect(path).is_ok() {
            bail!(
                "another lb agent is already listening on {}; stop it first or use another instance",
                path.display()
            );
        }
        let _ = std::fs::remove_file(path);
    }
    UnixListener::bind(path)
        .with_context(|| format!("binding the control socket {}", path.display()))
}

/// Accepts control clients forever: reads one request line from each,
/// hands it to the agent over `tx` and writes back the reply.
pub async fn serve(listener: UnixListener, tx: mpsc::Sender<ControlMsg>) {
    loop {
        let Ok((stream, _)) = listener.accept().await else {
            continue;
        };
        let tx = tx.clone();
        tokio::spawn(async move {
            let (r, mut w) = stream.into_split();
            let mut line = String::new();
            let mut r = tokio::io::BufReader::new(r);
            let read = tokio::time::timeout(timing::CONTROL_READ_TIMEOUT, r.read_line(&mut line));
            let reply = match read.await {
                Ok(Ok(n)) if n > 0 => match serde_json::from_str::<Request>(&line) {
                    Ok(req) => {
                        let (otx, orx) = oneshot::channel();
                        if tx.send((req, otx)).await.is_err() {
                            Reply::err("the agent is shutting down")
                        } else {
                            orx.await
                                .unwrap_or_else(|_| Reply::err("the agent is shutting down"))
                        }
                    }
                    Err(e) => Reply::err(format!("bad request: {e}")),
                },
                _ => return,
            };
            let mut out = serde_json::to_string(&reply).unwrap_or_default();
            out.push('\n');
            let _ = w.write_all(out.as_bytes()).await;
        });
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn requests_round_trip_as_json_lines() {
        let reqs = [
            Request::Status,
            Request::BackendDrain {
                vip: "web".into(),
                address: Ipv4Addr::new(198, 18, 0, 11),
            },
            Request::Explain {
                src: "198.18.0.1:40000".parse().unwrap(),
                dst: "198.19.0.1:80".parse().unwrap(),
                protocol: Protocol::Tcp,
            },
        ];
        for r in reqs {
            let s = serde_json::to_string(&r).unwrap();
            assert!(!s.contains('\n'));
            assert_eq!(serde_json::from_str::<Request>(&s).unwrap(), r);
        }
    }

    #[test]
    fn a_missing_socket_says_no_agent_runs() {
        let e = call(
            Path::new("/nonexistent/lb.sock"),
            &Request::Status,
            Duration::from_secs(1),
        )
        .unwrap_err();
        assert!(matches!(e, ClientError::NoAgent(_)), "{e}");
        assert!(e.to_string().contains("lb run"));
    }
}
