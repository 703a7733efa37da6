//! cordon: run AI agents in kernel-enforced sandboxes that share state only
//! through one policy-checked, audited MCP gateway.

use std::path::PathBuf;
use std::process::ExitCode;

use anyhow::Context;
use clap::{Parser, Subcommand, ValueEnum};
use cordon::policy::{explain, Policy};
use cordon::{audit, bridge, config, gateway, orchestrator, sandbox};

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

/// Why `cordon up` restarted the gateway (`cordon gateway --restart-reason`).
#[derive(Clone, Copy, ValueEnum)]
enum RestartReason {
    /// Killed by the watchdog: it did not answer its pings in time.
    Watchdog,
    /// It exited by itself, or could not be started.
    Exited,
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
        #[arg(long, short, env = "CORDON_CONFIG")]
        config: PathBuf,
        /// Started by `cordon up`: serve an agent only once its root process is registered.
        #[arg(long, hide = true)]
        managed: bool,
        /// With --managed: why `cordon up` started this gateway in place of an
        /// earlier one (recorded in its `gateway_start` audit record).
        #[arg(long, hide = true, value_enum, requires = "managed")]
        restart_reason: Option<RestartReason>,
        /// The earlier gateway's pid.
        #[arg(long, hide = true, requires = "restart_reason")]
        previous_pid: Option<i32>,
        /// Watchdog: how long the earlier gateway had not answered.
        #[arg(long, hide = true, requires = "restart_reason")]
        unanswered_ms: Option<u64>,
        /// Exited: how the earlier gateway ended ("signal 9").
        #[arg(long, hide = true, requires = "restart_reason")]
        previous_status: Option<String>,
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
    /// Read and verify the audit log (read-only; works while the gateway runs).
    ///
    /// Records of reads and denials reach the log within [audit] sync_interval
    /// (default 1 s); mutations' records at once.
    Audit {
        #[command(subcommand)]
        command: AuditCommand,
    },
    /// Run a command in a sandbox profile (`run`), or see what this kernel enforces (`probe`).
    Sandbox {
        #[command(subcommand)]
        command: sandbox::SandboxCommand,
    },
    /// Run a deployment: the gateway, then every agent in its sandbox; supervise
    /// and restart them; stop everything on SIGINT/SIGTERM (agents first).
    ///
    /// Exits 0 when every agent finished successfully (or after a signal), 1
    /// when one failed. On a terminal, shows a live status table.
    Up {
        /// Deployment config (TOML) with [agents.*] command, sandbox, restart, …
        config: PathBuf,
    },
    /// Start, stop or restart one agent of a running `cordon up` (a replica
    /// group's base name, e.g. `coder`, means all of its replicas).
    Agent {
        #[command(subcommand)]
        command: AgentCommand,
    },
    /// The agents of a running `cordon up`: name, role, uid, pid, state,
    /// restarts, uptime, memory, calls, denials, what their logs dropped
    /// (past `[logs]` rate_per_second), last event.
    Status {
        #[arg(long, short, env = "CORDON_CONFIG")]
        config: PathBuf,
        /// One JSON object instead of the table.
        #[arg(long)]
        json: bool,
    },
    /// Run a TOML list of tool calls as an agent, checking each outcome
    /// (allow, deny, error code, values); exit 1 if any expectation fails.
    Script {
        /// The script (see `orchestrator::script` for the format).
        file: PathBuf,
        /// The agent's socket (default: $CORDON_SOCKET, set by `cordon up`).
        #[arg(long, env = "CORDON_SOCKET")]
        socket: Option<PathBuf>,
        /// Instead of --socket: the deployment config and the agent's name.
        #[arg(long, short, requires = "agent")]
        config: Option<PathBuf>,
        /// The agent's name, `${agent}` in the script (default: $CORDON_AGENT).
        #[arg(long, env = "CORDON_AGENT")]
        agent: Option<String>,
        /// Talk through `cordon bridge` (as Claude Code does) instead of the socket.
        #[arg(long)]
        bridge: bool,
    },
    /// Internal: apply a sandbox plan to this process, then execve the command.
    #[command(hide = true)]
    SandboxExec(sandbox::ExecArgs),
}

