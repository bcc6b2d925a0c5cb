//! Bodies, handled as opaque frames (never decoded).
//!
//! * [`buffer`] reads a request body up to a limit so it can be sent a second time after a
//!   "moved" answer; a larger body is streamed on and cannot be retried.
//! * [`UpstreamBody`] streams a cell's response back, ends it with DEADLINE_EXCEEDED
//!   trailers if the upstream deadline passes mid-body, and records the final gRPC code and
//!   latency when the response ends (or the client goes away).

use std::collections::VecDeque;
use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll};
use std::time::Instant;

use bytes::Bytes;
use http::{HeaderMap, HeaderValue};
use http_body_util::BodyExt;
use hyper::body::{Body, Frame, Incoming, SizeHint};
use tokio::sync::{OwnedSemaphorePermit, Semaphore};
use tokio::time::Sleep;

use crate::balance::InFlight;
use crate::grpc::{self, Code};
use crate::metrics::CellMetrics;

/// Error type of the bodies the router sends.
pub type BoxError = Box<dyn std::error::Error + Send + Sync>;

/// The body type of every response the router sends.
pub type RespBody = http_body_util::combinators::UnsyncBoxBody<Bytes, BoxError>;

/// A request body: frames already read (replayable), then possibly the rest of the
/// client's stream.
#[derive(Debug)]
pub struct ReplayBody {
    frames: VecDeque<Frame<Bytes>>,
    rest: Option<Incoming>,
    /// The share of the router's buffer budget the frames hold (see [`buffer`]).
    _budget: Option<OwnedSemaphorePermit>,
}

impl ReplayBody {
    /// A body of one data frame (a request the router makes itself: a health probe).
    pub fn from_bytes(data: Bytes) -> ReplayBody {
        ReplayBody {
            frames: VecDeque::from([Frame::data(data)]),
            rest: None,
            _budget: None,
        }
    }
}

impl Body for ReplayBody {
    type Data = Bytes;
    type Error = hyper::Error;

    fn poll_frame(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, hyper::Error>>> {
        if let Some(f) = self.frames.pop_front() {
            return Poll::Ready(Some(Ok(f)));
        }
        match self.rest.as_mut() {
            Some(rest) => Pin::new(rest).poll_frame(cx),
            None => Poll::Ready(None),
        }
    }

    fn is_end_stream(&self) -> bool {
        self.frames.is_empty() && self.rest.as_ref().is_none_or(|r| r.is_end_stream())
    }

    fn size_hint(&self) -> SizeHint {
        let buffered: u64 = self
            .frames
            .iter()
            .filter_map(|f| f.data_ref())
            .map(|d| d.len() as u64)
            .sum();
        match &self.rest {
            None => SizeHint::with_exact(buffered),
            Some(r) => {
                let h = r.size_hint();
                let mut out = SizeHint::new();
                out.set_lower(buffered + h.lower());
                if let Some(u) = h.upper() {
                    out.set_upper(buffered + u);
                }
                out
            }
        }
    }
}

/// A response body that keeps a guard alive until the body ends or is dropped (the
/// connection counts as busy while its response streams; see `slots`).
pub struct Guarded<G> {
    inner: RespBody,
    _guard: G,
}

impl<G: Send + Unpin + 'static> Guarded<G> {
    pub fn wrap(inner: RespBody, guard: G) -> RespBody {
        RespBody::new(Guarded {
            inner,
            _guard: guard,
        })
    }
}

impl<G: Unpin> Body for Guarded<G> {
    type Data = Bytes;
    type Error = BoxError;

    fn poll_frame(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, BoxError>>> {
        Pin::new(&mut self.inner).poll_frame(cx)
    }

    fn is_end_stream(&self) -> bool {
        self.inner.is_end_stream()
    }

    fn size_hint(&self) -> SizeHint {
        self.inner.size_hint()
    }
}

/// A request body read by [`buffer`].
#[derive(Debug)]
pub enum Buffered {
    /// The whole body is in memory: it can be sent any number of times.
    Complete {
        data: Vec<Bytes>,
        trailers: Option<HeaderMap>,
        /// The share of the router's buffer budget `data` holds.
        budget: Option<OwnedSemaphorePermit>,
    },
    /// The body is larger than the limit: what was read, then the rest of the stream. It
    /// can be sent once.
    Partial(ReplayBody),
    /// A [`Buffered::Partial`] body that was sent already.
    Spent,
}

impl Buffered {
    /// A body to send: a copy for [`Buffered::Complete`]; for [`Buffered::Partial`] the
    /// stream itself (the second call gets `None`).
    pub fn take_body(&mut self) -> Option<ReplayBody> {
        match self {
            Buffered::Complete { data, trailers, .. } => {
                // Copies share the buffered bytes (`Bytes` is counted), so only the
                // `Buffered` holds the budget.
                let mut frames: VecDeque<Frame<Bytes>> =
                    data.iter().cloned().map(Frame::data).collect();
                if let Some(t) = trailers {
                    frames.push_back(Frame::trailers(t.clone()));
                }
                Some(ReplayBody {
                    frames,
                    rest: None,
                    _budget: None,
                })
            }
            Buffered::Partial(_) => match std::mem::replace(self, Buffered::Spent) {
                Buffered::Partial(body) => Some(body),
                _ => None,
            },
            Buffered::Spent => None,
        }
    }

