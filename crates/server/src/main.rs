//! The `amphora` command line: `amphora serve` runs the server.

use amphora_server::config::{LogFormat, ServeOptions};
use clap::{Parser, Subcommand};
use std::process::ExitCode;

/// Amphora: metadata, discovery and personal files for applications across clouds.
#[derive(Parser)]
#[command(name = "amphora", version, about)]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Run the server (embedded store by default).
    Serve(ServeOptions),
}

fn init_logging(format: LogFormat) {
    let filter = tracing_subscriber::EnvFilter::try_from_env("AMPHORA_LOG")
        .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("info"));
    let builder = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr)
        .with_ansi(std::io::IsTerminal::is_terminal(&std::io::stderr()));
    match format {
        LogFormat::Text => builder.init(),
        LogFormat::Json => builder.json().init(),
    }
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    match cli.command {
        Command::Serve(options) => {
            let settings = match options.resolve() {
                Ok(s) => s,
                Err(e) => {
                    eprintln!("amphora: configuration error: {e:#}");
                    return ExitCode::from(2);
                }
            };
            init_logging(settings.log_format);
            let runtime = match tokio::runtime::Builder::new_multi_thread()
                .enable_all()
                .build()
            {
                Ok(r) => r,
                Err(e) => {
                    eprintln!("amphora: cannot start the runtime: {e}");
                    return ExitCode::FAILURE;
                }
            };
            match runtime.block_on(amphora_server::run(settings)) {
                Ok(()) => ExitCode::SUCCESS,
                Err(e) => {
                    tracing::error!("{e:#}");
                    eprintln!("amphora: {e:#}");
                    ExitCode::FAILURE
                }
            }
        }
    }
}
