//! The cost pipeline's vocabulary: which metrics are teed, which are
//! charged, and the resource a charged series bills.

use crate::config::Charge;

/// The metric-name prefix of the cost exporter's gauges, the only series teed.
pub const TEE_PREFIX: &[u8; 20] = b"cloudtuner_kubecost_";

/// Whether a metric name is teed (a fixed-size compare, inlined: it runs
/// for every kept series).
#[inline]
pub fn is_teed(name: &[u8]) -> bool {
    name.first_chunk() == Some(TEE_PREFIX)
}

/// The namespace-total metric (charged by default).
pub const NAMESPACE_METRIC: &str = "cloudtuner_kubecost_namespace_total_cost";
/// The pod-total metric (charged with `charge = pod`).
pub const POD_METRIC: &str = "cloudtuner_kubecost_pod_total_cost";
/// Metrics that may be charged (the writer indexes these).
pub const CHARGED_METRICS: [&str; 2] = [NAMESPACE_METRIC, POD_METRIC];

/// The metric charged under a charge mode.
pub fn charged_metric(charge: Charge) -> &'static str {
    match charge {
        Charge::Namespace => NAMESPACE_METRIC,
        Charge::Pod => POD_METRIC,
    }
}

/// The expense resource of a sample's labels under a charge mode.
#[derive(Debug, Clone, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct Resource {
    pub account: String,
    pub namespace: String,
    /// Empty under namespace charging.
    pub pod: String,
}

impl Resource {
    /// The resource's key in the platform's registry: `k8s-ns-` +
    /// md5("namespace-" + ns)[..16], or `k8s-pod-` + md5("pod-" + ns + "/"
    /// + pod)[..16].
    pub fn cloud_resource_id(&self, charge: Charge) -> String {
        match charge {
            Charge::Namespace => {
                let d = md5::compute(format!("namespace-{}", self.namespace));
                format!("k8s-ns-{}", &format!("{d:x}")[..16])
            }
            Charge::Pod => {
                let d = md5::compute(format!("pod-{}/{}", self.namespace, self.pod));
                format!("k8s-pod-{}", &format!("{d:x}")[..16])
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn only_cloudtuner_kubecost_names_are_teed() {
        assert!(is_teed(NAMESPACE_METRIC.as_bytes()));
        assert!(is_teed(b"cloudtuner_kubecost_"));
        assert!(!is_teed(b"cloudtuner_kubecost"));
        assert!(!is_teed(b"kubecost_cluster_cost"));
        assert!(!is_teed(b"xcloudtuner_kubecost_cost"));
        assert!(!is_teed(b""));
    }

    #[test]
    fn cloud_resource_ids_match_the_platform() {
        let r = Resource {
            account: "a".into(),
            namespace: "kube-system".into(),
            pod: String::new(),
        };
        let want = format!("{:x}", md5::compute("namespace-kube-system"));
        assert_eq!(
            r.cloud_resource_id(Charge::Namespace),
            format!("k8s-ns-{}", &want[..16])
        );
        let p = Resource {
            pod: "web-1".into(),
            ..r
        };
        let want = format!("{:x}", md5::compute("pod-kube-system/web-1"));
        assert_eq!(
            p.cloud_resource_id(Charge::Pod),
            format!("k8s-pod-{}", &want[..16])
        );
    }
}
