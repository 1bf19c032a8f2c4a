//! How a job ends: its outcome, its error, and the one place that says what each ending
//! means for the message (`JobError::disposition`) and for the metrics
//! (`JobError::outcome`).

use std::time::Duration;

use crate::aws::storage::StorageError;
use crate::job::bundle::BundleError;
use crate::job::claim::ClaimError;
use crate::ops::telemetry::Outcome;
use crate::reservations::AllocError;

/// The outcome of a job that did not fail.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum JobOutcome {
    /// The result appeared in the output bucket.
    Completed,
    /// The result was already there (a duplicate or redelivered notification): the job
    /// was not run again.
    AlreadyDone,
    /// Lambda mode: the bundle is uploaded and the claim, parked until the result
    /// deadline, carries the job and its grant from here on.
    Handed,
    /// Lambda mode: the job's claim already carries it (parked by an earlier invocation,
    /// its function may be running): this copy is not needed.
    Carried,
}

/// What to do with the message after a job failed.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Disposition {
    /// It can never become a job: delete the message.
    Delete,
    /// It may work later: make the message visible again after a backoff.
    RetryLater,
    /// Not tried for a reason of ours (shutdown): make it visible again at once.
    ReturnNow,
    /// Someone else holds the message now: leave it alone.
    Abandon,
    /// Another daemon runs this job: make the message visible again after this long,
    /// when the result exists or the other daemon's claim has run out.
    ReturnAfter(Duration),
}

