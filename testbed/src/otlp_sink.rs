//! `synspan-otlp-sink`, the benchmark's OTLP receiver (gRPC, or HTTP), as a child process: it
//! decodes every request and counts spans by `process.pid` (see its source for why not rotel
//! here). It can also push back the ways a collector does ([`Answer`]).

use std::{
    collections::BTreeMap,
    fmt,
    io::{BufRead, BufReader},
    path::PathBuf,
    process::{Child, Command, Stdio},
    str::FromStr,
    time::Duration,
};

use anyhow::{Context, bail};

/// How the sink answers trace export requests; metrics requests are always accepted. Written
/// on its command line as `accept`, `throttle:MS:N`, `exhausted`, `invalid`,
/// `unavailable:MS`, `slow:MS`, `silent:N` or `partial:N`.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Answer {
    Accept,
    /// `RESOURCE_EXHAUSTED` with a `RetryInfo` naming `delay`, to the first `requests`
    /// requests; the rest are accepted.
    Throttle {
        delay: Duration,
        requests: u32,
    },
    /// `RESOURCE_EXHAUSTED` without a `RetryInfo`, to every request.
    Exhausted,
    /// `INVALID_ARGUMENT`, to every request.
    Invalid,
    /// `UNAVAILABLE` until `outage` after the first request, then accept.
    Unavailable {
        outage: Duration,
    },
    /// Accept each request, `delay` after it arrived.
    Slow {
        delay: Duration,
    },
    /// Never answer the first `requests` requests (the connection stays open); accept the rest.
    Silent {
        requests: u32,
    },
    /// Accept each request, reporting up to `rejected` of its spans rejected (partial success).
    Partial {
        rejected: u32,
    },
}

impl fmt::Display for Answer {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Answer::Accept => write!(f, "accept"),
            Answer::Throttle { delay, requests } => write!(f, "throttle:{}:{requests}", delay.as_millis()),
            Answer::Exhausted => write!(f, "exhausted"),
            Answer::Invalid => write!(f, "invalid"),
            Answer::Unavailable { outage } => write!(f, "unavailable:{}", outage.as_millis()),
            Answer::Slow { delay } => write!(f, "slow:{}", delay.as_millis()),
            Answer::Silent { requests } => write!(f, "silent:{requests}"),
            Answer::Partial { rejected } => write!(f, "partial:{rejected}"),
        }
    }
}

impl FromStr for Answer {
    type Err = anyhow::Error;

    fn from_str(s: &str) -> anyhow::Result<Self> {
        let mut parts = s.split(':');
        let name = parts.next().unwrap_or_default();
        let mut number = |what: &str| -> anyhow::Result<u64> {
            let part = parts
                .next()
                .with_context(|| format!("`{s}`: {name} takes {what}"))?;
            part.parse().with_context(|| format!("`{s}`: {what} `{part}`"))
        };
        let answer = match name {
            "accept" => Answer::Accept,
            "throttle" => Answer::Throttle {
                delay: Duration::from_millis(number("a delay in ms")?),
                requests: u32::try_from(number("a request count")?)?,
            },
            "exhausted" => Answer::Exhausted,
            "invalid" => Answer::Invalid,
            "unavailable" => Answer::Unavailable {
                outage: Duration::from_millis(number("an outage in ms")?),
            },
            "slow" => Answer::Slow {
                delay: Duration::from_millis(number("a delay in ms")?),
            },
            "silent" => Answer::Silent {
                requests: u32::try_from(number("a request count")?)?,
            },
            "partial" => Answer::Partial {
                rejected: u32::try_from(number("a span count")?)?,
            },
            _ => bail!("`{s}`: not an answer the sink knows"),
        };
        if parts.next().is_some() {
            bail!("`{s}`: too many parts");
        }
        Ok(answer)
    }
}

use crate::workspace_bin;

/// What the sink has received since it started.
#[derive(Clone, Debug, Default, serde::Deserialize)]
pub struct SinkCounts {
    pub spans: u64,
    pub requests: u64,
    pub metric_requests: u64,
    pub by_pid: BTreeMap<i64, u64>,
    /// The `service.name` of the resource each pid's spans came under (the last one).
    #[serde(default)]
    pub service_of_pid: BTreeMap<i64, String>,
    /// Every span of every trace request, answered or not, retries included.
    #[serde(default)]
    pub received_spans: u64,
    /// Trace requests answered with an error.
    #[serde(default)]
    pub refused: u64,
    /// Trace requests never answered.
    #[serde(default)]
    pub unanswered: u64,
    /// Spans reported rejected in partial successes.
    #[serde(default)]
    pub rejected_spans: u64,
    /// When each trace request arrived, in ms after the first one (the first 1000).
    #[serde(default)]
    pub arrivals_ms: Vec<u64>,
    /// The last data point of every `synspan.connect.*` series received, by
    /// [`ConnectPoint::key`].
    #[serde(default)]
    pub connect: BTreeMap<String, ConnectPoint>,
}

