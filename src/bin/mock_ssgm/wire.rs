//! The wire protocol between client and server: one JSON [`Request`] line per
//! connection, one JSON [`Reply`] line back, each capped at [`MAX_LINE`].

use serde::{Deserialize, Serialize};

use crate::fault::Fault;

/// Cap on one request or reply line, so a stray client cannot grow the server.
pub(crate) const MAX_LINE: u64 = 64 * 1024;

/// What a client asks, one JSON line per connection.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(tag = "op", rename_all = "kebab-case")]
pub(crate) enum Request {
    /// The GPU count is sent as typed so the server answers a bad one the way
    /// a scheduler would, with a request error.
    Alloc {
        gpus: String,
    },
    Dealloc {
        job: String,
    },
    Top,
    Stats,
    Inject {
        fault: Fault,
        count: u32,
    },
    ClearFaults,
    Reset,
}

/// What the client must do: print, then maybe SIGKILL its parent, then exit with a
/// code or hang.
#[derive(Debug, Clone, Default, Serialize, Deserialize)]
pub(crate) struct Reply {
    pub(crate) stdout: String,
    pub(crate) stderr: String,
    pub(crate) exit: u8,
    pub(crate) hang: bool,
    #[serde(default)]
    pub(crate) kill_parent: bool,
}

impl Reply {
    /// Print `stdout` and exit 0.
    pub(crate) fn print(stdout: impl Into<String>) -> Self {
        Self {
            stdout: stdout.into(),
            ..Self::default()
        }
    }

    /// Print `stderr` and exit 1.
    pub(crate) fn fail(stderr: impl Into<String>) -> Self {
        Self {
            stderr: stderr.into(),
            exit: 1,
            ..Self::default()
        }
    }
}