#[derive(Subcommand)]
enum AgentCommand {
    /// Start a stopped, exited or failed agent (its restart count in the window starts over).
    Start(AgentArgs),
    /// SIGTERM to the agent's whole tree, SIGKILL after its stop_grace; it stays stopped.
    Stop(AgentArgs),
    /// Stop the agent, then start it again; the others are not touched.
    Restart(AgentArgs),
}

#[derive(clap::Args)]
struct AgentArgs {
    /// The agent (or replica group).
    name: String,
    #[arg(long, short, env = "CORDON_CONFIG")]
    config: PathBuf,
}

#[derive(clap::Args, Clone)]
struct AuditFilters {
    /// Only this agent.
    #[arg(long)]
    agent: Option<String>,
    /// Only this role.
    #[arg(long)]
    role: Option<String>,
    /// Only this tool (kv_get, kv_put, …).
    #[arg(long)]
    tool: Option<String>,
    /// Only this decision: allow, deny or invalid.
    #[arg(long, value_parser = ["allow", "deny", "invalid"])]
    decision: Option<String>,
    /// Only this event: call, connection_refused, policy_loaded,
    /// policy_rejected, gateway_start, gateway_stop, checkpoint.
    #[arg(long)]
    event: Option<String>,
}

#[derive(Clone, Copy, ValueEnum)]
enum AuditFormat {
    Table,
    Jsonl,
}

#[derive(Subcommand)]
enum AuditCommand {
    /// The latest records as a table; with -f, keep printing new ones.
    Tail {
        /// The deployment config (finds the store).
        #[arg(long, short, env = "CORDON_CONFIG")]
        config: PathBuf,
        /// Follow: print records as they are committed, until interrupted.
        #[arg(short, long)]
        follow: bool,
        /// How many of the latest records to show first.
        #[arg(short = 'n', long, default_value_t = 20)]
        lines: usize,
        #[command(flatten)]
        filters: AuditFilters,
    },
    /// Records in a time window: --since/--until take a time
    /// (2026-11-27T21:00:00Z, 2026-11-27) or an age (15m, 2h, 7d).
    Query {
        #[arg(long, short, env = "CORDON_CONFIG")]
        config: PathBuf,
        #[arg(long)]
        since: Option<String>,
        #[arg(long)]
        until: Option<String>,
        #[arg(long, value_enum, default_value_t = AuditFormat::Table)]
        format: AuditFormat,
        #[command(flatten)]
        filters: AuditFilters,
    },
    /// Check the whole hash chain: exit 0 with a count, or 1 naming the first
    /// bad seq and why.
    Verify {
        #[arg(long, short, env = "CORDON_CONFIG")]
        config: PathBuf,
    },
    /// Every record as one JSON object per line (the stored canonical form),
    /// for a SIEM.
    Export {
        #[arg(long, short, env = "CORDON_CONFIG")]
        config: PathBuf,
        /// Only jsonl.
        #[arg(long, value_parser = ["jsonl"], default_value = "jsonl")]
        format: String,
        #[arg(long)]
        since: Option<String>,
        #[arg(long)]
        until: Option<String>,
    },
    /// Calls, denials and errors per agent, role and tool; events by kind.
    Stats {
        #[arg(long, short, env = "CORDON_CONFIG")]
        config: PathBuf,
        #[arg(long)]
        since: Option<String>,
        #[arg(long)]
        until: Option<String>,
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
        #[arg(long, short, env = "CORDON_CONFIG")]
        config: PathBuf,
    },
}

