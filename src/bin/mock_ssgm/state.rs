//! The scheduler's books: which job holds which GPU, the live allocations, the
//! counters, and how each request changes them.

use std::collections::{BTreeMap, VecDeque};
use std::time::Instant;

use serde::Serialize;

use crate::fault::Fault;
use crate::wire::{Reply, Request};

/// One live allocation.
#[derive(Debug)]
pub(crate) struct Allocation {
    pub(crate) gpus: Vec<usize>,
    pub(crate) since: Instant,
}

/// Counters reported by `-stats`, cleared by `-reset`.
#[derive(Debug, Default, Clone, Copy, Serialize)]
pub(crate) struct Counters {
    max_live: usize,
    max_gpus_in_use: usize,
    pub(crate) alloc_calls: u64,
    pub(crate) granted: u64,
    pub(crate) busy: u64,
    pub(crate) request_errors: u64,
    dealloc_calls: u64,
    released: u64,
    failed_releases: u64,
    pub(crate) faults_injected: u64,
}

/// Everything the scheduler knows.
#[derive(Debug)]
pub(crate) struct State {
    hosts: Vec<String>,
    /// The job holding each GPU, if any.
    pub(crate) owners: Vec<Option<u64>>,
    pub(crate) allocations: BTreeMap<u64, Allocation>,
    pub(crate) next_job: u64,
    pub(crate) counters: Counters,
    /// Pending alloc faults, oldest first, with the calls each has left.
    pub(crate) alloc_faults: VecDeque<(Fault, u32)>,
    /// Dealloc calls still to fail.
    release_faults: u32,
}

impl State {
    /// `gpus` free GPUs spread over `hosts`, no job yet.
    pub(crate) fn new(gpus: usize, hosts: Vec<String>) -> Self {
        Self {
            hosts,
            owners: vec![None; gpus],
            allocations: BTreeMap::new(),
            next_job: 1,
            counters: Counters::default(),
            alloc_faults: VecDeque::new(),
            release_faults: 0,
        }
    }

    /// Answers one request, changing the books as it says.
    pub(crate) fn apply(&mut self, request: Request) -> Reply {
        match request {
            Request::Alloc { gpus } => self.alloc(&gpus),
            Request::Dealloc { job } => self.dealloc(&job),
            Request::Top => Reply::print(self.top()),
            Request::Stats => {
                let line =
                    serde_json::to_string(&self.stats()).expect("plain counters always serialise");
                Reply::print(format!("{line}\n"))
            }
            Request::Inject { fault, count } => {
                if fault == Fault::FailRelease {
                    self.release_faults = self.release_faults.saturating_add(count);
                } else {
                    self.alloc_faults.push_back((fault, count));
                }
                eprintln!(
                    "mock-ssgm: fault {} armed for {count} call(s)",
                    fault.name()
                );
                Reply::print(format!(
                    "injected {} for the next {count} call(s)\n",
                    fault.name()
                ))
            }
            Request::ClearFaults => {
                self.alloc_faults.clear();
                self.release_faults = 0;
                eprintln!("mock-ssgm: faults cleared");
                Reply::print("faults cleared\n")
            }
            Request::Reset => {
                self.owners.fill(None);
                self.allocations.clear();
                self.counters = Counters::default();
                self.alloc_faults.clear();
                self.release_faults = 0;
                eprintln!("mock-ssgm: reset");
                Reply::print("reset\n")
            }
        }
    }

