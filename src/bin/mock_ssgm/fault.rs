//! The faults a test injects (`-inject KIND`): their names, and how an alloc call
//! carries out the next pending one.

use serde::{Deserialize, Serialize};

use crate::state::State;
use crate::wire::Reply;

/// A misbehaviour the server applies to upcoming calls.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub(crate) enum Fault {
    Busy,
    Error,
    Garbage,
    Empty,
    Exit,
    Hang,
    GrantThenHang,
    PrintThenHang,
    KillParentAfterGrant,
    KillParentThenHang,
    FailRelease,
}

impl Fault {
    /// The fault named `s` on the command line.
    pub(crate) fn parse(s: &str) -> Option<Self> {
        Some(match s {
            "busy" => Self::Busy,
            "error" => Self::Error,
            "garbage" => Self::Garbage,
            "empty" => Self::Empty,
            "exit" => Self::Exit,
            "hang" => Self::Hang,
            "grant-then-hang" => Self::GrantThenHang,
            "print-then-hang" => Self::PrintThenHang,
            "kill-parent-after-grant" => Self::KillParentAfterGrant,
            "kill-parent-then-hang" => Self::KillParentThenHang,
            "fail-release" => Self::FailRelease,
            _ => return None,
        })
    }

    /// Its name on the command line and on the wire.
    pub(crate) fn name(self) -> &'static str {
        match self {
            Self::Busy => "busy",
            Self::Error => "error",
            Self::Garbage => "garbage",
            Self::Empty => "empty",
            Self::Exit => "exit",
            Self::Hang => "hang",
            Self::GrantThenHang => "grant-then-hang",
            Self::PrintThenHang => "print-then-hang",
            Self::KillParentAfterGrant => "kill-parent-after-grant",
            Self::KillParentThenHang => "kill-parent-then-hang",
            Self::FailRelease => "fail-release",
        }
    }
}

impl State {
    /// An alloc call: the next pending fault is carried out if there is one, else the
    /// call is answered for real.
    pub(crate) fn alloc(&mut self, raw_gpus: &str) -> Reply {
        self.counters.alloc_calls += 1;
        let wanted = raw_gpus.trim().parse::<usize>().ok();
        let Some(fault) = self.take_alloc_fault() else {
            return self.alloc_for_real(wanted, raw_gpus);
        };
        self.counters.faults_injected += 1;
        eprintln!(
            "mock-ssgm: alloc -g {raw_gpus}: applying fault {}",
            fault.name()
        );
        match fault {
            Fault::Busy => {
                self.counters.busy += 1;
                Reply::print("SSGM_ERROR=2;\n")
            }
            Fault::Error => {
                self.counters.request_errors += 1;
                Reply::print("SSGM_ERROR=1;SSGM_MSG=injected request error;\n")
            }
            Fault::Garbage => Reply::print("Segmentation fault (core dumped)\n"),
            Fault::Empty => Reply::print(""),
            Fault::Exit => {
                // Looks like a grant but nothing is held: the id names no job.
                let job = self.next_job;
                self.next_job += 1;
                let n = wanted.filter(|&n| n > 0).unwrap_or(1);
                let gpus: Vec<usize> = (0..n).collect();
                Reply {
                    stdout: self.grant_line(job, &gpus),
                    stderr: "mock-ssgm: injected failure after printing\n".to_owned(),
                    exit: 1,
                    hang: false,
                    kill_parent: false,
                }
            }
            Fault::Hang => Reply {
                hang: true,
                ..Reply::default()
            },
            Fault::GrantThenHang => {
                // Allocate as usual (if possible), then withhold the reply.
                let _ = self.alloc_for_real(wanted, raw_gpus);
                Reply {
                    hang: true,
                    ..Reply::default()
                }
            }
            Fault::PrintThenHang => Reply {
                hang: true,
                ..self.alloc_for_real(wanted, raw_gpus)
            },
            Fault::KillParentAfterGrant => Reply {
                kill_parent: true,
                ..self.alloc_for_real(wanted, raw_gpus)
            },
            Fault::KillParentThenHang => Reply {
                kill_parent: true,
                hang: true,
                ..self.alloc_for_real(wanted, raw_gpus)
            },
            Fault::FailRelease => unreachable!("release faults are not queued with alloc faults"),
        }
    }

    /// Takes one use of the oldest pending alloc fault.
    fn take_alloc_fault(&mut self) -> Option<Fault> {
        let (fault, left) = self.alloc_faults.front_mut()?;
        let fault = *fault;
        *left -= 1;
        if *left == 0 {
            self.alloc_faults.pop_front();
        }
        Some(fault)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::cli::ClientArgs;
    use crate::cli::tests::args;
    use crate::wire::Request;

    #[test]
    fn every_fault_parses_from_its_own_name() {
        for fault in [
            Fault::Busy,
            Fault::Error,
            Fault::Garbage,
            Fault::Empty,
            Fault::Exit,
            Fault::Hang,
            Fault::GrantThenHang,
            Fault::PrintThenHang,
            Fault::KillParentAfterGrant,
            Fault::KillParentThenHang,
            Fault::FailRelease,
        ] {
            assert_eq!(Fault::parse(fault.name()), Some(fault), "{}", fault.name());
            // The wire name is the command-line name.
            let wire = serde_json::to_string(&fault).expect("a unit variant serialises");
            assert_eq!(wire, format!("\"{}\"", fault.name()));
        }
        for (name, fault) in [
            ("print-then-hang", Fault::PrintThenHang),
            ("kill-parent-after-grant", Fault::KillParentAfterGrant),
            ("kill-parent-then-hang", Fault::KillParentThenHang),
        ] {
            let a =
                ClientArgs::parse(&args(&format!("-S h -P 1 -inject {name} -n 2"))).expect("valid");
            assert!(
                matches!(a.request, Request::Inject { fault: f, count: 2 } if f == fault),
                "{name}: {:?}",
                a.request
            );
        }
    }

    #[test]
    fn printing_faults_print_the_real_answer_and_count_as_faults() {
        let mut s = State::new(2, vec!["h".to_owned()]);
        for fault in [
            Fault::PrintThenHang,
            Fault::KillParentAfterGrant,
            Fault::KillParentThenHang,
        ] {
            s.apply(Request::Inject { fault, count: 1 });
        }
        let grant = "SSGM_ERROR=0;SSGM_JOB=1;RCUDA_DEVICE_COUNT=1;RCUDA_DEVICE_0=h:0;\n";
        let r = s.alloc("1");
        assert_eq!(
            (r.stdout.as_str(), r.hang, r.kill_parent),
            (grant, true, false)
        );
        let r = s.alloc("1");
        assert!(r.stdout.starts_with("SSGM_ERROR=0;SSGM_JOB=2;"), "{r:?}");
        assert_eq!((r.exit, r.hang, r.kill_parent), (0, false, true));
        // No GPU is left: the fault still applies, to a busy answer.
        let r = s.alloc("1");
        assert_eq!(
            (r.stdout.as_str(), r.hang, r.kill_parent),
            ("SSGM_ERROR=2;\n", true, true)
        );
        let c = s.counters;
        assert_eq!((c.faults_injected, c.granted, c.busy), (3, 2, 1));
        assert_eq!(s.allocations.len(), 2);
        // Used up: the next call is an ordinary one.
        let r = s.alloc("1");
        assert_eq!((r.hang, r.kill_parent), (false, false));
        assert_eq!(s.counters.faults_injected, 3);
    }
}
