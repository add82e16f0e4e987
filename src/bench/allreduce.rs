//! `samtrain bench allreduce`: all-reduce bandwidth of the collective
//! backends between real local processes, in the method of nccl-tests and
//! in the output format of `benches/allreduce_gloo.py`, which measures
//! PyTorch's Gloo the same way (docs/PERFORMANCE.md): both time an in-place
//! all-reduce (`Collective::all_reduce_sum_` here) of a buffer refilled with
//! the input, untimed, before each call.
//!
//! The command re-executes this binary once per rank with a hidden
//! `--worker-rank`. Each worker binds a listener on 127.0.0.1 port 0 and
//! prints `ADDR host:port` (rank 0 of the NCCL backend also prints `NCCLID
//! hex`); the parent sends every worker the `PEERS` line (and the id), the
//! workers check the sum, time it, and rank 0 prints one `RESULT {json}`
//! line per size, which the parent relays.

use std::io::{BufRead, BufReader, Write};
use std::net::TcpListener;
use std::process::{Child, Command, Stdio};
use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::{bail, ensure, Context, Result};
use clap::{Args, ValueEnum};
use samtrain_collective::{Abort, GroupOptions, ProcessGroups, Secret};
use samtrain_comm::Collective;
use tch::{Device, Kind, Tensor};

#[derive(Clone, Copy, Debug, PartialEq, Eq, ValueEnum)]
pub enum Backend {
    /// The ring on CPU tensors: shared memory between ranks on one host
    /// (as here), TCP otherwise.
    Ring,
    /// The ring over TCP even between ranks on one host.
    RingTcp,
    /// NCCL on CUDA tensors, one GPU per rank (needs `--features nccl`).
    Nccl,
}

impl Backend {
    fn name(self) -> &'static str {
        match self {
            Backend::Ring => "ring",
            Backend::RingTcp => "ring-tcp",
            Backend::Nccl => "nccl",
        }
    }
}

#[derive(Args, Clone)]
pub struct AllreduceArgs {
    /// Local processes, one rank each.
    #[arg(long, default_value_t = 2)]
    ranks: usize,
    /// Tensor sizes in bytes of f32, comma-separated: 4096, 1MiB, 64MiB, 1GB.
    #[arg(long, value_delimiter = ',', default_value = "1MiB,64MiB")]
    bytes: Vec<String>,
    #[arg(long, value_enum, default_value_t = Backend::Ring)]
    backend: Backend,
    /// Timed all-reduces per size (the median is reported).
    #[arg(long, default_value_t = 10)]
    iters: usize,
    /// Untimed all-reduces per size first.
    #[arg(long, default_value_t = 3)]
    warmup: usize,
    /// libtorch's intra-op threads in each rank.
    #[arg(long, default_value_t = 1)]
    threads: i32,
    /// One JSON object per size on stdout instead of a table.
    #[arg(long)]
    json: bool,
    /// Internal: run as this rank of a benchmark started by the parent.
    #[arg(long, hide = true)]
    worker_rank: Option<usize>,
}

/// Parses `64MiB`, `1KiB`, `1GB`, `4096`.
fn parse_size(text: &str) -> Result<usize> {
    let t = text.trim();
    let split = t.find(|c: char| !c.is_ascii_digit()).unwrap_or(t.len());
    let (num, unit) = t.split_at(split);
    let n: usize = num
        .parse()
        .with_context(|| format!("size {text:?}: no number"))?;
    let scale = match unit.trim().to_ascii_lowercase().as_str() {
        "" | "b" => 1,
        "kib" => 1 << 10,
        "mib" => 1 << 20,
        "gib" => 1 << 30,
        "kb" => 1_000,
        "mb" => 1_000_000,
        "gb" => 1_000_000_000,
        other => bail!("size {text:?}: unknown unit {other:?} (B, KiB, MiB, GiB, KB, MB, GB)"),
    };
    let bytes = n * scale;
    ensure!(
        bytes > 0 && bytes % 4 == 0,
        "size {text:?}: must be a positive multiple of 4 bytes (f32 elements)"
    );
    Ok(bytes)
}

pub fn run(args: AllreduceArgs) -> Result<()> {
    ensure!(args.ranks >= 1, "--ranks must be at least 1");
    ensure!(args.iters >= 1, "--iters must be at least 1");
    let sizes = args
        .bytes
        .iter()
        .map(|s| parse_size(s))
        .collect::<Result<Vec<_>>>()?;
    match args.worker_rank {
        Some(rank) => worker(&args, rank, &sizes),
        None => parent(&args, &sizes),
    }
}

