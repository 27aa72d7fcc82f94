//! `LogSender`: the only way an attempt's log lines leave the agent. It redacts secrets,
//! buffers lines, caps what one attempt forwards, and sends them in batches numbered by line
//! (so a resend is idempotent).

use std::time::Duration;

use slimci_proto::EventBody;

use crate::events::Reporter;
use crate::redact::Redactor;

/// Log lines are sent at least this often while dbt runs.
pub const LOG_FLUSH_INTERVAL: Duration = Duration::from_millis(100);
/// ... or when this many are waiting.
const LOG_BATCH_LINES: usize = 500;
/// Log the agent forwards per attempt; past it one marker line, then nothing.
const MAX_FORWARDED_LOG_BYTES: u64 = 128 * 1024 * 1024;

/// Buffers log lines, redacts secrets, and sends them in numbered batches.
pub struct LogSender<'a> {
    reporter: &'a Reporter,
    redactor: Redactor,
    pending: Vec<String>,
    next_line: u64,
    bytes: u64,
    truncated: bool,
}

impl<'a> LogSender<'a> {
    pub fn new(reporter: &'a Reporter, redactor: Redactor) -> Self {
        LogSender {
            reporter,
            redactor,
            pending: Vec::new(),
            next_line: 0,
            bytes: 0,
            truncated: false,
        }
    }

    /// The redactor, for messages stored beside the log (the run's and its nodes').
    pub fn redactor(&self) -> &Redactor {
        &self.redactor
    }

    /// One line of output, redacted (a line the redactor holds back comes later).
    pub fn line(&mut self, text: String) {
        for line in self.redactor.line(text) {
            self.push(line);
        }
    }

    /// Sends what is pending, and the lines the redactor held back: the output has ended.
    pub fn finish(&mut self) {
        for line in self.redactor.finish() {
            self.push(line);
        }
        self.flush();
    }

    fn push(&mut self, text: String) {
        if self.truncated {
            return;
        }
        self.bytes += text.len() as u64 + 1;
        if self.bytes > MAX_FORWARDED_LOG_BYTES {
            self.truncated = true;
            self.pending.push(
                "[slimci] the build printed more log than the agent forwards; the rest is dropped"
                    .to_owned(),
            );
        } else {
            self.pending.push(text);
        }
        if self.pending.len() >= LOG_BATCH_LINES {
            self.flush();
        }
    }

    /// A line of slimci's own, with the time.
    pub fn slimci(&mut self, text: impl std::fmt::Display) {
        let time = chrono::Utc::now().format("%H:%M:%S");
        self.line(format!("{time}  [slimci] {text}"));
    }

    /// Sends the pending lines as one batch.
    pub fn flush(&mut self) {
        if self.pending.is_empty() {
            return;
        }
        let lines = std::mem::take(&mut self.pending);
        let first_line = self.next_line;
        self.next_line += lines.len() as u64;
        self.reporter.send(EventBody::Log { first_line, lines });
    }
}
