//! Run logs on disk: one file per attempt, `logs/<run>/<attempt>.log`, one line per dbt line.
//!
//! Agents send lines in batches tagged with the index of their first line; [`LogStore::append`]
//! keeps only lines past what the file already holds, so a resent batch is harmless. Each run's
//! log is capped; past the cap one marker line is written and the rest dropped.

use std::collections::{HashMap, VecDeque};
use std::io::{BufRead, Write};
use std::path::{Path, PathBuf};
use std::sync::Mutex;

use slimci_proto::{Attempt, RunId};

/// Longest line kept: the agent's 64 KiB with room for the note it adds to a line it cut (so
/// its lines pass whole). Lines also come from the coordinator's own writers (a dbt Cloud run's
/// step logs), and a reader takes whole lines of at most a few MiB at a time.
pub const MAX_LINE_BYTES: usize = 64 * 1024 + 256;

/// Written once when a run's log reaches its cap.
pub const TRUNCATION_MARKER: &str =
    "[slimci] log truncated: this run printed more than the configured log limit";

#[derive(Debug, thiserror::Error)]
#[error("log file {path}: {source}")]
pub struct LogError {
    path: PathBuf,
    source: std::io::Error,
}

#[derive(Default)]
struct FileState {
    lines: u64,
    bytes: u64,
    truncated: bool,
}

pub struct LogStore {
    dir: PathBuf,
    max_bytes_per_attempt: u64,
    open: Mutex<HashMap<(RunId, Attempt), FileState>>,
}

impl LogStore {
    pub fn new(dir: PathBuf, max_bytes_per_attempt: u64) -> LogStore {
        LogStore {
            dir,
            max_bytes_per_attempt,
            open: Mutex::new(HashMap::new()),
        }
    }

    pub fn path(&self, run: RunId, attempt: Attempt) -> PathBuf {
        self.dir
            .join(run.to_string())
            .join(format!("{attempt}.log"))
    }

    fn state_of(path: &Path) -> std::io::Result<FileState> {
        let file = match std::fs::File::open(path) {
            Ok(file) => file,
            Err(error) if error.kind() == std::io::ErrorKind::NotFound => {
                return Ok(FileState::default());
            }
            Err(error) => return Err(error),
        };
        let mut state = FileState::default();
        for line in std::io::BufReader::new(file).split(b'\n') {
            let line = line?;
            state.bytes += line.len() as u64 + 1;
            if line == TRUNCATION_MARKER.as_bytes() {
                state.truncated = true;
            } else {
                state.lines += 1;
            }
        }
        Ok(state)
    }

    /// Appends the lines of a batch that starts at line `first_line`, skipping those already
    /// written. Returns how many lines were new.
    pub fn append(
        &self,
        run: RunId,
        attempt: Attempt,
        first_line: u64,
        lines: &[String],
    ) -> Result<usize, LogError> {
        let path = self.path(run, attempt);
        let error = |source| LogError {
            path: path.clone(),
            source,
        };
        let mut open = self.open.lock().expect("log state lock");
        if let std::collections::hash_map::Entry::Vacant(e) = open.entry((run, attempt)) {
            let state = Self::state_of(&path).map_err(error)?;
            e.insert(state);
        }
        let state = open.get_mut(&(run, attempt)).expect("inserted above");
        let skip = state.lines.saturating_sub(first_line) as usize;
        if skip >= lines.len() || first_line > state.lines || state.truncated {
            // Past the cap, nothing more is kept. A gap (first_line beyond what we hold) means
            // a batch went missing; writing would misnumber lines, so wait for the resend.
            return Ok(0);
        }
        std::fs::create_dir_all(path.parent().expect("log path has a parent")).map_err(error)?;
        let mut file = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(&path)
            .map_err(error)?;
        let mut buffer = Vec::new();
        let mut written = 0;
        for line in &lines[skip..] {
            let clean = cut_line(line.replace(['\r', '\n'], " "));
            if state.bytes + clean.len() as u64 + 1 > self.max_bytes_per_attempt {
                buffer.extend_from_slice(TRUNCATION_MARKER.as_bytes());
                buffer.push(b'\n');
                state.truncated = true;
                break;
            }
            buffer.extend_from_slice(clean.as_bytes());
            buffer.push(b'\n');
            state.bytes += clean.len() as u64 + 1;
            state.lines += 1;
            written += 1;
        }
        file.write_all(&buffer).map_err(error)?;
        Ok(written)
    }

