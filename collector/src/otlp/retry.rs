//! Which failed exports are tried again, and when, as the OTLP specification's "Failures"
//! and "Throttling" sections say for each transport. gRPC: a fixed set of codes is
//! retryable; `RESOURCE_EXHAUSTED` only when the collector says it will recover (a
//! `google.rpc.RetryInfo` in the status details); a `retry_delay` there is the wait before the
//! next try. HTTP: 429, 502, 503 and 504 are retryable, a `Retry-After` is the wait. A
//! collector that cannot be reached or does not answer in time is retried on both. Otherwise
//! the wait grows exponentially, with jitter, so that requests that failed together in an
//! outage do not all come back in the same instant.
//!
//! The backoff is a few lines here rather than `backon` or `backoff`: their loops own the
//! retry, and this one must let the collector's `retry_delay` replace a step and stop at the
//! export's deadline rather than after a number of tries.

use std::{future::Future, time::Duration};

use tokio::time::Instant;
use tonic::{Code, Status};
use tonic_types::StatusExt as _;

/// Why an export try failed.
#[derive(Debug, thiserror::Error)]
pub(crate) enum ExportError {
    #[error("{}: {}", .0.code(), .0.message())]
    Grpc(Status),
    #[error("HTTP {status}: {message}")]
    Http {
        status: http::StatusCode,
        retry_after: Option<Duration>,
        message: String,
    },
    #[error("collector not reachable: {0}")]
    Unreachable(String),
    #[error("no answer within {0:?}")]
    NoAnswer(Duration),
    #[error("the export's retry timeout ran out")]
    RetryTimeout,
}

impl From<Status> for ExportError {
    fn from(status: Status) -> Self {
        Self::Grpc(status)
    }
}

/// What to do after a failed try.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) enum Verdict {
    /// Drop the data: trying again cannot help.
    Fail,
    /// Try again, after the collector's delay if it named one, else after the backoff.
    Retry(Option<Duration>),
}

pub(crate) fn classify(err: &ExportError) -> Verdict {
    match err {
        ExportError::Grpc(status) => classify_grpc(status),
        ExportError::Http {
            status, retry_after, ..
        } => match status.as_u16() {
            429 | 502 | 503 | 504 => Verdict::Retry(*retry_after),
            _ => Verdict::Fail,
        },
        ExportError::Unreachable(_) | ExportError::NoAnswer(_) => Verdict::Retry(None),
        ExportError::RetryTimeout => Verdict::Fail,
    }
}

fn classify_grpc(status: &Status) -> Verdict {
    let retry_info = status.get_details_retry_info();
    let delay = retry_info
        .as_ref()
        .and_then(|info| info.retry_delay)
        .filter(|d| !d.is_zero());
    match status.code() {
        Code::Cancelled
        | Code::DeadlineExceeded
        | Code::Aborted
        | Code::OutOfRange
        | Code::Unavailable
        | Code::DataLoss => Verdict::Retry(delay),
        // The collector is out of something (memory, a quota); without RetryInfo it does not
        // expect to recover, and the same data would be refused again.
        Code::ResourceExhausted if retry_info.is_some() => Verdict::Retry(delay),
        _ => Verdict::Fail,
    }
}

const BACKOFF_START: Duration = Duration::from_millis(100);
const BACKOFF_MAX: Duration = Duration::from_secs(5);

/// Exponential backoff, 100 ms doubling to 5 s, each wait drawn from the upper half of its
/// step: never less than half the step (a collector that is down is not hammered), and
/// spread enough that simultaneous failures retry apart.
pub(crate) struct Backoff {
    step: Duration,
}

impl Default for Backoff {
    fn default() -> Self {
        Self { step: BACKOFF_START }
    }
}

impl Backoff {
    pub(crate) fn next_delay(&mut self) -> Duration {
        let step = self.step;
        self.step = (step * 2).min(BACKOFF_MAX);
        let half = step / 2;
        half + half.mul_f64(fastrand::f64())
    }
}

/// Runs `try_once` until it succeeds, fails for good, or the next try would start after
/// `deadline`; the last try is cut off at the deadline too. Returns the last failure.
pub(crate) async fn with_retry<T, F, Fut>(deadline: Instant, mut try_once: F) -> Result<T, ExportError>
where
    F: FnMut() -> Fut,
    Fut: Future<Output = Result<T, ExportError>>,
{
    let mut backoff = Backoff::default();
    loop {
        let err = match tokio::time::timeout_at(deadline, try_once()).await {
            Ok(Ok(done)) => return Ok(done),
            Ok(Err(err)) => err,
            Err(_) => return Err(ExportError::RetryTimeout),
        };
        let delay = match classify(&err) {
            Verdict::Fail => return Err(err),
            Verdict::Retry(Some(asked)) => asked,
            Verdict::Retry(None) => backoff.next_delay(),
        };
        if Instant::now() + delay > deadline {
            return Err(err);
        }
        tracing::debug!("OTLP export failed ({err}); retrying in {delay:?}");
        tokio::time::sleep(delay).await;
    }
}

#[cfg(test)]
mod tests {
    use tonic_types::{ErrorDetails, StatusExt};

    use super::*;

    fn with_retry_info(code: Code, delay: Option<Duration>) -> Status {
        Status::with_error_details(code, "busy", ErrorDetails::with_retry_info(delay))
    }

    fn with_retry_info_err(code: Code, delay: Option<Duration>) -> ExportError {
        with_retry_info(code, delay).into()
    }

