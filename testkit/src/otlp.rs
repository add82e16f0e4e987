//! A stand-in for an OpenTelemetry collector: an HTTP server on a loopback
//! port that answers `200` to every `POST /v1/traces` and keeps each body,
//! stopped when dropped.

use std::io::{BufRead, BufReader, Read, Write};
use std::net::{TcpListener, TcpStream};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::thread::JoinHandle;
use std::time::Duration;

pub struct OtlpCollector {
    endpoint: String,
    bodies: Arc<Mutex<Vec<String>>>,
    stop: Arc<AtomicBool>,
    thread: Option<JoinHandle<()>>,
}

impl OtlpCollector {
    pub fn start() -> OtlpCollector {
        let listener = TcpListener::bind("127.0.0.1:0").expect("binding a loopback port");
        listener.set_nonblocking(true).unwrap();
        let endpoint = format!("http://{}", listener.local_addr().unwrap());
        let bodies = Arc::new(Mutex::new(Vec::new()));
        let stop = Arc::new(AtomicBool::new(false));
        let thread = {
            let (bodies, stop) = (bodies.clone(), stop.clone());
            std::thread::spawn(move || {
                while !stop.load(Ordering::SeqCst) {
                    match listener.accept() {
                        Ok((stream, _)) => answer(stream, &bodies),
                        Err(_) => std::thread::sleep(Duration::from_millis(20)),
                    }
                }
            })
        };
        OtlpCollector {
            endpoint,
            bodies,
            stop,
            thread: Some(thread),
        }
    }

    /// `http://127.0.0.1:PORT`, as `--otlp-endpoint` takes it.
    pub fn endpoint(&self) -> &str {
        &self.endpoint
    }

    /// The JSON bodies posted so far, in order.
    pub fn bodies(&self) -> Vec<String> {
        self.bodies.lock().unwrap().clone()
    }

    /// Every span posted so far, in order, with the `service.name` of the
    /// resource it was posted under.
    pub fn spans(&self) -> Vec<(String, serde_json::Value)> {
        let mut spans = Vec::new();
        for body in self.bodies() {
            let body: serde_json::Value =
                serde_json::from_str(&body).expect("a posted body is JSON");
            for resource in body["resourceSpans"].as_array().expect("resourceSpans") {
                let service = resource["resource"]["attributes"]
                    .as_array()
                    .expect("resource attributes")
                    .iter()
                    .find(|a| a["key"] == "service.name")
                    .and_then(|a| a["value"]["stringValue"].as_str())
                    .expect("a service.name attribute")
                    .to_owned();
                for span in resource["scopeSpans"][0]["spans"]
                    .as_array()
                    .expect("spans")
                {
                    spans.push((service.clone(), span.clone()));
                }
            }
        }
        spans
    }
}

impl Drop for OtlpCollector {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::SeqCst);
        if let Some(thread) = self.thread.take() {
            let _ = thread.join();
        }
    }
}

/// Reads one request and answers it, keeping its body first if it was a
/// traces POST: the exporter hears `200` only once the body is kept, so a
/// caller that waited for its exporter sees every body it sent.
fn answer(stream: TcpStream, bodies: &Mutex<Vec<String>>) {
    let _ = answer_one(stream, bodies);
}

fn answer_one(mut stream: TcpStream, bodies: &Mutex<Vec<String>>) -> Option<()> {
    stream.set_nonblocking(false).ok()?;
    stream
        .set_read_timeout(Some(Duration::from_secs(10)))
        .ok()?;
    let mut reader = BufReader::new(stream.try_clone().ok()?);
    let mut request = String::new();
    reader.read_line(&mut request).ok()?;
    let mut length = 0;
    loop {
        let mut line = String::new();
        reader.read_line(&mut line).ok()?;
        if let Some(v) = line.to_ascii_lowercase().strip_prefix("content-length:") {
            length = v.trim().parse().ok()?;
        }
        if line == "\r\n" || line.is_empty() {
            break;
        }
    }
    let mut body = vec![0; length];
    reader.read_exact(&mut body).ok()?;
    let traces = request.starts_with("POST /v1/traces ");
    let status: &[u8] = if traces {
        b"HTTP/1.1 200 OK\r\ncontent-length: 0\r\n\r\n"
    } else {
        b"HTTP/1.1 404 Not Found\r\ncontent-length: 0\r\n\r\n"
    };
    if traces {
        bodies
            .lock()
            .unwrap()
            .push(String::from_utf8_lossy(&body).into_owned());
    }
    stream.write_all(status).ok()
}
