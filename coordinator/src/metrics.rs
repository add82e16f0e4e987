//! Prometheus metrics, served as OpenMetrics text at `/metrics` on the
//! health port: a coordinator's view of the cluster ([`ControlMetrics`]:
//! jobs by state, each unfinished job's generation, restarts and step,
//! workers) and a worker's training ([`WorkerMetrics`]: step, loss,
//! learning rate, gradient norm, throughput, step time split into compute
//! and communication, checkpoints, lease renewals).
//!
//! Series carry the job and the rank, never the generation: a label per
//! restart would grow without bound, so the generation is a value. A
//! worker keeps the series of its current job only; a coordinator those of
//! jobs not yet finished (finished ones count in `samtrain_jobs`).

use std::collections::HashSet;
use std::future::Future;
use std::pin::Pin;
use std::sync::atomic::AtomicU64;
use std::sync::{Arc, Mutex};

use prometheus_client::encoding::text::encode;
use prometheus_client::encoding::EncodeLabelSet;
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::metrics::histogram::{exponential_buckets, Histogram};
use prometheus_client::registry::Registry;

use crate::agent::{ObjectFetches, Progress, SaveTiming};
use crate::jobs::JobState;

/// Renders the metrics at the moment of a scrape.
pub type MetricsSource =
    Arc<dyn Fn() -> Pin<Box<dyn Future<Output = String> + Send>> + Send + Sync>;

/// `/metrics` of a health server: what it renders, and the bearer token a
/// scraper must present. Without a token it is served on a loopback
/// listener only (`samtrain local`, a laptop); elsewhere it answers 401.
#[derive(Clone)]
pub struct MetricsEndpoint {
    pub render: MetricsSource,
    pub token: Option<String>,
}

impl MetricsEndpoint {
    /// Whether `request` may scrape.
    pub(crate) fn admits(&self, request: &crate::health::Request) -> bool {
        use subtle::ConstantTimeEq;
        let Some(token) = &self.token else {
            return request.local.ip().is_loopback();
        };
        request
            .bearers()
            .any(|presented| bool::from(presented.as_bytes().ct_eq(token.as_bytes())))
    }
}

/// What `/metrics` answers with.
pub const CONTENT_TYPE: &str = "application/openmetrics-text; version=1.0.0; charset=utf-8";

