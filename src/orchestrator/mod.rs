//! `cordon up`: runs a whole deployment. The gateway as its own child process
//! (`cordon gateway --managed`), then every agent through `cordon sandbox-exec`
//! in its profile; supervises them (restart with exponential backoff, a cap of
//! restarts in a window), reports them (control socket, status table, per-agent
//! event logs) and stops them in order (agents first, gateway last).
//!
//! One thread: the runtime is current-thread, so every child is forked by the
//! same long-lived thread (the helpers' parent-death signal is tied to the
//! thread that forked them) and the state below needs no locks. What the
//! children print is read and written elsewhere, by a thread per stream
//! (`logs`): an agent that floods its output delays neither the supervision
//! of the others nor `cordon status`, and its logs are bounded in size and
//! rate.

pub mod control;
pub mod events;
pub mod logs;
pub mod process;
pub mod script;
pub mod spec;
pub mod status;

use std::collections::VecDeque;
use std::io::Write;
use std::path::PathBuf;
use std::process::Stdio;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use rustix::process::Signal;
use serde_json::{json, Value};
use tokio::io::{AsyncBufReadExt, AsyncReadExt, BufReader};
use tokio::signal::unix::{signal, SignalKind};
use tokio::sync::{mpsc, oneshot};

use crate::config::{Config, RestartPolicy};
use crate::gateway::admin;
use crate::policy::Policy;
use events::Stats;
use spec::AgentSpec;

#[derive(Debug, thiserror::Error)]
pub enum OrchestratorError {
    #[error(transparent)]
    Policy(#[from] crate::policy::PolicyError),
    #[error("agent {agent}: {message}")]
    Agent { agent: String, message: String },
    #[error("cannot prepare {path}: {source}")]
    Prepare {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("cannot start agent {agent}: {source}")]
    Spawn {
        agent: String,
        source: std::io::Error,
    },
    #[error("cannot start the gateway: {message}")]
    Gateway { message: String },
    #[error("control socket {path}: {source}")]
    Control {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("cordon up is already running: {path} accepts connections")]
    AlreadyRunning { path: PathBuf },
    #[error("cannot install signal handler: {0}")]
    Signal(std::io::Error),
    #[error("the deployment defines no agents")]
    NoAgents,
}

/// What the main loop hears about.
pub enum Msg {
    Exited {
        idx: usize,
        run: u64,
        status: std::process::ExitStatus,
        /// Its cgroup's memory limit was reached.
        oom: bool,
    },
    /// A backoff elapsed: start the agent again (if still waiting for it).
    Due {
        idx: usize,
        run: u64,
    },
    /// The stop grace elapsed: SIGKILL what is left.
    KillDue {
        idx: usize,
        run: u64,
    },
    Control {
        req: Value,
        /// The requester's pid (SO_PEERCRED); `None`: unknown (refused).
        peer: Option<i32>,
        reply: oneshot::Sender<Value>,
    },
    GatewayExited {
        generation: u64,
        status: std::io::Result<std::process::ExitStatus>,
    },
    GatewayDue,
    /// The watchdog's ping was answered.
    GatewayAnswered {
        generation: u64,
    },
    /// A ping got no answer within the watchdog's interval (the watchdog
    /// keeps waiting for it up to its bound).
    GatewaySilent {
        generation: u64,
    },
    /// No ping answered for the watchdog's bound: kill and restart.
    GatewayUnresponsive {
        generation: u64,
        unanswered: Duration,
    },
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum State {
    Starting,
    Running,
    /// Waiting out a backoff before the next start.
    Backoff,
    Stopping,
    /// Stopped by an operator or at shutdown (final).
    Stopped,
    /// Exited and not restarted (final; `exit` tells how).
    Exited,
    /// Gave up: restart cap reached, or cannot be started (final).
    Failed,
}

impl State {
    fn name(self) -> &'static str {
        match self {
            State::Starting => "starting",
            State::Running => "running",
            State::Backoff => "backoff",
            State::Stopping => "stopping",
            State::Stopped => "stopped",
            State::Exited => "exited",
            State::Failed => "failed",
        }
    }

