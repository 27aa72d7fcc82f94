//! Replaces every configured secret value with `[redacted]` in the log lines the agent sends.
//!
//! Lines reach the redactor whole (the process reader joins the pieces of a line that arrived in
//! several reads), so a one-line secret is always inside one line. A secret that itself spans
//! lines (a PEM key) can be cut by a line end, and so by a batch boundary: the redactor holds back
//! the last lines while they end with the beginning of such a secret, and releases them once the
//! next line shows whether the secret continues. A line cut at the agent's line-length limit has
//! any beginning of a secret just before the cut masked too.

/// What a secret value becomes in the log.
pub const REDACTED: &str = "[redacted]";

/// The marker `process` appends to a line it had to cut; see `mask_cut_tail`.
const CUT_MARKER_START: &str = " [slimci: ";
const CUT_MARKER_END: &str = "dropped]";

/// Shortest beginning of a secret masked at a cut.
const MIN_MASKED_PREFIX: usize = 3;

/// Redacts a stream of lines. `line` may hold lines back; `finish` releases the rest.
#[derive(Default)]
pub struct Redactor {
    /// Longest first, so a secret that contains another is replaced whole.
    secrets: Vec<String>,
    held: Vec<String>,
}

impl Redactor {
    pub fn new(values: impl IntoIterator<Item = String>) -> Redactor {
        let mut secrets: Vec<String> = values
            .into_iter()
            .filter(|value| !value.is_empty())
            .collect();
        secrets.sort_by_key(|value| std::cmp::Reverse(value.len()));
        secrets.dedup();
        Redactor {
            secrets,
            held: Vec::new(),
        }
    }

    /// `text` with every secret replaced, for one-off messages (run and node messages).
    pub fn redact(&self, text: &str) -> String {
        let mut text = text.to_owned();
        for secret in &self.secrets {
            if text.contains(secret.as_str()) {
                text = text.replace(secret.as_str(), REDACTED);
            }
        }
        text
    }

    /// Takes the next line; returns the lines that can be sent now, redacted.
    pub fn line(&mut self, line: String) -> Vec<String> {
        self.held.push(line);
        let joined = self.redact(&self.held.join("\n"));
        let mut lines: Vec<String> = joined.split('\n').map(str::to_owned).collect();
        // Hold back from the first line where a multi-line secret may begin and go on in the
        // next line: a suffix of the text plus the coming line break is a beginning of it.
        let mut probe = joined;
        probe.push('\n');
        let hold_from_byte = self
            .secrets
            .iter()
            .filter(|secret| secret.contains('\n'))
            .filter_map(|secret| longest_suffix_that_begins(&probe, secret))
            .map(|length| probe.len() - length)
            .min();
        let held_lines = match hold_from_byte {
            Some(at) => lines.len() - probe[..at].matches('\n').count(),
            None => 0,
        };
        self.held = lines.split_off(lines.len() - held_lines);
        lines
            .into_iter()
            .map(|line| self.mask_cut_tail(line))
            .collect()
    }

    /// Releases the lines still held (at the end of the output).
    pub fn finish(&mut self) -> Vec<String> {
        std::mem::take(&mut self.held)
            .into_iter()
            .map(|line| self.mask_cut_tail(line))
            .collect()
    }

    /// In a line cut at the length limit, masks a beginning of a secret right before the cut.
    fn mask_cut_tail(&self, line: String) -> String {
        if !line.ends_with(CUT_MARKER_END) {
            return line;
        }
        let Some(cut) = line.rfind(CUT_MARKER_START) else {
            return line;
        };
        let kept = &line[..cut];
        let masked = self
            .secrets
            .iter()
            .filter_map(|secret| {
                prefix_lengths(secret)
                    .filter(|&length| length >= MIN_MASKED_PREFIX.min(secret.len() - 1))
                    .find(|&length| kept.ends_with(&secret[..length]))
            })
            .max();
        match masked {
            Some(length) => format!("{}{REDACTED}{}", &kept[..kept.len() - length], &line[cut..]),
            None => line,
        }
    }
}