    fn code(err: ExportError) -> Code {
        match err {
            ExportError::Grpc(status) => status.code(),
            other => panic!("not a gRPC status: {other}"),
        }
    }

    #[test]
    fn unreachable_and_unanswered_are_retried() {
        let retried = [
            ExportError::Unreachable("connection refused".into()),
            ExportError::NoAnswer(Duration::from_secs(10)),
        ];
        for err in retried {
            assert_eq!(classify(&err), Verdict::Retry(None), "{err}");
        }
        assert_eq!(classify(&ExportError::RetryTimeout), Verdict::Fail);
    }

    #[test]
    fn each_code_as_the_specification_lists_it() {
        let retryable = [
            Code::Cancelled,
            Code::DeadlineExceeded,
            Code::Aborted,
            Code::OutOfRange,
            Code::Unavailable,
            Code::DataLoss,
        ];
        let not_retryable = [
            Code::Unknown,
            Code::InvalidArgument,
            Code::NotFound,
            Code::AlreadyExists,
            Code::PermissionDenied,
            Code::Unauthenticated,
            Code::ResourceExhausted,
            Code::FailedPrecondition,
            Code::Unimplemented,
            Code::Internal,
        ];
        for code in retryable {
            assert_eq!(
                classify(&Status::new(code, "x").into()),
                Verdict::Retry(None),
                "{code:?}"
            );
        }
        for code in not_retryable {
            assert_eq!(
                classify(&Status::new(code, "x").into()),
                Verdict::Fail,
                "{code:?}"
            );
        }
        assert_eq!(retryable.len() + not_retryable.len(), 16, "every code but OK");
    }

    #[test]
    fn resource_exhausted_only_with_retry_info() {
        let delay = Duration::from_millis(1500);
        assert_eq!(
            classify(&with_retry_info_err(Code::ResourceExhausted, Some(delay))),
            Verdict::Retry(Some(delay))
        );
        // RetryInfo without a delay still says the collector will recover: back off.
        assert_eq!(
            classify(&with_retry_info_err(Code::ResourceExhausted, None)),
            Verdict::Retry(None)
        );
        assert_eq!(
            classify(&Status::resource_exhausted("quota").into()),
            Verdict::Fail
        );
    }

    #[test]
    fn throttling_delay_is_honoured() {
        let delay = Duration::from_secs(3);
        assert_eq!(
            classify(&with_retry_info_err(Code::Unavailable, Some(delay))),
            Verdict::Retry(Some(delay))
        );
        // A RetryInfo does not make a permanent failure retryable.
        assert_eq!(
            classify(&with_retry_info_err(Code::InvalidArgument, Some(delay))),
            Verdict::Fail
        );
    }

    #[test]
    fn backoff_grows_with_jitter() {
        let mut backoff = Backoff::default();
        let mut step = BACKOFF_START;
        for _ in 0..10 {
            let delay = backoff.next_delay();
            assert!(delay >= step / 2 && delay <= step, "{delay:?} outside {step:?}");
            step = (step * 2).min(BACKOFF_MAX);
        }
        // Two requests that failed together wait different times.
        let delays: std::collections::HashSet<Duration> =
            (0..8).map(|_| Backoff::default().next_delay()).collect();
        assert!(delays.len() > 1, "{delays:?}");
    }

    #[tokio::test]
    async fn retries_until_success_after_the_named_delay() {
        let named = Duration::from_millis(300);
        let started = Instant::now();
        let mut tries = 0;
        let result = with_retry(started + Duration::from_secs(60), || {
            tries += 1;
            let n = tries;
            async move {
                match n {
                    1 => Err(with_retry_info_err(Code::ResourceExhausted, Some(named))),
                    2 => Err(Status::unavailable("down").into()),
                    _ => Ok(n),
                }
            }
        })
        .await;
        assert_eq!(result.unwrap(), 3);
        // The named delay, then the first backoff step (50 to 100 ms).
        let waited = started.elapsed();
        assert!(waited >= named + BACKOFF_START / 2, "{waited:?}");
        assert!(waited < Duration::from_secs(5), "{waited:?}");
    }

    #[tokio::test]
    async fn gives_up_at_the_deadline_or_on_a_permanent_failure() {
        let started = Instant::now();
        let deadline = started + Duration::from_millis(400);
        let result: Result<(), _> =
            with_retry(deadline, || async { Err(Status::unavailable("down").into()) }).await;
        assert_eq!(code(result.unwrap_err()), Code::Unavailable);
        assert!(Instant::now() <= deadline, "slept past the deadline");
        // A try still running at the deadline is cut off.
        let result: Result<(), _> = with_retry(Instant::now() + Duration::from_millis(100), || {
            std::future::pending()
        })
        .await;
        assert!(matches!(result, Err(ExportError::RetryTimeout)), "{result:?}");
        // A delay the deadline cannot fit is not waited for.
        let started = Instant::now();
        let result: Result<(), _> = with_retry(started + Duration::from_secs(60), || async {
            Err(with_retry_info_err(
                Code::Unavailable,
                Some(Duration::from_secs(600)),
            ))
        })
        .await;
        assert_eq!(code(result.unwrap_err()), Code::Unavailable);
        assert!(started.elapsed() < Duration::from_secs(1));
        let mut tries = 0;
        let result: Result<(), _> = with_retry(started + Duration::from_secs(60), || {
            tries += 1;
            async { Err(Status::invalid_argument("bad").into()) }
        })
        .await;
        assert_eq!(code(result.unwrap_err()), Code::InvalidArgument);
        assert_eq!(tries, 1);
    }
}