    fn is_final(self) -> bool {
        matches!(self, State::Stopped | State::Exited | State::Failed)
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum AfterExit {
    /// By the restart policy.
    Policy,
    Stop,
    Restart,
}

struct Agent {
    spec: AgentSpec,
    state: State,
    pid: Option<i32>,
    /// Bumped at every start and every cancelled wait, so stale timers and
    /// exits of an earlier run are recognised.
    run: u64,
    restarts: u32,
    /// Restarts made by the policy within the window.
    recent: VecDeque<Instant>,
    started: Option<Instant>,
    after_exit: AfterExit,
    /// How the last run ended: "exit 0", "exit 3", "signal 9".
    exit: Option<String>,
    succeeded: bool,
    stats: Arc<Mutex<Stats>>,
    /// The gateway was not told that this agent's last run ended.
    stale_root: bool,
    /// `stderr.log` and `events.jsonl`, shared by all its runs.
    stderr_log: Arc<logs::Sink>,
    events_log: Arc<logs::Sink>,
}

struct GatewayProc {
    pid: Option<i32>,
    generation: u64,
    restarts: u32,
    backoff: Duration,
    running: bool,
    /// Asks the running gateway to SIGKILL it (its wait task holds the
    /// child, so the signal can never reach a reused pid, and reaps it).
    kill: Option<oneshot::Sender<()>>,
    /// The running generation's watchdog task.
    watchdog: Option<tokio::task::JoinHandle<()>>,
    /// When the running gateway last answered (its ready line counts).
    last_answer: Option<Instant>,
    /// A ping of the running gateway is overdue.
    silent: bool,
    /// Pings answered, over every generation.
    answered: u64,
    /// Restarts the watchdog caused.
    watchdog_restarts: u32,
    /// The running generation was killed by the watchdog.
    killed_by_watchdog: bool,
    /// Why the next gateway starts, for its `gateway_start` audit record.
    next_start: Option<crate::gateway::Restart>,
}

/// Longest wait for the gateway's admin socket to answer.
const ADMIN_TIMEOUT: Duration = Duration::from_secs(10);
/// Longest wait for a starting gateway's ready line; then it is killed and
/// the start counts as failed (the restart backoff applies).
const READY_TIMEOUT: Duration = Duration::from_secs(30);
/// Longest line of an agent's output kept (an event is one line).
const MAX_AGENT_LINE: usize = 1024 * 1024;
/// How long an agent's exit waits for its output to be read to the end (a
/// process it left behind outside its group may hold the pipes open).
const DRAIN_TIMEOUT: Duration = Duration::from_secs(2);
/// Longest ready line read from the gateway.
const MAX_READY_LINE: u64 = 64 * 1024;
/// How long the gateway gets to stop, beyond its own shutdown grace.
const GATEWAY_STOP_SLACK: Duration = Duration::from_secs(10);

pub struct Options {
    /// The live status table on stderr (a terminal); otherwise log lines.
    pub live: bool,
}

struct Up {
    config: Arc<Config>,
    agents: Vec<Agent>,
    gateway: GatewayProc,
    /// `gateway.log`, shared by every gateway process of the deployment.
    gateway_log: Arc<logs::Sink>,
    tx: mpsc::UnboundedSender<Msg>,
    shutting_down: bool,
}

fn lock(stats: &Mutex<Stats>) -> std::sync::MutexGuard<'_, Stats> {
    // A poisoned lock means a panic mid-update of plain counters; they are
    // still counters.
    stats.lock().unwrap_or_else(|e| e.into_inner())
}

fn exit_text(status: &std::process::ExitStatus) -> (String, bool) {
    use std::os::unix::process::ExitStatusExt;
    match (status.code(), status.signal()) {
        (Some(c), _) => (format!("exit {c}"), c == 0),
        (None, Some(s)) => (format!("signal {s}"), false),
        _ => ("unknown".into(), false),
    }
}

/// Runs the deployment until every agent is final, or SIGINT/SIGTERM. Returns
/// whether every agent succeeded (exit status 0, or stopped by an operator).
pub async fn up(config: Config, options: Options) -> Result<bool, OrchestratorError> {
    if config.agents.is_empty() {
        return Err(OrchestratorError::NoAgents);
    }
    let policy = Policy::load_for(&config)?;
    let cordon = std::env::current_exe()
        .and_then(std::fs::canonicalize)
        .map_err(|source| OrchestratorError::Prepare {
            path: PathBuf::from("/proc/self/exe"),
            source,
        })?;
    let mut sigterm = signal(SignalKind::terminate()).map_err(OrchestratorError::Signal)?;
    let mut sigint = signal(SignalKind::interrupt()).map_err(OrchestratorError::Signal)?;
    // First, so a second `cordon up` of the same deployment stops here, before
    // it touches the running one's directories.
    std::fs::create_dir_all(&config.gateway.runtime_dir).map_err(|source| {
        OrchestratorError::Prepare {
            path: config.gateway.runtime_dir.clone(),
            source,
        }
    })?;
    let listener = control::bind(&config.up_socket())?;
    let specs = match spec::build_all(&config, &policy, &cordon) {
        Ok(s) => s,
        Err(e) => {
            let _ = std::fs::remove_file(config.up_socket());
            return Err(e);
        }
    };
    let config = Arc::new(config);
    let (tx, mut rx) = mpsc::unbounded_channel();
    let control_task = tokio::spawn(control::serve(listener, tx.clone()));

    let sink =
        |stream, owner: &str, path, style| logs::Sink::new(stream, owner, path, config.logs, style);
    let mut up = Up {
        config: config.clone(),
        agents: specs
            .into_iter()
            .map(|spec| Agent {
                stderr_log: Arc::new(sink(
                    "stderr",
                    &spec.name,
                    spec.stderr_path(),
                    logs::Style::Text,
                )),
                events_log: Arc::new(sink(
                    "stdout",
                    &spec.name,
                    spec.events_path(),
                    logs::Style::Json,
                )),
                spec,
                state: State::Starting,
                pid: None,
                run: 0,
                restarts: 0,
                recent: VecDeque::new(),
                started: None,
                after_exit: AfterExit::Policy,
                exit: None,
                succeeded: false,
                stats: Arc::new(Mutex::new(Stats::default())),
                stale_root: false,
            })
            .collect(),
        gateway: GatewayProc {
            pid: None,
            generation: 0,
            restarts: 0,
            backoff: Duration::from_millis(500),
            running: false,
            kill: None,
            watchdog: None,
            last_answer: None,
            silent: false,
            answered: 0,
            watchdog_restarts: 0,
            killed_by_watchdog: false,
            next_start: None,
        },
        gateway_log: Arc::new(
            sink(
                "stderr",
                "gateway",
                spec::up_dir(&config).join("gateway.log"),
                logs::Style::Text,
            )
            .unpaced(),
        ),
        tx: tx.clone(),
        shutting_down: false,
    };
    if let Err(e) = up.start_gateway().await {
        let _ = std::fs::remove_file(config.up_socket());
        return Err(e);
    }
    for idx in 0..up.agents.len() {
        up.start_agent(idx).await;
    }
    let mut tick = tokio::time::interval(Duration::from_secs(1));
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        if up.all_final() {
            break;
        }
        tokio::select! {
            Some(msg) = rx.recv() => up.handle(msg).await,
            _ = sigterm.recv() => up.shutdown("SIGTERM"),
            _ = sigint.recv() => up.shutdown("SIGINT"),
            _ = tick.tick(), if options.live => {
                let table = status::table(&up.status_json());
                eprint!("\x1b[H\x1b[2J{table}");
            }
        }
    }
    // Agents are all final: the gateway goes last.
    up.stop_gateway(&mut rx).await;
    control_task.abort();
    let _ = std::fs::remove_file(config.up_socket());
    let status = up.status_json();
    // Stopped (by an operator or a signal) counts as success; failed never does.
    let succeeded = up
        .agents
        .iter()
        .all(|a| a.state == State::Stopped || (a.state == State::Exited && a.succeeded));
    let mut out = std::io::stdout().lock();
    let _ = write!(out, "{}", status::table(&status));
    for a in &up.agents {
        let s = lock(&a.stats);
        if let Some(r) = &s.result {
            let _ = writeln!(out, "{}: {}", a.spec.name, r.trim());
        }
    }
    let (calls, denials): (u64, u64) = up.agents.iter().fold((0, 0), |(c, d), a| {
        let s = lock(&a.stats);
        (c + s.calls, d + s.denials)
    });
    let _ = writeln!(
        out,
        "{} agents, {calls} calls, {denials} denials; {}",
        up.agents.len(),
        if succeeded {
            "all succeeded"
        } else {
            "some failed"
        }
    );
    Ok(succeeded)
}

impl Up {
    fn all_final(&self) -> bool {
        self.agents.iter().all(|a| a.state.is_final())
    }

