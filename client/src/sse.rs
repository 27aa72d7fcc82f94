//! The log stream, `GET /api/v1/runs/{id}/logs?follow=true`: server-sent events parsed into
//! [`LogEvent`]s.

use futures::StreamExt;
use futures::stream::BoxStream;

use crate::views::{LogEnd, Progress};

/// One server-sent event as it arrived.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SseEvent {
    pub name: String,
    pub data: String,
    pub id: Option<String>,
}

/// Where the first complete event in `buffer` ends (after its blank line), if one is complete.
pub fn find_event_end(buffer: &[u8]) -> Option<usize> {
    buffer
        .windows(2)
        .position(|window| window == b"\n\n")
        .map(|at| at + 2)
}

/// Reads one event's `event:`, `data:` and `id:` lines; comments and other fields are ignored.
pub fn parse_event(raw: &str) -> SseEvent {
    let mut event = SseEvent {
        name: "message".to_owned(),
        data: String::new(),
        id: None,
    };
    let mut data_lines = Vec::new();
    for line in raw.lines() {
        if let Some(value) = line.strip_prefix("event:") {
            event.name = value.trim_start().to_owned();
        } else if let Some(value) = line.strip_prefix("data:") {
            data_lines.push(value.strip_prefix(' ').unwrap_or(value).to_owned());
        } else if let Some(value) = line.strip_prefix("id:") {
            event.id = Some(value.trim().to_owned());
        }
    }
    event.data = data_lines.join("\n");
    event
}

/// What the log stream says.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum LogEvent {
    /// A log line; `number` counts lines over all attempts, from 1 (resume after it).
    Line {
        number: Option<u64>,
        text: String,
    },
    Progress(Progress),
    /// The run ended; the stream closes after this. `None` if its data could not be read.
    End(Option<LogEnd>),
}

impl LogEvent {
    fn from_sse(event: SseEvent) -> Option<LogEvent> {
        match event.name.as_str() {
            "log" => Some(LogEvent::Line {
                number: event.id.and_then(|id| id.parse().ok()),
                text: event.data,
            }),
            "progress" => serde_json::from_str(&event.data)
                .ok()
                .map(LogEvent::Progress),
            "end" => Some(LogEvent::End(serde_json::from_str(&event.data).ok())),
            _ => None,
        }
    }
}

/// An open log stream.
pub struct LogStream {
    body: BoxStream<'static, reqwest::Result<bytes::Bytes>>,
    buffer: Vec<u8>,
}

impl LogStream {
    pub(crate) fn new(response: reqwest::Response) -> LogStream {
        LogStream {
            body: response.bytes_stream().boxed(),
            buffer: Vec::new(),
        }
    }

    /// The next event, or `None` once the stream closed (after `End`, or because the
    /// connection broke or the coordinator restarted).
    pub async fn next(&mut self) -> Option<LogEvent> {
        loop {
            while let Some(end) = find_event_end(&self.buffer) {
                let raw: Vec<u8> = self.buffer.drain(..end).collect();
                if let Some(event) = LogEvent::from_sse(parse_event(&String::from_utf8_lossy(&raw)))
                {
                    return Some(event);
                }
            }
            match self.body.next().await {
                Some(Ok(chunk)) => self.buffer.extend_from_slice(&chunk),
                Some(Err(_)) | None => return None,
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::status::RunStatus;

    #[test]
    fn server_sent_events_parse() {
        let raw = "event: log\nid: 7\ndata: 14:15:56  1 of 2 OK\n\n";
        let end = find_event_end(raw.as_bytes()).unwrap();
        let event = parse_event(&raw[..end]);
        assert_eq!(event.name, "log");
        assert_eq!(event.id.as_deref(), Some("7"));
        assert_eq!(event.data, "14:15:56  1 of 2 OK");
    }

    #[test]
    fn events_become_log_events() {
        let event = |raw: &str| LogEvent::from_sse(parse_event(raw));
        assert_eq!(
            event("event: log\nid: 3\ndata: hello\n\n"),
            Some(LogEvent::Line {
                number: Some(3),
                text: "hello".into()
            })
        );
        assert_eq!(
            event("event: progress\ndata: {\"done\":2,\"total\":5}\n\n"),
            Some(LogEvent::Progress(Progress { done: 2, total: 5 }))
        );
        assert_eq!(
            event("event: end\ndata: {\"status\":\"failed\",\"message\":null}\n\n"),
            Some(LogEvent::End(Some(LogEnd {
                status: RunStatus::Failed,
                message: None
            })))
        );
        assert_eq!(event(": keep-alive\n\n"), None);
    }
}