fn init_logging(format: LogFormat) {
    let filter = tracing_subscriber::EnvFilter::try_from_env("CORDON_LOG")
        .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("info,rmcp=warn"));
    let builder = tracing_subscriber::fmt()
        .with_env_filter(filter)
        // Colours only for a terminal: `cordon up` sends the gateway's log to a file.
        .with_ansi(std::io::IsTerminal::is_terminal(&std::io::stderr()))
        .with_writer(std::io::stderr);
    match format {
        LogFormat::Text => builder.init(),
        LogFormat::Json => builder.json().init(),
    }
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    let result = match cli.command {
        Command::Gateway {
            config,
            managed,
            restart_reason,
            previous_pid,
            unanswered_ms,
            previous_status,
        } => {
            init_logging(cli.log_format);
            let restart = restart_reason.map(|r| match r {
                RestartReason::Watchdog => gateway::Restart::Watchdog {
                    previous_pid: previous_pid.unwrap_or(0),
                    unanswered_ms: unanswered_ms.unwrap_or(0),
                },
                RestartReason::Exited => gateway::Restart::Exited {
                    previous_pid,
                    status: previous_status.unwrap_or_else(|| "unknown".into()),
                },
            });
            run_gateway(config, managed, restart)
        }
        Command::Bridge { socket } => run_bridge(socket),
        Command::Up { config } => {
            let live = std::io::IsTerminal::is_terminal(&std::io::stderr());
            if live {
                // The live table owns the terminal; only problems are logged.
                let filter = tracing_subscriber::EnvFilter::try_from_env("CORDON_LOG")
                    .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("warn"));
                tracing_subscriber::fmt()
                    .with_env_filter(filter)
                    .with_writer(std::io::stderr)
                    .init();
            } else {
                init_logging(cli.log_format);
            }
            match run_up(config, live) {
                Ok(true) => return ExitCode::SUCCESS,
                Ok(false) => return ExitCode::FAILURE,
                Err(e) => Err(e),
            }
        }
        Command::Agent { command } => run_agent(command),
        Command::Status { config, json } => run_status(config, json),
        Command::Script {
            file,
            socket,
            config,
            agent,
            bridge,
        } => match run_script(file, socket, config, agent, bridge) {
            Ok(true) => return ExitCode::SUCCESS,
            Ok(false) => return ExitCode::FAILURE,
            Err(e) => Err(e),
        },
        Command::Policy { command } => run_policy(command),
        Command::Audit { command } => run_audit(command),
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

fn run_gateway(
    path: PathBuf,
    managed: bool,
    restart: Option<gateway::Restart>,
) -> anyhow::Result<()> {
    let config = config::Config::load(&path)?;
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
        .context("cannot start the async runtime")?;
    runtime.block_on(gateway::run_with(config, managed, restart))?;
    Ok(())
}

fn run_up(path: PathBuf, live: bool) -> anyhow::Result<bool> {
    let config = config::Config::load(&path)?;
    // One thread: see orchestrator's module docs (parent-death signals).
    let runtime = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .context("cannot start the async runtime")?;
    Ok(runtime.block_on(orchestrator::up(config, orchestrator::Options { live }))?)
}

fn run_agent(command: AgentCommand) -> anyhow::Result<()> {
    let (op, args) = match command {
        AgentCommand::Start(a) => ("start", a),
        AgentCommand::Stop(a) => ("stop", a),
        AgentCommand::Restart(a) => ("restart", a),
    };
    let config = config::Config::load(&args.config)?;
    let answer = orchestrator::control::request(
        &config.up_socket(),
        &serde_json::json!({"op": op, "agent": args.name}),
    )?;
    if answer["ok"] != true {
        anyhow::bail!("{}", answer["error"].as_str().unwrap_or("refused"));
    }
    println!("{op}: {}", answer["agents"]);
    Ok(())
}