    async fn start_gateway(&mut self) -> Result<(), OrchestratorError> {
        let log_path = self.gateway_log.path().to_path_buf();
        let prepare = |source| OrchestratorError::Prepare {
            path: log_path.clone(),
            source,
        };
        let (log_read, log) = logs::pipe().map_err(prepare)?;
        let log_done = logs::spawn_raw("gateway-stderr".into(), self.gateway_log.clone(), log_read)
            .map_err(prepare)?;
        let mut cmd = std::process::Command::new("/proc/self/exe");
        cmd.arg("gateway")
            .arg("--config")
            .arg(&self.config.path)
            .arg("--managed");
        match &self.gateway.next_start {
            Some(crate::gateway::Restart::Watchdog {
                previous_pid,
                unanswered_ms,
            }) => {
                cmd.arg("--restart-reason=watchdog")
                    .arg(format!("--previous-pid={previous_pid}"))
                    .arg(format!("--unanswered-ms={unanswered_ms}"));
            }
            Some(crate::gateway::Restart::Exited {
                previous_pid,
                status,
            }) => {
                cmd.arg("--restart-reason=exited")
                    .arg(format!("--previous-status={status}"));
                if let Some(p) = previous_pid {
                    cmd.arg(format!("--previous-pid={p}"));
                }
            }
            None => {}
        }
        cmd.stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(Stdio::from(log));
        {
            use std::os::unix::process::CommandExt;
            // Its own process group: a Ctrl-C on the terminal reaches `cordon
            // up` alone, which stops the agents before the gateway.
            cmd.process_group(0);
            // SAFETY: runs between fork and exec; prctl(PR_SET_PDEATHSIG) is a
            // raw syscall that neither allocates nor locks. The gateway gets
            // SIGTERM (a clean shutdown) if `cordon up` dies without stopping it.
            unsafe {
                cmd.pre_exec(|| {
                    rustix::process::set_parent_process_death_signal(Some(Signal::TERM))
                        .map_err(std::io::Error::from)
                });
            }
        }
        // The command (and with it our copy of the log pipe's write end) is
        // dropped at once: the reader then ends when the gateway does.
        let mut child =
            tokio::process::Command::from(cmd)
                .spawn()
                .map_err(|e| OrchestratorError::Gateway {
                    message: e.to_string(),
                })?;
        let stdout = child.stdout.take();
        let mut line = String::new();
        let mut in_time = true;
        if let Some(stdout) = stdout {
            let mut reader = BufReader::new(stdout);
            // Bounded in time and size: a gateway that hangs before its ready
            // line must not freeze the supervisor (this runs in its loop).
            in_time = tokio::time::timeout(
                READY_TIMEOUT,
                (&mut reader).take(MAX_READY_LINE).read_line(&mut line),
            )
            .await
            .is_ok();
            // Keep draining (the gateway prints nothing more, but must never block).
            tokio::spawn(async move {
                let _ = tokio::io::copy(&mut reader, &mut tokio::io::sink()).await;
            });
        }
        let ready: Value = serde_json::from_str(&line).unwrap_or(Value::Null);
        if ready["ready"] != true {
            // Dead already, or hung: either way it is not ours to wait for.
            let _ = child.kill().await;
            // What it printed last is in the log once its reader is done.
            let _ = tokio::time::timeout(DRAIN_TIMEOUT, log_done).await;
            let log = std::fs::read_to_string(&log_path).unwrap_or_default();
            let tail: Vec<&str> = log.lines().rev().take(5).collect();
            let what = if in_time {
                "it exited before it was ready".to_string()
            } else {
                format!("it was not ready within {READY_TIMEOUT:?} and was killed")
            };
            return Err(OrchestratorError::Gateway {
                message: format!(
                    "{what}; {}:\n{}",
                    log_path.display(),
                    tail.into_iter().rev().collect::<Vec<_>>().join("\n")
                ),
            });
        }
        self.gateway.generation += 1;
        self.gateway.pid = child.id().and_then(|p| i32::try_from(p).ok());
        self.gateway.running = true;
        self.gateway.next_start = None;
        self.gateway.killed_by_watchdog = false;
        self.gateway.silent = false;
        self.gateway.last_answer = Some(Instant::now());
        tracing::info!(pid = self.gateway.pid, "gateway ready");
        let generation = self.gateway.generation;
        let tx = self.tx.clone();
        let (kill_tx, kill_rx) = oneshot::channel::<()>();
        self.gateway.kill = Some(kill_tx);
        tokio::spawn(async move {
            let status = tokio::select! {
                s = child.wait() => s,
                Ok(()) = kill_rx => {
                    // Not reaped yet (we hold the child), so neither its pid
                    // nor its group can have been reused. SIGKILL also ends
                    // a SIGSTOPped process; the group takes whatever it
                    // started along.
                    if let Some(pid) = child
                        .id()
                        .and_then(|p| i32::try_from(p).ok())
                        .and_then(rustix::process::Pid::from_raw)
                    {
                        let _ = rustix::process::kill_process_group(pid, Signal::KILL);
                    }
                    let _ = child.start_kill();
                    child.wait().await
                }
            };
            let _ = tx.send(Msg::GatewayExited { generation, status });
        });
        self.gateway.watchdog = self.spawn_watchdog(generation);
        // A restarted gateway learns the agents that are still running.
        for a in &self.agents {
            if let (Some(pid), State::Running | State::Stopping) = (a.pid, a.state) {
                if let Err(e) = self.register(&a.spec.name, Some(pid)).await {
                    tracing::error!(agent = %a.spec.name, error = %e, "cannot register the agent with the restarted gateway");
                }
            }
        }
        // Unregistrations that failed earlier, retried (a fresh gateway starts
        // with every agent not running, so this only confirms it).
        for idx in 0..self.agents.len() {
            let a = &self.agents[idx];
            if !a.stale_root || a.pid.is_some() {
                continue;
            }
            let name = a.spec.name.clone();
            match self.register(&name, None).await {
                Ok(()) => self.agents[idx].stale_root = false,
                Err(e) => {
                    tracing::error!(agent = %name, error = %e, "cannot unregister the agent's root process from the gateway")
                }
            }
        }
        Ok(())
    }

