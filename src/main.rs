use std::process::ExitCode;

use clap::Parser;
use rwgate::cli::{Cli, Command};

fn main() -> ExitCode {
    let cli = Cli::parse();
    match cli.command {
        Command::CheckConfig(settings) => match settings.load() {
            Ok(c) => {
                print!("{}", c.to_redacted_toml());
                ExitCode::SUCCESS
            }
            Err(e) => {
                eprintln!("rwgate: {e}");
                ExitCode::from(2)
            }
        },
        Command::Migrate(settings) => offline(&settings, |cfg| async move {
            let ch = rwgate::clickhouse::ClickHouse::new(&cfg.clickhouse)?;
            let r = ch.migrate().await?;
            println!(
                "clickhouse {}: created {:?}, added columns {:?}",
                r.server_version, r.created, r.columns_added
            );
            Ok(())
        }),
        Command::Reconcile(args) => offline(&args.settings, |cfg| async move {
            let ch = rwgate::clickhouse::ClickHouse::new(&cfg.clickhouse)?;
            let rollup = rwgate::rollup::Rollup::new(ch, &cfg.rollup);
            let r = rollup
                .reconcile(&args.from, &args.to, args.account.as_deref())
                .await?;
            println!(
                "reconciled {}..={}: {} buckets examined, {} changed, {} rows written",
                args.from, args.to, r.buckets_examined, r.buckets_changed, r.rows_written
            );
            Ok(())
        }),
        Command::Serve(settings) => {
            let cfg = match settings.load() {
                Ok(c) => c,
                Err(e) => {
                    eprintln!("rwgate: {e}");
                    return ExitCode::from(2);
                }
            };
            rwgate::telemetry::init_logging(cfg.log.format, &cfg.log.level);
            let rt = match tokio::runtime::Runtime::new() {
                Ok(rt) => rt,
                Err(e) => {
                    eprintln!("rwgate: cannot start the runtime: {e}");
                    return ExitCode::FAILURE;
                }
            };
            match rt.block_on(serve(cfg)) {
                Ok(()) => ExitCode::SUCCESS,
                Err(e) => {
                    tracing::error!("{e:#}");
                    eprintln!("rwgate: {e:#}");
                    ExitCode::FAILURE
                }
            }
        }
    }
}

/// Runs a one-shot command needing ClickHouse (`migrate`, `reconcile`).
fn offline<F, Fut>(settings: &rwgate::cli::Settings, f: F) -> ExitCode
where
    F: FnOnce(rwgate::config::Config) -> Fut,
    Fut: std::future::Future<Output = anyhow::Result<()>>,
{
    let cfg = match settings.load() {
        Ok(c) => c,
        Err(e) => {
            eprintln!("rwgate: {e}");
            return ExitCode::from(2);
        }
    };
    if cfg.clickhouse.url.is_none() {
        eprintln!("rwgate: invalid clickhouse.url: required by this command");
        return ExitCode::from(2);
    }
    rwgate::telemetry::init_logging(cfg.log.format, &cfg.log.level);
    let rt = match tokio::runtime::Runtime::new() {
        Ok(rt) => rt,
        Err(e) => {
            eprintln!("rwgate: cannot start the runtime: {e}");
            return ExitCode::FAILURE;
        }
    };
    match rt.block_on(f(cfg)) {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("rwgate: {e:#}");
            ExitCode::FAILURE
        }
    }
}

async fn serve(cfg: rwgate::config::Config) -> anyhow::Result<()> {
    let listener = tokio::net::TcpListener::bind(cfg.listen)
        .await
        .map_err(|e| anyhow::anyhow!("cannot listen on {}: {e}", cfg.listen))?;
    rwgate::run(cfg, listener, shutdown_signal()).await
}

/// Completes on SIGTERM or SIGINT.
async fn shutdown_signal() {
    use tokio::signal::unix::{signal, SignalKind};
    let mut term = match signal(SignalKind::terminate()) {
        Ok(s) => s,
        Err(e) => {
            tracing::error!("cannot listen for SIGTERM: {e}");
            let _ = tokio::signal::ctrl_c().await;
            return;
        }
    };
    tokio::select! {
        _ = term.recv() => tracing::info!("SIGTERM received"),
        _ = tokio::signal::ctrl_c() => tracing::info!("SIGINT received"),
    }
}
