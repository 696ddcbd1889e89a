//! The fake Exchange Online server and fake token endpoint as a process, for benchmarks.
//!
//! ```text
//! cargo run --release --example fake_exchange -- [--token-lifetime SECS] [--max-connections N]
//!     [--mailbox ADDR] [--dir DIR] [--no-stdin]
//! ```
//!
//! Prints one JSON line with the endpoints, then runs (count-only mode) until SIGTERM, SIGINT
//! or EOF on stdin (unless `--no-stdin`: a background job of a non-interactive shell has
//! stdin on /dev/null), then prints one JSON line of totals and exits 0.

#[path = "../tests/support/fake_exchange.rs"]
mod fake_exchange;
#[path = "../tests/support/fake_token.rs"]
mod fake_token;

use std::path::PathBuf;
use std::process::ExitCode;
use std::time::Duration;

use fake_exchange::FakeExchange;
use fake_token::FakeToken;

const USAGE: &str = "usage: fake_exchange [--token-lifetime SECS] [--max-connections N] \
                     [--mailbox ADDR] [--dir DIR] [--no-stdin]";

struct Args {
    token_lifetime: u64,
    max_connections: usize,
    mailbox: String,
    dir: Option<PathBuf>,
    watch_stdin: bool,
}

fn parse_args() -> Result<Args, String> {
    let mut args = Args {
        token_lifetime: 3600,
        max_connections: 3,
        mailbox: "relay@contoso.example".to_string(),
        dir: None,
        watch_stdin: true,
    };
    let mut it = std::env::args().skip(1);
    while let Some(arg) = it.next() {
        let mut value = |name: &str| it.next().ok_or_else(|| format!("{name} needs a value"));
        match arg.as_str() {
            "--token-lifetime" => {
                args.token_lifetime = value(&arg)?
                    .parse()
                    .map_err(|_| "--token-lifetime: whole seconds".to_string())?;
            }
            "--max-connections" => {
                args.max_connections = value(&arg)?
                    .parse()
                    .map_err(|_| "--max-connections: a number".to_string())?;
            }
            "--mailbox" => args.mailbox = value(&arg)?,
            "--dir" => args.dir = Some(PathBuf::from(value(&arg)?)),
            "--no-stdin" => args.watch_stdin = false,
            "-h" | "--help" => return Err(String::new()),
            other => return Err(format!("unknown argument {other:?}")),
        }
    }
    Ok(args)
}

#[tokio::main]
async fn main() -> ExitCode {
    let args = match parse_args() {
        Ok(a) => a,
        Err(e) => {
            if !e.is_empty() {
                eprintln!("fake_exchange: {e}");
            }
            eprintln!("{USAGE}");
            return ExitCode::from(2);
        }
    };
    let dir = args.dir.clone().unwrap_or_else(|| {
        std::env::temp_dir().join(format!("fake-exchange-{}", std::process::id()))
    });
    if let Err(e) = std::fs::create_dir_all(&dir) {
        eprintln!("fake_exchange: cannot create {}: {e}", dir.display());
        return ExitCode::from(1);
    }

    let token = FakeToken::start(Duration::from_secs(args.token_lifetime)).await;
    let exchange = FakeExchange::start(token.issued(), &args.mailbox).await;
    exchange.set_count_only(true);
    exchange.set_max_connections(args.max_connections);
    let ca_file = exchange.write_ca(&dir);
    println!(
        "{}",
        serde_json::json!({
            "smtp": exchange.addr().to_string(),
            "token_url": token.url(),
            "ca_file": ca_file.display().to_string(),
            "mailbox": args.mailbox,
        })
    );

    let (eof_tx, eof_rx) = tokio::sync::oneshot::channel::<()>();
    if args.watch_stdin {
        std::thread::spawn(move || {
            let mut sink = std::io::sink();
            let _ = std::io::copy(&mut std::io::stdin().lock(), &mut sink);
            let _ = eof_tx.send(());
        });
    } else {
        std::mem::forget(eof_tx);
    }
    let mut term =
        tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate()).unwrap();
    tokio::select! {
        _ = tokio::signal::ctrl_c() => {}
        _ = term.recv() => {}
        _ = eof_rx => {}
    }

    let (messages, bytes, recipients) = exchange.counts();
    let auths = exchange.auths();
    println!(
        "{}",
        serde_json::json!({
            "messages": messages,
            "recipients": recipients,
            "bytes": bytes,
            "max_concurrent": exchange.max_concurrent(),
            "rejected_connections": exchange.rejected_connections(),
            "connections": exchange.connections_total(),
            "token_requests": token.requests(),
            "auths": auths.len(),
            "auths_accepted": auths.iter().filter(|a| a.accepted).count(),
        })
    );
    ExitCode::SUCCESS
}
