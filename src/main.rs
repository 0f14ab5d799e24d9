//! The `collab-engine` binary: parse the configuration, start the server, print the bound
//! address, wait for SIGINT or SIGTERM, shut down gracefully; SIGHUP reloads the token keys.
//! `collab-engine token ...` prints a signed token instead (`src/auth/mint.rs`), and
//! `collab-engine copy ...` moves documents between the disk backend and PostgreSQL
//! (`collab_engine::copy`), and `collab-engine export ...` / `import ...` write one document
//! to a JSON file and back (`collab_engine::export`).

use std::io::Write;
use std::path::PathBuf;

use anyhow::Context;
use clap::Parser;
use signal_hook::consts::{SIGHUP, SIGINT, SIGTERM};
use signal_hook::iterator::Signals;

use collab_engine::auth::mint::{MintClaims, MintKey};
use collab_engine::auth::{now_unix, Role};
use collab_engine::config::Config;

/// `collab-engine token`: prints a signed token, for development and scripts.
#[derive(Debug, Parser)]
#[command(
    name = "collab-engine token",
    about = "Print a signed access token (JWT)"
)]
struct TokenArgs {
    /// An HS256 secret file (read whole, as the server reads it) or an Ed25519 private key in
    /// PEM (EdDSA).
    #[arg(long)]
    key_file: PathBuf,
    /// The user.
    #[arg(long)]
    sub: String,
    /// The document, a prefix ending in `*`, or `*`.
    #[arg(long)]
    doc: String,
    /// `read`, `write` or `admin`.
    #[arg(long, value_parser = parse_role)]
    role: Role,
    /// Lifetime: `90s`, `30m`, `1h`, `7d`.
    #[arg(long, default_value = "1h", value_parser = parse_ttl)]
    ttl: u64,
    /// Token id, for revocation.
    #[arg(long)]
    jti: Option<String>,
    /// Display name.
    #[arg(long)]
    name: Option<String>,
    /// `kid` header (the server's key file name without extension); none tries every key.
    #[arg(long)]
    kid: Option<String>,
}

fn parse_role(text: &str) -> Result<Role, String> {
    Role::parse(text).map_err(|e| e.to_string())
}

/// A lifetime in the duration syntax of every flag (`90s`, `30m`, `1h`, `7d`), to whole seconds.
fn parse_ttl(text: &str) -> Result<u64, String> {
    let secs = collab_engine::units::parse_duration(text)?.as_secs();
    if secs == 0 {
        return Err(format!(
            "{text:?} is shorter than a second: not a usable lifetime"
        ));
    }
    Ok(secs)
}

fn token_command(args: &[String]) -> anyhow::Result<()> {
    let args = TokenArgs::parse_from(args);
    let key = MintKey::from_file(&args.key_file)?;
    let mut claims = MintClaims::new(&args.sub, &args.doc, args.role, now_unix(), args.ttl);
    claims.jti = args.jti;
    claims.name = args.name;
    let token = key.sign(&claims, args.kid.as_deref())?;
    writeln!(std::io::stdout(), "{token}").context("writing to stdout")?;
    Ok(())
}

fn main() -> anyhow::Result<()> {
    let argv: Vec<String> = std::env::args().collect();
    match argv.get(1).map(String::as_str) {
        Some("token") => return token_command(&argv[1..]),
        Some("copy") => return copy(),
        Some("export") => return export(),
        Some("import") => return import(),
        _ => {}
    }
    let config: Config = collab_engine::cli::parse();
    env_logger::Builder::from_env(env_logger::Env::default().default_filter_or("info")).init();
    // Register before starting, so a signal that arrives early is not lost.
    let mut signals =
        Signals::new([SIGINT, SIGTERM, SIGHUP]).context("installing signal handlers")?;
    let server = collab_engine::server::start(config)?;
    let mut stdout = std::io::stdout();
    writeln!(stdout, "listening on http://{}", server.local_addr()).context("writing to stdout")?;
    if let Some(admin) = server.admin_addr() {
        writeln!(stdout, "admin on http://{admin}").context("writing to stdout")?;
    }
    stdout.flush().context("flushing stdout")?;
    for signal in signals.forever() {
        if signal == SIGHUP {
            match server.reload_keys() {
                Ok(Some(keys)) => log::info!("SIGHUP: reloaded {:?}", keys),
                Ok(None) => log::info!("SIGHUP: no --auth-key-file, nothing to reload"),
                Err(e) => log::error!("SIGHUP: keys not reloaded, the old ones stay: {e:#}"),
            }
            continue;
        }
        log::info!("signal {signal}: shutting down");
        break;
    }
    server.shutdown()
}

/// `collab-engine copy ...`: see `collab_engine::copy`.
fn copy() -> anyhow::Result<()> {
    let args = collab_engine::copy::CopyArgs::parse_from(std::env::args().skip(1));
    env_logger::Builder::from_env(env_logger::Env::default().default_filter_or("warn")).init();
    let report = collab_engine::copy::run(&args)?;
    println!(
        "copied and verified {} documents ({} snapshots, {} op records)",
        report.docs, report.snapshots, report.ops
    );
    Ok(())
}

/// `collab-engine export ...`: see `collab_engine::export`.
fn export() -> anyhow::Result<()> {
    let args = collab_engine::export::ExportArgs::parse_from(std::env::args().skip(1));
    env_logger::Builder::from_env(env_logger::Env::default().default_filter_or("warn")).init();
    let file = collab_engine::export::run_export(&args)?;
    if let Some(out) = &args.out {
        eprintln!(
            "exported document {:?} (head {}, {} op messages) to {}",
            file.doc,
            file.head,
            file.log.len(),
            out.display()
        );
    }
    Ok(())
}

/// `collab-engine import ...`: see `collab_engine::export`.
fn import() -> anyhow::Result<()> {
    let args = collab_engine::export::ImportArgs::parse_from(std::env::args().skip(1));
    env_logger::Builder::from_env(env_logger::Env::default().default_filter_or("warn")).init();
    let imported = collab_engine::export::run_import(&args)?;
    println!(
        "imported and verified document {:?} (head {}, {} op messages)",
        imported.doc, imported.head, imported.ops
    );
    Ok(())
}
