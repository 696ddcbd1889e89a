//! Commands and exit codes: 0 success, 1 configuration or start-up error, 2 usage error.

use std::path::PathBuf;
use std::process::ExitCode;

use clap::{Parser, Subcommand};

use crate::config;

#[derive(Parser, Debug)]
#[command(
    name = "mailbridge",
    version,
    about = "SMTP relay for legacy senders to Microsoft 365"
)]
pub struct Cli {
    #[command(subcommand)]
    pub command: Command,
}

#[derive(Subcommand, Debug)]
pub enum Command {
    /// Run the relay daemon.
    Serve {
        /// Configuration file (default: $MAILBRIDGE_CONFIG, else /etc/mailbridge/relay.yaml).
        #[arg(short, long, value_name = "PATH")]
        config: Option<PathBuf>,
        /// Run without a configuration file: listen on 127.0.0.1:2525, spool and deliver
        /// under ./mailbridge-demo/.
        #[arg(long, conflicts_with = "config")]
        demo: bool,
    },
    /// Validate a configuration file: prints "ok" or every error, exits 0 or 1.
    CheckConfig {
        #[arg(short, long, value_name = "PATH")]
        config: Option<PathBuf>,
    },
}

pub fn main() -> ExitCode {
    let cli = Cli::parse();
    match cli.command {
        Command::CheckConfig { config: path } => {
            let path = config::resolve_path(path.as_deref());
            match config::load(&path) {
                Ok(_) => {
                    println!("ok");
                    ExitCode::SUCCESS
                }
                Err(e) => {
                    eprintln!("{e}");
                    ExitCode::from(1)
                }
            }
        }
        Command::Serve { config: path, demo } => {
            let cfg = if demo {
                config::demo(std::path::Path::new("mailbridge-demo"))
            } else {
                let path = config::resolve_path(path.as_deref());
                match config::load(&path) {
                    Ok(c) => c,
                    Err(e) => {
                        eprintln!("configuration errors in {}:\n{e}", path.display());
                        return ExitCode::from(1);
                    }
                }
            };
            crate::logging::init(&cfg.log);
            let rt = match tokio::runtime::Builder::new_multi_thread()
                .enable_all()
                .build()
            {
                Ok(rt) => rt,
                Err(e) => {
                    eprintln!("cannot start the runtime: {e}");
                    return ExitCode::from(1);
                }
            };
            let res = rt.block_on(crate::daemon::serve(cfg, demo));
            // Blocking file operations still running (a hung file system) must not keep the
            // process alive past the ordered shutdown.
            rt.shutdown_timeout(std::time::Duration::from_secs(2));
            match res {
                Ok(()) => ExitCode::SUCCESS,
                Err(e) => {
                    tracing::error!("{e:#}");
                    eprintln!("mailbridge: {e:#}");
                    ExitCode::from(1)
                }
            }
        }
    }
}