    /// Forgets cached counters of a finished attempt.
    pub fn close(&self, run: RunId, attempt: Attempt) {
        self.open
            .lock()
            .expect("log state lock")
            .remove(&(run, attempt));
    }

    /// The bytes of an attempt's log from `offset` on (only whole lines), and the new offset.
    /// A read takes at most 4 MiB, which holds whole lines since `append` cuts them at
    /// [`MAX_LINE_BYTES`].
    pub fn read_from(
        &self,
        run: RunId,
        attempt: Attempt,
        offset: u64,
    ) -> Result<(Vec<String>, u64), LogError> {
        use std::io::{Read, Seek, SeekFrom};
        let path = self.path(run, attempt);
        let error = |source| LogError {
            path: path.clone(),
            source,
        };
        let mut file = match std::fs::File::open(&path) {
            Ok(file) => file,
            Err(source) if source.kind() == std::io::ErrorKind::NotFound => {
                return Ok((Vec::new(), offset));
            }
            Err(source) => return Err(error(source)),
        };
        file.seek(SeekFrom::Start(offset)).map_err(error)?;
        let mut bytes = Vec::new();
        file.take(4 * 1024 * 1024)
            .read_to_end(&mut bytes)
            .map_err(error)?;
        let complete = bytes
            .iter()
            .rposition(|&byte| byte == b'\n')
            .map_or(0, |at| at + 1);
        let lines = bytes[..complete]
            .split_inclusive(|&byte| byte == b'\n')
            .map(|line| String::from_utf8_lossy(&line[..line.len() - 1]).into_owned())
            .collect();
        Ok((lines, offset + complete as u64))
    }
}

/// A reader's place in a run's log, across its attempts: every reader of a log (the API's text
/// and event stream, the run page's tail and text) walks it with one, so lines are numbered the
/// same everywhere: from 1, across attempts, as the event stream's `id`s are.
#[derive(Debug, Clone)]
pub struct LogCursor {
    run: RunId,
    attempt: Attempt,
    offset: u64,
    line_number: u64,
}

/// A line of a run's log and its number.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct NumberedLine {
    pub attempt: Attempt,
    pub number: u64,
    pub text: String,
}

impl LogCursor {
    /// At the start of `run`'s first attempt.
    pub fn new(run: RunId) -> LogCursor {
        LogCursor {
            run,
            attempt: Attempt(1),
            offset: 0,
            line_number: 0,
        }
    }

    /// The attempt it reads.
    pub fn attempt(&self) -> Attempt {
        self.attempt
    }

    /// The whole lines written past the cursor, up to attempt `last` (the run's current
    /// one), at most one read's worth; empty when there is nothing more for now. Lines of an
    /// attempt before `last` are final, so the cursor moves on to the next attempt once it
    /// read them all.
    pub fn next_lines(
        &mut self,
        logs: &LogStore,
        last: Attempt,
    ) -> Result<Vec<NumberedLine>, LogError> {
        loop {
            let (lines, next) = logs.read_from(self.run, self.attempt, self.offset)?;
            if !lines.is_empty() {
                self.offset = next;
                let attempt = self.attempt;
                return Ok(lines
                    .into_iter()
                    .map(|text| {
                        self.line_number += 1;
                        NumberedLine {
                            attempt,
                            number: self.line_number,
                            text,
                        }
                    })
                    .collect());
            }
            if self.attempt >= last {
                return Ok(Vec::new());
            }
            self.attempt = Attempt(self.attempt.0 + 1);
            self.offset = 0;
        }
    }
}

impl LogStore {
    /// Every line of `run`'s attempts up to `last`, in order, given to `each`.
    pub fn each_line(
        &self,
        run: RunId,
        last: Attempt,
        mut each: impl FnMut(NumberedLine),
    ) -> Result<(), LogError> {
        let mut cursor = LogCursor::new(run);
        loop {
            let lines = cursor.next_lines(self, last)?;
            if lines.is_empty() {
                return Ok(());
            }
            lines.into_iter().for_each(&mut each);
        }
    }

