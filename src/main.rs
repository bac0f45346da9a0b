use std::future::Future;
use std::process::ExitCode;

use clap::error::ErrorKind;
use clap::Parser;
use rwgate::cli::{clap_one_line, one_line, Cli, Command};
use rwgate::config::Config;

fn main() -> ExitCode {
    let cli = match Cli::try_parse() {
        Ok(cli) => cli,
        Err(e) => return usage_error(&e),
    };
    let cfg = match cli.command.load() {
        Ok(c) => c,
        Err(e) => {
            eprintln!("rwgate: {e}");
            return ExitCode::from(2);
        }
    };
    match cli.command {
        Command::CheckConfig(_) => {
            print!("{}", cfg.to_redacted_toml());
            ExitCode::SUCCESS
        }
        Command::Serve(_) => run(cfg, serve),
        Command::Migrate(_) => run(cfg, |cfg| async move {
            let ch = rwgate::cost::clickhouse::ClickHouse::new(&cfg.clickhouse)?;
            println!("{}", ch.migrate().await?);
            Ok(())
        }),
        Command::Reconcile(args) => run(cfg, |cfg| async move {
            let rollup = rwgate::cost::rollup::Rollup::from_config(&cfg)?.once();
            let account = args.account.as_deref();
            let whom = account.unwrap_or("every account");
            if args.move_ids {
                let now = rwgate::clock::unix_now();
                let m = rollup.move_ids(args.from, args.to, account, now).await?;
                println!(
                    "moved {} to {} ({whom}): {} buckets to platform ids, {} rows written, {} waiting for registration",
                    args.from, args.to, m.buckets_moved, m.rows_written, m.buckets_waiting
                );
            }
            let r = rollup.reconcile(args.from, args.to, account).await?;
            println!(
                "reconciled {} to {} ({whom}): {} buckets examined, {} changed, {} rows written, {} waiting for registration",
                args.from,
                args.to,
                r.buckets_examined,
                r.buckets_changed,
                r.rows_written,
                r.buckets_waiting
            );
            Ok(())
        }),
        Command::Rollup(_) => run(cfg, |cfg| async move {
            let grace = cfg.limits.shutdown_grace;
            // With metrics_listen, the rollup's metrics and health are served
            // there; the recorder is installed before the loop starts.
            let operator = match cfg.metrics_listen {
                Some(addr) => {
                    let listener = rwgate::server::bind_metrics(addr).await?;
                    rwgate::telemetry::metrics_handle();
                    tracing::info!(metrics_listen = %addr, "serving operator endpoints");
                    Some(listener)
                }
                None => None,
            };
            // The role ends at a signal, or with an error once its loop died
            // (a restart is the remedy; until then the probes fail).
            let health = std::sync::Arc::new(rwgate::health::Health::default());
            let ch = rwgate::cost::clickhouse::ClickHouse::new(&cfg.clickhouse)?;
            let rollup = rwgate::cost::rollup::RollupTask::start(&cfg, ch, &health)?;
            health.set_serving(true);
            let end = {
                let health = health.clone();
                async move {
                    tokio::select! {
                        () = shutdown_signal() => None,
                        dead = health.died() => Some(dead),
                    }
                }
            };
            let dead = match operator {
                Some(listener) => {
                    let timeout = cfg.limits.header_read_timeout;
                    let (tx, rx) = tokio::sync::oneshot::channel();
                    let end = async move {
                        let _ = tx.send(end.await);
                    };
                    rwgate::server::serve_operator(listener, timeout, health, end).await;
                    rx.await.ok().flatten()
                }
                None => end.await,
            };
            rollup.shutdown(tokio::time::Instant::now() + grace).await;
            match dead {
                Some(dead) => Err(anyhow::anyhow!("{dead}")),
                None => Ok(()),
            }
        }),
    }
}

/// `--help` and `--version` as clap prints them; a usage error in one line.
fn usage_error(e: &clap::Error) -> ExitCode {
    match e.kind() {
        ErrorKind::DisplayHelp
        | ErrorKind::DisplayVersion
        | ErrorKind::DisplayHelpOnMissingArgumentOrSubcommand => {
            let _ = e.print();
            ExitCode::from(u8::try_from(e.exit_code()).unwrap_or(2))
        }
        _ => {
            eprintln!("rwgate: {}", clap_one_line(e));
            ExitCode::from(2)
        }
    }
}

/// Sets up logging and a runtime and runs `f` to completion; a failure is
/// printed once, in one line (exit 1).
fn run<F, Fut>(cfg: Config, f: F) -> ExitCode
where
    F: FnOnce(Config) -> Fut,
    Fut: Future<Output = anyhow::Result<()>>,
{
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
            eprintln!("rwgate: {}", one_line(&e));
            ExitCode::FAILURE
        }
    }
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
