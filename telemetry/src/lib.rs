//! Traces for samtrain: the `tracing` spans of every process (the
//! coordinator's rendezvous, a worker's generation, its load, steps,
//! checkpoint saves and evaluation) sent to an OpenTelemetry collector over
//! OTLP/HTTP in its JSON encoding (`POST <endpoint>/v1/traces`).
//!
//! One generation of one job is one trace in every process, without
//! passing a context between them: a span that carries `job` and
//! `generation` fields starts the trace whose id is derived from those two
//! values, and its descendants belong to it. So the coordinator's
//! rendezvous and each rank's training of generation 3 line up on one
//! timeline in Jaeger or Tempo.
//!
//! Spans are encoded when they close and handed to a background thread
//! over a bounded channel (a full channel drops spans rather than slow a
//! step); the thread posts batches at least once a second and when dropped
//! ([`Exporter`]). Plain HTTP only: a collector runs beside samtrain (a
//! sidecar or a node agent), which forwards over TLS where needed.

mod export;
mod spans;

pub use export::Exporter;
pub use spans::OtlpLayer;

use thiserror::Error;

/// Why traces cannot be exported.
#[derive(Debug, Error)]
pub enum TelemetryError {
    #[error("--otlp-endpoint {endpoint}: {message}")]
    Endpoint { endpoint: String, message: String },
}

/// The layer to add to the process's subscriber, and the exporter that
/// sends what it records to `endpoint` (`http://host:port`, or a full URL
/// ending in `/v1/traces`) as the service `service`.
pub fn start(endpoint: &str, service: &str) -> Result<(OtlpLayer, Exporter), TelemetryError> {
    let exporter = Exporter::start(endpoint, service)?;
    Ok((OtlpLayer::new(exporter.sender()), exporter))
}
