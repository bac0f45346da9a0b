//! The `__name__` allowlist: which series are kept.

use regex::bytes::Regex;

/// A fully anchored regex on the metric name, as Prometheus relabel regexes are:
/// `kube_.*` keeps `kube_pod_info` but not `x_kube_pod_info`.
#[derive(Debug, Clone)]
pub struct Allowlist {
    re: Regex,
    source: String,
}

impl Allowlist {
    pub fn new(pattern: &str) -> Result<Self, regex::Error> {
        Ok(Allowlist {
            re: Regex::new(&format!("^(?:{pattern})$"))?,
            source: pattern.to_string(),
        })
    }

    /// Whether a series with this metric name is kept. A series without a
    /// name is never kept.
    #[inline]
    pub fn keeps(&self, name: Option<&[u8]>) -> bool {
        name.is_some_and(|n| self.re.is_match(n))
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
    fn alternation_is_grouped_before_anchoring() {
        // Without the group, `^a|b$` would keep `bx`... and `xb`.
        let a = Allowlist::new("a|b").unwrap();
        assert!(a.keeps(Some(b"a")) && a.keeps(Some(b"b")));
        assert!(!a.keeps(Some(b"ax")) && !a.keeps(Some(b"xb")));
    }
}