    /// The last `n` lines up to attempt `last`, and how many lines there are in all (numbered
    /// as a [`LogCursor`] numbers them), without reading every line: a run page shows the end
    /// of a log that may hold `max_bytes_per_attempt` per attempt.
    pub fn tail(
        &self,
        run: RunId,
        last: Attempt,
        n: usize,
    ) -> Result<(Vec<String>, u64), LogError> {
        let mut total = 0;
        let mut tail: VecDeque<String> = VecDeque::with_capacity(n);
        for attempt in (1..=last.0).rev() {
            let path = self.path(run, Attempt(attempt));
            let error = |source| LogError {
                path: path.clone(),
                source,
            };
            total += count_lines(&path).map_err(error)?;
            if tail.len() < n {
                for line in last_lines(&path, n - tail.len())
                    .map_err(error)?
                    .into_iter()
                    .rev()
                {
                    tail.push_front(line);
                }
            }
        }
        Ok((tail.into(), total))
    }

    /// The whole log as text; a run of more than one attempt gets a `[slimci] attempt N` line
    /// before each attempt's lines.
    pub fn whole_text(&self, run: RunId, last: Attempt) -> Result<String, LogError> {
        let mut text = String::new();
        let mut headed = 0;
        let mut head_up_to = |text: &mut String, attempt: u32| {
            while last.0 > 1 && headed < attempt {
                headed += 1;
                text.push_str(&format!("[slimci] attempt {headed}\n"));
            }
        };
        self.each_line(run, last, |line| {
            head_up_to(&mut text, line.attempt.0);
            text.push_str(&line.text);
            text.push('\n');
        })?;
        head_up_to(&mut text, last.0);
        Ok(text)
    }
}

/// The whole lines of a log file (what a [`LogCursor`] reads of it); 0 if there is none.
fn count_lines(path: &Path) -> std::io::Result<u64> {
    use std::io::Read;
    let mut file = match std::fs::File::open(path) {
        Ok(file) => file,
        Err(error) if error.kind() == std::io::ErrorKind::NotFound => return Ok(0),
        Err(error) => return Err(error),
    };
    let mut buffer = vec![0u8; 1 << 20];
    let mut lines = 0;
    loop {
        let read = file.read(&mut buffer)?;
        if read == 0 {
            return Ok(lines);
        }
        lines += buffer[..read].iter().filter(|&&byte| byte == b'\n').count() as u64;
    }
}

/// The last `n` whole lines of a log file, read from its end.
fn last_lines(path: &Path, n: usize) -> std::io::Result<Vec<String>> {
    use std::io::{Read, Seek, SeekFrom};
    let mut file = match std::fs::File::open(path) {
        Ok(file) => file,
        Err(error) if error.kind() == std::io::ErrorKind::NotFound => return Ok(Vec::new()),
        Err(error) => return Err(error),
    };
    let length = file.metadata()?.len();
    // Only whole lines count: what follows the last line's end is still being written.
    let mut window = (n as u64 * 256).clamp(4096, length.max(4096));
    loop {
        let start = length.saturating_sub(window);
        file.seek(SeekFrom::Start(start))?;
        let mut bytes = Vec::with_capacity((length - start) as usize);
        Read::by_ref(&mut file)
            .take(length - start)
            .read_to_end(&mut bytes)?;
        let complete = bytes
            .iter()
            .rposition(|&byte| byte == b'\n')
            .map_or(0, |at| at + 1);
        let ends = bytes[..complete]
            .iter()
            .filter(|&&byte| byte == b'\n')
            .count();
        // More than `n` line ends in the window: the first of the last `n` lines starts after
        // one. At the file's start, every line in it is whole.
        if ends > n || start == 0 {
            let lines: Vec<&[u8]> = bytes[..complete]
                .split_inclusive(|&byte| byte == b'\n')
                .collect();
            let keep = if start == 0 {
                lines.len()
            } else {
                lines.len() - 1
            };
            return Ok(lines[lines.len() - keep.min(n)..]
                .iter()
                .map(|line| String::from_utf8_lossy(&line[..line.len() - 1]).into_owned())
                .collect());
        }
        window = window.saturating_mul(4);
    }
}

