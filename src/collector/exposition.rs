//! A strict, allocation-light parser for the Prometheus text exposition format
//! (version 0.0.4, which is also what OpenMetrics servers send to a scraper that
//! asks for text/plain).
//!
//! Why not a crate: `prometheus-parse` 0.2 matches metric names with `\w+`, so
//! `vllm:num_requests_running` (colons are legal and every vLLM/SGLang/llama.cpp
//! metric has one) is silently skipped, and it splits labels on `,`, which breaks
//! `running_lora_adapters="a,b"`. It also ignores unparsable lines instead of
//! failing. This parser follows the format's grammar, rejects any malformed line
//! (as Prometheus fails a whole scrape), and only allocates for the metric names
//! the caller asks for, since model servers expose hundreds of histogram lines
//! the collector never reads.

use std::borrow::Cow;
use std::fmt;

/// One sample line.
#[derive(Debug, Clone, PartialEq)]
pub struct Sample<'a> {
    pub name: &'a str,
    /// In exposition order; values unescaped.
    pub labels: Vec<(&'a str, Cow<'a, str>)>,
    pub value: f64,
}

impl Sample<'_> {
    pub fn label(&self, name: &str) -> Option<&str> {
        self.labels
            .iter()
            .find(|(k, _)| *k == name)
            .map(|(_, v)| v.as_ref())
    }
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ParseError {
    /// 1-based.
    pub line: usize,
    pub message: String,
}

impl fmt::Display for ParseError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "line {}: {}", self.line, self.message)
    }
}

impl std::error::Error for ParseError {}

/// Parses `text`; returns the samples whose metric name `want` accepts. Every
/// line is checked, wanted or not.
pub fn parse<'a>(
    text: &'a str,
    want: impl Fn(&str) -> bool,
) -> Result<Vec<Sample<'a>>, ParseError> {
    let mut out = Vec::new();
    for (i, raw) in text.split('\n').enumerate() {
        let line = raw.strip_suffix('\r').unwrap_or(raw);
        let fail = |message: String| ParseError {
            line: i + 1,
            message,
        };
        let trimmed = line.trim_start_matches([' ', '\t']);
        if trimmed.is_empty() || trimmed.starts_with('#') {
            // HELP, TYPE, other comments and OpenMetrics' `# EOF`.
            continue;
        }
        if let Some(s) = parse_line(trimmed, &want).map_err(fail)? {
            out.push(s);
        }
    }
    Ok(out)
}

fn is_name_start(b: u8) -> bool {
    b.is_ascii_alphabetic() || b == b'_' || b == b':'
}

fn is_name_char(b: u8) -> bool {
    is_name_start(b) || b.is_ascii_digit()
}

/// Parses one sample line; `None` when its metric is not wanted.
fn parse_line<'a>(
    line: &'a str,
    want: &impl Fn(&str) -> bool,
) -> Result<Option<Sample<'a>>, String> {
    let bytes = line.as_bytes();
    let name_end = bytes
        .iter()
        .position(|&b| !is_name_char(b))
        .unwrap_or(bytes.len());
    if name_end == 0 || !is_name_start(bytes[0]) {
        return Err(format!("expected a metric name: '{}'", excerpt(line)));
    }
    let name = &line[..name_end];
    let wanted = want(name);
    let mut labels = Vec::new();
    let mut pos = name_end;
    if bytes.get(pos) == Some(&b'{') {
        pos = parse_labels(line, pos + 1, |k, v| {
            if wanted {
                labels.push((k, v));
            }
        })?;
    }
    // Value, then an optional integer timestamp, then (OpenMetrics) an optional
    // exemplar after '#', which we ignore.
    let rest = &line[pos..];
    if !rest.starts_with([' ', '\t']) {
        return Err(format!("expected a space before the value of {name}"));
    }
    let mut fields = rest.split([' ', '\t']).filter(|f| !f.is_empty());
    let value_text = fields
        .next()
        .ok_or_else(|| format!("{name} has no value"))?;
    let value = parse_value(value_text)
        .ok_or_else(|| format!("{name}: value '{}' is not a number", excerpt(value_text)))?;
    match fields.next() {
        None => {}
        Some(f) if f.starts_with('#') => {}
        Some(ts) => {
            if ts.parse::<i64>().is_err() && parse_value(ts).is_none() {
                return Err(format!(
                    "{name}: timestamp '{}' is not a number",
                    excerpt(ts)
                ));
            }
            match fields.next() {
                None => {}
                Some(f) if f.starts_with('#') => {}
                Some(f) => return Err(format!("{name}: unexpected '{}'", excerpt(f))),
            }
        }
    }
    Ok(wanted.then_some(Sample {
        name,
        labels,
        value,
    }))
}

