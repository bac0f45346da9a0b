use std::future::Future;
use std::process::ExitCode;

use clap::Parser;
use rwgate::cli::{Cli, Command, Settings};
use rwgate::config::Config;

fn main() -> ExitCode {
    let cli = Cli::parse();
    match cli.command {
        Command::CheckConfig(settings) => {
            let Some(cfg) = load(&settings) else {
                return ExitCode::from(2);
            };
            match check_files(&cfg) {
                Ok(()) => {
                    print!("{}", cfg.to_redacted_toml());
                    ExitCode::SUCCESS
                }
                Err(e) => {
                    eprintln!("rwgate: {e:#}");
                    ExitCode::from(2)
                }
            }
        }
        Command::Serve(settings) => run(&settings, false, serve),
        Command::Migrate(settings) => run(&settings, true, |cfg| async move {
            let ch = rwgate::cost::clickhouse::ClickHouse::new(&cfg.clickhouse)?;
            let r = ch.migrate().await?;
            println!(
                "clickhouse {}: created {:?}, added columns {:?}",
                r.server_version, r.created, r.columns_added
            );
            Ok(())
        }),
        Command::Reconcile(args) => run(&args.settings, true, |cfg| async move {
            let ch = rwgate::cost::clickhouse::ClickHouse::new(&cfg.clickhouse)?;
            let rollup = rwgate::cost::rollup::Rollup::new(ch, &cfg.rollup);
            let r = rollup
                .reconcile(args.from, args.to, args.account.as_deref())
                .await?;
            println!(
                "reconciled {}..={}: {} buckets examined, {} changed, {} rows written",
                args.from, args.to, r.buckets_examined, r.buckets_changed, r.rows_written
            );
            Ok(())
        }),
        Command::Rollup(settings) => run(&settings, true, |cfg| async move {
            let grace = cfg.limits.shutdown_grace;
            let rollup = rwgate::cost::rollup::RollupTask::start(&cfg)?;
            shutdown_signal().await;
            rollup.shutdown(grace).await;
            Ok(())
        }),
    }
}

/// The effective config, or `None` after printing why not.
fn load(settings: &Settings) -> Option<Config> {
    match settings.load() {
        Ok(c) => Some(c),
        Err(e) => {
            eprintln!("rwgate: {e}");
            None
        }
    }
}

/// Loads the config (exit 2 if bad), sets up logging and a runtime, and runs
/// `f` to completion (exit 1 if it fails).
fn run<F, Fut>(settings: &Settings, needs_clickhouse: bool, f: F) -> ExitCode
where
    F: FnOnce(Config) -> Fut,
    Fut: Future<Output = anyhow::Result<()>>,
{
    let Some(cfg) = load(settings) else {
        return ExitCode::from(2);
    };
    if needs_clickhouse && cfg.clickhouse.url.is_none() {
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
            tracing::error!("{e:#}");
            eprintln!("rwgate: {e:#}");
            ExitCode::FAILURE
        }
    }
}

/// What `serve` would load besides the config itself: the tenants file or
/// cluster secret, the TLS pair, and the upstream's CA and client pair.
fn check_files(c: &Config) -> anyhow::Result<()> {
    rwgate::auth::Authenticator::from_config(&c.auth)
        .map_err(|e| anyhow::anyhow!("invalid auth: {e}"))?;
    if let (Some(cert), Some(key)) = (&c.tls.cert, &c.tls.key) {
        rwgate::tls::acceptor(cert, key)?;
    }
    rwgate::tls::client_config(&c.upstream.tls)?;
    Ok(())
}

async fn serve(cfg: Config) -> anyhow::Result<()> {
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