    /// Pings the gateway of `generation` every `watchdog_interval_ms` and
    /// tells the main loop what it heard. A task of its own: a hung gateway
    /// hangs this task's probe, never the supervisor. `None`: disabled.
    fn spawn_watchdog(&self, generation: u64) -> Option<tokio::task::JoinHandle<()>> {
        let g = &self.config.gateway;
        if g.watchdog_timeout_ms == 0 {
            return None;
        }
        let interval = Duration::from_millis(g.watchdog_interval_ms);
        let bound = Duration::from_millis(g.watchdog_timeout_ms);
        let path = self.config.admin_socket();
        let tx = self.tx.clone();
        Some(tokio::spawn(async move {
            let ping = |path: PathBuf| async move {
                admin::request(&path, &json!({"op": "ping"}))
                    .await
                    .is_ok_and(|a| a["ok"] == true)
            };
            let mut last = Instant::now();
            loop {
                tokio::time::sleep(interval).await;
                let probe = ping(path.clone());
                tokio::pin!(probe);
                // A slow answer within the bound still counts: only the
                // bound decides, the interval only says when to worry.
                let answered = match tokio::time::timeout(interval, &mut probe).await {
                    Ok(a) => a,
                    Err(_) => {
                        let _ = tx.send(Msg::GatewaySilent { generation });
                        let rest = bound.saturating_sub(last.elapsed());
                        tokio::time::timeout(rest, probe).await.unwrap_or(false)
                    }
                };
                if answered {
                    last = Instant::now();
                    if tx.send(Msg::GatewayAnswered { generation }).is_err() {
                        return;
                    }
                    continue;
                }
                let unanswered = last.elapsed();
                if unanswered >= bound {
                    let _ = tx.send(Msg::GatewayUnresponsive {
                        generation,
                        unanswered,
                    });
                    return;
                }
                if tx.send(Msg::GatewaySilent { generation }).is_err() {
                    return;
                }
            }
        }))
    }

    async fn register(&self, agent: &str, pid: Option<i32>) -> Result<(), String> {
        // Bounded: a hung gateway must not hang the supervisor.
        let answer = tokio::time::timeout(
            ADMIN_TIMEOUT,
            admin::request(
                &self.config.admin_socket(),
                &json!({"op": "agent_root", "agent": agent, "pid": pid}),
            ),
        )
        .await
        .map_err(|_| format!("no answer within {ADMIN_TIMEOUT:?}"))?
        .map_err(|e| e.to_string())?;
        if answer["ok"] == true {
            Ok(())
        } else {
            Err(answer["error"].as_str().unwrap_or("refused").to_string())
        }
    }

