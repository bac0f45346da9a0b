use std::process::ExitCode;

use clap::Parser;
use rwgate::cli::{Cli, Command};

fn main() -> ExitCode {
    let cli = Cli::parse();
    match cli.command {
        Command::CheckConfig(settings) => match settings.load() {
            Ok(c) => match check_files(&c) {
                Ok(()) => {
                    print!("{}", c.to_redacted_toml());
                    ExitCode::SUCCESS
                }
                Err(e) => {
                    eprintln!("rwgate: {e:#}");
                    ExitCode::from(2)
                }
            },
            Err(e) => {
                eprintln!("rwgate: {e}");
                ExitCode::from(2)
            }
        },
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

/// What `serve` would load besides the config itself: the tenants file or
/// cluster secret, and the TLS pair.
fn check_files(c: &rwgate::config::Config) -> anyhow::Result<()> {
    rwgate::auth::Authenticator::from_config(&c.auth)
        .map_err(|e| anyhow::anyhow!("invalid auth: {e}"))?;
    if let (Some(cert), Some(key)) = (&c.tls.cert, &c.tls.key) {
        rwgate::tls::acceptor(cert, key)?;
    }
    Ok(())
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