/// `line`, cut to [`MAX_LINE_BYTES`] (at a character boundary) with a note of what was dropped.
fn cut_line(mut line: String) -> String {
    if line.len() <= MAX_LINE_BYTES {
        return line;
    }
    let mut keep = MAX_LINE_BYTES;
    while !line.is_char_boundary(keep) {
        keep -= 1;
    }
    let dropped = line.len() - keep;
    line.truncate(keep);
    line.push_str(&format!(
        " [slimci: {dropped} more bytes of this line dropped]"
    ));
    line
}

#[cfg(test)]
mod tests {
    use super::*;

    fn lines(range: std::ops::Range<u32>) -> Vec<String> {
        range.map(|n| format!("line {n}")).collect()
    }

    #[test]
    fn the_tail_is_the_last_lines_across_attempts_numbered_as_a_cursor_numbers_them() {
        let dir = tempfile::tempdir().unwrap();
        let logs = LogStore::new(dir.path().to_owned(), 64 << 20);
        let run = RunId::new();
        // Attempt 1: 5,000 lines of varying length (some blank); attempt 2: three.
        let first: Vec<String> = (0..5_000)
            .map(|n| {
                if n % 7 == 0 {
                    String::new()
                } else {
                    format!("{n} {}", "z".repeat(n % 300))
                }
            })
            .collect();
        logs.append(run, Attempt(1), 0, &first).unwrap();
        logs.append(run, Attempt(2), 0, &lines(0..3)).unwrap();
        let mut every = Vec::new();
        logs.each_line(run, Attempt(2), |line| every.push(line.text))
            .unwrap();
        for n in [0, 1, 2, 3, 4, 300, 5_003, 6_000] {
            let (tail, total) = logs.tail(run, Attempt(2), n).unwrap();
            assert_eq!(total, 5_003);
            assert_eq!(tail, every[every.len() - n.min(every.len())..], "n = {n}");
        }
        // Only attempt 1 so far (attempt 2 not started): its lines alone.
        let (tail, total) = logs.tail(run, Attempt(1), 2).unwrap();
        assert_eq!((tail.as_slice(), total), (&every[4_998..5_000], 5_000));
        // A line still being written (no end yet) is not shown or counted.
        use std::io::Write as _;
        std::fs::OpenOptions::new()
            .append(true)
            .open(logs.path(run, Attempt(2)))
            .unwrap()
            .write_all(b"half a li")
            .unwrap();
        let (tail, total) = logs.tail(run, Attempt(2), 1).unwrap();
        assert_eq!((tail, total), (vec!["line 2".to_owned()], 5_003));
    }

    #[test]
    fn a_line_past_the_limit_is_cut_with_a_note_and_the_log_reads_on() {
        let dir = tempfile::tempdir().unwrap();
        let logs = LogStore::new(dir.path().to_owned(), 64 << 20);
        let run = RunId::new();
        let long = format!("{}é", "x".repeat(5 * 1024 * 1024));
        logs.append(run, Attempt(1), 0, &[long, "after".to_owned()])
            .unwrap();
        let mut cursor = LogCursor::new(run);
        let read = cursor.next_lines(&logs, Attempt(1)).unwrap();
        assert_eq!(read.len(), 2);
        assert!(read[0].text.starts_with(&"x".repeat(MAX_LINE_BYTES)));
        let dropped = 5 * 1024 * 1024 + 2 - MAX_LINE_BYTES;
        assert_eq!(
            &read[0].text[MAX_LINE_BYTES..],
            format!(" [slimci: {dropped} more bytes of this line dropped]")
        );
        assert_eq!(read[1].text, "after");
    }