    async fn start_agent(&mut self, idx: usize) {
        let spec = self.agents[idx].spec.clone();
        self.agents[idx].run += 1;
        let run = self.agents[idx].run;
        self.agents[idx].state = State::Starting;
        self.agents[idx].after_exit = AfterExit::Policy;
        let started = self
            .start_readers(idx, run)
            .and_then(|(stdout, stderr, done)| {
                process::spawn(&spec, stdout, stderr).map(|p| (p, done))
            });
        let (pending, drained) = match started {
            Ok(p) => p,
            Err(e) => {
                tracing::error!(agent = %spec.name, error = %e, "cannot start agent");
                self.agents[idx].state = State::Failed;
                self.agents[idx].exit = Some("not started".into());
                return;
            }
        };
        let pid = pending.pid;
        // The gateway must know the root before the agent can connect: the
        // helper waits for its plan until then.
        // Unregistered, the agent could not reach its socket (or, with a stale
        // root, the wrong process could): the helper is not released, exits
        // on EOF, and its exit takes the usual failure and backoff path.
        let registered = match self.register(&spec.name, Some(pid)).await {
            Ok(()) => {
                self.agents[idx].stale_root = false;
                true
            }
            Err(e) => {
                tracing::error!(agent = %spec.name, error = %e, "cannot register the agent with the gateway; not starting it");
                false
            }
        };
        let mut child = if registered {
            match pending.release(&spec.plan) {
                Ok(c) => c,
                Err(e) => {
                    tracing::error!(agent = %spec.name, error = %e, "cannot start agent");
                    self.agents[idx].state = State::Failed;
                    return;
                }
            }
        } else {
            pending.abandon()
        };
        let a = &mut self.agents[idx];
        a.pid = Some(pid);
        if registered {
            a.state = State::Running;
            a.started = Some(Instant::now());
            tracing::info!(agent = %spec.name, role = %spec.role, pid, uid = spec.uid(), run, "agent started");
        }
        let tx = self.tx.clone();
        let plan = spec.plan.clone();
        tokio::spawn(async move {
            let status = child.wait().await;
            let oom = process::oom_killed(&plan);
            if oom {
                tracing::error!(agent = %plan.name, limit = plan.limits.memory, "the agent reached its memory limit; the kernel killed a process in its cgroup");
            }
            // What the agent left behind dies with it; then its stdout ends.
            process::cleanup(pid, &plan);
            let _ = tokio::time::timeout(DRAIN_TIMEOUT, drained).await;
            let status = match status {
                Ok(s) => s,
                Err(e) => {
                    tracing::error!(agent = %plan.name, error = %e, "cannot wait for agent");
                    std::os::unix::process::ExitStatusExt::from_raw(1 << 8)
                }
            };
            let _ = tx.send(Msg::Exited {
                idx,
                run,
                status,
                oom,
            });
        });
    }

    /// The pipes of a run of agent `idx` and the threads that read them
    /// (stdout into events, stderr into its log): the write ends for the
    /// child, and what is done once both are read to the end.
    fn start_readers(
        &self,
        idx: usize,
        run: u64,
    ) -> Result<
        (
            std::os::fd::OwnedFd,
            std::os::fd::OwnedFd,
            impl std::future::Future<Output = ()>,
        ),
        OrchestratorError,
    > {
        let a = &self.agents[idx];
        let name = a.spec.name.clone();
        let err = |source| OrchestratorError::Spawn {
            agent: name.clone(),
            source,
        };
        let (out_read, out_write) = logs::pipe().map_err(err)?;
        let (err_read, err_write) = logs::pipe().map_err(err)?;
        let err_done = logs::spawn_raw(format!("{name}-stderr"), a.stderr_log.clone(), err_read)
            .map_err(err)?;
        let (stats, sink, agent) = (a.stats.clone(), a.events_log.clone(), name.clone());
        let out_done = logs::spawn_lines(
            format!("{name}-stdout"),
            a.events_log.clone(),
            out_read,
            MAX_AGENT_LINE,
            move |lines| read_events(lines, &sink, &stats, &agent, run),
        )
        .map_err(err)?;
        Ok((out_write, err_write, async move {
            let _ = out_done.await;
            let _ = err_done.await;
        }))
    }

