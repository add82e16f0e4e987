//! `samtrain local JOB.toml`: the whole cluster on this machine. A
//! coordinator runs in this process (embedded store, or etcd when given),
//! N workers run as child processes of this binary, the job is submitted,
//! and its progress is shown until it ends. A worker process that dies is
//! started again, as torchrun's agent does, within `restart.max_restarts`.
//! Run again on the same spec after an interruption, the job resumes from
//! the newest checkpoint at its `checkpoint.url`.

use std::fs::File;
use std::io::{IsTerminal, Write};
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use anyhow::{bail, Context, Result};
use clap::Args;
use samtrain_coordinator::auth::{AuthOptions, TokenSource};
use samtrain_coordinator::client::{Client, Credentials};
use samtrain_coordinator::{CoordinatorOptions, RunningCoordinator};
use samtrain_proto::spec::JobSpec;
use samtrain_proto::v1::{self, job_event::Event, JobState};
use samtrain_proto::Scores;
use serde_json::json;

use crate::{loss_plot, prepare};
use samtrain_coordinator::json::state_name;

#[derive(Args)]
pub struct LocalArgs {
    /// The job spec (TOML).
    pub job: PathBuf,
    #[command(flatten)]
    pub options: LocalOptions,
}

#[derive(Args, Clone)]
pub struct LocalOptions {
    /// Worker processes to start (default: the spec's parallel.max_workers).
    #[arg(long)]
    pub workers: Option<u32>,
    /// Keep job state in etcd at these endpoints instead of in memory.
    #[arg(long, value_delimiter = ',')]
    pub etcd: Vec<String>,
    /// Where the workers' logs and the loss curve go (default
    /// `samtrain-runs/<job name>`).
    #[arg(long)]
    pub run_dir: Option<PathBuf>,
    /// Print one JSON object, the job's final state, as the last line.
    #[arg(long)]
    pub json: bool,
    /// Serve the coordinator's dashboard (`/ui`), `/metrics` and health
    /// probes on this loopback address while the job runs (default: a free
    /// port; the addresses are printed).
    #[arg(long, alias = "metrics-listen", default_value = "127.0.0.1:0")]
    pub http_listen: SocketAddr,
}

/// How a local job ended.
pub struct LocalResult {
    pub job_id: String,
    pub state: JobState,
    pub step: u64,
    pub restarts: u32,
    pub worker_restarts: u32,
    pub checkpoint: Option<String>,
    pub eval: Option<Scores>,
    pub message: String,
    pub loss_curve: PathBuf,
    pub run_dir: PathBuf,
}

impl LocalResult {
    pub fn to_json(&self) -> serde_json::Value {
        json!({
            "job_id": self.job_id,
            "state": state_name(self.state as i32),
            "steps": self.step,
            "restarts": self.restarts,
            "worker_restarts": self.worker_restarts,
            "checkpoint": self.checkpoint,
            "eval": self.eval,
            "message": self.message,
            "loss_curve": self.loss_curve,
            "run_dir": self.run_dir,
        })
    }
}

pub fn run(args: LocalArgs) -> Result<()> {
    let text = std::fs::read_to_string(&args.job)
        .with_context(|| format!("cannot read {}", args.job.display()))?;
    let source = args.job.display().to_string();
    let spec = JobSpec::from_toml(&text, Some(&source))?;
    let result = run_job(&spec, &source, &args.options)?;
    report(&result, args.options.json);
    if result.state != JobState::Succeeded {
        return Err(super::Exit(1).into());
    }
    Ok(())
}

/// Prints the final state, human or JSON.
pub fn report(result: &LocalResult, json: bool) {
    if json {
        println!("{}", result.to_json());
        return;
    }
    println!(
        "job {}: {} after {} steps, {} restarts ({} worker processes restarted)",
        result.job_id,
        state_name(result.state as i32),
        result.step,
        result.restarts,
        result.worker_restarts
    );
    if !result.message.is_empty() {
        println!("  {}", result.message);
    }
    if let Some(c) = &result.checkpoint {
        println!("  checkpoint: {c}");
    }
    if let Some(scores) = &result.eval {
        println!("  eval: {}", scores.describe(2));
    }
    println!("  loss curve: {}", result.loss_curve.display());
    println!("  worker logs: {}", result.run_dir.display());
}

