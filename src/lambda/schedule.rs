//! The schedule: the periodic pass over the claims.

use serde::Serialize;

use super::handler::{Invocation, Lambda};

/// What one pass did.
#[derive(Debug, Default, Serialize)]
pub(crate) struct Pass {
    pub(crate) claims: usize,
}

/// One pass over the claims.
pub(crate) async fn run(_lambda: &Lambda, _invocation: &Invocation) -> Pass {
    Pass::default()
}
