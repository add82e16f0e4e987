//! The `tracing` layer: it gives every span an OTLP trace and span id when
//! it opens, keeps its fields as attributes, and encodes it as an OTLP span
//! when it closes.

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::mpsc::SyncSender;
use std::time::{SystemTime, UNIX_EPOCH};

use serde_json::{json, Value};
use sha2::{Digest, Sha256};
use tracing::field::{Field, Visit};
use tracing::span::{Attributes, Id, Record};
use tracing::Subscriber;
use tracing_subscriber::layer::Context;
use tracing_subscriber::registry::LookupSpan;
use tracing_subscriber::Layer;

/// Records spans for the [`crate::Exporter`] whose channel it holds.
pub struct OtlpLayer {
    spans: SyncSender<Value>,
    ids: SpanIds,
}

impl OtlpLayer {
    pub(crate) fn new(spans: SyncSender<Value>) -> OtlpLayer {
        OtlpLayer {
            spans,
            ids: SpanIds::new(),
        }
    }
}

/// What a span keeps between opening and closing.
struct Open {
    trace_id: [u8; 16],
    span_id: [u8; 8],
    /// The parent's id, when the parent is in the same trace.
    parent: Option<[u8; 8]>,
    start_ns: u128,
    fields: Fields,
}

/// The trace of the generation `generation` of job `job`, in every process.
pub fn generation_trace(job: &str, generation: u64) -> [u8; 16] {
    let digest = Sha256::new()
        .chain_update(b"samtrain trace\0")
        .chain_update(job.as_bytes())
        .chain_update(b"\0")
        .chain_update(generation.to_le_bytes())
        .finalize();
    let mut id = [0u8; 16];
    id.copy_from_slice(&digest[..16]);
    id
}

impl<S> Layer<S> for OtlpLayer
where
    S: Subscriber + for<'a> LookupSpan<'a>,
{
    fn on_new_span(&self, attrs: &Attributes<'_>, id: &Id, ctx: Context<'_, S>) {
        let Some(span) = ctx.span(id) else { return };
        let mut fields = Fields::default();
        attrs.record(&mut fields);
        let parent = span.parent().and_then(|p| {
            p.extensions()
                .get::<Open>()
                .map(|o| (o.trace_id, o.span_id))
        });
        let own_trace = fields.generation_trace();
        let trace_id = own_trace
            .or(parent.map(|(t, _)| t))
            .unwrap_or_else(|| self.ids.trace());
        let parent = parent.filter(|(t, _)| *t == trace_id).map(|(_, s)| s);
        span.extensions_mut().insert(Open {
            trace_id,
            span_id: self.ids.span(),
            parent,
            start_ns: now_ns(),
            fields,
        });
    }

    fn on_record(&self, id: &Id, values: &Record<'_>, ctx: Context<'_, S>) {
        if let Some(span) = ctx.span(id) {
            if let Some(open) = span.extensions_mut().get_mut::<Open>() {
                values.record(&mut open.fields);
            }
        }
    }

    fn on_close(&self, id: Id, ctx: Context<'_, S>) {
        let Some(span) = ctx.span(&id) else { return };
        let Some(open) = span.extensions_mut().remove::<Open>() else {
            return;
        };
        let mut encoded = json!({
            "traceId": hex(&open.trace_id),
            "spanId": hex(&open.span_id),
            "name": span.name(),
            "kind": 1,
            "startTimeUnixNano": open.start_ns.to_string(),
            "endTimeUnixNano": now_ns().to_string(),
            "attributes": open.fields.attributes,
        });
        if let Some(parent) = open.parent {
            encoded["parentSpanId"] = hex(&parent).into();
        }
        // A full queue drops the span: tracing must not slow training.
        let _ = self.spans.try_send(encoded);
    }
}

/// A span's fields as OTLP attributes, and the two that name a generation.
#[derive(Default)]
struct Fields {
    attributes: Vec<Value>,
    job: Option<String>,
    generation: Option<u64>,
}

impl Fields {
    fn generation_trace(&self) -> Option<[u8; 16]> {
        Some(generation_trace(self.job.as_deref()?, self.generation?))
    }

    fn push(&mut self, field: &Field, value: Value) {
        self.attributes
            .push(json!({"key": field.name(), "value": value}));
    }
}

impl Visit for Fields {
    fn record_i64(&mut self, field: &Field, value: i64) {
        self.push(field, json!({"intValue": value.to_string()}));
    }

    fn record_u64(&mut self, field: &Field, value: u64) {
        if field.name() == "generation" {
            self.generation = Some(value);
        }
        self.push(field, json!({"intValue": value.to_string()}));
    }

    fn record_f64(&mut self, field: &Field, value: f64) {
        // JSON has no NaN or infinity: those go as text.
        if value.is_finite() {
            self.push(field, json!({"doubleValue": value}));
        } else {
            self.push(field, json!({"stringValue": value.to_string()}));
        }
    }

    fn record_bool(&mut self, field: &Field, value: bool) {
        self.push(field, json!({"boolValue": value}));
    }