/// Runs `spec` on a local cluster to its end.
pub fn run_job(spec: &JobSpec, source: &str, options: &LocalOptions) -> Result<LocalResult> {
    prepare::prepare(spec)?;
    let run_dir = options
        .run_dir
        .clone()
        .unwrap_or_else(|| Path::new("samtrain-runs").join(&spec.name));
    std::fs::create_dir_all(&run_dir)
        .with_context(|| format!("cannot create {}", run_dir.display()))?;
    let runtime = tokio::runtime::Runtime::new().context("starting the async runtime")?;
    runtime.block_on(drive(spec, source, options, run_dir))
}

async fn drive(
    spec: &JobSpec,
    source: &str,
    options: &LocalOptions,
    run_dir: PathBuf,
) -> Result<LocalResult> {
    // Loopback only, and tokens made for this run: another user of the
    // machine cannot reach in. Workers get theirs in the environment (not
    // on their command line, which `ps` shows).
    let (auth, operator_token, worker_token) = AuthOptions::generated();
    // The metrics of a local run carry no token: loopback only.
    anyhow::ensure!(
        options.http_listen.ip().is_loopback(),
        "--http-listen {}: samtrain local serves its dashboard and metrics on a loopback address only",
        options.http_listen
    );
    let coordinator = samtrain_coordinator::run(CoordinatorOptions {
        listen: SocketAddr::from(([127, 0, 0, 1], 0)),
        health_listen: Some(options.http_listen),
        etcd: options.etcd.clone(),
        node_id: format!("local-{}", std::process::id()),
        auth,
        ..CoordinatorOptions::default()
    })
    .await
    .context("starting the coordinator")?;
    coordinator.until_leader().await;
    if let Some(addr) = coordinator.health_addr() {
        // The run's operator token logs the browser in (then leaves the
        // address bar): the page is this user's, as the job is. It rides in
        // the fragment, which the browser never sends.
        eprintln!("dashboard: http://{addr}/ui#token={operator_token}");
        eprintln!("metrics: http://{addr}/metrics");
    }
    let address = format!("http://{}", coordinator.addr());
    let mut client = Client::new(
        vec![address.clone()],
        Credentials::token(TokenSource::Literal(operator_token)),
    );
    let job_id = client
        .submit(&spec.to_toml(), source)
        .await
        .context("submitting the job")?;
    tracing::info!(job = %job_id, coordinator = %address, "job submitted");

    let workers = options.workers.unwrap_or(spec.parallel.max_workers);
    let mut pool = WorkerPool::start(
        &address,
        worker_token,
        workers,
        &run_dir,
        spec.restart.max_restarts,
    )?;
    let outcome = follow(&mut client, &job_id, spec, &mut pool).await;
    pool.stop(Duration::from_secs(20));
    let (job, losses) = outcome?;
    shutdown(coordinator).await;

    let loss_curve = run_dir.join("loss.svg");
    loss_plot::write_svg(
        &loss_curve,
        &format!("{} — training loss", spec.name),
        &losses,
    )?;
    Ok(LocalResult {
        job_id,
        state: job.state(),
        step: job.step,
        restarts: job.restarts,
        worker_restarts: pool.restarted,
        checkpoint: job.latest_checkpoint.map(|c| c.url),
        eval: job.eval,
        message: job.message,
        loss_curve,
        run_dir,
    })
}

async fn shutdown(coordinator: RunningCoordinator) {
    if let Err(e) = coordinator.shutdown().await {
        tracing::warn!(error = %e, "coordinator shutdown");
    }
}

