//! The live status page, served on the metrics listener next to
//! `/metrics`: `/` (or `/status`) is one embedded HTML file (inline CSS
//! and JS, charts drawn on `<canvas>`; nothing fetched from elsewhere),
//! which polls `/status.json`.
//!
//! `/status.json` is the control socket's own replies, asked for through
//! the same channel the socket uses (no second implementation of the
//! views): `{"status", "vips", "backends", "stats"}` are what
//! `lb status --json`, `lb vip list --json`, `lb backend list --json` and
//! `lb stats --json` print. The page keeps the rate history for its charts
//! itself, since it was opened.
//!
//! Read-only: GET and HEAD only (405 for other methods on these paths),
//! 404 for unknown paths.

use std::time::Duration;

use serde_json::{Map, Value};
use tokio::sync::{mpsc, oneshot};

use crate::control::{ControlMsg, Reply, Request};

/// The page, embedded in the binary.
pub const PAGE: &str = include_str!("status_page.html");

/// How long `/status.json` waits for the agent's answers.
pub const ANSWER_TIMEOUT: Duration = Duration::from_secs(5);

/// What a request to the metrics listener asks for.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Route {
    Metrics,
    Page,
    Json,
    /// A known path with a method other than GET or HEAD.
    MethodNotAllowed,
    NotFound,
}

/// Routes a request by method and path (`status_page`: whether the page
/// and its JSON are served).
pub fn route(method: &str, path: &str, status_page: bool) -> Route {
    let known = match path {
        "/metrics" => Route::Metrics,
        "/" | "/status" | "/status/" if status_page => Route::Page,
        "/status.json" if status_page => Route::Json,
        _ => return Route::NotFound,
    };
    if method == "GET" || method == "HEAD" {
        known
    } else {
        Route::MethodNotAllowed
    }
}

/// The control requests `/status.json` is made of, with their keys.
pub fn requests() -> [(&'static str, Request); 4] {
    [
        ("status", Request::Status),
        ("vips", Request::VipList),
        ("backends", Request::BackendList { vip: None }),
        ("stats", Request::Stats),
    ]
}

/// Puts the replies together: the first failed reply is the error.
pub fn assemble(replies: Vec<(&str, Reply)>) -> Result<Value, String> {
    let mut out = Map::new();
    for (key, reply) in replies {
        if !reply.ok {
            return Err(format!(
                "{key}: {}",
                reply.error.unwrap_or_else(|| "failed".into())
            ));
        }
        out.insert(key.into(), reply.data);
    }
    Ok(Value::Object(out))
}

/// Asks the agent, through the control channel, for every view of
/// `/status.json` (bounded by [`ANSWER_TIMEOUT`]).
pub async fn status_json(control: &mpsc::Sender<ControlMsg>) -> Result<Value, String> {
    let ask = async {
        let mut replies = Vec::new();
        for (key, req) in requests() {
            let (tx, rx) = oneshot::channel();
            control
                .send((req, tx))
                .await
                .map_err(|_| "the agent is stopping".to_string())?;
            let reply = rx.await.map_err(|_| "the agent is stopping".to_string())?;
            replies.push((key, reply));
        }
        assemble(replies)
    };
    tokio::time::timeout(ANSWER_TIMEOUT, ask)
        .await
        .unwrap_or_else(|_| Err(format!("no answer from the agent in {ANSWER_TIMEOUT:?}")))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn routes_paths_and_methods() {
        assert_eq!(route("GET", "/metrics", true), Route::Metrics);
        assert_eq!(route("GET", "/metrics", false), Route::Metrics);
        assert_eq!(route("GET", "/", true), Route::Page);
        assert_eq!(route("GET", "/status", true), Route::Page);
        assert_eq!(route("HEAD", "/", true), Route::Page);
        assert_eq!(route("GET", "/status.json", true), Route::Json);
        assert_eq!(route("POST", "/status.json", true), Route::MethodNotAllowed);
        assert_eq!(route("DELETE", "/", true), Route::MethodNotAllowed);
        assert_eq!(route("PUT", "/metrics", true), Route::MethodNotAllowed);
        assert_eq!(route("GET", "/nope", true), Route::NotFound);
        assert_eq!(route("POST", "/nope", true), Route::NotFound);
        assert_eq!(route("GET", "/status.json/x", true), Route::NotFound);
        // Page off: only /metrics.
        assert_eq!(route("GET", "/", false), Route::NotFound);
        assert_eq!(route("GET", "/status.json", false), Route::NotFound);
    }

    #[test]
    fn assembles_the_control_replies_under_their_keys() {
        let replies = vec![
            ("status", Reply::ok(serde_json::json!({"uptime_s": 3}))),
            ("vips", Reply::ok(serde_json::json!([{"name": "web"}]))),
            (
                "backends",
                Reply::ok(serde_json::json!([{"address": "198.18.0.11", "health": "up"}])),
            ),
            ("stats", Reply::ok(serde_json::json!({"interval_s": 1.0}))),
        ];
        let v = assemble(replies).unwrap();
        assert_eq!(v.as_object().unwrap().len(), 4);
        assert_eq!(v["status"]["uptime_s"], 3);
        assert_eq!(v["vips"][0]["name"], "web");
        assert_eq!(v["backends"][0]["health"], "up");
        assert_eq!(v["stats"]["interval_s"], 1.0);
    }

    #[test]
    fn a_failed_reply_is_the_error() {
        let replies = vec![
            ("status", Reply::ok(1)),
            ("vips", Reply::err("no such thing")),
        ];
        assert_eq!(
            assemble(replies).unwrap_err(),
            "vips: no such thing".to_string()
        );
    }

    /// The same requests the CLI sends for its `--json` views, answered by
    /// a stand-in agent loop.
    #[tokio::test]
    async fn asks_the_agent_through_the_control_channel() {
        let (tx, mut rx) = mpsc::channel::<ControlMsg>(4);
        let agent = tokio::spawn(async move {
            let mut seen = Vec::new();
            while let Some((req, reply)) = rx.recv().await {
                seen.push(req.clone());
                let data = serde_json::to_value(&req).unwrap();
                let _ = reply.send(Reply::ok(data));
            }
            seen
        });
        let v = status_json(&tx).await.unwrap();
        drop(tx);
        assert_eq!(v["status"]["cmd"], "status");
        assert_eq!(v["vips"]["cmd"], "vip_list");
        assert_eq!(v["backends"]["cmd"], "backend_list");
        assert_eq!(v["stats"]["cmd"], "stats");
        assert_eq!(agent.await.unwrap().len(), 4);
    }

    #[test]
    fn the_page_is_self_contained() {
        assert!(PAGE.contains("status.json"));
        for external in ["http://", "https://", "//cdn", "<script src", "<link "] {
            assert!(!PAGE.contains(external), "the page refers to {external}");
        }
    }
}
