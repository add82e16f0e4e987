//! A node's worker with several slots (`samtrain worker --slots N`): one
//! rank process per slot, each a `samtrain worker` of its own on its GPU
//! (`LOCAL_RANK`, as torchrun sets it: every GPU stays visible, so NCCL
//! reaches the others over NVLink), supervised here as torchrun supervises
//! `--nproc-per-node` ranks.
//!
//! The supervisor is the node's agent (`samtrain_coordinator::agent::
//! NodeAgent`): it registers the node and holds the one lease every rank
//! process's record lives under, and gives each slot its identity. Every
//! slot registers as a worker of this node (`--node`), so the rendezvous
//! places tensor-parallel groups across the node's slots and `min_workers`
//! / `max_workers` count ranks. A rank process that dies ends its
//! generation at once (the supervisor removes its record); the supervisor
//! starts it again (after 1 s, doubling to 30 s while it keeps dying), and
//! the fresh process joins the next generation, which resumes from the
//! newest checkpoint. A lost node lease ends the generation too (every
//! rank's record goes with it): the rank processes stop at once, and once
//! the node is registered again they start again under the new lease. A rank process that exits
//! cleanly (no job needs it, with `--exit-when-idle`) is not started
//! again. A node that dies takes every slot with it (its lease expires),
//! and so does this supervisor: its rank processes get SIGTERM when it
//! ends, however it ends. A slot that keeps dying (more than `MAX_RESTARTS`
//! times in `RESTART_WINDOW`) stops the supervisor with an error, so that
//! Kubernetes replaces the pod.

use std::collections::VecDeque;
use std::process::{Child, Command};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use std::net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr};

use anyhow::{bail, Context, Result};
use samtrain_coordinator::agent::{AgentOptions, NodeAgent};
use samtrain_coordinator::health;
use samtrain_coordinator::metrics::{merge_labelled, MetricsEndpoint, MetricsSource};

/// Restarts of one slot within `RESTART_WINDOW` before giving up.
const MAX_RESTARTS: usize = 10;
const RESTART_WINDOW: Duration = Duration::from_secs(300);
/// How long stopping waits for the rank processes before killing them.
const STOP_GRACE: Duration = Duration::from_secs(30);
/// How long removing a dead rank's record may hold up the supervision.
const REMOVE_TIMEOUT: Duration = Duration::from_secs(5);
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
    /// How the node's agent reaches the control plane (its name, node and
    /// coordinators; it advertises no collectives).
    pub agent: AgentOptions,
    /// The token scrapers present to `/metrics` (the slots', and so the
    /// node's); `None`: loopback scrapes only.
    pub metrics_token: Option<String>,
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
    /// Whether the record of its last process is gone (false after a
    /// death until the removal succeeds).
    removed: bool,
}

/// Runs the node's rank processes until they all leave (they exit 0 once
/// idle with `--exit-when-idle`) or a stop signal comes.
pub fn supervise(plan: &SlotPlan) -> Result<()> {
    plan.check()?;
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(1)
        .enable_all()
        .build()
        .context("starting the node agent's runtime")?;
    let agent = Arc::new(
        runtime
            .block_on(NodeAgent::register(plan.agent.clone(), plan.slots))
            .context("registering the node with the coordinator")?,
    );
    let keeper = runtime.spawn({
        let agent = agent.clone();
        async move { agent.keep().await }
    });
    let result = supervise_slots(plan, &runtime, &agent);
    keeper.abort();
    runtime.block_on(agent.release());
    result
}