    /// An alloc call answered as the scheduler would: a request error, busy, or a grant.
    pub(crate) fn alloc_for_real(&mut self, wanted: Option<usize>, raw_gpus: &str) -> Reply {
        let total = self.owners.len();
        let n = match wanted {
            Some(n) if (1..=total).contains(&n) => n,
            _ => {
                self.counters.request_errors += 1;
                eprintln!("mock-ssgm: alloc -g {raw_gpus}: request error");
                let msg = match wanted {
                    None => "bad GPU count".to_owned(),
                    Some(0) => "at least one GPU is needed".to_owned(),
                    Some(n) => format!("requested {n} GPUs but the scheduler has {total}"),
                };
                return Reply::print(format!("SSGM_ERROR=1;SSGM_MSG={msg};\n"));
            }
        };
        let free: Vec<usize> = (0..total).filter(|&i| self.owners[i].is_none()).collect();
        if free.len() < n {
            self.counters.busy += 1;
            eprintln!(
                "mock-ssgm: alloc -g {n}: busy ({} of {total} free)",
                free.len()
            );
            return Reply::print("SSGM_ERROR=2;\n");
        }
        let job = self.next_job;
        self.next_job += 1;
        let gpus = free[..n].to_vec();
        for &g in &gpus {
            self.owners[g] = Some(job);
        }
        let line = self.grant_line(job, &gpus);
        self.allocations.insert(
            job,
            Allocation {
                gpus,
                since: Instant::now(),
            },
        );
        let c = &mut self.counters;
        c.granted += 1;
        c.max_live = c.max_live.max(self.allocations.len());
        let in_use = self.owners.iter().filter(|o| o.is_some()).count();
        c.max_gpus_in_use = c.max_gpus_in_use.max(in_use);
        eprintln!("mock-ssgm: granted job {job}: {}", line.trim_end());
        Reply::print(line)
    }

    /// A dealloc call: releases job `job`'s GPUs, unless a release fault is pending.
    fn dealloc(&mut self, job: &str) -> Reply {
        self.counters.dealloc_calls += 1;
        if self.release_faults > 0 {
            self.release_faults -= 1;
            self.counters.faults_injected += 1;
            self.counters.failed_releases += 1;
            eprintln!("mock-ssgm: dealloc -j {job}: applying fault fail-release");
            return Reply::fail(format!("mock-ssgm: injected failure releasing job {job}\n"));
        }
        let id = job.trim().parse::<u64>().ok();
        let Some(allocation) = id.and_then(|id| self.allocations.remove(&id)) else {
            self.counters.failed_releases += 1;
            eprintln!("mock-ssgm: dealloc -j {job}: unknown job");
            return Reply::fail(format!("mock-ssgm: unknown job {job:?}\n"));
        };
        for &g in &allocation.gpus {
            self.owners[g] = None;
        }
        self.counters.released += 1;
        eprintln!(
            "mock-ssgm: released job {job} ({} GPU(s))",
            allocation.gpus.len()
        );
        Reply::default()
    }

    /// `SSGM_ERROR=0;SSGM_JOB=<job>;RCUDA_DEVICE_COUNT=<n>;RCUDA_DEVICE_<i>=<host>:<gpu>;...;`
    pub(crate) fn grant_line(&self, job: u64, gpus: &[usize]) -> String {
        let mut line = format!(
            "SSGM_ERROR=0;SSGM_JOB={job};RCUDA_DEVICE_COUNT={};",
            gpus.len()
        );
        for (i, &g) in gpus.iter().enumerate() {
            line.push_str(&format!("RCUDA_DEVICE_{i}={};", self.device(g)));
        }
        line.push('\n');
        line
    }

    /// GPU `g` lives on host `g % hosts` as that host's device `g / hosts`.
    pub(crate) fn device(&self, g: usize) -> String {
        let hosts = self.hosts.len();
        format!("{}:{}", self.hosts[g % hosts], g / hosts)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn devices_spread_over_hosts() {
        let mut s = State::new(4, vec!["a".to_owned(), "b".to_owned()]);
        let r = s.alloc("3");
        assert_eq!(
            r.stdout,
            "SSGM_ERROR=0;SSGM_JOB=1;RCUDA_DEVICE_COUNT=3;\
             RCUDA_DEVICE_0=a:0;RCUDA_DEVICE_1=b:0;RCUDA_DEVICE_2=a:1;\n"
        );
        assert_eq!(s.alloc("2").stdout, "SSGM_ERROR=2;\n");
        assert_eq!(s.dealloc("1").exit, 0);
        assert_eq!(s.dealloc("1").exit, 1);
    }

    #[test]
    fn bad_counts_are_request_errors() {
        let mut s = State::new(2, vec!["h".to_owned()]);
        for bad in ["0", "3", "two", "-1", ""] {
            assert!(
                s.alloc(bad).stdout.starts_with("SSGM_ERROR=1;SSGM_MSG="),
                "{bad:?}"
            );
        }
        assert_eq!(s.counters.request_errors, 5);
    }
}