/// One data point of synspan's connect metrics as the sink last received it, with every
/// exemplar the series carried in any request.
#[derive(Clone, Debug, Default, serde::Serialize, serde::Deserialize)]
pub struct ConnectPoint {
    pub metric: String,
    /// The resource's `service.name`.
    pub service: String,
    /// The data point's attributes, values as text.
    pub attributes: BTreeMap<String, String>,
    /// Counters: the value.
    pub value: i64,
    /// Histograms: count, sum, bounds and counts per bucket.
    pub count: u64,
    pub sum: f64,
    pub bounds: Vec<f64>,
    pub bucket_counts: Vec<u64>,
    pub exemplars: Vec<ConnectExemplar>,
}

#[derive(Clone, Debug, Default, serde::Serialize, serde::Deserialize)]
pub struct ConnectExemplar {
    pub trace_id: String,
    pub span_id: String,
    pub value: f64,
}

impl ConnectPoint {
    /// What names a series: metric, service and attributes.
    pub fn key(&self) -> String {
        let attrs: Vec<String> = self.attributes.iter().map(|(k, v)| format!("{k}={v}")).collect();
        format!("{}|{}|{}", self.metric, self.service, attrs.join(","))
    }

    pub fn attribute(&self, key: &str) -> Option<&str> {
        self.attributes.get(key).map(String::as_str)
    }
}

impl SinkCounts {
    pub fn of_pid(&self, pid: u32) -> u64 {
        self.by_pid.get(&i64::from(pid)).copied().unwrap_or(0)
    }

    /// The connect-metric points of `metric` whose attributes include all of `attrs`.
    pub fn connect_points(&self, metric: &str, attrs: &[(&str, &str)]) -> Vec<&ConnectPoint> {
        self.connect
            .values()
            .filter(|p| p.metric == metric && attrs.iter().all(|(k, v)| p.attribute(k) == Some(*v)))
            .collect()
    }
}

pub struct OtlpSink {
    child: Child,
    endpoint: String,
    counts: PathBuf,
}

impl OtlpSink {
    /// Starts a sink on a free port of this network namespace's 127.0.0.1.
    pub fn start() -> anyhow::Result<Self> {
        Self::start_answering(Answer::Accept)
    }

    /// Starts a sink that answers trace requests as `answer` says.
    pub fn start_answering(answer: Answer) -> anyhow::Result<Self> {
        Self::start_with(answer, "grpc")
    }

    /// Starts a sink that answers OTLP/HTTP (its endpoint is the base URL) as `answer` says.
    pub fn start_http(answer: Answer) -> anyhow::Result<Self> {
        Self::start_with(answer, "http")
    }

    fn start_with(answer: Answer, protocol: &str) -> anyhow::Result<Self> {
        // One file per sink: tests of one process run sinks side by side.
        static SINKS: std::sync::atomic::AtomicU32 = std::sync::atomic::AtomicU32::new(0);
        let n = SINKS.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
        let counts = std::env::temp_dir().join(format!("synspan-sink-{}-{n}.json", std::process::id()));
        let mut child = Command::new(workspace_bin("synspan-otlp-sink"))
            .arg("127.0.0.1:0")
            .arg(&counts)
            .arg(answer.to_string())
            .arg(protocol)
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .spawn()
            .context("starting synspan-otlp-sink")?;
        let mut line = String::new();
        let stdout = child.stdout.take().context("the sink's stdout")?;
        BufReader::new(stdout).read_line(&mut line)?;
        let Some(addr) = line.trim().strip_prefix("listening ") else {
            let _ = child.kill();
            let _ = child.wait();
            bail!("synspan-otlp-sink did not start (it said {line:?})");
        };
        Ok(Self {
            endpoint: format!("http://{addr}"),
            child,
            counts,
        })
    }

    pub fn endpoint(&self) -> &str {
        &self.endpoint
    }

    pub fn pid(&self) -> u32 {
        self.child.id()
    }

    pub fn counts(&self) -> anyhow::Result<SinkCounts> {
        let text = std::fs::read_to_string(&self.counts)
            .with_context(|| format!("reading {}", self.counts.display()))?;
        serde_json::from_str(&text).with_context(|| format!("parsing {}", self.counts.display()))
    }
}

impl Drop for OtlpSink {
    fn drop(&mut self) {
        // SAFETY: plain syscall on our own child's pid.
        unsafe { libc::kill(self.child.id() as i32, libc::SIGTERM) };
        if crate::wait_until(std::time::Duration::from_secs(5), || {
            self.child.try_wait().ok().flatten()
        })
        .is_none()
        {
            let _ = self.child.kill();
            let _ = self.child.wait();
        }
        let _ = std::fs::remove_file(&self.counts);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn answers_read_back_as_written() {
        let ms = Duration::from_millis;
        for answer in [
            Answer::Accept,
            Answer::Throttle {
                delay: ms(1500),
                requests: 2,
            },
            Answer::Exhausted,
            Answer::Invalid,
            Answer::Unavailable { outage: ms(5000) },
            Answer::Slow { delay: ms(2000) },
            Answer::Silent { requests: 1 },
            Answer::Partial { rejected: 3 },
        ] {
            assert_eq!(answer.to_string().parse::<Answer>().unwrap(), answer);
        }
        for bad in ["", "throttle:10", "slow:x", "accept:1", "silent:-1", "teapot"] {
            assert!(bad.parse::<Answer>().is_err(), "{bad}");
        }
    }
}
