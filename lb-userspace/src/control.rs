//! The control protocol between `lb` subcommands and the running agent:
//! one JSON request line over the agent's Unix socket, one JSON reply line.

use std::{
    collections::BTreeMap,
    io::{BufRead, BufReader, Write},
    net::{Ipv4Addr, SocketAddrV4},
    os::unix::net::UnixStream,
    path::Path,
    time::Duration,
};

use serde::{Deserialize, Serialize};

use crate::config::Protocol;

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
    pub health: String,
    pub last_check: Option<String>,
    /// Ring slots this backend owns now.
    pub slots: u32,
    pub mac: Option<String>,
    pub iface: Option<String>,
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
    pub health: String,
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