fn run_status(path: PathBuf, json: bool) -> anyhow::Result<()> {
    let config = config::Config::load(&path)?;
    let mut answer =
        orchestrator::control::request(&config.up_socket(), &serde_json::json!({"op": "status"}))?;
    // The store's space and its alarms come from the gateway itself; a
    // gateway that does not answer in time is shown as such.
    answer["store"] = if answer["gateway"]["state"] == "unresponsive" {
        // The watchdog already knows it does not answer: do not wait on it.
        serde_json::json!({"error": "the gateway is not answering (see gateway state)"})
    } else {
        match cordon::gateway::admin::request_blocking(
            &config.admin_socket(),
            &serde_json::json!({"op": "status"}),
            std::time::Duration::from_secs(2),
        ) {
            Ok(s) if s["ok"] == true => s["store"].clone(),
            Ok(s) => serde_json::json!({"error": s["error"]}),
            Err(e) => serde_json::json!({"error": e.to_string()}),
        }
    };
    if json {
        println!("{answer}");
    } else {
        print!("{}", orchestrator::status::table(&answer));
    }
    Ok(())
}

fn run_script(
    file: PathBuf,
    socket: Option<PathBuf>,
    config: Option<PathBuf>,
    agent: Option<String>,
    bridge: bool,
) -> anyhow::Result<bool> {
    let socket = match (socket, &config, &agent) {
        (_, Some(c), Some(a)) => config::Config::load(c)?.agent_socket(a),
        (Some(s), _, _) => s,
        _ => anyhow::bail!("give --socket (or $CORDON_SOCKET), or --config and --agent"),
    };
    let agent = agent.unwrap_or_else(|| "script".into());
    Ok(orchestrator::script::run(&file, &socket, &agent, bridge)?)
}

fn run_bridge(socket: PathBuf) -> anyhow::Result<()> {
    let runtime = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .context("cannot start the async runtime")?;
    let result = runtime.block_on(bridge::run(&socket));
    // The relay threads may sit in a blocking read; the process exit ends them.
    runtime.shutdown_background();
    result?;
    Ok(())
}

/// The role, or an error that lists the roles the file has.
fn find_role<'p>(
    p: &'p Policy,
    path: &std::path::Path,
    role: &str,
) -> anyhow::Result<&'p cordon::policy::Role> {
    p.role(role).ok_or_else(|| {
        anyhow::anyhow!(
            "no role {role:?} in {} (roles: {})",
            path.display(),
            p.roles()
                .map(|r| r.name.as_str())
                .collect::<Vec<_>>()
                .join(", ")
        )
    })
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
            find_role(&p, &policy, &role)?;
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
            let r = find_role(&p, &policy, &role)?;
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

fn audit_reader(config: &std::path::Path) -> anyhow::Result<cordon::store::AuditReader> {
    let config = config::Config::load(config)?;
    Ok(cordon::store::AuditReader::open(
        &config.gateway.store,
        config.map_size_bytes(),
    )?)
}

fn filter(
    f: Option<AuditFilters>,
    since: Option<String>,
    until: Option<String>,
) -> anyhow::Result<audit::query::Filter> {
    let f = f.unwrap_or(AuditFilters {
        agent: None,
        role: None,
        tool: None,
        decision: None,
        event: None,
    });
    Ok(audit::query::Filter {
        agent: f.agent,
        role: f.role,
        tool: f.tool,
        decision: f.decision,
        event: f.event,
        since: since
            .map(|s| audit::query::parse_time(&s))
            .transpose()
            .map_err(anyhow::Error::msg)?,
        until: until
            .map(|s| audit::query::parse_time(&s))
            .transpose()
            .map_err(anyhow::Error::msg)?,
    })
}

/// Visits matching records; a record that does not parse is an error naming
/// its seq (`verify` says more).
fn each_record(
    reader: &cordon::store::AuditReader,
    from: u64,
    filter: &audit::query::Filter,
    mut f: impl FnMut(&audit::Record, &[u8]),
) -> anyhow::Result<u64> {
    let mut bad = None;
    let last = reader.scan(from, |seq, raw| {
        match serde_json::from_slice::<audit::Record>(raw) {
            Ok(r) => {
                if filter.matches(&r) {
                    f(&r, raw);
                }
                true
            }
            Err(e) => {
                bad = Some(anyhow::anyhow!(
                    "audit record {seq} does not parse ({e}); run `cordon audit verify`"
                ));
                false
            }
        }
    })?;
    match bad {
        Some(e) => Err(e),
        None => Ok(last),
    }
}

