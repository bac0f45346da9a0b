//! Memory of the tee is proportional to its input. One 32 KB request (one
//! series, 60 labels of 4 KiB, 4,000 samples) used to take ~1 GB: the request
//! path copied the labels per sample, and the writer expanded the whole spool
//! record into rows at once (again at every restart). Measured here as the
//! peak RSS of the test process (nextest runs each test in its own process).

use prost::Message;
use rwgate::cost::batch::Parts;
use rwgate::cost::record::{decode_record, Accepted};
use rwgate::filter::Allowlist;
use rwgate::pipeline::{process, Params, Scratch};
use rwgate::prompb;
use rwgate::wire::ShapeLimits;

/// The process's peak resident set (`VmHWM`), in bytes.
fn peak_rss() -> usize {
    let status = std::fs::read_to_string("/proc/self/status").expect("/proc/self/status");
    let line = status
        .lines()
        .find(|l| l.starts_with("VmHWM:"))
        .expect("VmHWM");
    let kb: usize = line
        .split_whitespace()
        .nth(1)
        .and_then(|n| n.parse().ok())
        .expect("VmHWM in kB");
    kb << 10
}

/// Peak RSS while `f` runs (resetting the high-water mark first, so the
/// figure is for `f`; it includes what was resident before).
fn peak_during<T>(f: impl FnOnce() -> T) -> (T, usize) {
    std::fs::write("/proc/self/clear_refs", "5").expect("reset VmHWM");
    let out = f();
    (out, peak_rss())
}

const MB: usize = 1 << 20;

fn amplifying_body(samples: usize) -> Vec<u8> {
    let mut labels = vec![prompb::Label {
        name: "__name__".into(),
        value: "cloudtuner_kubecost_namespace_total_cost".into(),
    }];
    for i in 0..60 {
        labels.push(prompb::Label {
            name: format!("l{i:02}"),
            value: "a".repeat(4096),
        });
    }
    let req = prompb::WriteRequest {
        timeseries: vec![prompb::TimeSeries {
            labels,
            samples: (0..samples)
                .map(|i| prompb::Sample {
                    value: 1.0,
                    timestamp: 1_700_000_000_000 + i as i64,
                })
                .collect(),
            ..Default::default()
        }],
        metadata: vec![],
    };
    snap::raw::Encoder::new()
        .compress_vec(&req.encode_to_vec())
        .expect("snappy")
}

#[test]
fn a_small_request_with_long_labels_stays_small_end_to_end() {
    let before = peak_rss();
    assert!(
        before < 48 * MB,
        "the test starts small: {} MB",
        before / MB
    );
    let body = amplifying_body(4000);
    assert!(body.len() < 64 << 10, "{}", body.len());
    let allow = Allowlist::new(rwgate::config::DEFAULT_ALLOWLIST).expect("allowlist");
    let tenant_labels = vec!["cloud_account_id".to_string(), "tenant_id".to_string()];
    let p = Params {
        account: "0d000000-0000-4000-8000-000000000001",
        tenant_labels: &tenant_labels,
        allowlist: &allow,
        limits: ShapeLimits {
            max_series: 100_000,
            max_labels_per_series: 64,
            max_label_name_bytes: 1024,
            max_label_value_bytes: 4096,
        },
        max_decoded_bytes: 64 << 20,
        tee: Some(Accepted::ANY),
    };

    // Request path: decode, re-encode, write the tee's spool record (labels
    // once).
    let (out, peak) = peak_during(|| process(&body, &p, &mut Scratch::default()).expect("ok"));
    assert!(peak < 64 * MB, "request path peaked at {} MB", peak / MB);
    assert_eq!(out.tee.kept, 4000);
    assert!(
        out.tee.payload().len() < 400_000,
        "{}",
        out.tee.payload().len()
    );

    // The writer: decode and cut into parts of at most 8 MiB of rows on the
    // wire, one part alive at a time.
    let ((), peak) = peak_during(|| {
        let mut blocks = Vec::new();
        decode_record(out.tee.payload(), &mut blocks).expect("decodes");
        assert_eq!(blocks.len(), 1);
        let mut parts = Parts::new(&blocks, 200_000, 8 << 20);
        let mut rows = 0;
        while let Some(part) = parts.next_part() {
            rows += part.rows.len();
        }
        assert_eq!(rows, 4000);
    });
    assert!(peak < 96 * MB, "writer peaked at {} MB", peak / MB);
}
