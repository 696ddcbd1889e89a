//! The admin socket's protocol: one JSON request per line, one JSON response per line.
//! `{"cmd":"queue_show","id":"..."}` -> `{"ok":true,"data":{...}}` or
//! `{"ok":false,"error":"..."}`. The data types are in [`crate::ops::model`].

use serde::{Deserialize, Serialize};

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(tag = "cmd", rename_all = "snake_case")]
pub enum Request {
    /// -> `StatusReport`
    Status,
    /// -> `Vec<QueueEntry>`
    QueueList,
    /// -> `QueueDetail`
    QueueShow {
        id: String,
    },
    /// `id: None` = every queued message. -> `{"retried": n}`
    QueueRetry {
        id: Option<String>,
    },
    QueueHold {
        id: String,
    },
    QueueRelease {
        id: String,
    },
    /// Never bounces.
    QueueDelete {
        id: String,
    },
    /// The dead letters in failed/. -> `Vec<QueueEntry>`
    QueueFailed,
    /// failed/ -> queue/.
    QueueRequeue {
        id: String,
    },
    /// -> `Vec<SenderRecord>`
    Senders,
    /// The last recipient outcomes. -> `Vec<DeliveryRecord>`
    Recent,
    /// -> `{"applied": [...]}` or an error listing every problem.
    Reload,
}

#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct Response {
    pub ok: bool,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub error: Option<String>,
    #[serde(default, skip_serializing_if = "serde_json::Value::is_null")]
    pub data: serde_json::Value,
}

impl Response {
    pub fn ok(data: impl Serialize) -> Response {
        Response {
            ok: true,
            error: None,
            data: serde_json::to_value(data).unwrap_or(serde_json::Value::Null),
        }
    }

    pub fn error(msg: impl Into<String>) -> Response {
        Response {
            ok: false,
            error: Some(msg.into()),
            data: serde_json::Value::Null,
        }
    }
}

/// The longest request or response line accepted.
pub const MAX_LINE: usize = 16 * 1024 * 1024;