    async fn handle(&mut self, msg: Msg) {
        match msg {
            Msg::Exited {
                idx,
                run,
                status,
                oom,
            } => self.exited(idx, run, status, oom).await,
            Msg::Due { idx, run } => {
                let a = &self.agents[idx];
                if a.run == run && a.state == State::Backoff && !self.shutting_down {
                    self.start_agent(idx).await;
                }
            }
            Msg::KillDue { idx, run } => {
                let a = &self.agents[idx];
                if a.run == run && a.state == State::Stopping {
                    if let Some(pid) = a.pid {
                        tracing::warn!(agent = %a.spec.name, "stop grace over: SIGKILL");
                        process::signal_tree(pid, &a.spec.plan, Signal::KILL);
                    }
                }
            }
            Msg::Control { req, peer, reply } => {
                let answer = match self.agent_of(peer) {
                    Some(agent) => {
                        tracing::warn!(peer, agent = %agent, "control request refused: the peer is one of the agents' processes");
                        json!({"ok": false, "error": format!("refused: the peer is a process of agent {agent}, and agents do not control the deployment")})
                    }
                    None => self.control(&req).await,
                };
                let _ = reply.send(answer);
            }
            Msg::GatewayExited { generation, status } => {
                if generation != self.gateway.generation {
                    return;
                }
                let previous_pid = self.gateway.pid;
                self.gateway.running = false;
                self.gateway.pid = None;
                self.gateway.kill = None;
                self.gateway.silent = false;
                if let Some(w) = self.gateway.watchdog.take() {
                    w.abort();
                }
                if self.shutting_down {
                    return;
                }
                // A kill by the watchdog keeps its own reason; a start that
                // failed keeps the reason it was started for.
                let not_started = status.is_err() && self.gateway.next_start.is_some();
                if !self.gateway.killed_by_watchdog && !not_started {
                    let text = match &status {
                        Ok(s) => exit_text(s).0,
                        Err(e) => e.to_string(),
                    };
                    self.gateway.next_start = Some(crate::gateway::Restart::Exited {
                        previous_pid,
                        status: text,
                    });
                }
                self.gateway.killed_by_watchdog = false;
                tracing::error!(status = ?status.ok(), backoff = ?self.gateway.backoff, "gateway exited; restarting it");
                let tx = self.tx.clone();
                let delay = self.gateway.backoff;
                self.gateway.backoff = (delay * 2).min(Duration::from_secs(30));
                tokio::spawn(async move {
                    tokio::time::sleep(delay).await;
                    let _ = tx.send(Msg::GatewayDue);
                });
            }
            Msg::GatewayAnswered { generation } => {
                if generation == self.gateway.generation && self.gateway.running {
                    if self.gateway.silent {
                        tracing::warn!(
                            pid = self.gateway.pid,
                            "gateway answers its watchdog again"
                        );
                    }
                    self.gateway.silent = false;
                    self.gateway.last_answer = Some(Instant::now());
                    self.gateway.answered += 1;
                }
            }
            Msg::GatewaySilent { generation } => {
                if generation == self.gateway.generation
                    && self.gateway.running
                    && !self.gateway.silent
                {
                    self.gateway.silent = true;
                    tracing::warn!(
                        pid = self.gateway.pid,
                        unanswered = ?self.gateway.last_answer.map(|t| t.elapsed()),
                        bound_ms = self.config.gateway.watchdog_timeout_ms,
                        "gateway does not answer its watchdog"
                    );
                }
            }
            Msg::GatewayUnresponsive {
                generation,
                unanswered,
            } => {
                if generation != self.gateway.generation
                    || !self.gateway.running
                    || self.shutting_down
                {
                    return;
                }
                let Some(kill) = self.gateway.kill.take() else {
                    return;
                };
                let previous_pid = self.gateway.pid.unwrap_or(0);
                let unanswered_ms = u64::try_from(unanswered.as_millis()).unwrap_or(u64::MAX);
                tracing::error!(
                    pid = previous_pid,
                    unanswered_ms,
                    bound_ms = self.config.gateway.watchdog_timeout_ms,
                    "gateway has not answered its watchdog for {unanswered:?}: SIGKILL, then restart"
                );
                self.gateway.killed_by_watchdog = true;
                self.gateway.watchdog_restarts += 1;
                self.gateway.next_start = Some(crate::gateway::Restart::Watchdog {
                    previous_pid,
                    unanswered_ms,
                });
                // Its exit arrives as GatewayExited: the usual restart path.
                let _ = kill.send(());
            }
            Msg::GatewayDue => {
                if self.shutting_down || self.gateway.running {
                    return;
                }
                self.gateway.restarts += 1;
                match self.start_gateway().await {
                    Ok(()) => self.gateway.backoff = Duration::from_millis(500),
                    Err(e) => {
                        tracing::error!(error = %e, "gateway restart failed");
                        let _ = self.tx.send(Msg::GatewayExited {
                            generation: self.gateway.generation,
                            status: Err(std::io::Error::other("not started")),
                        });
                    }
                }
            }
        }
    }

    async fn exited(&mut self, idx: usize, run: u64, status: std::process::ExitStatus, oom: bool) {
        if self.agents[idx].run != run {
            return;
        }
        let name = self.agents[idx].spec.name.clone();
        // Until the gateway hears it, it still takes the old root (a pid that
        // may be reused) for this agent's: an error, retried at the gateway's
        // next (re)start.
        if let Err(e) = self.register(&name, None).await {
            tracing::error!(agent = %name, error = %e, "cannot unregister the agent's root process from the gateway; retrying when the gateway restarts");
            self.agents[idx].stale_root = true;
        }
        let (mut text, ok) = exit_text(&status);
        if oom {
            text.push_str(", out of memory");
        }
        let shutting_down = self.shutting_down;
        let a = &mut self.agents[idx];
        a.pid = None;
        a.started = None;
        a.exit = Some(text.clone());
        a.succeeded = ok;
        tracing::info!(agent = %name, status = %text, "agent exited");
        match a.after_exit {
            AfterExit::Stop => {
                a.state = State::Stopped;
                return;
            }
            AfterExit::Restart if !shutting_down => {
                a.restarts += 1;
                self.start_agent(idx).await;
                return;
            }
            _ => {}
        }
        if shutting_down {
            a.state = State::Stopped;
            return;
        }
        let restart = &a.spec.restart;
        let again = match restart.policy {
            RestartPolicy::Never => false,
            RestartPolicy::OnFailure => !ok,
            RestartPolicy::Always => true,
        };
        if !again {
            a.state = if ok { State::Exited } else { State::Failed };
            return;
        }
        let now = Instant::now();
        while a
            .recent
            .front()
            .is_some_and(|t| now.duration_since(*t) > restart.window)
        {
            a.recent.pop_front();
        }
        if a.recent.len() >= restart.max_restarts as usize {
            tracing::error!(agent = %name, restarts = a.recent.len(), window = ?restart.window, "restart cap reached; giving up");
            a.state = State::Failed;
            a.succeeded = false;
            return;
        }
        let exp = u32::try_from(a.recent.len()).unwrap_or(u32::MAX).min(16);
        let delay = restart
            .backoff
            .saturating_mul(1 << exp)
            .min(restart.max_backoff);
        a.recent.push_back(now);
        a.restarts += 1;
        a.state = State::Backoff;
        a.run += 1;
        let run = a.run;
        tracing::warn!(agent = %name, ?delay, restarts = a.restarts, "agent will be restarted");
        let tx = self.tx.clone();
        tokio::spawn(async move {
            tokio::time::sleep(delay).await;
            let _ = tx.send(Msg::Due { idx, run });
        });
    }