/// Kills the workers if the parent leaves early.
struct Workers(Vec<Child>);

impl Drop for Workers {
    fn drop(&mut self) {
        for c in &mut self.0 {
            if matches!(c.try_wait(), Ok(None)) {
                let _ = c.kill();
                let _ = c.wait();
            }
        }
    }
}

fn parent(args: &AllreduceArgs, sizes: &[usize]) -> Result<()> {
    let exe = std::env::current_exe().context("locating the samtrain binary")?;
    let mut workers = Workers(Vec::new());
    for rank in 0..args.ranks {
        let child = Command::new(&exe)
            .args(["bench", "allreduce", "--worker-rank", &rank.to_string()])
            .args(["--ranks", &args.ranks.to_string()])
            .args(["--bytes", &args.bytes.join(",")])
            .args(["--backend", args.backend.name()])
            .args(["--iters", &args.iters.to_string()])
            .args(["--warmup", &args.warmup.to_string()])
            .args(["--threads", &args.threads.to_string()])
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .stderr(Stdio::inherit())
            .spawn()
            .with_context(|| format!("starting rank {rank} ({})", exe.display()))?;
        workers.0.push(child);
    }
    let mut outputs = Vec::new();
    let mut addrs = Vec::new();
    let mut nccl_id = None;
    for (rank, child) in workers.0.iter_mut().enumerate() {
        let mut lines = BufReader::new(child.stdout.take().expect("piped")).lines();
        let line = lines
            .next()
            .with_context(|| format!("rank {rank} exited before printing its address"))??;
        let addr = line
            .strip_prefix("ADDR ")
            .with_context(|| format!("rank {rank} printed {line:?}, not its address"))?;
        addrs.push(addr.to_string());
        if rank == 0 && args.backend == Backend::Nccl {
            let line = lines.next().context("rank 0 printed no NCCL id")??;
            nccl_id = Some(
                line.strip_prefix("NCCLID ")
                    .with_context(|| format!("rank 0 printed {line:?}, not an NCCL id"))?
                    .to_string(),
            );
        }
        outputs.push(lines);
    }
    for (rank, child) in workers.0.iter_mut().enumerate() {
        let stdin = child.stdin.as_mut().expect("piped");
        writeln!(stdin, "PEERS {}", addrs.join(","))
            .with_context(|| format!("writing to rank {rank}"))?;
        if let Some(id) = &nccl_id {
            writeln!(stdin, "NCCLID {id}")?;
        }
    }
    if !args.json {
        println!(
            "all-reduce sum of f32, {} backend, {} local processes, median of {} after {} warm-up",
            args.backend.name(),
            args.ranks,
            args.iters,
            args.warmup
        );
        println!(
            "{:>12} {:>12} {:>12} {:>12}",
            "bytes", "time_us", "algbw_gbps", "busbw_gbps"
        );
    }
    let mut results = 0;
    for line in outputs.remove(0) {
        let line = line.context("reading rank 0's results")?;
        let Some(json) = line.strip_prefix("RESULT ") else {
            continue;
        };
        results += 1;
        if args.json {
            println!("{json}");
        } else {
            let v: serde_json::Value = serde_json::from_str(json)?;
            println!(
                "{:>12} {:>12.1} {:>12.3} {:>12.3}",
                v["bytes"],
                v["time_us"].as_f64().unwrap_or(f64::NAN),
                v["algbw_gbps"].as_f64().unwrap_or(f64::NAN),
                v["busbw_gbps"].as_f64().unwrap_or(f64::NAN)
            );
        }
    }
    for (rank, child) in workers.0.iter_mut().enumerate() {
        let status = child.wait()?;
        ensure!(status.success(), "rank {rank} failed ({status})");
    }
    ensure!(
        results == sizes.len(),
        "rank 0 reported {results} of {} sizes",
        sizes.len()
    );
    Ok(())
}

fn read_tagged(stdin: &mut impl BufRead, tag: &str) -> Result<String> {
    let mut line = String::new();
    stdin.read_line(&mut line)?;
    line.trim()
        .strip_prefix(tag)
        .map(|s| s.trim().to_string())
        .with_context(|| format!("expected {tag} from the parent, got {line:?}"))
}

