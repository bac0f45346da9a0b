//! The `__name__` allowlist: which series are kept.

use regex::bytes::Regex;

/// A fully anchored regex on the metric name, as Prometheus relabel regexes are:
/// `kube_.*` keeps `kube_pod_info` but not `x_kube_pod_info`.
///
/// Allowlists are usually alternations of literal names and `prefix_.*`
/// (the default is); those are matched without the regex engine, which
/// profiling showed at a tenth of the pipeline's time. The regex stays the
/// authority: anything else, and any name the literal form cannot decide
/// (non-ASCII after a prefix), goes to it.
#[derive(Debug, Clone)]
pub struct Allowlist {
    re: Regex,
    literal: Option<Literal>,
    source: String,
}

/// `a|b_.*|c`: exact names and prefixes followed by `.*`.
#[derive(Debug, Clone, Default)]
struct Literal {
    exact: Vec<Box<[u8]>>,
    prefixes: Vec<Box<[u8]>>,
}

impl Literal {
    /// Recognises alternations of `[A-Za-z0-9_:]+` with an optional `.*`.
    fn parse(pattern: &str) -> Option<Literal> {
        let plain = |s: &str| {
            !s.is_empty()
                && s.bytes()
                    .all(|b| b.is_ascii_alphanumeric() || b == b'_' || b == b':')
        };
        let mut lit = Literal::default();
        for alt in pattern.split('|') {
            match alt.strip_suffix(".*") {
                Some(prefix) if plain(prefix) => lit.prefixes.push(prefix.as_bytes().into()),
                None if plain(alt) => lit.exact.push(alt.as_bytes().into()),
                _ => return None,
            }
        }
        Some(lit)
    }

    /// `Some(keep)`, or `None` when only the regex can tell.
    #[inline]
    fn keeps(&self, name: &[u8]) -> Option<bool> {
        if self.exact.iter().any(|e| **e == *name) {
            return Some(true);
        }
        let mut undecided = false;
        for p in &self.prefixes {
            if let Some(rest) = name.strip_prefix(&**p) {
                // `.` matches any character but a newline. One pass: stop
                // at the first byte that is a newline or not ASCII.
                match rest.iter().find(|&&b| b == b'\n' || b >= 0x80) {
                    None => return Some(true),
                    Some(b'\n') => {}
                    Some(_) => undecided = true,
                }
            }
        }
        if undecided {
            None
        } else {
            Some(false)
        }
    }
}

/// Why an allowlist is not usable, in one line naming the pattern as written.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("{} is not a valid regex: {reason}", crate::display::shown(pattern))]
pub struct AllowlistError {
    pattern: String,
    reason: String,
}

impl AllowlistError {
    fn new(pattern: &str, e: &regex::Error) -> AllowlistError {
        // A syntax error prints as several lines (the pattern, a caret
        // under the fault, `error: <what>`): keep the last line's words.
        let reason = match e {
            regex::Error::Syntax(text) => text
                .lines()
                .rev()
                .find_map(|l| l.trim().strip_prefix("error: "))
                .unwrap_or("syntax error")
                .to_string(),
            regex::Error::CompiledTooBig(limit) => {
                format!("it compiles to more than {limit} bytes")
            }
            other => other.to_string().replace('\n', " "),
        };
        AllowlistError {
            pattern: pattern.to_string(),
            reason,
        }
    }
}

impl Allowlist {
    pub fn new(pattern: &str) -> Result<Self, AllowlistError> {
        // The pattern alone first: its errors then speak of what the user
        // wrote, not of the anchored wrapper, and a pattern that only
        // parses inside the wrapper (`a)|(b`) is refused.
        Regex::new(pattern).map_err(|e| AllowlistError::new(pattern, &e))?;
        Ok(Allowlist {
            re: Regex::new(&format!("^(?:{pattern})$"))
                .map_err(|e| AllowlistError::new(pattern, &e))?,
            literal: Literal::parse(pattern),
            source: pattern.to_string(),
        })
    }

    /// Whether a series with this metric name is kept. A series without a
    /// name is never kept.
    #[inline]
    pub fn keeps(&self, name: Option<&[u8]>) -> bool {
        let Some(name) = name else { return false };
        match self.literal.as_ref().and_then(|l| l.keeps(name)) {
            Some(keep) => keep,
            None => self.re.is_match(name),
        }
    }

    pub fn as_str(&self) -> &str {
        &self.source
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::config::DEFAULT_ALLOWLIST;

    #[test]
    fn default_allowlist_is_anchored() {
        let a = Allowlist::new(DEFAULT_ALLOWLIST).unwrap();
        for keep in [
            "up",
            "kube_pod_info",
            "container_cpu_usage_seconds_total",
            "cloudtuner_kubecost_namespace_total_cost",
            "kubecost_cluster_info",
            "node_cpu_seconds_total",
            "pod_pvc_allocation",
            "pv_hourly_cost",
        ] {
            assert!(a.keeps(Some(keep.as_bytes())), "{keep}");
        }
        for drop in [
            "upx",
            "go_goroutines",
            "x_kube_pod_info",
            "prometheus_http_requests_total",
            "",
        ] {
            assert!(!a.keeps(Some(drop.as_bytes())), "{drop}");
        }
        assert!(!a.keeps(None));
    }

    #[test]
    fn errors_are_one_line_about_the_pattern_as_written() {
        let err = Allowlist::new("kube_(").unwrap_err().to_string();
        assert_eq!(err, "`kube_(` is not a valid regex: unclosed group");
        // Balanced only inside the anchoring wrapper: not a regex either.
        let err = Allowlist::new("a)|(b").unwrap_err().to_string();
        assert_eq!(err, "`a)|(b` is not a valid regex: unopened group");
        let err = Allowlist::new("x{99999999}").unwrap_err().to_string();
        assert!(
            err.starts_with("`x{99999999}` is not a valid regex: "),
            "{err}"
        );
        assert!(!err.contains('\n') && !err.contains("(?:"), "{err}");
    }

    #[test]
    fn alternation_is_grouped_before_anchoring() {
        // Without the group, `^a|b$` would keep `bx`... and `xb`.
        let a = Allowlist::new("a|b").unwrap();
        assert!(a.keeps(Some(b"a")) && a.keeps(Some(b"b")));
        assert!(!a.keeps(Some(b"ax")) && !a.keeps(Some(b"xb")));
    }

    #[test]
    fn literal_fast_path_agrees_with_the_regex() {
        let names: &[&[u8]] = &[
            b"up",
            b"upx",
            b"u",
            b"",
            b"kube_",
            b"kube_pod_info",
            b"kube_pod\ninfo",
            b"kube_pod_\xc3\xa9",
            b"kube_pod_\xff",
            b"xkube_pod",
            b"node_cpu_seconds_total",
            b"container:rate5m",
            b"pod_pvc_allocation",
            b"go_goroutines",
        ];
        for pattern in [DEFAULT_ALLOWLIST, "up", "a_.*|b", "job:.*|up|node_.*"] {
            let a = Allowlist::new(pattern).unwrap();
            assert!(a.literal.is_some(), "{pattern} takes the literal path");
            let re = Regex::new(&format!("^(?:{pattern})$")).unwrap();
            for n in names {
                assert_eq!(a.keeps(Some(n)), re.is_match(n), "{pattern} on {n:?}");
            }
        }
        for pattern in ["kube_.+", "(a|b)", "a|", "up.*x", "[a-z]+_total"] {
            assert!(
                Literal::parse(pattern).is_none(),
                "{pattern} needs the regex"
            );
        }
    }
}
