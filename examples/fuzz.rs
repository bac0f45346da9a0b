//! The release-mode fuzz runner: the property of `rwgate::fuzz` for as many
//! cases as asked.
//!
//! ```text
//! cargo run --release --features fuzz --example fuzz -- --cases 5000000 [--seed N] [--corpus DIR]...
//! ```
//!
//! Prints its progress, then the cases run, the seconds taken and the
//! cases per second; or the failing input (to add to
//! `rwgate::fuzz::REGRESSIONS`) and exits 1.

use std::path::PathBuf;
use std::time::Instant;

fn usage(why: &str) -> ! {
    eprintln!("fuzz: {why}\nusage: fuzz [--cases N] [--seed N] [--corpus DIR]...");
    std::process::exit(2);
}

fn number<T: std::str::FromStr>(flag: &str, v: Option<String>) -> T {
    match v.map(|v| (v.parse(), v)) {
        Some((Ok(n), _)) => n,
        Some((Err(_), v)) => usage(&format!("{flag} takes a number, not {v:?}")),
        None => usage(&format!("{flag} takes a number")),
    }
}

fn main() {
    let mut run = rwgate::fuzz::Run {
        cases: 1_000_000,
        seed: std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map_or(0, |d| d.as_nanos() as u64),
        corpus: Vec::new(),
    };
    let mut args = std::env::args().skip(1);
    while let Some(a) = args.next() {
        match a.as_str() {
            "--cases" => run.cases = number("--cases", args.next()),
            "--seed" => run.seed = number("--seed", args.next()),
            "--corpus" => match args.next() {
                Some(dir) => run.corpus.push(PathBuf::from(dir)),
                None => usage("--corpus takes a directory"),
            },
            other => usage(&format!("unknown argument {other:?}")),
        }
    }
    println!(
        "fuzz: {} cases, seed {}, extra corpus {:?}",
        run.cases, run.seed, run.corpus
    );
    let started = Instant::now();
    let result = rwgate::fuzz::run(&run, |done| {
        let s = started.elapsed().as_secs_f64();
        println!("fuzz: {done} cases in {s:.0} s ({:.0}/s)", done as f64 / s);
    });
    let s = started.elapsed().as_secs_f64();
    match result {
        Ok(()) => println!(
            "fuzz: {} cases passed in {s:.1} s ({:.0} cases/s), seed {}",
            run.cases,
            f64::from(run.cases) / s,
            run.seed
        ),
        Err(failure) => {
            eprintln!(
                "fuzz: a case failed after {s:.1} s (seed {}): {failure}",
                run.seed
            );
            std::process::exit(1);
        }
    }
}
