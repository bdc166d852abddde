//! What `synspan-churn` reports: the clients it started, each with what the agent should show
//! of it.

use std::path::PathBuf;

use serde::{Deserialize, Serialize};

/// One short-lived client process.
#[derive(Clone, Debug, Default, Serialize, Deserialize)]
pub struct Client {
    pub pid: u32,
    /// Connect attempts it made: one or two.
    pub attempts: u32,
    /// Its `OTEL_SERVICE_NAME`, if it had one.
    pub service: Option<String>,
    /// The cgroup v2 directory it ran in, if not the launcher's.
    pub cgroup: Option<PathBuf>,
}

/// The line `synspan-churn` prints when every client has exited.
#[derive(Clone, Debug, Default, Serialize, Deserialize)]
pub struct ChurnReport {
    pub processes: u64,
    /// Attempts made by clients that exited 0, each as it expected.
    pub attempts: u64,
    /// Clients that exited otherwise (an attempt that ended unexpectedly, or a crash).
    pub failed: u64,
    pub seconds: f64,
    pub clients: Vec<Client>,
}

impl ChurnReport {
    /// Counts a reaped client; `ok`: it exited 0.
    pub fn finish(&mut self, client: Option<Client>, ok: bool) {
        let Some(client) = client else { return };
        self.processes += 1;
        if ok {
            self.attempts += u64::from(client.attempts);
        } else {
            self.failed += 1;
        }
        self.clients.push(client);
    }
}
