//! Writes realistic remote-write request files for the k6 load tests in
//! `loadtest/`: snappy-compressed `prometheus.WriteRequest` bodies
//! (Remote-Write 1.0) or `io.prometheus.write.v2.Request` bodies (2.0, the
//! same series), one per file, and a `manifest.json` naming the protocol's
//! headers and each file's tenant and sample count.
//!
//! The payloads come from `rwgate::loadgen`, the generator the criterion
//! benches use, so the benches and the load tests measure the same requests.

use std::path::PathBuf;
use std::process::ExitCode;
use std::time::{SystemTime, UNIX_EPOCH};

use clap::Parser;
use rwgate::loadgen::{self, Profile};
use rwgate::wire_v2;

#[derive(Debug, Parser)]
#[command(
    name = "rwgate-loadgen",
    about = "Write realistic snappy protobuf remote-write requests for load tests"
)]
struct Args {
    /// Directory to write the request files and manifest.json into.
    #[arg(long, short)]
    out: PathBuf,
    /// Number of request files.
    #[arg(long, default_value_t = 32)]
    requests: usize,
    /// Series per request.
    #[arg(long, default_value_t = 1000)]
    series: usize,
    /// Labels per series, `__name__` included (minimum 4).
    #[arg(long, default_value_t = 10)]
    labels: usize,
    /// Samples per series.
    #[arg(long, default_value_t = 1)]
    samples: usize,
    /// Distinct tenants (Cloud-Account-Id values); requests cycle through them.
    #[arg(long, default_value_t = 1)]
    tenants: usize,
    /// Seed of the generator (same seed, same files, apart from timestamps).
    #[arg(long, default_value_t = 1)]
    seed: u64,
    /// Remote-Write version of the bodies: 1.0 or 2.0 (same series either way).
    #[arg(long, default_value = "1.0", value_parser = ["1.0", "2.0"])]
    protocol: String,
}

fn main() -> ExitCode {
    let args = Args::parse();
    match run(&args) {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("rwgate-loadgen: {e}");
            ExitCode::FAILURE
        }
    }
}

fn run(a: &Args) -> Result<(), String> {
    if a.requests == 0 || a.tenants == 0 || a.series == 0 || a.samples == 0 {
        return Err("--requests, --tenants, --series and --samples must be at least 1".into());
    }
    let now_ms = SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_err(|e| format!("clock before 1970: {e}"))?
        .as_millis() as i64;
    let profile = Profile {
        series: a.series,
        labels: a.labels.max(4),
        samples: a.samples,
        timestamp_ms: now_ms,
    };
    std::fs::create_dir_all(&a.out)
        .map_err(|e| format!("cannot create {}: {e}", a.out.display()))?;
    let tenants: Vec<String> = (0..a.tenants).map(loadgen::tenant_id).collect();
    let v2 = a.protocol == "2.0";
    let (content_type, version) = if v2 {
        (wire_v2::CONTENT_TYPE, wire_v2::VERSION)
    } else {
        ("application/x-protobuf", "0.1.0")
    };
    let mut entries = Vec::with_capacity(a.requests);
    let mut total_bytes = 0usize;
    for i in 0..a.requests {
        let tenant = &tenants[i % tenants.len()];
        let seed = a.seed.wrapping_mul(1_000_003) + i as u64;
        let body = if v2 {
            loadgen::snappy_request_v2(&profile, tenant, seed)
        } else {
            loadgen::snappy_request(&profile, tenant, seed)
        };
        let file = format!("req-{i:05}.bin");
        let path = a.out.join(&file);
        std::fs::write(&path, &body)
            .map_err(|e| format!("cannot write {}: {e}", path.display()))?;
        total_bytes += body.len();
        entries.push(serde_json::json!({
            "file": file,
            "tenant": tenant,
            "series": a.series,
            "samples": a.series * a.samples,
            "bytes": body.len(),
        }));
    }
    let manifest = serde_json::json!({
        "protocol": a.protocol,
        "headers": {
            "Content-Type": content_type,
            "Content-Encoding": "snappy",
            "X-Prometheus-Remote-Write-Version": version,
        },
        "profile": {
            "series": a.series,
            "labels": profile.labels,
            "samples_per_series": a.samples,
            "timestamp_ms": now_ms,
        },
        "tenants": tenants,
        "requests": entries,
    });
    let path = a.out.join("manifest.json");
    let text = serde_json::to_string_pretty(&manifest).map_err(|e| e.to_string())?;
    std::fs::write(&path, text).map_err(|e| format!("cannot write {}: {e}", path.display()))?;
    println!(
        "wrote {} Remote-Write {} requests ({} series x {} labels, {} tenants, {} KiB avg) to {}",
        a.requests,
        a.protocol,
        a.series,
        profile.labels,
        a.tenants,
        total_bytes / a.requests / 1024,
        a.out.display()
    );
    Ok(())
}