/// Watches the job to its end, restarting dead workers meanwhile; the final
/// job and the loss curve (step, loss).
async fn follow(
    client: &mut Client,
    job_id: &str,
    spec: &JobSpec,
    pool: &mut WorkerPool,
) -> Result<(v1::Job, Vec<(u64, f64)>)> {
    let mut bar = ProgressBar::new(spec.training.steps);
    let mut losses: Vec<(u64, f64)> = Vec::new();
    let mut tick = tokio::time::interval(Duration::from_millis(250));
    let mut stream = None;
    loop {
        if stream.is_none() {
            stream = Some(client.watch(job_id).await.context("watching the job")?);
        }
        let events = stream.as_mut().expect("opened above");
        tokio::select! {
            message = events.message() => match message {
                Ok(Some(event)) => match event.event {
                    Some(Event::Progress(p)) => {
                        if losses.last().is_none_or(|(s, _)| *s < p.step) {
                            losses.push((p.step, p.loss));
                        }
                        bar.update(&p);
                    }
                    Some(Event::StateChanged(s)) => {
                        bar.note(&format!("job {}: generation {}{}", state_name(s.state), s.generation, if s.message.is_empty() { String::new() } else { format!(" ({})", s.message) }));
                    }
                    Some(Event::Restarted(r)) if r.resize => {
                        bar.note(&format!("resize: generation {} ended: {}", r.ended_generation, r.reason));
                    }
                    Some(Event::Restarted(r)) => {
                        bar.note(&format!("restart {}: generation {} ended: {}", r.restarts, r.ended_generation, r.reason));
                    }
                    Some(Event::CheckpointCommitted(c)) => {
                        bar.note(&format!("checkpoint at step {}: {}", c.step, c.url));
                    }
                    Some(Event::CheckpointFailed(f)) => {
                        bar.note(&super::jobs::describe_failure(&f));
                    }
                    Some(e @ Event::Straggler(_)) => bar.note(&super::jobs::describe(&e)),
                    Some(Event::Finished(_)) => {
                        bar.finish();
                        let job = client.get(job_id).await.context("reading the finished job")?;
                        return Ok((job, losses));
                    }
                    Some(Event::Snapshot(job)) if is_final(job.state()) => {
                        bar.finish();
                        return Ok((job, losses));
                    }
                    Some(Event::Snapshot(_)) | None => {}
                },
                // The stream ended or broke: open it again (the snapshot
                // tells what was missed).
                Ok(None) | Err(_) => stream = None,
            },
            _ = tick.tick() => {
                for note in pool.supervise()? {
                    bar.note(&note);
                }
            }
        }
    }
}

fn is_final(state: JobState) -> bool {
    matches!(
        state,
        JobState::Succeeded | JobState::Failed | JobState::Cancelled
    )
}

/// The worker processes, restarted when they die.
struct WorkerPool {
    coordinator: String,
    /// The worker token of this run.
    token: String,
    run_dir: PathBuf,
    children: Vec<(String, Child)>,
    max_restarts: u32,
    restarted: u32,
    started: u32,
}

impl WorkerPool {
    fn start(
        coordinator: &str,
        token: String,
        n: u32,
        run_dir: &Path,
        max_restarts: u32,
    ) -> Result<WorkerPool> {
        if n == 0 {
            bail!("--workers must be at least 1");
        }
        let mut pool = WorkerPool {
            coordinator: coordinator.to_owned(),
            token,
            run_dir: run_dir.to_owned(),
            children: Vec::new(),
            max_restarts,
            restarted: 0,
            started: 0,
        };
        for _ in 0..n {
            pool.spawn()?;
        }
        Ok(pool)
    }

    fn spawn(&mut self) -> Result<()> {
        let name = format!("local-{}", self.started);
        self.started += 1;
        let log_path = self.run_dir.join(format!("{name}.log"));
        let log = File::create(&log_path)
            .with_context(|| format!("cannot create {}", log_path.display()))?;
        let exe = std::env::current_exe().context("finding the samtrain binary")?;
        let child = Command::new(exe)
            .args([
                "worker",
                "--coordinator",
                &self.coordinator,
                "--advertise",
                "127.0.0.1",
                "--collective-port",
                "0",
                "--name",
                &name,
                "--exit-when-idle",
            ])
            .env_remove("SAMTRAIN_HEALTH_LISTEN")
            .env_remove("SAMTRAIN_ETCD")
            .env_remove("SAMTRAIN_TOKEN_FILE")
            .env("SAMTRAIN_TOKEN", &self.token)
            // One rank per worker process: the pool is the supervisor.
            .env("SAMTRAIN_SLOTS", "1")
            .stdin(Stdio::null())
            .stdout(log.try_clone()?)
            .stderr(log)
            .spawn()
            .context("starting a worker process")?;
        tracing::info!(worker = %name, pid = child.id(), log = %log_path.display(), "worker started");
        self.children.push((name, child));
        Ok(())
    }