fn connect(args: &AllreduceArgs, rank: usize) -> Result<(Arc<dyn Collective>, Device)> {
    let listener = TcpListener::bind("127.0.0.1:0")?;
    println!("ADDR {}", listener.local_addr()?);
    #[cfg(feature = "nccl")]
    let id = if args.backend == Backend::Nccl && rank == 0 {
        let id = samtrain_collective::nccl::NcclId::new()?;
        let hex: String = id.as_bytes().iter().map(|b| format!("{b:02x}")).collect();
        println!("NCCLID {hex}");
        Some(id)
    } else {
        None
    };
    std::io::stdout().flush()?;
    let mut stdin = std::io::stdin().lock();
    let peers: Vec<String> = read_tagged(&mut stdin, "PEERS")?
        .split(',')
        .map(str::to_string)
        .collect();
    match args.backend {
        Backend::Ring | Backend::RingTcp => {
            let groups = ProcessGroups::connect(
                GroupOptions {
                    rank: rank as i64,
                    peers,
                    tp: 1,
                    generation: 1,
                    timeout: Duration::from_secs(60),
                    abort: Abort::new(),
                    secret: Secret::new(b"allreduce benchmark".to_vec()),
                    shared_memory: args.backend == Backend::Ring,
                },
                listener,
            )?;
            Ok((groups.world, Device::Cpu))
        }
        #[cfg(feature = "nccl")]
        Backend::Nccl => {
            use samtrain_collective::nccl::{NcclCollective, NcclId};
            let hex = read_tagged(&mut stdin, "NCCLID")?;
            let id = match id {
                Some(id) => id,
                None => {
                    let bytes = (0..hex.len())
                        .step_by(2)
                        .map(|i| u8::from_str_radix(&hex[i..i + 2], 16))
                        .collect::<Result<Vec<u8>, _>>()
                        .context("NCCL id is not hex")?;
                    NcclId::from_bytes(&bytes)?
                }
            };
            let gpus = samtrain_torchext::cuda::device_count();
            ensure!(gpus > 0, "the NCCL backend needs a CUDA device");
            let device = rank % gpus as usize;
            let comm = NcclCollective::new(rank as i64, args.ranks as i64, device, &id)?;
            Ok((Arc::new(comm), Device::Cuda(device)))
        }
        #[cfg(not(feature = "nccl"))]
        Backend::Nccl => bail!("this samtrain was built without the `nccl` feature"),
    }
}

fn worker(args: &AllreduceArgs, rank: usize, sizes: &[usize]) -> Result<()> {
    tch::set_num_threads(args.threads);
    let (comm, device) = connect(args, rank)?;
    let n = args.ranks as f64;
    let sync = || {
        if let Device::Cuda(d) = device {
            tch::Cuda::synchronize(d as i64);
        }
    };
    for &bytes in sizes {
        let numel = (bytes / 4) as i64;
        // Integers below 2^24 sum exactly in f32, so the check is exact.
        let base = Tensor::arange(numel, (Kind::Float, device)).remainder(1000.0);
        let x = &base * (rank as f64 + 1.0);
        let sum = comm.all_reduce_sum(&x)?;
        let expected = &base * (n * (n + 1.0) / 2.0);
        ensure!(
            sum.equal(&expected),
            "rank {rank}: the all-reduce of {bytes} bytes is not the sum"
        );
        // Timed in place, as Gloo's `all_reduce` is: the input is restored
        // into the same buffer before each call, untimed.
        let mut y = x.copy();
        comm.all_reduce_sum_(&mut y)?;
        ensure!(
            y.equal(&sum),
            "rank {rank}: the in-place all-reduce of {bytes} bytes differs from the allocating one"
        );
        let mut times = Vec::with_capacity(args.iters);
        for i in 0..args.warmup + args.iters {
            y.copy_(&x);
            sync();
            comm.barrier()?;
            let start = Instant::now();
            comm.all_reduce_sum_(&mut y)?;
            sync();
            let took = start.elapsed();
            if i >= args.warmup {
                times.push(took.as_secs_f64());
            }
        }
        let median = crate::bench::median(times.iter().copied());
        let algbw = bytes as f64 / median / 1e9;
        let busbw = algbw * 2.0 * (n - 1.0) / n;
        if rank == 0 {
            let out = serde_json::json!({
                "bytes": bytes,
                "time_us": median * 1e6,
                "algbw_gbps": algbw,
                "busbw_gbps": busbw,
                "ranks": args.ranks,
                "backend": args.backend.name(),
                "iters": args.iters,
            });
            println!("RESULT {out}");
            std::io::stdout().flush()?;
        }
    }
    comm.barrier()?;
    Ok(())
}