/// Runs the rank processes for [`supervise`], the node registered.
fn supervise_slots(
    plan: &SlotPlan,
    runtime: &tokio::runtime::Runtime,
    agent: &NodeAgent,
) -> Result<()> {
    let args = rank_args(std::env::args().skip(1));
    let mut slots: Vec<Slot> = (0..plan.slots)
        .map(|index| Slot {
            index,
            child: None,
            deaths: VecDeque::new(),
            restart_at: None,
            backoff: FIRST_BACKOFF,
            removed: true,
        })
        .collect();
    let mut epoch = agent.epoch();
    // Slots stopped because the node's lease was lost, to start again.
    let mut held: Vec<u32> = Vec::new();
    for slot in &mut slots {
        slot.child = Some(start(plan, agent, slot.index, &args)?);
    }
    let stop = stop_flag(runtime)?;
    // Which slots have a live rank process, for `/readyz`.
    let live = Arc::new(Mutex::new(vec![true; plan.slots as usize]));
    let _health = match plan.health_listen {
        Some(listen) => Some(serve_health(runtime, plan, listen, live.clone())?),
        None => None,
    };
    loop {
        if stop.load(std::sync::atomic::Ordering::SeqCst) {
            tracing::info!("stopping the rank processes");
            stop_all(&mut slots);
            return Ok(());
        }
        let lost = agent.lease_lost();
        if lost || agent.epoch() != epoch {
            // The node's lease was lost, and every rank's record with it:
            // the leader hands their work to others, so they stop now and
            // start again under the new lease.
            if slots.iter().any(|s| s.child.is_some()) {
                tracing::warn!("the node's lease was lost; stopping its rank processes");
                held.extend(slots.iter().filter(|s| s.child.is_some()).map(|s| s.index));
                stop_all(&mut slots);
            }
            // Whatever they registered went with the lease.
            slots.iter_mut().for_each(|s| s.removed = true);
        }
        if lost {
            std::thread::sleep(Duration::from_millis(100));
            continue;
        }
        if agent.epoch() != epoch {
            epoch = agent.epoch();
            tracing::warn!("the node registered again; starting its rank processes again");
            for index in held.drain(..) {
                slots[index as usize].child = Some(start(plan, agent, index, &args)?);
            }
        }
        let mut running = 0;
        let mut given_up = None;
        let now = Instant::now();
        for slot in &mut slots {
            if slot.restart_at.is_some_and(|t| now >= t) {
                // Not before the dead process's record is gone: a removal
                // landing late would take the new one's.
                if !slot.removed {
                    slot.removed = remove_rank(runtime, agent, slot.index);
                }
                if slot.removed {
                    slot.restart_at = None;
                    slot.child = Some(start(plan, agent, slot.index, &args)?);
                } else {
                    slot.restart_at = Some(now + FIRST_BACKOFF);
                }
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
                    // Its generation ends now, not when its peers notice.
                    slot.removed = remove_rank(runtime, agent, slot.index);
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

/// Removes the record of slot `index`'s dead rank process, waiting at most
/// `REMOVE_TIMEOUT`; whether it is gone.
fn remove_rank(runtime: &tokio::runtime::Runtime, agent: &NodeAgent, index: u32) -> bool {
    let removed = runtime
        .block_on(async { tokio::time::timeout(REMOVE_TIMEOUT, agent.remove_rank(index)).await });
    match removed {
        Ok(Ok(())) => true,
        Ok(Err(e)) => {
            tracing::warn!(slot = index, error = %e, "could not remove the dead rank's record; trying again before it starts");
            false
        }
        Err(_) => {
            tracing::warn!(
                slot = index,
                "removing the dead rank's record timed out; trying again before it starts"
            );
            false
        }
    }
}

/// Starts slot `index`'s rank process under the node's lease.
fn start(plan: &SlotPlan, agent: &NodeAgent, index: u32, args: &[String]) -> Result<Child> {
    let exe = std::env::current_exe().context("finding the samtrain binary")?;
    let mut command = Command::new(exe);
    command
        .args(args)
        .envs(agent.membership(index).env())
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

/// The supervisor's probes on `listen` (served while the returned server
/// lives): alive while it runs, ready while every slot has a rank process;
/// and the node's `/metrics` (every slot's, when they serve on known
/// ports), so that one scrape target per pod sees all its ranks.
fn serve_health(
    runtime: &tokio::runtime::Runtime,
    plan: &SlotPlan,
    listen: std::net::SocketAddr,
    live: Arc<Mutex<Vec<bool>>>,
) -> Result<health::HealthServer> {
    let metrics = (listen.port() != 0).then(|| MetricsEndpoint {
        render: node_metrics(listen, plan.slots, plan.metrics_token.clone()),
        token: plan.metrics_token.clone(),
    });
    let ready: health::Readiness = Arc::new(move || {
        let live = live.lock().unwrap_or_else(|e| e.into_inner());
        match live.iter().position(|up| !up) {
            Some(slot) => Err(format!("the rank process of slot {slot} is not running")),
            None => Ok(()),
        }
    });
    let server = runtime
        .block_on(health::serve(
            listen,
            ready,
            health::Routes { metrics, ui: None },
        ))
        .with_context(|| format!("cannot serve health probes on {listen}"))?;
    tracing::info!(addr = %server.addr(), "supervisor's health probes served");
    Ok(server)
}

/// The node's `/metrics`: each slot's, fetched from its health port at the
/// scrape and labelled `slot`, with `samtrain_slot_up` saying which slots
/// answered (one that did not is left out).
fn node_metrics(listen: SocketAddr, slots: u32, token: Option<String>) -> MetricsSource {
    let ip = match listen.ip() {
        IpAddr::V4(ip) if ip.is_unspecified() => IpAddr::V4(Ipv4Addr::LOCALHOST),
        IpAddr::V6(ip) if ip.is_unspecified() => IpAddr::V6(Ipv6Addr::LOCALHOST),
        ip => ip,
    };
    Arc::new(move || {
        let token = token.clone();
        Box::pin(async move {
            let mut fetches = tokio::task::JoinSet::new();
            for slot in 0..slots {
                let token = token.clone();
                fetches.spawn(async move {
                    let addr = SlotPlan::port(listen.port(), slot + 1)
                        .map_err(|e| e.to_string())
                        .map(|port| SocketAddr::new(ip, port));
                    let text = match addr {
                        Ok(addr) => {
                            tokio::time::timeout(SCRAPE_TIMEOUT, scrape(addr, token.as_deref()))
                                .await
                                .unwrap_or_else(|_| Err("timed out".to_owned()))
                        }
                        Err(e) => Err(e),
                    };
                    (slot, text)
                });
            }
            let mut answers: Vec<(u32, Result<String, String>)> =
                fetches.join_all().await.into_iter().collect();
            answers.sort_by_key(|(slot, _)| *slot);
            let mut parts = Vec::new();
            for (slot, text) in answers {
                let up = match text {
                    Ok(text) => {
                        parts.push((slot.to_string(), text));
                        1
                    }
                    Err(e) => {
                        tracing::debug!(slot, error = %e, "slot's metrics not scraped");
                        0
                    }
                };
                parts.push((
                    slot.to_string(),
                    format!("# HELP samtrain_slot_up Whether the slot's rank process answered this scrape.\n# TYPE samtrain_slot_up gauge\nsamtrain_slot_up {up}\n"),
                ));
            }
            merge_labelled(&parts, "slot")
        })
    })
}

/// The most a node's scrape waits for one slot, and the most it reads.
const SCRAPE_TIMEOUT: Duration = Duration::from_secs(2);
const SCRAPE_LIMIT: u64 = 16 << 20;

/// GET `/metrics` from a slot's health port: the body of a 200 answer.
async fn scrape(addr: SocketAddr, token: Option<&str>) -> Result<String, String> {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let mut stream = tokio::net::TcpStream::connect(addr)
        .await
        .map_err(|e| format!("{addr}: {e}"))?;
    let auth = token
        .map(|t| format!("Authorization: Bearer {t}\r\n"))
        .unwrap_or_default();
    let request =
        format!("GET /metrics HTTP/1.1\r\nHost: {addr}\r\n{auth}Connection: close\r\n\r\n");
    stream
        .write_all(request.as_bytes())
        .await
        .map_err(|e| format!("{addr}: {e}"))?;
    let mut reply = Vec::new();
    stream
        .take(SCRAPE_LIMIT)
        .read_to_end(&mut reply)
        .await
        .map_err(|e| format!("{addr}: {e}"))?;
    let reply = String::from_utf8(reply).map_err(|_| format!("{addr}: not UTF-8"))?;
    let (head, body) = reply
        .split_once("\r\n\r\n")
        .ok_or_else(|| format!("{addr}: no HTTP answer"))?;
    if !head.starts_with("HTTP/1.1 200") {
        return Err(format!("{addr}: {}", head.lines().next().unwrap_or("")));
    }
    Ok(body.to_owned())
}

/// Set when SIGTERM or SIGINT arrives.
fn stop_flag(
    runtime: &tokio::runtime::Runtime,
) -> Result<std::sync::Arc<std::sync::atomic::AtomicBool>> {
    let flag = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(false));
    for signal in [libc::SIGTERM, libc::SIGINT] {
        let mut listener = {
            let _guard = runtime.enter();
            tokio::signal::unix::signal(tokio::signal::unix::SignalKind::from_raw(signal))
                .context("listening for stop signals")?
        };
        let flag = flag.clone();
        runtime.spawn(async move {
            listener.recv().await;
            flag.store(true, std::sync::atomic::Ordering::SeqCst);
        });
    }
    Ok(flag)
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
