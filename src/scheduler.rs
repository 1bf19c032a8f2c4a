//! The GPU scheduler: the [`GpuScheduler`] trait the daemon allocates and
//! releases GPUs through, its implementation on the rCUDA scheduler's SSGM
//! client ([`Ssgm`]), and the parser of SSGM's `-alloc` reply.
//!
//! Running SSGM lives in `ssgm`, reading its reply (pure) in `reply`. What a
//! busy or refused allocation means for a job, retries, and remembering which
//! reservations are held are left to `reservations`.

mod reply;
mod ssgm;

pub use reply::AllocReply;
pub(crate) use reply::Grant;
pub(crate) use ssgm::KILL_GRACE;
pub use ssgm::{CallFiles, GpuScheduler, SchedulerError, Ssgm, SsgmConfig};
