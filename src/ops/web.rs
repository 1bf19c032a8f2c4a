//! The web page for the people who upload images: the page at `/` and its JSON API,
//! merged into the `--http-listen` router by `http` (which has already checked the
//! request's host name and bounds its time).
//!
//! It owns what a browser may ask: uploading a file to the `--upload-to` location
//! (streamed through a temp file in the work dir, then `storage`), one's own upload's job
//! by the unguessable handle the upload answered (`keys`), as the history and S3 tell it
//! (`status`, through the short `cache`), and every file the function wrote for it
//! (`<id>.*`: images and text shown, the rest downloaded) proxied from the output bucket; for token holders (operators), every recent job. It guards them: a
//! token when `--http-token-file` is set (a session cookie derived from it for the page),
//! size, concurrency and disk limits on uploads, same-origin writes only, a strict
//! Content-Security-Policy, and ids and keys that never come from a request as they are.
//! It leaves running the jobs to `job` and `daemon`: it only uploads and reads.

mod cache;
mod keys;
mod names;
mod routes;
mod status;
mod upload;

pub(crate) use routes::{WEB_TEXT_MAX, WebSettings, router};
