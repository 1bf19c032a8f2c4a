//! `mock-ssgm`: a stand-in for the rCUDA scheduler and its SSGM client, for
//! local runs and tests.
//!
//! One binary, two roles:
//!
//! - `mock-ssgm serve` is the scheduler: it holds a fixed set of GPUs and the
//!   live allocations, counts every call and can be told to misbehave.
//! - Any other command line is the client, with SSGM's own options
//!   (`-S host -P port -alloc -g N`, `-dealloc -j ID`, ...), so orchgpu runs it
//!   exactly as it runs the real SSGM. Extra actions (`-top`, `-stats`,
//!   `-inject`, `-reset`) let a person or a test look inside and inject faults.
//!
//! The client sends one JSON request line over TCP and gets one JSON reply
//! line back, which says what to print, with which exit code, and whether to
//! hang. Faults that hang or misprint are therefore carried out by the client
//! process, the one orchgpu's timeout must kill, as with a real SSGM.
//!
//! This file is self-contained: it does not use the orchgpu library.

use std::collections::{BTreeMap, VecDeque};
use std::io::{BufRead, BufReader, Read, Write};
use std::net::{TcpStream, ToSocketAddrs};
use std::process::ExitCode;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use anyhow::{Context, Result, anyhow, bail};
use serde::{Deserialize, Serialize};
use tokio::io::{AsyncBufReadExt, AsyncReadExt, AsyncWriteExt};

const USAGE: &str = "\
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

/// Cap on one request or reply line, so a stray client cannot grow the server.
const MAX_LINE: u64 = 64 * 1024;

/// How long the client waits to connect, then for the reply.
const CONNECT_TIMEOUT: Duration = Duration::from_secs(5);
const REPLY_TIMEOUT: Duration = Duration::from_secs(30);

fn main() -> ExitCode {
    let args: Vec<String> = std::env::args().skip(1).collect();
    match args.first().map(String::as_str) {
        Some("--help" | "-h" | "-help" | "help") => {
            print!("{USAGE}");
            ExitCode::SUCCESS
        }
        Some("serve") => match ServeArgs::parse(&args[1..]) {
            Ok(serve_args) => match serve(serve_args) {
                Ok(()) => ExitCode::SUCCESS,
                Err(e) => {
                    eprintln!("mock-ssgm: {e:#}");
                    ExitCode::FAILURE
                }
            },
            Err(e) => usage_error(&e),
        },
        _ => match ClientArgs::parse(&args) {
            Ok(client_args) => client(client_args),
            Err(e) => usage_error(&e),
        },
    }
}

fn usage_error(message: &str) -> ExitCode {
    eprintln!("mock-ssgm: {message}\nTry `mock-ssgm --help`.");
    ExitCode::from(2)
}

// ---------------------------------------------------------------------------
// The wire protocol.