/// Parses `name="value",...}` starting at `pos` (just after `{`); returns the
/// position after `}`.
fn parse_labels<'a>(
    line: &'a str,
    mut pos: usize,
    mut each: impl FnMut(&'a str, Cow<'a, str>),
) -> Result<usize, String> {
    let bytes = line.as_bytes();
    let skip_ws = |mut p: usize| {
        while matches!(bytes.get(p), Some(b' ' | b'\t')) {
            p += 1;
        }
        p
    };
    loop {
        pos = skip_ws(pos);
        match bytes.get(pos) {
            Some(b'}') => return Ok(pos + 1),
            None => return Err("unterminated label set".into()),
            _ => {}
        }
        let start = pos;
        while bytes
            .get(pos)
            .is_some_and(|&b| b.is_ascii_alphanumeric() || b == b'_')
        {
            pos += 1;
        }
        if pos == start || bytes[start].is_ascii_digit() {
            return Err(format!("bad label name at column {}", start + 1));
        }
        let key = &line[start..pos];
        pos = skip_ws(pos);
        if bytes.get(pos) != Some(&b'=') {
            return Err(format!("expected '=' after label {key}"));
        }
        pos = skip_ws(pos + 1);
        if bytes.get(pos) != Some(&b'"') {
            return Err(format!("label {key}: expected a quoted value"));
        }
        pos += 1;
        let vstart = pos;
        let mut owned: Option<String> = None;
        loop {
            match bytes.get(pos) {
                None => return Err(format!("label {key}: unterminated value")),
                Some(b'"') => break,
                Some(b'\\') => {
                    let s = owned.get_or_insert_with(|| line[vstart..pos].to_string());
                    match bytes.get(pos + 1) {
                        Some(b'\\') => s.push('\\'),
                        Some(b'"') => s.push('"'),
                        Some(b'n') => s.push('\n'),
                        _ => return Err(format!("label {key}: invalid escape sequence")),
                    }
                    pos += 2;
                }
                Some(_) => {
                    // Copy one UTF-8 character (the line is a &str, so boundaries hold).
                    let ch_len = line[pos..].chars().next().map_or(1, char::len_utf8);
                    if let Some(s) = owned.as_mut() {
                        s.push_str(&line[pos..pos + ch_len]);
                    }
                    pos += ch_len;
                }
            }
        }
        let value = match owned {
            Some(s) => Cow::Owned(s),
            None => Cow::Borrowed(&line[vstart..pos]),
        };
        each(key, value);
        pos = skip_ws(pos + 1);
        match bytes.get(pos) {
            Some(b',') => pos += 1,
            Some(b'}') => return Ok(pos + 1),
            _ => return Err(format!("expected ',' or '}}' after label {key}")),
        }
    }
}

/// Go's float syntax as Prometheus writes it: decimals, exponents, `+Inf`,
/// `-Inf`, `NaN`.
fn parse_value(s: &str) -> Option<f64> {
    // Rust also accepts "infinity" and "inf" in any case, which Prometheus does too.
    s.parse::<f64>().ok()
}

fn excerpt(s: &str) -> String {
    let mut e: String = s.chars().take(60).collect();
    if e.len() < s.len() {
        e.push('…');
    }
    e
}

