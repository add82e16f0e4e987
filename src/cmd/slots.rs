//! A node's worker with several slots (`samtrain worker --slots N`): one
//! rank process per slot, each a `samtrain worker` of its own on its GPU
//! (`LOCAL_RANK`, as torchrun sets it: every GPU stays visible, so NCCL
//! reaches the others over NVLink), supervised here as torchrun supervises
//! `--nproc-per-node` ranks.
//!
//! Every slot registers as a worker of this node (`--node`), so the
//! rendezvous places tensor-parallel groups across the node's slots and
//! `min_workers` / `max_workers` count ranks. A rank process that dies ends
//! its generation (its subscription and lease end with it); this
//! supervisor starts it again (after 1 s, doubling to 30 s while it keeps
//! dying), and the fresh process joins the next generation, which resumes
//! from the newest checkpoint. A rank process that exits cleanly (no job
//! needs it, with `--exit-when-idle`) is not started again. A node that dies
//! takes every slot with it, and so does this supervisor: its rank
//! processes get SIGTERM when it ends, however it ends. A slot that keeps dying (more than
//! `MAX_RESTARTS` times in `RESTART_WINDOW`) stops the supervisor with an
//! error, so that Kubernetes replaces the pod.

use std::collections::VecDeque;
use std::process::{Child, Command};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use anyhow::{bail, Context, Result};
use samtrain_coordinator::health;

/// Restarts of one slot within `RESTART_WINDOW` before giving up.
const MAX_RESTARTS: usize = 10;
const RESTART_WINDOW: Duration = Duration::from_secs(300);
/// How long stopping waits for the rank processes before killing them.
const STOP_GRACE: Duration = Duration::from_secs(30);
/// The wait before starting a dead slot again, doubling up to the most.
const FIRST_BACKOFF: Duration = Duration::from_secs(1);
const MAX_BACKOFF: Duration = Duration::from_secs(30);

/// The flags each rank process gets from its slot instead of from the
/// command line (they are given to it through the environment).
const PER_SLOT_FLAGS: [&str; 5] = [
    "--slots",
    "--name",
    "--node",
    "--collective-port",
    "--health-listen",
];

/// What the supervisor needs to start one slot's rank process.
pub struct SlotPlan {
    pub slots: u32,
    /// The readable name; slot `s` is `<name>-slot<s>`.
    pub name: String,
    pub node: String,
    /// 0: each slot binds an ephemeral port; else slot `s` uses `port + s`.
    pub collective_port: u16,
    /// The supervisor's probes (`/healthz` while it runs, `/readyz` while
    /// every slot's process runs); slot `s` serves its own probes and
    /// metrics on this port + 1 + `s` (port 0: each an ephemeral one).
    pub health_listen: Option<std::net::SocketAddr>,
    /// Whether rank processes leave once no job needs them (and are then
    /// not started again).
    pub exit_when_idle: bool,
}

impl SlotPlan {
    /// Slot `index`'s port from `base`: `base + index`, or 0 for 0.
    fn port(base: u16, index: u32) -> Result<u16> {
        if base == 0 {
            return Ok(0);
        }
        u16::try_from(index)
            .ok()
            .and_then(|i| base.checked_add(i))
            .with_context(|| format!("port {base} + slot {index} is past 65535"))
    }

    /// Checks every slot's ports before any process starts.
    fn check(&self) -> Result<()> {
        let last = self.slots.saturating_sub(1);
        SlotPlan::port(self.collective_port, last).context("--collective-port")?;
        if let Some(health) = self.health_listen {
            SlotPlan::port(health.port(), last + 1).context("--health-listen")?;
        }
        Ok(())
    }
}

struct Slot {
    index: u32,
    child: Option<Child>,
    deaths: VecDeque<Instant>,
    /// When a dead slot starts again.
    restart_at: Option<Instant>,
    backoff: Duration,
}