    /// SIGTERM to the agent's tree now, SIGKILL after its grace.
    fn stop_agent(&mut self, idx: usize, then: AfterExit) {
        let a = &mut self.agents[idx];
        match a.state {
            State::Running | State::Starting | State::Stopping => {
                a.after_exit = then;
                if a.state != State::Stopping {
                    a.state = State::Stopping;
                    if let Some(pid) = a.pid {
                        tracing::info!(agent = %a.spec.name, pid, "stopping agent (SIGTERM)");
                        process::signal_tree(pid, &a.spec.plan, Signal::TERM);
                    }
                    let (tx, run, grace) = (self.tx.clone(), a.run, a.spec.restart.grace);
                    tokio::spawn(async move {
                        tokio::time::sleep(grace).await;
                        let _ = tx.send(Msg::KillDue { idx, run });
                    });
                }
            }
            State::Backoff => {
                a.run += 1;
                a.state = State::Stopped;
            }
            _ => {}
        }
    }

    fn shutdown(&mut self, signal: &str) {
        if !self.shutting_down {
            tracing::info!(signal, "stopping every agent, then the gateway");
        }
        self.shutting_down = true;
        for idx in 0..self.agents.len() {
            self.stop_agent(idx, AfterExit::Stop);
        }
    }

    async fn stop_gateway(&mut self, rx: &mut mpsc::UnboundedReceiver<Msg>) {
        self.shutting_down = true;
        // A gateway slow to drain is not hung: the watchdog stops here.
        if let Some(w) = self.gateway.watchdog.take() {
            w.abort();
        }
        let Some(pid) = self.gateway.pid.and_then(rustix::process::Pid::from_raw) else {
            return;
        };
        let _ = rustix::process::kill_process(pid, Signal::TERM);
        let generation = self.gateway.generation;
        let grace =
            Duration::from_millis(self.config.gateway.shutdown_grace_ms) + GATEWAY_STOP_SLACK;
        let kill = tokio::time::sleep(grace);
        tokio::pin!(kill);
        let mut killed = false;
        loop {
            tokio::select! {
                msg = rx.recv() => match msg {
                    Some(Msg::GatewayExited { generation: g, .. }) if g == generation => break,
                    Some(Msg::Control { reply, .. }) => {
                        let _ = reply.send(json!({"ok": false, "error": "shutting down"}));
                    }
                    Some(_) => {}
                    None => break,
                },
                _ = &mut kill, if !killed => {
                    tracing::error!(?grace, "the gateway did not stop in time: SIGKILL");
                    let _ = rustix::process::kill_process(pid, Signal::KILL);
                    killed = true;
                }
            }
        }
        self.gateway.running = false;
        self.gateway.pid = None;
        tracing::info!("gateway stopped");
    }

    /// The agent whose process tree holds `peer` (the agent's name), or
    /// `None` when the peer is no agent's; an unknown peer counts as an agent
    /// (fail closed).
    fn agent_of(&self, peer: Option<i32>) -> Option<String> {
        let Some(peer) = peer else {
            return Some("(unknown: no peer pid)".into());
        };
        self.agents
            .iter()
            .find(|a| {
                a.pid
                    .is_some_and(|root| crate::gateway::roots::in_tree(peer, root))
            })
            .map(|a| a.spec.name.clone())
    }

    fn matching(&self, name: &str) -> Vec<usize> {
        (0..self.agents.len())
            .filter(|&i| {
                let s = &self.agents[i].spec;
                s.name == name || s.group.as_deref() == Some(name)
            })
            .collect()
    }

    async fn control(&mut self, req: &Value) -> Value {
        let op = req["op"].as_str().unwrap_or_default();
        if op == "status" {
            return self.status_json();
        }
        if !matches!(op, "start" | "stop" | "restart") {
            return json!({"ok": false, "error": format!("unknown op {op:?} (ops: status, start, stop, restart)")});
        }
        if self.shutting_down {
            return json!({"ok": false, "error": "shutting down"});
        }
        let name = req["agent"].as_str().unwrap_or_default();
        let idxs = self.matching(name);
        if idxs.is_empty() {
            let names: Vec<&str> = self.agents.iter().map(|a| a.spec.name.as_str()).collect();
            return json!({"ok": false, "error": format!("no agent {name:?} (agents: {})", names.join(", "))});
        }
        for &idx in &idxs {
            let state = self.agents[idx].state;
            match op {
                "stop" => self.stop_agent(idx, AfterExit::Stop),
                "restart" if matches!(state, State::Running | State::Starting) => {
                    self.stop_agent(idx, AfterExit::Restart)
                }
                "restart" | "start" if state.is_final() || state == State::Backoff => {
                    let a = &mut self.agents[idx];
                    a.recent.clear();
                    if op == "restart" {
                        a.restarts += 1;
                    }
                    self.start_agent(idx).await;
                }
                "start" => {
                    return json!({"ok": false, "error": format!("agent {} is {}", self.agents[idx].spec.name, state.name())})
                }
                _ => {}
            }
        }
        let names: Vec<&str> = idxs
            .iter()
            .map(|&i| self.agents[i].spec.name.as_str())
            .collect();
        json!({"ok": true, "agents": names})
    }