    /// Restarts workers that died (not those that exited cleanly, which
    /// only happens once no job needs them); notes for the user.
    fn supervise(&mut self) -> Result<Vec<String>> {
        let mut notes = Vec::new();
        let mut dead = 0;
        for (name, child) in &mut self.children {
            if let Some(status) = child.try_wait()? {
                if !status.success() {
                    notes.push(format!(
                        "worker {name} (pid {}) exited: {status}",
                        child.id()
                    ));
                    dead += 1;
                }
            }
        }
        self.children
            .retain_mut(|(_, c)| !matches!(c.try_wait(), Ok(Some(s)) if !s.success()));
        for _ in 0..dead {
            if self.restarted >= self.max_restarts {
                notes.push(format!(
                    "not restarting: {} worker restarts already (restart.max_restarts)",
                    self.restarted
                ));
                break;
            }
            self.restarted += 1;
            self.spawn()?;
            notes.push(format!(
                "started a replacement worker ({} of {} restarts)",
                self.restarted, self.max_restarts
            ));
        }
        Ok(notes)
    }

    /// Waits for the workers to leave (they exit once idle), then kills
    /// any still running.
    fn stop(&mut self, grace: Duration) {
        let deadline = Instant::now() + grace;
        for (name, child) in &mut self.children {
            loop {
                match child.try_wait() {
                    Ok(Some(_)) => break,
                    Ok(None) if Instant::now() < deadline => {
                        std::thread::sleep(Duration::from_millis(50))
                    }
                    _ => {
                        tracing::warn!(worker = %name, pid = child.id(), "worker still running; killing it");
                        let _ = child.kill();
                        let _ = child.wait();
                        break;
                    }
                }
            }
        }
    }
}

impl Drop for WorkerPool {
    fn drop(&mut self) {
        for (_, child) in &mut self.children {
            if matches!(child.try_wait(), Ok(None)) {
                let _ = child.kill();
                let _ = child.wait();
            }
        }
    }
}

/// One line of progress on a terminal (redrawn in place), or a line per
/// report otherwise.
struct ProgressBar {
    total: u64,
    tty: bool,
    started: Instant,
    first: Option<(Instant, u64)>,
    drawn: bool,
}

impl ProgressBar {
    fn new(total: u64) -> Self {
        ProgressBar {
            total: total.max(1),
            tty: std::io::stderr().is_terminal(),
            started: Instant::now(),
            first: None,
            drawn: false,
        }
    }

    fn update(&mut self, p: &v1::Progress) {
        let now = Instant::now();
        let (t0, s0) = *self.first.get_or_insert((now, p.step));
        let rate = if p.step > s0 {
            (p.step - s0) as f64 / now.duration_since(t0).as_secs_f64()
        } else {
            0.0
        };
        let eta = if rate > 0.0 {
            format_duration((self.total.saturating_sub(p.step)) as f64 / rate)
        } else {
            "?".to_owned()
        };
        let width = 30;
        let filled = ((p.step.min(self.total) * width) / self.total) as usize;
        let line = format!(
            "[{}{}] step {}/{}  loss {:.4}  {:.1} samples/s  ETA {}  ({} elapsed)",
            "#".repeat(filled),
            ".".repeat(width as usize - filled),
            p.step,
            self.total,
            p.loss,
            p.samples_per_s,
            eta,
            format_duration(self.started.elapsed().as_secs_f64())
        );
        let mut err = std::io::stderr().lock();
        if self.tty {
            let _ = write!(err, "\r\x1b[2K{line}");
            self.drawn = true;
        } else {
            let _ = writeln!(err, "{line}");
        }
        let _ = err.flush();
    }

    /// A message above the bar.
    fn note(&mut self, text: &str) {
        let mut err = std::io::stderr().lock();
        if self.drawn {
            let _ = write!(err, "\r\x1b[2K");
            self.drawn = false;
        }
        let _ = writeln!(err, "{text}");
    }

    fn finish(&mut self) {
        if self.drawn {
            let _ = writeln!(std::io::stderr());
            self.drawn = false;
        }
    }
}

fn format_duration(seconds: f64) -> String {
    let s = seconds.max(0.0).round() as u64;
    format!("{}:{:02}", s / 60, s % 60)
}