/// Runs the node's rank processes until they all leave (they exit 0 once
/// idle with `--exit-when-idle`) or a stop signal comes.
pub fn supervise(plan: &SlotPlan) -> Result<()> {
    plan.check()?;
    let args = rank_args(std::env::args().skip(1));
    let mut slots: Vec<Slot> = (0..plan.slots)
        .map(|index| Slot {
            index,
            child: None,
            deaths: VecDeque::new(),
            restart_at: None,
            backoff: FIRST_BACKOFF,
        })
        .collect();
    for slot in &mut slots {
        slot.child = Some(start(plan, slot.index, &args)?);
    }
    let stop = stop_flag()?;
    // Which slots have a live rank process, for `/readyz`.
    let live = Arc::new(Mutex::new(vec![true; plan.slots as usize]));
    let _health = match plan.health_listen {
        Some(listen) => Some(serve_health(listen, live.clone())?),
        None => None,
    };
    loop {
        if stop.load(std::sync::atomic::Ordering::SeqCst) {
            tracing::info!("stopping the rank processes");
            stop_all(&mut slots);
            return Ok(());
        }
        let mut running = 0;
        let mut given_up = None;
        let now = Instant::now();
        for slot in &mut slots {
            if slot.restart_at.is_some_and(|t| now >= t) {
                slot.restart_at = None;
                slot.child = Some(start(plan, slot.index, &args)?);
            }
            if slot.restart_at.is_some() {
                running += 1;
                continue;
            }
            let Some(child) = slot.child.as_mut() else {
                continue;
            };
            match child.try_wait().context("watching a rank process")? {
                None => {
                    running += 1;
                    // Alive for a while: the next death waits briefly again.
                    if slot
                        .deaths
                        .back()
                        .is_some_and(|t| now.duration_since(*t) > MAX_BACKOFF)
                    {
                        slot.backoff = FIRST_BACKOFF;
                    }
                }
                Some(status) if status.success() && plan.exit_when_idle => {
                    tracing::info!(slot = slot.index, "rank process left (no job needs it)");
                    slot.child = None;
                }
                Some(status) => {
                    tracing::warn!(slot = slot.index, pid = child.id(), %status, backoff = ?slot.backoff, "rank process died; starting it again");
                    slot.child = None;
                    slot.deaths.push_back(now);
                    while slot
                        .deaths
                        .front()
                        .is_some_and(|t| now.duration_since(*t) > RESTART_WINDOW)
                    {
                        slot.deaths.pop_front();
                    }
                    if slot.deaths.len() > MAX_RESTARTS {
                        given_up = Some(slot.index);
                        break;
                    }
                    slot.restart_at = Some(now + slot.backoff);
                    slot.backoff = (slot.backoff * 2).min(MAX_BACKOFF);
                    running += 1;
                }
            }
        }
        {
            let mut live = live.lock().unwrap_or_else(|e| e.into_inner());
            for slot in &slots {
                live[slot.index as usize] = slot.child.is_some();
            }
        }
        if let Some(index) = given_up {
            stop_all(&mut slots);
            bail!(
                "slot {index} died {} times in {RESTART_WINDOW:?}; giving up on this node",
                MAX_RESTARTS + 1
            );
        }
        if running == 0 {
            return Ok(());
        }
        std::thread::sleep(Duration::from_millis(100));
    }
}

/// Starts slot `index`'s rank process.
fn start(plan: &SlotPlan, index: u32, args: &[String]) -> Result<Child> {
    let exe = std::env::current_exe().context("finding the samtrain binary")?;
    let mut command = Command::new(exe);
    command
        .args(args)
        .env("SAMTRAIN_SLOTS", "1")
        .env("SAMTRAIN_NAME", format!("{}-slot{index}", plan.name))
        .env("SAMTRAIN_NODE", &plan.node)
        .env(
            "SAMTRAIN_COLLECTIVE_PORT",
            SlotPlan::port(plan.collective_port, index)?.to_string(),
        )
        // Its GPU, as torchrun tells a rank (every GPU stays visible).
        .env("LOCAL_RANK", index.to_string());
    match plan.health_listen {
        Some(addr) => {
            let port = SlotPlan::port(addr.port(), index + 1)?;
            let addr = std::net::SocketAddr::new(addr.ip(), port);
            command.env("SAMTRAIN_HEALTH_LISTEN", addr.to_string());
        }
        None => {
            command.env_remove("SAMTRAIN_HEALTH_LISTEN");
        }
    }
    // A rank process never outlives its node's supervisor, however that
    // ends (even SIGKILL): the kernel sends it SIGTERM, and it leaves.
    let supervisor = std::process::id() as libc::pid_t;
    // SAFETY: between fork and exec only async-signal-safe calls (prctl,
    // getppid) run.
    unsafe {
        use std::os::unix::process::CommandExt;
        command.pre_exec(move || {
            if libc::prctl(libc::PR_SET_PDEATHSIG, libc::SIGTERM) != 0 {
                return Err(std::io::Error::last_os_error());
            }
            // The supervisor died before the request took hold.
            if libc::getppid() != supervisor {
                return Err(std::io::Error::from_raw_os_error(libc::ESRCH));
            }
            Ok(())
        });
    }
    let child = command
        .spawn()
        .with_context(|| format!("starting the rank process of slot {index}"))?;
    tracing::info!(slot = index, pid = child.id(), node = %plan.node, "rank process started");
    Ok(child)
}

