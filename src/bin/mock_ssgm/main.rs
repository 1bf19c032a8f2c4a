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
//! This binary is self-contained: it does not use the orchgpu library.
//!
//! Its rooms: `cli` (the usage text and both command lines), `wire` (the request and reply
//! lines), `client` and `server` (the two roles), `state` (the books: GPUs, allocations,
//! counters), `fault` (the injected faults), `views` (`-top` and `-stats`).

mod cli;
mod client;
mod fault;
mod server;
mod state;
mod views;
mod wire;

use std::process::ExitCode;

use cli::{ClientArgs, ServeArgs, USAGE};
use client::client;
use server::serve;

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
