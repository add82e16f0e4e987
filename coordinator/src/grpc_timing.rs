//! A tower layer around the coordinator's gRPC server that times every
//! call, from its arrival to its response (for a stream, its first
//! message), into `samtrain_grpc_request_duration_seconds{method}`.

use std::future::Future;
use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll};
use std::time::Instant;

use tower_layer::Layer;
use tower_service::Service;

use crate::control::Control;

/// Wraps the server's routes in [`Timed`].
#[derive(Clone)]
pub(crate) struct GrpcTiming {
    pub control: Arc<Control>,
}

impl<S> Layer<S> for GrpcTiming {
    type Service = Timed<S>;

    fn layer(&self, inner: S) -> Timed<S> {
        Timed {
            inner,
            control: self.control.clone(),
        }
    }
}

#[derive(Clone)]
pub(crate) struct Timed<S> {
    inner: S,
    control: Arc<Control>,
}

impl<S, B> Service<http::Request<B>> for Timed<S>
where
    S: Service<http::Request<B>>,
    S::Future: Send + 'static,
{
    type Response = S::Response;
    type Error = S::Error;
    type Future = Pin<Box<dyn Future<Output = Result<S::Response, S::Error>> + Send>>;

    fn poll_ready(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), S::Error>> {
        self.inner.poll_ready(cx)
    }

    fn call(&mut self, request: http::Request<B>) -> Self::Future {
        let path = request.uri().path().to_owned();
        let started = Instant::now();
        let answered = self.inner.call(request);
        let control = self.control.clone();
        Box::pin(async move {
            let response = answered.await;
            control.observe_grpc(&path, started.elapsed().as_secs_f64());
            response
        })
    }
}