    #[test]
    fn a_cursor_numbers_lines_across_attempts_as_they_come() {
        let dir = tempfile::tempdir().unwrap();
        let logs = LogStore::new(dir.path().to_owned(), 1 << 20);
        let run = RunId::new();
        logs.append(run, Attempt(1), 0, &lines(0..2)).unwrap();
        let mut cursor = LogCursor::new(run);
        let first = cursor.next_lines(&logs, Attempt(1)).unwrap();
        assert_eq!(
            first.iter().map(|line| line.number).collect::<Vec<_>>(),
            [1, 2]
        );
        assert!(cursor.next_lines(&logs, Attempt(1)).unwrap().is_empty());
        // Attempt 1 was lost after one more line; attempt 2 starts.
        logs.append(run, Attempt(1), 2, &lines(2..3)).unwrap();
        logs.append(run, Attempt(2), 0, &lines(0..1)).unwrap();
        let more = cursor.next_lines(&logs, Attempt(2)).unwrap();
        assert_eq!(
            (more[0].attempt, more[0].number, more[0].text.as_str()),
            (Attempt(1), 3, "line 2")
        );
        let more = cursor.next_lines(&logs, Attempt(2)).unwrap();
        assert_eq!(
            (more[0].attempt, more[0].number, more[0].text.as_str()),
            (Attempt(2), 4, "line 0")
        );
        assert_eq!(cursor.attempt(), Attempt(2));
        assert_eq!(
            logs.whole_text(run, Attempt(3)).unwrap(),
            "[slimci] attempt 1\nline 0\nline 1\nline 2\n[slimci] attempt 2\nline 0\n[slimci] attempt 3\n"
        );
        assert_eq!(
            logs.whole_text(run, Attempt(1)).unwrap(),
            "line 0\nline 1\nline 2\n"
        );
    }

    #[test]
    fn resent_batches_are_kept_once() {
        let dir = tempfile::tempdir().unwrap();
        let logs = LogStore::new(dir.path().to_owned(), 1 << 20);
        let run = RunId::new();
        assert_eq!(logs.append(run, Attempt(1), 0, &lines(0..3)).unwrap(), 3);
        assert_eq!(logs.append(run, Attempt(1), 0, &lines(0..3)).unwrap(), 0);
        assert_eq!(logs.append(run, Attempt(1), 2, &lines(2..5)).unwrap(), 2);
        assert_eq!(
            logs.append(run, Attempt(1), 9, &lines(9..10)).unwrap(),
            0,
            "a gap is not written"
        );
        let (read, offset) = logs.read_from(run, Attempt(1), 0).unwrap();
        assert_eq!(read, lines(0..5));
        assert_eq!(
            logs.read_from(run, Attempt(1), offset).unwrap().0,
            Vec::<String>::new()
        );
    }

    #[test]
    fn counters_survive_a_restart() {
        let dir = tempfile::tempdir().unwrap();
        let run = RunId::new();
        LogStore::new(dir.path().to_owned(), 1 << 20)
            .append(run, Attempt(1), 0, &lines(0..4))
            .unwrap();
        let reopened = LogStore::new(dir.path().to_owned(), 1 << 20);
        assert_eq!(
            reopened.append(run, Attempt(1), 2, &lines(2..6)).unwrap(),
            2
        );
        assert_eq!(
            reopened.read_from(run, Attempt(1), 0).unwrap().0,
            lines(0..6)
        );
    }

    #[test]
    fn the_cap_truncates_with_a_marker() {
        let dir = tempfile::tempdir().unwrap();
        let logs = LogStore::new(dir.path().to_owned(), 30);
        let run = RunId::new();
        logs.append(run, Attempt(1), 0, &lines(0..10)).unwrap();
        logs.append(run, Attempt(1), 10, &lines(10..20)).unwrap();
        let (read, _) = logs.read_from(run, Attempt(1), 0).unwrap();
        assert_eq!(read.last().unwrap(), TRUNCATION_MARKER);
        assert_eq!(
            read.iter()
                .filter(|line| line.as_str() == TRUNCATION_MARKER)
                .count(),
            1
        );
    }

    #[test]
    fn embedded_newlines_cannot_forge_lines() {
        let dir = tempfile::tempdir().unwrap();
        let logs = LogStore::new(dir.path().to_owned(), 1 << 20);
        let run = RunId::new();
        logs.append(run, Attempt(1), 0, &["a\nb\r".to_owned()])
            .unwrap();
        assert_eq!(
            logs.read_from(run, Attempt(1), 0).unwrap().0,
            vec!["a b ".to_owned()]
        );
    }
}
