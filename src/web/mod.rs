//! The web page for the people who upload images: the page at `/` and its JSON API,
//! merged into the `--http-listen` router by `http`.
//!
//! It owns what a browser may ask: uploading a file to the `--upload-to` location
//! (streamed through a temp file in the work dir, then `storage`), a job's state as the
//! history and S3 tell it (a claim present: running elsewhere; the result present: done),
//! the recent jobs, and the result and detections proxied from the output bucket. It
//! guards them: a token when `--http-token-file` is set, a size limit, same-origin writes
//! only, a strict Content-Security-Policy, and ids and keys that never come from a request
//! as they are. It leaves running the jobs to `job` and `daemon`: it only uploads and
//! reads.

mod names;
mod routes;
mod status;

pub use routes::{WebSettings, router};