    /// Whether the body can be sent again after a first attempt.
    pub fn replayable(&self) -> bool {
        matches!(self, Buffered::Complete { .. })
    }
}

/// Reads `body` until its end or until more than `limit` data bytes were read, or until
/// the router-wide `budget` of buffered bytes has no room for the next frame: a body that
/// does not fit is streamed on as it comes (sent once, not replayable), so many large
/// bodies at once cost the router bounded memory.
pub async fn buffer(
    mut body: Incoming,
    limit: usize,
    budget: &Arc<Semaphore>,
) -> Result<Buffered, hyper::Error> {
    let mut data = Vec::new();
    let mut trailers = None;
    let mut total = 0usize;
    let mut held: Option<OwnedSemaphorePermit> = None;
    while let Some(frame) = body.frame().await {
        let frame = frame?;
        match frame.into_data() {
            Ok(d) => {
                total += d.len();
                let share = u32::try_from(d.len())
                    .ok()
                    .and_then(|n| budget.clone().try_acquire_many_owned(n).ok());
                let fits = share.is_some();
                match (&mut held, share) {
                    (Some(h), Some(p)) => h.merge(p),
                    (h @ None, p) => *h = p,
                    (Some(_), None) => {}
                }
                data.push(d);
                if total > limit || !fits {
                    return Ok(Buffered::Partial(ReplayBody {
                        frames: data.into_iter().map(Frame::data).collect(),
                        rest: Some(body),
                        _budget: held,
                    }));
                }
            }
            Err(frame) => {
                if let Ok(t) = frame.into_trailers() {
                    trailers = Some(t);
                }
            }
        }
    }
    Ok(Buffered::Complete {
        data,
        trailers,
        budget: held,
    })
}

/// Records one proxied request in the metrics when it ends, whichever way it ends.
pub struct Completion {
    metrics: Arc<CellMetrics>,
    started: Instant,
    /// The final code so far: from trailers-only headers, then from trailers.
    code: Option<&'static str>,
    _in_flight: Option<InFlight>,
}

impl Completion {
    pub fn new(
        metrics: Arc<CellMetrics>,
        started: Instant,
        in_flight: Option<InFlight>,
    ) -> Completion {
        Completion {
            metrics,
            started,
            code: None,
            _in_flight: in_flight,
        }
    }

    pub fn set_code(&mut self, code: &'static str) {
        self.code = Some(code);
    }
}

impl Drop for Completion {
    fn drop(&mut self) {
        // No code seen: the client went away (or the stream broke) before the end.
        let code = self.code.unwrap_or("CANCELLED");
        self.metrics
            .record(code, self.started.elapsed().as_secs_f64());
    }
}

/// A cell's response body on its way back to the client.
pub struct UpstreamBody {
    inner: Incoming,
    deadline: Pin<Box<Sleep>>,
    done: bool,
    completion: Option<Completion>,
}

impl UpstreamBody {
    /// `completion` already carries the code of a trailers-only answer, if any.
    pub fn new(inner: Incoming, deadline: Pin<Box<Sleep>>, completion: Completion) -> Self {
        UpstreamBody {
            inner,
            deadline,
            done: false,
            completion: Some(completion),
        }
    }

    fn finish(&mut self, code: Option<&'static str>) {
        self.done = true;
        if let (Some(c), Some(code)) = (self.completion.as_mut(), code) {
            c.set_code(code);
        }
        // Dropping the completion records the request.
        self.completion = None;
    }
}

impl Body for UpstreamBody {
    type Data = Bytes;
    type Error = BoxError;

    fn poll_frame(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, BoxError>>> {
        if self.done {
            return Poll::Ready(None);
        }
        match Pin::new(&mut self.inner).poll_frame(cx) {
            Poll::Ready(Some(Ok(frame))) => {
                if let Some(t) = frame.trailers_ref() {
                    let code = grpc::status_label(t);
                    self.finish(code);
                }
                Poll::Ready(Some(Ok(frame)))
            }
            Poll::Ready(Some(Err(e))) => {
                self.finish(Some(Code::Unavailable.name()));
                Poll::Ready(Some(Err(Box::new(e))))
            }
            Poll::Ready(None) => {
                // Trailers-only answers keep the code set from their headers.
                self.finish(None);
                Poll::Ready(None)
            }
            Poll::Pending => {
                if self.deadline.as_mut().poll(cx).is_ready() {
                    // Headers are out already: end the call with a status in trailers.
                    self.finish(Some(Code::DeadlineExceeded.name()));
                    let mut t = HeaderMap::new();
                    t.insert(
                        "grpc-status",
                        HeaderValue::from(Code::DeadlineExceeded as u16),
                    );
                    t.insert(
                        "grpc-message",
                        HeaderValue::from_static(
                            "the router's upstream deadline passed while the cell was sending the response; it may have been applied",
                        ),
                    );
                    return Poll::Ready(Some(Ok(Frame::trailers(t))));
                }
                Poll::Pending
            }
        }
    }

    fn is_end_stream(&self) -> bool {
        self.done || self.inner.is_end_stream()
    }

    fn size_hint(&self) -> SizeHint {
        self.inner.size_hint()
    }
}