#[cfg(test)]
mod tests {
    use super::*;

    fn all(text: &str) -> Result<Vec<Sample<'_>>, ParseError> {
        parse(text, |_| true)
    }

    #[test]
    fn names_with_colons_and_labels_with_commas() {
        let text = "# HELP vllm:lora_requests_info Running stats on lora requests.\n\
                    # TYPE vllm:lora_requests_info gauge\n\
                    vllm:lora_requests_info{max_lora=\"4\",running_lora_adapters=\"a,b\",waiting_lora_adapters=\"\"} 1.7e+09\n\
                    vllm:num_requests_running{model_name=\"m\"} 3.0\n";
        let s = all(text).unwrap();
        assert_eq!(s.len(), 2);
        assert_eq!(s[0].name, "vllm:lora_requests_info");
        assert_eq!(s[0].label("running_lora_adapters"), Some("a,b"));
        assert_eq!(s[0].label("waiting_lora_adapters"), Some(""));
        assert_eq!(s[0].value, 1.7e9);
        assert_eq!(s[1].value, 3.0);
    }

    #[test]
    fn escapes_spacing_timestamps_specials() {
        let text = "a{x=\"q\\\"uo\\\\te\\nd\" , y = \"ü}{,\" ,} 1 1700000000000\r\n\
                    b +Inf\n  c\t-Inf\nd NaN\ne 1e-3 # {trace_id=\"x\"} 1\n\n# EOF\n";
        let s = all(text).unwrap();
        assert_eq!(s[0].label("x"), Some("q\"uo\\te\nd"));
        assert_eq!(s[0].label("y"), Some("ü}{,"));
        assert_eq!(s[1].value, f64::INFINITY);
        assert_eq!(s[2].value, f64::NEG_INFINITY);
        assert!(s[3].value.is_nan());
        assert_eq!(s[4].value, 0.001);
    }

    #[test]
    fn only_wanted_samples_are_returned_but_all_lines_are_checked() {
        let text = "keep 1\nskip{a=\"b\"} 2\n";
        let s = parse(text, |n| n == "keep").unwrap();
        assert_eq!(s.len(), 1);
        let e = parse("keep 1\nskip{a=b} 2\n", |n| n == "keep").unwrap_err();
        assert_eq!(e.line, 2);
    }

    #[test]
    fn garbage_is_an_error_with_a_line_number() {
        for (text, line) in [
            ("<html><body>502 Bad Gateway</body></html>", 1),
            ("ok 1\n{a=\"b\"} 1\n", 2),
            ("m{a=\"b\" 1\n", 1),
            ("m{a=\"b} 1\n", 1),
            ("m{a=\"\\x\"} 1\n", 1),
            ("m{1a=\"b\"} 1\n", 1),
            ("m{a=\"b\"}1\n", 1),
            ("m\n", 1),
            ("m one\n", 1),
            ("m 1 2 3\n", 1),
            ("m 1 later\n", 1),
            ("\u{0}\u{1}\u{2}", 1),
        ] {
            let e = all(text).expect_err(text);
            assert_eq!(e.line, line, "{text}: {e}");
        }
        assert!(all("").unwrap().is_empty());
    }

    #[test]
    fn random_bytes_never_panic() {
        let mut rng = fastrand::Rng::with_seed(7);
        let good = "vllm:x{a=\"b,c\",d=\"\\\"\"} 1.5 123\n# TYPE t gauge\nt 2\n";
        for _ in 0..20_000 {
            let mut b = good.as_bytes().to_vec();
            for _ in 0..rng.usize(1..5) {
                let i = rng.usize(..b.len());
                b[i] = rng.u8(..);
            }
            if let Ok(s) = std::str::from_utf8(&b) {
                let _ = all(s);
            }
            let junk: String = (0..rng.usize(..100)).map(|_| rng.char(..)).collect();
            let _ = all(&junk);
        }
    }
}