/// The length of the longest suffix of `text` that is a proper beginning of `secret`.
fn longest_suffix_that_begins(text: &str, secret: &str) -> Option<usize> {
    prefix_lengths(secret).find(|&length| text.ends_with(&secret[..length]))
}

/// Byte lengths of the proper, non-empty beginnings of `secret`, longest first.
fn prefix_lengths(secret: &str) -> impl Iterator<Item = usize> + '_ {
    let lengths: Vec<usize> = secret.char_indices().map(|(at, _)| at).skip(1).collect();
    lengths.into_iter().rev()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn run(redactor: &mut Redactor, lines: &[&str]) -> Vec<String> {
        let mut out = Vec::new();
        for line in lines {
            out.extend(redactor.line((*line).to_owned()));
        }
        out.extend(redactor.finish());
        out
    }

    #[test]
    fn secrets_in_a_line_are_replaced_longest_first() {
        let mut redactor = Redactor::new(["hunter2".to_owned(), "hunter2-and-more".to_owned()]);
        assert_eq!(
            run(
                &mut redactor,
                &["password is hunter2", "x hunter2-and-more y", "clean"]
            ),
            ["password is [redacted]", "x [redacted] y", "clean"]
        );
    }

    #[test]
    fn ordinary_lines_are_not_held_back() {
        let mut redactor = Redactor::new(["s3cr3t-value".to_owned()]);
        assert_eq!(
            redactor.line("ends with s3cr3t".into()),
            ["ends with s3cr3t"]
        );
    }

    #[test]
    fn a_multi_line_secret_split_across_batches_is_redacted() {
        let key = "-----BEGIN KEY-----\nAAAABBBB\n-----END KEY-----".to_owned();
        let mut redactor = Redactor::new([key]);
        // One batch ends after the first line of the key: nothing of it may leave yet.
        assert_eq!(redactor.line("before".into()), ["before"]);
        assert!(redactor.line("key: -----BEGIN KEY-----".into()).is_empty());
        assert!(redactor.line("AAAABBBB".into()).is_empty());
        // The next batch completes it.
        assert_eq!(
            redactor.line("-----END KEY----- after".into()),
            ["key: [redacted] after"]
        );
        assert_eq!(redactor.line("next".into()), ["next"]);
        assert!(redactor.finish().is_empty());
    }

    #[test]
    fn held_lines_that_turn_out_harmless_are_released() {
        let key = "-----BEGIN KEY-----\nAAAABBBB".to_owned();
        let mut redactor = Redactor::new([key]);
        assert!(redactor.line("-----BEGIN KEY-----".into()).is_empty());
        assert_eq!(
            redactor.line("something else".into()),
            ["-----BEGIN KEY-----", "something else"]
        );
        assert!(redactor.line("-----BEGIN KEY-----".into()).is_empty());
        assert_eq!(redactor.finish(), ["-----BEGIN KEY-----"]);
    }

    #[test]
    fn a_secret_cut_by_the_line_limit_is_masked_before_the_cut() {
        let mut redactor = Redactor::new(["topsecretvalue".to_owned()]);
        let line = "xxxxtopsec [slimci: 123 more bytes of this line dropped]".to_owned();
        assert_eq!(
            run(&mut redactor, &[&line]),
            ["xxxx[redacted] [slimci: 123 more bytes of this line dropped]"]
        );
        let harmless = "xxxxab [slimci: 1 more bytes of this line dropped]";
        assert_eq!(run(&mut redactor, &[harmless]), [harmless]);
    }

    #[test]
    fn multibyte_text_is_safe() {
        let mut redactor = Redactor::new(["clé-secrète".to_owned(), "ä\nö€".to_owned()]);
        assert_eq!(
            run(&mut redactor, &["la clé-secrète ici", "€ä", "ö€ fin"]),
            ["la [redacted] ici", "€[redacted] fin"]
        );
        assert_eq!(redactor.redact("no secret"), "no secret");
    }
}
