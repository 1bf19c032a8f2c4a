//! The command lines: `mock-ssgm serve`'s flags, the client's SSGM-style options (parsed
//! into a [`Request`]) and the `--help` text.

use crate::fault::Fault;
use crate::wire::Request;

/// `mock-ssgm --help`.
pub(crate) const USAGE: &str = "\
mock-ssgm: a stand-in for the rCUDA scheduler and its SSGM client

Server:
  mock-ssgm serve [--listen ADDR] [--gpus N] [--hosts H1,H2,...]
      Holds N GPUs (default 2); GPU i lives on host H[i % len] (default
      127.0.0.1) as device number i / len there. Prints one line
      `listening on IP:PORT` to stdout, then logs to stderr, until SIGTERM or
      SIGINT. ADDR defaults to 127.0.0.1:0 (any free port).

Client (SSGM's command line; options in any order):
  mock-ssgm -S HOST -P PORT -alloc -g N
      Prints the reply and exits 0, whatever the answer:
        SSGM_ERROR=0;SSGM_JOB=ID;RCUDA_DEVICE_COUNT=N;RCUDA_DEVICE_0=HOST:GPU;...;
        SSGM_ERROR=2;                  (busy: not enough free GPUs)
        SSGM_ERROR=1;SSGM_MSG=...;     (N is 0, not a number, or more than exist)
  mock-ssgm -S HOST -P PORT -dealloc -j ID
      Exits 0 once released, 1 for an unknown ID.
  mock-ssgm -S HOST -P PORT -top
      Live allocations, after a header: JOB GPUS DEVICES AGE_S
  mock-ssgm -S HOST -P PORT -stats
      Counters as one JSON line.
  mock-ssgm -S HOST -P PORT -inject KIND [-n K]
      Applies a fault to the next K (default 1) matching calls:
        busy             allocs answer SSGM_ERROR=2, even with free GPUs
        error            allocs answer SSGM_ERROR=1
        garbage          allocs print a crash message and exit 0
        empty            allocs print nothing and exit 0
        exit             allocs print a granted-looking reply, exit 1, allocate nothing
        hang             allocs hang without printing, allocate nothing
        grant-then-hang  allocs allocate (if they can), then hang without printing
        print-then-hang  allocs allocate (if they can), print the reply, then hang
        kill-parent-after-grant
                         allocs allocate (if they can), print the reply, send
                         SIGKILL to the client's parent process, then exit 0
        kill-parent-then-hang
                         like kill-parent-after-grant, then hang instead of
                         exiting (an orphaned client holding a grant)
        fail-release     deallocs exit 1 and release nothing
        clear            removes every pending fault
  mock-ssgm -S HOST -P PORT -reset
      Frees every allocation and clears counters and faults (job ids keep
      increasing, so an old id never names a new job).

Stats: `granted` counts allocations made, `busy` and `request_errors` count
replies of that kind (injected or not), `alloc_calls` and `dealloc_calls`
count every request seen, `released` counts releases made, `failed_releases`
counts deallocs that exited 1, and `faults_injected` counts calls a fault was
applied to.

The three faults that print apply to whatever the scheduler answers (a grant
when enough GPUs are free, busy otherwise); they flush stdout before hanging or
signalling. The parent is the one the client started under; if it has already
gone (the client was re-parented), no signal is sent.

Exit codes: 0 done, 1 scheduler unreachable or request refused, 2 usage error.
";

/// The client's command line, in SSGM's single-dash style.
#[derive(Debug)]
pub(crate) struct ClientArgs {
    pub(crate) host: String,
    pub(crate) port: u16,
    pub(crate) request: Request,
}

impl ClientArgs {
    pub(crate) fn parse(args: &[String]) -> Result<Self, String> {
        let mut host = None;
        let mut port = None;
        let mut gpus = None;
        let mut job = None;
        let mut count = None;
        let mut action: Option<(&str, Option<String>)> = None;
        let mut it = args.iter();
        while let Some(arg) = it.next() {
            let mut value = || {
                it.next()
                    .cloned()
                    .ok_or_else(|| format!("option {arg} needs a value"))
            };
            match arg.as_str() {
                "-S" => host = Some(value()?),
                "-P" => {
                    let v = value()?;
                    port = Some(v.parse::<u16>().map_err(|_| format!("bad port {v:?}"))?);
                }
                "-g" => gpus = Some(value()?),
                "-j" => job = Some(value()?),
                "-n" => {
                    let v = value()?;
                    count =
                        Some(v.parse::<u32>().ok().filter(|&n| n > 0).ok_or_else(|| {
                            format!("bad count {v:?}, expected a positive number")
                        })?);
                }
                a @ ("-alloc" | "-dealloc" | "-top" | "-stats" | "-reset" | "-inject") => {
                    let kind = if a == "-inject" { Some(value()?) } else { None };
                    if let Some((previous, _)) = action {
                        return Err(format!("{previous} and {a} cannot be combined"));
                    }
                    action = Some((a, kind));
                }
                other => return Err(format!("unknown option {other:?}")),
            }
        }
        let host = host.ok_or("missing -S HOST")?;
        let port = port.ok_or("missing -P PORT")?;
        let (action, kind) =
            action.ok_or("missing action: -alloc, -dealloc, -top, -stats, -inject or -reset")?;
        let unused = |name: &str, set: bool| {
            if set {
                Err(format!("{name} does not go with {action}"))
            } else {
                Ok(())
            }
        };
        unused("-g", gpus.is_some() && action != "-alloc")?;
        unused("-j", job.is_some() && action != "-dealloc")?;
        unused("-n", count.is_some() && action != "-inject")?;
        let request = match action {
            "-alloc" => Request::Alloc {
                gpus: gpus.ok_or("-alloc needs -g N")?,
            },
            "-dealloc" => Request::Dealloc {
                job: job.ok_or("-dealloc needs -j ID")?,
            },
            "-top" => Request::Top,
            "-stats" => Request::Stats,
            "-reset" => Request::Reset,
            _ => {
                let kind = kind.expect("-inject always takes its value");
                if kind == "clear" {
                    unused("-n", count.is_some())?;
                    Request::ClearFaults
                } else {
                    let fault = Fault::parse(&kind)
                        .ok_or_else(|| format!("unknown fault {kind:?}, see `mock-ssgm --help`"))?;
                    Request::Inject {
                        fault,
                        count: count.unwrap_or(1),
                    }
                }
            }
        };
        Ok(Self {
            host,
            port,
            request,
        })
    }
}

/// The server's command line.
#[derive(Debug)]
pub(crate) struct ServeArgs {
    pub(crate) listen: String,
    pub(crate) gpus: usize,
    pub(crate) hosts: Vec<String>,
}

impl ServeArgs {
    pub(crate) fn parse(args: &[String]) -> Result<Self, String> {
        let mut listen = "127.0.0.1:0".to_owned();
        let mut gpus = 2;
        let mut hosts = vec!["127.0.0.1".to_owned()];
        let mut it = args.iter();
        while let Some(arg) = it.next() {
            let (flag, inline) = match arg.split_once('=') {
                Some((f, v)) if f.starts_with("--") => (f, Some(v.to_owned())),
                _ => (arg.as_str(), None),
            };
            let mut value = || {
                inline
                    .clone()
                    .or_else(|| it.next().cloned())
                    .ok_or_else(|| format!("option {flag} needs a value"))
            };
            match flag {
                "--listen" => listen = value()?,
                "--gpus" => {
                    let v = value()?;
                    gpus = v
                        .parse::<usize>()
                        .ok()
                        .filter(|&n| (1..=1024).contains(&n))
                        .ok_or_else(|| format!("bad --gpus {v:?}, expected 1..=1024"))?;
                }
                "--hosts" => {
                    let v = value()?;
                    hosts = v.split(',').map(|h| h.trim().to_owned()).collect();
                    if hosts.iter().any(|h| h.is_empty() || h.contains([';', '='])) {
                        return Err(format!("bad --hosts {v:?}"));
                    }
                }
                other => return Err(format!("unknown serve option {other:?}")),
            }
        }
        Ok(Self {
            listen,
            gpus,
            hosts,
        })
    }
}

#[cfg(test)]
pub(crate) mod tests {
    use super::*;

    /// A command line split on white space, as a shell would pass it.
    pub(crate) fn args(s: &str) -> Vec<String> {
        s.split_whitespace().map(str::to_owned).collect()
    }

    #[test]
    fn client_options_in_any_order() {
        let a = ClientArgs::parse(&args("-g 2 -alloc -P 99 -S h")).expect("valid");
        assert_eq!((a.host.as_str(), a.port), ("h", 99));
        assert!(matches!(a.request, Request::Alloc { gpus } if gpus == "2"));
        let a = ClientArgs::parse(&args("-S h -P 1 -inject busy -n 3")).expect("valid");
        assert!(matches!(
            a.request,
            Request::Inject {
                fault: Fault::Busy,
                count: 3
            }
        ));
        let a = ClientArgs::parse(&args("-S h -P 1 -inject clear")).expect("valid");
        assert!(matches!(a.request, Request::ClearFaults));
    }

    #[test]
    fn client_usage_errors() {
        for bad in [
            "",
            "-S h -P 1",
            "-S h -alloc -g 1",
            "-S h -P x -alloc -g 1",
            "-S h -P 1 -alloc",
            "-S h -P 1 -alloc -g 1 -dealloc -j 1",
            "-S h -P 1 -dealloc -j 1 -g 1",
            "-S h -P 1 -inject sometimes",
            "-S h -P 1 -inject busy -n 0",
            "-S h -P 1 -top -x",
            "-S h -P 1 -alloc -g",
        ] {
            assert!(ClientArgs::parse(&args(bad)).is_err(), "{bad:?} accepted");
        }
    }
}
