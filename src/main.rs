//! cordon: run AI agents in kernel-enforced sandboxes that share state only
//! through one policy-checked, audited MCP gateway.

mod bridge;
mod config;
mod gateway;
mod sandbox;
mod store;

use std::path::PathBuf;
use std::process::ExitCode;

use anyhow::Context;
use clap::{Parser, Subcommand, ValueEnum};

#[derive(Parser)]
#[command(
    name = "cordon",
    version,
    about = "Run AI agents in kernel-enforced sandboxes that share state only through one audited MCP gateway",
    long_about = None,
)]
struct Cli {
    /// Log line format on stderr.
    #[arg(long, global = true, value_enum, default_value_t = LogFormat::Text)]
    log_format: LogFormat,
    #[command(subcommand)]
    command: Command,
}

#[derive(Clone, Copy, ValueEnum)]
enum LogFormat {
    Text,
    Json,
}

#[derive(Subcommand)]
enum Command {
    /// Serve the store as MCP tools on one Unix socket per configured agent.
    ///
    /// Creates <runtime_dir>/agents/<name>/mcp.sock for each [agents.<name>] of
    /// the config and serves until SIGTERM or SIGINT, then finishes in-flight
    /// calls, commits, removes the sockets and exits 0.
    Gateway {
        /// Deployment config (TOML): [gateway] store, runtime_dir, bounds; [agents.*].
        #[arg(long, short)]
        config: PathBuf,
    },
    /// Relay stdin/stdout to a gateway socket (what an agent's MCP client runs).
    ///
    /// Exits 0 when stdin closes or on SIGINT/SIGTERM; exits 1 with a one-line
    /// error naming the socket when it is missing, refuses, or closes first.
    Bridge {
        /// The agent's socket: <runtime_dir>/agents/<name>/mcp.sock.
        #[arg(long)]
        socket: PathBuf,
    },
    /// Run a command in a sandbox profile (`run`), or see what this kernel enforces (`probe`).
    Sandbox {
        #[command(subcommand)]
        command: sandbox::SandboxCommand,
    },
    /// Internal: apply a sandbox plan to this process, then execve the command.
    #[command(hide = true)]
    SandboxExec(sandbox::ExecArgs),
}

fn init_logging(format: LogFormat) {
    let filter = tracing_subscriber::EnvFilter::try_from_env("CORDON_LOG")
        .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("info,rmcp=warn"));
    let builder = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr);
    match format {
        LogFormat::Text => builder.init(),
        LogFormat::Json => builder.json().init(),
    }
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    let result = match cli.command {
        Command::Gateway { config } => {
            init_logging(cli.log_format);
            run_gateway(config)
        }
        Command::Bridge { socket } => run_bridge(socket),
        // Both exit with the sandboxed command's own status.
        Command::Sandbox { command } => return sandbox::cli::main(command),
        Command::SandboxExec(args) => return sandbox::cli::exec_main(args),
    };
    match result {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("cordon: {}", error_chain(&e));
            ExitCode::FAILURE
        }
    }
}

/// One line: each cause in turn, skipping causes that an outer message already
/// quotes (our error types name their source in their own message).
fn error_chain(e: &anyhow::Error) -> String {
    let mut out = e.to_string();
    for cause in e.chain().skip(1) {
        let text = cause.to_string();
        if !out.contains(&text) {
            out.push_str(": ");
            out.push_str(&text);
        }
    }
    out
}

fn run_gateway(path: PathBuf) -> anyhow::Result<()> {
    let config = config::Config::load(&path)?;
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
        .context("cannot start the async runtime")?;
    runtime.block_on(gateway::run(config))?;
    Ok(())
}

fn run_bridge(socket: PathBuf) -> anyhow::Result<()> {
    let runtime = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .context("cannot start the async runtime")?;
    let result = runtime.block_on(bridge::run(&socket));
    // tokio's stdin reader sits in a blocking thread that cannot be cancelled;
    // do not wait for it.
    runtime.shutdown_background();
    result?;
    Ok(())
}