    fn status_json(&self) -> Value {
        use std::sync::atomic::Ordering::Relaxed;
        let agents: Vec<Value> = self
            .agents
            .iter()
            .map(|a| {
                let s = lock(&a.stats).clone();
                json!({
                    "name": a.spec.name,
                    "role": a.spec.role,
                    "uid": a.spec.uid(),
                    "pid": a.pid,
                    "state": a.state.name(),
                    "exit": a.exit,
                    "restarts": a.restarts,
                    "uptime_s": a.started.map(|t| t.elapsed().as_secs()),
                    "memory_bytes": a.pid.and_then(|p| process::memory(p, &a.spec.plan)),
                    "pids": a.pid.and_then(|p| process::pids(p, &a.spec.plan)),
                    "calls": s.calls,
                    "denials": s.denials,
                    "errors": s.errors,
                    "turns": s.turns,
                    "last_event": s.last_event,
                    "result": s.result,
                    "events": a.spec.events_path(),
                    "dropped_bytes": a.stderr_log.counters.dropped_bytes.load(Relaxed)
                        + a.events_log.counters.dropped_bytes.load(Relaxed),
                    "dropped_lines": a.stderr_log.counters.dropped_lines.load(Relaxed)
                        + a.events_log.counters.dropped_lines.load(Relaxed),
                    "logs": {"stderr": a.stderr_log.status(), "events": a.events_log.status()},
                })
            })
            .collect();
        json!({
            "ok": true,
            "agents": agents,
            "gateway": {
                "pid": self.gateway.pid,
                "state": match (self.gateway.running, self.gateway.silent) {
                    (true, false) => "running",
                    (true, true) => "unresponsive",
                    (false, _) => "down",
                },
                // Seconds since it last answered, while it does not answer.
                "unanswered_s": self.gateway.last_answer
                    .filter(|_| self.gateway.running && self.gateway.silent)
                    .map(|t| (t.elapsed().as_secs_f64() * 10.0).round() / 10.0),
                "restarts": self.gateway.restarts,
                "watchdog": {
                    "enabled": self.config.gateway.watchdog_timeout_ms > 0,
                    "interval_ms": self.config.gateway.watchdog_interval_ms,
                    "timeout_ms": self.config.gateway.watchdog_timeout_ms,
                    "answered": self.gateway.answered,
                    "restarts": self.gateway.watchdog_restarts,
                },
                "dropped_bytes": self.gateway_log.counters.dropped_bytes.load(Relaxed),
                "dropped_lines": self.gateway_log.counters.dropped_lines.load(Relaxed),
                "log": self.gateway_log.status(),
            },
        })
    }
}

/// Lines of cordon up's own log about an agent's events: at most this many
/// at once, then `TOLD_PER_SECOND` (the event log has them all).
const TOLD_BURST: f64 = 100.0;
const TOLD_PER_SECOND: f64 = 20.0;

struct Told {
    tokens: f64,
    last: Instant,
    skipped: u64,
}

impl Told {
    fn admit(&mut self, agent: &str) -> bool {
        let now = Instant::now();
        self.tokens = (self.tokens + now.duration_since(self.last).as_secs_f64() * TOLD_PER_SECOND)
            .min(TOLD_BURST);
        self.last = now;
        if self.tokens < 1.0 {
            self.skipped += 1;
            return false;
        }
        self.tokens -= 1.0;
        if self.skipped > 0 {
            tracing::info!(
                agent,
                skipped = std::mem::take(&mut self.skipped),
                "events not logged here (more than {TOLD_PER_SECOND}/s); the agent's events.jsonl keeps them"
            );
        }
        true
    }
}

/// Reads an agent's stdout as events into its `events.jsonl` (on the
/// stream's own thread). Nothing the agent prints decides anything but its
/// counters; while the log drops (past its rate), lines are not even parsed.
fn read_events(
    lines: &mut logs::LineReader,
    sink: &logs::Sink,
    stats: &Mutex<Stats>,
    name: &str,
    run: u64,
) {
    // cordon up's own log line per event, bounded apart from the event log:
    // a burst, then a few a second; what is left out is counted and said.
    let mut told = Told {
        tokens: TOLD_BURST,
        last: Instant::now(),
        skipped: 0,
    };
    let entry = |mut e: Value| {
        if let Some(o) = e.as_object_mut() {
            o.insert("agent".into(), json!(name));
            o.insert("run".into(), json!(run));
            o.insert("ts".into(), json!(crate::audit::now()));
        }
        e
    };
    loop {
        let line = match lines.next_line() {
            logs::Next::Eof => break,
            logs::Next::Line(l) => l,
            logs::Next::Overlong => {
                lock(stats).errors += 1;
                if told.admit(name) {
                    tracing::error!(agent = %name, max = MAX_AGENT_LINE, "agent output line too long; skipped");
                }
                let e = entry(
                    json!({"kind": "error", "text": format!("output line over {MAX_AGENT_LINE} bytes skipped")}),
                );
                sink.entry(0, format!("{e}\n").as_bytes());
                continue;
            }
        };
        let input = line.len() as u64 + 1;
        let line = line.strip_suffix(b"\r").unwrap_or(line);
        if line.iter().all(u8::is_ascii_whitespace) {
            // Nothing to keep, but it costs the bucket a token: a flood of
            // empty lines also ends in the bulk drop.
            sink.entry(input, b"");
            continue;
        }
        if sink.dropping() {
            sink.dropped(input, 1);
            continue;
        }
        let line = String::from_utf8_lossy(line);
        let parsed = serde_json::from_str::<Value>(&line).ok();
        let events = events::interpret(&line, parsed, &mut lock(stats));
        let events: Vec<Value> = events.into_iter().map(entry).collect();
        let mut out = Vec::new();
        for e in &events {
            out.extend_from_slice(e.to_string().as_bytes());
            out.push(b'\n');
        }
        if sink.entry(input, &out) {
            for e in events.iter().filter(|e| e["kind"] != "output") {
                if told.admit(name) {
                    tracing::info!(agent = %name, event = %e["kind"].as_str().unwrap_or(""), "{}", lock(stats).last_event);
                }
            }
        }
    }
}