/// Why a job failed.
#[derive(Debug, thiserror::Error)]
pub(crate) enum JobError {
    #[error("input s3://{bucket}/{key} no longer exists")]
    InputGone { bucket: String, key: String },
    /// The object changed (or went) after the event: the event is superseded, and the new
    /// version has its own event and job id.
    #[error("input s3://{bucket}/{key} changed since its event (superseded)")]
    InputSuperseded { bucket: String, key: String },
    #[error("job is held by another daemon ({owner}) for {remaining:?} more")]
    HeldElsewhere { owner: String, remaining: Duration },
    /// Another daemon holds the job from another message, which carries the job: this
    /// copy is not needed.
    #[error("duplicate of a job held by {owner} from another message")]
    Duplicate { owner: String },
    /// Lambda mode: a grant a former holder left in the claim could not be released; the
    /// claim keeps it, and the job waits until it is.
    #[error("the grant the job's claim records is not released yet (release pending)")]
    ReleasePending,
    #[error("job's claim was lost (its lease ran out or another daemon took it over)")]
    ClaimLost,
    #[error("failed to claim the job")]
    Claim(#[source] ClaimError),
    #[error("failed to transfer job data")]
    Storage(#[source] StorageError),
    #[error("failed to create a temporary file in {dir}")]
    TempFile {
        dir: String,
        #[source]
        source: std::io::Error,
    },
    #[error("failed to build the bundle")]
    Bundle(#[source] BundleError),
    #[error("failed to get GPUs")]
    Allocation(#[source] AllocError),
    #[error("no result at s3://{bucket}/{key} within {deadline:?}")]
    ResultDeadline {
        bucket: String,
        key: String,
        deadline: Duration,
    },
    #[error("job not started: shutting down")]
    NotStarted,
    #[error("job cancelled by shutdown")]
    Cancelled,
    /// Cancelled after the bundle went to the function, which may still write the result:
    /// the message comes back after a backoff, by when a retry will probably find it.
    #[error("job cancelled by shutdown while its function was running")]
    CancelledAwaitingResult,
    #[error("job abandoned: its message is no longer ours")]
    Abandoned,
}

impl JobError {
    /// How this ending is counted in `orchgpu_jobs_total{outcome}`.
    pub(crate) fn outcome(&self) -> Outcome {
        match self {
            JobError::InputGone { .. } => Outcome::Dropped,
            JobError::InputSuperseded { .. } => Outcome::Superseded,
            JobError::HeldElsewhere { .. } | JobError::ClaimLost => Outcome::Deferred,
            JobError::Duplicate { .. } => Outcome::Duplicate,
            JobError::Cancelled | JobError::NotStarted | JobError::CancelledAwaitingResult => {
                Outcome::Stopped
            }
            JobError::Abandoned => Outcome::Abandoned,
            JobError::Allocation(AllocError::Deadline(_)) | JobError::ResultDeadline { .. } => {
                Outcome::Deadline
            }
            JobError::Storage(_)
            | JobError::Claim(_)
            | JobError::TempFile { .. }
            | JobError::Bundle(_)
            | JobError::Allocation(_)
            | JobError::ReleasePending => Outcome::Returned,
        }
    }

    /// The lifecycle policy: only a job that can never work deletes its message.
    pub(crate) fn disposition(&self) -> Disposition {
        match self {
            // A duplicate's job is carried by the holder's own message.
            JobError::InputGone { .. }
            | JobError::InputSuperseded { .. }
            | JobError::Duplicate { .. } => Disposition::Delete,
            // A second early; and the lease can be no longer than SQS lets a message hide.
            JobError::HeldElsewhere { remaining, .. } => Disposition::ReturnAfter(
                (*remaining + Duration::from_secs(1)).min(crate::aws::queue::MAX_VISIBILITY / 2),
            ),
            // Whoever takes the job over next finishes it (or adopts its running function).
            JobError::ClaimLost | JobError::Cancelled | JobError::NotStarted => {
                Disposition::ReturnNow
            }
            JobError::Abandoned => Disposition::Abandon,
            JobError::Storage(_)
            | JobError::Claim(_)
            | JobError::TempFile { .. }
            | JobError::Bundle(_)
            | JobError::Allocation(_)
            | JobError::ReleasePending
            | JobError::CancelledAwaitingResult
            | JobError::ResultDeadline { .. } => Disposition::RetryLater,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn disposition_per_error() {
        use Disposition::*;
        let gone = JobError::InputGone {
            bucket: "b".into(),
            key: "k".into(),
        };
        assert_eq!(gone.disposition(), Delete);
        assert_eq!(JobError::Cancelled.disposition(), ReturnNow);
        assert_eq!(JobError::NotStarted.disposition(), ReturnNow);
        assert_eq!(JobError::CancelledAwaitingResult.disposition(), RetryLater);
        assert_eq!(JobError::Abandoned.disposition(), Abandon);
        assert_eq!(
            JobError::Allocation(AllocError::Deadline(Duration::from_secs(1))).disposition(),
            RetryLater
        );
        assert_eq!(
            JobError::Allocation(AllocError::Rejected {
                gpus: 9,
                detail: "x".into()
            })
            .disposition(),
            RetryLater
        );
        let deadline = JobError::ResultDeadline {
            bucket: "b".into(),
            key: "k".into(),
            deadline: Duration::from_secs(1),
        };
        assert_eq!(deadline.disposition(), RetryLater);
        let bundle = JobError::Bundle(BundleError::InvalidJobId("x/y".into()));
        assert_eq!(bundle.disposition(), RetryLater);
        let superseded = JobError::InputSuperseded {
            bucket: "b".into(),
            key: "k".into(),
        };
        assert_eq!(superseded.disposition(), Delete);
        let held = JobError::HeldElsewhere {
            owner: "h:1".into(),
            remaining: Duration::from_secs(20),
        };
        assert_eq!(held.disposition(), ReturnAfter(Duration::from_secs(21)));
        assert_eq!(JobError::ClaimLost.disposition(), ReturnNow);
        let duplicate = JobError::Duplicate {
            owner: "h:1".into(),
        };
        assert_eq!(duplicate.disposition(), Delete);
        let claim = JobError::Claim(crate::job::claim::ClaimError::Store {
            op: "write",
            bucket: "b".into(),
            key: "k".into(),
            source: "unreachable".into(),
        });
        assert_eq!(claim.disposition(), RetryLater);
    }
}
