//! Spans posted to a collector over a real socket (the testkit's stand-in
//! collector on loopback).

use std::net::TcpListener;

use samtrain_testkit::OtlpCollector;
use serde_json::Value;
use tracing_subscriber::layer::SubscriberExt;

#[test]
fn spans_reach_the_collector_with_their_resource_when_the_exporter_is_dropped() {
    let collector = OtlpCollector::start();
    let (layer, exporter) =
        samtrain_telemetry::start(collector.endpoint(), "samtrain-test").unwrap();
    let subscriber = tracing_subscriber::registry().with(layer);
    tracing::subscriber::with_default(subscriber, || {
        let generation = tracing::info_span!("generation", job = %"j", generation = 0u64);
        let _g = generation.enter();
        for step in 1..=3u64 {
            let _s = tracing::info_span!("step", step).entered();
        }
    });
    drop(exporter);
    let posted = collector.spans();
    assert!(posted.iter().all(|(service, _)| service == "samtrain-test"));
    let spans: Vec<&Value> = posted.iter().map(|(_, span)| span).collect();
    let names: Vec<&str> = spans.iter().map(|s| s["name"].as_str().unwrap()).collect();
    assert_eq!(names, ["step", "step", "step", "generation"]);
    let generation = spans[3];
    assert!(spans[..3].iter().all(
        |s| s["parentSpanId"] == generation["spanId"] && s["traceId"] == generation["traceId"]
    ));
}

#[test]
fn a_collector_that_is_not_there_costs_nothing_but_the_spans() {
    // A port nobody listens on: the exporter gives up quietly.
    let port = TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port();
    let (layer, exporter) =
        samtrain_telemetry::start(&format!("http://127.0.0.1:{port}"), "samtrain-test").unwrap();
    let subscriber = tracing_subscriber::registry().with(layer);
    tracing::subscriber::with_default(subscriber, || {
        let _s = tracing::info_span!("step", step = 1u64).entered();
    });
    drop(exporter);
}