/// This process's arguments without the per-slot flags (and their values).
fn rank_args(args: impl Iterator<Item = String>) -> Vec<String> {
    let mut kept = Vec::new();
    let mut skip_value = false;
    for arg in args {
        if skip_value {
            skip_value = false;
            continue;
        }
        if let Some(flag) = PER_SLOT_FLAGS
            .iter()
            .find(|f| arg == **f || arg.starts_with(&format!("{f}=")))
        {
            skip_value = arg == *flag;
            continue;
        }
        kept.push(arg);
    }
    kept
}

/// Tells every rank process to stop (SIGTERM), then kills those still
/// running after `STOP_GRACE`.
fn stop_all(slots: &mut [Slot]) {
    for child in slots.iter().filter_map(|s| s.child.as_ref()) {
        // SAFETY: kill(2) on a child this process started and has not
        // reaped.
        unsafe {
            libc::kill(child.id() as libc::pid_t, libc::SIGTERM);
        }
    }
    let deadline = Instant::now() + STOP_GRACE;
    for slot in slots.iter_mut() {
        let Some(child) = slot.child.as_mut() else {
            continue;
        };
        while matches!(child.try_wait(), Ok(None)) && Instant::now() < deadline {
            std::thread::sleep(Duration::from_millis(50));
        }
        if matches!(child.try_wait(), Ok(None)) {
            tracing::warn!(
                slot = slot.index,
                pid = child.id(),
                "rank process still running; killing it"
            );
            let _ = child.kill();
        }
        let _ = child.wait();
        slot.child = None;
    }
}

/// The supervisor's probes on `listen`, served by a runtime of their own
/// (kept while the returned guard lives): alive while it runs, ready while
/// every slot has a rank process.
fn serve_health(
    listen: std::net::SocketAddr,
    live: Arc<Mutex<Vec<bool>>>,
) -> Result<(health::HealthServer, tokio::runtime::Runtime)> {
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(1)
        .enable_all()
        .build()
        .context("starting the health server's runtime")?;
    let ready: health::Readiness = Arc::new(move || {
        let live = live.lock().unwrap_or_else(|e| e.into_inner());
        match live.iter().position(|up| !up) {
            Some(slot) => Err(format!("the rank process of slot {slot} is not running")),
            None => Ok(()),
        }
    });
    let server = runtime
        .block_on(health::serve(listen, ready, health::Routes::default()))
        .with_context(|| format!("cannot serve health probes on {listen}"))?;
    tracing::info!(addr = %server.addr(), "supervisor's health probes served");
    // The server before its runtime, when dropped.
    Ok((server, runtime))
}

/// Set when SIGTERM or SIGINT arrives.
fn stop_flag() -> Result<std::sync::Arc<std::sync::atomic::AtomicBool>> {
    let flag = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(false));
    for signal in [libc::SIGTERM, libc::SIGINT] {
        signal_hook_register(signal, flag.clone())?;
    }
    Ok(flag)
}

/// Sets `flag` when `signal` arrives (a tokio signal listener on a small
/// runtime of its own, so this loop stays plain).
fn signal_hook_register(
    signal: libc::c_int,
    flag: std::sync::Arc<std::sync::atomic::AtomicBool>,
) -> Result<()> {
    let runtime = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .context("starting the signal listener")?;
    let mut listener = {
        let _guard = runtime.enter();
        tokio::signal::unix::signal(tokio::signal::unix::SignalKind::from_raw(signal))
            .context("listening for stop signals")?
    };
    std::thread::Builder::new()
        .name("slot-signals".into())
        .spawn(move || {
            runtime.block_on(listener.recv());
            flag.store(true, std::sync::atomic::Ordering::SeqCst);
        })
        .context("starting the signal listener")?;
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn per_slot_flags_are_taken_out_of_the_rank_processes_arguments() {
        let args = [
            "worker",
            "--slots",
            "2",
            "--coordinator",
            "http://c:7070",
            "--name=n",
            "--node",
            "a",
            "--collective-port",
            "29500",
            "--health-listen=0.0.0.0:7072",
            "--device",
            "cpu",
        ]
        .map(String::from);
        assert_eq!(
            rank_args(args.into_iter()),
            [
                "worker",
                "--coordinator",
                "http://c:7070",
                "--device",
                "cpu"
            ]
        );
    }
}
