//! cordon: run AI agents in kernel-enforced sandboxes that share state only
//! through one policy-checked, audited MCP gateway.

use std::path::PathBuf;
use std::process::ExitCode;

use anyhow::Context;
use clap::{Parser, Subcommand, ValueEnum};
use cordon::policy::{explain, Policy};
use cordon::{bridge, config, gateway};

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
    /// Check, explain and reload role policies (policies/*.toml).
    Policy {
        #[command(subcommand)]
        command: PolicyCommand,
    },
}

#[derive(Subcommand)]
enum PolicyCommand {
    /// Validate policy files and run their [[tests]]; exit 1 on any error.
    Check {
        /// Policy files to check.
        #[arg(required = true)]
        files: Vec<PathBuf>,
    },
    /// Decide one call as the gateway would, and name the rule that decided it.
    Explain {
        #[arg(long)]
        policy: PathBuf,
        #[arg(long)]
        role: String,
        /// A gateway tool: kv_get, kv_put, kv_delete, kv_list, kv_scan, kv_txn, kv_watch.
        #[arg(long)]
        tool: String,
        /// The call's arguments as a JSON object, e.g. '{"key":"/projects/p1/plan"}'.
        #[arg(long, default_value = "{}")]
        args: String,
        /// Print the decision as JSON.
        #[arg(long)]
        json: bool,
    },
    /// The effective rights of a role after inheritance, as tables.
    Show {
        #[arg(long)]
        policy: PathBuf,
        #[arg(long)]
        role: String,
    },
    /// Make a running gateway load its policy file again (as SIGHUP does).
    /// A policy that fails to load is rejected and the running one stays.
    Reload {
        /// The deployment config the gateway runs with (finds its admin socket).
        #[arg(long, short)]
        config: PathBuf,
    },
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
        Command::Policy { command } => run_policy(command),
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

fn run_policy(command: PolicyCommand) -> anyhow::Result<()> {
    match command {
        PolicyCommand::Check { files } => {
            let mut failed = 0;
            for file in &files {
                match Policy::load(file) {
                    Ok(p) => {
                        for w in &p.warnings {
                            eprintln!("{w}");
                        }
                        println!(
                            "ok: {}: {} roles, {} tests passed, {} warnings",
                            file.display(),
                            p.roles().count(),
                            p.tests_passed,
                            p.warnings.len()
                        );
                    }
                    Err(e) => {
                        eprintln!("{e}");
                        failed += 1;
                    }
                }
            }
            if failed > 0 {
                anyhow::bail!("{failed} of {} policy files failed", files.len());
            }
            Ok(())
        }
        PolicyCommand::Explain {
            policy,
            role,
            tool,
            args,
            json,
        } => {
            let p = Policy::load(&policy)?;
            let args: serde_json::Value =
                serde_json::from_str(&args).context("--args is not valid JSON")?;
            if p.role(&role).is_none() {
                anyhow::bail!(
                    "no role {role:?} in {} (roles: {})",
                    policy.display(),
                    p.roles()
                        .map(|r| r.name.as_str())
                        .collect::<Vec<_>>()
                        .join(", ")
                );
            }
            let verdict = p.evaluate(&role, &tool, &args);
            if json {
                println!("{}", explain::explain_json(&role, &tool, &args, &verdict));
            } else {
                print!("{}", explain::explain_text(&role, &tool, &args, &verdict));
            }
            Ok(())
        }
        PolicyCommand::Show { policy, role } => {
            let p = Policy::load(&policy)?;
            let Some(r) = p.role(&role) else {
                anyhow::bail!(
                    "no role {role:?} in {} (roles: {})",
                    policy.display(),
                    p.roles()
                        .map(|r| r.name.as_str())
                        .collect::<Vec<_>>()
                        .join(", ")
                );
            };
            print!("{}", explain::show_text(&p, r));
            Ok(())
        }
        PolicyCommand::Reload { config } => {
            let config = config::Config::load(&config)?;
            let runtime = tokio::runtime::Builder::new_current_thread()
                .enable_all()
                .build()
                .context("cannot start the async runtime")?;
            let answer = runtime.block_on(gateway::admin::request(
                &config.admin_socket(),
                &serde_json::json!({"op": "policy_reload"}),
            ))?;
            if answer["ok"] == true {
                for w in answer["warnings"].as_array().into_iter().flatten() {
                    eprintln!("{}", w.as_str().unwrap_or_default());
                }
                println!(
                    "reloaded {} (sha256 {}, {} tests passed)",
                    answer["policy"].as_str().unwrap_or_default(),
                    answer["hash"].as_str().unwrap_or_default(),
                    answer["tests_passed"]
                );
                Ok(())
            } else {
                anyhow::bail!(
                    "reload rejected; the running policy stays in force:\n{}",
                    answer["error"].as_str().unwrap_or("(no reason given)")
                )
            }
        }
    }
}
