//! Realistic remote-write payloads for the benches and the load generator
//! (`src/bin/rwgate-loadgen.rs`), so that both measure the same thing.
//!
//! A request looks like what a customer's Prometheus sends: series of
//! kube-state-metrics (`kube_*`), cAdvisor (`container_*`), node-exporter
//! (`node_*`), Kubecost (`kubecost_*`, `pv_*`, `pod_pvc_*`), the CloudTuner cost
//! exporter (`cloudtuner_kubecost_*`, the teed series) and the usual noise
//! the default allowlist drops (`go_*`, `process_*`, `apiserver_*`, ...).
//! Labels are sorted by name as Prometheus sends them, with the external
//! `cloud_account_id` label set to the request's tenant.
//!
//! Out of every 30 series, 3 are `cloudtuner_kubecost_*` (10% of samples),
//! 17 are other allowlisted names and 10 are dropped: the default allowlist
//! keeps two thirds. Generation is deterministic for a given seed.
//!
//! Every request exists as Remote-Write 1.0 and, the same series, as 2.0
//! ([`snappy_request_v2`]), so the two protocols are measured on the same work.

use prost::Message;
use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};

use crate::{prompb, prompb_v2};

/// The shape of generated requests.
#[derive(Debug, Clone)]
pub struct Profile {
    /// Series per request.
    pub series: usize,
    /// Labels per series, `__name__` included (at least 4; the 10 usual
    /// Kubernetes labels first, then `label_N` extras).
    pub labels: usize,
    /// Samples per series.
    pub samples: usize,
    /// Timestamp of the samples, in milliseconds since the epoch.
    pub timestamp_ms: i64,
}

impl Default for Profile {
    fn default() -> Self {
        Profile {
            series: 1000,
            labels: 10,
            samples: 1,
            timestamp_ms: 1_700_000_000_000,
        }
    }
}

/// Series names by slot (see the module docs for the mix).
const TEED: [&str; 3] = [
    "cloudtuner_kubecost_namespace_total_cost",
    "cloudtuner_kubecost_pod_cpu_cost",
    "cloudtuner_kubecost_namespace_ram_efficiency",
];
const KEPT: [&str; 17] = [
    "container_cpu_usage_seconds_total",
    "container_memory_working_set_bytes",
    "container_network_receive_bytes_total",
    "container_fs_usage_bytes",
    "kube_pod_info",
    "kube_pod_container_status_running",
    "kube_pod_container_resource_requests",
    "kube_deployment_status_replicas",
    "kube_node_status_capacity",
    "node_cpu_seconds_total",
    "node_memory_MemAvailable_bytes",
    "node_filesystem_avail_bytes",
    "kubecost_cluster_info",
    "kubecost_pod_network_egress_bytes_total",
    "pv_hourly_cost",
    "pod_pvc_allocation",
    "up",
];
const DROPPED: [&str; 10] = [
    "go_goroutines",
    "go_memstats_alloc_bytes",
    "process_cpu_seconds_total",
    "process_resident_memory_bytes",
    "apiserver_request_total",
    "apiserver_request_duration_seconds_bucket",
    "kubelet_runtime_operations_total",
    "rest_client_requests_total",
    "workqueue_depth",
    "prometheus_http_requests_total",
];

/// The metric name of series number `i`.
pub fn name_of(i: usize) -> &'static str {
    match i % 30 {
        s @ 0..=2 => TEED[s],
        s @ 3..=19 => KEPT[(s - 3 + i / 30) % KEPT.len()],
        s => DROPPED[(s - 20 + i / 30) % DROPPED.len()],
    }
}

const NAMESPACES: [&str; 8] = [
    "default",
    "kube-system",
    "monitoring",
    "payments",
    "checkout",
    "search",
    "ingress-nginx",
    "data-pipeline",
];
const APPS: [&str; 8] = [
    "api",
    "worker",
    "frontend",
    "redis",
    "postgres",
    "kube-proxy",
    "coredns",
    "node-exporter",
];
const JOBS: [&str; 5] = [
    "kubernetes-cadvisor",
    "kube-state-metrics",
    "node-exporter",
    "kubecost",
    "cloudtuner-exporter",
];

fn suffix(rng: &mut StdRng, len: usize) -> String {
    const ALPHA: &[u8] = b"bcdfghjklmnpqrstvwxz2456789";
    (0..len)
        .map(|_| ALPHA[rng.gen_range(0..ALPHA.len())] as char)
        .collect()
}