fn write_records(
    config: &std::path::Path,
    filter: audit::query::Filter,
    format: AuditFormat,
) -> anyhow::Result<()> {
    use std::io::Write;
    let reader = audit_reader(config)?;
    let mut out = std::io::BufWriter::new(std::io::stdout().lock());
    if matches!(format, AuditFormat::Table) {
        writeln!(out, "{}", audit::query::TABLE_HEADER)?;
    }
    let mut failed = None;
    each_record(&reader, 1, &filter, |r, raw| {
        let res = match format {
            AuditFormat::Table => writeln!(out, "{}", audit::query::row(r)),
            AuditFormat::Jsonl => out.write_all(raw).and_then(|()| out.write_all(b"\n")),
        };
        if let Err(e) = res {
            failed.get_or_insert(e);
        }
    })?;
    if let Some(e) = failed {
        return Err(e.into());
    }
    out.flush()?;
    Ok(())
}

fn run_audit(command: AuditCommand) -> anyhow::Result<()> {
    use std::io::Write;
    let stdout = std::io::stdout();
    match command {
        AuditCommand::Tail {
            config,
            follow,
            lines,
            filters,
        } => {
            let reader = audit_reader(&config)?;
            let filter = filter(Some(filters), None, None)?;
            let mut recent = std::collections::VecDeque::with_capacity(lines + 1);
            let mut last = each_record(&reader, 1, &filter, |r, _| {
                recent.push_back(audit::query::row(r));
                if recent.len() > lines {
                    recent.pop_front();
                }
            })?;
            let mut out = stdout.lock();
            writeln!(out, "{}", audit::query::TABLE_HEADER)?;
            for line in recent {
                writeln!(out, "{line}")?;
            }
            out.flush()?;
            drop(out);
            if !follow {
                return Ok(());
            }
            loop {
                std::thread::sleep(audit::query::FOLLOW_EVERY);
                let mut out = stdout.lock();
                last = each_record(&reader, last + 1, &filter, |r, _| {
                    let _ = writeln!(out, "{}", audit::query::row(r));
                })?
                .max(last);
                out.flush()?;
            }
        }
        AuditCommand::Query {
            config,
            since,
            until,
            format,
            filters,
        } => write_records(&config, filter(Some(filters), since, until)?, format),
        // The stored canonical form, one record per line: what a SIEM ingests
        // and what tests/audit_verify.py checks.
        AuditCommand::Export {
            config,
            format: _,
            since,
            until,
        } => write_records(&config, filter(None, since, until)?, AuditFormat::Jsonl),
        AuditCommand::Verify { config } => {
            let reader = audit_reader(&config)?;
            let mut v = audit::Verifier::default();
            let mut broken = None;
            let mut first = None;
            reader.scan(1, |seq, raw| {
                first.get_or_insert(seq);
                match v.push(seq, raw) {
                    Ok(()) => true,
                    Err(b) => {
                        broken = Some(b);
                        false
                    }
                }
            })?;
            let head = v.head().map(str::to_string);
            let result = match broken {
                Some(b) => Err(b),
                None => v.finish(),
            };
            match result {
                Ok(n) => {
                    println!(
                        "ok: {n} records verified (seq {}..{}), chain head {}",
                        first.unwrap_or(0),
                        first.unwrap_or(1) + n.saturating_sub(1),
                        head.as_deref().unwrap_or(audit::GENESIS)
                    );
                    Ok(())
                }
                Err(b) => anyhow::bail!("audit chain broken at seq {}: {}", b.seq, b.reason),
            }
        }
        AuditCommand::Stats {
            config,
            since,
            until,
        } => {
            let reader = audit_reader(&config)?;
            let filter = filter(None, since, until)?;
            let mut stats = audit::query::Stats::default();
            each_record(&reader, 1, &filter, |r, _| stats.add(r))?;
            print!("{}", stats.render());
            Ok(())
        }
    }
}
