//! The `amphora` command line: `amphora serve` runs the server.

use amphora_server::config::{LogFormat, ServeOptions};
use clap::{Parser, Subcommand};
use std::process::ExitCode;

// mimalloc: the server allocates and frees small buffers on every request from
// several threads; glibc's malloc showed up at about 7 % of CPU under load.
#[global_allocator]
static GLOBAL: mimalloc::MiMalloc = mimalloc::MiMalloc;

/// Lets mimalloc ask for transparent huge pages (2 MiB) for the memory it takes
/// from the OS, unless `MIMALLOC_ALLOW_LARGE_OS_PAGES` says otherwise. The entry
/// cache and the store's page cache are read at random over tens of megabytes; with
/// 4 KiB pages nearly every such read misses the TLB as well as the CPU cache.
#[allow(unsafe_code)]
fn allow_huge_pages() {
    if std::env::var_os("MIMALLOC_ALLOW_LARGE_OS_PAGES").is_some()
        || std::env::var_os("MIMALLOC_LARGE_OS_PAGES").is_some()
    {
        return;
    }
    // SAFETY: mi_option_set stores an integer in mimalloc's option table; it has no
    // preconditions and may be called at any time, from any thread.
    unsafe {
        libmimalloc_sys::mi_option_set(libmimalloc_sys::mi_option_large_os_pages, 1);
    }
}

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
    Serve(Box<ServeOptions>),
    /// Development certificates: a CA, a server certificate, client certificates.
    #[command(subcommand)]
    Certs(Certs),
}

#[derive(Subcommand)]
enum Certs {
    /// Create a CA (ca.pem, ca.key) and a server certificate (server.pem, server.key) in DIR.
    Init {
        /// Where to write the files.
        dir: std::path::PathBuf,
        /// A DNS name or IP address clients use to reach the server. Repeatable.
        #[arg(long = "server-name", value_name = "NAME", required = true)]
        server_names: Vec<String>,
        /// Validity in days.
        #[arg(long, default_value_t = 825, value_parser = clap::value_parser!(i64).range(1..=3650))]
        days: i64,
    },
    /// Create a client certificate NAME.pem, NAME.key in DIR, signed by its CA.
    Client {
        /// The directory given to `certs init`.
        dir: std::path::PathBuf,
        /// The client's name: the certificate's CN and the file names.
        name: String,
        /// Validity in days.
        #[arg(long, default_value_t = 365, value_parser = clap::value_parser!(i64).range(1..=3650))]
        days: i64,
    },
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
    allow_huge_pages();
    let cli = Cli::parse();
    match cli.command {
        Command::Certs(certs) => {
            let result = match certs {
                Certs::Init {
                    dir,
                    server_names,
                    days,
                } => amphora_server::certs::init(&dir, &server_names, days),
                Certs::Client { dir, name, days } => {
                    amphora_server::certs::client(&dir, &name, days)
                }
            };
            match result {
                Ok(()) => ExitCode::SUCCESS,
                Err(e) => {
                    eprintln!("amphora: {e:#}");
                    ExitCode::FAILURE
                }
            }
        }
        Command::Serve(options) => {
            let settings = match (*options).resolve() {
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

#[cfg(test)]
mod tests {
    #[test]
    #[allow(unsafe_code)]
    fn huge_pages_are_allowed_unless_the_environment_decides() {
        let decided = std::env::var_os("MIMALLOC_ALLOW_LARGE_OS_PAGES").is_some()
            || std::env::var_os("MIMALLOC_LARGE_OS_PAGES").is_some();
        super::allow_huge_pages();
        // SAFETY: reads an integer from mimalloc's option table.
        let allowed = unsafe {
            libmimalloc_sys::mi_option_is_enabled(libmimalloc_sys::mi_option_large_os_pages)
        };
        if !decided {
            assert!(allowed);
        }
    }
}