    fn record_str(&mut self, field: &Field, value: &str) {
        if field.name() == "job" {
            self.job = Some(value.to_owned());
        }
        self.push(field, json!({"stringValue": value}));
    }

    fn record_debug(&mut self, field: &Field, value: &dyn std::fmt::Debug) {
        // `%value` fields arrive here, formatted with Display.
        let text = format!("{value:?}");
        if field.name() == "job" {
            self.job = Some(text.clone());
        }
        self.push(field, json!({"stringValue": text}));
    }
}

/// Span ids unique within the process and, from a random start, across
/// processes; trace ids for spans outside any generation.
struct SpanIds {
    seed: u64,
    next: AtomicU64,
}

impl SpanIds {
    fn new() -> SpanIds {
        let mut seed = [0u8; 8];
        // Without a random source, the time still tells processes apart.
        if getrandom::fill(&mut seed).is_err() {
            seed = (now_ns() as u64).to_le_bytes();
        }
        SpanIds {
            seed: u64::from_le_bytes(seed),
            next: AtomicU64::new(1),
        }
    }

    fn draw(&self) -> u64 {
        let n = self.next.fetch_add(1, Ordering::Relaxed);
        // splitmix64: distinct counters give distinct, well-spread ids.
        let mut z = self
            .seed
            .wrapping_add(n.wrapping_mul(0x9E37_79B9_7F4A_7C15));
        z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
        (z ^ (z >> 31)).max(1)
    }

    fn span(&self) -> [u8; 8] {
        self.draw().to_be_bytes()
    }

    fn trace(&self) -> [u8; 16] {
        let mut id = [0u8; 16];
        id[..8].copy_from_slice(&self.draw().to_be_bytes());
        id[8..].copy_from_slice(&self.draw().to_be_bytes());
        id
    }
}

fn now_ns() -> u128 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_nanos())
        .unwrap_or(0)
}

fn hex(bytes: &[u8]) -> String {
    bytes.iter().map(|b| format!("{b:02x}")).collect()
}

#[cfg(test)]
mod tests {
    use super::*;
    use tracing_subscriber::layer::SubscriberExt;

    fn recorded(f: impl FnOnce()) -> Vec<Value> {
        let (tx, rx) = std::sync::mpsc::sync_channel(64);
        let subscriber = tracing_subscriber::registry().with(OtlpLayer::new(tx));
        tracing::subscriber::with_default(subscriber, f);
        rx.try_iter().collect()
    }

    fn attribute<'a>(span: &'a Value, key: &str) -> &'a Value {
        span["attributes"]
            .as_array()
            .unwrap()
            .iter()
            .find(|a| a["key"] == key)
            .map(|a| &a["value"])
            .unwrap_or(&Value::Null)
    }

    #[test]
    fn a_generation_is_one_trace_whose_id_every_process_derives() {
        let spans = recorded(|| {
            let outer = tracing::info_span!("worker");
            let _o = outer.enter();
            let generation =
                tracing::info_span!("generation", job = %"demo-1", generation = 3u64, rank = 1u32);
            let _g = generation.enter();
            let step = tracing::info_span!("step", step = 7u64, loss = 0.5);
            let _s = step.enter();
        });
        // Closed innermost first.
        let [step, generation, worker] = &spans[..] else {
            panic!("{spans:?}")
        };
        let trace = hex(&generation_trace("demo-1", 3));
        assert_eq!(generation["traceId"], trace);
        assert_eq!(step["traceId"], trace);
        assert_eq!(step["parentSpanId"], generation["spanId"]);
        // The generation starts its trace: no parent from another one.
        assert_ne!(worker["traceId"], trace);
        assert!(generation.get("parentSpanId").is_none(), "{generation}");
        assert_eq!(attribute(step, "step"), &json!({"intValue": "7"}));
        assert_eq!(attribute(step, "loss"), &json!({"doubleValue": 0.5}));
        assert_eq!(
            attribute(generation, "job"),
            &json!({"stringValue": "demo-1"})
        );
        let start: u128 = step["startTimeUnixNano"].as_str().unwrap().parse().unwrap();
        let end: u128 = step["endTimeUnixNano"].as_str().unwrap().parse().unwrap();
        assert!(start <= end);
        assert_eq!(step["spanId"].as_str().unwrap().len(), 16);
        assert_ne!(step["spanId"], generation["spanId"]);
    }

    #[test]
    fn other_generations_and_jobs_are_other_traces() {
        assert_ne!(generation_trace("a", 0), generation_trace("a", 1));
        assert_ne!(generation_trace("a", 0), generation_trace("b", 0));
        assert_eq!(generation_trace("a", 0), generation_trace("a", 0));
    }

    #[test]
    fn span_ids_do_not_repeat() {
        let ids = SpanIds::new();
        let drawn: std::collections::HashSet<[u8; 8]> = (0..10_000).map(|_| ids.span()).collect();
        assert_eq!(drawn.len(), 10_000);
    }
}