/// What a client asks, one JSON line per connection.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(tag = "op", rename_all = "kebab-case")]
enum Request {
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

/// A misbehaviour the server applies to upcoming calls.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
enum Fault {
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
    fn parse(s: &str) -> Option<Self> {
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

    fn name(self) -> &'static str {
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

/// What the client must do: print, then maybe SIGKILL its parent, then exit with a
/// code or hang.
#[derive(Debug, Clone, Default, Serialize, Deserialize)]
struct Reply {
    stdout: String,
    stderr: String,
    exit: u8,
    hang: bool,
    #[serde(default)]
    kill_parent: bool,
}

impl Reply {
    fn print(stdout: impl Into<String>) -> Self {
        Self {
            stdout: stdout.into(),
            ..Self::default()
        }
    }

    fn fail(stderr: impl Into<String>) -> Self {
        Self {
            stderr: stderr.into(),
            exit: 1,
            ..Self::default()
        }
    }
}

// ---------------------------------------------------------------------------
// The client.

/// The client's command line, in SSGM's single-dash style.
#[derive(Debug)]
struct ClientArgs {
    host: String,
    port: u16,
    request: Request,
}

impl ClientArgs {
    fn parse(args: &[String]) -> Result<Self, String> {
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

fn client(args: ClientArgs) -> ExitCode {
    // Taken before any network wait, so a parent that dies meanwhile is not confused
    // with whoever adopts this process.
    let parent = nix::unistd::getppid();
    let reply = match exchange(&args) {
        Ok(reply) => reply,
        Err(e) => {
            eprintln!(
                "mock-ssgm: cannot reach the scheduler at {}:{}: {e:#}",
                args.host, args.port
            );
            return ExitCode::FAILURE;
        }
    };
    // Output errors (a closed pipe) cannot be reported anywhere useful.
    let _ = std::io::stdout().write_all(reply.stdout.as_bytes());
    let _ = std::io::stdout().flush();
    let _ = std::io::stderr().write_all(reply.stderr.as_bytes());
    if reply.kill_parent {
        kill_parent(parent);
    }
    if reply.hang {
        // Hang like a stuck SSGM would: only a signal ends this process.
        loop {
            std::thread::sleep(Duration::from_secs(3600));
        }
    }
    ExitCode::from(reply.exit)
}

/// Sends SIGKILL to `parent`, the process this client started under, unless it is gone
/// already: then `getppid()` names an adopter (init or a subreaper), which must live.
fn kill_parent(parent: nix::unistd::Pid) {
    use nix::sys::signal::{Signal, kill};

    if parent.as_raw() <= 1 || nix::unistd::getppid() != parent {
        eprintln!("mock-ssgm: parent {parent} is gone; not signalling anyone");
        return;
    }
    eprintln!("mock-ssgm: injected SIGKILL of parent {parent}");
    if let Err(e) = kill(parent, Signal::SIGKILL) {
        eprintln!("mock-ssgm: cannot kill parent {parent}: {e}");
    }
}

/// Sends the request and reads the reply.
fn exchange(args: &ClientArgs) -> Result<Reply> {
    let addrs = (args.host.as_str(), args.port)
        .to_socket_addrs()
        .context("cannot resolve host")?;
    let mut last_error = anyhow!("host has no address");
    let mut stream = None;
    for addr in addrs {
        match TcpStream::connect_timeout(&addr, CONNECT_TIMEOUT) {
            Ok(s) => {
                stream = Some(s);
                break;
            }
            Err(e) => last_error = anyhow::Error::new(e).context(format!("connect to {addr}")),
        }
    }
    let mut stream = stream.ok_or(last_error)?;
    stream.set_read_timeout(Some(REPLY_TIMEOUT))?;
    let mut line = serde_json::to_string(&args.request)?;
    line.push('\n');
    stream.write_all(line.as_bytes()).context("send request")?;
    let mut reply = String::new();
    BufReader::new(stream.take(MAX_LINE))
        .read_line(&mut reply)
        .context("read reply")?;
    if reply.is_empty() {
        bail!("connection closed without a reply");
    }
    serde_json::from_str(&reply).context("unreadable reply")
}

// ---------------------------------------------------------------------------
// The server.

/// The server's command line.
#[derive(Debug)]
struct ServeArgs {
    listen: String,
    gpus: usize,
    hosts: Vec<String>,
}

impl ServeArgs {
    fn parse(args: &[String]) -> Result<Self, String> {
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

/// Runs the server until SIGTERM or SIGINT.
fn serve(args: ServeArgs) -> Result<()> {
    tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .context("start runtime")?
        .block_on(serve_async(args))
}

async fn serve_async(args: ServeArgs) -> Result<()> {
    use tokio::signal::unix::{SignalKind, signal};

    let listener = tokio::net::TcpListener::bind(&args.listen)
        .await
        .with_context(|| format!("cannot listen on {}", args.listen))?;
    let addr = listener.local_addr().context("listening address")?;
    let mut sigterm = signal(SignalKind::terminate()).context("SIGTERM handler")?;
    let mut sigint = signal(SignalKind::interrupt()).context("SIGINT handler")?;
    {
        // The one line a test or a script waits for; everything else goes to stderr.
        let mut stdout = std::io::stdout().lock();
        writeln!(stdout, "listening on {addr}").context("write to stdout")?;
        stdout.flush().context("flush stdout")?;
    }
    eprintln!(
        "mock-ssgm: serving {} GPU(s) on {} at {addr}",
        args.gpus,
        args.hosts.join(",")
    );
    let state = Arc::new(Mutex::new(State::new(args.gpus, args.hosts)));
    loop {
        tokio::select! {
            accepted = listener.accept() => match accepted {
                Ok((socket, _)) => {
                    let state = Arc::clone(&state);
                    tokio::spawn(async move {
                        if let Err(e) = handle(socket, &state).await {
                            eprintln!("mock-ssgm: connection failed: {e:#}");
                        }
                    });
                }
                Err(e) => {
                    eprintln!("mock-ssgm: accept failed: {e}");
                    // Out of file descriptors and the like: do not spin.
                    tokio::time::sleep(Duration::from_millis(100)).await;
                }
            },
            _ = sigterm.recv() => break,
            _ = sigint.recv() => break,
        }
    }
    let live = lock(&state).allocations.len();
    eprintln!("mock-ssgm: stopping with {live} live allocation(s)");
    Ok(())
}

/// Answers one connection: one request line, one reply line.
async fn handle(socket: tokio::net::TcpStream, state: &Mutex<State>) -> Result<()> {
    let (read, mut write) = socket.into_split();
    let mut line = String::new();
    tokio::io::BufReader::new(read.take(MAX_LINE))
        .read_line(&mut line)
        .await
        .context("read request")?;
    let reply = match serde_json::from_str::<Request>(&line) {
        Ok(request) => lock(state).apply(request),
        Err(e) => Reply::fail(format!("mock-ssgm: bad request: {e}\n")),
    };
    let mut out = serde_json::to_string(&reply).context("encode reply")?;
    out.push('\n');
    write
        .write_all(out.as_bytes())
        .await
        .context("send reply")?;
    Ok(())
}

fn lock(state: &Mutex<State>) -> std::sync::MutexGuard<'_, State> {
    state
        .lock()
        .expect("no code panics while holding the state lock")
}

/// One live allocation.
#[derive(Debug)]
struct Allocation {
    gpus: Vec<usize>,
    since: Instant,
}

/// Counters reported by `-stats`, cleared by `-reset`.
#[derive(Debug, Default, Clone, Copy, Serialize)]
struct Counters {
    max_live: usize,
    max_gpus_in_use: usize,
    alloc_calls: u64,
    granted: u64,
    busy: u64,
    request_errors: u64,
    dealloc_calls: u64,
    released: u64,
    failed_releases: u64,
    faults_injected: u64,
}

/// The `-stats` line: the allocation state now, then the counters.
#[derive(Debug, Serialize)]
struct Stats {
    total_gpus: usize,
    free_gpus: usize,
    live: usize,
    #[serde(flatten)]
    counters: Counters,
}

/// Everything the scheduler knows.
#[derive(Debug)]
struct State {
    hosts: Vec<String>,
    /// The job holding each GPU, if any.
    owners: Vec<Option<u64>>,
    allocations: BTreeMap<u64, Allocation>,
    next_job: u64,
    counters: Counters,
    /// Pending alloc faults, oldest first, with the calls each has left.
    alloc_faults: VecDeque<(Fault, u32)>,
    /// Dealloc calls still to fail.
    release_faults: u32,
}

impl State {
    fn new(gpus: usize, hosts: Vec<String>) -> Self {
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

    fn apply(&mut self, request: Request) -> Reply {
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

    fn alloc(&mut self, raw_gpus: &str) -> Reply {
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

    fn alloc_for_real(&mut self, wanted: Option<usize>, raw_gpus: &str) -> Reply {
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

    fn take_alloc_fault(&mut self) -> Option<Fault> {
        let (fault, left) = self.alloc_faults.front_mut()?;
        let fault = *fault;
        *left -= 1;
        if *left == 0 {
            self.alloc_faults.pop_front();
        }
        Some(fault)
    }

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

    fn top(&self) -> String {
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

    fn stats(&self) -> Stats {
        Stats {
            total_gpus: self.owners.len(),
            free_gpus: self.owners.iter().filter(|o| o.is_none()).count(),
            live: self.allocations.len(),
            counters: self.counters,
        }
    }

    /// `SSGM_ERROR=0;SSGM_JOB=<job>;RCUDA_DEVICE_COUNT=<n>;RCUDA_DEVICE_<i>=<host>:<gpu>;...;`
    fn grant_line(&self, job: u64, gpus: &[usize]) -> String {
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
    fn device(&self, g: usize) -> String {
        let hosts = self.hosts.len();
        format!("{}:{}", self.hosts[g % hosts], g / hosts)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn args(s: &str) -> Vec<String> {
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
