//! What a person or a test sees inside the server: the `-top` table of live
//! allocations and the `-stats` line.

use serde::Serialize;

use crate::state::{Counters, State};

/// The `-stats` line: the allocation state now, then the counters.
#[derive(Debug, Serialize)]
pub(crate) struct Stats {
    total_gpus: usize,
    free_gpus: usize,
    live: usize,
    #[serde(flatten)]
    counters: Counters,
}

impl State {
    /// The `-top` table: a header, then one line per live allocation.
    pub(crate) fn top(&self) -> String {
        let mut out = String::from("JOB GPUS DEVICES AGE_S\n");
        for (job, allocation) in &self.allocations {
            let devices: Vec<String> = allocation.gpus.iter().map(|&g| self.device(g)).collect();
            out.push_str(&format!(
                "{job} {} {} {}\n",
                allocation.gpus.len(),
                devices.join(","),
                allocation.since.elapsed().as_secs()
            ));
        }
        out
    }

    /// The `-stats` line's content.
    pub(crate) fn stats(&self) -> Stats {
        Stats {
            total_gpus: self.owners.len(),
            free_gpus: self.owners.iter().filter(|o| o.is_none()).count(),
            live: self.allocations.len(),
            counters: self.counters,
        }
    }
}