/// One generated request for `tenant` (a UUID, set as `cloud_account_id` the
/// way a Prometheus external label would be).
pub fn write_request(p: &Profile, tenant: &str, seed: u64) -> prompb::WriteRequest {
    let mut rng = StdRng::seed_from_u64(seed);
    let cluster = format!("prod-{}", suffix(&mut rng, 4));
    let nodes: Vec<String> = (0..12)
        .map(|i| format!("ip-10-0-{}-{}.ec2.internal", i, rng.gen_range(2..250)))
        .collect();
    let timeseries = (0..p.series)
        .map(|i| {
            let app = APPS[rng.gen_range(0..APPS.len())];
            let ns = NAMESPACES[rng.gen_range(0..NAMESPACES.len())];
            let node = &nodes[rng.gen_range(0..nodes.len())];
            let pod = format!(
                "{app}-{}-{}",
                suffix(&mut rng, 9).to_lowercase(),
                suffix(&mut rng, 5)
            );
            let mut labels: Vec<(String, String)> = vec![
                ("__name__".into(), name_of(i).into()),
                ("cloud_account_id".into(), tenant.into()),
                ("cluster".into(), cluster.clone()),
                ("container".into(), app.into()),
                (
                    "instance".into(),
                    format!(
                        "10.0.{}.{}:9100",
                        rng.gen_range(0..16),
                        rng.gen_range(2..250)
                    ),
                ),
                ("job".into(), JOBS[i % JOBS.len()].into()),
                ("namespace".into(), ns.into()),
                ("node".into(), node.clone()),
                ("pod".into(), pod),
                ("service".into(), format!("{app}-svc")),
            ];
            labels.truncate(p.labels.max(4));
            for k in labels.len()..p.labels {
                labels.push((
                    format!("label_{k}"),
                    format!("value-{}", suffix(&mut rng, 6)),
                ));
            }
            labels.sort();
            prompb::TimeSeries {
                labels: labels
                    .into_iter()
                    .map(|(name, value)| prompb::Label { name, value })
                    .collect(),
                samples: (0..p.samples)
                    .map(|k| prompb::Sample {
                        value: if i % 7 == 0 {
                            f64::from(rng.gen_range(0..2))
                        } else {
                            rng.gen_range(0.0..1e6)
                        },
                        timestamp: p.timestamp_ms - 15_000 * (p.samples - 1 - k) as i64,
                    })
                    .collect(),
                exemplars: vec![],
                histograms: vec![],
            }
        })
        .collect();
    prompb::WriteRequest {
        timeseries,
        metadata: vec![],
    }
}

/// A generated request, encoded and snappy-compressed as it goes on the wire.
pub fn snappy_request(p: &Profile, tenant: &str, seed: u64) -> Vec<u8> {
    let raw = write_request(p, tenant, seed).encode_to_vec();
    snap::raw::Encoder::new()
        .compress_vec(&raw)
        .expect("snappy compresses any input below 4 GiB")
}

/// The same request as [`snappy_request`], as Remote-Write 2.0: the same
/// series, labels interned into a symbol table.
pub fn snappy_request_v2(p: &Profile, tenant: &str, seed: u64) -> Vec<u8> {
    let raw = prompb_v2::Request::from_v1(&write_request(p, tenant, seed)).encode_to_vec();
    snap::raw::Encoder::new()
        .compress_vec(&raw)
        .expect("snappy compresses any input below 4 GiB")
}

/// A tenant id (UUID v4 shape) derived from an index, stable across runs.
pub fn tenant_id(i: usize) -> String {
    let mut rng = StdRng::seed_from_u64(0x7e4a_4700 + i as u64);
    let b: [u8; 16] = rng.gen();
    uuid::Builder::from_random_bytes(b)
        .into_uuid()
        .hyphenated()
        .to_string()
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::config::DEFAULT_ALLOWLIST;
    use crate::filter::Allowlist;

    #[test]
    fn mix_keeps_two_thirds_and_tees_a_tenth() {
        let allow = Allowlist::new(DEFAULT_ALLOWLIST).unwrap();
        let n = 3000;
        let kept = (0..n)
            .filter(|&i| allow.keeps(Some(name_of(i).as_bytes())))
            .count();
        let teed = (0..n)
            .filter(|&i| name_of(i).starts_with("cloudtuner_kubecost_"))
            .count();
        assert_eq!(kept * 3, n * 2);
        assert_eq!(teed * 10, n);
    }

    #[test]
    fn requests_have_the_asked_shape() {
        let p = Profile {
            series: 50,
            labels: 12,
            samples: 2,
            ..Profile::default()
        };
        let req = write_request(&p, &tenant_id(0), 1);
        assert_eq!(req.timeseries.len(), 50);
        for ts in &req.timeseries {
            assert_eq!(ts.labels.len(), 12);
            assert!(ts.labels.windows(2).all(|w| w[0].name < w[1].name));
            assert_eq!(ts.samples.len(), 2);
        }
        let body = snappy_request(&p, &tenant_id(0), 1);
        let raw = snap::raw::Decoder::new().decompress_vec(&body).unwrap();
        assert_eq!(prompb::WriteRequest::decode(raw.as_slice()).unwrap(), req);
        let v2 = snap::raw::Decoder::new()
            .decompress_vec(&snappy_request_v2(&p, &tenant_id(0), 1))
            .unwrap();
        let v2 = prompb_v2::Request::decode(v2.as_slice()).unwrap();
        assert_eq!(v2, prompb_v2::Request::from_v1(&req));
        assert!(v2.encoded_len() < raw.len(), "2.0 bodies are smaller");
        assert_ne!(tenant_id(0), tenant_id(1));
        assert!(uuid::Uuid::parse_str(&tenant_id(3)).is_ok());
    }
}