type FloatGauge = Gauge<f64, AtomicU64>;

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct StateLabel {
    state: String,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct MethodLabel {
    method: String,
}

/// Distinct gRPC methods timed before the rest count as "other": a caller
/// may send any path, and each label is a series kept forever.
const MAX_METHODS: usize = 64;

fn latency_histogram() -> Histogram {
    // 0.5 ms to 8 s.
    Histogram::new(exponential_buckets(0.0005, 4.0, 8))
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct JobLabel {
    job: String,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct RankLabels {
    job: String,
    rank: u32,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct PhaseLabels {
    job: String,
    rank: u32,
    phase: String,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct OutcomeLabels {
    job: String,
    outcome: String,
}

fn text(registry: &Registry) -> String {
    let mut out = String::new();
    // Writing to a String cannot fail.
    let _ = encode(&mut out, registry);
    out
}

/// One job as the coordinator's metrics see it.
#[derive(Debug, Clone)]
pub(crate) struct JobSample {
    pub id: String,
    pub state: JobState,
    pub generation: u64,
    pub restarts: u32,
    pub step: u64,
    /// The newest loss reported.
    pub loss: Option<f64>,
}

/// The coordinator's view when scraped.
#[derive(Debug, Clone, Default)]
pub(crate) struct ControlSample {
    pub leader: bool,
    pub jobs: Vec<JobSample>,
    /// Workers holding a subscription to this leader, and those drained.
    pub workers_subscribed: usize,
    pub workers_drained: usize,
}

/// The coordinator's series.
pub struct ControlMetrics {
    registry: Registry,
    leader: Gauge,
    jobs: Family<StateLabel, Gauge>,
    generation: Family<JobLabel, Gauge>,
    restarts: Family<JobLabel, Gauge>,
    step: Family<JobLabel, Gauge>,
    loss: Family<JobLabel, FloatGauge>,
    workers: Family<StateLabel, Gauge>,
    grpc: Family<MethodLabel, Histogram, fn() -> Histogram>,
    methods: Mutex<HashSet<String>>,
    rendezvous: Histogram,
}

impl Default for ControlMetrics {
    fn default() -> Self {
        let mut registry = Registry::with_prefix("samtrain");
        let metrics = ControlMetrics {
            leader: Gauge::default(),
            jobs: Family::default(),
            generation: Family::default(),
            restarts: Family::default(),
            step: Family::default(),
            loss: Family::default(),
            workers: Family::default(),
            grpc: Family::new_with_constructor(latency_histogram),
            methods: Mutex::new(HashSet::new()),
            // 10 ms to about 12 hours: a job may wait long for workers.
            rendezvous: Histogram::new(exponential_buckets(0.01, 4.0, 12)),
            registry: Registry::default(),
        };
        registry.register(
            "coordinator_leader",
            "1 on the elected coordinator, 0 on a standby",
            metrics.leader.clone(),
        );
        registry.register("jobs", "Jobs by state", metrics.jobs.clone());
        registry.register(
            "job_generation",
            "The running (or next) generation of each unfinished job",
            metrics.generation.clone(),
        );
        registry.register(
            "job_restarts",
            "Generations each unfinished job restarted after a failure",
            metrics.restarts.clone(),
        );
        registry.register(
            "job_step",
            "The newest step each unfinished job reported",
            metrics.step.clone(),
        );
        registry.register(
            "job_loss",
            "The newest loss each unfinished job reported",
            metrics.loss.clone(),
        );
        registry.register(
            "workers",
            "Workers subscribed to the leader, and those drained",
            metrics.workers.clone(),
        );
        registry.register(
            "grpc_request_duration_seconds",
            "Time from a gRPC call's arrival to its response (a stream's first message), by method",
            metrics.grpc.clone(),
        );
        registry.register(
            "rendezvous_seconds",
            "Time from a job waiting for a generation (submitted, restarting or resizing) to the generation formed",
            metrics.rendezvous.clone(),
        );
        ControlMetrics {
            registry,
            ..metrics
        }
    }
}

impl ControlMetrics {
    /// One gRPC call to `path` (`/package.Service/Method`) took `seconds`.
    pub(crate) fn observe_grpc(&self, path: &str, seconds: f64) {
        let method = {
            let mut seen = self.methods.lock().unwrap_or_else(|e| e.into_inner());
            if seen.contains(path) || (seen.len() < MAX_METHODS && seen.insert(path.to_owned())) {
                path.to_owned()
            } else {
                "other".to_owned()
            }
        };
        self.grpc
            .get_or_create(&MethodLabel { method })
            .observe(seconds);
    }

    /// A generation formed `seconds` after its job began to wait for it.
    pub(crate) fn observe_rendezvous(&self, seconds: f64) {
        self.rendezvous.observe(seconds);
    }

    /// The series for `sample`, as OpenMetrics text.
    pub(crate) fn render(&self, sample: &ControlSample) -> String {
        self.leader.set(i64::from(sample.leader));
        // Every state, so that each series exists from the start.
        for state in JobState::ALL {
            let count = sample.jobs.iter().filter(|j| j.state == state).count();
            self.jobs
                .get_or_create(&StateLabel {
                    state: state.name().to_owned(),
                })
                .set(count as i64);
        }
        for family in [&self.generation, &self.restarts, &self.step] {
            family.clear();
        }
        self.loss.clear();
        for job in sample.jobs.iter().filter(|j| !j.state.is_terminal()) {
            let label = JobLabel {
                job: job.id.clone(),
            };
            self.generation
                .get_or_create(&label)
                .set(job.generation as i64);
            self.restarts
                .get_or_create(&label)
                .set(i64::from(job.restarts));
            self.step.get_or_create(&label).set(job.step as i64);
            if let Some(loss) = job.loss {
                self.loss.get_or_create(&label).set(loss);
            }
        }
        for (state, count) in [
            ("subscribed", sample.workers_subscribed),
            ("drained", sample.workers_drained),
        ] {
            self.workers
                .get_or_create(&StateLabel {
                    state: state.to_owned(),
                })
                .set(count as i64);
        }
        text(&self.registry)
    }
}

/// A worker's series.
pub struct WorkerMetrics {
    registry: Registry,
    heartbeats: Counter,
    heartbeat_failures: Counter,
    leases_lost: Counter,
    generation: Family<JobLabel, Gauge>,
    step: Family<RankLabels, Gauge>,
    loss: Family<RankLabels, FloatGauge>,
    lr: Family<RankLabels, FloatGauge>,
    grad_norm: Family<RankLabels, FloatGauge>,
    samples_per_s: Family<RankLabels, FloatGauge>,
    tokens_per_s: Family<RankLabels, FloatGauge>,
    step_seconds: Family<PhaseLabels, FloatGauge>,
    checkpoints: Family<OutcomeLabels, Counter>,
    save_seconds: Histogram,
    save_blocked_seconds: Histogram,
    save_bytes: Counter,
    load_seconds: Histogram,
    object_fetches: Counter,
    object_bytes: Counter,
    object_hits: Counter,
    /// The generation the object-store counts were last heard of, and
    /// those counts (they start again at zero in each generation).
    objects_seen: Mutex<(String, u64, ObjectFetches)>,
    /// The job the series are about; another job's first report clears them.
    job: Mutex<String>,
}

/// Saves and loads: 10 ms to about 3 minutes.
fn io_histogram() -> Histogram {
    Histogram::new(exponential_buckets(0.01, 4.0, 8))
}

impl Default for WorkerMetrics {
    fn default() -> Self {
        let mut registry = Registry::with_prefix("samtrain");
        let m = WorkerMetrics {
            registry: Registry::default(),
            heartbeats: Counter::default(),
            heartbeat_failures: Counter::default(),
            leases_lost: Counter::default(),
            generation: Family::default(),
            step: Family::default(),
            loss: Family::default(),
            lr: Family::default(),
            grad_norm: Family::default(),
            samples_per_s: Family::default(),
            tokens_per_s: Family::default(),
            step_seconds: Family::default(),
            checkpoints: Family::default(),
            save_seconds: io_histogram(),
            save_blocked_seconds: latency_histogram(),
            save_bytes: Counter::default(),
            load_seconds: io_histogram(),
            object_fetches: Counter::default(),
            object_bytes: Counter::default(),
            object_hits: Counter::default(),
            objects_seen: Mutex::new((String::new(), 0, ObjectFetches::default())),
            job: Mutex::new(String::new()),
        };
        let r = &mut registry;
        r.register(
            "worker_heartbeats",
            "Heartbeat calls that renewed this worker's lease",
            m.heartbeats.clone(),
        );
        r.register(
            "worker_heartbeat_failures",
            "Heartbeat calls that failed",
            m.heartbeat_failures.clone(),
        );
        r.register(
            "worker_leases_lost",
            "Times this worker's lease expired and it registered again",
            m.leases_lost.clone(),
        );
        r.register(
            "train_generation",
            "The generation this worker trains in",
            m.generation.clone(),
        );
        r.register("train_step", "The newest step reported", m.step.clone());
        r.register(
            "train_loss",
            "Mean LM loss over the global batch's answer tokens",
            m.loss.clone(),
        );
        r.register("train_learning_rate", "The learning rate", m.lr.clone());
        r.register(
            "train_grad_norm",
            "Global gradient norm before clipping",
            m.grad_norm.clone(),
        );
        r.register(
            "train_samples_per_second",
            "Samples per second, all ranks together",
            m.samples_per_s.clone(),
        );
        r.register(
            "train_tokens_per_second",
            "Answer tokens per second, all ranks together",
            m.tokens_per_s.clone(),
        );
        r.register(
            "train_step_seconds",
            "Seconds per step of this rank, by phase: data (waiting for the batch), compute (forward, backward, update) and communication (data-parallel collectives, waiting for slower ranks included)",
            m.step_seconds.clone(),
        );
        r.register(
            "checkpoints",
            "Checkpoint saves of this rank, committed or failed",
            m.checkpoints.clone(),
        );
        r.register(
            "checkpoint_save_seconds",
            "Committed saves of this rank, staging to commit",
            m.save_seconds.clone(),
        );
        r.register(
            "checkpoint_save_blocked_seconds",
            "Time a committed save blocked training (staging the tensors)",
            m.save_blocked_seconds.clone(),
        );
        r.register(
            "checkpoint_saved_bytes",
            "Bytes of this rank's committed saves",
            m.save_bytes.clone(),
        );
        r.register(
            "checkpoint_load_seconds",
            "Resumes of this rank from a checkpoint: reading and checking it",
            m.load_seconds.clone(),
        );
        r.register(
            "object_store_fetches",
            "Objects (images, model files) read from object storage",
            m.object_fetches.clone(),
        );
        r.register(
            "object_store_fetched_bytes",
            "Bytes read from object storage",
            m.object_bytes.clone(),
        );
        r.register(
            "object_cache_hits",
            "Objects found in the local cache instead of fetched; the hit ratio is hits / (hits + fetches)",
            m.object_hits.clone(),
        );
        WorkerMetrics { registry, ..m }
    }
}

impl WorkerMetrics {
    /// Forgets the series of another job than `job`.
    fn about(&self, job: &str) {
        let mut current = self.job.lock().unwrap_or_else(|e| e.into_inner());
        if *current != job {
            self.generation.clear();
            for family in [
                &self.loss,
                &self.lr,
                &self.grad_norm,
                &self.samples_per_s,
                &self.tokens_per_s,
            ] {
                family.clear();
            }
            self.step.clear();
            self.step_seconds.clear();
            self.checkpoints.clear();
            job.clone_into(&mut current);
        }
    }

    /// A progress report of rank `rank` of `job`'s `generation`.
    pub fn progress(&self, job: &str, generation: u64, rank: u32, p: &Progress) {
        self.about(job);
        let labels = RankLabels {
            job: job.to_owned(),
            rank,
        };
        self.generation
            .get_or_create(&JobLabel {
                job: job.to_owned(),
            })
            .set(generation as i64);
        self.step.get_or_create(&labels).set(p.step as i64);
        for (family, value) in [
            (&self.loss, p.loss),
            (&self.lr, p.lr),
            (&self.grad_norm, p.grad_norm),
            (&self.samples_per_s, p.samples_per_s),
            (&self.tokens_per_s, p.tokens_per_s),
        ] {
            family.get_or_create(&labels).set(value);
        }
        // The data wait is part of the compute time as reported (it is
        // the rank's own time, which the straggler check compares).
        for (phase, seconds) in [
            ("data", p.data_s),
            ("compute", (p.compute_s - p.data_s).max(0.0)),
            ("communication", p.comm_s),
        ] {
            self.step_seconds
                .get_or_create(&PhaseLabels {
                    job: job.to_owned(),
                    rank,
                    phase: phase.to_owned(),
                })
                .set(seconds);
        }
        if let Some(objects) = p.objects {
            self.objects(job, generation, objects);
        }
    }

    /// Counts what the generation fetched since its last report.
    fn objects(&self, job: &str, generation: u64, now: ObjectFetches) {
        let mut seen = self.objects_seen.lock().unwrap_or_else(|e| e.into_inner());
        if seen.0 != job || seen.1 != generation {
            *seen = (job.to_owned(), generation, ObjectFetches::default());
        }
        let last = seen.2;
        let delta = |now: u64, last: u64| now.saturating_sub(last);
        self.object_fetches.inc_by(delta(now.fetched, last.fetched));
        self.object_bytes.inc_by(delta(now.bytes, last.bytes));
        self.object_hits.inc_by(delta(now.hits, last.hits));
        seen.2 = now;
    }

    /// A committed save of this rank for `job`, and its timing.
    pub fn checkpoint_saved(&self, job: &str, save: &SaveTiming) {
        self.about(job);
        self.save_seconds.observe(save.blocked_s + save.upload_s);
        self.save_blocked_seconds.observe(save.blocked_s);
        self.save_bytes.inc_by(save.bytes);
    }

    /// A resume of `job` from a checkpoint that took `load_s`.
    pub fn checkpoint_loaded(&self, job: &str, load_s: f64) {
        self.about(job);
        self.load_seconds.observe(load_s);
    }

    /// A save of this rank for `job`: committed, or failed.
    pub fn checkpoint(&self, job: &str, committed: bool) {
        self.about(job);
        self.checkpoints
            .get_or_create(&OutcomeLabels {
                job: job.to_owned(),
                outcome: if committed { "committed" } else { "failed" }.to_owned(),
            })
            .inc();
    }

    pub(crate) fn heartbeat(&self, ok: bool) {
        if ok {
            self.heartbeats.inc();
        } else {
            self.heartbeat_failures.inc();
        }
    }

    pub(crate) fn lease_lost(&self) {
        self.leases_lost.inc();
    }

    /// The series as OpenMetrics text.
    pub fn render(&self) -> String {
        text(&self.registry)
    }
}

/// One exposition of several processes' metrics (a node's rank
/// processes): each part's samples get the label `label="<value>"`, each
/// metric family is written once with the samples of every part together
/// (the text format wants a family's samples in one run), and one `# EOF`
/// ends it.
pub fn merge_labelled(parts: &[(String, String)], label: &str) -> String {
    // Families in order of first appearance: header lines, then samples.
    let mut families: Vec<(String, Vec<String>, Vec<String>)> = Vec::new();
    for (value, text) in parts {
        let value = value.replace('\\', "\\\\").replace('"', "\\\"");
        let mut current: Option<usize> = None;
        for line in text.lines() {
            if line.is_empty() || line == "# EOF" {
                continue;
            }
            if let Some(rest) = line.strip_prefix("# ") {
                let mut words = rest.splitn(3, ' ');
                let (_, Some(name)) = (words.next(), words.next()) else {
                    continue;
                };
                let index = match families.iter().position(|(n, _, _)| n == name) {
                    Some(index) => index,
                    None => {
                        families.push((name.to_owned(), Vec::new(), Vec::new()));
                        families.len() - 1
                    }
                };
                let headers = &mut families[index].1;
                if !headers.iter().any(|h| h == line) {
                    headers.push(line.to_owned());
                }
                current = Some(index);
                continue;
            }
            let end = line.find(['{', ' ']).unwrap_or(line.len());
            let (name, rest) = line.split_at(end);
            let labelled = match rest.strip_prefix('{') {
                Some(labels) if labels.starts_with('}') => {
                    format!("{name}{{{label}=\"{value}\"{labels}")
                }
                Some(labels) => format!("{name}{{{label}=\"{value}\",{labels}"),
                None => format!("{name}{{{label}=\"{value}\"}}{rest}"),
            };
            let index = match current {
                Some(index) => index,
                None => {
                    families.push((name.to_owned(), Vec::new(), Vec::new()));
                    families.len() - 1
                }
            };
            current = Some(index);
            families[index].2.push(labelled);
        }
    }
    let mut out = String::new();
    for (_, headers, samples) in &families {
        for line in headers.iter().chain(samples) {
            out.push_str(line);
            out.push('\n');
        }
    }
    out.push_str("# EOF\n");
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    fn endpoint(token: Option<&str>) -> MetricsEndpoint {
        MetricsEndpoint {
            render: Arc::new(|| Box::pin(async { String::new() })),
            token: token.map(str::to_owned),
        }
    }

    #[test]
    fn a_token_is_required_off_loopback_and_checked_when_set() {
        let (lo, any) = (
            "127.0.0.1:7072".parse().unwrap(),
            "10.0.0.5:7072".parse().unwrap(),
        );
        let request = |head: &str, local| {
            crate::health::Request::parse(&format!("GET /metrics HTTP/1.1\r\n{head}\r\n"), local)
                .unwrap()
        };
        assert!(endpoint(None).admits(&request("", lo)));
        assert!(!endpoint(None).admits(&request("Authorization: Bearer x\r\n", any)));
        let m = endpoint(Some("s3cret-token-0123"));
        assert!(m.admits(&request(
            "Host: x\r\nauthorization:  Bearer s3cret-token-0123\r\n",
            any
        )));
        assert!(!m.admits(&request("Authorization: Bearer s3cret-token-0124\r\n", lo)));
        assert!(!m.admits(&request("Authorization: Basic s3cret-token-0123\r\n", any)));
        assert!(!m.admits(&request("", lo)));
    }

    #[test]
    fn control_series_follow_the_view() {
        let m = ControlMetrics::default();
        let job = |id: &str, state| JobSample {
            id: id.to_owned(),
            state,
            generation: 3,
            restarts: 2,
            step: 40,
            loss: Some(1.5),
        };
        let text = m.render(&ControlSample {
            leader: true,
            jobs: vec![job("a", JobState::Running), job("b", JobState::Succeeded)],
            workers_subscribed: 2,
            workers_drained: 1,
        });
        for line in [
            "samtrain_coordinator_leader 1",
            "samtrain_jobs{state=\"running\"} 1",
            "samtrain_jobs{state=\"succeeded\"} 1",
            "samtrain_jobs{state=\"pending\"} 0",
            "samtrain_job_restarts{job=\"a\"} 2",
            "samtrain_job_generation{job=\"a\"} 3",
            "samtrain_job_loss{job=\"a\"} 1.5",
            "samtrain_workers{state=\"drained\"} 1",
        ] {
            assert!(text.lines().any(|l| l == line), "no `{line}` in\n{text}");
        }
        assert!(
            !text.contains("job=\"b\""),
            "a finished job keeps series:\n{text}"
        );
        assert!(text.ends_with("# EOF\n"));
        m.observe_rendezvous(1.5);
        let text = m.render(&ControlSample::default());
        assert!(
            text.lines()
                .any(|l| l == "samtrain_rendezvous_seconds_sum 1.5"),
            "{text}"
        );
        // The next scrape forgets a job that finished since.
        let text = m.render(&ControlSample {
            jobs: vec![job("a", JobState::Failed)],
            ..ControlSample::default()
        });
        assert!(!text.contains("job=\"a\""), "{text}");
        assert!(text.contains("samtrain_coordinator_leader 0"), "{text}");
    }

    #[test]
    fn worker_series_keep_the_current_job_only() {
        let m = WorkerMetrics::default();
        let fetched = |fetched, hits| ObjectFetches {
            fetched,
            bytes: fetched * 1000,
            hits,
        };
        let p = Progress {
            step: 7,
            loss: 2.5,
            compute_s: 0.375,
            data_s: 0.125,
            objects: Some(fetched(4, 0)),
            ..Progress::default()
        };
        m.progress("j1", 1, 0, &p);
        // The generation's counts grow; the next generation's start again.
        let p = Progress {
            objects: Some(fetched(5, 3)),
            ..p
        };
        m.progress("j1", 1, 0, &p);
        m.progress(
            "j1",
            2,
            0,
            &Progress {
                objects: Some(fetched(2, 1)),
                ..p
            },
        );
        m.checkpoint("j1", true);
        m.checkpoint_saved(
            "j1",
            &SaveTiming {
                bytes: 4096,
                blocked_s: 0.002,
                upload_s: 0.5,
            },
        );
        m.checkpoint_loaded("j1", 0.25);
        m.heartbeat(true);
        let text = m.render();
        for line in [
            "samtrain_train_step{job=\"j1\",rank=\"0\"} 7",
            "samtrain_train_loss{job=\"j1\",rank=\"0\"} 2.5",
            "samtrain_train_step_seconds{job=\"j1\",rank=\"0\",phase=\"compute\"} 0.25",
            "samtrain_train_step_seconds{job=\"j1\",rank=\"0\",phase=\"data\"} 0.125",
            "samtrain_checkpoints_total{job=\"j1\",outcome=\"committed\"} 1",
            "samtrain_checkpoint_saved_bytes_total 4096",
            "samtrain_checkpoint_save_seconds_count 1",
            "samtrain_checkpoint_save_seconds_sum 0.502",
            "samtrain_checkpoint_load_seconds_sum 0.25",
            "samtrain_object_store_fetches_total 7",
            "samtrain_object_store_fetched_bytes_total 7000",
            "samtrain_object_cache_hits_total 4",
            "samtrain_worker_heartbeats_total 1",
            "samtrain_train_generation{job=\"j1\"} 2",
        ] {
            assert!(text.lines().any(|l| l == line), "no `{line}` in\n{text}");
        }
        m.progress("j2", 1, 3, &p);
        let text = m.render();
        assert!(!text.contains("j1"), "{text}");
        assert!(
            text.contains("samtrain_train_step{job=\"j2\",rank=\"3\"} 7"),
            "{text}"
        );
    }

    #[test]
    fn merged_expositions_label_each_part_and_keep_each_family_together() {
        let slot = |loss: &str| {
            format!(
                "# HELP samtrain_loss Loss.\n# TYPE samtrain_loss gauge\nsamtrain_loss{{job=\"j\"}} {loss}\n# HELP samtrain_steps Steps.\n# TYPE samtrain_steps counter\nsamtrain_steps_total 3\n# EOF\n"
            )
        };
        let merged = merge_labelled(
            &[("0".into(), slot("1.5")), ("1".into(), slot("2.5"))],
            "slot",
        );
        assert_eq!(
            merged,
            "# HELP samtrain_loss Loss.\n# TYPE samtrain_loss gauge\n\
             samtrain_loss{slot=\"0\",job=\"j\"} 1.5\nsamtrain_loss{slot=\"1\",job=\"j\"} 2.5\n\
             # HELP samtrain_steps Steps.\n# TYPE samtrain_steps counter\n\
             samtrain_steps_total{slot=\"0\"} 3\nsamtrain_steps_total{slot=\"1\"} 3\n# EOF\n"
        );
    }
}
